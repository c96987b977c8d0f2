//! Publication sources (docs/sources.md): publications that come from the application's
//! own systems rather than its API calls — a PostgreSQL outbox table, a RabbitMQ queue, a
//! Redis Stream, a NATS JetStream stream.
//!
//! RabbitMQ: the queue is consumed with manual acknowledgements (`prefetch` at most
//! unacknowledged), one message at a time in queue order; each is acknowledged only once
//! its publication is stored. A message delivered again (the node died before its ack)
//! carries the same idempotency key — its `key`, else its message id — and is not
//! published twice. Poison messages are sent to `dead_letter_exchange` if configured,
//! then acknowledged.
//!
//! The PostgreSQL outbox: the application inserts a row into an outbox table in the same
//! transaction as its data; this consumer claims committed rows in batches
//! (`FOR UPDATE SKIP LOCKED`, so several nodes share a table and each row is claimed by
//! one), publishes each with the idempotency key `outbox:<table>:<id>` (or the row's own
//! `key`), deletes them, and commits. A node that dies between publishing and committing
//! leaves its rows to be claimed again; their keys make the second publish a no-op, so
//! each row is published once. It wakes on the table's `NOTIFY` and looks anyway every
//! `poll_ms`. A row that cannot be published (an invalid channel) is a poison row: moved
//! to `dead_table` if configured, else dropped — logged and counted either way, never
//! retried forever. Connection failures are retried with full-jitter backoff.
//!
//! A Redis Stream is read through a consumer group (one node per entry), in batches; each
//! entry is published with its `key` or `redis:<stream>:<entry id>`, and the batch is
//! acknowledged after its publications are stored. Entries left unacknowledged by a
//! consumer that died are claimed after `claim_idle_ms`; their keys make a second publish
//! a no-op.
//!
//! A NATS JetStream stream is read through a durable pull consumer (explicit acks, ack
//! wait `claim_idle_ms`); each message is published with its `key`, its `Nats-Msg-Id` or
//! `nats:<stream>:<sequence>`, then acknowledged; one not acknowledged comes again after
//! the ack wait.
//!
//! Every source publishes through `publish` (the same door as the API: namespace,
//! size, idempotency) and counts consumed, published, deduped, poison, errors and lag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::app::AppState;
use crate::commands::ops;
use crate::config::SourceConfig;

/// A source's counters (`switchboard_source_messages_total{source,outcome}`).
#[derive(Default)]
pub struct SourceMetrics {
    pub name: String,
    /// Rows claimed.
    pub consumed: AtomicU64,
    /// Rows published (the broker answered), duplicates included.
    pub published: AtomicU64,
    /// Of those, duplicates: the idempotency key had been published already (a
    /// redelivery after a crash or a lost ack), so nothing new went out.
    pub deduped: AtomicU64,
    /// Poison rows (dead-lettered or dropped).
    pub poison: AtomicU64,
    /// Failed rounds (the database or the broker unreachable): retried.
    pub errors: AtomicU64,
    /// 1 while connected and listening.
    pub connected: AtomicU64,
    /// Messages waiting at the source when last sampled (every `LAG_EVERY` while
    /// connected): RabbitMQ's ready count, the outbox's rows (counted up to `LAG_CAP`),
    /// the Stream's entries the group has not read, the JetStream consumer's pending.
    pub lag: AtomicU64,
}

/// How long a source's connection attempt may take (a server that accepts and then says
/// nothing is a failed attempt, retried with backoff).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a connected source samples its lag.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// The outbox's rows are counted up to this many (a count is a scan).
const LAG_CAP: i64 = 1_000_000;

/// Each source's state and counters (the admin page's rows).
pub fn summary(state: &AppState) -> Vec<serde_json::Value> {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let sources = state.sources.get().map(|s| s.as_slice()).unwrap_or_default();
    sources
        .iter()
        .map(|s| {
            serde_json::json!({
                "source": s.name,
                "state": if load(&s.connected) == 1 { "connected" } else { "disconnected" },
                "consumed": load(&s.consumed),
                "published": load(&s.published),
                "deduped": load(&s.deduped),
                "poison": load(&s.poison),
                "errors": load(&s.errors),
                "lag": load(&s.lag),
            })
        })
        .collect()
}

