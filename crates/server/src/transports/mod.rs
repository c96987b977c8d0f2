//! Transports: thin adapters from a wire format to the session and hub. None of them
//! knows another. What they share — admission of a new streaming connection, reading a
//! token, authorizing channels — lives here.

pub mod client_http;
pub mod poll;
pub mod sse;
pub mod ws;

use axum::http::{Extensions, HeaderMap};

use crate::app::AppState;
use crate::auth::{self, Action, Identity};
use crate::error::{ApiError, Code};
use crate::limits::{ConnSlot, PeerAddr};
use crate::session::{Query, Resolved};

/// Origin check and connection limits for a new streaming connection (`/ws`, `/sse`).
pub(crate) fn admit(state: &AppState, headers: &HeaderMap, ext: &Extensions) -> Result<ConnSlot, ApiError> {
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
    let ip = ext.get::<PeerAddr>().map(|p| p.0.ip());
    state.limits.admit(ip)
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

/// Authorizes `who` to subscribe to every channel; private channels take the first of
/// `sub_tokens` that was issued for them.
pub(crate) fn authorize_subscribe_all(
    state: &AppState,
    who: Option<&Identity>,
    channels: &[Resolved],
    sub_tokens: &[String],
) -> Result<(), ApiError> {
    for r in channels {
        let mut last_err = None;
        let candidates: Vec<Option<&str>> = if r.options.private && !sub_tokens.is_empty() {
            sub_tokens.iter().map(|t| Some(t.as_str())).collect()
        } else {
            vec![None]
        };
        let mut ok = false;
        for t in candidates {
            match auth::authorize(who, r, Action::Subscribe, t, state.verifier.as_ref(), &state.deny) {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        if !ok {
            return Err(last_err.expect("at least one candidate was tried"));
        }
    }
    Ok(())
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
