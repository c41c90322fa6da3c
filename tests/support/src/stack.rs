//! The whole pipeline for the cross-component tests: their credentials, in-process and
//! TOML configs for collectors and an aggregator wired to each other, device clocks, an
//! HTTP client, the gRPC query client and a polling of TopAds, and a steady SDK load with
//! its ledger of what it clicked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use adclick_aggregator::AggregatorConfig;
use adclick_aggregator::config::{ApiKey, Role};
use adclick_collector::CollectorConfig;
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{self, Filter, GetAdClicksRequest, Granularity, TopAdsRequest};
use adclick_sdk::core::Clock;
use adclick_sdk::{AdPlacement, ImpressionSigner, MintedToken};
use tonic::transport::Channel;

use crate::common::{authed, now_ms};

/// The admin API key of [`api_keys`].
pub const ADMIN: &str = "e2e-admin-key-0000000001";
/// Advertiser key of `ADV_A`.
pub const ADV_A_KEY: &str = "e2e-advertiser-10-key-01";
/// Advertiser A (key `ADV_A_KEY`).
pub const ADV_A: u64 = 10;
/// Advertiser key of `ADV_B`.
pub const ADV_B_KEY: &str = "e2e-advertiser-11-key-01";
/// Advertiser B (key `ADV_B_KEY`).
pub const ADV_B: u64 = 11;
/// The collectors' `aggregator_key`, listed in the aggregator's `ingest_keys`.
pub const INGEST_KEY: &str = "e2e-ingest-key-000000000001";

/// A `ClickBatch` (as an SDK sends it) of `tokens`: every click and the batch stamped `at`
/// on the device clock.
pub fn click_batch<'a>(
    tokens: impl IntoIterator<Item = &'a MintedToken>,
    at: i64,
) -> v1::ClickBatch {
    v1::ClickBatch {
        sdk_name: "e2e".into(),
        sdk_version: "0".into(),
        sent_at_ms: at,
        clicks: tokens
            .into_iter()
            .map(|t| v1::Click {
                token: t.token.clone(),
                occurred_at_ms: at,
                sent_at_ms: at,
                ..Default::default()
            })
            .collect(),
    }
}

/// Ad `ad_id` of `advertiser_id`, campaign `campaign_id`, landing on
/// `https://shop.example/landing/{ad_id}?c={campaign_id}`.
pub fn placement(ad_id: u64, advertiser_id: u64, campaign_id: u64) -> AdPlacement {
    AdPlacement {
        ad_id,
        advertiser_id,
        campaign_id,
        landing_url: format!("https://shop.example/landing/{ad_id}?c={campaign_id}"),
    }
}

// ---------------------------------------------------------------------------------------
// Server configs

/// The admin key and the keys of advertisers `ADV_A` and `ADV_B`.
pub fn api_keys() -> Vec<ApiKey> {
    vec![
        ApiKey {
            key: ADMIN.into(),
            role: Role::Admin,
            advertiser_id: None,
        },
        ApiKey {
            key: ADV_A_KEY.into(),
            role: Role::Advertiser,
            advertiser_id: Some(ADV_A),
        },
        ApiKey {
            key: ADV_B_KEY.into(),
            role: Role::Advertiser,
            advertiser_id: Some(ADV_B),
        },
    ]
}

/// An in-process aggregator config on `dir`, gRPC on `grpc` (port 0 for a fresh one).
pub fn aggregator_config(dir: &Path, grpc: SocketAddr) -> AggregatorConfig {
    let mut c = AggregatorConfig::default();
    c.listen_grpc = grpc;
    c.listen_http = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.to_path_buf();
    c.api_keys = api_keys();
    c.ingest_keys = vec![INGEST_KEY.into()];
    c.checkpoint.interval_ms = 500;
    // Scenarios poll queries in tight loops; the rate limit has its own test.
    c.query.rate_limit_per_second = 0;
    c
}

