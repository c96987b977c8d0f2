//! The backplane contract.
//!
//! A [`Broker`] owns every channel's log: it numbers publications, keeps their history and
//! delivers them to the nodes that subscribed to the channel. The in-memory broker is the
//! embedded default; Redis and NATS implementations live in their own crates. All of them
//! pass the suite in [`crate::contract`], which is this doc comment turned into tests.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::channel::ChannelName;
use crate::publication::{Delivery, Epoch, Kind, Publication, Published, StreamPosition};

/// How a publication is stored. Comes from the channel's namespace options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOptions {
    /// Keep at most this many publications. 0 keeps none (live-only channel).
    pub history_size: usize,
    /// Drop publications older than this. `Duration::ZERO` keeps none.
    pub history_ttl: Duration,
    /// Idempotency key: a publish repeating a key seen on the channel within
    /// `idempotency_window` publishes nothing and returns the first one's position.
    pub idempotency_key: Option<String>,
    pub idempotency_window: Duration,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            idempotency_key: None,
            idempotency_window: Duration::from_secs(300),
        }
    }
}

/// What to read from a channel's history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryRequest {
    /// Return only publications after this position. If the position cannot be continued
    /// without a gap the broker answers [`BrokerError::PositionLost`].
    pub since: Option<StreamPosition>,
    /// At most this many publications (`None`: all retained).
    pub limit: Option<usize>,
    /// With `limit`, take the newest `limit` publications instead of the oldest ones
    /// (still returned in ascending offset order). Ignored when `since` is set.
    pub latest: bool,
}

/// The answer to a history read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryResult {
    /// Publications in strictly ascending offset order, all of the current epoch — as
    /// shared deliveries, so a broker that keeps them (the in-memory one) hands every
    /// resuming subscriber the same encoded bytes.
    pub publications: Vec<Arc<Delivery>>,
    /// The channel's current top: its epoch and the offset of its latest publication.
    pub position: StreamPosition,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The position given to `history` is from another epoch, or so old that some
    /// publications after it are no longer retained. `current` is where the channel is now.
    #[error("position lost; the channel is now at {}:{}", current.epoch, current.offset)]
    PositionLost { current: StreamPosition },
    /// The backing store cannot be reached (Redis down, …). Retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The durable broker cannot write its journal: the disk is full (or failing). The
    /// publication was not stored.
    #[error("storage full: {0}")]
    StorageFull(String),
}

/// Receives what the broker delivers to this node.
pub trait BrokerEventHandler: Send + Sync + 'static {
    /// A publication on a channel this node subscribed to. For each channel, calls come
    /// one at a time in strictly ascending offset order (within an epoch). Must not block.
    fn handle_publication(&self, delivery: Arc<Delivery>);

    /// A control message another node sent with [`Broker::publish_control`]. Must not
    /// block.
    fn handle_control(&self, _message: Bytes) {}
}

/// A node of the cluster, as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Where it serves clients.
    pub address: String,
    /// Open streaming connections.
    pub connections: usize,
    /// Seconds since the Unix epoch when it started.
    pub started: u64,
}

