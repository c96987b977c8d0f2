//! The resilient Rust client: resume after a cut connection, and failover to another
//! node over Redis, delivering every publication once, in order.

mod common;

use std::time::Duration;

use common::{channel, config, Proxy, TestServer};
use serde_json::json;
use switchboard_client::{Client, ClientOptions, ConnState, Event};

async fn offsets(sub: &mut switchboard_client::Subscription, n: usize) -> Vec<u64> {
    let mut v = Vec::new();
    while v.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), sub.next()).await.expect("in time").unwrap() {
            Event::Publication(p) => v.push(p["offset"].as_u64().unwrap()),
            Event::Reset { .. } => panic!("unexpected reset"),
            _ => {}
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_resumes_after_a_cut_with_every_publication_once() {
    let s = TestServer::start(config("")).await;
    let proxy = Proxy::start(s.addr).await;
    let mut opts = ClientOptions::new([format!("ws://127.0.0.1:{}/ws", proxy.port)]);
    opts.backoff_base = Duration::from_millis(50);
    opts.backoff_cap = Duration::from_millis(300);
    let client = Client::start(opts);
    let ch = channel("rc");
    let mut sub = client.subscribe(&ch, None);
    let mut state = client.state();
    state.wait_for(|s| matches!(s, ConnState::Connected { .. })).await.unwrap();
    // The subscription is registered once its reply is in: wait for a position.
    for _ in 0..200 {
        if sub.position().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 1..=5 {
        s.publish(&ch, json!(i)).await;
    }
    assert_eq!(offsets(&mut sub, 5).await, vec![1, 2, 3, 4, 5]);
    proxy.cut();
    state.wait_for(|s| matches!(s, ConnState::Disconnected { .. })).await.unwrap();
    for i in 6..=12 {
        s.publish(&ch, json!(i)).await;
    }
    proxy.restore();
    assert_eq!(offsets(&mut sub, 7).await, (6..=12).collect::<Vec<_>>());
    let ack = client.publish(&ch, json!("mine")).await.unwrap_err();
    assert!(matches!(ack, switchboard_client::ClientError::Server(ref e) if e.code == "publish_not_allowed"));
    client.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_fails_over_to_another_node_and_resumes() {
    let prefix = format!("sbrc-{}-{}", std::process::id(), fastrand::u32(..));
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let cfg = format!("[broker]\nkind = \"redis\"\nredis_url = \"{url}\"\nredis_prefix = \"{prefix}\"\n");
    let a = TestServer::start(config(&cfg)).await;
    let b = TestServer::start(config(&cfg)).await;
    let mut opts = ClientOptions::new([format!("ws://{}/ws", a.addr), format!("ws://{}/ws", b.addr)]);
    opts.backoff_base = Duration::from_millis(50);
    let client = Client::start(opts);
    let ch = channel("fo");
    let mut sub = client.subscribe(&ch, None);
    client.state().wait_for(|s| matches!(s, ConnState::Connected { .. })).await.unwrap();
    for _ in 0..200 {
        if sub.position().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.publish(&ch, json!(1)).await;
    assert_eq!(offsets(&mut sub, 1).await, vec![1]);
    a.shutdown().await; // node A drains: the client moves to B
    for i in 2..=6 {
        b.publish(&ch, json!(i)).await;
    }
    assert_eq!(offsets(&mut sub, 5).await, vec![2, 3, 4, 5, 6]);
    client.close();
}
