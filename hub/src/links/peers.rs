//! Replicas of one hub. With `peer_addr` set, this process is one of several replicas: it
//! registers itself in the store (renewed every third of [`REPLICA_TTL`]), records which
//! agents it holds (with each connection's epoch, so a stale record never wins), and reaches
//! an agent another replica holds through that replica: a QUIC connection with ALPN
//! `wsh-peer/1` and mutual TLS (a replica certificate from the shared hub CA), kept and
//! reused, whose streams start with `StreamHeader::PeerAgent` and are then spliced to the
//! agent byte for byte.
//!
//! [`agent_path`] is how every user of agent streams (browser and CLI terminals, previews,
//! forwards, sync) finds the agent, on this replica or through another; [`remote_agents`]
//! asks the other replicas what they know of the agents they hold (the `agent` field and
//! port list of the API).

use crate::base::workspace::{Status, Workspace, now_ms};
use crate::links::agents::{CONTROL_FRAME_LIMIT, FIRST_MESSAGE_TIMEOUT, close, refuse_stream};
use crate::store::{AgentRoute, ReplicaRecord};
use crate::{AppState, Hub, base::ca};
use link::{FramedRecv, LinkError, send_msg};
use protocol::close::CloseCode;
use protocol::peer::{PeerAgentView, PeerMsg};
use protocol::stream::{
    MAX_VIEW_IDS, PeerAgentOpen, PeerAgentViewsOpen, StreamHeader, StreamRefusal,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::time::timeout;
use uuid::Uuid;

/// How long a replica's registration lives without renewal.
pub const REPLICA_TTL: Duration = Duration::from_secs(15);
/// How long dialing another replica may take.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams another replica may have open to this one at once (terminals, previews,
/// forwards and sync sessions of its users).
const PEER_STREAMS: u32 = 4096;
/// How long another replica may take to say what it knows of its agents.
const VIEWS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a read of the replica registry serves questions to the other replicas.
const REPLICA_LIST_TTL: Duration = Duration::from_secs(2);

/// This replica's place among the others.
#[derive(Default)]
pub struct Peers {
    /// The configured peer address; `None` for a single hub (no registry, no routes).
    /// Port 0 stands for the port the QUIC endpoint bound.
    configured: Option<String>,
    /// The address the other replicas dial, known once the endpoint is bound.
    addr: OnceLock<String>,
    /// The endpoint and client config other replicas are dialed with (set at start).
    dialer: OnceLock<(quinn::Endpoint, quinn::ClientConfig)>,
    /// Connections to other replicas, by replica id and address.
    conns: Mutex<HashMap<(String, String), quinn::Connection>>,
    /// The live replicas as last read from the store, and when.
    listed: Mutex<Option<(tokio::time::Instant, Vec<ReplicaRecord>)>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("addr", &self.addr.get())
            .finish_non_exhaustive()
    }
}

impl Peers {
    pub fn new(configured: Option<String>) -> Self {
        Self {
            configured,
            ..Default::default()
        }
    }

    /// Whether this hub runs as one of several replicas.
    pub fn enabled(&self) -> bool {
        self.configured.is_some()
    }

    /// Gives the peer side what it dials with: the hub's own endpoint and a client config
    /// presenting this replica's certificate.
    pub fn start(&self, endpoint: quinn::Endpoint, config: quinn::ClientConfig) {
        if let (Some(configured), Ok(bound)) = (&self.configured, endpoint.local_addr()) {
            let addr = match configured.rsplit_once(':') {
                Some((host, "0")) => format!("{host}:{}", bound.port()),
                _ => configured.clone(),
            };
            let _ = self.addr.set(addr);
        }
        let _ = self.dialer.set((endpoint, config));
    }

