//! From the spool to the aggregators: routing by ad and hot-ad fan-out across shards, an
//! aggregator outage, a full spool, and a crash mid-stream; every acked click is forwarded
//! exactly once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use adclick_proto::v1::{ClickBatch, ClickBatchResult};
use adclick_sdk::{Dimensions, RetryPolicy, Tracker};
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{eventually, free_addr, keyring, signer, write_keys};
use adclick_test_support::fake_aggregator::{FakeAggregator, fake_aggregator, fake_aggregator_on};
use prost::Message;

use crate::util::*;

/// Several aggregators: each click goes to exactly one shard, ads stay on their shard,
/// and an ad reported hot is spread over salted keys (and so over shards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_ad_and_fans_out_hot_ads() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let a = fake_aggregator().await;
    let b = fake_aggregator().await;
    *a.agg.hot.lock().unwrap() = vec![42];
    *b.agg.hot.lock().unwrap() = vec![42];
    let mut cfg = config(dir.path(), vec![a.url(), b.url()]);
    cfg.forward.hot_fanout = 8;
    let col = adclick_collector::start(cfg).await.unwrap();
    let s = signer(&ring);
    let c = http();
    // Round 1: ordinary traffic (the acks teach the collector that ad 42 is hot).
    let first: Vec<_> = (0..200).map(|i| s.mint(&ad(i % 20)).unwrap()).collect();
    post_proto(
        &c,
        &col,
        &ClickBatch {
            clicks: first.iter().map(|m| click(&m.token)).collect(),
            ..Default::default()
        },
    )
    .await;
    let total = || a.applied().len() + b.applied().len();
    assert!(eventually(POLL_LIMIT, || total() == 200).await);
    // The aggregators applied round 1 before the collector read their acks: wait until it
    // has (it counts a click forwarded after taking the ack's hot ads), or round 2 may be
    // routed before it knows ad 42 is hot.
    let m = col.metrics().clone();
    assert!(eventually(POLL_LIMIT, || m.forwarded_clicks.get() == 200).await);
    // Round 2: ad 42 only.
    let hot: Vec<_> = (0..400).map(|_| s.mint(&ad(42)).unwrap()).collect();
    post_proto(
        &c,
        &col,
        &ClickBatch {
            clicks: hot.iter().map(|m| click(&m.token)).collect(),
            ..Default::default()
        },
    )
    .await;
    assert!(eventually(POLL_LIMIT, || total() == 600).await);

    let (aa, bb) = (a.applied(), b.applied());
    assert!(
        aa.keys().all(|k| !bb.contains_key(k)),
        "no click on two shards"
    );
    for ad_id in 0..20u64 {
        let on_a = aa.values().any(|c| c.ad_id == ad_id && c.salt == 0);
        let on_b = bb.values().any(|c| c.ad_id == ad_id && c.salt == 0);
        assert!(!(on_a && on_b), "unsalted ad {ad_id} split across shards");
    }
    let hot_ids: HashSet<Vec<u8>> = hot.iter().map(id_of).collect();
    let salts: HashSet<u32> = aa
        .values()
        .chain(bb.values())
        .filter(|c| hot_ids.contains(&c.impression_id))
        .map(|c| c.salt)
        .collect();
    assert_eq!(salts, (1..=8).collect(), "hot ad spread over every salt");
    let hot_on_a = aa.keys().filter(|k| hot_ids.contains(*k)).count();
    assert!(
        hot_on_a > 0 && hot_on_a < 400,
        "hot ad spread over both shards: {hot_on_a} on a"
    );
    col.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// The aggregator is unreachable while clicks arrive: the SDK still gets 202s (the
/// spool has them) and everything is forwarded exactly once when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_outage_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_addr = free_addr();
    let col = adclick_collector::start(config(dir.path(), vec![format!("http://{agg_addr}")]))
        .await
        .unwrap();
    let s = signer(&ring);
    let tracker = Tracker::builder(format!("http://{}", col.http_addr()))
        .batch_size(25)
        .retry_policy(RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        })
        .build()
        .unwrap();
    let minted: Vec<_> = (0..200).map(|i| s.mint(&ad(i % 7)).unwrap()).collect();
    for m in &minted {
        tracker.click(&m.token, Dimensions::new()).unwrap();
    }
    tracker.flush().await.unwrap();
    assert_eq!(tracker.stats().sent, 200, "the SDK saw no errors");
    let m = col.metrics().clone();
    assert!(
        eventually(POLL_LIMIT, || m.forward_errors.get() >= 3).await,
        "the forwarder kept retrying"
    );
    assert_eq!(m.forwarded_clicks.get(), 0);

    let agg = fake_aggregator_on(agg_addr, FakeAggregator::default()).await;
    let applied = agg.wait_applied(200).await;
    assert_eq!(
        applied.keys().cloned().collect::<HashSet<_>>(),
        minted.iter().map(id_of).collect()
    );
    assert!(
        eventually(POLL_LIMIT, || m.forwarded_clicks.get() == 200
            && m.forward_lag_records.get() == 0)
        .await
    );
    assert_eq!(agg.agg.state.lock().unwrap().duplicates, 0);
    col.shutdown().await;
    agg.stop().await;
}

