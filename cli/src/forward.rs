//! `wsh forward` and `wsh proxy`: TCP to ports inside a workspace, over the CLI's QUIC
//! connection to the hub (which splices each stream to the agent). No inbound port is
//! opened on the workspace.

use crate::path::Paths;
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// A forward stream to `port`. When the hub replica answers that the agent moved (or
/// that it is leaving), a new connection looks for it again, for up to 10 s; when the
/// direct path turns out dead under it, the relay carries it.
async fn open(paths: &Paths, port: u16) -> Result<(quinn::SendStream, quinn::RecvStream, Vec<u8>)> {
    for _ in 0..50 {
        let link = paths.link().await?;
        match link.forward(&paths.workspace, port).await {
            Err(e) if e.is::<crate::attach::Moved>() => {
                paths.failed(&link).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) if link.direct && link.conn.close_reason().is_some() => {
                paths.failed(&link).await;
            }
            result => return result,
        }
    }
    bail!("the workspace's agent did not come back")
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
                    let result = async {
                        let (send, recv, early) = open(&paths, remote).await?;
                        let (read, write) = tcp.into_split();
                        link::splice(read, write, send, recv, &early).await?;
                        anyhow::Ok(())
                    };
                    if let Err(e) = result.await {
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
    let (send, recv, early) = open(paths, port).await?;
    link::splice(tokio::io::stdin(), tokio::io::stdout(), send, recv, &early).await?;
    Ok(())
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
