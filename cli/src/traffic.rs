//! Synthetic click traffic through the native SDK, shared by `adclick dev` and
//! `adclick loadgen`: Zipf-distributed ads, dimensions, a share of duplicates, late clicks,
//! skewed device clocks and forged tokens, paced to a target rate. Every send is timed and
//! every failure classified; an optional ledger records what was sent and what the
//! pipeline should make of it.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1;
use adclick_sdk::core::Clock;
use adclick_sdk::native::{SendFuture, Transport, TransportError, TransportResponse};
use adclick_sdk::{AdPlacement, Device, Dimensions, HttpTransport, ImpressionSigner, Tracker};
use anyhow::{Context, Result};
use prost::Message;

/// Traffic shape.
#[derive(Debug, Clone)]
pub struct TrafficConfig {
    /// Clicks per second in total.
    pub rate: f64,
    /// Distinct ads (ids 1..=ads).
    pub ads: u64,
    /// Zipf exponent of ad popularity.
    pub zipf_s: f64,
    /// Percent of clicks that repeat a recent impression (duplicates).
    pub duplicate_pct: f64,
    /// Percent of clicks that happened minutes ago (sent late, like an offline app).
    pub late_pct: f64,
    /// Device clocks are off by up to this many ms (either way).
    pub clock_skew_ms: i64,
    /// Percent of clicks carrying a forged token.
    pub forged_pct: f64,
    /// SDK trackers (think: devices) in parallel.
    pub trackers: usize,
    /// Clicks per SDK batch.
    pub batch_size: usize,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            rate: 1000.0,
            ads: 1000,
            zipf_s: 1.1,
            duplicate_pct: 2.0,
            late_pct: 1.0,
            clock_skew_ms: 120_000,
            forged_pct: 1.0,
            trackers: 4,
            batch_size: 100,
        }
    }
}

/// Where to send.
#[derive(Debug, Clone)]
pub enum Target {
    /// `http://host:port` of a collector.
    Http(String),
    /// A collector's QUIC address, the server name and trusted certificate PEM.
    Quic(SocketAddr, String, String),
}

/// Live counters of a traffic run.
#[derive(Debug, Default)]
pub struct TrafficStats {
    /// Clicks handed to the SDK.
    pub clicks: AtomicU64,
    /// Of which duplicates / late / forged / skewed-clock.
    pub duplicates: AtomicU64,
    /// Late clicks.
    pub late: AtomicU64,
    /// Forged clicks.
    pub forged: AtomicU64,
    /// Requests and their latencies (µs).
    latencies: Mutex<Vec<u64>>,
    /// Failed requests by kind ("http 503", "timeout", ...).
    errors: Mutex<BTreeMap<String, u64>>,
    /// Clicks the SDK could not queue.
    pub refused: AtomicU64,
    /// What the collector said of the clicks in its 2xx answers (HTTP): `accepted`,
    /// `duplicate` and each rejection reason (`bad_signature`, `expired`, ...).
    outcomes: Mutex<BTreeMap<String, u64>>,
    /// Late clicks (sent outside the SDK) acknowledged with a 2xx, and not.
    pub late_acked: AtomicU64,
    /// Late clicks whose batch got no 2xx.
    pub late_lost: AtomicU64,
}

impl TrafficStats {
    /// (count, p50, p99, max) of request latency in ms.
    pub fn latency_ms(&self) -> (usize, f64, f64, f64) {
        let mut v = self.latencies.lock().map(|l| l.clone()).unwrap_or_default();
        if v.is_empty() {
            return (0, 0.0, 0.0, 0.0);
        }
        v.sort_unstable();
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
        (v.len(), at(0.5), at(0.99), at(1.0))
    }

    /// Failed requests by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The collector's per-click verdicts in its 2xx answers (HTTP only; empty over QUIC).
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        self.outcomes.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn count_outcomes(&self, r: &v1::ClickBatchResult) {
        if let Ok(mut o) = self.outcomes.lock() {
            *o.entry("accepted".into()).or_default() += u64::from(r.accepted);
            *o.entry("duplicate".into()).or_default() += u64::from(r.duplicate);
            for (k, v) in &r.rejected {
                *o.entry(k.clone()).or_default() += u64::from(*v);
            }
        }
    }
}

