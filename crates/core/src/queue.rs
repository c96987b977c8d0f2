//! The per-connection outgoing queue, bounded in bytes.
//!
//! The hub pushes [`Event`]s from whatever task publishes. When the connection is keeping
//! up, an event does not wait here at all: a transport that registered a [`DirectWrite`]
//! gets it written to its socket right away by the pushing task, if the queue is empty,
//! nothing is being written and the socket takes the bytes without blocking — no wake-up,
//! no context switch per delivery. Otherwise the event is queued and the connection's own
//! task drains everything queued at once into one vectored write. The bound is what keeps
//! a slow consumer from growing server memory (guarantee 5): when a reliable event does
//! not fit, the queue is cleared and closed with [`CloseReason::SlowConsumer`], and the
//! client resumes from history instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::channel::ChannelName;
use crate::publication::{Delivery, StreamPosition};

/// Queue slots a connection keeps between batches (more are released after a burst).
const RETAINED_EVENTS: usize = 8;

/// Default bound of a connection's queue: 1 MiB.
pub const DEFAULT_QUEUE_BYTES: usize = 1 << 20;

/// Something a connection must send.
#[derive(Debug, Clone)]
pub enum Event {
    /// A publication, shared with every other subscriber.
    Publication(Arc<Delivery>),
    /// The client's position on `channel` could not be continued; it is now at
    /// `position` and must reload its state.
    Reset { channel: ChannelName, position: StreamPosition },
    /// Bytes already in the connection's wire format (a command reply, a ping), queued
    /// behind what is already there so replies and publications keep their order.
    Frame(bytes::Bytes),
}

impl Event {
    /// Reliable events are never dropped: a queue that cannot take one closes instead.
    /// Volatile publications and presence events are dropped first under pressure.
    pub fn is_reliable(&self) -> bool {
        match self {
            Event::Publication(d) => d.publication.is_stored(),
            Event::Reset { .. } | Event::Frame(_) => true,
        }
    }

    fn cost(&self) -> usize {
        match self {
            Event::Publication(d) => d.cost(),
            Event::Reset { .. } => 64,
            Event::Frame(b) => b.len(),
        }
    }
}

/// Why a queue (and so its connection) was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client did not read fast enough; it should reconnect and resume.
    SlowConsumer,
    /// The server is shutting down; the client should reconnect (elsewhere).
    Shutdown,
    /// The connection itself decided to close (the peer left, a protocol error whose
    /// close frame is already queued): flush what is queued, then stop.
    Normal,
    /// The client's token expired and was not refreshed: reconnect with a new one.
    TokenExpired,
    /// The server API ended the connection (disconnect or revocation): do not reconnect
    /// without new credentials.
    Disconnected,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The queue was already closed; the event was dropped.
    Closed,
    /// The event did not fit: the queue is now closed as a slow consumer.
    Overflow,
    /// A volatile event did not fit and was dropped; the connection goes on.
    Dropped,
}

struct State {
    events: VecDeque<Event>,
    bytes: usize,
    closed: Option<CloseReason>,
    /// The connection's task holds a batch it has not finished writing: nothing may be
    /// written around it.
    writing: bool,
    /// Dropped when the queue closes, so the socket it holds goes with the connection.
    direct: Option<Arc<dyn DirectWrite>>,
    /// A heartbeat is due ([`ConnQueue::beat`]), not yet taken by the connection's task.
    beat: bool,
    /// Something changed since the consumer last looked ([`ConnQueue::poll_changed`]):
    /// kept when nobody waits, like a permit.
    woken: bool,
    /// The consumer waiting for a change. One consumer: the connection's task (a waker,
    /// not a `Notify`, so that waiting stores no future in every idle connection).
    waker: Option<std::task::Waker>,
}

/// What [`DirectWrite::try_write`] managed.
#[derive(Debug)]
pub enum Written {
    /// All of the event's bytes.
    All,
    /// Some: these bytes of it are still to be written, before anything else.
    Part(bytes::Bytes),
    /// Nothing: the socket would block.
    Blocked,
    /// The connection is broken.
    Failed,
}

