//! A subscribe storm as one node's Pub/Sub connection sees it: CLIENTS subscriptions to
//! distinct channels requested at once (CONCURRENCY in flight) — what a node does when
//! that many clients of different channels reconnect to it — then as many unsubscribes.
//! Reports subscribes/s and unsubscribes/s against the Redis on `SWITCHBOARD_TEST_REDIS`
//! (default 127.0.0.1:6379).
//!
//!     cargo bench -p switchboard-redis --bench subscribe -- [CLIENTS=5000] [CONCURRENCY=1000]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_core::broker::Broker;
use switchboard_core::ChannelName;
use switchboard_redis::{RedisBroker, RedisConfig};

mod common;

use common::{arg, Nothing};

async fn storm(broker: &Arc<RedisBroker>, channels: &[ChannelName], concurrency: usize, subscribe: bool) -> f64 {
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(channels.len());
    for ch in channels {
        let (b, ch, permit) = (broker.clone(), ch.clone(), sem.clone().acquire_owned().await);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            if subscribe {
                b.subscribe(&ch).await.unwrap();
            } else {
                b.unsubscribe(&ch).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    channels.len() as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let (clients, concurrency) = (arg(1, 5000), arg(2, 1000));
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let prefix = format!("sbbench-sub-{}", std::process::id());
        let cfg = RedisConfig { url, prefix, idle_channel_ttl: Duration::from_secs(600), cluster: false };
        let broker = Arc::new(RedisBroker::new(cfg, "bench").unwrap());
        broker.run(Arc::new(Nothing)).await.unwrap();
        for _ in 0..100 {
            if broker.ready().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let channels: Vec<ChannelName> =
            (0..clients).map(|i| ChannelName::parse(&format!("bench:s{i}")).unwrap()).collect();
        let sub = storm(&broker, &channels, concurrency, true).await;
        let unsub = storm(&broker, &channels, concurrency, false).await;
        println!(
            "{clients} subscribes to distinct channels, {concurrency} in flight: {sub:.0}/s; then as many unsubscribes: {unsub:.0}/s"
        );
    });
}
