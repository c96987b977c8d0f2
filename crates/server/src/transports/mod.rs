//! Transports: thin adapters from a wire format to the session and hub. None of them
//! knows another. What they share — admission of a new streaming connection, reading a
//! token, authorizing channels — lives here.

pub mod client_http;
pub mod mailbox;
pub mod mqtt;
pub(crate) mod parking;
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
use switchboard_core::queue::Written;

/// Origin check and connection limits for a new streaming connection (`/ws`, `/sse`).
/// A streaming connection's places under the connection limits, held for its life: its
/// TCP connection's (kept past a WebSocket upgrade) and, behind a trusted proxy, the
/// forwarded client's.
pub struct Admitted {
    _tcp: Option<TcpSlot>,
    /// Boxed: rare (behind a trusted proxy only), and every connection keeps this.
    _forwarded: Option<Box<ConnSlot>>,
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
    Ok(Admitted { _tcp: ext.get::<TcpSlot>().cloned(), _forwarded: forwarded.map(Box::new) })
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

/// Closes a connection's queue when dropped: however the connection's task ends — even
/// by a panic — its queue closes, which also drops the direct path's hold on the socket.
pub(crate) struct CloseOnDrop(pub std::sync::Arc<switchboard_core::ConnQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(switchboard_core::CloseReason::Normal);
    }
}

/// One `send(2)` of `bytes` on a connection's non-blocking socket, for a queue's direct
/// path (`switchboard_core::queue`): what went, and how many bytes.
///
/// A plain send: tokio's `try_write` would first consult and then update its readiness
/// bookkeeping, a measurable share of a delivery's CPU. If the socket would block, the
/// connection's task learns it from its own (possibly stale, so retried) readiness and a
/// `try_write` that blocks.
pub(crate) fn send_direct(stream: &tokio::net::TcpStream, bytes: &bytes::Bytes) -> (Written, usize) {
    match socket2::SockRef::from(stream).send(bytes) {
        Ok(n) if n == bytes.len() => (Written::All, n),
        Ok(n) => (Written::Part(bytes.slice(n..)), n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => (Written::Blocked, 0),
        Err(_) => (Written::Failed, 0),
    }
}

/// One `sendmsg(2)` of several frames (`bytes` of each of `frames`), as [`send_direct`]:
/// how many went whole, what is left of the next one if it went in part, and how many
/// bytes. `Err` (`WouldBlock` among them) when nothing went.
pub(crate) fn send_direct_many<T>(
    stream: &tokio::net::TcpStream,
    frames: &[T],
    bytes: impl Fn(&T) -> &bytes::Bytes,
) -> std::io::Result<(usize, Option<bytes::Bytes>, usize)> {
    let slices: Vec<std::io::IoSlice<'_>> = frames.iter().map(|f| std::io::IoSlice::new(bytes(f))).collect();
    let sent = socket2::SockRef::from(stream).send_vectored(&slices)?;
    let mut n = sent;
    for (i, f) in frames.iter().enumerate() {
        let f = bytes(f);
        if n < f.len() {
            return Ok((i, (n > 0).then(|| f.slice(n..)), sent));
        }
        n -= f.len();
    }
    Ok((frames.len(), None, sent))
}
