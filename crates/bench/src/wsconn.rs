//! Lean WebSocket subscriber and HTTP publisher for the load generator.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Microseconds since the process started: publishers stamp it, subscribers subtract.
pub fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

pub struct Stats {
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    pub latency: Mutex<Histogram<u64>>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
        }
    }
}

async fn connect_from(server: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let s = match source {
        Some(source) => {
            let socket = if server.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(server).await?
        }
        None => TcpStream::connect(server).await?,
    };
    s.set_nodelay(true)?;
    Ok(s)
}

pub struct Subscriber {
    stream: TcpStream,
    buf: BytesMut,
}

impl Subscriber {
    pub async fn connect(server: SocketAddr, source: Option<IpAddr>, channel: &str) -> std::io::Result<Subscriber> {
        let mut stream = connect_from(server, source).await?;
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, fastrand::u128(..).to_le_bytes());
        let req = format!(
            "GET /ws?channel={channel} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: switchboard.v1\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 101") {
                    return Err(std::io::Error::other(String::from_utf8_lossy(&buf[..i]).to_string()));
                }
                buf.advance(i + 4);
                break;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(Subscriber { stream, buf })
    }

    /// Reads until the connection ends, counting publications and their latency.
    pub async fn run(mut self, stats: std::sync::Arc<Stats>) {
        let mut last_offset = 0u64;
        let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        let mut unflushed = 0u64;
        loop {
            while self.buf.len() >= 2 {
                let b1 = self.buf[1] & 0x7F;
                let (len, hdr) = match b1 {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => break,
                    n => (n as usize, 2),
                };
                if self.buf.len() < hdr + len {
                    break;
                }
                let opcode = self.buf[0] & 0x0F;
                let frame = self.buf.split_to(hdr + len);
                let payload = &frame[hdr..];
                match opcode {
                    0x1 if payload.starts_with(b"{\"pub\":") => {
                        let offset = field(payload, b"\"offset\":").unwrap_or(0);
                        if offset <= last_offset {
                            stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        last_offset = offset;
                        if let Some(t) = field(payload, b"\"t\":") {
                            let _ = local.record(now_us().saturating_sub(t).max(1));
                        }
                        unflushed += 1;
                    }
                    0x9 => {
                        // Answer pings (masked, empty-keyed pong with the same payload).
                        let mut pong = vec![0x8A, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                        pong.extend_from_slice(payload);
                        if self.stream.write_all(&pong).await.is_err() {
                            return;
                        }
                    }
                    0x8 => return,
                    _ => {}
                }
            }
            if unflushed > 0 {
                stats.delivered.fetch_add(unflushed, Ordering::Relaxed);
                unflushed = 0;
                if local.len() >= 64 {
                    if let Ok(mut h) = stats.latency.lock() {
                        let _ = h.add(&local);
                    }
                    local.reset();
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// Reads the unsigned integer after `key` in `s`.
fn field(s: &[u8], key: &[u8]) -> Option<u64> {
    let i = s.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = s[i..].iter().take_while(|b| b.is_ascii_digit()).fold(0u64, |n, b| n * 10 + (b - b'0') as u64);
    Some(digits)
}

/// Publishes over one keep-alive HTTP/1.1 connection to `/api/publish`.
pub struct Publisher {
    stream: TcpStream,
    server: SocketAddr,
    channel: String,
    buf: BytesMut,
}

impl Publisher {
    pub async fn connect(server: SocketAddr, channel: &str) -> std::io::Result<Publisher> {
        let stream = connect_from(server, None).await?;
        Ok(Publisher { stream, server, channel: channel.to_string(), buf: BytesMut::with_capacity(1024) })
    }

    pub async fn publish(&mut self, payload: usize) -> std::io::Result<()> {
        let stamp = format!("{{\"t\":{},\"p\":\"", now_us());
        let pad = payload.saturating_sub(stamp.len() + 2);
        let data = format!("{stamp}{}\"}}", "x".repeat(pad));
        let body = format!("{{\"channel\":\"{}\",\"data\":{data}}}", self.channel);
        let req = format!(
            "POST /api/publish HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.server,
            body.len()
        );
        self.stream.write_all(req.as_bytes()).await?;
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= i + 4 + len {
                    if !head.starts_with("http/1.1 200") {
                        return Err(std::io::Error::other(format!("publish refused: {head}")));
                    }
                    self.buf.advance(i + 4 + len);
                    return Ok(());
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}
