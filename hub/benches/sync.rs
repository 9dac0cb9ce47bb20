//! File sync benchmark: `wsh sync` through a real hub and agent (process provider) against
//! `rsync -a` over `ssh` to a local sshd, measured in the same run on the same trees:
//! - cold sync of N files (about 10 KiB each, ~100 MiB for 10,000) into an empty folder;
//! - a re-scan when nothing changed;
//! - a 1-byte edit in a 64 MiB file (time and bytes on the wire);
//! - the latency from saving a file on one side to its content appearing on the other,
//!   with `wsh sync` running (both directions), in the same large tree.
//!
//! `cargo bench -p workspace-hub --bench sync -- [--files 10000] [--samples 100]`
//! (needs `openssh-server` and `rsync` for the peer rows).

use harness::TestHub;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    files: usize,
    samples: usize,
}

fn parse_args() -> Args {
    let a = harness::bench::BenchArgs::parse(&["--files", "--samples"]);
    Args {
        files: a.num("--files", 10_000, 50),
        samples: a.num("--samples", 100, 3),
    }
}

/// `files` files of 2-18 KiB in 100 folders of 10 subfolders' worth of nesting.
fn make_tree(dir: &Path, files: usize) -> u64 {
    let mut total = 0;
    for i in 0..files {
        let sub = dir.join(format!("d{:02}/e{}", i % 100, (i / 100) % 10));
        std::fs::create_dir_all(&sub).unwrap();
        let len = 2048 + (i * 7919) % 16384;
        std::fs::write(
            sub.join(format!("f{i}.txt")),
            harness::pseudo_bytes(len, i as u64 + 1),
        )
        .unwrap();
        total += len as u64;
    }
    total
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

struct Peer {
    ssh: harness::sshd::Ssh,
    _sshd: std::process::Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self._sshd.kill();
    }
}

impl Peer {
    /// `rsync -a --delete --stats` over ssh; returns the time and bytes sent + received.
    fn rsync(&self, from: &Path, to: &Path) -> (Duration, u64) {
        let ssh = format!(
            "ssh -p {} {}",
            self.ssh.port,
            self.ssh.client_options().join(" ")
        );
        let start = Instant::now();
        let out = Command::new("rsync")
            .args(["-a", "--delete", "--stats", "-e", &ssh])
            .arg(format!("{}/", from.display()))
            .arg(format!(
                "{}@127.0.0.1:{}/",
                harness::sshd::user(),
                to.display()
            ))
            .output()
            .unwrap();
        let took = start.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rsync: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = |label: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(label))
                .map(|v| v.trim().split(' ').next().unwrap_or("0").replace(',', ""))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (
            took,
            bytes("Total bytes sent:") + bytes("Total bytes received:"),
        )
    }
}

struct Wsh<'a> {
    hub: &'a TestHub,
    id: String,
    state: tempfile::TempDir,
}

impl Wsh<'_> {
    fn cmd(&self) -> Command {
        let mut cmd = self.hub.wsh().unwrap();
        cmd.env("XDG_STATE_HOME", self.state.path())
            .stdin(Stdio::null());
        cmd
    }

    /// `wsh sync --once`: the time and bytes up + down on the sync stream.
    fn once(&self, local: &Path, remote: &str) -> (Duration, u64, Value) {
        let start = Instant::now();
        let out = self
            .cmd()
            .args(["sync", "--once", "--json", "--yes", &self.id])
            .arg(local)
            .arg(remote)
            .output()
            .unwrap();
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let totals: Value = serde_json::from_slice(&out.stdout).unwrap();
        let wire = totals["wire_up"].as_u64().unwrap() + totals["wire_down"].as_u64().unwrap();
        (took, wire, totals)
    }
}

