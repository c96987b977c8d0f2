//! The in-memory broker: one process, no dependencies, the embedded default.
//!
//! Each channel is a [`ChannelLog`] behind its own mutex. `publish` holds that mutex while
//! it numbers the publication, appends it and hands it to the node's handler, which is
//! what makes numbering, history and fan-out one atomic step (guarantee 1 of
//! [`Broker`]). History is lost when the process exits; the next process makes new
//! epochs, so clients holding old positions are told to reset.
//!
//! # What a stranger can make it hold
//!
//! Reading a channel (its position, its history, a subscription that comes and goes)
//! creates its state, so that the epoch a reader was told stays the same until something
//! is published. Such *unused* channels — nothing published, no node subscription — are
//! the ones an anonymous client can create at will, so they are capped
//! ([`MemoryBroker::with_unused_cap`]): past the cap the oldest is forgotten, and if it
//! is used again it starts a new epoch (a reader holding the old one is told to reset,
//! never silently misled). Published channels are bounded by who may publish; they are
//! forgotten once idle and empty (`idle_ttl`). The map is sharded, so neither lookups nor
//! the periodic sweep hold one lock over every channel.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, BrokerEventHandler, HistoryRequest, HistoryResult, PublishOptions};
use crate::channel::ChannelName;
use crate::publication::{new_epoch, Delivery, Epoch, Kind, Publication, Published, StreamPosition};

/// How long an idle channel with no retained history and no node subscription keeps its
/// epoch and top offset before it is forgotten (and starts a new epoch if used again).
pub const DEFAULT_IDLE_CHANNEL_TTL: Duration = Duration::from_secs(3600);

/// Default cap on unused channels (nothing published, no node subscription) remembered.
pub const DEFAULT_UNUSED_CHANNEL_CAP: usize = 100_000;

const SHARDS: usize = 64;

/// The durable broker compacts its journal once it is past this size (and twice what was
/// live at the last compaction).
const COMPACT_FLOOR: u64 = 64 << 20;

/// A retained publication, kept as the delivery the hub fans out — encoded once, at
/// publish, for live subscribers and every later replay alike.
struct Entry {
    delivery: Arc<Delivery>,
    expires: Instant,
}

struct ChannelLog {
    epoch: Epoch,
    top: u64,
    history: VecDeque<Entry>,
    /// Idempotency keys seen recently: key → (position, forget after).
    keys: HashMap<String, (StreamPosition, Instant)>,
    /// The same keys in the order they expire (one window for all, so insertion order):
    /// forgetting expired keys is O(1) per publish, however many are live.
    key_expiry: VecDeque<(Instant, String)>,
    last_used: Instant,
    /// This node subscribed: publications go to the handler, and the log is never swept.
    subscribed: bool,
}

impl ChannelLog {
    fn new(now: Instant) -> Self {
        ChannelLog {
            epoch: new_epoch(),
            top: 0,
            history: VecDeque::new(),
            keys: HashMap::new(),
            key_expiry: VecDeque::new(),
            last_used: now,
            subscribed: false,
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition { epoch: self.epoch.clone(), offset: self.top }
    }

    fn trim_expired(&mut self, now: Instant) {
        while self.history.front().is_some_and(|e| e.expires <= now) {
            self.history.pop_front();
        }
        while self.key_expiry.front().is_some_and(|(until, _)| *until <= now) {
            let (until, key) = self.key_expiry.pop_front().expect("checked");
            // Only if the map still holds this very entry (not a newer use of the key).
            if self.keys.get(&key).is_some_and(|(_, u)| *u == until) {
                self.keys.remove(&key);
            }
        }
    }

    /// Offset of the oldest retained publication, or `top + 1` when none is retained.
    fn first_retained(&self) -> u64 {
        self.history.front().map_or(self.top + 1, |e| e.delivery.offset)
    }

    /// Nothing published, not subscribed: state a mere reader created.
    fn unused(&self) -> bool {
        self.top == 0 && !self.subscribed && self.history.is_empty()
    }
}

type Log = Arc<Mutex<ChannelLog>>;

#[derive(Default)]
struct Shard {
    channels: HashMap<ChannelName, Log>,
    /// Channels that were unused when last touched, oldest first (entries may have been
    /// used since: they are skipped when they come up).
    unused: VecDeque<ChannelName>,
}

/// The embedded broker. See the module docs.
pub struct MemoryBroker {
    shards: Box<[Mutex<Shard>]>,
    /// Namespaces this node subscribed to as a whole (wildcards), with reference counts.
    namespaces: std::sync::RwLock<HashMap<String, usize>>,
    namespace_subs: std::sync::atomic::AtomicUsize,
    handler: OnceLock<Arc<dyn BrokerEventHandler>>,
    idle_ttl: Duration,
    unused_cap_per_shard: usize,
    forgotten: AtomicU64,
    /// The durable broker's write-ahead journal ([`MemoryBroker::durable`]).
    journal: Option<Arc<crate::journal::Journal>>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(DEFAULT_IDLE_CHANNEL_TTL)
    }
}

