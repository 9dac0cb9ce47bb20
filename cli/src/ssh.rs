//! OpenSSH into workspaces: `wsh ssh` and `wsh config-ssh`. The workspace's sshd listens on
//! loopback inside it; `ssh` reaches it through `wsh proxy` (a resumable forward over the
//! agent's link, direct or relayed), so nothing in the workspace listens outside.
//!
//! `config-ssh` keeps one managed block in the OpenSSH config: written again in place on
//! every run (idempotent), taken out by `--remove` (reversible), everything around it kept
//! byte for byte. It names every workspace (`Host api.wsh ...`, which editors such as VS Code
//! Remote-SSH and JetBrains Gateway list) and `*.wsh` for the ones made later.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

const BEGIN: &str =
    "# --- BEGIN wsh config-ssh: managed by wsh, `wsh config-ssh --remove` takes it out ---";
const END: &str = "# --- END wsh config-ssh ---";

/// How ssh reaches a workspace's sshd.
pub struct Options {
    /// The hub's URL, for the `wsh proxy` that ssh runs.
    pub hub: String,
    /// The sshd's port inside the workspace.
    pub port: u16,
    pub user: Option<String>,
    pub identity_file: Option<PathBuf>,
    /// Workspace host keys, apart from the user's other known hosts (a new VM has a new key).
    pub known_hosts: PathBuf,
}

impl Options {
    /// `ProxyCommand` for ssh: this very `wsh`, the host name minus `.wsh` (`%n` is the name
    /// as typed; workspace names hold no dot).
    fn proxy_command(&self, host: &str) -> Result<String> {
        let wsh = std::env::current_exe().context("where is wsh")?;
        Ok(format!(
            "{} --hub {} proxy {host} {}",
            quote(&wsh.display().to_string()),
            quote(&self.hub),
            self.port
        ))
    }

    /// The options every entry shares, as `(keyword, value)`.
    fn settings(&self, host: &str) -> Result<Vec<(&'static str, String)>> {
        let mut out = vec![
            ("ProxyCommand", self.proxy_command(host)?),
            (
                "UserKnownHostsFile",
                quote(&self.known_hosts.display().to_string()),
            ),
            ("StrictHostKeyChecking", "accept-new".to_owned()),
        ];
        if let Some(user) = &self.user {
            out.push(("User", user.clone()));
        }
        if let Some(key) = &self.identity_file {
            out.push(("IdentityFile", quote(&key.display().to_string())));
        }
        Ok(out)
    }
}

/// Quotes a value for an OpenSSH config line (and escapes `%`, its token character).
fn quote(value: &str) -> String {
    let value = value.replace('%', "%%");
    if value.contains([' ', '\t', '"']) {
        format!("\"{}\"", value.replace('"', "\\\""))
    } else {
        value
    }
}

/// The managed block for workspaces `names`.
pub fn block(options: &Options, names: &[String]) -> Result<String> {
    let hosts: Vec<String> = names
        .iter()
        .map(|n| format!("{n}.wsh"))
        .chain(["*.wsh".to_owned()])
        .collect();
    let mut out = format!("{BEGIN}\nHost {}\n", hosts.join(" "));
    for (key, value) in options.settings("%n")? {
        out.push_str(&format!("  {key} {value}\n"));
    }
    out.push_str(END);
    out.push('\n');
    Ok(out)
}

/// `text` with its managed block replaced by `block`, or taken out when `None`; a text
/// without one gets it at the top (the first match wins in OpenSSH, and `Host *` entries
/// further down must not shadow it).
pub fn update(text: &str, block: Option<&str>) -> String {
    let (before, after) = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => {
            let end = text[e..].find('\n').map_or(text.len(), |i| e + i + 1);
            (&text[..b], &text[end..])
        }
        _ => ("", text),
    };
    match block {
        Some(block) => format!("{before}{block}{after}"),
        None => format!("{before}{after}"),
    }
}

/// Writes a private file (0600, its folder 0700 if new), replaced in one rename: the ssh
/// config and `wsh login`'s token.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension("wsh-tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))
}

/// `ssh` logging in to `workspace` (then running `command`, if any) with the same settings
/// `config-ssh` writes; it takes this process's place. The `wsh proxy` it starts gets
/// `token` through its environment (never a file or an argument).
pub fn exec(
    options: &Options,
    workspace: &str,
    command: &[String],
    token: Option<&str>,
) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    let host = format!("{workspace}.wsh");
    let mut ssh = std::process::Command::new("ssh");
    if let Some(token) = token {
        ssh.env("WSH_TOKEN", token);
    }
    for (key, value) in options.settings(workspace)? {
        ssh.arg("-o").arg(format!("{key}={value}"));
    }
    ssh.arg("-o").arg(format!("HostKeyAlias={host}"));
    ssh.arg(&host).args(command);
    Err(ssh.exec()).context("run ssh (apt-get install openssh-client)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            hub: "https://hub.example.com".into(),
            port: 22,
            user: Some("dev".into()),
            identity_file: Some("/home/me/my keys/id".into()),
            known_hosts: "/home/me/.ssh/wsh_known_hosts".into(),
        }
    }

    #[test]
    fn the_block_goes_in_once_is_replaced_in_place_and_comes_out_cleanly() {
        let block = block(&options(), &["api".into(), "web".into()]).unwrap();
        assert!(block.contains("Host api.wsh web.wsh *.wsh\n"));
        assert!(block.contains("proxy %n 22\n"));
        assert!(block.contains("  IdentityFile \"/home/me/my keys/id\"\n"));
        assert!(block.contains("  User dev\n"));
        let mine = "Host work\n  HostName 10.0.0.1\n\nHost *\n  ServerAliveInterval 30\n";
        let once = update(mine, Some(&block));
        assert!(once.starts_with(BEGIN) && once.ends_with(mine), "{once}");
        // Again: the same text (idempotent); with another list, replaced where it was.
        assert_eq!(update(&once, Some(&block)), once);
        let fewer = super::block(&options(), &["api".into()]).unwrap();
        let twice = update(&once, Some(&fewer));
        assert_eq!(twice.matches(BEGIN).count(), 1);
        assert!(twice.contains("Host api.wsh *.wsh\n") && twice.ends_with(mine));
        // Removed: exactly what was there before.
        assert_eq!(update(&twice, None), mine);
        assert_eq!(update("", None), "");
        // A block somewhere in the middle stays there.
        let middle = format!("Host a\n  User x\n{block}Host b\n  User y\n");
        assert_eq!(
            update(&middle, Some(&fewer)),
            format!("Host a\n  User x\n{fewer}Host b\n  User y\n")
        );
    }

    #[test]
    fn values_are_quoted_for_openssh() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("/a b/c"), "\"/a b/c\"");
        assert_eq!(quote("100%"), "100%%");
    }
}
