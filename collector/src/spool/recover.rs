//! Recovery planning: given the scan of every segment file and the acked
//! seq, decides what each byte of the spool is: a record to keep, damage to
//! move to `corrupt/`, or a tail to trim. Pure: it reads and writes nothing,
//! so [`super::Spool::open`] (which then carries the plan out) and
//! [`super::verify`] (which only reports it) share it.
//!
//! # Torn tail or damage?
//! Every record carries `synced`: the spool's durable seq when it was
//! appended. The highest `synced` found anywhere (or the acked seq) is the
//! watermark `V`: every record up to `V` was fsynced, so 202s may have been
//! answered for it. A hole in the seqs whose first missing seq is `<= V` is
//! damage to synced data: the hole is reported as lost, and every valid
//! record after it is kept. A hole above `V` can only be an unsynced tail
//! of a crash (page write-back may reorder, so later unsynced bytes can
//! survive where earlier ones did not): it and everything after it is
//! trimmed, as it always was, and nothing is reported.
//!
//! What this cannot see: damage inside the very last group commit before a
//! crash, which no later record vouches for. It is trimmed like a torn tail;
//! when its header says the record was complete (a torn write leaves a
//! short one) the scan flags it and `open` logs a warning.

use std::path::PathBuf;

use super::segment::{Run, Scan};

/// One segment file and its scan.
#[derive(Debug)]
pub(crate) struct SegmentScan {
    /// Seq in the file name.
    pub(crate) first_seq: u64,
    /// The file.
    pub(crate) path: PathBuf,
    /// What [`super::segment::Segment::scan`] found.
    pub(crate) scan: Scan,
}

/// The fate of one segment file.
#[derive(Debug)]
pub(crate) struct SegmentPlan {
    /// The file.
    pub(crate) path: PathBuf,
    /// Its size.
    pub(crate) file_len: u64,
    /// Runs to keep, in order, each with the seq range lost right before
    /// it (if any). A run starting at offset 0 with no loss before it stays
    /// in the file (cut to its end); every other one moves to a file of its
    /// own, after a tombstone record (empty payload) per lost seq, so that
    /// the log is gap-free again and the loss is reported once.
    pub(crate) kept: Vec<(Run, Option<(u64, u64)>)>,
    /// Byte ranges `[start, end)` of damage inside the log.
    pub(crate) damaged: Vec<(u64, u64)>,
    /// Bytes trimmed or deleted silently: a torn tail, leftovers of an
    /// interrupted repair (records already acked are not counted).
    pub(crate) dropped_bytes: u64,
    /// The trimmed tail of this file starts with a complete-looking record
    /// that fails its checksum (see the module docs).
    pub(crate) suspicious_tail: bool,
}

impl SegmentPlan {
    /// Whether the file stays (with its first run in place).
    pub(crate) fn keeps_file(&self) -> bool {
        self.kept
            .first()
            .is_some_and(|(r, loss)| r.start == 0 && loss.is_none())
    }
}

/// What happens to one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Continues the log.
    Keep,
    /// Kept, after a hole of synced records lost to damage (inclusive).
    KeepAfterLoss(u64, u64),
    /// Every record in it is acked: goes silently.
    Acked,
    /// Dropped: after a torn tail, or a leftover copy.
    Drop,
}

/// The whole plan.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Every segment file, in seq order.
    pub(crate) segments: Vec<SegmentPlan>,
    /// Inclusive seq ranges of synced records lost to damage.
    pub(crate) lost: Vec<(u64, u64)>,
    /// Highest kept seq (0 if nothing is kept).
    pub(crate) last_kept: u64,
    /// The synced watermark `V` (see the module docs).
    pub(crate) watermark: u64,
}

