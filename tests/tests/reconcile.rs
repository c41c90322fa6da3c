//! `adclick reconcile --day`: the real binary recounts a day from the raw click archive
//! an in-process aggregator wrote and compares it with that aggregator's cells. A clean run
//! finds no difference (exit 0); with one archive file taken away, it reports exactly the
//! clicks that file held as counted (computed independently with DuckDB), at the minute and
//! the day level (exit 3, JSON-lines report).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::{IngestBatch, IngestClick};
use tonic::transport::Channel;

use crate::support::*;

/// The venv's python with moto and duckdb (`scripts/setup-archive-python.sh`).
fn python() -> PathBuf {
    PathBuf::from(setup_script("setup-archive-python.sh"))
}

/// Counted clicks in the archive under `dir`, by DuckDB.
fn duckdb_counted(py: &Path, dir: &Path) -> u64 {
    let out = Command::new(py)
        .arg(repo_root().join("scripts/archive-duckdb.py"))
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["counted_by_ad"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

/// One summary line: (level, cells compared, differing, clicks off).
type Level = (String, u64, u64, u64);

/// Runs `adclick reconcile`; (exit code, per level (cells, differing, clicks off), stdout).
fn reconcile(
    day: &str,
    archive: &Path,
    grpc: std::net::SocketAddr,
    report: &Path,
) -> (i32, Vec<Level>, String) {
    let out = Command::new(adclick_bin())
        .args(["reconcile", "--day", day, "--archive-dir"])
        .arg(archive)
        .args(["--endpoint", &format!("http://{grpc}"), "--api-key", ADMIN])
        .arg("--report")
        .arg(report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let levels = stdout
        .lines()
        .filter(|l| l.starts_with("minute") || l.starts_with("day"))
        .map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            (
                t[0].to_string(),
                t[3].parse().unwrap(),
                t[5].parse().unwrap(),
                t[8].parse().unwrap(),
            )
        })
        .collect();
    (
        out.status.code().unwrap_or(-1),
        levels,
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn clicks(now: i64, day_start: i64) -> Vec<Vec<IngestClick>> {
    let span = (now - day_start - 60_000).clamp(60_000, 50 * 60_000) as u64;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out: Vec<Vec<IngestClick>> = Vec::new();
    for i in 0..10u64 {
        let mut b: Vec<IngestClick> = (0..120u64)
            .map(|j| {
                let ad = 1 + next() % 6;
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&i.to_le_bytes());
                id[8..].copy_from_slice(&j.to_le_bytes());
                let ev = now - 30_000 - (next() % span) as i64;
                IngestClick {
                    impression_id: id.to_vec(),
                    ad_id: ad,
                    advertiser_id: ADV_A,
                    campaign_id: 1,
                    token_expires_at_ms: now + 3_600_000,
                    event_time_ms: ev,
                    received_at_ms: ev,
                    country: "US".into(),
                    device: 2,
                    user_id: format!("u{}", next() % 30),
                    ..Default::default()
                }
            })
            .collect();
        if let Some(prev) = out.last() {
            b.extend(prev[..10].iter().cloned());
        }
        out.push(b);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_nothing_then_exactly_a_missing_file() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(120), scenario(py)).await;
}

async fn scenario(py: PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let mut cfg = aggregator_config(&dir.path().join("agg"), "127.0.0.1:0".parse().unwrap());
    cfg.archive.enabled = true;
    cfg.archive.writer_id = "rec".into();
    cfg.archive.dir = archive.clone();
    cfg.archive.max_rows_per_roll = 300;
    let now = now_ms();
    let day_start = now.div_euclid(86_400_000) * 86_400_000;
    let day =
        humantime::format_rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(day_start as u64))
            .to_string()[..10]
            .to_string();
    let a = adclick_aggregator::start(cfg.clone()).await.unwrap();
    let ch = Channel::from_shared(format!("http://{}", a.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut ing = IngestServiceClient::new(ch);
    for (i, b) in clicks(now, day_start).into_iter().enumerate() {
        ing.ingest(authed(
            IngestBatch {
                collector_id: "c".into(),
                seq: i as u64 + 1,
                clicks: b,
                ..Default::default()
            },
            INGEST_KEY,
        ))
        .await
        .unwrap();
    }
    // A graceful stop publishes the rest of the archive; the restarted aggregator serves
    // the same counts.
    a.shutdown().await;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let grpc = a.grpc_addr();
    let report = dir.path().join("report.jsonl");

    let (code, levels, out) = tokio::task::spawn_blocking({
        let (day, archive, report) = (day.clone(), archive.clone(), report.clone());
        move || reconcile(&day, &archive, grpc, &report)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(levels.len(), 2, "{out}");
    for (level, cells, differing, off) in &levels {
        assert!(*cells > 0, "{level}: {out}");
        assert_eq!((*differing, *off), (0, 0), "{level}: {out}");
    }
    assert_eq!(std::fs::read_to_string(&report).unwrap(), "");

    // Take one file away: exactly its counted clicks are off, at both levels.
    let before = duckdb_counted(&py, &archive);
    let victim = std::fs::read_dir(&archive)
        .unwrap()
        .flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with("dt="))
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .flat_map(|h| std::fs::read_dir(h.path()).unwrap().flatten())
        .map(|f| f.path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    std::fs::rename(&victim, dir.path().join("aside.parquet")).unwrap();
    let missing = before - duckdb_counted(&py, &archive);
    assert!(missing > 0);
    let (code, levels, out) = tokio::task::spawn_blocking({
        let (day, archive, report) = (day.clone(), archive.clone(), report.clone());
        move || reconcile(&day, &archive, grpc, &report)
    })
    .await
    .unwrap();
    assert_eq!(code, 3, "{out}");
    for (level, _, differing, off) in &levels {
        assert!(*differing > 0, "{level}: {out}");
        assert_eq!(*off, missing, "{level}: {out}");
    }
    let lines = std::fs::read_to_string(&report).unwrap();
    let off: u64 = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["level"] == "day")
        .map(|v| v["aggregator_clicks"].as_u64().unwrap() - v["archive_clicks"].as_u64().unwrap())
        .sum();
    assert_eq!(off, missing, "{lines}");
    a.shutdown().await;
}
