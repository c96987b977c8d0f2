//! `switchboard`: the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use switchboard_server::{Config, Server};

/// jemalloc: idle connections cost less memory on it than on the system's malloc (see the
/// `jemalloc` feature in Cargo.toml).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        /// Address to listen on, overriding `listen`: `127.0.0.1:8000`, `localhost:8000`,
        /// or `:8000` for every interface.
        #[arg(long, value_parser = parse_listen)]
        listen: Option<SocketAddr>,
        /// Development mode: the server API needs no key, any page may connect, tokens
        /// can be minted with `switchboard token --dev`, the demo is served. Never in
        /// production.
        #[arg(long)]
        dev: bool,
        /// Serve HTTPS (HTTP/2 and HTTP/1.1) on the listen address. With --dev and no
        /// [tls] configured, with the development certificate of `switchboard cert dev`
        /// (made if missing).
        #[arg(long)]
        tls: bool,
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
        /// Keep history durably in this directory (the memory broker's journal; sets
        /// `broker.data_dir`): a restart, even after kill -9, loses nothing.
        #[arg(long)]
        data_dir: Option<PathBuf>,
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
        /// TOML configuration file whose `[auth]` signs the token.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Sign with the development key `serve --dev` accepts when no `[auth]` is
        /// configured.
        #[arg(long)]
        dev: bool,
        /// Private key (PEM) for RS256/ES256; HS256 uses auth.hmac_secret.
        #[arg(long)]
        private_key: Option<PathBuf>,
    },
    /// Check this machine's limits for many connections and say how to raise them.
    Doctor {
        /// TOML configuration file (for `limits.max_connections`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Certificates: `cert dev` makes a local CA and a certificate for localhost.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
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
    /// Validate a configuration file (with SWITCHBOARD_* overrides applied) as `serve`
    /// would — every check it makes, its warnings too — and explain any error with its
    /// key path.
    Check {
        file: PathBuf,
        /// Check it for `serve --dev` (which needs no API keys).
        #[arg(long)]
        dev: bool,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Write a development CA and a certificate it signs for localhost, 127.0.0.1 and
    /// ::1 (what `serve --dev --tls` uses). Trust the CA in your browser or system to use
    /// https://localhost without warnings. Kept while valid unless --force.
    Dev {
        /// Directory for ca.pem, ca-key.pem, cert.pem and key.pem (default:
        /// ~/.local/share/switchboard/dev-tls).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Make new ones even if the existing ones are still valid.
        #[arg(long)]
        force: bool,
    },
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
    // Colours only for a terminal: never escape codes in a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    match format {
        LogFormat::Human => registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi)).init(),
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json()).init(),
    }
}

