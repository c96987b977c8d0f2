//! `switchboard bench`: every scenario runs at tiny scale and reports sane, non-zero
//! numbers, and a run that cannot do what it was asked says so with its exit code.
//! (Benchmarks themselves are run by explicit commands: docs/benchmarks.md.)

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

async fn server(toml: &str) -> std::net::SocketAddr {
    server_with(toml, true).await
}

async fn server_with(toml: &str, dev: bool) -> std::net::SocketAddr {
    let path = std::env::temp_dir().join(format!("sbbench-{}-{}.toml", std::process::id(), fastrand_id()));
    std::fs::write(&path, toml).unwrap();
    let cfg = switchboard_server::Config::load(Some(&path), Vec::new()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = switchboard_server::Server::new(cfg, dev, listener).await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(s.run(std::future::pending(), Duration::from_secs(1)));
    addr
}

fn fastrand_id() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Runs the bench binary (blocking, in a worker thread) and parses its JSON summary.
async fn run(args: Vec<String>) -> HashMap<String, Value> {
    // A generous settle time: on a loaded machine deliveries may take long to arrive, and
    // they must not be counted as lost while they are on their way.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN).arg("bench").args(&args).args(["--json", "--settle-secs", "300"]).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line =
        stdout.lines().find_map(|l| l.strip_prefix("JSON ")).unwrap_or_else(|| panic!("no JSON summary:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

fn num(m: &HashMap<String, Value>, k: &str) -> f64 {
    m.get(k).and_then(Value::as_f64).unwrap_or_else(|| panic!("no {k} in {m:?}"))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_websocket_sse_and_long_poll_delivers_everything() {
    let addr = server("").await.to_string();
    let pid = std::process::id().to_string();
    for transport in ["ws", "sse", "poll"] {
        let m = run(args(&[
            "fanout",
            "--server",
            &addr,
            "--transport",
            transport,
            "--channel",
            &format!("bench:f{transport}"),
            "--subscribers",
            "20",
            "--rate",
            "20",
            "--duration",
            "1",
            "--server-pid",
            &pid,
        ]))
        .await;
        assert!(num(&m, "publications") >= 5.0, "{transport}: {m:?}");
        assert_eq!(num(&m, "deliveries"), num(&m, "expected"), "{transport}");
        assert_eq!((num(&m, "lost"), num(&m, "duplicates")), (0.0, 0.0), "{transport}");
        assert!(num(&m, "latency_p99_ms") > 0.0 && num(&m, "server_cpu_secs") >= 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_chat_and_slow_report_their_numbers() {
    let addr = server("").await.to_string();
    let pid = std::process::id().to_string();
    let m = run(args(&["idle", "--server", &addr, "--connections", "30", "--hold", "1", "--server-pid", &pid])).await;
    assert_eq!(num(&m, "connections"), 30.0);
    assert!(num(&m, "connect_per_sec") > 0.0);
    let m = run(args(&[
        "chat",
        "--server",
        &addr,
        "--channel",
        "demo:room",
        "--rooms",
        "3",
        "--members",
        "3",
        "--rate",
        "2",
        "--duration",
        "1",
    ]))
    .await;
    assert!(num(&m, "deliveries") > 0.0);
    assert_eq!((num(&m, "lost"), num(&m, "duplicates")), (0.0, 0.0));
    let m = run(args(&[
        "slow",
        "--server",
        &addr,
        "--channel",
        "bench:slow",
        "--subscribers",
        "20",
        "--slow-fraction",
        "0.2",
        "--rate",
        "20",
        "--duration",
        "1",
        "--server-pid",
        &pid,
    ]))
    .await;
    assert_eq!(num(&m, "baseline_fast_lost"), 0.0);
    assert_eq!(num(&m, "with_slow_fast_lost"), 0.0, "stalled subscribers cost the fast ones messages");
    assert!(num(&m, "with_slow_fast_p99_ms") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_restarts_a_redis_backed_server_and_loses_nothing() {
    let bin = std::path::Path::new(BIN);
    let log = ServerLog(std::env::temp_dir().join(format!("sbstorm-{}.log", std::process::id())));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pidfile = std::env::temp_dir().join(format!("sbstorm-{}.pid", std::process::id()));
    let redis = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let start = format!(
        "SWITCHBOARD_BROKER__KIND=redis SWITCHBOARD_BROKER__REDIS_URL={redis} SWITCHBOARD_BROKER__REDIS_PREFIX=sbstorm{} \
         SWITCHBOARD_DEFAULTS__HISTORY_SIZE=10000 \
         {} serve --dev --listen 127.0.0.1:{port} --drain-secs 2 >/dev/null 2>>{} & echo $! > {}",
        std::process::id(),
        bin.display(),
        log.0.display(),
        pidfile.display()
    );
    assert!(Command::new("sh").args(["-c", &start]).status().unwrap().success());
    let http = reqwest_like_wait(port).await;
    assert!(http, "server did not start");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    let m = run(args(&[
        "storm",
        "--server",
        &format!("127.0.0.1:{port}"),
        "--channel",
        "bench:storm",
        "--clients",
        "30",
        "--rate",
        "20",
        "--server-pid",
        &pid,
        "--restart-cmd",
        &start,
    ]))
    .await;
    let new_pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    let _ = Command::new("kill").arg(&new_pid).status();
    assert_eq!(num(&m, "reconnected"), 30.0);
    assert!(num(&m, "publications") > 10.0);
    assert_eq!((num(&m, "lost"), num(&m, "duplicates"), num(&m, "resets")), (0.0, 0.0, 0.0), "{m:?}");
    assert!(num(&m, "recovery_secs") > 0.0 && num(&m, "peak_handshakes_per_sec") > 0.0);
}

/// A server process's log file: printed if the test fails, removed either way.
struct ServerLog(std::path::PathBuf);

impl Drop for ServerLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", std::fs::read_to_string(&self.0).unwrap_or_default());
        }
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits until something answers HTTP on `port`.
async fn reqwest_like_wait(port: u16) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut buf = [0u8; 12];
            if s.read_exact(&mut buf).is_ok() && &buf[9..12] == b"200" {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_publishes_to_a_keyed_server_with_its_key_and_fails_loudly_without() {
    const KEY: &str = "bench-api-key-0123456789";
    let addr = server_with(&format!("[api]\nkeys = [\"{KEY}\"]\n"), false).await.to_string();
    let fanout = |key: Option<&str>| {
        let mut a = args(&["fanout", "--server", &addr, "--subscribers", "5", "--rate", "20", "--duration", "1"]);
        if let Some(k) = key {
            a.extend(["--api-key".to_string(), k.to_string()]);
        }
        a
    };
    let m = run(fanout(Some(KEY))).await;
    assert!(num(&m, "publications") >= 5.0);
    assert_eq!(num(&m, "deliveries"), num(&m, "expected"));
    // Without the key every publish is refused: the run says so and exits non-zero.
    let a = fanout(None);
    let out =
        tokio::task::spawn_blocking(move || Command::new(BIN).arg("bench").args(&a).output().unwrap()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a run whose publishes were refused exited 0");
    assert!(stderr.contains("401"), "{stderr}");
}

#[test]
fn every_bench_flag_says_its_unit_or_meaning() {
    let out = Command::new(BIN).args(["bench", "fanout", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, words) in [
        ("--subscribers", "connections"),
        ("--rate", "per second"),
        ("--duration", "Seconds"),
        ("--payload", "bytes"),
        ("--settle-secs", "Seconds"),
        ("--api-key", "API key"),
    ] {
        let line = help.lines().skip_while(|l| !l.contains(flag)).take(3).collect::<Vec<_>>().join(" ");
        assert!(line.contains(words), "{flag}: {line:?}");
    }
}
