//! Per-client-IP token buckets for the ingest endpoints (batches over HTTP and QUIC, and
//! redirects), measured in clicks. In memory, approximate by design (a restart forgets the
//! buckets); idle full buckets are swept so the table stays small.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Token buckets keyed by client IP.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

const SWEEP_AT: usize = 100_000;

/// Refused: the client may retry after this many whole seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub u32);

impl RateLimiter {
    /// `rate` clicks/s sustained (0 = unlimited) with `burst`.
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True when limiting is on.
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes one token for `ip` at `now`; false when the client is over its rate.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        self.take(ip, 1, now).is_ok()
    }

    /// The burst, in whole clicks (at least 1).
    pub fn burst(&self) -> usize {
        self.burst as usize
    }

    /// Takes `cost` tokens (at most the burst, so a full batch always fits an idle
    /// bucket; 0 is free) for `ip` at `now`. On refusal nothing is taken and the answer
    /// says when the tokens will be there.
    pub fn take(&self, ip: IpAddr, cost: usize, now: Instant) -> Result<(), RetryAfter> {
        if self.rate <= 0.0 || cost == 0 {
            return Ok(());
        }
        let cost = (cost as f64).min(self.burst);
        let ip = ip.to_canonical();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() >= SWEEP_AT {
            let (rate, burst) = (self.rate, self.burst);
            b.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = b.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *at = now;
        if *tokens >= cost {
            *tokens -= cost;
            Ok(())
        } else {
            let secs = ((cost - *tokens) / self.rate).ceil().max(1.0);
            Err(RetryAfter(if secs >= f64::from(u32::MAX) {
                u32::MAX
            } else {
                secs as u32
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let l = RateLimiter::new(10.0, 3.0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow(ip, t0)));
        assert!(!l.allow(ip, t0));
        assert!(l.allow(other, t0), "buckets are per IP");
        assert!(l.allow(ip, t0 + Duration::from_millis(100)));
        assert!(!l.allow(ip, t0 + Duration::from_millis(100)));
        assert!(RateLimiter::new(0.0, 1.0).allow(ip, t0));
    }

    #[test]
    fn batches_cost_their_clicks_and_say_when_to_retry() {
        let l = RateLimiter::new(100.0, 500.0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(l.take(ip, 400, t0), Ok(()));
        // 100 left; 300 more need 200 tokens = 2 s at 100/s.
        assert_eq!(l.take(ip, 300, t0), Err(RetryAfter(2)));
        // A refusal takes nothing: 100 are still there.
        assert_eq!(l.take(ip, 100, t0), Ok(()));
        // A batch larger than the burst costs the burst (it fits a full bucket).
        assert_eq!(l.take(ip, 10_000, t0 + Duration::from_secs(5)), Ok(()));
        assert_eq!(l.take(ip, 0, t0 + Duration::from_secs(5)), Ok(()));
        assert_eq!(
            l.take(ip, 1, t0 + Duration::from_secs(5)),
            Err(RetryAfter(1))
        );
    }
}
