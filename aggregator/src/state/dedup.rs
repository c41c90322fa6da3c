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
//! - **RAM tier**: ids inserted since the last spill, at most `memory_bytes * 3/8` worth
//!   (~[`RAM_ENTRY_BYTES`] each; the table takes 56-104 bytes per id, 72 at the default
//!   budget: an open-addressing table of 32-byte slots where one probe is one cache line,
//!   plus the list of used slots, see `tier`). When full, or at a checkpoint, the tier is *frozen*
//!   (a fresh one takes the inserts) and a spill thread writes it to the disk tier in one
//!   durable write (sorted: one immutable run file), then adds its ids to the Bloom
//!   filter, expires old runs and merges runs (`store::runs`). Lookups check the frozen
//!   tier after the live one until the spill is durable; then it is dropped. One spill at
//!   a time, so RAM holds at most two tiers (the `3/4` of the budget), and a full tier
//!   waits for the spill before it (back-pressure, not growth).
//! - **Bloom filter** (`memory_bytes / 4`, blocked: one cache line per id) over the ids on disk: a new id costs
//!   no disk read unless the filter says "maybe" (~1% while within its capacity; beyond
//!   it the false-positive rate rises, costing reads, never a click). It is rebuilt from the
//!   disk tier at start and after expiry has removed enough ids.
//! - **Crash safety without a coupled commit**: every entry carries the [`Ordinal`] of the
//!   click that inserted it (WAL position, index in the batch), and a lookup at ordinal `o`
//!   only believes entries with an ordinal below `o`. So a spill may commit at any time,
//!   even ahead of the checkpoint: after kill -9, the WAL replay from the last checkpoint
//!   meets entries written by its own future and ignores them, reaching exactly the state
//!   of the first run. A checkpoint is saved only once the spill it started (of every id
//!   inserted before it) is durable ([`Dedup::begin_flush`], [`Dedup::flushed`]): a crash
//!   while that run is being written leaves the previous checkpoint, whose replay
//!   re-inserts those ids. Expired entries are deleted from disk only below the floor of
//!   the last *committed* checkpoint, which every recovery starts at or above (the run
//!   files drop a whole run once its newest entry is below it: later, never earlier).
//!
//! No I/O here: the disk tier is behind the [`SpillTable`] trait. Threads this module
//! starts: the spill thread, and one that makes or empties the RAM tier the next swap
//! takes ([`Dedup::prepare_spare`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::sketch::bloom::IdFilter;

use tier::{Place, Tier};

/// An impression id.
pub type Id = [u8; 16];

/// RAM budgeted per RAM-tier entry, used to turn the memory budget into an entry count
/// (the tier's table takes 32 bytes per slot at a load between 1/3 and 2/3, plus 8 per id
/// for its list of used slots: at most 104 at the worst-rounded budget, 72 at the default).
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

/// The disk tier of the dedup set. Shared between the writer thread (lookups) and the
/// spill thread (writes, expiry), so every method takes `&self`: an implementation
/// serialises its writes itself and keeps lookups answering while one runs.
pub trait SpillTable: Send + Sync + fmt::Debug {
    /// The entry of `id`, if any.
    fn get(&self, id: &Id) -> Result<Option<Entry>, DedupError>;
    /// Durably adds entries (one commit), replacing existing ones.
    fn put(&self, entries: &[(Id, Entry)]) -> Result<(), DedupError>;
    /// Deletes entries whose `keep_until` is before `before`; returns how many.
    fn expire(&self, before: i64) -> Result<u64, DedupError>;
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
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default, Clone)]
struct MemInner {
    map: HashMap<Id, Entry>,
    by_expiry: BTreeSet<(i64, Id)>,
}

impl MemTable {
    fn inner(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A panic elsewhere cannot leave the maps half-updated in a way a lookup minds.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of what the table holds now (tests: the disk at the moment of a crash).
    pub fn snapshot(&self) -> MemTable {
        MemTable {
            inner: Mutex::new(self.inner().clone()),
        }
    }
}

impl SpillTable for MemTable {
    fn get(&self, id: &Id) -> Result<Option<Entry>, DedupError> {
        Ok(self.inner().map.get(id).copied())
    }
    fn put(&self, entries: &[(Id, Entry)]) -> Result<(), DedupError> {
        let mut t = self.inner();
        for (id, e) in entries {
            if let Some(old) = t.map.insert(*id, *e) {
                t.by_expiry.remove(&(old.keep_until, *id));
            }
            t.by_expiry.insert((e.keep_until, *id));
        }
        Ok(())
    }
    fn expire(&self, before: i64) -> Result<u64, DedupError> {
        let mut t = self.inner();
        let keep = t.by_expiry.split_off(&(before, [0; 16]));
        let gone = std::mem::replace(&mut t.by_expiry, keep);
        for (_, id) in &gone {
            t.map.remove(id);
        }
        Ok(gone.len() as u64)
    }
    fn for_each_id(&self, f: &mut dyn FnMut(&Id)) -> Result<(), DedupError> {
        self.inner().map.keys().for_each(f);
        Ok(())
    }
    fn len(&self) -> Result<u64, DedupError> {
        Ok(self.inner().map.len() as u64)
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
    /// Fresh RAM tiers made on the caller's thread at a swap because none was prepared
    /// (see `Dedup::prepare_spare`): a checkpoint before the first tier was half full.
    pub inline_tiers: u64,
}

/// The hash of an id for the RAM tiers and the Bloom filter (computed once per lookup).
#[inline]
fn hash(id: &Id) -> u64 {
    IdFilter::hash(id)
}

/// The RAM tier: an open-addressing table of ids and their entries, one 32-byte slot each
/// (the id, `keep_until`, the ordinal packed in 8 bytes), two slots per 64-byte cache line,
/// probed line by line from the line the id's hash picks. Replaces a `HashMap<Id, Entry>`
/// whose control bytes and 40-byte buckets were two separate lines per probe (and a slot
/// could straddle two): here one probe is one line (both of its slots full is rare at the
/// tier's load of at most 2/3), the line [`Dedup::warm`] loads is the one the insert
/// writes, and the hash is the Bloom filter's (one hash per id for both). Sized for the
/// whole tier up front (no growth in the hot path; it grows only past 7/8 full, which a
/// tier whose spills keep failing can reach). Ids are never removed: a tier is cleared
/// whole for reuse.
mod tier {
    use super::{Entry, Id, Ordinal};

