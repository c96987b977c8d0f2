//! TLS and HTTP/2 with real clients: curl (HTTP/2 and HTTP/1.1 over TLS), the Rust
//! client over `wss://`, a raw TLS client for what no well-behaved client sends
//! (malformed HTTP/2 frames), and certificates made here by rcgen: a CA of the test's
//! own, an expired certificate, a client certificate for mutual TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{channel, config, tls_connect, Proxy, TestServer};
use serde_json::{json, Value};
use switchboard_client::{Client, ClientOptions, ConnectOptions, Connection, Event, WsError};
use switchboard_server::tls::dev_certificate;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sb-tls-{tag}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A TLS server on the development certificate in `dir`, with a plain listener beside it
/// serving the test's own HTTP requests.
async fn tls_server(dir: &Path, extra: &str) -> TestServer {
    let d = dev_certificate(dir, false).unwrap();
    TestServer::start(config(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nhttp_listen = \"127.0.0.1:0\"\nhttp_mode = \"serve\"\n{extra}",
        d.cert, d.key
    )))
    .await
}

fn https(s: &TestServer, path: &str) -> String {
    format!("https://localhost:{}{path}", s.addr.port())
}

fn wss(s: &TestServer, path: &str) -> String {
    format!("wss://localhost:{}{path}", s.addr.port())
}

fn trusting(dir: &Path) -> ConnectOptions {
    ConnectOptions {
        ca_pem: Some(std::fs::read(dir.join("ca.pem")).unwrap()),
        platform_roots: false,
        ..Default::default()
    }
}

