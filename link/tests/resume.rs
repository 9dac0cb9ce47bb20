//! TLS session resumption across servers that share a ticket secret: what lets a fleet of
//! agents move from a dead hub replica to the others without a certificate exchange each.

use link::SharedTickets;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const ALPN: &[u8] = b"resume-test";

struct Pki {
    ca_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate DER, key PKCS#8 DER)
    fn leaf(&self, cn: &str, usage: ExtendedKeyUsagePurpose) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

struct Server {
    endpoint: quinn::Endpoint,
    tickets: Arc<SharedTickets>,
}

impl Server {
    fn start(pki: &Pki, secret: &[u8]) -> Self {
        let (cert, key) = pki.leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let tickets = Arc::new(SharedTickets::new(secret, &[&pki.ca_der]));
        let config = link::server_config(
            vec![cert],
            key,
            std::slice::from_ref(&pki.ca_der),
            &[ALPN],
            Duration::from_secs(10),
            tickets.clone(),
        )
        .unwrap();
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        Self { endpoint, tickets }
    }

    fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap()
    }
}

/// Connects, echoes one message (so the server's session tickets have arrived), and returns
/// the client certificate the server saw.
async fn round_trip(client: &quinn::Endpoint, server: &Server) -> Vec<u8> {
    let connecting = client.connect(server.addr(), "localhost").unwrap();
    let (conn, incoming) = tokio::join!(connecting, async {
        server.endpoint.accept().await.unwrap().await.unwrap()
    });
    let conn = conn.unwrap();
    let echo = async {
        let (mut send, mut recv) = incoming.accept_bi().await.unwrap();
        let got = recv.read_to_end(64).await.unwrap();
        send.write_all(&got).await.unwrap();
        send.finish().unwrap();
        send.stopped().await.unwrap();
    };
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"hello").await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(64).await.unwrap()
    };
    let ((), answer) = tokio::join!(echo, ask);
    assert_eq!(answer, b"hello");
    let seen = link::peer_certificate(&incoming).expect("the server saw a client certificate");
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    seen
}

#[tokio::test]
async fn a_session_resumes_on_any_server_holding_the_same_ticket_secret() {
    link::install_crypto_provider();
    let pki = Pki::new();
    let (client_cert, client_key) = pki.leaf("agent-1", ExtendedKeyUsagePurpose::ClientAuth);
    let config = link::client_config(
        std::slice::from_ref(&pki.ca_der),
        Some((client_cert.clone(), client_key)),
        ALPN,
        Duration::from_secs(10),
    )
    .unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(config);

    let a = Server::start(&pki, &[1; 32]);
    let b = Server::start(&pki, &[1; 32]);
    let stranger = Server::start(&pki, &[2; 32]);

    assert_eq!(round_trip(&client, &a).await, client_cert);
    assert_eq!(
        a.tickets.resumed(),
        0,
        "the first connection is a full handshake"
    );

    // B never saw this client, yet opens A's ticket, and the resumed session still carries
    // the client certificate the application checks.
    assert_eq!(round_trip(&client, &b).await, client_cert);
    assert_eq!(b.tickets.resumed(), 1);

    // And back on A, with a ticket B issued.
    assert_eq!(round_trip(&client, &a).await, client_cert);
    assert_eq!(a.tickets.resumed(), 1);

    // A server with another secret cannot open the ticket: a full handshake, and the
    // certificate is verified again.
    assert_eq!(round_trip(&client, &stranger).await, client_cert);
    assert_eq!(stranger.tickets.resumed(), 0);
}
