//! `workspace-hub`: the hub's command line.
//!
//! - `workspace-hub dev`: everything on localhost with no set-up (state folder, CA, SQLite,
//!   process provider), printing what to open and a token to use;
//! - `workspace-hub serve --config hub.toml`: the same from a config file, with the hub's
//!   identity from the secret sources in `[identity]`;
//! - `workspace-hub identity init --out DIR`: makes a new identity to store as secrets;
//! - `workspace-hub token create --owner NAME`: mints an API token;
//! - `workspace-hub agent-update keygen --out DIR` and `agent-update sign`: the key pair
//!   agent updates are signed with, and a binary's signed release file.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hub::config::{Config, FileConfig, ProviderKind};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "workspace-hub", version, about = "Workspace Hub control plane")]
struct Cli {
    /// Log lines as text, or as JSON objects (one a line, with the request id of the HTTP
    /// request they belong to) for a log collector.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "WSH_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on localhost: SQLite, the process provider, a generated CA.
    Dev {
        #[arg(long, default_value = ".state", env = "WSH_STATE_DIR")]
        state_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7080")]
        http: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:7443")]
        quic: SocketAddr,
        /// Default: the config file's, else `process`.
        #[arg(long, value_enum)]
        provider: Option<ProviderKind>,
        /// Agent heartbeat interval (humantime, e.g. "2s").
        #[arg(long, value_parser = humantime::parse_duration)]
        heartbeat_interval: Option<std::time::Duration>,
        #[arg(long, value_parser = humantime::parse_duration)]
        heartbeat_timeout: Option<std::time::Duration>,
        /// How long an enrollment token stays valid.
        #[arg(long, value_parser = humantime::parse_duration)]
        enrollment_ttl: Option<std::time::Duration>,
        /// A config file for every other setting (the flags above override it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run from a config file (its `[identity]` is required).
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// The hub's identity (CA, ticket and reset keys).
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Sign agent binaries for `[agent_update]`.
    AgentUpdate {
        #[command(subcommand)]
        command: AgentUpdateCommand,
    },
}

#[derive(Subcommand)]
enum AgentUpdateCommand {
    /// Write a new signing key pair into a folder: `update-key` (keep it off the hub) and
    /// `update-key.pub` (for images: /etc/workspace-agent/update-keys). Never overwrites.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an agent binary: writes BINARY.release (what `[agent_update] release` names).
    /// The binary must say it is that version (`--version`).
    Sign {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        agent_version: String,
        binary: PathBuf,
    },
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Write a new identity into a folder (ca.pem, ca.key, ticket.key, reset.key; keys
    /// 0600), to store as secrets or files that `[identity]` names. Never overwrites.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a token for an owner; prints it once.
    Create {
        #[arg(long, default_value = ".state", env = "WSH_STATE_DIR")]
        state_dir: PathBuf,
        /// The hub's config file, for its store (`[store]`); the state folder still applies.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        owner: String,
        #[arg(long, default_value = "cli")]
        name: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,quinn=warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    runtime.block_on(async_main(cli))
}

async fn async_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dev {
            state_dir,
            http,
            quic,
            provider,
            heartbeat_interval,
            heartbeat_timeout,
            enrollment_ttl,
            config,
        } => {
            let base = match config {
                Some(path) => FileConfig::load(&path)?,
                None => FileConfig::default(),
            };
            let mut file = FileConfig {
                state_dir,
                http_addr: http,
                quic_addr: quic,
                provider: provider.unwrap_or(base.provider),
                ..base
            };
            if let Some(i) = heartbeat_interval {
                file.heartbeat_interval = i;
            }
            if let Some(t) = heartbeat_timeout {
                file.heartbeat_timeout = t;
            }
            if let Some(t) = enrollment_ttl {
                file.enrollment_ttl = t;
            }
            let config = Config::from_file(file)?;
            let token = dev_token(&config).await?;
            serve(config, move |hub, listening| {
                // The same session path as an identity provider's sign-in, for the local user.
                let link = hub::edge::session::login_link(hub, "dev");
                println!("workspace-hub dev is running");
                println!(
                    "  web UI   http://{}/login/once?code={link}  (one-time sign-in link, 15 min)",
                    listening.http
                );
                println!(
                    "  API      http://{}  (Authorization: Bearer <token>)",
                    listening.http
                );
                println!("  agents   quic://{} (UDP)", listening.quic);
                println!("  token    {token}");
            })
            .await
        }
        Command::Serve { config: path } => {
            let config = Config::from_file(FileConfig::load(&path)?)?;
            anyhow::ensure!(
                config.identity.is_some(),
                "{} has no [identity]: serve needs the hub's CA, ticket and reset keys from \
                 secret sources shared by every replica (make one with `workspace-hub identity \
                 init --out DIR`; `workspace-hub dev` generates its own)",
                path.display()
            );
            serve(config, |_, listening| {
                println!(
                    "workspace-hub listening: http://{} quic://{}",
                    listening.http, listening.quic
                );
            })
            .await
        }
        Command::Identity {
            command: IdentityCommand::Init { out },
        } => {
            hub::base::identity::Identity::generate_files(&out)?;
            println!(
                "new hub identity in {}: ca.pem, ca.key, ticket.key, reset.key",
                out.display()
            );
            Ok(())
        }
        Command::AgentUpdate {
            command: AgentUpdateCommand::Keygen { out },
        } => {
            hub::base::update_key::generate(&out)?;
            println!(
                "new agent-update key pair in {}: update-key (private), update-key.pub",
                out.display()
            );
            Ok(())
        }
        Command::AgentUpdate {
            command:
                AgentUpdateCommand::Sign {
                    key,
                    agent_version,
                    binary,
                },
        } => {
            let said = std::process::Command::new(&binary)
                .arg("--version")
                .output()
                .with_context(|| format!("run {} --version", binary.display()))?;
            let said = String::from_utf8_lossy(&said.stdout);
            anyhow::ensure!(
                said.starts_with(&format!("workspace-agent {agent_version} ")),
                "{} says {:?}, not version {agent_version}",
                binary.display(),
                said.trim()
            );
            let release = hub::base::update_key::sign(&key, &agent_version, &binary)?;
            let mut out = binary.into_os_string();
            out.push(".release");
            let out = PathBuf::from(out);
            hub::base::fsutil::write_atomic(&out, toml::to_string(&release)?.as_bytes(), 0o644)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    state_dir,
                    config,
                    owner,
                    name,
                },
        } => {
            let base = match config {
                Some(path) => FileConfig::load(&path)?,
                None => FileConfig::default(),
            };
            let config = Config::from_file(FileConfig { state_dir, ..base })?;
            let hub = hub::open_state(
                &config,
                config.quic_addr,
                config.http_addr,
                CancellationToken::new(),
            )
            .await?;
            let token =
                hub::domain::auth::mint_api_token(&hub, &owner, None, &name, None, None).await?;
            // An operator's action on the hub's machine: recorded as the hub's own.
            let mut entry = hub::domain::audit::entry("token.create");
            entry.actor = "system".into();
            entry.via = "hub-cli".into();
            entry.target = Some(format!("owner={owner}"));
            hub::domain::audit::record(&hub, entry).await;
            println!("{token}");
            Ok(())
        }
    }
}

/// The local user's token in dev mode: minted once, kept in the state folder (0600).
async fn dev_token(config: &Config) -> Result<String> {
    let path = config.state_dir.join("dev-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok(token.trim().to_owned());
    }
    let hub = hub::open_state(
        config,
        config.quic_addr,
        config.http_addr,
        CancellationToken::new(),
    )
    .await?;
    let token =
        hub::domain::auth::mint_api_token(&hub, "dev", None, "dev mode", None, None).await?;
    hub::base::fsutil::write_private(&path, token.as_bytes())?;
    Ok(token)
}

async fn serve(config: Config, banner: impl FnOnce(&hub::Hub, &hub::Listening)) -> Result<()> {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        signal.cancel();
    });
    hub::run(config, shutdown, banner).await
}
