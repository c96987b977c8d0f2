//! [`RedisQueue`]: a durable work queue shared by every node — what webhooks wait in when
//! the broker is Redis. Each queue is a Stream read through one consumer group (each entry
//! goes to exactly one node), a sorted set of entries waiting for a later attempt (moved
//! back into the Stream when due), and a hash of dead entries. An entry a node took and
//! never finished (the node died) is claimed by another once it has been idle for
//! `abandoned_after`. [`Occupancy`] counts, per channel, the nodes with subscribers, so
//! "occupied" and "vacated" are told once per cluster.

use std::time::Duration;

use crate::conn::Conn;
use redis::Script;
use switchboard_core::BrokerError;

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

const GROUP: &str = "deliver";

/// Moves the due entries of the delayed set (KEYS[1]) into the Stream (KEYS[2]).
const PROMOTE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500)
for _, v in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'item', v)
  redis.call('ZREM', KEYS[1], v)
end
return #due
";

/// Finishes Stream entry ARGV[1] of KEYS[1]: acknowledged and deleted, and — with ARGV[2]
/// — its successor put in the delayed set KEYS[2] (score ARGV[3]) or, with ARGV[4], in the
/// dead hash KEYS[3] under that id. Atomic: an entry is never both pending and moved.
const FINISH: &str = r"
redis.call('XACK', KEYS[1], 'deliver', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[4], ARGV[2])
  else
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  end
end
return 1
";

/// SADD/SREM of a node in a channel's set, answering whether the cluster's occupancy
/// changed: 1 when the first node came (ARGV[2] = 1) or the last left (ARGV[2] = 0).
const OCCUPY: &str = r"
if ARGV[2] == '1' then
  local added = redis.call('SADD', KEYS[1], ARGV[1])
  if added == 1 and redis.call('SCARD', KEYS[1]) == 1 then return 1 end
else
  local removed = redis.call('SREM', KEYS[1], ARGV[1])
  if removed == 1 and redis.call('SCARD', KEYS[1]) == 0 then return 1 end
end
return 0
";

pub struct RedisQueue {
    conn: Conn,
    /// `{prefix}:queue:{name}`, hash-tagged per queue.
    base: String,
    consumer: String,
    abandoned_after: Duration,
    promote: Script,
    finish: Script,
}

/// An entry taken from the queue: its Stream id (to finish it) and its payload.
#[derive(Debug, Clone)]
pub struct Taken {
    pub entry: String,
    pub payload: String,
}

impl RedisQueue {
    /// The queue `name` under `prefix`, read as `consumer` (this node). Connects lazily;
    /// [`RedisQueue::create_group`] before the first [`RedisQueue::take`].
    pub fn new(
        url: &str,
        prefix: &str,
        name: &str,
        consumer: &str,
        abandoned_after: Duration,
    ) -> Result<RedisQueue, BrokerError> {
        Self::open(&crate::conn::Target::single(url), prefix, name, consumer, abandoned_after)
    }

    /// The same on a single Redis or a Redis Cluster (a queue's keys share its hash tag:
    /// one slot, which its scripts need).
    pub fn open(
        target: &crate::conn::Target,
        prefix: &str,
        name: &str,
        consumer: &str,
        abandoned_after: Duration,
    ) -> Result<RedisQueue, BrokerError> {
        let conn = Conn::open(target)?;
        Ok(RedisQueue {
            conn,
            base: format!("{prefix}:queue:{{{name}}}"),
            consumer: consumer.to_string(),
            abandoned_after,
            promote: Script::new(PROMOTE),
            finish: Script::new(FINISH),
        })
    }

    /// The consumer group the nodes read through (made once, by whichever node is first;
    /// it reads the Stream from its start, so nothing pushed before is missed).
    pub async fn create_group(&self) -> Result<(), BrokerError> {
        crate::stream::create_group(&mut self.conn.clone(), &self.key("q"), GROUP).await
    }

    fn key(&self, part: &str) -> String {
        format!("{}:{part}", self.base)
    }

