//! Serving one accepted connection, by what its listener speaks:
//!
//! - plain HTTP/1.1 — an SSE request on a fresh connection is served outside hyper
//!   ([`crate::transports::sse_direct`]), everything else by hyper, WebSockets upgraded;
//! - TLS — HTTP/2 or HTTP/1.1 as ALPN decides; over HTTP/2 WebSockets arrive as extended
//!   CONNECT (RFC 8441);
//! - the plain listener beside a TLS one — a redirect to HTTPS, or the whole server.
//!
//! Every request, whatever carried it, goes through the same router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::app::{AppState, ConnGuard, ConnTracker};
use crate::config::HttpMode;
use crate::error::{ApiError, Code};
use crate::limits::{ConnSlot, PeerAddr, TcpSlot};
use crate::transports::sse_direct;

/// How a request reached the server, in its extensions.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnInfo {
    /// Over TLS.
    pub tls: bool,
    /// The client presented a certificate the configured client CA verified.
    pub client_cert: bool,
}

/// Which listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `listen`: TLS when configured, else plain HTTP.
    Main,
    /// `tls.http_listen`: plain HTTP beside the TLS listener.
    Plain(HttpMode),
    /// `mqtt.listen` / `mqtt.tls_listen` (served by `transports::mqtt`, not here).
    Mqtt { tls: bool },
}

/// What every connection task needs from the accept loop.
pub struct Conns {
    pub state: AppState,
    pub app: Router,
    /// Health and metrics only, for connections past the total cap.
    pub reserve_app: Router,
    pub connections: Arc<ConnTracker>,
    /// The TLS listener's port, for redirects.
    pub https_port: u16,
}

impl Conns {
    /// Serves `tcp` in a task of its own.
    pub fn spawn(&self, tcp: TcpStream, peer: SocketAddr, slot: ConnSlot, reserve: bool, listener: Listener) {
        let slot = Arc::new(slot);
        let app = if reserve { self.reserve_app.clone() } else { self.app.clone() };
        let state = self.state.clone();
        let tracked = self.connections.enter();
        let https_port = self.https_port;
        tokio::spawn(crate::guarded(self.state.metrics.clone(), "http connection", async move {
            match (listener, state.tls.clone()) {
                (Listener::Main, Some(tls)) => serve_tls(tcp, tls, app, state, peer, slot, reserve, tracked).await,
                (Listener::Plain(HttpMode::Redirect), _) => {
                    let service = redirect_service(app, peer, slot, https_port);
                    let _tracked = tracked;
                    serve_h1(TokioIo::new(tcp), service, &state, true).await
                }
                _ => serve_plain(tcp, app, state, peer, slot, reserve, tracked).await,
            }
        }));
    }
}

/// The hyper service for one connection: the router, with what it needs to know about
/// the connection in each request's extensions.
fn service(
    app: Router,
    peer: SocketAddr,
    slot: Arc<ConnSlot>,
    info: ConnInfo,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(PeerAddr(peer));
        req.extensions_mut().insert(TcpSlot(slot.clone()));
        req.extensions_mut().insert(info);
        tower::ServiceExt::oneshot(app.clone(), req.map(axum::body::Body::new))
    })
}

#[allow(clippy::too_many_arguments)]
async fn serve_plain(
    tcp: TcpStream,
    app: Router,
    state: AppState,
    peer: SocketAddr,
    slot: Arc<ConnSlot>,
    reserve: bool,
    tracked: ConnGuard,
) {
    if !reserve {
        // An SSE request on a fresh connection is served outside hyper, by a task of
        // its own (this one's future is hyper's size).
        match sse_direct::sniff(&tcp).await {
            sse_direct::Sniffed::Other => {}
            sse_direct::Sniffed::Gone => return,
            sse_direct::Sniffed::Sse => {
                let metrics = state.metrics.clone();
                tokio::spawn(crate::guarded(metrics, "sse stream", async move {
                    let _tracked = tracked;
                    sse_direct::serve(tcp, app, state, peer, slot).await
                }));
                return;
            }
        }
    }
    let _tracked = tracked;
    let service = service(app, peer, slot, ConnInfo::default());
    serve_h1(TokioIo::new(tcp), service, &state, reserve).await
}

