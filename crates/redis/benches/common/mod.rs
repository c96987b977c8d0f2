//! What the Redis benches share.

use std::sync::Arc;

use bytes::Bytes;
use switchboard_core::broker::BrokerEventHandler;
use switchboard_core::Delivery;

/// A node that drops what it is handed: the benches measure Redis, not a hub.
pub struct Nothing;

impl BrokerEventHandler for Nothing {
    fn handle_publication(&self, _: Arc<Delivery>) {}
    fn handle_control(&self, _: Bytes) {}
}

/// The `i`th positional argument (after the bench's name), or `default`.
pub fn arg(i: usize, default: usize) -> usize {
    std::env::args().filter(|a| !a.starts_with('-')).nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}
