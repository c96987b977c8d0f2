//! What one client can make the server hold: connection caps (total and per IP), the
//! accept-rate limiter that absorbs reconnect storms, the client publish rate, and who
//! the client is when a trusted proxy stands in front.
//!
//! Every accepted TCP connection counts — streaming, long polls and plain HTTP alike —
//! in the total cap and in its peer's per-IP cap, from accept to close. A connection past
//! the total cap may still use one of a few reserved places, which answer only the
//! health and metrics endpoints, so an orchestrator can see a full node; past those, and
//! past the per-IP cap, the connection gets a short JSON refusal and is closed at once,
//! so its descriptor is free again. With `limits.max_connections = 0` the cap is derived
//! from the open-files limit, leaving room for the broker, logs and the reserve: the
//! accept loop does not run into `EMFILE` first.
//!
//! Behind a proxy every client shares the proxy's address. Peers listed in
//! `security.trusted_proxies` are not capped per IP themselves; instead each streaming
//! connection and each poll they carry counts against the client address they forward
//! (`X-Forwarded-For`, or `Forwarded: for=`). Nobody else's forwarding headers are
//! believed.
//!
//! Per-IP state holds only IPs with open connections (and recent publishers), so it
//! cannot grow without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::config::Limits as LimitsConfig;
use crate::error::{ApiError, Code};

/// The peer address of a request, put in its extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// The accept loop's count of a request's TCP connection, in its extensions: a
/// WebSocket keeps a clone so the connection stays counted after the upgrade.
#[derive(Clone)]
pub struct TcpSlot(pub Arc<ConnSlot>);

/// Answers a refused connection without reading its request — a JSON error and
/// `Connection: close` — then lets it go. Its descriptor is freed within a second
/// however the peer behaves.
pub async fn refuse(mut tcp: tokio::net::TcpStream, e: ApiError) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = e.body();
    let status = e.code.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(secs) = e.retry_after {
        head.push_str(&format!("retry-after: {secs}\r\n"));
    }
    let response = format!("{head}\r\n{body}");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sent, so closing does not reset the connection before it
        // has read the answer.
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Connections past the total cap that may still ask for health and metrics.
pub const RESERVED_CONNECTIONS: usize = 32;

/// Counts refusals over a sliding window (the current fixed window plus the previous
/// one, weighted by how much of it still overlaps): a steady flood is seen as one,
/// however its refusals are spaced.
pub(crate) struct SlidingCount {
    window_start: Instant,
    current: u32,
    previous: u32,
}

impl SlidingCount {
    pub(crate) fn new() -> Self {
        SlidingCount { window_start: Instant::now(), current: 0, previous: 0 }
    }

    /// Counts one event; returns how many fell within the last `window`.
    pub(crate) fn add(&mut self, window: std::time::Duration) -> f64 {
        let now = Instant::now();
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= window * 2 {
            (self.previous, self.current, self.window_start) = (0, 0, now);
        } else if elapsed >= window {
            (self.previous, self.current) = (self.current, 0);
            self.window_start += window;
        }
        self.current += 1;
        let into = now.duration_since(self.window_start).as_secs_f64() / window.as_secs_f64();
        self.previous as f64 * (1.0 - into).max(0.0) + self.current as f64
    }
}

/// An IPv4 or IPv6 network, `10.0.0.0/8` or `::1/128` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr.trim().parse().map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => {
                b.trim().parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(|| format!("{s:?}: bad prefix length"))?
            }
            None => max,
        };
        Ok(Cidr { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (full, rest) = ((bits / 8) as usize, bits % 8);
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xFFu8 << (8 - rest);
        a[full] & mask == b[full] & mask
    }
}

/// A token bucket; its rate and burst are the owner's to pass (they are per server, not
/// per bucket, so a bucket per connection or per IP stays small).
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn full(burst: f64) -> Self {
        Bucket { tokens: burst, last: Instant::now() }
    }

    /// Takes a token, or says how many seconds until one is there.
    pub(crate) fn take(&mut self, rate: f64, burst: f64) -> Result<(), f64> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / rate)
        }
    }
}

pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    rate: f64,
    burst: f64,
    publish_rate: f64,
    publish_burst: f64,
    trusted: Vec<Cidr>,
    total: AtomicUsize,
    reserved: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    bucket: Mutex<Bucket>,
    publishers: Mutex<HashMap<IpAddr, Bucket>>,
}

