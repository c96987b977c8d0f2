//! Tokens, per-channel authorization, expiry and revocation, origins and connection
//! limits — every bad input gets its documented code and hurts nobody else.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{channel, config, Sse, TestServer};
use serde_json::{json, Value};
use switchboard_client::{ClientError, ConnectOptions, Connection, Message, WsStream};
use switchboard_server::auth::{sign, unix_now, Claims};

const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// One hour, in milliseconds: how far tests move a server's clock.
const HOUR_MS: i64 = 3_600_000;

fn claims(user: &str, ttl: i64) -> Claims {
    Claims { sub: user.into(), exp: (unix_now() as i64 + ttl) as u64, ..Default::default() }
}

fn hs(c: &Claims) -> String {
    sign("HS256", SECRET, c).unwrap()
}

fn keys(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

const NAMESPACES: &str = r#"
[namespaces.secure]
require_token = true
allow_publish = true
[namespaces.user]
user_limited = true
[namespaces.vip]
private = true
"#;

fn hs_config(extra: &str) -> String {
    format!("[auth]\nalgorithm = \"HS256\"\nhmac_secret = \"{SECRET}\"\nrefresh_grace_secs = 1\nleeway_secs = 0\n{NAMESPACES}{extra}")
}

fn ws_url(s: &TestServer) -> String {
    format!("ws://{}/ws", s.addr)
}

fn code(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Connects and sends `connect` with `token`; returns the error code and the close code.
async fn connect_refused(s: &TestServer, token: &str) -> (String, Option<u16>) {
    let mut c = Connection::connect(&ws_url(s)).await.unwrap();
    let e = code(c.call(json!({"cmd": "connect", "token": token})).await);
    let close = loop {
        match c.ws.recv().await {
            Ok(Message::Close(code, _)) => break code,
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    (e, close)
}

#[tokio::test]
async fn a_valid_token_authenticates_websocket_sse_and_poll() {
    let s = TestServer::start(config(&hs_config(""))).await;
    let t = hs(&claims("alice", 600));
    let mut c = Connection::connect(&ws_url(&s)).await.unwrap();
    let hello = c.call(json!({"cmd": "connect", "token": t})).await.unwrap();
    assert_eq!(hello["user"], "alice");
    assert!(hello["expires_in_ms"].as_u64().unwrap() > 500_000);
    let ch = channel("secure");
    c.subscribe(&ch, None).await.unwrap();
    c.publish(&ch, json!("hi")).await.unwrap();
    assert_eq!(c.next_pub().await.unwrap()["data"], "hi");

    let mut sse = Sse::connect(&s, &format!("channel={ch}&token={t}"), None).await;
    sse.next_named("subscribed").await;
    let r = s.http.get(s.url(&format!("/sse?channel={ch}"))).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (st, _) = s.get_json(&format!("/poll?channel={ch}&token={t}")).await;
    assert_eq!(st, 200);
    // Anonymous: refused where a token is required.
    let (st, v) = s.get_json(&format!("/poll?channel={ch}")).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (401, "token_required"));
    let mut anon = Connection::connect(&ws_url(&s)).await.unwrap();
    assert_eq!(code(anon.subscribe(&ch, None).await), "token_required");
}

#[tokio::test]
async fn bad_connection_tokens_get_their_codes() {
    let s = TestServer::start(config(&hs_config(""))).await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let payload = json!({"sub": "mallory", "exp": unix_now() + 600});
    let alg_none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&payload));
    let other_key = sign("HS256", "another-secret-0123456789abcdef0123", &claims("mallory", 600)).unwrap();
    let no_sub = sign("HS256", SECRET, &json!({"exp": unix_now() + 600})).unwrap();
    let cases = [
        ("expired", hs(&claims("alice", -60)), "token_expired", 4101),
        ("another key", other_key, "token_invalid", 4100),
        ("alg none", alg_none, "token_invalid", 4100),
        ("malformed", "not.a.jwt".to_string(), "token_invalid", 4100),
        ("garbage", "%%%".to_string(), "token_invalid", 4100),
        ("missing sub", no_sub, "token_invalid", 4100),
    ];
    for (name, token, want_code, want_close) in cases {
        let (e, close) = connect_refused(&s, &token).await;
        assert_eq!((e.as_str(), close), (want_code, Some(want_close)), "{name}");
        let (st, v) = s.get_json(&format!("/poll?channel=a&token={token}")).await;
        assert_eq!((st, v["error"]["code"].as_str().unwrap()), (401, want_code), "{name} over poll");
    }
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_and_alg_confusion_is_refused() {
    for (alg, private, public) in
        [("RS256", "rs256-private.pem", "rs256-public.pem"), ("ES256", "es256-private.pem", "es256-public.pem")]
    {
        let pem = keys(public);
        let cfg = format!("[auth]\nalgorithm = \"{alg}\"\npublic_key_pem = '''\n{pem}'''\n");
        let s = TestServer::start(config(&cfg)).await;
        let good = sign(alg, &keys(private), &claims("carol", 600)).unwrap();
        let mut c = Connection::connect(&ws_url(&s)).await.unwrap();
        assert_eq!(c.call(json!({"cmd": "connect", "token": good})).await.unwrap()["user"], "carol", "{alg}");
        // Alg confusion: an HS256 token "signed" with the public key as the HMAC secret.
        let forged = sign("HS256", &pem, &claims("mallory", 600)).unwrap();
        let (e, close) = connect_refused(&s, &forged).await;
        assert_eq!((e.as_str(), close), ("token_invalid", Some(4100)), "{alg} alg confusion");
    }
}

#[tokio::test]
async fn channel_claims_user_channels_and_private_channels_are_enforced() {
    let s = TestServer::start(config(&hs_config(""))).await;
    let mut limited = claims("alice", 600);
    limited.channels = Some(vec!["secure:room*".into(), "user:alice".into(), "vip:lounge".into()]);
    let t = hs(&limited);
    let mut c = Connection::connect(&ws_url(&s)).await.unwrap();
    c.call(json!({"cmd": "connect", "token": t})).await.unwrap();
    c.subscribe("secure:room1", None).await.unwrap();
    assert_eq!(code(c.subscribe("secure:other", None).await), "permission_denied");
    c.subscribe("user:alice", None).await.unwrap();
    assert_eq!(code(c.subscribe("user:bob", None).await), "permission_denied");
    assert_eq!(code(c.publish("user:alice", json!(1)).await), "publish_not_allowed");

    // Private channel: a subscription token for exactly this channel and user.
    assert_eq!(code(c.subscribe("vip:lounge", None).await), "subscription_token_required");
    let mut wrong_channel = claims("alice", 600);
    wrong_channel.channel = Some("vip:kitchen".into());
    let r = c.call(json!({"cmd": "subscribe", "channel": "vip:lounge", "token": hs(&wrong_channel)})).await;
    assert_eq!(code(r), "subscription_token_invalid");
    let mut wrong_user = claims("bob", 600);
    wrong_user.channel = Some("vip:lounge".into());
    let r = c.call(json!({"cmd": "subscribe", "channel": "vip:lounge", "token": hs(&wrong_user)})).await;
    assert_eq!(code(r), "subscription_token_invalid");
    let mut expired = claims("alice", -60);
    expired.channel = Some("vip:lounge".into());
    let r = c.call(json!({"cmd": "subscribe", "channel": "vip:lounge", "token": hs(&expired)})).await;
    assert_eq!(code(r), "token_expired");
    let mut forged = claims("alice", 600);
    forged.channel = Some("vip:lounge".into());
    let forged = sign("HS256", "another-secret-0123456789abcdef0123", &forged).unwrap();
    let r = c.call(json!({"cmd": "subscribe", "channel": "vip:lounge", "token": forged})).await;
    assert_eq!(code(r), "subscription_token_invalid");
    let mut good = claims("alice", 600);
    good.channel = Some("vip:lounge".into());
    c.call(json!({"cmd": "subscribe", "channel": "vip:lounge", "token": hs(&good)})).await.unwrap();
    // The same rules over SSE.
    let (st, v) = s.get_json(&format!("/poll?channel=vip:lounge&token={t}")).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (403, "subscription_token_required"));
    let (st, _) = s.get_json(&format!("/poll?channel=vip:lounge&token={t}&sub_token={}", hs(&good))).await;
    assert_eq!(st, 200);
    let r = s.http.get(s.url(&format!("/sse?channel=user:bob&token={t}"))).send().await.unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn an_expired_websocket_must_refresh_or_is_closed() {
    let s = TestServer::start(config(&hs_config(""))).await;
    // The server's clock runs an hour behind while the clients connect, so no scheduling
    // stall can expire their one-second tokens before the server has accepted them...
    s.state.clock.shift(-HOUR_MS);
    let mut good = Connection::connect(&ws_url(&s)).await.unwrap();
    good.call(json!({"cmd": "connect", "token": hs(&claims("dave", 1))})).await.unwrap();
    let mut lazy = Connection::connect(&ws_url(&s)).await.unwrap();
    lazy.call(json!({"cmd": "connect", "token": hs(&claims("frank", 1))})).await.unwrap();
    // ...then it catches up, and both tokens are past their expiry.
    s.state.clock.shift(HOUR_MS);
    // Refreshes when asked: stays.
    let ask = good.next_push().await.unwrap();
    assert_eq!(ask["refresh"]["reason"], "token_expired");
    let ok = good.call(json!({"cmd": "refresh", "token": hs(&claims("dave", 600))})).await.unwrap();
    assert!(ok["expires_in_ms"].as_u64().unwrap() > 500_000);
    // Refreshing as someone else is refused.
    assert_eq!(code(good.call(json!({"cmd": "refresh", "token": hs(&claims("eve", 600))})).await), "token_invalid");
    // Does not refresh: closed with 4101 after the grace period.
    let closed = loop {
        match lazy.next_push().await {
            Ok(_) => continue,
            Err(ClientError::Closed(code)) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(closed, Some(4101));
    assert_eq!(good.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
}

/// MQTT 5 enhanced authentication with the method `JWT`: the token at CONNECT, a new one
/// with AUTH (re-authenticate) before the old one expires — as the WebSocket's `refresh`,
/// for the same user only — and the refusals, each with its reason code.
#[tokio::test]
async fn mqtt_clients_authenticate_with_jwt_and_re_authenticate_before_expiry() {
    use common::mqtt::Mqtt;
    let s = TestServer::start(config(&hs_config("[mqtt]\nlisten = \"127.0.0.1:0\"\n"))).await;
    let addr = s.mqtt.unwrap();
    let jwt = |c: &Claims| Mqtt::auth_props("JWT", &hs(c));
    // As for the WebSocket above: one-second tokens accepted an hour early.
    s.state.clock.shift(-HOUR_MS);
    let mut good = Mqtt::connect_v5_props(addr, "jwt-good", &jwt(&claims("dave", 1))).await.unwrap();
    let mut lazy = Mqtt::connect_v5_props(addr, "jwt-lazy", &jwt(&claims("frank", 1))).await.unwrap();
    good.send(&Mqtt::auth(0x19, &jwt(&claims("dave", 600)))).await;
    let (first, body) = good.read().await.unwrap();
    assert_eq!((first, body[0]), (0xF0, 0x00), "AUTH Success");
    s.state.clock.shift(HOUR_MS);
    // Not re-authenticated: DISCONNECT 0xA0 (token expired).
    let (first, body) = lazy.read().await.unwrap();
    assert_eq!((first, body[0]), (0xE0, 0xA0));
    // Re-authenticated: still there (PINGREQ, PINGRESP).
    good.send(&common::mqtt::packet(0xC0, &[])).await;
    assert_eq!(good.read().await.unwrap().0, 0xD0);
    // An authenticated client may read $SYS (the default `mqtt.sys_topics`).
    assert_eq!(good.subscribe("$SYS/broker/version", None).await.0, 0);
    let p = good.next_publish_unacked().await.unwrap();
    assert_eq!(p.topic, "$SYS/broker/version");
    assert!(String::from_utf8(p.payload).unwrap().starts_with("switchboard "));
    // Re-authenticating as someone else: DISCONNECT 0x87 Not authorized.
    good.send(&Mqtt::auth(0x19, &jwt(&claims("eve", 600)))).await;
    // (Past any $SYS update that came meanwhile.)
    let (first, body) = loop {
        let (first, body) = good.read().await.unwrap();
        if first >> 4 != 3 {
            break (first, body);
        }
    };
    assert_eq!((first, body[0]), (0xE0, 0x87));
    // A method this server does not know: CONNACK 0x8C Bad authentication method; the
    // method without a token: 0x87; an expired token: 0x86.
    assert_eq!(Mqtt::connect_v5_props(addr, "m", &Mqtt::auth_props("SCRAM-SHA-1", "x")).await.err(), Some(0x8C));
    assert_eq!(Mqtt::connect_v5_props(addr, "m", &[0x15, 0, 3, b'J', b'W', b'T']).await.err(), Some(0x87));
    assert_eq!(Mqtt::connect_v5_props(addr, "m", &jwt(&claims("dave", -60))).await.err(), Some(0x86));
    // AUTH on a connection that did not authenticate with a method: 0x82 Protocol error.
    let mut plain = Mqtt::connect_v5_props(addr, "plain", &[]).await.unwrap();
    plain.send(&Mqtt::auth(0x19, &jwt(&claims("dave", 600)))).await;
    let (first, body) = plain.read().await.unwrap();
    assert_eq!((first, body[0]), (0xE0, 0x82));
}

/// With the Redis broker a revocation is the cluster's: a node started after it (which
/// no broadcast reached) refuses the revoked user too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_a_node_started_after_it() {
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbrev-{}-{}", std::process::id(), fastrand::u32(..));
    let cfg = hs_config(&format!("[broker]\nkind = \"redis\"\nredis_url = \"{url}\"\nredis_prefix = \"{prefix}\"\n"));
    let a = TestServer::start(config(&cfg)).await;
    let (st, _) = a.post_raw("/api/revoke", json!({"user": "mallory", "ttl_secs": 600}).to_string()).await;
    assert_eq!(st, 200);
    let later = TestServer::start(config(&cfg)).await;
    let token = hs(&claims("mallory", 600));
    let mut c = Connection::connect(&ws_url(&later)).await.unwrap();
    assert_eq!(code(c.call(json!({"cmd": "connect", "token": token})).await), "token_revoked");
    // Another user is let in.
    let mut ok = Connection::connect(&ws_url(&later)).await.unwrap();
    ok.call(json!({"cmd": "connect", "token": hs(&claims("nina", 600))})).await.unwrap();
}

#[tokio::test]
async fn an_sse_stream_ends_when_its_token_expires() {
    let s = TestServer::start(config(&hs_config(""))).await;
    s.state.clock.shift(-HOUR_MS);
    let t = hs(&claims("gina", 1));
    let mut sse = Sse::connect(&s, &format!("channel={}&token={t}", channel("secure")), None).await;
    sse.next_named("subscribed").await;
    s.state.clock.shift(HOUR_MS);
    let bye = sse.next_named("disconnect").await;
    assert_eq!(bye.json()["reason"], "token_expired");
    assert_eq!(bye.json()["reconnect"], true);
}

#[tokio::test]
async fn disconnect_and_revoke_close_a_users_connections_and_keep_them_out() {
    let s = TestServer::start(config(&hs_config(""))).await;
    let mut t = claims("henry", 600);
    t.jti = Some("tok-1".into());
    let token = hs(&t);
    let mut ws = Connection::connect(&ws_url(&s)).await.unwrap();
    ws.call(json!({"cmd": "connect", "token": token})).await.unwrap();
    let mut sse = Sse::connect(&s, &format!("channel={}&token={token}", channel("secure")), None).await;
    sse.next_named("subscribed").await;
    let bystander_token = hs(&claims("ida", 600));
    let mut bystander = Connection::connect(&ws_url(&s)).await.unwrap();
    bystander.call(json!({"cmd": "connect", "token": bystander_token})).await.unwrap();

    let (st, v) = s.post_raw("/api/disconnect", json!({"user": "henry"}).to_string()).await;
    assert_eq!((st, v["disconnected"].as_u64()), (200, Some(2)));
    let mut advice = None;
    let closed = loop {
        match ws.next_push().await {
            Ok(v) => advice = v.get("disconnect").cloned().or(advice),
            Err(ClientError::Closed(code)) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(closed, Some(4102));
    assert_eq!(advice.unwrap()["reconnect"], false);
    let bye = sse.next_named("disconnect").await;
    assert_eq!((bye.json()["reason"].as_str(), bye.json()["reconnect"].as_bool()), (Some("disconnected"), Some(false)));

    // Revoke the token id: refused from now on; the bystander is untouched.
    let (st, _) = s.post_raw("/api/revoke", json!({"jti": "tok-1", "ttl_secs": 600}).to_string()).await;
    assert_eq!(st, 200);
    let (e, close) = connect_refused(&s, &token).await;
    assert_eq!((e.as_str(), close), ("token_revoked", Some(4102)));
    let (st, v) = s.post_raw("/api/revoke", json!({"user": "henry"}).to_string()).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (400, "invalid_request"));
    assert_eq!(bystander.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
}

#[tokio::test]
async fn origins_outside_the_allowlist_are_refused_before_the_upgrade() {
    let s = TestServer::start(config(&hs_config(
        "[security]\nallowed_origins = [\"https://app.example.com\", \"https://*.example.org\"]\n",
    )))
    .await;
    let with_origin = |o: &str| ConnectOptions { headers: vec![("Origin".into(), o.into())], ..Default::default() };
    for ok in ["https://app.example.com", "https://a.example.org"] {
        WsStream::connect(&ws_url(&s), with_origin(ok)).await.unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in ["https://evil.com", "http://app.example.com", "https://example.org", "null"] {
        match WsStream::connect(&ws_url(&s), with_origin(bad)).await {
            Err(switchboard_client::WsError::Refused { status, body }) => {
                assert_eq!(status, 403, "{bad}");
                assert!(body.contains("origin_not_allowed"), "{body}");
            }
            other => panic!("{bad}: expected 403, got {:?}", other.map(|_| ())),
        }
        let r = s.http.get(s.url("/sse?channel=a")).header("origin", bad).send().await.unwrap();
        assert_eq!(r.status(), 403, "{bad} on SSE");
    }
    // Non-browser clients send no Origin.
    WsStream::connect(&ws_url(&s), ConnectOptions::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_ten_thousand_handshakes_is_shed_with_retry_after_and_harms_no_one() {
    let s = TestServer::start(config("[limits]\naccept_rate_per_sec = 100\naccept_burst = 100\n")).await;
    let ch = channel("storm");
    let mut bystander = Connection::connect(&ws_url(&s)).await.unwrap();
    bystander.subscribe(&ch, None).await.unwrap();
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
    let url = s.url(&format!("/sse?channel={ch}"));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = http.get(&url).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            drop(r);
            drop(permit);
            (status, retry)
        }));
    }
    let (mut admitted, mut shed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => admitted += 1,
            (503, true) => shed += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(admitted + shed, 10_000);
    assert!(shed > 0 && admitted >= 100, "admitted {admitted}, shed {shed}");
    s.publish(&ch, json!("still fine")).await;
    assert_eq!(bystander.next_pub().await.unwrap()["data"], "still fine");
    assert_eq!(s.get_json("/healthz").await.0, 200);
}

#[tokio::test]
async fn per_ip_connection_cap_refuses_the_excess() {
    let s = TestServer::start(config("[limits]\nmax_connections_per_ip = 3\n")).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(WsStream::connect(&ws_url(&s), ConnectOptions::default()).await.unwrap());
    }
    match WsStream::connect(&ws_url(&s), ConnectOptions::default()).await {
        Err(switchboard_client::WsError::Refused { status, body }) => {
            assert_eq!(status, 429);
            assert!(body.contains("too_many_connections_from_ip"));
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    drop(open.pop());
    // The slot comes back once the server has seen the close.
    for _ in 0..200 {
        if WsStream::connect(&ws_url(&s), ConnectOptions::default()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("slot never came back");
}
