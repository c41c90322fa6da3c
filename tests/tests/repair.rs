//! `adclick reconcile --day D --repair` against a real aggregator (in process, real sockets,
//! real archive files) and the real `adclick` binary. Cells are damaged on purpose through
//! the `test-hooks` hook (and the damage checkpointed, so a replay cannot undo it); the
//! expected counts are computed here from the clicks sent, never from the code under test:
//! - the report names exactly the damaged cells, with the oracle's and the damaged values;
//! - `--repair` makes every minute and day cell equal the oracle (clicks and unique users),
//!   including a damaged cell that also took clicks the archive had not covered yet (the
//!   aggregator adds what it counted after the archive position: neither lost nor twice);
//! - clicks after the repair add on top, and a SIGKILL-style crash (`kill`) then a restart
//!   replays the repair at its WAL position (between the batches around it);
//! - a graceful restart keeps it (checkpointed), a second `--repair` finds 0 differing cells
//!   and sends nothing, and resending the first repair's id changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use adclick_proto::v1::admin_service_client::AdminServiceClient;
use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{
    ApplyRepairRequest, BatchGetAdClicksRequest, GetRepairStateRequest, Granularity, IngestBatch,
    IngestClick,
};
use tonic::transport::Channel;

use crate::support::*;

/// The oracle: (ad, minute) -> (impression ids, users), from what was sent.
/// (ad, bucket start) -> (clicks, unique users).
pub(crate) type Cells = BTreeMap<(u64, i64), (u64, u64)>;

pub(crate) type Oracle = BTreeMap<(u64, i64), (BTreeSet<Vec<u8>>, BTreeSet<String>)>;

pub(crate) fn click(id: u64, ad: u64, ev: i64, user: &str, now: i64) -> IngestClick {
    let mut imp = [0u8; 16];
    imp[..8].copy_from_slice(&id.to_le_bytes());
    imp[8] = 0x5A;
    IngestClick {
        impression_id: imp.to_vec(),
        ad_id: ad,
        advertiser_id: ADV_A,
        campaign_id: 1,
        token_expires_at_ms: now + 3_600_000,
        event_time_ms: ev,
        received_at_ms: ev,
        country: "US".into(),
        device: 2,
        user_id: user.into(),
        ..Default::default()
    }
}

pub(crate) fn record(oracle: &mut Oracle, c: &IngestClick) {
    let e = oracle
        .entry((c.ad_id, c.event_time_ms.div_euclid(60_000) * 60_000))
        .or_default();
    e.0.insert(c.impression_id.clone());
    e.1.insert(c.user_id.clone());
}

struct Run {
    code: i32,
    /// (level, cells compared, differing, clicks off)
    levels: Vec<(String, u64, u64, u64)>,
    out: String,
}

fn reconcile(
    day: &str,
    archive: &Path,
    grpc: std::net::SocketAddr,
    report: &Path,
    repair: bool,
) -> Run {
    let mut cmd = Command::new(adclick_bin());
    cmd.args(["reconcile", "--day", day, "--archive-dir"])
        .arg(archive)
        .args(["--endpoint", &format!("http://{grpc}"), "--api-key", ADMIN])
        .arg("--report")
        .arg(report);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let levels = stdout
        .lines()
        .filter(|l| l.starts_with("minute") || l.starts_with("day"))
        .map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            (
                t[0].to_string(),
                t[3].parse().unwrap(),
                t[5].parse().unwrap(),
                t[8].parse().unwrap(),
            )
        })
        .collect();
    Run {
        code: out.status.code().unwrap_or(-1),
        levels,
        out: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    }
}

pub(crate) async fn ingest(grpc: std::net::SocketAddr, seq: u64, clicks: Vec<IngestClick>) {
    let ch = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    IngestServiceClient::new(ch)
        .ingest(authed(
            IngestBatch {
                collector_id: "c".into(),
                seq,
                clicks,
                ..Default::default()
            },
            INGEST_KEY,
        ))
        .await
        .unwrap();
}

