//! `wsh forward` and `wsh proxy`: TCP to ports inside a workspace, over the CLI's QUIC
//! connection to the hub (which splices each stream to the agent). No inbound port is
//! opened on the workspace.

use crate::attach::{Hub, Link};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

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

/// The QUIC link, opened on first use and again after it dies.
struct Shared {
    hub: Hub,
    link: Mutex<Option<Arc<Link>>>,
}

impl Shared {
    async fn link(&self) -> Result<Arc<Link>> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref().filter(|l| !l.is_closed()) {
            return Ok(l.clone());
        }
        let fresh = Arc::new(self.hub.connect().await?);
        *link = Some(fresh.clone());
        Ok(fresh)
    }

    /// A forward stream to `port`. When the hub replica answers that the agent moved (or
    /// that it is leaving), a new connection looks for it again, for up to 10 s.
    async fn forward(
        &self,
        workspace: &str,
        port: u16,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Vec<u8>)> {
        for _ in 0..50 {
            let link = self.link().await?;
            match link.forward(workspace, port).await {
                Err(e) if e.is::<crate::attach::Moved>() => {
                    let mut current = self.link.lock().await;
                    if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, &link)) {
                        *current = None;
                    }
                    drop(current);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                result => return result,
            }
        }
        bail!("the workspace's agent did not come back")
    }
}

/// `wsh forward`: listens on every spec's local address until interrupted.
pub async fn forward(hub: Hub, workspace: &str, specs: &[Spec]) -> Result<()> {
    let shared = Arc::new(Shared {
        hub,
        link: Mutex::new(None),
    });
    // Fail early on a bad token or workspace, before listening.
    shared.link().await?;
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
        let (shared, workspace, remote) = (shared.clone(), workspace.to_owned(), spec.remote);
        tasks.spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (shared, workspace) = (shared.clone(), workspace.clone());
                tokio::spawn(async move {
                    let result = async {
                        let (send, recv, early) = shared.forward(&workspace, remote).await?;
                        let (read, write) = tcp.into_split();
                        link::splice(read, write, send, recv, &early).await?;
                        anyhow::Ok(())
                    };
                    if let Err(e) = result.await {
                        eprintln!("{peer} -> {workspace}:{remote}: {e}");
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
pub async fn proxy(hub: Hub, workspace: &str, port: u16) -> Result<()> {
    anyhow::ensure!(port != 0, "port must be 1-65535");
    let link = hub.connect().await?;
    let (send, recv, early) = link.forward(workspace, port).await?;
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
