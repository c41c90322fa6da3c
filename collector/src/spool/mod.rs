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
mod recover;
mod segment;
mod verify;

#[cfg(test)]
mod damage_proptests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meta::AckFile;
use segment::{Segment, parse_segment_name, segment_name};

pub use verify::{VerifyReport, verify};

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
    /// Appends fail with [`SpoolError::DiskLow`] rather than leave less than
    /// this many bytes free on the filesystem holding the spool, whatever
    /// `max_bytes` says: the spool must refuse clicks (503) before the disk
    /// fills, not fail an fsync when it has. 0 turns the check off. Default
    /// 256 MiB.
    pub min_free_bytes: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 8 * 1024 * 1024 * 1024,
            min_free_bytes: 256 * 1024 * 1024,
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
    /// The filesystem holding the spool has less than `min_free_bytes`
    /// free (after this record); nothing was written. Clears as space frees.
    #[error("disk almost full: {free} bytes free on the spool's filesystem, floor {min}")]
    DiskLow {
        /// Bytes free for unprivileged writers.
        free: u64,
        /// The configured `min_free_bytes`.
        min: u64,
        /// Free bytes this append needed (the floor plus the record).
        need: u64,
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

/// What [`Spool::open`] found and repaired. Everything in `damage`,
/// `lost_seqs` and `repairs` is a loss or repair the operator must hear
/// about: the caller logs it at ERROR and counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Unacked records found (all durable now).
    pub records: u64,
    /// Bytes trimmed or deleted silently: the unsynced tail of a crash,
    /// records already acked, leftovers of an interrupted repair.
    pub truncated_bytes: u64,
    /// Segment files kept.
    pub segments: usize,
    /// Damaged byte ranges found inside synced data, each moved to the
    /// spool's `corrupt/` folder.
    pub damage: Vec<Damage>,
    /// Inclusive seq ranges of synced (possibly acknowledged) records lost
    /// to that damage, for reconciliation.
    pub lost_seqs: Vec<(u64, u64)>,
    /// Records in `lost_seqs`.
    pub lost_records: u64,
    /// Repairs of the metadata files (ack slots, incarnation), one sentence
    /// each.
    pub repairs: Vec<String>,
    /// A trimmed tail whose first record looked complete but failed its
    /// checksum: a torn write leaves a short record, so this is either a
    /// power loss in the middle of a write or damage to the last group
    /// commit before a crash (which nothing later vouches for). Worth a
    /// warning.
    pub suspicious_tail: Option<String>,
}

