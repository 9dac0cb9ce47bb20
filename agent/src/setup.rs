//! The workspace's setup beyond its checkout: the owner's SSH keys and dotfiles (from the
//! hub's [`Profile`]) and the repository's dev container (lifecycle commands, environment,
//! port labels). Everything runs in the background as the workspace user; progress is one
//! [`SetupReport`] the control session sends on every change.
//!
//! - Keys live in one marked block of `~/.ssh/authorized_keys`; the user's own lines stay.
//! - Dotfiles are cloned into `~/.dotfiles` and installed once (a marker in the agent's
//!   state folder), on the first boot that has them.
//! - `onCreateCommand`, `updateContentCommand` and `postCreateCommand` run once per
//!   checkout (a marker in the agent's state folder), `postStartCommand` once per agent
//!   start, `postAttachCommand` for every new terminal client; the output of all of them
//!   goes to `~/.local/state/wsh/setup.log`.

use crate::devcontainer::{self, Command, DevContainer, Lifecycle};
use protocol::control::{Profile, SetupReport, SetupStep, StepState};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

const KEYS_BEGIN: &str = "# >>> keys managed by Workspace Hub (edit them with `wsh ssh-keys`) >>>";
const KEYS_END: &str = "# <<< keys managed by Workspace Hub <<<";
/// Install scripts looked for in a dotfiles repository, in this order (as Codespaces does).
const INSTALL_SCRIPTS: [&str; 8] = [
    "install.sh",
    "install",
    "bootstrap.sh",
    "bootstrap",
    "script/bootstrap",
    "setup.sh",
    "setup",
    "script/setup",
];
/// How many of a failed command's last output lines its step shows.
const TAIL_LINES: usize = 5;

/// The setup of this workspace, shared by the control session (profile in, report out),
/// the terminals (environment, `postAttachCommand`) and exec (environment).
#[derive(Debug)]
pub struct Setup {
    report: watch::Sender<SetupReport>,
    /// The dev container's environment, as terminals and commands get it.
    env: Mutex<Vec<(String, Option<String>)>>,
    post_attach: Mutex<Option<(Lifecycle, PathBuf)>>,
    home: PathBuf,
    run_as: Option<String>,
    /// The workspace user's uid and gid when the agent runs as root for one (what it
    /// creates is given to that user).
    owner: Option<(u32, u32)>,
    state_dir: PathBuf,
    /// The profile applied last (keys are written again only when they change).
    profile: Mutex<Option<Profile>>,
    dotfiles_started: std::sync::atomic::AtomicBool,
    devcontainer_started: std::sync::atomic::AtomicBool,
}

impl Setup {
    pub fn new(home: PathBuf, run_as: Option<String>, state_dir: PathBuf) -> Self {
        let run_as = run_as.filter(|_| rustix::process::geteuid().is_root());
        Self {
            owner: run_as.as_deref().and_then(crate::user_ids),
            report: watch::Sender::new(SetupReport::default()),
            env: Mutex::default(),
            post_attach: Mutex::default(),
            home,
            run_as,
            state_dir,
            profile: Mutex::default(),
            dotfiles_started: false.into(),
            devcontainer_started: false.into(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<SetupReport> {
        self.report.subscribe()
    }

    /// Environment for terminals and commands: the dev container's, set or unset.
    pub fn env(&self) -> Vec<(String, Option<String>)> {
        lock(&self.env).clone()
    }

    /// The hub sent the owner's profile: keys now, dotfiles once.
    pub fn profile(self: &Arc<Self>, profile: Profile) {
        let mut last = lock(&self.profile);
        let keys_changed = last
            .as_ref()
            .is_none_or(|p| p.authorized_keys != profile.authorized_keys);
        *last = Some(profile.clone());
        drop(last);
        if keys_changed {
            let this = self.clone();
            let keys = profile.authorized_keys.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = this.write_keys(&keys) {
                    tracing::warn!(error = %e, "authorized_keys");
                    this.step("ssh keys", StepState::Failed, e.to_string());
                }
            });
        }
        if let Some(dotfiles) = profile.dotfiles
            && !self
                .dotfiles_started
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tokio::spawn(self.clone().dotfiles(dotfiles));
        }
    }

