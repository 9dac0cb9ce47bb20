//! Dev-only test harness: starts a real `workspace-hub` process on `127.0.0.1:0` (dev mode,
//! its own temporary state folder), talks to its HTTP API, restarts or freezes it, and on
//! drop kills the hub and every agent process it started.
//!
//! Entry point: [`TestHub::start`]. Binaries are taken from the cargo target folder of the
//! running test; if one is missing it is built first.

pub mod bench;
pub mod direct;
pub mod firestore;
pub mod netns;
pub mod nginx;
pub mod oidc;
pub mod raw_agent;
pub mod replicas;
pub mod sse;
pub mod sshd;

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The path of a workspace binary (`workspace-hub`, `workspace-agent`, `wsh`), built if missing.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locate test executable")?;
    let mut dir = exe.parent().context("test executable has no folder")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps folder has no parent")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        // Each binary is named after its package, but for the harness's own.
        let package = match name {
            "test-server" | "test-issuer" => "workspace-harness",
            other => other,
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", name]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().context("run cargo build")?;
        if !status.success() || !path.exists() {
            bail!("could not build {name} at {}", path.display());
        }
    }
    Ok(path)
}

/// `workspace-hub agent-update keygen --out dir`: `update-key` and `update-key.pub`.
pub fn update_keygen(dir: &Path) -> Result<()> {
    run_hub_cli(
        Command::new(binary("workspace-hub")?)
            .args(["agent-update", "keygen", "--out"])
            .arg(dir),
    )
}

/// `workspace-hub agent-update sign`: `binary` signed as `version` with `key`, its
/// release file written beside it. `env`: for a binary whose `--version` needs it.
pub fn update_sign(
    key: &Path,
    version: &str,
    binary_path: &Path,
    env: &[(&str, &str)],
) -> Result<()> {
    run_hub_cli(
        Command::new(binary("workspace-hub")?)
            .envs(env.iter().copied())
            .args(["agent-update", "sign", "--key"])
            .arg(key)
            .args(["--agent-version", version])
            .arg(binary_path),
    )
}

fn run_hub_cli(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().context("run workspace-hub")?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The version the agent binary at `path` says it is (`--version`).
pub fn agent_version_of(path: &Path) -> Result<String> {
    let out = Command::new(path).arg("--version").output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .context("no version from --version")
}

/// A version newer than `version` (its patch number plus one), tagged `tag`.
pub fn later_version(version: &str, tag: &str) -> String {
    let mut parts = version.splitn(3, '.');
    let major = parts.next().unwrap_or("0");
    let minor = parts.next().unwrap_or("0");
    let patch: u32 = parts
        .next()
        .and_then(|p| p.split(['-', '+']).next()?.parse().ok())
        .unwrap_or(0);
    format!("{major}.{minor}.{}-{tag}", patch + 1)
}

/// A copy of the agent binary at `src` that reports `version` (the stamp an agent reads
/// from the end of its own binary): a second build of another version without compiling
/// again, for agent-update tests.
pub fn stamp_agent(src: &Path, dst: &Path, version: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut bytes = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
    bytes.extend_from_slice(format!("\nwsh-agent-version={version}\n").as_bytes());
    std::fs::write(dst, bytes).with_context(|| format!("write {}", dst.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A port free for TCP and UDP on 127.0.0.1, below the kernel's ephemeral range (32768 and
/// up here), so that no client socket (a test's thousand agents rebinding, say) can take it
/// while a hub that owns it restarts.
pub fn stable_port() -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free below the ephemeral range")
}

/// A free TCP port on 127.0.0.1 (bound and let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The command line of the test web server (`test-server`, built if missing) with `args`:
/// `[port]`, or a benchmark mode such as `["blast", port, mib]`.
pub fn test_server(args: &[&str]) -> Vec<String> {
    std::iter::once(
        binary("test-server")
            .expect("test-server binary")
            .display()
            .to_string(),
    )
    .chain(args.iter().map(|a| a.to_string()))
    .collect()
}

/// A child process, killed and reaped when dropped.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The numbers of the lines of terminal output that read `<prefix><n>`, in order (a
/// shell may put control sequences before a line, ending in `\r`).
pub fn numbered_lines(text: &str, prefix: &str) -> Vec<u32> {
    text.split("\r\n")
        .filter_map(|l| l.rsplit('\r').next())
        .filter_map(|l| l.strip_prefix(prefix).and_then(|n| n.parse().ok()))
        .collect()
}

/// Resident set size of a process, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Deterministic bytes that do not compress or repeat in blocks (xorshift), for file
/// contents in tests and benchmarks.
pub fn pseudo_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// How to start a hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// `process` (default) or `manual`.
    pub provider: String,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub enrollment_ttl: Option<Duration>,
    /// More hub settings, as lines of the hub's TOML config file.
    pub config: String,
    /// Extra environment variables for the hub process (fault injection).
    pub env: Vec<(String, String)>,
    /// The address the hub listens on (HTTP and QUIC); 127.0.0.1 by default.
    pub host: Option<std::net::IpAddr>,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            provider: "process".into(),
            // Short enough that a lost peer is noticed within a test's waits, long enough that
            // two busy cores shared by several tests never starve a link into a timeout (at
            // 1.5 s, CI saw agents dropped mid-test). Tests of the timeout itself set theirs.
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            enrollment_ttl: None,
            config: String::new(),
            env: Vec::new(),
            host: None,
        }
    }
}

