//! Exact dedup across the disk tier's run files and SIGKILL: the real `adclick
//! aggregator` with a 1 MiB dedup budget (a RAM tier of 8,192 ids, so most ids are
//! spilled to sorted run files, and those merge), fed batches that re-send impressions of
//! earlier batches (long spilled by then) and of the same batch, SIGKILLed twice (once
//! with batches in flight) and restarted on the same data dir. Every impression is counted
//! once: the final per-ad counts equal the test's own ledger of distinct impressions, and
//! re-sends of spilled impressions under new seqs after each restart count as duplicates.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::{IngestBatch, IngestClick};
use tonic::transport::Channel;

use crate::support::*;

const ADS: u64 = 9;
const COLLECTOR: &str = "dedup-crash";
/// New impressions per batch (batch k holds impressions (k-1)*NEW .. k*NEW).
const NEW: u64 = 2_000;

fn id(n: u64) -> [u8; 16] {
    let mut x = [0u8; 16];
    x[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    x[8..].copy_from_slice(&n.to_le_bytes());
    x
}

fn ad(n: u64) -> u64 {
    5_000 + n % ADS
}

fn click(n: u64, now: i64) -> IngestClick {
    IngestClick {
        impression_id: id(n).to_vec(),
        ad_id: ad(n),
        advertiser_id: ADV_A,
        campaign_id: 1,
        token_expires_at_ms: now + HOUR,
        event_time_ms: now,
        received_at_ms: now,
        country: "US".into(),
        ..Default::default()
    }
}

/// Impressions of batch `k` (1-based): NEW new ones, 300 re-sends of impressions of
/// earlier batches (spread over all of them, so over every spilled run), 10 repeats of
/// its own.
fn impressions(k: u64) -> Vec<u64> {
    let base = (k - 1) * NEW;
    let mut v: Vec<u64> = (base..base + NEW).collect();
    if k > 1 {
        v.extend((0..300).map(|j| (j * 7_919 + k * 131) % base));
    }
    v.extend((0..10).map(|j| base + j * 3));
    v
}

async fn client(grpc: std::net::SocketAddr) -> IngestServiceClient<Channel> {
    let ch = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    IngestServiceClient::new(ch).max_encoding_message_size(64 << 20)
}

/// Sends batch `seq` with `ids`; `Some(already_acked)` when acked.
async fn send(c: &IngestServiceClient<Channel>, seq: u64, ids: &[u64], now: i64) -> Option<bool> {
    let batch = IngestBatch {
        collector_id: COLLECTOR.into(),
        seq,
        clicks: ids.iter().map(|&n| click(n, now)).collect(),
        // A pipelined sender (floor 1: nothing acked below seq 1), so a seq above a gap
        // (the re-sends, 31 and 32, before 25-30) does not mark the gap acked.
        acked_floor: 1,
    };
    c.clone()
        .ingest(authed(batch, INGEST_KEY))
        .await
        .ok()
        .map(|r| r.into_inner().already_acked)
}

async fn start(
    config: &std::path::Path,
    log: &std::path::Path,
    grpc: std::net::SocketAddr,
) -> ChildServer {
    let child = ChildServer::spawn("aggregator", config, log);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let now = now_ms();
    while std::time::Instant::now() < deadline {
        if top_ads(grpc, ADMIN, 1, (now - MIN, now), None)
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("aggregator did not start; log:\n{}", child.log_text());
}

fn run_files(data_dir: &std::path::Path) -> usize {
    std::fs::read_dir(data_dir.join("dedup-runs"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".dat"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_aggregator_counts_each_impression_once_across_dedup_spills() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(150), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let grpc = free_addr();
    let data_dir = dir.path().join("aggregator");
    let config = dir.path().join("aggregator.toml");
    let mut toml = aggregator_toml(grpc, &data_dir);
    toml.push_str("\n[dedup]\nmemory_bytes = 1048576\n");
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("aggregator.log");
    let now = now_ms();
    let batches: Vec<Vec<u64>> = (1..=30).map(impressions).collect();
    // The ledger: distinct impressions per ad, over everything that will be acked.
    let mut want: BTreeMap<u64, u64> = BTreeMap::new();
    let mut seen = HashSet::new();
    for n in batches.iter().flatten() {
        if seen.insert(*n) {
            *want.entry(ad(*n)).or_default() += 1;
        }
    }

    // Life 1: batches 1-12 one by one (each spill of 8,192 ids writes a run; a checkpoint
    // every 300 ms writes one too), then 13-16 in flight together and the kill.
    let mut child = start(&config, &log, grpc).await;
    let c = client(grpc).await;
    for (i, b) in batches.iter().enumerate().take(12) {
        assert_eq!(
            send(&c, i as u64 + 1, b, now).await,
            Some(false),
            "batch {}",
            i + 1
        );
    }
    let in_flight: Vec<_> = (12..16)
        .map(|i| {
            let (c, b) = (c.clone(), batches[i].clone());
            tokio::spawn(async move { send(&c, i as u64 + 1, &b, now).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    child.assert_running();
    child.kill();
    for t in in_flight {
        t.await.unwrap();
    }
    assert!(run_files(&data_dir) > 0, "nothing spilled to run files");

    // Life 2: every batch of life 1 again (acked or not: those acked are known), then
    // 17-24, then re-sends of spilled impressions under new seqs: all duplicates.
    let mut child = start(&config, &log, grpc).await;
    let c = client(grpc).await;
    for (i, b) in batches.iter().enumerate().take(24) {
        let acked = send(&c, i as u64 + 1, b, now).await;
        assert!(acked.is_some(), "batch {} not acked", i + 1);
        if i < 12 {
            assert_eq!(acked, Some(true), "batch {} acked before the kill", i + 1);
        }
    }
    let resend: Vec<u64> = (0..500).map(|j| j * 97 % (24 * NEW)).collect();
    assert_eq!(send(&c, 31, &resend, now).await, Some(false));
    child.assert_running();
    child.kill();

    // Life 3: the rest, the re-sends once more under another seq, and the counts.
    let child = start(&config, &log, grpc).await;
    let c = client(grpc).await;
    for (i, b) in batches.iter().enumerate() {
        let acked = send(&c, i as u64 + 1, b, now).await;
        assert_eq!(acked, Some(i < 24), "batch {}", i + 1);
    }
    assert_eq!(send(&c, 32, &resend, now).await, Some(false));
    let range = (now - 10 * MIN, now + 5 * MIN);
    let counts = poll_counts(grpc, range, Duration::from_secs(20), |c| *c == want).await;
    assert_eq!(counts, want, "log:\n{}", child.log_text());
    drop(child);
}