    /// Bits of a packed ordinal's `idx` (the rest, but the top bit, is `pos`).
    const IDX_BITS: u32 = 24;
    /// Top bit of a packed ordinal: the rest is an index into `Tier::wide`.
    const WIDE: u64 = 1 << 63;

    /// See the section doc.
    #[derive(Debug, Clone)]
    pub(super) struct Tier {
        /// Slot `i` is `words[first + 2 * i]` (the id as an integer, 0: empty; the
        /// all-zero id lives in `zero`) and `words[first + 2 * i + 1]` (`keep_until` in
        /// the low half, the packed ordinal in the high half). A power of two of slots,
        /// from the first 64-byte boundary of the allocation (16-aligned), so a line holds
        /// exactly two slots.
        words: Vec<u128>,
        first: usize,
        /// Slots - 1.
        mask: usize,
        /// `64 - log2(lines)`: a hash's top bits pick the line.
        shift: u32,
        /// Ids held (the zero id included).
        len: usize,
        zero: Option<Entry>,
        /// Ordinals too wide to pack (WAL positions >= 2^39 or indexes >= 2^24); a packed
        /// ordinal is `pos << IDX_BITS | idx`, a wide one `WIDE | index here`.
        wide: Vec<Ordinal>,
        /// The slots in use, in insertion order: the spill and `clear` visit these, not
        /// every slot (a checkpoint's tier may hold a few ids in millions of slots).
        used: Vec<usize>,
    }

    /// The id as the table's key.
    #[inline]
    pub(super) fn key(id: &Id) -> u128 {
        u128::from_le_bytes(*id)
    }

    impl Tier {
        /// A table for `max` ids at a load of at most 2/3.
        pub(super) fn new(max: usize) -> Self {
            let n = (max.saturating_add(max / 2)).max(4).next_power_of_two();
            Self::with_slots(n)
        }

        fn with_slots(n: usize) -> Self {
            let lines = n / 2;
            // Zeroed allocation (calloc), then one write per page: a page first read by a
            // lookup (warmed ahead) would be mapped to the shared zero page and copied on its
            // first write, with a TLB shootdown to every CPU running one of our threads:
            // ~9% of the apply path's time while a fresh tier filled. A write maps it once.
            // (`black_box`: a store of 0 into zeroed memory may otherwise be optimised out.)
            let mut words = vec![0u128; 2 * n + 3];
            for w in words.iter_mut().step_by(4096 / 16) {
                *w = std::hint::black_box(0);
            }
            let first = (64 - words.as_ptr() as usize % 64) % 64 / 16;
            Tier {
                words,
                first,
                mask: n - 1,
                shift: 64 - lines.trailing_zeros(),
                len: 0,
                zero: None,
                wide: Vec::new(),
                used: Vec::new(),
            }
        }

        #[inline]
        fn key_at(&self, i: usize) -> u128 {
            self.words[self.first + 2 * i]
        }

        #[inline]
        fn val_at(&self, i: usize) -> (i64, u64) {
            let v = self.words[self.first + 2 * i + 1];
            (v as u64 as i64, (v >> 64) as u64)
        }

        #[inline]
        fn set(&mut self, i: usize, k: u128, keep_until: i64, ord: u64) {
            let at = self.first + 2 * i;
            self.words[at] = k;
            self.words[at + 1] = u128::from(ord) << 64 | u128::from(keep_until as u64);
        }

        /// The first slot of the line of hash `h`.
        #[inline]
        fn home(&self, h: u64) -> usize {
            // `shift` is 64 for a one-line table: `checked_shr` gives line 0.
            (h.checked_shr(self.shift).unwrap_or(0) as usize) * 2
        }

        /// Loads the line an id of hash `h` is looked up and inserted in (changes nothing).
        #[inline]
        pub(super) fn warm(&self, h: u64) {
            std::hint::black_box(self.key_at(self.home(h)));
        }

        /// `Ok(slot)` of `k` (non-zero) or `Err(slot)`: the free slot it would go to.
        #[inline]
        fn find(&self, k: u128, h: u64) -> Result<usize, usize> {
            let mut i = self.home(h);
            loop {
                let s = self.key_at(i);
                if s == k {
                    return Ok(i);
                }
                if s == 0 {
                    return Err(i);
                }
                i = (i + 1) & self.mask;
            }
        }

        fn pack(&mut self, o: Ordinal) -> u64 {
            if o.pos < 1 << (63 - IDX_BITS) && o.idx < 1 << IDX_BITS {
                o.pos << IDX_BITS | u64::from(o.idx)
            } else {
                self.wide.push(o);
                WIDE | (self.wide.len() as u64 - 1)
            }
        }

        #[inline]
        fn unpack(&self, ord: u64) -> Ordinal {
            if ord & WIDE == 0 {
                Ordinal {
                    pos: ord >> IDX_BITS,
                    idx: (ord & ((1 << IDX_BITS) - 1)) as u32,
                }
            } else {
                self.wide[(ord & !WIDE) as usize]
            }
        }

        fn entry_at(&self, i: usize) -> Entry {
            let (keep_until, ord) = self.val_at(i);
            Entry {
                keep_until,
                ordinal: self.unpack(ord),
            }
        }

        /// Where `id` (hash `h`) is or would go.
        #[inline]
        pub(super) fn locate(&self, id: &Id, h: u64) -> Place {
            let k = key(id);
            if k == 0 {
                return match self.zero {
                    Some(e) => Place::Found(e.ordinal, usize::MAX),
                    None => Place::Vacant(usize::MAX),
                };
            }
            match self.find(k, h) {
                Ok(i) => Place::Found(self.unpack(self.val_at(i).1), i),
                Err(i) => Place::Vacant(i),
            }
        }

        /// The entry of `id` (hash `h`).
        #[inline]
        pub(super) fn get(&self, id: &Id, h: u64) -> Option<Entry> {
            match self.locate(id, h) {
                Place::Found(_, usize::MAX) => self.zero,
                Place::Found(_, i) => Some(self.entry_at(i)),
                Place::Vacant(_) => None,
            }
        }

