//! Agent updates without new images, in process workspaces: an agent of an older version
//! (this build, stamped older with `harness::stamp_agent`) takes the hub's signed binary
//! and becomes it in place, its terminal sessions (their processes, output and screens)
//! kept; tampered, truncated, wrongly signed and unstartable binaries are refused; a new
//! binary that dies is rolled back at the next start, one the hub does not welcome in time
//! goes back to the previous binary with the terminals.

use harness::{HubOptions, TestHub, binary, stamp_agent};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// Keys, an older agent, and the current one signed as the hub's update.
struct Kit {
    dir: tempfile::TempDir,
    old_version: String,
    new_version: String,
}

impl Kit {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wsh-update-")
            .tempdir()
            .unwrap();
        harness::update_keygen(dir.path()).unwrap();
        let current = binary("workspace-agent").unwrap();
        let new_version = env!("CARGO_PKG_VERSION").to_owned();
        // Older than this build by semver precedence.
        let old_version = format!("{new_version}-old.1");
        stamp_agent(&current, &dir.path().join("agent-old"), &old_version).unwrap();
        std::fs::copy(&current, dir.path().join("workspace-agent")).unwrap();
        let kit = Self {
            dir,
            old_version,
            new_version,
        };
        kit.sign(
            &kit.path("update-key"),
            &kit.new_version,
            &kit.path("workspace-agent"),
        );
        kit
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sign(&self, key: &Path, version: &str, binary: &Path) {
        harness::update_sign(key, version, binary, &[]).unwrap();
    }

    /// Hub settings: process agents run the old binary and trust the kit's key; the update
    /// offered is `update` (a binary with its `.release` beside it), if any.
    fn options(&self, update: Option<&Path>) -> HubOptions {
        let mut config = format!(
            "agent_binary = \"{}\"\nagent_update_keys = \"{}\"\n",
            self.path("agent-old").display(),
            self.path("update-key.pub").display()
        );
        if let Some(update) = update {
            config.push_str(&format!(
                "[agent_update]\nbinary = \"{}\"\n",
                update.display()
            ));
        }
        HubOptions {
            config,
            ..Default::default()
        }
    }
}

/// The agent's version as the hub shows it, once connected.
async fn agent_version(hub: &TestHub, id: &str) -> Option<String> {
    let (_, ws) = hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .ok()?;
    ws["agent"]["agent_version"].as_str().map(str::to_owned)
}

