//! `switchboard bench`: a load generator that holds many lean connections.
//!
//! Scenarios (docs/benchmarks.md has the commands behind every published figure):
//! - `fanout`: N subscribers on one channel, a publisher at a rate — deliveries/s,
//!   publish→deliver latency percentiles, server CPU and RSS.
//! - `idle`: hold N subscribed connections — server RSS per connection, connect rate.
//! - `chat`: many rooms with a few members each, publishing and receiving.
//! - `slow`: a fraction of subscribers stop reading — the others' latency against a
//!   baseline, and server RSS.
//! - `storm`: N clients, the server restarted under them, all reconnect and resume —
//!   recovery time, peak handshake rate, messages lost and duplicated.
//!
//! Every scenario can target another server: `--subscribe-url` (WebSocket `ws://`, SSE
//! `http://` or MQTT `mqtt://host:port/topic`, with an optional `--first-frame`) and
//! `--publish-url` + `--publish-body` (a template where `$DATA` is the timestamped
//! payload; or `mqtt://host:port/topic`, QoS 0). Traffic goes only to loopback.
//!
//! Its clients are its own lean ones (a socket and a small buffer per connection, one
//! read loop), not `crates/client`'s tokio-tungstenite stack: that is what lets one
//! process hold thousands of connections and still measure the server. `--tls-ca`
//! connects Switchboard subscribers over TLS (`wss://`, `https://`).

mod proc_stats;
mod wsconn;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Subcommand, ValueEnum};
use wsconn::{Kind, Publisher, Stats, Subscriber, Target};

/// `switchboard bench <scenario> …` (the binary's subcommand embeds these arguments).
#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Transport {
    Ws,
    Sse,
    Poll,
    /// WebTransport (HTTP/3 over UDP, on `--server`'s port number unless `--wt-port`).
    Wt,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Switchboard server address, IP:port (loopback only).
    #[arg(long, default_value = "127.0.0.1:8000")]
    server: SocketAddr,
    /// Switchboard transport for subscribers.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// Channel name (a prefix for the rooms of `chat`).
    #[arg(long, default_value = "bench:fanout")]
    channel: String,
    /// Server API key for publishing (`Authorization: Bearer`); not needed under `--dev`.
    #[arg(long, env = "SWITCHBOARD_BENCH_API_KEY")]
    api_key: Option<String>,
    /// Another server: subscribe URL (`ws://ip:port/path` or SSE `http://ip:port/path`;
    /// `$CHANNEL` is replaced).
    #[arg(long)]
    subscribe_url: Option<String>,
    /// Text frame sent after a WebSocket handshake (Socket.IO: `40`).
    #[arg(long)]
    first_frame: Option<String>,
    /// Another server: publish URL (`http://ip:port/path`).
    #[arg(long)]
    publish_url: Option<String>,
    /// Publish body template: `$DATA` is the payload JSON, `$SEQ` a sequence number.
    #[arg(long)]
    publish_body: Option<String>,
    /// PIDs of the server process(es), for CPU seconds and RSS from /proc (comma-separated).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Local source IP addresses to spread connections over (comma-separated).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// `fanout`: more Switchboard nodes of one cluster (IP:port, comma-separated, loopback
    /// only): subscribers are spread evenly over `--server` and these, publications still
    /// go to `--server` — cross-node delivery through the backplane.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<SocketAddr>,
    /// Connections opened at once (count).
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Subscribers connect with TLS (`wss://`, `https://`) to `--server`, as `localhost`,
    /// trusting the CA certificate (PEM) in this file — e.g. the one `switchboard cert
    /// dev` writes. (Publish through a plain listener with `--publish-url`.)
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Also print the summary as one `JSON {…}` line, for machines.
    #[arg(long)]
    json: bool,
    /// WebTransport: the UDP port of the server's listener (default: `--server`'s port).
    #[arg(long)]
    wt_port: Option<u16>,
    /// WebTransport: subscribe with `datagrams: true` (volatile publications as datagrams).
    #[arg(long)]
    datagrams: bool,
    /// MQTT (`mqtt://` URLs): the QoS of subscriptions and publications, 0 or 1.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// `fanout`: publisher connections, the rate shared among them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    publishers: u64,
    /// Seconds to wait for deliveries (and reconnects) to arrive before counting what is
    /// missing as lost. Raise it on a loaded machine: it bounds a wait, it times nothing.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
}