        /// Stores `id`'s entry at `at`, a place [`Tier::locate`] gave for it with no
        /// change to the table since.
        #[inline]
        pub(super) fn put_at(&mut self, at: Place, id: &Id, e: Entry) {
            let ord = self.pack(e.ordinal);
            match at {
                Place::Found(_, usize::MAX) | Place::Vacant(usize::MAX) => {
                    self.len += usize::from(self.zero.is_none());
                    self.zero = Some(e);
                }
                Place::Found(_, i) => self.set(i, key(id), e.keep_until, ord),
                Place::Vacant(i) => {
                    self.set(i, key(id), e.keep_until, ord);
                    self.used.push(i);
                    self.len += 1;
                    if self.len * 8 > (self.mask + 1) * 7 {
                        self.grow();
                    }
                }
            }
        }

        /// Inserts or replaces `id`'s entry.
        pub(super) fn insert(&mut self, id: &Id, h: u64, e: Entry) {
            let at = self.locate(id, h);
            self.put_at(at, id, e);
        }

        /// Doubles the table (only past 7/8 full: a tier that cannot spill).
        #[cold]
        fn grow(&mut self) {
            let mut bigger = Tier::with_slots((self.mask + 1) * 2);
            for (id, e) in self.iter() {
                bigger.insert(&id, super::hash(&id), e);
            }
            *self = bigger;
        }

        /// Ids held.
        pub(super) fn len(&self) -> usize {
            self.len
        }

        pub(super) fn is_empty(&self) -> bool {
            self.len == 0
        }

        /// RAM held.
        pub(super) fn bytes(&self) -> usize {
            self.words.len() * 16 + self.wide.capacity() * std::mem::size_of::<Ordinal>()
        }

        /// Every (id, entry), in no order.
        pub(super) fn iter(&self) -> impl Iterator<Item = (Id, Entry)> + '_ {
            let zero = self.zero.map(|e| ([0u8; 16], e));
            self.used
                .iter()
                .map(|&i| (self.key_at(i).to_le_bytes(), self.entry_at(i)))
                .chain(zero)
        }

        /// Empties it, keeping the allocation.
        pub(super) fn clear(&mut self) {
            if self.used.len() * 8 < self.mask + 1 {
                for &i in &self.used {
                    let at = self.first + 2 * i;
                    self.words[at] = 0;
                    self.words[at + 1] = 0;
                }
            } else {
                self.words.fill(0);
            }
            self.used.clear();
            self.len = 0;
            self.zero = None;
            self.wide.clear();
        }
    }

    /// Where an id is in a [`Tier`] (slot `usize::MAX`: the zero id's place).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Place {
        /// Held, inserted by the click at this ordinal.
        Found(Ordinal, usize),
        /// Not held: it would go here.
        Vacant(usize),
    }
}

/// What a spill thread did.
struct SpillDone {
    spilled: u64,
    expired: u64,
    /// A Bloom filter rebuilt from the disk tier, and the ids it holds.
    rebuilt: Option<(IdFilter, u64)>,
}

/// A spill in flight.
enum Spill {
    Running(std::thread::JoinHandle<Result<SpillDone, DedupError>>),
    /// Could not start a thread: the error, reported like a failed write.
    Done(Result<SpillDone, DedupError>),
}

impl Spill {
    fn is_finished(&self) -> bool {
        match self {
            Spill::Running(h) => h.is_finished(),
            Spill::Done(_) => true,
        }
    }
}

/// See the module doc.
pub struct Dedup {
    /// The RAM tier ids are inserted into.
    recent: Tier,
    /// The previous RAM tier while the spill thread writes it to disk (and after a failed
    /// spill): looked up after `recent`, dropped once its run is durable.
    frozen: Option<Arc<Tier>>,
    /// The next swap's tier, emptied (the allocation of the last spilled tier, reused) or,
    /// before the first spill, made by a thread of its own: see [`Dedup::prepare_spare`].
    preparing: Option<std::sync::mpsc::Receiver<Tier>>,
    /// The spill in flight (at most one: spills become durable in the order they start).
    spilling: Option<Spill>,
    /// Spills started / durable so far (checkpoint tickets).
    started: u64,
    durable: u64,
    /// The first spill failure (sticky: the frozen tier stays in RAM, nothing more spills).
    failed: Option<DedupError>,
    /// Entries per tier before a spill.
    max_recent: usize,
    /// Ids on disk (may contain ids since deleted there; rebuilt when mostly stale).
    bloom: Arc<IdFilter>,
    /// Ids the disk held at the last rebuild.
    live_at_rebuild: u64,
    disk: Arc<dyn SpillTable>,
    /// Expiry point given by the last checkpoint (the floor of the last committed one).
    expire_before: i64,
    /// Hashes of the ids announced by [`Dedup::warm_batch`], and the position after the
    /// last one looked up (performance only: no answer depends on them).
    ahead: Vec<u64>,
    cursor: usize,
    /// Announced ids whose lines were loaded (`..loaded`).
    loaded: usize,
    /// Totals.
    pub stats: DedupStats,
}

/// Ids whose lines [`Dedup::check_insert`] loads together (see [`Dedup::warm_batch`]): a
/// click costs ~1 µs, a miss ~0.1 µs; 16 ids are ~50 lines, ~3 KiB, which stay in L1/L2.
const GROUP: usize = 16;

impl fmt::Debug for Dedup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("recent", &self.recent.len())
            .field("frozen", &self.frozen.as_ref().map(|t| t.len()))
            .field("max_recent", &self.max_recent)
            .field("bloom_bytes", &self.bloom.bytes())
            .field("bloom_items", &self.bloom.items())
            .field("disk", &self.disk)
            .finish()
    }
}

impl Drop for Dedup {
    /// A dropped set leaves no writer behind: the spill in flight ends first (its run is
    /// then durable or an unfinished `*.tmp`, as after a crash at that point).
    fn drop(&mut self) {
        if let Some(Spill::Running(h)) = self.spilling.take() {
            let _ = h.join();
        }
        // Nor a tier being prepared (its memory would outlive the set).
        if let Some(rx) = self.preparing.take() {
            let _ = rx.recv();
        }
    }
}

