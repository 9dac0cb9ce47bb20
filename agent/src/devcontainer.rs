//! A repository's `devcontainer.json`, read without a container runtime: what the agent can
//! apply in the VM (lifecycle commands, environment, port labels) and what it cannot (the
//! settings that need a container), each named. Pure: text in, [`DevContainer`] out.

use protocol::control::{NotApplied, PortLabel};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A dev container file may not be larger than this.
pub const MAX_FILE: usize = 1 << 20;

/// The lifecycle commands the agent runs, in the order they run.
pub const LIFECYCLE: [&str; 5] = [
    "onCreateCommand",
    "updateContentCommand",
    "postCreateCommand",
    "postStartCommand",
    "postAttachCommand",
];

/// One command: a string runs through `/bin/sh -c`, an array runs as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

/// A lifecycle command in any of its forms: the object form runs its named commands at
/// the same time, the others one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle(pub Vec<(Option<String>, Command)>);

/// What a dev container file asks for, as far as the agent applies it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DevContainer {
    /// By lifecycle name ([`LIFECYCLE`]).
    pub commands: BTreeMap<&'static str, Lifecycle>,
    /// `containerEnv` then `remoteEnv`, with their variables substituted; a later entry of
    /// the same name wins. A `remoteEnv` value of `null` unsets the name.
    pub env: Vec<(String, Option<String>)>,
    pub port_labels: Vec<PortLabel>,
    pub not_applied: Vec<NotApplied>,
}

/// Settings that need a container runtime or another machine, and why they are not applied.
const NEEDS_A_CONTAINER: [(&str, &str); 25] = [
    (
        "image",
        "no container runtime: the workspace is the VM's own system",
    ),
    ("build", "no container runtime: nothing is built"),
    ("dockerFile", "no container runtime: nothing is built"),
    ("dockerfile", "no container runtime: nothing is built"),
    ("context", "no container runtime: nothing is built"),
    (
        "dockerComposeFile",
        "no container runtime: Compose services are not started",
    ),
    (
        "service",
        "no container runtime: Compose services are not started",
    ),
    (
        "runServices",
        "no container runtime: Compose services are not started",
    ),
    (
        "features",
        "no container runtime: features are not installed; install the tools in the image or a lifecycle command",
    ),
    ("mounts", "no container runtime: nothing is mounted"),
    (
        "workspaceMount",
        "no container runtime: the repository is checked out in the home folder",
    ),
    (
        "workspaceFolder",
        "the repository is checked out in the home folder",
    ),
    ("runArgs", "no container runtime"),
    (
        "appPort",
        "every listening port is reported and reachable through the hub",
    ),
    ("privileged", "no container runtime"),
    ("capAdd", "no container runtime"),
    ("securityOpt", "no container runtime"),
    ("init", "no container runtime"),
    ("overrideCommand", "no container runtime"),
    (
        "shutdownAction",
        "the hub's idle policy stops the workspace",
    ),
    ("containerUser", "commands run as the workspace user"),
    ("remoteUser", "commands run as the workspace user"),
    ("updateRemoteUserUID", "commands run as the workspace user"),
    (
        "hostRequirements",
        "the machine type is chosen when the workspace is created",
    ),
    (
        "initializeCommand",
        "it runs on the local machine before the container starts; there is none here",
    ),
];

/// Settings read elsewhere, or meaning nothing here, reported so nothing goes unmentioned.
const NOT_FOR_THE_AGENT: [(&str, &str); 4] = [
    (
        "customizations",
        "editor settings, for the editor that connects",
    ),
    (
        "otherPortsAttributes",
        "every listening port is reported; only labels are applied",
    ),
    (
        "userEnvProbe",
        "terminals start login shells, which read the user's profile",
    ),
    (
        "waitFor",
        "commands run in the background; terminals open at once",
    ),
];

/// Read and applied (or harmless): never reported.
const APPLIED: [&str; 11] = [
    "$schema",
    "name",
    "forwardPorts",
    "portsAttributes",
    "containerEnv",
    "remoteEnv",
    "onCreateCommand",
    "updateContentCommand",
    "postCreateCommand",
    "postStartCommand",
    "postAttachCommand",
];

