//! Durable storage behind a trait: the WAL of ingested batches, the per-collector delivery
//! state (which seqs were acked: `admit::Delivery`), and checkpoints. The default
//! implementation is redb (pure Rust, ACID, one fsync'd commit per write transaction,
//! crash-safe by design), so a WAL append and its delivery-state update commit together,
//! and a checkpoint plus the WAL truncation it allows commit together: a crash
//! mid-checkpoint leaves the previous checkpoint and the full WAL.
//!
//! Delivery state lives in table `delivery` (collector id -> `Delivery::encode`). Stores
//! written before out-of-order admission hold only table `hwm` (collector id -> highest
//! acked seq, everything below it acked): such a collector reads as `Delivery::in_order`
//! until its next append writes its `delivery` row. `hwm` is still kept, as the
//! contiguous point (floor - 1: every seq at or below it acked), which is what tools and
//! older versions read it as.
//!
//! Why redb: pure Rust (no C build on two cores), a single file, transactions with
//! durable commits, and it is maintained; fjall (LSM) would suit much larger state but is
//! a larger dependency for what is here a WAL plus a few blobs.
//!
//! The exact-dedup disk tier is a directory of sorted run files beside the database
//! (`dedup-runs/`, [`runs`]), reached through [`Store::dedup_table`]; see `state::dedup`
//! for why its writes need not be tied to the checkpoint's commit. Stores written before
//! the runs held it in tables `dedup` (impression id -> encoded entry) and `dedup_expiry`
//! ((keep_until, id) -> ()): the first open moves those rows into one run, then empties
//! the tables.
//!
//! The JetStream source's position lives in table `stream_pos` (partition -> last applied
//! stream sequence), written by [`Store::append_at`] in the same commit as the WAL entries
//! and delivery states of the messages it covers: after a crash the position and the state
//! agree, which is what makes the JetStream path exactly-once (see `source`).
//!
//! Checkpoints: the tables of a checkpoint are written to their own file off the writer
//! thread ([`cpfile`]); the commit stores only a pointer to it (row `_file`) with the WAL
//! position and the WAL truncation. A checkpoint written before the files (one row per
//! table) still loads, and [`Store::save_checkpoint`] still writes that format (stores
//! without files).
//!
//! This module knows nothing about windows or counts: it stores bytes.

pub mod cpfile;
pub mod paced;
pub mod runs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const WAL: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("wal");
const HWM: TableDefinition<'static, &str, u64> = TableDefinition::new("hwm");
const DELIVERY: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("delivery");
const CHECKPOINT: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("checkpoint");
/// JetStream source: partition -> last applied stream sequence (see `source`).
const STREAM_POS: TableDefinition<'static, u32, u64> = TableDefinition::new("stream_pos");
const META_WAL_POS: &str = "_wal_pos";
/// A checkpoint whose tables are in a file (`cpfile`): its pointer (`cpfile::Staged`).
/// Absent: the tables are rows of this table (the format before checkpoint files).
const META_FILE: &str = "_file";
/// The raw click archive (`crate::archive`): WAL position -> what became of each click of
/// that batch (`archive::encode_outcomes`), written after the batch is applied.
const ARCHIVE_OUTCOME: TableDefinition<'static, u64, &[u8]> =
    TableDefinition::new("archive_outcome");
/// The archive's progress (`adclick_archive::State`, key [`ARCHIVE_STATE_KEY`]).
const ARCHIVE_STATE: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("archive_state");
const ARCHIVE_STATE_KEY: &str = "state";
/// Repairs of the serving rollups (`crate::repair`): repair seq -> `repair::RecordPb`,
/// written durably before the repair is applied and never deleted (one row per repair, so
/// a repair id seen once is refused as already applied forever; a start replays the rows
/// after the checkpoint's repair seq at their WAL position).
const REPAIRS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("repairs");
/// The dedup disk tier before the run files (`runs`): read once, to move it into a run.
const DEDUP: TableDefinition<'static, &[u8; 16], &[u8; ENTRY_LEN]> = TableDefinition::new("dedup");
/// Key: keep_until as big-endian with the sign bit flipped (so byte order = time order),
/// then the id. Emptied with `DEDUP`.
const DEDUP_EXPIRY: TableDefinition<'static, &[u8; 24], ()> = TableDefinition::new("dedup_expiry");

use crate::admit::Delivery;
use crate::state::dedup::{ENTRY_LEN, Entry, Id, SpillTable};

/// File name of the store inside the data dir.
pub const STORE_FILE: &str = "aggregator.redb";

/// The error for a store file that fails its integrity check (or cannot be opened), naming
/// the file and what to do: the aggregator never runs on state it cannot vouch for.
fn damaged(path: &Path, err: &redb::DatabaseError) -> StoreError {
    let corrupt = matches!(
        err,
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))
    );
    if !corrupt {
        return StoreError(format!("cannot open {}: {err}", path.display()));
    }
    StoreError(format!(
        "{} failed its integrity check ({err}); refusing to start on damaged state. Recovery: \
         stop, move the file aside (keep it for inspection), restore the data dir from its last \
         backup or snapshot and start again: collectors resend every batch they have not had \
         acked, and seqs the restored store already has are dropped as replays. Batches acked \
         after the backup are gone from this store: recount them from the raw click archive. \
         Protection against losing a whole disk is the replicated JetStream back end. See \
         docs/operations.md, 'Aggregator store damage'.",
        path.display()
    ))
}

