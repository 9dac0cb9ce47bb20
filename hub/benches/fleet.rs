//! Fleet benchmark: N agents (real agent code, in this process) against one real hub
//! process, plus the footprint of the static agent binary.
//!
//! `cargo bench -p workspace-hub --bench fleet -- [--agents N] [--idle-secs S]
//! [--keep-alive-ms K]` (`--keep-alive-ms 0`: agents without QUIC keep-alives, heartbeats
//! only)
//!
//! Prints: enrollment time p50/p99, reconnect time after a hub restart p50/p99 (from the
//! moment the restarted hub is listening), hub RSS per connected agent, hub CPU while the
//! agents idle with heartbeats, and the static agent's size and idle RSS. The peer for the
//! reconnect figures is a lone agent reconnecting to an idle hub, measured in the same run.

use harness::{HubOptions, TestHub};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    agents: usize,
    idle_secs: u64,
    endpoints: usize,
    launch_concurrency: usize,
    /// Hub restarts under the lone agent (the peer figure is their median).
    lone_rounds: usize,
    /// The agents' QUIC keep-alive (`None`: heartbeats only).
    keep_alive: Option<Duration>,
}

fn parse_args() -> Args {
    let a = harness::bench::BenchArgs::parse(&[
        "--agents",
        "--idle-secs",
        "--endpoints",
        "--launch-concurrency",
        "--keep-alive-ms",
    ]);
    Args {
        agents: a.num("--agents", 1000, 25),
        idle_secs: a.num("--idle-secs", 10, 1),
        endpoints: a.num("--endpoints", 8, 2),
        launch_concurrency: a.num("--launch-concurrency", 128, 8),
        lone_rounds: if a.smoke() { 1 } else { 5 },
        keep_alive: a.keep_alive(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

const TICKS_PER_SEC: f64 = 100.0;

/// Per-agent timestamps, filled by a watcher task per agent.
#[derive(Default, Clone)]
struct Times {
    started: Option<Instant>,
    enrolled: Option<Instant>,
    connected: Vec<Instant>,
}

async fn create_workspaces(hub: &TestHub, n: usize) -> Vec<serde_json::Value> {
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let http = hub.http.clone();
        let url = hub.url("/workspaces");
        let token = hub.token.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let res = http
                .post(url)
                .bearer_auth(token)
                .json(&serde_json::json!({}))
                .send()
                .await
                .expect("create");
            assert_eq!(res.status(), 201);
            res.json::<serde_json::Value>().await.expect("json")
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Fleet {
    times: Vec<Arc<std::sync::Mutex<Times>>>,
    _agents: Vec<(tokio_util::sync::CancellationToken, tempfile::TempDir)>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (shutdown, _) in &self._agents {
            shutdown.cancel();
        }
    }
}

impl Fleet {
    fn connected_count(&self, since: usize) -> usize {
        self.times
            .iter()
            .filter(|t| t.lock().unwrap().connected.len() > since)
            .count()
    }
}

async fn launch_fleet(workspaces: &[serde_json::Value], args: &Args) -> Fleet {
    let pool = harness::bench::endpoint_pool(args.endpoints, 16 << 20);
    let sem = Arc::new(tokio::sync::Semaphore::new(args.launch_concurrency));
    let mut times = Vec::new();
    let mut agents = Vec::new();
    for ws in workspaces {
        let (mut config, dir) = harness::agent_config(ws).unwrap();
        config.keep_alive = args.keep_alive;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let agent = agent::Agent::with_pool(config, pool.clone()).with_events(tx);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let t = Arc::new(std::sync::Mutex::new(Times::default()));
        let permit = sem.clone().acquire_owned().await.unwrap();
        t.lock().unwrap().started = Some(Instant::now());
        let watcher = t.clone();
        tokio::spawn(async move {
            let mut permit = Some(permit);
            while let Some(event) = rx.recv().await {
                let now = Instant::now();
                let mut t = watcher.lock().unwrap();
                match event {
                    agent::AgentEvent::Enrolled => t.enrolled = Some(now),
                    agent::AgentEvent::Connected => {
                        t.connected.push(now);
                        permit.take();
                    }
                    agent::AgentEvent::Disconnected(_) => {}
                }
            }
        });
        tokio::spawn(agent.run(shutdown.clone()));
        times.push(t);
        agents.push((shutdown, dir));
    }
    Fleet {
        times,
        _agents: agents,
    }
}

/// The static agent binary, built if missing.
fn static_agent() -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target/x86_64-unknown-linux-musl/agent/workspace-agent");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--profile",
                "agent",
                "--target",
                "x86_64-unknown-linux-musl",
                "-p",
                "workspace-agent",
            ])
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
    }
    Some(path)
}

