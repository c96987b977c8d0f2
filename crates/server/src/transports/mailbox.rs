//! Direct messages for polling clients. A poll is a request, not a connection, so a
//! poller that wants direct messages gets a mailbox: a client id registered for direct
//! messages like a WebSocket's, whose messages wait between two polls.
//!
//! `GET /poll?…&direct=1` opens one; the answer carries `"client"` (what others send to)
//! and `"client_key"` (`<client>.<secret>`, proving the poller owns it). Each later poll
//! passes `client_key=…` and takes what arrived (`"direct":[{"from","data"},…]`). A
//! mailbox nobody has polled for `[poll] mailbox_idle_secs` is closed: senders then get
//! `target_not_connected`, and the poller's next poll opens a new mailbox (a new client
//! id, as after a reconnect). Mailboxes live on the node that opened them: behind a load
//! balancer, polls that carry a key must reach that node (sticky sessions), or each poll
//! elsewhere opens a new one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_core::ConnQueue;

use crate::error::{ApiError, Code};
use crate::registry::{ClientRegistration, Registry};

/// Bytes of direct messages a mailbox holds between polls; more closes it (the poller's
/// next poll gets a new client id, which tells it some were lost).
const MAILBOX_BYTES: usize = 1 << 20;

#[derive(Default)]
pub struct Mailboxes(Mutex<HashMap<String, Mailbox>>);

struct Mailbox {
    queue: Arc<ConnQueue>,
    _registration: ClientRegistration,
    /// Polls in progress, and when the last one ended.
    polling: usize,
    last: Instant,
}

/// A poll's hold on its mailbox: keeps it open while the poll waits.
pub struct Lease<'a> {
    boxes: &'a Mailboxes,
    pub client: String,
    pub key: String,
    pub queue: Arc<ConnQueue>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut m = self.boxes.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = m.get_mut(&self.client) {
            b.polling = b.polling.saturating_sub(1);
            b.last = Instant::now();
        }
    }
}

/// The frame a mailbox keeps for a direct message: the protocol message as sent.
fn frame(json: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(json)
}

impl Mailboxes {
    /// The mailbox `key` names (when it is here, open, and `user`'s), or a new one — while
    /// fewer than `max` are open (each is a connection's worth of state).
    pub fn lease(
        &self,
        registry: &Arc<Registry>,
        key: Option<&str>,
        user: Option<&str>,
        max: usize,
    ) -> Result<Lease<'_>, ApiError> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((client, owner)) = key.and_then(|k| registry.key_owner(k)) {
            if let Some(b) = m.get_mut(&client).filter(|b| b.queue.closed().is_none()) {
                if owner.as_deref() == user {
                    b.polling += 1;
                    let key = key.unwrap_or_default().to_string();
                    return Ok(Lease { boxes: self, client, key, queue: b.queue.clone() });
                }
            }
        }
        if m.len() >= max {
            return Err(ApiError::new(Code::ServerBusy, "too many direct-message mailboxes are open; retry later")
                .retry_after(1));
        }
        let client = crate::presence::client_id();
        let queue = ConnQueue::new(MAILBOX_BYTES);
        let registration = registry.add_client(&client, &queue, frame);
        if let Some(u) = user {
            registry.set_client_user(&client, u);
        }
        let key = registry.new_client_key(&client);
        let b = Mailbox { queue: queue.clone(), _registration: registration, polling: 1, last: Instant::now() };
        m.insert(client.clone(), b);
        Ok(Lease { boxes: self, client, key, queue })
    }

    /// Closes the mailboxes no poll has held for `idle` (and those closed for overflowing).
    pub fn sweep(&self, idle: Duration) -> usize {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = m.len();
        m.retain(|_, b| b.polling > 0 || (b.last.elapsed() < idle && b.queue.closed().is_none()));
        before - m.len()
    }
}

/// Closes idle mailboxes every few seconds, for as long as the server runs.
pub fn spawn_sweeper(state: &crate::app::AppState) {
    let weak = Arc::downgrade(&state.inner);
    let idle = Duration::from_secs(state.config.poll.mailbox_idle_secs);
    let every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(inner) = weak.upgrade() else { return };
            if *inner.shutdown.borrow() {
                return;
            }
            inner.mailboxes.sweep(idle);
        }
    });
}
