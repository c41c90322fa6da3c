//! The aggregator is shut down for 3 s under SDK load and restarted on the same data dir
//! and port: the collector keeps answering the SDK (its spool holds the clicks), forwards
//! the backlog after the restart, and the counts are exact: nothing lost, nothing twice.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_outage_loses_nothing_and_counts_nothing_twice() {
    within(Duration::from_secs(90), scenario()).await;
}

async fn scenario() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 33);
    write_keys(&keys_file, &ring);
    let grpc = free_addr();
    let agg_dir = dir.path().join("aggregator");
    let agg = adclick_aggregator::start(aggregator_config(&agg_dir, grpc))
        .await
        .unwrap();
    let col = adclick_collector::start(collector_config(dir.path(), "edge", &keys_file, grpc))
        .await
        .unwrap();
    let tracker = adclick_sdk::Tracker::builder(format!("http://{}", col.http_addr()))
        .batch_size(10)
        .flush_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let load = SdkLoad::start(
        tracker.clone(),
        load_tokens(&signer(&ring), 5_000, 1, 12),
        Duration::from_millis(4),
    );

    // Some clicks counted before the outage.
    let am = agg.metrics().clone();
    assert!(eventually(Duration::from_secs(20), || am.clicks_with("applied") >= 50).await);
    tokio::time::timeout(Duration::from_secs(10), agg.shutdown())
        .await
        .expect("graceful aggregator shutdown within 10 s");
    let applied_before = am.clicks_with("applied");
    let (clicked_at_stop, sent_at_stop) = (load.clicked(), tracker.stats().sent);
    let errors_at_stop = col.metrics().forward_errors.get();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The SDK kept delivering to the collector, the collector kept failing to forward.
    assert!(load.clicked() > clicked_at_stop + 50);
    assert!(tracker.stats().sent > sent_at_stop);
    assert!(col.metrics().forward_errors.get() > errors_at_stop);
    // A backlog waits in the spool. (Not read from `forward_lag_records`: that gauge is
    // only updated after a successful forward, so it still shows the pre-outage value.)
    let cm = col.metrics();
    assert!(cm.clicks_with("accepted") > cm.forwarded_clicks.get() + 50);

    // Same data dir, same port (the collector knows no other).
    let agg = start_aggregator_on(&agg_dir, grpc).await;
    let clicked_at_restart = load.clicked();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = load.stop().await;
    assert!(
        ledger.unique > clicked_at_restart,
        "load ran after the restart"
    );
    tracker.flush().await.unwrap();
    let s = tracker.stats();
    assert_eq!(
        (s.rejected, s.gave_up, s.dropped_overflow, s.invalid),
        (0, 0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.sent, ledger.unique + ledger.duplicates, "{s:?}");
    assert_eq!(tracker.queued(), 0);

    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let counts = poll_counts(grpc, range, Duration::from_secs(20), |c| {
        *c == ledger.per_ad
    })
    .await;
    assert_eq!(counts, ledger.per_ad, "per-ad counts after the outage");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        top_ads(grpc, ADMIN, 100, range, None).await.unwrap(),
        ranked(&ledger.per_ad, 100),
        "nothing arrives twice later"
    );
    let m = col.metrics();
    assert_eq!(
        (m.clicks_with("accepted"), m.clicks_with("duplicate")),
        (ledger.unique, ledger.duplicates)
    );
    assert!(eventually(Duration::from_secs(5), || m.forward_lag_records.get() == 0).await);
    // The restarted aggregator applied exactly what the first one had not.
    assert_eq!(
        agg.metrics().clicks_with("applied"),
        ledger.unique - applied_before
    );
    eprintln!(
        "aggregator_outage: {} clicks ({} before the outage, {} during it), {} duplicates, in {:?}",
        ledger.unique,
        applied_before,
        clicked_at_restart - clicked_at_stop,
        ledger.duplicates,
        started.elapsed()
    );
    tracker.shutdown().await.unwrap();
    col.shutdown().await;
    agg.shutdown().await;
}

/// Starts an aggregator on `grpc`, retrying while the old socket or store is released.
async fn start_aggregator_on(
    dir: &std::path::Path,
    grpc: std::net::SocketAddr,
) -> adclick_aggregator::Aggregator {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match adclick_aggregator::start(aggregator_config(dir, grpc)).await {
            Ok(a) => return a,
            Err(e) if Instant::now() < deadline => {
                eprintln!("aggregator restart: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("aggregator restart: {e}"),
        }
    }
}
