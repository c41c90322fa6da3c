//! Crashes: the aggregator dropped without shutdown at several points (one mid-checkpoint)
//! and restarted on the same directory counts exactly what a run without crashes counts.

use adclick_aggregator::Aggregator;
use adclick_proto::v1::{Granularity, IngestClick};
use adclick_test_support::aggregator::{ADMIN, T0, start_retrying};
use adclick_test_support::common::MIN;

use crate::util::*;

/// Drop the aggregator without shutdown at several points (one of them in the middle of a
/// checkpoint), restart on the same directory, re-send every batch: the counts equal those
/// of a run without crashes.
#[test]
fn crash_restart_and_replay_gives_exactly_the_uncrashed_counts() {
    let batches: Vec<Vec<IngestClick>> =
        (0..12).map(|i| clicks(100 + i, 400, 40, 30, 100)).collect();
    let mut unique: Vec<IngestClick> = batches.iter().flatten().cloned().collect();
    unique.sort_by_key(|c| c.impression_id.clone());
    unique.dedup_by_key(|c| c.impression_id.clone());

    let snapshot = |rt: &tokio::runtime::Runtime, a: &Aggregator| {
        rt.block_on(async {
            let (_, mut q) = clients(a).await;
            let mut out = Vec::new();
            for ad in 1..=40u64 {
                let r = ad_clicks(&mut q, ADMIN, ad, Granularity::Minute, None).await;
                out.push(
                    r.buckets
                        .iter()
                        .map(|b| (b.start_ms, b.clicks, b.unique_users))
                        .collect::<Vec<_>>(),
                );
            }
            (out, top(&mut q, ADMIN, 15, T0, T0 + 30 * MIN, None).await)
        })
    };

    // Reference run, no crash.
    let ref_dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt
        .block_on(adclick_aggregator::start(config(ref_dir.path())))
        .unwrap();
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in batches.iter().enumerate() {
            send(&mut ing, "c", i as u64 + 1, b.clone()).await;
        }
    });
    let reference = snapshot(&rt, &a);
    assert_eq!(
        reference.1,
        top_oracle(&unique, 15, T0, T0 + 30 * MIN, |_| true)
    );
    rt.block_on(a.shutdown());

    // Crashing runs on one directory: crash after k batches, sometimes mid-checkpoint.
    let dir = tempfile::tempdir().unwrap();
    for (round, (k, fail_cp)) in [(3, None), (5, Some(1)), (8, Some(2)), (12, None)]
        .into_iter()
        .enumerate()
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut cfg = config(dir.path());
        cfg.checkpoint.interval_ms = 1; // checkpoint after every group
        let a = rt.block_on(start_retrying(cfg, fail_cp));
        rt.block_on(async {
            let (mut ing, _) = clients(&a).await;
            // Everything from the start is re-sent: what was acked before must be a no-op.
            for (i, b) in batches.iter().enumerate().take(k) {
                send(&mut ing, "c", i as u64 + 1, b.clone()).await;
            }
        });
        a.kill();
        rt.shutdown_background();
        let _ = round;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(config(dir.path()), None));
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in batches.iter().enumerate() {
            let ack = send(&mut ing, "c", i as u64 + 1, b.clone()).await;
            assert!(
                ack.already_acked,
                "batch {} was acked before the crashes",
                i + 1
            );
        }
    });
    let got = snapshot(&rt, &a);
    for (ad, (g, r)) in got.0.iter().zip(&reference.0).enumerate() {
        assert_eq!(
            g,
            r,
            "ad {}: per-minute (start, clicks, unique users) differ",
            ad + 1
        );
    }
    assert_eq!(got.1, reference.1, "TopAds differ");
    rt.block_on(a.shutdown());
}

/// A checkpoint started after the last batch is saved while the aggregator stays idle (its
/// encoding ends on a thread; the writer looks for that end instead of waiting for the next
/// batch), so an idle aggregator does not keep its WAL untrimmed until traffic resumes.
#[test]
fn an_idle_aggregator_saves_the_checkpoint_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Due after every batch (the writer's tick is 10 ms at least).
    cfg.checkpoint.interval_ms = 1;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(cfg, None));
    let saved = |a: &Aggregator| {
        a.metrics()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("adclick_aggregator_checkpoint_seconds_count "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        // Past the first tick, then one batch: a checkpoint is due right after it. (Counted
        // before the batch: its checkpoint may be saved before the ack is read.)
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let before = saved(&a);
        send(&mut ing, "c", 1, clicks(7, 200, 10, 3, 20)).await;
        // No other batch: the checkpoint started after it must still be saved.
        let start = std::time::Instant::now();
        while saved(&a) <= before {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the checkpoint started after the last batch was not saved within 10 s of idleness ({before} saved)"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    rt.block_on(a.shutdown());
}
