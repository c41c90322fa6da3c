//! The pipeline benchmark's load generator: every request body (signed tokens, encoded
//! `ClickBatch`es) is built before the timed phase, on every core, so that during the
//! timed phase the generator only sends bytes over kept-alive connections and the system
//! under test gets the CPU. (Minting a token and encoding a click cost the generator
//! 0.6–1.0 of the box's 2 cores at 100k–250k clicks/s when it went through the SDK.)
//!
//! The traffic has the shape `adclick bench pipeline` has always used, so the bench's
//! acked-versus-counted check keeps an oracle that does not depend on the collectors:
//! Zipf ads, five dimensions, a share of repeats of recent impressions (2%), a share of
//! forged tokens (1%), device clocks off by up to 2 minutes, no late or bot clicks.
//!
//! Timestamps: a body built at `P` and sent at `T` carries `occurred_at` and `sent_at` of
//! `P` (plus the batch's device-clock skew), exactly like a device whose clock is `T - P`
//! slow: the collector's clock correction (`occurred_at + received_at - sent_at`) gives
//! the right event time as long as `T - P` stays within its skew bound (24 h by default).
//! Tokens are minted with a TTL that outlives preparation plus the run.
//!
//! It must not do per-click work while the load runs: no minting, no encoding, no
//! allocation per click (one `Bytes` clone per request).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1;
use adclick_sdk::ImpressionSigner;
use anyhow::{Context, Result};
use bytes::Bytes;
use prost::Message;

use crate::traffic::{self, COUNTRIES, OSES, SITES};

/// What to build.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Distinct ads (ids 1..=ads), Zipf with exponent `zipf_s`.
    pub ads: u64,
    /// Zipf exponent.
    pub zipf_s: f64,
    /// Percent of clicks repeating one of the last 1,024 impressions of the same builder.
    pub duplicate_pct: f64,
    /// Percent of clicks with a forged token (right key id, wrong secret).
    pub forged_pct: f64,
    /// Device clocks off by up to this many ms (either way; one offset per batch).
    pub clock_skew_ms: i64,
    /// Clicks per request.
    pub batch_size: usize,
    /// Token lifetime: must outlive preparation plus the timed phase.
    pub ttl: Duration,
}

/// Request bodies ready to send, and what they hold.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Encoded `ClickBatch`es, `batch_size` clicks each.
    pub bodies: Vec<Bytes>,
    /// Clicks repeating an earlier impression.
    pub duplicates: u64,
    /// Clicks with a forged token.
    pub forged: u64,
}

impl Prepared {
    /// Bytes held by the bodies.
    pub fn bytes(&self) -> usize {
        self.bodies.iter().map(Bytes::len).sum()
    }
}

use crate::traffic::Rng;

/// Builds `batches` bodies of `shape.batch_size` clicks with tokens from `keyring`, split
/// over `threads` builders (each with its own window of recent impressions to repeat).
pub fn prepare(
    shape: &Shape,
    keyring: &Keyring,
    batches: usize,
    threads: usize,
) -> Result<Prepared> {
    let signer = ImpressionSigner::new(keyring.clone()).with_ttl(shape.ttl)?;
    let forger = ImpressionSigner::new(Keyring::new(SigningKey::new(
        keyring.current().id(),
        &[0x5A; 32],
    )?))
    .with_ttl(shape.ttl)?;
    let cdf = traffic::zipf_cdf(shape.ads, shape.zipf_s);
    let threads = threads.clamp(1, batches.max(1));
    let per = batches.div_ceil(threads);
    let now = crate::keys::now_ms();
    let parts: Vec<Result<Prepared>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let n = per.min(batches.saturating_sub(t * per));
                let (signer, forger, cdf) = (&signer, &forger, &cdf);
                s.spawn(move || build(shape, signer, forger, cdf, n, now, t as u64))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a body builder panicked")))
            })
            .collect()
    });
    let mut out = Prepared::default();
    // Interleave the builders' bodies so that every stretch of the run has each
    // builder's repeats close to their originals (as one SDK process would send them).
    let mut parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
    let mut iters: Vec<_> = parts
        .iter_mut()
        .map(|p| {
            out.duplicates += p.duplicates;
            out.forged += p.forged;
            std::mem::take(&mut p.bodies).into_iter()
        })
        .collect();
    out.bodies.reserve(batches);
    loop {
        let before = out.bodies.len();
        for it in &mut iters {
            out.bodies.extend(it.next());
        }
        if out.bodies.len() == before {
            break;
        }
    }
    Ok(out)
}

