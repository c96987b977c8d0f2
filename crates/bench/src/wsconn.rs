//! Lean subscribers (WebSocket or SSE, Switchboard or any server) and an HTTP publisher.
//!
//! Every payload the publisher sends is `{"t":<Unix µs>,"p":"xxx…"}`; a
//! subscriber finds `"t":` in whatever frame carries it (a Switchboard publication, a
//! Socket.IO event, an Nchan message) to measure latency, and `"offset":` when the server
//! numbers messages, to count gaps and duplicates.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A subscriber's byte stream: plain TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// TLS settings for `wss://` / `https://` subscribers: trusting the CA in `ca_pem`,
/// HTTP/1.1 by ALPN, the server named `localhost`.
pub fn tls_connector(ca_pem: &[u8]) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// Microseconds since the process started: publishers stamp it, subscribers subtract.
/// Wall-clock microseconds (Unix time): producers outside this process (a database, a
/// queue) stamp their messages with the same clock.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub struct Stats {
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    /// Switchboard said a position could not be resumed (`recovered:false`, `reset`).
    pub resets: AtomicU64,
    pub handshakes: AtomicU64,
    /// Connections that could not be opened: the run did not do what was asked.
    pub failed_connects: AtomicU64,
    pub latency: Mutex<Histogram<u64>>,
    /// Publish round trips (request to answer), µs: what a publisher waits.
    pub acks: Mutex<Histogram<u64>>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            failed_connects: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")),
            acks: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")),
        }
    }

    pub fn reset_latency(&self) {
        if let Ok(mut h) = self.latency.lock() {
            h.reset();
        }
    }
}

/// What to connect to.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Request path (with query).
    pub path: String,
    pub kind: Kind,
    /// A text frame to send right after the WebSocket handshake (Socket.IO: `40`).
    pub first_frame: Option<String>,
    /// Bytes the server sends once the subscription is live (Switchboard: its
    /// `subscribed` message); a connection counts as open only after them, so nothing
    /// published afterwards can be missed. `None` for servers that confirm nothing.
    pub ready: Option<&'static [u8]>,
    /// Connect with TLS (`wss://`, `https://`).
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// MQTT: the QoS subscribed with (QoS 1 publications are acknowledged).
    pub qos: u8,
    /// WebTransport: the client endpoint (one UDP socket for all) and whether to ask for
    /// datagrams.
    pub wt: Option<(Arc<wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>>, bool)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    WebSocket,
    /// Server-Sent Events, read from an HTTP/1.0 response (no chunked framing).
    Sse,
    /// Switchboard long polling on one keep-alive connection (`path` is `/poll?channel=…`).
    Poll,
    /// MQTT 3.1.1 at QoS 0 (`path` is the topic): Switchboard's MQTT listener or any broker.
    Mqtt,
    /// Switchboard over WebTransport: `switchboard.v1` lines on a bidirectional stream
    /// (`path` is `/wt?…&channel=…`), volatile publications as datagrams when asked.
    WebTransport,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::WebSocket => "WebSocket",
            Kind::Sse => "SSE",
            Kind::Poll => "long polling",
            Kind::Mqtt => "MQTT",
            Kind::WebTransport => "WebTransport",
        })
    }
}

/// Parses `ws://host:port/path`, `http://host:port/path` or `mqtt://host:port/topic`.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String, Kind), String> {
    let (kind, rest) = if let Some(r) = url.strip_prefix("ws://") {
        (Kind::WebSocket, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (Kind::Sse, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (Kind::Mqtt, r)
    } else {
        return Err(format!("{url}: expected ws://, http:// or mqtt://"));
    };
    let (host, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let addr: SocketAddr = host.parse().map_err(|_| format!("{url}: host must be ip:port"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr}: benchmarks only target loopback addresses"));
    }
    Ok((addr, path.to_string(), kind))
}

async fn connect_from(
    server: SocketAddr,
    source: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = if server.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(n) = recv_buffer {
        socket.set_recv_buffer_size(n)?;
    }
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let s = socket.connect(server).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A masked client text frame.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]); // zero mask key: payload as is
    f.extend_from_slice(payload);
    f
}