/// The addresses a started hub wrote to `hub.json`.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Listening {
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub pid: u32,
}

/// A hub as its API clients see it: an address, the dev user's token, an HTTP client.
#[derive(Debug, Clone)]
pub struct HubClient {
    pub addr: SocketAddr,
    pub token: String,
    pub http: reqwest::Client,
}

impl HubClient {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Calls the API as the dev user.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        self.api_as(&self.token, method, path, body).await
    }

    /// Calls the API with a given bearer token.
    pub async fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// The terminal WebSocket URL of a workspace, with a fresh session ticket (the way the
    /// web UI opens it) and extra query parameters.
    pub async fn terminal_url(&self, id: &str, query: &str) -> Result<String> {
        let (status, body) = self
            .api(
                "POST",
                &format!("/workspaces/{id}/tickets"),
                Some(serde_json::json!({"purpose": "terminal"})),
            )
            .await?;
        if status != 201 {
            bail!("ticket: {status} {body}");
        }
        let ticket = body["ticket"].as_str().context("ticket")?;
        Ok(format!(
            "ws://{}/workspaces/{id}/terminal?ticket={ticket}&{query}",
            self.addr
        ))
    }
}

/// A running hub process and its state folder.
pub struct TestHub {
    _dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub options: HubOptions,
    child: Option<Child>,
    pub listening: Listening,
    /// The dev user's API token.
    pub token: String,
    pub http: reqwest::Client,
    /// Where the process provider keeps workspace folders (`state_dir/workspaces`, unless
    /// the config says otherwise).
    pub workspaces: PathBuf,
    /// Where clients reach this hub when a load balancer is in front of it; its own HTTP
    /// address otherwise.
    pub front: Option<SocketAddr>,
}

