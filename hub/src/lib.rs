//! Workspace Hub: the control plane.
//!
//! Entry points: [`run`] starts everything (HTTP API and web UI on TCP, the agent endpoint
//! on QUIC/UDP) until the shutdown token is cancelled; [`app`] builds the HTTP router alone,
//! for tests without sockets. [`Hub`] is the shared state: the validated [`config::Config`],
//! the [`store::Store`], the [`provider::Provider`], the CA and the registry of connected
//! agents.
//!
//! The hub never interprets terminal bytes and never holds a user token where an agent can
//! see it.

pub mod base;
pub mod config;
pub mod domain;
pub mod edge;
pub mod links;
pub mod provider;
pub mod store;

use anyhow::{Context, Result};
use base::{ca, fsutil, identity, workspace};
use config::{Config, ProviderKind};
use domain::{auth, events, idle, reconcile};
use edge::{api, oidc, preview};
use links::{agents, peers};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api::app;

/// Shared state of a running hub.
pub struct Hub {
    pub config: Config,
    pub store: Arc<dyn store::Store>,
    pub provider: Arc<dyn provider::Provider>,
    /// The CA(s), ticket and reset keys every replica shares.
    pub identity: Arc<identity::Identity>,
    /// The other replicas, when this is one of several.
    pub peers: peers::Peers,
    /// This process among the hub's replicas (leases, logs): the configured `replica_id`,
    /// or the host name and a random suffix.
    pub replica_id: String,
    pub agents: agents::Registry,
    /// The address agents are told to dial.
    pub agent_hub_addr: String,
    /// Cancelled when the process is done: connections close, tasks end.
    pub shutdown: CancellationToken,
    /// Cancelled when the process starts to leave (SIGTERM), before `shutdown`: no new
    /// work (HTTP answers 503 with `Retry-After`, new QUIC connections are refused), the
    /// housekeeping lease is given up, and a replica moves its agents and browsers to the
    /// others (see [`drain`]).
    pub draining: CancellationToken,
    /// Workspace events (status, checkout, ports) for SSE subscribers.
    pub events: events::Events,
    /// Instances without a record, and when the reconciler first saw each.
    pub orphans: reconcile::Orphans,
    /// Failed authentications per client address.
    pub auth_failures: auth::Failures,
    /// Signs and checks scoped session tickets.
    pub tickets: auth::Tickets,
    /// Browser sign-in through the configured identity provider.
    pub oidc: Option<oidc::Oidc>,
    /// Verifies Cloud Scheduler's tokens on `POST /cleanup`.
    pub scheduler: Option<oidc::Issuer>,
    /// The hub's origin as browsers reach it (no trailing slash).
    pub public_url: String,
    /// Idle connections to previewed ports.
    pub previews: Arc<preview::Pool>,
    /// The figures `GET /metrics` shows.
    pub metrics: Arc<base::metrics::Metrics>,
    /// The agent release offered to older agents (`[agent_update]`).
    pub agent_release: Option<Arc<links::updates::AgentRelease>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("provider", &self.provider.name())
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

pub type AppState = Arc<Hub>;

/// Where a started hub listens (also written to `hub.json` in the state folder).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Listening {
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub pid: u32,
}

