//! The archive writer against an in-memory log: partitions, generations, and the redo of
//! a generation interrupted mid-publication (no row lost, none twice).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adclick_archive::{
    ArchiveConfig, ArchiveError, Archiver, Destination, Feed, Row, State, Stats, Status,
};
use arrow_array::{Array, UInt32Array, UInt64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const HOUR: i64 = 3_600_000;
const T0: i64 = 1_735_689_600_000; // 2025-01-01T00:00Z

fn row(pos: u64, i: u32, event: i64, status: Status) -> Row {
    Row {
        log_pos: pos,
        collector_id: Arc::from("c1"),
        collector_seq: pos,
        click_index: i,
        impression_id: vec![pos as u8; 16],
        ad_id: 100 + u64::from(i % 3),
        advertiser_id: 1,
        campaign_id: 2,
        token_expires_at_ms: event + HOUR,
        event_time_ms: event,
        received_at_ms: event,
        occurred_at_ms: event,
        sent_at_ms: event,
        country: "DE".into(),
        device: 1,
        os: "ios".into(),
        site: "news.example".into(),
        app: String::new(),
        user_id: format!("u{i}"),
        client_ip: Some("203.0.113.9".parse().unwrap()),
        clock_skew_flagged: false,
        dedup_suspect: false,
        salt: 0,
        status,
        rules_version: None,
    }
}

/// A log of entries 1..=n (entry p: 3 clicks, event time moving over two hours), with its
/// state kept in memory; `fail_done` makes the save after a publication fail (a crash
/// between publishing and recording it).
#[derive(Clone, Default)]
struct MemFeed {
    entries: BTreeMap<u64, Vec<Row>>,
    state: Arc<Mutex<Option<State>>>,
    fail_done: Arc<AtomicBool>,
}

impl MemFeed {
    fn new(n: u64) -> Self {
        let mut f = MemFeed::default();
        for p in 1..=n {
            let ev = T0 + (p as i64) * HOUR * 2 / n as i64;
            let st = if p % 5 == 0 {
                Status::Duplicate
            } else {
                Status::Counted
            };
            f.entries
                .insert(p, (0..3).map(|i| row(p, i, ev, st)).collect());
        }
        f
    }
}

impl Feed for MemFeed {
    fn read(
        &mut self,
        after: u64,
        until: u64,
        max_rows: usize,
        out: &mut Vec<Row>,
    ) -> Result<u64, ArchiveError> {
        let mut last = after;
        let start = out.len();
        for (p, rows) in self.entries.range(after + 1..=until) {
            out.extend(rows.iter().cloned());
            last = *p;
            if out.len() - start >= max_rows {
                break;
            }
        }
        Ok(last)
    }
    fn wait(&self, _after: u64, timeout: Duration) {
        std::thread::sleep(timeout.min(Duration::from_millis(5)));
    }
    fn load_state(&mut self) -> Result<State, ArchiveError> {
        Ok(self.state.lock().unwrap().clone().unwrap_or_default())
    }
    fn save_state(&mut self, s: &State) -> Result<(), ArchiveError> {
        if s.pending.is_none()
            && s.next_seq > 0
            && self.fail_done.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ArchiveError("injected: crash before recording".into()));
        }
        *self.state.lock().unwrap() = Some(s.clone());
        Ok(())
    }
}

fn cfg(dir: &std::path::Path) -> ArchiveConfig {
    ArchiveConfig {
        enabled: true,
        writer_id: "w1".into(),
        dir: dir.to_path_buf(),
        row_group_rows: 1024,
        ..ArchiveConfig::default()
    }
}

/// (log_pos, click_index) of every row in every file under `dir`, and the files.
fn read_all(dir: &std::path::Path) -> (Vec<(u64, u32)>, Vec<String>) {
    let d = Destination::Local {
        dir: dir.to_path_buf(),
    };
    let files = d.list("").unwrap();
    let mut keys = Vec::new();
    for f in &files {
        let file = std::fs::File::open(dir.join(f)).unwrap();
        let r = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let pos = b
                .column_by_name("log_pos")
                .unwrap()
                .as_any()
                .downcast_ref::<UInt64Array>()
                .unwrap()
                .clone();
            let idx = b
                .column_by_name("click_index")
                .unwrap()
                .as_any()
                .downcast_ref::<UInt32Array>()
                .unwrap()
                .clone();
            for i in 0..b.num_rows() {
                assert!(!pos.is_null(i));
                keys.push((pos.value(i), idx.value(i)));
            }
        }
    }
    keys.sort();
    (keys, files)
}

