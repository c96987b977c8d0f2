//! The authorization matrix: every operation that reads or writes a channel, on every
//! transport that offers it, for every kind of namespace and every kind of caller — each
//! cell with the answer docs/security.md promises. All of them go through one gate
//! (`auth::gate`); this test is how we know none goes around it.
//!
//! The table is also a census: every route of the HTTP surface (`app::routes`) and every
//! WebSocket command (`protocol::COMMANDS`) must appear below, so a new way to reach a
//! channel cannot land without its rows.
//!
//! Webhooks read channels (publications, presence) but for endpoints the operator
//! configured, with the server API's trust: no client reaches a channel through them, and
//! their routes (`/api/webhooks/…`) are server-API rows, which take the key and nothing else.

mod common;

use std::collections::BTreeMap;

use common::mqtt::{Mqtt, Via};
use common::{config, TestServer};
use serde_json::{json, Value};
use switchboard_client::{ClientError, ConnectOptions, Connection, WsError};
use switchboard_server::app::{routes, Guard};
use switchboard_server::auth::{sign, unix_now, Claims, Operation};
use switchboard_server::transports::ws::protocol::COMMANDS;

const SECRET: &str = "matrix-secret-0123456789abcdef0123456789";
const API_KEY: &str = "matrix-api-key-0123456789";

/// A namespace of each kind, and the channel of it every cell uses.
const NAMESPACES: [(&str, &str); 4] = [
    ("public", "open:room"),
    ("require_token", "secure:room"),
    ("user_limited", "user:alice"),
    ("private", "vip:lounge"),
];

fn server_config() -> String {
    format!(
        r#"
[mqtt]
listen = "127.0.0.1:0"
[webtransport]
listen = "127.0.0.1:0"
[api]
keys = ["{API_KEY}"]
[auth]
algorithm = "HS256"
hmac_secret = "{SECRET}"
[namespaces.open]
allow_publish = true
presence = true
join_leave = true
[namespaces.secure]
require_token = true
allow_publish = true
presence = true
join_leave = true
[namespaces.user]
user_limited = true
allow_publish = true
presence = true
join_leave = true
[namespaces.vip]
private = true
allow_publish = true
presence = true
join_leave = true
"#
    )
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    /// No token at all.
    Anonymous,
    /// alice, with a token whose `channels` claim does not list the channel.
    TokenWithout,
    /// alice, with a token that lists the channel.
    TokenWith,
    /// alice, with a token that lists the channel, and her subscription token for it.
    TokenWithSubToken,
    /// bob, with a token that lists the channel, showing alice's subscription token.
    OtherUser,
    /// alice's subscription token, presented as a connection token.
    SubTokenAsConnection,
}

const CALLERS: [Caller; 6] = [
    Caller::Anonymous,
    Caller::TokenWithout,
    Caller::TokenWith,
    Caller::TokenWithSubToken,
    Caller::OtherUser,
    Caller::SubTokenAsConnection,
];

/// What the gate answers `caller` for the channel of `namespace` — the same for every
/// operation and every transport. `None`: allowed.
fn expected(namespace: &str, caller: Caller) -> Option<&'static str> {
    use Caller::*;
    match (namespace, caller) {
        (_, SubTokenAsConnection) => Some("token_invalid"),
        (_, TokenWithout) => Some("permission_denied"),
        ("public", _) => None,
        (_, Anonymous) => Some("token_required"),
        ("require_token", _) => None,
        ("user_limited", OtherUser) => Some("permission_denied"),
        ("user_limited", _) => None,
        ("private", TokenWith) => Some("subscription_token_required"),
        ("private", OtherUser) => Some("subscription_token_invalid"),
        ("private", TokenWithSubToken) => None,
        other => unreachable!("{other:?}"),
    }
}

fn token(claims: &Claims) -> String {
    sign("HS256", SECRET, claims).unwrap()
}

