//! Three hub replicas behind a real load balancer (nginx's stream module: HTTP round robin
//! over TCP, QUIC over UDP pinned per client), sharing the Firestore emulator and one
//! identity. Every client goes through the balancer, so most requests land on a replica
//! that does not hold the agent they need.

use futures_util::{SinkExt, StreamExt};
use harness::replicas::Cluster;
use harness::{HubClient, Reaped, free_port, numbered_lines};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(30);

/// A browser terminal: the session it opened and the output seen, by offset.
struct Terminal {
    ws: Ws,
    session: String,
    /// Offset of `seen[0]` (`None` before the first output).
    base: Option<u64>,
    seen: Vec<u8>,
}

impl Terminal {
    /// Opens a terminal (a new session, or `session` from `offset`), retrying while the
    /// hub says the agent is offline (it is moving between replicas).
    async fn open(hub: &HubClient, id: &str, resume: Option<(&str, u64)>) -> Self {
        let query = resume
            .map(|(s, o)| format!("session={s}&offset={o}"))
            .unwrap_or_default();
        // Like the web UI: a refusal (503 while the agent moves and has not come back
        // within the hub's wait, or the agent's replica saying it no longer holds it) means
        // try again shortly.
        let deadline = tokio::time::Instant::now() + WAIT;
        let (ws, session) = loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "terminal never opened"
            );
            // The ticket too: a replica that is leaving answers 503.
            let Ok(url) = hub.terminal_url(id, &query).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut ws = match tokio_tungstenite::connect_async(url).await {
                Ok((ws, _)) => ws,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let event = loop {
                match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
                    Some(Ok(Message::Text(t))) => {
                        break serde_json::from_str::<serde_json::Value>(&t).unwrap();
                    }
                    Some(Ok(_)) => {}
                    _ => break serde_json::Value::Null,
                }
            };
            match event["type"].as_str() {
                Some("opened") => break (ws, event["session"].as_str().unwrap().to_owned()),
                Some("error") if event["code"] == "refused" => {}
                None => {}
                _ => panic!("terminal: {event}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Self {
            ws,
            session,
            base: resume.map(|(_, o)| o),
            seen: Vec::new(),
        }
    }

    fn next_offset(&self) -> u64 {
        self.base.unwrap_or(0) + self.seen.len() as u64
    }

    async fn type_text(&mut self, text: &str) {
        self.ws
            .send(Message::Binary(text.as_bytes().to_vec().into()))
            .await
            .unwrap();
    }

