//! Outgoing webhooks (docs/webhooks.md): events of channels, presence, publications and
//! connections, POSTed to configured endpoints — signed, batched if asked, retried with
//! full-jitter exponential backoff up to a horizon, then dead-lettered; queued durably
//! (the embedded [`store::FileStore`]) so a restart or a crash loses nothing pending.
//!
//! Emitting never waits: an event is queued (or, past `max_pending`, dropped and
//! counted) and each endpoint's delivery task sends it.

pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use switchboard_core::ChannelName;

use crate::app::AppState;
use crate::config::{PublicationSource, WebhookEndpoint, WebhooksConfig};
use crate::limits::backoff;
use store::{FileStore, Item};
use switchboard_core::now_millis;

/// The signature header: `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, one per
/// secret, comma-separated.
pub const SIGNATURE_HEADER: &str = "switchboard-signature";
pub const TIMESTAMP_HEADER: &str = "switchboard-timestamp";
/// The request's id: its event's id, or for a batch `bat_…` (each event has its own).
pub const ID_HEADER: &str = "switchboard-id";

/// Hex HMAC-SHA256 of `timestamp.body` under `secret`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    crate::auth::hex(ctx.sign().as_ref())
}

/// The signature header's value for `secrets`.
pub fn signature_header(secrets: &[String], timestamp: u64, body: &[u8]) -> String {
    secrets.iter().map(|s| format!("v1={}", sign(s.as_bytes(), timestamp, body))).collect::<Vec<_>>().join(",")
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", crate::auth::random_hex(12))
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct WebhookMetrics {
    /// Events delivered (2xx).
    pub sent: AtomicU64,
    /// Requests that failed (non-2xx, timeout, connection error).
    pub failed: AtomicU64,
    /// Events scheduled for another attempt.
    pub retried: AtomicU64,
    /// Events moved to the dead-letter list.
    pub dead: AtomicU64,
    /// Events not queued: `max_pending` was reached.
    pub dropped: AtomicU64,
    pub latency: crate::metrics::Histogram,
}

/// One endpoint at run time.
struct Endpoint {
    cfg: WebhookEndpoint,
    name: String,
    /// Failed requests in a row, and until when the breaker rests the endpoint.
    failures: AtomicU32,
    open_until: std::sync::Mutex<Option<Instant>>,
}

impl Endpoint {
    fn wants(&self, kind: &str, channel: Option<&ChannelName>, from_client: bool) -> bool {
        if !self.cfg.events.iter().any(|e| e == kind) {
            return false;
        }
        if kind == "publication" && !from_client && self.cfg.publications == PublicationSource::Client {
            return false;
        }
        match channel {
            Some(c) if !self.cfg.channels.is_empty() => {
                self.cfg.channels.iter().any(|name| switchboard_core::pattern::covers(name, c))
            }
            _ => true,
        }
    }
}

/// Where events wait: the embedded queue, or (with the Redis broker) Redis Streams shared
/// by the nodes — each event delivered by exactly one node, and a node's unfinished ones
/// claimed by another when it dies.
enum Store {
    File(Arc<FileStore>),
    Redis(Box<RedisStore>),
}

struct RedisStore {
    /// One queue per endpoint, by name.
    queues: std::collections::HashMap<String, switchboard_redis::RedisQueue>,
    /// (pending, dead) per endpoint, as last read (the delivery tasks refresh them).
    depth: std::sync::Mutex<std::collections::HashMap<String, (usize, usize)>>,
    occupancy: switchboard_redis::Occupancy,
}

impl RedisStore {
    fn queue(&self, ep: &str) -> &switchboard_redis::RedisQueue {
        self.queues.get(ep).expect("a queue per endpoint")
    }

    fn depth(&self) -> (usize, usize) {
        let d = self.depth.lock().unwrap_or_else(|p| p.into_inner());
        d.values().fold((0, 0), |(p, x), (a, b)| (p + a, x + b))
    }
}

pub struct Webhooks {
    me: std::sync::Weak<Webhooks>,
    endpoints: Vec<Arc<Endpoint>>,
    store: Store,
    cfg: WebhooksConfig,
    node: String,
    client: reqwest::Client,
    pub metrics: WebhookMetrics,
}

impl Webhooks {
    /// The webhooks of `config` (none when no endpoint is configured).
    pub fn from_config(config: &crate::config::Config, node: &str) -> anyhow::Result<Option<Arc<Webhooks>>> {
        let cfg = &config.webhooks;
        if cfg.endpoints.is_empty() {
            return Ok(None);
        }
        let store = match config.broker.kind {
            crate::config::BrokerKind::Redis => {
                let b = &config.broker;
                let prefix = format!("{}:webhooks", b.redis_prefix);
                let mut queues = std::collections::HashMap::new();
                for e in &cfg.endpoints {
                    // A taken event not finished within twice the request timeout (and
                    // some) belongs to a node that died: another takes it over.
                    let abandoned = Duration::from_millis(e.timeout_ms.saturating_mul(2)) + Duration::from_secs(5);
                    let q = switchboard_redis::RedisQueue::open(
                        &crate::redis_target(config),
                        &prefix,
                        e.name(),
                        node,
                        abandoned,
                    )?;
                    queues.insert(e.name().to_string(), q);
                }
                let occupancy =
                    switchboard_redis::Occupancy::open(&crate::redis_target(config), &b.redis_prefix, node)?;
                Store::Redis(Box::new(RedisStore { queues, depth: Default::default(), occupancy }))
            }
            // (NATS: refused by the configuration's check.)
            crate::config::BrokerKind::Memory | crate::config::BrokerKind::Nats => {
                // Beside durable history when there is a data directory.
                let dir = cfg
                    .dir
                    .clone()
                    .or_else(|| config.broker.data_dir.as_ref().map(|d| d.join("webhooks")))
                    .unwrap_or_else(|| "switchboard-data/webhooks".into());
                let store = FileStore::open(&dir, cfg.fsync == crate::config::WebhookFsync::Always)
                    .map_err(|e| anyhow::anyhow!("webhooks.dir {}: {e}", dir.display()))?;
                let r = &store.recovered;
                if r.pending + r.dead > 0 || r.dropped_bytes > 0 {
                    tracing::info!(
                        pending = r.pending,
                        dead = r.dead,
                        torn_bytes_dropped = r.dropped_bytes,
                        "webhook queue recovered from {}",
                        dir.display()
                    );
                }
                if r.dropped_bytes > 0 {
                    tracing::warn!("webhook queue: {} bytes of a torn last write were cut off", r.dropped_bytes);
                }
                Store::File(store)
            }
        };
        let client = reqwest::Client::builder()
            .user_agent(concat!("Switchboard-Webhooks/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|e| {
                Arc::new(Endpoint {
                    name: e.name().to_string(),
                    cfg: e.clone(),
                    failures: AtomicU32::new(0),
                    open_until: Default::default(),
                })
            })
            .collect();
        let metrics = WebhookMetrics { latency: crate::metrics::Histogram::latency(), ..Default::default() };
        let (cfg, node) = (cfg.clone(), node.to_string());
        Ok(Some(Arc::new_cyclic(|me| Webhooks { me: me.clone(), endpoints, store, cfg, node, client, metrics })))
    }

    /// Queues an event of `kind` for every endpoint that takes it. `from_client`: for
    /// `publication`, whether a client (not the API) published it.
    pub fn emit(&self, kind: &str, channel: Option<&ChannelName>, from_client: bool, data: serde_json::Value) {
        let eps: Vec<&str> =
            self.endpoints.iter().filter(|e| e.wants(kind, channel, from_client)).map(|e| e.name.as_str()).collect();
        if eps.is_empty() {
            return;
        }
        let id = new_id("evt");
        let event = serde_json::json!({"id": id, "type": kind, "time": now_millis(), "node": self.node, "data": data});
        let Ok(raw) = RawValue::from_string(event.to_string()) else { return };
        let queued = match &self.store {
            Store::File(f) => f.add(&eps, &id, &raw, self.cfg.max_pending),
            Store::Redis(r) => {
                let room = r.depth().0 + eps.len() <= self.cfg.max_pending;
                let rt = tokio::runtime::Handle::try_current();
                let queued = room && rt.is_ok();
                if let (true, Ok(rt)) = (room, rt) {
                    let now = now_millis();
                    let item = Item { id, attempt: 0, first: now, due: now, error: None, event: raw, entry: None };
                    let payload = serde_json::to_string(&item).unwrap_or_default();
                    for ep in eps.iter() {
                        let (w, ep, payload) = (self.me(), ep.to_string(), payload.clone());
                        rt.spawn(async move {
                            let Store::Redis(r) = &w.store else { return };
                            if let Err(e) = r.queue(&ep).push(&[payload]).await {
                                // Redis unreachable: the event is lost, and counted.
                                tracing::warn!(endpoint = %ep, "webhook event not queued: {e}");
                                w.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                }
                queued
            }
        };
        if !queued {
            self.metrics.dropped.fetch_add(eps.len() as u64, Ordering::Relaxed);
        }
    }

    fn me(&self) -> Arc<Webhooks> {
        self.me.upgrade().expect("alive while in use")
    }

    /// Whether some endpoint takes events of `kind` (to skip building them otherwise).
    pub fn wants(&self, kind: &str) -> bool {
        self.endpoints.iter().any(|e| e.cfg.events.iter().any(|k| k == kind))
    }

    /// Events waiting (for Redis: as last read, within a second or so).
    pub fn pending(&self) -> usize {
        match &self.store {
            Store::File(f) => f.pending(),
            Store::Redis(r) => r.depth().0,
        }
    }

    pub fn dead_count(&self) -> usize {
        match &self.store {
            Store::File(f) => f.dead_count(),
            Store::Redis(r) => r.depth().1,
        }
    }

    /// The dead-letter list: (endpoint, event), oldest first.
    pub async fn dead_list(&self) -> Result<Vec<(String, Item)>, switchboard_core::BrokerError> {
        match &self.store {
            Store::File(f) => Ok(f.dead_list()),
            Store::Redis(r) => {
                let mut out = Vec::new();
                for (name, q) in &r.queues {
                    for (_, payload) in q.dead_list().await? {
                        if let Ok(item) = serde_json::from_str::<Item>(&payload) {
                            out.push((name.clone(), item));
                        }
                    }
                }
                out.sort_by(|a, b| (a.1.first, &a.1.id).cmp(&(b.1.first, &b.1.id)));
                Ok(out)
            }
        }
    }

    /// Dead events back to the queue (of `ep`, or all; only `ids` when given): how many.
    pub async fn replay(
        &self,
        ep: Option<&str>,
        ids: Option<&[String]>,
    ) -> Result<usize, switchboard_core::BrokerError> {
        match &self.store {
            Store::File(f) => Ok(f.replay(ep, ids)),
            Store::Redis(r) => {
                let mut n = 0;
                for (name, q) in r.queues.iter().filter(|(name, _)| ep.is_none_or(|e| e == name.as_str())) {
                    // Revived as new: attempts and the horizon start again.
                    let dead = q.dead_list().await?;
                    let chosen: Vec<&(String, String)> =
                        dead.iter().filter(|(id, _)| ids.is_none_or(|ids| ids.contains(id))).collect();
                    if chosen.is_empty() {
                        continue;
                    }
                    let now = now_millis();
                    let fresh: Vec<String> = chosen
                        .iter()
                        .filter_map(|(_, payload)| serde_json::from_str::<Item>(payload).ok())
                        .map(|mut i| {
                            (i.attempt, i.first, i.due, i.error) = (0, now, now, None);
                            serde_json::to_string(&i).unwrap_or_default()
                        })
                        .collect();
                    q.push(&fresh).await?;
                    let ids: Vec<String> = chosen.iter().map(|(id, _)| id.clone()).collect();
                    q.forget_dead(&ids).await?;
                    tracing::debug!(endpoint = %name, replayed = ids.len(), "webhook dead letters replayed");
                    n += ids.len();
                }
                Ok(n)
            }
        }
    }

    pub fn endpoint_names(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.name.clone()).collect()
    }

    /// Up to `max` due events of `ep`, taken for delivery (waits for the first).
    async fn take(&self, ep: &str, max: usize, batch: Duration) -> Vec<Item> {
        let r = match &self.store {
            Store::File(f) => return f.take(ep, max, batch).await,
            Store::Redis(r) => r,
        };
        let q = r.queue(ep);
        let parse = |taken: Vec<switchboard_redis::Taken>| -> Vec<Item> {
            taken
                .into_iter()
                .filter_map(|t| {
                    let mut item: Item = serde_json::from_str(&t.payload).ok()?;
                    item.entry = Some(t.entry);
                    Some(item)
                })
                .collect()
        };
        loop {
            match q.take(max, Duration::from_secs(1), now_millis()).await {
                Ok(t) if t.is_empty() => {}
                Ok(t) => {
                    let mut items = parse(t);
                    if items.len() < max && !batch.is_zero() {
                        // A batch: what else comes within the batch time.
                        tokio::time::sleep(batch).await;
                        if let Ok(more) = q.take(max - items.len(), Duration::from_millis(1), now_millis()).await {
                            items.extend(parse(more));
                        }
                    }
                    if !items.is_empty() {
                        return items;
                    }
                }
                Err(e) => {
                    tracing::warn!(endpoint = %ep, "webhook queue: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn done(&self, ep: &str, items: &[Item]) {
        match &self.store {
            Store::File(f) => f.done(ep, &items.iter().map(|i| i.id.clone()).collect::<Vec<_>>()),
            Store::Redis(r) => {
                for i in items {
                    if let Err(e) = r.queue(ep).done(i.entry.as_deref().unwrap_or_default()).await {
                        // Left pending: another attempt later (at least once).
                        tracing::warn!(endpoint = %ep, "webhook queue: {e}");
                    }
                }
            }
        }
    }

    /// `item` failed: tried again at `due`, or (`dead`) moved to the dead-letter list.
    async fn failed(&self, ep: &str, item: &Item, due: Option<u64>, error: &str) {
        match &self.store {
            Store::File(f) => match due {
                Some(due) => f.later(ep, item, due, error),
                None => f.dead(ep, item, error),
            },
            Store::Redis(r) => {
                let mut next = item.clone();
                (next.attempt, next.error) = (item.attempt + 1, Some(error.to_string()));
                next.due = due.unwrap_or(next.due);
                let payload = serde_json::to_string(&next).unwrap_or_default();
                let entry = item.entry.as_deref().unwrap_or_default();
                let q = r.queue(ep);
                let r = match due {
                    Some(due) => q.later(entry, &payload, due).await,
                    None => q.dead(entry, &item.id, &payload).await,
                };
                if let Err(e) = r {
                    tracing::warn!(endpoint = %ep, "webhook queue: {e}");
                }
            }
        }
    }

    /// Starts each endpoint's delivery task (until shutdown).
    pub fn start(self: &Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        for ep in &self.endpoints {
            let (me, endpoint, mut stop) = (self.clone(), ep.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = me.deliver_loop(&endpoint) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
            if let Store::Redis(_) = &self.store {
                // The queue's depth, for `max_pending` and the metrics, read every second.
                let (me, name, mut shutdown) = (self.clone(), ep.name.clone(), shutdown.clone());
                tokio::spawn(async move {
                    loop {
                        let Store::Redis(r) = &me.store else { return };
                        if let Ok(d) = r.queue(&name).depth().await {
                            r.depth.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), d);
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.wait_for(|s| *s) => return,
                        }
                    }
                });
            }
        }
    }

    async fn deliver_loop(self: &Arc<Self>, ep: &Arc<Endpoint>) {
        if let Store::Redis(r) = &self.store {
            while let Err(e) = r.queue(&ep.name).create_group().await {
                tracing::warn!(endpoint = %ep.name, "webhook queue: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(ep.cfg.concurrency));
        let batch = Duration::from_millis(ep.cfg.batch_ms);
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let items = self.take(&ep.name, ep.cfg.batch_max, batch).await;
            // The breaker, checked right before sending (requests that were in flight
            // have told their outcome by now): a resting endpoint gets no requests.
            loop {
                let rest = ep.open_until.lock().unwrap_or_else(|p| p.into_inner()).and_then(|t| {
                    let now = Instant::now();
                    (t > now).then(|| t - now)
                });
                match rest {
                    Some(rest) => tokio::time::sleep(rest).await,
                    None => break,
                }
            }
            let (me, ep2) = (self.clone(), ep.clone());
            let attempt = async move {
                me.attempt(&ep2, items).await;
                drop(slot);
            };
            // After a failure the breaker may have opened: one request at a time until
            // one succeeds (half-open).
            if ep.failures.load(Ordering::Relaxed) >= ep.cfg.breaker_failures {
                attempt.await;
            } else {
                tokio::spawn(attempt);
            }
        }
    }

    /// One request carrying `items`; then each is done, retried later or dead.
    async fn attempt(&self, ep: &Endpoint, items: Vec<Item>) {
        let mut body = Vec::with_capacity(16 + items.iter().map(|i| i.event.get().len() + 1).sum::<usize>());
        body.extend_from_slice(b"{\"events\":[");
        for (n, i) in items.iter().enumerate() {
            if n > 0 {
                body.push(b',');
            }
            body.extend_from_slice(i.event.get().as_bytes());
        }
        body.extend_from_slice(b"]}");
        let id = if items.len() == 1 { items[0].id.clone() } else { new_id("bat") };
        let ts = now_millis() / 1000;
        let signature = signature_header(&ep.cfg.secrets, ts, &body);
        let started = Instant::now();
        let sent = self
            .client
            .post(&ep.cfg.url)
            .timeout(Duration::from_millis(ep.cfg.timeout_ms))
            .header("content-type", "application/json")
            .header(ID_HEADER, &id)
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        self.metrics.latency.observe(started.elapsed());
        let error = match sent {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("HTTP {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Some(format!("no answer within {} ms", ep.cfg.timeout_ms)),
            Err(e) if e.is_connect() => Some("connection failed".to_string()),
            Err(e) => Some(format!("request failed: {e}")),
        };
        let Some(error) = error else {
            self.done(&ep.name, &items).await;
            self.metrics.sent.fetch_add(items.len() as u64, Ordering::Relaxed);
            ep.failures.store(0, Ordering::Relaxed);
            *ep.open_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return;
        };
        tracing::debug!(endpoint = %ep.name, %error, events = items.len(), "webhook attempt failed");
        self.metrics.failed.fetch_add(1, Ordering::Relaxed);
        let failures = ep.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= ep.cfg.breaker_failures {
            let until = Instant::now() + Duration::from_millis(ep.cfg.breaker_cooldown_ms);
            *ep.open_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
        }
        let now = now_millis();
        let horizon = self.cfg.horizon_secs.saturating_mul(1000);
        let (initial, max) =
            (Duration::from_millis(self.cfg.backoff_initial_ms), Duration::from_millis(self.cfg.backoff_max_ms));
        for item in &items {
            let wait = backoff(item.attempt + 1, initial, max);
            let due = now + wait.as_millis() as u64;
            if due.saturating_sub(item.first) >= horizon {
                self.failed(&ep.name, item, None, &error).await;
                self.metrics.dead.fetch_add(1, Ordering::Relaxed);
            } else {
                self.failed(&ep.name, item, Some(due), &error).await;
                self.metrics.retried.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Emits an event of `kind` if some endpoint takes it; `data` is built only then.
pub fn emit(
    state: &AppState,
    kind: &str,
    channel: Option<&ChannelName>,
    from_client: bool,
    data: impl FnOnce() -> serde_json::Value,
) {
    if let Some(w) = state.webhooks.as_ref().filter(|w| w.wants(kind)) {
        w.emit(kind, channel, from_client, data());
    }
}

/// A connection's `connection.opened` (at [`ConnectionEvents::open`]) and
/// `connection.closed` (when dropped) events.
pub struct ConnectionEvents {
    webhooks: Arc<Webhooks>,
    client: String,
    user: Option<String>,
    transport: &'static str,
}

impl ConnectionEvents {
    /// Emits `connection.opened`; the guard emits `connection.closed`. None when no
    /// endpoint takes either.
    pub fn open(state: &AppState, client: &str, user: Option<&str>, transport: &'static str) -> Option<Box<Self>> {
        let w = state.webhooks.as_ref().filter(|w| w.wants("connection.opened") || w.wants("connection.closed"))?;
        let (client, user) = (client.to_string(), user.map(str::to_string));
        w.emit(
            "connection.opened",
            None,
            true,
            serde_json::json!({"client": client, "user": user, "transport": transport}),
        );
        Some(Box::new(ConnectionEvents { webhooks: w.clone(), client, user, transport }))
    }

    /// The connection authenticated later (`connect`): its closing event names the user.
    pub fn set_user(&mut self, user: &str) {
        self.user = Some(user.to_string());
    }
}

impl Drop for ConnectionEvents {
    fn drop(&mut self) {
        let data = serde_json::json!({"client": self.client, "user": self.user, "transport": self.transport});
        self.webhooks.emit("connection.closed", None, true, data);
    }
}

/// Hooks the events into the server: channel occupancy from the hub. (Presence,
/// publications and connections emit where they happen.)
pub fn start(state: &AppState) {
    let Some(w) = &state.webhooks else { return };
    w.start(state.shutdown.clone());
    if !(w.wants("channel.occupied") || w.wants("channel.vacated")) {
        return;
    }
    let weak = std::sync::Arc::downgrade(w);
    let occupancy = |w: &Webhooks, channel: &ChannelName, occupied: bool| {
        let kind = if occupied { "channel.occupied" } else { "channel.vacated" };
        w.emit(kind, Some(channel), false, serde_json::json!({ "channel": channel }));
    };
    match &w.store {
        // One node is the cluster.
        Store::File(_) => state.hub.set_occupancy_handler(Box::new(move |channel, occupied| {
            if let Some(w) = weak.upgrade() {
                occupancy(&w, channel, occupied);
            }
        })),
        // Across nodes: the first node to have a subscriber tells, the last to lose its
        // last tells — one task, so this node's changes reach Redis in their order.
        Store::Redis(_) => {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(ChannelName, bool)>();
            state.hub.set_occupancy_handler(Box::new(move |channel, occupied| {
                let _ = tx.send((channel.clone(), occupied));
            }));
            tokio::spawn(async move {
                while let Some((channel, occupied)) = rx.recv().await {
                    let Some(w) = weak.upgrade() else { return };
                    let Store::Redis(r) = &w.store else { return };
                    match r.occupancy.set(channel.as_str(), occupied).await {
                        Ok(true) => occupancy(&w, &channel, occupied),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(%channel, "webhook occupancy: {e}"),
                    }
                }
            });
            // A node that dies keeps the channels it occupied: the others reap it.
            let weak = std::sync::Arc::downgrade(&state.inner);
            tokio::spawn(async move {
                let mut missing = HashMap::new();
                let mut tick = tokio::time::interval(REAP_EVERY);
                loop {
                    tick.tick().await;
                    let Some(state) = AppState::running(&weak) else { return };
                    reap_dead_nodes(&state, &mut missing, REAP_GRACE).await;
                }
            });
        }
    }
}

/// How often the nodes look for a dead node's channels, and how long a node must have
/// been missing from the live nodes (whose registrations lapse 15 s after their last
/// heartbeat) before its channels are taken back.
const REAP_EVERY: Duration = Duration::from_secs(15);
const REAP_GRACE: Duration = Duration::from_secs(30);

/// Takes nodes that stopped (killed: no leave was told for their channels) out of the
/// channels they occupied, once each has been missing from the live nodes for `grace` —
/// `missing` remembers since when — and tells `channel.vacated` for every channel that
/// leaves empty. A node that finds itself reaped (its heartbeats lapsed, but it lives)
/// tells its channels again (`channel.occupied` where that makes them occupied).
pub async fn reap_dead_nodes(state: &AppState, missing: &mut HashMap<String, Instant>, grace: Duration) {
    let Some(w) = &state.webhooks else { return };
    let Store::Redis(r) = &w.store else { return };
    let live = match state.hub.broker().nodes().await {
        Ok(Some(nodes)) => nodes.into_iter().map(|n| n.id).collect::<std::collections::HashSet<_>>(),
        Ok(None) => return,
        Err(e) => return tracing::debug!("occupancy: live nodes unknown: {e}"),
    };
    let listed = match r.occupancy.nodes().await {
        Ok(l) => l,
        Err(e) => return tracing::debug!("occupancy: {e}"),
    };
    let now = Instant::now();
    missing.retain(|id, _| listed.contains(id) && !live.contains(id));
    let tell = |channel: &str, occupied: bool| {
        if let Ok(ch) = ChannelName::parse(channel) {
            let kind = if occupied { "channel.occupied" } else { "channel.vacated" };
            w.emit(kind, Some(&ch), false, serde_json::json!({ "channel": ch }));
        }
    };
    for id in listed.iter().filter(|id| **id != state.node_id && !live.contains(*id)) {
        let since = *missing.entry(id.clone()).or_insert(now);
        if now.duration_since(since) < grace {
            continue;
        }
        match r.occupancy.reap(id).await {
            Ok(vacated) => {
                tracing::info!(node = %id, vacated = vacated.len(), "occupancy: a gone node's channels taken back");
                for ch in &vacated {
                    tell(ch, false);
                }
                missing.remove(id);
            }
            Err(e) => tracing::warn!(node = %id, "occupancy: reaping failed: {e}"),
        }
    }
    if matches!(r.occupancy.listed().await, Ok(false)) {
        for (channel, _) in state.hub.channels() {
            if let Ok(true) = r.occupancy.set(channel.as_str(), true).await {
                tell(channel.as_str(), true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        // Computed independently: Python's hmac.new(secret, b'1700000000.{"a":1}', sha256).
        let sig = sign(b"secret-0123456789abcdef", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(sig, "8eae3d28cb521b6b37f86de366c0b3de07baa3505577e5d97c7b1625541e4a2c");
        let two = signature_header(&["secret-0123456789abcdef".into(), "another-secret-0123456".into()], 1, b"x");
        assert_eq!(two.matches("v1=").count(), 2);
    }
}
