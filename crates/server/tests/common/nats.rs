//! A `nats-server -js` of the test's own: a free loopback port, its store in a temporary
//! directory; killed (and the directory removed) when dropped.

use std::time::Duration;

pub struct OwnNats {
    dir: std::path::PathBuf,
    pub port: u16,
    server: Option<std::process::Child>,
}

impl OwnNats {
    pub async fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("sb-nats-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut n = OwnNats { dir, port: 0, server: None };
        // A probed port may be taken before the server binds it: that server exits, and
        // one on another port starts.
        for _ in 0..20 {
            n.port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if n.run().await {
                return n;
            }
        }
        panic!("no nats-server would start on a free port");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, after [`OwnNats::kill`]: same port, same store).
    pub async fn start(&mut self) {
        assert!(self.run().await, "nats-server on {} did not start", self.port);
    }

    /// Starts the server and waits until it answers: `false` if it exited instead, or
    /// did not answer within 30 s.
    async fn run(&mut self) -> bool {
        let server = std::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (./scripts/test installs it)");
        let url = self.url();
        let server = self.server.insert(server);
        for _ in 0..600 {
            if async_nats::connect(&url).await.is_ok() {
                return true;
            }
            if server.try_wait().ok().flatten().is_some() {
                self.server = None;
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
