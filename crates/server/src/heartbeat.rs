//! One heartbeat for all of a server's WebSocket and MQTT connections, instead of a timer
//! and a shutdown watch in each (an idle connection's task kept both in its state: a
//! tenth of its memory).
//!
//! A single task visits one of [`SLOTS`] slots every `ws.ping_interval_secs / SLOTS`; a
//! connection joins the slot visited last, so it gets its first beat about one ping
//! interval after it connected and one every interval after that, as with a timer of its
//! own (to within a slot). A beat wakes the connection's task through its queue
//! ([`ConnQueue::beat`]); the task then pings, checks for a heartbeat timeout and
//! refreshes presence as its own timer used to (MQTT: refreshes presence, saves a
//! persistent session and checks keep-alive, arming a timer of its own only for the last
//! interval before keep-alive runs out).
//!
//! At shutdown the same task closes every joined queue with
//! [`CloseReason::Shutdown`], which each connection answers with its goodbye; a
//! connection that joins after the shutdown began is closed at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

use switchboard_core::{CloseReason, ConnQueue};

use crate::app::AppState;
use crate::lock;

/// Slots a ping interval is divided into.
pub const SLOTS: usize = 32;

/// The wheel. Costs a connection one weak pointer in its slot.
pub struct Heartbeats {
    slots: Box<[Mutex<Vec<Weak<ConnQueue>>>]>,
    /// The slot the wheel visits next.
    cursor: AtomicUsize,
    started: Once,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats {
            slots: (0..SLOTS).map(|_| Mutex::default()).collect(),
            cursor: AtomicUsize::new(0),
            started: Once::new(),
        }
    }
}

impl Heartbeats {
    /// Gives `queue` a beat once per ping interval until it closes (and closes it at
    /// shutdown). Starts the wheel's task with the first connection (inside the runtime).
    pub fn join(state: &AppState, queue: &Arc<ConnQueue>) {
        let me = &state.heartbeats;
        me.started.call_once(|| spawn(state));
        // The slot the wheel visited last: the first beat comes a whole interval after
        // connecting (beats are spread over the interval as connections arrive).
        let slot = (me.cursor.load(Ordering::Relaxed) + SLOTS - 1) % SLOTS;
        lock(&me.slots[slot]).push(Arc::downgrade(queue));
        // After the push: a shutdown that began meanwhile either saw this queue in its
        // slot or is seen here.
        if *state.shutdown.borrow() {
            queue.close(CloseReason::Shutdown);
        }
    }

    /// Beats every live queue in `slot`, forgetting the closed ones.
    fn visit(&self, slot: usize) {
        lock(&self.slots[slot]).retain(|w| w.upgrade().is_some_and(|q| q.beat()));
    }

    /// Closes every joined queue for shutdown.
    fn close_all(&self) {
        for slot in self.slots.iter() {
            for q in std::mem::take(&mut *lock(slot)).iter().filter_map(Weak::upgrade) {
                q.close(CloseReason::Shutdown);
            }
        }
    }
}

fn spawn(state: &AppState) {
    let weak = Arc::downgrade(&state.inner);
    let every = Duration::from_secs(state.config.ws.ping_interval_secs) / SLOTS as u32;
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                // The sender gone is the server gone: close what is left too.
                _ = shutdown.wait_for(|s| *s) => true,
            };
            let Some(inner) = weak.upgrade() else { return };
            if stopping {
                inner.heartbeats.close_all();
                return;
            }
            let slot = inner.heartbeats.cursor.load(Ordering::Relaxed);
            inner.heartbeats.visit(slot);
            inner.heartbeats.cursor.store((slot + 1) % SLOTS, Ordering::Relaxed);
        }
    });
}
