//! A raw agent: a QUIC client speaking the agent protocol by hand, with a real agent
//! certificate, for tests that send what real agent code never would (malformed frames,
//! floods of reports).

use crate::TestHub;
use link::{FramedRecv, send_msg};
use protocol::client::{ClientHello, ClientMsg};
use protocol::control::{ControlMsg, Hello};
use protocol::stream::{ControlOpen, StreamHeader};
use std::time::Duration;

/// The CA certificates (DER) a client of the hub pins: its `GET /ca.pem` bundle.
pub async fn hub_cas(hub: &TestHub) -> Vec<Vec<u8>> {
    let pem = hub
        .http
        .get(hub.url("/ca.pem"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    link::parse_ca_bundle(&pem).unwrap()
}

/// A CLI's connection to the hub (ALPN `wsh-client/1`), authenticated with the dev token.
pub async fn client_connection(hub: &TestHub) -> anyhow::Result<quinn::Connection> {
    let cas = hub_cas(hub).await;
    let conn = client_endpoint()
        .connect_with(
            link::cli_client_config(&cas)?,
            hub.listening.quic,
            "localhost",
        )?
        .await?;
    let (mut send, recv) = conn.open_bi().await?;
    let hello = ClientHello {
        protocol_version: protocol::PROTOCOL_VERSION,
        token: hub.token.clone(),
    };
    send_msg(&mut send, &ClientMsg::Hello(hello)).await?;
    match FramedRecv::new(recv).expect::<ClientMsg>().await? {
        ClientMsg::Welcome(_) => Ok(conn),
        other => anyhow::bail!("hub answered {other:?}"),
    }
}

pub fn client_endpoint() -> quinn::Endpoint {
    link::install_crypto_provider();
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Connects to the hub's agent endpoint, with a client certificate (DER cert, DER key) or
/// without one (enrollment only), and a QUIC idle timeout of 10 s.
pub async fn connect(
    hub: &TestHub,
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    connect_with_idle(hub, identity, Duration::from_secs(10)).await
}

/// [`connect`] with another QUIC idle timeout (a raw agent that stays quiet for long).
pub async fn connect_with_idle(
    hub: &TestHub,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    idle_timeout: Duration,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let cfg = link::client_config(
        &hub_cas(hub).await,
        identity,
        protocol::ALPN_AGENT,
        idle_timeout,
    )
    .unwrap();
    client_endpoint()
        .connect_with(cfg, hub.listening.quic, "localhost")
        .unwrap()
        .await
}

/// Opens the control stream on a raw connection and says hello with `protocol_version`.
pub async fn hello(
    conn: &quinn::Connection,
    protocol_version: u16,
) -> (quinn::SendStream, FramedRecv) {
    hello_as(conn, protocol_version, "raw").await
}

/// [`hello`] as an agent of `agent_version`.
pub async fn hello_as(
    conn: &quinn::Connection,
    protocol_version: u16,
    agent_version: &str,
) -> (quinn::SendStream, FramedRecv) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send_msg(&mut send, &StreamHeader::Control(ControlOpen {}))
        .await
        .unwrap();
    send_msg(
        &mut send,
        &ControlMsg::Hello(Hello {
            protocol_version,
            agent_version: agent_version.into(),
            hostname: "raw".into(),
        }),
    )
    .await
    .unwrap();
    (send, FramedRecv::new(recv))
}

/// Creates a workspace, enrolls through the real agent code and returns the workspace id
/// and the stored (cert, key).
pub async fn enrolled_identity(hub: &TestHub) -> (String, Vec<u8>, Vec<u8>) {
    let ws = hub.create_workspace().await.unwrap();
    let (config, dir) = crate::agent_config(&ws).unwrap();
    let identity = agent::identity::enroll(&config, &client_endpoint())
        .await
        .unwrap();
    let key = std::fs::read(dir.path().join("agent.key.der")).unwrap();
    (
        ws["id"].as_str().unwrap().to_owned(),
        identity.cert_der,
        key,
    )
}
