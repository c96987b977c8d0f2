//! The node registry against a real Redis (`SWITCHBOARD_TEST_REDIS`, default
//! `redis://127.0.0.1:6379`): heartbeats write only what changed, and the cluster's
//! channel counts follow every change — a count that moves, a channel that goes, all of
//! them going, the periodic whole rewrite — and a node that stops beating lapses.

use std::time::Duration;

use switchboard_core::broker::{Broker, NodeInfo};
use switchboard_redis::{RedisBroker, RedisConfig};

fn url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn node(id: &str) -> NodeInfo {
    NodeInfo { id: id.into(), address: "127.0.0.1:1".into(), connections: 0, started: 0 }
}

fn counts(v: &[(&str, usize)]) -> Vec<(String, usize)> {
    v.iter().map(|(c, n)| (c.to_string(), *n)).collect()
}

#[tokio::test]
async fn heartbeats_keep_the_cluster_channel_counts_exact_as_they_change() {
    let prefix = format!("sbtest-reg-{}", fastrand::u64(..));
    let cfg = || RedisConfig {
        url: url(),
        prefix: prefix.clone(),
        idle_channel_ttl: Duration::from_secs(60),
        cluster: false,
    };
    let (a, b) = (RedisBroker::new(cfg(), "a").unwrap(), RedisBroker::new(cfg(), "b").unwrap());
    let ttl = Duration::from_secs(30);
    a.heartbeat(&node("a"), &counts(&[("x:1", 1), ("x:2", 2)]), ttl).await.unwrap();
    b.heartbeat(&node("b"), &counts(&[("x:2", 5)]), ttl).await.unwrap();
    let all = |want: &[(&str, usize)]| counts(want);
    assert_eq!(a.cluster_channels().await.unwrap().unwrap(), all(&[("x:1", 1), ("x:2", 7)]));
    // A count moves, a channel goes, another comes: written as changes.
    a.heartbeat(&node("a"), &counts(&[("x:2", 3), ("x:3", 1)]), ttl).await.unwrap();
    assert_eq!(a.cluster_channels().await.unwrap().unwrap(), all(&[("x:2", 8), ("x:3", 1)]));
    // Past the periodic whole rewrite, and with nothing left.
    for _ in 0..13 {
        a.heartbeat(&node("a"), &counts(&[("x:3", 4)]), ttl).await.unwrap();
    }
    assert_eq!(a.cluster_channels().await.unwrap().unwrap(), all(&[("x:2", 5), ("x:3", 4)]));
    a.heartbeat(&node("a"), &[], ttl).await.unwrap();
    assert_eq!(a.cluster_channels().await.unwrap().unwrap(), all(&[("x:2", 5)]));
    // A node that stops beating lapses with its channels.
    b.heartbeat(&node("b"), &counts(&[("x:2", 5)]), Duration::from_millis(100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let nodes: Vec<String> = a.nodes().await.unwrap().unwrap().into_iter().map(|n| n.id).collect();
    assert_eq!(nodes, ["a"]);
    assert_eq!(a.cluster_channels().await.unwrap().unwrap(), all(&[]));
}

/// Claims for shared subscriptions: of two nodes claiming the same publications for the
/// same group, each publication is won by exactly one; another group, another epoch or
/// another channel is claimed apart; a claim lapses after its ttl.
#[tokio::test]
async fn each_publication_is_claimed_by_one_node_per_group() {
    use switchboard_core::{ChannelName, StreamPosition};
    let prefix = format!("sbtest-claim-{}", fastrand::u64(..));
    let cfg = || RedisConfig {
        url: url(),
        prefix: prefix.clone(),
        idle_channel_ttl: Duration::from_secs(60),
        cluster: false,
    };
    let (a, b) = (RedisBroker::new(cfg(), "a").unwrap(), RedisBroker::new(cfg(), "b").unwrap());
    let ch = ChannelName::parse("room").unwrap();
    let at = |epoch: &str, offset| StreamPosition { epoch: epoch.into(), offset };
    let ttl = Duration::from_secs(30);
    let first: Vec<StreamPosition> = (1..=10).map(|o| at("e1", o)).collect();
    let won_a = a.claim(&ch, "g\u{0}f", &first[..6], ttl).await.unwrap();
    let won_b = b.claim(&ch, "g\u{0}f", &first, ttl).await.unwrap();
    assert_eq!(won_a, vec![true; 6]);
    assert_eq!(won_b, [vec![false; 6], vec![true; 4]].concat());
    // Another group, epoch or channel: claimed apart.
    assert_eq!(a.claim(&ch, "h\u{0}f", &first[..1], ttl).await.unwrap(), vec![true]);
    assert_eq!(a.claim(&ch, "g\u{0}f", &[at("e2", 1)], ttl).await.unwrap(), vec![true]);
    let other = ChannelName::parse("hall").unwrap();
    assert_eq!(b.claim(&other, "g\u{0}f", &first[..1], ttl).await.unwrap(), vec![true]);
    // A claim lapses.
    let short = Duration::from_millis(200);
    assert_eq!(a.claim(&ch, "g\u{0}f", &[at("e3", 1)], short).await.unwrap(), vec![true]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.claim(&ch, "g\u{0}f", &[at("e3", 1)], short).await.unwrap(), vec![true]);
}

/// Revocations kept for the cluster: one node saves, another (or one started later)
/// reads them; a later expiry for the same key wins; lapsed ones are gone.
#[tokio::test]
async fn revocations_are_kept_for_every_node_until_they_lapse() {
    let prefix = format!("sbtest-rev-{}", fastrand::u64(..));
    let cfg = || RedisConfig {
        url: url(),
        prefix: prefix.clone(),
        idle_channel_ttl: Duration::from_secs(60),
        cluster: false,
    };
    let (a, b) = (RedisBroker::new(cfg(), "a").unwrap(), RedisBroker::new(cfg(), "b").unwrap());
    let now = switchboard_core::now_millis();
    a.save_revocation("user\u{0}mallory", now + 60_000).await.unwrap();
    a.save_revocation("jti\u{0}t-1", now + 300).await.unwrap();
    // A shorter expiry does not shorten one in force.
    b.save_revocation("user\u{0}mallory", now + 1_000).await.unwrap();
    let mut kept = b.revocations().await.unwrap();
    kept.sort();
    assert_eq!(kept, vec![("jti\u{0}t-1".to_string(), now + 300), ("user\u{0}mallory".to_string(), now + 60_000)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.revocations().await.unwrap(), vec![("user\u{0}mallory".to_string(), now + 60_000)]);
}
