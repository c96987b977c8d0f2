//! Redis backplane: many Switchboard nodes share channels, history and presence.
//!
//! - [`RedisBroker`]: offsets and history in Redis (a hash for the epoch and top offset,
//!   a Stream per channel for history), numbered, stored and fanned out by one Lua script
//!   per publish — atomic per channel — and delivered to nodes by Pub/Sub (sharded Pub/Sub
//!   on a Redis Cluster), handed to the hub by one dispatcher per core, each channel on
//!   one of them. A node that loses its Pub/Sub connection resubscribes and refills what
//!   it missed from the Streams, so a Redis blip is not a gap.
//! - [`RedisPresence`]: presence entries with per-entry expiry, refreshed by the owning
//!   connection's heartbeat, so a node killed with SIGKILL loses its clients' presence
//!   within the TTL.
//!
//! - [`RedisQueue`] (webhooks' shared queue), [`Occupancy`], and [`StreamConsumer`] — an
//!   application's Stream read through a consumer group, the Redis Streams publication
//!   source.
//!
//! The broker and presence pass the core's contract suites (`tests/`). Keys live under a prefix, so several
//! Switchboard clusters can share one Redis.

mod broker;
mod conn;
mod kv;
mod presence;
mod queue;
mod scripts;
mod stream;

pub use broker::{RedisBroker, RedisConfig};
pub use conn::{Conn, Target};
pub use kv::RedisKv;
pub use presence::RedisPresence;
pub use queue::{Occupancy, RedisQueue, Taken};
pub use stream::{StreamConsumer, StreamEntry};