/// An in-process collector config: its own data dir under `dir`, the shared key file.
pub fn collector_config(
    dir: &Path,
    id: &str,
    keys_file: &Path,
    aggregator: SocketAddr,
) -> CollectorConfig {
    let mut c = CollectorConfig::default();
    c.collector_id = id.into();
    c.listen_http = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.join(id);
    c.keys_file = keys_file.to_path_buf();
    c.aggregators = vec![format!("http://{aggregator}")];
    c.aggregator_key = Some(INGEST_KEY.into());
    c.forward.retry_base_ms = 20;
    c.forward.retry_max_ms = 200;
    c.forward.request_timeout_ms = 2_000;
    c.dedup.expected_clicks = 100_000;
    c.dedup.exact_capacity = 100_000;
    c.spool.segment_bytes = 64 << 10;
    c
}

/// The same collector settings as `collector_config`, as a `collector.toml` for the binary.
pub fn collector_toml(
    id: &str,
    listen: SocketAddr,
    data_dir: &Path,
    keys_file: &Path,
    aggregator: SocketAddr,
) -> String {
    format!(
        r#"collector_id = "{id}"
listen_http = "{listen}"
data_dir = {data_dir:?}
keys_file = {keys_file:?}
aggregators = ["http://{aggregator}"]
aggregator_key = "{INGEST_KEY}"

[dedup]
expected_clicks = 100000
exact_capacity = 100000

[spool]
segment_bytes = 65536

[forward]
retry_base_ms = 20
retry_max_ms = 200
request_timeout_ms = 2000
"#,
        data_dir = data_dir.display().to_string(),
        keys_file = keys_file.display().to_string(),
    )
}

/// An `aggregator.toml` for the binary with the test API keys.
pub fn aggregator_toml(grpc: SocketAddr, data_dir: &Path) -> String {
    let mut s = format!(
        r#"listen_grpc = "{grpc}"
listen_http = "127.0.0.1:0"
data_dir = {data_dir:?}
ingest_keys = ["{INGEST_KEY}"]

[checkpoint]
interval_ms = 300
"#,
        data_dir = data_dir.display().to_string(),
    );
    for k in api_keys() {
        s.push_str(&format!("\n[[api_keys]]\nkey = {:?}\n", k.key));
        match k.advertiser_id {
            Some(id) => s.push_str(&format!("role = \"advertiser\"\nadvertiser_id = {id}\n")),
            None => s.push_str("role = \"admin\"\n"),
        }
    }
    s
}

/// A `collector.toml` for the binary with `forward.sink = "jetstream"`: an R3 stream of
/// `partitions` partitions on `servers` (64 MiB `max_bytes`), fast retries, 16 batches in
/// flight, no per-IP rate limit (all test traffic comes from 127.0.0.1).
pub fn jetstream_collector_toml(
    id: &str,
    listen: SocketAddr,
    data_dir: &Path,
    keys_file: &Path,
    servers: &[String],
    partitions: u32,
) -> String {
    format!(
        r#"collector_id = "{id}"
listen_http = "{listen}"
data_dir = {data_dir:?}
keys_file = {keys_file:?}

[limits]
rate_limit_per_ip = 0.0

[dedup]
expected_clicks = 100000
exact_capacity = 100000

[forward]
sink = "jetstream"
retry_base_ms = 20
retry_max_ms = 200
request_timeout_ms = 2000
max_in_flight = 16

[forward.jetstream]
servers = {servers:?}
partitions = {partitions}
replicas = 3
max_bytes = 67108864
"#,
        data_dir = data_dir.display().to_string(),
        keys_file = keys_file.display().to_string(),
    )
}