async fn wait_version(hub: &TestHub, id: &str, version: &str) {
    let deadline = Instant::now() + WAIT;
    while agent_version(hub, id).await.as_deref() != Some(version) {
        assert!(
            Instant::now() < deadline,
            "the agent never reported {version}; it says {:?}\n{}",
            agent_version(hub, id).await,
            hub.agent_log(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the agent's log shows `text`.
async fn wait_log(hub: &TestHub, id: &str, text: &str) {
    let deadline = Instant::now() + WAIT;
    while !hub.agent_log(id).contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the agent's log:\n{}",
            hub.agent_log(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Attaches to the named terminal session (created if it is not there; an existing one
/// replayed from its first byte), types `input`, and returns the output once it shows
/// `expect`.
async fn terminal(hub: &TestHub, id: &str, session: &str, input: &str, expect: &str) -> String {
    let (_, sessions) = hub
        .api("GET", &format!("/workspaces/{id}/sessions"), None)
        .await
        .unwrap();
    let exists = sessions.to_string().contains(&format!("\"{session}\""));
    let query = if exists {
        format!("session={session}&offset=0")
    } else {
        format!("session={session}")
    };
    hub.terminal_with(id, &query, input, expect).await.unwrap()
}

fn agent_pid(hub: &TestHub, id: &str) -> u32 {
    std::fs::read_to_string(hub.workspace_dir(id).join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// What the agent process runs now.
fn agent_exe(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_keeps_the_terminals() {
    let kit = Kit::new();
    // First a hub with nothing to offer, so the terminal has a past when the update comes.
    let mut hub = TestHub::start_with(kit.options(None)).await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    wait_version(&hub, &id, &kit.old_version).await;
    terminal(
        &hub,
        &id,
        "keep",
        "export MARK=kept-$((6*7)); echo shell=$$ before-update\r",
        "before-update",
    )
    .await;
    let pid = agent_pid(&hub, &id);
    let before = agent_exe(pid);
    let shells = children(pid);
    assert!(!shells.is_empty());

    // A new hub offers its agent: the agent takes it.
    hub.options = kit.options(Some(&kit.path("workspace-agent")));
    hub.start_again().await.unwrap();
    wait_version(&hub, &id, &kit.new_version).await;
    wait_log(&hub, &id, "agent update confirmed").await;

    // The same process, now running the installed binary, with the same shell.
    assert_eq!(agent_pid(&hub, &id), pid, "the agent kept its PID");
    let after = agent_exe(pid);
    assert_ne!(after, before);
    assert!(
        after.ends_with(format!("workspace-agent-{}", kit.new_version)),
        "{}",
        after.display()
    );
    assert_eq!(
        children(pid),
        shells,
        "the terminals' processes are the agent's still"
    );
    let seen = terminal(&hub, &id, "keep", "echo mark=$MARK\r", "mark=kept-42").await;
    assert!(
        seen.contains("before-update"),
        "the output before the update is kept: {seen}"
    );
    // A new terminal works too, and the session list still names the old one.
    hub.terminal_echo(&id, "echo fresh-$((1+1))\r", "fresh-2")
        .await
        .unwrap();
    let (_, sessions) = hub
        .api("GET", &format!("/workspaces/{id}/sessions"), None)
        .await
        .unwrap();
    assert!(sessions.to_string().contains("keep"), "{sessions}");

    // The machine goes down (the process provider's stop only suspends: the test kills
    // what a power cut would) and boots the image's binary, which starts the installed
    // update.
    let (status, _) = hub
        .api("POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    assert_eq!(status, 202);
    hub.wait_for(&id, WAIT, |w| w["status"] == "SUSPENDED")
        .await
        .unwrap();
    for p in children(pid).into_iter().chain([pid]) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(p as i32).unwrap(),
            rustix::process::Signal::KILL,
        );
    }
    hub.options = kit.options(None);
    hub.start_again().await.unwrap();
    let (status, _) = hub
        .api("POST", &format!("/workspaces/{id}/start"), None)
        .await
        .unwrap();
    assert_eq!(status, 202);
    wait_version(&hub, &id, &kit.new_version).await;
    assert!(
        hub.agent_log(&id)
            .contains("starting the installed agent update")
    );
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .and_then(|rest| rest.split_whitespace().nth(1))
                    == Some(pid.to_string().as_str())
            })
        })
        .collect();
    out.sort();
    out
}

/// The binary the hub serves changes after the hub read its release (the agent's workspace
/// is made after that), so what the agent receives is not what was signed.
#[tokio::test(flavor = "multi_thread")]
async fn tampered_truncated_and_unsigned_binaries_are_refused() {
    let kit = Kit::new();
    let served = kit.path("served-agent");
    std::fs::copy(kit.path("workspace-agent"), &served).unwrap();
    kit.sign(&kit.path("update-key"), &kit.new_version, &served);
    let good = std::fs::read(&served).unwrap();
    let mut hub = TestHub::start_with(kit.options(Some(&served)))
        .await
        .unwrap();
    // One byte changed after signing.
    let mut bytes = good.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&served, &bytes).unwrap();
    let id = hub.ready_workspace().await.unwrap();
    wait_log(&hub, &id, "its SHA-256 is not the signed one").await;
    assert_eq!(
        agent_version(&hub, &id).await.as_deref(),
        Some(kit.old_version.as_str())
    );
    hub.terminal_echo(&id, "echo still-$((2+2))\r", "still-4")
        .await
        .unwrap();

    // Cut short: the hub stops sending at the end of the file; the agent refuses what
    // came and keeps nothing.
    std::fs::write(&served, &good).unwrap();
    hub.start_again().await.unwrap();
    std::fs::write(&served, &good[..good.len() / 3]).unwrap();
    let id = hub.ready_workspace().await.unwrap();
    wait_log(&hub, &id, "cut off after").await;
    let update_dir = hub.workspace_dir(&id).join("agent/update");
    let leftovers: Vec<_> = std::fs::read_dir(&update_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().starts_with("workspace-agent-")
                && !n.to_string_lossy().starts_with(".incoming")),
        "{leftovers:?}"
    );

    // Signed by a key the image does not trust: not even downloaded.
    let other = tempfile::tempdir().unwrap();
    harness::update_keygen(other.path()).unwrap();
    std::fs::copy(kit.path("workspace-agent"), &served).unwrap();
    kit.sign(&other.path().join("update-key"), &kit.new_version, &served);
    hub.start_again().await.unwrap();
    wait_log(&hub, &id, "no trusted update key signed it").await;
    assert_eq!(
        agent_version(&hub, &id).await.as_deref(),
        Some(kit.old_version.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_that_does_not_start_is_not_taken() {
    let kit = Kit::new();
    // Signed with the trusted key, but not an agent: its self-check fails.
    let broken = kit.path("broken-agent");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho \"workspace-agent $WSH_V (protocol 9)\"\nexit 1\n",
    )
    .unwrap();
    set_exec(&broken);
    let version = harness::later_version(&kit.new_version, "broken");
    // The sign command runs `--version` too: let it see the version it expects.
    harness::update_sign(
        &kit.path("update-key"),
        &version,
        &broken,
        &[("WSH_V", &version)],
    )
    .unwrap();
    let mut hub = TestHub::start_with(kit.options(Some(&broken)))
        .await
        .unwrap();
    let id = hub.ready_workspace().await.unwrap();
    wait_log(&hub, &id, "`--version` said").await;
    hub.terminal_echo(&id, "echo alive-$((3+3))\r", "alive-6")
        .await
        .unwrap();
    // Not tried again, even by a new connection.
    hub.start_again().await.unwrap();
    wait_log(&hub, &id, "this version failed here before").await;
    assert_eq!(
        agent_version(&hub, &id).await.as_deref(),
        Some(kit.old_version.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_binary_that_dies_is_rolled_back_at_the_next_start() {
    let kit = Kit::new();
    // Passes the self-check, then dies as soon as it runs as the agent.
    let version = harness::later_version(&kit.new_version, "dying");
    let dying = kit.path("dying-agent");
    std::fs::write(
        &dying,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'workspace-agent {version} (protocol 9)'; exit 0; fi\nexit 1\n"
        ),
    )
    .unwrap();
    set_exec(&dying);
    kit.sign(&kit.path("update-key"), &version, &dying);
    let hub = TestHub::start_with(kit.options(Some(&dying)))
        .await
        .unwrap();
    let id = hub.ready_workspace().await.unwrap();
    // It took it and died: what a supervisor does next is start the agent again (here,
    // the workspace's stop and start).
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(format!("/proc/{}/cmdline", agent_pid(&hub, &id)))
        .is_ok_and(|c| c.contains("agent.toml"))
    {
        assert!(
            Instant::now() < deadline,
            "the agent never restarted into the update"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hub.api("POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    hub.wait_for(&id, WAIT, |w| w["status"] == "SUSPENDED")
        .await
        .unwrap();
    hub.api("POST", &format!("/workspaces/{id}/start"), None)
        .await
        .unwrap();
    wait_log(&hub, &id, "rolled back, not taken again").await;
    wait_log(&hub, &id, "this version failed here before").await;
    wait_version(&hub, &id, &kit.old_version).await;
    hub.terminal_echo(&id, "echo back-$((4+4))\r", "back-8")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_binary_not_welcomed_in_time_hands_the_terminals_back() {
    let kit = Kit::new();
    let mut hub = TestHub::start_with(kit.options(None)).await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    terminal(&hub, &id, "keep", "echo shell=$$ first\r", "first").await;
    let pending = hub.workspace_dir(&id).join("agent/update/pending");
    // The new hub offers the update; the moment the agent commits to it, the hub stops
    // answering (frozen), so the new binary is never welcomed.
    hub.options = kit.options(Some(&kit.path("workspace-agent")));
    hub.start_again().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while !pending.exists() {
        assert!(
            Instant::now() < deadline,
            "no update started:\n{}",
            hub.agent_log(&id)
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    hub.freeze(true).unwrap();
    // Probation is a minute: then the previous binary takes the terminals back.
    let deadline = Instant::now() + agent::update::PROBATION + WAIT;
    while !hub.agent_log(&id).contains("rolling back") {
        assert!(
            Instant::now() < deadline,
            "no rollback:\n{}",
            hub.agent_log(&id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    hub.freeze(false).unwrap();
    wait_log(&hub, &id, "this version failed here before").await;
    wait_version(&hub, &id, &kit.old_version).await;
    let seen = terminal(&hub, &id, "keep", "echo again\r", "again").await;
    assert!(seen.contains("first"), "{seen}");
    assert!(!pending.exists());
}

fn set_exec(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_without_keys_declines_and_stays() {
    let kit = Kit::new();
    let mut options = kit.options(Some(&kit.path("workspace-agent")));
    // No keys for the process agents: the image trusts none.
    options.config = options
        .config
        .lines()
        .filter(|l| !l.starts_with("agent_update_keys"))
        .collect::<Vec<_>>()
        .join("\n");
    let hub = TestHub::start_with(options).await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    wait_log(&hub, &id, "trusts no update key").await;
    hub.terminal_echo(&id, "echo stays-$((5+5))\r", "stays-10")
        .await
        .unwrap();
    assert_eq!(
        agent_version(&hub, &id).await.as_deref(),
        Some(kit.old_version.as_str())
    );
    assert!(
        !hub.agent_log(&id).contains("link to hub lost"),
        "{}",
        hub.agent_log(&id)
    );
}

/// An agent (here a raw one, speaking the protocol by hand) that asks for its update again
/// and again gets the binary once per connection.
#[tokio::test(flavor = "multi_thread")]
async fn the_binary_is_sent_once_per_connection() {
    use harness::raw_agent;
    use protocol::control::ControlMsg;
    use protocol::stream::StreamHeader;
    let kit = Kit::new();
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        // The raw agent does not ping.
        heartbeat_interval: Duration::from_secs(10),
        heartbeat_timeout: Duration::from_secs(60),
        config: format!(
            "[agent_update]\nbinary = {:?}\n",
            kit.path("workspace-agent").display().to_string()
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_id, cert, key) = raw_agent::enrolled_identity(&hub).await;
    let conn = raw_agent::connect(&hub, Some((cert, key))).await.unwrap();
    let (mut send, mut recv) =
        raw_agent::hello_as(&conn, protocol::PROTOCOL_VERSION, &kit.old_version).await;
    let accepted = recv
        .expect::<protocol::stream::StreamReply>()
        .await
        .unwrap();
    assert!(matches!(
        accepted,
        protocol::stream::StreamReply::Accepted(_)
    ));
    let offer = loop {
        match tokio::time::timeout(WAIT, recv.expect::<ControlMsg>()).await {
            Ok(Ok(ControlMsg::UpdateOffer(offer))) => break offer,
            Ok(Ok(_)) => {}
            other => panic!("no offer: {other:?}"),
        }
    };
    assert_eq!(offer.version, kit.new_version);
    for _ in 0..3 {
        link::send_msg(
            &mut send,
            &ControlMsg::UpdateRequest(protocol::update::UpdateRequest {
                version: offer.version.clone(),
            }),
        )
        .await
        .unwrap();
    }
    let mut received = Vec::new();
    while let Ok(Ok((_s, r))) = tokio::time::timeout(Duration::from_secs(3), conn.accept_bi()).await
    {
        let mut r = link::FramedRecv::new(r);
        let StreamHeader::AgentUpdate(open) = r.expect::<StreamHeader>().await.unwrap() else {
            panic!("not an update stream");
        };
        let (mut rest, mut decoder) = r.into_parts();
        let mut bytes = decoder.take_buffered();
        bytes.extend(rest.read_to_end(64 << 20).await.unwrap());
        assert_eq!(bytes.len() as u64, open.size);
        received.push(bytes);
    }
    assert_eq!(received.len(), 1, "one binary per connection");
    let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &received[0]);
    assert_eq!(sha.as_ref(), offer.sha256);
    assert!(hub.log().contains("asked for its update too often"));
}
