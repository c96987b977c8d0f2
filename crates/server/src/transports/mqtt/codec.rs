//! MQTT 3.1.1 and 5 packets: decoding what clients send, encoding what the server sends.
//!
//! Written here rather than taken from a crate: the maintained Rust codecs either cover
//! one version, pull in a client stack, or parse properties the server then has to
//! re-check anyway. Every length is checked against what is left of the packet and
//! against the packet size limit before anything is allocated; a malformed packet is an
//! [`Error`] with the reason code the specification gives it, never a panic (the
//! `mqtt_packets` fuzz target feeds it arbitrary bytes).

use bytes::{BufMut, Bytes, BytesMut};
use switchboard_core::Meta;

/// Protocol level from CONNECT: 4 is 3.1.1, 5 is 5.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// Why a packet could not be decoded. Each maps to an MQTT 5 reason code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Bytes that do not form a packet (0x81 Malformed Packet).
    Malformed(&'static str),
    /// A well-formed packet that breaks the protocol's rules (0x82 Protocol Error).
    Protocol(&'static str),
    /// Past the maximum packet size (0x95 Packet too large).
    TooLarge(usize),
    /// CONNECT with a protocol this server does not speak.
    UnsupportedVersion(u8),
}

impl Error {
    pub fn reason_code(&self) -> u8 {
        match self {
            Error::Malformed(_) => 0x81,
            Error::Protocol(_) => 0x82,
            Error::TooLarge(_) => 0x95,
            Error::UnsupportedVersion(_) => 0x84,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Error::Malformed(m) | Error::Protocol(m) => (*m).to_string(),
            Error::TooLarge(n) => format!("packet of {n} bytes is over the limit"),
            Error::UnsupportedVersion(v) => format!("protocol level {v} is not supported (4 = 3.1.1, 5 = 5.0)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will delay interval, seconds.
    pub delay_secs: u32,
    /// MQTT 5: the will's publication properties (and its retain flag).
    pub meta: Option<Box<Meta>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    /// MQTT 5: session expiry interval (seconds), receive maximum, maximum packet size,
    /// topic alias maximum (client → server aliases it accepts).
    pub session_expiry: u32,
    pub receive_maximum: u16,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: u16,
    /// MQTT 5 enhanced authentication: the method and its data (for `JWT`, the token).
    pub auth_method: Option<String>,
    pub auth_data: Option<Bytes>,
}

/// An MQTT 5 AUTH packet from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// 0x00 success, 0x18 continue authentication, 0x19 re-authenticate.
    pub reason: u8,
    pub method: Option<String>,
    pub data: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// Empty when an MQTT 5 topic alias stands for it (see `topic_alias`).
    pub topic: String,
    pub packet_id: Option<u16>,
    pub payload: Bytes,
    pub topic_alias: Option<u16>,
    /// The retain flag and MQTT 5's publication properties (message expiry, payload
    /// format, content type, response topic, correlation data, user properties but
    /// `token`), passed on with the publication; `None` when it has none of them.
    pub meta: Option<Box<Meta>>,
    /// MQTT 5 user property `token`: a subscription token for the channel.
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    /// Topic filters and their options.
    pub filters: Vec<(String, Options)>,
    /// MQTT 5 user property `token`: a subscription token for the channels.
    pub token: Option<String>,
    /// MQTT 5 subscription identifier (1 to 268,435,455), sent back with every PUBLISH
    /// these subscriptions match.
    pub id: Option<u32>,
}

/// A SUBSCRIBE filter's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// The QoS asked (0–2).
    pub qos: u8,
    /// MQTT 5 Retain Handling: 0 the retained message on subscribing, 1 only when the
    /// subscription is new, 2 none.
    pub retain_handling: u8,
    /// MQTT 5 No Local: not the client's own publications.
    pub no_local: bool,
    /// MQTT 5 Retain As Published: publications keep the retain flag they were published with.
    pub retain_as_published: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    /// The client's reason code (0 for a normal disconnect; 0x04: publish the will).
    Disconnect(u8),
    Auth(Auth),
}

/// Reads a variable byte integer at `buf[0..]`: (value, bytes used), `None` if incomplete.
fn varint(buf: &[u8]) -> Result<Option<(usize, usize)>, Error> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(Error::Malformed("variable byte integer longer than 4 bytes"))
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

/// A cursor over one packet's body.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.at
    }
    fn u8(&mut self) -> Result<u8, Error> {
        let b = *self.buf.get(self.at).ok_or(Error::Malformed("packet ends early"))?;
        self.at += 1;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes([self.u8()?, self.u8()?, self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.left() < n {
            return Err(Error::Malformed("a length runs past the packet"));
        }
        let b = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(b)
    }
    fn binary(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
    /// A UTF-8 string: well-formed, without U+0000 (MQTT 1.5.4).
    fn string(&mut self) -> Result<String, Error> {
        let b = self.binary()?;
        let s = std::str::from_utf8(b).map_err(|_| Error::Malformed("a string is not UTF-8"))?;
        if s.contains('\0') {
            return Err(Error::Malformed("a string contains U+0000"));
        }
        Ok(s.to_string())
    }
    fn varint(&mut self) -> Result<usize, Error> {
        match varint(&self.buf[self.at..])? {
            Some((v, n)) => {
                self.at += n;
                Ok(v)
            }
            None => Err(Error::Malformed("packet ends inside a variable byte integer")),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        let b = &self.buf[self.at..];
        self.at = self.buf.len();
        b
    }
}

/// MQTT 5 properties this server reads; the others are checked for form and skipped.
#[derive(Default)]
struct Props {
    session_expiry: Option<u32>,
    receive_maximum: Option<u16>,
    maximum_packet_size: Option<u32>,
    topic_alias_maximum: Option<u16>,
    topic_alias: Option<u16>,
    message_expiry: Option<u32>,
    will_delay: Option<u32>,
    /// A user property `token`: a subscription token, as the WebSocket commands take.
    token: Option<String>,
    subscription_id: Option<u32>,
    auth_method: Option<String>,
    auth_data: Option<Bytes>,
    /// A publication's (or will's) properties passed on to subscribers.
    format: Option<u8>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation: Option<Bytes>,
    /// User properties other than `token`, in order.
    user: Vec<(String, String)>,
}

impl Props {
    /// What a PUBLISH (or a will) with these properties and `retain` carries on.
    fn meta(&mut self, retain: bool) -> Option<Box<Meta>> {
        let m = Meta {
            ttl: self.message_expiry,
            retain,
            format: self.format,
            content_type: self.content_type.take(),
            response_topic: self.response_topic.take(),
            correlation: self.correlation.take(),
            headers: std::mem::take(&mut self.user),
        };
        (!m.is_empty()).then(|| Box::new(m))
    }
}

fn properties(r: &mut Reader<'_>) -> Result<Props, Error> {
    let len = r.varint()?;
    let block = r.bytes(len)?;
    let mut p = Reader { buf: block, at: 0 };
    let mut out = Props::default();
    while p.left() > 0 {
        let id = p.varint()?;
        match id {
            0x01 => out.format = Some(p.u8()?),
            0x17 | 0x19 => {
                p.u8()?;
            }
            0x02 => out.message_expiry = Some(p.u32()?),
            0x11 => out.session_expiry = Some(p.u32()?),
            0x18 => out.will_delay = Some(p.u32()?),
            0x21 => {
                let v = p.u16()?;
                if v == 0 {
                    return Err(Error::Protocol("receive maximum of 0"));
                }
                out.receive_maximum = Some(v);
            }
            0x22 => out.topic_alias_maximum = Some(p.u16()?),
            0x23 => {
                // (0 is refused with 0x94 Topic Alias invalid, as one past the maximum.)
                out.topic_alias = Some(p.u16()?);
            }
            0x27 => {
                let v = p.u32()?;
                if v == 0 {
                    return Err(Error::Protocol("maximum packet size of 0"));
                }
                out.maximum_packet_size = Some(v);
            }
            0x15 => out.auth_method = Some(p.string()?),
            0x16 => out.auth_data = Some(Bytes::copy_from_slice(p.binary()?)),
            0x03 => out.content_type = Some(p.string()?),
            0x08 => {
                let t = p.string()?;
                if t.contains(['+', '#']) {
                    // MQTT-3.3.2-14 (and -3.1.3-11 for a will's).
                    return Err(Error::Protocol("a response topic with wildcards"));
                }
                out.response_topic = Some(t);
            }
            0x1F => {
                p.string()?;
            }
            0x09 => out.correlation = Some(Bytes::copy_from_slice(p.binary()?)),
            0x0B => {
                let v = p.varint()?;
                if v == 0 {
                    return Err(Error::Protocol("subscription identifier 0"));
                }
                out.subscription_id = Some(v as u32);
            }
            0x26 => {
                let (k, v) = (p.string()?, p.string()?);
                if k == "token" {
                    out.token = Some(v);
                } else {
                    out.user.push((k, v));
                }
            }
            _ => return Err(Error::Protocol("unknown property")),
        }
    }
    Ok(out)
}

/// Decodes one packet from the front of `buf`: `Ok(None)` when more bytes are needed,
/// else the packet and how many bytes it took. `version` is `None` until CONNECT.
pub fn decode(buf: &[u8], version: Option<Version>, max_packet: usize) -> Result<Option<(Packet, usize)>, Error> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let Some((len, n)) = varint(&buf[1..])? else { return Ok(None) };
    let total = 1 + n + len;
    if total > max_packet {
        return Err(Error::TooLarge(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let mut r = Reader { buf: &buf[1 + n..total], at: 0 };
    let kind = first >> 4;
    let flags = first & 0x0f;
    let v5 = version == Some(Version::V5);
    let packet = match (kind, version) {
        (1, None) => {
            if flags != 0 {
                return Err(Error::Malformed("CONNECT flags must be 0"));
            }
            Packet::Connect(Box::new(connect(&mut r)?))
        }
        (1, Some(_)) => return Err(Error::Protocol("a second CONNECT")),
        (_, None) => return Err(Error::Protocol("the first packet must be CONNECT")),
        (3, Some(_)) => {
            let qos = (flags >> 1) & 3;
            if qos == 3 {
                return Err(Error::Malformed("PUBLISH with QoS 3"));
            }
            let dup = flags & 8 != 0;
            if qos == 0 && dup {
                return Err(Error::Malformed("DUP on a QoS 0 PUBLISH"));
            }
            let topic = r.string()?;
            let packet_id = if qos > 0 { Some(nonzero(r.u16()?)?) } else { None };
            let mut props = if v5 { properties(&mut r)? } else { Props::default() };
            if props.subscription_id.is_some() {
                // MQTT-3.3.4-6: only the server puts subscription identifiers in a PUBLISH.
                return Err(Error::Protocol("a subscription identifier in a client's PUBLISH"));
            }
            let retain = flags & 1 != 0;
            Packet::Publish(Publish {
                dup,
                qos,
                retain,
                topic,
                packet_id,
                payload: Bytes::copy_from_slice(r.rest()),
                topic_alias: props.topic_alias,
                meta: props.meta(retain),
                token: props.token,
            })
        }
        (4..=7, Some(_)) => {
            // PUBREL's fixed header flags are 0010; the others' 0000.
            if (kind == 6 && flags != 2) || (kind != 6 && flags != 0) {
                return Err(Error::Malformed("wrong fixed header flags"));
            }
            let id = r.u16()?;
            // MQTT 5 may add a reason code and properties; read past them.
            if v5 && r.left() > 0 {
                r.u8()?;
                if r.left() > 0 {
                    properties(&mut r)?;
                }
            }
            match kind {
                4 => Packet::PubAck(id),
                5 => Packet::PubRec(id),
                6 => Packet::PubRel(id),
                _ => Packet::PubComp(id),
            }
        }
        (8, Some(_)) => {
            if flags != 2 {
                return Err(Error::Malformed("SUBSCRIBE flags must be 0010"));
            }
            let packet_id = nonzero(r.u16()?)?;
            let props = if v5 { properties(&mut r)? } else { Props::default() };
            let mut filters = Vec::new();
            while r.left() > 0 {
                let f = r.string()?;
                let opts = r.u8()?;
                let reserved = if v5 { 0xc0 } else { 0xfc };
                if opts & reserved != 0 || opts & 3 == 3 {
                    return Err(Error::Malformed("bad subscription options"));
                }
                let o = Options {
                    qos: opts & 3,
                    retain_handling: (opts >> 4) & 3,
                    no_local: opts & 4 != 0,
                    retain_as_published: opts & 8 != 0,
                };
                if o.retain_handling == 3 {
                    return Err(Error::Protocol("Retain Handling 3"));
                }
                if o.no_local && f.starts_with("$share/") {
                    return Err(Error::Protocol("No Local on a shared subscription"));
                }
                filters.push((f, o));
            }
            if filters.is_empty() {
                return Err(Error::Protocol("SUBSCRIBE without a topic filter"));
            }
            Packet::Subscribe(Subscribe { packet_id, filters, token: props.token, id: props.subscription_id })
        }
        (10, Some(_)) => {
            if flags != 2 {
                return Err(Error::Malformed("UNSUBSCRIBE flags must be 0010"));
            }
            let packet_id = nonzero(r.u16()?)?;
            if v5 {
                properties(&mut r)?;
            }
            let mut filters = Vec::new();
            while r.left() > 0 {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(Error::Protocol("UNSUBSCRIBE without a topic filter"));
            }
            Packet::Unsubscribe(Unsubscribe { packet_id, filters })
        }
        (12, Some(_)) => Packet::PingReq,
        (14, Some(_)) => {
            let reason = if v5 && r.left() > 0 { r.u8()? } else { 0 };
            if v5 && r.left() > 0 {
                properties(&mut r)?;
            }
            Packet::Disconnect(reason)
        }
        (15, Some(Version::V5)) => {
            // (No reason code and no properties: 0x00 Success.)
            let reason = if r.left() > 0 { r.u8()? } else { 0 };
            let props = if r.left() > 0 { properties(&mut r)? } else { Props::default() };
            Packet::Auth(Auth { reason, method: props.auth_method, data: props.auth_data })
        }
        _ => return Err(Error::Malformed("unknown or server-only packet type")),
    };
    if r.left() > 0 && !matches!(packet, Packet::Publish(_)) {
        return Err(Error::Malformed("bytes after the packet's end"));
    }
    Ok(Some((packet, total)))
}

/// A packet identifier, which is never 0 (MQTT-2.3.1-1).
fn nonzero(id: u16) -> Result<u16, Error> {
    if id == 0 {
        return Err(Error::Malformed("packet identifier 0"));
    }
    Ok(id)
}

fn connect(r: &mut Reader<'_>) -> Result<Connect, Error> {
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (name, level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(Error::UnsupportedVersion(l)),
        _ => return Err(Error::Protocol("not an MQTT protocol name")),
    };
    let flags = r.u8()?;
    if flags & 1 != 0 {
        return Err(Error::Malformed("CONNECT reserved flag set"));
    }
    let keep_alive = r.u16()?;
    let v5 = version == Version::V5;
    let props = if v5 { properties(r)? } else { Props::default() };
    let client_id = r.string()?;
    let will = if flags & 0x04 != 0 {
        let mut wprops = if v5 { properties(r)? } else { Props::default() };
        let topic = r.string()?;
        let payload = Bytes::copy_from_slice(r.binary()?);
        let qos = (flags >> 3) & 3;
        if qos == 3 {
            return Err(Error::Malformed("will QoS 3"));
        }
        let retain = flags & 0x20 != 0;
        let meta = wprops.meta(retain);
        Some(Will { topic, payload, qos, retain, delay_secs: wprops.will_delay.unwrap_or(0), meta })
    } else {
        if flags & 0x38 != 0 {
            return Err(Error::Malformed("will QoS or retain without a will"));
        }
        None
    };
    let username = if flags & 0x80 != 0 { Some(r.string()?) } else { None };
    let password = if flags & 0x40 != 0 { Some(Bytes::copy_from_slice(r.binary()?)) } else { None };
    if version == Version::V311 && password.is_some() && username.is_none() {
        return Err(Error::Malformed("a password without a user name (3.1.1)"));
    }
    if r.left() > 0 {
        return Err(Error::Malformed("bytes after CONNECT's payload"));
    }
    Ok(Connect {
        version,
        client_id,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        username,
        password,
        will,
        session_expiry: props.session_expiry.unwrap_or(0),
        receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
        maximum_packet_size: props.maximum_packet_size,
        topic_alias_maximum: props.topic_alias_maximum.unwrap_or(0),
        auth_method: props.auth_method,
        auth_data: props.auth_data,
    })
}

fn packet(kind_flags: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(kind_flags);
    put_varint(&mut out, body.len());
    out.put_slice(body);
    out.freeze()
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// What the server says about itself in an MQTT 5 CONNACK.
pub struct ServerProps<'a> {
    pub assigned_client_id: Option<&'a str>,
    pub keep_alive: Option<u16>,
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
    pub reason: Option<&'a str>,
    /// Topic aliases the client may define.
    pub topic_alias_maximum: u16,
    /// The session expiry the server grants, when not the client's.
    pub session_expiry_override: Option<u32>,
    /// The authentication method the client used (enhanced authentication).
    pub auth_method: Option<&'a str>,
}

/// CONNACK. `code` is the MQTT 5 reason code; 3.1.1 gets its own return code for it.
pub fn connack(version: Version, session_present: bool, code: u8, props: &ServerProps<'_>) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(session_present as u8);
    match version {
        Version::V311 => b.put_u8(match code {
            0 => 0,
            0x84 => 1,
            0x85 => 2,
            0x88 | 0x89 => 3,
            0x86 => 4,
            _ => 5,
        }),
        Version::V5 => {
            b.put_u8(code);
            let mut p = BytesMut::new();
            if let Some(id) = props.assigned_client_id {
                p.put_u8(0x12);
                put_str(&mut p, id);
            }
            if let Some(k) = props.keep_alive {
                p.put_u8(0x13);
                p.put_u16(k);
            }
            p.put_u8(0x21);
            p.put_u16(props.receive_maximum);
            p.put_u8(0x27);
            p.put_u32(props.maximum_packet_size);
            if let Some(e) = props.session_expiry_override {
                p.put_u8(0x11);
                p.put_u32(e);
            }
            p.put_u8(0x22);
            p.put_u16(props.topic_alias_maximum);
            if let Some(m) = props.auth_method {
                p.put_u8(0x15);
                put_str(&mut p, m);
            }
            // Shared subscriptions and subscription identifiers: available (the default,
            // said anyway). Retained messages are a channel's latest publication.
            p.put_u8(0x2A);
            p.put_u8(1);
            p.put_u8(0x29);
            p.put_u8(1);
            if let Some(r) = props.reason {
                let mut end = r.len().min(200);
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                p.put_u8(0x1F);
                put_str(&mut p, &r[..end]);
            }
            put_varint(&mut b, p.len());
            b.put_slice(&p);
        }
    }
    packet(0x20, &b)
}

/// A server PUBLISH, QoS 0 without identifiers.
pub fn publish(version: Version, topic: &str, payload: &[u8], retain: bool) -> Bytes {
    Outgoing {
        topic,
        payload,
        qos: 0,
        packet_id: 0,
        retain,
        dup: false,
        subscription_ids: &[],
        meta: None,
        expiry: None,
        alias: None,
    }
    .encode(version)
}

/// A server PUBLISH.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    /// For QoS 1 and 2.
    pub packet_id: u16,
    pub retain: bool,
    /// A retransmission of an unacknowledged one, with the same packet id.
    pub dup: bool,
    /// MQTT 5: the identifiers of the subscriptions it matches.
    pub subscription_ids: &'a [u32],
    /// MQTT 5: the publication's properties, sent as they came (but its expiry).
    pub meta: Option<&'a Meta>,
    /// MQTT 5: the Message Expiry Interval left, seconds.
    pub expiry: Option<u32>,
    /// MQTT 5: the topic alias it goes with, and whether the topic goes too (defining the
    /// alias) — without it the topic is empty and the alias stands for it.
    pub alias: Option<(u16, bool)>,
}

impl Outgoing<'_> {
    pub fn encode(&self, version: Version) -> Bytes {
        let mut b = BytesMut::with_capacity(self.topic.len() + self.payload.len() + 8);
        let aliased = version == Version::V5 && matches!(self.alias, Some((_, false)));
        put_str(&mut b, if aliased { "" } else { self.topic });
        if self.qos > 0 {
            b.put_u16(self.packet_id);
        }
        if version == Version::V5 {
            let mut p = BytesMut::new();
            if let Some(f) = self.meta.and_then(|m| m.format) {
                p.put_u8(0x01);
                p.put_u8(f);
            }
            if let Some(s) = self.expiry {
                p.put_u8(0x02);
                p.put_u32(s);
            }
            if let Some(m) = self.meta {
                if let Some(t) = &m.content_type {
                    p.put_u8(0x03);
                    put_str(&mut p, t);
                }
                if let Some(t) = &m.response_topic {
                    p.put_u8(0x08);
                    put_str(&mut p, t);
                }
                if let Some(c) = &m.correlation {
                    p.put_u8(0x09);
                    p.put_u16(c.len() as u16);
                    p.put_slice(c);
                }
            }
            if let Some((a, _)) = self.alias {
                p.put_u8(0x23);
                p.put_u16(a);
            }
            for id in self.subscription_ids {
                p.put_u8(0x0B);
                put_varint(&mut p, *id as usize);
            }
            for (k, v) in self.meta.map_or(&[][..], |m| &m.headers[..]) {
                p.put_u8(0x26);
                put_str(&mut p, k);
                put_str(&mut p, v);
            }
            put_varint(&mut b, p.len());
            b.put_slice(&p);
        }
        b.put_slice(self.payload);
        packet(0x30 | if self.dup { 0x08 } else { 0 } | (self.qos << 1) | self.retain as u8, &b)
    }
}

fn reason_string(out: &mut BytesMut, text: &str) {
    let mut p = BytesMut::new();
    if !text.is_empty() {
        p.put_u8(0x1F);
        // Whole characters only: a reason string is UTF-8.
        let mut end = text.len().min(200);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        put_str(&mut p, &text[..end]);
    }
    put_varint(out, p.len());
    out.put_slice(&p);
}

/// PUBACK (4), PUBREC (5), PUBREL (6), PUBCOMP (7); MQTT 5 adds the reason code and,
/// for a refusal, a reason string (`code: message`, the server's error).
pub fn ack(version: Version, kind: u8, packet_id: u16, reason: u8, text: &str) -> Bytes {
    let flags = if kind == 6 { 2 } else { 0 };
    let mut b = BytesMut::with_capacity(4);
    b.put_u16(packet_id);
    if version == Version::V5 && (reason != 0 || !text.is_empty()) {
        b.put_u8(reason);
        reason_string(&mut b, text);
    }
    packet((kind << 4) | flags, &b)
}

/// SUBACK / UNSUBACK (`kind` 9 / 11) with one code per filter (3.1.1's UNSUBACK has
/// none) and, in MQTT 5, a reason string for refusals.
pub fn sub_ack(version: Version, kind: u8, packet_id: u16, codes: &[u8], text: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(codes.len() + 4);
    b.put_u16(packet_id);
    if version == Version::V5 {
        reason_string(&mut b, text);
    }
    if kind == 9 || version == Version::V5 {
        b.put_slice(codes);
    }
    packet(kind << 4, &b)
}

pub fn pingresp() -> Bytes {
    Bytes::from_static(&[0xd0, 0])
}

/// A server DISCONNECT (MQTT 5 only; 3.1.1 servers just close).
/// AUTH (MQTT 5) with a reason code and the authentication method.
pub fn auth(reason: u8, method: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(reason);
    let mut p = BytesMut::new();
    p.put_u8(0x15);
    put_str(&mut p, method);
    put_varint(&mut b, p.len());
    b.put_slice(&p);
    packet(0xf0, &b)
}

pub fn disconnect(reason: u8, text: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(reason);
    reason_string(&mut b, text);
    packet(0xe0, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(level: u8, flags: u8, id: &str, props: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
        if level == 5 {
            body.push(props.len() as u8);
            body.extend_from_slice(props);
        }
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    #[test]
    fn connect_of_both_versions_decodes_and_bad_ones_get_their_reason() {
        let (p, n) = decode(&connect_bytes(4, 2, "dev1", &[]), None, 1024).unwrap().unwrap();
        let Packet::Connect(c) = p else { panic!() };
        assert_eq!(
            (c.version, c.client_id.as_str(), c.clean_start, c.keep_alive, n),
            (Version::V311, "dev1", true, 60, 18)
        );
        let (p, _) = decode(&connect_bytes(5, 2, "d", &[0x11, 0, 0, 0, 30, 0x21, 0, 10]), None, 1024).unwrap().unwrap();
        let Packet::Connect(c) = p else { panic!() };
        assert_eq!((c.version, c.session_expiry, c.receive_maximum), (Version::V5, 30, 10));
        assert_eq!(decode(&connect_bytes(3, 2, "x", &[]), None, 1024), Err(Error::UnsupportedVersion(3)));
        assert_eq!(
            decode(&connect_bytes(4, 1, "x", &[]), None, 1024),
            Err(Error::Malformed("CONNECT reserved flag set"))
        );
        // Incomplete input is not an error.
        let whole = connect_bytes(4, 2, "dev1", &[]);
        for cut in 0..whole.len() {
            assert_eq!(decode(&whole[..cut], None, 1024), Ok(None), "cut at {cut}");
        }
        // Over the limit, from the header alone.
        assert_eq!(decode(&[0x30, 0xff, 0xff, 0x7f], Some(Version::V311), 1024), Err(Error::TooLarge(2_097_155)));
        assert!(decode(&[0x30, 0xff, 0xff, 0xff, 0xff, 1], Some(Version::V311), 1024).is_err());
    }

    #[test]
    fn publish_round_trips_and_rejects_bad_flags() {
        for v in [Version::V311, Version::V5] {
            let out = Outgoing {
                topic: "a/b",
                payload: b"hello",
                qos: 1,
                packet_id: 7,
                retain: true,
                dup: false,
                subscription_ids: &[],
                meta: None,
                expiry: None,
                alias: None,
            };
            let b = out.encode(v);
            let (p, n) = decode(&b, Some(v), 1024).unwrap().unwrap();
            assert_eq!(n, b.len());
            let Packet::Publish(p) = p else { panic!() };
            assert_eq!(
                (p.topic.as_str(), p.qos, p.packet_id, p.retain, &p.payload[..]),
                ("a/b", 1, Some(7), true, &b"hello"[..])
            );
        }
        assert!(decode(&[0x36, 3, 0, 1, b'a'], Some(Version::V311), 1024).is_err()); // QoS 3
        assert!(decode(&[0x38, 3, 0, 1, b'a'], Some(Version::V311), 1024).is_err()); // DUP at QoS 0
        assert!(decode(&[0x32, 5, 0, 1, b'a', 0, 0], Some(Version::V311), 1024).is_err());
        // id 0
    }

    #[test]
    fn subscribe_needs_its_flags_and_a_filter() {
        let ok = [0x82, 6, 0, 1, 0, 1, b'x', 1];
        let Packet::Subscribe(s) = decode(&ok, Some(Version::V311), 1024).unwrap().unwrap().0 else { panic!() };
        assert_eq!(s.filters, vec![("x".to_string(), Options { qos: 1, ..Options::default() })]);
        assert!(decode(&[0x80, 6, 0, 1, 0, 1, b'x', 1], Some(Version::V311), 1024).is_err());
        assert!(decode(&[0x82, 2, 0, 1], Some(Version::V311), 1024).is_err());
        // The first packet must be CONNECT.
        assert_eq!(decode(&ok, None, 1024), Err(Error::Protocol("the first packet must be CONNECT")));
        // Packet id 0.
        assert!(decode(&[0x82, 6, 0, 0, 0, 1, b'x', 1], Some(Version::V311), 1024).is_err());
    }

    #[test]
    fn mqtt5_subscription_options_and_identifiers() {
        // Packet id 1, properties: subscription identifier 300 (varint 0xAC 0x02); filter
        // "x" with QoS 1, No Local, Retain Handling 2.
        let b = [0x82, 10, 0, 1, 3, 0x0B, 0xAC, 0x02, 0, 1, b'x', 0x25];
        let Packet::Subscribe(s) = decode(&b, Some(Version::V5), 1024).unwrap().unwrap().0 else { panic!() };
        assert_eq!(s.id, Some(300));
        assert_eq!(
            s.filters,
            vec![("x".to_string(), Options { qos: 1, retain_handling: 2, no_local: true, retain_as_published: false })]
        );
        // Identifier 0, Retain Handling 3, No Local on a shared subscription: refused.
        assert!(decode(&[0x82, 9, 0, 1, 2, 0x0B, 0, 0, 1, b'x', 0], Some(Version::V5), 1024).is_err());
        assert!(decode(&[0x82, 7, 0, 1, 0, 0, 1, b'x', 0x30], Some(Version::V5), 1024).is_err());
        let shared = b"$share/g/x";
        let mut b = vec![0x82, 6 + shared.len() as u8, 0, 1, 0, 0, shared.len() as u8];
        b.extend_from_slice(shared);
        b.push(0x04);
        assert!(decode(&b, Some(Version::V5), 1024).is_err());
        // A client's PUBLISH with a subscription identifier is a protocol error.
        assert!(decode(&[0x30, 7, 0, 1, b'x', 2, 0x0B, 1, b'p'], Some(Version::V5), 1024).is_err());
        // Going out: every identifier, and the payload after them.
        let out = Outgoing {
            topic: "x",
            payload: b"p",
            qos: 0,
            packet_id: 0,
            retain: false,
            dup: false,
            subscription_ids: &[7, 300],
            meta: None,
            expiry: None,
            alias: None,
        };
        assert_eq!(&out.encode(Version::V5)[..], &[0x30, 10, 0, 1, b'x', 5, 0x0B, 7, 0x0B, 0xAC, 0x02, b'p']);
    }

    #[test]
    fn publication_properties_are_read_and_passed_on() {
        let meta = Meta {
            ttl: Some(60),
            retain: true,
            format: Some(1),
            content_type: Some("text/plain".into()),
            response_topic: Some("replies/1".into()),
            correlation: Some(Bytes::from_static(b"\x00\x01")),
            headers: vec![("k".into(), "v1".into()), ("k".into(), "v2".into())],
        };
        let out = Outgoing {
            topic: "a",
            payload: b"1",
            qos: 1,
            packet_id: 3,
            retain: true,
            dup: false,
            subscription_ids: &[],
            meta: Some(&meta),
            expiry: Some(60),
            alias: None,
        };
        let b = out.encode(Version::V5);
        assert_eq!(read_publish(&b, Version::V5).meta.as_deref(), Some(&meta));
        // MQTT 3.1.1 has no properties: only the retain flag is passed on.
        let b = Outgoing { meta: None, expiry: None, ..out }.encode(Version::V311);
        assert_eq!(read_publish(&b, Version::V311).meta.as_deref(), Some(&Meta { retain: true, ..Meta::default() }));
        // A response topic with wildcards is a protocol error (MQTT-3.3.2-14).
        let mut m = Meta { response_topic: Some("r/#".into()), ..Meta::default() };
        let b = Outgoing { meta: Some(&m), expiry: None, ..out }.encode(Version::V5);
        assert!(matches!(decode(&b, Some(Version::V5), 1024), Err(Error::Protocol(_))));
        // The `token` user property is a credential: read, not passed on.
        m = Meta { headers: vec![("token".into(), "secret".into())], ..Meta::default() };
        let b = Outgoing { meta: Some(&m), expiry: None, retain: false, ..out }.encode(Version::V5);
        let p = read_publish(&b, Version::V5);
        assert_eq!((p.meta, p.token.as_deref()), (None, Some("secret")));
    }

    /// The PUBLISH `b` holds, read as the server reads a client's.
    fn read_publish(b: &[u8], v: Version) -> Publish {
        match decode(b, Some(v), 1024) {
            Ok(Some((Packet::Publish(p), _))) => p,
            other => panic!("not a PUBLISH: {other:?}"),
        }
    }
}
