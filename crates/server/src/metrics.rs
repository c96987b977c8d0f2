//! Prometheus metrics, in the text exposition format, from the server's own atomics.
//!
//! Every server instance owns its [`Metrics`] (in its `AppState`), so two servers in one
//! process — tests, embedders — never see each other's numbers. A handful of counters and gauges updated on hot paths with relaxed atomics, and
//! histograms with fixed, explicit buckets. Rendering reads them (and the hub's own
//! counters) at scrape time; nothing is allocated per message. Names and meanings are in
//! docs/operations.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::app::AppState;

/// A transport, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
    Poll,
}

const TRANSPORTS: [(&str, Transport); 3] = [("ws", Transport::Ws), ("sse", Transport::Sse), ("poll", Transport::Poll)];

/// Histogram with explicit upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Bucket counts (non-cumulative) — for computing quantiles over a window.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count.load(Ordering::Relaxed));
    }
}

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Every metric the server keeps.
pub struct Metrics {
    pub connections: [AtomicI64; 3],
    pub handshakes: [AtomicU64; 3],
    pub publishes_stored: AtomicU64,
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
            errors: Mutex::new(Default::default()),
        }
    }

    fn idx(t: Transport) -> usize {
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

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One series per value of `label`: `name{label="value"} n`.
fn by_label(out: &mut String, name: &str, label: &str, values: &[(&str, u64)]) {
    for (value, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// The whole exposition.
pub fn render(state: &AppState) -> String {
    let m = &*state.metrics;
    let queues = &state.hub.stats.queues;
    let mut out = String::with_capacity(8192);
    metric(
        &mut out,
        "switchboard_connections",
        "gauge",
        "Open client connections by transport (poll: requests in flight).",
    );
    for (name, t) in TRANSPORTS {
        let _ = writeln!(out, "switchboard_connections{{transport=\"{name}\"}} {}", m.open_connections(t));
    }
    metric(
        &mut out,
        "switchboard_handshakes_total",
        "counter",
        "Accepted connections (handshakes, poll requests) by transport.",
    );
    for (name, t) in TRANSPORTS {
        let _ = writeln!(
            out,
            "switchboard_handshakes_total{{transport=\"{name}\"}} {}",
            m.handshakes[Metrics::idx(t)].load(Ordering::Relaxed)
        );
    }
    let channels = state.hub.channels();
    metric(&mut out, "switchboard_channels", "gauge", "Channels with local subscribers.");
    let _ = writeln!(out, "switchboard_channels {}", channels.len());
    metric(&mut out, "switchboard_subscriptions", "gauge", "Local subscriptions (channels and patterns).");
    let _ = writeln!(
        out,
        "switchboard_subscriptions {}",
        channels.iter().map(|(_, n)| n).sum::<usize>() + state.hub.pattern_subscriptions()
    );
    metric(
        &mut out,
        "switchboard_publications_total",
        "counter",
        "Publications accepted on this node (API and clients) by kind.",
    );
    by_label(
        &mut out,
        "switchboard_publications_total",
        "kind",
        &[
            ("stored", m.publishes_stored.load(Ordering::Relaxed)),
            ("volatile", m.publishes_volatile.load(Ordering::Relaxed)),
        ],
    );
    metric(&mut out, "switchboard_hub_publications_total", "counter", "Publications fanned out to local subscribers.");
    let _ =
        writeln!(out, "switchboard_hub_publications_total {}", state.hub.stats.publications.load(Ordering::Relaxed));
    metric(&mut out, "switchboard_deliveries_total", "counter", "Publications queued to subscriber connections.");
    let _ = writeln!(out, "switchboard_deliveries_total {}", state.hub.stats.deliveries.load(Ordering::Relaxed));
    metric(&mut out, "switchboard_bytes_out_total", "counter", "Bytes written to WebSocket and SSE clients.");
    let _ = writeln!(out, "switchboard_bytes_out_total {}", m.bytes_out.load(Ordering::Relaxed));
    metric(
        &mut out,
        "switchboard_queue_dropped_volatile_total",
        "counter",
        "Volatile messages dropped under backpressure.",
    );
    let _ = writeln!(out, "switchboard_queue_dropped_volatile_total {}", queues.volatile_drops.load(Ordering::Relaxed));
    metric(
        &mut out,
        "switchboard_slow_consumer_disconnects_total",
        "counter",
        "Connections closed because their queue overflowed.",
    );
    let _ = writeln!(
        out,
        "switchboard_slow_consumer_disconnects_total {}",
        queues.slow_consumer_closes.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "switchboard_resumes_total",
        "counter",
        "Subscriptions that asked to resume from a position, by outcome.",
    );
    by_label(
        &mut out,
        "switchboard_resumes_total",
        "outcome",
        &[
            ("recovered", m.resumes_recovered.load(Ordering::Relaxed)),
            ("reset", m.resumes_reset.load(Ordering::Relaxed)),
        ],
    );
    metric(
        &mut out,
        "switchboard_broker_errors_total",
        "counter",
        "Broker operations that failed (e.g. Redis unreachable).",
    );
    let _ = writeln!(out, "switchboard_broker_errors_total {}", m.broker_errors.load(Ordering::Relaxed));
    metric(
        &mut out,
        "switchboard_broker_operation_duration_seconds",
        "histogram",
        "Broker publish and history latency.",
    );
    m.broker_publish.render(&mut out, "switchboard_broker_operation_duration_seconds", "op=\"publish\"");
    m.broker_history.render(&mut out, "switchboard_broker_operation_duration_seconds", "op=\"history\"");
    metric(
        &mut out,
        "switchboard_delivery_latency_seconds",
        "histogram",
        "From a publication's acceptance by the broker to its fan-out on this node.",
    );
    let snap = state.hub.stats.latency_snapshot();
    let mut cumulative = 0;
    for (i, b) in switchboard_core::hub::LATENCY_BOUNDS_MS.iter().enumerate() {
        cumulative += snap[i];
        let _ =
            writeln!(out, "switchboard_delivery_latency_seconds_bucket{{le=\"{}\"}} {cumulative}", *b as f64 / 1000.0);
    }
    cumulative += snap[snap.len() - 1];
    let _ = writeln!(out, "switchboard_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "switchboard_delivery_latency_seconds_count {cumulative}");
    metric(&mut out, "switchboard_errors_total", "counter", "Errors returned to clients, by code (token_* are auth failures; server_busy and rate_limited are rate-limit rejections).");
    for (code, n) in m.errors() {
        let _ = writeln!(out, "switchboard_errors_total{{code=\"{code}\"}} {n}");
    }
    if let Some((channels, forgotten)) = state.hub.broker().memory_stats() {
        metric(&mut out, "switchboard_broker_channels", "gauge", "Channels the in-memory broker keeps state for.");
        let _ = writeln!(out, "switchboard_broker_channels {channels}");
        metric(
            &mut out,
            "switchboard_broker_unused_channels_forgotten_total",
            "counter",
            "Channels made by reads alone, forgotten to stay within broker.max_unused_channels.",
        );
        let _ = writeln!(out, "switchboard_broker_unused_channels_forgotten_total {forgotten}");
    }
    metric(
        &mut out,
        "switchboard_tcp_connections",
        "gauge",
        "Open TCP connections of every kind (what limits.max_connections caps).",
    );
    let _ = writeln!(out, "switchboard_tcp_connections {}", state.limits.open());
    metric(&mut out, "switchboard_connections_refused_total", "counter", "Connections refused at accept, by cap.");
    by_label(
        &mut out,
        "switchboard_connections_refused_total",
        "cap",
        &[("total", m.refused_total_cap.load(Ordering::Relaxed)), ("ip", m.refused_ip_cap.load(Ordering::Relaxed))],
    );
    metric(&mut out, "switchboard_task_panics_total", "counter", "Connection tasks that panicked (connection closed).");
    let _ = writeln!(out, "switchboard_task_panics_total {}", m.task_panics.load(Ordering::Relaxed));
    metric(&mut out, "switchboard_draining", "gauge", "1 while the node drains.");
    let _ = writeln!(out, "switchboard_draining {}", state.is_draining() as u8);
    out
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

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.01\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
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
