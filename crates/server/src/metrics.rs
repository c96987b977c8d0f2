//! Prometheus metrics, exposed through `prometheus-client` (Prometheus text, or
//! OpenMetrics when the scraper asks for it).
//!
//! Every server instance owns its [`Metrics`] and its registry (in its `AppState`), so two
//! servers in one process — tests, embedders — never see each other's numbers. The hot
//! paths only bump relaxed atomics (counters, gauges, histograms with fixed, explicit
//! buckets); a collector reads them, the hub's own counters and /proc at scrape time, so
//! nothing is allocated per message. Names and meanings are in docs/operations.md.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, text, DescriptorEncoder, EncodeGaugeValue, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use switchboard_core::hub::LATENCY_BOUNDS_MS;

use crate::app::AppState;

/// A transport, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
    Poll,
    Mqtt,
    WebTransport,
}

const TRANSPORTS: [(&str, Transport); 5] = [
    ("ws", Transport::Ws),
    ("sse", Transport::Sse),
    ("poll", Transport::Poll),
    ("mqtt", Transport::Mqtt),
    ("webtransport", Transport::WebTransport),
];

/// Histogram with explicit upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::latency()
    }
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// With the buckets of the server's other latencies (0.5 ms to 2.5 s).
    pub fn latency() -> Self {
        Histogram::new(LATENCY_BUCKETS)
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Bucket counts (non-cumulative) — for computing quantiles over a window.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }
}

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Every metric the server keeps.
pub struct Metrics {
    pub connections: [AtomicI64; TRANSPORTS.len()],
    pub handshakes: [AtomicU64; TRANSPORTS.len()],
    pub publishes_stored: AtomicU64,
    /// Publishes that repeated an idempotency key: nothing new stored.
    pub publishes_duplicate: AtomicU64,
    pub publishes_volatile: AtomicU64,
    pub bytes_out: AtomicU64,
    pub resumes_recovered: AtomicU64,
    pub resumes_reset: AtomicU64,
    pub broker_errors: AtomicU64,
    pub broker_publish: Histogram,
    pub broker_history: Histogram,
    /// Connection tasks that panicked (their connections were closed).
    pub task_panics: AtomicU64,
    /// Connections refused at accept, by the total cap or the per-IP cap.
    pub refused_total_cap: AtomicU64,
    pub refused_ip_cap: AtomicU64,
    /// TLS handshakes completed, and failed or timed out.
    pub tls_handshakes: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// WebSockets opened over HTTP/2 (extended CONNECT, RFC 8441).
    pub ws_over_http2: AtomicU64,
    /// Direct messages queued for a connection on this node.
    pub direct_messages: AtomicU64,
    /// QoS 1 and 2 publications sent to MQTT clients and not yet acknowledged.
    pub mqtt_inflight: std::sync::atomic::AtomicI64,
    /// Retained messages sent to MQTT clients for their subscriptions.
    pub mqtt_retained_sent: AtomicU64,
    /// Connections waiting without a task of their own, by transport (parked: their
    /// socket, queue or timers start one; `transports::parking`).
    pub parked: [std::sync::atomic::AtomicI64; TRANSPORTS.len()],
    /// Errors by code, as returned to clients (HTTP and WebSocket replies).
    errors: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            connections: Default::default(),
            handshakes: Default::default(),
            publishes_stored: AtomicU64::new(0),
            publishes_duplicate: AtomicU64::new(0),
            publishes_volatile: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            resumes_recovered: AtomicU64::new(0),
            resumes_reset: AtomicU64::new(0),
            broker_errors: AtomicU64::new(0),
            broker_publish: Histogram::new(LATENCY_BUCKETS),
            broker_history: Histogram::new(LATENCY_BUCKETS),
            task_panics: AtomicU64::new(0),
            refused_total_cap: AtomicU64::new(0),
            refused_ip_cap: AtomicU64::new(0),
            tls_handshakes: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            ws_over_http2: AtomicU64::new(0),
            direct_messages: AtomicU64::new(0),
            mqtt_inflight: Default::default(),
            mqtt_retained_sent: AtomicU64::new(0),
            parked: Default::default(),
            errors: Mutex::new(Default::default()),
        }
    }

    pub(crate) fn idx(t: Transport) -> usize {
        t as usize
    }

    /// Counts an open connection; the guard counts it out.
    pub fn connection(self: &Arc<Self>, t: Transport) -> ConnectionGauge {
        self.connections[Self::idx(t)].fetch_add(1, Ordering::Relaxed);
        self.handshakes[Self::idx(t)].fetch_add(1, Ordering::Relaxed);
        ConnectionGauge(self.clone(), t)
    }

    /// Counts a resume attempt's outcome.
    pub fn resume(&self, recovered: bool) {
        let c = if recovered { &self.resumes_recovered } else { &self.resumes_reset };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, code: &'static str) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(code).or_default() += 1;
    }

    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn open_connections(&self, t: Transport) -> i64 {
        self.connections[Self::idx(t)].load(Ordering::Relaxed)
    }
}