pub struct Subscriber {
    stream: Box<dyn Io>,
    /// A WebTransport session (kept open; its datagrams are read beside the stream).
    wt: Option<wtransport::Connection>,
    buf: BytesMut,
    kind: Kind,
    /// (epoch, offset) of the last numbered message seen.
    pub last: Option<(String, u64)>,
    poll_path: String,
    cursor: Option<String>,
}

impl Subscriber {
    pub async fn connect(t: &Target, source: Option<IpAddr>, recv_buffer: Option<u32>) -> std::io::Result<Subscriber> {
        if let (Kind::WebTransport, Some((endpoint, datagrams))) = (t.kind, &t.wt) {
            return Subscriber::connect_wt(t, endpoint, *datagrams).await;
        }
        let tcp = connect_from(t.addr, source, recv_buffer).await?;
        let mut stream: Box<dyn Io> = match &t.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("a valid name");
                Box::new(tls.connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        if t.kind == Kind::Poll {
            let mut sub = Subscriber {
                stream,
                wt: None,
                buf: BytesMut::with_capacity(4096),
                kind: Kind::Poll,
                last: None,
                poll_path: t.path.clone(),
                cursor: None,
            };
            // The first poll establishes the cursor.
            let body = sub.poll(0).await?;
            sub.cursor = string_field(&body, b"\"cursor\":\"");
            return Ok(sub);
        }
        if t.kind == Kind::Mqtt {
            let topic = t.path.trim_start_matches('/');
            let id = format!("bench-{:x}", fastrand::u64(..));
            stream.write_all(&mqtt_connect(&id)).await?;
            let mut body = 1u16.to_be_bytes().to_vec();
            body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            body.extend_from_slice(topic.as_bytes());
            body.push(t.qos);
            stream.write_all(&mqtt_packet(0x82, &body)).await?;
            // CONNACK, then SUBACK: the subscription is live.
            let mut buf = BytesMut::with_capacity(4096);
            let ready = async {
                let mut seen = 0;
                loop {
                    while let Some((first, n)) = mqtt_next(&buf) {
                        if first == 0x20 && buf[3] != 0 {
                            return Err(std::io::Error::other(format!("CONNACK refused: {}", buf[3])));
                        }
                        let _ = buf.split_to(n);
                        if first >> 4 == 9 {
                            return Ok(());
                        }
                        seen += 1;
                        if seen > 100 {
                            return Err(std::io::Error::other("no SUBACK"));
                        }
                    }
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(60), ready)
                .await
                .map_err(|_| std::io::Error::other("no SUBACK within 60 s"))??;
            return Ok(Subscriber {
                stream,
                wt: None,
                buf,
                kind: Kind::Mqtt,
                last: None,
                poll_path: String::new(),
                cursor: None,
            });
        }
        let req = match t.kind {
            Kind::WebSocket => {
                let key = base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    fastrand::u128(..).to_le_bytes(),
                );
                format!(
                    "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
                    t.path, t.addr
                )
            }
            Kind::Sse => format!("GET {} HTTP/1.0\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n", t.path, t.addr),
            Kind::Poll | Kind::Mqtt | Kind::WebTransport => unreachable!("handled above"),
        };
        stream.write_all(req.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let ok = match t.kind {
                    Kind::WebSocket => buf.starts_with(b"HTTP/1.1 101"),
                    _ => buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"),
                };
                if !ok {
                    return Err(std::io::Error::other(String::from_utf8_lossy(&buf[..i]).to_string()));
                }
                buf.advance(i + 4);
                break;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        if let (Kind::WebSocket, Some(first)) = (t.kind, &t.first_frame) {
            stream.write_all(&text_frame(first.as_bytes())).await?;
        }
        if let Some(marker) = t.ready {
            let confirmed = async {
                while !buf.windows(marker.len()).any(|w| w == marker) {
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                    }
                }
                Ok(())
            };
            tokio::time::timeout(Duration::from_secs(60), confirmed)
                .await
                .map_err(|_| std::io::Error::other("no subscription confirmation within 60 s"))??;
        }
        Ok(Subscriber { stream, wt: None, buf, kind: t.kind, last: None, poll_path: String::new(), cursor: None })
    }

    async fn connect_wt(
        t: &Target,
        endpoint: &wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
        datagrams: bool,
    ) -> std::io::Result<Subscriber> {
        let err = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let conn = endpoint.connect(format!("https://{}{}", t.addr, t.path)).await.map_err(|e| err(&e))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| err(&e))?.await.map_err(|e| err(&e))?;
        let mut stream: Box<dyn Io> = Box::new(wtransport::stream::BiStream::join((send, recv)));
        let channel = t.path.split("channel=").nth(1).unwrap_or_default().split('&').next().unwrap_or_default();
        let cmd = format!("{{\"id\":1,\"cmd\":\"subscribe\",\"channel\":\"{channel}\",\"datagrams\":{datagrams}}}\n");
        stream.write_all(cmd.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(4096);
        let confirmed = async {
            loop {
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line = buf.split_to(i + 1);
                    if line.starts_with(b"{\"id\":1,") {
                        if line.windows(8).any(|w| w == b"\"error\":") {
                            return Err(std::io::Error::other(String::from_utf8_lossy(&line).into_owned()));
                        }
                        return Ok(());
                    }
                }
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), confirmed)
            .await
            .map_err(|_| std::io::Error::other("no subscribe reply within 60 s"))??;
        Ok(Subscriber {
            stream,
            wt: Some(conn),
            buf,
            kind: Kind::WebTransport,
            last: None,
            poll_path: String::new(),
            cursor: None,
        })
    }

