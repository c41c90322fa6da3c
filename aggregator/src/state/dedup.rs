//! Exact dedup of impression ids with a bounded RAM footprint: a RAM tier of recently
//! inserted ids, a Bloom filter, and a disk tier (a [`SpillTable`]; append-only sorted run
//! files beside the aggregator's store in production and in the benches,
//! `crate::store::runs`; [`MemTable`] in unit tests).
//!
//! Design (why it is exact, bounded and crash-safe):
//! - **Bounded by what can still count.** An id is kept until `keep_until` =
//!   token expiry + skew, and dropped only once `keep_until` is older than the oldest event
//!   time still counted (watermark - minute retention). Any later copy of that impression
//!   has an event time <= `keep_until` (the shared countable rule, `adclick_proto::
//!   countable`), so it is refused as too old before dedup is asked: dropping the id can
//!   never let a duplicate count. So the ids held are those of the last token lifetime +
//!   retention; RAM holds at most `dedup.memory_bytes` of them, the disk the rest.
//! - **RAM tier**: ids inserted since the last spill, at most `memory_bytes * 3/4` worth
//!   (~[`RAM_ENTRY_BYTES`] each). When full, or at a checkpoint, the whole tier is written
//!   to the disk tier in one durable write (sorted: one immutable run file) and cleared.
//! - **Bloom filter** (`memory_bytes / 4`, fastbloom) over the ids on disk: a new id costs
//!   no disk read unless the filter says "maybe" (~1% while within its capacity; beyond
//!   it the false-positive rate rises, costing reads, never a click). It is rebuilt from the
//!   disk tier at start and after expiry has removed enough ids.
//! - **Crash safety without a coupled commit**: every entry carries the [`Ordinal`] of the
//!   click that inserted it (WAL position, index in the batch), and a lookup at ordinal `o`
//!   only believes entries with an ordinal below `o`. So a spill may commit at any time,
//!   even ahead of the checkpoint: after kill -9, the WAL replay from the last checkpoint
//!   meets entries written by its own future and ignores them, reaching exactly the state
//!   of the first run. Expired entries are deleted from disk only below the floor of the
//!   last *committed* checkpoint, which every recovery starts at or above (the run files
//!   drop a whole run once its newest entry is below it: later, never earlier).
//!
//! No I/O here: the disk tier is behind the [`SpillTable`] trait.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use crate::sketch::bloom::IdFilter;

use super::FastMap;

/// An impression id.
pub type Id = [u8; 16];

/// RAM cost of one RAM-tier entry (hash table slot with key and value at the table's worst
/// load, plus control bytes), used to turn the memory budget into an entry count.
pub const RAM_ENTRY_BYTES: usize = 96;
/// Bits per id in the Bloom filter at its design capacity (~1% false positives).
const BLOOM_BITS_PER_ID: usize = 10;

/// Position of a click in the WAL order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ordinal {
    /// WAL position of its batch (0: restored from an old-format checkpoint).
    pub pos: u64,
    /// Index of the click in its batch.
    pub idx: u32,
}

/// One dedup entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Token expiry + skew: any copy of the impression has an event time at or before it.
    pub keep_until: i64,
    /// The click that inserted it.
    pub ordinal: Ordinal,
}

/// Encoded length of an [`Entry`].
pub const ENTRY_LEN: usize = 20;

impl Entry {
    /// Fixed-size little-endian encoding.
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[..8].copy_from_slice(&self.keep_until.to_le_bytes());
        b[8..16].copy_from_slice(&self.ordinal.pos.to_le_bytes());
        b[16..].copy_from_slice(&self.ordinal.idx.to_le_bytes());
        b
    }

    /// Inverse of [`Entry::encode`].
    pub fn decode(b: &[u8; ENTRY_LEN]) -> Self {
        let mut k = [0u8; 8];
        let mut p = [0u8; 8];
        let mut i = [0u8; 4];
        k.copy_from_slice(&b[..8]);
        p.copy_from_slice(&b[8..16]);
        i.copy_from_slice(&b[16..]);
        Entry {
            keep_until: i64::from_le_bytes(k),
            ordinal: Ordinal {
                pos: u64::from_le_bytes(p),
                idx: u32::from_le_bytes(i),
            },
        }
    }
}

/// The disk tier failed: the aggregator must stop acking (a restart replays the WAL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dedup disk tier: {0}")]
pub struct DedupError(pub String);

