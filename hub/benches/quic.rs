//! QUIC floor benchmark: what one QUIC connection costs on this machine with none of our
//! code on top (quinn, aws-lc-rs, the transport settings every link of ours uses), beside
//! kernel TCP on loopback in the same run. The terminal and ports benchmarks' QUIC rows
//! stand on this floor: a keystroke's echo over the direct path is one such round trip plus
//! the agent's PTY, and `wsh forward` moves its bytes through one (direct) or two (relayed)
//! such connections. Each side (and the relay between two connections, as the hub sits on
//! the relayed path) runs on a thread of its own with its own single-threaded runtime, as
//! separate processes would.
//!
//! `cargo bench -p workspace-hub --bench quic -- [--samples N] [--bulk-mib M]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const ALPN: &[u8] = b"quic-floor";
const IDLE: Duration = Duration::from_secs(30);
/// What the client asks for on each stream (its first byte).
const ECHO: u8 = b'e';
const SINK: u8 = b's';
const CHUNK: usize = 64 * 1024;

struct Args {
    samples: usize,
    bulk_mib: usize,
}

fn parse_args() -> Args {
    let a = harness::bench::BenchArgs::parse(&["--samples", "--bulk-mib"]);
    Args {
        samples: a.num("--samples", 5000, 50),
        bulk_mib: a.num("--bulk-mib", 512, 4),
    }
}

/// A CA and a server certificate for `localhost` (the hub's own issuing code); the client
/// shows none.
struct Pki {
    ca_der: Vec<u8>,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

fn pki() -> Pki {
    let (ca, _) = hub::base::ca::HubCa::generate().unwrap();
    let server = ca.issue_server(&["localhost".to_string()]).unwrap();
    Pki {
        ca_der: ca.cert_der().to_vec(),
        cert_der: server.cert_der,
        key_der: server.key_pkcs8,
    }
}

/// Starts `serve` on a thread of its own (its own runtime) and returns what it bound.
fn server_thread<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(std::sync::mpsc::Sender<SocketAddr>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(serve(tx));
    });
    rx.recv().expect("the server thread started")
}

/// Answers one stream: echoes each chunk (`ECHO`), or counts what arrives and answers with
/// the count once the client finishes (`SINK`).
async fn answer<R, W>(mut recv: R, mut send: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut mode = [0u8; 1];
    if recv.read_exact(&mut mode).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match recv.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        if mode[0] == ECHO && send.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = send.write_all(&total.to_le_bytes()).await;
    let _ = send.shutdown().await;
}

fn server_config(pki: &Pki) -> quinn::ServerConfig {
    link::server_config(
        vec![pki.cert_der.clone()],
        pki.key_der.clone(),
        std::slice::from_ref(&pki.ca_der),
        &[ALPN],
        IDLE,
        Arc::new(link::SharedTickets::new(b"floor", &[&pki.ca_der])),
    )
    .unwrap()
}

fn client_config(pki: &Pki) -> quinn::ClientConfig {
    link::client_config(std::slice::from_ref(&pki.ca_der), None, ALPN, IDLE).unwrap()
}

fn quic_server(pki: &Pki) -> SocketAddr {
    let config = server_config(pki);
    server_thread(move |addr| async move {
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        addr.send(endpoint.local_addr().unwrap()).unwrap();
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            tokio::spawn(async move {
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(answer(recv, send));
                }
            });
        }
    })
}

/// A relay in the middle, as the hub is on the relayed path: each stream a client opens is
/// spliced, chunk by chunk, to a stream of its own connection to `upstream`.
fn quic_relay(pki: &Pki, upstream: SocketAddr) -> SocketAddr {
    let server = server_config(pki);
    let client = client_config(pki);
    server_thread(move |addr| async move {
        let mut endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(client);
        let up = endpoint
            .connect(upstream, "localhost")
            .unwrap()
            .await
            .unwrap();
        addr.send(endpoint.local_addr().unwrap()).unwrap();
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let up = up.clone();
            tokio::spawn(async move {
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let (up_send, up_recv) = up.open_bi().await.unwrap();
                    tokio::spawn(pipe(recv, up_send));
                    tokio::spawn(pipe(up_recv, send));
                }
            });
        }
    })
}

