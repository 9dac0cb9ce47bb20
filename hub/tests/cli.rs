//! The `wsh` binary against a real hub.

use harness::TestHub;
use std::process::Command;
use std::time::Duration;

fn wsh(hub: &TestHub, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(harness::binary("wsh").unwrap())
        .args(args)
        .env("WSH_HUB", hub.url(""))
        .env("WSH_TOKEN", &hub.token)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn wsh_keeps_a_workspace_awake_while_a_job_runs_then_stops_and_deletes_it() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let job = {
        let args = [
            "keep-awake".to_owned(),
            id.clone(),
            "--".to_owned(),
            "sh".to_owned(),
            "-c".to_owned(),
            "sleep 1; exit 3".to_owned(),
        ];
        let hub_url = hub.url("");
        let token = hub.token.clone();
        std::thread::spawn(move || {
            std::process::Command::new(harness::binary("wsh").unwrap())
                .args(&args)
                .env("WSH_HUB", hub_url)
                .env("WSH_TOKEN", token)
                .status()
                .unwrap()
        })
    };
    // While the job runs, the lease is held and the status says so.
    hub.wait_for(&id, Duration::from_secs(10), |w| {
        w["keep_awake_until"].is_string()
    })
    .await
    .unwrap();
    let status = job.join().unwrap();
    assert_eq!(status.code(), Some(3), "the job's exit status");
    let (_, ws) = hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert!(ws["keep_awake_until"].is_null(), "released: {ws}");

    let (ok, out, err) = wsh(&hub, &["status", &id, "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"activity\""), "{out}");
    let (ok, out, err) = wsh(&hub, &["stop", &id, "--json"]);
    assert!(ok && out.contains("STOPPING"), "{out}{err}");
    hub.wait_for(&id, Duration::from_secs(10), |w| w["status"] == "SUSPENDED")
        .await
        .unwrap();
    let (ok, out, err) = wsh(&hub, &["start", &id, "--json"]);
    assert!(ok && out.contains("STARTING"), "{out}{err}");
    hub.wait_for(&id, Duration::from_secs(30), |w| w["status"] == "READY")
        .await
        .unwrap();
    let (ok, out, err) = wsh(&hub, &["delete", &id, "--json"]);
    assert!(ok && out.contains("DELETING"), "{out}{err}");
    let (ok, _, err) = wsh(&hub, &["stop", &id]);
    assert!(!ok, "stopping a deleted workspace fails");
    assert!(
        err.contains("not_found") || err.contains("conflict"),
        "{err}"
    );
}