/// The disk tier of the dedup set.
pub trait SpillTable: Send + fmt::Debug {
    /// The entry of `id`, if any.
    fn get(&self, id: &Id) -> Result<Option<Entry>, DedupError>;
    /// Durably adds entries (one commit), replacing existing ones.
    fn put(&mut self, entries: &[(Id, Entry)]) -> Result<(), DedupError>;
    /// Deletes entries whose `keep_until` is before `before`; returns how many.
    fn expire(&mut self, before: i64) -> Result<u64, DedupError>;
    /// Calls `f` with every id held.
    fn for_each_id(&self, f: &mut dyn FnMut(&Id)) -> Result<(), DedupError>;
    /// Ids held.
    fn len(&self) -> Result<u64, DedupError>;
    /// True when empty.
    fn is_empty(&self) -> Result<bool, DedupError> {
        Ok(self.len()? == 0)
    }
    /// RAM the disk tier holds for its lookups (indexes), counted in [`Dedup::ram_bytes`].
    fn ram_bytes(&self) -> usize {
        0
    }
}

/// An in-memory [`SpillTable`] (tests, benches, and an aggregator without a store).
#[derive(Debug, Default)]
pub struct MemTable {
    map: HashMap<Id, Entry>,
    by_expiry: BTreeSet<(i64, Id)>,
}

impl SpillTable for MemTable {
    fn get(&self, id: &Id) -> Result<Option<Entry>, DedupError> {
        Ok(self.map.get(id).copied())
    }
    fn put(&mut self, entries: &[(Id, Entry)]) -> Result<(), DedupError> {
        for (id, e) in entries {
            if let Some(old) = self.map.insert(*id, *e) {
                self.by_expiry.remove(&(old.keep_until, *id));
            }
            self.by_expiry.insert((e.keep_until, *id));
        }
        Ok(())
    }
    fn expire(&mut self, before: i64) -> Result<u64, DedupError> {
        let keep = self.by_expiry.split_off(&(before, [0; 16]));
        let gone = std::mem::replace(&mut self.by_expiry, keep);
        for (_, id) in &gone {
            self.map.remove(id);
        }
        Ok(gone.len() as u64)
    }
    fn for_each_id(&self, f: &mut dyn FnMut(&Id)) -> Result<(), DedupError> {
        self.map.keys().for_each(f);
        Ok(())
    }
    fn len(&self) -> Result<u64, DedupError> {
        Ok(self.map.len() as u64)
    }
}

/// Running totals (exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    /// Ids written to the disk tier.
    pub spilled: u64,
    /// Disk reads (Bloom "maybe").
    pub disk_reads: u64,
    /// Disk reads that found nothing believable (Bloom false positives).
    pub bloom_false_positives: u64,
    /// Bloom filter rebuilds.
    pub bloom_rebuilds: u64,
    /// Ids deleted from the disk tier as expired.
    pub expired: u64,
}

/// See the module doc.
pub struct Dedup {
    recent: FastMap<Id, Entry>,
    max_recent: usize,
    /// Ids on disk (may contain ids since deleted there; rebuilt when mostly stale).
    bloom: IdFilter,
    /// Ids the disk held at the last rebuild.
    live_at_rebuild: u64,
    disk: Box<dyn SpillTable>,
    /// Totals.
    pub stats: DedupStats,
}

impl fmt::Debug for Dedup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("recent", &self.recent.len())
            .field("max_recent", &self.max_recent)
            .field("bloom_bytes", &self.bloom.bytes())
            .field("bloom_items", &self.bloom.items())
            .field("disk", &self.disk)
            .finish()
    }
}

impl Dedup {
    /// A dedup set using at most about `memory_bytes` of RAM, over `disk`. Call
    /// [`Dedup::rebuild_bloom`] after opening a non-empty disk tier.
    pub fn new(memory_bytes: usize, disk: Box<dyn SpillTable>) -> Self {
        let memory_bytes = memory_bytes.max(64 * 1024);
        let bloom_bits = memory_bytes / 4 * 8;
        let bloom_capacity = bloom_bits / BLOOM_BITS_PER_ID;
        let max_recent = (memory_bytes - memory_bytes / 4) / RAM_ENTRY_BYTES;
        Dedup {
            // Sized for the whole tier up front: growing by doubling rehashed every id
            // up to 2M ids (~5% of the apply time until the first spill, and a pause per
            // doubling). Within the budget (the tier's bound is what it would reach
            // anyway); the OS maps the slots only as they are written.
            recent: FastMap::with_capacity_and_hasher(max_recent, Default::default()),
            max_recent,
            bloom: IdFilter::new(bloom_bits, bloom_capacity),
            live_at_rebuild: 0,
            disk,
            stats: DedupStats::default(),
        }
    }

