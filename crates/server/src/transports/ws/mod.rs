//! WebSocket: `GET /ws`, subprotocol `switchboard.v1` (docs/protocol.md).
//!
//! The handshake is answered here; after the upgrade the TCP stream is taken back from
//! hyper and served by [`connection`], which owns the framing ([`frame`]) so that a
//! publication's frame — plain or compressed ([`deflate`]) — is built once and written to
//! every subscriber as the same bytes.

pub mod connection;
pub mod deflate;
pub mod frame;
pub mod io;
/// The `switchboard.v1` commands (transport-neutral: [`crate::commands`]).
pub use crate::commands::protocol;

use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::app::AppState;
use crate::cursor;
use crate::error::{ApiError, Code};
use crate::session::{self, Query};
use io::Socket;

pub const SUBPROTOCOL: &str = "switchboard.v1";
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Whether a comma-separated header (`Upgrade`, `Connection`, …) lists `token`.
pub(crate) fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// `Sec-WebSocket-Accept` for the request's `Sec-WebSocket-Key`, which must be the base64
/// of 16 bytes (RFC 6455 §4.2.1).
pub(crate) fn accept_for(headers: &axum::http::HeaderMap) -> Result<String, ApiError> {
    let key = headers.get("sec-websocket-key").and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or("");
    if !base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|k| k.len() == 16) {
        return Err(ApiError::new(Code::InvalidRequest, "missing or malformed Sec-WebSocket-Key"));
    }
    Ok(accept_key(key))
}

pub async fn handler(State(state): State<AppState>, RawQuery(raw): RawQuery, mut req: Request) -> Response {
    respond(upgrade(state, raw, &mut req, false))
}

/// `GET /ws/echo` (`--dev` only): the conformance echo endpoint.
pub async fn echo_handler(State(state): State<AppState>, mut req: Request) -> Response {
    if !state.dev {
        return ApiError::new(Code::NotFound, "the echo endpoint exists under --dev only").into_response();
    }
    respond(upgrade(state, None, &mut req, true))
}

fn respond(r: Result<Response, ApiError>) -> Response {
    match r {
        Ok(r) => r,
        Err(e) => {
            let mut r = e.clone().into_response();
            if e.code == Code::UpgradeRequired {
                r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
                r.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            }
            r
        }
    }
}

