//! The presence contract suite against the in-memory presence manager.

use std::sync::Arc;

use switchboard_core::presence::{MemoryPresence, PresenceManager};

async fn make() -> Arc<dyn PresenceManager> {
    Arc::new(MemoryPresence::default())
}

switchboard_core::presence_contract_tests!(paused: make);