/// One builder's share: `n` bodies.
fn build(
    shape: &Shape,
    signer: &ImpressionSigner,
    forger: &ImpressionSigner,
    cdf: &[f64],
    n: usize,
    now: i64,
    seed: u64,
) -> Result<Prepared> {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ (seed.wrapping_add(1)).wrapping_mul(0x9E37_79B9));
    let mut recent: VecDeque<String> = VecDeque::with_capacity(1024);
    let mut out = Prepared::default();
    out.bodies.reserve(n);
    let size = shape.batch_size.max(1);
    for _ in 0..n {
        let skew = if shape.clock_skew_ms > 0 {
            (rng.next() % (2 * shape.clock_skew_ms as u64 + 1)) as i64 - shape.clock_skew_ms
        } else {
            0
        };
        let sent_at = now + skew;
        let mut clicks = Vec::with_capacity(size);
        for _ in 0..size {
            let token = if rng.pct(shape.duplicate_pct) && !recent.is_empty() {
                out.duplicates += 1;
                recent[(rng.next() % recent.len() as u64) as usize].clone()
            } else {
                let u = rng.unit();
                let ad = cdf.partition_point(|c| *c < u) as u64 + 1;
                // Served 2-30 s before the click, as a user reads the page first.
                let issued = now - 2_000 - (rng.unit() * 28_000.0) as i64;
                if rng.pct(shape.forged_pct) {
                    out.forged += 1;
                    forger.mint_at(&traffic::placement(ad), issued)?.token
                } else {
                    let t = signer.mint_at(&traffic::placement(ad), issued)?.token;
                    if recent.len() == 1024 {
                        recent.pop_front();
                    }
                    recent.push_back(t.clone());
                    t
                }
            };
            clicks.push(v1::Click {
                token,
                // Clicked up to 1 s before the batch went out.
                occurred_at_ms: sent_at - (rng.next() % 1_000) as i64,
                sent_at_ms: sent_at,
                country: COUNTRIES[(rng.next() % 6) as usize].into(),
                device: [v1::Device::Mobile, v1::Device::Desktop, v1::Device::Tablet]
                    [(rng.next() % 3) as usize] as i32,
                os: OSES[(rng.next() % 4) as usize].into(),
                site: SITES[(rng.next() % 5) as usize].into(),
                user_id: format!("user-{}", rng.next() % 50_000),
                ..Default::default()
            });
        }
        let batch = v1::ClickBatch {
            sdk_name: "adclick-bench".into(),
            sdk_version: env!("CARGO_PKG_VERSION").into(),
            sent_at_ms: sent_at,
            clicks,
        };
        out.bodies.push(Bytes::from(batch.encode_to_vec()));
    }
    Ok(out)
}

/// What a sending run did.
#[derive(Debug, Default)]
pub struct SendStats {
    /// Bodies whose send started (each `batch_size` clicks).
    pub started: AtomicU64,
    /// Bodies answered 2xx.
    pub acked: AtomicU64,
    /// Request latencies (µs), one per request that got an answer.
    latencies: Mutex<Vec<u64>>,
    /// Failed attempts by kind ("http 503", "timeout", ...).
    errors: Mutex<BTreeMap<String, u64>>,
}

impl SendStats {
    /// (p50, p99) request latency, ms.
    pub fn latency_ms(&self) -> (f64, f64) {
        let mut v = self.latencies.lock().map(|l| l.clone()).unwrap_or_default();
        if v.is_empty() {
            return (0.0, 0.0);
        }
        v.sort_unstable();
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
        (at(0.5), at(0.99))
    }

    /// Failed attempts by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn error(&self, kind: String) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(kind).or_default() += 1;
        }
    }
}

/// A sending run against one collector: `connections` tasks take the next body in turn
/// and post it when it is due (body `i` at `i / rate_bodies` seconds after the start).
pub struct Sender {
    /// Counters.
    pub stats: Arc<SendStats>,
    bodies: Arc<Vec<Bytes>>,
    next: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started_at: Instant,
    interval: Duration,
}

