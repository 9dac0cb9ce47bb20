//! Messages on the agent's control stream.

use serde::{Deserialize, Serialize};

crate::tagged_messages! {
    /// Everything that travels on the control stream, in both directions.
    pub enum ControlMsg {
        /// Agent -> hub, first message: who and which version.
        1 => Hello(Hello),
        /// Hub -> agent: the hello was accepted; liveness parameters follow.
        2 => Welcome(Welcome),
        /// Hub -> agent: the hello was refused; the hub closes the connection.
        3 => HelloRefused(HelloRefused),
        /// Either way: a heartbeat; the receiver answers with [`Pong`].
        4 => Ping(Ping),
        /// Either way: the answer to a [`Ping`] with the same sequence number.
        5 => Pong(Pong),
        /// Agent -> hub (protocol 2 and later): what the agent counts as use of the
        /// workspace, sent when it changes. Idle clean-up decides from this, never by guessing.
        6 => Activity(Activity),
        /// Hub -> agent (version 2+): clone the workspace's repository (first boot).
        7 => Checkout(Checkout),
        /// Agent -> hub (version 2+): how the checkout is going; sent on every change and
        /// again after each reconnect.
        8 => CheckoutStatus(CheckoutStatus),
        /// Agent -> hub (version 3+): every listening port, after each (re)connect.
        9 => Ports(Ports),
        /// Agent -> hub (version 3+): a port started listening, or what is known about it
        /// changed (its HTTP probe finished).
        10 => PortOpened(PortInfo),
        /// Agent -> hub (version 3+): nothing listens on this port any more.
        11 => PortClosed(PortClosed),
        /// Hub -> agent (version 4+): this hub replica is leaving. Connect again now
        /// (through the load balancer, from a new UDP port, so it picks again); the
        /// streams already open on this connection go on until they end, then the agent
        /// closes it, or until the hub closes it at the end of its drain time.
        12 => Move(Move),
        /// Hub -> agent (version 5+), after the welcome: the agent's address as the hub
        /// sees it (its NAT's mapping), the first candidate it offers direct clients.
        13 => Observed(Observed),
        /// Agent -> hub (version 5+): the direct clients connected right now (the whole
        /// list, at most [`MAX_DIRECT_CLIENTS`]), on every change and after each reconnect.
        14 => DirectClients(DirectClients),
        /// Hub -> agent (version 7+): what the workspace's owner set up for all their
        /// workspaces (SSH public keys, dotfiles), after the welcome and on every change.
        15 => Profile(Profile),
        /// Agent -> hub (version 7+): how the workspace's own setup goes (dotfiles, the
        /// dev container's lifecycle commands, its port labels); the whole report on every
        /// change and again after each reconnect.
        16 => Setup(SetupReport),
        /// Agent -> hub (version 8+): the file-sync sessions open on the agent right now
        /// (the whole list, at most [`MAX_SYNC_SESSIONS`]), when it changes (at most about
        /// once a second while files move) and after each reconnect.
        17 => SyncSessions(SyncSessions),
        /// Agent -> hub (version 8+): what the agent process costs its machine, every
        /// [`AGENT_STATS_INTERVAL_SECS`] seconds.
        18 => AgentStats(AgentStats),
        /// Hub -> agent (version 9+), after the welcome: a newer agent binary is available
        /// ([`crate::update`]).
        19 => UpdateOffer(crate::update::UpdateOffer),
        /// Agent -> hub (version 9+): send the offered binary now.
        20 => UpdateRequest(crate::update::UpdateRequest),
        /// Agent -> hub (version 9+): what became of an offer.
        21 => UpdateStatus(crate::update::UpdateStatus),
    }
}

/// How often an agent reports [`AgentStats`].
pub const AGENT_STATS_INTERVAL_SECS: u64 = 10;

/// See [`ControlMsg::AgentStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AgentStats {
    /// Resident memory of the agent process, bytes.
    pub rss_bytes: u64,
    /// CPU time the agent process has used since it started (user and system), ms.
    pub cpu_ms: u64,
    /// Terminal sessions it keeps (attached or not).
    pub sessions: u32,
}

/// At most this many sessions in a [`SyncSessions`] report.
pub const MAX_SYNC_SESSIONS: usize = 32;
/// The most bytes of a [`SyncSession`]'s root and of its notice a report carries (with
/// [`MAX_SYNC_SESSIONS`], a report stays well inside a control frame).
pub const MAX_SYNC_ROOT_BYTES: usize = 1024;
pub const MAX_SYNC_NOTICE_BYTES: usize = 512;

