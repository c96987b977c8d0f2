//! Presence: who is subscribed to a channel right now.
//!
//! [`PresenceManager`] is the contract; entries carry a TTL and are refreshed by their
//! owner's heartbeat, so a backend shared by many nodes (Redis) drops the clients of a
//! node that died without saying goodbye. [`MemoryPresence`] is the embedded default.
//! Every implementation runs [`presence_contract_tests!`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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

/// One channel's presence: its members, a count per user (so stats are O(1)), and the
/// expiry times in a heap. A refresh pushes a new expiry and leaves the old one behind to
/// be skipped when it comes up, so no operation scans the members.
#[derive(Default)]
struct ChannelPresence {
    members: HashMap<String, (Member, Instant)>,
    users: HashMap<String, usize>,
    expiry: BinaryHeap<Reverse<(Instant, String)>>,
}

impl ChannelPresence {
    fn count_user(&mut self, user: &str, delta: isize) {
        let n = self.users.entry(user.to_string()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.users.remove(user);
        }
    }

    fn insert(&mut self, member: Member, until: Instant) {
        let client = member.client.clone();
        self.count_user(&member.user, 1);
        if let Some((old, _)) = self.members.insert(client.clone(), (member, until)) {
            self.count_user(&old.user, -1);
        }
        self.expiry.push(Reverse((until, client)));
        if self.expiry.len() > 2 * self.members.len() + 64 {
            // Mostly stale entries from refreshes: rebuild from the members.
            self.expiry = self.members.iter().map(|(c, (_, u))| Reverse((*u, c.clone()))).collect();
        }
    }

    fn remove(&mut self, client: &str) {
        if let Some((old, _)) = self.members.remove(client) {
            self.count_user(&old.user, -1);
        }
    }

    /// Drops the members whose time has come: O(expired × log n).
    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((until, _))) = self.expiry.peek() {
            if *until > now {
                break;
            }
            let Reverse((until, client)) = self.expiry.pop().expect("peeked");
            if self.members.get(&client).is_some_and(|(_, u)| *u == until) {
                self.remove(&client);
            }
        }
    }
}

const SHARDS: usize = 64;

/// In-process presence, sharded by channel: a join, refresh or leave touches one
/// channel's entry under one shard's lock, in logarithmic time, whatever the number of
/// members.
pub struct MemoryPresence {
    shards: Box<[Mutex<HashMap<ChannelName, ChannelPresence>>]>,
}

impl Default for MemoryPresence {
    fn default() -> Self {
        MemoryPresence { shards: (0..SHARDS).map(|_| Mutex::default()).collect() }
    }
}

impl MemoryPresence {
    fn with<R>(&self, channel: &ChannelName, f: impl FnOnce(&mut ChannelPresence) -> R) -> R {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        channel.hash(&mut h);
        let shard = &self.shards[(h.finish() as usize) % SHARDS];
        let mut m = shard.lock().unwrap_or_else(|p| p.into_inner());
        let entry = m.entry(channel.clone()).or_default();
        entry.expire(Instant::now());
        let r = f(entry);
        if entry.members.is_empty() {
            m.remove(channel);
        }
        r
    }

    /// Drops expired entries everywhere (run periodically; every access also expires
    /// its channel's), one shard at a time.
    pub fn sweep(&self) {
        for shard in self.shards.iter() {
            let now = Instant::now();
            let mut m = shard.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|_, e| {
                e.expire(now);
                !e.members.is_empty()
            });
        }
    }

    /// Channels with at least one entry (for tests of boundedness).
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
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
        self.with(channel, |e| e.insert(member, until));
        Ok(())
    }

    async fn remove(&self, channel: &ChannelName, client: &str) -> Result<(), BrokerError> {
        self.with(channel, |e| e.remove(client));
        Ok(())
    }

    async fn members(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        let mut v: Vec<Member> = self.with(channel, |e| e.members.values().map(|(m, _)| m.clone()).collect());
        v.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(v)
    }

    async fn stats(&self, channel: &ChannelName) -> Result<PresenceStats, BrokerError> {
        Ok(self.with(channel, |e| PresenceStats { clients: e.members.len(), users: e.users.len() }))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn m(client: usize, user: usize) -> Member {
        Member { client: format!("c{client}"), user: format!("u{user}"), info: None }
    }

    #[tokio::test(start_paused = true)]
    async fn a_join_refresh_leave_storm_leaves_presence_exact() {
        let p = MemoryPresence::default();
        let ch = ChannelName::parse("room:storm").unwrap();
        let ttl = Duration::from_secs(30);
        // 20,000 clients of 5,000 users join, each refreshes three times, half leave.
        for i in 0..20_000 {
            p.add(&ch, m(i, i % 5000), ttl).await.unwrap();
        }
        for _ in 0..3 {
            for i in 0..20_000 {
                p.add(&ch, m(i, i % 5000), ttl).await.unwrap();
            }
        }
        for i in (0..20_000).step_by(2) {
            p.remove(&ch, &format!("c{i}")).await.unwrap();
        }
        // Odd clients remain: users u1, u3, … — 2,500 of them.
        assert_eq!(p.stats(&ch).await.unwrap(), PresenceStats { clients: 10_000, users: 2_500 });
        // Refreshes do not pile up: the expiry heap stays proportional to the members.
        let heap = p.with(&ch, |e| e.expiry.len());
        assert!(heap <= 2 * 20_000 + 64, "{heap} expiry entries");
        // Without refreshes, everyone expires; the channel's entry goes with them.
        tokio::time::advance(ttl + Duration::from_secs(1)).await;
        assert_eq!(p.stats(&ch).await.unwrap(), PresenceStats { clients: 0, users: 0 });
        assert_eq!(p.channel_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refreshed_member_outlives_its_first_expiry() {
        let p = MemoryPresence::default();
        let ch = ChannelName::parse("room:r").unwrap();
        p.add(&ch, m(1, 1), Duration::from_secs(1)).await.unwrap();
        p.add(&ch, m(1, 1), Duration::from_secs(10)).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(p.members(&ch).await.unwrap(), vec![m(1, 1)]);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(p.members(&ch).await.unwrap().is_empty());
    }
}