#[derive(Subcommand)]
enum Scenario {
    /// N subscribers on one channel, a publisher at a rate: deliveries/s, latency, server
    /// CPU and RSS.
    Fanout {
        #[command(flatten)]
        common: Common,
        /// Subscribers (connections).
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Publications per second (0: as fast as the publish endpoint answers).
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Payload bytes per publication.
        #[arg(long, default_value_t = 128)]
        payload: usize,
    },
    /// Hold N subscribed connections: server RSS per connection, connect rate.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Seconds to hold them.
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
    /// Many rooms with a few members each, publishing and receiving.
    Chat {
        #[command(flatten)]
        common: Common,
        /// Rooms (channels).
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Members (connections) per room.
        #[arg(long, default_value_t = 5)]
        members: usize,
        /// Messages per second per member.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Seconds of chatting.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Payload bytes per message.
        #[arg(long, default_value_t = 128)]
        payload: usize,
    },
    /// A fraction of subscribers stop reading: the others' latency against a baseline.
    Slow {
        #[command(flatten)]
        common: Common,
        /// Subscribers (connections), fast and stalled together.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Fraction of subscribers that stop reading (0 to 1).
        #[arg(long, default_value_t = 0.1)]
        slow_fraction: f64,
        /// Publications per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Seconds of publishing, per phase.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Payload bytes per publication.
        #[arg(long, default_value_t = 1024)]
        payload: usize,
    },
    /// Publications at a rate through the server API while the server's webhook endpoint
    /// (configured by the caller: `publication` events, `publications = "all"`) points at
    /// a sink this bench runs on `--sink`: webhook events/s delivered, requests, events
    /// per request, server CPU per event.
    Webhooks {
        #[command(flatten)]
        common: Common,
        /// Where the sink listens (the endpoint's URL: `http://<sink>/`).
        #[arg(long, default_value = "127.0.0.1:8450")]
        sink: SocketAddr,
        /// Publications per second (0: as fast as the publish endpoint answers).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Payload bytes per publication.
        #[arg(long, default_value_t = 128)]
        payload: usize,
    },
    /// N subscribers wait for `--expect` publications made by someone else (a publication
    /// source: rows in an outbox, messages in a queue) whose data is `{"t":<Unix µs>,…}`:
    /// deliveries/s from the first to the last, latency from the stamp. Prints `ready` on
    /// stderr once subscribed.
    Listen {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Publications each subscriber waits for.
        #[arg(long)]
        expect: u64,
    },
    /// N clients; the server is restarted under them and they all come back and resume:
    /// recovery time, peak handshake rate, messages lost and duplicated.
    Storm {
        #[command(flatten)]
        common: Common,
        /// Clients (connections).
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Shell command that starts the server again after the bench stops it
        /// (SIGTERM to --server-pid). Use the Redis broker for zero loss.
        #[arg(long)]
        restart_cmd: String,
        /// Publications per second.
        #[arg(long, default_value_t = 50)]
        rate: u64,
        /// Payload bytes per publication.
        #[arg(long, default_value_t = 128)]
        payload: usize,
    },
}

/// Runs a scenario; the process's exit code: 0 when the run did what was asked, 1 when
/// it could not (a refused publish, connections that failed, a server that went away).
pub fn run(args: BenchArgs) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = match args.scenario {
        Scenario::Fanout { common, subscribers, rate, duration, payload } => {
            rt.block_on(fanout(common, subscribers, rate, duration, payload))
        }
        Scenario::Idle { common, connections, hold } => rt.block_on(idle(common, connections, hold)),
        Scenario::Chat { common, rooms, members, rate, duration, payload } => {
            rt.block_on(chat(common, rooms, members, rate, duration, payload))
        }
        Scenario::Slow { common, subscribers, slow_fraction, rate, duration, payload } => {
            rt.block_on(slow(common, subscribers, slow_fraction, rate, duration, payload))
        }
        Scenario::Listen { common, subscribers, expect } => rt.block_on(listen(common, subscribers, expect)),
        Scenario::Webhooks { common, sink, rate, duration, payload } => {
            rt.block_on(webhooks(common, sink, rate, duration, payload))
        }
        Scenario::Storm { common, clients, restart_cmd, rate, payload } => {
            rt.block_on(storm(common, clients, restart_cmd, rate, payload))
        }
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Res = Result<(), String>;

/// A summary: printed as a table, and as JSON with `--json`.
struct Summary {
    title: String,
    rows: Vec<(String, serde_like::Value)>,
}

mod serde_like {
    /// A tiny value type for the summary (keeps serde out of the generator).
    #[derive(Clone)]
    pub enum Value {
        Num(f64),
        Text(String),
    }
    impl std::fmt::Display for Value {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Value::Num(n) if n.fract() == 0.0 && n.abs() < 1e15 => write!(f, "{}", *n as i64),
                Value::Num(n) => write!(f, "{n:.2}"),
                Value::Text(s) => write!(f, "{s}"),
            }
        }
    }
    impl Value {
        pub fn json(&self) -> String {
            match self {
                Value::Num(n) if n.is_finite() => format!("{n}"),
                Value::Num(_) => "null".into(),
                Value::Text(s) => format!("{s:?}"),
            }
        }
    }
}

