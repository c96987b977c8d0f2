//! The broker contract suite: [`Broker`]'s doc comment, as tests.
//!
//! Every broker implementation runs this suite with [`broker_contract_tests!`]:
//!
//! ```ignore
//! switchboard_core::broker_contract_tests!(|handler| async move {
//!     let broker = std::sync::Arc::new(MyBroker::connect().await);
//!     broker.run(handler).await.unwrap();
//!     broker as std::sync::Arc<dyn switchboard_core::Broker>
//! });
//! ```
//!
//! Each check uses fresh random channel names, so one backing store can serve them all.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::broker::{Broker, BrokerError, BrokerEventHandler, HistoryRequest, PublishOptions};
use crate::channel::ChannelName;
use crate::publication::{Kind, Publication, StreamPosition};

/// A handler that records what the broker delivers to this node.
pub struct Recorder {
    tx: Mutex<mpsc::UnboundedSender<Publication>>,
}

impl Recorder {
    pub fn new() -> (Arc<Recorder>, mpsc::UnboundedReceiver<Publication>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Recorder { tx: Mutex::new(tx) }), rx)
    }
}

impl BrokerEventHandler for Recorder {
    fn handle_publication(&self, delivery: Arc<crate::publication::Delivery>) {
        let _ = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(delivery.publication.clone());
    }
}

/// Generates one `#[tokio::test]` per contract check. `$make` is called with the
/// recording handler and must return a running `Arc<dyn Broker>`.
///
/// `broker_contract_tests!(paused: make)` runs each check on a paused tokio clock, so
/// the checks that wait for a TTL take no real time. That is for brokers whose every
/// timer is tokio's (the in-memory one); a broker whose TTLs live elsewhere (Redis)
/// runs in real time.
#[macro_export]
macro_rules! broker_contract_tests {
    (paused: $make:expr) => {
        $crate::broker_contract_tests!(@list $make; (start_paused = true));
    };
    ($make:expr) => {
        $crate::broker_contract_tests!(@list $make; ());
    };
    (@list $make:expr; $attr:tt) => {
        $crate::broker_contract_tests!(@each $make; $attr;
            offsets_start_at_one_and_are_gapless,
            concurrent_publishes_get_distinct_gapless_offsets,
            new_channel_is_at_offset_zero_and_publish_continues_its_epoch,
            history_returns_retained_publications_in_order,
            history_limit_takes_oldest_or_latest,
            history_is_bounded_by_size,
            history_is_bounded_by_ttl_but_offsets_survive,
            expired_oldest_publications_go_while_newer_ones_stay,
            since_returns_exactly_the_missed_publications,
            since_at_top_returns_nothing,
            since_older_than_history_is_position_lost,
            since_from_another_epoch_is_position_lost,
            since_in_the_future_is_position_lost,
            live_only_channel_numbers_but_keeps_nothing,
            subscribed_node_receives_publications_in_offset_order,
            unsubscribed_node_receives_nothing,
            a_repeated_idempotency_key_publishes_once,
            idempotency_keys_are_per_channel_and_expire,
            volatile_publications_reach_the_node_but_take_no_offset,
            namespace_subscription_receives_every_channel_of_the_namespace,
            a_publications_meta_is_delivered_and_kept_with_it,
        );
    };
    (@each $make:expr; $attr:tt; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test $attr]
            async fn $name() {
                let (handler, rx) = $crate::contract::Recorder::new();
                let broker = ($make)(handler).await;
                $crate::contract::$name(broker, rx).await;
            }
        )+
    };
}

type Rx = mpsc::UnboundedReceiver<Publication>;

fn fresh(prefix: &str) -> ChannelName {
    ChannelName::parse(&format!("contract:{prefix}-{}-{}", std::process::id(), fastrand::u64(..))).unwrap()
}

fn opts(size: usize) -> PublishOptions {
    PublishOptions { history_size: size, history_ttl: Duration::from_secs(300), ..Default::default() }
}

