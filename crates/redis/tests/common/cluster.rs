//! A Redis Cluster of the test's own: `masters` masters (and `replicas` replicas each) of
//! the machine's `redis-server` on free loopback ports, made with `redis-cli --cluster
//! create`, nothing kept on disk but the nodes' cluster files in a temporary directory.
//! Dropped: killed and removed. [`RedisCluster::shared`] is one per test process, killed
//! when the process ends (however it ends).
//!
//! Shared by the redis crate's tests and the server's (`#[path]`).
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    children: Vec<Option<Child>>,
}

/// A port whose cluster bus port (+10000) is free too, never one handed out before in
/// this process (a port probed free and let go may come back from the next probe). A test
/// that starts servers of its own beside a cluster takes their ports here too.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if p < 55000
            && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
            && GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(p)
        {
            return p;
        }
    }
}

/// A node on a free port, answering: another process may take a probed port (or its bus
/// port) before redis-server binds it — that node exits, and one on another port starts.
fn start_node(dir: &std::path::Path, die_with_parent: bool) -> (u16, Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let port = free_port();
        let mut child = spawn(port, dir, die_with_parent);
        // (Ours answering, not another process's server that holds the port.)
        let ours = format!("process_id:{}\r", child.id());
        loop {
            if cli(port, &["info", "server"]).contains(&ours) {
                return (port, child);
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "timed out waiting for redis-server on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(Instant::now() < deadline, "no redis-server would start on a free port");
    }
}

fn spawn(port: u16, dir: &std::path::Path, die_with_parent: bool) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1500"])
        // Replicas in sync at once (not after the default 5 s wait for more of them), and
        // one may take over however long it has been cut off from its master.
        .args(["--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0"])
        .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if die_with_parent {
        use std::os::unix::process::CommandExt;
        // Killed when the thread that started it ends: the shared cluster's thread lives
        // as long as the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    cmd.spawn().expect("redis-server (./scripts/test installs it)")
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisCluster {
    /// Starts the nodes and makes them a cluster; returns once every slot is served.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        Self::start_with(masters, replicas, false)
    }

    fn start_with(masters: usize, replicas: usize, die_with_parent: bool) -> RedisCluster {
        // What earlier test processes' shared clusters left (they cannot clean up).
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.strip_prefix("sb-rcluster-").and_then(|r| r.split('-').next());
                if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("sb-rcluster-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let n = masters * (1 + replicas);
        let (ports, children) = (0..n).map(|_| start_node(&dir, die_with_parent)).map(|(p, c)| (p, Some(c))).unzip();
        let c = RedisCluster { ports, dir, children };
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        c.wait_ok();
        if replicas > 0 {
            // Every replica has its master's data (and can take over) before a test starts.
            c.wait("the replicas to be in sync", || {
                let roles: Vec<String> = c.ports.iter().map(|p| cli(*p, &["info", "replication"])).collect();
                let synced = roles.iter().filter(|r| r.contains("master_link_status:up")).count();
                synced == masters * replicas
            });
        }
        c
    }

    /// One cluster (three masters) for the whole test process.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: std::sync::OnceLock<RedisCluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let c = Self::start_with(3, 0, true);
                let _ = tx.send(RedisCluster { ports: c.ports.clone(), dir: c.dir.clone(), children: Vec::new() });
                std::mem::forget(c);
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("the shared Redis Cluster started")
        })
    }

    /// The seed nodes, as `redis_url` takes them.
    pub fn url(&self) -> String {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    fn wait(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the live nodes agree the cluster is whole.
    pub fn wait_ok(&self) {
        let live: Vec<u16> =
            self.ports.iter().zip(&self.children).filter(|(_, c)| c.is_some()).map(|(p, _)| *p).collect();
        let live = if live.is_empty() { self.ports.clone() } else { live };
        self.wait("the Redis Cluster to be ok", || {
            live.iter().all(|p| cli(*p, &["cluster", "info"]).contains("cluster_state:ok"))
        });
    }

    fn live_port(&self) -> u16 {
        let i = self.children.iter().position(|c| c.is_some()).unwrap_or(0);
        self.ports[i]
    }

    /// The port of the master serving `key`'s slot (as a live node sees the cluster).
    pub fn master_of(&self, key: &str) -> u16 {
        let live = self.live_port();
        let slot: u16 = cli(live, &["cluster", "keyslot", key]).trim().parse().unwrap();
        for line in cli(live, &["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for range in &f[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                    if (a..=b).contains(&slot) {
                        let addr = f[1].split('@').next().unwrap();
                        return addr.rsplit(':').next().unwrap().parse().unwrap();
                    }
                }
            }
        }
        panic!("no live master serves slot {slot}");
    }

    /// SIGKILL of every node: the whole cluster gone.
    pub fn kill_all(&mut self) {
        for p in self.ports.clone() {
            self.kill(p);
        }
    }

    /// Starts every node again (same ports, same cluster files — the cluster comes back as
    /// it was, without its data: nothing is kept on disk) and waits until it is whole.
    pub fn restart_all(&mut self) {
        for (i, p) in self.ports.iter().enumerate() {
            if self.children[i].is_none() {
                self.children[i] = Some(spawn(*p, &self.dir, false));
            }
        }
        for p in &self.ports {
            self.wait(&format!("redis-server on {p}"), || cli(*p, &["ping"]).trim() == "PONG");
        }
        self.wait_ok();
    }

    /// SIGKILL of the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node of this cluster");
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