    /// The connection to `replica`, dialed if there is none alive.
    async fn connect(
        &self,
        replica: &ReplicaRecord,
        server_name: &str,
    ) -> Result<quinn::Connection, String> {
        let key = (replica.id.clone(), replica.peer_addr.clone());
        if let Some(conn) = self.lock().get(&key)
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let (endpoint, config) = self.dialer.get().ok_or("the peer link is not started")?;
        let addr = tokio::net::lookup_host(&replica.peer_addr)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("the peer address resolves to nothing")?;
        let connecting = endpoint
            .connect_with(config.clone(), addr, server_name)
            .map_err(|e| e.to_string())?;
        let conn = timeout(PEER_CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        self.lock().insert(key, conn.clone());
        Ok(conn)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), quinn::Connection>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The other live replicas, from a read of the store at most [`REPLICA_LIST_TTL`] old (the
/// last list read, if the store cannot answer now).
async fn other_replicas(hub: &Hub) -> Vec<ReplicaRecord> {
    let cached = hub
        .peers
        .listed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let list = match cached {
        Some((at, list)) if at.elapsed() < REPLICA_LIST_TTL => list,
        stale => match hub.store.list_replicas(now_ms()).await {
            Ok(list) => {
                *hub.peers.listed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((tokio::time::Instant::now(), list.clone()));
                list
            }
            Err(e) => {
                tracing::warn!(error = %e, "list replicas");
                stale.map(|(_, list)| list).unwrap_or_default()
            }
        },
    };
    list.into_iter()
        .filter(|r| r.id != hub.replica_id)
        .collect()
}

/// An agent another replica holds, as that replica showed it (the API's JSON shapes).
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    pub agent: serde_json::Value,
    pub ports: serde_json::Value,
}

/// What the other replicas know of the agents of `ids` this replica does not hold. A
/// replica that does not answer in time is left out (its agents show as not connected).
pub async fn remote_agents(hub: &Hub, ids: &[Uuid]) -> HashMap<Uuid, RemoteAgent> {
    let mut found: HashMap<Uuid, RemoteAgent> = HashMap::new();
    if !hub.peers.enabled() {
        return found;
    }
    let wanted: Vec<String> = ids
        .iter()
        .filter(|id| hub.agents.connection(**id).is_none())
        .map(Uuid::to_string)
        .collect();
    if wanted.is_empty() {
        return found;
    }
    let replicas = other_replicas(hub).await;
    let asks = replicas.iter().flat_map(|replica| {
        wanted
            .chunks(MAX_VIEW_IDS)
            .map(move |chunk| ask_views(hub, replica, chunk.to_vec()))
    });
    for (replica, views) in futures_util::future::join_all(asks).await {
        for view in views {
            let parsed = Uuid::parse_str(&view.workspace_id).ok().zip(
                serde_json::from_str::<serde_json::Value>(&view.agent)
                    .ok()
                    .zip(serde_json::from_str::<serde_json::Value>(&view.ports).ok()),
            );
            let Some((id, (agent, ports))) = parsed.filter(|(id, (agent, ports))| {
                ids.contains(id) && agent.is_object() && ports["ports"].is_object()
            }) else {
                tracing::warn!(%replica, "a replica's agent view is malformed; ignored");
                continue;
            };
            // While an agent moves, two replicas may both hold it for a moment: the
            // newer connection is the one that counts.
            let since = |a: &serde_json::Value| a["connected_since"].as_i64().unwrap_or(0);
            if found
                .get(&id)
                .is_none_or(|old| since(&old.agent) < since(&agent))
            {
                found.insert(id, RemoteAgent { agent, ports });
            }
        }
    }
    found
}

/// What the other replicas know of workspace `id`'s agent, if another one holds it.
pub async fn remote_agent(hub: &Hub, id: Uuid) -> Option<RemoteAgent> {
    remote_agents(hub, &[id]).await.remove(&id)
}

/// Asks `replica` about the agents of `ids`; nothing if it cannot say in time.
async fn ask_views(
    hub: &Hub,
    replica: &ReplicaRecord,
    ids: Vec<String>,
) -> (String, Vec<PeerAgentView>) {
    let ask = async {
        let server_name = hub.config.server_names.first()?;
        let conn = hub.peers.connect(replica, server_name).await.ok()?;
        let (mut send, recv) = conn.open_bi().await.ok()?;
        let open = PeerAgentViewsOpen { workspace_ids: ids };
        send_msg(&mut send, &StreamHeader::PeerAgentViews(open))
            .await
            .ok()?;
        let _ = send.finish();
        let mut recv = FramedRecv::with_limit(recv, protocol::MAX_FRAME_LEN);
        match recv.expect::<PeerMsg>().await {
            Ok(PeerMsg::AgentViews(views)) => Some(views),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(replica = %replica.id, error = %e, "agent views");
                None
            }
        }
    };
    let views = timeout(VIEWS_TIMEOUT, ask).await.ok().flatten();
    (replica.id.clone(), views.unwrap_or_default())
}

/// Answers another replica's question about the agents of some workspaces.
async fn answer_views(hub: &Hub, mut send: quinn::SendStream, open: PeerAgentViewsOpen) {
    if open.workspace_ids.len() > MAX_VIEW_IDS {
        return refuse_stream(&mut send, StreamRefusal::BadHeader, "too many workspaces").await;
    }
    let ids: Vec<Uuid> = open
        .workspace_ids
        .iter()
        .filter_map(|id| Uuid::parse_str(id).ok())
        .collect();
    let views = hub.agents.views(&ids, protocol::MAX_FRAME_LEN / 2);
    if send_msg(&mut send, &PeerMsg::AgentViews(views))
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
}

/// Where a workspace's agent is reached from this replica.
#[derive(Debug, Clone)]
pub enum AgentPath {
    /// This replica holds the agent's connection.
    Local(quinn::Connection),
    /// Another replica does: streams go through it.
    Peer {
        /// The replica's id.
        replica: String,
        conn: quinn::Connection,
        open: PeerAgentOpen,
    },
}

impl AgentPath {
    /// The replica the path goes through, if not this one.
    pub fn replica(&self) -> Option<&str> {
        match self {
            Self::Local(_) => None,
            Self::Peer { replica, .. } => Some(replica),
        }
    }

