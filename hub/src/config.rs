//! Configuration in two layers: [`FileConfig`] (TOML, every field optional, humantime
//! durations) and the validated [`Config`] the hub runs with.

use crate::base::secret::Secret;
use crate::base::workspace::IdlePolicy;
pub use crate::edge::oidc::{OidcConfig, SchedulerConfig};
pub use crate::store::StoreConfig;
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
    /// Google Compute Engine instances (`[gce]` in the config).
    Gce,
    /// Local VMs booted from the workspace image (`[qemu]` in the config).
    Qemu,
}

/// Per-owner limits, checked at create and start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    /// Workspaces an owner may have in all.
    pub max_workspaces: u32,
    /// Workspaces an owner may have running (provisioning, starting or ready) at once.
    pub max_running: u32,
    /// Machine types an owner may ask for; empty means any.
    pub machine_types: Vec<String>,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_workspaces: 20,
            max_running: 5,
            machine_types: Vec::new(),
        }
    }
}

/// The default quota and per-owner overrides (`[quotas.owners.alice]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    #[serde(flatten)]
    pub default: Quota,
    pub owners: std::collections::BTreeMap<String, Quota>,
}

impl Quotas {
    pub fn for_owner(&self, owner: &str) -> &Quota {
        self.owners.get(owner).unwrap_or(&self.default)
    }
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
    /// Where the process and qemu providers keep workspace folders; defaults to
    /// `state_dir/workspaces`. Replicas on one machine share it.
    pub workspaces_dir: Option<PathBuf>,
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
    pub idle: IdlePolicy,
    pub quotas: Quotas,
    /// How often the reconciler and the idle clean-up run inside the hub.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// How long a record or instance may look inconsistent before the reconciler acts
    /// (an instance being created has no agent yet; a record being written has no VM yet).
    #[serde(with = "humantime_serde")]
    pub reconcile_grace: Duration,
    /// A workspace whose agent has not connected this long after its create goes to
    /// `ERROR` with the reason (and the machine's last boot log lines).
    #[serde(with = "humantime_serde")]
    pub provision_timeout: Duration,
    /// Audit entries older than this are deleted by the housekeeping pass.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
    /// A shared secret Cloud Scheduler (or cron) sends as a bearer token to `POST /cleanup`.
    pub cleanup_token: Option<Secret>,
    /// A shared secret a Prometheus scraper sends as a bearer token to `GET /metrics`
    /// (admins may read it with their own token too).
    pub metrics_token: Option<Secret>,
    /// Cloud Scheduler's OIDC tokens, accepted on `POST /cleanup` instead of a secret.
    pub cleanup_oidc: Option<SchedulerConfig>,
    /// Browser sign-in; without it the hub signs in only through tokens and dev links.
    pub oidc: Option<OidcConfig>,
    /// The hub's address as browsers reach it (`https://hub.example.com`): the OIDC
    /// redirect goes there, and session cookies are `Secure` when it is https. Defaults
    /// to `http://` and the bound HTTP address.
    pub public_url: Option<String>,
    /// Port previews are served at `<port>-<workspace>.<preview_domain>` (a wildcard DNS
    /// name for the hub, with its port if not the default). Defaults to `localhost` (with
    /// the hub's port) when the hub runs on a loopback address.
    pub preview_domain: Option<String>,
    /// How long a previewed server may go without answering a request or taking a byte
    /// of its body.
    #[serde(with = "humantime_serde")]
    pub preview_timeout: Duration,
    /// Whether preview traffic counts as use of the workspace for idle clean-up.
    pub preview_is_activity: bool,
    pub store: StoreConfig,
    pub gce: crate::provider::gce::GceConfig,
    pub qemu: crate::provider::qemu::QemuConfig,
    /// Team mode: who may see and act on every workspace: subjects (`sub`), or
    /// `@example.com` for everyone whose verified e-mail is in that domain.
    pub admins: Vec<String>,
    /// Failed authentications a client address may make per minute before it gets 429.
    pub auth_failures_per_minute: u32,
    /// How long the replica running the reconciler and idle clean-up holds that job without
    /// renewing it: another replica takes over this long after the holder dies.
    #[serde(with = "humantime_serde")]
    pub leader_lease: Duration,
    /// Replicas: how long a leaving replica (SIGTERM) waits for the streams on its agents'
    /// old connections to finish after asking the agents to move.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// This replica's name in leases and logs; the host name and a random suffix by default.
    pub replica_id: Option<String>,
    /// Where the other replicas reach this one's QUIC endpoint (`host:port`; port 0 for the
    /// port `quic_addr` binds). Setting it
    /// makes this hub one of several replicas sharing a store and an identity: it registers
    /// itself, records the agents it holds, and reaches agents held by others through them.
    pub peer_addr: Option<String>,
    /// Where the hub's CA, ticket and reset keys come from; `dev` generates them in the
    /// state folder when this is absent, `serve` refuses to start without it.
    pub identity: Option<crate::base::identity::IdentityConfig>,
    /// Direct connections between CLIs and agents.
    pub direct: DirectPolicy,
    /// Where workspace events are POSTed, if anywhere.
    pub webhooks: Option<WebhookConfig>,
    /// Host apps that embed the hub.
    pub embed: EmbedConfig,
    /// The agent binary older agents are offered (`[agent_update]`).
    pub agent_update: Option<AgentUpdateConfig>,
    /// The update keys the process provider's agents trust (`--update-keys`), as an image
    /// trusts `/etc/workspace-agent/update-keys`.
    pub agent_update_keys: Option<PathBuf>,
}

