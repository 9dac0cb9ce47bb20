//! `wsh`: the Workspace Hub command line.
//!
//! Lifecycle goes through the hub's REST API (`list`, `create`, `show`, `status`, `stop`,
//! `start`, `delete`, `keep-awake`, `version`);
//! terminals and TCP go over direct QUIC (`attach`, `sessions`, `forward`, `proxy`), see
//! [`attach`] and [`forward`].

mod attach;
mod exec;
mod forward;
mod path;
mod ssh;
mod sync;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "wsh", version, about = "Workspace Hub client")]
struct Cli {
    /// The hub's HTTP address.
    #[arg(
        long,
        env = "WSH_HUB",
        default_value = "http://127.0.0.1:7080",
        global = true
    )]
    hub: String,
    /// API token (as printed by `workspace-hub dev` or `workspace-hub token create`);
    /// defaults to the one `wsh login` saved.
    #[arg(long, env = "WSH_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print raw JSON.
    #[arg(long, global = true)]
    json: bool,
    /// How terminals, forwards and sync reach the agent: `direct` (one hop, brokered by
    /// the hub), `relay` (through the hub), or `auto` (direct when a path is found, the
    /// relay meanwhile and when none is).
    #[arg(long, env = "WSH_PATH", value_enum, default_value_t, global = true)]
    path: path::Mode,
    /// Print each change of path (direct or relay, with its round-trip time) to stderr.
    #[arg(long, global = true)]
    show_path: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List your workspaces.
    List,
    /// Create a workspace.
    Create {
        /// Unique among your workspaces (default: the repository's name); every command
        /// takes it where it takes the id.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        zone: Option<String>,
        #[arg(long)]
        machine_type: Option<String>,
        #[arg(long)]
        image_tag: Option<String>,
        #[arg(long)]
        repo: Option<String>,
        #[arg(long)]
        branch: Option<String>,
        /// Wait until the workspace is READY.
        #[arg(long)]
        wait: bool,
    },
    /// Show one workspace.
    Show { id: String },
    /// Live status: what the provider sees, the agent, and why it counts as active or idle.
    Status { id: String },
    /// Suspend a workspace (it keeps its state).
    Stop { id: String },
    /// Resume a suspended workspace.
    Start { id: String },
    /// Destroy a workspace and its machine.
    Delete { id: String },
    /// Keep a workspace from being stopped as idle: for a while, or while a command runs
    /// (`wsh keep-awake <ws> -- make build`; exits with the command's status).
    KeepAwake {
        id: String,
        /// How long, without a command (e.g. `2h`); `0s` releases the lease.
        #[arg(long = "for", default_value = "1h", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Show the hub's version.
    Version,
    /// Sign in: approve a code in the hub's web UI (or pass `--token`); the token is kept in
    /// `~/.config/wsh/token` (mode 0600) for later commands.
    Login,
    /// Open a terminal in a workspace: a new session, or `--session NAME` to attach to the
    /// session by that name, creating it when none runs (`tmux new -A -s NAME`).
    Attach {
        workspace: String,
        #[arg(long)]
        session: Option<String>,
        /// The hub CA certificate (PEM); fetched from the hub when absent.
        #[arg(long, env = "WSH_CA")]
        ca_file: Option<std::path::PathBuf>,
        /// Command to run instead of the login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run a command in a workspace without a terminal: `wsh exec <ws> -- make test`.
    /// Stdin is passed in, stdout and stderr kept apart, and wsh exits with the command's
    /// status (128 + a signal's number, 124 if `--timeout` passed).
    Exec {
        workspace: String,
        /// Set an environment variable (NAME=VALUE; repeatable).
        #[arg(short = 'e', long = "env", value_parser = exec::env_pair)]
        env: Vec<(String, String)>,
        /// The working folder (absolute, or relative to the workspace folder).
        #[arg(long)]
        cwd: Option<String>,
        /// Kill the command after this long (e.g. `30s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Do not read stdin (the command's is empty), like `ssh -n`.
        #[arg(short = 'n', long)]
        no_stdin: bool,
        #[arg(long, env = "WSH_CA")]
        ca_file: Option<std::path::PathBuf>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List a workspace's terminal sessions.
    Sessions {
        workspace: String,
        #[arg(long, env = "WSH_CA")]
        ca_file: Option<std::path::PathBuf>,
    },
    /// Forward local ports to ports inside a workspace, like `ssh -L`:
    /// `wsh forward <ws> 3000 8080:80 0.0.0.0:2222:22`.
    Forward {
        workspace: String,
        /// `PORT`, `LOCAL:REMOTE` or `BIND_ADDR:LOCAL:REMOTE`.
        #[arg(required = true)]
        specs: Vec<forward::Spec>,
        #[arg(long, env = "WSH_CA")]
        ca_file: Option<std::path::PathBuf>,
    },
    /// Keep a local folder and a workspace folder the same, both ways, until interrupted:
    /// `wsh sync <ws> ./app` (the workspace folder defaults to the local folder's name,
    /// relative to the workspace folder). `--status` shows the running syncs.
    Sync {
        #[arg(required_unless_present = "status")]
        workspace: Option<String>,
        #[arg(required_unless_present = "status")]
        local: Option<std::path::PathBuf>,
        /// The workspace folder, relative to the workspace's home folder.
        remote: Option<String>,
        /// One reconciliation, then exit (status 1 if a change failed).
        #[arg(long)]
        once: bool,
        /// Show what running syncs are doing.
        #[arg(long)]
        status: bool,
        /// Also ignore these paths (gitignore syntax); `.gitignore` files apply anyway.
        #[arg(long)]
        ignore: Vec<String>,
        /// Sync `.git/` and `node_modules/` too.
        #[arg(long)]
        no_default_ignores: bool,
        /// Ask before a pass deletes more than this fraction of either side (and more
        /// than 10 entries).
        #[arg(long, default_value_t = 0.5)]
        max_delete: f64,
        /// Go ahead with large deletions without asking.
        #[arg(long)]
        yes: bool,
        #[arg(long, env = "WSH_CA")]
        ca_file: Option<std::path::PathBuf>,
    },
    /// Print the URL of a port's preview, good in a browser for an hour without signing
    /// in there (it carries a browser token for this workspace's previews alone).
    Open {
        workspace: String,
        port: u16,
        /// Open it in the browser too (`xdg-open`, or `$BROWSER`).
        #[arg(long, short)]
        browser: bool,
    },
    /// Log in to a workspace with OpenSSH (its sshd, on loopback inside it, reached through
    /// the agent): `wsh ssh api`, `wsh ssh api -- make test`.
    Ssh {
        workspace: String,
        #[command(flatten)]
        ssh: SshArgs,
        /// A command to run instead of a login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Write a managed block of `Host <name>.wsh` entries to your OpenSSH config, so that
    /// `ssh api.wsh`, `scp`, `rsync -e ssh`, VS Code Remote-SSH and JetBrains Gateway reach
    /// your workspaces; run it again after creating workspaces (it replaces its block in
    /// place), `--remove` takes the block out.
    ConfigSsh {
        #[command(flatten)]
        ssh: SshArgs,
        /// The OpenSSH config to edit.
        #[arg(long, default_value = "~/.ssh/config")]
        ssh_config: String,
        #[arg(long)]
        remove: bool,
    },
    /// Your SSH public keys: every workspace of yours keeps them in the workspace user's
    /// `~/.ssh/authorized_keys` (running ones at once), for `wsh ssh` and `ssh <name>.wsh`.
    SshKeys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Your dotfiles repository: cloned into `~/.dotfiles` and installed once in each of
    /// your workspaces (its `install.sh`, `bootstrap.sh`, `setup.sh`, ... or `--install`;
    /// with none, its dotfiles are linked into the home folder).
    Dotfiles {
        #[command(subcommand)]
        action: DotfilesAction,
    },
    /// Print a shell completion script: `wsh completions bash > /etc/bash_completion.d/wsh`,
    /// `wsh completions zsh > "${fpath[1]}/_wsh"`, `wsh completions fish >
    /// ~/.config/fish/completions/wsh.fish`.
    Completions { shell: clap_complete::Shell },
    /// Join stdin and stdout to a port inside a workspace, for OpenSSH:
    /// `ssh -o ProxyCommand='wsh proxy <ws> 22' user@workspace`.
    Proxy {
        workspace: String,
        port: u16,
        #[arg(long, env = "WSH_CA")]
        ca_file: Option<std::path::PathBuf>,
    },
}

#[derive(clap::Subcommand)]
enum KeysAction {
    /// The keys, with their fingerprints.
    List,
    /// Add a public key: a `.pub` file (`~/.ssh/id_ed25519.pub`), or `-` for stdin.
    Add { file: String },
    /// Remove a key by its fingerprint (`SHA256:...`).
    Remove { fingerprint: String },
}

#[derive(clap::Subcommand)]
enum DotfilesAction {
    /// The repository set now.
    Show,
    /// Set the repository (a git URL) and, optionally, the command that installs it.
    Set {
        repo: String,
        #[arg(long)]
        install: Option<String>,
    },
    /// Install no dotfiles in new workspaces.
    Clear,
}

/// A path segment with everything but unreserved characters percent-encoded.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How ssh logs in to a workspace's sshd.
#[derive(clap::Args)]
struct SshArgs {
    /// The sshd's port inside the workspace.
    #[arg(long, default_value_t = 22)]
    port: u16,
    /// The user to log in as (default: OpenSSH's).
    #[arg(long)]
    user: Option<String>,
    /// The private key to log in with (default: OpenSSH's).
    #[arg(long)]
    identity_file: Option<std::path::PathBuf>,
}

impl SshArgs {
    /// Workspace host keys go to `wsh_known_hosts` beside the config they belong to.
    fn options(self, hub: &str, config_dir: &std::path::Path) -> ssh::Options {
        ssh::Options {
            hub: hub.trim_end_matches('/').to_owned(),
            port: self.port,
            user: self.user,
            identity_file: self
                .identity_file
                .map(|p| std::path::absolute(&p).unwrap_or(p)),
            known_hosts: config_dir.join("wsh_known_hosts"),
        }
    }
}

/// `~/` at the start of a path, from `HOME`.
fn home_path(path: &str) -> Result<std::path::PathBuf> {
    match path.strip_prefix("~/") {
        Some(rest) => Ok(std::path::Path::new(
            &std::env::var_os("HOME").context("HOME is not set")?,
        )
        .join(rest)),
        None => Ok(path.into()),
    }
}

struct Client {
    http: reqwest::Client,
    hub: String,
    token: Option<String>,
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.hub.trim_end_matches('/'));
        let mut req = self.http.request(method, &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.with_context(|| format!("call {url}"))?;
        let status = res.status();
        let bytes = res.bytes().await.context("read response")?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).context("read response")?
        };
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("error");
            let message = body["error"]["message"].as_str().unwrap_or("");
            bail!("{status}: {code}: {message}");
        }
        Ok(body)
    }
}

