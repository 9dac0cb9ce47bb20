//! Where workspaces run, behind one small trait.
//!
//! - [`process::ProcessProvider`]: the agent as a local child process in its own folder (the
//!   embedded default);
//! - [`manual::ManualProvider`]: nothing is started; the caller receives the agent's config
//!   and runs the agent wherever they like (their own VM, a benchmark).
//!
//! - [`gce::GceProvider`]: Compute Engine instances booted from the workspace image;
//! - [`qemu::QemuProvider`]: local VMs booted from the same image (cloud-init, the agent
//!   baked in), the cloud path on one machine.

pub mod cloudinit;
pub mod gce;
pub mod manual;
pub mod metered;
pub mod process;
pub mod qemu;

use async_trait::async_trait;
use protocol::bootstrap::AgentBootstrap;
use uuid::Uuid;

/// What a provider needs to create a workspace's machine.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub workspace_id: Uuid,
    /// Labelled on the instance, with the workspace id, so the reconciler can match it.
    pub owner_id: String,
    pub instance_name: String,
    pub zone: String,
    pub machine_type: String,
    pub image_tag: String,
    /// The agent's config, as cloud-init would write it.
    pub bootstrap: AgentBootstrap,
}

/// What a provider reports about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    Running,
    Suspended,
    Stopped,
    /// No such instance.
    Missing,
    /// The provider cannot see instances it does not run (manual).
    Unknown,
}

impl Observed {
    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Running => "RUNNING",
            Observed::Suspended => "SUSPENDED",
            Observed::Stopped => "STOPPED",
            Observed::Missing => "MISSING",
            Observed::Unknown => "UNKNOWN",
        }
    }
}

/// Which instance a call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub workspace_id: Uuid,
    pub instance_name: String,
    pub zone: String,
}

impl From<&crate::base::workspace::Workspace> for Target {
    fn from(ws: &crate::base::workspace::Workspace) -> Self {
        Self {
            workspace_id: ws.id,
            instance_name: ws.instance_name.clone(),
            zone: ws.zone.clone(),
        }
    }
}

/// An instance the provider runs that carries our workspace label.
#[derive(Debug, Clone)]
pub struct Instance {
    pub target: Target,
    pub observed: Observed,
}

/// The result of a create.
#[derive(Debug, Clone, Default)]
pub struct Created {
    /// For providers that start nothing themselves: the agent config to hand to the caller.
    pub agent_config: Option<String>,
}

/// Errors a caller branches on.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("instance not found")]
    NotFound,
    /// The cloud refused for lack of quota (CPUs, addresses, ...).
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The hub's service account may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Failed(String),
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// A short name for logs and `/version`.
    fn name(&self) -> &'static str;
    /// Whether agents share their machine with other programs (then they report only
    /// their own process tree's ports).
    fn shares_host(&self) -> bool {
        false
    }
    /// The user terminals run as, where the provider's image defines one.
    fn workspace_user(&self) -> Option<&'static str> {
        None
    }
    async fn create(&self, spec: &InstanceSpec) -> Result<Created, ProviderError>;
    /// Whether a create takes long enough (a cloud operation) that the API should answer
    /// before it finishes; the create then runs in the background.
    fn creates_slowly(&self) -> bool {
        false
    }
    /// Resumes a suspended instance, or boots a stopped one.
    async fn start(&self, target: &Target) -> Result<(), ProviderError>;
    /// Suspends the instance, keeping its state.
    async fn stop(&self, target: &Target) -> Result<(), ProviderError>;
    async fn delete(&self, target: &Target) -> Result<(), ProviderError>;
    async fn observe(&self, target: &Target) -> Result<Observed, ProviderError>;
    /// The last lines the machine logged while booting (the agent's log, a serial
    /// console), to say why an agent never connected. `None` when there is nothing to read.
    async fn boot_log(&self, _target: &Target) -> Option<String> {
        None
    }
    /// Every instance labelled as a workspace of this hub (for the reconciler).
    async fn list(&self) -> Result<Vec<Instance>, ProviderError>;
}

/// Renders the agent's config file (TOML).
pub fn render_agent_config(bootstrap: &AgentBootstrap) -> Result<String, ProviderError> {
    toml::to_string(bootstrap)
        .map_err(|e| ProviderError::Failed(format!("render agent config: {e}")))
}

/// The workspaces kept as folders named by their id under `root` (process and qemu).
fn workspace_folders(root: &std::path::Path) -> Result<Vec<Target>, ProviderError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ProviderError::Failed(format!(
                "list workspace folders: {e}"
            )));
        }
    };
    Ok(entries
        .flatten()
        .filter_map(|entry| Uuid::parse_str(entry.file_name().to_str()?).ok())
        .map(|id| Target {
            workspace_id: id,
            instance_name: crate::base::workspace::instance_name(id),
            zone: "local".into(),
        })
        .collect())
}

/// The last `lines` non-empty lines of a log, joined, without escape sequences, at most
/// 500 characters: why a machine's agent never connected, in a workspace's reason.
fn log_tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = all[all.len().saturating_sub(lines)..].join(" / ");
    strip_escapes(&tail).chars().take(500).collect()
}

/// Drops terminal escape sequences (colour codes in log lines).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}
