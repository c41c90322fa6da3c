//! Readers never wait for the writer, and the writer never waits for readers: the top-N
//! indexes of a shard (a [`TopSet`]: unfiltered and per filter value) are published
//! read-copy-update style. Readers take the current copy from an [`ArcSwap`] (an `Arc`
//! clone, no lock) and query it for as long as they like; a TopAds query never touches a
//! lock the writer takes (except a filter over several fields, which checks exact counts
//! in the cells). The cells (GetAdClicks) are still read under the shard's read-write lock.
//!
//! The shard thread applies each change to its own copy, and publishes by swapping that
//! copy in: the click is in TopAds at once (the shard publishes before it confirms,
//! `engine::shard_loop`). The copy it gets back, published before, is brought level at its
//! next change, whichever way is cheaper ([`COPY_FACTOR`]): by [`TopSet::sync_from`],
//! which shares the frozen parts and copies only the segments changed since, each into
//! the buffers it already has (a plain copy of a node's table: no hashing, no allocation
//! while its size holds), or by replaying the changes logged since (then `sync_from`
//! only picks up the freeze pass's frozen parts, and clones the value indexes created in
//! the interval: each has a lineage of its own). At large publishes (a saturated shard)
//! the copy wins and a click is applied once, not once per copy: until issue 13's
//! eleventh pass the writer always replayed, and that second application (cache misses in
//! a second set of nodes) cost more than the copy; at small frequent publishes the replay
//! wins. If a reader still holds the copy to bring level (a TopAds query that outlived a
//! publish interval), the writer clones the current one instead (it never waits, and
//! TopAds stays fresh); the held copy is freed when its reader lets go. So a copy is held
//! twice, plus once per such query still running: each query holds one.
//!
//! Clicks are not applied one by one: the adds pushed between two other ops (a batch: up
//! to the next seal, eviction or publish; the shard thread publishes once per run of queued
//! batches, `engine::PUBLISH_EVERY_CLICKS`) are grouped per index and minute by a counting
//! sort and summed per ad through a small hash table (Zipf traffic repeats ads within a
//! batch), so a node is probed for a run of ads back to back. The grouping allocates
//! nothing per batch: its buffers are kept. Adds commute with each other but not with a
//! seal or an eviction, so they are never summed across one.
//!
//! Memory is not held twice for most of the index: after each seal the writer's copy
//! freezes its sealed minutes and builds the lists of the hours just completed
//! ([`TopSet::freeze_due`]); a frozen part is immutable (later clicks go to the segment's
//! live part) and shared by every copy made since, so a reader holding one copy never sees
//! it change. Only the live parts (the minutes still taking clicks, late deltas) are held
//! twice.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::FastMap;
use super::topset::{ClickKeys, FilterKey, TopSet};

/// One change to a top-N index.
#[derive(Debug, Clone)]
pub enum TopOp {
    /// `by` clicks for `ad` in minute index `minute`.
    Add {
        /// Ad.
        ad: u64,
        /// Minute index (ms / 60 000).
        minute: i64,
        /// Clicks.
        by: u64,
        /// The clicks' dimensions and owners (which value indexes they go to).
        keys: ClickKeys,
    },
    /// [`TopSet::seal`] before this minute index.
    Seal(i64),
    /// [`TopSet::evict_before`] this minute index.
    Evict(i64),
}

/// Clicks grouped per index and minute, summed per ad: what [`TopWriter`] applies at once.
#[derive(Debug, Clone, Default)]
struct AddBatch {
    /// `(index, minute, start, end)`: `adds[start..end]` go to minute `minute` of `index`
    /// (`None`: the unfiltered index).
    groups: Vec<(Option<FilterKey>, i64, u32, u32)>,
    /// `(ad, clicks)`, each ad once per group.
    adds: Vec<(u64, u64)>,
}

