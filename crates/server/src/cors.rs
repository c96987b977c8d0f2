//! CORS for the browser-facing endpoints (SSE, polling, client publish, presence and
//! history over HTTP), driven by the same allowlist as the WebSocket and SSE origin check
//! (`security.allowed_origins`).
//!
//! - A page of an allowed origin gets `Access-Control-Allow-Origin` with its origin and
//!   `Access-Control-Allow-Credentials: true` — credentials only ever for listed origins.
//! - With no list (or `*` in it) every origin may read, without credentials
//!   (`Access-Control-Allow-Origin: *`): what `--dev` and a fresh config do. `serve` and
//!   `config check` warn about it outside `--dev`.
//! - A request from any other origin is refused (`403 origin_not_allowed`) before it does
//!   anything — a cross-site form post must not publish just because the browser would
//!   hide the answer.
//! - A preflight (`OPTIONS`) is answered here, with the methods and headers the clients
//!   use and a max-age.
//!
//! The server API (`/api/*`) is server to server: it sends no CORS headers.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::error::{ApiError, Code};

/// How long a browser may cache a preflight answer.
pub const MAX_AGE_SECS: u32 = 600;

/// Does the allowlist let every origin in?
fn open(state: &AppState) -> bool {
    let list = &state.config.security.allowed_origins;
    list.is_empty() || list.iter().any(|e| e.trim() == "*")
}

/// The request's origin if it may use this server from a page; `Err` if it may not.
fn check(state: &AppState, headers: &HeaderMap) -> Result<Option<HeaderValue>, ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(None) };
    let text = origin.to_str().ok();
    if !crate::origin::allowed(&state.config.security.allowed_origins, text) {
        let shown: String = text.unwrap_or("").chars().take(100).collect();
        return Err(ApiError::new(Code::OriginNotAllowed, format!("origin {shown:?} is not allowed")));
    }
    Ok(Some(origin.clone()))
}

fn allow(state: &AppState, origin: HeaderValue, h: &mut HeaderMap) {
    if open(state) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    } else {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Middleware on every browser-facing route (see the module docs).
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let origin = match check(&state, req.headers()) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let mut r = next.run(req).await;
    if let Some(origin) = origin {
        let h = r.headers_mut();
        allow(&state, origin, h);
        // Scripts may read when to retry after a 429 or 503.
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Retry-After"));
    }
    r
}

/// `OPTIONS` on a browser-facing route: the preflight answer.
pub async fn preflight(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let origin = match check(&state, &headers) {
        Ok(Some(o)) => o,
        Ok(None) => return ApiError::new(Code::InvalidRequest, "a preflight names its Origin").into_response(),
        Err(e) => return e.into_response(),
    };
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    allow(&state, origin, h);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, Last-Event-ID"),
    );
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(MAX_AGE_SECS));
    h.append(header::VARY, HeaderValue::from_static("Access-Control-Request-Method"));
    h.append(header::VARY, HeaderValue::from_static("Access-Control-Request-Headers"));
    r
}
