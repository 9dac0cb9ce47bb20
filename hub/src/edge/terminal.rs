//! The browser terminal bridge: a WebSocket on one side, a PTY stream to the agent on the
//! other. The hub reads the PTY stream's envelopes (offsets, exit, errors) to re-frame them
//! for the browser; it never looks inside the terminal bytes.
//!
//! WebSocket protocol (`GET /workspaces/:id/terminal`, alias `/terminal/:id`; query
//! `session`, `offset`, `cols`, `rows`):
//! - binary, server -> client: `kind (1 byte) ++ offset (u64 BE) ++ bytes`, kind 0 = output
//!   at `offset`, 1 = a piece of the screen snapshot with more to come, 2 = the last piece
//!   (output resumes at `offset`);
//! - text, server -> client: JSON `{"type": "opened" | "truncated" | "exit" | "error", ...}`;
//! - binary, client -> server: keystrokes;
//! - text, client -> server: JSON `{"type": "resize", "cols", "rows"}` or `{"type": "close"}`.

use crate::AppState;
use crate::domain::auth::Caller;
use crate::edge::api::ApiError;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures_util::{FutureExt, SinkExt};
use link::{FramedRecv, LinkError, send_msg};
use protocol::pty::{PtyClose, PtyInput, PtyMsg, PtyOpenRequest, PtyResize};
use protocol::stream::{PtyOpen, StreamHeader, StreamRefusal, StreamReply};
use serde::Deserialize;
use serde_json::json;

/// Largest WebSocket message a browser may send (keystrokes and pastes).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TerminalQuery {
    /// A session ticket (`POST /workspaces/:id/tickets`, purpose `terminal`): browsers
    /// cannot set headers on a WebSocket, and their API token stays out of the URL.
    pub ticket: Option<String>,
    /// The terminal session to attach to (1 to 64 characters); a new one when absent.
    #[param(min_length = 1, max_length = 64)]
    pub session: Option<String>,
    /// Resume output at this byte offset (what the client has already shown).
    pub offset: Option<u64>,
    /// Columns of a new session (default 80).
    #[serde(default = "default_cols")]
    #[param(maximum = 65535)]
    pub cols: u16,
    /// Rows of a new session (default 24).
    #[serde(default = "default_rows")]
    #[param(maximum = 65535)]
    pub rows: u16,
}

fn default_cols() -> u16 {
    80
}

fn default_rows() -> u16 {
    24
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientControl {
    Resize { cols: u16, rows: u16 },
    Close,
}

/// `GET /workspaces/:id/terminal`: upgrades to a WebSocket bridged to a PTY stream.
/// Who may open it is decided first, so a request that is not a WebSocket upgrade (or has
/// a bad query) tells a stranger nothing either.
#[utoipa::path(get, path = "/workspaces/{id}/terminal", tag = "terminals", security(("bearer" = [])),
    description = "A WebSocket to a terminal session in the workspace (browsers pass `ticket`, others a bearer token). Messages: binary server→client `kind (1 byte) ++ offset (u64 BE) ++ bytes` (0 output, 1 a piece of the screen snapshot with more to come, 2 its last piece); text server→client JSON `opened`, `truncated`, `exit`, `error`; binary client→server keystrokes; text client→server JSON `{\"type\":\"resize\",\"cols\",\"rows\"}` or `{\"type\":\"close\"}`. Close code 1012 means the hub (replica) is restarting: reconnect with `offset`.",
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), TerminalQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Bad query (`session` length, `cols`, `rows`, `offset`)", body = crate::edge::api::ErrorBody),
        (status = 401, description = "Missing or bad token or ticket", body = crate::edge::api::ErrorBody),
        (status = 404, description = "No such workspace (or not yours)", body = crate::edge::api::ErrorBody),
        (status = 409, description = "No agent connected (`agent_offline`)", body = crate::edge::api::ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade (`upgrade_required`)", body = crate::edge::api::ErrorBody),
        (status = 503, description = "The workspace is READY but its agent is between hub replicas (`agent_offline`, with `Retry-After`)", body = crate::edge::api::ErrorBody)))]
