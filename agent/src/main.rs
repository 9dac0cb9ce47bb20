//! `workspace-agent --config PATH [--update-keys PATH]`: the in-VM agent. Exits 0 on
//! SIGTERM/SIGINT, 2 when it can never join the hub as configured (refused enrollment,
//! revoked certificate). `--update-keys` names the Ed25519 keys agent updates must be
//! signed with (default `/etc/workspace-agent/update-keys`; without them, updates are
//! declined). `--resume-fd` is how an agent update hands over to the new binary.

use agent::Agent;
use agent::config::AgentConfig;
use agent::update::Updates;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: workspace-agent --config PATH [--update-keys PATH]";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut args = std::env::args_os().skip(1);
    let mut config_path = None;
    let mut keys_path = None;
    let mut resume_fd = None;
    // The command line an update restarts with.
    let mut restart_args = Vec::new();
    while let Some(arg) = args.next() {
        match arg.to_str().unwrap_or("") {
            "--config" => {
                config_path = args.next().map(PathBuf::from);
                restart_args.push(arg);
                restart_args.extend(config_path.clone().map(Into::into));
            }
            "--update-keys" => {
                keys_path = args.next().map(PathBuf::from);
                restart_args.push(arg);
                restart_args.extend(keys_path.clone().map(Into::into));
            }
            "--resume-fd" => match args.next().and_then(|n| n.to_str()?.parse::<i32>().ok()) {
                Some(fd) => resume_fd = Some(fd),
                None => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(64);
                }
            },
            "--version" => {
                println!(
                    "workspace-agent {} (protocol {})",
                    agent::update::version(),
                    protocol::PROTOCOL_VERSION
                );
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(64);
            }
        }
    }
    let Some(config_path) = config_path else {
        eprintln!("{USAGE}");
        return ExitCode::from(64);
    };
    link::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let config = match AgentConfig::load(&config_path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "invalid config");
                return ExitCode::from(2);
            }
        };
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            signal.cancel();
        });
        let state_dir = config.state_dir.clone();
        let mut agent = match Agent::new(config) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "start agent");
                return ExitCode::FAILURE;
            }
        };
        // Terminals handed over by the agent this process replaced.
        let handover = resume_fd.map(agent::update::take_handover);
        let explicit = keys_path.is_some();
        let keys_path = keys_path.unwrap_or_else(|| agent::update::DEFAULT_KEYS.into());
        match agent::update::TrustedKeys::load(&keys_path) {
            Ok(keys) => {
                let updates = Arc::new(Updates::new(keys, &state_dir, restart_args));
                if let Some((path, version)) = updates.at_start(resume_fd.is_some()) {
                    tracing::info!(%version, "starting the installed agent update");
                    let why = updates.restart_into(&path, agent.sessions(), Some(&version));
                    tracing::error!(%version, %why, "installed agent update not started");
                }
                agent = agent.with_updates(updates);
            }
            Err(why) if explicit => tracing::error!(%why, "update keys: agent updates are off"),
            Err(_) => {
                tracing::info!(keys = %keys_path.display(), "no update keys: agent updates are off")
            }
        }
        match handover {
            Some(Ok(state)) => match agent.sessions().restore(&state) {
                Ok(n) => tracing::info!(sessions = n, "terminal sessions taken over"),
                Err(e) => tracing::error!(error = %e, "terminal sessions not taken over"),
            },
            Some(Err(e)) => tracing::error!(error = %e, "handover state unreadable"),
            None => {}
        }
        match agent.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "agent stopped");
                ExitCode::from(2)
            }
        }
    })
}
