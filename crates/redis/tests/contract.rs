//! The core's broker and presence contract suites against a real Redis
//! (`SWITCHBOARD_TEST_REDIS`, default `redis://127.0.0.1:6379`; `./scripts/test` starts
//! one). Each broker gets its own key prefix.

use std::sync::Arc;
use std::time::Duration;

use switchboard_core::presence::PresenceManager;
use switchboard_core::{Broker, BrokerEventHandler};
use switchboard_redis::{RedisBroker, RedisConfig, RedisPresence};

fn url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix() -> String {
    format!("sbtest-{}-{}", std::process::id(), fastrand::u32(..))
}

async fn make(handler: Arc<dyn BrokerEventHandler>) -> Arc<dyn Broker> {
    let cfg = RedisConfig { url: url(), prefix: prefix(), idle_channel_ttl: Duration::from_secs(600), cluster: false };
    let broker = RedisBroker::new(cfg, "contract-node").unwrap();
    broker.run(handler).await.unwrap();
    Arc::new(broker)
}

switchboard_core::broker_contract_tests!(|h: Arc<switchboard_core::contract::Recorder>| make(h));

async fn make_presence() -> Arc<dyn PresenceManager> {
    Arc::new(RedisPresence::new(&url(), &prefix()).unwrap())
}

mod presence {
    use super::*;
    switchboard_core::presence_contract_tests!(make_presence);
}
