//! Repository checkout on first boot: the hub sends [`Checkout`] after the agent connects;
//! the agent clones with `git` into the workspace folder (as the workspace user when the
//! agent is root) and reports [`CheckoutStatus`] as it goes. A token, if given, reaches git
//! only through the environment of that one process (never a file or the command line)
//! and is dropped when the clone ends. A repository already there counts as done, so a
//! restarted agent or a repeated request does not clone twice.

use protocol::control::{Checkout, CheckoutState, CheckoutStatus};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

/// The folder name for a repository URL: its last path segment without `.git`.
pub fn repo_dir_name(repo: &str) -> String {
    let last = repo
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or_default()
        .trim_end_matches(".git");
    let name: String = last
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() || name.starts_with('.') {
        "repo".to_owned()
    } else {
        name
    }
}

/// Where checkouts go: the workspace user's home when the agent is root, else the agent's
/// working folder (the workspace folder with the process provider).
pub fn workdir(run_as: Option<&str>) -> PathBuf {
    match run_as {
        Some(user) if rustix::process::geteuid().is_root() => PathBuf::from("/home").join(user),
        _ => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    }
}

fn status(state: CheckoutState, message: impl Into<String>, path: &Path) -> CheckoutStatus {
    CheckoutStatus {
        state,
        message: message.into(),
        path: path.display().to_string(),
    }
}

/// Runs one checkout, publishing its progress on `report`. Does nothing if one is already
/// running or done.
pub async fn run(
    request: Checkout,
    workdir: PathBuf,
    run_as: Option<String>,
    report: watch::Sender<Option<CheckoutStatus>>,
) {
    let busy = report
        .borrow()
        .as_ref()
        .is_some_and(|s| s.state != CheckoutState::Failed);
    if busy {
        return;
    }
    let path = workdir.join(repo_dir_name(&request.repo));
    if path.join(".git").exists() {
        report.send_replace(Some(status(
            CheckoutState::Done,
            "already checked out",
            &path,
        )));
        return;
    }
    report.send_replace(Some(status(
        CheckoutState::Cloning,
        "starting git clone",
        &path,
    )));
    let outcome = clone(&request, &path, run_as.as_deref(), &report).await;
    let done = match outcome {
        Ok(()) => status(CheckoutState::Done, "checked out", &path),
        Err(message) => {
            tracing::warn!(repo = %request.repo, %message, "checkout failed");
            status(CheckoutState::Failed, message, &path)
        }
    };
    report.send_replace(Some(done));
}

async fn clone(
    request: &Checkout,
    path: &Path,
    run_as: Option<&str>,
    report: &watch::Sender<Option<CheckoutStatus>>,
) -> Result<(), String> {
    let mut args = crate::as_user_prefix(run_as);
    args.extend(["git", "clone", "--progress"].map(str::to_owned));
    if let Some(branch) = &request.branch {
        args.extend([
            "--branch".to_owned(),
            branch.clone(),
            "--single-branch".to_owned(),
        ]);
    }
    args.extend([
        "--".to_owned(),
        request.repo.clone(),
        path.display().to_string(),
    ]);
    let mut cmd = tokio::process::Command::new(&args[0]);
    cmd.args(&args[1..])
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(token) = &request.token {
        // An HTTP header through git's environment config: not in argv, not on disk.
        use base64::Engine;
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Basic {basic}"),
            );
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot run git: {e}"))?;
    let stderr = child.stderr.take().ok_or("git stderr")?;
    // git separates progress updates with carriage returns; keep the last line.
    let mut lines = tokio::io::BufReader::new(stderr).split(b'\r');
    let mut last = String::new();
    // git's error is its `fatal:` line; what follows is advice.
    let mut fatal = None;
    let mut reported = std::time::Instant::now();
    while let Ok(Some(chunk)) = lines.next_segment().await {
        for line in String::from_utf8_lossy(&chunk).lines() {
            let line = line.trim();
            if !line.is_empty() {
                last = line.chars().take(300).collect();
            }
            if fatal.is_none() && (line.starts_with("fatal:") || line.starts_with("error:")) {
                fatal = Some(last.clone());
            }
        }
        if reported.elapsed() >= std::time::Duration::from_millis(500) {
            reported = std::time::Instant::now();
            report.send_replace(Some(status(CheckoutState::Cloning, last.clone(), path)));
        }
    }
    let exit = child.wait().await.map_err(|e| format!("git: {e}"))?;
    if exit.success() {
        Ok(())
    } else {
        Err(match fatal {
            Some(line) => line,
            None if last.is_empty() => format!("git clone failed ({exit})"),
            None => last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::repo_dir_name;

    #[test]
    fn folder_names_come_from_the_url() {
        assert_eq!(
            repo_dir_name("https://github.com/acme/widgets.git"),
            "widgets"
        );
        assert_eq!(repo_dir_name("git@github.com:acme/widgets.git"), "widgets");
        assert_eq!(repo_dir_name("file:///srv/git/tools/"), "tools");
        assert_eq!(repo_dir_name("https://example.com/../.."), "repo");
        assert_eq!(repo_dir_name("https://example.com/a b$c"), "abc");
    }
}
