//! The agent's configuration: the bootstrap file cloud-init writes, plus tunables.

use crate::AgentError;
use protocol::bootstrap::AgentBootstrap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The validated config the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub hub_addr: String,
    pub server_name: String,
    /// The pinned hub CAs (DER): one, or two during a CA rotation.
    pub hub_cas: Vec<Vec<u8>>,
    pub enrollment_token: Option<String>,
    pub state_dir: PathBuf,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// QUIC idle timeout (a backstop; heartbeats detect loss sooner).
    pub idle_timeout: Duration,
    /// The longest quiet before the agent sends its hub a packet (a QUIC keep-alive), so a
    /// dead replica is noticed within it; `None` leaves it to the heartbeats.
    pub keep_alive: Option<Duration>,
    /// The user terminal sessions run as when the agent is root.
    pub run_as: Option<String>,
    /// How long a terminal session may stay detached.
    pub detached_ttl: Duration,
    /// Bytes of output each terminal session keeps for replay.
    pub ring_bytes: usize,
    /// Which listening ports to report.
    pub ports: protocol::bootstrap::PortScope,
}

/// Accepted terminal ring sizes.
pub const RING_BYTES: std::ops::RangeInclusive<u64> = (64 << 10)..=(256 << 20);

/// A plain Unix user name: `[a-z_][a-z0-9_-]*`, at most 32 characters.
fn valid_user(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
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
        let hub_cas = link::parse_ca_bundle(&b.ca_pem)
            .map_err(|e| AgentError::Config(format!("ca_pem: {e}")))?;
        if b.state_dir.is_empty() {
            return Err(bad("state_dir must not be empty"));
        }
        if b.user.as_deref().is_some_and(|u| !valid_user(u)) {
            return Err(bad("user must be a plain Unix user name"));
        }
        let detached_ttl = match b.detached_session_ttl_secs {
            Some(0) => return Err(bad("detached_session_ttl_secs must be positive")),
            Some(secs) => Duration::from_secs(secs),
            None => crate::pty::DEFAULT_DETACHED_TTL,
        };
        let ring_bytes = match b.terminal_ring_bytes {
            Some(n) if !RING_BYTES.contains(&n) => {
                return Err(bad(
                    "terminal_ring_bytes must be between 64 KiB and 256 MiB",
                ));
            }
            Some(n) => n as usize,
            None => crate::pty::DEFAULT_RING,
        };
        Ok(Self {
            hub_addr: b.hub_addr,
            server_name: b.server_name,
            hub_cas,
            enrollment_token: b.enrollment_token.filter(|t| !t.is_empty()),
            state_dir: PathBuf::from(b.state_dir),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Some(link::AGENT_KEEP_ALIVE),
            run_as: b.user,
            detached_ttl,
            ring_bytes,
            ports: b.ports.unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBeDCCAR6gAwIBAgIUJ3n0eXtqXy0nW9cK7i5Z5Yc6d8YwCgYIKoZIzj0EAwIw\n-----END CERTIFICATE-----\n";

    fn bootstrap(user: Option<&str>, ttl: Option<u64>) -> AgentBootstrap {
        AgentBootstrap {
            hub_addr: "127.0.0.1:7443".into(),
            server_name: "localhost".into(),
            ca_pem: CA.into(),
            enrollment_token: None,
            state_dir: "/tmp/x".into(),
            user: user.map(str::to_owned),
            detached_session_ttl_secs: ttl,
            terminal_ring_bytes: None,
            ports: None,
        }
    }

    #[test]
    fn user_names_and_ttls_are_validated() {
        assert!(AgentConfig::from_bootstrap(bootstrap(Some("dev"), Some(60))).is_ok());
        for bad in ["root; rm -rf /", "-l", "", "Dev", "a b"] {
            assert!(
                AgentConfig::from_bootstrap(bootstrap(Some(bad), None)).is_err(),
                "{bad}"
            );
        }
        assert!(AgentConfig::from_bootstrap(bootstrap(None, Some(0))).is_err());
        let cfg = AgentConfig::from_bootstrap(bootstrap(None, None)).unwrap();
        assert_eq!(cfg.detached_ttl, crate::pty::DEFAULT_DETACHED_TTL);
        assert_eq!(cfg.ring_bytes, crate::pty::DEFAULT_RING);
        for (ring, ok) in [(1, false), (64 << 10, true), (1 << 30, false)] {
            let mut b = bootstrap(None, None);
            b.terminal_ring_bytes = Some(ring);
            assert_eq!(AgentConfig::from_bootstrap(b).is_ok(), ok, "{ring}");
        }
    }
}
