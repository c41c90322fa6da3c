//! The writer thread's side of repairs and day finalization (`crate::repair`,
//! `crate::nightly`): control requests taken between batches, resolving a repair against
//! the WAL after the archive's position, recording it, and sending it to the shards. A child
//! of `engine` so it reaches the writer's state without widening it; it must not touch
//! cells itself (the shard threads apply, `ShardState::set_minute`).

use std::sync::mpsc::sync_channel;

use super::{Control, LEVEL_MS, MINUTE_HOLD_MAX_MS, ShardFix, ShardMsg, Writer};
use crate::store::Store;

/// Repairs (`crate::repair`) and the other control requests, on the writer thread.
impl<S: Store> Writer<S> {
    pub(super) fn control(&mut self, c: Control) {
        match c {
            Control::Repair(rec, done) => {
                let _ = done.send(self.repair(rec));
            }
            Control::RepairState(done) => {
                let archive_covered = match (&self.archive, self.store.archive_log()) {
                    (Some(_), Some(log)) => {
                        log.load_state().ok().flatten().map_or(0, |s| s.covered)
                    }
                    _ => 0,
                };
                let _ = done.send(crate::repair::State {
                    archive_covered,
                    applied_wal_pos: self.next_pos - 1,
                    repairs_applied: self.repair_seq,
                    finalized_before: self.finalized_before,
                });
            }
            Control::Finalize(day_ms, done) => {
                let _ = done.send(self.finalize(day_ms));
            }
            #[cfg(any(test, feature = "test-hooks"))]
            Control::Damage(cells, done) => {
                let mut found = 0;
                for (i, tx) in self.shard_tx.iter().enumerate() {
                    let mine: Vec<_> = cells
                        .iter()
                        .copied()
                        .filter(|c| {
                            self.windows.home_shard(c.0) == i
                                || self.windows.split_ads().contains(&c.0)
                        })
                        .collect();
                    let (rtx, rrx) = sync_channel(1);
                    if !mine.is_empty() && tx.send(ShardMsg::Damage(mine, rtx)).is_ok() {
                        found += rrx.recv().unwrap_or(0);
                    }
                }
                // In the durable state, as real damage would be: a replay must not undo it.
                self.save_checkpoint(true);
                self.checkpoint(true);
                self.save_checkpoint(true);
                let _ = done.send(found);
            }
        }
    }

    fn repair(
        &mut self,
        mut rec: crate::repair::RecordPb,
    ) -> Result<crate::repair::Outcome, crate::repair::RepairError> {
        use crate::repair::{Outcome, RepairError};
        if let Some(seq) = self.repair_ids.get(&rec.id) {
            return Ok(Outcome {
                already_applied: true,
                seq: *seq,
                ..Outcome::default()
            });
        }
        let (true, Some(log)) = (self.archive.is_some(), self.store.archive_log()) else {
            return Err(RepairError::Precondition(
                "the archive is off ([archive] enabled = false): nothing to repair from".into(),
            ));
        };
        let at = self.next_pos - 1;
        if rec.covered > at {
            return Err(RepairError::Invalid(format!(
                "archive_covered {} is beyond the last applied WAL position {at}",
                rec.covered
            )));
        }
        let covered = rec.covered;
        crate::repair::add_after(&mut rec, &log, covered, at)?;
        // Minutes past the minute retention have no cell to set (their hour and day hold
        // them): setting one would count it twice in its day.
        let wm = self.windows.watermark_ms();
        let oldest = if wm == i64::MIN {
            i64::MIN
        } else {
            self.minute_floor(wm).div_euclid(LEVEL_MS[0]) * LEVEL_MS[0]
        };
        let total = rec.cells.len();
        let owners = self.windows.owners();
        rec.cells
            .retain(|c| c.minute_ms >= oldest && owners.contains_key(&c.ad));
        let skipped = u32::try_from(total - rec.cells.len()).unwrap_or(u32::MAX);
        rec.seq = self.repair_seq + 1;
        rec.at_wal_pos = at;
        {
            use prost::Message;
            self.store
                .save_repair(rec.seq, &rec.encode_to_vec())
                .map_err(|e| RepairError::Unavailable(e.to_string()))?;
        }
        let (cells, clicks_changed) = self.apply_repair(&rec);
        tracing::info!(
            repair_id = %rec.id,
            seq = rec.seq,
            at_wal_pos = at,
            cells,
            skipped,
            clicks_changed,
            "repair applied"
        );
        Ok(Outcome {
            already_applied: false,
            seq: rec.seq,
            at_wal_pos: at,
            cells,
            skipped,
            clicks_changed,
        })
    }