/// A port's preview URL with a one-hour browser token (purpose `preview`): the hub trades
/// it for the preview's own origin and cookie, which lasts as long as the token.
async fn open_url(client: &Client, workspace: &str, port: u16) -> Result<String> {
    anyhow::ensure!(port != 0, "port must be 1 to 65535");
    let ticket = client
        .call(
            reqwest::Method::POST,
            &format!("/workspaces/{workspace}/tickets"),
            Some(json!({"purpose": "preview", "expires_in_secs": 3600})),
        )
        .await?;
    let (Some(id), Some(ticket)) = (ticket["workspace_id"].as_str(), ticket["ticket"].as_str())
    else {
        bail!("the hub sent no ticket");
    };
    // The ticket is bound to the id: the URL names the workspace by it, not by its name.
    Ok(format!(
        "{}/preview/{id}/{port}/?ticket={ticket}",
        client.hub.trim_end_matches('/')
    ))
}

/// Where `wsh login` keeps the token.
fn token_path() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config")))?;
    Some(base.join("wsh").join("token"))
}

fn saved_token() -> Option<String> {
    let token = std::fs::read_to_string(token_path()?).ok()?;
    Some(token.trim().to_owned()).filter(|t| !t.is_empty())
}

fn save_token(token: &str) -> Result<std::path::PathBuf> {
    let path = token_path().context("no HOME or XDG_CONFIG_HOME to keep the token in")?;
    ssh::write_private(&path, token.as_bytes())?;
    Ok(path)
}

