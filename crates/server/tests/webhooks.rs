//! Outgoing webhooks against a real receiver process (tests/webhooks/receiver.py, whose
//! signature check is the Python snippet of docs/webhooks.md): every event arrives through
//! failures of each kind, signed, at least once and dedupable to exactly once; the
//! dead-letter list and replay; kill -9 mid-retry loses nothing; a receiver that never
//! answers never holds up publishing; bad configuration is refused by `config check`; and
//! the documentation's verification snippets run (where their toolchain is installed).

mod common;
#[path = "../../redis/tests/common/cluster.rs"]
mod rcluster;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{config, TestServer};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const SECRET: &str = "whsec-test-0123456789abcdef";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sb-webhooks-{name}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A port nothing listens on, never handed out before in this process (to a receiver,
/// a node or a Redis Cluster's server).
fn free_port() -> u16 {
    rcluster::free_port()
}

/// The receiver process: its port and the file it logs each request to.
struct Receiver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Receiver {
    /// Starts receiver.py on `port` (0: any); its first `fail` requests fail as `mode` says.
    fn start(port: u16, log: &Path, fail: usize, mode: &str) -> Receiver {
        let script = root().join("tests/webhooks/receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args([port.to_string(), log.display().to_string(), SECRET.to_string()])
            .args(["--fail", &fail.to_string(), "--mode", mode])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("port ").and_then(|p| p.parse().ok()).expect("the receiver's port");
        Receiver { child, port, log: log.to_path_buf() }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Every request it logged.
    fn requests(&self) -> Vec<Value> {
        requests(&self.log)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The requests logged so far. Only whole lines count: the receiver may be writing its
/// next line while this reads, and a read can see part of it.
fn requests(log: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Event id → type, of the requests answered 200 (each id once, however often it came).
fn delivered(log: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for r in requests(log).iter().filter(|r| r["status"] == 200) {
        for (id, ty) in r["events"].as_array().unwrap().iter().zip(r["types"].as_array().unwrap()) {
            out.insert(id.as_str().unwrap().to_string(), ty.as_str().unwrap().to_string());
        }
    }
    out
}

/// The events of the requests answered 200: (type, data), in the order they came.
fn told(rx: &Receiver) -> Vec<(String, Value)> {
    rx.requests()
        .iter()
        .filter(|r| r["status"] == 200)
        .flat_map(|r| {
            let types = r["types"].as_array().unwrap().clone();
            types.into_iter().map(|t| t.as_str().unwrap().to_string()).zip(r["data"].as_array().unwrap().clone())
        })
        .collect()
}

/// Waits (bounded) until `done` holds for the receiver's log.
async fn until(what: &str, log: &Path, done: impl Fn(&[Value]) -> bool) {
    for _ in 0..1200 {
        if done(&requests(log)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 60 s; the receiver saw {:#?}", requests(log));
}

const PUBS: &str = "[\"publication\"]";
const ALL: &str = "[\"channel.occupied\", \"channel.vacated\", \"presence.join\", \"presence.leave\", \
    \"publication\", \"connection.opened\", \"connection.closed\"]";

/// An endpoint named `app` for `events` (a TOML array), with `extra` keys.
fn endpoint(url: &str, events: &str, extra: &str) -> String {
    format!(
        "[[webhooks.endpoints]]\nname = \"app\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\n\
         events = {events}\npublications = \"all\"\ntimeout_ms = 1000\nbreaker_cooldown_ms = 100\n{extra}"
    )
}

fn webhooks(dir: &Path, extra: &str) -> String {
    format!(
        "[namespaces.room]\npresence = true\njoin_leave = true\nallow_publish = true\n\
         [webhooks]\ndir = \"{}\"\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\n{extra}",
        dir.display()
    )
}

async fn metric(s: &TestServer, name: &str) -> u64 {
    let text = s.http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
        .unwrap_or_else(|| panic!("{name} is not in /metrics")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_signed_through_500s_timeouts_and_closed_connections() {
    for (mode, fail) in [("500", 3), ("timeout", 2), ("close", 2)] {
        let dir = temp("modes");
        let rx = Receiver::start(0, &dir.join("log"), fail, mode);
        let s = TestServer::start(config(&(webhooks(&dir, "") + &endpoint(&rx.url(), ALL, "")))).await;
        // A client joins a room with presence, publishes, and the API publishes; then it leaves.
        let mut c = switchboard_client::Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
        c.call(json!({"cmd": "connect"})).await.unwrap();
        c.call(json!({"cmd": "subscribe", "channel": "room:1"})).await.unwrap();
        let meta = json!({"headers": [["trace", "t-1"]]});
        let once =
            json!({"cmd": "publish", "channel": "room:1", "data": {"from": "client"}, "key": "k1", "meta": meta});
        c.call(once.clone()).await.unwrap();
        // A retry under the same key publishes nothing, and tells no webhook.
        assert_eq!(c.call(once).await.unwrap()["duplicate"], true);
        s.publish("room:1", json!({"from": "api"})).await;
        drop(c);
        let want = [
            "connection.opened",
            "channel.occupied",
            "presence.join",
            "publication",
            "presence.leave",
            "channel.vacated",
            "connection.closed",
        ];
        until(&format!("every event type ({mode})"), &rx.log, |_| {
            let types: Vec<String> = delivered(&rx.log).into_values().collect();
            want.iter().all(|w| types.iter().any(|t| t == w))
                && types.iter().filter(|t| *t == "publication").count() == 2
        })
        .await;
        let reqs = rx.requests();
        // Every request was signed, and verifies with the documented check.
        assert!(reqs.iter().all(|r| r["verified"] == true), "{reqs:#?}");
        // The failures came first and were retried: each event was seen at least once,
        // some more than once — deduped by id to exactly one of each.
        let failed = reqs.iter().filter(|r| r["status"] != 200).count();
        assert!(failed >= fail.min(1), "{mode}: {reqs:#?}");
        let ids = delivered(&rx.log);
        assert_eq!(ids.len(), 8, "{mode}: one of each event, two publications: {ids:#?}");
        // The publications say who published.
        let pubs: Vec<Value> = reqs
            .iter()
            .filter(|r| r["status"] == 200)
            .flat_map(|r| {
                let types = r["types"].as_array().unwrap().clone();
                let data = r["data"].as_array().unwrap().clone();
                types.into_iter().zip(data).filter(|(t, _)| t == "publication").map(|(_, d)| d)
            })
            .collect();
        let publishers: BTreeSet<String> = pubs.iter().map(|p| p["publisher"].to_string()).collect();
        assert!(publishers.contains("{\"server\":true}"), "{pubs:#?}");
        assert!(pubs.iter().all(|p| p["channel"] == "room:1" && p["offset"].is_u64()), "{pubs:#?}");
        // A publication's properties come with it (the API's publication has none).
        let metas: BTreeSet<String> = pubs.iter().map(|p| p["meta"].to_string()).collect();
        assert_eq!(metas, BTreeSet::from([meta.to_string(), "null".to_string()]), "{pubs:#?}");
        assert!(metric(&s, "switchboard_webhook_events_sent_total").await >= 8);
        assert!(metric(&s, "switchboard_webhook_requests_failed_total").await >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_past_the_horizon_leaves_events_dead_and_replay_delivers_them() {
    let dir = temp("dead");
    let port = free_port(); // nothing listens there yet: connection refused
    let url = format!("http://127.0.0.1:{port}/hook");
    let extra = "horizon_secs = 1\n";
    let s = TestServer::start(config(&(webhooks(&dir, extra) + &endpoint(&url, PUBS, "")))).await;
    for n in 0..3 {
        s.publish("news:1", json!(n)).await;
    }
    let mut dead = Value::Null;
    for _ in 0..1200 {
        let (_, v) = s.get_json("/api/webhooks/dead").await;
        if v["total"] == 3 {
            dead = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead["total"], 3, "three dead letters within 60 s: {dead}");
    let d = &dead["dead"][0];
    assert_eq!((d["endpoint"].as_str(), d["error"].as_str()), (Some("app"), Some("connection failed")), "{d}");
    assert!(d["attempts"].as_u64().unwrap() >= 1 && d["event"]["type"] == "publication", "{d}");
    assert_eq!(metric(&s, "switchboard_webhook_events_dead_total").await, 3);
    assert_eq!(metric(&s, "switchboard_webhook_queue_depth").await, 0);
    // The receiver comes up; replay delivers them all.
    let rx = Receiver::start(port, &dir.join("log"), 0, "500");
    let (status, v) = s.post_raw("/api/webhooks/replay", json!({"endpoint": "app"}).to_string()).await;
    assert_eq!((status, &v["replayed"]), (200, &json!(3)), "{v}");
    until("the replayed events", &rx.log, |_| delivered(&rx.log).len() == 3).await;
    let ids: BTreeSet<String> =
        dead["dead"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().into()).collect();
    assert_eq!(delivered(&rx.log).into_keys().collect::<BTreeSet<_>>(), ids, "the same events, by id");
    assert_eq!(s.get_json("/api/webhooks/dead").await.1["total"], 0);
    // An unknown endpoint is an error; so is a server without webhooks.
    let (status, _) = s.post_raw("/api/webhooks/replay", json!({"endpoint": "nope"}).to_string()).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_carry_several_events_each_with_its_own_id() {
    let dir = temp("batch");
    let rx = Receiver::start(0, &dir.join("log"), 0, "500");
    // A batch waits for 10 events (or 10 minutes): however fast or slow the publishes
    // come, 30 events are exactly 3 requests. (The store's unit test covers the timed flush.)
    let ep = endpoint(&rx.url(), PUBS, "batch_max = 10\nbatch_ms = 600000\n");
    let s = TestServer::start(config(&(webhooks(&dir, "") + &ep))).await;
    for n in 0..30 {
        s.publish("news:b", json!(n)).await;
    }
    until("30 events", &rx.log, |_| delivered(&rx.log).len() == 30).await;
    let reqs = rx.requests();
    let sizes: Vec<usize> = reqs.iter().map(|r| r["events"].as_array().unwrap().len()).collect();
    assert_eq!(sizes, [10, 10, 10], "{reqs:#?}");
    // A batch's request id is its own; the events keep theirs.
    assert!(reqs.iter().all(|r| r["id"].as_str().unwrap().starts_with("bat_")), "{reqs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_does_not_hold_up_publishing_and_overflow_is_counted() {
    let dir = temp("hang");
    let rx = Receiver::start(0, &dir.join("log"), 1_000_000, "hang");
    let ep = endpoint(&rx.url(), PUBS, "concurrency = 1\n").replace("timeout_ms = 1000", "timeout_ms = 600000");
    let s = TestServer::start(config(&(webhooks(&dir, "max_pending = 10\n") + &ep))).await;
    // 100 publishes complete while the receiver holds its first request unanswered.
    for n in 0..100 {
        s.publish("news:h", json!(n)).await;
    }
    assert_eq!(metric(&s, "switchboard_webhook_queue_depth").await, 10);
    assert_eq!(metric(&s, "switchboard_webhook_events_dropped_total").await, 90);
}

/// A server process, killed when dropped (a failing test leaves none behind).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGKILL, and reaped.
    fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

fn serve_binary(config: &Path, port: u16) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn wait_healthy(base: &str) {
    for _ in 0..500 {
        if reqwest::get(format!("{base}/healthz")).await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server at {base} never became healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_retry_loses_nothing_pending() {
    let dir = temp("kill");
    let log = dir.join("log");
    // A receiver that fails everything, for now.
    let failing = Receiver::start(0, &log, 1_000_000, "500");
    let rx_port = failing.port;
    let cfg = dir.join("switchboard.toml");
    let ep = endpoint(&failing.url(), PUBS, "");
    std::fs::write(&cfg, webhooks(&dir.join("queue"), "") + &ep).unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = serve_binary(&cfg, port);
    wait_healthy(&base).await;
    let http = reqwest::Client::new();
    for n in 0..20 {
        let r = http.post(format!("{base}/api/publish")).json(&json!({"channel": "news:k", "data": n})).send().await;
        assert_eq!(r.unwrap().status(), 200);
    }
    // Every event has been attempted (and failed) at least once: mid-retry.
    until("a failed attempt of each event", &log, |reqs| {
        let tried: BTreeSet<&str> =
            reqs.iter().flat_map(|r| r["events"].as_array().unwrap()).filter_map(|e| e.as_str()).collect();
        tried.len() == 20
    })
    .await;
    server.kill(); // SIGKILL
    drop(failing);
    // The receiver is back, healthy; so is the node: everything pending arrives.
    let rx = Receiver::start(rx_port, &dir.join("log2"), 0, "500");
    let server = serve_binary(&cfg, port);
    wait_healthy(&base).await;
    until("all 20 events after the restart", &rx.log, |_| delivered(&rx.log).len() == 20).await;
    let datas: BTreeSet<u64> = rx
        .requests()
        .iter()
        .flat_map(|r| r["data"].as_array().unwrap().clone())
        .map(|d| d["data"].as_u64().unwrap())
        .collect();
    assert_eq!(datas, (0..20).collect::<BTreeSet<u64>>());
    drop(server);
}

#[test]
fn config_check_refuses_bad_endpoints_with_the_key_and_the_reason() {
    let dir = temp("config");
    let cases = [
        ("url = \"ftp://example.com/hook\"\nsecrets = [\"0123456789abcdef\"]", "url", "http:// or https://"),
        ("url = \"https://example.com/hook\"\nsecrets = [\"\"]", "secrets", "at least 16 bytes"),
        ("url = \"https://example.com/hook\"\nsecrets = []", "secrets", "at least one secret"),
        ("url = \"https://e.com/\"\nsecrets = [\"0123456789abcdef\"]\nevents = [\"nope\"]", "events", "unknown event"),
    ];
    for (endpoint, key, reason) in cases {
        let file = dir.join("bad.toml");
        std::fs::write(&file, format!("[[webhooks.endpoints]]\n{endpoint}\n")).unwrap();
        let out = Command::new(BIN).args(["config", "check", "--dev"]).arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{endpoint}: {err}");
        assert!(err.contains(&format!("webhooks.endpoints[0].{key}")) && err.contains(reason), "{endpoint}: {err}");
    }
}

/// The fenced block of `lang` under the heading `### {title}` of docs/webhooks.md.
fn doc_snippet(title: &str, lang: &str) -> String {
    let doc = std::fs::read_to_string(root().join("docs/webhooks.md")).unwrap();
    let section = doc.split(&format!("### {title}\n")).nth(1).unwrap_or_else(|| panic!("no ### {title}"));
    let block = section.split(&format!("```{lang}\n")).nth(1).unwrap();
    block.split("\n```").next().unwrap().to_string() + "\n"
}

/// A signed sample: (timestamp, body, signature header) with two secrets, as in a rotation.
fn sample() -> (u64, String, String) {
    let ts = switchboard_server::auth::unix_now();
    let body = r#"{"events":[{"id":"evt_1","type":"publication"}]}"#.to_string();
    let secrets = ["whsec-old-0123456789abcdef".to_string(), SECRET.to_string()];
    let sig = switchboard_server::webhooks::signature_header(&secrets, ts, body.as_bytes());
    (ts, body, sig)
}

#[test]
fn the_python_snippet_is_the_receivers_and_verifies() {
    let receiver = std::fs::read_to_string(root().join("tests/webhooks/receiver.py")).unwrap();
    let tested =
        receiver.split("# --- docs/webhooks.md: python ---\n").nth(1).unwrap().split("# --- end ---").next().unwrap();
    assert_eq!(doc_snippet("Python", "python"), tested, "docs/webhooks.md's Python snippet is receiver.py's");
    // (receiver.py runs it against every request of the delivery tests.)
}

#[test]
fn the_node_snippet_verifies_good_signatures_and_refuses_bad_ones() {
    let (ts, body, sig) = sample();
    let harness = format!(
        "{}\nconst h = {{ 'switchboard-timestamp': '{ts}', 'switchboard-signature': process.argv[2] }};\n\
         console.log(verify(['{SECRET}'], h, Buffer.from(process.argv[3])));\n",
        doc_snippet("Node", "js")
    );
    let file = temp("node").join("verify.mjs");
    std::fs::write(&file, harness).unwrap();
    let run = |sig: &str, body: &str| {
        let out = Command::new("node").arg(&file).args([sig, body]).output().expect("node");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&sig, &body), "true");
    assert_eq!(run(&sig, &body.replace("evt_1", "evt_2")), "false", "a changed body");
    assert_eq!(run(&sig.replace("v1=", "v1=0"), &body), "false", "a changed signature");
}

// --- docs/webhooks.md: rust ---
/// True when one of the `v1=` signatures is HMAC-SHA256(secret, "timestamp.body") for one
/// of `secrets` and the timestamp is within `tolerance_secs` of `now` (Unix seconds).
/// (`ring` compares in constant time.)
fn verify(secrets: &[&[u8]], timestamp: &str, signature: &str, body: &[u8], now: u64, tolerance_secs: u64) -> bool {
    let Ok(ts) = timestamp.parse::<u64>() else { return false };
    if ts.abs_diff(now) > tolerance_secs {
        return false;
    }
    let given: Vec<Vec<u8>> = signature
        .split(',')
        .filter_map(|p| p.strip_prefix("v1="))
        .filter_map(|hex| (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect())
        .collect();
    secrets.iter().any(|secret| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let signed = [timestamp.as_bytes(), b".", body].concat();
        given.iter().any(|g| ring::hmac::verify(&key, &signed, g).is_ok())
    })
}
// --- end ---

#[test]
fn the_rust_snippet_is_this_one_and_verifies() {
    let me = std::fs::read_to_string(root().join("crates/server/tests/webhooks.rs")).unwrap();
    let tested =
        me.split("// --- docs/webhooks.md: rust ---\n").nth(1).unwrap().split("// --- end ---").next().unwrap();
    assert_eq!(doc_snippet("Rust", "rust"), tested, "docs/webhooks.md's Rust snippet is this file's");
    let (ts, body, sig) = sample();
    let now = switchboard_server::auth::unix_now();
    assert!(verify(&[SECRET.as_bytes()], &ts.to_string(), &sig, body.as_bytes(), now, 300));
    assert!(!verify(&[b"wrong-secret-0123456789"], &ts.to_string(), &sig, body.as_bytes(), now, 300));
    assert!(!verify(&[SECRET.as_bytes()], &ts.to_string(), &sig, b"{}", now, 300));
    assert!(!verify(&[SECRET.as_bytes()], &ts.to_string(), &sig, body.as_bytes(), now + 3600, 300), "replayed late");
}

#[test]
fn the_go_snippet_verifies_where_go_is_installed() {
    if Command::new("go").arg("version").output().is_err() {
        eprintln!("go is not installed here: the Go snippet is not run");
        return;
    }
    let (ts, body, sig) = sample();
    let dir = temp("go");
    let main = format!(
        "package main\n\n{}\nfunc main() {{\n\tfmt.Println(Verify([][]byte{{[]byte(\"{SECRET}\")}}, \"{ts}\", os.Args[1], []byte(os.Args[2]), 300))\n}}\n",
        doc_snippet("Go", "go").replace("import (\n", "import (\n\t\"fmt\"\n\t\"os\"\n")
    );
    std::fs::write(dir.join("main.go"), main).unwrap();
    let run = |sig: &str, body: &str| {
        let out = Command::new("go").arg("run").arg(dir.join("main.go")).args([sig, body]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&sig, &body), "true");
    assert_eq!(run(&sig, "{}"), "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_redis_two_nodes_share_the_queue_occupancy_is_told_once_and_a_killed_node_loses_nothing() {
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbwh{}", fastrand::u64(..));
    let broker = format!("[broker]\nkind = \"redis\"\nredis_url = \"{url}\"\nredis_prefix = \"{prefix}\"\n");
    two_nodes_share_the_queue(broker).await;
}

/// The same over a Redis Cluster of three masters (the test's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_redis_cluster_two_nodes_share_the_queue_occupancy_is_told_once_and_a_killed_node_loses_nothing() {
    let cluster = tokio::task::block_in_place(|| rcluster::RedisCluster::start(3, 0));
    let url = cluster.url();
    let broker =
        format!("[broker]\nkind = \"redis\"\nredis_cluster = true\nredis_url = \"{url}\"\nredis_prefix = \"sbwh\"\n");
    two_nodes_share_the_queue(broker).await;
    drop(cluster);
}

async fn two_nodes_share_the_queue(broker: String) {
    let dir = temp("redis");
    let log = dir.join("log");
    // It never answers: each attempt times out (1 s), so whenever node A dies it holds
    // events in flight — which node B takes over once they have been idle long enough.
    let failing = Receiver::start(0, &log, 1_000_000, "hang");
    let rx_port = failing.port;
    let cfg = dir.join("switchboard.toml");
    let events = "[\"publication\", \"channel.occupied\", \"channel.vacated\"]";
    std::fs::write(&cfg, broker + &webhooks(&dir.join("unused"), "") + &endpoint(&failing.url(), events, "")).unwrap();
    let (pa, pb) = (free_port(), free_port());
    let (a, b) = (format!("http://127.0.0.1:{pa}"), format!("http://127.0.0.1:{pb}"));
    let mut node_a = serve_binary(&cfg, pa);
    let node_b = serve_binary(&cfg, pb);
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    // A subscriber of news:r on each node: the channel is occupied once, for the cluster.
    let http = reqwest::Client::new();
    let sse_a = http.get(format!("{a}/sse?channel=news:r")).send().await.unwrap();
    let sse_b = http.get(format!("{b}/sse?channel=news:r")).send().await.unwrap();
    assert_eq!((sse_a.status().as_u16(), sse_b.status().as_u16()), (200, 200));
    for n in 0..20 {
        let r = http.post(format!("{a}/api/publish")).json(&json!({"channel": "news:r", "data": n})).send().await;
        assert_eq!(r.unwrap().status(), 200);
    }
    until("a failed attempt of every publication", &log, |reqs| {
        let types: Vec<(&str, &str)> = reqs
            .iter()
            .flat_map(|r| r["events"].as_array().unwrap().iter().zip(r["types"].as_array().unwrap()))
            .filter_map(|(id, t)| Some((id.as_str()?, t.as_str()?)))
            .collect();
        types.iter().filter(|(_, t)| *t == "publication").map(|(id, _)| id).collect::<BTreeSet<_>>().len() == 20
    })
    .await;
    // Node A dies mid-retry; the receiver recovers; A comes back.
    node_a.kill();
    drop(failing);
    let rx = Receiver::start(rx_port, &dir.join("log2"), 0, "500");
    let node_a = serve_binary(&cfg, pa);
    wait_healthy(&a).await;
    until("all 20 publications and one occupied", &rx.log, |_| {
        let d = delivered(&rx.log);
        d.values().filter(|t| *t == "publication").count() == 20 && d.values().any(|t| t == "channel.occupied")
    })
    .await;
    let datas: BTreeSet<u64> =
        told(&rx).into_iter().filter(|(t, _)| t == "publication").map(|(_, d)| d["data"].as_u64().unwrap()).collect();
    assert_eq!(datas, (0..20).collect::<BTreeSet<u64>>());
    // Occupancy: two nodes had subscribers, the cluster was occupied once (across both
    // receivers: the first may have seen its attempts fail).
    let occupied: BTreeSet<String> = [&log, &rx.log]
        .iter()
        .flat_map(|l| requests(l))
        .flat_map(|r| {
            let ids = r["events"].as_array().unwrap().clone();
            ids.into_iter().zip(r["types"].as_array().unwrap().clone())
        })
        .filter(|(_, t)| t == "channel.occupied")
        .map(|(id, _)| id.as_str().unwrap().to_string())
        .collect();
    assert_eq!(occupied.len(), 1, "one channel.occupied for the cluster: {occupied:?}");
    drop((sse_a, sse_b, node_a, node_b));
}

/// A node that dies with subscribers tells no leave: its channels stay occupied until the
/// other nodes reap it — then `channel.vacated` is told for each channel it alone
/// occupied, and a channel another node still occupies stays occupied, untold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_redis_a_dead_nodes_channels_are_vacated_by_the_nodes_that_outlive_it() {
    let url = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sbwh{}", fastrand::u64(..));
    let dir = temp("reap");
    let rx = Receiver::start(0, &dir.join("log"), 0, "500");
    let broker = format!("[broker]\nkind = \"redis\"\nredis_url = \"{url}\"\nredis_prefix = \"{prefix}\"\n");
    let events = "[\"channel.occupied\", \"channel.vacated\"]";
    let cfg = broker + &webhooks(&dir.join("unused"), "") + &endpoint(&rx.url(), events, "");
    let s = TestServer::start(config(&cfg)).await;
    // A node that died (it registered no heartbeat): it occupied news:gone alone, and
    // news:both beside this node's subscriber.
    let ghost = switchboard_redis::Occupancy::new(&url, &prefix, "ghost").unwrap();
    assert!(ghost.set("news:gone", true).await.unwrap());
    assert!(ghost.set("news:both", true).await.unwrap());
    let sse = s.http.get(s.url("/sse?channel=news:both")).send().await.unwrap();
    assert_eq!(sse.status(), 200);
    let redis = redis::Client::open(url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let mut recorded = false;
    for _ in 0..600 {
        let key = format!("{prefix}:occupied:{{news:both}}");
        let here: bool = redis::cmd("SISMEMBER").arg(&key).arg(&s.state.node_id).query_async(&mut conn).await.unwrap();
        if here {
            recorded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recorded, "this node's subscriber of news:both reached the occupancy");
    let mut missing = std::collections::HashMap::new();
    switchboard_server::webhooks::reap_dead_nodes(&s.state, &mut missing, Duration::ZERO).await;
    assert!(!ghost.listed().await.unwrap(), "the dead node is reaped");
    until("channel.vacated", &rx.log, |_| delivered(&rx.log).values().any(|t| t == "channel.vacated")).await;
    // Once more: nothing left to reap, nothing more told.
    switchboard_server::webhooks::reap_dead_nodes(&s.state, &mut missing, Duration::ZERO).await;
    let events: Vec<(String, String)> =
        told(&rx).into_iter().map(|(t, d)| (t, d["channel"].as_str().unwrap_or_default().to_string())).collect();
    assert_eq!(events, vec![("channel.vacated".to_string(), "news:gone".to_string())]);
    drop(sse);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_rests_a_failing_endpoint_after_its_failures_in_a_row() {
    let dir = temp("breaker");
    let rx = Receiver::start(0, &dir.join("log"), 1_000_000, "500");
    let ep = endpoint(&rx.url(), PUBS, "concurrency = 1\nbreaker_failures = 2\n")
        .replace("breaker_cooldown_ms = 100", "breaker_cooldown_ms = 600000");
    let s = TestServer::start(config(&(webhooks(&dir, "") + &ep))).await;
    for n in 0..5 {
        s.publish("news:br", json!(n)).await;
    }
    until("two failed requests", &rx.log, |reqs| reqs.len() >= 2).await;
    // Retries are due every 200 ms at most; the breaker holds them all for 10 minutes.
    // (Waiting longer can only let a broken breaker show more requests.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.requests().len(), 2, "{:#?}", rx.requests());
    assert_eq!(metric(&s, "switchboard_webhook_queue_depth").await, 5);
}