/// The spill thread's work: the frozen tier as one sorted run, its ids into the Bloom
/// filter, expiry below the last committed floor, and a Bloom rebuild when it is stale.
fn spill_job(
    frozen: &Tier,
    disk: &dyn SpillTable,
    bloom: &IdFilter,
    expire_before: i64,
    live_at_rebuild: u64,
) -> Result<SpillDone, DedupError> {
    let t0 = std::time::Instant::now();
    let mut batch: Vec<(Id, Entry)> = frozen.iter().collect();
    batch.sort_unstable_by_key(|e| id_key(&e.0));
    let t1 = t0.elapsed();
    disk.put(&batch)?;
    let t2 = t0.elapsed();
    bloom.insert_all(batch.iter().map(|e| &e.0));
    let t3 = t0.elapsed();
    let expired = disk.expire(expire_before)?;
    tracing::debug!(
        ids = batch.len(),
        sort_ms = t1.as_millis() as u64,
        write_ms = (t2 - t1).as_millis() as u64,
        bloom_ms = (t3 - t2).as_millis() as u64,
        expire_ms = (t0.elapsed() - t3).as_millis() as u64,
        "dedup spill written"
    );
    let items = bloom.items();
    let overfull = items > bloom.capacity() as u64 && items > 2 * live_at_rebuild.max(1);
    let rebuilt = if overfull {
        Some(rebuilt_bloom(disk, bloom)?)
    } else {
        None
    };
    Ok(SpillDone {
        spilled: batch.len() as u64,
        expired,
        rebuilt,
    })
}

fn rebuilt_bloom(disk: &dyn SpillTable, like: &IdFilter) -> Result<(IdFilter, u64), DedupError> {
    let bloom = like.emptied();
    let mut n = 0u64;
    let mut ids: Vec<Id> = Vec::with_capacity(REBUILD_BATCH);
    disk.for_each_id(&mut |id| {
        ids.push(*id);
        if ids.len() == REBUILD_BATCH {
            bloom.insert_all(&ids);
            ids.clear();
        }
        n += 1;
    })?;
    bloom.insert_all(&ids);
    Ok((bloom, n))
}

/// Ids a Bloom rebuild inserts at a time (their cache misses overlap).
const REBUILD_BATCH: usize = 4096;

/// An id as a big-endian integer: integer order is the id's byte order, and a compare is
/// two integer compares instead of a `memcmp` call (the spill's sort and the run merges
/// compare ids millions of times).
#[inline]
pub fn id_key(id: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&id[..16]);
    u128::from_be_bytes(b)
}

impl Dedup {
    /// A dedup set using at most about `memory_bytes` of RAM, over `disk`. Call
    /// [`Dedup::rebuild_bloom`] after opening a non-empty disk tier.
    pub fn new(memory_bytes: usize, disk: Box<dyn SpillTable>) -> Self {
        let memory_bytes = memory_bytes.max(64 * 1024);
        let bloom_bits = memory_bytes / 4 * 8;
        let bloom_capacity = bloom_bits / BLOOM_BITS_PER_ID;
        // Two tiers share the RAM budget: the one filling and the one being spilled.
        let max_recent = ((memory_bytes - memory_bytes / 4) / RAM_ENTRY_BYTES / 2).max(1);
        Dedup {
            // Sized for the whole tier up front (no rehash growth in the hot path): 32
            // bytes per slot at a load of at most 2/3 is within the `RAM_ENTRY_BYTES`
            // per id of the budget. Its pages are written once when it is made (see
            // `Tier::with_slots`): RSS holds the tier from the start, within the budget.
            recent: Tier::new(max_recent),
            frozen: None,
            preparing: None,
            spilling: None,
            started: 0,
            durable: 0,
            failed: None,
            max_recent,
            bloom: Arc::new(IdFilter::new(bloom_bits, bloom_capacity)),
            live_at_rebuild: 0,
            disk: Arc::from(disk),
            expire_before: i64::MIN,
            ahead: Vec::new(),
            cursor: 0,
            loaded: 0,
            stats: DedupStats::default(),
        }
    }

    /// Whether `id` was inserted by a click before `at` (see the module doc).
    pub fn seen(&mut self, id: &Id, at: Ordinal) -> Result<bool, DedupError> {
        let h = hash(id);
        if let Some(e) = self.recent.get(id, h) {
            return Ok(e.ordinal < at);
        }
        if let Some(e) = self.frozen.as_ref().and_then(|f| f.get(id, h)) {
            return Ok(e.ordinal < at);
        }
        if !self.bloom.may_contain_hash(h) {
            return Ok(false);
        }
        self.stats.disk_reads += 1;
        let hit = self.disk.get(id)?.is_some_and(|e| e.ordinal < at);
        self.stats.bloom_false_positives += u64::from(!hit);
        Ok(hit)
    }