/// Verifies the store in `dir` without starting anything (`adclick aggregator --check`):
/// opens it with the integrity check on, which verifies every committed page. Note that
/// the check, like every open, commits (redb rebuilds its allocator state).
pub fn check(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        return Err(StoreError(format!("{}: no such store", path.display())));
    }
    let db = Database::builder()
        .set_check_integrity_on_open(true)
        .open(&path)
        .map_err(|err| damaged(&path, &err))?;
    // The checkpoint's file, if it has one, must match its pointer too.
    let store = RedbStore {
        db: Arc::new(db),
        dir: dir.to_path_buf(),
        fail_checkpoint_after_tables: None,
        wal_trim: None,
    };
    store.load_checkpoint().map(drop)
}

/// redb page cache of the aggregator's store (WAL, checkpoints, dedup disk tier), outside
/// `dedup.memory_bytes`.
pub const STORE_CACHE_BYTES: usize = 64 << 20;

/// A storage failure. After one, the aggregator stops acking (clients retry).
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

fn e(x: impl std::fmt::Display) -> StoreError {
    StoreError(x.to_string())
}

/// One ingested batch, as appended to the WAL.
#[derive(Debug, Clone)]
pub struct WalEntry {
    /// Position in the WAL (strictly increasing).
    pub pos: u64,
    /// Sender.
    pub collector_id: String,
    /// Sender's seq.
    pub seq: u64,
    /// The batch's `acked_floor` (0: an in-order sender), for the delivery state.
    pub acked_floor: u64,
    /// Encoded `IngestBatch`.
    pub batch: Vec<u8>,
}

/// A consistent snapshot: operator tables as of WAL position `wal_pos` (inclusive).
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// Last WAL position reflected in the tables.
    pub wal_pos: u64,
    /// (table name, blob).
    pub tables: Vec<(String, Vec<u8>)>,
}

