//! One segment file of the spool: its naming, the in-memory summary kept for
//! it (seq range, lengths, sparse offset index), the recovery scan and the
//! bounded reads the forwarder does.
//!
//! A segment holds records with consecutive seqs starting at the seq in its
//! file name. This module must not decide policy (what to truncate, delete
//! or when to sync); [`super::Spool`] does. It must not keep payloads in
//! memory: reads go to disk through a fresh read handle each time.

use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::record::{HEADER_LEN, Header};
use super::{SpoolError, io_err};

/// Suffix of segment file names.
const SEGMENT_SUFFIX: &str = ".seg";
/// Digits in a segment name: enough for any u64, zero-padded so that
/// lexical order is seq order.
const NAME_DIGITS: usize = 20;
/// One index entry per this many bytes: a read scans at most this much of a
/// segment to find its start, and the index of a full 8 GiB spool stays
/// around 2 MiB.
const INDEX_STRIDE: u64 = 64 * 1024;
/// Read buffer size; records are read sequentially.
const READ_BUF: usize = 64 * 1024;

/// File name of the segment whose first record has `first_seq`.
pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:0NAME_DIGITS$}{SEGMENT_SUFFIX}")
}

/// Inverse of [`segment_name`]; `None` for anything that is not a segment.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// In-memory summary of one segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Seq of the first record (from the file name).
    pub(crate) first_seq: u64,
    /// Seq of the last record; `first_seq - 1` while empty.
    pub(crate) last_seq: u64,
    /// Full path of the file.
    pub(crate) path: PathBuf,
    /// Bytes of complete records written to the OS.
    pub(crate) len: u64,
    /// Bytes known to be on stable storage.
    pub(crate) synced_len: u64,
    /// Append handle; kept while this is the active segment or while it
    /// still has unsynced bytes (so `sync` can fsync it after a rotation).
    pub(crate) writer: Option<File>,
    /// Sparse (seq, byte offset) index, first record always included.
    index: Vec<(u64, u64)>,
}

/// A maximal stretch of valid records (complete, CRC-correct, consecutive
/// seqs) found in a segment file by [`Segment::scan`].
#[derive(Debug)]
pub(crate) struct Run {
    /// Byte offset of the run's first record in the scanned file.
    pub(crate) start: u64,
    /// Byte offset just past its last record.
    pub(crate) end: u64,
    /// Highest `synced` watermark any of its records carries.
    pub(crate) max_synced: u64,
    /// The run as a segment of its own: offsets relative to `start`, path
    /// of the scanned file (the caller renames it if the run moves).
    pub(crate) segment: Segment,
}

impl Run {
    /// Seq of the run's first record.
    pub(crate) fn first_seq(&self) -> u64 {
        self.segment.first_seq
    }

    /// Seq of the run's last record.
    pub(crate) fn last_seq(&self) -> u64 {
        self.segment.last_seq
    }
}

/// Outcome of scanning a segment file at open: every run of valid records,
/// in file order, with strictly increasing seqs. The bytes between and after
/// the runs are damage or a torn tail; telling which is the caller's job
/// (it needs every segment's watermarks).
#[derive(Debug)]
pub(crate) struct Scan {
    /// Size of the file on disk.
    pub(crate) file_len: u64,
    /// Valid runs in file order. The first starts at offset 0 only if the
    /// file's first record is intact.
    pub(crate) runs: Vec<Run>,
    /// The bytes after the last run start with a header whose length fits
    /// in the file but whose checksum fails. An interrupted write leaves a
    /// short record instead, so this is worth a warning even when the bytes
    /// are trimmed as a tail.
    pub(crate) complete_bad_tail: bool,
}

impl Segment {
    /// A new, empty segment at `path` whose first record will have
    /// `first_seq`.
    pub(crate) fn new(path: PathBuf, first_seq: u64, writer: Option<File>) -> Segment {
        Segment {
            first_seq,
            last_seq: first_seq.saturating_sub(1),
            path,
            len: 0,
            synced_len: 0,
            writer,
            index: Vec::new(),
        }
    }