    /// One long poll on the keep-alive connection; returns the response body.
    async fn poll(&mut self, wait: u64) -> std::io::Result<Vec<u8>> {
        let mut path = format!("{}&wait={wait}", self.poll_path);
        if let Some(c) = &self.cursor {
            path.push_str(&format!("&since={c}"));
        }
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        self.stream.write_all(req.as_bytes()).await?;
        let (head, body) = read_response(&mut self.stream, &mut self.buf).await?;
        if !head.starts_with("http/1.1 200") {
            return Err(std::io::Error::other(head.lines().next().unwrap_or("").to_string()));
        }
        Ok(body)
    }

    async fn run_poll(mut self, stats: Arc<Stats>) -> Option<(String, u64)> {
        let mut local: Vec<u64> = Vec::new();
        loop {
            let Ok(body) = self.poll(25).await else { return self.last };
            let mut n = 0u64;
            let messages_end = body.windows(11).position(|w| w == b"],\"cursor\":").unwrap_or(body.len());
            let mut rest = &body[..messages_end];
            while let Some(i) = rest.windows(11).position(|w| w == b"{\"channel\":") {
                let after = &rest[i + 1..];
                let end = after.windows(11).position(|w| w == b"{\"channel\":").map_or(after.len(), |j| j);
                if self.message(&rest[i..i + 1 + end], &stats, &mut local) {
                    n += 1;
                }
                rest = &after[end..];
            }
            self.cursor = string_field(&body, b"\"cursor\":\"").or(self.cursor.take());
            let mut unflushed = n;
            flush(&stats, &mut local, &mut unflushed);
        }
    }

    /// Holds the connection without reading (a slow consumer).
    pub async fn stall(self, hold: Duration) {
        tokio::time::sleep(hold).await;
        drop(self);
    }

