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
}

impl Publication {
    pub fn position(&self) -> StreamPosition {
        StreamPosition { epoch: self.epoch.clone(), offset: self.offset }
    }

    /// Reliable: numbered and replayable.
    pub fn is_stored(&self) -> bool {
        self.kind == Kind::Stored
    }

    /// The canonical JSON form. Stored: `{"channel","offset","epoch","time","data"}`;
    /// volatile: `{"channel","time","volatile":true,"data"}`; join/leave:
    /// `{"channel","client","user","info"}` (the fields of `data` after the channel).
    ///
    /// Channel names and epochs are restricted to characters that need no JSON escaping
    /// and `data` is already JSON, so this is plain concatenation.
    pub fn to_json(&self) -> Bytes {
        match self.kind {
            Kind::Stored => {}
            Kind::Volatile => {
                let mut v =
                    format!("{{\"channel\":\"{}\",\"time\":{},\"volatile\":true,\"data\":", self.channel, self.time)
                        .into_bytes();
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
            "{{\"channel\":\"{}\",\"offset\":{},\"epoch\":\"{}\",\"time\":{},\"data\":",
            self.channel, self.offset, self.epoch, self.time
        );
        let mut v = s.into_bytes();
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
    fn epochs_are_valid_and_distinct() {
        let a = new_epoch();
        let b = new_epoch();
        assert!(is_valid_epoch(&a) && is_valid_epoch(&b));
        assert_ne!(a, b);
    }
}