impl MemoryBroker {
    pub fn new(idle_ttl: Duration) -> Self {
        Self::with_unused_cap(idle_ttl, DEFAULT_UNUSED_CHANNEL_CAP)
    }

    /// A broker that remembers at most about `unused_cap` unused channels (see the
    /// module docs; the cap is kept per shard, so it is approximate).
    pub fn with_unused_cap(idle_ttl: Duration, unused_cap: usize) -> Self {
        MemoryBroker {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            namespaces: Default::default(),
            namespace_subs: Default::default(),
            handler: OnceLock::new(),
            idle_ttl,
            unused_cap_per_shard: unused_cap.div_ceil(SHARDS).max(1),
            forgotten: AtomicU64::new(0),
            journal: None,
        }
    }

    /// The durable broker: this broker, its state rebuilt from the journal in `dir` and
    /// every stored publication journaled before it is delivered (see [`crate::journal`]).
    /// The journal is rewritten at start as a snapshot of what is live.
    pub fn durable(
        dir: &std::path::Path,
        fsync: crate::journal::Fsync,
        idle_ttl: Duration,
        unused_cap: usize,
    ) -> std::io::Result<(Arc<MemoryBroker>, crate::journal::Recovery)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("history.journal");
        let mut broker = MemoryBroker::with_unused_cap(idle_ttl, unused_cap);
        let recovery = crate::journal::read(&path, |r| broker.restore(r))?;
        let journal = crate::journal::Journal::open(&path, fsync)?;
        journal.rewrite(broker.snapshot().into_iter())?;
        broker.journal = Some(journal);
        let broker = Arc::new(broker);
        // Compaction in the background: when the journal has grown past twice what was
        // live at the last compaction (and past COMPACT_FLOOR), it is rewritten from
        // what is live now — expired history and superseded records dropped.
        let weak = Arc::downgrade(&broker);
        std::thread::Builder::new().name("journal-compact".into()).spawn(move || {
            let mut floor = COMPACT_FLOOR;
            loop {
                std::thread::sleep(Duration::from_secs(5));
                let Some(b) = weak.upgrade() else { return };
                let Some(j) = &b.journal else { return };
                if j.len() > floor {
                    match b.compact() {
                        Ok(len) => floor = COMPACT_FLOOR.max(len * 2),
                        Err(e) => tracing::error!("history journal: compaction failed: {e}"),
                    }
                }
            }
        })?;
        Ok((broker, recovery))
    }

    /// Rewrites the journal from what is live now (see [`crate::journal::Journal::compact`]);
    /// its new length. Publishes wait only while the records written meanwhile are copied.
    pub fn compact(&self) -> std::io::Result<u64> {
        match &self.journal {
            Some(j) => j.compact(|| self.snapshot()),
            None => Ok(0),
        }
    }

    /// Applies a journal record at start. Idempotent: a record of what is already there
    /// (a snapshot's, again after it) changes nothing.
    fn restore(&self, record: crate::journal::Record) {
        use crate::journal::Record;
        let now_ms = crate::now_millis();
        let now = Instant::now();
        let later = |wall: u64| now + Duration::from_millis(wall.saturating_sub(now_ms));
        match record {
            Record::Publication { channel, epoch, offset, time, data, history_size, history_ttl_ms, key } => {
                let log = self.log(&channel);
                let mut log = lock(&log);
                if log.epoch != epoch {
                    // The channel's first record, or a new epoch after it was forgotten.
                    *log = ChannelLog::new(now);
                    log.epoch = epoch.clone();
                }
                if offset <= log.top {
                    return;
                }
                log.top = offset;
                log.last_used = now;
                let expires = time.saturating_add(history_ttl_ms);
                if history_size > 0 && expires > now_ms {
                    let (data, meta) = crate::Meta::split(data);
                    let delivery = Delivery::new(Publication {
                        channel: channel.clone(),
                        offset,
                        epoch: epoch.clone(),
                        data,
                        time,
                        kind: Kind::Stored,
                        meta,
                    });
                    log.history.push_back(Entry { delivery, expires: later(expires) });
                    while log.history.len() > history_size as usize {
                        log.history.pop_front();
                    }
                }
                if let Some((k, until)) = key.filter(|(_, until)| *until > now_ms) {
                    let position = StreamPosition { epoch, offset };
                    log.keys.insert(k.clone(), (position, later(until)));
                    log.key_expiry.push_back((later(until), k));
                }
            }
            Record::Channel { channel, epoch, top } => {
                let log = self.log(&channel);
                let mut log = lock(&log);
                if log.epoch != epoch {
                    *log = ChannelLog::new(now);
                    log.epoch = epoch;
                }
                log.top = log.top.max(top);
            }
            Record::Key { channel, epoch, key, offset, until } => {
                let log = self.log(&channel);
                let mut log = lock(&log);
                if log.epoch == epoch && until > now_ms {
                    log.keys.insert(key.clone(), (StreamPosition { epoch, offset }, later(until)));
                    log.key_expiry.push_back((later(until), key));
                }
            }
        }
    }

    /// What is live, as journal records: each channel's retained publications, its
    /// numbering (epoch and top) and its remembered idempotency keys.
    fn snapshot(&self) -> Vec<crate::journal::Record> {
        use crate::journal::Record;
        let (now, now_ms) = (Instant::now(), crate::now_millis());
        let wall = |at: Instant| now_ms + at.saturating_duration_since(now).as_millis() as u64;
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (channel, log) in &shard.channels {
                let log = lock(log);
                if log.top == 0 {
                    continue;
                }
                for e in &log.history {
                    let p = &e.delivery.publication;
                    out.push(Record::Publication {
                        channel: channel.clone(),
                        epoch: log.epoch.clone(),
                        offset: p.offset,
                        time: p.time,
                        data: crate::Meta::wrap(p.meta.as_deref(), p.data.clone()),
                        history_size: u32::MAX,
                        history_ttl_ms: wall(e.expires).saturating_sub(p.time),
                        key: None,
                    });
                }
                out.push(Record::Channel { channel: channel.clone(), epoch: log.epoch.clone(), top: log.top });
                for (key, (pos, until)) in &log.keys {
                    if pos.epoch == log.epoch {
                        let (key, offset, until) = (key.clone(), pos.offset, wall(*until));
                        out.push(Record::Key {
                            channel: channel.clone(),
                            epoch: log.epoch.clone(),
                            key,
                            offset,
                            until,
                        });
                    }
                }
            }
        }
        out
    }

    fn shard(&self, channel: &ChannelName) -> &Mutex<Shard> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        channel.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn log(&self, channel: &ChannelName) -> Log {
        let mut shard = lock(self.shard(channel));
        if let Some(log) = shard.channels.get(channel) {
            return log.clone();
        }
        let log = Arc::new(Mutex::new(ChannelLog::new(Instant::now())));
        shard.channels.insert(channel.clone(), log.clone());
        shard.unused.push_back(channel.clone());
        self.enforce_cap(&mut shard);
        log
    }

    /// Forgets the oldest unused channels until the shard is within its cap. A channel
    /// someone is using right now (another reference to its log exists; taking one needs
    /// the shard lock we hold) is never forgotten.
    fn enforce_cap(&self, shard: &mut Shard) {
        let mut budget = shard.unused.len();
        while shard.unused.len() > self.unused_cap_per_shard && budget > 0 {
            budget -= 1;
            let name = shard.unused.pop_front().expect("non-empty");
            let Some(log) = shard.channels.get(&name) else { continue };
            if !lock(log).unused() {
                continue; // used since: no longer a candidate
            }
            if Arc::strong_count(log) > 1 {
                shard.unused.push_back(name); // busy: later
                continue;
            }
            shard.channels.remove(&name);
            self.forgotten.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets channels that are idle, hold no history and have no node subscription.
    /// Run periodically by the task started in [`Broker::run`]; public for tests. Locks
    /// one shard at a time.
    pub fn sweep(&self) {
        for shard in self.shards.iter() {
            let now = Instant::now();
            let mut shard = lock(shard);
            shard.channels.retain(|_, log| {
                let mut log = lock(log);
                if log.subscribed {
                    return true;
                }
                log.trim_expired(now);
                !(log.history.is_empty() && now.duration_since(log.last_used) >= self.idle_ttl)
            });
            let Shard { channels, unused } = &mut *shard;
            unused.retain(|name| channels.get(name).is_some_and(|log| lock(log).unused()));
        }
    }

    /// Does this node want `channel`'s publications?
    fn routed(&self, log: &ChannelLog, channel: &ChannelName) -> bool {
        log.subscribed
            || (self.namespace_subs.load(std::sync::atomic::Ordering::Relaxed) > 0
                && self.namespaces.read().unwrap_or_else(|p| p.into_inner()).contains_key(channel.namespace()))
    }

    /// Number of channels the broker currently keeps state for.
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).channels.len()).sum()
    }

    /// Unused channels forgotten to stay within the cap, since start.
    pub fn forgotten_count(&self) -> u64 {
        self.forgotten.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent state behind (every
    // critical section is a handful of field updates), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn run(&self, handler: Arc<dyn BrokerEventHandler>) -> Result<(), BrokerError> {
        let _ = self.handler.set(handler);
        Ok(())
    }

    fn memory_stats(&self) -> Option<(usize, u64)> {
        Some((self.channel_count(), self.forgotten_count()))
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        opts: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        let log = self.log(channel);
        let now = Instant::now();
        let (position, journaled) = {
            let mut log = lock(&log);
            log.trim_expired(now);
            if let Some(key) = &opts.idempotency_key {
                if let Some((pos, until)) = log.keys.get(key) {
                    if *until > now {
                        return Ok(Published { position: pos.clone(), duplicate: true });
                    }
                }
            }
            let time = crate::now_millis();
            // Journaled before anything changes: a write that fails (a full disk) leaves the
            // channel as it was, and the publish fails.
            let journaled = match &self.journal {
                Some(j) => {
                    let keeps = opts.history_size > 0 && !opts.history_ttl.is_zero();
                    let record = crate::journal::Record::Publication {
                        channel: channel.clone(),
                        epoch: log.epoch.clone(),
                        offset: log.top + 1,
                        time,
                        data: data.clone(),
                        history_size: if keeps { opts.history_size.min(u32::MAX as usize) as u32 } else { 0 },
                        history_ttl_ms: if keeps { opts.history_ttl.as_millis() as u64 } else { 0 },
                        key: opts
                            .idempotency_key
                            .clone()
                            .map(|k| (k, time + opts.idempotency_window.as_millis() as u64)),
                    };
                    Some((j.clone(), j.append(&record)?))
                }
                None => None,
            };
            log.top += 1;
            log.last_used = now;
            let (data, meta) = crate::Meta::split(data);
            let delivery = Delivery::new(Publication {
                channel: channel.clone(),
                offset: log.top,
                epoch: log.epoch.clone(),
                data,
                time,
                kind: Kind::Stored,
                meta,
            });
            if opts.history_size > 0 && !opts.history_ttl.is_zero() {
                log.history.push_back(Entry { delivery: delivery.clone(), expires: now + opts.history_ttl });
            }
            while log.history.len() > opts.history_size {
                log.history.pop_front();
            }
            let position = log.position();
            if let Some(key) = &opts.idempotency_key {
                let until = now + opts.idempotency_window;
                log.keys.insert(key.clone(), (position.clone(), until));
                log.key_expiry.push_back((until, key.clone()));
            }
            // Hand it to the node while still holding the channel lock: this is what keeps
            // delivery order equal to offset order when several tasks publish to one channel
            // at once. (The hub fans big channels out in its lanes, after this returns.)
            if self.routed(&log, channel) {
                if let Some(handler) = self.handler.get() {
                    handler.handle_publication(delivery);
                }
            }
            (position, journaled)
        };
        // Answered once the record is as durable as the fsync policy promises.
        if let Some((j, seq)) = journaled {
            j.durable(seq).await?;
        }
        Ok(Published { position, duplicate: false })
    }

    async fn publish_volatile(&self, channel: &ChannelName, kind: Kind, data: Bytes) -> Result<(), BrokerError> {
        let log = self.log(channel);
        let log = lock(&log);
        if self.routed(&log, channel) {
            if let Some(handler) = self.handler.get() {
                let (data, meta) = crate::Meta::split(data);
                handler.handle_publication(Delivery::new(Publication {
                    channel: channel.clone(),
                    offset: 0,
                    epoch: log.epoch.clone(),
                    data,
                    time: crate::now_millis(),
                    kind,
                    meta,
                }));
            }
        }
        Ok(())
    }

    async fn history(&self, channel: &ChannelName, req: HistoryRequest) -> Result<HistoryResult, BrokerError> {
        let log = self.log(channel);
        let mut log = lock(&log);
        log.trim_expired(Instant::now());
        let position = log.position();
        let publications: Vec<Arc<Delivery>> = match &req.since {
            Some(since) => {
                let continuous =
                    since.epoch == log.epoch && since.offset <= log.top && since.offset + 1 >= log.first_retained();
                if !continuous {
                    return Err(BrokerError::PositionLost { current: position });
                }
                let skip = log.history.iter().take_while(|e| e.delivery.offset <= since.offset).count();
                let take = req.limit.unwrap_or(usize::MAX);
                log.history.iter().skip(skip).take(take).map(|e| e.delivery.clone()).collect()
            }
            None => {
                let len = log.history.len();
                let take = req.limit.unwrap_or(len).min(len);
                let skip = if req.latest { len - take } else { 0 };
                log.history.iter().skip(skip).take(take).map(|e| e.delivery.clone()).collect()
            }
        };
        Ok(HistoryResult { publications, position })
    }

    async fn position(&self, channel: &ChannelName) -> Result<StreamPosition, BrokerError> {
        let log = self.log(channel);
        let log = lock(&log);
        Ok(log.position())
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        // Takes the channel lock, so any publish after this returns reaches the handler.
        lock(&self.log(channel)).subscribed = true;
        Ok(())
    }

    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let unused = {
            let log = self.log(channel);
            let mut log = lock(&log);
            log.subscribed = false;
            log.unused()
        };
        if unused {
            // Back among the channels a reader alone keeps: under the cap again.
            let mut shard = lock(self.shard(channel));
            shard.unused.push_back(channel.clone());
            self.enforce_cap(&mut shard);
        }
        Ok(())
    }

    async fn subscribe_namespace(&self, namespace: &str) -> Result<(), BrokerError> {
        let mut m = self.namespaces.write().unwrap_or_else(|p| p.into_inner());
        *m.entry(namespace.to_string()).or_insert(0) += 1;
        self.namespace_subs.store(m.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn unsubscribe_namespace(&self, namespace: &str) -> Result<(), BrokerError> {
        let mut m = self.namespaces.write().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(namespace) {
            *n -= 1;
            if *n == 0 {
                m.remove(namespace);
            }
        }
        self.namespace_subs.store(m.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Starts the periodic sweep of idle channels for `broker`; stops when the broker is
/// dropped.
pub fn spawn_sweeper(broker: &Arc<MemoryBroker>, every: Duration) -> tokio::task::JoinHandle<()> {
    crate::spawn_periodic(Arc::downgrade(broker), every, |x| x.sweep())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_channels_without_history_are_forgotten_and_get_a_new_epoch() {
        let b = MemoryBroker::new(Duration::from_secs(60));
        let ch = ChannelName::parse("a").unwrap();
        let opts = PublishOptions { history_size: 10, history_ttl: Duration::from_secs(10), ..Default::default() };
        let first = b.publish(&ch, Bytes::from_static(b"1"), &opts).await.unwrap().position;
        tokio::time::advance(Duration::from_secs(30)).await;
        b.sweep();
        assert_eq!(b.channel_count(), 1, "idle, but not for long enough");
        tokio::time::advance(Duration::from_secs(31)).await;
        b.sweep();
        assert_eq!(b.channel_count(), 0);
        let again = b.position(&ch).await.unwrap();
        assert_ne!(again.epoch, first.epoch);
        assert_eq!(again.offset, 0);
    }

    #[tokio::test]
    async fn readers_alone_cannot_grow_the_broker_past_its_cap() {
        let b = MemoryBroker::with_unused_cap(Duration::from_secs(3600), 640);
        for i in 0..100_000 {
            let ch = ChannelName::parse(&format!("probe:{i}")).unwrap();
            b.position(&ch).await.unwrap();
            b.subscribe(&ch).await.unwrap();
            b.unsubscribe(&ch).await.unwrap();
        }
        assert!(b.channel_count() <= 640 + SHARDS, "{} channels kept", b.channel_count());
        assert!(b.forgotten_count() >= 100_000 - 640 - SHARDS as u64);
        // A forgotten channel starts a new epoch: a reader holding the old one is told.
        let ch = ChannelName::parse("probe:0").unwrap();
        let opts = PublishOptions { history_size: 10, history_ttl: Duration::from_secs(60), ..Default::default() };
        b.publish(&ch, Bytes::from_static(b"1"), &opts).await.unwrap();
        let stale = StreamPosition { epoch: new_epoch(), offset: 0 };
        let r = b.history(&ch, HistoryRequest { since: Some(stale), ..Default::default() }).await;
        assert!(matches!(r, Err(BrokerError::PositionLost { .. })));
    }

    #[tokio::test]
    async fn published_and_subscribed_channels_are_never_forgotten_for_the_cap() {
        let b = MemoryBroker::with_unused_cap(Duration::from_secs(3600), 64);
        let opts = PublishOptions { history_size: 10, history_ttl: Duration::from_secs(60), ..Default::default() };
        let kept = ChannelName::parse("kept:published").unwrap();
        let first = b.publish(&kept, Bytes::from_static(b"1"), &opts).await.unwrap().position;
        let watched = ChannelName::parse("kept:subscribed").unwrap();
        b.subscribe(&watched).await.unwrap();
        let watched_at = b.position(&watched).await.unwrap();
        for i in 0..10_000 {
            b.position(&ChannelName::parse(&format!("probe:{i}")).unwrap()).await.unwrap();
        }
        assert_eq!(b.position(&kept).await.unwrap(), first);
        assert_eq!(b.position(&watched).await.unwrap(), watched_at);
    }

    #[tokio::test(start_paused = true)]
    async fn idempotency_keys_expire_in_order_without_scanning() {
        let b = MemoryBroker::default();
        let ch = ChannelName::parse("keys").unwrap();
        let keyed = |k: String| PublishOptions {
            history_size: 10,
            history_ttl: Duration::from_secs(600),
            idempotency_key: Some(k),
            idempotency_window: Duration::from_secs(60),
        };
        for i in 0..1000 {
            b.publish(&ch, Bytes::from_static(b"1"), &keyed(format!("k{i}"))).await.unwrap();
        }
        let held = |b: &MemoryBroker| lock(&b.log(&ch)).keys.len();
        assert_eq!(held(&b), 1000);
        tokio::time::advance(Duration::from_secs(61)).await;
        b.publish(&ch, Bytes::from_static(b"1"), &keyed("fresh".into())).await.unwrap();
        assert_eq!(held(&b), 1, "expired keys are forgotten as publishing goes on");
        assert_eq!(lock(&b.log(&ch)).key_expiry.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn subscribed_channels_are_never_swept() {
        let b = MemoryBroker::new(Duration::from_secs(1));
        let ch = ChannelName::parse("a").unwrap();
        b.subscribe(&ch).await.unwrap();
        let p = b.position(&ch).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        b.sweep();
        assert_eq!(b.position(&ch).await.unwrap(), p);
    }
}
