//! N−1: the previous protocol version's release (`compat/previous-release`, built once by
//! `scripts/previous-release` and cached by content hash) against this tree. Its agent
//! connects to this hub and serves terminals, ports with previews, and file sync; its CLI
//! works against this hub and agent.
//!
//! The release's binaries come from `WSH_PREVIOUS_DIR` (the test command builds them) or
//! are built (or taken from the cache) here.

use harness::{HubOptions, TestHub, free_port};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn previous_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("WSH_PREVIOUS_DIR") {
        return dir.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/previous-release"))
        .current_dir(&root)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/previous-release");
    assert!(out.status.success(), "scripts/previous-release failed");
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// `key=value` of the release the binaries were built from.
fn release(dir: &Path, key: &str) -> String {
    std::fs::read_to_string(dir.join("release"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!("{key} in {}/release", dir.display()))
}

/// `wsh sync --once` of a small tree with `wsh` (either release's), and what arrived.
fn sync_once(hub: &TestHub, wsh: &Path, id: &str) {
    let local_parent = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let local = local_parent.path().join("compat-proj");
    std::fs::create_dir_all(local.join("src")).unwrap();
    std::fs::write(local.join("README.md"), b"compat\n").unwrap();
    std::fs::write(local.join("src/main.rs"), b"fn main() {}\n").unwrap();
    let out = Command::new(wsh)
        .env("WSH_HUB", hub.url(""))
        .env("WSH_TOKEN", &hub.token)
        .env("XDG_STATE_HOME", state.path())
        .stdin(Stdio::null())
        .args(["sync", "--once", id])
        .arg(&local)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} sync: {}",
        wsh.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let remote = hub.workspace_dir(id).join("compat-proj");
    assert_eq!(
        std::fs::read(remote.join("README.md")).unwrap(),
        b"compat\n"
    );
    assert_eq!(
        std::fs::read(remote.join("src/main.rs")).unwrap(),
        b"fn main() {}\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_previous_agent_serves_terminals_ports_and_sync() {
    let previous = previous_dir();
    let protocol: u16 = release(&previous, "protocol").parse().unwrap();
    assert!(
        (protocol::MIN_PROTOCOL_VERSION..protocol::PROTOCOL_VERSION).contains(&protocol),
        "compat/previous-release names protocol {protocol}; this tree speaks {} (accepting {}): name the previous one",
        protocol::PROTOCOL_VERSION,
        protocol::MIN_PROTOCOL_VERSION
    );
    let hub = TestHub::start_with(HubOptions {
        config: format!(
            "agent_binary = {:?}\npreview_timeout = \"5s\"\n",
            previous.join("workspace-agent").display().to_string()
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let (_, ws) = hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(ws["agent"]["protocol_version"], protocol, "{ws}");

    hub.terminal_echo(&id, "echo compat-$((6*7))\n", "compat-42")
        .await
        .unwrap();

    let port = free_port();
    let _server = hub
        .run_in_workspace(&id, &harness::test_server(&[&port.to_string()]))
        .unwrap();
    let (status, body) = hub.preview_when_listed(&id, port).await.unwrap();
    assert_eq!(status, 200, "{body}");

    // This release's CLI syncs with the previous agent.
    sync_once(&hub, &harness::binary("wsh").unwrap(), &id);
    // Nothing the previous agent lacks breaks what it has: the status still reads.
    let (status, st) = hub
        .api("GET", &format!("/workspaces/{id}/status"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{st}");
    assert!(
        st["agent"]["sync_sessions"]
            .as_array()
            .is_none_or(|s| s.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_previous_cli_works_against_this_hub() {
    let previous = previous_dir();
    let old_wsh = previous.join("wsh");
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let run = |args: &[&str]| -> String {
        let out = Command::new(&old_wsh)
            .env("WSH_HUB", hub.url(""))
            .env("WSH_TOKEN", &hub.token)
            .stdin(Stdio::null())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "previous wsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run(&["list"]).contains(&id));
    assert_eq!(
        run(&["exec", &id, "--", "echo", "from-n-1"]).trim(),
        "from-n-1"
    );
    sync_once(&hub, &old_wsh, &id);
    let created: Value =
        serde_json::from_str(&run(&["create", "--name", "made-by-n-1", "--json"])).unwrap();
    let other = created["id"].as_str().unwrap().to_owned();
    hub.wait_for(&other, WAIT, |w| w["status"] == "READY")
        .await
        .unwrap();
    assert!(run(&["list"]).contains("made-by-n-1"));
    run(&["delete", "made-by-n-1"]);
}