    /// Minutes starting before this are dropped: `windows.retention_minutes` behind the
    /// watermark, and with `[reconcile] nightly` not before their day is finalized (at most
    /// [`MINUTE_HOLD_MAX_MS`] longer). A pure function of the watermark and the records
    /// applied, so a replay drops the same minutes.
    pub(super) fn minute_floor(&self, wm: i64) -> i64 {
        let by_retention = wm.saturating_sub(
            self.cfg
                .windows
                .retention_minutes
                .saturating_mul(LEVEL_MS[0]),
        );
        if !self.cfg.reconcile.nightly {
            return by_retention;
        }
        let cap = by_retention.saturating_sub(MINUTE_HOLD_MAX_MS);
        by_retention.min(self.finalized_before.max(cap))
    }

    fn finalize(
        &mut self,
        day_ms: i64,
    ) -> Result<crate::repair::Outcome, crate::repair::RepairError> {
        use crate::repair::{Outcome, RepairError};
        let day_ms = day_ms.div_euclid(LEVEL_MS[2]) * LEVEL_MS[2];
        if day_ms.saturating_add(LEVEL_MS[2]) <= self.finalized_before {
            return Ok(Outcome {
                already_applied: true,
                seq: self.repair_seq,
                ..Outcome::default()
            });
        }
        let rec = crate::repair::RecordPb {
            id: format!("finalize-{day_ms}"),
            seq: self.repair_seq + 1,
            at_wal_pos: self.next_pos - 1,
            covered: 0,
            cells: Vec::new(),
            finalize_day_ms: day_ms,
        };
        {
            use prost::Message;
            self.store
                .save_repair(rec.seq, &rec.encode_to_vec())
                .map_err(|e| RepairError::Unavailable(e.to_string()))?;
        }
        self.apply_repair(&rec);
        tracing::info!(
            day_ms,
            seq = rec.seq,
            "day finalized: its minute cells may go"
        );
        Ok(Outcome {
            already_applied: false,
            seq: rec.seq,
            at_wal_pos: rec.at_wal_pos,
            ..Outcome::default()
        })
    }

    /// Applies a recorded repair (live, or at its WAL position during a replay): (cells,
    /// sum of |new - old| clicks).
    pub(super) fn apply_repair(&mut self, rec: &crate::repair::RecordPb) -> (u32, u64) {
        if rec.finalize_day_ms != 0 {
            self.finalized_before = self
                .finalized_before
                .max(rec.finalize_day_ms.saturating_add(LEVEL_MS[2]));
            self.repair_seq = rec.seq;
            self.repair_ids.insert(rec.id.clone(), rec.seq);
            // Minutes held for this day may go now.
            self.evict_if_due();
            return (0, 0);
        }
        let n = self.shard_tx.len();
        let mut per_shard: Vec<Vec<ShardFix>> = vec![Vec::new(); n];
        let mut owner_of: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut new_total = Vec::with_capacity(rec.cells.len());
        for (ci, c) in rec.cells.iter().enumerate() {
            let combos: Vec<(u32, u32, Vec<u32>)> = c
                .combos
                .iter()
                .filter(|k| k.clicks > 0)
                .map(|k| {
                    let id = self
                        .windows
                        .intern_dims(&k.country, k.device, &k.os, &k.site);
                    (id, k.clicks, k.users.clone())
                })
                .collect();
            new_total.push(combos.iter().map(|k| u64::from(k.1)).sum::<u64>());
            let home = self.windows.home_shard(c.ad);
            let split = self.windows.split_ads().contains(&c.ad);
            for (s, fixes) in per_shard.iter_mut().enumerate() {
                // A split ad's cell is spread over the shards: all of it goes home, the
                // other shards drop their part.
                if s == home || split {
                    fixes.push(ShardFix {
                        ad: c.ad,
                        minute_ms: c.minute_ms,
                        combos: if s == home {
                            combos.clone()
                        } else {
                            Vec::new()
                        },
                    });
                    owner_of[s].push(ci);
                }
            }
        }
        // New combinations must be in the published table before shards rebuild their
        // indexes from it.
        self.publish();
        let mut old_total = vec![0u64; rec.cells.len()];
        let fields = self.cfg.shards.top_index_fields.clone();
        for (s, fixes) in per_shard.into_iter().enumerate() {
            if fixes.is_empty() {
                continue;
            }
            let (rtx, rrx) = sync_channel(1);
            if self.shard_tx[s]
                .send(ShardMsg::Repair(fixes, fields.clone(), rtx))
                .is_ok()
                && let Ok(before) = rrx.recv()
            {
                for (ci, b) in owner_of[s].iter().zip(before) {
                    old_total[*ci] += b;
                }
            }
        }
        self.repair_seq = rec.seq;
        self.repair_ids.insert(rec.id.clone(), rec.seq);
        let changed = new_total
            .iter()
            .zip(&old_total)
            .map(|(a, b)| a.abs_diff(*b))
            .sum();
        (u32::try_from(rec.cells.len()).unwrap_or(u32::MAX), changed)
    }
}
