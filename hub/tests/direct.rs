//! Direct connections on one machine: the CLI reaches the agent in one hop, brokered by the
//! hub; the agent refuses every credential but a valid one for itself and what it allows;
//! the hub's policy keeps users on the relay. (Behind NATs: `tests/nat.rs`.)

use harness::{HubOptions, TestHub};
use std::io::Write;
use std::process::Stdio;

fn wsh(hub: &TestHub, args: &[&str]) -> std::process::Output {
    hub.wsh().unwrap().args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn terminals_forwards_and_sync_go_direct_and_the_policy_can_keep_users_on_the_relay() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();

    // A terminal, direct only: it works, and the CLI says which path it took.
    let mut child = hub
        .wsh()
        .unwrap()
        .args(["--path", "direct", "--show-path", "attach", &id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo one-hop-$((40+2))\nexit 5\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(5), "{stdout}{stderr}");
    assert!(stdout.contains("one-hop-42"), "{stdout}");
    assert!(stderr.contains("path: direct to 127.0.0.1:"), "{stderr}");
    assert!(
        hub.log().contains("direct session brokered"),
        "the hub brokered it"
    );
    assert!(
        hub.agent_log(&id).contains("direct client connected"),
        "the bytes went to the agent itself"
    );

    // A forward and OpenSSH-style proxying, direct only.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
        s.write_all(&buf.map(|b| b.to_ascii_uppercase())).unwrap();
    });
    let mut proxy = hub
        .wsh()
        .unwrap()
        .args(["--path", "direct", "proxy", &id, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    proxy.stdin.take().unwrap().write_all(b"hello").unwrap();
    let out = proxy.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "HELLO", "{}", text(&out.stderr));
    server.join().unwrap();

    // Sync, direct only.
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("a.txt"), b"direct sync").unwrap();
    let out = wsh(
        &hub,
        &[
            "--path",
            "direct",
            "sync",
            &id,
            local.path().to_str().unwrap(),
            "synced",
            "--once",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(hub.workspace_dir(&id).join("synced/a.txt")).unwrap(),
        b"direct sync"
    );

    // A hub that turns direct connections off for this user: `--path direct` says so, and
    // the default carries on through the relay.
    drop(hub);
    let hub = TestHub::start_with(HubOptions {
        config: "[direct]\nrelay_only = [\"dev\"]\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let out = wsh(&hub, &["--path", "direct", "sessions", &id]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("direct connections are off for this user"),
        "{}",
        text(&out.stderr)
    );
    let out = wsh(
        &hub,
        &[
            "--show-path",
            "attach",
            &id,
            "--",
            "sh",
            "-c",
            "echo relayed",
        ],
    );
    assert!(
        text(&out.stdout).contains("relayed"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("path: relay through the hub"),
        "{}",
        text(&out.stderr)
    );
    assert!(!hub.agent_log(&id).contains("direct client connected"));
}
