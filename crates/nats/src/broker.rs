//! [`NatsBroker`]: the [`Broker`] contract over NATS JetStream.
//!
//! A channel's log is its subject `P.h.<ns>.<channel>` of the history stream, each
//! message carrying its position in headers (`Sb-E` epoch, `Sb-O` offset, `Sb-T` time,
//! `Sb-X` expiry, `Sb-H` the history size it was published with). A publish numbers
//! itself from the subject's last message and appends with
//! `Nats-Expected-Last-Subject-Sequence` set to that message's sequence: the stream takes
//! it only if nothing was appended meanwhile, so concurrent publishers on many nodes get
//! distinct, gapless offsets (a loser reads the new last message and tries again). The
//! stream republishes each stored message to `P.l.<ns>.<channel>`, in stream order, where
//! nodes subscribe with core NATS; volatile publications are published there directly.
//!
//! A channel whose last message is gone (the stream's `max_age`, the idle channel TTL)
//! starts a new epoch; asking a new channel's position stores an epoch marker (offset 0,
//! kind `E`) the same way. Idempotency keys are the stream's `Nats-Msg-Id` de-duplication
//! (per channel: the id is `<channel>:<key>`); a key whose publish-time window has passed
//! while the stream still remembers it is published again under a next-generation id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use async_nats::{HeaderMap, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use switchboard_core::broker::{
    Broker, BrokerError, BrokerEventHandler, HistoryRequest, HistoryResult, InOrder, NodeInfo, PublishOptions,
};
use switchboard_core::publication::new_epoch;
use switchboard_core::{now_millis, ChannelName, Delivery, Kind, Publication, Published, StreamPosition};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::subject::{stream_name, token, untoken};

/// How to reach NATS and what to keep there.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port` (several, comma-separated, for a NATS cluster).
    pub url: String,
    /// Subject prefix and (upper-cased) stream name prefix; clusters sharing one NATS use
    /// different prefixes.
    pub prefix: String,
    /// How long a channel nobody publishes to keeps its last publication, and so its
    /// epoch and offset (the history stream's `max_age`). At least the longest history TTL.
    pub max_age: Duration,
    /// Most publications kept per channel (the stream's `max_msgs_per_subject`): the
    /// largest history size any namespace asks for.
    pub max_history: usize,
    /// The longest idempotency window any namespace asks for (the stream's
    /// `duplicate_window`, at most `max_age`).
    pub max_idempotency_window: Duration,
    /// JetStream replicas of each stream (1 for one NATS server; 3 for a cluster).
    pub replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "sb".into(),
            max_age: Duration::from_secs(3600),
            max_history: 100,
            max_idempotency_window: Duration::from_secs(300),
            replicas: 1,
        }
    }
}

/// Presence, node, claim messages live at most this long without a refresh.
pub(crate) const STATE_MAX_AGE: Duration = Duration::from_secs(3600);

/// Publish attempts before giving up on a channel so contended no append wins.
const MAX_ATTEMPTS: usize = 64;

/// Top offsets remembered per channel (what spares a publish its read); past it the
/// memory is dropped and rebuilt from NATS.
const TOP_CACHE: usize = 10_000;

/// How long a history read waits for its next message (the server may count a message
/// evicted meanwhile as pending, and leave the request waiting for it).
const READ_QUIET: Duration = Duration::from_secs(2);

/// The longest a whole stream read may take.
const READ_LIMIT: Duration = Duration::from_secs(10);

/// Channels per heartbeat message.
const NODE_PAGE: usize = 2_000;

pub(crate) struct Streams {
    pub history: stream::Stream,
    pub state: stream::Stream,
    pub keep: stream::Stream,
}

/// A subject's last message, as the publish and history paths read it.
#[derive(Clone)]
struct Top {
    seq: u64,
    epoch: Arc<str>,
    offset: u64,
}

/// A history message's headers.
struct Meta {
    kind: u8,
    epoch: Arc<str>,
    offset: u64,
    time: u64,
    expires: u64,
    size: usize,
    window: u64,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.as_str())
}

fn meta(h: Option<&HeaderMap>) -> Option<Meta> {
    let h = h?;
    let num = |n: &str| header(h, n).and_then(|v| v.parse::<u64>().ok());
    Some(Meta {
        kind: *header(h, "Sb-K")?.as_bytes().first()?,
        epoch: Arc::from(header(h, "Sb-E").unwrap_or("")),
        offset: num("Sb-O").unwrap_or(0),
        time: num("Sb-T").unwrap_or(0),
        expires: num("Sb-X").unwrap_or(u64::MAX),
        size: num("Sb-H").unwrap_or(0) as usize,
        window: num("Sb-W").unwrap_or(0),
    })
}