/// HTTP transport that also reads the collector's verdict on each click (the SDK's own
/// transport keeps only a text snippet of the body): a `ClickBatchResult` in every 2xx.
struct VerdictHttp {
    client: reqwest::Client,
    url: String,
    stats: Arc<TrafficStats>,
}

impl VerdictHttp {
    fn new(endpoint: &str, timeout: Duration, stats: Arc<TrafficStats>) -> Result<Self> {
        HttpTransport::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("adclick-loadgen/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("HTTP client")?;
        Ok(VerdictHttp {
            client,
            url: format!("{}/v1/clicks", endpoint.trim_end_matches('/')),
            stats,
        })
    }
}

impl Transport for VerdictHttp {
    fn send(&self, body: Vec<u8>) -> SendFuture<'_> {
        Box::pin(async move {
            let resp = self
                .client
                .post(&self.url)
                .header("content-type", "application/x-protobuf")
                .body(body)
                .send()
                .await
                .map_err(|e| {
                    let kind = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connect error"
                    } else {
                        "request error"
                    };
                    TransportError(format!("{kind}: {e}"))
                })?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = resp.bytes().await.unwrap_or_default();
            if (200..300).contains(&status)
                && let Ok(r) = v1::ClickBatchResult::decode(bytes.as_ref())
            {
                self.stats.count_outcomes(&r);
            }
            let end = bytes.len().min(512);
            Ok(TransportResponse {
                status,
                retry_after,
                body: String::from_utf8_lossy(&bytes[..end]).into_owned(),
            })
        })
    }
}

/// Wraps a transport to time every request and classify every failure.
struct Timed {
    inner: Arc<dyn Transport>,
    stats: Arc<TrafficStats>,
}

impl Transport for Timed {
    fn send(&self, body: Vec<u8>) -> SendFuture<'_> {
        Box::pin(async move {
            let t = Instant::now();
            let r = self.inner.send(body).await;
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Ok(mut l) = self.stats.latencies.lock() {
                l.push(us);
            }
            let kind = match &r {
                Ok(resp) if (200..300).contains(&resp.status) => None,
                Ok(resp) => Some(format!("http {}", resp.status)),
                Err(e) => Some(e.0.split(':').next().unwrap_or("error").to_string()),
            };
            if let Some(k) = kind
                && let Ok(mut e) = self.stats.errors.lock()
            {
                *e.entry(k).or_default() += 1;
            }
            r
        })
    }
}

struct OffsetClock(i64);
impl Clock for OffsetClock {
    fn now_ms(&self) -> i64 {
        crate::keys::now_ms() + self.0
    }
}

/// xorshift: fast, good enough for traffic shapes (not for secrets).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn pct(&mut self, p: f64) -> bool {
        self.unit() * 100.0 < p
    }
}

/// Cumulative Zipf weights for ads 1..=n.
fn zipf_cdf(n: u64, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut v: Vec<f64> = (1..=n.max(1))
        .map(|k| {
            acc += 1.0 / (k as f64).powf(s);
            acc
        })
        .collect();
    let total = acc;
    for x in &mut v {
        *x /= total;
    }
    v
}

/// The ad of a placement: advertiser and campaign derive from the ad id so that queries
/// by advertiser/campaign have something to find.
pub fn placement(ad: u64) -> AdPlacement {
    AdPlacement {
        ad_id: ad,
        advertiser_id: 1 + ad % 7,
        campaign_id: 100 + ad % 23,
        landing_url: format!("https://shop.example.com/ad/{ad}"),
    }
}

const COUNTRIES: [&str; 6] = ["US", "DE", "FR", "GB", "BR", "IN"];
const OSES: [&str; 4] = ["ios", "android", "windows", "macos"];
const SITES: [&str; 5] = [
    "news.example",
    "sports.example",
    "recipes.example",
    "games.example",
    "video.example",
];

/// A running traffic generator.
pub struct Traffic {
    /// Counters.
    pub stats: Arc<TrafficStats>,
    trackers: Vec<Tracker>,
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic").finish_non_exhaustive()
    }
}

