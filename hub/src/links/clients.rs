//! CLI connections (ALPN `wsh-client/1`): the first stream authenticates the user's token;
//! every later stream names a workspace and is spliced byte for byte to a stream the hub
//! opens to that workspace's agent. The hub checks ownership once per stream and never
//! reads what flows through the splice.

use crate::base::workspace::Workspace;
use crate::domain::auth::Caller;
use crate::links::agents::{
    CONTROL_FRAME_LIMIT, FIRST_MESSAGE_TIMEOUT, close, close_for, finish_and_flush, refuse_stream,
};
use crate::{Hub, domain::auth};
use link::{FramedRecv, LinkError, send_msg};
use protocol::client::{ClientMsg, ClientRefusal, ClientRefused, ClientWelcome};
use protocol::close::CloseCode;
use protocol::direct::{Candidates, Credential, DirectMsg, DirectOffer, MAX_CANDIDATES, Purpose};
use protocol::stream::{
    ClientDirectOpen, DirectOpen, ExecOpen, ForwardOpen, PtyOpen, StreamHeader, StreamRefusal,
    StreamReply, SyncOpen, TcpForwardOpen,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout;

/// Serves one CLI connection.
pub async fn client_connection(hub: &Arc<Hub>, conn: quinn::Connection, remote: SocketAddr) {
    let caller = match timeout(FIRST_MESSAGE_TIMEOUT, authenticate(hub, &conn)).await {
        Ok(Ok(Some(caller))) => caller,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return close_for(&conn, remote, &e),
        Err(_) => return close(&conn, CloseCode::ProtocolError, "no hello in time"),
    };
    tracing::info!(%remote, owner = %caller.owner_id, "client connected");
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    tokio::spawn(client_stream(hub.clone(), caller.clone(), remote, send, recv));
                }
                Err(_) => return,
            },
            // The client connects again (to another replica, or to this hub once back).
            _ = hub.shutdown.cancelled() => {
                return close(&conn, CloseCode::ShuttingDown, "hub shutting down");
            }
        }
    }
}

/// The hello stream: a token in, a welcome (or a refusal and a closed connection) out.
async fn authenticate(hub: &Hub, conn: &quinn::Connection) -> Result<Option<Caller>, LinkError> {
    let (mut send, recv) = conn.accept_bi().await?;
    let mut recv = FramedRecv::with_limit(recv, CONTROL_FRAME_LIMIT);
    let ClientMsg::Hello(hello) = recv.expect::<ClientMsg>().await? else {
        return Err(protocol::ProtocolError::Unexpected("expected a client hello").into());
    };
    let refusal = |reason, message: String| ClientMsg::Refused(ClientRefused { reason, message });
    let reply = match protocol::handshake::negotiate(hello.protocol_version) {
        Err(r) => Err(refusal(ClientRefusal::VersionUnsupported, r.message)),
        Ok(version) => {
            match auth::authenticate(hub, &hello.token, Some(conn.remote_address().ip())).await {
                Ok(caller) => Ok((caller, version)),
                Err(e) => Err(refusal(
                    ClientRefusal::Unauthenticated,
                    e.message().to_owned(),
                )),
            }
        }
    };
    match reply {
        Ok((caller, protocol_version)) => {
            let welcome = ClientWelcome {
                protocol_version,
                owner_id: caller.owner_id.clone(),
            };
            send_msg(&mut send, &ClientMsg::Welcome(welcome)).await?;
            let _ = send.finish();
            Ok(Some(caller))
        }
        Err(refused) => {
            send_msg(&mut send, &refused).await?;
            finish_and_flush(&mut send).await;
            close(conn, CloseCode::Unauthorized, "authentication failed");
            Ok(None)
        }
    }
}