/// One message read back from a stream.
pub(crate) struct Entry {
    pub seq: u64,
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Wanted {
    channels: HashMap<String, AbortHandle>,
    namespaces: HashMap<String, AbortHandle>,
}

pub(crate) struct Inner {
    pub(crate) cfg: NatsConfig,
    /// The subject prefix (`P`).
    pub(crate) p: String,
    client: async_nats::Client,
    pub(crate) js: async_nats::jetstream::Context,
    streams: tokio::sync::OnceCell<Streams>,
    node_id: String,
    handler: OnceLock<Arc<dyn BrokerEventHandler>>,
    wanted: Mutex<Wanted>,
    /// Exactly-subscribed channels' last offsets delivered: duplicates are dropped and
    /// gaps are refilled from history.
    in_order: InOrder,
    /// The last message per channel as this node last saw it (publishes skip the read
    /// while it is right; the stream refuses the append when it is not).
    tops: Mutex<HashMap<String, Top>>,
    /// One publish at a time per channel on this node: appends that would only lose the
    /// race to each other wait their turn instead.
    publishing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped on every reconnect: each subscription refills what it may have missed.
    reconnects: watch::Sender<u64>,
    /// Heartbeat pages written last time (to drop the ones no longer used).
    node_pages: Mutex<usize>,
}

/// The NATS broker. Cheap to clone.
#[derive(Clone)]
pub struct NatsBroker {
    pub(crate) inner: Arc<Inner>,
}

impl NatsBroker {
    /// Connects (in the background: a node starts, and stays up, while NATS is down,
    /// reporting not-ready) and creates the streams on first use.
    pub async fn connect(cfg: NatsConfig, node_id: &str) -> Result<NatsBroker, BrokerError> {
        let (reconnects, _) = watch::channel(0u64);
        let bump = reconnects.clone();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                let bump = bump.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            bump.send_modify(|n| *n += 1);
                        }
                        async_nats::Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                        _ => {}
                    }
                }
            })
            .connect(cfg.url.as_str())
            .await
            .map_err(|e| unavailable(format!("nats {}: {e}", cfg.url)))?;
        let js = async_nats::jetstream::new(client.clone());
        let p = token(&cfg.prefix);
        Ok(NatsBroker {
            inner: Arc::new(Inner {
                cfg,
                p,
                client,
                js,
                streams: tokio::sync::OnceCell::new(),
                node_id: node_id.to_string(),
                handler: OnceLock::new(),
                wanted: Mutex::default(),
                in_order: InOrder::default(),
                tops: Mutex::default(),
                publishing: Mutex::default(),
                reconnects,
                node_pages: Mutex::new(0),
            }),
        })
    }

    /// The streams, created (or brought to this configuration) on first use.
    pub(crate) async fn streams(&self) -> Result<&Streams, BrokerError> {
        self.inner
            .streams
            .get_or_try_init(|| async {
                let cfg = &self.inner.cfg;
                let p = &self.inner.p;
                let replicas = cfg.replicas.max(1);
                let max_age = cfg.max_age.max(Duration::from_secs(1));
                let history = stream::Config {
                    name: stream_name(&cfg.prefix, "HISTORY"),
                    subjects: vec![format!("{p}.h.>")],
                    max_messages_per_subject: cfg.max_history.max(1) as i64,
                    max_age,
                    duplicate_window: cfg.max_idempotency_window.clamp(Duration::from_secs(1), max_age),
                    allow_direct: true,
                    republish: Some(stream::Republish {
                        source: format!("{p}.h.>"),
                        destination: format!("{p}.l.>"),
                        headers_only: false,
                    }),
                    num_replicas: replicas,
                    ..Default::default()
                };
                let state = stream::Config {
                    name: stream_name(&cfg.prefix, "STATE"),
                    subjects: vec![format!("{p}.s.>")],
                    max_messages_per_subject: 1,
                    max_age: STATE_MAX_AGE,
                    allow_direct: true,
                    num_replicas: replicas,
                    ..Default::default()
                };
                let keep = stream::Config {
                    name: stream_name(&cfg.prefix, "KEEP"),
                    subjects: vec![format!("{p}.k.>")],
                    max_messages_per_subject: 1,
                    allow_direct: true,
                    num_replicas: replicas,
                    ..Default::default()
                };
                let mut out = Vec::with_capacity(3);
                for config in [history, state, keep] {
                    let name = config.name.clone();
                    self.inner
                        .js
                        .create_or_update_stream(config)
                        .await
                        .map_err(|e| unavailable(format!("stream {name}: {e}")))?;
                    out.push(
                        self.inner
                            .js
                            .get_stream(&name)
                            .await
                            .map_err(|e| unavailable(format!("stream {name}: {e}")))?,
                    );
                }
                let keep = out.pop().expect("three streams");
                let state = out.pop().expect("three streams");
                let history = out.pop().expect("three streams");
                Ok(Streams { history, state, keep })
            })
            .await
    }

    fn ns_token(channel: &str) -> String {
        // `n` first: the default namespace `""` still makes a token.
        format!("n{}", token(switchboard_core::channel::namespace_of(channel)))
    }

    fn history_subject(&self, channel: &str) -> String {
        format!("{}.h.{}.{}", self.inner.p, Self::ns_token(channel), token(channel))
    }

    fn live_subject(&self, channel: &str) -> String {
        format!("{}.l.{}.{}", self.inner.p, Self::ns_token(channel), token(channel))
    }

    pub(crate) fn state_subject(&self, what: &str, parts: &[&str]) -> String {
        let mut s = format!("{}.s.{what}", self.inner.p);
        for part in parts {
            s.push('.');
            s.push_str(&token(part));
        }
        s
    }

    /// The last message of `subject` in `stream`, if any.
    pub(crate) async fn last_of(stream: &stream::Stream, subject: &str) -> Result<Option<Entry>, BrokerError> {
        match stream.direct_get_last_for_subject(subject).await {
            Ok(m) => Ok(Some(Entry {
                seq: m.sequence,
                subject: m.subject.to_string(),
                headers: Some(m.headers),
                payload: m.payload,
            })),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Every message of `stream` matching `filter`, oldest first, up to the one with
    /// sequence `until` (known to be there: a channel's top), through one short-lived
    /// consumer.
    pub(crate) async fn read_all(stream: &stream::Stream, filter: &str, until: u64) -> Result<Vec<Entry>, BrokerError> {
        match tokio::time::timeout(READ_LIMIT, Self::read_all_unbounded(stream, filter, until)).await {
            Ok(r) => r,
            Err(_) => Err(unavailable("NATS history read timed out")),
        }
    }

    async fn read_all_unbounded(stream: &stream::Stream, filter: &str, until: u64) -> Result<Vec<Entry>, BrokerError> {
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: filter.to_string(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let name = consumer.cached_info().name.clone();
        let mut out = Vec::new();
        let result = async {
            'fetching: loop {
                let mut batch = consumer.fetch().max_messages(1_000).messages().await.map_err(unavailable)?;
                let mut got = 0;
                loop {
                    // Bounded (see READ_QUIET).
                    let m = match tokio::time::timeout(READ_QUIET, batch.next()).await {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(_) => return Err(unavailable("history read: no answer from NATS")),
                    };
                    let m = m.map_err(unavailable)?;
                    got += 1;
                    let info = m.info().map_err(unavailable)?;
                    let seq = info.stream_sequence;
                    out.push(Entry {
                        seq,
                        subject: m.message.subject.to_string(),
                        headers: m.message.headers.clone(),
                        payload: m.message.payload.clone(),
                    });
                    if seq >= until {
                        break 'fetching;
                    }
                }
                if got == 0 {
                    return Err(unavailable("history ended before its last message"));
                }
            }
            Ok::<_, BrokerError>(())
        }
        .await;
        let s = stream.clone();
        tokio::spawn(async move {
            let _ = s.delete_consumer(&name).await;
        });
        result.map(|_| out)
    }

    /// The messages of a stream that keeps one per subject (state, revocations), for the
    /// subjects matching `filter`: the subjects listed, then each one's message read —
    /// no consumer (whose pending count can outlive a message replaced meanwhile).
    pub(crate) async fn read_each(stream: &stream::Stream, filter: &str) -> Result<Vec<Entry>, BrokerError> {
        let read = async {
            let mut listed = stream.info_with_subjects(filter).await.map_err(unavailable)?;
            let mut subjects = Vec::new();
            while let Some(s) = listed.next().await {
                subjects.push(s.map_err(unavailable)?.0);
            }
            let reads = subjects.iter().map(|s| Self::last_of(stream, s));
            let mut out = Vec::with_capacity(subjects.len());
            for e in futures_util::future::join_all(reads).await {
                // (None: gone since it was listed.)
                out.extend(e?);
            }
            Ok(out)
        };
        tokio::time::timeout(READ_LIMIT, read).await.unwrap_or_else(|_| Err(unavailable("NATS read timed out")))
    }

    async fn read_top(&self, channel: &ChannelName) -> Result<Option<(Top, Meta, Entry)>, BrokerError> {
        let streams = self.streams().await?;
        let Some(e) = Self::last_of(&streams.history, &self.history_subject(channel.as_str())).await? else {
            return Ok(None);
        };
        let m = meta(e.headers.as_ref()).ok_or_else(|| unavailable("history message without its headers"))?;
        let top = Top { seq: e.seq, epoch: m.epoch.clone(), offset: m.offset };
        self.remember_top(channel.as_str(), &top);
        Ok(Some((top, m, e)))
    }

    fn remember_top(&self, channel: &str, top: &Top) {
        let mut tops = lock(&self.inner.tops);
        if tops.len() >= TOP_CACHE && !tops.contains_key(channel) {
            tops.clear();
        }
        tops.insert(channel.to_string(), top.clone());
    }

    /// Appends `data` with `headers` if `expect` is still the subject's last sequence.
    /// `Ok(None)`: it was not (someone appended first).
    async fn append(
        &self,
        subject: &str,
        mut headers: HeaderMap,
        expect: u64,
        data: Bytes,
    ) -> Result<Option<async_nats::jetstream::publish::PublishAck>, BrokerError> {
        self.connected()?;
        headers.insert("Nats-Expected-Last-Subject-Sequence", expect.to_string().as_str());
        let ack = match self.inner.js.publish_with_headers(subject.to_string(), headers, data).await {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(a) => Ok(Some(a)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Starts the channel's epoch (an offset-0 marker) unless someone just did.
    async fn create_epoch(&self, channel: &ChannelName) -> Result<Top, BrokerError> {
        for _ in 0..MAX_ATTEMPTS {
            let epoch = new_epoch();
            let now = now_millis().to_string();
            let mut h = HeaderMap::new();
            h.insert("Sb-K", "E");
            h.insert("Sb-E", &*epoch);
            h.insert("Sb-O", "0");
            h.insert("Sb-T", now.as_str());
            h.insert("Sb-X", now.as_str());
            h.insert("Sb-H", "0");
            let subject = self.history_subject(channel.as_str());
            if let Some(ack) = self.append(&subject, h, 0, Bytes::new()).await? {
                let top = Top { seq: ack.sequence, epoch, offset: 0 };
                self.remember_top(channel.as_str(), &top);
                return Ok(top);
            }
            if let Some((top, _, _)) = self.read_top(channel).await? {
                return Ok(top);
            }
        }
        Err(unavailable("could not start the channel's epoch"))
    }

    async fn run_history(
        &self,
        channel: &ChannelName,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
        latest: bool,
    ) -> Result<HistoryResult, BrokerError> {
        let (top, size, last) = match self.read_top(channel).await? {
            Some((top, m, e)) => {
                let size = if m.kind == b'S' { m.size } else { 0 };
                (top, size, Some(e))
            }
            None => (self.create_epoch(channel).await?, 0, None),
        };
        let position = StreamPosition { epoch: top.epoch.clone(), offset: top.offset };
        let lost = || Err(BrokerError::PositionLost { current: position.clone() });
        if let Some(s) = since {
            if *s.epoch != *top.epoch || s.offset > top.offset {
                return lost();
            }
            if s.offset == top.offset {
                return Ok(HistoryResult { publications: Vec::new(), position });
            }
        }
        if limit == Some(0) {
            return Ok(HistoryResult { publications: Vec::new(), position });
        }
        // Offsets history may still hold: the newest `size` of the latest publish.
        let floor = (top.offset + 1).saturating_sub(size as u64).max(1);
        if size == 0 || top.offset == 0 || since.is_some_and(|s| s.offset + 1 < floor) {
            return match since {
                Some(_) => lost(),
                None => Ok(HistoryResult { publications: Vec::new(), position }),
            };
        }
        let streams = self.streams().await?;
        let only_top =
            since.is_some_and(|s| s.offset + 1 == top.offset) || (since.is_none() && latest && limit == Some(1));
        let entries = match (only_top, last) {
            (true, Some(e)) => vec![e],
            _ => Self::read_all(&streams.history, &self.history_subject(channel.as_str()), top.seq).await?,
        };
        // The run of retained publications that ends at the top: nothing past its expiry,
        // nothing older than `floor`, no hole.
        let now = now_millis();
        let mut kept: Vec<Arc<Delivery>> = Vec::new();
        let mut want = top.offset;
        for e in entries.into_iter().rev() {
            let Some(m) = meta(e.headers.as_ref()) else { continue };
            if m.kind != b'S' || *m.epoch != *top.epoch || m.offset > want {
                continue;
            }
            if m.offset < want || m.offset < floor || m.expires <= now {
                break;
            }
            let (data, extra) = switchboard_core::Meta::split(e.payload);
            kept.push(Delivery::new(Publication {
                channel: channel.clone(),
                offset: m.offset,
                epoch: top.epoch.clone(),
                data,
                time: m.time,
                kind: Kind::Stored,
                meta: extra,
            }));
            want -= 1;
            if want < floor {
                break;
            }
        }
        kept.reverse();
        let mut publications = match since {
            Some(s) => {
                if kept.first().is_none_or(|p| p.publication.offset > s.offset + 1) {
                    return lost();
                }
                kept.retain(|p| p.publication.offset > s.offset);
                kept
            }
            None => kept,
        };
        if let Some(n) = limit {
            if latest && since.is_none() {
                let cut = publications.len().saturating_sub(n);
                publications.drain(..cut);
            } else {
                publications.truncate(n);
            }
        }
        Ok(HistoryResult { publications, position })
    }

    /// Makes sure the server has seen everything this connection sent (a subscription
    /// is in place once this returns): a request nobody answers comes back "no
    /// responders" after one round trip.
    async fn sync(&self) -> Result<(), BrokerError> {
        let subject = format!("{}.sync.{}", self.inner.p, token(&self.inner.node_id));
        match self.inner.client.request(subject, Bytes::new()).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    fn parse_live(subject: &str, headers: Option<&HeaderMap>, payload: Bytes) -> Option<Publication> {
        let m = meta(headers)?;
        let name = untoken(subject.rsplit('.').next()?)?;
        let channel = ChannelName::parse(&name).ok()?;
        let kind = match m.kind {
            b'S' => Kind::Stored,
            b'V' => Kind::Volatile,
            b'J' => Kind::Join,
            b'L' => Kind::Leave,
            _ => return None, // an epoch marker
        };
        let (epoch, offset) = if kind == Kind::Stored { (m.epoch, m.offset) } else { (Arc::from(""), 0) };
        let (data, extra) = switchboard_core::Meta::split(payload);
        Some(Publication { channel, offset, epoch, data, time: m.time, kind, meta: extra })
    }

    /// Delivers one subscription's messages, in the order NATS sends them; refills from
    /// history after a reconnect.
    async fn pump(self, mut sub: Subscriber, exact: Option<String>) {
        let mut reconnects = self.inner.reconnects.subscribe();
        reconnects.mark_unchanged();
        loop {
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { return };
                    let Some(p) = Self::parse_live(msg.subject.as_str(), msg.headers.as_ref(), msg.payload) else { continue };
                    if exact.is_none() && lock(&self.inner.wanted).channels.contains_key(p.channel.as_str()) {
                        continue; // delivered by the exact subscription too: once is enough
                    }
                    self.deliver(p, exact.is_some()).await;
                }
                changed = reconnects.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if let Some(ch) = &exact {
                        // Anything published while we were away is in the stream.
                        self.refill(ch).await;
                    }
                }
            }
        }
    }

    /// Hands a publication to the node, in offset order (see [`InOrder`]).
    async fn deliver(&self, p: Publication, exact: bool) {
        let Some(handler) = self.inner.handler.get().cloned() else { return };
        if p.kind != Kind::Stored || !exact {
            handler.handle_publication(Delivery::new(p));
            return;
        }
        let channel = p.channel.clone();
        let history = |since| self.after(&channel, since);
        self.inner.in_order.deliver(p, &*handler, history).await;
    }

    /// Delivers what history holds after the last offset delivered on `channel`.
    async fn refill(&self, channel: &str) {
        let Some(handler) = self.inner.handler.get().cloned() else { return };
        let Ok(name) = ChannelName::parse(channel) else { return };
        self.inner.in_order.refill(channel, &*handler, |since| self.after(&name, since)).await;
    }

    async fn after(&self, channel: &ChannelName, since: StreamPosition) -> Result<HistoryResult, BrokerError> {
        self.run_history(channel, Some(&since), None, false).await
    }

    async fn listen(&self, subject: String, exact: Option<String>) -> Result<AbortHandle, BrokerError> {
        let sub = self.inner.client.subscribe(subject).await.map_err(unavailable)?;
        let task = tokio::spawn(self.clone().pump(sub, exact));
        let handle = task.abort_handle();
        if let Err(e) = self.sync().await {
            handle.abort();
            return Err(e);
        }
        Ok(handle)
    }

    async fn publish_in_turn(
        &self,
        streams: &Streams,
        channel: &ChannelName,
        data: Bytes,
        opts: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        let subject = self.history_subject(channel.as_str());
        let window = opts.idempotency_window.as_millis() as u64;
        let mut msg_id = opts.idempotency_key.as_ref().map(|k| format!("{}:{k}", channel.as_str()));
        let mut cached = lock(&self.inner.tops).get(channel.as_str()).cloned();
        let mut lost = 0u64;
        for _ in 0..MAX_ATTEMPTS {
            let top = match cached.take() {
                Some(t) => Some(t),
                None => self.read_top(channel).await?.map(|(t, _, _)| t),
            };
            let (epoch, offset, expect) = match &top {
                Some(t) => (t.epoch.clone(), t.offset + 1, t.seq),
                None => (new_epoch(), 1, 0),
            };
            let now = now_millis();
            let mut h = HeaderMap::new();
            h.insert("Sb-K", "S");
            h.insert("Sb-E", &*epoch);
            h.insert("Sb-O", offset.to_string().as_str());
            h.insert("Sb-T", now.to_string().as_str());
            h.insert("Sb-X", (now + opts.history_ttl.as_millis() as u64).to_string().as_str());
            h.insert("Sb-H", opts.history_size.to_string().as_str());
            if let Some(id) = &msg_id {
                h.insert("Nats-Msg-Id", id.as_str());
                h.insert("Sb-W", window.to_string().as_str());
            }
            let Some(ack) = self.append(&subject, h, expect, data.clone()).await? else {
                // Another node appended first: read the new last message (after a pause
                // that grows, so that a node on a streak does not starve the others).
                lost += 1;
                if lost > 2 {
                    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..=500 * lost.min(20)))).await;
                }
                continue;
            };
            if !ack.duplicate {
                let top = Top { seq: ack.sequence, epoch: epoch.clone(), offset };
                self.remember_top(channel.as_str(), &top);
                return Ok(Published { position: StreamPosition { epoch, offset }, duplicate: false });
            }
            // The key's first publication: still within its own window, or past it (the
            // stream's window is the longest any namespace has) — then publish again
            // under the next generation's id.
            cached = top;
            let first = match streams.history.direct_get(ack.sequence).await {
                Ok(m) => meta(Some(&m.headers)),
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
                Err(e) => return Err(unavailable(e)),
            };
            match first {
                Some(m) if m.time + m.window > now => {
                    return Ok(Published {
                        position: StreamPosition { epoch: m.epoch, offset: m.offset },
                        duplicate: true,
                    });
                }
                Some(_) => msg_id = msg_id.map(|id| format!("{id}#{}", ack.sequence)),
                // Gone from history while the stream still remembers its id: answered with
                // the channel's top, the only position left to name.
                None => {
                    let (t, _, _) = self.read_top(channel).await?.ok_or_else(|| unavailable("channel vanished"))?;
                    return Ok(Published {
                        position: StreamPosition { epoch: t.epoch, offset: t.offset },
                        duplicate: true,
                    });
                }
            }
        }
        Err(unavailable("too many concurrent publishers on the channel; try again"))
    }

    /// Fails at once while the connection is down: the client would otherwise hold the
    /// message and send it on reconnect — stored after its publisher was told it failed.
    fn connected(&self) -> Result<(), BrokerError> {
        match self.inner.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(unavailable("not connected to NATS")),
        }
    }

    pub(crate) async fn publish_state(&self, subject: String, payload: Bytes) -> Result<u64, BrokerError> {
        self.connected()?;
        let ack = self.inner.js.publish(subject, payload).await.map_err(unavailable)?.await.map_err(unavailable)?;
        Ok(ack.sequence)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NodePage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<NodeInfo>,
    until: u64,
    channels: Vec<(String, usize)>,
}

