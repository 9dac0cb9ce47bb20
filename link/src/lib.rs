//! The QUIC link shared by the agent, the hub and the CLI.
//!
//! Entry points: [`install_crypto_provider`] (once, at process start), [`server_config`] and
//! [`client_config`] (TLS 1.3 over QUIC with aws-lc-rs as the only crypto provider, peers
//! pinned to one CA, never the system roots), [`SharedTickets`] (TLS session tickets any
//! replica of a hub can open), [`transport_config`] (the timeouts every connection shares),
//! and [`FramedRecv`] / [`send_msg`], which move [`protocol`] messages over QUIC streams.
//! Everything about what the messages mean lives in `protocol`; this crate only moves
//! bytes.

use protocol::{FrameDecoder, Message, ProtocolError};
use quinn::{RecvStream, SendStream};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::Duration;

pub mod forward;
mod tickets;
pub use tickets::SharedTickets;

/// What can go wrong moving messages over a QUIC stream.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("stream closed before the expected message")]
    Closed,
}

/// The crypto provider: aws-lc-rs, and only it, preferring AES-128-GCM/SHA-256 (the
/// cheapest suite to set up, which matters when a fleet reconnects at once).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// How many bidirectional streams an agent may have open towards the hub at once (control,
/// enrollment). quinn keeps state for every stream the peer may open, so this stays small
/// on the hub, where thousands of connections live.
pub const HUB_ACCEPTS_STREAMS: u32 = 8;

/// How many streams the hub may have open towards one agent at once (terminals, forwards,
/// previews, sync sessions).
pub const AGENT_ACCEPTS_STREAMS: u32 = 256;

/// How many bytes of one stream a receiver takes before its application reads them
/// (quinn's default). Resumable forwards keep as many sent bytes as two such windows hold
/// (a relayed path), with room to spare.
pub const STREAM_WINDOW: u32 = 1_250_000;
const _: () = assert!(protocol::forward::REPLAY_CAPACITY as u64 >= 4 * STREAM_WINDOW as u64);

/// Transport settings: an idle timeout longer than the application heartbeat timeout
/// (heartbeats are the liveness signal; this is a backstop), the number of bidirectional
/// streams the peer may open, no unidirectional streams, no datagrams.
pub fn transport_config(idle_timeout: Duration, peer_streams: u32) -> Arc<quinn::TransportConfig> {
    Arc::new(transport(idle_timeout, peer_streams))
}

fn transport(idle_timeout: Duration, peer_streams: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(STREAM_WINDOW.into());
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.max_concurrent_bidi_streams(peer_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    // MTU discovery stays at quinn's bounds (up to 1,452-byte payloads): larger datagrams
    // need every endpoint to accept them (`EndpointConfig::max_udp_payload_size`), and on
    // loopback 8,952-byte ones moved bulk data slower, not faster (the `quic` benchmark:
    // 289-305 against 389-427 MiB/s).
    t
}

/// How many CA certificates a trust bundle may hold: the current one and, during a CA
/// rotation, the one before it (room to spare, no more).
pub const MAX_TRUSTED_CAS: usize = 4;

fn roots(cas: &[Vec<u8>]) -> Result<Arc<RootCertStore>, rustls::Error> {
    if cas.is_empty() || cas.len() > MAX_TRUSTED_CAS {
        return Err(rustls::Error::General(format!(
            "a trust bundle holds 1 to {MAX_TRUSTED_CAS} CA certificates, not {}",
            cas.len()
        )));
    }
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(CertificateDer::from(ca.clone()))?;
    }
    Ok(Arc::new(roots))
}

