//! The agent's side of a PTY stream: attach or create, then pump events out and input in.

use super::{Event, PtyError, Sessions, Size, SpawnSpec};
use link::{FramedRecv, LinkError, send_msg};
use protocol::pty::{
    PtyErrorCode, PtyExit, PtyMsg, PtyOpenRequest, PtyOpened, PtyOutput, PtyScreen, PtySessionInfo,
    PtySessions, PtyTruncated,
};
use std::sync::Arc;

/// Screen snapshots are sent in pieces no larger than this.
const SCREEN_PIECE: usize = 256 * 1024;

fn error_msg(e: &PtyError) -> PtyMsg {
    let code = match e {
        PtyError::BadSize { .. } => PtyErrorCode::BadSize,
        PtyError::NoSuchSession => PtyErrorCode::NoSuchSession,
        PtyError::Exited { .. } => PtyErrorCode::Exited,
        PtyError::BadName => PtyErrorCode::BadRequest,
        PtyError::Spawn(_) | PtyError::Io(_) => PtyErrorCode::SpawnFailed,
    };
    PtyMsg::Error(protocol::pty::PtyError {
        code,
        message: e.to_string(),
    })
}

fn bad_request(message: &str) -> PtyMsg {
    PtyMsg::Error(protocol::pty::PtyError {
        code: PtyErrorCode::BadRequest,
        message: message.to_owned(),
    })
}

/// The session a client asked for, and whether it was created for it: none named creates
/// one; a name without an offset attaches, or creates the session by that name; a name
/// with an offset (a client resuming) attaches only.
fn open(
    sessions: &Sessions,
    req: &PtyOpenRequest,
    setup: &crate::setup::Setup,
) -> Result<(Arc<super::PtySession>, bool), PtyError> {
    let spec = || {
        // The workspace's environment (its dev container's), then what the client asked.
        let (mut env, mut unset) = (Vec::new(), Vec::new());
        for (name, value) in setup.env() {
            match value {
                Some(value) => env.push((name, value)),
                None => unset.push(name),
            }
        }
        env.extend(req.env.iter().cloned());
        Ok(SpawnSpec {
            command: req.command.clone(),
            env,
            unset,
            cwd: req.cwd.clone().map(Into::into),
            size: Size::new(req.cols, req.rows)?,
        })
    };
    match (&req.session, req.offset) {
        (None, _) => Ok((sessions.create(&spec()?)?, true)),
        (Some(name), None) => sessions.get_or_create(name, spec),
        (Some(id), Some(_)) => Ok((sessions.get(id)?, false)),
    }
}

/// Serves one PTY stream until the process exits, the client leaves, or the link drops.
pub async fn serve(
    sessions: Arc<Sessions>,
    setup: Arc<crate::setup::Setup>,
    send: &mut quinn::SendStream,
    recv: &mut FramedRecv,
) -> Result<(), LinkError> {
    let req = match recv.expect::<PtyMsg>().await? {
        PtyMsg::Open(req) => req,
        PtyMsg::List(_) => {
            let list = sessions
                .list()
                .into_iter()
                .map(|s| PtySessionInfo {
                    id: s.id,
                    command: s.command,
                    cols: s.size.cols,
                    rows: s.size.rows,
                    created_at_ms: s.created_at,
                    end_offset: s.end_offset,
                    exit: s.exit,
                })
                .collect();
            send_msg(send, &PtyMsg::Sessions(PtySessions { sessions: list })).await?;
            let _ = send.finish();
            return Ok(());
        }
        _ => {
            send_msg(send, &bad_request("the first message must be Open or List")).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let (session, created) = match open(&sessions, &req, &setup) {
        Ok(s) => s,
        Err(e) => {
            send_msg(send, &error_msg(&e)).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let size = session.size();
    send_msg(
        send,
        &PtyMsg::Opened(PtyOpened {
            session: session.id.clone(),
            cols: size.cols,
            rows: size.rows,
        }),
    )
    .await?;
    // A new client (not one resuming after a lost link) runs `postAttachCommand`.
    if req.offset.is_none() {
        setup.attached();
    }
    // The creator of a session reads it from its first byte; others as they asked.
    let offset = if created { Some(0) } else { req.offset };
    let mut attachment = session.attach(offset);
    loop {
        tokio::select! {
            event = attachment.next() => match event {
                Some(Event::Output { offset, bytes }) => {
                    send_msg(send, &PtyMsg::Output(PtyOutput { offset, bytes })).await?;
                }
                Some(Event::Screen { offset, bytes }) => {
                    let mut pieces = bytes.chunks(SCREEN_PIECE).peekable();
                    if pieces.peek().is_none() {
                        send_msg(send, &PtyMsg::Screen(PtyScreen { offset, bytes: vec![], more: false })).await?;
                    }
                    while let Some(piece) = pieces.next() {
                        let more = pieces.peek().is_some();
                        send_msg(send, &PtyMsg::Screen(PtyScreen { offset, bytes: piece.to_vec(), more })).await?;
                    }
                }
                Some(Event::Truncated { requested, resumed_at }) => {
                    send_msg(send, &PtyMsg::Truncated(PtyTruncated { requested, resumed_at })).await?;
                }
                Some(Event::Exit { code }) => {
                    send_msg(send, &PtyMsg::Exit(PtyExit { code })).await?;
                    let _ = send.finish();
                    return Ok(());
                }
                None => {
                    let _ = send.finish();
                    return Ok(());
                }
            },
            msg = recv.next::<PtyMsg>() => match msg? {
                Some(PtyMsg::Input(input)) => {
                    let s = session.clone();
                    let written = tokio::task::spawn_blocking(move || s.write_input(&input.bytes)).await;
                    if let Ok(Err(e)) = written {
                        send_msg(send, &error_msg(&e)).await?;
                    }
                }
                Some(PtyMsg::Resize(r)) => {
                    if let Err(e) = Size::new(r.cols, r.rows).and_then(|size| session.resize(size)) {
                        send_msg(send, &error_msg(&e)).await?;
                    }
                }
                Some(PtyMsg::Close(_)) => {
                    let _ = sessions.close(&session.id);
                }
                Some(_) => send_msg(send, &bad_request("unexpected message on a PTY stream")).await?,
                // The client left; the session keeps running for the next one.
                None => return Ok(()),
            },
        }
    }
}
