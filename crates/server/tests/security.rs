//! The attack catalogue of docs/security.md, one test per finding of the adversarial
//! pass (each failed before its fix), plus the answers the catalogue promises.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{config, TestServer};
use serde_json::{json, Value};
use switchboard_client::{ClientError, ConnectOptions, Connection, Message, WsError, WsStream};
use switchboard_server::auth::{sign, unix_now, Claims};

const SECRET: &str = "security-secret-0123456789abcdef0123456";

fn hs(c: &Claims) -> String {
    sign("HS256", SECRET, c).unwrap()
}

fn user(sub: &str, channels: Option<&[&str]>) -> Claims {
    Claims {
        sub: sub.into(),
        exp: unix_now() + 600,
        channels: channels.map(|c| c.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

fn auth_config(extra: &str) -> String {
    format!(
        "[auth]\nalgorithm = \"HS256\"\nhmac_secret = \"{SECRET}\"\n\
         [namespaces.admin]\nrequire_token = true\n[namespaces.user]\nuser_limited = true\n\
         [namespaces.vip]\nprivate = true\n{extra}"
    )
}

fn code(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

async fn ws(s: &TestServer) -> Connection {
    Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap()
}

/// A raw HTTP/1.1 exchange on a new TCP connection: (status, body). Blocking I/O, off
/// the runtime the server runs on.
async fn raw_request(s: &TestServer, request: &str) -> (u16, String) {
    let (addr, request) = (s.addr, request.to_string());
    tokio::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        tcp.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    })
    .await
    .unwrap()
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    v["error"]["code"].as_str().unwrap_or_else(|| panic!("no code: {body}")).to_string()
}

async fn scrape(s: &TestServer, series: &str) -> f64 {
    let text = s.http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// 1. The WebSocket `history` command read every channel, authorized or not.
#[tokio::test]
async fn the_history_command_reads_only_what_the_caller_may_read() {
    let s = TestServer::start(config(&auth_config(""))).await;
    for ch in ["admin:secrets", "user:bob", "vip:lounge"] {
        s.publish(ch, json!("secret")).await;
    }
    let mut anon = ws(&s).await;
    assert_eq!(code(anon.call(json!({"cmd": "history", "channel": "admin:secrets"})).await), "token_required");
    assert_eq!(code(anon.call(json!({"cmd": "history", "channel": "user:bob"})).await), "token_required");
    let mut limited = ws(&s).await;
    limited.call(json!({"cmd": "connect", "token": hs(&user("alice", Some(&["chat:lobby"])))})).await.unwrap();
    assert_eq!(code(limited.call(json!({"cmd": "history", "channel": "user:bob"})).await), "permission_denied");
    assert_eq!(code(limited.call(json!({"cmd": "history", "channel": "admin:secrets"})).await), "permission_denied");
    let mut alice = ws(&s).await;
    alice.call(json!({"cmd": "connect", "token": hs(&user("alice", None))})).await.unwrap();
    assert_eq!(
        code(alice.call(json!({"cmd": "history", "channel": "vip:lounge"})).await),
        "subscription_token_required"
    );
    // What the caller may read, it reads.
    let h = alice.call(json!({"cmd": "history", "channel": "admin:secrets"})).await.unwrap();
    assert_eq!(h["publications"][0]["data"], "secret");
}

// 3. A subscription token (alice's, for vip:lounge) opened connections her connection
//    token could not.
#[tokio::test]
async fn a_subscription_token_cannot_open_a_connection() {
    let s = TestServer::start(config(&auth_config(""))).await;
    let sub = hs(&Claims {
        sub: "alice".into(),
        exp: unix_now() + 600,
        channel: Some("vip:lounge".into()),
        ..Default::default()
    });
    let mut c = ws(&s).await;
    assert_eq!(code(c.call(json!({"cmd": "connect", "token": sub})).await), "token_invalid");
    let (st, v) = s.get_json(&format!("/poll?channel=admin:x&token={sub}")).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (401, "token_invalid"));
    // …and a connection token does not grant a private channel.
    let conn = hs(&user("alice", None));
    let (st, v) = s.get_json(&format!("/poll?channel=vip:lounge&token={conn}&sub_token={conn}")).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (403, "subscription_token_invalid"));
}

// 4. A validly signed token with exp = 2^64−1 panicked the connection task and leaked
//    its socket; nbf was not checked.
#[tokio::test]
async fn token_times_are_checked_without_overflow_and_nothing_leaks() {
    let s = TestServer::start(config(&auth_config(""))).await;
    let forever = Claims { exp: u64::MAX, ..user("alice", None) };
    for _ in 0..20 {
        let mut c = ws(&s).await;
        let ok = c.call(json!({"cmd": "connect", "token": hs(&forever)})).await.unwrap();
        assert_eq!(ok["user"], "alice");
        assert_eq!(c.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
    }
    let mut gone = false;
    for _ in 0..3000 {
        if scrape(&s, "switchboard_connections{transport=\"ws\"}").await == 0.0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "closed connections are still held");
    assert_eq!(scrape(&s, "switchboard_task_panics_total").await, 0.0);
    let later = Claims { nbf: Some(unix_now() + 86_400), ..user("alice", None) };
    assert_eq!(code(ws(&s).await.call(json!({"cmd": "connect", "token": hs(&later)})).await), "token_invalid");
    let future = Claims { iat: Some(unix_now() + 86_400), ..user("alice", None) };
    assert_eq!(code(ws(&s).await.call(json!({"cmd": "connect", "token": hs(&future)})).await), "token_invalid");
}

// 5. Every channel name an anonymous client read created state kept for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_reads_of_many_channels_hold_bounded_state() {
    let s = TestServer::start(config("[broker]\nmax_unused_channels = 128\n")).await;
    for i in 0..1500 {
        let path = match i % 3 {
            0 => format!("/poll?channel=probe:{i}"),
            1 => format!("/api/history?channel=probe:{i}"),
            _ => format!("/presence_stats?channel=probe:{i}"),
        };
        let _ = s.http.get(s.url(&path)).send().await.unwrap();
    }
    let kept = scrape(&s, "switchboard_broker_channels").await;
    assert!(kept <= 128.0 + 64.0, "{kept} channels kept for 1,500 reads");
    assert!(scrape(&s, "switchboard_broker_unused_channels_forgotten_total").await > 0.0);
}

// 6. Plain HTTP connections and long polls were not counted by the caps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_counts_in_the_caps_and_health_survives_a_full_node() {
    let s = TestServer::start(config("[limits]\nmax_connections_per_ip = 5\n")).await;
    // Five idle TCP connections (not even a request) fill this address's cap.
    let idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(s.addr).unwrap()).collect();
    let (status, body) = raw_request(&s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, error_code(&body).as_str()), (429, "too_many_connections_from_ip"));
    drop(idle);
    // Long polls are connections too.
    let s = TestServer::start(config("[limits]\nmax_connections_per_ip = 5\n")).await;
    let http = reqwest::Client::new();
    let mut polls = Vec::new();
    for i in 0..5 {
        let url = s.url(&format!("/poll?channel=lp:{i}&wait=60"));
        polls.push(tokio::spawn(http.get(url).send()));
    }
    let mut waiting = false;
    for _ in 0..3000 {
        if s.state.metrics.open_connections(switchboard_server::metrics::Transport::Poll) == 5 {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(waiting, "the five long polls never all arrived");
    let (status, body) = raw_request(&s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (429, "too_many_connections_from_ip"),
        "five long polls fill a cap of five"
    );
    for p in polls {
        p.abort();
    }

    // A node at its total cap still answers health checks, on reserved places.
    let s = TestServer::start(config("[limits]\nmax_connections = 3\n")).await;
    let _full: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(s.addr).unwrap()).collect();
    let mut seen = (0, String::new());
    for _ in 0..3000 {
        seen = raw_request(&s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if seen.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.0, 200, "/healthz on a full node: {seen:?}");
    let (status, body) = raw_request(&s, "GET /sse?channel=a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, error_code(&body).as_str()), (503, "too_many_connections"));
    assert!(scrape(&s, "switchboard_tcp_connections").await >= 3.0);
}

// 7. Client `POST /publish` had no rate limit.
#[tokio::test]
async fn client_publishes_are_rate_limited_per_address() {
    let s =
        TestServer::start(config("[limits]\nclient_publishes_per_sec = 1\n[namespaces.chat]\nallow_publish = true\n"))
            .await;
    let mut limited = 0;
    for i in 0..50 {
        let r = s.http.post(s.url("/publish")).json(&json!({"channel": "chat:x", "data": i})).send().await.unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "rate_limited");
            limited += 1;
        }
    }
    assert!(limited > 0, "50 publishes at once passed a limit of 1/s");
}