/// Starts generating traffic with tokens minted from `keyring` (must be inside a runtime).
pub fn start(
    cfg: TrafficConfig,
    target: Target,
    keyring: Keyring,
    ledger: Option<std::path::PathBuf>,
) -> Result<Traffic> {
    let stats = Arc::new(TrafficStats::default());
    let transport: Arc<dyn Transport> = match &target {
        Target::Http(url) => Arc::new(VerdictHttp::new(
            url,
            Duration::from_secs(10),
            stats.clone(),
        )?),
        Target::Quic(addr, name, pem) => Arc::new(
            adclick_sdk::QuicTransport::with_pem_roots(*addr, name, pem, Duration::from_secs(10))
                .context("QUIC transport")?,
        ),
    };
    let timed: Arc<dyn Transport> = Arc::new(Timed {
        inner: transport.clone(),
        stats: stats.clone(),
    });
    let endpoint = match &target {
        Target::Http(u) => u.clone(),
        Target::Quic(a, _, _) => format!("https://{a}"),
    };
    let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ crate::keys::now_ms() as u64);
    let trackers: Vec<Tracker> = (0..cfg.trackers.max(1))
        .map(|i| {
            // Tracker 0 has a true clock; the others are off by up to clock_skew_ms.
            let skew = if i == 0 || cfg.clock_skew_ms == 0 {
                0
            } else {
                (rng.next() % (2 * cfg.clock_skew_ms as u64 + 1)) as i64 - cfg.clock_skew_ms
            };
            Tracker::builder(&endpoint)
                .transport(timed.clone())
                .clock(Arc::new(OffsetClock(skew)))
                .batch_size(cfg.batch_size.max(1))
                .flush_interval(Duration::from_millis(200))
                .max_queue(100_000)
                .build()
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let signer = ImpressionSigner::new(keyring).with_ttl(Duration::from_secs(3600))?;
    let forger = ImpressionSigner::new(Keyring::new(SigningKey::new(
        signer.keyring().current().id(),
        &[0x5A; 32],
    )?));
    let mut ledger = match ledger {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(&p)
                .with_context(|| format!("cannot create ledger {}", p.display()))?,
        )),
        None => None,
    };
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let cdf = zipf_cdf(cfg.ads, cfg.zipf_s);
    let tr = trackers.clone();
    let st = stats.clone();
    let task = tokio::spawn(async move {
        let mut recent: VecDeque<(String, u64)> = VecDeque::with_capacity(1024);
        let tick = Duration::from_millis(10);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let started = Instant::now();
        let mut sent = 0u64;
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop_rx.changed() => break,
            }
            let due = started.elapsed().as_secs_f64() * cfg.rate;
            let mut late_batch = Vec::new();
            while (sent as f64) < due {
                sent += 1;
                let i = (rng.next() % tr.len() as u64) as usize;
                let dims = Dimensions::new()
                    .country(COUNTRIES[(rng.next() % 6) as usize])
                    .device(
                        [Device::Mobile, Device::Desktop, Device::Tablet]
                            [(rng.next() % 3) as usize],
                    )
                    .os(OSES[(rng.next() % 4) as usize])
                    .site(SITES[(rng.next() % 5) as usize])
                    .user_id(format!("user-{}", rng.next() % 50_000));
                let (token, ad, expect) = if rng.pct(cfg.duplicate_pct) && !recent.is_empty() {
                    let (t, ad) = recent[(rng.next() % recent.len() as u64) as usize].clone();
                    st.duplicates.fetch_add(1, Ordering::Relaxed);
                    (t, ad, "duplicate")
                } else {
                    let u = rng.unit();
                    let ad = cdf.partition_point(|c| *c < u) as u64 + 1;
                    if rng.pct(cfg.forged_pct) {
                        st.forged.fetch_add(1, Ordering::Relaxed);
                        match forger.mint(&placement(ad)) {
                            Ok(m) => (m.token, ad, "bad_signature"),
                            Err(_) => continue,
                        }
                    } else {
                        // A late click (an app that was offline) needs an impression from
                        // before it happened: the collector clamps event time to issued_at.
                        let late = rng.pct(cfg.late_pct);
                        let issued = crate::keys::now_ms() - if late { 600_000 } else { 0 };
                        let Ok(m) = signer.mint_at(&placement(ad), issued) else {
                            continue;
                        };
                        if recent.len() == 1024 {
                            recent.pop_front();
                        }
                        recent.push_back((m.token.clone(), ad));
                        (m.token, ad, if late { "late" } else { "accepted" })
                    }
                };
                if let Some(l) = ledger.as_mut() {
                    let _ = writeln!(
                        l,
                        "{}",
                        serde_json::json!({"token": token, "ad_id": ad, "expected": expect})
                    );
                }
                st.clicks.fetch_add(1, Ordering::Relaxed);
                if expect == "late" {
                    // An app that was offline: the click happened minutes ago and goes out now.
                    late_batch.push((token, dims));
                    st.late.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if tr[i].click(&token, dims).is_err() {
                    st.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !late_batch.is_empty() {
                let n = late_batch.len() as u64;
                if send_late(&transport, late_batch, &mut rng).await {
                    st.late_acked.fetch_add(n, Ordering::Relaxed);
                } else {
                    st.late_lost.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        if let Some(mut l) = ledger {
            let _ = l.flush();
        }
    });
    Ok(Traffic {
        stats,
        trackers,
        task,
        stop,
    })
}

/// Sends clicks that "happened" 2–5 minutes ago in one batch, as an offline app would
/// (once, no retry); true if the collector acknowledged it (2xx).
async fn send_late(
    transport: &Arc<dyn Transport>,
    clicks: Vec<(String, Dimensions)>,
    rng: &mut Rng,
) -> bool {
    let now = crate::keys::now_ms();
    let batch = v1::ClickBatch {
        sdk_name: "adclick-loadgen".into(),
        sdk_version: env!("CARGO_PKG_VERSION").into(),
        sent_at_ms: now,
        clicks: clicks
            .into_iter()
            .map(|(token, d)| v1::Click {
                token,
                occurred_at_ms: now - 120_000 - (rng.next() % 180_000) as i64,
                sent_at_ms: now,
                country: d.country.unwrap_or_default(),
                device: 2,
                os: d.os.unwrap_or_default(),
                site: d.site.unwrap_or_default(),
                user_id: d.user_id.unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
    };
    let r: Result<TransportResponse, TransportError> = transport.send(batch.encode_to_vec()).await;
    r.is_ok_and(|r| (200..300).contains(&r.status))
}

impl Traffic {
    /// Stops generating and drains the SDK queues (bounded by their shutdown timeout).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        for t in &self.trackers {
            let _ = t.shutdown().await;
        }
    }

    /// Clicks still queued in the SDK trackers.
    pub fn queued(&self) -> usize {
        self.trackers.iter().map(Tracker::queued).sum()
    }

    /// Stops like [`Traffic::stop`] and accounts for every click offered.
    pub async fn stop_and_account(self) -> Accounting {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        for t in &self.trackers {
            let _ = t.shutdown().await;
        }
        let mut a = Accounting {
            offered: self.stats.clicks.load(Ordering::Relaxed),
            sdk_queue_refused: self.stats.refused.load(Ordering::Relaxed),
            late_lost: self.stats.late_lost.load(Ordering::Relaxed),
            acked: self.stats.late_acked.load(Ordering::Relaxed),
            ..Accounting::default()
        };
        for t in &self.trackers {
            let s = t.stats();
            a.acked += s.sent;
            a.http_refused += s.rejected;
            a.dropped_overflow += s.dropped_overflow;
            a.still_queued += t.queued() as u64;
        }
        a
    }
}

/// Where every offered click ended up once the SDK drained.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Accounting {
    /// Clicks generated (through the SDK and the late batches).
    pub offered: u64,
    /// Acknowledged by the collector with a 2xx (its verdict per click may still be a
    /// rejection: forged tokens are expected to be `bad_signature`).
    pub acked: u64,
    /// Refused by the SDK's `click()` (queue full or invalid).
    pub sdk_queue_refused: u64,
    /// In batches the collector refused for good (4xx other than 408/429).
    pub http_refused: u64,
    /// Dropped by the SDK's overflow policy.
    pub dropped_overflow: u64,
    /// Still queued in the SDK when its drain timed out.
    pub still_queued: u64,
    /// Late clicks whose single send failed.
    pub late_lost: u64,
}

impl Accounting {
    /// Offered but never acknowledged.
    pub fn lost(&self) -> u64 {
        self.offered.saturating_sub(self.acked)
    }
}