/// (ad, bucket start) -> (clicks, unique users) at `g`, over the day, for `ads`.
pub(crate) async fn cells(
    grpc: std::net::SocketAddr,
    ads: &[u64],
    from: i64,
    g: Granularity,
) -> BTreeMap<(u64, i64), (u64, u64)> {
    let ch = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = QueryServiceClient::new(ch)
        .batch_get_ad_clicks(authed(
            BatchGetAdClicksRequest {
                ad_ids: ads.to_vec(),
                from_ms: from,
                to_ms: from + 86_400_000,
                granularity: g as i32,
                fill_empty: Some(false),
                filter: None,
                traffic: adclick_proto::v1::Traffic::All as i32,
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    r.ads
        .into_iter()
        .flat_map(|a| {
            a.buckets
                .into_iter()
                .filter(|b| b.clicks > 0)
                .map(move |b| ((a.ad_id, b.start_ms), (b.clicks, b.unique_users)))
        })
        .collect()
}

/// The oracle at minute and day level, in the shape `cells` answers.
pub(crate) fn expected(o: &Oracle, day_start: i64) -> (Cells, Cells) {
    let minute = o
        .iter()
        .map(|(k, (ids, users))| (*k, (ids.len() as u64, users.len() as u64)))
        .collect();
    let mut day: BTreeMap<u64, (u64, BTreeSet<String>)> = BTreeMap::new();
    for ((ad, _), (ids, users)) in o {
        let d = day.entry(*ad).or_default();
        d.0 += ids.len() as u64;
        d.1.extend(users.iter().cloned());
    }
    let day = day
        .into_iter()
        .map(|(ad, (c, u))| ((ad, day_start), (c, u.len() as u64)))
        .collect();
    (minute, day)
}

pub(crate) async fn assert_oracle(
    grpc: std::net::SocketAddr,
    o: &Oracle,
    ads: &[u64],
    day_start: i64,
    when: &str,
) {
    let (minute, day) = expected(o, day_start);
    assert_eq!(
        cells(grpc, ads, day_start, Granularity::Minute).await,
        minute,
        "minute cells {when}"
    );
    assert_eq!(
        cells(grpc, ads, day_start, Granularity::Day).await,
        day,
        "day cells {when}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_fixes_exactly_the_damaged_cells_durably_and_once() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(180), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let mut cfg = aggregator_config(&dir.path().join("agg"), "127.0.0.1:0".parse().unwrap());
    cfg.archive.enabled = true;
    cfg.archive.writer_id = "rep".into();
    cfg.archive.dir = archive.clone();
    cfg.archive.max_rows_per_roll = 300;
    // Checkpoints only where the test takes them (the damage hook, a graceful stop), so a
    // crash must replay the repair from its record.
    cfg.checkpoint.interval_ms = 3_600_000;
    let now = now_ms();
    let day_start = now.div_euclid(86_400_000) * 86_400_000;
    let day =
        humantime::format_rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(day_start as u64))
            .to_string()[..10]
            .to_string();
    // Event times in the last minutes of this day (at least 2 minutes: the day may have
    // just begun), 6 ads, 30 users, and each batch resends 10 clicks of the one before
    // (duplicates: counted once).
    let span = (now - day_start - 60_000).clamp(60_000, 40 * 60_000) as u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ads: Vec<u64> = (1..=6).collect();
    let mut oracle = Oracle::new();
    let mut seq = 0u64;
    let a = adclick_aggregator::start(cfg.clone()).await.unwrap();
    let mut prev: Vec<IngestClick> = Vec::new();
    let mut id = 0u64;
    for _ in 0..8 {
        let mut b: Vec<IngestClick> = (0..100)
            .map(|_| {
                id += 1;
                let ev = (now - 30_000 - (next() % span) as i64).max(day_start);
                click(id, 1 + next() % 6, ev, &format!("u{}", next() % 30), now)
            })
            .collect();
        b.extend(prev.iter().take(10).cloned());
        for c in &b {
            record(&mut oracle, c);
        }
        prev = b.clone();
        seq += 1;
        ingest(a.grpc_addr(), seq, b).await;
    }
    // A graceful stop publishes the whole archive.
    a.shutdown().await;
    let a = adclick_aggregator::start(cfg.clone()).await.unwrap();
    assert_oracle(a.grpc_addr(), &oracle, &ads, day_start, "before any damage").await;

    // Damage three cells of three different ads: the busiest minute of each.
    let mut by_ad: BTreeMap<u64, ((u64, i64), usize)> = BTreeMap::new();
    for (k, (ids, _)) in &oracle {
        let e = by_ad.entry(k.0).or_insert((*k, 0));
        if ids.len() > e.1 {
            *e = (*k, ids.len());
        }
    }
    let targets: Vec<((u64, i64), i64)> = by_ad
        .values()
        .take(3)
        .zip([5i64, -2, 7])
        .map(|((k, n), d)| {
            assert!(*n >= 2);
            (*k, d)
        })
        .collect();
    let found = a
        .damage_for_test(targets.iter().map(|((ad, m), d)| (*ad, *m, *d)).collect())
        .await;
    assert_eq!(found, 3);
    // Then 3 new clicks in the first damaged cell that the archive does not cover yet (a
    // small batch stays in the archive's open generation).
    let (cell_a, _) = targets[0];
    let late: Vec<IngestClick> = (0..3)
        .map(|i| {
            id += 1;
            click(id, cell_a.0, cell_a.1 + 1_000 + i, &format!("late{i}"), now)
        })
        .collect();
    for c in &late {
        record(&mut oracle, c);
    }
    seq += 1;
    ingest(a.grpc_addr(), seq, late).await;

    let grpc = a.grpc_addr();
    let report = dir.path().join("report.jsonl");
    let run = {
        let (day, archive, report) = (day.clone(), archive.clone(), report.clone());
        tokio::task::spawn_blocking(move || reconcile(&day, &archive, grpc, &report, false))
            .await
            .unwrap()
    };
    assert_eq!(run.code, 3, "{}", run.out);
    // Exactly the damaged minute cells, with the archive's and the damaged values.
    let base = |k: &(u64, i64)| oracle[k].0.len() as i64 - if *k == cell_a { 3 } else { 0 };
    let mut want: BTreeSet<(u64, i64, i64, i64)> = BTreeSet::new();
    for (k, d) in &targets {
        let extra = if *k == cell_a { 3 } else { 0 };
        want.insert((k.0, k.1, base(k), base(k) + d + extra));
    }
    let got: BTreeSet<(u64, i64, i64, i64)> = std::fs::read_to_string(&report)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["level"] == "minute")
        .map(|v| {
            (
                v["ad_id"].as_u64().unwrap(),
                v["start_ms"].as_i64().unwrap(),
                v["archive_clicks"].as_i64().unwrap(),
                v["aggregator_clicks"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want, "{}", run.out);
    let off: u64 = targets
        .iter()
        .map(|(k, d)| d.unsigned_abs() + if *k == cell_a { 3 } else { 0 })
        .sum();
    assert_eq!(
        run.levels[0],
        ("minute".to_string(), run.levels[0].1, 3, off),
        "{}",
        run.out
    );
    assert_eq!(run.levels[1].2, 3, "{}", run.out);

    // Repair: every cell equals the oracle, the uncovered late clicks included.
    let run = {
        let (day, archive, report) = (day.clone(), archive.clone(), report.clone());
        tokio::task::spawn_blocking(move || reconcile(&day, &archive, grpc, &report, true))
            .await
            .unwrap()
    };
    assert_eq!(run.code, 0, "{}", run.out);
    assert!(run.out.contains("cells set 3  skipped 0"), "{}", run.out);
    let first_id = run
        .out
        .lines()
        .find_map(|l| l.strip_prefix("repair ").and_then(|r| r.split(':').next()))
        .unwrap()
        .to_string();
    assert_oracle(grpc, &oracle, &ads, day_start, "after the repair").await;

    // Crash and restart: the repair is replayed after the late batch, from its record.
    a.kill();
    let a = adclick_test_support::aggregator::start_retrying(cfg.clone(), None).await;
    assert_oracle(a.grpc_addr(), &oracle, &ads, day_start, "after a crash").await;

    // Later clicks add on top of a repaired cell, across another crash.
    let (cell_b, _) = targets[1];
    let after: Vec<IngestClick> = (0..2)
        .map(|i| {
            id += 1;
            click(
                id,
                cell_b.0,
                cell_b.1 + 2_000 + i,
                &format!("after{i}"),
                now,
            )
        })
        .collect();
    for c in &after {
        record(&mut oracle, c);
    }
    seq += 1;
    ingest(a.grpc_addr(), seq, after).await;
    assert_oracle(
        a.grpc_addr(),
        &oracle,
        &ads,
        day_start,
        "after clicks on top",
    )
    .await;
    a.kill();
    let a = adclick_test_support::aggregator::start_retrying(cfg.clone(), None).await;
    assert_oracle(
        a.grpc_addr(),
        &oracle,
        &ads,
        day_start,
        "after the second crash",
    )
    .await;

    // Graceful restart (checkpointed repair, everything archived): nothing differs, and a
    // second --repair sends nothing.
    a.shutdown().await;
    let a = adclick_aggregator::start(cfg.clone()).await.unwrap();
    let grpc = a.grpc_addr();
    assert_oracle(grpc, &oracle, &ads, day_start, "after a graceful restart").await;
    let run = {
        let (day, archive, report) = (day.clone(), archive.clone(), report.clone());
        tokio::task::spawn_blocking(move || reconcile(&day, &archive, grpc, &report, true))
            .await
            .unwrap()
    };
    assert_eq!(run.code, 0, "{}", run.out);
    for (level, cells, differing, off) in &run.levels {
        assert!(*cells > 0, "{level}: {}", run.out);
        assert_eq!((*differing, *off), (0, 0), "{level}: {}", run.out);
    }
    assert!(run.out.contains("repair: nothing to repair"), "{}", run.out);

    // The first repair's id again, with different cells: already applied, nothing changes.
    let ch = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = AdminServiceClient::new(ch);
    let st = admin
        .get_repair_state(authed(GetRepairStateRequest {}, ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.repairs_applied, 1);
    let r = admin
        .apply_repair(authed(
            ApplyRepairRequest {
                repair_id: first_id.clone(),
                archive_covered: st.archive_covered,
                cells: vec![adclick_proto::v1::RepairCell {
                    ad_id: cell_a.0,
                    minute_ms: cell_a.1,
                    combos: Vec::new(),
                }],
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.already_applied, "{first_id}: {r:?}");
    let repairs = |result| {
        a.metrics()
            .reconcile
            .repairs
            .get_or_create(&adclick_aggregator::nightly::ResultLabel { result })
            .get()
    };
    // This process took the resend only (the repair itself went to an earlier one).
    assert_eq!((repairs("already_applied"), repairs("applied")), (1, 0));
    let bad = admin
        .apply_repair(authed(
            ApplyRepairRequest {
                repair_id: "bad".into(),
                archive_covered: st.archive_covered,
                cells: vec![adclick_proto::v1::RepairCell {
                    ad_id: 1,
                    minute_ms: cell_a.1 + 1,
                    combos: Vec::new(),
                }],
            },
            ADMIN,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("not a minute start"), "{bad:?}");
    assert_eq!(repairs("invalid"), 1);
    assert_eq!(r.repair_seq, 1);
    assert_oracle(
        grpc,
        &oracle,
        &ads,
        day_start,
        "after resending a repair id",
    )
    .await;
    // Only admin keys reach the service.
    let refused = admin
        .get_repair_state(authed(GetRepairStateRequest {}, ADV_A_KEY))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        "{refused:?}"
    );
    a.shutdown().await;
}
