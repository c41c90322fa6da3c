//! Synthetic click traffic through the native SDK, shared by `adclick dev` and
//! `adclick loadgen`: Zipf-distributed ads, dimensions, a share of duplicates, late clicks,
//! skewed device clocks and forged tokens, paced to a target rate. Every send is timed and
//! every failure classified; an optional ledger records what was sent and what the
//! pipeline should make of it.
//!
//! Invalid traffic (issue 16), over HTTP: a share of clicks with crawler User-Agents, one
//! flooding client address and one honeypot clicker (one address, one user id, clicking
//! the honeypot ad among others). Client addresses: ordinary requests each name the next
//! address of 198.18.0.0/15 (the benchmarking range) in `X-Forwarded-For`, so a collector
//! that trusts the generator as a proxy (`adclick dev` does) sees many clients, none above
//! the per-IP rate rules; the flood and the honeypot clicker bind their own loopback
//! addresses (127.0.0.2, 127.0.0.3) when the collector is on loopback, and otherwise name
//! 198.51.100.2 / .3 in the header. A collector that does not trust the generator sees one
//! address for everything, as it should.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
    /// Percent of clicks sent with a crawler User-Agent (fresh valid tokens; HTTP only).
    pub bot_pct: f64,
    /// Clicks per minute from one flooding client address, on top of `rate` (0 = none;
    /// the default is 3x the aggregator's default `ip_rate` limit of 100).
    pub flood_per_minute: f64,
    /// Ad id of the honeypot link (0 = no honeypot clicker). Outside `1..=ads`, so only
    /// the honeypot clicker clicks it; the aggregator's `[rules.honeypot] ad_ids` must
    /// name it.
    pub honeypot_ad: u64,
    /// Clicks per minute of the honeypot clicker, on top of `rate`: every third on
    /// `honeypot_ad`, the others on ordinary ads (flagged too, by the honeypot window).
    pub honeypot_per_minute: f64,
}

/// The default honeypot ad id (`TrafficConfig::honeypot_ad`).
pub const HONEYPOT_AD: u64 = 999_999;

/// Crawler User-Agents of the bot share: examples from the vendored crawler-user-agents
/// list (a unit test checks that the collector classifies each as a bot).
pub const CRAWLER_UAS: [&str; 5] = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "python-requests/2.31.0",
    "curl/8.5.0",
];

/// The User-Agent of the generator's ordinary clicks.
const OWN_UA: &str = concat!("adclick-loadgen/", env!("CARGO_PKG_VERSION"));

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
            bot_pct: 2.0,
            flood_per_minute: 300.0,
            honeypot_ad: HONEYPOT_AD,
            honeypot_per_minute: 30.0,
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
    /// Clicks sent with a crawler User-Agent.
    pub bots: AtomicU64,
    /// Clicks of the flooding address.
    pub flood: AtomicU64,
    /// Clicks of the honeypot clicker (all of them, on the honeypot ad or not).
    pub honeypot: AtomicU64,
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
    who: Client,
    sent: AtomicU64,
}

/// Who a transport's requests come from.
#[derive(Debug, Clone, Copy)]
enum Client {
    /// Ordinary clicks: the generator's User-Agent, the next spread address per request.
    Ordinary,
    /// The bot share: a crawler User-Agent per request, spread addresses.
    Crawler,
    /// One address throughout: bound to `bind` (loopback collectors) or, failing that,
    /// named in `X-Forwarded-For`.
    Fixed { bind: Option<IpAddr>, named: IpAddr },
}

/// The `n`th address of 198.18.0.0/15: consecutive requests never share one (until the
/// 131,072 addresses wrap), so no ordinary client trips a per-IP rate rule.
fn spread_addr(n: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (n % (1 << 17)) as u32)
}

/// Whether `endpoint`'s host is a loopback address (where binding 127.0.0.x works).
fn loopback_target(endpoint: &str) -> bool {
    reqwest::Url::parse(endpoint)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        })
}

impl VerdictHttp {
    fn new(
        endpoint: &str,
        timeout: Duration,
        stats: Arc<TrafficStats>,
        who: Client,
    ) -> Result<Self> {
        HttpTransport::install_crypto_provider();
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(OWN_UA);
        if let Client::Fixed { bind: Some(ip), .. } = who {
            b = b.local_address(ip);
        }
        let client = b.build().context("HTTP client")?;
        Ok(VerdictHttp {
            client,
            url: format!("{}/v1/clicks", endpoint.trim_end_matches('/')),
            stats,
            who,
            sent: AtomicU64::new(0),
        })
    }
}

