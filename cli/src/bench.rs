//! `adclick bench`: whole-pipeline benchmark on one machine. It runs the real `adclick
//! aggregator` and `adclick collector` as child processes (so CPU and peak RSS can be read
//! per component from /proc) and drives them with the synthetic SDK traffic of
//! `adclick dev` from this process. It measures sustained clicks/s, CPU per component,
//! click-to-queryable latency (probe clicks timed until `GetAdClicks` sees them), TopAds
//! latency under load and peak RSS, then prints a table (and appends it to a file with
//! `--append`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{self, GetAdClicksRequest, TopAdsRequest};
use adclick_sdk::ImpressionSigner;
use anyhow::{Context, Result, bail};
use clap::Args;
use prost::Message;
use tonic::transport::Channel;

use crate::keys::now_ms;
use crate::traffic::{self, Target, TrafficConfig};

/// `adclick bench`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Offered load, clicks per second.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// Measurement time.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    /// Distinct ads (Zipf).
    #[arg(long, default_value_t = 100_000)]
    ads: u64,
    /// Append the result table to this file (e.g. BENCHMARKS.md).
    #[arg(long)]
    append: Option<PathBuf>,
}

struct Proc {
    child: Child,
}

impl Proc {
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&format!("/proc/{}/stat", self.child.id()))
    }
    fn peak_rss_mib(&self) -> f64 {
        peak_rss(&format!("/proc/{}/status", self.child.id()))
    }
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