    /// Whether the segment holds no record.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Accounts for a record of `record_len` bytes with `seq` that was just
    /// written at offset `self.len`.
    pub(crate) fn push(&mut self, seq: u64, record_len: u64) {
        let due = match self.index.last() {
            None => true,
            Some(&(_, off)) => self.len >= off + INDEX_STRIDE,
        };
        if due {
            self.index.push((seq, self.len));
        }
        self.last_seq = seq;
        self.len += record_len;
    }

    /// Reads the whole file and finds every run of valid records. Where a
    /// record fails (bad length, checksum or seq), it resynchronises: the
    /// next offset holding a complete, CRC-correct record whose seq is above
    /// the last valid one, and no further above it than the bytes skipped
    /// could have held records, starts a new run. I/O errors are returned,
    /// never mistaken for damage, so that a flaky disk cannot make recovery
    /// cut durable data. Peak memory is one segment file.
    pub(crate) fn scan(path: &Path, first_seq: u64) -> Result<Scan, SpoolError> {
        let bytes = fs::read(path).map_err(io_err("read", path))?;
        let n = bytes.len();
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = 0usize;
        let mut last = first_seq.wrapping_sub(1);
        let mut in_run = false;
        let mut complete_bad_tail = false;
        while pos < n {
            let want = last.wrapping_add(1);
            if let Some((h, rl)) = record_at(&bytes, pos, |seq| seq == want) {
                match runs.last_mut() {
                    Some(run) if in_run => run.push(&h, rl),
                    _ => runs.push(Run::new(path, pos, &h, rl)),
                }
                in_run = true;
                last = h.seq;
                pos += rl;
                continue;
            }
            let from = pos;
            let found = (from + 1..n).find_map(|p| {
                // Records lost between `last` and a candidate lie in
                // [from, p), each at least a header long.
                let max_gap = ((p - from) / HEADER_LEN) as u64;
                record_at(&bytes, p, |seq| {
                    seq > last && seq.wrapping_sub(last).wrapping_sub(1) <= max_gap
                })
                .map(|(h, rl)| (p, h, rl))
            });
            match found {
                Some((p, h, rl)) => {
                    runs.push(Run::new(path, p, &h, rl));
                    in_run = true;
                    last = h.seq;
                    pos = p + rl;
                }
                None => {
                    complete_bad_tail = complete_header_at(&bytes, from);
                    break;
                }
            }
        }
        Ok(Scan {
            file_len: n as u64,
            runs,
            complete_bad_tail,
        })
    }

