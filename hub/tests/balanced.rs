//! Three hub replicas behind a real load balancer (nginx's stream module: HTTP round robin
//! over TCP, QUIC over UDP pinned per client), sharing the Firestore emulator and one
//! identity. Every client goes through the balancer, so most requests land on a replica
//! that does not hold the agent they need.

use futures_util::{SinkExt, StreamExt};
use harness::replicas::Cluster;
use harness::{Reaped, TestHub, free_port, numbered_lines};
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
    async fn open(hub: &TestHub, id: &str, resume: Option<(&str, u64)>) -> Self {
        let query = resume
            .map(|(s, o)| format!("session={s}&offset={o}"))
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut ws = loop {
            let url = hub.terminal_url(id, &query).await.unwrap();
            match tokio_tungstenite::connect_async(url).await {
                Ok((ws, _)) => break ws,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "terminal: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let session = loop {
            match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
                Some(Ok(Message::Text(t))) => {
                    let event: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(event["type"], "opened", "{event}");
                    break event["session"].as_str().unwrap().to_owned();
                }
                Some(Ok(_)) => {}
                other => panic!("terminal closed before it opened: {other:?}"),
            }
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
        let mut t = Terminal::open(hub, &id, None).await;
        t.type_text(&format!("echo term-$((40+{i}))\n")).await;
        let want = format!("term-{}", 40 + i);
        assert!(t.read_until(|s| s.contains(&want)).await, "terminal {i}");
    }

    // `wsh attach`, exit status included.
    for i in 0..3 {
        let mut child = hub
            .wsh()
            .unwrap()
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
        .run_in_workspace(
            &id,
            &[
                harness::binary("test-server")
                    .unwrap()
                    .display()
                    .to_string(),
                port.to_string(),
            ],
        )
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
    let mut t = Terminal::open(c.any(), &id, None).await;
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
    let mut resumed =
        Terminal::open(&c.replicas[alive], &id, Some((&t.session, t.next_offset()))).await;
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
