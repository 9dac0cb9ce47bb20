//! Programs benchmark (exec and files): `wsh exec <ws> -- true` round trips against `ssh
//! host true` (a new connection each time, and through an OpenSSH ControlMaster
//! connection), commands per second from concurrent API clients against the same through
//! the ControlMaster, bulk output through the HTTP API (with the hub's and the agent's peak
//! RSS) against `ssh host head -c`, and a file up and down through the files API against
//! `scp` of the same file. Every peer is measured in the same run, on the same machine.
//!
//! `cargo bench -p workspace-hub --bench programs -- [--samples N] [--clients C]
//! [--commands K] [--output-mib M] [--file-mib F]`

use harness::{Reaped, TestHub};
use serde_json::json;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Args {
    samples: usize,
    clients: usize,
    commands: usize,
    output_mib: u64,
    file_mib: u64,
}

fn parse_args() -> Args {
    let a = harness::bench::BenchArgs::parse(&[
        "--samples",
        "--clients",
        "--commands",
        "--output-mib",
        "--file-mib",
    ]);
    Args {
        samples: a.num("--samples", 100, 3),
        clients: a.num("--clients", 16, 4),
        commands: a.num("--commands", 2000, 16),
        output_mib: a.num("--output-mib", 1024, 8),
        file_mib: a.num("--file-mib", 1024, 8),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Runs `make()` `n` times to completion; sorted durations.
fn round_trips(n: usize, make: impl Fn() -> Command) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let start = Instant::now();
            let out = make().stdin(Stdio::null()).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            start.elapsed()
        })
        .collect();
    times.sort();
    times
}