fn same_tree(a: &Path, b: &Path) -> bool {
    Command::new("diff")
        .args(["-r", "--no-dereference", "-q"])
        .arg(a)
        .arg(b)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn wait_content(path: &Path, want: &[u8], limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::fs::read(path).is_ok_and(|b| b == want) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = parse_args();
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let ws = hub.workspace_dir(&id);
    let wsh = Wsh {
        hub: &hub,
        id: id.clone(),
        state: tempfile::tempdir().unwrap(),
    };
    let scratch = tempfile::tempdir().unwrap();
    let local = scratch.path().join("tree");
    let total = make_tree(&local, args.files);
    let peer = harness::sshd::Ssh::prepare()
        .and_then(|ssh| Ok((ssh.start_local()?, ssh)))
        .ok()
        .map(|(child, ssh)| Peer { ssh, _sshd: child });
    let rsync_dest = scratch.path().join("rsync-dest");
    std::fs::create_dir(&rsync_dest).unwrap();
    // Give sshd a moment to listen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = Command::new("sync").status();

    println!(
        "\n| {} files, {:.1} MiB | wsh sync (s) | rsync -a over ssh (s) | wsh / rsync |",
        args.files,
        total as f64 / (1 << 20) as f64
    );
    println!("|---|---|---|---|");
    // Cold syncs into fresh folders, alternating, with dirty pages flushed before each:
    // the median of three.
    let flush = || {
        let _ = Command::new("sync").status();
    };
    let mut colds = Vec::new();
    let mut rcolds = Vec::new();
    let (mut wire, mut rwire) = (0, 0);
    for run in 0..3 {
        flush();
        let (t, w, _) = wsh.once(&local, &format!("cold{run}"));
        colds.push(t);
        wire = w;
        assert!(
            same_tree(&local, &ws.join(format!("cold{run}"))),
            "wsh sync left the trees different"
        );
        if let Some(p) = &peer {
            let dest = scratch.path().join(format!("rsync-cold{run}"));
            std::fs::create_dir(&dest).unwrap();
            flush();
            let (t, w) = p.rsync(&local, &dest);
            rcolds.push(t);
            rwire = w;
        }
    }
    colds.sort();
    rcolds.sort();
    let cold = colds[1];
    let rcold = rcolds.get(1).copied().unwrap_or_default();
    // The rest works on one synced copy each.
    wsh.once(&local, "tree");
    if let Some(p) = &peer {
        p.rsync(&local, &rsync_dest);
    }
    let ratio = |a: Duration, b: Duration| {
        if b.is_zero() {
            "n/a".to_owned()
        } else {
            format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
        }
    };
    println!(
        "| cold sync into an empty folder (median of 3) | {} ({:.1} MiB on the wire) | {} ({:.1} MiB) | {} |",
        secs(cold),
        wire as f64 / (1 << 20) as f64,
        secs(rcold),
        rwire as f64 / (1 << 20) as f64,
        ratio(cold, rcold)
    );
    let mut runs = Vec::new();
    let mut rruns = Vec::new();
    for _ in 0..3 {
        runs.push(wsh.once(&local, "tree").0);
        if let Some(p) = &peer {
            rruns.push(p.rsync(&local, &rsync_dest).0);
        }
    }
    runs.sort();
    rruns.sort();
    let rescan = runs[1];
    let rrescan = rruns.get(1).copied().unwrap_or_default();
    println!(
        "| re-scan, nothing changed (median of 3) | {} | {} | {} |",
        secs(rescan),
        secs(rrescan),
        ratio(rescan, rrescan)
    );

    // A 64 MiB file, synced by both, then one byte changed.
    let big = local.join("big.bin");
    let mut content = harness::pseudo_bytes(64 << 20, 99);
    std::fs::write(&big, &content).unwrap();
    wsh.once(&local, "tree");
    if let Some(p) = &peer {
        p.rsync(&local, &rsync_dest);
    }
    content[(40 << 20) + 17] ^= 0x5a;
    std::fs::write(&big, &content).unwrap();
    let (edit, edit_wire, totals) = wsh.once(&local, "tree");
    assert_eq!(totals["files_up"], 1, "{totals}");
    assert_eq!(std::fs::read(ws.join("tree/big.bin")).unwrap(), content);
    let (redit, redit_wire) = peer
        .as_ref()
        .map_or((Duration::ZERO, 0), |p| p.rsync(&local, &rsync_dest));
    println!(
        "| 1-byte edit in a 64 MiB file | {} ({:.0} KiB on the wire) | {} ({:.0} KiB) | {} |",
        secs(edit),
        edit_wire as f64 / 1024.0,
        secs(redit),
        redit_wire as f64 / 1024.0,
        ratio(edit, redit)
    );

    // Save -> appear, with `wsh sync` running on the same tree.
    let mut child = wsh
        .cmd()
        .args(["sync", &id])
        .arg(&local)
        .arg("tree")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let remote = ws.join("tree");
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut lost = 0;
    for i in 0..args.samples {
        let body = format!("sample {i} {:?}\n", Instant::now());
        let (from, to) = if i % 2 == 0 {
            (&local, &remote)
        } else {
            (&remote, &local)
        };
        let name = format!("d{:02}/latency-{i}.txt", i % 100);
        std::fs::write(from.join(&name), &body).unwrap();
        match wait_content(&to.join(&name), body.as_bytes(), Duration::from_secs(5)).await {
            Some(t) if i % 2 == 0 => up.push(t),
            Some(t) => down.push(t),
            None => lost += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    up.sort();
    down.sort();
    println!(
        "\n| save -> appears on the other side ({} files in the tree) | p50 ms | p99 ms | samples |",
        args.files
    );
    println!("|---|---|---|---|");
    for (label, v) in [("local -> workspace", &up), ("workspace -> local", &down)] {
        if !v.is_empty() {
            println!(
                "| {label} | {} | {} | {} |",
                ms(pct(v, 0.5)),
                ms(pct(v, 0.99)),
                v.len()
            );
        }
    }
    if lost > 0 {
        println!("| not seen within 5 s | {lost} | | |");
    }
}
