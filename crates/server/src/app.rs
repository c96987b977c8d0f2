//! Shared state and the HTTP surface, declared in one place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;
use switchboard_core::Hub;
use tokio::sync::watch;

use crate::auth::Operation;
use crate::config::Config;
use crate::error::{ApiError, Code};
use crate::{api, transports};

/// Everything a handler may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Inner>,
}

impl AppState {
    /// The server a background task holds `weak` to, while it runs: `None` once it is
    /// gone or shutting down (the task stops).
    pub fn running(weak: &std::sync::Weak<Inner>) -> Option<AppState> {
        let state = AppState { inner: weak.upgrade()? };
        let stopping = *state.shutdown.borrow();
        (!stopping).then_some(state)
    }
}

pub struct Inner {
    pub config: Config,
    /// `--dev`: anonymous API access.
    pub dev: bool,
    pub hub: Arc<Hub>,
    /// Flips to `true` when the server starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    pub draining: AtomicBool,
    /// Upgraded connections (WebSocket), which outlive their HTTP request: shutdown waits
    /// for them separately.
    pub upgraded: ConnTracker,
    /// WebSocket heartbeats and shutdown, one timer for all connections.
    pub heartbeats: crate::heartbeat::Heartbeats,
    /// Token verification; `None` when `[auth]` names no algorithm.
    pub verifier: Option<crate::auth::Verifier>,
    /// The clock token times are checked against (see [`crate::clock`]).
    pub clock: Arc<crate::clock::Clock>,
    pub deny: crate::auth::DenyList,
    pub registry: Arc<crate::registry::Registry>,
    /// MQTT client ids connected to this node (a new connection takes an id over).
    pub mqtt_clients: crate::registry::ClientIds,
    /// The publication sources' counters, once started.
    pub sources: std::sync::OnceLock<Vec<Arc<crate::sources::SourceMetrics>>>,
    /// Outgoing webhooks, when endpoints are configured.
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// Polling clients' direct messages between polls.
    pub mailboxes: crate::transports::mailbox::Mailboxes,
    /// Persistent MQTT sessions kept on this node between connections.
    pub mqtt_sessions: crate::transports::mqtt::sessions::Sessions,
    /// MQTT shared subscription groups on this node.
    pub mqtt_groups: crate::transports::mqtt::shared::Groups,
    /// Subscribers of this node's `$SYS` topics.
    pub mqtt_sys: crate::transports::mqtt::sys::Sys,
    pub limits: Arc<crate::limits::ConnLimits>,
    pub presence: Arc<dyn switchboard_core::presence::PresenceManager>,
    /// This node's id in the cluster.
    pub node_id: String,
    pub admin: crate::admin::AdminState,
    /// Seconds since the Unix epoch when this node started.
    pub started: u64,
    /// This server's metrics (never shared with another server in the process).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// TLS on the listener, when configured.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Direct messages sent to the other nodes, waiting for their answers: request id →
    /// where each node's (node id, delivered) goes.
    pub direct_pending:
        std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::mpsc::UnboundedSender<(String, usize)>>>,
    pub direct_requests: std::sync::atomic::AtomicU64,
    /// The WebTransport development certificate's hash (`/wt/cert-hash`).
    pub webtransport_cert: crate::transports::wt::CertHashSlot,
    /// The registry `/metrics` encodes: this server's series and the process's. An
    /// embedder may add its own.
    pub exposition: prometheus_client::registry::Registry,
}

