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
        /// Seconds to report not-ready (while still accepting) after SIGTERM, before
        /// telling clients to leave: time for the load balancer to notice.
        #[arg(long, default_value_t = 0)]
        drain_notice_secs: u64,
    },
    /// Mint a token for development: a connection token, or with --channel a
    /// subscription token. Signs with the configured algorithm ([auth]).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Channels the token grants (`channels` claim; names or prefixes ending in `*`).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Lifetime: 90s, 30m, 1h, 7d, or seconds.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Make a subscription token for this one private channel.
        #[arg(long)]
        channel: Option<String>,
        /// Public user info (JSON) shown in presence.
        #[arg(long)]
        info: Option<String>,
        /// Token id (`jti`), for revocation.
        #[arg(long)]
        jti: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Private key (PEM) for RS256/ES256; HS256 uses auth.hmac_secret.
        #[arg(long)]
        private_key: Option<PathBuf>,
    },
    /// Check this machine's limits for many connections and say how to raise them.
    Doctor {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Load generator: fan-out, idle connections, chat, slow consumers, reconnect storms —
    /// against this server or a peer (docs/benchmarks.md has every command behind a figure).
    Bench(switchboard_bench::BenchArgs),
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
        Command::Bench(args) => switchboard_bench::run(args),
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
        Command::Doctor { config, json } => {
            let max = match Config::load(config.as_deref(), std::env::vars()) {
                Ok(c) => c.limits.max_connections,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let r = switchboard_server::doctor::report(&switchboard_server::doctor::read(), max);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).expect("report serialises"));
            } else {
                print!("{}", switchboard_server::doctor::render(&r));
            }
            ExitCode::SUCCESS
        }
        Command::Token { user, channels, ttl, channel, info, jti, config, private_key } => {
            match mint(user, channels, &ttl, channel, info, jti, config, private_key) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve { config, listen, dev, log_format, drain_secs, drain_notice_secs } => {
            init_logging(log_format);
            // One log line per panic, with its location, in the server's log format. (A
            // panic in a connection's task closes that connection: see `guarded`.)
            std::panic::set_hook(Box::new(|info| tracing::error!("panic: {info}")));
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
            for var in &cfg.ignored_env {
                tracing::warn!(
                    "ignoring environment variable {var}: not configuration (its first segment names no \
                     top-level key; see switchboard.example.toml)"
                );
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
            match rt.block_on(serve(cfg, dev, Duration::from_secs(drain_secs), Duration::from_secs(drain_notice_secs)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Parses `90s`, `30m`, `1h`, `7d` or plain seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad ttl {s:?}: try 90s, 30m, 1h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad ttl unit in {s:?}: use s, m, h or d")),
    };
    Ok(n * mult)
}

#[allow(clippy::too_many_arguments)]
fn mint(
    user: String,
    channels: Vec<String>,
    ttl: &str,
    channel: Option<String>,
    info: Option<String>,
    jti: Option<String>,
    config: Option<PathBuf>,
    private_key: Option<PathBuf>,
) -> Result<String, String> {
    let cfg = Config::load(config.as_deref(), std::env::vars()).map_err(|e| e.to_string())?;
    let alg = cfg.auth.algorithm.clone().ok_or("no auth.algorithm configured (set [auth] in the config)")?;
    let key = match (alg.as_str(), private_key) {
        ("HS256", _) => cfg.auth.hmac_secret.clone().ok_or("auth.hmac_secret is not set")?,
        (_, Some(p)) => std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?,
        (a, None) => return Err(format!("{a} needs --private-key FILE")),
    };
    let info = info.map(|i| serde_json::from_str(&i).map_err(|e| format!("--info is not JSON: {e}"))).transpose()?;
    let claims = switchboard_server::auth::Claims {
        sub: user,
        exp: switchboard_server::auth::unix_now() + parse_ttl(ttl)?,
        channels: (!channels.is_empty()).then_some(channels),
        info,
        jti,
        channel,
        ..Default::default()
    };
    switchboard_server::auth::sign(&alg, &key, &claims)
}

async fn serve(cfg: Config, dev: bool, drain: Duration, notice: Duration) -> anyhow::Result<()> {
    let listener =
        switchboard_server::bind(cfg.listen).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let (before, after) = switchboard_server::doctor::raise_nofile();
    if after > before {
        tracing::info!("raised the open-files limit from {before} to {after}");
    }
    let max = cfg.limits.max_connections as u64;
    if max > 0 && after < max + switchboard_server::doctor::FD_RESERVE {
        tracing::warn!(
            "open-files limit {after} is below limits.max_connections {max}: connections will fail past ~{}; run `switchboard doctor`",
            after.saturating_sub(switchboard_server::doctor::FD_RESERVE)
        );
    } else if max == 0 {
        tracing::info!(
            "open-files limit {after}: about {} connections; `switchboard doctor` tells more",
            after.saturating_sub(switchboard_server::doctor::FD_RESERVE)
        );
    }
    if dev {
        tracing::warn!("################################################################");
        tracing::warn!("#  DEVELOPMENT MODE (--dev): the server API at /api/* accepts   #");
        tracing::warn!("#  requests WITHOUT an API key. Never expose this server.       #");
        tracing::warn!("################################################################");
    }
    let server = Server::new(cfg, dev, listener).await?.with_drain_notice(notice);
    tracing::info!("switchboard listening on http://{}", server.local_addr()?);
    server.run(switchboard_server::shutdown_signal(), drain).await?;
    tracing::info!("bye");
    Ok(())
}
