//! WebTransport over HTTP/3 (QUIC, UDP): sessions at `/wt`, the `switchboard.v1` protocol
//! on the first bidirectional stream the client opens — one JSON message per line, the
//! same commands, replies and pushes as over WebSocket — and volatile publications as
//! unreliable datagrams for subscriptions that ask for them (`"datagrams": true`).
//!
//! The session layer is the shared one ([`crate::commands::Session`]): this file is
//! framing and I/O. The listener's certificate is the `[tls]` one when configured, else a
//! development certificate (ECDSA P-256, valid 13 days, made again before it runs out)
//! whose SHA-256 is at `GET /wt/cert-hash`, for browsers' `serverCertificateHashes`.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use switchboard_core::queue::Event;
use switchboard_core::{CloseReason, Delivery, Kind};
use tokio::time::Instant;
use wtransport::endpoint::endpoint_side::Server;
use wtransport::endpoint::{IncomingSession, SessionRequest};
use wtransport::{Connection, Endpoint, RecvStream, SendStream, ServerConfig, VarInt};

use crate::app::AppState;
use crate::commands::{Session, Wire};
use crate::error::{ApiError, Code};
use crate::transports::ws::frame::close;

/// The session path.
pub const PATH: &str = "/wt";
/// The subprotocol (offered in `WT-Available-Protocols`, or as `?protocol=` by browsers
/// that cannot offer one).
pub const PROTOCOL: &str = "switchboard.v1";
/// The encoding slot of a publication's line (`{"pub":…}\n`) in a [`Delivery`].
const SLOT_LINE: usize = 6;
/// Time a client has to open its stream after the session is accepted.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream write that makes no progress this long: the client is not reading.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// The development certificate's validity, and how long before its end a new one is made.
const DEV_CERT_DAYS: i64 = 13;
const DEV_CERT_RENEW_SECS: i64 = 3 * 86_400;

/// Lines on the stream.
pub struct WtWire;

impl Wire for WtWire {
    fn text(json: &[u8]) -> Bytes {
        line(json)
    }
    fn close(code: u16, reason: &str) -> Bytes {
        line(serde_json::json!({"close": {"code": code, "reason": reason}}).to_string().as_bytes())
    }
    const TRANSPORT: &'static str = "webtransport";
}

fn line(json: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(json.len() + 1);
    v.extend_from_slice(json);
    v.push(b'\n');
    v.into()
}

/// The development certificate's hash, published at `/wt/cert-hash`.
#[derive(Debug, Clone)]
pub struct CertHash {
    pub sha256: [u8; 32],
    /// Unix seconds.
    pub expires: i64,
}

/// Where the hash is kept (in [`crate::app::Inner`]).
pub type CertHashSlot = RwLock<Option<CertHash>>;

/// `GET /wt/cert-hash`: `{"algorithm":"sha-256","value":"<base64>","hex":…,"expires":…}`
/// for `new WebTransport(url, {serverCertificateHashes: [{algorithm, value}]})`.
pub async fn cert_hash(State(state): State<AppState>) -> Response {
    let hash = state.webtransport_cert.read().unwrap_or_else(|p| p.into_inner()).clone();
    match hash {
        Some(h) => {
            use base64::Engine;
            let hex = crate::auth::hex(&h.sha256);
            let body = serde_json::json!({
                "algorithm": "sha-256",
                "value": base64::engine::general_purpose::STANDARD.encode(h.sha256),
                "hex": hex,
                "expires": h.expires,
                "url": state.config.webtransport.listen.map(|a| format!("https://{a}{PATH}")),
            });
            axum::Json(body).into_response()
        }
        None => ApiError::new(
            Code::NotFound,
            "no WebTransport development certificate: WebTransport is off, or uses the [tls] certificate",
        )
        .into_response(),
    }
}

/// The bound QUIC endpoint, not yet accepting.
pub struct Listener {
    endpoint: Endpoint<Server>,
    /// The development certificate, made again before it expires (none with `[tls]`).
    dev: Option<Arc<crate::tls::Current>>,
}