impl std::fmt::Debug for TestHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHub")
            .field("listening", &self.listening)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl TestHub {
    /// A hub with the process provider and short heartbeats.
    pub async fn start() -> Result<Self> {
        Self::start_with(HubOptions::default()).await
    }

    /// A hub with the manual provider: workspaces get no agent unless the test runs one.
    pub async fn start_manual() -> Result<Self> {
        Self::start_with(HubOptions {
            provider: "manual".into(),
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(options: HubOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wsh-hub-").tempdir()?;
        let state_dir = dir.path().join("state");
        let (child, listening) = spawn_hub(&state_dir, &options, None).await?;
        let token = std::fs::read_to_string(state_dir.join("dev-token"))
            .context("read dev token")?
            .trim()
            .to_owned();
        Ok(Self {
            _dir: dir,
            workspaces: state_dir.join("workspaces"),
            state_dir,
            options,
            child: Some(child),
            listening,
            token,
            http: reqwest::Client::new(),
            front: None,
        })
    }

    /// A URL of this hub (through its load balancer, if it has one).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.client_addr())
    }

    /// The HTTP address clients use: the load balancer's, or the hub's own.
    pub fn client_addr(&self) -> SocketAddr {
        self.front.unwrap_or(self.listening.http)
    }

    /// A `wsh` command pointed at this hub with its token.
    pub fn wsh(&self) -> Result<Command> {
        let mut cmd = Command::new(binary("wsh")?);
        cmd.env("WSH_HUB", self.url(""))
            .env("WSH_TOKEN", &self.token);
        Ok(cmd)
    }

    /// The one-time sign-in link (`/login/once?code=...`, path and query) the dev hub
    /// printed when it started.
    pub fn sign_in_link(&self) -> Option<String> {
        let out = std::fs::read_to_string(self.state_dir.join("hub.stdout")).ok()?;
        let at = out.find("/login/once?code=")?;
        Some(out[at..].split_whitespace().next()?.to_owned())
    }

    /// The hub's stderr log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("hub.log")).unwrap_or_default()
    }

    /// Whether the hub process is running (not killed by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the hub with SIGKILL (no graceful shutdown), leaving agents running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the hub with SIGTERM (a graceful shutdown, a drain for a replica) and waits
    /// up to `within` for it to exit.
    pub fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("the hub is not running")?;
        let pid = Pid::from_raw(child.id() as i32).context("hub pid")?;
        rustix::process::kill_process(pid, Signal::TERM).context("signal hub")?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the hub did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the hub again on the same state folder and the same ports.
    pub async fn start_again(&mut self) -> Result<()> {
        self.kill();
        let (child, listening) =
            spawn_hub(&self.state_dir, &self.options, Some(self.listening)).await?;
        self.child = Some(child);
        self.listening = listening;
        Ok(())
    }

    /// Freezes (`true`) or thaws (`false`) the hub process, like a network cut.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let pid = Pid::from_raw(self.listening.pid as i32).context("hub pid")?;
        let sig = if frozen { Signal::STOP } else { Signal::CONT };
        rustix::process::kill_process(pid, sig).context("signal hub")?;
        Ok(())
    }

    /// What a client needs to call this hub (through its load balancer, if it has one),
    /// owned: for tasks that outlive a borrow of the hub.
    pub fn client(&self) -> HubClient {
        HubClient {
            addr: self.client_addr(),
            token: self.token.clone(),
            http: self.http.clone(),
        }
    }

    /// Calls the API as the dev user.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        self.client().api(method, path, body).await
    }

    /// Calls the API with a given bearer token.
    pub async fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        self.client().api_as(token, method, path, body).await
    }

    /// The terminal WebSocket URL of a workspace, with a fresh session ticket (the way the
    /// web UI opens it) and extra query parameters.
    pub async fn terminal_url(&self, id: &str, query: &str) -> Result<String> {
        self.client().terminal_url(id, query).await
    }

    /// Types `input` into a new terminal session of the workspace (over the browser's
    /// WebSocket) and waits until its output shows `expect`.
    pub async fn terminal_echo(&self, id: &str, input: &str, expect: &str) -> Result<()> {
        self.terminal_with(id, "", input, expect).await.map(drop)
    }

    /// The same on the terminal `query` opens (a session by name, an offset); returns
    /// the output seen.
    pub async fn terminal_with(
        &self,
        id: &str,
        query: &str,
        input: &str,
        expect: &str,
    ) -> Result<String> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let url = self.terminal_url(id, query).await?;
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        ws.send(Message::Binary(input.as_bytes().to_vec().into()))
            .await?;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&seen).contains(expect) {
            let Ok(msg) = tokio::time::timeout_at(deadline, ws.next()).await else {
                bail!(
                    "no {expect:?} in the terminal: {}",
                    String::from_utf8_lossy(&seen)
                );
            };
            match msg {
                // Output and screen frames: a kind byte, an 8-byte offset, the bytes.
                Some(Ok(Message::Binary(b))) if b.len() > 9 => seen.extend_from_slice(&b[9..]),
                Some(Ok(_)) => {}
                other => bail!("terminal closed: {other:?}"),
            }
        }
        Ok(String::from_utf8_lossy(&seen).into_owned())
    }

    /// Waits until the workspace lists `port` (a server started in it), then fetches its
    /// preview as the dev user: status and body.
    pub async fn preview_when_listed(&self, id: &str, port: u16) -> Result<(u16, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, ports) = self
                .api("GET", &format!("/workspaces/{id}/ports"), None)
                .await?;
            if ports["ports"].get(port.to_string()).is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("port {port} never listed: {ports}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let res = self
            .http
            .get(self.url(&format!("/preview/{id}/{port}/")))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok((res.status().as_u16(), res.text().await?))
    }

    /// Creates a workspace and returns its JSON.
    pub async fn create_workspace(&self) -> Result<Value> {
        let (status, body) = self
            .api("POST", "/workspaces", Some(serde_json::json!({})))
            .await?;
        if status != 201 {
            bail!("create workspace: {status} {body}");
        }
        Ok(body)
    }

    /// Creates a workspace and waits until its agent is connected and it is READY.
    pub async fn ready_workspace(&self) -> Result<String> {
        let ws = self.create_workspace().await?;
        let id = ws["id"].as_str().context("workspace id")?.to_owned();
        self.wait_for(&id, Duration::from_secs(30), |w| {
            !w["agent"].is_null() && w["status"] == "READY"
        })
        .await?;
        Ok(id)
    }

    /// Polls `GET /workspaces/:id` until `pred` holds or `timeout` passes.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            let (status, body) = self.api("GET", &format!("/workspaces/{id}"), None).await?;
            if status == 200 && pred(&body) {
                return Ok(body);
            }
            if start.elapsed() > timeout {
                bail!(
                    "workspace {id} did not reach the expected state in {timeout:?}: {status} {body}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The folder of a process-provider workspace.
    pub fn workspace_dir(&self, id: &str) -> PathBuf {
        self.workspaces.join(id)
    }

    /// A process-provider agent's log.
    pub fn agent_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.workspace_dir(id).join("agent.log")).unwrap_or_default()
    }

    /// Runs `command` in a terminal session of the workspace (a child of its agent) with
    /// `wsh attach`; detaches when dropped (the command goes on in its session, like a
    /// program left running in a terminal).
    pub fn run_in_workspace(&self, id: &str, command: &[String]) -> Result<Reaped> {
        Ok(Reaped(
            self.wsh()?
                .args(["attach", id, "--"])
                .args(command)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start wsh attach")?,
        ))
    }

    /// Mints another user's API token through the hub's own CLI.
    pub fn mint_token(&self, owner: &str) -> Result<String> {
        let mut cmd = Command::new(binary("workspace-hub")?);
        cmd.args(["token", "create", "--owner", owner, "--state-dir"])
            .arg(&self.state_dir);
        let config = self.state_dir.join("hub.toml");
        if config.exists() {
            cmd.arg("--config").arg(config);
        }
        let out = cmd.output().context("run workspace-hub token create")?;
        if !out.status.success() {
            bail!("token create: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.print_log_tails();
        }
        kill_agents(&self.workspaces);
    }
}