/// See [`ControlMsg::SyncSessions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SyncSessions {
    pub sessions: Vec<SyncSession>,
}

impl SyncSessions {
    /// A report of `sessions`, bounded: the first [`MAX_SYNC_SESSIONS`], roots and notices
    /// cut to their limits (at a character boundary), control characters dropped. The hub applies the same bounds to
    /// what it receives.
    pub fn bounded<'a>(sessions: impl IntoIterator<Item = &'a SyncSession>) -> Self {
        let cut = |s: &str, max: usize| {
            let mut out = String::new();
            for c in s.chars().filter(|c| !c.is_control()) {
                if out.len() + c.len_utf8() > max {
                    break;
                }
                out.push(c);
            }
            out
        };
        Self {
            sessions: sessions
                .into_iter()
                .take(MAX_SYNC_SESSIONS)
                .map(|s| SyncSession {
                    root: cut(&s.root, MAX_SYNC_ROOT_BYTES),
                    notice: s.notice.as_deref().map(|n| cut(n, MAX_SYNC_NOTICE_BYTES)),
                    ..s.clone()
                })
                .collect(),
        }
    }
}

/// One file-sync session as the agent serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSession {
    /// The synced folder as the client named it (relative to the workspace user's home).
    pub root: String,
    /// Whether the client came straight to the agent (a direct connection) or through the
    /// hub.
    pub direct: bool,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Files written here from the client, and sent from here to it.
    pub files_received: u64,
    pub files_sent: u64,
    /// Bytes on the sync stream, each way.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// When a file last moved either way (Unix milliseconds), if one has.
    pub last_transfer_at: Option<i64>,
    /// Whether file events are watched (else changes are found by periodic rescans).
    pub watching: bool,
    /// The latest notice the client was given (entries skipped, the watch limit), if any.
    pub notice: Option<String>,
}

/// At most this many keys in a [`Profile`].
pub const MAX_AUTHORIZED_KEYS: usize = 64;
/// The key types a [`Profile`]'s keys may have (OpenSSH names; DSA is not among them).
pub const KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];
/// At most this many steps, port labels and fields not applied in a [`SetupReport`].
pub const MAX_SETUP_ITEMS: usize = 64;

/// See [`ControlMsg::Profile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Profile {
    /// OpenSSH public key lines (`type base64 [comment]`), checked by the hub; the agent
    /// keeps them in the workspace user's `~/.ssh/authorized_keys` (its own block there).
    pub authorized_keys: Vec<String>,
    /// Cloned and installed once, on the workspace's first boot.
    pub dotfiles: Option<Dotfiles>,
}

/// A dotfiles repository and how to install it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dotfiles {
    /// A git URL (the same forms as a workspace's repository).
    pub repo: String,
    /// A shell command run in the clone; `None` runs the first of the usual install
    /// scripts there (`install.sh`, `bootstrap.sh`, ...), or links the dotfiles into the
    /// home folder when there is none.
    pub install_command: Option<String>,
}

/// See [`ControlMsg::Setup`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SetupReport {
    /// In the order they run (each at most [`MAX_SETUP_ITEMS`]).
    pub steps: Vec<SetupStep>,
    /// Labels for ports (`forwardPorts` and `portsAttributes` of a dev container).
    pub port_labels: Vec<PortLabel>,
    /// Settings of the dev container this agent does not apply (those that need a
    /// container runtime), each with the reason.
    pub not_applied: Vec<NotApplied>,
}

/// One step of a workspace's setup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupStep {
    /// `dotfiles`, `onCreateCommand`, `postStartCommand`, ...
    pub name: String,
    pub state: StepState,
    /// Progress or the error, for people (e.g. the last lines the command printed).
    pub message: String,
}

/// Where a setup step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
    /// Not run this time (e.g. a once-only command done on an earlier boot).
    Skipped,
}

/// A port's label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortLabel {
    pub port: u16,
    pub label: String,
}

/// A setting not applied, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotApplied {
    pub field: String,
    pub reason: String,
}

/// At most this many entries in a [`DirectClients`] report.
pub const MAX_DIRECT_CLIENTS: usize = 64;

/// See [`ControlMsg::DirectClients`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DirectClients {
    pub clients: Vec<DirectClient>,
}

/// One direct client of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectClient {
    /// The user its credential names.
    pub user: String,
    /// Where it connects from (`ip:port`, as the agent sees it).
    pub addr: String,
    /// How long ago it connected, in milliseconds (the agent's clock).
    pub connected_ago_ms: u64,
}

