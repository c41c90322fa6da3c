//! `adclick bench pipeline` (also `adclick bench` without a subcommand): whole-pipeline
//! benchmark on one machine. It runs the real `adclick aggregator` and `--collectors`
//! `adclick collector`s as child processes (so CPU and peak RSS can be read per process
//! from /proc) and drives them with the synthetic SDK traffic of `adclick dev` from this
//! process, split evenly over the collectors. It reports offered load, clicks acked (2xx:
//! fsynced at a collector), clicks counted by the aggregator during the load and after a
//! bounded drain (undelivered = acked - counted - refused, where refused are the repeats
//! only the aggregator's exact dedup could tell; a negative figure means clicks were
//! written and counted although the collector never answered their request, as when the
//! SDK's shutdown timeout abandons a send), click-to-queryable latency (probe clicks
//! timed until `GetAdClicks` sees them), TopAds(n=100, last 60 min) latency over gRPC
//! while the load runs, CPU per process and peak RSS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use adclick_aggregator::benchkit::proc_cpu_seconds as cpu_seconds;
use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{self, GetAdClicksRequest, TopAdsRequest};
use adclick_sdk::ImpressionSigner;
use anyhow::{Context, Result, bail};
use clap::Args;
use prost::Message;
use tonic::transport::Channel;

use super::preload;
use crate::keys::now_ms;
use crate::traffic::{self, Target, TrafficConfig};

/// Clicks per request of the load generator (either kind).
const BATCH: usize = 500;

/// `adclick bench pipeline`
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Offered load, clicks per second (split evenly over the collectors).
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// Measurement time (load runs this long; the drain comes after). The prebuilt load
    /// holds every body of the run in memory: ~200 bytes per click (723 MiB for 15 s at
    /// 250k/s), built on every core before the load starts (~10 s for that run).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    /// Collector processes.
    #[arg(long, default_value_t = 2)]
    collectors: usize,
    /// Distinct ads (Zipf).
    #[arg(long, default_value_t = 100_000)]
    ads: u64,
    /// Longest wait after the load for the aggregator to count what was acked.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90s")]
    drain: Duration,
    /// Append the result table to this file (e.g. BENCHMARKS.md).
    #[arg(long)]
    append: Option<PathBuf>,
    /// The JetStream back end instead of one aggregator: `adclick dev --cluster
    /// --no-traffic` (3 NATS nodes R3 with sync always, 2 jetstream collectors, 2 shards,
    /// the query front) as the system under test; counted = the shards' sum, queries
    /// through the front. `--collectors` does not apply (the cluster has 2).
    #[arg(long)]
    cluster: bool,
    /// Generate the load through the SDK while it runs (minting and encoding every click
    /// in the timed phase, as before issue 13) instead of sending bodies built before it.
    #[arg(long)]
    sdk_loadgen: bool,
    /// Connections per collector of the prebuilt load generator (requests in flight).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// The aggregator's `[dedup] memory_bytes` in MiB (default: the aggregator's default,
    /// 256). Its RAM tier spills ~2.1M ids at a time into the store, synchronously on the
    /// shard thread, which stalls ingest for seconds; a larger tier keeps a run spill-free.
    #[arg(long)]
    dedup_mib: Option<usize>,
    /// Nice value for the aggregator's ingest threads (`adclick-shard-*`,
    /// `adclick-agg-writer`), set from outside through their thread ids once the
    /// aggregator is up: an experiment in giving the query-serving runtime priority over
    /// ingest (issue 13 item 4) without changing the aggregator. 0 = leave them.
    #[arg(long, default_value_t = 0)]
    nice_ingest: i32,
}

struct Proc {
    child: Child,
}