/// (connection token, subscription tokens) of `caller` for `channel`.
fn credentials(caller: Caller, channel: &str) -> (Option<String>, Vec<String>) {
    let base = |user: &str, channels: Vec<String>| Claims {
        sub: user.into(),
        exp: unix_now() + 600,
        channels: Some(channels),
        ..Default::default()
    };
    let sub_token = || {
        token(&Claims {
            sub: "alice".into(),
            exp: unix_now() + 600,
            channel: Some(channel.into()),
            ..Default::default()
        })
    };
    match caller {
        Caller::Anonymous => (None, vec![]),
        Caller::TokenWithout => (Some(token(&base("alice", vec!["elsewhere:*".into()]))), vec![]),
        Caller::TokenWith => (Some(token(&base("alice", vec![channel.into()]))), vec![]),
        Caller::TokenWithSubToken => (Some(token(&base("alice", vec![channel.into()]))), vec![sub_token()]),
        Caller::OtherUser => (Some(token(&base("bob", vec![channel.into()]))), vec![sub_token()]),
        Caller::SubTokenAsConnection => (Some(sub_token()), vec![]),
    }
}

/// The ways to reach a channel, each with the operation the gate decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Way {
    WsCommand(&'static str),
    WsUrl,
    Sse,
    Poll,
    HttpPublish,
    HttpPresence,
    HttpPresenceStats,
    HttpHistory,
    /// MQTT 5 SUBSCRIBE / PUBLISH (QoS 1): the connection token as CONNECT's password,
    /// a subscription token as the user property `token`.
    MqttSubscribe,
    MqttPublish,
    /// MQTT SUBSCRIBE to `$presence/{topic}`: the channel's join and leave events.
    MqttPresence,
    /// The same over MQTT's WebSocket endpoint (`/mqtt`).
    MqttWsSubscribe,
    MqttWsPublish,
    /// A `switchboard.v1` command on a WebTransport session (`/wt?token=…`).
    WtCommand(&'static str),
}

const WAYS: [(Way, Operation); 22] = [
    (Way::WsCommand("subscribe"), Operation::Subscribe),
    (Way::WsCommand("history"), Operation::History),
    (Way::WsCommand("presence"), Operation::Presence),
    (Way::WsCommand("presence_stats"), Operation::PresenceStats),
    (Way::WsCommand("publish"), Operation::Publish),
    (Way::WsUrl, Operation::Subscribe),
    (Way::Sse, Operation::Subscribe),
    (Way::Poll, Operation::Subscribe),
    (Way::HttpPublish, Operation::Publish),
    (Way::HttpPresence, Operation::Presence),
    (Way::HttpPresenceStats, Operation::PresenceStats),
    (Way::HttpHistory, Operation::History),
    (Way::MqttSubscribe, Operation::Subscribe),
    (Way::MqttPublish, Operation::Publish),
    (Way::MqttPresence, Operation::Presence),
    (Way::MqttWsSubscribe, Operation::Subscribe),
    (Way::MqttWsPublish, Operation::Publish),
    (Way::WtCommand("subscribe"), Operation::Subscribe),
    (Way::WtCommand("history"), Operation::History),
    (Way::WtCommand("presence"), Operation::Presence),
    (Way::WtCommand("presence_stats"), Operation::PresenceStats),
    (Way::WtCommand("publish"), Operation::Publish),
];

/// WebSocket commands that read or write no channel's data, so have no rows.
/// (`send` is a direct message: no channel; `[direct] policy` decides, tests/direct.rs.)
const COMMANDS_WITHOUT_CHANNEL: [&str; 5] = ["connect", "refresh", "unsubscribe", "send", "ping"];

/// A query string. (Channel names and JWTs need no escaping.)
fn query(channel: Option<&str>, conn: &Option<String>, subs: &[String]) -> String {
    let mut q: Vec<String> = channel.map(|c| format!("channel={c}")).into_iter().collect();
    q.extend(conn.iter().map(|t| format!("token={t}")));
    q.extend(subs.iter().map(|t| format!("sub_token={t}")));
    q.join("&")
}

/// The endpoint of a way that reads with a GET.
fn read_path(way: Way) -> &'static str {
    match way {
        Way::Sse => "/sse",
        Way::Poll => "/poll",
        Way::HttpPresence => "/presence",
        Way::HttpHistory => "/history",
        _ => "/presence_stats",
    }
}