    /// Appends to `out` the records of this segment with
    /// `start <= seq <= end`, stopping once `out` holds `max_records` or
    /// adding the next payload would pass `max_bytes` (payload bytes in
    /// `*total`; the first record overall is always taken). Returns `true`
    /// when a limit stopped it, so the caller does not go on to the next
    /// segment.
    ///
    /// Records here were validated by recovery or written by us, so any
    /// mismatch now is real corruption and is reported, not skipped: the
    /// forwarder must not silently lose or misnumber a batch.
    pub(crate) fn read_into(
        &self,
        start: u64,
        end: u64,
        max_records: usize,
        max_bytes: usize,
        total: &mut usize,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<bool, SpoolError> {
        let from = start.max(self.first_seq);
        // Greatest indexed seq <= from; the first record is always indexed.
        let at = self.index.partition_point(|&(seq, _)| seq <= from);
        let Some(&(mut expected, mut offset)) = at.checked_sub(1).and_then(|i| self.index.get(i))
        else {
            return Ok(false);
        };
        let path = &self.path;
        let mut file = File::open(path).map_err(io_err("open", path))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(io_err("seek", path))?;
        let mut reader = BufReader::with_capacity(READ_BUF, file);
        let corrupt = |what: &str, offset: u64, expected: u64| {
            SpoolError::Corrupt(format!(
                "{}: {what} at offset {offset} (expected seq {expected})",
                path.display()
            ))
        };
        while offset < self.len && expected <= end {
            let mut hb = [0u8; HEADER_LEN];
            reader.read_exact(&mut hb).map_err(io_err("read", path))?;
            let header = Header::parse(&hb);
            let Some(plen) = header.payload_len() else {
                return Err(corrupt("bad record length", offset, expected));
            };
            if header.seq != expected || offset + header.record_len() > self.len {
                return Err(corrupt("unexpected record", offset, expected));
            }
            if header.seq < from {
                reader
                    .seek_relative(i64::from(header.len))
                    .map_err(io_err("seek", path))?;
            } else {
                if !out.is_empty() && total.saturating_add(plen) > max_bytes {
                    return Ok(true);
                }
                let mut payload = vec![0u8; plen];
                reader
                    .read_exact(&mut payload)
                    .map_err(io_err("read", path))?;
                if !header.matches(&payload) {
                    return Err(corrupt("checksum mismatch", offset, expected));
                }
                *total += plen;
                out.push((header.seq, payload));
                if out.len() >= max_records {
                    return Ok(true);
                }
            }
            offset += header.record_len();
            expected += 1;
        }
        Ok(false)
    }
}

impl Run {
    fn new(path: &Path, start: usize, h: &Header, record_len: usize) -> Run {
        let mut segment = Segment::new(path.to_path_buf(), h.seq, None);
        segment.push(h.seq, record_len as u64);
        segment.synced_len = segment.len;
        Run {
            start: start as u64,
            end: (start + record_len) as u64,
            max_synced: h.synced,
            segment,
        }
    }

    fn push(&mut self, h: &Header, record_len: usize) {
        self.segment.push(h.seq, record_len as u64);
        self.segment.synced_len = self.segment.len;
        self.end += record_len as u64;
        self.max_synced = self.max_synced.max(h.synced);
    }
}

/// The record at `pos` if it is complete, its seq passes `seq_ok` (checked
/// before the CRC, which keeps resynchronisation cheap) and its checksum
/// matches; with its total length.
fn record_at(bytes: &[u8], pos: usize, seq_ok: impl Fn(u64) -> bool) -> Option<(Header, usize)> {
    let hb: &[u8; HEADER_LEN] = bytes
        .get(pos..pos.checked_add(HEADER_LEN)?)?
        .try_into()
        .ok()?;
    let h = Header::parse(hb);
    if !seq_ok(h.seq) {
        return None;
    }
    let plen = h.payload_len()?;
    let body = pos + HEADER_LEN;
    let payload = bytes.get(body..body.checked_add(plen)?)?;
    h.matches(payload).then_some((h, HEADER_LEN + plen))
}

/// Whether a header at `pos` claims a length that fits in the file.
fn complete_header_at(bytes: &[u8], pos: usize) -> bool {
    let Some(hb) = bytes
        .get(pos..pos.saturating_add(HEADER_LEN))
        .and_then(|b| <&[u8; HEADER_LEN]>::try_from(b).ok())
    else {
        return false;
    };
    let h = Header::parse(hb);
    h.payload_len()
        .is_some_and(|plen| pos + HEADER_LEN + plen <= bytes.len() && hb.iter().any(|&b| b != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_seq_and_round_trip() {
        let names: Vec<String> = [1u64, 9, 10, 100, u64::MAX]
            .iter()
            .map(|&s| segment_name(s))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for (n, s) in names.iter().zip([1u64, 9, 10, 100, u64::MAX]) {
            assert_eq!(parse_segment_name(n), Some(s));
        }
        assert_eq!(parse_segment_name("1.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000000a.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000001.tmp"), None);
        assert_eq!(parse_segment_name("99999999999999999999.seg"), None);
    }
}
