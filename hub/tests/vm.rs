//! The real VM path on one machine: the workspace image (`images/build`: Debian, cloud-init,
//! the static agent) boots under qemu, cloud-init writes the agent's config and starts it,
//! the agent enrolls and dials the hub, and terminals run inside the guest.
//!
//! The image comes from `WSH_TEST_IMAGE_DIR` (the test command builds it) or is built (or
//! taken from its cache) here, with the GCE disk (`--gce`).

use futures_util::{SinkExt, StreamExt};
use harness::{HubOptions, TestHub};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Under TCG on two busy cores a boot can take a while (31 to 84 s here to cloud-init's first
/// stage, over five minutes once in CI beside the other tests); the figure is in the README.
const BOOT: Duration = Duration::from_secs(420);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The update keys the image trusts (the test command makes them once per machine).
fn update_keys() -> PathBuf {
    let dir = std::env::var("WSH_TEST_UPDATE_KEYS").map_or_else(
        |_| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/workspace-hub/update-test-key")
        },
        PathBuf::from,
    );
    if !dir.join("update-key.pub").exists() {
        harness::update_keygen(&dir).unwrap();
    }
    dir
}

/// The static agent the image was built with.
fn static_agent() -> PathBuf {
    // Relative paths are the repository's (tests run in the package's folder).
    root().join(
        std::env::var("WSH_TEST_STATIC_AGENT")
            .unwrap_or_else(|_| "target/x86_64-unknown-linux-musl/agent/workspace-agent".into()),
    )
}

fn image_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("WSH_TEST_IMAGE_DIR") {
        return dir.into();
    }
    let root = root();
    let out = std::process::Command::new(root.join("images/build"))
        .arg("--gce")
        .arg("--update-keys")
        .arg(update_keys().join("update-key.pub"))
        .arg(static_agent())
        .current_dir(&root)
        .output()
        .expect("run images/build");
    assert!(
        out.status.success(),
        "images/build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

fn build_info(dir: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("build.json")).unwrap()).unwrap()
}