/// A counted connection (or, behind a proxy, a counted client of one); dropping it gives
/// its place back.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    /// Counts in the total (a TCP connection) — else only per IP (a forwarded client).
    total: bool,
    reserved: bool,
    ip: Option<IpAddr>,
}

/// The accept loop's decision about a new TCP connection.
pub enum Admission {
    /// Served in full.
    Full(ConnSlot),
    /// Past the total cap, on a reserved place: health and metrics only.
    Reserve(ConnSlot),
    /// Refused: answer with this error and close.
    Refused(ApiError),
}

impl ConnLimits {
    /// `fd_limit`: the process's open-files limit, from which a cap of 0 is derived.
    pub fn new(c: &LimitsConfig, trusted: Vec<Cidr>, fd_limit: Option<u64>) -> Arc<Self> {
        let max_total = match (c.max_connections, fd_limit) {
            (0, Some(fds)) => {
                let spare = crate::doctor::FD_RESERVE as usize + RESERVED_CONNECTIONS;
                (fds as usize).saturating_sub(spare).max(1)
            }
            (n, _) => n,
        };
        Arc::new(ConnLimits {
            max_total,
            max_per_ip: c.max_connections_per_ip,
            rate: c.accept_rate_per_sec as f64,
            burst: c.accept_burst.max(1) as f64,
            publish_rate: c.client_publishes_per_sec as f64,
            publish_burst: (c.client_publishes_per_sec as f64 * 2.0).max(1.0),
            trusted,
            total: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            bucket: Mutex::new(Bucket::full(c.accept_burst.max(1) as f64)),
            publishers: Mutex::new(HashMap::new()),
        })
    }

    /// The total cap in force (0: none).
    pub fn max_connections(&self) -> usize {
        self.max_total
    }

    /// Open connections (TCP, every kind).
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// IPs currently tracked (for tests of boundedness).
    pub fn tracked_ips(&self) -> usize {
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    fn take_ip(self: &Arc<Self>, ip: IpAddr) -> Result<(), ApiError> {
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *n >= self.max_per_ip {
            if *n == 0 {
                m.remove(&ip);
            }
            return Err(ApiError::new(
                Code::TooManyConnectionsFromIp,
                format!("at most {} connections per IP address", self.max_per_ip),
            ));
        }
        *n += 1;
        Ok(())
    }

    /// A new TCP connection from `peer`.
    pub fn admit_tcp(self: &Arc<Self>, peer: IpAddr) -> Admission {
        let ip = (!self.is_trusted_proxy(peer)).then_some(peer);
        if let Some(ip) = ip {
            if let Err(e) = self.take_ip(ip) {
                return Admission::Refused(e);
            }
        }
        let taken = self.total.fetch_add(1, Ordering::Relaxed);
        if self.max_total == 0 || taken < self.max_total {
            return Admission::Full(ConnSlot { limits: self.clone(), total: true, reserved: false, ip });
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
        if self.reserved.fetch_add(1, Ordering::Relaxed) < RESERVED_CONNECTIONS {
            return Admission::Reserve(ConnSlot { limits: self.clone(), total: false, reserved: true, ip });
        }
        self.reserved.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = ip {
            self.release_ip(ip);
        }
        Admission::Refused(
            ApiError::new(Code::TooManyConnections, "the server is at its connection limit").retry_after(5),
        )
    }

    fn release_ip(&self, ip: IpAddr) {
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    /// A streaming connection or poll that a trusted proxy carries for `client`: it
    /// counts against that client's per-IP cap (the proxy's own connection counted in
    /// the total when it was accepted).
    pub fn admit_forwarded(self: &Arc<Self>, client: IpAddr) -> Result<ConnSlot, ApiError> {
        self.take_ip(client)?;
        Ok(ConnSlot { limits: self.clone(), total: false, reserved: false, ip: Some(client) })
    }

    /// One new streaming handshake, under the accept-rate limit.
    pub fn take_handshake(&self) -> Result<(), ApiError> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.take(self.rate, self.burst).map_err(|wait| {
            ApiError::new(Code::ServerBusy, "too many new connections right now; retry later")
                .retry_after(wait.ceil().max(1.0) as u64)
        })
    }

    /// One client publish (`POST /publish`) from `ip`, under the per-IP publish rate.
    pub fn take_publish(&self, ip: IpAddr) -> Result<(), ApiError> {
        if self.publish_rate <= 0.0 {
            return Ok(());
        }
        let mut m = self.publishers.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= 10_000 {
            // Forget publishers whose bucket has refilled: they are as if new.
            let full_after = self.publish_burst / self.publish_rate;
            m.retain(|_, b| b.last.elapsed().as_secs_f64() < full_after);
        }
        let b = m.entry(ip).or_insert_with(|| Bucket::full(self.publish_burst));
        b.take(self.publish_rate, self.publish_burst).map_err(|wait| {
            ApiError::new(Code::RateLimited, "too many publishes from this address; slow down")
                .retry_after(wait.ceil().max(1.0) as u64)
        })
    }

    /// The client's address: the peer, or — when the peer is a trusted proxy — the
    /// nearest address in its forwarding headers that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        let hops = forwarded_for(headers);
        hops.iter().rev().find(|ip| !self.is_trusted_proxy(**ip)).or(hops.first()).copied().unwrap_or(peer)
    }
}

/// The client chain a proxy reports, nearest last: `X-Forwarded-For` if present, else
/// the `for=` parameters of `Forwarded` (RFC 7239). Unparseable entries are skipped.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let values = |name| headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    let xff = values("x-forwarded-for");
    if !xff.is_empty() {
        return xff.iter().flat_map(|v| v.split(',')).filter_map(|s| parse_node(s.trim())).collect();
    }
    values("forwarded")
        .iter()
        .flat_map(|v| v.split(','))
        .flat_map(|element| element.split(';'))
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then(|| parse_node(v.trim().trim_matches('"'))).flatten()
        })
        .collect()
}