impl Sender {
    /// Starts posting `bodies` to `endpoint` (`http://host:port`) at `rate` clicks per
    /// second (`batch_size` clicks per body) over up to `connections` connections.
    pub fn start(
        endpoint: &str,
        bodies: Vec<Bytes>,
        batch_size: usize,
        rate: f64,
        connections: usize,
    ) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("adclick-bench/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(connections)
            .build()
            .context("HTTP client")?;
        let url: Arc<str> = format!("{}/v1/clicks", endpoint.trim_end_matches('/')).into();
        let interval = Duration::from_secs_f64(batch_size.max(1) as f64 / rate.max(1e-9));
        let stats = Arc::new(SendStats::default());
        let bodies = Arc::new(bodies);
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let started_at = Instant::now();
        let tasks = (0..connections.max(1))
            .map(|_| {
                let (client, url, stats) = (client.clone(), url.clone(), stats.clone());
                let (bodies, next, stop) = (bodies.clone(), next.clone(), stop.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(body) = bodies.get(i) else { return };
                        let due = started_at + interval.mul_f64(i as f64);
                        tokio::time::sleep_until(due.into()).await;
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        stats.started.fetch_add(1, Ordering::Relaxed);
                        post(&client, &url, body, &stats, &stop).await;
                    }
                })
            })
            .collect();
        Ok(Sender {
            stats,
            bodies,
            next,
            stop,
            tasks,
            started_at,
            interval,
        })
    }

    /// Bodies due by now whose send has not started (the generator is behind).
    pub fn backlog_bodies(&self) -> u64 {
        let due = (self.started_at.elapsed().as_secs_f64() / self.interval.as_secs_f64()).floor()
            as u64
            + 1;
        let due = due.min(self.bodies.len() as u64);
        due.saturating_sub(self.stats.started.load(Ordering::Relaxed))
    }

    /// Stops taking new bodies and waits for the requests in flight (each bounded by the
    /// client timeout; a failing one is not retried after the stop).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the tasks waiting for a due time that is past the end.
        self.next.store(usize::MAX / 2, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

/// Posts one body until a 2xx, a refusal retrying cannot fix, or the stop.
async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Bytes,
    stats: &SendStats,
    stop: &AtomicBool,
) {
    let mut delay = Duration::from_millis(20);
    loop {
        let t = Instant::now();
        let r = client
            .post(url)
            .header("content-type", "application/x-protobuf")
            .body(body.clone())
            .send()
            .await;
        let retry = match r {
            Ok(resp) => {
                let status = resp.status().as_u16();
                // Read the verdict so the connection is reused.
                let _ = resp.bytes().await;
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut l) = stats.latencies.lock() {
                    l.push(us);
                }
                if (200..300).contains(&status) {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                stats.error(format!("http {status}"));
                // As the SDK: 408, 429 and 5xx are worth retrying, other 4xx are not.
                status == 408 || status == 429 || status >= 500
            }
            Err(e) => {
                stats.error(
                    if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connect error"
                    } else {
                        "request error"
                    }
                    .into(),
                );
                true
            }
        };
        if !retry || stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::new(SigningKey::new(7, &[0x11; 32]).unwrap())
    }

    /// Every body decodes, has `batch_size` clicks, and exactly the forged share fails
    /// verification with the real keyring while every other token verifies; repeats
    /// repeat an earlier token of the same run.
    #[test]
    fn bodies_hold_the_announced_shares_and_valid_tokens() {
        let shape = Shape {
            ads: 1000,
            zipf_s: 1.1,
            duplicate_pct: 5.0,
            forged_pct: 3.0,
            clock_skew_ms: 120_000,
            batch_size: 50,
            ttl: Duration::from_secs(3600),
        };
        let kr = keyring();
        let p = prepare(&shape, &kr, 40, 3).unwrap();
        assert_eq!(p.bodies.len(), 40);
        let verifier = kr;
        let now = crate::keys::now_ms();
        let (mut bad, mut seen, mut repeats) = (0u64, std::collections::HashSet::new(), 0u64);
        for b in &p.bodies {
            let batch = v1::ClickBatch::decode(b.as_ref()).unwrap();
            assert_eq!(batch.clicks.len(), 50);
            for c in &batch.clicks {
                assert_eq!(c.sent_at_ms, batch.sent_at_ms);
                assert!((now - batch.sent_at_ms).abs() <= 120_000 + 60_000);
                match verifier.verify(&c.token, now, 0) {
                    Ok(_) => {
                        if !seen.insert(c.token.clone()) {
                            repeats += 1;
                        }
                    }
                    Err(_) => bad += 1,
                }
            }
        }
        assert_eq!(bad, p.forged);
        // A repeat of a token never seen before cannot happen (they come from `recent`).
        assert_eq!(repeats, p.duplicates);
        assert!(p.forged > 0 && p.duplicates > 0);
    }
}