async fn client_stream(
    hub: Arc<Hub>,
    caller: Caller,
    remote: SocketAddr,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut recv = FramedRecv::with_limit(recv, CONTROL_FRAME_LIMIT);
    let header = match timeout(FIRST_MESSAGE_TIMEOUT, recv.expect::<StreamHeader>()).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            return refuse_stream(&mut send, StreamRefusal::BadHeader, &e.to_string()).await;
        }
        Err(_) => {
            return refuse_stream(&mut send, StreamRefusal::BadHeader, "no header in time").await;
        }
    };
    if hub.draining.is_cancelled() {
        return refuse_stream(
            &mut send,
            StreamRefusal::Moved,
            "this hub replica is leaving: connect again",
        )
        .await;
    }
    // What the agent is asked for, on which workspace.
    let (workspace_id, to_agent) = match header {
        StreamHeader::ClientPty(open) => (open.workspace_id, StreamHeader::Pty(PtyOpen {})),
        StreamHeader::ClientTcpForward(open) if open.port != 0 => (
            open.workspace_id,
            StreamHeader::TcpForward(TcpForwardOpen { port: open.port }),
        ),
        StreamHeader::ClientForward(open) if open.port != 0 => (
            open.workspace_id,
            StreamHeader::Forward(ForwardOpen {
                port: open.port,
                resume: open.resume,
            }),
        ),
        StreamHeader::ClientTcpForward(_) | StreamHeader::ClientForward(_) => {
            return refuse_stream(&mut send, StreamRefusal::BadHeader, "port 0").await;
        }
        StreamHeader::ClientExec(open) => (open.workspace_id, StreamHeader::Exec(ExecOpen {})),
        StreamHeader::ClientSync(open) => (
            open.workspace_id,
            StreamHeader::Sync(SyncOpen { root: open.root }),
        ),
        StreamHeader::ClientDirect(open) => {
            return broker_direct(&hub, &caller, remote, open, send).await;
        }
        _ => {
            return refuse_stream(
                &mut send,
                StreamRefusal::Unsupported,
                "not a client stream type",
            )
            .await;
        }
    };
    let Some(ws) = owned_workspace(&hub, &caller, &workspace_id).await else {
        return refuse_stream(
            &mut send,
            StreamRefusal::Unauthorized,
            "workspace not found",
        )
        .await;
    };
    let Some(agent) = crate::links::peers::agent_path_waiting(&hub, &ws).await else {
        return refuse_stream(
            &mut send,
            StreamRefusal::Unavailable,
            "the workspace's agent is not connected",
        )
        .await;
    };
    let cut = cut_when_draining(&hub, &to_agent);
    if let Err(e) = splice(&hub.metrics, agent, &to_agent, send, recv, cut).await {
        tracing::debug!(workspace = %ws.id, error = %e, "client stream ended");
    }
}

/// The caller's workspace `id` (or the name of one of theirs). A workspace that is not
/// the caller's reads exactly like one that does not exist.
async fn owned_workspace(hub: &Hub, caller: &Caller, id: &str) -> Option<Workspace> {
    caller.workspace(hub, id).await.ok()
}

/// How long the agent may take to answer a direct-session request.
const DIRECT_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A `ClientDirect` stream: checks policy and ownership, has the agent punch towards the
/// client, signs the client's credential, and answers with the agent's candidates.
async fn broker_direct(
    hub: &Hub,
    caller: &Caller,
    remote: SocketAddr,
    open: ClientDirectOpen,
    mut send: quinn::SendStream,
) {
    match direct_offer(hub, caller, remote, open).await {
        Ok(offer) => {
            let accepted = StreamReply::Accepted(protocol::stream::Accepted {});
            if send_msg(&mut send, &accepted).await.is_ok()
                && send_msg(&mut send, &DirectMsg::Offer(offer)).await.is_ok()
            {
                finish_and_flush(&mut send).await;
            }
        }
        Err((reason, message)) => refuse_stream(&mut send, reason, message).await,
    }
}

async fn direct_offer(
    hub: &Hub,
    caller: &Caller,
    remote: SocketAddr,
    open: ClientDirectOpen,
) -> Result<DirectOffer, (StreamRefusal, &'static str)> {
    if !hub
        .config
        .direct
        .allows(&caller.owner_id, caller.email.as_deref())
    {
        return Err((
            StreamRefusal::Unauthorized,
            "direct connections are off for this user: the relay carries the session",
        ));
    }
    let bad = (StreamRefusal::BadHeader, "bad direct-session request");
    let mut client = open.candidates.parse().ok_or(bad)?;
    if open.csr_der.len() > MAX_CSR_LEN {
        return Err(bad);
    }
    let ws = owned_workspace(hub, caller, &open.workspace_id)
        .await
        .ok_or((StreamRefusal::Unauthorized, "workspace not found"))?;
    let unavailable = (
        StreamRefusal::Unavailable,
        "the workspace's agent is not connected",
    );
    let agent = crate::links::peers::agent_path_waiting(hub, &ws)
        .await
        .ok_or(unavailable)?;
    // The client's address as seen from here goes first: it is the mapping its NAT made.
    let seen = canonical(remote);
    client.retain(|a| *a != seen);
    client.insert(0, seen);
    client.truncate(MAX_CANDIDATES);
    let credential = Credential {
        user: caller.owner_id.clone(),
        workspace_id: ws.id.to_string(),
        purposes: Purpose::ALL.to_vec(),
    };
    // Signed by the CA every agent trusts (the retiring one during a rotation).
    let cert_der = hub
        .identity
        .server_ca()
        .sign_direct(&open.csr_der, &credential)
        .map_err(|_| (StreamRefusal::BadHeader, "bad certificate signing request"))?;
    let agent_candidates = match timeout(DIRECT_ANSWER_TIMEOUT, ask_agent(&agent, client)).await {
        Ok(Ok(Some(candidates))) => candidates,
        Ok(Ok(None)) => {
            return Err((
                StreamRefusal::Unsupported,
                "the workspace's agent does not take direct connections",
            ));
        }
        Ok(Err(_)) | Err(_) => return Err(unavailable),
    };
    tracing::info!(
        owner = %caller.owner_id,
        workspace = %ws.id,
        client = %seen,
        agent = ?agent_candidates.addrs.first(),
        "direct session brokered"
    );
    Ok(DirectOffer {
        cert_der,
        server_name: protocol::direct::agent_server_name(&ws.id.to_string()),
        agent: agent_candidates,
    })
}