/// The adds pushed since the last other op, already split into rows per index as they
/// are pushed (no per-click copy of the click's keys), and the scratch space that groups
/// them: every buffer is kept across batches (cleared, not freed), as is the
/// [`AddBatch`] it fills, so grouping a batch allocates nothing.
#[derive(Debug, Default)]
struct Grouper {
    /// Value indexes numbered per batch (0: the unfiltered index, `names[0]`).
    number: FastMap<FilterKey, u32>,
    /// A direct-mapped cache in front of `number` (slot by [`recent_slot`]): each click
    /// numbers one key per value index, and a probe of the map was ~3% of the apply path.
    /// Emptied with `number`; a slot holds `None` or a key of this batch.
    recent: Vec<Option<(FilterKey, u32)>>,
    names: Vec<Option<FilterKey>>,
    /// The batch's minutes (a batch spans one or two, plus late clicks) in order of
    /// appearance, and the last one looked up.
    minutes: Vec<i64>,
    last: (i64, u32),
    /// `(index number, minute number, ad, clicks)`, one per index a click goes to.
    rows: Vec<(u32, u32, u64, u64)>,
    /// Counting-sort scratch.
    starts: Vec<u32>,
    next: Vec<u32>,
    sorted: Vec<(u64, u64)>,
    /// Summing scratch: an open-addressing table of positions + 1 in the batch's adds,
    /// and the random key of its hash (crafted ad ids cannot chain a batch's probes).
    table: Vec<u32>,
    seed: u64,
}

impl Grouper {
    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Records `by` clicks of `ad` in `minute`, for the unfiltered index and each of `keys`.
    fn push(&mut self, ad: u64, minute: i64, by: u64, keys: impl Iterator<Item = FilterKey>) {
        if by == 0 {
            return;
        }
        if self.rows.is_empty() {
            // First add of a batch: the numbering starts over.
            self.number.clear();
            self.recent.clear();
            self.recent.resize(RECENT_SLOTS, None);
            self.names.clear();
            self.names.push(None);
            self.minutes.clear();
            self.last = (i64::MIN, 0);
        }
        let m = if minute == self.last.0 && !self.minutes.is_empty() {
            self.last.1
        } else {
            let m = match self.minutes.iter().position(|&x| x == minute) {
                Some(p) => p as u32,
                None => {
                    self.minutes.push(minute);
                    (self.minutes.len() - 1) as u32
                }
            };
            self.last = (minute, m);
            m
        };
        self.rows.push((0, m, ad, by));
        for k in keys {
            let names = &mut self.names;
            let slot = recent_slot(&k);
            let t = match self.recent.get(slot).copied().flatten() {
                Some((key, t)) if key == k => t,
                _ => {
                    let t = *self.number.entry(k).or_insert_with(|| {
                        names.push(Some(k));
                        (names.len() - 1) as u32
                    });
                    if let Some(r) = self.recent.get_mut(slot) {
                        *r = Some((k, t));
                    }
                    t
                }
            };
            self.rows.push((t, m, ad, by));
        }
    }

