//! [`RedisKv`]: small values with a time to live, shared by every node — what a node
//! keeps for a client between its connections (MQTT persistent sessions), so the client
//! may come back to any node.

use std::time::Duration;

use crate::conn::Conn;
use switchboard_core::BrokerError;

pub struct RedisKv {
    prefix: String,
    conn: Conn,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl RedisKv {
    /// Values under `{prefix}:{space}:`.
    pub fn new(url: &str, prefix: &str, space: &str) -> Result<RedisKv, BrokerError> {
        Self::open(&crate::conn::Target::single(url), prefix, space)
    }

    /// Values on a single Redis or a Redis Cluster (each value one key: any slot).
    pub fn open(target: &crate::conn::Target, prefix: &str, space: &str) -> Result<RedisKv, BrokerError> {
        let conn = Conn::open(target)?;
        Ok(RedisKv { prefix: format!("{prefix}:{space}:"), conn })
    }

    /// Sets `key` to `value` for `ttl` (at least a second).
    pub async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}{key}", self.prefix))
            .arg(value)
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Takes `key`'s value (reads and deletes it at once: two nodes never both get it).
    pub async fn take(&self, key: &str) -> Result<Option<String>, BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("GETDEL").arg(format!("{}{key}", self.prefix)).query_async(&mut conn).await.map_err(unavailable)
    }

    pub async fn delete(&self, key: &str) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL").arg(format!("{}{key}", self.prefix)).query_async::<()>(&mut conn).await.map_err(unavailable)
    }
}