/// The device-code sign-in: show a code, wait for its approval in the browser.
async fn device_login(client: &Client) -> Result<String> {
    let anonymous = Client {
        http: client.http.clone(),
        hub: client.hub.clone(),
        token: None,
    };
    let code = anonymous
        .call(reqwest::Method::POST, "/login/device", None)
        .await?;
    let user_code = code["user_code"].as_str().context("user_code")?;
    let uri = code["verification_uri"].as_str().unwrap_or("/");
    println!(
        "To sign in, open {}{uri} in a browser where you are signed in to the hub and approve code {user_code}",
        client.hub.trim_end_matches('/')
    );
    let interval = std::time::Duration::from_secs(code["interval"].as_u64().unwrap_or(1).max(1));
    let body = json!({ "device_code": code["device_code"] });
    loop {
        tokio::time::sleep(interval).await;
        match anonymous
            .call(
                reqwest::Method::POST,
                "/login/device/token",
                Some(body.clone()),
            )
            .await
        {
            Ok(done) => return Ok(done["token"].as_str().context("token")?.to_owned()),
            Err(e) if e.to_string().contains("authorization_pending") => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn keep_awake(client: &Client, id: &str, seconds: u64) -> Result<Value> {
    let path = format!("/workspaces/{id}/keep-awake");
    client
        .call(
            reqwest::Method::POST,
            &path,
            Some(json!({ "seconds": seconds })),
        )
        .await
}

/// Holds a short lease, renewed while `command` runs, released when it ends; returns the
/// command's exit code.
async fn keep_awake_while(client: &Client, id: &str, command: &[String]) -> Result<i32> {
    const LEASE_SECS: u64 = 300;
    const RENEW: std::time::Duration = std::time::Duration::from_secs(60);
    keep_awake(client, id, LEASE_SECS).await?;
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .spawn()
        .with_context(|| format!("run {}", command[0]))?;
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + RENEW, RENEW);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = renew.tick() => {
                // A failed renewal is reported, not fatal: the job goes on.
                if let Err(e) = keep_awake(client, id, LEASE_SECS).await {
                    eprintln!("wsh: renewing the keep-awake lease: {e:#}");
                }
            }
        }
    };
    if let Err(e) = keep_awake(client, id, 0).await {
        eprintln!("wsh: releasing the keep-awake lease: {e:#}");
    }
    Ok(status.code().unwrap_or(1))
}

