//! Direct connections from CLIs (ALPN `wsh-direct/1`, see `protocol::direct`): the agent
//! accepts QUIC on the socket it dials the hub from, so the NAT mapping the hub saw is the
//! one a client reaches. A client presents a short-lived certificate from the hub CA whose
//! URIs name the user, this workspace and what it may open; the agent serves those stream
//! types exactly as it serves the hub's.

use crate::session::Services;
use link::send_msg;
use protocol::close::CloseCode;
use protocol::direct::{Candidates, Credential, DirectMsg, MAX_CANDIDATES, Purpose};
use protocol::stream::{DirectOpen, StreamHeader};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the agent keeps sending towards a client it was told about.
const PUNCH_FOR: Duration = Duration::from_secs(3);
/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent needs to take direct connections.
pub struct Direct {
    workspace_id: String,
    server: quinn::ServerConfig,
    /// A client config only for the packets that open the agent's NAT towards a client.
    punch: quinn::ClientConfig,
    /// The agent's address as the hub saw it, per connection.
    observed: Mutex<Option<SocketAddr>>,
    /// The direct clients connected now (for the hub: who uses which path).
    clients: tokio::sync::watch::Sender<Vec<Client>>,
}

/// A direct client, while it is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    id: usize,
    user: String,
    addr: SocketAddr,
    since: std::time::Instant,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct")
            .field("workspace_id", &self.workspace_id)
            .finish_non_exhaustive()
    }
}