/// Decrements the connection gauge on drop.
pub struct ConnectionGauge(Arc<Metrics>, Transport);

impl ConnectionGauge {
    /// The metrics this connection counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.0
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.connections[Metrics::idx(self.1)].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The exposition formats a scrape can ask for (`Accept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4, what every scraper reads.
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A server's metrics registry: the server's own series (read from its atomics at scrape
/// time) and the process's. Embedders can register their own metrics in it.
pub fn registry(state: std::sync::Weak<crate::app::Inner>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ServerCollector(state)));
    r.register_collector(Box::new(ProcessCollector));
    r
}

/// The whole exposition, in `format`.
pub fn render(state: &AppState, format: Format) -> String {
    let mut out = String::with_capacity(8192);
    let r = match format {
        Format::Prometheus => prometheus_text::encode(&mut out, &state.exposition),
        Format::OpenMetrics => text::encode(&mut out, &state.exposition),
    };
    if r.is_err() {
        tracing::error!("metrics exposition failed to encode");
    }
    out
}

/// Reads a server's counters when scraped. Holds the server weakly: the registry lives
/// in the server's state.
struct ServerCollector(std::sync::Weak<crate::app::Inner>);

impl std::fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCollector")
    }
}

/// `encode_descriptor` for one series without labels. Counters are named without
/// `_total`; the encoder adds it.
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Counter)?.encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge<V: EncodeGaugeValue>(e: &mut DescriptorEncoder, name: &str, help: &str, v: V) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&v)
}

/// One counter series per value of `label`.
fn counter_by(e: &mut DescriptorEncoder, name: &str, help: &str, label: &str, values: &[(&str, u64)]) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        m.encode_family(&[(label, *value)])?.encode_counter::<NoLabelSet, _, u64>(n, None)?;
    }
    Ok(())
}

/// Per-bucket counts (not cumulative) paired with their upper bounds; the last count is
/// the overflow bucket.
fn buckets(bounds: impl Iterator<Item = f64>, counts: &[u64]) -> Vec<(f64, u64)> {
    bounds.chain(std::iter::once(f64::INFINITY)).zip(counts.iter().copied()).collect()
}

impl Histogram {
    fn encode(&self, m: &mut MetricEncoder) -> fmt::Result {
        let counts = self.snapshot();
        let count = counts.iter().sum();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        m.encode_histogram::<NoLabelSet>(sum, count, &buckets(self.bounds.iter().copied(), &counts), None)
    }
}

impl Collector for ServerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let Some(state) = self.0.upgrade() else { return Ok(()) };
        let e = &mut e;
        let m = &*state.metrics;
        let stats = &state.hub.stats;
        let queues = &stats.queues;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        let mut g = e.encode_descriptor(
            "switchboard_connections",
            "Open client connections by transport (poll: requests in flight).",
            None,
            MetricType::Gauge,
        )?;
        for (name, t) in TRANSPORTS {
            g.encode_family(&[("transport", name)])?.encode_gauge(&m.open_connections(t))?;
        }
        let mut g = e.encode_descriptor(
            "switchboard_parked_connections",
            "Connections waiting without a task of their own (parked), by transport.",
            None,
            MetricType::Gauge,
        )?;
        for (name, t) in TRANSPORTS {
            let parked = m.parked[Metrics::idx(t)].load(Ordering::Relaxed).max(0) as u64;
            g.encode_family(&[("transport", name)])?.encode_gauge(&parked)?;
        }
        let handshakes: Vec<(&str, u64)> =
            TRANSPORTS.iter().map(|(name, t)| (*name, load(&m.handshakes[Metrics::idx(*t)]))).collect();
        counter_by(
            e,
            "switchboard_handshakes",
            "Accepted connections (handshakes, poll requests) by transport.",
            "transport",
            &handshakes,
        )?;
        let channels = state.hub.channels();
        gauge(e, "switchboard_channels", "Channels with local subscribers.", channels.len() as u64)?;
        let subscriptions = channels.iter().map(|(_, n)| n).sum::<usize>() + state.hub.pattern_subscriptions();
        gauge(e, "switchboard_subscriptions", "Local subscriptions (channels and patterns).", subscriptions as u64)?;
        counter_by(
            e,
            "switchboard_publications",
            "Publications accepted on this node (API, clients, sources) by kind; duplicate: an idempotency key repeated, nothing published.",
            "kind",
            &[
                ("stored", load(&m.publishes_stored)),
                ("volatile", load(&m.publishes_volatile)),
                ("duplicate", load(&m.publishes_duplicate)),
            ],
        )?;
        counter(
            e,
            "switchboard_hub_publications",
            "Publications fanned out to local subscribers.",
            load(&stats.publications),
        )?;
        counter(
            e,
            "switchboard_deliveries",
            "Publications queued to subscriber connections.",
            load(&stats.deliveries),
        )?;
        counter(e, "switchboard_bytes_out", "Bytes written to WebSocket and SSE clients.", load(&m.bytes_out))?;
        counter(
            e,
            "switchboard_queue_dropped_volatile",
            "Volatile messages dropped under backpressure.",
            load(&queues.volatile_drops),
        )?;
        counter(
            e,
            "switchboard_slow_consumer_disconnects",
            "Connections closed because their queue overflowed.",
            load(&queues.slow_consumer_closes),
        )?;
        counter_by(
            e,
            "switchboard_resumes",
            "Subscriptions that asked to resume from a position, by outcome.",
            "outcome",
            &[("recovered", load(&m.resumes_recovered)), ("reset", load(&m.resumes_reset))],
        )?;
        counter(
            e,
            "switchboard_broker_errors",
            "Broker operations that failed (e.g. Redis unreachable).",
            load(&m.broker_errors),
        )?;
        let mut h = e.encode_descriptor(
            "switchboard_broker_operation_duration_seconds",
            "Broker publish and history latency.",
            None,
            MetricType::Histogram,
        )?;
        m.broker_publish.encode(&mut h.encode_family(&[("op", "publish")])?)?;
        m.broker_history.encode(&mut h.encode_family(&[("op", "history")])?)?;
        let latency = stats.latency_snapshot();
        e.encode_descriptor(
            "switchboard_delivery_latency_seconds",
            "From a publication's acceptance by the broker to its fan-out on this node.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            load(&stats.latency_sum_ms) as f64 / 1000.0,
            latency.iter().sum(),
            &buckets(LATENCY_BOUNDS_MS.iter().map(|b| *b as f64 / 1000.0), &latency),
            None,
        )?;
        counter_by(
            e,
            "switchboard_errors",
            "Errors returned to clients, by code (token_* are auth failures; server_busy and rate_limited are rate-limit rejections).",
            "code",
            &m.errors(),
        )?;
        if let Some((channels, forgotten)) = state.hub.broker().memory_stats() {
            gauge(e, "switchboard_broker_channels", "Channels the in-memory broker keeps state for.", channels as u64)?;
            counter(
                e,
                "switchboard_broker_unused_channels_forgotten",
                "Channels made by reads alone, forgotten to stay within broker.max_unused_channels.",
                forgotten,
            )?;
        }
        gauge(
            e,
            "switchboard_tcp_connections",
            "Open TCP connections of every kind (what limits.max_connections caps).",
            state.limits.open() as u64,
        )?;
        counter_by(
            e,
            "switchboard_connections_refused",
            "Connections refused at accept, by cap.",
            "cap",
            &[("total", load(&m.refused_total_cap)), ("ip", load(&m.refused_ip_cap))],
        )?;
        counter(
            e,
            "switchboard_task_panics",
            "Connection tasks that panicked (connection closed).",
            load(&m.task_panics),
        )?;
        gauge(e, "switchboard_draining", "1 while the node drains.", u64::from(state.is_draining()))?;
        if let Some(tls) = &state.tls {
            counter_by(
                e,
                "switchboard_tls_handshakes",
                "TLS handshakes on the listener, by outcome.",
                "outcome",
                &[("ok", load(&m.tls_handshakes)), ("failed", load(&m.tls_handshake_failures))],
            )?;
            gauge(
                e,
                "switchboard_tls_certificate_not_after_seconds",
                "When the certificate presented now expires (Unix seconds).",
                tls.info().not_after,
            )?;
        }
        counter(
            e,
            "switchboard_ws_over_http2",
            "WebSockets opened over HTTP/2 (extended CONNECT, RFC 8441).",
            load(&m.ws_over_http2),
        )?;
        counter(
            e,
            "switchboard_direct_messages",
            "Direct messages queued for connections on this node.",
            load(&m.direct_messages),
        )?;
        gauge(
            e,
            "switchboard_mqtt_inflight",
            "QoS 1 and 2 publications sent to MQTT clients and not yet acknowledged.",
            m.mqtt_inflight.load(std::sync::atomic::Ordering::Relaxed).max(0) as u64,
        )?;
        counter(
            e,
            "switchboard_mqtt_retained_sent",
            "Retained messages sent to MQTT clients for their subscriptions.",
            load(&m.mqtt_retained_sent),
        )?;
        if let Some(sources) = state.sources.get().filter(|s| !s.is_empty()) {
            type Field = fn(&crate::sources::SourceMetrics) -> &std::sync::atomic::AtomicU64;
            let counters: [(&str, &str, Field); 5] = [
                ("switchboard_source_rows_consumed", "Rows a publication source claimed.", |s| &s.consumed),
                ("switchboard_source_rows_published", "Rows a publication source published.", |s| &s.published),
                (
                    "switchboard_source_rows_deduped",
                    "Of the rows published, redeliveries whose idempotency key was already published.",
                    |s| &s.deduped,
                ),
                ("switchboard_source_rows_poison", "Rows a source could not publish (dead-lettered).", |s| &s.poison),
                ("switchboard_source_errors", "Failed rounds of a source (retried with backoff).", |s| &s.errors),
            ];
            for (name, help, field) in counters {
                let values: Vec<(&str, u64)> = sources.iter().map(|s| (s.name.as_str(), load(field(s)))).collect();
                counter_by(e, name, help, "source", &values)?;
            }
            let help = "1 while a source is connected and listening.";
            let mut m = e.encode_descriptor("switchboard_source_connected", help, None, MetricType::Gauge)?;
            for s in sources.iter() {
                m.encode_family(&[("source", s.name.as_str())])?.encode_gauge(&load(&s.connected))?;
            }
            let help = "Messages waiting at a source when last sampled (RabbitMQ: ready in the queue; outbox: rows).";
            let mut m = e.encode_descriptor("switchboard_source_lag", help, None, MetricType::Gauge)?;
            for s in sources.iter() {
                m.encode_family(&[("source", s.name.as_str())])?.encode_gauge(&load(&s.lag))?;
            }
        }
        if let Some(w) = &state.webhooks {
            let wm = &w.metrics;
            counter(e, "switchboard_webhook_events_sent", "Webhook events delivered (2xx).", load(&wm.sent))?;
            counter(
                e,
                "switchboard_webhook_requests_failed",
                "Webhook requests that failed (non-2xx, timeout, connection).",
                load(&wm.failed),
            )?;
            counter(e, "switchboard_webhook_events_retried", "Webhook events scheduled again.", load(&wm.retried))?;
            counter(
                e,
                "switchboard_webhook_events_dead",
                "Webhook events moved to the dead-letter list.",
                load(&wm.dead),
            )?;
            counter(
                e,
                "switchboard_webhook_events_dropped",
                "Webhook events not queued: webhooks.max_pending were waiting.",
                load(&wm.dropped),
            )?;
            gauge(e, "switchboard_webhook_queue_depth", "Webhook events waiting for delivery.", w.pending() as u64)?;
            gauge(
                e,
                "switchboard_webhook_dead_letters",
                "Webhook events in the dead-letter list.",
                w.dead_count() as u64,
            )?;
            let mut h = e.encode_descriptor(
                "switchboard_webhook_request_duration_seconds",
                "Webhook request latency, to the answer or the failure.",
                None,
                MetricType::Histogram,
            )?;
            wm.latency.encode(&mut h.encode_family(&[("op", "deliver")])?)?;
        }
        e.encode_descriptor("switchboard_build", "This server's version.", None, MetricType::Info)?
            .encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        gauge(
            e,
            "switchboard_start_time_seconds",
            "When this server started, in seconds since the Unix epoch.",
            state.started,
        )
    }
}

/// The standard `process_*` series, read from /proc at scrape time (Linux; elsewhere
/// none are reported). They describe the whole process, which may hold several servers.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let Some(p) = ProcessStats::read() else { return Ok(()) };
        let e = &mut e;
        e.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, f64>(&p.cpu_seconds, None)?;
        gauge(e, "process_resident_memory_bytes", "Resident memory size in bytes.", p.resident_bytes)?;
        gauge(e, "process_virtual_memory_bytes", "Virtual memory size in bytes.", p.virtual_bytes)?;
        gauge(e, "process_open_fds", "Number of open file descriptors.", p.open_fds)?;
        if let Some(max) = p.max_fds {
            gauge(e, "process_max_fds", "Maximum number of open file descriptors.", max)?;
        }
        gauge(e, "process_threads", "Number of OS threads in the process.", p.threads)?;
        gauge(
            e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_seconds,
        )
    }
}

struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: Option<u64>,
    threads: u64,
    start_time_seconds: f64,
}

impl ProcessStats {
    #[cfg(target_os = "linux")]
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: fields are
        // counted from after its closing one, field 3 first.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        // SAFETY: sysconf only reads a configuration value.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok()))?;
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            threads: field(20)?,
            start_time_seconds: boot as f64 + field(22)? as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page.max(1) as u64,
            open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as u64,
            max_fds: crate::doctor::nofile_soft().filter(|n| *n != u64::MAX),
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn read() -> Option<Self> {
        None
    }
}

/// Quantile of the observations counted in `delta` (bucket counts), as the bucket's
/// upper bound in seconds.
pub fn quantile(bounds: &[f64], delta: &[u64], q: f64) -> Option<f64> {
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in delta.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bounds.get(i).copied().unwrap_or(f64::INFINITY));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct One(Histogram);

    impl Collector for One {
        fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
            self.0.encode(&mut e.encode_descriptor("x", "h", None, MetricType::Histogram)?)
        }
    }

    #[test]
    fn histograms_are_complete_in_the_exposition() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(1));
        let mut r = Registry::default();
        r.register_collector(Box::new(One(h)));
        let mut out = String::new();
        prometheus_text::encode(&mut out, &r).unwrap();
        assert!(out.contains("x_bucket{le=\"0.01\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 1.055\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn quantiles_pick_the_bucket_holding_the_rank() {
        let b = [0.001, 0.01, 0.1];
        assert_eq!(quantile(&b, &[98, 1, 1, 0], 0.99), Some(0.01));
        assert_eq!(quantile(&b, &[0, 0, 0, 5], 0.5), Some(f64::INFINITY));
        assert_eq!(quantile(&b, &[0, 0, 0, 0], 0.5), None);
    }
}
