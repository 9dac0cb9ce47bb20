//! Hostile agents: a workspace user with root can speak as its agent, with the agent's own
//! certificate, and send valid reports as fast as the link allows. What that can make the
//! hub hold (memory, log lines) stays bounded per workspace and small, and the other
//! workspaces' events and API carry on. Raw agents (`harness::raw_agent`) flood every
//! report type while SSE subscribers watch the flooding workspace (a slow one and one that
//! does not read at all) and a bystander.

use harness::sse::Events;
use harness::{HubOptions, TestHub, raw_agent};
use link::send_msg;
use protocol::control::{
    Activity, CheckoutState, CheckoutStatus, ControlMsg, PortClosed, PortInfo, PortSource, Ports,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long each flood lasts.
const FLOOD: Duration = Duration::from_secs(6);

/// CPU time the process used, in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn port(port: u16, text: usize) -> PortInfo {
    PortInfo {
        port,
        addresses: vec!["127.0.0.1".into(); 16],
        loopback_only: true,
        pid: Some(1),
        process: "p".repeat(text),
        command: "c".repeat(text),
        http: Some(true),
    }
}

/// The report mix of the flood: ports opened (some with strings near the frame limit),
/// whole port lists of 6,500 entries, checkout states, activity and ports closed.
fn flood_message(i: u64) -> ControlMsg {
    let n = (i * 37 % 6000) as u16 + 1;
    match i % 8 {
        0 => ControlMsg::PortOpened(port(n, 30_000)),
        1 | 2 => ControlMsg::PortOpened(port(n, 40)),
        3 => ControlMsg::Ports(Ports {
            source: PortSource::SockDiag,
            ports: (1..=6500u16)
                .map(|p| PortInfo {
                    port: p,
                    addresses: Vec::new(),
                    loopback_only: false,
                    pid: None,
                    process: String::new(),
                    command: String::new(),
                    http: None,
                })
                .collect(),
        }),
        4 => ControlMsg::CheckoutStatus(CheckoutStatus {
            state: if i % 16 == 4 {
                CheckoutState::Cloning
            } else {
                CheckoutState::Failed
            },
            message: "m".repeat(20_000),
            path: "/p".repeat(10_000),
        }),
        5 => ControlMsg::Activity(Activity {
            attached_clients: 1,
            input_ago_ms: Some(0),
        }),
        _ => ControlMsg::PortClosed(PortClosed { port: n }),
    }
}

/// A raw agent for a new workspace, connected and past its hello.
struct RawAgent {
    id: String,
    _conn: quinn::Connection,
    send: quinn::SendStream,
    _recv: link::FramedRecv,
}

async fn raw_agent(hub: &TestHub) -> RawAgent {
    let (id, cert, key) = raw_agent::enrolled_identity(hub).await;
    let conn = raw_agent::connect_with_idle(hub, Some((cert, key)), Duration::from_secs(120))
        .await
        .unwrap();
    let (send, mut recv) = raw_agent::hello(&conn, protocol::PROTOCOL_VERSION).await;
    let accepted = recv
        .expect::<protocol::stream::StreamReply>()
        .await
        .unwrap();
    assert!(matches!(
        accepted,
        protocol::stream::StreamReply::Accepted(_)
    ));
    match recv.expect::<ControlMsg>().await.unwrap() {
        ControlMsg::Welcome(_) => {}
        other => panic!("expected welcome, got {other:?}"),
    }
    hub.wait_for(&id, Duration::from_secs(15), |w| !w["agent"].is_null())
        .await
        .unwrap();
    RawAgent {
        id,
        _conn: conn,
        send,
        _recv: recv,
    }
}

/// The flood's frames, encoded once (so the flood goes as fast as the link allows).
fn flood_frames() -> Arc<Vec<Vec<u8>>> {
    Arc::new(
        (0..1024)
            .map(|i| protocol::encode_frame(&flood_message(i)).unwrap())
            .collect(),
    )
}

