//! The qemu provider: each workspace is a local VM booted from the workspace image
//! (`images/build`), the way GCE boots it, so the image, cloud-init and the agent's path
//! into the hub are the real ones.
//!
//! Per workspace, under `root/<id>/`: a copy-on-write qcow2 overlay on the shared image, a
//! NoCloud seed (a small FAT disk labelled `CIDATA`) with the rendered user-data, the QMP
//! socket, the pid file and the serial console's log. User-mode networking: the guest
//! reaches the hub's loopback addresses through qemu's host alias [`HOST_ALIAS`]. The VM
//! runs in its own process (`-daemonize`) and outlives the hub like a cloud VM would.
//!
//! `stop` pauses the VM through QMP (memory, processes and terminals stay as they are),
//! `start` resumes it (or boots it again from its overlay when its process is gone),
//! `delete` quits it and removes the folder. `observe` asks QMP whether it runs.
//!
//! Acceleration: KVM only where it really works. On nested machines `/dev/kvm` can open
//! while guests die under it, so `accel = "auto"` boots the image's kernel under KVM once
//! (to its first user-space step) and falls back to TCG if that fails.

use super::{
    Created, Instance, InstanceSpec, Observed, Provider, ProviderError, Target, render_agent_config,
};
use async_trait::async_trait;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::OnceCell;
use uuid::Uuid;

/// How the guest reaches the host's loopback under qemu's user-mode networking.
pub const HOST_ALIAS: &str = "10.0.2.2";

/// `[qemu]` in the hub config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// The folder `images/build` printed: `workspace.qcow2`, `vmlinuz`, `initrd.img`.
    pub image_dir: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub qemu_binary: PathBuf,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            image_dir: PathBuf::new(),
            accel: Accel::Auto,
            memory_mib: 1024,
            cpus: 1,
            qemu_binary: "qemu-system-x86_64".into(),
        }
    }
}

/// Which accelerator boots guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe boot under it succeeds, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            _ => "tcg",
        }
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(format!("{what}: {e}"))
}

#[derive(Debug)]
pub struct QemuProvider {
    root: PathBuf,
    config: QemuConfig,
    accel: OnceCell<Accel>,
}

impl QemuProvider {
    /// Workspaces live under `root/<id>/`.
    pub fn new(root: PathBuf, config: QemuConfig) -> Result<Self, ProviderError> {
        let config = QemuConfig {
            image_dir: std::path::absolute(&config.image_dir)
                .map_err(|e| failed("resolve qemu.image_dir", e))?,
            ..config
        };
        for file in ["workspace.qcow2", "vmlinuz", "initrd.img"] {
            let path = config.image_dir.join(file);
            if !path.is_file() {
                return Err(ProviderError::Failed(format!(
                    "qemu.image_dir has no {file} (run images/build): {}",
                    path.display()
                )));
            }
        }
        Ok(Self {
            root,
            config,
            accel: OnceCell::new(),
        })
    }

