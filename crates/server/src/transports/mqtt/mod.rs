//! MQTT 3.1.1 and 5 on the server's channels (docs/mqtt.md): a device publishes over MQTT
//! and a dashboard receives over SSE or WebSocket, through the same hub, history,
//! presence and gate.
//!
//! Topics and channels: a topic's first level names the namespace when one is configured
//! by that name — `sensors/site1/temp` is the channel `sensors:site1/temp` — and otherwise
//! the whole topic is a channel of the default namespace (`news` is `news`). Filters map
//! the same way, MQTT's `+` and `#` being the server's own wildcards
//! (`sensors/+/temp` is the pattern `sensors:+/temp`).
//!
//! Payloads: a publication's `data` is JSON. An MQTT payload that is JSON is taken as
//! it is; any other UTF-8 text becomes a JSON string; binary payloads are refused
//! (MQTT 5: 0x99 Payload format invalid). Going out, a JSON string is sent as its text and
//! anything else as its JSON — so `mosquitto_pub -m hello` arrives as `"hello"` in a
//! browser and as `hello` at `mosquitto_sub`.

pub mod codec;
pub mod connection;
pub mod presence;
pub mod sessions;
pub mod shared;
pub mod sys;
pub mod ws;

use switchboard_core::ChannelName;

use crate::app::AppState;

/// The channel (or pattern) name of an MQTT topic or filter, or why it has none.
pub fn channel_of(state: &AppState, topic: &str) -> Result<String, &'static str> {
    if topic.is_empty() {
        return Err("empty topic");
    }
    if topic.starts_with('$') {
        return Err("topics starting with $ are reserved");
    }
    match topic.split_once('/') {
        Some((ns, rest)) if !ns.is_empty() && state.config.namespaces.contains_key(ns) => {
            if rest.is_empty() {
                return Err("a namespace's topic needs a level after it");
            }
            Ok(format!("{ns}:{rest}"))
        }
        // A lone `#` or `+` at the first level would reach across namespaces.
        _ if topic.starts_with('#') || topic.starts_with('+') => Err("a filter must start with a namespace"),
        _ => Ok(topic.to_string()),
    }
}

/// The MQTT topic of a channel: `ns:rest` → `ns/rest`.
pub fn topic_of(channel: &ChannelName) -> String {
    match channel.as_str().split_once(':') {
        Some((ns, rest)) => format!("{ns}/{rest}"),
        None => channel.as_str().to_string(),
    }
}

/// A publication's `data` for an MQTT payload (see the module docs), or `None` for a
/// binary payload.
pub fn data_of(payload: &[u8]) -> Option<bytes::Bytes> {
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        return Some(bytes::Bytes::copy_from_slice(payload));
    }
    let text = std::str::from_utf8(payload).ok()?;
    Some(bytes::Bytes::from(serde_json::Value::String(text.to_string()).to_string()))
}

/// The MQTT payload of a publication's `data`.
pub fn payload_of(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if data.first() == Some(&b'"') {
        if let Ok(serde_json::Value::String(s)) = serde_json::from_slice::<serde_json::Value>(data) {
            return std::borrow::Cow::Owned(s.into_bytes());
        }
    }
    std::borrow::Cow::Borrowed(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_map_to_json_and_back() {
        assert_eq!(data_of(b"{\"t\":1}").unwrap(), &b"{\"t\":1}"[..]);
        assert_eq!(data_of(b"21.5").unwrap(), &b"21.5"[..]);
        assert_eq!(data_of(b"hello").unwrap(), &b"\"hello\""[..]);
        assert_eq!(data_of(b"say \"hi\"\n").unwrap(), &b"\"say \\\"hi\\\"\\n\""[..]);
        assert!(data_of(&[0xff, 0xfe]).is_none());
        assert_eq!(&*payload_of(b"\"hello\""), b"hello");
        assert_eq!(&*payload_of(b"{\"t\":1}"), b"{\"t\":1}");
        assert_eq!(&*payload_of(&data_of(b"say \"hi\"\n").unwrap()), b"say \"hi\"\n");
    }
}
