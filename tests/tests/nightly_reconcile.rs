//! The aggregator's own nightly reconciliation (`[reconcile] nightly = true`), on a real
//! archive, driven by the config's clock offset (the schedule believes it is 03:00 UTC
//! tomorrow, so today is due) rather than by waiting for a day:
//! - report only (the default): one run, the metrics say what it found (minute and day
//!   cells compared, differing, clicks off, `runs_total{result="differing"}`, on `/metrics`
//!   too), the report next to the data names exactly the damaged cells, and the counts are
//!   left alone;
//! - with the state file removed and `auto_repair = true`: the run repairs them
//!   (`result="repaired"`) and every cell equals the oracle computed from the clicks sent.

use std::collections::BTreeSet;
use std::time::Duration;

use adclick_aggregator::nightly::{LevelLabel, ResultLabel};
use adclick_proto::v1::IngestClick;

use crate::repair::{Oracle, assert_oracle, click, expected, ingest, record};
use crate::support::*;

fn gauge(a: &adclick_aggregator::Aggregator, f: &str, level: &'static str) -> i64 {
    let m = &a.metrics().reconcile;
    let fam = match f {
        "compared" => &m.cells_compared,
        "differing" => &m.cells_differing,
        _ => &m.clicks_off,
    };
    fam.get_or_create(&LevelLabel { level }).get()
}

fn runs(a: &adclick_aggregator::Aggregator, result: &'static str) -> u64 {
    a.metrics()
        .reconcile
        .runs
        .get_or_create(&ResultLabel { result })
        .get()
}

