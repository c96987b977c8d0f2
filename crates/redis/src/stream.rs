//! [`StreamConsumer`]: reads an application's Redis Stream through a consumer group — the
//! Redis Streams publication source (docs/sources.md). Each entry goes to one consumer of
//! the group (one node); it stays pending until acknowledged, so an entry a node read and
//! never acknowledged (it died, or its publish failed) is read again: by the same consumer
//! first thing after it reconnects, by any consumer once it has been idle for
//! `claim_idle` (`XAUTOCLAIM`, Redis ≥ 6.2).

use std::time::{Duration, Instant};

use crate::conn::Conn;
use switchboard_core::BrokerError;

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// A Stream entry: its id and its fields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl StreamEntry {
    /// The value of field `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

pub struct StreamConsumer {
    conn: Conn,
    stream: String,
    group: String,
    consumer: String,
    claim_idle: Duration,
    /// This consumer's own pending entries are read before new ones (after a reconnect).
    own_pending: bool,
    claimed_at: Option<Instant>,
}

impl StreamConsumer {
    /// Reads `stream` in `group` as `consumer`. Connects lazily: [`StreamConsumer::create_group`]
    /// is the first round trip.
    pub fn new(
        url: &str,
        stream: &str,
        group: &str,
        consumer: &str,
        claim_idle: Duration,
    ) -> Result<StreamConsumer, BrokerError> {
        Ok(StreamConsumer {
            conn: crate::presence::lazy_connection(url)?,
            stream: stream.to_string(),
            group: group.to_string(),
            consumer: consumer.to_string(),
            claim_idle,
            own_pending: true,
            claimed_at: None,
        })
    }

    /// Creates the group if it does not exist, reading the Stream from its start (entries
    /// added before the first consumer came are not missed); creates the Stream too.
    pub async fn create_group(&self) -> Result<(), BrokerError> {
        create_group(&mut self.conn.clone(), &self.stream, &self.group).await
    }

    /// Up to `max` entries, in Stream order within each kind: this consumer's own pending
    /// ones first (after a (re)start), then — at most once a second — entries other
    /// consumers left idle past `claim_idle`, then new ones (waiting up to `block`).
    pub async fn take(&mut self, max: usize, block: Duration) -> Result<Vec<StreamEntry>, BrokerError> {
        let mut conn = self.conn.clone();
        if self.own_pending {
            let own = self.read(&mut conn, max, None, "0").await?;
            if !own.is_empty() {
                return Ok(own);
            }
            self.own_pending = false;
        }
        if self.claimed_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.claimed_at = Some(Instant::now());
            let claimed = claim(&mut conn, [&self.stream, &self.group, &self.consumer], self.claim_idle, max).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        self.read(&mut conn, max, Some(block), ">").await
    }

    async fn read(
        &self,
        conn: &mut Conn,
        max: usize,
        block: Option<Duration>,
        from: &str,
    ) -> Result<Vec<StreamEntry>, BrokerError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.group).arg(&self.consumer).arg("COUNT").arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        let read: redis::Value =
            cmd.arg("STREAMS").arg(&self.stream).arg(from).query_async(conn).await.map_err(unavailable)?;
        Ok(streams(&read))
    }

    /// Acknowledges entries: they are not read again.
    pub async fn ack(&self, ids: &[String]) -> Result<(), BrokerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("XACK").arg(&self.stream).arg(&self.group).arg(ids).clone();
        cmd.query_async::<i64>(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    /// Adds an entry to `stream` (a dead-letter stream).
    pub async fn add(&self, stream: &str, fields: &[(String, String)]) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd.query_async::<String>(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    /// Entries of the Stream the group has not read yet (`XINFO GROUPS` `lag`, Redis ≥ 7;
    /// `None` where Redis cannot tell).
    pub async fn lag(&self) -> Result<Option<u64>, BrokerError> {
        let mut conn = self.conn.clone();
        let groups: redis::Value =
            redis::cmd("XINFO").arg("GROUPS").arg(&self.stream).query_async(&mut conn).await.map_err(unavailable)?;
        let redis::Value::Array(groups) = groups else { return Ok(None) };
        for g in groups {
            let pairs: Vec<(redis::Value, redis::Value)> = match g {
                redis::Value::Array(flat) => {
                    flat.chunks(2).filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone()))).collect()
                }
                redis::Value::Map(m) => m,
                _ => continue,
            };
            let text = |v: &redis::Value| redis::from_redis_value::<String>(v.clone()).ok();
            let get = |name: &str| pairs.iter().find(|(k, _)| text(k).as_deref() == Some(name)).map(|(_, v)| v);
            if get("name").and_then(text).as_deref() == Some(self.group.as_str()) {
                return Ok(get("lag").and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok()));
            }
        }
        Ok(None)
    }
}

/// Creates consumer group `group` of `stream` (and the stream) reading from its start,
/// unless it exists.
pub(crate) async fn create_group(conn: &mut Conn, stream: &str, group: &str) -> Result<(), BrokerError> {
    let created: Result<(), redis::RedisError> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").query_async(conn).await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(unavailable(e)),
    }
}

/// Up to `max` entries of `[stream, group, consumer]`'s group left pending by any consumer
/// for `idle` or longer, now `consumer`'s (`XAUTOCLAIM`).
pub(crate) async fn claim(
    conn: &mut Conn,
    [stream, group, consumer]: [&str; 3],
    idle: Duration,
    max: usize,
) -> Result<Vec<StreamEntry>, BrokerError> {
    let claimed: redis::Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(idle.as_millis() as u64)
        .arg("0")
        .arg("COUNT")
        .arg(max)
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    Ok(match claimed {
        redis::Value::Array(parts) if parts.len() >= 2 => parse_entries(&parts[1]),
        _ => Vec::new(),
    })
}

/// An `XREADGROUP` reply: `[[stream, [[id, [field, value…]]…]]…]` (RESP2) or a map (RESP3).
pub(crate) fn streams(read: &redis::Value) -> Vec<StreamEntry> {
    let mut out = Vec::new();
    match read {
        redis::Value::Array(streams) => {
            for s in streams {
                if let redis::Value::Array(kv) = s {
                    if let Some(list) = kv.get(1) {
                        out.extend(parse_entries(list));
                    }
                }
            }
        }
        redis::Value::Map(streams) => {
            for (_, list) in streams {
                out.extend(parse_entries(list));
            }
        }
        _ => {}
    }
    out
}

/// `[[id, [field, value, …]]…]` → entries (a deleted entry, `[id, nil]`, has no fields).
fn parse_entries(list: &redis::Value) -> Vec<StreamEntry> {
    let redis::Value::Array(list) = list else { return Vec::new() };
    let mut out = Vec::new();
    for e in list {
        let redis::Value::Array(parts) = e else { continue };
        let Some(Ok(id)) = parts.first().map(|id| redis::from_redis_value::<String>(id.clone())) else { continue };
        let flat: Vec<String> = match parts.get(1) {
            Some(redis::Value::Array(f)) => f.iter().filter_map(|v| redis::from_redis_value(v.clone()).ok()).collect(),
            Some(redis::Value::Map(m)) => {
                m.iter().flat_map(|(k, v)| [k, v]).filter_map(|v| redis::from_redis_value(v.clone()).ok()).collect()
            }
            _ => Vec::new(),
        };
        let fields = flat.chunks_exact(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect();
        out.push(StreamEntry { id, fields });
    }
    out
}
