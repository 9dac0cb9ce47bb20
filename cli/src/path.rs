//! The paths to a workspace's agent: the relay through the hub, always there, and a direct
//! connection (`protocol::direct`) when one can be had. A command starts on the relay at
//! once; a background task asks the hub for a direct session, connects to every candidate
//! of the agent at once from the socket the hub saw, and keeps the winner while it lives.
//! When it dies (a cut path: no keep-alive answered within `link::DIRECT_IDLE_TIMEOUT`)
//! streams go back to the relay, and the task tries again every few seconds.

use crate::attach::{Hub, Link, Moved};
use anyhow::{Context, Result, anyhow, bail};
use link::{FramedRecv, send_msg};
use protocol::direct::{Candidates, DirectMsg};
use protocol::stream::{ClientDirectOpen, StreamHeader, StreamRefusal, StreamReply};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Which path a command may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Mode {
    /// Direct when it can be had, the relay otherwise (and meanwhile).
    #[default]
    Auto,
    /// Only direct: fail when no direct path can be had.
    Direct,
    /// Only through the hub.
    Relay,
}

/// How long a direct attempt may take, all candidates together.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait before trying a direct path again after none was found or one broke.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// `--path direct` waits this long for a direct path before giving up.
const DIRECT_WAIT: Duration = Duration::from_secs(10);

/// Both paths to one workspace's agent.
pub struct Paths {
    hub: Hub,
    pub workspace: String,
    mode: Mode,
    /// Print each change of path to stderr.
    show: bool,
    relay: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// The live direct connection; changes wake `changed` subscribers.
    direct: watch::Sender<Option<Arc<Link>>>,
    /// Why the last direct attempt failed (for `--path direct`).
    last_failure: Mutex<Option<String>>,
}

impl Paths {
    /// Paths to `workspace`; with a mode other than `Relay`, a task starts looking for a
    /// direct path right away.
    pub fn new(hub: Hub, workspace: &str, mode: Mode, show: bool) -> Arc<Self> {
        let paths = Arc::new(Self {
            hub,
            workspace: workspace.to_owned(),
            mode,
            show,
            relay: Default::default(),
            direct: watch::Sender::new(None),
            last_failure: Mutex::new(None),
        });
        if mode != Mode::Relay {
            tokio::spawn(Self::keep_direct(Arc::downgrade(&paths)));
        }
        paths
    }

    /// The connection streams should use now: the direct one while it lives (the only one
    /// for `--path direct`, waiting for it if need be), else the relay.
    pub async fn link(&self) -> Result<Arc<Link>> {
        if let Some(direct) = self.current_direct() {
            return Ok(direct);
        }
        if self.mode == Mode::Direct {
            return self.wait_direct(DIRECT_WAIT).await;
        }
        self.relay().await
    }

    /// Waits up to `wait` for the first direct attempt (for commands with one long stream,
    /// where starting on the relay and moving is not worth it), then returns [`Self::link`].
    pub async fn settled_link(&self, wait: Duration) -> Result<Arc<Link>> {
        if self.mode == Mode::Auto && self.current_direct().is_none() {
            let _ = self.wait_direct(wait).await;
        }
        self.link().await
    }

    /// Resolves when the direct path comes or goes.
    pub fn changes(&self) -> watch::Receiver<Option<Arc<Link>>> {
        self.direct.subscribe()
    }

