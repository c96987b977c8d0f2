//! Durable history (`serve --data-dir`): the real binary is killed with SIGKILL and started
//! again; clients resume on WebSocket, SSE and polling from the last position they saw —
//! nothing missing, nothing twice, the same epoch. A corrupted tail starts cleanly and is
//! reported; a journal that cannot be written is a publish error (`storage_full`), not a
//! crash. Revocations and MQTT persistent sessions survive the kill too, and WebTransport
//! resumes like WebSocket after a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sb-durable-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Node {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(data: &Path, port: u16, extra: &[&str]) -> Node {
    let log = data.with_extension(format!("log{}", fastrand::u32(..)));
    let child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node = Node { child, base: format!("http://127.0.0.1:{port}"), log };
    for _ in 0..500 {
        if reqwest::get(format!("{}/healthz", node.base)).await.is_ok_and(|r| r.status() == 200) {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server never became healthy: {}", std::fs::read_to_string(&node.log).unwrap_or_default());
}

async fn publish(base: &str, channel: &str, data: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/publish"))
        .json(&json!({"channel": channel, "data": data}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// SSE from `since` (a cursor): the `n` next publications' data.
async fn sse_from(base: &str, channel: &str, since: &str, n: usize) -> Vec<Value> {
    let r = reqwest::Client::new()
        .get(format!("{base}/sse?channel={channel}"))
        .header("Last-Event-ID", since)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let (mut buf, mut out) = (String::new(), Vec::new());
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.unwrap().unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            if event.lines().any(|l| l == "event: reset") {
                panic!("reset instead of a resume: {event}");
            }
            if event.lines().any(|l| l == "event: message") {
                let data = event.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                out.push(serde_json::from_str::<Value>(data).unwrap());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_clients_resume_on_every_transport_with_nothing_missing_or_repeated() {
    let data = temp("kill");
    let port = free_port();
    let node = start(&data, port, &[]).await;
    let ch = "news:durable";
    let mut epoch = String::new();
    for n in 1..=10 {
        let (status, v) = publish(&node.base, ch, json!(n)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["offset"], n);
        epoch = v["epoch"].as_str().unwrap().to_string();
    }
    // Killed: no drain, no flush, nothing said.
    let mut node = node;
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let node = start(&data, port, &[]).await;
    // The same epoch goes on.
    for n in 11..=12 {
        let (_, v) = publish(&node.base, ch, json!(n)).await;
        assert_eq!((v["epoch"].as_str(), v["offset"].as_u64()), (Some(epoch.as_str()), Some(n)), "{v}");
    }
    let since = format!("{epoch}:5");
    let want: Vec<Value> = (6..=12).map(|n| json!(n)).collect();
    // SSE, with Last-Event-ID.
    let got: Vec<Value> = sse_from(&node.base, ch, &since, 7).await.iter().map(|p| p["data"].clone()).collect();
    assert_eq!(got, want, "SSE");
    // Polling, with since.
    let (_, v) = {
        let r = reqwest::get(format!("{}/poll?channel={ch}&since={since}", node.base)).await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    let got: Vec<Value> = v["messages"].as_array().unwrap().iter().map(|p| p["data"].clone()).collect();
    assert_eq!(got, want, "poll: {v}");
    assert_eq!(v["resets"], json!([]));
    // WebSocket, subscribing with since.
    let ws = node.base.replace("http://", "ws://") + "/ws";
    let mut c = switchboard_client::Connection::connect(&ws).await.unwrap();
    let r = c.call(json!({"cmd": "subscribe", "channel": ch, "since": since})).await.unwrap();
    assert_eq!(r["recovered"], true, "{r}");
    let mut got = Vec::new();
    while got.len() < 7 {
        let m = c.next_push().await.unwrap();
        if let Some(p) = m.get("pub") {
            got.push(p["data"].clone());
        }
    }
    assert_eq!(got, want, "WebSocket");
    // And the recovery was logged.
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("history recovered"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_tail_starts_cleanly_and_is_reported() {
    let data = temp("torn");
    let port = free_port();
    let node = start(&data, port, &["--drain-secs", "0"]).await;
    for n in 1..=3 {
        publish(&node.base, "news:t", json!(n)).await;
    }
    drop(node); // SIGKILL
                // Truncate the file mid-record: the last record loses its end.
    let path = data.join("history.journal");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let node = start(&data, port, &[]).await;
    let (_, v) = publish(&node.base, "news:t", json!(4)).await;
    // The third publication's record was cut: the channel goes on after the second.
    assert_eq!(v["offset"], 3, "{v}");
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("torn last write were cut off"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_cannot_grow_is_a_publish_error_not_a_crash() {
    let data = temp("full");
    let port = free_port();
    // A file-size limit stands in for a full disk: writes past it fail (EFBIG as ENOSPC).
    let log = data.with_extension("log");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let lim = libc::rlimit { rlim_cur: 200_000, rlim_max: 200_000 };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let _node = Node { child, base: base.clone(), log: log.clone() };
    for _ in 0..500 {
        if reqwest::get(format!("{base}/healthz")).await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let big = "x".repeat(16 * 1024);
    let mut stored = 0;
    let refusal = loop {
        let (status, v) = publish(&base, "news:full", json!(big)).await;
        if status != 200 {
            break (status, v);
        }
        stored += 1;
        assert!(stored < 100, "200 KB of journal never filled");
    };
    assert_eq!((refusal.0, refusal.1["error"]["code"].as_str()), (507, Some("storage_full")), "{:?}", refusal.1);
    assert!(stored >= 5, "{stored}");
    // The server lives on; what was stored is there, the refused one is not.
    assert!(reqwest::get(format!("{base}/healthz")).await.unwrap().status().is_success());
    let h: Value =
        reqwest::get(format!("{base}/api/history?channel=news:full&limit=1000")).await.unwrap().json().await.unwrap();
    assert_eq!(h["publications"].as_array().unwrap().len(), stored, "{}", h["offset"]);
    assert_eq!(h["offset"], stored);
    // Still full: still refused cleanly, the channel unchanged.
    let (status, _) = publish(&base, "news:full", json!(big)).await;
    assert_eq!(status, 507);
    let (status, _) = publish(&base, "news:other", json!(big)).await;
    assert_eq!(status, 507);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_and_mqtt_sessions_survive_kill_9() {
    use common::mqtt::Mqtt;
    let data = temp("companions");
    let (port, mqtt_port) = (free_port(), free_port());
    let cfg = data.with_extension("toml");
    // (`news` configured: the MQTT topic news/m is the channel news:m.)
    std::fs::write(&cfg, format!("[mqtt]\nlisten = \"127.0.0.1:{mqtt_port}\"\n[namespaces.news]\n")).unwrap();
    let cfg_arg = ["--config", cfg.to_str().unwrap()];
    let node = start(&data, port, &cfg_arg).await;
    let http = reqwest::Client::new();
    let r =
        http.post(format!("{}/api/revoke", node.base)).json(&json!({"user": "mallory", "ttl_secs": 600})).send().await;
    assert_eq!(r.unwrap().status(), 200);
    // A device with a persistent session subscribes, then goes away; three publications
    // arrive for it meanwhile.
    let mqtt: std::net::SocketAddr = format!("127.0.0.1:{mqtt_port}").parse().unwrap();
    let (mut dev, _) = Mqtt::connect_session(mqtt, true, "sensor-9", false, 3600).await;
    assert_eq!(dev.subscribe_qos("news/m", None, 1).await.0, 1);
    dev.disconnect().await;
    for n in 1..=3 {
        assert_eq!(publish(&node.base, "news:m", json!(n)).await.0, 200);
    }
    let mut node = node;
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let node = start(&data, port, &cfg_arg).await;
    // The revocation holds: mallory's token is refused.
    let token = Command::new(BIN).args(["token", "--dev", "--user", "mallory"]).output().unwrap();
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let r = reqwest::get(format!("{}/sse?channel=news:x&token={token}", node.base)).await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("token_revoked")), "{v}");
    // The device's session is there, and what it missed comes.
    let (mut dev, present) = Mqtt::connect_session(mqtt, true, "sensor-9", false, 3600).await;
    assert!(present, "the session survived the kill");
    let mut got = Vec::new();
    while got.len() < 3 {
        let (topic, payload, _) = dev.next_publish().await.unwrap();
        assert_eq!(topic, "news/m");
        got.push(String::from_utf8(payload).unwrap());
    }
    assert_eq!(got, ["1", "2", "3"]);
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("revocations recovered"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_resumes_after_a_restart_like_websocket() {
    use common::wt::Wt;
    let data = temp("wt");
    let conf = |d: &Path| {
        let mut c = common::config("[webtransport]\nlisten = \"127.0.0.1:0\"\n");
        c.broker.data_dir = Some(d.to_path_buf());
        c
    };
    let epoch = {
        let s = common::TestServer::start(conf(&data)).await;
        let mut epoch = String::new();
        for n in 1..=6 {
            epoch = s.publish("news:wt", json!(n)).await.0;
        }
        // Gone without a shutdown; the journal is all that is left.
        drop(s);
        epoch
    };
    let s = common::TestServer::start(conf(&data)).await;
    let mut wt = Wt::connect(&s, "").await;
    let mut seen = Vec::new();
    let r = wt
        .command(json!({"cmd": "subscribe", "channel": "news:wt", "since": format!("{epoch}:2")}), 1, &mut seen)
        .await;
    assert_eq!(r["ok"]["recovered"], true, "{r}");
    let mut got: Vec<Value> = seen.iter().filter_map(|l| l.get("pub").map(|p| p["data"].clone())).collect();
    while got.len() < 4 {
        let l = wt.next().await.unwrap();
        if let Some(p) = l.get("pub") {
            got.push(p["data"].clone());
        }
    }
    assert_eq!(got, [json!(3), json!(4), json!(5), json!(6)]);
}