fn print_workspaces(list: &[Value]) {
    println!(
        "{:<20} {:<38} {:<13} {:<10} CREATED",
        "NAME", "ID", "STATUS", "AGENT"
    );
    for ws in list {
        println!(
            "{:<20} {:<38} {:<13} {:<10} {}",
            ws["name"].as_str().filter(|n| !n.is_empty()).unwrap_or("-"),
            ws["id"].as_str().unwrap_or(""),
            ws["status"].as_str().unwrap_or(""),
            if ws["agent"].is_null() {
                "-"
            } else {
                "connected"
            },
            ws["created_at"].as_str().unwrap_or(""),
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let client = Client {
        http: reqwest::Client::new(),
        hub: cli.hub,
        token: cli.token.clone().or_else(saved_token),
    };
    let (mode, show_path) = (cli.path, cli.show_path);
    let paths = |workspace: &str, ca_file| {
        let hub = attach::Hub {
            http: client.http.clone(),
            url: client.hub.clone(),
            token: client.token.clone().unwrap_or_default(),
            ca_file,
        };
        path::Paths::new(hub, workspace, mode, show_path)
    };
    let output = match cli.command {
        Command::Attach {
            workspace,
            session,
            ca_file,
            command,
        } => {
            let paths = paths(&workspace, ca_file);
            let code = attach::attach(&paths, session, command).await;
            paths.close().await;
            std::process::exit(code?);
        }
        Command::Exec {
            workspace,
            env,
            cwd,
            timeout,
            no_stdin,
            ca_file,
            command,
        } => {
            let args = exec::Args {
                command,
                env,
                cwd,
                timeout,
                no_stdin,
            };
            let paths = paths(&workspace, ca_file);
            let code = exec::exec(&paths, args).await;
            paths.close().await;
            std::process::exit(code?);
        }
        Command::Forward {
            workspace,
            specs,
            ca_file,
        } => {
            let paths = paths(&workspace, ca_file);
            let done = forward::forward(paths.clone(), &specs).await;
            paths.close().await;
            return done;
        }
        Command::Sync { status: true, .. } => return sync::status(cli.json),
        Command::Sync {
            workspace,
            local,
            remote,
            once,
            ignore,
            no_default_ignores,
            max_delete,
            yes,
            ca_file,
            status: false,
        } => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&max_delete),
                "--max-delete is a fraction from 0 to 1"
            );
            let workspace = workspace.unwrap_or_default();
            let paths = paths(&workspace, ca_file);
            let args = sync::Args {
                workspace,
                local: local.unwrap_or_default(),
                remote,
                once,
                ignore,
                no_default_ignores,
                max_delete,
                yes,
            };
            let code = sync::sync(paths.clone(), args, cli.json).await;
            paths.close().await;
            std::process::exit(code?);
        }
        Command::Proxy {
            workspace,
            port,
            ca_file,
        } => {
            // As OpenSSH passes it (`%n` of `Host *.wsh`): names hold no dot.
            let workspace = workspace.strip_suffix(".wsh").unwrap_or(&workspace);
            let paths = paths(workspace, ca_file);
            let done = forward::proxy(&paths, port).await;
            paths.close().await;
            return done;
        }
        Command::Sessions { workspace, ca_file } => {
            let paths = paths(&workspace, ca_file);
            let list = attach::sessions(&paths).await;
            paths.close().await;
            let list = list?;
            if cli.json {
                let rows: Vec<Value> = list
                    .iter()
                    .map(|s| json!({"id": s.id, "command": s.command, "cols": s.cols, "rows": s.rows, "end_offset": s.end_offset, "exit": s.exit}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<20} {:<9} {:<10} {:<8} COMMAND",
                    "SESSION", "SIZE", "BYTES", "EXIT"
                );
                for s in list {
                    let exit = s.exit.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
                    println!(
                        "{:<20} {:<9} {:<10} {:<8} {}",
                        s.id,
                        format!("{}x{}", s.cols, s.rows),
                        s.end_offset,
                        exit,
                        s.command
                    );
                }
            }
            return Ok(());
        }
        Command::Open {
            workspace,
            port,
            browser,
        } => {
            let url = open_url(&client, &workspace, port).await?;
            println!("{url}");
            if browser {
                let opener = std::env::var("BROWSER").unwrap_or_else(|_| "xdg-open".into());
                std::process::Command::new(&opener)
                    .arg(&url)
                    .status()
                    .with_context(|| format!("run {opener}"))?;
            }
            return Ok(());
        }
        Command::Ssh {
            workspace,
            ssh,
            command,
        } => {
            let dir = home_path("~/.ssh")?;
            // Where the workspace's host key is kept (as OpenSSH makes it, private).
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
            let options = ssh.options(&client.hub, &dir);
            ssh::exec(&options, &workspace, &command, client.token.as_deref())?;
            return Ok(());
        }
        Command::ConfigSsh {
            ssh,
            ssh_config,
            remove,
        } => {
            let path = home_path(&ssh_config)?;
            let dir = path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .to_owned();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
            };
            let block = if remove {
                None
            } else {
                // Names are the caller's own (an admin lists everyone's workspaces).
                let me = client.call(reqwest::Method::GET, "/session", None).await?;
                let list = client
                    .call(reqwest::Method::GET, "/workspaces", None)
                    .await?;
                let names: Vec<String> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|ws| ws["owner_id"] == me["owner_id"])
                    .filter_map(|ws| ws["name"].as_str().filter(|n| !n.is_empty()))
                    .map(str::to_owned)
                    .collect();
                Some(ssh::block(&ssh.options(&client.hub, &dir), &names)?)
            };
            let updated = ssh::update(&text, block.as_deref());
            if updated != text {
                ssh::write_private(&path, updated.as_bytes())?;
            }
            eprintln!(
                "{} {}",
                if remove {
                    "Took the wsh block out of"
                } else {
                    "Wrote the wsh block to"
                },
                path.display()
            );
            return Ok(());
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "wsh", &mut std::io::stdout());
            return Ok(());
        }
        Command::List => {
            client
                .call(reqwest::Method::GET, "/workspaces", None)
                .await?
        }
        Command::Show { id } => {
            client
                .call(reqwest::Method::GET, &format!("/workspaces/{id}"), None)
                .await?
        }
        Command::Version => client.call(reqwest::Method::GET, "/version", None).await?,
        Command::Login => {
            let token = match cli.token {
                // A token given outright is checked, then kept.
                Some(token) => {
                    let check = Client {
                        token: Some(token.clone()),
                        ..client
                    };
                    check.call(reqwest::Method::GET, "/tokens", None).await?;
                    token
                }
                None => device_login(&client).await?,
            };
            let path = save_token(&token)?;
            eprintln!("Signed in; token saved in {}", path.display());
            return Ok(());
        }
        Command::Status { id } => {
            let path = format!("/workspaces/{id}/status");
            client.call(reqwest::Method::GET, &path, None).await?
        }
        Command::Stop { id } => {
            let path = format!("/workspaces/{id}/stop");
            client.call(reqwest::Method::POST, &path, None).await?
        }
        Command::Start { id } => {
            let path = format!("/workspaces/{id}/start");
            client.call(reqwest::Method::POST, &path, None).await?
        }
        Command::SshKeys { action } => match action {
            KeysAction::List => {
                let keys = client.call(reqwest::Method::GET, "/ssh-keys", None).await?;
                if cli.json {
                    keys
                } else {
                    println!("{:<52} KEY", "FINGERPRINT");
                    for k in keys.as_array().into_iter().flatten() {
                        let key = k["key"].as_str().unwrap_or_default();
                        let mut parts = key.splitn(3, ' ');
                        let (kind, comment) = (parts.next(), parts.nth(1));
                        println!(
                            "{:<52} {} {}",
                            k["id"].as_str().unwrap_or_default(),
                            kind.unwrap_or_default(),
                            comment.unwrap_or_default()
                        );
                    }
                    return Ok(());
                }
            }
            KeysAction::Add { file } => {
                let key = if file == "-" {
                    std::io::read_to_string(std::io::stdin()).context("read stdin")?
                } else {
                    let path = home_path(&file)?;
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("read {}", path.display()))?
                };
                let body = json!({ "key": key.trim() });
                client
                    .call(reqwest::Method::POST, "/ssh-keys", Some(body))
                    .await?
            }
            KeysAction::Remove { fingerprint } => {
                let path = format!("/ssh-keys/{}", path_segment(&fingerprint));
                client.call(reqwest::Method::DELETE, &path, None).await?;
                return Ok(());
            }
        },
        Command::Dotfiles { action } => match action {
            DotfilesAction::Show => client.call(reqwest::Method::GET, "/dotfiles", None).await?,
            DotfilesAction::Set { repo, install } => {
                let body = json!({ "repo": repo, "install_command": install });
                client
                    .call(reqwest::Method::PUT, "/dotfiles", Some(body))
                    .await?
            }
            DotfilesAction::Clear => {
                client
                    .call(reqwest::Method::DELETE, "/dotfiles", None)
                    .await?;
                return Ok(());
            }
        },
        Command::Delete { id } => {
            let path = format!("/workspaces/{id}");
            client.call(reqwest::Method::DELETE, &path, None).await?
        }
        Command::KeepAwake {
            id,
            duration,
            command,
        } => {
            if command.is_empty() {
                keep_awake(&client, &id, duration.as_secs()).await?
            } else {
                std::process::exit(keep_awake_while(&client, &id, &command).await?);
            }
        }
        Command::Create {
            name,
            zone,
            machine_type,
            image_tag,
            repo,
            branch,
            wait,
        } => {
            let mut body = json!({ "metadata": {} });
            for (key, value) in [
                ("name", name),
                ("zone", zone),
                ("machine_type", machine_type),
                ("image_tag", image_tag),
            ] {
                if let Some(v) = value {
                    body[key] = json!(v);
                }
            }
            for (key, value) in [("repo", repo), ("branch", branch)] {
                if let Some(v) = value {
                    body["metadata"][key] = json!(v);
                }
            }
            let mut ws = client
                .call(reqwest::Method::POST, "/workspaces", Some(body))
                .await?;
            let id = ws["id"].as_str().unwrap_or_default().to_owned();
            while wait && ws["status"] == "PROVISIONING" {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                ws = client
                    .call(reqwest::Method::GET, &format!("/workspaces/{id}"), None)
                    .await?;
            }
            ws
        }
    };
    match (&output, cli.json) {
        (Value::Array(list), false) => print_workspaces(list),
        (ws, false) if ws.get("instance_name").is_some() => {
            print_workspaces(std::slice::from_ref(ws))
        }
        (other, _) => println!("{}", serde_json::to_string_pretty(other)?),
    }
    Ok(())
}
