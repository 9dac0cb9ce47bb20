//! The real Cloud Firestore emulator (Java, from the Google Cloud CLI's
//! `cloud-firestore-emulator` component), started for one test and stopped with it.
//! If it cannot start, the test fails: it never silently skips.

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal};
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the emulator's jar is looked for when `FIRESTORE_EMULATOR_JAR` is not set.
const JAR_PATHS: [&str; 2] = [
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar",
    "/usr/share/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar",
];

/// A running emulator; killed (with its process group) on drop.
#[derive(Debug)]
pub struct FirestoreEmulator {
    child: Child,
    /// `127.0.0.1:port`, for `FIRESTORE_EMULATOR_HOST` or the store's `emulator_host`.
    pub host: String,
}

fn jar() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("FIRESTORE_EMULATOR_JAR") {
        return Ok(PathBuf::from(path));
    }
    JAR_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context(
            "the Firestore emulator is not installed (apt-get install \
             google-cloud-cli-firestore-emulator, or set FIRESTORE_EMULATOR_JAR)",
        )
}

impl FirestoreEmulator {
    /// Starts an emulator on a free port and waits until it serves.
    pub fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let host = format!("127.0.0.1:{port}");
        let mut child = Command::new("java")
            .args(["-Duser.language=en", "-Xmx512m", "-cp"])
            .arg(jar()?)
            .args([
                "com.google.cloud.datastore.emulator.firestore.CloudFirestore",
                "start",
                "--host=127.0.0.1",
                &format!("--port={port}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("start the Firestore emulator (java)")?;
        let stdout = child.stdout.take().context("emulator stdout")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // Reads the banner, then keeps draining so the pipe never fills.
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Dev App Server is now running")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        let emulator = Self { child, host };
        match ready_rx.recv_timeout(Duration::from_secs(90)) {
            Ok(()) => Ok(emulator),
            Err(_) => bail!("the Firestore emulator did not start within 90 s"),
        }
    }
}

impl Drop for FirestoreEmulator {
    fn drop(&mut self) {
        if let Some(pid) = Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
        let _ = self.child.wait();
    }
}