/// See [`ControlMsg::Observed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// `ip:port`.
    pub addr: String,
}

/// See [`ControlMsg::Move`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Move {
    /// How long the hub keeps this connection open for its streams, in milliseconds.
    pub drain_ms: u64,
}

/// How the agent finds listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortSource {
    /// Netlink `sock_diag` dumps.
    SockDiag,
    /// `/proc/net/tcp` and `tcp6`, where netlink is not allowed (slower to read).
    ProcNet,
}

/// All listening TCP ports of the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub source: PortSource,
    pub ports: Vec<PortInfo>,
}

/// One listening TCP port (all its addresses together).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    pub port: u16,
    /// The addresses it listens on (`127.0.0.1`, `0.0.0.0`, `::`, ...).
    pub addresses: Vec<String>,
    /// Every address is a loopback address (reachable only from inside the workspace,
    /// and through the hub).
    pub loopback_only: bool,
    pub pid: Option<u32>,
    /// The process name (`comm`).
    pub process: String,
    /// The command line, shortened.
    pub command: String,
    /// Whether it answered an HTTP request; `None` until the probe is done.
    pub http: Option<bool>,
}

/// A port closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortClosed {
    pub port: u16,
}

/// The agent introduces itself. Its workspace comes from its certificate, not from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    /// The agent's build version (semver of the binary), for display and fleet views.
    pub agent_version: String,
    /// The machine's host name, for display.
    pub hostname: String,
}

/// The hub accepts the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides now speak (the lower of the two).
    pub protocol_version: u16,
    pub hub_version: String,
    /// How often the agent should ping when it has nothing else to send.
    pub heartbeat_interval_ms: u32,
    /// After this long without hearing from the hub, the agent reconnects.
    pub heartbeat_timeout_ms: u32,
}

/// The hub refuses the agent's hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloRefused {
    pub reason: HelloRefusal,
    pub message: String,
    /// The range of protocol versions the hub accepts.
    pub min_version: u16,
    pub max_version: u16,
}

/// Why a hello was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloRefusal {
    /// The agent's protocol version is older than the hub accepts.
    VersionTooOld,
    /// The agent's protocol version is newer than the hub knows.
    VersionTooNew,
    /// The agent's certificate names no workspace the hub knows, or was revoked.
    UnknownAgent,
}

/// A heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub seq: u64,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub seq: u64,
}

/// Use of the workspace as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// Clients attached to terminal sessions right now.
    pub attached_clients: u32,
    /// Milliseconds since the last terminal input, if there was any since the agent started.
    pub input_ago_ms: Option<u64>,
}

/// Clone `repo` at `branch` into the workspace. `token`, if any, authenticates HTTPS and is
/// kept only in the agent's memory for the clone.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    pub repo: String,
    pub branch: Option<String>,
    pub token: Option<String>,
}

impl std::fmt::Debug for Checkout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkout")
            .field("repo", &self.repo)
            .field("branch", &self.branch)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where a checkout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckoutState {
    Cloning,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutStatus {
    pub state: CheckoutState,
    /// Progress or the error, for people (the last line git printed).
    pub message: String,
    /// Where the repository is (or was to be) checked out.
    pub path: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_sync_report_fits_a_small_control_frame() {
        let worst = SyncSession {
            root: "\u{1b}[2Jé".repeat(4096),
            direct: true,
            started_at: i64::MAX,
            files_received: u64::MAX,
            files_sent: u64::MAX,
            bytes_received: u64::MAX,
            bytes_sent: u64::MAX,
            last_transfer_at: Some(i64::MAX),
            watching: true,
            notice: Some("\n€".repeat(10_000)),
        };
        let report = SyncSessions::bounded(&vec![worst; 100]);
        assert_eq!(report.sessions.len(), MAX_SYNC_SESSIONS);
        let first = &report.sessions[0];
        // "[2Jé" is 5 bytes: 204 of them and "[2J" fit in 1,024; "€" is 3: 170 in 512.
        assert_eq!(first.root, "[2Jé".repeat(204) + "[2J");
        assert_eq!(first.notice.as_deref(), Some("€".repeat(170).as_str()));
        // The hub reads control frames of at most 64 KiB.
        let frame = crate::encode_frame(&ControlMsg::SyncSessions(report)).unwrap();
        assert!(frame.len() < 64 * 1024, "{} bytes", frame.len());
    }
}