/// Counts live upgraded connections so shutdown can wait for them.
#[derive(Default)]
pub struct ConnTracker {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by one connection; dropping it counts the connection out.
pub struct ConnGuard(Arc<ConnTracker>);

impl ConnTracker {
    pub fn enter(self: &Arc<Self>) -> ConnGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        ConnGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once no upgraded connection is left.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl ConnTracker {
    fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// An upgraded connection's place in [`Inner::upgraded`], owned (it lives in the
/// connection's task, not in a borrow).
pub struct UpgradedGuard(AppState);

impl AppState {
    /// Counts an upgraded connection until the guard drops.
    pub fn track_upgraded(&self) -> UpgradedGuard {
        self.upgraded.count.fetch_add(1, Ordering::SeqCst);
        UpgradedGuard(self.clone())
    }
}

impl Drop for UpgradedGuard {
    fn drop(&mut self) {
        self.0.upgraded.leave();
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl AppState {
    pub fn new(
        config: Config,
        dev: bool,
        hub: Arc<Hub>,
        presence: Arc<dyn switchboard_core::presence::PresenceManager>,
        shutdown: watch::Receiver<bool>,
        node_id: String,
    ) -> Result<Self, String> {
        let trusted = config
            .security
            .trusted_proxies
            .iter()
            .map(|p| crate::limits::Cidr::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let limits = crate::limits::ConnLimits::new(&config.limits, trusted, crate::doctor::nofile_soft());
        let clock = Arc::new(crate::clock::Clock::default());
        let verifier =
            crate::auth::Verifier::from_config(&config.auth, clock.clone()).map_err(|e| format!("auth: {e}"))?;
        let tls = crate::tls::Tls::from_config(&config.tls, config.http2.enabled).map_err(|e| format!("tls: {e}"))?;
        let webhooks = crate::webhooks::Webhooks::from_config(&config, &node_id).map_err(|e| e.to_string())?;
        Ok(AppState {
            inner: Arc::new_cyclic(|me| Inner {
                exposition: crate::metrics::registry(me.clone()),
                tls,
                config,
                verifier,
                clock,
                deny: crate::auth::DenyList::default(),
                registry: Arc::default(),
                mqtt_clients: Default::default(),
                mailboxes: Default::default(),
                webhooks,
                sources: Default::default(),
                mqtt_sessions: Default::default(),
                mqtt_groups: Default::default(),
                mqtt_sys: Default::default(),
                webtransport_cert: Default::default(),
                direct_pending: Default::default(),
                direct_requests: Default::default(),
                limits,
                presence,
                node_id,
                admin: Default::default(),
                started: crate::auth::unix_now(),
                metrics: Arc::default(),
                dev,
                hub,
                shutdown,
                draining: AtomicBool::new(false),
                upgraded: ConnTracker::default(),
                heartbeats: Default::default(),
            }),
        })
    }
}

impl Inner {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || *self.shutdown.borrow()
    }
}

/// How a route is guarded. Every route declares one in [`table`], and the authorization
/// matrix test walks that table: a route that reads or writes a channel cannot be added
/// without saying which door it goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Touches no channel's data: pages, assets, health, metrics.
    Open,
    /// The server API: `Authorization: Bearer <api key>` (anything goes under `--dev`);
    /// trusted with every channel.
    ApiKey,
    /// A client operation: every channel the request names goes through
    /// [`crate::auth::gate`] for this operation.
    Channels(Operation),
    /// A client's direct message (`POST /send`): it names no channel; `[direct] policy`
    /// decides, as for the `send` command.
    Direct,
    /// The WebSocket endpoints: channels in the URL are gated as [`Operation::Subscribe`],
    /// then each command on its own (see `transports::ws::protocol::COMMANDS`).
    Commands,
}

/// One route of the HTTP surface.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub guard: Guard,
}

fn route<H, T>(method: Method, path: &'static str, guard: Guard, handler: H) -> (Route, MethodRouter<AppState>)
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a method axum can route");
    (Route { method, path, guard }, axum::routing::on(filter, handler))
}

/// The whole HTTP surface, in one place: method, path, guard, handler.
fn table() -> Vec<(Route, MethodRouter<AppState>)> {
    use Guard::{ApiKey, Channels, Commands, Direct, Open};
    use Method as M;
    vec![
        route(M::GET, "/", Open, api::index),
        route(M::GET, "/admin", Open, crate::admin::page),
        route(M::GET, "/admin/api/stats", ApiKey, crate::admin::stats),
        route(M::GET, "/healthz", Open, api::healthz),
        route(M::GET, "/readyz", Open, api::readyz),
        route(M::GET, "/metrics", Open, api::metrics),
        route(M::GET, "/sse", Channels(Operation::Subscribe), transports::sse::handler),
        route(M::GET, "/poll", Channels(Operation::Subscribe), transports::poll::handler),
        route(M::GET, "/ws", Commands, transports::ws::handler),
        // WebSocket over HTTP/2 (RFC 8441 extended CONNECT): the same handler and gate.
        route(M::CONNECT, "/ws", Commands, transports::ws::handler),
        route(M::GET, "/ws/echo", Open, transports::ws::echo_handler),
        // MQTT over WebSocket: each SUBSCRIBE and PUBLISH through the gate, as on TCP.
        route(M::GET, "/mqtt", Commands, transports::mqtt::ws::handler),
        // WebTransport's certificate hash (its sessions are on the UDP listener, through the
        // same door as `/ws`).
        route(M::GET, "/wt/cert-hash", Open, transports::wt::cert_hash),
        route(M::POST, "/publish", Channels(Operation::Publish), transports::client_http::publish),
        route(M::POST, "/send", Direct, transports::client_http::send),
        route(M::GET, "/presence", Channels(Operation::Presence), transports::client_http::presence),
        route(M::GET, "/presence_stats", Channels(Operation::PresenceStats), transports::client_http::presence_stats),
        route(M::GET, "/history", Channels(Operation::History), transports::client_http::history),
        route(M::GET, "/client.js", Open, crate::assets::client_js),
        route(M::GET, "/client.d.ts", Open, crate::assets::client_dts),
        route(M::GET, "/demo/chat", Open, crate::assets::demo_chat),
        route(M::GET, "/demo/call", Open, crate::assets::demo_call),
        route(M::POST, "/api/publish", ApiKey, api::publish),
        route(M::POST, "/api/broadcast", ApiKey, api::broadcast),
        route(M::GET, "/api/history", ApiKey, api::history),
        route(M::GET, "/api/channels", ApiKey, api::channels),
        route(M::GET, "/api/info", ApiKey, api::info),
        route(M::GET, "/api/presence", ApiKey, api::presence),
        route(M::GET, "/api/presence_stats", ApiKey, api::presence_stats),
        route(M::POST, "/api/disconnect", ApiKey, api::disconnect),
        route(M::POST, "/api/send", ApiKey, api::send),
        route(M::POST, "/api/revoke", ApiKey, api::revoke),
        route(M::GET, "/api/webhooks/dead", ApiKey, api::webhooks_dead),
        route(M::POST, "/api/webhooks/replay", ApiKey, api::webhooks_replay),
    ]
}

/// Every route and its guard (for the authorization matrix test and the docs).
pub fn routes() -> Vec<Route> {
    table().into_iter().map(|(r, _)| r).collect()
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (r, handler) in table() {
        let handler = match r.guard {
            Guard::ApiKey => handler.route_layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key)),
            // Browser-facing: CORS for the pages of allowed origins, a refusal for others,
            // and the preflight answer.
            Guard::Channels(_) | Guard::Direct => handler
                .options(crate::cors::preflight)
                .layer(axum::middleware::from_fn_with_state(state.clone(), crate::cors::layer)),
            // The client on a page of another origin reads it before WebTransport.
            Guard::Open if r.path == "/wt/cert-hash" => handler
                .options(crate::cors::preflight)
                .layer(axum::middleware::from_fn_with_state(state.clone(), crate::cors::layer)),
            _ => handler,
        };
        router = router.route(r.path, handler);
    }
    router
        .fallback(|| async { ApiError::new(Code::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::new(Code::MethodNotAllowed, "method not allowed here") })
        .layer(axum::middleware::from_fn(limit_request_head))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_errors))
        .with_state(state)
}