/// Samples a process's RSS every 20 ms until `stop`; the peak in KiB.
fn rss_peak(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(harness::rss_kib(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
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
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let agent_pid: u32 = std::fs::read_to_string(hub.workspace_dir(&id).join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ssh = harness::sshd::Ssh::prepare().expect("OpenSSH (./scripts/test installs it)");
    let _sshd = Reaped(ssh.start_local().unwrap());
    let target = format!("{}@127.0.0.1", harness::sshd::user());
    let ssh_cmd = |extra: &[String], command: &[&str]| {
        let mut cmd = Command::new("ssh");
        cmd.args(ssh.client_options())
            .args(["-p", &ssh.port.to_string()])
            .args(extra)
            .arg(&target)
            .args(command);
        cmd
    };
    let wsh = |command: &[&str]| {
        let mut cmd = hub.wsh().unwrap();
        cmd.args(["--path", "relay", "exec", &id, "-n", "--"])
            .args(command);
        cmd
    };
    // An OpenSSH master connection for the multiplexed rows.
    let control = ssh.dir.path().join("control");
    let mux = vec![
        "-o".to_owned(),
        format!("ControlPath={}", control.display()),
    ];
    let mut master_args = mux.clone();
    master_args.extend([
        "-M".into(),
        "-N".into(),
        "-o".into(),
        "ControlMaster=yes".into(),
    ]);
    let _master = Reaped(ssh_cmd(&master_args, &[]).spawn().unwrap());
    let start = Instant::now();
    while !control.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no ControlMaster"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("# Programs benchmark: exec and files\n");

    // Round trips: a new process each time, as a script would run them.
    let n = args.samples;
    let ours = round_trips(n, || wsh(&["true"]));
    let fresh = round_trips(n, || ssh_cmd(&[], &["true"]));
    let muxed = round_trips(n, || ssh_cmd(&mux, &["true"]));
    println!(
        "| `true`, round trip ({n} runs, a new client process each) | p50 ms | p99 ms | p50 / ours |"
    );
    println!("|---|---|---|---|");
    for (name, t) in [
        (
            "`wsh exec` (new QUIC connection to the hub, relayed)",
            &ours,
        ),
        ("`ssh host true` (new connection)", &fresh),
        ("`ssh host true` through a ControlMaster connection", &muxed),
    ] {
        println!(
            "| {name} | {} | {} | {:.2}x |",
            ms(pct(t, 0.5)),
            ms(pct(t, 0.99)),
            pct(t, 0.5).as_secs_f64() / pct(&ours, 0.5).as_secs_f64()
        );
    }

    // Throughput: concurrent API clients, against the ControlMaster with as many clients.
    let clients = args.clients;
    let per = args.commands.div_ceil(clients);
    let start = Instant::now();
    let tasks = (0..clients).map(|_| {
        let (http, url, token) = (
            hub.http.clone(),
            hub.url(&format!("/workspaces/{id}/exec")),
            hub.token.clone(),
        );
        tokio::spawn(async move {
            for _ in 0..per {
                let res = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"argv": ["true"]}))
                    .send()
                    .await
                    .unwrap();
                let body = res.text().await.unwrap();
                assert!(body.contains(r#""code":0"#), "{body}");
            }
        })
    });
    for t in futures_util::future::join_all(tasks).await {
        t.unwrap();
    }
    let api_rate = (per * clients) as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut muxed_true = ssh.client_options();
    muxed_true.extend(["-p".into(), ssh.port.to_string()]);
    muxed_true.extend(mux.iter().cloned());
    muxed_true.extend([target.clone(), "true".into()]);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let argv = muxed_true.clone();
            std::thread::spawn(move || {
                round_trips(per, || {
                    let mut cmd = Command::new("ssh");
                    cmd.args(&argv);
                    cmd
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ssh_rate = (per * clients) as f64 / start.elapsed().as_secs_f64();
    println!(
        "\n| `true`, {} runs from {clients} concurrent clients | commands/s | ours / peer |",
        per * clients
    );
    println!("|---|---|---|");
    println!("| `POST /workspaces/:id/exec` (HTTP keep-alive, NDJSON) | {api_rate:.0} | |");
    println!(
        "| `ssh host true` through a ControlMaster connection | {ssh_rate:.0} | {:.2}x |",
        api_rate / ssh_rate
    );

    // Bulk output, read as fast as it comes.
    let bytes = args.output_mib << 20;
    let stop = Arc::new(AtomicBool::new(false));
    let (hub_base, agent_base) = (
        harness::rss_kib(hub.listening.pid),
        harness::rss_kib(agent_pid),
    );
    let peaks = (
        rss_peak(hub.listening.pid, stop.clone()),
        rss_peak(agent_pid, stop.clone()),
    );
    let start = Instant::now();
    let mut res = hub
        .http
        .post(hub.url(&format!("/workspaces/{id}/exec")))
        .bearer_auth(&hub.token)
        .json(&json!({"argv": ["head", "-c", bytes.to_string(), "/dev/zero"]}))
        .send()
        .await
        .unwrap();
    let mut wire = 0u64;
    while let Some(chunk) = res.chunk().await.unwrap() {
        wire += chunk.len() as u64;
    }
    let api = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (hub_peak, agent_peak) = (peaks.0.join().unwrap(), peaks.1.join().unwrap());
    assert!(
        wire > bytes,
        "{wire} bytes of NDJSON for {bytes} bytes of output"
    );
    let start = Instant::now();
    let out = ssh_cmd(&mux, &["head", "-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.stdout.len() as u64, bytes);
    let via_ssh = start.elapsed();
    let mibs = |d: Duration| args.output_mib as f64 / d.as_secs_f64();
    println!(
        "\n| {} MiB of output | MiB/s | hub RSS peak (base) | agent RSS peak (base) |",
        args.output_mib
    );
    println!("|---|---|---|---|");
    println!(
        "| `POST /workspaces/:id/exec` (base64 in NDJSON) | {:.0} | {} MiB ({} MiB) | {} MiB ({} MiB) |",
        mibs(api),
        hub_peak / 1024,
        hub_base / 1024,
        agent_peak / 1024,
        agent_base / 1024
    );
    println!(
        "| `ssh host head -c` through a ControlMaster connection | {:.0} | | |",
        mibs(via_ssh)
    );

    // A file up and down: the files API against scp (through the ControlMaster).
    let mib = args.file_mib;
    let local = tempfile::tempdir().unwrap();
    let source = local.path().join("up.bin");
    let want = {
        use std::io::Write;
        let mut f = std::fs::File::create(&source).unwrap();
        let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for i in 0..mib {
            let chunk = harness::pseudo_bytes(1 << 20, i);
            hash.update(&chunk);
            f.write_all(&chunk).unwrap();
        }
        hash.finish().as_ref().to_vec()
    };
    let url = hub.url(&format!("/workspaces/{id}/files/bench/up.bin"));
    let start = Instant::now();
    let body = reqwest::Body::from(tokio::fs::File::open(&source).await.unwrap());
    let res = hub
        .http
        .put(&url)
        .bearer_auth(&hub.token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let api_up = start.elapsed();
    let start = Instant::now();
    let mut res = hub
        .http
        .get(&url)
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap();
    let mut got = 0u64;
    let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    while let Some(chunk) = res.chunk().await.unwrap() {
        got += chunk.len() as u64;
        hash.update(&chunk);
    }
    assert_eq!(got, mib << 20);
    assert_eq!(
        hash.finish().as_ref(),
        want,
        "the round trip changed the file"
    );
    let api_down = start.elapsed();
    let remote = hub.workspace_dir(&id).join("bench/scp.bin");
    let scp = |from: String, to: String| {
        let start = Instant::now();
        let out = Command::new("scp")
            .args(ssh.client_options())
            .args(["-P", &ssh.port.to_string()])
            .args(&mux)
            .args([from, to])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        start.elapsed()
    };
    let scp_up = scp(
        source.display().to_string(),
        format!("{target}:{}", remote.display()),
    );
    let scp_down = scp(
        format!("{target}:{}", remote.display()),
        local.path().join("down.bin").display().to_string(),
    );
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    println!("\n| a {mib} MiB file | up MiB/s | down MiB/s | up / scp | down / scp |");
    println!("|---|---|---|---|---|");
    println!(
        "| files API (`PUT` / `GET /workspaces/:id/files/...`) | {:.0} | {:.0} | {:.2}x | {:.2}x |",
        rate(api_up),
        rate(api_down),
        rate(api_up) / rate(scp_up),
        rate(api_down) / rate(scp_down)
    );
    println!(
        "| `scp` through a ControlMaster connection | {:.0} | {:.0} | | |",
        rate(scp_up),
        rate(scp_down)
    );
}
