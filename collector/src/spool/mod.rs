//! The collector's durable spool: an append-only, segmented, CRC-checked log
//! of opaque records on local disk, between HTTP intake and the forwarder.
//!
//! Intake appends one record per group commit and calls [`Spool::sync`]
//! before answering 202; the forwarder [`Spool::read`]s durable records in
//! order, sends each as one batch whose `seq` is the record's seq, and calls
//! [`Spool::ack`] once the aggregator has it, which lets whole segments go.
//!
//! What this module must not do:
//! - hand out a record that is not yet durable (if it were forwarded and then
//!   lost in a crash, its seq would be reused and the aggregator would drop
//!   the new record as a duplicate);
//! - reuse a seq that was ever durable or acked, return an acked record
//!   again after a reopen, or lose a synced record during recovery;
//! - interpret payloads, batch, block on anything but disk I/O, or be async:
//!   callers wrap it in a `Mutex` and do group commit above it.
//!
//! # On-disk layout
//! - `{first_seq:020}.seg`: segments; records
//!   `len: u32 LE | crc32(seq LE ++ payload): u32 LE | seq: u64 LE | payload`
//!   with consecutive seqs starting at the seq in the name.
//! - `ack`: the acked seq in two CRC'd slots written alternately in place.
//! - `incarnation`: a random u64 + CRC, written once when the directory is
//!   initialised.
//! - `lock`: held with an advisory lock while a [`Spool`] is open.
//!
//! # Recovery
//! [`Spool::open`] scans every segment in seq order and keeps the longest
//! valid prefix of each (complete, CRC-correct, consecutive seqs); the rest
//! is cut off and fsynced. A segment is only kept if it continues the log:
//! its first seq is right after the last valid seq found so far, or the gap
//! lies entirely at or below the acked seq. Anything else can only be the
//! unsynced tail of a crash (a later rotation that reached the disk while
//! an earlier tail did not), so it is dropped; this makes what survives a
//! crash always "every synced record plus a prefix of the unsynced ones".
//! Every record that survives recovery counts as durable.

mod meta;
mod record;
mod segment;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use meta::AckFile;
use segment::{Segment, parse_segment_name, segment_name};

/// Largest payload [`Spool::append`] accepts, in bytes (16 MiB).
pub const MAX_PAYLOAD_BYTES: usize = record::MAX_PAYLOAD;

/// Size limits of a [`Spool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// A segment is rotated before an append would take it past this many
    /// bytes. A record larger than this gets a segment of its own.
    /// Default 64 MiB.
    pub segment_bytes: u64,
    /// Appends fail with [`SpoolError::Full`] rather than let the segment
    /// files not yet deleted grow past this many bytes. Default 8 GiB.
    pub max_bytes: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 8 * 1024 * 1024 * 1024,
        }
    }
}

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The record would take the spool past `max_bytes`; nothing was
    /// written. Clears as the forwarder acks.
    #[error("spool full: {used} bytes used, limit {max}")]
    Full {
        /// Bytes of segment files currently on disk.
        used: u64,
        /// The configured `max_bytes`.
        max: u64,
    },
    /// An operating-system I/O call failed.
    #[error("spool I/O error: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The payload exceeds [`MAX_PAYLOAD_BYTES`]; nothing was written.
    #[error("record of {len} bytes exceeds the {max}-byte limit")]
    RecordTooLarge {
        /// Payload length offered.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// [`Spool::ack`] was asked to ack a seq that is not durable yet, which
    /// can only be a caller bug (the forwarder only sees durable records).
    /// Nothing was changed.
    #[error("ack of seq {seq} is beyond the durable seq {durable}")]
    AckBeyondDurable {
        /// The seq passed to `ack`.
        seq: u64,
        /// [`Spool::durable_seq`] at the time.
        durable: u64,
    },
    /// An earlier fsync failed (or a failed write could not be cut off), so
    /// what is on disk is unknown; appends and syncs are refused until the
    /// spool is dropped and reopened, which re-runs recovery. Reads and acks
    /// still work.
    #[error("spool unusable after an earlier write or fsync failure; reopen it")]
    Poisoned,
    /// The directory's metadata is damaged in a way that cannot be repaired
    /// without risking reused seqs or double counting (e.g. both ack slots
    /// unreadable, segments without an incarnation), or a durable record
    /// failed its checksum when read back. Needs an operator.
    #[error("spool corrupt: {0}")]
    Corrupt(String),
}

