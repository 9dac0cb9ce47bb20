//! Exec for programs: one command in a workspace without a terminal, over HTTP.
//!
//! - `POST /workspaces/:id/exec` with an [`ExecRequest`]: the answer is NDJSON, one
//!   [`event`] per line (`started`, `stdout`, `stderr`, then `exit`), streamed as the
//!   command runs; a command that cannot start is a JSON error instead. Closing the
//!   response ends the command.
//! - `GET /workspaces/:id/exec` upgraded to a WebSocket: the first message is the
//!   request (text), then binary messages are stdin, text ones `{"type": "stdin_end"}` or
//!   `{"type": "signal", "signal": "TERM"}`; the events come back as text messages.
//!
//! The hub turns agent messages into events one at a time, when the client takes the
//! previous one: a command that floods its output waits for a slow reader, and neither the
//! hub nor the agent buffers more than a stream window of it.

use crate::AppState;
use crate::base::metrics::Relayed;
use crate::domain::auth::Caller;
use crate::edge::agent_unreachable;
use crate::edge::api::{ApiError, ValidJson};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::{SinkExt, StreamExt};
use link::{FramedRecv, LinkError, send_msg};
use protocol::exec::{ExecData, ExecFailure, ExecMsg, ExecSignal, ExecStart, ExecStdinEnd};
use protocol::stream::{ExecOpen, StreamHeader};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The stream error code the hub resets an exec stream with when its client is gone.
const GONE: quinn::VarInt = quinn::VarInt::from_u32(1);

/// Largest WebSocket message a client may send (a stdin chunk, a control message).
const MAX_CLIENT_MESSAGE: usize = protocol::exec::MAX_CHUNK;

/// What to run.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (the program is looked up in the workspace user's `PATH`): the
    /// program not empty, no NUL anywhere, at most 256 KiB with `env` and `cwd`.
    #[schema(min_items = 1, max_items = 4096)]
    pub argv: Vec<String>,
    /// Environment variables to set (names: letters, digits and `_`, not starting with a digit).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working folder: absolute, or relative to the workspace folder (the default).
    #[schema(min_length = 1, pattern = r"^[^\x00]+$")]
    pub cwd: Option<String>,
    /// Text for the command's stdin (then closed). At most one of `stdin`, `stdin_base64`;
    /// with neither, stdin is empty (over the WebSocket: open until `stdin_end`).
    pub stdin: Option<String>,
    /// Bytes for the command's stdin, base64.
    pub stdin_base64: Option<String>,
    /// Kill the command (and everything it started) after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    /// The agent's start message and the stdin bytes, or what is wrong.
    fn parse(self) -> Result<(ExecStart, Option<Vec<u8>>), ApiError> {
        let stdin = match (self.stdin, self.stdin_base64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid("give stdin or stdin_base64, not both"));
            }
            (Some(text), None) => Some(text.into_bytes()),
            (None, Some(b64)) => Some(
                B64.decode(b64)
                    .map_err(|e| ApiError::invalid(format!("stdin_base64: {e}")))?,
            ),
            (None, None) => None,
        };
        let start = ExecStart {
            argv: self.argv,
            env: self.env.into_iter().collect(),
            cwd: self.cwd,
            timeout_ms: self.timeout_ms,
        };
        start.check().map_err(ApiError::invalid)?;
        Ok((start, stdin))
    }
}

/// An agent message as the event a client gets (JSON text); `None` for messages a client
/// never sees. Output is written without a JSON serializer: base64 needs no escaping.
fn event(msg: &ExecMsg) -> Option<String> {
    let data = |kind: &str, bytes: &[u8]| {
        Some(format!(
            r#"{{"data":"{}","type":"{kind}"}}"#,
            B64.encode(bytes)
        ))
    };
    let value = match msg {
        ExecMsg::Stdout(d) => return data("stdout", &d.bytes),
        ExecMsg::Stderr(d) => return data("stderr", &d.bytes),
        ExecMsg::Started(s) => json!({"type": "started", "pid": s.pid}),
        ExecMsg::Exit(e) => json!({
            "type": "exit", "code": e.code, "signal": e.signal, "timed_out": e.timed_out
        }),
        ExecMsg::Failed(f) => {
            json!({"type": "error", "code": failure_code(f.reason), "message": f.message})
        }
        _ => return None,
    };
    Some(value.to_string())
}

