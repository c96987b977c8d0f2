//! [`RedisKv`]: small values with a time to live, shared by every node — what a node
//! keeps for a client between its connections (MQTT persistent sessions), so the client
//! may come back to any node.

use std::time::Duration;

use redis::aio::ConnectionManager;
use switchboard_core::BrokerError;

pub struct RedisKv {
    prefix: String,
    conn: ConnectionManager,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl RedisKv {
    /// Values under `{prefix}:{space}:`.
    pub fn new(url: &str, prefix: &str, space: &str) -> Result<RedisKv, BrokerError> {
        let client = redis::Client::open(url).map_err(|e| unavailable(format!("bad redis url: {e}")))?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(3)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_lazy_with_config(client, cfg).map_err(unavailable)?;
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