/// Starts every configured source; their metrics.
pub fn start(state: &AppState) -> Vec<Arc<SourceMetrics>> {
    state
        .config
        .sources
        .iter()
        .map(|cfg| {
            let metrics = Arc::new(SourceMetrics { name: cfg.name(), ..Default::default() });
            tokio::spawn(run(state.clone(), cfg.clone(), metrics.clone()));
            metrics
        })
        .collect()
}

async fn run(state: AppState, cfg: SourceConfig, metrics: Arc<SourceMetrics>) {
    let mut shutdown = state.shutdown.clone();
    let mut failures: u32 = 0;
    loop {
        let outcome = tokio::select! {
            r = async {
                match cfg.kind {
                    crate::config::SourceKind::PostgresOutbox => outbox(&state, &cfg, &metrics, &mut failures).await,
                    crate::config::SourceKind::Rabbitmq => rabbitmq(&state, &cfg, &metrics, &mut failures).await,
                    crate::config::SourceKind::RedisStream => redis_stream(&state, &cfg, &metrics, &mut failures).await,
                    crate::config::SourceKind::NatsJetstream => jetstream(&state, &cfg, &metrics, &mut failures).await,
                }
            } => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        metrics.connected.store(0, Ordering::Relaxed);
        if let Err(e) = outcome {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
            failures = failures.saturating_add(1);
            // Full jitter, from 200 ms doubling to 30 s.
            let wait = crate::limits::backoff(failures + 1, Duration::from_millis(100), Duration::from_secs(30));
            tracing::warn!(source = %metrics.name, "source: {e}; again in {} ms", wait.as_millis());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// One connection's life: LISTEN, then claim and publish until something fails.
async fn outbox(
    state: &AppState,
    cfg: &SourceConfig,
    metrics: &SourceMetrics,
    failures: &mut u32,
) -> Result<(), String> {
    let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(|e| format!("url: {e}"))?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    if pg.get_application_name().is_none() {
        // What `pg_stat_activity` shows for this connection.
        pg.application_name(format!("switchboard {}", metrics.name));
    }
    let (mut client, mut conn) = pg.connect(tokio_postgres::NoTls).await.map_err(|e| format!("connect: {e}"))?;
    // The connection is driven here; its notifications wake the loop below.
    let (wake_tx, mut wake) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    let _ = wake_tx.send(());
                }
                Ok(_) => {}
                Err(e) => return format!("connection: {e}"),
            }
        }
        "the database closed the connection".to_string()
    });
    let listen = client.batch_execute(&format!("LISTEN {}", cfg.notify)).await;
    listen.map_err(|e| format!("LISTEN {}: {e}", cfg.notify))?;
    metrics.connected.store(1, Ordering::Relaxed);
    let poll = Duration::from_millis(cfg.poll_ms);
    let lag = format!("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT {LAG_CAP}) AS waiting", cfg.table);
    let mut sampled: Option<tokio::time::Instant> = None;
    loop {
        if sampled.is_none_or(|t| t.elapsed() >= LAG_EVERY) {
            let n: i64 = client.query_one(&lag, &[]).await.map_err(|e| format!("query: {e}"))?.get(0);
            metrics.lag.store(n as u64, Ordering::Relaxed);
            sampled = Some(tokio::time::Instant::now());
        }
        // Notifications so far are for commits this claim sees; one arriving from now on
        // may be for a row its snapshot misses, and wakes the next.
        while wake.try_recv().is_ok() {}
        let n = claim_and_publish(state, cfg, metrics, &mut client).await?;
        *failures = 0;
        if n >= cfg.batch {
            continue; // more may be waiting
        }
        let idle_since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = wake.recv() => break,
                _ = tokio::time::sleep_until(idle_since + poll) => break,
                // Idle: the lag is sampled on time all the same (rows held by another
                // node's claim, or left by one that rolled back until `poll_ms` finds them).
                _ = tokio::time::sleep_until(sampled.map_or(idle_since, |t| t + LAG_EVERY)) => {
                    let n: i64 = client.query_one(&lag, &[]).await.map_err(|e| format!("query: {e}"))?.get(0);
                    metrics.lag.store(n as u64, Ordering::Relaxed);
                    sampled = Some(tokio::time::Instant::now());
                }
                r = &mut driver => return Err(r.unwrap_or_else(|e| format!("connection task: {e}"))),
            }
        }
    }
}

