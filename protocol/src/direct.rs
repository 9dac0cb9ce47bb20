//! Direct connections: a CLI reaches a workspace's agent in one hop (ALPN `wsh-direct/1`),
//! brokered by the hub.
//!
//! 1. The CLI asks the hub on its own connection ([`StreamHeader::ClientDirect`]): a CSR for a
//!    key of its own and the addresses it knows for itself.
//! 2. The hub checks ownership and policy, asks the agent to punch towards the CLI's
//!    candidates (its address as the hub sees it first) on a [`StreamHeader::Direct`]
//!    stream, and the agent answers with its own [`Candidates`].
//! 3. The hub answers the CLI with a [`DirectOffer`]: a short-lived client certificate
//!    signed by the hub CA whose subject alternative names carry the [`Credential`] (user,
//!    workspace, what it allows), and the agent's candidates.
//! 4. The CLI connects to every candidate at once from the socket the hub saw (so its NAT
//!    mapping is the one the agent punched towards); the first handshake wins. The agent
//!    serves the streams the credential allows, with the headers the hub would send it.
//!
//! [`StreamHeader::ClientDirect`]: crate::stream::StreamHeader::ClientDirect
//! [`StreamHeader::Direct`]: crate::stream::StreamHeader::Direct

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// At most this many candidate addresses travel per side.
pub const MAX_CANDIDATES: usize = 8;

/// How long a direct credential is valid. Connections made with it outlive it; a new
/// connection needs a new one.
pub const CREDENTIAL_VALIDITY_SECS: u64 = 600;

crate::tagged_messages! {
    /// Messages on direct-session brokering streams.
    pub enum DirectMsg {
        /// Agent -> hub, the answer to a `Direct` stream: where the agent can be reached.
        1 => Candidates(Candidates),
        /// Hub -> CLI, after `Accepted` on a `ClientDirect` stream: how to reach the agent.
        2 => Offer(DirectOffer),
    }
}

/// Candidate addresses (`ip:port`), most likely first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Candidates {
    pub addrs: Vec<String>,
}

impl Candidates {
    /// The addresses that parse, without duplicates, at most [`MAX_CANDIDATES`]; `None`
    /// if there are more than that (a peer that sends too many is broken or hostile).
    pub fn parse(&self) -> Option<Vec<SocketAddr>> {
        if self.addrs.len() > MAX_CANDIDATES {
            return None;
        }
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in &self.addrs {
            let addr: SocketAddr = a.parse().ok()?;
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return None;
            }
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        Some(out)
    }
}

/// What the hub hands the CLI for a direct session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectOffer {
    /// The client certificate (DER) for the key of the CLI's CSR, signed by the hub CA.
    pub cert_der: Vec<u8>,
    /// The name the agent's certificate carries ([`agent_server_name`]).
    pub server_name: String,
    /// The agent's candidates, most likely first.
    pub agent: Candidates,
}

impl std::fmt::Debug for DirectOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectOffer")
            .field("server_name", &self.server_name)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// What a direct connection may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// Terminal (PTY) streams.
    Pty,
    /// TCP forwards to the workspace's loopback ports.
    Forward,
    /// File sync sessions.
    Sync,
}

impl Purpose {
    pub const ALL: [Purpose; 3] = [Purpose::Pty, Purpose::Forward, Purpose::Sync];

    fn name(self) -> &'static str {
        match self {
            Purpose::Pty => "pty",
            Purpose::Forward => "forward",
            Purpose::Sync => "sync",
        }
    }
}

/// The name an agent's certificate carries for direct connections (a DNS name nobody
/// resolves: the client checks it, never looks it up).
pub fn agent_server_name(workspace_id: &str) -> String {
    format!("{workspace_id}.agent.wsh.invalid")
}

/// Who may do what on a direct connection: what the client certificate's URIs say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    pub workspace_id: String,
    pub purposes: Vec<Purpose>,
}

const URI_PREFIX: &str = "urn:wsh:direct:";