    /// A bidirectional stream to the agent. Through a peer, the stream starts with the
    /// `PeerAgent` header; what the caller writes next reaches the agent unchanged.
    pub async fn open_bi(&self) -> Result<(quinn::SendStream, quinn::RecvStream), LinkError> {
        match self {
            Self::Local(conn) => Ok(conn.open_bi().await?),
            Self::Peer { conn, open, .. } => {
                let (mut send, recv) = conn.open_bi().await?;
                send_msg(&mut send, &StreamHeader::PeerAgent(open.clone())).await?;
                Ok((send, recv))
            }
        }
    }

    /// Resolves when the path is gone: the agent's connection, or the one to its replica
    /// (whose streams end when the agent's connection there does).
    pub async fn closed(&self) {
        match self {
            Self::Local(conn) | Self::Peer { conn, .. } => {
                conn.closed().await;
            }
        }
    }
}

/// The path to a workspace's agent: its connection if this replica holds it, else through
/// the replica the store's route names. `None` when no live replica holds it.
pub async fn agent_path(hub: &Hub, id: Uuid) -> Option<AgentPath> {
    if let Some(conn) = hub.agents.connection(id) {
        return Some(AgentPath::Local(conn));
    }
    if !hub.peers.enabled() {
        return None;
    }
    let route = match hub.store.agent_route(id).await {
        Ok(route) => route?,
        Err(e) => {
            tracing::warn!(workspace = %id, error = %e, "read the agent's route");
            return None;
        }
    };
    if route.replica_id == hub.replica_id {
        // Our own record of a connection that has ended.
        return None;
    }
    let replica = match hub.store.get_replica(&route.replica_id, now_ms()).await {
        Ok(replica) => replica?,
        Err(e) => {
            tracing::warn!(replica = %route.replica_id, error = %e, "read the replica registry");
            return None;
        }
    };
    let server_name = hub.config.server_names.first()?;
    match hub.peers.connect(&replica, server_name).await {
        Ok(conn) => Some(AgentPath::Peer {
            replica: replica.id.clone(),
            conn,
            open: PeerAgentOpen {
                workspace_id: id.to_string(),
                epoch: route.epoch,
            },
        }),
        Err(e) => {
            tracing::warn!(replica = %replica.id, addr = %replica.peer_addr, error = %e, "reach replica");
            None
        }
    }
}

/// How long a request for a READY workspace's agent waits for the agent to come back when
/// it is away: moving off a leaving replica, or reconnecting after its replica died, takes
/// it about a second.
pub const AGENT_RETURN_WAIT: Duration = Duration::from_secs(3);

/// [`agent_path`], but for a READY workspace (whose agent is expected) it waits up to
/// [`AGENT_RETURN_WAIT`] for the agent to be back, so a preview or a new terminal during a
/// rolling restart is slow for a moment instead of failing.
pub async fn agent_path_waiting(hub: &Hub, ws: &Workspace) -> Option<AgentPath> {
    let deadline = tokio::time::Instant::now() + AGENT_RETURN_WAIT;
    loop {
        if let Some(path) = agent_path(hub, ws.id).await {
            return Some(path);
        }
        if ws.status != Status::Ready
            || hub.draining.is_cancelled()
            || tokio::time::Instant::now() >= deadline
        {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The epoch of a new agent connection: microseconds since the Unix epoch.
pub fn new_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// This replica's route for an agent connection of `epoch`.
fn own_route(hub: &Hub, epoch: i64) -> AgentRoute {
    AgentRoute {
        replica_id: hub.replica_id.clone(),
        epoch,
    }
}

/// Records that this replica holds the agent's connection `epoch` (replicas only).
pub async fn hold(hub: &Hub, id: Uuid, epoch: i64) {
    if !hub.peers.enabled() {
        return;
    }
    let route = own_route(hub, epoch);
    match hub.store.put_agent_route(id, &route).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(workspace = %id, "a newer connection of this agent is recorded")
        }
        Err(e) => tracing::warn!(workspace = %id, error = %e, "record the agent's route"),
    }
}

/// Removes this replica's route for the agent's connection `epoch`, if still current.
pub async fn release(hub: &Hub, id: Uuid, epoch: i64) {
    if !hub.peers.enabled() {
        return;
    }
    let route = own_route(hub, epoch);
    if let Err(e) = hub.store.clear_agent_route(id, &route).await {
        tracing::warn!(workspace = %id, error = %e, "clear the agent's route");
    }
}

/// Keeps this replica registered (replicas only) until shutdown, then removes it.
pub async fn register(hub: AppState) {
    let Some(addr) = hub.peers.addr.get().cloned() else {
        return;
    };
    let mut tick = tokio::time::interval(REPLICA_TTL / 3);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hub.shutdown.cancelled() => break,
        }
        let record = ReplicaRecord {
            id: hub.replica_id.clone(),
            peer_addr: addr.clone(),
            expires_at: now_ms() + REPLICA_TTL.as_millis() as i64,
        };
        if let Err(e) = hub.store.put_replica(&record).await {
            tracing::warn!(error = %e, "renew the replica registration");
        }
    }
    if let Err(e) = hub.store.delete_replica(&hub.replica_id).await {
        tracing::warn!(error = %e, "remove the replica registration");
    }
}