/// Runs curl; returns (exit code, stdout).
async fn curl(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl").args(["-sS", "--max-time", "30"]).args(args).output().await.unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// curl's `%{http_version}` and body for a request, over TLS with the test CA.
async fn curl_tls(version: &str, ca: &Path, extra: &[&str], url: &str) -> (String, String) {
    let ca = ca.to_str().unwrap();
    let mut args = vec![version, "--cacert", ca, "-w", "\n%{http_version}"];
    args.extend_from_slice(extra);
    args.push(url);
    let (code, out) = curl(&args).await;
    assert_eq!(code, 0, "curl {args:?} failed: {out}");
    let (body, v) = out.rsplit_once('\n').unwrap();
    (v.to_string(), body.to_string())
}

#[tokio::test]
async fn curl_publishes_polls_and_streams_sse_over_http2_and_http11() {
    let dir = tempdir("curl");
    let s = tls_server(&dir, "").await;
    let ca = dir.join("ca.pem");
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let ch = channel("tls");
        let body = json!({"channel": ch, "data": {"via": flag}}).to_string();
        let (v, out) = curl_tls(
            flag,
            &ca,
            &["-X", "POST", "-H", "content-type: application/json", "--data", &body],
            &https(&s, "/api/publish"),
        )
        .await;
        assert_eq!(v, version);
        let published: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(published["offset"], 1);
        let since = format!("{}:0", published["epoch"].as_str().unwrap());
        let (v, out) = curl_tls(flag, &ca, &[], &https(&s, &format!("/poll?channel={ch}&since={since}"))).await;
        assert_eq!(v, version);
        let polled: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(polled["messages"][0]["data"], json!({"via": flag}), "{polled}");

        // SSE: `curl -N` resuming from the start reads the publication, then a live one.
        let mut child = tokio::process::Command::new("curl")
            .args(["-sSN", flag, "--cacert", ca.to_str().unwrap(), "--max-time", "60", "-i"])
            .arg(https(&s, &format!("/sse?channel={ch}&last_event_id={since}")))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let status = lines.next_line().await.unwrap().unwrap();
        assert!(status.starts_with(&format!("HTTP/{version} 200")), "{status}");
        let mut data = Vec::new();
        let mut seen = Vec::new();
        while data.len() < 2 {
            let line = lines.next_line().await.unwrap().unwrap_or_else(|| panic!("{flag}: the stream ended: {seen:?}"));
            seen.push(line.clone());
            let event = line.strip_prefix("data: ").map(|d| serde_json::from_str::<Value>(d).unwrap());
            // Publications only (the stream starts with `event: subscribed`).
            if let Some(p) = event.filter(|p| p.get("offset").is_some() && p.get("data").is_some()) {
                data.push(p["data"].clone());
                if data.len() == 1 {
                    s.publish(&ch, json!({"live": true})).await;
                }
            }
        }
        assert_eq!(data, vec![json!({"via": flag}), json!({"live": true})]);
        child.kill().await.unwrap();

        // The served files and the admin page, over the same protocol.
        for (path, marker) in [("/client.js", "Switchboard"), ("/client.d.ts", "Switchboard"), ("/admin", "<html")] {
            let (v, body) = curl_tls(flag, &ca, &[], &https(&s, path)).await;
            assert_eq!(v, version, "{path}");
            assert!(body.contains(marker), "{path}: {}", &body[..body.len().min(200)]);
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn the_rust_client_subscribes_publishes_and_resumes_over_wss() {
    let dir = tempdir("wss");
    let s = tls_server(&dir, "[namespaces.chat]\nallow_publish = true\n").await;
    let ch = channel("chat");

    // One connection: subscribe, publish, receive — and messages larger than a TLS record.
    let mut c = Connection::connect_with(&wss(&s, "/ws"), trusting(&dir)).await.unwrap();
    assert!(c.ws.tls);
    c.subscribe(&ch, None).await.unwrap();
    c.publish(&ch, json!("hello")).await.unwrap();
    assert_eq!(c.next_pub().await.unwrap()["data"], "hello");
    let big = "x".repeat(60_000);
    for _ in 0..20 {
        s.publish(&ch, json!(big)).await;
    }
    for i in 0..20 {
        assert_eq!(c.next_pub().await.unwrap()["data"].as_str().map(str::len), Some(60_000), "message {i}");
    }

    // The resilient client resumes after a cut connection, from its position, nothing
    // missed (through a TCP proxy: the TLS session is end to end).
    let proxy = Proxy::start(s.addr).await;
    let mut opts = ClientOptions::new([format!("wss://localhost:{}/ws", proxy.port)]);
    opts.connect = trusting(&dir);
    opts.backoff_base = Duration::from_millis(50);
    let client = Client::start(opts);
    let ch2 = channel("chat");
    let mut sub = client.subscribe(&ch2, None);
    let mut state = client.state();
    state.wait_for(|s| matches!(s, switchboard_client::ConnState::Connected { .. })).await.unwrap();
    client.publish(&ch2, json!(1)).await.unwrap();
    let first = sub.next().await.unwrap();
    assert!(matches!(&first, Event::Publication(p) if p["data"] == 1), "{first:?}");
    // Cut the connection and publish while the client is away.
    proxy.cut();
    state.wait_for(|s| !matches!(s, switchboard_client::ConnState::Connected { .. })).await.unwrap();
    s.publish(&ch2, json!(2)).await;
    s.publish(&ch2, json!(3)).await;
    proxy.restore();
    let mut got = Vec::new();
    while got.len() < 2 {
        match sub.next().await.unwrap() {
            Event::Publication(p) => got.push(p["data"].clone()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, vec![json!(2), json!(3)]);
    client.close();
    s.shutdown().await;
}

#[tokio::test]
async fn wss_refuses_a_server_it_cannot_verify() {
    let dir = tempdir("untrusted");
    let s = tls_server(&dir, "").await;
    // Not the server's CA: the platform's roots only.
    let e = Connection::connect(&wss(&s, "/ws")).await.err().expect("an unverifiable server must be refused");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // A CA file that holds no certificate is an error of its own, before connecting.
    let bad = ConnectOptions { ca_pem: Some(b"not a certificate".to_vec()), ..Default::default() };
    match Connection::connect_with(&wss(&s, "/ws"), bad).await {
        Err(switchboard_client::ClientError::Ws(WsError::Tls(m))) => assert!(m.contains("no PEM certificate"), "{m}"),
        Err(e) => panic!("expected a TLS configuration error, got {e}"),
        Ok(_) => panic!("connected without a usable CA"),
    }
    s.shutdown().await;
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_a_clear_error() {
    let dir = tempdir("plain");
    let s = tls_server(&dir, "").await;
    let r = reqwest::get(format!("http://{}/healthz", s.addr)).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "tls_required", "{v}");
    // A ws:// client at the wss:// port: refused with the same answer, not left hanging.
    match Connection::connect(&format!("ws://{}/ws", s.addr)).await {
        Err(switchboard_client::ClientError::Ws(WsError::Refused { status: 400, body })) => {
            assert!(body.contains("tls_required"), "{body}")
        }
        Err(e) => panic!("expected a 400, got {e}"),
        Ok(_) => panic!("a plain WebSocket on the TLS port must be refused"),
    }
    s.shutdown().await;
}

#[tokio::test]
async fn an_unknown_server_name_gets_the_configured_certificate_and_fails_verification() {
    let dir = tempdir("sni");
    let s = tls_server(&dir, "").await;
    let ca = dir.join("ca.pem");
    let resolve = format!("unknown.example:{}:127.0.0.1", s.addr.port());
    let url = format!("https://unknown.example:{}/healthz", s.addr.port());
    let (code, _) = curl(&["--cacert", ca.to_str().unwrap(), "--resolve", &resolve, &url]).await;
    // 60: the peer's certificate does not match the name (curl's own code for it).
    assert_eq!(code, 60);
    // The server goes on serving the names it has.
    let (v, body) = curl_tls("--http2", &ca, &[], &https(&s, "/healthz")).await;
    assert_eq!((v.as_str(), body.contains("ok")), ("2", true), "{body}");
    s.shutdown().await;
}

/// A CA of the test's own and a certificate it signs.
struct Pki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = p.self_signed(&key).unwrap();
        Pki { ca_pem: ca.pem(), issuer: rcgen::Issuer::new(p, key) }
    }

    /// (certificate PEM, key PEM), valid from `from` to `to` days from now.
    fn issue(&self, names: &[&str], client: bool, from: i64, to: i64) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("client"));
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(from);
        p.not_after = now + time::Duration::days(to);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[tokio::test]
async fn an_expired_certificate_stops_the_server_at_start_with_a_clear_error() {
    let dir = tempdir("expired");
    let pki = Pki::new();
    let (cert, key) = pki.issue(&["localhost"], false, -30, -1);
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let c = config(&format!("[tls]\ncert = {:?}\nkey = {:?}\n", dir.join("cert.pem"), dir.join("key.pem")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e =
        switchboard_server::Server::new(c, true, listener).await.err().expect("an expired certificate must not serve");
    let msg = format!("{e:#}");
    assert!(msg.contains("expired"), "{msg}");
    assert!(msg.contains("cert.pem"), "the error names the file: {msg}");
}

#[tokio::test]
async fn mutual_tls_guards_the_server_api_and_leaves_the_client_endpoints_open() {
    let dir = tempdir("mtls");
    let pki = Pki::new();
    std::fs::write(dir.join("clients.pem"), &pki.ca_pem).unwrap();
    let (cert, key) = pki.issue(&["backend"], true, -1, 30);
    std::fs::write(dir.join("client.pem"), cert).unwrap();
    std::fs::write(dir.join("client-key.pem"), key).unwrap();
    let d = dev_certificate(&dir, false).unwrap();
    let s = TestServer::start(config(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        d.cert,
        d.key,
        dir.join("clients.pem")
    )))
    .await;
    let ca = d.ca.to_str().unwrap().to_string();
    let publish = json!({"channel": channel("m"), "data": 1}).to_string();
    let post = ["-X", "POST", "-H", "content-type: application/json", "--data", publish.as_str()];
    // Without a client certificate: the API refuses.
    let (_, out) = curl_tls("--http2", Path::new(&ca), &post, &https(&s, "/api/publish")).await;
    assert!(out.contains("client_certificate_required"), "{out}");
    // With one the CA signed: accepted.
    let cert = dir.join("client.pem");
    let key = dir.join("client-key.pem");
    let with_cert = [&post[..], &["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]].concat();
    let (_, out) = curl_tls("--http2", Path::new(&ca), &with_cert, &https(&s, "/api/publish")).await;
    assert!(out.contains("\"offset\":1"), "{out}");
    // Browser-facing endpoints ask for no certificate.
    let (_, out) = curl_tls("--http2", Path::new(&ca), &[], &https(&s, "/healthz")).await;
    assert!(out.contains("ok"), "{out}");
    s.shutdown().await;
}

#[tokio::test]
async fn the_plain_listener_redirects_to_https_and_answers_health_checks() {
    let dir = tempdir("redirect");
    let d = dev_certificate(&dir, false).unwrap();
    let s = TestServer::start(config(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nhttp_listen = \"127.0.0.1:0\"\n",
        d.cert, d.key
    )))
    .await;
    let plain = s.plain.unwrap();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = http.post(format!("http://{plain}/api/publish?x=1")).header("host", "example.com").send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], format!("https://example.com:{}/api/publish?x=1", s.addr.port()));
    let r = http.get(format!("http://{plain}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown().await;
}

#[tokio::test]
async fn malformed_http2_frames_get_a_goaway_and_nothing_else_breaks() {
    let dir = tempdir("h2bad");
    let s = tls_server(&dir, "").await;
    let ca = dir.join("ca.pem");
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // A SETTINGS frame whose length is no multiple of 6 (FRAME_SIZE_ERROR); a HEADERS
    // frame on stream 0 (PROTOCOL_ERROR); a frame longer than the peer allows; garbage.
    let bad: Vec<Vec<u8>> = vec![
        [PREFACE, &[0, 0, 5, 0x4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]].concat(),
        [PREFACE, &[0, 0, 0, 0x4, 0, 0, 0, 0, 0], &[0, 0, 1, 0x1, 0x4, 0, 0, 0, 0, 0x82]].concat(),
        [PREFACE, &[0, 0, 0, 0x4, 0, 0, 0, 0, 0], &[0xff, 0xff, 0xff, 0x0, 0x1, 0, 0, 0, 1]].concat(),
        b"this is not HTTP/2 at all\r\n\r\n".to_vec(),
    ];
    for (i, bytes) in bad.iter().enumerate() {
        let mut tls = tls_connect(s.addr, &ca, b"h2").await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
        tls.write_all(bytes).await.unwrap();
        let mut got = Vec::new();
        // The server closes the connection (a timeout here would be a hang).
        let closed = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut got)).await;
        assert!(closed.is_ok(), "case {i}: the connection was left open");
        if i == bad.len() - 1 {
            // No HTTP/2 preface: nothing to answer in HTTP/2, the connection just ends.
            continue;
        }
        // The server's frames: its SETTINGS, then a GOAWAY (type 7).
        let mut at = 0;
        let mut types = Vec::new();
        while at + 9 <= got.len() {
            let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
            types.push(got[at + 3]);
            at += 9 + len;
        }
        assert!(types.contains(&7), "case {i}: no GOAWAY among frame types {types:?}");
    }
    // No panic anywhere, and the server serves h2 as before.
    assert_eq!(s.state.metrics.task_panics.load(std::sync::atomic::Ordering::Relaxed), 0);
    let (v, body) = curl_tls("--http2", &ca, &[], &https(&s, "/healthz")).await;
    assert_eq!((v.as_str(), body.contains("ok")), ("2", true));
    s.shutdown().await;
}

/// Whether a TLS handshake trusting only the CA in `ca` succeeds: which certificate the
/// server presents now.
async fn presented_by(s: &TestServer, ca: &Path) -> bool {
    tls_connect(s.addr, ca, b"http/1.1").await.is_ok()
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections_and_live_ones_stay_up() {
    let old = tempdir("reload-old");
    let new = tempdir("reload-new");
    let live = tempdir("reload-live");
    // The server's files start as the old pair; a second pair (another CA) waits aside.
    let a = dev_certificate(&old, false).unwrap();
    let b = dev_certificate(&new, false).unwrap();
    std::fs::copy(&a.cert, live.join("cert.pem")).unwrap();
    std::fs::copy(&a.key, live.join("key.pem")).unwrap();
    let s = TestServer::start(config(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nhttp_listen = \"127.0.0.1:0\"\nhttp_mode = \"serve\"\nreload_check_secs = 1\n",
        live.join("cert.pem"),
        live.join("key.pem")
    )))
    .await;
    let ch = channel("reload");
    let mut c = Connection::connect_with(&wss(&s, "/ws"), trusting(&old)).await.unwrap();
    c.subscribe(&ch, None).await.unwrap();
    assert!(presented_by(&s, &a.ca).await);
    assert!(!presented_by(&s, &b.ca).await);

    // Replace the files (a certificate renewal): the server notices the change.
    std::fs::copy(&b.key, live.join("key.pem.tmp")).unwrap();
    std::fs::copy(&b.cert, live.join("cert.pem.tmp")).unwrap();
    std::fs::rename(live.join("key.pem.tmp"), live.join("key.pem")).unwrap();
    std::fs::rename(live.join("cert.pem.tmp"), live.join("cert.pem")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !presented_by(&s, &b.ca).await {
        assert!(tokio::time::Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!presented_by(&s, &a.ca).await, "new connections get the new certificate only");
    // The connection made under the old certificate is still up and receiving.
    s.publish(&ch, json!("after the reload")).await;
    assert_eq!(c.next_pub().await.unwrap()["data"], "after the reload");
    assert_eq!(c.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));

    // A broken pair (a key that does not match) is refused; the current one stays.
    std::fs::copy(&a.key, live.join("key.pem")).unwrap();
    let e = s.state.tls.as_ref().unwrap().reload().expect_err("a mismatched pair must be refused");
    assert!(e.contains("match"), "{e}");
    assert!(presented_by(&s, &b.ca).await);
    s.shutdown().await;
}

#[tokio::test]
async fn the_rust_client_speaks_rfc_8441_subscribing_and_resuming_over_an_http2_stream() {
    let dir = tempdir("rfc8441");
    let s = tls_server(&dir, "").await;
    let h2 = ConnectOptions { http2: true, ..trusting(&dir) };
    let ch = channel("h2");
    let mut c = Connection::connect_with(&wss(&s, "/ws"), h2.clone()).await.unwrap();
    assert!(c.ws.http2 && c.ws.tls);
    let ok = c.subscribe(&ch, None).await.unwrap();
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    assert_eq!(c.next_pub().await.unwrap()["data"], 1);
    drop(c);
    // Published while away; resumed on a new stream from offset 1.
    s.publish(&ch, json!(2)).await;
    s.publish(&ch, json!(3)).await;
    let mut c = Connection::connect_with(&wss(&s, "/ws"), h2.clone()).await.unwrap();
    let resumed = c.subscribe(&ch, Some(&format!("{epoch}:1"))).await.unwrap();
    assert_eq!((resumed["recovered"].clone(), resumed["replayed"].clone()), (json!(true), json!(2)), "{ok} {resumed}");
    assert_eq!(c.next_pub().await.unwrap()["data"], 2);
    assert_eq!(c.next_pub().await.unwrap()["data"], 3);
    assert_eq!(s.state.metrics.ws_over_http2.load(std::sync::atomic::Ordering::Relaxed), 2);
    s.shutdown().await;

    // A server with HTTP/2 off offers only HTTP/1.1: the client says so.
    let s = tls_server(&dir, "[http2]\nenabled = false\n").await;
    match Connection::connect_with(&wss(&s, "/ws"), h2).await {
        Err(switchboard_client::ClientError::Ws(WsError::Handshake(m))) => assert!(m.contains("HTTP/2"), "{m}"),
        Err(e) => panic!("expected a handshake error, got {e}"),
        Ok(_) => panic!("RFC 8441 without HTTP/2"),
    }
    s.shutdown().await;
}
