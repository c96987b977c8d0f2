//! Test helpers: a real server on a loopback port, and small SSE/HTTP clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use switchboard_server::{Config, Server};
use tokio::sync::oneshot;

pub mod mqtt;
pub mod nats;
pub mod wt;

pub struct TestServer {
    pub addr: SocketAddr,
    /// The plain-HTTP listener beside a TLS one (`[tls] http_listen`), if configured.
    pub plain: Option<SocketAddr>,
    /// The MQTT listener (`[mqtt] listen`), if configured.
    pub mqtt: Option<SocketAddr>,
    /// The MQTT-over-TLS listener (`[mqtt] tls_listen`), if configured.
    pub mqtt_tls: Option<SocketAddr>,
    /// The WebTransport listener (`[webtransport] listen`, UDP), if configured.
    pub wt: Option<SocketAddr>,
    /// The running server's state: its metrics, its clock.
    pub state: switchboard_server::AppState,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        Self::start_with(config, true).await
    }

    pub async fn start_with(config: Config, dev: bool) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Server::new(config, dev, listener).await.unwrap();
        let addr = server.local_addr().unwrap();
        let plain = server.http_local_addr();
        let mqtt = server.mqtt_local_addr();
        let mqtt_tls = server.mqtt_tls_local_addr();
        let wt = server.webtransport_local_addr();
        let state = server.state.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(
                    async move {
                        let _ = rx.await;
                    },
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
        });
        TestServer {
            addr,
            plain,
            mqtt,
            mqtt_tls,
            wt,
            state,
            http: reqwest::Client::new(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A plain-HTTP URL of the server: the main listener, or for a TLS server the plain
    /// listener beside it (the helpers' reqwest client speaks no TLS; TLS tests use
    /// curl and the Rust client).
    pub fn url(&self, path: &str) -> String {
        match (&self.state.tls, self.plain) {
            (Some(_), Some(plain)) => format!("http://{plain}{path}"),
            _ => format!("http://{}{}", self.addr, path),
        }
    }

    /// Publishes and returns `(epoch, offset)`.
    pub async fn publish(&self, channel: &str, data: Value) -> (String, u64) {
        let r = self
            .http
            .post(self.url("/api/publish"))
            .json(&serde_json::json!({"channel": channel, "data": data}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "publish failed: {}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        (v["epoch"].as_str().unwrap().to_string(), v["offset"].as_u64().unwrap())
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r =
            self.http.post(self.url(path)).header("content-type", "application/json").body(body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// A value in `/metrics`: the first series whose line starts with `series`.
    pub async fn metric(&self, series: &str) -> u64 {
        let text = self.http.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or_else(|| panic!("{series} is not in /metrics")) as u64
    }

    /// Waits until `n` connections of `transport` are parked (waiting without a task of
    /// their own).
    pub async fn parked(&self, transport: &str, n: u64) {
        let series = format!("switchboard_parked_connections{{transport=\"{transport}\"}}");
        for _ in 0..600 {
            if self.metric(&series).await >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never {n} parked {transport} connections");
    }

    /// Stops the server the way SIGTERM would and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A dev-mode config with the given TOML merged over the defaults.
pub fn config(toml: &str) -> Config {
    let path = std::env::temp_dir().join(format!("sbtest-{}-{}.toml", std::process::id(), fastrand_id()));
    std::fs::write(&path, toml).unwrap();
    let c = Config::load(Some(&path), Vec::new()).unwrap();
    let _ = std::fs::remove_file(&path);
    c
}

fn fastrand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1_000_003
        + std::time::SystemTime::now().elapsed().map(|d| d.as_nanos() as u64).unwrap_or(7)
}

/// A unique channel name in `ns`.
pub fn channel(ns: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{ns}:t{}", N.fetch_add(1, Ordering::Relaxed))
}

/// One parsed SSE event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
    pub retry: Option<u64>,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

/// A streaming SSE client that parses events as the spec says (comments skipped).
pub struct Sse {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
    pub last_id: Option<String>,
    pub comments: usize,
    /// The last `retry:` value seen.
    pub retry: Option<u64>,
}

impl Sse {
    pub async fn connect(server: &TestServer, query: &str, last_event_id: Option<&str>) -> Sse {
        // A connection of its own, as an EventSource opens: the stream is served outside
        // hyper (tests/sse.rs covers one that follows another request on a connection).
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let mut req = fresh.get(server.url(&format!("/sse?{query}")));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "sse refused: {}", r.text().await.unwrap_or_default());
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        Sse { stream: r.bytes_stream().boxed(), buf: String::new(), last_id: None, comments: 0, retry: None }
    }

    /// The next event (not comments), or `None` when the stream ends. Panics after 20 s.
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(Duration::from_secs(20), self.next_inner()).await.expect("no SSE event within 20 s")
    }

    async fn next_inner(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut ev = SseEvent { event: "message".into(), ..Default::default() };
                let mut data = Vec::new();
                let mut any = false;
                for line in block.lines() {
                    if line.is_empty() {
                        continue;
                    }
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    match k {
                        "id" => {
                            ev.id = Some(v.to_string());
                            self.last_id = Some(v.to_string());
                        }
                        "event" => {
                            ev.event = v.to_string();
                            any = true
                        }
                        "data" => {
                            data.push(v.to_string());
                            any = true
                        }
                        "retry" => {
                            ev.retry = v.parse().ok();
                            self.retry = ev.retry;
                        }
                        other => panic!("unknown SSE field {other:?}"),
                    }
                }
                ev.data = data.join("\n");
                if any {
                    return Some(ev);
                }
                continue;
            }
            match self.stream.next().await {
                Some(Ok(b)) => self.buf.push_str(std::str::from_utf8(&b).expect("SSE is UTF-8")),
                _ => return None,
            }
        }
    }

    /// The next event named `name`, skipping others.
    pub async fn next_named(&mut self, name: &str) -> SseEvent {
        loop {
            let e = self.next().await.unwrap_or_else(|| panic!("stream ended before a {name:?} event"));
            if e.event == name {
                return e;
            }
        }
    }

    /// The offsets of the next `n` message events on `channel`.
    pub async fn offsets(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let e = self.next_named("message").await;
            out.push(e.json()["offset"].as_u64().unwrap());
        }
        out
    }
}

/// A TCP proxy whose connections can be cut.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = std::sync::Arc::default();
        let (c2, cut2) = (conns.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else { return };
                if cut2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c2.lock().unwrap().push(h);
            }
        });
        Proxy { port, cut, conns }
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A TLS connection to `addr` as `localhost`, trusting only the CA certificate(s) in
/// `ca`, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &std::path::Path,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await
}