    /// The repository is checked out at `path`: its dev container, once per agent start.
    pub fn checked_out(self: &Arc<Self>, path: PathBuf) {
        if !self
            .devcontainer_started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tokio::spawn(self.clone().devcontainer(path));
        }
    }

    /// A new terminal client attached: the dev container's `postAttachCommand`.
    pub fn attached(self: &Arc<Self>) {
        let Some((command, cwd)) = lock(&self.post_attach).clone() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            this.run_step("postAttachCommand", &command, &cwd).await;
        });
    }

    fn step(&self, name: &str, state: StepState, message: impl Into<String>) {
        let message: String = message.into().chars().take(1024).collect();
        self.report.send_modify(|r| {
            let full = r.steps.len() >= protocol::control::MAX_SETUP_ITEMS;
            match r.steps.iter_mut().find(|s| s.name == name) {
                Some(s) => {
                    s.state = state;
                    s.message = message;
                }
                None if !full => r.steps.push(SetupStep {
                    name: name.to_owned(),
                    state,
                    message,
                }),
                None => {}
            }
        });
    }

    /// Replaces the managed block of `~/.ssh/authorized_keys` (or removes it when `keys` is
    /// empty), atomically; lines outside it are kept. Keys that are not one line of a known
    /// type are left out.
    fn write_keys(&self, keys: &[String]) -> std::io::Result<()> {
        let dir = self.home.join(".ssh");
        let path = dir.join("authorized_keys");
        let keys: Vec<&str> = keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| valid_key_line(k))
            .take(protocol::control::MAX_AUTHORIZED_KEYS)
            .collect();
        if !dir.exists() {
            if keys.is_empty() {
                return Ok(());
            }
            std::fs::create_dir_all(&dir)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            self.own(&dir)?;
        }
        if std::fs::symlink_metadata(&dir)?.file_type().is_symlink() {
            return Err(std::io::Error::other(
                "~/.ssh is a symbolic link: not written",
            ));
        }
        let old = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() || !m.is_file() => {
                return Err(std::io::Error::other(
                    "~/.ssh/authorized_keys is not a plain file: not written",
                ));
            }
            Ok(_) => std::fs::read_to_string(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let new = with_keys(&old, &keys);
        if new == old {
            return Ok(());
        }
        let tmp = dir.join(".authorized_keys.wsh-tmp");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(new.as_bytes())?;
            f.sync_all()?;
        }
        self.own(&tmp)?;
        std::fs::rename(&tmp, &path)?;
        tracing::info!(keys = keys.len(), "authorized_keys updated");
        Ok(())
    }

    /// Gives `path` to the workspace user when the agent runs as root for one.
    fn own(&self, path: &Path) -> std::io::Result<()> {
        let Some((uid, gid)) = self.owner else {
            return Ok(());
        };
        rustix::fs::chown(
            path,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(std::io::Error::from)
    }

    async fn dotfiles(self: Arc<Self>, dotfiles: protocol::control::Dotfiles) {
        const STEP: &str = "dotfiles";
        let marker = self.state_dir.join("dotfiles.done");
        if marker.exists() {
            self.step(STEP, StepState::Skipped, "installed on an earlier boot");
            return;
        }
        let clone = self.home.join(".dotfiles");
        if !clone.join(".git").exists() {
            self.step(
                STEP,
                StepState::Running,
                format!("cloning {}", dotfiles.repo),
            );
            let git = Command::Exec(
                ["git", "clone", "--depth", "1", "--", &dotfiles.repo]
                    .into_iter()
                    .map(str::to_owned)
                    .chain([clone.display().to_string()])
                    .collect(),
            );
            if let Err(why) = self.run(&git, &self.home, STEP).await {
                self.step(STEP, StepState::Failed, format!("git clone: {why}"));
                return;
            }
        }
        let install = match &dotfiles.install_command {
            Some(command) => Some(Command::Shell(command.clone())),
            None => INSTALL_SCRIPTS
                .iter()
                .map(|s| clone.join(s))
                .find(|p| p.is_file())
                .map(|p| Command::Exec(vec!["/bin/sh".into(), p.display().to_string()])),
        };
        let outcome = match install {
            Some(command) => {
                self.step(STEP, StepState::Running, "running the install script");
                self.run(&command, &clone, STEP)
                    .await
                    .map(|()| "installed".to_owned())
            }
            None => self.link_dotfiles(&clone).map_err(|e| e.to_string()),
        };
        match outcome {
            Ok(message) => {
                let _ = std::fs::write(&marker, dotfiles.repo.as_bytes());
                self.step(STEP, StepState::Done, message);
            }
            Err(why) => self.step(STEP, StepState::Failed, why),
        }
    }

    /// No install script: links each dotfile of the clone into the home folder, keeping
    /// files that are there already.
    fn link_dotfiles(&self, clone: &Path) -> std::io::Result<String> {
        let (mut linked, mut kept) = (0, 0);
        for entry in std::fs::read_dir(clone)? {
            let name = entry?.file_name();
            let s = name.to_string_lossy();
            if !s.starts_with('.') || s == ".git" || s == ".github" {
                continue;
            }
            let target = self.home.join(&name);
            if std::fs::symlink_metadata(&target).is_ok() {
                kept += 1;
                continue;
            }
            std::os::unix::fs::symlink(clone.join(&name), &target)?;
            if let Some((uid, gid)) = self.owner {
                let _ = rustix::fs::chownat(
                    rustix::fs::CWD,
                    &target,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                );
            }
            linked += 1;
        }
        Ok(format!(
            "no install script: linked {linked} dotfiles into the home folder, kept {kept} already there"
        ))
    }

    async fn devcontainer(self: Arc<Self>, repo: PathBuf) {
        const STEP: &str = "devcontainer.json";
        let Some(file) = [".devcontainer/devcontainer.json", ".devcontainer.json"]
            .iter()
            .map(|f| repo.join(f))
            .find(|p| p.is_file())
        else {
            return;
        };
        let text = match std::fs::read(&file) {
            Ok(bytes) if bytes.len() <= devcontainer::MAX_FILE => {
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Ok(_) => {
                self.step(STEP, StepState::Failed, "larger than 1 MiB");
                return;
            }
            Err(e) => {
                self.step(STEP, StepState::Failed, e.to_string());
                return;
            }
        };
        let folder = repo.display().to_string();
        let dc: DevContainer =
            match devcontainer::parse(&text, &folder, &|name| std::env::var(name).ok()) {
                Ok(dc) => dc,
                Err(why) => {
                    self.step(
                        STEP,
                        StepState::Failed,
                        format!("{}: {why}", file.display()),
                    );
                    return;
                }
            };
        self.step(STEP, StepState::Done, format!("read {}", file.display()));
        *lock(&self.env) = dc.env.clone();
        *lock(&self.post_attach) = dc
            .commands
            .get("postAttachCommand")
            .cloned()
            .map(|c| (c, repo.clone()));
        self.report.send_modify(|r| {
            r.port_labels = dc.port_labels.clone();
            r.not_applied = dc.not_applied.clone();
        });
        // Everything that will run shows as pending first.
        for name in &devcontainer::LIFECYCLE[..4] {
            if dc.commands.contains_key(name) {
                self.step(name, StepState::Pending, "");
            }
        }
        let marker = self.state_dir.join("devcontainer.created");
        let created_here = std::fs::read_to_string(&marker).is_ok_and(|p| p == folder);
        for name in &devcontainer::LIFECYCLE[..3] {
            let Some(command) = dc.commands.get(name) else {
                continue;
            };
            if created_here {
                self.step(name, StepState::Skipped, "ran on an earlier start");
            } else if !self.run_step(name, command, &repo).await {
                // Later steps depend on earlier ones, as in the dev container CLI.
                for later in devcontainer::LIFECYCLE[..4]
                    .iter()
                    .skip_while(|n| *n != name)
                    .skip(1)
                    .filter(|n| dc.commands.contains_key(*n))
                {
                    self.step(later, StepState::Skipped, format!("{name} failed"));
                }
                return;
            }
        }
        let _ = std::fs::write(&marker, &folder);
        if let Some(command) = dc.commands.get("postStartCommand") {
            self.run_step("postStartCommand", command, &repo).await;
        }
    }

    /// Runs a lifecycle command as step `name` (the named commands of the object form at
    /// the same time); true when it succeeded.
    async fn run_step(self: &Arc<Self>, name: &str, lifecycle: &Lifecycle, cwd: &Path) -> bool {
        self.step(name, StepState::Running, "");
        let mut runs = tokio::task::JoinSet::new();
        for (label, command) in lifecycle.0.clone() {
            let (this, cwd) = (self.clone(), cwd.to_owned());
            let tag = match &label {
                Some(label) => format!("{name}.{label}"),
                None => name.to_owned(),
            };
            runs.spawn(async move {
                this.run(&command, &cwd, &tag)
                    .await
                    .map_err(|e| match label {
                        Some(label) => format!("{label}: {e}"),
                        None => e,
                    })
            });
        }
        let mut failures = Vec::new();
        while let Some(result) = runs.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(why)) => failures.push(why),
                Err(e) => failures.push(e.to_string()),
            }
        }
        if failures.is_empty() {
            self.step(name, StepState::Done, "");
            true
        } else {
            tracing::warn!(step = name, "setup command failed");
            self.step(name, StepState::Failed, failures.join("; "));
            false
        }
    }

    /// Runs one command as the workspace user in `cwd` with the dev container's
    /// environment; its output goes to the setup log. The error names the exit status and
    /// the last lines of output.
    async fn run(&self, command: &Command, cwd: &Path, tag: &str) -> Result<(), String> {
        let argv: Vec<String> = match command {
            Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
            Command::Exec(argv) => argv.clone(),
        };
        let mut full = crate::as_user_prefix(self.run_as.as_deref());
        full.extend(argv);
        let mut cmd = tokio::process::Command::new(&full[0]);
        cmd.args(&full[1..])
            .current_dir(cwd)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in self.env() {
            match value {
                Some(v) => cmd.env(name, v),
                None => cmd.env_remove(name),
            };
        }
        let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", full[0]))?;
        let log = self.log();
        let tail = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let pump = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
            let (log, tail, tag) = (log.clone(), tail.clone(), tag.to_owned());
            async move {
                let Some(pipe) = pipe else { return };
                let mut lines = tokio::io::BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(log) = &log {
                        let _ = writeln!(lock(log), "[{tag}] {line}");
                    }
                    let mut tail = lock(&tail);
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line.chars().take(200).collect::<String>());
                }
            }
        };
        let stdout = child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
        let stderr = child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
        let (status, (), ()) = tokio::join!(child.wait(), pump(stdout), pump(stderr));
        let status = status.map_err(|e| e.to_string())?;
        if status.success() {
            return Ok(());
        }
        let tail: Vec<String> = lock(&tail).iter().cloned().collect();
        Err(if tail.is_empty() {
            format!("{status}")
        } else {
            format!("{status}: {}", tail.join(" | "))
        })
    }

    /// The setup log, `~/.local/state/wsh/setup.log` (the user's), opened to append.
    fn log(&self) -> Option<Arc<Mutex<std::fs::File>>> {
        let dir = self.home.join(".local/state/wsh");
        let path = dir.join("setup.log");
        if !dir.exists() {
            std::fs::create_dir_all(&dir).ok()?;
            for d in [
                self.home.join(".local"),
                self.home.join(".local/state"),
                dir,
            ] {
                let _ = self.own(&d);
            }
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .ok()?;
        let _ = self.own(&path);
        Some(Arc::new(Mutex::new(file)))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One OpenSSH public key line of a known type, printable ASCII, at most 16 KiB.
pub fn valid_key_line(line: &str) -> bool {
    line.len() <= 16 * 1024
        && line.bytes().all(|b| (0x20..0x7f).contains(&b))
        && line
            .split_whitespace()
            .next()
            .is_some_and(|t| protocol::control::KEY_TYPES.contains(&t))
        && line.split_whitespace().nth(1).is_some()
}

/// `old` with its managed block replaced by one holding `keys` (none: no block).
fn with_keys(old: &str, keys: &[&str]) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in old.lines() {
        match line.trim() {
            l if l == KEYS_BEGIN => inside = true,
            l if l == KEYS_END => inside = false,
            _ if inside => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !keys.is_empty() {
        out.push_str(KEYS_BEGIN);
        out.push('\n');
        for key in keys {
            out.push_str(key);
            out.push('\n');
        }
        out.push_str(KEYS_END);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_managed_block_is_replaced_and_the_users_lines_stay() {
        let mine = "ssh-ed25519 AAAAmine me@laptop\n";
        let a = with_keys(mine, &["ssh-ed25519 AAAAone one"]);
        assert!(a.starts_with(mine));
        assert!(a.contains("AAAAone"));
        let b = with_keys(&a, &["ssh-rsa AAAAtwo two"]);
        assert!(!b.contains("AAAAone") && b.contains("AAAAtwo") && b.starts_with(mine));
        assert_eq!(with_keys(&b, &[]), mine);
        assert_eq!(with_keys("", &[]), "");
    }

    #[test]
    fn key_lines_are_checked() {
        assert!(valid_key_line("ssh-ed25519 AAAAC3Nza me@host"));
        assert!(!valid_key_line("ssh-ed25519"));
        assert!(!valid_key_line("command=\"rm -rf /\" ssh-ed25519 AAAA"));
        assert!(!valid_key_line("ssh-ed25519 AAAA\nssh-rsa BBBB"));
        assert!(!valid_key_line(&format!(
            "ssh-rsa {}",
            "A".repeat(17 * 1024)
        )));
    }
}
