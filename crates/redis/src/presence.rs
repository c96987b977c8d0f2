//! [`RedisPresence`]: the [`PresenceManager`] contract over Redis. Each channel's
//! members are a hash (client → member JSON) beside a sorted set of expiry times; reads
//! drop expired members first, so a node that dies without removing its clients'
//! entries stops reporting them once their TTL passes.

use std::collections::HashSet;
use std::time::Duration;

use crate::conn::Conn;
use async_trait::async_trait;
use redis::Script;
use switchboard_core::presence::{Member, PresenceManager, PresenceStats};
use switchboard_core::{BrokerError, ChannelName};

use crate::scripts;

pub struct RedisPresence {
    prefix: String,
    conn: Conn,
    add: Script,
    members: Script,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// A connection that connects on first use and reconnects by itself (short timeouts: a
/// Redis outage is an error to report, not a wait).
pub(crate) fn lazy_connection(url: &str) -> Result<Conn, BrokerError> {
    Conn::open(&crate::conn::Target::single(url))
}

impl RedisPresence {
    pub fn new(url: &str, prefix: &str) -> Result<RedisPresence, BrokerError> {
        Self::open(&crate::conn::Target::single(url), prefix)
    }

    /// Presence on a single Redis or a Redis Cluster.
    pub fn open(target: &crate::conn::Target, prefix: &str) -> Result<RedisPresence, BrokerError> {
        let conn = Conn::open(target)?;
        Ok(RedisPresence {
            prefix: prefix.to_string(),
            conn,
            add: Script::new(scripts::PRESENCE_ADD),
            members: Script::new(scripts::PRESENCE_MEMBERS),
        })
    }

    fn keys(&self, channel: &ChannelName) -> (String, String) {
        // The channel as the hash tag: both keys in one Redis Cluster slot, as the scripts
        // that use them together need.
        (format!("{}:pr:{{{channel}}}", self.prefix), format!("{}:pr:{{{channel}}}:x", self.prefix))
    }

    async fn live(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        let (h, z) = self.keys(channel);
        let mut conn = self.conn.clone();
        let raw: Vec<String> = self.members.key(h).key(z).invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(raw.iter().filter_map(|r| serde_json::from_str(r).ok()).collect())
    }
}

#[async_trait]
impl PresenceManager for RedisPresence {
    async fn add(&self, channel: &ChannelName, member: Member, ttl: Duration) -> Result<(), BrokerError> {
        let (h, z) = self.keys(channel);
        let json = serde_json::to_string(&member).expect("member serialises");
        let mut conn = self.conn.clone();
        let _: i64 = self
            .add
            .key(h)
            .key(z)
            .arg(&member.client)
            .arg(json)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn remove(&self, channel: &ChannelName, client: &str) -> Result<(), BrokerError> {
        let (h, z) = self.keys(channel);
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().hdel(h, client).ignore().zrem(z, client).ignore();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn members(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        let mut v = self.live(channel).await?;
        v.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(v)
    }

    async fn stats(&self, channel: &ChannelName) -> Result<PresenceStats, BrokerError> {
        let v = self.live(channel).await?;
        let users: HashSet<&str> = v.iter().map(|m| m.user.as_str()).collect();
        Ok(PresenceStats { clients: v.len(), users: users.len() })
    }
}
