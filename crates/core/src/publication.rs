//! Publications, stream positions, and the encoded form shared by every subscriber.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::channel::ChannelName;

/// One incarnation of a channel's history. When history is lost (a memory broker
/// restarts, a Redis key is evicted) the channel gets a new epoch, so a client holding
/// a position from the old epoch learns that it cannot resume.
///
/// Epochs are short strings of `[a-z0-9]`, safe to embed in cursors and JSON unescaped.
pub type Epoch = Arc<str>;

/// Makes a fresh random epoch (10 base-36 characters, ~51 bits).
pub fn new_epoch() -> Epoch {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let s: String = (0..10).map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char).collect();
    Arc::from(s)
}

/// Is `s` shaped like an epoch this server could have made?
pub fn is_valid_epoch(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// What a client has seen of a channel: the epoch and the last offset it received.
/// Offset 0 means "nothing yet" (the first publication of an epoch has offset 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    pub epoch: Epoch,
    pub offset: u64,
}

/// What a stored publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The publication's position: the new one, or the earlier publication's when this
    /// is a duplicate.
    pub position: StreamPosition,
    /// Its idempotency key was used on the channel within its window: nothing new was
    /// stored or delivered.
    pub duplicate: bool,
}

/// What a publication is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A reliable publication: numbered, kept in history, replayed on resume.
    Stored,
    /// A volatile one (typing indicators, cursor positions): no offset, never stored or
    /// replayed, and the first thing dropped under backpressure.
    Volatile,
    /// Presence: a client joined the channel. `data` is `{"client","user","info"}`.
    Join,
    /// Presence: a client left the channel. `data` as for `Join`.
    Leave,
}

/// A publication as stored and delivered.
///
/// `data` is the application's payload as JSON text, validated once at the edge and
/// never re-parsed. Only [`Kind::Stored`] publications have an offset and an epoch;
/// the others carry offset 0 and the channel's current epoch (or `""`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub channel: ChannelName,
    pub offset: u64,
    pub epoch: Epoch,
    pub data: Bytes,
    /// Milliseconds since the Unix epoch, when the broker accepted it.
    pub time: u64,
    pub kind: Kind,
    /// What it carries besides `data` (MQTT 5's publication properties), when anything.
    pub meta: Option<Arc<Meta>>,
}

/// A publication's properties besides its data — what MQTT 5 calls a PUBLISH's
/// properties, carried unchanged to every subscriber on every transport and kept in
/// history with the publication. JSON transports see it as the publication's `meta`
/// object (fields present only when set).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Seconds after the publication's `time` when it expires (MQTT's Message Expiry
    /// Interval): MQTT subscribers are not sent it after that, and get what remains of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// Published with MQTT's retain flag (what Retain As Published passes on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retain: bool,
    /// MQTT's Payload Format Indicator (0 unspecified bytes, 1 UTF-8), as the publisher set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The MQTT topic an answer is expected on (request/response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// Binary data the requester uses to match the answer; base64 in JSON.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "base64_opt")]
    pub correlation: Option<Bytes>,
    /// MQTT's user properties: name/value pairs in order, names may repeat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

mod base64_opt {
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(t) => base64::engine::general_purpose::STANDARD
                .decode(t)
                .map(|b| Some(Bytes::from(b)))
                .map_err(|e| serde::de::Error::custom(format!("correlation is base64: {e}"))),
            None => Ok(None),
        }
    }
}

/// The first byte of a stored publication's data that carries its [`Meta`]: no JSON
/// text begins with it.
const WRAPPED: u8 = 0x01;

impl Meta {
    /// Whether it says nothing (a publication with such a meta carries none).
    pub fn is_empty(&self) -> bool {
        *self == Meta::default()
    }

    /// When a publication of `time` (ms since the Unix epoch) with this meta expires, in
    /// ms since the Unix epoch.
    pub fn expires_at(&self, time: u64) -> Option<u64> {
        self.ttl.map(|s| time.saturating_add(u64::from(s) * 1000))
    }

    /// `data` as brokers store and forward it: unchanged without a meta, else
    /// `0x01 <meta JSON> \n <data>` (JSON holds no raw newline). Brokers hand the bytes
    /// on as they are; whoever makes a [`Publication`] of them reads them with [`Meta::split`].
    pub fn wrap(meta: Option<&Meta>, data: Bytes) -> Bytes {
        let Some(m) = meta.filter(|m| !m.is_empty()) else { return data };
        let mut v = vec![WRAPPED];
        serde_json::to_writer(&mut v, m).expect("a meta serializes");
        v.push(b'\n');
        v.extend_from_slice(&data);
        Bytes::from(v)
    }

