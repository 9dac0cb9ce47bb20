//! TCP forward streams: the hub asks for a port, the agent connects to it on loopback and
//! copies bytes both ways. Finishing one direction half-closes it on the other side, so
//! protocols that rely on half-close (an HTTP/1.0 request, `ssh`'s EOF) behave as on a
//! direct connection.

use link::{FramedRecv, LinkError, send_msg};
use protocol::stream::{Accepted, StreamRefusal, StreamRefused, StreamReply, TcpForwardOpen};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;

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

/// Serves one forward stream (the header has been read).
pub async fn serve(
    open: TcpForwardOpen,
    mut send: quinn::SendStream,
    recv: FramedRecv,
    open_forwards: Arc<AtomicUsize>,
) -> Result<(), LinkError> {
    let refuse = |reason, message: String| StreamReply::Refused(StreamRefused { reason, message });
    if open.port == 0 {
        send_msg(
            &mut send,
            &refuse(StreamRefusal::BadHeader, "port 0".into()),
        )
        .await?;
        let _ = send.finish();
        return Ok(());
    }
    let tcp = match connect(open.port).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let message = format!("port {}: {e}", open.port);
            send_msg(&mut send, &refuse(StreamRefusal::Unavailable, message)).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let _ = tcp.set_nodelay(true);
    send_msg(&mut send, &StreamReply::Accepted(Accepted {})).await?;
    let _busy = Busy::new(open_forwards);
    let (recv, mut decoder) = recv.into_parts();
    let (tcp_read, tcp_write) = tcp.into_split();
    // Bytes that arrived with the header belong to the connection.
    let early = decoder.take_buffered();
    if let Err(e) = link::splice(tcp_read, tcp_write, send, recv, &early).await {
        tracing::debug!(port = open.port, error = %e, "forward ended");
    }
    Ok(())
}

/// Counts an open forward or sync session for as long as it lives.
pub struct Busy(Arc<AtomicUsize>);

impl Busy {
    pub fn new(count: Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::Relaxed);
        Busy(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