async fn until_run(a: &adclick_aggregator::Aggregator, result: &'static str) {
    while runs(a, result) == 0 {
        assert_eq!(runs(a, "failed"), 0, "a nightly run failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nightly_reconcile_reports_then_repairs_when_asked() {
    within(Duration::from_secs(120), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agg");
    let mut cfg = aggregator_config(&data, "127.0.0.1:0".parse().unwrap());
    cfg.archive.enabled = true;
    cfg.archive.writer_id = "night".into();
    cfg.archive.dir = dir.path().join("archive");
    cfg.checkpoint.interval_ms = 3_600_000;
    let now = now_ms();
    let day_start = scenario_day(now);
    let day =
        humantime::format_rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(day_start as u64))
            .to_string()[..10]
            .to_string();

    // 4 ads, 2 clicks per (ad, minute) over the last minutes of the day (up to now).
    let end = day_end_minute(now, day_start);
    let minutes = (end - day_start / 60_000 - 1).clamp(1, 20);
    let ads: Vec<u64> = (1..=4).collect();
    let mut oracle = Oracle::new();
    let mut batch: Vec<IngestClick> = Vec::new();
    let mut id = 1_000_000u64;
    for ad in &ads {
        for m in 0..minutes {
            let start = (end - 1 - m) * 60_000;
            for k in 0..2 {
                id += 1;
                batch.push(click(
                    id,
                    *ad,
                    start + 10_000 * k,
                    &format!("n{}", id % 7),
                    now,
                ));
            }
        }
    }
    for c in &batch {
        record(&mut oracle, c);
    }
    let a = adclick_aggregator::start(cfg.clone()).await.unwrap();
    ingest(a.grpc_addr(), 1, batch).await;
    a.shutdown().await;

    // Damage two cells (checkpointed), in a life without the schedule.
    let a = adclick_aggregator::start(cfg.clone()).await.unwrap();
    let k1 = *oracle.keys().next().unwrap();
    let k2 = *oracle.keys().last().unwrap();
    assert_ne!(k1.0, k2.0);
    assert_eq!(
        a.damage_for_test(vec![(k1.0, k1.1, 4), (k2.0, k2.1, -1)])
            .await,
        2
    );
    a.shutdown().await;

    // The schedule believes it is 03:00 UTC tomorrow: today is due (after_hour_utc = 2).
    let mut night = cfg.clone();
    night.reconcile.nightly = true;
    night.reconcile.check_interval_ms = 100;
    night.reconcile.clock_offset_ms = day_start + 86_400_000 + 3 * 3_600_000 - now;
    let a = adclick_aggregator::start(night.clone()).await.unwrap();
    until_run(&a, "differing").await;
    let (minute_cells, day_cells) = expected(&oracle, day_start);
    assert_eq!(gauge(&a, "compared", "minute"), minute_cells.len() as i64);
    assert_eq!(gauge(&a, "differing", "minute"), 2);
    assert_eq!(gauge(&a, "off", "minute"), 5);
    assert_eq!(gauge(&a, "compared", "day"), day_cells.len() as i64);
    assert_eq!(gauge(&a, "differing", "day"), 2);
    assert_eq!(gauge(&a, "off", "day"), 5);
    assert_eq!(
        a.metrics().reconcile.last_day_seconds.get(),
        day_start / 1000
    );
    assert!(a.metrics().reconcile.last_run_seconds.get() > 0);
    let text = http_client()
        .get(format!("http://{}/metrics", a.http_addr()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l == "adclick_aggregator_reconcile_runs_total{result=\"differing\"} 1"),
        "{text}"
    );
    let report =
        std::fs::read_to_string(data.join("reconcile").join(format!("{day}.jsonl"))).unwrap();
    let got: BTreeSet<(String, u64, i64, u64, u64)> = report
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            (
                v["level"].as_str().unwrap().to_string(),
                v["ad_id"].as_u64().unwrap(),
                v["start_ms"].as_i64().unwrap(),
                v["archive_clicks"].as_u64().unwrap(),
                v["aggregator_clicks"].as_u64().unwrap(),
            )
        })
        .collect();
    let n = |k: &(u64, i64)| oracle[k].0.len() as u64;
    let day_of = |ad: u64| day_cells[&(ad, day_start)].0;
    let want: BTreeSet<(String, u64, i64, u64, u64)> = [
        ("minute".to_string(), k1.0, k1.1, n(&k1), n(&k1) + 4),
        ("minute".to_string(), k2.0, k2.1, n(&k2), n(&k2) - 1),
        (
            "day".to_string(),
            k1.0,
            day_start,
            day_of(k1.0),
            day_of(k1.0) + 4,
        ),
        (
            "day".to_string(),
            k2.0,
            day_start,
            day_of(k2.0),
            day_of(k2.0) - 1,
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want, "{report}");
    // Report only: nothing repaired, and one run per day.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(runs(&a, "differing"), 1);
    assert_eq!(runs(&a, "repaired"), 0);
    let mut damaged = oracle.clone();
    let bump = |o: &mut Oracle, k: (u64, i64), by: i64| {
        let e = o.get_mut(&k).unwrap();
        if by > 0 {
            for i in 0..by {
                e.0.insert(vec![0xEE, i as u8]);
            }
        } else {
            let first = e.0.iter().next().unwrap().clone();
            e.0.remove(&first);
        }
    };
    bump(&mut damaged, k1, 4);
    bump(&mut damaged, k2, -1);
    assert_oracle(
        a.grpc_addr(),
        &damaged,
        &ads,
        day_start,
        "after a report-only run",
    )
    .await;
    a.shutdown().await;

    // Run the day again, repairing.
    std::fs::remove_file(data.join("reconcile").join("state.json")).unwrap();
    night.reconcile.auto_repair = true;
    let a = adclick_aggregator::start(night).await.unwrap();
    until_run(&a, "repaired").await;
    assert_eq!(a.metrics().reconcile.cells_repaired.get(), 2);
    assert_oracle(
        a.grpc_addr(),
        &oracle,
        &ads,
        day_start,
        "after the nightly repair",
    )
    .await;
    a.shutdown().await;
}

/// The start of the day (UTC) whose last minutes the scenarios click in: today, unless
/// fewer than 6 minutes of it have passed (a run just after midnight), then yesterday,
/// whose last minutes are as recent. Either way the recent minutes a scenario needs lie in
/// one day, the one the nightly schedule is told is due.
fn scenario_day(now: i64) -> i64 {
    let today = now.div_euclid(86_400_000) * 86_400_000;
    if now - today >= 6 * 60_000 {
        today
    } else {
        today - 86_400_000
    }
}

/// The minute index after the last minute a scenario clicks in: now's, or the end of
/// `day_start`'s day when that is yesterday.
fn day_end_minute(now: i64, day_start: i64) -> i64 {
    now.div_euclid(60_000)
        .min((day_start + 86_400_000).div_euclid(60_000))
}

/// Issue 15 item 4: with the nightly on, minute cells of a day not finalized stay past
/// `windows.retention_minutes`; once the nightly run finds the day clean it finalizes it and
/// they go, the day totals equal to the oracle (which the clean run matched to the archive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minutes_stay_until_their_day_is_finalized() {
    within(Duration::from_secs(120), finalize_scenario()).await;
}