/// What the aggregator needs from a store.
pub trait Store: Send {
    /// Durably appends entries and records their seqs as acked in their collectors'
    /// delivery state (`Delivery::admit` with each entry's seq and floor), in one commit.
    fn append(&mut self, entries: &[WalEntry]) -> Result<(), StoreError>;
    /// [`Store::append`], and in the same commit records `positions` (partition, last
    /// applied stream sequence) of the JetStream source. Stores without a `stream_pos`
    /// table (test doubles) support only an empty `positions`.
    fn append_at(
        &mut self,
        entries: &[WalEntry],
        positions: &[(u32, u64)],
    ) -> Result<(), StoreError> {
        if positions.is_empty() {
            self.append(entries)
        } else {
            Err(StoreError(
                "this store does not record stream positions".into(),
            ))
        }
    }
    /// Last applied stream sequence of every partition the JetStream source has applied.
    fn stream_positions(&self) -> Result<HashMap<u32, u64>, StoreError> {
        Ok(HashMap::new())
    }
    /// Highest acked seq of every collector (`Delivery::mark`).
    fn high_water_marks(&self) -> Result<HashMap<String, u64>, StoreError>;
    /// Delivery state of every collector, as the appends left it.
    fn delivery_states(&self) -> Result<HashMap<String, Delivery>, StoreError>;
    /// WAL entries after `pos`, in order.
    fn wal_after(&self, pos: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Highest WAL position written (0 if none).
    fn last_wal_pos(&self) -> Result<u64, StoreError>;
    /// The latest checkpoint.
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;
    /// Writes a checkpoint and deletes the WAL up to its position, in one commit.
    fn save_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError>;
    /// Where checkpoint tables may be written off the writer thread, to be saved by
    /// [`Store::save_staged_checkpoint`]; `None`: only [`Store::save_checkpoint`].
    fn checkpoint_files(&self) -> Option<cpfile::CheckpointFiles> {
        None
    }
    /// Makes the staged checkpoint the latest and deletes the WAL up to its position, in
    /// one commit (a small one: the tables are in their file already).
    fn save_staged_checkpoint(&mut self, _staged: &cpfile::Staged) -> Result<(), StoreError> {
        Err(StoreError("this store has no checkpoint files".into()))
    }
    /// The disk tier of the exact-dedup set (in the same store).
    fn dedup_table(&self) -> Result<Box<dyn SpillTable>, StoreError>;
    /// The raw click archive's view of this store (`crate::archive`): `None` when the store
    /// cannot feed an archive.
    fn archive_log(&self) -> Option<ArchiveLog> {
        None
    }
    /// Records what became of the clicks of applied WAL entries (position, encoded
    /// outcomes) for the archive. Not durable by itself: the next WAL append or checkpoint
    /// commit makes it so (a crash before replays the entries, which records them again).
    fn record_outcomes(&mut self, _outcomes: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Durably records repair `seq` (`crate::repair`). Stores without a `repairs` table
    /// (test doubles) cannot take repairs.
    fn save_repair(&mut self, _seq: u64, _record: &[u8]) -> Result<(), StoreError> {
        Err(StoreError("this store does not record repairs".into()))
    }
    /// Every repair recorded, by seq.
    fn repairs(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(Vec::new())
    }
}

/// The redb store (`<data_dir>/aggregator.redb`).
#[derive(Debug)]
pub struct RedbStore {
    db: Arc<Database>,
    /// The data dir (the dedup runs live in `dedup-runs/` there).
    dir: PathBuf,
    /// Test hook: abort (drop uncommitted) the next checkpoint after this many tables, as a
    /// crash mid-checkpoint would.
    pub fail_checkpoint_after_tables: Option<usize>,
    /// WAL entries at or before this are covered by the committed checkpoint and still to
    /// be deleted, a few per append ([`truncate_wal`]).
    wal_trim: Option<u64>,
}

impl RedbStore {
    /// Opens or creates the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(e)?;
        let path = dir.join(STORE_FILE);
        // Every open verifies the checksum of every committed page (redb's
        // check on open): a file damaged outside redb (bit rot, a bad sector,
        // a zeroed page) is refused with a clear error instead of being
        // trusted, where a plain open may panic or read wrong state. It reads
        // the whole file once per start; see docs/operations.md.
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            // redb's page cache defaults to 1 GiB and would fill under a dedup spill flood:
            // the dedup disk tier must not bring back the RAM it moved to disk.
            .set_cache_size(STORE_CACHE_BYTES)
            .create(&path)
            .map_err(|err| damaged(&path, &err))?;
        let tx = db.begin_write().map_err(e)?;
        {
            tx.open_table(WAL).map_err(e)?;
            tx.open_table(HWM).map_err(e)?;
            tx.open_table(DELIVERY).map_err(e)?;
            tx.open_table(CHECKPOINT).map_err(e)?;
            tx.open_table(STREAM_POS).map_err(e)?;
            tx.open_table(DEDUP).map_err(e)?;
            tx.open_table(DEDUP_EXPIRY).map_err(e)?;
            tx.open_table(ARCHIVE_OUTCOME).map_err(e)?;
            tx.open_table(ARCHIVE_STATE).map_err(e)?;
            tx.open_table(REPAIRS).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        let mut store = RedbStore {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            fail_checkpoint_after_tables: None,
            wal_trim: None,
        };
        // What a checkpoint left to trim of the WAL (the trimming resumes with the appends).
        {
            let tx = store.db.begin_read().map_err(e)?;
            let pos = checkpoint_wal_pos(&tx.open_table(CHECKPOINT).map_err(e)?)?;
            let archived = archive_covered(&tx.open_table(ARCHIVE_STATE).map_err(e)?)?;
            store.wal_trim = pos.map(|p| archived.map_or(p, |a| a.min(p)));
        }
        // Checkpoint files no committed pointer names: a crash came between the file and
        // its commit (or after the commit, before the previous file was deleted).
        let keep = store.staged()?.map(|s| s.name);
        store.files().delete_others(keep.as_deref());
        Ok(store)
    }

    fn files(&self) -> cpfile::CheckpointFiles {
        let mut f = cpfile::CheckpointFiles::new(&self.dir);
        f.fail_after_tables = self.fail_checkpoint_after_tables;
        f
    }

    /// The committed checkpoint's file pointer, if its tables are in a file.
    fn staged(&self) -> Result<Option<cpfile::Staged>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(CHECKPOINT).map_err(e)?;
        let Some(wal_pos) = checkpoint_wal_pos(&t)? else {
            return Ok(None);
        };
        match t.get(META_FILE).map_err(e)? {
            Some(p) => cpfile::Staged::decode(wal_pos, p.value()).map(Some),
            None => Ok(None),
        }
    }
}

/// Deletes the WAL up to `wal_pos` (a checkpoint's), except what the archive has not
/// covered yet (it reads the entries with their outcomes; a start replays only what
/// follows the checkpoint, so the entries kept are not applied twice), and the archive's
/// outcomes it has covered.
///
/// At most [`WAL_TRIM_AT_CHECKPOINT`] entries go in this commit (each deletion reads and
/// rewrites its leaf, ~0.1 ms for a batch: 30 s of WAL at 200k clicks/s took the
/// checkpoint's commit 330–480 ms with ingest stopped); the rest go a few per WAL append
/// ([`trim_wal`]). Returns the position the WAL is still to be trimmed to, if any.
fn truncate_wal(tx: &redb::WriteTransaction, wal_pos: u64) -> Result<Option<u64>, StoreError> {
    let archived = archive_covered(&tx.open_table(ARCHIVE_STATE).map_err(e)?)?;
    let upto = archived.map_or(wal_pos, |a| a.min(wal_pos));
    let mut wal = tx.open_table(WAL).map_err(e)?;
    let done = trim_wal(&mut wal, upto, WAL_TRIM_AT_CHECKPOINT)?;
    if let Some(a) = archived {
        let mut out = tx.open_table(ARCHIVE_OUTCOME).map_err(e)?;
        out.retain_in(..=a, |_, _| false).map_err(e)?;
    }
    Ok((!done).then_some(upto))
}

/// WAL entries a checkpoint's commit deletes at most (see [`truncate_wal`]).
const WAL_TRIM_AT_CHECKPOINT: usize = 256;

/// The committed checkpoint's WAL position, from the checkpoint table (`None`: none yet).
fn checkpoint_wal_pos(
    t: &redb::ReadOnlyTable<&'static str, &'static [u8]>,
) -> Result<Option<u64>, StoreError> {
    let Some(pos) = t.get(META_WAL_POS).map_err(e)? else {
        return Ok(None);
    };
    <[u8; 8]>::try_from(pos.value())
        .map(|b| Some(u64::from_le_bytes(b)))
        .map_err(|_| StoreError("corrupt checkpoint position".into()))
}

/// Deletes up to `max` of the oldest WAL entries at or before `upto` (entries a committed
/// checkpoint covers: deleting them is safe at any time, keeping them is harmless, as
/// replay starts after the checkpoint). Returns whether none is left.
fn trim_wal(
    wal: &mut redb::Table<'_, u64, &'static [u8]>,
    upto: u64,
    max: usize,
) -> Result<bool, StoreError> {
    for _ in 0..max {
        let first = wal.first().map_err(e)?.map(|(k, _)| k.value());
        match first {
            Some(k) if k <= upto => {
                wal.remove(k).map_err(e)?;
            }
            _ => return Ok(true),
        }
    }
    Ok(false)
}

impl Store for RedbStore {
    fn append(&mut self, entries: &[WalEntry]) -> Result<(), StoreError> {
        self.append_at(entries, &[])
    }