/// One transaction: claims up to `batch` committed rows, publishes them in id order,
/// deletes them. Rows stay (the transaction rolls back) if the broker fails.
async fn claim_and_publish(
    state: &AppState,
    cfg: &SourceConfig,
    metrics: &SourceMetrics,
    client: &mut tokio_postgres::Client,
) -> Result<usize, String> {
    let db = |e: tokio_postgres::Error| format!("query: {e}");
    let tx = client.transaction().await.map_err(db)?;
    let claim = format!(
        "SELECT id, channel, data::text, key, volatile FROM {} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        cfg.table
    );
    let rows = tx.query(&claim, &[&(cfg.batch as i64)]).await.map_err(db)?;
    metrics.consumed.fetch_add(rows.len() as u64, Ordering::Relaxed);
    let mut done: Vec<i64> = Vec::with_capacity(rows.len());
    let mut poison: Vec<i64> = Vec::new();
    for row in &rows {
        let id: i64 = row.get(0);
        let channel: String = row.get(1);
        let data: String = row.get(2);
        let key: Option<String> = row.get(3);
        let volatile: bool = row.get(4);
        let (resolved, data) = match checked(state, &channel, data) {
            Ok(r) => r,
            Err(why) => {
                tracing::warn!(source = %metrics.name, id, channel, "poison row: {why}");
                poison.push(id);
                continue;
            }
        };
        let key = key.unwrap_or_else(|| format!("outbox:{}:{id}", cfg.table));
        // On an error the broker cannot take it now: nothing is deleted, the rows come again.
        publish(state, metrics, &resolved, data, Some(key), volatile).await?;
        done.push(id);
    }
    if !poison.is_empty() {
        metrics.poison.fetch_add(poison.len() as u64, Ordering::Relaxed);
        if let Some(dead) = &cfg.dead_table {
            let keep = format!("INSERT INTO {dead} SELECT * FROM {} WHERE id = ANY($1)", cfg.table);
            tx.execute(&keep, &[&poison]).await.map_err(db)?;
        }
        done.extend(&poison);
    }
    if !done.is_empty() {
        tx.execute(&format!("DELETE FROM {} WHERE id = ANY($1)", cfg.table), &[&done]).await.map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    Ok(rows.len())
}

/// A source's channel and data as a publication's, through the same checks as every other
/// publish (the channel's namespace; `limits.max_message_bytes`, one line) — or why not
/// (a poison message).
fn checked(state: &AppState, channel: &str, json: String) -> Result<(crate::session::Resolved, bytes::Bytes), String> {
    let resolved = crate::session::resolve_channel(state, channel).map_err(|e| e.message)?;
    let raw = serde_json::value::RawValue::from_string(json).map_err(|e| format!("data is not JSON: {e}"))?;
    let data = ops::payload(state, &raw).map_err(|e| e.message)?;
    Ok((resolved, data))
}

/// Publishes one message of a source — stored with its idempotency key, or volatile (no
/// key: not stored, so a redelivery is published again) — and counts it.
async fn publish(
    state: &AppState,
    metrics: &SourceMetrics,
    resolved: &crate::session::Resolved,
    data: bytes::Bytes,
    key: Option<String>,
    volatile: bool,
) -> Result<(), String> {
    let key = key.filter(|_| !volatile);
    let r = ops::publish_to(state, resolved, data, volatile.then_some(true), key, ops::Publisher::Api, None).await;
    let outcome = r.map_err(|e| format!("publish: {}: {}", e.code.as_str(), e.message))?;
    metrics.published.fetch_add(1, Ordering::Relaxed);
    if outcome.duplicate() {
        metrics.deduped.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// A message body `{"channel", "data", "key"?, "volatile"?}`: (channel, data as JSON text,
/// key, volatile).
fn json_body(body: &[u8]) -> Result<(String, String, Option<String>, bool), String> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        channel: String,
        #[serde(borrow)]
        data: &'a serde_json::value::RawValue,
        key: Option<String>,
        volatile: Option<bool>,
    }
    let b: Body = serde_json::from_slice(body).map_err(|e| format!("not {{channel, data}} JSON: {e}"))?;
    Ok((b.channel, b.data.get().to_string(), b.key, b.volatile.unwrap_or(false)))
}

/// What a RabbitMQ message publishes, or why it cannot (a poison message).
fn from_message(
    state: &AppState,
    cfg: &SourceConfig,
    d: &lapin::message::Delivery,
) -> Result<(crate::session::Resolved, bytes::Bytes, Option<String>, bool), String> {
    let message_id = d.properties.message_id().as_ref().map(|m| m.as_str().to_string());
    let (channel, data, key, volatile) = match &cfg.channel_template {
        Some(template) => {
            let headers = d.properties.headers().as_ref();
            let mut channel = template.clone();
            while let Some(start) = channel.find('{') {
                let end = channel[start..].find('}').ok_or("unclosed { in channel_template")? + start;
                let name = &channel[start + 1..end];
                let value = headers
                    .and_then(|h| h.inner().get(name))
                    .and_then(|v| match v {
                        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
                        lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
                        _ => None,
                    })
                    .ok_or_else(|| format!("no header {name:?} for the channel template"))?;
                channel.replace_range(start..=end, &value);
            }
            let data = crate::transports::mqtt::data_of(&d.data).ok_or("the body is not UTF-8")?;
            let data = String::from_utf8(data.to_vec()).map_err(|e| e.to_string())?;
            (channel, data, message_id, false)
        }
        None => {
            let (channel, data, key, volatile) = json_body(&d.data)?;
            (channel, data, key.or(message_id), volatile)
        }
    };
    let (resolved, data) = checked(state, &channel, data)?;
    Ok((resolved, data, key, volatile))
}

/// One connection's life: consume the queue, publish each message, acknowledge it after.
async fn rabbitmq(
    state: &AppState,
    cfg: &SourceConfig,
    metrics: &SourceMetrics,
    failures: &mut u32,
) -> Result<(), String> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(format!("switchboard {}", metrics.name).into());
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, lapin::Connection::connect(&cfg.url, props));
    let conn = connect.await.map_err(|_| "connect: timed out".to_string())?.map_err(|e| format!("connect: {e}"))?;
    let ch = conn.create_channel().await.map_err(|e| format!("channel: {e}"))?;
    ch.basic_qos(cfg.prefetch, BasicQosOptions::default()).await.map_err(|e| format!("qos: {e}"))?;
    let queue = cfg.queue.as_deref().unwrap_or_default();
    let tag = format!("switchboard-{}", state.node_id);
    let mut consumer = ch
        .basic_consume(queue, &tag, BasicConsumeOptions::default(), lapin::types::FieldTable::default())
        .await
        .map_err(|e| format!("consume {queue}: {e}"))?;
    metrics.connected.store(1, Ordering::Relaxed);
    *failures = 0;
    let mut sample = tokio::time::interval(LAG_EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One at a time, in queue order: a channel's publications keep the queue's order.
    loop {
        let d = tokio::select! {
            d = consumer.next() => match d {
                Some(d) => d.map_err(|e| format!("consume: {e}"))?,
                None => break,
            },
            _ = sample.tick() => {
                // The queue's ready messages (a passive declare declares nothing).
                let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
                let q = ch
                    .queue_declare(queue, passive, lapin::types::FieldTable::default())
                    .await
                    .map_err(|e| format!("queue {queue}: {e}"))?;
                metrics.lag.store(q.message_count() as u64, Ordering::Relaxed);
                continue;
            }
        };
        metrics.consumed.fetch_add(1, Ordering::Relaxed);
        match from_message(state, cfg, &d) {
            Ok((resolved, data, key, volatile)) => {
                // Not acknowledged on an error: the connection goes, RabbitMQ delivers it again.
                publish(state, metrics, &resolved, data, key, volatile).await?;
            }
            Err(why) => {
                tracing::warn!(source = %metrics.name, "poison message: {why}");
                metrics.poison.fetch_add(1, Ordering::Relaxed);
                if let Some(x) = &cfg.dead_letter_exchange {
                    let confirm = ch
                        .basic_publish(
                            x,
                            d.routing_key.as_str(),
                            BasicPublishOptions::default(),
                            &d.data,
                            d.properties.clone(),
                        )
                        .await
                        .map_err(|e| format!("dead-letter: {e}"))?;
                    confirm.await.map_err(|e| format!("dead-letter: {e}"))?;
                }
            }
        }
        d.ack(BasicAckOptions::default()).await.map_err(|e| format!("ack: {e}"))?;
    }
    Err("the consumer was cancelled (queue deleted?)".into())
}

