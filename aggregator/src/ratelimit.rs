//! Per-API-key rate limits on queries: one token bucket per configured key
//! (`query.rate_limit_per_second` sustained, `query.rate_limit_burst` at once), plus one
//! shared bucket for the keyless caller of `query.allow_unauthenticated`.
//!
//! Memory is bounded by the configuration, not by traffic: buckets exist only for the keys
//! listed in `api_keys` (made at start), and a request whose key is not listed is not
//! charged (authorisation refuses it right after; an unauthenticated flood is bounded by
//! the connection caps of `listen.rs`). Keys are matched with the same constant-time
//! comparison as authorisation, over every key.
//!
//! Knows no gRPC or HTTP: [`RateLimiter::check`] says how long to wait, `grpc.rs` turns
//! that into RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` and `http.rs` into 429 with
//! `Retry-After` and an RFC 9457 problem.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{ApiKey, QueryConfig};
use crate::query::constant_time_eq;

/// A refused query: the caller's bucket is empty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limited {
    /// When the next query would be admitted.
    pub retry_after: Duration,
    /// The configured sustained rate (for the message).
    pub per_second: u32,
    /// The configured burst (for the message).
    pub burst: u32,
}

impl Limited {
    /// `Retry-After` in whole seconds: rounded up, at least 1 (the header has no
    /// fractions; 0 would invite an immediate retry that is refused again).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rate limit exceeded: this API key may make {} queries per second (bursts of {}); \
             retry after {} ms",
            self.per_second,
            self.burst,
            self.retry_after.as_millis().max(1)
        )
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every configured key.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: u32,
    burst: u32,
    keys: Vec<String>,
    /// One per key in `keys`, then the keyless caller's.
    buckets: Vec<Mutex<Bucket>>,
    allow_unauthenticated: bool,
}

impl RateLimiter {
    /// Buckets for `keys`, full at start. `rate_limit_per_second = 0` turns limiting off.
    pub fn new(cfg: &QueryConfig, keys: &[ApiKey]) -> Self {
        let now = Instant::now();
        let burst = cfg.rate_limit_burst.max(1);
        RateLimiter {
            per_second: cfg.rate_limit_per_second,
            burst,
            keys: keys.iter().map(|k| k.key.clone()).collect(),
            buckets: (0..=keys.len())
                .map(|_| {
                    Mutex::new(Bucket {
                        tokens: f64::from(burst),
                        at: now,
                    })
                })
                .collect(),
            allow_unauthenticated: cfg.allow_unauthenticated,
        }
    }

    /// Charges one query to the key in the `authorization` header value. `Ok` when
    /// admitted, when limiting is off, or when the header names no configured key (not
    /// this module's refusal to make: authorisation answers 401).
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Limited> {
        self.check_at(authorization, Instant::now())
    }

    /// [`RateLimiter::check`] at a given instant (tests).
    pub fn check_at(&self, authorization: Option<&str>, now: Instant) -> Result<(), Limited> {
        if self.per_second == 0 {
            return Ok(());
        }
        let Some(i) = self.bucket_of(authorization) else {
            return Ok(());
        };
        let Some(bucket) = self.buckets.get(i) else {
            return Ok(());
        };
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let rate = f64::from(self.per_second);
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(f64::from(self.burst));
        b.at = b.at.max(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Limited {
                retry_after: Duration::from_secs_f64((1.0 - b.tokens) / rate),
                per_second: self.per_second,
                burst: self.burst,
            })
        }
    }

    /// The bucket of a header value: the key's index (the header parsed exactly as
    /// `query::authorize` does), the shared keyless bucket, or none.
    fn bucket_of(&self, authorization: Option<&str>) -> Option<usize> {
        let Some(h) = authorization else {
            return self.allow_unauthenticated.then_some(self.keys.len());
        };
        let token = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))?
            .trim();
        // Every key is compared, so timing does not say which one matched.
        let mut found = None;
        for (i, k) in self.keys.iter().enumerate() {
            if constant_time_eq(k, token) {
                found = Some(i);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;

    fn limiter(per_second: u32, burst: u32, anon: bool) -> RateLimiter {
        let cfg = QueryConfig {
            rate_limit_per_second: per_second,
            rate_limit_burst: burst,
            allow_unauthenticated: anon,
            ..Default::default()
        };
        let key = |k: &str| ApiKey {
            key: k.into(),
            role: Role::Admin,
            advertiser_id: None,
        };
        RateLimiter::new(
            &cfg,
            &[key("key-a-0123456789ab"), key("key-b-0123456789ab")],
        )
    }

    const A: Option<&str> = Some("Bearer key-a-0123456789ab");
    const B: Option<&str> = Some("bearer  key-b-0123456789ab ");

    #[test]
    fn burst_then_rate_per_key() {
        let l = limiter(10, 3, false);
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check_at(A, t), Ok(()));
        }
        let e = l.check_at(A, t).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_millis(100));
        assert_eq!(e.retry_after_secs(), 1);
        // Another key has its own bucket.
        assert_eq!(l.check_at(B, t), Ok(()));
        // 100 ms later one token is back, and only one.
        let t2 = t + Duration::from_millis(100);
        assert_eq!(l.check_at(A, t2), Ok(()));
        assert!(l.check_at(A, t2).is_err());
        // Idle for long: refilled to the burst, not beyond.
        let t3 = t + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.check_at(A, t3), Ok(()));
        }
        assert!(l.check_at(A, t3).is_err());
    }

    #[test]
    fn unknown_keys_are_not_charged_and_zero_is_off() {
        let l = limiter(1, 1, false);
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.check_at(Some("Bearer nope-0123456789abc"), t), Ok(()));
            assert_eq!(l.check_at(None, t), Ok(()));
            assert_eq!(l.check_at(Some("Basic x"), t), Ok(()));
        }
        let off = limiter(0, 0, true);
        for _ in 0..1000 {
            assert_eq!(off.check_at(A, t), Ok(()));
        }
    }

    #[test]
    fn on_by_default_at_50_per_second_bursts_of_100() {
        let cfg = QueryConfig::default();
        assert_eq!((cfg.rate_limit_per_second, cfg.rate_limit_burst), (50, 100));
        let l = RateLimiter::new(
            &cfg,
            &[ApiKey {
                key: "key-a-0123456789ab".into(),
                role: Role::Admin,
                advertiser_id: None,
            }],
        );
        let t = Instant::now();
        for _ in 0..100 {
            assert_eq!(l.check_at(A, t), Ok(()));
        }
        let e = l.check_at(A, t).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_millis(20));
    }

    #[test]
    fn the_keyless_caller_shares_one_bucket() {
        let l = limiter(1, 2, true);
        let t = Instant::now();
        assert_eq!(l.check_at(None, t), Ok(()));
        assert_eq!(l.check_at(None, t), Ok(()));
        let e = l.check_at(None, t).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_secs(1));
        assert!(e.to_string().contains("1 queries per second"));
        assert_eq!(l.check_at(A, t), Ok(()));
    }
}
