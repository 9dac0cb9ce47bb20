//! Messages on a PTY stream (opened by the hub towards the agent with
//! [`StreamHeader::Pty`](crate::stream::StreamHeader::Pty)).
//!
//! The client's first message is [`PtyMsg::Open`] (attach to a session, or create one) or
//! [`PtyMsg::List`]. Output carries absolute offsets: a client that reconnects with the
//! offset after the last byte it saw receives exactly the bytes after it.

use serde::{Deserialize, Serialize};

crate::tagged_messages! {
    /// Everything on a PTY stream, in both directions.
    pub enum PtyMsg {
        /// Client -> agent, first: attach to `session` (or create a new one).
        1 => Open(PtyOpenRequest),
        /// Agent -> client: attached; events follow.
        2 => Opened(PtyOpened),
        /// Client -> agent: keystrokes.
        3 => Input(PtyInput),
        /// Client -> agent: resize the session (last writer wins).
        4 => Resize(PtyResize),
        /// Agent -> client: output bytes starting at `offset`.
        5 => Output(PtyOutput),
        /// Agent -> client: the current screen as escape sequences, sent to fresh clients
        /// and to clients whose offset fell out of the ring; output resumes at `offset`.
        6 => Screen(PtyScreen),
        /// Agent -> client: the requested offset fell out of the ring.
        7 => Truncated(PtyTruncated),
        /// Agent -> client: the process exited; the stream ends.
        8 => Exit(PtyExit),
        /// Agent -> client: a request failed; the session (if any) keeps running.
        9 => Error(PtyError),
        /// Client -> agent: end the session's process.
        10 => Close(PtyClose),
        /// Client -> agent, first: list sessions instead of attaching.
        11 => List(PtyList),
        /// Agent -> client: the sessions; the stream ends.
        12 => Sessions(PtySessions),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PtyOpenRequest {
    /// The session to attach to; `None` creates one from the fields below. A name (1 to
    /// 64 of `A-Z a-z 0-9 . _ -`) without an offset attaches, or creates the session by
    /// that name (older agents answer `NoSuchSession`).
    pub session: Option<String>,
    /// The offset after the last byte this client saw; `None` for a fresh client.
    pub offset: Option<u64>,
    /// Program and arguments for a new session; empty means the login shell.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyOpened {
    pub session: String,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyInput {
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyResize {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyOutput {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyScreen {
    pub offset: u64,
    pub bytes: Vec<u8>,
    /// More screen bytes follow in another `Screen` message (large screens).
    pub more: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyTruncated {
    pub requested: u64,
    pub resumed_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyExit {
    pub code: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyError {
    pub code: PtyErrorCode,
    pub message: String,
}

/// Why a PTY request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PtyErrorCode {
    NoSuchSession,
    BadSize,
    Exited,
    SpawnFailed,
    BadRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PtyClose {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PtyList {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySessions {
    pub sessions: Vec<PtySessionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySessionInfo {
    pub id: String,
    pub command: String,
    pub cols: u16,
    pub rows: u16,
    pub created_at_ms: u64,
    pub end_offset: u64,
    pub exit: Option<i32>,
}