/// `--listen`: an address, a host name with a port (`localhost:8000`), or `:8000` for
/// every interface.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: the port after `:` is not a number"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("{s:?}: {e} (give HOST:PORT, IP:PORT or :PORT)"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// What `serve` refuses to start with, and what it warns about, for `config` in `dev`
/// mode or not — shared with `config check`, so a file it passes also starts.
fn preflight(config: &Config, dev: bool) -> (Vec<String>, Vec<String>) {
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    // (Checked here, not when the file loads: `serve --dev --tls` supplies the pair.)
    if !config.tls.enabled() && config.mqtt.tls_listen.is_some() {
        errors.push("mqtt.tls_listen needs tls.cert and tls.key (or `serve --dev --tls`)".to_string());
    }
    if !config.tls.enabled() && (config.tls.client_ca.is_some() || config.tls.http_listen.is_some()) {
        let key = if config.tls.client_ca.is_some() { "tls.client_ca" } else { "tls.http_listen" };
        errors.push(format!("{key} needs tls.cert and tls.key (or `serve --dev --tls`)"));
    }
    if let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) {
        match switchboard_server::tls::load_certified_key(cert, key) {
            Ok((_, info)) if info.expires_in() < 14 * 86_400 => warnings.push(format!(
                "the TLS certificate {} expires on {}: renew it",
                cert.display(),
                switchboard_server::tls::format_time(info.not_after)
            )),
            Ok(_) => {}
            Err(e) => errors.push(format!("tls: {e}")),
        }
    }
    if dev {
        return (errors, warnings);
    }
    if config.api.keys.is_empty() {
        errors.push(
            "no server API keys configured. Set api.keys in the config file (or SWITCHBOARD_API__KEYS=key1,key2), \
             or run with --dev for local development."
                .to_string(),
        );
    }
    if config.security.allowed_origins.is_empty() {
        warnings.push(
            "security.allowed_origins is empty: a page on any origin may open WebSockets and SSE streams and use \
             the browser endpoints (without credentials). List your application's origins."
                .to_string(),
        );
    }
    if !config.listen.ip().is_loopback() && config.auth.algorithm.is_none() {
        warnings.push(format!(
            "listening on {} without [auth]: every client is anonymous; namespaces that require tokens refuse them",
            config.listen
        ));
    }
    (errors, warnings)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => switchboard_bench::run(args),
        Command::Config { command: ConfigCommand::Check { file, dev } } => {
            match Config::load(Some(&file), std::env::vars()) {
                Ok(c) => {
                    let (errors, warnings) = preflight(&c, dev);
                    for w in &warnings {
                        eprintln!("warning: {w}");
                    }
                    for e in &errors {
                        eprintln!("error: {e}");
                    }
                    if !errors.is_empty() {
                        return ExitCode::from(2);
                    }
                    println!(
                        "{}: OK for `serve{}` (listen {}, {} namespace(s) configured, {} warning(s))",
                        file.display(),
                        if dev { " --dev" } else { "" },
                        c.listen,
                        c.namespaces.len(),
                        warnings.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Doctor { config, json } => {
            let cfg = match Config::load(config.as_deref(), std::env::vars()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let r = switchboard_server::doctor::report(&switchboard_server::doctor::read(), cfg.limits.max_connections);
            let cert = cfg.tls.cert.as_deref().map(switchboard_server::doctor::certificate);
            let sources = switchboard_server::doctor::sources(&cfg.sources);
            let listeners = switchboard_server::doctor::listeners(&cfg);
            if json {
                let mut v = serde_json::to_value(&r).expect("report serialises");
                v["tls_certificate"] = serde_json::to_value(&cert).expect("report serialises");
                v["sources"] = serde_json::to_value(&sources).expect("report serialises");
                v["listeners"] = serde_json::to_value(&listeners).expect("report serialises");
                println!("{}", serde_json::to_string_pretty(&v).expect("report serialises"));
            } else {
                print!("{}", switchboard_server::doctor::render(&r));
                if let Some(c) = &cert {
                    print!("{}", switchboard_server::doctor::render_certificate(c));
                }
                if !sources.is_empty() {
                    print!("{}", switchboard_server::doctor::render_sources(&sources));
                }
                print!("{}", switchboard_server::doctor::render_listeners(&listeners));
            }
            match cert {
                Some(c) if !c.ok => ExitCode::FAILURE,
                _ if sources.iter().any(|s| !s.reachable) => ExitCode::FAILURE,
                _ => ExitCode::SUCCESS,
            }
        }
        Command::Cert { command: CertCommand::Dev { dir, force } } => {
            let dir = dir.unwrap_or_else(switchboard_server::tls::dev_dir);
            match switchboard_server::tls::dev_certificate(&dir, force) {
                Ok(d) => {
                    print_dev_cert(&d);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token { user, channels, ttl, channel, info, jti, config, dev, private_key } => {
            match mint(user, channels, &ttl, channel, info, jti, config, dev, private_key) {
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
        Command::Serve { config, listen, dev, tls, log_format, drain_secs, drain_notice_secs, data_dir } => {
            init_logging(log_format);
            // A file-size limit (RLIMIT_FSIZE) reached by the history journal is a failed
            // write (EFBIG: the publish gets `storage_full`), not the end of the server.
            // SAFETY: setting a signal's disposition to "ignore" at start, before any thread.
            unsafe {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            }
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
            if let Some(d) = data_dir {
                cfg.broker.data_dir = Some(d);
            }
            if tls && !cfg.tls.enabled() {
                if !dev {
                    eprintln!(
                        "error: --tls needs [tls] cert and key in the configuration (or --dev, for the development \
                         certificate of `switchboard cert dev`)"
                    );
                    return ExitCode::from(2);
                }
                match switchboard_server::tls::dev_certificate(&switchboard_server::tls::dev_dir(), false) {
                    Ok(d) => {
                        if d.created {
                            print_dev_cert(&d);
                        }
                        cfg.tls.cert = Some(d.cert);
                        cfg.tls.key = Some(d.key);
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            // MQTT on its usual port under --dev, unless something (a Mosquitto, another
            // dev server) holds it. The socket bound here is the one served: no race with
            // another process between a check and the bind.
            let mut mqtt_note = None;
            let mut dev_mqtt = None;
            if dev && cfg.mqtt.listen.is_none() {
                let addr: std::net::SocketAddr = ([127, 0, 0, 1], 1883).into();
                match std::net::TcpListener::bind(addr) {
                    Ok(l) => dev_mqtt = Some(l),
                    Err(e) => {
                        mqtt_note = Some(format!("MQTT not started: {addr}: {e}; set mqtt.listen to another port"))
                    }
                }
            }
            let (errors, mut warnings) = preflight(&cfg, dev);
            warnings.extend(mqtt_note);
            if let Some(e) = errors.first() {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            for var in &cfg.ignored_env {
                tracing::warn!(
                    "ignoring environment variable {var}: not configuration (its first segment names no \
                     top-level key; see switchboard.example.toml)"
                );
            }
            for w in &warnings {
                tracing::warn!("{w}");
            }
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let (drain, notice) = (Duration::from_secs(drain_secs), Duration::from_secs(drain_notice_secs));
            match rt.block_on(serve(cfg, dev, dev_mqtt, drain, notice)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Says where the development certificate is and how to make a browser trust it.
fn print_dev_cert(d: &switchboard_server::tls::DevCert) {
    let verb = if d.created { "wrote" } else { "kept (still valid)" };
    println!("{verb} a development CA and a certificate for {} in {}", d.info.names.join(", "), d.dir.display());
    println!("  CA certificate:      {}", d.ca.display());
    println!(
        "  server certificate:  {} (expires {})",
        d.cert.display(),
        switchboard_server::tls::format_time(d.info.not_after)
    );
    println!("  server key:          {}", d.key.display());
    println!("Trust the CA once, then `switchboard serve --dev --tls` works at https://localhost:8000:");
    println!("  Debian/Ubuntu: sudo cp {} /usr/local/share/ca-certificates/switchboard-dev.crt && sudo update-ca-certificates", d.ca.display());
    println!(
        "  Chrome/Chromium: Settings → Privacy and security → Security → Manage certificates → Authorities → Import"
    );
    println!("  curl: --cacert {}", d.ca.display());
    println!("  or start Chromium with --ignore-certificate-errors-spki-list={}", d.info.spki_sha256);
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
    dev: bool,
    private_key: Option<PathBuf>,
) -> Result<String, String> {
    let mut cfg = Config::load(config.as_deref(), std::env::vars()).map_err(|e| e.to_string())?;
    if dev {
        cfg.use_dev_auth();
    }
    let alg = cfg
        .auth
        .algorithm
        .clone()
        .ok_or("no auth.algorithm configured: set [auth] in the config, or pass --dev to sign for `serve --dev`")?;
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

async fn serve(
    cfg: Config,
    dev: bool,
    dev_mqtt: Option<std::net::TcpListener>,
    drain: Duration,
    notice: Duration,
) -> anyhow::Result<()> {
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
        // One record, so a JSON log keeps it whole.
        tracing::warn!(
            "DEVELOPMENT MODE (--dev): the server API at /api/* accepts requests WITHOUT an API key, any page \
             may connect, and tokens signed with the development key (`switchboard token --dev`) are accepted \
             unless [auth] is configured. Never expose this server."
        );
    }
    let broker = match cfg.broker.kind {
        switchboard_server::config::BrokerKind::Memory => "in-memory (this process only)".to_string(),
        switchboard_server::config::BrokerKind::Redis => {
            format!("redis at {} (prefix {:?})", redact(&cfg.broker.redis_url), cfg.broker.redis_prefix)
        }
        switchboard_server::config::BrokerKind::Nats => {
            format!("nats at {} (prefix {:?})", redact(&cfg.broker.nats_url), cfg.broker.nats_prefix)
        }
    };
    let scheme = if cfg.tls.enabled() { "https" } else { "http" };
    let protocols = match (cfg.tls.enabled(), cfg.http2.enabled) {
        (true, true) => "HTTP/2 and HTTP/1.1 over TLS",
        (true, false) => "HTTP/1.1 over TLS",
        _ => "HTTP/1.1",
    };
    let mut cfg = cfg;
    if dev && cfg.webtransport.enabled && cfg.webtransport.listen.is_none() {
        // WebTransport under --dev: the HTTP listener's address, over UDP.
        cfg.webtransport.listen = Some(listener.local_addr()?);
    }
    let mut server = Server::new(cfg, dev, listener).await?.with_drain_notice(notice);
    if let Some(l) = dev_mqtt {
        l.set_nonblocking(true)?;
        server = server.with_mqtt_listener(tokio::net::TcpListener::from_std(l)?);
    }
    let addr = server.local_addr()?;
    tracing::info!("switchboard listening on {scheme}://{addr} ({protocols}); broker: {broker}");
    if let Some(plain) = server.http_local_addr() {
        let mode = match server.state.config.tls.http_mode {
            switchboard_server::config::HttpMode::Redirect => "redirecting to https",
            switchboard_server::config::HttpMode::Serve => "serving",
        };
        tracing::info!("plain HTTP on http://{plain} ({mode})");
    }
    if let Some(mqtt) = server.mqtt_local_addr() {
        tracing::info!("MQTT 3.1.1 and 5 on {mqtt} (mqtt://{mqtt})");
    }
    if let Some(mqtts) = server.mqtt_tls_local_addr() {
        tracing::info!("MQTT over TLS on {mqtts} (mqtts://{mqtts})");
    }
    if let Some(wt) = server.webtransport_local_addr() {
        let cert = if server.state.tls.is_some() {
            "the [tls] certificate"
        } else {
            "a development certificate: /wt/cert-hash"
        };
        tracing::info!("WebTransport (HTTP/3, UDP) on https://{wt}/wt ({cert})");
    }
    if let Some(tls) = &server.state.tls {
        let info = tls.info();
        tracing::info!(
            "TLS certificate for {} expires {}; reloaded on SIGHUP and when its files change",
            info.names.join(", "),
            switchboard_server::tls::format_time(info.not_after)
        );
    }
    let admin = format!("{scheme}://{addr}/admin");
    if dev {
        tracing::info!(
            "demo chat: {scheme}://{addr}/demo/chat; admin dashboard: {admin}; metrics: {scheme}://{addr}/metrics"
        );
    } else {
        tracing::info!("admin dashboard: {admin}; metrics: {scheme}://{addr}/metrics");
    }
    server.run(switchboard_server::shutdown_signal(), drain).await?;
    tracing::info!("bye");
    Ok(())
}

/// A URL with its password (if any) replaced, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_addresses_host_names_and_a_bare_port() {
        assert_eq!(parse_listen("127.0.0.1:9000").unwrap(), "127.0.0.1:9000".parse().unwrap());
        assert_eq!(parse_listen(":9000").unwrap(), "0.0.0.0:9000".parse().unwrap());
        assert_eq!(parse_listen("localhost:9000").unwrap().port(), 9000);
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen(":http").is_err());
    }

    #[test]
    fn passwords_stay_out_of_the_log() {
        assert_eq!(redact("redis://:hunter2@10.0.0.5:6379/0"), "redis://:***@10.0.0.5:6379/0");
        assert_eq!(redact("redis://app:hunter2@h:6379"), "redis://app:***@h:6379");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