/// A full spool answers 503 + Retry-After and counts nothing; once the aggregator drains
/// it, the client's retry of the refused batch is accepted (not taken for duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_answers_503_and_the_retry_is_accepted_later() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_addr = free_addr();
    let mut cfg = config(dir.path(), vec![format!("http://{agg_addr}")]);
    cfg.spool.segment_bytes = 4096;
    cfg.spool.max_bytes = 8192;
    let col = adclick_collector::start(cfg).await.unwrap();
    let c = http();
    let s = signer(&ring);
    let mut accepted_ids = Vec::new();
    let mut refused = None;
    for _ in 0..20 {
        let minted: Vec<_> = (0..10).map(|i| s.mint(&ad(i)).unwrap()).collect();
        let batch = ClickBatch {
            clicks: minted.iter().map(|m| click(&m.token)).collect(),
            ..Default::default()
        };
        let r = post_proto(&c, &col, &batch).await;
        if r.status() == 503 {
            assert_eq!(r.headers()["retry-after"], "5");
            assert!(r.text().await.unwrap().contains("spool full"));
            refused = Some((batch, minted));
            break;
        }
        assert_eq!(r.status(), 202);
        accepted_ids.extend(minted.iter().map(id_of));
    }
    let (batch, minted) = refused.expect("the 8 KiB spool filled up");
    let m = col.metrics().clone();
    assert_eq!(m.clicks_with("accepted"), accepted_ids.len() as u64);
    assert_eq!(m.clicks_with("spool_unavailable"), 10);

    let agg = fake_aggregator_on(agg_addr, FakeAggregator::default()).await;
    agg.wait_applied(accepted_ids.len()).await;
    assert!(eventually(POLL_LIMIT, || m.forward_lag_records.get() == 0).await);
    let r = post_proto(&c, &col, &batch).await;
    assert_eq!(r.status(), 202);
    let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (res.accepted, res.duplicate),
        (10, 0),
        "refused clicks were released from dedup"
    );
    accepted_ids.extend(minted.iter().map(id_of));
    let applied = agg.wait_applied(accepted_ids.len()).await;
    assert_eq!(
        applied.keys().cloned().collect::<HashSet<_>>(),
        accepted_ids.into_iter().collect()
    );
    col.shutdown().await;
    agg.stop().await;
}

/// Kill the collector's runtime mid-stream (no graceful shutdown), restart on the same
/// spool: every click that got a 202 is forwarded exactly once.
#[test]
fn crash_mid_stream_then_restart_forwards_every_acked_click_once() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_rt = tokio::runtime::Runtime::new().unwrap();
    let agg = agg_rt.block_on(fake_aggregator());
    let mut cfg = config(dir.path(), vec![agg.url()]);
    // 4,000 clicks from one address at once: above the default per-IP click rate.
    cfg.limits.rate_limit_per_ip = 0.0;
    let s = signer(&ring);
    let minted: Vec<_> = (0..4000).map(|i| s.mint(&ad(i % 13)).unwrap()).collect();

    // Run 1: clients post batches concurrently; the runtime is dropped while they run.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let col = rt.block_on(adclick_collector::start(cfg.clone())).unwrap();
    let url = format!("http://{}/v1/clicks", col.http_addr());
    let acked = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let client_rt = tokio::runtime::Runtime::new().unwrap();
    let senders: Vec<_> = minted
        .chunks(20)
        .map(|chunk| {
            let url = url.clone();
            let acked = acked.clone();
            let body = ClickBatch {
                clicks: chunk.iter().map(|m| click(&m.token)).collect(),
                ..Default::default()
            }
            .encode_to_vec();
            let ids: Vec<Vec<u8>> = chunk.iter().map(id_of).collect();
            client_rt.spawn(async move {
                tokio::time::sleep(Duration::from_millis(fastrand_ms())).await;
                let r = http()
                    .post(url)
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status() == 202) {
                    acked.lock().unwrap().extend(ids);
                }
            })
        })
        .collect();
    // Crash once the first 202s are in (a fixed sleep raced them on a loaded machine):
    // the senders are spread over 300 ms, so most are still on their way.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // No graceful shutdown: the runtime and every task on it just die.
    rt.shutdown_background();
    drop(col);
    client_rt.block_on(async {
        for s in senders {
            let _ = s.await;
        }
    });
    let acked: Vec<Vec<u8>> = acked.lock().unwrap().clone();
    assert!(
        !acked.is_empty() && acked.len() < 4000,
        "the crash happened mid-stream: {} acked",
        acked.len()
    );

    // Run 2: same directory.
    let rt2 = tokio::runtime::Runtime::new().unwrap();
    let col2 = rt2.block_on(async {
        // The dying runtime's writer thread holds the directory until its last write ends.
        let mut last = None;
        for _ in 0..200 {
            match adclick_collector::start(cfg.clone()).await {
                Ok(c) => return c,
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("restart failed: {last:?}")
    });
    let applied = agg_rt.block_on(agg.wait_applied(acked.len()));
    agg_rt.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
    // Every acked click reached the aggregator and was applied there exactly once (the
    // fake aggregator, like the real one, applies by impression id). A resend after the
    // crash may group records differently and repeat clicks the aggregator already has;
    // its exact dedup drops them, and they are at most the clicks of one unacked group.
    let state = agg.agg.state.lock().unwrap();
    for id in &acked {
        assert!(applied.contains_key(id), "an acked click was lost");
    }
    assert!(state.applied.len() <= 4000);
    assert!(
        state.duplicates <= 16 * 20 * 20,
        "re-sent clicks: {}",
        state.duplicates
    );
    drop(state);
    rt2.block_on(col2.shutdown());
}

fn fastrand_ms() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() % 300
}

