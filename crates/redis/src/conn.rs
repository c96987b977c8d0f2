//! One connection type for a single Redis (or one behind Sentinel's address) and for a
//! Redis Cluster: commands, scripts and pipelines run the same on both — in a cluster the
//! client routes each by its key's slot and follows `MOVED`/`ASK` itself.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use switchboard_core::BrokerError;

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Where Redis is: `redis://host:port/db`, or for a cluster its seed nodes,
/// comma-separated (`redis://a:7000,redis://b:7001`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub cluster: bool,
}

impl Target {
    pub fn single(url: &str) -> Target {
        Target { url: url.to_string(), cluster: false }
    }

    fn seeds(&self) -> Vec<String> {
        self.url.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
    }
}

/// A Redis Cluster connection made on first use (and retried on the next use after a
/// failure), so a node starts — and stays up — while the cluster is unreachable.
pub struct LazyCluster {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    pub(crate) async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.conn.get_or_try_init(|| self.client.get_async_connection()).await.cloned()
    }
}

/// A connection to a single Redis or to a Redis Cluster. Cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

fn cluster_builder(target: &Target) -> ClusterClientBuilder {
    ClusterClientBuilder::new(target.seeds())
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(3))
        .retries(3)
}

impl Conn {
    /// Connects lazily: the first command connects, and failures are errors to report,
    /// not waits (short timeouts).
    pub fn open(target: &Target) -> Result<Conn, BrokerError> {
        if target.cluster {
            let client = cluster_builder(target).build().map_err(|e| unavailable(format!("bad redis url: {e}")))?;
            return Ok(Conn::Cluster(Arc::new(LazyCluster { client, conn: tokio::sync::OnceCell::new() })));
        }
        let client =
            redis::Client::open(target.url.as_str()).map_err(|e| unavailable(format!("bad redis url: {e}")))?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(3)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        ConnectionManager::new_lazy_with_config(client, cfg).map(Conn::Single).map_err(unavailable)
    }

    /// A cluster connection over RESP3 whose Pub/Sub messages (and subscription
    /// confirmations, also the ones of its own resubscribing after a reconnect or a
    /// failover) go to `push`.
    pub(crate) fn cluster_with_push(
        target: &Target,
        push: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Result<Arc<LazyCluster>, BrokerError> {
        let client = cluster_builder(target)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push)
            .build()
            .map_err(|e| unavailable(format!("bad redis url: {e}")))?;
        Ok(Arc::new(LazyCluster { client, conn: tokio::sync::OnceCell::new() }))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(l) => Box::pin(async move { l.get().await?.req_packed_command(cmd).await }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(l) => {
                Box::pin(async move { l.get().await?.req_packed_commands(pipeline, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

/// Redis Cluster's slots.
pub const SLOTS: usize = 16384;

/// The slot of `key` (its hash tag's, when it has one), as Redis Cluster computes it:
/// CRC16-XMODEM modulo 16384.
pub fn slot_of(key: &str) -> usize {
    let b = key.as_bytes();
    let tagged = b.iter().position(|c| *c == b'{').and_then(|open| {
        let close = b[open + 1..].iter().position(|c| *c == b'}')?;
        (close > 0).then(|| &b[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(b)) as usize % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in data {
        crc ^= (*byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// A short hash tag for each slot: `{tag}` puts a key in that slot. (What lets a node write
/// one key into every slot, where scripts of any channel can read it.)
pub fn slot_tag(slot: usize) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); SLOTS];
        let mut left = SLOTS;
        let mut n: u64 = 0;
        while left > 0 {
            let t = format!("{n:x}");
            let s = crc16(t.as_bytes()) as usize % SLOTS;
            if tags[s].is_empty() {
                tags[s] = t;
                left -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[slot % SLOTS]
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn slots_are_the_cluster_clients_and_every_slot_has_a_tag() {
        for key in ["a", "sb:m:{news:1}", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap", "x{}y"] {
            assert_eq!(Slot::new(slot_of(key) as u16), Some(Slot::for_key(key)), "{key}");
        }
        for slot in [0, 1, 777, SLOTS - 1] {
            let key = format!("p:w:{{{}}}:ns", slot_tag(slot));
            assert_eq!(slot_of(&key), slot);
        }
    }
}