// 8a. A steady command flood was answered forever.
#[tokio::test]
async fn a_steady_command_flood_is_closed_with_1008() {
    let s = TestServer::start(config("[ws]\nmax_commands_per_sec = 5\n")).await;
    let mut c = WsStream::connect(&format!("ws://{}/ws", s.addr), ConnectOptions::default()).await.unwrap();
    for i in 0..300 {
        if c.send_text(&json!({"id": i, "cmd": "ping"}).to_string()).await.is_err() {
            break;
        }
    }
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(60), c.recv()).await.expect("closed in time") {
            Ok(Message::Close(code, _)) => break code,
            Ok(_) => continue,
            Err(WsError::Eof) | Err(WsError::Io(_)) => panic!("closed without a close frame"),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, Some(1008));
}

// 8b. The rest of the small findings.
#[tokio::test]
async fn the_small_findings_get_their_documented_answers() {
    let s = TestServer::start(config(&auth_config(
        "[security]\nallowed_origins = [\"https://*.example.com\"]\n[limits]\nmax_message_bytes = 1024\n",
    )))
    .await;
    // A broadcast naming a channel twice is refused, not published twice.
    let (st, v) = s.post_raw("/api/broadcast", json!({"channels": ["news:a", "news:a"], "data": 1}).to_string()).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (400, "invalid_request"));
    // Errors about the request head itself are JSON too.
    let long = "a".repeat(9 * 1024);
    let (status, body) =
        raw_request(&s, &format!("GET /healthz?{long} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
    assert_eq!((status, error_code(&body).as_str()), (414, "uri_too_long"));
    let many: String = (0..80).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (status, body) =
        raw_request(&s, &format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n")).await;
    assert_eq!((status, error_code(&body).as_str()), (431, "headers_too_large"));
    // Origins are compared parsed, not as strings.
    for evil in ["https://evil.com@a.example.com", "https://a.example.com.evil.com", "https://a.example.com:8443"] {
        let opts = ConnectOptions { headers: vec![("Origin".into(), evil.into())], ..Default::default() };
        match WsStream::connect(&format!("ws://{}/ws", s.addr), opts).await {
            Err(WsError::Refused { status, body }) => {
                assert_eq!((status, error_code(&body).as_str()), (403, "origin_not_allowed"), "{evil}")
            }
            other => panic!("{evil}: expected a refusal, got {:?}", other.map(|_| ())),
        }
    }
    // /ws/echo goes through the same door: origin, and the message limit.
    let opts = ConnectOptions { headers: vec![("Origin".into(), "https://evil.com".into())], ..Default::default() };
    assert!(matches!(
        WsStream::connect(&format!("ws://{}/ws/echo", s.addr), opts).await,
        Err(WsError::Refused { status: 403, .. })
    ));
    let mut echo = WsStream::connect(&format!("ws://{}/ws/echo", s.addr), ConnectOptions::default()).await.unwrap();
    echo.send_text(&"x".repeat(64 * 1024)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), echo.recv()).await.expect("answer in time") {
            Ok(Message::Close(code, _)) => {
                assert_eq!(code, Some(1009));
                break;
            }
            Ok(Message::Text(t)) => panic!("echoed {} bytes past the limit", t.len()),
            Ok(_) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    // The admin page cannot be framed and runs only its own script.
    let r = s.http.get(s.url("/admin")).send().await.unwrap();
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'nonce-"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    // Token errors speak for themselves, without the JWT library's internals.
    let forged = sign("HS256", "another-secret-0123456789abcdef0123456", &user("mallory", None)).unwrap();
    let (st, v) = s.get_json(&format!("/poll?channel=admin:x&token={forged}")).await;
    assert_eq!((st, v["error"]["code"].as_str().unwrap()), (401, "token_invalid"));
    assert_eq!(v["error"]["message"], "token signature does not verify");
}

// 8c. Per-IP limits used the socket peer even behind the proxy the docs recommend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_limits_count_the_forwarded_client() {
    let s = TestServer::start(config(
        "[limits]\nmax_connections_per_ip = 1\n[security]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    ))
    .await;
    let sse = |client: &'static str| {
        s.http.get(s.url("/sse?channel=news:1")).header("x-forwarded-for", format!("{client}, 127.0.0.1")).send()
    };
    let first = sse("198.51.100.1").await.unwrap();
    assert_eq!(first.status(), 200);
    let second = sse("198.51.100.1").await.unwrap();
    assert_eq!(second.status(), 429, "the same forwarded client, twice");
    let other = sse("198.51.100.2").await.unwrap();
    assert_eq!(other.status(), 200, "another client behind the same proxy");
    drop((first, other));

    // Without the setting, nobody's forwarding header is believed: the peer is capped.
    let s = TestServer::start(config("[limits]\nmax_connections_per_ip = 1\n")).await;
    let _held = TcpStream::connect(s.addr).unwrap();
    let (status, _) = raw_request(&s, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n").await;
    assert_eq!(status, 429);
}
