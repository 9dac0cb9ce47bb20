//! The hub's QUIC side: enrollment, agent control sessions and the registry of connected
//! agents.
//!
//! A connection without a client certificate may open exactly one stream, an enrollment
//! stream. A connection with a certificate (verified against the hub CA by TLS) is mapped to
//! its workspace by the certificate's subject and must match the fingerprint the store
//! holds for that workspace; its first stream is the control stream (hello, heartbeats).
//! The hub never interprets bytes on any other stream.

use crate::Hub;
use crate::base::ca;
use crate::base::workspace::{Status, Workspace, now_ms};
use crate::domain::agent::{AgentInfo, CheckoutView, SetupView, SyncSessionView};
use crate::domain::auth::token_hash;
use crate::domain::events::{Detail, WorkspaceEvent};
use crate::domain::lifecycle;
use crate::store::{StoreError, TokenRejection};
use link::{FramedRecv, LinkError, send_msg};
use protocol::close::CloseCode;
use protocol::control::ControlMsg;
use protocol::enroll::{EnrollMsg, EnrollRefusal, EnrollRefused, EnrollRequest, Issued};
use protocol::liveness::Liveness;
use protocol::stream::{Accepted, StreamHeader, StreamRefusal, StreamRefused, StreamReply};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::time::timeout;
use uuid::Uuid;

/// Frames on the control and enrollment streams are small; refuse anything bigger.
pub(crate) const CONTROL_FRAME_LIMIT: usize = 64 * 1024;
/// How long a peer may take to open its first stream and send its first message.
pub(crate) const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// `last_connected_at` is written at most this often per workspace while connected.
const LAST_CONNECTED_WRITE_INTERVAL: Duration = Duration::from_secs(60);

struct Connected {
    info: AgentInfo,
    conn: quinn::Connection,
    session: u64,
    /// Asked to move (this replica is leaving): its open streams finish, no new ones go
    /// through it.
    moving: bool,
    /// The connection's epoch, as the agent's route in the store records it.
    epoch: i64,
    ports: Ports,
    /// What `ports` holds, in [`PortView::weight`] bytes (at most [`MAX_PORT_BYTES`]).
    port_bytes: usize,
    /// `ports.ports` as a JSON array, rendered once per change for every subscriber.
    ports_json: Option<std::sync::Arc<str>>,
    /// Port labels from the agent's setup report (its dev container's).
    labels: std::collections::BTreeMap<u16, String>,
    /// Woken when the owner's profile changed: the control session sends it again.
    profile_changed: std::sync::Arc<tokio::sync::Notify>,
}

/// A workspace's listening ports, as its agent reported them.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Ports {
    /// How the agent finds them: `sock_diag` (netlink) or `proc_net` (the slower fallback);
    /// `null` until the agent reported (agents before protocol 3 never do).
    pub source: Option<&'static str>,
    pub ports: std::collections::BTreeMap<u16, PortView>,
}

/// One listening port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PortView {
    pub port: u16,
    pub addresses: Vec<String>,
    /// Reachable only from inside the workspace (and through the hub).
    pub loopback_only: bool,
    pub pid: Option<u32>,
    pub process: String,
    pub command: String,
    /// Answers HTTP (a preview makes sense); `null` while the agent's probe runs.
    pub http: Option<bool>,
    /// The label the workspace's dev container gives this port (`portsAttributes`,
    /// `forwardPorts`).
    pub label: Option<String>,
}

/// At most this many ports per workspace are kept; more are ignored.
const MAX_PORTS: usize = 4096;
/// And at most this much of their data (what the agent sends, trimmed, ~1 MiB): ports past
/// it are ignored the same way.
const MAX_PORT_BYTES: usize = 1024 * 1024;

impl PortView {
    /// Checks and trims what an agent sent: port 0 is refused, strings are cut short.
    fn from_agent(p: protocol::control::PortInfo) -> Option<Self> {
        let cut = |s: String, n: usize| s.chars().filter(|c| !c.is_control()).take(n).collect();
        (p.port != 0).then(|| Self {
            port: p.port,
            addresses: p
                .addresses
                .into_iter()
                .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
                .take(16)
                .collect(),
            loopback_only: p.loopback_only,
            pid: p.pid,
            process: cut(p.process, 64),
            command: cut(p.command, 512),
            http: p.http,
            label: None,
        })
    }

    /// Roughly what the hub holds for this port, in bytes.
    fn weight(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.addresses.iter().map(|a| a.len() + 24).sum::<usize>()
            + self.process.len()
            + self.command.len()
            + self.label.as_ref().map_or(0, String::len)
    }
}

/// The agents connected to this hub process.
#[derive(Default)]
pub struct Registry {
    agents: Mutex<HashMap<Uuid, Connected>>,
    next_session: AtomicU64,
    /// Repository credentials given at create time, in memory only, until the checkout is
    /// done (a hub restart before then loses them: the checkout then fails visibly).
    checkout_tokens: Mutex<HashMap<Uuid, String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("connected", &self.len())
            .finish()
    }
}

impl Registry {
    pub fn get(&self, id: Uuid) -> Option<AgentInfo> {
        self.lock().get(&id).map(|c| c.info.clone())
    }