fn upgrade(state: AppState, raw: Option<String>, req: &mut Request, echo: bool) -> Result<Response, ApiError> {
    if !state.config.ws.enabled {
        return Err(ApiError::new(Code::TransportDisabled, "the WebSocket transport is disabled on this server"));
    }
    let headers = req.headers();
    // HTTP/2 (RFC 8441): an extended CONNECT with `:protocol = websocket` on a stream of
    // the connection, answered 200; HTTP/1.1 (RFC 6455): an Upgrade, answered 101.
    let over_h2 = req.method() == axum::http::Method::CONNECT;
    if over_h2 {
        let protocol = req.extensions().get::<hyper::ext::Protocol>().map(|p| p.as_str());
        if !protocol.is_some_and(|p| p.eq_ignore_ascii_case("websocket")) {
            return Err(ApiError::new(Code::UpgradeRequired, "CONNECT here needs `:protocol websocket` (RFC 8441)"));
        }
    } else if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(ApiError::new(Code::UpgradeRequired, "this endpoint speaks WebSocket: send an Upgrade request"));
    }
    if headers.get("sec-websocket-version").and_then(|v| v.to_str().ok()) != Some("13") {
        return Err(ApiError::new(Code::UpgradeRequired, "unsupported Sec-WebSocket-Version; this server speaks 13"));
    }
    let accept = if over_h2 { None } else { Some(accept_for(headers)?) };
    let deflate = state.config.ws.deflate
        && deflate::negotiate(headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok()));
    // The same door as every streaming connection: origin, draining, rate and caps.
    let slot = super::admit(&state, headers, req.extensions())?;
    if echo {
        let on_upgrade = take_upgrade(req)?;
        // The same message limit as `/ws` (Autobahn|Testsuite runs raise it to 16 MiB).
        let max = state.config.limits.max_message_bytes + connection::ENVELOPE_BYTES;
        let metrics = state.metrics.clone();
        spawn_upgraded(&metrics, "websocket", on_upgrade, move |io, pre| {
            connection::serve_echo(io, pre, deflate, max, slot)
        });
        return Ok(accepted(&state, accept.as_deref(), false, deflate));
    }
    let protocol_offered = header_has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);

    // Zero-library mode: channels in the URL are subscribed at connect (with `?token=`
    // for protected ones). Their errors are ordinary HTTP errors, before the upgrade.
    let q = Query::parse(raw.as_deref());
    let (url_channels, url_patterns) =
        if q.channels.is_empty() { (Vec::new(), Vec::new()) } else { session::resolve_mixed(&state, &q.channels)? };
    let identity = super::identity(&state, headers, &q)?;
    let sub_tokens = q.all("sub_token");
    let cred = crate::auth::Credentials { who: identity.as_ref(), sub_tokens: &sub_tokens, subscribed: false };
    super::gate_all(&state, crate::auth::Operation::Subscribe, &url_channels, &cred)?;
    for p in &url_patterns {
        crate::auth::gate_pattern(identity.as_ref(), p, &state.deny)?;
    }
    let url_cursor = match q.get("since").filter(|s| !s.is_empty()) {
        Some(_) if url_channels.is_empty() => {
            return Err(ApiError::new(Code::InvalidRequest, "`since` needs `channel` parameters"));
        }
        Some(s) => Some(cursor::parse(s, url_channels.len())?),
        None => None,
    };

    let ip = super::client_ip(&state, headers, req.extensions());
    tracing::debug!(client_ip = ?ip, channels = url_channels.len(), "websocket handshake accepted");
    let on_upgrade = take_upgrade(req)?;
    let url_rewind = session::check_rewind(&url_channels, q.int("rewind", 1..=u32::MAX as u64, Code::BadRewind)?)?;
    let metrics = state.metrics.clone();
    let response = accepted(&state, accept.as_deref(), protocol_offered, deflate);
    // Boxed: the closure that waits for the upgrade carries it, and an idle connection's
    // task should not (see `connection::serve`).
    let ctx = Box::new(connection::Ctx {
        state,
        deflate,
        url_channels,
        url_cursor,
        url_rewind,
        url_patterns,
        identity,
        slot,
    });
    spawn_upgraded(&metrics, "websocket", on_upgrade, move |io, pre| connection::serve(io, pre, ctx));
    Ok(response)
}

pub(crate) fn take_upgrade(req: &mut Request) -> Result<hyper::upgrade::OnUpgrade, ApiError> {
    req.extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| ApiError::new(Code::UpgradeRequired, "this connection cannot be upgraded (HTTP/1.1 required)"))
}

/// Once hyper hands the connection over, serves it with `serve` — guarded, so a panic
/// closes it. A plain TCP stream is taken back from hyper (with the bytes it already
/// read); TLS or an HTTP/2 stream is served through hyper's upgraded stream.
pub(crate) fn spawn_upgraded<F, Fut>(
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
    task: &'static str,
    on_upgrade: hyper::upgrade::OnUpgrade,
    serve: F,
) where
    F: FnOnce(Socket, bytes::Bytes) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let metrics = metrics.clone();
    tokio::spawn(crate::guarded(metrics.clone(), task, async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("{task} upgrade failed: {e}");
                return;
            }
        };
        let served = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => serve(Socket::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => serve(Socket::Stream(Box::new(TokioIo::new(upgraded))), bytes::Bytes::new()),
        };
        // A task of its own: the connection lives in it, and its memory is the
        // connection's future alone, not this waiting's too.
        tokio::spawn(crate::guarded(metrics, task, served));
    }));
}

/// 101 Switching Protocols to a WebSocket, with the key's `Sec-WebSocket-Accept`.
pub(crate) fn switching_protocols(accept: &str) -> Response {
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(accept).expect("base64 is a valid header value"));
    r
}

/// The answer to a valid handshake: 101 with `Sec-WebSocket-Accept` over HTTP/1.1, 200
/// over HTTP/2 (RFC 8441 has no key and no accept).
fn accepted(state: &AppState, accept: Option<&str>, protocol: bool, deflate: bool) -> Response {
    let mut r = match accept {
        Some(accept) => switching_protocols(accept),
        None => {
            state.metrics.ws_over_http2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            StatusCode::OK.into_response()
        }
    };
    let h = r.headers_mut();
    if protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    }
    if deflate {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(deflate::RESPONSE));
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(super::accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