    /// Groups the rows per index and minute, summing the clicks of an ad, into `b`
    /// (cleared first), and starts a new batch: a counting sort of the batch by group,
    /// then within each group a pass through a small hash table (a few KB, in cache) that
    /// sums an ad's rows in its first one, instead of a probe of a big map per click.
    /// (One sort of all the rows by (index, minute, ad) cost twice as much: three rows per
    /// click, compared as tuples; a sort by ad within each group, a third more.)
    fn take_into(&mut self, b: &mut AddBatch) {
        if self.seed == 0 {
            self.seed = RandomState::new().build_hasher().finish() | 1;
        }
        b.groups.clear();
        b.adds.clear();
        let width = self.minutes.len();
        let groups = self.names.len() * width;
        self.starts.clear();
        self.starts.resize(groups + 1, 0);
        for r in &self.rows {
            self.starts[r.0 as usize * width + r.1 as usize + 1] += 1;
        }
        for g in 1..self.starts.len() {
            self.starts[g] += self.starts[g - 1];
        }
        self.next.clear();
        self.next.extend_from_slice(&self.starts);
        self.sorted.clear();
        self.sorted.resize(self.rows.len(), (0, 0));
        for r in &self.rows {
            let g = r.0 as usize * width + r.1 as usize;
            self.sorted[self.next[g] as usize] = (r.2, r.3);
            self.next[g] += 1;
        }
        self.rows.clear();
        b.adds.reserve(self.sorted.len());
        for g in 0..groups {
            let run = &self.sorted[self.starts[g] as usize..self.starts[g + 1] as usize];
            if run.is_empty() {
                continue;
            }
            let start = b.adds.len();
            if run.len() == 1 {
                b.adds.extend_from_slice(run);
            } else {
                // Load at most 1/2: few probes, and a miss stops at an empty slot soon.
                let bits = (run.len() * 2).next_power_of_two().trailing_zeros();
                self.table.clear();
                self.table.resize(1 << bits, 0);
                let mask = (1usize << bits) - 1;
                for &(ad, by) in run.iter() {
                    let mut i = (mix(self.seed, ad) >> (64 - bits)) as usize;
                    loop {
                        match self.table[i] {
                            0 => {
                                b.adds.push((ad, by));
                                self.table[i] = (b.adds.len() - start) as u32;
                                break;
                            }
                            p => {
                                let slot = &mut b.adds[start + p as usize - 1];
                                if slot.0 == ad {
                                    slot.1 = slot.1.saturating_add(by);
                                    break;
                                }
                            }
                        }
                        i = (i + 1) & mask;
                    }
                }
            }
            let start = start as u32;
            let index = self.names.get(g / width).copied().flatten();
            b.groups
                .push((index, self.minutes[g % width], start, b.adds.len() as u32));
        }
    }
}

/// Slots of [`Grouper::recent`] (a power of two).
const RECENT_SLOTS: usize = 256;

/// The [`Grouper::recent`] slot of `k`: its value multiplied by an odd constant (the top
/// bits), a different offset per field. Only a cache: collisions cost a map probe.
fn recent_slot(k: &FilterKey) -> usize {
    let (field, v) = match *k {
        FilterKey::Country(c) => (0u64, u64::from(u16::from_be_bytes(c))),
        FilterKey::Device(d) => (1, u64::from(d)),
        FilterKey::Os(o) => (2, u64::from(o)),
        FilterKey::Site(x) => (3, u64::from(x)),
        FilterKey::Advertiser(a) => (4, a),
        FilterKey::Campaign(c) => (5, c),
    };
    let h = (v ^ field.rotate_right(3)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - RECENT_SLOTS.trailing_zeros())) as usize
}

/// The murmur3 finalizer of `seed ^ x`.
fn mix(seed: u64, x: u64) -> u64 {
    let mut x = seed ^ x;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

impl AddBatch {
    /// Adds to the unfiltered index.
    fn unfiltered_adds(&self) -> usize {
        self.groups
            .iter()
            .filter(|g| g.0.is_none())
            .map(|g| (g.3 - g.2) as usize)
            .sum()
    }

    fn apply(&self, idx: &mut TopSet) {
        for &(index, minute, start, end) in &self.groups {
            if let Some(adds) = self.adds.get(start as usize..end as usize) {
                idx.add_run(index, minute, adds);
            }
        }
    }
}

fn apply(idx: &mut TopSet, op: &TopOp) {
    match op {
        TopOp::Add {
            ad,
            minute,
            by,
            keys,
        } => idx.add(*ad, *minute, *by, keys),
        TopOp::Seal(m) => idx.seal(*m),
        TopOp::Evict(m) => idx.evict_before(*m),
    }
}

/// The writer's side (owned by the shard thread); readers hold the [`ArcSwap`].
#[derive(Debug)]
pub struct TopWriter {
    /// The copy the writer updates (empty while `behind`).
    next: TopSet,
    /// Set by a publish: the copy to bring level at the next change (see [`Behind`]).
    behind: Option<Behind>,
    /// What was applied to `next` since the last publish, in order: replayed into the
    /// copy published before it when that is cheaper than copying ([`SyncMode`]).
    log: Vec<Logged>,
    /// Copy instead of replaying once the log's adds to the unfiltered index times this
    /// reach its live cells ([`COPY_FACTOR`]).
    copy_factor: usize,
    /// Changes were applied to the next copy since the last publish.
    changed: bool,
    /// A seal was pushed since the last freeze pass.
    freeze_pending: bool,
    /// The adds pushed since the last other op: applied as one grouped batch before the
    /// next other op, or at the next publish. Zipf traffic repeats ads within a batch, and
    /// grouped per index and minute, the probes of one node run back to back.
    pending: Grouper,
    /// Batches already replayed, kept for their buffers.
    spare: Vec<AddBatch>,
}

/// One change applied to the writer's copy, as logged for a replay.
#[derive(Debug)]
enum Logged {
    Adds(AddBatch),
    Op(TopOp),
}

/// How the copy published before the current one is brought level with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncMode {
    /// Replay the changes logged between the two publishes (adds, seals, evictions), then
    /// [`TopSet::sync_from`] for what the freeze pass changed (frozen parts, shared).
    Replay,
    /// [`TopSet::sync_from`] alone: every segment changed since copied.
    Copy,
}

