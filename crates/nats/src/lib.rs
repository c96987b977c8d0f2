//! NATS backplane for Switchboard.
//!
//! [`NatsBroker`] keeps every channel's log in a JetStream stream and fans publications
//! out to nodes over core NATS; [`NatsPresence`] keeps presence in a JetStream stream of
//! one message per member. Both pass the core's contract suites
//! ([`switchboard_core::broker_contract_tests!`], `presence_contract_tests!`).
//!
//! Streams, under the configured prefix `P` (subjects) and its upper-case stream name `S`:
//!
//! | stream | subjects | holds |
//! |---|---|---|
//! | `S_HISTORY` | `P.h.<ns>.<channel>` | each channel's publications, numbered; republished to `P.l.<ns>.<channel>` once stored |
//! | `S_STATE` | `P.s.>` | one message per subject: presence members, live nodes, shared-subscription claims (an hour at most) |
//! | `S_KEEP` | `P.k.>` | one message per subject: revocations, until they lapse |
//! | `S_KV_<space>` | `P.v.<space>.>` | [`NatsKv`]: one value per key (MQTT persistent sessions) |
//!
//! Core NATS subjects: `P.l.<ns>.<channel>` (stored publications, republished by the
//! stream in stream order, and volatile ones published there directly) and `P.ctl`
//! (control messages between nodes).

mod broker;
mod kv;
mod presence;
mod subject;

pub use broker::{NatsBroker, NatsConfig};
pub use kv::NatsKv;
pub use presence::NatsPresence;