impl Transport for VerdictHttp {
    fn send(&self, body: Vec<u8>) -> SendFuture<'_> {
        Box::pin(async move {
            let n = self.sent.fetch_add(1, Ordering::Relaxed);
            let mut req = self
                .client
                .post(&self.url)
                .header("content-type", "application/x-protobuf");
            req = match self.who {
                Client::Ordinary => req.header("x-forwarded-for", spread_addr(n).to_string()),
                Client::Crawler => req
                    .header("x-forwarded-for", spread_addr(n).to_string())
                    .header(
                        "user-agent",
                        CRAWLER_UAS[(n % CRAWLER_UAS.len() as u64) as usize],
                    ),
                Client::Fixed { bind: Some(_), .. } => req,
                Client::Fixed { bind: None, named } => {
                    req.header("x-forwarded-for", named.to_string())
                }
            };
            let resp = req.body(body).send().await.map_err(|e| {
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

/// xorshift: fast, good enough for traffic shapes (not for secrets). Shared by the live
/// traffic here and the pipeline benchmark's prebuilt bodies (`bench::preload`).
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// When the impression of a click made now was served: 2-30 s ago, as a user reads
    /// the page before clicking (a token minted at the click would trip the aggregator's
    /// `too_fast` rule, which the dev aggregator runs).
    fn served_before_click(&mut self) -> i64 {
        crate::keys::now_ms() - 2_000 - (self.unit() * 28_000.0) as i64
    }

    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub(crate) fn pct(&mut self, p: f64) -> bool {
        self.unit() * 100.0 < p
    }
}

/// Cumulative Zipf weights for ads 1..=n.
pub(crate) fn zipf_cdf(n: u64, s: f64) -> Vec<f64> {
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

pub(crate) const COUNTRIES: [&str; 6] = ["US", "DE", "FR", "GB", "BR", "IN"];
pub(crate) const OSES: [&str; 4] = ["ios", "android", "windows", "macos"];
pub(crate) const SITES: [&str; 5] = [
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
            Client::Ordinary,
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
    let special = special_trackers(&cfg, &target, &stats)?;
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
    let sp = special.clone();
    let mut trackers = trackers;
    trackers.extend(
        [&special.bot, &special.flood, &special.honeypot]
            .into_iter()
            .flatten()
            .cloned(),
    );
    let task = tokio::spawn(async move {
        let mut recent: VecDeque<(String, u64)> = VecDeque::with_capacity(1024);
        let tick = Duration::from_millis(10);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let started = Instant::now();
        let mut sent = 0u64;
        let (mut flood_sent, mut honeypot_sent) = (0u64, 0u64);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop_rx.changed() => break,
            }
            let elapsed = started.elapsed().as_secs_f64();
            let due = elapsed * cfg.rate;
            // The flood and the honeypot clicker, each paced on its own.
            for (who, per_minute, done, is_honeypot) in [
                (&sp.flood, cfg.flood_per_minute, &mut flood_sent, false),
                (
                    &sp.honeypot,
                    cfg.honeypot_per_minute,
                    &mut honeypot_sent,
                    true,
                ),
            ] {
                let Some(t) = who else { continue };
                while (*done as f64) < elapsed * per_minute / 60.0 {
                    *done += 1;
                    let ad = if is_honeypot && *done % 3 == 1 {
                        cfg.honeypot_ad
                    } else {
                        cdf.partition_point(|c| *c < rng.unit()) as u64 + 1
                    };
                    let Ok(m) = signer.mint_at(&placement(ad), rng.served_before_click()) else {
                        continue;
                    };
                    let user = if is_honeypot {
                        "honeypot-clicker".to_string()
                    } else {
                        format!("user-{}", rng.next() % 50_000)
                    };
                    let (counter, invalid) = if is_honeypot {
                        (&st.honeypot, "honeypot")
                    } else {
                        (&st.flood, "ip_rate")
                    };
                    if let Some(l) = ledger.as_mut() {
                        let _ = writeln!(
                            l,
                            "{}",
                            serde_json::json!({"token": m.token, "ad_id": ad, "expected": "accepted", "invalid": invalid})
                        );
                    }
                    st.clicks.fetch_add(1, Ordering::Relaxed);
                    counter.fetch_add(1, Ordering::Relaxed);
                    if t.click(&m.token, Dimensions::new().user_id(user)).is_err() {
                        st.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
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
                if let Some(bot) = &sp.bot
                    && rng.pct(cfg.bot_pct)
                {
                    // A crawler following an ad link: a fresh, valid token (the collector
                    // accepts it; the aggregator's bot_user_agent rule flags it).
                    let u = rng.unit();
                    let ad = cdf.partition_point(|c| *c < u) as u64 + 1;
                    let Ok(m) = signer.mint_at(&placement(ad), rng.served_before_click()) else {
                        continue;
                    };
                    if let Some(l) = ledger.as_mut() {
                        let _ = writeln!(
                            l,
                            "{}",
                            serde_json::json!({"token": m.token, "ad_id": ad, "expected": "accepted", "invalid": "bot_user_agent"})
                        );
                    }
                    st.clicks.fetch_add(1, Ordering::Relaxed);
                    st.bots.fetch_add(1, Ordering::Relaxed);
                    if bot.click(&m.token, dims).is_err() {
                        st.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
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
                        let issued = if late {
                            crate::keys::now_ms() - 600_000
                        } else {
                            rng.served_before_click()
                        };
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

/// The invalid-traffic clients of a run (HTTP targets only: QUIC has no User-Agent or
/// forwarding header, so none of them over QUIC).
#[derive(Clone, Default)]
struct Special {
    bot: Option<Tracker>,
    flood: Option<Tracker>,
    honeypot: Option<Tracker>,
}

fn special_trackers(
    cfg: &TrafficConfig,
    target: &Target,
    stats: &Arc<TrafficStats>,
) -> Result<Special> {
    let Target::Http(url) = target else {
        return Ok(Special::default());
    };
    let loopback = loopback_target(url);
    let tracker = |who: Client| -> Result<Tracker> {
        let t: Arc<dyn Transport> = Arc::new(Timed {
            inner: Arc::new(VerdictHttp::new(
                url,
                Duration::from_secs(10),
                stats.clone(),
                who,
            )?),
            stats: stats.clone(),
        });
        Tracker::builder(url)
            .transport(t)
            .batch_size(cfg.batch_size.clamp(1, 20))
            .flush_interval(Duration::from_millis(200))
            .max_queue(100_000)
            .build()
            .map_err(anyhow::Error::from)
    };
    let fixed = |last: u8| {
        let own = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        // Linux routes all of 127/8 to loopback; elsewhere (macOS) only 127.0.0.1 may be
        // bindable: then the address is named in the header instead.
        let bindable = loopback && std::net::TcpListener::bind((own, 0)).is_ok();
        Client::Fixed {
            bind: bindable.then_some(own),
            named: IpAddr::V4(Ipv4Addr::new(198, 51, 100, last)),
        }
    };
    Ok(Special {
        bot: (cfg.bot_pct > 0.0)
            .then(|| tracker(Client::Crawler))
            .transpose()?,
        flood: (cfg.flood_per_minute > 0.0)
            .then(|| tracker(fixed(2)))
            .transpose()?,
        honeypot: (cfg.honeypot_ad != 0 && cfg.honeypot_per_minute > 0.0)
            .then(|| tracker(fixed(3)))
            .transpose()?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use adclick_collector::useragent::UaClassifier;
    use adclick_proto::v1::UserAgentClass;

    #[test]
    fn the_bot_share_is_classified_as_bots_and_ordinary_clicks_as_clients() {
        let ua = UaClassifier::builtin().unwrap();
        for u in CRAWLER_UAS {
            assert_eq!(ua.classify(Some(u.as_bytes())), UserAgentClass::Bot, "{u}");
        }
        assert_eq!(ua.classify(Some(OWN_UA.as_bytes())), UserAgentClass::Client);
    }

    #[test]
    fn spread_addresses_do_not_repeat_within_the_range() {
        let n = 1u64 << 17;
        let all: std::collections::HashSet<Ipv4Addr> = (0..n).map(spread_addr).collect();
        assert_eq!(all.len() as u64, n);
        assert_eq!(spread_addr(0), Ipv4Addr::new(198, 18, 0, 0));
        assert_eq!(spread_addr(n - 1), Ipv4Addr::new(198, 19, 255, 255));
        assert_eq!(spread_addr(n), spread_addr(0));
        assert!(loopback_target("http://127.0.0.1:8080"));
        assert!(loopback_target("http://localhost:8080"));
        assert!(loopback_target("http://[::1]:8080"));
        assert!(!loopback_target("http://10.0.0.5:8080"));
    }
}