/// A shard that owns none of the traffic still hears from the collector: after
/// `forward.heartbeat_records` records without clicks for it, an empty batch carries the
/// current seq, so its high-water mark never falls behind by more than that (aggregators
/// refuse a seq that jumps more than `ingest.max_seq_jump` past the mark, which would
/// otherwise wedge forwarding for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_shard_gets_heartbeats_that_keep_its_seq_mark_close() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let a = fake_aggregator().await;
    let b = fake_aggregator().await;
    let endpoints = vec![a.url(), b.url()];
    let mut cfg = config(dir.path(), endpoints.clone());
    cfg.forward.heartbeat_records = 4;
    let col = adclick_collector::start(cfg).await.unwrap();
    // Ads owned by shard 0 (a) only.
    let router = adclick_collector::routing::Router::new(&endpoints);
    let ads: Vec<u64> = (1..1000u64)
        .filter(|&x| router.shard(x, 0) == 0)
        .take(12)
        .collect();
    assert_eq!(ads.len(), 12);
    let s = signer(&ring);
    let c = http();
    // 12 requests one after another: 12 spool records, every click for shard a.
    for ad_id in &ads {
        let m = s.mint(&ad(*ad_id)).unwrap();
        post_click(&c, &col, &m.token).await;
    }
    assert!(eventually(POLL_LIMIT, || a.applied().len() == 12).await);
    assert!(
        eventually(POLL_LIMIT, || b.agg.state.lock().unwrap().batches.len()
            >= 3)
        .await
    );
    let seen = b.agg.state.lock().unwrap().batches.clone();
    assert!(seen.iter().all(|x| x.clicks.is_empty()), "b owns no clicks");
    let seqs: Vec<u64> = seen.iter().map(|x| x.seq).collect();
    // Records 1..=12; b hears seq 4, 8, 12 (every 4 records without clicks for it).
    assert_eq!(seqs, vec![4, 8, 12]);
    col.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// A durable record that reads back damaged while the collector runs (bit rot after it
/// was written) does not stop forwarding: the forwarder asks for a spool reopen, recovery
/// isolates the damaged record (logged, counted, a tombstone takes its seq), and every
/// other acked click is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_while_forwarding_is_isolated_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_addr = free_addr();
    let mut cfg = config(dir.path(), vec![format!("http://{agg_addr}")]);
    // The forwarder reads a record from disk when it enters the window: with two in
    // flight (1 and 2, retried while the aggregator is down), record 3 is read only after
    // the damage below.
    cfg.forward.max_in_flight = 2;
    let spool_dir = cfg.data_dir.join("spool");
    let col = adclick_collector::start(cfg).await.unwrap();
    let s = signer(&ring);
    let c = http();
    // Five records while the aggregator is down; remember each record's impression ids.
    let mut per_record: Vec<Vec<Vec<u8>>> = Vec::new();
    for r in 0..5u64 {
        let minted: Vec<_> = (0..4).map(|i| s.mint(&ad(r * 10 + i)).unwrap()).collect();
        post_proto(
            &c,
            &col,
            &ClickBatch {
                clicks: minted.iter().map(|m| click(&m.token)).collect(),
                ..Default::default()
            },
        )
        .await;
        per_record.push(
            minted
                .iter()
                .map(|m| m.impression.impression_id.to_vec())
                .collect(),
        );
    }
    // Flip a byte in the middle of record 3 (the file holds records 1..=5 in order; each
    // record's length is in its first 4 bytes, the header is 24 bytes).
    let seg = std::fs::read_dir(&spool_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mut off = 0usize;
    for _ in 0..2 {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        off += 24 + len;
    }
    let len3 = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
    bytes[off + 24 + len3 / 2] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();

    let agg = fake_aggregator_on(agg_addr, FakeAggregator::default()).await;
    let want: HashSet<Vec<u8>> = per_record
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .flat_map(|(_, ids)| ids.iter().cloned())
        .collect();
    assert!(
        eventually(POLL_LIMIT, || agg.applied().len() == want.len()).await,
        "forwarded {} of {}",
        agg.applied().len(),
        want.len()
    );
    let got: HashSet<Vec<u8>> = agg.applied().keys().cloned().collect();
    assert_eq!(got, want);
    let text = col.metrics().render();
    assert!(
        text.lines()
            .any(|l| l == "adclick_collector_spool_corrupt_records_total 1"),
        "{text}"
    );
    col.shutdown().await;
    agg.stop().await;
}
