//! Shared state and the HTTP surface, declared in one place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use switchboard_core::Hub;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::{ApiError, Code};
use crate::{api, transports};

/// Everything a handler may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Inner>,
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
    /// Token verification; `None` when `[auth]` names no algorithm.
    pub verifier: Option<crate::auth::Verifier>,
    /// The clock token times are checked against (see [`crate::clock`]).
    pub clock: Arc<crate::clock::Clock>,
    pub deny: crate::auth::DenyList,
    pub registry: Arc<crate::registry::Registry>,
    pub limits: Arc<crate::limits::ConnLimits>,
    pub presence: Arc<dyn switchboard_core::presence::PresenceManager>,
    /// This node's id in the cluster.
    pub node_id: String,
    pub admin: crate::admin::AdminState,
    /// Seconds since the Unix epoch when this node started.
    pub started: u64,
    /// This server's metrics (never shared with another server in the process).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Counts live upgraded connections so shutdown can wait for them.
#[derive(Default)]
pub struct ConnTracker {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by one upgraded connection; dropping it counts the connection out.
pub struct ConnGuard<'a>(&'a ConnTracker);

impl ConnTracker {
    pub fn enter(&self) -> ConnGuard<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        ConnGuard(self)
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

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
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
        let limits = crate::limits::ConnLimits::new(&config.limits);
        let clock = Arc::new(crate::clock::Clock::default());
        let verifier = crate::auth::Verifier::from_config(&config.auth, clock.clone())?;
        Ok(AppState {
            inner: Arc::new(Inner {
                config,
                verifier,
                clock,
                deny: crate::auth::DenyList::default(),
                registry: Arc::default(),
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
            }),
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || *self.shutdown.borrow()
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/publish", post(api::publish))
        .route("/broadcast", post(api::broadcast))
        .route("/history", get(api::history))
        .route("/channels", get(api::channels))
        .route("/info", get(api::info))
        .route("/presence", get(api::presence))
        .route("/presence_stats", get(api::presence_stats))
        .route("/disconnect", post(api::disconnect))
        .route("/revoke", post(api::revoke))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key));
    let admin_api = Router::new()
        .route("/stats", get(crate::admin::stats))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .route("/", get(api::index))
        .route("/admin", get(crate::admin::page))
        .nest("/admin/api", admin_api)
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/sse", get(transports::sse::handler))
        .route("/poll", get(transports::poll::handler))
        .route("/ws", get(transports::ws::handler))
        .route("/ws/echo", get(transports::ws::echo_handler))
        .route("/publish", post(transports::client_http::publish))
        .route("/presence", get(transports::client_http::presence))
        .route("/presence_stats", get(transports::client_http::presence_stats))
        .route("/client.js", get(crate::assets::client_js))
        .route("/client.d.ts", get(crate::assets::client_dts))
        .route("/demo/chat", get(crate::assets::demo_chat))
        .nest("/api", api)
        .fallback(|| async { ApiError::new(Code::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::new(Code::MethodNotAllowed, "method not allowed here") })
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
        return ApiError::new(Code::Unauthorized, "missing API key: send Authorization: Bearer <key>").into_response();
    };
    // Check every key, in constant time per key, so timing reveals neither which key
    // matched nor how much of one did.
    let mut ok = false;
    for k in &state.config.api.keys {
        ok |= constant_time_eq(presented.as_bytes(), k.as_bytes());
    }
    if !ok {
        return ApiError::new(Code::Unauthorized, "invalid API key").into_response();
    }
    next.run(req).await
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