impl Listener {
    /// Binds `webtransport.listen` with the `[tls]` certificate or a development one.
    pub fn bind(state: &AppState, addr: SocketAddr) -> Result<Listener, String> {
        let (resolver, dev) = match &state.tls {
            Some(tls) => (tls.resolver(), None),
            None => {
                let (key, sha256, expires) = crate::tls::webtransport_certificate(DEV_CERT_DAYS)?;
                *state.webtransport_cert.write().unwrap_or_else(|p| p.into_inner()) =
                    Some(CertHash { sha256, expires });
                let current = crate::tls::Current::new(key);
                (current.clone(), Some(current))
            }
        };
        let tls = crate::tls::quic_server_config(resolver)?;
        let idle = Duration::from_secs(state.config.webtransport.idle_timeout_secs.max(1));
        let mut config = ServerConfig::builder()
            .with_bind_address(addr)
            .with_custom_tls(tls)
            .keep_alive_interval(Some(idle / 3))
            .max_idle_timeout(Some(idle))
            .map_err(|_| format!("webtransport.idle_timeout_secs {}: too long", idle.as_secs()))?
            .build();
        // Sized for many sessions of one protocol stream each, not for bulk transfer.
        let mut t = wtransport::quinn::TransportConfig::default();
        t.max_idle_timeout(Some(idle.try_into().map_err(|_| "webtransport.idle_timeout_secs: too long")?));
        t.keep_alive_interval(Some(idle / 3));
        t.max_concurrent_bidi_streams(4u32.into());
        t.max_concurrent_uni_streams(8u32.into());
        t.stream_receive_window((256u32 * 1024).into());
        t.receive_window((512u32 * 1024).into());
        t.send_window(1024 * 1024);
        t.datagram_receive_buffer_size(Some(64 * 1024));
        t.datagram_send_buffer_size(256 * 1024);
        config.quic_config_mut().transport_config(Arc::new(t));
        let endpoint = Endpoint::server(config).map_err(|e| format!("webtransport.listen {addr} (UDP): {e}"))?;
        Ok(Listener { endpoint, dev })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Accepts sessions until shutdown, then closes the endpoint.
    pub async fn run(self, state: AppState) {
        let mut shutdown = state.shutdown.clone();
        if let Some(dev) = self.dev.clone() {
            tokio::spawn(renew(state.clone(), dev, state.shutdown.clone()));
        }
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let state = state.clone();
                    let metrics = state.metrics.clone();
                    tokio::spawn(crate::guarded(metrics, "webtransport session", handle(incoming, state)));
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        // Sessions are told to go (their queues close on shutdown); new ones are refused.
        state.upgraded.wait_idle().await;
        self.endpoint.close(VarInt::from_u32(close::GOING_AWAY as u32), b"server shutting down");
    }
}

/// Makes a new development certificate before the current one expires.
async fn renew(state: AppState, dev: Arc<crate::tls::Current>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let expires = state.webtransport_cert.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|h| h.expires);
        let now = crate::auth::unix_now() as i64;
        let wait = expires.map_or(0, |e| (e - DEV_CERT_RENEW_SECS - now).clamp(0, 3600));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait as u64)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if expires.is_some_and(|e| e - DEV_CERT_RENEW_SECS > crate::auth::unix_now() as i64) {
            continue;
        }
        match crate::tls::webtransport_certificate(DEV_CERT_DAYS) {
            Ok((key, sha256, expires)) => {
                dev.set(key);
                *state.webtransport_cert.write().unwrap_or_else(|p| p.into_inner()) =
                    Some(CertHash { sha256, expires });
                tracing::info!("WebTransport development certificate renewed (see /wt/cert-hash)");
            }
            Err(e) => {
                tracing::warn!("WebTransport development certificate not renewed: {e}");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

/// Whether the request offers the subprotocol: `WT-Available-Protocols` (a structured
/// list of strings) or `?protocol=` in the URL.
fn offers_protocol(request: &SessionRequest, query: &crate::session::Query) -> bool {
    let header = request.headers().iter().find(|(k, _)| k.eq_ignore_ascii_case("wt-available-protocols"));
    let in_header = header.is_some_and(|(_, v)| v.split(',').any(|p| p.trim().trim_matches('"') == PROTOCOL));
    in_header || query.get("protocol") == Some(PROTOCOL)
}

/// One incoming QUIC connection: its CONNECT request, checked as a WebSocket handshake
/// is (origin, draining, caps and handshake rate, token), then the session.
async fn handle(incoming: IncomingSession, state: AppState) {
    let peer = incoming.remote_address();
    let slot = match state.limits.admit_tcp(peer.ip()) {
        crate::limits::Admission::Full(slot) => slot,
        crate::limits::Admission::Reserve(_) | crate::limits::Admission::Refused(_) => {
            state.metrics.refused_total_cap.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            incoming.refuse();
            return;
        }
    };
    let Ok(request) = incoming.await else { return };
    let (path, raw_query) = match request.path().split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (request.path().to_string(), None),
    };
    if path != PATH {
        request.not_found().await;
        return;
    }
    let mut headers = axum::http::HeaderMap::new();
    for (k, v) in request.headers() {
        if let (Ok(k), Ok(v)) = (axum::http::HeaderName::from_bytes(k.as_bytes()), axum::http::HeaderValue::from_str(v))
        {
            headers.append(k, v);
        }
    }
    let query = crate::session::Query::parse(raw_query.as_deref());
    let checked = crate::transports::admit(&state, &headers, &axum::http::Extensions::new())
        .and_then(|a| Ok((a, crate::transports::identity(&state, &headers, &query)?)));
    let (admitted, identity) = match checked {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(%peer, "WebTransport session refused: {}", e.message);
            state.metrics.error(e.code.as_str());
            // A bad token is told on the session, with WebSocket's codes and `code: message`.
            let token_close = match e.code {
                Code::TokenInvalid => Some(close::TOKEN_INVALID),
                Code::TokenExpired => Some(close::TOKEN_EXPIRED),
                Code::TokenRevoked => Some(close::DISCONNECTED),
                _ => None,
            };
            match (e.code, token_close) {
                (_, Some(code)) => {
                    if let Ok(conn) = request.accept().await {
                        let why = format!("{}: {}", e.code.as_str(), e.message);
                        conn.close(VarInt::from_u32(code as u32), why.as_bytes());
                    }
                }
                (Code::ServerBusy | Code::RateLimited | Code::TooManyConnections, _) => {
                    request.too_many_requests().await
                }
                _ => request.forbidden().await,
            }
            return;
        }
    };
    let offered = offers_protocol(&request, &query);
    let accepted = if offered {
        request.accept_with_headers([("wt-protocol", format!("\"{PROTOCOL}\""))]).await
    } else {
        request.accept().await
    };
    let Ok(conn) = accepted else { return };
    if !offered {
        let why = format!("offer the subprotocol {PROTOCOL} (WT-Available-Protocols, or ?protocol={PROTOCOL})");
        conn.close(VarInt::from_u32(close::PROTOCOL_ERROR as u32), why.as_bytes());
        return;
    }
    let _tracked = state.track_upgraded();
    let _slots = (slot, admitted);
    let (send, recv) = match tokio::time::timeout(STREAM_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            conn.close(
                VarInt::from_u32(close::PROTOCOL_ERROR as u32),
                b"open one bidirectional stream for the protocol",
            );
            return;
        }
    };
    let _gauge = state.metrics.connection(crate::metrics::Transport::WebTransport);
    let queue = state.hub.queue(state.config.defaults.queue_max_bytes);
    let mut session = Session::<WtWire>::new(state.clone(), queue);
    if let Some(who) = identity {
        session.set_identity(who);
    }
    session.opened();
    let mut c = Box::new(Conn { session, conn, send, recv, buf: BytesMut::new() });
    c.run().await;
    c.finish().await;
    c.session.leave_all();
}