/// The CA certificates (DER) of a PEM trust bundle: one `CERTIFICATE` block, or several
/// during a CA rotation. Anything else in the text is refused.
pub fn parse_ca_bundle(pem: &str) -> Result<Vec<Vec<u8>>, rustls::Error> {
    use rustls_pki_types::pem::{PemObject, SectionKind};
    let mut cas = Vec::new();
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
        match item.map_err(|e| rustls::Error::General(format!("CA bundle: {e}")))? {
            (SectionKind::Certificate, der) => cas.push(der),
            (kind, _) => {
                return Err(rustls::Error::General(format!(
                    "CA bundle: unexpected {kind:?} section"
                )));
            }
        }
    }
    if cas.is_empty() || cas.len() > MAX_TRUSTED_CAS {
        return Err(rustls::Error::General(format!(
            "CA bundle: expected 1 to {MAX_TRUSTED_CAS} certificates, found {}",
            cas.len()
        )));
    }
    Ok(cas)
}

fn quic_tls_error(e: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(format!("quic tls config: {e}"))
}

/// TLS 1.3 presenting `cert_chain`/`key_pkcs8`, taking client certificates issued by one of
/// `client_cas`: required, or optional (the application decides what clients without one
/// may do).
fn tls_server(
    cert_chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
    client_cas: &[Vec<u8>],
    require_client_cert: bool,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = crypto_provider();
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(client_cas)?,
        provider.clone(),
    );
    if !require_client_cert {
        verifier = verifier.allow_unauthenticated();
    }
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.build().map_err(quic_tls_error)?)
        .with_single_cert(
            cert_chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8)),
        )
}

/// A server: presents `cert_chain`/`key_pkcs8`; accepts client certificates issued by any
/// of `client_cas` (DER), and clients with none (the application decides what those may do).
/// Sessions resume from `tickets`, which every server holding the same secret can open.
pub fn server_config(
    cert_chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
    client_cas: &[Vec<u8>],
    alpn: &[&[u8]],
    idle_timeout: Duration,
    tickets: Arc<SharedTickets>,
) -> Result<quinn::ServerConfig, rustls::Error> {
    let mut tls = tls_server(cert_chain, key_pkcs8, client_cas, false)?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tls.ticketer = tickets;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(quic_tls_error)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config(idle_timeout, HUB_ACCEPTS_STREAMS));
    Ok(cfg)
}

/// How long a direct connection (CLI <-> agent) may stay silent before it counts as dead;
/// the CLI sends keep-alives every fifth of it, so a cut path is noticed within this and
/// the session moves to the relay.
pub const DIRECT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// An agent's server config for direct clients: presents the agent's certificate, requires
/// a client certificate issued by one of `client_cas` (what it allows is the caller's to
/// check), ALPN `wsh-direct/1`, no session tickets (each connection is a fresh credential).
pub fn direct_server_config(
    cert_der: Vec<u8>,
    key_pkcs8: Vec<u8>,
    client_cas: &[Vec<u8>],
) -> Result<quinn::ServerConfig, rustls::Error> {
    let mut tls = tls_server(vec![cert_der], key_pkcs8, client_cas, true)?;
    tls.alpn_protocols = vec![protocol::ALPN_DIRECT.to_vec()];
    tls.send_tls13_tickets = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(quic_tls_error)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config(DIRECT_IDLE_TIMEOUT, AGENT_ACCEPTS_STREAMS));
    Ok(cfg)
}

/// A CLI's config for a direct connection: trusts only `cas`, presents the direct
/// credential `identity` (DER cert, DER key), ALPN `wsh-direct/1`, keep-alives every
/// fifth of [`DIRECT_IDLE_TIMEOUT`]. The agent never opens streams towards the CLI.
pub fn direct_client_config(
    cas: &[Vec<u8>],
    identity: (Vec<u8>, Vec<u8>),
) -> Result<quinn::ClientConfig, rustls::Error> {
    let mut t = transport(DIRECT_IDLE_TIMEOUT, 0);
    t.keep_alive_interval(Some(DIRECT_IDLE_TIMEOUT / 5));
    client_with_transport(cas, Some(identity), protocol::ALPN_DIRECT, Arc::new(t))
}

/// CLI connections send a QUIC keep-alive this often: an idle terminal must not let the
/// connection time out (agents have application heartbeats instead).
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A CLI client config: trusts only `cas` (DER), ALPN `wsh-client/1`, keep-alives on.
pub fn cli_client_config(cas: &[Vec<u8>]) -> Result<quinn::ClientConfig, rustls::Error> {
    // The hub never opens streams towards the CLI.
    let mut t = transport(Duration::from_secs(30), 0);
    t.keep_alive_interval(Some(CLIENT_KEEP_ALIVE));
    client_with_transport(cas, None, protocol::ALPN_CLIENT, Arc::new(t))
}

