//! Configuration in two layers: [`FileConfig`] (TOML, every field optional, humantime
//! durations) and the validated [`Config`] the hub runs with.

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which provider runs workspaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Each workspace is a local agent process (the embedded default).
    #[default]
    Process,
    /// Nothing is started; the creator receives the agent config and runs it.
    Manual,
}

/// The config file as written by people.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub state_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    /// The address agents dial (`host:port`); defaults to `quic_addr`.
    pub agent_hub_addr: Option<String>,
    /// Names and IPs on the hub's QUIC certificate.
    pub server_names: Vec<String>,
    pub provider: ProviderKind,
    /// The agent binary the process provider starts; defaults to `workspace-agent` beside
    /// the hub's own executable.
    pub agent_binary: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub enrollment_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    pub default_zone: String,
    pub default_machine_type: String,
    pub default_image_tag: String,
    /// Bytes of output each terminal session keeps for replay.
    pub terminal_ring_bytes: u64,
    /// How long a terminal session may stay detached before the agent ends it.
    #[serde(with = "humantime_serde")]
    pub detached_session_ttl: Duration,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(".state"),
            http_addr: ([127, 0, 0, 1], 7080).into(),
            quic_addr: ([127, 0, 0, 1], 7443).into(),
            agent_hub_addr: None,
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            provider: ProviderKind::Process,
            agent_binary: None,
            enrollment_ttl: Duration::from_secs(15 * 60),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(6),
            default_zone: "local".into(),
            default_machine_type: "local".into(),
            default_image_tag: "default".into(),
            terminal_ring_bytes: 4 << 20,
            detached_session_ttl: Duration::from_secs(8 * 3600),
        }
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config {}", path.display()))
    }
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub agent_hub_addr: Option<String>,
    pub server_names: Vec<String>,
    pub provider: ProviderKind,
    pub agent_binary: PathBuf,
    pub enrollment_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub default_zone: String,
    pub default_machine_type: String,
    pub default_image_tag: String,
    pub terminal_ring_bytes: u64,
    pub detached_session_ttl: Duration,
}

impl Config {
    pub fn from_file(file: FileConfig) -> Result<Self> {
        ensure!(
            !file.server_names.is_empty(),
            "server_names must not be empty"
        );
        ensure!(
            file.heartbeat_interval >= Duration::from_millis(100),
            "heartbeat_interval must be at least 100ms"
        );
        ensure!(
            file.heartbeat_timeout >= file.heartbeat_interval * 2,
            "heartbeat_timeout must be at least twice heartbeat_interval"
        );
        ensure!(
            (Duration::from_secs(1)..=Duration::from_secs(24 * 3600))
                .contains(&file.enrollment_ttl),
            "enrollment_ttl must be between 1s and 24h"
        );
        if file.agent_hub_addr.is_none() && file.quic_addr.ip().is_unspecified() {
            bail!(
                "quic_addr {} is a wildcard: set agent_hub_addr to the address agents dial",
                file.quic_addr
            );
        }
        ensure!(
            ((64 << 10)..=(256 << 20)).contains(&file.terminal_ring_bytes),
            "terminal_ring_bytes must be between 64 KiB and 256 MiB"
        );
        ensure!(
            file.detached_session_ttl >= Duration::from_secs(1),
            "detached_session_ttl must be at least 1s"
        );
        let agent_binary = match file.agent_binary {
            Some(path) => path,
            None => std::env::current_exe()
                .context("locate own executable")?
                .with_file_name("workspace-agent"),
        };
        let state_dir = std::path::absolute(&file.state_dir)
            .with_context(|| format!("resolve state_dir {}", file.state_dir.display()))?;
        Ok(Self {
            state_dir,
            http_addr: file.http_addr,
            quic_addr: file.quic_addr,
            agent_hub_addr: file.agent_hub_addr,
            server_names: file.server_names,
            provider: file.provider,
            agent_binary,
            enrollment_ttl: file.enrollment_ttl,
            heartbeat_interval: file.heartbeat_interval,
            heartbeat_timeout: file.heartbeat_timeout,
            default_zone: file.default_zone,
            default_machine_type: file.default_machine_type,
            default_image_tag: file.default_image_tag,
            terminal_ring_bytes: file.terminal_ring_bytes,
            detached_session_ttl: file.detached_session_ttl,
        })
    }

    /// The QUIC idle timeout: a backstop well past the heartbeat timeout.
    pub fn idle_timeout(&self) -> Duration {
        self.heartbeat_timeout * 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humantime_and_validates() {
        let file: FileConfig = toml::from_str(
            r#"
            heartbeat_interval = "1s"
            heartbeat_timeout = "5s"
            enrollment_ttl = "10m"
            provider = "manual"
            "#,
        )
        .unwrap();
        let cfg = Config::from_file(file).unwrap();
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(cfg.provider, ProviderKind::Manual);

        let bad: FileConfig =
            toml::from_str("heartbeat_interval = \"5s\"\nheartbeat_timeout = \"6s\"").unwrap();
        assert!(Config::from_file(bad).is_err());
        assert!(toml::from_str::<FileConfig>("no_such_field = 1").is_err());
        let wildcard: FileConfig = toml::from_str("quic_addr = \"0.0.0.0:7443\"").unwrap();
        assert!(Config::from_file(wildcard).is_err());
    }
}
