//! Agent-update benchmark: N process workspaces whose agents (real processes) run an older
//! version; the hub restarts offering its signed agent, and every agent takes it in place.
//!
//! `cargo bench -p workspace-hub --bench updates -- [--agents N] [--terminals T]`
//!
//! Prints: the time from the new hub listening to every agent reporting the new version
//! (and p50 / p99 per agent), against the peer measured in the same run: the same fleet
//! reconnecting to a restarted hub with nothing to offer; the binary's size and the bytes
//! the hub sent; hub CPU during the update; and whether the terminal sessions opened
//! before it (one in each of the first T workspaces) all still answer. The agent binary is
//! the static release build when it exists (the one images carry), else the debug build.

use harness::{HubOptions, TestHub, binary, stamp_agent};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TICKS_PER_SEC: f64 = 100.0;

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().max(1) as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The agent to measure: the static release build if present.
fn agent_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let static_agent = root.join("target/x86_64-unknown-linux-musl/agent/workspace-agent");
    if static_agent.exists() {
        static_agent
    } else {
        binary("workspace-agent").unwrap()
    }
}

/// Polls the workspace list until every id in `ids` shows an agent of `version`; returns
/// when each first did, measured from `since`.
async fn until_version(
    hub: &TestHub,
    ids: &[String],
    version: &str,
    since: Instant,
) -> HashMap<String, Duration> {
    let mut seen = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while seen.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} agents reached {version}",
            seen.len(),
            ids.len()
        );
        let (_, list) = hub.api("GET", "/workspaces", None).await.unwrap();
        for w in list.as_array().into_iter().flatten() {
            if w["agent"]["agent_version"] == version
                && let Some(id) = w["id"].as_str()
            {
                seen.entry(id.to_owned()).or_insert_with(|| since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

fn main() {
    let a = harness::bench::BenchArgs::parse(&["--agents", "--terminals"]);
    let n: usize = a.num("--agents", 100, 3);
    let terminals: usize = a.num("--terminals", 10, 2).min(n);
    link::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench(n, terminals));
}

async fn bench(n: usize, terminals: usize) {
    let kit = tempfile::Builder::new()
        .prefix("wsh-update-bench-")
        .tempdir()
        .unwrap();
    let dir = kit.path();
    harness::update_keygen(dir).unwrap();
    let agent = agent_binary();
    let new_version = harness::agent_version_of(&agent).unwrap();
    let old_version = format!("{new_version}-old.1");
    stamp_agent(&agent, &dir.join("agent-old"), &old_version).unwrap();
    let new = dir.join("workspace-agent");
    std::fs::copy(&agent, &new).unwrap();
    harness::update_sign(&dir.join("update-key"), &new_version, &new, &[]).unwrap();
    let size = std::fs::metadata(&new).unwrap().len();
    println!(
        "agent-update benchmark: {n} process workspaces, {} ({:.1} MiB), machine: {} cores",
        agent.display(),
        size as f64 / (1 << 20) as f64,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );

    let config = |update: Option<&Path>| {
        let mut c = format!(
            "agent_binary = {:?}\nagent_update_keys = {:?}\n[quotas]\nmax_workspaces = {}\nmax_running = {}\n",
            dir.join("agent-old").display().to_string(),
            dir.join("update-key.pub").display().to_string(),
            n + 1,
            n + 1
        );
        if let Some(u) = update {
            c.push_str(&format!(
                "[agent_update]\nbinary = {:?}\n",
                u.display().to_string()
            ));
        }
        c
    };
    let mut hub = TestHub::start_with(HubOptions {
        heartbeat_interval: Duration::from_secs(2),
        heartbeat_timeout: Duration::from_secs(6),
        config: config(None),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..n {
        let ws = hub.create_workspace().await.unwrap();
        ids.push(ws["id"].as_str().unwrap().to_owned());
    }
    let started = Instant::now();
    until_version(&hub, &ids, &old_version, started).await;
    let fleet_up = started.elapsed();
    for id in &ids[..terminals] {
        hub.terminal_with(id, "session=bench", "echo before-$((20+1))\r", "before-21")
            .await
            .unwrap();
    }

    // Peer: the fleet reconnecting to a restarted hub with nothing to offer.
    hub.start_again().await.unwrap();
    let back = Instant::now();
    let mut peer: Vec<Duration> = until_version(&hub, &ids, &old_version, back)
        .await
        .into_values()
        .collect();
    peer.sort();
    let peer_all = peer.last().copied().unwrap_or_default();

    // The update: the hub comes back offering its agent.
    hub.options.config = config(Some(&new));
    hub.start_again().await.unwrap();
    let offered = Instant::now();
    let cpu0 = cpu_ticks(hub.listening.pid);
    let mut took: Vec<Duration> = until_version(&hub, &ids, &new_version, offered)
        .await
        .into_values()
        .collect();
    let all = offered.elapsed();
    let hub_cpu = (cpu_ticks(hub.listening.pid) - cpu0) as f64 / TICKS_PER_SEC;
    took.sort();
    let mut kept = 0;
    for id in &ids[..terminals] {
        // An offset attaches to a session that exists, or fails.
        let seen = hub
            .terminal_with(
                id,
                "session=bench&offset=0",
                "echo after-$((20+2))\r",
                "after-22",
            )
            .await
            .unwrap();
        kept += usize::from(seen.contains("before-21"));
    }
    let log = hub.log();
    let sent = log.matches("agent update sent").count();

    println!();
    println!("| figure | value | peer (same run) |");
    println!("|---|---|---|");
    println!(
        "| fleet of {n} process agents up, after the last create | {:.1} s | |",
        fleet_up.as_secs_f64()
    );
    println!(
        "| new hub to all {n} agents updated | {:.2} s | all {n} reconnected, nothing offered: {:.2} s (x{:.1}) |",
        all.as_secs_f64(),
        peer_all.as_secs_f64(),
        all.as_secs_f64() / peer_all.as_secs_f64().max(1e-9)
    );
    println!(
        "| per agent p50 / p99 | {} / {} | {} / {} |",
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
        ms(percentile(&peer, 0.5)),
        ms(percentile(&peer, 0.99))
    );
    println!(
        "| binaries sent | {sent} × {:.1} MiB = {:.0} MiB | |",
        size as f64 / (1 << 20) as f64,
        (sent as u64 * size) as f64 / (1 << 20) as f64
    );
    println!("| hub CPU during the update | {hub_cpu:.1} s | |");
    println!("| terminal sessions kept | {kept} / {terminals} | |");
    assert_eq!(sent, n, "one binary per agent");
}
