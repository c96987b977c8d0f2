//! `$presence/{topic}`: a channel's join and leave events for MQTT clients (docs/mqtt.md).
//!
//! A SUBSCRIBE to `$presence/{topic}` watches the channel's presence without joining it:
//! the watch is a subscription at the hub through a queue of its own, whose direct path
//! turns each join or leave into a QoS 0 PUBLISH on the connection's queue — in order with
//! everything else the connection is sent — and lets the channel's publications go (the
//! client gets those by subscribing to the topic itself). The connection's own
//! subscriptions are untouched, so a client may watch a channel it subscribes to, or not.

use std::sync::{Arc, Weak};

use switchboard_core::hub::{SubscribeRequest, SubscriptionHandle};
use switchboard_core::queue::{DirectWrite, Event, Written};
use switchboard_core::{ConnQueue, Kind};

use super::codec::{self, Version};
use crate::app::AppState;
use crate::error::{ApiError, Code};
use crate::session::Resolved;

/// The prefix of the topics presence events arrive on.
pub const PREFIX: &str = "$presence/";

/// A watched channel: while held, its join and leave events reach the connection.
pub struct Watch {
    _handle: SubscriptionHandle,
}

/// The watch queue's direct path: join and leave become PUBLISH packets on the
/// connection's queue; anything else is let go.
struct Relay {
    to: Weak<ConnQueue>,
    topic: String,
    version: Version,
}

impl DirectWrite for Relay {
    fn try_write(&self, event: &Event) -> Written {
        let Event::Publication(d) = event else { return Written::All };
        let what = match d.publication.kind {
            Kind::Join => "join",
            Kind::Leave => "leave",
            Kind::Stored | Kind::Volatile => return Written::All,
        };
        if let Some(to) = self.to.upgrade() {
            // `{"event":"join","channel",…,"client","user","info"}`: the event's own JSON
            // with what it is in front.
            let json = d.json();
            let mut payload = format!("{{\"event\":\"{what}\",").into_bytes();
            payload.extend_from_slice(json.strip_prefix(b"{").unwrap_or(json));
            // (A closed connection takes nothing more: nothing to do about it here.)
            let _ = to.push(Event::Frame(codec::publish(self.version, &self.topic, &payload, false)));
        }
        Written::All
    }
}

/// Watches `r`'s presence for the connection whose queue is `to`; its events arrive as
/// PUBLISH packets on `topic` (the filter subscribed). The caller has passed the gate
/// for reading the channel's presence.
pub async fn watch(
    state: &AppState,
    r: &Resolved,
    to: &Arc<ConnQueue>,
    topic: &str,
    version: Version,
) -> Result<Watch, ApiError> {
    if !r.options.join_leave {
        return Err(ApiError::new(
            Code::PresenceDisabled,
            "join and leave events are off in this channel's namespace (join_leave)",
        ));
    }
    // Nothing is ever queued here: every event goes through the relay at once.
    let queue = state.hub.queue(64 * 1024);
    queue.set_direct(Arc::new(Relay { to: Arc::downgrade(to), topic: topic.to_string(), version }));
    let pending = state.hub.subscribe(r.channel.clone(), queue, SubscribeRequest::default()).await?;
    Ok(Watch { _handle: pending.go_live() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use switchboard_core::{ChannelName, Delivery, Publication};

    /// The payload of a presence event as an MQTT client receives it.
    fn payload_of(packet: &Bytes, version: Version) -> Bytes {
        match codec::decode(packet, Some(version), usize::MAX) {
            Ok(Some((codec::Packet::Publish(p), _))) => p.payload,
            other => panic!("not a PUBLISH: {other:?}"),
        }
    }

    fn event(kind: Kind) -> Event {
        Event::Publication(Delivery::new(Publication {
            channel: ChannelName::parse("room:1").unwrap(),
            offset: 0,
            epoch: "".into(),
            data: Bytes::from_static(br#"{"client":"c1","user":"u1","info":null}"#),
            time: 0,
            kind,
            meta: None,
        }))
    }

    #[test]
    fn joins_and_leaves_become_publishes_and_publications_are_let_go() {
        let to = ConnQueue::new(1 << 20);
        let relay = Relay { to: Arc::downgrade(&to), topic: "$presence/room/1".into(), version: Version::V5 };
        for kind in [Kind::Join, Kind::Stored, Kind::Volatile, Kind::Leave] {
            assert!(matches!(relay.try_write(&event(kind)), Written::All));
        }
        let mut got = Vec::new();
        to.drain_into(&mut got).unwrap();
        let payloads: Vec<serde_json::Value> = got
            .iter()
            .map(|e| match e {
                Event::Frame(b) => serde_json::from_slice(&payload_of(b, Version::V5)).unwrap(),
                _ => panic!("a frame"),
            })
            .collect();
        assert_eq!(payloads.len(), 2, "{payloads:?}");
        assert_eq!((payloads[0]["event"].as_str(), payloads[1]["event"].as_str()), (Some("join"), Some("leave")));
        assert_eq!((payloads[0]["channel"].as_str(), payloads[0]["client"].as_str()), (Some("room:1"), Some("c1")));
        // A connection gone: nothing to do, nothing kept.
        drop((to, got));
        assert!(matches!(relay.try_write(&event(Kind::Join)), Written::All));
    }
}