/// Size and idle RSS of the static agent, connected to a hub.
async fn agent_footprint(hub: &TestHub) -> Option<(u64, u64)> {
    let binary = static_agent()?;
    let size = std::fs::metadata(&binary).ok()?.len();
    let ws = hub.create_workspace().await.ok()?;
    let dir = tempfile::tempdir().ok()?;
    let mut config = ws["agent_config"].as_str()?.to_owned();
    config = config.replace(
        "state_dir = \"/var/lib/workspace-agent\"",
        &format!("state_dir = \"{}\"", dir.path().join("state").display()),
    );
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, config).ok()?;
    let mut child = std::process::Command::new(&binary)
        .arg("--config")
        .arg(&config_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let id = ws["id"].as_str()?.to_owned();
    hub.wait_for(&id, Duration::from_secs(20), |w| !w["agent"].is_null())
        .await
        .ok()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = harness::rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Some((size, rss))
}

fn main() {
    let args = parse_args();
    link::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let n = args.agents;
    println!(
        "fleet benchmark: {n} agents, {} client endpoints, machine: {} cores",
        args.endpoints,
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(0)
    );
    let mut hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        heartbeat_interval: Duration::from_secs(2),
        heartbeat_timeout: Duration::from_secs(6),
        enrollment_ttl: Some(Duration::from_secs(3600)),
        // One owner holds the whole fleet: the default quota (20) would stop the 21st.
        config: format!(
            "[quotas]\nmax_workspaces = {}\nmax_running = {}\n",
            n + 2,
            n + 2
        ),
        ..Default::default()
    })
    .await
    .unwrap();

    // Peer: one agent on an idle hub, enrolled, then reconnecting after a hub restart.
    let lone_ws = hub.create_workspace().await.unwrap();
    let lone = launch_fleet(std::slice::from_ref(&lone_ws), &args).await;
    wait_until("lone agent", Duration::from_secs(30), || {
        lone.connected_count(0) == 1
    })
    .await;
    let lone_enroll = {
        let t = lone.times[0].lock().unwrap();
        t.connected[0] - t.started.unwrap()
    };
    // Restarts at random points of its heartbeat cycle; the median is the peer figure.
    let mut lone_samples = Vec::new();
    for round in 1..=args.lone_rounds {
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..2000))).await;
        hub.kill();
        hub.start_again().await.unwrap();
        let lone_back = Instant::now();
        wait_until("lone agent reconnect", Duration::from_secs(60), || {
            lone.connected_count(round) == 1
        })
        .await;
        lone_samples.push(lone.times[0].lock().unwrap().connected[round] - lone_back);
    }
    lone_samples.sort();
    let lone_reconnect = lone_samples[lone_samples.len() / 2];
    drop(lone);
    tokio::time::sleep(Duration::from_secs(7)).await; // let the hub forget the lone agent

    let created = Instant::now();
    let workspaces = create_workspaces(&hub, n).await;
    let create_elapsed = created.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_rss = harness::rss_kib(hub.listening.pid);

    let launched = Instant::now();
    let fleet = launch_fleet(&workspaces, &args).await;
    wait_until("fleet connected", Duration::from_secs(600), || {
        fleet.connected_count(0) == n
    })
    .await;
    let fleet_elapsed = launched.elapsed();
    let mut enroll: Vec<Duration> = fleet
        .times
        .iter()
        .map(|t| {
            let t = t.lock().unwrap();
            t.enrolled.unwrap() - t.started.unwrap()
        })
        .collect();
    enroll.sort();

    // Idle with heartbeats.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu0 = cpu_ticks(hub.listening.pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_cpu =
        (cpu_ticks(hub.listening.pid) - cpu0) as f64 / TICKS_PER_SEC / t0.elapsed().as_secs_f64();
    let rss = harness::rss_kib(hub.listening.pid);
    let per_agent_kib = rss.saturating_sub(base_rss) as f64 / n as f64;
    let (_, list) = hub.api("GET", "/workspaces", None).await.unwrap();
    let connected_in_api = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| !w["agent"].is_null())
        .count();

    // Restart the hub under the whole fleet.
    hub.kill();
    hub.start_again().await.unwrap();
    let back = Instant::now();
    let storm_cpu0 = cpu_ticks(hub.listening.pid);
    let bench_cpu0 = cpu_ticks(std::process::id());
    wait_until("fleet reconnected", Duration::from_secs(600), || {
        fleet.connected_count(1) == n
    })
    .await;
    let all_back = back.elapsed();
    let storm_cpu = (cpu_ticks(hub.listening.pid) - storm_cpu0) as f64 / TICKS_PER_SEC;
    let bench_cpu = (cpu_ticks(std::process::id()) - bench_cpu0) as f64 / TICKS_PER_SEC;
    let mut reconnect: Vec<Duration> = fleet
        .times
        .iter()
        .map(|t| t.lock().unwrap().connected[1].saturating_duration_since(back))
        .collect();
    reconnect.sort();
    let rss_after = harness::rss_kib(hub.listening.pid);

    // An outage: the hub is down for 3 s before it comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    hub.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    hub.start_again().await.unwrap();
    let back_after_outage = Instant::now();
    wait_until(
        "fleet reconnected after outage",
        Duration::from_secs(600),
        || fleet.connected_count(2) == n,
    )
    .await;
    let all_back_after_outage = back_after_outage.elapsed();
    let mut outage: Vec<Duration> = fleet
        .times
        .iter()
        .map(|t| t.lock().unwrap().connected[2].saturating_duration_since(back_after_outage))
        .collect();
    outage.sort();

    let footprint = agent_footprint(&hub).await;

    println!();
    println!("| figure | value | target / peer |");
    println!("|---|---|---|");
    println!(
        "| workspaces created via API | {n} in {:.2} s ({:.0}/s) | |",
        create_elapsed.as_secs_f64(),
        n as f64 / create_elapsed.as_secs_f64()
    );
    println!(
        "| fleet enrolled and connected | {n} in {:.2} s ({:.0}/s) | |",
        fleet_elapsed.as_secs_f64(),
        n as f64 / fleet_elapsed.as_secs_f64()
    );
    println!(
        "| enrollment p50 / p99 ({} at a time) | {} / {} | lone agent enroll+connect: {} |",
        args.launch_concurrency,
        ms(percentile(&enroll, 0.5)),
        ms(percentile(&enroll, 0.99)),
        ms(lone_enroll)
    );
    println!("| agents connected (API view) | {connected_in_api} / {n} | |");
    println!(
        "| hub RSS idle, before agents | {:.1} MiB | |",
        base_rss as f64 / 1024.0
    );
    println!(
        "| hub RSS with {n} agents | {:.1} MiB | |",
        rss as f64 / 1024.0
    );
    println!("| hub RSS per connected agent | {per_agent_kib:.1} KiB | <= 100 KiB |");
    println!(
        "| hub CPU, {n} idle agents, 2 s heartbeats, keep-alive {:?} | {:.1} % of one core | |",
        args.keep_alive,
        idle_cpu * 100.0
    );
    println!(
        "| reconnect after hub restart p50 / p99 | {} / {} | < 1 s p50; lone agent (median of {}): {} (x{:.2}) |",
        ms(percentile(&reconnect, 0.5)),
        ms(percentile(&reconnect, 0.99)),
        args.lone_rounds,
        ms(lone_reconnect),
        percentile(&reconnect, 0.5).as_secs_f64() / lone_reconnect.as_secs_f64().max(1e-9)
    );
    println!(
        "| all {n} agents back after restart | {:.2} s | |",
        all_back.as_secs_f64()
    );
    println!(
        "| CPU during the reconnect storm: hub / simulated agents | {storm_cpu:.2} s / {bench_cpu:.2} s | {:.0} µs of hub CPU per reconnect |",
        storm_cpu * 1e6 / n as f64
    );
    println!(
        "| reconnect after a 3 s hub outage p50 / p99 (all back) | {} / {} ({:.2} s) | < 1 s p50 |",
        ms(percentile(&outage, 0.5)),
        ms(percentile(&outage, 0.99)),
        all_back_after_outage.as_secs_f64()
    );
    println!(
        "| hub RSS after the reconnect storm | {:.1} MiB | |",
        rss_after as f64 / 1024.0
    );
    match footprint {
        Some((size, rss)) => {
            println!(
                "| static agent binary (musl, stripped) | {:.2} MiB | <= 8 MB |",
                size as f64 / (1024.0 * 1024.0)
            );
            println!(
                "| static agent idle RSS (connected) | {:.1} MiB | <= 10 MiB |",
                rss as f64 / 1024.0
            );
        }
        None => println!("| static agent | not measured (musl build unavailable) | |"),
    }
}
