//! The agent's identity: its own key (never leaves the machine) and the certificate the hub
//! CA issued for it at enrollment. Both live in the state folder, mode 0600.

use crate::AgentError;
use crate::config::AgentConfig;
use link::{FramedRecv, LinkError, send_msg};
use protocol::close::CloseCode;
use protocol::enroll::{EnrollMsg, EnrollRequest};
use protocol::stream::{EnrollOpen, StreamHeader, StreamReply};
use rcgen::{CertificateParams, KeyPair};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const KEY_FILE: &str = "agent.key.der";
const CERT_FILE: &str = "agent.crt.der";

/// A key and the certificate for it.
pub struct Identity {
    pub cert_der: Vec<u8>,
    pub(crate) key_pkcs8: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// Why enrollment did not produce an identity.
#[derive(Debug)]
pub enum EnrollError {
    /// Worth trying again later (network, hub unavailable).
    Retry(String),
    /// Will never succeed as configured.
    Fatal(AgentError),
}

impl From<LinkError> for EnrollError {
    fn from(e: LinkError) -> Self {
        EnrollError::Retry(e.to_string())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Identity {
    /// The stored identity, if enrollment already happened.
    pub fn load(dir: &Path) -> Result<Option<Self>, AgentError> {
        match (
            std::fs::read(dir.join(KEY_FILE)),
            std::fs::read(dir.join(CERT_FILE)),
        ) {
            (Ok(key_pkcs8), Ok(cert_der)) => Ok(Some(Self {
                cert_der,
                key_pkcs8,
            })),
            _ => Ok(None),
        }
    }

    /// The mutual-TLS client config for this identity, pinning the hub CA.
    pub fn client_config(
        &self,
        config: &AgentConfig,
    ) -> Result<quinn::ClientConfig, rustls::Error> {
        link::agent_client_config(
            &config.hub_cas,
            Some((self.cert_der.clone(), self.key_pkcs8.clone())),
            config.idle_timeout,
            config.keep_alive,
        )
    }
}

/// The agent's key, generated and stored on first use.
fn load_or_create_key(dir: &Path) -> Result<KeyPair, AgentError> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(KEY_FILE);
    if let Ok(der) = std::fs::read(&path) {
        let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der);
        return KeyPair::try_from(&pkcs8)
            .map_err(|e| AgentError::Config(format!("stored key {}: {e}", path.display())));
    }
    let key = KeyPair::generate().map_err(|e| AgentError::Config(format!("generate key: {e}")))?;
    write_private(&path, &key.serialize_der())?;
    Ok(key)
}

/// Resolves the hub's address and connects with `client` config.
pub async fn connect(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    client: quinn::ClientConfig,
) -> Result<quinn::Connection, ConnectFailed> {
    let failed = |message: String| ConnectFailed {
        message,
        refused: false,
    };
    let addr = tokio::net::lookup_host(&config.hub_addr)
        .await
        .map_err(|e| failed(format!("resolve {}: {e}", config.hub_addr)))?
        .next()
        .ok_or_else(|| failed(format!("resolve {}: no address", config.hub_addr)))?;
    let connecting = endpoint
        .connect_with(client, addr, &config.server_name)
        .map_err(|e| failed(format!("connect: {e}")))?;
    match tokio::time::timeout(config.connect_timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(ConnectFailed {
            refused: matches!(&e, quinn::ConnectionError::ConnectionClosed(close)
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
            message: format!("connect to {addr}: {e}"),
        }),
        Err(_) => Err(failed(format!("connect to {addr}: timed out"))),
    }
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub struct ConnectFailed {
    pub message: String,
    /// The server refused the connection at once, as a hub replica that is leaving does:
    /// another attempt from a new port reaches another replica.
    pub refused: bool,
}

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Trades the enrollment token for a certificate and stores it.
pub async fn enroll(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
) -> Result<Identity, EnrollError> {
    let token = config
        .enrollment_token
        .clone()
        .ok_or(EnrollError::Fatal(AgentError::NoIdentity))?;
    let key = load_or_create_key(&config.state_dir).map_err(EnrollError::Fatal)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| EnrollError::Fatal(AgentError::Config(format!("make CSR: {e}"))))?;
    let client = link::agent_client_config(
        &config.hub_cas,
        None,
        config.idle_timeout,
        config.keep_alive,
    )
    .map_err(|e| EnrollError::Fatal(AgentError::Config(e.to_string())))?;
    let conn = connect(config, endpoint, client)
        .await
        .map_err(|e| EnrollError::Retry(e.message))?;
    let result = async {
        let (mut send, recv) = conn.open_bi().await.map_err(LinkError::from)?;
        let mut recv = FramedRecv::with_limit(recv, 64 * 1024);
        send_msg(&mut send, &StreamHeader::Enroll(EnrollOpen {})).await?;
        send_msg(
            &mut send,
            &EnrollMsg::Request(EnrollRequest {
                protocol_version: protocol::PROTOCOL_VERSION,
                agent_version: crate::update::version().into(),
                token,
                csr_der: csr.der().to_vec(),
            }),
        )
        .await?;
        let _ = send.finish();
        match recv.expect::<StreamReply>().await? {
            StreamReply::Accepted(_) => {}
            StreamReply::Refused(r) => {
                return Err(EnrollError::Retry(format!(
                    "enrollment stream refused: {}",
                    r.message
                )));
            }
            StreamReply::Forwarding(_) => {
                return Err(EnrollError::Retry("unexpected answer to enrollment".into()));
            }
        }
        match recv.expect::<EnrollMsg>().await? {
            EnrollMsg::Issued(issued) => Ok(issued.cert_der),
            EnrollMsg::Refused(r) if r.reason.is_retryable() => Err(EnrollError::Retry(r.message)),
            EnrollMsg::Refused(r) => Err(EnrollError::Fatal(AgentError::EnrollmentRefused {
                reason: r.reason,
                message: r.message,
            })),
            EnrollMsg::Request(_) => Err(EnrollError::Retry("unexpected reply".into())),
        }
    }
    .await;
    conn.close(
        quinn::VarInt::from_u32(CloseCode::EnrollmentDone.code()),
        b"",
    );
    let cert_der = result?;
    write_private(&config.state_dir.join(CERT_FILE), &cert_der)
        .map_err(|e| EnrollError::Fatal(e.into()))?;
    tracing::info!("enrolled: certificate stored");
    Ok(Identity {
        cert_der,
        key_pkcs8: key.serialize_der(),
    })
}
