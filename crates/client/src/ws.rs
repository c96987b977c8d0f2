//! A small RFC 6455 client over plain TCP (`ws://` only): handshake, masked frames,
//! reassembly, permessage-deflate — and raw frames, malformed ones included. It is the
//! server's conformance and bad-input test client; applications use
//! [`crate::Connection`] or [`crate::Client`], which run on tokio-tungstenite and speak
//! `wss://` too. [`ConnectOptions`] and [`Message`] are shared by both.

use std::time::Duration;

use base64::Engine;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("bad url {0:?}: expected ws://host:port/path or wss://host:port/path")]
    Url(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake refused: HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("bad handshake: {0}")]
    Handshake(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("connection closed")]
    Eof,
}

/// Handshake options.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Offer `switchboard.v1`.
    pub subprotocol: bool,
    /// Offer permessage-deflate (the raw [`WsStream`] only).
    pub deflate: bool,
    /// Extra request headers (e.g. `Origin`).
    pub headers: Vec<(String, String)>,
    /// SO_RCVBUF for the socket (tests use a small one to simulate a slow reader).
    pub recv_buffer: Option<usize>,
    pub timeout: Duration,
    /// `wss://`: PEM certificates of CAs to trust besides the platform's (a private CA,
    /// or the one `switchboard cert dev` writes).
    pub ca_pem: Option<Vec<u8>>,
    /// `wss://`: trust the platform's roots (the system certificate store).
    pub platform_roots: bool,
    /// `wss://`: open the WebSocket as a stream of an HTTP/2 connection (RFC 8441
    /// extended CONNECT) instead of an HTTP/1.1 upgrade; refused if the server does not
    /// offer it.
    pub http2: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            subprotocol: true,
            deflate: false,
            headers: Vec::new(),
            recv_buffer: None,
            timeout: Duration::from_secs(10),
            ca_pem: None,
            platform_roots: true,
            http2: false,
        }
    }
}

/// A received message or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// Close code and reason (`None` when the frame had no payload).
    Close(Option<u16>, String),
}

pub struct WsStream {
    stream: TcpStream,
    buf: BytesMut,
    /// The server accepted permessage-deflate.
    pub deflate: bool,
    /// The handshake response headers (lower-case names).
    pub response_headers: Vec<(String, String)>,
}

fn parse_url(url: &str) -> Result<(String, String), WsError> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| WsError::Url(url.into()))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(WsError::Url(url.into()));
    }
    Ok((host.to_string(), path.to_string()))
}

impl WsStream {
    pub async fn connect(url: &str, opts: ConnectOptions) -> Result<WsStream, WsError> {
        tokio::time::timeout(opts.timeout, Self::connect_inner(url, &opts))
            .await
            .map_err(|_| WsError::Handshake("timed out".into()))?
    }

