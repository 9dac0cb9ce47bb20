//! Agent updates without new images (protocol 9+).
//!
//! The hub offers the agent binary of its own version ([`UpdateOffer`]). The agent takes an
//! offer only for a newer version whose signature one of the update keys its image trusts
//! verifies (`--update-keys`, never the TLS CA and never anything the hub sends), asks for
//! the binary once no exec, forward, sync or files stream would be cut
//! ([`UpdateRequest`]), and receives it on a stream of its own into its state folder
//! (`<state>/update/`). There it checks the length, the SHA-256 and the signature again,
//! runs the new binary's `--version` (it must start here and name the offered version),
//! and installs it by rename with its [`Release`] file beside it.
//!
//! Then the agent becomes the new binary: `exec` in place, so its PID, its children (the
//! terminals' processes) and the PTY masters it hands over stay; the terminals' rings and
//! screens travel in a memory file (`--resume-fd`), and clients re-attach at their offsets
//! as after any reconnect. The new process is on probation (the `pending` file) until the
//! hub welcomes it: if that takes longer than [`PROBATION`], it hands everything back to
//! the previous binary the same way and declines that version for [`RETRY_AFTER`]; if it
//! dies, the next start (systemd restarts the agent in images) finds `pending`, throws the
//! new binary away and never takes that version again. A start with no handover (a boot)
//! `exec`s the newest installed release that still verifies, so an update outlives a stop.

use crate::pty::Sessions;
use protocol::update::{
    AgentUpdateOpen, MAX_BINARY_LEN, Release, UpdateOffer, UpdateState, UpdateStatus, is_newer,
    parse_version, signed_message,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where images keep the update keys they trust.
pub const DEFAULT_KEYS: &str = "/etc/workspace-agent/update-keys";
/// How long a new binary has to be welcomed by the hub before it is rolled back.
pub const PROBATION: Duration = Duration::from_secs(60);
/// How long a version rolled back on probation is declined.
pub const RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How long the new binary's `--version` may take.
const SELF_CHECK: Duration = Duration::from_secs(10);
/// What `scripts/stamp-agent` appends to a binary: the version it reports from then on.
const STAMP: &[u8] = b"\nwsh-agent-version=";

/// The running agent's version: the one stamped at the end of its binary, if any, else
/// the package's.
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| stamp_of(&exe))
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
    })
}

/// The version stamped at the end of the binary at `path`.
fn stamp_of(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let tail_len = len.min(128);
    file.seek(std::io::SeekFrom::Start(len - tail_len)).ok()?;
    let mut tail = Vec::new();
    file.take(tail_len).read_to_end(&mut tail).ok()?;
    let tail = tail.strip_suffix(b"\n")?;
    let at = tail.windows(STAMP.len()).rposition(|w| w == STAMP)?;
    let version = std::str::from_utf8(&tail[at + STAMP.len()..]).ok()?;
    parse_version(version).map(|_| version.to_owned())
}

/// Ed25519 public keys an image trusts for agent binaries: one base64 key (32 bytes) per
/// line of the file; `#` starts a comment.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<[u8; 32]>);

impl TrustedKeys {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        use base64::Engine;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let key = base64::engine::general_purpose::STANDARD
                .decode(line)
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| format!("line {}: not a base64 Ed25519 public key", n + 1))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no key".into());
        }
        Ok(Self(keys))
    }

    /// Whether one of the keys signed this release.
    fn verify(&self, offer: &UpdateOffer) -> bool {
        let message = signed_message(&offer.version, offer.size, &offer.sha256);
        self.0.iter().any(|key| {
            aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, key)
                .verify(&message, &offer.signature)
                .is_ok()
        })
    }
}

/// What the control session tells the hub, or does, after a stream or a timer acted.
#[derive(Debug)]
pub enum Outcome {
    Status(UpdateStatus),
    /// Verified and installed: restart into it.
    Installed {
        path: PathBuf,
        version: String,
    },
}