/// The error code of an HTTP answer, or `None` for a 2xx.
async fn http_outcome(r: reqwest::Response) -> Option<String> {
    if r.status().is_success() {
        return None;
    }
    let status = r.status();
    let v: Value = r.json().await.unwrap_or_else(|e| panic!("HTTP {status} without a JSON error: {e}"));
    Some(v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {v}")).to_string())
}

/// How the test reaches the server.
enum Link {
    /// Plain HTTP/1.1, WebSockets by upgrade.
    Plain,
    /// TLS: every request a stream of one HTTP/2 connection, WebSockets by extended
    /// CONNECT (RFC 8441).
    Http2(H2),
}

/// One HTTP/2 connection over TLS (hyper's client), trusting the test's CA.
struct H2 {
    sender: hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    authority: String,
    ca: std::path::PathBuf,
}

impl H2 {
    async fn connect(s: &TestServer, ca: &std::path::Path) -> H2 {
        let tls = common::tls_connect(s.addr, ca, b"h2").await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
        let io = hyper_util::rt::TokioIo::new(tls);
        let (sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        H2 { sender, authority: format!("localhost:{}", s.addr.port()), ca: ca.to_path_buf() }
    }

    /// The error code of the answer, or `None` for a 2xx (whose body, an SSE stream
    /// perhaps, is not read).
    async fn outcome(&mut self, method: axum::http::Method, path: &str, body: Option<Value>) -> Option<String> {
        use http_body_util::BodyExt;
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority))
            .version(axum::http::Version::HTTP_2);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let bytes = body.map(|b| bytes::Bytes::from(b.to_string())).unwrap_or_default();
        let r = self.sender.send_request(req.body(http_body_util::Full::new(bytes)).unwrap()).await.unwrap();
        let status = r.status();
        if status.is_success() {
            return None;
        }
        let b = r.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&b).unwrap_or_else(|e| panic!("HTTP {status} without a JSON error: {e}"));
        Some(v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {v}")).to_string())
    }
}

/// Performs `way` on `channel` as `caller`; returns the error code, or `None` if allowed.
async fn attempt(s: &TestServer, link: &mut Link, way: Way, channel: &str, caller: Caller) -> Option<String> {
    let (conn, subs) = credentials(caller, channel);
    let (ws_base, ws_options) = match link {
        Link::Plain => (format!("ws://{}/ws", s.addr), ConnectOptions::default()),
        Link::Http2(h2) => (
            format!("wss://localhost:{}/ws", s.addr.port()),
            ConnectOptions {
                ca_pem: Some(std::fs::read(&h2.ca).unwrap()),
                platform_roots: false,
                http2: true,
                ..Default::default()
            },
        ),
    };
    if let (Link::Http2(h2), Way::Sse | Way::Poll | Way::HttpPresence | Way::HttpPresenceStats | Way::HttpHistory) =
        (&mut *link, way)
    {
        let path = read_path(way);
        return h2
            .outcome(axum::http::Method::GET, &format!("{path}?{}", query(Some(channel), &conn, &subs)), None)
            .await;
    }
    if let (Link::Http2(h2), Way::HttpPublish) = (&mut *link, way) {
        let path = format!("/publish?{}", query(None, &conn, &subs));
        return h2.outcome(axum::http::Method::POST, &path, Some(json!({"channel": channel, "data": {"x": 1}}))).await;
    }
    let over_h2 = matches!(link, Link::Http2(_));
    match way {
        Way::MqttSubscribe | Way::MqttPublish | Way::MqttPresence | Way::MqttWsSubscribe | Way::MqttWsPublish => {
            mqtt_attempt(s, way, channel, conn.as_deref(), subs.first().map(String::as_str)).await
        }
        Way::WtCommand(cmd) => wt_attempt(s, cmd, channel, &conn, subs.first()).await,
        Way::WsCommand(cmd) => {
            let mut c = Connection::connect_with(&ws_base, ws_options).await.unwrap();
            assert_eq!(c.ws.http2, over_h2);
            if let Some(t) = &conn {
                if let Err(e) = c.call(json!({"cmd": "connect", "token": t})).await {
                    return Some(code(e));
                }
            }
            let mut v = json!({"cmd": cmd, "channel": channel});
            if cmd == "publish" {
                v["data"] = json!({"x": 1});
            }
            if let Some(t) = subs.first() {
                v["token"] = json!(t);
            }
            c.call(v).await.err().map(code)
        }
        Way::WsUrl => {
            match Connection::connect_with(&format!("{ws_base}?{}", query(Some(channel), &conn, &subs)), ws_options)
                .await
            {
                Ok(c) => {
                    assert_eq!(c.ws.http2, over_h2);
                    None
                }
                Err(ClientError::Ws(WsError::Refused { body, .. })) => {
                    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
                    Some(v["error"]["code"].as_str().unwrap().to_string())
                }
                Err(e) => panic!("{e}"),
            }
        }
        Way::Sse | Way::Poll | Way::HttpPresence | Way::HttpPresenceStats | Way::HttpHistory => {
            let path = read_path(way);
            let r = s.http.get(s.url(&format!("{path}?{}", query(Some(channel), &conn, &subs)))).send().await.unwrap();
            http_outcome(r).await
        }
        Way::HttpPublish => {
            let r = s
                .http
                .post(s.url(&format!("/publish?{}", query(None, &conn, &subs))))
                .json(&json!({"channel": channel, "data": {"x": 1}}))
                .send()
                .await
                .unwrap();
            http_outcome(r).await
        }
    }
}