    /// Whether `id` was inserted by a click before `at` (see the module doc).
    pub fn seen(&mut self, id: &Id, at: Ordinal) -> Result<bool, DedupError> {
        if let Some(e) = self.recent.get(id) {
            return Ok(e.ordinal < at);
        }
        if !self.bloom.may_contain(id) {
            return Ok(false);
        }
        self.stats.disk_reads += 1;
        let hit = self.disk.get(id)?.is_some_and(|e| e.ordinal < at);
        self.stats.bloom_false_positives += u64::from(!hit);
        Ok(hit)
    }

    /// [`Dedup::seen`] then, when not seen, [`Dedup::insert`], with one lookup of the RAM
    /// tier: the per-click path. Returns whether `id` was seen before `entry.ordinal`.
    pub fn check_insert(&mut self, id: Id, entry: Entry) -> Result<bool, DedupError> {
        use std::collections::hash_map::Entry as Slot;
        match self.recent.entry(id) {
            Slot::Occupied(mut o) => {
                if o.get().ordinal < entry.ordinal {
                    return Ok(true);
                }
                // Inserted by this click's own future (a replay after a crash): not seen.
                o.insert(entry);
                return Ok(false);
            }
            Slot::Vacant(v) => {
                // The filter is empty until the first spill: no hashing, no cache miss.
                if !self.bloom.may_contain(&id) {
                    v.insert(entry);
                } else {
                    self.stats.disk_reads += 1;
                    let hit = self
                        .disk
                        .get(&id)?
                        .is_some_and(|e| e.ordinal < entry.ordinal);
                    self.stats.bloom_false_positives += u64::from(!hit);
                    if hit {
                        return Ok(true);
                    }
                    v.insert(entry);
                }
            }
        }
        if self.recent.len() >= self.max_recent {
            self.spill()?;
        }
        Ok(false)
    }

    /// Records `id`; spills the RAM tier to disk when it is full.
    pub fn insert(&mut self, id: Id, entry: Entry) -> Result<(), DedupError> {
        self.recent.insert(id, entry);
        if self.recent.len() >= self.max_recent {
            self.spill()?;
        }
        Ok(())
    }

    /// Writes the RAM tier to disk (one commit) and clears it.
    pub fn spill(&mut self) -> Result<(), DedupError> {
        if self.recent.is_empty() {
            return Ok(());
        }
        let mut batch: Vec<(Id, Entry)> = self.recent.iter().map(|(k, v)| (*k, *v)).collect();
        batch.sort_unstable_by_key(|e| e.0);
        self.disk.put(&batch)?;
        for (id, _) in &batch {
            self.bloom.insert(id);
        }
        self.stats.spilled += batch.len() as u64;
        // Keep the table's allocation: it is within the budget and the next fill reuses it.
        self.recent.clear();
        Ok(())
    }

    /// Checkpoint step: spills the RAM tier, deletes disk entries with `keep_until` before
    /// `expire_before` (the floor of the last committed checkpoint), and rebuilds the
    /// Bloom filter when it holds far more ids than the disk does.
    pub fn checkpoint(&mut self, expire_before: i64) -> Result<(), DedupError> {
        self.spill()?;
        self.stats.expired += self.disk.expire(expire_before)?;
        let items = self.bloom.items();
        let overfull =
            items > self.bloom.capacity() as u64 && items > 2 * self.live_at_rebuild.max(1);
        if overfull {
            self.rebuild_bloom()?;
        }
        Ok(())
    }

    /// Rebuilds the Bloom filter from the disk tier (at start, and when expiry left it
    /// mostly stale).
    pub fn rebuild_bloom(&mut self) -> Result<(), DedupError> {
        let mut bloom = self.bloom.emptied();
        let mut n = 0u64;
        self.disk.for_each_id(&mut |id| {
            bloom.insert(id);
            n += 1;
        })?;
        self.bloom = bloom;
        self.live_at_rebuild = n;
        self.stats.bloom_rebuilds += 1;
        Ok(())
    }

