//! The CLI's connection to the hub (ALPN `wsh-client/1`): the first stream authenticates
//! with the user's API token; later streams open PTY (and, later, forward and sync)
//! sessions on a workspace, which the hub splices byte for byte to the workspace's agent.

use serde::{Deserialize, Serialize};

crate::tagged_messages! {
    /// Messages on the client's first (authentication) stream.
    pub enum ClientMsg {
        /// CLI -> hub: who is calling.
        1 => Hello(ClientHello),
        /// Hub -> CLI: accepted.
        2 => Welcome(ClientWelcome),
        /// Hub -> CLI: refused; the hub closes the connection.
        3 => Refused(ClientRefused),
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    pub protocol_version: u16,
    /// The user's API token. Never logged.
    pub token: String,
}

impl std::fmt::Debug for ClientHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHello")
            .field("protocol_version", &self.protocol_version)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientWelcome {
    pub protocol_version: u16,
    pub owner_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRefused {
    pub reason: ClientRefusal,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRefusal {
    Unauthenticated,
    VersionUnsupported,
}
