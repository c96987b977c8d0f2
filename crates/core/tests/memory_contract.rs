//! The broker contract suite against the in-memory broker.

use std::sync::Arc;

use switchboard_core::{Broker, BrokerEventHandler, MemoryBroker};

async fn make(handler: Arc<dyn BrokerEventHandler>) -> Arc<dyn Broker> {
    let broker = Arc::new(MemoryBroker::default());
    broker.run(handler).await.unwrap();
    broker
}

switchboard_core::broker_contract_tests!(paused: |h: Arc<switchboard_core::contract::Recorder>| make(h));
