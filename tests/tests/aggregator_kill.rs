//! The real `adclick aggregator` process SIGKILLed under load (no final checkpoint: the
//! restart recovers from its last checkpoint plus the WAL) and restarted on the same data
//! dir and port. The collector keeps retrying; the final counts equal the ledger exactly.

use std::time::{Duration, Instant};

use crate::support::*;

/// Waits until the aggregator answers queries (or `limit`).
async fn wait_queryable(grpc: std::net::SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if top_ads(grpc, ADMIN, 1, (0, MIN), None).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_aggregator_recovers_exact_counts() {
    // Build (or find) the binary before the clock starts.
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(90), scenario()).await;
}

async fn scenario() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 44);
    write_keys(&keys_file, &ring);
    let grpc = free_addr();
    let config = dir.path().join("aggregator.toml");
    std::fs::write(
        &config,
        aggregator_toml(grpc, &dir.path().join("aggregator")),
    )
    .unwrap();
    let log = dir.path().join("aggregator.log");
    let mut child = ChildServer::spawn("aggregator", &config, &log);
    assert!(
        wait_queryable(grpc, Duration::from_secs(20)).await,
        "aggregator did not start; log:\n{}",
        child.log_text()
    );

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

    // Kill once clicks are flowing through to the aggregator, and a checkpoint
    // (every 300 ms) has likely been taken, so recovery = checkpoint + WAL replay.
    let m = col.metrics().clone();
    assert!(eventually(Duration::from_secs(20), || m.forwarded_clicks.get() >= 100).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    child.assert_running();
    child.kill();
    let forwarded_at_kill = m.forwarded_clicks.get();
    let errors_at_kill = m.forward_errors.get();
    let clicked_at_kill = load.clicked();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        m.forward_errors.get() > errors_at_kill,
        "the collector saw the aggregator die"
    );
    assert!(load.clicked() > clicked_at_kill + 50, "load continued");

    let child = ChildServer::spawn("aggregator", &config, &log);
    assert!(
        wait_queryable(grpc, Duration::from_secs(20)).await,
        "aggregator did not restart; log:\n{}",
        child.log_text()
    );
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
        (s.rejected, s.gave_up, s.dropped_overflow),
        (0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.sent, ledger.unique + ledger.duplicates);

    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let counts = poll_counts(grpc, range, Duration::from_secs(20), |c| {
        *c == ledger.per_ad
    })
    .await;
    assert_eq!(
        counts,
        ledger.per_ad,
        "per-ad counts after the crash; log:\n{}",
        child.log_text()
    );
    assert!(eventually(Duration::from_secs(5), || m.forward_lag_records.get() == 0).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        top_ads(grpc, ADMIN, 100, range, None).await.unwrap(),
        ranked(&ledger.per_ad, 100),
        "nothing arrives twice later"
    );
    assert_eq!(
        (m.clicks_with("accepted"), m.clicks_with("duplicate")),
        (ledger.unique, ledger.duplicates)
    );
    assert!(m.forwarded_clicks.get() >= ledger.unique);
    eprintln!(
        "aggregator_kill: {} clicks ({forwarded_at_kill} forwarded before the kill), {} \
         duplicates, {} forwarded in all (redeliveries included), in {:?}",
        ledger.unique,
        ledger.duplicates,
        m.forwarded_clicks.get(),
        started.elapsed()
    );
    tracker.shutdown().await.unwrap();
    col.shutdown().await;
    drop(child);
}
