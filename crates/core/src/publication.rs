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

/// A publication as stored and delivered.
///
/// `data` is the application's payload as JSON text, validated once at the edge and
/// never re-parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub channel: ChannelName,
    pub offset: u64,
    pub epoch: Epoch,
    pub data: Bytes,
    /// Milliseconds since the Unix epoch, when the broker accepted it.
    pub time: u64,
}

impl Publication {
    pub fn position(&self) -> StreamPosition {
        StreamPosition { epoch: self.epoch.clone(), offset: self.offset }
    }

    /// The canonical JSON form: `{"channel":…,"offset":…,"epoch":…,"time":…,"data":…}`.
    ///
    /// Channel names and epochs are restricted to characters that need no JSON escaping
    /// and `data` is already JSON, so this is plain concatenation.
    pub fn to_json(&self) -> Bytes {
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

/// Number of per-transport encoding slots in a [`Delivery`].
pub const ENCODING_SLOTS: usize = 4;

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
        };
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(v["channel"], "chat:1");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["epoch"], "abc");
        assert_eq!(v["time"], 12);
        assert_eq!(v["data"]["text"], "hi \"there\"");
    }

    #[test]
    fn encodings_are_built_once_and_shared() {
        let d = Delivery::new(Publication {
            channel: ChannelName::parse("a").unwrap(),
            offset: 1,
            epoch: new_epoch(),
            data: Bytes::from_static(b"1"),
            time: 0,
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