    /// The last moment of use the agent reported (see [`AgentInfo::active_at`]), without
    /// copying its entry: called on every heartbeat.
    pub fn active_at(&self, id: Uuid, now: i64) -> Option<i64> {
        self.lock().get(&id).and_then(|c| c.info.active_at(now))
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records use of the workspace seen by the hub (preview traffic), like terminal input.
    pub fn note_use(&self, id: Uuid, now: i64) {
        if let Some(c) = self.lock().get_mut(&id) {
            c.info.last_input_at = c.info.last_input_at.max(Some(now));
        }
    }

    /// The workspace's listening ports (empty while its agent is not connected).
    pub fn ports(&self, id: Uuid) -> Ports {
        self.lock()
            .get(&id)
            .map(|c| c.ports.clone())
            .unwrap_or_default()
    }

    /// The workspace's listening ports as a JSON array (`[]` while its agent is not
    /// connected), rendered once per change of the table however many subscribers read it.
    pub fn ports_json(&self, id: Uuid) -> std::sync::Arc<str> {
        let mut agents = self.lock();
        let Some(c) = agents.get_mut(&id) else {
            return "[]".into();
        };
        c.ports_json
            .get_or_insert_with(|| {
                let list: Vec<&PortView> = c.ports.ports.values().collect();
                serde_json::to_string(&list)
                    .unwrap_or_else(|_| "[]".into())
                    .into()
            })
            .clone()
    }

    /// The agents of `ids` this process holds, in the API's JSON shapes, for another
    /// replica; stops adding once the answer would pass `max_bytes`.
    pub fn views(&self, ids: &[Uuid], max_bytes: usize) -> Vec<protocol::peer::PeerAgentView> {
        let agents = self.lock();
        let mut views = Vec::new();
        let mut bytes = 0;
        for id in ids {
            let Some(c) = agents.get(id) else { continue };
            let (Ok(agent), Ok(ports)) = (
                serde_json::to_string(&c.info),
                serde_json::to_string(&c.ports),
            ) else {
                continue;
            };
            bytes += agent.len() + ports.len() + 64;
            if bytes > max_bytes {
                tracing::warn!("agent views cut short: the answer would be too large");
                break;
            }
            views.push(protocol::peer::PeerAgentView {
                workspace_id: id.to_string(),
                agent,
                ports,
            });
        }
        views
    }

    /// Applies a port report from the agent's live session; returns the event to publish.
    fn apply_ports(&self, id: Uuid, session: u64, msg: ControlMsg) -> Option<Detail> {
        let mut agents = self.lock();
        let c = agents.get_mut(&id).filter(|c| c.session == session)?;
        c.ports_json = None;
        match msg {
            ControlMsg::Ports(all) => {
                c.ports.source = Some(match all.source {
                    protocol::control::PortSource::SockDiag => "sock_diag",
                    protocol::control::PortSource::ProcNet => "proc_net",
                });
                c.ports.ports.clear();
                c.port_bytes = 0;
                for mut view in all.ports.into_iter().filter_map(PortView::from_agent) {
                    view.label = c.labels.get(&view.port).cloned();
                    if c.ports.ports.len() >= MAX_PORTS {
                        break;
                    }
                    if c.port_bytes + view.weight() <= MAX_PORT_BYTES {
                        c.port_bytes += view.weight();
                        if let Some(old) = c.ports.ports.insert(view.port, view) {
                            c.port_bytes -= old.weight();
                        }
                    }
                }
                // Subscribers read the list when the event reaches them.
                Some(Detail::Ports)
            }
            ControlMsg::PortOpened(info) => {
                let mut view = PortView::from_agent(info)?;
                view.label = c.labels.get(&view.port).cloned();
                let old = c.ports.ports.get(&view.port).map_or(0, PortView::weight);
                if (old == 0 && c.ports.ports.len() >= MAX_PORTS)
                    || c.port_bytes - old + view.weight() > MAX_PORT_BYTES
                {
                    return None;
                }
                let state = if old > 0 { "updated" } else { "opened" };
                c.port_bytes = c.port_bytes - old + view.weight();
                let event = serde_json::json!({ "state": state, "port": view });
                c.ports.ports.insert(view.port, view);
                Some(Detail::Json(event))
            }
            ControlMsg::PortClosed(closed) => {
                let old = c.ports.ports.remove(&closed.port)?;
                c.port_bytes -= old.weight();
                Some(Detail::Json(
                    serde_json::json!({ "state": "closed", "port": { "port": closed.port } }),
                ))
            }
            _ => None,
        }
    }

    /// The live connection to a workspace's agent, for opening streams to it.
    pub fn connection(&self, id: Uuid) -> Option<quinn::Connection> {
        self.lock()
            .get(&id)
            .filter(|c| !c.moving)
            .map(|c| c.conn.clone())
    }

    /// The agent's connection if it is the one of `epoch` (a peer's route names it).
    pub fn connection_at(&self, id: Uuid, epoch: i64) -> Option<quinn::Connection> {
        self.lock()
            .get(&id)
            .filter(|c| c.epoch == epoch && !c.moving)
            .map(|c| c.conn.clone())
    }

    /// Marks the session's connection as moving (see [`Connected::moving`]).
    fn set_moving(&self, id: Uuid, session: u64) {
        if let Some(c) = self.lock().get_mut(&id).filter(|c| c.session == session) {
            c.moving = true;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Connected>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, id: Uuid, info: AgentInfo, conn: quinn::Connection, epoch: i64) -> u64 {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().insert(
            id,
            Connected {
                info,
                conn,
                session,
                epoch,
                moving: false,
                ports: Ports::default(),
                port_bytes: 0,
                ports_json: None,
                labels: Default::default(),
                profile_changed: Default::default(),
            },
        );
        if let Some(old) = old {
            close(
                &old.conn,
                CloseCode::Replaced,
                "a newer connection replaced this one",
            );
        }
        session
    }

    pub fn keep_checkout_token(&self, id: Uuid, token: String) {
        if let Ok(mut tokens) = self.checkout_tokens.lock() {
            tokens.insert(id, token);
        }
    }

    fn checkout_token(&self, id: Uuid) -> Option<String> {
        self.checkout_tokens.lock().ok()?.get(&id).cloned()
    }

    /// Records a checkout report; a finished checkout no longer needs its credentials.
    fn set_checkout(&self, id: Uuid, session: u64, view: CheckoutView) {
        if view.state == "done"
            && let Ok(mut tokens) = self.checkout_tokens.lock()
        {
            tokens.remove(&id);
        }
        if let Some(c) = self.lock().get_mut(&id).filter(|c| c.session == session) {
            c.info.checkout = Some(view);
        }
    }

    /// Records an agent's setup report on its live entry (its port labels on the ports);
    /// returns the view to publish and whether the labels changed.
    fn set_setup(
        &self,
        id: Uuid,
        session: u64,
        report: protocol::control::SetupReport,
    ) -> Option<(SetupView, bool)> {
        let view = SetupView::from(&report);
        let labels: std::collections::BTreeMap<u16, String> = report
            .port_labels
            .iter()
            .take(protocol::control::MAX_SETUP_ITEMS)
            .filter(|l| l.port != 0)
            .map(|l| {
                let label = l.label.chars().filter(|c| !c.is_control()).take(64);
                (l.port, label.collect())
            })
            .collect();
        let mut agents = self.lock();
        let c = agents.get_mut(&id).filter(|c| c.session == session)?;
        c.info.setup = Some(view.clone());
        let relabel = c.labels != labels;
        if relabel {
            for (port, p) in c.ports.ports.iter_mut() {
                let label = labels.get(port).cloned();
                c.port_bytes = c.port_bytes + label.as_ref().map_or(0, String::len)
                    - p.label.as_ref().map_or(0, String::len);
                p.label = label;
            }
            c.labels = labels;
            c.ports_json = None;
        }
        Some((view, relabel))
    }

    /// The owner's profile changed: the agent's control session (if it is here) sends it
    /// again.
    pub fn profile_changed(&self, id: Uuid) {
        if let Some(c) = self.lock().get(&id) {
            c.profile_changed.notify_one();
        }
    }

    /// What wakes the session's control loop to send the profile again.
    fn profile_signal(&self, id: Uuid, session: u64) -> std::sync::Arc<tokio::sync::Notify> {
        self.lock()
            .get(&id)
            .filter(|c| c.session == session)
            .map(|c| c.profile_changed.clone())
            .unwrap_or_default()
    }

    /// Records an agent's report of its direct clients on its live entry.
    fn set_direct_clients(
        &self,
        id: Uuid,
        session: u64,
        report: &protocol::control::DirectClients,
    ) {
        let clients = crate::domain::agent::DirectClientView::from_report(report, now_ms());
        if let Some(c) = self.lock().get_mut(&id).filter(|c| c.session == session) {
            c.info.direct_clients = clients;
        }
    }

    /// Records an agent's report of its sync sessions on its live entry; the view to
    /// publish when it changed.
    fn set_sync_sessions(
        &self,
        id: Uuid,
        session: u64,
        report: &protocol::control::SyncSessions,
    ) -> Option<Vec<SyncSessionView>> {
        let view = SyncSessionView::from_report(report);
        let mut agents = self.lock();
        let c = agents.get_mut(&id).filter(|c| c.session == session)?;
        (c.info.sync_sessions != view).then(|| {
            c.info.sync_sessions = view.clone();
            view
        })
    }

    /// Records an agent's report of its own figures on its live entry.
    fn set_stats(&self, id: Uuid, session: u64, stats: protocol::control::AgentStats) {
        if let Some(c) = self.lock().get_mut(&id).filter(|c| c.session == session) {
            c.info.stats = Some(crate::domain::agent::AgentStatsView {
                rss_bytes: stats.rss_bytes,
                cpu_ms: stats.cpu_ms,
                sessions: stats.sessions,
                at: now_ms(),
            });
        }
    }

    /// The agents' own figures added up (and the largest memory), over those that report.
    pub fn stats_totals(&self) -> crate::base::metrics::AgentTotals {
        let mut totals = crate::base::metrics::AgentTotals::default();
        for c in self.lock().values() {
            if let Some(s) = c.info.stats {
                totals.reporting += 1;
                totals.rss_bytes += s.rss_bytes;
                totals.rss_bytes_max = totals.rss_bytes_max.max(s.rss_bytes);
                totals.cpu_ms += s.cpu_ms;
                totals.sessions += u64::from(s.sessions);
            }
        }
        totals
    }

    /// Records an agent's activity report on its live entry.
    fn set_activity(&self, id: Uuid, session: u64, report: protocol::control::Activity) {
        let now = now_ms();
        if let Some(c) = self.lock().get_mut(&id).filter(|c| c.session == session) {
            c.info.attached_clients = report.attached_clients;
            c.info.last_input_at = report
                .input_ago_ms
                .map(|ago| now.saturating_sub(i64::try_from(ago).unwrap_or(i64::MAX)));
        }
    }

    /// Removes the session's entry; `None` if a newer session replaced it already, else
    /// whether it had moved to another replica.
    fn remove(&self, id: Uuid, session: u64) -> Option<bool> {
        let mut agents = self.lock();
        let current = agents.get(&id).is_some_and(|c| c.session == session);
        if current {
            agents.remove(&id).map(|c| c.moving)
        } else {
            None
        }
    }
}

/// The owner's profile changed: every agent of theirs gets it again, here at once and on
/// the other replicas through the `profile` event (which SSE subscribers see as well).
pub async fn profile_changed(hub: &Hub, owner: &str) -> Result<(), crate::store::StoreError> {
    for ws in hub.store.list_workspaces(Some(owner)).await? {
        hub.agents.profile_changed(ws.id);
        hub.events
            .publish(WorkspaceEvent::new(ws.id, &ws.owner_id, "profile"));
    }
    Ok(())
}

pub(crate) fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    conn.close(quinn::VarInt::from_u32(code.code()), reason.as_bytes());
}

/// Reads the header of the first stream a peer opens.
async fn first_stream(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, FramedRecv, StreamHeader), LinkError> {
    let (send, recv) = conn.accept_bi().await?;
    let mut recv = FramedRecv::with_limit(recv, CONTROL_FRAME_LIMIT);
    let header = recv.expect::<StreamHeader>().await?;
    Ok((send, recv, header))
}

pub(crate) async fn refuse_stream(
    send: &mut quinn::SendStream,
    reason: StreamRefusal,
    message: &str,
) {
    let reply = StreamReply::Refused(StreamRefused {
        reason,
        message: message.to_owned(),
    });
    let _ = send_msg(send, &reply).await;
    finish_and_flush(send).await;
}

/// Finishes a stream and waits (briefly) until the peer has read it, so that closing the
/// connection right after does not discard the last message.
pub(crate) async fn finish_and_flush(send: &mut quinn::SendStream) {
    let _ = send.finish();
    let _ = timeout(Duration::from_secs(2), send.stopped()).await;
}

/// Closes the connection with the code that fits a stream error.
pub(crate) fn close_for(conn: &quinn::Connection, remote: SocketAddr, err: &LinkError) {
    match err {
        LinkError::Protocol(e) => {
            tracing::warn!(%remote, error = %e, "protocol error from peer; closing connection");
            close(conn, CloseCode::ProtocolError, &e.to_string());
        }
        LinkError::Closed => close(conn, CloseCode::ProtocolError, "stream ended early"),
        other => tracing::debug!(%remote, error = %other, "connection lost"),
    }
}

pub(crate) async fn enrollment_connection(hub: &Hub, conn: quinn::Connection, remote: SocketAddr) {
    let (mut send, mut recv, header) =
        match timeout(FIRST_MESSAGE_TIMEOUT, first_stream(&conn)).await {
            Ok(Ok(first)) => first,
            Ok(Err(e)) => return close_for(&conn, remote, &e),
            Err(_) => return close(&conn, CloseCode::ProtocolError, "no stream opened in time"),
        };
    if !matches!(header, StreamHeader::Enroll(_)) {
        tracing::info!(%remote, "stream refused: no client certificate");
        refuse_stream(
            &mut send,
            StreamRefusal::Unauthorized,
            "this connection has no client certificate: only enrollment is allowed",
        )
        .await;
        let _ = timeout(Duration::from_secs(2), conn.closed()).await;
        return close(
            &conn,
            CloseCode::Unauthorized,
            "client certificate required",
        );
    }
    let result = async {
        send_msg(&mut send, &StreamReply::Accepted(Accepted {})).await?;
        let reply = match timeout(FIRST_MESSAGE_TIMEOUT, recv.expect::<EnrollMsg>()).await {
            Ok(Ok(EnrollMsg::Request(req))) => enroll(hub, &req).await,
            Ok(Ok(_)) => refusal(EnrollRefusal::BadRequest, "expected an enrollment request"),
            Ok(Err(e)) => return Err(e),
            Err(_) => refusal(EnrollRefusal::BadRequest, "no enrollment request in time"),
        };
        let outcome = match &reply {
            EnrollMsg::Issued(_) => "issued",
            _ => "refused",
        };
        hub.metrics
            .enrollments
            .get_or_create(&crate::base::metrics::Kind { kind: outcome })
            .inc();
        match &reply {
            EnrollMsg::Issued(i) => {
                tracing::info!(%remote, workspace = %i.workspace_id, "agent enrolled")
            }
            EnrollMsg::Refused(r) => {
                tracing::info!(%remote, reason = ?r.reason, "enrollment refused")
            }
            EnrollMsg::Request(_) => {}
        }
        send_msg(&mut send, &reply).await?;
        let _ = send.finish();
        Ok(())
    }
    .await;
    if let Err(e) = result {
        return close_for(&conn, remote, &e);
    }
    // The agent closes once it has the answer; closing first could drop the reply.
    if timeout(FIRST_MESSAGE_TIMEOUT, conn.closed()).await.is_err() {
        close(&conn, CloseCode::EnrollmentDone, "enrollment finished");
    }
}

fn refusal(reason: EnrollRefusal, message: &str) -> EnrollMsg {
    EnrollMsg::Refused(EnrollRefused {
        reason,
        message: message.to_owned(),
    })
}

/// Checks the token and signs the agent's key. Never logs the token.
async fn enroll(hub: &Hub, req: &EnrollRequest) -> EnrollMsg {
    if let Err(refused) = protocol::handshake::negotiate(req.protocol_version) {
        return refusal(EnrollRefusal::VersionUnsupported, &refused.message);
    }
    let key_fp = match ca::csr_key_fingerprint(&req.csr_der) {
        Ok(fp) => fp,
        Err(e) => return refusal(EnrollRefusal::BadRequest, &e.to_string()),
    };
    let workspace_id = match hub
        .store
        .redeem_enrollment_token(&token_hash(&req.token), &key_fp, now_ms())
        .await
    {
        Ok(Ok(id)) => id,
        Ok(Err(rejection)) => {
            let reason = match rejection {
                TokenRejection::Unknown => EnrollRefusal::UnknownToken,
                TokenRejection::Used => EnrollRefusal::TokenUsed,
                TokenRejection::Expired(workspace) => {
                    lifecycle::enrollment_expired(hub, workspace).await;
                    EnrollRefusal::TokenExpired
                }
            };
            return refusal(reason, &rejection.to_string());
        }
        Err(e) => {
            tracing::error!(error = %e, "redeem enrollment token");
            return refusal(
                EnrollRefusal::Unavailable,
                "the hub could not check the token",
            );
        }
    };
    match hub.store.get_workspace(workspace_id).await {
        Ok(ws) if ws.status != Status::Deleting => {}
        Ok(_) | Err(StoreError::NotFound) => {
            return refusal(
                EnrollRefusal::UnknownToken,
                "the workspace no longer exists",
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "load workspace for enrollment");
            return refusal(
                EnrollRefusal::Unavailable,
                "the hub could not load the workspace",
            );
        }
    }
    let cert_der = match hub
        .identity
        .ca
        .sign_agent(&req.csr_der, &workspace_id.to_string())
    {
        Ok(der) => der,
        Err(e) => return refusal(EnrollRefusal::BadRequest, &e.to_string()),
    };
    if let Err(e) = hub
        .store
        .put_agent_cert(workspace_id, &ca::fingerprint(&cert_der))
        .await
    {
        tracing::error!(error = %e, "record agent certificate");
        return refusal(
            EnrollRefusal::Unavailable,
            "the hub could not record the certificate",
        );
    }
    EnrollMsg::Issued(Issued {
        workspace_id: workspace_id.to_string(),
        cert_der,
    })
}

/// Maps a verified certificate to its workspace, or says why the agent is not accepted.
async fn authorize_agent(hub: &Hub, cert: &[u8]) -> Result<Workspace, &'static str> {
    let id = ca::agent_workspace_id(cert)
        .and_then(|cn| Uuid::parse_str(&cn).ok())
        .ok_or("certificate names no workspace")?;
    match hub.store.agent_cert(id).await {
        Ok(Some(fp)) if fp == ca::fingerprint(cert) => {}
        Ok(_) => return Err("certificate unknown or superseded"),
        Err(_) => return Err("the hub could not check the certificate"),
    }
    match hub.store.get_workspace(id).await {
        Ok(ws) if ws.status != Status::Deleting => Ok(ws),
        Ok(_) => Err("workspace is being deleted"),
        Err(_) => Err("workspace not found"),
    }
}

