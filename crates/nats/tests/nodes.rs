//! Two nodes (two brokers, each its own NATS connection) on one channel, against the
//! machine's NATS (`SWITCHBOARD_TEST_NATS`): what the single-broker contract suite cannot
//! show — appends racing across connections, and a key reused on another node.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::contract::Recorder;
use switchboard_core::{Broker, ChannelName, HistoryRequest, Publication, PublishOptions};
use switchboard_nats::{NatsBroker, NatsConfig};
use tokio::sync::mpsc::UnboundedReceiver;

async fn node(name: &str) -> (Arc<NatsBroker>, UnboundedReceiver<Publication>) {
    let cfg = NatsConfig {
        url: std::env::var("SWITCHBOARD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        prefix: "sbtest-nodes".into(),
        max_age: Duration::from_secs(600),
        max_history: 1000,
        max_idempotency_window: Duration::from_secs(300),
        replicas: 1,
    };
    let b = Arc::new(NatsBroker::connect(cfg, name).await.unwrap());
    let (recorder, rx) = Recorder::new();
    b.run(recorder).await.unwrap();
    (b, rx)
}

fn fresh() -> ChannelName {
    ChannelName::parse(&format!("nodes:c{}-{}", std::process::id(), fastrand::u64(..))).unwrap()
}

async fn received(rx: &mut UnboundedReceiver<Publication>, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let p = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("in time").expect("open");
        out.push(p.offset);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_publishing_at_once_get_distinct_gapless_offsets_seen_in_order_by_both() {
    let ((a, mut rx_a), (b, mut rx_b)) = (node("node-a").await, node("node-b").await);
    let ch = fresh();
    a.subscribe(&ch).await.unwrap();
    b.subscribe(&ch).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let broker = if i % 2 == 0 { a.clone() } else { b.clone() };
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let opts = PublishOptions { history_size: 1000, ..Default::default() };
            let mut offsets = Vec::new();
            for j in 0..25 {
                let data = Bytes::from(format!("{{\"task\":{i},\"j\":{j}}}"));
                offsets.push(broker.publish(&ch, data, &opts).await.unwrap().position.offset);
            }
            offsets
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "one publisher's offsets go up: {mine:?}");
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
    let want: Vec<u64> = (1..=200).collect();
    assert_eq!(received(&mut rx_a, 200).await, want);
    assert_eq!(received(&mut rx_b, 200).await, want);
    let h = a.history(&ch, HistoryRequest::default()).await.unwrap();
    assert_eq!(h.publications.iter().map(|p| p.publication.offset).collect::<Vec<_>>(), want);
}

#[tokio::test]
async fn a_key_reused_on_another_node_publishes_once() {
    let ((a, _), (b, _)) = (node("node-a").await, node("node-b").await);
    let ch = fresh();
    let opts = PublishOptions { idempotency_key: Some("order-7".into()), ..Default::default() };
    let first = a.publish(&ch, Bytes::from_static(b"1"), &opts).await.unwrap();
    let again = b.publish(&ch, Bytes::from_static(b"1"), &opts).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.position, first.position);
    let other = b.publish(&ch, Bytes::from_static(b"2"), &PublishOptions::default()).await.unwrap();
    assert_eq!(other.position.offset, first.position.offset + 1);
}
