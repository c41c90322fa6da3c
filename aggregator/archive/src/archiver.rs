//! The archive writer: reads rows from a [`Feed`] (an ordered log with `u64` positions),
//! writes one Parquet file per event (date, hour) partition touched, and publishes them
//! together as one *generation* `<writer>-<seq>` that covers the log positions
//! `(from, upto]`.
//!
//! Crash safety (no loss, no duplicate rows):
//! - The feed keeps the archive's [`State`] next to the log and keeps the log's entries
//!   after `State::covered` (the aggregator holds its WAL truncation at it). A start reads
//!   again from `covered`.
//! - Before publishing a generation the writer saves its intent ([`Pending`]: seq, from,
//!   upto, the files) durably; after every file is published it saves the new `covered`.
//! - A start that finds an intent redoes exactly that generation: it reads `(from, upto]`
//!   again, which yields the same rows in the same order (the feed's rows are a pure
//!   function of the log), so it writes the same files under the same names and
//!   publishing replaces whatever a crash left half-way with the same bytes. Only then does
//!   it go on. A file therefore never holds a row another file holds, and every position up
//!   to `covered` is in published files.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::ArchiveError;
use crate::config::ArchiveConfig;
use crate::dest::Destination;
use crate::partition::partition_of;
use crate::row::{Row, schema, to_batch};

/// Rows converted to one Arrow batch at a time.
const BATCH_ROWS: usize = 8192;
/// Rows read from the feed per call.
const READ_ROWS: usize = 16_384;
/// Largest row group in (estimated encoded) bytes, whatever `row_group_rows` says.
const ROW_GROUP_BYTES: usize = 128 << 20;

/// Where an ordered log's rows come from, and where the archive's progress is kept. The
/// aggregator's WAL (`adclick_aggregator::archive::WalFeed`) is one; a JetStream consumer
/// of one partition could be another (positions = stream sequences).
pub trait Feed: Send {
    /// Appends to `out` the rows of the log entries after `after` and at or before
    /// `until`, whole entries, stopping once about `max_rows` were added; returns the
    /// position of the last entry read (`after` when none is there yet). Must yield the
    /// same rows for the same entries every time.
    fn read(
        &mut self,
        after: u64,
        until: u64,
        max_rows: usize,
        out: &mut Vec<Row>,
    ) -> Result<u64, ArchiveError>;
    /// Waits until entries after `after` may be there, or `timeout`.
    fn wait(&self, after: u64, timeout: Duration);
    /// The saved state (a feed without one returns where the archive starts).
    fn load_state(&mut self) -> Result<State, ArchiveError>;
    /// Saves the state durably; from then on the log may drop entries up to `covered`.
    fn save_state(&mut self, state: &State) -> Result<(), ArchiveError>;
}

/// The archive's durable progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Every log entry at or before this position is in published files.
    pub covered: u64,
    /// Seq of the next generation.
    pub next_seq: u64,
    /// A generation whose publication started and has not finished.
    pub pending: Option<Pending>,
}

/// A generation being published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Its seq (the `<seq>` of its file names).
    pub seq: u64,
    /// It covers log positions after this...
    pub from: u64,
    /// ...up to this one, inclusive.
    pub upto: u64,
    /// Its files, relative to the archive root.
    pub files: Vec<String>,
}

impl State {
    /// Encoded for a feed's store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decoded from [`State::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Result<State, ArchiveError> {
        serde_json::from_slice(b).map_err(|e| ArchiveError(format!("archive state: {e}")))
    }
}

/// Counters of a running archive (the aggregator exports them as metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows in published files.
    pub rows: AtomicU64,
    /// Bytes of published files.
    pub bytes: AtomicU64,
    /// Files published.
    pub files: AtomicU64,
    /// Generations published.
    pub generations: AtomicU64,
    /// `State::covered`.
    pub covered: AtomicU64,
    /// Failed attempts (publish, feed, state), each retried.
    pub errors: AtomicU64,
    /// Wall clock (ms) of the last publication.
    pub last_publish_ms: AtomicU64,
    /// Time spent writing Parquet (encoding, compressing, local writes), µs.
    pub write_us: AtomicU64,
    /// CPU time of the thread that ran the archiver, µs, set when it returns (Linux).
    pub thread_cpu_us: AtomicU64,
}

struct PartFile {
    rel: String,
    tmp: PathBuf,
    writer: ArrowWriter<File>,
    buf: Vec<Row>,
}

/// The writer loop (see the module doc). Run it on its own thread.
#[derive(Debug)]
pub struct Archiver<F: Feed> {
    feed: F,
    cfg: ArchiveConfig,
    dest: Destination,
    state: State,
    stats: Arc<Stats>,
    open: BTreeMap<String, PartFile>,
    /// Last position read into the open files.
    read_pos: u64,
    rows: u64,
    started: Option<Instant>,
    last_save: Instant,
    props: WriterProperties,
}

