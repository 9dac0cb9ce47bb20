//! `wsh sync` through a real hub and agent: the first sync of a varied tree, edits and
//! deletions both ways, a 1-byte change in a 64 MiB file sent as a few blocks, conflicts,
//! ignore rules, the deletion guard, continuous sync across a killed hub, and a hostile
//! peer's crafted frames.

use harness::TestHub;
use link::{FramedRecv, send_msg};
use protocol::stream::{ClientSyncOpen, StreamHeader, StreamReply};
use protocol::sync::delta::Op;
use protocol::sync::{
    Action, ApplyRequest, DataChunk, DeltaChunk, FileEnd, FileHeader, GetRequest, Hash,
    OpErrorCode, SYNC_VERSION, SyncHello, SyncMsg,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Every entry under `dir`: kind, executable bit, content hash or link target.
fn tree_of(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, format!("link {}", target.display()));
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, out);
            } else {
                let exec = meta.permissions().mode() & 0o111 != 0;
                let hash = blake3::hash(&std::fs::read(&path).unwrap());
                out.insert(rel, format!("file exec={exec} {}", &hash.to_hex()[..16]));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

struct Env {
    hub: TestHub,
    id: String,
    local: PathBuf,
    remote: PathBuf,
    state: tempfile::TempDir,
    _local_parent: tempfile::TempDir,
}

async fn env() -> Env {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let local_parent = tempfile::tempdir().unwrap();
    let local = local_parent.path().join("proj");
    std::fs::create_dir(&local).unwrap();
    let remote = hub.workspace_dir(&id).join("proj");
    Env {
        hub,
        id,
        local,
        remote,
        state: tempfile::tempdir().unwrap(),
        _local_parent: local_parent,
    }
}

impl Env {
    fn wsh(&self) -> Command {
        let mut cmd = self.hub.wsh().unwrap();
        cmd.env("XDG_STATE_HOME", self.state.path())
            .stdin(Stdio::null());
        cmd
    }

    /// `wsh sync --once --json`: (success, totals, stderr).
    fn once(&self, extra: &[&str]) -> (bool, Value, String) {
        let out = self
            .wsh()
            .args(["sync", "--once", "--json", &self.id])
            .arg(&self.local)
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let totals = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (out.status.success(), totals, stderr)
    }

    fn assert_same(&self) {
        assert_eq!(tree_of(&self.local), tree_of(&self.remote));
    }
}

fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn first_sync_edits_deletions_and_a_one_byte_change_in_a_big_file() {
    let e = env().await;
    let l = &e.local;
    write(&l.join("README.md"), b"hello\n");
    write(&l.join("src/a/b/deep.rs"), b"fn main() {}\n");
    write(&l.join("bin/run.sh"), b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(l.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(l.join("empty/inner")).unwrap();
    std::os::unix::fs::symlink("src/a/b/deep.rs", l.join("link-to-deep")).unwrap();
    std::os::unix::fs::symlink("../README.md", l.join("src/readme")).unwrap();
    // Links that leave the folder are not synced (and said so).
    std::os::unix::fs::symlink("/etc/passwd", l.join("escape")).unwrap();
    // Many small files too: the agent serves thousands of requests in a row.
    for i in 0..2000 {
        write(
            &l.join(format!("many/d{}/f{i}.txt", i % 20)),
            format!("{i}\n").as_bytes(),
        );
    }
    let big = harness::pseudo_bytes(64 << 20, 1);
    write(&l.join("data/big.bin"), &big);

    let (ok, totals, err) = e.once(&[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("escape"),
        "the skipped link is reported: {err}"
    );
    let mut want = tree_of(l);
    want.remove("escape");
    assert_eq!(tree_of(&e.remote), want);
    assert!(totals["files_up"].as_u64().unwrap() >= 4, "{totals}");
    assert_eq!(totals["conflicts"].as_array().unwrap().len(), 0);

    // A second run with nothing changed sends nothing, and the workspace sends only what
    // changed since the last run (nothing), not its whole manifest again.
    let (ok, totals, err) = e.once(&[]);
    assert!(ok, "{err}");
    assert_eq!(totals["files_up"], 0);
    assert_eq!(totals["files_down"], 0);
    assert!(totals["wire_down"].as_u64().unwrap() < 256, "{totals}");

    // An edit on each side, a new file in the workspace.
    write(
        &l.join("src/a/b/deep.rs"),
        b"fn main() { println!(\"local\"); }\n",
    );
    write(&e.remote.join("README.md"), b"hello from the workspace\n");
    write(&e.remote.join("new/made-there.txt"), b"remote\n");
    std::fs::set_permissions(
        e.remote.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ok, totals, err) = e.once(&[]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(l.join("README.md")).unwrap(),
        b"hello from the workspace\n"
    );
    assert_eq!(
        std::fs::read(l.join("new/made-there.txt")).unwrap(),
        b"remote\n"
    );
    assert_eq!(
        std::fs::metadata(l.join("bin/run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o111,
        0
    );
    assert!(totals["files_down"].as_u64().unwrap() >= 2, "{totals}");
    std::fs::remove_file(l.join("escape")).unwrap();
    e.assert_same();

    // One byte in the 64 MiB file: a few blocks on the wire, not the file.
    let mut edited = big.clone();
    edited[40 << 20] ^= 0x5a;
    std::fs::write(l.join("data/big.bin"), &edited).unwrap();
    let (ok, totals, err) = e.once(&[]);
    assert!(ok, "{err}");
    assert_eq!(totals["files_up"], 1, "{totals}");
    let wire = totals["wire_up"].as_u64().unwrap() + totals["wire_down"].as_u64().unwrap();
    assert!(
        wire < 512 * 1024,
        "a 1-byte change moved {wire} bytes: {totals}"
    );
    assert_eq!(
        std::fs::read(e.remote.join("data/big.bin")).unwrap(),
        edited
    );
    // The same the other way.
    edited[7] ^= 0x01;
    std::fs::write(e.remote.join("data/big.bin"), &edited).unwrap();
    let (ok, totals, err) = e.once(&[]);
    assert!(ok, "{err}");
    assert_eq!(totals["files_down"], 1, "{totals}");
    let wire = totals["wire_up"].as_u64().unwrap() + totals["wire_down"].as_u64().unwrap();
    assert!(
        wire < 512 * 1024,
        "a 1-byte change moved {wire} bytes: {totals}"
    );
    e.assert_same();

    // Deletions both ways, a folder among them.
    std::fs::remove_dir_all(l.join("src")).unwrap();
    std::fs::remove_file(e.remote.join("new/made-there.txt")).unwrap();
    let (ok, totals, err) = e.once(&[]);
    assert!(ok, "{err}");
    assert!(!e.remote.join("src").exists());
    assert!(!l.join("new/made-there.txt").exists());
    assert!(totals["deleted_remote"].as_u64().unwrap() >= 4, "{totals}");
    // The link into the deleted folder is dangling now, on both sides alike.
    e.assert_same();
    // Hashing and writing never kept the agent from its heartbeats.
    let log = e.hub.agent_log(&e.id);
    assert!(!log.contains("link to hub lost"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicts_keep_both_versions_and_ignore_rules_hold() {
    let e = env().await;
    let l = &e.local;
    write(&l.join("notes.txt"), b"base\n");
    write(&l.join(".gitignore"), b"*.log\nbuild/\n");
    write(&l.join("app.log"), b"log\n");
    write(&l.join("build/out.o"), b"obj\n");
    write(&l.join("node_modules/x/index.js"), b"js\n");
    write(&l.join(".git/HEAD"), b"ref\n");
    write(&l.join("secret.env"), b"TOKEN=1\n");
    write(&l.join("keep.txt"), b"keep\n");
    let (ok, _, err) = e.once(&["--ignore", "secret.env"]);
    assert!(ok, "{err}");
    let remote = tree_of(&e.remote);
    for absent in ["app.log", "build", "node_modules", ".git", "secret.env"] {
        assert!(
            !remote.contains_key(absent),
            "{absent} was synced: {remote:?}"
        );
    }
    for present in [".gitignore", "keep.txt", "notes.txt"] {
        assert!(
            remote.contains_key(present),
            "{present} missing: {remote:?}"
        );
    }

    // Both sides change the same file; the workspace's edit is the newer one.
    write(&l.join("notes.txt"), b"local edit\n");
    std::thread::sleep(Duration::from_millis(20));
    write(&e.remote.join("notes.txt"), b"workspace edit\n");
    let (ok, totals, err) = e.once(&["--ignore", "secret.env"]);
    assert!(ok, "{err}");
    let conflicts = totals["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{totals}");
    assert!(
        conflicts[0].as_str().unwrap().contains("notes.txt"),
        "{totals}"
    );
    assert_eq!(
        std::fs::read(l.join("notes.txt")).unwrap(),
        b"workspace edit\n"
    );
    let copy = std::fs::read_dir(l)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("notes.conflict-local-") && n.ends_with(".txt"))
        .expect("the local version kept as a copy");
    assert_eq!(std::fs::read(l.join(&copy)).unwrap(), b"local edit\n");
    assert_eq!(
        std::fs::read(e.remote.join(&copy)).unwrap(),
        b"local edit\n",
        "the copy reaches the workspace"
    );
    // Deleted on one side, changed on the other: the change wins.
    std::fs::remove_file(l.join("keep.txt")).unwrap();
    write(&e.remote.join("keep.txt"), b"changed there\n");
    let (ok, _, err) = e.once(&["--ignore", "secret.env"]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(l.join("keep.txt")).unwrap(),
        b"changed there\n"
    );
    assert!(
        l.join("secret.env").exists() && l.join("app.log").exists(),
        "ignored files stay"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pass_that_would_delete_most_of_a_side_asks_first() {
    let e = env().await;
    for i in 0..40 {
        write(
            &e.local.join(format!("f{i}.txt")),
            format!("{i}").as_bytes(),
        );
    }
    let (ok, _, err) = e.once(&[]);
    assert!(ok, "{err}");
    // The workspace folder is emptied by accident.
    for i in 0..40 {
        std::fs::remove_file(e.remote.join(format!("f{i}.txt"))).unwrap();
    }
    let (ok, _, err) = e.once(&[]);
    assert!(!ok, "refused without confirmation");
    assert!(
        err.contains("would delete 40 of 40") && err.contains("--yes"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&e.local).unwrap().count(),
        40,
        "nothing deleted"
    );
    let (ok, totals, err) = e.once(&["--yes"]);
    assert!(ok, "{err}");
    assert_eq!(totals["deleted_local"], 40);
    assert_eq!(std::fs::read_dir(&e.local).unwrap().count(), 0);
    // A bad remote folder is refused before anything happens.
    let out = e
        .wsh()
        .args(["sync", "--once", &e.id])
        .arg(&e.local)
        .arg("../outside")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(".."),
        "{out:?}"
    );
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..600 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_sync_follows_both_sides_counts_as_activity_and_survives_a_hub_restart() {
    let mut e = env().await;
    write(&e.local.join("start.txt"), b"start\n");
    let mut events = harness::sse::Events::open(&e.hub, &e.id).await;
    let child = e
        .wsh()
        // Through the relay: what this follows is the hub dying under it (a direct
        // session would not notice).
        .args(["--path", "relay", "sync", &e.id])
        .arg(&e.local)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let remote = e.remote.clone();
    wait_until("the first sync", || remote.join("start.txt").exists()).await;
    // Edits on either side show up on the other.
    write(&e.local.join("from-local.txt"), b"L\n");
    wait_until("a local edit to arrive", || {
        std::fs::read(remote.join("from-local.txt")).is_ok_and(|b| b == b"L\n")
    })
    .await;
    write(&e.remote.join("dir/from-remote.txt"), b"R\n");
    let local = e.local.clone();
    wait_until("a workspace edit to arrive", || {
        std::fs::read(local.join("dir/from-remote.txt")).is_ok_and(|b| b == b"R\n")
    })
    .await;
    // The sync counts as use of the workspace, and `--status` shows it.
    let id = e.id.clone();
    let mut attached = 0;
    for _ in 0..100 {
        let (_, status) = e
            .hub
            .api("GET", &format!("/workspaces/{id}/status"), None)
            .await
            .unwrap();
        attached = status["agent"]["attached_clients"].as_u64().unwrap_or(0);
        if attached >= 1 {
            assert_eq!(status["activity"]["active"], true, "{status}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(attached >= 1, "a running sync is activity");
    // The agent reports the session: in the workspace's `agent` and as SSE `sync` events.
    let session = sync_session(&e.hub, &id, |s| s["files_sent"].as_u64() >= Some(1)).await;
    assert_eq!(session["root"], "proj", "{session}");
    assert_eq!(session["direct"], false, "{session}");
    assert_eq!(session["watching"], true, "{session}");
    assert!(session["files_received"].as_u64() >= Some(2), "{session}");
    assert!(session["bytes_received"].as_u64() > Some(0), "{session}");
    assert!(session["bytes_sent"].as_u64() > Some(0), "{session}");
    assert!(session["last_transfer_at"].as_i64() >= session["started_at"].as_i64());
    loop {
        let (kind, data) = events.next().await;
        if kind == "sync" && data["detail"]["sessions"][0]["files_sent"].as_u64() >= Some(1) {
            assert_eq!(data["detail"]["sessions"][0]["root"], "proj", "{data}");
            break;
        }
    }
    drop(events);
    let out = e.wsh().args(["sync", "--status"]).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(e.local.to_str().unwrap()) && status.contains("proj"),
        "{status}"
    );

    // The hub dies; both sides change meanwhile; it comes back and the sync converges.
    e.hub.kill();
    write(&e.local.join("while-down-local.txt"), b"1\n");
    write(&e.remote.join("while-down-remote.txt"), b"2\n");
    std::fs::remove_file(e.local.join("start.txt")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    e.hub.start_again().await.unwrap();
    let (l, r) = (e.local.clone(), e.remote.clone());
    wait_until("convergence after the restart", || {
        let (a, b) = (tree_of(&l), tree_of(&r));
        a == b
            && a.contains_key("while-down-local.txt")
            && a.contains_key("while-down-remote.txt")
            && !a.contains_key("start.txt")
    })
    .await;
    // The restarted hub hears of the session again from the reconnected agent.
    sync_session(&e.hub, &id, |s| s["root"] == "proj").await;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    // Ended: the agent says so.
    e.hub
        .wait_for(&id, Duration::from_secs(10), |ws| {
            ws["agent"]["sync_sessions"]
                .as_array()
                .is_some_and(|s| s.is_empty())
        })
        .await
        .expect("the ended session is still listed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("trying again"),
        "the lost link was reported: {err}"
    );
    assert!(
        err.contains("sent") && err.contains("received"),
        "a summary at the end: {err}"
    );
}

/// The workspace's first sync session as the hub shows it, once `ready` holds for it.
async fn sync_session(hub: &TestHub, id: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let ws = hub
        .wait_for(id, Duration::from_secs(10), |ws| {
            let session = &ws["agent"]["sync_sessions"][0];
            !session.is_null() && ready(session)
        })
        .await
        .expect("no such sync session");
    ws["agent"]["sync_sessions"][0].clone()
}

/// A client that speaks the sync protocol by hand.
struct Raw {
    send: quinn::SendStream,
    recv: FramedRecv,
    _conn: quinn::Connection,
}

impl Raw {
    async fn open(hub: &TestHub, id: &str, root: &str) -> Raw {
        link::install_crypto_provider();
        let conn = harness::raw_agent::client_connection(hub).await.unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let mut recv = FramedRecv::new(recv);
        let open = ClientSyncOpen {
            workspace_id: id.to_owned(),
            root: root.to_owned(),
        };
        send_msg(&mut send, &StreamHeader::ClientSync(open))
            .await
            .unwrap();
        assert!(matches!(
            recv.expect::<StreamReply>().await.unwrap(),
            StreamReply::Accepted(_)
        ));
        // A made-up digest of "what I knew" buys nothing: the whole manifest comes.
        let hello = SyncHello {
            version: SYNC_VERSION,
            ignore: vec![],
            known: Some(Hash([9; 32])),
        };
        send_msg(&mut send, &SyncMsg::Hello(hello)).await.unwrap();
        assert!(matches!(
            recv.expect::<SyncMsg>().await.unwrap(),
            SyncMsg::Ready(r) if !r.resumed
        ));
        Raw {
            send,
            recv,
            _conn: conn,
        }
    }

    async fn send(&mut self, msg: SyncMsg) {
        send_msg(&mut self.send, &msg).await.unwrap();
    }

    /// The answer to operation `id`, skipping manifests and notices.
    async fn done(&mut self, id: u64) -> Result<(), OpErrorCode> {
        loop {
            match self.recv.expect::<SyncMsg>().await.unwrap() {
                SyncMsg::Done(d) if d.id == id => return d.result.map(|_| ()).map_err(|e| e.code),
                SyncMsg::Done(d) => panic!("answer to {} while waiting for {id}", d.id),
                SyncMsg::Put(_) | SyncMsg::Data(_) | SyncMsg::End(_) => {
                    panic!("file data sent for {id}")
                }
                _ => {}
            }
        }
    }

    async fn put(
        &mut self,
        id: u64,
        path: &str,
        content: &[u8],
        hash: Option<Hash>,
    ) -> Result<(), OpErrorCode> {
        let header = FileHeader {
            id,
            path: path.into(),
            mode: 0o4755,
            mtime_ns: 0,
            size: content.len() as u64,
            expect: None,
            delta: false,
        };
        self.send(SyncMsg::Put(header)).await;
        self.send(SyncMsg::Data(DataChunk {
            id,
            bytes: content.to_vec(),
        }))
        .await;
        let hash = hash.unwrap_or(Hash(*blake3::hash(content).as_bytes()));
        self.send(SyncMsg::End(FileEnd { id, hash })).await;
        self.done(id).await
    }

    async fn apply(&mut self, id: u64, path: &str, action: Action) -> Result<(), OpErrorCode> {
        let expect = None;
        self.send(SyncMsg::Apply(ApplyRequest {
            id,
            path: path.into(),
            expect,
            action,
        }))
        .await;
        self.done(id).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn crafted_frames_cannot_reach_outside_the_root() {
    let e = env().await;
    let ws = e.hub.workspace_dir(&e.id);
    let outside = ws.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    write(&outside.join("secret"), b"do not read\n");
    std::fs::create_dir_all(&e.remote).unwrap();
    // A link planted in the root that points out of it.
    std::os::unix::fs::symlink(&outside, e.remote.join("door")).unwrap();
    std::os::unix::fs::symlink("../outside", e.remote.join("door2")).unwrap();
    let mut raw = Raw::open(&e.hub, &e.id, "proj").await;
    use OpErrorCode::*;
    assert_eq!(raw.put(1, "../escape", b"x", None).await, Err(BadPath));
    assert_eq!(raw.put(2, "/tmp/abs", b"x", None).await, Err(BadPath));
    assert_eq!(raw.put(3, "a/../../escape", b"x", None).await, Err(BadPath));
    assert_eq!(raw.put(4, "door/pwned", b"x", None).await, Err(Escape));
    assert_eq!(raw.put(5, "door2/pwned", b"x", None).await, Err(Escape));
    assert_eq!(raw.put(6, "", b"x", None).await, Err(BadPath));
    assert_eq!(
        raw.put(7, "ok.txt", b"x", Some(Hash([7; 32]))).await,
        Err(HashMismatch)
    );
    assert_eq!(
        raw.apply(8, "evil", Action::Symlink("../../outside".into()))
            .await,
        Err(Escape)
    );
    assert_eq!(
        raw.apply(9, "evil", Action::Symlink("/etc".into())).await,
        Err(Escape)
    );
    assert_eq!(raw.apply(10, "door/x", Action::Mkdir).await, Err(Escape));
    std::fs::write(e.remote.join("mine"), b"m").unwrap();
    let expect = Some(protocol::sync::Node::File(protocol::sync::FileMeta {
        size: 1,
        mode: 0o644,
        mtime_ns: 0,
        hash: Hash(*blake3::hash(b"m").as_bytes()),
    }));
    raw.send(SyncMsg::Apply(ApplyRequest {
        id: 11,
        path: "mine".into(),
        expect,
        action: Action::Rename("../stolen".into()),
    }))
    .await;
    assert_eq!(raw.done(11).await, Err(BadPath));
    assert_eq!(
        raw.apply(12, "door", Action::Remove).await,
        Err(Changed),
        "expectations are checked"
    );
    // Reading through a link, or reading a link's target, is refused.
    for (id, path) in [(13, "door/secret"), (14, "../outside/secret"), (15, "door")] {
        raw.send(SyncMsg::Get(GetRequest {
            id,
            path: path.into(),
            delta: false,
        }))
        .await;
        assert!(raw.done(id).await.is_err(), "{path}");
    }
    // A delta that copies blocks the base does not have.
    raw.send(SyncMsg::Put(FileHeader {
        id: 16,
        path: "mine".into(),
        mode: 0o644,
        mtime_ns: 0,
        size: 1,
        expect: None,
        delta: true,
    }))
    .await;
    raw.send(SyncMsg::Delta(DeltaChunk {
        id: 16,
        ops: vec![Op::Copy {
            first: 1000,
            count: 5,
        }],
    }))
    .await;
    raw.send(SyncMsg::End(FileEnd {
        id: 16,
        hash: Hash([0; 32]),
    }))
    .await;
    assert!(raw.done(16).await.is_err());
    // A good request still works on the same stream, with setuid bits dropped.
    assert_eq!(
        raw.put(17, "fine/../fine.txt", b"x", None).await,
        Err(BadPath)
    );
    assert_eq!(raw.apply(18, "fine", Action::Mkdir).await, Ok(()));
    assert_eq!(raw.put(19, "fine/ok.txt", b"ok", None).await, Ok(()));
    let mode = std::fs::metadata(e.remote.join("fine/ok.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    // Garbage ends this stream only.
    raw.send.write_all(&[0, 0, 0, 3, 250, 1, 2]).await.unwrap();
    let mut again = Raw::open(&e.hub, &e.id, "proj").await;
    assert_eq!(again.apply(1, "after", Action::Mkdir).await, Ok(()));
    // Nothing was written outside the root, and no temporary files were left behind.
    assert_eq!(tree_of(&outside).len(), 1, "{:?}", tree_of(&outside));
    assert!(!ws.join("escape").exists() && !ws.join("stolen").exists());
    let leftovers: Vec<_> = tree_of(&e.remote)
        .into_keys()
        .filter(|k| k.contains(".wsh-sync-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The CLI refuses a remote folder outside the workspace folder before connecting.
    let out = e
        .wsh()
        .args(["sync", "--once", &e.id])
        .arg(&e.local)
        .arg("/etc")
        .output()
        .unwrap();
    assert!(!out.status.success());
}