/// One damaged byte range moved out of a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Segment file the bytes were in.
    pub segment: PathBuf,
    /// Byte offset in that file.
    pub offset: u64,
    /// Length in bytes.
    pub bytes: u64,
    /// Where the bytes were saved (under `corrupt/`); `None` from
    /// [`verify`], which changes nothing.
    pub saved_to: Option<PathBuf>,
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
    /// Bytes of released segment files not deleted yet ([`Released`]): still on disk, so
    /// still counted by [`Spool::used_bytes`].
    releasing: Arc<AtomicU64>,
    /// Held only for its lock.
    _lock: File,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and recovers it; see
    /// the module docs for the rules. Fails if another `Spool` holds the
    /// directory, or with [`SpoolError::Corrupt`] when damage cannot be
    /// repaired without risking double counting (both copies of the
    /// incarnation lost while records are pending).
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> {
        create_dir(dir)?;
        let lock = meta::lock_dir(dir)?;
        meta::refuse_old_format(dir)?;
        meta::remove_tmp_files(dir)?;
        remove_tmp_segments(dir)?;
        let files = list_segments(dir)?;
        let mut recovery = Recovery::default();
        let inc_file = meta::read_incarnation(dir)?;
        if inc_file == meta::Incarnation::Missing && files.is_empty() {
            // Never initialised, or a crash in the middle of it.
            meta::initialise(dir)?;
        }
        let (mut ack, state) = AckFile::open(dir)?;
        let inc_file = meta::read_incarnation(dir)?;
        let incarnation = resolve_incarnation(
            dir,
            inc_file,
            &state,
            !files.is_empty(),
            &mut recovery.repairs,
        )?;
        // A damaged slot means the newest ack may be lost (the other slot can hold an
        // older value). Resending acked records is harmless (the aggregator drops seqs at
        // or below its high-water mark), and a fully acked segment is deleted only after
        // the ack moved past it, so everything below the oldest segment is acked. With no
        // segment left the next seq is unknown: only a fresh incarnation (a new collector
        // id) can never reuse a seq the aggregator has seen. (A torn slot write cannot
        // leave the spool without segments: they are deleted after the ack is stored.)
        let ack_path = dir.join(meta::ACK_FILE);
        let (acked, incarnation) = match (state.value, state.damaged_slots, files.first()) {
            (Some(v), 0, _) => (v, incarnation),
            (v, _, Some(&(first, _))) => {
                let acked = v.unwrap_or(0).max(first - 1);
                recovery.repairs.push(format!(
                    "{}: {} ack slot(s) damaged; acked seq set to {acked} (the newer of the \
                     readable slot and the seq before the oldest segment): records after it \
                     are resent, and the aggregator drops those it already has",
                    ack_path.display(),
                    state.damaged_slots
                ));
                (acked, incarnation)
            }
            (_, _, None) => {
                let fresh = meta::new_incarnation();
                meta::write_incarnation(dir, fresh)?;
                recovery.repairs.push(format!(
                    "{}: {} ack slot(s) damaged and no records pending; new incarnation \
                     {fresh:016x} (a new collector id) so that no seq is ever reused",
                    ack_path.display(),
                    state.damaged_slots
                ));
                (0, fresh)
            }
        };
        if state.value != Some(acked)
            || state.damaged_slots > 0
            || state.incarnation != Some(incarnation)
        {
            ack.rewrite(acked, incarnation)?;
        }

        let scans = scan_all(&files)?;
        let plan = recover::plan(scans, acked);
        // Losses a previous open found but whose report was never confirmed (a crash
        // before the caller logged them, or in the middle of the repair) are reported
        // again, with the new ones.
        let unreported = read_pending(dir)?;
        let (segments, dir_changed) = carry_out(dir, plan, unreported, &mut recovery)?;
        if dir_changed {
            meta::sync_dir(dir)?;
        }
        let mut segments = segments;
        // What survives recovery counts as durable and may be forwarded: after a kill -9
        // its bytes can still be only in the page cache, so make them durable now (a
        // no-op for clean files), or a later power loss could cut records whose seqs the
        // aggregator has seen and reuse them.
        for seg in &segments {
            sync_file(&seg.path)?;
        }
        if let Some(seg) = segments.last_mut() {
            seg.writer = Some(open_append(&seg.path)?);
        }
        let last = segments.last().map_or(0, |s| s.last_seq);
        let durable_seq = last.max(acked);
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
            releasing: Arc::default(),
            _lock: lock,
        };
        let mut spool = spool;
        if let Some(tail) = recovery.suspicious_tail.as_mut() {
            // The trimmed record looked complete: it may have been synced and forwarded
            // (damage to the last commit, which nothing later vouches for). Never hand its
            // seq out again: a tombstone takes it (the forwarder sends nothing for it).
            let floor = std::mem::replace(&mut spool.opts.min_free_bytes, 0);
            let seq = spool.append(&[]);
            spool.opts.min_free_bytes = floor;
            let seq = seq?;
            spool.sync()?;
            tail.push_str(&format!(
                "; seq {seq} is skipped with a tombstone in case the trimmed record had been \
                 forwarded"
            ));
        }
        recovery.records = spool.pending_records();
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
        if self.opts.min_free_bytes > 0
            && let Some(free) = free_bytes(&self.dir)
            && free < self.opts.min_free_bytes.saturating_add(record_len)
        {
            return Err(SpoolError::DiskLow {
                free,
                min: self.opts.min_free_bytes,
                need: self.opts.min_free_bytes.saturating_add(record_len),
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
        record::encode(&mut self.buf, seq, self.durable_seq, len, payload);
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
    /// stands and the deletion is retried by the next open.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        let mut released = self.ack_releasing(seq)?;
        let renaming = released.error.take();
        released.remove()?;
        renaming.map_or(Ok(()), Err)
    }

    /// [`Spool::ack`], except that the files of the segments it releases are left for the
    /// caller to delete ([`Released::remove`]) once it no longer holds whatever guards the
    /// spool: unlinking a 64 MiB segment can take ~15 ms (the filesystem frees its
    /// extents), which appends waiting on that guard would otherwise wait for. Here each
    /// released file is only renamed (`{seq}.seg.released`, a metadata change), so a spool
    /// opened on the directory meanwhile never lists it; its bytes count in
    /// [`Spool::used_bytes`] until it is deleted. A rename that fails keeps that segment
    /// and the ones after it (retried by the next ack; the error is in
    /// [`Released::error`]). Files left by a crash before their deletion are deleted by the
    /// next open.
    pub fn ack_releasing(&mut self, seq: u64) -> Result<Released, SpoolError> {
        let mut released = Released {
            files: Vec::new(),
            pending: self.releasing.clone(),
            error: None,
        };
        if seq <= self.ack.value() {
            return Ok(released);
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
        let mut renamed = 0;
        for seg in &self.segments[..done] {
            let to = released_name(&seg.path);
            match fs::rename(&seg.path, &to) {
                Ok(()) => {}
                // Already gone (deleted by hand): nothing left to delete.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    renamed += 1;
                    continue;
                }
                Err(e) => {
                    released.error = Some(io_err("rename segment", &seg.path)(e));
                    break;
                }
            }
            self.releasing.fetch_add(seg.len, Ordering::Relaxed);
            released.files.push((to, seg.len));
            renamed += 1;
        }
        self.segments.drain(..renamed);
        Ok(released)
    }

    /// Confirms that the losses and damage in the last [`Recovery`] were reported (logged
    /// and counted): until then they are on record in `corrupt/pending` and every open
    /// reports them again, so a crash between the repair and the report cannot hide them.
    pub fn damage_reported(&self) -> Result<(), SpoolError> {
        let path = self.dir.join(CORRUPT_DIR).join(PENDING_FILE);
        match fs::remove_file(&path) {
            Ok(()) => meta::sync_dir(&self.dir.join(CORRUPT_DIR)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Last acked seq (0 if none).
    pub fn acked_seq(&self) -> u64 {
        self.ack.value()
    }

    /// Bytes of segment files not yet deleted (durable and buffered); this
    /// is what `max_bytes` limits.
    pub fn used_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum::<u64>() + self.releasing.load(Ordering::Relaxed)
    }

    /// Number of segment files not yet deleted.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Unacked records, durable or not yet synced.
    pub fn pending_records(&self) -> u64 {
        // Seqs are consecutive within a segment; between segments there may
        // be a hole left by damage (see `recover`).
        let acked = self.ack.value();
        self.segments
            .iter()
            .filter(|s| !s.is_empty() && s.last_seq > acked)
            .map(|s| s.last_seq - s.first_seq.max(acked + 1) + 1)
            .sum()
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

/// Segment files an ack released ([`Spool::ack_releasing`]), renamed, to delete.
#[derive(Debug, Default)]
#[must_use = "the released segment files stay on disk until `remove` (or the next open)"]
pub struct Released {
    /// `(renamed path, bytes)`.
    files: Vec<(PathBuf, u64)>,
    /// The spool's count of released bytes not deleted yet.
    pending: Arc<AtomicU64>,
    /// Why a segment that could have been released was not (kept; the next ack retries).
    pub error: Option<SpoolError>,
}

impl Released {
    /// Whether there is nothing to delete.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Deletes the files, each uncounted from the spool's bytes once gone. No directory
    /// fsync: a deletion lost in a crash, or one that fails (its bytes stay counted), is
    /// redone by the next open.
    pub fn remove(self) -> Result<(), SpoolError> {
        let mut result = Ok(());
        for (path, bytes) in &self.files {
            match remove_segment(path) {
                Ok(()) => {
                    self.pending.fetch_sub(*bytes, Ordering::Relaxed);
                }
                Err(e) => result = Err(e),
            }
        }
        result
    }
}

/// Suffix of a segment file an ack released, until it is deleted.
const RELEASED_SEGMENT_SUFFIX: &str = ".released";

/// The name a released segment file takes (not a segment name: no open lists it).
fn released_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(RELEASED_SEGMENT_SUFFIX);
    PathBuf::from(name)
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

/// Name of the folder (inside the spool directory) that damaged byte ranges
/// are moved to, with a `report.log` line per range.
pub const CORRUPT_DIR: &str = "corrupt";

/// Suffix of a moved run's segment file while it is being written.
const TMP_SEGMENT_SUFFIX: &str = ".tmp";

/// Removes `{seq}.seg.tmp` leftovers of a repair interrupted by a crash, and released
/// segment files (`{seq}.seg.released`) a crash left before their deletion.
fn remove_tmp_segments(dir: &Path) -> Result<(), SpoolError> {
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let name = entry.file_name();
        let is_tmp = name
            .to_str()
            .and_then(|n| {
                n.strip_suffix(TMP_SEGMENT_SUFFIX)
                    .or_else(|| n.strip_suffix(RELEASED_SEGMENT_SUFFIX))
            })
            .and_then(parse_segment_name)
            .is_some();
        if is_tmp {
            remove_segment(&entry.path())?;
        }
    }
    Ok(())
}

/// Picks the incarnation: the file, else its copy in the ack file (and
/// restores the file), else a fresh one when no records are pending. With
/// records pending and both copies lost, a fresh id could make the
/// aggregator count records it already has a second time, so that needs an
/// operator.
fn resolve_incarnation(
    dir: &Path,
    file: meta::Incarnation,
    state: &meta::AckState,
    records_pending: bool,
    repairs: &mut Vec<String>,
) -> Result<u64, SpoolError> {
    let path = dir.join(meta::INCARNATION_FILE);
    match (file, state.incarnation) {
        (meta::Incarnation::Valid(v), copy) => {
            if copy.is_some_and(|c| c != v) {
                repairs.push(format!(
                    "{}: the incarnation copy in the ack file differed; kept the file's \
                     {v:016x}",
                    path.display()
                ));
            } else if copy.is_none() {
                repairs.push(format!(
                    "{}: incarnation copy damaged; rewritten from the file",
                    dir.join(meta::ACK_FILE).display()
                ));
            }
            Ok(v)
        }
        (_, Some(c)) => {
            meta::write_incarnation(dir, c)?;
            repairs.push(format!(
                "{}: damaged or missing; restored {c:016x} from the copy in the ack file",
                path.display()
            ));
            Ok(c)
        }
        (_, None) if !records_pending => {
            let fresh = meta::new_incarnation();
            meta::write_incarnation(dir, fresh)?;
            repairs.push(format!(
                "{}: both copies of the incarnation damaged and no records pending; new \
                 incarnation {fresh:016x} (a new collector id)",
                path.display()
            ));
            Ok(fresh)
        }
        (_, None) => Err(SpoolError::Corrupt(format!(
            "{}: the incarnation file and its copy in the ack file are both damaged while \
             records are pending. The collector id ({{collector_id}}-{{incarnation}}) is logged \
             at every start as `collector_id=...`: restore its last 16 hex digits with \
             `adclick spool set-incarnation {} <hex>`, or `--new` to resend the pending records \
             under a new id (the aggregator's impression dedup drops clicks it already counted, \
             within the dedup window). See docs/operations.md, 'Spool damage'.",
            path.display(),
            dir.display()
        ))),
    }
}

/// Sets the incarnation id of a spool that is not open (operator repair,
/// `adclick spool set-incarnation`): writes the incarnation file and the
/// copy in the ack file, keeping the acked seq if it is readable.
pub fn set_incarnation(dir: &Path, incarnation: u64) -> Result<(), SpoolError> {
    let _lock = meta::lock_dir(dir)?;
    let (mut ack, state) = AckFile::open(dir)?;
    let acked = match (state.value, list_segments(dir)?.first()) {
        (Some(v), _) => v,
        (None, Some(&(first, _))) => first - 1,
        (None, None) => 0,
    };
    ack.rewrite(acked, incarnation)?;
    meta::write_incarnation(dir, incarnation)
}

/// A fresh random incarnation id (for `set-incarnation --new`).
pub fn random_incarnation() -> u64 {
    meta::new_incarnation()
}

/// Scans every segment file (read-only).
fn scan_all(files: &[(u64, PathBuf)]) -> Result<Vec<recover::SegmentScan>, SpoolError> {
    files
        .iter()
        .map(|(first_seq, path)| {
            Ok(recover::SegmentScan {
                first_seq: *first_seq,
                path: path.clone(),
                scan: Segment::scan(path, *first_seq)?,
            })
        })
        .collect()
}

/// Bytes `[start, end)` of a file.
fn read_range(path: &Path, start: u64, end: u64) -> Result<Vec<u8>, SpoolError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).map_err(io_err("open", path))?;
    f.seek(SeekFrom::Start(start))
        .map_err(io_err("seek", path))?;
    let mut buf = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0));
    f.take(end - start)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    Ok(buf)
}

