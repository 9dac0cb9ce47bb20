//! Direct connections between a client and an agent, each behind a NAT of its own
//! (network namespaces and nftables, `harness::netns`), with the hub on the public segment
//! between them.

use harness::netns::{Lab, Nat, Site};
use harness::{HubOptions, Reaped, TestHub, numbered_lines};
use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `wsh` process on the client's host, its output collected as it comes.
struct Wsh {
    _child: Reaped,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

impl Wsh {
    fn start(lab: &Lab, hub: &TestHub, args: &[&str]) -> Self {
        let mut wsh = lab.command(Site::Client, harness::binary("wsh").unwrap());
        wsh.args(args)
            .env("WSH_HUB", hub.url(""))
            .env("WSH_TOKEN", &hub.token);
        Self::spawn(wsh)
    }

    /// Any program, its output collected the same way.
    fn spawn(mut command: std::process::Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            _child: Reaped(child),
            stdout,
            stderr,
        }
    }

    /// Waits until stderr says `what` at least `times` times.
    async fn wait_stderr(&self, what: &str, times: usize, within: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.stderr.lock().unwrap().clone();
            if text.matches(what).count() >= times {
                return text;
            }
            assert!(
                start.elapsed() < within,
                "no {what:?} (x{times}) within {within:?}; stderr:\n{text}\nstdout tail:\n{}",
                tail(&self.stdout.lock().unwrap())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn lines(&self) -> Vec<u32> {
        numbered_lines(&self.stdout.lock().unwrap(), "line-")
    }

    /// Waits until stdout says `what`.
    async fn wait_stdout(&self, what: &str, within: Duration) {
        let start = Instant::now();
        while !self.stdout.lock().unwrap().contains(what) {
            assert!(
                start.elapsed() < within,
                "no {what:?} within {within:?}; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many lines of stdout start with `prefix`.
    fn count(&self, prefix: &str) -> usize {
        let out = self.stdout.lock().unwrap();
        out.lines().filter(|l| l.starts_with(prefix)).count()
    }

    /// Waits until more than `than` lines of stdout start with `prefix`; returns the count.
    async fn wait_more(&self, prefix: &str, than: usize, within: Duration) -> usize {
        let start = Instant::now();
        loop {
            let n = self.count(prefix);
            if n > than {
                return n;
            }
            assert!(
                start.elapsed() < within,
                "no more than {than} {prefix:?} lines within {within:?}; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An echo server on 127.0.0.1:`port` (Python, one thread per connection).
const ECHO_SERVER: &str = "import socket,sys,threading\n\
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
s.bind(('127.0.0.1',int(sys.argv[1]))); s.listen()\n\
def echo(c):\n\
\twhile True:\n\
\t\td=c.recv(65536)\n\
\t\tif not d: break\n\
\t\tc.sendall(d)\n\
\tc.close()\n\
while True:\n\
\tc,_=s.accept(); threading.Thread(target=echo,args=(c,),daemon=True).start()\n";

/// One TCP connection to 127.0.0.1:`port` held open until the file `stop` exists: every
/// 50 ms a numbered line (every 10th padded to 100 kB) goes out and must come back whole;
/// prints `echo-N` for each, then `closed` once a half-close came back as EOF.
const ECHO_CLIENT: &str = "import os,socket,sys,time\n\
port,stop=int(sys.argv[1]),sys.argv[2]\n\
for i in range(100):\n\
\ttry: c=socket.create_connection(('127.0.0.1',port),timeout=60); break\n\
\texcept ConnectionRefusedError: time.sleep(0.2)\n\
c.settimeout(60); f=c.makefile('rb'); n=0\n\
while not os.path.exists(stop):\n\
\tn+=1; line=b'%d %s\\n'%(n,b'x'*(100000 if n%10==0 else 10))\n\
\tc.sendall(line); got=f.readline()\n\
\tassert got==line,(n,len(got))\n\
\tprint('echo-%d'%n,flush=True); time.sleep(0.05)\n\
c.shutdown(socket.SHUT_WR); assert f.read()==b''\n\
print('closed',flush=True)\n";

fn tail(s: &str) -> String {
    s.chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// Runs a program on the client's host to completion.
fn on_client(lab: &Lab, program: &str, args: &[&str]) -> std::process::Output {
    lab.command(Site::Client, program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_session_goes_direct_through_two_nats_falls_back_to_the_relay_when_cut_and_returns() {
    let lab = Lab::new().unwrap();
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        host: Some(lab.hub_ip().into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let _agent = lab.start_agent(&ws, dir.path()).unwrap();
    hub.wait_for(&id, Duration::from_secs(30), |w| w["status"] == "READY")
        .await
        .unwrap();
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    // A terminal printing numbered lines, both NATs endpoint-independent: it goes direct,
    // to the agent's NAT, from the client's NAT (the agent logs where the client came from).
    let script = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo line-$i; sleep 0.01; done";
    let attach = Wsh::start(
        &lab,
        &hub,
        &["--show-path", "attach", &id, "--", "sh", "-c", script],
    );
    let direct_to = format!("path: direct to {}:", lab.public_ip(Site::Agent));
    attach
        .wait_stderr(&direct_to, 1, Duration::from_secs(20))
        .await;
    let client_nat = lab.public_ip(Site::Client).to_string();
    // The client can finish its handshake a moment before the agent logs it.
    let from_client_nat = || {
        agent_log()
            .lines()
            .any(|l| l.contains("direct client connected") && l.contains(&client_nat))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !from_client_nat() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        from_client_nat(),
        "the agent took the client's connection from the client's NAT:\n{}",
        agent_log()
    );

    // A forward to a server inside the workspace works direct.
    let server = lab
        .command(Site::Agent, "python3")
        .args(["-m", "http.server", "18080", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Reaped(server);
    let echo_server = lab
        .command(Site::Agent, "python3")
        .args(["-c", ECHO_SERVER, "18083"])
        .spawn()
        .unwrap();
    let _echo_server = Reaped(echo_server);
    let forward = Wsh::start(
        &lab,
        &hub,
        &["--show-path", "forward", &id, "18081:18080", "18082:18083"],
    );
    forward
        .wait_stderr(&direct_to, 1, Duration::from_secs(20))
        .await;
    // The server may not listen yet: refused, or (through the forward) closed unanswered.
    let fetch = || {
        let out = on_client(
            &lab,
            "python3",
            &[
                "-c",
                "import urllib.request,time\n\
                 for i in range(50):\n\
                 \ttry:\n\t\tprint(urllib.request.urlopen('http://127.0.0.1:18081/', timeout=30).status); break\n\
                 \texcept OSError:\n\t\tif i == 49: raise\n\t\ttime.sleep(0.2)",
            ],
        );
        (
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, err) = fetch();
    assert_eq!(status, "200", "{err}");
    // A TCP connection held open through the forward, across every move below.
    let stop = dir.path().join("stop-echo");
    let mut client = lab.command(Site::Client, "python3");
    client.args(["-c", ECHO_CLIENT, "18082", stop.to_str().unwrap()]);
    let echo = Wsh::spawn(client);
    let echoed = echo.wait_more("echo-", 5, Duration::from_secs(20)).await;

    // The direct path is cut (UDP between the two NATs dropped): both move to the relay;
    // a request made meanwhile is carried, late but whole.
    let before = attach.lines().len();
    lab.cut(true).unwrap();
    let (status, err) = fetch();
    assert_eq!(status, "200", "a forward during the cut: {err}");
    attach
        .wait_stderr(
            "path: relay through the hub (direct path lost",
            1,
            Duration::from_secs(20),
        )
        .await;
    forward
        .wait_stderr(
            "path: relay through the hub (direct path lost",
            1,
            Duration::from_secs(20),
        )
        .await;
    let on_relay = attach.lines().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while attach.lines().len() <= on_relay && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        attach.lines().len() > on_relay && on_relay > before,
        "output goes on through the relay"
    );
    // The held connection was picked up by the relay.
    let echo_on_relay = echo.count("echo-");
    let echoed = echo
        .wait_more(
            "echo-",
            echo_on_relay.max(echoed) + 5,
            Duration::from_secs(20),
        )
        .await;

    // The path comes back, and so does the session.
    lab.cut(false).unwrap();
    attach
        .wait_stderr(&direct_to, 2, Duration::from_secs(30))
        .await;
    let (status, err) = fetch();
    assert_eq!(status, "200", "{err}");
    // The held connection still echoes (new connections go direct; it stays where it is),
    // and ends cleanly: its half-close comes back as EOF.
    let echoed = echo
        .wait_more("echo-", echoed + 5, Duration::from_secs(20))
        .await;
    std::fs::write(&stop, "").unwrap();
    echo.wait_stdout("closed", Duration::from_secs(20)).await;
    let lost = forward.stderr.lock().unwrap().clone();
    assert!(
        !lost.contains(":18083: "),
        "no forwarded connection failed:\n{lost}"
    );
    assert!(echoed > 15, "{echoed}");
    assert!(
        agent_log().contains("forwarded connection resumed"),
        "the held connection moved to the relay:\n{}",
        agent_log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Not a byte lost or repeated across the moves.
    let lines = attach.lines();
    assert!(lines.len() > 200, "{}", lines.len());
    let expected: Vec<u32> = (1..=lines.len() as u32).collect();
    assert_eq!(lines, expected, "every line once, in order");
    drop(attach);
    drop(forward);

    // Both NATs symmetric (a new port for every destination): no direct path can be
    // punched, and the relay carries everything.
    lab.set_nat(Site::Agent, Nat::Symmetric).unwrap();
    lab.set_nat(Site::Client, Nat::Symmetric).unwrap();
    let relayed = Wsh::start(
        &lab,
        &hub,
        &[
            "--show-path",
            "attach",
            &id,
            "--",
            "sh",
            "-c",
            "sleep 5; echo line-1",
        ],
    );
    let stderr = relayed
        .wait_stderr("path: relay through the hub", 1, Duration::from_secs(20))
        .await;
    assert!(!stderr.contains("path: direct"), "{stderr}");
    let start = Instant::now();
    while relayed.lines() != vec![1] {
        assert!(start.elapsed() < Duration::from_secs(20), "relayed output");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
