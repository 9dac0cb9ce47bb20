//! OpenSSH for tests and benchmarks: fresh host and client keys, an `sshd_config` on a free
//! loopback port, and the client options that go with it. The server can run locally
//! ([`Ssh::start_local`]) or inside a workspace ([`Ssh::sshd_command`]).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Ssh {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub sshd: PathBuf,
}

/// The local user name (ssh logs in as it).
pub fn user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

impl Ssh {
    /// Keys and config; fails if OpenSSH is not installed (`./scripts/test` installs it).
    pub fn prepare() -> Result<Self> {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("sshd not found: apt-get install openssh-server")?;
        let dir = tempfile::Builder::new().prefix("wsh-ssh-").tempdir()?;
        let d = dir.path();
        for key in ["host", "client"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .context("run ssh-keygen")?
                .success();
            if !ok {
                bail!("ssh-keygen failed");
            }
        }
        std::fs::copy(d.join("client.pub"), d.join("authorized_keys"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // Privilege separation needs this folder (systemd creates it on a normal boot).
        std::fs::create_dir_all("/run/sshd").ok();
        // Sessions get an empty home, as the test harness's agents do: the shell sshd runs
        // a command through reads no rc file of this machine's user (a `pyenv init` there
        // costs 150 ms per command), so both sides run the same thing.
        std::fs::create_dir(d.join("home"))?;
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PermitRootLogin yes\nPasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {}\n\
             Subsystem sftp internal-sftp\nSetEnv HOME={}\n",
            d.join("host").display(),
            d.join("authorized_keys").display(),
            d.join("sshd.pid").display(),
            d.join("home").display()
        );
        std::fs::write(d.join("sshd_config"), config)?;
        Ok(Self { dir, port, sshd })
    }

    /// The command line that runs the server in the foreground.
    pub fn sshd_command(&self) -> Vec<String> {
        vec![
            self.sshd.display().to_string(),
            "-D".into(),
            "-e".into(),
            "-f".into(),
            self.dir.path().join("sshd_config").display().to_string(),
        ]
    }

    /// Options for `ssh` and `scp` to log in with the client key, trusting any host key.
    pub fn client_options(&self) -> Vec<String> {
        [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([self.dir.path().join("client").display().to_string()])
        .collect()
    }

    /// Runs the server here and waits until it accepts connections.
    pub fn start_local(&self) -> Result<Child> {
        let command = self.sshd_command();
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start sshd")?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                bail!("sshd did not start listening");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }
}