    /// Reads until the connection ends, counting messages and their latency.
    pub async fn run(mut self, stats: Arc<Stats>) -> Option<(String, u64)> {
        if self.kind == Kind::Poll {
            return self.run_poll(stats).await;
        }
        // WebTransport datagrams, beside the stream (ended with the session).
        let _datagrams = self.wt.clone().map(|conn| AbortOnDrop(tokio::spawn(read_datagrams(conn, stats.clone()))));
        let mut local: Vec<u64> = Vec::new();
        let mut unflushed = 0u64;
        loop {
            let mut replies: Vec<Vec<u8>> = Vec::new();
            match self.kind {
                Kind::WebSocket => {
                    while self.buf.len() >= 2 {
                        let b1 = self.buf[1] & 0x7F;
                        let (len, hdr) = match b1 {
                            126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                            127 if self.buf.len() >= 10 => {
                                (u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")) as usize, 10)
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
                            0x1 => {
                                if payload == b"2" {
                                    replies.push(text_frame(b"3")); // engine.io heartbeat
                                } else if self.message(payload, &stats, &mut local) {
                                    unflushed += 1;
                                }
                            }
                            0x9 => {
                                let mut pong = vec![0x8A, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                                pong.extend_from_slice(payload);
                                replies.push(pong);
                            }
                            0x8 => {
                                flush(&stats, &mut local, &mut unflushed);
                                return self.last;
                            }
                            _ => {}
                        }
                    }
                }
                Kind::Poll => unreachable!("run_poll"),
                Kind::Mqtt => {
                    while let Some((first, n)) = mqtt_next(&self.buf) {
                        let packet = self.buf.split_to(n);
                        if first >> 4 == 3 {
                            // PUBLISH: topic, packet id (QoS 1 and 2), then the payload.
                            let h = n - mqtt_body_len(&packet);
                            let tl = u16::from_be_bytes([packet[h], packet[h + 1]]) as usize;
                            let mut at = h + 2 + tl;
                            if (first >> 1) & 3 > 0 {
                                replies.push(mqtt_packet(0x40, &packet[at..at + 2]));
                                at += 2;
                            }
                            if self.message(&packet[at..], &stats, &mut local) {
                                unflushed += 1;
                            }
                        }
                    }
                }
                Kind::Sse => {
                    while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                        let line = self.buf.split_to(i + 1);
                        if let Some(data) = line.strip_prefix(b"data: ") {
                            if self.message(data, &stats, &mut local) {
                                unflushed += 1;
                            }
                        }
                    }
                }
                Kind::WebTransport => {
                    while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                        let line = self.buf.split_to(i + 1);
                        if line.starts_with(b"{\"pub\":") && self.message(&line, &stats, &mut local) {
                            unflushed += 1;
                        }
                    }
                }
            }
            for r in replies {
                if self.stream.write_all(&r).await.is_err() {
                    return self.last;
                }
            }
            flush(&stats, &mut local, &mut unflushed);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return self.last,
                Ok(_) => {}
            }
        }
    }

