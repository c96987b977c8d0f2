//! Direct messages: a client sends to another client's connection or to every connection
//! of a user, on WebSocket and WebTransport, on one node and across nodes over Redis;
//! `[direct] policy` decides who may; an absent target is an explicit error; a flood is
//! rate limited; nothing is stored.

mod common;

use common::wt::Wt;
use common::{config, TestServer};
use serde_json::{json, Value};
use switchboard_client::{ClientError, ConnectOptions, Connection, Message, WsStream};
use switchboard_server::auth::{sign, unix_now, Claims};

const SECRET: &str = "test-secret-0123456789abcdef0123456789";

fn conf(extra: &str) -> String {
    format!(
        "[auth]\nalgorithm = \"HS256\"\nhmac_secret = \"{SECRET}\"\n[webtransport]\nlisten = \"127.0.0.1:0\"\n{extra}"
    )
}

fn token(user: &str) -> String {
    sign("HS256", SECRET, &Claims { sub: user.into(), exp: unix_now() + 600, ..Default::default() }).unwrap()
}

/// A WebSocket connection as `user` (anonymous with None): the connection and its client id.
async fn ws(s: &TestServer, user: Option<&str>) -> (Connection, String) {
    let mut c = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    let hello = c.call(json!({"cmd": "connect", "token": user.map(token)})).await.unwrap();
    let client = hello["client"].as_str().expect("the connect reply names the client id").to_string();
    (c, client)
}

/// The next direct message pushed to `c`.
async fn direct(c: &mut Connection) -> Value {
    loop {
        let m = c.next_push().await.expect("a push");
        if m.get("message").is_some() {
            return m["message"].clone();
        }
    }
}

