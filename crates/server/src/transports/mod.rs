//! Transports: thin adapters from a wire format to the session and hub. None of them
//! knows another. What they share — admission of a new streaming connection, reading a
//! token, authorizing channels — lives here.

pub mod client_http;
pub mod mailbox;
pub mod mqtt;
pub mod poll;
pub mod sse;
pub mod sse_direct;
pub mod ws;
pub mod wt;

use axum::http::{Extensions, HeaderMap};

use crate::app::AppState;
use crate::auth::{self, Identity, Operation};
use crate::error::{ApiError, Code};
use crate::limits::{ConnSlot, PeerAddr, TcpSlot};
use crate::session::{Query, Resolved};

/// Origin check and connection limits for a new streaming connection (`/ws`, `/sse`).
/// A streaming connection's places under the connection limits, held for its life: its
/// TCP connection's (kept past a WebSocket upgrade) and, behind a trusted proxy, the
/// forwarded client's.
pub struct Admitted {
    _tcp: Option<TcpSlot>,
    _forwarded: Option<ConnSlot>,
}

pub(crate) fn admit(state: &AppState, headers: &HeaderMap, ext: &Extensions) -> Result<Admitted, ApiError> {
    let origin = headers.get("origin").and_then(|v| v.to_str().ok());
    if !crate::origin::allowed(&state.config.security.allowed_origins, origin) {
        return Err(ApiError::new(
            Code::OriginNotAllowed,
            format!("origin {:?} is not allowed", origin.unwrap_or("").chars().take(100).collect::<String>()),
        ));
    }
    if state.is_draining() {
        return Err(ApiError::new(Code::ServerBusy, "this node is draining; connect to another").retry_after(1));
    }
    state.limits.take_handshake()?;
    let forwarded = forwarded_slot(state, headers, ext)?;
    Ok(Admitted { _tcp: ext.get::<TcpSlot>().cloned(), _forwarded: forwarded })
}

/// The client's address: the peer's, or the one a trusted proxy forwards.
pub(crate) fn client_ip(state: &AppState, headers: &HeaderMap, ext: &Extensions) -> Option<std::net::IpAddr> {
    ext.get::<PeerAddr>().map(|p| state.limits.client_ip(p.0.ip(), headers))
}

/// Behind a trusted proxy, a per-IP place for the client it forwards (the proxy's own
/// TCP connection is not capped per IP).
pub(crate) fn forwarded_slot(
    state: &AppState,
    headers: &HeaderMap,
    ext: &Extensions,
) -> Result<Option<ConnSlot>, ApiError> {
    let Some(peer) = ext.get::<PeerAddr>().map(|p| p.0.ip()) else { return Ok(None) };
    if !state.limits.is_trusted_proxy(peer) {
        return Ok(None);
    }
    state.limits.admit_forwarded(state.limits.client_ip(peer, headers)).map(Some)
}

/// The connection token of an HTTP request: `?token=` or `Authorization: Bearer`.
pub(crate) fn identity(state: &AppState, headers: &HeaderMap, q: &Query) -> Result<Option<Identity>, ApiError> {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = q.get("token").or(bearer).map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    verify(state, token).map(Some)
}

/// Verifies a connection token and checks the deny list.
pub(crate) fn verify(state: &AppState, token: &str) -> Result<Identity, ApiError> {
    let verifier = state.verifier.as_ref().ok_or_else(|| {
        ApiError::new(Code::TokenInvalid, "this server does not accept tokens (no [auth] algorithm configured)")
    })?;
    let who = verifier.connection(token)?;
    state.deny.check(&who)?;
    Ok(who)
}

/// Asks the gate ([`auth::gate`]) about `op` on every channel of a request.
pub(crate) fn gate_all(
    state: &AppState,
    op: Operation,
    channels: &[Resolved],
    c: &auth::Credentials<'_>,
) -> Result<(), ApiError> {
    channels.iter().try_for_each(|r| state.gate(op, r, c))
}

/// A token-expiry timer on the server's [`crate::clock::Clock`]. Boxed: only connections
/// with a token carry one.
pub(crate) type Timer = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>;

/// A timer that fires when the server's clock reaches `deadline_ms` (Unix ms).
pub(crate) fn timer(state: &AppState, deadline_ms: u64) -> Timer {
    let clock = state.clock.clone();
    Box::pin(async move { clock.sleep_until_ms(deadline_ms).await })
}

/// Waits on an optional timer (never resolves when there is none): a `select!` branch
/// for token expiry that costs nothing on connections without a token.
pub(crate) async fn maybe_sleep(t: &mut Option<Timer>) {
    match t {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}