/// The output bytes an agent message carries (for `/metrics`).
fn output_len(msg: &ExecMsg) -> u64 {
    match msg {
        ExecMsg::Stdout(d) | ExecMsg::Stderr(d) => d.bytes.len() as u64,
        _ => 0,
    }
}

fn failure_code(reason: ExecFailure) -> &'static str {
    match reason {
        ExecFailure::BadRequest => "invalid_request",
        ExecFailure::NotFound => "program_not_found",
        ExecFailure::PermissionDenied => "permission_denied",
        ExecFailure::NoSuchFolder => "no_such_folder",
        ExecFailure::Other => "exec_failed",
    }
}

/// The caller's workspace `id`, its agent, and an exec stream to it that has started
/// `start` (stdin still open), or the error the client gets.
async fn start_command(
    hub: &AppState,
    caller: Caller,
    id: &str,
    start: ExecStart,
) -> Result<(quinn::SendStream, FramedRecv, u32, Relayed), ApiError> {
    let (send, mut recv, relayed) = crate::edge::agent_stream(
        hub,
        &caller,
        id,
        StreamHeader::Exec(ExecOpen {}),
        &ExecMsg::Start(start),
        "exec",
    )
    .await?;
    match recv.expect::<ExecMsg>().await.map_err(agent_unreachable)? {
        ExecMsg::Started(s) => Ok((send, recv, s.pid, relayed)),
        ExecMsg::Failed(f) => {
            let status = match f.reason {
                ExecFailure::BadRequest => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            Err(ApiError::new(status, failure_code(f.reason), f.message))
        }
        _ => Err(agent_unreachable("unexpected answer")),
    }
}

/// Writes `bytes` to the command's stdin in chunks, then closes it.
async fn feed(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), LinkError> {
    for chunk in bytes.chunks(protocol::exec::MAX_CHUNK) {
        send_msg(
            send,
            &ExecMsg::Stdin(ExecData {
                bytes: chunk.to_vec(),
            }),
        )
        .await?;
    }
    send_msg(send, &ExecMsg::StdinEnd(ExecStdinEnd {})).await
}

/// The line a stream that broke before the command's exit ends with.
fn lost(e: impl std::fmt::Display) -> Value {
    json!({"type": "error", "code": "agent_lost", "message": format!("the workspace's agent went away: {e}")})
}

#[utoipa::path(post, path = "/workspaces/{id}/exec", tag = "exec", security(("bearer" = [])),
    description = "Runs a command in the workspace as the workspace user, without a terminal. The answer streams NDJSON (`application/x-ndjson`), one event per line: `{\"type\":\"started\",\"pid\"}`, then `{\"type\":\"stdout\"|\"stderr\",\"data\":<base64>}` as the command writes, then `{\"type\":\"exit\",\"code\",\"signal\",\"timed_out\"}` (or `{\"type\":\"error\",\"code\":\"agent_lost\"}` if the agent went away). Output waits for the reader: a slow reader slows the command. Closing the response kills the command. A GET upgraded to a WebSocket streams stdin too: send the request as the first (text) message, then binary messages for stdin, `{\"type\":\"stdin_end\"}` and `{\"type\":\"signal\",\"signal\":\"TERM\"}`; events come back as text messages. Running commands count as use of the workspace.",
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "The command runs; its events follow, one JSON object per line", content_type = "application/x-ndjson", body = String),
        (status = 400, description = "A bad request (`invalid_request`: empty argv, a NUL byte, a bad variable name, bad base64)", body = crate::edge::api::ErrorBody),
        (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody),
        (status = 404, description = "No such workspace (or not yours)", body = crate::edge::api::ErrorBody),
        (status = 409, description = "No agent connected (`agent_offline`), or one too old for exec (`agent_outdated`)", body = crate::edge::api::ErrorBody),
        (status = 413, description = "The request is over 64 KiB (send large stdin over the WebSocket)", body = crate::edge::api::ErrorBody),
        (status = 422, description = "The command could not start: `program_not_found`, `permission_denied`, `no_such_folder`, `exec_failed`", body = crate::edge::api::ErrorBody),
        (status = 502, description = "The agent could not be reached (`agent_unreachable`)", body = crate::edge::api::ErrorBody),
        (status = 503, description = "The workspace is READY but its agent is between hub replicas (`agent_offline`, with `Retry-After`)", body = crate::edge::api::ErrorBody)))]