#[async_trait]
impl Broker for NatsBroker {
    async fn run(&self, handler: Arc<dyn BrokerEventHandler>) -> Result<(), BrokerError> {
        let _ = self.inner.handler.set(handler);
        let sub = self.inner.client.subscribe(format!("{}.ctl", self.inner.p)).await.map_err(unavailable)?;
        let me = self.clone();
        tokio::spawn(async move {
            let mut sub = sub;
            while let Some(msg) = sub.next().await {
                let from = msg.headers.as_ref().and_then(|h| header(h, "Sb-N"));
                if from == Some(me.inner.node_id.as_str()) {
                    continue; // our own message: already handled locally
                }
                if let Some(h) = me.inner.handler.get() {
                    h.handle_control(msg.payload);
                }
            }
        });
        Ok(())
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        data: Bytes,
        opts: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        let streams = self.streams().await?;
        let turn = lock(&self.inner.publishing).entry(channel.as_str().to_string()).or_default().clone();
        let result = {
            let _turn = turn.lock().await;
            self.publish_in_turn(streams, channel, data, opts).await
        };
        drop(turn);
        let mut publishing = lock(&self.inner.publishing);
        if publishing.get(channel.as_str()).is_some_and(|t| Arc::strong_count(t) == 1) {
            publishing.remove(channel.as_str());
        }
        result
    }

