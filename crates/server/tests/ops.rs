//! Operations: Prometheus metrics after a scripted session, readiness when draining and
//! when the broker is unreachable, and `switchboard doctor` against this machine's /proc.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{channel, config, TestServer};
use serde_json::{json, Value};
use switchboard_client::{ClientError, ConnectOptions, Connection};
use switchboard_server::Server;
use tokio::sync::oneshot;

/// The value of a metric line (`name{labels} value`) in an exposition.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(s: &TestServer) -> String {
    let r = s.http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_scripted_session() {
    // The metrics belong to this server alone: every count below starts at zero.
    let s = TestServer::start(config("[defaults]\nqueue_max_bytes = 65536\n[ws]\nsend_buffer_bytes = 8192\n")).await;
    let ch = channel("m");
    let mut c = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    let ok = c.subscribe(&ch, None).await.unwrap();
    let epoch = ok["epoch"].as_str().unwrap().to_string();
    for i in 0..5 {
        s.publish(&ch, json!(i)).await;
    }
    for _ in 0..5 {
        c.next_pub().await.unwrap();
    }
    // A resume that recovers and one that cannot.
    let mut r = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    r.subscribe(&ch, Some(&format!("{epoch}:2"))).await.unwrap();
    r.subscribe(&channel("m"), Some("otherepoch:3")).await.unwrap();
    // An error code.
    let _ = r.subscribe("bad name", None).await;
    // Exactly one slow consumer, made slow on purpose: a tiny receive buffer, a channel
    // of its own, and it never reads. ~300 KB is far over its 64 KiB queue plus every
    // socket buffer on the way, on any machine; nobody else is on that channel.
    let flood = channel("m");
    let mut slow = Connection::connect_with(
        &format!("ws://{}/ws", s.addr),
        ConnectOptions { recv_buffer: Some(4096), ..Default::default() },
    )
    .await
    .unwrap();
    slow.subscribe(&flood, None).await.unwrap();
    let pad = "x".repeat(1000);
    for _ in 0..300 {
        s.publish(&flood, json!(pad)).await;
    }
    let after = scrape(&s).await;
    let m = |series: &str| metric(&after, series);
    assert_eq!(m("switchboard_handshakes_total{transport=\"ws\"}"), 3.0);
    assert_eq!(m("switchboard_publications_total{kind=\"stored\"}"), 305.0);
    assert!(m("switchboard_deliveries_total") >= 5.0);
    assert!(m("switchboard_bytes_out_total") > 0.0);
    assert_eq!(m("switchboard_resumes_total{outcome=\"recovered\"}"), 1.0);
    assert_eq!(m("switchboard_resumes_total{outcome=\"reset\"}"), 1.0);
    assert_eq!(m("switchboard_errors_total{code=\"invalid_channel\"}"), 1.0);
    assert_eq!(m("switchboard_slow_consumer_disconnects_total"), 1.0, "exactly the one slow client is closed");
    assert_eq!(m("switchboard_broker_operation_duration_seconds_count{op=\"publish\"}"), 305.0);
    // Histograms are complete: buckets up to +Inf, a sum and a count that agree.
    let fanned = m("switchboard_delivery_latency_seconds_count");
    assert!(fanned >= 5.0, "{after}");
    assert_eq!(m("switchboard_delivery_latency_seconds_bucket{le=\"+Inf\"}"), fanned);
    assert!(after.contains("\nswitchboard_delivery_latency_seconds_sum "), "{after}");
    assert!(after.contains("\nswitchboard_broker_operation_duration_seconds_sum{op=\"publish\"} "), "{after}");
    assert!(m("switchboard_channels") >= 1.0);
    // The process's standard series.
    if cfg!(target_os = "linux") {
        assert!(m("process_resident_memory_bytes") > 0.0, "{after}");
        assert!(m("process_open_fds") >= 3.0, "{after}");
        assert!(m("process_cpu_seconds_total") > 0.0, "{after}");
        assert!(m("process_start_time_seconds") > 1.6e9, "{after}");
    }
    // The two well-behaved clients are untouched: still connected, still served.
    assert_eq!(c.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
    assert_eq!(r.call(json!({"cmd": "ping"})).await.unwrap(), json!({}));
    drop((c, r, slow));
    // Connections leave the gauge when they close.
    let closed = wait_for_metric(&s, "switchboard_connections{transport=\"ws\"}", |v| v == 0.0).await;
    assert!(closed, "closed connections still counted in switchboard_connections");
    // An HTTP error is counted too, by the same code table.
    let _ = s.http.get(s.url("/nowhere")).send().await.unwrap();
    let after = scrape(&s).await;
    assert_eq!(metric(&after, "switchboard_errors_total{code=\"not_found\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_in_one_process_keep_their_own_metrics() {
    let (a, b) = (TestServer::start(config("")).await, TestServer::start(config("")).await);
    let mut c = Connection::connect(&format!("ws://{}/ws", a.addr)).await.unwrap();
    c.subscribe(&channel("m"), None).await.unwrap();
    a.publish(&channel("m"), json!(1)).await;
    let (ta, tb) = (scrape(&a).await, scrape(&b).await);
    assert_eq!(metric(&ta, "switchboard_connections{transport=\"ws\"}"), 1.0);
    assert_eq!(metric(&tb, "switchboard_connections{transport=\"ws\"}"), 0.0);
    assert_eq!(metric(&ta, "switchboard_publications_total{kind=\"stored\"}"), 1.0);
    assert_eq!(metric(&tb, "switchboard_publications_total{kind=\"stored\"}"), 0.0);
}

#[tokio::test]
async fn scrapers_that_ask_for_openmetrics_get_it() {
    let s = TestServer::start(config("")).await;
    let r = s
        .http
        .get(s.url("/metrics"))
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text; version=1.0.0"));
    let text = r.text().await.unwrap();
    // OpenMetrics names a counter family without `_total`, its samples with it, and ends
    // every exposition with `# EOF`.
    assert!(text.contains("# TYPE switchboard_resumes counter\n"), "{text}");
    assert!(text.contains("\nswitchboard_resumes_total{outcome=\"reset\"} 0\n"), "{text}");
    assert!(text.contains("# TYPE switchboard_build info\n"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    // Without asking, the Prometheus text format every scraper reads.
    let plain = scrape(&s).await;
    assert!(plain.contains("# TYPE switchboard_resumes_total counter\n"), "{plain}");
    assert!(!plain.contains("# EOF"), "{plain}");
}

/// Scrapes until `series` satisfies `ok` (true), or gives up after a minute (false).
async fn wait_for_metric(s: &TestServer, series: &str, ok: impl Fn(f64) -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if ok(metric(&scrape(s).await, series)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn readiness_flips_while_the_node_drains() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(config(""), true, listener).await.unwrap().with_drain_notice(Duration::from_secs(3));
    let addr = server.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    let http = reqwest::Client::new();
    let ready = |http: reqwest::Client| async move {
        http.get(format!("http://{addr}/readyz")).send().await.unwrap().status().as_u16()
    };
    assert_eq!(ready(http.clone()).await, 200);
    tx.send(()).unwrap();
    let mut saw = false;
    for _ in 0..100 {
        if ready(http.clone()).await == 503 {
            saw = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw, "/readyz never reported draining");
    // New streaming connections are refused while draining; health stays green.
    let r = http.get(format!("http://{addr}/sse?channel=a")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(http.get(format!("http://{addr}/healthz")).send().await.unwrap().status(), 200);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn readiness_reports_an_unreachable_broker() {
    // A Redis broker pointed at a port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s =
        TestServer::start(config(&format!("[broker]\nkind = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}\"\n")))
            .await;
    let (status, v) = s.get_json("/readyz").await;
    assert_eq!((status, v["status"].as_str().unwrap()), (503, "broker_unavailable"));
    assert_eq!(s.get_json("/healthz").await.0, 200);
    let (status, v) = s.post_raw("/api/publish", json!({"channel": "a", "data": 1}).to_string()).await;
    assert_eq!((status, v["error"]["code"].as_str().unwrap()), (503, "broker_unavailable"));
    let mut c = Connection::connect(&format!("ws://{}/ws", s.addr)).await.unwrap();
    match c.subscribe("a", None).await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, "broker_unavailable"),
        other => panic!("expected broker_unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn admin_stats_need_a_key_outside_dev_mode() {
    let key = "admin-key-0123456789";
    let s = TestServer::start_with(config(&format!("[api]\nkeys = [\"{key}\"]\n")), false).await;
    assert_eq!(s.http.get(s.url("/admin")).send().await.unwrap().status(), 200, "the page itself is static");
    assert_eq!(s.http.get(s.url("/admin/api/stats")).send().await.unwrap().status(), 401);
    let r = s.http.get(s.url("/admin/api/stats")).bearer_auth(key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["connections"]["ws"].is_number() && v["nodes"].is_array(), "{v}");
}

fn proc_num(path: &str) -> u64 {
    std::fs::read_to_string(path).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn doctor_reads_this_machines_limits() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["doctor", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let l = &v["limits"];
    assert_eq!(l["file_max"].as_u64().unwrap(), proc_num("/proc/sys/fs/file-max"));
    assert_eq!(l["nr_open"].as_u64().unwrap(), proc_num("/proc/sys/fs/nr_open"));
    assert_eq!(l["somaxconn"].as_u64().unwrap(), proc_num("/proc/sys/net/core/somaxconn"));
    let rmem: Vec<u64> = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(l["tcp_rmem"], json!(rmem));
    // The child inherits this process's open-files limits.
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let hard: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert_eq!(l["nofile_hard"].as_u64().unwrap(), hard);
    let capacity = v["capacity"].as_u64().unwrap();
    assert!(capacity > 0 && capacity <= hard, "capacity {capacity}");
    assert!(v["limited_by"].is_string());
    let text = Command::new(env!("CARGO_BIN_EXE_switchboard")).arg("doctor").output().unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("this box can hold about"), "{text}");
}

#[tokio::test]
async fn resumes_over_sse_and_polling_are_counted_too() {
    let s = TestServer::start(config("")).await;
    let ch = channel("m");
    let (epoch, _) = s.publish(&ch, json!(1)).await;
    s.publish(&ch, json!(2)).await;
    // SSE with Last-Event-ID inside history: recovered.
    let r = s
        .http
        .get(s.url(&format!("/sse?channel={ch}")))
        .header("last-event-id", format!("{epoch}:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    // Poll with a position from another epoch: reset.
    let (st, _) = s.get_json(&format!("/poll?channel={ch}&since=otherepoch:1")).await;
    assert_eq!(st, 200);
    let text = scrape(&s).await;
    assert_eq!(metric(&text, "switchboard_resumes_total{outcome=\"recovered\"}"), 1.0);
    assert_eq!(metric(&text, "switchboard_resumes_total{outcome=\"reset\"}"), 1.0);
}
