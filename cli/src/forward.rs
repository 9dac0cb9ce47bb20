//! `wsh forward` and `wsh proxy`: TCP to ports inside a workspace, over a direct QUIC
//! connection to the agent or through the hub (which splices each stream to the agent).
//! No inbound port is opened on the workspace.
//!
//! Each connection is resumable (`protocol::forward`): when its stream breaks (the direct
//! path died, the hub replica went away), it is picked up on whatever path works now,
//! without a byte lost; neither end of the TCP connection notices.

use crate::attach::{ForwardStream, Gone, Link, Moved};
use crate::path::Paths;
use anyhow::{Context, Result, bail};
use link::forward::{Ended, Pipe};
use protocol::forward::{RESUME_GRACE_SECS, Resume};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

/// How long commands with one long stream (`proxy`, `sync`) wait for a direct path before
/// starting on the relay.
pub const SETTLE: Duration = Duration::from_millis(1500);

/// One `-L`-style forward: a local address to a port inside the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub local: SocketAddr,
    pub remote: u16,
}

fn port(s: &str) -> Result<u16> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => bail!("{s:?} is not a port (1-65535)"),
        Ok(p) => Ok(p),
    }
}

impl std::str::FromStr for Spec {
    type Err = anyhow::Error;

    /// `PORT`, `LOCAL:REMOTE` or `BIND_ADDR:LOCAL:REMOTE` (`[::1]:8080:3000` for IPv6).
    fn from_str(s: &str) -> Result<Self> {
        let (front, remote) = s.rsplit_once(':').unwrap_or(("", s));
        let remote = port(remote)?;
        let local = match front.rsplit_once(':') {
            _ if front.is_empty() => SocketAddr::from(([127, 0, 0, 1], remote)),
            None => SocketAddr::from(([127, 0, 0, 1], port(front)?)),
            Some((addr, p)) => {
                let ip = addr.trim_start_matches('[').trim_end_matches(']');
                let ip = ip
                    .parse()
                    .with_context(|| format!("{addr:?} is not an IP address"))?;
                SocketAddr::new(ip, port(p)?)
            }
        };
        Ok(Spec { local, remote })
    }
}

/// How long a new forward stream may look for the agent (moved to another replica, or the
/// direct path dead under it).
const OPEN_WAIT: Duration = Duration::from_secs(10);

/// A forward stream to `port` (or a resume), on the path [`Paths::link`] picks. When the
/// hub replica answers that the agent moved (or that it is leaving), or the path turns out
/// dead, it tries again on a new one: for [`OPEN_WAIT`], or for a resume as long as the
/// agent keeps the connection.
async fn open(
    paths: &Paths,
    port: u16,
    resume: Option<Resume>,
) -> Result<(Arc<Link>, ForwardStream)> {
    let wait = match resume {
        None => OPEN_WAIT,
        Some(_) => Duration::from_secs(RESUME_GRACE_SECS),
    };
    let deadline = Instant::now() + wait;
    loop {
        let link = paths.link().await?;
        let e = match link.forward(&paths.workspace, port, resume).await {
            Ok(stream) => return Ok((link, stream)),
            Err(e) => e,
        };
        let dead = link.conn.close_reason().is_some();
        if e.is::<Moved>() || dead {
            paths.failed(&link).await;
        } else if resume.is_none() || e.is::<Gone>() {
            return Err(e);
        }
        if Instant::now() >= deadline {
            return Err(e.context("the workspace's agent did not come back"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Carries one local connection to `port`: over a resumable forward when the agent offers
/// one, picked up on any path when its stream breaks; over a plain one otherwise.
async fn carry<R, W>(paths: &Paths, port: u16, read: R, write: W) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut link, mut stream) = open(paths, port, None).await?;
    let Some(forwarding) = stream.resumable.take() else {
        let ForwardStream {
            send, recv, early, ..
        } = stream;
        link::splice(read, write, send, recv, &early).await?;
        return Ok(());
    };
    let token = forwarding.token;
    let mut pipe = Pipe::new(read, write);
    loop {
        let ForwardStream {
            send, recv, early, ..
        } = stream;
        match pipe.run(send, recv, &early).await {
            Ended::Done => return Ok(()),
            Ended::Failed(e) => return Err(e.into()),
            Ended::Broken(why) => {
                if link.conn.close_reason().is_some() {
                    paths.failed(&link).await;
                }
                let resume = Resume {
                    token,
                    received: pipe.received(),
                };
                (link, stream) = open(paths, port, Some(resume)).await.with_context(|| {
                    format!("the connection broke ({why}) and could not resume")
                })?;
                let Some(forwarding) = stream.resumable.take() else {
                    bail!("the agent answered a resume with a plain forward");
                };
                pipe.resume(forwarding.received)?;
            }
        }
    }
}

/// `wsh forward`: listens on every spec's local address until interrupted.
pub async fn forward(paths: Arc<Paths>, specs: &[Spec]) -> Result<()> {
    // Fail early on a bad token or hub, before listening.
    paths.link().await?;
    let workspace = &paths.workspace;
    let mut tasks = tokio::task::JoinSet::new();
    for spec in specs {
        let listener = tokio::net::TcpListener::bind(spec.local)
            .await
            .with_context(|| format!("listen on {}", spec.local))?;
        eprintln!(
            "forwarding {} -> {workspace}:{}",
            listener.local_addr()?,
            spec.remote
        );
        let (paths, remote) = (paths.clone(), spec.remote);
        tasks.spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let paths = paths.clone();
                tokio::spawn(async move {
                    let (read, write) = tcp.into_split();
                    if let Err(e) = carry(&paths, remote, read, write).await {
                        eprintln!("{peer} -> {}:{remote}: {e}", paths.workspace);
                    }
                });
            }
        });
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = tasks.join_next() => bail!("a listener stopped"),
    }
}

/// `wsh proxy`: joins stdin and stdout to a port (for OpenSSH's `ProxyCommand`).
pub async fn proxy(paths: &Paths, port: u16) -> Result<()> {
    anyhow::ensure!(port != 0, "port must be 1-65535");
    // One long connection: worth waiting a moment for the direct path.
    paths.settled_link(SETTLE).await?;
    carry(paths, port, tokio::io::stdin(), tokio::io::stdout()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_like_ssh_l() {
        let spec = |s: &str| s.parse::<Spec>();
        assert_eq!(
            spec("3000").unwrap(),
            Spec {
                local: "127.0.0.1:3000".parse().unwrap(),
                remote: 3000
            }
        );
        assert_eq!(
            spec("8080:3000").unwrap(),
            Spec {
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: 3000
            }
        );
        assert_eq!(
            spec("0.0.0.0:8080:22").unwrap().local,
            "0.0.0.0:8080".parse().unwrap()
        );
        assert_eq!(
            spec("[::1]:8080:22").unwrap().local,
            "[::1]:8080".parse().unwrap()
        );
        for bad in ["0", "65536", "x:80", "80:0", "nohost:1:2", "", "1:2:3:4"] {
            assert!(spec(bad).is_err(), "{bad}");
        }
    }
}
