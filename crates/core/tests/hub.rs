//! The hub's fan-out and subscribe-then-recover algorithm, over the in-memory broker.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::hub::SubscribeRequest;
use switchboard_core::queue::Event;
use switchboard_core::{
    Broker, ChannelName, CloseReason, ConnQueue, Hub, MemoryBroker, PublishOptions, StreamPosition,
};

async fn setup() -> (Arc<Hub>, Arc<dyn Broker>) {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
    let hub = Hub::start(broker.clone()).await.unwrap();
    (hub, broker)
}

fn ch(s: &str) -> ChannelName {
    ChannelName::parse(s).unwrap()
}

fn opts() -> PublishOptions {
    PublishOptions { history_size: 1000, history_ttl: Duration::from_secs(300), ..Default::default() }
}

async fn publish(b: &Arc<dyn Broker>, c: &ChannelName, i: u64) -> StreamPosition {
    b.publish(c, Bytes::from(i.to_string()), &opts()).await.unwrap().position
}

/// Drains what is queued now into (offset) for publications; resets as `u64::MAX`.
fn drain(q: &ConnQueue) -> Vec<u64> {
    let mut out = Vec::new();
    let _ = q.drain_into(&mut out);
    out.iter()
        .map(|e| match e {
            Event::Publication(d) => d.publication.offset,
            Event::Reset { .. } => u64::MAX,
            Event::Frame(_) => u64::MAX - 1,
        })
        .collect()
}

