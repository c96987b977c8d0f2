//! A small MQTT 3.1.1 / 5 client for tests that need what command-line clients do not
//! show: reason codes and reason strings, raw packets, exact bytes. (End-to-end tests use
//! Mosquitto's own clients as well.)

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// MQTT over TCP, or over a WebSocket (`/mqtt`, binary messages).
pub enum Link {
    Tcp(TcpStream),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>),
}

/// Where to connect: the MQTT listener, or the server's `/mqtt` WebSocket endpoint.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    Tcp(std::net::SocketAddr),
    WebSocket(std::net::SocketAddr),
}

/// A PUBLISH as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub qos: u8,
    pub packet_id: Option<u16>,
    /// MQTT 5: the properties, as sent (without their length).
    pub props: Vec<u8>,
}

pub struct Mqtt {
    pub link: Link,
    buf: Vec<u8>,
    pub v5: bool,
    next_id: u16,
}

fn varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn str16(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    varint(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

/// MQTT 5 properties holding a user property `token` (or none).
/// An MQTT 5 properties block (its length first) of already encoded properties.
pub fn props_block(props: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, props.len());
    out.extend_from_slice(props);
    out
}

/// A string property or pair's encoding: a 2-byte length, then the bytes.
pub fn str16_of(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    str16(&mut out, s);
    out
}

fn token_props(token: Option<&str>) -> Vec<u8> {
    let mut p = Vec::new();
    if let Some(t) = token {
        p.push(0x26);
        str16(&mut p, b"token");
        str16(&mut p, t.as_bytes());
    }
    let mut out = Vec::new();
    varint(&mut out, p.len());
    out.extend(p);
    out
}

/// The reason string (0x1F) in a properties block, if any.
fn reason_string(props: &[u8]) -> String {
    let mut i = 0;
    while i < props.len() {
        let id = props[i];
        i += 1;
        match id {
            0x1F | 0x12 | 0x03 | 0x08 | 0x15 | 0x1A | 0x1C => {
                let n = u16::from_be_bytes([props[i], props[i + 1]]) as usize;
                let s = &props[i + 2..i + 2 + n];
                if id == 0x1F {
                    return String::from_utf8_lossy(s).into_owned();
                }
                i += 2 + n;
            }
            0x11 | 0x27 | 0x02 | 0x18 => i += 4,
            0x13 | 0x21 | 0x22 | 0x23 => i += 2,
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A | 0x01 | 0x17 | 0x19 => i += 1,
            0x26 => {
                for _ in 0..2 {
                    let n = u16::from_be_bytes([props[i], props[i + 1]]) as usize;
                    i += 2 + n;
                }
            }
            _ => return String::new(),
        }
    }
    String::new()
}

/// Splits a properties block (varint length first) off `body[at..]`: (props, next index).
fn props_at(body: &[u8], at: usize) -> (&[u8], usize) {
    let (mut len, mut shift, mut i) = (0usize, 0, at);
    loop {
        let b = body[i];
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    (&body[i..i + len], i + len)
}

impl Mqtt {
    /// Connects and sends CONNECT; `Err((code, reason string))` when refused (the
    /// connection then closed).
    pub async fn connect(
        addr: std::net::SocketAddr,
        v5: bool,
        client_id: &str,
        password: Option<&str>,
    ) -> Result<Mqtt, (u8, String)> {
        Self::connect_with(addr, v5, client_id, password, 60, None).await
    }

    /// CONNECT over TCP or over the WebSocket endpoint.
    pub async fn connect_via(
        via: Via,
        v5: bool,
        client_id: &str,
        password: Option<&str>,
    ) -> Result<Mqtt, (u8, String)> {
        Self::handshake(Self::open(via, v5).await, client_id, password, 60, None).await
    }

    /// A connection to the MQTT listener or the `/mqtt` endpoint, before CONNECT.
    async fn open(via: Via, v5: bool) -> Mqtt {
        let link = match via {
            Via::Tcp(addr) => Link::Tcp(TcpStream::connect(addr).await.unwrap()),
            Via::WebSocket(http) => {
                use tokio_tungstenite::tungstenite::client::IntoClientRequest;
                let mut req = format!("ws://{http}/mqtt").into_client_request().unwrap();
                req.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
                let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("the /mqtt handshake");
                Link::Ws(Box::new(ws))
            }
        };
        Mqtt { link, buf: Vec::new(), v5, next_id: 1 }
    }

    /// CONNECT with a keep-alive and a will (topic, payload).
    pub async fn connect_with(
        addr: std::net::SocketAddr,
        v5: bool,
        client_id: &str,
        password: Option<&str>,
        keep_alive: u16,
        will: Option<(&str, &[u8])>,
    ) -> Result<Mqtt, (u8, String)> {
        Self::handshake(Self::open(Via::Tcp(addr), v5).await, client_id, password, keep_alive, will).await
    }

    /// CONNECT with clean session / clean start off or on, and (MQTT 5) a session expiry:
    /// the connection and CONNACK's session-present flag.
    pub async fn connect_session(
        addr: std::net::SocketAddr,
        v5: bool,
        client_id: &str,
        clean: bool,
        expiry: u32,
    ) -> (Mqtt, bool) {
        Self::connect_session_with(addr, v5, client_id, clean, expiry, None).await
    }

    /// [`Self::connect_session`] with an MQTT 5 receive maximum.
    pub async fn connect_session_with(
        addr: std::net::SocketAddr,
        v5: bool,
        client_id: &str,
        clean: bool,
        expiry: u32,
        receive_maximum: Option<u16>,
    ) -> (Mqtt, bool) {
        let mut m = Self::open(Via::Tcp(addr), v5).await;
        let mut body = Vec::new();
        str16(&mut body, b"MQTT");
        body.push(if v5 { 5 } else { 4 });
        body.push(if clean { 0x02 } else { 0 });
        body.extend_from_slice(&60u16.to_be_bytes());
        if v5 {
            let mut props = vec![0x11];
            props.extend_from_slice(&expiry.to_be_bytes());
            if let Some(r) = receive_maximum {
                props.push(0x21);
                props.extend_from_slice(&r.to_be_bytes());
            }
            body.push(props.len() as u8);
            body.extend(props);
        }
        str16(&mut body, client_id.as_bytes());
        m.send(&packet(0x10, &body)).await;
        let (first, body) = m.read().await.expect("CONNACK");
        assert_eq!((first, body[1]), (0x20, 0), "CONNACK accepted");
        (m, body[0] & 1 == 1)
    }

    /// MQTT 5 CONNECT with clean start and these raw CONNECT properties; `Err`: the
    /// CONNACK's reason code.
    pub async fn connect_v5_props(addr: std::net::SocketAddr, client_id: &str, props: &[u8]) -> Result<Mqtt, u8> {
        Self::connect_v5_props_via(Via::Tcp(addr), client_id, props).await
    }

    /// [`Self::connect_v5_props`] over TCP or the WebSocket endpoint, accepted.
    pub async fn connect_v5_via(via: Via, client_id: &str, props: &[u8]) -> Mqtt {
        Self::connect_v5_props_via(via, client_id, props).await.unwrap_or_else(|c| panic!("CONNACK {c:#x}"))
    }

    async fn connect_v5_props_via(via: Via, client_id: &str, props: &[u8]) -> Result<Mqtt, u8> {
        let mut m = Self::open(via, true).await;
        let mut body = Vec::new();
        str16(&mut body, b"MQTT");
        body.extend_from_slice(&[5, 0x02]);
        body.extend_from_slice(&60u16.to_be_bytes());
        varint(&mut body, props.len());
        body.extend_from_slice(props);
        str16(&mut body, client_id.as_bytes());
        m.send(&packet(0x10, &body)).await;
        let (first, body) = m.read().await.expect("CONNACK");
        assert_eq!(first, 0x20, "CONNACK");
        if body[1] != 0 {
            return Err(body[1]);
        }
        Ok(m)
    }

    /// MQTT 5 authentication properties: method and data.
    pub fn auth_props(method: &str, data: &str) -> Vec<u8> {
        let mut p = vec![0x15];
        str16(&mut p, method.as_bytes());
        p.push(0x16);
        str16(&mut p, data.as_bytes());
        p
    }

    /// An AUTH packet (MQTT 5) with a reason code and these properties.
    pub fn auth(reason: u8, props: &[u8]) -> Vec<u8> {
        let mut body = vec![reason];
        varint(&mut body, props.len());
        body.extend_from_slice(props);
        packet(0xF0, &body)
    }

    /// DISCONNECT, then waits until the server closes.
    pub async fn disconnect(mut self) {
        self.send(&packet(0xE0, &[0, 0][..if self.v5 { 2 } else { 0 }])).await;
        while self.read().await.is_some() {}
    }

    async fn handshake(
        m: Mqtt,
        client_id: &str,
        password: Option<&str>,
        keep_alive: u16,
        will: Option<(&str, &[u8])>,
    ) -> Result<Mqtt, (u8, String)> {
        // (A password goes with the user name `user`: the server reads the token.)
        let user = password.map(|_| "user");
        Self::handshake_as(m, client_id, user, password, keep_alive, will).await
    }

    /// CONNECT with this user name (and password), over TCP: a device of `[[mqtt.users]]`.
    pub async fn connect_as(
        addr: std::net::SocketAddr,
        v5: bool,
        client_id: &str,
        user: &str,
        password: Option<&str>,
    ) -> Result<Mqtt, (u8, String)> {
        Self::handshake_as(Self::open(Via::Tcp(addr), v5).await, client_id, Some(user), password, 60, None).await
    }

    async fn handshake_as(
        mut m: Mqtt,
        client_id: &str,
        user: Option<&str>,
        password: Option<&str>,
        keep_alive: u16,
        will: Option<(&str, &[u8])>,
    ) -> Result<Mqtt, (u8, String)> {
        let v5 = m.v5;
        let mut flags = 0x02u8;
        if will.is_some() {
            flags |= 0x04;
        }
        if user.is_some() {
            flags |= 0x80;
        }
        if password.is_some() {
            flags |= 0x40;
        }
        let mut body = Vec::new();
        str16(&mut body, b"MQTT");
        body.push(if v5 { 5 } else { 4 });
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        if v5 {
            body.push(0);
        }
        str16(&mut body, client_id.as_bytes());
        if let Some((topic, payload)) = will {
            if v5 {
                body.push(0);
            }
            str16(&mut body, topic.as_bytes());
            str16(&mut body, payload);
        }
        if let Some(u) = user {
            str16(&mut body, u.as_bytes());
        }
        if let Some(p) = password {
            str16(&mut body, p.as_bytes());
        }
        m.send(&packet(0x10, &body)).await;
        let (first, body) = m.read().await.ok_or((0xff, "closed before CONNACK".to_string()))?;
        assert_eq!(first, 0x20, "expected CONNACK");
        let code = body[1];
        let reason = if v5 { reason_string(props_at(&body, 2).0) } else { String::new() };
        if code != 0 {
            return Err((code, reason));
        }
        Ok(m)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Tcp(t) => t.write_all(bytes).await.unwrap(),
            Link::Ws(w) => w.send(Message::binary(bytes.to_vec())).await.unwrap(),
        }
    }

    /// Reads until the server closes: the last packet's first byte and the first byte of
    /// its body (a DISCONNECT's reason code); `None` when nothing came before the close.
    pub async fn last_before_close(&mut self) -> Option<(u8, u8)> {
        let mut last = None;
        while let Some(p) = self.read().await {
            last = Some(p);
        }
        last.map(|(first, body)| (first, body[0]))
    }

    /// The next packet: (first byte, body); `None` once the server closed.
    pub async fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (mut len, mut shift, mut i) = (0usize, 0, 1);
                let mut complete = false;
                while i < self.buf.len() && i < 5 {
                    let b = self.buf[i];
                    len |= ((b & 0x7f) as usize) << shift;
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                    shift += 7;
                }
                if complete && self.buf.len() >= i + len {
                    let first = self.buf[0];
                    let body = self.buf[i..i + len].to_vec();
                    self.buf.drain(..i + len);
                    return Some((first, body));
                }
            }
            match &mut self.link {
                Link::Tcp(t) => {
                    let mut chunk = [0u8; 4096];
                    match tokio::time::timeout(Duration::from_secs(30), t.read(&mut chunk)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return None,
                        Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                        Err(_) => panic!("no packet from the server within 30 s"),
                    }
                }
                Link::Ws(w) => match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
                    Ok(Some(Ok(Message::Binary(b)))) => self.buf.extend_from_slice(&b),
                    Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => return None,
                    Ok(Some(Ok(_))) => {}
                    Err(_) => panic!("no packet from the server within 30 s"),
                },
            }
        }
    }

    fn id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// SUBSCRIBE one filter at QoS 0: (SUBACK code, reason string).
    pub async fn subscribe(&mut self, filter: &str, token: Option<&str>) -> (u8, String) {
        self.subscribe_qos(filter, token, 0).await
    }

    /// SUBSCRIBE one filter at `qos`: (SUBACK code — the granted QoS —, reason string).
    pub async fn subscribe_qos(&mut self, filter: &str, token: Option<&str>, qos: u8) -> (u8, String) {
        let id = self.id();
        let mut body = id.to_be_bytes().to_vec();
        if self.v5 {
            body.extend(token_props(token));
        }
        str16(&mut body, filter.as_bytes());
        body.push(qos);
        self.send(&packet(0x82, &body)).await;
        loop {
            let (first, body) = self.read().await.expect("SUBACK");
            if first >> 4 != 9 {
                continue; // a retained publication may come first
            }
            assert_eq!(u16::from_be_bytes([body[0], body[1]]), id);
            if self.v5 {
                let (props, at) = props_at(&body, 2);
                return (body[at], reason_string(props));
            }
            return (body[2], String::new());
        }
    }

    /// PUBLISH; for QoS 1 and 2 waits for PUBACK / PUBREC (and completes QoS 2): (code,
    /// reason string). `None` when the server closed the connection instead.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, token: Option<&str>) -> Option<(u8, String)> {
        self.publish_props(topic, payload, qos, &token_props(token)[..]).await
    }

    /// [`Mqtt::publish`] with these MQTT 5 properties (a whole block, its length first).
    pub async fn publish_props(&mut self, topic: &str, payload: &[u8], qos: u8, props: &[u8]) -> Option<(u8, String)> {
        let id = self.id();
        let mut body = Vec::new();
        str16(&mut body, topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        if self.v5 {
            body.extend_from_slice(props);
        }
        body.extend_from_slice(payload);
        self.send(&packet(0x30 | (qos << 1), &body)).await;
        if qos == 0 {
            return Some((0, String::new()));
        }
        loop {
            let (first, body) = self.read().await?;
            let kind = first >> 4;
            if kind != 4 && kind != 5 {
                continue;
            }
            assert_eq!(u16::from_be_bytes([body[0], body[1]]), id);
            let (code, reason) = if self.v5 && body.len() > 2 {
                let reason = if body.len() > 3 { reason_string(props_at(&body, 3).0) } else { String::new() };
                (body[2], reason)
            } else {
                (0, String::new())
            };
            if kind == 5 && code < 0x80 {
                // QoS 2: PUBREL, then PUBCOMP.
                self.send(&packet(0x62, &id.to_be_bytes())).await;
                let (first, _) = self.read().await?;
                assert_eq!(first >> 4, 7, "PUBCOMP");
            }
            return Some((code, reason));
        }
    }

    /// The next PUBLISH, acknowledged if it is QoS 1: (topic, payload, retain).
    pub async fn next_publish(&mut self) -> Option<(String, Vec<u8>, bool)> {
        let p = self.next_publish_unacked().await?;
        if let Some(id) = p.packet_id {
            self.send(&packet(0x40, &id.to_be_bytes())).await;
        }
        Some((p.topic, p.payload, p.retain))
    }

    /// The next PUBLISH, not acknowledged.
    pub async fn next_publish_unacked(&mut self) -> Option<Received> {
        loop {
            let (first, body) = self.read().await?;
            if first >> 4 != 3 {
                continue;
            }
            let qos = (first >> 1) & 3;
            let n = u16::from_be_bytes([body[0], body[1]]) as usize;
            let topic = String::from_utf8(body[2..2 + n].to_vec()).unwrap();
            let packet_id = (qos > 0).then(|| u16::from_be_bytes([body[2 + n], body[3 + n]]));
            let mut at = 2 + n + if qos > 0 { 2 } else { 0 };
            let mut props = Vec::new();
            if self.v5 {
                let (p, next) = props_at(&body, at);
                (props, at) = (p.to_vec(), next);
            }
            let payload = body[at..].to_vec();
            return Some(Received { topic, payload, retain: first & 1 == 1, qos, packet_id, props });
        }
    }

    /// PUBACK for a received QoS 1 publication.
    pub async fn puback(&mut self, id: u16) {
        self.send(&packet(0x40, &id.to_be_bytes())).await;
    }
}
