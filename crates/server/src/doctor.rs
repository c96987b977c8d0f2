//! `switchboard doctor`: reads this machine's limits for holding many long-lived
//! connections, says how many this box can hold and what stops it first, and prints the
//! exact commands to raise each limit.

use std::fmt::Write as _;

use serde::Serialize;

/// Bytes of user-space memory per idle WebSocket (measured: docs/benchmarks.md).
pub const USER_BYTES_PER_CONNECTION: u64 = 4_500;
/// Kernel memory per idle TCP connection (socket structures, no queued data).
pub const KERNEL_BYTES_PER_CONNECTION: u64 = 4_096;
/// File descriptors the process needs besides connections.
pub const FD_RESERVE: u64 = 64;
/// The connection count a tuned host is advised for.
pub const TARGET: u64 = 1_000_000;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Limits {
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    pub file_max: u64,
    pub nr_open: u64,
    pub somaxconn: u64,
    pub tcp_rmem: Vec<u64>,
    pub tcp_wmem: Vec<u64>,
    /// Pages (min, pressure, max).
    pub tcp_mem: Vec<u64>,
    pub ip_local_port_range: Vec<u64>,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
}

fn read_nums(path: &str) -> Vec<u64> {
    std::fs::read_to_string(path).unwrap_or_default().split_whitespace().filter_map(|v| v.parse().ok()).collect()
}

fn read_one(path: &str) -> u64 {
    read_nums(path).first().copied().unwrap_or(0)
}

/// This process's open-files limit (soft), if it can be read.
pub fn nofile_soft() -> Option<u64> {
    Some(nofile().0).filter(|n| *n > 0)
}

/// Parses `Max open files` from /proc/self/limits (`unlimited` as u64::MAX).
fn nofile() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Max open files") {
            let v: Vec<u64> = rest
                .split_whitespace()
                .take(2)
                .map(|x| if x == "unlimited" { u64::MAX } else { x.parse().unwrap_or(0) })
                .collect();
            if v.len() == 2 {
                return (v[0], v[1]);
            }
        }
    }
    (0, 0)
}