/// A connection from another replica: every stream goes to an agent this replica holds.
pub async fn peer_connection(hub: AppState, conn: quinn::Connection, remote: SocketAddr) {
    let Some(replica) = link::peer_certificate(&conn).and_then(|cert| ca::replica_id(&cert)) else {
        tracing::warn!(%remote, "peer connection without a replica certificate refused");
        return close(&conn, CloseCode::Unauthorized, "not a replica of this hub");
    };
    conn.set_max_concurrent_bi_streams(PEER_STREAMS.into());
    tracing::debug!(%remote, %replica, "replica connected");
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    tokio::spawn(peer_stream(hub.clone(), replica.clone(), send, recv));
                }
                Err(_) => return,
            },
            _ = hub.shutdown.cancelled() => {
                return close(&conn, CloseCode::ShuttingDown, "hub replica shutting down");
            }
        }
    }
}

/// One stream from another replica: `PeerAgent` (a splice to the agent), `PeerEvents` or
/// `PeerAgentViews`.
async fn peer_stream(
    hub: AppState,
    replica: String,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut recv = FramedRecv::with_limit(recv, CONTROL_FRAME_LIMIT);
    let open = match timeout(FIRST_MESSAGE_TIMEOUT, recv.expect::<StreamHeader>()).await {
        Ok(Ok(StreamHeader::PeerAgent(open))) => open,
        Ok(Ok(StreamHeader::PeerEvents(_))) => {
            // A port list travels whole.
            recv.set_limit(protocol::MAX_FRAME_LEN);
            return receive_events(&hub, &replica, recv).await;
        }
        Ok(Ok(StreamHeader::PeerAgentViews(open))) => return answer_views(&hub, send, open).await,
        _ => {
            return refuse_stream(
                &mut send,
                StreamRefusal::BadHeader,
                "a peer stream starts with PeerAgent, PeerEvents or PeerAgentViews",
            )
            .await;
        }
    };
    // The opener's own header to the agent: only the kinds users open go through.
    let inner = match timeout(FIRST_MESSAGE_TIMEOUT, recv.expect::<StreamHeader>()).await {
        Ok(Ok(
            h @ (StreamHeader::Pty(_)
            | StreamHeader::TcpForward(_)
            | StreamHeader::Forward(_)
            | StreamHeader::Exec(_)
            | StreamHeader::Sync(_)),
        )) => h,
        _ => {
            return refuse_stream(
                &mut send,
                StreamRefusal::BadHeader,
                "a PeerAgent stream carries a Pty, TcpForward, Forward, Exec or Sync stream",
            )
            .await;
        }
    };
    let agent = Uuid::parse_str(&open.workspace_id)
        .ok()
        .and_then(|id| hub.agents.connection_at(id, open.epoch));
    let Some(agent) = agent else {
        return refuse_stream(
            &mut send,
            StreamRefusal::Moved,
            "the workspace's agent is not held here",
        )
        .await;
    };
    // Streams through a leaving replica end as its own do.
    let cut = crate::links::clients::cut_when_draining(&hub, &inner);
    let agent = AgentPath::Local(agent);
    if let Err(e) =
        crate::links::clients::splice(&hub.metrics, agent, &inner, send, recv, cut).await
    {
        tracing::debug!(workspace = %open.workspace_id, error = %e, "peer stream ended");
    }
}

