//! MQTT over WebSocket (`GET /mqtt`, subprotocol `mqtt`; MQTT 5 §6): binary messages
//! carry the MQTT byte stream, in any split. [`WsBytes`] turns the upgraded WebSocket
//! back into a byte stream — reading its binary messages, answering pings, writing each
//! write as one binary message — so the MQTT connection is the same code as over TCP.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::app::AppState;
use crate::error::{ApiError, Code};
use crate::transports::ws::frame::{self, FrameReader, Incoming};
use crate::transports::ws::io::{Socket, Stream};

/// The subprotocols MQTT clients offer (`mqtt`; older ones `mqttv3.1`).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// `GET /mqtt`: the WebSocket handshake, through the same door as `/ws` (origin, caps,
/// handshake rate); the MQTT packets inside go through the gate one by one.
pub async fn handler(State(state): State<AppState>, mut req: Request) -> Response {
    match upgrade(state, &mut req) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn upgrade(state: AppState, req: &mut Request) -> Result<Response, ApiError> {
    let headers = req.headers();
    let token = |name, want: &str| crate::transports::ws::header_has_token(headers, name, want);
    if !token(header::UPGRADE, "websocket") || !token(header::CONNECTION, "upgrade") {
        return Err(ApiError::new(Code::UpgradeRequired, "this endpoint speaks MQTT over WebSocket: send an Upgrade"));
    }
    if headers.get("sec-websocket-version").and_then(|v| v.to_str().ok()) != Some("13") {
        return Err(ApiError::new(Code::UpgradeRequired, "unsupported Sec-WebSocket-Version; this server speaks 13"));
    }
    let accept = crate::transports::ws::accept_for(headers)?;
    let Some(protocol) = SUBPROTOCOLS.iter().find(|p| token(header::SEC_WEBSOCKET_PROTOCOL, p)) else {
        return Err(ApiError::new(Code::InvalidRequest, "offer the WebSocket subprotocol `mqtt`"));
    };
    let slot = crate::transports::admit(&state, headers, req.extensions())?;
    let peer =
        req.extensions().get::<crate::limits::PeerAddr>().map(|p| p.0).unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
    let on_upgrade = crate::transports::ws::take_upgrade(req)?;
    let metrics = state.metrics.clone();
    let max = state.config.mqtt.max_packet_bytes;
    crate::transports::ws::spawn_upgraded(&metrics, "mqtt over websocket", on_upgrade, move |socket, pre| async move {
        let io: Box<dyn Stream> = match socket {
            Socket::Tcp(tcp) => {
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
            Socket::Stream(s) => s,
        };
        let mut ws = WsBytes::new(io, max);
        let mut first = Vec::new();
        if ws.reader.feed(&pre, &mut first).is_err() {
            return;
        }
        ws.incoming.extend(first);
        super::connection::serve(Box::new(ws), state, peer, slot, None).await
    });
    let mut r = crate::transports::ws::switching_protocols(&accept);
    r.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
    Ok(r)
}

/// A WebSocket as a byte stream of its binary messages.
pub struct WsBytes {
    io: Box<dyn Stream>,
    reader: FrameReader,
    incoming: VecDeque<Incoming>,
    /// What is left of the message being read.
    current: Bytes,
    /// Frames to write (pongs, messages, the close).
    out: BytesMut,
    eof: bool,
}

impl WsBytes {
    pub fn new(io: Box<dyn Stream>, max_message: usize) -> Self {
        WsBytes {
            io,
            reader: FrameReader::new(max_message, false).allowing_binary(),
            incoming: VecDeque::new(),
            current: Bytes::new(),
            out: BytesMut::new(),
            eof: false,
        }
    }

    /// Writes what `out` holds; `Ready(Ok)` once it is all written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

fn invalid(why: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

impl AsyncRead for WsBytes {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.current.is_empty() {
                let n = this.current.len().min(buf.remaining());
                buf.put_slice(&this.current.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match this.incoming.pop_front() {
                Some(Incoming::Binary(b)) => this.current = Bytes::from(b),
                Some(Incoming::Text(_)) => {
                    this.out.extend_from_slice(&frame::close_frame(frame::close::UNSUPPORTED_DATA, "MQTT is binary"));
                    let _ = this.poll_drain(cx);
                    return Poll::Ready(Err(invalid("a text message on an MQTT WebSocket")));
                }
                Some(Incoming::Ping(p)) => {
                    this.out.extend_from_slice(&frame::frame(frame::OP_PONG, false, &p));
                    let _ = this.poll_drain(cx)?;
                }
                Some(Incoming::Pong) => {}
                Some(Incoming::Close(code)) => {
                    this.out.extend_from_slice(&frame::close_frame(code.unwrap_or(frame::close::NORMAL), ""));
                    let _ = this.poll_drain(cx);
                    this.eof = true;
                }
                None => {
                    let mut tmp = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut tmp);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        this.eof = true;
                        continue;
                    }
                    let mut decoded = Vec::new();
                    let r = this.reader.feed(rb.filled(), &mut decoded);
                    this.incoming.extend(decoded);
                    if let Err(v) = r {
                        this.out.extend_from_slice(&frame::close_frame(v.code, v.reason));
                        let _ = this.poll_drain(cx);
                        return Poll::Ready(Err(invalid(v.reason)));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for WsBytes {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        // Earlier messages first: a slow peer holds at most one unwritten message here.
        ready!(this.poll_drain(cx))?;
        this.out.extend_from_slice(&frame::frame(frame::OP_BINARY, false, buf));
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.eof {
            self.eof = true;
            self.out.extend_from_slice(&frame::close_frame(frame::close::NORMAL, ""));
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
