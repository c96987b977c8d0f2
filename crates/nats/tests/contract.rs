//! The core's broker and presence contract suites against a real NATS with JetStream
//! (`SWITCHBOARD_TEST_NATS`, default `nats://127.0.0.1:4222`; `./scripts/test` starts
//! one). All checks share one prefix (so the streams are made once, not per test) and
//! use fresh random channel names; what they leave expires with the streams' `max_age`.

use std::sync::Arc;
use std::time::Duration;

use switchboard_core::presence::PresenceManager;
use switchboard_core::{Broker, BrokerEventHandler};
use switchboard_nats::{NatsBroker, NatsConfig, NatsPresence};

fn url() -> String {
    std::env::var("SWITCHBOARD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn config() -> NatsConfig {
    NatsConfig {
        url: url(),
        prefix: "sbtest-contract".into(),
        max_age: Duration::from_secs(600),
        max_history: 1000,
        max_idempotency_window: Duration::from_secs(300),
        replicas: 1,
    }
}

async fn make(handler: Arc<dyn BrokerEventHandler>) -> Arc<dyn Broker> {
    let broker = NatsBroker::connect(config(), "contract-node").await.unwrap();
    broker.run(handler).await.unwrap();
    Arc::new(broker)
}

switchboard_core::broker_contract_tests!(|h: Arc<switchboard_core::contract::Recorder>| make(h));

async fn make_presence() -> Arc<dyn PresenceManager> {
    let broker = NatsBroker::connect(config(), "contract-presence").await.unwrap();
    Arc::new(NatsPresence::new(&broker))
}

mod presence {
    use super::*;
    switchboard_core::presence_contract_tests!(make_presence);
}