pub async fn terminal(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<TerminalQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // A bearer token (CLI, scripts) or a ticket for this workspace's terminal (browsers).
    let workspace = caller.workspace(&hub, &id).await?;
    let id = workspace.id;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("this is a WebSocket endpoint: {}", e.body_text()),
        )
    })?;
    if query
        .session
        .as_ref()
        .is_some_and(|s| s.is_empty() || s.chars().count() > 64)
    {
        return Err(ApiError::invalid("session must be 1 to 64 characters"));
    }
    let conn = crate::links::peers::agent_path_waiting(&hub, &workspace)
        .await
        .ok_or_else(|| ApiError::agent_offline(workspace.status))?;
    let draining = hub.draining.clone();
    let metrics = hub.metrics.clone();
    Ok(ws
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| async move {
            let relayed = metrics.relayed("terminal");
            if let Err(e) = bridge(draining, conn, query, socket, &relayed).await {
                tracing::debug!(workspace = %id, error = %e, "terminal bridge ended");
            }
        }))
}

fn event(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

fn binary(kind: u8, offset: u64, bytes: &[u8]) -> Message {
    let mut out = Vec::with_capacity(9 + bytes.len());
    out.push(kind);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(bytes);
    Message::Binary(out.into())
}

/// Maps one agent message to what the browser gets; `None` ends the bridge after sending.
fn to_browser(msg: PtyMsg) -> (Option<Message>, bool) {
    match msg {
        PtyMsg::Output(o) => (Some(binary(0, o.offset, &o.bytes)), false),
        PtyMsg::Screen(s) => (
            Some(binary(if s.more { 1 } else { 2 }, s.offset, &s.bytes)),
            false,
        ),
        PtyMsg::Opened(o) => (
            Some(event(
                json!({"type": "opened", "session": o.session, "cols": o.cols, "rows": o.rows}),
            )),
            false,
        ),
        PtyMsg::Truncated(t) => (
            Some(event(
                json!({"type": "truncated", "requested": t.requested, "resumed_at": t.resumed_at}),
            )),
            false,
        ),
        PtyMsg::Exit(e) => (Some(event(json!({"type": "exit", "code": e.code}))), true),
        PtyMsg::Error(e) => (
            Some(event(
                json!({"type": "error", "code": format!("{:?}", e.code), "message": e.message}),
            )),
            false,
        ),
        _ => (None, false),
    }
}

async fn bridge(
    draining: tokio_util::sync::CancellationToken,
    conn: crate::links::peers::AgentPath,
    query: TerminalQuery,
    mut socket: WebSocket,
    relayed: &crate::base::metrics::Relayed,
) -> Result<(), LinkError> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut recv = FramedRecv::new(recv);
    send_msg(&mut send, &StreamHeader::Pty(PtyOpen {})).await?;
    send_msg(
        &mut send,
        &PtyMsg::Open(PtyOpenRequest {
            session: query.session,
            offset: query.offset,
            command: vec![],
            env: vec![],
            cwd: None,
            cols: query.cols,
            rows: query.rows,
        }),
    )
    .await?;
    if let StreamReply::Refused(r) = recv.expect::<StreamReply>().await? {
        if r.reason == StreamRefusal::Moved {
            // The agent moved off the replica this went through: the browser connects
            // again (and resumes), as when a replica restarts.
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1012,
                    reason: "agent moved".into(),
                })))
                .await;
            return Ok(());
        }
        let _ = socket
            .send(event(
                json!({"type": "error", "code": "refused", "message": r.message}),
            ))
            .await;
        return Ok(());
    }
    loop {
        tokio::select! {
            msg = recv.next::<PtyMsg>() => {
                // Whatever else the agent has already sent goes out in the same write (up to
                // a batch; a message read is always sent, never dropped at the batch's end).
                let mut msg = Some(msg?);
                for _ in 0..32 {
                    let m = match msg.take() {
                        Some(m) => m,
                        None => match recv.next::<PtyMsg>().now_or_never() {
                            Some(next) => next?,
                            None => break,
                        },
                    };
                    let Some(m) = m else {
                        let _ = socket.send(Message::Close(None)).await;
                        return Ok(());
                    };
                    if let PtyMsg::Output(o) = &m {
                        relayed.bytes.inc_by(o.bytes.len() as u64);
                    }
                    let (out, last) = to_browser(m);
                    if let Some(out) = out
                        && socket.feed(out).await.is_err()
                    {
                        return Ok(());
                    }
                    if last {
                        let _ = socket.send(Message::Close(None)).await;
                        return Ok(());
                    }
                }
                if socket.flush().await.is_err() {
                    return Ok(());
                }
            }
            incoming = socket.recv() => {
                let reply = match incoming {
                    Some(Ok(Message::Binary(bytes))) => {
                        relayed.bytes.inc_by(bytes.len() as u64);
                        send_msg(&mut send, &PtyMsg::Input(PtyInput { bytes: bytes.to_vec() })).await?;
                        None
                    }
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientControl>(&text) {
                        Ok(ClientControl::Resize { cols, rows }) => {
                            send_msg(&mut send, &PtyMsg::Resize(PtyResize { cols, rows })).await?;
                            None
                        }
                        Ok(ClientControl::Close) => {
                            send_msg(&mut send, &PtyMsg::Close(PtyClose {})).await?;
                            None
                        }
                        Err(e) => Some(event(json!({"type": "error", "code": "bad_request", "message": e.to_string()}))),
                    },
                    Some(Ok(_)) => None,
                    // The browser left or broke the protocol; the session lives on.
                    Some(Err(_)) | None => {
                        let _ = send.finish();
                        return Ok(());
                    }
                };
                if let Some(reply) = reply
                    && socket.send(reply).await.is_err()
                {
                    return Ok(());
                }
            }
            _ = conn.closed() => {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame { code: 1012, reason: "agent disconnected".into() })))
                    .await;
                return Ok(());
            }
            // A leaving replica sends its browsers elsewhere at once: they reconnect
            // (through the load balancer, to another replica) from the offset they reached,
            // and the agent's stream here ends, so its old connection can close.
            _ = draining.cancelled() => {
                let _ = send.finish();
                let _ = socket
                    .send(Message::Close(Some(CloseFrame { code: 1012, reason: "hub replica restarting".into() })))
                    .await;
                return Ok(());
            }
        }
    }
}

