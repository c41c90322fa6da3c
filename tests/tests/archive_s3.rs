//! The raw click archive on a real S3-compatible server (moto, from PyPI via
//! `scripts/setup-archive-python.sh`), read back by an engine nobody here wrote (DuckDB,
//! `scripts/archive-duckdb.py`). The real `adclick aggregator` process archives to the
//! bucket with credentials from its environment, is SIGKILLed half-way and restarted (the
//! archive resumes from the WAL), then stopped gracefully; DuckDB's row count, per-status
//! counts and per-ad counted totals must equal what this test computes from the clicks it
//! sent.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::{IngestBatch, IngestClick};
use tonic::transport::Channel;

use crate::support::*;

const BUCKET: &str = "adclick-archive-e2e";
const PREFIX: &str = "raw/clicks";

/// The venv's python with moto and duckdb (`scripts/setup-archive-python.sh`).
fn python() -> PathBuf {
    PathBuf::from(setup_script("setup-archive-python.sh"))
}

/// A moto S3 server on 127.0.0.1; killed on drop.
struct Moto(Child, std::net::SocketAddr);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn moto(py: &Path, log: &Path) -> Moto {
    let addr = free_addr();
    let child = Command::new(py)
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
        .arg(addr.port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(log).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(log).unwrap(),
        ))
        .spawn()
        .unwrap();
    let m = Moto(child, addr);
    let http = http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Creating the bucket doubles as the readiness probe.
        if let Ok(r) = http.put(format!("http://{addr}/{BUCKET}")).send().await
            && r.status().is_success()
        {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "moto did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Batch `i` of collector "edge": 150 fresh clicks on ads 1..=9 over the last 100 minutes
/// (two or three event hours), plus 15 repeats of the batch before (duplicates).
fn batches(now: i64, n: usize) -> Vec<Vec<IngestClick>> {
    let mut out: Vec<Vec<IngestClick>> = Vec::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..n {
        let mut b: Vec<IngestClick> = (0..150)
            .map(|j| {
                let ad = 1 + next() % 9;
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(i as u64).to_le_bytes());
                id[8..].copy_from_slice(&(j as u64).to_le_bytes());
                let ev = now - (next() % (100 * 60_000)) as i64;
                IngestClick {
                    impression_id: id.to_vec(),
                    ad_id: ad,
                    advertiser_id: 10 + ad % 2,
                    campaign_id: ad,
                    token_expires_at_ms: now + 3_600_000,
                    event_time_ms: ev,
                    received_at_ms: ev,
                    occurred_at_ms: ev,
                    sent_at_ms: ev,
                    country: "DE".into(),
                    device: 1,
                    os: "ios".into(),
                    site: "news.example".into(),
                    user_id: format!("u{}", next() % 40),
                    client_ip: vec![203, 0, 113, (next() % 250) as u8],
                    ..Default::default()
                }
            })
            .collect();
        if let Some(prev) = out.last() {
            b.extend(prev[..15].iter().cloned());
        }
        out.push(b);
    }
    out
}

async fn send_all(grpc: std::net::SocketAddr, batches: &[Vec<IngestClick>]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(ch) => break IngestServiceClient::new(ch),
            Err(e) => {
                assert!(Instant::now() < deadline, "aggregator unreachable: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    for (i, b) in batches.iter().enumerate() {
        loop {
            let req = authed(
                IngestBatch {
                    collector_id: "edge".into(),
                    seq: i as u64 + 1,
                    clicks: b.clone(),
                    ..Default::default()
                },
                INGEST_KEY,
            );
            match client.ingest(req).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "ingest failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn spawn(config: &Path, log: &Path) -> ChildServer {
    ChildServer::spawn_args(
        [
            OsStr::new("aggregator"),
            OsStr::new("--config"),
            config.as_os_str(),
        ],
        &[
            ("AWS_ACCESS_KEY_ID", OsStr::new("e2e-access")),
            ("AWS_SECRET_ACCESS_KEY", OsStr::new("e2e-secret")),
        ],
        log,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_on_s3_survives_a_sigkill_and_duckdb_reads_the_sent_totals() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(120), scenario(py)).await;
}

async fn scenario(py: PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let s3 = moto(&py, &dir.path().join("moto.log")).await;
    let grpc = free_addr();
    let config = dir.path().join("aggregator.toml");
    let mut toml = aggregator_toml(grpc, &dir.path().join("aggregator"));
    toml.push_str(&format!(
        r#"
[archive]
enabled = true
writer_id = "e2e"
roll_interval_secs = 1
max_rows_per_roll = 1000

[archive.s3]
bucket = "{BUCKET}"
prefix = "{PREFIX}"
endpoint = "http://{addr}"
region = "us-east-1"
allow_http = true
"#,
        addr = s3.1
    ));
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("aggregator.log");

    let now = now_ms();
    let all = batches(now, 24);
    // Half, a SIGKILL (no final checkpoint, the archive mid-generation), then everything
    // again from the start (what was acked is a no-op) and a graceful stop.
    let child = spawn(&config, &log);
    send_all(grpc, &all[..12]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.kill();
    let mut child = spawn(&config, &log);
    send_all(grpc, &all).await;
    child.terminate();
    assert!(
        child.wait_exit(Duration::from_secs(30)).is_some(),
        "aggregator did not stop; log:\n{}",
        child.log_text()
    );

    // The oracle: every click sent is one row; the first copy of an impression counts.
    let mut seen = HashSet::new();
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    let (mut rows, mut dups) = (0u64, 0u64);
    for c in all.iter().flatten() {
        rows += 1;
        if seen.insert(c.impression_id.clone()) {
            *counted.entry(c.ad_id.to_string()).or_default() += 1;
        } else {
            dups += 1;
        }
    }

    let out = Command::new(&py)
        .arg(repo_root().join("scripts/archive-duckdb.py"))
        .args(["--s3", &format!("s3://{BUCKET}/{PREFIX}"), "--endpoint"])
        .arg(format!("http://{}", s3.1))
        .env("AWS_ACCESS_KEY_ID", "e2e-access")
        .env("AWS_SECRET_ACCESS_KEY", "e2e-secret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "archive-duckdb.py failed:\n{}\naggregator log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        child.log_text()
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["rows"], rows, "{got}");
    assert_eq!(got["distinct_keys"], rows, "a click archived twice: {got}");
    let by_status = &got["by_status"];
    let counted_rows = by_status["counted/"].as_u64().unwrap_or(0)
        + by_status["counted/late"].as_u64().unwrap_or(0);
    assert_eq!(counted_rows, rows - dups, "{got}");
    assert_eq!(by_status["duplicate/duplicate_impression"], dups, "{got}");
    let per_ad: BTreeMap<String, u64> =
        serde_json::from_value(got["counted_by_ad"].clone()).unwrap();
    assert_eq!(per_ad, counted);
    assert_eq!(got["event_hour_matches_partition"], true, "{got}");
    assert!(
        got["partitions"].as_array().unwrap().len() >= 2,
        "100 minutes span at least two event hours: {got}"
    );
    // Several generations: the archive closed files along the way, not only at the end.
    assert!(got["objects"].as_u64().unwrap() > 2, "{got}");
}
