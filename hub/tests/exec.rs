//! Exec for programs: `POST /workspaces/:id/exec` (NDJSON), its WebSocket form, and
//! `wsh exec`, against a real hub and agent.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::{SinkExt, StreamExt};
use harness::TestHub;
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// What a finished command said.
#[derive(Debug, Default)]
struct Ran {
    status: u16,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Value,
    /// The error body, for a command that did not start.
    error: Value,
}

impl Ran {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Collects events (NDJSON lines, or WebSocket texts) into a [`Ran`].
fn take(ran: &mut Ran, event: &Value) {
    let data = || B64.decode(event["data"].as_str().unwrap()).unwrap();
    match event["type"].as_str().unwrap() {
        "stdout" => ran.stdout.extend(data()),
        "stderr" => ran.stderr.extend(data()),
        "exit" | "error" => ran.exit = event.clone(),
        "started" => assert!(event["pid"].as_u64().unwrap() > 0),
        other => panic!("unexpected event {other}"),
    }
}

async fn run(hub: &TestHub, id: &str, body: Value) -> Ran {
    run_as(hub, &hub.token, id, body).await
}

async fn run_as(hub: &TestHub, token: &str, id: &str, body: Value) -> Ran {
    let res = hub
        .http
        .post(hub.url(&format!("/workspaces/{id}/exec")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut ran = Ran {
        status: res.status().as_u16(),
        ..Default::default()
    };
    if ran.status != 200 {
        ran.error = res.json().await.unwrap();
        return ran;
    }
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let text = res.text().await.unwrap();
    for line in text.lines() {
        take(&mut ran, &serde_json::from_str(line).unwrap());
    }
    ran
}

#[tokio::test]
async fn exec_runs_commands_with_their_status_streams_stdin_timeouts_and_signals() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();

    // Exit codes, stdout and stderr apart, environment and folder.
    let ran = run(
        &hub,
        &id,
        json!({"argv": ["sh", "-c", "echo out:$GREETING; echo err >&2; pwd; exit 3"],
               "env": {"GREETING": "hi there"}, "cwd": "/tmp"}),
    )
    .await;
    assert_eq!(ran.status, 200);
    assert_eq!(ran.out(), "out:hi there\n/tmp\n");
    assert_eq!(ran.stderr, b"err\n");
    assert_eq!(
        ran.exit,
        json!({"type": "exit", "code": 3, "signal": null, "timed_out": false})
    );

    // Stdin as text and as bytes; binary output comes back exact.
    let ran = run(
        &hub,
        &id,
        json!({"argv": ["tr", "a-z", "A-Z"], "stdin": "hello\n"}),
    )
    .await;
    assert_eq!(ran.out(), "HELLO\n");
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    let ran = run(
        &hub,
        &id,
        json!({"argv": ["cat"], "stdin_base64": B64.encode(&bytes)}),
    )
    .await;
    assert_eq!(ran.stdout, bytes);
    // No stdin: an empty one, so a command that reads it ends.
    let ran = run(&hub, &id, json!({"argv": ["wc", "-c"]})).await;
    assert_eq!(ran.out().trim(), "0");

    // A timeout kills the command and everything it started; a signal is reported.
    let ran = run(
        &hub,
        &id,
        json!({"argv": ["sh", "-c", "sleep 30 & sleep 30; echo never"], "timeout_ms": 300}),
    )
    .await;
    assert_eq!(ran.exit["timed_out"], true);
    assert_eq!(ran.exit["signal"], 9);
    assert_eq!(ran.out(), "");
    let ran = run(&hub, &id, json!({"argv": ["sh", "-c", "kill -TERM $$"]})).await;
    assert_eq!(ran.exit["signal"], 15);
    assert_eq!(ran.exit["code"], Value::Null);

    // What cannot start says why, with a code.
    let ran = run(&hub, &id, json!({"argv": ["no-such-program-wsh"]})).await;
    assert_eq!(
        (ran.status, ran.error["error"]["code"].as_str()),
        (422, Some("program_not_found"))
    );
    let ran = run(
        &hub,
        &id,
        json!({"argv": ["true"], "cwd": "/no/such/folder"}),
    )
    .await;
    assert_eq!(
        (ran.status, ran.error["error"]["code"].as_str()),
        (422, Some("no_such_folder"))
    );
    for bad in [
        json!({"argv": []}),
        json!({"argv": ["echo", "a\u{0}b"]}),
        json!({"argv": ["env"], "env": {"1BAD": "x"}}),
        json!({"argv": ["cat"], "stdin": "a", "stdin_base64": "YQ=="}),
        json!({"argv": ["cat"], "stdin_base64": "not base64!"}),
        json!({"argv": ["true"], "unknown": 1}),
        json!({"argv": "true"}),
    ] {
        let ran = run(&hub, &id, bad.clone()).await;
        assert_eq!(
            (ran.status, ran.error["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }

    // Many at once.
    let runs = (0..200).map(|i| {
        let (hub, id) = (&hub, &id);
        async move { run(hub, id, json!({"argv": ["sh", "-c", format!("echo {i}")]})).await }
    });
    let all = futures_util::future::join_all(runs).await;
    for (i, ran) in all.iter().enumerate() {
        assert_eq!(
            (ran.out(), &ran.exit["code"]),
            (format!("{i}\n"), &json!(0)),
            "run {i}: {ran:?}"
        );
    }

    // Another owner's token learns nothing.
    let stranger = hub.mint_token("stranger").unwrap();
    let ran = run_as(&hub, &stranger, &id, json!({"argv": ["true"]})).await;
    assert_eq!(
        (ran.status, ran.error["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert!(!ran.error.to_string().contains(&id));
}

#[tokio::test]
async fn exec_output_waits_for_a_slow_reader_with_hub_and_agent_memory_bounded() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    // 128 MiB of output (the benchmark sends 1 GiB), read slowly: a pause after every
    // 4 MiB. A hundred stream windows, and 171 MiB as JSON: far more than every buffer on
    // the way together, and than the growth the hub is allowed below.
    let total: u64 = 128 << 20;
    let mut res = hub
        .http
        .post(hub.url(&format!("/workspaces/{id}/exec")))
        .bearer_auth(&hub.token)
        .json(&json!({"argv": ["head", "-c", total.to_string(), "/dev/zero"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (hub_base, mut agent_pid, mut agent_base) = (harness::rss_kib(hub.listening.pid), 0, 0);
    let (mut peak_hub, mut peak_agent) = (0, 0);
    let (mut pending, mut got, mut next_pause) = (Vec::new(), 0u64, 4u64 << 20);
    let mut exit = Value::Null;
    while let Some(chunk) = res.chunk().await.unwrap() {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line = &pending[..end];
            // Output lines are checked without parsing 1 GiB of JSON: zeros in base64 are
            // all `A`s, and their length gives the byte count.
            let stdout = line
                .strip_prefix(br#"{"data":""#)
                .and_then(|l| l.strip_suffix(br#"","type":"stdout"}"#));
            if let Some(data) = stdout {
                let pad = data.iter().rev().take_while(|b| **b == b'=').count();
                // Zeros in base64 are `A`s: a sample of each line is checked.
                assert!(
                    data[..data.len() - pad]
                        .iter()
                        .step_by(97)
                        .all(|b| *b == b'A')
                );
                got += (data.len() / 4 * 3 - pad) as u64;
                pending.drain(..=end);
                continue;
            }
            let event: Value = serde_json::from_slice(line).unwrap();
            pending.drain(..=end);
            match event["type"].as_str().unwrap() {
                "started" => {
                    // The command's parent is the agent.
                    let pid = event["pid"].as_u64().unwrap();
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                    agent_pid = status
                        .lines()
                        .find_map(|l| l.strip_prefix("PPid:"))
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap();
                    agent_base = harness::rss_kib(agent_pid);
                }
                _ => exit = event,
            }
        }
        if got >= next_pause {
            next_pause += 4 << 20;
            peak_hub = peak_hub.max(harness::rss_kib(hub.listening.pid));
            peak_agent = peak_agent.max(harness::rss_kib(agent_pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(got, total);
    assert_eq!(exit["code"], 0, "{exit}");
    let (hub_growth, agent_growth) = (
        peak_hub.saturating_sub(hub_base),
        peak_agent.saturating_sub(agent_base),
    );
    eprintln!(
        "{total} bytes to a slow reader: hub RSS {hub_base} -> peak {peak_hub} KiB, agent {agent_base} -> peak {peak_agent} KiB"
    );
    assert!(agent_base > 0 && peak_agent > 0);
    // A few stream windows at most, never the output.
    assert!(hub_growth < 48 * 1024, "hub grew {hub_growth} KiB");
    assert!(agent_growth < 32 * 1024, "agent grew {agent_growth} KiB");
}

#[tokio::test]
async fn exec_over_a_websocket_streams_stdin_and_takes_signals() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let url = hub
        .url(&format!("/workspaces/{id}/exec"))
        .replacen("http", "ws", 1);
    let connect = || async {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", hub.token).parse().unwrap(),
        );
        tokio_tungstenite::connect_async(req).await.unwrap().0
    };
    // cat: each stdin chunk comes back as it is sent, then stdin_end ends it.
    let mut ws = connect().await;
    ws.send(Message::text(json!({"argv": ["cat"]}).to_string()))
        .await
        .unwrap();
    let mut ran = Ran::default();
    let started = ws.next().await.unwrap().unwrap();
    take(
        &mut ran,
        &serde_json::from_str(started.to_text().unwrap()).unwrap(),
    );
    for i in 0..20 {
        let line = format!("line {i}\n");
        ws.send(Message::binary(line.clone().into_bytes()))
            .await
            .unwrap();
        let mut echoed = Vec::new();
        while echoed.len() < line.len() {
            let msg = ws.next().await.unwrap().unwrap();
            let event: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
            assert_eq!(event["type"], "stdout");
            echoed.extend(B64.decode(event["data"].as_str().unwrap()).unwrap());
        }
        assert_eq!(echoed, line.as_bytes());
    }
    ws.send(Message::text(r#"{"type":"stdin_end"}"#))
        .await
        .unwrap();
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            take(&mut ran, &serde_json::from_str(&t).unwrap());
        }
    }
    assert_eq!(ran.exit["code"], 0, "{:?}", ran.exit);

    // A signal from the client ends a command that would run long.
    let mut ws = connect().await;
    ws.send(Message::text(
        json!({"argv": ["sh", "-c", "echo ready; sleep 30"]}).to_string(),
    ))
    .await
    .unwrap();
    let mut ran = Ran::default();
    while ran.out().is_empty() {
        let msg = ws.next().await.unwrap().unwrap();
        take(
            &mut ran,
            &serde_json::from_str(msg.to_text().unwrap()).unwrap(),
        );
    }
    // A running command is use of the workspace (idle clean-up leaves it be).
    let mut attached = Value::Null;
    for _ in 0..200 {
        let (_, w) = hub
            .api("GET", &format!("/workspaces/{id}"), None)
            .await
            .unwrap();
        attached = w["agent"]["attached_clients"].clone();
        if attached == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(attached, 1, "a running command counts as activity");
    ws.send(Message::text(r#"{"type":"signal","signal":"TERM"}"#))
        .await
        .unwrap();
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            take(&mut ran, &serde_json::from_str(&t).unwrap());
        }
    }
    assert_eq!(ran.exit["signal"], 15, "{:?}", ran.exit);

    // A bad first message is an error event, and the socket closes.
    let mut ws = connect().await;
    ws.send(Message::text(r#"{"argv": []}"#)).await.unwrap();
    let msg = ws.next().await.unwrap().unwrap();
    let event: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["code"].as_str()),
        (Some("error"), Some("invalid_request"))
    );

    // Without an upgrade, the owner is told to upgrade; a stranger, that there is nothing.
    let res = hub
        .http
        .get(hub.url(&format!("/workspaces/{id}/exec")))
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 426);
    let stranger = hub.mint_token("stranger").unwrap();
    let res = hub
        .http
        .get(hub.url(&format!("/workspaces/{id}/exec")))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn wsh_exec_passes_the_status_on_and_works_in_pipes() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let wsh = |args: &[&str]| {
        let mut cmd = hub.wsh().unwrap();
        cmd.arg("exec")
            .arg(&id)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let out = wsh(&[
        "-e",
        "X=1",
        "--",
        "sh",
        "-c",
        "echo out$X; echo err >&2; exit 7",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out1\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // In a pipe: 3 MiB of stdin through `sha256sum`, and through `cat` back out whole.
    let input = harness::pseudo_bytes(3 << 20, 7);
    for (args, check) in [
        (&["--", "cat"][..], true),
        (&["--", "sha256sum"][..], false),
    ] {
        let mut child = wsh(args).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = input.clone();
        let writer = std::thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if check {
            assert!(
                out.stdout == input,
                "cat gave back {} bytes",
                out.stdout.len()
            );
        } else {
            let mut local = Command::new("sha256sum")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            local.stdin.take().unwrap().write_all(&input).unwrap();
            let local = local.wait_with_output().unwrap();
            assert_eq!(out.stdout[..64], local.stdout[..64]);
        }
    }

    // Signals and timeouts as a shell would report them.
    let out = wsh(&["--", "sh", "-c", "kill -KILL $$"]).output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 9));
    let out = wsh(&["--timeout", "300ms", "-n", "--", "sleep", "30"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
    let out = wsh(&["--", "no-such-program-wsh"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-program-wsh"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
