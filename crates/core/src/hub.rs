//! The hub: per node, channel → local subscriptions.
//!
//! The hub subscribes the node to a channel on the broker when the first local
//! subscription arrives and unsubscribes when the last one leaves. Each publication the
//! broker delivers becomes one shared [`Delivery`] handed to every local subscription.
//!
//! # Subscribe-then-recover (guarantee 4)
//!
//! [`Hub::subscribe`] registers the subscription in *recovering* mode (live publications
//! are buffered, not sent), makes sure the node is subscribed on the broker, and only then
//! reads history. [`PendingSubscription::go_live`] merges history and buffer by offset,
//! queues the result and switches to live delivery. A publication that lands during the
//! subscribe is therefore in the history, in the buffer, or both — and the offset check
//! delivers it exactly once.

use std::collections::hash_map::DefaultHasher;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::broker::{Broker, BrokerError, BrokerEventHandler, HistoryRequest};
use crate::channel::ChannelName;
use crate::pattern::{Pattern, PatternIndex};
use crate::publication::{Delivery, Epoch, StreamPosition};
use crate::queue::{ConnQueue, Event, QueueStats};

const SHARDS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Subscriptions per chunk of a channel's list.
const CHUNK: usize = 256;

/// One channel's local subscriptions, in copy-on-write chunks of at most [`CHUNK`]: a
/// fan-out clones the chunk pointers and delivers without holding any lock, and a join
/// or leave copies at most one chunk (when a fan-out still holds it) — never the whole
/// list, so a storm of 10k joins or leaves costs O(10k), not O(10k²).
struct ChannelEntry {
    chunks: Vec<Arc<Vec<Arc<Subscription>>>>,
    /// Chunks that have had room since it was last checked (may be stale: verified on use).
    roomy: Vec<usize>,
    len: usize,
    node_active: bool,
    /// Set once the channel fans out in parallel (see [`Lane`]).
    lanes: Option<Arc<[Lane]>>,
}

/// Channels with at most this many local subscriptions are delivered to by the task
/// that dispatches (under the broker's channel lock for the memory broker: it is short).
/// Bigger ones fan out in [`Lane`]s, off any lock and on every worker.
const INLINE_MAX: usize = 64;

/// One share of a big channel's fan-out: chunk `i` of the channel belongs to lane
/// `i % lanes`, and each lane delivers in publication order from its own mailbox, drained
/// by at most one task at a time — so every subscriber still sees offset order, while
/// the lanes run on different workers at once.
#[derive(Default)]
struct Lane {
    mailbox: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    pending: std::collections::VecDeque<Arc<Delivery>>,
    /// A task is draining this lane.
    running: bool,
}

impl Lane {
    fn idle(&self) -> bool {
        let st = lock(&self.mailbox);
        st.pending.is_empty() && !st.running
    }
}

impl ChannelEntry {
    fn new() -> Self {
        ChannelEntry { chunks: Vec::new(), roomy: Vec::new(), len: 0, node_active: false, lanes: None }
    }

    fn insert(&mut self, sub: Arc<Subscription>) {
        let at = loop {
            match self.roomy.pop() {
                Some(i) if self.chunks.get(i).is_some_and(|c| c.len() < CHUNK) => break i,
                Some(_) => continue,
                None => {
                    self.chunks.push(Arc::new(Vec::with_capacity(CHUNK.min(16))));
                    break self.chunks.len() - 1;
                }
            }
        };
        sub.chunk.store(at, Ordering::Relaxed);
        let chunk = Arc::make_mut(&mut self.chunks[at]);
        chunk.push(sub);
        if chunk.len() < CHUNK {
            self.roomy.push(at);
        }
        self.len += 1;
    }