    fn dir(&self, id: Uuid) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// The accelerator in use, probing once under `auto`.
    pub async fn accel(&self) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                match self.config.accel {
                    Accel::Auto => {
                        let accel = probe_kvm(&self.config).await;
                        tracing::info!(
                            accel = accel.as_str(),
                            "qemu acceleration chosen by a probe boot"
                        );
                        accel
                    }
                    fixed => fixed,
                }
            })
            .await
    }

    /// The VM's pid, if its process is alive and really this workspace's qemu.
    fn live_pid(&self, id: Uuid) -> Option<i32> {
        let dir = self.dir(id);
        let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let needle = format!("ws-{id}");
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == needle.as_bytes())
            .then_some(pid)
    }

    async fn boot(&self, id: Uuid) -> Result<(), ProviderError> {
        let dir = self.dir(id);
        let img = &self.config.image_dir;
        let accel = self.accel().await;
        let cpu = if accel == Accel::Kvm { "host" } else { "max" };
        let _ = std::fs::remove_file(dir.join("qmp.sock"));
        let out = tokio::process::Command::new(&self.config.qemu_binary)
            .args(["-name", &format!("ws-{id}")])
            .args(["-machine", &format!("q35,accel={}", accel.as_str())])
            .args(["-cpu", cpu, "-smp", &self.config.cpus.to_string()])
            .args(["-m", &self.config.memory_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(img.join("vmlinuz"))
            .arg("-initrd")
            .arg(img.join("initrd.img"))
            .args(["-append", "root=/dev/vda rw console=ttyS0 quiet"])
            .arg("-drive")
            .arg(drive(&dir.join("overlay.qcow2"), "qcow2", false))
            .arg("-drive")
            .arg(drive(&dir.join("seed.img"), "raw", true))
            .args([
                "-netdev",
                "user,id=net0",
                "-device",
                "virtio-net-pci,netdev=net0",
            ])
            .args(["-device", "virtio-rng-pci"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .arg("-pidfile")
            .arg(dir.join("qemu.pid"))
            .arg("-daemonize")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| failed(&format!("start {}", self.config.qemu_binary.display()), e))?;
        if !out.status.success() {
            return Err(ProviderError::Failed(format!(
                "qemu did not start: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    async fn qmp(&self, id: Uuid, command: &str) -> Result<serde_json::Value, ProviderError> {
        qmp(&self.dir(id).join("qmp.sock"), command).await
    }
}

/// A `-drive` argument; paths with commas are refused by qemu's option syntax, so they are
/// doubled as it requires.
fn drive(path: &Path, format: &str, readonly: bool) -> String {
    let file = path.display().to_string().replace(',', ",,");
    let ro = if readonly {
        ",readonly=on"
    } else {
        ",discard=unmap"
    };
    format!("file={file},if=virtio,format={format}{ro}")
}

/// Runs one QMP command and returns its `return` value.
async fn qmp(socket: &Path, command: &str) -> Result<serde_json::Value, ProviderError> {
    let talk = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| failed("connect to QMP", e))?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut reply = async || -> Result<serde_json::Value, ProviderError> {
            while let Some(line) = lines.next_line().await.map_err(|e| failed("read QMP", e))? {
                let msg: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| failed("parse QMP", e))?;
                if let Some(ret) = msg.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = msg.get("error") {
                    return Err(ProviderError::Failed(format!("qemu: {}", err["desc"])));
                }
                // The greeting and asynchronous events.
            }
            Err(ProviderError::Failed("qemu closed its QMP socket".into()))
        };
        for cmd in ["qmp_capabilities", command] {
            let line = format!("{}\n", serde_json::json!({ "execute": cmd }));
            write
                .write_all(line.as_bytes())
                .await
                .map_err(|e| failed("write QMP", e))?;
            let ret = reply().await?;
            if cmd == command {
                return Ok(ret);
            }
        }
        unreachable!()
    };
    tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .map_err(|_| ProviderError::Failed(format!("QMP {command}: no answer in 10 s")))?
}

/// Boots the image's kernel under KVM without a root disk: a working KVM gets to the
/// kernel's "cannot mount root" panic in a second or two; a broken one fails or stalls.
async fn probe_kvm(config: &QemuConfig) -> Accel {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    let run = tokio::process::Command::new(&config.qemu_binary)
        .args(["-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(config.image_dir.join("vmlinuz"))
        .args(["-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(20), run).await {
        Ok(Ok(out)) => {
            let console = String::from_utf8_lossy(&out.stdout);
            let errors = String::from_utf8_lossy(&out.stderr);
            if console.contains("Kernel panic") && !errors.contains("KVM internal error") {
                Accel::Kvm
            } else {
                tracing::info!(stderr = %errors.trim(), "KVM probe boot failed; using TCG");
                Accel::Tcg
            }
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, "KVM probe could not run qemu; using TCG");
            Accel::Tcg
        }
        Err(_) => {
            tracing::info!("KVM probe boot stalled; using TCG");
            Accel::Tcg
        }
    }
}

/// The NoCloud seed: a FAT image labelled CIDATA holding `user-data` and `meta-data`.
async fn write_seed(dir: &Path, user_data: &str, meta_data: &str) -> Result<(), ProviderError> {
    let seed_dir = dir.join("seed");
    std::fs::create_dir_all(&seed_dir).map_err(|e| failed("create seed folder", e))?;
    crate::base::fsutil::write_private(&seed_dir.join("user-data"), user_data.as_bytes())
        .map_err(|e| failed("write user-data", e))?;
    crate::base::fsutil::write_private(&seed_dir.join("meta-data"), meta_data.as_bytes())
        .map_err(|e| failed("write meta-data", e))?;
    let img = dir.join("seed.img");
    let _ = std::fs::remove_file(&img);
    run("mkfs.vfat", |c| {
        c.args(["-n", "CIDATA", "-C"]).arg(&img).arg("1024")
    })
    .await?;
    // Private before the token goes in.
    set_private(&img)?;
    run("mcopy", |c| {
        c.arg("-i")
            .arg(&img)
            .arg(seed_dir.join("user-data"))
            .arg(seed_dir.join("meta-data"))
            .arg("::")
    })
    .await?;
    // The enrollment token lives on in the seed (cloud-init reads it on every boot); the
    // plain copies go.
    std::fs::remove_dir_all(&seed_dir).map_err(|e| failed("remove seed folder", e))
}

fn set_private(path: &Path) -> Result<(), ProviderError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| failed("restrict seed", e))
}

async fn run(
    program: &str,
    args: impl FnOnce(&mut tokio::process::Command) -> &mut tokio::process::Command,
) -> Result<(), ProviderError> {
    let mut cmd = tokio::process::Command::new(program);
    args(&mut cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| failed(&format!("run {program}"), e))?;
    if !out.status.success() {
        return Err(ProviderError::Failed(format!(
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The hub address as the guest dials it: loopback becomes the host alias.
fn guest_hub_addr(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_loopback() || a.ip().is_unspecified() => {
            format!("{HOST_ALIAS}:{}", a.port())
        }
        _ => addr.to_owned(),
    }
}

#[async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn workspace_user(&self) -> Option<&'static str> {
        Some("dev")
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Created, ProviderError> {
        let id = spec.workspace_id;
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| failed("create workspace folder", e))?;
        let mut bootstrap = spec.bootstrap.clone();
        bootstrap.hub_addr = guest_hub_addr(&bootstrap.hub_addr);
        let user_data = crate::provider::cloudinit::render(&render_agent_config(&bootstrap)?)
            .map_err(|e| failed("render user-data", e))?;
        let meta_data = format!(
            "{}\n",
            serde_json::json!({ "instance-id": id.to_string(), "local-hostname": spec.instance_name })
        );
        write_seed(&dir, &user_data, &meta_data).await?;
        let overlay = dir.join("overlay.qcow2");
        if !overlay.exists() {
            run("qemu-img", |c| {
                c.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(self.config.image_dir.join("workspace.qcow2"))
                    .arg(&overlay)
            })
            .await?;
        }
        if self.live_pid(id).is_none() {
            self.boot(id).await?;
        }
        Ok(Created::default())
    }

    async fn start(&self, target: &Target) -> Result<(), ProviderError> {
        let id = target.workspace_id;
        if !self.dir(id).join("overlay.qcow2").exists() {
            return Err(ProviderError::NotFound);
        }
        match self.live_pid(id) {
            Some(_) => self.qmp(id, "cont").await.map(drop),
            None => self.boot(id).await,
        }
    }

    async fn stop(&self, target: &Target) -> Result<(), ProviderError> {
        let id = target.workspace_id;
        match self.live_pid(id) {
            Some(_) => self.qmp(id, "stop").await.map(drop),
            None if self.dir(id).exists() => Ok(()),
            None => Err(ProviderError::NotFound),
        }
    }

    async fn delete(&self, target: &Target) -> Result<(), ProviderError> {
        let id = target.workspace_id;
        if let Some(pid) = self.live_pid(id) {
            if self.qmp(id, "quit").await.is_err() {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid).ok_or_else(|| failed("pid", pid))?,
                    rustix::process::Signal::KILL,
                );
            }
            // qemu exits once it has closed its disks.
            for _ in 0..100 {
                if self.live_pid(id).is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if self.live_pid(id).is_some() {
                return Err(failed("delete", "qemu did not exit"));
            }
        }
        match std::fs::remove_dir_all(self.dir(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failed("remove workspace folder", e)),
        }
    }

    async fn observe(&self, target: &Target) -> Result<Observed, ProviderError> {
        let id = target.workspace_id;
        if self.live_pid(id).is_none() {
            return Ok(if self.dir(id).exists() {
                Observed::Stopped
            } else {
                Observed::Missing
            });
        }
        let status = self.qmp(id, "query-status").await?;
        Ok(match status["status"].as_str() {
            Some("paused" | "suspended") => Observed::Suspended,
            Some("shutdown" | "guest-panicked" | "internal-error") => Observed::Stopped,
            _ => Observed::Running,
        })
    }

    async fn boot_log(&self, target: &Target) -> Option<String> {
        let log = tokio::fs::read(self.dir(target.workspace_id).join("console.log"))
            .await
            .ok()?;
        Some(super::log_tail(&String::from_utf8_lossy(&log), 4))
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::new();
        for target in super::workspace_folders(&self.root)? {
            let observed = self.observe(&target).await?;
            out.push(Instance { target, observed });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hub_addresses_become_the_host_alias() {
        assert_eq!(guest_hub_addr("127.0.0.1:7443"), "10.0.2.2:7443");
        assert_eq!(guest_hub_addr("[::1]:7443"), "10.0.2.2:7443");
        assert_eq!(guest_hub_addr("0.0.0.0:7443"), "10.0.2.2:7443");
        assert_eq!(
            guest_hub_addr("hub.example.com:7443"),
            "hub.example.com:7443"
        );
        assert_eq!(guest_hub_addr("192.0.2.7:7443"), "192.0.2.7:7443");
    }

    #[test]
    fn drive_paths_with_commas_are_escaped() {
        assert_eq!(
            drive(Path::new("/a,b/o.qcow2"), "qcow2", false),
            "file=/a,,b/o.qcow2,if=virtio,format=qcow2,discard=unmap"
        );
    }
}
