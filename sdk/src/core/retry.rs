//! The retry schedule: which responses are retried, exponential backoff with full jitter,
//! and `Retry-After` parsing. Pure functions; the caller supplies randomness and time.

use std::time::{Duration, UNIX_EPOCH};

/// What to do with a response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// 2xx: the collector has the clicks.
    Delivered,
    /// 408, 425, 429, 5xx (and transport errors/timeouts): try again later.
    Retry,
    /// Any other status: retrying cannot help; drop and report.
    Reject,
}

/// Classifies an HTTP status.
pub fn classify(status: u16) -> Disposition {
    match status {
        200..=299 => Disposition::Delivered,
        408 | 425 | 429 | 500..=599 => Disposition::Retry,
        _ => Disposition::Reject,
    }
}

/// Backoff settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff ceiling.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
    /// Attempts per batch per flush (>= 1). When they run out the clicks stay queued and
    /// the next flush starts over.
    pub max_attempts: u32,
    /// Longest `Retry-After` honoured (a server asking for more gets this).
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(30),
            max_attempts: 6,
            max_retry_after: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// Full-jitter backoff after failed attempt `attempt` (1-based):
    /// `rand01 * min(max_delay, base_delay * 2^(attempt-1))`, `rand01` in [0, 1).
    pub fn backoff(&self, attempt: u32, rand01: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        ceiling.mul_f64(rand01.clamp(0.0, 1.0))
    }

    /// The wait before the next attempt: the jittered backoff, but never less than the
    /// server's `Retry-After` (capped at `max_retry_after`).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, rand01: f64) -> Duration {
        let backoff = self.backoff(attempt, rand01);
        match retry_after {
            Some(ra) => ra.min(self.max_retry_after).max(backoff),
            None => backoff,
        }
    }
}

/// Parses a `Retry-After` value: delta seconds, or an HTTP date relative to `now_ms`.
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_ms = at.duration_since(UNIX_EPOCH).ok()?.as_millis();
    let now_ms = u128::try_from(now_ms).ok()?;
    let wait = u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(u64::MAX);
    Some(Duration::from_millis(wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classification() {
        for s in [200, 202, 204] {
            assert_eq!(classify(s), Disposition::Delivered);
        }
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert_eq!(classify(s), Disposition::Retry);
        }
        for s in [301, 400, 401, 403, 404, 413, 415] {
            assert_eq!(classify(s), Disposition::Reject);
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(" 7 ", 0), Some(Duration::from_secs(7)));
        // Sun, 06 Nov 1994 08:49:37 GMT = 784111777 s.
        let now = 784_111_777_000 - 5_000;
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now + 60_000),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", 0), None);
    }

    #[test]
    fn retry_after_is_a_floor_and_capped() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3)), 0.0),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(99_999)), 0.5),
            p.max_retry_after
        );
    }

    proptest! {
        #[test]
        fn backoff_within_full_jitter_bounds(attempt in 1u32..100, r in 0.0f64..1.0) {
            let p = RetryPolicy::default();
            let d = p.backoff(attempt, r);
            let ceiling = (p.base_delay.as_secs_f64() * 2f64.powi((attempt - 1).min(30) as i32))
                .min(p.max_delay.as_secs_f64());
            prop_assert!(d.as_secs_f64() <= ceiling + 1e-9);
            prop_assert!((d.as_secs_f64() - r * ceiling).abs() < 1e-6);
        }
    }
}
