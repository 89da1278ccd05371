//! A token bucket: per-app `max_messages_per_sec` and the listener's
//! `max_handshakes_per_sec`. One small mutex; contention is per app.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `per_sec` events a second with a burst of one second's worth;
/// 0 means no limit.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_sec: u64) -> RateLimiter {
        RateLimiter {
            per_sec,
            state: Mutex::new((per_sec as f64, Instant::now())),
        }
    }

    /// Take one event's token, or say how long until one is free.
    pub fn try_take(&self) -> Result<(), Duration> {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> Result<(), Duration> {
        if self.per_sec == 0 {
            return Ok(());
        }
        let rate = self.per_sec as f64;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *st;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

/// A `Retry-After` value in whole seconds (at least 1) for a wait.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_refuses() {
        let r = RateLimiter::new(0);
        for _ in 0..10_000 {
            assert!(r.try_take().is_ok());
        }
    }

    #[test]
    fn refuses_past_the_burst_and_refills() {
        let r = RateLimiter::new(5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(r.try_take_at(t0).is_ok());
        }
        let wait = r.try_take_at(t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200));
        assert!(r.try_take_at(t0 + Duration::from_millis(200)).is_ok());
        assert!(r.try_take_at(t0 + Duration::from_millis(200)).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2100)), 3);
    }
}