    /// Counts one message if it carries a timestamp; checks its offset if it has one.
    fn message(&mut self, payload: &[u8], stats: &Stats, local: &mut Vec<u64>) -> bool {
        let told_to_reset = payload.starts_with(b"{\"reset\":")
            || (payload.starts_with(b"{\"subscribed\":") && payload.windows(17).any(|w| w == b"\"recovered\":false"));
        if told_to_reset {
            stats.resets.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // `{"t":…}`, or a bare timestamp (short MQTT payloads).
        let bare = || std::str::from_utf8(payload).ok().and_then(|p| p.trim().parse().ok());
        let Some(t) = field(payload, b"\"t\":").or_else(bare) else { return false };
        if let Some(offset) = field(payload, b"\"offset\":") {
            let epoch = str_field(payload, b"\"epoch\":\"").unwrap_or_default();
            if let Some((e, o)) = &self.last {
                if e.as_bytes() == epoch {
                    if offset <= *o {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    if offset > o + 1 {
                        stats.gaps.fetch_add(offset - o - 1, Ordering::Relaxed);
                    }
                }
            }
            match &mut self.last {
                Some((e, o)) if e.as_bytes() == epoch => *o = offset,
                _ => self.last = Some((String::from_utf8_lossy(epoch).into_owned(), offset)),
            }
        }
        local.push(now_us().saturating_sub(t).max(1));
        true
    }
}

/// An MQTT 3.1.1 CONNECT: clean session, keep-alive off.
fn mqtt_connect(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    mqtt_packet(0x10, &body)
}

fn mqtt_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        p.push(b);
        if n == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}

/// The first byte and total length of the MQTT packet at the front of `buf`, if whole.
fn mqtt_next(buf: &[u8]) -> Option<(u8, usize)> {
    let mut len = 0usize;
    for i in 1..5 {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        if b & 0x80 == 0 {
            let total = i + 1 + len;
            return (buf.len() >= total).then_some((buf[0], total));
        }
    }
    None
}

/// The body length of a whole packet (its total minus the fixed header).
fn mqtt_body_len(packet: &[u8]) -> usize {
    let mut len = 0usize;
    for (i, b) in packet.iter().skip(1).take(4).enumerate() {
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    len
}

/// Publishes what one read brought: the count, and the latency samples recorded into the
/// shared histogram (O(1) per sample; merging whole histograms would walk every bucket).
/// Reads a WebTransport session's datagrams (`{"pub":…}` each), counting them.
async fn read_datagrams(conn: wtransport::Connection, stats: Arc<Stats>) {
    let mut local = Vec::new();
    while let Ok(d) = conn.receive_datagram().await {
        if let Some(t) = field(&d, b"\"t\":") {
            local.push(now_us().saturating_sub(t).max(1));
            let mut one = 1;
            flush(&stats, &mut local, &mut one);
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn flush(stats: &Stats, local: &mut Vec<u64>, unflushed: &mut u64) {
    if *unflushed > 0 {
        stats.delivered.fetch_add(*unflushed, Ordering::Relaxed);
        *unflushed = 0;
    }
    if !local.is_empty() {
        if let Ok(mut h) = stats.latency.lock() {
            for v in local.iter() {
                let _ = h.record(*v);
            }
        }
        local.clear();
    }
}

/// Reads the unsigned integer after `key` in `s`.
pub fn field(s: &[u8], key: &[u8]) -> Option<u64> {
    let mut i = s.windows(key.len()).position(|w| w == key)? + key.len();
    // (`"t": 1` as well as `"t":1`: a database's JSON text has the space.)
    while s.get(i) == Some(&b' ') {
        i += 1;
    }
    let digits = s[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    Some(s[i..i + digits].iter().fold(0u64, |n, b| n * 10 + (b - b'0') as u64))
}

/// The bytes of the string value after `key` (no allocation).
fn str_field<'a>(s: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let i = s.windows(key.len()).position(|w| w == key)? + key.len();
    let end = s[i..].iter().position(|b| *b == b'"')?;
    Some(&s[i..i + end])
}

/// A string field of a JSON body (no escapes): `key` is `"name":"`.
pub fn str_value(s: &[u8], key: &str) -> Option<String> {
    string_field(s, key.as_bytes())
}

/// `GET path` over HTTP/1.0 to a loopback server, blocking (a one-off before a run): the
/// 2xx response's body.
pub fn http_get(server: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {server}\r\n\r\n").as_bytes())?;
    let mut all = Vec::new();
    stream.read_to_end(&mut all)?;
    let i = all.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no response head"))?;
    if !all.starts_with(b"HTTP/1.1 2") && !all.starts_with(b"HTTP/1.0 2") {
        return Err(std::io::Error::other(String::from_utf8_lossy(&all[..i]).into_owned()));
    }
    Ok(all[i + 4..].to_vec())
}

fn string_field(s: &[u8], key: &[u8]) -> Option<String> {
    let i = s.windows(key.len()).position(|w| w == key)? + key.len();
    let end = s[i..].iter().position(|b| *b == b'"')?;
    Some(String::from_utf8_lossy(&s[i..i + end]).to_string())
}

/// Publishes over one keep-alive HTTP/1.1 connection: `POST <path>` with a body template
/// in which `$DATA` becomes the timestamped payload and `$SEQ` a sequence number.
pub struct Publisher {
    /// MQTT 3.1.1 instead of HTTP: `path` is the topic.
    mqtt: bool,
    /// MQTT: QoS 0, or 1 (each publication waits for its PUBACK).
    qos: u8,
    stream: TcpStream,
    addr: SocketAddr,
    path: String,
    template: String,
    /// `Authorization: Bearer …` header line, if an API key was given.
    auth: String,
    buf: BytesMut,
    seq: u64,
}

impl Publisher {
    pub async fn connect(
        addr: SocketAddr,
        path: &str,
        template: &str,
        api_key: Option<&str>,
    ) -> std::io::Result<Publisher> {
        let stream = connect_from(addr, None, None).await?;
        Ok(Publisher {
            mqtt: false,
            qos: 0,
            stream,
            addr,
            path: path.into(),
            template: template.into(),
            auth: api_key.map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n")),
            buf: BytesMut::with_capacity(1024),
            seq: 0,
        })
    }

    /// An MQTT publisher of `topic` at `addr`, at QoS 0 or 1.
    pub async fn connect_mqtt(addr: SocketAddr, topic: &str, qos: u8) -> std::io::Result<Publisher> {
        let mut p = Publisher::connect(addr, topic.trim_start_matches('/'), "", None).await?;
        p.mqtt = true;
        p.qos = qos;
        p.mqtt_hello().await?;
        Ok(p)
    }

    async fn mqtt_hello(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&mqtt_connect(&format!("bench-pub-{:x}", fastrand::u64(..)))).await?;
        let mut buf = [0u8; 4];
        self.stream.read_exact(&mut buf).await?;
        if buf[0] != 0x20 || buf[3] != 0 {
            return Err(std::io::Error::other("MQTT CONNECT refused"));
        }
        Ok(())
    }

    pub async fn reconnect(&mut self) -> std::io::Result<()> {
        self.stream = connect_from(self.addr, None, None).await?;
        self.buf.clear();
        if self.mqtt {
            self.mqtt_hello().await?;
        }
        Ok(())
    }

    /// Publishes the next message; on failure the same `$SEQ` is used again by the next
    /// call (so an idempotency key in the template makes retries safe).
    pub async fn publish(&mut self, payload: usize) -> std::io::Result<()> {
        let stamp = format!("{{\"t\":{},\"p\":\"", now_us());
        let pad = payload.saturating_sub(stamp.len() + 2);
        let data = if self.mqtt && payload < stamp.len() + 2 {
            // Short MQTT payloads (MQTT benchmarks use 16 B): the bare timestamp, in digits.
            format!("{:0width$}", now_us(), width = payload)
        } else {
            format!("{stamp}{}\"}}", "x".repeat(pad))
        };
        if self.mqtt {
            let mut body = (self.path.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(self.path.as_bytes());
            let id = (self.seq % 65_535 + 1) as u16;
            if self.qos > 0 {
                body.extend_from_slice(&id.to_be_bytes());
            }
            body.extend_from_slice(data.as_bytes());
            self.stream.write_all(&mqtt_packet(0x30 | (self.qos.min(1) << 1), &body)).await?;
            if self.qos > 0 {
                let mut ack = [0u8; 4];
                self.stream.read_exact(&mut ack).await?;
                if ack != [0x40, 2, (id >> 8) as u8, id as u8] {
                    return Err(std::io::Error::other(format!("expected PUBACK {id}, got {ack:?}")));
                }
            }
            self.seq += 1;
            return Ok(());
        }
        let body = self.template.replace("$DATA", &data).replace("$SEQ", &(self.seq + 1).to_string());
        let req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.path,
            self.addr,
            self.auth,
            body.len()
        );
        self.stream.write_all(req.as_bytes()).await?;
        let (head, _) = read_response(&mut self.stream, &mut self.buf).await?;
        if !head.starts_with("http/1.1 2") {
            return Err(std::io::Error::other(format!("publish refused: {}", head.lines().next().unwrap_or(""))));
        }
        self.seq += 1;
        Ok(())
    }

    pub fn published(&self) -> u64 {
        self.seq
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from a keep-alive
/// connection: (lower-cased head, body).
async fn read_response(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> std::io::Result<(String, Vec<u8>)> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                buf.advance(i + 4);
                let body = buf.split_to(len).to_vec();
                return Ok((head, body));
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}
