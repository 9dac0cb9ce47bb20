//! Replicas benchmark: what the hop through a peer replica costs. Two hub replicas share the
//! Firestore emulator and one identity; the agent holds its connection to A. Each figure is
//! measured through A (the replica holding the agent) and through B (which reaches it over
//! its peer connection to A), in the same run, alternating sample by sample: keystroke echo
//! in a browser terminal, a preview `GET` (which reads the workspace from the store, here
//! the emulator), and bulk `wsh forward` throughput (direct TCP as the floor).
//!
//! Then a fleet of N agents (real agent code, in this process, on a pool of shared UDP
//! endpoints: an agent that would take a new port takes the next endpoint) behind three
//! replicas and nginx: SIGKILL of one replica (its agents connected again on the
//! others: p50 / p99 from the kill, and the survivors' CPU per reconnect), then a rolling
//! restart of all three (SIGTERM, drain, start), against the same fleet reconnecting to a
//! single hub after its SIGKILL and restart in the same run.
//!
//! `cargo bench -p workspace-hub --bench replicas -- [--samples N] [--bulk-mib M] [--agents N]
//! [--endpoints E] [--fleet-only 1] [--heartbeat-ms H] [--keep-alive-ms K]
//! [--store firestore|sqlite]` (`--keep-alive-ms 0`: agents without QUIC keep-alives, as
//! before they had them)

use futures_util::{SinkExt, StreamExt};
use harness::replicas::{Cluster, SharedStore, generate_identity, replica_config};
use harness::{HubOptions, Reaped, TestHub, free_port};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Args {
    samples: usize,
    bulk_mib: usize,
    agents: usize,
    endpoints: usize,
    fleet_only: bool,
    /// The fleet's heartbeat interval (the timeout is three of them).
    heartbeat: Duration,
    /// The agents' QUIC keep-alive (`None`: heartbeats only).
    keep_alive: Option<Duration>,
    /// The replicas' shared store for the fleet: `firestore` (the emulator) or `sqlite`
    /// (one file the three processes share).
    store: String,
}

fn parse_args() -> Args {
    let a = harness::bench::BenchArgs::parse(&[
        "--samples",
        "--bulk-mib",
        "--agents",
        "--endpoints",
        "--fleet-only",
        "--heartbeat-ms",
        "--keep-alive-ms",
        "--store",
    ]);
    Args {
        samples: a.num("--samples", 2000, 20),
        bulk_mib: a.num("--bulk-mib", 512, 4),
        agents: a.num("--agents", 10_000, 12),
        endpoints: a.num("--endpoints", 256, 6),
        fleet_only: a.num("--fleet-only", 0u8, 0) != 0,
        heartbeat: Duration::from_millis(a.num("--heartbeat-ms", 2000, 2000)),
        keep_alive: a.keep_alive(),
        store: a.all("--store").pop().unwrap_or_else(|| "firestore".into()),
    }
}

/// p50 and p99 in ms.
fn p50_p99(mut samples: Vec<Duration>) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort();
    let at = |p: f64| {
        samples[((samples.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
    };
    (at(0.5), at(0.99))
}

/// A browser terminal running `cat`, opened through `hub`.
async fn cat_terminal(hub: &TestHub, id: &str) -> Ws {
    let url = hub.terminal_url(id, "").await.unwrap();
    let mut ws = tokio_tungstenite::connect_async(url).await.unwrap().0;
    ws.send(Message::Binary(b"exec cat\n".to_vec().into()))
        .await
        .unwrap();
    // Let the shell turn into cat (its echo of the command line comes first).
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), ws.next()).await {}
    ws
}

/// One keystroke to its echo.
async fn echo(ws: &mut Ws, c: u8) -> Duration {
    let t = Instant::now();
    ws.send(Message::Binary(vec![c].into())).await.unwrap();
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) if b[0] == 0 && b[9..].contains(&c) => return t.elapsed(),
            _ => {}
        }
    }
}

