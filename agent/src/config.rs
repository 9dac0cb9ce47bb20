//! The agent's configuration: the bootstrap file cloud-init writes, plus tunables.

use crate::AgentError;
use protocol::bootstrap::AgentBootstrap;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The validated config the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub hub_addr: String,
    pub server_name: String,
    /// The pinned hub CA (DER).
    pub ca_der: Vec<u8>,
    pub enrollment_token: Option<String>,
    pub state_dir: PathBuf,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// QUIC idle timeout (a backstop; heartbeats detect loss sooner).
    pub idle_timeout: Duration,
}

impl AgentConfig {
    /// Validates a bootstrap file's contents.
    pub fn from_bootstrap(b: AgentBootstrap) -> Result<Self, AgentError> {
        let bad = |m: &str| AgentError::Config(m.to_owned());
        if b.hub_addr.is_empty() || !b.hub_addr.contains(':') {
            return Err(bad("hub_addr must be host:port"));
        }
        if b.server_name.is_empty() {
            return Err(bad("server_name must not be empty"));
        }
        let ca_der = CertificateDer::from_pem_slice(b.ca_pem.as_bytes())
            .map_err(|e| AgentError::Config(format!("ca_pem: {e}")))?
            .to_vec();
        if b.state_dir.is_empty() {
            return Err(bad("state_dir must not be empty"));
        }
        Ok(Self {
            hub_addr: b.hub_addr,
            server_name: b.server_name,
            ca_der,
            enrollment_token: b.enrollment_token.filter(|t| !t.is_empty()),
            state_dir: PathBuf::from(b.state_dir),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        })
    }

    /// Reads and validates a bootstrap file (TOML).
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::Config(format!("read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, AgentError> {
        let b: AgentBootstrap =
            toml::from_str(text).map_err(|e| AgentError::Config(e.to_string()))?;
        Self::from_bootstrap(b)
    }
}
