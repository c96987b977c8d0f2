//! The core's broker and presence contract suites against a Redis Cluster of three
//! masters (the test process's own, started on first use): keys routed by slot,
//! publications on sharded Pub/Sub, namespace subscriptions through the wildcard marks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cluster::RedisCluster;
use switchboard_core::presence::PresenceManager;
use switchboard_core::{Broker, BrokerEventHandler};
use switchboard_redis::{RedisBroker, RedisConfig, RedisPresence, Target};

fn prefix() -> String {
    format!("sbtest-{}-{}", std::process::id(), fastrand::u32(..))
}

async fn make(handler: Arc<dyn BrokerEventHandler>) -> Arc<dyn Broker> {
    let url = tokio::task::spawn_blocking(|| RedisCluster::shared().url()).await.unwrap();
    let cfg = RedisConfig { url, prefix: prefix(), idle_channel_ttl: Duration::from_secs(600), cluster: true };
    let broker = RedisBroker::new(cfg, "contract-node").unwrap();
    broker.run(handler).await.unwrap();
    Arc::new(broker)
}

switchboard_core::broker_contract_tests!(|h: Arc<switchboard_core::contract::Recorder>| make(h));

async fn make_presence() -> Arc<dyn PresenceManager> {
    let url = tokio::task::spawn_blocking(|| RedisCluster::shared().url()).await.unwrap();
    Arc::new(RedisPresence::open(&Target { url, cluster: true }, &prefix()).unwrap())
}

mod presence {
    use super::*;
    switchboard_core::presence_contract_tests!(make_presence);
}