/// An `aggregator.toml` for the binary ([`aggregator_toml`], HTTP on `http`) that is a
/// JetStream shard: `[source] kind = "jetstream"` on `servers`, owning `partitions`
/// (`"0-1"`), durable consumers `<durable>-<p>`, 8 messages in flight, pulls of 16.
pub fn jetstream_shard_toml(
    grpc: SocketAddr,
    http: SocketAddr,
    data_dir: &Path,
    servers: &[String],
    partitions: &str,
    durable: &str,
) -> String {
    let mut text = aggregator_toml(grpc, data_dir).replacen(
        "listen_http = \"127.0.0.1:0\"",
        &format!("listen_http = \"{http}\""),
        1,
    );
    // `aggregator_toml` ends inside the last [[api_keys]] table: [source] after it.
    text.push_str(&format!(
        "\n[source]\nkind = \"jetstream\"\nservers = {servers:?}\npartitions = {partitions:?}\n\
         durable_prefix = {durable:?}\nmax_in_flight = 8\nfetch_batch = 16\n"
    ));
    text
}

// ---------------------------------------------------------------------------------------
// Device clocks

/// A device clock `skew_ms` off the true time. `pin` freezes it at a chosen device time
/// (the moment a click "happened"); `unpin` lets it run again for the send, so a click can
/// be made to have happened at an exact earlier true time, like a click an app queued
/// while offline.
#[derive(Debug)]
pub struct DeviceClock {
    /// How far the device clock is off the true time.
    pub skew_ms: i64,
    pinned: Mutex<Option<i64>>,
}

impl DeviceClock {
    /// A running clock `skew_ms` off the true time.
    pub fn new(skew_ms: i64) -> Self {
        DeviceClock {
            skew_ms,
            pinned: Mutex::new(None),
        }
    }

    /// Freezes the device clock at true time `true_ms` (plus the skew).
    pub fn pin_true(&self, true_ms: i64) {
        *self.pinned.lock().unwrap() = Some(true_ms + self.skew_ms);
    }

    /// Lets the clock run again.
    pub fn unpin(&self) {
        *self.pinned.lock().unwrap() = None;
    }
}

