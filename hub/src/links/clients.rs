//! CLI connections (ALPN `wsh-client/1`): the first stream authenticates the user's token;
//! every later stream names a workspace and is spliced byte for byte to a stream the hub
//! opens to that workspace's agent. The hub checks ownership once per stream and never
//! reads what flows through the splice.

use crate::domain::auth::Caller;
use crate::links::agents::{
    CONTROL_FRAME_LIMIT, FIRST_MESSAGE_TIMEOUT, close, close_for, finish_and_flush, refuse_stream,
};
use crate::{Hub, domain::auth};
use link::{FramedRecv, LinkError, send_msg};
use protocol::client::{ClientMsg, ClientRefusal, ClientRefused, ClientWelcome};
use protocol::close::CloseCode;
use protocol::stream::{PtyOpen, StreamHeader, StreamRefusal, SyncOpen, TcpForwardOpen};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::timeout;
use uuid::Uuid;

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
                    tokio::spawn(client_stream(hub.clone(), caller.clone(), send, recv));
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
        StreamHeader::ClientTcpForward(_) => {
            return refuse_stream(&mut send, StreamRefusal::BadHeader, "port 0").await;
        }
        StreamHeader::ClientSync(open) => (
            open.workspace_id,
            StreamHeader::Sync(SyncOpen { root: open.root }),
        ),
        _ => {
            return refuse_stream(
                &mut send,
                StreamRefusal::Unsupported,
                "not a client stream type",
            )
            .await;
        }
    };
    // A workspace that is not the caller's reads exactly like one that does not exist.
    let owned = match Uuid::parse_str(&workspace_id) {
        Ok(id) => match hub.store.get_workspace(id).await {
            Ok(ws) => caller.authorize(ws).ok(),
            Err(_) => None,
        },
        Err(_) => None,
    };
    let Some(ws) = owned else {
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
    if let Err(e) = splice(agent, &to_agent, send, recv, cut).await {
        tracing::debug!(workspace = %ws.id, error = %e, "client stream ended");
    }
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

/// Opens a stream to the agent with `header` and copies bytes both ways until both sides
/// finish, or until `cut` is cancelled (both streams then end).
pub(crate) async fn splice(
    agent: crate::links::peers::AgentPath,
    header: &StreamHeader,
    client_send: quinn::SendStream,
    client_recv: FramedRecv,
    cut: Option<tokio_util::sync::CancellationToken>,
) -> Result<(), LinkError> {
    let (mut agent_send, agent_recv) = agent.open_bi().await?;
    send_msg(&mut agent_send, header).await?;
    let (client_recv, mut decoder) = client_recv.into_parts();
    agent_send.write_all(&decoder.take_buffered()).await?;
    let pumps = async {
        tokio::join!(pump(client_recv, agent_send), pump(agent_recv, client_send));
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
pub(crate) async fn pump(mut from: quinn::RecvStream, mut to: quinn::SendStream) {
    loop {
        match from.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
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
