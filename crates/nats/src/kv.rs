//! [`NatsKv`]: small values with a time to live, shared by every node (MQTT persistent
//! sessions), in a stream of their own: one message per key (`P.v.<space>.<key>`), its
//! expiry inside; the stream's `max_age` is the longest time to live asked for.

use std::time::Duration;

use async_nats::jetstream::stream;
use bytes::Bytes;
use switchboard_core::{now_millis, BrokerError};

use crate::broker::{unavailable, NatsBroker};
use crate::subject::{stream_name, token};

pub struct NatsKv {
    broker: NatsBroker,
    space: String,
    max_age: Duration,
    stream: tokio::sync::OnceCell<stream::Stream>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    until: u64,
    value: String,
}

impl NatsKv {
    /// Values of `space`, kept at most `max_age` (a longer time to live is cut to it).
    pub fn new(broker: &NatsBroker, space: &str, max_age: Duration) -> NatsKv {
        NatsKv {
            broker: broker.clone(),
            space: space.to_string(),
            max_age: max_age.max(Duration::from_secs(1)),
            stream: tokio::sync::OnceCell::new(),
        }
    }

    async fn stream(&self) -> Result<&stream::Stream, BrokerError> {
        self.stream
            .get_or_try_init(|| async {
                let inner = &self.broker.inner;
                let name = stream_name(&inner.cfg.prefix, &format!("KV_{}", token(&self.space)));
                let config = stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{}.v.{}.>", inner.p, token(&self.space))],
                    max_messages_per_subject: 1,
                    max_age: self.max_age,
                    allow_direct: true,
                    num_replicas: inner.cfg.replicas.max(1),
                    ..Default::default()
                };
                inner
                    .js
                    .create_or_update_stream(config)
                    .await
                    .map_err(|e| unavailable(format!("stream {name}: {e}")))?;
                inner.js.get_stream(&name).await.map_err(|e| unavailable(format!("stream {name}: {e}")))
            })
            .await
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.v.{}.{}", self.broker.inner.p, token(&self.space), token(key))
    }

    /// Sets `key` to `value` for `ttl` (at most the space's `max_age`).
    pub async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), BrokerError> {
        self.stream().await?;
        let until = now_millis() + ttl.min(self.max_age).as_millis() as u64;
        let body = serde_json::to_vec(&Stored { until, value: value.to_string() }).map_err(unavailable)?;
        self.broker.publish_state(self.subject(key), Bytes::from(body)).await.map(|_| ())
    }

    /// Takes `key`'s value: read, then its message deleted — only one taker's delete
    /// succeeds, so two nodes never both get it.
    pub async fn take(&self, key: &str) -> Result<Option<String>, BrokerError> {
        let stream = self.stream().await?;
        let Some(e) = NatsBroker::last_of(stream, &self.subject(key)).await? else { return Ok(None) };
        match stream.delete_message(e.seq).await {
            Ok(true) => {}
            // Someone else took it first.
            Ok(false) | Err(_) => return Ok(None),
        }
        let stored: Stored = serde_json::from_slice(&e.payload).map_err(unavailable)?;
        Ok((stored.until > now_millis()).then_some(stored.value))
    }

    pub async fn delete(&self, key: &str) -> Result<(), BrokerError> {
        let stream = self.stream().await?;
        stream.purge().filter(self.subject(key)).await.map_err(unavailable)?;
        Ok(())
    }
}
