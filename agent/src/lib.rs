//! The Workspace Hub agent: runs inside each workspace and dials home.
//!
//! Entry point: [`Agent::run`]. On first start the agent generates its own key, trades the
//! single-use enrollment token from its config for a certificate issued by the hub CA
//! ([`identity`]), and from then on connects with mutual TLS only, pinning the hub CA from
//! its config. It keeps one QUIC connection to the hub ([`session`]): a control stream with
//! hello and heartbeats, and streams the hub opens to it. When the link drops it reconnects
//! by itself with capped exponential backoff and jitter.

pub mod checkout;
pub mod config;
pub mod devcontainer;
pub mod direct;
pub mod exec;
mod fds;
pub mod files;
pub mod forward;
pub mod identity;
pub mod ports;
pub mod pty;
pub mod session;
pub mod setup;
pub mod update;

use crate::config::AgentConfig;
use crate::identity::Identity;
use protocol::backoff::Backoff;
use protocol::enroll::EnrollRefusal;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

/// Errors that stop the agent for good (anything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("config: {0}")]
    Config(String),
    #[error("enrollment refused: {reason:?}: {message}")]
    EnrollmentRefused {
        reason: EnrollRefusal,
        message: String,
    },
    #[error("no certificate and no enrollment token: cannot join the hub")]
    NoIdentity,
    #[error("the hub no longer accepts this agent's certificate: {0}")]
    Revoked(String),
    #[error("state folder: {0}")]
    State(#[from] std::io::Error),
    #[error("start QUIC endpoint: {0}")]
    Endpoint(String),
}

/// Things that happen to an agent, for observers (logs, benchmarks, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// A certificate was issued.
    Enrolled,
    /// The control session is up (hello accepted).
    Connected,
    /// The link to the hub was lost, with the reason.
    Disconnected(String),
}

