//! `Root`: full scans and event-driven rescans agree, ignore rules included; writes are
//! checked and atomic.

use filesync::tree::Root;
use protocol::sync::{Action, Node, OpErrorCode};
use std::path::{Path, PathBuf};

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

#[test]
fn rescanning_named_paths_gives_what_a_full_scan_gives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join(".gitignore"), "*.log\nbuild/\n");
    write(&d.join("src/.gitignore"), "gen/\n!keep.log\n");
    write(&d.join("src/main.rs"), "fn main() {}");
    let mut root = Root::open(d, &["node_modules/".into(), "*.secret".into()], None).unwrap();
    let mut tree = root.scan();
    assert!(tree.contains_key("src/main.rs") && tree.contains_key(".gitignore"));

    // Changes, some of them ignored by rules of folders above them.
    let mut touched: Vec<PathBuf> = Vec::new();
    let mut add = |rel: &str, content: &str| {
        write(&d.join(rel), content);
        touched.push(d.join(rel));
    };
    add("a.log", "ignored by the root .gitignore");
    add("src/keep.log", "whitelisted by src/.gitignore");
    add("src/gen/out.rs", "ignored folder");
    add("new/deep/er/file.txt", "a new subtree");
    add("new/deep/er/x.log", "ignored inside the new subtree");
    add("node_modules/pkg/index.js", "ignored by the extra rules");
    add("src/b.secret", "ignored by the extra rules");
    add("build/out.o", "ignored folder at the root");
    std::fs::remove_file(d.join("src/main.rs")).unwrap();
    touched.push(d.join("src/main.rs"));
    std::os::unix::fs::symlink("../src", d.join("new/link")).unwrap();
    touched.push(d.join("new/link"));
    // Events name the new folder and some files; others only through their folder.
    let named: Vec<PathBuf> = touched
        .iter()
        .filter(|p| !p.ends_with("file.txt"))
        .cloned()
        .chain([d.join("new")])
        .collect();
    assert!(root.rescan_paths(&mut tree, &named));
    let full = root.scan();
    assert_eq!(tree, full);
    assert!(full.contains_key("src/keep.log") && full.contains_key("new/deep/er/file.txt"));
    for ignored in [
        "a.log",
        "src/gen",
        "new/deep/er/x.log",
        "node_modules",
        "src/b.secret",
        "build",
    ] {
        assert!(!full.contains_key(ignored), "{ignored}");
    }
    assert_eq!(full.get("new/link"), Some(&Node::Symlink("../src".into())));
    // A changed ignore file asks for a full scan.
    assert!(!root.rescan_paths(&mut tree, &[d.join(".gitignore")]));
    // Removing a folder removes what was under it.
    std::fs::remove_dir_all(d.join("new")).unwrap();
    assert!(root.rescan_paths(&mut tree, &[d.join("new")]));
    assert!(!tree.keys().any(|k| k.starts_with("new")));
}

#[test]
fn writes_are_checked_and_leave_no_partial_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), d.join("out")).unwrap();
    let mut root = Root::open(d, &[], None).unwrap();
    // A half-written file is discarded with its Incoming; nothing appears.
    let mut incoming = root.create("f.txt", 0o644, 0, false).unwrap();
    incoming.write(b"partial").unwrap();
    drop(incoming);
    assert_eq!(std::fs::read_dir(d).unwrap().count(), 1, "only the link");
    // Through a link: refused.
    let e = root.create("out/f.txt", 0o644, 0, false).err().unwrap();
    assert_eq!(e.code, OpErrorCode::Escape);
    let e = root.apply("out/x", None, &Action::Mkdir).unwrap_err();
    assert_eq!(e.code, OpErrorCode::Escape);
    // A wrong hash: refused, nothing written.
    let mut incoming = root.create("g.txt", 0o644, 0, false).unwrap();
    incoming.write(b"content").unwrap();
    let e = root
        .commit(incoming, protocol::sync::Hash([1; 32]), None)
        .unwrap_err();
    assert_eq!(e.code, OpErrorCode::HashMismatch);
    assert!(!d.join("g.txt").exists());
    // The target changed since the sender looked: refused, the new content kept.
    std::fs::write(d.join("h.txt"), "theirs").unwrap();
    let mut incoming = root.create("h.txt", 0o644, 0, false).unwrap();
    incoming.write(b"mine").unwrap();
    let hash = protocol::sync::Hash(*blake3::hash(b"mine").as_bytes());
    assert_eq!(
        root.commit(incoming, hash, None).unwrap_err().code,
        OpErrorCode::Changed
    );
    assert_eq!(std::fs::read(d.join("h.txt")).unwrap(), b"theirs");
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    // A FIFO is neither read nor replaced.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        d.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    assert_eq!(
        root.current("fifo").unwrap_err().code,
        OpErrorCode::Unsupported
    );
    assert_eq!(
        root.apply("fifo", None, &Action::Remove).unwrap_err().code,
        OpErrorCode::Unsupported
    );
    assert!(!root.scan().contains_key("fifo"));
    assert!(root.skipped.iter().any(|s| s.contains("fifo")));
}