use serde_like::Value;

impl Summary {
    fn new(title: impl Into<String>) -> Self {
        Summary { title: title.into(), rows: Vec::new() }
    }
    fn num(&mut self, k: &str, v: f64) {
        self.rows.push((k.into(), Value::Num(v)));
    }
    fn text(&mut self, k: &str, v: impl Into<String>) {
        self.rows.push((k.into(), Value::Text(v.into())));
    }
    fn print(&self, json: bool) {
        println!("\n{}", self.title);
        for (k, v) in &self.rows {
            println!("  {k:<28} {v}");
        }
        if json {
            let fields: Vec<String> = self.rows.iter().map(|(k, v)| format!("{k:?}:{}", v.json())).collect();
            println!("JSON {{{}}}", fields.join(","));
        }
    }
}

impl Common {
    fn settle(&self) -> Duration {
        Duration::from_secs(self.settle_secs)
    }
}

fn target(c: &Common, channel: &str) -> Result<Target, String> {
    if let Some(url) = &c.subscribe_url {
        let (addr, path, kind) = wsconn::parse_url(url)?;
        let path = path.replace("$CHANNEL", channel);
        let first_frame = c.first_frame.clone();
        return Ok(Target { addr, path, kind, first_frame, ready: None, tls: None, qos: c.qos, wt: None });
    }
    if !c.server.ip().is_loopback() {
        return Err(format!("{}: benchmarks only target loopback addresses", c.server));
    }
    let (path, kind, ready): (_, _, Option<&'static [u8]>) = match c.transport {
        Transport::Ws => (format!("/ws?channel={channel}"), Kind::WebSocket, Some(b"{\"subscribed\":")),
        Transport::Sse => (format!("/sse?channel={channel}"), Kind::Sse, Some(b"event: subscribed\n")),
        // The first poll, which `Subscriber::connect` makes, establishes the cursor.
        Transport::Poll => (format!("/poll?channel={channel}"), Kind::Poll, None),
        Transport::Wt => (format!("/wt?protocol=switchboard.v1&channel={channel}"), Kind::WebTransport, None),
    };
    if c.transport == Transport::Wt {
        let addr = SocketAddr::new(c.server.ip(), c.wt_port.unwrap_or(c.server.port()));
        let endpoint = wt_endpoint(c.server)?;
        return Ok(Target {
            addr,
            path,
            kind,
            first_frame: None,
            ready,
            tls: None,
            qos: 0,
            wt: Some((endpoint, c.datagrams)),
        });
    }
    let tls = match &c.tls_ca {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            Some(wsconn::tls_connector(&pem)?)
        }
        None => None,
    };
    Ok(Target { addr: c.server, path, kind, first_frame: None, ready, tls, qos: 0, wt: None })
}

/// A WebTransport client endpoint trusting the server's development certificate (its
/// hash from `GET /wt/cert-hash`), shared by every subscriber: one UDP socket.
fn wt_endpoint(
    server: SocketAddr,
) -> Result<Arc<wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>>, String> {
    let body = wsconn::http_get(server, "/wt/cert-hash").map_err(|e| format!("/wt/cert-hash: {e}"))?;
    let hex = wsconn::str_value(&body, "\"hex\":\"").ok_or("/wt/cert-hash: no development certificate")?;
    let bytes: Vec<u8> =
        (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect();
    let hash: [u8; 32] = bytes.try_into().map_err(|_| "/wt/cert-hash: not a SHA-256")?;
    let config = wtransport::ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(hash)])
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .build();
    wtransport::Endpoint::client(config).map(Arc::new).map_err(|e| format!("WebTransport client: {e}"))
}

async fn publisher(c: &Common, channel: &str) -> Result<Publisher, String> {
    let (addr, path) = match &c.publish_url {
        Some(u) => {
            let (addr, path, kind) = wsconn::parse_url(u)?;
            if kind == Kind::Mqtt {
                let topic = path.replace("$CHANNEL", channel);
                return Publisher::connect_mqtt(addr, &topic, c.qos).await.map_err(|e| format!("publisher: {e}"));
            }
            (addr, path)
        }
        None => (c.server, "/api/publish".to_string()),
    };
    let template = c
        .publish_body
        .clone()
        .unwrap_or_else(|| format!("{{\"channel\":\"{channel}\",\"data\":$DATA}}"))
        .replace("$CHANNEL", channel);
    Publisher::connect(addr, &path, &template, c.api_key.as_deref()).await.map_err(|e| format!("publisher: {e}"))
}