    /// Announces the ids of a batch about to go through [`Dedup::check_insert`] in this
    /// order (some may be skipped, as clicks refused before dedup are). Changes no
    /// answer: it only decides which cache lines are loaded when. The lines (RAM tiers,
    /// Bloom block) of the first two groups of [`GROUP`] ids are loaded now; then, as
    /// lookups enter a group, those of the group after it, all at once. So a group's
    /// misses overlap each other (a lone load ahead of each lookup waited alone: the
    /// profile put most of the lookup time on it) and its lines are still in L1/L2 when
    /// their clicks come (the whole batch's lines loaded up front, as before, were mostly
    /// evicted by then). Costs one hash per id, kept for the lookups' own loads.
    pub fn warm_batch<'a>(&mut self, ids: impl IntoIterator<Item = &'a Id>) {
        self.prepare_swap();
        self.ahead.clear();
        self.ahead.extend(ids.into_iter().map(hash));
        self.cursor = 0;
        self.loaded = 0;
        self.load_group();
        self.load_group();
    }

    /// Loads the lines of the next group of announced ids.
    fn load_group(&mut self) {
        let end = (self.loaded + GROUP).min(self.ahead.len());
        for &h in &self.ahead[self.loaded.min(end)..end] {
            self.recent.warm(h);
            if let Some(f) = &self.frozen {
                f.warm(h);
            }
            self.bloom.warm_hash(h);
        }
        self.loaded = end;
    }

    /// The click of hash `h` is being looked up: find it in the announced batch (skipping
    /// ids that never came) and, on entering a group, load the next group's lines.
    #[inline]
    fn step_ahead(&mut self, h: u64) {
        let rest = self.ahead.get(self.cursor..).unwrap_or(&[]);
        let Some(p) = rest.iter().take(GROUP).position(|&x| x == h) else {
            // Not announced (no `warm_batch`, or out of order): nothing to load.
            return;
        };
        self.cursor += p + 1;
        if self.cursor + GROUP > self.loaded && self.loaded < self.ahead.len() {
            self.load_group();
        }
    }

    /// [`Dedup::seen`] then, when not seen, [`Dedup::insert`], with one lookup of the RAM
    /// tier and one hash of the id: the per-click path. Returns whether `id` was seen
    /// before `entry.ordinal`.
    #[inline]
    pub fn check_insert(&mut self, id: Id, entry: Entry) -> Result<bool, DedupError> {
        let h = hash(&id);
        self.step_ahead(h);
        let at = self.recent.locate(&id, h);
        match at {
            Place::Found(o, _) => {
                if o < entry.ordinal {
                    return Ok(true);
                }
                // Inserted by this click's own future (a replay after a crash): not seen.
                self.recent.put_at(at, &id, entry);
                return Ok(false);
            }
            Place::Vacant(_) => {
                if let Some(e) = self.frozen.as_ref().and_then(|f| f.get(&id, h)) {
                    if e.ordinal < entry.ordinal {
                        return Ok(true);
                    }
                    // Its own future: this tier's entry is spilled later, so it wins.
                } else if self.bloom.may_contain_hash(h) {
                    // (The filter is empty until the first spill: no cache miss then.)
                    if self.disk_hit(&id, entry.ordinal)? {
                        return Ok(true);
                    }
                }
                self.recent.put_at(at, &id, entry);
            }
        }
        if self.recent.len() >= self.max_recent {
            self.rotate()?;
        }
        Ok(false)
    }

    /// The disk tier's answer for an id the Bloom filter may hold (counted).
    #[cold]
    fn disk_hit(&mut self, id: &Id, at: Ordinal) -> Result<bool, DedupError> {
        self.stats.disk_reads += 1;
        let hit = self.disk.get(id)?.is_some_and(|e| e.ordinal < at);
        self.stats.bloom_false_positives += u64::from(!hit);
        Ok(hit)
    }

    /// Records `id`; spills the RAM tier to disk when it is full.
    pub fn insert(&mut self, id: Id, entry: Entry) -> Result<(), DedupError> {
        self.recent.insert(&id, hash(&id), entry);
        if self.recent.len() >= self.max_recent {
            self.rotate()?;
        }
        Ok(())
    }

    /// The RAM tier is full: wait for the spill in flight (if any; the bound on RAM is
    /// two tiers), then freeze this one and spill it in the background.
    fn rotate(&mut self) -> Result<(), DedupError> {
        if self.spilling.as_ref().is_some_and(|s| !s.is_finished()) {
            let t = std::time::Instant::now();
            self.harvest(true)?;
            tracing::debug!(
                waited_ms = t.elapsed().as_millis() as u64,
                "dedup RAM tier full: waited for the spill before it"
            );
        }
        self.harvest(true)?;
        self.start_spill();
        Ok(())
    }

    /// Ends the spill in flight when it is done (or `wait`): its run is durable, its tier
    /// is dropped from RAM. Errors with the first spill failure (sticky).
    fn harvest(&mut self, wait: bool) -> Result<(), DedupError> {
        if let Some(spill) = self.spilling.take_if(|s| wait || s.is_finished()) {
            let done = match spill {
                Spill::Running(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(DedupError("the spill thread panicked".into()))),
                Spill::Done(r) => r,
            };
            match done {
                Ok(d) => {
                    self.durable += 1;
                    self.stats.spilled += d.spilled;
                    self.stats.expired += d.expired;
                    if let Some((bloom, n)) = d.rebuilt {
                        self.bloom = Arc::new(bloom);
                        self.live_at_rebuild = n;
                        self.stats.bloom_rebuilds += 1;
                    }
                    if let Some(t) = self.frozen.take().and_then(|t| Arc::try_unwrap(t).ok()) {
                        // Keep the allocation: the next swap reuses it, emptied off this
                        // thread.
                        self.prepare_spare(Some(t));
                    }
                }
                Err(e) => {
                    self.failed.get_or_insert(e);
                }
            }
        }
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Once per warmed run of clicks ([`Dedup::warm_batch`]: the engine's decode chunk):
    /// the swap to come needs an empty tier. A
    /// finished spill is harvested at once, so that its tier is emptied off this thread
    /// well before the swap or checkpoint that takes it (at the swap it would be waited
    /// for); before the first spill there is none, so once the tier filling is half full
    /// a fresh one is made off this thread (within the budget of two tiers: none is
    /// frozen). A spill failure is sticky: the swap reports it.
    fn prepare_swap(&mut self) {
        if self.frozen.is_some() && self.spilling.as_ref().is_some_and(Spill::is_finished) {
            let _ = self.harvest(false);
        }
        if self.frozen.is_none()
            && self.preparing.is_none()
            && self.recent.len() >= self.max_recent / 2
        {
            self.prepare_spare(None);
        }
    }

    /// Has a thread of its own empty `old` (or, given none, make a fresh tier) for the next
    /// swap. Emptying a full tier writes all of it (64 MiB for the default budget) and
    /// making one maps every page: 10-50 ms each, which on the writer stopped ingest at
    /// every spill (the click -> queryable tail of issue 13). Not niced: a swap may wait
    /// for it (a checkpoint right after a spill finished), and it is short. Without a
    /// thread, `old` is dropped and the swap makes its tier itself.
    fn prepare_spare(&mut self, old: Option<Tier>) {
        if self.preparing.is_some() {
            return;
        }
        let max = self.max_recent;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job = move || {
            let t = match old {
                Some(mut t) => {
                    t.clear();
                    t
                }
                None => Tier::new(max),
            };
            let _ = tx.send(t);
        };
        if std::thread::Builder::new()
            .name("adclick-dedup-tier".into())
            .spawn(job)
            .is_ok()
        {
            self.preparing = Some(rx);
        }
    }

    /// The tier for a swap: the one prepared (waited for if not ready: it is bounded work,
    /// and not waiting would mean a third tier), else a fresh one made here (a checkpoint
    /// before the first tier is half full, or no thread to be had).
    fn take_spare(&mut self) -> Tier {
        if let Some(t) = self.preparing.take().and_then(|rx| rx.recv().ok()) {
            return t;
        }
        self.stats.inline_tiers += 1;
        Tier::new(self.max_recent)
    }

    /// Freezes the RAM tier and starts its spill (none may be in flight).
    fn start_spill(&mut self) {
        debug_assert!(self.spilling.is_none() && self.frozen.is_none());
        let fresh = self.take_spare();
        let frozen = Arc::new(std::mem::replace(&mut self.recent, fresh));
        self.frozen = Some(frozen.clone());
        let (disk, bloom) = (self.disk.clone(), self.bloom.clone());
        let (expire_before, live) = (self.expire_before, self.live_at_rebuild);
        let job = move || {
            crate::lower_thread_priority(crate::BACKGROUND_NICE, "dedup spill");
            spill_job(&frozen, &*disk, &bloom, expire_before, live)
        };
        self.started += 1;
        self.spilling = Some(
            match std::thread::Builder::new()
                .name("adclick-dedup-spill".into())
                .spawn(job)
            {
                Ok(h) => Spill::Running(h),
                // No thread to be had: spill here (as before the spill thread existed).
                Err(e) => Spill::Done(Err(DedupError(format!(
                    "cannot start the spill thread: {e}"
                )))),
            },
        );
    }

    /// Writes the RAM tier to disk and waits until it is durable (tests, restore).
    pub fn spill(&mut self) -> Result<(), DedupError> {
        self.harvest(true)?;
        if self.recent.is_empty() {
            return Ok(());
        }
        self.start_spill();
        self.harvest(true)
    }

    /// Starts a checkpoint's flush: the RAM tier is frozen and spilled in the background,
    /// disk entries with `keep_until` before `expire_before` (the floor of the last
    /// committed checkpoint) are deleted there, and a stale Bloom filter is rebuilt.
    /// Returns the ticket to wait for with [`Dedup::flushed`] (every id inserted before
    /// this call is durable once it is), or `None` while an earlier spill is still in
    /// flight (try again later) unless `wait`.
    pub fn begin_flush(
        &mut self,
        expire_before: i64,
        wait: bool,
    ) -> Result<Option<u64>, DedupError> {
        self.harvest(wait)?;
        if self.spilling.is_some() {
            return Ok(None);
        }
        self.expire_before = expire_before;
        self.start_spill();
        Ok(Some(self.started))
    }

    /// Whether the flush of `ticket` is durable: `None` while it is in flight (unless
    /// `wait`), its spill's error if it failed.
    pub fn flushed(&mut self, ticket: u64, wait: bool) -> Option<Result<(), DedupError>> {
        if let Err(e) = self.harvest(wait) {
            return Some(Err(e));
        }
        (self.durable >= ticket).then_some(Ok(()))
    }

    /// Checkpoint step, waiting for it: [`Dedup::begin_flush`] then [`Dedup::flushed`].
    pub fn checkpoint(&mut self, expire_before: i64) -> Result<(), DedupError> {
        let ticket = self
            .begin_flush(expire_before, true)?
            .unwrap_or(self.started);
        self.flushed(ticket, true).unwrap_or(Ok(()))
    }

    /// Waits for the spill in flight (shutdown, and before the store under the disk tier
    /// is released).
    pub fn wait(&mut self) -> Result<(), DedupError> {
        self.harvest(true)
    }

    /// True while a spill runs.
    pub fn spilling(&self) -> bool {
        self.spilling.is_some()
    }

    /// Rebuilds the Bloom filter from the disk tier (at start, and when expiry left it
    /// mostly stale).
    pub fn rebuild_bloom(&mut self) -> Result<(), DedupError> {
        self.harvest(true)?;
        let (bloom, n) = rebuilt_bloom(&*self.disk, &self.bloom)?;
        self.bloom = Arc::new(bloom);
        self.live_at_rebuild = n;
        self.stats.bloom_rebuilds += 1;
        Ok(())
    }

    /// Ids in the RAM tiers (filling and being spilled).
    pub fn ram_len(&self) -> usize {
        self.recent.len() + self.frozen.as_ref().map_or(0, |t| t.len())
    }

    /// Ids on disk (counting ids not yet expired there).
    pub fn disk_len(&self) -> Result<u64, DedupError> {
        self.disk.len()
    }

    /// Approximate RAM held (RAM tiers at their allocated capacity + Bloom filter).
    pub fn ram_bytes(&self) -> usize {
        self.recent.bytes()
            + self.frozen.as_ref().map_or(0, |t| t.bytes())
            // A tier being prepared is the size of the one filling (both for `max_recent`).
            + self.preparing.as_ref().map_or(0, |_| self.recent.bytes())
            + self.bloom.bytes()
            + self.disk.ram_bytes()
    }

    /// Largest size of one RAM tier before a spill.
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
        // Two tiers share the 48 KiB: the one filling and the one being spilled.
        assert_eq!(cap, 48 * 1024 / RAM_ENTRY_BYTES / 2);
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
            assert!(d.ram_len() < 2 * cap);
        }
        d.wait().unwrap();
        assert!(d.ram_len() < cap);
        assert_eq!(d.stats.spilled, 10 * cap as u64 - d.ram_len() as u64);
        let end = at(u64::MAX, 0);
        for n in 0..10 * cap as u64 {
            assert!(d.seen(&id(n), end).unwrap(), "{n}");
        }
        assert!(!d.seen(&id(10 * cap as u64 + 1), end).unwrap());
    }

    /// The swap's empty tier is prepared before the swap, off the inserting thread: made
    /// once the first tier is half full, then emptied from the spilled tier, harvested at
    /// the first batch after its spill finished.
    #[test]
    fn the_next_tier_is_prepared_before_the_swap() {
        let mut d = Dedup::new(64 * 1024, Box::<MemTable>::default());
        let cap = d.max_ram_entries() as u64;
        let entry = |n: u64| Entry {
            keep_until: 100,
            ordinal: at(n + 1, 0),
        };
        let mut n = 0u64;
        // A batch of 8 ids, announced first as the window operator does.
        let batch = |d: &mut Dedup, n: &mut u64| {
            let ids: Vec<Id> = (*n..*n + 8).map(id).collect();
            d.warm_batch(ids.iter());
            for (i, x) in ids.iter().enumerate() {
                assert!(!d.check_insert(*x, entry(*n + i as u64)).unwrap());
            }
            *n += 8;
        };
        for round in 0..4 {
            // Up to just past half full, then the next batch: the empty tier for the swap
            // is on its way.
            while d.recent.len() as u64 <= cap / 2 {
                batch(&mut d, &mut n);
            }
            batch(&mut d, &mut n);
            assert!(
                d.frozen.is_none(),
                "round {round}: the spilled tier is harvested"
            );
            assert!(
                d.preparing.is_some(),
                "round {round}: no tier is being prepared"
            );
            // Up to the swap; then the spill finishes before the next half.
            while d.frozen.is_none() {
                batch(&mut d, &mut n);
            }
            while d.spilling.as_ref().is_some_and(|s| !s.is_finished()) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        // A checkpoint right after a spill finished: the next batch harvests it, and the
        // checkpoint's swap takes the tier emptied since.
        assert!(d.frozen.is_some());
        while d.spilling.as_ref().is_some_and(|s| !s.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        batch(&mut d, &mut n);
        assert!(d.frozen.is_none() && d.preparing.is_some());
        d.begin_flush(i64::MIN, true).unwrap();
        assert_eq!(d.stats.inline_tiers, 0);
        // Exact throughout: every id is seen, none twice.
        d.wait().unwrap();
        for m in 0..n {
            assert!(d.seen(&id(m), at(u64::MAX, 0)).unwrap(), "{m}");
        }
        assert!(!d.seen(&id(n), at(u64::MAX, 0)).unwrap());
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

    /// A disk tier whose writes wait until the test opens the gate (or drops its end): a
    /// spill held in flight, as when the process dies while a run file is being written.
    #[derive(Debug)]
    struct Gated {
        table: Arc<MemTable>,
        gate: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl SpillTable for Gated {
        fn get(&self, id: &Id) -> Result<Option<Entry>, DedupError> {
            self.table.get(id)
        }
        fn put(&self, entries: &[(Id, Entry)]) -> Result<(), DedupError> {
            let _ = self.gate.lock().unwrap().recv();
            self.table.put(entries)
        }
        fn expire(&self, before: i64) -> Result<u64, DedupError> {
            self.table.expire(before)
        }
        fn for_each_id(&self, f: &mut dyn FnMut(&Id)) -> Result<(), DedupError> {
            self.table.for_each_id(f)
        }
        fn len(&self) -> Result<u64, DedupError> {
            self.table.len()
        }
    }

    /// The WAL of the crash test: batch `pos` (1-based) holds new ids, repeats of its own
    /// and repeats of every earlier batch (so of ids in the frozen tier and on disk).
    fn wal() -> Vec<Vec<u64>> {
        (1..=12u64)
            .map(|pos| {
                let mut b: Vec<u64> = (0..40).map(|j| pos * 1000 + j).collect();
                b.extend((0..5).map(|j| pos * 1000 + j * 7));
                b.extend((1..pos).map(|p| p * 1000 + (pos * 3) % 40));
                b
            })
            .collect()
    }

    /// Feeds WAL batches `from..` (1-based positions) through `check_insert`, asserting
    /// each answer against the oracle (an id is a duplicate iff an earlier click had it).
    fn replay(d: &mut Dedup, wal: &[Vec<u64>], from: u64, oracle: &mut HashSet<u64>) {
        for (i, batch) in wal.iter().enumerate().skip(from as usize - 1) {
            let pos = i as u64 + 1;
            for (idx, &n) in batch.iter().enumerate() {
                let e = Entry {
                    keep_until: 0,
                    ordinal: at(pos, idx as u32),
                };
                let dup = d.check_insert(id(n), e).unwrap();
                assert_eq!(dup, !oracle.insert(n), "id {n} at batch {pos}");
            }
        }
    }

    /// A checkpoint's flush runs in the background: while its run file is being written
    /// the frozen ids still answer, the checkpoint is not durable, and a crash at that
    /// point (run never written), after the run is durable but before the checkpoint is
    /// saved, or after it is saved, recovers to exactly the answers of a run without a
    /// crash (WAL replay from the last saved checkpoint over what the disk holds).
    #[test]
    fn a_crash_while_a_checkpoint_run_is_written_recovers_exactly() {
        let wal = wal();
        let cp = 6u64; // the checkpoint covers batches 1..=6
        for crash in [
            "run not durable",
            "run durable, checkpoint not saved",
            "saved",
        ] {
            let table = Arc::new(MemTable::default());
            let (open, gate) = std::sync::mpsc::channel();
            let gated = Gated {
                table: table.clone(),
                gate: Mutex::new(gate),
            };
            let mut d = Dedup::new(1 << 20, Box::new(gated));
            let mut oracle = HashSet::new();
            replay(&mut d, &wal[..cp as usize], 1, &mut oracle);
            let ticket = d.begin_flush(i64::MIN, false).unwrap().unwrap();
            // The spill is held: its ids answer from the frozen tier meanwhile.
            replay(&mut d, &wal[..9], cp + 1, &mut oracle);
            assert_eq!(d.flushed(ticket, false), None, "not durable yet");
            assert!(d.spilling());
            let (disk, saved) = match crash {
                "run not durable" => (table.snapshot(), 0),
                _ => {
                    open.send(()).unwrap();
                    assert_eq!(d.flushed(ticket, true), Some(Ok(())));
                    assert_eq!(table.len().unwrap(), oracle_below(&wal, cp));
                    (table.snapshot(), if crash == "saved" { cp } else { 0 })
                }
            };
            drop(open);
            drop(d);
            // Restart: the disk as it was at the crash, the WAL replayed from the last
            // saved checkpoint (its RAM tier was in that checkpoint's run).
            let mut d = Dedup::new(1 << 20, Box::new(disk));
            d.rebuild_bloom().unwrap();
            let mut oracle: HashSet<u64> =
                wal[..saved as usize].iter().flatten().copied().collect();
            replay(&mut d, &wal, saved + 1, &mut oracle);
        }
    }

    /// Distinct ids of WAL batches 1..=pos.
    fn oracle_below(wal: &[Vec<u64>], pos: u64) -> u64 {
        wal[..pos as usize]
            .iter()
            .flatten()
            .collect::<HashSet<_>>()
            .len() as u64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// The RAM tier against a `HashMap` model: inserts and replacements (through
        /// `locate` + `put_at` as `check_insert` does, and `insert`), the all-zero id, ids
        /// probing past their line (small tables, up to 400 ids: they also grow past 7/8
        /// full), ordinals too wide to pack, and clearing.
        #[test]
        fn tier_matches_a_map_model(
            ops in proptest::collection::vec(
                (0u64..400, any::<bool>(), 0u64..4, any::<i64>()),
                1..1500,
            ),
            max in 1usize..300,
            clear_at in any::<prop::sample::Index>(),
        ) {
            let mut t = Tier::new(max);
            let mut model: HashMap<Id, Entry> = HashMap::new();
            let clear_at = clear_at.index(ops.len());
            let key = |n: u64| if n == 0 { [0u8; 16] } else { id(n) };
            for (i, (n, via_locate, width, keep)) in ops.into_iter().enumerate() {
                if i == clear_at {
                    t.clear();
                    model.clear();
                }
                let k = key(n);
                let h = hash(&k);
                let ordinal = match width {
                    0 => at(i as u64, n as u32),
                    1 => at(1 << 39, 1),
                    2 => at(3, 1 << 24),
                    _ => at(u64::MAX - i as u64, u32::MAX),
                };
                let e = Entry { keep_until: keep, ordinal };
                prop_assert_eq!(t.get(&k, h), model.get(&k).copied());
                if via_locate {
                    let place = t.locate(&k, h);
                    match (place, model.get(&k)) {
                        (Place::Found(o, _), Some(m)) => prop_assert_eq!(o, m.ordinal),
                        (Place::Vacant(_), None) => {}
                        (p, m) => prop_assert!(false, "{:?} vs {:?}", p, m),
                    }
                    t.put_at(place, &k, e);
                } else {
                    t.insert(&k, h, e);
                }
                model.insert(k, e);
                prop_assert_eq!(t.len(), model.len());
            }
            let mut held: Vec<(Id, Entry)> = t.iter().collect();
            held.sort_by_key(|x| x.0);
            let mut want: Vec<(Id, Entry)> = model.into_iter().collect();
            want.sort_by_key(|x| x.0);
            prop_assert_eq!(held, want);
        }
    }

    proptest! {
        /// Integer order of `id_key` is the ids' byte order (the run files' order).
        #[test]
        fn id_key_orders_like_the_bytes(a in any::<[u8; 16]>(), b in any::<[u8; 16]>(), shared in 0usize..16) {
            let mut b = b;
            b[..shared].copy_from_slice(&a[..shared]);
            prop_assert_eq!(id_key(&a).cmp(&id_key(&b)), a.cmp(&b));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Against a HashSet oracle through `check_insert`, with checkpoint flushes started
        /// at arbitrary points (running in the background, so lookups meet ids in the
        /// frozen tier, on disk, or both) and a RAM tier small enough to rotate often.
        #[test]
        fn check_insert_matches_a_set_oracle_with_background_flushes(
            ops in proptest::collection::vec((0u64..2000, any::<bool>()), 1..3000)
        ) {
            let mut d = Dedup::new(64 * 1024, Box::<MemTable>::default());
            let mut oracle = HashSet::new();
            for (i, (n, flush)) in ops.into_iter().enumerate() {
                let e = Entry { keep_until: 0, ordinal: at(1 + i as u64, 0) };
                prop_assert_eq!(d.check_insert(id(n), e).unwrap(), !oracle.insert(n));
                if flush {
                    d.begin_flush(i64::MIN, false).unwrap();
                }
            }
            d.wait().unwrap();
            let end = at(u64::MAX, 0);
            for n in 0..2000 {
                prop_assert_eq!(d.seen(&id(n), end).unwrap(), oracle.contains(&n));
            }
        }

        /// Announcing batches ([`Dedup::warm_batch`]) changes no answer, whether the
        /// announced ids all come, some are skipped (clicks refused before dedup), or the
        /// announcement is wrong; with background flushes (a frozen tier) and a Bloom filter.
        #[test]
        fn warm_batches_change_no_answer(
            ops in proptest::collection::vec((0u64..1500, 0u8..4, any::<bool>()), 1..2500),
            batch in 1usize..80,
        ) {
            let mut d = Dedup::new(64 * 1024, Box::<MemTable>::default());
            let mut oracle = HashSet::new();
            for (b, chunk) in ops.chunks(batch).enumerate() {
                // 0: announced and comes; 1: announced, skipped; 2: comes unannounced;
                // 3: announced as another id.
                let announced: Vec<Id> = chunk
                    .iter()
                    .filter(|(_, how, _)| *how != 2)
                    .map(|&(n, how, _)| if how == 3 { id(n + 7) } else { id(n) })
                    .collect();
                d.warm_batch(&announced);
                for (i, &(n, how, flush)) in chunk.iter().enumerate() {
                    if how == 1 {
                        continue;
                    }
                    let e = Entry { keep_until: 0, ordinal: at(1 + b as u64, i as u32) };
                    prop_assert_eq!(d.check_insert(id(n), e).unwrap(), !oracle.insert(n));
                    if flush {
                        d.begin_flush(i64::MIN, false).unwrap();
                    }
                }
            }
        }

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
