//! Direct connections on one machine: the CLI reaches the agent in one hop, brokered by the
//! hub; the agent refuses every credential but a valid one for itself and what it allows;
//! the hub's policy keeps users on the relay. (Behind NATs: `tests/nat.rs`.)

use harness::{HubOptions, TestHub};
use link::{FramedRecv, send_msg};
use protocol::direct::{Candidates, Credential, DirectOffer, Purpose};
use protocol::forward::{ForwardToken, Resume};
use protocol::stream::{
    DirectOpen, ForwardOpen, PtyOpen, StreamHeader, StreamReply, TcpForwardOpen,
};
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

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

    // While a direct client is connected, the workspace says so (its owner and admins see
    // which sessions are direct); when it goes, so does the entry.
    let waiting = harness::Reaped(
        hub.wsh()
            .unwrap()
            .args(["--path", "direct", "attach", &id, "--", "sleep", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let shown = hub
        .wait_for(&id, Duration::from_secs(20), |w| {
            w["agent"]["direct_clients"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        })
        .await
        .unwrap();
    let client = &shown["agent"]["direct_clients"][0];
    assert_eq!(client["user"], "dev", "{shown}");
    assert!(
        client["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{shown}"
    );
    assert!(client["connected_at"].as_i64().unwrap() > 0, "{shown}");
    drop(waiting);
    hub.wait_for(&id, Duration::from_secs(20), |w| {
        w["agent"]["direct_clients"] == serde_json::json!([])
    })
    .await
    .unwrap();

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

/// A key, and a certificate for it signed by `issuer` carrying `credential`, valid until
/// `days` from now (negative: expired).
fn credential_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    credential: &Credential,
    days: i64,
) -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = credential
        .to_uris()
        .into_iter()
        .map(|u| rcgen::SanType::URI(u.try_into().unwrap()))
        .collect();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now + time::Duration::days(days);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.der().to_vec(), key.serialize_der())
}

/// Asks the hub for a direct session as `wsh` does; returns the offer and the key.
async fn broker(hub: &TestHub, workspace: &str) -> (DirectOffer, Vec<u8>) {
    let conn = harness::raw_agent::client_connection(hub).await.unwrap();
    harness::direct::offer(&conn, workspace).await.unwrap()
}

/// Connects to the agent with `identity` (or none) and opens one stream with `header`;
/// what the agent answered, or how the connection failed.
async fn try_stream(
    hub: &TestHub,
    offer: &DirectOffer,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    header: StreamHeader,
) -> Result<StreamReply, String> {
    let cas =
        link::parse_ca_bundle(&std::fs::read_to_string(hub.state_dir.join("ca.pem")).unwrap())
            .unwrap();
    let config = match identity {
        Some(identity) => link::direct_client_config(&cas, identity).unwrap(),
        None => {
            link::client_config(&cas, None, protocol::ALPN_DIRECT, Duration::from_secs(5)).unwrap()
        }
    };
    let addr = offer.agent.parse().unwrap()[0];
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let result = async {
        let conn = endpoint
            .connect_with(config, addr, &offer.server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // A closed connection says why.
        let closed = |e: String| conn.close_reason().map_or(e, |r| r.to_string());
        let (mut send, recv) = conn.open_bi().await.map_err(|e| closed(e.to_string()))?;
        let mut recv = FramedRecv::new(recv);
        send_msg(&mut send, &header)
            .await
            .map_err(|e| closed(e.to_string()))?;
        recv.expect::<StreamReply>()
            .await
            .map_err(|e| closed(e.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), result)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

#[tokio::test]
async fn the_agent_refuses_every_credential_but_a_valid_one_for_itself_and_what_it_allows() {
    let hub = TestHub::start().await.unwrap();
    let a = hub.ready_workspace().await.unwrap();
    let b = hub.ready_workspace().await.unwrap();
    let (offer, key) = broker(&hub, &a).await;
    let (offer_b, key_b) = broker(&hub, &b).await;
    let pty = || StreamHeader::Pty(PtyOpen {});
    let forward = || StreamHeader::TcpForward(TcpForwardOpen { port: 22 });
    let refused_for = |r: Result<StreamReply, String>| match r {
        Ok(StreamReply::Refused(r)) => format!("{:?}", r.reason),
        Ok(StreamReply::Accepted(_)) => "accepted".into(),
        Ok(StreamReply::Forwarding(_)) => "forwarding".into(),
        Err(e) => e,
    };

    // The hub's credential for this workspace: accepted.
    let valid = (offer.cert_der.clone(), key.clone());
    assert_eq!(
        refused_for(try_stream(&hub, &offer, Some(valid.clone()), pty()).await),
        "accepted"
    );
    // A resume names a connection this client opened: an unknown (or guessed) token
    // reaches nothing.
    let resume = StreamHeader::Forward(ForwardOpen {
        port: 22,
        resume: Some(Resume {
            token: ForwardToken([7; 16]),
            received: 0,
        }),
    });
    assert_eq!(
        refused_for(try_stream(&hub, &offer, Some(valid.clone()), resume).await),
        "Gone"
    );
    // A client cannot make the agent punch or open anything but what a credential names.
    let punch = StreamHeader::Direct(DirectOpen {
        client: Candidates::default(),
    });
    assert_eq!(
        refused_for(try_stream(&hub, &offer, Some(valid), punch).await),
        "Unauthorized"
    );

    // A valid credential for another workspace: the connection is closed.
    let other = try_stream(&hub, &offer, Some((offer_b.cert_der.clone(), key_b)), pty()).await;
    assert!(
        refused_for(other.clone()).contains("no credential for this workspace"),
        "{other:?}"
    );
    // Another workspace's agent certificate (a real client certificate of the same CA).
    let agent_dir = hub.workspace_dir(&b).join("agent");
    let agent_cert = (
        std::fs::read(agent_dir.join("agent.crt.der")).unwrap(),
        std::fs::read(agent_dir.join("agent.key.der")).unwrap(),
    );
    let other = try_stream(&hub, &offer, Some(agent_cert), pty()).await;
    assert!(
        refused_for(other.clone()).contains("no credential for this workspace"),
        "{other:?}"
    );

    // Credentials the test signs with the hub's own CA key: one for terminals only, one
    // that has expired.
    let ca = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(hub.state_dir.join("ca.pem")).unwrap(),
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(hub.state_dir.join("ca.key")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let pty_only = Credential {
        user: "dev".into(),
        workspace_id: a.clone(),
        purposes: vec![Purpose::Pty],
    };
    let cert = credential_cert(&ca, &pty_only, 1);
    assert_eq!(
        refused_for(try_stream(&hub, &offer, Some(cert.clone()), pty()).await),
        "accepted"
    );
    assert_eq!(
        refused_for(try_stream(&hub, &offer, Some(cert.clone()), forward()).await),
        "Unauthorized",
        "a terminal-only credential opens no forward"
    );
    let resumable = StreamHeader::Forward(ForwardOpen {
        port: 22,
        resume: None,
    });
    assert_eq!(
        refused_for(try_stream(&hub, &offer, Some(cert), resumable).await),
        "Unauthorized",
        "nor a resumable one"
    );
    let expired = credential_cert(&ca, &pty_only, -1);
    let r = try_stream(&hub, &offer, Some(expired), pty()).await;
    assert!(r.is_err(), "expired: {r:?}");

    // Signed by another CA, or no certificate at all: no handshake.
    let (stranger, stranger_key) = hub::base::ca::HubCa::generate().unwrap();
    let stranger = rcgen::Issuer::from_ca_cert_pem(
        stranger.cert_pem(),
        rcgen::KeyPair::from_pem(&stranger_key).unwrap(),
    )
    .unwrap();
    let r = try_stream(
        &hub,
        &offer,
        Some(credential_cert(&stranger, &pty_only, 1)),
        pty(),
    )
    .await;
    assert!(r.is_err(), "another CA: {r:?}");
    let r = try_stream(&hub, &offer, None, pty()).await;
    assert!(r.is_err(), "no certificate: {r:?}");

    // The agent lives on and still serves its hub.
    let (status, ws) = hub
        .api("GET", &format!("/workspaces/{a}"), None)
        .await
        .unwrap();
    assert_eq!((status, ws["status"].as_str()), (200, Some("READY")));
    let agent_log = hub.agent_log(&a);
    assert!(agent_log.contains("direct client refused"), "{agent_log}");
}