#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    tcp: TcpStream,
    tls: Arc<crate::tls::Tls>,
    app: Router,
    state: AppState,
    peer: SocketAddr,
    slot: Arc<ConnSlot>,
    reserve: bool,
    tracked: ConnGuard,
) {
    let _tracked = tracked;
    // A TLS connection starts with a handshake record (22); anything else is most likely
    // plain HTTP sent to the HTTPS port: say so in plain HTTP.
    let mut first = [0u8; 1];
    match tokio::time::timeout(tls.handshake_timeout, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != 0x16 => {
            state.metrics.error(Code::TlsRequired.as_str());
            let e = ApiError::new(Code::TlsRequired, "this port speaks TLS: use https:// (or wss://)");
            return crate::limits::refuse(tcp, e).await;
        }
        Ok(Ok(1)) => {}
        _ => return,
    }
    let Some(stream) = tls_handshake(tcp, &tls, &state, peer).await else { return };
    let (_, session) = stream.get_ref();
    let h2 = session.alpn_protocol() == Some(b"h2".as_slice());
    let info = ConnInfo { tls: true, client_cert: session.peer_certificates().is_some_and(|c| !c.is_empty()) };
    let service = service(app, peer, slot, info);
    if h2 {
        serve_h2(TokioIo::new(stream), service, &state).await
    } else {
        serve_h1(TokioIo::new(stream), service, &state, reserve).await
    }
}

/// The server side of a TLS handshake, within the handshake timeout, counted.
pub(crate) async fn tls_handshake(
    tcp: TcpStream,
    tls: &crate::tls::Tls,
    state: &AppState,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let r = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(tcp)).await;
    let ok = matches!(r, Ok(Ok(_)));
    let counter = if ok { &state.metrics.tls_handshakes } else { &state.metrics.tls_handshake_failures };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match r {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Waits for the server's shutdown signal.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve_h1<I, S>(io: I, service: S, state: &AppState, one_request: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = axum::body::Body> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut stop = state.shutdown.clone();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's own limits (100 header fields, ~400 KiB of head, 64 KiB of target) are
    // looser than the ones the router answers with JSON, so those are what clients meet.
    // (Raising hyper's header count costs every connection a buffer of that size: ~6 KB
    // per idle SSE stream at 500.)
    builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    if one_request {
        // A health probe on a reserved place, or a redirect: one quick request, then gone.
        builder.keep_alive(false).header_read_timeout(Duration::from_secs(5));
    }
    let conn = builder.serve_connection(io, service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopping(&mut stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

async fn serve_h2<I, S>(io: I, service: S, state: &AppState)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = axum::body::Body> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let c = &state.config.http2;
    let mut stop = state.shutdown.clone();
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        // WebSockets over HTTP/2 (RFC 8441): SETTINGS_ENABLE_CONNECT_PROTOCOL.
        .enable_connect_protocol()
        .max_concurrent_streams(c.max_concurrent_streams)
        .initial_stream_window_size(c.stream_window_bytes)
        .initial_connection_window_size(c.connection_window_bytes)
        .max_send_buf_size(c.max_send_buffer_bytes)
        .max_header_list_size(c.max_header_list_bytes);
    if c.keepalive_secs > 0 {
        let every = Duration::from_secs(c.keepalive_secs);
        builder.keep_alive_interval(Some(every)).keep_alive_timeout(every);
    }
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopping(&mut stop) => {}
    }
    // GOAWAY: streams in flight finish (SSE streams end themselves on shutdown).
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// The plain listener beside a TLS one, in redirect mode: health checks answered, every
/// other request sent to the same place over HTTPS (308 keeps the method and body).
fn redirect_service(
    app: Router,
    peer: SocketAddr,
    slot: Arc<ConnSlot>,
    https_port: u16,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    let serve = service(app, peer, slot, ConnInfo::default());
    hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let serve = serve.clone();
        async move {
            if matches!(req.uri().path(), "/healthz" | "/readyz") {
                return hyper::service::Service::call(&serve, req).await;
            }
            let host = req
                .headers()
                .get(axum::http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(host_without_port)
                .unwrap_or("localhost");
            let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
            let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let location = format!("https://{host}{port}{path}");
            let mut r = axum::response::Response::new(axum::body::Body::empty());
            *r.status_mut() = axum::http::StatusCode::PERMANENT_REDIRECT;
            if let Ok(v) = axum::http::HeaderValue::from_str(&location) {
                r.headers_mut().insert(axum::http::header::LOCATION, v);
            }
            Ok(r)
        }
    })
}

/// `example.com:80` → `example.com`, `[::1]:80` → `[::1]`.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::host_without_port;

    #[test]
    fn redirects_keep_the_host_and_drop_its_port() {
        assert_eq!(host_without_port("example.com:80"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }
}