    /// Reads until `pred(output)` holds (true) or the WebSocket ends (false). Output must
    /// continue exactly where it left off.
    async fn read_until(&mut self, pred: impl Fn(&str) -> bool) -> bool {
        while !pred(&String::from_utf8_lossy(&self.seen)) {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("terminal stalled")
            {
                Some(Ok(Message::Binary(b))) if b[0] == 0 => {
                    let offset = u64::from_be_bytes(b[1..9].try_into().unwrap());
                    let base = *self.base.get_or_insert(offset);
                    assert_eq!(
                        offset,
                        base + self.seen.len() as u64,
                        "output skipped or repeated bytes"
                    );
                    self.seen.extend_from_slice(&b[9..]);
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return false,
                Some(Ok(_)) => {}
            }
        }
        true
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_client_reaches_any_agent_through_the_load_balancer() {
    let c = Cluster::start(3).await.unwrap();
    let hub = c.any();
    let id = hub.ready_workspace().await.unwrap();

    // Browser terminals: each WebSocket is a new TCP connection, so three in a row meet
    // each replica once (round robin), two of which reach the agent through its holder.
    for i in 0..3 {
        let mut t = Terminal::open(&hub.client(), &id, None).await;
        t.type_text(&format!("echo term-$((40+{i}))\n")).await;
        let want = format!("term-{}", 40 + i);
        assert!(t.read_until(|s| s.contains(&want)).await, "terminal {i}");
    }

    // `wsh attach`, exit status included.
    for i in 0..3 {
        let mut child = hub
            .wsh()
            .unwrap()
            // The relay through the replicas is what this tests.
            .env("WSH_PATH", "relay")
            .args(["attach", &id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(
            child.stdin.as_mut().unwrap(),
            format!("echo cli-$((10+{i}))\nexit 3\n").as_bytes(),
        )
        .unwrap();
        drop(child.stdin.take());
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("cli-{}", 10 + i)));
    }

    // A dev server in the workspace: previews (HTTP and WebSocket) and `wsh forward`.
    let port = free_port();
    let _server = hub
        .run_in_workspace(&id, &harness::test_server(&[&port.to_string()]))
        .unwrap();
    let preview = hub.url(&format!("/preview/{id}/{port}/"));
    let mut served = 0;
    for _ in 0..400 {
        // A new client, so a new connection (and replica) each time.
        let res = reqwest::Client::new()
            .get(&preview)
            .bearer_auth(&hub.token)
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            assert_eq!(res.text().await.unwrap(), "hello from test-server\n");
            served += 1;
            if served == 3 {
                break;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(served, 3, "previews through the balancer");
    for i in 0..3 {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{}/preview/{id}/{port}/ws", hub.client_addr()),
            )
            .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", hub.token).parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        ws.send(Message::text(format!("hi{i}"))).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("echo: hi{i}"));
    }
    let local = free_port();
    let _forward = Reaped(
        hub.wsh()
            .unwrap()
            // The relay through the replicas is what this tests.
            .env("WSH_PATH", "relay")
            .args(["forward", &id, &format!("{local}:{port}")])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut body = None;
    for _ in 0..200 {
        if let Ok(res) = reqwest::get(format!("http://127.0.0.1:{local}/")).await {
            body = Some(res.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body.as_deref(), Some("hello from test-server\n"));

    // OpenSSH through `wsh proxy`.
    let ssh = harness::sshd::Ssh::prepare().unwrap();
    let _sshd = hub.run_in_workspace(&id, &ssh.sshd_command()).unwrap();
    let proxy = format!(
        "ProxyCommand={} proxy {id} {}",
        harness::binary("wsh").unwrap().display(),
        ssh.port
    );
    let mut said = String::new();
    for _ in 0..100 {
        let out = Command::new("ssh")
            .args(ssh.client_options())
            .args(["-o", &proxy])
            .env("WSH_HUB", hub.url(""))
            .env("WSH_PATH", "relay")
            .env("WSH_TOKEN", &hub.token)
            .args([
                &format!("{}@workspace", harness::sshd::user()),
                "echo",
                "over-ssh-$((40+2))",
            ])
            .output()
            .unwrap();
        said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() {
            break;
        }
        // sshd may not listen yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(said, "over-ssh-42");

    // `wsh sync`, both ways.
    let local_dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(local_dir.path().join("up.txt"), b"from here\n").unwrap();
    let remote = hub.workspace_dir(&id).join("proj");
    std::fs::create_dir_all(&remote).unwrap();
    std::fs::write(remote.join("down.txt"), b"from there\n").unwrap();
    let out = hub
        .wsh()
        .unwrap()
        // The relay through the replicas is what this tests.
        .env("WSH_PATH", "relay")
        .env("XDG_STATE_HOME", state.path())
        .args(["sync", "--once", &id])
        .arg(local_dir.path())
        .arg("proj")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(remote.join("up.txt")).unwrap(),
        b"from here\n"
    );
    assert_eq!(
        std::fs::read(local_dir.path().join("down.txt")).unwrap(),
        b"from there\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_replica_that_holds_the_agent_loses_no_terminal_byte() {
    let mut c = Cluster::start(3).await.unwrap();
    let id = c.any().ready_workspace().await.unwrap();
    let mut t = Terminal::open(&c.any().client(), &id, None).await;
    t.type_text("for i in $(seq 1 60); do echo tick$i; sleep 0.05; done; echo fin-$((1+1))\n")
        .await;
    assert!(t.read_until(|s| s.contains("tick3\r\n")).await);

    let holder = c.holder(&id).expect("a replica holds the agent");
    c.replicas[holder].kill();
    let killed = tokio::time::Instant::now();
    // Whichever replica the browser went through, its stream ends: the holder died, or
    // the peer hop to it did.
    let finished = t.read_until(|s| s.contains("fin-2")).await;
    assert!(
        !finished,
        "the terminal outlived the replica that held its agent"
    );

    // The browser resumes where it stopped, through whichever replica the balancer picks;
    // the agent has meanwhile moved to one of the others.
    let alive = c.replicas.iter().position(|r| r.is_running()).unwrap();
    let mut resumed = Terminal::open(
        &c.replicas[alive].client(),
        &id,
        Some((&t.session, t.next_offset())),
    )
    .await;
    eprintln!("terminal resumed {:?} after the kill", killed.elapsed());
    assert!(resumed.read_until(|s| s.contains("fin-2")).await);
    let new_holder = c.holder(&id).expect("the agent reconnected");
    assert_ne!(new_holder, holder);

    let mut all = t.seen.clone();
    all.extend(&resumed.seen);
    let text = String::from_utf8_lossy(&all);
    assert_eq!(
        numbered_lines(&text, "tick"),
        (1..=60).collect::<Vec<_>>(),
        "every line once, in order"
    );
}

/// What an API request through the balancer got.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Answer {
    Ok,
    /// 503 with `Retry-After`.
    Retry,
    Other(String),
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_loses_no_terminal_byte_nor_sync_change_and_every_request_is_answered_or_retryable()
 {
    let mut c = Cluster::start_with(3, "drain_timeout = \"10s\"", Default::default())
        .await
        .unwrap();
    let id = c.any().ready_workspace().await.unwrap();
    let client = c.any().client();

    // A browser terminal prints a line every 20 ms through the whole restart, and
    // reconnects (through the balancer) from its offset whenever its WebSocket closes.
    let mut t = Terminal::open(&client, &id, None).await;
    t.type_text("for i in $(seq 1 800); do echo tick$i; sleep 0.02; done; echo fin-$((1+1))\n")
        .await;
    assert!(t.read_until(|s| s.contains("tick3\r\n")).await);
    let terminal = tokio::spawn({
        let (client, id) = (client.clone(), id.clone());
        async move {
            let mut all = Vec::new();
            let mut reconnects = 0;
            loop {
                let done = t.read_until(|s| s.contains("fin-2")).await;
                all.extend_from_slice(&t.seen);
                if done {
                    return (all, reconnects);
                }
                reconnects += 1;
                let resume = (t.session.clone(), t.next_offset());
                t = Terminal::open(&client, &id, Some((&resume.0, resume.1))).await;
            }
        }
    });

    // `wsh sync` runs through the whole restart while files change on both sides.
    let hub = c.any();
    let local_dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let remote = hub.workspace_dir(&id).join("proj");
    std::fs::create_dir_all(&remote).unwrap();
    std::fs::write(remote.join("first.txt"), b"first\n").unwrap();
    let _sync = Reaped(
        hub.wsh()
            .unwrap()
            // The relay through the replicas is what this tests.
            .env("WSH_PATH", "relay")
            .env("XDG_STATE_HOME", state.path())
            .args(["sync", &id])
            .arg(local_dir.path())
            .arg("proj")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while !local_dir.path().join("first.txt").exists() {
        assert!(tokio::time::Instant::now() < deadline, "the first sync");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn({
        let (local, remote, stop) = (local_dir.path().to_owned(), remote.clone(), stop.clone());
        async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                std::fs::write(local.join(format!("up-{n}.txt")), format!("up {n}\n")).unwrap();
                std::fs::write(remote.join(format!("down-{n}.txt")), format!("down {n}\n"))
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            n
        }
    });

    // A dev server in the workspace, previewed through the balancer.
    let port = free_port();
    let _server = hub
        .run_in_workspace(&id, &harness::test_server(&[&port.to_string()]))
        .unwrap();
    let preview = format!("/preview/{id}/{port}/");
    let deadline = tokio::time::Instant::now() + WAIT;
    while reqwest::Client::new()
        .get(client.url(&preview))
        .bearer_auth(&client.token)
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(tokio::time::Instant::now() < deadline, "the dev server");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // API requests and previews, each on a new connection (so on any replica), all along.
    let poller = tokio::spawn({
        let (client, id, stop) = (client.clone(), id.clone(), stop.clone());
        async move {
            let mut answers: Vec<Answer> = Vec::new();
            for i in 0.. {
                if stop.is_cancelled() {
                    break;
                }
                let path = if i % 2 == 0 {
                    format!("/workspaces/{id}")
                } else {
                    preview.clone()
                };
                let res = reqwest::Client::new()
                    .get(client.url(&path))
                    .bearer_auth(&client.token)
                    .send()
                    .await;
                answers.push(match res {
                    Ok(r) if r.status() == 200 => Answer::Ok,
                    Ok(r) if r.status() == 503 && r.headers().contains_key("retry-after") => {
                        Answer::Retry
                    }
                    Ok(r) => Answer::Other(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Answer::Other(format!("{e:?}")),
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        }
    });

    // One replica after the other: SIGTERM, wait for it to exit, start it again.
    for i in 0..c.replicas.len() {
        let started = tokio::time::Instant::now();
        let status = c.replicas[i].terminate(Duration::from_secs(30)).unwrap();
        assert!(status.success(), "replica {i} exited with {status}");
        eprintln!("replica {i} drained and exited in {:?}", started.elapsed());
        c.replicas[i].start_again().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let (all, reconnects) = tokio::time::timeout(Duration::from_secs(90), terminal)
        .await
        .expect("the terminal finished")
        .unwrap();
    stop.cancel();
    let answers = poller.await.unwrap();
    let written = writer.await.unwrap();
    // Every change made during the restart reaches the other side.
    let deadline = tokio::time::Instant::now() + WAIT;
    let missing = loop {
        let missing: Vec<String> = (0..written)
            .flat_map(|n| {
                [
                    (remote.join(format!("up-{n}.txt")), format!("up {n}\n")),
                    (
                        local_dir.path().join(format!("down-{n}.txt")),
                        format!("down {n}\n"),
                    ),
                ]
            })
            .filter(|(path, want)| std::fs::read_to_string(path).ok().as_ref() != Some(want))
            .map(|(path, _)| path.display().to_string())
            .collect();
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(missing.is_empty(), "sync lost changes: {missing:?}");
    let text = String::from_utf8_lossy(&all);
    assert_eq!(
        numbered_lines(&text, "tick"),
        (1..=800).collect::<Vec<_>>(),
        "every line once, in order"
    );
    let other: Vec<&Answer> = answers
        .iter()
        .filter(|a| matches!(a, Answer::Other(_)))
        .collect();
    let retries = answers.iter().filter(|a| **a == Answer::Retry).count();
    eprintln!(
        "{} API and preview requests: {} retryable, {} other; terminal reconnected \
         {reconnects} times; {written} files synced each way",
        answers.len(),
        retries,
        other.len()
    );
    assert!(other.is_empty(), "{other:?}\n{}", c.lb.log());
    // The agents moved when asked; nobody waited for the drain time to run out.
    let moved = c
        .replicas
        .iter()
        .map(|r| r.log().matches("agent asked to move").count())
        .sum::<usize>();
    assert!(moved >= 1, "no agent was asked to move");
    for r in &c.replicas {
        for line in r.log().lines().filter(|l| l.contains("drained")) {
            assert!(
                line.contains("left=0"),
                "{line}\n{}\nagent:\n{}",
                r.log(),
                c.any().agent_log(&id)
            );
        }
    }
}