/// A new binary on probation: what to go back to.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    version: String,
    previous: PathBuf,
}

/// This agent's updates: the keys, the folder, the offer being taken.
#[derive(Debug)]
pub struct Updates {
    keys: TrustedKeys,
    dir: PathBuf,
    /// The command line after the program, without `--resume-fd`.
    args: Vec<OsString>,
    offer: Mutex<Option<(UpdateOffer, bool)>>,
    outcome: Mutex<Option<Outcome>>,
    notify: tokio::sync::Notify,
    /// Set while this process is a new binary the hub has not welcomed yet.
    probation: Mutex<Option<Pending>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn status(version: &str, state: UpdateState, message: impl Into<String>) -> UpdateStatus {
    UpdateStatus {
        version: version.to_owned(),
        state,
        message: message.into(),
    }
}

impl Updates {
    /// Updates into `state_dir/update`, restarting with `args`.
    pub fn new(keys: TrustedKeys, state_dir: &Path, args: Vec<OsString>) -> Self {
        Self {
            keys,
            dir: state_dir.join("update"),
            args,
            offer: Mutex::default(),
            outcome: Mutex::default(),
            notify: tokio::sync::Notify::new(),
            probation: Mutex::default(),
        }
    }

    fn failed_path(&self) -> PathBuf {
        self.dir.join("failed")
    }

    fn pending_path(&self) -> PathBuf {
        self.dir.join("pending")
    }

    fn binary_path(&self, version: &str) -> PathBuf {
        self.dir.join(format!("workspace-agent-{version}"))
    }

    /// Versions not to take again, with until when (seconds since the epoch).
    fn failed(&self) -> BTreeMap<String, u64> {
        std::fs::read_to_string(self.failed_path())
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn mark_failed(&self, version: &str, until: u64) {
        let mut failed = self.failed();
        failed.insert(version.to_owned(), until);
        if let Ok(text) = toml::to_string(&failed) {
            let _ = write_atomic(&self.failed_path(), text.as_bytes(), 0o600);
        }
    }

    fn pending(&self) -> Option<Pending> {
        let text = std::fs::read_to_string(self.pending_path()).ok()?;
        toml::from_str(&text).ok()
    }

    /// Whether to take `offer`: why not, if not.
    pub fn consider(&self, offer: &UpdateOffer) -> Result<(), UpdateStatus> {
        let decline = |why: &str| Err(status(&offer.version, UpdateState::Declined, why));
        if !is_newer(&offer.version, version()) {
            return decline("not newer than the running agent");
        }
        if offer.size == 0 || offer.size > MAX_BINARY_LEN {
            return decline("size out of range");
        }
        if self
            .failed()
            .get(&offer.version)
            .is_some_and(|until| *until > unix_now())
        {
            return decline("this version failed here before");
        }
        if !self.keys.verify(offer) {
            return Err(status(
                &offer.version,
                UpdateState::Refused,
                "no trusted update key signed it",
            ));
        }
        *self.offer.lock().unwrap_or_else(|p| p.into_inner()) = Some((offer.clone(), false));
        Ok(())
    }

    /// The version to ask for now, once (none while none is taken).
    pub fn request(&self) -> Option<String> {
        let mut offer = self.offer.lock().unwrap_or_else(|p| p.into_inner());
        let (offer, asked) = offer.as_mut().filter(|(_, asked)| !*asked)?;
        *asked = true;
        Some(offer.version.clone())
    }

    /// An offer is taken and not asked for yet.
    pub fn waiting(&self) -> bool {
        self.offer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(_, asked)| !asked)
    }

    /// The version of the offer taken.
    pub fn offered_version(&self) -> Option<String> {
        self.offer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(o, _)| o.version.clone())
    }

    /// Forgets the offer being taken (the connection it came on ended).
    pub fn forget_offer(&self) {
        self.offer.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn report(&self, outcome: Outcome) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        self.notify.notify_one();
    }