impl std::fmt::Debug for PartFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartFile").field("rel", &self.rel).finish()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl<F: Feed> Archiver<F> {
    /// An archiver over `feed` writing to `dest`.
    pub fn new(
        mut feed: F,
        cfg: ArchiveConfig,
        dest: Destination,
        stats: Arc<Stats>,
    ) -> Result<Self, ArchiveError> {
        let state = feed.load_state()?;
        stats.covered.store(state.covered, Ordering::Relaxed);
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(cfg.row_group_rows.max(1)))
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .set_created_by(format!("adclick-archive {}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Archiver {
            feed,
            read_pos: state.covered,
            state,
            cfg,
            dest,
            stats,
            open: BTreeMap::new(),
            rows: 0,
            started: None,
            last_save: Instant::now(),
            props,
        })
    }

    /// The state as last saved.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Runs until `stop` is set, then archives everything the feed has and returns.
    pub fn run(mut self, stop: &AtomicBool) -> Result<State, ArchiveError> {
        tracing::info!(
            destination = %self.dest.describe(),
            covered = self.state.covered,
            next_seq = self.state.next_seq,
            "archive writer started"
        );
        if let Some(p) = self.state.pending.clone() {
            tracing::warn!(
                seq = p.seq,
                from = p.from,
                upto = p.upto,
                files = p.files.len(),
                "archive: redoing the generation a stop interrupted"
            );
            self.read_pos = p.from;
            while self.read_pos < p.upto {
                if self.step(p.upto, stop)? == 0 {
                    if stop.load(Ordering::Acquire) {
                        return Ok(self.state);
                    }
                    return Err(ArchiveError(format!(
                        "archive: the log ends at {} but the interrupted generation {} covers up to {}",
                        self.read_pos, p.seq, p.upto
                    )));
                }
            }
            if !self.close(Some(p), stop)? {
                return Ok(self.state);
            }
        }
        let roll = self.cfg.roll_interval();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            let n = self.step(u64::MAX, stop)?;
            let due = self.started.is_some_and(|s| s.elapsed() >= roll)
                || self.rows >= self.cfg.max_rows_per_roll
                // Only entries without clicks (heartbeats) since the last save: record how
                // far they go now and then, so the WAL behind them can go.
                || (self.open.is_empty()
                    && self.read_pos > self.state.covered
                    && self.last_save.elapsed() >= roll);
            if due || (stopping && n == 0) {
                if !self.close(None, stop)? {
                    return Ok(self.state);
                }
                if stopping && n == 0 {
                    return Ok(self.state);
                }
            }
            if n == 0 {
                let left = self
                    .started
                    .map_or(roll, |s| roll.saturating_sub(s.elapsed()));
                self.feed.wait(
                    self.read_pos,
                    left.clamp(Duration::from_millis(1), Duration::from_millis(200)),
                );
            }
        }
    }

    /// Reads one chunk (up to `until`) into the open files; returns the rows read plus 1
    /// per position moved (0: nothing new). Retries a failing feed until `stop`.
    fn step(&mut self, until: u64, stop: &AtomicBool) -> Result<usize, ArchiveError> {
        let mut rows = Vec::with_capacity(READ_ROWS);
        let mut backoff = Duration::from_millis(50);
        let pos = loop {
            match self.feed.read(self.read_pos, until, READ_ROWS, &mut rows) {
                Ok(p) => break p,
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "archive: reading the log failed; retrying");
                    if stop.load(Ordering::Acquire) {
                        return Ok(0);
                    }
                    rows.clear();
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let moved = usize::from(pos > self.read_pos);
        self.read_pos = pos.max(self.read_pos);
        let n = rows.len();
        if n > 0 && self.started.is_none() {
            self.started = Some(Instant::now());
        }
        let t = Instant::now();
        for r in rows {
            self.push(r)?;
        }
        self.stats
            .write_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.rows += n as u64;
        Ok(n + moved)
    }

    fn push(&mut self, r: Row) -> Result<(), ArchiveError> {
        let part = partition_of(r.event_time_ms, r.received_at_ms);
        let f = match self.open.get_mut(&part) {
            Some(f) => f,
            None => {
                let name = format!("{}-{:012}.parquet", self.cfg.writer_id, self.state.next_seq);
                let tmp =
                    self.dest
                        .tmp_dir()
                        .join(format!("{}_{}.tmp", part.replace('/', "_"), name));
                let file = File::create(&tmp)
                    .map_err(|e| ArchiveError(format!("cannot create {}: {e}", tmp.display())))?;
                let writer = ArrowWriter::try_new(file, schema(), Some(self.props.clone()))
                    .map_err(|e| ArchiveError(format!("parquet: {e}")))?;
                self.open.entry(part.clone()).or_insert(PartFile {
                    rel: format!("{part}/{name}"),
                    tmp,
                    writer,
                    buf: Vec::with_capacity(BATCH_ROWS),
                })
            }
        };
        f.buf.push(r);
        if f.buf.len() >= BATCH_ROWS {
            flush(f)?;
        }
        Ok(())
    }

    /// Closes the open files and publishes them as one generation covering up to
    /// `read_pos` (or redoes `redo`). `Ok(false)`: stopped before it was published (the
    /// intent stays saved; the next start redoes it).
    fn close(&mut self, redo: Option<Pending>, stop: &AtomicBool) -> Result<bool, ArchiveError> {
        if self.open.is_empty() && redo.is_none() {
            // Nothing to publish; positions read past (batches without clicks) are saved
            // now and then, so the log behind them can go.
            if self.read_pos > self.state.covered
                && (stop.load(Ordering::Acquire)
                    || self.last_save.elapsed() >= self.cfg.roll_interval())
            {
                let mut s = self.state.clone();
                s.covered = self.read_pos;
                self.save(s, stop)?;
            }
            self.started = None;
            return Ok(true);
        }
        let t = Instant::now();
        let mut built = Vec::with_capacity(self.open.len());
        for (_, mut f) in std::mem::take(&mut self.open) {
            flush(&mut f)?;
            f.writer
                .finish()
                .map_err(|e| ArchiveError(format!("parquet: {e}")))?;
            f.writer
                .inner_mut()
                .sync_all()
                .map_err(|e| ArchiveError(format!("cannot sync {}: {e}", f.tmp.display())))?;
            built.push((f.rel, f.tmp));
        }
        self.stats
            .write_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let files: Vec<String> = built.iter().map(|(r, _)| r.clone()).collect();
        let pending = match redo {
            Some(p) => {
                if p.files != files || p.from != self.state.covered {
                    // The log yielded other rows than the first time: the redo would not
                    // replace what was published. Never guess.
                    return Err(ArchiveError(format!(
                        "archive: redo of generation {} produced files {files:?}, the interrupted one listed {:?}",
                        p.seq, p.files
                    )));
                }
                p
            }
            None => {
                let p = Pending {
                    seq: self.state.next_seq,
                    from: self.state.covered,
                    upto: self.read_pos,
                    files,
                };
                let mut s = self.state.clone();
                s.pending = Some(p.clone());
                if !self.save(s, stop)? {
                    return Ok(false);
                }
                p
            }
        };
        let mut bytes = 0;
        for (rel, tmp) in &built {
            bytes += std::fs::metadata(tmp).map_or(0, |m| m.len());
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = self.dest.publish(tmp, rel) {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, file = %rel, "archive: publishing failed; retrying");
                if stop.load(Ordering::Acquire) {
                    return Ok(false);
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        let done = State {
            covered: pending.upto,
            next_seq: pending.seq + 1,
            pending: None,
        };
        if !self.save(done, stop)? {
            return Ok(false);
        }
        let s = &self.stats;
        s.rows.fetch_add(self.rows, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
        s.files.fetch_add(built.len() as u64, Ordering::Relaxed);
        s.generations.fetch_add(1, Ordering::Relaxed);
        s.last_publish_ms.store(now_ms(), Ordering::Relaxed);
        tracing::debug!(
            seq = pending.seq,
            upto = pending.upto,
            rows = self.rows,
            files = built.len(),
            bytes,
            "archive generation published"
        );
        self.rows = 0;
        self.started = None;
        Ok(true)
    }

    /// Saves `s` (retrying until `stop`); `Ok(false)` when stopped first.
    fn save(&mut self, s: State, stop: &AtomicBool) -> Result<bool, ArchiveError> {
        let mut backoff = Duration::from_millis(50);
        while let Err(e) = self.feed.save_state(&s) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "archive: saving the archive state failed; retrying");
            if stop.load(Ordering::Acquire) {
                return Ok(false);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.stats.covered.store(s.covered, Ordering::Relaxed);
        self.state = s;
        self.last_save = Instant::now();
        Ok(true)
    }
}

fn flush(f: &mut PartFile) -> Result<(), ArchiveError> {
    if f.buf.is_empty() {
        return Ok(());
    }
    let batch = to_batch(&f.buf).map_err(|e| ArchiveError(format!("arrow: {e}")))?;
    f.writer
        .write(&batch)
        .map_err(|e| ArchiveError(format!("parquet: {e}")))?;
    f.buf.clear();
    Ok(())
}
