//! The raw click archive (`[archive]`): every click of every admitted batch lands in the
//! Parquet files exactly once with what became of it, across crashes (the aggregator
//! dropped without shutdown, sometimes mid-checkpoint) and restarts; the counted rows agree
//! with an oracle computed here from the clicks sent.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use adclick_archive::Destination;
use adclick_proto::v1::IngestClick;
use adclick_test_support::aggregator::start_retrying;
use arrow_array::cast::AsArray;
use arrow_array::types::{Int8Type, UInt32Type, UInt64Type};
use arrow_array::{Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::util::*;

/// One archived row: (collector_seq, click_index) -> (ad, status, reason).
pub type Archived = BTreeMap<(u64, u32), (u64, String, Option<String>)>;

/// Reads every file of the local archive in `dir` (its click rows: `moved` rows are left
/// out); panics on a row present twice.
pub fn read_archive(dir: &Path) -> (Archived, Vec<String>) {
    let files = Destination::Local {
        dir: dir.to_path_buf(),
    }
    .list("")
    .unwrap();
    let mut out = BTreeMap::new();
    for f in &files {
        let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(dir.join(f)).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let col = |n: &str| b.column_by_name(n).unwrap().clone();
            let seq = col("collector_seq");
            let seq = seq.as_primitive::<UInt64Type>();
            let idx = col("click_index");
            let idx = idx.as_primitive::<UInt32Type>();
            let ad = col("ad_id");
            let ad = ad.as_primitive::<UInt64Type>();
            let status = col("status");
            let status = status.as_dictionary::<Int8Type>();
            let status_values = status
                .values()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let reason = col("reason");
            let reason = reason.as_dictionary::<Int8Type>();
            let reason_values = reason
                .values()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            for i in 0..b.num_rows() {
                let st = status_values
                    .value(status.keys().value(i) as usize)
                    .to_string();
                if st == "moved" {
                    // Not a click: a later reclassification of one (issue 16).
                    continue;
                }
                let re = (!reason.is_null(i)).then(|| {
                    reason_values
                        .value(reason.keys().value(i) as usize)
                        .to_string()
                });
                let prev = out.insert((seq.value(i), idx.value(i)), (ad.value(i), st, re));
                assert!(
                    prev.is_none(),
                    "row {:?} archived twice",
                    (seq.value(i), idx.value(i))
                );
            }
        }
    }
    (out, files)
}

/// Batches 1..=n of collector "c": fresh clicks over 150 minutes (three event hours), each
/// batch also repeating 10 clicks of the one before (duplicates), plus one click claiming
/// another advertiser for ad 1 (owner mismatch) and one with a 3-byte impression id
/// (malformed).
fn batches(n: u64) -> Vec<Vec<IngestClick>> {
    let mut out: Vec<Vec<IngestClick>> = Vec::new();
    for i in 0..n {
        // 300 fresh clicks and 12 more: a batch spans two of the engine's decode chunks.
        let mut b = clicks(500 + i, 300, 12, 150, 50);
        if let Some(prev) = out.last() {
            b.extend(prev[..10].iter().cloned());
        }
        let mut foreign = b[0].clone();
        foreign.impression_id[0] ^= 0xAA;
        foreign.ad_id = 1;
        foreign.advertiser_id = 99;
        b.push(foreign);
        let mut bad = b[1].clone();
        bad.impression_id = vec![1, 2, 3];
        b.push(bad);
        out.push(b);
    }
    out
}

/// What the archive must say: every click of every batch, with its status, computed from
/// the batches in the order the aggregator admits them (the first copy of an impression
/// counts; the owner of an ad is the advertiser of its first counted click).
fn expected(batches: &[Vec<IngestClick>]) -> Archived {
    let mut seen = HashSet::new();
    let mut owner = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (s, b) in batches.iter().enumerate() {
        for (i, c) in b.iter().enumerate() {
            let key = (s as u64 + 1, i as u32);
            let v = if c.impression_id.len() != 16 {
                ("invalid", Some("malformed"))
            } else if owner
                .get(&c.ad_id)
                .is_some_and(|o| *o != (c.advertiser_id, c.campaign_id))
            {
                ("quarantined", Some("owner_mismatch"))
            } else if !seen.insert(c.impression_id.clone()) {
                ("duplicate", Some("duplicate_impression"))
            } else {
                owner
                    .entry(c.ad_id)
                    .or_insert((c.advertiser_id, c.campaign_id));
                ("counted", None)
            };
            out.insert(key, (c.ad_id, v.0.to_string(), v.1.map(str::to_string)));
        }
    }
    out
}