    /// The next thing the control session has to say or do.
    pub async fn outcome(&self) -> Outcome {
        loop {
            if let Some(outcome) = self
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return outcome;
            }
            self.notify.notified().await;
        }
    }

    /// Receives the binary the hub sends after a request (`open` read off its stream, the
    /// rest in `recv` and `early`), and installs it if it checks out.
    pub async fn receive(&self, open: AgentUpdateOpen, recv: quinn::RecvStream, early: Vec<u8>) {
        let offer = self
            .offer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|(offer, _)| offer);
        let outcome = match offer {
            Some(offer) if offer.version == open.version && offer.size == open.size => {
                match self.install(&offer, recv, early).await {
                    Ok(path) => Outcome::Installed {
                        path,
                        version: offer.version,
                    },
                    Err(status) => Outcome::Status(status),
                }
            }
            _ => Outcome::Status(status(
                &open.version,
                UpdateState::Refused,
                "a binary nobody asked for",
            )),
        };
        if let Outcome::Status(s) = &outcome {
            tracing::warn!(version = %s.version, state = ?s.state, why = %s.message, "agent update not taken");
        }
        self.report(outcome);
    }

    async fn install(
        &self,
        offer: &UpdateOffer,
        mut recv: quinn::RecvStream,
        early: Vec<u8>,
    ) -> Result<PathBuf, UpdateStatus> {
        let refused = |why: String| status(&offer.version, UpdateState::Refused, why);
        std::fs::create_dir_all(&self.dir).map_err(|e| refused(format!("update folder: {e}")))?;
        let incoming = self.dir.join(format!(".incoming-{}", offer.version));
        let result = async {
            let mut file = tokio::fs::File::create(&incoming)
                .await
                .map_err(|e| refused(format!("write: {e}")))?;
            let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            let mut got = 0u64;
            let mut first = Some(early);
            loop {
                let chunk;
                let bytes: &[u8] = match first.take() {
                    Some(early) => {
                        chunk = early;
                        &chunk
                    }
                    None => match recv.read_chunk(256 * 1024, true).await {
                        Ok(Some(c)) => {
                            chunk = c.bytes.to_vec();
                            &chunk
                        }
                        Ok(None) => break,
                        Err(e) => return Err(refused(format!("cut off after {got} bytes: {e}"))),
                    },
                };
                got += bytes.len() as u64;
                if got > offer.size {
                    return Err(refused(format!(
                        "longer than the offered {} bytes",
                        offer.size
                    )));
                }
                hash.update(bytes);
                tokio::io::AsyncWriteExt::write_all(&mut file, bytes)
                    .await
                    .map_err(|e| refused(format!("write: {e}")))?;
            }
            if got != offer.size {
                return Err(refused(format!(
                    "{got} bytes of the offered {}",
                    offer.size
                )));
            }
            if hash.finish().as_ref() != offer.sha256 {
                return Err(refused("its SHA-256 is not the signed one".into()));
            }
            file.sync_all()
                .await
                .map_err(|e| refused(format!("write: {e}")))?;
            drop(file);
            set_mode(&incoming, 0o755).map_err(|e| refused(format!("mode: {e}")))?;
            self_check(&incoming, &offer.version).await.map_err(|why| {
                self.mark_failed(&offer.version, u64::MAX);
                status(&offer.version, UpdateState::Failed, why)
            })?;
            let release =
                toml::to_string(&Release::of(offer)).map_err(|e| refused(e.to_string()))?;
            let path = self.binary_path(&offer.version);
            write_atomic(&release_path(&path), release.as_bytes(), 0o600)
                .and_then(|()| std::fs::rename(&incoming, &path))
                .map_err(|e| refused(format!("install: {e}")))?;
            Ok(path)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&incoming);
        }
        result
    }

    /// Becomes the binary at `exe`, handing it the terminal sessions; returns only if that
    /// failed (the sessions then go on here). `probation`: the version `exe` is, to roll
    /// back from if it does not come up.
    pub fn restart_into(&self, exe: &Path, sessions: &Sessions, probation: Option<&str>) -> String {
        let previous = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => return format!("this binary's path: {e}"),
        };
        if let Some(version) = probation {
            let pending = Pending {
                version: version.to_owned(),
                previous,
            };
            let written = toml::to_string(&pending)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    write_atomic(&self.pending_path(), t.as_bytes(), 0o600)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = written {
                return format!("record the update: {e}");
            }
        }
        let why = match sessions.prepare_handover() {
            Ok(state) => {
                let why = match handover_file(&state) {
                    Ok(fd) => {
                        let err = std::process::Command::new(exe)
                            .args(&self.args)
                            .arg("--resume-fd")
                            .arg(std::os::fd::AsRawFd::as_raw_fd(&fd).to_string())
                            .exec();
                        format!("exec {}: {err}", exe.display())
                    }
                    Err(e) => format!("handover file: {e}"),
                };
                sessions.cancel_handover();
                why
            }
            Err(e) => format!("hand over the terminals: {e}"),
        };
        if probation.is_some() {
            let _ = std::fs::remove_file(self.pending_path());
        }
        why
    }

    /// At start: what the previous process left. `resumed`: this process was handed over
    /// to (`--resume-fd`). A new binary that died on probation is thrown away; a new one
    /// just started is put on probation. Returns a newer installed binary to become (a
    /// fresh start only).
    pub fn at_start(&self, resumed: bool) -> Option<(PathBuf, String)> {
        let pending = self.pending();
        match pending {
            Some(p) if resumed && p.version == version() => {
                tracing::info!(version = %p.version, "agent updated: on probation until the hub welcomes it");
                *self.probation.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                return None;
            }
            Some(p) => {
                tracing::error!(version = %p.version, "the updated agent did not come up: rolled back, not taken again");
                self.mark_failed(&p.version, u64::MAX);
                let dead = self.binary_path(&p.version);
                let _ = std::fs::remove_file(release_path(&dead));
                let _ = std::fs::remove_file(&dead);
                let _ = std::fs::remove_file(self.pending_path());
            }
            None => {}
        }
        if resumed {
            return None;
        }
        self.newest_installed()
    }

    /// The newest installed release newer than this binary that still verifies.
    fn newest_installed(&self) -> Option<(PathBuf, String)> {
        let failed = self.failed();
        let now = unix_now();
        let mut best: Option<(semver::Version, PathBuf, String)> = None;
        for entry in std::fs::read_dir(&self.dir).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(v) = name
                .strip_prefix("workspace-agent-")
                .filter(|v| !v.ends_with(".release"))
            else {
                continue;
            };
            let Some(parsed) = parse_version(v) else {
                continue;
            };
            if !is_newer(v, version())
                || failed.get(v).is_some_and(|until| *until > now)
                || best
                    .as_ref()
                    .is_some_and(|(b, ..)| parsed.cmp_precedence(b).is_le())
            {
                continue;
            }
            let path = entry.path();
            if self.verify_installed(&path, v) {
                best = Some((parsed, path, v.to_owned()));
            } else {
                tracing::warn!(path = %path.display(), "installed agent binary does not verify: ignored");
            }
        }
        best.map(|(_, path, v)| (path, v))
    }

    fn verify_installed(&self, path: &Path, version: &str) -> bool {
        let Some(offer) = std::fs::read_to_string(release_path(path))
            .ok()
            .and_then(|t| toml::from_str::<Release>(&t).ok())
            .and_then(|r| r.offer())
            .filter(|o| o.version == version)
        else {
            return false;
        };
        let Ok(mut file) = std::fs::File::open(path) else {
            return false;
        };
        let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut len = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hash.update(&buf[..n]);
                    len += n as u64;
                }
                Err(_) => return false,
            }
        }
        len == offer.size && hash.finish().as_ref() == offer.sha256 && self.keys.verify(&offer)
    }

    /// The version this process is on probation as, if it is.
    pub fn on_probation(&self) -> Option<String> {
        self.probation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|p| p.version.clone())
    }

    /// The hub welcomed this process: an update on probation is kept, and the binaries it
    /// no longer needs go.
    pub fn confirm(&self) {
        let Some(pending) = self
            .probation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let _ = std::fs::remove_file(self.pending_path());
        tracing::info!(version = %pending.version, "agent update confirmed");
        let current = std::env::current_exe().ok();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = current
                .as_ref()
                .is_some_and(|c| *c == path || release_path(c) == path);
            if name.starts_with("workspace-agent-") && !keep {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Probation ran out: back to the previous binary, this version declined for a while.
    /// Returns only if that failed.
    pub fn roll_back(&self, sessions: &Sessions) -> Option<String> {
        let pending = self
            .probation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        tracing::error!(version = %pending.version, previous = %pending.previous.display(), "the hub did not welcome the updated agent in time: rolling back");
        self.mark_failed(&pending.version, unix_now() + RETRY_AFTER.as_secs());
        let _ = std::fs::remove_file(self.pending_path());
        Some(self.restart_into(&pending.previous, sessions, None))
    }
}

fn release_path(binary: &Path) -> PathBuf {
    let mut name = binary.as_os_str().to_owned();
    name.push(".release");
    PathBuf::from(name)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, path)
}