struct Conn {
    session: Session<WtWire>,
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    /// What was read of the stream and not yet a whole line.
    buf: BytesMut,
}

impl Conn {
    /// Serves the session until its queue closes (the client went, a violation, the
    /// server's reason).
    async fn run(&mut self) {
        let state = self.session.state.clone();
        let every = Duration::from_secs(state.config.ws.ping_interval_secs.max(1));
        let mut presence = tokio::time::interval_at(Instant::now() + every, every);
        presence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = state.shutdown.clone();
        let max_line = state.config.limits.max_message_bytes + crate::transports::ws::connection::ENVELOPE_BYTES;
        let mut chunk = vec![0u8; 8192];
        loop {
            if self.write_queued().await.is_err() {
                return;
            }
            tokio::select! {
                r = self.recv.read(&mut chunk) => match r {
                    Ok(Some(n)) => {
                        self.buf.extend_from_slice(&chunk[..n]);
                        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                            let l = self.buf.split_to(i + 1);
                            let Ok(text) = std::str::from_utf8(&l[..i]) else {
                                return self.violate(close::INVALID_PAYLOAD, "a line that is not UTF-8");
                            };
                            let text = text.trim();
                            if text.is_empty() {
                                continue;
                            }
                            if !Box::pin(self.session.command(text)).await {
                                return;
                            }
                        }
                        if self.buf.len() > max_line {
                            return self.violate(close::TOO_BIG, "a message over limits.max_message_bytes");
                        }
                    }
                    Ok(None) | Err(_) => return self.session.queue.close(CloseReason::Normal),
                },
                _ = self.session.queue.changed() => {}
                // Datagrams from the client carry nothing in this protocol: read and dropped.
                _ = self.conn.receive_datagram() => {}
                _ = presence.tick() => self.session.refresh_presence().await,
                // (Wrapped: the guard `wait_for` returns must not live across the awaits above.)
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => self.session.queue.close(CloseReason::Shutdown),
                _ = crate::transports::maybe_sleep(&mut self.session.timer), if self.session.timer.is_some() => {
                    if !self.session.on_expiry() {
                        return;
                    }
                }
            }
        }
    }

    fn violate(&self, code: u16, why: &'static str) {
        tracing::debug!(client = %self.session.client, code, why, "WebTransport protocol violation");
        self.session.close_with(code, why);
    }

    /// Whether `d` goes as a datagram: volatile, on a channel (or pattern) subscribed with
    /// datagrams, and small enough for one.
    fn as_datagram(&self, d: &Delivery, bytes: usize) -> bool {
        d.publication.kind == Kind::Volatile
            && self.session.wants_datagrams(&d.publication.channel)
            && self.conn.max_datagram_size().is_some_and(|max| bytes <= max)
    }

    /// Writes what the queue holds: lines on the stream, volatile publications of
    /// datagram subscriptions as datagrams. `Err` once the queue has closed.
    async fn write_queued(&mut self) -> Result<(), ()> {
        let mut batch = Vec::new();
        let closed = self.session.queue.drain_into(&mut batch).err();
        let drained = !batch.is_empty();
        let mut out = BytesMut::new();
        for e in &batch {
            let bytes = encode(e);
            if let Event::Publication(d) = e {
                // (A datagram lost is lost: volatile publications promise no more.)
                if self.as_datagram(d, bytes.len() - 1) {
                    match self.conn.send_datagram(bytes.slice(..bytes.len() - 1)) {
                        Ok(()) => continue,
                        Err(e) => tracing::debug!("WebTransport datagram not sent, on the stream instead: {e}"),
                    }
                }
            }
            out.extend_from_slice(&bytes);
        }
        if !out.is_empty() {
            match tokio::time::timeout(WRITE_STALL, self.send.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    self.session.queue.close(CloseReason::Normal);
                    return Err(());
                }
                Err(_) => {
                    self.session.queue.close(CloseReason::SlowConsumer);
                    return Err(());
                }
            }
        }
        if drained {
            self.session.queue.write_done();
        }
        match closed {
            Some(_) => Err(()),
            None => Ok(()),
        }
    }

    /// The last word: what is still queued, the goodbye for the queue's close reason (a
    /// `disconnect` push), and the session closed with its code.
    async fn finish(&mut self) {
        let mut rest = Vec::new();
        let reason = self.session.queue.closed().unwrap_or(CloseReason::Normal);
        while self.session.queue.drain_into(&mut rest).is_ok() {}
        let mut out = BytesMut::new();
        let (mut code, mut text) = (close::NORMAL, String::new());
        for e in &rest {
            let b = encode(e);
            // The session's own close (`{"close":{…}}`): its code closes the session.
            if let Some((c, t)) = close_of(&b) {
                (code, text) = (c, t);
            }
            out.extend_from_slice(&b);
        }
        if let Some(g) = crate::commands::goodbye(reason) {
            out.extend_from_slice(&line(g.push.as_bytes()));
            (code, text) = (g.code, g.text.to_string());
        }
        let _ = tokio::time::timeout(WRITE_STALL, self.send.write_all(&out)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.send.finish()).await;
        self.conn.close(VarInt::from_u32(code as u32), text.as_bytes());
    }
}

/// A queued event as its line.
fn encode(e: &Event) -> Bytes {
    match e {
        Event::Publication(d) => d.encoded(SLOT_LINE, |d| line(&crate::transports::ws::connection::pub_payload(d))),
        Event::Reset { channel, position } => {
            line(crate::transports::ws::connection::reset_json(channel, position).as_bytes())
        }
        Event::Frame(b) => b.clone(),
    }
}

/// The code and reason of a `{"close":{"code":…,"reason":…}}` line.
fn close_of(b: &[u8]) -> Option<(u16, String)> {
    if !b.starts_with(b"{\"close\":") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(b).ok()?;
    let code = v["close"]["code"].as_u64()? as u16;
    Some((code, v["close"]["reason"].as_str().unwrap_or("").to_string()))
}