#[tokio::test]
async fn fanout_shares_one_encoding_with_every_subscriber() {
    let (hub, b) = setup().await;
    let c = ch("news:1");
    let queues: Vec<_> = (0..50).map(|_| ConnQueue::new(1 << 20)).collect();
    let mut handles = Vec::new();
    for q in &queues {
        handles.push(hub.subscribe(c.clone(), q.clone(), SubscribeRequest::default()).await.unwrap().go_live());
    }
    publish(&b, &c, 1).await;
    let mut ptrs = Vec::new();
    for q in &queues {
        let mut out = Vec::new();
        q.drain_into(&mut out).unwrap();
        assert_eq!(out.len(), 1);
        match &out[0] {
            Event::Publication(d) => ptrs.push(d.json().as_ptr()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ptrs.windows(2).all(|w| w[0] == w[1]), "each subscriber got its own encoding");
    assert_eq!(hub.subscriber_count(&c), 50);
    drop(handles);
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_then_goes_live() {
    let (hub, b) = setup().await;
    let c = ch("chat:r");
    let seen = publish(&b, &c, 1).await;
    publish(&b, &c, 2).await;
    publish(&b, &c, 3).await;
    let q = ConnQueue::new(1 << 20);
    let pending = hub
        .subscribe(c.clone(), q.clone(), SubscribeRequest { since: Some(seen), ..Default::default() })
        .await
        .unwrap();
    assert!(pending.outcome().recovered);
    assert_eq!(pending.outcome().replayed, 2);
    // Published while the subscription is recovering: buffered, then merged.
    publish(&b, &c, 4).await;
    let _h = pending.go_live();
    publish(&b, &c, 5).await;
    assert_eq!(drain(&q), vec![2, 3, 4, 5]);
}

#[tokio::test]
async fn lost_position_is_reported_not_recovered_with_the_current_position() {
    let (hub, b) = setup().await;
    let c = ch("chat:lost");
    let top = publish(&b, &c, 1).await;
    let other_epoch = StreamPosition { epoch: Arc::from("otherepoch"), offset: 1 };
    let q = ConnQueue::new(1 << 20);
    let pending = hub
        .subscribe(c.clone(), q.clone(), SubscribeRequest { since: Some(other_epoch), ..Default::default() })
        .await
        .unwrap();
    assert!(!pending.outcome().recovered);
    assert_eq!(pending.outcome().position, top);
    let _h = pending.go_live();
    publish(&b, &c, 2).await;
    assert_eq!(drain(&q), vec![2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_racing_a_subscribe_are_delivered_exactly_once_in_order() {
    let (hub, b) = setup().await;
    for round in 0..30 {
        let c = ch(&format!("race:{round}"));
        let start = publish(&b, &c, 0).await;
        let publisher = {
            let (b, c) = (b.clone(), c.clone());
            tokio::spawn(async move {
                for i in 1..=200 {
                    publish(&b, &c, i).await;
                    if i % 10 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        tokio::task::yield_now().await;
        let q = ConnQueue::new(1 << 24);
        let pending = hub
            .subscribe(c.clone(), q.clone(), SubscribeRequest { since: Some(start), ..Default::default() })
            .await
            .unwrap();
        let _h = pending.go_live();
        publisher.await.unwrap();
        assert_eq!(drain(&q), (2..=201).collect::<Vec<_>>(), "round {round}");
    }
}

#[tokio::test]
async fn slow_consumer_is_closed_while_others_keep_receiving() {
    let (hub, b) = setup().await;
    let c = ch("feed:x");
    let slow = ConnQueue::new(4096);
    let fast = ConnQueue::new(4096);
    let _s = hub.subscribe(c.clone(), slow.clone(), SubscribeRequest::default()).await.unwrap().go_live();
    let _f = hub.subscribe(c.clone(), fast.clone(), SubscribeRequest::default()).await.unwrap().go_live();
    let mut fast_got = Vec::new();
    for i in 1..=500u64 {
        b.publish(&c, Bytes::from(format!("\"{}\"", "x".repeat(100))), &opts()).await.unwrap();
        if i % 5 == 0 {
            fast_got.extend(drain(&fast));
        }
        assert!(slow.queued_bytes() <= 4096);
    }
    fast_got.extend(drain(&fast));
    assert_eq!(fast_got, (1..=500).collect::<Vec<_>>());
    assert_eq!(slow.closed(), Some(CloseReason::SlowConsumer));
}

#[tokio::test]
async fn last_unsubscribe_unsubscribes_the_node() {
    let (hub, b) = setup().await;
    let c = ch("tmp:1");
    let q = ConnQueue::new(1 << 20);
    let h = hub.subscribe(c.clone(), q.clone(), SubscribeRequest::default()).await.unwrap().go_live();
    assert_eq!(hub.channels(), vec![(c.clone(), 1)]);
    drop(h);
    for _ in 0..100 {
        if hub.channels().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hub.channels().is_empty());
    publish(&b, &c, 1).await;
    assert!(drain(&q).is_empty());
}

#[tokio::test]
async fn rewind_replays_exactly_the_last_n_then_goes_live() {
    let (hub, b) = setup().await;
    let c = ch("ticker:x");
    for i in 1..=10 {
        publish(&b, &c, i).await;
    }
    let q = ConnQueue::new(1 << 20);
    let pending =
        hub.subscribe(c.clone(), q.clone(), SubscribeRequest { rewind: Some(3), ..Default::default() }).await.unwrap();
    assert_eq!(pending.outcome().position.offset, 7);
    assert_eq!(pending.outcome().replayed, 3);
    let _h = pending.go_live();
    publish(&b, &c, 11).await;
    assert_eq!(drain(&q), vec![8, 9, 10, 11]);
    // More than retained: what there is.
    let q2 = ConnQueue::new(1 << 20);
    let _h2 = hub
        .subscribe(c.clone(), q2.clone(), SubscribeRequest { rewind: Some(500), ..Default::default() })
        .await
        .unwrap()
        .go_live();
    assert_eq!(drain(&q2), (1..=11).collect::<Vec<_>>());
}

#[tokio::test]
async fn pattern_subscribers_get_matching_channels_with_their_concrete_names() {
    let (hub, b) = setup().await;
    let q = ConnQueue::new(1 << 20);
    let h =
        hub.subscribe_pattern(switchboard_core::Pattern::parse("sensors:+/temp").unwrap(), q.clone()).await.unwrap();
    for c in ["sensors:a/temp", "sensors:b/hum", "sensors:b/temp", "other:a/temp", "sensorsx:a/temp"] {
        publish(&b, &ch(c), 1).await;
    }
    let mut out = Vec::new();
    q.drain_into(&mut out).unwrap();
    let got: Vec<String> = out
        .iter()
        .map(|e| match e {
            Event::Publication(d) => d.publication.channel.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, vec!["sensors:a/temp", "sensors:b/temp"]);
    drop(h);
    for _ in 0..100 {
        if hub.pattern_subscriptions() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(hub.pattern_subscriptions(), 0);
    publish(&b, &ch("sensors:c/temp"), 1).await;
    assert!(drain(&q).is_empty());
}

#[tokio::test]
async fn volatile_publications_are_delivered_live_and_never_replayed() {
    let (hub, b) = setup().await;
    let c = ch("typing:1");
    let start = publish(&b, &c, 1).await;
    b.publish_volatile(&c, switchboard_core::Kind::Volatile, Bytes::from_static(b"\"typing\"")).await.unwrap();
    publish(&b, &c, 2).await;
    let q = ConnQueue::new(1 << 20);
    let _h = hub
        .subscribe(c.clone(), q.clone(), SubscribeRequest { since: Some(start), ..Default::default() })
        .await
        .unwrap()
        .go_live();
    assert_eq!(drain(&q), vec![2], "a volatile publication was replayed");
    b.publish_volatile(&c, switchboard_core::Kind::Volatile, Bytes::from_static(b"\"typing\"")).await.unwrap();
    assert_eq!(drain(&q), vec![0], "live volatile publications are delivered (offset 0)");
}

#[tokio::test]
async fn a_join_and_leave_storm_keeps_the_subscriber_list_exact() {
    let (hub, b) = setup().await;
    let c = ch("storm:1");
    let mut queues = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..5000 {
        let q = ConnQueue::new(1 << 20);
        handles.push(hub.subscribe(c.clone(), q.clone(), SubscribeRequest::default()).await.unwrap().go_live());
        queues.push(q);
    }
    assert_eq!(hub.subscriber_count(&c), 5000);
    // Every third leaves, from all over the list (swap-removes inside chunks).
    let mut kept = Vec::new();
    for (i, (h, q)) in handles.into_iter().zip(queues).enumerate() {
        if i % 3 == 0 {
            drop(h);
        } else {
            kept.push((h, q));
        }
    }
    assert_eq!(hub.subscriber_count(&c), kept.len());
    // More join into the freed room.
    for _ in 0..700 {
        let q = ConnQueue::new(1 << 20);
        kept.push((hub.subscribe(c.clone(), q.clone(), SubscribeRequest::default()).await.unwrap().go_live(), q));
    }
    assert_eq!(hub.subscriber_count(&c), kept.len());
    publish(&b, &c, 1).await;
    // A channel this big fans out in lanes, after the publish returned: wait for them.
    for (_, q) in &kept {
        assert_eq!(drain_eventually(q, 1).await, vec![1], "each remaining subscriber gets the publication once");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(kept.iter().all(|(_, q)| drain(q).is_empty()), "and only once");
}

/// Drains until `n` events arrived (a lane delivers after the publish returned). Fails
/// the test, saying so, after a minute.
async fn drain_eventually(q: &ConnQueue, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    for _ in 0..60_000 {
        got.extend(drain(q));
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("only {got:?} of {n} events arrived within a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_a_big_channel_keep_every_subscriber_in_offset_order() {
    let (hub, b) = setup().await;
    let c = ch("big:1");
    let mut subs = Vec::new();
    for _ in 0..600 {
        let q = ConnQueue::new(1 << 24);
        subs.push((hub.subscribe(c.clone(), q.clone(), SubscribeRequest::default()).await.unwrap().go_live(), q));
    }
    // Four publishers at once: the broker numbers them; the lanes must keep that order.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (b, c) = (b.clone(), c.clone());
            tokio::spawn(async move {
                for i in 0..100 {
                    publish(&b, &c, i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    for (_, q) in &subs {
        assert_eq!(drain_eventually(q, 400).await, (1..=400).collect::<Vec<u64>>());
    }
}

#[tokio::test]
async fn a_resume_past_recovery_max_is_told_to_reset_and_a_resume_within_it_is_not() {
    let (hub, b) = setup().await;
    let c = ch("deep:1");
    let first = publish(&b, &c, 1).await;
    for i in 2..=50 {
        publish(&b, &c, i).await;
    }
    let since = StreamPosition { epoch: first.epoch.clone(), offset: 1 };
    let resume = |max| SubscribeRequest { since: Some(since.clone()), recovery_max: Some(max), ..Default::default() };
    // 49 missed, 10 allowed: an explicit reset, at the top, with nothing replayed.
    let q = ConnQueue::new(1 << 20);
    let pending = hub.subscribe(c.clone(), q.clone(), resume(10)).await.unwrap();
    assert!(!pending.outcome().recovered);
    assert_eq!(pending.outcome().position.offset, 50);
    let _h = pending.go_live();
    assert!(drain(&q).is_empty());
    // 49 missed, 49 allowed: all of them, in order.
    let q = ConnQueue::new(1 << 20);
    let pending = hub.subscribe(c.clone(), q.clone(), resume(49)).await.unwrap();
    assert!(pending.outcome().recovered);
    let _h2 = pending.go_live();
    assert_eq!(drain(&q), (2..=50).collect::<Vec<_>>());
}