async fn finalize_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = aggregator_config(&dir.path().join("agg"), "127.0.0.1:0".parse().unwrap());
    cfg.archive.enabled = true;
    cfg.archive.writer_id = "fin".into();
    cfg.archive.dir = dir.path().join("archive");
    cfg.checkpoint.interval_ms = 3_600_000;
    cfg.shards.count = 1;
    cfg.windows.retention_minutes = 2;
    cfg.reconcile.nightly = true;
    cfg.reconcile.check_interval_ms = 100;
    let now = now_ms();
    let day_start = scenario_day(now);
    // The schedule's own clock first: the day due is a past one with no clicks; it is
    // clean, so it is finalized, and today is not.
    let a = adclick_aggregator::start(cfg.clone()).await.unwrap();
    while a.metrics().reconcile.last_finalized_day_seconds.get() == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.metrics().reconcile.last_finalized_day_seconds.get() < day_start / 1000);

    // Two clicks per (ad, minute) over the last minutes of today, one batch per minute so
    // the watermark moves through them, then one more batch: with one shard, its ack means
    // the evictions the batches before asked for are done.
    let now_min = day_end_minute(now, day_start);
    let first = (now_min - 12).max(day_start / 60_000);
    let ads: Vec<u64> = (1..=3).collect();
    let mut oracle = Oracle::new();
    let mut id = 2_000_000u64;
    let mut seq = 0;
    for m in first..now_min {
        let mut b = Vec::new();
        for ad in &ads {
            for k in 0..2 {
                id += 1;
                b.push(click(
                    id,
                    *ad,
                    m * 60_000 + 20_000 * k,
                    &format!("f{}", id % 5),
                    now,
                ));
            }
        }
        for c in &b {
            record(&mut oracle, c);
        }
        seq += 1;
        ingest(a.grpc_addr(), seq, b).await;
    }
    let held = oracle.len();
    let newest = oracle.keys().map(|k| k.1).max().unwrap() + 20_000;
    // What retention alone keeps: minutes from the watermark (newest event - allowed
    // delay) minus retention_minutes, rounded down to its minute.
    let floor = (newest - cfg.windows.allowed_delay_ms - 2 * 60_000).div_euclid(60_000) * 60_000;
    let kept = oracle.keys().filter(|k| k.1 >= floor).count();
    assert!(
        kept < held,
        "the scenario needs minutes past retention ({kept} of {held})"
    );
    let last = oracle.keys().last().copied().unwrap();
    id += 1;
    let sync = click(id, last.0, last.1 + 30_000, "f-sync", now);
    record(&mut oracle, &sync);
    seq += 1;
    ingest(a.grpc_addr(), seq, vec![sync]).await;
    assert_eq!(a.memory().1, held, "minute cells of a day not finalized");
    a.shutdown().await;

    // Tomorrow 03:00 for the schedule: today is due, clean, finalized; its old minutes go.
    let mut night = cfg.clone();
    night.reconcile.clock_offset_ms = day_start + 86_400_000 + 3 * 3_600_000 - now;
    let a = adclick_aggregator::start(night).await.unwrap();
    until_run(&a, "clean").await;
    while a.metrics().reconcile.last_finalized_day_seconds.get() != day_start / 1000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The shard drops them right after the finalization is applied.
    let mut cells = a.memory().1;
    for _ in 0..200 {
        if cells == kept {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        cells = a.memory().1;
    }
    assert_eq!(cells, kept, "minute cells after the day was finalized");
    assert_eq!(
        a.metrics()
            .reconcile
            .cells_differing
            .get_or_create(&LevelLabel { level: "day" })
            .get(),
        0
    );
    let (_, day) = expected(&oracle, day_start);
    assert_eq!(
        crate::repair::cells(
            a.grpc_addr(),
            &ads,
            day_start,
            adclick_proto::v1::Granularity::Day
        )
        .await,
        day,
        "day totals after finalization"
    );
    a.shutdown().await;
}
