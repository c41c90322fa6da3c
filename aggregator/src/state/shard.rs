//! One shard of the counting state: per (ad, bucket) cells at three levels (minute, hour,
//! day), each broken down by dimension combination with unique users per combination. A
//! shard is owned by one worker thread (writes) and read by queries. The shard's unfiltered
//! top-N index lives beside it (`published.rs`), fed by the same thread, and can be rebuilt
//! from the minute cells ([`ShardState::top_set`]).
//!
//! Layout, for memory and for the per-click path (no allocation for the common cell):
//! - a level is one hash table `ad -> Cell` per bucket (minute, hour, day), in an ordered
//!   map by bucket start: 8-byte keys, sequential scans and sealing of a minute, eviction
//!   drops whole tables;
//! - a [`Cell`] is 32 bytes: its totals, its first dimension combination inline, and the
//!   others (rare at the minute level) in one `ThinVec` (a single pointer; the length lives
//!   in the allocation, so reaching the combinations costs one cache miss, not two);
//! - a combination ([`Combo`], 16 bytes) holds its clicks and up to two users inline as
//!   sparse HLL entries ([`Hll::entry_of_hash`]); its third distinct user moves them into
//!   a real [`Hll`] kept in the level's sketch slab, so a 1-click cell costs no heap at all.
//!
//! The same click also updates its hour and day cells. `heap_bytes` estimates the memory.

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
#[derive(Debug, Default)]
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
#[derive(Debug, Default)]
struct Level {
    buckets: BTreeMap<i64, Bucket>,
    /// Cells in all buckets.
    len: usize,
    sketches: Slab,
}

/// The cells of one bucket (a minute, an hour or a day).
type Bucket = super::FastMap<u64, Cell>;

impl Level {
    /// The cell of (ad, start), created if new, with the level's sketch slab.
    fn cell_mut(&mut self, ad: u64, start: i64) -> (&mut Cell, &mut Slab) {
        use std::collections::hash_map::Entry;
        let cell = match self.buckets.entry(start).or_default().entry(ad) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                self.len += 1;
                v.insert(Cell::default())
            }
        };
        (cell, &mut self.sketches)
    }

    fn get(&self, ad: u64, start: i64) -> Option<&Cell> {
        self.buckets.get(&start)?.get(&ad)
    }

    fn insert(&mut self, ad: u64, start: i64, cell: Cell) {
        if self
            .buckets
            .entry(start)
            .or_default()
            .insert(ad, cell)
            .is_none()
        {
            self.len += 1;
        }
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
        let slot = size_of::<(u64, Cell)>() + 1;
        let mut total = self.sketches.heap_bytes() + self.buckets.len() * 96;
        for b in self.buckets.values() {
            total += b.capacity() * slot;
            total += b
                .values()
                .filter(|c| c.more.capacity() > 0)
                .map(|c| 16 + c.more.capacity() * size_of::<Combo>())
                .sum::<usize>();
        }
        total
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct ShardState {
    levels: [Level; 3],
    /// Minutes starting before this are rolled up into their hour and day cells ("sealed");
    /// a click for a sealed minute updates all three levels, any other click only its
    /// minute cell until [`ShardState::seal`] rolls it up.
    sealed_before: i64,
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
            invalid: Vec::new(),
        }
    }
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

fn bucket(t: i64, level: usize) -> i64 {
    t.div_euclid(LEVEL_MS[level]) * LEVEL_MS[level]
}

