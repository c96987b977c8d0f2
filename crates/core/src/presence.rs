//! Presence: who is subscribed to a channel right now.
//!
//! [`PresenceManager`] is the contract; entries carry a TTL and are refreshed by their
//! owner's heartbeat, so a backend shared by many nodes (Redis) drops the clients of a
//! node that died without saying goodbye. [`MemoryPresence`] is the embedded default.
//! Every implementation runs [`presence_contract_tests!`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::broker::BrokerError;
use crate::channel::ChannelName;

/// One client in a channel's presence.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// Connection id: one per tab / device.
    pub client: String,
    /// User id from the token (`""` for anonymous clients).
    pub user: String,
    /// Public info from the token.
    #[serde(default)]
    pub info: Option<serde_json::Value>,
}

/// Counts only: cheap even for huge channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PresenceStats {
    /// Connections present.
    pub clients: usize,
    /// Distinct users among them (several tabs of one user count once).
    pub users: usize,
}

/// The presence backend. Per channel:
///
/// 1. `add` inserts a member or refreshes it; the entry expires `ttl` after the last
///    `add` unless `remove`d first. Expired entries are never returned.
/// 2. `members` returns the live entries, one per client, sorted by client id.
/// 3. `stats` counts live clients and distinct users.
#[async_trait]
pub trait PresenceManager: Send + Sync + 'static {
    async fn add(&self, channel: &ChannelName, member: Member, ttl: Duration) -> Result<(), BrokerError>;
    async fn remove(&self, channel: &ChannelName, client: &str) -> Result<(), BrokerError>;
    async fn members(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError>;
    async fn stats(&self, channel: &ChannelName) -> Result<PresenceStats, BrokerError>;
}

type Entries = HashMap<String, (Member, Instant)>;

/// In-process presence.
#[derive(Default)]
pub struct MemoryPresence {
    channels: Mutex<HashMap<ChannelName, Entries>>,
}

impl MemoryPresence {
    fn with<R>(&self, channel: &ChannelName, f: impl FnOnce(&mut Entries) -> R) -> R {
        let mut m = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entries = m.entry(channel.clone()).or_default();
        entries.retain(|_, (_, until)| *until > now);
        let r = f(entries);
        if entries.is_empty() {
            m.remove(channel);
        }
        r
    }

    /// Drops expired entries everywhere (run periodically; reads also purge).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut m = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, e| {
            e.retain(|_, (_, until)| *until > now);
            !e.is_empty()
        });
    }

    /// Channels with at least one entry (for tests of boundedness).
    pub fn channel_count(&self) -> usize {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Starts the periodic sweep; stops when the presence manager is dropped.
pub fn spawn_sweeper(p: &Arc<MemoryPresence>, every: Duration) -> tokio::task::JoinHandle<()> {
    crate::spawn_periodic(Arc::downgrade(p), every, |x| x.sweep())
}

#[async_trait]
impl PresenceManager for MemoryPresence {
    async fn add(&self, channel: &ChannelName, member: Member, ttl: Duration) -> Result<(), BrokerError> {
        let until = Instant::now() + ttl;
        self.with(channel, |e| {
            e.insert(member.client.clone(), (member, until));
        });
        Ok(())
    }

    async fn remove(&self, channel: &ChannelName, client: &str) -> Result<(), BrokerError> {
        self.with(channel, |e| {
            e.remove(client);
        });
        Ok(())
    }

    async fn members(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        let mut v: Vec<Member> = self.with(channel, |e| e.values().map(|(m, _)| m.clone()).collect());
        v.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(v)
    }

    async fn stats(&self, channel: &ChannelName) -> Result<PresenceStats, BrokerError> {
        Ok(self.with(channel, |e| {
            let users: std::collections::HashSet<&str> = e.values().map(|(m, _)| m.user.as_str()).collect();
            PresenceStats { clients: e.len(), users: users.len() }
        }))
    }
}

/// Generates one `#[tokio::test]` per presence contract check; `$make` returns a fresh
/// `Arc<dyn PresenceManager>`. `presence_contract_tests!(paused: make)` runs them on a
/// paused tokio clock (see [`crate::broker_contract_tests!`]).
#[macro_export]
macro_rules! presence_contract_tests {
    (paused: $make:expr) => {
        $crate::presence_contract_tests!(@list $make; (start_paused = true));
    };
    ($make:expr) => {
        $crate::presence_contract_tests!(@list $make; ());
    };
    (@list $make:expr; $attr:tt) => {
        $crate::presence_contract_tests!(@each $make; $attr;
            added_members_are_listed_once_per_client,
            several_tabs_count_as_one_user,
            removed_members_disappear,
            members_expire_unless_refreshed,
            channels_are_independent,
        );
    };
    (@each $make:expr; $attr:tt; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test $attr]
            async fn $name() {
                let p = ($make)().await;
                $crate::presence::contract::$name(p).await;
            }
        )+
    };
}

