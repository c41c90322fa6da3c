//! The real `adclick aggregator` process SIGKILLed under load (no final checkpoint: the
//! restart recovers from its last checkpoint plus the WAL) and restarted on the same data
//! dir and port. The collector (pipelined: several batches in flight, acked in any order)
//! keeps retrying; the final counts equal the ledger exactly. A second scenario sends the
//! batches of a pipelined collector deliberately out of order over gRPC, kills the
//! aggregator mid-window and resends: each batch is counted exactly once, and the seqs it
//! acked out of order before the kill are known as acked after the restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::{IngestAck, IngestBatch, IngestClick};
use tonic::transport::Channel;

use crate::support::*;

/// Batches in flight per collector in these scenarios (the default is 8).
const MAX_IN_FLIGHT: usize = 16;

/// Waits until the aggregator answers queries (or `limit`).
async fn wait_queryable(grpc: std::net::SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        // Any valid query will do (the last minute); one that fails validation never
        // answers (a range starting at 1970 did before issue 14).
        let now = now_ms();
        if top_ads(grpc, ADMIN, 1, (now - MIN, now), None)
            .await
            .is_ok()
        {
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
    let mut child = spawn_aggregator(&config, &log, grpc).await;

    let mut col_cfg = collector_config(dir.path(), "edge", &keys_file, grpc);
    col_cfg.forward.max_in_flight = MAX_IN_FLIGHT;
    let col = adclick_collector::start(col_cfg).await.unwrap();
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

    let child = spawn_aggregator(&config, &log, grpc).await;
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

// ---------------------------------------------------------------------------------------
// Out-of-order batches across a SIGKILL

const OOO_COLLECTOR: &str = "edge-ooo-0000000000000001";
const OOO_BATCHES: u64 = 64;
const OOO_CLICKS: u64 = 5;
/// Batches of the window the kill lands in.
const OOO_KILLED_WINDOW: std::ops::RangeInclusive<u64> = 41..=48;

fn ooo_ad(seq: u64) -> u64 {
    3_000 + seq % 11
}

/// Batch `seq`: `OOO_CLICKS` clicks on `ooo_ad(seq)`, impression ids unique to the batch.
fn ooo_clicks(seq: u64, now: i64) -> Vec<IngestClick> {
    (0..OOO_CLICKS)
        .map(|j| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&seq.to_le_bytes());
            id[8..].copy_from_slice(&j.to_le_bytes());
            IngestClick {
                impression_id: id.to_vec(),
                ad_id: ooo_ad(seq),
                advertiser_id: ADV_A,
                campaign_id: 1,
                token_expires_at_ms: now + HOUR,
                event_time_ms: now,
                received_at_ms: now,
                country: "US".into(),
                user_id: format!("u{seq}-{j}"),
                ..Default::default()
            }
        })
        .collect()
}

async fn ingest_client(grpc: std::net::SocketAddr) -> IngestServiceClient<Channel> {
    let ch = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    IngestServiceClient::new(ch)
}

/// Sends one batch; `None` if the call failed.
async fn ooo_send(
    mut c: IngestServiceClient<Channel>,
    seq: u64,
    floor: u64,
    now: i64,
) -> Option<IngestAck> {
    let batch = IngestBatch {
        collector_id: OOO_COLLECTOR.into(),
        seq,
        clicks: ooo_clicks(seq, now),
        acked_floor: floor,
    };
    c.ingest(authed(batch, INGEST_KEY))
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// A fixed scramble of the arrival order within a window: later seqs often land first.
fn scrambled(seq: u64) -> Duration {
    Duration::from_millis((seq * 37 % 8) * 15)
}

/// Sends `seqs` concurrently, each after `delay(seq)`, all with `floor`; returns the acks
/// that came back, counting them in `acked` as they come.
async fn ooo_window(
    c: &IngestServiceClient<Channel>,
    seqs: &[u64],
    floor: u64,
    now: i64,
    delay: fn(u64) -> Duration,
    acked: Arc<AtomicUsize>,
) -> Vec<(u64, IngestAck)> {
    let tasks: Vec<_> = seqs
        .iter()
        .map(|&seq| {
            let c = c.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay(seq)).await;
                let a = ooo_send(c, seq, floor, now).await?;
                acked.fetch_add(1, Ordering::SeqCst);
                Some((seq, a))
            })
        })
        .collect();
    let mut acks = Vec::new();
    for t in tasks {
        if let Some(a) = t.await.unwrap() {
            acks.push(a);
        }
    }
    acks
}

/// [`ooo_window`] with the [`scrambled`] order.
async fn ooo_scrambled(
    c: &IngestServiceClient<Channel>,
    seqs: &[u64],
    floor: u64,
    now: i64,
) -> Vec<(u64, IngestAck)> {
    ooo_window(c, seqs, floor, now, scrambled, Arc::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_aggregator_with_batches_acked_out_of_order_counts_each_once() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(90), out_of_order_scenario()).await;
}