    fn append_at(
        &mut self,
        entries: &[WalEntry],
        positions: &[(u32, u64)],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let trimmed = self.wal_trim;
        let mut trim_done = false;
        {
            if !positions.is_empty() {
                let mut pos = tx.open_table(STREAM_POS).map_err(e)?;
                for (p, seq) in positions {
                    pos.insert(*p, *seq).map_err(e)?;
                }
            }
            let mut wal = tx.open_table(WAL).map_err(e)?;
            if let Some(upto) = trimmed {
                // Twice what is appended: the backlog of a checkpoint shrinks.
                if trim_wal(&mut wal, upto, 2 * entries.len() + 8)? {
                    trim_done = true;
                }
            }
            let mut hwm = tx.open_table(HWM).map_err(e)?;
            let mut delivery = tx.open_table(DELIVERY).map_err(e)?;
            // Each collector's state is read once, moved by every entry in order (the
            // order the admission judged them), and written once.
            let mut touched: HashMap<&str, Delivery> = HashMap::new();
            for en in entries {
                wal.insert(en.pos, en.batch.as_slice()).map_err(e)?;
                let id = en.collector_id.as_str();
                let d = match touched.entry(id) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let stored = match delivery.get(id).map_err(e)? {
                            Some(row) => Some(decode_delivery(id, row.value())?),
                            None => None,
                        };
                        let d = match stored {
                            Some(d) => d,
                            None => match hwm.get(id).map_err(e)? {
                                Some(h) => Delivery::in_order(h.value()),
                                None => Delivery::unknown(),
                            },
                        };
                        v.insert(d)
                    }
                };
                d.admit(en.seq, en.acked_floor);
            }
            for (id, d) in touched {
                delivery.insert(id, d.encode().as_slice()).map_err(e)?;
                // What an older version reads as "everything at or below is acked": only
                // the contiguous point is true of that (a rollback re-admits the acked seqs
                // above it, and exact dedup drops their clicks; the highest acked seq would
                // make it drop unacked ones).
                let mark = d.floor().saturating_sub(1);
                let cur = hwm.get(id).map_err(e)?.map(|v| v.value());
                if cur.is_none_or(|c| c < mark) {
                    hwm.insert(id, mark).map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)?;
        if trim_done {
            self.wal_trim = None;
        }
        Ok(())
    }

    fn stream_positions(&self) -> Result<HashMap<u32, u64>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(STREAM_POS).map_err(e)?;
        let mut out = HashMap::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    fn high_water_marks(&self) -> Result<HashMap<String, u64>, StoreError> {
        Ok(self
            .delivery_states()?
            .into_iter()
            .map(|(id, d)| (id, d.mark()))
            .collect())
    }