/// Opens the state folder: CA, SQLite store, provider. `quic_addr` is the bound QUIC
/// address, which agents dial unless the config names another; `http_addr` the bound HTTP
/// address, the public URL unless the config names one.
pub async fn open_state(
    config: &Config,
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<Hub> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state folder {}", config.state_dir.display()))?;
    let identity = identity::Identity::load(config.identity.as_ref(), &config.state_dir)
        .await
        .context("hub identity")?;
    let store = store::open(&config.store, &config.state_dir)
        .await
        .context("open store")?;
    let provider: Arc<dyn provider::Provider> = match config.provider {
        ProviderKind::Process => Arc::new(
            provider::process::ProcessProvider::new(
                config.workspaces_dir.clone(),
                config.agent_binary.clone(),
            )
            .with_update_keys(config.agent_update_keys.clone()),
        ),
        ProviderKind::Manual => Arc::new(provider::manual::ManualProvider),
        ProviderKind::Qemu => Arc::new(
            provider::qemu::QemuProvider::new(config.workspaces_dir.clone(), config.qemu.clone())
                .context("qemu provider")?,
        ),
        ProviderKind::Gce => Arc::new(
            provider::gce::GceProvider::new(config.gce.clone())
                .await
                .context("Compute Engine provider")?,
        ),
    };
    // Every store and provider call is counted and timed for `/metrics`.
    let metrics = Arc::new(base::metrics::Metrics::default());
    let store: Arc<dyn store::Store> =
        Arc::new(store::metered::Metered::new(store, metrics.clone()));
    let provider: Arc<dyn provider::Provider> =
        Arc::new(provider::metered::Metered::new(provider, metrics.clone()));
    let agent_release = config
        .agent_update
        .as_ref()
        .map(|u| links::updates::AgentRelease::load(&u.binary, u.release.as_deref()))
        .transpose()?;
    Ok(Hub {
        metrics,
        agent_release,
        agent_hub_addr: config
            .agent_hub_addr
            .clone()
            .unwrap_or_else(|| quic_addr.to_string()),
        config: config.clone(),
        store,
        provider,
        tickets: auth::Tickets::new(&identity.ticket_key),
        peers: peers::Peers::new(config.peer_addr.clone()),
        replica_id: config.replica_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "hub".into());
            format!("{host}-{}", ca::hex(&ca::random_bytes::<3>()))
        }),
        identity: Arc::new(identity),
        agents: agents::Registry::default(),
        shutdown,
        draining: CancellationToken::new(),
        events: events::Events::default(),
        orphans: reconcile::Orphans::default(),
        auth_failures: auth::Failures::default(),
        oidc: config
            .oidc
            .as_ref()
            .map(oidc::Oidc::new)
            .transpose()
            .context("oidc")?,
        scheduler: config
            .cleanup_oidc
            .as_ref()
            .map(|s| oidc::Issuer::new(&s.issuer))
            .transpose()
            .context("cleanup_oidc")?,
        public_url: config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}")),
        previews: Arc::default(),
    })
}

/// The HTTP listener, closed the moment draining starts: a load balancer's next connection
/// is refused and goes to another replica at once, instead of waiting in a backlog that
/// nobody accepts from (and being reset when the process exits).
struct DrainingListener {
    inner: Option<tokio::net::TcpListener>,
    addr: SocketAddr,
    draining: CancellationToken,
}