fn code(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_message_a_client_or_all_of_a_users_connections_on_any_transport() {
    let s = TestServer::start(config(&conf(""))).await;
    let (mut alice, alice_id) = ws(&s, Some("alice")).await;
    let (mut bob_ws, _) = ws(&s, Some("bob")).await;
    // Bob's second connection is a WebTransport session.
    let mut bob_wt = Wt::connect(&s, &format!("?token={}", token("bob"))).await;
    let mut seen = Vec::new();
    let hello = bob_wt.command(json!({"cmd": "connect"}), 1, &mut seen).await;
    let bob_wt_id = hello["ok"]["client"].as_str().unwrap().to_string();

    // To one connection: only it gets the message, with who sent it.
    let r = alice.call(json!({"cmd": "send", "to": {"client": bob_wt_id}, "data": {"sdp": "offer"}})).await.unwrap();
    assert_eq!(r["delivered"], 1, "{r}");
    let m = loop {
        let l = bob_wt.next().await.unwrap();
        if l.get("message").is_some() {
            break l["message"].clone();
        }
    };
    assert_eq!(m["data"], json!({"sdp": "offer"}));
    assert_eq!(m["from"], json!({"client": alice_id, "user": "alice"}));
    // To a user: every one of bob's connections.
    let r = alice.call(json!({"cmd": "send", "to": {"user": "bob"}, "data": "hi bob"})).await.unwrap();
    assert_eq!(r["delivered"], 2, "{r}");
    assert_eq!(direct(&mut bob_ws).await["data"], "hi bob");
    // The application, through the server API.
    let (status, v) = s.post_raw("/api/send", json!({"to": {"client": alice_id}, "data": 7}).to_string()).await;
    assert_eq!((status, &v["delivered"]), (200, &json!(1)), "{v}");
    let m = direct(&mut alice).await;
    assert_eq!((m["from"].clone(), m["data"].clone()), (json!({"server": true}), json!(7)));
    // Not connected: an explicit error, from the API (404) and from a client.
    let (status, v) = s.post_raw("/api/send", json!({"to": {"user": "carol"}, "data": 1}).to_string()).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("target_not_connected")), "{v}");
    let r = alice.call(json!({"cmd": "send", "to": {"client": "no-such-client"}, "data": 1})).await;
    assert_eq!(code(r), "target_not_connected");
    // Malformed: both targets, none.
    let r = alice.call(json!({"cmd": "send", "to": {"client": "x", "user": "y"}, "data": 1})).await;
    assert_eq!(code(r), "invalid_request");
    let r = alice.call(json!({"cmd": "send", "data": 1})).await;
    assert_eq!(code(r), "invalid_request");
    // An SSE stream takes them too, as `event: direct` (its client id in `subscribed`).
    let mut sse = common::Sse::connect(&s, &format!("channel=news:x&token={}", token("erin")), None).await;
    let subscribed: Value = serde_json::from_str(&sse.next_named("subscribed").await.data).unwrap();
    let sse_id = subscribed["client"].as_str().unwrap().to_string();
    alice.call(json!({"cmd": "send", "to": {"client": sse_id}, "data": "to the stream"})).await.unwrap();
    let e: Value = serde_json::from_str(&sse.next_named("direct").await.data).unwrap();
    assert_eq!(e, json!({"from": {"client": alice_id, "user": "alice"}, "data": "to the stream"}));
    let r = alice.call(json!({"cmd": "send", "to": {"user": "erin"}, "data": 2})).await.unwrap();
    assert_eq!(r["delivered"], 1, "{r}");
    // Nothing is stored: history has no channel for them, and a later connection of bob's
    // gets nothing of what was sent before it.
    let (mut late, _) = ws(&s, Some("bob")).await;
    let r = alice.call(json!({"cmd": "send", "to": {"user": "bob"}, "data": "after"})).await.unwrap();
    assert_eq!(r["delivered"], 3, "{r}");
    assert_eq!(direct(&mut late).await["data"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_decides_who_may_message_whom_and_a_flood_is_limited() {
    // authenticated (the default, but for `--dev`'s `anyone`): anonymous connections may
    // not send.
    let policy = "[direct]\npolicy = \"authenticated\"\n";
    let s = TestServer::start(config(&conf(&format!("{policy}[ws]\nmax_commands_per_sec = 5\n")))).await;
    let (mut anon, anon_id) = ws(&s, None).await;
    let (mut alice, _) = ws(&s, Some("alice")).await;
    let r = anon.call(json!({"cmd": "send", "to": {"user": "alice"}, "data": 1})).await;
    assert_eq!(code(r), "token_required");
    // …but may receive.
    alice.call(json!({"cmd": "send", "to": {"client": anon_id}, "data": "to anon"})).await.unwrap();
    assert_eq!(direct(&mut anon).await["data"], "to anon");
    // A flood — sent without waiting for replies, so how fast this machine answers does
    // not matter: the command rate refuses, then closes (1008), as for any command.
    let mut flood = WsStream::connect(&format!("ws://{}/ws", s.addr), ConnectOptions::default()).await.unwrap();
    flood.send_text(&json!({"id": 0, "cmd": "connect", "token": token("alice")}).to_string()).await.unwrap();
    for i in 1..100 {
        let send = json!({"id": i, "cmd": "send", "to": {"client": anon_id}, "data": 0});
        if flood.send_text(&send.to_string()).await.is_err() {
            break; // closed for flooding
        }
    }
    let mut refused = 0;
    let closed = loop {
        match flood.recv().await.unwrap() {
            Message::Text(t) if t.contains("rate_limited") => refused += 1,
            Message::Text(_) => {}
            Message::Close(code, _) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(refused > 0, "no send was rate limited");
    assert_eq!(closed, Some(1008));
    // Over HTTP, `POST /send` counts against the client's request rate per IP
    // (`limits.client_publishes_per_sec`, bursts of twice that): of 30 at once, some are
    // refused (how many depends on how fast this machine serves them, so not counted).
    let s2 = TestServer::start(config(&conf(&format!("{policy}[limits]\nclient_publishes_per_sec = 1\n")))).await;
    let (_target, target_id) = ws(&s2, None).await;
    let body = json!({"to": {"client": target_id}, "data": 0});
    let statuses = futures_util::future::join_all((0..30).map(|_| http_send(&s2, "alice", None, body.clone()))).await;
    let limited = statuses.iter().filter(|(status, v)| *status == 429 && v["error"]["code"] == "rate_limited").count();
    assert!(limited > 0, "none of 30 sends at once was rate limited: {statuses:?}");
    assert!(statuses.iter().any(|(status, _)| *status == 200), "{statuses:?}");

    // same_user: only to one's own connections.
    let s = TestServer::start(config(&conf("[direct]\npolicy = \"same_user\"\n"))).await;
    let (mut a1, _) = ws(&s, Some("alice")).await;
    let (mut a2, a2_id) = ws(&s, Some("alice")).await;
    let (_bob, bob_id) = ws(&s, Some("bob")).await;
    let r = a1.call(json!({"cmd": "send", "to": {"client": a2_id}, "data": "other tab"})).await.unwrap();
    assert_eq!(r["delivered"], 1);
    assert_eq!(direct(&mut a2).await["data"], "other tab");
    assert_eq!(code(a1.call(json!({"cmd": "send", "to": {"client": bob_id}, "data": 1})).await), "permission_denied");
    assert_eq!(code(a1.call(json!({"cmd": "send", "to": {"user": "bob"}, "data": 1})).await), "permission_denied");

    // presence: to those present in a channel the sender is subscribed to.
    let s =
        TestServer::start(config(&conf("[direct]\npolicy = \"presence\"\n[namespaces.room]\npresence = true\n"))).await;
    let (mut alice, _) = ws(&s, Some("alice")).await;
    let (mut bob, bob_id) = ws(&s, Some("bob")).await;
    let (_carol, carol_id) = ws(&s, Some("carol")).await;
    for c in [&mut alice, &mut bob] {
        c.call(json!({"cmd": "subscribe", "channel": "room:1"})).await.unwrap();
    }
    let r = alice.call(json!({"cmd": "send", "to": {"client": bob_id}, "data": "in the room"})).await.unwrap();
    assert_eq!(r["delivered"], 1);
    assert_eq!(direct(&mut bob).await["data"], "in the room");
    assert_eq!(
        code(alice.call(json!({"cmd": "send", "to": {"client": carol_id}, "data": 1})).await),
        "permission_denied"
    );
    assert_eq!(code(alice.call(json!({"cmd": "send", "to": {"user": "carol"}, "data": 1})).await), "permission_denied");
    // Over HTTP (`POST /send`), a client present in the room as its SSE stream names the
    // room it shares with the target.
    let mut sse = common::Sse::connect(&s, &format!("channel=room:1&token={}", token("erin")), None).await;
    let subscribed: Value = serde_json::from_str(&sse.next_named("subscribed").await.data).unwrap();
    let key = subscribed["client_key"].as_str().unwrap().to_string();
    let to_bob = json!({"to": {"client": bob_id}, "data": "over http", "channel": "room:1"});
    let (status, r) = http_send(&s, "erin", Some(&key), to_bob).await;
    assert_eq!((status, &r["delivered"]), (200, &json!(1)), "{r}");
    assert_eq!(direct(&mut bob).await["data"], "over http");
    let (status, r) = http_send(&s, "erin", Some(&key), json!({"to": {"client": bob_id}, "data": 1})).await;
    assert_eq!((status, r["error"]["code"].as_str()), (403, Some("permission_denied")), "{r}");
    let to_carol = json!({"to": {"client": carol_id}, "data": 1, "channel": "room:1"});
    let (status, _) = http_send(&s, "erin", Some(&key), to_carol).await;
    assert_eq!(status, 403);

    // claim: a token with "direct": true may message anyone; without, not.
    let s = TestServer::start(config(&conf("[direct]\npolicy = \"claim\"\n"))).await;
    let claimed = sign(
        "HS256",
        SECRET,
        &Claims { sub: "ops".into(), exp: unix_now() + 600, direct: Some(true), ..Default::default() },
    )
    .unwrap();
    let mut ops = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    ops.call(json!({"cmd": "connect", "token": claimed})).await.unwrap();
    let (mut dana, dana_id) = ws(&s, Some("dana")).await;
    ops.call(json!({"cmd": "send", "to": {"client": dana_id}, "data": "from ops"})).await.unwrap();
    assert_eq!(direct(&mut dana).await["data"], "from ops");
    assert_eq!(code(dana.call(json!({"cmd": "send", "to": {"user": "ops"}, "data": 1})).await), "permission_denied");

    // Under --dev without a policy configured: anyone, anonymous senders too.
    let s = TestServer::start(config(&conf(""))).await;
    let (mut anon, _) = ws(&s, None).await;
    let (_alice, alice_id) = ws(&s, Some("alice")).await;
    let r = anon.call(json!({"cmd": "send", "to": {"client": alice_id}, "data": 1})).await.unwrap();
    assert_eq!(r["delivered"], 1);
    // Off: an error saying so.
    let s = TestServer::start(config(&conf("[direct]\nenabled = false\n"))).await;
    let (mut a, _) = ws(&s, Some("alice")).await;
    assert_eq!(code(a.call(json!({"cmd": "send", "to": {"user": "alice"}, "data": 1})).await), "transport_disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_nodes_over_redis_a_message_reaches_the_other_node() {
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbdirect{}", fastrand::u64(..));
    let redis = format!("[broker]\nkind = \"redis\"\nredis_url = \"{url}\"\nredis_prefix = \"{prefix}\"\n");
    let a = TestServer::start(config(&conf(&redis))).await;
    let b = TestServer::start(config(&conf(&redis))).await;
    let (mut alice, _) = ws(&a, Some("alice")).await;
    let (mut bob, bob_id) = ws(&b, Some("bob")).await;
    // (Each node registers itself at start: wait until both are in the registry.)
    let mut registered = false;
    for _ in 0..600 {
        let (_, v) = a.get_json("/api/info").await;
        if v["nodes"].as_array().is_some_and(|n| n.len() >= 2) {
            registered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(registered, "the two nodes never both appeared in /api/info's nodes within 30 s");
    // The other node answers how many took it: the count is the cluster's.
    let r = alice.call(json!({"cmd": "send", "to": {"client": bob_id}, "data": "across"})).await.unwrap();
    assert_eq!(r, json!({"delivered": 1}));
    assert_eq!(direct(&mut bob).await["data"], "across");
    let r = alice.call(json!({"cmd": "send", "to": {"user": "bob"}, "data": "to the user"})).await.unwrap();
    assert_eq!(r, json!({"delivered": 1}));
    assert_eq!(direct(&mut bob).await["data"], "to the user");
    // A target on the sending node gets it once (the broadcast is not applied twice).
    let (mut alice2, alice2_id) = ws(&a, Some("alice")).await;
    let r = alice.call(json!({"cmd": "send", "to": {"client": alice2_id}, "data": 1})).await.unwrap();
    assert_eq!(r["delivered"], 1, "{r}");
    alice.call(json!({"cmd": "send", "to": {"client": alice2_id}, "data": 2})).await.unwrap();
    assert_eq!(direct(&mut alice2).await["data"], 1);
    assert_eq!(direct(&mut alice2).await["data"], 2);
    // No node has it: the explicit error, from a client and from the API.
    let r = alice.call(json!({"cmd": "send", "to": {"user": "nobody"}, "data": 1})).await;
    assert_eq!(code(r), "target_not_connected");
    let (status, v) = b.post_raw("/api/send", json!({"to": {"client": "gone"}, "data": 1}).to_string()).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("target_not_connected")), "{v}");
}

/// `GET /poll` with a client token.
async fn poll(s: &TestServer, query: &str, user: &str) -> Value {
    let (status, v) = s.get_json(&format!("/poll?{query}&token={}", token(user))).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// `POST /send` with a client token (and `client_key`, when given).
async fn http_send(s: &TestServer, user: &str, key: Option<&str>, body: Value) -> (u16, Value) {
    let key = key.map(|k| format!("&client_key={k}")).unwrap_or_default();
    s.post_raw(&format!("/send?token={}{key}", token(user)), body.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollers_take_direct_messages_from_a_mailbox_and_http_clients_send_them() {
    let s = TestServer::start(config(&conf("[poll]\nmailbox_idle_secs = 1\n"))).await;
    let (mut alice, alice_id) = ws(&s, Some("alice")).await;
    // A poll with `direct=1` opens a mailbox: a client id others send to, and the key
    // that proves the poller owns it. It may name no channel.
    let v = poll(&s, "direct=1", "bob").await;
    let (bob_id, key) = (v["client"].as_str().unwrap().to_string(), v["client_key"].as_str().unwrap().to_string());
    assert_eq!(v["direct"], json!([]));
    assert!(key.starts_with(&format!("{bob_id}.")) && key.len() > bob_id.len() + 16, "{key}");
    // Sent between two polls, kept for the next one, in order.
    for n in 1..=3 {
        let r = alice.call(json!({"cmd": "send", "to": {"client": bob_id}, "data": n})).await.unwrap();
        assert_eq!(r["delivered"], 1, "{r}");
    }
    let r = alice.call(json!({"cmd": "send", "to": {"user": "bob"}, "data": "to the user"})).await.unwrap();
    assert_eq!(r["delivered"], 1, "{r}");
    let v = poll(&s, &format!("client_key={key}&channel=news:p"), "bob").await;
    assert_eq!(v["client"], bob_id);
    let from = json!({"client": alice_id, "user": "alice"});
    let want: Vec<Value> = [json!(1), json!(2), json!(3), json!("to the user")]
        .into_iter()
        .map(|d| json!({"from": from, "data": d}))
        .collect();
    assert_eq!(v["direct"], json!(want), "{v}");
    assert_eq!(v["messages"], json!([]));
    // Taken once: the next poll has none.
    assert_eq!(poll(&s, &format!("client_key={key}"), "bob").await["direct"], json!([]));
    // A long poll returns with a direct message (sent while it waits, or just before).
    let waiting = {
        let url = s.url(&format!("/poll?client_key={key}&wait=30&token={}", token("bob")));
        tokio::spawn(async move { reqwest::get(url).await.unwrap().json::<Value>().await.unwrap() })
    };
    alice.call(json!({"cmd": "send", "to": {"client": bob_id}, "data": "wake up"})).await.unwrap();
    let v = waiting.await.unwrap();
    assert_eq!(v["direct"], json!([{"from": from, "data": "wake up"}]), "{v}");
    // The key is bob's alone: another user presenting it gets a mailbox of its own.
    let v = poll(&s, &format!("client_key={key}"), "mallory").await;
    assert_ne!(v["client"], bob_id);

    // The poller sends over HTTP, as its mailbox's client (proven by the key) …
    let (status, r) = http_send(&s, "bob", Some(&key), json!({"to": {"client": alice_id}, "data": "hi"})).await;
    assert_eq!((status, &r["delivered"]), (200, &json!(1)), "{r}");
    assert_eq!(direct(&mut alice).await, json!({"from": {"client": bob_id, "user": "bob"}, "data": "hi"}));
    // … or as its user alone, without a key.
    let (status, _) = http_send(&s, "bob", None, json!({"to": {"user": "alice"}, "data": "no key"})).await;
    assert_eq!(status, 200);
    assert_eq!(direct(&mut alice).await["from"], json!({"client": null, "user": "bob"}));
    // A key that is not the sender's is refused; so is a malformed target.
    let (status, r) = http_send(&s, "mallory", Some(&key), json!({"to": {"user": "alice"}, "data": 1})).await;
    assert_eq!((status, r["error"]["code"].as_str()), (403, Some("permission_denied")), "{r}");
    let (status, r) = http_send(&s, "bob", None, json!({"to": {"user": "a", "client": "b"}, "data": 1})).await;
    assert_eq!((status, r["error"]["code"].as_str()), (400, Some("invalid_request")), "{r}");
    let (status, r) = http_send(&s, "bob", None, json!({"to": {"user": "nobody"}, "data": 1})).await;
    assert_eq!((status, r["error"]["code"].as_str()), (404, Some("target_not_connected")), "{r}");
    // An SSE client sends with the key from its `subscribed` event.
    let mut sse = common::Sse::connect(&s, &format!("channel=news:x&token={}", token("erin")), None).await;
    let subscribed: Value = serde_json::from_str(&sse.next_named("subscribed").await.data).unwrap();
    let (erin_id, erin_key) = (subscribed["client"].as_str().unwrap(), subscribed["client_key"].as_str().unwrap());
    let (status, _) = http_send(&s, "erin", Some(erin_key), json!({"to": {"client": alice_id}, "data": 5})).await;
    assert_eq!(status, 200);
    assert_eq!(direct(&mut alice).await["from"], json!({"client": erin_id, "user": "erin"}));

    // A mailbox nobody polls is closed (`mailbox_idle_secs`): senders are told.
    let mut closed = false;
    for _ in 0..300 {
        let r = alice.call(json!({"cmd": "send", "to": {"client": bob_id}, "data": 0})).await;
        if matches!(&r, Err(ClientError::Server(e)) if e.code == "target_not_connected") {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(closed, "the idle mailbox was still open 30 s after its last poll");
    // The poller's next poll with the old key opens a new mailbox (a new id, as after a reconnect).
    let v = poll(&s, &format!("client_key={key}"), "bob").await;
    assert!(v["client"].is_string() && v["client"] != bob_id, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_clients_take_direct_messages_on_dollar_direct_and_send_them_to_dollar_direct_topics() {
    use common::mqtt::{packet, Mqtt};
    let s = TestServer::start(config(&conf("[mqtt]\nlisten = \"127.0.0.1:0\"\n"))).await;
    let addr = s.mqtt.unwrap();
    let (mut alice, alice_id) = ws(&s, Some("alice")).await;
    // Each version subscribes to `$direct` (granted QoS 0) and is addressed as
    // `mqtt:<its client identifier>`.
    let mut v5 = Mqtt::connect(addr, true, "dev5", Some(&token("bob"))).await.unwrap();
    let mut v311 = Mqtt::connect(addr, false, "dev311", Some(&token("bob"))).await.unwrap();
    for c in [&mut v5, &mut v311] {
        assert_eq!(c.subscribe("$direct", None).await.0, 0);
    }
    let from_alice = json!({"client": alice_id, "user": "alice"});
    for (c, id) in [(&mut v5, "mqtt:dev5"), (&mut v311, "mqtt:dev311")] {
        let r = alice.call(json!({"cmd": "send", "to": {"client": id}, "data": {"to": id}})).await.unwrap();
        assert_eq!(r["delivered"], 1, "{r}");
        let (topic, payload, _) = c.next_publish().await.unwrap();
        assert_eq!(topic, "$direct");
        let m: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(m, json!({"from": from_alice, "data": {"to": id}}));
    }
    // To the user: both of bob's MQTT connections.
    let r = alice.call(json!({"cmd": "send", "to": {"user": "bob"}, "data": "both"})).await.unwrap();
    assert_eq!(r["delivered"], 2, "{r}");
    for c in [&mut v5, &mut v311] {
        let (_, payload, _) = c.next_publish().await.unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap()["data"], "both");
    }
    // A device sends with a PUBLISH to `$direct/client/{id}` or `$direct/user/{user}`
    // (JSON payloads as JSON, text as a string, as for publications).
    let (ack, why) = v5.publish(&format!("$direct/client/{alice_id}"), b"{\"t\":21.5}", 1, None).await.unwrap();
    assert_eq!(ack, 0, "{why}");
    assert_eq!(direct(&mut alice).await, json!({"from": {"client": "mqtt:dev5", "user": "bob"}, "data": {"t": 21.5}}));
    assert_eq!(v311.publish("$direct/user/alice", b"hello", 1, None).await.unwrap().0, 0);
    assert_eq!(direct(&mut alice).await["data"], "hello");
    // Nobody there: MQTT 5's "No matching subscribers" (0x10); a malformed target: 0x90.
    assert_eq!(v5.publish("$direct/client/nobody", b"1", 1, None).await.unwrap().0, 0x10);
    let (ack, why) = v5.publish("$direct/somewhere", b"1", 1, None).await.unwrap();
    assert_eq!((ack, why.split(':').next().unwrap()), (0x90, "invalid_channel"), "{why}");
    // UNSUBSCRIBE `$direct`: no longer addressable.
    v5.send(&packet(0xA2, &[&[0, 9, 0, 0, 7][..], b"$direct"].concat())).await;
    let (kind, body) = v5.read().await.unwrap();
    assert_eq!((kind >> 4, body[3]), (11, 0), "UNSUBACK with success");
    let r = alice.call(json!({"cmd": "send", "to": {"client": "mqtt:dev5"}, "data": 1})).await;
    assert_eq!(code(r), "target_not_connected");

    // And mosquitto_sub, a real client, receives one on `$direct`.
    let port = addr.port().to_string();
    let mut sub = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-i", "real", "-t", "$direct", "-C", "1", "-W", "60"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (Debian: mosquitto-clients; ./scripts/test installs it)");
    // Sent once it has subscribed (until then: not connected).
    let mut delivered = false;
    for _ in 0..600 {
        let r = alice.call(json!({"cmd": "send", "to": {"client": "mqtt:real"}, "data": {"hi": "mosquitto"}})).await;
        if r.is_ok() {
            delivered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(delivered, "mosquitto_sub never subscribed to $direct within 30 s");
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(sub.stdout.as_mut().unwrap(), &mut out).await.unwrap();
        out
    })
    .await
    .expect("mosquitto_sub printed the message");
    let m: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(m, json!({"from": from_alice, "data": {"hi": "mosquitto"}}));
}
