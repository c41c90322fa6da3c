//! Exact counting over real gRPC: windows per minute/hour/day, filters, unique users and
//! TopAds against an oracle, redelivered batches, late clicks, and a viral ad spread over
//! salted keys and merged back exactly.

use std::collections::HashSet;

use adclick_proto::v1::{self, Filter, Granularity};
use adclick_test_support::aggregator::{ADMIN, T0};
use adclick_test_support::common::MIN;

use crate::util::*;

/// Exact counts per minute/hour/day, filters, unique users, and TopAds against the oracle,
/// with duplicates inside and across batches and from two collectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_filters_unique_users_and_top_n_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let all = clicks(1, 6000, 60, 90, 400);
    let mut seq = 0;
    for chunk in all.chunks(500) {
        seq += 1;
        let mut batch = chunk.to_vec();
        batch.extend_from_slice(&chunk[..20]); // duplicates within the batch
        let ack = send(&mut ing, "c1", seq, batch).await;
        assert_eq!(
            (ack.accepted, ack.duplicate, ack.already_acked),
            (chunk.len() as u32, 20, false)
        );
    }
    // Another collector re-sends some of the same impressions: all duplicates.
    let ack = send(&mut ing, "c2", 1, all[..300].to_vec()).await;
    assert_eq!((ack.accepted, ack.duplicate), (0, 300));

    let per_minute = oracle(&all);
    for ad in [1u64, 2, 7, 30] {
        let r = ad_clicks(&mut q, ADMIN, ad, Granularity::Minute, None).await;
        let expect: Vec<(i64, u64)> = per_minute
            .iter()
            .filter(|((a, _), _)| *a == ad)
            .map(|((_, m), c)| (*m, *c))
            .collect();
        let got: Vec<(i64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        assert_eq!(got, expect, "ad {ad} per minute");
        let total: u64 = expect.iter().map(|(_, c)| c).sum();
        assert_eq!(r.total_clicks, total);
        // Hour buckets: 0-60 min and 60-90 min.
        let h = ad_clicks(&mut q, ADMIN, ad, Granularity::Hour, None).await;
        let first_hour: u64 = expect
            .iter()
            .filter(|(m, _)| *m < T0 + 60 * MIN)
            .map(|(_, c)| c)
            .sum();
        let hours: Vec<(i64, u64)> = h.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        let mut want = vec![(T0, first_hour), (T0 + 3_600_000, total - first_hour)];
        want.retain(|(_, c)| *c > 0);
        assert_eq!(hours, want, "ad {ad} per hour");
        let d = ad_clicks(&mut q, ADMIN, ad, Granularity::Day, None).await;
        assert_eq!(
            d.buckets
                .iter()
                .map(|b| (b.start_ms, b.clicks))
                .collect::<Vec<_>>(),
            vec![(T0, total)]
        );
        // Unique users: exact users of this ad, HLL within 2% (exact while small).
        let users: HashSet<&str> = all
            .iter()
            .filter(|c| c.ad_id == ad)
            .map(|c| c.user_id.as_str())
            .collect();
        let est = d.total_unique_users as f64;
        assert!(
            (est - users.len() as f64).abs() <= (users.len() as f64 * 0.02).max(1.0),
            "ad {ad}: {est} vs {}",
            users.len()
        );
        // Filter: country DE on mobile.
        let f = Filter {
            country: vec!["DE".into()],
            device: vec![v1::Device::Mobile as i32],
            ..Default::default()
        };
        let r = ad_clicks(&mut q, ADMIN, ad, Granularity::Day, Some(f)).await;
        let want = all
            .iter()
            .filter(|c| c.ad_id == ad && c.country == "DE" && c.device == 2)
            .count() as u64;
        assert_eq!(r.total_clicks, want, "ad {ad} DE mobile");
    }
    // TopAds over several ranges, unfiltered and filtered.
    for (n, from, to) in [
        (10, T0, T0 + 90 * MIN),
        (5, T0 + 10 * MIN, T0 + 25 * MIN),
        (100, T0, T0 + 2 * MIN),
        (3, T0 + 89 * MIN, T0 + 95 * MIN),
    ] {
        assert_eq!(
            top(&mut q, ADMIN, n, from, to, None).await,
            top_oracle(&all, n as usize, from, to, |_| true),
            "top {n} [{from}, {to})"
        );
    }
    let f = Filter {
        os: vec!["ios".into()],
        campaign_id: vec![2],
        ..Default::default()
    };
    assert_eq!(
        top(&mut q, ADMIN, 7, T0, T0 + 90 * MIN, Some(f)).await,
        top_oracle(&all, 7, T0, T0 + 90 * MIN, |c| c.os == "ios"
            && c.campaign_id == 2)
    );
    assert_eq!(a.metrics().clicks_with("applied"), 6000);
    assert_eq!(a.metrics().clicks_with("duplicate"), 12 * 20 + 300);
    a.shutdown().await;
}