/// CPU seconds used so far by process `pid` (0 once it is gone).
fn pid_cpu(pid: u32) -> f64 {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// Peak RSS of process `pid`, MiB.
fn pid_rss(pid: u32) -> f64 {
    peak_rss(&format!("/proc/{pid}/status"))
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peak_rss(status: &str) -> f64 {
    std::fs::read_to_string(status)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn own_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat")
}

/// The children's log filter: `warn`, or `ADCLICK_BENCH_RUST_LOG` (with
/// `ADCLICK_BENCH_LOGS`, e.g. `info` to see each checkpoint's phases).
fn child_log_filter() -> String {
    std::env::var("ADCLICK_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into())
}

fn spawn(name: &str, args: &[&str], log: &Path) -> Result<Proc> {
    let exe = std::env::current_exe().context("cannot find the adclick binary")?;
    let log = std::fs::File::create(log)?;
    let child = Command::new(exe)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG", child_log_filter())
        .spawn()
        .with_context(|| format!("cannot start the {name}"))?;
    Ok(Proc { child })
}

async fn wait_healthy(http: &reqwest::Client, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not become healthy within 30 s")
}

/// The text of a Prometheus endpoint ("" when unreachable).
pub(crate) async fn scrape(http: &reqwest::Client, url: &str) -> String {
    let Ok(r) = http.get(url).send().await else {
        return String::new();
    };
    r.text().await.unwrap_or_default()
}

/// The value of `metric` (name with labels) in a Prometheus text page (0 when absent).
pub(crate) fn metric(page: &str, metric: &str) -> u64 {
    metric_f64(page, metric) as u64
}

/// The value of `metric` as a float (sums of histograms in seconds); 0 when absent.
pub(crate) fn metric_f64(page: &str, metric: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(metric))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Observations of histogram `hist` above `secs` in a Prometheus text page: its count less
/// its cumulative bucket at the largest bound not above `secs` (0 when absent).
pub(crate) fn above(page: &str, hist: &str, secs: f64) -> u64 {
    let total = metric(page, &format!("{hist}_count"));
    let prefix = format!("{hist}_bucket{{le=\"");
    let within = page
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, v) = rest.split_once("\"}")?;
            Some((le.parse::<f64>().ok()?, v.trim().parse::<f64>().ok()?))
        })
        .filter(|&(le, _)| le <= secs)
        .map(|(_, v)| v as u64)
        .max()
        .unwrap_or(0);
    total.saturating_sub(within)
}

/// Durable writes so far, from one scrape of every process: aggregator WAL group commits
/// and the collectors' spool fsyncs above 50 and 100 ms (the buckets' bounds at or below
/// them: 51.2 and 102.4 ms), aggregator checkpoints, and the spool fsyncs' seconds and
/// count. What a click -> queryable tail is made of shows here.
async fn durable_writes(http: &reqwest::Client, s: &Setup) -> [f64; 7] {
    let mut out = [0f64; 7];
    for port in &s.agg_http {
        let page = scrape(http, &format!("http://127.0.0.1:{port}/metrics")).await;
        out[0] += above(&page, "adclick_aggregator_wal_commit_seconds", 0.0512) as f64;
        out[1] += above(&page, "adclick_aggregator_wal_commit_seconds", 0.1024) as f64;
        out[4] += metric_f64(&page, "adclick_aggregator_checkpoint_seconds_count");
    }
    for port in &s.collector_http {
        let page = scrape(http, &format!("http://127.0.0.1:{port}/metrics")).await;
        out[2] += above(&page, "adclick_collector_fsync_seconds", 0.0512) as f64;
        out[3] += above(&page, "adclick_collector_fsync_seconds", 0.1024) as f64;
        out[5] += metric_f64(&page, "adclick_collector_fsync_seconds_sum");
        out[6] += metric_f64(&page, "adclick_collector_fsync_seconds_count");
    }
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn authed<T>(msg: T, key: &str) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    Ok(r)
}

/// The processes under test and how to reach them.
struct Setup {
    keyring: Keyring,
    admin: String,
    /// Where queries go: the aggregator, or the query front.
    grpc: u16,
    /// HTTP (/metrics, /healthz) of the aggregator or of every shard.
    agg_http: Vec<u16>,
    collector_http: Vec<u16>,
    /// Pids of the aggregator or the shards.
    aggs: Vec<u32>,
    collectors: Vec<u32>,
    /// Other processes of the system under test (NATS nodes, the query front), by role.
    others: Vec<(String, u32)>,
    /// Children this process started (SIGKILLed on drop), or `adclick dev --cluster`.
    _owned: Vec<Proc>,
    _dev: Option<DevCluster>,
}