    async fn publish_volatile(&self, channel: &ChannelName, kind: Kind, data: Bytes) -> Result<(), BrokerError> {
        let k = match kind {
            Kind::Stored | Kind::Volatile => "V",
            Kind::Join => "J",
            Kind::Leave => "L",
        };
        let mut h = HeaderMap::new();
        h.insert("Sb-K", k);
        h.insert("Sb-T", now_millis().to_string().as_str());
        self.connected()?;
        self.inner.client.publish_with_headers(self.live_subject(channel.as_str()), h, data).await.map_err(unavailable)
    }

    async fn history(&self, channel: &ChannelName, req: HistoryRequest) -> Result<HistoryResult, BrokerError> {
        self.run_history(channel, req.since.as_ref(), req.limit, req.latest).await
    }

    async fn position(&self, channel: &ChannelName) -> Result<StreamPosition, BrokerError> {
        let top = match self.read_top(channel).await? {
            Some((top, _, _)) => top,
            None => self.create_epoch(channel).await?,
        };
        Ok(StreamPosition { epoch: top.epoch, offset: top.offset })
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let key = channel.as_str().to_string();
        let handle = self.listen(self.live_subject(&key), Some(key.clone())).await?;
        if let Some(old) = lock(&self.inner.wanted).channels.insert(key, handle) {
            old.abort();
        }
        Ok(())
    }

    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        if let Some(h) = lock(&self.inner.wanted).channels.remove(channel.as_str()) {
            h.abort();
        }
        self.inner.in_order.forget(channel.as_str());
        Ok(())
    }

    async fn subscribe_namespace(&self, namespace: &str) -> Result<(), BrokerError> {
        let subject = format!("{}.l.n{}.*", self.inner.p, token(namespace));
        let handle = self.listen(subject, None).await?;
        if let Some(old) = lock(&self.inner.wanted).namespaces.insert(namespace.to_string(), handle) {
            old.abort();
        }
        Ok(())
    }

    async fn unsubscribe_namespace(&self, namespace: &str) -> Result<(), BrokerError> {
        if let Some(h) = lock(&self.inner.wanted).namespaces.remove(namespace) {
            h.abort();
        }
        Ok(())
    }

    async fn ready(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
            && matches!(tokio::time::timeout(Duration::from_secs(2), self.streams()).await, Ok(Ok(_)))
    }

    async fn publish_control(&self, message: Bytes) -> Result<(), BrokerError> {
        let mut h = HeaderMap::new();
        h.insert("Sb-N", self.inner.node_id.as_str());
        self.connected()?;
        self.inner.client.publish_with_headers(format!("{}.ctl", self.inner.p), h, message).await.map_err(unavailable)
    }

    async fn heartbeat(&self, node: &NodeInfo, channels: &[(String, usize)], ttl: Duration) -> Result<(), BrokerError> {
        let streams = self.streams().await?;
        let until = now_millis() + ttl.as_millis() as u64;
        let mut pages: Vec<&[(String, usize)]> = channels.chunks(NODE_PAGE).collect();
        if pages.is_empty() {
            pages.push(&[]);
        }
        for (i, chunk) in pages.iter().enumerate() {
            let page = NodePage { node: (i == 0).then(|| node.clone()), until, channels: chunk.to_vec() };
            let body = serde_json::to_vec(&page).expect("node page serialises");
            self.publish_state(self.state_subject("node", &[&node.id, &i.to_string()]), body.into()).await?;
        }
        let before = std::mem::replace(&mut *lock(&self.inner.node_pages), pages.len());
        for i in pages.len()..before {
            let subject = self.state_subject("node", &[&node.id, &i.to_string()]);
            streams.state.purge().filter(subject).await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn nodes(&self) -> Result<Option<Vec<NodeInfo>>, BrokerError> {
        let streams = self.streams().await?;
        let filter = format!("{}.s.node.*.0", self.inner.p);
        let now = now_millis();
        let mut out: Vec<NodeInfo> = Self::read_each(&streams.state, &filter)
            .await?
            .into_iter()
            .filter_map(|e| serde_json::from_slice::<NodePage>(&e.payload).ok())
            .filter(|p| p.until > now)
            .filter_map(|p| p.node)
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Some(out))
    }

    async fn cluster_channels(&self) -> Result<Option<Vec<(String, usize)>>, BrokerError> {
        let streams = self.streams().await?;
        let filter = format!("{}.s.node.>", self.inner.p);
        let now = now_millis();
        let mut sum: HashMap<String, usize> = HashMap::new();
        for e in Self::read_each(&streams.state, &filter).await? {
            let Ok(page) = serde_json::from_slice::<NodePage>(&e.payload) else { continue };
            if page.until <= now {
                continue;
            }
            for (c, k) in page.channels {
                *sum.entry(c).or_default() += k;
            }
        }
        let mut v: Vec<_> = sum.into_iter().collect();
        v.sort();
        Ok(Some(v))
    }

    async fn save_revocation(&self, key: &str, until_ms: u64) -> Result<(), BrokerError> {
        let streams = self.streams().await?;
        let subject = format!("{}.k.rv.{}", self.inner.p, token(key));
        for _ in 0..MAX_ATTEMPTS {
            let current = Self::last_of(&streams.keep, &subject).await?;
            let kept = current.as_ref().and_then(|e| std::str::from_utf8(&e.payload).ok()?.parse::<u64>().ok());
            if kept.is_some_and(|k| k >= until_ms) {
                return Ok(()); // the longer revocation wins
            }
            let expect = current.map_or(0, |e| e.seq);
            if self.append(&subject, HeaderMap::new(), expect, until_ms.to_string().into()).await?.is_some() {
                return Ok(());
            }
        }
        Err(unavailable("revocation: too much contention"))
    }

    async fn revocations(&self) -> Result<Vec<(String, u64)>, BrokerError> {
        let streams = self.streams().await?;
        let prefix = format!("{}.k.rv.", self.inner.p);
        let now = now_millis();
        let mut live = Vec::new();
        for e in Self::read_each(&streams.keep, &format!("{prefix}*")).await? {
            let until = std::str::from_utf8(&e.payload).ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            let key = e.subject.strip_prefix(&prefix).and_then(untoken);
            match key {
                Some(k) if until > now => live.push((k, until)),
                // Lapsed: gone for everyone.
                _ => {
                    let _ = streams.keep.purge().filter(e.subject).await;
                }
            }
        }
        Ok(live)
    }

    async fn claim(
        &self,
        channel: &ChannelName,
        owner: &str,
        positions: &[StreamPosition],
        _ttl: Duration,
    ) -> Result<Vec<bool>, BrokerError> {
        self.streams().await?;
        // One subject per publication and owner: the first node to append to it delivers.
        // (Claims live as long as the state stream keeps messages, an hour, which is at
        // least the TTL asked for; an offset is never claimed twice within an epoch.)
        let claims = positions.iter().map(|at| {
            let subject = self.state_subject("cl", &[channel.as_str(), owner, &at.epoch, &at.offset.to_string()]);
            let node = Bytes::from(self.inner.node_id.clone());
            async move { self.append(&subject, HeaderMap::new(), 0, node).await.map(|a| a.is_some()) }
        });
        futures_util::future::join_all(claims).await.into_iter().collect()
    }
}