    /// Ids in the RAM tier.
    pub fn ram_len(&self) -> usize {
        self.recent.len()
    }

    /// Ids on disk (counting ids not yet expired there).
    pub fn disk_len(&self) -> Result<u64, DedupError> {
        self.disk.len()
    }

    /// Approximate RAM held (RAM tier at its allocated capacity + Bloom filter).
    pub fn ram_bytes(&self) -> usize {
        self.recent.capacity() * (16 + std::mem::size_of::<Entry>() + 1)
            + self.bloom.bytes()
            + self.disk.ram_bytes()
    }

    /// Largest RAM-tier size before a spill.
    pub fn max_ram_entries(&self) -> usize {
        self.max_recent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn id(n: u64) -> Id {
        let mut x = [0u8; 16];
        x[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        x[8..].copy_from_slice(&n.to_le_bytes());
        x
    }

    fn at(pos: u64, idx: u32) -> Ordinal {
        Ordinal { pos, idx }
    }

    #[test]
    fn entry_round_trips() {
        let e = Entry {
            keep_until: -5,
            ordinal: at(u64::MAX, 7),
        };
        assert_eq!(Entry::decode(&e.encode()), e);
    }

    #[test]
    fn ram_tier_spills_at_its_bound_and_stays_exact() {
        // 64 KiB -> 48 KiB of RAM tier -> 512 entries.
        let mut d = Dedup::new(64 * 1024, Box::<MemTable>::default());
        let cap = d.max_ram_entries();
        assert_eq!(cap, 48 * 1024 / RAM_ENTRY_BYTES);
        for n in 0..10 * cap as u64 {
            assert!(!d.seen(&id(n), at(n + 1, 0)).unwrap());
            d.insert(
                id(n),
                Entry {
                    keep_until: 100,
                    ordinal: at(n + 1, 0),
                },
            )
            .unwrap();
            assert!(d.ram_len() < cap);
        }
        assert_eq!(d.stats.spilled, 10 * cap as u64 - d.ram_len() as u64);
        let end = at(u64::MAX, 0);
        for n in 0..10 * cap as u64 {
            assert!(d.seen(&id(n), end).unwrap(), "{n}");
        }
        assert!(!d.seen(&id(10 * cap as u64 + 1), end).unwrap());
    }

    #[test]
    fn entries_from_the_future_are_not_believed() {
        let mut d = Dedup::new(64 * 1024, Box::<MemTable>::default());
        d.insert(
            id(1),
            Entry {
                keep_until: 100,
                ordinal: at(5, 3),
            },
        )
        .unwrap();
        d.spill().unwrap();
        assert!(!d.seen(&id(1), at(5, 3)).unwrap(), "its own insert");
        assert!(!d.seen(&id(1), at(4, 9)).unwrap(), "a replay before it");
        assert!(d.seen(&id(1), at(5, 4)).unwrap());
    }

    #[test]
    fn expiry_and_rebuild_forget_only_expired_ids() {
        let mut d = Dedup::new(64 * 1024, Box::<MemTable>::default());
        for n in 0..2000u64 {
            let keep_until = if n % 2 == 0 { 10 } else { 1000 };
            d.insert(
                id(n),
                Entry {
                    keep_until,
                    ordinal: at(1, n as u32),
                },
            )
            .unwrap();
        }
        d.checkpoint(11).unwrap();
        d.rebuild_bloom().unwrap();
        assert_eq!(d.disk_len().unwrap(), 1000);
        for n in 0..2000u64 {
            assert_eq!(d.seen(&id(n), at(2, 0)).unwrap(), n % 2 == 1);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Against a HashSet oracle: with spills at arbitrary points, `seen` answers exactly
        /// whether the id was inserted before.
        #[test]
        fn matches_a_set_oracle(ops in proptest::collection::vec((0u64..300, any::<bool>()), 1..1500)) {
            let mut d = Dedup::new(64 * 1024, Box::<MemTable>::default());
            let mut oracle = HashSet::new();
            for (i, (n, spill)) in ops.into_iter().enumerate() {
                let o = at(1 + i as u64, 0);
                prop_assert_eq!(d.seen(&id(n), o).unwrap(), oracle.contains(&n));
                if oracle.insert(n) {
                    d.insert(id(n), Entry { keep_until: 0, ordinal: o }).unwrap();
                }
                if spill {
                    d.spill().unwrap();
                }
            }
        }
    }
}