/// Builds the `map_err` closure for an I/O error on `path`; the path is
/// only copied if there actually is an error.
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What [`Spool::open`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Unacked records found (all durable now).
    pub records: u64,
    /// Bytes cut off or deleted because they were torn, corrupt or did not
    /// continue the log.
    pub truncated_bytes: u64,
    /// Segment files kept.
    pub segments: usize,
}

/// The spool. Not internally synchronised: share it behind a `Mutex`.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    opts: SpoolOptions,
    incarnation: u64,
    /// Live segments in seq order; the last one is where appends go.
    segments: Vec<Segment>,
    /// Seq the next append gets.
    next_seq: u64,
    durable_seq: u64,
    ack: AckFile,
    /// A segment file was created since the last directory fsync.
    dir_dirty: bool,
    poisoned: bool,
    /// Reused encode buffer so an append costs no allocation.
    buf: Vec<u8>,
    /// Held only for its lock.
    _lock: File,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and recovers it; see
    /// the module docs for the rules. Fails if another `Spool` holds the
    /// directory.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> {
        create_dir(dir)?;
        let lock = meta::lock_dir(dir)?;
        meta::remove_tmp_files(dir)?;
        let files = list_segments(dir)?;
        let incarnation = match meta::read_incarnation(dir)? {
            Some(v) => v,
            // The incarnation is written before any segment, so segments
            // without one mean damage; a new id would make the aggregator
            // count their records a second time.
            None if !files.is_empty() => {
                return Err(SpoolError::Corrupt(format!(
                    "{}: segments present but no incarnation file",
                    dir.display()
                )));
            }
            None => meta::initialise(dir)?,
        };
        let ack = AckFile::open(dir)?;
        let acked = ack.value();

        let mut recovery = Recovery::default();
        let mut segments = Vec::new();
        // Highest valid seq seen so far, including segments already acked.
        let mut last = 0u64;
        let mut dir_changed = false;
        for (first_seq, path) in files {
            // Continuity: no hole may open up above the ack (see module docs).
            let continues = first_seq > last && first_seq <= last.max(acked).saturating_add(1);
            let scan = if continues {
                Some(Segment::scan(&path, first_seq)?)
            } else {
                None
            };
            match scan {
                Some(scan) if scan.valid_len > 0 => {
                    recovery.truncated_bytes += scan.file_len - scan.valid_len;
                    last = scan.segment.last_seq;
                    if last <= acked {
                        remove_segment(&path)?;
                        dir_changed = true;
                        continue;
                    }
                    if scan.valid_len < scan.file_len {
                        truncate(&path, scan.valid_len)?;
                    }
                    segments.push(scan.segment);
                }
                other => {
                    let file_len = match other {
                        Some(scan) => scan.file_len,
                        None => fs::metadata(&path).map_err(io_err("stat", &path))?.len(),
                    };
                    recovery.truncated_bytes += file_len;
                    remove_segment(&path)?;
                    dir_changed = true;
                }
            }
        }
        if dir_changed {
            meta::sync_dir(dir)?;
        }
        if let Some(seg) = segments.last_mut() {
            seg.writer = Some(open_append(&seg.path)?);
        }
        let durable_seq = last.max(acked);
        recovery.records = durable_seq - acked;
        recovery.segments = segments.len();
        let spool = Spool {
            dir: dir.to_path_buf(),
            opts,
            incarnation,
            segments,
            next_seq: durable_seq.saturating_add(1),
            durable_seq,
            ack,
            dir_dirty: false,
            poisoned: false,
            buf: Vec::new(),
            _lock: lock,
        };
        Ok((spool, recovery))
    }

    /// A random u64 created once when the spool directory is first
    /// initialised and stored in it; a wiped directory gets a new one (the
    /// collector puts it in its collector id so a fresh spool never reuses
    /// old seqs under the same id).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Buffered append: the record is handed to the OS but NOT fsynced.
    /// Returns its seq: strictly increasing, 1 for a new spool, and after a
    /// reopen right after the highest seq found on disk or in the ack file.
    /// Rotates to a new segment when the current one would exceed
    /// `segment_bytes`. On any error nothing is appended and the seq is not
    /// consumed.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, SpoolError> {
        let too_large = || SpoolError::RecordTooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD_BYTES,
        };
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(too_large());
        }
        let len = u32::try_from(payload.len()).map_err(|_| too_large())?;
        if self.poisoned {
            return Err(SpoolError::Poisoned);
        }
        let record_len = record::HEADER_LEN as u64 + u64::from(len);
        let used = self.used_bytes();
        if used.saturating_add(record_len) > self.opts.max_bytes {
            return Err(SpoolError::Full {
                used,
                max: self.opts.max_bytes,
            });
        }
        let seq = self.next_seq;
        let reuse = self.segments.last().is_some_and(|s| {
            s.writer.is_some()
                && (s.is_empty() || s.len.saturating_add(record_len) <= self.opts.segment_bytes)
        });
        if !reuse {
            self.start_segment(seq)?;
        }
        record::encode(&mut self.buf, seq, len, payload);
        let Some(seg) = self.segments.last_mut() else {
            return Err(internal("no segment after rotation"));
        };
        let Some(writer) = seg.writer.as_mut() else {
            return Err(internal("active segment has no writer"));
        };
        if let Err(e) = writer.write_all(&self.buf) {
            // Part of the record may be in the file. Cut it off so the next
            // append starts at a record boundary; if even that fails only a
            // reopen (whose recovery cuts torn tails) gets a known state.
            if writer.set_len(seg.len).is_err() {
                self.poisoned = true;
            }
            return Err(io_err("write segment", &seg.path)(e));
        }
        seg.push(seq, record_len);
        self.next_seq += 1;
        Ok(seq)
    }

    /// Creates the segment file whose first record is `first_seq` and makes
    /// it the active one.
    fn start_segment(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        let path = self.dir.join(segment_name(first_seq));
        // create_new: never clobber a file we do not know about.
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create segment", &path))?;
        self.dir_dirty = true;
        // The old active segment keeps its handle only until its pending
        // bytes are synced.
        if let Some(prev) = self.segments.last_mut()
            && prev.synced_len == prev.len
        {
            prev.writer = None;
        }
        self.segments
            .push(Segment::new(path, first_seq, Some(file)));
        Ok(())
    }

    /// fsyncs every segment with unsynced bytes (including ones rotated out
    /// since the last sync) and, if segments were created, the directory.
    /// After `Ok`, every record appended before is durable. After an error
    /// the spool is poisoned (see [`SpoolError::Poisoned`]): a failed fsync
    /// may have dropped dirty pages, so no later fsync can vouch for them.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.poisoned {
            return Err(SpoolError::Poisoned);
        }
        if let Err(e) = self.sync_files() {
            self.poisoned = true;
            return Err(e);
        }
        let last = self.segments.len().saturating_sub(1);
        for (i, seg) in self.segments.iter_mut().enumerate() {
            seg.synced_len = seg.len;
            if i != last {
                seg.writer = None;
            }
        }
        self.dir_dirty = false;
        self.durable_seq = self.next_seq - 1;
        Ok(())
    }

    fn sync_files(&self) -> Result<(), SpoolError> {
        for seg in &self.segments {
            if seg.synced_len < seg.len
                && let Some(w) = &seg.writer
            {
                // fdatasync is enough: it includes the size change.
                w.sync_data().map_err(io_err("fsync segment", &seg.path))?;
            }
        }
        if self.dir_dirty {
            meta::sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Highest seq that is durable (synced, or found on disk at open, or
    /// acked); 0 if none.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Up to `max_records` durable, unacked records with seq >= `from_seq`,
    /// in order, as (seq, payload); also stops before the payload bytes
    /// would pass `max_bytes`, but always returns at least one record if
    /// any is available. Empty if `max_records` is 0 or nothing is there.
    /// Never returns a record that is not yet synced. Reads go to disk
    /// (payloads are not kept in memory); a sparse offset index bounds the
    /// scan to find `from_seq` to about 64 KiB.
    pub fn read(
        &self,
        from_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let start = from_seq.max(self.ack.value().saturating_add(1));
        let mut out = Vec::new();
        if max_records == 0 || start > self.durable_seq {
            return Ok(out);
        }
        let first = self.segments.partition_point(|s| s.last_seq < start);
        let mut total = 0usize;
        for seg in &self.segments[first..] {
            if seg.first_seq > self.durable_seq {
                break;
            }
            if seg.read_into(
                start,
                self.durable_seq,
                max_records,
                max_bytes,
                &mut total,
                &mut out,
            )? {
                break;
            }
        }
        Ok(out)
    }

    /// Records that everything up to `seq` has been delivered: stores it
    /// durably in the ack file, then deletes the segment files all of whose
    /// records are <= `seq`. Acking at or below the current ack is a no-op.
    /// Acking above [`Spool::durable_seq`] is refused with
    /// [`SpoolError::AckBeyondDurable`] (not clamped: it means the caller
    /// is confused about what it sent). If a deletion fails the ack still
    /// stands and the deletion is retried by the next ack or open.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        if seq <= self.ack.value() {
            return Ok(());
        }
        if seq > self.durable_seq {
            return Err(SpoolError::AckBeyondDurable {
                seq,
                durable: self.durable_seq,
            });
        }
        // The ack must be durable before any segment goes: with segments
        // gone and the old ack on disk, a reopen would restart seqs below
        // ones the aggregator already has.
        self.ack.store(seq)?;
        let done = self
            .segments
            .iter()
            .take_while(|s| !s.is_empty() && s.last_seq <= seq)
            .count();
        let mut deleted = 0;
        let mut result = Ok(());
        for seg in &self.segments[..done] {
            // No directory fsync: if a deletion is lost in a crash, open
            // deletes the fully acked segment again.
            if let Err(e) = remove_segment(&seg.path) {
                result = Err(e);
                break;
            }
            deleted += 1;
        }
        self.segments.drain(..deleted);
        result
    }

    /// Last acked seq (0 if none).
    pub fn acked_seq(&self) -> u64 {
        self.ack.value()
    }

    /// Bytes of segment files not yet deleted (durable and buffered); this
    /// is what `max_bytes` limits.
    pub fn used_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Number of segment files not yet deleted.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Unacked records, durable or not yet synced.
    pub fn pending_records(&self) -> u64 {
        // Seqs above the ack are gap-free (recovery enforces it, appends
        // are consecutive), so this is a subtraction.
        (self.next_seq - 1).saturating_sub(self.ack.value())
    }

    /// For the crash simulation and invariant checks in tests: every live
    /// segment as (path, first seq, last seq, synced length, written length).
    #[cfg(test)]
    pub(crate) fn segment_files(&self) -> Vec<(PathBuf, u64, u64, u64, u64)> {
        self.segments
            .iter()
            .map(|s| (s.path.clone(), s.first_seq, s.last_seq, s.synced_len, s.len))
            .collect()
    }
}

/// An invariant of this module was broken; never expected in practice.
fn internal(what: &str) -> SpoolError {
    SpoolError::Corrupt(format!("internal error: {what}"))
}

/// Creates `dir` if missing, fsyncing its parent so the directory entry
/// itself survives a crash along with what is written inside it.
fn create_dir(dir: &Path) -> Result<(), SpoolError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        meta::sync_dir(parent)?;
    }
    Ok(())
}

/// Segment files of `dir` as (first seq, path), in seq order.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let Some(first_seq) = entry.file_name().to_str().and_then(parse_segment_name) else {
            continue;
        };
        out.push((first_seq, entry.path()));
    }
    out.sort_unstable_by_key(|&(seq, _)| seq);
    Ok(out)
}

fn open_append(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err("open segment", path))
}

/// Cuts a segment back to its valid prefix and makes that durable before
/// anything is appended after it.
fn truncate(path: &Path, len: u64) -> Result<(), SpoolError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open segment", path))?;
    f.set_len(len).map_err(io_err("truncate segment", path))?;
    f.sync_all().map_err(io_err("fsync segment", path))
}

fn remove_segment(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove segment", path)(e)),
    }
}