/// A publish's leftovers: the copy published before (readers may still hold it), the one
/// just published, and how to bring the first level with the second.
#[derive(Debug)]
struct Behind {
    old: Arc<TopSet>,
    current: Arc<TopSet>,
    log: Vec<Logged>,
    sync: SyncMode,
}

/// Replaying an add costs a probe of a node (often a cache miss), copying a node costs
/// its bytes (~13 per cell, streamed): about ten cells copied for one add replayed. A
/// sync copies when the adds to replay reach 1/`COPY_FACTOR` of the live cells: the apply
/// bench's 20,000-click publishes copy, a pipeline's small frequent ones replay (copying
/// every live minute at each of them took 1.04 aggregator cores at 200k clicks/s where
/// the replay takes 0.81).
pub const COPY_FACTOR: usize = 8;

impl TopWriter {
    /// Starts from `index`, published in a new [`ArcSwap`] for readers.
    pub fn new(index: TopSet) -> (Self, ArcSwap<TopSet>) {
        Self::with_copy_factor(index, COPY_FACTOR)
    }

    /// [`TopWriter::new`] with another [`COPY_FACTOR`] (0: always replay; `usize::MAX`:
    /// always copy; tests draw all of them).
    pub fn with_copy_factor(mut index: TopSet, copy_factor: usize) -> (Self, ArcSwap<TopSet>) {
        index.freeze_due();
        let shared = ArcSwap::from_pointee(index.clone());
        let w = TopWriter {
            next: index,
            behind: None,
            log: Vec::new(),
            copy_factor,
            changed: false,
            freeze_pending: false,
            pending: Grouper::default(),
            spare: Vec::new(),
        };
        (w, shared)
    }

    /// Either copy (for what every copy has: the value-index fields).
    fn any(&self) -> &TopSet {
        match &self.behind {
            Some(b) => &b.current,
            None => &self.next,
        }
    }

    /// The next copy, brought up to date first if it is behind.
    fn next_mut(&mut self) -> &mut TopSet {
        if let Some(Behind {
            old,
            current,
            log,
            sync,
        }) = self.behind.take()
        {
            self.next = match Arc::try_unwrap(old) {
                Ok(mut set) => {
                    if sync == SyncMode::Replay {
                        for l in &log {
                            match l {
                                Logged::Adds(b) => b.apply(&mut set),
                                Logged::Op(op) => apply(&mut set, op),
                            }
                        }
                    }
                    set.sync_from(&current);
                    set
                }
                // A reader still holds it: it is freed when the reader lets go.
                Err(_) => TopSet::clone(&current),
            };
            self.spare.extend(log.into_iter().filter_map(|l| match l {
                Logged::Adds(b) => Some(b),
                Logged::Op(_) => None,
            }));
        }
        &mut self.next
    }