impl ShardState {
    /// Applies one click to its minute cell, and to its hour and day cells when its minute
    /// is sealed (otherwise the seal rolls it up).
    pub fn apply(&mut self, a: &Applied) {
        let levels = if bucket(a.event_time_ms, 0) < self.sealed_before {
            3
        } else {
            1
        };
        for level in 0..levels {
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

    /// Rolls every minute starting before `before_ms` (a minute boundary the watermark has
    /// passed) up into its hour and day cells: per cell, not per click, so the per-click
    /// path touches one cell. Idempotent; never moves backwards.
    pub fn seal(&mut self, before_ms: i64) {
        let before_ms = bucket(before_ms, 0);
        if before_ms <= self.sealed_before {
            return;
        }
        let (minutes, upper) = self.levels.split_at_mut(1);
        let m = &minutes[0];
        for (&start, cells) in m.buckets.range(self.sealed_before..before_ms) {
            for (ad, cell) in cells {
                for (i, l) in upper.iter_mut().enumerate() {
                    let (up, slab) = l.cell_mut(*ad, bucket(start, i + 1));
                    up.clicks = up.clicks.saturating_add(cell.clicks);
                    up.version = up.version.saturating_add(cell.version);
                    for c in cell.combos() {
                        let uc = up.combo_mut(c.id);
                        uc.clicks = uc.clicks.saturating_add(c.clicks);
                        uc.users.merge_from(c.users, &m.sketches, slab);
                    }
                }
            }
        }
        self.sealed_before = before_ms;
        for s in &mut self.invalid {
            s.seal(before_ms);
        }
    }

    /// Counts `a` as invalid traffic of reason `reason` (`rules::Reason::index`). With
    /// `a.late` the invalid cell's version moves (a retroactive move changes what a valid
    /// query answered before, like a late correction).
    pub fn apply_invalid(&mut self, reason: usize, a: &Applied) {
        if self.invalid.is_empty() {
            let sealed_before = self.sealed_before;
            self.invalid = (0..crate::rules::N_REASONS)
                .map(|_| ShardState {
                    sealed_before,
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
    pub fn evict(&mut self, level: usize, before_ms: i64) {
        let before_ms = bucket(before_ms, level);
        if level == 0 {
            self.seal(before_ms);
        }
        self.levels[level].evict(before_ms);
        for s in &mut self.invalid {
            s.evict(level, before_ms);
        }
    }

    /// What `ad` counted in the bucket of `level` starting at `start`: the bucket's cell
    /// and, above the minute level, the cells of its minutes not yet sealed into it. Sum
    /// them (each click is in exactly one).
    pub fn parts(&self, level: usize, ad: u64, start: i64) -> impl Iterator<Item = CellRef<'_>> {
        let own = self.cell(level, ad, start);
        let unsealed = (level > 0).then(|| {
            let from = start.max(self.sealed_before);
            let to = start.saturating_add(LEVEL_MS[level]);
            let m = &self.levels[0];
            m.buckets
                .range(from..to.max(from))
                .filter_map(move |(_, cells)| {
                    cells.get(&ad).map(|cell| CellRef {
                        cell,
                        slab: &m.sketches,
                    })
                })
        });
        own.into_iter().chain(unsealed.into_iter().flatten())
    }

    /// The cell of `ad` at `level` starting at `start` (above the minute level: only what
    /// is sealed; see [`ShardState::parts`]).
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
            for (ad, cell) in cells {
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
        if minute_ms < self.sealed_before {
            let mut ids: Vec<u32> = old.iter().map(|c| c.0).collect();
            ids.extend(combos.iter().map(|c| c.0));
            ids.sort_unstable();
            ids.dedup();
            for level in 1..3 {
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
        if let Some(cell) = l.buckets.get_mut(&minute_ms).and_then(|b| b.remove(&ad)) {
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
        let levels = if minute_ms < self.sealed_before { 3 } else { 1 };
        for level in 0..levels {
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
        for b in pb.invalid {
            let mut sub = ShardState::from_bytes(&b, intern)?;
            // Invalid states seal with their shard.
            sub.sealed_before = s.sealed_before;
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

    proptest! {
        /// Per-combination clicks and distinct users of every cell match a brute-force model,
        /// through the inline -> sketch transition, a checkpoint round trip and eviction.
        #[test]
        fn cells_match_a_model(
            clicks in proptest::collection::vec((0u64..4, 0i64..180, 1u32..5, 0u64..6), 1..300),
            seal_minute in 0i64..180,
            seal_after in 0usize..300,
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
                let t = t0 + minute * 60_000 + 7;
                let h = splitmix(user);
                s.apply(&Applied {
                    ad, advertiser: 1, campaign: 1, event_time_ms: t, combo, dims: DimKey::default(),
                    user: if user == 0 { 0 } else { Hll::entry_of_hash(h) },
                    late: false,
                });
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
