//! The in-memory broker: one process, no dependencies, the embedded default.
//!
//! Each channel is a [`ChannelLog`] behind its own mutex. `publish` holds that mutex while
//! it numbers the publication, appends it and hands it to the node's handler, which is
//! what makes numbering, history and fan-out one atomic step (guarantee 1 of
//! [`Broker`]). History is lost when the process exits; the next process makes new
//! epochs, so clients holding old positions are told to reset.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, BrokerEventHandler, HistoryRequest, HistoryResult, PublishOptions};
use crate::channel::ChannelName;
use crate::publication::{new_epoch, Epoch, Kind, Publication, StreamPosition};

/// How long an idle channel with no retained history and no node subscription keeps its
/// epoch and top offset before it is forgotten (and starts a new epoch if used again).
pub const DEFAULT_IDLE_CHANNEL_TTL: Duration = Duration::from_secs(3600);

struct Entry {
    publication: Publication,
    expires: Instant,
}

struct ChannelLog {
    epoch: Epoch,
    top: u64,
    history: VecDeque<Entry>,
    /// Idempotency keys seen recently: key → (position, forget after).
    keys: HashMap<String, (StreamPosition, Instant)>,
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
    }

    /// Offset of the oldest retained publication, or `top + 1` when none is retained.
    fn first_retained(&self) -> u64 {
        self.history.front().map_or(self.top + 1, |e| e.publication.offset)
    }
}

/// The embedded broker. See the module docs.
pub struct MemoryBroker {
    channels: Mutex<HashMap<ChannelName, Arc<Mutex<ChannelLog>>>>,
    /// Namespaces this node subscribed to as a whole (wildcards), with reference counts.
    namespaces: std::sync::RwLock<HashMap<String, usize>>,
    namespace_subs: std::sync::atomic::AtomicUsize,
    handler: OnceLock<Arc<dyn BrokerEventHandler>>,
    idle_ttl: Duration,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(DEFAULT_IDLE_CHANNEL_TTL)
    }
}

impl MemoryBroker {
    pub fn new(idle_ttl: Duration) -> Self {
        MemoryBroker {
            channels: Mutex::new(HashMap::new()),
            namespaces: Default::default(),
            namespace_subs: Default::default(),
            handler: OnceLock::new(),
            idle_ttl,
        }
    }

    fn log(&self, channel: &ChannelName) -> Arc<Mutex<ChannelLog>> {
        let mut map = lock(&self.channels);
        map.entry(channel.clone()).or_insert_with(|| Arc::new(Mutex::new(ChannelLog::new(Instant::now())))).clone()
    }

    /// Forgets channels that are idle, hold no history and have no node subscription.
    /// Run periodically by the task started in [`Broker::run`]; public for tests.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut map = lock(&self.channels);
        map.retain(|_, log| {
            let mut log = lock(log);
            if log.subscribed {
                return true;
            }
            log.trim_expired(now);
            !(log.history.is_empty() && now.duration_since(log.last_used) >= self.idle_ttl)
        });
    }

    /// Does this node want `channel`'s publications?
    fn routed(&self, log: &ChannelLog, channel: &ChannelName) -> bool {
        log.subscribed
            || (self.namespace_subs.load(std::sync::atomic::Ordering::Relaxed) > 0
                && self.namespaces.read().unwrap_or_else(|p| p.into_inner()).contains_key(channel.namespace()))
    }

    /// Number of channels the broker currently keeps state for.
    pub fn channel_count(&self) -> usize {
        lock(&self.channels).len()
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

    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        opts: &PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        let log = self.log(channel);
        let now = Instant::now();
        let mut log = lock(&log);
        if let Some(key) = &opts.idempotency_key {
            log.keys.retain(|_, (_, until)| *until > now);
            if let Some((pos, _)) = log.keys.get(key) {
                return Ok(pos.clone());
            }
        }
        log.top += 1;
        log.last_used = now;
        let publication = Publication {
            channel: channel.clone(),
            offset: log.top,
            epoch: log.epoch.clone(),
            data,
            time: crate::now_millis(),
            kind: Kind::Stored,
        };
        log.trim_expired(now);
        if opts.history_size > 0 && !opts.history_ttl.is_zero() {
            log.history.push_back(Entry { publication: publication.clone(), expires: now + opts.history_ttl });
        }
        while log.history.len() > opts.history_size {
            log.history.pop_front();
        }
        let position = log.position();
        if let Some(key) = &opts.idempotency_key {
            log.keys.insert(key.clone(), (position.clone(), now + opts.idempotency_window));
        }
        // Fan out while still holding the channel lock: this is what keeps delivery order
        // equal to offset order when several tasks publish to one channel at once.
        if self.routed(&log, channel) {
            if let Some(handler) = self.handler.get() {
                handler.handle_publication(publication);
            }
        }
        Ok(position)
    }

    async fn publish_volatile(&self, channel: &ChannelName, kind: Kind, data: Bytes) -> Result<(), BrokerError> {
        let log = self.log(channel);
        let log = lock(&log);
        if self.routed(&log, channel) {
            if let Some(handler) = self.handler.get() {
                handler.handle_publication(Publication {
                    channel: channel.clone(),
                    offset: 0,
                    epoch: log.epoch.clone(),
                    data,
                    time: crate::now_millis(),
                    kind,
                });
            }
        }
        Ok(())
    }

    async fn history(&self, channel: &ChannelName, req: HistoryRequest) -> Result<HistoryResult, BrokerError> {
        let log = self.log(channel);
        let mut log = lock(&log);
        log.trim_expired(Instant::now());
        let position = log.position();
        let publications: Vec<Publication> = match &req.since {
            Some(since) => {
                let continuous =
                    since.epoch == log.epoch && since.offset <= log.top && since.offset + 1 >= log.first_retained();
                if !continuous {
                    return Err(BrokerError::PositionLost { current: position });
                }
                let skip = log.history.iter().take_while(|e| e.publication.offset <= since.offset).count();
                let take = req.limit.unwrap_or(usize::MAX);
                log.history.iter().skip(skip).take(take).map(|e| e.publication.clone()).collect()
            }
            None => {
                let len = log.history.len();
                let take = req.limit.unwrap_or(len).min(len);
                let skip = if req.latest { len - take } else { 0 };
                log.history.iter().skip(skip).take(take).map(|e| e.publication.clone()).collect()
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
        lock(&self.log(channel)).subscribed = false;
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
        let first = b.publish(&ch, Bytes::from_static(b"1"), &opts).await.unwrap();
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
