//! Join/leave cost: N subscriptions (and presence entries) join one channel, then leave,
//! for N in 1k, 10k, 50k. Flat per-operation figures mean no step scans the list.
//!
//! Run: `cargo bench -p switchboard-core --bench churn`

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_core::hub::SubscribeRequest;
use switchboard_core::presence::{Member, MemoryPresence, PresenceManager};
use switchboard_core::{Broker, ChannelName, ConnQueue, Hub, MemoryBroker};

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    println!("| joins then leaves | hub join | hub leave | presence join | presence refresh | presence leave |");
    println!("|---|---|---|---|---|---|");
    for n in [1_000, 10_000, 50_000] {
        rt.block_on(run(n));
    }
}

fn per(d: Duration, n: usize) -> String {
    format!("{:.0} ns", d.as_nanos() as f64 / n as f64)
}

async fn run(n: usize) {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
    let hub = Hub::start(broker).await.unwrap();
    let ch = ChannelName::parse("bench:churn").unwrap();
    let queues: Vec<_> = (0..n).map(|_| ConnQueue::new(1 << 20)).collect();
    let started = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for q in &queues {
        handles.push(hub.subscribe(ch.clone(), q.clone(), SubscribeRequest::default()).await.unwrap().go_live());
    }
    let join = started.elapsed();
    let started = Instant::now();
    // Leave in an order that is not the join order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| (i * 7919) % n);
    let mut slots: Vec<Option<_>> = handles.into_iter().map(Some).collect();
    for i in order {
        drop(slots[i].take());
    }
    let leave = started.elapsed();

    let p = MemoryPresence::default();
    let member = |i: usize| Member { client: format!("c{i}"), user: format!("u{}", i % 1000), info: None };
    let ttl = Duration::from_secs(60);
    let started = Instant::now();
    for i in 0..n {
        p.add(&ch, member(i), ttl).await.unwrap();
    }
    let pjoin = started.elapsed();
    let started = Instant::now();
    for i in 0..n {
        p.add(&ch, member(i), ttl).await.unwrap();
    }
    let refresh = started.elapsed();
    let started = Instant::now();
    for i in 0..n {
        p.remove(&ch, &format!("c{i}")).await.unwrap();
    }
    let pleave = started.elapsed();
    println!(
        "| {n} | {} | {} | {} | {} | {} |",
        per(join, n),
        per(leave, n),
        per(pjoin, n),
        per(refresh, n),
        per(pleave, n)
    );
}