/// How long a connection between replicas may stay silent before it counts as dead.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(6);

/// A replica's client config for connections to the other replicas of its hub: trusts only
/// `cas`, presents the replica certificate `identity` (DER cert, DER key), ALPN
/// `wsh-peer/1`, accepts no streams from the other side, and notices a dead replica within
/// [`PEER_IDLE_TIMEOUT`] (keep-alives every third of it), so its sessions end instead of
/// hanging.
pub fn peer_client_config(
    cas: &[Vec<u8>],
    identity: (Vec<u8>, Vec<u8>),
) -> Result<quinn::ClientConfig, rustls::Error> {
    let mut t = transport(PEER_IDLE_TIMEOUT, 0);
    t.keep_alive_interval(Some(PEER_IDLE_TIMEOUT / 3));
    client_with_transport(cas, Some(identity), protocol::ALPN_PEER, Arc::new(t))
}

/// The longest an agent's connection to its hub stays quiet: a QUIC keep-alive goes out
/// after this long without a packet from the hub. When the replica holding an agent dies,
/// the agent learns it from the stateless reset that another replica (or the restarted hub)
/// answers its next packet with, so this bounds how long it takes to notice (half of it on
/// average) where the application heartbeat alone would wait up to its interval (2 s). At
/// 1 s it fires about once per default heartbeat cycle: one small packet in and one
/// acknowledgement out for the hub, much cheaper than a heartbeat.
pub const AGENT_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// An agent's client config for its hub: mutual TLS with the agent's certificate (none
/// while it enrolls), ALPN `wsh-agent/1`, a keep-alive after `keep_alive` of quiet
/// ([`AGENT_KEEP_ALIVE`] by default).
pub fn agent_client_config(
    cas: &[Vec<u8>],
    identity: Option<(Vec<u8>, Vec<u8>)>,
    idle_timeout: Duration,
    keep_alive: Option<Duration>,
) -> Result<quinn::ClientConfig, rustls::Error> {
    let mut t = transport(idle_timeout, AGENT_ACCEPTS_STREAMS);
    t.keep_alive_interval(keep_alive);
    client_with_transport(cas, identity, protocol::ALPN_AGENT, Arc::new(t))
}

/// A client that trusts only `cas` (DER), optionally presenting a client certificate.
pub fn client_config(
    cas: &[Vec<u8>],
    identity: Option<(Vec<u8>, Vec<u8>)>,
    alpn: &[u8],
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, rustls::Error> {
    let transport = transport_config(idle_timeout, AGENT_ACCEPTS_STREAMS);
    client_with_transport(cas, identity, alpn, transport)
}

fn client_with_transport(
    cas: &[Vec<u8>],
    identity: Option<(Vec<u8>, Vec<u8>)>,
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(cas)?);
    let mut tls = match identity {
        Some((cert_der, key_pkcs8)) => builder.with_client_auth_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8)),
        )?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(quic_tls_error)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// An endpoint config whose stateless-reset key and connection-id key come from a persisted
/// secret, so that a restarted server recognises the connection ids it handed out before
/// and resets those connections at once: clients reconnect on their next packet instead of
/// waiting for a timeout.
pub fn endpoint_config(secret: &[u8]) -> quinn::EndpointConfig {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let cid_key = aws_lc_rs::hmac::sign(&key, b"connection-id key");
    let mut cid_key_bytes = [0u8; 8];
    cid_key_bytes.copy_from_slice(&cid_key.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key_bytes);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(key));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // Resets are always smaller than the packet that caused them (no amplification); a whole
    // fleet must be told at once after a restart, so do not rate-limit them.
    cfg.min_reset_interval(Duration::ZERO);
    cfg
}