fn meminfo(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub fn read() -> Limits {
    let (soft, hard) = nofile();
    Limits {
        nofile_soft: soft,
        nofile_hard: hard,
        file_max: read_one("/proc/sys/fs/file-max"),
        nr_open: read_one("/proc/sys/fs/nr_open"),
        somaxconn: read_one("/proc/sys/net/core/somaxconn"),
        tcp_rmem: read_nums("/proc/sys/net/ipv4/tcp_rmem"),
        tcp_wmem: read_nums("/proc/sys/net/ipv4/tcp_wmem"),
        tcp_mem: read_nums("/proc/sys/net/ipv4/tcp_mem"),
        ip_local_port_range: read_nums("/proc/sys/net/ipv4/ip_local_port_range"),
        mem_total_bytes: meminfo("MemTotal:"),
        mem_available_bytes: meminfo("MemAvailable:"),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Bound {
    pub name: &'static str,
    pub connections: u64,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub limits: Limits,
    /// Connections this box can hold now, and what sets that number.
    pub capacity: u64,
    pub limited_by: &'static str,
    pub bounds: Vec<Bound>,
    /// Commands that raise the limits short of the target.
    pub advice: Vec<String>,
}

pub fn report(l: &Limits, max_connections: usize) -> Report {
    let mut bounds = vec![
        Bound {
            name: "open files (ulimit -n)",
            // serve raises the soft limit to the hard limit itself.
            connections: l.nofile_hard.min(l.nr_open.max(l.nofile_hard)).saturating_sub(FD_RESERVE),
            why: format!("soft {} / hard {} per process; `serve` raises soft to hard", l.nofile_soft, l.nofile_hard),
        },
        Bound {
            name: "fs.file-max",
            connections: l.file_max.saturating_sub(FD_RESERVE),
            why: "open files system-wide".into(),
        },
        Bound {
            name: "memory",
            connections: l.mem_available_bytes / (USER_BYTES_PER_CONNECTION + KERNEL_BYTES_PER_CONNECTION),
            why: format!(
                "{} MiB available / ({} B user + {} B kernel) per idle connection",
                l.mem_available_bytes >> 20,
                USER_BYTES_PER_CONNECTION,
                KERNEL_BYTES_PER_CONNECTION
            ),
        },
    ];
    if l.tcp_mem.len() == 3 {
        // When every connection holds its minimum buffers, TCP memory pressure stops it.
        let per = l.tcp_rmem.first().copied().unwrap_or(4096) + l.tcp_wmem.first().copied().unwrap_or(4096);
        bounds.push(Bound {
            name: "net.ipv4.tcp_mem",
            connections: l.tcp_mem[2] * 4096 / per.max(1),
            why: format!(
                "{} pages of TCP memory at most, {} B minimum buffers per active connection",
                l.tcp_mem[2], per
            ),
        });
    }
    if max_connections > 0 {
        bounds.push(Bound {
            name: "limits.max_connections",
            connections: max_connections as u64,
            why: "configured cap".into(),
        });
    }
    let min = bounds.iter().min_by_key(|b| b.connections).cloned().expect("bounds is not empty");
    let mut advice = Vec::new();
    if l.nofile_hard < TARGET + FD_RESERVE {
        advice.push(format!(
            "# open files: raise the hard limit\n\
             echo '* soft nofile {n}' | sudo tee -a /etc/security/limits.conf\n\
             echo '* hard nofile {n}' | sudo tee -a /etc/security/limits.conf\n\
             # or, for the systemd unit: [Service] LimitNOFILE={n}",
            n = 1_048_576
        ));
    }
    if l.nr_open < TARGET + FD_RESERVE {
        advice.push("sudo sysctl -w fs.nr_open=2097152".into());
    }
    if l.file_max < TARGET + FD_RESERVE {
        advice.push("sudo sysctl -w fs.file-max=2097152".into());
    }
    if l.somaxconn < 4096 {
        advice.push("sudo sysctl -w net.core.somaxconn=4096   # accept backlog for reconnect storms".into());
    }
    if l.tcp_rmem.first().is_some_and(|v| *v > 4096) || l.tcp_wmem.first().is_some_and(|v| *v > 4096) {
        advice.push(
            "sudo sysctl -w net.ipv4.tcp_rmem='4096 16384 4194304' net.ipv4.tcp_wmem='4096 16384 4194304'   # small idle buffers".into(),
        );
    }
    if l.tcp_mem.len() == 3 && l.tcp_mem[2] * 4096 / 8192 < TARGET {
        advice.push(format!(
            "sudo sysctl -w net.ipv4.tcp_mem='{} {} {}'   # pages",
            TARGET,
            TARGET * 3 / 2,
            TARGET * 2
        ));
    }
    if l.ip_local_port_range.len() == 2 && l.ip_local_port_range[1] - l.ip_local_port_range[0] < 50_000 {
        advice.push(
            "sudo sysctl -w net.ipv4.ip_local_port_range='1024 65535'   # on load generators and proxies (outgoing connections)".into(),
        );
    }
    if !advice.is_empty() {
        advice.push(
            "# make sysctls permanent: put them in /etc/sysctl.d/90-switchboard.conf and run sudo sysctl --system"
                .into(),
        );
    }
    Report { limits: l.clone(), capacity: min.connections, limited_by: min.name, bounds, advice }
}

pub fn render(r: &Report) -> String {
    let l = &r.limits;
    let mut s = String::new();
    let _ = writeln!(s, "switchboard doctor — how many connections can this machine hold?\n");
    let _ = writeln!(s, "  open files (soft/hard)      {} / {}", l.nofile_soft, l.nofile_hard);
    let _ = writeln!(s, "  fs.file-max                 {}", l.file_max);
    let _ = writeln!(s, "  fs.nr_open                  {}", l.nr_open);
    let _ = writeln!(s, "  net.core.somaxconn          {}", l.somaxconn);
    let _ = writeln!(s, "  net.ipv4.tcp_rmem           {:?}", l.tcp_rmem);
    let _ = writeln!(s, "  net.ipv4.tcp_wmem           {:?}", l.tcp_wmem);
    let _ = writeln!(s, "  net.ipv4.tcp_mem (pages)    {:?}", l.tcp_mem);
    let _ = writeln!(s, "  ip_local_port_range         {:?}", l.ip_local_port_range);
    let _ = writeln!(
        s,
        "  memory total / available    {} MiB / {} MiB\n",
        l.mem_total_bytes >> 20,
        l.mem_available_bytes >> 20
    );
    for b in &r.bounds {
        let _ = writeln!(s, "  {:<28}{:>12} connections  ({})", b.name, b.connections, b.why);
    }
    let _ = writeln!(
        s,
        "\n=> this box can hold about {} connections; the first limit hit is {}.",
        r.capacity, r.limited_by
    );
    if r.advice.is_empty() {
        let _ = writeln!(s, "   Nothing to tune for {TARGET} connections.");
    } else {
        let _ = writeln!(s, "\nTo go further (target {TARGET}):\n");
        for a in &r.advice {
            let _ = writeln!(s, "{a}");
        }
    }
    s
}

/// Raises the soft open-files limit to the hard limit. Returns (before, after).
pub fn raise_nofile() -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        let before = r.rlim_cur;
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return (before, before);
            }
        }
        (before, r.rlim_cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            nofile_soft: 1024,
            nofile_hard: 20_000,
            file_max: 9_000_000,
            nr_open: 1_048_576,
            somaxconn: 4096,
            tcp_rmem: vec![4096, 131072, 6291456],
            tcp_wmem: vec![4096, 16384, 4194304],
            tcp_mem: vec![100_000, 150_000, 200_000],
            ip_local_port_range: vec![32768, 60999],
            mem_total_bytes: 24 << 30,
            mem_available_bytes: 20 << 30,
        }
    }

    #[test]
    fn the_smallest_bound_wins_and_gets_advice() {
        let r = report(&limits(), 0);
        assert_eq!(r.limited_by, "open files (ulimit -n)");
        assert_eq!(r.capacity, 20_000 - FD_RESERVE);
        assert!(r.advice.iter().any(|a| a.contains("LimitNOFILE")));
        assert!(r.advice.iter().any(|a| a.contains("ip_local_port_range")));
        let capped = report(&limits(), 500);
        assert_eq!((capped.capacity, capped.limited_by), (500, "limits.max_connections"));
    }

    #[test]
    fn a_tuned_host_needs_no_advice_for_the_target() {
        let mut l = limits();
        l.nofile_hard = 2_000_000;
        l.nr_open = 2_000_000;
        l.tcp_mem = vec![1_000_000, 1_500_000, 2_000_000];
        l.ip_local_port_range = vec![1024, 65535];
        let r = report(&l, 0);
        assert!(r.advice.is_empty(), "{:?}", r.advice);
        assert!(r.capacity >= TARGET);
    }
}

