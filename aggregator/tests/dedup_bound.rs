//! Bounded exact dedup (issue 11, finding 10): the dedup set stays under
//! `dedup.memory_bytes` in RAM by spilling to the store, stays exact across spills,
//! checkpoints, kill -9 and WAL replay; the quarantine log stops at `quarantine.max_bytes`
//! with a counter. Expected counts come from the test's own ledger.
//!
//! The 1M-unique-impression RSS figure: `cargo test --release -p adclick-aggregator --test
//! aggregator -- --ignored --nocapture dedup_bound::flood`.

use std::collections::BTreeMap;

use adclick_aggregator::AggregatorConfig;
use adclick_aggregator::state::dedup::RAM_ENTRY_BYTES;
use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{GetAdClicksRequest, Granularity, IngestBatch, IngestClick};
use adclick_test_support::aggregator::{ADMIN, INGEST, T0, connect, start_retrying};
use adclick_test_support::common::{MIN, authed};
use tonic::transport::Channel;

const ADS: u64 = 7;

/// The shared aggregator test config with `dedup.memory_bytes` set.
fn config(dir: &std::path::Path, memory_bytes: usize) -> AggregatorConfig {
    let mut c = adclick_test_support::aggregator::config(dir);
    c.dedup.memory_bytes = memory_bytes;
    c
}