/// Binds a UDP socket with large kernel buffers (as far as the system allows), so a burst of
/// handshakes (a fleet reconnecting after a hub restart) is queued rather than dropped.
pub fn bind_udp(
    addr: std::net::SocketAddr,
    buffer_bytes: usize,
) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = state.set_recv_buffer_size((&socket).into(), buffer_bytes);
    let _ = state.set_send_buffer_size((&socket).into(), buffer_bytes);
    Ok(socket)
}

/// The local address this machine sends from towards `to` (no packet is sent): the address
/// a peer on the same network reaches it at.
pub fn local_ip_towards(to: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let to = SocketAddr::new(to.ip().to_canonical(), to.port());
    let bind: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(to).ok()?;
    Some(socket.local_addr().ok()?.ip().to_canonical()).filter(|ip| !ip.is_unspecified())
}

/// The application protocol (ALPN) the connection negotiated.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The peer's leaf certificate (DER), if it presented one.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| c.to_vec())
}

/// Writes one message as a frame.
pub async fn send_msg<M: Message>(send: &mut SendStream, msg: &M) -> Result<(), LinkError> {
    let frame = protocol::encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// The receiving half of a stream, decoded frame by frame.
#[derive(Debug)]
pub struct FramedRecv {
    recv: RecvStream,
    decoder: FrameDecoder,
    finished: bool,
    bytes_read: u64,
}

impl FramedRecv {
    pub fn new(recv: RecvStream) -> Self {
        Self::with_limit(recv, protocol::MAX_FRAME_LEN)
    }

    /// A receiver that refuses frames over `max` bytes (control streams use a small one).
    pub fn with_limit(recv: RecvStream, max: usize) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(max),
            finished: false,
            bytes_read: 0,
        }
    }

    /// Changes the largest frame accepted from here on (a stream whose header said what
    /// follows).
    pub fn set_limit(&mut self, max: usize) {
        self.decoder.set_max(max);
    }

    /// The next message; `Ok(None)` at a clean end of stream.
    pub async fn next<M: Message>(&mut self) -> Result<Option<M>, LinkError> {
        loop {
            if let Some(msg) = self.decoder.decode::<M>()? {
                return Ok(Some(msg));
            }
            if self.finished {
                self.decoder.finish()?;
                return Ok(None);
            }
            match self.recv.read_chunk(64 * 1024, true).await? {
                Some(chunk) => {
                    self.bytes_read += chunk.bytes.len() as u64;
                    self.decoder.push(&chunk.bytes)
                }
                None => self.finished = true,
            }
        }
    }

    /// Bytes read off the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next message, which must exist.
    pub async fn expect<M: Message>(&mut self) -> Result<M, LinkError> {
        self.next().await?.ok_or(LinkError::Closed)
    }

    /// Gives back the raw stream (e.g. to splice it once the header is read).
    pub fn into_parts(self) -> (RecvStream, FrameDecoder) {
        (self.recv, self.decoder)
    }
}

/// Joins a byte stream (a TCP connection, stdin/stdout) to a QUIC stream until both
/// directions end: `early` (bytes that arrived with a header) goes out first; the QUIC
/// stream finishing shuts down `write`, `read` ending finishes the QUIC stream. The first
/// error (a reset on either side) ends both directions and resets the QUIC stream.
pub async fn splice<R, W>(
    mut read: R,
    mut write: W,
    mut send: SendStream,
    mut recv: RecvStream,
    early: &[u8],
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let inbound = async {
        write.write_all(early).await?;
        while let Some(chunk) = recv
            .read_chunk(usize::MAX, true)
            .await
            .map_err(std::io::Error::other)?
        {
            write.write_all(&chunk.bytes).await?;
            write.flush().await?;
        }
        write.shutdown().await
    };
    let outbound = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = read.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n])
                .await
                .map_err(std::io::Error::other)?;
        }
        send.finish().map_err(std::io::Error::other)
    };
    let result = tokio::try_join!(inbound, outbound).map(|_| ());
    if result.is_err() {
        let _ = send.reset(quinn::VarInt::from_u32(1));
        let _ = recv.stop(quinn::VarInt::from_u32(1));
    }
    result
}