pub(crate) async fn agent_connection(
    hub: &Hub,
    conn: quinn::Connection,
    remote: SocketAddr,
    cert: &[u8],
) {
    let workspace = match authorize_agent(hub, cert).await {
        Ok(ws) => ws,
        Err(why) => {
            tracing::warn!(%remote, why, "agent refused");
            return close(&conn, CloseCode::Unauthorized, why);
        }
    };
    // During a CA rotation: which agents still hold a certificate of the CA being retired
    // (the rotation ends when none connects any more).
    if hub
        .identity
        .previous_ca
        .as_ref()
        .is_some_and(|previous| previous.issued(cert))
    {
        tracing::info!(workspace = %workspace.id, "agent on the previous CA connected");
    }
    let (mut send, mut recv, header) =
        match timeout(FIRST_MESSAGE_TIMEOUT, first_stream(&conn)).await {
            Ok(Ok(first)) => first,
            Ok(Err(e)) => return close_for(&conn, remote, &e),
            Err(_) => return close(&conn, CloseCode::ProtocolError, "no stream opened in time"),
        };
    if !matches!(header, StreamHeader::Control(_)) {
        refuse_stream(
            &mut send,
            StreamRefusal::BadHeader,
            "the first stream must be the control stream",
        )
        .await;
        return close(
            &conn,
            CloseCode::ProtocolError,
            "the first stream must be the control stream",
        );
    }
    if let Err(e) = control_session(hub, &conn, remote, &workspace, send, &mut recv).await {
        close_for(&conn, remote, &e);
    }
}

