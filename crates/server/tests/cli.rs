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
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}"), "--drain-secs", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    wait_healthy(&base).await;
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
    let port = free_port();
    let child = Command::new(BIN)
        .args(["serve"])
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_API__KEYS", "env-key-0123456789")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _proc = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
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

    let port = free_port();
    let child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _proc = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
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
    let port = free_port();
    let child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", &format!("localhost:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _proc = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    let http = reqwest::Client::new();
    let r = http.get(format!("{base}/poll?channel=chat:1&token={token}")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // The token's claim still limits it.
    let r = http.get(format!("{base}/poll?channel=news:1&token={token}")).send().await.unwrap();
    assert_eq!(r.status(), 403);
}
