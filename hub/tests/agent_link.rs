//! The agent link under attack and misuse: enrollment rules, certificates from elsewhere,
//! malformed frames. Every test runs a real hub process; agents are real agent code.

use agent::AgentError;
use agent::config::AgentConfig;
use harness::{HubOptions, InProcessAgent, TestHub, raw_agent};
use link::{FramedRecv, send_msg};
use protocol::close::CloseCode;
use protocol::control::{ControlMsg, HelloRefusal};
use protocol::enroll::EnrollRefusal;
use protocol::stream::{ControlOpen, StreamHeader, StreamRefusal, StreamReply};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

async fn manual_hub(options: HubOptions) -> TestHub {
    TestHub::start_with(HubOptions {
        provider: "manual".into(),
        ..options
    })
    .await
    .unwrap()
}

/// A certificate authority that is not the hub's, and a client cert from it.
fn foreign_identity(cn: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.der().to_vec(),
        cert.der().to_vec(),
        key.serialize_der(),
    )
}

/// Waits for the connection to be closed and returns the application close code and reason.
async fn close_of(conn: &quinn::Connection) -> (Option<CloseCode>, String) {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("connection not closed")
    {
        quinn::ConnectionError::ApplicationClosed(c) => (
            CloseCode::from_code(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => (None, other.to_string()),
    }
}

#[tokio::test]
async fn an_enrollment_token_works_once() {
    let hub = manual_hub(HubOptions::default()).await;
    let ws = hub.create_workspace().await.unwrap();
    let mut first = InProcessAgent::start(&ws).unwrap();
    first
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Connected)
        .await
        .unwrap();

    // A second agent (its own key) with the same token is refused for good.
    let mut second = InProcessAgent::start(&ws).unwrap();
    let result = tokio::time::timeout(WAIT, &mut second.task)
        .await
        .unwrap()
        .unwrap();
    match result {
        Err(AgentError::EnrollmentRefused { reason, .. }) => {
            assert_eq!(reason, EnrollRefusal::TokenUsed)
        }
        other => panic!("expected TokenUsed, got {other:?}"),
    }
    // The first agent is unaffected.
    let id = ws["id"].as_str().unwrap();
    let ws = hub
        .wait_for(id, WAIT, |w| {
            w["status"] == "READY" && !w["agent"].is_null()
        })
        .await
        .unwrap();
    assert_eq!(ws["agent"]["agent_version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn a_lost_enrollment_reply_can_be_retried_with_the_same_key_only() {
    let hub = manual_hub(HubOptions::default()).await;
    let ws = hub.create_workspace().await.unwrap();
    let (config, dir) = harness::agent_config(&ws).unwrap();
    let endpoint = raw_agent::client_endpoint();
    let first = agent::identity::enroll(&config, &endpoint).await.unwrap();
    // As if the reply never arrived: the key survives, the certificate does not.
    std::fs::remove_file(dir.path().join("agent.crt.der")).unwrap();
    let again = agent::identity::enroll(&config, &endpoint).await.unwrap();
    assert_ne!(
        first.cert_der, again.cert_der,
        "a fresh certificate for the same key"
    );

    let (mut other, _other_dir) = harness::agent_config(&ws).unwrap();
    other.state_dir = _other_dir.path().to_path_buf();
    match agent::identity::enroll(&other, &endpoint).await {
        Err(agent::identity::EnrollError::Fatal(AgentError::EnrollmentRefused {
            reason, ..
        })) => {
            assert_eq!(reason, EnrollRefusal::TokenUsed)
        }
        other => panic!("expected TokenUsed, got {other:?}"),
    }
}

#[tokio::test]
async fn expired_and_unknown_tokens_are_refused() {
    let hub = manual_hub(HubOptions {
        enrollment_ttl: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    let ws = hub.create_workspace().await.unwrap();
    let endpoint = raw_agent::client_endpoint();

    let (mut unknown, _d1) = harness::agent_config(&ws).unwrap();
    unknown.enrollment_token =
        Some("wse_0000000000000000000000000000000000000000000000000000000000000000".into());
    match agent::identity::enroll(&unknown, &endpoint).await {
        Err(agent::identity::EnrollError::Fatal(AgentError::EnrollmentRefused {
            reason, ..
        })) => {
            assert_eq!(reason, EnrollRefusal::UnknownToken)
        }
        other => panic!("expected UnknownToken, got {other:?}"),
    }

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (expired, _d2) = harness::agent_config(&ws).unwrap();
    match agent::identity::enroll(&expired, &endpoint).await {
        Err(agent::identity::EnrollError::Fatal(AgentError::EnrollmentRefused {
            reason,
            message,
        })) => {
            assert_eq!(reason, EnrollRefusal::TokenExpired, "{message}")
        }
        other => panic!("expected TokenExpired, got {other:?}"),
    }
    let (_, body) = hub
        .api(
            "GET",
            &format!("/workspaces/{}", ws["id"].as_str().unwrap()),
            None,
        )
        .await
        .unwrap();
    // It can never enroll with that token: the workspace fails now, not at the provision
    // timeout (ten minutes here), and says why.
    assert_eq!(body["status"], "ERROR", "{body}");
    let reason = body["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("the agent's enrollment token expired (1s after the create)"),
        "{reason}"
    );
    assert!(hub.log().contains("action=workspace.enrollment_expired"));
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let hub = manual_hub(HubOptions::default()).await;
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap();
    // Same subject as the real workspace, but signed by a CA the hub never made.
    let (_, cert, key) = foreign_identity(id);
    let outcome = match raw_agent::connect(&hub, Some((cert, key))).await {
        Err(e) => e.to_string(),
        Ok(conn) => {
            let opened = async {
                let (mut send, recv) = conn.open_bi().await?;
                send_msg(&mut send, &StreamHeader::Control(ControlOpen {})).await?;
                FramedRecv::new(recv).expect::<StreamReply>().await
            }
            .await;
            assert!(
                opened.is_err(),
                "a foreign certificate got a stream: {opened:?}"
            );
            conn.closed().await.to_string()
        }
    };
    assert!(
        outcome.contains("UnknownIssuer")
            || outcome.contains("certificate")
            || outcome.contains("alert"),
        "{outcome}"
    );
    let (_, body) = hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(body["status"], "PROVISIONING");
    assert!(body["agent"].is_null());
}

#[tokio::test]
async fn without_a_client_certificate_only_enrollment_is_allowed() {
    let hub = manual_hub(HubOptions::default()).await;
    hub.create_workspace().await.unwrap();
    let conn = raw_agent::connect(&hub, None).await.unwrap();
    let (_send, mut recv) = raw_agent::hello(&conn, protocol::PROTOCOL_VERSION).await;
    match recv.expect::<StreamReply>().await.unwrap() {
        StreamReply::Refused(r) => assert_eq!(r.reason, StreamRefusal::Unauthorized),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (code, _) = close_of(&conn).await;
    assert_eq!(code, Some(CloseCode::Unauthorized));
}

#[tokio::test]
async fn an_agent_with_the_wrong_pinned_ca_refuses_the_hub_and_keeps_its_token_secret() {
    let hub = manual_hub(HubOptions::default()).await;
    let ws = hub.create_workspace().await.unwrap();
    let (mut config, dir): (AgentConfig, _) = harness::agent_config(&ws).unwrap();
    config.hub_cas = vec![foreign_identity("someone-else").0];
    let mut wrong = InProcessAgent::start_with(config, dir);
    let waited = wrong.wait_event(Duration::from_secs(2), |_| true).await;
    assert!(
        waited.is_err(),
        "agent with the wrong CA got somewhere: {waited:?}"
    );
    assert!(
        !wrong.task.is_finished(),
        "the agent keeps retrying: the hub may be replaced"
    );
    assert!(!wrong.state_dir.join("agent.crt.der").exists());
    wrong.stop().await.unwrap();

    // The hub never saw the token, so the right agent can still use it.
    let mut right = InProcessAgent::start(&ws).unwrap();
    right
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Connected)
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_and_oversized_frames_close_only_the_offending_connection() {
    let hub = manual_hub(HubOptions::default()).await;
    let good = hub.create_workspace().await.unwrap();
    let good_id = good["id"].as_str().unwrap().to_owned();
    let mut bystander = InProcessAgent::start(&good).unwrap();
    bystander
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Connected)
        .await
        .unwrap();
    let (_bad_id, cert, key) = raw_agent::enrolled_identity(&hub).await;

    // 1. A length prefix claiming 4 GiB on the first stream.
    let conn = raw_agent::connect(&hub, Some((cert.clone(), key.clone())))
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let (code, reason) = close_of(&conn).await;
    assert_eq!(code, Some(CloseCode::ProtocolError), "{reason}");
    assert!(reason.contains("exceeds the limit"), "{reason}");

    // 2. A well-framed message with a tag nobody knows, after a good hello.
    let conn = raw_agent::connect(&hub, Some((cert.clone(), key.clone())))
        .await
        .unwrap();
    let (mut send, mut recv) = raw_agent::hello(&conn, protocol::PROTOCOL_VERSION).await;
    assert!(matches!(
        recv.expect::<StreamReply>().await.unwrap(),
        StreamReply::Accepted(_)
    ));
    assert!(matches!(
        recv.expect::<ControlMsg>().await.unwrap(),
        ControlMsg::Welcome(_)
    ));
    send.write_all(&[0, 0, 0, 3, 0xe7, 0x07, 0x00])
        .await
        .unwrap();
    let (code, reason) = close_of(&conn).await;
    assert_eq!(code, Some(CloseCode::ProtocolError), "{reason}");
    assert!(reason.contains("unknown message tag 999"), "{reason}");

    // 3. Garbage from a peer with no certificate at all.
    let conn = raw_agent::connect(&hub, None).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let (code, reason) = close_of(&conn).await;
    assert_eq!(code, Some(CloseCode::ProtocolError), "{reason}");

    // 4. A hello with a protocol version from the future gets a typed refusal.
    let conn = raw_agent::connect(&hub, Some((cert, key))).await.unwrap();
    let (_send, mut recv) = raw_agent::hello(&conn, protocol::PROTOCOL_VERSION + 7).await;
    assert!(matches!(
        recv.expect::<StreamReply>().await.unwrap(),
        StreamReply::Accepted(_)
    ));
    match recv.expect::<ControlMsg>().await.unwrap() {
        ControlMsg::HelloRefused(r) => {
            assert_eq!(r.reason, HelloRefusal::VersionTooNew);
            assert_eq!(r.max_version, protocol::PROTOCOL_VERSION);
        }
        other => panic!("expected HelloRefused, got {other:?}"),
    }
    drop(conn);

    // The bystander never noticed, and the hub still serves new agents.
    assert!(
        bystander.events.try_recv().is_err(),
        "bystander saw an event"
    );
    let ws = hub
        .wait_for(&good_id, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();
    assert_eq!(ws["status"], "READY");
    let fresh = hub.create_workspace().await.unwrap();
    let mut newcomer = InProcessAgent::start(&fresh).unwrap();
    newcomer
        .wait_event(WAIT, |e| *e == agent::AgentEvent::Connected)
        .await
        .unwrap();
}