/// The connection's socket is broken (a write failed for another reason than blocking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken;

/// A transport's way to write events to its socket without blocking, used by
/// [`ConnQueue::push`] and [`ConnQueue::push_batch`] when nothing is queued before them.
pub trait DirectWrite: Send + Sync + 'static {
    fn try_write(&self, event: &Event) -> Written;

    /// Writes as many of `events` as the socket takes now — several per system call where
    /// the transport can. Returns how many went whole, and what is left of the next one if
    /// it went in part (`Err` when the connection is broken).
    fn try_write_many(&self, events: &[Event]) -> Result<(usize, Option<bytes::Bytes>), Broken> {
        for (i, e) in events.iter().enumerate() {
            match self.try_write(e) {
                Written::All => {}
                Written::Part(rest) => return Ok((i, Some(rest))),
                Written::Blocked => return Ok((i, None)),
                Written::Failed => return Err(Broken),
            }
        }
        Ok((events.len(), None))
    }
}

/// What the queues of one server did under backpressure (for its metrics). Each server
/// (each [`crate::Hub`]) has its own, so two servers in one process never see each
/// other's numbers.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Connections closed as slow consumers.
    pub slow_consumer_closes: AtomicU64,
    /// Volatile events dropped under backpressure.
    pub volatile_drops: AtomicU64,
}

pub struct ConnQueue {
    max_bytes: std::sync::atomic::AtomicUsize,
    /// Where this queue counts its drops and closes; `None` for a queue nobody reports.
    stats: Option<Arc<QueueStats>>,
    state: Mutex<State>,
}

