//! [`RedisBroker`]: the [`Broker`] contract over Redis.
//!
//! Keys, under the configured prefix `P`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:m:{<channel>}` | hash | `e` epoch, `o` top offset; expires when the channel idles |
//! | `P:s:{<channel>}` | stream | history: entry id `<offset>-0`, fields `d` data, `t` time, `x` expiry |
//! | `P:k:{<channel>}:<key>` | string | an idempotency key's `epoch:offset`, for the window |
//! | `P:p:{<channel>}` | pub/sub | `<kind>\n<epoch>\n<offset>\n<time ms>\n<data>` |
//! | `P:control` | pub/sub | `<node id>\n<message>` |
//! | `P:nodes`, `P:node:<id>`, `P:node:<id>:ch` | zset, string, hash | live nodes and their channels |
//!
//! A channel's keys carry it as a hash tag (`{…}`: channel names cannot contain braces), so
//! they live in one Redis Cluster slot — what a script touching them all needs there.
//!
//! **Redis Cluster** (`cluster: true`, the seed nodes comma-separated in `url`): the same
//! keys and scripts, routed by slot (the client follows `MOVED`/`ASK`); publications go out
//! on the channel's shard (`SPUBLISH P:p:{<channel>}`, nodes `SSUBSCRIBE` — Redis ≥ 7), so
//! a publication costs only the shard that owns the channel. Wildcard (namespace)
//! subscriptions have no sharded form: a node subscribing to a namespace marks it in one
//! sorted set per slot (`P:w:{<slot tag>}:<ns>`, node → expiry), which the publish script of
//! any channel reads in its own slot; while a mark is live the script also `PUBLISH`es the
//! publication (prefixed with its channel) on `P:n:<ns>`, which reaches every node.
//!
//! When `P:m:{<channel>}` is gone (evicted, expired) the next use starts a new epoch and
//! drops the stale stream: clients holding old positions are told to reset.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::{AsyncCommands, Script};
use switchboard_core::broker::{
    Broker, BrokerError, BrokerEventHandler, HistoryRequest, HistoryResult, InOrder, NodeInfo, PublishOptions,
};
use switchboard_core::publication::new_epoch;
use switchboard_core::{ChannelName, Delivery, Kind, Publication, Published, StreamPosition};
use tokio::sync::{mpsc, oneshot};

use crate::conn::{slot_of, slot_tag, Conn, LazyCluster, Target, SLOTS};
use crate::scripts;

/// How to reach Redis and where to keep keys.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Key prefix; clusters sharing one Redis use different prefixes.
    pub prefix: String,
    /// How long an idle channel keeps its epoch and top offset.
    pub idle_channel_ttl: Duration,
    /// `url` names the seed nodes of a Redis Cluster (comma-separated).
    pub cluster: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "sb".into(),
            idle_channel_ttl: Duration::from_secs(3600),
            cluster: false,
        }
    }
}

/// The Pub/Sub messages and confirmations a Redis Cluster connection receives.
type Pushes = mpsc::UnboundedReceiver<redis::PushInfo>;

enum SubCmd {
    Subscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    PSubscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    PUnsubscribe(String, oneshot::Sender<Result<(), BrokerError>>),
}

struct Inner {
    cfg: RedisConfig,
    /// Single Redis: the client of the Pub/Sub connection.
    client: Option<redis::Client>,
    conn: Conn,
    /// Redis Cluster: the connection whose subscriptions the cluster client keeps (and
    /// restores after reconnects and failovers), and where its pushes arrive.
    sharded: Option<(Arc<LazyCluster>, Mutex<Option<Pushes>>)>,
    node_id: String,
    handler: OnceLock<Arc<dyn BrokerEventHandler>>,
    /// Single Redis: the Pub/Sub connections' command queues; a channel is always on the
    /// same one ([`RedisBroker::lane`]), namespaces and control on the first.
    cmds: Vec<mpsc::UnboundedSender<SubCmd>>,
    cmd_rx: Mutex<Vec<mpsc::UnboundedReceiver<SubCmd>>>,
    /// Channels and namespaces this node wants, restored after a reconnect.
    wanted: Mutex<Wanted>,
    /// Exactly-subscribed channels' last offsets delivered: duplicates are dropped and gaps
    /// are refilled from history.
    in_order: InOrder,
    /// Pub/Sub connections up (all of them: ready).
    pubsub_up: AtomicUsize,
    /// The channel counts the last heartbeat wrote, and how many heartbeats ago the hash
    /// was last written whole (`None`: write it whole next).
    registered: Mutex<Option<(HashMap<String, usize>, u32)>>,
    publish: Script,
    history: Script,
    volatile: Script,
}

#[derive(Default)]
struct Wanted {
    channels: HashSet<String>,
    namespaces: HashSet<String>,
}

/// The Redis broker. Cheap to clone.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

/// Most subscription commands applied together (one `SUBSCRIBE` per run of subscribes).
const SUBSCRIBE_BATCH: usize = 500;

