//! Enrollment: an agent trades a single-use token for a client certificate.

use serde::{Deserialize, Serialize};

crate::tagged_messages! {
    /// Messages on an enrollment stream.
    pub enum EnrollMsg {
        /// Agent -> hub: the token and a certificate signing request for the agent's own key.
        1 => Request(EnrollRequest),
        /// Hub -> agent: the certificate, signed by the hub CA.
        2 => Issued(Issued),
        /// Hub -> agent: refused, with the reason.
        3 => Refused(EnrollRefused),
    }
}

/// The agent asks for a certificate.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub protocol_version: u16,
    pub agent_version: String,
    /// The single-use enrollment token from the agent's config. Never logged.
    pub token: String,
    /// A PKCS#10 request (DER) for the key the agent generated and keeps.
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("protocol_version", &self.protocol_version)
            .field("agent_version", &self.agent_version)
            .field("token", &"<redacted>")
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .finish()
    }
}

/// The certificate the hub issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The workspace this agent serves (also in the certificate's subject).
    pub workspace_id: String,
    /// The agent's certificate (DER), signed by the hub CA.
    pub cert_der: Vec<u8>,
}

/// Enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRefused {
    pub reason: EnrollRefusal,
    pub message: String,
}

/// Why enrollment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollRefusal {
    /// No such token was ever issued.
    UnknownToken,
    /// The token was already used once.
    TokenUsed,
    /// The token's time to live has passed.
    TokenExpired,
    /// The request was malformed (bad CSR, unsupported key).
    BadRequest,
    /// The agent's protocol version is not accepted.
    VersionUnsupported,
    /// The hub could not complete enrollment; try again later.
    Unavailable,
}

impl EnrollRefusal {
    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, EnrollRefusal::Unavailable)
    }
}