impl Credential {
    /// The certificate's subject alternative names (URIs, ASCII; the user percent-encoded).
    pub fn to_uris(&self) -> Vec<String> {
        let mut uris = vec![
            format!("{URI_PREFIX}workspace:{}", encode(&self.workspace_id)),
            format!("{URI_PREFIX}user:{}", encode(&self.user)),
        ];
        uris.extend(
            self.purposes
                .iter()
                .map(|p| format!("{URI_PREFIX}allow:{}", p.name())),
        );
        uris
    }

    /// The credential a certificate's URIs carry: exactly one workspace and one user, at
    /// least one purpose, nothing unknown under the prefix. Other URIs are ignored, so a
    /// certificate that is not a direct credential (an agent's, a replica's) has none.
    pub fn from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Option<Credential> {
        let (mut workspace, mut user, mut purposes) = (None, None, Vec::new());
        for uri in uris {
            let Some(rest) = uri.strip_prefix(URI_PREFIX) else {
                continue;
            };
            let (kind, value) = rest.split_once(':')?;
            let slot = match kind {
                "workspace" => &mut workspace,
                "user" => &mut user,
                "allow" => {
                    let p = Purpose::ALL.into_iter().find(|p| p.name() == value)?;
                    if !purposes.contains(&p) {
                        purposes.push(p);
                    }
                    continue;
                }
                _ => return None,
            };
            if slot.replace(decode(value)?).is_some() {
                return None;
            }
        }
        let (workspace_id, user) = (workspace?, user?);
        (!purposes.is_empty() && !workspace_id.is_empty() && !user.is_empty()).then_some(
            Credential {
                user,
                workspace_id,
                purposes,
            },
        )
    }

    pub fn allows(&self, purpose: Purpose) -> bool {
        self.purposes.contains(&purpose)
    }
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_through_uris() {
        let c = Credential {
            user: "ana@example.com/ü %".into(),
            workspace_id: "0b7d".into(),
            purposes: vec![Purpose::Pty, Purpose::Sync],
        };
        let uris = c.to_uris();
        assert!(uris.iter().all(|u| u.is_ascii() && !u.contains(' ')));
        let back = Credential::from_uris(uris.iter().map(String::as_str)).unwrap();
        assert_eq!(back, c);
        assert!(back.allows(Purpose::Pty) && !back.allows(Purpose::Forward));
    }

    #[test]
    fn malformed_credentials_are_none() {
        let ok = |extra: &[&str]| {
            let mut uris = vec![
                "urn:wsh:direct:workspace:w",
                "urn:wsh:direct:user:u",
                "urn:wsh:direct:allow:pty",
            ];
            uris.extend(extra);
            Credential::from_uris(uris)
        };
        assert!(ok(&[]).is_some());
        assert!(ok(&["https://example.com"]).is_some(), "other URIs ignored");
        assert!(
            ok(&["urn:wsh:direct:workspace:v"]).is_none(),
            "two workspaces"
        );
        assert!(
            ok(&["urn:wsh:direct:allow:root"]).is_none(),
            "unknown purpose"
        );
        assert!(ok(&["urn:wsh:direct:admin:yes"]).is_none(), "unknown kind");
        assert!(ok(&["urn:wsh:direct:user:%G1"]).is_none(), "bad escape");
        assert!(Credential::from_uris(["urn:wsh:direct:workspace:w"]).is_none());
        assert!(
            Credential::from_uris(["urn:wsh:direct:workspace:w", "urn:wsh:direct:user:u"])
                .is_none(),
            "no purpose"
        );
        assert!(Credential::from_uris(Vec::<&str>::new()).is_none());
    }

    #[test]
    fn candidates_are_checked() {
        let c = |a: &[&str]| {
            Candidates {
                addrs: a.iter().map(|s| s.to_string()).collect(),
            }
            .parse()
        };
        assert_eq!(
            c(&["10.0.0.1:5", "[::1]:6", "10.0.0.1:5"]).unwrap().len(),
            2
        );
        assert!(c(&["10.0.0.1"]).is_none());
        assert!(c(&["0.0.0.0:5"]).is_none());
        assert!(c(&["10.0.0.1:0"]).is_none());
        assert!(c(&["224.0.0.1:5"]).is_none());
        assert!(c(&["1.1.1.1:1"; 9]).is_none());
        assert_eq!(c(&[]).unwrap(), vec![]);
    }
}
