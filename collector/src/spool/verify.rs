//! Offline, read-only check of a spool directory (`adclick spool verify`):
//! runs the same scan and recovery plan as [`super::Spool::open`] and
//! reports it, changing nothing. Run it on a stopped collector: a live one
//! may be in the middle of writing its tail.
//!
//! This module must not write, rename, lock or delete anything.

use std::fmt;
use std::path::{Path, PathBuf};

use super::meta::{self, Incarnation};
use super::{Damage, SpoolError, list_segments, recover, scan_all};

/// One segment file as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    /// The file.
    pub path: PathBuf,
    /// Seq in its name.
    pub first_seq: u64,
    /// Size on disk.
    pub bytes: u64,
    /// Valid records in it.
    pub records: u64,
    /// Seq of its last valid record (if any).
    pub last_seq: Option<u64>,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The directory.
    pub dir: PathBuf,
    /// Every segment file in seq order.
    pub segments: Vec<SegmentReport>,
    /// Acked seq, `None` if both ack slots are damaged.
    pub acked_seq: Option<u64>,
    /// Ack slots that fail their checksum (0-2).
    pub damaged_ack_slots: u8,
    /// Incarnation from its file, `None` if missing or damaged.
    pub incarnation: Option<u64>,
    /// The incarnation copy in the ack file, `None` if damaged.
    pub incarnation_copy: Option<u64>,
    /// Highest seq known to have been synced (the recovery watermark).
    pub synced_seq: u64,
    /// Highest valid seq that recovery would keep.
    pub last_seq: u64,
    /// Damaged byte ranges inside synced data.
    pub damage: Vec<Damage>,
    /// Seq ranges those ranges cost.
    pub lost_seqs: Vec<(u64, u64)>,
    /// Bytes recovery would trim as an unsynced tail (not damage).
    pub tail_bytes: u64,
}

impl VerifyReport {
    /// Whether anything is damaged (data or metadata). A torn tail alone
    /// is not damage: it is what a crash leaves.
    pub fn is_damaged(&self) -> bool {
        !self.damage.is_empty()
            || !self.lost_seqs.is_empty()
            || self.damaged_ack_slots > 0
            || self.incarnation.is_none()
            || self.incarnation_copy != self.incarnation
    }
}

/// Scans the spool in `dir` without changing it.
pub fn verify(dir: &Path) -> Result<VerifyReport, SpoolError> {
    if !dir.is_dir() {
        return Err(SpoolError::Io {
            op: "open spool directory",
            path: dir.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    meta::refuse_old_format(dir)?;
    let files = list_segments(dir)?;
    let incarnation = match meta::read_incarnation(dir)? {
        Incarnation::Valid(v) => Some(v),
        Incarnation::Missing | Incarnation::Damaged => None,
    };
    let state = meta::read_ack_state(dir)?;
    let acked_seq = state.and_then(|s| s.value);
    let acked = acked_seq.unwrap_or_else(|| files.first().map_or(0, |&(first, _)| first - 1));
    let scans = scan_all(&files)?;
    let segments = scans
        .iter()
        .map(|s| SegmentReport {
            path: s.path.clone(),
            first_seq: s.first_seq,
            bytes: s.scan.file_len,
            records: s
                .scan
                .runs
                .iter()
                .map(|r| r.last_seq() - r.first_seq() + 1)
                .sum(),
            last_seq: s.scan.runs.last().map(|r| r.last_seq()),
        })
        .collect();
    let plan = recover::plan(scans, acked);
    let damage = plan
        .segments
        .iter()
        .flat_map(|sp| {
            sp.damaged.iter().map(|&(a, b)| Damage {
                segment: sp.path.clone(),
                offset: a,
                bytes: b - a,
                saved_to: None,
            })
        })
        .collect();
    // Only the trailing bytes that are not damage count as a tail; records
    // already acked are not reported at all.
    let tail_bytes = plan
        .segments
        .iter()
        .map(|sp| {
            let end_of_kept = sp.kept.last().map_or(0, |(r, _)| r.end);
            let damaged_after: u64 = sp
                .damaged
                .iter()
                .filter(|&&(a, _)| a >= end_of_kept)
                .map(|&(a, b)| b - a)
                .sum();
            if sp.kept.is_empty() {
                0
            } else {
                sp.file_len - end_of_kept - damaged_after
            }
        })
        .sum();
    Ok(VerifyReport {
        dir: dir.to_path_buf(),
        segments,
        acked_seq,
        damaged_ack_slots: state.map_or(2, |s| s.damaged_slots),
        incarnation,
        incarnation_copy: state.and_then(|s| s.incarnation),
        synced_seq: plan.watermark,
        last_seq: plan.last_kept.max(acked),
        lost_seqs: plan.lost,
        damage,
        tail_bytes,
    })
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |v: Option<u64>| v.map_or_else(|| "DAMAGED".to_string(), |v| format!("{v:016x}"));
        writeln!(f, "spool {}", self.dir.display())?;
        writeln!(
            f,
            "incarnation {} (copy in ack file: {})",
            hex(self.incarnation),
            hex(self.incarnation_copy)
        )?;
        match self.acked_seq {
            Some(a) => writeln!(
                f,
                "acked seq {a} ({} damaged ack slot(s))",
                self.damaged_ack_slots
            )?,
            None => writeln!(f, "acked seq DAMAGED (both ack slots)")?,
        }
        writeln!(
            f,
            "synced seq {}  last seq {}",
            self.synced_seq, self.last_seq
        )?;
        for s in &self.segments {
            let last = s
                .last_seq
                .map_or_else(|| "-".to_string(), |l| l.to_string());
            writeln!(
                f,
                "segment {}  first {}  last {last}  {} records  {} bytes",
                s.path.display(),
                s.first_seq,
                s.records,
                s.bytes
            )?;
        }
        for d in &self.damage {
            writeln!(
                f,
                "DAMAGED {} offset {} bytes {}",
                d.segment.display(),
                d.offset,
                d.bytes
            )?;
        }
        for &(a, b) in &self.lost_seqs {
            writeln!(f, "LOST seqs {a}..={b} ({} records)", b - a + 1)?;
        }
        if self.tail_bytes > 0 {
            writeln!(
                f,
                "torn tail: {} bytes after the last synced record (trimmed at open, not damage)",
                self.tail_bytes
            )?;
        }
        write!(
            f,
            "{}",
            if self.is_damaged() {
                "result: DAMAGED"
            } else {
                "result: ok"
            }
        )
    }
}