impl Direct {
    /// Direct connections for an agent with this certificate, or `None` (and why) when its
    /// certificate predates them (it carries no server name) or is unreadable.
    pub fn new(
        cert_der: &[u8],
        key_pkcs8: &[u8],
        hub_cas: &[Vec<u8>],
    ) -> Result<Arc<Self>, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| format!("certificate: {e}"))?;
        let workspace_id = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("certificate without a workspace")?
            .to_owned();
        let name = protocol::direct::agent_server_name(&workspace_id);
        let names_it = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|san| {
                san.value.general_names.iter().any(
                    |n| matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if *d == name),
                )
            });
        if !names_it {
            return Err(
                "the certificate predates direct connections (enroll again to get them)".into(),
            );
        }
        let server = link::direct_server_config(cert_der.to_vec(), key_pkcs8.to_vec(), hub_cas)
            .map_err(|e| e.to_string())?;
        let punch = link::client_config(hub_cas, None, protocol::ALPN_DIRECT, PUNCH_FOR)
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            workspace_id,
            server,
            punch,
            observed: Mutex::new(None),
            clients: tokio::sync::watch::Sender::new(Vec::new()),
        }))
    }

    /// Wakes when direct clients come or go; marked changed at once if there are any, so
    /// a new session with the hub reports them.
    pub fn clients_changed(&self) -> tokio::sync::watch::Receiver<Vec<Client>> {
        let mut rx = self.clients.subscribe();
        if !rx.borrow().is_empty() {
            rx.mark_changed();
        }
        rx
    }

    /// The report of the direct clients connected now.
    pub fn clients_report(&self) -> protocol::control::DirectClients {
        let now = std::time::Instant::now();
        let clients = self.clients.borrow();
        protocol::control::DirectClients {
            clients: clients
                .iter()
                .take(protocol::control::MAX_DIRECT_CLIENTS)
                .map(|c| protocol::control::DirectClient {
                    user: c.user.clone(),
                    addr: c.addr.to_string(),
                    connected_ago_ms: now.duration_since(c.since).as_millis() as u64,
                })
                .collect(),
        }
    }

    pub fn server_config(&self) -> quinn::ServerConfig {
        self.server.clone()
    }

    /// The hub told the agent how it sees it.
    pub fn observed(&self, addr: &str) {
        let addr = addr.parse().ok();
        *self.observed.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// A `Direct` stream from the hub: punch towards the client's candidates from
    /// `endpoint`, and answer with the agent's own.
    pub async fn punch(
        &self,
        open: DirectOpen,
        endpoint: &quinn::Endpoint,
        hub: SocketAddr,
        mut send: quinn::SendStream,
    ) -> Result<(), link::LinkError> {
        let Some(client) = open.client.parse() else {
            return crate::session::refuse(
                &mut send,
                protocol::stream::StreamRefusal::BadHeader,
                "bad candidates".into(),
            )
            .await;
        };
        // QUIC Initials towards each candidate open this side's NAT for the client's
        // packets; they are never answered (the client takes no connections).
        for addr in client {
            if let Ok(connecting) = endpoint.connect_with(self.punch.clone(), addr, "punch.invalid")
            {
                tokio::spawn(async move {
                    if let Ok(Ok(conn)) = tokio::time::timeout(PUNCH_FOR, connecting).await {
                        conn.close(quinn::VarInt::from_u32(0), b"");
                    }
                });
            }
        }
        let port = endpoint.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut addrs: Vec<SocketAddr> = Vec::new();
        if let Some(seen) = *self.observed.lock().unwrap_or_else(|p| p.into_inner()) {
            addrs.push(seen);
        }
        if let Some(ip) = link::local_ip_towards(hub) {
            addrs.push(SocketAddr::new(ip, port));
        }
        addrs.dedup();
        addrs.truncate(MAX_CANDIDATES);
        let accepted = protocol::stream::StreamReply::Accepted(protocol::stream::Accepted {});
        send_msg(&mut send, &accepted).await?;
        let candidates = Candidates {
            addrs: addrs.iter().map(ToString::to_string).collect(),
        };
        send_msg(&mut send, &DirectMsg::Candidates(candidates)).await?;
        let _ = send.finish();
        Ok(())
    }

    /// Takes direct connections on `endpoint` until the future is dropped (the agent's
    /// session with the hub ends); each one lives until its client goes.
    pub async fn accept(self: Arc<Self>, endpoint: quinn::Endpoint, services: Services) {
        while let Some(incoming) = endpoint.accept().await {
            let (this, services) = (self.clone(), services.clone());
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(conn)) => this.serve(conn, remote, services).await,
                    Ok(Err(e)) => tracing::info!(%remote, error = %e, "direct client refused"),
                    Err(_) => tracing::info!(%remote, "direct client: handshake timed out"),
                }
            });
        }
    }

    async fn serve(&self, conn: quinn::Connection, remote: SocketAddr, services: Services) {
        let credential = link::peer_certificate(&conn)
            .as_deref()
            .and_then(credential_of)
            .filter(|c| c.workspace_id == self.workspace_id);
        let Some(credential) = credential else {
            tracing::warn!(%remote, "direct client refused: no credential for this workspace");
            conn.close(
                quinn::VarInt::from_u32(CloseCode::Unauthorized.code()),
                b"no credential for this workspace",
            );
            return;
        };
        tracing::info!(%remote, user = %credential.user, "direct client connected");
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.clients.send_modify(|c| {
            c.push(Client {
                id,
                user: credential.user.clone(),
                addr: remote,
                since: std::time::Instant::now(),
            })
        });
        let credential = Arc::new(credential);
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(crate::session::serve_stream(
                services.clone(),
                Some(credential.clone()),
                send,
                recv,
            ));
        }
        self.clients.send_modify(|c| c.retain(|c| c.id != id));
        tracing::info!(%remote, user = %credential.user, "direct client gone");
    }
}

/// The credential of a client certificate the TLS layer verified against the hub CA.
fn credential_of(cert_der: &[u8]) -> Option<Credential> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    Credential::from_uris(san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    }))
}

/// Which stream types a credential must allow for this header (`None`: never direct).
pub fn purpose_of(header: &StreamHeader) -> Option<Purpose> {
    match header {
        // A command runs with the same power as a terminal.
        StreamHeader::Pty(_) | StreamHeader::Exec(_) => Some(Purpose::Pty),
        StreamHeader::TcpForward(_) | StreamHeader::Forward(_) => Some(Purpose::Forward),
        // The files API reaches what sync reaches.
        StreamHeader::Sync(_) | StreamHeader::Files(_) => Some(Purpose::Sync),
        _ => None,
    }
}
