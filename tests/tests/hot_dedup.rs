//! Hot-ad dedup across collectors and aggregator shards (issue 11, finding 11): with hot-key
//! fanout on, the same impressions sent through two collectors — one that has learned the
//! ad is hot, one that has not — must reach the same aggregator shard (separate processes
//! with separate exact dedup) and count once.
//!
//! Expected counts come from the test's own ledger: every impression minted is counted
//! exactly once, however many collectors it went through.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use adclick_aggregator::Aggregator;
use adclick_collector::Collector;
use adclick_collector::routing::Router;
use adclick_proto::v1::{ClickBatchResult, Granularity};
use adclick_sdk::MintedToken;
use prost::Message;

use crate::support::*;

const FANOUT: u32 = 8;

async fn post(col: &Collector, tokens: &[MintedToken], at: i64) -> ClickBatchResult {
    let batch = click_batch(tokens, at);
    let r = http_client()
        .post(format!("http://{}/v1/clicks", col.http_addr()))
        .header("content-type", "application/x-protobuf")
        .body(batch.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap()
}

/// Waits until the collector has forwarded (and had acked) `n` clicks.
async fn forwarded(col: &Collector, n: u64) {
    let m = col.metrics().clone();
    assert!(
        eventually(Duration::from_secs(30), || m.forwarded_clicks.get() >= n).await,
        "collector {} forwarded {} of {n}",
        col.collector_id(),
        m.forwarded_clicks.get()
    );
}

async fn clicks_of(agg: &Aggregator, ad: u64, range: (i64, i64)) -> u64 {
    ad_clicks(agg.grpc_addr(), ADMIN, ad, range, Granularity::Minute, None)
        .await
        .total_clicks
}

/// An ad whose salted keys do not all live on the unsalted key's shard, so that routing by
/// "hot or not" would split its impressions (chosen, not assumed, for these endpoints).
fn splittable_ad(endpoints: &[String]) -> u64 {
    let r = Router::new(endpoints);
    (5_000..6_000u64)
        .find(|ad| (1..=FANOUT).any(|s| r.shard(*ad, s) != r.shard(*ad, 0)))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_ad_impressions_through_two_collectors_count_once() {
    within(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let mut aggs = Vec::new();
        for i in 0..2 {
            let mut c = aggregator_config(
                &dir.path().join(format!("agg{i}")),
                "127.0.0.1:0".parse().unwrap(),
            );
            // An ad with more than half of a 100-click round is hot.
            c.shards.hot_window_clicks = 100;
            c.shards.hot_fraction = 0.5;
            aggs.push(adclick_aggregator::start(c).await.unwrap());
        }
        let endpoints: Vec<String> = aggs
            .iter()
            .map(|a| format!("http://{}", a.grpc_addr()))
            .collect();
        let ring = keyring(1, 7);
        let keys = dir.path().join("keys.toml");
        write_keys(&keys, &ring);
        let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut cols = Vec::new();
        for id in ["hot-a", "hot-b"] {
            let mut c = collector_config(dir.path(), id, &keys, unused);
            c.aggregators = endpoints.clone();
            c.forward.hot_fanout = FANOUT;
            cols.push(adclick_collector::start(c).await.unwrap());
        }
        let ad = splittable_ad(&endpoints);
        let s = signer(&ring);
        let p = placement(ad, ADV_A, 1);
        let t0 = now_ms();
        let mint =
            |n: usize| -> Vec<MintedToken> { (0..n).map(|_| s.mint_at(&p, t0).unwrap()).collect() };

        // Warm-up through collector A only, in two rounds, so that A has been told (in an
        // ack) that the ad is hot, while B has never heard from an aggregator.
        let warm1 = mint(120);
        assert_eq!(post(&cols[0], &warm1, now_ms()).await.accepted, 120);
        forwarded(&cols[0], 120).await;
        let warm2 = mint(30);
        assert_eq!(post(&cols[0], &warm2, now_ms()).await.accepted, 30);
        forwarded(&cols[0], 150).await;

        // The same 64 impressions through both collectors.
        let shared = mint(64);
        let ids: HashSet<[u8; 16]> = shared.iter().map(|t| t.impression.impression_id).collect();
        assert_eq!(ids.len(), 64);
        assert_eq!(post(&cols[0], &shared, now_ms()).await.accepted, 64);
        assert_eq!(post(&cols[1], &shared, now_ms()).await.accepted, 64);
        forwarded(&cols[0], 150 + 64).await;
        forwarded(&cols[1], 64).await;

        // Every impression once: 150 warm-up + 64 shared, summed over both shards.
        let range = (minute_of(t0) - 10 * MIN, minute_of(now_ms()) + 10 * MIN);
        let mut total = 0;
        for a in &aggs {
            total += clicks_of(a, ad, range).await;
        }
        let duplicates: u64 = aggs
            .iter()
            .map(|a| a.metrics().clicks_with("duplicate"))
            .sum();
        assert_eq!(
            (total, duplicates),
            (150 + 64, 64),
            "each impression counted once"
        );

        for c in cols {
            c.shutdown().await;
        }
        for a in aggs {
            a.shutdown().await;
        }
    })
    .await;
}