/// Writes `bytes` to `path` durably (the caller fsyncs the directory).
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let mut f = File::create(path).map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Carries out a recovery plan: saves damage to `corrupt/`, moves every
/// run that follows damage into a segment file of its own, trims and
/// deletes the rest. Returns the live segments and whether the directory
/// changed (needs an fsync).
///
/// Crash safety: damage is saved before anything is removed; moved runs
/// are written (temp file, fsync, rename) before their source is cut, and
/// a copy left behind by a crash in between is a run that overlaps kept
/// records, which the next plan drops.
fn carry_out(
    dir: &Path,
    plan: recover::Plan,
    unreported: Pending,
    recovery: &mut Recovery,
) -> Result<(Vec<Segment>, bool), SpoolError> {
    use std::collections::HashSet;
    let mut changed = false;
    recovery.lost_seqs = unreported.lost;
    recovery.lost_seqs.extend(plan.lost.iter().copied());
    recovery.lost_records = recovery.lost_seqs.iter().map(|&(a, b)| b - a + 1).sum();
    recovery.damage = unreported.damage;
    let had_unreported = !recovery.damage.is_empty() || !recovery.lost_seqs.is_empty();

    // 1. Save every damaged range before anything is cut.
    let corrupt = dir.join(CORRUPT_DIR);
    let mut report = String::new();
    for sp in &plan.segments {
        for &(start, end) in &sp.damaged {
            if !corrupt.is_dir() {
                create_dir(&corrupt)?;
            }
            let name = sp.path.file_name().map_or_else(
                || "segment".to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            let saved = corrupt.join(format!("{name}.{start}-{end}.bin"));
            write_file(&saved, &read_range(&sp.path, start, end)?)?;
            report.push_str(&format!(
                "segment={} offset={start} bytes={} saved_as={}\n",
                sp.path.display(),
                end - start,
                saved.display()
            ));
            recovery.damage.push(Damage {
                segment: sp.path.clone(),
                offset: start,
                bytes: end - start,
                saved_to: Some(saved),
            });
        }
        if sp.suspicious_tail {
            recovery.suspicious_tail = Some(format!(
                "{}: trimmed a tail whose first record looked complete but failed its checksum \
                 (power loss mid-write, or damage to the last commit before a crash)",
                sp.path.display()
            ));
        }
    }
    if !report.is_empty() {
        for &(a, b) in &plan.lost {
            report.push_str(&format!("lost_seqs={a}-{b}\n"));
        }
        let log = corrupt.join("report.log");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err("open", &log))?;
        f.write_all(report.as_bytes())
            .map_err(io_err("write", &log))?;
        f.sync_all().map_err(io_err("fsync", &log))?;
        meta::sync_dir(&corrupt)?;
    }
    // Before anything is cut: the losses stay on record until the caller confirms it
    // reported them (`Spool::damage_reported`).
    if had_unreported || !report.is_empty() {
        write_pending(dir, &recovery.lost_seqs, &recovery.damage)?;
    }

    // 2. Files with nothing to keep go first, so that no moved run's new
    // name can collide with a file about to be deleted.
    let target_of = |run: &segment::Run, loss: &Option<(u64, u64)>| {
        dir.join(segment_name(loss.map_or(run.first_seq(), |(a, _)| a)))
    };
    let targets: HashSet<PathBuf> = plan
        .segments
        .iter()
        .flat_map(|sp| sp.kept.iter())
        .filter(|(r, loss)| r.start != 0 || loss.is_some())
        .map(|(r, loss)| target_of(r, loss))
        .collect();
    for sp in &plan.segments {
        recovery.truncated_bytes += sp.dropped_bytes;
        if sp.kept.is_empty() && !targets.contains(&sp.path) {
            remove_segment(&sp.path)?;
            changed = true;
        }
    }

    // 3. Move runs that follow damage into files of their own, after a
    // tombstone per lost seq.
    let mut segments = Vec::new();
    for sp in plan.segments {
        let keeps_file = sp.keeps_file();
        let mut in_place = None;
        let mut moved = Vec::new();
        // Every moved run is read before anything is written: a moved run's new name can
        // be its own source file's (damage at the start of a segment).
        let mut to_move = Vec::new();
        for (mut run, loss) in sp.kept {
            if run.start == 0 && loss.is_none() {
                run.segment.path = sp.path.clone();
                in_place = Some(run);
                continue;
            }
            let source = read_range(&sp.path, run.start, run.end)?;
            to_move.push((run, loss, source));
        }
        // A run that takes its source's own name goes last: until every other run from the
        // source is durable elsewhere, the source must stay as it is.
        to_move.sort_by_key(|(run, loss, _)| target_of(run, loss) == sp.path);
        for (run, loss, source) in to_move {
            let target = target_of(&run, &loss);
            let first = loss.map_or(run.first_seq(), |(a, _)| a);
            let mut bytes = Vec::new();
            let mut rec = Vec::new();
            if let Some((a, b)) = loss {
                for seq in a..=b {
                    record::encode(&mut rec, seq, seq - 1, 0, &[]);
                    bytes.extend_from_slice(&rec);
                }
            }
            bytes.extend_from_slice(&source);
            let tmp = dir.join(format!("{}{TMP_SEGMENT_SUFFIX}", segment_name(first)));
            write_file(&tmp, &bytes)?;
            fs::rename(&tmp, &target).map_err(io_err("rename", &target))?;
            meta::sync_dir(dir)?;
            changed = true;
            let mut scan = Segment::scan(&target, first)?;
            match (scan.runs.pop(), scan.runs.is_empty()) {
                (Some(r), true) if r.end == bytes.len() as u64 => {
                    let mut seg = r.segment;
                    seg.path = target;
                    moved.push(seg);
                }
                _ => return Err(internal("a repaired segment does not read back")),
            }
        }
        // 4. The source is cut or goes once its runs are safe elsewhere.
        if let Some(run) = in_place {
            if run.end < sp.file_len {
                truncate(&sp.path, run.end)?;
            }
            segments.push(run.segment);
        } else if !keeps_file && !targets.contains(&sp.path) && sp.path.exists() {
            remove_segment(&sp.path)?;
            changed = true;
        }
        moved.sort_by_key(|s: &Segment| s.first_seq);
        segments.extend(moved);
    }
    Ok((segments, changed))
}