    /// A stream on `link` failed in a way another connection may not: a direct path goes
    /// (streams use the relay until a new one is found); a relay that no longer reaches
    /// the agent (it moved, the replica is leaving or gone) is connected again on next use.
    pub async fn failed(&self, link: &Arc<Link>) {
        if link.direct {
            link.conn.close(quinn::VarInt::from_u32(0), b"path failed");
            self.drop_direct(link);
        } else {
            let mut current = self.relay.lock().await;
            if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
                *current = None;
            }
        }
    }

    /// Whether `link` is the one [`Self::link`] would pick now.
    pub fn prefers(&self, link: &Link) -> bool {
        self.current_direct().is_some() == link.direct
    }

    /// Streams stop using this direct connection.
    fn drop_direct(&self, link: &Arc<Link>) {
        self.direct.send_if_modified(|d| {
            let same = d.as_ref().is_some_and(|d| Arc::ptr_eq(d, link));
            if same {
                *d = None;
            }
            same
        });
    }

    fn current_direct(&self) -> Option<Arc<Link>> {
        self.direct
            .borrow()
            .clone()
            .filter(|d| d.conn.close_reason().is_none())
    }

    async fn wait_direct(&self, wait: Duration) -> Result<Arc<Link>> {
        let mut changes = self.direct.subscribe();
        let found = tokio::time::timeout(wait, async {
            loop {
                if let Some(d) = self.current_direct() {
                    return d;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        });
        match found.await {
            Ok(d) => Ok(d),
            Err(_) => {
                let why = self
                    .last_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                bail!(
                    "no direct path to the workspace's agent{}",
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                )
            }
        }
    }

    /// The relay through the hub, connected on first use and again after it dies.
    pub async fn relay(&self) -> Result<Arc<Link>> {
        let mut relay = self.relay.lock().await;
        if let Some(l) = relay.as_ref().filter(|l| l.conn.close_reason().is_none()) {
            return Ok(l.clone());
        }
        let fresh = Arc::new(self.hub.connect().await?);
        *relay = Some(fresh.clone());
        Ok(fresh)
    }

    /// Closes every connection before the process exits, so the hub and the agent end
    /// what they serve this process (relayed streams, attached clients, sync sessions, a
    /// replica's drain) at once rather than at their idle timeout.
    pub async fn close(&self) {
        let relay = self.relay.lock().await.take();
        let direct = self.direct.send_replace(None);
        for link in relay.iter().chain(direct.iter()) {
            link.conn.close(quinn::VarInt::from_u32(0), b"done");
        }
        // A connection's driver sends its close the next time it runs: on this one-thread
        // runtime, as soon as this task yields.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    }

    fn note(&self, message: &str) {
        if self.show {
            eprint!("\r\n[wsh: {message}]\r\n");
        }
    }

    /// Keeps a direct connection while `this` lives: finds one, waits for it to die, tries
    /// again.
    async fn keep_direct(this: std::sync::Weak<Self>) {
        let mut announced_failure = false;
        loop {
            let Some(paths) = this.upgrade() else { return };
            let started = Instant::now();
            match paths.find_direct().await {
                Ok(link) => {
                    announced_failure = false;
                    paths.note(&format!(
                        "path: direct to {}, rtt {:.2} ms, found in {} ms",
                        link.conn.remote_address(),
                        link.conn.rtt().as_secs_f64() * 1e3,
                        started.elapsed().as_millis()
                    ));
                    paths.direct.send_replace(Some(link.clone()));
                    drop(paths);
                    let why = link.conn.closed().await;
                    let Some(paths) = this.upgrade() else { return };
                    paths.drop_direct(&link);
                    paths.note(&format!(
                        "path: relay through the hub (direct path lost: {why})"
                    ));
                }
                Err(e) => {
                    if !announced_failure {
                        paths.note(&format!("path: relay through the hub ({e:#})"));
                        announced_failure = true;
                    }
                    *paths.last_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("{e:#}"));
                    // A refusal by policy or an agent without direct connections: asking
                    // again will not change it.
                    paths.direct.send_modify(|_| {});
                    if e.downcast_ref::<Permanent>().is_some() {
                        return;
                    }
                }
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    /// One attempt: a credential and the agent's candidates from the hub, then a handshake
    /// with every candidate at once; the first to finish wins.
    async fn find_direct(&self) -> Result<Arc<Link>> {
        let relay = self.relay().await?;
        let key = rcgen::KeyPair::generate().context("generate a key")?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .context("make a CSR")?;
        let port = relay.endpoint.local_addr()?.port();
        let hub_addr = relay.conn.remote_address();
        let local: Vec<String> = link::local_ip_towards(hub_addr)
            .map(|ip| SocketAddr::new(ip, port).to_string())
            .into_iter()
            .collect();
        let (mut send, recv) = relay.conn.open_bi().await?;
        let mut recv = FramedRecv::new(recv);
        let open = ClientDirectOpen {
            workspace_id: self.workspace.clone(),
            csr_der: csr.der().to_vec(),
            candidates: Candidates { addrs: local },
        };
        send_msg(&mut send, &StreamHeader::ClientDirect(open)).await?;
        let _ = send.finish();
        match recv.expect::<StreamReply>().await? {
            StreamReply::Accepted(_) => {}
            StreamReply::Refused(r) => {
                return Err(match r.reason {
                    StreamRefusal::Unauthorized | StreamRefusal::Unsupported => {
                        Permanent(r.message).into()
                    }
                    StreamRefusal::Moved => Moved(r.message).into(),
                    _ => anyhow!("{}", r.message),
                });
            }
            StreamReply::Forwarding(_) => bail!("unexpected answer from the hub"),
        }
        let DirectMsg::Offer(offer) = recv.expect::<DirectMsg>().await? else {
            bail!("unexpected answer from the hub");
        };
        let agent = offer
            .agent
            .parse()
            .filter(|a| !a.is_empty())
            .context("the hub sent no usable agent address")?;
        let config = link::direct_client_config(&relay.cas, (offer.cert_der, key.serialize_der()))?;
        let mut attempts = tokio::task::JoinSet::new();
        for addr in agent {
            let connecting = relay
                .endpoint
                .connect_with(config.clone(), addr, &offer.server_name);
            attempts.spawn(async move { connecting?.await.map_err(anyhow::Error::from) });
        }
        let deadline = tokio::time::sleep(ATTEMPT_TIMEOUT);
        tokio::pin!(deadline);
        let mut last = anyhow!("no candidate answered");
        loop {
            tokio::select! {
                done = attempts.join_next() => match done {
                    Some(Ok(Ok(conn))) => {
                        return Ok(Arc::new(Link {
                            conn,
                            direct: true,
                            endpoint: relay.endpoint.clone(),
                            cas: relay.cas.clone(),
                        }));
                    }
                    Some(Ok(Err(e))) => last = e,
                    Some(Err(e)) => last = e.into(),
                    None => return Err(last),
                },
                _ = &mut deadline => bail!("no candidate answered within {ATTEMPT_TIMEOUT:?}"),
            }
        }
    }
}

/// Direct sessions are refused for good (policy, or an agent that does not take them).
#[derive(Debug)]
pub struct Permanent(pub String);

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Permanent {}
