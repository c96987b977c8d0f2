//! Many nodes as real processes, over a real Redis, a Redis Cluster (three masters of each
//! test's own) and a real NATS (a `nats-server -js` of each test's own): cross-node
//! delivery, resume on another node, rolling restarts with zero loss, a node killed with
//! SIGKILL — each on all three backplanes — Redis, a whole Redis Cluster and NATS going
//! away for 10 s, and a Redis Cluster master killed under publishing.

mod common;
#[path = "../../redis/tests/common/cluster.rs"]
mod rcluster;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats::OwnNats;
use serde_json::{json, Value};
use switchboard_client::{ClientError, Connection};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A port nothing listens on — and never one handed out before in this test process,
/// to a node or to a Redis Cluster's server: the kernel may give a probed port out again
/// as soon as the probe lets go of it, before what it was for binds it (two nodes of one
/// test were once given one port).
fn free_port() -> u16 {
    rcluster::free_port()
}

fn prefix() -> String {
    format!("sbcluster-{}-{}", std::process::id(), fastrand::u32(..))
}

/// What the nodes of a test share.
enum Backplane {
    /// The machine's Redis, under a prefix of the test's own.
    Redis,
    /// A NATS of the test's own.
    Nats(OwnNats),
    /// A Redis Cluster of the test's own.
    RedisCluster(rcluster::RedisCluster),
}

impl Backplane {
    async fn nats() -> Backplane {
        Backplane::Nats(OwnNats::new().await)
    }

    async fn redis_cluster(masters: usize, replicas: usize) -> Backplane {
        let c = tokio::task::spawn_blocking(move || rcluster::RedisCluster::start(masters, replicas)).await.unwrap();
        Backplane::RedisCluster(c)
    }

    fn env(&self, prefix: &str) -> Vec<(String, String)> {
        match self {
            Backplane::Redis => redis_env(prefix, &redis_url()),
            Backplane::RedisCluster(c) => {
                let mut v = redis_env(prefix, &c.url());
                v.push(("SWITCHBOARD_BROKER__REDIS_CLUSTER".to_string(), "true".to_string()));
                v
            }
            Backplane::Nats(n) => vec![
                ("SWITCHBOARD_BROKER__KIND".to_string(), "nats".to_string()),
                ("SWITCHBOARD_BROKER__NATS_URL".to_string(), n.url()),
                ("SWITCHBOARD_BROKER__NATS_PREFIX".to_string(), prefix.to_string()),
            ],
        }
    }
}

fn redis_env(prefix: &str, url: &str) -> Vec<(String, String)> {
    vec![
        ("SWITCHBOARD_BROKER__KIND".to_string(), "redis".to_string()),
        ("SWITCHBOARD_BROKER__REDIS_URL".to_string(), url.to_string()),
        ("SWITCHBOARD_BROKER__REDIS_PREFIX".to_string(), prefix.to_string()),
    ]
}

/// The tests that run on each backplane: `mod over_redis`, `mod over_redis_cluster` and
/// `mod over_nats` call the function of the same name with theirs.
macro_rules! on_each_backplane {
    ($($name:ident),+ $(,)?) => {
        mod over_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Backplane::Redis).await
                }
            )+
        }
        mod over_redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Backplane::redis_cluster(3, 0).await).await
                }
            )+
        }
        mod over_nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Backplane::nats().await).await
                }
            )+
        }
    };
}

on_each_backplane!(
    a_publish_on_one_node_reaches_websocket_and_sse_subscribers_on_others_in_order,
    a_client_resumes_on_another_node_with_nothing_lost,
    a_rolling_restart_of_three_nodes_loses_and_duplicates_nothing_for_a_thousand_clients,
    a_node_killed_with_sigkill_loses_its_presence_and_its_clients_resume_elsewhere,
);

/// Polls `check` until it holds; fails the test, saying what it waited for, if it does
/// not within `limit`. (Limits are generous: they catch a hang, they do not time
/// anything.)
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One Switchboard node process. Its log goes to a file, printed when a test fails.
struct Node {
    port: u16,
    child: Option<Child>,
    env: Vec<(String, String)>,
    log: std::path::PathBuf,
}