/// Strips `//` and `/* */` comments and trailing commas from JSON with comments, leaving
/// strings alone. An unterminated block comment is an error.
pub fn strip_jsonc(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    // Where the last comma outside a string went in `out`, while only blanks followed it.
    let mut comma: Option<usize> = None;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
                out.push_str(&text[start..i]);
                comma = None;
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let end = text[i + 2..]
                    .find("*/")
                    .ok_or("a /* comment is not closed")?;
                i += end + 4;
                out.push(' ');
                continue;
            }
            b',' => {
                comma = Some(out.len());
                out.push(',');
            }
            b'}' | b']' => {
                if let Some(at) = comma.take() {
                    out.replace_range(at..at + 1, " ");
                }
                out.push(c as char);
            }
            b' ' | b'\t' | b'\r' | b'\n' => out.push(c as char),
            _ => {
                comma = None;
                // A multi-byte character is copied whole.
                let len = text[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&text[i..i + len]);
                i += len;
                continue;
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Parses a dev container file. `folder` is the checkout (for `${containerWorkspaceFolder}`
/// and the like), `process_env` the environment `${containerEnv:NAME}` reads besides the
/// file's own `containerEnv`.
pub fn parse(
    text: &str,
    folder: &str,
    process_env: &dyn Fn(&str) -> Option<String>,
) -> Result<DevContainer, String> {
    if text.len() > MAX_FILE {
        return Err(format!("larger than {} KiB", MAX_FILE >> 10));
    }
    let value: Value = serde_json::from_str(&strip_jsonc(text)?).map_err(|e| e.to_string())?;
    let Value::Object(fields) = value else {
        return Err("not a JSON object".into());
    };
    let mut dc = DevContainer::default();
    let mut not_applied = |field: &str, reason: &str| {
        dc.not_applied.push(NotApplied {
            field: field.chars().take(128).collect(),
            reason: reason.to_owned(),
        })
    };
    for key in fields.keys() {
        if let Some((_, why)) = NEEDS_A_CONTAINER
            .iter()
            .chain(&NOT_FOR_THE_AGENT)
            .find(|(name, _)| name == key)
        {
            not_applied(key, why);
        } else if !APPLIED.contains(&key.as_str()) {
            not_applied(key, "not a setting this agent knows");
        }
    }
    let mut commands = BTreeMap::new();
    for name in LIFECYCLE {
        match fields.get(name).map(lifecycle) {
            None => {}
            Some(Ok(Some(l))) => {
                commands.insert(name, l);
            }
            Some(Ok(None)) => {}
            Some(Err(why)) => not_applied(name, &why),
        }
    }
    let mut env: Vec<(String, Option<String>)> = Vec::new();
    let mut container_env: BTreeMap<String, String> = BTreeMap::new();
    for (section, nullable) in [("containerEnv", false), ("remoteEnv", true)] {
        let Some(value) = fields.get(section) else {
            continue;
        };
        let Value::Object(vars) = value else {
            not_applied(section, "not an object of names and strings");
            continue;
        };
        for (name, value) in vars {
            let value = match value {
                Value::String(s) => Some(s.as_str()),
                Value::Null if nullable => None,
                _ => {
                    not_applied(&format!("{section}.{name}"), "not a string");
                    continue;
                }
            };
            if !valid_env_name(name) {
                not_applied(&format!("{section}.{name}"), "not a valid variable name");
                continue;
            }
            let value = value.map(|v| {
                substitute(v, folder, &|var| {
                    container_env.get(var).cloned().or_else(|| process_env(var))
                })
            });
            if value.as_ref().is_some_and(|v| v.contains('\0')) {
                not_applied(&format!("{section}.{name}"), "contains a NUL character");
                continue;
            }
            if section == "containerEnv"
                && let Some(v) = &value
            {
                container_env.insert(name.clone(), v.clone());
            }
            env.retain(|(n, _)| n != name);
            env.push((name.clone(), value));
        }
    }
    let empty = Map::new();
    let attributes = match fields.get("portsAttributes") {
        None => &empty,
        Some(Value::Object(a)) => a,
        Some(_) => {
            not_applied("portsAttributes", "not an object");
            &empty
        }
    };
    let mut labels: BTreeMap<u16, String> = BTreeMap::new();
    for (ports, attrs) in attributes {
        let Some(label) = attrs.get("label").and_then(Value::as_str) else {
            continue;
        };
        let label: String = label.chars().filter(|c| !c.is_control()).take(64).collect();
        match port_range(ports) {
            Some(range) => {
                for port in range {
                    labels.entry(port).or_insert_with(|| label.clone());
                }
            }
            None => not_applied(
                &format!("portsAttributes.{ports}"),
                "labels apply to ports and port ranges (at most 64 ports)",
            ),
        }
    }
    if let Some(forward) = fields.get("forwardPorts") {
        let list = forward.as_array().map(Vec::as_slice).unwrap_or_default();
        for entry in list {
            let port = match entry {
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                // `host:port` names a port on another container of a Compose file.
                Value::String(s) => match s.rsplit_once(':') {
                    Some(("localhost" | "127.0.0.1", p)) => p.parse().ok(),
                    _ => None,
                },
                _ => None,
            }
            .filter(|p| *p != 0);
            match port {
                Some(port) => {
                    labels.entry(port).or_default();
                }
                None => not_applied(
                    &format!("forwardPorts.{entry}"),
                    "only ports of this workspace (1 to 65535, or localhost:port)",
                ),
            }
        }
        if !forward.is_array() {
            not_applied("forwardPorts", "not an array");
        }
    }
    dc.port_labels = labels
        .into_iter()
        .map(|(port, label)| PortLabel {
            port,
            label: if label.is_empty() {
                format!("port {port}")
            } else {
                label
            },
        })
        .take(protocol::control::MAX_SETUP_ITEMS)
        .collect();
    dc.env = env;
    dc.commands = commands;
    dc.not_applied.truncate(protocol::control::MAX_SETUP_ITEMS);
    Ok(dc)
}

fn valid_env_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `3000` or `3000-3010` (at most 64 ports).
fn port_range(s: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a >= 1 && a <= b && b - a < 64).then_some(a..=b)
}

/// A lifecycle command in its three forms; `None` for an empty one.
fn lifecycle(value: &Value) -> Result<Option<Lifecycle>, String> {
    let one = |v: &Value| -> Result<Option<Command>, String> {
        match v {
            Value::String(s) if s.trim().is_empty() => Ok(None),
            Value::String(s) => Ok(Some(Command::Shell(s.clone()))),
            Value::Array(items) => {
                let argv: Option<Vec<String>> = items
                    .iter()
                    .map(|i| i.as_str().map(str::to_owned))
                    .collect();
                match argv {
                    Some(argv) if argv.is_empty() => Ok(None),
                    Some(argv) => Ok(Some(Command::Exec(argv))),
                    None => Err("an array of strings only".into()),
                }
            }
            _ => Err("a string, an array of strings or an object of those".into()),
        }
    };
    let commands = match value {
        Value::Object(named) => {
            let mut all = Vec::new();
            for (name, v) in named {
                if let Some(c) = one(v)? {
                    all.push((Some(name.chars().take(64).collect()), c));
                }
            }
            all
        }
        Value::Null => Vec::new(),
        v => one(v)?.map(|c| (None, c)).into_iter().collect(),
    };
    if commands.iter().any(|(_, c)| {
        matches!(c, Command::Shell(s) if s.contains('\0'))
            || matches!(c, Command::Exec(a) if a.iter().any(|s| s.contains('\0')))
    }) {
        return Err("contains a NUL character".into());
    }
    Ok((!commands.is_empty()).then_some(Lifecycle(commands)))
}

/// Replaces `${containerEnv:NAME[:default]}`, `${localEnv:NAME[:default]}` (there is no
/// local machine here: the default, else empty), `${containerWorkspaceFolder}`,
/// `${localWorkspaceFolder}` and their `Basename` forms. Anything else stays as written.
fn substitute(value: &str, folder: &str, container_env: &dyn Fn(&str) -> Option<String>) -> String {
    let basename = folder.rsplit('/').next().unwrap_or(folder);
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &after[..end];
        let mut parts = inner.splitn(3, ':');
        let replaced = match (parts.next(), parts.next(), parts.next()) {
            (Some("containerWorkspaceFolder" | "localWorkspaceFolder"), None, _) => {
                Some(folder.to_owned())
            }
            (
                Some("containerWorkspaceFolderBasename" | "localWorkspaceFolderBasename"),
                None,
                _,
            ) => Some(basename.to_owned()),
            (Some("containerEnv" | "env"), Some(name), default) => Some(
                container_env(name)
                    .or_else(|| default.map(str::to_owned))
                    .unwrap_or_default(),
            ),
            (Some("localEnv"), Some(_), default) => Some(default.unwrap_or_default().to_owned()),
            _ => None,
        };
        match replaced {
            Some(v) => out.push_str(&v),
            None => out.push_str(&rest[start..start + 2 + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "PATH").then(|| "/usr/bin:/bin".to_owned())
    }

    #[test]
    fn comments_and_trailing_commas_are_stripped_but_strings_are_kept() {
        let text = r#"{
            // a comment with "quotes" and a , comma
            "a": "http://x/*not a comment*/", /* block
            comment */ "b": [1, 2,],
            "c": "\"quoted //\"",
            "é": "ü",
        }"#;
        let v: Value = serde_json::from_str(&strip_jsonc(text).unwrap()).unwrap();
        assert_eq!(v["a"], "http://x/*not a comment*/");
        assert_eq!(v["b"], serde_json::json!([1, 2]));
        assert_eq!(v["c"], "\"quoted //\"");
        assert_eq!(v["é"], "ü");
        assert!(strip_jsonc("{ /* open").is_err());
    }

    #[test]
    fn lifecycle_commands_in_all_three_forms() {
        let text = r#"{
            "onCreateCommand": "make setup",
            "postCreateCommand": ["npm", "install"],
            "postStartCommand": {"server": "npm start", "watch": ["npm", "run", "watch"]},
            "postAttachCommand": "",
            "updateContentCommand": 42
        }"#;
        let dc = parse(text, "/home/dev/app", &env).unwrap();
        assert_eq!(
            dc.commands["onCreateCommand"],
            Lifecycle(vec![(None, Command::Shell("make setup".into()))])
        );
        assert_eq!(
            dc.commands["postCreateCommand"],
            Lifecycle(vec![(
                None,
                Command::Exec(vec!["npm".into(), "install".into()])
            )])
        );
        assert_eq!(dc.commands["postStartCommand"].0.len(), 2);
        assert!(!dc.commands.contains_key("postAttachCommand"));
        assert!(!dc.commands.contains_key("updateContentCommand"));
        assert!(
            dc.not_applied
                .iter()
                .any(|n| n.field == "updateContentCommand")
        );
    }

    #[test]
    fn environment_is_substituted_and_bad_names_are_reported() {
        let text = r#"{
            "containerEnv": {"APP_HOME": "${containerWorkspaceFolder}/app", "1BAD": "x"},
            "remoteEnv": {
                "PATH": "${containerEnv:PATH}:${containerEnv:APP_HOME}/bin",
                "NAME": "${containerWorkspaceFolderBasename}",
                "FROM_LAPTOP": "${localEnv:HOME:/nowhere}",
                "UNSET": null,
                "KEEP": "${unknown:thing}"
            }
        }"#;
        let dc = parse(text, "/home/dev/app", &env).unwrap();
        let get = |n: &str| dc.env.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(get("APP_HOME").unwrap(), "/home/dev/app/app");
        assert_eq!(get("PATH").unwrap(), "/usr/bin:/bin:/home/dev/app/app/bin");
        assert_eq!(get("NAME").unwrap(), "app");
        assert_eq!(get("FROM_LAPTOP").unwrap(), "/nowhere");
        assert_eq!(get("UNSET"), None);
        assert_eq!(get("KEEP").unwrap(), "${unknown:thing}");
        assert!(
            dc.not_applied
                .iter()
                .any(|n| n.field == "containerEnv.1BAD")
        );
    }

    #[test]
    fn ports_get_labels_and_container_settings_are_reported() {
        let text = r#"{
            "image": "mcr.microsoft.com/devcontainers/rust:1",
            "features": {"ghcr.io/devcontainers/features/node:1": {}},
            "forwardPorts": [3000, "localhost:8080", "db:5432", 0],
            "portsAttributes": {"3000": {"label": "Web\u0007 app"}, "9000-9001": {"label": "Docs"}, "1-100000": {"label": "all"}},
            "customizations": {"vscode": {}},
            "somethingNew": true
        }"#;
        let dc = parse(text, "/w", &env).unwrap();
        let labels: Vec<(u16, &str)> = dc
            .port_labels
            .iter()
            .map(|l| (l.port, l.label.as_str()))
            .collect();
        assert_eq!(
            labels,
            [
                (3000, "Web app"),
                (8080, "port 8080"),
                (9000, "Docs"),
                (9001, "Docs")
            ]
        );
        let fields: Vec<&str> = dc.not_applied.iter().map(|n| n.field.as_str()).collect();
        for field in [
            "image",
            "features",
            "customizations",
            "somethingNew",
            "forwardPorts.\"db:5432\"",
            "forwardPorts.0",
            "portsAttributes.1-100000",
        ] {
            assert!(fields.contains(&field), "{field} missing from {fields:?}");
        }
    }

    #[test]
    fn hostile_files_are_refused_without_panicking() {
        for text in ["", "[]", "{", "\"x\"", "{\"a\": /* x */ }", "{\"a\":\"\\"] {
            let _ = parse(text, "/w", &env);
        }
        assert!(parse(&" ".repeat(MAX_FILE + 1), "/w", &env).is_err());
        let nul = parse(r#"{"onCreateCommand": "a\u0000b"}"#, "/w", &env).unwrap();
        assert!(nul.commands.is_empty());
        assert_eq!(nul.not_applied[0].field, "onCreateCommand");
    }
}
