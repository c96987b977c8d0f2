//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5 §4.8.2, also accepted from
//! 3.1.1 clients): the members of a group on one channel or pattern share its
//! publications — each goes to one member, in turn — for load-balanced consumers.
//!
//! A group is one subscription of its own at the hub (so the channel's fan-out counts it
//! once); a task hands what it receives to the members' queues round-robin, skipping a
//! member whose queue refuses (closed, or full: that member is a slow consumer and is
//! closed as one).
//!
//! With several nodes (the Redis broker), a group has a part on each node where it has
//! members, and each stored publication goes to one of them: the parts claim it through
//! the broker ([`switchboard_core::Broker::claim`]) and the first claim wins. Volatile
//! publications (no offset to claim by) go to one member on each node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use switchboard_core::hub::{SubscribeRequest, SubscriptionHandle};
use switchboard_core::queue::Event;
use switchboard_core::{Broker, ChannelName, ConnQueue, StreamPosition};

use crate::app::AppState;
use crate::error::ApiError;
use crate::session::{Resolved, ResolvedPattern};

/// The channel or pattern a group shares.
pub enum Target {
    Channel(Resolved),
    Pattern(ResolvedPattern),
}

type MemberList = Mutex<Vec<(u64, Weak<ConnQueue>)>>;
type Members = Arc<MemberList>;

struct Group {
    members: Members,
    /// The hub subscription and the task that deals out; dropped with the last member.
    _handle: SubscriptionHandle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Group {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The groups of this node, by (group name, channel or pattern).
#[derive(Default)]
pub struct Groups {
    groups: Mutex<HashMap<(String, String), Arc<Group>>>,
    next_member: std::sync::atomic::AtomicU64,
}

impl Groups {
    /// Live members of the groups on `name` (a channel or pattern), all groups together.
    pub fn members(&self, name: &str) -> usize {
        let map = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|((_, n), _)| n == name)
            .map(|(_, g)| {
                let m = g.members.lock().unwrap_or_else(|p| p.into_inner());
                m.iter().filter(|(_, q)| q.strong_count() > 0).count()
            })
            .sum()
    }
}

/// A connection's place in a group; leaving is dropping it.
pub struct Membership {
    state: AppState,
    key: (String, String),
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let groups = &self.state.mqtt_groups;
        let mut map = groups.groups.lock().unwrap_or_else(|p| p.into_inner());
        let Some(g) = map.get(&self.key) else { return };
        let empty = {
            let mut m = g.members.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|(id, q)| *id != self.id && q.strong_count() > 0);
            m.is_empty()
        };
        if empty {
            // The last member: the group's subscription and task go.
            map.remove(&self.key);
        }
    }
}

/// Joins `queue` to the group `group` on `target` (already through the gate), making the
/// group if it is the first member.
pub async fn join(
    state: &AppState,
    group: &str,
    target: Target,
    queue: &Arc<ConnQueue>,
) -> Result<Membership, ApiError> {
    let name = match &target {
        Target::Channel(r) => r.channel.to_string(),
        Target::Pattern(p) => p.pattern.to_string(),
    };
    let key = (group.to_string(), name);
    let groups = &state.mqtt_groups;
    let id = groups.next_member.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let existing = groups.groups.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
    let g = match existing {
        Some(g) => g,
        None => {
            let bound = match &target {
                Target::Channel(r) => r.options.queue_max_bytes,
                Target::Pattern(p) => p.options.queue_max_bytes,
            };
            let shared = state.hub.queue(bound);
            let handle = match target {
                Target::Channel(r) => {
                    let live = SubscribeRequest { since: None, rewind: None, recovery_max: None };
                    state.hub.subscribe(r.channel, shared.clone(), live).await?.go_live()
                }
                Target::Pattern(p) => state.hub.subscribe_pattern(p.pattern, shared.clone()).await?,
            };
            let members: Members = Arc::default();
            // The group is named by its share name and filter (MQTT 5 §4.8.2).
            let owner = format!("{}\u{0}{}", key.0, key.1);
            let broker = state.hub.broker().clone();
            let task = tokio::spawn(deal(shared, Arc::downgrade(&members), broker, owner));
            let g = Arc::new(Group { members, _handle: handle, task });
            let mut map = groups.groups.lock().unwrap_or_else(|p| p.into_inner());
            // Another connection may have made the group meanwhile: theirs is used (this
            // one is dropped, its subscription and task with it).
            map.entry(key.clone()).or_insert(g).clone()
        }
    };
    g.members.lock().unwrap_or_else(|p| p.into_inner()).push((id, Arc::downgrade(queue)));
    Ok(Membership { state: state.clone(), key, id })
}

/// How long a claim on a publication stands: far longer than the nodes of a cluster
/// take to receive one publication.
const CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Deals the group's publications to its members in turn, until the group is gone —
/// the stored ones this node claimed for the group (see the module docs).
async fn deal(shared: Arc<ConnQueue>, members: Weak<MemberList>, broker: Arc<dyn Broker>, owner: String) {
    let mut batch = Vec::new();
    let mut turn = 0usize;
    loop {
        if shared.next_batch(&mut batch).await.is_err() {
            return;
        }
        let Some(members) = members.upgrade() else { return };
        let ours = claimed(&*broker, &owner, &batch).await;
        for (event, ours) in batch.drain(..).zip(ours) {
            let Event::Publication(_) = &event else { continue };
            if !ours {
                continue; // another node's part of the group has it
            }
            let live: Vec<Arc<ConnQueue>> = {
                let m = members.lock().unwrap_or_else(|p| p.into_inner());
                m.iter().filter_map(|(_, q)| q.upgrade()).collect()
            };
            // One member takes it: the next in turn whose queue accepts it.
            for k in 0..live.len() {
                let q = &live[(turn + k) % live.len()];
                if q.push(event.clone()).is_ok() {
                    turn = (turn + k + 1) % live.len().max(1);
                    break;
                }
            }
        }
        shared.write_done();
    }
}

/// Which events of `batch` this node delivers: everything but the stored publications
/// another node claimed for `owner` first. One round of claims per channel in the batch;
/// when the broker cannot be asked, this node delivers (a publication twice across nodes
/// rather than to no one).
async fn claimed(broker: &dyn Broker, owner: &str, batch: &[Event]) -> Vec<bool> {
    let mut ours = vec![true; batch.len()];
    let mut by_channel: Vec<(&ChannelName, Vec<usize>)> = Vec::new();
    for (i, e) in batch.iter().enumerate() {
        if let Event::Publication(d) = e {
            if d.publication.is_stored() {
                let ch = &d.publication.channel;
                match by_channel.iter_mut().find(|(c, _)| *c == ch) {
                    Some((_, idx)) => idx.push(i),
                    None => by_channel.push((ch, vec![i])),
                }
            }
        }
    }
    for (channel, idx) in by_channel {
        let positions: Vec<StreamPosition> = idx
            .iter()
            .filter_map(|i| match &batch[*i] {
                Event::Publication(d) => Some(d.publication.position()),
                _ => None,
            })
            .collect();
        match broker.claim(channel, owner, &positions, CLAIM_TTL).await {
            Ok(won) => {
                for (i, won) in idx.into_iter().zip(won) {
                    ours[i] = won;
                }
            }
            Err(e) => tracing::warn!(%channel, "shared subscription: claiming failed, delivering here: {e}"),
        }
    }
    ours
}