async fn control_session(
    hub: &Hub,
    conn: &quinn::Connection,
    remote: SocketAddr,
    workspace: &Workspace,
    mut send: quinn::SendStream,
    recv: &mut FramedRecv,
) -> Result<(), LinkError> {
    let workspace_id = workspace.id;
    send_msg(&mut send, &StreamReply::Accepted(Accepted {})).await?;
    let hello = match timeout(FIRST_MESSAGE_TIMEOUT, recv.expect::<ControlMsg>()).await {
        Ok(Ok(ControlMsg::Hello(hello))) => hello,
        Ok(Ok(_)) => return Err(protocol::ProtocolError::Unexpected("expected hello").into()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            close(conn, CloseCode::ProtocolError, "no hello in time");
            return Ok(());
        }
    };
    let cfg = &hub.config;
    let welcome = match protocol::handshake::accept_hello(
        &hello,
        env!("CARGO_PKG_VERSION"),
        cfg.heartbeat_interval,
        cfg.heartbeat_timeout,
    ) {
        Ok(welcome) => welcome,
        Err(refused) => {
            tracing::warn!(%remote, workspace = %workspace_id, reason = ?refused.reason, "hello refused");
            send_msg(&mut send, &ControlMsg::HelloRefused(refused.clone())).await?;
            finish_and_flush(&mut send).await;
            close(conn, CloseCode::VersionMismatch, &refused.message);
            return Ok(());
        }
    };
    let protocol_version = welcome.protocol_version;
    send_msg(&mut send, &ControlMsg::Welcome(welcome)).await?;
    if protocol_version >= protocol::DIRECT_SINCE_VERSION {
        let observed = protocol::control::Observed {
            addr: crate::links::clients::canonical(remote).to_string(),
        };
        send_msg(&mut send, &ControlMsg::Observed(observed)).await?;
    }
    if let Some(offer) = hub
        .agent_release
        .as_ref()
        .and_then(|r| r.offer_for(&hello.agent_version, protocol_version))
    {
        send_msg(&mut send, &ControlMsg::UpdateOffer(offer)).await?;
        crate::links::updates::offered(hub);
    }

    let epoch = crate::links::peers::new_epoch();
    let session = hub.agents.insert(
        workspace_id,
        AgentInfo {
            connected_since: now_ms(),
            agent_version: hello.agent_version.chars().take(64).collect(),
            hostname: hello.hostname.chars().take(255).collect(),
            protocol_version,
            remote_addr: remote.to_string(),
            attached_clients: 0,
            last_input_at: None,
            checkout: None,
            setup: None,
            direct_clients: Vec::new(),
            sync_sessions: Vec::new(),
            stats: None,
        },
        conn.clone(),
        epoch,
    );
    tracing::info!(%remote, workspace = %workspace_id, agent_version = %hello.agent_version, "agent connected");
    hub.metrics.agent_connects.inc();
    let mut touches = Touches::new(workspace, session);
    // The store learns of the connection (its route, its time, READY) while the heartbeats
    // already run: a hub waiting on a slow store must still answer them, or its agents give
    // up on it, and a fleet arriving at once (a replica's death) would never settle.
    let first = touches.due(hub, Instant::now(), false);
    let mut writing: Option<StoreWrite<'_>> = Some(Box::pin(async move {
        crate::links::peers::hold(hub, workspace_id, epoch).await;
        // Connection time first, so a workspace that reads READY also says when it connected.
        if let Some((wall, active)) = first {
            touch(hub, workspace_id, Some(wall), active).await;
        }
        mark_ready(hub, workspace).await;
    }));
    // The repository, on every connect: the agent does nothing if it is there already.
    if let Some(repo) = &workspace.metadata.repo
        && protocol_version >= protocol::ACTIVITY_SINCE_VERSION
    {
        let checkout = protocol::control::Checkout {
            repo: repo.clone(),
            branch: workspace.metadata.branch.clone(),
            token: hub.agents.checkout_token(workspace_id),
        };
        send_msg(&mut send, &ControlMsg::Checkout(checkout)).await?;
    }

    let result = heartbeat_loop(
        hub,
        conn,
        protocol_version,
        &mut touches,
        &mut writing,
        &mut send,
        recv,
    )
    .await;
    // What is being written lands before what the leaving connection writes.
    if let Some(write) = writing.take() {
        write.await;
    }
    touches.collect(hub);
    let removed = hub.agents.remove(workspace_id, session);
    if removed == Some(true) {
        // It moved to another replica, which records its connection and its route as it
        // arrives: only activity not written yet is left to write. (A leaving replica
        // would otherwise wait on two store writes per agent before it may exit.)
        touches.record_activity(hub).await;
    } else {
        touches.record(hub, Instant::now(), true).await;
        crate::links::peers::release(hub, workspace_id, epoch).await;
    }
    if removed.is_some() {
        hub.previews.forget(workspace_id);
    }
    // Its ports are out of reach until it is back (and reports them again); an agent that
    // moved is back already, on another replica.
    if removed == Some(false) {
        hub.events.publish(
            WorkspaceEvent::new(workspace_id, &workspace.owner_id, "port")
                .with_detail(Detail::Ports),
        );
    }
    tracing::info!(%remote, workspace = %workspace_id, "agent disconnected");
    result
}

