//! Ports benchmark, in one run against one real hub and agent (process provider):
//! - port detection: `listen()` inside the workspace to the `opened` SSE event at a client;
//! - the agent's CPU at its poll rate while the machine holds N established connections,
//!   and one dump of listening sockets via netlink `sock_diag` against `/proc/net/tcp*`;
//! - preview proxy latency and requests/s against the same server hit directly and through
//!   OpenSSH `-L`;
//! - bulk throughput of `wsh forward` against direct TCP and OpenSSH `-L`.
//!
//! `cargo bench -p workspace-hub --bench ports -- [--samples 100] [--conns 10000]
//! [--requests 2000] [--clients 16] [--mib 512]` (needs `openssh-server` for the peer rows).

use futures_util::StreamExt;
use harness::{Reaped, TestHub, free_port};
use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Args {
    /// Run only these parts (`detect`, `cpu`, `http`, `bulk`); all when empty.
    only: Vec<String>,
    samples: usize,
    conns: usize,
    requests: usize,
    clients: usize,
    mib: u64,
}

fn parse_args() -> Args {
    let a = harness::bench::BenchArgs::parse(&[
        "--samples",
        "--conns",
        "--requests",
        "--clients",
        "--mib",
        "--only",
    ]);
    Args {
        only: a.all("--only"),
        samples: a.num("--samples", 100, 3),
        conns: a.num("--conns", 10_000, 100),
        requests: a.num("--requests", 2_000, 50),
        clients: a.num("--clients", 16, 2),
        mib: a.num("--mib", 512, 4),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn wsh(hub: &TestHub) -> Command {
    let mut cmd = Command::new(harness::binary("wsh").unwrap());
    cmd.env("WSH_HUB", hub.url("")).env("WSH_TOKEN", &hub.token);
    cmd
}

fn in_workspace(hub: &TestHub, id: &str, command: &[String], stdout: Stdio) -> Reaped {
    Reaped(
        wsh(hub)
            .args(["attach", id, "--"])
            .args(command)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn wait_listening(port: u16) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {port}");
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// `listen()` in the workspace to the SSE `opened` event, `samples` times.
async fn detection(hub: &TestHub, id: &str, samples: usize) -> Vec<Duration> {
    let res = hub
        .http
        .get(hub.url(&format!("/workspaces/{id}/events")))
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap();
    let seen: Arc<std::sync::Mutex<HashMap<u16, u128>>> = Arc::default();
    let sse_seen = seen.clone();
    let reader = tokio::spawn(async move {
        let mut body = res.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            let at = unix_ns();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                if !block.contains("event: port") {
                    continue;
                }
                let data = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap_or("{}");
                let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
                if v["detail"]["state"] == "opened"
                    && let Some(p) = v["detail"]["port"]["port"].as_u64()
                {
                    sse_seen.lock().unwrap().entry(p as u16).or_insert(at);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut churn = in_workspace(
        hub,
        id,
        &harness::test_server(&["churn", &samples.to_string(), "250"]),
        Stdio::piped(),
    );
    let stdout = churn.0.stdout.take().unwrap();
    let listened: HashMap<u16, u128> = tokio::task::spawn_blocking(move || {
        let mut out = HashMap::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut f = line.split_whitespace();
            if let (Some("listen"), Some(p), Some(t)) = (f.next(), f.next(), f.next())
                && let (Ok(p), Ok(t)) = (p.parse(), t.parse())
            {
                out.insert(p, t);
            }
        }
        out
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.abort();
    let seen = seen.lock().unwrap();
    let mut lat: Vec<Duration> = listened
        .iter()
        .filter_map(|(p, t)| {
            seen.get(p)
                .map(|s| Duration::from_nanos(s.saturating_sub(*t) as u64))
        })
        .collect();
    lat.sort();
    if lat.len() < listened.len() {
        println!(
            "note: {} of {} ports were not reported (closed before a poll saw them)",
            listened.len() - lat.len(),
            listened.len()
        );
    }
    lat
}

/// Opens `n` established loopback connections (both ends held by this process).
async fn hold_connections(n: usize) -> Vec<tokio::net::TcpStream> {
    let limit = (2 * n + 1024) as u64;
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while held.len() < n {
            match listener.accept().await {
                Ok((s, _)) => held.push(s),
                Err(_) => break,
            }
        }
        held
    });
    let mut held = Vec::with_capacity(2 * n);
    for _ in 0..n {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => held.push(s),
            Err(e) => {
                println!("note: stopped at {} connections: {e}", held.len());
                break;
            }
        }
    }
    held.extend(accept.await.unwrap());
    held
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // state ppid ... utime is field 14 overall, the 12th after the comm.
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn dump_time(dumper: &mut agent::ports::Dumper) -> (Duration, usize) {
    let runs = 20;
    let start = Instant::now();
    let mut found = 0;
    for _ in 0..runs {
        found = dumper.dump().map(|l| l.len()).unwrap_or(0);
    }
    (start.elapsed() / runs, found)
}

struct Http {
    p50: Duration,
    p99: Duration,
    rps: f64,
}

/// Sequential latency (one client), then requests/s with `clients` at once.
async fn http_load(url: &str, token: Option<&str>, requests: usize, clients: usize) -> Http {
    let client = reqwest::Client::new();
    let (url, token) = (Arc::new(url.to_owned()), Arc::new(token.map(str::to_owned)));
    let get = move |c: reqwest::Client| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let mut req = c.get(url.as_str());
            if let Some(t) = token.as_ref() {
                req = req.bearer_auth(t);
            }
            let res = req.send().await.unwrap();
            assert!(res.status().is_success(), "{url}: {}", res.status());
            res.bytes().await.unwrap();
        }
    };
    for _ in 0..50 {
        get(client.clone()).await;
    }
    let mut lat = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        get(client.clone()).await;
        lat.push(t.elapsed());
    }
    lat.sort();
    let start = Instant::now();
    let per = requests / clients.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (c, get) = (reqwest::Client::new(), get.clone());
        tasks.spawn(async move {
            for _ in 0..per {
                get(c.clone()).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Http {
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        rps: (per * clients) as f64 / start.elapsed().as_secs_f64(),
    }
}

/// `ssh -N -L local:127.0.0.1:remote` against a local sshd.
fn ssh_tunnel(ssh: &harness::sshd::Ssh, local: u16, remote: u16) -> Reaped {
    Reaped(
        Command::new("ssh")
            .args(ssh.client_options())
            .args([
                "-N",
                "-L",
                &format!("{local}:127.0.0.1:{remote}"),
                "-p",
                &ssh.port.to_string(),
                &format!("{}@127.0.0.1", harness::sshd::user()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn main() {
    let args = parse_args();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(args));
}

async fn run(args: Args) {
    link::install_crypto_provider();
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    println!("# Ports benchmark\n");

    let part = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    // Detection latency.
    if part("detect") {
        let lat = detection(&hub, &id, args.samples).await;
        println!(
            "| port detection, listen() -> SSE `opened` at a client ({} samples, poll {} ms) | p50 {} ms | p99 {} ms |",
            lat.len(),
            agent::ports::POLL_INTERVAL.as_millis(),
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99))
        );
    }
    // Agent CPU with many connections on the machine, and the cost of one dump.
    if part("cpu") {
        let held = hold_connections(args.conns).await;
        let agent_pid: u32 = std::fs::read_to_string(hub.workspace_dir(&id).join("agent.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let ticks_per_sec = 100.0; // USER_HZ on Linux
        let (t0, c0) = (Instant::now(), cpu_ticks(agent_pid));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let cpu = (cpu_ticks(agent_pid) - c0) as f64 / ticks_per_sec / t0.elapsed().as_secs_f64();
        let (netlink, n1) = dump_time(&mut agent::ports::Dumper::netlink().unwrap());
        let (procfs, n2) = dump_time(&mut agent::ports::Dumper::proc_net());
        println!(
            "| agent CPU while {} sockets are open ({} connections), polling | {:.2} % of a core | |",
            held.len(),
            held.len() / 2,
            cpu * 100.0
        );
        println!(
            "| one dump of listening sockets: sock_diag ({n1} found) vs /proc/net/tcp* ({n2} found) | {} ms | {} ms ({:.0}x) |",
            ms(netlink),
            ms(procfs),
            procfs.as_secs_f64() / netlink.as_secs_f64().max(1e-9)
        );
        drop(held);
    }

    // Preview proxy against direct and OpenSSH -L.
    let port = free_port();
    let _server = in_workspace(
        &hub,
        &id,
        &harness::test_server(&[&port.to_string()]),
        Stdio::null(),
    );
    wait_listening(port).await;
    let ssh = harness::sshd::Ssh::prepare().ok();
    let sshd = ssh.as_ref().and_then(|s| s.start_local().ok()).map(Reaped);
    let mut tunnels = Vec::new();
    if part("http") {
        let direct = http_load(
            &format!("http://127.0.0.1:{port}/"),
            None,
            args.requests,
            args.clients,
        )
        .await;
        let preview = http_load(
            &hub.url(&format!("/preview/{id}/{port}/")),
            Some(&hub.token),
            args.requests,
            args.clients,
        )
        .await;
        println!(
            "\n| HTTP GET / | p50 ms | p99 ms | added p50 | req/s ({} clients) |",
            args.clients
        );
        println!("|---|---|---|---|---|");
        println!(
            "| direct | {} | {} | | {:.0} |",
            ms(direct.p50),
            ms(direct.p99),
            direct.rps
        );
        println!(
            "| preview via hub | {} | {} | +{} | {:.0} |",
            ms(preview.p50),
            ms(preview.p99),
            ms(preview.p50.saturating_sub(direct.p50)),
            preview.rps
        );
        if let (Some(ssh), Some(_)) = (&ssh, &sshd) {
            let local = free_port();
            tunnels.push(ssh_tunnel(ssh, local, port));
            wait_listening(local).await;
            let via_ssh = http_load(
                &format!("http://127.0.0.1:{local}/"),
                None,
                args.requests,
                args.clients,
            )
            .await;
            println!(
                "| OpenSSH -L | {} | {} | +{} | {:.0} |",
                ms(via_ssh.p50),
                ms(via_ssh.p99),
                ms(via_ssh.p50.saturating_sub(direct.p50)),
                via_ssh.rps
            );
        } else {
            println!("| OpenSSH -L | not measured: sshd not installed | | | |");
        }
    }
    if !part("bulk") {
        return;
    }

    // Bulk TCP: wsh forward against direct and OpenSSH -L.
    let blast = free_port();
    let _blaster = in_workspace(
        &hub,
        &id,
        &harness::test_server(&["blast", &blast.to_string(), &args.mib.to_string()]),
        Stdio::null(),
    );
    wait_listening(blast).await;
    let direct = harness::bench::download(blast).await;
    // `wsh forward` through the hub, then in one hop to the agent.
    let mut forwarded = Vec::new();
    for path in ["relay", "direct"] {
        let local = free_port();
        let _forward = Reaped(
            wsh(&hub)
                .args(["--path", path, "forward", &id, &format!("{local}:{blast}")])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_listening(local).await;
        forwarded.push((path, harness::bench::download(local).await));
    }
    let via_ssh = match (&ssh, &sshd) {
        (Some(ssh), Some(_)) => {
            let local = free_port();
            tunnels.push(ssh_tunnel(ssh, local, blast));
            wait_listening(local).await;
            Some(harness::bench::download(local).await)
        }
        _ => None,
    };
    println!(
        "\n| bulk TCP, {} MiB | MiB/s | vs direct TCP | vs OpenSSH -L |",
        args.mib
    );
    println!("|---|---|---|---|");
    println!("| direct TCP | {direct:.0} | | |");
    for (path, mibs) in forwarded {
        let vs_ssh = via_ssh.map_or("-".into(), |s| format!("{:.2}x", mibs / s));
        println!(
            "| wsh forward, {path} | {mibs:.0} | {:.0} % | {vs_ssh} |",
            mibs / direct * 100.0
        );
    }
    match via_ssh {
        Some(s) => println!("| OpenSSH -L | {s:.0} | {:.0} % | |", s / direct * 100.0),
        None => println!("| OpenSSH -L | not measured | | |"),
    }
}