/// The agent release this hub offers to agents of an older version (`[agent_update]`,
/// `links::updates`): a binary and its release file, as `workspace-hub agent-update sign`
/// writes it. The hub holds no signing key: agents check the signature against keys their
/// image trusts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentUpdateConfig {
    pub binary: PathBuf,
    /// Defaults to the binary's path with `.release` added.
    pub release: Option<PathBuf>,
}

/// The receiver of workspace events (`[webhooks]`, `links::webhooks`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// An http(s) URL.
    pub url: String,
    /// Signs every delivery (HMAC-SHA256); at least 16 bytes.
    pub secret: Secret,
    /// The event types to send (`status`, `port`, `checkout`, `setup`, `profile`,
    /// `deleted`); all when empty.
    #[serde(default)]
    pub events: Vec<String>,
}

impl WebhookConfig {
    fn check(&self) -> Result<()> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| anyhow::anyhow!("webhooks.url {:?}: {e}", self.url))?;
        ensure!(
            matches!(url.scheme(), "http" | "https") && url.host().is_some(),
            "webhooks.url must be an http(s) URL with a host"
        );
        ensure!(
            self.secret.expose().len() >= 16,
            "webhooks.secret must be at least 16 bytes"
        );
        for kind in &self.events {
            ensure!(
                [
                    "status", "port", "checkout", "setup", "sync", "profile", "deleted"
                ]
                .contains(&kind.as_str()),
                "webhooks.events: {kind:?} is not one of status, port, checkout, setup, sync, \
                 profile, deleted"
            );
        }
        Ok(())
    }
}

/// Host apps that embed the hub (`[embed]`): their pages may frame `/embed/terminal/{id}`
/// and call the exec and files API with browser tokens. Nothing else opens to them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct EmbedConfig {
    /// Origins (`https://app.example.com`, `http://localhost:3000`): scheme, host and port,
    /// no path, no wildcard.
    pub allowed_origins: Vec<String>,
}

impl EmbedConfig {
    fn check(&self) -> Result<()> {
        for origin in &self.allowed_origins {
            let url = reqwest::Url::parse(origin)
                .map_err(|e| anyhow::anyhow!("embed.allowed_origins {origin:?}: {e}"))?;
            ensure!(
                matches!(url.scheme(), "http" | "https")
                    && url.host().is_some()
                    && url.origin().ascii_serialization() == *origin,
                "embed.allowed_origins {origin:?} must be an origin: http(s)://host[:port], \
                 nothing after it"
            );
        }
        Ok(())
    }

    /// Whether a request's `Origin` is one of the allowed.
    pub fn allows(&self, origin: &str) -> bool {
        self.allowed_origins.iter().any(|o| o == origin)
    }
}

/// Who may have direct (one-hop) connections to their workspaces' agents; everyone else
/// stays on the relay through the hub.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DirectPolicy {
    /// Off: the hub brokers no direct session.
    pub enabled: bool,
    /// Users who stay relayed even when enabled: subjects, or `@example.com` for everyone
    /// whose verified e-mail is in that domain (a team).
    pub relay_only: Vec<String>,
}

impl Default for DirectPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            relay_only: Vec::new(),
        }
    }
}

impl DirectPolicy {
    /// May this user have direct sessions?
    pub fn allows(&self, subject: &str, email: Option<&str>) -> bool {
        self.enabled && !matches_user(&self.relay_only, subject, email)
    }
}