    async fn connect_inner(url: &str, opts: &ConnectOptions) -> Result<WsStream, WsError> {
        let (host, path) = parse_url(url)?;
        let addr = tokio::net::lookup_host(&host).await?.next().ok_or_else(|| WsError::Url(url.into()))?;
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Some(n) = opts.recv_buffer {
            socket.set_recv_buffer_size(n as u32)?;
        }
        let mut stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        let key_bytes: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        if opts.subprotocol {
            req.push_str("Sec-WebSocket-Protocol: switchboard.v1\r\n");
        }
        if opts.deflate {
            req.push_str("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n");
        }
        for (k, v) in &opts.headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;

        let mut buf = BytesMut::with_capacity(1024);
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(WsError::Handshake("connection closed during handshake".into()));
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if status != 101 {
            // Read the (small) error body if there is one.
            let len: usize = get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            while buf.len() < head_end + len {
                if stream.read_buf(&mut buf).await? == 0 {
                    break;
                }
            }
            let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
            return Err(WsError::Refused { status, body });
        }
        let mut sha = sha1_smol::Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let expected = base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes());
        if get("sec-websocket-accept").as_deref() != Some(expected.as_str()) {
            return Err(WsError::Handshake("wrong Sec-WebSocket-Accept".into()));
        }
        let deflate = get("sec-websocket-extensions").is_some_and(|e| e.starts_with("permessage-deflate"));
        buf.advance(head_end);
        Ok(WsStream { stream, buf, deflate, response_headers: headers })
    }

    /// Sends raw bytes (tests use this for malformed frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), WsError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends one masked frame.
    pub async fn send_frame(&mut self, fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Result<(), WsError> {
        let f = encode_frame(fin, rsv1, opcode, payload, true);
        self.send_raw(&f).await
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        self.send_frame(true, false, 0x1, text.as_bytes()).await
    }

    pub async fn send_pong(&mut self, payload: &[u8]) -> Result<(), WsError> {
        self.send_frame(true, false, 0xA, payload).await
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        self.send_frame(true, false, 0x8, &p).await
    }

    async fn fill(&mut self) -> Result<(), WsError> {
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(WsError::Eof);
        }
        Ok(())
    }

    /// Receives the next message or control frame (data fragments reassembled).
    pub async fn recv(&mut self) -> Result<Message, WsError> {
        let mut message: Option<(u8, bool, Vec<u8>)> = None;
        loop {
            let (fin, rsv1, opcode, payload) = self.recv_frame().await?;
            match opcode {
                0x8 => {
                    let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).to_string();
                    return Ok(Message::Close(code, reason));
                }
                0x9 => return Ok(Message::Ping(payload)),
                0xA => return Ok(Message::Pong(payload)),
                0x0 => {
                    let m = message.as_mut().ok_or_else(|| WsError::Protocol("unexpected continuation".into()))?;
                    m.2.extend_from_slice(&payload);
                }
                0x1 | 0x2 => message = Some((opcode, rsv1, payload)),
                other => return Err(WsError::Protocol(format!("opcode {other}"))),
            }
            if fin {
                if let Some((op, compressed, data)) = message.take() {
                    let data = if compressed { inflate(&data)? } else { data };
                    return Ok(if op == 0x1 {
                        Message::Text(String::from_utf8(data).map_err(|_| WsError::Protocol("invalid UTF-8".into()))?)
                    } else {
                        Message::Binary(data)
                    });
                }
            }
        }
    }

    /// Receives one raw frame: `(fin, rsv1, opcode, payload)`. Server frames are unmasked.
    pub async fn recv_frame(&mut self) -> Result<(bool, bool, u8, Vec<u8>), WsError> {
        loop {
            if self.buf.len() >= 2 {
                let (b0, b1) = (self.buf[0], self.buf[1]);
                if b1 & 0x80 != 0 {
                    return Err(WsError::Protocol("server frames must not be masked".into()));
                }
                let (len, hdr) = match b1 & 0x7F {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")) as usize, 10)
                    }
                    126 | 127 => {
                        self.fill().await?;
                        continue;
                    }
                    n => (n as usize, 2),
                };
                if self.buf.len() >= hdr + len {
                    self.buf.advance(hdr);
                    let payload = self.buf.split_to(len).to_vec();
                    return Ok((b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x0F, payload));
                }
            }
            self.fill().await?;
        }
    }

    /// Shuts the write side (the peer sees EOF).
    pub async fn shutdown(&mut self) -> Result<(), WsError> {
        self.stream.shutdown().await?;
        Ok(())
    }
}

/// Encodes a frame; `mask` as a client must.
pub fn encode_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(if fin { 0x80 } else { 0 } | if rsv1 { 0x40 } else { 0 } | opcode);
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= u16::MAX as usize => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key: [u8; 4] = std::array::from_fn(|_| fastrand::u8(..));
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

fn inflate(data: &[u8]) -> Result<Vec<u8>, WsError> {
    use std::io::Read;
    // The sync-flush tail RFC 7692 removed, then an empty final block so the decoder
    // sees a complete stream.
    let tail: &[u8] = &[0, 0, 0xff, 0xff, 0x01, 0, 0, 0xff, 0xff];
    let mut out = Vec::with_capacity(data.len() * 4 + 64);
    flate2::read::DeflateDecoder::new(std::io::Read::chain(data, tail))
        .read_to_end(&mut out)
        .map_err(|e| WsError::Protocol(format!("inflate: {e}")))?;
    Ok(out)
}