#[test]
fn every_row_lands_once_in_its_event_hour() {
    let dir = tempfile::tempdir().unwrap();
    let feed = MemFeed::new(40);
    let stats = Arc::new(Stats::default());
    let c = cfg(dir.path());
    let a = Archiver::new(
        feed.clone(),
        c.clone(),
        Destination::open(&c, dir.path()).unwrap(),
        stats.clone(),
    )
    .unwrap();
    let st = a.run(&AtomicBool::new(true)).unwrap();
    assert_eq!(st.covered, 40);
    assert_eq!(st.next_seq, 1);
    assert_eq!(st.pending, None);
    let (keys, files) = read_all(dir.path());
    assert_eq!(keys.len(), 120);
    keys.windows(2).for_each(|w| assert_ne!(w[0], w[1]));
    assert_eq!(
        files,
        vec![
            "dt=2025-01-01/hour=00/w1-000000000000.parquet",
            "dt=2025-01-01/hour=01/w1-000000000000.parquet",
            "dt=2025-01-01/hour=02/w1-000000000000.parquet",
        ]
    );
    assert_eq!(stats.rows.load(std::sync::atomic::Ordering::Relaxed), 120);
    // Nothing left in the build directory.
    assert_eq!(
        std::fs::read_dir(dir.path().join("_tmp/w1"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn a_generation_interrupted_after_publishing_is_redone_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let feed = MemFeed::new(30);
    let c = cfg(dir.path());
    // First run: publishes the files, then "crashes" before recording the new position.
    feed.fail_done
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let a = Archiver::new(
        feed.clone(),
        c.clone(),
        Destination::open(&c, dir.path()).unwrap(),
        Arc::new(Stats::default()),
    )
    .unwrap();
    let st = a.run(&AtomicBool::new(true)).unwrap();
    let p = st.pending.clone().expect("the intent stays");
    assert_eq!((p.seq, p.from, p.upto), (0, 0, 30));
    assert_eq!(read_all(dir.path()).0.len(), 90);
    // One file was lost on the way (a partial upload never became visible).
    std::fs::remove_file(dir.path().join(&p.files[0])).unwrap();

    // More entries arrive; the restart redoes generation 0 exactly, then goes on.
    let mut feed2 = feed.clone();
    feed2
        .fail_done
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let more = MemFeed::new(45);
    for (k, v) in more.entries.range(31..) {
        feed2.entries.insert(*k, v.clone());
    }
    let a = Archiver::new(
        feed2.clone(),
        c.clone(),
        Destination::open(&c, dir.path()).unwrap(),
        Arc::new(Stats::default()),
    )
    .unwrap();
    let st = a.run(&AtomicBool::new(true)).unwrap();
    assert_eq!(st.covered, 45);
    assert_eq!(st.next_seq, 2);
    assert_eq!(st.pending, None);
    let (keys, files) = read_all(dir.path());
    assert_eq!(keys.len(), 135, "{files:?}");
    keys.windows(2)
        .for_each(|w| assert_ne!(w[0], w[1], "a row twice"));
    assert!(files.iter().any(|f| f.ends_with("w1-000000000001.parquet")));
}

#[test]
fn a_generation_closes_after_the_roll_interval() {
    let dir = tempfile::tempdir().unwrap();
    let feed = MemFeed::new(10);
    let mut c = cfg(dir.path());
    c.roll_interval_secs = 1;
    let stop = Arc::new(AtomicBool::new(false));
    let a = Archiver::new(
        feed.clone(),
        c.clone(),
        Destination::open(&c, dir.path()).unwrap(),
        Arc::new(Stats::default()),
    )
    .unwrap();
    let s = stop.clone();
    let h = std::thread::spawn(move || a.run(&s).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while feed.state.lock().unwrap().as_ref().map(|s| s.covered) != Some(10) {
        assert!(
            std::time::Instant::now() < deadline,
            "not published in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_all(dir.path()).0.len(), 30);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    h.join().unwrap();
}