/// Whether `list` names this subject, or the domain of this verified e-mail (`@domain`).
fn matches_user(list: &[String], subject: &str, email: Option<&str>) -> bool {
    let domain = email.and_then(|e| e.rsplit_once('@')).map(|(_, d)| d);
    list.iter().any(|a| match a.strip_prefix('@') {
        Some(wanted) => domain.is_some_and(|d| d.eq_ignore_ascii_case(wanted)),
        None => a == subject,
    })
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
            workspaces_dir: None,
            enrollment_ttl: Duration::from_secs(15 * 60),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(6),
            default_zone: "local".into(),
            default_machine_type: "local".into(),
            default_image_tag: "default".into(),
            terminal_ring_bytes: 4 << 20,
            detached_session_ttl: Duration::from_secs(8 * 3600),
            idle: IdlePolicy::default(),
            quotas: Quotas::default(),
            reconcile_interval: Duration::from_secs(60),
            reconcile_grace: Duration::from_secs(10 * 60),
            provision_timeout: Duration::from_secs(10 * 60),
            audit_retention: Duration::from_secs(400 * 24 * 3600),
            cleanup_token: None,
            metrics_token: None,
            cleanup_oidc: None,
            oidc: None,
            public_url: None,
            preview_domain: None,
            preview_timeout: Duration::from_secs(60),
            preview_is_activity: true,
            store: StoreConfig::default(),
            gce: Default::default(),
            qemu: Default::default(),
            admins: Vec::new(),
            auth_failures_per_minute: 20,
            leader_lease: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            replica_id: None,
            peer_addr: None,
            identity: None,
            direct: DirectPolicy::default(),
            webhooks: None,
            agent_update: None,
            agent_update_keys: None,
            embed: EmbedConfig::default(),
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
    pub workspaces_dir: PathBuf,
    pub enrollment_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub default_zone: String,
    pub default_machine_type: String,
    pub default_image_tag: String,
    pub terminal_ring_bytes: u64,
    pub detached_session_ttl: Duration,
    pub idle: IdlePolicy,
    pub quotas: Quotas,
    pub reconcile_interval: Duration,
    pub reconcile_grace: Duration,
    pub provision_timeout: Duration,
    pub audit_retention: Duration,
    pub cleanup_token: Option<Secret>,
    pub metrics_token: Option<Secret>,
    pub cleanup_oidc: Option<SchedulerConfig>,
    pub oidc: Option<OidcConfig>,
    pub public_url: Option<String>,
    pub preview_domain: Option<String>,
    pub preview_timeout: Duration,
    pub preview_is_activity: bool,
    pub store: StoreConfig,
    pub gce: crate::provider::gce::GceConfig,
    pub qemu: crate::provider::qemu::QemuConfig,
    pub admins: Vec<String>,
    pub auth_failures_per_minute: u32,
    pub leader_lease: Duration,
    pub drain_timeout: Duration,
    pub replica_id: Option<String>,
    pub peer_addr: Option<String>,
    pub identity: Option<crate::base::identity::IdentityConfig>,
    pub direct: DirectPolicy,
    pub webhooks: Option<WebhookConfig>,
    pub embed: EmbedConfig,
    pub agent_update: Option<AgentUpdateConfig>,
    pub agent_update_keys: Option<PathBuf>,
}