    /// The publication's data and meta from what a broker stored ([`Meta::wrap`]). Data
    /// that is not wrapped is returned as it is; a wrapped one whose meta cannot be read
    /// (never written by this server) loses the meta, not the data.
    pub fn split(stored: Bytes) -> (Bytes, Option<Arc<Meta>>) {
        if stored.first() != Some(&WRAPPED) {
            return (stored, None);
        }
        let Some(end) = stored.iter().position(|b| *b == b'\n') else { return (stored.slice(1..), None) };
        let meta = serde_json::from_slice::<Meta>(&stored[1..end]).ok().map(Arc::new);
        (stored.slice(end + 1..), meta)
    }
}

impl Publication {
    pub fn position(&self) -> StreamPosition {
        StreamPosition { epoch: self.epoch.clone(), offset: self.offset }
    }

    /// Reliable: numbered and replayable.
    pub fn is_stored(&self) -> bool {
        self.kind == Kind::Stored
    }

    /// `"meta":{…},` when it has one.
    fn put_meta(&self, v: &mut Vec<u8>) {
        if let Some(m) = &self.meta {
            v.extend_from_slice(b"\"meta\":");
            serde_json::to_writer(&mut *v, &**m).expect("a meta serializes");
            v.push(b',');
        }
    }

    /// Whether it has expired at `now` (ms since the Unix epoch): its meta's `ttl` passed.
    pub fn expired(&self, now: u64) -> bool {
        self.meta.as_ref().and_then(|m| m.expires_at(self.time)).is_some_and(|at| now >= at)
    }

    /// Whether it has expired by now (the clock is read only for one that expires).
    pub fn expired_now(&self) -> bool {
        self.meta.as_ref().is_some_and(|m| m.ttl.is_some()) && self.expired(crate::now_millis())
    }

    /// The canonical JSON form. Stored: `{"channel","offset","epoch","time","data"}`;
    /// volatile: `{"channel","time","volatile":true,"data"}` (both with `"meta"` before
    /// `"data"` when the publication has one); join/leave:
    /// `{"channel","client","user","info"}` (the fields of `data` after the channel).
    ///
    /// Channel names and epochs are restricted to characters that need no JSON escaping
    /// and `data` is already JSON, so this is plain concatenation.
    pub fn to_json(&self) -> Bytes {
        match self.kind {
            Kind::Stored => {}
            Kind::Volatile => {
                let mut v = format!("{{\"channel\":\"{}\",\"time\":{},\"volatile\":true,", self.channel, self.time)
                    .into_bytes();
                self.put_meta(&mut v);
                v.extend_from_slice(b"\"data\":");
                v.extend_from_slice(&self.data);
                v.push(b'}');
                return Bytes::from(v);
            }
            Kind::Join | Kind::Leave => {
                // data is a JSON object; splice the channel in front of its fields.
                let mut v = format!("{{\"channel\":\"{}\"", self.channel).into_bytes();
                let inner = self.data.strip_prefix(b"{").unwrap_or(&self.data);
                if inner.first().is_some_and(|b| *b != b'}') {
                    v.push(b',');
                }
                v.extend_from_slice(inner);
                return Bytes::from(v);
            }
        }
        let mut s = String::with_capacity(self.data.len() + self.channel.as_str().len() + 80);
        let _ = write!(
            s,
            "{{\"channel\":\"{}\",\"offset\":{},\"epoch\":\"{}\",\"time\":{},",
            self.channel, self.offset, self.epoch, self.time
        );
        let mut v = s.into_bytes();
        self.put_meta(&mut v);
        v.extend_from_slice(b"\"data\":");
        v.extend_from_slice(&self.data);
        v.push(b'}');
        Bytes::from(v)
    }
}

/// Number of per-transport encoding slots in a [`Delivery`]: SSE 0–1, WebSocket 2–3 (text,
/// deflate), MQTT 4–5 (3.1.1, 5), WebTransport 6.
pub const ENCODING_SLOTS: usize = 7;

/// A publication on its way to local subscribers, with its encodings.
///
/// The hub makes one `Delivery` per publication and hands the same `Arc` to every
/// subscriber. The canonical JSON is built once up front; each transport builds its own
/// framing at most once, in its slot, on first use, so fan-out to N subscribers costs one
/// encoding per wire format, not N.
#[derive(Debug)]
pub struct Delivery {
    pub publication: Publication,
    json: Bytes,
    slots: [OnceLock<Bytes>; ENCODING_SLOTS],
}

impl Delivery {
    pub fn new(publication: Publication) -> Arc<Self> {
        let json = publication.to_json();
        Arc::new(Delivery { publication, json, slots: Default::default() })
    }

    /// The canonical JSON encoding, shared.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The encoding kept in `slot` (a constant owned by one transport), built by `encode`
    /// the first time any subscriber asks for it.
    pub fn encoded(&self, slot: usize, encode: impl FnOnce(&Delivery) -> Bytes) -> Bytes {
        self.slots[slot].get_or_init(|| encode(self)).clone()
    }

    /// Bytes this delivery costs in a connection queue.
    pub fn cost(&self) -> usize {
        self.json.len()
    }
}

