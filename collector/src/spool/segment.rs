//! One segment file of the spool: its naming, the in-memory summary kept for
//! it (seq range, lengths, sparse offset index), the recovery scan and the
//! bounded reads the forwarder does.
//!
//! A segment holds records with consecutive seqs starting at the seq in its
//! file name. This module must not decide policy (what to truncate, delete
//! or when to sync); [`super::Spool`] does. It must not keep payloads in
//! memory: reads go to disk through a fresh read handle each time.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
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

/// Outcome of scanning a segment file at open.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Bytes of the file covered by valid records.
    pub(crate) valid_len: u64,
    /// Size of the file on disk.
    pub(crate) file_len: u64,
    /// Summary of the valid prefix (only meaningful if `valid_len > 0`).
    pub(crate) segment: Segment,
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

    /// Reads the file from the start and keeps the longest prefix of valid
    /// records: complete, CRC-correct, seqs consecutive from `first_seq`.
    /// I/O errors are returned, never mistaken for a torn tail, so that a
    /// flaky disk cannot make recovery cut durable data.
    pub(crate) fn scan(path: &Path, first_seq: u64) -> Result<Scan, SpoolError> {
        let mut segment = Segment::new(path.to_path_buf(), first_seq, None);
        let file = File::open(path).map_err(io_err("open", path))?;
        let file_len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut reader = BufReader::with_capacity(READ_BUF, file);
        let mut payload = Vec::new();
        loop {
            let remaining = file_len - segment.len;
            if remaining < HEADER_LEN as u64 {
                break;
            }
            let mut hb = [0u8; HEADER_LEN];
            read_exact_or_eof(&mut reader, &mut hb, path)?;
            let header = Header::parse(&hb);
            let Some(plen) = header.payload_len() else {
                break;
            };
            if header.seq != segment.last_seq.wrapping_add(1) || header.record_len() > remaining {
                break;
            }
            payload.resize(plen, 0);
            read_exact_or_eof(&mut reader, &mut payload, path)?;
            if !header.matches(&payload) {
                break;
            }
            segment.push(header.seq, header.record_len());
        }
        segment.synced_len = segment.len;
        Ok(Scan {
            valid_len: segment.len,
            file_len,
            segment,
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

/// `read_exact` that maps a short read to `Ok` with a zeroed tail instead
/// of an error: during recovery a file can shrink under us only if someone
/// else is writing it, and a zeroed header or payload then simply fails
/// validation like any torn record would.
fn read_exact_or_eof(
    reader: &mut impl Read,
    buf: &mut [u8],
    path: &Path,
) -> Result<(), SpoolError> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            buf.fill(0);
            Ok(())
        }
        Err(e) => Err(io_err("read", path)(e)),
    }
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