/// `adclick dev --cluster` as a child: SIGTERMed and waited for on drop, so it stops its
/// own children (NATS, shards, collectors, front) in order.
struct DevCluster {
    child: Child,
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = adclick_devtools::process::terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(a: PipelineArgs) -> Result<()> {
    if a.collectors == 0 || a.rate <= 0.0 {
        bail!("--collectors and --rate must be positive");
    }
    let dir = std::env::temp_dir().join(format!("adclick-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let setup = if a.cluster {
        start_cluster(&dir)
    } else {
        start(&a, &dir)
    };
    let result = setup.and_then(|s| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(measure(&a, &s))
    });
    if let Err(e) = &result {
        // The children's logs say why (a refused config, a port in use): show their ends.
        let mut logs = String::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                if !tail.is_empty() {
                    logs += &format!("\n--- {} (last lines)\n", path.display());
                    for l in tail.into_iter().rev() {
                        logs += l;
                        logs.push('\n');
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        bail!("{e:#}{logs}");
    }
    // ADCLICK_BENCH_LOGS=<dir>: keep the children's logs (ADCLICK_BENCH_RUST_LOG=info to see
    // more).
    if let Some(keep) = std::env::var_os("ADCLICK_BENCH_LOGS") {
        let keep = PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(&path, keep.join(entry.file_name()));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (table, line) = result?;
    super::emit(&table, &line, a.append.as_deref())
}

fn start(a: &PipelineArgs, dir: &Path) -> Result<Setup> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let keyring = Keyring::new(SigningKey::new(1, &secret)?);
    let keys = dir.join("keys.toml");
    // Mode 0600: a collector refuses a key file others can read.
    crate::keys::write_key_file(
        &keys,
        &KeyFile {
            keyring: keyring.clone(),
            created: vec![(1, now_ms())],
        },
    )?;
    let admin = "bench-admin-key-0123456789";
    let ingest = crate::keys::ingest_key()?;
    // Distinct, below the ephemeral range (see `adclick_devtools::ports`), released before
    // the children bind them.
    let mut ports = adclick_devtools::ports::Reserved::default();
    let (grpc, agg_http) = (ports.take()?, ports.take()?);
    let col_ports = (0..a.collectors)
        .map(|_| ports.take().context("cannot reserve a port"))
        .collect::<Result<Vec<u16>>>()?;
    ports.release();
    std::fs::write(
        dir.join("aggregator.toml"),
        format!(
            "listen_grpc = \"127.0.0.1:{grpc}\"\nlisten_http = \"127.0.0.1:{agg_http}\"\ndata_dir = {:?}\n\
             ingest_keys = [\"{ingest}\"]\n\
             [windows]\nallowed_delay_ms = 2000\n\
             # The visibility probe polls every 2 ms: no per-key query rate limit.\n\
             [query]\nrate_limit_per_second = 0\n{dedup}[[api_keys]]\nkey = \"{admin}\"\nrole = \"admin\"\n",
            dir.join("agg"),
            dedup = a
                .dedup_mib
                .map(|m| format!("[dedup]\nmemory_bytes = {}\n", m.max(1) << 20))
                .unwrap_or_default(),
        ),
    )?;
    let agg = spawn(
        "aggregator",
        &[
            "aggregator",
            "--config",
            &dir.join("aggregator.toml").to_string_lossy(),
        ],
        &dir.join("aggregator.log"),
    )?;
    let mut collector_http = Vec::new();
    let mut collectors = Vec::new();
    for (i, port) in col_ports.into_iter().enumerate() {
        let cfg = dir.join(format!("collector{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "listen_http = \"127.0.0.1:{port}\"\ndata_dir = {:?}\nkeys_file = {:?}\n\
                 aggregators = [\"http://127.0.0.1:{grpc}\"]\naggregator_key = \"{ingest}\"\n\
                 [forward]\nretry_base_ms = 20\nretry_max_ms = 500\n\
                 [limits]\nmax_clicks_per_batch = 5000\nmax_body_bytes = 8388608\n\
                 # every bench client is 127.0.0.1: no per-IP click rate limit, and the\n\
                 # whole in-flight body budget for that one address\n\
                 rate_limit_per_ip = 0.0\nmax_inflight_body_bytes_per_ip = 67108864\n",
                dir.join(format!("col{i}")),
                keys
            ),
        )?;
        collectors.push(spawn(
            "collector",
            &["collector", "--config", &cfg.to_string_lossy()],
            &dir.join(format!("collector{i}.log")),
        )?);
        collector_http.push(port);
    }
    Ok(Setup {
        keyring,
        admin: admin.into(),
        grpc,
        agg_http: vec![agg_http],
        collector_http,
        aggs: vec![agg.child.id()],
        collectors: collectors.iter().map(|c| c.child.id()).collect(),
        others: vec![],
        _owned: std::iter::once(agg).chain(collectors).collect(),
        _dev: None,
    })
}

/// Sets the nice value of every thread of `pids` whose name starts with one of
/// `prefixes` (Linux: `setpriority(PRIO_PROCESS, tid)` applies to that thread alone);
/// how many were set.
fn nice_threads(pids: &[u32], prefixes: &[&str], nice: i32) -> Result<usize> {
    let mut n = 0;
    for pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !prefixes.iter().any(|p| comm.starts_with(p)) {
                continue;
            }
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            rustix::process::setpriority_process(Some(tid), nice)
                .with_context(|| format!("setpriority of thread {tid:?} ({})", comm.trim()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// The port of `url` (`http://127.0.0.1:9090`).
fn port_of(url: &str) -> Result<u16> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .with_context(|| format!("no port in {url:?}"))
}

/// Starts `adclick dev --cluster --no-traffic --auto-ports` on `dir` and reads what it
/// started from its dev.json. The bench's settings reach the children through the config
/// environment overrides (no per-IP limits: every bench client is 127.0.0.1; no query rate
/// limit: the visibility probe polls every 2 ms).
fn start_cluster(dir: &Path) -> Result<Setup> {
    let exe = std::env::current_exe().context("cannot find the adclick binary")?;
    let data = dir.join("dev");
    let log = std::fs::File::create(dir.join("dev.log"))?;
    let child = Command::new(exe)
        .args([
            "dev",
            "--cluster",
            "--no-traffic",
            "--auto-ports",
            "--data-dir",
        ])
        .arg(&data)
        .env("RUST_LOG", child_log_filter())
        .env("ADCLICK_COLLECTOR__LIMITS__MAX_CLICKS_PER_BATCH", "5000")
        .env("ADCLICK_COLLECTOR__LIMITS__MAX_BODY_BYTES", "4194304")
        .env("ADCLICK_COLLECTOR__LIMITS__RATE_LIMIT_PER_IP", "0.0")
        .env(
            "ADCLICK_COLLECTOR__LIMITS__MAX_INFLIGHT_BODY_BYTES_PER_IP",
            "67108864",
        )
        .env("ADCLICK_AGGREGATOR__QUERY__RATE_LIMIT_PER_SECOND", "0")
        .env("ADCLICK_QUERY_FRONT__QUERY__RATE_LIMIT_PER_SECOND", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start adclick dev --cluster")?;
    let dev = DevCluster { child };
    let json = data.join(crate::dev::cluster::DEV_JSON);
    let deadline = Instant::now() + Duration::from_secs(120);
    let doc: serde_json::Value = loop {
        if let Ok(text) = std::fs::read_to_string(&json)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["ready"] == true
        {
            break v;
        }
        if Instant::now() > deadline {
            bail!(
                "adclick dev --cluster was not ready within 120 s (see {})",
                dir.join("dev.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let keys = KeyFile::parse(&std::fs::read_to_string(data.join("keys.toml"))?)
        .context("the dev cluster's keys.toml")?;
    let admin = std::fs::read_to_string(data.join("admin.key"))?
        .trim()
        .to_string();
    let mut setup = Setup {
        keyring: keys.keyring,
        admin,
        grpc: 0,
        agg_http: vec![],
        collector_http: vec![],
        aggs: vec![],
        collectors: vec![],
        others: vec![],
        _owned: vec![],
        _dev: None,
    };
    let procs = doc["processes"].as_array().cloned().unwrap_or_default();
    for p in &procs {
        let role = p["role"].as_str().unwrap_or_default();
        let pid = p["pid"].as_u64().unwrap_or(0) as u32;
        let ep = |k: &str| p["endpoints"][k].as_str().unwrap_or_default().to_string();
        match role {
            "aggregator" => {
                setup.aggs.push(pid);
                setup.agg_http.push(port_of(&ep("http"))?);
            }
            "collector" => {
                setup.collectors.push(pid);
                setup.collector_http.push(port_of(&ep("http"))?);
            }
            "query-front" => {
                setup.grpc = port_of(&ep("grpc"))?;
                setup.others.push((role.into(), pid));
            }
            _ => setup.others.push((role.into(), pid)),
        }
    }
    if setup.grpc == 0 || setup.aggs.is_empty() || setup.collectors.is_empty() {
        bail!("dev.json lists no query front, shard or collector: {doc}");
    }
    setup._dev = Some(dev);
    Ok(setup)
}

const ACCEPTED: &str = "adclick_collector_clicks_total{outcome=\"accepted\"}";
const APPLIED: &str = "adclick_aggregator_clicks_total{outcome=\"applied\"}";
/// What the aggregator refuses of what a collector accepted, each for a reason: repeats a
/// collector could only suspect (a repeat of an impression still pending at one collector,
/// a Bloom positive) meet the exact dedup here; the others do not occur in this traffic.
const REFUSED: [&str; 4] = [
    "adclick_aggregator_clicks_total{outcome=\"duplicate\"}",
    "adclick_aggregator_clicks_total{outcome=\"too_old\"}",
    "adclick_aggregator_clicks_total{outcome=\"malformed\"}",
    "adclick_aggregator_clicks_total{outcome=\"owner_mismatch\"}",
];

/// Clicks acked by all collectors, counted by the aggregator and refused by it so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Totals {
    acked: u64,
    counted: u64,
    refused: u64,
}

impl std::ops::Sub for Totals {
    type Output = Totals;
    fn sub(self, o: Totals) -> Totals {
        Totals {
            acked: self.acked.saturating_sub(o.acked),
            counted: self.counted.saturating_sub(o.counted),
            refused: self.refused.saturating_sub(o.refused),
        }
    }
}

/// The aggregator is read first: what it counted was acked before, so a lag computed from
/// one reading is never negative (it may include clicks acked between the two reads).
async fn totals(http: &reqwest::Client, s: &Setup) -> Totals {
    let (mut counted, mut refused) = (0, 0);
    for port in &s.agg_http {
        let agg = scrape(http, &format!("http://127.0.0.1:{port}/metrics")).await;
        counted += metric(&agg, APPLIED);
        refused += REFUSED.iter().map(|m| metric(&agg, m)).sum::<u64>();
    }
    let mut acked = 0;
    for port in &s.collector_http {
        let page = scrape(http, &format!("http://127.0.0.1:{port}/metrics")).await;
        acked += metric(&page, ACCEPTED);
    }
    Totals {
        acked,
        counted,
        refused,
    }
}

/// Probe clicks: a fresh ad each, posted directly (round robin over the collectors) and
/// timed until `GetAdClicks` sees it; each as (seconds since `t0` when posted, latency ms).
fn spawn_probes(
    s: &Setup,
    channel: Channel,
    http: reqwest::Client,
    done: Arc<AtomicBool>,
    t0: Instant,
) -> tokio::task::JoinHandle<Vec<(f64, f64)>> {
    let signer = ImpressionSigner::new(s.keyring.clone());
    let urls: Vec<String> = s
        .collector_http
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}/v1/clicks"))
        .collect();
    let admin = s.admin.to_string();
    tokio::spawn(async move {
        let mut q = QueryServiceClient::new(channel);
        let mut lat = Vec::new();
        let mut i = 0u64;
        while !done.load(Ordering::Relaxed) {
            i += 1;
            let ad = 900_000_000 + i;
            let Ok(m) = signer.mint(&traffic::placement(ad)) else {
                break;
            };
            let now = now_ms();
            let body = v1::ClickBatch {
                clicks: vec![v1::Click {
                    token: m.token,
                    occurred_at_ms: now,
                    sent_at_ms: now,
                    ..Default::default()
                }],
                ..Default::default()
            };
            let url = &urls[(i as usize) % urls.len()];
            let start = Instant::now();
            let ok = http
                .post(url)
                .header("content-type", "application/x-protobuf")
                .body(body.encode_to_vec())
                .send()
                .await;
            if !ok.is_ok_and(|r| r.status() == 202) {
                continue;
            }
            let deadline = start + Duration::from_secs(10);
            while Instant::now() < deadline {
                let req = GetAdClicksRequest {
                    fill_empty: Some(false),
                    ad_id: ad,
                    from_ms: now - 120_000,
                    to_ms: now + 120_000,
                    ..Default::default()
                };
                let Ok(req) = authed(req, &admin) else { break };
                if q.get_ad_clicks(req)
                    .await
                    .is_ok_and(|r| r.into_inner().total_clicks == 1)
                {
                    let at = start.duration_since(t0).as_secs_f64();
                    lat.push((at, start.elapsed().as_secs_f64() * 1e3));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lat
    })
}

/// TopAds(n=100, last 60 min) over gRPC every 50 ms.
fn spawn_topads(
    channel: Channel,
    admin: &str,
    done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<f64>> {
    let admin = admin.to_string();
    tokio::spawn(async move {
        let mut q = QueryServiceClient::new(channel);
        let mut lat = Vec::new();
        while !done.load(Ordering::Relaxed) {
            let req = TopAdsRequest {
                n: 100,
                window: Some(v1::top_ads_request::Window::LastMinutes(60)),
                filter: None,
                ..Default::default()
            };
            let Ok(req) = authed(req, &admin) else { break };
            let s = Instant::now();
            if q.top_ads(req).await.is_ok() {
                lat.push(s.elapsed().as_secs_f64() * 1e3);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lat
    })
}

async fn measure(a: &PipelineArgs, s: &Setup) -> Result<(String, String)> {
    adclick_sdk::HttpTransport::install_crypto_provider();
    let http = reqwest::Client::new();
    for port in &s.agg_http {
        wait_healthy(&http, &format!("http://127.0.0.1:{port}/healthz")).await?;
    }
    for port in &s.collector_http {
        wait_healthy(&http, &format!("http://127.0.0.1:{port}/healthz")).await?;
    }
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", s.grpc))?
        .connect()
        .await?;
    let cpu = |s: &Setup| {
        (
            s.aggs.iter().copied().map(pid_cpu).sum::<f64>(),
            s.collectors
                .iter()
                .copied()
                .map(pid_cpu)
                .collect::<Vec<_>>(),
            own_cpu_seconds(),
            s.others
                .iter()
                .map(|(_, p)| pid_cpu(*p))
                .collect::<Vec<_>>(),
        )
    };

    // The prebuilt load: every body of the run, built now, before the CPU readings, on
    // every core. One set per collector, so that (as with one SDK process per collector)
    // a repeated impression goes to the collector that saw it first.
    let n = s.collector_http.len();
    let per_collector = a.rate / n as f64;
    let mut prebuilt = Vec::new();
    let prep_secs;
    let mut prep_bytes = 0usize;
    {
        let t = Instant::now();
        if !a.sdk_loadgen {
            let shape = preload::Shape {
                ads: a.ads,
                zipf_s: 1.1,
                duplicate_pct: 2.0,
                forged_pct: 1.0,
                clock_skew_ms: 120_000,
                batch_size: BATCH,
                // Valid through preparation (minutes at most) and the run.
                ttl: Duration::from_secs(3600).max(a.duration * 2 + Duration::from_secs(1800)),
            };
            let bodies =
                ((per_collector * a.duration.as_secs_f64()) / BATCH as f64).ceil() as usize + 1;
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            for _ in 0..n {
                let p = preload::prepare(&shape, &s.keyring, bodies, threads)?;
                prep_bytes += p.bytes();
                prebuilt.push(p);
            }
        }
        prep_secs = t.elapsed().as_secs_f64();
    }
    // Tells a profiler wrapped around the bench when the measured phase begins.
    eprintln!("bench pipeline: load starts ({prep_secs:.1} s of preparation)");
    if a.nice_ingest != 0 {
        let n = nice_threads(
            &s.aggs,
            &["adclick-shard-", "adclick-agg-wri"],
            a.nice_ingest,
        )?;
        eprintln!(
            "bench pipeline: {n} aggregator ingest threads niced to {}",
            a.nice_ingest
        );
    }
    let cpu0 = cpu(s);
    let writes0 = durable_writes(&http, s).await;
    let start = totals(&http, s).await;
    let mut loads = Vec::new();
    let mut senders = Vec::new();
    if a.sdk_loadgen {
        for port in &s.collector_http {
            let cfg = TrafficConfig {
                rate: per_collector,
                ads: a.ads,
                trackers: (8 / n).max(2),
                batch_size: BATCH,
                late_pct: 0.0,
                // Throughput of the ingest path, not of invalid-traffic shapes.
                bot_pct: 0.0,
                flood_per_minute: 0.0,
                honeypot_ad: 0,
                ..Default::default()
            };
            loads.push(traffic::start(
                cfg,
                Target::Http(format!("http://127.0.0.1:{port}")),
                s.keyring.clone(),
                None,
            )?);
        }
    } else {
        for (port, p) in s.collector_http.iter().zip(prebuilt) {
            senders.push(preload::Sender::start(
                &format!("http://127.0.0.1:{port}"),
                p.bodies,
                BATCH,
                per_collector,
                a.connections,
            )?);
        }
    }
    let t0 = Instant::now();
    // The wall clock of the load's start: the slowest probes' seconds line up with the
    // children's logs (ADCLICK_BENCH_LOGS) from it.
    eprintln!(
        "bench pipeline: load started at {}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
    let done = Arc::new(AtomicBool::new(false));
    let probes = spawn_probes(s, channel.clone(), http.clone(), done.clone(), t0);
    let tops = spawn_topads(channel.clone(), &s.admin, done.clone());
    tokio::time::sleep(a.duration).await;

    // End of the measured window.
    let secs = t0.elapsed().as_secs_f64();
    let at_end = totals(&http, s).await - start;
    let cpu1 = cpu(s);
    let writes1 = durable_writes(&http, s).await;
    // During the load (a failed scrape reads as 0: never a negative count).
    let slow: Vec<u64> = writes1
        .iter()
        .zip(writes0)
        .map(|(a, b)| (a - b).max(0.0) as u64)
        .collect();
    let fsync_mean_ms = (writes1[5] - writes0[5]).max(0.0) / slow[6].max(1) as f64 * 1e3;
    done.store(true, Ordering::Relaxed);
    // Clicks handed to the SDK / whose request started; clicks due but not yet sent when
    // the load stops (the limit was before the collectors' acks: the generator, the CPU it
    // got).
    let mut generated: u64 = loads
        .iter()
        .map(|l| l.stats.clicks.load(Ordering::Relaxed))
        .sum();
    let mut backlog: usize = loads.iter().map(|l| l.queued()).sum();
    let mut req_lat = Vec::new();
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    for l in &loads {
        let (_, p50, p99, _) = l.stats.latency_ms();
        req_lat.push((p50, p99));
        for (k, v) in l.stats.errors() {
            *errors.entry(k).or_default() += v;
        }
    }
    for sd in &senders {
        generated += sd.stats.started.load(Ordering::Relaxed) * BATCH as u64;
        backlog += (sd.backlog_bodies() * BATCH as u64) as usize;
    }
    for l in loads {
        l.stop().await;
    }
    for sd in senders {
        let stats = sd.stats.clone();
        sd.stop().await;
        req_lat.push(stats.latency_ms());
        for (k, v) in stats.errors() {
            *errors.entry(k).or_default() += v;
        }
    }
    let mut probe_at = probes.await.unwrap_or_default();
    let mut top_lat = tops.await.unwrap_or_default();

    // Drain: wait (bounded) until the aggregator has decided about everything acked.
    let drain_start = Instant::now();
    let mut after = totals(&http, s).await - start;
    let mut last_progress = Instant::now();
    while after.counted + after.refused < after.acked && drain_start.elapsed() < a.drain {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = totals(&http, s).await - start;
        if now != after {
            last_progress = Instant::now();
        }
        after = now;
        // The aggregator's checkpoint flushes its dedup RAM tier to the store on the
        // writer, which stops ingest for seconds with millions of ids: 10 s without
        // progress was not "stuck" on this box (see BENCHMARKS.md, issue 13).
        if last_progress.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();

    let Totals {
        acked,
        counted,
        refused,
    } = after;
    let undelivered = acked as i64 - counted as i64 - refused as i64;
    let lag_at_end = at_end.acked as i64 - at_end.counted as i64 - at_end.refused as i64;
    let (ca, cl) = (cpu1.0 - cpu0.0, cpu1.2 - cpu0.2);
    let ccs: Vec<f64> = cpu1.1.iter().zip(&cpu0.1).map(|(b, a)| b - a).collect();
    let cc: f64 = ccs.iter().sum();
    let rss_cols: Vec<f64> = s.collectors.iter().copied().map(pid_rss).collect();
    let rss_agg = s.aggs.iter().copied().map(pid_rss).fold(0.0, f64::max);
    // CPU of the other processes, summed by role (NATS nodes, the query front).
    let mut other_cpu: Vec<(String, f64)> = Vec::new();
    for ((role, _), (b, a)) in s.others.iter().zip(cpu1.3.iter().zip(&cpu0.3)) {
        match other_cpu.iter_mut().find(|(r, _)| r == role) {
            Some((_, c)) => *c += b - a,
            None => other_cpu.push((role.clone(), b - a)),
        }
    }
    let offered = generated as f64 / secs;
    let acked_rate = at_end.acked as f64 / secs;
    let counted_rate = at_end.counted as f64 / secs;
    // The slowest probes and when they were posted: what a tail lines up with.
    probe_at.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slowest = probe_at
        .iter()
        .take(6)
        .map(|(at, ms)| format!("{ms:.0} ms at {at:.1} s"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut probe_lat: Vec<f64> = probe_at.iter().map(|p| p.1).collect();
    let (pl, tl) = (probe_lat.len(), top_lat.len());
    let (probe50, probe99) = (pct(&mut probe_lat, 0.5), pct(&mut probe_lat, 0.99));
    let (top50, top99) = (pct(&mut top_lat, 0.5), pct(&mut top_lat, 0.99));
    let join = |v: &[f64], prec: usize| {
        v.iter()
            .map(|x| format!("{x:.prec$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };

    let backend = if a.cluster {
        "JetStream cluster (adclick dev --cluster: 3 NATS R3, 2 shards, query front)"
    } else {
        "one aggregator"
    };
    let mut t = format!(
        "### adclick bench pipeline, {backend}, {}\n\n",
        super::machine()
    );
    t += &format!(
        "`adclick bench pipeline --rate {} --duration {}s {} --ads {}{}{}`\n\n",
        a.rate,
        a.duration.as_secs(),
        if a.cluster {
            "--cluster".to_string()
        } else {
            format!("--collectors {n}")
        },
        a.ads,
        if a.sdk_loadgen { " --sdk-loadgen" } else { "" },
        a.dedup_mib
            .map(|m| format!(" --dedup-mib {m}"))
            .unwrap_or_default()
            + &if a.nice_ingest != 0 {
                format!(" --nice-ingest {}", a.nice_ingest)
            } else {
                String::new()
            }
    );
    t += "| metric | value |\n|---|---|\n";
    let loadgen = if a.sdk_loadgen {
        "SDK, minting and encoding while it runs".to_string()
    } else {
        format!(
            "bodies built before the load in {prep_secs:.1} s ({:.0} MiB), {} connections per collector",
            prep_bytes as f64 / 1048576.0,
            a.connections
        )
    };
    t += &format!(
        "| offered load ({loadgen}, batches of {BATCH}, over {n} collectors) | {offered:.0} clicks/s ({generated} generated in {secs:.1} s) |\n"
    );
    t += &format!(
        "| acked by the collectors (2xx, fsynced) during the load | {acked_rate:.0} clicks/s (SDK backlog at the end: {backlog} clicks) |\n"
    );
    t += &format!(
        "| **counted by the aggregator during the load** | **{counted_rate:.0} clicks/s** (lag at the end of the load: {lag_at_end} clicks) |\n"
    );
    t += &format!(
        "| after the drain ({drain_secs:.1} s): acked / counted / refused as repeats by the aggregator / **undelivered** | {acked} / {counted} / {refused} / **{undelivered}** |\n"
    );
    t += &format!(
        "| CPU: aggregator / collectors ({}) / load generator | {:.2} / {} / {:.2} cores |\n",
        n,
        ca / secs,
        join(&ccs.iter().map(|c| c / secs).collect::<Vec<_>>(), 2),
        cl / secs
    );
    for (role, c) in &other_cpu {
        t += &format!("| CPU: {role} (all processes) | {:.2} cores |\n", c / secs);
    }
    t += &format!(
        "| load generator: CPU µs per click sent | {:.2} |\n",
        cl / generated.max(1) as f64 * 1e6
    );
    t += &format!(
        "| collectors: clicks per CPU-second | {:.0} |\n",
        at_end.acked as f64 / cc.max(1e-9)
    );
    t += &format!(
        "| aggregator: clicks per CPU-second | {:.0} |\n",
        at_end.counted as f64 / ca.max(1e-9)
    );
    t += &format!(
        "| click -> queryable p50 / p99 ({pl} probes) | {probe50:.1} / {probe99:.1} ms |\n"
    );
    t += &format!("| slowest probes (latency at second of the load) | {slowest} |\n");
    t += &format!(
        "| slow durable writes during the load: aggregator WAL commits over 51 / 102 ms; collector spool fsyncs over 51 / 102 ms; checkpoints | {} / {}; {} / {}; {} |\n",
        slow[0], slow[1], slow[2], slow[3], slow[4]
    );
    t += &format!(
        "| TopAds(n=100, last 60 min) over gRPC under load p50 / p99 ({tl} queries) | {top50:.2} / {top99:.2} ms |\n"
    );
    t += &format!(
        "| SDK request latency p50 / p99 per collector | {} ms |\n",
        req_lat
            .iter()
            .map(|(a, b)| format!("{a:.1} / {b:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    t += &format!(
        "| peak RSS: aggregator / collectors | {rss_agg:.0} / {} MiB |\n",
        join(&rss_cols, 0)
    );
    let error_text = if errors.is_empty() {
        "none".to_string()
    } else {
        format!("{errors:?}")
    };
    t += &format!(
        "| collectors' spool group-commit fsync, mean during the load | {fsync_mean_ms:.2} ms ({} fsyncs) |\n",
        slow[6]
    );
    t += &format!("| load generator errors | {error_text} |\n");
    let error_count: u64 = errors.values().sum();
    let line = format!(
        "RESULT bench=pipeline cluster={} rate={} duration_s={secs:.1} collectors={n} ads={} offered_per_sec={offered:.0} \
         acked_per_sec={acked_rate:.0} counted_per_sec={counted_rate:.0} acked={acked} counted={counted} \
         refused={refused} undelivered={undelivered} sdk_backlog={backlog} lag_at_end={lag_at_end} drain_s={drain_secs:.1} \
         probe_p50_ms={probe50:.1} probe_p99_ms={probe99:.1} probes={pl} \
         topads_p50_ms={top50:.2} topads_p99_ms={top99:.2} topads_queries={tl} \
         cpu_aggregator={:.2} cpu_collectors={:.2} cpu_loadgen={:.2} loadgen_us_per_click={:.2} sdk_loadgen={} dedup_mib={} nice_ingest={} \
         rss_aggregator_mib={rss_agg:.0} rss_collector_max_mib={:.0} fsync_mean_ms={fsync_mean_ms:.2} wal_commits_over_51ms={} spool_fsyncs_over_51ms={} checkpoints={} errors={error_count}",
        a.cluster,
        a.rate,
        a.ads,
        ca / secs,
        cc / secs,
        cl / secs,
        cl / generated.max(1) as f64 * 1e6,
        a.sdk_loadgen,
        a.dedup_mib.unwrap_or(256),
        a.nice_ingest,
        rss_cols.iter().copied().fold(0.0, f64::max),
        slow[0],
        slow[2],
        slow[4],
    );
    Ok((t, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observations above a bound, from a histogram's cumulative buckets.
    #[test]
    fn above_counts_observations_past_a_bound() {
        let page = "# TYPE x_seconds histogram\n\
                    x_seconds_sum 1.5\n\
                    x_seconds_count 10\n\
                    x_seconds_bucket{le=\"0.0256\"} 6\n\
                    x_seconds_bucket{le=\"0.0512\"} 8\n\
                    x_seconds_bucket{le=\"0.1024\"} 9\n\
                    x_seconds_bucket{le=\"+Inf\"} 10\n";
        assert_eq!(above(page, "x_seconds", 0.0512), 2);
        assert_eq!(above(page, "x_seconds", 0.1024), 1);
        assert_eq!(
            above(page, "x_seconds", 0.06),
            2,
            "the bound at or below 60 ms"
        );
        assert_eq!(above(page, "x_seconds", 0.001), 10);
        assert_eq!(above(page, "y_seconds", 0.05), 0, "absent");
    }
}