async fn out_of_order_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let grpc = free_addr();
    let config = dir.path().join("aggregator.toml");
    std::fs::write(
        &config,
        aggregator_toml(grpc, &dir.path().join("aggregator")),
    )
    .unwrap();
    let log = dir.path().join("aggregator.log");
    let mut child = spawn_aggregator(&config, &log, grpc).await;
    let now = now_ms();
    let c = ingest_client(grpc).await;

    // Life 1: windows of 8 seqs, each sent concurrently in a scrambled order with the
    // window's first seq as the floor (like a collector with 8 in flight); every window
    // is fully acked before the next starts, with a checkpoint (every 300 ms) between.
    let mut acked_before_kill = BTreeSet::new();
    let windows: Vec<Vec<u64>> = (1..OOO_BATCHES + 1)
        .collect::<Vec<_>>()
        .chunks(8)
        .map(|w| w.to_vec())
        .collect();
    for w in windows.iter().take(5) {
        let acks = ooo_scrambled(&c, w, w[0], now).await;
        assert_eq!(acks.len(), w.len(), "window {w:?}");
        for (seq, a) in acks {
            assert!(!a.already_acked, "seq {seq} new");
            acked_before_kill.insert(seq);
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // The killed window: its batches in flight, scrambled, the first one held back; the
    // kill lands once three of the others are acked (out of order: 41 is not).
    let killed: Vec<u64> = OOO_KILLED_WINDOW.collect();
    let first = *OOO_KILLED_WINDOW.start();
    let acked_count = Arc::new(AtomicUsize::new(0));
    let sends = {
        let c = c.clone();
        let killed = killed.clone();
        let acked_count = acked_count.clone();
        let delay: fn(u64) -> Duration = |seq| {
            if seq == *OOO_KILLED_WINDOW.start() {
                Duration::from_secs(3)
            } else {
                scrambled(seq) * 4
            }
        };
        tokio::spawn(async move { ooo_window(&c, &killed, first, now, delay, acked_count).await })
    };
    assert!(
        eventually(Duration::from_secs(20), || acked_count
            .load(Ordering::SeqCst)
            >= 3)
        .await,
        "acks in the killed window"
    );
    child.assert_running();
    child.kill();
    let acked_in_killed: Vec<u64> = sends.await.unwrap().into_iter().map(|(s, _)| s).collect();
    assert!(
        acked_in_killed.len() >= 3 && !acked_in_killed.contains(&first),
        "acked out of order before the kill: {acked_in_killed:?}"
    );
    acked_before_kill.extend(&acked_in_killed);
    eprintln!("out_of_order: acked in the killed window before the kill: {acked_in_killed:?}");

    // Life 2: restart, then resend like the restarted collector does: everything not
    // seen acked, floor = the lowest of those; the acks it did see come back too (a
    // collector that missed them) and must be known as acked; so must older seqs.
    let child = spawn_aggregator(&config, &log, grpc).await;
    let c = ingest_client(grpc).await;
    let floor = (1..=OOO_BATCHES)
        .find(|s| !acked_before_kill.contains(s))
        .unwrap();
    assert_eq!(floor, first);
    let resend: Vec<u64> = killed.iter().rev().copied().collect();
    let acks = ooo_scrambled(&c, &resend, floor, now).await;
    assert_eq!(acks.len(), resend.len());
    for (seq, a) in acks {
        if acked_before_kill.contains(&seq) {
            assert!(
                a.already_acked,
                "seq {seq}, acked before the kill, is new again"
            );
        }
    }
    for old in [1, 7, 22, 40] {
        let a = ooo_send(c.clone(), old, floor, now).await.unwrap();
        assert!(a.already_acked, "old seq {old} is new again");
    }
    for w in windows.iter().skip(6) {
        let acks = ooo_scrambled(&c, w, w[0], now).await;
        assert_eq!(acks.len(), w.len(), "window {w:?}");
        assert!(acks.iter().all(|(_, a)| !a.already_acked), "{acks:?}");
        // And once more: all already acked.
        let again = ooo_scrambled(&c, w, w[0], now).await;
        assert_eq!(again.len(), w.len(), "window {w:?}");
        assert!(again.iter().all(|(_, a)| a.already_acked), "{again:?}");
    }

    // Every batch counted once: OOO_CLICKS per batch on its ad.
    let mut want: BTreeMap<u64, u64> = BTreeMap::new();
    for seq in 1..=OOO_BATCHES {
        *want.entry(ooo_ad(seq)).or_default() += OOO_CLICKS;
    }
    let range = (now - 10 * MIN, now + 5 * MIN);
    let counts = poll_counts(grpc, range, Duration::from_secs(20), |c| *c == want).await;
    assert_eq!(counts, want, "log:\n{}", child.log_text());
    drop(child);
}

/// Starts the `adclick aggregator` binary and waits until it answers queries.
async fn spawn_aggregator(
    config: &std::path::Path,
    log: &std::path::Path,
    grpc: std::net::SocketAddr,
) -> ChildServer {
    let child = ChildServer::spawn("aggregator", config, log);
    assert!(
        wait_queryable(grpc, Duration::from_secs(20)).await,
        "aggregator did not start; log:\n{}",
        child.log_text()
    );
    child
}
