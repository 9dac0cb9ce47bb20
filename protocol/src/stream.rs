//! The typed header that opens every QUIC stream, and the opener's verdict on it.

use serde::{Deserialize, Serialize};

crate::tagged_messages! {
    /// The first frame on every bidirectional stream, written by whoever opens it.
    pub enum StreamHeader {
        /// Agent -> hub: the agent's control stream (hello, heartbeats, events).
        1 => Control(ControlOpen),
        /// Agent -> hub, before the agent holds a certificate: trade a token for one.
        2 => Enroll(EnrollOpen),
        /// Hub -> agent: attach to (or create) a PTY session, or list sessions.
        3 => Pty(PtyOpen),
        /// Hub -> agent: splice this stream to a TCP port inside the workspace.
        4 => TcpForward(TcpForwardOpen),
        /// Hub -> agent: a file-sync session rooted at a folder.
        5 => Sync(SyncOpen),
        /// CLI -> hub: a PTY stream on a workspace. The hub opens a [`StreamHeader::Pty`]
        /// stream to the workspace's agent and splices the two byte for byte; the agent's
        /// reply and messages flow back unchanged.
        6 => ClientPty(ClientPtyOpen),
        /// CLI -> hub (version 3+): a TCP forward to a port of a workspace. The hub opens
        /// a [`StreamHeader::TcpForward`] stream to the agent and splices the two; after
        /// the agent's [`StreamReply`], the stream carries the connection's raw bytes.
        7 => ClientTcpForward(ClientTcpForwardOpen),
        /// CLI -> hub: a sync session on a folder of a workspace. The hub opens a
        /// [`StreamHeader::Sync`] stream to the agent and splices the two.
        8 => ClientSync(ClientSyncOpen),
        /// Replica -> replica (ALPN `wsh-peer/1`): a stream to the agent of a workspace
        /// the receiver holds. The receiver opens a stream to that agent and splices the
        /// two byte for byte, so what follows this header (the opener's own header to the
        /// agent, and everything after) reaches the agent unchanged; there is no reply of
        /// its own. If it no longer holds that connection it answers
        /// [`StreamReply::Refused`] with `Unavailable`, which the opener reads as the
        /// agent's answer.
        9 => PeerAgent(PeerAgentOpen),
        /// Replica -> replica: the opener's workspace events, as
        /// [`PeerMsg`](crate::peer::PeerMsg)s, for the receiver's subscribers. No reply.
        10 => PeerEvents(PeerEventsOpen),
        /// Replica -> replica: what the receiver knows of the agents it holds among these
        /// workspaces. It answers one [`PeerMsg::AgentViews`](crate::peer::PeerMsg) and
        /// finishes the stream.
        11 => PeerAgentViews(PeerAgentViewsOpen),
        /// CLI -> hub (version 5+): a direct session on a workspace
        /// ([`crate::direct`]). The hub answers [`StreamReply::Accepted`] and a
        /// [`DirectMsg::Offer`](crate::direct::DirectMsg), or a refusal.
        12 => ClientDirect(ClientDirectOpen),
        /// Hub -> agent (version 5+): a client at these addresses is about to connect
        /// directly; send packets towards them from the socket that dials the hub (so the
        /// agent's NAT lets the client's packets in), and answer [`StreamReply::Accepted`]
        /// and [`DirectMsg::Candidates`](crate::direct::DirectMsg).
        13 => Direct(DirectOpen),
        /// Hub or direct client -> agent (version 6+): a resumable TCP forward
        /// ([`crate::forward`]). The agent answers [`StreamReply::Forwarding`] (or a
        /// refusal, [`StreamRefusal::Gone`] for a resume it cannot honour), then raw bytes
        /// flow as on a [`StreamHeader::TcpForward`] stream.
        14 => Forward(ForwardOpen),
        /// CLI -> hub (version 6+): a resumable TCP forward through the hub, spliced to a
        /// [`StreamHeader::Forward`] stream to the agent.
        15 => ClientForward(ClientForwardOpen),
        /// Hub or direct client -> agent (version 6+): run one command without a terminal
        /// ([`crate::exec`]). The agent answers [`StreamReply::Accepted`]; `ExecMsg`s follow.
        16 => Exec(ExecOpen),
        /// CLI -> hub (version 6+): an exec stream on a workspace, spliced to an
        /// [`StreamHeader::Exec`] stream to the agent.
        17 => ClientExec(ClientExecOpen),
        /// Hub -> agent (version 6+): one file operation ([`crate::files`]). The agent
        /// answers [`StreamReply::Accepted`]; `FileMsg`s (and raw bytes) follow.
        18 => Files(FilesOpen),
        /// Hub -> agent (version 9+), after an `UpdateRequest`: the agent binary, exactly
        /// `size` raw bytes after the header ([`crate::update`]). No reply.
        19 => AgentUpdate(crate::update::AgentUpdateOpen),
    }
}

/// Opens a files stream; the first [`FileMsg`](crate::files::FileMsg) says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FilesOpen {}

