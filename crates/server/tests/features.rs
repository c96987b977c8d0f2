//! Presence and join/leave, volatile messages, wildcard subscriptions and idempotent
//! publish, across transports.

mod common;

use std::time::Duration;

use common::{channel, config, Sse, TestServer};
use serde_json::{json, Value};
use switchboard_client::{ClientError, Connection};
use switchboard_server::auth::{sign, unix_now, Claims};

const SECRET: &str = "feature-secret-0123456789abcdef012345";

const CONFIG: &str = r#"
[auth]
algorithm = "HS256"
hmac_secret = "feature-secret-0123456789abcdef012345"
[namespaces.room]
presence = true
join_leave = true
allow_publish = true
[namespaces.quiet]
presence = true
[namespaces.typing]
volatile = true
allow_publish = true
[namespaces.sensors]
[namespaces.secret]
require_token = true
[ws]
ping_interval_secs = 1
[sse]
keepalive_secs = 1
"#;

fn token(user: &str, channels: Option<Vec<&str>>) -> String {
    let c = Claims {
        sub: user.into(),
        exp: unix_now() + 600,
        channels: channels.map(|v| v.into_iter().map(String::from).collect()),
        info: Some(json!({"name": user.to_uppercase()})),
        ..Default::default()
    };
    sign("HS256", SECRET, &c).unwrap()
}

async fn start() -> TestServer {
    TestServer::start(config(&CONFIG.replace("[ws]", "[defaults]\npresence_ttl_secs = 5\n[ws]"))).await
}

async fn ws_as(s: &TestServer, user: &str) -> Connection {
    let mut c = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    c.call(json!({"cmd": "connect", "token": token(user, None)})).await.unwrap();
    c
}