/// The presence contract, as functions (see [`presence_contract_tests!`]).
pub mod contract {
    use super::*;

    fn fresh() -> ChannelName {
        ChannelName::parse(&format!("presence:c{}-{}", std::process::id(), fastrand::u64(..))).unwrap()
    }

    fn m(client: &str, user: &str) -> Member {
        Member { client: client.into(), user: user.into(), info: Some(serde_json::json!({"name": user})) }
    }

    const LONG: Duration = Duration::from_secs(60);

    pub async fn added_members_are_listed_once_per_client(p: Arc<dyn PresenceManager>) {
        let ch = fresh();
        p.add(&ch, m("c2", "bob"), LONG).await.unwrap();
        p.add(&ch, m("c1", "alice"), LONG).await.unwrap();
        p.add(&ch, m("c1", "alice"), LONG).await.unwrap();
        let list = p.members(&ch).await.unwrap();
        assert_eq!(list, vec![m("c1", "alice"), m("c2", "bob")]);
    }

    pub async fn several_tabs_count_as_one_user(p: Arc<dyn PresenceManager>) {
        let ch = fresh();
        for c in ["t1", "t2", "t3"] {
            p.add(&ch, m(c, "alice"), LONG).await.unwrap();
        }
        p.add(&ch, m("t4", "bob"), LONG).await.unwrap();
        assert_eq!(p.stats(&ch).await.unwrap(), PresenceStats { clients: 4, users: 2 });
        assert_eq!(p.members(&ch).await.unwrap().len(), 4);
    }

    pub async fn removed_members_disappear(p: Arc<dyn PresenceManager>) {
        let ch = fresh();
        p.add(&ch, m("a", "u"), LONG).await.unwrap();
        p.add(&ch, m("b", "u"), LONG).await.unwrap();
        p.remove(&ch, "a").await.unwrap();
        p.remove(&ch, "nobody").await.unwrap();
        assert_eq!(p.members(&ch).await.unwrap(), vec![m("b", "u")]);
        p.remove(&ch, "b").await.unwrap();
        assert_eq!(p.stats(&ch).await.unwrap(), PresenceStats { clients: 0, users: 0 });
    }

    pub async fn members_expire_unless_refreshed(p: Arc<dyn PresenceManager>) {
        let ch = fresh();
        p.add(&ch, m("gone", "u1"), Duration::from_secs(1)).await.unwrap();
        p.add(&ch, m("kept", "u2"), Duration::from_secs(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Refreshed for long enough that no stall before the check can expire it. (A
        // stall before this refresh only means it re-adds an entry that had lapsed.)
        p.add(&ch, m("kept", "u2"), LONG).await.unwrap();
        // Sleeps last at least as long as asked: "gone" is past its second by now.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(p.members(&ch).await.unwrap(), vec![m("kept", "u2")]);
        assert_eq!(p.stats(&ch).await.unwrap(), PresenceStats { clients: 1, users: 1 });
    }

    pub async fn channels_are_independent(p: Arc<dyn PresenceManager>) {
        let (a, b) = (fresh(), fresh());
        p.add(&a, m("x", "u"), LONG).await.unwrap();
        assert!(p.members(&b).await.unwrap().is_empty());
        p.remove(&b, "x").await.unwrap();
        assert_eq!(p.members(&a).await.unwrap().len(), 1);
    }
}
