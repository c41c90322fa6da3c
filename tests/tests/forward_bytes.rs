//! The collector forwards spooled click bytes without decoding them (issue 13): with one
//! aggregator a spool record goes out as it was written; with several, each click's bytes
//! are copied to the shard its `(ad_id, salt)` names. Real collector, real aggregators;
//! the expected per-ad counts and owning shards come from the test's own ledger of what it
//! minted and sent (forged tokens and repeats not counted) and from `Router`, not from the
//! forwarder.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use adclick_collector::routing::Router;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1::{ClickBatchResult, Granularity};
use adclick_sdk::{ImpressionSigner, MintedToken};
use prost::Message;

use crate::support::*;

/// Posts `tokens` as one SDK batch; the collector's verdict.
async fn post(http: SocketAddr, tokens: &[MintedToken]) -> ClickBatchResult {
    let r = http_client()
        .post(format!("http://{http}/v1/clicks"))
        .header("content-type", "application/x-protobuf")
        .body(click_batch(tokens, now_ms()).encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap()
}

/// `shards` aggregators and one collector forwarding to all of them; 12 rounds of clicks
/// over ads 1..=9 (round r: ad a gets (a * r) % 5 + 1 fresh clicks), each round also
/// repeating 3 clicks of the round before and carrying 2 forged tokens. Every ad's count,
/// summed over the shards, equals the ledger, and all of it is on the ad's shard.
async fn counts_match_the_ledger(shards: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut aggs = Vec::new();
    for i in 0..shards {
        let c = aggregator_config(
            &dir.path().join(format!("agg{i}")),
            "127.0.0.1:0".parse().unwrap(),
        );
        aggs.push(adclick_aggregator::start(c).await.unwrap());
    }
    let endpoints: Vec<String> = aggs
        .iter()
        .map(|a| format!("http://{}", a.grpc_addr()))
        .collect();
    let ring = keyring(1, 9);
    let keys = dir.path().join("keys.toml");
    write_keys(&keys, &ring);
    let mut cfg = collector_config(dir.path(), "bytes", &keys, "127.0.0.1:1".parse().unwrap());
    cfg.aggregators = endpoints.clone();
    let col = adclick_collector::start(cfg).await.unwrap();

    let s = signer(&ring);
    let forger = ImpressionSigner::new(Keyring::new(SigningKey::new(1, &[0x77; 32]).unwrap()));
    let t0 = now_ms();
    let mut ledger: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last: Vec<MintedToken> = Vec::new();
    let mut sent_valid = 0u64;
    for round in 1..=12u64 {
        let mut batch = Vec::new();
        for ad in 1..=9u64 {
            for _ in 0..(ad * round) % 5 + 1 {
                batch.push(s.mint_at(&placement(ad, ADV_A, 1), t0).unwrap());
                *ledger.entry(ad).or_default() += 1;
            }
        }
        let fresh = batch.len() as u32;
        sent_valid += u64::from(fresh);
        // Repeats of the previous round (the collector's exact dedup refuses them) and
        // forged tokens (refused at verification): neither is counted.
        batch.extend(last.iter().take(3).cloned());
        for ad in [2u64, 7] {
            batch.push(forger.mint_at(&placement(ad, ADV_A, 1), t0).unwrap());
        }
        let verdict = post(col.http_addr(), &batch).await;
        assert_eq!(verdict.accepted, fresh, "round {round}");
        last = batch[..fresh as usize].to_vec();
    }
    let m = col.metrics().clone();
    assert!(
        eventually(Duration::from_secs(30), || m.forwarded_clicks.get()
            >= sent_valid)
        .await,
        "forwarded {} of {sent_valid}",
        m.forwarded_clicks.get()
    );
    assert_eq!(m.forwarded_clicks.get(), sent_valid);

    let router = Router::new(&endpoints);
    let range = (minute_of(t0) - 10 * MIN, minute_of(now_ms()) + 10 * MIN);
    for (ad, expected) in &ledger {
        let mut per_shard = Vec::new();
        for a in &aggs {
            let r = ad_clicks(a.grpc_addr(), ADMIN, *ad, range, Granularity::Minute, None).await;
            per_shard.push(r.total_clicks);
        }
        let owner = router.shard(*ad, 0);
        let mut want = vec![0u64; shards];
        want[owner] = *expected;
        assert_eq!(per_shard, want, "ad {ad}: clicks per shard");
    }
    col.shutdown().await;
    for a in aggs {
        a.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_gets_spool_records_as_written_and_counts_match() {
    within(Duration::from_secs(120), counts_match_the_ledger(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_get_each_click_by_its_bytes_and_counts_match() {
    within(Duration::from_secs(120), counts_match_the_ledger(3)).await;
}