impl TestHub {
    /// A failing test shows the last lines of its hub's and agents' logs (they are removed
    /// with the test's folder), so a failure seen once under load can still be explained.
    fn print_log_tails(&self) {
        let tail = |what: &str, text: String| {
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {what}");
            for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                eprintln!("{line}");
            }
        };
        tail("the hub's log", self.log());
        for entry in std::fs::read_dir(&self.workspaces)
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = entry.file_name().to_string_lossy().into_owned();
            let log = self.agent_log(&id);
            if !log.is_empty() {
                tail(&format!("workspace {id}'s agent log"), log);
            }
        }
    }
}

const LOG_TAIL_LINES: usize = 40;

/// Kills every agent process group recorded under a provider folder.
fn kill_agents(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(raw) = std::fs::read_to_string(entry.path().join("agent.pid")) else {
            continue;
        };
        if let Some(pid) = raw.trim().parse().ok().and_then(Pid::from_raw) {
            let _ = rustix::process::kill_process_group(pid, Signal::CONT);
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
    }
}

async fn spawn_hub(
    state_dir: &Path,
    options: &HubOptions,
    addrs: Option<Listening>,
) -> Result<(Child, Listening)> {
    std::fs::create_dir_all(state_dir)?;
    let hub_json = state_dir.join("hub.json");
    let _ = std::fs::remove_file(&hub_json);
    let (http, quic) = match addrs {
        Some(l) => (l.http.to_string(), l.quic.to_string()),
        // Ports a restart can have again (see `stable_port`).
        None => {
            let host = options.host.unwrap_or([127, 0, 0, 1].into());
            (
                std::net::SocketAddr::new(host, stable_port()?).to_string(),
                std::net::SocketAddr::new(host, stable_port()?).to_string(),
            )
        }
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join("hub.log"))?;
    let mut cmd = Command::new(binary("workspace-hub")?);
    cmd.arg("dev")
        .arg("--state-dir")
        .arg(state_dir)
        .args([
            "--http",
            &http,
            "--quic",
            &quic,
            "--provider",
            &options.provider,
        ])
        .args(["--heartbeat-interval", &ms(options.heartbeat_interval)])
        .args(["--heartbeat-timeout", &ms(options.heartbeat_timeout)]);
    if let Some(ttl) = options.enrollment_ttl {
        cmd.args(["--enrollment-ttl", &ms(ttl)]);
    }
    // Its agents' shells start in an empty home: a test never depends on the machine
    // user's dotfiles (a login shell that runs a version manager's hook, waiting on a lock
    // some killed shell left behind, stalled every terminal test once).
    let home = state_dir.with_file_name("home");
    std::fs::create_dir_all(&home)?;
    cmd.env("HOME", &home);
    // The test's own environment (fault injection, log settings) over the defaults.
    cmd.env("RUST_LOG", "info,quinn=warn");
    cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
    if !options.config.is_empty() {
        let path = state_dir.join("hub.toml");
        std::fs::write(&path, &options.config)?;
        cmd.arg("--config").arg(path);
    }
    // Agents started by the process provider find their binary beside the hub's.
    if options.provider == "process" {
        binary("workspace-agent")?;
    }
    let mut child = cmd
        .stdin(Stdio::null())
        // The dev banner (its sign-in link, its token) goes to a file of its own.
        .stdout(std::fs::File::create(state_dir.join("hub.stdout"))?)
        .stderr(log)
        .spawn()
        .context("start workspace-hub")?;
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&hub_json)
            && let Ok(listening) = serde_json::from_slice::<Listening>(&bytes)
        {
            return Ok((child, listening));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "workspace-hub exited with {status}: {}",
                std::fs::read_to_string(state_dir.join("hub.log")).unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            bail!("workspace-hub did not start within 20s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent running inside the test process (real agent code, its own state folder).
pub struct InProcessAgent {
    pub events: tokio::sync::mpsc::UnboundedReceiver<agent::AgentEvent>,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), agent::AgentError>>,
    pub state_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for InProcessAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessAgent")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// The agent config a manual-provider create returned, pointed at a fresh state folder.
pub fn agent_config(
    create_response: &Value,
) -> Result<(agent::config::AgentConfig, tempfile::TempDir)> {
    let text = create_response["agent_config"]
        .as_str()
        .context("create response has no agent_config (is the provider manual?)")?;
    let mut config = agent::config::AgentConfig::parse(text)?;
    let dir = tempfile::Builder::new().prefix("wsh-agent-").tempdir()?;
    config.state_dir = dir.path().to_path_buf();
    // In-process agents share the test process: its ports are not theirs.
    config.ports = protocol::bootstrap::PortScope::Off;
    Ok((config, dir))
}

impl InProcessAgent {
    /// Starts an agent from a manual-provider create response.
    pub fn start(create_response: &Value) -> Result<Self> {
        let (config, dir) = agent_config(create_response)?;
        Ok(Self::start_with(config, dir))
    }

    /// Starts an agent with a given config; `dir` is kept alive as long as the agent.
    pub fn start_with(config: agent::config::AgentConfig, dir: tempfile::TempDir) -> Self {
        link::install_crypto_provider();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let state_dir = config.state_dir.clone();
        let agent = agent::Agent::new(config)
            .expect("agent endpoint")
            .with_events(tx);
        let task = tokio::spawn(agent.run(shutdown.clone()));
        Self {
            events,
            shutdown,
            task,
            state_dir,
            _dir: dir,
        }
    }

    /// Waits for the next event matching `pred`.
    pub async fn wait_event(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&agent::AgentEvent) -> bool,
    ) -> Result<agent::AgentEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if pred(&event) => return Ok(event),
                Ok(Some(_)) => continue,
                Ok(None) => bail!("agent stopped before the expected event"),
                Err(_) => bail!("no matching agent event within {timeout:?}"),
            }
        }
    }

    /// Stops the agent and returns how it ended.
    pub async fn stop(&mut self) -> Result<(), agent::AgentError> {
        self.shutdown.cancel();
        (&mut self.task).await.expect("agent task panicked")
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