pub async fn exec(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ValidJson(request): ValidJson<ExecRequest>,
) -> Result<Response, ApiError> {
    let (start, stdin) = request.parse()?;
    let (mut send, recv, pid, relayed) = start_command(&hub, caller, &id, start).await?;
    // Stdin goes beside the output, so a command that writes before it reads cannot
    // deadlock against this request. When the response ends (or its client goes away),
    // the stream is reset: a command still running is killed.
    let done = tokio_util::sync::CancellationToken::new();
    let guard = done.clone().drop_guard();
    let stdin = stdin.unwrap_or_default();
    relayed.bytes.inc_by(stdin.len() as u64);
    tokio::spawn(async move {
        let _ = feed(&mut send, &stdin).await;
        done.cancelled().await;
        let _ = send.reset(GONE);
    });
    let first = json!({"type": "started", "pid": pid});
    let state = Some((recv, Some(first), (guard, relayed)));
    let lines = futures_util::stream::unfold(state, |state| async move {
        let (mut recv, first, held) = state?;
        if let Some(first) = first {
            return Some((line(&first), Some((recv, None, held))));
        }
        match recv.next::<ExecMsg>().await {
            Ok(Some(msg)) => {
                held.1.bytes.inc_by(output_len(&msg));
                let last = matches!(msg, ExecMsg::Exit(_) | ExecMsg::Failed(_));
                let text = event(&msg).map_or(String::new(), |t| t + "\n");
                Some((Ok(text), (!last).then_some((recv, None, held))))
            }
            Ok(None) => Some((line(&lost("the stream ended")), None)),
            Err(e) => Some((line(&lost(e)), None)),
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

fn line(value: &Value) -> Result<String, std::convert::Infallible> {
    Ok(format!("{value}\n"))
}

/// `GET /workspaces/:id/exec`: the WebSocket form.
#[utoipa::path(get, path = "/workspaces/{id}/exec", tag = "exec", security(("bearer" = [])),
    description = "The WebSocket form of exec. The first message (text) is the request, as the POST body (`stdin` and `stdin_base64` go in first; without them stdin stays open). Then binary messages are stdin, text ones `{\"type\":\"stdin_end\"}` or `{\"type\":\"signal\",\"signal\":\"TERM\"}` (HUP, INT, QUIT, KILL, USR1, USR2, TERM, CONT, STOP). The events of the POST form come back as text messages, the last one `exit` (or `error`), then the socket closes. A bad request is an `error` event (`invalid_request`, `program_not_found`, ...). Closing the socket kills the command.",
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"),
        ("ticket" = Option<String>, Query, description = "A browser token (purpose `exec`) instead of a bearer token: browsers cannot set headers on a WebSocket")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody),
        (status = 403, description = "A service or browser token without this scope (`scope`)", body = crate::edge::api::ErrorBody),
        (status = 404, description = "No such workspace (or not yours)", body = crate::edge::api::ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade (`upgrade_required`)", body = crate::edge::api::ErrorBody)))]
pub async fn exec_socket(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Who may is decided before anything else, so a stranger learns nothing.
    caller.workspace(&hub, &id).await?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!(
                "this is a WebSocket endpoint (or POST a request): {}",
                e.body_text()
            ),
        )
    })?;
    Ok(ws
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| async move {
            socket_session(hub, caller, id, socket).await;
        }))
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientControl {
    StdinEnd,
    Signal { signal: String },
}

async fn socket_session(hub: AppState, caller: Caller, id: String, socket: WebSocket) {
    let (mut out, mut incoming) = socket.split();
    let error = |code: &str, message: String| {
        Message::Text(
            json!({"type": "error", "code": code, "message": message})
                .to_string()
                .into(),
        )
    };
    // The request first.
    let request = match incoming.next().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str::<ExecRequest>(&text)
            .map_err(|e| ApiError::invalid(e.to_string()))
            .and_then(ExecRequest::parse),
        _ => Err(ApiError::invalid(
            "the first message must be the request (JSON text)",
        )),
    };
    let started = match request {
        Ok((start, stdin)) => match start_command(&hub, caller, &id, start).await {
            Ok((mut send, recv, pid, relayed)) => match stdin {
                Some(bytes) => match feed(&mut send, &bytes).await {
                    Ok(()) => {
                        relayed.bytes.inc_by(bytes.len() as u64);
                        Ok((send, recv, pid, relayed))
                    }
                    Err(e) => Err(agent_unreachable(e)),
                },
                None => Ok((send, recv, pid, relayed)),
            },
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let (mut send, mut recv, pid, relayed) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = out.send(error(e.code(), e.message().to_owned())).await;
            let _ = out.close().await;
            return;
        }
    };
    let text = |v: Value| Message::Text(v.to_string().into());
    if out
        .send(text(json!({"type": "started", "pid": pid})))
        .await
        .is_err()
    {
        return;
    }
    // Client -> agent and agent -> client side by side: neither waits for the other.
    let upstream = async {
        while let Some(Ok(msg)) = incoming.next().await {
            let to_agent = match msg {
                Message::Binary(bytes) => {
                    relayed.bytes.inc_by(bytes.len() as u64);
                    ExecMsg::Stdin(ExecData {
                        bytes: bytes.to_vec(),
                    })
                }
                Message::Text(t) => match serde_json::from_str::<ClientControl>(&t) {
                    Ok(ClientControl::StdinEnd) => ExecMsg::StdinEnd(ExecStdinEnd {}),
                    Ok(ClientControl::Signal { signal }) => {
                        match protocol::exec::signal_number(&signal) {
                            Some(signal) => ExecMsg::Signal(ExecSignal { signal }),
                            None => {
                                return Err(format!(
                                    "{signal:?} is not a signal a client may send"
                                ));
                            }
                        }
                    }
                    Err(e) => return Err(format!("bad control message: {e}")),
                },
                Message::Close(_) => break,
                _ => continue,
            };
            if send_msg(&mut send, &to_agent).await.is_err() {
                break;
            }
        }
        Ok(())
    };
    let downstream = async {
        loop {
            let value = match recv.next::<ExecMsg>().await {
                Ok(Some(msg)) => {
                    relayed.bytes.inc_by(output_len(&msg));
                    let last = matches!(msg, ExecMsg::Exit(_) | ExecMsg::Failed(_));
                    let Some(event) = event(&msg) else { continue };
                    if out.send(Message::Text(event.into())).await.is_err() || last {
                        break;
                    }
                    continue;
                }
                Ok(None) => lost("the stream ended"),
                Err(e) => lost(e),
            };
            let _ = out.send(text(value)).await;
            break;
        }
    };
    tokio::select! {
        // The command ended (or the client stopped reading): the socket closes.
        _ = downstream => {}
        refused = upstream => {
            if let Err(why) = refused {
                tracing::debug!(workspace = %id, why, "exec socket: bad client message");
            }
        }
    }
    // The client is gone or done: a command still running is killed.
    let _ = send.reset(GONE);
}
