//! Wildcard matching cost: publish throughput into a namespace with many active channels
//! and many pattern subscriptions, through the real hub (pattern index) and in-memory
//! broker.
//!
//! Run: `cargo bench -p switchboard-core --bench patterns -- [channels] [patterns] [publications]`
//! (defaults 100000, 10000, 200000).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use switchboard_core::{Broker, ChannelName, ConnQueue, Hub, MemoryBroker, Pattern, PublishOptions};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let channels = args.first().copied().unwrap_or(100_000);
    let patterns = args.get(1).copied().unwrap_or(10_000);
    let publications = args.get(2).copied().unwrap_or(200_000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(run(channels, patterns, publications));
}

async fn run(channels: usize, patterns: usize, publications: usize) {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
    let hub = Hub::start(broker.clone()).await.unwrap();
    // Channels sensors:site<S>/dev<D>/<metric>; patterns are a mix of one-device
    // (`site3/dev7/+`), one-metric-per-site (`site3/+/temp`) and whole-site (`site3/#`).
    let sites = (channels / 100).max(1);
    let names: Vec<ChannelName> = (0..channels)
        .map(|i| {
            let metric = ["temp", "hum", "co2", "power"][i % 4];
            ChannelName::parse(&format!("sensors:site{}/dev{}/{metric}", i % sites, i / 4 % 25)).unwrap()
        })
        .collect();
    let queues: Vec<_> = (0..patterns).map(|_| ConnQueue::new(1 << 30)).collect();
    let mut handles = Vec::with_capacity(patterns);
    for (i, q) in queues.iter().enumerate() {
        let site = fastrand::usize(..sites * 10); // most patterns match nothing
        let p = match i % 3 {
            0 => format!("sensors:site{site}/dev{}/+", i % 25),
            1 => format!("sensors:site{site}/+/temp"),
            _ => format!("sensors:site{site}/#"),
        };
        handles.push(hub.subscribe_pattern(Pattern::parse(&p).unwrap(), q.clone()).await.unwrap());
    }
    let opts = PublishOptions { history_size: 0, ..Default::default() };
    let data = Bytes::from_static(b"{\"v\":21.5}");
    let t = Instant::now();
    for i in 0..publications {
        broker.publish(&names[i % channels], data.clone(), &opts).await.unwrap();
    }
    let elapsed = t.elapsed();
    let delivered = hub.stats.deliveries.load(std::sync::atomic::Ordering::Relaxed);
    println!("pattern matching: {channels} channels, {patterns} pattern subscriptions, {publications} publications");
    println!("  publications/s       : {:>12.0}", publications as f64 / elapsed.as_secs_f64());
    println!("  µs per publication   : {:>12.2}", elapsed.as_secs_f64() * 1e6 / publications as f64);
    println!("  deliveries (matched) : {delivered:>12}");
    drop(handles);
}