/// The backplane. Its guarantees, per channel:
///
/// 1. **Atomic numbering.** `publish` assigns the next offset (the first publication of
///    an epoch has offset 1, then +1 each time: no gaps, no repeats, even with concurrent
///    publishers on many nodes), appends the publication to history and fans it out to
///    subscribed nodes as one atomic step. Publications reach each subscribed node's
///    handler in offset order, and in the same order history returns them.
/// 2. **Epochs.** A channel's history lives in one epoch. When the broker loses it
///    (restart of a memory broker, eviction of a Redis key) the channel starts a new epoch
///    at offset 0. A channel never seen before is at `(new epoch, 0)`; asking for its
///    position creates that epoch, so a later publish continues it. (To bound what
///    readers alone can make it hold, a broker may forget the epoch of a channel that
///    nothing was published to and no node subscribes to; its next use starts a new
///    epoch, which a client holding the old one is told about like any other.)
/// 3. **Bounded history.** At most `history_size` publications, none older than
///    `history_ttl`, both taken from the options of the latest publish. Offsets survive
///    history expiry: an empty history still knows its top offset and epoch.
/// 4. **Honest resume.** `history` with `since = (epoch, offset)` returns exactly the
///    publications after `offset` if every one of them is still retained and `epoch` is
///    current; `since` at the top returns an empty list. Otherwise it fails with
///    [`BrokerError::PositionLost`] carrying the current position — never a silent gap.
/// 5. **Idempotency.** A publish whose `idempotency_key` was used on the same channel
///    within `idempotency_window` is not published again: it returns the original
///    position (retrying publishers get at-least-once delivery with exactly-once effect).
/// 6. **Volatile.** `publish_volatile` reaches subscribed nodes like a publication but
///    takes no offset and is never stored.
/// 7. **Node subscriptions.** `subscribe` returns once publications on the channel are
///    guaranteed to reach this node's handler; the hub calls it before reading history,
///    which is what makes subscribe-then-recover race-free. Calls for one channel are
///    never concurrent (the hub serialises them).
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Starts delivering to `handler`. Called once, before any subscribe.
    async fn run(&self, handler: Arc<dyn BrokerEventHandler>) -> Result<(), BrokerError>;

    /// Publishes `data` (JSON text) and returns the position it was given — or, when
    /// `opts.idempotency_key` was used on the channel within its window, publishes nothing
    /// and returns the first publication's position as a duplicate.
    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        opts: &PublishOptions,
    ) -> Result<Published, BrokerError>;

    /// Delivers a non-stored publication (volatile, join, leave) to subscribed nodes.
    async fn publish_volatile(&self, channel: &ChannelName, kind: Kind, data: Bytes) -> Result<(), BrokerError>;

    /// Reads history; see guarantee 4.
    async fn history(&self, channel: &ChannelName, req: HistoryRequest) -> Result<HistoryResult, BrokerError>;

    /// The channel's current position (creating its epoch if the channel is new).
    async fn position(&self, channel: &ChannelName) -> Result<StreamPosition, BrokerError>;

    /// Starts delivering the channel's publications to this node.
    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// Stops delivering the channel's publications to this node.
    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// Starts delivering every publication of a namespace to this node (for wildcard
    /// subscriptions). Same guarantees as `subscribe`, per channel.
    async fn subscribe_namespace(&self, namespace: &str) -> Result<(), BrokerError>;

    async fn unsubscribe_namespace(&self, namespace: &str) -> Result<(), BrokerError>;

    /// Channel state held in this process, for metrics: channels kept, and unused
    /// channels forgotten to stay within a cap. `None` for brokers that keep channel
    /// state elsewhere.
    fn memory_stats(&self) -> Option<(usize, u64)> {
        None
    }

    /// Is the backing store reachable right now? (Readiness probes.)
    async fn ready(&self) -> bool {
        true
    }

    // Cluster hooks. A single-node broker keeps the defaults.

    /// Sends a control message (disconnect a user, revoke a token) to every other node.
    async fn publish_control(&self, _message: Bytes) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Registers or refreshes this node, with its active channels and their local
    /// subscriber counts; the entry lapses after `ttl` without a refresh.
    async fn heartbeat(
        &self,
        _node: &NodeInfo,
        _channels: &[(String, usize)],
        _ttl: Duration,
    ) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Live nodes (`None`: this broker has no cluster; the caller is the only node).
    async fn nodes(&self) -> Result<Option<Vec<NodeInfo>>, BrokerError> {
        Ok(None)
    }

    /// Active channels summed over live nodes (`None`: no cluster).
    async fn cluster_channels(&self) -> Result<Option<Vec<(String, usize)>>, BrokerError> {
        Ok(None)
    }

    /// Keeps a revocation (`key` names a token id or a user) in force until `until_ms`
    /// (Unix milliseconds) where every node finds it — also one that starts later, or
    /// missed the broadcast. A single node keeps its own.
    async fn save_revocation(&self, _key: &str, _until_ms: u64) -> Result<(), BrokerError> {
        Ok(())
    }

    /// The revocations kept by [`Broker::save_revocation`] that are still in force:
    /// `(key, until_ms)`.
    async fn revocations(&self) -> Result<Vec<(String, u64)>, BrokerError> {
        Ok(Vec::new())
    }

    /// Claims these publications of `channel` for `owner` (a shared subscription's group
    /// and filter) on this node: `true` for each one no other node claimed for `owner`
    /// within `ttl` — so that of the nodes where a group has members, exactly one
    /// delivers each publication. A single node claims everything.
    async fn claim(
        &self,
        _channel: &ChannelName,
        _owner: &str,
        positions: &[StreamPosition],
        _ttl: Duration,
    ) -> Result<Vec<bool>, BrokerError> {
        Ok(vec![true; positions.len()])
    }
}

/// For a broker whose link to the nodes can drop messages (Redis Pub/Sub, core NATS): per
/// channel a node subscribed to exactly, the last offset handed to it — a duplicate is
/// dropped, and a gap is filled from history before the publication that showed it.
#[derive(Default)]
pub struct InOrder {
    last: Mutex<HashMap<String, (Epoch, u64)>>,
}

impl InOrder {
    fn last(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Epoch, u64)>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the stored publication `p` to `handler` in offset order. `history` reads the
    /// channel's publications after a position (a broker's `history` with `since`).
    pub async fn deliver<F, Fut>(&self, p: Publication, handler: &dyn BrokerEventHandler, history: F)
    where
        F: Fn(StreamPosition) -> Fut,
        Fut: Future<Output = Result<HistoryResult, BrokerError>>,
    {
        let key = p.channel.as_str().to_string();
        let last = self.last().get(&key).cloned();
        if let Some((epoch, offset)) = last {
            if *epoch == *p.epoch {
                if p.offset <= offset {
                    return;
                }
                if p.offset > offset + 1 {
                    self.refill(&key, handler, history).await;
                    if self.last().get(&key).is_some_and(|(_, o)| *o >= p.offset) {
                        return;
                    }
                }
            }
        }
        self.last().insert(key, (p.epoch.clone(), p.offset));
        handler.handle_publication(Delivery::new(p));
    }

    /// Hands `handler` what history holds after the last offset handed on `channel` (after
    /// a reconnect, or a gap).
    pub async fn refill<F, Fut>(&self, channel: &str, handler: &dyn BrokerEventHandler, history: F)
    where
        F: Fn(StreamPosition) -> Fut,
        Fut: Future<Output = Result<HistoryResult, BrokerError>>,
    {
        let Some((epoch, offset)) = self.last().get(channel).cloned() else { return };
        match history(StreamPosition { epoch, offset }).await {
            Ok(h) => {
                if let Some(last) = h.publications.last() {
                    self.last().insert(channel.to_string(), (last.publication.epoch.clone(), last.publication.offset));
                }
                for p in h.publications {
                    handler.handle_publication(p);
                }
            }
            // History gone too: the next live publication shows the hub the gap, and
            // subscribers get an explicit reset — never a silent one.
            Err(_) => self.forget(channel),
        }
    }

    /// The node no longer subscribes to `channel`.
    pub fn forget(&self, channel: &str) {
        self.last().remove(channel);
    }
}