/// The configured TLS certificate, as `doctor` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateReport {
    pub path: String,
    /// Readable, and valid now.
    pub ok: bool,
    pub subject: Option<String>,
    pub names: Vec<String>,
    pub not_after: Option<String>,
    pub days_left: Option<i64>,
    /// What is wrong, or what is soon to be.
    pub problem: Option<String>,
}

/// Reads the certificate at `path` and says how long it has left.
pub fn certificate(path: &std::path::Path) -> CertificateReport {
    let mut r = CertificateReport {
        path: path.display().to_string(),
        ok: false,
        subject: None,
        names: Vec::new(),
        not_after: None,
        days_left: None,
        problem: None,
    };
    match crate::tls::CertInfo::from_pem_file(path) {
        Ok(info) => {
            let left = info.expires_in();
            r.subject = Some(info.subject.clone());
            r.names = info.names.clone();
            r.not_after = Some(crate::tls::format_time(info.not_after));
            r.days_left = Some(left.div_euclid(86_400));
            let now = info.not_after - left;
            r.ok = left > 0 && info.not_before <= now;
            r.problem = if left <= 0 {
                Some("expired: the server refuses to start with it".into())
            } else if left < 14 * 86_400 {
                Some("expires in less than 14 days: renew it".into())
            } else {
                None
            };
        }
        Err(e) => r.problem = Some(e),
    }
    r
}

pub fn render_certificate(c: &CertificateReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nTLS certificate ({})", c.path);
    if let (Some(subject), Some(after), Some(days)) = (&c.subject, &c.not_after, c.days_left) {
        let _ = writeln!(s, "  subject                     {subject}");
        let _ = writeln!(s, "  names                       {}", c.names.join(", "));
        let _ = writeln!(s, "  expires                     {after} ({days} days left)");
    }
    if let Some(p) = &c.problem {
        let _ = writeln!(s, "  problem                     {p}");
    }
    s
}

/// Whether a TCP address the configuration listens on is free to bind here.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListenCheck {
    /// `http`, `http (plain beside TLS)`, `mqtt`, `mqtt (TLS)`.
    pub listener: &'static str,
    pub address: std::net::SocketAddr,
    pub free: bool,
    pub error: Option<String>,
}