/// Opens an exec stream; the first [`ExecMsg`](crate::exec::ExecMsg) says what to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecOpen {}

/// Opens an exec stream from the CLI through the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientExecOpen {
    pub workspace_id: String,
}

/// Opens a resumable TCP forward (or resumes one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardOpen {
    /// The port inside the workspace (loopback); 0 is refused. For a resume, the port the
    /// connection was opened to.
    pub port: u16,
    /// `None` for a new connection.
    pub resume: Option<crate::forward::Resume>,
}

/// Opens (or resumes) a resumable TCP forward through the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientForwardOpen {
    pub workspace_id: String,
    pub port: u16,
    pub resume: Option<crate::forward::Resume>,
}

/// Asks the hub for a direct session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientDirectOpen {
    pub workspace_id: String,
    /// A certificate signing request for the CLI's own key (at most 4 KiB).
    pub csr_der: Vec<u8>,
    /// The addresses the CLI knows for its socket (its local ones); the hub puts the one
    /// it sees first.
    pub candidates: crate::direct::Candidates,
}

impl std::fmt::Debug for ClientDirectOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientDirectOpen")
            .field("workspace_id", &self.workspace_id)
            .field("candidates", &self.candidates)
            .finish_non_exhaustive()
    }
}

/// Tells the agent where a direct client is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectOpen {
    pub client: crate::direct::Candidates,
}

/// At most this many workspaces per [`PeerAgentViewsOpen`].
pub const MAX_VIEW_IDS: usize = 1000;

/// Asks another replica about the agents of these workspaces (at most [`MAX_VIEW_IDS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerAgentViewsOpen {
    pub workspace_ids: Vec<String>,
}

/// Opens a stream of workspace events from one replica to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerEventsOpen {}

/// Opens a stream through the replica that holds a workspace's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAgentOpen {
    pub workspace_id: String,
    /// The epoch of the agent connection the opener's route names: a replica holding a
    /// different (older or newer) connection refuses, so a stale route never reaches
    /// another connection.
    pub epoch: i64,
}

/// Opens a TCP forward from the CLI through the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTcpForwardOpen {
    pub workspace_id: String,
    pub port: u16,
}

/// Opens a sync session from the CLI through the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSyncOpen {
    pub workspace_id: String,
    /// As [`SyncOpen::root`].
    pub root: String,
}

/// Opens a PTY stream from the CLI through the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientPtyOpen {
    pub workspace_id: String,
}

/// Opens the control stream. Carries nothing yet; the hello follows as the first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ControlOpen {}

/// Opens an enrollment stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EnrollOpen {}

/// Opens a PTY stream; the first [`PtyMsg`](crate::pty::PtyMsg) says what for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PtyOpen {}

/// Opens a TCP forward: the agent connects to the port on loopback (IPv4, then IPv6),
/// answers with a [`StreamReply`], and from then on the stream carries raw bytes each way;
/// finishing the stream half-closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpForwardOpen {
    /// The port inside the workspace (loopback); 0 is refused.
    pub port: u16,
}

/// Opens a sync session (`protocol::sync`): the agent answers `Accepted` (or
/// `Refused {BadHeader}` for a root that breaks the path rules), then [`SyncMsg`](crate::sync::SyncMsg)s flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOpen {
    /// The folder inside the workspace, relative to the workspace folder (the workspace
    /// user's home on VMs); created if missing. Checked like every sync path.
    pub root: String,
}

crate::tagged_messages! {
    /// The receiver's first frame in answer to a [`StreamHeader`].
    pub enum StreamReply {
        1 => Accepted(Accepted),
        2 => Refused(StreamRefused),
        /// The answer to a [`StreamHeader::Forward`] (version 6+): the connection is open
        /// (or picked up again); raw bytes follow.
        3 => Forwarding(Forwarding),
    }
}

/// A resumable forward is open on this stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarding {
    /// Names the connection for a later resume.
    pub token: crate::forward::ForwardToken,
    /// How many bytes of the connection the agent has taken from its streams so far (0 for
    /// a new one): the client sends again what follows.
    pub received: u64,
}

/// The stream is open; its own messages follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Accepted {}

/// The stream was refused and will be closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRefused {
    pub reason: StreamRefusal,
    /// Human-readable detail; never carries secrets.
    pub message: String,
}

/// Why a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamRefusal {
    /// The receiver does not implement this stream type (yet).
    Unsupported,
    /// The peer is not allowed to open this stream type (e.g. no client certificate).
    Unauthorized,
    /// The header was malformed or arrived out of place.
    BadHeader,
    /// The receiver is shutting down or overloaded.
    Unavailable,
    /// The workspace's agent is not here any more (it moved to another hub replica, or
    /// this replica is leaving): find it again, through a new connection for a client.
    Moved,
    /// (Version 6+.) The forwarded connection a resume names is gone: it ended, waited
    /// longer than its grace, or the resume asked for bytes no longer held.
    Gone,
}
