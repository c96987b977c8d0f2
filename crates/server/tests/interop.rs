//! Interop with independent WebSocket clients: Python `websockets` and Node `ws`, both
//! negotiating permessage-deflate. `./scripts/test` installs them.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{config, TestServer};

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop")
}

async fn run_peer(program: &str, script: &str) {
    let s = TestServer::start(config("[namespaces.interop]\nallow_publish = true\n")).await;
    let host = s.addr.to_string();
    let dir = interop_dir();
    let out = tokio::task::spawn_blocking({
        let (program, script) = (program.to_string(), script.to_string());
        move || Command::new(program).arg(dir.join(script)).arg(host).current_dir(dir).output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run {program} (run ./scripts/test to install the interop peers): {e}"));
    assert!(
        out.status.success(),
        "{script} failed (run ./scripts/test to install the interop peers)\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_client_interoperates() {
    run_peer("python3", "python_ws.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_client_interoperates() {
    run_peer("node", "node_ws.mjs").await;
}