/// At most this many bytes of CSR in a direct-session request.
const MAX_CSR_LEN: usize = 4096;

/// An IPv4 address rather than its IPv6-mapped form (a dual-stack socket reports those).
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Tells the agent where the client is; `None` if it does not take direct connections
/// (an older agent refuses the stream).
async fn ask_agent(
    agent: &crate::links::peers::AgentPath,
    client: Vec<SocketAddr>,
) -> Result<Option<Candidates>, LinkError> {
    let (mut send, recv) = agent.open_bi().await?;
    let open = DirectOpen {
        client: Candidates {
            addrs: client.iter().map(ToString::to_string).collect(),
        },
    };
    send_msg(&mut send, &StreamHeader::Direct(open)).await?;
    let _ = send.finish();
    let mut recv = FramedRecv::with_limit(recv, CONTROL_FRAME_LIMIT);
    match recv.expect::<StreamReply>().await? {
        StreamReply::Accepted(_) => {}
        StreamReply::Refused(r) if r.reason == StreamRefusal::Unsupported => return Ok(None),
        StreamReply::Refused(_) | StreamReply::Forwarding(_) => {
            return Err(protocol::ProtocolError::Unexpected("agent refused").into());
        }
    }
    let DirectMsg::Candidates(candidates) = recv.expect::<DirectMsg>().await? else {
        return Err(protocol::ProtocolError::Unexpected("expected candidates").into());
    };
    // Checked here too: what reaches the client is well formed.
    let addrs = candidates
        .parse()
        .ok_or(protocol::ProtocolError::Unexpected("bad candidates"))?;
    Ok(Some(Candidates {
        addrs: addrs.iter().map(ToString::to_string).collect(),
    }))
}

/// When a stream to an agent through a leaving replica ends. Terminals and sync sessions
/// end as soon as it starts to drain: they last as long as their user likes, and their
/// clients resume elsewhere (a terminal at its offset, a sync from its saved state, a
/// transfer cut short leaving nothing behind). Forwards carry connections nobody can
/// resume: they may finish within the drain time.
pub(crate) fn cut_when_draining(
    hub: &Hub,
    header: &StreamHeader,
) -> Option<tokio_util::sync::CancellationToken> {
    matches!(header, StreamHeader::Pty(_) | StreamHeader::Sync(_)).then(|| hub.draining.clone())
}

/// What a relayed stream carries, for `/metrics`.
pub(crate) fn stream_kind(header: &StreamHeader) -> &'static str {
    match header {
        StreamHeader::Pty(_) => "terminal",
        StreamHeader::TcpForward(_) | StreamHeader::Forward(_) => "forward",
        StreamHeader::Sync(_) => "sync",
        StreamHeader::Exec(_) => "exec",
        StreamHeader::Files(_) => "files",
        _ => "other",
    }
}

/// Opens a stream to the agent with `header` and copies bytes both ways until both sides
/// finish, or until `cut` is cancelled (both streams then end).
pub(crate) async fn splice(
    metrics: &crate::base::metrics::Metrics,
    agent: crate::links::peers::AgentPath,
    header: &StreamHeader,
    client_send: quinn::SendStream,
    client_recv: FramedRecv,
    cut: Option<tokio_util::sync::CancellationToken>,
) -> Result<(), LinkError> {
    let (mut agent_send, agent_recv) = agent.open_bi().await?;
    send_msg(&mut agent_send, header).await?;
    let relayed = metrics.relayed(stream_kind(header));
    let bytes = &relayed.bytes;
    let (client_recv, mut decoder) = client_recv.into_parts();
    agent_send.write_all(&decoder.take_buffered()).await?;
    let pumps = async {
        tokio::join!(
            pump(client_recv, agent_send, bytes),
            pump(agent_recv, client_send, bytes)
        );
    };
    match cut {
        Some(cut) => {
            tokio::select! {
                _ = pumps => {}
                _ = cut.cancelled() => {}
            }
        }
        None => pumps.await,
    }
    Ok(())
}

/// Moves whole received chunks from one stream to the other without copying them. A
/// reset on the way in becomes a reset on the way out (a dropped TCP connection stays a
/// dropped connection, not a clean end).
pub(crate) async fn pump(
    mut from: quinn::RecvStream,
    mut to: quinn::SendStream,
    bytes: &prometheus_client::metrics::counter::Counter,
) {
    loop {
        match from.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                bytes.inc_by(chunk.bytes.len() as u64);
                if to.write_chunk(chunk.bytes).await.is_err() {
                    let _ = from.stop(quinn::VarInt::from_u32(0));
                    return;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return;
            }
            Err(_) => {
                let _ = to.reset(quinn::VarInt::from_u32(1));
                return;
            }
        }
    }
}