/// Late corrections are counted too: compare counted-ness, not the `late` reason.
fn normalise(a: &Archived) -> Archived {
    a.iter()
        .map(|(k, (ad, st, re))| {
            let re = if re.as_deref() == Some("late") {
                None
            } else {
                re.clone()
            };
            (*k, (*ad, st.clone(), re))
        })
        .collect()
}

#[test]
fn every_click_is_archived_once_with_its_outcome_across_crashes() {
    let all = batches(14);
    let want = expected(&all);
    let dir = tempfile::tempdir().unwrap();
    let archive_dir = dir.path().join("archive");
    let data = dir.path().join("data");
    let cfg = |cp_ms: u64| {
        let mut c = config(&data);
        c.checkpoint.interval_ms = cp_ms;
        c.archive.enabled = true;
        c.archive.writer_id = "agg-t".into();
        c.archive.dir = archive_dir.clone();
        // Generations close every ~2 batches, so crashes land between and inside them.
        c.archive.max_rows_per_roll = 400;
        c.archive.roll_interval_secs = 1;
        c
    };
    // Crashing runs: everything from the start is re-sent each time (what was acked
    // before is a no-op), then the process "dies" (sometimes mid-checkpoint).
    for (k, fail_cp) in [(3, None), (6, Some(1)), (9, Some(2)), (12, None)] {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let a = rt.block_on(start_retrying(cfg(1), fail_cp));
        rt.block_on(async {
            let (mut ing, _) = clients(&a).await;
            for (i, b) in all.iter().enumerate().take(k) {
                send(&mut ing, "c", i as u64 + 1, b.clone()).await;
                if i % 4 == 3 {
                    // Let a generation close by time now and then.
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
            }
        });
        a.kill();
        rt.shutdown_background();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(cfg(50), None));
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in all.iter().enumerate() {
            send(&mut ing, "c", i as u64 + 1, b.clone()).await;
        }
    });
    let metrics = a.metrics().render();
    rt.block_on(a.shutdown());

    let (got, files) = read_archive(&archive_dir);
    assert_eq!(got.len(), want.len(), "rows: {files:?}");
    assert_eq!(normalise(&got), want);
    // Three event hours, several generations, all from this writer.
    let hours: BTreeSet<&str> = files.iter().map(|f| &f[..f.rfind('/').unwrap()]).collect();
    assert_eq!(hours.len(), 3, "{files:?}");
    assert!(files.iter().all(|f| f.contains("/agg-t-")), "{files:?}");
    assert!(files.len() > 3, "expected several generations: {files:?}");
    assert!(metrics.contains("adclick_aggregator_archive_rows_total"));

    // The WAL behind the archive is gone after a clean stop: the archive covered it.
    let store = adclick_aggregator::store::RedbStore::open(&data).unwrap();
    let log = adclick_aggregator::store::Store::archive_log(&store).unwrap();
    let st = log.load_state().unwrap().unwrap();
    assert_eq!(st.pending, None);
    assert_eq!(
        adclick_aggregator::store::Store::last_wal_pos(&store).unwrap(),
        st.covered
    );
}

#[test]
fn turning_the_archive_off_releases_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let all = batches(3);
    let mut c = config(&data);
    c.archive.enabled = true;
    c.archive.dir = dir.path().join("archive");
    c.checkpoint.interval_ms = 1;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(c.clone(), None));
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in all.iter().enumerate() {
            send(&mut ing, "c", i as u64 + 1, b.clone()).await;
        }
    });
    a.kill();
    rt.shutdown_background();
    c.archive.enabled = false;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(c, None));
    rt.block_on(a.shutdown());
    let store = adclick_aggregator::store::RedbStore::open(&data).unwrap();
    let log = adclick_aggregator::store::Store::archive_log(&store).unwrap();
    assert_eq!(log.load_state().unwrap(), None);
    // The final checkpoint deleted the whole WAL.
    assert!(
        adclick_aggregator::store::Store::wal_after(&store, 0)
            .unwrap()
            .is_empty()
    );
}
