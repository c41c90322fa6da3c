//! One shard of the counting state: per (ad, bucket) cells at three levels (minute, hour,
//! day), each broken down by dimension combination with unique users per combination. A
//! shard is owned by one worker thread (writes) and read by queries. The shard's unfiltered
//! top-N index lives beside it (`published.rs`), fed by the same thread, and can be rebuilt
//! from the minute cells ([`ShardState::top_set`]).
//!
//! Layout, for memory and for the per-click path (no allocation for the common cell):
//! - a level is one table `ad -> Cell` per bucket (minute, hour, day), in an ordered
//!   map by bucket start: sequential scans and sealing of a minute, eviction drops whole
//!   tables; a table ([`Bucket`]) stores its cells densely and finds them through an
//!   index of one word per slot at most 4/5 full (compacted when sealed);
//! - a [`Cell`] is 32 bytes: its totals, its first dimension combination inline, and the
//!   others (rare at the minute level) in one `ThinVec` (a single pointer; the length lives
//!   in the allocation, so reaching the combinations costs one cache miss, not two);
//! - a combination ([`Combo`], 16 bytes) holds its clicks and up to two users inline as
//!   sparse HLL entries ([`Hll::entry_of_hash`]); its third distinct user moves them into
//!   a real [`Hll`] kept in the level's sketch slab, so a 1-click cell costs no heap at all.
//!
//! Minutes are rolled up into their hours when sealed, hours into their days when complete
//! ([`ShardState::seal`]); a click for a minute already rolled up also updates those
//! levels. Both paths are bound by cache misses on big tables, so both look up a chunk at
//! a time, its lines touched first ([`ShardState::warm`] for clicks). `heap_bytes`
//! estimates the memory.

use std::collections::BTreeMap;

use prost::Message;
use thin_vec::ThinVec;

use super::dims::DimKey;
use super::topset::{ClickKeys, IndexField, TopSet};
use crate::sketch::hll::Hll;

/// Bucket widths in ms: minute, hour, day (UTC).
pub const LEVEL_MS: [i64; 3] = [60_000, 3_600_000, 86_400_000];

/// A click as a shard applies it (already deduplicated, interned and routed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Ad.
    pub ad: u64,
    /// Its advertiser.
    pub advertiser: u64,
    /// Its campaign.
    pub campaign: u64,
    /// Corrected event time.
    pub event_time_ms: i64,
    /// Dimension combination id (`dims::ComboTable`).
    pub combo: u32,
    /// The combination itself (for the per-value top-N indexes, `super::topset`).
    pub dims: DimKey,
    /// The user's sparse HLL entry ([`Hll::entry_of_hash`]); 0: no user id.
    pub user: u32,
    /// The minute was already final: this is a correction.
    pub late: bool,
}

/// Marks `Users.0[0]` as an index into the level's sketch slab (sparse entries are below
/// `2^31`, so the bit is free).
const SKETCH_TAG: u32 = 1 << 31;

/// Users of one combination: 0, 1 or 2 sparse entries inline, or a slab index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Users([u32; 2]);

impl Users {
    fn insert(&mut self, e: u32, slab: &mut Slab) {
        let [a, b] = self.0;
        if a & SKETCH_TAG != 0 {
            slab.get_mut(a & !SKETCH_TAG).insert_entry(e);
        } else if a == 0 || a == e {
            self.0[0] = e;
        } else if b == 0 || b == e {
            self.0[1] = e;
        } else {
            let mut h = Hll::new();
            h.insert_entry(a);
            h.insert_entry(b);
            h.insert_entry(e);
            self.0 = [SKETCH_TAG | slab.put(h), 0];
        }
    }

    fn merge_into(&self, into: &mut Hll, slab: &Slab) {
        let [a, b] = self.0;
        if a & SKETCH_TAG != 0 {
            into.merge(slab.get(a & !SKETCH_TAG));
        } else {
            for e in [a, b] {
                if e != 0 {
                    into.insert_entry(e);
                }
            }
        }
    }

    /// Adds the users of `other` (whose sketch, if any, is in `from`) to these.
    fn merge_from(&mut self, other: Users, from: &Slab, slab: &mut Slab) {
        let [a, b] = other.0;
        if a & SKETCH_TAG == 0 {
            for e in [a, b] {
                if e != 0 {
                    self.insert(e, slab);
                }
            }
            return;
        }
        let theirs = from.get(a & !SKETCH_TAG);
        if self.0[0] & SKETCH_TAG != 0 {
            slab.get_mut(self.0[0] & !SKETCH_TAG).merge(theirs);
        } else {
            let mut h = self.to_hll(slab);
            h.merge(theirs);
            self.0 = [SKETCH_TAG | slab.put(h), 0];
        }
    }

    fn to_hll(self, slab: &Slab) -> Hll {
        let mut h = Hll::new();
        self.merge_into(&mut h, slab);
        h
    }

    fn from_hll(h: Hll, slab: &mut Slab) -> Self {
        match h.sparse_entries() {
            Some(e) if e.len() <= 2 => Users([
                e.first().copied().unwrap_or(0),
                e.get(1).copied().unwrap_or(0),
            ]),
            _ => Users([SKETCH_TAG | slab.put(h), 0]),
        }
    }

    fn free(self, slab: &mut Slab) {
        if self.0[0] & SKETCH_TAG != 0 {
            slab.free(self.0[0] & !SKETCH_TAG);
        }
    }
}

/// Sketches of one level, addressed by index, slots reused after eviction.
#[derive(Debug, Clone, Default)]
struct Slab {
    items: Vec<Hll>,
    free: Vec<u32>,
}

impl Slab {
    fn put(&mut self, h: Hll) -> u32 {
        if let Some(i) = self.free.pop() {
            self.items[i as usize] = h;
            return i;
        }
        self.items.push(h);
        u32::try_from(self.items.len() - 1).unwrap_or(u32::MAX)
    }

    fn get(&self, i: u32) -> &Hll {
        &self.items[i as usize]
    }

    fn get_mut(&mut self, i: u32) -> &mut Hll {
        &mut self.items[i as usize]
    }

    fn free(&mut self, i: u32) {
        self.items[i as usize] = Hll::new();
        self.free.push(i);
    }

    fn heap_bytes(&self) -> usize {
        self.items.capacity() * size_of::<Hll>()
            + self.free.capacity() * 4
            + self.items.iter().map(Hll::heap_bytes).sum::<usize>()
    }
}

/// Counts of one dimension combination in a cell.
#[derive(Debug, Clone, Copy, Default)]
pub struct Combo {
    /// Combination id (`dims::ComboTable`).
    pub id: u32,
    /// Clicks.
    pub clicks: u32,
    users: Users,
}

/// One (ad, bucket) cell.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    /// All clicks.
    pub clicks: u32,
    /// Bumped by every late correction of a final bucket.
    pub version: u32,
    first: Combo,
    /// The other combinations, sorted by id (one pointer: empty for most minute cells).
    more: ThinVec<Combo>,
}

impl Cell {
    /// The combination `id` of this cell, added if new. `more` is kept sorted by id: hot
    /// ads' hour and day cells hold hundreds of combinations.
    fn combo_mut(&mut self, id: u32) -> &mut Combo {
        if self.first.id == id || self.first.id == 0 {
            self.first.id = id;
            return &mut self.first;
        }
        let more = &mut self.more;
        let pos = match more.binary_search_by_key(&id, |c| c.id) {
            Ok(p) => p,
            Err(p) => {
                more.insert(
                    p,
                    Combo {
                        id,
                        ..Combo::default()
                    },
                );
                p
            }
        };
        &mut more[pos]
    }