fn err_code(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn presence_clients(s: &TestServer, ch: &str) -> usize {
    s.get_json(&format!("/api/presence?channel={ch}")).await.1["clients"].as_array().unwrap().len()
}

async fn wait_for_clients(s: &TestServer, ch: &str, n: usize) {
    for _ in 0..500 {
        if presence_clients(s, ch).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("presence of {ch} never reached {n}");
}

#[tokio::test]
async fn presence_lists_clients_counts_users_and_follows_disconnects() {
    let s = start().await;
    let ch = channel("room");
    let mut tab1 = ws_as(&s, "alice").await;
    let mut tab2 = ws_as(&s, "alice").await;
    let mut bob = ws_as(&s, "bob").await;
    for c in [&mut tab1, &mut tab2, &mut bob] {
        c.subscribe(&ch, None).await.unwrap();
    }
    let list = bob.call(json!({"cmd": "presence", "channel": ch})).await.unwrap();
    let clients = list["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 3);
    assert!(clients.iter().any(|c| c["user"] == "bob" && c["info"]["name"] == "BOB"));
    let stats = bob.call(json!({"cmd": "presence_stats", "channel": ch})).await.unwrap();
    assert_eq!(stats, json!({"clients": 3, "users": 2}));
    let (_, api) = s.get_json(&format!("/api/presence_stats?channel={ch}")).await;
    assert_eq!(api, json!({"clients": 3, "users": 2}));
    drop(tab2);
    wait_for_clients(&s, &ch, 2).await;
    let stats = bob.call(json!({"cmd": "presence_stats", "channel": ch})).await.unwrap();
    assert_eq!(stats, json!({"clients": 2, "users": 2}));
    bob.call(json!({"cmd": "unsubscribe", "channel": ch})).await.unwrap();
    wait_for_clients(&s, &ch, 1).await;
}

#[tokio::test]
async fn a_websocket_join_is_seen_by_an_sse_subscriber_and_so_is_the_leave() {
    let s = start().await;
    let ch = channel("room");
    let mut sse = Sse::connect(&s, &format!("channel={ch}&token={}", token("watcher", None)), None).await;
    sse.next_named("subscribed").await;
    let own = sse.next_named("join").await;
    assert_eq!(own.json()["user"], "watcher");
    let mut carol = ws_as(&s, "carol").await;
    carol.subscribe(&ch, None).await.unwrap();
    let join = sse.next_named("join").await;
    assert!(join.id.is_none(), "presence events must not move the cursor");
    let v = join.json();
    assert_eq!((v["channel"].as_str(), v["user"].as_str()), (Some(ch.as_str()), Some("carol")));
    assert_eq!(v["info"]["name"], "CAROL");
    drop(carol);
    let leave = sse.next_named("leave").await;
    assert_eq!(leave.json()["user"], "carol");
    // The WebSocket side sees joins as pushes too.
    let mut dave = ws_as(&s, "dave").await;
    dave.subscribe(&ch, None).await.unwrap();
    let push = dave.next_push().await.unwrap();
    assert_eq!(push["join"]["user"], "dave");
}

#[tokio::test]
async fn presence_entries_go_when_a_client_stops_answering() {
    let s = start().await;
    let ch = channel("quiet");
    let mut ws = switchboard_client::WsStream::connect(&format!("ws://{}/ws?channel={ch}", s.addr), Default::default())
        .await
        .unwrap();
    wait_for_clients(&s, &ch, 1).await;
    // Never answer pings: after 3 intervals the server closes it and the entry goes.
    loop {
        match ws.recv().await {
            Ok(switchboard_client::Message::Close(code, _)) => {
                assert_eq!(code, Some(4001));
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    wait_for_clients(&s, &ch, 0).await;
}

#[tokio::test]
async fn presence_on_a_namespace_without_it_is_a_documented_error() {
    let s = start().await;
    let mut c = ws_as(&s, "erin").await;
    assert_eq!(err_code(c.call(json!({"cmd": "presence", "channel": "sensors:x"})).await), "presence_disabled");
    let (st, v) = s.get_json("/api/presence?channel=sensors:x").await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (409, "presence_disabled"));
}

#[tokio::test]
async fn volatile_messages_are_live_only_and_never_replayed() {
    let s = start().await;
    let ch = channel("typing");
    let mut c = ws_as(&s, "frank").await;
    c.subscribe(&ch, None).await.unwrap();
    let mut sse = Sse::connect(&s, &format!("channel={ch}"), None).await;
    sse.next_named("subscribed").await;
    let r = c.publish(&ch, json!("frank is typing")).await.unwrap();
    assert_eq!(r, json!({"volatile": true}), "the namespace default makes it volatile");
    let p = c.next_pub().await.unwrap();
    assert_eq!((p["volatile"].as_bool(), p.get("offset")), (Some(true), None));
    let e = sse.next_named("message").await;
    assert!(e.id.is_none());
    assert_eq!(e.json()["volatile"], true);
    // A reliable one, explicitly.
    let r = c.call(json!({"cmd": "publish", "channel": ch, "data": "hello", "volatile": false})).await.unwrap();
    assert_eq!(r["offset"], 1);
    // Resume from before everything: only the reliable one comes back.
    let epoch = r["epoch"].as_str().unwrap().to_string();
    let mut later = ws_as(&s, "gail").await;
    let ok = later.subscribe(&ch, Some(&format!("{epoch}:0"))).await.unwrap();
    assert_eq!(ok["replayed"], 1);
    assert_eq!(later.next_pub().await.unwrap()["data"], "hello");
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}")).await;
    assert_eq!(h["publications"].as_array().unwrap().len(), 1);
    // Over the API too.
    let (st, v) = s
        .post_raw("/api/publish", json!({"channel": channel("sensors"), "data": 1, "volatile": true}).to_string())
        .await;
    assert_eq!((st, v), (200, json!({"volatile": true})));
}

#[tokio::test]
async fn wildcard_subscriptions_deliver_matching_channels_by_name_without_leaks() {
    let s = start().await;
    let mut c = ws_as(&s, "hank").await;
    let ok = c.subscribe("sensors:+/temp", None).await.unwrap();
    assert_eq!(ok["pattern"], true);
    let mut sse = Sse::connect(&s, "channel=sensors:%23", None).await;
    sse.next_named("subscribed").await;
    for ch in ["sensors:r1/temp", "sensors:r1/hum", "sensors:r2/temp", "room:r1/temp", "sensorsx:r1/temp"] {
        s.publish(ch, json!(ch)).await;
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(c.next_pub().await.unwrap()["channel"].as_str().unwrap().to_string());
    }
    assert_eq!(got, vec!["sensors:r1/temp", "sensors:r2/temp"]);
    let mut all = Vec::new();
    for _ in 0..3 {
        all.push(sse.next_named("message").await.json()["channel"].as_str().unwrap().to_string());
    }
    assert_eq!(all, vec!["sensors:r1/temp", "sensors:r1/hum", "sensors:r2/temp"]);
    // Nothing else arrives: the next thing after a marker is the marker.
    s.publish("sensors:marker/temp", json!("m")).await;
    assert_eq!(c.next_pub().await.unwrap()["channel"], "sensors:marker/temp");
    assert_eq!(c.call(json!({"cmd": "unsubscribe", "channel": "sensors:+/temp"})).await.unwrap(), json!({}));
}

#[tokio::test]
async fn bad_and_too_broad_patterns_are_refused() {
    let s = start().await;
    let mut c = ws_as(&s, "ivy").await;
    for bad in ["sensors:#/x", "sensors:a+/b", "+:x", "#"] {
        assert_eq!(err_code(c.subscribe(bad, None).await), "invalid_pattern", "{bad}");
    }
    assert_eq!(
        err_code(c.call(json!({"cmd": "subscribe", "channel": "sensors:#", "since": "abc:1"})).await),
        "invalid_pattern"
    );
    let (st, v) = s.get_json("/poll?channel=sensors:%23").await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (400, "invalid_pattern"));
    // A token limited to one room cannot subscribe to the whole namespace.
    let mut limited = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    limited.call(json!({"cmd": "connect", "token": token("jack", Some(vec!["secret:room1/*"]))})).await.unwrap();
    assert_eq!(err_code(limited.subscribe("secret:#", None).await), "permission_denied");
    // `#` matches zero segments: `secret:room1/#` would also deliver `secret:room1`,
    // which `secret:room1/*` does not grant.
    assert_eq!(err_code(limited.subscribe("secret:room1/#", None).await), "permission_denied");
    limited.subscribe("secret:room1/+", None).await.unwrap();
    limited.subscribe("secret:room1/+/#", None).await.unwrap();
    // A claim that covers the room itself covers the pattern, and delivers the room.
    let mut wide = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    wide.call(json!({"cmd": "connect", "token": token("jack", Some(vec!["secret:room1*"]))})).await.unwrap();
    wide.subscribe("secret:room1/#", None).await.unwrap();
    s.publish("secret:room1", json!("in the room itself")).await;
    assert_eq!(wide.next_pub().await.unwrap()["channel"], "secret:room1");
    let mut anon = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    assert_eq!(err_code(anon.subscribe("secret:#", None).await), "token_required");
}

#[tokio::test]
async fn a_publish_retried_with_the_same_key_is_stored_once() {
    let s = start().await;
    let ch = channel("room");
    let body = json!({"channel": ch, "data": {"order": 42}, "key": "order-42"}).to_string();
    let (_, first) = s.post_raw("/api/publish", body.clone()).await;
    let (_, again) = s.post_raw("/api/publish", body).await;
    assert_eq!(first.get("duplicate"), None, "{first}");
    assert_eq!(again, json!({"epoch": first["epoch"], "offset": first["offset"], "duplicate": true}));
    let mut c = ws_as(&s, "kate").await;
    let via_ws =
        c.call(json!({"cmd": "publish", "channel": ch, "data": {"order": 42}, "key": "order-42"})).await.unwrap();
    assert_eq!(via_ws, again);
    let (_, h) = s.get_json(&format!("/api/history?channel={ch}")).await;
    assert_eq!(h["publications"].as_array().unwrap().len(), 1);
    let long = "k".repeat(129);
    let (st, v) = s.post_raw("/api/publish", json!({"channel": ch, "data": 1, "key": long}).to_string()).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (400, "invalid_idempotency_key"));
}

#[tokio::test]
async fn an_anonymous_sse_client_can_say_who_it_is_for_presence() {
    let s = start().await;
    let ch = channel("room");
    let client = "%7B%22name%22%3A%22ada%22%7D"; // {"name":"ada"}
    let mut sse = common::Sse::connect(&s, &format!("channel={ch}&client={client}"), None).await;
    sse.next_named("subscribed").await;
    let (_, v) = s.get_json(&format!("/api/presence?channel={ch}")).await;
    assert_eq!(v["clients"][0]["info"]["unverified"]["name"], "ada", "{v}");
}