impl Node {
    fn start(port: u16, env: &[(String, String)]) -> Node {
        let log = std::env::temp_dir().join(format!("sbnode-{}-{port}.log", std::process::id()));
        let mut n = Node { port, child: None, env: env.to_vec(), log };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(BIN);
        // Only the configuration this test gives: nothing the test runner's own
        // environment happens to hold.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SWITCHBOARD_")) {
            cmd.env_remove(k);
        }
        let child = cmd
            .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{}", self.port), "--drain-secs", "5"])
            .envs(self.env.iter().cloned())
            // Its log (stdout) and any panic (stderr), both shown when a test fails.
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let url = format!("{}/readyz", self.base());
        wait_until(&format!("node {} to report ready", self.port), Duration::from_secs(120), || async {
            http.get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    /// SIGTERM, then wait for a clean exit.
    async fn stop(&mut self) {
        self.signal("-TERM");
        let mut child = self.child.take().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
        assert!(status.success(), "node exited with {status:?}");
    }

    async fn kill(&mut self) {
        self.signal("-KILL");
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- node {} log (last {} lines) ---", self.port, tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn env(backplane: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = backplane;
    v.extend([
        ("SWITCHBOARD_DEFAULTS__HISTORY_SIZE".to_string(), "20000".to_string()),
        ("SWITCHBOARD_DEFAULTS__HISTORY_TTL_SECS".to_string(), "600".to_string()),
    ]);
    v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    v
}

async fn cluster(backplane: &Backplane, n: usize, extra: &[(&str, &str)]) -> Vec<Node> {
    let e = env(backplane.env(&prefix()), extra);
    let nodes: Vec<Node> = (0..n).map(|_| Node::start(free_port(), &e)).collect();
    for node in &nodes {
        node.wait_ready().await;
    }
    nodes
}

async fn publish(
    http: &reqwest::Client,
    base: &str,
    ch: &str,
    data: Value,
    key: Option<&str>,
) -> Result<Value, String> {
    let mut body = json!({"channel": ch, "data": data});
    if let Some(k) = key {
        body["key"] = json!(k);
    }
    let r = http.post(format!("{base}/api/publish")).json(&body).send().await.map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("HTTP {}", r.status()));
    }
    r.json().await.map_err(|e| e.to_string())
}

/// Subscribers of `ch` across the cluster, as node `base` reports them.
async fn subscribers(http: &reqwest::Client, base: &str, ch: &str) -> Option<u64> {
    let v: Value = http.get(format!("{base}/api/channels")).send().await.ok()?.json().await.ok()?;
    v["channels"].as_array()?.iter().find(|c| c["channel"] == ch).and_then(|c| c["subscribers"].as_u64())
}

/// Reads the next `n` publication offsets (or fails on a close).
async fn offsets(c: &mut Connection, n: usize) -> Vec<u64> {
    let mut v = Vec::new();
    while v.len() < n {
        let p = tokio::time::timeout(Duration::from_secs(20), c.next_pub()).await.expect("in time").unwrap();
        v.push(p["offset"].as_u64().unwrap());
    }
    v
}

async fn a_publish_on_one_node_reaches_websocket_and_sse_subscribers_on_others_in_order(backplane: &Backplane) {
    let nodes = cluster(backplane, 3, &[]).await;
    let ch = format!("news:x{}", fastrand::u32(..));
    let mut ws = Connection::connect(&nodes[1].ws()).await.unwrap();
    ws.subscribe(&ch, None).await.unwrap();
    let http = reqwest::Client::new();
    let sse = http.get(format!("{}/sse?channel={ch}", nodes[2].base())).send().await.unwrap();
    let mut sse = futures_util::StreamExt::boxed(sse.bytes_stream());
    // Wait until node C has subscribed on the backplane (its channel shows in the cluster view).
    wait_until("both subscribers in node A's cluster view", Duration::from_secs(120), || async {
        subscribers(&http, &nodes[0].base(), &ch).await == Some(2)
    })
    .await;
    for i in 1..=50 {
        publish(&http, &nodes[0].base(), &ch, json!(i), None).await.unwrap();
    }
    assert_eq!(offsets(&mut ws, 50).await, (1..=50).collect::<Vec<_>>());
    let mut text = String::new();
    while text.matches("event: message").count() < 50 {
        let chunk = tokio::time::timeout(Duration::from_secs(20), futures_util::StreamExt::next(&mut sse))
            .await
            .expect("sse in time")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let got: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["offset"].as_u64())
        .collect();
    assert_eq!(got, (1..=50).collect::<Vec<_>>());
    let info: Value = http.get(format!("{}/api/info", nodes[0].base())).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["nodes"].as_array().unwrap().len(), 3, "{info}");
}

