//! Several hub processes sharing one store (the Firestore emulator, or one SQLite file on
//! this machine) and one identity: what must happen once happens on one replica at a time,
//! and any replica reaches any agent.

use futures_util::{SinkExt, StreamExt};
use harness::replicas::{SharedStore, replica_config};
use harness::{HubOptions, TestHub};
use protocol::close::CloseCode;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Whether the last leadership line of `hub`'s log (from byte `from`: a restarted hub
/// appends to the same log) says it holds the lease now.
fn leads_since(hub: &TestHub, from: usize) -> bool {
    hub.log()[from..]
        .lines()
        .rfind(|l| l.contains("housekeeping leader changed"))
        .is_some_and(|l| l.contains("leader=true"))
}

fn leads(hub: &TestHub) -> bool {
    leads_since(hub, 0)
}

#[tokio::test]
async fn one_replica_runs_housekeeping_and_another_takes_over_when_it_dies() {
    housekeeping_leadership(SharedStore::firestore("replicas").expect("Firestore emulator")).await;
}

#[tokio::test]
async fn processes_sharing_a_sqlite_file_take_turns_at_housekeeping() {
    housekeeping_leadership(SharedStore::sqlite().unwrap()).await;
}

async fn housekeeping_leadership(store: SharedStore) {
    let identity = tempfile::tempdir().unwrap();
    hub::base::identity::Identity::generate_files(identity.path()).unwrap();
    let start = |id: &'static str| {
        TestHub::start_with(HubOptions {
            provider: "manual".into(),
            config: replica_config(&store, identity.path(), id),
            ..Default::default()
        })
    };
    let mut a = start("replica-a").await.unwrap();
    let mut b = start("replica-b").await.unwrap();

    // Exactly one leads, and keeps leading while it lives (renewals hold the lease).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(leads(&a) || leads(&b)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader:\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..30 {
        assert!(
            leads(&a) != leads(&b),
            "two leaders or none:\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (leader, follower) = if leads(&a) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let follower_changes = follower
        .log()
        .matches("housekeeping leader changed")
        .count();

    // SIGKILL: no release. The follower takes over once the lease runs out (2 s).
    leader.kill();
    let killed = tokio::time::Instant::now();
    while !leads(follower) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no takeover:\n{}",
            follower.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    assert!(
        follower
            .log()
            .matches("housekeeping leader changed")
            .count()
            > follower_changes
    );

    // The old leader comes back as a follower.
    let restarted = leader.log().len();
    leader.start_again().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        leads(follower) && !leads_since(leader, restarted),
        "{}\n{}",
        leader.log(),
        follower.log()
    );

    // SIGTERM: the leader gives the lease back as it exits, and the other takes it.
    let pid = rustix::process::Pid::from_raw(follower.listening.pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let termed = tokio::time::Instant::now();
    while !leads_since(leader, restarted) {
        assert!(
            termed.elapsed() < Duration::from_secs(10),
            "{}",
            leader.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        follower.log().contains("housekeeping lease released"),
        "{}",
        follower.log()
    );
    eprintln!(
        "takeover after SIGKILL: {took:?}, after SIGTERM: {:?}",
        termed.elapsed()
    );
}

/// How a peer-ALPN connection to `hub` presenting `identity` ends.
async fn peer_refusal(hub: &TestHub, identity: Option<(Vec<u8>, Vec<u8>)>) -> Option<CloseCode> {
    let config = link::client_config(
        &harness::raw_agent::hub_cas(hub).await,
        identity,
        protocol::ALPN_PEER,
        Duration::from_secs(10),
    )
    .unwrap();
    let conn = harness::raw_agent::client_endpoint()
        .connect_with(config, hub.listening.quic, "localhost")
        .unwrap()
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("a peer that is no replica was not closed")
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            CloseCode::from_code(c.error_code.into_inner())
        }
        _ => None,
    }
}

#[tokio::test]
async fn a_replica_that_does_not_hold_the_agent_reaches_it_through_the_one_that_does() {
    peer_hop(SharedStore::firestore("peers").expect("Firestore emulator")).await;
}

#[tokio::test]
async fn processes_sharing_a_sqlite_file_reach_each_others_agents() {
    peer_hop(SharedStore::sqlite().unwrap()).await;
}

