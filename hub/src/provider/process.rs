//! The process provider: each workspace is a folder with its own agent child process.
//!
//! The config is written the way cloud-init writes it on a VM (`agent.toml`, mode 0600), the
//! agent runs in its own process group (so a Ctrl-C on the hub's terminal does not reach
//! it) and outlives the hub like a VM would: a restarted hub finds it again through
//! `agent.pid`. `stop` suspends the process group (SIGSTOP) and `start` resumes it; an
//! agent that is gone (after a reboot) is started again from the same folder, where it keeps
//! its certificate, so it needs no second enrollment.

use super::Target;
use super::{
    Created, Instance, InstanceSpec, Observed, Provider, ProviderError, render_agent_config,
};
use crate::base::fsutil::write_private;
use async_trait::async_trait;
use rustix::process::{Pid, Signal};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use uuid::Uuid;

#[derive(Debug)]
pub struct ProcessProvider {
    root: PathBuf,
    agent_binary: PathBuf,
    /// The update keys its agents trust (`--update-keys`), if any.
    update_keys: Option<PathBuf>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(format!("{what}: {e}"))
}

impl ProcessProvider {
    /// Workspaces live under `root/<id>/`; agents are started from `agent_binary`.
    pub fn new(root: PathBuf, agent_binary: PathBuf) -> Self {
        Self {
            root,
            agent_binary,
            update_keys: None,
        }
    }

    /// Its agents trust the agent-update keys in `keys` (what an image bakes in).
    pub fn with_update_keys(mut self, keys: Option<PathBuf>) -> Self {
        self.update_keys = keys;
        self
    }

    fn dir(&self, id: Uuid) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// The agent's process id and its state letter from `/proc/<pid>/stat` (`R`, `S`, `T`
    /// for stopped, ...), if it is alive and really our agent (not a reused pid).
    fn live_pid(&self, id: Uuid) -> Option<(Pid, char)> {
        let raw = std::fs::read_to_string(self.dir(id).join("agent.pid")).ok()?;
        let pid = Pid::from_raw(raw.trim().parse().ok()?)?;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.as_raw_nonzero())).ok()?;
        let config = self.dir(id).join("agent.toml");
        let needle = config.as_os_str().as_encoded_bytes();
        if !cmdline.split(|b| *b == 0).any(|arg| arg == needle) {
            return None;
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())).ok()?;
        let state = stat.rsplit(')').next()?.trim_start().chars().next()?;
        (state != 'Z').then_some((pid, state))
    }

    fn spawn(&self, id: Uuid) -> Result<(), ProviderError> {
        let dir = self.dir(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .map_err(|e| failed("open agent.log", e))?;
        let log2 = log.try_clone().map_err(|e| failed("open agent.log", e))?;
        let mut command = tokio::process::Command::new(&self.agent_binary);
        command.arg("--config").arg(dir.join("agent.toml"));
        if let Some(keys) = &self.update_keys {
            command.arg("--update-keys").arg(keys);
        }
        let mut child = command
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|e| failed(&format!("start {}", self.agent_binary.display()), e))?;
        let pid = child
            .id()
            .ok_or_else(|| failed("start agent", "exited at once"))?;
        write_private(&dir.join("agent.pid"), pid.to_string().as_bytes())
            .map_err(|e| failed("write agent.pid", e))?;
        // Reap the child when it exits so it never lingers as a zombie.
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => tracing::info!(workspace = %id, %status, "agent process exited"),
                Err(e) => tracing::warn!(workspace = %id, error = %e, "wait for agent"),
            }
        });
        Ok(())
    }
}

fn signal_group(pid: Pid, sig: Signal) -> Result<(), ProviderError> {
    rustix::process::kill_process_group(pid, sig).map_err(|e| failed("signal agent", e))
}

fn remove_dir(dir: &Path) -> Result<(), ProviderError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed("remove workspace folder", e)),
    }
}

#[async_trait]
impl Provider for ProcessProvider {
    fn name(&self) -> &'static str {
        "process"
    }

    fn shares_host(&self) -> bool {
        true
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Created, ProviderError> {
        let dir = self.dir(spec.workspace_id);
        let agent_state = dir.join("agent");
        std::fs::create_dir_all(&agent_state).map_err(|e| failed("create workspace folder", e))?;
        let mut bootstrap = spec.bootstrap.clone();
        bootstrap.state_dir = agent_state.to_string_lossy().into_owned();
        let config = render_agent_config(&bootstrap)?;
        write_private(&dir.join("agent.toml"), config.as_bytes())
            .map_err(|e| failed("write agent.toml", e))?;
        self.spawn(spec.workspace_id)?;
        Ok(Created::default())
    }

    async fn start(&self, target: &Target) -> Result<(), ProviderError> {
        let id = target.workspace_id;
        if !self.dir(id).join("agent.toml").exists() {
            return Err(ProviderError::NotFound);
        }
        match self.live_pid(id) {
            Some((pid, _)) => signal_group(pid, Signal::CONT),
            None => self.spawn(id),
        }
    }

    async fn stop(&self, target: &Target) -> Result<(), ProviderError> {
        let id = target.workspace_id;
        match self.live_pid(id) {
            Some((pid, _)) => signal_group(pid, Signal::STOP),
            None if self.dir(id).exists() => Ok(()),
            None => Err(ProviderError::NotFound),
        }
    }

    async fn delete(&self, target: &Target) -> Result<(), ProviderError> {
        let id = target.workspace_id;
        if let Some((pid, _)) = self.live_pid(id) {
            signal_group(pid, Signal::KILL)?;
        }
        remove_dir(&self.dir(id))
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::new();
        for target in super::workspace_folders(&self.root)? {
            let observed = self.observe(&target).await?;
            out.push(Instance { target, observed });
        }
        Ok(out)
    }

    async fn boot_log(&self, target: &Target) -> Option<String> {
        let log = tokio::fs::read(self.dir(target.workspace_id).join("agent.log"))
            .await
            .ok()?;
        Some(super::log_tail(&String::from_utf8_lossy(&log), 2))
    }

    async fn observe(&self, target: &Target) -> Result<Observed, ProviderError> {
        let id = target.workspace_id;
        Ok(match self.live_pid(id) {
            Some((_, 'T')) => Observed::Suspended,
            Some(_) => Observed::Running,
            None if self.dir(id).exists() => Observed::Stopped,
            None => Observed::Missing,
        })
    }
}