/// A hello turns a provisioning (or starting) workspace READY.
async fn mark_ready(hub: &Hub, ws: &Workspace) {
    const FROM: [Status; 2] = [Status::Provisioning, Status::Starting];
    if !FROM.contains(&ws.status) {
        return;
    }
    match hub.transition(ws.id, &FROM, Status::Ready, None).await {
        Ok(_) => tracing::info!(workspace = %ws.id, "workspace ready"),
        Err(StoreError::Conflict { .. }) => {}
        Err(e) => tracing::warn!(workspace = %ws.id, error = %e, "mark workspace ready"),
    }
}

/// Keeps `last_connected_at` and `last_active_at` current while writing the record at most
/// once per [`LAST_CONNECTED_WRITE_INTERVAL`] per workspace; activity seen in between is
/// kept and written with the next write.
struct Touches {
    id: Uuid,
    /// The workspace's owner (whose profile the agent gets).
    owner: String,
    session: u64,
    /// When the stored values were last written (by this session or, roughly, before it).
    written: Option<Instant>,
    pending_active: Option<i64>,
    /// The last activity time written.
    written_active: Option<i64>,
}

impl Touches {
    fn new(ws: &Workspace, session: u64) -> Self {
        let age_ms = ws
            .last_connected_at
            .map(|at| now_ms().saturating_sub(at).max(0) as u64);
        Self {
            id: ws.id,
            owner: ws.owner_id.clone(),
            session,
            written: age_ms.and_then(|age| Instant::now().checked_sub(Duration::from_millis(age))),
            pending_active: None,
            written_active: None,
        }
    }

