//! Pipelined forwarding: several records in flight, acks coming back out of order. The
//! spool is truncated only up to the contiguous acked point (a restart resends exactly the
//! records above it), every batch carries the floor of what its shard acked, and every
//! click is applied once.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use adclick_proto::v1::ClickBatch;
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{eventually, keyring, signer, write_keys};
use adclick_test_support::fake_aggregator::fake_aggregator;

use crate::util::*;

/// Records 1..=6 go out while the ack of record 3 is held back: 4, 5 and 6 are acked
/// before it, yet the spool keeps 3..=6 (lag 4). A restart in that state resends exactly
/// 3..=6 (they were not truncated) and the aggregator takes them for redeliveries; once 3
/// is acked the spool drains, and no click was applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_truncate_the_spool_only_at_the_contiguous_point() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    agg.agg.hold.lock().unwrap().insert(3);
    let mut cfg = config(dir.path(), vec![agg.url()]);
    cfg.forward.max_in_flight = 8;
    // Longer than the hold: the held batch is not retried meanwhile.
    cfg.forward.request_timeout_ms = 30_000;
    let col = adclick_collector::start(cfg.clone()).await.unwrap();
    let s = signer(&ring);
    let c = http();
    // One request at a time: one spool record each, seqs 1..=6.
    let mut ids = Vec::new();
    for r in 0..6u64 {
        let minted: Vec<_> = (0..5).map(|i| s.mint(&ad(r * 10 + i)).unwrap()).collect();
        let resp = post_proto(
            &c,
            &col,
            &ClickBatch {
                clicks: minted.iter().map(|m| click(&m.token)).collect(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(resp.status(), 202);
        ids.extend(minted.iter().map(id_of));
    }
    let m = col.metrics().clone();
    // Everything applied; 1, 2, 4, 5, 6 acked; the spool still holds 3..=6.
    assert!(eventually(POLL_LIMIT, || agg.applied().len() == 30).await);
    assert!(
        eventually(POLL_LIMIT, || m.forwarded_batches.get() == 5).await,
        "acks of 1, 2, 4, 5, 6: {}",
        m.forwarded_batches.get()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.forwarded_batches.get(), 5, "3 is still held");
    assert_eq!(
        m.forward_lag_records.get(),
        4,
        "truncated at 2, not past the hole"
    );
    {
        let st = agg.agg.state.lock().unwrap();
        let seqs: BTreeSet<u64> = st.batches.iter().map(|b| b.seq).collect();
        assert_eq!(seqs, (1..=6).collect(), "six records in flight at once");
        // Each batch names the lowest seq not yet seen acked: 4..=6 went out while 3 was
        // unacked, so their floor is at most 3.
        for b in &st.batches {
            assert!(b.acked_floor >= 1 && b.acked_floor <= b.seq, "{b:?}");
            if b.seq > 3 {
                assert!(b.acked_floor <= 3, "seq {} floor {}", b.seq, b.acked_floor);
            }
        }
        assert_eq!(st.redeliveries, 0);
    }
    // Stop with 3 unacked; the spool on disk must still hold 3..=6.
    col.shutdown().await;
    let before_restart = agg.agg.state.lock().unwrap().batches.len();
    let col = adclick_collector::start(cfg).await.unwrap();
    assert!(
        eventually(POLL_LIMIT, || agg.agg.state.lock().unwrap().redeliveries
            >= 3)
        .await,
        "the restart resends what was not truncated"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resent: Vec<(u64, u64)> = agg.agg.state.lock().unwrap().batches[before_restart..]
        .iter()
        .map(|b| (b.seq, b.acked_floor))
        .collect();
    let resent_seqs: BTreeSet<u64> = resent.iter().map(|(s, _)| *s).collect();
    assert_eq!(resent_seqs, (3..=6).collect(), "resent {resent:?}");
    // The restarted collector knows only its spool: its first floor is 3.
    assert!(resent.iter().all(|(_, f)| *f == 3), "{resent:?}");
    let m = col.metrics().clone();
    assert_eq!(m.forward_lag_records.get(), 4);
    agg.agg.release(3);
    assert!(
        eventually(POLL_LIMIT, || m.forward_lag_records.get() == 0).await,
        "drained once 3 is acked: lag {}",
        m.forward_lag_records.get()
    );
    {
        let st = agg.agg.state.lock().unwrap();
        assert_eq!(st.duplicates, 0, "no click applied twice");
        assert_eq!(
            st.applied.keys().cloned().collect::<HashSet<_>>(),
            ids.into_iter().collect()
        );
        assert_eq!(st.floor.get(&st.batches[0].collector_id), Some(&7));
    }
    col.shutdown().await;
    agg.stop().await;
}

/// `max_in_flight = 1` still forwards one record at a time, in order, and every batch's
/// floor is its own seq (nothing below it is unacked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_one_sends_in_order() {
    let Started {
        dir: _dir,
        ring,
        agg,
        col,
    } = started(|cfg| cfg.forward.max_in_flight = 1).await;
    let s = signer(&ring);
    let c = http();
    for r in 0..5u64 {
        let m = s.mint(&ad(r)).unwrap();
        post_click(&c, &col, &m.token).await;
    }
    assert!(eventually(POLL_LIMIT, || agg.applied().len() == 5).await);
    let m = col.metrics().clone();
    assert!(eventually(POLL_LIMIT, || m.forward_lag_records.get() == 0).await);
    let seen: Vec<(u64, u64)> = agg
        .agg
        .state
        .lock()
        .unwrap()
        .batches
        .iter()
        .map(|b| (b.seq, b.acked_floor))
        .collect();
    assert_eq!(seen, (1..=5).map(|s| (s, s)).collect::<Vec<_>>());
    col.shutdown().await;
    agg.stop().await;
}