/// Two deliveries are equal when their publications are (the encodings follow from it).
impl PartialEq for Delivery {
    fn eq(&self, other: &Self) -> bool {
        self.publication == other.publication
    }
}

impl Eq for Delivery {}

/// A delivery reads as its publication (`d.offset`, `d.channel`, …).
impl std::ops::Deref for Delivery {
    type Target = Publication;
    fn deref(&self) -> &Publication {
        &self.publication
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_is_valid_json_with_all_fields() {
        let p = Publication {
            channel: ChannelName::parse("chat:1").unwrap(),
            offset: 7,
            epoch: Arc::from("abc"),
            data: Bytes::from_static(br#"{"text":"hi \"there\""}"#),
            time: 12,
            kind: Kind::Stored,
            meta: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(v["channel"], "chat:1");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["epoch"], "abc");
        assert_eq!(v["time"], 12);
        assert_eq!(v["data"]["text"], "hi \"there\"");
    }

    #[test]
    fn every_kind_encodes_to_valid_json() {
        let mk = |kind, data: &'static [u8]| Publication {
            channel: ChannelName::parse("c:1").unwrap(),
            offset: 0,
            epoch: Arc::from(""),
            data: Bytes::from_static(data),
            time: 5,
            kind,
            meta: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&mk(Kind::Volatile, b"[1]").to_json()).unwrap();
        assert_eq!((v["volatile"].as_bool(), v["data"][0].as_i64(), v.get("offset")), (Some(true), Some(1), None));
        let j = mk(Kind::Join, br#"{"client":"x","user":"u","info":null}"#).to_json();
        let v: serde_json::Value = serde_json::from_slice(&j).unwrap();
        assert_eq!((v["channel"].as_str(), v["client"].as_str()), (Some("c:1"), Some("x")));
        let v: serde_json::Value = serde_json::from_slice(&mk(Kind::Leave, b"{}").to_json()).unwrap();
        assert_eq!(v["channel"], "c:1");
    }

    #[test]
    fn encodings_are_built_once_and_shared() {
        let d = Delivery::new(Publication {
            channel: ChannelName::parse("a").unwrap(),
            offset: 1,
            epoch: new_epoch(),
            data: Bytes::from_static(b"1"),
            time: 0,
            kind: Kind::Stored,
            meta: None,
        });
        let mut calls = 0;
        let a = d.encoded(0, |_| {
            calls += 1;
            Bytes::from_static(b"x")
        });
        let b = d.encoded(0, |_| unreachable!("encoded twice"));
        assert_eq!(calls, 1);
        assert_eq!(a.as_ptr(), b.as_ptr());
    }

    #[test]
    fn a_meta_is_wrapped_with_the_data_and_shown_in_json() {
        let meta = Meta {
            ttl: Some(30),
            retain: true,
            correlation: Some(Bytes::from_static(b"\x00\xffid")),
            headers: vec![("a".into(), "1".into()), ("a".into(), "2\n".into())],
            ..Meta::default()
        };
        let data = Bytes::from_static(b"{\"x\":1}");
        let stored = Meta::wrap(Some(&meta), data.clone());
        assert_eq!(stored[0], WRAPPED);
        let (back, m) = Meta::split(stored);
        assert_eq!((back, m.as_deref()), (data.clone(), Some(&meta)));
        // Without a meta (or an empty one) the data is stored as it is.
        assert_eq!(Meta::wrap(None, data.clone()), data);
        assert_eq!(Meta::wrap(Some(&Meta::default()), data.clone()), data);
        assert_eq!(Meta::split(data.clone()), (data.clone(), None));
        let p = Publication {
            channel: ChannelName::parse("c").unwrap(),
            offset: 1,
            epoch: Arc::from("e"),
            data,
            time: 1_000,
            kind: Kind::Stored,
            meta: Some(Arc::new(meta)),
        };
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(v["meta"]["ttl"], 30);
        assert_eq!(v["meta"]["retain"], true);
        assert_eq!(v["meta"]["correlation"], "AP9pZA==");
        assert_eq!(v["meta"]["headers"][1][1], "2\n");
        assert_eq!(v["meta"].get("content_type"), None);
        assert_eq!(v["data"]["x"], 1);
        assert!(!p.expired(30_999) && p.expired(31_000));
        let v: serde_json::Value =
            serde_json::from_slice(&Publication { kind: Kind::Volatile, ..p.clone() }.to_json()).unwrap();
        assert_eq!((v["meta"]["ttl"].as_u64(), v["data"]["x"].as_u64()), (Some(30), Some(1)));
    }

    #[test]
    fn epochs_are_valid_and_distinct() {
        let a = new_epoch();
        let b = new_epoch();
        assert!(is_valid_epoch(&a) && is_valid_epoch(&b));
        assert_ne!(a, b);
    }
}