/// A batch re-delivered after its ack is acknowledged again and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_of_an_acked_batch_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let b1 = clicks(2, 100, 5, 5, 10);
    let b2 = clicks(3, 100, 5, 5, 10);
    assert!(!send(&mut ing, "c", 1, b1.clone()).await.already_acked);
    assert!(
        !send(&mut ing, "c", 3, b2.clone()).await.already_acked,
        "gaps in seq are fine"
    );
    let again = send(&mut ing, "c", 1, b1.clone()).await;
    assert!(again.already_acked);
    assert_eq!(again.accepted, 0);
    // Even different content under an acked seq is ignored: seq is the identity.
    assert!(
        send(&mut ing, "c", 2, clicks(4, 50, 5, 5, 10))
            .await
            .already_acked
    );
    let total: u64 = (1..=5).map(|_| 0).sum::<u64>();
    let _ = total;
    let top_all = top(&mut q, ADMIN, 10, T0, T0 + 10 * MIN, None).await;
    let mut both = b1.clone();
    both.extend(b2);
    assert_eq!(top_all, top_oracle(&both, 10, T0, T0 + 10 * MIN, |_| true));
    assert_eq!(a.metrics().redeliveries.get(), 2);
    a.shutdown().await;
}

/// Clicks for a final minute still count (as late corrections); clicks older than the
/// retention are counted as too old and not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_clicks_correct_final_minutes_and_too_old_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.windows.allowed_delay_ms = 5_000;
    cfg.windows.retention_minutes = 30;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let mut cs = clicks(5, 3, 9, 1, 3);
    for c in &mut cs {
        c.ad_id = 9;
        c.advertiser_id = 9 % 3;
        c.campaign_id = 9 % 5;
    }
    cs[0].event_time_ms = T0 + 20 * MIN; // advances the watermark to T0+20m-5s
    cs[1].event_time_ms = T0 + 2 * MIN + 1; // minute 2 is final: a late correction
    cs[2].event_time_ms = T0 - 20 * MIN; // older than 30 min before the watermark? no: 40 min -> too old
    let ack = send(&mut ing, "c", 1, cs.clone()).await;
    assert_eq!(ack.accepted, 2);
    let m = a.metrics();
    assert_eq!((m.clicks_with("late"), m.clicks_with("too_old")), (1, 1));
    let r = ad_clicks(&mut q, ADMIN, 9, Granularity::Minute, None).await;
    let got: Vec<(i64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
    assert_eq!(got, vec![(T0 + 2 * MIN, 1), (T0 + 20 * MIN, 1)]);
    assert_eq!(r.watermark_ms, T0 + 20 * MIN - 5_000);
    let q = std::fs::read_to_string(dir.path().join("quarantine.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(q.lines().next().unwrap()).unwrap();
    assert_eq!(line["reason"], "older than windows.retention_minutes");
    assert_eq!(line["event_time_ms"], T0 - 20 * MIN);
    assert_eq!(q.lines().count(), 1);
    a.shutdown().await;
}

/// One ad with half of all traffic: reported hot in acks, spread over both shards, and
/// still counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viral_ad_is_detected_spread_and_merged_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.shards.hot_window_clicks = 1000;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let mut all = clicks(7, 8000, 200, 10, 1000);
    for (i, c) in all.iter_mut().enumerate() {
        if i % 2 == 0 {
            c.ad_id = 777;
            c.advertiser_id = 777 % 3;
            c.campaign_id = 777 % 5;
        }
    }
    let mut hot_seen = false;
    for (i, chunk) in all.chunks(500).enumerate() {
        let ack = send(&mut ing, "c", i as u64 + 1, chunk.to_vec()).await;
        hot_seen |= ack.hot_ad_ids == vec![777];
    }
    assert!(hot_seen, "ad 777 reported hot");
    let (bytes, cells) = a.memory();
    assert!(cells > 0 && bytes > 0);
    let want = top_oracle(&all, 20, T0, T0 + 10 * MIN, |_| true);
    assert_eq!(top(&mut q, ADMIN, 20, T0, T0 + 10 * MIN, None).await, want);
    assert_eq!(want[0], (777, 4000));
    let r = ad_clicks(&mut q, ADMIN, 777, Granularity::Minute, None).await;
    assert_eq!(r.total_clicks, 4000);
    a.shutdown().await;
}
