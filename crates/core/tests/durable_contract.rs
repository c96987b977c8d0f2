//! The broker contract suite against the durable memory broker (every fsync policy), and
//! what only it promises: a restart — even of a process killed mid-publish — keeps each
//! channel's epoch, offsets, history and idempotency keys.

use std::sync::Arc;
use std::time::Duration;

use switchboard_core::broker::{HistoryRequest, PublishOptions};
use switchboard_core::journal::Fsync;
use switchboard_core::{Broker, BrokerEventHandler, ChannelName, MemoryBroker, Meta};

fn dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sb-durable-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn make(handler: Arc<dyn BrokerEventHandler>, fsync: Fsync) -> Arc<dyn Broker> {
    let (broker, _) = MemoryBroker::durable(&dir(), fsync, Duration::from_secs(3600), 100_000).unwrap();
    broker.run(handler).await.unwrap();
    broker
}

mod always {
    use super::*;
    switchboard_core::broker_contract_tests!(|h: Arc<switchboard_core::contract::Recorder>| make(h, Fsync::Always));
}

mod batched {
    use super::*;
    switchboard_core::broker_contract_tests!(|h: Arc<switchboard_core::contract::Recorder>| make(
        h,
        Fsync::Batched(Duration::from_millis(5))
    ));
}

mod never {
    use super::*;
    switchboard_core::broker_contract_tests!(|h: Arc<switchboard_core::contract::Recorder>| make(h, Fsync::Never));
}

fn opts(key: Option<&str>) -> PublishOptions {
    PublishOptions {
        history_size: 3,
        history_ttl: Duration::from_secs(600),
        idempotency_key: key.map(String::from),
        idempotency_window: Duration::from_secs(600),
    }
}

#[tokio::test]
async fn a_restart_keeps_epochs_offsets_history_and_idempotency_keys() {
    let d = dir();
    let ch = ChannelName::parse("news:durable").unwrap();
    let live_only = ChannelName::parse("news:counter").unwrap();
    let before = {
        let (b, r) = MemoryBroker::durable(&d, Fsync::Always, Duration::from_secs(3600), 1000).unwrap();
        assert_eq!(r.records, 0);
        for n in 1..=5 {
            let key = (n == 5).then_some("order-5");
            let meta = (n == 4).then(meta);
            b.publish(&ch, Meta::wrap(meta.as_ref(), format!("{n}").into()), &opts(key)).await.unwrap();
        }
        let none = PublishOptions { history_size: 0, ..opts(None) };
        for n in 0..4 {
            b.publish(&live_only, format!("{n}").into(), &none).await.unwrap();
        }
        (b.position(&ch).await.unwrap(), b.position(&live_only).await.unwrap())
        // (dropped without any shutdown: as a killed process leaves it)
    };
    let (b, r) = MemoryBroker::durable(&d, Fsync::Always, Duration::from_secs(3600), 1000).unwrap();
    assert!(r.records > 0 && r.dropped_bytes == 0, "{r:?}");
    assert_eq!(b.position(&ch).await.unwrap(), before.0, "same epoch and offset");
    assert_eq!(b.position(&live_only).await.unwrap(), before.1, "numbering goes on without history");
    // History: the last 3, as they were.
    let since = switchboard_core::StreamPosition { epoch: before.0.epoch.clone(), offset: 2 };
    let h = b.history(&ch, HistoryRequest { since: Some(since), limit: None, latest: false }).await.unwrap();
    let datas: Vec<&[u8]> = h.publications.iter().map(|d| &d.publication.data[..]).collect();
    assert_eq!(datas, [&b"3"[..], b"4", b"5"]);
    let metas: Vec<Option<&Meta>> = h.publications.iter().map(|d| d.publication.meta.as_deref()).collect();
    assert_eq!(metas, [None, Some(&meta()), None], "a publication's meta is kept with it");
    // The idempotency key is remembered: the retry is not published again.
    let again = b.publish(&ch, "5".into(), &opts(Some("order-5"))).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.position.offset, 5);
    // Publishing continues the same epoch.
    assert_eq!(b.publish(&ch, "6".into(), &opts(None)).await.unwrap().position.offset, 6);
    assert_eq!(b.publish(&live_only, "x".into(), &opts(None)).await.unwrap().position.offset, 5);
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_and_the_rest_recovered() {
    let d = dir();
    let ch = ChannelName::parse("news:torn").unwrap();
    let epoch = {
        let (b, _) = MemoryBroker::durable(&d, Fsync::Never, Duration::from_secs(3600), 1000).unwrap();
        for n in 1..=3 {
            b.publish(&ch, format!("{n}").into(), &opts(None)).await.unwrap();
        }
        b.position(&ch).await.unwrap().epoch
    };
    // A crash mid-write: half a record at the end.
    let path = d.join("history.journal");
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, &[40, 0, 0, 0, 1, 2, 3, 4, 1, 0]).unwrap();
    drop(f);
    let (b, r) = MemoryBroker::durable(&d, Fsync::Never, Duration::from_secs(3600), 1000).unwrap();
    assert_eq!(r.dropped_bytes, 10);
    let p = b.position(&ch).await.unwrap();
    assert_eq!((p.epoch, p.offset), (epoch, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_drops_what_is_gone_keeps_what_is_live_and_never_stops_publishing() {
    let d = dir();
    let ch = ChannelName::parse("news:compact").unwrap();
    let (b, _) = MemoryBroker::durable(&d, Fsync::Never, Duration::from_secs(3600), 1000).unwrap();
    for n in 1..=500 {
        b.publish(&ch, format!("{n}").into(), &opts(None)).await.unwrap();
    }
    let path = d.join("history.journal");
    let grown = std::fs::metadata(&path).unwrap().len();
    // Publishing goes on while compaction runs; what it writes meanwhile is kept.
    let publisher = {
        let (b, ch) = (b.clone(), ch.clone());
        tokio::spawn(async move {
            for n in 501..=700 {
                let meta = (n == 699).then(meta);
                b.publish(&ch, Meta::wrap(meta.as_ref(), format!("{n}").into()), &opts(None)).await.unwrap();
            }
        })
    };
    let compacted = tokio::task::spawn_blocking({
        let b = b.clone();
        move || b.compact().unwrap()
    })
    .await
    .unwrap();
    publisher.await.unwrap();
    // (How much the concurrent one kept depends on how many publishes raced it.)
    assert!(compacted < grown + 200 * 64, "{compacted} of {grown} bytes");
    let quiet = b.compact().unwrap();
    assert!(quiet < grown / 10, "{quiet} of {grown} bytes: only the last 3 and the numbering");
    let top = b.position(&ch).await.unwrap();
    assert_eq!(top.offset, 700);
    drop(b);
    // A restart from the compacted journal: the same numbering and the last 3.
    let (b, r) = MemoryBroker::durable(&d, Fsync::Never, Duration::from_secs(3600), 1000).unwrap();
    assert_eq!(r.dropped_bytes, 0);
    assert_eq!(b.position(&ch).await.unwrap(), top);
    let h = b.history(&ch, HistoryRequest { since: None, limit: Some(10), latest: true }).await.unwrap();
    let datas: Vec<&[u8]> = h.publications.iter().map(|d| &d.publication.data[..]).collect();
    assert_eq!(datas, [&b"698"[..], b"699", b"700"]);
    assert_eq!(h.publications[1].publication.meta.as_deref(), Some(&meta()), "kept through compaction");
}

/// A publication's properties, as an MQTT 5 publisher sets them.
fn meta() -> Meta {
    Meta { ttl: Some(3600), retain: true, headers: vec![("k".into(), "v".into())], ..Meta::default() }
}