impl ConnQueue {
    /// A queue that reports to no one (tests, benchmarks). Servers use
    /// [`crate::Hub::queue`], which counts into the hub's [`QueueStats`].
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Self::with_stats(max_bytes, None)
    }

    pub fn with_stats(max_bytes: usize, stats: Option<Arc<QueueStats>>) -> Arc<Self> {
        Arc::new(ConnQueue {
            max_bytes: std::sync::atomic::AtomicUsize::new(max_bytes),
            stats,
            state: Mutex::new(State {
                events: VecDeque::new(),
                bytes: 0,
                closed: None,
                writing: false,
                direct: None,
                beat: false,
                woken: false,
                waker: None,
            }),
        })
    }

    /// Lets pushes write straight to the connection's socket (see the module docs).
    pub fn set_direct(&self, direct: Arc<dyn DirectWrite>) {
        let mut st = self.state();
        if st.closed.is_none() {
            st.direct = Some(direct);
        }
    }

    /// Stops writing directly: from now on every push is queued for the connection's
    /// task. Once this returns no direct write is under way (they run under the lock).
    pub fn clear_direct(&self) {
        self.state().direct = None;
    }

    /// Raises the bound to `max_bytes` if it is lower (a connection subscribing to a
    /// namespace with a larger queue bound).
    pub fn raise_bound(&self, max_bytes: usize) {
        self.max_bytes.fetch_max(max_bytes, Ordering::Relaxed);
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes.load(Ordering::Relaxed)
    }

    fn count(&self, f: impl FnOnce(&QueueStats) -> &AtomicU64, n: u64) {
        if let Some(s) = &self.stats {
            f(s).fetch_add(n, Ordering::Relaxed);
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a live event, enforcing the byte bound — or, when the connection keeps up,
    /// writes it straight to its socket (see the module docs).
    pub fn push(&self, mut event: Event) -> Result<(), PushError> {
        let mut st = self.state();
        if st.closed.is_some() {
            return Err(PushError::Closed);
        }
        if st.events.is_empty() && !st.writing {
            if let Some(direct) = &st.direct {
                // Under the queue lock: nothing can be pushed or drained in between, so
                // what reaches the socket keeps the queue's order.
                match direct.try_write(&event) {
                    Written::All => return Ok(()),
                    Written::Part(rest) => event = Event::Frame(rest),
                    Written::Blocked => {}
                    Written::Failed => {
                        self.fail(st);
                        return Err(PushError::Closed);
                    }
                }
            }
        }
        let before = st.events.len();
        let r = self.enqueue(&mut st, event);
        let waker = Self::after_enqueue(&mut st, &r, before);
        drop(st);
        wake(waker);
        r
    }

    /// Pushes several events for this connection at once: with the direct path they leave
    /// in as few writes as the socket allows (one, usually) — a fan-out that fell behind
    /// catches up in bigger writes instead of one system call per event. What the socket
    /// does not take is queued as [`ConnQueue::push`] would queue it.
    pub fn push_batch(&self, mut events: Vec<Event>) -> Result<(), PushError> {
        if events.len() == 1 {
            return self.push(events.pop().expect("one"));
        }
        let mut st = self.state();
        if st.closed.is_some() {
            return Err(PushError::Closed);
        }
        let mut skip = 0;
        if st.events.is_empty() && !st.writing {
            if let Some(direct) = &st.direct {
                match direct.try_write_many(&events) {
                    Ok((n, rest)) => {
                        if let Some(rest) = rest {
                            events[n] = Event::Frame(rest);
                        }
                        skip = n;
                    }
                    Err(Broken) => {
                        self.fail(st);
                        return Err(PushError::Closed);
                    }
                }
            }
        }
        let (mut r, mut queued, before) = (Ok(()), false, st.events.len());
        for e in events.into_iter().skip(skip) {
            match self.enqueue(&mut st, e) {
                Ok(()) => queued = true,
                Err(PushError::Dropped) => {}
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
        }
        let waker = if queued || r.is_err() { Self::after_enqueue(&mut st, &r, before) } else { None };
        drop(st);
        wake(waker);
        r
    }

    /// The direct path found the connection broken: close, and let go of the socket.
    fn fail(&self, mut st: std::sync::MutexGuard<'_, State>) {
        st.closed = Some(CloseReason::Normal);
        st.direct = None;
        let waker = signal(&mut st);
        drop(st);
        wake(waker);
    }

    /// Queues `event` behind what is queued, within the bound. The caller holds the lock
    /// and calls [`Self::after_enqueue`] once it has let go of it.
    fn enqueue(&self, st: &mut State, event: Event) -> Result<(), PushError> {
        let cost = event.cost();
        if st.bytes + cost > self.max_bytes() && !st.events.is_empty() {
            // Make room by dropping what may be dropped: queued volatile events first.
            let before = st.events.len();
            st.events.retain(Event::is_reliable);
            let dropped = before - st.events.len();
            if dropped > 0 {
                self.count(|s| &s.volatile_drops, dropped as u64);
                st.bytes = st.events.iter().map(Event::cost).sum();
            }
        }
        if st.bytes + cost > self.max_bytes() && !st.events.is_empty() {
            if !event.is_reliable() {
                self.count(|s| &s.volatile_drops, 1);
                return Err(PushError::Dropped);
            }
            st.events.clear();
            st.events.shrink_to_fit();
            st.bytes = 0;
            st.closed = Some(CloseReason::SlowConsumer);
            st.direct = None;
            self.count(|s| &s.slow_consumer_closes, 1);
            return Err(PushError::Overflow);
        }
        st.bytes += cost;
        st.events.push_back(event);
        Ok(())
    }

    /// Signals the consumer after [`Self::enqueue`] queued events behind `before` others
    /// (under the lock; the caller wakes the returned waker once it has let go of it).
    /// Not while the task is writing a batch and others were already queued behind it:
    /// the push that queued the first of them woke the task (or left it a permit), and the
    /// task takes everything queued once its batch is written — a consumer blocked on a
    /// full socket is woken once per batch, not once per event.
    fn after_enqueue(st: &mut State, r: &Result<(), PushError>, before: usize) -> Option<std::task::Waker> {
        match r {
            Ok(()) if !(st.writing && before > 0) => signal(st),
            Err(PushError::Overflow) => signal(st),
            Ok(()) | Err(_) => None,
        }
    }

    /// Queues a replayed event without enforcing the bound. Replay is bounded by the
    /// channel's history size already, and refusing it would make a client that is far
    /// behind reconnect and fail in a loop.
    pub fn push_replay(&self, event: Event) {
        let cost = event.cost();
        let mut st = self.state();
        if st.closed.is_some() {
            return;
        }
        st.bytes += cost;
        st.events.push_back(event);
        let waker = signal(&mut st);
        drop(st);
        wake(waker);
    }

    /// Closes the queue. A slow-consumer close drops what is queued (the client resumes
    /// from history); any other close lets the writer flush what is queued first.
    pub fn close(&self, reason: CloseReason) {
        let mut st = self.state();
        let mut slow = false;
        st.direct = None;
        if st.closed.is_none() {
            st.closed = Some(reason);
            if reason == CloseReason::SlowConsumer {
                st.events.clear();
                st.bytes = 0;
                slow = true;
            }
        }
        let waker = signal(&mut st);
        drop(st);
        if slow {
            self.count(|s| &s.slow_consumer_closes, 1);
        }
        wake(waker);
    }

    pub fn closed(&self) -> Option<CloseReason> {
        self.state().closed
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.state().bytes
    }

    /// Moves everything queued into `out` without waiting. Returns the close reason once
    /// the queue is closed and empty.
    pub fn drain_into(&self, out: &mut Vec<Event>) -> Result<(), CloseReason> {
        let mut st = self.state();
        if st.events.is_empty() {
            if let Some(r) = st.closed {
                return Err(r);
            }
        }
        st.bytes = 0;
        st.writing = !st.events.is_empty();
        if st.events.capacity() <= RETAINED_EVENTS {
            // Keep a small buffer: fan-out pushes into it for every subscriber, and
            // reallocating it per delivery would put an allocation on the hot path.
            out.extend(st.events.drain(..));
        } else {
            // After a burst, give the big buffer back: idle connections stay small.
            let events = std::mem::take(&mut st.events);
            drop(st);
            out.extend(events);
        }
        Ok(())
    }

    /// The connection's task has written the batch it drained. Returns whether more is
    /// queued (then it is still the writer); otherwise pushes may write directly again.
    pub fn write_done(&self) -> bool {
        let mut st = self.state();
        st.writing = !st.events.is_empty();
        if !st.writing && st.direct.is_some() && st.events.capacity() > 0 {
            // Pushes to a connection with a direct path queue only while its socket is
            // full or its task is writing: between those times it keeps no buffer (an
            // idle connection's reply to its subscribe would otherwise keep one forever).
            st.events = VecDeque::new();
        }
        st.writing
    }

    /// A heartbeat is due: wakes the connection's task, which takes it with
    /// [`ConnQueue::take_beat`]. One timer for all connections (the server's heartbeat
    /// wheel) instead of one in each. Returns false once the queue is closed.
    pub fn beat(&self) -> bool {
        let mut st = self.state();
        if st.closed.is_some() {
            return false;
        }
        st.beat = true;
        let waker = signal(&mut st);
        drop(st);
        wake(waker);
        true
    }

    /// Whether a heartbeat came since the last call.
    pub fn take_beat(&self) -> bool {
        std::mem::take(&mut self.state().beat)
    }

    /// Ready once something was queued, a heartbeat came or the queue closed since the
    /// last time it was ready (a change while nobody waited is kept for the next call).
    /// One consumer: a second waiting task replaces the first's waker.
    pub fn poll_changed(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let mut st = self.state();
        if std::mem::take(&mut st.woken) {
            return std::task::Poll::Ready(());
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        std::task::Poll::Pending
    }

    /// [`ConnQueue::poll_changed`] as a future.
    pub async fn changed(&self) {
        std::future::poll_fn(|cx| self.poll_changed(cx)).await
    }

    /// Waits until something is queued (or the queue is closed), then moves everything
    /// queued into `out`. Single consumer: only the connection's writer calls this.
    pub async fn next_batch(&self, out: &mut Vec<Event>) -> Result<(), CloseReason> {
        loop {
            self.drain_into(out)?;
            if !out.is_empty() {
                return Ok(());
            }
            // A change while nobody waits is kept, so a push between the drain above and
            // this await is not lost.
            self.changed().await;
        }
    }
}

/// Marks a change for the consumer (kept like a permit when it is not waiting) and takes
/// its waker, to be woken once the caller has let go of the queue's lock.
fn signal(st: &mut State) -> Option<std::task::Waker> {
    st.woken = true;
    st.waker.take()
}

fn wake(waker: Option<std::task::Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::{new_epoch, Publication};
    use bytes::Bytes;

    fn ev(n: usize) -> Event {
        ev_kind(n, crate::publication::Kind::Stored)
    }

    fn ev_kind(n: usize, kind: crate::publication::Kind) -> Event {
        Event::Publication(Delivery::new(Publication {
            channel: ChannelName::parse("c").unwrap(),
            offset: 1,
            epoch: new_epoch(),
            data: Bytes::from(vec![b'1'; n]),
            time: 0,
            kind,
            meta: None,
        }))
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, std::task::Waker) {
        let c = Arc::new(Count(Default::default()));
        (c.clone(), std::task::Waker::from(c))
    }

    fn changed(q: &ConnQueue, w: &std::task::Waker) -> bool {
        q.poll_changed(&mut std::task::Context::from_waker(w)).is_ready()
    }

    #[test]
    fn a_change_while_nobody_waits_is_kept_for_the_next_look() {
        let q = ConnQueue::new(1000);
        let (count, w) = waker();
        assert!(!changed(&q, &w), "nothing happened yet");
        q.push(ev(10)).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the waiting consumer is woken");
        assert!(changed(&q, &w));
        assert!(!changed(&q, &w), "one change is seen once");
        // Nobody waiting: kept like a permit.
        let q = ConnQueue::new(1000);
        q.push(ev(10)).unwrap();
        assert!(changed(&q, &w));
    }

    #[test]
    fn a_consumer_busy_writing_is_woken_once_per_batch_not_per_event() {
        let q = ConnQueue::new(100_000);
        let (count, w) = waker();
        q.push(ev(10)).unwrap();
        let mut out = vec![];
        q.drain_into(&mut out).unwrap(); // the task now writes this batch
        assert!(changed(&q, &w));
        assert!(!changed(&q, &w));
        for _ in 0..10 {
            q.push(ev(10)).unwrap();
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken by the first event behind the batch only");
        assert!(changed(&q, &w));
        // The batch written, everything queued meanwhile is taken at once.
        assert!(q.write_done(), "more is queued");
        out.clear();
        q.drain_into(&mut out).unwrap();
        assert_eq!(out.len(), 10);
        // A batch of several events behind an empty queue wakes too.
        q.push_batch(vec![ev(10), ev(10), ev(10)]).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "not waiting: no wake, a permit");
        assert!(changed(&q, &w));
        // A close always wakes.
        assert!(!changed(&q, &w));
        q.close(CloseReason::Normal);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert!(changed(&q, &w));
    }

    #[test]
    fn a_beat_wakes_the_consumer_and_is_taken_once() {
        let q = ConnQueue::new(1000);
        let (count, w) = waker();
        assert!(!q.take_beat());
        assert!(!changed(&q, &w));
        assert!(q.beat());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(changed(&q, &w));
        assert!(q.take_beat());
        assert!(!q.take_beat(), "taken once");
        q.close(CloseReason::Normal);
        assert!(!q.beat(), "a closed queue takes no beats");
    }

    #[test]
    fn volatile_events_are_dropped_before_reliable_ones_and_never_close() {
        use crate::publication::Kind;
        let q = ConnQueue::new(1000);
        q.push(ev(100)).unwrap();
        for _ in 0..5 {
            q.push(ev_kind(100, Kind::Volatile)).unwrap();
        }
        // Full of volatile: a reliable event evicts them instead of closing the queue.
        for _ in 0..3 {
            q.push(ev(100)).unwrap();
        }
        assert_eq!(q.closed(), None);
        let mut out = vec![];
        q.drain_into(&mut out).unwrap();
        assert!(out.iter().all(Event::is_reliable), "volatile events kept while reliable ones were pushed");
        assert_eq!(out.len(), 4);
        // A volatile event that does not fit is dropped; the queue stays open.
        let q = ConnQueue::new(300);
        q.push(ev(150)).unwrap();
        assert_eq!(q.push(ev_kind(200, Kind::Volatile)), Err(PushError::Dropped));
        assert_eq!(q.closed(), None);
    }

    #[test]
    fn overflow_closes_as_slow_consumer_and_frees_what_was_queued() {
        let q = ConnQueue::new(1000);
        let size = ev(100).cost();
        let fits = 1000 / size;
        for _ in 0..fits {
            q.push(ev(100)).unwrap();
        }
        assert_eq!(q.queued_bytes(), fits * size);
        assert_eq!(q.push(ev(100)), Err(PushError::Overflow));
        assert_eq!(q.queued_bytes(), 0);
        assert_eq!(q.closed(), Some(CloseReason::SlowConsumer));
        assert_eq!(q.push(ev(1)), Err(PushError::Closed));
        let mut out = vec![];
        assert_eq!(q.drain_into(&mut out), Err(CloseReason::SlowConsumer));
        assert!(out.is_empty());
    }

    #[test]
    fn one_oversize_event_into_an_empty_queue_is_accepted() {
        // A single message larger than the bound must still be deliverable.
        let q = ConnQueue::new(10);
        q.push(ev(100)).unwrap();
    }

    #[tokio::test]
    async fn writer_drains_everything_queued_in_one_batch() {
        let q = ConnQueue::new(1 << 20);
        for _ in 0..5 {
            q.push(ev(10)).unwrap();
        }
        let mut out = vec![];
        q.next_batch(&mut out).await.unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn shutdown_close_flushes_queued_events_first() {
        let q = ConnQueue::new(1 << 20);
        q.push(ev(10)).unwrap();
        q.close(CloseReason::Shutdown);
        let mut out = vec![];
        q.next_batch(&mut out).await.unwrap();
        assert_eq!(out.len(), 1);
        out.clear();
        assert_eq!(q.next_batch(&mut out).await, Err(CloseReason::Shutdown));
    }
}

#[cfg(test)]
mod retention {
    use super::*;

    #[test]
    fn the_queue_keeps_a_small_buffer_and_releases_a_big_one() {
        let q = ConnQueue::new(1 << 30);
        let frame = || Event::Frame(bytes::Bytes::from_static(b"x"));
        q.push(frame()).unwrap();
        let mut out = Vec::new();
        q.drain_into(&mut out).unwrap();
        let kept = q.state().events.capacity();
        assert!(kept > 0 && kept <= RETAINED_EVENTS, "small buffer kept: {kept}");
        for _ in 0..1000 {
            q.push(frame()).unwrap();
        }
        q.drain_into(&mut out).unwrap();
        assert_eq!(q.state().events.capacity(), 0, "burst buffer released");
    }
}

#[cfg(test)]
mod direct {
    use super::*;
    use bytes::Bytes;

    /// A socket that takes `room` more bytes, then blocks; records what it took.
    struct FakeSocket {
        room: Mutex<usize>,
        took: Mutex<Vec<u8>>,
    }

    impl DirectWrite for FakeSocket {
        fn try_write(&self, event: &Event) -> Written {
            let Event::Frame(b) = event else { panic!("frames only in this test") };
            let mut room = self.room.lock().unwrap();
            let n = b.len().min(*room);
            if n == 0 {
                return Written::Blocked;
            }
            *room -= n;
            self.took.lock().unwrap().extend_from_slice(&b[..n]);
            if n == b.len() {
                Written::All
            } else {
                Written::Part(b.slice(n..))
            }
        }
    }

    fn frame(s: &'static str) -> Event {
        Event::Frame(Bytes::from_static(s.as_bytes()))
    }

    fn frames(out: &[Event]) -> String {
        out.iter()
            .map(|e| match e {
                Event::Frame(b) => String::from_utf8(b.to_vec()).unwrap(),
                _ => panic!(),
            })
            .collect()
    }

    #[test]
    fn events_go_straight_to_the_socket_until_it_blocks_then_queue_in_order() {
        let q = ConnQueue::new(1 << 20);
        let sock = Arc::new(FakeSocket { room: Mutex::new(6), took: Mutex::new(Vec::new()) });
        q.set_direct(sock.clone());
        q.push(frame("abc")).unwrap();
        assert_eq!(q.queued_bytes(), 0, "written directly");
        // Half of "def!" fits: the rest waits, and everything after it queues behind.
        q.push(frame("defg")).unwrap();
        *sock.room.lock().unwrap() = 100;
        q.push(frame("hij")).unwrap();
        assert_eq!(&*sock.took.lock().unwrap(), b"abcdef");
        let mut out = Vec::new();
        q.drain_into(&mut out).unwrap();
        assert_eq!(frames(&out), "ghij");
        // While the writer holds a batch, pushes queue even though the socket has room.
        q.push(frame("k")).unwrap();
        assert_eq!(q.queued_bytes(), 1);
        assert!(q.write_done(), "more is queued: the writer goes on");
        out.clear();
        q.drain_into(&mut out).unwrap();
        assert_eq!(frames(&out), "k");
        assert!(!q.write_done());
        // Idle again: direct writes resume.
        q.push(frame("l")).unwrap();
        assert_eq!(q.queued_bytes(), 0);
        assert_eq!(&*sock.took.lock().unwrap(), b"abcdefl");
    }

    #[test]
    fn a_batch_goes_out_as_far_as_the_socket_takes_it_and_queues_the_rest_in_order() {
        let q = ConnQueue::new(1 << 20);
        let sock = Arc::new(FakeSocket { room: Mutex::new(5), took: Mutex::new(Vec::new()) });
        q.set_direct(sock.clone());
        q.push_batch(vec![frame("ab"), frame("cd"), frame("ef"), frame("gh")]).unwrap();
        assert_eq!(&*sock.took.lock().unwrap(), b"abcde");
        let mut out = Vec::new();
        q.drain_into(&mut out).unwrap();
        assert_eq!(frames(&out), "fgh");
        assert!(!q.write_done());
        // A batch behind queued events queues whole.
        *sock.room.lock().unwrap() = 0;
        q.push(frame("i")).unwrap();
        *sock.room.lock().unwrap() = 100;
        q.push_batch(vec![frame("j"), frame("k")]).unwrap();
        out.clear();
        q.drain_into(&mut out).unwrap();
        assert_eq!(frames(&out), "ijk");
    }

    #[test]
    fn a_connection_with_a_direct_path_keeps_no_buffer_once_written_and_clear_direct_queues_all() {
        let q = ConnQueue::new(1 << 20);
        let sock = Arc::new(FakeSocket { room: Mutex::new(0), took: Mutex::new(Vec::new()) });
        q.set_direct(sock.clone());
        q.push(frame("a")).unwrap();
        assert!(q.state().events.capacity() > 0);
        let mut out = Vec::new();
        q.drain_into(&mut out).unwrap();
        assert!(!q.write_done());
        assert_eq!(q.state().events.capacity(), 0, "written and idle: no buffer kept");
        // Without the direct path every push queues, whatever room the socket has.
        *sock.room.lock().unwrap() = 100;
        q.clear_direct();
        q.push(frame("b")).unwrap();
        assert_eq!(q.queued_bytes(), 1);
        assert!(sock.took.lock().unwrap().is_empty());
        assert_eq!(Arc::strong_count(&sock), 1);
    }

    #[test]
    fn closing_lets_go_of_the_socket() {
        let q = ConnQueue::new(1 << 20);
        let sock = Arc::new(FakeSocket { room: Mutex::new(0), took: Mutex::new(Vec::new()) });
        q.set_direct(sock.clone());
        assert_eq!(Arc::strong_count(&sock), 2);
        q.close(CloseReason::Normal);
        assert_eq!(Arc::strong_count(&sock), 1);
    }
}