/// Tries to bind each TCP address the configuration listens on — the HTTP listener, the
/// plain one beside TLS, MQTT and MQTT over TLS — and lets it go at once. One that is
/// taken is held by another process: a running server, or for MQTT often a Mosquitto on
/// 1883. (Informational: the server being checked may be the one holding them.)
pub fn listeners(cfg: &crate::config::Config) -> Vec<ListenCheck> {
    let all = [
        ("http", Some(cfg.listen)),
        ("http (plain beside TLS)", cfg.tls.http_listen),
        ("mqtt", cfg.mqtt.listen),
        ("mqtt (TLS)", cfg.mqtt.tls_listen),
    ];
    all.into_iter()
        .filter_map(|(listener, a)| a.map(|a| (listener, a)))
        .map(|(listener, address)| {
            let r = std::net::TcpListener::bind(address);
            let error = r.err().map(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => format!("in use: another process listens on {address}"),
                _ => e.to_string(),
            });
            ListenCheck { listener, address, free: error.is_none(), error }
        })
        .collect()
}

pub fn render_listeners(checks: &[ListenCheck]) -> String {
    let mut out = String::from("\nListeners (TCP)\n");
    for c in checks {
        match &c.error {
            None => out.push_str(&format!("  ok    {} {} is free\n", c.listener, c.address)),
            Some(e) => out.push_str(&format!("  busy  {} {}: {e}\n", c.listener, c.address)),
        }
    }
    out
}

/// Whether a publication source's server answers a TCP connection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceCheck {
    pub name: String,
    /// `host:port` from its URL.
    pub address: String,
    pub reachable: bool,
    pub error: Option<String>,
}

/// `host:port` of a `scheme://[user[:password]@]host[:port][/…]` URL, with the default port.
fn url_address(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return None;
    }
    let has_port =
        host.rsplit_once(':').is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()) && !host.ends_with(']'));
    Some(if has_port { host.to_string() } else { format!("{host}:{default_port}") })
}

/// Tries each source's server (2 s at most each).
pub fn sources(sources: &[crate::config::SourceConfig]) -> Vec<SourceCheck> {
    use std::net::ToSocketAddrs;
    sources
        .iter()
        .map(|s| {
            let port = match s.kind {
                crate::config::SourceKind::PostgresOutbox => 5432,
                crate::config::SourceKind::Rabbitmq => 5672,
                crate::config::SourceKind::RedisStream => 6379,
                crate::config::SourceKind::NatsJetstream => 4222,
            };
            let address = url_address(&s.url, port).unwrap_or_else(|| s.url.clone());
            let r = address
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
                .and_then(|a| {
                    std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2))
                        .map_err(|e| e.to_string())
                });
            SourceCheck { name: s.name(), address, reachable: r.is_ok(), error: r.err() }
        })
        .collect()
}

pub fn render_sources(checks: &[SourceCheck]) -> String {
    let mut out = String::from("\nPublication sources\n");
    for c in checks {
        match &c.error {
            None => out.push_str(&format!("  ok    {} ({}) answers\n", c.name, c.address)),
            Some(e) => out.push_str(&format!("  FAIL  {} ({}): {e}\n", c.name, c.address)),
        }
    }
    out
}

#[cfg(test)]
mod listener_tests {
    #[test]
    fn a_taken_mqtt_port_is_reported_and_a_free_one_is_not() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // (let go)
        let mut cfg = crate::config::Config { listen: free, ..Default::default() };
        cfg.mqtt.listen = Some(held.local_addr().unwrap());
        let checks = super::listeners(&cfg);
        let got: Vec<(&str, bool)> = checks.iter().map(|c| (c.listener, c.free)).collect();
        assert_eq!(got, vec![("http", true), ("mqtt", false)]);
        assert!(super::render_listeners(&checks).contains("busy  mqtt"));
    }
}

#[cfg(test)]
mod source_tests {
    #[test]
    fn addresses_come_from_urls_with_default_ports() {
        use super::url_address;
        assert_eq!(url_address("postgres://u@db:6000/app", 5432).as_deref(), Some("db:6000"));
        assert_eq!(url_address("postgres://u:p@db/app", 5432).as_deref(), Some("db:5432"));
        assert_eq!(url_address("amqp://guest:guest@127.0.0.1:5672/%2f", 5672).as_deref(), Some("127.0.0.1:5672"));
        assert_eq!(url_address("amqp://mq", 5672).as_deref(), Some("mq:5672"));
        assert_eq!(url_address("nonsense", 1), None);
    }
}