/// What a Stream entry publishes, or why it cannot (a poison entry).
fn from_entry(
    state: &AppState,
    cfg: &SourceConfig,
    e: &switchboard_redis::StreamEntry,
) -> Result<(crate::session::Resolved, bytes::Bytes, Option<String>, bool), String> {
    let channel = e.field("channel").ok_or("no channel field")?;
    let data = e.field("data").ok_or("no data field")?;
    let volatile = matches!(e.field("volatile"), Some("1" | "true"));
    let key = e.field("key").map(str::to_string);
    let key = key.unwrap_or_else(|| format!("redis:{}:{}", cfg.stream.as_deref().unwrap_or_default(), e.id));
    let (resolved, data) = checked(state, channel, data.to_string())?;
    Ok((resolved, data, Some(key), volatile))
}

/// One connection's life: read the Stream through the group, publish each entry,
/// acknowledge each batch after.
async fn redis_stream(
    state: &AppState,
    cfg: &SourceConfig,
    metrics: &SourceMetrics,
    failures: &mut u32,
) -> Result<(), String> {
    let stream = cfg.stream.as_deref().unwrap_or_default();
    let idle = Duration::from_millis(cfg.claim_idle_ms);
    let mut c = switchboard_redis::StreamConsumer::new(&cfg.url, stream, &cfg.group, &state.node_id, idle)
        .map_err(|e| e.to_string())?;
    c.create_group().await.map_err(|e| format!("group {}: {e}", cfg.group))?;
    metrics.connected.store(1, Ordering::Relaxed);
    *failures = 0;
    let mut sampled: Option<tokio::time::Instant> = None;
    loop {
        if sampled.is_none_or(|t| t.elapsed() >= LAG_EVERY) {
            if let Some(lag) = c.lag().await.map_err(|e| e.to_string())? {
                metrics.lag.store(lag, Ordering::Relaxed);
            }
            sampled = Some(tokio::time::Instant::now());
        }
        let entries = c.take(cfg.batch, Duration::from_secs(1)).await.map_err(|e| format!("read: {e}"))?;
        let mut done = Vec::with_capacity(entries.len());
        for e in entries {
            metrics.consumed.fetch_add(1, Ordering::Relaxed);
            match from_entry(state, cfg, &e) {
                Ok((resolved, data, key, volatile)) => {
                    if let Err(err) = publish(state, metrics, &resolved, data, key, volatile).await {
                        // The rest stay pending: read again after the reconnect.
                        c.ack(&done).await.map_err(|e| format!("ack: {e}"))?;
                        return Err(err);
                    }
                }
                Err(why) => {
                    tracing::warn!(source = %metrics.name, entry = %e.id, "poison entry: {why}");
                    metrics.poison.fetch_add(1, Ordering::Relaxed);
                    if let Some(dead) = &cfg.dead_stream {
                        let mut fields = e.fields.clone();
                        fields.push(("reason".into(), why));
                        fields.push(("entry".into(), e.id.clone()));
                        c.add(dead, &fields).await.map_err(|e| format!("dead-letter: {e}"))?;
                    }
                }
            }
            done.push(e.id);
        }
        c.ack(&done).await.map_err(|e| format!("ack: {e}"))?;
    }
}