/// Longest request target (path and query) accepted, in bytes.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most request header fields accepted, and their total size in bytes. (Below hyper's
/// own cap of 100 fields, so that a client past ours gets our JSON answer.)
pub const MAX_HEADERS: usize = 64;
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Refuses request heads past the limits above with the documented JSON errors. (The
/// HTTP layer is configured with looser limits of its own — see `Server::run` — so
/// that these, not its bare status lines, are what a client meets.)
async fn limit_request_head(req: Request, next: Next) -> Response {
    let uri = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri > MAX_URI_BYTES {
        return ApiError::new(
            Code::UriTooLong,
            format!("the request target is {uri} bytes; the limit is {MAX_URI_BYTES}"),
        )
        .into_response();
    }
    let headers = req.headers();
    let bytes: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            Code::HeadersTooLarge,
            format!(
                "{} header fields, {bytes} bytes; the limits are {MAX_HEADERS} fields and {MAX_HEADER_BYTES} bytes",
                headers.len()
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// What a connection on a reserved place (past the total cap) may ask: health and
/// metrics. Everything else is told the server is full.
pub fn reserve_router(state: AppState) -> Router {
    let mut router = Router::new();
    for (r, handler) in table() {
        if matches!(r.path, "/healthz" | "/readyz" | "/metrics") {
            router = router.route(r.path, handler);
        }
    }
    router
        .fallback(|| async {
            ApiError::new(Code::TooManyConnections, "the server is at its connection limit").retry_after(5)
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_errors))
        .with_state(state)
}

/// Counts every error response by its code in this server's metrics.
async fn count_errors(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    if let Some(crate::error::ErrorCode(code)) = r.extensions().get::<crate::error::ErrorCode>() {
        state.metrics.error(code.as_str());
    }
    r
}

/// `/api/*` needs `Authorization: Bearer <one of api.keys>` unless the server runs with
/// `--dev`.
async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // Mutual TLS: with a client CA configured, the server API needs a client certificate
    // it verified (on top of the key), whatever the mode.
    if state.tls.as_ref().is_some_and(|t| t.api_needs_client_cert) {
        let verified = req.extensions().get::<crate::listener::ConnInfo>().is_some_and(|c| c.client_cert);
        if !verified {
            let e = ApiError::new(
                Code::ClientCertificateRequired,
                "the server API needs a client certificate signed by tls.client_ca",
            );
            return refuse_after_body(req, e).await;
        }
    }
    if state.dev {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        let e = ApiError::new(Code::Unauthorized, "missing API key: send Authorization: Bearer <key>");
        return refuse_after_body(req, e).await;
    };
    // Check every key, in constant time per key, so timing reveals neither which key
    // matched nor how much of one did.
    let mut ok = false;
    for k in &state.config.api.keys {
        ok |= constant_time_eq(presented.as_bytes(), k.as_bytes());
    }
    if !ok {
        return refuse_after_body(req, ApiError::new(Code::Unauthorized, "invalid API key")).await;
    }
    next.run(req).await
}

/// Refuses a request before its handler, having read (and dropped) a small body first:
/// over HTTP/2 an answer sent while the client is still sending is followed by a stream
/// reset, which some clients (curl) report instead of the answer. Bounded: at most 64 KiB
/// and 2 seconds are spent on it.
async fn refuse_after_body(req: Request, e: ApiError) -> Response {
    let body = req.into_body();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), axum::body::to_bytes(body, 64 * 1024)).await;
    e.into_response()
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as u64;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