    /// Adds `src` (sorted by id, ids not 0; users in `from`) to this cell's combinations
    /// (users in `slab`): one pass over both sorted lists to count the new ids, then one
    /// backward pass that moves each existing combination once and merges in place.
    fn merge_sorted(&mut self, src: &[Combo], from: &Slab, slab: &mut Slab) {
        let add = |to: &mut Combo, c: &Combo, slab: &mut Slab| {
            to.clicks = to.clicks.saturating_add(c.clicks);
            to.users.merge_from(c.users, from, slab);
        };
        let mut src = src;
        if self.first.id == 0
            && let Some((c, rest)) = src.split_first()
        {
            self.first.id = c.id;
            add(&mut self.first, c, slab);
            src = rest;
        }
        let first = self.first.id;
        let (mut new, mut i) = (0usize, 0usize);
        for c in src {
            if c.id == first {
                continue;
            }
            while i < self.more.len() && self.more[i].id < c.id {
                i += 1;
            }
            new += usize::from(self.more.get(i).is_none_or(|m| m.id != c.id));
        }
        let old = self.more.len();
        self.more.reserve(new);
        for _ in 0..new {
            self.more.push(Combo::default());
        }
        // Backward merge: `k` is the next slot to fill from the end, always >= `i`.
        let (mut i, mut k) = (old, old + new);
        for c in src.iter().rev() {
            if c.id == first {
                add(&mut self.first, c, slab);
                continue;
            }
            while i > 0 && self.more[i - 1].id > c.id {
                i -= 1;
                k -= 1;
                self.more[k] = self.more[i];
            }
            k -= 1;
            if i > 0 && self.more[i - 1].id == c.id {
                i -= 1;
                self.more[k] = self.more[i];
            } else {
                self.more[k] = Combo {
                    id: c.id,
                    ..Combo::default()
                };
            }
            add(&mut self.more[k], c, slab);
        }
    }

    /// Every combination of the cell.
    pub fn combos(&self) -> impl Iterator<Item = &Combo> + '_ {
        std::iter::once(&self.first)
            .filter(|c| c.id != 0)
            .chain(self.more.iter())
    }
}

/// A cell with what its users' sketches need, as queries read it.
#[derive(Debug, Clone, Copy)]
pub struct CellRef<'a> {
    /// The cell.
    pub cell: &'a Cell,
    slab: &'a Slab,
}

impl CellRef<'_> {
    /// Clicks of the combinations `keep` accepts, merging their users into `users`.
    pub fn tally(&self, keep: impl Fn(u32) -> bool, mut users: Option<&mut Hll>) -> u64 {
        let mut clicks = 0;
        for c in self.cell.combos() {
            if keep(c.id) {
                clicks += u64::from(c.clicks);
                if let Some(u) = users.as_deref_mut() {
                    c.users.merge_into(u, self.slab);
                }
            }
        }
        clicks
    }
}

impl CellRef<'_> {
    /// Adds each combination's clicks (and users) to the group `group` puts it in (`None`:
    /// left out): what a breakdown by one dimension sums.
    pub fn tally_by(&self, group: impl Fn(u32) -> Option<usize>, out: &mut [(u64, Hll)]) {
        for c in self.cell.combos() {
            if let Some((clicks, users)) = group(c.id).and_then(|g| out.get_mut(g)) {
                *clicks += u64::from(c.clicks);
                c.users.merge_into(users, self.slab);
            }
        }
    }
}

/// One level (minute, hour or day): one table per bucket, keyed by ad (see the module doc).
#[derive(Debug, Clone, Default)]
struct Level {
    buckets: BTreeMap<i64, Bucket>,
    /// Cells in all buckets.
    len: usize,
    sketches: Slab,
    /// Cells of the last bucket compacted (sealed): what a new bucket is sized for, so a
    /// minute fills without rehashing.
    size_hint: usize,
}

