//! What the hub knows about a connected agent, as the API and idle clean-up see it.

use serde::Serialize;

/// What the hub knows about a connected agent.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentInfo {
    pub connected_since: i64,
    pub agent_version: String,
    pub hostname: String,
    pub protocol_version: u16,
    pub remote_addr: String,
    /// Clients attached to the agent's terminal sessions (from its last activity report).
    pub attached_clients: u32,
    /// When the agent last saw terminal input, in the hub's clock (Unix ms).
    pub last_input_at: Option<i64>,
    /// The repository checkout, as the agent last reported it.
    pub checkout: Option<CheckoutView>,
    /// Dotfiles and the dev container, as the agent last reported them (protocol 7+).
    pub setup: Option<SetupView>,
    /// CLIs connected to the agent directly (one hop, not through the hub), as it last
    /// reported them.
    pub direct_clients: Vec<DirectClientView>,
    /// The file-sync sessions the agent serves, as it last reported them (protocol 8+).
    pub sync_sessions: Vec<SyncSessionView>,
    /// What the agent process costs its machine, as it last reported (protocol 8+).
    pub stats: Option<AgentStatsView>,
}

/// The agent process's own figures, as it last reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AgentStatsView {
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// CPU time used since the agent started (user and system), ms.
    pub cpu_ms: u64,
    /// Terminal sessions it keeps.
    pub sessions: u32,
    /// When the report came, in the hub's clock (Unix ms).
    pub at: i64,
}

/// A file-sync session the agent serves (`wsh sync`), as it last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SyncSessionView {
    /// The synced folder in the workspace, relative to the user's home.
    pub root: String,
    /// The client came straight to the agent (a direct connection), not through the hub.
    pub direct: bool,
    /// Unix milliseconds, in the agent's clock.
    pub started_at: i64,
    /// Files written in the workspace from the client, and sent to the client.
    pub files_received: u64,
    pub files_sent: u64,
    /// Bytes on the sync stream, each way, as the agent counts them.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// When a file last moved either way (Unix milliseconds, the agent's clock).
    pub last_transfer_at: Option<i64>,
    /// Whether the agent watches the folder for changes (else it rescans every 10 s).
    pub watching: bool,
    /// The latest notice the client got (entries not synced, the watch limit).
    pub notice: Option<String>,
}

impl SyncSessionView {
    /// The agent's report, bounded (entries, lengths, control characters).
    pub fn from_report(report: &protocol::control::SyncSessions) -> Vec<Self> {
        protocol::control::SyncSessions::bounded(&report.sessions)
            .sessions
            .into_iter()
            .map(|s| Self {
                root: s.root,
                direct: s.direct,
                started_at: s.started_at,
                files_received: s.files_received,
                files_sent: s.files_sent,
                bytes_received: s.bytes_received,
                bytes_sent: s.bytes_sent,
                last_transfer_at: s.last_transfer_at,
                watching: s.watching,
                notice: s.notice,
            })
            .collect()
    }
}

/// A CLI connected to the agent directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DirectClientView {
    /// The user its credential names.
    pub user: String,
    /// Where it connects from, as the agent sees it.
    pub address: String,
    /// When it connected, in the hub's clock (Unix ms).
    pub connected_at: i64,
}

impl DirectClientView {
    /// The agent's report, bounded (entries, lengths), in the hub's clock.
    pub fn from_report(report: &protocol::control::DirectClients, now: i64) -> Vec<Self> {
        report
            .clients
            .iter()
            .take(protocol::control::MAX_DIRECT_CLIENTS)
            .map(|c| Self {
                user: c.user.chars().take(256).collect(),
                address: c.addr.chars().take(64).collect(),
                connected_at: now
                    .saturating_sub(i64::try_from(c.connected_ago_ms).unwrap_or(i64::MAX)),
            })
            .collect()
    }
}

/// A repository checkout's state, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CheckoutView {
    /// `cloning`, `done` or `failed`.
    pub state: &'static str,
    pub message: String,
    pub path: String,
}

impl From<&protocol::control::CheckoutStatus> for CheckoutView {
    fn from(s: &protocol::control::CheckoutStatus) -> Self {
        use protocol::control::CheckoutState;
        Self {
            state: match s.state {
                CheckoutState::Cloning => "cloning",
                CheckoutState::Done => "done",
                CheckoutState::Failed => "failed",
            },
            message: s.message.chars().take(1024).collect(),
            path: s.path.chars().take(4096).collect(),
        }
    }
}

/// A workspace's setup (dotfiles, dev container), as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SetupView {
    /// In the order they run: `dotfiles`, `devcontainer.json`, `onCreateCommand`,
    /// `updateContentCommand`, `postCreateCommand`, `postStartCommand`,
    /// `postAttachCommand` (those that apply), and `ssh keys` if they could not be written.
    pub steps: Vec<SetupStepView>,
    /// Dev container settings not applied here, and why.
    pub not_applied: Vec<NotAppliedView>,
}

/// One setup step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SetupStepView {
    pub name: String,
    /// `pending`, `running`, `done`, `failed` or `skipped`.
    pub state: &'static str,
    /// Progress, or the error with the command's last output lines.
    pub message: String,
}

/// A dev container setting not applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct NotAppliedView {
    pub field: String,
    pub reason: String,
}

impl From<&protocol::control::SetupReport> for SetupView {
    fn from(r: &protocol::control::SetupReport) -> Self {
        use protocol::control::{MAX_SETUP_ITEMS, StepState};
        let cut = |s: &str, n: usize| s.chars().filter(|c| !c.is_control()).take(n).collect();
        Self {
            steps: r
                .steps
                .iter()
                .take(MAX_SETUP_ITEMS)
                .map(|s| SetupStepView {
                    name: cut(&s.name, 64),
                    state: match s.state {
                        StepState::Pending => "pending",
                        StepState::Running => "running",
                        StepState::Done => "done",
                        StepState::Failed => "failed",
                        StepState::Skipped => "skipped",
                    },
                    message: cut(&s.message, 1024),
                })
                .collect(),
            not_applied: r
                .not_applied
                .iter()
                .take(MAX_SETUP_ITEMS)
                .map(|n| NotAppliedView {
                    field: cut(&n.field, 128),
                    reason: cut(&n.reason, 256),
                })
                .collect(),
        }
    }
}

impl AgentInfo {
    /// The last moment of use this report shows: now while clients are attached.
    pub fn active_at(&self, now: i64) -> Option<i64> {
        if self.attached_clients > 0 {
            Some(now)
        } else {
            self.last_input_at
        }
    }
}