/// An agent ready to run.
pub struct Agent {
    config: AgentConfig,
    /// The UDP socket connections come from; replaced (a new port) before connecting again
    /// after a move or a failed attempt.
    endpoint: std::sync::Mutex<quinn::Endpoint>,
    /// Where a replacement for `endpoint` comes from: `None` for a socket of its own, or
    /// endpoints shared by many agents in one process.
    shared: Option<Arc<EndpointPool>>,
    events: Option<UnboundedSender<AgentEvent>>,
    /// Terminal sessions; they outlive every connection to the hub.
    sessions: Arc<pty::Sessions>,
    /// The repository checkout's progress (reported to the hub on change and reconnect).
    checkout: tokio::sync::watch::Sender<Option<protocol::control::CheckoutStatus>>,
    /// Listening ports, from the watcher thread (started by [`Agent::run`]).
    ports: Option<tokio::sync::watch::Receiver<ports::PortTable>>,
    /// TCP forwards and sync sessions open right now (they count as use of the workspace).
    forwards: Arc<forward::Forwards>,
    /// Where sync roots live and who owns what sync writes.
    sync: filesync::serve::Options,
    /// SSH keys, dotfiles and the dev container (reported to the hub on change and
    /// reconnect).
    setup: Arc<setup::Setup>,
    /// Updates of this binary (none: offers are declined).
    updates: Option<Arc<update::Updates>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Sync roots are relative to the checkout folder (the workspace user's home when the agent
/// is root); as root, what sync writes belongs to that user.
fn sync_options(run_as: Option<&str>) -> filesync::serve::Options {
    let owner = run_as
        .filter(|_| rustix::process::geteuid().is_root())
        .and_then(user_ids);
    filesync::serve::Options {
        home: checkout::workdir(run_as),
        owner,
        rescan: std::time::Duration::from_secs(10),
        debounce: std::time::Duration::from_millis(10),
        memory: Arc::default(),
        sessions: Default::default(),
    }
}

/// `runuser -u <user> --`, to put before a command that runs as the workspace user: when
/// the agent is root and one is set; empty otherwise.
pub(crate) fn as_user_prefix(run_as: Option<&str>) -> Vec<String> {
    match run_as.filter(|_| rustix::process::geteuid().is_root()) {
        Some(user) => ["runuser", "-u", user, "--"].map(str::to_owned).to_vec(),
        None => Vec::new(),
    }
}

/// A user's uid and gid from `/etc/passwd`.
pub(crate) fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == user).then_some(())?;
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

/// A client endpoint on a new UDP port (IPv6 and IPv4 where the host has both).
fn new_endpoint() -> Result<quinn::Endpoint, AgentError> {
    quinn::Endpoint::client((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        .or_else(|_| quinn::Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))
        .map_err(|e| AgentError::Endpoint(e.to_string()))
}

/// How many refused connections in a row (hub replicas that are leaving) the agent answers
/// with a quick retry from a new port before falling back to its backoff: during a rolling
/// restart the balancer may pick a leaving replica a few times, and a backoff grown on
/// those would keep the agent away long after the restart is over.
const QUICK_RETRIES: u32 = 10;

/// Client endpoints shared by many agents in one process (fleet benchmarks: thousands of
/// agents on a few sockets). An agent that would take a new port takes the next endpoint
/// of the pool instead, so a balancer that pins flows by port picks a replica again, as it
/// does for a real agent.
#[derive(Debug)]
pub struct EndpointPool {
    endpoints: Vec<quinn::Endpoint>,
    next: std::sync::atomic::AtomicUsize,
}

impl EndpointPool {
    /// A pool of `endpoints` (at least one).
    pub fn new(endpoints: Vec<quinn::Endpoint>) -> Arc<Self> {
        assert!(!endpoints.is_empty(), "an endpoint pool needs an endpoint");
        Arc::new(Self {
            endpoints,
            next: Default::default(),
        })
    }

    /// The next endpoint, round robin.
    pub fn next(&self) -> quinn::Endpoint {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.endpoints[i % self.endpoints.len()].clone()
    }
}

impl Agent {
    /// An agent with its own UDP socket.
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        Ok(Self::with(config, new_endpoint()?, None))
    }

    /// An agent on the endpoints of `pool` (many agents in one process).
    pub fn with_pool(config: AgentConfig, pool: Arc<EndpointPool>) -> Self {
        Self::with(config, pool.next(), Some(pool))
    }

    fn with(
        config: AgentConfig,
        endpoint: quinn::Endpoint,
        shared: Option<Arc<EndpointPool>>,
    ) -> Self {
        Self {
            endpoint: std::sync::Mutex::new(endpoint),
            shared,
            events: None,
            sessions: Arc::new(pty::Sessions::with_policy(
                config.ring_bytes,
                config.run_as.clone(),
                config.detached_ttl,
            )),
            checkout: tokio::sync::watch::Sender::new(None),
            ports: None,
            forwards: Arc::default(),
            sync: sync_options(config.run_as.as_deref()),
            setup: Arc::new(setup::Setup::new(
                checkout::workdir(config.run_as.as_deref()),
                config.run_as.clone(),
                config.state_dir.clone(),
            )),
            updates: None,
            config,
        }
    }

    /// Takes agent updates through `updates`.
    pub fn with_updates(mut self, updates: Arc<update::Updates>) -> Self {
        self.updates = Some(updates);
        self
    }

    /// The terminal sessions (an update hands them to the next process).
    pub fn sessions(&self) -> &Arc<pty::Sessions> {
        &self.sessions
    }

    /// Reports [`AgentEvent`]s to `events`.
    pub fn with_events(mut self, events: UnboundedSender<AgentEvent>) -> Self {
        self.events = Some(events);
        self
    }

    fn emit(&self, event: AgentEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }

    /// The endpoint the next connection comes from.
    fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Gives the agent a new UDP port for its next connection (a new socket, or the next
    /// endpoint of its pool), so a load balancer that pins flows by port picks a hub
    /// replica again. Connections still open keep the old socket.
    fn rebind(&self) {
        let endpoint = match &self.shared {
            Some(pool) => pool.next(),
            None => match new_endpoint() {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    tracing::warn!(error = %e, "new UDP socket; keeping the old one");
                    return;
                }
            },
        };
        *self.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = endpoint;
    }

    fn jitter() -> f64 {
        rand::random::<f64>()
    }

    /// Runs until `shutdown` is cancelled or a fatal error occurs.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        self.ports = ports::watch(self.config.ports);
        // Detached sessions past their time are ended once a minute.
        let sessions = self.sessions.clone();
        let reaper_stop = shutdown.clone();
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let reaped = sessions.reap(std::time::Instant::now());
                        if reaped > 0 {
                            tracing::info!(reaped, "ended detached terminal sessions");
                        }
                    }
                    _ = reaper_stop.cancelled() => break,
                }
            }
        });
        // A finished checkout (this start's, or one from an earlier boot that the hub's
        // request finds there) starts the dev container.
        let mut checkout = self.checkout.subscribe();
        let setup = self.setup.clone();
        let dev_container = tokio::spawn(async move {
            while checkout.changed().await.is_ok() {
                let done = checkout
                    .borrow_and_update()
                    .as_ref()
                    .filter(|s| s.state == protocol::control::CheckoutState::Done)
                    .map(|s| std::path::PathBuf::from(&s.path));
                if let Some(path) = done {
                    setup.checked_out(path);
                }
            }
        });
        // A new binary the hub does not welcome in time goes back to the previous one.
        let probation = self
            .updates
            .clone()
            .filter(|u| u.on_probation().is_some())
            .map(|updates| {
                let sessions = self.sessions.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(update::PROBATION).await;
                    if let Some(why) = updates.roll_back(&sessions) {
                        tracing::error!(%why, "rollback failed: staying on this version");
                    }
                })
            });
        let result = self.run_link(shutdown).await;
        if let Some(probation) = probation {
            probation.abort();
        }
        reaper.abort();
        dev_container.abort();
        result
    }

    async fn run_link(&self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_cap);
        let identity = match Identity::load(&self.config.state_dir)? {
            Some(identity) => identity,
            None => loop {
                match identity::enroll(&self.config, &self.endpoint()).await {
                    Ok(identity) => {
                        self.emit(AgentEvent::Enrolled);
                        break identity;
                    }
                    Err(identity::EnrollError::Fatal(e)) => return Err(e),
                    Err(identity::EnrollError::Retry(why)) => {
                        let delay = backoff.next_delay(Self::jitter());
                        tracing::warn!(error = %why, retry_in = ?delay, "enrollment failed");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.cancelled() => return Ok(()),
                        }
                    }
                }
            },
        };
        backoff.reset();
        let identity = Arc::new(identity);
        let client = identity
            .client_config(&self.config)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        // Direct clients, on an agent with a socket of its own.
        let direct = match &self.shared {
            Some(_) => None,
            None => direct::Direct::new(
                &identity.cert_der,
                &identity.key_pkcs8,
                &self.config.hub_cas,
            )
            .inspect_err(|why| tracing::info!(%why, "no direct connections"))
            .ok(),
        };
        // Refusals in a row answered by a quick retry (see `QUICK_RETRIES`).
        let mut refusals = 0;
        loop {
            match session::connect_and_serve(self, &client, direct.as_ref(), &shutdown).await {
                session::End::Shutdown => return Ok(()),
                session::End::Fatal(e) => return Err(e),
                session::End::Update { path, version } => {
                    if let Some(updates) = &self.updates {
                        tracing::info!(%version, path = %path.display(), "agent update installed: restarting into it");
                        let why = updates.restart_into(&path, &self.sessions, Some(&version));
                        tracing::error!(%version, %why, "agent update not applied: carrying on");
                    }
                    self.emit(AgentEvent::Disconnected("restarting into an update".into()));
                    backoff.reset();
                    self.rebind();
                }
                session::End::Moving => {
                    tracing::info!("the hub replica is leaving: connecting again");
                    backoff.reset();
                    refusals = 0;
                    self.emit(AgentEvent::Disconnected("moved by the hub".into()));
                    self.rebind();
                }
                session::End::Refused(reason) if refusals < QUICK_RETRIES => {
                    // A replica that is leaving: a new port, so the balancer picks again, and
                    // soon (the backoff is for a hub that is down, not for one saying "not
                    // me").
                    refusals += 1;
                    self.rebind();
                    let delay =
                        std::time::Duration::from_millis(50 + (Self::jitter() * 200.0) as u64);
                    tracing::info!(%reason, retry_in = ?delay, "refused by a leaving hub replica");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
                session::End::Refused(reason)
                | session::End::Lost {
                    reason,
                    was_up: false,
                } => {
                    // The replica the balancer picked may be leaving: pick again.
                    self.rebind();
                    let delay = backoff.next_delay(Self::jitter());
                    tracing::info!(%reason, retry_in = ?delay, "link to hub lost");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
                session::End::Lost {
                    reason,
                    was_up: true,
                } => {
                    backoff.reset();
                    refusals = 0;
                    self.emit(AgentEvent::Disconnected(reason.clone()));
                    let delay = backoff.next_delay(Self::jitter());
                    tracing::info!(%reason, retry_in = ?delay, "link to hub lost");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }
}