async fn a_client_resumes_on_another_node_with_nothing_lost(backplane: &Backplane) {
    let nodes = cluster(backplane, 2, &[]).await;
    let http = reqwest::Client::new();
    let ch = format!("chat:r{}", fastrand::u32(..));
    let mut c = Connection::connect(&nodes[0].ws()).await.unwrap();
    c.subscribe(&ch, None).await.unwrap();
    let first = publish(&http, &nodes[1].base(), &ch, json!(1), None).await.unwrap();
    for i in 2..=5 {
        publish(&http, &nodes[1].base(), &ch, json!(i), None).await.unwrap();
    }
    assert_eq!(offsets(&mut c, 5).await, vec![1, 2, 3, 4, 5]);
    drop(c);
    for i in 6..=10 {
        publish(&http, &nodes[0].base(), &ch, json!(i), None).await.unwrap();
    }
    let mut c = Connection::connect(&nodes[1].ws()).await.unwrap();
    let since = format!("{}:5", first["epoch"].as_str().unwrap());
    let ok = c.subscribe(&ch, Some(&since)).await.unwrap();
    assert_eq!(ok["recovered"], true);
    assert_eq!(offsets(&mut c, 5).await, vec![6, 7, 8, 9, 10]);
}

/// A client that keeps itself subscribed across node restarts: on any close it moves to
/// the next node and resumes from its last position. Records every offset it sees.
async fn resilient_client(
    nodes: Vec<String>,
    start: usize,
    ch: String,
    target: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) -> (Vec<u64>, usize) {
    let mut seen: Vec<u64> = Vec::new();
    let mut epoch: Option<String> = None;
    let mut resets = 0;
    let mut k = start;
    let mut attempt = 0u32;
    loop {
        let t = target.load(Ordering::SeqCst);
        if done.load(Ordering::SeqCst) && t > 0 && seen.last().copied() == Some(t) {
            return (seen, resets);
        }
        let url = &nodes[k % nodes.len()];
        let session = async {
            let mut c = Connection::connect(url).await?;
            let since = epoch.as_ref().map(|e| format!("{e}:{}", seen.last().copied().unwrap_or(0)));
            let ok = c.subscribe(&ch, since.as_deref()).await?;
            if ok["recovered"] == false {
                resets += 1;
            }
            epoch = ok["epoch"].as_str().map(String::from);
            attempt = 0;
            loop {
                let t = target.load(Ordering::SeqCst);
                if done.load(Ordering::SeqCst) && t > 0 && seen.last().copied() == Some(t) {
                    return Ok::<_, ClientError>(());
                }
                match tokio::time::timeout(Duration::from_millis(500), c.next_pub()).await {
                    Ok(Ok(p)) => {
                        epoch = p["epoch"].as_str().map(String::from);
                        seen.push(p["offset"].as_u64().unwrap());
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {}
                }
            }
        };
        match session.await {
            Ok(()) => return (seen, resets),
            Err(_) => {
                k += 1;
                attempt += 1;
                // Full jitter, so a node's clients do not all come back at once.
                let cap = 50u64 * 2u64.pow(attempt.min(5));
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=cap))).await;
            }
        }
    }
}

