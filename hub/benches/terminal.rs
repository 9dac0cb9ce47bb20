//! Terminal benchmark: keystroke echo latency, bulk output throughput and replay, through
//! every path, against peers measured in the same run.
//!
//! `cargo bench -p workspace-hub --bench terminal -- [--samples N] [--bulk-mib M]`
//!
//! Paths: a raw local PTY (the floor), `ssh -tt` to a local OpenSSH server (the peer to
//! beat; skipped with a note if `sshd` is not installed), our direct QUIC path (what
//! `wsh attach` uses: client -> hub -> agent) and the browser's WebSocket bridge
//! (client -> hub -> agent). Every path runs the same program on a PTY: `cat` for echo, and
//! `cat` of a file / `seq` for throughput.

use harness::{HubOptions, TestHub};
use link::{FramedRecv, send_msg};
use protocol::pty::{PtyInput, PtyMsg, PtyOpenRequest};
use protocol::stream::{ClientPtyOpen, StreamHeader, StreamReply};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    samples: usize,
    bulk_mib: usize,
}

fn parse_args() -> Args {
    let a = harness::bench::BenchArgs::parse(&["--samples", "--bulk-mib"]);
    Args {
        samples: a.num("--samples", 1000, 20),
        bulk_mib: a.num("--bulk-mib", 256, 2),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    Latency {
        p50: pct(&samples, 0.5),
        p99: pct(&samples, 0.99),
    }
}

/// Bytes per second from the first output byte to the end of the stream.
struct Throughput {
    bytes: u64,
    elapsed: Duration,
}

impl Throughput {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

// ---------------------------------------------------------------------------------------
// Raw PTY (the floor)

fn raw_pty(
    command: &[&str],
) -> (
    Box<dyn portable_pty::MasterPty + Send>,
    Box<dyn portable_pty::Child + Send + Sync>,
) {
    let pair = portable_pty::native_pty_system()
        .openpty(portable_pty::PtySize {
            rows: 24,
            cols: 80,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut cmd = portable_pty::CommandBuilder::new(command[0]);
    cmd.args(&command[1..]);
    let child = pair.slave.spawn_command(cmd).unwrap();
    drop(pair.slave);
    (pair.master, child)
}

fn raw_echo(samples: usize) -> Latency {
    let (master, mut child) = raw_pty(&["cat"]);
    let mut reader = master.try_clone_reader().unwrap();
    let mut writer = master.take_writer().unwrap();
    let mut buf = [0u8; 4096];
    let mut out = Vec::new();
    for i in 0..samples + 20 {
        let c = b'a' + (i % 26) as u8;
        let t = Instant::now();
        writer.write_all(&[c]).unwrap();
        loop {
            let n = reader.read(&mut buf).unwrap();
            if buf[..n].contains(&c) {
                break;
            }
        }
        if i >= 20 {
            out.push(t.elapsed());
        }
    }
    let _ = child.kill();
    latency(out)
}

fn raw_bulk(command: &[&str]) -> Throughput {
    let (master, mut child) = raw_pty(command);
    let mut reader = master.try_clone_reader().unwrap();
    drop(master);
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    let mut first = None;
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                bytes += n as u64;
            }
        }
    }
    let _ = child.wait();
    Throughput {
        bytes,
        elapsed: first.map(|f| f.elapsed()).unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------
// Direct QUIC through the hub (what `wsh attach` does)

struct QuicPty {
    send: quinn::SendStream,
    recv: FramedRecv,
    session: String,
}

async fn quic_open(conn: &quinn::Connection, workspace: &str, open: PtyOpenRequest) -> QuicPty {
    let header = StreamHeader::ClientPty(ClientPtyOpen {
        workspace_id: workspace.into(),
    });
    quic_open_with(conn, &header, open).await
}

/// A PTY stream with `header`: `ClientPty` to the hub, `Pty` to the agent itself.
async fn quic_open_with(
    conn: &quinn::Connection,
    header: &StreamHeader,
    open: PtyOpenRequest,
) -> QuicPty {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = FramedRecv::new(recv);
    send_msg(&mut send, header).await.unwrap();
    send_msg(&mut send, &PtyMsg::Open(open)).await.unwrap();
    assert!(matches!(
        recv.expect::<StreamReply>().await.unwrap(),
        StreamReply::Accepted(_)
    ));
    let session = match recv.expect::<PtyMsg>().await.unwrap() {
        PtyMsg::Opened(o) => o.session,
        other => panic!("{other:?}"),
    };
    QuicPty {
        send,
        recv,
        session,
    }
}

fn command(cmd: &[&str]) -> PtyOpenRequest {
    PtyOpenRequest {
        command: cmd.iter().map(|s| s.to_string()).collect(),
        cols: 80,
        rows: 24,
        ..Default::default()
    }
}

impl QuicPty {
    async fn echo(&mut self, samples: usize) -> Latency {
        let mut out = Vec::new();
        for i in 0..samples + 20 {
            let c = b'a' + (i % 26) as u8;
            let t = Instant::now();
            send_msg(&mut self.send, &PtyMsg::Input(PtyInput { bytes: vec![c] }))
                .await
                .unwrap();
            loop {
                match self.recv.expect::<PtyMsg>().await.unwrap() {
                    PtyMsg::Output(o) if o.bytes.contains(&c) => break,
                    _ => {}
                }
            }
            if i >= 20 {
                out.push(t.elapsed());
            }
        }
        latency(out)
    }

    /// Reads until the process exits.
    async fn drain(&mut self) -> Throughput {
        let mut bytes = 0u64;
        let mut first = None;
        loop {
            match self.recv.expect::<PtyMsg>().await.unwrap() {
                PtyMsg::Output(o) => {
                    first.get_or_insert_with(Instant::now);
                    bytes += o.bytes.len() as u64;
                }
                PtyMsg::Exit(_) => break,
                _ => {}
            }
        }
        Throughput {
            bytes,
            elapsed: first.map(|f| f.elapsed()).unwrap_or_default(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The WebSocket bridge

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_attach(hub: &TestHub, workspace: &str, session: &str, offset: u64) -> Ws {
    use futures_util::StreamExt;
    // A fresh session ticket, the way the web UI opens a terminal.
    let url = hub
        .terminal_url(workspace, &format!("session={session}&offset={offset}"))
        .await
        .unwrap();
    let mut ws = tokio_tungstenite::connect_async(url).await.unwrap().0;
    match ws.next().await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
            assert!(t.contains("opened"), "{t}")
        }
        other => panic!("{other:?}"),
    }
    ws
}

async fn ws_echo(ws: &mut Ws, samples: usize) -> Latency {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut out = Vec::new();
    for i in 0..samples + 20 {
        let c = b'a' + (i % 26) as u8;
        let t = Instant::now();
        ws.send(Message::Binary(vec![c].into())).await.unwrap();
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(b) if b[0] == 0 && b[9..].contains(&c) => break,
                _ => {}
            }
        }
        if i >= 20 {
            out.push(t.elapsed());
        }
    }
    latency(out)
}

async fn ws_drain(ws: &mut Ws) -> Throughput {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut bytes = 0u64;
    let mut first = None;
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Binary(b) if b[0] == 0 => {
                first.get_or_insert_with(Instant::now);
                bytes += (b.len() - 9) as u64;
            }
            Message::Text(t) if t.contains("\"exit\"") => break,
            Message::Close(_) => break,
            _ => {}
        }
    }
    Throughput {
        bytes,
        elapsed: first.map(|f| f.elapsed()).unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------
// OpenSSH (the peer)

struct Sshd {
    child: std::process::Child,
    ssh: harness::sshd::Ssh,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sshd() -> Option<Sshd> {
    let ssh = harness::sshd::Ssh::prepare().ok()?;
    let child = ssh.start_local().ok()?;
    Some(Sshd { child, ssh })
}

fn ssh_command(sshd: &Sshd, remote: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(["-tt", "-q"])
        .args(sshd.ssh.client_options())
        .args([
            "-p",
            &sshd.ssh.port.to_string(),
            &format!("{}@127.0.0.1", harness::sshd::user()),
            remote,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn ssh_echo(sshd: &Sshd, samples: usize) -> Latency {
    let mut child = ssh_command(sshd, "cat").spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 4096];
    // Wait until the remote side is up.
    stdin.write_all(b"ready\n").await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready\r\nready") {
        let n = stdout.read(&mut buf).await.unwrap();
        seen.extend(&buf[..n]);
    }
    let mut out = Vec::new();
    for i in 0..samples + 20 {
        let c = b'a' + (i % 26) as u8;
        let t = Instant::now();
        stdin.write_all(&[c]).await.unwrap();
        loop {
            let n = stdout.read(&mut buf).await.unwrap();
            if buf[..n].contains(&c) {
                break;
            }
        }
        if i >= 20 {
            out.push(t.elapsed());
        }
    }
    let _ = child.kill().await;
    latency(out)
}

async fn ssh_bulk(sshd: &Sshd, remote: &str) -> Throughput {
    let mut child = ssh_command(sshd, remote).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    let mut first = None;
    loop {
        match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                bytes += n as u64;
            }
        }
    }
    let _ = child.wait().await;
    Throughput {
        bytes,
        elapsed: first.map(|f| f.elapsed()).unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------

fn main() {
    let args = parse_args();
    assert!(args.samples <= 4000, "the tty line buffer holds 4095 keys");
    link::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let hub = TestHub::start_with(HubOptions {
        heartbeat_interval: Duration::from_secs(2),
        heartbeat_timeout: Duration::from_secs(6),
        ..Default::default()
    })
    .await
    .unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    hub.wait_for(&id, Duration::from_secs(30), |w| !w["agent"].is_null())
        .await
        .unwrap();
    let conn = harness::raw_agent::client_connection(&hub).await.unwrap();
    let cas = harness::raw_agent::hub_cas(&hub).await;
    let direct = harness::direct::connect(&conn, &cas, &id).await.unwrap();
    let sshd = start_sshd();

    let file = tempfile::NamedTempFile::new().unwrap();
    {
        let mut f = std::fs::File::create(file.path()).unwrap();
        let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!@#$%^&*()-_=+[]{};:,.<>/\n";
        let chunk: Vec<u8> = line.iter().copied().cycle().take(1 << 20).collect();
        for _ in 0..args.bulk_mib {
            f.write_all(&chunk).unwrap();
        }
    }
    let file_path = file.path().display().to_string();
    let cat_file = ["cat", file_path.as_str()];
    let seq = ["seq", "1", "10000000"];
    println!(
        "terminal benchmark: {} echo samples per path, bulk file {} MiB",
        args.samples, args.bulk_mib
    );

    eprintln!("... echo: raw PTY");
    // Echo latency.
    let raw = tokio::task::spawn_blocking(move || raw_echo(args.samples))
        .await
        .unwrap();
    eprintln!("... echo: QUIC");
    let mut q = quic_open(&conn, &id, command(&["cat"])).await;
    let quic = q.echo(args.samples).await;
    eprintln!("... echo: QUIC, direct");
    let pty = StreamHeader::Pty(protocol::stream::PtyOpen {});
    let mut d = quic_open_with(&direct, &pty, command(&["cat"])).await;
    let quic_direct = d.echo(args.samples).await;
    eprintln!("... echo: WebSocket");
    // Each path types into a fresh `cat` (the line discipline echoes every key; no newline
    // is ever sent, so each key produces exactly one echoed byte).
    let q_ws = quic_open(&conn, &id, command(&["cat"])).await;
    let mut w = ws_attach(&hub, &id, &q_ws.session, 0).await;
    let ws_lat = ws_echo(&mut w, args.samples).await;
    drop(w);
    eprintln!("... echo: ssh");
    let ssh = match &sshd {
        Some(s) => Some(ssh_echo(s, args.samples).await),
        None => None,
    };

    eprintln!("... echo under flood");
    // Echo while another session floods output to an attached client.
    let mut flood = quic_open(
        &conn,
        &id,
        command(&["sh", "-c", "while :; do cat /etc/services; done"]),
    )
    .await;
    let flood_reader = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(Some(msg)) = flood.recv.next::<PtyMsg>().await {
            if let PtyMsg::Output(o) = msg {
                n += o.bytes.len() as u64;
            }
        }
        n
    });
    let mut q_flood = quic_open(&conn, &id, command(&["cat"])).await;
    let flooded = q_flood.echo(args.samples).await;
    flood_reader.abort();

    eprintln!("... bulk");
    // Bulk throughput.
    let mut rows = Vec::new();
    for (name, cmd) in [("cat file", &cat_file[..]), ("seq 1e7", &seq[..])] {
        let owned: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let raw_t = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
            raw_bulk(&refs)
        })
        .await
        .unwrap();
        let quic_t = quic_open(&conn, &id, command(cmd)).await.drain().await;
        // WebSocket: the session is created paused, attached at offset 0, then runs.
        let mut starter = quic_open(
            &conn,
            &id,
            command(&["sh", "-c", &format!("sleep 0.5; {}", cmd.join(" "))]),
        )
        .await;
        let mut w = ws_attach(&hub, &id, &starter.session, 0).await;
        let _ = starter.send.finish();
        let ws_t = ws_drain(&mut w).await;
        let ssh_t = match &sshd {
            Some(s) => Some(ssh_bulk(s, &cmd.join(" ")).await),
            None => None,
        };
        rows.push((name, raw_t, ssh_t, quic_t, ws_t));
    }

    eprintln!("... replay");
    // Re-attach and replay a full 4 MiB ring.
    let mut filler = quic_open(
        &conn,
        &id,
        command(&[
            "sh",
            "-c",
            "head -c 6000000 /dev/urandom | base64; echo FILL''ED; sleep 600",
        ]),
    )
    .await;
    let mut end = 0;
    let mut tail = Vec::new();
    while !String::from_utf8_lossy(&tail).contains("FILLED") {
        if let PtyMsg::Output(o) = filler.recv.expect::<PtyMsg>().await.unwrap() {
            end = o.offset + o.bytes.len() as u64;
            tail = o.bytes[o.bytes.len().saturating_sub(64)..].to_vec();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start_offset = end.saturating_sub(4 << 20) + 64 * 1024;
    let t = Instant::now();
    let mut replay = quic_open(
        &conn,
        &id,
        PtyOpenRequest {
            session: Some(filler.session.clone()),
            offset: Some(start_offset),
            cols: 80,
            rows: 24,
            ..Default::default()
        },
    )
    .await;
    let mut got = start_offset;
    while got < end {
        if let PtyMsg::Output(o) = replay.recv.expect::<PtyMsg>().await.unwrap() {
            got = o.offset + o.bytes.len() as u64;
        }
    }
    let replay_time = t.elapsed();
    let replayed = end - start_offset;

    println!();
    println!("| keystroke echo (p50 / p99) | value | vs raw PTY |");
    println!("|---|---|---|");
    println!("| raw local PTY | {} / {} | |", ms(raw.p50), ms(raw.p99));
    match &ssh {
        Some(s) => println!(
            "| ssh -tt localhost (OpenSSH) | {} / {} | +{} |",
            ms(s.p50),
            ms(s.p99),
            ms(s.p50.saturating_sub(raw.p50))
        ),
        None => println!("| ssh -tt localhost (OpenSSH) | not measured: sshd not installed | |"),
    }
    println!(
        "| QUIC via hub (wsh attach) | {} / {} | +{} |",
        ms(quic.p50),
        ms(quic.p99),
        ms(quic.p50.saturating_sub(raw.p50))
    );
    println!(
        "| QUIC direct to the agent (wsh attach, direct path) | {} / {} | +{} |",
        ms(quic_direct.p50),
        ms(quic_direct.p99),
        ms(quic_direct.p50.saturating_sub(raw.p50))
    );
    if let Some(s) = &ssh {
        let added = |l: &Latency| l.p50.saturating_sub(raw.p50).as_secs_f64();
        let ssh_added = added(s).max(1e-6);
        println!(
            "| added p50 / OpenSSH's added p50 | relayed {:.2}x, direct {:.2}x | target: relayed <= 1, direct <= 0.5 |",
            added(&quic) / ssh_added,
            added(&quic_direct) / ssh_added
        );
    }
    println!(
        "| WebSocket via hub (browser) | {} / {} | +{} |",
        ms(ws_lat.p50),
        ms(ws_lat.p99),
        ms(ws_lat.p50.saturating_sub(raw.p50))
    );
    println!(
        "| QUIC while another session floods | {} / {} | p99 target <= 5 ms |",
        ms(flooded.p50),
        ms(flooded.p99)
    );
    println!();
    println!(
        "| bulk output (MiB/s) | raw PTY | ssh -tt | QUIC via hub | WebSocket via hub | QUIC / raw |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, raw_t, ssh_t, quic_t, ws_t) in &rows {
        println!(
            "| {name} ({:.0} MiB) | {:.1} | {} | {:.1} | {:.1} | {:.0} % |",
            raw_t.bytes as f64 / (1 << 20) as f64,
            raw_t.mib_s(),
            ssh_t
                .as_ref()
                .map(|t| format!("{:.1}", t.mib_s()))
                .unwrap_or_else(|| "-".into()),
            quic_t.mib_s(),
            ws_t.mib_s(),
            100.0 * quic_t.mib_s() / raw_t.mib_s().max(1e-9)
        );
    }
    println!();
    println!(
        "| re-attach and replay {:.1} MiB from the ring | {} |",
        replayed as f64 / (1 << 20) as f64,
        ms(replay_time)
    );

    eprintln!("... to a prompt");
    // A new process to the first output of a remote command, each path; and how long the
    // direct path took to find after the relay was up.
    let runs = if args.samples >= 100 { 10 } else { 2 };
    let wsh = |path: &str| {
        let mut cmd = tokio::process::Command::from(hub.wsh().unwrap());
        cmd.args([
            "--path",
            path,
            "--show-path",
            "attach",
            &id,
            "--",
            "echo",
            "ready",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd
    };
    let relayed = to_prompt(runs, || wsh("relay")).await;
    let direct = to_prompt(runs, || wsh("direct")).await;
    let found: Vec<Duration> = direct
        .1
        .iter()
        .filter_map(|err| {
            let ms = err.split("found in ").nth(1)?.split(' ').next()?;
            Some(Duration::from_millis(ms.parse().ok()?))
        })
        .collect();
    println!();
    println!("| to a prompt (new process to first output, median of {runs}) | value |");
    println!("|---|---|");
    println!("| wsh attach, relayed | {} |", ms(relayed.0));
    println!("| wsh attach, direct | {} |", ms(direct.0));
    if let Some(s) = &sshd {
        let ssh = to_prompt(runs, || {
            let mut cmd = ssh_command(s, "echo ready");
            cmd.stderr(std::process::Stdio::piped());
            cmd
        })
        .await;
        println!("| ssh -tt (OpenSSH) | {} |", ms(ssh.0));
    }
    if !found.is_empty() {
        println!(
            "| relay up to direct path found (broker, punch, handshake), median | {} |",
            ms(latency(found).p50)
        );
    }
}

/// Runs `command` `runs` times; the median time to its first output, and each run's stderr.
async fn to_prompt(
    runs: usize,
    command: impl Fn() -> tokio::process::Command,
) -> (Duration, Vec<String>) {
    let mut times = Vec::new();
    let mut errs = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut child = command().kill_on_drop(true).spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut buf = [0u8; 256];
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("ready") {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "no output");
            seen.extend(&buf[..n]);
        }
        times.push(t.elapsed());
        let out = child.wait_with_output().await.unwrap();
        errs.push(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    (latency(times).p50, errs)
}
