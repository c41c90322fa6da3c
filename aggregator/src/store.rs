//! Durable storage behind a trait: the WAL of ingested batches, the per-collector seq
//! high-water marks, and checkpoints. The default implementation is redb (pure Rust,
//! ACID, one fsync'd commit per write transaction, crash-safe by design), so a WAL append
//! and its high-water mark update commit together, and a checkpoint plus the WAL
//! truncation it allows commit together: a crash mid-checkpoint leaves the previous
//! checkpoint and the full WAL.
//!
//! Why redb: pure Rust (no C build on two cores), a single file, transactions with
//! durable commits, and it is maintained; fjall (LSM) would suit much larger state but is
//! a larger dependency for what is here a WAL plus a few blobs.
//!
//! The exact-dedup disk tier lives in the same database (tables `dedup`: impression id ->
//! encoded entry, and `dedup_expiry`: (keep_until, id) -> () for expiry in order), reached
//! through [`Store::dedup_table`]; see `state::dedup` for why its commits need not be tied
//! to the checkpoint's.
//!
//! This module knows nothing about windows or counts: it stores bytes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

const WAL: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("wal");
const HWM: TableDefinition<'static, &str, u64> = TableDefinition::new("hwm");
const CHECKPOINT: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("checkpoint");
const META_WAL_POS: &str = "_wal_pos";
const DEDUP: TableDefinition<'static, &[u8; 16], &[u8; ENTRY_LEN]> = TableDefinition::new("dedup");
/// Key: keep_until as big-endian with the sign bit flipped (so byte order = time order),
/// then the id.
const DEDUP_EXPIRY: TableDefinition<'static, &[u8; 24], ()> = TableDefinition::new("dedup_expiry");

use crate::state::dedup::{DedupError, ENTRY_LEN, Entry, Id, SpillTable};

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
    Database::builder()
        .set_check_integrity_on_open(true)
        .open(&path)
        .map(drop)
        .map_err(|err| damaged(&path, &err))
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
    /// Sender's seq (becomes the collector's high-water mark).
    pub seq: u64,
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
    /// Durably appends entries and raises their collectors' high-water marks, in one
    /// commit.
    fn append(&mut self, entries: &[WalEntry]) -> Result<(), StoreError>;
    /// High-water marks of every collector.
    fn high_water_marks(&self) -> Result<HashMap<String, u64>, StoreError>;
    /// WAL entries after `pos`, in order.
    fn wal_after(&self, pos: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Highest WAL position written (0 if none).
    fn last_wal_pos(&self) -> Result<u64, StoreError>;
    /// The latest checkpoint.
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;
    /// Writes a checkpoint and deletes the WAL up to its position, in one commit.
    fn save_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError>;
    /// The disk tier of the exact-dedup set (in the same store).
    fn dedup_table(&self) -> Result<Box<dyn SpillTable>, StoreError>;
}

/// The redb store (`<data_dir>/aggregator.redb`).
#[derive(Debug)]
pub struct RedbStore {
    db: Arc<Database>,
    /// Test hook: abort (drop uncommitted) the next checkpoint after this many tables, as a
    /// crash mid-checkpoint would.
    pub fail_checkpoint_after_tables: Option<usize>,
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
            tx.open_table(CHECKPOINT).map_err(e)?;
            tx.open_table(DEDUP).map_err(e)?;
            tx.open_table(DEDUP_EXPIRY).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(RedbStore {
            db: Arc::new(db),
            fail_checkpoint_after_tables: None,
        })
    }
}