/// How long one event may take to reach one replica before its stream is dropped (and
/// opened again for the next event), so a stuck replica never holds up the others.
const EVENT_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends every event that happens on this replica to the others' subscribers, one stream
/// per replica, in order (replicas only).
pub async fn forward_events(
    hub: AppState,
    mut events: tokio::sync::mpsc::Receiver<std::sync::Arc<crate::domain::events::WorkspaceEvent>>,
) {
    let mut streams: HashMap<String, quinn::SendStream> = HashMap::new();
    let mut leaving_told = false;
    loop {
        let msg = tokio::select! {
            event = events.recv() => match event {
                Some(event) => protocol::peer::PeerMsg::Event(peer_event(&hub, &event)),
                None => return,
            },
            _ = hub.draining.cancelled(), if !leaving_told => {
                leaving_told = true;
                protocol::peer::PeerMsg::Leaving(Default::default())
            }
            _ = hub.shutdown.cancelled() => return,
        };
        let replicas = other_replicas(&hub).await;
        streams.retain(|id, _| replicas.iter().any(|r| &r.id == id));
        for replica in &replicas {
            // A kept stream may have died with the replica's previous process (a restart
            // keeps the id): then once more on a new one.
            for _ in 0..2 {
                let send = match streams.entry(replica.id.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        match open_events(&hub, replica).await {
                            Some(send) => e.insert(send),
                            None => break,
                        }
                    }
                };
                if matches!(
                    timeout(EVENT_SEND_TIMEOUT, send_msg(send, &msg)).await,
                    Ok(Ok(()))
                ) {
                    break;
                }
                tracing::debug!(replica = %replica.id, "event stream dropped");
                streams.remove(&replica.id);
            }
        }
    }
}

/// A new event stream to `replica`.
async fn open_events(hub: &Hub, replica: &ReplicaRecord) -> Option<quinn::SendStream> {
    let server_name = hub.config.server_names.first()?;
    let conn = hub.peers.connect(replica, server_name).await.ok()?;
    let (mut send, _recv) = conn.open_bi().await.ok()?;
    send_msg(
        &mut send,
        &StreamHeader::PeerEvents(protocol::stream::PeerEventsOpen {}),
    )
    .await
    .ok()?;
    Some(send)
}

