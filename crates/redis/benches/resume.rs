//! A resume storm as Redis sees it: CLIENTS history reads of one channel, each from SINCE
//! publications behind the top of RETAINED kept ones, CONCURRENCY at a time — what a
//! node does when that many clients reconnect and resume at once. Reports resumes/s and
//! Redis's own CPU per resume (`INFO cpu`, the Redis on `SWITCHBOARD_TEST_REDIS`, default
//! 127.0.0.1:6379: it runs the history script, single-threaded, for every node).
//!
//!     cargo bench -p switchboard-redis --bench resume -- [CLIENTS=5000] [RETAINED=1000] [SINCE=10] [CONCURRENCY=64]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_core::broker::{Broker, HistoryRequest, PublishOptions};
use switchboard_core::ChannelName;
use switchboard_redis::{RedisBroker, RedisConfig};

mod common;

use common::{arg, Nothing};

async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await.unwrap();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

fn main() {
    let (clients, retained, since, concurrency) = (arg(1, 5000), arg(2, 1000), arg(3, 10), arg(4, 64));
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let prefix = format!("sbbench-{}", std::process::id());
        let cfg = RedisConfig {
            url: url.clone(),
            prefix: prefix.clone(),
            idle_channel_ttl: Duration::from_secs(600),
            cluster: false,
        };
        let broker = Arc::new(RedisBroker::new(cfg, "bench").unwrap());
        broker.run(Arc::new(Nothing)).await.unwrap();
        let ch = ChannelName::parse("bench:resume").unwrap();
        let opts = PublishOptions {
            history_size: retained,
            history_ttl: Duration::from_secs(600),
            ..PublishOptions::default()
        };
        let data = Bytes::from(format!("\"{}\"", "x".repeat(100)));
        let mut top = None;
        for _ in 0..retained {
            top = Some(broker.publish(&ch, data.clone(), &opts).await.unwrap().position);
        }
        let top = top.unwrap();
        let from = switchboard_core::StreamPosition { epoch: top.epoch.clone(), offset: top.offset - since as u64 };
        let mut conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let cpu0 = redis_cpu(&mut conn).await;
        let started = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = Vec::with_capacity(clients);
        for _ in 0..clients {
            let (b, ch, from, permit) = (broker.clone(), ch.clone(), from.clone(), sem.clone().acquire_owned().await);
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let req = HistoryRequest { since: Some(from), limit: None, latest: false };
                b.history(&ch, req).await.unwrap().publications.len()
            }));
        }
        let mut replayed = 0;
        for t in tasks {
            replayed += t.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = redis_cpu(&mut conn).await - cpu0;
        assert_eq!(replayed, clients * since, "each resume replays exactly what it missed");
        println!(
            "{clients} resumes of {since} publications behind the top of {retained} retained, {concurrency} at a time: \
             {elapsed:.2} s, {:.0} resumes/s; Redis CPU {:.1} µs per resume",
            clients as f64 / elapsed,
            cpu * 1e6 / clients as f64
        );
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap();
        if !keys.is_empty() {
            redis::cmd("DEL").arg(keys).query_async::<()>(&mut conn).await.unwrap();
        }
    });
}