/// Pub/Sub connections per node to a single Redis, channels spread over them: a busy
/// node's subscription commands and messages are not all queued behind one socket.
const PUBSUB_CONNECTIONS: usize = 4;

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisBroker {
    /// Creates the broker without connecting: commands connect lazily, and the Pub/Sub
    /// connection is kept up by a task started in [`Broker::run`] — a node starts (and
    /// stays up) while Redis is down, reporting not-ready.
    pub fn new(cfg: RedisConfig, node_id: &str) -> Result<RedisBroker, BrokerError> {
        let target = Target { url: cfg.url.clone(), cluster: cfg.cluster };
        let conn = Conn::open(&target)?;
        let (client, sharded) = if cfg.cluster {
            let (push_tx, push_rx) = mpsc::unbounded_channel();
            (None, Some((Conn::cluster_with_push(&target, push_tx)?, Mutex::new(Some(push_rx)))))
        } else {
            let client =
                redis::Client::open(cfg.url.as_str()).map_err(|e| unavailable(format!("bad redis url: {e}")))?;
            (Some(client), None)
        };
        let (cmds, cmd_rx): (Vec<_>, Vec<_>) = (0..PUBSUB_CONNECTIONS).map(|_| mpsc::unbounded_channel()).unzip();
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                cfg,
                client,
                conn,
                sharded,
                node_id: node_id.to_string(),
                handler: OnceLock::new(),
                cmds,
                cmd_rx: Mutex::new(cmd_rx),
                wanted: Mutex::default(),
                in_order: InOrder::default(),
                pubsub_up: Default::default(),
                registered: Mutex::default(),
                publish: Script::new(scripts::PUBLISH),
                history: Script::new(scripts::HISTORY),
                volatile: Script::new(scripts::VOLATILE),
            }),
        })
    }

    /// `P:<kind>:{<channel>}`: the channel is the key's hash tag.
    fn key(&self, kind: &str, channel: &str) -> String {
        format!("{}:{kind}:{{{channel}}}", self.inner.cfg.prefix)
    }

    fn pubsub_channel(&self, channel: &str) -> String {
        self.key("p", channel)
    }

    fn meta_ttl(&self) -> u64 {
        self.inner.cfg.idle_channel_ttl.as_secs().max(1)
    }

    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// Redis Cluster: the sorted set in `channel`'s slot where nodes mark the channel's
    /// namespace as wanted by a wildcard subscription.
    fn wildcard_mark(&self, channel: &str) -> String {
        let slot = slot_of(&format!("{{{channel}}}"));
        self.mark_in_slot(slot, switchboard_core::channel::namespace_of(channel))
    }

    fn mark_in_slot(&self, slot: usize, namespace: &str) -> String {
        format!("{}:w:{{{}}}:{namespace}", self.inner.cfg.prefix, slot_tag(slot))
    }

    /// Redis Cluster: the (unsharded, cluster-wide) Pub/Sub channel of a namespace's
    /// wildcard subscribers.
    fn namespace_channel(&self, namespace: &str) -> String {
        format!("{}:n:{namespace}", self.inner.cfg.prefix)
    }

    async fn run_history(
        &self,
        channel: &ChannelName,
        since: Option<&StreamPosition>,
        limit: i64,
        latest: bool,
    ) -> Result<HistoryResult, BrokerError> {
        let mut conn = self.conn();
        let reply: Vec<redis::Value> = self
            .inner
            .history
            .key(self.key("m", channel.as_str()))
            .key(self.key("s", channel.as_str()))
            .arg(since.map_or("", |s| &*s.epoch))
            .arg(since.map_or(0, |s| s.offset))
            .arg(limit)
            .arg(if latest { 1 } else { 0 })
            .arg(&*new_epoch())
            .arg(self.meta_ttl())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let s = |i: usize| -> Result<String, BrokerError> {
            match reply.get(i) {
                Some(v) => redis::from_redis_value_ref::<String>(v).map_err(unavailable),
                None => Err(unavailable("short history reply")),
            }
        };
        let status = s(0)?;
        let epoch: Arc<str> = Arc::from(s(1)?);
        let top: u64 = s(2)?.parse().map_err(unavailable)?;
        let position = StreamPosition { epoch: epoch.clone(), offset: top };
        if status == "lost" {
            return Err(BrokerError::PositionLost { current: position });
        }
        let mut publications = Vec::with_capacity((reply.len() - 3) / 3);
        let mut i = 3;
        while i + 2 < reply.len() {
            let offset: u64 = s(i)?.parse().map_err(unavailable)?;
            let time: u64 = s(i + 1)?.parse().map_err(unavailable)?;
            let data: Vec<u8> = redis::from_redis_value_ref(&reply[i + 2]).map_err(unavailable)?;
            let (data, meta) = switchboard_core::Meta::split(Bytes::from(data));
            publications.push(Delivery::new(Publication {
                channel: channel.clone(),
                offset,
                epoch: epoch.clone(),
                data,
                time,
                kind: Kind::Stored,
                meta,
            }));
            i += 3;
        }
        Ok(HistoryResult { publications, position })
    }

    /// The Pub/Sub connection a channel's subscription lives on (`None`: namespaces and
    /// control, on the first).
    fn lane(channel: Option<&str>) -> usize {
        use std::hash::{Hash, Hasher};
        let Some(ch) = channel else { return 0 };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ch.hash(&mut h);
        h.finish() as usize % PUBSUB_CONNECTIONS
    }

    async fn request(
        &self,
        channel: Option<&str>,
        make: impl FnOnce(oneshot::Sender<Result<(), BrokerError>>) -> SubCmd,
    ) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.inner.cmds[Self::lane(channel)].send(make(tx)).map_err(|_| unavailable("pub/sub task stopped"))?;
        rx.await.map_err(|_| unavailable("pub/sub task stopped"))?
    }
}

/// Parses a Pub/Sub payload: `<kind>\n<epoch>\n<offset>\n<time>\n<data>`.
fn parse_message(channel: ChannelName, payload: &[u8]) -> Option<Publication> {
    let mut parts = payload.splitn(5, |b| *b == b'\n');
    let kind = match parts.next()? {
        b"S" => Kind::Stored,
        b"V" => Kind::Volatile,
        b"J" => Kind::Join,
        b"L" => Kind::Leave,
        _ => return None,
    };
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let offset = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let time = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let (data, meta) = switchboard_core::Meta::split(Bytes::copy_from_slice(parts.next()?));
    Some(Publication { channel, offset, epoch: Arc::from(epoch), data, time, kind, meta })
}