/// An event as it travels between replicas: a port list is read from the registry now.
fn peer_event(hub: &Hub, ev: &crate::domain::events::WorkspaceEvent) -> protocol::peer::PeerEvent {
    use crate::domain::events::Detail;
    protocol::peer::PeerEvent {
        workspace_id: ev.workspace_id.to_string(),
        kind: ev.kind.to_owned(),
        status: ev.status.map(|s| s.as_str().to_owned()),
        reason: ev.reason.clone(),
        at: ev.at,
        detail: match &ev.detail {
            Detail::None => None,
            Detail::Json(value) => Some(value.to_string()),
            Detail::Ports => Some(format!(
                r#"{{"state":"all","ports":{}}}"#,
                hub.agents.ports_json(ev.workspace_id)
            )),
        },
    }
}

/// Publishes another replica's events to this one's subscribers, after checking each;
/// when that replica says it is leaving, drops the idle preview connections through it.
async fn receive_events(hub: &Hub, replica: &str, mut recv: FramedRecv) {
    use crate::domain::events::{Detail, WorkspaceEvent};
    use protocol::peer::PeerMsg;
    let mut owners: std::collections::HashMap<Uuid, String> = Default::default();
    loop {
        let ev = match recv.expect::<PeerMsg>().await {
            Ok(PeerMsg::Event(ev)) => ev,
            Ok(PeerMsg::Leaving(_)) => {
                tracing::debug!(%replica, "replica leaving");
                hub.previews.forget_via(replica);
                continue;
            }
            _ => return,
        };
        let kind = match ev.kind.as_str() {
            "status" => "status",
            "checkout" => "checkout",
            "port" => "port",
            "setup" => "setup",
            "sync" => "sync",
            "profile" => "profile",
            "deleted" => "deleted",
            _ => continue,
        };
        let Ok(workspace_id) = Uuid::parse_str(&ev.workspace_id) else {
            continue;
        };
        let status = match ev.status.as_deref().map(Status::parse) {
            Some(None) => continue,
            Some(Some(status)) => Some(status),
            None => None,
        };
        let detail = match ev.detail.as_deref().map(serde_json::from_str) {
            Some(Ok(value)) => Detail::Json(value),
            Some(Err(_)) => continue,
            None => Detail::None,
        };
        // The owner changed their profile through another replica: an agent held here
        // gets it.
        if kind == "profile" {
            hub.agents.profile_changed(workspace_id);
        }
        // Stopped or deleted through another replica: the agent's connection here ends now
        // (that replica could not end it), once the store confirms it.
        let ended =
            kind == "deleted" || matches!(status, Some(Status::Suspended | Status::Deleting));
        if ended && let Some(conn) = hub.agents.connection(workspace_id) {
            let store = hub.store.clone();
            tokio::spawn(async move {
                let gone = match store.get_workspace(workspace_id).await {
                    Ok(ws) => matches!(ws.status, Status::Suspended | Status::Deleting),
                    Err(crate::store::StoreError::NotFound) => true,
                    Err(_) => false,
                };
                if gone {
                    close(&conn, CloseCode::ShuttingDown, "workspace stopped");
                }
            });
        }
        // Owner feeds here need the owner, which the other replica does not send: looked up
        // once per workspace (an owner never changes), and only while someone watches.
        let owner = if hub.events.owners_watched() {
            if owners.len() > 100_000 {
                owners.clear();
            }
            match owners.get(&workspace_id) {
                Some(owner) => Some(owner.clone()),
                None => match hub.store.get_workspace(workspace_id).await {
                    Ok(ws) => {
                        owners.insert(workspace_id, ws.owner_id.clone());
                        Some(ws.owner_id)
                    }
                    Err(_) => None,
                },
            }
        } else {
            None
        };
        hub.events.publish_here(WorkspaceEvent {
            workspace_id,
            owner,
            kind,
            status,
            reason: ev.reason.map(|r| r.chars().take(4096).collect()),
            at: ev.at,
            detail,
        });
    }
}