/// Opens `n` connections to `t`, `concurrency` at a time; returns them and the rate.
async fn open_many(
    c: &Common,
    targets: &[Target],
    n: usize,
    recv_buffer: Option<u32>,
    stats: &Arc<Stats>,
) -> (Vec<Subscriber>, f64) {
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(c.connect_concurrency));
    let mut opening = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let source = (!c.sources.is_empty()).then(|| c.sources[i % c.sources.len()]);
        let t = targets[i % targets.len()].clone();
        let stats = stats.clone();
        opening.push(tokio::spawn(async move {
            let r = Subscriber::connect(&t, source, recv_buffer).await;
            if r.is_ok() {
                stats.handshakes.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
            r
        }));
    }
    let mut subs = Vec::with_capacity(n);
    let mut failed = 0;
    for o in opening {
        match o.await.expect("connect task") {
            Ok(s) => subs.push(s),
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("connect failed: {e}");
                }
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {n} connections failed");
        stats.failed_connects.fetch_add(failed, Ordering::Relaxed);
    }
    let rate = subs.len() as f64 / started.elapsed().as_secs_f64();
    (subs, rate)
}

/// The verdict after the summary is printed: connections that failed mean the run did
/// not measure what was asked.
fn verdict(stats: &Stats) -> Res {
    match stats.failed_connects.load(Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(format!("{n} connections could not be opened: the figures above are not the asked-for load")),
    }
}

fn server_stats(c: &Common) -> Option<proc_stats::ProcStats> {
    (!c.server_pid.is_empty()).then(|| proc_stats::read_all(&c.server_pid))
}

fn latency(s: &mut Summary, stats: &Stats) {
    let h = stats.latency.lock().expect("histogram").clone();
    s.num("latency_p50_ms", h.value_at_quantile(0.50) as f64 / 1000.0);
    s.num("latency_p90_ms", h.value_at_quantile(0.90) as f64 / 1000.0);
    s.num("latency_p99_ms", h.value_at_quantile(0.99) as f64 / 1000.0);
    s.num("latency_max_ms", h.max() as f64 / 1000.0);
}

/// Publishes at `rate` per second (0: flat out) until `stop`; returns how many.
/// Publishes at `rate` until `stop`. A refused publish ends the run with an error unless
/// `retry` (the storm, where the server is down on purpose for a while).
async fn publish_loop(
    mut p: Publisher,
    rate: u64,
    payload: usize,
    stop: Arc<AtomicBool>,
    retry: bool,
    acks: Option<Arc<Stats>>,
) -> Result<u64, String> {
    let interval = Duration::from_nanos(1_000_000_000u64.checked_div(rate).unwrap_or(0));
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if rate > 0 {
            let now = Instant::now();
            if next > now {
                tokio::time::sleep(next - now).await;
            }
            next += interval;
        }
        let sent = Instant::now();
        let r = p.publish(payload).await;
        if let (Ok(()), Some(s)) = (&r, &acks) {
            if let Ok(mut h) = s.acks.lock() {
                let _ = h.record(sent.elapsed().as_micros().max(1) as u64);
            }
        }
        if let Err(e) = r {
            if !retry {
                return Err(format!("publish failed after {} publications: {e}", p.published()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = p.reconnect().await;
        }
    }
    Ok(p.published())
}

/// A live line on stderr every second: connections, deliveries/s, p99 latency so far.
fn progress(stats: Arc<Stats>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = stats.delivered.load(Ordering::Relaxed);
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = stats.delivered.load(Ordering::Relaxed);
            let p99 = stats.latency.lock().map(|h| h.value_at_quantile(0.99) as f64 / 1000.0).unwrap_or(0.0);
            eprintln!(
                "  {:>4.0} s  {:>7} connections  {:>10} deliveries/s  p99 {:>8.1} ms so far",
                started.elapsed().as_secs_f64(),
                stats.handshakes.load(Ordering::Relaxed),
                now - last,
                p99
            );
            last = now;
        }
    })
}