/// One preview `GET`.
async fn get(client: &reqwest::Client, url: &str, token: &str) -> Duration {
    let t = Instant::now();
    let res = client.get(url).bearer_auth(token).send().await.unwrap();
    assert!(res.status().is_success(), "{url}: {}", res.status());
    res.bytes().await.unwrap();
    t.elapsed()
}

/// `wsh forward local:port` through `hub`, ready once the local port answers.
async fn forward(hub: &TestHub, id: &str, port: u16) -> (Reaped, u16) {
    let local = free_port();
    let child = Reaped(
        hub.wsh()
            .unwrap()
            .args(["forward", id, &format!("{local}:{port}")])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", local))
            .await
            .is_ok()
        {
            return (child, local);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("wsh forward never listened");
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
    if !args.fleet_only {
        hop(&args).await;
    }
    fleet(&args).await;
}

/// The peer hop: each figure through the replica holding the agent and through the other.
async fn hop(args: &Args) {
    let store = SharedStore::firestore("bench-replicas").expect("Firestore emulator");
    let identity = tempfile::tempdir().unwrap();
    generate_identity(identity.path()).unwrap();
    // One provider folder for both (one machine), so either one's reconciler sees the agent.
    let workspaces = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for id in ["replica-a", "replica-b"] {
        let mut replica = TestHub::start_with(HubOptions {
            config: format!(
                "peer_addr = \"127.0.0.1:0\"\nworkspaces_dir = \"{}\"\n{}",
                workspaces.path().display(),
                // Housekeeping at its usual pace, not the tests' quick one.
                replica_config(&store, identity.path(), id).replace(
                    "reconcile_interval = \"200ms\"",
                    "reconcile_interval = \"60s\""
                )
            ),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(6),
            ..Default::default()
        })
        .await
        .unwrap();
        replica.workspaces = workspaces.path().to_owned();
        replicas.push(replica);
    }
    let (a, b) = (&replicas[0], &replicas[1]);
    // The process provider tells the agent A's address: A holds it.
    let id = a.ready_workspace().await.unwrap();

    // Each figure alternates between the two paths sample by sample, so a slow moment of
    // the machine (or of the store) falls on both alike.
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut terminals = [cat_terminal(a, &id).await, cat_terminal(b, &id).await];
    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..args.samples + 20 {
        for (t, out) in terminals.iter_mut().zip(samples.iter_mut()) {
            let took = echo(t, b'a' + (i % 26) as u8).await;
            if i >= 20 {
                out.push(took);
            }
        }
    }
    let [(a50, a99), (b50, b99)] = samples.map(p50_p99);
    rows.push((
        "echo, browser terminal via A (holds the agent)".into(),
        format!("{a50:.3} / {a99:.3} ms"),
        String::new(),
    ));
    rows.push((
        "echo, browser terminal via B (through A)".into(),
        format!("{b50:.3} / {b99:.3} ms"),
        format!("{:+.3} ms p50", b50 - a50),
    ));

    let port = free_port();
    let _server = a
        .run_in_workspace(&id, &harness::test_server(&[&port.to_string()]))
        .unwrap();
    let blast = free_port();
    let _blaster = a
        .run_in_workspace(
            &id,
            &harness::test_server(&["blast", &blast.to_string(), &args.bulk_mib.to_string()]),
        )
        .unwrap();
    for _ in 0..400 {
        let up = |p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
        if up(port) && up(blast) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let client = reqwest::Client::new();
    let urls = [a, b].map(|hub| hub.url(&format!("/preview/{id}/{port}/")));
    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..args.samples + 50 {
        for (url, out) in urls.iter().zip(samples.iter_mut()) {
            let took = get(&client, url, &a.token).await;
            if i >= 50 {
                out.push(took);
            }
        }
    }
    let [(a50, a99), (b50, b99)] = samples.map(p50_p99);
    rows.push((
        "preview GET / via A".into(),
        format!("{a50:.3} / {a99:.3} ms"),
        String::new(),
    ));
    rows.push((
        "preview GET / via B (through A)".into(),
        format!("{b50:.3} / {b99:.3} ms"),
        format!("{:+.3} ms p50", b50 - a50),
    ));

    let direct = harness::bench::download(blast).await;
    rows.push((
        format!("bulk {} MiB, direct TCP", args.bulk_mib),
        format!("{direct:.0} MiB/s"),
        String::new(),
    ));
    let mut through = [0.0; 2];
    for (i, (name, hub)) in [("A", a), ("B (through A)", b)].into_iter().enumerate() {
        let (_forward, local) = forward(hub, &id, blast).await;
        through[i] = harness::bench::download(local).await;
        rows.push((
            format!("bulk {} MiB, wsh forward via {name}", args.bulk_mib),
            format!("{:.0} MiB/s", through[i]),
            format!("{:.2}x direct", through[i] / direct),
        ));
    }
    let last = rows.len() - 1;
    rows[last].2 = format!(
        "{:.2}x direct, {:.2}x via A",
        through[1] / direct,
        through[1] / through[0]
    );

    println!("\nreplicas: the peer hop ({} samples)\n", args.samples);
    println!("| path | p50 / p99 or rate | vs |");
    println!("|---|---|---|");
    for (what, value, vs) in rows {
        println!("| {what} | {value} | {vs} |");
    }
    drop(replicas);
    drop(store);
}

/// One agent's connections, as its events tell them.
#[derive(Default)]
struct Link {
    up: bool,
    /// When it last connected.
    connected: Option<Instant>,
    /// When it last noticed that its connection was gone.
    lost: Option<Instant>,
    connects: usize,
}

/// In-process agents for the workspaces `created` (their configs), on `endpoints` shared
/// UDP endpoints (an agent that would take a new port, so that a load balancer pinning
/// flows by port picks again, takes the next one). At most 128 are starting at a time, as
/// a fleet of VMs does not boot in one instant.
#[allow(clippy::type_complexity)]
async fn launch(
    created: &[serde_json::Value],
    endpoints: usize,
    keep_alive: Option<Duration>,
) -> (
    Vec<Arc<Mutex<Link>>>,
    Vec<CancellationToken>,
    Vec<tempfile::TempDir>,
) {
    let pool = harness::bench::endpoint_pool(endpoints, 4 << 20);
    let starting = Arc::new(tokio::sync::Semaphore::new(128));
    let (mut links, mut stops, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
    for ws in created {
        let (mut config, dir) = harness::agent_config(ws).unwrap();
        config.keep_alive = keep_alive;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let agent = agent::Agent::with_pool(config, pool.clone()).with_events(tx);
        let link = Arc::new(Mutex::new(Link::default()));
        let watcher = link.clone();
        let mut permit = Some(starting.clone().acquire_owned().await.unwrap());
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let mut l = watcher.lock().unwrap();
                match event {
                    agent::AgentEvent::Connected => {
                        permit.take();
                        l.up = true;
                        l.connected = Some(Instant::now());
                        l.connects += 1;
                    }
                    agent::AgentEvent::Disconnected(_) => {
                        l.up = false;
                        l.lost = Some(Instant::now());
                    }
                    agent::AgentEvent::Enrolled => {}
                }
            }
        });
        let stop = CancellationToken::new();
        tokio::spawn(agent.run(stop.clone()));
        links.push(link);
        stops.push(stop);
        dirs.push(dir);
    }
    (links, stops, dirs)
}

fn up(links: &[Arc<Mutex<Link>>]) -> usize {
    links.iter().filter(|l| l.lock().unwrap().up).count()
}

/// Until the agents have noticed that their hub is gone (the first one is enough).
async fn until_noticed(links: &[Arc<Mutex<Link>>]) {
    let start = Instant::now();
    while up(links) == links.len() && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn until_all_up(links: &[Arc<Mutex<Link>>], what: &str) {
    let start = Instant::now();
    let mut said = Instant::now();
    while up(links) < links.len() {
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "{what}: {} of {} up after {:?}",
                up(links),
                links.len(),
                start.elapsed()
            );
            said = Instant::now();
        }
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "{what}: {} of {} up",
            up(links),
            links.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reconnect times (from `since`) of the agents that connected again after it.
fn reconnects(links: &[Arc<Mutex<Link>>], before: &[usize], since: Instant) -> Vec<Duration> {
    links
        .iter()
        .zip(before)
        .filter_map(|(l, &n)| {
            let l = l.lock().unwrap();
            (l.connects > n).then(|| l.connected.unwrap().saturating_duration_since(since))
        })
        .collect()
}

fn connects(links: &[Arc<Mutex<Link>>]) -> Vec<usize> {
    links.iter().map(|l| l.lock().unwrap().connects).collect()
}

/// Hub process CPU time (user + system), in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Creates `n` workspaces through `hub` (32 at a time), for owners of 100 each (real owners
/// hold tens: one owner with thousands would measure the quota check, which reads all of
/// an owner's workspaces on every create).
async fn create(hub: &TestHub, n: usize) -> Vec<serde_json::Value> {
    let mut clients = Vec::new();
    for owner in 0..n.div_ceil(100) {
        let mut client = hub.client();
        client.token = hub.mint_token(&format!("fleet-{owner}")).unwrap();
        clients.push(client);
    }
    let mut out = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in chunk {
            // Round robin over the owners, so concurrent creates are mostly other owners'.
            let client = clients[i % clients.len()].clone();
            tasks.spawn(async move {
                let (status, body) = client
                    .api("POST", "/workspaces", Some(serde_json::json!({})))
                    .await
                    .unwrap();
                assert_eq!(status, 201, "{body}");
                body
            });
        }
        while let Some(ws) = tasks.join_next().await {
            out.push(ws.unwrap());
        }
    }
    out
}

async fn fleet(args: &Args) {
    let (n, endpoints, heartbeat) = (args.agents, args.endpoints, args.heartbeat);
    let store = match args.store.as_str() {
        "sqlite" => SharedStore::sqlite().unwrap(),
        _ => SharedStore::firestore("bench-fleet").expect("Firestore emulator"),
    };
    let options = || HubOptions {
        provider: "manual".into(),
        heartbeat_interval: heartbeat,
        heartbeat_timeout: heartbeat * 3,
        enrollment_ttl: Some(Duration::from_secs(3600)),
        config: format!(
            "[quotas]\nmax_workspaces = {}\nmax_running = {}\n",
            n + 1,
            n + 1
        ),
        ..Default::default()
    };
    let mut rows: Vec<(String, String)> = Vec::new();

    // The peer: the same fleet on one hub (SQLite), SIGKILLed and started again.
    {
        let mut hub = TestHub::start_with(options()).await.unwrap();
        let created = create(&hub, n).await;
        let (links, _stops, _dirs) = launch(&created, endpoints, args.keep_alive).await;
        until_all_up(&links, "single hub").await;
        let before = connects(&links);
        hub.kill();
        hub.start_again().await.unwrap();
        let back = Instant::now();
        let cpu0 = cpu_secs(hub.listening.pid);
        until_noticed(&links).await;
        until_all_up(&links, "single hub restart").await;
        let cpu = cpu_secs(hub.listening.pid) - cpu0;
        let times = reconnects(&links, &before, back);
        let (p50, p99) = p50_p99(times.clone());
        rows.push((
            format!("one hub: SIGKILL and restart, {n} agents connected again (from listening)"),
            format!(
                "p50 {:.0} / p99 {:.0} ms; {:.0} µs hub CPU per reconnect",
                p50,
                p99,
                cpu * 1e6 / times.len().max(1) as f64
            ),
        ));
    }

    let mut c = Cluster::start_on(
        store,
        3,
        // Housekeeping at its usual pace, not the tests' quick one.
        "drain_timeout = \"30s\"\nreconcile_interval = \"60s\"",
        options(),
    )
    .await
    .unwrap();
    let created = create(c.any(), n).await;
    let (links, _stops, _dirs) = launch(&created, endpoints, args.keep_alive).await;
    until_all_up(&links, "three replicas").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGKILL one replica, the one holding the most agents (the balancer may have given
    // another none): its agents notice (heartbeat timeout) and land on the others.
    let mut held = vec![0usize; c.replicas.len()];
    for ws in &created {
        if let Some(i) = c.holder(ws["id"].as_str().unwrap_or_default()) {
            held[i] += 1;
        }
    }
    let victim = (0..held.len()).max_by_key(|&i| held[i]).unwrap_or(0);
    let before = connects(&links);
    let survivors: Vec<u32> = (0..c.replicas.len())
        .filter(|&i| i != victim)
        .map(|i| c.replicas[i].listening.pid)
        .collect();
    let cpu0: f64 = survivors.iter().map(|&p| cpu_secs(p)).sum();
    c.replicas[victim].kill();
    let killed = Instant::now();
    // Agents notice within the heartbeat timeout, each on its own clock: done once all are
    // up and no new reconnect has come for longer than that.
    let mut last = (0, Instant::now());
    loop {
        let moved = reconnects(&links, &before, killed).len();
        if moved != last.0 {
            last = (moved, Instant::now());
        }
        if moved > 0 && up(&links) == n && last.1.elapsed() > Duration::from_secs(8) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(300),
            "agents never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = survivors.iter().map(|&p| cpu_secs(p)).sum::<f64>() - cpu0;
    let moved = reconnects(&links, &before, killed);
    let (p50, p99) = p50_p99(moved.clone());
    // Where the time goes: until the agent noticed, then until it was connected again.
    let (noticed, again): (Vec<Duration>, Vec<Duration>) = links
        .iter()
        .zip(&before)
        .filter_map(|(l, &n)| {
            let l = l.lock().unwrap();
            let (lost, connected) = (l.lost?, l.connected?);
            (l.connects > n && lost >= killed)
                .then(|| (lost - killed, connected.saturating_duration_since(lost)))
        })
        .unzip();
    let ((n50, n99), (a50, a99)) = (p50_p99(noticed), p50_p99(again));
    rows.push((
        format!(
            "3 replicas: SIGKILL one, its {} agents connected again on the others (from the kill)",
            moved.len()
        ),
        format!(
            "p50 {:.0} / p99 {:.0} ms (noticed p50 {:.0} / p99 {:.0} ms, then connected p50 {:.0} / p99 {:.0} ms); {:.0} µs survivors' CPU per reconnect",
            p50,
            p99,
            n50,
            n99,
            a50,
            a99,
            cpu * 1e6 / moved.len().max(1) as f64
        ),
    ));
    c.replicas[victim].start_again().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A rolling restart: each replica in turn drains (its agents move), exits and starts.
    let before = connects(&links);
    let rolling = Instant::now();
    let mut drains = Vec::new();
    for i in 0..c.replicas.len() {
        let t = Instant::now();
        c.replicas[i].terminate(Duration::from_secs(60)).unwrap();
        drains.push(t.elapsed());
        c.replicas[i].start_again().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    until_all_up(&links, "after the rolling restart").await;
    let moved = reconnects(&links, &before, rolling);
    rows.push((
        format!("3 replicas: rolling restart (SIGTERM, drain, start, 1 s apart), {n} agents"),
        format!(
            "all connected {:.1} s after it began; {} moves; drains {}",
            rolling.elapsed().as_secs_f64(),
            moved.len(),
            drains
                .iter()
                .map(|d| format!("{:.2} s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));

    println!(
        "\nreplicas: a fleet of {n} agents on {endpoints} endpoints, heartbeats every {:?}, agents' keep-alive {:?}, replicas on {}\n",
        heartbeat, args.keep_alive, args.store
    );
    println!("| figure | value |");
    println!("|---|---|");
    for (what, value) in rows {
        println!("| {what} | {value} |");
    }
}