    /// Takes the agent's last activity from the registry (while its entry is there).
    fn collect(&mut self, hub: &Hub) {
        if let Some(at) = hub.agents.active_at(self.id, now_ms()) {
            self.pending_active = self.pending_active.max(Some(at));
        }
    }

    /// Writes the activity not written yet, if any (not the connection time).
    async fn record_activity(&mut self, hub: &Hub) {
        let active = self.pending_active.take();
        if active > self.written_active {
            touch(hub, self.id, None, active).await;
        }
    }

    /// What to write now, if anything: the connection time (at most once per
    /// [`LAST_CONNECTED_WRITE_INTERVAL`], or now if `force`: the agent is leaving) with the
    /// activity not written yet. It counts as written from here on.
    fn due(&mut self, hub: &Hub, now: Instant, force: bool) -> Option<(i64, Option<i64>)> {
        let wall = now_ms();
        self.collect(hub);
        if !force
            && self
                .written
                .is_some_and(|at| now.duration_since(at) < LAST_CONNECTED_WRITE_INTERVAL)
        {
            return None;
        }
        self.written = Some(now);
        let active = self.pending_active.take();
        self.written_active = self.written_active.max(active);
        Some((wall, active))
    }

    /// Writes what is [`due`](Self::due).
    async fn record(&mut self, hub: &Hub, now: Instant, force: bool) {
        if let Some((wall, active)) = self.due(hub, now, force) {
            touch(hub, self.id, Some(wall), active).await;
        }
    }
}

/// A store write a control session makes beside its heartbeats.
type StoreWrite<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;
/// A read of the owner's profile in flight.
type ProfileRead<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<crate::store::Profile, crate::store::StoreError>>
            + Send
            + 'a,
    >,
>;

/// Records the agent's connection time, its activity, or both.
async fn touch(hub: &Hub, id: Uuid, connected_at: Option<i64>, active: Option<i64>) {
    if let Err(e) = hub.store.touch(id, connected_at, active).await {
        tracing::warn!(workspace = %id, error = %e, "record last connection or activity");
    }
}