    /// Records a change (visible to readers after the next [`TopWriter::publish`]).
    pub fn push(&mut self, op: TopOp) {
        if let TopOp::Add {
            ad,
            minute,
            by,
            keys,
        } = op
        {
            // Adds commute with each other, not with seals or evictions: they are summed
            // only between two other ops.
            let keys = self.any().keys_of(&keys);
            self.pending.push(ad, minute, by, keys);
            return;
        }
        self.flush_adds();
        self.freeze_pending |= matches!(op, TopOp::Seal(_));
        apply(self.next_mut(), &op);
        self.log.push(Logged::Op(op));
        self.changed = true;
    }

    /// Applies the pending adds, grouped, and logs them.
    fn flush_adds(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut batch = self.spare.pop().unwrap_or_default();
        self.pending.take_into(&mut batch);
        batch.apply(self.next_mut());
        self.log.push(Logged::Adds(batch));
        self.changed = true;
    }

    /// Whether every change pushed is visible to readers.
    pub fn is_published(&self) -> bool {
        !self.changed && self.pending.is_empty()
    }

    /// Makes every change pushed so far visible in `shared`. Never waits for readers: the
    /// copy they see is replaced, not changed.
    pub fn publish(&mut self, shared: &ArcSwap<TopSet>) {
        if self.is_published() {
            return;
        }
        self.flush_adds();
        // The replay's size: the log's adds to the unfiltered index.
        let adds: usize = self
            .log
            .iter()
            .map(|l| match l {
                Logged::Adds(b) => b.unfiltered_adds(),
                Logged::Op(_) => 0,
            })
            .sum();
        let (factor, freeze) = (self.copy_factor, std::mem::take(&mut self.freeze_pending));
        let next = self.next_mut();
        let sync = match factor {
            0 => SyncMode::Replay,
            usize::MAX => SyncMode::Copy,
            f if adds.saturating_mul(f) >= next.all.live_len() => SyncMode::Copy,
            _ => SyncMode::Replay,
        };
        if freeze {
            // Once per seal (a minute): the frozen parts are then shared by every copy.
            next.freeze_due();
        }
        let current = Arc::new(std::mem::take(next));
        let old = shared.swap(current.clone());
        self.behind = Some(Behind {
            old,
            current,
            log: std::mem::take(&mut self.log),
            sync,
        });
        self.changed = false;
    }