/// Floods until `stop`, then hands the agent back.
fn flood(
    mut agent: RawAgent,
    frames: Arc<Vec<Vec<u8>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<RawAgent> {
    tokio::spawn(async move {
        for frame in frames.iter().cycle() {
            if stop.load(Ordering::Relaxed) || agent.send.write_all(frame).await.is_err() {
                break;
            }
        }
        agent
    })
}

/// Samples the hub's RSS every 50 ms until `stop`; returns the peak in KiB.
fn rss_sampler(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(harness::rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    })
}

/// What the bystander saw while the others flooded.
struct Bystander {
    events: Events,
    agent: RawAgent,
}

impl Bystander {
    async fn start(hub: &TestHub) -> Self {
        let agent = raw_agent(hub).await;
        let mut events = Events::open(hub, &agent.id).await;
        assert_eq!(events.next().await.0, "status");
        assert_eq!(events.next().await.0, "port");
        Self { events, agent }
    }

    /// Opens a port on the bystander's side: its subscriber sees exactly that, next, with
    /// no backlog lost or skipped; the API shows it. Returns how long the event took.
    async fn opens_a_port(&mut self, hub: &TestHub, n: u16) -> Duration {
        let t = Instant::now();
        send_msg(&mut self.agent.send, &ControlMsg::PortOpened(port(n, 8)))
            .await
            .unwrap();
        let (name, data) = self.events.next().await;
        let took = t.elapsed();
        assert_eq!(name, "port", "{data}");
        assert_eq!(data["detail"]["state"], "opened", "{data}");
        assert_eq!(data["detail"]["port"]["port"], n, "{data}");
        let (status, ports) = hub
            .api("GET", &format!("/workspaces/{}/ports", self.agent.id), None)
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(ports["ports"][n.to_string()]["port"], n, "{ports}");
        took
    }
}

/// Reads a flooding workspace's events slowly until its ports show `marker`; checks that a
/// subscriber that fell behind got a snapshot (status, then all ports) right after `lagged`.
/// Returns how often it fell behind.
async fn slow_reader_catches_up(mut events: Events, marker: u16) -> u64 {
    let mut lagged = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "never saw port {marker}");
        let (name, data) = events.next().await;
        match name.as_str() {
            "lagged" => {
                lagged += 1;
                assert_eq!(events.next().await.0, "status");
                let (name, data) = events.next().await;
                assert_eq!(name, "port");
                assert_eq!(data["detail"]["state"], "all", "{data}");
                if has_port(&data["detail"]["ports"], marker) {
                    return lagged;
                }
            }
            "port"
                if data["detail"]["port"]["port"] == marker
                    || has_port(&data["detail"]["ports"], marker) =>
            {
                return lagged;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn has_port(ports: &serde_json::Value, n: u16) -> bool {
    ports
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p["port"] == n))
}

/// Lines of the hub's log that contain `what` and name the workspace.
fn log_lines(hub: &TestHub, id: &str, what: &str) -> usize {
    hub.log()
        .lines()
        .filter(|l| l.contains(what) && l.contains(id))
        .count()
}