    fn remove(&mut self, sub: &Subscription) {
        let at = sub.chunk.load(Ordering::Relaxed);
        let Some(chunk) = self.chunks.get_mut(at) else { return };
        let Some(pos) = chunk.iter().position(|s| s.id == sub.id) else { return };
        let was_full = chunk.len() == CHUNK;
        Arc::make_mut(chunk).swap_remove(pos);
        self.len -= 1;
        if was_full {
            self.roomy.push(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct Shard {
    channels: Mutex<HashMap<ChannelName, ChannelEntry>>,
    /// Serialises broker subscribe/unsubscribe calls for this shard's channels, so a
    /// late unsubscribe can never undo a newer subscribe.
    node_ops: tokio::sync::Mutex<()>,
}

/// Upper bounds (milliseconds) of the publish→fan-out latency buckets.
pub const LATENCY_BOUNDS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// This hub's fan-out counters (for metrics).
#[derive(Default)]
pub struct HubStats {
    pub publications: AtomicU64,
    pub deliveries: AtomicU64,
    /// Publications by publish→fan-out latency (broker time to dispatch on this node),
    /// per bucket of [`LATENCY_BOUNDS_MS`] plus one overflow bucket.
    pub latency: [AtomicU64; 13],
    /// The sum of those latencies, in milliseconds (a histogram's `_sum`).
    pub latency_sum_ms: AtomicU64,
    /// What the queues made by [`Hub::queue`] dropped and closed.
    pub queues: Arc<QueueStats>,
}

impl HubStats {
    fn observe_latency(&self, ms: u64) {
        let i = LATENCY_BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BOUNDS_MS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Bucket counts (not cumulative).
    pub fn latency_snapshot(&self) -> Vec<u64> {
        self.latency.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

pub struct Hub {
    broker: Arc<dyn Broker>,
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    patterns: std::sync::RwLock<PatternIndex<Arc<Subscription>>>,
    pattern_count: std::sync::atomic::AtomicUsize,
    /// Namespaces this node is subscribed to on the broker (for patterns); the lock
    /// serialises those subscribe/unsubscribe calls.
    pattern_ops: tokio::sync::Mutex<std::collections::HashSet<String>>,
    control: std::sync::OnceLock<ControlHandler>,
    occupancy: std::sync::OnceLock<OccupancyHandler>,
    pub stats: HubStats,
}

/// Told when a channel gets its first subscriber on this node (`true`: the node
/// subscribed to it on the broker) and when it loses its last (`false`).
pub type OccupancyHandler = Box<dyn Fn(&ChannelName, bool) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a subscribe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOutcome {
    /// The position the client is at once it has processed the queued replay: the
    /// requested position if it was recovered, else the channel's current position.
    pub position: StreamPosition,
    /// `false` when a position was asked for and could not be continued (other epoch, or
    /// older than retained history): the client must reload its state.
    pub recovered: bool,
    /// Publications that will be replayed before live ones.
    pub replayed: usize,
}

/// What a subscribe may ask for.
#[derive(Debug, Clone, Default)]
pub struct SubscribeRequest {
    /// Resume after this position.
    pub since: Option<StreamPosition>,
    /// Without `since`: first replay the newest `rewind` retained publications (initial
    /// state: a ticker's last price, a chat's last messages).
    pub rewind: Option<usize>,
    /// With `since`: replay at most this many publications. A client further behind is
    /// told it cannot resume (`recovered: false`, an explicit reset) instead of being sent
    /// an unbounded replay. `None`: whatever history holds.
    pub recovery_max: Option<usize>,
}

struct SubState {
    /// `Some` while recovering: live publications wait here. (Boxed: a subscription is
    /// recovering only while it subscribes, and every idle one keeps this state.)
    #[allow(clippy::box_collection)] // 8 bytes in every subscription instead of 24
    recovering: Option<Box<Vec<Arc<Delivery>>>>,
    recovering_bytes: usize,
    epoch: Option<Epoch>,
    offset: u64,
}

/// One connection's subscription to one channel (or, live-only, to a pattern).
pub struct Subscription {
    id: u64,
    /// Which chunk of its channel's list holds it.
    chunk: std::sync::atomic::AtomicUsize,
    channel: ChannelName,
    /// Boxed: pattern subscriptions are rare.
    pattern: Option<Box<Pattern>>,
    queue: Arc<ConnQueue>,
    state: Mutex<SubState>,
}

impl Subscription {
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The position of the last publication queued for this subscription.
    pub fn position(&self) -> Option<StreamPosition> {
        let st = lock(&self.state);
        st.epoch.clone().map(|epoch| StreamPosition { epoch, offset: st.offset })
    }

    pub fn pattern(&self) -> Option<&Pattern> {
        self.pattern.as_deref()
    }

    fn deliver(&self, d: &Arc<Delivery>) -> bool {
        if self.pattern.is_some() || !d.publication.is_stored() {
            // Live-only traffic: no offsets to check, nothing to replay. Volatile events
            // that arrive while a subscription recovers are simply not delivered.
            if self.pattern.is_none() && lock(&self.state).recovering.is_some() {
                return false;
            }
            return self.queue.push(Event::Publication(d.clone())).is_ok();
        }
        let mut st = lock(&self.state);
        if st.recovering.is_some() {
            self.buffer(st, d);
            return false;
        }
        self.accept(&mut st, d, false)
    }

    /// Keeps `d` for [`PendingSubscription::go_live`] while the subscription recovers.
    fn buffer(&self, mut st: std::sync::MutexGuard<'_, SubState>, d: &Arc<Delivery>) {
        let Some(buf) = st.recovering.as_mut() else { return };
        buf.push(d.clone());
        st.recovering_bytes += d.cost();
        if st.recovering_bytes > 4 * self.queue.max_bytes().max(crate::queue::DEFAULT_QUEUE_BYTES) {
            // A recovery that takes so long that the buffer outgrows any sane queue:
            // treat like a slow consumer rather than grow without bound.
            st.recovering = Some(Box::default());
            drop(st);
            self.queue.close(crate::queue::CloseReason::SlowConsumer);
        }
    }

    /// [`Self::deliver`] for several publications at once (a lane that fell behind): the
    /// same checks, one push — so they can leave in one write. Returns how many were
    /// queued or written.
    fn deliver_batch(&self, ds: &[Arc<Delivery>]) -> u64 {
        let mut out = Vec::with_capacity(ds.len());
        let mut st = lock(&self.state);
        for d in ds {
            let p = &d.publication;
            if self.pattern.is_some() || !p.is_stored() {
                if self.pattern.is_none() && st.recovering.is_some() {
                    continue;
                }
                out.push(Event::Publication(d.clone()));
                continue;
            }
            if st.recovering.is_some() {
                self.buffer(st, d);
                st = lock(&self.state);
                continue;
            }
            let same_epoch = st.epoch.as_deref() == Some(&*p.epoch);
            if same_epoch && p.offset <= st.offset {
                continue; // duplicate
            }
            if !same_epoch || p.offset != st.offset + 1 {
                let position = StreamPosition { epoch: p.epoch.clone(), offset: p.offset - 1 };
                out.push(Event::Reset { channel: self.channel.clone(), position });
                st.epoch = Some(p.epoch.clone());
            }
            st.offset = p.offset;
            out.push(Event::Publication(d.clone()));
        }
        drop(st);
        let n = out.iter().filter(|e| matches!(e, Event::Publication(_))).count() as u64;
        if out.is_empty() || self.queue.push_batch(out).is_err() {
            return 0;
        }
        n
    }

    /// Queues `d` if it is new to this subscription. A publication from another epoch, or
    /// one that skips offsets, means the broker lost history under a live subscriber: the
    /// client is told with a `Reset` before the publication, never a silent gap.
    fn accept(&self, st: &mut SubState, d: &Arc<Delivery>, replay: bool) -> bool {
        let p = &d.publication;
        let same_epoch = st.epoch.as_deref() == Some(&*p.epoch);
        if same_epoch && p.offset <= st.offset {
            return false; // duplicate
        }
        if !same_epoch || p.offset != st.offset + 1 {
            let position = StreamPosition { epoch: p.epoch.clone(), offset: p.offset - 1 };
            let reset = Event::Reset { channel: self.channel.clone(), position };
            if replay {
                self.queue.push_replay(reset);
            } else if self.queue.push(reset).is_err() {
                return false;
            }
            st.epoch = Some(p.epoch.clone());
        }
        st.offset = p.offset;
        if replay {
            self.queue.push_replay(Event::Publication(d.clone()));
            true
        } else {
            self.queue.push(Event::Publication(d.clone())).is_ok()
        }
    }
}

/// A live subscription; dropping it unsubscribes.
pub struct SubscriptionHandle {
    hub: Arc<Hub>,
    sub: Arc<Subscription>,
}

impl SubscriptionHandle {
    pub fn subscription(&self) -> &Arc<Subscription> {
        &self.sub
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        self.hub.remove(&self.sub);
    }
}

/// A subscription that has read history but not yet gone live. The transport may queue
/// its own reply (which must precede the replay) before calling [`Self::go_live`].
pub struct PendingSubscription {
    handle: SubscriptionHandle,
    history: Vec<Arc<Delivery>>,
    outcome: SubscribeOutcome,
}

impl PendingSubscription {
    pub fn outcome(&self) -> &SubscribeOutcome {
        &self.outcome
    }

    /// Queues the replay and the buffered live publications, merged by offset, then
    /// switches to live delivery.
    pub fn go_live(self) -> SubscriptionHandle {
        let sub = &self.handle.sub;
        let mut st = lock(&sub.state);
        st.epoch = Some(self.outcome.position.epoch.clone());
        st.offset = self.outcome.position.offset;
        // The broker's own deliveries: encoded once, the same bytes for every resumer.
        for d in &self.history {
            sub.accept(&mut st, d, true);
        }
        let buffered = st.recovering.take().unwrap_or_default();
        st.recovering_bytes = 0;
        for d in buffered.iter().filter(|d| d.publication.is_stored()) {
            sub.accept(&mut st, d, true);
        }
        drop(st);
        self.handle
    }
}

/// Delivers what lane `i` of a channel has pending, in order, until it has none. It
/// yields to the runtime after every chunk, so that a big fan-out never starves the
/// tasks that accept publications and serve connections: a publisher keeps its pace,
/// and a lane that falls behind delivers several publications per write instead.
async fn drain_lane(hub: Weak<Hub>, channel: ChannelName, lanes: Arc<[Lane]>, i: usize) {
    let lane = &lanes[i];
    loop {
        let batch: Vec<Arc<Delivery>> = {
            let mut st = lock(&lane.mailbox);
            if st.pending.is_empty() {
                st.running = false;
                return;
            }
            st.pending.drain(..).collect()
        };
        let Some(hub) = hub.upgrade() else {
            lock(&lane.mailbox).running = false;
            return;
        };
        // The subscribers as they are now: one that joined after the publication was
        // dispatched is recovering, and its offset check keeps it exact.
        let chunks = hub.lane_chunks(&channel, lanes.len(), i);
        let stats = &hub.stats;
        for chunk in &chunks {
            let mut delivered = 0u64;
            if let [d] = batch.as_slice() {
                for s in chunk.iter() {
                    delivered += s.deliver(d) as u64;
                }
            } else {
                // Behind by several: each subscriber gets them together, in one write.
                for s in chunk.iter() {
                    delivered += s.deliver_batch(&batch);
                }
            }
            stats.deliveries.fetch_add(delivered, Ordering::Relaxed);
            tokio::task::yield_now().await;
        }
    }
}

struct Dispatcher(Weak<Hub>);

impl BrokerEventHandler for Dispatcher {
    fn handle_publication(&self, delivery: Arc<Delivery>) {
        if let Some(hub) = self.0.upgrade() {
            hub.dispatch(delivery);
        }
    }

    fn handle_control(&self, message: bytes::Bytes) {
        if let Some(hub) = self.0.upgrade() {
            if let Some(h) = hub.control.get() {
                h(message);
            }
        }
    }
}

/// What the server does with control messages from other nodes.
pub type ControlHandler = Box<dyn Fn(bytes::Bytes) + Send + Sync>;

impl Hub {
    /// Makes a hub over `broker` and starts the broker's delivery to it.
    pub async fn start(broker: Arc<dyn Broker>) -> Result<Arc<Hub>, BrokerError> {
        let shards = (0..SHARDS)
            .map(|_| Shard { channels: Mutex::new(HashMap::new()), node_ops: tokio::sync::Mutex::new(()) })
            .collect();
        let hub = Arc::new(Hub {
            broker: broker.clone(),
            shards,
            next_id: AtomicU64::new(1),
            patterns: Default::default(),
            pattern_count: Default::default(),
            pattern_ops: tokio::sync::Mutex::new(Default::default()),
            control: std::sync::OnceLock::new(),
            occupancy: std::sync::OnceLock::new(),
            stats: HubStats::default(),
        });
        broker.run(Arc::new(Dispatcher(Arc::downgrade(&hub)))).await?;
        Ok(hub)
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// A new connection queue bounded at `max_bytes`, counting its drops and
    /// slow-consumer closes in this hub's [`HubStats::queues`].
    pub fn queue(&self, max_bytes: usize) -> Arc<ConnQueue> {
        ConnQueue::with_stats(max_bytes, Some(self.stats.queues.clone()))
    }

    /// Sets what handles control messages from other nodes (once).
    pub fn set_control_handler(&self, h: ControlHandler) {
        let _ = self.control.set(h);
    }

    /// Sets what is told of channels becoming occupied and vacated on this node (once).
    pub fn set_occupancy_handler(&self, h: OccupancyHandler) {
        let _ = self.occupancy.set(h);
    }

    fn shard(&self, channel: &ChannelName) -> &Shard {
        let mut h = DefaultHasher::new();
        channel.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Fans a publication out to this node's subscriptions on its channel: one encoding,
    /// shared by all. Called in offset order per channel (the broker's guarantee 1); a
    /// big channel's fan-out is handed to its lanes and happens after this returns.
    pub fn dispatch(self: &Arc<Self>, delivery: Arc<Delivery>) {
        let publication = &delivery.publication;
        let workers = tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers()).max(1);
        let subs = {
            let mut map = lock(&self.shard(&publication.channel).channels);
            match map.get_mut(&publication.channel) {
                Some(e) if !e.is_empty() => {
                    if e.len > INLINE_MAX {
                        e.lanes.get_or_insert_with(|| (0..workers).map(|_| Lane::default()).collect());
                    }
                    Some((e.chunks.clone(), e.lanes.clone()))
                }
                _ => None,
            }
        };
        let mut by_pattern = Vec::new();
        if self.pattern_count.load(Ordering::Relaxed) > 0 {
            self.patterns.read().unwrap_or_else(|p| p.into_inner()).matches(&publication.channel, &mut by_pattern);
        }
        if subs.is_none() && by_pattern.is_empty() {
            return;
        }
        if publication.is_stored() {
            self.stats.observe_latency(crate::now_millis().saturating_sub(publication.time));
        }
        let channel = publication.channel.clone();
        let mut delivered = 0u64;
        for s in by_pattern.iter() {
            delivered += s.deliver(&delivery) as u64;
        }
        self.stats.publications.fetch_add(1, Ordering::Relaxed);
        let inline = |chunks: &[Arc<Vec<Arc<Subscription>>>]| {
            chunks.iter().flat_map(|chunk| chunk.iter()).map(|s| s.deliver(&delivery) as u64).sum::<u64>()
        };
        match subs {
            None => {}
            Some((chunks, None)) => delivered += inline(&chunks),
            // A big channel that shrank, once its lanes have caught up: deliver here again
            // (nothing of it can be pending in a lane, so order holds).
            Some((chunks, Some(lanes)))
                if chunks.iter().map(|c| c.len()).sum::<usize>() <= INLINE_MAX && lanes.iter().all(Lane::idle) =>
            {
                delivered += inline(&chunks)
            }
            Some((_, Some(lanes))) => {
                for (i, lane) in lanes.iter().enumerate() {
                    let start = {
                        let mut st = lock(&lane.mailbox);
                        st.pending.push_back(delivery.clone());
                        !std::mem::replace(&mut st.running, true)
                    };
                    if start {
                        let (hub, channel, lanes) = (Arc::downgrade(self), channel.clone(), lanes.clone());
                        tokio::spawn(drain_lane(hub, channel, lanes, i));
                    }
                }
            }
        }
        self.stats.deliveries.fetch_add(delivered, Ordering::Relaxed);
    }

    /// The chunks of `channel` that lane `i` of `lanes` delivers to, as they are now.
    fn lane_chunks(&self, channel: &ChannelName, lanes: usize, i: usize) -> Vec<Arc<Vec<Arc<Subscription>>>> {
        let map = lock(&self.shard(channel).channels);
        map.get(channel).map(|e| e.chunks.iter().skip(i).step_by(lanes).cloned().collect()).unwrap_or_default()
    }

    /// Subscribes `queue` to `channel`, race-free (see the module docs). The returned
    /// subscription buffers live publications until [`PendingSubscription::go_live`].
    pub async fn subscribe(
        self: &Arc<Self>,
        channel: ChannelName,
        queue: Arc<ConnQueue>,
        req: SubscribeRequest,
    ) -> Result<PendingSubscription, HubError> {
        let shard = self.shard(&channel);
        let sub = {
            let mut map = lock(&shard.channels);
            // One lookup. The subscription keeps the channel's one copy of its name (which the
            // subscriber's session keeps too), not the copy it came with: one allocation
            // per channel, not per subscriber.
            let entry = match map.entry(channel.clone()) {
                Entry::Occupied(o) => o,
                Entry::Vacant(v) => v.insert_entry(ChannelEntry::new()),
            };
            let name = entry.key().clone();
            let sub = Arc::new(Subscription {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                chunk: Default::default(),
                channel: name.clone(),
                pattern: None,
                queue,
                state: Mutex::new(SubState {
                    recovering: Some(Box::default()),
                    recovering_bytes: 0,
                    epoch: None,
                    offset: 0,
                }),
            });
            entry.into_mut().insert(sub.clone());
            sub
        };
        // From here on the handle's Drop cleans up on every early return.
        let handle = SubscriptionHandle { hub: self.clone(), sub };
        {
            let _ops = shard.node_ops.lock().await;
            let needed = lock(&shard.channels).get(&channel).is_some_and(|e| !e.node_active);
            if needed {
                self.broker.subscribe(&channel).await?;
                if let Some(e) = lock(&shard.channels).get_mut(&channel) {
                    e.node_active = true;
                }
                if let Some(h) = self.occupancy.get() {
                    h(&channel, true);
                }
            }
        }
        let (history, outcome) = match req.since {
            Some(since) => {
                let limit = req.recovery_max.map(|n| n.saturating_add(1));
                let read = self
                    .broker
                    .history(&channel, HistoryRequest { since: Some(since.clone()), limit, ..Default::default() });
                match read.await {
                    Ok(h) if req.recovery_max.is_some_and(|max| h.publications.len() > max) => {
                        // Too far behind to replay: the client reloads, from the top.
                        (Vec::new(), SubscribeOutcome { position: h.position, recovered: false, replayed: 0 })
                    }
                    Ok(h) => {
                        let replayed = h.publications.len();
                        (h.publications, SubscribeOutcome { position: since, recovered: true, replayed })
                    }
                    Err(BrokerError::PositionLost { current }) => {
                        (Vec::new(), SubscribeOutcome { position: current, recovered: false, replayed: 0 })
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            None => match req.rewind.filter(|n| *n > 0) {
                Some(n) => {
                    let h = self
                        .broker
                        .history(&channel, HistoryRequest { since: None, limit: Some(n), latest: true })
                        .await?;
                    // The client starts just before the first replayed publication.
                    let start = h.publications.first().map_or(h.position.offset, |p| p.offset - 1);
                    let position = StreamPosition { epoch: h.position.epoch.clone(), offset: start };
                    let replayed = h.publications.len();
                    (h.publications, SubscribeOutcome { position, recovered: true, replayed })
                }
                None => {
                    let position = self.broker.position(&channel).await?;
                    (Vec::new(), SubscribeOutcome { position, recovered: true, replayed: 0 })
                }
            },
        };
        Ok(PendingSubscription { handle, history, outcome })
    }

    /// Subscribes `queue` to every channel matching `pattern`, live-only: no position,
    /// no replay (see [`crate::pattern`]).
    pub async fn subscribe_pattern(
        self: &Arc<Self>,
        pattern: Pattern,
        queue: Arc<ConnQueue>,
    ) -> Result<SubscriptionHandle, HubError> {
        let namespace = ChannelName::parse(&format!("{}:", pattern.namespace()))
            .unwrap_or_else(|_| ChannelName::parse("_").expect("literal"));
        let sub = Arc::new(Subscription {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            chunk: Default::default(),
            channel: namespace,
            pattern: Some(Box::new(pattern.clone())),
            queue,
            state: Mutex::new(SubState { recovering: None, recovering_bytes: 0, epoch: None, offset: 0 }),
        });
        let mut active = self.pattern_ops.lock().await;
        if !active.contains(pattern.namespace()) {
            self.broker.subscribe_namespace(pattern.namespace()).await?;
            active.insert(pattern.namespace().to_string());
        }
        let mut idx = self.patterns.write().unwrap_or_else(|p| p.into_inner());
        idx.insert(&pattern, sub.id, sub.clone());
        self.pattern_count.store(idx.len(), Ordering::Relaxed);
        drop(idx);
        Ok(SubscriptionHandle { hub: self.clone(), sub })
    }

    fn remove(self: &Arc<Self>, sub: &Arc<Subscription>) {
        if let Some(pattern) = &sub.pattern {
            let namespace_empty = {
                let mut idx = self.patterns.write().unwrap_or_else(|p| p.into_inner());
                let empty = idx.remove(pattern, sub.id);
                self.pattern_count.store(idx.len(), Ordering::Relaxed);
                empty
            };
            if namespace_empty {
                let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
                let (hub, ns) = (self.clone(), pattern.namespace().to_string());
                rt.spawn(async move {
                    let mut active = hub.pattern_ops.lock().await;
                    let still_empty = !hub.patterns.read().unwrap_or_else(|p| p.into_inner()).has_namespace(&ns);
                    if still_empty && active.remove(&ns) {
                        let _ = hub.broker.unsubscribe_namespace(&ns).await;
                    }
                });
            }
            return;
        }
        let shard = self.shard(&sub.channel);
        let now_empty = {
            let mut map = lock(&shard.channels);
            match map.get_mut(&sub.channel) {
                Some(e) => {
                    e.remove(sub);
                    e.is_empty()
                }
                None => false,
            }
        };
        if !now_empty {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let hub = self.clone();
        let channel = sub.channel.clone();
        rt.spawn(async move {
            let shard = hub.shard(&channel);
            let _ops = shard.node_ops.lock().await;
            let was_active = {
                let mut map = lock(&shard.channels);
                match map.get(&channel) {
                    Some(e) if e.is_empty() => map.remove(&channel).is_some_and(|e| e.node_active),
                    _ => false,
                }
            };
            if was_active {
                // Failing here leaves the node subscribed to a channel it no longer
                // needs; the hub drops what arrives, and the broker cleans up on
                // reconnect. Nothing is lost either way.
                let _ = hub.broker.unsubscribe(&channel).await;
                if let Some(h) = hub.occupancy.get() {
                    h(&channel, false);
                }
            }
        });
    }

    /// Live pattern subscriptions on this node.
    pub fn pattern_subscriptions(&self) -> usize {
        self.pattern_count.load(Ordering::Relaxed)
    }

    /// Active channels on this node and their local subscription counts.
    pub fn channels(&self) -> Vec<(ChannelName, usize)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let map = lock(&shard.channels);
            out.extend(map.iter().filter(|(_, e)| !e.is_empty()).map(|(c, e)| (c.clone(), e.len)));
        }
        out.sort();
        out
    }

    /// Local subscriptions on one channel.
    pub fn subscriber_count(&self, channel: &ChannelName) -> usize {
        lock(&self.shard(channel).channels).get(channel).map_or(0, |e| e.len)
    }
}
