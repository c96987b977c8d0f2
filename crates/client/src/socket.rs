//! The WebSocket under [`crate::Connection`] and [`crate::Client`]: `ws://` and `wss://`
//! on tokio-tungstenite, TLS by rustls (ring) trusting the platform's roots and any CA
//! given in [`ConnectOptions::ca_pem`]; over HTTP/1.1 (upgrade) or, with
//! [`ConnectOptions::http2`], as an HTTP/2 stream (RFC 8441 extended CONNECT, hyper's
//! client). Proxies are the platform's business: the connection goes to the URL's host
//! directly.

use std::sync::{Arc, OnceLock};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{self, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{self, Error as TError};
use tokio_tungstenite::WebSocketStream;

use crate::ws::{ConnectOptions, Message, WsError};

/// What a WebSocket runs on: TCP, TLS over it, or an HTTP/2 stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open `ws://` or `wss://` connection.
pub struct WebSocket {
    inner: WebSocketStream<Box<dyn Io>>,
    /// The handshake response headers (lower-case names).
    pub response_headers: Vec<(String, String)>,
    /// Whether the connection is encrypted.
    pub tls: bool,
    /// Whether it is a stream of an HTTP/2 connection (RFC 8441).
    pub http2: bool,
}

/// The platform's trusted roots, read once per process.
fn platform_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable entries are skipped: one bad file must not stop every connection.
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        roots
    })
}

