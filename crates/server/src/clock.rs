//! The wall clock that token times (`exp`, `nbf`, `iat`) are checked against, and the
//! timers that fire when a token runs out.
//!
//! It is the system clock plus an offset that is zero in production. The offset exists
//! so that a test can decide when a token expires instead of racing the scheduler: it
//! sets the server's clock back, connects with a token that is about to expire, then
//! moves the clock forward — and every expiry timer wakes and re-reads the time.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
    /// Woken (all waiters) when the offset changes.
    changed: Notify,
}

impl Clock {
    /// Milliseconds since the Unix epoch, as this server sees them.
    pub fn now_ms(&self) -> u64 {
        let system = switchboard_core::now_millis();
        let offset = self.offset_ms.load(Ordering::Relaxed);
        if offset >= 0 {
            system.saturating_add(offset as u64)
        } else {
            system.saturating_sub(offset.unsigned_abs())
        }
    }

    /// Seconds since the Unix epoch, as this server sees them.
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// Moves this server's time by `by` milliseconds (negative: back). Every pending
    /// [`Clock::sleep_until_ms`] re-reads the time.
    pub fn shift(&self, by_ms: i64) {
        self.offset_ms.fetch_add(by_ms, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Resolves once [`Clock::now_ms`] has reached `deadline_ms`.
    pub async fn sleep_until_ms(&self, deadline_ms: u64) {
        loop {
            // Registered before the time is read: a shift in between still wakes us.
            let changed = self.changed.notified();
            let now = self.now_ms();
            if now >= deadline_ms {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(deadline_ms - now)) => {}
                _ = changed => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_shift_forward_wakes_a_sleeper_early() {
        let c = Arc::new(Clock::default());
        let deadline = c.now_ms() + 3_600_000;
        let sleeper = tokio::spawn({
            let c = c.clone();
            async move { c.sleep_until_ms(deadline).await }
        });
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        c.shift(3_600_000);
        tokio::time::timeout(Duration::from_secs(60), sleeper).await.expect("woke").unwrap();
    }

    #[test]
    fn a_shift_back_never_goes_below_zero() {
        let c = Clock::default();
        c.shift(i64::MIN / 2);
        assert_eq!(c.now_ms(), 0);
    }
}
