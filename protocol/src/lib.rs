//! The Workspace Hub wire protocol, with no IO.
//!
//! Everything that crosses the agent–hub and client–hub QUIC connections is defined here:
//! the tagged messages ([`message`]), length-delimited framing with a hard size limit
//! ([`frame`]), the stream header that opens every stream ([`stream`]), the version
//! handshake ([`handshake`]), enrollment ([`enroll`]), and the two small state machines the
//! drivers run: heartbeat liveness ([`liveness`]) and reconnect backoff ([`backoff`]).
//!
//! This crate knows nothing of tokio, quinn or sockets. Time comes in as an argument
//! (`now: Instant`) and randomness as a number, so every rule is testable with plain calls.
//! `PROTOCOL.md` beside this crate documents each message and the version rules.

pub mod backoff;
pub mod bootstrap;
pub mod client;
pub mod close;
pub mod control;
pub mod direct;
pub mod enroll;
pub mod error;
pub mod exec;
pub mod files;
pub mod forward;
pub mod frame;
pub mod handshake;
pub mod liveness;
pub mod message;
pub mod peer;
pub mod pty;
pub mod stream;
pub mod sync;
pub mod update;

pub use error::ProtocolError;
pub use frame::{FrameDecoder, MAX_FRAME_LEN, encode_frame};
pub use message::Message;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 9;

/// The first version with [`control::Activity`] reports.
pub const ACTIVITY_SINCE_VERSION: u16 = 2;

/// The first version with port reports ([`control::Ports`], [`control::PortOpened`],
/// [`control::PortClosed`]) and TCP forward streams.
pub const PORTS_SINCE_VERSION: u16 = 3;

/// The first version with [`control::Move`]: a leaving hub replica moves its agents.
pub const MOVE_SINCE_VERSION: u16 = 4;

/// The first version with direct connections: [`control::Observed`] and
/// [`stream::StreamHeader::Direct`] towards agents, `ClientDirect` from clients.
pub const DIRECT_SINCE_VERSION: u16 = 5;

/// The first version with resumable forwards ([`stream::StreamHeader::Forward`] and
/// `ClientForward`, [`stream::StreamReply::Forwarding`]). A CLI opens them without knowing
/// the agent's version: an older hub or agent refuses the unknown header (`BadHeader`),
/// and the CLI falls back to a plain `TcpForward`.
pub const RESUME_SINCE_VERSION: u16 = 6;

/// The first version with workspace setup: [`control::Profile`] (SSH keys, dotfiles)
/// towards agents and [`control::SetupReport`] from them.
pub const SETUP_SINCE_VERSION: u16 = 7;

/// The first version with [`control::SyncSessions`] reports from agents.
pub const SYNC_STATUS_SINCE_VERSION: u16 = 8;

/// The first version with agent updates: [`control::ControlMsg::UpdateOffer`] towards
/// agents, `UpdateRequest` and `UpdateStatus` from them, and
/// [`stream::StreamHeader::AgentUpdate`] carrying the binary ([`update`]).
pub const UPDATE_SINCE_VERSION: u16 = 9;

/// The oldest protocol version this build still accepts from a peer (N-1).
pub const MIN_PROTOCOL_VERSION: u16 = if PROTOCOL_VERSION > 1 {
    PROTOCOL_VERSION - 1
} else {
    1
};

/// ALPN for agent connections (agent -> hub).
pub const ALPN_AGENT: &[u8] = b"wsh-agent/1";

/// ALPN for client connections (CLI -> hub).
pub const ALPN_CLIENT: &[u8] = b"wsh-client/1";

/// ALPN for connections between replicas of one hub (mutual TLS, replica certificates).
pub const ALPN_PEER: &[u8] = b"wsh-peer/1";

/// ALPN for direct connections (CLI -> agent, mutual TLS with a direct credential).
pub const ALPN_DIRECT: &[u8] = b"wsh-direct/1";
