//! Persistent MQTT sessions, kept on this node between a client's connections: its
//! subscriptions and, for each channel, the position it had reached — so a device that
//! reconnects with clean session 0 (MQTT 5: clean start 0 within its session expiry)
//! gets what was published meanwhile, from the channel's history, without subscribing
//! again. Kept in memory on the node the client last used (docs/mqtt.md).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_core::StreamPosition;

/// One subscription of a kept session.
#[derive(Debug, Clone)]
pub struct KeptSub {
    pub filter: String,
    /// The channel or pattern the filter maps to.
    pub name: String,
    /// The QoS granted.
    pub qos: u8,
    /// Where the client stood on the channel: the last publication written (QoS 0) or
    /// acknowledged (QoS 1). None for patterns: they are live-only.
    pub position: Option<StreamPosition>,
}

#[derive(Debug, Clone, Default)]
pub struct Kept {
    pub subs: Vec<KeptSub>,
}

/// Sessions kept, by client id, with their expiry.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, (Kept, Instant)>>);

/// Most sessions kept at once; past it the soonest to expire goes first.
const MAX_SESSIONS: usize = 100_000;

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Kept, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `kept` for `expiry`.
    pub fn keep(&self, client_id: &str, kept: Kept, expiry: Duration) {
        let mut m = self.map();
        let now = Instant::now();
        if m.len() >= MAX_SESSIONS {
            m.retain(|_, (_, until)| *until > now);
            if m.len() >= MAX_SESSIONS {
                if let Some(first) = m.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone()) {
                    m.remove(&first);
                }
            }
        }
        m.insert(client_id.to_string(), (kept, now + expiry));
    }

    /// Takes the session kept for `client_id`, if it has not expired.
    pub fn take(&self, client_id: &str) -> Option<Kept> {
        let (kept, until) = self.map().remove(client_id)?;
        (until > Instant::now()).then_some(kept)
    }

    pub fn discard(&self, client_id: &str) {
        self.map().remove(client_id);
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