async fn pipe(mut from: quinn::RecvStream, mut to: quinn::SendStream) {
    while let Ok(Some(chunk)) = from.read_chunk(usize::MAX, true).await {
        if to.write_chunk(chunk.bytes).await.is_err() {
            return;
        }
    }
    let _ = to.finish();
}

fn tcp_server() -> SocketAddr {
    server_thread(|addr| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addr.send(listener.local_addr().unwrap()).unwrap();
        while let Ok((stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            let (recv, send) = stream.into_split();
            tokio::spawn(answer(recv, send));
        }
    })
}

/// One client stream, QUIC or TCP.
struct Stream {
    send: Box<dyn AsyncWrite + Unpin + Send>,
    recv: Box<dyn AsyncRead + Unpin + Send>,
}

async fn quic_connect(pki: &Pki, server: SocketAddr) -> quinn::Connection {
    let config = client_config(pki);
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
        .connect(server, "localhost")
        .unwrap()
        .await
        .unwrap()
}

async fn quic_stream(conn: &quinn::Connection, mode: u8) -> Stream {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&[mode]).await.unwrap();
    Stream {
        send: Box::new(send),
        recv: Box::new(recv),
    }
}

async fn tcp_stream(server: SocketAddr, mode: u8) -> Stream {
    let s = tokio::net::TcpStream::connect(server).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (recv, mut send) = s.into_split();
    send.write_all(&[mode]).await.unwrap();
    Stream {
        send: Box::new(send),
        recv: Box::new(recv),
    }
}

/// One byte there and back, `samples` times (after 100 unmeasured): p50 and p99.
async fn round_trips(mut s: Stream, samples: usize) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(samples);
    let mut byte = [0u8; 1];
    for i in 0..samples + 100 {
        let t = Instant::now();
        s.send.write_all(&[i as u8]).await.unwrap();
        s.recv.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte[0], i as u8);
        if i >= 100 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    (times[samples / 2], times[samples * 99 / 100])
}

/// `mib` MiB sent and counted at the other end; MiB/s from the first byte written to the
/// count's arrival.
async fn bulk(mut s: Stream, mib: usize) -> f64 {
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    for _ in 0..mib * (1 << 20) / CHUNK {
        s.send.write_all(&buf).await.unwrap();
    }
    s.send.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.recv.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_le_bytes(count), (mib * (1 << 20)) as u64);
    mib as f64 / start.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let args = parse_args();
    link::install_crypto_provider();
    let pki = pki();
    let quic_addr = quic_server(&pki);
    let relay_addr = quic_relay(&pki, quic_addr);
    let tcp_addr = tcp_server();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        eprintln!("... round trips");
        let direct = quic_connect(&pki, quic_addr).await;
        let relayed = quic_connect(&pki, relay_addr).await;
        let rtt_direct = round_trips(quic_stream(&direct, ECHO).await, args.samples).await;
        let rtt_relayed = round_trips(quic_stream(&relayed, ECHO).await, args.samples).await;
        let rtt_tcp = round_trips(tcp_stream(tcp_addr, ECHO).await, args.samples).await;
        eprintln!("... bulk");
        let bulk_direct = bulk(quic_stream(&direct, SINK).await, args.bulk_mib).await;
        let bulk_relayed = bulk(quic_stream(&relayed, SINK).await, args.bulk_mib).await;
        let bulk_tcp = bulk(tcp_stream(tcp_addr, SINK).await, args.bulk_mib).await;
        println!(
            "QUIC floor: {} round trips, {} MiB in bulk, on loopback\n",
            args.samples, args.bulk_mib
        );
        println!(
            "| one stream | one byte there and back, p50 / p99 | vs TCP | bulk, MiB/s | vs TCP |"
        );
        println!("|---|---|---|---|---|");
        let row = |name: &str, rtt: (Duration, Duration), mib_s: f64| {
            println!(
                "| {name} | {} / {} | {:.2}x | {mib_s:.0} | {:.2}x |",
                ms(rtt.0),
                ms(rtt.1),
                rtt.0.as_secs_f64() / rtt_tcp.0.as_secs_f64(),
                mib_s / bulk_tcp
            );
        };
        row("TCP", rtt_tcp, bulk_tcp);
        row("QUIC, one connection", rtt_direct, bulk_direct);
        row(
            "QUIC, two connections spliced by a relay (as the hub)",
            rtt_relayed,
            bulk_relayed,
        );
        direct.close(0u32.into(), b"done");
        relayed.close(0u32.into(), b"done");
    });
}