impl axum::serve::Listener for DrainingListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use futures_util::FutureExt;
        loop {
            let Some(listener) = &self.inner else {
                return std::future::pending().await;
            };
            if self.draining.is_cancelled() {
                // Connections the kernel has completed already are taken (and answered
                // 503 with Retry-After) rather than reset with the socket.
                match listener.accept().now_or_never() {
                    Some(Ok(conn)) => return conn,
                    _ => {
                        self.inner = None;
                        continue;
                    }
                }
            }
            let accepted = tokio::select! {
                biased;
                accepted = listener.accept() => Some(accepted),
                _ = self.draining.cancelled() => None,
            };
            match accepted {
                Some(Ok(conn)) => return conn,
                Some(Err(e)) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept HTTP connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                None => {}
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// How often a draining replica looks whether its agents are gone.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Leaving. A single hub stops at once (its agents reconnect when it is back). A replica
/// stops taking new work (HTTP answers 503 with `Retry-After: 1`, new QUIC connections are
/// refused, the housekeeping lease goes to another replica), asks each agent to move
/// (`ControlMsg::Move`: the agent connects again through the load balancer, which picks
/// another replica, and closes its old connection here when the streams on it end), sends
/// browser terminals elsewhere (close 1012; they resume at their offset), and waits up to
/// `drain_timeout` for its agents to go.
async fn drain(hub: &Hub) {
    hub.draining.cancel();
    if !hub.peers.enabled() {
        return;
    }
    // Idle preview connections would keep agents' old connections open (the other
    // replicas drop theirs through this one when told it is leaving: `PeerMsg::Leaving`).
    hub.previews.close();
    let started = tokio::time::Instant::now();
    tracing::info!(agents = hub.agents.len(), timeout = ?hub.config.drain_timeout, "draining: agents move to the other replicas");
    while !hub.agents.is_empty() && started.elapsed() < hub.config.drain_timeout {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    tracing::info!(left = hub.agents.len(), took = ?started.elapsed(), "drained");
    // HTTP connections taken from the listener's queue when draining began may not have
    // sent their request yet: shutting down now would reset them. They get their answer
    // (a 503 saying retry) first.
    let linger = HTTP_LINGER.min(hub.config.drain_timeout);
    tokio::time::sleep(linger.saturating_sub(started.elapsed())).await;
}

/// How long a leaving replica keeps serving the HTTP connections it accepted before
/// draining began, at least.
const HTTP_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// The lease whose holder runs the reconciler and the idle clean-up.
const HOUSEKEEPING_LEASE: &str = "housekeeping";

/// The reconciler and idle clean-up, on one replica at a time: the holder of the
/// housekeeping lease in the store, which it renews every third of `leader_lease`. Another
/// replica takes over within `leader_lease` of the holder's death, at once after its
/// shutdown. A pass runs once on taking the lease, then every `reconcile_interval`.
async fn housekeeping(hub: AppState) {
    let lease = hub.config.leader_lease;
    let mut tick = tokio::time::interval((lease / 3).min(hub.config.reconcile_interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader = false;
    let mut next_pass = tokio::time::Instant::now();
    let mut pass: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hub.draining.cancelled() => break,
        }
        let now = workspace::now_ms();
        let held = match hub
            .store
            .acquire_lease(
                HOUSEKEEPING_LEASE,
                &hub.replica_id,
                now,
                now + lease.as_millis() as i64,
            )
            .await
        {
            Ok(held) => held,
            Err(e) => {
                // Unconfirmed is not leading: another replica may have it by now.
                tracing::warn!(error = %e, "renew the housekeeping lease");
                false
            }
        };
        if held != leader {
            leader = held;
            tracing::info!(replica = %hub.replica_id, leader, "housekeeping leader changed");
            next_pass = tokio::time::Instant::now();
        }
        let idle = pass.as_ref().is_none_or(|p| p.is_finished());
        if leader && idle && tokio::time::Instant::now() >= next_pass {
            next_pass = tokio::time::Instant::now() + hub.config.reconcile_interval;
            pass = Some(tokio::spawn(housekeeping_pass(hub.clone())));
        }
    }
    if let Some(pass) = pass {
        pass.abort();
    }
    if leader {
        match hub
            .store
            .release_lease(HOUSEKEEPING_LEASE, &hub.replica_id)
            .await
        {
            Ok(()) => tracing::info!(replica = %hub.replica_id, "housekeeping lease released"),
            Err(e) => tracing::warn!(error = %e, "release the housekeeping lease"),
        }
    }
}

/// At most this many audit entries go in one housekeeping pass (a backlog goes over a few).
const AUDIT_PURGE_BATCH: usize = 5000;

/// One reconciler and idle clean-up pass.
async fn housekeeping_pass(hub: AppState) {
    let now = workspace::now_ms();
    match reconcile::reconcile(&hub, now).await {
        Ok(report)
            if !report.orphans_seen.is_empty()
                || !report.vanished.is_empty()
                || !report.resumed.is_empty()
                || !report.timed_out.is_empty() =>
        {
            tracing::info!(?report, "reconciled");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "reconcile"),
    }
    if let Err(e) = idle::sweep(&hub, now).await {
        tracing::warn!(error = %e, "idle clean-up");
    }
    if let Err(e) = hub.store.purge_grants(now).await {
        tracing::warn!(error = %e, "purge expired grants");
    }
    let retention = i64::try_from(hub.config.audit_retention.as_millis()).unwrap_or(i64::MAX);
    match hub
        .store
        .purge_audit(now.saturating_sub(retention), AUDIT_PURGE_BATCH)
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(entries = n, "purged audit entries past their retention"),
        Err(e) => tracing::warn!(error = %e, "purge old audit entries"),
    }
}

/// Runs the hub until `stop` is cancelled (then drains, see [`drain`]); `on_ready` learns
/// the bound addresses.
pub async fn run(
    config: Config,
    stop: CancellationToken,
    on_ready: impl FnOnce(&Hub, &Listening),
) -> Result<()> {
    let shutdown = CancellationToken::new();
    link::install_crypto_provider();
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state folder {}", config.state_dir.display()))?;
    let socket = link::bind_udp(config.quic_addr, 16 << 20)
        .with_context(|| format!("bind QUIC on {}", config.quic_addr))?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("bind HTTP on {}", config.http_addr))?;
    let hub = Arc::new(
        open_state(
            &config,
            socket.local_addr()?,
            listener.local_addr()?,
            shutdown.clone(),
        )
        .await?,
    );

    let server = hub
        .identity
        .server_ca()
        .issue_server(&config.server_names)
        .context("issue server certificate")?;
    let client_cas = hub.identity.client_cas();
    // Session tickets any replica opens: a replica's agents resume their TLS sessions on the
    // others when it leaves or dies, without a certificate exchange.
    let cas: Vec<&[u8]> = client_cas.iter().map(Vec::as_slice).collect();
    let tickets = Arc::new(link::SharedTickets::new(&hub.identity.ticket_key, &cas));
    let server_config = link::server_config(
        vec![server.cert_der],
        server.key_pkcs8,
        &client_cas,
        if hub.peers.enabled() {
            &[
                protocol::ALPN_AGENT,
                protocol::ALPN_CLIENT,
                protocol::ALPN_PEER,
            ][..]
        } else {
            &[protocol::ALPN_AGENT, protocol::ALPN_CLIENT][..]
        },
        config.idle_timeout(),
        tickets,
    )
    .context("QUIC server config")?;
    let endpoint = quinn::Endpoint::new(
        link::endpoint_config(&hub.identity.reset_key),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("start QUIC endpoint")?;
    if hub.peers.enabled() {
        let replica = hub
            .identity
            .ca
            .issue_replica(&hub.replica_id)
            .context("issue replica certificate")?;
        let peer_config = link::peer_client_config(
            &hub.identity.client_cas(),
            (replica.cert_der, replica.key_pkcs8),
        )
        .context("peer client config")?;
        hub.peers.start(endpoint.clone(), peer_config);
    }
    let listening = Listening {
        http: listener.local_addr()?,
        quic: endpoint.local_addr()?,
        pid: std::process::id(),
    };
    fsutil::write_public(
        &config.state_dir.join("hub.json"),
        &serde_json::to_vec(&listening)?,
    )?;
    on_ready(&hub, &listening);

    let tasks = TaskTracker::new();
    let accept_hub = hub.clone();
    let accept_tasks = tasks.clone();
    let accept_endpoint = endpoint.clone();
    let quic = tasks.spawn(async move {
        loop {
            tokio::select! {
                incoming = accept_endpoint.accept() => match incoming {
                    // A leaving replica refuses new connections at once (rather than letting
                    // their handshakes time out): agents and clients try again at once, from
                    // a new port, which the balancer sends to another replica.
                    Some(incoming) if accept_hub.draining.is_cancelled() => incoming.refuse(),
                    Some(incoming) => {
                        accept_tasks.spawn(links::handle_incoming(accept_hub.clone(), incoming));
                    }
                    None => break,
                },
                _ = accept_hub.shutdown.cancelled() => break,
            }
        }
    });

    tasks.spawn(housekeeping(hub.clone()));
    tasks.spawn(peers::register(hub.clone()));
    if hub.peers.enabled() {
        let (tx, rx) = tokio::sync::mpsc::channel(events::FORWARD_CAPACITY);
        hub.events.forward_to(tx);
        tasks.spawn(peers::forward_events(hub.clone(), rx));
    }
    links::webhooks::start(&hub);
    // Idle preview connections are closed so they stop counting as use of a workspace.
    let pool_hub = hub.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(preview::POOL_IDLE / 2);
        loop {
            tokio::select! {
                _ = tick.tick() => pool_hub.previews.prune(),
                _ = pool_hub.shutdown.cancelled() => return,
            }
        }
    });

    let drain_hub = hub.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        drain(&drain_hub).await;
        drain_hub.shutdown.cancel();
    });

    // New HTTP connections stop when draining starts (the balancer sends them to another
    // replica); requests under way finish; a request on a connection kept alive from before
    // is answered 503 with `Retry-After` and `Connection: close` (so the client's retry
    // opens a new connection) until the process shuts down.
    let http_shutdown = hub.shutdown.clone();
    let listener = DrainingListener {
        addr: listener.local_addr()?,
        inner: Some(listener),
        draining: hub.draining.clone(),
    };
    axum::serve(
        axum::serve::ListenerExt::tap_io(listener, |_| {}),
        app(hub.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
    .await
    .context("serve HTTP")?;
    shutdown.cancelled().await;

    // Drain: every control session closes its connection with "shutting down".
    let _ = quic.await;
    tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait()).await;
    endpoint.close(
        quinn::VarInt::from_u32(protocol::close::CloseCode::ShuttingDown.code()),
        b"hub shutting down",
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}