/// `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]`, `[2001:db8::1]:4711`, `2001:db8::1`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    s.rsplit_once(':').and_then(|(ip, port)| port.parse::<u16>().ok().and(ip.parse().ok()))
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if self.total {
            self.limits.total.fetch_sub(1, Ordering::Relaxed);
        }
        if self.reserved {
            self.limits.reserved.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(ip) = self.ip {
            self.limits.release_ip(ip);
        }
    }
}

/// The wait before the next attempt after `attempt` failures (1 = the first failure):
/// uniformly random in [0, min(max, initial × 2^(attempt−1))] — "full jitter".
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    backoff_cap(attempt, initial, max).mul_f64(fastrand::f64())
}

/// The upper bound of [`backoff`] for `attempt`.
pub fn backoff_cap(attempt: u32, initial: Duration, max: Duration) -> Duration {
    initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(30)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_backoff_stays_within_its_bound_and_spreads_over_it() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(10));
        for attempt in 1..=12 {
            let cap = backoff_cap(attempt, initial, max);
            assert_eq!(cap, (initial * 2u32.pow(attempt - 1)).min(max));
            let waits: Vec<Duration> = (0..2000).map(|_| backoff(attempt, initial, max)).collect();
            assert!(waits.iter().all(|w| *w <= cap), "attempt {attempt}: over {cap:?}");
            // Spread: both halves of [0, cap] are used (full jitter, not a fixed delay).
            assert!(waits.iter().any(|w| *w < cap / 2) && waits.iter().any(|w| *w > cap / 2), "attempt {attempt}");
        }
        assert_eq!(backoff_cap(40, initial, max), max);
    }

    fn cfg(total: usize, per_ip: usize, rate: u32, burst: u32) -> LimitsConfig {
        LimitsConfig {
            max_connections: total,
            max_connections_per_ip: per_ip,
            accept_rate_per_sec: rate,
            accept_burst: burst,
            ..LimitsConfig::default()
        }
    }

    fn full(a: Admission) -> ConnSlot {
        match a {
            Admission::Full(s) => s,
            Admission::Reserve(_) => panic!("reserve"),
            Admission::Refused(e) => panic!("refused: {e:?}"),
        }
    }

    fn refused(a: Admission) -> Code {
        match a {
            Admission::Refused(e) => e.code,
            _ => panic!("admitted"),
        }
    }

    #[test]
    fn per_ip_and_total_caps_give_slots_back_and_the_reserve_comes_last() {
        let l = ConnLimits::new(&cfg(3, 2, 0, 1), vec![], None);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let s1 = full(l.admit_tcp(a));
        let _s2 = full(l.admit_tcp(a));
        assert_eq!(refused(l.admit_tcp(a)), Code::TooManyConnectionsFromIp);
        let _s3 = full(l.admit_tcp(b));
        let reserve: Vec<_> = (0..RESERVED_CONNECTIONS)
            .map(|i| match l.admit_tcp(IpAddr::from([10, 0, 0, i as u8])) {
                Admission::Reserve(s) => s,
                _ => panic!("expected a reserved place"),
            })
            .collect();
        assert_eq!(refused(l.admit_tcp("10.1.0.1".parse().unwrap())), Code::TooManyConnections);
        assert_eq!(l.tracked_ips(), 2 + RESERVED_CONNECTIONS, "a refusal keeps no per-IP state");
        drop(reserve);
        drop(s1);
        let _again = full(l.admit_tcp(a));
        assert_eq!(l.open(), 3);
    }

    #[test]
    fn per_ip_state_holds_only_open_connections() {
        let l = ConnLimits::new(&cfg(0, 10, 0, 1), vec![], None);
        let slots: Vec<_> = (0..100).map(|i| full(l.admit_tcp(IpAddr::from([127, 0, 1, i as u8])))).collect();
        assert_eq!(l.tracked_ips(), 100);
        drop(slots);
        assert_eq!(l.tracked_ips(), 0);
    }

    #[test]
    fn a_cap_of_zero_is_derived_from_the_open_files_limit() {
        let l = ConnLimits::new(&cfg(0, 0, 0, 1), vec![], Some(20_000));
        assert_eq!(l.max_connections(), 20_000 - crate::doctor::FD_RESERVE as usize - RESERVED_CONNECTIONS);
    }

    #[test]
    fn accept_rate_refuses_the_excess_with_retry_after() {
        let l = ConnLimits::new(&cfg(0, 0, 1, 5), vec![], None);
        for _ in 0..5 {
            l.take_handshake().unwrap();
        }
        let e = l.take_handshake().unwrap_err();
        assert_eq!(e.code, Code::ServerBusy);
        assert_eq!(e.retry_after, Some(1));
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let trusted = vec![Cidr::parse("10.0.0.0/8").unwrap(), Cidr::parse("::1").unwrap()];
        let l = ConnLimits::new(&cfg(0, 1, 0, 1), trusted, None);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.7, 10.0.0.9".parse().unwrap());
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(l.client_ip(proxy, &h), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(l.client_ip(stranger, &h), stranger, "a stranger's header is not believed");
        let mut f = HeaderMap::new();
        f.insert("forwarded", "for=\"[2001:db8::17]:4711\";proto=https, for=10.0.0.1".parse().unwrap());
        assert_eq!(l.client_ip("::1".parse().unwrap(), &f), "2001:db8::17".parse::<IpAddr>().unwrap());
        // The proxy itself is not capped per IP; its clients are.
        let _p1 = full(l.admit_tcp(proxy));
        let _p2 = full(l.admit_tcp(proxy));
        let _c = l.admit_forwarded("198.51.100.7".parse().unwrap()).unwrap();
        assert_eq!(
            l.admit_forwarded("198.51.100.7".parse().unwrap()).err().unwrap().code,
            Code::TooManyConnectionsFromIp
        );
    }

    #[test]
    fn cidrs_match_by_prefix() {
        let c = Cidr::parse("192.168.0.0/16").unwrap();
        assert!(c.contains("192.168.4.5".parse().unwrap()));
        assert!(!c.contains("192.169.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:192.168.0.1".parse().unwrap()), "IPv4-mapped");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
    }

    #[test]
    fn client_publishes_are_rate_limited_per_ip() {
        let l = ConnLimits::new(&LimitsConfig { client_publishes_per_sec: 1, ..cfg(0, 0, 0, 1) }, vec![], None);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        l.take_publish(a).unwrap();
        l.take_publish(a).unwrap();
        assert_eq!(l.take_publish(a).unwrap_err().code, Code::RateLimited);
        l.take_publish("127.0.0.3".parse().unwrap()).unwrap();
    }
}
