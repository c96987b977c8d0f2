//! The admin dashboard: a page (`/admin`) fed by `/admin/api/stats`, which a sampler
//! refreshes every second — connections per transport, messages/s and p99 latency over
//! the last five minutes, top channels by subscribers with their publish rate, and the
//! cluster's nodes. The data endpoint takes a server API key (open under `--dev`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::app::AppState;
use crate::error::ApiError;
use crate::lock;
use crate::metrics::Transport;

const PAGE: &str = include_str!("../assets/admin.html");
const HISTORY: usize = 300;

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    pub publications_per_sec: f64,
    pub deliveries_per_sec: f64,
    /// p99 publish→fan-out latency over the second, in ms (upper bucket bound).
    pub p99_ms: Option<f64>,
    pub connections: i64,
}

#[derive(Default)]
pub struct AdminState {
    series: Mutex<VecDeque<Sample>>,
    /// channel → (epoch, offset) at the last sample, for publish rates.
    offsets: Mutex<HashMap<String, (String, u64)>>,
    rates: Mutex<HashMap<String, f64>>,
}

fn connections(state: &AppState) -> i64 {
    state.metrics.open_connections(Transport::Ws) + state.metrics.open_connections(Transport::Sse)
}

/// Samples once a second until the server goes away.
pub fn start_sampler(state: &AppState) {
    let weak = std::sync::Arc::downgrade(&state.inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last: Option<(u64, u64, Vec<u64>)> = None;
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            let state = AppState { inner };
            let stats = &state.hub.stats;
            let (p, d, lat) = (
                stats.publications.load(Ordering::Relaxed),
                stats.deliveries.load(Ordering::Relaxed),
                stats.latency_snapshot(),
            );
            if let Some((lp, ld, llat)) = &last {
                let delta: Vec<u64> = lat.iter().zip(llat).map(|(a, b)| a - b).collect();
                let bounds: Vec<f64> = switchboard_core::hub::LATENCY_BOUNDS_MS.iter().map(|b| *b as f64).collect();
                let sample = Sample {
                    t: switchboard_core::now_millis(),
                    publications_per_sec: (p - lp) as f64,
                    deliveries_per_sec: (d - ld) as f64,
                    p99_ms: crate::metrics::quantile(&bounds, &delta, 0.99).filter(|v| v.is_finite()),
                    connections: connections(&state),
                };
                let mut s = lock(&state.admin.series);
                s.push_back(sample);
                while s.len() > HISTORY {
                    s.pop_front();
                }
            }
            last = Some((p, d, lat));
            sample_channel_rates(&state).await;
        }
    });
}

async fn sample_channel_rates(state: &AppState) {
    let mut top = state.hub.channels();
    top.sort_by_key(|c| std::cmp::Reverse(c.1));
    top.truncate(10);
    let mut rates = HashMap::new();
    for (ch, _) in &top {
        let Ok(pos) = state.hub.broker().position(ch).await else { continue };
        let prev = lock(&state.admin.offsets).insert(ch.to_string(), (pos.epoch.to_string(), pos.offset));
        let rate = match prev {
            Some((e, o)) if *e == *pos.epoch => pos.offset.saturating_sub(o) as f64,
            _ => 0.0,
        };
        rates.insert(ch.to_string(), rate);
    }
    lock(&state.admin.offsets).retain(|c, _| rates.contains_key(c));
    *lock(&state.admin.rates) = rates;
}

/// `GET /admin`: the dashboard page (its data needs a key).
///
/// The page may not be framed (clickjacking its Disconnect button), and its Content
/// Security Policy lets only its own inline script and style run — marked with a nonce
/// made for this response — and talk only to this server.
pub async fn page() -> Response {
    let nonce = format!("{:032x}", fastrand::u128(..));
    let html = PAGE
        .replace("<script>", &format!("<script nonce=\"{nonce}\">"))
        .replace("<style>", &format!("<style nonce=\"{nonce}\">"));
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let mut r = (StatusCode::OK, [("content-type", "text/html; charset=utf-8"), ("cache-control", "no-store")], html)
        .into_response();
    let h = r.headers_mut();
    h.insert("x-frame-options", axum::http::HeaderValue::from_static("DENY"));
    h.insert("x-content-type-options", axum::http::HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", axum::http::HeaderValue::from_static("no-referrer"));
    h.insert("content-security-policy", axum::http::HeaderValue::from_str(&csp).expect("ASCII"));
    r
}

/// `GET /admin/api/stats`.
pub async fn stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut channels = state.hub.channels();
    channels.sort_by_key(|c| std::cmp::Reverse(c.1));
    channels.truncate(10);
    let rates = lock(&state.admin.rates).clone();
    let top: Vec<_> = channels
        .iter()
        .map(|(c, n)| serde_json::json!({"channel": c, "subscribers": n, "publications_per_sec": rates.get(c.as_str()).copied().unwrap_or(0.0)}))
        .collect();
    let nodes = match state.hub.broker().nodes().await {
        Ok(Some(n)) => n,
        _ => vec![crate::cluster::node_info(&state)],
    };
    let series: Vec<Sample> = lock(&state.admin.series).iter().cloned().collect();
    let body = serde_json::json!({
        "node": state.node_id,
        "draining": state.is_draining(),
        "connections": {
            "ws": state.metrics.open_connections(Transport::Ws),
            "sse": state.metrics.open_connections(Transport::Sse),
            "poll": state.metrics.open_connections(Transport::Poll),
        },
        "totals": {
            "publications": state.metrics.publishes_stored.load(Ordering::Relaxed) + state.metrics.publishes_volatile.load(Ordering::Relaxed),
            "deliveries": state.hub.stats.deliveries.load(Ordering::Relaxed),
            "slow_consumer_disconnects": state.hub.stats.queues.slow_consumer_closes.load(Ordering::Relaxed),
        },
        "channels": top,
        "nodes": nodes,
        "sources": crate::sources::summary(&state),
        "series": series,
    });
    Ok((StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response())
}
