//! Admission of ingest batches: decides, per `(collector_id, seq)`, whether a batch is new
//! (goes to the WAL and is applied), a redelivery of one already acked (acked again, not
//! applied), or outside the seq window (refused). It owns the per-collector delivery
//! state that the store persists in the same commit as the WAL entries; it must not know
//! about clicks, windows or shards.

use std::collections::HashMap;

use crate::config::IngestConfig;
use crate::engine::IngestError;

/// Highest seq a batch may carry: `max_seq_jump` above the collector's high-water mark, or
/// `max_first_seq` for a collector id without one (a new or rebuilt aggregator must accept
/// collectors whose spool seqs have grown for months).
pub fn seq_limit(hwm: Option<u64>, cfg: &IngestConfig) -> u64 {
    match hwm {
        Some(h) => h.saturating_add(cfg.max_seq_jump),
        None => cfg.max_first_seq,
    }
}

/// What to do with one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen before: write it to the WAL and apply it.
    New,
    /// Acked before: ack again, apply nothing.
    AlreadyAcked,
    /// Refused before the WAL; the state did not move.
    Refused(IngestError),
}

/// Per-collector delivery state (see the module doc).
#[derive(Debug, Default)]
pub struct Admission {
    hwm: HashMap<String, u64>,
}

/// Decisions of one group commit, applied to [`Admission`] only once the WAL commit holding
/// them succeeded.
#[derive(Debug, Default)]
pub struct Pending {
    hwm: HashMap<String, u64>,
}

impl Admission {
    /// From the state the store holds.
    pub fn new(hwm: HashMap<String, u64>) -> Self {
        Admission { hwm }
    }

    /// Judges `(collector_id, seq)` against the committed state plus what this group
    /// already admitted.
    pub fn judge(
        &self,
        pending: &mut Pending,
        collector_id: &str,
        seq: u64,
        cfg: &IngestConfig,
    ) -> Verdict {
        let known = pending
            .hwm
            .get(collector_id)
            .or_else(|| self.hwm.get(collector_id))
            .copied();
        let hwm = known.unwrap_or(0);
        let limit = seq_limit(known, cfg);
        if seq > limit {
            return Verdict::Refused(IngestError::SeqOutOfWindow {
                collector_id: collector_id.to_string(),
                seq,
                hwm,
                limit,
            });
        }
        if seq > hwm {
            pending.hwm.insert(collector_id.to_string(), seq);
            Verdict::New
        } else {
            Verdict::AlreadyAcked
        }
    }

    /// The WAL commit holding `pending` succeeded.
    pub fn commit(&mut self, pending: Pending) {
        self.hwm.extend(pending.hwm);
    }
}