impl RedisBroker {
    /// Keeps the Pub/Sub connection up: connect, (re)subscribe everything wanted, refill
    /// what a reconnect may have missed, then deliver messages and apply subscription
    /// changes until the connection drops; back off (full jitter) and start over.
    ///
    /// Connection `lane` carries the channels [`RedisBroker::lane`] puts on it; the first
    /// also the namespaces and the control channel.
    async fn pubsub_loop(self, lane: usize, mut cmds: mpsc::UnboundedReceiver<SubCmd>, dispatch: Dispatch) {
        let mut attempt: u32 = 0;
        // Commands a lost connection left untried: the next connection's first work.
        let mut carried: Vec<SubCmd> = Vec::new();
        let prefix_p = format!("{}:p:{{", self.inner.cfg.prefix);
        let control = format!("{}:control", self.inner.cfg.prefix);
        loop {
            let session = async {
                let client = self.inner.client.as_ref().expect("a single Redis has its client");
                let ps = tokio::time::timeout(Duration::from_secs(3), client.get_async_pubsub())
                    .await
                    .map_err(|_| unavailable("connect timeout"))?
                    .map_err(unavailable)?;
                let (mut sink, stream) = ps.split();
                if lane == 0 {
                    sink.subscribe(&control).await.map_err(unavailable)?;
                }
                let (channels, namespaces) = {
                    let w = lock(&self.inner.wanted);
                    let mine = w.channels.iter().filter(|c| Self::lane(Some(c)) == lane).cloned().collect::<Vec<_>>();
                    let namespaces = if lane == 0 { w.namespaces.iter().cloned().collect() } else { Vec::new() };
                    (mine, namespaces)
                };
                for batch in channels.chunks(500) {
                    let keys: Vec<String> = batch.iter().map(|c| self.pubsub_channel(c)).collect();
                    sink.subscribe(&keys).await.map_err(unavailable)?;
                }
                for ns in &namespaces {
                    sink.psubscribe(format!("{prefix_p}{ns}:*")).await.map_err(unavailable)?;
                }
                Ok::<_, BrokerError>((sink, stream, channels))
            };
            let (mut sink, mut stream, resubscribed) = match session.await {
                Ok(x) => x,
                Err(e) => {
                    // While down, refuse subscription requests (the caller reports
                    // broker_unavailable) rather than queue them without bound.
                    for cmd in carried.drain(..) {
                        self.refuse(cmd, &e);
                    }
                    while let Ok(cmd) = cmds.try_recv() {
                        self.refuse(cmd, &e);
                    }
                    attempt = attempt.saturating_add(1);
                    let cap = Duration::from_millis(100 * 2u64.saturating_pow(attempt.min(6)));
                    let sleep = Duration::from_millis(fastrand::u64(0..=cap.as_millis() as u64).max(50));
                    tracing::warn!("redis pub/sub unavailable ({e}); retrying in {sleep:?}");
                    tokio::time::sleep(sleep).await;
                    continue;
                }
            };
            if attempt > 0 {
                tracing::info!("redis pub/sub reconnected; resubscribed {} channels", resubscribed.len());
            }
            attempt = 0;
            self.inner.pubsub_up.fetch_add(1, Ordering::SeqCst);
            // Anything published while we were away is in the streams: refill it.
            for ch in resubscribed {
                dispatch.send(Work::Refill(ch));
            }
            let untried = std::mem::take(&mut carried);
            if !untried.is_empty() {
                if let Err((e, rest)) = self.apply_all(&mut sink, untried).await {
                    tracing::warn!("redis pub/sub command failed: {e}");
                    carried = rest;
                    self.inner.pubsub_up.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
            }
            loop {
                tokio::select! {
                    msg = stream.next() => {
                        let Some(msg) = msg else { break };
                        let name = msg.get_channel_name().to_string();
                        if name == control {
                            self.on_control(msg.get_payload_bytes());
                            continue;
                        }
                        let Some(ch) = name.strip_prefix(&prefix_p).and_then(|c| c.strip_suffix('}')) else { continue };
                        if msg.from_pattern() && lock(&self.inner.wanted).channels.contains(ch) {
                            // Delivered by the exact subscription too: once is enough.
                            continue;
                        }
                        let Ok(channel) = ChannelName::parse(ch) else { continue };
                        if let Some(p) = parse_message(channel, msg.get_payload_bytes()) {
                            dispatch.send(Work::Deliver(p));
                        }
                    }
                    cmd = cmds.recv() => {
                        let Some(cmd) = cmd else { return };
                        // What queued up meanwhile goes with it: a run of subscribes is one
                        // SUBSCRIBE of many channels (one round trip for a reconnect storm).
                        let mut batch = vec![cmd];
                        while batch.len() < SUBSCRIBE_BATCH {
                            match cmds.try_recv() {
                                Ok(cmd) => batch.push(cmd),
                                Err(_) => break,
                            }
                        }
                        if let Err((e, untried)) = self.apply_all(&mut sink, batch).await {
                            tracing::warn!("redis pub/sub command failed: {e}");
                            carried = untried;
                            break;
                        }
                    }
                }
            }
            self.inner.pubsub_up.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("redis pub/sub connection lost; reconnecting");
        }
    }

    fn refuse(&self, cmd: SubCmd, e: &BrokerError) {
        match cmd {
            SubCmd::Subscribe(ch, tx) => {
                lock(&self.inner.wanted).channels.remove(&ch);
                let _ = tx.send(Err(e.clone()));
            }
            SubCmd::PSubscribe(ns, tx) => {
                lock(&self.inner.wanted).namespaces.remove(&ns);
                let _ = tx.send(Err(e.clone()));
            }
            SubCmd::Unsubscribe(ch, tx) => {
                lock(&self.inner.wanted).channels.remove(&ch);
                self.inner.in_order.forget(&ch);
                let _ = tx.send(Ok(()));
            }
            SubCmd::PUnsubscribe(ns, tx) => {
                lock(&self.inner.wanted).namespaces.remove(&ns);
                let _ = tx.send(Ok(()));
            }
        }
    }

    /// Applies queued commands in order, each run of subscribes as one `SUBSCRIBE` and each
    /// run of unsubscribes as one `UNSUBSCRIBE`. On a failure (the connection is going) the
    /// failed ones are answered with the error and the ones not tried yet are handed back,
    /// for the next connection.
    async fn apply_all(
        &self,
        sink: &mut redis::aio::PubSubSink,
        batch: Vec<SubCmd>,
    ) -> Result<(), (BrokerError, Vec<SubCmd>)> {
        type Reply = oneshot::Sender<Result<(), BrokerError>>;
        let mut cmds = batch.into_iter().peekable();
        while let Some(cmd) = cmds.next() {
            let subscribing = matches!(cmd, SubCmd::Subscribe(..));
            let (first, tx) = match cmd {
                SubCmd::Subscribe(ch, tx) | SubCmd::Unsubscribe(ch, tx) => (ch, tx),
                other => {
                    if let Err(e) = self.apply(sink, other).await {
                        return Err((e, cmds.collect()));
                    }
                    continue;
                }
            };
            let mut run: Vec<(String, Reply)> = vec![(first, tx)];
            while let Some(next) = cmds.next_if(|c| {
                matches!((subscribing, c), (true, SubCmd::Subscribe(..)) | (false, SubCmd::Unsubscribe(..)))
            }) {
                if let SubCmd::Subscribe(ch, tx) | SubCmd::Unsubscribe(ch, tx) = next {
                    run.push((ch, tx));
                }
            }
            let keys: Vec<String> = run.iter().map(|(c, _)| self.pubsub_channel(c)).collect();
            let r = if subscribing {
                lock(&self.inner.wanted).channels.extend(run.iter().map(|(c, _)| c.clone()));
                let r = sink.subscribe(&keys).await.map_err(unavailable);
                if r.is_err() {
                    let mut wanted = lock(&self.inner.wanted);
                    for (c, _) in &run {
                        wanted.channels.remove(c);
                    }
                }
                for (_, tx) in run {
                    let _ = tx.send(r.clone());
                }
                r
            } else {
                for (c, _) in &run {
                    lock(&self.inner.wanted).channels.remove(c);
                    self.inner.in_order.forget(c);
                }
                // Unsubscribed either way: a connection that fails here takes them all.
                for (_, tx) in run {
                    let _ = tx.send(Ok(()));
                }
                sink.unsubscribe(&keys).await.map_err(unavailable)
            };
            if let Err(e) = r {
                return Err((e, cmds.collect()));
            }
        }
        Ok(())
    }

    async fn apply(&self, sink: &mut redis::aio::PubSubSink, cmd: SubCmd) -> Result<(), BrokerError> {
        let prefix_p = format!("{}:p:{{", self.inner.cfg.prefix);
        match cmd {
            SubCmd::Subscribe(ch, tx) => {
                lock(&self.inner.wanted).channels.insert(ch.clone());
                let r = sink.subscribe(self.pubsub_channel(&ch)).await.map_err(unavailable);
                if r.is_err() {
                    lock(&self.inner.wanted).channels.remove(&ch);
                }
                let failed = r.clone().err();
                let _ = tx.send(r);
                failed.map_or(Ok(()), Err)
            }
            SubCmd::Unsubscribe(ch, tx) => {
                lock(&self.inner.wanted).channels.remove(&ch);
                self.inner.in_order.forget(&ch);
                let r = sink.unsubscribe(self.pubsub_channel(&ch)).await.map_err(unavailable);
                let _ = tx.send(Ok(()));
                r
            }
            SubCmd::PSubscribe(ns, tx) => {
                lock(&self.inner.wanted).namespaces.insert(ns.clone());
                let r = sink.psubscribe(format!("{prefix_p}{ns}:*")).await.map_err(unavailable);
                if r.is_err() {
                    lock(&self.inner.wanted).namespaces.remove(&ns);
                }
                let failed = r.clone().err();
                let _ = tx.send(r);
                failed.map_or(Ok(()), Err)
            }
            SubCmd::PUnsubscribe(ns, tx) => {
                lock(&self.inner.wanted).namespaces.remove(&ns);
                let r = sink.punsubscribe(format!("{prefix_p}{ns}:*")).await.map_err(unavailable);
                let _ = tx.send(Ok(()));
                r
            }
        }
    }

    fn on_control(&self, payload: &[u8]) {
        let Some(i) = payload.iter().position(|b| *b == b'\n') else { return };
        if &payload[..i] == self.inner.node_id.as_bytes() {
            return; // our own message: already handled locally
        }
        if let Some(h) = self.inner.handler.get() {
            h.handle_control(Bytes::copy_from_slice(&payload[i + 1..]));
        }
    }

    /// Hands a publication to the node, in offset order (see [`InOrder`]).
    async fn deliver(&self, p: Publication) {
        let Some(handler) = self.inner.handler.get().cloned() else { return };
        if p.kind != Kind::Stored || !lock(&self.inner.wanted).channels.contains(p.channel.as_str()) {
            handler.handle_publication(Delivery::new(p));
            return;
        }
        let channel = p.channel.clone();
        let history = |since| self.after(&channel, since);
        self.inner.in_order.deliver(p, &*handler, history).await;
    }

    /// Delivers what the stream holds after the last offset delivered on `channel`.
    async fn refill(&self, channel: &str) {
        let Some(handler) = self.inner.handler.get().cloned() else { return };
        let Ok(name) = ChannelName::parse(channel) else { return };
        self.inner.in_order.refill(channel, &*handler, |since| self.after(&name, since)).await;
    }

    async fn after(&self, channel: &ChannelName, since: StreamPosition) -> Result<HistoryResult, BrokerError> {
        self.run_history(channel, Some(&since), 0, false).await
    }
}

/// What a node's dispatchers do, one channel always on the same one (so a channel's
/// publications stay in order while channels spread over the workers).
enum Work {
    Deliver(Publication),
    /// The cluster client subscribed the channel again (a reconnect, a failover, a slot
    /// moved): deliver what was published meanwhile.
    Refill(String),
}

#[derive(Clone)]
struct Dispatch {
    queues: Vec<mpsc::UnboundedSender<Work>>,
}

impl Dispatch {
    fn send(&self, w: Work) {
        use std::hash::{Hash, Hasher};
        let ch = match &w {
            Work::Deliver(p) => p.channel.as_str(),
            Work::Refill(ch) => ch.as_str(),
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ch.hash(&mut h);
        let _ = self.queues[h.finish() as usize % self.queues.len()].send(w);
    }
}

/// A wildcard mark lasts this long unless its node renews it (every third of it).
const MARK_TTL: Duration = Duration::from_secs(3600);

impl RedisBroker {
    /// Redis Cluster: the control subscription (retried until the cluster answers), the
    /// dispatchers, the task reading the cluster client's pushes, and the wildcard marks'
    /// renewal.
    /// The dispatchers: one task per core (at most 8), each channel always on the same
    /// one — publications of different channels are handed to the hub in parallel, those
    /// of one channel in order.
    fn dispatchers(&self) -> Dispatch {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
        let mut queues = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, mut rx) = mpsc::unbounded_channel::<Work>();
            queues.push(tx);
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(w) = rx.recv().await {
                    match w {
                        Work::Deliver(p) => me.deliver(p).await,
                        Work::Refill(ch) => me.refill(&ch).await,
                    }
                }
            });
        }
        Dispatch { queues }
    }

    fn start_sharded(self, mut push: mpsc::UnboundedReceiver<redis::PushInfo>) {
        let queues = self.dispatchers();
        // After a lost connection to a cluster node: the cluster client learns where the
        // node's slots went (a replica promoted) only from a command that fails — and this
        // connection sends none but (un)subscribes. So ask it, for the wanted channels, until
        // each answer comes: by then it has refreshed its slot map and moved the
        // subscriptions (each confirmation then refills its channel).
        let repair = Arc::new(tokio::sync::Notify::new());
        {
            let (me, repair) = (self.clone(), repair.clone());
            tokio::spawn(async move {
                let Some((cluster, _)) = &me.inner.sharded else { return };
                loop {
                    repair.notified().await;
                    tracing::warn!(
                        "lost a Redis Cluster node's connection; moving subscriptions where their slots are now"
                    );
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
                    while tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let (channels, namespaces): (Vec<String>, Vec<String>) = {
                            let w = lock(&me.inner.wanted);
                            (w.channels.iter().cloned().collect(), w.namespaces.iter().cloned().collect())
                        };
                        let Ok(mut c) = cluster.get().await else { continue };
                        // The plain subscriptions (control, namespaces) are the client's to
                        // move, by their names' slots, once it has refreshed its map: a
                        // command on each name's slot is what makes it.
                        let mut plain = vec![format!("{}:control", me.inner.cfg.prefix)];
                        plain.extend(namespaces.iter().map(|ns| me.namespace_channel(ns)));
                        let mut answered = true;
                        for name in plain {
                            answered &= redis::cmd("EXISTS").arg(name).query_async::<i64>(&mut c).await.is_ok();
                        }
                        for ch in channels {
                            // Then subscribed again, where the channel's slot is now (the
                            // confirmation refills the channel).
                            let asked = redis::cmd("EXISTS").arg(me.key("m", &ch)).query_async::<i64>(&mut c).await;
                            let again = match asked {
                                Ok(_) => c.ssubscribe(me.pubsub_channel(&ch)).await,
                                Err(e) => Err(e),
                            };
                            answered &= again.is_ok();
                        }
                        if answered {
                            tracing::info!("subscriptions in place again");
                            break;
                        }
                    }
                }
            });
        }
        let me = self.clone();
        tokio::spawn(async move {
            let control = format!("{}:control", me.inner.cfg.prefix);
            let prefix_p = format!("{}:p:{{", me.inner.cfg.prefix);
            let prefix_n = format!("{}:n:", me.inner.cfg.prefix);
            // Channels whose subscription the cluster confirmed once: a confirmation after
            // that is a resubscription, after which the channel is refilled.
            let mut confirmed: HashSet<String> = HashSet::new();
            while let Some(info) = push.recv().await {
                let name = info.data.first().and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
                let payload = info.data.get(1).and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok());
                match (info.kind, name, payload) {
                    (redis::PushKind::SMessage, Some(name), Some(payload)) => {
                        let Some(ch) = name.strip_prefix(&prefix_p).and_then(|c| c.strip_suffix('}')) else { continue };
                        let Ok(channel) = ChannelName::parse(ch) else { continue };
                        if let Some(p) = parse_message(channel, &payload) {
                            queues.send(Work::Deliver(p));
                        }
                    }
                    (redis::PushKind::Message, Some(name), Some(payload)) if name == control => {
                        me.on_control(&payload);
                    }
                    (redis::PushKind::Message, Some(name), Some(payload)) if name.starts_with(&prefix_n) => {
                        // A namespace's broadcast: `<channel>\n<message>`.
                        let Some(i) = payload.iter().position(|b| *b == b'\n') else { continue };
                        let Ok(ch) = std::str::from_utf8(&payload[..i]) else { continue };
                        if lock(&me.inner.wanted).channels.contains(ch) {
                            continue; // delivered by the channel's own subscription too
                        }
                        let Ok(channel) = ChannelName::parse(ch) else { continue };
                        if let Some(p) = parse_message(channel, &payload[i + 1..]) {
                            queues.send(Work::Deliver(p));
                        }
                    }
                    (redis::PushKind::SSubscribe, Some(name), _) => {
                        let Some(ch) = name.strip_prefix(&prefix_p).and_then(|c| c.strip_suffix('}')) else { continue };
                        if !confirmed.insert(ch.to_string()) {
                            queues.send(Work::Refill(ch.to_string()));
                        }
                    }
                    (redis::PushKind::Disconnection, _, _) => repair.notify_one(),
                    (redis::PushKind::SUnsubscribe, Some(name), _) => {
                        if let Some(ch) = name.strip_prefix(&prefix_p).and_then(|c| c.strip_suffix('}')) {
                            if !lock(&me.inner.wanted).channels.contains(ch) {
                                confirmed.remove(ch);
                            }
                        }
                    }
                    _ => {}
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let control = format!("{}:control", me.inner.cfg.prefix);
            let Some((cluster, _)) = &me.inner.sharded else { return };
            let mut attempt = 0u32;
            loop {
                match async { cluster.get().await?.subscribe(&control).await }.await {
                    Ok(()) => break,
                    Err(e) => {
                        attempt = attempt.saturating_add(1);
                        let cap = 100 * 2u64.saturating_pow(attempt.min(6));
                        tracing::warn!("redis cluster unavailable ({e}); retrying");
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..=cap.max(50)))).await;
                    }
                }
            }
            // Renew this node's wildcard marks while it has them.
            loop {
                tokio::time::sleep(MARK_TTL / 3).await;
                let namespaces: Vec<String> = lock(&me.inner.wanted).namespaces.iter().cloned().collect();
                for ns in namespaces {
                    if let Err(e) = me.mark_namespace(&ns, true).await {
                        tracing::warn!("renewing the wildcard mark of namespace {ns:?}: {e}");
                    }
                }
            }
        });
    }

    /// Marks (or unmarks) this node's wildcard subscription to `namespace` in every slot.
    async fn mark_namespace(&self, namespace: &str, on: bool) -> Result<(), BrokerError> {
        let until = switchboard_core::now_millis() + MARK_TTL.as_millis() as u64;
        let node = &self.inner.node_id;
        // One key per slot: a cluster pipelines only within a slot, so each key is its own
        // request — many at once.
        let writes = (0..SLOTS).map(|slot| {
            let key = self.mark_in_slot(slot, namespace);
            let mut conn = self.conn();
            async move {
                let mut pipe = redis::pipe();
                if on {
                    pipe.zadd(&key, node, until).ignore();
                    pipe.expire(&key, MARK_TTL.as_secs() as i64).ignore();
                } else {
                    pipe.zrem(&key, node).ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            }
        });
        let mut writes = futures_util::stream::iter(writes).buffer_unordered(256);
        while let Some(r) = writes.next().await {
            r.map_err(unavailable)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn run(&self, handler: Arc<dyn BrokerEventHandler>) -> Result<(), BrokerError> {
        let _ = self.inner.handler.set(handler);
        if let Some((_, push)) = &self.inner.sharded {
            if let Some(rx) = lock(push).take() {
                self.clone().start_sharded(rx);
            }
            return Ok(());
        }
        let lanes: Vec<_> = lock(&self.inner.cmd_rx).drain(..).collect();
        if !lanes.is_empty() {
            let dispatch = self.dispatchers();
            for (lane, rx) in lanes.into_iter().enumerate() {
                tokio::spawn(self.clone().pubsub_loop(lane, rx, dispatch.clone()));
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        opts: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        let mut conn = self.conn();
        let idem = opts.idempotency_key.as_deref();
        let window = if idem.is_some() { opts.idempotency_window.as_millis() as u64 } else { 0 };
        let sharded = self.inner.conn.is_cluster();
        let mut invocation = self.inner.publish.prepare_invoke();
        invocation
            .key(self.key("m", channel.as_str()))
            .key(self.key("s", channel.as_str()))
            .key(format!("{}:{}", self.key("k", channel.as_str()), idem.unwrap_or("")))
            .arg(data.as_ref())
            .arg(opts.history_size)
            .arg(opts.history_ttl.as_millis() as u64)
            .arg(window)
            .arg(&*new_epoch())
            .arg(self.pubsub_channel(channel.as_str()))
            .arg(self.meta_ttl());
        if sharded {
            invocation
                .key(self.wildcard_mark(channel.as_str()))
                .arg("s")
                .arg(self.namespace_channel(channel.namespace()))
                .arg(channel.as_str());
        }
        let reply: Vec<String> = invocation.invoke_async(&mut conn).await.map_err(unavailable)?;
        match reply.as_slice() {
            [ok, epoch, top] if ok == "ok" => Ok(Published {
                position: StreamPosition {
                    epoch: Arc::from(epoch.as_str()),
                    offset: top.parse().map_err(unavailable)?,
                },
                duplicate: false,
            }),
            [dup, prev] if dup == "dup" => {
                let (epoch, offset) = prev.split_once(':').ok_or_else(|| unavailable("bad idempotency record"))?;
                let position = StreamPosition { epoch: Arc::from(epoch), offset: offset.parse().map_err(unavailable)? };
                Ok(Published { position, duplicate: true })
            }
            other => Err(unavailable(format!("unexpected publish reply {other:?}"))),
        }
    }

    async fn publish_volatile(&self, channel: &ChannelName, kind: Kind, data: Bytes) -> Result<(), BrokerError> {
        let k = match kind {
            Kind::Stored | Kind::Volatile => "V",
            Kind::Join => "J",
            Kind::Leave => "L",
        };
        let mut payload = format!("{k}\n\n0\n{}\n", switchboard_core::now_millis()).into_bytes();
        payload.extend_from_slice(&data);
        let mut conn = self.conn();
        if conn.is_cluster() {
            // On the channel's shard, and to the namespace's wildcard subscribers if any.
            let _: i64 = self
                .inner
                .volatile
                .key(self.wildcard_mark(channel.as_str()))
                .arg(self.pubsub_channel(channel.as_str()))
                .arg(payload)
                .arg(self.namespace_channel(channel.namespace()))
                .arg(channel.as_str())
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            return Ok(());
        }
        let _: i64 = conn.publish(self.pubsub_channel(channel.as_str()), payload).await.map_err(unavailable)?;
        Ok(())
    }

    async fn history(&self, channel: &ChannelName, req: HistoryRequest) -> Result<HistoryResult, BrokerError> {
        let limit = req.limit.map_or(0, |l| l.max(1) as i64);
        self.run_history(channel, req.since.as_ref(), limit, req.latest).await
    }

    async fn position(&self, channel: &ChannelName) -> Result<StreamPosition, BrokerError> {
        Ok(self.run_history(channel, None, -1, false).await?.position)
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        if let Some((cluster, _)) = &self.inner.sharded {
            let key = self.pubsub_channel(channel.as_str());
            lock(&self.inner.wanted).channels.insert(channel.to_string());
            let r = async { cluster.get().await?.ssubscribe(&key).await }.await.map_err(unavailable);
            if r.is_err() {
                lock(&self.inner.wanted).channels.remove(channel.as_str());
            }
            return r;
        }
        let name = channel.to_string();
        self.request(Some(channel.as_str()), |tx| SubCmd::Subscribe(name, tx)).await
    }

    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        if let Some((cluster, _)) = &self.inner.sharded {
            lock(&self.inner.wanted).channels.remove(channel.as_str());
            self.inner.in_order.forget(channel.as_str());
            let key = self.pubsub_channel(channel.as_str());
            // Unsubscribed either way: a connection that fails here takes it along.
            let _ = async { cluster.get().await?.sunsubscribe(&key).await }.await;
            return Ok(());
        }
        let name = channel.to_string();
        self.request(Some(channel.as_str()), |tx| SubCmd::Unsubscribe(name, tx)).await
    }

    async fn subscribe_namespace(&self, namespace: &str) -> Result<(), BrokerError> {
        if let Some((cluster, _)) = &self.inner.sharded {
            // Listening first, then marked: a publish that sees the mark finds us listening.
            let key = self.namespace_channel(namespace);
            lock(&self.inner.wanted).namespaces.insert(namespace.to_string());
            let r = async {
                cluster.get().await.map_err(unavailable)?.subscribe(&key).await.map_err(unavailable)?;
                self.mark_namespace(namespace, true).await
            }
            .await;
            if r.is_err() {
                lock(&self.inner.wanted).namespaces.remove(namespace);
            }
            return r;
        }
        let ns = namespace.to_string();
        self.request(None, |tx| SubCmd::PSubscribe(ns, tx)).await
    }

    async fn unsubscribe_namespace(&self, namespace: &str) -> Result<(), BrokerError> {
        if let Some((cluster, _)) = &self.inner.sharded {
            lock(&self.inner.wanted).namespaces.remove(namespace);
            let _ = self.mark_namespace(namespace, false).await;
            let key = self.namespace_channel(namespace);
            let _ = async { cluster.get().await?.unsubscribe(&key).await }.await;
            return Ok(());
        }
        let ns = namespace.to_string();
        self.request(None, |tx| SubCmd::PUnsubscribe(ns, tx)).await
    }

    async fn ready(&self) -> bool {
        if self.inner.sharded.is_none() && self.inner.pubsub_up.load(Ordering::SeqCst) < PUBSUB_CONNECTIONS {
            return false;
        }
        let mut conn = self.conn();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)))
    }

    async fn publish_control(&self, message: Bytes) -> Result<(), BrokerError> {
        let mut payload = format!("{}\n", self.inner.node_id).into_bytes();
        payload.extend_from_slice(&message);
        let mut conn = self.conn();
        let _: i64 = conn.publish(format!("{}:control", self.inner.cfg.prefix), payload).await.map_err(unavailable)?;
        Ok(())
    }

    async fn heartbeat(&self, node: &NodeInfo, channels: &[(String, usize)], ttl: Duration) -> Result<(), BrokerError> {
        let p = &self.inner.cfg.prefix;
        let now = switchboard_core::now_millis();
        let ttl_ms = ttl.as_millis() as u64;
        let info = serde_json::to_string(node).expect("node info serialises");
        let ch_key = format!("{p}:node:{}:ch", node.id);
        // One transaction on a single Redis; on a cluster the three keys are in three slots,
        // and each key's writes go as one pipeline of their own.
        let cluster = self.inner.conn.is_cluster();
        let mut pipes = [redis::pipe(), redis::pipe(), redis::pipe()];
        if !cluster {
            pipes[0].atomic();
        }
        let (reg, info_at, hash_at) = if cluster { (0, 1, 2) } else { (0, 0, 0) };
        pipes[reg]
            .zadd(format!("{p}:nodes"), &node.id, now + ttl_ms)
            .ignore()
            .zrembyscore(format!("{p}:nodes"), "-inf", now)
            .ignore();
        pipes[info_at].pset_ex(format!("{p}:node:{}", node.id), info, ttl_ms).ignore();
        let pipe = &mut pipes[hash_at];
        // The channel hash: only what changed since the last heartbeat; whole every
        // `REWRITE_EVERY` heartbeats and after any failure (a hash lost with a Redis restart
        // is whole again within a minute).
        const REWRITE_EVERY: u32 = 12;
        let now_counts: HashMap<String, usize> = channels.iter().cloned().collect();
        let previous = lock(&self.inner.registered).take();
        let beats = match previous {
            Some((sent, beats)) if beats < REWRITE_EVERY => {
                let changed: Vec<(&String, &usize)> =
                    now_counts.iter().filter(|(c, n)| sent.get(*c) != Some(*n)).collect();
                let gone: Vec<&String> = sent.keys().filter(|c| !now_counts.contains_key(*c)).collect();
                if !changed.is_empty() {
                    pipe.hset_multiple(&ch_key, &changed).ignore();
                }
                if !gone.is_empty() {
                    pipe.hdel(&ch_key, gone).ignore();
                }
                beats + 1
            }
            _ => {
                pipe.del(&ch_key).ignore();
                if !channels.is_empty() {
                    pipe.hset_multiple(&ch_key, channels).ignore();
                }
                0
            }
        };
        pipe.pexpire(&ch_key, ttl_ms as i64).ignore();
        let mut conn = self.conn();
        for pipe in pipes.iter().filter(|p| !p.is_empty()) {
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)?;
        }
        *lock(&self.inner.registered) = Some((now_counts, beats));
        Ok(())
    }

    async fn nodes(&self) -> Result<Option<Vec<NodeInfo>>, BrokerError> {
        let p = &self.inner.cfg.prefix;
        let mut conn = self.conn();
        let ids: Vec<String> = conn
            .zrangebyscore(format!("{p}:nodes"), switchboard_core::now_millis(), "+inf")
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let raw: Option<String> = conn.get(format!("{p}:node:{id}")).await.map_err(unavailable)?;
            if let Some(n) = raw.and_then(|r| serde_json::from_str(&r).ok()) {
                out.push(n);
            }
        }
        out.sort_by(|a: &NodeInfo, b| a.id.cmp(&b.id));
        Ok(Some(out))
    }

    async fn save_revocation(&self, key: &str, until_ms: u64) -> Result<(), BrokerError> {
        // A sorted set scored by expiry: what lapsed goes on each write and read.
        let set = format!("{}:revoked", self.inner.cfg.prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(&set).arg("GT").arg(until_ms).arg(key).ignore();
        pipe.cmd("ZREMRANGEBYSCORE").arg(&set).arg("-inf").arg(switchboard_core::now_millis()).ignore();
        let mut conn = self.conn();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn revocations(&self) -> Result<Vec<(String, u64)>, BrokerError> {
        let set = format!("{}:revoked", self.inner.cfg.prefix);
        let now = switchboard_core::now_millis();
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE").arg(&set).arg("-inf").arg(now).ignore();
        pipe.cmd("ZRANGEBYSCORE").arg(&set).arg(now).arg("+inf").arg("WITHSCORES");
        let mut conn = self.conn();
        let (live,): (Vec<(String, f64)>,) = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(live.into_iter().map(|(k, until)| (k, until as u64)).collect())
    }

    async fn claim(
        &self,
        channel: &ChannelName,
        owner: &str,
        positions: &[StreamPosition],
        ttl: Duration,
    ) -> Result<Vec<bool>, BrokerError> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        // One key per publication and owner, in the channel's slot: the first node to
        // set it delivers.
        let mut pipe = redis::pipe();
        for at in positions {
            let key = format!("{}:{owner}:{}:{}", self.key("g", channel.as_str()), at.epoch, at.offset);
            pipe.cmd("SET").arg(key).arg(&self.inner.node_id).arg("NX").arg("PX").arg(ttl.as_millis() as u64);
        }
        let mut conn = self.conn();
        let set: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(set.into_iter().map(|r| r.is_some()).collect())
    }

    async fn cluster_channels(&self) -> Result<Option<Vec<(String, usize)>>, BrokerError> {
        let nodes = self.nodes().await?.unwrap_or_default();
        let p = &self.inner.cfg.prefix;
        let mut conn = self.conn();
        let mut sum: HashMap<String, usize> = HashMap::new();
        for n in nodes {
            let ch: HashMap<String, usize> =
                conn.hgetall(format!("{p}:node:{}:ch", n.id)).await.map_err(unavailable)?;
            for (c, k) in ch {
                *sum.entry(c).or_default() += k;
            }
        }
        let mut v: Vec<_> = sum.into_iter().collect();
        v.sort();
        Ok(Some(v))
    }
}