/// A terminal session in a workspace, as its agent keeps it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct TerminalSessionView {
    /// Its name: chosen by the client that created it, or made up by the agent.
    pub id: String,
    pub command: String,
    pub cols: u16,
    pub rows: u16,
    /// When it started (Unix ms, the workspace's clock).
    pub created_at: u64,
    /// Bytes of output so far.
    pub end_offset: u64,
    /// Its exit code once the process has ended.
    pub exit: Option<i32>,
}

#[utoipa::path(get, path = "/workspaces/{id}/sessions", tag = "terminal", security(("bearer" = [])),
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")),
    responses(
    (status = 200, description = "The workspace's terminal sessions, oldest first (open one by name with `?session=` on the terminal)", body = [TerminalSessionView]),
    (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody),
    (status = 404, description = "No such workspace (or not yours)", body = crate::edge::api::ErrorBody),
    (status = 409, description = "No agent connected (`agent_offline`)", body = crate::edge::api::ErrorBody),
    (status = 502, description = "`agent_unreachable`", body = crate::edge::api::ErrorBody),
    (status = 503, description = "The agent is between hub replicas (`agent_moved`, with `Retry-After`)", body = crate::edge::api::ErrorBody)))]
pub async fn list_sessions(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<TerminalSessionView>>, ApiError> {
    let (_send, mut recv, _relayed) = crate::edge::agent_stream(
        &hub,
        &caller,
        &id,
        StreamHeader::Pty(PtyOpen {}),
        &PtyMsg::List(protocol::pty::PtyList {}),
        "session lists",
    )
    .await?;
    match recv.expect::<PtyMsg>().await {
        Ok(PtyMsg::Sessions(list)) => Ok(axum::Json(
            list.sessions
                .into_iter()
                .take(1024)
                .map(|s| TerminalSessionView {
                    id: s.id.chars().take(64).collect(),
                    command: s
                        .command
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(512)
                        .collect(),
                    cols: s.cols,
                    rows: s.rows,
                    created_at: s.created_at_ms,
                    end_offset: s.end_offset,
                    exit: s.exit,
                })
                .collect(),
        )),
        Ok(_) => Err(crate::edge::agent_unreachable("unexpected answer")),
        Err(e) => Err(crate::edge::agent_unreachable(e)),
    }
}