/// The fixed mix of an ad id for [`Bucket`]'s index (splitmix64's finalizer: ids may be
/// sequential, and the index uses both halves of the hash).
#[inline]
fn mix(ad: u64) -> u64 {
    let mut x = ad ^ 0x9E37_79B9_7F4A_7C15;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The cells of one bucket (a minute, an hour or a day), keyed by ad. The cells sit
/// densely in insertion order; an open-addressing index (linear probing, any length, at
/// most 4/5 full) holds one word per slot, `tag << 32 | position + 1` (0: empty), the tag
/// being the low half of the ad's hash, so a probe reads the cell only on a tag match.
/// Why not a hash map of cells: hashbrown's power-of-two tables held 41-byte slots at
/// 44-87% load (~50% for a minute of 33k cells: ~80 bytes per cell); here a cell costs its
/// 40 bytes plus ~10-15 of index, and a sealed minute is compacted to a 4/5-full index.
#[derive(Debug, Clone, Default)]
struct Bucket {
    index: Vec<u64>,
    cells: Vec<(u64, Cell)>,
}

impl Bucket {
    /// An empty bucket with room for `n` cells before its index grows.
    fn with_capacity(n: usize) -> Self {
        let mut b = Bucket::default();
        if n > 0 {
            b.cells.reserve(n);
            b.rehash(Self::index_len_for(n));
        }
        b
    }

    /// Index slots for `n` cells at the highest load (4/5).
    fn index_len_for(n: usize) -> usize {
        (n + n / 4 + 1).max(8)
    }

    fn len(&self) -> usize {
        self.cells.len()
    }

    #[inline]
    fn home(&self, h: u64) -> usize {
        // Lemire's multiply-shift range reduction: the high bits of the hash pick the slot.
        ((u128::from(h) * self.index.len() as u128) >> 64) as usize
    }

    #[inline]
    fn word(h: u64, pos: usize) -> u64 {
        (h << 32) | (pos as u64 + 1)
    }

    /// The index slot and cell position of `ad`.
    #[inline]
    fn find(&self, ad: u64) -> Option<(usize, usize)> {
        if self.index.is_empty() {
            return None;
        }
        let h = mix(ad);
        let n = self.index.len();
        let mut i = self.home(h);
        loop {
            let w = self.index[i];
            if w == 0 {
                return None;
            }
            if w >> 32 == h & 0xFFFF_FFFF {
                let pos = (w & 0xFFFF_FFFF) as usize - 1;
                if self.cells[pos].0 == ad {
                    return Some((i, pos));
                }
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    /// The first empty slot of `h`'s probe sequence.
    #[inline]
    fn free_slot(&self, h: u64) -> usize {
        let n = self.index.len();
        let mut i = self.home(h);
        while self.index[i] != 0 {
            i += 1;
            if i == n {
                i = 0;
            }
        }
        i
    }

    /// Touches what merging `src` (a chunk of another bucket's cells) into this bucket
    /// will read: the source cells' combination lists, then what [`Bucket::warm`] touches.
    #[inline]
    fn warm_merge(&self, src: &[(u64, Cell)]) {
        let mut ads = [0u64; MERGE_CHUNK];
        let mut acc = 0usize;
        for ((ad, cell), a) in src.iter().zip(ads.iter_mut()) {
            *a = *ad;
            acc = acc.wrapping_add(cell.more.len());
        }
        std::hint::black_box(acc);
        self.warm(&ads[..src.len().min(MERGE_CHUNK)]);
    }

    /// Touches what looking up `ads` and updating their cells will read, [`MERGE_CHUNK`]
    /// ads at a time, one kind of line at a time: the index slots, then the cells they
    /// point to, then those cells' combination lists (their header, then the lines a binary
    /// search reads). Each phase is a tight loop of independent loads whose cache misses
    /// overlap, so the updates that follow find their lines in cache instead of waiting for
    /// each in turn. Only hints (the first slot of each probe sequence): no effect on state.
    #[inline]
    fn warm(&self, ads: &[u64]) {
        if self.index.is_empty() {
            return;
        }
        for ads in ads.chunks(MERGE_CHUNK) {
            let mut hs = [0u64; MERGE_CHUNK];
            let mut acc = 0u64;
            for (ad, h) in ads.iter().zip(hs.iter_mut()) {
                *h = mix(*ad);
                acc = acc.wrapping_add(self.index[self.home(*h)]);
            }
            std::hint::black_box(acc);
            let mut found: [Option<&Cell>; MERGE_CHUNK] = [None; MERGE_CHUNK];
            let mut acc = 0u64;
            for (h, f) in hs.iter().take(ads.len()).zip(found.iter_mut()) {
                let w = self.index[self.home(*h)];
                if w != 0
                    && w >> 32 == h & 0xFFFF_FFFF
                    && let Some((a, c)) = self.cells.get((w & 0xFFFF_FFFF) as usize - 1)
                {
                    acc = acc.wrapping_add(*a);
                    *f = Some(c);
                }
            }
            std::hint::black_box(acc);
            let mut acc = 0usize;
            for c in found.iter().flatten() {
                acc = acc.wrapping_add(c.more.len());
            }
            std::hint::black_box(acc);
            // Then the lines of each list (4 combinations a line): all of a short list, the
            // middle of a long one (a hot ad's: in cache anyway).
            let mut acc = 0u32;
            for c in found.iter().flatten() {
                let from = (c.more.len() / 2).saturating_sub(WARM_COMBOS / 2);
                for m in c.more.iter().skip(from).take(WARM_COMBOS).step_by(4) {
                    acc = acc.wrapping_add(m.id);
                }
            }
            std::hint::black_box(acc);
        }
    }

    /// Makes room in the index for `extra` more cells at once: one index rebuild (if any)
    /// before a merge instead of several while it runs. (The cells grow as they come: most
    /// merged cells are already there, and reserving for all would double big buckets.)
    fn reserve(&mut self, extra: usize) {
        let len = self.cells.len();
        let need = len + extra;
        if need * 5 > self.index.len() * 4 {
            self.rehash(Self::index_len_for(need.max(len + len / 2)));
        }
    }

    /// Rebuilds the index with `slots` slots (more than the cells).
    fn rehash(&mut self, slots: usize) {
        self.index.clear();
        self.index.shrink_to_fit();
        self.index.resize(slots.max(self.cells.len() + 1), 0);
        for pos in 0..self.cells.len() {
            let h = mix(self.cells[pos].0);
            let i = self.free_slot(h);
            self.index[i] = Self::word(h, pos);
        }
    }

    fn get(&self, ad: u64) -> Option<&Cell> {
        self.find(ad).map(|(_, pos)| &self.cells[pos].1)
    }

    /// The cell of `ad`, and whether it is new (then empty).
    #[inline]
    fn entry(&mut self, ad: u64) -> (&mut Cell, bool) {
        if let Some((_, pos)) = self.find(ad) {
            return (&mut self.cells[pos].1, false);
        }
        let len = self.cells.len();
        if (len + 1) * 5 > self.index.len() * 4 {
            // Grow by half: 53-80% full between growths.
            self.rehash(Self::index_len_for(len + 1 + len / 2));
        }
        let h = mix(ad);
        let i = self.free_slot(h);
        self.index[i] = Self::word(h, len);
        self.cells.push((ad, Cell::default()));
        (&mut self.cells[len].1, true)
    }

    /// Removes the cell of `ad` (the last cell takes its position).
    fn remove(&mut self, ad: u64) -> Option<Cell> {
        let (slot, pos) = self.find(ad)?;
        // Backward-shift deletion keeps every probe sequence unbroken.
        let n = self.index.len();
        let (mut hole, mut j) = (slot, slot);
        self.index[hole] = 0;
        loop {
            j = if j + 1 == n { 0 } else { j + 1 };
            let w = self.index[j];
            if w == 0 {
                break;
            }
            let k = self.home(mix(self.cells[(w & 0xFFFF_FFFF) as usize - 1].0));
            // The entry at j may move to the hole unless its home lies cyclically in
            // (hole, j].
            let stays = if hole <= j {
                hole < k && k <= j
            } else {
                hole < k || k <= j
            };
            if !stays {
                self.index[hole] = w;
                self.index[j] = 0;
                hole = j;
            }
        }
        let last = self.cells.len() - 1;
        let (_, cell) = self.cells.swap_remove(pos);
        if pos != last {
            // The old last cell now sits at `pos`: repoint its slot.
            let h = mix(self.cells[pos].0);
            let mut i = self.home(h);
            while self.index[i] & 0xFFFF_FFFF != last as u64 + 1 {
                i = if i + 1 == n { 0 } else { i + 1 };
            }
            self.index[i] = Self::word(h, pos);
        }
        Some(cell)
    }

    /// Shrinks a bucket that will rarely take new cells (a sealed minute, a complete hour)
    /// to a 4/5-full index and exactly sized cells.
    fn compact(&mut self) {
        self.cells.shrink_to_fit();
        let want = Self::index_len_for(self.cells.len());
        if self.index.len() > want + want / 16 {
            self.rehash(want);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Cell)> + '_ {
        self.cells.iter().map(|(ad, c)| (ad, c))
    }

    fn values(&self) -> impl Iterator<Item = &Cell> + '_ {
        self.cells.iter().map(|(_, c)| c)
    }

    fn heap_bytes(&self) -> usize {
        self.index.capacity() * 8
            + self.cells.capacity() * size_of::<(u64, Cell)>()
            + self
                .values()
                .filter(|c| c.more.capacity() > 0)
                .map(|c| 16 + c.more.capacity() * size_of::<Combo>())
                .sum::<usize>()
    }
}

impl Level {
    /// The cell of (ad, start), created if new, with the level's sketch slab.
    #[inline]
    fn cell_mut(&mut self, ad: u64, start: i64) -> (&mut Cell, &mut Slab) {
        let b = self
            .buckets
            .entry(start)
            .or_insert_with(|| Bucket::with_capacity(self.size_hint));
        let (cell, new) = b.entry(ad);
        self.len += usize::from(new);
        (cell, &mut self.sketches)
    }

    fn get(&self, ad: u64, start: i64) -> Option<&Cell> {
        self.buckets.get(&start)?.get(ad)
    }

    fn insert(&mut self, ad: u64, start: i64, cell: Cell) {
        let (slot, new) = self.buckets.entry(start).or_default().entry(ad);
        *slot = cell;
        self.len += usize::from(new);
    }

    /// Drops every bucket starting before `before`, freeing their sketches.
    fn evict(&mut self, before: i64) {
        let keep = self.buckets.split_off(&before);
        for (_, b) in std::mem::replace(&mut self.buckets, keep) {
            self.len -= b.len();
            for cell in b.values() {
                for c in cell.combos() {
                    c.users.free(&mut self.sketches);
                }
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        self.sketches.heap_bytes()
            + self.buckets.len() * 96
            + self.buckets.values().map(Bucket::heap_bytes).sum::<usize>()
    }
}

/// Cells of a bucket merged per chunk in [`merge_bucket`] (and clicks per chunk in
/// [`ShardState::warm`]): what they will read is touched first, a phase at a time for the
/// whole chunk ([`Bucket::warm`]), so the chunk's cache misses overlap instead of following
/// each other.
const MERGE_CHUNK: usize = 16;

/// Clicks a shard thread applies at once after warming their cells ([`ShardState::warm`]).
pub const APPLY_CHUNK: usize = MERGE_CHUNK;

/// Combinations of a cell's list [`Bucket::warm`] touches at most (8 lines, around the
/// middle, where a binary search starts).
const WARM_COMBOS: usize = 32;

/// Adds every cell of `cells` (users in `from`) to the bucket of `into` starting at `start`:
/// what sealing a minute (or rolling an hour up) does, one bucket lookup for all its cells.
/// The destination is a big table (an hour of cells) that is mostly out of cache: its index
/// grows once, up front, and each chunk of cells first touches its index slots, cells and
/// combination lists ([`Bucket::warm_merge`]), then merges.
fn merge_bucket(into: &mut Level, start: i64, cells: &Bucket, from: &Slab) {
    let Level {
        buckets,
        len,
        sketches,
        size_hint,
    } = into;
    let b = buckets
        .entry(start)
        .or_insert_with(|| Bucket::with_capacity(*size_hint));
    b.reserve(cells.len());
    for chunk in cells.cells.chunks(MERGE_CHUNK) {
        b.warm_merge(chunk);
        for (ad, cell) in chunk {
            let (up, new) = b.entry(*ad);
            *len += usize::from(new);
            merge_into(up, cell, from, sketches);
        }
    }
}

/// Adds `cell` (users in `from`) to `up` (users in `slab`).
fn merge_into(up: &mut Cell, cell: &Cell, from: &Slab, slab: &mut Slab) {
    up.clicks = up.clicks.saturating_add(cell.clicks);
    up.version = up.version.saturating_add(cell.version);
    if cell.first.id != 0 {
        let uc = up.combo_mut(cell.first.id);
        uc.clicks = uc.clicks.saturating_add(cell.first.clicks);
        uc.users.merge_from(cell.first.users, from, slab);
    }
    if cell.more.len() < MERGE_JOIN_MIN {
        for c in &cell.more {
            let uc = up.combo_mut(c.id);
            uc.clicks = uc.clicks.saturating_add(c.clicks);
            uc.users.merge_from(c.users, from, slab);
        }
    } else {
        up.merge_sorted(&cell.more, from, slab);
    }
}

/// From this many combinations on, a cell's `more` is merged into another's in one pass
/// over both sorted lists ([`Cell::merge_sorted`]) rather than by a binary search and an
/// insertion per combination: a hot ad's minute holds hundreds of combinations, its hour
/// thousands, and each insertion moved the tail of the hour's list.
const MERGE_JOIN_MIN: usize = 4;

/// See the module doc. `Clone` is how a checkpoint snapshots a shard: a copy of its
/// tables is cheaper than encoding them, and the encoding then runs off the shard thread.
#[derive(Debug, Clone)]
pub struct ShardState {
    levels: [Level; 3],
    /// Minutes starting before this are rolled up into their hour cells ("sealed"); a
    /// click for a sealed minute updates its hour cell too, any other click only its
    /// minute cell until [`ShardState::seal`] rolls it up.
    sealed_before: i64,
    /// Minutes starting before this are in their day cells too (`<= sealed_before`). The
    /// day level is rolled up from complete hours, not from each sealed minute, so the
    /// hour being filled is not held twice: this is the start of the first hour not
    /// rolled up (`i64::MIN`: none yet). A checkpoint from before it (main up to issue 13)
    /// rolled minutes into days directly: restored, it is `sealed_before` itself, maybe
    /// inside an hour ("legacy hour"): until that hour is complete, its minutes go to the
    /// day directly as they are sealed, and it is never rolled up from the hour level.
    day_before: i64,
    /// Invalid traffic (issue 16), one state per `rules::Reason` (empty until the first
    /// invalid click): the same cells, counted apart. The cells of `self` count ALL
    /// clicks, valid and invalid, so valid = all − Σ invalid; a click moved to invalid
    /// later (rate rules) is only added here, every count stays increment-only (top-N
    /// lists and sketches cannot subtract).
    invalid: Vec<ShardState>,
}

impl Default for ShardState {
    fn default() -> Self {
        ShardState {
            levels: Default::default(),
            sealed_before: i64::MIN,
            day_before: i64::MIN,
            invalid: Vec::new(),
        }
    }
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// Whether `t` (not `i64::MIN`) is not an hour boundary.
fn inside_hour(t: i64) -> bool {
    t != i64::MIN && t.rem_euclid(LEVEL_MS[1]) != 0
}

fn bucket(t: i64, level: usize) -> i64 {
    t.div_euclid(LEVEL_MS[level]) * LEVEL_MS[level]
}

impl ShardState {
    /// [`ShardState::apply`] of each click, [`APPLY_CHUNK`] at a time, each chunk's cells
    /// warmed first ([`ShardState::warm`]): what a shard thread does with a batch.
    pub fn apply_all(&mut self, clicks: &[Applied]) {
        for chunk in clicks.chunks(APPLY_CHUNK) {
            self.warm(chunk);
            for a in chunk {
                self.apply(a);
            }
        }
    }

    /// Applies one click to its minute cell, and to its hour and day cells when its minute
    /// is already rolled up into them (otherwise the seal rolls it up).
    pub fn apply(&mut self, a: &Applied) {
        for level in 0..self.levels_of(bucket(a.event_time_ms, 0)) {
            let start = bucket(a.event_time_ms, level);
            let (cell, sketches) = self.levels[level].cell_mut(a.ad, start);
            cell.clicks = cell.clicks.saturating_add(1);
            if a.late {
                cell.version = cell.version.saturating_add(1);
            }
            let combo = cell.combo_mut(a.combo);
            combo.clicks = combo.clicks.saturating_add(1);
            if a.user != 0 {
                combo.users.insert(a.user, sketches);
            }
        }
    }

    /// Touches the minute cells `clicks` will update (index slots, cells, combination
    /// lists; see `Bucket::warm`) so that applying them right after finds them in cache:
    /// the shard thread calls it on each chunk of a batch (a few dozen clicks) before
    /// applying the chunk. Only a hint: no effect on the state.
    pub fn warm(&self, clicks: &[Applied]) {
        let minutes = &self.levels[0].buckets;
        let mut ads = [0u64; MERGE_CHUNK];
        for chunk in clicks.chunks(MERGE_CHUNK) {
            let start = bucket(chunk[0].event_time_ms, 0);
            let Some(b) = minutes.get(&start) else {
                continue;
            };
            let mut n = 0;
            for a in chunk.iter().filter(|a| bucket(a.event_time_ms, 0) == start) {
                ads[n] = a.ad;
                n += 1;
            }
            b.warm(&ads[..n]);
        }
    }

    /// How many levels hold the minute starting at `minute`: 1 (minute cell only), 2 (and
    /// its hour: sealed) or 3 (and its day: its hour rolled up).
    #[inline]
    fn levels_of(&self, minute: i64) -> usize {
        1 + usize::from(minute < self.sealed_before) + usize::from(minute < self.day_before)
    }

    /// Whether `day_before` is inside an hour (restored from a checkpoint of main's format:
    /// see the field).
    fn day_legacy(&self) -> bool {
        inside_hour(self.day_before)
    }

    /// The first hour whose sealed minutes are not in the day level.
    fn hours_unrolled_from(&self) -> i64 {
        if self.day_legacy() {
            bucket(self.day_before, 1) + LEVEL_MS[1]
        } else {
            self.day_before
        }
    }

    /// Rolls every minute starting before `before_ms` (a minute boundary the watermark has
    /// passed) up into its hour cells, and every hour that is then complete into its day
    /// cells: per cell, not per click, so the per-click path touches one cell. Sealed
    /// minutes and rolled-up hours are compacted (they rarely take a new cell). Idempotent;
    /// never moves backwards.
    pub fn seal(&mut self, before_ms: i64) {
        let before_ms = bucket(before_ms, 0);
        if before_ms <= self.sealed_before {
            return;
        }
        // The rest of a legacy hour goes to the day minute by minute, as main did.
        let direct_to = if self.day_legacy() {
            bucket(self.day_before, 1) + LEVEL_MS[1]
        } else {
            i64::MIN
        };
        let [minutes, hours, days] = &mut self.levels;
        let Level {
            buckets,
            sketches,
            size_hint,
            ..
        } = minutes;
        for (&start, cells) in buckets.range_mut(self.sealed_before..before_ms) {
            merge_bucket(hours, bucket(start, 1), cells, sketches);
            if start < direct_to {
                merge_bucket(days, bucket(start, 2), cells, sketches);
            }
            cells.compact();
            *size_hint = cells.len() + cells.len() / 8;
        }
        self.sealed_before = before_ms;
        if direct_to != i64::MIN {
            self.day_before = before_ms.min(direct_to);
        }
        if !inside_hour(self.day_before) {
            let complete = bucket(before_ms, 1);
            if complete > self.day_before {
                let Level {
                    buckets,
                    sketches,
                    size_hint,
                    ..
                } = hours;
                for (&start, cells) in buckets.range_mut(self.day_before..complete) {
                    merge_bucket(days, bucket(start, 2), cells, sketches);
                    cells.compact();
                    *size_hint = cells.len() + cells.len() / 8;
                }
                self.day_before = complete;
            }
        }
        for s in &mut self.invalid {
            s.seal(before_ms);
        }
    }

    /// Counts `a` as invalid traffic of reason `reason` (`rules::Reason::index`). With
    /// `a.late` the invalid cell's version moves (a retroactive move changes what a valid
    /// query answered before, like a late correction).
    pub fn apply_invalid(&mut self, reason: usize, a: &Applied) {
        if self.invalid.is_empty() {
            let (sealed_before, day_before) = (self.sealed_before, self.day_before);
            self.invalid = (0..crate::rules::N_REASONS)
                .map(|_| ShardState {
                    sealed_before,
                    day_before,
                    ..ShardState::default()
                })
                .collect();
        }
        if let Some(s) = self.invalid.get_mut(reason) {
            s.apply(a);
        }
    }

    /// The invalid clicks of `reason` (`None`: none yet on this shard).
    pub fn invalid(&self, reason: usize) -> Option<&ShardState> {
        self.invalid.get(reason)
    }

    /// Minutes before this are rolled up (see [`ShardState::seal`]).
    pub fn sealed_before(&self) -> i64 {
        self.sealed_before
    }

    /// Drops buckets of `level` that start before `before_ms`. Minutes are sealed first, so
    /// an evicted minute is always in its hour and day.
    /// `before_ms` is rounded down to its bucket: the bucket holding it may still take
    /// clicks (the window operator admits event times from `before_ms` on), so it stays.
    /// Hours are kept until they are rolled up into their days.
    pub fn evict(&mut self, level: usize, before_ms: i64) {
        let mut before_ms = bucket(before_ms, level);
        if level == 0 {
            self.seal(before_ms);
        }
        if level == 1 {
            if self.day_before == i64::MIN {
                return;
            }
            before_ms = before_ms.min(self.day_before);
        }
        self.levels[level].evict(before_ms);
        for s in &mut self.invalid {
            s.evict(level, before_ms);
        }
    }

    /// What `ad` counted in the bucket of `level` starting at `start`: the bucket's cell
    /// and, above the minute level, the cells of its minutes not yet sealed into it and,
    /// for a day, the cells of its hours not yet rolled up into it. Sum them (each click
    /// is in exactly one).
    pub fn parts(&self, level: usize, ad: u64, start: i64) -> impl Iterator<Item = CellRef<'_>> {
        let own = self.cell(level, ad, start);
        let unrolled = (level == 2).then(|| {
            let from = start.max(self.hours_unrolled_from());
            let to = start.saturating_add(LEVEL_MS[level]);
            let h = &self.levels[1];
            h.buckets
                .range(from..to.max(from))
                .filter_map(move |(_, cells)| {
                    cells.get(ad).map(|cell| CellRef {
                        cell,
                        slab: &h.sketches,
                    })
                })
        });
        let unsealed = (level > 0).then(|| {
            let from = start.max(self.sealed_before);
            let to = start.saturating_add(LEVEL_MS[level]);
            let m = &self.levels[0];
            m.buckets
                .range(from..to.max(from))
                .filter_map(move |(_, cells)| {
                    cells.get(ad).map(|cell| CellRef {
                        cell,
                        slab: &m.sketches,
                    })
                })
        });
        own.into_iter()
            .chain(unrolled.into_iter().flatten())
            .chain(unsealed.into_iter().flatten())
    }

    /// The cell of `ad` at `level` starting at `start` (above the minute level: only what
    /// is rolled up into it; see [`ShardState::parts`]).
    pub fn cell(&self, level: usize, ad: u64, start: i64) -> Option<CellRef<'_>> {
        let l = &self.levels[level];
        l.get(ad, start).map(|cell| CellRef {
            cell,
            slab: &l.sketches,
        })
    }

    /// Every cell of `level` whose bucket starts in [from, to), in time order.
    pub fn cells_in(
        &self,
        level: usize,
        from: i64,
        to: i64,
    ) -> impl Iterator<Item = (i64, u64, CellRef<'_>)> + '_ {
        let l = &self.levels[level];
        let range = if from < to { from..to } else { from..from };
        l.buckets.range(range).flat_map(move |(s, cells)| {
            cells.iter().map(move |(ad, cell)| {
                (
                    *s,
                    *ad,
                    CellRef {
                        cell,
                        slab: &l.sketches,
                    },
                )
            })
        })
    }

    /// The top-N indexes of these cells (unfiltered: minute lists, and hour lists for the
    /// sealed minutes; per filter value: minute lists): what the shard thread starts from
    /// after a restore. `combos` maps combination ids to keys (id = index + 1) and
    /// `owners` ads to (advertiser, campaign), as the window operator holds them; `fields`
    /// are the fields with value indexes.
    pub fn top_set(
        &self,
        combos: &[DimKey],
        owners: &super::FastMap<u64, (u64, u64)>,
        fields: &[IndexField],
    ) -> TopSet {
        let mut top = TopSet::with_fields(fields);
        if self.sealed_before > i64::MIN {
            // Sealing first costs nothing (no lists yet) and makes every add below land in
            // its hour list too.
            top.seal(self.sealed_before.div_euclid(LEVEL_MS[0]));
        }
        for (start, cells) in &self.levels[0].buckets {
            let minute = start.div_euclid(LEVEL_MS[0]);
            for (ad, cell) in cells.iter() {
                let (advertiser, campaign) = owners.get(ad).copied().unwrap_or((0, 0));
                for c in cell.combos() {
                    let dims = (c.id as usize)
                        .checked_sub(1)
                        .and_then(|i| combos.get(i))
                        .copied()
                        .unwrap_or_default();
                    let keys = ClickKeys {
                        dims,
                        advertiser,
                        campaign,
                    };
                    top.add(*ad, minute, u64::from(c.clicks), &keys);
                }
            }
        }
        top
    }

    /// Sets the minute cell of (`ad`, `minute_ms`) to exactly `combos` (combination id,
    /// clicks, users as sparse HLL entries; empty: no cell), for a repair (`crate::repair`).
    /// When the minute is sealed its hour and day cells move by the same difference per
    /// combination, and take the new users (a sketch cannot forget a user, so users are
    /// only ever added there). Returns the cell's clicks before.
    pub fn set_minute(&mut self, ad: u64, minute_ms: i64, combos: &[(u32, u32, Vec<u32>)]) -> u64 {
        let minute_ms = bucket(minute_ms, 0);
        let old: Vec<(u32, u32)> = self.levels[0]
            .get(ad, minute_ms)
            .map(|c| c.combos().map(|c| (c.id, c.clicks)).collect())
            .unwrap_or_default();
        let old_total: u64 = old.iter().map(|c| u64::from(c.1)).sum();
        let levels = self.levels_of(minute_ms);
        if levels > 1 {
            let mut ids: Vec<u32> = old.iter().map(|c| c.0).collect();
            ids.extend(combos.iter().map(|c| c.0));
            ids.sort_unstable();
            ids.dedup();
            for level in 1..levels {
                let (up, slab) = self.levels[level].cell_mut(ad, bucket(minute_ms, level));
                for id in &ids {
                    let was = old.iter().find(|c| c.0 == *id).map_or(0, |c| c.1);
                    let now = combos.iter().find(|c| c.0 == *id);
                    let delta = i64::from(now.map_or(0, |c| c.1)) - i64::from(was);
                    let uc = up.combo_mut(*id);
                    uc.clicks = clamp_u32(i64::from(uc.clicks) + delta);
                    for e in now.map(|c| c.2.as_slice()).unwrap_or_default() {
                        uc.users.insert(*e, slab);
                    }
                    up.clicks = clamp_u32(i64::from(up.clicks) + delta);
                }
                up.version = up.version.saturating_add(1);
            }
        }
        let l = &mut self.levels[0];
        let mut version = 0;
        if let Some(cell) = l.buckets.get_mut(&minute_ms).and_then(|b| b.remove(ad)) {
            l.len -= 1;
            version = cell.version;
            for c in cell.combos() {
                c.users.free(&mut l.sketches);
            }
        }
        if combos.iter().any(|c| c.1 > 0) {
            let (cell, slab) = l.cell_mut(ad, minute_ms);
            cell.version = version.saturating_add(1);
            for (id, clicks, users) in combos.iter().filter(|c| c.1 > 0) {
                let c = cell.combo_mut(*id);
                c.clicks = *clicks;
                for e in users {
                    c.users.insert(*e, slab);
                }
                cell.clicks = cell.clicks.saturating_add(*clicks);
            }
        }
        old_total
    }

    /// Test-only damage (`test-hooks`): moves the first combination of the minute cell of
    /// (`ad`, `minute_ms`), and its hour and day cells when sealed, by `delta` clicks, as a
    /// bit flip or a bug would, without touching anything that would let a replay undo it.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn damage_for_test(&mut self, ad: u64, minute_ms: i64, delta: i64) -> bool {
        let minute_ms = bucket(minute_ms, 0);
        let Some(id) = self.levels[0]
            .get(ad, minute_ms)
            .and_then(|c| c.combos().next().map(|c| c.id))
        else {
            return false;
        };
        for level in 0..self.levels_of(minute_ms) {
            let (cell, _) = self.levels[level].cell_mut(ad, bucket(minute_ms, level));
            cell.clicks = clamp_u32(i64::from(cell.clicks) + delta);
            let c = cell.combo_mut(id);
            c.clicks = clamp_u32(i64::from(c.clicks) + delta);
        }
        true
    }

    /// Active minute cells.
    pub fn minute_cells(&self) -> usize {
        self.levels[0].len
    }

    /// Approximate heap bytes of everything in this shard.
    pub fn heap_bytes(&self) -> usize {
        self.levels.iter().map(Level::heap_bytes).sum::<usize>()
            + self
                .invalid
                .iter()
                .map(ShardState::heap_bytes)
                .sum::<usize>()
    }

    /// Serialises the shard (checkpoint table).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut pb = ShardPb {
            sealed_before: self.sealed_before,
            day_before: Some(self.day_before),
            ..ShardPb::default()
        };
        for (level, l) in self.levels.iter().enumerate() {
            for ((start, ad), cell) in l
                .buckets
                .iter()
                .flat_map(|(s, cells)| cells.iter().map(move |(ad, c)| ((s, ad), c)))
            {
                pb.cells.push(CellPb {
                    level: level as u32,
                    ad: *ad,
                    start: *start,
                    clicks: u64::from(cell.clicks),
                    version: cell.version,
                    combos: cell
                        .combos()
                        .map(|c| ComboPb {
                            combo: c.id,
                            clicks: u64::from(c.clicks),
                            users: c.users.to_hll(&l.sketches).to_bytes(),
                            ..Default::default()
                        })
                        .collect(),
                });
            }
        }
        pb.invalid = self.invalid.iter().map(ShardState::to_bytes).collect();
        pb.encode_to_vec()
    }

    /// Restores a shard from `to_bytes` output. `intern` gives the combination id of the
    /// dimensions a checkpoint from before combination ids carries.
    pub fn from_bytes(b: &[u8], intern: &mut dyn FnMut(DimKey) -> u32) -> Result<Self, String> {
        let pb = ShardPb::decode(b).map_err(|e| format!("shard checkpoint: {e}"))?;
        let mut s = ShardState::default();
        // A checkpoint from before seal-time rollups (field absent: 0) holds every minute
        // in its hour and day already: all of it is sealed.
        let legacy = pb.sealed_before == 0;
        s.sealed_before = pb.sealed_before;
        for c in pb.cells {
            let level = c.level as usize;
            if level > 2 {
                return Err(format!("shard checkpoint: bad level {level}"));
            }
            let l = &mut s.levels[level];
            let mut cell = Cell {
                clicks: u32::try_from(c.clicks).unwrap_or(u32::MAX),
                version: c.version,
                ..Cell::default()
            };
            for k in c.combos {
                let id = if k.combo != 0 {
                    k.combo
                } else {
                    intern(DimKey {
                        country: u16::try_from(k.country).unwrap_or(0).to_le_bytes(),
                        device: u8::try_from(k.device).unwrap_or(0),
                        os: k.os,
                        site: k.site,
                    })
                };
                let users =
                    Hll::from_bytes(&k.users).map_err(|e| format!("shard checkpoint: {e}"))?;
                let combo = cell.combo_mut(id);
                combo.clicks = combo
                    .clicks
                    .saturating_add(u32::try_from(k.clicks).unwrap_or(u32::MAX));
                let mut merged = combo.users.to_hll(&l.sketches);
                combo.users.free(&mut l.sketches);
                merged.merge(&users);
                combo.users = Users::from_hll(merged, &mut l.sketches);
            }
            l.insert(c.ad, c.start, cell);
        }
        if legacy {
            s.sealed_before = s.levels[0]
                .buckets
                .keys()
                .next_back()
                .map_or(i64::MIN, |m| m + LEVEL_MS[0]);
        }
        // Main's format rolled every sealed minute into its day (see `day_before`).
        s.day_before = pb.day_before.unwrap_or(s.sealed_before);
        if s.day_before > s.sealed_before || (s.day_legacy() && s.day_before != s.sealed_before) {
            return Err("shard checkpoint: inconsistent day rollup".into());
        }
        for b in pb.invalid {
            let mut sub = ShardState::from_bytes(&b, intern)?;
            // Invalid states seal with their shard.
            sub.sealed_before = s.sealed_before;
            sub.day_before = s.day_before;
            s.invalid.push(sub);
        }
        if !s.invalid.is_empty() && s.invalid.len() != crate::rules::N_REASONS {
            return Err(format!(
                "shard checkpoint: {} invalid-traffic states, expected {}",
                s.invalid.len(),
                crate::rules::N_REASONS
            ));
        }
        Ok(s)
    }
}

#[derive(Clone, PartialEq, Message)]
struct ShardPb {
    #[prost(message, repeated, tag = "1")]
    cells: Vec<CellPb>,
    /// Ad owners, written by versions before the window operator's owner table was the
    /// only one; read and ignored (`windows` holds the same).
    #[prost(message, repeated, tag = "2")]
    ads: Vec<AdPb>,
    /// `ShardState::sealed_before` (0: a checkpoint from before it existed).
    #[prost(sint64, tag = "3")]
    sealed_before: i64,
    /// The invalid-traffic states by reason (`ShardState::invalid`), each a `ShardPb`.
    #[prost(bytes = "vec", repeated, tag = "4")]
    invalid: Vec<Vec<u8>>,
    /// `ShardState::day_before` (absent: main's format, where it was `sealed_before`).
    #[prost(sint64, optional, tag = "5")]
    day_before: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct CellPb {
    #[prost(uint32, tag = "1")]
    level: u32,
    #[prost(uint64, tag = "2")]
    ad: u64,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(uint64, tag = "4")]
    clicks: u64,
    #[prost(uint32, tag = "5")]
    version: u32,
    #[prost(message, repeated, tag = "6")]
    combos: Vec<ComboPb>,
}

#[derive(Clone, PartialEq, Message)]
struct ComboPb {
    #[prost(uint32, tag = "1")]
    country: u32,
    #[prost(uint32, tag = "2")]
    device: u32,
    #[prost(uint32, tag = "3")]
    os: u32,
    #[prost(uint32, tag = "4")]
    site: u32,
    #[prost(uint64, tag = "5")]
    clicks: u64,
    #[prost(bytes = "vec", tag = "6")]
    users: Vec<u8>,
    /// Combination id (0 in checkpoints from before ids: then the dimensions above).
    #[prost(uint32, tag = "7")]
    combo: u32,
}

#[derive(Clone, PartialEq, Message)]
struct AdPb {
    #[prost(uint64, tag = "1")]
    ad: u64,
    #[prost(uint64, tag = "2")]
    advertiser: u64,
    #[prost(uint64, tag = "3")]
    campaign: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::topset::FilterKey;
    use proptest::prelude::*;

    fn splitmix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    fn total(s: &ShardState, level: usize, ad: u64, start: i64) -> u64 {
        s.parts(level, ad, start)
            .map(|c| u64::from(c.cell.clicks))
            .sum()
    }

    fn click(ad: u64, t: i64) -> Applied {
        Applied {
            ad,
            advertiser: 1,
            campaign: 2,
            event_time_ms: t,
            combo: 1,
            dims: DimKey::default(),
            user: Hll::entry_of_hash(splitmix(ad.wrapping_mul(31).wrapping_add(t as u64))),
            late: false,
        }
    }

    #[test]
    fn eviction_drops_only_old_buckets_per_level() {
        let mut s = ShardState::default();
        let t0 = 1_767_225_600_000; // midnight UTC
        for m in 0..10 {
            s.apply(&click(1, t0 + m * 60_000));
        }
        let owners: crate::state::FastMap<u64, (u64, u64)> = [(1, (1, 2))].into_iter().collect();
        s.evict(0, t0 + 5 * 60_000);
        assert!(s.cell(0, 1, t0 + 4 * 60_000).is_none());
        assert_eq!(
            s.cell(0, 1, t0 + 5 * 60_000).map(|c| c.cell.clicks),
            Some(1)
        );
        assert_eq!(
            s.top_set(&[], &owners, &IndexField::ALL)
                .all
                .count(1, t0 / 60_000, t0 / 60_000 + 10),
            5,
            "the top-N index rebuilt from the cells holds what is left"
        );
        // The hour and day rollups keep everything until their own retention: the evicted
        // minutes were sealed into them, the others are still read from the minutes.
        assert_eq!(s.cell(1, 1, t0).map(|c| c.cell.clicks), Some(5));
        assert_eq!(total(&s, 1, 1, t0), 10);
        assert_eq!(total(&s, 2, 1, t0), 10);
        let back = ShardState::from_bytes(&s.to_bytes(), &mut |_| 0).unwrap();
        assert_eq!(total(&back, 1, 1, t0), 10);
        // A boundary inside a minute keeps that minute: it may still take clicks.
        s.evict(0, t0 + 6 * 60_000 + 30_000);
        assert!(s.cell(0, 1, t0 + 5 * 60_000).is_none());
        assert_eq!(
            s.cell(0, 1, t0 + 6 * 60_000).map(|c| c.cell.clicks),
            Some(1)
        );
        let rebuilt = back.top_set(&[], &owners, &IndexField::ALL);
        assert_eq!(rebuilt.all.count(1, t0 / 60_000, t0 / 60_000 + 10), 5);
        // The per-value indexes are rebuilt too: the ad's advertiser holds the same clicks.
        let adv = rebuilt
            .index(FilterKey::Advertiser(1))
            .map(|i| i.count(1, t0 / 60_000, t0 / 60_000 + 10));
        assert_eq!(adv, Some(5));
    }

    /// A checkpoint written by main's format (every sealed minute rolled into its day, no
    /// `day_before`) restores inside an hour, and that "legacy hour" keeps adding up
    /// while it completes and after: no click counted twice or lost at any level.
    #[test]
    fn checkpoint_from_mains_format_restores_mid_hour() {
        let t0 = 1_767_225_600_000i64; // midnight UTC
        let m = LEVEL_MS[0];
        // Main's state: sealed up to 00:30, minutes rolled into hours and days alike
        // (what main's `apply` and `seal` did: a sealed minute updates all three levels).
        let mut old = ShardState {
            sealed_before: t0 + 30 * m,
            day_before: t0 + 30 * m,
            ..ShardState::default()
        };
        type Model = std::collections::HashMap<(usize, i64), u64>;
        let mut model = Model::default();
        let add = |s: &mut ShardState, model: &mut Model, minute: i64, ad: u64| {
            let t = t0 + minute * m + 5;
            s.apply(&click(ad, t));
            if ad == 3 {
                for level in 0..3 {
                    *model.entry((level, bucket(t, level))).or_default() += 1;
                }
            }
        };
        for minute in [1, 2, 29, 31, 40] {
            add(&mut old, &mut model, minute, 3);
            add(&mut old, &mut model, minute, 4);
        }
        let mut pb = ShardPb::decode(old.to_bytes().as_slice()).unwrap();
        pb.day_before = None;
        let main_bytes = pb.encode_to_vec();
        let mut s = ShardState::from_bytes(&main_bytes, &mut |_| 0).unwrap();
        assert_eq!(s.day_before, t0 + 30 * m);
        let check = |s: &ShardState, model: &Model| {
            for (&(level, start), &n) in model {
                assert_eq!(total(s, level, 3, start), n, "level {level} at {start}");
            }
        };
        check(&s, &model);
        // Seal inside the legacy hour, late clicks to it, then past its end and the next.
        s.seal(t0 + 35 * m);
        add(&mut s, &mut model, 32, 3);
        add(&mut s, &mut model, 10, 3);
        check(&s, &model);
        for minute in [59, 61, 90] {
            add(&mut s, &mut model, minute, 3);
        }
        s.seal(t0 + 62 * m);
        assert_eq!(s.day_before, t0 + 60 * m);
        add(&mut s, &mut model, 45, 3);
        add(&mut s, &mut model, 61, 3);
        check(&s, &model);
        let back = ShardState::from_bytes(&s.to_bytes(), &mut |_| 0).unwrap();
        check(&back, &model);
        s.seal(t0 + 125 * m);
        assert_eq!(s.day_before, t0 + 120 * m);
        add(&mut s, &mut model, 100, 3);
        check(&s, &model);
        assert_eq!(total(&s, 2, 3, t0), 13);
        // Hours are evicted only once rolled up into their days.
        s.evict(1, t0 + 10 * 60 * m);
        assert_eq!(total(&s, 2, 3, t0), 13);
    }

    proptest! {
        /// The cell table of a bucket behaves as a map, through growth, removals (the
        /// backward shift) and compaction.
        #[test]
        fn bucket_matches_a_map(ops in proptest::collection::vec((0u8..10, 0u64..64), 1..400)) {
            let mut b = Bucket::with_capacity(3);
            let mut model = std::collections::BTreeMap::new();
            for (op, ad) in ops {
                // Few distinct ids, spread over the whole u64 range (and sequential ones).
                let ad = if ad % 2 == 0 { splitmix(ad) } else { ad };
                b.warm(&[ad, ad ^ 1]);
                match op {
                    0..=5 => {
                        let (c, new) = b.entry(ad);
                        prop_assert_eq!(new, !model.contains_key(&ad));
                        c.clicks += 1;
                        *model.entry(ad).or_insert(0u32) += 1;
                    }
                    6 | 7 => {
                        prop_assert_eq!(b.remove(ad).map(|c| c.clicks), model.remove(&ad));
                    }
                    8 => b.compact(),
                    _ => prop_assert_eq!(b.get(ad).map(|c| c.clicks), model.get(&ad).copied()),
                }
                prop_assert_eq!(b.len(), model.len());
                prop_assert!(b.index.len() > b.len());
            }
            for (ad, n) in &model {
                prop_assert_eq!(b.get(*ad).map(|c| c.clicks), Some(*n));
            }
            let mut all: Vec<(u64, u32)> = b.iter().map(|(a, c)| (*a, c.clicks)).collect();
            all.sort_unstable();
            prop_assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        }

        /// Merging one cell into another (the one-pass merge of sorted combinations and the
        /// per-combination path alike) sums clicks and unites users per combination.
        #[test]
        fn merged_cells_match_a_model(
            a in proptest::collection::vec((1u32..30, 0u64..8), 0..60),
            b in proptest::collection::vec((1u32..30, 0u64..8), 0..60),
        ) {
            use std::collections::{BTreeMap, BTreeSet};
            let (mut from, mut slab) = (Slab::default(), Slab::default());
            let mut model: BTreeMap<u32, (u32, BTreeSet<u64>)> = BTreeMap::new();
            let fill = |cell: &mut Cell, clicks: &[(u32, u64)], slab: &mut Slab,
                        model: &mut BTreeMap<u32, (u32, BTreeSet<u64>)>| {
                for &(id, user) in clicks {
                    cell.clicks += 1;
                    let c = cell.combo_mut(id);
                    c.clicks += 1;
                    let m = model.entry(id).or_default();
                    m.0 += 1;
                    if user != 0 {
                        c.users.insert(Hll::entry_of_hash(splitmix(user)), slab);
                        m.1.insert(user);
                    }
                }
            };
            let (mut up, mut cell) = (Cell::default(), Cell::default());
            fill(&mut up, &a, &mut slab, &mut model);
            fill(&mut cell, &b, &mut from, &mut model);
            merge_into(&mut up, &cell, &from, &mut slab);
            prop_assert!(up.more.windows(2).all(|w| w[0].id < w[1].id));
            prop_assert!(up.more.iter().all(|c| c.id != up.first.id));
            prop_assert_eq!(u64::from(up.clicks), (a.len() + b.len()) as u64);
            let got: BTreeMap<u32, (u32, u64)> = up
                .combos()
                .map(|c| (c.id, (c.clicks, c.users.to_hll(&slab).estimate())))
                .collect();
            let want: BTreeMap<u32, (u32, u64)> = model
                .into_iter()
                .map(|(id, (n, users))| (id, (n, users.len() as u64)))
                .collect();
            prop_assert_eq!(got, want);
        }

        /// Per-combination clicks and distinct users of every cell match a brute-force model,
        /// through the inline -> sketch transition, a checkpoint round trip and eviction.
        #[test]
        fn cells_match_a_model(
            clicks in proptest::collection::vec((0u64..4, 0i64..180, prop_oneof![3 => 1u32..5, 1 => 1u32..40], 0u64..6), 1..300),
            seal_minute in 0i64..180,
            seal_after in 0usize..300,
            seal_again in 0i64..180,
            evict_minute in 0i64..180,
        ) {
            use std::collections::{HashMap, HashSet};
            let t0 = 1_767_225_600_000i64;
            let mut s = ShardState::default();
            // (level, ad, bucket start, combination) -> (clicks, users)
            type Model = HashMap<(usize, u64, i64, u32), (u32, HashSet<u64>)>;
            let mut model: Model = HashMap::new();
            for (i, &(ad, minute, combo, user)) in clicks.iter().enumerate() {
                if i == seal_after {
                    s.seal(t0 + seal_minute * 60_000);
                }
                if i == seal_after / 2 {
                    s.seal(t0 + seal_again.min(seal_minute) * 60_000);
                }
                let t = t0 + minute * 60_000 + 7;
                let h = splitmix(user);
                let a = Applied {
                    ad, advertiser: 1, campaign: 1, event_time_ms: t, combo, dims: DimKey::default(),
                    user: if user == 0 { 0 } else { Hll::entry_of_hash(h) },
                    late: false,
                };
                // Warming is only a hint: interleaved with everything, it changes nothing.
                s.warm(&[a, click(ad ^ 1, t - 60_000)]);
                s.apply(&a);
                for level in 0..3 {
                    let m = model.entry((level, ad, bucket(t, level), combo)).or_default();
                    m.0 += 1;
                    if user != 0 {
                        m.1.insert(user);
                    }
                }
            }
            let check = |s: &ShardState, model: &Model| -> Result<(), TestCaseError> {
                for (&(level, ad, start, combo), (n, users)) in model {
                    let mut u = Hll::new();
                    let mut got = 0;
                    for cell in s.parts(level, ad, start) {
                        got += cell.tally(|id| id == combo, Some(&mut u));
                    }
                    prop_assert_eq!(got, u64::from(*n));
                    prop_assert_eq!(u.estimate(), users.len() as u64);
                }
                let expected: HashSet<_> = model.keys().filter(|k| k.0 == 0).map(|k| (k.1, k.2)).collect();
                prop_assert_eq!(s.levels[0].len, expected.len());
                Ok(())
            };
            check(&s, &model)?;
            let back = ShardState::from_bytes(&s.to_bytes(), &mut |_| 0).unwrap();
            check(&back, &model)?;
            let mut s = back;
            let cut = t0 + evict_minute * 60_000;
            s.evict(0, cut);
            model.retain(|k, _| k.0 != 0 || k.2 >= cut);
            check(&s, &model)?;
            let in_range = s.cells_in(0, t0, t0 + 180 * 60_000).count();
            prop_assert_eq!(in_range, model.keys().filter(|k| k.0 == 0).map(|k| (k.1, k.2)).collect::<HashSet<_>>().len());
        }

        /// A checkpoint's snapshot (`Clone`, encoded later off the shard thread) is the
        /// state at the barrier: what the shard applies, seals and evicts after it never
        /// reaches the copy, and the copy encodes and restores exactly as the state did.
        #[test]
        fn a_snapshot_is_the_state_at_the_barrier(
            clicks in proptest::collection::vec((0u64..6, 0i64..180, 0u64..8), 1..300),
            barrier in 0usize..300,
            seal_minute in 0i64..180,
            evict_minute in 0i64..180,
        ) {
            let t0 = 1_767_225_600_000i64;
            let m = LEVEL_MS[0];
            let mut s = ShardState::default();
            let mut snap = None;
            for (i, (ad, minute, user)) in clicks.iter().enumerate() {
                if i == barrier.min(clicks.len() - 1) {
                    snap = Some((s.clone(), s.to_bytes()));
                    s.seal(t0 + seal_minute * m);
                }
                let mut a = click(*ad, t0 + minute * m);
                a.user = Hll::entry_of_hash(splitmix(*user));
                s.apply(&a);
            }
            s.evict(0, t0 + evict_minute * m);
            let (copy, bytes) = snap.expect("taken");
            prop_assert_eq!(copy.to_bytes(), bytes.clone());
            let back = ShardState::from_bytes(&bytes, &mut |_| 1).expect("restores");
            prop_assert_eq!(back.to_bytes(), bytes);
        }

        /// Window assignment: every click lands in the bucket that contains its event time,
        /// at every level, including before the epoch.
        #[test]
        fn window_assignment(t in -10_000_000_000_000i64..10_000_000_000_000) {
            let mut s = ShardState::default();
            s.apply(&click(7, t));
            for (level, w) in LEVEL_MS.iter().enumerate() {
                let start = t.div_euclid(*w) * w;
                prop_assert!(start <= t && t < start + w);
                prop_assert_eq!(total(&s, level, 7, start), 1);
            }
        }
    }
}
