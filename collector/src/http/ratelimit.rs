//! Per-client-IP token buckets for the ingest endpoints (batches over HTTP and QUIC, and
//! redirects), measured in clicks. In memory, approximate by design (a restart forgets the
//! buckets); idle full buckets are swept so the table stays small.
//!
//! IPv6 clients are keyed by their /64: one subscriber usually holds a whole /64, and
//! keying by full address would let one attacker make 2^64 buckets. Sweeps run at most
//! once a second, and the table has a hard cap: at the cap a new address is refused
//! (Retry-After 1) rather than costing memory, so no number of addresses costs more than
//! `MAX_BUCKETS` entries or makes every request pay for a sweep.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Token buckets keyed by client IP.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    map: HashMap<IpAddr, (f64, Instant)>,
    last_sweep: Option<Instant>,
}

const SWEEP_AT: usize = 100_000;
/// Most buckets held (~50 MB at worst).
const MAX_BUCKETS: usize = 1_000_000;

/// The key a client address is limited under: IPv4 (and IPv4-mapped IPv6) as is, IPv6 by
/// its /64 (one subscriber usually holds a whole /64). Also used for the per-IP
/// connection caps.
pub(crate) fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

/// Refused: the client may retry after this many whole seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub u32);

impl RateLimiter {
    /// `rate` clicks/s sustained (0 = unlimited) with `burst`.
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                last_sweep: None,
            }),
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
        let ip = key(ip);
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Buckets { map, last_sweep } = &mut *guard;
        let sweep_due = last_sweep.is_none_or(|t| now.saturating_duration_since(t).as_secs() >= 1);
        if map.len() >= SWEEP_AT && sweep_due {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
            *last_sweep = Some(now);
        }
        if map.len() >= MAX_BUCKETS && !map.contains_key(&ip) {
            return Err(RetryAfter(1));
        }
        let (tokens, at) = map.entry(ip).or_insert((self.burst, now));
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
    fn ipv6_addresses_of_one_64_share_a_bucket() {
        let l = RateLimiter::new(1.0, 2.0);
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.allow(a, t0) && l.allow(b, t0));
        assert!(!l.allow(a, t0), "the /64 spent its burst");
        assert!(l.allow(other, t0), "another /64 has its own");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(l.allow(mapped, t0) && l.allow(v4, t0));
        assert!(!l.allow(v4, t0), "IPv4-mapped is the IPv4 address");
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
