//! `switchboard-bench`: a load generator that holds many lean WebSocket connections.
//!
//! Scenarios (see docs/benchmarks.md for the commands behind every published figure):
//! - `fanout`: N subscribers on one channel, a publisher at a rate, payload size S —
//!   deliveries/s, publish→deliver latency percentiles, server CPU and RSS.
//! - `idle`: hold N subscribed connections — server RSS per connection, connect rate.
//!
//! Every connection is a small task with a 4 KiB read buffer; connections are spread over
//! several loopback source addresses (`--sources`) so one box can open more than one
//! address's ephemeral ports. Traffic goes only to the `--url` given, which must be on
//! loopback.

mod proc_stats;
mod wsconn;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "switchboard-bench", about = "Load generator for Switchboard")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:8000")]
    server: SocketAddr,
    /// Local source addresses to spread connections over (comma-separated). Without it
    /// the kernel picks (one source address has ~28k ephemeral ports per server port;
    /// binding a source first is much slower to connect, so use it only past that).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// PID of the server process, for CPU and RSS figures from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Channel to use.
    #[arg(long, default_value = "bench:fanout")]
    channel: String,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
}

#[derive(Subcommand)]
enum Scenario {
    /// N subscribers on one channel, publisher at a rate.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Publications per second (0: as fast as the publish API answers).
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Seconds to publish for.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 128)]
        payload: usize,
    },
    /// Hold N idle subscribed connections and report server memory per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Seconds to hold them after all are open.
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    match cli.scenario {
        Scenario::Fanout { common, subscribers, rate, duration, payload } => {
            rt.block_on(fanout(common, subscribers, rate, duration, payload))
        }
        Scenario::Idle { common, connections, hold } => rt.block_on(idle(common, connections, hold)),
    }
}

fn check_loopback(addr: &SocketAddr) {
    if !addr.ip().is_loopback() {
        eprintln!("refusing to load {addr}: benchmarks only target loopback addresses");
        std::process::exit(2);
    }
}

/// Opens `n` subscribed connections, `concurrency` at a time. Returns them and the
/// connection rate achieved.
async fn open_many(common: &Common, n: usize, stats: Arc<wsconn::Stats>) -> (Vec<tokio::task::JoinHandle<()>>, f64) {
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(common.connect_concurrency));
    let mut opening = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let source = (!common.sources.is_empty()).then(|| common.sources[i % common.sources.len()]);
        let (server, channel) = (common.server, common.channel.clone());
        opening.push(tokio::spawn(async move {
            let conn = wsconn::Subscriber::connect(server, source, &channel).await;
            drop(permit);
            conn
        }));
    }
    let mut handles = Vec::with_capacity(n);
    let mut failed = 0;
    for o in opening {
        match o.await.expect("connect task") {
            Ok(sub) => {
                let stats = stats.clone();
                handles.push(tokio::spawn(sub.run(stats)));
            }
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("connect failed: {e}");
                }
            }
        }
    }
    let rate = handles.len() as f64 / started.elapsed().as_secs_f64();
    if failed > 0 {
        eprintln!("{failed} of {n} connections failed");
    }
    (handles, rate)
}

async fn fanout(common: Common, subscribers: usize, rate: u64, duration: u64, payload: usize) {
    check_loopback(&common.server);
    let stats = Arc::new(wsconn::Stats::new());
    eprintln!("opening {subscribers} subscribers...");
    let (handles, conn_rate) = open_many(&common, subscribers, stats.clone()).await;
    eprintln!(
        "{} open ({conn_rate:.0}/s); publishing for {duration}s at {}",
        handles.len(),
        if rate == 0 { "max rate".to_string() } else { format!("{rate}/s") }
    );
    let before = common.server_pid.map(proc_stats::read);
    let delivered_before = stats.delivered.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut publisher = wsconn::Publisher::connect(common.server, &common.channel).await.expect("publisher connects");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = {
        let (stats, stop) = (stats.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = stats.delivered.load(Ordering::Relaxed);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = stats.delivered.load(Ordering::Relaxed);
                eprintln!("  {:>10} deliveries/s", now - last);
                last = now;
            }
        })
    };
    let mut sent = 0u64;
    let interval = Duration::from_nanos(1_000_000_000u64.checked_div(rate).unwrap_or(0));
    let mut next = Instant::now();
    while started.elapsed() < Duration::from_secs(duration) {
        if rate > 0 {
            let now = Instant::now();
            if next > now {
                tokio::time::sleep(next - now).await;
            }
            next += interval;
        }
        publisher.publish(payload).await.expect("publish");
        sent += 1;
    }
    let publish_elapsed = started.elapsed();
    // Wait for the tail to arrive (bounded).
    let expected = sent * handles.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.delivered.load(Ordering::Relaxed) - delivered_before < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = progress.await;
    let after = common.server_pid.map(proc_stats::read);
    let delivered = stats.delivered.load(Ordering::Relaxed) - delivered_before;
    let hist = stats.latency.lock().expect("histogram").clone();
    println!();
    println!(
        "fanout: {} subscribers, {sent} publications of {payload} B in {:.1}s",
        handles.len(),
        publish_elapsed.as_secs_f64()
    );
    println!(
        "  deliveries          {delivered} of {expected} expected ({} lost, {} duplicated)",
        expected.saturating_sub(delivered),
        stats.duplicates.load(Ordering::Relaxed)
    );
    println!("  deliveries/s        {:.0}", delivered as f64 / elapsed.as_secs_f64());
    println!("  latency p50         {:.2} ms", hist.value_at_quantile(0.50) as f64 / 1000.0);
    println!("  latency p90         {:.2} ms", hist.value_at_quantile(0.90) as f64 / 1000.0);
    println!("  latency p99         {:.2} ms", hist.value_at_quantile(0.99) as f64 / 1000.0);
    println!("  latency max         {:.2} ms", hist.max() as f64 / 1000.0);
    if let (Some(b), Some(a)) = (before, after) {
        let cpu = (a.cpu_secs - b.cpu_secs).max(1e-9);
        println!("  server CPU          {cpu:.2} s ({:.0}% of one core)", cpu / elapsed.as_secs_f64() * 100.0);
        println!("  deliveries/CPU-s    {:.0}", delivered as f64 / cpu);
        println!("  server RSS          {:.1} MiB", a.rss_bytes as f64 / 1048576.0);
    }
    for h in handles {
        h.abort();
    }
}

async fn idle(common: Common, connections: usize, hold: u64) {
    check_loopback(&common.server);
    let baseline = common.server_pid.map(proc_stats::read);
    let stats = Arc::new(wsconn::Stats::new());
    eprintln!("opening {connections} connections...");
    let (handles, conn_rate) = open_many(&common, connections, stats).await;
    eprintln!("{} open ({conn_rate:.0}/s); holding {hold}s", handles.len());
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let loaded = common.server_pid.map(proc_stats::read);
    println!();
    println!("idle: {} connections open, subscribed to {}", handles.len(), common.channel);
    println!("  connections/s       {conn_rate:.0}");
    if let (Some(b), Some(l)) = (baseline, loaded) {
        let per = (l.rss_bytes as f64 - b.rss_bytes as f64) / handles.len().max(1) as f64;
        println!("  server RSS before   {:.1} MiB", b.rss_bytes as f64 / 1048576.0);
        println!("  server RSS after    {:.1} MiB", l.rss_bytes as f64 / 1048576.0);
        println!("  RSS per connection  {per:.0} B");
    }
    for h in handles {
        h.abort();
    }
}