    /// Replaces every copy with `index` (rebuilt from the cells after a repair): readers
    /// see the old index until the swap, the new one after, never a mix.
    pub fn reset(&mut self, mut index: TopSet, shared: &ArcSwap<TopSet>) {
        index.freeze_due();
        shared.store(Arc::new(index.clone()));
        self.next = index;
        self.behind = None;
        self.log.clear();
        self.changed = false;
        self.freeze_pending = false;
        self.pending = Grouper::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::topset::{FilterKey, IndexField};
    use proptest::prelude::*;

    fn add(ad: u64, minute: i64, country: u8) -> TopOp {
        let mut keys = ClickKeys::default();
        keys.dims.country = [b'A' + country, b'A'];
        TopOp::Add {
            ad,
            minute,
            by: 1,
            keys,
        }
    }

    /// Sealed minutes are frozen once and shared by both copies; a late click into a frozen
    /// minute shows in the next snapshot, not in the one a reader already holds, and does
    /// not copy the frozen part.
    #[test]
    fn frozen_minutes_are_shared_and_late_clicks_reach_the_next_snapshot_only() {
        let (mut w, shared) = TopWriter::new(TopSet::with_fields(&[IndexField::Country]));
        // Minutes 0..5, ad a has a+1 clicks per minute, in country a % 2.
        for m in 0..5 {
            for a in 0..6u64 {
                for _ in 0..=a {
                    w.push(add(a, m, (a % 2) as u8));
                }
            }
        }
        w.push(TopOp::Seal(4));
        w.publish(&shared);
        let frozen = shared.load().frozen_parts();
        // Minutes 0..4 of the unfiltered index and of the two countries.
        assert_eq!(frozen.len(), 12, "{frozen:?}");
        // The next change brings the writer's copy level, frozen parts shared.
        w.push(add(0, 4, 0));
        w.push(TopOp::Seal(4));
        assert_eq!(
            w.next.frozen_parts(),
            frozen,
            "both copies share every frozen part"
        );
        w.publish(&shared);
        assert!(shared.load().frozen_bytes() > 0);

        let old = shared.load_full();
        let us = |s: &TopSet| {
            s.index(FilterKey::Country([b'A', b'A']))
                .map(|i| i.top(3, 0, 5))
        };
        assert_eq!(old.all.top(2, 0, 5), vec![(5, 30), (4, 25)]);
        assert_eq!(us(&old), Some(vec![(4, 25), (2, 15), (0, 6)]));
        // Late clicks into frozen minute 1: ad 0 jumps from 6 to 30 clicks.
        for _ in 0..24 {
            w.push(add(0, 1, 0));
        }
        w.publish(&shared);
        let new = shared.load_full();
        assert_eq!(new.all.top(2, 0, 5), vec![(0, 30), (5, 30)]);
        assert_eq!(new.all.count(0, 1, 2), 25);
        assert_eq!(us(&new), Some(vec![(0, 30), (4, 25), (2, 15)]));
        // The snapshot held before is unchanged.
        assert_eq!(old.all.top(2, 0, 5), vec![(5, 30), (4, 25)]);
        assert_eq!(old.all.count(0, 1, 2), 1);
        assert_eq!(us(&old), Some(vec![(4, 25), (2, 15), (0, 6)]));
        // Nothing frozen was copied: the late clicks sit in the new copy's live part.
        assert_eq!(new.frozen_parts(), frozen);
        assert_eq!(old.frozen_parts(), frozen);
        // `old` is the copy the writer syncs next: while a reader holds it, the writer
        // clones the current one instead; `old` stays as its reader saw it.
        w.push(add(3, 4, 1));
        w.publish(&shared);
        assert_eq!(old.all.count(3, 0, 5), 20);
        drop(old);
        w.push(add(3, 4, 1));
        w.publish(&shared);
        assert_eq!(shared.load().all.top(2, 0, 5), vec![(0, 30), (5, 30)]);
        assert_eq!(shared.load().all.count(3, 0, 5), 22);
    }

    proptest! {
        /// A grouped batch holds, per index and minute, each ad once with the sum of its
        /// clicks, and nothing else; the grouper's buffers start over for the next batch.
        /// Up to ~400 advertisers per batch: more keys than the numbering cache's slots, so
        /// slots are shared and overwritten.
        #[test]
        fn grouped_adds_sum_per_index_minute_and_ad(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u64..20, 0i64..4, 0u64..3, 0u8..3, 0u64..2000), 0..400),
                1..4,
            )
        ) {
            use std::collections::{BTreeMap, BTreeSet};
            let set = TopSet::with_fields(&[IndexField::Country, IndexField::Advertiser]);
            let mut g = Grouper::default();
            let mut b = AddBatch::default();
            for clicks in batches {
                let mut want: BTreeMap<(String, i64, u64), u64> = BTreeMap::new();
                for &(ad, minute, by, c, adv) in &clicks {
                    let mut keys = ClickKeys { advertiser: adv, ..ClickKeys::default() };
                    keys.dims.country = [b'A' + c, b'A'];
                    g.push(ad, minute, by, set.keys_of(&keys));
                    if by == 0 {
                        continue;
                    }
                    for k in std::iter::once(None).chain(set.keys_of(&keys).map(Some)) {
                        *want.entry((format!("{k:?}"), minute, ad)).or_default() += by;
                    }
                }
                prop_assert_eq!(g.is_empty(), want.is_empty());
                g.take_into(&mut b);
                prop_assert!(g.is_empty());
                let mut got: BTreeMap<(String, i64, u64), u64> = BTreeMap::new();
                let mut groups = BTreeSet::new();
                for &(index, minute, start, end) in &b.groups {
                    prop_assert!(groups.insert((format!("{index:?}"), minute)), "one group per index and minute");
                    prop_assert!(start < end);
                    for &(ad, by) in &b.adds[start as usize..end as usize] {
                        prop_assert!(by > 0);
                        let old = got.insert((format!("{index:?}"), minute, ad), by);
                        prop_assert!(old.is_none(), "each ad once per group");
                    }
                }
                prop_assert_eq!(got, want);
            }
        }

        /// Whatever readers hold and whenever they let go, a publish shows exactly the
        /// index a single copy fed the same changes would be (the writer's copies brought
        /// level by a replay of the log or by a copy, or cloned when a reader holds the one
        /// to sync), and a held copy never changes under its reader.
        #[test]
        fn publishes_what_one_copy_would_hold(
            steps in proptest::collection::vec(
                (0u64..5, 0i64..150, any::<bool>(), any::<bool>(), 0u8..20, 0u8..3),
                1..200,
            ),
            copy_factor in prop_oneof![Just(0usize), Just(1), Just(COPY_FACTOR), Just(usize::MAX)],
        ) {
            let (mut w, shared) = TopWriter::with_copy_factor(TopSet::new(), copy_factor);
            let mut model = TopSet::new();
            // Ranges over minutes only, and over the hour lists (hours 0 and 1 complete
            // once minute 120 is sealed).
            let ranges = [(0, 30), (0, 150), (60, 120), (30, 130)];
            // Copies readers hold, with the answer they saw when they took them.
            type Held = (Arc<TopSet>, Vec<(u64, u64)>);
            let mut held: Vec<Held> = Vec::new();
            for (ad, minute, hold, release, kind, skip) in steps {
                let op = match kind {
                    0 => TopOp::Seal(minute),
                    1 => TopOp::Evict(minute / 3),
                    _ => {
                        let mut keys = ClickKeys { advertiser: ad % 2, ..ClickKeys::default() };
                        keys.dims.country = [b'A' + kind % 2, b'A'];
                        TopOp::Add { ad, minute, by: u64::from(kind % 3) + 1, keys }
                    }
                };
                apply(&mut model, &op);
                w.push(op);
                if hold {
                    let snap = shared.load_full();
                    let seen = snap.all.top(10, 0, 150);
                    held.push((snap, seen));
                }
                if release && !held.is_empty() {
                    held.remove(0);
                }
                // Two steps in three publish; otherwise the adds are summed across the
                // seals and evictions of the next steps (one batch) before the next publish.
                if skip == 0 {
                    continue;
                }
                w.publish(&shared);
                prop_assert!(w.is_published());
                for (f, t) in ranges {
                    prop_assert_eq!(shared.load().all.top(10, f, t), model.all.top(10, f, t));
                    let adv = |s: &TopSet| s.index(FilterKey::Advertiser(1)).map(|i| i.top(10, f, t));
                    prop_assert_eq!(adv(&shared.load()), adv(&model));
                    for c in [b'A', b'B'] {
                        let k = FilterKey::Country([c, b'A']);
                        let top = |s: &TopSet| s.index(k).map_or(Vec::new(), |i| i.top(10, f, t));
                        prop_assert_eq!(top(&shared.load()), top(&model));
                    }
                    for a in 0..5 {
                        prop_assert_eq!(shared.load().all.count(a, f, t), model.all.count(a, f, t));
                    }
                }
                // On some steps, bring the writer's next copy level at once (replay, copy
                // or clone, whichever applies) and compare it with the published one whole.
                if ad % 2 == 0 {
                    let current = shared.load_full();
                    prop_assert_eq!(w.next_mut().state_for_test(), current.state_for_test());
                }
                for (snap, seen) in &held {
                    prop_assert_eq!(&snap.all.top(10, 0, 150), seen);
                }
            }
            held.clear();
            w.publish(&shared);
            prop_assert_eq!(shared.load().all.top(10, 0, 150), model.all.top(10, 0, 150));
            let adv = |s: &TopSet| s.index(FilterKey::Advertiser(1)).map(|i| i.top(10, 0, 150));
            prop_assert_eq!(adv(&shared.load()), adv(&model));
            let current = shared.load_full();
            prop_assert_eq!(w.next_mut().state_for_test(), current.state_for_test());
        }
    }
}
