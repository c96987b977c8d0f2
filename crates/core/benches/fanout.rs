//! Hub fan-out benchmark: publications per second into one channel with N in-process
//! subscribers, and heap bytes allocated per delivery.
//!
//! Run: `cargo bench -p switchboard-core --bench fanout -- [subscribers] [publications] [payload]`
//! (defaults 10000, 2000, 128). The time measured is `publish` → broker → hub → every
//! subscriber's queue (through the channel's lane task: one worker here); draining the
//! queues (the writers' job) is timed separately.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_core::hub::SubscribeRequest;
use switchboard_core::{Broker, ChannelName, ConnQueue, Hub, MemoryBroker, PublishOptions};

struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let subscribers = args.first().copied().unwrap_or(10_000);
    let publications = args.get(1).copied().unwrap_or(2_000);
    let payload = args.get(2).copied().unwrap_or(128);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(run(subscribers, publications, payload));
}

async fn run(subscribers: usize, publications: usize, payload: usize) {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
    let hub = Hub::start(broker.clone()).await.unwrap();
    let ch = ChannelName::parse("bench:fanout").unwrap();
    let mut queues = Vec::with_capacity(subscribers);
    let mut handles = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let q = ConnQueue::new(1 << 20);
        handles.push(hub.subscribe(ch.clone(), q.clone(), SubscribeRequest::default()).await.unwrap().go_live());
        queues.push(q);
    }
    let data = Bytes::from(format!("\"{}\"", "x".repeat(payload.saturating_sub(2))));
    let opts = PublishOptions::default();
    let mut batch = Vec::with_capacity(16);
    // A channel this big fans out in a lane task after `publish` returns: a publication
    // counts as delivered once the hub has queued it for every subscriber.
    let delivered = |n: u64| {
        let hub = hub.clone();
        async move {
            while hub.stats.deliveries.load(Ordering::Relaxed) < n {
                tokio::task::yield_now().await;
            }
        }
    };
    let mut expected = 0u64;
    // Warm up: let every queue reach its steady-state capacity.
    for _ in 0..10 {
        broker.publish(&ch, data.clone(), &opts).await.unwrap();
        expected += subscribers as u64;
        delivered(expected).await;
        for q in &queues {
            let _ = q.drain_into(&mut batch);
            batch.clear();
        }
    }
    let (mut publish_time, mut drain_time) = (Duration::ZERO, Duration::ZERO);
    let (mut bytes, mut allocs) = (0u64, 0u64);
    for _ in 0..publications {
        let (b0, a0) = (ALLOCATED.load(Ordering::Relaxed), ALLOCATIONS.load(Ordering::Relaxed));
        let t = Instant::now();
        broker.publish(&ch, data.clone(), &opts).await.unwrap();
        expected += subscribers as u64;
        delivered(expected).await;
        publish_time += t.elapsed();
        bytes += ALLOCATED.load(Ordering::Relaxed) - b0;
        allocs += ALLOCATIONS.load(Ordering::Relaxed) - a0;
        let t = Instant::now();
        for q in &queues {
            let _ = q.drain_into(&mut batch);
            batch.clear();
        }
        drain_time += t.elapsed();
    }
    let deliveries = (subscribers * publications) as f64;
    println!("hub fan-out: {subscribers} subscribers, {publications} publications of {payload} B, one thread");
    println!("  publications/s into the channel : {:>12.0}", publications as f64 / publish_time.as_secs_f64());
    println!("  deliveries/s (publish path)     : {:>12.0}", deliveries / publish_time.as_secs_f64());
    println!("  ns per delivery                 : {:>12.1}", publish_time.as_nanos() as f64 / deliveries);
    println!("  queue drain, ns per delivery    : {:>12.1}", drain_time.as_nanos() as f64 / deliveries);
    println!("  heap bytes allocated/publication: {:>12.1}", bytes as f64 / publications as f64);
    println!("  heap bytes allocated/delivery   : {:>12.3}", bytes as f64 / deliveries);
    println!("  allocations/delivery            : {:>12.5}", allocs as f64 / deliveries);
    drop(handles);
}
