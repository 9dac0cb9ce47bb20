//! The agent's bootstrap config: what cloud-init (or the process provider) writes for the
//! agent to find its hub. Rendered by the hub, read by the agent (TOML).

use serde::{Deserialize, Serialize};

/// The agent's config file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentBootstrap {
    /// The hub's QUIC address, `host:port`.
    pub hub_addr: String,
    /// The name the hub's certificate is checked against.
    pub server_name: String,
    /// The hub CA certificate (PEM) the agent pins; system roots are never used.
    pub ca_pem: String,
    /// The single-use enrollment token; absent once the agent holds a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<String>,
    /// Where the agent keeps its key and certificate.
    pub state_dir: String,
    /// The workspace user terminal sessions run as when the agent runs as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Seconds a terminal session may stay detached before it is ended (default 8 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_session_ttl_secs: Option<u64>,
    /// Bytes of output each terminal session keeps for replay (default 4 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal_ring_bytes: Option<u64>,
    /// Which listening ports the agent reports (default: all but its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortScope>,
}

/// Which listening TCP ports are the workspace's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PortScope {
    /// Every listening socket on the machine but the agent's own (a VM is the workspace).
    #[default]
    All,
    /// Only sockets of the agent's descendants (the agent shares a machine).
    Descendants,
    /// No port watching.
    Off,
}

impl std::fmt::Debug for AgentBootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBootstrap")
            .field("hub_addr", &self.hub_addr)
            .field("server_name", &self.server_name)
            .field(
                "enrollment_token",
                &self.enrollment_token.as_ref().map(|_| "<redacted>"),
            )
            .field("state_dir", &self.state_dir)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}