/// The TLS settings for `opts`: the platform's roots plus `ca_pem`; by ALPN `h2` with
/// [`ConnectOptions::http2`], else `http/1.1` (a WebSocket upgrade is an HTTP/1.1
/// request).
pub fn tls_config(opts: &ConnectOptions) -> Result<Arc<rustls::ClientConfig>, WsError> {
    let mut roots = if opts.platform_roots { platform_roots().clone() } else { rustls::RootCertStore::empty() };
    if let Some(pem) = &opts.ca_pem {
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| WsError::Tls(format!("ca_pem: {e}")))?;
            roots.add(cert).map_err(|e| WsError::Tls(format!("ca_pem: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(WsError::Tls("ca_pem holds no PEM certificate".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WsError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if opts.http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    Ok(Arc::new(config))
}

impl WebSocket {
    /// Opens `url` (`ws://host:port/path` or `wss://…`).
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<WebSocket, WsError> {
        tokio::time::timeout(opts.timeout, Self::connect_inner(url, opts))
            .await
            .map_err(|_| WsError::Handshake("timed out".into()))?
    }

    async fn connect_inner(url: &str, opts: &ConnectOptions) -> Result<WebSocket, WsError> {
        let tls = if url.starts_with("wss://") {
            true
        } else if url.starts_with("ws://") {
            false
        } else {
            return Err(WsError::Url(url.into()));
        };
        let mut request = url.into_client_request().map_err(|_| WsError::Url(url.into()))?;
        let authority = request.uri().authority().ok_or_else(|| WsError::Url(url.into()))?.clone();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let headers = request.headers_mut();
        if opts.subprotocol {
            headers.insert("sec-websocket-protocol", HeaderValue::from_static("switchboard.v1"));
        }
        for (k, v) in &opts.headers {
            let name = tungstenite::http::HeaderName::try_from(k.as_str())
                .map_err(|e| WsError::Handshake(format!("header {k:?}: {e}")))?;
            let value =
                HeaderValue::try_from(v.as_str()).map_err(|e| WsError::Handshake(format!("header {k:?}: {e}")))?;
            headers.insert(name, value);
        }
        let addr =
            tokio::net::lookup_host((host.as_str(), port)).await?.next().ok_or_else(|| WsError::Url(url.into()))?;
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Some(n) = opts.recv_buffer {
            socket.set_recv_buffer_size(n as u32)?;
        }
        let tcp = socket.connect(addr).await?;
        tcp.set_nodelay(true)?;
        if opts.http2 && !tls {
            return Err(WsError::Handshake("WebSocket over HTTP/2 needs wss://".into()));
        }
        let stream: Box<dyn Io> = if tls {
            let name = ServerName::try_from(host.clone()).map_err(|_| WsError::Url(url.into()))?;
            let connector = tokio_rustls::TlsConnector::from(tls_config(opts)?);
            let tls_stream = connector.connect(name, tcp).await.map_err(|e| match e.to_string() {
                // Offered only h2, and the server speaks no HTTP/2.
                m if opts.http2 && m.contains("NoApplicationProtocol") => {
                    WsError::Handshake("the server does not speak HTTP/2 (ALPN h2 refused)".into())
                }
                m => WsError::Tls(m),
            })?;
            if opts.http2 {
                if tls_stream.get_ref().1.alpn_protocol() != Some(b"h2".as_slice()) {
                    return Err(WsError::Handshake("the server does not speak HTTP/2 (ALPN)".into()));
                }
                return Self::connect_h2(request, Box::new(tls_stream)).await;
            }
            Box::new(tls_stream)
        } else {
            Box::new(tcp)
        };
        let (inner, response) =
            tokio_tungstenite::client_async_with_config(request, stream, None).await.map_err(handshake_error)?;
        Ok(WebSocket { inner, response_headers: lower_headers(response.headers()), tls, http2: false })
    }

    /// RFC 8441: an extended CONNECT (`:protocol websocket`) on a new HTTP/2 connection;
    /// a `200` answer makes the stream the WebSocket.
    async fn connect_h2(request: http::Request<()>, io: Box<dyn Io>) -> Result<WebSocket, WsError> {
        use http_body_util::{BodyExt, Empty};
        let h2err = |e: hyper::Error| WsError::Protocol(format!("HTTP/2: {e}"));
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(io),
        )
        .await
        .map_err(h2err)?;
        // The connection is driven by a task of its own; it ends with the stream.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let (parts, ()) = request.into_parts();
        let uri: http::Uri = format!(
            "https://{}{}",
            parts.uri.authority().map(|a| a.as_str()).unwrap_or_default(),
            parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        )
        .parse()
        .map_err(|_| WsError::Url(parts.uri.to_string()))?;
        let mut req = http::Request::builder().method(http::Method::CONNECT).uri(uri).version(http::Version::HTTP_2);
        for (k, v) in parts.headers.iter() {
            // The HTTP/1.1 handshake's own fields have no place in RFC 8441.
            let own = ["host", "connection", "upgrade", "sec-websocket-key"];
            if !own.contains(&k.as_str()) {
                req = req.header(k, v);
            }
        }
        let mut req = req.body(Empty::<bytes::Bytes>::new()).map_err(|e| WsError::Handshake(e.to_string()))?;
        req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        let mut response = sender.send_request(req).await.map_err(h2err)?;
        let headers = lower_headers(response.headers());
        if response.status() != http::StatusCode::OK {
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(WsError::Refused { status, body: String::from_utf8_lossy(&body).into_owned() });
        }
        let upgraded = hyper::upgrade::on(&mut response).await.map_err(h2err)?;
        let io: Box<dyn Io> = Box::new(hyper_util::rt::TokioIo::new(upgraded));
        let inner = WebSocketStream::from_raw_socket(io, Role::Client, None).await;
        Ok(WebSocket { inner, response_headers: headers, tls: true, http2: true })
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        self.inner.send(tungstenite::Message::text(text)).await.map_err(error)
    }

    /// Sends a close frame (the connection then ends when the server answers).
    pub async fn send_close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() };
        self.inner.send(tungstenite::Message::Close(Some(frame))).await.map_err(error)
    }

    /// The next message. Pings are answered by tungstenite itself (while reading) and
    /// are not returned; a close frame is returned once, then the connection is over.
    pub async fn recv(&mut self) -> Result<Message, WsError> {
        loop {
            let m = match self.inner.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(error(e)),
                None => return Err(WsError::Eof),
            };
            return Ok(match m {
                tungstenite::Message::Text(t) => Message::Text(t.as_str().to_string()),
                tungstenite::Message::Binary(b) => Message::Binary(b.to_vec()),
                tungstenite::Message::Ping(_) | tungstenite::Message::Frame(_) => continue,
                tungstenite::Message::Pong(p) => Message::Pong(p.to_vec()),
                tungstenite::Message::Close(f) => match f {
                    Some(f) => Message::Close(Some(u16::from(f.code)), f.reason.as_str().to_string()),
                    None => Message::Close(None, String::new()),
                },
            });
        }
    }
}

fn lower_headers(h: &http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}

fn handshake_error(e: TError) -> WsError {
    match e {
        TError::Http(r) => WsError::Refused {
            status: r.status().as_u16(),
            body: r.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
        },
        TError::Url(u) => WsError::Url(u.to_string()),
        e => error(e),
    }
}

fn error(e: TError) -> WsError {
    match e {
        TError::Io(e) => WsError::Io(e),
        TError::Tls(e) => WsError::Tls(e.to_string()),
        TError::ConnectionClosed | TError::AlreadyClosed => WsError::Eof,
        TError::Protocol(p) => WsError::Protocol(p.to_string()),
        e => WsError::Protocol(e.to_string()),
    }
}
