//! `switchboard`: the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use switchboard_server::{Config, Server};

#[derive(Parser)]
#[command(name = "switchboard", version, about = "A self-hosted real-time messaging server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML configuration file (every key can also be set by SWITCHBOARD_* variables).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Development mode: the server API needs no key. Never in production.
        #[arg(long)]
        dev: bool,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
        /// Seconds to wait for clients to leave after SIGTERM before exiting.
        #[arg(long, default_value_t = 10)]
        drain_secs: u64,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (with SWITCHBOARD_* overrides applied) and explain
    /// any error with its key path.
    Check { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("literal filter"));
    use tracing_subscriber::prelude::*;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Human => registry.with(tracing_subscriber::fmt::layer()).init(),
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json()).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config { command: ConfigCommand::Check { file } } => match Config::load(Some(&file), std::env::vars())
        {
            Ok(c) => {
                println!(
                    "{}: OK (listen {}, {} namespace(s) configured)",
                    file.display(),
                    c.listen,
                    c.namespaces.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config, listen, dev, log_format, drain_secs } => {
            init_logging(log_format);
            let mut cfg = match Config::load(config.as_deref(), std::env::vars()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if !dev && cfg.api.keys.is_empty() {
                eprintln!(
                    "error: no server API keys configured. Set api.keys in the config file (or \
                     SWITCHBOARD_API__KEYS=key1,key2), or run with --dev for local development."
                );
                return ExitCode::from(2);
            }
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(cfg, dev, Duration::from_secs(drain_secs))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(cfg: Config, dev: bool, drain: Duration) -> anyhow::Result<()> {
    let listener =
        switchboard_server::bind(cfg.listen).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    if dev {
        tracing::warn!("################################################################");
        tracing::warn!("#  DEVELOPMENT MODE (--dev): the server API at /api/* accepts   #");
        tracing::warn!("#  requests WITHOUT an API key. Never expose this server.       #");
        tracing::warn!("################################################################");
    }
    let server = Server::new(cfg, dev, listener).await?;
    tracing::info!("switchboard listening on http://{}", server.local_addr()?);
    server.run(switchboard_server::shutdown_signal(), drain).await?;
    tracing::info!("bye");
    Ok(())
}
