//! [`StreamConsumer`] against a real Redis (`SWITCHBOARD_TEST_REDIS`, default
//! `redis://127.0.0.1:6379`): what another consumer read and left unacknowledged is claimed
//! once idle long enough, its own pending entries come first after a restart, and the lag
//! counts what the group has not read.

use std::time::Duration;

use switchboard_redis::StreamConsumer;

fn url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn add(stream: &str, n: usize) {
    let mut c = redis::Client::open(url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    for i in 0..n {
        let _: String = redis::cmd("XADD").arg(stream).arg("*").arg("n").arg(i).query_async(&mut c).await.unwrap();
    }
}

fn numbers(entries: &[switchboard_redis::StreamEntry]) -> Vec<String> {
    entries.iter().map(|e| e.field("n").unwrap().to_string()).collect()
}

#[tokio::test]
async fn idle_entries_of_a_gone_consumer_are_claimed_and_a_restart_reads_its_own_first() {
    let stream = format!("sbtest-stream-{}", fastrand::u64(..));
    let idle = Duration::from_millis(200);
    let mut a = StreamConsumer::new(&url(), &stream, "g", "a", idle).unwrap();
    a.create_group().await.unwrap();
    add(&stream, 10).await;
    assert_eq!(a.lag().await.unwrap(), Some(10), "none read yet");
    // `a` reads four and is gone without acknowledging them.
    let taken = a.take(4, Duration::from_millis(10)).await.unwrap();
    assert_eq!(numbers(&taken), ["0", "1", "2", "3"]);
    assert_eq!(a.lag().await.unwrap(), Some(6));
    drop(a);
    // `a` again (the same name, as after a restart): its own pending entries, in order.
    let mut again = StreamConsumer::new(&url(), &stream, "g", "a", Duration::from_secs(600)).unwrap();
    let own = again.take(100, Duration::from_millis(10)).await.unwrap();
    assert_eq!(numbers(&own), ["0", "1", "2", "3"]);
    drop(again);
    // `b`, once they have been idle past `claim_idle`: claimed, then the unread ones.
    tokio::time::sleep(idle + Duration::from_millis(100)).await;
    let mut b = StreamConsumer::new(&url(), &stream, "g", "b", idle).unwrap();
    let claimed = b.take(100, Duration::from_millis(10)).await.unwrap();
    assert_eq!(numbers(&claimed), ["0", "1", "2", "3"]);
    b.ack(&claimed.iter().map(|e| e.id.clone()).collect::<Vec<_>>()).await.unwrap();
    let rest = b.take(100, Duration::from_millis(10)).await.unwrap();
    assert_eq!(numbers(&rest), ["4", "5", "6", "7", "8", "9"]);
    b.ack(&rest.iter().map(|e| e.id.clone()).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(b.lag().await.unwrap(), Some(0));
    // Acknowledged: nothing comes again, to anyone.
    tokio::time::sleep(idle + Duration::from_millis(100)).await;
    let mut c = StreamConsumer::new(&url(), &stream, "g", "c", idle).unwrap();
    assert!(c.take(100, Duration::from_millis(10)).await.unwrap().is_empty());
    let mut conn = redis::Client::open(url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("DEL").arg(&stream).query_async(&mut conn).await.unwrap();
}