async fn wait_for(stats: &Stats, base: u64, expected: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while stats.delivered.load(Ordering::Relaxed) - base < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn fanout(c: Common, subscribers: usize, rate: u64, duration: u64, payload: usize) -> Res {
    let stats = Arc::new(Stats::new());
    let t = target(&c, &c.channel)?;
    let mut targets = vec![t.clone()];
    for addr in &c.nodes {
        if !addr.ip().is_loopback() || c.subscribe_url.is_some() || t.wt.is_some() {
            return Err("--nodes: loopback Switchboard nodes, over ws, sse or poll".into());
        }
        targets.push(Target { addr: *addr, ..t.clone() });
    }
    eprintln!("opening {subscribers} subscribers ({}) over {} node(s)...", t.kind, targets.len());
    let (subs, conn_rate) = open_many(&c, &targets, subscribers, None, &stats).await;
    let n = subs.len() as u64;
    let handles: Vec<_> = subs.into_iter().map(|s| tokio::spawn(s.run(stats.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stats.reset_latency();
    let before = server_stats(&c);
    let base = stats.delivered.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let prog = progress(stats.clone(), stop.clone());
    let started = Instant::now();
    let pubs = publishers(&c, rate, payload, &stop, Some(stats.clone())).await?;
    tokio::time::sleep(Duration::from_secs(duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for p in pubs {
        sent += p.await.map_err(|e| e.to_string())??;
    }
    let expected = sent * n;
    wait_for(&stats, base, expected, c.settle()).await;
    let elapsed = started.elapsed();
    let _ = prog.await;
    let after = server_stats(&c);
    let delivered = stats.delivered.load(Ordering::Relaxed) - base;
    let mut s = Summary::new(format!("fanout: {n} subscribers, {sent} publications of {payload} B"));
    s.num("subscribers", n as f64);
    s.num("publications", sent as f64);
    s.num("connect_per_sec", conn_rate);
    s.num("deliveries", delivered as f64);
    s.num("expected", expected as f64);
    s.num("lost", expected.saturating_sub(delivered) as f64);
    s.num("duplicates", stats.duplicates.load(Ordering::Relaxed) as f64);
    s.num("deliveries_per_sec", delivered as f64 / elapsed.as_secs_f64());
    latency(&mut s, &stats);
    if let Ok(h) = stats.acks.lock() {
        s.num("publish_ack_p50_ms", h.value_at_quantile(0.5) as f64 / 1000.0);
        s.num("publish_ack_p99_ms", h.value_at_quantile(0.99) as f64 / 1000.0);
    }
    if let (Some(b), Some(a)) = (before, after) {
        let cpu = (a.cpu_secs - b.cpu_secs).max(1e-9);
        s.num("server_cpu_secs", cpu);
        s.num("deliveries_per_cpu_sec", delivered as f64 / cpu);
        s.num("server_rss_mib", a.rss_bytes as f64 / 1048576.0);
    }
    s.print(c.json);
    for h in handles {
        h.abort();
    }
    verdict(&stats)
}

/// `--publishers` connections publishing `rate`/s between them on `--channel` (0: each
/// flat out) until `stop`; their tasks answer how many each published.
async fn publishers(
    c: &Common,
    rate: u64,
    payload: usize,
    stop: &Arc<AtomicBool>,
    acks: Option<Arc<Stats>>,
) -> Result<Vec<tokio::task::JoinHandle<Result<u64, String>>>, String> {
    let mut pubs = Vec::new();
    for i in 0..c.publishers {
        // The rate shared: the first ones take the remainder (0 stays flat out).
        let share = rate / c.publishers + u64::from(i < rate % c.publishers);
        if rate > 0 && share == 0 {
            continue;
        }
        let p = publisher(c, &c.channel).await?;
        pubs.push(tokio::spawn(publish_loop(p, share, payload, stop.clone(), false, acks.clone())));
    }
    Ok(pubs)
}

async fn listen(c: Common, subscribers: usize, expect: u64) -> Res {
    let stats = Arc::new(Stats::new());
    let t = target(&c, &c.channel)?;
    let (subs, _) = open_many(&c, std::slice::from_ref(&t), subscribers, None, &stats).await;
    let n = subs.len() as u64;
    let handles: Vec<_> = subs.into_iter().map(|s| tokio::spawn(s.run(stats.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server_stats(&c);
    eprintln!("ready");
    // From the first delivery to the last (none within --settle-secs: nothing came).
    let deadline = Instant::now() + c.settle();
    while stats.delivered.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            return Err(format!("no publication arrived within {} s", c.settle_secs));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    wait_for(&stats, 0, expect * n, c.settle()).await;
    let elapsed = started.elapsed();
    let after = server_stats(&c);
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let mut s = Summary::new(format!("listen: {n} subscribers, {expect} publications each"));
    s.num("subscribers", n as f64);
    s.num("deliveries", delivered as f64);
    s.num("expected", (expect * n) as f64);
    s.num("lost", (expect * n).saturating_sub(delivered) as f64);
    s.num("duplicates", stats.duplicates.load(Ordering::Relaxed) as f64);
    s.num("publications_per_sec", delivered as f64 / n.max(1) as f64 / elapsed.as_secs_f64());
    s.num("deliveries_per_sec", delivered as f64 / elapsed.as_secs_f64());
    latency(&mut s, &stats);
    if let (Some(b), Some(a)) = (before, after) {
        s.num("server_cpu_secs", a.cpu_secs - b.cpu_secs);
    }
    s.print(c.json);
    for h in handles {
        h.abort();
    }
    verdict(&stats)
}

/// Counts of what the webhook sink took.
#[derive(Default)]
struct SinkCounts {
    requests: AtomicU64,
    events: AtomicU64,
}

/// A minimal HTTP/1.1 receiver: reads each request (Content-Length bodies, keep-alive),
/// counts its events and answers 200 at once.
async fn sink(listener: tokio::net::TcpListener, counts: Arc<SinkCounts>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else { return };
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                // A whole request: the head, then Content-Length bytes of body.
                let request = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()))
                            .unwrap_or(0usize);
                        if buf.len() >= end + 4 + len {
                            let body = buf[end + 4..end + 4 + len].to_vec();
                            buf.drain(..end + 4 + len);
                            break Some(body);
                        }
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let Some(body) = request else { return };
                let events = body.windows(8).filter(|w| w == b"\"id\":\"ev").count() as u64;
                counts.requests.fetch_add(1, Ordering::Relaxed);
                counts.events.fetch_add(events, Ordering::Relaxed);
                if tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn webhooks(c: Common, sink_addr: SocketAddr, rate: u64, duration: u64, payload: usize) -> Res {
    let listener = tokio::net::TcpListener::bind(sink_addr).await.map_err(|e| format!("sink {sink_addr}: {e}"))?;
    let counts = Arc::new(SinkCounts::default());
    let sink_task = tokio::spawn(sink(listener, counts.clone()));
    let before = server_stats(&c);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let pubs = publishers(&c, rate, payload, &stop, None).await?;
    tokio::time::sleep(Duration::from_secs(duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for p in pubs {
        sent += p.await.map_err(|e| e.to_string())??;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    // Until the sink has every event (bounded by --settle-secs).
    let deadline = Instant::now() + c.settle();
    let mut last = (counts.events.load(Ordering::Relaxed), Instant::now());
    while counts.events.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let n = counts.events.load(Ordering::Relaxed);
        if n != last.0 {
            last = (n, Instant::now());
        }
    }
    let elapsed = last.1.duration_since(started).as_secs_f64();
    let after = server_stats(&c);
    sink_task.abort();
    let (events, requests) = (counts.events.load(Ordering::Relaxed), counts.requests.load(Ordering::Relaxed));
    let mut s = Summary::new(format!("webhooks: {sent} publications of {payload} B, one endpoint"));
    s.num("publications", sent as f64);
    s.num("publications_per_sec", sent as f64 / publish_secs);
    s.num("events", events as f64);
    s.num("missing", sent.saturating_sub(events) as f64);
    s.num("requests", requests as f64);
    s.num("events_per_request", events as f64 / requests.max(1) as f64);
    s.num("events_per_sec", events as f64 / elapsed.max(1e-9));
    if let (Some(b), Some(a)) = (before, after) {
        let cpu = (a.cpu_secs - b.cpu_secs).max(1e-9);
        s.num("server_cpu_secs", cpu);
        s.num("server_cpu_us_per_publication", cpu * 1e6 / sent.max(1) as f64);
        s.num("server_cpu_us_per_event", cpu * 1e6 / events.max(1) as f64);
        s.num("server_rss_mib", a.rss_bytes as f64 / 1048576.0);
    }
    s.print(c.json);
    // (Without an endpoint configured nothing arrives: the baseline of the publish path.)
    if events > 0 && events < sent {
        return Err(format!("{} of {sent} webhook events did not arrive within --settle-secs", sent - events));
    }
    Ok(())
}

async fn idle(c: Common, connections: usize, hold: u64) -> Res {
    let stats = Arc::new(Stats::new());
    let t = target(&c, &c.channel)?;
    let baseline = server_stats(&c);
    let (subs, conn_rate) = open_many(&c, std::slice::from_ref(&t), connections, None, &stats).await;
    let n = subs.len();
    let handles: Vec<_> = subs.into_iter().map(|s| tokio::spawn(s.run(stats.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let loaded = server_stats(&c);
    let mut s = Summary::new(format!("idle: {n} connections"));
    s.num("connections", n as f64);
    s.num("connect_per_sec", conn_rate);
    if let (Some(b), Some(l)) = (baseline, loaded) {
        s.num("server_rss_before_mib", b.rss_bytes as f64 / 1048576.0);
        s.num("server_rss_after_mib", l.rss_bytes as f64 / 1048576.0);
        s.num("rss_per_connection_bytes", (l.rss_bytes as f64 - b.rss_bytes as f64) / n.max(1) as f64);
    }
    s.print(c.json);
    for h in handles {
        h.abort();
    }
    verdict(&stats)
}

async fn chat(c: Common, rooms: usize, members: usize, rate: f64, duration: u64, payload: usize) -> Res {
    let stats = Arc::new(Stats::new());
    let names: Vec<String> = (0..rooms).map(|r| format!("{}-{r}", c.channel)).collect();
    let targets: Vec<Target> = names.iter().map(|n| target(&c, n)).collect::<Result<_, _>>()?;
    // Member i of room r is connection r + i * rooms.
    let (subs, _) = open_many(&c, &targets, rooms * members, None, &stats).await;
    let handles: Vec<_> = subs.into_iter().map(|s| tokio::spawn(s.run(stats.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stats.reset_latency();
    let before = server_stats(&c);
    let base = stats.delivered.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    // One publishing task per room speaks for its members.
    let per_room = ((members as f64) * rate).max(0.1);
    let mut tasks = Vec::new();
    for n in &names {
        let p = publisher(&c, n).await?;
        tasks.push(tokio::spawn(publish_loop(p, per_room.round().max(1.0) as u64, payload, stop.clone(), false, None)));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for t in tasks {
        sent += t.await.map_err(|e| e.to_string())??;
    }
    let expected = sent * members as u64;
    wait_for(&stats, base, expected, c.settle()).await;
    let elapsed = started.elapsed();
    let after = server_stats(&c);
    let delivered = stats.delivered.load(Ordering::Relaxed) - base;
    let mut s = Summary::new(format!("chat: {rooms} rooms × {members} members, {sent} messages"));
    s.num("messages", sent as f64);
    s.num("deliveries", delivered as f64);
    s.num("lost", expected.saturating_sub(delivered) as f64);
    s.num("duplicates", stats.duplicates.load(Ordering::Relaxed) as f64);
    s.num("deliveries_per_sec", delivered as f64 / elapsed.as_secs_f64());
    latency(&mut s, &stats);
    if let (Some(b), Some(a)) = (before, after) {
        s.num("server_cpu_secs", a.cpu_secs - b.cpu_secs);
        s.num("server_rss_mib", a.rss_bytes as f64 / 1048576.0);
    }
    s.print(c.json);
    for h in handles {
        h.abort();
    }
    verdict(&stats)
}

async fn slow(c: Common, subscribers: usize, fraction: f64, rate: u64, duration: u64, payload: usize) -> Res {
    let t = target(&c, &c.channel)?;
    let n_slow = ((subscribers as f64) * fraction).round() as usize;
    let n_fast = subscribers - n_slow;
    let mut s = Summary::new(format!("slow: {n_fast} fast + {n_slow} stalled subscribers"));
    // Phase 1: fast subscribers alone (baseline). Phase 2: the same with stalled ones.
    let mut failed = 0;
    for (phase, stalled) in [("baseline", 0), ("with_slow", n_slow)] {
        let stats = Arc::new(Stats::new());
        let (fast, _) = open_many(&c, std::slice::from_ref(&t), n_fast, None, &stats).await;
        let (stuck, _) = open_many(&c, std::slice::from_ref(&t), stalled, Some(4096), &stats).await;
        let handles: Vec<_> = fast.into_iter().map(|f| tokio::spawn(f.run(stats.clone()))).collect();
        let stalls: Vec<_> =
            stuck.into_iter().map(|f| tokio::spawn(f.stall(Duration::from_secs(duration + 30)))).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stats.reset_latency();
        let base = stats.delivered.load(Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let pubs =
            tokio::spawn(publish_loop(publisher(&c, &c.channel).await?, rate, payload, stop.clone(), false, None));
        tokio::time::sleep(Duration::from_secs(duration)).await;
        stop.store(true, Ordering::Relaxed);
        let sent = pubs.await.map_err(|e| e.to_string())??;
        wait_for(&stats, base, sent * n_fast as u64, c.settle()).await;
        let delivered = stats.delivered.load(Ordering::Relaxed) - base;
        let h = stats.latency.lock().expect("histogram").clone();
        s.num(&format!("{phase}_fast_lost"), (sent * n_fast as u64).saturating_sub(delivered) as f64);
        s.num(&format!("{phase}_fast_p50_ms"), h.value_at_quantile(0.5) as f64 / 1000.0);
        s.num(&format!("{phase}_fast_p99_ms"), h.value_at_quantile(0.99) as f64 / 1000.0);
        if let Some(a) = server_stats(&c) {
            s.num(&format!("{phase}_server_rss_mib"), a.rss_bytes as f64 / 1048576.0);
        }
        for h in handles {
            h.abort();
        }
        for h in stalls {
            h.abort();
        }
        failed += stats.failed_connects.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s.print(c.json);
    match failed {
        0 => Ok(()),
        n => Err(format!("{n} connections could not be opened: the figures above are not the asked-for load")),
    }
}

async fn storm(c: Common, clients: usize, restart_cmd: String, rate: u64, payload: usize) -> Res {
    let pid = *c.server_pid.first().ok_or("storm needs --server-pid (the server to restart)")?;
    if c.subscribe_url.is_some() {
        return Err("storm drives Switchboard's resume protocol; --subscribe-url is not supported".into());
    }
    let stats = Arc::new(Stats::new());
    let reconnected = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let per_sec: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    // Resumable clients: on any close they come back (full jitter) with `since`.
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (c2, stats, reconnected, per_sec, stop, connected) =
            (c.clone(), stats.clone(), reconnected.clone(), per_sec.clone(), stop.clone(), connected.clone());
        tasks.push(tokio::spawn(async move {
            let mut last: Option<(String, u64)> = None;
            let mut attempt = 0u32;
            let mut first = true;
            while !stop.load(Ordering::Relaxed) {
                let mut t = target(&c2, &c2.channel).expect("target");
                if let Some((e, o)) = &last {
                    t.path.push_str(&format!("&since={e}:{o}"));
                }
                match Subscriber::connect(&t, None, None).await {
                    Ok(mut sub) => {
                        *per_sec.lock().unwrap().entry(origin.elapsed().as_secs()).or_default() += 1;
                        if first {
                            connected.fetch_add(1, Ordering::Relaxed);
                        } else {
                            reconnected.fetch_add(1, Ordering::Relaxed);
                        }
                        first = false;
                        attempt = 0;
                        sub.last = last.clone();
                        last = sub.run(stats.clone()).await;
                    }
                    Err(_) => {
                        attempt += 1;
                        let cap = 100u64 * 2u64.pow(attempt.min(6));
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=cap))).await;
                    }
                }
            }
        }));
    }
    // Everyone must be subscribed before the first publication, or a late first connect
    // (which starts at the current position) would look like a loss.
    let deadline = Instant::now() + c.settle().max(Duration::from_secs(60));
    while connected.load(Ordering::Relaxed) < clients as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Retried publishes carry the same idempotency key, so a retry is stored once.
    let tpl = c
        .publish_body
        .clone()
        .unwrap_or_else(|| format!("{{\"channel\":\"{}\",\"data\":$DATA,\"key\":\"storm-$SEQ\"}}", c.channel));
    let p =
        Publisher::connect(c.server, "/api/publish", &tpl, c.api_key.as_deref()).await.map_err(|e| e.to_string())?;
    let pub_stop = Arc::new(AtomicBool::new(false));
    let pubs = tokio::spawn(publish_loop(p, rate, payload, pub_stop.clone(), true, None));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    // Wait for the old process to go, then start the new one.
    for _ in 0..300 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::process::Command::new("sh").args(["-c", &restart_cmd]).spawn().map_err(|e| format!("restart: {e}"))?;
    let deadline = Instant::now() + c.settle().max(Duration::from_secs(60));
    while reconnected.load(Ordering::Relaxed) < clients as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovery = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pub_stop.store(true, Ordering::Relaxed);
    let sent = pubs.await.map_err(|e| e.to_string())??;
    let expected = sent * clients as u64;
    wait_for(&stats, 0, expected, c.settle().max(Duration::from_secs(60))).await;
    stop.store(true, Ordering::Relaxed);
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let peak = per_sec.lock().unwrap().values().copied().max().unwrap_or(0);
    let mut s = Summary::new(format!("storm: {clients} clients, server restarted under {sent} publications"));
    s.num("clients", clients as f64);
    s.num("reconnected", reconnected.load(Ordering::Relaxed) as f64);
    s.num("recovery_secs", recovery.as_secs_f64());
    s.num("peak_handshakes_per_sec", peak as f64);
    s.num("publications", sent as f64);
    s.num("gaps_in_offsets", stats.gaps.load(Ordering::Relaxed) as f64);
    s.num("resets", stats.resets.load(Ordering::Relaxed) as f64);
    s.num("lost", expected.saturating_sub(delivered) as f64);
    s.num("duplicates", stats.duplicates.load(Ordering::Relaxed) as f64);
    s.text(
        "note",
        "lost = publications some client never received; resets = positions the server said were gone \
         (history shorter than the outage); 0 needs a broker that keeps enough history (redis)",
    );
    s.print(c.json);
    for t in tasks {
        t.abort();
    }
    verdict(&stats)
}
