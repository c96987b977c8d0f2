//! WebTransport over HTTP/3: the `switchboard.v1` protocol on a bidirectional stream,
//! volatile publications as datagrams, the development certificate by its hash, and the
//! door every session goes through. (Headless Chromium: tests/browser/webtransport.test.mjs.)

mod common;

use common::wt::{self, Wt};
use common::{channel, config, TestServer};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789abcdef0123456789";
const CONFIG: &str = "[webtransport]\nlisten = \"127.0.0.1:0\"\n\
    [auth]\nalgorithm = \"HS256\"\nhmac_secret = \"test-secret-0123456789abcdef0123456789\"\n\
    [namespaces.chat]\nallow_publish = true\nhistory_size = 100\n\
    [namespaces.live]\nallow_publish = true\nvolatile = true\n";

async fn server() -> TestServer {
    TestServer::start(config(CONFIG)).await
}

fn publications(lines: &[Value]) -> Vec<Value> {
    lines.iter().filter(|l| l.get("pub").is_some()).map(|l| l["pub"]["data"].clone()).collect()
}

/// Reads lines until `n` publications arrived; returns their data.
async fn take_pubs(c: &mut Wt, mut got: Vec<Value>, n: usize) -> Vec<Value> {
    let mut data = publications(&got);
    while data.len() < n {
        let l = c.next().await.expect("a line");
        got.push(l);
        data = publications(&got);
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_runs_on_a_stream_in_order_and_resumes_without_gaps() {
    let s = server().await;
    let ch = channel("chat");
    let mut c = Wt::connect(&s, "").await;
    let mut skipped = Vec::new();
    let ok = c.command(json!({"cmd": "subscribe", "channel": ch}), 1, &mut skipped).await;
    assert!(ok["ok"]["epoch"].is_string(), "{ok}");
    for i in 0..20 {
        s.publish(&ch, json!(i)).await;
    }
    let data = take_pubs(&mut c, skipped, 20).await;
    assert_eq!(data, (0..20).map(|i| json!(i)).collect::<Vec<_>>());
    // Publishing from the session, and its reply.
    let mut seen = Vec::new();
    let r = c.command(json!({"cmd": "publish", "channel": ch, "data": {"from": "wt"}}), 2, &mut seen).await;
    assert_eq!(r["ok"]["offset"], 21, "{r}");
    let data = take_pubs(&mut c, seen, 1).await;
    assert_eq!(data, vec![json!({"from": "wt"})]);
    // The session goes; publications continue; a new session resumes from offset 21.
    let epoch = ok["ok"]["epoch"].as_str().unwrap().to_string();
    c.conn.close(0u32.into(), b"bye");
    for i in 21..31 {
        s.publish(&ch, json!(i)).await;
    }
    let mut c = Wt::connect(&s, "").await;
    let mut skipped = Vec::new();
    let since = format!("{epoch}:21");
    let ok = c.command(json!({"cmd": "subscribe", "channel": ch, "since": since}), 1, &mut skipped).await;
    assert_eq!(ok["ok"]["recovered"], true, "{ok}");
    let data = take_pubs(&mut c, skipped, 10).await;
    assert_eq!(data, (21..31).map(|i| json!(i)).collect::<Vec<_>>(), "nothing missing, nothing twice");
    // Errors are replies, and the session stays.
    let mut seen = Vec::new();
    let r = c.command(json!({"cmd": "subscribe", "channel": "bad channel!"}), 3, &mut seen).await;
    assert_eq!(r["error"]["code"], "invalid_channel", "{r}");
    let r = c.command(json!({"cmd": "ping"}), 4, &mut seen).await;
    assert!(r.get("error").is_none(), "{r}");
    // It counts as a WebTransport connection.
    let metrics = s.http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "switchboard_connections{transport=\"webtransport\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_publications_come_as_datagrams_when_asked_and_the_rest_on_the_stream() {
    let s = server().await;
    let (live, stored) = (channel("live"), channel("chat"));
    let mut c = Wt::connect(&s, "").await;
    let mut skipped = Vec::new();
    c.command(json!({"cmd": "subscribe", "channel": live, "datagrams": true}), 1, &mut skipped).await;
    c.command(json!({"cmd": "subscribe", "channel": stored, "datagrams": true}), 2, &mut skipped).await;
    // A small volatile publication: a datagram (the JSON line without its newline).
    let mut seen = Vec::new();
    c.command(json!({"cmd": "publish", "channel": live, "data": {"x": 1}}), 3, &mut seen).await;
    let d = c.datagram().await;
    assert_eq!(d["pub"]["data"], json!({"x": 1}), "{d}");
    assert_eq!(d["pub"]["volatile"], true, "{d}");
    // One larger than a datagram can carry: on the stream. Stored ones: always the stream.
    let max = c.conn.max_datagram_size().unwrap();
    let big = "y".repeat(max + 100);
    c.command(json!({"cmd": "publish", "channel": live, "data": big}), 4, &mut seen).await;
    s.publish(&stored, json!("stored")).await;
    let data = take_pubs(&mut c, seen, 2).await;
    assert_eq!(data, vec![json!(big), json!("stored")]);
    // Without `datagrams`, volatile ones come on the stream too.
    let mut plain = Wt::connect(&s, "").await;
    let mut skipped = Vec::new();
    plain.command(json!({"cmd": "subscribe", "channel": live}), 1, &mut skipped).await;
    let mut seen = Vec::new();
    plain.command(json!({"cmd": "publish", "channel": live, "data": "on the stream"}), 2, &mut seen).await;
    assert_eq!(take_pubs(&mut plain, seen, 1).await, vec![json!("on the stream")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_certificate_is_published_by_hash_and_valid_under_14_days() {
    let s = server().await;
    let (status, v) = s.get_json("/wt/cert-hash").await;
    assert_eq!(status, 200);
    assert_eq!(v["algorithm"], "sha-256");
    assert_eq!(v["hex"].as_str().unwrap().len(), 64);
    let days = (v["expires"].as_i64().unwrap() - switchboard_server::auth::unix_now() as i64) as f64 / 86_400.0;
    assert!(days > 12.0 && days < 14.0, "valid for {days} more days");
    // The certificate the listener presents is that one: a client trusting only the hash
    // connects (every test here does), one trusting nothing does not.
    let config = wtransport::ClientConfig::builder().with_bind_default().with_native_certs().build();
    let endpoint = wtransport::Endpoint::client(config).unwrap();
    let url = format!("https://127.0.0.1:{}/wt?protocol=switchboard.v1", s.wt.unwrap().port());
    assert!(endpoint.connect(url).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sessions_and_bad_input_are_closed_with_their_codes_and_the_server_keeps_serving() {
    let s = TestServer::start(config(&format!(
        "{CONFIG}[security]\nallowed_origins = [\"https://app.example\"]\n[limits]\nmax_message_bytes = 1024\n"
    )))
    .await;
    let offer = ("wt-available-protocols", "\"switchboard.v1\"");
    // Another path: 404, no session.
    assert!(wt::session(&s, "/elsewhere", &[offer]).await.is_err());
    // An origin not allowed: 403, no session.
    assert!(wt::session(&s, "/wt", &[offer, ("origin", "https://evil.example")]).await.is_err());
    // No subprotocol offered: the session opens and closes with 1002 and the reason.
    let (code, why) = close_of(wt::session(&s, "/wt", &[("origin", "https://app.example")]).await).await;
    assert_eq!(code, 1002, "{why}");
    assert!(why.contains("switchboard.v1"), "{why}");
    // A bad token: 4100.
    let bad = wt::session(&s, "/wt?token=not.a.jwt", &[offer, ("origin", "https://app.example")]).await;
    let (code, why) = close_of(bad).await;
    assert_eq!(code, 4100, "{why}");
    // A line that is not UTF-8: 1007. One over the message limit without its newline: 1009.
    let mut c = Wt::connect(&s, "?protocol=switchboard.v1").await;
    c.send_line(b"\xff\xfe\n").await;
    assert_eq!(c.closed().await.0, 1007);
    let mut c = Wt::connect(&s, "?protocol=switchboard.v1").await;
    c.send_line(&vec![b'x'; 8 * 1024]).await;
    assert_eq!(c.closed().await.0, 1009);
    // Malformed JSON is an error reply, not a close; an oversized datagram from the
    // client is dropped by QUIC or ignored.
    let mut c = Wt::connect(&s, "?protocol=switchboard.v1").await;
    let _ = c.conn.send_datagram(b"{not json");
    c.send_line(b"{not json}\n").await;
    let reply = c.next().await.unwrap();
    assert!(reply["error"]["code"].is_string(), "{reply}");
    let mut skipped = Vec::new();
    let r = c.command(json!({"cmd": "ping"}), 9, &mut skipped).await;
    assert!(r.get("error").is_none(), "{r}");
}

/// How a session the server closes at once ended: seen by the connect itself (when the
/// close came first) or on the open session.
async fn close_of(r: Result<wtransport::Connection, String>) -> (u64, String) {
    match r {
        Ok(conn) => wt::closed(&conn).await,
        Err(e) => {
            // "connection closed by peer: <reason> (code <n>)"
            let code = e.rsplit("(code ").next().and_then(|c| c.trim_end_matches(')').parse().ok());
            (code.unwrap_or_else(|| panic!("not closed with a code: {e}")), e)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_disconnects_a_session_and_shutdown_tells_it_to_reconnect() {
    let s = server().await;
    let claims = switchboard_server::auth::Claims {
        sub: "alice".into(),
        exp: switchboard_server::auth::unix_now() + 600,
        ..Default::default()
    };
    let token = switchboard_server::auth::sign("HS256", SECRET, &claims).unwrap();
    let mut c = Wt::connect(&s, &format!("?token={token}")).await;
    let mut skipped = Vec::new();
    c.command(json!({"cmd": "subscribe", "channel": channel("chat")}), 1, &mut skipped).await;
    let (status, v) = s.post_raw("/api/disconnect", json!({"user": "alice"}).to_string()).await;
    assert_eq!(status, 200, "{v}");
    let last = c.last_line().await;
    assert_eq!(last["disconnect"]["code"], 4102, "{last}");
    assert_eq!(last["disconnect"]["reconnect"], false, "{last}");
    assert_eq!(c.closed().await.0, 4102);
    // Shutdown: a `disconnect` push with reconnect and a delay, then 1001.
    let mut c = Wt::connect(&s, "").await;
    let mut skipped = Vec::new();
    c.command(json!({"cmd": "subscribe", "channel": channel("chat")}), 1, &mut skipped).await;
    let stop = tokio::spawn(s.shutdown());
    let last = c.last_line().await;
    assert_eq!(last["disconnect"]["code"], 1001, "{last}");
    assert_eq!(last["disconnect"]["reconnect"], true, "{last}");
    assert_eq!(c.closed().await.0, 1001);
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_configured_sessions_present_its_certificate() {
    use rustls::pki_types::pem::PemObject;
    let dir = std::env::temp_dir().join(format!("sb-wt-tls-{}-{}", std::process::id(), fastrand::u64(..)));
    let d = switchboard_server::tls::dev_certificate(&dir, false).unwrap();
    let s = TestServer::start(config(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nhttp_listen = \"127.0.0.1:0\"\nhttp_mode = \"serve\"\n{CONFIG}",
        d.cert, d.key
    )))
    .await;
    // No development certificate to publish.
    assert_eq!(s.get_json("/wt/cert-hash").await.0, 404);
    // A client that trusts the CA (as a browser trusts a real certificate) gets a session.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&d.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let client = wtransport::ClientConfig::builder().with_bind_default().with_custom_tls(tls).build();
    let url = format!("https://127.0.0.1:{}/wt?protocol=switchboard.v1", s.wt.unwrap().port());
    let conn = wtransport::Endpoint::client(client).unwrap().connect(url).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap().await.unwrap();
    send.write_all(b"{\"id\":1,\"cmd\":\"ping\"}\n").await.unwrap();
    let mut got = Vec::new();
    while !got.contains(&b'\n') {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), recv.read(&mut chunk))
            .await
            .expect("a reply within 30 s")
            .unwrap()
            .expect("the stream is open");
        got.extend_from_slice(&chunk[..n]);
    }
    let reply: Value = serde_json::from_slice(&got[..got.iter().position(|b| *b == b'\n').unwrap()]).unwrap();
    assert_eq!(reply["id"], 1, "{reply}");
    let _ = std::fs::remove_dir_all(&dir);
}
