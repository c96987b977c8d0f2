//! The real binary: `switchboard serve` and `switchboard config check`, as a user runs them.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::SseEvent;
use futures_util::StreamExt;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_healthy(base: &str) {
    let http = reqwest::Client::new();
    for _ in 0..500 {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server at {base} never became healthy");
}

/// Starts the binary on a free port — `configure` gives it its arguments and environment
/// — and waits until it is healthy: the process and its base URL.
async fn serve(configure: impl FnOnce(&mut Command, u16)) -> (Proc, String) {
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    configure(&mut cmd, port);
    let proc = Proc(cmd.spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    (proc, base)
}

/// Reads SSE events from a raw byte stream until `n` message events were seen.
async fn read_messages(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    n: usize,
) -> Vec<SseEvent> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk =
            tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("event").expect("open").unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            let mut ev = SseEvent::default();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    ev.id = Some(v.into());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    ev.event = v.into();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    ev.data = v.into();
                }
            }
            if ev.event == "message" {
                out.push(ev);
            }
        }
    }
    out
}

#[tokio::test]
async fn serve_dev_streams_resumes_after_reconnect_and_exits_cleanly_on_sigterm() {
    let (mut proc, base) = serve(|c, port| {
        c.args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}"), "--drain-secs", "5"])
            .stderr(Stdio::piped());
    })
    .await;
    let http = reqwest::Client::new();
    let publish = |i: u64| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let r = http
                .post(format!("{base}/api/publish"))
                .json(&json!({"channel": "news:1", "data": {"n": i}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    let r = http.get(format!("{base}/sse?channel=news:1")).send().await.unwrap();
    let mut stream = r.bytes_stream();
    for i in 1..=3 {
        publish(i).await;
    }
    let got = read_messages(&mut stream, 3).await;
    let last_id = got[2].id.clone().unwrap();
    drop(stream); // the user kills curl
    for i in 4..=6 {
        publish(i).await;
    }
    let r = http.get(format!("{base}/sse?channel=news:1")).header("Last-Event-ID", &last_id).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let resumed = read_messages(&mut stream, 3).await;
    let ns: Vec<u64> = resumed
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.data).unwrap()["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![4, 5, 6]);

    let status = Command::new("kill").args(["-TERM", &proc.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    // The open stream is told to reconnect, then ends.
    let mut rest = String::new();
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        rest.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(rest.contains("event: disconnect"), "no disconnect event before the stream ended: {rest:?}");
    let code = tokio::task::spawn_blocking(move || proc.0.wait().unwrap()).await.unwrap();
    assert!(code.success(), "exit status {code:?}");
}

#[test]
fn serve_without_dev_or_api_keys_refuses_to_start() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .env_remove("SWITCHBOARD_API__KEYS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dev") && err.contains("api.keys"), "{err}");
}

#[tokio::test]
async fn env_overrides_reach_the_server() {
    let (_proc, base) = serve(|c, port| {
        c.args(["serve"])
            .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
            .env("SWITCHBOARD_API__KEYS", "env-key-0123456789");
    })
    .await;
    let r = reqwest::Client::new()
        .get(format!("{base}/api/channels"))
        .bearer_auth("env-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn config_check_accepts_good_files_and_explains_bad_ones() {
    let dir = std::env::temp_dir();
    let good = dir.join(format!("sb-good-{}.toml", std::process::id()));
    std::fs::write(&good, "listen = \"127.0.0.1:9000\"\n[namespaces.chat]\nhistory_size = 50\n").unwrap();
    // Every check `serve` makes: without API keys it would not start, so this is no OK…
    let out = Command::new(BIN).args(["config", "check"]).arg(&good).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server API keys"));
    // …unless it is for `serve --dev`.
    let out = Command::new(BIN).args(["config", "check", "--dev"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // With keys it starts; an empty origin allowlist is worth a warning.
    std::fs::write(&good, "[api]\nkeys = [\"check-key-0123456789\"]\n").unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("allowed_origins is empty"));
    std::fs::write(
        &good,
        "[api]\nkeys = [\"check-key-0123456789\"]\n[security]\nallowed_origins = [\"https://app.example.com\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&good).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 warning(s)"));
    // The example file is valid for `serve --dev`, the README's first command.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../switchboard.example.toml");
    let out = Command::new(BIN).args(["config", "check", "--dev"]).arg(&example).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.join(format!("sb-bad-{}.toml", std::process::id()));
    std::fs::write(&bad, "[namespaces.chat]\nhistory_size = \"lots\"\n").unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("namespaces.chat.history_size"), "{err}");

    std::fs::write(&bad, "[namespaces.chat\n").unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_file(&good);
    let _ = std::fs::remove_file(&bad);
}

#[tokio::test]
async fn the_token_helper_mints_tokens_the_server_accepts() {
    let dir = std::env::temp_dir();
    let cfg = dir.join(format!("sb-token-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[auth]\nalgorithm = \"HS256\"\nhmac_secret = \"cli-secret-0123456789abcdef01234567\"\n[namespaces.chat]\nrequire_token = true\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["token", "--user", "alice", "--channels", "chat:*", "--ttl", "10m", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let bad_ttl =
        Command::new(BIN).args(["token", "--user", "a", "--ttl", "soon", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(bad_ttl.status.code(), Some(2));

    let (_proc, base) = serve(|c, port| {
        c.args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}"), "--config"]).arg(&cfg);
    })
    .await;
    let http = reqwest::Client::new();
    let r = http.get(format!("{base}/poll?channel=chat:1&token={token}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(format!("{base}/poll?channel=chat:1")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(format!("{base}/poll?channel=news:1&token={token}")).send().await.unwrap();
    assert_eq!(r.status(), 403, "outside the token's channels");
    let _ = std::fs::remove_file(&cfg);
}

#[tokio::test]
async fn a_dev_token_works_against_the_dev_server_as_the_readme_shows() {
    let out = Command::new(BIN)
        .args(["token", "--dev", "--user", "alice", "--channels", "chat:*", "--ttl", "1h"])
        .env_remove("SWITCHBOARD_AUTH__ALGORITHM")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (_proc, base) = serve(|c, port| {
        c.args(["serve", "--dev", "--listen", &format!("localhost:{port}")]);
    })
    .await;
    let http = reqwest::Client::new();
    let r = http.get(format!("{base}/poll?channel=chat:1&token={token}")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // The token's claim still limits it.
    let r = http.get(format!("{base}/poll?channel=news:1&token={token}")).send().await.unwrap();
    assert_eq!(r.status(), 403);
}

/// The README's ```sh blocks, in order.
fn readme_sh_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut rest = readme.as_str();
    while let Some(i) = rest.find("```sh\n") {
        let body = &rest[i + 6..];
        let end = body.find("```").expect("an unclosed block in README.md");
        blocks.push(body[..end].to_string());
        rest = &body[end + 3..];
    }
    blocks
}

/// The JSON objects in a block's `# {...}` comments: what the README says comes out.
fn shown_outputs(block: &str) -> Vec<Value> {
    block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("# {").map(|j| format!("{{{j}")))
        .map(|j| {
            serde_json::from_str(&j.replace('…', "0")).unwrap_or_else(|e| panic!("README shows bad JSON {j}: {e}"))
        })
        .collect()
}

/// The keys of an object and of the objects inside it, as paths: what a shown output
/// and a real one must share.
fn shape(v: &Value, at: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            let path = format!("{at}/{k}");
            shape(v, &path, out);
            out.push(path);
        }
    }
    out.sort();
}

fn shape_of(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    shape(v, "", &mut out);
    out
}

/// A README command run by `sh` as a reader would run it — the same text, pointed at
/// the test's port and at the epoch the server really has — with `switchboard` on PATH.
struct Reader {
    port: u16,
    epoch: Option<String>,
}

impl Reader {
    fn command(&self, block: &str) -> tokio::process::Command {
        let mut text = block.replace("127.0.0.1:8000", &format!("127.0.0.1:{}", self.port));
        if let Some(epoch) = &self.epoch {
            text = text.replace("k3f9x0a1bz", epoch);
        }
        let bin_dir = std::path::Path::new(BIN).parent().unwrap();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").arg(text).env("PATH", path).stdin(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SWITCHBOARD_")) {
            c.env_remove(k);
        }
        c
    }

    /// Runs a block to its end; its standard output.
    async fn run(&self, block: &str) -> String {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(block).output())
            .await
            .expect("a README command hung")
            .unwrap();
        assert!(out.status.success(), "README command failed: {block}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts a block that streams (`curl -N`): its lines as they come.
    fn stream(&self, block: &str) -> Stream {
        let mut child = self.command(block).stdout(Stdio::piped()).spawn().unwrap();
        let out = tokio::io::BufReader::new(child.stdout.take().unwrap());
        Stream { _child: child, lines: tokio::io::AsyncBufReadExt::lines(out) }
    }
}

struct Stream {
    _child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Stream {
    /// The next SSE event of type `event`, as its `id` and `data` (others are skipped).
    async fn next_event(&mut self, event: &str) -> (String, Value) {
        let (mut id, mut name, mut data) = (String::new(), String::new(), String::new());
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
                .await
                .expect("no event from the README's curl")
                .unwrap()
                .expect("curl ended");
            if line.is_empty() {
                if name == event {
                    return (id, serde_json::from_str(&data).unwrap());
                }
                (id, name, data) = (String::new(), String::new(), String::new());
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = v.into();
            } else if let Some(v) = line.strip_prefix("event: ") {
                name = v.into();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = v.into();
            }
        }
    }
}

/// Waits until `channel` has a subscriber on the server (the README's curl is connected).
async fn wait_subscribed(base: &str, channel: &str) {
    let http = reqwest::Client::new();
    for _ in 0..3000 {
        let v: Value = http.get(format!("{base}/api/channels")).send().await.unwrap().json().await.unwrap();
        if v["channels"].as_array().unwrap().iter().any(|c| c["channel"] == channel) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the README's curl never subscribed to {channel}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_runs_as_written() {
    let blocks = readme_sh_blocks();
    let anchors = [
        "serve --dev",
        "curl -N 'http://127.0.0.1:8000/sse?channel=news:1'",
        "curl -X POST http://127.0.0.1:8000/api/publish",
        "Last-Event-ID: k3f9x0a1bz:1",
        "/poll?channel=news:1&since=k3f9x0a1bz:1&wait=30",
        "ws://127.0.0.1:8000/ws?channel=news:1",
        "TOKEN=$(switchboard token --dev",
    ];
    assert_eq!(blocks.len(), anchors.len(), "README.md's sh blocks changed: update this walkthrough");
    for (b, a) in blocks.iter().zip(anchors) {
        assert!(b.contains(a), "README block {b:?} no longer has {a:?}: update this walkthrough");
    }
    // 1. The server, as the first command starts it (on a free port).
    let (_server, base) = serve(|c, port| {
        c.args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}")]).env_remove("SWITCHBOARD_AUTH__ALGORITHM");
    })
    .await;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let mut reader = Reader { port, epoch: None };

    // Subscribe with SSE, publish from "another terminal": the subscriber prints the
    // event the README shows.
    let mut sse = reader.stream(&blocks[1]);
    wait_subscribed(&base, "news:1").await;
    let out = reader.run(&blocks[2]).await;
    let published: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(shape_of(&published), shape_of(&shown_outputs(&blocks[2])[0]), "publish output: {out}");
    assert_eq!(published["offset"], 1);
    let epoch = published["epoch"].as_str().unwrap().to_string();
    let (id, data) = sse.next_event("message").await;
    assert_eq!(id, format!("{epoch}:1"));
    assert_eq!(data["data"], json!({"text": "hello"}));
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let shown = readme.lines().find_map(|l| l.strip_prefix("data: ")).expect("the README shows an SSE event");
    assert_eq!(shape_of(&data), shape_of(&serde_json::from_str(shown).unwrap()));
    drop(sse); // "Kill curl"

    // "Publish a few more, and resume from the last id you saw": exactly what was missed.
    reader.epoch = Some(epoch.clone());
    reader.run(&blocks[2]).await;
    reader.run(&blocks[2]).await;
    let mut resumed = reader.stream(&blocks[3]);
    assert_eq!(resumed.next_event("message").await.0, format!("{epoch}:2"));
    assert_eq!(resumed.next_event("message").await.0, format!("{epoch}:3"));
    drop(resumed);

    // Polling: a cursor first, then what came after the README's `since`.
    let out = reader.run(&blocks[4]).await;
    // (One answer after the other, as curl prints them.)
    let answers: Vec<Value> = serde_json::Deserializer::from_str(&out).into_iter().map(Result::unwrap).collect();
    assert_eq!(answers.len(), 2, "{out}");
    assert_eq!(shape_of(&answers[0]), shape_of(&shown_outputs(&blocks[4])[0]));
    assert_eq!(answers[0]["cursor"], format!("{epoch}:3"));
    let offsets: Vec<&Value> = answers[1]["messages"].as_array().unwrap().iter().map(|m| &m["offset"]).collect();
    assert_eq!(offsets, [&json!(2), &json!(3)], "{out}");

    // The bare WebSocket (any client; the URL as written): subscribed, then a publication.
    let url = blocks[5].split('\'').nth(1).unwrap().replace("127.0.0.1:8000", &format!("127.0.0.1:{port}"));
    let mut ws = switchboard_client::Connection::connect(&url).await.unwrap();
    let subscribed = ws.next_push().await.unwrap();
    let shown = shown_outputs(&blocks[5]);
    assert_eq!(shape_of(&subscribed), shape_of(&shown[0]), "{subscribed}");
    reader.run(&blocks[2]).await;
    let publication = ws.next_push().await.unwrap();
    assert_eq!(shape_of(&publication), shape_of(&shown[1]), "{publication}");
    assert_eq!(publication["pub"]["offset"], 4);

    // Tokens: minted by the README's command, accepted by the README's server.
    let mut tokened = reader.stream(&blocks[6]);
    wait_subscribed(&base, "chat:1").await;
    let http = reqwest::Client::new();
    let r = http.post(format!("{base}/api/publish")).body(r#"{"channel":"chat:1","data":"hi"}"#).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, data) = tokened.next_event("message").await;
    assert_eq!(data["data"], "hi");
}

/// `curl --cacert ca https://localhost:port/healthz` succeeds: the server presents a
/// certificate that CA signed.
fn curl_trusts(ca: &std::path::Path, port: u16) -> bool {
    Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "30", "--cacert"])
        .arg(ca)
        .arg(format!("https://localhost:{port}/healthz"))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[tokio::test]
async fn cert_dev_doctor_and_serve_tls_with_a_reload_on_sighup() {
    let root = std::env::temp_dir().join(format!("sb-cli-tls-{}", std::process::id()));
    let (first, second, live) = (root.join("first"), root.join("second"), root.join("live"));
    std::fs::create_dir_all(&live).unwrap();
    // `cert dev` writes a CA and a certificate, and says how to trust them.
    for dir in [&first, &second] {
        let out = Command::new(BIN).args(["cert", "dev", "--dir"]).arg(dir).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--ignore-certificate-errors-spki-list="), "{text}");
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            assert!(dir.join(f).exists(), "{f}");
        }
    }
    std::fs::copy(first.join("cert.pem"), live.join("cert.pem")).unwrap();
    std::fs::copy(first.join("key.pem"), live.join("key.pem")).unwrap();

    // `doctor` reports the certificate's expiry (397 days for a development one).
    let out = Command::new(BIN)
        .args(["doctor", "--json"])
        .env("SWITCHBOARD_TLS__CERT", live.join("cert.pem"))
        .env("SWITCHBOARD_TLS__KEY", live.join("key.pem"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let days = v["tls_certificate"]["days_left"].as_i64().unwrap();
    assert!((395..=397).contains(&days), "{v}");
    assert_eq!(v["tls_certificate"]["ok"], true);

    // `serve` over TLS, certificate checks on SIGHUP only.
    // (The helper's port is the plain listener beside TLS, serving: it waits on that.)
    let port = free_port();
    let (mut proc, _) = serve(|cmd, plain| {
        cmd.args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}")])
            .env("SWITCHBOARD_TLS__CERT", live.join("cert.pem"))
            .env("SWITCHBOARD_TLS__KEY", live.join("key.pem"))
            .env("SWITCHBOARD_TLS__HTTP_LISTEN", format!("127.0.0.1:{plain}"))
            .env("SWITCHBOARD_TLS__HTTP_MODE", "serve")
            .env("SWITCHBOARD_TLS__RELOAD_CHECK_SECS", "0");
    })
    .await;
    assert!(curl_trusts(&first.join("ca.pem"), port));
    // Renewed files, then SIGHUP: new connections get the new certificate.
    std::fs::copy(second.join("key.pem"), live.join("key.pem")).unwrap();
    std::fs::copy(second.join("cert.pem"), live.join("cert.pem")).unwrap();
    assert!(curl_trusts(&first.join("ca.pem"), port), "no reload before the signal");
    let pid = proc.0.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let mut reloaded = false;
    for _ in 0..300 {
        if curl_trusts(&second.join("ca.pem"), port) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the certificate was not reloaded on SIGHUP");
    assert!(proc.0.try_wait().unwrap().is_none(), "SIGHUP must not stop the server");
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn serve_dev_tls_makes_the_development_certificate_and_serves_https() {
    let data = std::env::temp_dir().join(format!("sb-cli-devtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port();
    // The helper waits on the plain listener beside TLS; `--tls` itself needs no config.
    let (_proc, _) = serve(|cmd, plain| {
        cmd.args(["serve", "--dev", "--tls", "--listen", &format!("127.0.0.1:{port}")])
            .env("XDG_DATA_HOME", &data)
            .env("SWITCHBOARD_TLS__HTTP_LISTEN", format!("127.0.0.1:{plain}"))
            .env("SWITCHBOARD_TLS__HTTP_MODE", "serve");
    })
    .await;
    let ca = data.join("switchboard/dev-tls/ca.pem");
    assert!(ca.exists(), "serve --dev --tls writes the development CA where `cert dev` would");
    assert!(curl_trusts(&ca, port));
    let _ = std::fs::remove_dir_all(&data);
}
