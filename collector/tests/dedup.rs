//! Deduplication at the edge: a saturated Bloom filter costs lookups, never a valid click.

use adclick_proto::v1::ClickBatch;
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{keyring, signer, write_keys};
use adclick_test_support::fake_aggregator::fake_aggregator;

use crate::util::*;

/// With a tiny, saturated Bloom filter almost every new click is a Bloom positive; the
/// exact check still accepts every valid click and drops only real duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bloom_false_positives_never_lose_a_valid_click() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let mut cfg = config(dir.path(), vec![agg.url()]);
    cfg.dedup.expected_clicks = 1; // clamped to the smallest filter: saturates at once
    cfg.dedup.false_positive_rate = 0.4;
    // 3,060 clicks from one address in a moment: above the default per-IP click rate.
    cfg.limits.rate_limit_per_ip = 0.0;
    let col = adclick_collector::start(cfg).await.unwrap();
    let s = signer(&ring);
    let minted: Vec<_> = (0..3000).map(|i| s.mint(&ad(i % 50)).unwrap()).collect();
    let c = http();
    for chunk in minted.chunks(500) {
        let mut clicks: Vec<_> = chunk.iter().map(|m| click(&m.token)).collect();
        clicks.extend(chunk.iter().take(10).map(|m| click(&m.token)));
        let r = post_proto(
            &c,
            &col,
            &ClickBatch {
                clicks,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(r.status(), 202);
    }
    let applied = agg.wait_applied(3000).await;
    assert_eq!(applied.len(), 3000);
    let m = col.metrics();
    assert_eq!(
        (m.clicks_with("accepted"), m.clicks_with("duplicate")),
        (3000, 60)
    );
    assert!(
        m.dedup_suspect.get() > 500,
        "the filter did produce false positives: {}",
        m.dedup_suspect.get()
    );
    col.shutdown().await;
    agg.stop().await;
}
