//! `$SYS/broker/…`: the node's statistics as MQTT brokers publish them, for monitoring
//! tools — sent (flagged retained) right after the SUBACK, then every
//! `mqtt.sys_interval_secs` to each subscriber whose filter matches. Who may subscribe is
//! `mqtt.sys_topics` (default: clients that connected with a token). These topics are no
//! channels: nothing is stored, and no other transport sees them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use switchboard_core::queue::Event;
use switchboard_core::ConnQueue;

use super::codec::{self, Version};
use crate::app::AppState;
use crate::metrics::Transport;

/// The subscribers of this node's `$SYS` topics.
#[derive(Default)]
pub struct Sys {
    subs: Mutex<Vec<Sub>>,
    next: AtomicU64,
}

struct Sub {
    id: u64,
    filter: String,
    version: Version,
    queue: Weak<ConnQueue>,
}

/// A connection's `$SYS` subscription; dropping it unsubscribes.
pub struct Membership {
    state: AppState,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut subs = self.state.mqtt_sys.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| s.id != self.id && s.queue.strong_count() > 0);
    }
}

/// Whether `filter` is one for the `$SYS` topics.
pub fn is_sys(filter: &str) -> bool {
    filter == "$SYS" || filter.starts_with("$SYS/")
}

/// Subscribes `queue` to the `$SYS` topics `filter` matches (their current values go
/// with [`send_now`], after the SUBACK).
pub fn subscribe(state: &AppState, queue: &Arc<ConnQueue>, filter: &str, version: Version) -> Membership {
    let id = state.mqtt_sys.next.fetch_add(1, Ordering::Relaxed);
    let sub = Sub { id, filter: filter.to_string(), version, queue: Arc::downgrade(queue) };
    state.mqtt_sys.subs.lock().unwrap_or_else(|p| p.into_inner()).push(sub);
    Membership { state: state.clone(), id }
}

/// Queues the current values of the topics `filter` matches on `queue`.
pub fn send_now(state: &AppState, queue: &ConnQueue, filter: &str, version: Version) {
    for (topic, value) in values(state).iter().filter(|(t, _)| matches(filter, t)) {
        let _ = queue.push(Event::Frame(codec::publish(version, topic, value.as_bytes(), true)));
    }
}

/// Sends the values to every subscriber, every `mqtt.sys_interval_secs`.
pub fn start(state: &AppState) {
    let weak = Arc::downgrade(&state.inner);
    let every = Duration::from_secs(state.config.mqtt.sys_interval_secs.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            let Some(state) = AppState::running(&weak) else { return };
            let targets: Vec<(Arc<ConnQueue>, String, Version)> = {
                let mut subs = state.mqtt_sys.subs.lock().unwrap_or_else(|p| p.into_inner());
                subs.retain(|s| s.queue.strong_count() > 0);
                subs.iter().filter_map(|s| Some((s.queue.upgrade()?, s.filter.clone(), s.version))).collect()
            };
            if targets.is_empty() {
                continue;
            }
            let values = values(&state);
            for (queue, filter, version) in targets {
                for (topic, value) in values.iter().filter(|(t, _)| matches(&filter, t)) {
                    let _ = queue.push(Event::Frame(codec::publish(version, topic, value.as_bytes(), false)));
                }
            }
        }
    });
}

/// The topics and their values now (Mosquitto's names where there is one).
fn values(state: &AppState) -> Vec<(&'static str, String)> {
    let m = &state.metrics;
    let open = |t| m.open_connections(t).max(0);
    let all: i64 = [Transport::Ws, Transport::Sse, Transport::Poll, Transport::Mqtt, Transport::WebTransport]
        .into_iter()
        .map(open)
        .sum();
    let subscriptions: usize = state.hub.channels().iter().map(|(_, n)| n).sum();
    let uptime = crate::auth::unix_now().saturating_sub(state.started);
    vec![
        ("$SYS/broker/version", format!("switchboard {}", env!("CARGO_PKG_VERSION"))),
        ("$SYS/broker/uptime", format!("{uptime} seconds")),
        ("$SYS/broker/clients/connected", all.to_string()),
        ("$SYS/broker/clients/mqtt", open(Transport::Mqtt).to_string()),
        ("$SYS/broker/subscriptions/count", subscriptions.to_string()),
        (
            "$SYS/broker/messages/published",
            (m.publishes_stored.load(Ordering::Relaxed) + m.publishes_volatile.load(Ordering::Relaxed)).to_string(),
        ),
        ("$SYS/broker/bytes/sent", m.bytes_out.load(Ordering::Relaxed).to_string()),
    ]
}

/// Whether the MQTT topic filter `filter` matches `topic` (`+` one level, `#` the rest).
fn matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(l)) if f == l => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(matches("$SYS/#", "$SYS/broker/uptime"));
        assert!(matches("$SYS/broker/+", "$SYS/broker/uptime"));
        assert!(!matches("$SYS/broker/+", "$SYS/broker/clients/connected"));
        assert!(matches("$SYS/broker/clients/+", "$SYS/broker/clients/mqtt"));
        assert!(matches("$SYS/broker/uptime", "$SYS/broker/uptime"));
        assert!(!matches("$SYS/broker/uptime/x", "$SYS/broker/uptime"));
        assert!(!matches("$SYS/broker", "$SYS/broker/uptime"));
        assert!(matches("$SYS/broker/#", "$SYS/broker/uptime"));
    }
}