    fn delivery_states(&self) -> Result<HashMap<String, Delivery>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let mut out = HashMap::new();
        let t = tx.open_table(DELIVERY).map_err(e)?;
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.insert(
                k.value().to_string(),
                decode_delivery(k.value(), v.value())?,
            );
        }
        // Collectors last seen before the `delivery` table existed.
        let t = tx.open_table(HWM).map_err(e)?;
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.entry(k.value().to_string())
                .or_insert_with(|| Delivery::in_order(v.value()));
        }
        Ok(out)
    }

    fn wal_after(&self, pos: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(WAL).map_err(e)?;
        let mut out = Vec::new();
        for row in t.range(pos.saturating_add(1)..).map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn last_wal_pos(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(WAL).map_err(e)?;
        let last = t.last().map_err(e)?.map(|(k, _)| k.value());
        let cp_pos = checkpoint_wal_pos(&tx.open_table(CHECKPOINT).map_err(e)?)?;
        Ok(last.unwrap_or(0).max(cp_pos.unwrap_or(0)))
    }

    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(CHECKPOINT).map_err(e)?;
        let Some(wal_pos) = checkpoint_wal_pos(&t)? else {
            return Ok(None);
        };
        if let Some(p) = t.get(META_FILE).map_err(e)? {
            let staged = cpfile::Staged::decode(wal_pos, p.value())?;
            let tables = self.files().read(&staged)?;
            return Ok(Some(Checkpoint { wal_pos, tables }));
        }
        let mut tables = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            if k.value() != META_WAL_POS {
                tables.push((k.value().to_string(), v.value().to_vec()));
            }
        }
        Ok(Some(Checkpoint { wal_pos, tables }))
    }

    fn save_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(CHECKPOINT).map_err(e)?;
            t.retain(|_, _| false).map_err(e)?;
            for (i, (name, blob)) in cp.tables.iter().enumerate() {
                if self.fail_checkpoint_after_tables == Some(i) {
                    // Dropping the transaction without commit is what a crash does.
                    return Err(StoreError("injected crash mid-checkpoint".into()));
                }
                t.insert(name.as_str(), blob.as_slice()).map_err(e)?;
            }
            t.insert(META_WAL_POS, cp.wal_pos.to_le_bytes().as_slice())
                .map_err(e)?;
        }
        let trim = truncate_wal(&tx, cp.wal_pos)?;
        tx.commit().map_err(e)?;
        self.wal_trim = trim;
        // The file of a checkpoint before this one is no longer named.
        self.files().delete_others(None);
        Ok(())
    }

    fn checkpoint_files(&self) -> Option<cpfile::CheckpointFiles> {
        Some(self.files())
    }

    fn save_staged_checkpoint(&mut self, staged: &cpfile::Staged) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(CHECKPOINT).map_err(e)?;
            // Two rows after the first staged checkpoint; the first also frees the tables
            // of a checkpoint written before the files.
            t.retain(|_, _| false).map_err(e)?;
            t.insert(META_FILE, staged.encode().as_slice()).map_err(e)?;
            t.insert(META_WAL_POS, staged.wal_pos.to_le_bytes().as_slice())
                .map_err(e)?;
        }
        let trim = truncate_wal(&tx, staged.wal_pos)?;
        tx.commit().map_err(e)?;
        self.wal_trim = trim;
        // Only now is the previous checkpoint's file no longer needed.
        self.files().delete_others_later(Some(&staged.name));
        Ok(())
    }

    fn archive_log(&self) -> Option<ArchiveLog> {
        Some(ArchiveLog {
            db: self.db.clone(),
        })
    }

    fn record_outcomes(&mut self, outcomes: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(e)?;
        tx.set_durability(redb::Durability::None).map_err(e)?;
        {
            let mut t = tx.open_table(ARCHIVE_OUTCOME).map_err(e)?;
            for (pos, o) in outcomes {
                t.insert(*pos, o.as_slice()).map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    fn save_repair(&mut self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        tx.open_table(REPAIRS)
            .map_err(e)?
            .insert(seq, record)
            .map_err(e)?;
        tx.commit().map_err(e)
    }

    fn repairs(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(REPAIRS).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Opens the dedup runs (once per start: the runs are not shared between two
    /// openers), moving rows an older version left in the redb tables into a run first.
    fn dedup_table(&self) -> Result<Box<dyn SpillTable>, StoreError> {
        let mut runs = runs::RunDedup::open(&self.dir.join(runs::DIR)).map_err(e)?;
        self.migrate_dedup_rows(&mut runs)?;
        Ok(Box::new(runs))
    }
}

/// `covered` of the archive state, if the archive is on.
fn archive_covered(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<u64>, StoreError> {
    match t.get(ARCHIVE_STATE_KEY).map_err(e)? {
        Some(v) => Ok(Some(
            adclick_archive::State::decode(v.value())
                .map_err(|err| StoreError(err.to_string()))?
                .covered,
        )),
        None => Ok(None),
    }
}

/// What [`ArchiveLog::read`] calls per entry: (WAL position, batch bytes, outcomes) ->
/// go on.
pub type EntryVisitor<'a> = dyn FnMut(u64, &[u8], &[u8]) -> bool + 'a;

/// The raw click archive's access to the store: WAL entries with their outcomes, and the
/// archive's state (whose `covered` holds back the WAL truncation of checkpoints).
#[derive(Debug, Clone)]
pub struct ArchiveLog {
    db: Arc<Database>,
}

impl ArchiveLog {
    /// Calls `f(pos, batch, outcomes)` for WAL entries after `after` and at or before
    /// `until` that have outcomes recorded, in order, stopping at the first without (not
    /// applied yet) or when `f` returns false. Returns the last position passed to `f`.
    pub fn read(
        &self,
        after: u64,
        until: u64,
        f: &mut EntryVisitor<'_>,
    ) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let wal = tx.open_table(WAL).map_err(e)?;
        let out = tx.open_table(ARCHIVE_OUTCOME).map_err(e)?;
        let mut last = after;
        if until <= after {
            return Ok(last);
        }
        for row in wal.range(after.saturating_add(1)..=until).map_err(e)? {
            let (k, v) = row.map_err(e)?;
            let pos = k.value();
            let Some(o) = out.get(pos).map_err(e)? else {
                break;
            };
            last = pos;
            if !f(pos, v.value(), o.value()) {
                break;
            }
        }
        Ok(last)
    }

    /// The archive's state, if it was ever saved.
    pub fn load_state(&self) -> Result<Option<adclick_archive::State>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(ARCHIVE_STATE).map_err(e)?;
        match t.get(ARCHIVE_STATE_KEY).map_err(e)? {
            Some(v) => adclick_archive::State::decode(v.value())
                .map(Some)
                .map_err(|err| StoreError(err.to_string())),
            None => Ok(None),
        }
    }

    /// Saves the archive's state durably (and, with it, every outcome recorded before).
    pub fn save_state(&self, st: &adclick_archive::State) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(ARCHIVE_STATE).map_err(e)?;
            t.insert(ARCHIVE_STATE_KEY, st.encode().as_slice())
                .map_err(e)?;
            let mut out = tx.open_table(ARCHIVE_OUTCOME).map_err(e)?;
            out.retain_in(..=st.covered, |_, _| false).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Forgets the archive (it was turned off): the WAL is no longer held for it and no
    /// outcomes are kept. Returns whether there was one.
    pub fn clear(&self) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let had;
        {
            let mut t = tx.open_table(ARCHIVE_STATE).map_err(e)?;
            had = t.remove(ARCHIVE_STATE_KEY).map_err(e)?.is_some();
            let mut out = tx.open_table(ARCHIVE_OUTCOME).map_err(e)?;
            out.retain(|_, _| false).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(had)
    }
}

/// A stored delivery state that does not decode: the aggregator must not guess which seqs
/// it acked (guessing low double counts, guessing high loses), so it refuses to go on.
fn decode_delivery(collector_id: &str, bytes: &[u8]) -> Result<Delivery, StoreError> {
    Delivery::decode(bytes).map_err(|err| {
        StoreError(format!(
            "delivery state of collector {collector_id:?}: {err}; see docs/operations.md, \
             'Aggregator store damage'"
        ))
    })
}

impl RedbStore {
    /// Moves the dedup rows of a store written before the run files into one run (durable
    /// before the rows are deleted: a crash between writes the run again next time, and a
    /// second copy of an entry in an older run is harmless), then empties the tables.
    fn migrate_dedup_rows(&self, runs: &mut runs::RunDedup) -> Result<(), StoreError> {
        let rows: Vec<(Id, Entry)> = {
            let tx = self.db.begin_read().map_err(e)?;
            let t = tx.open_table(DEDUP).map_err(e)?;
            let mut rows = Vec::new();
            for row in t.iter().map_err(e)? {
                let (k, v) = row.map_err(e)?;
                rows.push((*k.value(), Entry::decode(v.value())));
            }
            rows
        };
        if rows.is_empty() {
            return Ok(());
        }
        runs.put(&rows).map_err(e)?;
        let tx = self.db.begin_write().map_err(e)?;
        {
            tx.open_table(DEDUP)
                .map_err(e)?
                .retain(|_, _| false)
                .map_err(e)?;
            tx.open_table(DEDUP_EXPIRY)
                .map_err(e)?
                .retain(|_, _| false)
                .map_err(e)?;
        }
        tx.commit().map_err(e)?;
        tracing::info!(
            ids = rows.len(),
            "dedup rows moved from the store into a run file"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::{Admission, Pending, Verdict};
    use crate::config::IngestConfig;

    fn entry(pos: u64, collector_id: &str, seq: u64, acked_floor: u64) -> WalEntry {
        WalEntry {
            pos,
            collector_id: collector_id.into(),
            seq,
            acked_floor,
            batch: vec![pos as u8; 3],
        }
    }

    /// A store file as the version before out-of-order admission wrote it: tables `wal`,
    /// `hwm` (collector -> highest acked seq) and `checkpoint`, no `delivery`.
    fn write_old_format(dir: &Path) {
        let db = Database::create(dir.join(STORE_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut wal = tx.open_table(WAL).unwrap();
            let mut hwm = tx.open_table(HWM).unwrap();
            for (pos, (id, seq)) in [("old-a", 7u64), ("old-b", 3), ("old-a", 9)]
                .into_iter()
                .enumerate()
            {
                wal.insert(pos as u64 + 1, [1u8, 2, 3].as_slice()).unwrap();
                hwm.insert(id, seq).unwrap();
            }
            tx.open_table(CHECKPOINT).unwrap();
        }
        tx.commit().unwrap();
    }

    #[test]
    fn a_store_from_before_delivery_states_opens_and_reads_as_in_order() {
        let dir = tempfile::tempdir().unwrap();
        write_old_format(dir.path());
        let mut store = RedbStore::open(dir.path()).unwrap();
        let states = store.delivery_states().unwrap();
        assert_eq!(states.len(), 2);
        assert_eq!(states["old-a"], Delivery::in_order(9));
        assert_eq!(states["old-b"], Delivery::in_order(3));
        assert_eq!(
            store.high_water_marks().unwrap(),
            HashMap::from([("old-a".to_string(), 9), ("old-b".to_string(), 3)])
        );
        assert_eq!(store.wal_after(0).unwrap().len(), 3);
        assert_eq!(store.last_wal_pos().unwrap(), 3);

        // The admission built from it keeps the old verdicts, and takes floors from here on.
        let cfg = IngestConfig::default();
        let mut adm = Admission::new(states);
        let mut p = Pending::default();
        let judge =
            |adm: &Admission, p: &mut Pending, id, seq, floor| adm.judge(p, id, seq, floor, &cfg);
        assert_eq!(judge(&adm, &mut p, "old-a", 9, 0), Verdict::AlreadyAcked);
        assert_eq!(judge(&adm, &mut p, "old-a", 4, 10), Verdict::AlreadyAcked);
        assert_eq!(judge(&adm, &mut p, "old-a", 12, 10), Verdict::New);
        assert_eq!(judge(&adm, &mut p, "old-b", 4, 0), Verdict::New);
        store
            .append(&[entry(4, "old-a", 12, 10), entry(5, "old-b", 4, 0)])
            .unwrap();
        adm.commit(p);

        // Reopened: the new rows win over `hwm`, which still holds the highest acked seq.
        drop(store);
        let store = RedbStore::open(dir.path()).unwrap();
        let states = store.delivery_states().unwrap();
        assert_eq!(states["old-a"].floor(), 10);
        assert_eq!(
            states["old-a"].acked_above_floor().collect::<Vec<_>>(),
            vec![12]
        );
        assert_eq!(states["old-b"], Delivery::in_order(4));
        assert_eq!(states["old-a"], *adm.delivery("old-a").unwrap());
        assert_eq!(
            store.high_water_marks().unwrap(),
            HashMap::from([("old-a".to_string(), 12), ("old-b".to_string(), 4)])
        );
        let adm = Admission::new(states);
        let mut p = Pending::default();
        assert_eq!(adm.judge(&mut p, "old-a", 11, 10, &cfg), Verdict::New);
        assert_eq!(adm.judge(&mut p, "old-a", 10, 10, &cfg), Verdict::New);
        assert_eq!(
            adm.judge(&mut p, "old-a", 12, 10, &cfg),
            Verdict::AlreadyAcked
        );
    }

    #[test]
    fn one_append_moves_each_collector_by_every_entry_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        store
            .append(&[
                entry(1, "c", 5, 2),
                entry(2, "d", 1, 0),
                entry(3, "c", 2, 2),
                entry(4, "c", 9, 4),
                entry(5, "d", 2, 0),
            ])
            .unwrap();
        let states = store.delivery_states().unwrap();
        let mut want = Delivery::unknown();
        for (seq, floor) in [(5, 2), (2, 2), (9, 4)] {
            want.admit(seq, floor);
        }
        assert_eq!(states["c"], want);
        assert_eq!(states["c"].floor(), 4);
        assert_eq!(
            states["c"].acked_above_floor().collect::<Vec<_>>(),
            vec![5, 9]
        );
        assert_eq!(states["d"], Delivery::in_order(2));
    }

    #[test]
    fn an_undecodable_delivery_row_is_an_error_naming_the_collector() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            let tx = store.db.begin_write().unwrap();
            tx.open_table(DELIVERY)
                .unwrap()
                .insert("edge-7", [1u8, 0, 0].as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let mut store = RedbStore::open(dir.path()).unwrap();
        let err = store.delivery_states().unwrap_err().to_string();
        assert!(err.contains("edge-7"), "{err}");
        let err = store.append(&[entry(1, "edge-7", 1, 1)]).unwrap_err();
        assert!(err.to_string().contains("edge-7"), "{err}");
    }

    /// Tables sorted by name (what `load` compares against).
    fn cp(wal_pos: u64, tag: u8) -> Checkpoint {
        Checkpoint {
            wal_pos,
            tables: vec![
                ("shard/0".into(), vec![tag; 70_000]),
                ("shard/1".into(), Vec::new()),
                ("windows".into(), vec![tag; 10]),
            ],
        }
    }

    fn stage(store: &RedbStore, c: &Checkpoint) -> Result<cpfile::Staged, StoreError> {
        store
            .checkpoint_files()
            .unwrap()
            .write(c.wal_pos, c.tables.clone())
    }

    fn cp_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join(cpfile::DIR))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// (position, tables by name): rows come back in key order, files in written order.
    fn load(store: &RedbStore) -> (u64, Vec<(String, Vec<u8>)>) {
        let mut c = store.load_checkpoint().unwrap().unwrap();
        c.tables.sort();
        (c.wal_pos, c.tables)
    }

    /// Checkpoints in files: a checkpoint of the format before (rows) loads; a staged one
    /// replaces it and truncates the WAL; a file staged but never committed (a crash
    /// between) leaves the previous checkpoint, and is deleted at the next open; a crash
    /// mid-file (the test hook) likewise; the previous file goes once the next commits.
    #[test]
    fn staged_checkpoints_are_as_crash_safe_as_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        let entries: Vec<WalEntry> = (1..=10).map(|p| entry(p, "c", p, 0)).collect();
        store.append(&entries).unwrap();
        // The format before the files.
        store.save_checkpoint(&cp(3, 1)).unwrap();
        assert_eq!(load(&store), (3, cp(3, 1).tables));
        assert_eq!(store.wal_after(0).unwrap().len(), 7);

        let s5 = stage(&store, &cp(5, 2)).unwrap();
        assert_eq!(cp_files(dir.path()), vec![s5.name.clone()]);
        store.save_staged_checkpoint(&s5).unwrap();
        assert_eq!(load(&store), (5, cp(5, 2).tables));
        assert_eq!(store.wal_after(0).unwrap()[0].0, 6);
        assert_eq!(store.last_wal_pos().unwrap(), 10);
        // Staged, then a crash before its commit.
        let s8 = stage(&store, &cp(8, 3)).unwrap();
        drop(store);
        let mut store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(load(&store), (5, cp(5, 2).tables));
        assert_eq!(cp_files(dir.path()), vec![s5.name.clone()]);
        assert_ne!(s8.name, s5.name);
        // A crash mid-file.
        store.fail_checkpoint_after_tables = Some(1);
        assert!(stage(&store, &cp(8, 3)).is_err());
        drop(store);
        let mut store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(load(&store), (5, cp(5, 2).tables));
        assert_eq!(cp_files(dir.path()), vec![s5.name.clone()]);
        // The next one commits and the previous file goes (deleted by a thread of its own,
        // off the writer: soon).
        let s9 = stage(&store, &cp(9, 4)).unwrap();
        store.save_staged_checkpoint(&s9).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cp_files(dir.path()) != vec![s9.name.clone()] && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(cp_files(dir.path()), vec![s9.name.clone()]);
        drop(store);
        check(dir.path()).unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(load(&store), (9, cp(9, 4).tables));
        assert_eq!(store.wal_after(0).unwrap()[0].0, 10);
        // Back to rows (a store without files would): the file is no longer named.
        store.save_checkpoint(&cp(10, 5)).unwrap();
        assert_eq!(load(&store), (10, cp(10, 5).tables));
        assert!(cp_files(dir.path()).is_empty());
    }

    /// A checkpoint over more WAL than one commit trims leaves the rest to the appends
    /// (and to the next start): never an entry after the checkpoint, and replay (after its
    /// position) sees the same entries throughout.
    #[test]
    fn the_wal_behind_a_checkpoint_is_trimmed_by_the_appends() {
        let n = WAL_TRIM_AT_CHECKPOINT as u64 + 100;
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        let entries: Vec<WalEntry> = (1..=n + 5).map(|p| entry(p, "c", p, 0)).collect();
        store.append(&entries).unwrap();
        let s = stage(&store, &cp(n, 1)).unwrap();
        store.save_staged_checkpoint(&s).unwrap();
        let first = |st: &RedbStore| st.wal_after(0).unwrap()[0].0;
        assert_eq!(first(&store), WAL_TRIM_AT_CHECKPOINT as u64 + 1);
        let after: Vec<u64> = store.wal_after(n).unwrap().iter().map(|x| x.0).collect();
        assert_eq!(after, (n + 1..=n + 5).collect::<Vec<_>>());
        // One append of one entry trims 10; a restart resumes where it was.
        store.append(&[entry(n + 6, "c", n + 6, 0)]).unwrap();
        assert_eq!(first(&store), WAL_TRIM_AT_CHECKPOINT as u64 + 11);
        drop(store);
        let mut store = RedbStore::open(dir.path()).unwrap();
        for p in n + 7..n + 30 {
            store.append(&[entry(p, "c", p, 0)]).unwrap();
        }
        assert_eq!(first(&store), n + 1);
        assert_eq!(store.wal_after(n).unwrap().len(), 29);
        assert_eq!(store.last_wal_pos().unwrap(), n + 29);
    }

    /// A checkpoint file that does not match its pointer is refused, at open's check and
    /// at load, never read as state.
    #[test]
    fn a_damaged_or_missing_checkpoint_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        let s = stage(&store, &cp(0, 7)).unwrap();
        store.save_staged_checkpoint(&s).unwrap();
        drop(store);
        let path = dir.path().join(cpfile::DIR).join(&s.name);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let err = check(dir.path()).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(store.load_checkpoint().is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(store.load_checkpoint().is_err());
    }

    /// A store whose dedup disk tier is still in redb rows (before the run files): the
    /// first open moves every row into a run and empties the tables; a second open finds
    /// the same entries (from the run) and no rows.
    #[test]
    fn dedup_rows_of_an_older_store_move_into_a_run() {
        use crate::state::dedup::Ordinal;
        let dir = tempfile::tempdir().unwrap();
        let id = |n: u8| [n; 16];
        let entry = |n: u8| Entry {
            keep_until: 1_000 + i64::from(n),
            ordinal: Ordinal {
                pos: u64::from(n),
                idx: 1,
            },
        };
        {
            let store = RedbStore::open(dir.path()).unwrap();
            let tx = store.db.begin_write().unwrap();
            {
                let mut t = tx.open_table(DEDUP).unwrap();
                for n in 1..=50u8 {
                    t.insert(&id(n), &entry(n).encode()).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        for _ in 0..2 {
            let store = RedbStore::open(dir.path()).unwrap();
            let table = store.dedup_table().unwrap();
            assert_eq!(table.len().unwrap(), 50);
            for n in 1..=50u8 {
                assert_eq!(table.get(&id(n)).unwrap(), Some(entry(n)), "id {n}");
            }
            assert_eq!(table.get(&id(51)).unwrap(), None);
            let tx = store.db.begin_read().unwrap();
            let rows = tx.open_table(DEDUP).unwrap();
            assert_eq!(redb::ReadableTableMetadata::len(&rows).unwrap(), 0);
        }
    }
}