/// Bytes free for unprivileged writers on the filesystem holding `dir`;
/// `None` where that cannot be known (then only `max_bytes` applies).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::fs::statvfs(dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// fsyncs a file (data and size).
fn sync_file(path: &Path) -> Result<(), SpoolError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("fsync segment", path))
}

/// File in `corrupt/` listing losses not yet confirmed as reported.
const PENDING_FILE: &str = "pending";

/// What `corrupt/pending` holds.
#[derive(Debug, Default)]
struct Pending {
    lost: Vec<(u64, u64)>,
    damage: Vec<Damage>,
}

/// Reads `corrupt/pending` (tab-separated lines: `lost<TAB>first<TAB>last`,
/// `damage<TAB>offset<TAB>bytes<TAB>saved<TAB>segment`); empty if there is none. Lines
/// that do not parse are skipped: the file is a reminder, `report.log` is the record.
fn read_pending(dir: &Path) -> Result<Pending, SpoolError> {
    let path = dir.join(CORRUPT_DIR).join(PENDING_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Pending::default()),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return Ok(Pending::default()),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let mut out = Pending::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["lost", a, b] => {
                if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                    out.lost.push((a, b));
                }
            }
            ["damage", off, bytes, saved, seg] => {
                if let (Ok(offset), Ok(bytes)) = (off.parse(), bytes.parse()) {
                    out.damage.push(Damage {
                        segment: PathBuf::from(seg),
                        offset,
                        bytes,
                        saved_to: (*saved != "-").then(|| PathBuf::from(saved)),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Writes `corrupt/pending` atomically (temp file, fsync, rename, directory fsync).
fn write_pending(dir: &Path, lost: &[(u64, u64)], damage: &[Damage]) -> Result<(), SpoolError> {
    let corrupt = dir.join(CORRUPT_DIR);
    if !corrupt.is_dir() {
        create_dir(&corrupt)?;
    }
    let mut text = String::new();
    for &(a, b) in lost {
        text.push_str(&format!("lost\t{a}\t{b}\n"));
    }
    for d in damage {
        let saved = d
            .saved_to
            .as_ref()
            .map_or_else(|| "-".to_string(), |p| p.display().to_string());
        text.push_str(&format!(
            "damage\t{}\t{}\t{saved}\t{}\n",
            d.offset,
            d.bytes,
            d.segment.display()
        ));
    }
    let tmp = corrupt.join(format!("{PENDING_FILE}.tmp"));
    write_file(&tmp, text.as_bytes())?;
    let path = corrupt.join(PENDING_FILE);
    fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
    meta::sync_dir(&corrupt)
}