/// User + system CPU seconds from a `/proc/<pid>/stat` file (after the command name,
/// utime and stime are fields 12 and 13, in clock ticks of 1/100 s).
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn own_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(name: &'static str, args: &[&str], log: &Path) -> Result<Proc> {
    let exe = std::env::current_exe().context("cannot find the adclick binary")?;
    let log = std::fs::File::create(log)?;
    let child = Command::new(exe)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG", "warn")
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

async fn scrape(http: &reqwest::Client, url: &str, metric: &str) -> u64 {
    let Ok(r) = http.get(url).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(metric))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
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

pub fn run(a: BenchArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("adclick-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let keyring = Keyring::new(SigningKey::new(1, &secret)?);
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        KeyFile {
            keyring: keyring.clone(),
            created: vec![(1, now_ms())],
        }
        .render()?,
    )?;
    let admin = "bench-admin-key-0123456789";
    let ingest = crate::keys::ingest_key()?;
    let (grpc, qhttp, chttp) = (free_port()?, free_port()?, free_port()?);
    std::fs::write(
        dir.join("aggregator.toml"),
        format!(
            "listen_grpc = \"127.0.0.1:{grpc}\"\nlisten_http = \"127.0.0.1:{qhttp}\"\ndata_dir = {:?}\n\
             ingest_keys = [\"{ingest}\"]\n\
             [windows]\nallowed_delay_ms = 2000\n[[api_keys]]\nkey = \"{admin}\"\nrole = \"admin\"\n",
            dir.join("agg")
        ),
    )?;
    std::fs::write(
        dir.join("collector.toml"),
        format!(
            "listen_http = \"127.0.0.1:{chttp}\"\ndata_dir = {:?}\nkeys_file = {:?}\naggregators = [\"http://127.0.0.1:{grpc}\"]\n\
             aggregator_key = \"{ingest}\"\n\
             [forward]\nretry_base_ms = 20\nretry_max_ms = 500\n[limits]\nmax_clicks_per_batch = 5000\nmax_body_bytes = 8388608\n\
             # every bench client is 127.0.0.1: no per-IP click rate limit\n\
             rate_limit_per_ip = 0.0\n",
            dir.join("col"),
            keys
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
    let col = spawn(
        "collector",
        &[
            "collector",
            "--config",
            &dir.join("collector.toml").to_string_lossy(),
        ],
        &dir.join("collector.log"),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(measure(&a, keyring, admin, grpc, qhttp, chttp, &agg, &col));
    drop(col);
    drop(agg);
    let _ = std::fs::remove_dir_all(&dir);
    let table = result?;
    print!("{table}");
    if let Some(path) = a.append {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)?;
        writeln!(f, "\n{table}")?;
        println!("appended to {}", path.display());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    a: &BenchArgs,
    keyring: Keyring,
    admin: &str,
    grpc: u16,
    qhttp: u16,
    chttp: u16,
    agg: &Proc,
    col: &Proc,
) -> Result<String> {
    adclick_sdk::HttpTransport::install_crypto_provider();
    let http = reqwest::Client::new();
    let (agg_metrics, col_metrics) = (
        format!("http://127.0.0.1:{qhttp}/metrics"),
        format!("http://127.0.0.1:{chttp}/metrics"),
    );
    wait_healthy(&http, &format!("http://127.0.0.1:{qhttp}/healthz")).await?;
    wait_healthy(&http, &format!("http://127.0.0.1:{chttp}/healthz")).await?;
    let channel = Channel::from_shared(format!("http://127.0.0.1:{grpc}"))?
        .connect()
        .await?;
    let accepted_metric = "adclick_collector_clicks_total{outcome=\"accepted\"}";
    let applied_metric = "adclick_aggregator_clicks_total{outcome=\"applied\"}";

    let cpu0 = (agg.cpu_seconds(), col.cpu_seconds(), own_cpu_seconds());
    let acc0 = scrape(&http, &col_metrics, accepted_metric).await;
    let app0 = scrape(&http, &agg_metrics, applied_metric).await;
    let cfg = TrafficConfig {
        rate: a.rate,
        ads: a.ads,
        trackers: 8,
        batch_size: 500,
        late_pct: 0.0,
        ..Default::default()
    };
    let load = traffic::start(
        cfg,
        Target::Http(format!("http://127.0.0.1:{chttp}")),
        keyring.clone(),
        None,
    )?;
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));

    // Probe clicks: a fresh ad each, posted directly, timed until GetAdClicks sees it.
    let probes = {
        let (done, http, channel, admin) = (
            done.clone(),
            http.clone(),
            channel.clone(),
            admin.to_string(),
        );
        let signer = ImpressionSigner::new(keyring);
        let url = format!("http://127.0.0.1:{chttp}/v1/clicks");
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
                let start = Instant::now();
                let ok = http
                    .post(&url)
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
                        lat.push(start.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            lat
        })
    };
    // TopAds under load.
    let tops = {
        let (done, channel, admin) = (done.clone(), channel.clone(), admin.to_string());
        tokio::spawn(async move {
            let mut q = QueryServiceClient::new(channel);
            let mut lat = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let req = TopAdsRequest {
                    n: 100,
                    window: Some(v1::top_ads_request::Window::LastMinutes(60)),
                    filter: None,
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
    };
    tokio::time::sleep(a.duration).await;
    let secs = t0.elapsed().as_secs_f64();
    let acc1 = scrape(&http, &col_metrics, accepted_metric).await;
    let app1 = scrape(&http, &agg_metrics, applied_metric).await;
    let cpu1 = (agg.cpu_seconds(), col.cpu_seconds(), own_cpu_seconds());
    done.store(true, Ordering::Relaxed);
    let generated = load.stats.clicks.load(Ordering::Relaxed);
    let (_, req_p50, req_p99, _) = load.stats.latency_ms();
    let errors = load.stats.errors();
    load.stop().await;
    let mut probe_lat = probes.await.unwrap_or_default();
    let mut top_lat = tops.await.unwrap_or_default();

    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let accepted = (acc1 - acc0) as f64 / secs;
    let counted = (app1 - app0) as f64 / secs;
    let (ca, cc, cl) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1, cpu1.2 - cpu0.2);
    let mut t = String::new();
    t += &format!("### adclick bench, {date}: {cores} cores, {cpu_model}\n\n");
    t += &format!(
        "`adclick bench --rate {} --duration {}s --ads {}`\n\n",
        a.rate,
        a.duration.as_secs(),
        a.ads
    );
    t += "| metric | value |\n|---|---|\n";
    t += &format!(
        "| offered load (SDK, batches of 500) | {:.0} clicks/s ({} generated) |\n",
        generated as f64 / secs,
        generated
    );
    t += &format!("| accepted by the collector (fsynced) | {accepted:.0} clicks/s |\n");
    t += &format!("| counted by the aggregator | {counted:.0} clicks/s |\n");
    t += &format!(
        "| CPU: collector / aggregator / load generator | {:.2} / {:.2} / {:.2} cores |\n",
        cc / secs,
        ca / secs,
        cl / secs
    );
    t += &format!(
        "| collector: clicks per CPU-second | {:.0} |\n",
        (acc1 - acc0) as f64 / cc.max(1e-9)
    );
    t += &format!(
        "| aggregator: clicks per CPU-second | {:.0} |\n",
        (app1 - app0) as f64 / ca.max(1e-9)
    );
    let (pl, tl) = (probe_lat.len(), top_lat.len());
    t += &format!(
        "| click -> queryable p50 / p99 ({pl} probes) | {:.1} / {:.1} ms |\n",
        pct(&mut probe_lat, 0.5),
        pct(&mut probe_lat, 0.99)
    );
    t += &format!(
        "| TopAds(n=100, last 60 min) under load p50 / p99 ({tl} queries) | {:.2} / {:.2} ms |\n",
        pct(&mut top_lat, 0.5),
        pct(&mut top_lat, 0.99)
    );
    t += &format!("| SDK request latency p50 / p99 | {req_p50:.1} / {req_p99:.1} ms |\n");
    t += &format!(
        "| peak RSS: collector / aggregator | {:.0} / {:.0} MiB |\n",
        col.peak_rss_mib(),
        agg.peak_rss_mib()
    );
    t += &format!(
        "| load generator errors | {} |\n",
        if errors.is_empty() {
            "none".to_string()
        } else {
            format!("{errors:?}")
        }
    );
    Ok(t)
}