#[tokio::test]
async fn wsh_login_gets_a_token_approved_in_the_browser_and_keeps_it_private() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let hub = TestHub::start_manual().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut login = Command::new(harness::binary("wsh").unwrap())
        .arg("login")
        .env("WSH_HUB", hub.url(""))
        .env_remove("WSH_TOKEN")
        .env("XDG_CONFIG_HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(login.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let code = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(line.contains(&format!("/#device={code}")), "{line}");
    // A wrong code is refused; the signed-in user approves the right one.
    let (status, _) = hub
        .api(
            "POST",
            "/login/device/approve",
            Some(serde_json::json!({"user_code": "BBBB-BBBB"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, body) = hub
        .api(
            "POST",
            "/login/device/approve",
            Some(serde_json::json!({"user_code": code})),
        )
        .await
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let done = login.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let saved = home.path().join("wsh/token");
    let mode = std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Later commands use it without WSH_TOKEN, as the approving user.
    let out = Command::new(harness::binary("wsh").unwrap())
        .args(["create", "--json"])
        .env("WSH_HUB", hub.url(""))
        .env_remove("WSH_TOKEN")
        .env("XDG_CONFIG_HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ws: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ws["owner_id"], "dev");
    // The device code works once.
    let (status, _) = hub
        .api(
            "POST",
            "/login/device/approve",
            Some(serde_json::json!({"user_code": code})),
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn wsh_creates_waits_and_lists() {
    let hub = TestHub::start().await.unwrap();
    let (ok, out, err) = wsh(
        &hub,
        &[
            "create",
            "--wait",
            "--repo",
            "https://example.com/r.git",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let ws: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ws["status"], "READY");
    let id = ws["id"].as_str().unwrap();

    let (ok, out, _) = wsh(&hub, &["list"]);
    assert!(ok);
    assert!(out.contains(id) && out.contains("READY"), "{out}");
    // Named after its repository; the name works wherever the id does.
    assert_eq!(ws["name"], "r");
    assert!(out.contains("r ") && out.contains("NAME"), "{out}");
    let (ok, out, err) = wsh(&hub, &["show", "r", "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains(id), "{out}");
    let (ok, out, err) = wsh(&hub, &["exec", "r", "--", "echo", "by-name"]);
    assert!(ok, "{err}");
    assert_eq!(out, "by-name\n");
    // The next one from the same repository is r-2; a name asked for and taken is refused.
    let (ok, out, err) = wsh(
        &hub,
        &["create", "--repo", "https://example.com/r.git", "--json"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"name\": \"r-2\""), "{out}");
    let (ok, _, err) = wsh(&hub, &["create", "--name", "r"]);
    assert!(!ok && err.contains("name_taken"), "{err}");
    let (ok, _, err) = wsh(&hub, &["create", "--name", "Bad_Name"]);
    assert!(!ok && err.contains("invalid_request"), "{err}");

    let (ok, _, err) = wsh(&hub, &["show", "00000000-0000-4000-8000-000000000000"]);
    assert!(!ok);
    assert!(err.contains("not_found"), "{err}");

    let (ok, _, err) = wsh(&hub, &["create", "--zone", "BAD ZONE"]);
    assert!(!ok);
    assert!(err.contains("invalid_request"), "{err}");
}

#[tokio::test]
async fn wsh_attach_runs_a_terminal_over_quic_and_propagates_the_exit_status() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();

    // A login shell fed from a pipe.
    let mut child = Command::new(harness::binary("wsh").unwrap())
        .args(["attach", &id])
        .env("WSH_HUB", hub.url(""))
        .env("WSH_TOKEN", &hub.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo over-quic-$((20+1))\nexit 4\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stdout).contains("over-quic-21"));

    // A command instead of the shell; then the session list shows both, with their exits.
    let (ok, out, err) = wsh(
        &hub,
        &["attach", &id, "--", "/bin/sh", "-c", "echo direct; exit 9"],
    );
    assert!(!ok, "{err}");
    assert!(out.contains("direct"), "{out}");
    let (ok, out, _) = wsh(&hub, &["sessions", &id, "--json"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exits: Vec<i64> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["exit"].as_i64())
        .collect();
    assert!(exits.contains(&4) && exits.contains(&9), "{list}");

    // Someone else's workspace does not exist for you.
    let other = hub.mint_token("mallory").unwrap();
    let out = Command::new(harness::binary("wsh").unwrap())
        .args(["sessions", &id])
        .env("WSH_HUB", hub.url(""))
        .env("WSH_TOKEN", &other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workspace not found"));
    // A bad token is refused at the door.
    let out = Command::new(harness::binary("wsh").unwrap())
        .args(["sessions", &id])
        .env("WSH_HUB", hub.url(""))
        .env("WSH_TOKEN", "wsh_nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hub refused"));
}

#[tokio::test]
async fn wsh_attach_survives_a_hub_restart_without_losing_output() {
    let mut hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let mut child = Command::new(harness::binary("wsh").unwrap())
        .args([
            "attach",
            &id,
            "--",
            "/bin/sh",
            "-c",
            "for i in $(seq 1 30); do echo n$i; sleep 0.1; done; exit 6",
        ])
        .env("WSH_HUB", hub.url(""))
        .env("WSH_TOKEN", &hub.token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The hub goes away once the terminal is running (its first lines are out): output
    // read on a thread of its own meanwhile.
    let mut stdout = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("n2") {
        assert!(
            std::time::Instant::now() < deadline,
            "no output from wsh attach"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    hub.kill();
    hub.start_again().await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    reader.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(seen.lock().unwrap().clone()).unwrap();
    let lines = harness::numbered_lines(&text, "n");
    assert_eq!(
        lines,
        (1..=30).collect::<Vec<_>>(),
        "every line exactly once: {text:?}"
    );
}

/// An echo server on a free loopback port (the process provider's agents run on this host).
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn a_forwarded_connection_through_the_hub_survives_a_hub_restart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let remote = echo_server().await;
    let local = harness::free_port();
    let forward = hub
        .wsh()
        .unwrap()
        .args([
            "--path",
            "relay",
            "forward",
            &id,
            &format!("{local}:{remote}"),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let forward = harness::Reaped(forward);
    let mut tcp = None;
    for _ in 0..100 {
        if let Ok(t) = tokio::net::TcpStream::connect(("127.0.0.1", local)).await {
            tcp = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut read, mut write) = tcp.expect("the forward listens").into_split();
    // 200 chunks of 64 KiB, all different, written while the echo comes back; the hub is
    // killed and started again after the 50th.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.map(|_| got)
    });
    let mut sent = Vec::new();
    for i in 0..200u32 {
        let chunk = harness::pseudo_bytes(64 * 1024, i.into());
        write.write_all(&chunk).await.unwrap();
        sent.extend(chunk);
        if i == 50 {
            hub.kill();
            hub.start_again().await.unwrap();
        }
    }
    write.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("the echo ends")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "every byte once, in order");
    drop(forward);
}

#[tokio::test]
async fn wsh_open_prints_a_preview_url_that_enters_and_completions_cover_every_shell() {
    let hub = TestHub::start_manual().await.unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap();
    let (ok, out, err) = wsh(&hub, &["open", id, "3000"]);
    assert!(ok, "{err}");
    let url = out.trim();
    let prefix = hub.url(&format!("/preview/{id}/3000/?ticket=wst_"));
    assert!(url.starts_with(&prefix), "{url}");
    // The URL needs no sign-in: the hub sends the browser on to the preview's origin.
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert!(
        res.headers()["location"]
            .to_str()
            .unwrap()
            .contains("/__wsh/auth?ticket=")
    );
    // By name too: the URL names the id, which the ticket is bound to.
    let (ok, out, err) = wsh(&hub, &["open", ws["name"].as_str().unwrap(), "3000"]);
    assert!(ok, "{err}");
    assert!(out.trim().starts_with(&prefix), "{out}");
    // Not for a workspace that is not the caller's, nor for port 0.
    let (ok, _, err) = wsh(&hub, &["open", &uuid_like(), "3000"]);
    assert!(!ok && err.contains("not_found"), "{err}");
    let (ok, _, _) = wsh(&hub, &["open", id, "0"]);
    assert!(!ok);

    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef wsh"),
        ("fish", "complete -c wsh"),
    ] {
        let (ok, out, err) = wsh(&hub, &["completions", shell]);
        assert!(ok, "{shell}: {err}");
        assert!(out.contains(marker), "{shell}: {out}");
        for sub in ["attach", "exec", "forward", "sync", "open"] {
            assert!(out.contains(sub), "{shell} completes {sub}");
        }
    }
}

fn uuid_like() -> String {
    "00000000-0000-4000-8000-000000000000".to_owned()
}