async fn vm_hub(extra: &str, enrollment_ttl: Option<Duration>) -> (TestHub, PathBuf) {
    let image = image_dir();
    let hub = TestHub::start_with(HubOptions {
        provider: "qemu".into(),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(5),
        enrollment_ttl,
        config: format!(
            "reconcile_interval = \"1s\"\n{extra}\n[qemu]\nimage_dir = {:?}\n",
            image.display().to_string()
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    (hub, image)
}

/// The guest's serial console, for failure messages.
fn console(hub: &TestHub, id: &str) -> String {
    let path = hub
        .state_dir
        .join("workspaces")
        .join(id)
        .join("console.log");
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Every qemu process of this workspace (there must be none after a delete).
fn qemu_processes(id: &str) -> Vec<u32> {
    let needle = format!("ws-{id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
        })
        .collect()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A terminal over the browser's WebSocket: the session id, then output until `marker`.
struct Term {
    ws: Ws,
    session: String,
    next: u64,
    text: String,
}

impl Term {
    async fn open(hub: &TestHub, id: &str, query: &str) -> Self {
        let url = hub.terminal_url(id, query).await.unwrap();
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut term = Self {
            ws,
            session: String::new(),
            next: 0,
            text: String::new(),
        };
        while term.session.is_empty() {
            match term.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let e: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(e["type"], "opened", "{e}");
                    term.session = e["session"].as_str().unwrap().to_owned();
                }
                other => panic!("expected opened, got {other:?}"),
            }
        }
        term
    }

    async fn run(&mut self, command: &str, marker: &str) -> String {
        self.text.clear();
        self.ws
            .send(Message::Binary(format!("{command}\n").into_bytes().into()))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.text.contains(marker) {
            assert!(
                Instant::now() < deadline,
                "no {marker:?} in {:?}",
                self.text
            );
            match tokio::time::timeout(Duration::from_secs(60), self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) if b[0] == 0 => {
                    let offset = u64::from_be_bytes(b[1..9].try_into().unwrap());
                    self.next = offset + (b.len() - 9) as u64;
                    self.text.push_str(&String::from_utf8_lossy(&b[9..]));
                }
                Ok(Some(Ok(Message::Binary(b)))) => {
                    self.next = u64::from_be_bytes(b[1..9].try_into().unwrap());
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("terminal ended: {other:?}"),
            }
        }
        self.text.clone()
    }
}

#[tokio::test]
async fn a_vm_boots_its_agent_through_cloud_init_and_keeps_terminals_across_stop_and_start() {
    let (mut hub, image) = vm_hub("", None).await;
    let info = build_info(&image);
    let posted = Instant::now();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    hub.wait_for(&id, BOOT, |w| w["status"] == "READY")
        .await
        .unwrap_or_else(|e| panic!("{e}; console: {}", console(&hub, &id)));
    eprintln!("POST /workspaces to READY: {:.1?}", posted.elapsed());

    // The terminal runs in the guest, as its user, on its kernel.
    let mut term = Term::open(&hub, &id, "cols=120&rows=40").await;
    let out = term
        .run(
            "uname -r; id -un; grep ^VERSION_CODENAME= /etc/os-release; hostname; echo done-$((2+3))",
            "done-5\r\n",
        )
        .await;
    let kernel = info["kernel"].as_str().unwrap();
    assert!(out.contains(&format!("{kernel}\r\n")), "{out}");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(
        kernel,
        host_kernel.trim(),
        "the guest's kernel, not the host's"
    );
    assert!(out.contains("\r\ndev\r\n"), "{out}");
    assert!(out.contains("VERSION_CODENAME=bookworm"), "{out}");
    let instance = ws["instance_name"].as_str().unwrap();
    assert!(
        out.contains(&format!("\r\n{instance}\r\n")),
        "the guest's host name: {out}"
    );
    let rss = term
        .run(
            "echo rss=$(awk '/VmRSS/{print $2}' /proc/$(systemctl show -p MainPID --value workspace-agent)/status)kib-$((1+1))",
            "kib-2\r\n",
        )
        .await;
    eprintln!(
        "agent RSS in the guest: {}",
        rss.lines()
            .filter_map(|l| l.split("rss=").nth(1))
            .rfind(|v| !v.starts_with('$'))
            .unwrap_or("?")
    );
    // The guest's sshd listens on loopback only: reached through the agent, never the network.
    let sshd = {
        let start = Instant::now();
        loop {
            let (_, ports) = hub
                .api("GET", &format!("/workspaces/{id}/ports"), None)
                .await
                .unwrap();
            let found = ports["ports"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
                .find(|p| p["port"] == 22)
                .cloned();
            if let Some(p) = found {
                break p;
            }
            assert!(start.elapsed() < BOOT, "no sshd port reported: {ports}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert_eq!(sshd["loopback_only"], true, "{sshd}");
    // The user's key reaches the guest user's authorized_keys through the agent (owned by
    // that user), and real OpenSSH logs in with it through `wsh ssh`.
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("id_ed25519");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "vm-test", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let (status, body) = hub
        .api(
            "POST",
            "/ssh-keys",
            Some(serde_json::json!({ "key": public.trim() })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let keys = term
        .run(
            "for i in $(seq 50); do grep -q vm-test ~/.ssh/authorized_keys 2>/dev/null && break; sleep 0.2; done; stat -c '%U:%a' ~/.ssh ~/.ssh/authorized_keys; echo keys-$((5+5))",
            "keys-10\r\n",
        )
        .await;
    assert!(keys.contains("dev:700\r\ndev:600\r\n"), "{keys}");
    let out = hub
        .wsh()
        .unwrap()
        .env("HOME", home.path())
        .args(["ssh", &id, "--user", "dev", "--identity-file"])
        .arg(&key)
        .args(["--", "echo", "via-sshd-$((6*7))", "$(id -un)"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "via-sshd-42 dev\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `wsh sync` into the guest: files land in the user's home, owned by the user, with
    // their executable bit.
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("hello.txt"), "from the host\n").unwrap();
    std::fs::write(local.path().join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(
        local.path().join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = hub
        .wsh()
        .unwrap()
        .args(["sync", "--once", &id])
        .arg(local.path())
        .arg("proj")
        .env("XDG_STATE_HOME", state.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let synced = term
        .run(
            "stat -c '%U:%a' ~/proj/run.sh; ~/proj/run.sh; cat ~/proj/hello.txt; echo sync-$((4+4))",
            "sync-8\r\n",
        )
        .await;
    assert!(synced.contains("dev:755\r\n"), "{synced}");
    assert!(synced.contains("ran\r\nfrom the host\r\n"), "{synced}");

    // An agent update without a new image: the hub comes back offering a newer static
    // agent signed with the key the image trusts; the guest's agent becomes it in place
    // (the same process under systemd) and this terminal session goes on.
    let main_pid = |text: &str| {
        text.lines()
            .filter_map(|l| l.split("mainpid=").nth(1))
            .rfind(|v| !v.starts_with('$'))
            .map(str::to_owned)
    };
    let ask_pid = "echo mainpid=$(systemctl show -p MainPID --value workspace-agent)-$((7+7))";
    let before = main_pid(&term.run(ask_pid, "-14\r\n").await);
    let kit = tempfile::tempdir().unwrap();
    let (update, version) = signed_update(kit.path());
    hub.options.config.push_str(&format!(
        "[agent_update]\nbinary = {:?}\n",
        update.display().to_string()
    ));
    let updating = Instant::now();
    hub.start_again().await.unwrap();
    hub.wait_for(&id, BOOT, |w| {
        w["agent"]["agent_version"] == version.as_str()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; console: {}", console(&hub, &id)));
    eprintln!(
        "hub restart to the guest's agent updated: {:.1?}",
        updating.elapsed()
    );
    let session = term.session.clone();
    let offset = term.next;
    drop(term);
    let mut term = Term::open(&hub, &id, &format!("session={session}&offset={offset}")).await;
    assert_eq!(term.session, session, "the same terminal session");
    let after = main_pid(&term.run(ask_pid, "-14\r\n").await);
    assert!(before.is_some());
    assert_eq!(before, after, "the agent kept its process");

    let log = hub.log();
    eprintln!(
        "{}",
        log.lines()
            .find(|l| l.contains("qemu acceleration"))
            .unwrap_or("accel: fixed by config")
    );

    // Stop pauses the VM; start resumes it and the same session is still there.
    let (status, _) = hub
        .api("POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    assert_eq!(status, 202);
    hub.wait_for(&id, BOOT, |w| w["status"] == "SUSPENDED")
        .await
        .unwrap();
    let (_, st) = hub
        .api("GET", &format!("/workspaces/{id}/status"), None)
        .await
        .unwrap();
    assert_eq!(st["observed"], "SUSPENDED", "{st}");
    let session = term.session.clone();
    let offset = term.next;
    drop(term);
    let (status, _) = hub
        .api("POST", &format!("/workspaces/{id}/start"), None)
        .await
        .unwrap();
    assert_eq!(status, 202);
    hub.wait_for(&id, BOOT, |w| {
        w["status"] == "READY" && !w["agent"].is_null()
    })
    .await
    .unwrap();
    let mut again = Term::open(&hub, &id, &format!("session={session}&offset={offset}")).await;
    assert_eq!(again.session, session, "the same terminal session");
    again.run("echo again-$((3+4))", "again-7\r\n").await;

    // Delete leaves no VM and no overlay behind.
    delete(&hub, &id).await;
}

/// The image's static agent stamped with a newer version and signed with the key the
/// image trusts, in `dir`: its path and version.
fn signed_update(dir: &std::path::Path) -> (PathBuf, String) {
    let agent = static_agent();
    let version = harness::later_version(&harness::agent_version_of(&agent).unwrap(), "vm");
    let update = dir.join("workspace-agent");
    harness::stamp_agent(&agent, &update, &version).unwrap();
    harness::update_sign(&update_keys().join("update-key"), &version, &update, &[]).unwrap();
    (update, version)
}

/// Deletes a workspace and waits until it is gone: no record, no qemu, no folder.
async fn delete(hub: &TestHub, id: &str) {
    let (status, _) = hub
        .api("DELETE", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = hub
            .api("GET", &format!("/workspaces/{id}"), None)
            .await
            .unwrap();
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "workspace still there");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(qemu_processes(id), Vec::<u32>::new());
    assert!(!hub.state_dir.join("workspaces").join(id).exists());
}

/// Broken user-data ends in ERROR with a readable reason, not in PROVISIONING for ever:
/// an enrollment token that has expired by the time the guest's agent uses it (at once,
/// with the serial console's last lines), and a hub address nothing answers on (at the
/// provision timeout). Both VMs boot at once.
#[tokio::test]
async fn vms_with_broken_user_data_end_in_error_with_the_reason() {
    let expired = async {
        // The token is good for a second: the agent presents it long after, and the
        // workspace fails then, not at the provision timeout.
        let (hub, _) = vm_hub("provision_timeout = \"600s\"", Some(Duration::from_secs(1))).await;
        let reason = error_reason(&hub).await;
        assert!(
            reason.contains("the agent's enrollment token expired (1s after the create)"),
            "{reason}"
        );
        // Its agent ran: the console has lines to show.
        assert!(reason.contains("; last boot log: "), "{reason}");
        assert!(hub.log().contains("workspace.enrollment_expired"));
    };
    let unreachable = async {
        // No agent can reach this hub: the provision timeout (with the console's last lines
        // if the guest printed any by then: under load, it may not have).
        let (hub, _) = vm_hub(
            "provision_timeout = \"120s\"\nagent_hub_addr = \"127.0.0.1:9\"",
            None,
        )
        .await;
        let reason = error_reason(&hub).await;
        assert!(
            reason.contains("the agent did not connect within 2m"),
            "{reason}"
        );
    };
    tokio::join!(expired, unreachable);
}

/// Creates a workspace, waits for it to leave PROVISIONING, checks it is in ERROR, deletes
/// it (nothing left) and returns the reason.
async fn error_reason(hub: &TestHub) -> String {
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    let failed = hub
        .wait_for(&id, BOOT, |w| w["status"] != "PROVISIONING")
        .await
        .unwrap();
    assert_eq!(failed["status"], "ERROR", "{failed}");
    let reason = failed["status_reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    eprintln!("ERROR reason: {reason}");
    delete(hub, &id).await;
    reason
}

/// The GCE disk (`images/build --gce`) boots on its own: BIOS, GRUB from the MBR, the
/// kernel and initrd from the ext4 partition, the root found by its label, systemd, and
/// cloud-init looking for its data source.
#[tokio::test]
async fn the_gce_disk_boots_through_its_own_boot_loader() {
    let image = image_dir();
    let archive = image.join("disk.raw.tar.gz");
    assert!(
        archive.exists(),
        "the test command builds the image with --gce"
    );
    let dir = tempfile::tempdir().unwrap();
    let untar = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(untar.success());
    let disk = dir.path().join("disk.raw");
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len() % (1 << 30),
        0,
        "GCE imports whole GiB"
    );
    // A NoCloud seed, so that cloud-init finds a data source and says so on the console.
    let seed = dir.path().join("seed.img");
    std::fs::write(dir.path().join("user-data"), "#cloud-config\n{}\n").unwrap();
    std::fs::write(dir.path().join("meta-data"), "instance-id: gce-disk-test\n").unwrap();
    let mkfs = std::process::Command::new("mkfs.vfat")
        .args(["-n", "CIDATA", "-C"])
        .arg(&seed)
        .arg("1024")
        .output()
        .unwrap();
    assert!(mkfs.status.success());
    let mcopy = std::process::Command::new("mcopy")
        .arg("-i")
        .arg(&seed)
        .arg(dir.path().join("user-data"))
        .arg(dir.path().join("meta-data"))
        .arg("::")
        .status()
        .unwrap();
    assert!(mcopy.success());
    let console = dir.path().join("console.log");
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-cpu", "max", "-m", "1024"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            disk.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            seed.display()
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BOOT;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(!text.contains("FAILED"), "a unit failed: {text}");
        if text.contains("Cloud-init v.") {
            break;
        }
        assert!(
            qemu.try_wait().unwrap().is_none(),
            "qemu exited; console: {text}"
        );
        assert!(
            Instant::now() < deadline,
            "no cloud-init on the console: {text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    qemu.kill().await.unwrap();
}