fn id(n: u64) -> [u8; 16] {
    let mut x = [0u8; 16];
    x[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    x[8..].copy_from_slice(&n.to_le_bytes());
    x
}

fn click(n: u64) -> IngestClick {
    let ad = 1 + n % ADS;
    IngestClick {
        impression_id: id(n).to_vec(),
        ad_id: ad,
        advertiser_id: 1,
        campaign_id: ad,
        token_expires_at_ms: T0 + 3_600_000,
        event_time_ms: T0 + (n % 5) as i64 * MIN,
        received_at_ms: T0,
        ..Default::default()
    }
}

async fn send(ch: &Channel, seq: u64, clicks: Vec<IngestClick>) -> bool {
    let mut c = IngestServiceClient::new(ch.clone()).max_encoding_message_size(64 << 20);
    c.ingest(authed(
        IngestBatch {
            collector_id: "c".into(),
            seq,
            clicks,
            ..Default::default()
        },
        INGEST,
    ))
    .await
    .unwrap()
    .into_inner()
    .already_acked
}

async fn totals(ch: &Channel) -> BTreeMap<u64, u64> {
    let mut q = QueryServiceClient::new(ch.clone());
    let mut out = BTreeMap::new();
    for ad in 1..=ADS {
        let r = q
            .get_ad_clicks(authed(
                GetAdClicksRequest {
                    fill_empty: None,
                    ad_id: ad,
                    from_ms: T0 - 10 * MIN,
                    to_ms: T0 + 10 * MIN,
                    granularity: Granularity::Minute as i32,
                    filter: None,
                    ..Default::default()
                },
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner();
        out.insert(ad, r.total_clicks);
    }
    out
}

/// Batch `k` (1-based): 1,000 new impressions plus 150 repeats of impressions from earlier
/// batches (long spilled by then), and 5 repeats inside the batch.
fn batch(k: u64) -> Vec<IngestClick> {
    let base = (k - 1) * 1000;
    let mut v: Vec<IngestClick> = (base..base + 1000).map(click).collect();
    if k > 1 {
        v.extend((0..150).map(|j| click((j * 7919 + k * 131) % base)));
    }
    v.extend((0..5).map(|j| click(base + j)));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_is_bounded_in_ram_and_exact_across_spills_checkpoints_and_kill() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB: a RAM tier of 786,432 / 96 = 8,192 ids; 40,000 unique ids must spill.
    let memory = 1 << 20;
    let max_ram_ids = (memory - memory / 4) / RAM_ENTRY_BYTES;
    let batches: Vec<Vec<IngestClick>> = (1..=40).map(batch).collect();
    let mut oracle: BTreeMap<u64, u64> = BTreeMap::new();
    for n in 0..40_000u64 {
        *oracle.entry(1 + n % ADS).or_default() += 1;
    }

    // Life 1: no checkpoint at all, so the restart replays the whole WAL against a disk tier
    // that already holds every spill of this life ("entries from the future").
    let mut cfg = config(dir.path(), memory);
    cfg.checkpoint.interval_ms = 3_600_000;
    let a = start_retrying(cfg, None).await;
    let ch = connect(&a).await;
    for (i, b) in batches.iter().enumerate().take(20) {
        assert!(!send(&ch, i as u64 + 1, b.clone()).await);
        let held = a.metrics().dedup_entries.get() as usize;
        assert!(held < max_ram_ids, "RAM tier holds {held} ids");
    }
    assert!(a.metrics().dedup_spilled.get() > 0, "nothing spilled");
    a.kill();

    // Life 2: replay, then the rest with a checkpoint after every group; killed again.
    let mut cfg = config(dir.path(), memory);
    cfg.checkpoint.interval_ms = 1;
    let a = start_retrying(cfg, None).await;
    let ch = connect(&a).await;
    for (i, b) in batches.iter().enumerate().skip(20) {
        assert!(!send(&ch, i as u64 + 1, b.clone()).await);
        let held = a.metrics().dedup_entries.get() as usize;
        assert!(held < max_ram_ids, "RAM tier holds {held} ids");
    }
    a.kill();

    // Life 3: every batch again is a no-op; counts are exactly the unique impressions.
    let a = start_retrying(config(dir.path(), memory), None).await;
    let ch = connect(&a).await;
    for (i, b) in batches.iter().enumerate() {
        assert!(send(&ch, i as u64 + 1, b.clone()).await, "batch {}", i + 1);
    }
    assert_eq!(totals(&ch).await, oracle);
    // A repeat of a spilled impression under a new seq is a duplicate. (The replay at start
    // may have counted the in-batch repeats of WAL entries after the last checkpoint, when
    // the kill beat that checkpoint: count from here.)
    let before = a.metrics().clicks_with("duplicate");
    assert!(!send(&ch, 41, vec![click(3), click(39_999)]).await);
    assert_eq!(a.metrics().clicks_with("duplicate") - before, 2);
    assert_eq!(totals(&ch).await, oracle);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_stops_at_its_byte_cap_and_counts_what_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.quarantine.max_bytes = 1_000;
    let a = start_retrying(cfg, None).await;
    let ch = connect(&a).await;
    // 50 implausible clicks (event time after the token's expiry): all quarantined.
    let bad: Vec<IngestClick> = (0..50)
        .map(|n| {
            let mut c = click(n);
            c.event_time_ms = c.token_expires_at_ms + 3_600_000;
            c
        })
        .collect();
    send(&ch, 1, bad).await;
    let path = dir.path().join("quarantine.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let m = a.metrics();
    assert!(text.len() <= 1_000, "{} bytes", text.len());
    assert!(text.ends_with('\n'), "whole records only");
    let kept = text.lines().count() as u64;
    assert!(kept > 0);
    assert_eq!(kept + m.quarantine_dropped.get(), 50);
    assert_eq!(m.quarantine_bytes.get(), text.len() as i64);
    assert_eq!(m.clicks_with("malformed"), 50, "still counted by reason");
    a.shutdown().await;
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// 1M unique impressions (a flood; `ADCLICK_FLOOD=N` for another size) into an aggregator
/// with `dedup.memory_bytes` = 32 MiB and `click_index.memory_bytes` = 8 MiB:
/// prints RSS before and after; the growth must stay under the dedup ceiling plus the
/// store's page cache (`STORE_CACHE_BYTES`), 3.5 times the click index's budget (its chunks
/// and what writing a segment of them takes) and a fixed allowance for the counting state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run with --release -- --ignored --nocapture flood"]
async fn flood_of_a_million_unique_impressions_keeps_rss_under_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let memory = 32 << 20;
    let mut cfg = config(dir.path(), memory);
    cfg.checkpoint.interval_ms = 5_000;
    // Every counted click is also in the click index: in RAM up to this budget, then in a
    // segment, whose write takes ~2.4x its chunks' bytes again (`write_segment`'s copy and
    // the segment's sort orders).
    let index_memory = 8 << 20;
    cfg.click_index.memory_bytes = index_memory;
    let a = start_retrying(cfg, None).await;
    let ch = connect(&a).await;
    // Warm up (threads, connections, first cells) before the baseline.
    send(&ch, 1, (10_000_000..10_001_000).map(click).collect()).await;
    let before = rss_bytes();
    let mut peak = before;
    // ADCLICK_FLOOD=3000000 runs a larger flood, to see that the growth stays flat (ids
    // from 10M up are the warm-up's, so at most 9M).
    let n = std::env::var("ADCLICK_FLOOD")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1_000_000)
        .clamp(10_000, 9_000_000)
        / 10_000
        * 10_000;
    let per = 10_000u64;
    for k in 0..n / per {
        send(&ch, k + 2, (k * per..(k + 1) * per).map(click).collect()).await;
        peak = peak.max(rss_bytes());
    }
    let after = rss_bytes();
    let m = a.metrics();
    assert_eq!(m.clicks_with("applied"), n + 1000);
    let ceiling = memory as u64
        + adclick_aggregator::store::STORE_CACHE_BYTES as u64
        + index_memory as u64 * 7 / 2
        + (32 << 20);
    println!(
        "flood: {n} unique impressions; RSS before {} MiB, after {} MiB, peak {} MiB, growth {} MiB; \
         dedup.memory_bytes {} MiB, RAM ids {}, spilled {}, ceiling for growth {} MiB",
        before >> 20,
        after >> 20,
        peak >> 20,
        peak.saturating_sub(before) >> 20,
        memory >> 20,
        m.dedup_entries.get(),
        m.dedup_spilled.get(),
        ceiling >> 20
    );
    assert!(peak.saturating_sub(before) < ceiling);
    a.shutdown().await;
}