async fn peer_hop(store: SharedStore) {
    let identity = tempfile::tempdir().unwrap();
    hub::base::identity::Identity::generate_files(identity.path()).unwrap();
    let start = |id: &'static str| {
        TestHub::start_with(HubOptions {
            config: format!(
                "peer_addr = \"127.0.0.1:0\"\n{}",
                replica_config(&store, identity.path(), id)
            ),
            ..Default::default()
        })
    };
    let mut a = start("replica-a").await.unwrap();
    let b = start("replica-b").await.unwrap();
    // The agent dials A (the process provider gives it A's address).
    let id = a.ready_workspace().await.unwrap();

    // A browser terminal through B.
    let url = b.terminal_url(&id, "").await.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Binary(b"echo via-$((40+2))\n".to_vec().into()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("via-42") {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.len() > 9 => seen.extend_from_slice(&b[9..]),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal through B ended: {other:?}; saw {seen:?}"),
        }
    }

    // `wsh attach` through B, exit status included.
    let mut child = std::process::Command::new(harness::binary("wsh").unwrap())
        .args(["attach", &id])
        .env("WSH_HUB", b.url(""))
        .env("WSH_PATH", "relay")
        .env("WSH_TOKEN", &b.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"echo cli-$((1+1))\nexit 3\n",
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli-2"));

    // A preview through B, of a dev server in the workspace (started through A).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new(harness::binary("wsh").unwrap())
        .args(["attach", &id, "--"])
        .arg(harness::binary("test-server").unwrap())
        .arg(port.to_string())
        .env("WSH_HUB", a.url(""))
        .env("WSH_PATH", "relay")
        .env("WSH_TOKEN", &a.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = b.url(&format!("/preview/{id}/{port}/"));
    let mut body = None;
    for _ in 0..200 {
        let res = b.http.get(&url).bearer_auth(&b.token).send().await.unwrap();
        if res.status() == 200 {
            body = Some(res.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body.as_deref(), Some("hello from test-server\n"));
    // B shows the agent A holds, its ports, and the ports in a new SSE subscription's
    // snapshot: it asks A.
    let (status, ws) = b
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(ws["agent"]["connected_since"].is_i64(), "{ws}");
    let (_, list) = b.api("GET", "/workspaces", None).await.unwrap();
    assert!(list[0]["agent"].is_object(), "{list}");
    let key = port.to_string();
    let mut ports = serde_json::Value::Null;
    for _ in 0..200 {
        (_, ports) = b
            .api("GET", &format!("/workspaces/{id}/ports"), None)
            .await
            .unwrap();
        if ports["ports"].get(&key).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ports["ports"][&key]["port"], port, "{ports}");
    let mut events = harness::sse::Events::open(&b, &id).await;
    loop {
        let (kind, data) = events.recv().await.expect("snapshot");
        if kind == "port" {
            let listed = data["detail"]["ports"].as_array().unwrap();
            assert!(listed.iter().any(|p| p["port"] == port), "{data}");
            break;
        }
    }
    drop(events);
    let _ = server.kill();
    let _ = server.wait();

    // A `wsh login` device code started on A, approved on B, redeemed on A, once.
    let (status, code) = a.api("POST", "/login/device", None).await.unwrap();
    assert_eq!(status, 200, "{code}");
    let poll = serde_json::json!({"device_code": code["device_code"]});
    let (status, body) = a
        .api("POST", "/login/device/token", Some(poll.clone()))
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("authorization_pending"))
    );
    let (status, body) = b
        .api(
            "POST",
            "/login/device/approve",
            Some(serde_json::json!({"user_code": code["user_code"]})),
        )
        .await
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let (status, body) = a
        .api("POST", "/login/device/token", Some(poll.clone()))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["owner_id"], "dev");
    let (status, _) = b
        .api("POST", "/login/device/token", Some(poll))
        .await
        .unwrap();
    assert_eq!(status, 400, "a device code yields one token");

    // Only replicas get in: no certificate, or an agent's, is refused.
    assert_eq!(peer_refusal(&b, None).await, Some(CloseCode::Unauthorized));
    let agent_dir = a.workspace_dir(&id).join("agent");
    let agent_identity = (
        std::fs::read(agent_dir.join("agent.crt.der")).unwrap(),
        std::fs::read(agent_dir.join("agent.key.der")).unwrap(),
    );
    assert_eq!(
        peer_refusal(&b, Some(agent_identity)).await,
        Some(CloseCode::Unauthorized)
    );
    assert!(
        b.log()
            .contains("peer connection without a replica certificate refused")
    );

    // B's subscribers see what happens on A: a stop asked of A, on the workspace's feed
    // and on its owner's.
    let mut events = harness::sse::Events::open(&b, &id).await;
    let mut owner_events = harness::sse::Events::open_owner(&b, &b.token).await;
    let (status, body) = a
        .api("POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let seen = events.statuses_until("SUSPENDED").await;
    assert!(seen.iter().any(|s| s == "STOPPING"), "{seen:?}");
    let seen = owner_events.statuses_until("SUSPENDED").await;
    assert!(seen.iter().any(|s| s == "STOPPING"), "{seen:?}");

    // A dies: B's sessions through it end (no hang), and once B has noticed, it says the
    // agent is offline instead of reaching anything else.
    a.kill();
    let url = b.terminal_url(&id, "").await.unwrap();
    if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => panic!("output from a dead replica: {b:?}"),
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => break,
                Ok(Some(Ok(_))) => {}
                Err(_) => panic!("a terminal through a dead replica hangs"),
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let url = b.terminal_url(&id, "").await.unwrap();
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                // The workspace was stopped: its agent is not coming back.
                assert_eq!(r.status(), 409);
                break;
            }
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "B never noticed A is gone"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_with_another_ca_is_refused_by_the_replicas_and_by_agents() {
    let store = SharedStore::firestore("rogue").expect("Firestore emulator");
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    harness::replicas::generate_identity(ours.path()).unwrap();
    harness::replicas::generate_identity(theirs.path()).unwrap();
    let start = |identity: &std::path::Path, id: &'static str| {
        TestHub::start_with(HubOptions {
            config: format!(
                "peer_addr = \"127.0.0.1:0\"\n{}",
                replica_config(&store, identity, id)
            ),
            ..Default::default()
        })
    };
    let a = start(ours.path(), "replica-a").await.unwrap();
    // Same store, its own CA: it registers like a replica, and gets nowhere.
    let rogue = start(theirs.path(), "rogue").await.unwrap();
    let id = a.ready_workspace().await.unwrap();

    // Through the rogue, the agent A holds is out of reach (A refuses its certificate; it
    // refuses A's): 503 (the agent is away as far as the rogue knows), never a stream.
    let url = rogue.terminal_url(&id, "").await.unwrap();
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("a terminal through another CA's replica: {other:?}"),
    }
    assert!(rogue.log().contains("reach replica"), "{}", rogue.log());

    // A replica certificate from another CA, presented to A directly: the handshake fails.
    let rogue_ca = hub::base::ca::HubCa::load_or_create(theirs.path()).unwrap();
    let cert = rogue_ca.issue_replica("replica-a").unwrap();
    let config = link::client_config(
        &harness::raw_agent::hub_cas(&a).await,
        Some((cert.cert_der, cert.key_pkcs8)),
        protocol::ALPN_PEER,
        Duration::from_secs(10),
    )
    .unwrap();
    let connecting = harness::raw_agent::client_endpoint()
        .connect_with(config, a.listening.quic, "localhost")
        .unwrap();
    if let Ok(conn) = connecting.await {
        // TLS 1.3 checks the client's certificate after the client thinks it is done.
        let ended = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("a peer with another CA was let in");
        assert!(
            !matches!(ended, quinn::ConnectionError::ApplicationClosed(_)),
            "refused by the handshake, not after it: {ended:?}"
        );
    }

    // The workspace's agent, pointed at the rogue, refuses it: it pins A's CA.
    let dir = tempfile::tempdir().unwrap();
    let agent_dir = a.workspace_dir(&id);
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    for file in ["agent.crt.der", "agent.key.der"] {
        std::fs::copy(agent_dir.join("agent").join(file), state.join(file)).unwrap();
    }
    let config: String = std::fs::read_to_string(agent_dir.join("agent.toml"))
        .unwrap()
        .lines()
        .map(|line| {
            if line.starts_with("hub_addr") {
                format!("hub_addr = \"{}\"", rogue.listening.quic)
            } else if line.starts_with("state_dir") {
                format!("state_dir = \"{}\"", state.display())
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("agent.toml"), config).unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let agent = harness::Reaped(
        std::process::Command::new(harness::binary("workspace-agent").unwrap())
            .arg("--config")
            .arg(dir.path().join("agent.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(agent);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(!log.contains("connected to hub"), "{log}");
    assert!(log.contains("link to hub lost"), "{log}");
    assert!(!rogue.log().contains("agent connected"), "{}", rogue.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_asked_of_another_replica_ends_the_agents_connection_on_its_holder() {
    let store = SharedStore::firestore("stop").expect("Firestore emulator");
    let identity = tempfile::tempdir().unwrap();
    harness::replicas::generate_identity(identity.path()).unwrap();
    let start = |id: &'static str| {
        TestHub::start_with(HubOptions {
            provider: "manual".into(),
            config: format!(
                "peer_addr = \"127.0.0.1:0\"\n{}",
                replica_config(&store, identity.path(), id)
            ),
            ..Default::default()
        })
    };
    let a = start("replica-a").await.unwrap();
    let b = start("replica-b").await.unwrap();
    // The agent (in this process) dials A.
    let ws = a.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    let mut agent = harness::InProcessAgent::start(&ws).unwrap();
    agent
        .wait_event(Duration::from_secs(30), |e| {
            *e == agent::AgentEvent::Connected
        })
        .await
        .unwrap();
    a.wait_for(&id, Duration::from_secs(30), |w| w["status"] == "READY")
        .await
        .unwrap();

    // B stops it; A, which holds the connection, ends it (heartbeats alone never would).
    let (status, body) = b
        .api("POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let ended = agent
        .wait_event(Duration::from_secs(15), |e| {
            matches!(e, agent::AgentEvent::Disconnected(_))
        })
        .await
        .unwrap();
    assert_eq!(
        ended,
        agent::AgentEvent::Disconnected("closed by hub: workspace stopped".into())
    );
    agent.stop().await.unwrap();
}

/// A TCP relay to `upstream` whose answers come back `delay` late while `slow` is set.
async fn slow_relay(
    upstream: String,
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    delay: Duration,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            // Each answer is held for `delay` from when it came (a latency, not a
            // bandwidth limit: answers keep flowing meanwhile).
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let slow = slow.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                    let due = tokio::time::Instant::now()
                        + if slow.load(std::sync::atomic::Ordering::Relaxed) {
                            delay
                        } else {
                            Duration::ZERO
                        };
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((due, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    if client_write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Every answer of the store half a second late (each of the connection's store writes
/// nearly the heartbeat timeout, all of them together more):
/// the hub still answers the heartbeats of an agent that connects meanwhile, and the
/// connection's store writes land when the store answers.
#[tokio::test]
async fn a_hub_waiting_on_a_slow_store_still_answers_its_agents_heartbeats() {
    let store = SharedStore::firestore("slow-store").expect("Firestore emulator");
    let SharedStore::Firestore { emulator, .. } = &store else {
        unreachable!()
    };
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = slow_relay(
        emulator.host.clone(),
        slow.clone(),
        Duration::from_millis(500),
    )
    .await;
    let identity = tempfile::tempdir().unwrap();
    hub::base::identity::Identity::generate_files(identity.path()).unwrap();
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_millis(600),
        // A replica (a peer address): each connection's route is written to the store.
        config: format!(
            "peer_addr = \"127.0.0.1:0\"\n{}",
            replica_config(&store, identity.path(), "replica-slow")
                .replace(&emulator.host, &relay.to_string())
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    let (config, dir) = harness::agent_config(&ws).unwrap();
    let mut first = harness::InProcessAgent::start_with(config.clone(), dir);
    first
        .wait_event(Duration::from_secs(30), |e| {
            matches!(e, agent::AgentEvent::Connected)
        })
        .await
        .unwrap();
    hub.wait_for(&id, Duration::from_secs(30), |w| w["status"] == "READY")
        .await
        .unwrap();
    first.stop().await.unwrap();

    // The same agent again (its identity kept), now that the store is slow: its
    // connection's route and time take seconds to write.
    slow.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = hub.log().len();
    let mut again = harness::InProcessAgent::start_with(config, tempfile::tempdir().unwrap());
    let connected = again
        .wait_event(Duration::from_secs(30), |e| {
            matches!(e, agent::AgentEvent::Connected)
        })
        .await;
    assert!(
        connected.is_ok(),
        "{connected:?}\n{}",
        &hub.log()[written..]
    );
    let dropped = again
        .wait_event(Duration::from_secs(6), |e| {
            matches!(e, agent::AgentEvent::Disconnected(_))
        })
        .await;
    assert!(
        dropped.is_err(),
        "the agent dropped its connection: {dropped:?}\n{}",
        &hub.log()[written..]
    );
    assert!(
        !hub.log()[written..].contains("heartbeat timed out"),
        "{}",
        &hub.log()[written..]
    );
    slow.store(false, std::sync::atomic::Ordering::Relaxed);
    again.stop().await.unwrap();
    drop(first);
}
