//! Server CPU time and RSS from /proc/<pid>.

#[derive(Debug, Clone, Copy)]
pub struct ProcStats {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
}

pub fn read(pid: u32) -> ProcStats {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ProcStats { cpu_secs: (utime + stime) / ticks, rss_bytes: rss_kb * 1024 }
}

/// Sums CPU and RSS over several processes (e.g. nginx workers).
pub fn read_all(pids: &[u32]) -> ProcStats {
    pids.iter().map(|p| read(*p)).fold(ProcStats { cpu_secs: 0.0, rss_bytes: 0 }, |a, b| ProcStats {
        cpu_secs: a.cpu_secs + b.cpu_secs,
        rss_bytes: a.rss_bytes + b.rss_bytes,
    })
}