async fn a_rolling_restart_of_three_nodes_loses_and_duplicates_nothing_for_a_thousand_clients(backplane: &Backplane) {
    let mut nodes = cluster(backplane, 3, &[("SWITCHBOARD_LIMITS__ACCEPT_RATE_PER_SEC", "0")]).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.ws()).collect();
    let bases: Vec<String> = nodes.iter().map(|n| n.base()).collect();
    let ch = format!("roll:c{}", fastrand::u32(..));
    let target = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..1000)
        .map(|i| tokio::spawn(resilient_client(urls.clone(), i, ch.clone(), target.clone(), done.clone())))
        .collect();
    // Wait until all are subscribed somewhere.
    let http = reqwest::Client::new();
    wait_until("1,000 clients subscribed across the cluster", Duration::from_secs(300), || async {
        subscribers(&http, &bases[0], &ch).await == Some(1000)
    })
    .await;
    // A publisher that never gives up on a publication: it retries on another node with
    // the same idempotency key, so a retried publish is stored once.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (bases, ch, stop, http) = (bases.clone(), ch.clone(), stop.clone(), http.clone());
        let published = published.clone();
        tokio::spawn(async move {
            let mut last = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let key = format!("p{i}");
                let mut k = i as usize;
                loop {
                    match publish(&http, &bases[k % bases.len()], &ch, json!(i), Some(&key)).await {
                        Ok(v) => {
                            last = v["offset"].as_u64().unwrap();
                            published.store(last, Ordering::SeqCst);
                            break;
                        }
                        Err(_) => {
                            k += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            last
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in nodes.iter_mut() {
        node.stop().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.spawn();
        node.wait_ready().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Publications go on after the last restart too — counted, not timed: a loaded machine
    // publishes fewer per second, and the run waits for them.
    let after_restarts = published.load(Ordering::SeqCst);
    wait_until("20 more publications after the restarts", Duration::from_secs(300), || {
        let published = published.clone();
        async move { published.load(Ordering::SeqCst) >= after_restarts + 20 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let last = publisher.await.unwrap();
    assert!(last >= after_restarts + 20, "the publisher published only {last}");
    target.store(last, Ordering::SeqCst);
    done.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(300);
    for (i, c) in clients.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (seen, resets) = tokio::time::timeout(left, c)
            .await
            .unwrap_or_else(|_| panic!("client {i} had not caught up to offset {last} after 300 s"))
            .unwrap();
        assert_eq!(resets, 0, "client {i} was told to reset");
        let first = seen.first().copied().unwrap_or(1);
        assert_eq!(seen, (first..=last).collect::<Vec<_>>(), "client {i}: gap or duplicate");
    }
}

async fn a_node_killed_with_sigkill_loses_its_presence_and_its_clients_resume_elsewhere(backplane: &Backplane) {
    let extra = [
        ("SWITCHBOARD_NAMESPACES__ROOM__PRESENCE", "true"),
        ("SWITCHBOARD_NAMESPACES__ROOM__PRESENCE_TTL_SECS", "3"),
        ("SWITCHBOARD_WS__PING_INTERVAL_SECS", "1"),
        ("SWITCHBOARD_SSE__KEEPALIVE_SECS", "1"),
    ];
    let mut nodes = cluster(backplane, 2, &extra).await;
    let http = reqwest::Client::new();
    let ch = format!("room:k{}", fastrand::u32(..));
    let mut doomed = Connection::connect(&nodes[0].ws()).await.unwrap();
    let ok = doomed.subscribe(&ch, None).await.unwrap();
    let epoch = ok["epoch"].as_str().unwrap().to_string();
    let mut survivor = Connection::connect(&nodes[1].ws()).await.unwrap();
    survivor.subscribe(&ch, None).await.unwrap();
    let stats = |base: String| {
        let http = http.clone();
        let ch = ch.clone();
        async move {
            let v: Value =
                http.get(format!("{base}/api/presence_stats?channel={ch}")).send().await.unwrap().json().await.unwrap();
            v["clients"].as_u64().unwrap()
        }
    };
    assert_eq!(stats(nodes[1].base()).await, 2);
    // Keep the survivor answering pings, so it stays present.
    let keepalive = tokio::spawn(async move { while survivor.next_push().await.is_ok() {} });
    publish(&http, &nodes[1].base(), &ch, json!(1), None).await.unwrap();
    assert_eq!(offsets(&mut doomed, 1).await, vec![1]);
    nodes[0].kill().await;
    // Nobody removed the dead node's entry: it lapses within its TTL.
    wait_until("the dead node's presence to lapse", Duration::from_secs(120), || {
        let s = stats(nodes[1].base());
        async move { s.await == 1 }
    })
    .await;
    for i in 2..=4 {
        publish(&http, &nodes[1].base(), &ch, json!(i), None).await.unwrap();
    }
    assert!(doomed.next_pub().await.is_err(), "the killed node's connection is gone");
    let mut back = Connection::connect(&nodes[1].ws()).await.unwrap();
    let ok = back.subscribe(&ch, Some(&format!("{epoch}:1"))).await.unwrap();
    assert_eq!(ok["recovered"], true);
    assert_eq!(offsets(&mut back, 3).await, vec![2, 3, 4]);
    keepalive.abort();
}

/// A private redis-server we can stop and start.
struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (./scripts/test installs it)");
        Redis { port, child: Some(child) }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn wait_up(&self) {
        let port = self.port;
        wait_until(&format!("redis-server to listen on {port}"), Duration::from_secs(60), || async move {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// While the backplane (`what`) is down — at least 10 s, and until the nodes have noticed:
/// every node stays up and reports not ready; with `publish_to`, a publish there fails.
async fn while_down(http: &reqwest::Client, nodes: &[Node], what: &str, publish_to: Option<&str>) {
    let down = Instant::now();
    let mut saw_not_ready = false;
    while down.elapsed() < Duration::from_secs(10) || !saw_not_ready {
        assert!(down.elapsed() < Duration::from_secs(120), "/readyz never reported the outage (waited 120 s)");
        for n in nodes {
            let h = http.get(format!("{}/healthz", n.base())).send().await.unwrap();
            assert_eq!(h.status(), 200, "a node died while {what} was down");
            let r = http.get(format!("{}/readyz", n.base())).send().await.unwrap();
            saw_not_ready |= r.status() == 503;
        }
        if let Some(ch) = publish_to {
            let failed = publish(http, &nodes[1].base(), ch, json!("during"), None).await;
            assert!(failed.is_err(), "a publish succeeded with {what} down");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A Redis of the test's own, single or a cluster, to stop and start again (empty).
enum OwnRedis {
    Single(Option<Redis>, u16),
    Cluster(rcluster::RedisCluster),
}

impl OwnRedis {
    fn env(&self, prefix: &str) -> Vec<(String, String)> {
        match self {
            OwnRedis::Single(_, port) => redis_env(prefix, &format!("redis://127.0.0.1:{port}")),
            OwnRedis::Cluster(c) => {
                let mut v = redis_env(prefix, &c.url());
                v.push(("SWITCHBOARD_BROKER__REDIS_CLUSTER".to_string(), "true".to_string()));
                v
            }
        }
    }

    fn stop(&mut self) {
        match self {
            OwnRedis::Single(r, _) => {
                if let Some(mut r) = r.take() {
                    r.stop();
                }
            }
            OwnRedis::Cluster(c) => c.kill_all(),
        }
    }

    /// Back, empty (nothing is kept on disk).
    async fn start(&mut self) {
        match self {
            OwnRedis::Single(r, port) => {
                let redis = Redis::start(*port);
                redis.wait_up().await;
                *r = Some(redis);
            }
            OwnRedis::Cluster(c) => tokio::task::block_in_place(|| c.restart_all()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopping_for_ten_seconds_crashes_nothing_and_clients_end_consistent() {
    let port = free_port();
    let redis = Redis::start(port);
    redis.wait_up().await;
    redis_gone_for_ten_seconds(OwnRedis::Single(Some(redis), port)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_redis_cluster_stopping_for_ten_seconds_crashes_nothing_and_clients_end_consistent() {
    let cluster = tokio::task::block_in_place(|| rcluster::RedisCluster::start(3, 0));
    redis_gone_for_ten_seconds(OwnRedis::Cluster(cluster)).await;
}

async fn redis_gone_for_ten_seconds(mut redis: OwnRedis) {
    let p = prefix();
    let nodes: Vec<Node> = (0..2).map(|_| Node::start(free_port(), &env(redis.env(&p), &[]))).collect();
    for n in &nodes {
        n.wait_ready().await;
    }
    let http = reqwest::Client::new();
    let ch = format!("feed:r{}", fastrand::u32(..));
    let mut clients = Vec::new();
    for n in &nodes {
        let mut c = Connection::connect(&n.ws()).await.unwrap();
        c.subscribe(&ch, None).await.unwrap();
        clients.push(c);
    }
    for i in 1..=5 {
        publish(&http, &nodes[0].base(), &ch, json!(i), None).await.unwrap();
    }
    for c in clients.iter_mut() {
        assert_eq!(offsets(c, 5).await, vec![1, 2, 3, 4, 5]);
    }
    redis.stop();
    while_down(&http, &nodes, "Redis", Some(&ch)).await;
    // Redis comes back empty (it keeps nothing on disk): history is gone.
    redis.start().await;
    for n in &nodes {
        n.wait_ready().await;
    }
    let after = publish(&http, &nodes[1].base(), &ch, json!("after"), None).await.unwrap();
    assert_eq!(after["offset"], 1, "a new epoch starts at 1");
    for c in clients.iter_mut() {
        // The connections survived; each client is told its history is gone, then gets
        // the new epoch's publications — an explicit reset, never a silent gap.
        let mut reset = None;
        let p = loop {
            let v = tokio::time::timeout(Duration::from_secs(20), c.next_push()).await.expect("in time").unwrap();
            if v.get("reset").is_some() {
                reset = Some(v["reset"].clone());
            } else if let Some(p) = v.get("pub") {
                break p.clone();
            }
        };
        let reset = reset.expect("no reset before the new epoch's publication");
        assert_eq!(reset["epoch"], after["epoch"]);
        assert_eq!(p["offset"], 1);
        assert_eq!(p["data"], "after");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopping_for_ten_seconds_crashes_nothing_and_clients_continue_without_a_gap() {
    let mut backplane = Backplane::nats().await;
    let nodes = cluster(&backplane, 2, &[]).await;
    let Backplane::Nats(nats) = &mut backplane else { unreachable!() };
    let http = reqwest::Client::new();
    let ch = format!("feed:n{}", fastrand::u32(..));
    let mut clients = Vec::new();
    for n in &nodes {
        let mut c = Connection::connect(&n.ws()).await.unwrap();
        c.subscribe(&ch, None).await.unwrap();
        clients.push(c);
    }
    let mut epoch = String::new();
    for i in 1..=5 {
        let p = publish(&http, &nodes[0].base(), &ch, json!(i), None).await.unwrap();
        epoch = p["epoch"].as_str().unwrap().to_string();
    }
    for c in clients.iter_mut() {
        assert_eq!(offsets(c, 5).await, vec![1, 2, 3, 4, 5]);
    }
    nats.kill();
    while_down(&http, &nodes, "NATS", None).await;
    // NATS comes back with its store: the channel's epoch and history are still there.
    // Node 0 publishes as soon as it can — maybe before node 1 has its subscription back:
    // node 1 refills what it missed from the stream.
    nats.start().await;
    nodes[0].wait_ready().await;
    let mut last = None;
    for i in 0..10 {
        // A publish the node reports failed may still have been stored: offsets are read
        // from what the publishes answer, and every client must see each one.
        if let Ok(p) = publish(&http, &nodes[0].base(), &ch, json!(format!("after {i}")), None).await {
            assert_eq!(p["epoch"], epoch.as_str(), "the epoch survives a NATS restart");
            last = p["offset"].as_u64();
        }
    }
    let last = last.expect("publishes succeed once NATS is back");
    nodes[1].wait_ready().await;
    for c in clients.iter_mut() {
        // The connections survived: everything after offset 5 arrives, in order, no gap,
        // no reset.
        let mut seen = Vec::new();
        while seen.last().copied() != Some(last) {
            let v = tokio::time::timeout(Duration::from_secs(30), c.next_push()).await.expect("in time").unwrap();
            assert!(v.get("reset").is_none(), "told to reset: {v}");
            if let Some(p) = v.get("pub") {
                seen.push(p["offset"].as_u64().unwrap());
            }
        }
        assert_eq!(seen, (6..=last).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_master_killed_under_publishing_leaves_clients_resumed_or_reset_never_gapped() {
    // Three masters, one replica each: the dead master's replica takes its slots over.
    let mut backplane = Backplane::redis_cluster(3, 1).await;
    let nodes = cluster(&backplane, 2, &[]).await;
    let Backplane::RedisCluster(redis) = &mut backplane else { unreachable!() };
    let http = reqwest::Client::new();
    let ch = format!("feed:f{}", fastrand::u32(..));
    let mut clients = Vec::new();
    for n in &nodes {
        let mut c = Connection::connect(&n.ws()).await.unwrap();
        c.subscribe(&ch, None).await.unwrap();
        clients.push(c);
    }
    // A publisher that retries each publication (same idempotency key) until one is
    // answered, alternating nodes; it reports the last position answered.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (bases, ch, stop, http, published) = (
            nodes.iter().map(|n| n.base()).collect::<Vec<_>>(),
            ch.clone(),
            stop.clone(),
            http.clone(),
            published.clone(),
        );
        tokio::spawn(async move {
            let mut last = (String::new(), 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let key = format!("p{i}");
                loop {
                    match publish(&http, &bases[i as usize % 2], &ch, json!(i), Some(&key)).await {
                        Ok(v) => {
                            last = (v["epoch"].as_str().unwrap().to_string(), v["offset"].as_u64().unwrap());
                            published.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            last
        })
    };
    wait_until("20 publications before the failover", Duration::from_secs(120), || {
        let published = published.clone();
        async move { published.load(Ordering::SeqCst) >= 20 }
    })
    .await;
    let master = redis.master_of(&format!("{{{ch}}}"));
    redis.kill(master);
    let before = published.load(Ordering::SeqCst);
    // Counted, not timed: publications go on once the replica has taken over.
    wait_until("20 publications after the failover", Duration::from_secs(180), || {
        let published = published.clone();
        async move { published.load(Ordering::SeqCst) >= before + 20 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (last_epoch, last) = publisher.await.unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        // What the client saw, per epoch; a new epoch only after an explicit reset.
        let mut runs: Vec<(String, Vec<u64>)> = Vec::new();
        let mut reset = true;
        loop {
            if runs.last().is_some_and(|(e, o)| *e == last_epoch && o.last() == Some(&last)) {
                break;
            }
            let v = tokio::time::timeout(Duration::from_secs(60), c.next_push()).await.expect("in time").unwrap();
            if v.get("reset").is_some() {
                reset = true;
            } else if let Some(p) = v.get("pub") {
                let (epoch, offset) = (p["epoch"].as_str().unwrap().to_string(), p["offset"].as_u64().unwrap());
                match runs.last_mut() {
                    Some((e, offsets)) if *e == epoch => offsets.push(offset),
                    _ => {
                        assert!(reset, "client {i}: epoch {epoch} began without a reset");
                        runs.push((epoch, vec![offset]));
                    }
                }
                reset = false;
            }
        }
        for (epoch, offsets) in &runs {
            let first = offsets[0];
            let want: Vec<u64> = (first..first + offsets.len() as u64).collect();
            assert_eq!(offsets, &want, "client {i}: a gap or a duplicate in epoch {epoch}");
        }
    }
}
