//! `workspace-agent --config PATH`: the in-VM agent. Exits 0 on SIGTERM/SIGINT, 2 when it
//! can never join the hub as configured (refused enrollment, revoked certificate).

use agent::Agent;
use agent::config::AgentConfig;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: workspace-agent --config PATH";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut args = std::env::args().skip(1);
    let mut config_path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config_path = args.next().map(PathBuf::from),
            "--version" => {
                println!(
                    "workspace-agent {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
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
        let agent = match Agent::new(config) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "start agent");
                return ExitCode::FAILURE;
            }
        };
        match agent.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "agent stopped");
                ExitCode::from(2)
            }
        }
    })
}