/// One connection's life: a durable pull consumer of the stream; each message published,
/// then acknowledged.
async fn jetstream(
    state: &AppState,
    cfg: &SourceConfig,
    metrics: &SourceMetrics,
    failures: &mut u32,
) -> Result<(), String> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
    let stream_name = cfg.stream.as_deref().unwrap_or_default();
    let client = async_nats::ConnectOptions::new()
        .name(format!("switchboard {}", metrics.name))
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(cfg.url.as_str())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(stream_name).await.map_err(|e| format!("stream {stream_name}: {e}"))?;
    let config = pull::Config {
        durable_name: Some(cfg.group.clone()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_millis(cfg.claim_idle_ms),
        ..Default::default()
    };
    let mut consumer: PullConsumer =
        stream.get_or_create_consumer(&cfg.group, config).await.map_err(|e| format!("consumer {}: {e}", cfg.group))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(cfg.batch)
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| format!("consume: {e}"))?;
    metrics.connected.store(1, Ordering::Relaxed);
    *failures = 0;
    let mut sample = tokio::time::interval(LAG_EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let m = tokio::select! {
            m = messages.next() => match m {
                Some(m) => m.map_err(|e| format!("consume: {e}"))?,
                None => return Err("the consumer's stream ended".into()),
            },
            _ = sample.tick() => {
                // The client reconnects by itself; a server that stays away is this
                // source's failure all the same (disconnected, backoff, a new consumer).
                if client.connection_state() != async_nats::connection::State::Connected {
                    return Err("the NATS server went away".into());
                }
                let info = consumer.info().await.map_err(|e| format!("consumer info: {e}"))?;
                metrics.lag.store(info.num_pending, Ordering::Relaxed);
                continue;
            }
        };
        metrics.consumed.fetch_add(1, Ordering::Relaxed);
        let sequence = m.info().map(|i| i.stream_sequence).unwrap_or_default();
        let msg_id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_string());
        let parsed = json_body(&m.payload).and_then(|(channel, data, key, volatile)| {
            let (resolved, data) = checked(state, &channel, data)?;
            let key = key.or(msg_id).unwrap_or_else(|| format!("nats:{stream_name}:{sequence}"));
            Ok((resolved, data, key, volatile))
        });
        match parsed {
            Ok((resolved, data, key, volatile)) => {
                // Not acknowledged on an error: JetStream delivers it again after the ack wait.
                publish(state, metrics, &resolved, data, Some(key), volatile).await?;
            }
            Err(why) => {
                tracing::warn!(source = %metrics.name, sequence, "poison message: {why}");
                metrics.poison.fetch_add(1, Ordering::Relaxed);
                if let Some(subject) = &cfg.dead_subject {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Switchboard-Reason", why.as_str());
                    headers.insert("Switchboard-Sequence", sequence.to_string().as_str());
                    client
                        .publish_with_headers(subject.clone(), headers, m.payload.clone())
                        .await
                        .map_err(|e| format!("dead-letter: {e}"))?;
                    client.flush().await.map_err(|e| format!("dead-letter: {e}"))?;
                }
            }
        }
        m.ack().await.map_err(|e| format!("ack: {e}"))?;
    }
}
