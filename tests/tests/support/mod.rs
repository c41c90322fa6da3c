//! Shared helpers: keys and tokens, server configs on temp dirs, the `adclick` binary as a
//! child process, device clocks, the query client and bounded polling.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use adclick_aggregator::AggregatorConfig;
use adclick_aggregator::config::{ApiKey, Role};
use adclick_collector::CollectorConfig;
use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{self, Filter, GetAdClicksRequest, Granularity, TopAdsRequest};
use adclick_sdk::core::Clock;
use adclick_sdk::{AdPlacement, ImpressionSigner, MintedToken};
use tonic::transport::Channel;

pub const ADMIN: &str = "e2e-admin-key-0000000001";
/// Advertiser key of `ADV_A`.
pub const ADV_A_KEY: &str = "e2e-advertiser-10-key-01";
pub const ADV_A: u64 = 10;
/// Advertiser key of `ADV_B`.
pub const ADV_B_KEY: &str = "e2e-advertiser-11-key-01";
pub const ADV_B: u64 = 11;
/// The collectors' `aggregator_key`, listed in the aggregator's `ingest_keys`.
pub const INGEST_KEY: &str = "e2e-ingest-key-000000000001";
pub const MIN: i64 = 60_000;
pub const HOUR: i64 = 3_600_000;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn minute_of(t: i64) -> i64 {
    t.div_euclid(MIN) * MIN
}

// ---------------------------------------------------------------------------------------
// Keys and tokens

pub fn keyring(id: u32, fill: u8) -> Keyring {
    Keyring::new(SigningKey::new(id, &[fill; 32]).unwrap())
}

/// The collectors' key file (one key file shared by every collector of a test).
pub fn write_keys(path: &Path, ring: &Keyring) {
    let created = ring.keys().map(|k| (k.id(), 0)).collect();
    let text = KeyFile {
        keyring: ring.clone(),
        created,
    }
    .render()
    .unwrap();
    std::fs::write(path, text).unwrap();
}

pub fn signer(ring: &Keyring) -> ImpressionSigner {
    ImpressionSigner::new(ring.clone())
        .with_ttl(Duration::from_secs(3600))
        .unwrap()
}

pub fn placement(ad_id: u64, advertiser_id: u64, campaign_id: u64) -> AdPlacement {
    AdPlacement {
        ad_id,
        advertiser_id,
        campaign_id,
        landing_url: format!("https://shop.example/landing/{ad_id}?c={campaign_id}"),
    }
}

/// The same token with one character of its HMAC tag changed: a tampered token that still
/// decodes (the last 43 characters are the 32-byte tag), so the collector must answer
/// `bad_signature`, not `malformed`.
pub fn tamper(token: &str) -> String {
    let mut b = token.as_bytes().to_vec();
    let i = b.len() - 10;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

// ---------------------------------------------------------------------------------------
// Server configs

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

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

// ---------------------------------------------------------------------------------------
// The `adclick` binary

/// `<target>/debug/adclick`, built once per test run (`cargo build -p adclick-cli`).
pub fn adclick_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let workspace = manifest.parent().unwrap();
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "-q", "-p", "adclick-cli", "--bin", "adclick"])
            .current_dir(workspace);
        // Drop what cargo set for this test process (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...):
        // build scripts that track them (ring's does) would otherwise rerun, and the outer
        // and inner builds would invalidate each other's artifacts on every run.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k == "OUT_DIR"
                || k.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&k.as_ref())
            {
                cargo.env_remove(&key);
            }
        }
        let status = cargo.status().expect("cannot run cargo");
        assert!(status.success(), "cargo build -p adclick-cli failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let target = if target.is_relative() {
            workspace.join(target)
        } else {
            target
        };
        let bin = target
            .join("debug")
            .join(format!("adclick{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// A running `adclick <command> --config <file>`; SIGKILLed when dropped, so a failing
/// test never leaves a server behind. Its stderr goes to `log`.
pub struct ChildServer {
    child: Child,
    pub log: PathBuf,
}

impl ChildServer {
    pub fn spawn(command: &str, config: &Path, log: &Path) -> ChildServer {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(adclick_bin())
            .args([command, "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap();
        ChildServer {
            child,
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL (on Unix `Child::kill` is SIGKILL) and reap: no shutdown path runs.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Fails the test if the process exited (with its log).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("adclick exited with {status}; log:\n{}", self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Device clocks

/// A device clock `skew_ms` off the true time. `pin` freezes it at a chosen device time
/// (the moment a click "happened"); `unpin` lets it run again for the send, so a click can
/// be made to have happened at an exact earlier true time, like a click an app queued
/// while offline.
#[derive(Debug)]
pub struct DeviceClock {
    pub skew_ms: i64,
    pinned: Mutex<Option<i64>>,
}

impl DeviceClock {
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

pub fn authed<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

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
            ad_id,
            from_ms: from,
            to_ms: to,
            granularity: granularity as i32,
            filter,
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

/// Polls `f` until true (or `within`).
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Steady SDK load

/// What a `SdkLoad` clicked.
#[derive(Debug, Default, Clone)]
pub struct LoadLedger {
    /// Distinct impressions clicked, per ad: what the aggregator must count.
    pub per_ad: BTreeMap<u64, u64>,
    pub unique: u64,
    /// Repeated clicks on an impression already clicked (the collector drops them).
    pub duplicates: u64,
}

/// One tracker clicking through `tokens` every `every` until stopped; every 9th click is
/// followed by a repeat of an impression clicked 3 clicks earlier.
pub struct SdkLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Distinct impressions clicked so far.
    pub clicked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<LoadLedger>,
}

impl SdkLoad {
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

    pub fn clicked(&self) -> u64 {
        self.clicked.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub async fn stop(self) -> LoadLedger {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the load stops")
            .unwrap()
    }
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

/// Runs a scenario with a hard time limit, so a hang fails the test instead of the CI job.
pub async fn within<F: std::future::Future>(limit: Duration, scenario: F) -> F::Output {
    match tokio::time::timeout(limit, scenario).await {
        Ok(out) => out,
        Err(_) => panic!("scenario did not finish within {limit:?}"),
    }
}
