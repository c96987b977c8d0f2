//! The server HTTP API: publish, broadcast, history, channels, health, API keys.

mod common;

use std::time::Duration;

use common::{channel, config, TestServer};
use serde_json::json;

#[tokio::test]
async fn publish_returns_gapless_offsets_in_one_epoch() {
    let s = TestServer::start(config("")).await;
    let ch = channel("api");
    let (e1, o1) = s.publish(&ch, json!({"a": 1})).await;
    let (e2, o2) = s.publish(&ch, json!([1, 2])).await;
    assert_eq!((o1, o2), (1, 2));
    assert_eq!(e1, e2);
}

#[tokio::test]
async fn pretty_printed_payloads_are_stored_on_one_line() {
    let s = TestServer::start(config("")).await;
    let ch = channel("api");
    let body = format!("{{\"channel\":\"{ch}\",\"data\":{{\n  \"text\": \"a\\nb\"\n}}}}");
    let (st, _) = s.post_raw("/api/publish", body).await;
    assert_eq!(st, 200);
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}")).await;
    assert_eq!(h["publications"][0]["data"], json!({"text": "a\nb"}));
}

#[tokio::test]
async fn broadcast_publishes_to_each_channel_and_reports_per_channel_errors() {
    let s = TestServer::start(config("")).await;
    let (a, b) = (channel("bc"), channel("bc"));
    let (st, v) = s.post_raw("/api/broadcast", json!({"channels": [a, "bad channel", b], "data": 7}).to_string()).await;
    assert_eq!(st, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["offset"], 1);
    assert_eq!(r[1]["error"]["code"], "invalid_channel");
    assert_eq!(r[2]["offset"], 1);
    let (_, h) = s.get_json(&format!("/api/history?channel={b}")).await;
    assert_eq!(h["publications"][0]["data"], 7);
}

#[tokio::test]
async fn history_is_bounded_by_size() {
    let s = TestServer::start(config("[namespaces.h]\nhistory_size = 5\n")).await;
    let ch = channel("h");
    for i in 1..=12 {
        s.publish(&ch, json!(i)).await;
    }
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}")).await;
    let offs: Vec<u64> = h["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(offs, vec![8, 9, 10, 11, 12]);
    assert_eq!(h["offset"], 12);
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}&limit=2")).await;
    assert_eq!(h["publications"].as_array().unwrap().len(), 2);
    assert_eq!(h["publications"][1]["offset"], 12, "without since, limit takes the newest");
}

#[tokio::test]
async fn history_is_bounded_by_ttl() {
    let s = TestServer::start(config("[namespaces.h]\nhistory_ttl_secs = 1\n")).await;
    let ch = channel("h");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}")).await;
    assert_eq!(h["publications"].as_array().unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}")).await;
    assert_eq!(h["publications"], json!([]));
    assert_eq!((h["epoch"].as_str().unwrap(), h["offset"].as_u64().unwrap()), (epoch.as_str(), 1));
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}&since={epoch}:0")).await;
    assert_eq!(h["recovered"], false);
}

#[tokio::test]
async fn history_since_returns_the_rest_or_says_not_recovered() {
    let s = TestServer::start(config("")).await;
    let ch = channel("h");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    s.publish(&ch, json!(2)).await;
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}&since={epoch}:1")).await;
    assert_eq!(h["recovered"], true);
    assert_eq!(h["publications"][0]["offset"], 2);
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}&since=other:1")).await;
    assert_eq!(h["recovered"], false);
    assert_eq!(h["publications"], json!([]));
    assert_eq!(h["offset"], 2);
}

#[tokio::test]
async fn bad_publishes_get_documented_errors_and_publish_nothing() {
    let s = TestServer::start(config("strict_namespaces = true\n[namespaces.ok]\n[limits]\nmax_message_bytes = 100\n"))
        .await;
    let big = "x".repeat(200);
    let cases: Vec<(String, u16, &str)> = vec![
        ("not json".into(), 400, "invalid_json"),
        ("{\"channel\":\"ok:1\"".into(), 400, "invalid_json"),
        ("{\"channel\":\"ok:1\"}".into(), 400, "invalid_request"),
        ("{\"data\":1}".into(), 400, "invalid_request"),
        ("{\"channel\":5,\"data\":1}".into(), 400, "invalid_request"),
        ("{\"channel\":\"ok:1\",\"data\":1,\"extra\":2}".into(), 400, "invalid_request"),
        ("{\"channel\":\"ok:1\",\"data\":nope}".into(), 400, "invalid_json"),
        ("{\"channel\":\"bad name\",\"data\":1}".into(), 400, "invalid_channel"),
        ("{\"channel\":\"nope:1\",\"data\":1}".into(), 404, "unknown_namespace"),
        (format!("{{\"channel\":\"ok:1\",\"data\":\"{big}\"}}"), 413, "message_too_large"),
        (format!("{{\"channel\":\"ok:1\",\"data\":\"{}\"}}", "y".repeat(1_000_000)), 413, "message_too_large"),
    ];
    for (body, status, code) in cases {
        let (st, v) = s.post_raw("/api/publish", body.clone()).await;
        assert_eq!((st, v["error"]["code"].as_str().unwrap()), (status, code), "{}: {v}", &body[..body.len().min(60)]);
    }
    let (_, h) = s.get_json("/api/history?channel=ok:1").await;
    assert_eq!(h["publications"], json!([]), "a rejected publish was stored");
    assert_eq!(h["offset"], 0);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let s = TestServer::start(config("")).await;
    let (st, v) = s.get_json("/nope").await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (404, "not_found"));
    let (st, v) = s.get_json("/api/publish").await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (405, "method_not_allowed"));
}

#[tokio::test]
async fn channels_lists_active_channels_with_subscriber_counts() {
    let s = TestServer::start(config("")).await;
    let ch = channel("list");
    let (_, v) = s.get_json("/api/channels").await;
    assert_eq!(v["channels"], json!([]));
    let r1 = s.http.get(s.url(&format!("/sse?channel={ch}"))).send().await.unwrap();
    let r2 = s.http.get(s.url(&format!("/sse?channel={ch}"))).send().await.unwrap();
    let (_, v) = s.get_json("/api/channels").await;
    assert_eq!(v["channels"], json!([{"channel": ch, "subscribers": 2}]));
    drop((r1, r2));
    for _ in 0..200 {
        let (_, v) = s.get_json("/api/channels").await;
        if v["channels"] == json!([]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("closed SSE connections still listed as subscribers");
}

#[tokio::test]
async fn api_keys_are_required_without_dev_mode() {
    let key = "k-0123456789abcdef";
    let s =
        TestServer::start_with(config(&format!("[api]\nkeys = [\"other-key-0123456789\", \"{key}\"]\n")), false).await;
    let body = json!({"channel": "a", "data": 1}).to_string();
    let r = s.http.post(s.url("/api/publish")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["code"], "unauthorized");
    let r =
        s.http.post(s.url("/api/publish")).bearer_auth("k-0123456789abcdeX").body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s.http.post(s.url("/api/publish")).bearer_auth(key).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = s.http.get(s.url("/api/channels")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Subscribing transports are not behind API keys.
    let r = s.http.get(s.url("/poll?channel=a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start(config("")).await;
    assert_eq!(s.get_json("/healthz").await.0, 200);
    let (st, v) = s.get_json("/readyz").await;
    assert_eq!((st, v["status"].as_str().unwrap()), (200, "ready"));
}