/// Floods from `flooders` workspaces at once, with subscribers on each and a bystander;
/// returns (peak RSS growth in MiB, the bystander's event latency during the flood).
async fn flood_round(flooders: usize) -> (f64, Duration) {
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        // Raw agents answer no pings: heartbeats must not end them within the test.
        heartbeat_interval: Duration::from_secs(20),
        heartbeat_timeout: Duration::from_secs(120),
        config: "[quotas]\nmax_workspaces = 50\nmax_running = 50\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pid = hub.listening.pid;
    let mut bystander = Bystander::start(&hub).await;
    let mut agents = Vec::new();
    let mut stalled = Vec::new();
    let mut slow = Vec::new();
    for _ in 0..flooders {
        let agent = raw_agent(&hub).await;
        // One subscriber that never reads, one that reads slowly.
        stalled.push(Events::open(&hub, &agent.id).await);
        slow.push(Events::open(&hub, &agent.id).await);
        agents.push(agent);
    }
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let frames = flood_frames();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = harness::rss_kib(pid);

    let started = Instant::now();
    let cpu0 = (cpu_ticks(pid), cpu_ticks(std::process::id()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = rss_sampler(pid, stop.clone());
    let floods: Vec<_> = agents
        .into_iter()
        .map(|a| flood(a, frames.clone(), stop.clone()))
        .collect();
    // Halfway through, the bystander's events and API work as ever.
    tokio::time::sleep(FLOOD / 2).await;
    let during = bystander.opens_a_port(&hub, 8080).await;
    let (status, list) = hub.api("GET", "/workspaces", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), flooders + 1);
    tokio::time::sleep(FLOOD / 2).await;
    stop.store(true, Ordering::Relaxed);
    let mut agents = Vec::new();
    for f in floods {
        agents.push(f.await.unwrap());
    }
    let peak = sampler.await.unwrap();
    let cpu = (
        (cpu_ticks(pid) - cpu0.0) as f64 / 100.0,
        (cpu_ticks(std::process::id()) - cpu0.1) as f64 / 100.0,
    );

    // Each flooder ends with a port list of its own (its table may be full, and a port
    // past the bound would be ignored): its slow subscriber gets there, through a snapshot
    // if it fell behind.
    let mut lagged = 0;
    for ((agent, slow), stalled) in agents.iter_mut().zip(slow).zip(stalled) {
        let last = ControlMsg::Ports(Ports {
            source: PortSource::SockDiag,
            ports: vec![port(4242, 8)],
        });
        send_msg(&mut agent.send, &last).await.unwrap();
        lagged += slow_reader_catches_up(slow, 4242).await;
        lagged += slow_reader_catches_up(stalled, 4242).await;
    }
    bystander.opens_a_port(&hub, 8081).await;
    let elapsed = started.elapsed();

    // The log: a checkout line per state (of three) and a "slowed down" line per interval
    // (10 s) per flooding workspace, not a line per report.
    let mut limited_workspaces = 0;
    for id in &ids {
        let checkout = log_lines(&hub, id, "checkout");
        assert!(checkout <= 3, "{checkout} checkout lines for {id}");
        let limited = log_lines(&hub, id, "over budget");
        assert!(
            limited <= 1 + elapsed.as_secs() as usize / 10,
            "{limited} rate-limit lines for {id} in {elapsed:?}"
        );
        limited_workspaces += usize::from(limited > 0);
    }
    // Each flooder sends far more than its budget; on two cores ten of them share the
    // sending side, so at least one (not necessarily each) is seen over it.
    assert!(limited_workspaces >= 1, "no workspace was slowed down");
    let growth = peak.saturating_sub(base) as f64 / 1024.0;
    println!(
        "{flooders} flooding workspace(s), {} s: hub RSS {:.1} MiB before, peak {:.1} MiB \
         (+{growth:.1} MiB); bystander event during the flood in {:.1} ms; slow subscribers \
         fell behind {} time(s); CPU during the flood: hub {:.1} s, test {:.1} s",
        FLOOD.as_secs(),
        base as f64 / 1024.0,
        peak as f64 / 1024.0,
        during.as_secs_f64() * 1000.0,
        lagged,
        cpu.0,
        cpu.1,
    );
    (growth, during)
}

/// The bound on what flooding workspaces may add to the hub's RSS: 8 MiB each (a full
/// port table of ~1 MiB, a feed of 32 small events, the QUIC receive window), plus 16 MiB
/// of allocator slack. Before the fix, one workspace took the hub from 18 to 776 MiB.
fn bound_mib(flooders: usize) -> f64 {
    16.0 + 8.0 * flooders as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flooding_agent_holds_little_of_the_hub_and_slows_only_itself() {
    let (growth, _) = flood_round(1).await;
    assert!(
        growth <= bound_mib(1),
        "hub RSS grew {growth:.1} MiB, bound {} MiB",
        bound_mib(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_flooding_agents_at_once_stay_within_their_bound() {
    let (growth, _) = flood_round(10).await;
    assert!(
        growth <= bound_mib(10),
        "hub RSS grew {growth:.1} MiB, bound {} MiB",
        bound_mib(10)
    );
}
