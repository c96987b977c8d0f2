//! The Pub/Sub connection under a subscribe storm, against a real Redis
//! (`SWITCHBOARD_TEST_REDIS`, default `redis://127.0.0.1:6379`): hundreds of subscribes at
//! once (applied as batched `SUBSCRIBE`s) each get their channel's publications, and
//! unsubscribing half of them at once stops exactly those.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::broker::{Broker, BrokerEventHandler, PublishOptions};
use switchboard_core::{ChannelName, Delivery};
use switchboard_redis::{RedisBroker, RedisConfig};

fn url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[derive(Default)]
struct Seen(Mutex<BTreeSet<String>>);
impl BrokerEventHandler for Seen {
    fn handle_publication(&self, d: Arc<Delivery>) {
        self.0.lock().unwrap().insert(d.publication.channel.to_string());
    }
    fn handle_control(&self, _: Bytes) {}
}

async fn until_seen(seen: &Seen, want: &BTreeSet<String>) {
    for _ in 0..600 {
        if &*seen.0.lock().unwrap() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = seen.0.lock().unwrap().clone();
    panic!("{} of {} channels delivered; missing {:?}", got.len(), want.len(), want.difference(&got).next());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_storm_gets_every_channel_and_an_unsubscribe_storm_stops_exactly_those() {
    let prefix = format!("sbtest-ps-{}", fastrand::u64(..));
    let cfg = RedisConfig { url: url(), prefix, idle_channel_ttl: Duration::from_secs(60), cluster: false };
    let node = Arc::new(RedisBroker::new(cfg.clone(), "node").unwrap());
    let seen = Arc::new(Seen::default());
    node.run(seen.clone()).await.unwrap();
    let publisher = RedisBroker::new(cfg, "publisher").unwrap();
    let channels: Vec<ChannelName> = (0..600).map(|i| ChannelName::parse(&format!("storm:c{i}")).unwrap()).collect();
    let subscribing: Vec<_> = channels
        .iter()
        .map(|c| {
            let (node, c) = (node.clone(), c.clone());
            tokio::spawn(async move { node.subscribe(&c).await })
        })
        .collect();
    for s in subscribing {
        s.await.unwrap().expect("every subscribe confirmed");
    }
    let opts = PublishOptions { history_size: 10, ..Default::default() };
    for c in &channels {
        publisher.publish(c, Bytes::from_static(b"1"), &opts).await.unwrap();
    }
    let all: BTreeSet<String> = channels.iter().map(|c| c.to_string()).collect();
    until_seen(&seen, &all).await;
    // Half go at once; a publication to each channel afterwards reaches only the rest.
    let (gone, kept) = channels.split_at(300);
    let unsubscribing: Vec<_> = gone
        .iter()
        .map(|c| {
            let (node, c) = (node.clone(), c.clone());
            tokio::spawn(async move { node.unsubscribe(&c).await })
        })
        .collect();
    for u in unsubscribing {
        u.await.unwrap().unwrap();
    }
    seen.0.lock().unwrap().clear();
    for c in &channels {
        publisher.publish(c, Bytes::from_static(b"2"), &opts).await.unwrap();
    }
    // The last channel's publication marks the end: everything before it has arrived.
    let kept: BTreeSet<String> = kept.iter().map(|c| c.to_string()).collect();
    until_seen(&seen, &kept).await;
    assert!(seen.0.lock().unwrap().iter().all(|c| kept.contains(c)));
}