fn data(i: u64) -> Bytes {
    Bytes::from(format!("{{\"i\":{i}}}"))
}

async fn publish_n(b: &Arc<dyn Broker>, ch: &ChannelName, n: u64, o: &PublishOptions) -> Vec<StreamPosition> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(b.publish(ch, data(i), o).await.expect("publish").position);
    }
    out
}

fn offsets(p: &[Arc<crate::publication::Delivery>]) -> Vec<u64> {
    p.iter().map(|p| p.offset).collect()
}

pub async fn offsets_start_at_one_and_are_gapless(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("gapless");
    let pos = publish_n(&b, &ch, 5, &opts(10)).await;
    assert_eq!(pos.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert!(pos.iter().all(|p| p.epoch == pos[0].epoch), "epoch changed within one history");
}

pub async fn concurrent_publishes_get_distinct_gapless_offsets(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("concurrent");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (b, ch) = (b.clone(), ch.clone());
        tasks.push(tokio::spawn(async move { publish_n(&b, &ch, 25, &opts(1000)).await }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap().into_iter().map(|p| p.offset));
    }
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    assert_eq!(offsets(&h.publications), (1..=200).collect::<Vec<_>>());
}

pub async fn new_channel_is_at_offset_zero_and_publish_continues_its_epoch(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("new");
    let p0 = b.position(&ch).await.unwrap();
    assert_eq!(p0.offset, 0);
    let p1 = b.publish(&ch, data(1), &opts(10)).await.unwrap().position;
    assert_eq!(p1, StreamPosition { epoch: p0.epoch.clone(), offset: 1 });
    // A client that subscribed at (epoch, 0) resumes with nothing lost.
    let h = b.history(&ch, HistoryRequest { since: Some(p0), ..Default::default() }).await.unwrap();
    assert_eq!(offsets(&h.publications), vec![1]);
}

pub async fn history_returns_retained_publications_in_order(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("order");
    publish_n(&b, &ch, 3, &opts(10)).await;
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    assert_eq!(offsets(&h.publications), vec![1, 2, 3]);
    assert_eq!(h.position.offset, 3);
    for (i, p) in h.publications.iter().enumerate() {
        assert_eq!(p.data, data(i as u64 + 1));
        assert_eq!(p.channel, ch);
        assert_eq!(p.epoch, h.position.epoch);
        assert!(p.time > 0);
    }
}

pub async fn history_limit_takes_oldest_or_latest(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("limit");
    publish_n(&b, &ch, 6, &opts(10)).await;
    let first = b.history(&ch, HistoryRequest { limit: Some(2), ..Default::default() }).await.unwrap();
    assert_eq!(offsets(&first.publications), vec![1, 2]);
    let last = b.history(&ch, HistoryRequest { limit: Some(2), latest: true, ..Default::default() }).await.unwrap();
    assert_eq!(offsets(&last.publications), vec![5, 6]);
    let more = b.history(&ch, HistoryRequest { limit: Some(50), latest: true, ..Default::default() }).await.unwrap();
    assert_eq!(offsets(&more.publications), vec![1, 2, 3, 4, 5, 6]);
}

pub async fn history_is_bounded_by_size(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("size");
    publish_n(&b, &ch, 10, &opts(3)).await;
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    assert_eq!(offsets(&h.publications), vec![8, 9, 10]);
}

pub async fn history_is_bounded_by_ttl_but_offsets_survive(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("ttl");
    let o = PublishOptions { history_size: 10, history_ttl: Duration::from_secs(1), ..Default::default() };
    let pos = publish_n(&b, &ch, 3, &o).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    assert!(h.publications.is_empty(), "expired publications returned: {:?}", offsets(&h.publications));
    assert_eq!(h.position, pos[2], "top offset and epoch must outlive the history");
    // At the top, nothing was missed even though history is empty...
    let at_top = b.history(&ch, HistoryRequest { since: Some(pos[2].clone()), ..Default::default() }).await;
    assert!(at_top.unwrap().publications.is_empty());
    // ...but from before the top, expired publications were missed: position lost.
    let behind = b.history(&ch, HistoryRequest { since: Some(pos[0].clone()), ..Default::default() }).await;
    assert_eq!(behind, Err(BrokerError::PositionLost { current: pos[2].clone() }));
    let next = b.publish(&ch, data(4), &o).await.unwrap().position;
    assert_eq!(next, StreamPosition { epoch: pos[2].epoch.clone(), offset: 4 });
}

pub async fn expired_oldest_publications_go_while_newer_ones_stay(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("ttl-head");
    // More than one read's worth of entries that expire (a broker may drop them in chunks),
    // then entries that outlive the test; the channel (and a Redis stream key) stays alive.
    let brief = PublishOptions { history_size: 1000, history_ttl: Duration::from_secs(1), ..Default::default() };
    let lasting = PublishOptions { history_ttl: Duration::from_secs(600), ..brief.clone() };
    let old = publish_n(&b, &ch, 150, &brief).await;
    let mut new = Vec::new();
    for i in 0..3 {
        new.push(b.publish(&ch, data(151 + i), &lasting).await.unwrap().position);
    }
    // Only ever longer than asked: the first 150 are past their second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    assert_eq!(offsets(&h.publications), vec![151, 152, 153], "the expired ones are not history");
    let latest = b.history(&ch, HistoryRequest { limit: Some(2), latest: true, ..Default::default() }).await;
    assert_eq!(offsets(&latest.unwrap().publications), vec![152, 153]);
    let oldest = b.history(&ch, HistoryRequest { limit: Some(1), ..Default::default() }).await;
    assert_eq!(offsets(&oldest.unwrap().publications), vec![151]);
    // From the last expired one: nothing missed that is gone.
    let from = HistoryRequest { since: Some(old[149].clone()), ..Default::default() };
    assert_eq!(offsets(&b.history(&ch, from).await.unwrap().publications), vec![151, 152, 153]);
    // From before it: one publication missed for good.
    let before = HistoryRequest { since: Some(old[148].clone()), ..Default::default() };
    assert_eq!(b.history(&ch, before).await, Err(BrokerError::PositionLost { current: new[2].clone() }));
}

pub async fn since_returns_exactly_the_missed_publications(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("since");
    let pos = publish_n(&b, &ch, 7, &opts(10)).await;
    let h = b.history(&ch, HistoryRequest { since: Some(pos[3].clone()), ..Default::default() }).await.unwrap();
    assert_eq!(offsets(&h.publications), vec![5, 6, 7]);
    let limited = HistoryRequest { since: Some(pos[3].clone()), limit: Some(2), latest: false };
    assert_eq!(offsets(&b.history(&ch, limited).await.unwrap().publications), vec![5, 6]);
}

pub async fn since_at_top_returns_nothing(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("top");
    let pos = publish_n(&b, &ch, 2, &opts(10)).await;
    let h = b.history(&ch, HistoryRequest { since: Some(pos[1].clone()), ..Default::default() }).await.unwrap();
    assert!(h.publications.is_empty());
    assert_eq!(h.position, pos[1]);
}

pub async fn since_older_than_history_is_position_lost(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("old");
    let pos = publish_n(&b, &ch, 10, &opts(3)).await;
    // Retained: 8, 9, 10. From 7 nothing is missing; from 6, offset 7 is gone.
    let ok = b.history(&ch, HistoryRequest { since: Some(pos[6].clone()), ..Default::default() }).await.unwrap();
    assert_eq!(offsets(&ok.publications), vec![8, 9, 10]);
    let lost = b.history(&ch, HistoryRequest { since: Some(pos[5].clone()), ..Default::default() }).await;
    assert_eq!(lost, Err(BrokerError::PositionLost { current: pos[9].clone() }));
}

pub async fn since_from_another_epoch_is_position_lost(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("epoch");
    let pos = publish_n(&b, &ch, 3, &opts(10)).await;
    let other = StreamPosition { epoch: Arc::from("zzzzzzzzzz"), offset: 1 };
    let lost = b.history(&ch, HistoryRequest { since: Some(other), ..Default::default() }).await;
    assert_eq!(lost, Err(BrokerError::PositionLost { current: pos[2].clone() }));
}

pub async fn since_in_the_future_is_position_lost(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("future");
    let pos = publish_n(&b, &ch, 2, &opts(10)).await;
    let ahead = StreamPosition { epoch: pos[1].epoch.clone(), offset: 99 };
    let lost = b.history(&ch, HistoryRequest { since: Some(ahead), ..Default::default() }).await;
    assert_eq!(lost, Err(BrokerError::PositionLost { current: pos[1].clone() }));
}

pub async fn live_only_channel_numbers_but_keeps_nothing(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("live");
    let pos = publish_n(&b, &ch, 3, &opts(0)).await;
    assert_eq!(pos[2].offset, 3);
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    assert!(h.publications.is_empty());
    let lost = b.history(&ch, HistoryRequest { since: Some(pos[0].clone()), ..Default::default() }).await;
    assert!(matches!(lost, Err(BrokerError::PositionLost { .. })));
}

pub async fn subscribed_node_receives_publications_in_offset_order(b: Arc<dyn Broker>, mut rx: Rx) {
    let ch = fresh("fanout");
    b.subscribe(&ch).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (b, ch) = (b.clone(), ch.clone());
        tasks.push(tokio::spawn(async move { publish_n(&b, &ch, 25, &opts(100)).await }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 100 {
        let p = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("delivery").unwrap();
        if p.channel == ch {
            got.push(p.offset);
        }
    }
    assert_eq!(got, (1..=100).collect::<Vec<_>>());
    b.unsubscribe(&ch).await.unwrap();
}

pub async fn unsubscribed_node_receives_nothing(b: Arc<dyn Broker>, mut rx: Rx) {
    let ch = fresh("unsub");
    let other = fresh("marker");
    b.subscribe(&ch).await.unwrap();
    b.subscribe(&other).await.unwrap();
    b.unsubscribe(&ch).await.unwrap();
    b.publish(&ch, data(1), &opts(10)).await.unwrap();
    b.publish(&other, data(2), &opts(10)).await.unwrap();
    // `ch` was published first; wait for the marker and make sure nothing from `ch` came.
    loop {
        let p = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("marker").unwrap();
        assert_ne!(p.channel, ch, "delivered after unsubscribe");
        if p.channel == other {
            break;
        }
    }
}

fn keyed(key: &str, window: Duration) -> PublishOptions {
    PublishOptions { idempotency_key: Some(key.into()), idempotency_window: window, ..opts(100) }
}

pub async fn a_repeated_idempotency_key_publishes_once(b: Arc<dyn Broker>, _rx: Rx) {
    let ch = fresh("idem");
    let first = b.publish(&ch, data(1), &keyed("k1", Duration::from_secs(60))).await.unwrap();
    assert!(!first.duplicate);
    let again = b.publish(&ch, data(1), &keyed("k1", Duration::from_secs(60))).await.unwrap();
    assert!(again.duplicate, "the second publish with a key is told it was a duplicate");
    assert_eq!(again.position, first.position);
    let first = first.position;
    let other = b.publish(&ch, data(2), &keyed("k2", Duration::from_secs(60))).await.unwrap().position;
    assert_eq!(other.offset, first.offset + 1);
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    assert_eq!(offsets(&h.publications), vec![1, 2]);
}

pub async fn idempotency_keys_are_per_channel_and_expire(b: Arc<dyn Broker>, _rx: Rx) {
    let (a, c) = (fresh("idem-a"), fresh("idem-b"));
    b.publish(&a, data(1), &keyed("same", Duration::from_secs(60))).await.unwrap();
    let on_c = b.publish(&c, data(1), &keyed("same", Duration::from_secs(60))).await.unwrap().position;
    assert_eq!(on_c.offset, 1, "keys are per channel");
    let short = b.publish(&a, data(2), &keyed("brief", Duration::from_secs(1))).await.unwrap().position;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let later = b.publish(&a, data(2), &keyed("brief", Duration::from_secs(1))).await.unwrap().position;
    assert_eq!(later.offset, short.offset + 1, "an expired key publishes again");
}

pub async fn volatile_publications_reach_the_node_but_take_no_offset(b: Arc<dyn Broker>, mut rx: Rx) {
    let ch = fresh("volatile");
    b.subscribe(&ch).await.unwrap();
    b.publish(&ch, data(1), &opts(10)).await.unwrap();
    b.publish_volatile(&ch, Kind::Volatile, data(2)).await.unwrap();
    let after = b.publish(&ch, data(3), &opts(10)).await.unwrap().position;
    assert_eq!(after.offset, 2, "a volatile publication took an offset");
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    assert_eq!(offsets(&h.publications), vec![1, 2]);
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let p = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("delivery").unwrap();
        if p.channel == ch {
            kinds.push((p.kind, p.offset));
        }
    }
    assert_eq!(kinds, vec![(Kind::Stored, 1), (Kind::Volatile, 0), (Kind::Stored, 2)]);
    b.unsubscribe(&ch).await.unwrap();
}

/// Data wrapped with its meta ([`crate::Meta::wrap`]) comes back as the publication's
/// data and meta — live, volatile and from history.
pub async fn a_publications_meta_is_delivered_and_kept_with_it(b: Arc<dyn Broker>, mut rx: Rx) {
    let ch = fresh("meta");
    b.subscribe(&ch).await.unwrap();
    let meta = crate::Meta {
        ttl: Some(60),
        headers: vec![("k".into(), "v\n".into())],
        correlation: Some(Bytes::from_static(b"\x00\n\x01")),
        ..Default::default()
    };
    b.publish(&ch, crate::Meta::wrap(Some(&meta), data(1)), &opts(10)).await.unwrap();
    b.publish_volatile(&ch, Kind::Volatile, crate::Meta::wrap(Some(&meta), data(2))).await.unwrap();
    b.publish(&ch, data(3), &opts(10)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let p = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("delivery").unwrap();
        if p.channel == ch {
            got.push((p.data, p.meta.as_deref().cloned()));
        }
    }
    let want = vec![(data(1), Some(meta.clone())), (data(2), Some(meta.clone())), (data(3), None)];
    assert_eq!(got, want);
    let h = b.history(&ch, HistoryRequest::default()).await.unwrap();
    let kept: Vec<_> = h.publications.iter().map(|p| (p.data.clone(), p.meta.as_deref().cloned())).collect();
    assert_eq!(kept, vec![want[0].clone(), want[2].clone()]);
    b.unsubscribe(&ch).await.unwrap();
}

pub async fn namespace_subscription_receives_every_channel_of_the_namespace(b: Arc<dyn Broker>, mut rx: Rx) {
    let ns = format!("nsx{}", fastrand::u32(..));
    let (one, two) =
        (ChannelName::parse(&format!("{ns}:a")).unwrap(), ChannelName::parse(&format!("{ns}:b/c")).unwrap());
    let outside = ChannelName::parse(&format!("{ns}other:a")).unwrap();
    b.subscribe_namespace(&ns).await.unwrap();
    b.publish(&outside, data(0), &opts(10)).await.unwrap();
    b.publish(&one, data(1), &opts(10)).await.unwrap();
    b.publish(&two, data(2), &opts(10)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let p = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("delivery").unwrap();
        assert_ne!(p.channel, outside, "leaked across namespaces");
        got.push(p.channel.to_string());
    }
    assert_eq!(got, vec![one.to_string(), two.to_string()]);
    b.unsubscribe_namespace(&ns).await.unwrap();
}
