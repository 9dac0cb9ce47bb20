//! TCP forward streams: the hub (or a direct client) asks for a port, the agent connects
//! to it on loopback and copies bytes both ways. Finishing one direction half-closes it on
//! the other side, so protocols that rely on half-close (an HTTP/1.0 request, `ssh`'s EOF)
//! behave as on a direct connection.
//!
//! A `Forward` stream (version 6+) is resumable (`protocol::forward`): its connection is
//! kept under a token when the stream breaks, for [`RESUME_GRACE_SECS`], and a stream that
//! names the token picks it up where the bytes stopped. A plain `TcpForward` stream (the
//! hub's previews, older clients) lives and dies with its stream.

use crate::session::refuse;
use link::forward::{Ended, Pipe};
use link::{FramedRecv, LinkError, send_msg};
use protocol::forward::{ForwardToken, RESUME_GRACE_SECS};
use protocol::stream::{
    Accepted, ForwardOpen, Forwarding, StreamRefusal, StreamReply, TcpForwardOpen,
};
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// How long connecting to the port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `port` on loopback: IPv4 first, then IPv6.
async fn connect(port: u16) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::other("no address to try");
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect(SocketAddr::new(ip, port)),
        )
        .await
        {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(last)
}

/// Connects to `port` for a forward stream, or answers why not.
async fn open_port(
    port: u16,
    send: &mut quinn::SendStream,
) -> Result<Option<TcpStream>, LinkError> {
    if port == 0 {
        refuse(send, StreamRefusal::BadHeader, "port 0".into()).await?;
        return Ok(None);
    }
    match connect(port).await {
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            Ok(Some(tcp))
        }
        Err(e) => {
            refuse(
                send,
                StreamRefusal::Unavailable,
                format!("port {port}: {e}"),
            )
            .await?;
            Ok(None)
        }
    }
}

/// Serves one plain forward stream (the header has been read).
pub async fn serve(
    open: TcpForwardOpen,
    mut send: quinn::SendStream,
    recv: FramedRecv,
    forwards: Arc<Forwards>,
) -> Result<(), LinkError> {
    let Some(tcp) = open_port(open.port, &mut send).await? else {
        return Ok(());
    };
    send_msg(&mut send, &StreamReply::Accepted(Accepted {})).await?;
    let _busy = forwards.busy();
    let (recv, mut decoder) = recv.into_parts();
    let (tcp_read, tcp_write) = tcp.into_split();
    // Bytes that arrived with the header belong to the connection.
    let early = decoder.take_buffered();
    if let Err(e) = link::splice(tcp_read, tcp_write, send, recv, &early).await {
        tracing::debug!(port = open.port, error = %e, "forward ended");
    }
    Ok(())
}

/// Serves one resumable forward stream: a new connection, or a resume of one kept here.
pub async fn serve_resumable(
    open: ForwardOpen,
    mut send: quinn::SendStream,
    recv: FramedRecv,
    forwards: Arc<Forwards>,
) -> Result<(), LinkError> {
    let (token, entry) = match open.resume {
        None => {
            let Some(tcp) = open_port(open.port, &mut send).await? else {
                return Ok(());
            };
            let (read, write) = tcp.into_split();
            let token = ForwardToken(rand::random());
            let entry = Arc::new(Entry {
                port: open.port,
                pipe: tokio::sync::Mutex::new(Pipe::new(read, write)),
                generation: tokio::sync::watch::Sender::new(0),
                _busy: forwards.busy(),
            });
            forwards.kept().insert(token, entry.clone());
            (token, entry)
        }
        Some(resume) => {
            let found = forwards.kept().get(&resume.token).cloned();
            let Some(entry) = found.filter(|e| e.port == open.port) else {
                return refuse(&mut send, StreamRefusal::Gone, "no such connection".into()).await;
            };
            // The run on the broken stream (if the agent has not noticed yet) lets go.
            entry.generation.send_modify(|g| *g += 1);
            (resume.token, entry)
        }
    };
    let generation = *entry.generation.borrow();
    let mut pipe = entry.pipe.lock().await;
    if *entry.generation.borrow() != generation {
        // A later resume took it over while this one waited.
        return refuse(&mut send, StreamRefusal::Gone, "resumed elsewhere".into()).await;
    }
    if let Some(resume) = open.resume
        && let Err(gap) = pipe.resume(resume.received)
    {
        forwards.forget(&token, generation);
        return refuse(&mut send, StreamRefusal::Gone, gap.to_string()).await;
    }
    if let Some(resume) = open.resume {
        tracing::info!(
            port = open.port,
            at = resume.received,
            "forwarded connection resumed"
        );
    }
    let reply = StreamReply::Forwarding(Forwarding {
        token,
        received: pipe.received(),
    });
    if let Err(e) = send_msg(&mut send, &reply).await {
        drop(pipe);
        forwards.expire_later(token, generation);
        return Err(e);
    }
    let (recv, mut decoder) = recv.into_parts();
    let early = decoder.take_buffered();
    let mut taken_over = entry.generation.subscribe();
    let ended = tokio::select! {
        ended = pipe.run(send, recv, &early) => Some(ended),
        _ = taken_over.wait_for(|g| *g != generation) => None,
    };
    drop(pipe);
    match ended {
        Some(Ended::Broken(why)) => {
            tracing::debug!(
                port = open.port,
                why,
                "forward stream broke; kept for a resume"
            );
            forwards.expire_later(token, generation);
        }
        Some(Ended::Done | Ended::Failed(_)) => forwards.forget(&token, generation),
        // A resume holds it now.
        None => {}
    }
    Ok(())
}

/// A resumable connection kept by the agent.
struct Entry {
    port: u16,
    pipe: tokio::sync::Mutex<Pipe<OwnedReadHalf, OwnedWriteHalf>>,
    /// Bumped by each resume: the run of an older generation gives the pipe up.
    generation: tokio::sync::watch::Sender<u64>,
    _busy: Busy,
}

/// The agent's forwards: how many forwards and sync sessions are open (use of the
/// workspace), and the resumable connections by token.
#[derive(Default)]
pub struct Forwards {
    open: Arc<AtomicUsize>,
    kept: Mutex<HashMap<ForwardToken, Arc<Entry>>>,
}

impl Forwards {
    /// Forwards (kept ones too) and sync sessions open right now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a forward or sync session while the guard lives.
    pub fn busy(&self) -> Busy {
        self.open.fetch_add(1, Ordering::Relaxed);
        Busy(self.open.clone())
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<ForwardToken, Arc<Entry>>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops a connection, unless a resume of a later generation holds it.
    fn forget(&self, token: &ForwardToken, generation: u64) {
        let mut kept = self.kept();
        if kept
            .get(token)
            .is_some_and(|e| *e.generation.borrow() == generation)
        {
            kept.remove(token);
        }
    }

    /// Drops a connection whose stream broke if no resume comes within the grace.
    fn expire_later(self: &Arc<Self>, token: ForwardToken, generation: u64) {
        let forwards = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(RESUME_GRACE_SECS)).await;
            forwards.forget(&token, generation);
        });
    }
}

/// Counts an open forward or sync session for as long as it lives.
pub struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
