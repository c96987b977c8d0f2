//! The delivery guarantees over short and long polling.

mod common;

use common::{channel, config, TestServer};
use serde_json::{json, Value};

async fn poll(s: &TestServer, query: &str) -> Value {
    let (status, v) = s.get_json(&format!("/poll?{query}")).await;
    assert_eq!(status, 200, "{query}: {v}");
    v
}

fn offsets(v: &Value) -> Vec<u64> {
    v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn first_poll_returns_the_current_cursor_and_no_messages() {
    let s = TestServer::start(config("")).await;
    let ch = channel("p");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    let v = poll(&s, &format!("channel={ch}")).await;
    assert_eq!(offsets(&v), Vec::<u64>::new());
    assert_eq!(v["cursor"], format!("{epoch}:1"));
    assert_eq!(v["resets"], json!([]));
}

#[tokio::test]
async fn short_polls_chained_by_cursor_see_everything_once_in_order() {
    let s = TestServer::start(config("")).await;
    let ch = channel("p");
    let mut cursor = poll(&s, &format!("channel={ch}")).await["cursor"].as_str().unwrap().to_string();
    for i in 1..=25 {
        s.publish(&ch, json!({"i": i})).await;
    }
    let mut seen = Vec::new();
    loop {
        let v = poll(&s, &format!("channel={ch}&since={cursor}&limit=10")).await;
        let got = offsets(&v);
        assert!(got.len() <= 10);
        cursor = v["cursor"].as_str().unwrap().to_string();
        if got.is_empty() {
            break;
        }
        for m in v["messages"].as_array().unwrap() {
            assert_eq!(m["data"]["i"], m["offset"]);
        }
        seen.extend(got);
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    assert!(cursor.ends_with(":25"));
}

#[tokio::test]
async fn long_poll_is_held_until_a_message_arrives() {
    let s = TestServer::start(config("")).await;
    let ch = channel("lp");
    let cursor = poll(&s, &format!("channel={ch}")).await["cursor"].as_str().unwrap().to_string();
    let waiting = {
        let (http, url) = (s.http.clone(), s.url(&format!("/poll?channel={ch}&since={cursor}&wait=30")));
        tokio::spawn(async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap() })
    };
    // Wait until the long poll is registered as a subscriber, then publish.
    loop {
        let (_, c) = s.get_json("/api/channels").await;
        if c["channels"].as_array().unwrap().iter().any(|x| x["channel"] == ch.as_str()) {
            break;
        }
        tokio::task::yield_now().await;
    }
    s.publish(&ch, json!("hello")).await;
    let v = waiting.await.unwrap();
    assert_eq!(offsets(&v), vec![1]);
    assert_eq!(v["messages"][0]["data"], "hello");
    assert!(v["cursor"].as_str().unwrap().ends_with(":1"));
}

#[tokio::test]
async fn long_poll_returns_empty_when_the_wait_ends() {
    let s = TestServer::start(config("")).await;
    let ch = channel("lp");
    let cursor = poll(&s, &format!("channel={ch}")).await["cursor"].as_str().unwrap().to_string();
    let v = poll(&s, &format!("channel={ch}&since={cursor}&wait=1")).await;
    assert_eq!(offsets(&v), Vec::<u64>::new());
    assert_eq!(v["cursor"], cursor.as_str());
}

#[tokio::test]
async fn long_poll_returns_at_once_when_messages_were_missed() {
    let s = TestServer::start(config("")).await;
    let ch = channel("lp");
    let cursor = poll(&s, &format!("channel={ch}")).await["cursor"].as_str().unwrap().to_string();
    s.publish(&ch, json!(1)).await;
    let v = poll(&s, &format!("channel={ch}&since={cursor}&wait=60")).await;
    assert_eq!(offsets(&v), vec![1]);
}

#[tokio::test]
async fn lost_positions_are_reported_as_resets_with_the_current_position() {
    let s = TestServer::start(config("[namespaces.tiny]\nhistory_size = 2\n")).await;
    let ch = channel("tiny");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    for i in 2..=5 {
        s.publish(&ch, json!(i)).await;
    }
    let v = poll(&s, &format!("channel={ch}&since={epoch}:1")).await;
    assert_eq!(offsets(&v), Vec::<u64>::new());
    assert_eq!(v["resets"], json!([{"channel": ch, "epoch": epoch, "offset": 5, "reason": "position_lost"}]));
    assert_eq!(v["cursor"], format!("{epoch}:5"));
    let v = poll(&s, &format!("channel={ch}&since=otherepoch:3")).await;
    assert_eq!(v["resets"][0]["offset"], 5);
    // Within history: recovered exactly.
    let v = poll(&s, &format!("channel={ch}&since={epoch}:3")).await;
    assert_eq!(offsets(&v), vec![4, 5]);
    assert_eq!(v["resets"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_while_publishing_loses_and_repeats_nothing() {
    let s = TestServer::start(config("[defaults]\nhistory_size = 1000\n")).await;
    let ch = channel("race");
    let mut cursor = poll(&s, &format!("channel={ch}")).await["cursor"].as_str().unwrap().to_string();
    let publisher = {
        let (http, url, ch) = (s.http.clone(), s.url("/api/publish"), ch.clone());
        tokio::spawn(async move {
            for i in 1..=300 {
                http.post(&url).json(&json!({"channel": ch, "data": i})).send().await.unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 300 {
        let v = poll(&s, &format!("channel={ch}&since={cursor}&wait=10")).await;
        seen.extend(offsets(&v));
        cursor = v["cursor"].as_str().unwrap().to_string();
    }
    publisher.await.unwrap();
    assert_eq!(seen, (1..=300).collect::<Vec<_>>());
}

#[tokio::test]
async fn several_channels_poll_with_one_cursor() {
    let s = TestServer::start(config("")).await;
    let (a, b) = (channel("m"), channel("m"));
    let q = format!("channel={a}&channel={b}");
    let cursor = poll(&s, &q).await["cursor"].as_str().unwrap().to_string();
    s.publish(&a, json!(1)).await;
    s.publish(&b, json!(2)).await;
    let v = poll(&s, &format!("{q}&since={cursor}")).await;
    let chans: Vec<&str> = v["messages"].as_array().unwrap().iter().map(|m| m["channel"].as_str().unwrap()).collect();
    assert_eq!(chans, vec![a.as_str(), b.as_str()]);
    let v = poll(&s, &format!("{q}&since={}", v["cursor"].as_str().unwrap())).await;
    assert_eq!(offsets(&v), Vec::<u64>::new());
}

#[tokio::test]
async fn bad_polls_get_documented_errors() {
    let s = TestServer::start(config("[namespaces.live]\nhistory_size = 0\n[poll]\nmax_wait_secs = 30\n")).await;
    let cases = [
        ("/poll?channel=a&wait=31", 400, "bad_wait"),
        ("/poll?channel=a&wait=-1", 400, "bad_wait"),
        ("/poll?channel=a&wait=soon", 400, "bad_wait"),
        ("/poll?channel=a&limit=0", 400, "bad_limit"),
        ("/poll?channel=a&limit=100000", 400, "bad_limit"),
        ("/poll?channel=a&since=nocolon", 400, "bad_cursor"),
        ("/poll?channel=a&since=abc:99999999999999999999999", 400, "bad_cursor"),
        ("/poll?channel=live:x", 409, "history_disabled"),
        ("/poll?channel=%00", 400, "invalid_channel"),
        ("/poll", 400, "invalid_request"),
    ];
    for (path, status, code) in cases {
        let (st, body) = s.get_json(path).await;
        assert_eq!((st, body["error"]["code"].as_str().unwrap()), (status, code), "{path}: {body}");
    }
}

#[tokio::test]
async fn rewind_without_since_returns_the_last_n() {
    let s = TestServer::start(config("")).await;
    let ch = channel("rw");
    for i in 1..=5 {
        s.publish(&ch, json!(i)).await;
    }
    let v = poll(&s, &format!("channel={ch}&rewind=3")).await;
    assert_eq!(offsets(&v), vec![3, 4, 5]);
    assert!(v["cursor"].as_str().unwrap().ends_with(":5"));
    let (st, v) = s.get_json(&format!("/poll?channel={ch}&rewind=101")).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (400, "bad_rewind"));
}
