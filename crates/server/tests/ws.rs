//! The WebSocket transport: the delivery guarantees, the protocol, heartbeats, slow
//! consumers and bad input — with our own client and raw frames.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{channel, config, TestServer};
use serde_json::{json, Value};
use switchboard_client::ws::encode_frame;
use switchboard_client::{ClientError, ConnectOptions, Connection, Message, WsStream};

fn ws_url(s: &TestServer, query: &str) -> String {
    format!("ws://{}/ws{query}", s.addr)
}

async fn connect(s: &TestServer) -> Connection {
    Connection::connect(&ws_url(s, "")).await.unwrap()
}

async fn pubs(c: &mut Connection, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let p =
            tokio::time::timeout(Duration::from_secs(20), c.next_pub()).await.expect("publication in time").unwrap();
        out.push(p["offset"].as_u64().unwrap());
    }
    out
}

/// Reads until the server closes; returns the close code.
async fn close_code(ws: &mut WsStream) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.recv()).await.expect("close in time") {
            Ok(Message::Close(code, _)) => return code,
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

#[tokio::test]
async fn delivers_in_order_without_duplicates() {
    let s = TestServer::start(config("")).await;
    let ch = channel("ws");
    let mut c = connect(&s).await;
    let ok = c.subscribe(&ch, None).await.unwrap();
    assert_eq!((ok["offset"].as_u64(), ok["recovered"].as_bool()), (Some(0), Some(true)));
    for i in 1..=200 {
        s.publish(&ch, json!({"i": i})).await;
    }
    assert_eq!(pubs(&mut c, 200).await, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn resubscribe_since_replays_exactly_the_missed_then_goes_live() {
    let s = TestServer::start(config("")).await;
    let ch = channel("ws");
    let mut c = connect(&s).await;
    c.subscribe(&ch, None).await.unwrap();
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    s.publish(&ch, json!(2)).await;
    assert_eq!(pubs(&mut c, 2).await, vec![1, 2]);
    drop(c);
    for i in 3..=6 {
        s.publish(&ch, json!(i)).await;
    }
    let mut c = connect(&s).await;
    let ok = c.subscribe(&ch, Some(&format!("{epoch}:2"))).await.unwrap();
    assert_eq!(ok["recovered"], true);
    assert_eq!(ok["replayed"], 4);
    s.publish(&ch, json!(7)).await;
    assert_eq!(pubs(&mut c, 5).await, vec![3, 4, 5, 6, 7]);
}

#[tokio::test]
async fn lost_positions_answer_not_recovered_with_the_current_position() {
    let s = TestServer::start(config("[namespaces.tiny]\nhistory_size = 2\n")).await;
    let ch = channel("tiny");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    for i in 2..=6 {
        s.publish(&ch, json!(i)).await;
    }
    let mut c = connect(&s).await;
    let ok = c.subscribe(&ch, Some(&format!("{epoch}:1"))).await.unwrap();
    assert_eq!((ok["recovered"].as_bool(), ok["offset"].as_u64()), (Some(false), Some(6)));
    let other = channel("tiny");
    s.publish(&other, json!(1)).await;
    let ok = c.subscribe(&other, Some("anotherepoch:1")).await.unwrap();
    assert_eq!((ok["recovered"].as_bool(), ok["offset"].as_u64()), (Some(false), Some(1)));
    s.publish(&ch, json!(7)).await;
    assert_eq!(pubs(&mut c, 1).await, vec![7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_racing_a_subscribe_are_delivered_once() {
    let s = TestServer::start(config("[defaults]\nhistory_size = 1000\n")).await;
    for round in 0..5 {
        let ch = channel("race");
        let (epoch, _) = s.publish(&ch, json!(0)).await;
        let publisher = {
            let (http, url, ch) = (s.http.clone(), s.url("/api/publish"), ch.clone());
            tokio::spawn(async move {
                for i in 1..=150 {
                    http.post(&url).json(&json!({"channel": ch, "data": i})).send().await.unwrap();
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(3 * round)).await;
        let mut c = connect(&s).await;
        c.subscribe(&ch, Some(&format!("{epoch}:1"))).await.unwrap();
        publisher.await.unwrap();
        assert_eq!(pubs(&mut c, 150).await, (2..=151).collect::<Vec<_>>(), "round {round}");
    }
}

#[tokio::test]
async fn url_channels_subscribe_at_connect_for_zero_library_clients() {
    let s = TestServer::start(config("")).await;
    let (a, b) = (channel("url"), channel("url"));
    let mut c = Connection::connect_with(
        &ws_url(&s, &format!("?channel={a}&channel={b}")),
        ConnectOptions { subprotocol: false, ..Default::default() },
    )
    .await
    .unwrap();
    assert!(c.ws.response_headers.iter().all(|(k, _)| k != "sec-websocket-protocol"));
    for _ in 0..2 {
        let v = c.next_push().await.unwrap();
        assert_eq!(v["subscribed"]["offset"], 0, "{v}");
    }
    let (ea, _) = s.publish(&a, json!("x")).await;
    s.publish(&b, json!("y")).await;
    let p = c.next_pub().await.unwrap();
    assert_eq!((p["channel"].as_str(), p["data"].as_str()), (Some(a.as_str()), Some("x")));
    let p = c.next_pub().await.unwrap();
    assert_eq!((p["channel"].as_str(), p["data"].as_str()), (Some(b.as_str()), Some("y")));
    drop(c);
    // Resume by URL too.
    s.publish(&a, json!("z")).await;
    let (eb, ob) = s.publish(&b, json!("w")).await;
    let q = format!("?channel={a}&channel={b}&since={ea}:1,{eb}:{}", ob - 1);
    let mut c = Connection::connect(&ws_url(&s, &q)).await.unwrap();
    let mut got = vec![];
    for _ in 0..2 {
        got.push(c.next_pub().await.unwrap()["data"].as_str().unwrap().to_string());
    }
    got.sort();
    assert_eq!(got, vec!["w", "z"]);
}

#[tokio::test]
async fn commands_reply_with_their_id_and_documented_errors() {
    let s = TestServer::start(config(
        "[namespaces.chat]\nallow_publish = true\n[namespaces.live]\nhistory_size = 0\n[namespaces.priv]\nrequire_token = true\n",
    ))
    .await;
    let mut c = connect(&s).await;
    let hello = c.call(json!({"cmd": "connect", "client": {"name": "test"}})).await.unwrap();
    assert_eq!(hello["version"], "v1");
    assert_eq!(c.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
    let ch = channel("chat");
    c.subscribe(&ch, None).await.unwrap();
    let pos = c.publish(&ch, json!({"text": "hi"})).await.unwrap();
    assert_eq!(pos["offset"], 1);
    assert_eq!(c.next_pub().await.unwrap()["data"]["text"], "hi");
    let h = c.call(json!({"cmd": "history", "channel": ch})).await.unwrap();
    assert_eq!(h["publications"][0]["offset"], 1);

    let err = |r: Result<Value, ClientError>| match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    };
    assert_eq!(err(c.subscribe(&ch, None).await), "already_subscribed");
    assert_eq!(err(c.call(json!({"cmd": "unsubscribe", "channel": "chat:other"})).await), "not_subscribed");
    assert_eq!(err(c.subscribe("bad name", None).await), "invalid_channel");
    assert_eq!(err(c.subscribe("chat:x", Some("garbage")).await), "bad_cursor");
    assert_eq!(err(c.subscribe("priv:x", None).await), "token_required");
    assert_eq!(err(c.publish("news:1", json!(1)).await), "publish_not_allowed");
    assert_eq!(err(c.call(json!({"cmd": "history", "channel": "live:1"})).await), "history_disabled");
    assert_eq!(err(c.call(json!({"cmd": "presence", "channel": "chat:1"})).await), "presence_disabled");
    assert_eq!(err(c.call(json!({"cmd": "fly"})).await), "unknown_command");
    assert_eq!(err(c.call(json!({"cmd": "subscribe"})).await), "invalid_request");
    assert_eq!(err(c.call(json!({"cmd": "subscribe", "channel": 5})).await), "invalid_request");
    assert_eq!(err(c.publish(&ch, json!("x".repeat(66_000))).await), "message_too_large");
    assert_eq!(c.call(json!({"cmd": "unsubscribe", "channel": ch})).await.unwrap(), json!({}));
    // Not JSON at all: an error with a null id, and the connection stays usable.
    c.ws.send_text("{oops").await.unwrap();
    let v = c.next_push().await.unwrap();
    assert_eq!((v["id"].clone(), v["error"]["code"].as_str()), (Value::Null, Some("invalid_json")));
    assert_eq!(c.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
}

/// Each malformed input gets its RFC close code, and a bystander on the same channel is
/// unaffected.
#[tokio::test]
async fn protocol_violations_get_their_close_codes_and_hurt_nobody_else() {
    let s = TestServer::start(config("[limits]\nmax_message_bytes = 1000\n")).await;
    let ch = channel("bystander");
    let mut bystander = connect(&s).await;
    bystander.subscribe(&ch, None).await.unwrap();
    let masked = |fin: bool, rsv1: bool, op: u8, p: &[u8]| encode_frame(fin, rsv1, op, p, true);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", encode_frame(true, false, 1, b"{}", false), 1002),
        ("binary frame", masked(true, false, 2, b"{}"), 1003),
        ("invalid UTF-8", masked(true, false, 1, &[0xC3, 0x28]), 1007),
        ("oversize message", masked(true, false, 1, &vec![b' '; 6000]), 1009),
        ("fragmented ping", masked(false, false, 9, b""), 1002),
        ("oversize ping", masked(true, false, 9, &[0; 126]), 1002),
        ("reserved opcode", masked(true, false, 3, b""), 1002),
        ("RSV1 without deflate", masked(true, true, 1, b"{}"), 1002),
        ("lone continuation", masked(true, false, 0, b"{}"), 1002),
        ("bad close code", masked(true, false, 8, &[0x03, 0xED]), 1002),
        ("interleaved messages", [masked(false, false, 1, b"{"), masked(true, false, 1, b"}")].concat(), 1002),
    ];
    for (name, bytes, code) in cases {
        let mut ws = WsStream::connect(&ws_url(&s, ""), ConnectOptions::default()).await.unwrap();
        ws.send_raw(&bytes).await.unwrap();
        assert_eq!(close_code(&mut ws).await, Some(code), "{name}");
    }
    s.publish(&ch, json!("still here")).await;
    assert_eq!(bystander.next_pub().await.unwrap()["data"], "still here");
}

#[tokio::test]
async fn fragmented_messages_and_pings_are_handled() {
    let s = TestServer::start(config("")).await;
    let mut ws = WsStream::connect(&ws_url(&s, ""), ConnectOptions::default()).await.unwrap();
    ws.send_frame(false, false, 1, br#"{"id":1,"#).await.unwrap();
    ws.send_frame(true, false, 9, b"hey").await.unwrap();
    ws.send_frame(true, false, 0, br#""cmd":"ping"}"#).await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Pong(b"hey".to_vec()));
    assert_eq!(ws.recv().await.unwrap(), Message::Text(r#"{"id":1,"ok":{}}"#.into()));
    ws.send_close(1000, "bye").await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1000));
}

#[tokio::test]
async fn handshake_errors_are_plain_http() {
    let s = TestServer::start(config("")).await;
    let r = s.http.get(s.url("/ws")).send().await.unwrap();
    assert_eq!(r.status(), 426);
    assert_eq!(r.headers()["sec-websocket-version"], "13");
    match WsStream::connect(&ws_url(&s, "?channel=bad%20name"), ConnectOptions::default()).await {
        Err(switchboard_client::WsError::Refused { status, body }) => {
            assert_eq!(status, 400);
            assert!(body.contains("invalid_channel"), "{body}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let r = s
        .http
        .get(s.url("/ws"))
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 426);
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed() {
    let s = TestServer::start(config("[ws]\nping_interval_secs = 1\n")).await;
    let mut ws = WsStream::connect(&ws_url(&s, ""), ConnectOptions::default()).await.unwrap();
    // Read (and see the pings) but never answer.
    let mut pings = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.recv()).await.expect("closed in time").unwrap() {
            Message::Ping(_) => pings += 1,
            Message::Close(code, _) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, Some(4001));
    assert!(pings >= 2, "closed after {pings} pings");
    // A client that answers stays connected across the same span.
    let mut c = connect(&s).await;
    for _ in 0..4 {
        c.call(json!({"cmd": "ping"})).await.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        // next_push answers server pings while waiting
        let _ = tokio::time::timeout(Duration::from_millis(100), c.next_push()).await;
    }
    assert_eq!(c.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_while_a_hundred_fast_ones_get_everything() {
    // The slow client's queue is 64 KiB (the default here). The fast ones also join a
    // channel in `roomy`, whose 64 MiB bound becomes their connection's: they can fall
    // behind by the whole burst — a busy machine may starve their readers for a while —
    // and still never be closed. Only the one client that never reads can overflow.
    let s = TestServer::start(config(
        "[defaults]\nqueue_max_bytes = 65536\nhistory_size = 1000\n\
         [namespaces.roomy]\nqueue_max_bytes = 67108864\n[ws]\nsend_buffer_bytes = 8192\n",
    ))
    .await;
    let ch = channel("slow");
    let mut slow =
        Connection::connect_with(&ws_url(&s, ""), ConnectOptions { recv_buffer: Some(4096), ..Default::default() })
            .await
            .unwrap();
    slow.subscribe(&ch, None).await.unwrap();
    let mut fast = Vec::new();
    for _ in 0..100 {
        let mut c = connect(&s).await;
        c.subscribe(&channel("roomy"), None).await.unwrap();
        c.subscribe(&ch, None).await.unwrap();
        fast.push(c);
    }
    let readers: Vec<_> = fast.into_iter().map(|mut c| tokio::spawn(async move { pubs(&mut c, 300).await })).collect();
    // ~300 KB per subscriber: far over the slow client's 64 KiB queue and socket buffers.
    let payload = "x".repeat(1000);
    for _ in 0..300 {
        s.publish(&ch, json!(payload)).await;
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), (1..=300).collect::<Vec<_>>());
    }
    assert_eq!(s.state.hub.stats.queues.slow_consumer_closes.load(Ordering::Relaxed), 1, "only the slow client");
    // The slow client reads at last: some publications in order, then the 4000 close
    // with a disconnect push telling it to resume...
    let mut last = 0;
    let code = loop {
        match slow.next_push().await {
            Ok(v) if v.get("pub").is_some() => {
                let o = v["pub"]["offset"].as_u64().unwrap();
                assert_eq!(o, last + 1);
                last = o;
            }
            Ok(v) if v.get("disconnect").is_some() => {
                assert_eq!(v["disconnect"]["reason"], "slow_consumer");
                assert_eq!(v["disconnect"]["reconnect"], true);
            }
            Ok(v) => panic!("unexpected push {v}"),
            Err(ClientError::Closed(code)) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, Some(4000));
    assert!(last < 300, "the slow client was not slow");
    // ...and resuming loses nothing.
    let epoch =
        s.get_json(&format!("/api/history?channel={ch}&limit=1")).await.1["epoch"].as_str().unwrap().to_string();
    let mut again = connect(&s).await;
    let ok = again.subscribe(&ch, Some(&format!("{epoch}:{last}"))).await.unwrap();
    assert_eq!(ok["recovered"], true);
    assert_eq!(pubs(&mut again, 300 - last as usize).await, ((last + 1)..=300).collect::<Vec<_>>());
}

#[tokio::test]
async fn deflate_is_negotiated_and_publications_arrive_compressed() {
    let s = TestServer::start(config("")).await;
    let ch = channel("z");
    let mut ws = WsStream::connect(
        &ws_url(&s, &format!("?channel={ch}")),
        ConnectOptions { deflate: true, ..Default::default() },
    )
    .await
    .unwrap();
    assert!(ws.deflate);
    let ext = ws.response_headers.iter().find(|(k, _)| k == "sec-websocket-extensions").unwrap().1.clone();
    assert!(ext.contains("server_no_context_takeover") && ext.contains("client_no_context_takeover"), "{ext}");
    let _subscribed = ws.recv().await.unwrap();
    let text = "hello ".repeat(200);
    s.publish(&ch, json!(text)).await;
    let (fin, rsv1, op, payload) = ws.recv_frame().await.unwrap();
    assert!(fin && rsv1 && op == 1, "publication not compressed");
    assert!(payload.len() < text.len() / 4);
    // A compressed command is understood too.
    let z = {
        use flate2::{Compress, Compression, FlushCompress};
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(256);
        c.compress_vec(br#"{"id":9,"cmd":"ping"}"#, &mut out, FlushCompress::Sync).unwrap();
        out.truncate(out.len() - 4);
        out
    };
    ws.send_frame(true, true, 1, &z).await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Text(r#"{"id":9,"ok":{}}"#.into()));
}

/// A WebSocket with nothing to do is parked: no task of its own; its socket, queue and
/// timer hold the waker that starts one (`switchboard_parked_connections`). Parked, a
/// connection still gets every publication in order, answers commands, is seen leaving
/// when it closes, and is told to go away at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_wake_for_everything_they_wait_on() {
    let s = TestServer::start(config("")).await;
    let ch = channel("ws");
    let (mut a, mut b) = (connect(&s).await, connect(&s).await);
    a.subscribe(&ch, None).await.unwrap();
    b.subscribe(&ch, None).await.unwrap();
    s.parked("ws", 2).await;
    for i in 1..=3 {
        s.publish(&ch, json!({"i": i})).await;
    }
    assert_eq!(pubs(&mut a, 3).await, vec![1, 2, 3]);
    assert_eq!(pubs(&mut b, 3).await, vec![1, 2, 3]);
    s.parked("ws", 2).await;
    // (The publications were written from the fan-out: neither woke.)
    assert_eq!(a.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
    drop(b);
    let mut left = false;
    for _ in 0..400 {
        let (_, v) = s.get_json("/api/channels?scope=node").await;
        let subscribers = v["channels"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["channel"] == ch.as_str()).and_then(|c| c["subscribers"].as_u64()));
        if subscribers == Some(1) {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(left, "the closed connection left the channel");
    let stop = tokio::spawn(s.shutdown());
    let code = loop {
        match a.next_push().await {
            Ok(_) => {}
            Err(ClientError::Closed(code)) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, Some(1001));
    stop.await.unwrap();
}

#[tokio::test]
async fn shutdown_sends_going_away_with_reconnect_advice() {
    let s = TestServer::start(config("")).await;
    let mut c = connect(&s).await;
    c.subscribe(&channel("bye"), None).await.unwrap();
    let stop = tokio::spawn(s.shutdown());
    let mut advice = None;
    let code = loop {
        match c.next_push().await {
            Ok(v) if v.get("disconnect").is_some() => advice = Some(v["disconnect"].clone()),
            Ok(_) => {}
            Err(ClientError::Closed(code)) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, Some(1001));
    let advice = advice.expect("disconnect push before the close");
    assert_eq!((advice["reason"].as_str(), advice["reconnect"].as_bool()), (Some("shutdown"), Some(true)));
    assert!(advice["retry_ms"].as_u64().unwrap() > 0);
    stop.await.unwrap();
}

#[tokio::test]
async fn a_command_flood_is_rate_limited_then_closed() {
    let s = TestServer::start(config("[ws]\nmax_commands_per_sec = 5\n")).await;
    let mut ws = WsStream::connect(&ws_url(&s, ""), ConnectOptions::default()).await.unwrap();
    for i in 0..100 {
        // The server may close before the flood ends; later writes may fail.
        if ws.send_text(&format!(r#"{{"id":{i},"cmd":"ping"}}"#)).await.is_err() {
            break;
        }
    }
    let mut limited = 0;
    let code = loop {
        match ws.recv().await.unwrap() {
            Message::Text(t) if t.contains("rate_limited") => limited += 1,
            Message::Text(_) => {}
            Message::Close(code, _) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(limited > 0);
    assert_eq!(code, Some(1008));
}

#[tokio::test]
async fn rewind_replays_the_last_n_and_namespaces_can_send_the_latest_on_subscribe() {
    let s = TestServer::start(config("[namespaces.ticker]\nrewind_on_subscribe = 1\nhistory_size = 5\n")).await;
    let ch = channel("news");
    for i in 1..=6 {
        s.publish(&ch, json!(i)).await;
    }
    let mut c = connect(&s).await;
    let ok = c.call(json!({"cmd": "subscribe", "channel": ch, "rewind": 2})).await.unwrap();
    assert_eq!((ok["offset"].as_u64(), ok["replayed"].as_u64()), (Some(4), Some(2)));
    assert_eq!(pubs(&mut c, 2).await, vec![5, 6]);
    let err = c.call(json!({"cmd": "subscribe", "channel": channel("ticker"), "rewind": 6})).await;
    assert!(matches!(err, Err(ClientError::Server(ref e)) if e.code == "bad_rewind"), "{err:?}");
    let t = channel("ticker");
    s.publish(&t, json!({"price": 1})).await;
    s.publish(&t, json!({"price": 2})).await;
    c.subscribe(&t, None).await.unwrap();
    let p = c.next_pub().await.unwrap();
    assert_eq!(p["data"]["price"], 2, "the latest price on subscribe");
}

#[tokio::test]
async fn a_namespace_can_turn_compression_off() {
    let s = TestServer::start(config("[namespaces.raw]\ndeflate = false\n")).await;
    let (zipped, raw) = (channel("z"), channel("raw"));
    let mut ws = WsStream::connect(
        &ws_url(&s, &format!("?channel={zipped}&channel={raw}")),
        ConnectOptions { deflate: true, ..Default::default() },
    )
    .await
    .unwrap();
    assert!(ws.deflate);
    let _ = ws.recv().await.unwrap();
    let _ = ws.recv().await.unwrap();
    let text = "compressible ".repeat(100);
    s.publish(&raw, json!(text)).await;
    s.publish(&zipped, json!(text)).await;
    let (_, rsv1_raw, _, _) = ws.recv_frame().await.unwrap();
    let (_, rsv1_zipped, _, _) = ws.recv_frame().await.unwrap();
    assert!(!rsv1_raw, "deflate = false namespace was compressed");
    assert!(rsv1_zipped);
}

#[tokio::test]
async fn the_conformance_echo_endpoint_echoes_text_and_binary_under_dev_only() {
    let s = TestServer::start(config("")).await;
    let mut ws = WsStream::connect(&ws_url(&s, "/echo"), ConnectOptions { subprotocol: false, ..Default::default() })
        .await
        .unwrap();
    ws.send_text("hello").await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Text("hello".into()));
    ws.send_frame(true, false, 2, &[0, 1, 2, 255]).await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Binary(vec![0, 1, 2, 255]));
    ws.send_close(1000, "").await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1000));
    let key = "k-0123456789abcdefgh";
    let prod = TestServer::start_with(config(&format!("[api]\nkeys = [\"{key}\"]\n")), false).await;
    match WsStream::connect(&ws_url(&prod, "/echo"), ConnectOptions::default()).await {
        Err(switchboard_client::WsError::Refused { status, .. }) => assert_eq!(status, 404),
        other => panic!("echo endpoint served without --dev: {:?}", other.map(|_| ())),
    }
}