impl Store for RedbStore {
    fn append(&mut self, entries: &[WalEntry]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut wal = tx.open_table(WAL).map_err(e)?;
            let mut hwm = tx.open_table(HWM).map_err(e)?;
            for en in entries {
                wal.insert(en.pos, en.batch.as_slice()).map_err(e)?;
                let cur = hwm
                    .get(en.collector_id.as_str())
                    .map_err(e)?
                    .map(|v| v.value());
                if cur.is_none_or(|c| c < en.seq) {
                    hwm.insert(en.collector_id.as_str(), en.seq).map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)
    }

    fn high_water_marks(&self) -> Result<HashMap<String, u64>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(HWM).map_err(e)?;
        let mut out = HashMap::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.insert(k.value().to_string(), v.value());
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
        let cp = tx.open_table(CHECKPOINT).map_err(e)?;
        let cp_pos = cp
            .get(META_WAL_POS)
            .map_err(e)?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map(u64::from_le_bytes);
        Ok(last.unwrap_or(0).max(cp_pos.unwrap_or(0)))
    }

    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(CHECKPOINT).map_err(e)?;
        let Some(pos) = t.get(META_WAL_POS).map_err(e)? else {
            return Ok(None);
        };
        let wal_pos = <[u8; 8]>::try_from(pos.value())
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError("corrupt checkpoint position".into()))?;
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
            let mut wal = tx.open_table(WAL).map_err(e)?;
            wal.retain(|k, _| k > cp.wal_pos).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    fn dedup_table(&self) -> Result<Box<dyn SpillTable>, StoreError> {
        Ok(Box::new(RedbDedup {
            db: self.db.clone(),
        }))
    }
}

/// The dedup disk tier in the aggregator's redb file.
#[derive(Debug)]
pub struct RedbDedup {
    db: Arc<Database>,
}

fn d(x: impl std::fmt::Display) -> DedupError {
    DedupError(x.to_string())
}

fn expiry_key(keep_until: i64, id: &Id) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&((keep_until as u64) ^ (1 << 63)).to_be_bytes());
    k[8..].copy_from_slice(id);
    k
}

impl SpillTable for RedbDedup {
    fn get(&self, id: &Id) -> Result<Option<Entry>, DedupError> {
        let tx = self.db.begin_read().map_err(d)?;
        let t = tx.open_table(DEDUP).map_err(d)?;
        Ok(t.get(id).map_err(d)?.map(|v| Entry::decode(v.value())))
    }

    fn put(&mut self, entries: &[(Id, Entry)]) -> Result<(), DedupError> {
        let tx = self.db.begin_write().map_err(d)?;
        {
            let mut t = tx.open_table(DEDUP).map_err(d)?;
            let mut x = tx.open_table(DEDUP_EXPIRY).map_err(d)?;
            for (id, en) in entries {
                let old = t.insert(id, &en.encode()).map_err(d)?;
                if let Some(old) = old {
                    let old = Entry::decode(old.value());
                    x.remove(&expiry_key(old.keep_until, id)).map_err(d)?;
                }
                x.insert(&expiry_key(en.keep_until, id), ()).map_err(d)?;
            }
        }
        tx.commit().map_err(d)
    }

    fn expire(&mut self, before: i64) -> Result<u64, DedupError> {
        let tx = self.db.begin_write().map_err(d)?;
        let mut n = 0;
        {
            let mut t = tx.open_table(DEDUP).map_err(d)?;
            let mut x = tx.open_table(DEDUP_EXPIRY).map_err(d)?;
            let end = expiry_key(before, &[0; 16]);
            let mut gone: Vec<Id> = Vec::new();
            for row in x
                .extract_from_if::<&[u8; 24], _>(..&end, |_, _| true)
                .map_err(d)?
            {
                let (k, _) = row.map_err(d)?;
                let mut id = [0u8; 16];
                id.copy_from_slice(&k.value()[8..]);
                gone.push(id);
            }
            for id in &gone {
                t.remove(id).map_err(d)?;
            }
            n += gone.len() as u64;
        }
        tx.commit().map_err(d)?;
        Ok(n)
    }

    fn for_each_id(&self, f: &mut dyn FnMut(&Id)) -> Result<(), DedupError> {
        let tx = self.db.begin_read().map_err(d)?;
        let t = tx.open_table(DEDUP).map_err(d)?;
        for row in t.iter().map_err(d)? {
            let (k, _) = row.map_err(d)?;
            f(k.value());
        }
        Ok(())
    }

    fn len(&self) -> Result<u64, DedupError> {
        let tx = self.db.begin_read().map_err(d)?;
        let t = tx.open_table(DEDUP).map_err(d)?;
        t.len().map_err(d)
    }
}