/// An MQTT way: the error code from the reason string (`code: message`), or `None`.
async fn mqtt_attempt(
    s: &TestServer,
    way: Way,
    channel: &str,
    conn: Option<&str>,
    sub: Option<&str>,
) -> Option<String> {
    let code_of = |why: &str| Some(why.split(':').next().unwrap_or_default().to_string());
    let id = format!("matrix-{}", fastrand::u64(..));
    let via = match way {
        Way::MqttWsSubscribe | Way::MqttWsPublish => Via::WebSocket(s.addr),
        _ => Via::Tcp(s.mqtt.expect("an MQTT listener")),
    };
    let mut m = match Mqtt::connect_via(via, true, &id, conn).await {
        Ok(m) => m,
        Err((_, why)) => return code_of(&why),
    };
    let topic = channel.replacen(':', "/", 1);
    let (code, why) = match way {
        Way::MqttSubscribe | Way::MqttWsSubscribe => m.subscribe(&topic, sub).await,
        Way::MqttPresence => m.subscribe(&format!("$presence/{topic}"), sub).await,
        _ => m.publish(&topic, b"{\"x\":1}", 1, sub).await.expect("a PUBACK"),
    };
    if code == 0 {
        None
    } else {
        code_of(&why)
    }
}

/// A WebTransport way: the session's token in its URL (a bad one closes the session with
/// 4100 and `code: message`), the command on its stream.
async fn wt_attempt(
    s: &TestServer,
    cmd: &str,
    channel: &str,
    conn: &Option<String>,
    sub: Option<&String>,
) -> Option<String> {
    let q = conn.as_ref().map_or_else(String::new, |t| format!("?token={t}"));
    // "connection closed by peer: token_invalid: … (code 4100)", seen by the connect.
    let refused = |e: &str| e.split("peer: ").nth(1).and_then(|r| r.split(':').next()).map(str::to_string);
    let mut c = match common::wt::Wt::try_connect(s, &q).await {
        Ok(c) => c,
        Err(e) => return refused(&e).or_else(|| panic!("{e}")),
    };
    let mut v = json!({"cmd": cmd, "channel": channel});
    if cmd == "publish" {
        v["data"] = json!({"x": 1});
    }
    if let Some(t) = sub {
        v["token"] = json!(t);
    }
    // A session the server refused (a bad connection token) may be closed before the
    // command is written, or after: either way the close says why.
    let sent = c.try_send(v).await;
    match if sent.is_ok() { c.next().await } else { None } {
        Some(reply) => reply["error"]["code"].as_str().map(str::to_string),
        None => {
            let (code, why) = c.closed().await;
            assert_eq!(code, 4100, "{why}");
            Some(why.split(':').next().unwrap_or_default().to_string())
        }
    }
}