/// The new binary must start here and say it is `version`.
async fn self_check(path: &Path, version: &str) -> Result<(), String> {
    let mut busy = 0;
    let output = loop {
        let run = tokio::process::Command::new(path)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(SELF_CHECK, run).await {
            Ok(Ok(output)) => break output,
            // A process forked meanwhile may hold the file open for writing until its own
            // exec (ETXTBSY): not the binary's fault.
            Ok(Err(e)) if e.raw_os_error() == Some(26) && busy < 5 => {
                busy += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => return Err(format!("it does not start: {e}")),
            Err(_) => return Err(format!("`--version` took over {SELF_CHECK:?}")),
        }
    };
    let said = String::from_utf8_lossy(&output.stdout);
    let expected = format!("workspace-agent {version} ");
    if output.status.success() && said.starts_with(&expected) {
        Ok(())
    } else {
        Err(format!(
            "`--version` said {:?} ({}), not {version}",
            said.trim(),
            output.status
        ))
    }
}

/// The handover state in a memory file that stays open across `exec`.
fn handover_file(state: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    let fd = rustix::fs::memfd_create("wsh-agent-handover", rustix::fs::MemfdFlags::empty())?;
    let mut file = std::fs::File::from(fd);
    file.write_all(state)?;
    Ok(file.into())
}

/// Reads the handover state from the descriptor `--resume-fd` named.
pub fn take_handover(fd: i32) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(crate::fds::claim_inherited(fd)?);
    file.seek(std::io::SeekFrom::Start(0))?;
    let mut state = Vec::new();
    file.read_to_end(&mut state)?;
    Ok(state)
}

/// What an agent without update keys answers every offer with.
pub fn no_keys(version: &str) -> UpdateStatus {
    status(
        version,
        UpdateState::Declined,
        "this agent trusts no update key (--update-keys)",
    )
}

/// What the control session tells the hub while an offer waits for streams to end.
pub fn waiting(version: &str, open: usize) -> UpdateStatus {
    status(
        version,
        UpdateState::Waiting,
        format!("{open} exec, forward, sync or files streams open; updating once they end"),
    )
}

/// What the control session tells the hub before it restarts.
pub fn restarting(version: &str) -> UpdateStatus {
    status(
        version,
        UpdateState::Restarting,
        "installed; restarting into it",
    )
}