/// Reports (of any kind) an agent may send per second, sustained; and the burst it may send
/// at once (a connect: the port list, activity, the checkout). A report is one message, or
/// 16 entries of a port list. Far above what a real agent sends, far below a flood.
const REPORT_RATE: f64 = 200.0;
const REPORT_BURST: f64 = 1000.0;
/// The hub says in its log at most this often that a workspace's reports were slowed.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What one control message costs an agent's report budget.
fn report_cost(msg: &ControlMsg) -> u32 {
    match msg {
        ControlMsg::Ports(all) => 1 + (all.ports.len().min(MAX_PORTS) / 16) as u32,
        ControlMsg::SyncSessions(all) => 1 + (all.sessions.len() / 16) as u32,
        _ => 1,
    }
}

/// A token bucket of report units. Taking more than there is leaves a debt; the caller
/// waits it off before doing the work, so a flood is slowed to the rate, never dropped.
#[derive(Debug)]
struct ReportBudget {
    tokens: f64,
    at: Instant,
    /// Reports slowed since the last log line, and when that was.
    delayed: u64,
    logged: Option<Instant>,
}

impl ReportBudget {
    fn new(now: Instant) -> Self {
        Self {
            tokens: REPORT_BURST,
            at: now,
            delayed: 0,
            logged: None,
        }
    }

    /// Takes `cost` units; returns how long to wait before the report is handled.
    fn take(&mut self, now: Instant, cost: u32) -> Duration {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * REPORT_RATE;
        self.tokens = (self.tokens + refill).min(REPORT_BURST) - f64::from(cost);
        self.at = now;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        self.delayed += 1;
        Duration::from_secs_f64(-self.tokens / REPORT_RATE)
    }

    /// The number of reports slowed, when it is time to say so in the log.
    fn should_log(&mut self, now: Instant) -> Option<u64> {
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < LIMIT_LOG_INTERVAL)
        {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.delayed))
    }
}