impl Clock for DeviceClock {
    fn now_ms(&self) -> i64 {
        self.pinned
            .lock()
            .unwrap()
            .unwrap_or_else(|| now_ms() + self.skew_ms)
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

/// A reqwest client that does not follow redirects, with a 5 s timeout.
pub fn http_client() -> reqwest::Client {
    adclick_sdk::HttpTransport::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Polls `GET {base}/healthz` until it answers 200 (or `within`).
pub async fn wait_healthy(base: &str, within: Duration) -> bool {
    let c = http_client();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = c.get(format!("{base}/healthz")).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

// ---------------------------------------------------------------------------------------
// Queries

/// A `QueryService` client on a fresh connection (servers restart in these tests).
pub async fn query_client(
    grpc: SocketAddr,
) -> Result<QueryServiceClient<Channel>, tonic::transport::Error> {
    let ch = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(QueryServiceClient::new(ch))
}

/// TopAds over `[from, to)` as `(ad, clicks)`, best first.
pub async fn top_ads(
    grpc: SocketAddr,
    key: &str,
    n: u32,
    (from, to): (i64, i64),
    filter: Option<Filter>,
) -> Result<Vec<(u64, u64)>, String> {
    let mut q = query_client(grpc).await.map_err(|e| e.to_string())?;
    let req = TopAdsRequest {
        n,
        window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
            from_ms: from,
            to_ms: to,
        })),
        filter,
        ..Default::default()
    };
    let r = q
        .top_ads(authed(req, key))
        .await
        .map_err(|e| e.to_string())?;
    Ok(r.into_inner()
        .ads
        .into_iter()
        .map(|a| (a.ad_id, a.clicks))
        .collect())
}

/// GetAdClicks for `ad_id` over `[from, to)` (panics if the call fails).
pub async fn ad_clicks(
    grpc: SocketAddr,
    key: &str,
    ad_id: u64,
    (from, to): (i64, i64),
    granularity: Granularity,
    filter: Option<Filter>,
) -> v1::GetAdClicksResponse {
    let mut q = query_client(grpc).await.unwrap();
    q.get_ad_clicks(authed(
        GetAdClicksRequest {
            fill_empty: Some(false),
            ad_id,
            from_ms: from,
            to_ms: to,
            granularity: granularity as i32,
            filter,
            ..Default::default()
        },
        key,
    ))
    .await
    .unwrap()
    .into_inner()
}

/// The ranking TopAds must return for these per-ad counts: clicks desc, then ad id asc.
pub fn ranked(counts: &BTreeMap<u64, u64>, n: usize) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = counts
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(a, c)| (*a, *c))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// Polls TopAds (admin, n = 1000) until `done(counts)` holds or `within` passes; returns
/// the last answer (empty if the server never answered).
pub async fn poll_counts(
    grpc: SocketAddr,
    range: (i64, i64),
    within: Duration,
    mut done: impl FnMut(&BTreeMap<u64, u64>) -> bool,
) -> BTreeMap<u64, u64> {
    let deadline = Instant::now() + within;
    let mut last = BTreeMap::new();
    loop {
        if let Ok(v) = top_ads(grpc, ADMIN, 1000, range, None).await {
            last = v.into_iter().collect();
            if done(&last) {
                return last;
            }
        }
        if Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Steady SDK load

/// What a `SdkLoad` clicked.
#[derive(Debug, Default, Clone)]
pub struct LoadLedger {
    /// Distinct impressions clicked, per ad: what the aggregator must count.
    pub per_ad: BTreeMap<u64, u64>,
    /// Distinct impressions clicked.
    pub unique: u64,
    /// Repeated clicks on an impression already clicked (the collector drops them).
    pub duplicates: u64,
}

/// One tracker clicking through `tokens` every `every` until stopped; every 9th click is
/// followed by a repeat of an impression clicked 3 clicks earlier.
#[derive(Debug)]
pub struct SdkLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Distinct impressions clicked so far.
    pub clicked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<LoadLedger>,
}

impl SdkLoad {
    /// Starts clicking `tokens` through `tracker`, one every `every`.
    pub fn start(tracker: adclick_sdk::Tracker, tokens: Vec<MintedToken>, every: Duration) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clicked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, c) = (stop.clone(), clicked.clone());
        let task = tokio::spawn(async move {
            let mut l = LoadLedger::default();
            let dims = |k: usize| {
                adclick_sdk::Dimensions::new()
                    .country(["US", "DE"][k % 2])
                    .user_id(format!("u{}", k % 50))
            };
            for (k, t) in tokens.iter().enumerate() {
                if s.load(Ordering::SeqCst) {
                    return l;
                }
                tracker.click(&t.token, dims(k)).unwrap();
                *l.per_ad.entry(t.impression.ad_id).or_insert(0) += 1;
                l.unique += 1;
                c.fetch_add(1, Ordering::SeqCst);
                if k % 9 == 4 {
                    tracker.click(&tokens[k - 3].token, dims(k - 3)).unwrap();
                    l.duplicates += 1;
                }
                tokio::time::sleep(every).await;
            }
            panic!("the load ran out of tokens before it was stopped");
        });
        SdkLoad {
            stop,
            clicked,
            task,
        }
    }

    /// Distinct impressions clicked so far.
    pub fn clicked(&self) -> u64 {
        self.clicked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops the load (within 10 s) and returns its ledger.
    pub async fn stop(self) -> LoadLedger {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the load stops")
            .unwrap()
    }
}

/// An SDK tracker posting to `col` in batches of 10 every 50 ms (loads of a few thousand
/// clicks finish in seconds).
pub fn quick_tracker(col: &adclick_collector::Collector) -> adclick_sdk::Tracker {
    adclick_sdk::Tracker::builder(format!("http://{}", col.http_addr()))
        .batch_size(10)
        .flush_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

/// `n` tokens over ads `first_ad..first_ad + ads` (ad `a` gets a share growing with `a`, so
/// TopAds has a clear order), advertiser `ADV_A`.
pub fn load_tokens(
    signer: &ImpressionSigner,
    n: usize,
    first_ad: u64,
    ads: u64,
) -> Vec<MintedToken> {
    (0..n as u64)
        .map(|k| {
            let ad = first_ad + (k * k + k / 3) % ads;
            signer.mint(&placement(ad, ADV_A, 1)).unwrap()
        })
        .collect()
}