fn code(e: ClientError) -> String {
    match e {
        ClientError::Server(e) => e.code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// Runs every cell of the matrix through `link`; returns the wrong ones and the count.
async fn run_matrix(s: &TestServer, link: &mut Link) -> (Vec<String>, usize) {
    let mut wrong = Vec::new();
    let mut cells = 0;
    for (way, op) in WAYS {
        if matches!(way, Way::MqttSubscribe | Way::MqttPublish | Way::MqttPresence) && s.mqtt.is_none() {
            continue; // a server without an MQTT listener
        }
        if matches!(way, Way::MqttWsSubscribe | Way::MqttWsPublish) && s.state.tls.is_some() {
            continue; // the test's raw MQTT client speaks ws://, not wss://
        }
        if matches!(way, Way::WtCommand(_)) && (s.wt.is_none() || s.state.tls.is_some()) {
            // A server without a WebTransport listener; with [tls] its certificate is the
            // test CA's (tests/webtransport.rs), not the development one this client trusts.
            continue;
        }
        for (kind, channel) in NAMESPACES {
            for caller in CALLERS {
                let got = attempt(s, link, way, channel, caller).await;
                let want = expected(kind, caller).map(str::to_string);
                cells += 1;
                if got != want {
                    wrong.push(format!(
                        "{way:?} ({}) on {kind} {channel} as {caller:?}: got {got:?}, want {want:?}",
                        op.as_str()
                    ));
                }
            }
        }
    }
    (wrong, cells)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_every_transport_answers_as_the_matrix_says() {
    let s = TestServer::start_with(config(&server_config()), false).await;
    let (wrong, cells) = run_matrix(&s, &mut Link::Plain).await;
    assert!(wrong.is_empty(), "{} of {cells} cells are wrong:\n{}", wrong.len(), wrong.join("\n"));
}

/// The same matrix over TLS and HTTP/2: every request a stream of one connection, every
/// WebSocket an extended CONNECT (RFC 8441) — the same door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_matrix_holds_over_tls_and_http2_with_websockets_by_extended_connect() {
    let dir = std::env::temp_dir().join(format!("sb-matrix-tls-{}", std::process::id()));
    let d = switchboard_server::tls::dev_certificate(&dir, false).unwrap();
    let toml = format!("{}\n[tls]\ncert = {:?}\nkey = {:?}\n", server_config(), d.cert, d.key);
    let s = TestServer::start_with(config(&toml), false).await;
    let mut link = Link::Http2(H2::connect(&s, &d.ca).await);
    let (wrong, cells) = run_matrix(&s, &mut link).await;
    assert!(wrong.is_empty(), "{} of {cells} cells are wrong:\n{}", wrong.len(), wrong.join("\n"));
    // Every WebSocket of the matrix came by extended CONNECT.
    let ws_cells = (WAYS.iter().filter(|(w, _)| matches!(w, Way::WsCommand(_) | Way::WsUrl)).count()
        * NAMESPACES.len()
        * CALLERS.len()) as u64;
    let over_h2 = s.state.metrics.ws_over_http2.load(std::sync::atomic::Ordering::Relaxed);
    assert!(over_h2 > 0 && over_h2 <= ws_cells, "{over_h2} WebSockets over HTTP/2 for {ws_cells} cells");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_takes_its_key_for_every_channel_and_nothing_else() {
    let s = TestServer::start_with(config(&server_config()), false).await;
    for route in routes().into_iter().filter(|r| r.guard == Guard::ApiKey) {
        for (_, channel) in NAMESPACES {
            let path = format!("{}?channel={channel}", route.path);
            let body = match route.path {
                "/api/publish" => json!({"channel": channel, "data": 1}),
                "/api/broadcast" => json!({"channels": [channel], "data": 1}),
                "/api/disconnect" => json!({"user": "nobody"}),
                "/api/revoke" => json!({"user": "nobody", "ttl_secs": 1}),
                "/api/send" => json!({"to": {"user": "nobody"}, "data": 1}),
                "/api/webhooks/replay" => json!({}),
                other if route.method == reqwest::Method::POST => panic!("{other}: which body does it take?"),
                _ => Value::Null,
            };
            let send = |key: Option<&str>| {
                let mut req = s.http.request(route.method.clone(), s.url(&path));
                if route.method == reqwest::Method::POST {
                    req = req.json(&body);
                }
                if let Some(k) = key {
                    req = req.bearer_auth(k);
                }
                req.send()
            };
            let none = send(None).await.unwrap();
            assert_eq!(none.status(), 401, "{} {} without a key", route.method, route.path);
            let user_token = credentials(Caller::TokenWith, channel).0.unwrap();
            let wrong = send(Some(&user_token)).await.unwrap();
            assert_eq!(wrong.status(), 401, "{} {} with a client token instead of a key", route.method, route.path);
            let ok = send(Some(API_KEY)).await.unwrap();
            let status = ok.status();
            // (A direct message to nobody passes the key and finds no one: 404; so do the
            // webhook routes of a server without webhooks.)
            let found_nothing = route.path == "/api/send" || route.path.starts_with("/api/webhooks/");
            assert!(
                status.is_success() || (found_nothing && status == 404),
                "{} {} with the key: {status} {}",
                route.method,
                route.path,
                ok.text().await.unwrap()
            );
        }
    }
}

#[test]
fn every_route_and_every_command_is_in_the_matrix() {
    // Routes that reach channels must be rows of the matrix (or the server API, tested
    // above, or the WebSocket endpoint whose commands are rows).
    let rows: BTreeMap<&str, Operation> = [
        ("/sse", Operation::Subscribe),
        ("/poll", Operation::Subscribe),
        ("/publish", Operation::Publish),
        ("/presence", Operation::Presence),
        ("/presence_stats", Operation::PresenceStats),
        ("/history", Operation::History),
    ]
    .into_iter()
    .collect();
    let open = [
        "/",
        "/admin",
        "/healthz",
        "/readyz",
        "/metrics",
        "/ws/echo",
        "/client.js",
        "/client.d.ts",
        "/demo/chat",
        "/demo/call",
        "/wt/cert-hash",
    ];
    for r in routes() {
        match r.guard {
            Guard::Channels(op) => {
                assert_eq!(
                    rows.get(r.path),
                    Some(&op),
                    "route {} {} ({op:?}) has no rows in the matrix",
                    r.method,
                    r.path
                )
            }
            Guard::Commands => {
                let rows = match r.path {
                    "/ws" => WAYS.iter().any(|(w, _)| matches!(w, Way::WsCommand(_))),
                    "/mqtt" => WAYS.iter().any(|(w, _)| matches!(w, Way::MqttWsSubscribe)),
                    _ => false,
                };
                assert!(rows, "a new command endpoint {} needs rows", r.path)
            }
            Guard::ApiKey => assert!(r.path.starts_with("/api/") || r.path.starts_with("/admin/api/"), "{}", r.path),
            // A client's direct message: the `send` command over HTTP, no channel;
            // `[direct] policy` decides (tests/direct.rs runs each policy through it).
            Guard::Direct => {
                assert_eq!(r.path, "/send", "a new direct-message route {} needs rows in tests/direct.rs", r.path);
                assert!(COMMANDS_WITHOUT_CHANNEL.contains(&"send"));
            }
            Guard::Open => {
                assert!(open.contains(&r.path), "{} {} claims to touch no channel: add it here if so", r.method, r.path)
            }
        }
    }
    for cmd in COMMANDS {
        let in_matrix = WAYS.iter().any(|(w, _)| *w == Way::WsCommand(cmd));
        // WebTransport sessions (on the UDP listener, not a route) run the same commands.
        let over_wt = WAYS.iter().any(|(w, _)| *w == Way::WtCommand(cmd));
        assert_eq!(in_matrix, over_wt, "{cmd:?}: rows over WebSocket and WebTransport differ");
        assert!(
            in_matrix || COMMANDS_WITHOUT_CHANNEL.contains(cmd),
            "WebSocket command {cmd:?} is in neither the matrix nor the list of commands without a channel"
        );
    }
    // And every operation has at least one row.
    for op in Operation::ALL {
        assert!(WAYS.iter().any(|(_, o)| *o == op), "{op:?} has no rows");
    }
}