/// Decides the fate of every run and byte; see the module docs.
pub(crate) fn plan(scans: Vec<SegmentScan>, acked: u64) -> Plan {
    let watermark = scans
        .iter()
        .flat_map(|s| &s.scan.runs)
        .map(|r| r.max_synced)
        .fold(acked, u64::max);

    // Pass 1: keep or drop each run, in seq order.
    let mut last_kept = 0u64;
    let mut torn = false;
    let mut lost = Vec::new();
    let mut decisions: Vec<Vec<Fate>> = Vec::with_capacity(scans.len());
    for seg in &scans {
        let mut fates = Vec::with_capacity(seg.scan.runs.len());
        for run in &seg.scan.runs {
            let floor = last_kept.max(acked);
            let fate = if run.last_seq() <= acked && !torn {
                Fate::Acked
            } else if torn || run.last_seq() <= floor || run.first_seq() <= last_kept {
                // After a torn tail, or overlapping what is kept (a copy
                // left by an interrupted repair).
                Fate::Drop
            } else if run.first_seq() > floor + 1 {
                let first_missing = floor + 1;
                if first_missing <= watermark {
                    lost.push((first_missing, run.first_seq() - 1));
                    Fate::KeepAfterLoss(first_missing, run.first_seq() - 1)
                } else {
                    torn = true;
                    Fate::Drop
                }
            } else {
                Fate::Keep
            };
            if matches!(fate, Fate::Keep | Fate::KeepAfterLoss(..)) {
                last_kept = run.last_seq();
            }
            fates.push(fate);
        }
        decisions.push(fates);
    }

    // Kept runs in order: bytes not kept are damage if the next kept run
    // follows a loss, else dropped (a torn tail, acked, or junk between
    // records that cost no seq).
    let kept_runs: Vec<(usize, u64, bool)> = decisions
        .iter()
        .enumerate()
        .flat_map(|(i, fates)| {
            let runs = &scans[i].scan.runs;
            fates.iter().zip(runs).filter_map(move |(f, r)| match f {
                Fate::Keep => Some((i, r.start, false)),
                Fate::KeepAfterLoss(..) => Some((i, r.start, true)),
                Fate::Acked | Fate::Drop => None,
            })
        })
        .collect();
    let is_damage = |i: usize, offset: u64| {
        kept_runs
            .iter()
            .find(|&&(ri, start, _)| ri > i || (ri == i && start >= offset))
            .is_some_and(|&(_, _, after_loss)| after_loss)
    };

    // Pass 2: classify bytes and hand the kept runs over.
    let mut segments = Vec::with_capacity(scans.len());
    for (i, (seg, fates)) in scans.into_iter().zip(decisions).enumerate() {
        let mut plan = SegmentPlan {
            path: seg.path,
            file_len: seg.scan.file_len,
            kept: Vec::new(),
            damaged: Vec::new(),
            dropped_bytes: 0,
            suspicious_tail: false,
        };
        let mut cursor = 0u64;
        let gap = |plan: &mut SegmentPlan, start: u64, end: u64| {
            if end <= start {
                return;
            }
            if is_damage(i, start) {
                plan.damaged.push((start, end));
            } else {
                plan.dropped_bytes += end - start;
            }
        };
        for (run, fate) in seg.scan.runs.into_iter().zip(fates) {
            gap(&mut plan, cursor, run.start);
            cursor = run.end;
            match fate {
                Fate::Keep => plan.kept.push((run, None)),
                Fate::KeepAfterLoss(a, b) => plan.kept.push((run, Some((a, b)))),
                Fate::Drop => plan.dropped_bytes += run.end - run.start,
                Fate::Acked => {}
            }
        }
        let tail_is_damage = is_damage(i, cursor);
        let file_len = plan.file_len;
        gap(&mut plan, cursor, file_len);
        plan.suspicious_tail =
            seg.scan.complete_bad_tail && cursor < plan.file_len && !tail_is_damage;
        segments.push(plan);
    }
    Plan {
        segments,
        lost,
        last_kept,
        watermark,
    }
}
