//! Switchboard's core: everything a real-time server needs that is not a wire format.
//!
//! - [`channel`]: channel names and their namespaces.
//! - [`publication`]: publications, positions and the shared encoded form handed to
//!   every subscriber ([`Delivery`]).
//! - [`broker`]: the [`Broker`] trait, the backplane contract (offsets, epochs, history).
//! - [`memory`]: [`MemoryBroker`], the embedded default broker.
//! - [`queue`]: the per-connection outgoing queue, bounded in bytes.
//! - [`hub`]: the per-node fan-out of publications to local subscriptions, and the
//!   race-free subscribe-then-recover algorithm.
//! - [`contract`]: the broker contract suite every implementation must pass.
//!
//! The core never imports a transport: transports turn [`queue::Event`]s into their own
//! wire format, caching each encoding once per publication in the [`Delivery`].

pub mod broker;
pub mod channel;
pub mod contract;
pub mod hub;
pub mod journal;
pub mod memory;
pub mod pattern;
pub mod presence;
pub mod publication;
pub mod queue;

pub use broker::{Broker, BrokerError, BrokerEventHandler, HistoryRequest, HistoryResult, NodeInfo, PublishOptions};
pub use channel::{ChannelError, ChannelName};
pub use hub::{Hub, HubError, SubscribeOutcome, Subscription};
pub use memory::MemoryBroker;
pub use pattern::Pattern;
pub use publication::{Delivery, Epoch, Kind, Meta, Publication, Published, StreamPosition};
pub use queue::{CloseReason, ConnQueue, Event, QueueStats};

/// Milliseconds since the Unix epoch, the `time` of a publication.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs `f` on what `weak` points to every `every`, until it is dropped. (The sweepers
/// of the in-memory broker and presence.)
pub fn spawn_periodic<T: Send + Sync + 'static>(
    weak: std::sync::Weak<T>,
    every: std::time::Duration,
    f: fn(&T),
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match weak.upgrade() {
                Some(t) => f(&t),
                None => return,
            }
        }
    })
}