/// Serves the control stream until the connection ends. `writing` is the store write in
/// flight (one at a time, in order); the loop goes on answering while it lands.
async fn heartbeat_loop<'a>(
    hub: &'a Hub,
    conn: &quinn::Connection,
    protocol_version: u16,
    touches: &mut Touches,
    writing: &mut Option<StoreWrite<'a>>,
    send: &mut quinn::SendStream,
    recv: &mut FramedRecv,
) -> Result<(), LinkError> {
    let workspace_id = touches.id;
    // The agent pings every interval; the hub answers, and pings on its own only if the agent
    // falls quiet, so an idle agent costs one round trip per interval.
    let cfg = &hub.config;
    let mut live = Liveness::new(
        Instant::now(),
        cfg.heartbeat_interval * 3 / 2,
        cfg.heartbeat_timeout,
    );
    let mut budget = ReportBudget::new(Instant::now());
    // The checkout states this connection has logged (each once, however often reported).
    let mut checkout_logged: Vec<&'static str> = Vec::new();
    // The owner's profile (protocol 7+): read once now, and again whenever it changes.
    let setup = protocol_version >= protocol::SETUP_SINCE_VERSION;
    let profile_changed = hub.agents.profile_signal(workspace_id, touches.session);
    profile_changed.notify_one();
    let mut profile_read: Option<ProfileRead<'a>> = None;
    // Agent binaries sent on this connection.
    let mut updates_sent = 0u32;
    loop {
        let deadline = tokio::time::Instant::from_std(live.next_deadline());
        tokio::select! {
            msg = recv.next::<ControlMsg>() => {
                let msg = msg?;
                // Over its budget, the agent waits: the hub reads nothing more from it
                // meanwhile, and QUIC flow control holds the rest on the agent's side.
                let wait = budget.take(Instant::now(), msg.as_ref().map_or(0, report_cost));
                if !wait.is_zero() {
                    if let Some(delayed) = budget.should_log(Instant::now()) {
                        tracing::warn!(
                            workspace = %workspace_id,
                            delayed,
                            per_second = REPORT_RATE,
                            "agent reports over budget: slowed down"
                        );
                    }
                    tokio::time::sleep(wait).await;
                }
                let now = Instant::now();
                match msg {
                    Some(ControlMsg::Ping(ping)) => {
                        let pong = live.on_ping(now, ping);
                        send_msg(send, &ControlMsg::Pong(pong)).await?;
                        live.on_sent(now);
                    }
                    Some(ControlMsg::Pong(_)) => live.on_heard(now),
                    Some(ControlMsg::Activity(report)) => {
                        live.on_heard(now);
                        hub.agents.set_activity(workspace_id, touches.session, report);
                    }
                    Some(ControlMsg::DirectClients(report)) => {
                        live.on_heard(now);
                        hub.agents.set_direct_clients(workspace_id, touches.session, &report);
                    }
                    Some(ControlMsg::CheckoutStatus(status)) => {
                        live.on_heard(now);
                        let view = CheckoutView::from(&status);
                        if !checkout_logged.contains(&view.state) {
                            checkout_logged.push(view.state);
                            tracing::info!(workspace = %workspace_id, state = view.state, "checkout");
                        }
                        hub.events.publish(
                            WorkspaceEvent::new(workspace_id, &touches.owner, "checkout")
                                .with_detail(serde_json::to_value(&view).map_or(Detail::None, Detail::Json)),
                        );
                        hub.agents.set_checkout(workspace_id, touches.session, view);
                    }
                    Some(ControlMsg::Setup(report)) => {
                        live.on_heard(now);
                        if let Some((view, relabeled)) = hub.agents.set_setup(workspace_id, touches.session, report) {
                            hub.events.publish(
                                WorkspaceEvent::new(workspace_id, &touches.owner, "setup")
                                    .with_detail(serde_json::to_value(&view).map_or(Detail::None, Detail::Json)),
                            );
                            if relabeled {
                                hub.events.publish(
                                    WorkspaceEvent::new(workspace_id, &touches.owner, "port")
                                        .with_detail(Detail::Ports),
                                );
                            }
                        }
                    }
                    Some(ControlMsg::UpdateRequest(request)) if protocol_version >= protocol::UPDATE_SINCE_VERSION => {
                        live.on_heard(now);
                        // Bounded per connection (`SENDS_PER_CONNECTION`).
                        updates_sent += 1;
                        if updates_sent <= crate::links::updates::SENDS_PER_CONNECTION {
                            crate::links::updates::send(hub, conn, workspace_id, &request.version);
                        } else {
                            tracing::warn!(workspace = %workspace_id, "agent asked for its update too often: ignored");
                        }
                    }
                    Some(ControlMsg::UpdateStatus(status)) if protocol_version >= protocol::UPDATE_SINCE_VERSION => {
                        live.on_heard(now);
                        crate::links::updates::status(hub, workspace_id, &status);
                    }
                    Some(ControlMsg::AgentStats(stats)) => {
                        live.on_heard(now);
                        hub.agents.set_stats(workspace_id, touches.session, stats);
                    }
                    Some(ControlMsg::SyncSessions(report)) => {
                        live.on_heard(now);
                        if let Some(view) = hub.agents.set_sync_sessions(workspace_id, touches.session, &report) {
                            hub.events.publish(
                                WorkspaceEvent::new(workspace_id, &touches.owner, "sync")
                                    .with_detail(Detail::Json(serde_json::json!({"sessions": view}))),
                            );
                        }
                    }
                    Some(report @ (ControlMsg::Ports(_) | ControlMsg::PortOpened(_) | ControlMsg::PortClosed(_))) => {
                        live.on_heard(now);
                        if let Some(detail) = hub.agents.apply_ports(workspace_id, touches.session, report) {
                            hub.events.publish(
                                WorkspaceEvent::new(workspace_id, &touches.owner, "port")
                                    .with_detail(detail),
                            );
                        }
                    }
                    Some(_) => return Err(protocol::ProtocolError::Unexpected("handshake message after hello").into()),
                    None => return Ok(()),
                }
                if writing.is_none()
                    && let Some((wall, active)) = touches.due(hub, now, false)
                {
                    *writing = Some(Box::pin(touch(hub, workspace_id, Some(wall), active)));
                }
            }
            () = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                *writing = None;
            }
            () = profile_changed.notified(), if setup && profile_read.is_none() => {
                let owner = touches.owner.clone();
                profile_read = Some(Box::pin(async move { hub.store.get_profile(&owner).await }));
            }
            read = async { profile_read.as_mut().expect("guarded").await }, if profile_read.is_some() => {
                profile_read = None;
                match read {
                    Ok(profile) => {
                        let msg = ControlMsg::Profile(crate::domain::profile::for_agent(&profile));
                        send_msg(send, &msg).await?;
                        live.on_sent(Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(workspace = %workspace_id, error = %e, "profile not read; trying again");
                        let again = profile_changed.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            again.notify_one();
                        });
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if live.is_expired(now) {
                    tracing::info!(workspace = %workspace_id, "agent heartbeat timed out");
                    close(conn, CloseCode::HeartbeatTimeout, "no heartbeat");
                    return Ok(());
                }
                if let Some(ping) = live.poll_ping(now) {
                    send_msg(send, &ControlMsg::Ping(ping)).await?;
                }
            }
            _ = hub.draining.cancelled(), if hub.peers.enabled() => {
                if protocol_version < protocol::MOVE_SINCE_VERSION {
                    close(conn, CloseCode::ShuttingDown, "hub replica leaving");
                    return Ok(());
                }
                let drain_ms = u64::try_from(cfg.drain_timeout.as_millis()).unwrap_or(u64::MAX);
                send_msg(send, &ControlMsg::Move(protocol::control::Move { drain_ms })).await?;
                hub.agents.set_moving(workspace_id, touches.session);
                tracing::info!(workspace = %workspace_id, "agent asked to move");
                // The agent closes this connection once the streams on it have ended.
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = hub.shutdown.cancelled() => close(conn, CloseCode::ShuttingDown, "hub shutting down"),
                }
                return Ok(());
            }
            _ = hub.shutdown.cancelled() => {
                close(conn, CloseCode::ShuttingDown, "hub shutting down");
                return Ok(());
            }
            _ = conn.closed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_budget_lets_bursts_through_and_slows_a_flood_to_its_rate() {
        let t0 = Instant::now();
        let mut b = ReportBudget::new(t0);
        // A connect's burst goes through at once.
        for _ in 0..REPORT_BURST as usize {
            assert_eq!(b.take(t0, 1), Duration::ZERO);
        }
        // Past it, each report waits its share of a second.
        let wait = b.take(t0, 1);
        assert!(
            (wait.as_secs_f64() - 1.0 / REPORT_RATE).abs() < 1e-9,
            "{wait:?}"
        );
        let wait = b.take(t0, 1);
        assert!(
            (wait.as_secs_f64() - 2.0 / REPORT_RATE).abs() < 1e-9,
            "{wait:?}"
        );
        // Said once, then not again within the interval; the count starts over.
        assert_eq!(b.should_log(t0), Some(2));
        b.take(t0, 1);
        assert_eq!(b.should_log(t0 + Duration::from_secs(1)), None);
        assert_eq!(b.should_log(t0 + LIMIT_LOG_INTERVAL), Some(1));
        // Time refills it, up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take(later, 1), Duration::ZERO);
        assert!(b.tokens <= REPORT_BURST);
    }

    #[test]
    fn a_full_port_list_costs_more_than_one_message_and_less_than_the_burst() {
        let port = protocol::control::PortInfo {
            port: 1,
            addresses: Vec::new(),
            loopback_only: false,
            pid: None,
            process: String::new(),
            command: String::new(),
            http: None,
        };
        let list = |n| {
            ControlMsg::Ports(protocol::control::Ports {
                source: protocol::control::PortSource::SockDiag,
                ports: vec![port.clone(); n],
            })
        };
        assert_eq!(report_cost(&list(0)), 1);
        assert_eq!(report_cost(&list(6500)), 1 + 4096 / 16);
        assert!(f64::from(report_cost(&list(6500))) < REPORT_BURST);
    }
}
