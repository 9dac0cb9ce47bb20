//! `hub/src` is grouped by layer, and no module reaches up to a higher one:
//!
//! | layer | folders |
//! |---|---|
//! | 0 | `base` (workspace record, CA, identity, files) |
//! | 1 | `store`, `provider` (the outside systems) |
//! | 2 | `domain` (lifecycle and housekeeping, callers, events, connected agents) |
//! | 3 | `links` (agents, CLI clients, other replicas over QUIC) |
//! | 4 | `edge` (HTTP) |
//! | 5 | `lib.rs`, `config.rs`, `main.rs` (start-up and wiring) |
//!
//! The one handle every layer is given is the hub's shared state (`crate::Hub`,
//! `crate::AppState`), which `lib.rs` builds.

use std::path::{Path, PathBuf};

fn layer_of_folder(name: &str) -> Option<u8> {
    Some(match name {
        "base" => 0,
        "store" | "provider" => 1,
        "domain" => 2,
        "links" => 3,
        "edge" => 4,
        _ => return None,
    })
}

/// The layer of what `crate::<first>` names, or `None` for the shared handle.
fn layer_of_path(first: &str) -> Option<u8> {
    match first {
        "Hub" | "AppState" => None,
        other => Some(layer_of_folder(other).unwrap_or(5)),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The first segment of every `crate::` path in `text` (grouped imports included).
fn crate_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `workspace_hub_crate::` and the like
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str();
        let Some(own) = layer_of_folder(&top.to_string_lossy()) else {
            continue; // the top: lib.rs, config.rs, main.rs
        };
        let text = std::fs::read_to_string(file).unwrap();
        for name in crate_paths(&text) {
            if let Some(target) = layer_of_path(&name)
                && target > own
            {
                upward.push(format!(
                    "{} (layer {own}) uses crate::{name} (layer {target})",
                    relative.display()
                ));
            }
        }
    }
    upward.sort();
    upward.dedup();
    assert!(
        upward.is_empty(),
        "imports from a higher layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_layer_check_sees_grouped_and_plain_paths() {
    assert_eq!(
        crate_paths("use crate::{AppState, edge::api};\nlet x = crate::links::agents::f();"),
        ["AppState", "edge", "links"]
    );
}