impl Config {
    pub fn from_file(file: FileConfig) -> Result<Self> {
        if let Some(hooks) = &file.webhooks {
            hooks.check()?;
        }
        file.embed.check()?;
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
        ensure!(
            file.idle.stop_after <= file.idle.max_lifetime
                && file.idle.delete_after <= file.idle.max_lifetime,
            "idle.stop_after and idle.delete_after must not exceed idle.max_lifetime"
        );
        ensure!(
            file.reconcile_interval >= Duration::from_millis(100),
            "reconcile_interval must be at least 100ms"
        );
        let mut oidc = file.oidc;
        if let Some(oidc) = &mut oidc {
            crate::edge::oidc::check_issuer_url(&oidc.issuer)?;
            ensure!(!oidc.client_id.is_empty(), "oidc.client_id must be set");
            if oidc.client_secret.is_none() {
                oidc.client_secret = std::env::var("WORKSPACE_HUB_OIDC_CLIENT_SECRET")
                    .ok()
                    .map(Secret::new);
            }
            ensure!(
                oidc.client_secret.is_some(),
                "oidc.client_secret (or WORKSPACE_HUB_OIDC_CLIENT_SECRET) must be set"
            );
        }
        if let Some(s) = &file.cleanup_oidc {
            crate::edge::oidc::check_issuer_url(&s.issuer)?;
            ensure!(
                !s.audience.is_empty() && s.service_account.contains('@'),
                "cleanup_oidc needs an audience and a service_account e-mail"
            );
        }
        if let Some(url) = &file.public_url {
            let parsed = url::Url::parse(url).with_context(|| format!("public_url {url:?}"))?;
            ensure!(
                matches!(parsed.scheme(), "http" | "https") && parsed.path() == "/",
                "public_url must be an http(s) origin without a path, like https://hub.example.com"
            );
        }
        if let Some(domain) = &file.preview_domain {
            let (host, port) = domain.rsplit_once(':').unwrap_or((domain, "443"));
            ensure!(
                !host.is_empty()
                    && host.split('.').all(|l| !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                    && port.parse::<u16>().is_ok(),
                "preview_domain must be a host name with an optional :port, like preview.example.com"
            );
        }
        ensure!(
            file.provision_timeout >= Duration::from_secs(1),
            "provision_timeout must be at least 1s"
        );
        ensure!(
            file.preview_timeout >= Duration::from_millis(100),
            "preview_timeout must be at least 100ms"
        );
        for (name, token) in [
            ("cleanup_token", &file.cleanup_token),
            ("metrics_token", &file.metrics_token),
        ] {
            if let Some(token) = token {
                ensure!(
                    token.expose().len() >= 16,
                    "{name} must be at least 16 characters"
                );
            }
        }
        if file.provider == ProviderKind::Gce {
            ensure!(
                !file.gce.project.is_empty(),
                "provider gce needs gce.project"
            );
            ensure!(!file.gce.zones.is_empty(), "provider gce needs gce.zones");
        }
        if file.provider == ProviderKind::Qemu {
            ensure!(
                !file.qemu.image_dir.as_os_str().is_empty(),
                "provider qemu needs qemu.image_dir (the folder images/build prints)"
            );
            ensure!(
                (256..=262_144).contains(&file.qemu.memory_mib)
                    && (1..=64).contains(&file.qemu.cpus),
                "qemu.memory_mib must be 256..262144 and qemu.cpus 1..64"
            );
        }
        if let Some(identity) = &file.identity {
            identity.validate()?;
        }
        ensure!(
            file.leader_lease >= Duration::from_secs(1),
            "leader_lease must be at least 1s"
        );
        if let Some(id) = &file.replica_id {
            ensure!(
                id.len() <= 64
                    && id.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
                "replica_id must be 1 to 64 letters, digits, '-' or '.', starting with a letter or digit"
            );
        }
        if let Some(addr) = &file.peer_addr {
            let (host, port) = addr.rsplit_once(':').unwrap_or(("", ""));
            ensure!(
                !host.is_empty() && port.parse::<u16>().is_ok(),
                "peer_addr must be host:port, like 10.0.0.5:7443 (port 0: the port quic_addr binds)"
            );
            ensure!(
                file.identity.is_some(),
                "peer_addr (replicas) needs [identity]: replicas share one CA and its keys"
            );
            ensure!(
                file.store != crate::store::StoreConfig::default(),
                "peer_addr (replicas) needs a shared store: [store] kind = \"firestore\", or \
                 kind = \"sqlite\" with a path every replica on this machine opens"
            );
        }
        let agent_binary = match file.agent_binary {
            Some(path) => path,
            None => std::env::current_exe()
                .context("locate own executable")?
                .with_file_name("workspace-agent"),
        };
        let state_dir = std::path::absolute(&file.state_dir)
            .with_context(|| format!("resolve state_dir {}", file.state_dir.display()))?;
        let workspaces_dir = match &file.workspaces_dir {
            Some(dir) => std::path::absolute(dir)
                .with_context(|| format!("resolve workspaces_dir {}", dir.display()))?,
            None => state_dir.join("workspaces"),
        };
        Ok(Self {
            state_dir,
            http_addr: file.http_addr,
            quic_addr: file.quic_addr,
            agent_hub_addr: file.agent_hub_addr,
            server_names: file.server_names,
            provider: file.provider,
            agent_binary,
            workspaces_dir,
            enrollment_ttl: file.enrollment_ttl,
            heartbeat_interval: file.heartbeat_interval,
            heartbeat_timeout: file.heartbeat_timeout,
            default_zone: file.default_zone,
            default_machine_type: file.default_machine_type,
            default_image_tag: file.default_image_tag,
            terminal_ring_bytes: file.terminal_ring_bytes,
            detached_session_ttl: file.detached_session_ttl,
            idle: file.idle,
            quotas: file.quotas,
            reconcile_interval: file.reconcile_interval,
            reconcile_grace: file.reconcile_grace,
            provision_timeout: file.provision_timeout,
            audit_retention: file.audit_retention,
            cleanup_token: file.cleanup_token,
            metrics_token: file.metrics_token,
            cleanup_oidc: file.cleanup_oidc,
            oidc,
            public_url: file.public_url.map(|u| u.trim_end_matches('/').to_owned()),
            preview_domain: file.preview_domain,
            preview_timeout: file.preview_timeout,
            preview_is_activity: file.preview_is_activity,
            store: file.store,
            gce: file.gce,
            qemu: file.qemu,
            admins: file.admins,
            auth_failures_per_minute: file.auth_failures_per_minute,
            leader_lease: file.leader_lease,
            drain_timeout: file.drain_timeout,
            replica_id: file.replica_id,
            peer_addr: file.peer_addr,
            identity: file.identity,
            direct: file.direct,
            webhooks: file.webhooks,
            agent_update: file.agent_update,
            agent_update_keys: file.agent_update_keys,
            embed: file.embed,
        })
    }

    /// Team mode: is this subject (with this verified e-mail) an admin?
    pub fn is_admin(&self, subject: &str, email: Option<&str>) -> bool {
        matches_user(&self.admins, subject, email)
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

    #[test]
    fn the_example_config_parses_and_validates() {
        let file: FileConfig = toml::from_str(include_str!("../../hub.example.toml")).unwrap();
        let config = Config::from_file(file).unwrap();
        assert!(config.identity.is_some());
        assert!(config.webhooks.is_some());
        assert_eq!(config.embed.allowed_origins, ["https://app.example.com"]);
        assert!(config.direct.enabled);
    }

    #[test]
    fn embed_origins_are_bare_origins() {
        let check = |origins: &str| {
            let file: FileConfig =
                toml::from_str(&format!("[embed]\nallowed_origins = [{origins}]")).unwrap();
            Config::from_file(file).map(|c| c.embed)
        };
        let ok = check("\"https://app.example.com\", \"http://127.0.0.1:3000\"").unwrap();
        assert!(ok.allows("http://127.0.0.1:3000"));
        assert!(!ok.allows("http://127.0.0.1:3001"));
        for bad in [
            "\"*\"",
            "\"https://app.example.com/\"",
            "\"https://app.example.com/path\"",
            "\"ftp://app.example.com\"",
            "\"https://APP.example.com\"",
            "\"null\"",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn webhooks_need_a_url_a_long_secret_and_known_events() {
        let config = |body: &str| {
            let file: FileConfig = toml::from_str(&format!("[webhooks]\n{body}")).unwrap();
            Config::from_file(file).map(|c| c.webhooks.unwrap().events)
        };
        let secret = "secret = \"0123456789abcdef\"";
        assert_eq!(
            config(&format!(
                "url = \"https://example.com/h\"\n{secret}\nevents = [\"port\"]"
            ))
            .unwrap(),
            vec!["port".to_owned()]
        );
        assert!(config(&format!("url = \"ftp://example.com/h\"\n{secret}")).is_err());
        assert!(config(&format!("url = \"not a url\"\n{secret}")).is_err());
        assert!(config("url = \"https://example.com/h\"\nsecret = \"short\"").is_err());
        assert!(
            config(&format!(
                "url = \"https://example.com/h\"\n{secret}\nevents = [\"nope\"]"
            ))
            .is_err()
        );
        // The secret never shows in debug output.
        let file: FileConfig =
            toml::from_str(&format!("[webhooks]\nurl = \"https://e.com\"\n{secret}")).unwrap();
        assert!(!format!("{file:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn replicas_need_a_store_they_all_open() {
        let config = |store: &str| {
            let text = format!(
                "peer_addr = \"127.0.0.1:0\"\n\
                 [identity]\nca_cert = \"env:A\"\nca_key = \"env:B\"\n\
                 ticket_key = \"env:C\"\nreset_key = \"env:D\"\n{store}"
            );
            Config::from_file(toml::from_str(&text).unwrap())
        };
        // Each process's own file in its state folder: not shared.
        let own = config("").unwrap_err().to_string();
        assert!(own.contains("shared store"), "{own}");
        assert!(config("[store]\nkind = \"sqlite\"\n").is_err());
        // One file every process on this machine opens.
        let shared =
            config("[store]\nkind = \"sqlite\"\npath = \"/srv/hub/hub.sqlite3\"\n").unwrap();
        assert_eq!(
            shared.store,
            StoreConfig::Sqlite {
                path: Some("/srv/hub/hub.sqlite3".into())
            }
        );
        assert!(
            toml::from_str::<FileConfig>("[store]\nkind = \"sqlite\"\nfile = \"x\"\n").is_err()
        );
    }
}
