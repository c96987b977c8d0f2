//! Connection limits: total and per-IP caps on streaming connections, and the accept
//! rate limiter that absorbs reconnect storms.
//!
//! The accept limiter is a token bucket over all new streaming handshakes (`/ws`,
//! `/sse`): when a node restarts and every client comes back at once, the excess gets
//! `503` with `Retry-After` and retries later (clients back off with jitter), while
//! established connections are untouched. Per-IP state holds only IPs with open
//! connections, so it cannot grow without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Limits as LimitsConfig;
use crate::error::{ApiError, Code};

/// The peer address of a request, put in its extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    rate: f64,
    burst: f64,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    bucket: Mutex<Bucket>,
}

/// An admitted streaming connection; dropping it gives its slot back.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: Option<IpAddr>,
}

impl ConnLimits {
    pub fn new(c: &LimitsConfig) -> Arc<Self> {
        Arc::new(ConnLimits {
            max_total: c.max_connections,
            max_per_ip: c.max_connections_per_ip,
            rate: c.accept_rate_per_sec as f64,
            burst: c.accept_burst.max(1) as f64,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            bucket: Mutex::new(Bucket { tokens: c.accept_burst.max(1) as f64, last: Instant::now() }),
        })
    }

    /// Open streaming connections.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// IPs currently tracked (for tests of boundedness).
    pub fn tracked_ips(&self) -> usize {
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn take_token(&self) -> Result<(), f64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - b.tokens) / self.rate)
        }
    }

    /// Admits one new streaming connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<ConnSlot, ApiError> {
        if let Err(wait) = self.take_token() {
            let secs = wait.ceil().max(1.0) as u64;
            return Err(
                ApiError::new(Code::ServerBusy, "too many new connections right now; retry later").retry_after(secs)
            );
        }
        if self.max_total > 0 && self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(ApiError::new(Code::TooManyConnections, "the server is at its connection limit").retry_after(5));
        }
        if let Some(ip) = ip {
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
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnSlot { limits: self.clone(), ip })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            let mut m = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(total: usize, per_ip: usize, rate: u32, burst: u32) -> LimitsConfig {
        LimitsConfig {
            max_connections: total,
            max_connections_per_ip: per_ip,
            accept_rate_per_sec: rate,
            accept_burst: burst,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn per_ip_and_total_caps_give_slots_back() {
        let l = ConnLimits::new(&cfg(3, 2, 0, 1));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let s1 = l.admit(Some(a)).unwrap();
        let _s2 = l.admit(Some(a)).unwrap();
        assert_eq!(l.admit(Some(a)).err().unwrap().code, Code::TooManyConnectionsFromIp);
        let _s3 = l.admit(Some(b)).unwrap();
        assert_eq!(l.admit(Some(b)).err().unwrap().code, Code::TooManyConnections);
        drop(s1);
        assert!(l.admit(Some(a)).is_ok());
    }

    #[test]
    fn per_ip_state_holds_only_open_connections() {
        let l = ConnLimits::new(&cfg(0, 10, 0, 1));
        let slots: Vec<_> = (0..100).map(|i| l.admit(Some(IpAddr::from([127, 0, 1, i as u8]))).unwrap()).collect();
        assert_eq!(l.tracked_ips(), 100);
        drop(slots);
        assert_eq!(l.tracked_ips(), 0);
    }

    #[test]
    fn accept_rate_refuses_the_excess_with_retry_after() {
        let l = ConnLimits::new(&cfg(0, 0, 1, 5));
        let ok: Vec<_> = (0..5).map(|_| l.admit(None).unwrap()).collect();
        let e = l.admit(None).err().unwrap();
        assert_eq!(e.code, Code::ServerBusy);
        assert_eq!(e.retry_after, Some(1));
        drop(ok);
    }
}