    pub async fn push(&self, payloads: &[String]) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for p in payloads {
            pipe.cmd("XADD").arg(self.key("q")).arg("*").arg("item").arg(p).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    /// Up to `max` entries: due delayed ones are moved in first, then abandoned ones are
    /// claimed, then new ones read (waiting up to `block`).
    pub async fn take(&self, max: usize, block: Duration, now_ms: u64) -> Result<Vec<Taken>, BrokerError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .promote
            .key(self.key("delayed"))
            .key(self.key("q"))
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let q = self.key("q");
        let claimed = crate::stream::claim(&mut conn, [&q, GROUP, &self.consumer], self.abandoned_after, max).await?;
        let mut out = items(claimed);
        if out.len() < max {
            let read: redis::Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max - out.len())
                .arg("BLOCK")
                .arg(if out.is_empty() { block.as_millis() as u64 } else { 1 })
                .arg("STREAMS")
                .arg(self.key("q"))
                .arg(">")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            out.extend(items(crate::stream::streams(&read)));
        }
        Ok(out)
    }

    /// Done with `entry`.
    pub async fn done(&self, entry: &str) -> Result<(), BrokerError> {
        self.finish_with(entry, "", 0, "").await
    }

    /// `entry` is tried again at `due_ms`, as `payload`.
    pub async fn later(&self, entry: &str, payload: &str, due_ms: u64) -> Result<(), BrokerError> {
        self.finish_with(entry, payload, due_ms, "").await
    }

    /// `entry` is dead, kept as `payload` under `id`.
    pub async fn dead(&self, entry: &str, id: &str, payload: &str) -> Result<(), BrokerError> {
        self.finish_with(entry, payload, 0, id).await
    }

    async fn finish_with(&self, entry: &str, payload: &str, due: u64, dead_id: &str) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .finish
            .key(self.key("q"))
            .key(self.key("delayed"))
            .key(self.key("dead"))
            .arg(entry)
            .arg(payload)
            .arg(due)
            .arg(dead_id)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The dead entries: (id, payload).
    pub async fn dead_list(&self) -> Result<Vec<(String, String)>, BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("HGETALL").arg(self.key("dead")).query_async(&mut conn).await.map_err(unavailable)
    }

    /// Forgets dead entries (replayed: pushed again first, so none is lost in between).
    pub async fn forget_dead(&self, ids: &[String]) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("HDEL").arg(self.key("dead")).arg(ids).query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    /// (waiting — new, in flight or delayed —, dead).
    pub async fn depth(&self) -> Result<(usize, usize), BrokerError> {
        let mut conn = self.conn.clone();
        let (q, delayed, dead): (usize, usize, usize) = redis::pipe()
            .cmd("XLEN")
            .arg(self.key("q"))
            .cmd("ZCARD")
            .arg(self.key("delayed"))
            .cmd("HLEN")
            .arg(self.key("dead"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok((q + delayed, dead))
    }
}

/// The entries with an `item` field.
fn items(entries: Vec<crate::stream::StreamEntry>) -> Vec<Taken> {
    let item = |e: crate::stream::StreamEntry| Some(Taken { payload: e.field("item")?.to_string(), entry: e.id });
    entries.into_iter().filter_map(item).collect()
}

/// Channel occupancy across the cluster: which nodes have subscribers of each channel.
pub struct Occupancy {
    conn: Conn,
    prefix: String,
    node: String,
    script: Script,
}

impl Occupancy {
    pub fn new(url: &str, prefix: &str, node: &str) -> Result<Occupancy, BrokerError> {
        Self::open(&crate::conn::Target::single(url), prefix, node)
    }

    /// The same on a single Redis or a Redis Cluster.
    pub fn open(target: &crate::conn::Target, prefix: &str, node: &str) -> Result<Occupancy, BrokerError> {
        let conn = Conn::open(target)?;
        Ok(Occupancy { conn, prefix: prefix.to_string(), node: node.to_string(), script: Script::new(OCCUPY) })
    }

    /// This node has subscribers of `channel` (`occupied`), or no longer: whether that
    /// changed the cluster's occupancy (the first node came, the last left).
    pub async fn set(&self, channel: &str, occupied: bool) -> Result<bool, BrokerError> {
        let changed = self.occupy(&self.node, channel, occupied).await?;
        // The node's own list of what it occupies, for the nodes that outlive it
        // ([`Occupancy::reap`]).
        let mut cmds = vec![if occupied {
            redis::Cmd::sadd(self.by_node(&self.node), channel)
        } else {
            redis::Cmd::srem(self.by_node(&self.node), channel)
        }];
        if occupied {
            cmds.push(redis::Cmd::sadd(self.nodes_key(), &self.node));
        }
        self.run(cmds).await?;
        Ok(changed)
    }

    async fn occupy(&self, node: &str, channel: &str, occupied: bool) -> Result<bool, BrokerError> {
        let mut conn = self.conn.clone();
        let changed: i64 = self
            .script
            .key(format!("{}:occupied:{{{channel}}}", self.prefix))
            .arg(node)
            .arg(if occupied { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(changed == 1)
    }

    fn by_node(&self, node: &str) -> String {
        format!("{}:occupied-by:{node}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}:occupied-nodes", self.prefix)
    }

    /// The nodes listed as occupying channels (until they are reaped).
    pub async fn nodes(&self) -> Result<Vec<String>, BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("SMEMBERS").arg(self.nodes_key()).query_async(&mut conn).await.map_err(unavailable)
    }

    /// Whether this node is listed (it was not reaped as gone).
    pub async fn listed(&self) -> Result<bool, BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("SISMEMBER").arg(self.nodes_key()).arg(&self.node).query_async(&mut conn).await.map_err(unavailable)
    }

    /// Takes a node that is gone out of every channel it occupied: the channels that this
    /// left without a node (vacated — told by the caller, once: of two nodes reaping the
    /// same one, only one sees a channel change).
    pub async fn reap(&self, node: &str) -> Result<Vec<String>, BrokerError> {
        let mut conn = self.conn.clone();
        let channels: Vec<String> =
            redis::cmd("SMEMBERS").arg(self.by_node(node)).query_async(&mut conn).await.map_err(unavailable)?;
        let mut vacated = Vec::new();
        for channel in channels {
            if self.occupy(node, &channel, false).await? {
                vacated.push(channel);
            }
        }
        self.run(vec![redis::Cmd::del(self.by_node(node)), redis::Cmd::srem(self.nodes_key(), node)]).await?;
        Ok(vacated)
    }

    /// Runs `cmds` as one pipeline — or, on a Redis Cluster, where a pipeline stays within
    /// a slot and these keys are in several, one after the other.
    async fn run(&self, cmds: Vec<redis::Cmd>) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        if conn.is_cluster() {
            for cmd in cmds {
                cmd.query_async::<()>(&mut conn).await.map_err(unavailable)?;
            }
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }
}
