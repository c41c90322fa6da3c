//! Exact, incrementally maintained top-N index over per-minute click counts.
//!
//! This is the unfiltered `TopAds(n, [from, to))` index of the click
//! aggregator: it counts clicks per `(ad, minute)` and answers "the `n` ads
//! with the most clicks summed over a minute range" exactly (ties broken by
//! the smaller ad id, ads with zero clicks in the range never appear) without
//! scanning every ad. It must NOT: approximate (no sketches, no sampling),
//! decrease counts except through [`TopIndex::evict_before`], know about
//! filters (country, ...; handled elsewhere), do I/O, or use anything but `std`.
//!
//! # Layout
//!
//! Every minute that has clicks owns a `Node`: a hash map `ad -> count`
//! plus the ads grouped into *count buckets* (the Space-Saving "stream
//! summary" idea). Buckets are exact for counts below 32 and log-linear above
//! (16 buckets per power of two, so a bucket spans at most 1/16 of its lower
//! edge). An increment therefore moves an ad between buckets only while its
//! count is small or when it crosses a 6.25 % step: a hot ad with millions of
//! clicks per minute touches its bucket about 8 times per doubling, not per
//! click, and the bucket table is a plain `Vec` (at most 976 entries) instead
//! of an ordered map. Buckets are append-only (see `Node`): an ad that moves up is pushed
//! onto its new bucket and left, stale, in the old one, which readers skip for free (they
//! have already seen the ad in its real, higher bucket). An increment is one hash lookup
//! plus, when the bucket changes, a push at a bucket's end; stale entries are dropped by
//! a rebuild once they outnumber the ads (O(1) amortized). Before (a per-ad position
//! kept exact with `swap_remove`) a move cost four lookups, two of them cache misses,
//! and for the long tail (counts below 32, one bucket each) every click moves.
//!
//! With the hour level on ([`TopIndex::new`]) every complete hour (all its minutes
//! sealed) also gets a list, the sum of its 60 minutes, so a range is covered by whole
//! hours plus the partial minutes at its edges: at most 118 minute lists plus one per hour
//! instead of one per minute. An hour's list is built once, frozen, from its minutes by
//! the first freeze pass after it completes; late clicks to it then go to its live part as
//! to a minute's. The hour being filled has no list: a range never covers it whole before
//! it is complete, so its minutes answer (as they did when it was maintained click by
//! click at seal time). [`TopIndex::minutes_only`] keeps no hour lists, for when long ranges are
//! rare.
//!
//! # Frozen segments (memory)
//!
//! A minute (or hour) is a *segment*: an optional [`Frozen`] part plus a live `Node`
//! (the ad's count is the sum of both). Once a minute is sealed, a freeze pass
//! ([`TopIndex::freeze_due`], run once per seal) merges its live node into an immutable
//! [`Frozen`] list: ads sorted by count with run-length encoded counts and a `u32`
//! lookup table with 8-bit tags, ~10 bytes per ad (14 for ids of 2^32 and up) instead of
//! the ~37 of a node (~20 while its ads fit in 32 bits). A late click to a frozen
//! minute goes to the segment's (small, new) live node; the live part is merged into a
//! new frozen part once it reaches 1/8 of it. A complete hour's late clicks are merged the
//! same way.
//!
//! The frozen part is shared by `Arc` between the copies of an index that the published
//! writer keeps (`super::published`): [`TopIndex::sync_from`] brings one copy level with
//! another by sharing frozen parts and copying only the segments changed since (their
//! live parts), so only the live parts (the minutes still taking clicks, and late deltas)
//! are held twice. Readers never see a frozen part change: nothing writes to one after it
//! is built.
//!
//! Eviction drops an hour as soon as it loses a minute (its live minutes answer for
//! it), so a frozen hour never needs a subtraction.
//!
//! # Query: Fagin's Threshold Algorithm, with bucket bounds
//!
//! The lists covering the range (each segment gives one or two: frozen and live) are
//! read by *sorted access*, one *run* at a time (a live node's count bucket, a frozen
//! list's ads of one exact count), always from the
//! list whose current bucket has the highest upper bound; each newly seen ad
//! gets its exact range sum by *random access* (a lookup in every list), and
//! the best `n` are kept in a bounded heap. The threshold `T` is the sum over
//! lists of the upper bound of the bucket being read (0 once a list is
//! exhausted).
//!
//! Why it is exact: every bucket above the one being read is fully consumed,
//! so an ad not yet seen has, in each list, either no entry or a count no
//! larger than that list's current bucket bound; its range sum is therefore
//! at most `T`. The search stops when `n` ads are held and the `n`-th best
//! exact sum is *strictly* greater than `T` (strict, because an unseen ad with
//! sum equal to `T` could win the tie on a smaller id), or when every list is
//! exhausted (then every ad with clicks in the range was seen). All sums that
//! are reported come from random access, never from bounds.
//!
//! Bucket bounds instead of exact frontier values loosen `T` by at most 1/16,
//! which only costs a little extra depth, never exactness.
//!
//! # Complexity
//!
//! `add`: O(1) expected (a B-tree lookup over the minute keys and one hash lookup; a
//! late click to a built hour, one more of each); `add_run` shares the minute lookup
//! among the ads of one minute, and looks up each chunk of 16 ads before adding them
//! (independent lookups whose cache misses overlap; the adds then hit the cache). A new
//! minute's node is sized like the minute before it (map and buckets), so it is not
//! rehashed or regrown as it fills. `top`: with `k` lists and `d` sorted
//! accesses before the stop, O(d log k + c·k) hash lookups for `c <= d`
//! distinct candidates; on skewed (Zipf) data `d` is a small multiple of `n`
//! per list. On flat data the threshold falls slowly, so the query carries a
//! work budget equal to the number of cells in the range: once sorted plus
//! random accesses exceed it, it switches to one exact aggregation pass over
//! those cells. A query thus never costs more than about twice a plain scan of
//! its range, and on skewed data it costs far less. `count`: O(k). Eviction:
//! O(1) per dropped segment. Freezing: O(c log c) for a segment of `c` ads, once per
//! minute, and once per hour for the hour's list (a pass over its minutes' cells).
//!
//! # Limits
//!
//! Counts saturate at `u64::MAX` (centuries at any plausible click rate);
//! results are exact while sums stay below it. A single list holds fewer than
//! 2^32 ads. Adds to minutes already evicted are ignored.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

/// Minutes per aggregated hour node.
const HOUR: i64 = 60;

/// Counts below this value get one bucket each; they dominate real data (the
/// long tail) and exact small buckets keep ties at low counts cheap to bound.
const EXACT_BUCKETS: u64 = 32;

/// Log2 of the number of buckets per power of two above `EXACT_BUCKETS`.
const SUB_BITS: u32 = 4;

/// Sentinel in a [`Slot`]: the real count lives in [`Counts::big`].
const BIG: u32 = u32::MAX;

/// Bucket index of a non-zero count (0 is reserved for "absent").
fn bucket_of(count: u64) -> usize {
    if count < EXACT_BUCKETS {
        return count as usize;
    }
    // `e >= 5` because count >= 32; the top SUB_BITS+1 bits pick the bucket.
    let e = 63 - count.leading_zeros();
    let sub = (count >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    EXACT_BUCKETS as usize + ((e - 5) as usize) * (1 << SUB_BITS) + sub as usize
}

/// Largest count that maps to bucket `b`: the per-list bound used by the
/// threshold.
fn bucket_max(b: usize) -> u64 {
    if (b as u64) < EXACT_BUCKETS {
        return b as u64;
    }
    let rel = b - EXACT_BUCKETS as usize;
    let e = (rel >> SUB_BITS) as u32 + 5;
    let sub = (rel & ((1 << SUB_BITS) - 1)) as u64;
    let shift = e - SUB_BITS;
    // No overflow: for e = 63 this is (32 << 59) - 1 = u64::MAX.
    (((1 << SUB_BITS) + sub) << shift) + ((1u64 << shift) - 1)
}

/// Fast hasher for `u64` keys: a keyed murmur3 finalizer. SipHash would
/// dominate the add path; a per-index random key keeps crafted ad ids from
/// being steered into one probe chain.
#[derive(Clone, Copy)]
struct Seeded(u64);

impl Seeded {
    fn random() -> Self {
        Seeded(RandomState::new().build_hasher().finish())
    }
}

impl BuildHasher for Seeded {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(self.0)
    }
}

/// Hasher built by [`Seeded`]; only `u64` and `u32` keys are hashed in this module.
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        // Generic fallback, unused for u64 keys but required by the trait.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 ^= x;
    }
    fn write_u32(&mut self, x: u32) {
        self.0 ^= u64::from(x);
    }
}

type Map<V> = HashMap<u64, V, Seeded>;

/// Per-ad count of a node: the real count, or [`BIG`] when it lives in [`Counts::big`].
type Slot = u32;

/// An ad id as a node stores it: `u32` while every ad of the node fits (ad ids are
/// usually small integers), halving the node's map slots and bucket entries (and with
/// them the cache lines the add path touches), else `u64`.
trait AdKey: Copy + Eq + std::hash::Hash + Into<u64> + TryFrom<u64> + fmt::Debug {}
impl AdKey for u32 {}
impl AdKey for u64 {}

/// Counts of one minute (or one hour) with the ads grouped by count bucket: a [`Counts`]
/// keyed by `u32` until an ad of 2^32 or more arrives, then by `u64` (converted once).
#[derive(Clone)]
enum Node {
    Narrow(Counts<u32>),
    Wide(Counts<u64>),
}

/// Calls `$body` with `$c` bound to the node's [`Counts`], whatever its key width.
macro_rules! counts {
    ($node:expr, $c:ident => $body:expr) => {
        match $node {
            Node::Narrow($c) => $body,
            Node::Wide($c) => $body,
        }
    };
}

impl Node {
    /// A node sized as one holding `ads` ads whose bucket `b` took `buckets[b]` entries
    /// ([`Counts::shaped`]), narrow until a wide ad arrives. Always narrow, even shaped
    /// like a wide node: where ad ids are 64-bit each new node is converted once, at its
    /// first click (one copy of an empty table per minute and index), while starting wide
    /// after a wide minute would make one stray 64-bit id stick to every later minute.
    fn shaped(seed: Seeded, ads: usize, buckets: &[usize]) -> Self {
        Node::Narrow(Counts::shaped(seed, ads, buckets))
    }

    #[cfg(test)]
    fn is_wide(&self) -> bool {
        matches!(self, Node::Wide(_))
    }

    fn len(&self) -> usize {
        counts!(self, c => c.slots.len())
    }

    fn get(&self, ad: u64) -> u64 {
        counts!(self, c => c.get(ad))
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (n, w) = match self {
            Node::Narrow(c) => (Some(c), None),
            Node::Wide(c) => (None, Some(c)),
        };
        n.into_iter()
            .flat_map(Counts::iter)
            .chain(w.into_iter().flat_map(Counts::iter))
    }

    /// Adds `by > 0` clicks of `ad`, widening the node first if `ad` needs 64 bits.
    fn add(&mut self, ad: u64, by: u64) {
        match self {
            Node::Wide(c) => c.add(ad, by),
            Node::Narrow(c) => match u32::try_from(ad) {
                Ok(a) => c.add(a, by),
                Err(_) => {
                    let mut wide = c.widen();
                    wide.add(ad, by);
                    *self = Node::Wide(wide);
                }
            },
        }
    }

    #[inline]
    fn warm(&self, adds: &[(u64, u64)]) {
        counts!(self, c => c.warm(adds))
    }

    fn next_bucket(&self, below: usize) -> Option<usize> {
        counts!(self, c => c.next_bucket(below))
    }

    /// The ads of bucket `b` (stale entries included).
    fn bucket(&self, b: usize) -> Ads<'_> {
        match self {
            Node::Narrow(c) => Ads::Narrow(c.buckets.get(b).map_or(&[][..], |v| &v[..])),
            Node::Wide(c) => Ads::Wide(c.buckets.get(b).map_or(&[][..], |v| &v[..])),
        }
    }

    fn shape(&self) -> Vec<usize> {
        counts!(self, c => c.buckets.iter().map(Vec::len).collect())
    }

    fn heap_bytes(&self) -> usize {
        counts!(self, c => c.heap_bytes())
    }

    /// Makes this node equal to `src` ([`Counts::sync_from`]).
    fn sync_from(&mut self, src: &Node) {
        match (self, src) {
            (Node::Narrow(d), Node::Narrow(s)) => d.sync_from(s),
            (Node::Wide(d), Node::Wide(s)) => d.sync_from(s),
            (d, s) => *d = s.clone(),
        }
    }
}

/// The counts of a [`Node`] with ads stored as `K`.
///
/// The buckets are append-only: an ad whose count leaves its bucket is pushed onto its
/// new bucket and left behind in the old one (a *stale* entry). Counts in a node only
/// grow, so an ad is in the bucket of its count exactly once and stale entries sit only in
/// lower buckets. A reader of a bucket meets a stale ad after it has read the ad's real
/// (higher) bucket: the Threshold Algorithm has already seen it, and its bound argument
/// only needs every ad to be in its real bucket. An add is thus one hash lookup plus, on a
/// bucket change, a push at a bucket's (cache-hot) end: no position to maintain, no other
/// ad to move. Once stale entries outnumber the ads, the buckets are rebuilt from the
/// counts (O(1) amortized per add).
#[derive(Clone)]
struct Counts<K> {
    slots: HashMap<K, Slot, Seeded>,
    buckets: Vec<Vec<K>>,
    /// Entries in `buckets` whose ad has moved on to a higher bucket.
    stale: usize,
    /// Exact counts of the (rare) ads whose count reached `u32::MAX`.
    big: Map<u64>,
}

impl<K: AdKey> Counts<K> {
    /// Counts sized as ones holding `ads` ads whose bucket `b` took `buckets[b]` entries.
    /// A new minute is shaped like the minute before it, so neither its map (some 15 times
    /// as the minute fills, in each copy) nor its buckets grow while it takes about as
    /// many ads as that one.
    fn shaped(seed: Seeded, ads: usize, buckets: &[usize]) -> Self {
        let buckets: Vec<Vec<K>> = if ads == 0 {
            Vec::new()
        } else {
            buckets.iter().map(|&n| Vec::with_capacity(n)).collect()
        };
        Counts {
            slots: HashMap::with_capacity_and_hasher(ads, seed),
            buckets,
            stale: 0,
            big: HashMap::with_hasher(seed),
        }
    }

    fn resolve(&self, ad: K, slot: Slot) -> u64 {
        if slot == BIG {
            self.big.get(&ad.into()).copied().unwrap_or(u64::from(BIG))
        } else {
            u64::from(slot)
        }
    }

    fn get(&self, ad: u64) -> u64 {
        let Ok(k) = K::try_from(ad) else {
            return 0;
        };
        self.slots.get(&k).map_or(0, |s| self.resolve(k, *s))
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots
            .iter()
            .map(move |(&ad, &s)| (ad.into(), self.resolve(ad, s)))
    }

    /// Adds `by > 0` clicks of `ad`.
    fn add(&mut self, ad: K, by: u64) {
        use std::collections::hash_map::Entry;
        let (old, new) = match self.slots.entry(ad) {
            Entry::Occupied(mut o) => {
                let slot = o.get_mut();
                let old = if *slot == BIG {
                    self.big.get(&ad.into()).copied().unwrap_or(u64::from(BIG))
                } else {
                    u64::from(*slot)
                };
                let new = old.saturating_add(by);
                if new >= u64::from(BIG) {
                    *slot = BIG;
                    self.big.insert(ad.into(), new);
                } else {
                    *slot = new as u32;
                }
                (old, new)
            }
            Entry::Vacant(v) => {
                let new = by;
                if new >= u64::from(BIG) {
                    v.insert(BIG);
                    self.big.insert(ad.into(), new);
                } else {
                    v.insert(new as u32);
                }
                (0, new)
            }
        };
        if new == 0 {
            return;
        }
        let b = bucket_of(new);
        if old != 0 && bucket_of(old) == b {
            return;
        }
        if old != 0 {
            self.stale += 1;
        }
        if self.buckets.len() <= b {
            self.buckets.resize_with(b + 1, Vec::new);
        }
        self.buckets[b].push(ad);
        if self.stale > self.slots.len() + 64 {
            self.rebuild_buckets();
        }
    }

    /// Looks up every ad of `adds` and changes nothing: independent lookups, whose cache
    /// misses the CPU overlaps, so that the adds that follow (each dependent on its lookup
    /// through the bucket it picks) find their slots in cache instead of missing one after
    /// the other. A node of a busy minute is a few MB, two of them per index (one per
    /// published copy): most probes would miss.
    #[inline]
    fn warm(&self, adds: &[(u64, u64)]) {
        if self.slots.is_empty() {
            return;
        }
        let mut acc = 0u32;
        for &(ad, _) in adds {
            if let Ok(k) = K::try_from(ad) {
                acc = acc.wrapping_add(self.slots.get(&k).copied().unwrap_or(0));
            }
        }
        std::hint::black_box(acc);
    }

    /// Makes these counts equal to `src`, reusing this one's allocations: a table of the
    /// same size is copied whole (plain bytes: keys and counts are `Copy`), each bucket
    /// into its own buffer.
    fn sync_from(&mut self, src: &Self) {
        self.slots.clone_from(&src.slots);
        self.buckets.clone_from(&src.buckets);
        self.stale = src.stale;
        self.big.clone_from(&src.big);
    }

    /// Drops the stale entries: every ad once, in the bucket of its count.
    fn rebuild_buckets(&mut self) {
        for b in &mut self.buckets {
            b.clear();
        }
        for (&ad, &s) in &self.slots {
            let c = self.resolve(ad, s);
            // c > 0: an ad is only in `slots` with clicks, and `buckets` already reaches
            // the bucket of its count.
            if let Some(bucket) = self.buckets.get_mut(bucket_of(c)) {
                bucket.push(ad);
            }
        }
        self.stale = 0;
    }

    /// Highest non-empty bucket strictly below `below`.
    fn next_bucket(&self, below: usize) -> Option<usize> {
        let end = below.min(self.buckets.len());
        self.buckets[..end].iter().rposition(|b| !b.is_empty())
    }

    fn heap_bytes(&self) -> usize {
        map_bytes(&self.slots)
            + map_bytes(&self.big)
            + self.buckets.capacity() * size_of::<Vec<K>>()
            + self
                .buckets
                .iter()
                .map(|b| b.capacity() * size_of::<K>())
                .sum::<usize>()
    }
}

impl Counts<u32> {
    /// The same counts keyed by `u64` (the node's first ad of 2^32 or more): every
    /// entry, stale ones included, with the same capacities.
    fn widen(&mut self) -> Counts<u64> {
        let mut slots =
            HashMap::with_capacity_and_hasher(self.slots.capacity(), *self.slots.hasher());
        slots.extend(self.slots.drain().map(|(ad, s)| (u64::from(ad), s)));
        Counts {
            slots,
            buckets: self
                .buckets
                .iter()
                .map(|b| {
                    let mut w = Vec::with_capacity(b.capacity());
                    w.extend(b.iter().map(|&ad| u64::from(ad)));
                    w
                })
                .collect(),
            stale: self.stale,
            big: {
                let seed = *self.big.hasher();
                std::mem::replace(&mut self.big, HashMap::with_hasher(seed))
            },
        }
    }
}

/// Heap bytes of a `HashMap` (hashbrown: power-of-two buckets at 7/8 load,
/// one control byte per bucket plus one SIMD group).
fn map_bytes<K, V>(m: &HashMap<K, V, Seeded>) -> usize {
    let cap = m.capacity();
    let buckets = match cap {
        0 => return 0,
        1..8 => (cap + 1).next_power_of_two(),
        _ => (cap / 7 * 8).next_power_of_two(),
    };
    buckets * (size_of::<(K, V)>() + 1) + 16
}

/// The murmur3 finalizer of `seed ^ x`: what [`MixHasher`] computes for one `u64`.
fn mix(seed: u64, x: u64) -> u64 {
    let mut h = MixHasher(seed);
    h.write_u64(x);
    h.finish()
}

/// An immutable list: the counts of one sealed minute (or one complete hour) once late
/// clicks have mostly stopped, ~10 bytes per ad (14 when an id needs 64 bits) instead of
/// the ~37 of a [`Node`] (~20 while its ads fit in 32 bits), and
/// shared by `Arc` between the copies of the index the published writer keeps (`super::published`):
/// neither copy ever changes it, later clicks go to the segment's live [`Node`].
///
/// Layout: the ads sorted by count, most first, in `ads` (`u32`s while every id fits);
/// the counts run-length encoded
/// in `runs` (distinct counts are few: the long tail has counts 1, 2, 3...); a lookup
/// table of positions (open addressing at load 0.8, linear probing, `u32`) for random
/// access. Sorted access reads a run at a time with its exact count as the bound, which
/// is tighter than a [`Node`]'s bucket bound.
pub struct Frozen {
    ads: AdVec,
    /// `(count, end)`: run `r` is `ads[runs[r - 1].1..runs[r].1]`, every ad with `count`
    /// clicks; counts strictly decreasing.
    runs: Box<[(u64, u32)]>,
    /// Position + 1 in `ads` (0: empty slot).
    table: Box<[u32]>,
    /// Per slot, 8 bits of the ad's hash: a probe reads `ads` (a cache miss) only on a tag
    /// match. Most lookups are misses (an ad is in few of the lists a query reads), and
    /// linear probing at load 0.8 passes ~13 slots on a miss: sequential in `table` and
    /// `tags`, random in `ads`.
    tags: Box<[u8]>,
    seed: u64,
}

impl fmt::Debug for Frozen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frozen")
            .field("ads", &self.ads.len())
            .field("runs", &self.runs.len())
            .finish()
    }
}

impl Frozen {
    /// From `(ad, count)` pairs, each ad at most once; zero counts are left out.
    fn build(mut entries: Vec<(u64, u64)>, seed: u64) -> Frozen {
        entries.retain(|e| e.1 > 0);
        // Ties in any order: a run is read as a whole.
        entries.sort_unstable_by_key(|e| Reverse(e.1));
        let n = entries.len();
        debug_assert!(n < u32::MAX as usize);
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for (i, &(_, c)) in entries.iter().enumerate() {
            match runs.last_mut() {
                Some(r) if r.0 == c => r.1 = i as u32 + 1,
                _ => runs.push((c, i as u32 + 1)),
            }
        }
        // Ad ids below 2^32 (the common case) take 4 bytes instead of 8.
        let ads = if entries.iter().all(|e| e.0 <= u64::from(u32::MAX)) {
            AdVec::Narrow(entries.iter().map(|e| e.0 as u32).collect())
        } else {
            AdVec::Wide(entries.iter().map(|e| e.0).collect())
        };
        drop(entries);
        let cap = (n + n / 4 + 1).max(1);
        let mut table = vec![0u32; cap].into_boxed_slice();
        let mut tags = vec![0u8; cap].into_boxed_slice();
        let mut f = Frozen {
            ads,
            runs: runs.into_boxed_slice(),
            table: Box::new([]),
            tags: Box::new([]),
            seed,
        };
        for (pos, ad) in f.ads.all().iter().enumerate() {
            let (mut i, tag) = f.slot_of(ad, cap);
            while table[i] != 0 {
                i = if i + 1 == cap { 0 } else { i + 1 };
            }
            table[i] = pos as u32 + 1;
            tags[i] = tag;
        }
        f.table = table;
        f.tags = tags;
        f
    }

    /// Home slot of `ad` in a table of `cap` slots (multiply-shift range reduction on the
    /// high bits: the table need not be a power of two, so its load stays near 0.8) and
    /// its tag (the low 8 bits).
    fn slot_of(&self, ad: u64, cap: usize) -> (usize, u8) {
        let h = mix(self.seed, ad);
        (((u128::from(h) * cap as u128) >> 64) as usize, h as u8)
    }

    fn len(&self) -> usize {
        self.ads.len()
    }

    fn count_at(&self, pos: usize) -> u64 {
        let r = self.runs.partition_point(|&(_, end)| end as usize <= pos);
        self.runs.get(r).map_or(0, |r| r.0)
    }

    fn get(&self, ad: u64) -> u64 {
        let cap = self.table.len();
        let (mut i, tag) = self.slot_of(ad, cap);
        loop {
            let p = self.table[i];
            if p == 0 {
                return 0;
            }
            if self.tags[i] == tag {
                let pos = p as usize - 1;
                if self.ads.at(pos) == ad {
                    return self.count_at(pos);
                }
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
        }
    }

    /// Ads of run `r` and their count.
    fn run(&self, r: usize) -> (Ads<'_>, u64) {
        let start = r.checked_sub(1).map_or(0, |p| self.runs[p].1 as usize);
        let (count, end) = self.runs[r];
        (self.ads.slice(start, end as usize), count)
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..self.runs.len()).flat_map(move |r| {
            let (ads, c) = self.run(r);
            ads.iter().map(move |ad| (ad, c))
        })
    }

    fn heap_bytes(&self) -> usize {
        // The Arc's counts and the struct itself.
        16 + size_of::<Frozen>()
            + self.ads.bytes()
            + self.runs.len() * size_of::<(u64, u32)>()
            + self.table.len() * 5
    }
}

/// The ads of a frozen list: 4 bytes each while every id fits a `u32`.
enum AdVec {
    Narrow(Box<[u32]>),
    Wide(Box<[u64]>),
}

impl AdVec {
    fn len(&self) -> usize {
        match self {
            AdVec::Narrow(v) => v.len(),
            AdVec::Wide(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            AdVec::Narrow(v) => v.len() * 4,
            AdVec::Wide(v) => v.len() * 8,
        }
    }

    fn at(&self, i: usize) -> u64 {
        match self {
            AdVec::Narrow(v) => u64::from(v[i]),
            AdVec::Wide(v) => v[i],
        }
    }

    fn slice(&self, from: usize, to: usize) -> Ads<'_> {
        match self {
            AdVec::Narrow(v) => Ads::Narrow(&v[from..to]),
            AdVec::Wide(v) => Ads::Wide(&v[from..to]),
        }
    }

    fn all(&self) -> Ads<'_> {
        self.slice(0, self.len())
    }
}

/// A run of ads as sorted access reads it.
#[derive(Clone, Copy)]
enum Ads<'a> {
    Narrow(&'a [u32]),
    Wide(&'a [u64]),
}

impl<'a> Ads<'a> {
    fn get(self, i: usize) -> Option<u64> {
        match self {
            Ads::Narrow(v) => v.get(i).map(|&a| u64::from(a)),
            Ads::Wide(v) => v.get(i).copied(),
        }
    }

    fn iter(self) -> impl Iterator<Item = u64> + 'a {
        let (n, w): (&'a [u32], &'a [u64]) = match self {
            Ads::Narrow(v) => (v, &[]),
            Ads::Wide(v) => (&[], v),
        };
        n.iter().map(|&a| u64::from(a)).chain(w.iter().copied())
    }
}

/// `(ads, entries per bucket)`: how to size a new live part ([`Node::shaped`]).
type Shape = (usize, Vec<usize>);

/// One minute (or hour) of an index: its frozen part, shared between the published copies,
/// plus what was added since it was frozen (every click of a minute not yet frozen).
/// An ad's count is the sum of both; the Threshold Algorithm reads them as two lists.
#[derive(Clone, Default)]
struct Seg {
    frozen: Option<Arc<Frozen>>,
    live: Option<Box<Node>>,
    /// The index's [`TopIndex::version`] when this segment last changed: what
    /// [`TopIndex::sync_from`] compares to skip segments that did not.
    version: u64,
}

impl Seg {
    /// Makes this segment equal to `src`, a later state of it: the frozen part shared, the
    /// live part copied into this one's allocations (no hashing, no allocation while the
    /// shapes match).
    fn sync_from(&mut self, src: &Seg) {
        if self.version == src.version {
            return;
        }
        self.version = src.version;
        self.frozen.clone_from(&src.frozen);
        match (&mut self.live, &src.live) {
            (Some(d), Some(s)) => d.sync_from(s),
            (d, s) => d.clone_from(s),
        }
    }

    fn live_len(&self) -> usize {
        self.live.as_ref().map_or(0, |n| n.len())
    }

    fn frozen_len(&self) -> usize {
        self.frozen.as_ref().map_or(0, |f| f.len())
    }

    /// Adds `by` clicks of `ad`, creating the live part shaped by `shape` if it has none
    /// ([`Node::shaped`]); true when the live part was empty before (the segment has just
    /// become a candidate for freezing).
    fn add_sized(&mut self, ad: u64, by: u64, seed: Seeded, shape: &Shape) -> bool {
        let live = self
            .live
            .get_or_insert_with(|| Box::new(Node::shaped(seed, shape.0, &shape.1)));
        let was_empty = live.len() == 0;
        live.add(ad, by);
        was_empty
    }

    /// [`Seg::add_sized`] for each nonzero `(ad, by)`; true when one of them found the
    /// live part empty. A live part it creates is shaped by `shape`. The ads go in chunks
    /// of [`WARM_CHUNK`], each warmed first ([`Node::warm`]).
    fn add_run(&mut self, adds: &[(u64, u64)], seed: Seeded, shape: &Shape) -> bool {
        let mut fresh = false;
        for chunk in adds.chunks(WARM_CHUNK) {
            if let Some(live) = self.live.as_deref() {
                live.warm(chunk);
            }
            for &(ad, by) in chunk {
                if by > 0 {
                    fresh |= self.add_sized(ad, by, seed, shape);
                }
            }
        }
        fresh
    }

    /// Its lists, for queries (an empty live part is no list).
    fn push_lists<'a>(&'a self, out: &mut Vec<List<'a>>) {
        if let Some(f) = &self.frozen {
            out.push(List::Frozen(f));
        }
        if let Some(n) = self.live.as_deref()
            && n.len() > 0
        {
            out.push(List::Live(n));
        }
    }

    /// Every ad with its total count, each once.
    fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let frozen = self.frozen.as_deref();
        let live = self.live.as_deref();
        let from_frozen = frozen.into_iter().flat_map(move |f| {
            f.iter()
                .map(move |(ad, c)| (ad, c.saturating_add(live.map_or(0, |n| n.get(ad)))))
        });
        let only_live = live.into_iter().flat_map(move |n| {
            n.iter()
                .filter(move |&(ad, _)| frozen.is_none_or(|f| f.get(ad) == 0))
        });
        from_frozen.chain(only_live)
    }

    /// Number of ads with clicks.
    fn len(&self) -> usize {
        match (&self.frozen, self.live.as_deref()) {
            (None, None) => 0,
            (None, Some(n)) => n.len(),
            (Some(f), None) => f.len(),
            (Some(f), Some(n)) => f.len() + n.iter().filter(|&(ad, _)| f.get(ad) == 0).count(),
        }
    }

    /// What a live part shaped like this segment's holds: its ads and its buckets'
    /// entries (only the ads when it is frozen).
    fn shape(&self) -> Shape {
        match self.live.as_deref() {
            Some(n) => (n.len() + self.frozen_len(), n.shape()),
            None => (self.frozen_len(), vec![0, self.frozen_len()]),
        }
    }

    /// Merges the live part into a new frozen part.
    fn freeze(&mut self, seed: u64) {
        let entries: Vec<(u64, u64)> = match (&self.frozen, self.live.as_deref()) {
            // A minute's first freeze: its node's cells, collected at their exact count.
            (None, Some(n)) => n.iter().collect(),
            _ => {
                let mut v = Vec::with_capacity(self.frozen_len() + self.live_len());
                v.extend(self.entries());
                v
            }
        };
        self.frozen = Some(Arc::new(Frozen::build(entries, seed)));
        self.live = None;
    }

    fn heap_bytes(&self) -> usize {
        self.frozen.as_ref().map_or(0, |f| f.heap_bytes())
            + self
                .live
                .as_ref()
                .map_or(0, |n| size_of::<Node>() + n.heap_bytes())
    }
}

/// [`Seg::sync_from`] for the segments of `src`: a map of the same keys is synced in place,
/// pairwise (the usual case: no minute started or left since); else segments `src` lacks
/// are dropped and those it adds are cloned.
fn sync_segs(dst: &mut BTreeMap<i64, Seg>, src: &BTreeMap<i64, Seg>) {
    if dst.len() == src.len() && dst.keys().eq(src.keys()) {
        for (d, s) in dst.values_mut().zip(src.values()) {
            d.sync_from(s);
        }
        return;
    }
    dst.retain(|k, _| src.contains_key(k));
    for (k, s) in src {
        match dst.get_mut(k) {
            Some(d) => d.sync_from(s),
            None => {
                dst.insert(*k, s.clone());
            }
        }
    }
}

/// One list as the Threshold Algorithm reads it: runs of ads in non-increasing order of
/// count, each with an upper bound on the counts in it and below.
#[derive(Clone, Copy)]
enum List<'a> {
    /// A mutable list: runs are its count buckets, bounds the buckets' upper edges.
    Live(&'a Node),
    /// A frozen list: runs are exact counts.
    Frozen(&'a Frozen),
}

impl<'a> List<'a> {
    fn len(self) -> usize {
        match self {
            List::Live(n) => n.len(),
            List::Frozen(f) => f.len(),
        }
    }

    fn get(self, ad: u64) -> u64 {
        match self {
            List::Live(n) => n.get(ad),
            List::Frozen(f) => f.get(ad),
        }
    }

    fn iter(self) -> impl Iterator<Item = (u64, u64)> + 'a {
        let (live, frozen) = match self {
            List::Live(n) => (Some(n), None),
            List::Frozen(f) => (None, Some(f)),
        };
        live.into_iter()
            .flat_map(|n| n.iter())
            .chain(frozen.into_iter().flat_map(|f| f.iter()))
    }

    /// The run after `r` (`None`: the first), `None` when the list is exhausted.
    fn next_run(self, r: Option<usize>) -> Option<usize> {
        match self {
            List::Live(n) => n.next_bucket(r.unwrap_or(usize::MAX)),
            List::Frozen(f) => {
                let next = r.map_or(0, |r| r + 1);
                (next < f.runs.len()).then_some(next)
            }
        }
    }

    /// The ads of run `r` and the bound on their counts.
    fn run(self, r: usize) -> (Ads<'a>, u64) {
        match self {
            List::Live(n) => (n.bucket(r), bucket_max(r)),
            List::Frozen(f) => f.run(r),
        }
    }
}

/// The `n` best `(sum, ad)` seen so far; the heap top is the worst of them.
struct Best {
    n: usize,
    heap: BinaryHeap<(Reverse<u64>, u64)>,
}

impl Best {
    fn new(n: usize) -> Self {
        // `n` comes from the caller; do not let it size an allocation.
        Best {
            n,
            heap: BinaryHeap::with_capacity(n.min(1024)),
        }
    }

    fn offer(&mut self, sum: u64, ad: u64) {
        if sum == 0 {
            return;
        }
        if self.heap.len() < self.n {
            self.heap.push((Reverse(sum), ad));
        } else if let Some(&(Reverse(ws), wa)) = self.heap.peek()
            && (sum > ws || (sum == ws && ad < wa))
        {
            self.heap.pop();
            self.heap.push((Reverse(sum), ad));
        }
    }

    /// The `n`-th best sum once `n` ads are held.
    fn nth_sum(&self) -> Option<u64> {
        if self.heap.len() < self.n {
            return None;
        }
        self.heap.peek().map(|&(Reverse(s), _)| s)
    }

    fn into_sorted(self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .heap
            .into_iter()
            .map(|(Reverse(s), a)| (a, s))
            .collect();
        v.sort_unstable_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        v
    }
}

/// Sorted-access position in one list.
#[derive(Clone, Copy)]
struct Cursor {
    run: usize,
    pos: usize,
}

/// Ads of a run warmed together before they are added ([`Node::warm`]): enough
/// independent cache misses in flight to fill the CPU's miss buffers, few enough that the
/// lines are still in L1 when the adds reach them.
const WARM_CHUNK: usize = 16;

/// A live part at least 1/`DELTA_SHARE` the size of its segment's frozen part gets merged
/// into a new frozen part at the next freeze pass (late clicks into an old minute).
const DELTA_SHARE: usize = 8;

/// Where a frozen part goes: the segment of an hour or of a minute, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegKey {
    /// An hour segment (key `minute.div_euclid(60)`), else a minute.
    pub hour: bool,
    /// Minute index, or hour index.
    pub start: i64,
}

/// Exact, incrementally maintained top-N index over per-minute click counts.
///
/// See the module documentation for the algorithm and why it is exact.
#[derive(Clone)]
pub struct TopIndex {
    minutes: BTreeMap<i64, Seg>,
    /// Aggregates keyed by `minute.div_euclid(60)`; empty when the hour
    /// level is off. Only hours whose every minute is live are kept: the hour containing
    /// the eviction point is dropped, its remaining minutes answer for it.
    hours: BTreeMap<i64, Seg>,
    hour_level: bool,
    /// Minutes below this were evicted; adds to them are ignored.
    evicted_before: i64,
    /// Minutes below this are sealed: their counts are in their hour aggregates too. An add
    /// to an unsealed minute touches only its minute list (the per-click path); the hour
    /// gets the minute's counts, per ad not per click, when [`TopIndex::seal`] passes it.
    sealed_before: i64,
    /// Segments whose live part is not empty: what [`TopIndex::freeze_due`] looks at.
    dirty: BTreeSet<SegKey>,
    seed: Seeded,
    /// Which index this is a copy of (unique per [`TopIndex::new`], kept by `clone`), and
    /// how many changes it has taken: two copies of one lineage at one version hold the
    /// same counts ([`TopIndex::sync_from`]).
    lineage: u64,
    version: u64,
}

/// The next [`TopIndex::lineage`].
static LINEAGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Default for TopIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TopIndex {
    // A full dump of millions of cells is useless in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopIndex")
            .field("minutes", &self.minutes.len())
            .field("cells", &self.cell_count())
            .field("hour_level", &self.hour_level)
            .field("evicted_before", &self.evicted_before)
            .finish()
    }
}

/// `ceil(m / 60)`: the first hour starting at or after minute `m`.
fn first_hour_from(m: i64) -> i64 {
    m.div_euclid(HOUR) + i64::from(m.rem_euclid(HOUR) != 0)
}

impl TopIndex {
    /// An empty index with per-minute and per-hour lists (fast long ranges,
    /// about twice the memory of [`TopIndex::minutes_only`] on long-tail data).
    pub fn new() -> Self {
        Self::with_hour_level(true)
    }

    /// An empty index with per-minute lists only (least memory; a range of
    /// `k` minutes reads `k` lists).
    pub fn minutes_only() -> Self {
        Self::with_hour_level(false)
    }

    fn with_hour_level(hour_level: bool) -> Self {
        TopIndex {
            minutes: BTreeMap::new(),
            hours: BTreeMap::new(),
            hour_level,
            evicted_before: i64::MIN,
            sealed_before: i64::MIN,
            dirty: BTreeSet::new(),
            seed: Seeded::random(),
            lineage: LINEAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            version: 0,
        }
    }

    /// Counts a change: the version the changed segments take.
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Makes this index equal to `src`, which must be a later state of this very copy
    /// when both have one lineage (the published writer's copies: one is published, the
    /// other took no change since it was last level with it): then only the segments that
    /// changed since are copied ([`Seg::sync_from`]): the live minutes, into the
    /// allocations they already have; frozen parts are shared. Of another lineage, a plain
    /// clone. (Two clones that each took changes may reach one version with different
    /// counts: that is why this is not `pub`.)
    pub(crate) fn sync_from(&mut self, src: &TopIndex) {
        if self.lineage != src.lineage {
            *self = src.clone();
            return;
        }
        debug_assert!(self.version <= src.version, "syncing from an older copy");
        if self.version == src.version {
            return;
        }
        sync_segs(&mut self.minutes, &src.minutes);
        sync_segs(&mut self.hours, &src.hours);
        // `hour_level` and `seed` are fixed per lineage.
        self.evicted_before = src.evicted_before;
        self.sealed_before = src.sealed_before;
        self.dirty.clone_from(&src.dirty);
        self.version = src.version;
    }

    /// The first hour that may have an hour segment: hours before it lost minutes to
    /// eviction.
    fn first_live_hour(&self) -> i64 {
        first_hour_from(self.evicted_before)
    }

    /// Adds `by` clicks to `(ad, minute)`. `by == 0` and minutes already
    /// evicted (below the last [`TopIndex::evict_before`]) are ignored.
    pub fn add(&mut self, ad: u64, minute: i64, by: u64) {
        self.add_run(minute, &[(ad, by)]);
    }

    /// [`TopIndex::add`] of each `(ad, clicks)` pair, all in minute index `minute`: one
    /// lookup of the minute for all of them, and back-to-back probes of its node, whose
    /// cache misses the CPU overlaps.
    pub fn add_run(&mut self, minute: i64, adds: &[(u64, u64)]) {
        if minute < self.evicted_before || adds.iter().all(|a| a.1 == 0) {
            return;
        }
        let seed = self.seed;
        // A minute after every other one (the next minute of traffic) is shaped like the
        // last one: about as many ads click in it, about as often.
        let shape = match self.minutes.last_key_value() {
            Some((&last, seg)) if last < minute => seg.shape(),
            _ => (0, Vec::new()),
        };
        let version = self.bump();
        let seg = self.minutes.entry(minute).or_default();
        seg.version = version;
        if seg.add_run(adds, seed, &shape) {
            self.dirty.insert(SegKey {
                hour: false,
                start: minute,
            });
        }
        // An hour segment exists only once its hour is complete (sealed) and built: the
        // minutes still taking clicks never reach this lookup.
        if minute < self.sealed_before {
            let hour = minute.div_euclid(HOUR);
            if let Some(seg) = self.hours.get_mut(&hour)
                && {
                    seg.version = version;
                    seg.add_run(adds, seed, &(0, Vec::new()))
                }
            {
                self.dirty.insert(SegKey {
                    hour: true,
                    start: hour,
                });
            }
        }
    }

    /// Seals every minute below `before`: they may be frozen, and an hour whose minutes
    /// are all sealed gets its hour segment at the next [`TopIndex::freeze_due`]. Never
    /// moves backwards.
    pub fn seal(&mut self, before: i64) {
        if before > self.sealed_before {
            self.sealed_before = before;
            self.bump();
        }
    }

    /// Builds the frozen segment of every complete hour (all its minutes sealed, none
    /// evicted) that has clicks but no segment yet, from the counts of its minutes: once
    /// per hour, instead of adding every minute's counts to a live hour node as the minutes
    /// are sealed.
    /// Whether it built one. New segments get `version`.
    fn build_hours(&mut self, version: u64) -> bool {
        if !self.hour_level {
            return false;
        }
        let first = self.first_live_hour();
        let end = self.sealed_before.div_euclid(HOUR);
        if first >= end {
            return false;
        }
        // Saturating bounds only widen the range; the hour filter below is exact.
        let (m0, m1) = (first.saturating_mul(HOUR), end.saturating_mul(HOUR));
        let mut todo: Vec<i64> = Vec::new();
        for &m in self.minutes.range(m0..m1).map(|(m, _)| m) {
            let h = m.div_euclid(HOUR);
            if (first..end).contains(&h) && todo.last() != Some(&h) && !self.hours.contains_key(&h)
            {
                todo.push(h);
            }
        }
        let mut built = false;
        for h in todo {
            let (Some(hm0), Some(hm1)) = (
                h.checked_mul(HOUR),
                h.checked_add(1).and_then(|e| e.checked_mul(HOUR)),
            ) else {
                // Next to i64::MIN/MAX: no hour segment, its minutes answer for it.
                continue;
            };
            built = true;
            let mut sums: Map<u64> = HashMap::with_hasher(self.seed);
            for (_, seg) in self.minutes.range(hm0..hm1) {
                for (ad, c) in seg.entries() {
                    let s = sums.entry(ad).or_insert(0);
                    *s = s.saturating_add(c);
                }
            }
            let frozen = Arc::new(Frozen::build(sums.into_iter().collect(), self.seed.0));
            self.hours.insert(
                h,
                Seg {
                    frozen: Some(frozen),
                    live: None,
                    version,
                },
            );
        }
        built
    }

    /// Freezes the segments that are due (see [`Frozen`]): sealed minutes, and complete
    /// hours' late clicks, with their live part merged in once it is 1/[`DELTA_SHARE`] of
    /// the frozen part; builds the segments of hours just completed. The copies of this
    /// index made later ([`TopIndex::sync_from`]) share the frozen parts.
    pub fn freeze_due(&mut self) {
        // The version of what this pass changes, counted only if it changes something (a
        // sync then skips the indexes with nothing to freeze).
        let version = self.version + 1;
        let mut changed = self.build_hours(version);
        let seed = self.seed.0;
        let dirty = self.dirty.len();
        for key in std::mem::take(&mut self.dirty) {
            let map = if key.hour {
                &mut self.hours
            } else {
                &mut self.minutes
            };
            let Some(seg) = map.get_mut(&key.start) else {
                continue;
            };
            let (live, frozen) = (seg.live_len(), seg.frozen_len());
            if live == 0 {
                continue;
            }
            // Hour segments exist only for complete hours.
            let complete = key.hour || key.start < self.sealed_before;
            if complete && live.saturating_mul(DELTA_SHARE) >= frozen {
                seg.version = version;
                seg.freeze(seed);
                changed = true;
            } else {
                self.dirty.insert(key);
            }
        }
        // Keys of segments gone or empty leave the dirty set: a change too.
        if changed || self.dirty.len() != dirty {
            self.version = version;
        }
    }

    /// Exact top `n` over minutes `[from, to)`: `(ad, clicks)`, most clicks
    /// first, ties by smaller ad id; ads with 0 clicks in the range never
    /// appear. Empty when `n == 0` or `from >= to`.
    pub fn top(&self, n: usize, from: i64, to: i64) -> Vec<(u64, u64)> {
        top_of(&[self], n, from, to)
    }

    /// Clicks of one ad over minutes `[from, to)`.
    pub fn count(&self, ad: u64, from: i64, to: i64) -> u64 {
        self.lists(from, to)
            .iter()
            .fold(0u64, |acc, l| acc.saturating_add(l.get(ad)))
    }

    /// Forgets all minutes `< before` (retention). Later adds to them are
    /// ignored. A `before` not above the previous one is a no-op.
    pub fn evict_before(&mut self, before: i64) {
        if before <= self.evicted_before {
            return;
        }
        // Evicted minutes are always sealed.
        self.seal(before);
        self.bump();
        self.evicted_before = before;
        self.minutes = self.minutes.split_off(&before);
        // The hour containing `before` goes too when it loses some minutes (its live
        // minutes answer for it): no subtraction, so frozen hours never change.
        self.hours = self.hours.split_off(&self.first_live_hour());
        self.dirty = self.dirty.split_off(&SegKey {
            hour: false,
            start: before,
        });
        let first_hour = self.first_live_hour();
        self.dirty.retain(|k| !k.hour || k.start >= first_hour);
    }

    /// Everything a copy must agree on, for tests comparing copies: minute and hour keys,
    /// every cell with its count per segment, the seal, eviction and freeze candidates.
    #[cfg(test)]
    pub(crate) fn state_for_test(&self) -> String {
        let segs = |m: &BTreeMap<i64, Seg>| -> Vec<(i64, Vec<(u64, u64)>)> {
            m.iter()
                .map(|(k, s)| {
                    let mut e: Vec<_> = s.entries().collect();
                    e.sort_unstable();
                    (*k, e)
                })
                .collect()
        };
        format!(
            "minutes {:?} hours {:?} sealed {} evicted {} dirty {:?} hour_level {}",
            segs(&self.minutes),
            segs(&self.hours),
            self.sealed_before,
            self.evicted_before,
            self.dirty,
            self.hour_level
        )
    }

    /// Cells in live parts (the minutes taking clicks, late deltas): what a copy of the
    /// index's changed segments copies, about.
    pub fn live_len(&self) -> usize {
        self.dirty
            .iter()
            .filter_map(|k| {
                if k.hour {
                    self.hours.get(&k.start)
                } else {
                    self.minutes.get(&k.start)
                }
            })
            .map(Seg::live_len)
            .sum()
    }

    /// Approximate heap bytes held by the index (maps, buckets, B-tree
    /// entries); query-time scratch space is not included. A frozen part shared with the
    /// other published copy is counted in both.
    pub fn heap_bytes(&self) -> usize {
        // B-tree nodes hold up to 11 entries; assume ~2/3 full.
        let tree_entry = size_of::<(i64, Seg)>() * 3 / 2;
        self.minutes
            .values()
            .chain(self.hours.values())
            .map(|n| n.heap_bytes() + tree_entry)
            .sum::<usize>()
            + self.dirty.len() * size_of::<SegKey>() * 3 / 2
    }

    /// Heap bytes of the frozen parts only (shared between the copies the published writer keeps).
    pub fn frozen_bytes(&self) -> usize {
        self.minutes
            .values()
            .chain(self.hours.values())
            .filter_map(|s| s.frozen.as_ref())
            .map(|f| f.heap_bytes())
            .sum()
    }

    /// The frozen parts by segment, as addresses (tests check what the copies share).
    #[cfg(test)]
    pub(crate) fn frozen_parts(&self) -> Vec<(SegKey, usize)> {
        let key = |hour| {
            move |(&start, s): (&i64, &Seg)| {
                s.frozen
                    .as_ref()
                    .map(|f| (SegKey { hour, start }, Arc::as_ptr(f) as usize))
            }
        };
        self.minutes
            .iter()
            .filter_map(key(false))
            .chain(self.hours.iter().filter_map(key(true)))
            .collect()
    }

    /// Number of live `(ad, minute)` cells.
    pub fn cell_count(&self) -> usize {
        self.minutes.values().map(Seg::len).sum()
    }

    /// Every live `(ad, minute, count)` cell, for checkpoints (in no
    /// particular order). Feeding them back through [`Extend`] or
    /// [`FromIterator`] (`collect::<TopIndex>()`, which uses
    /// [`TopIndex::new`]) rebuilds an index with identical answers.
    pub fn cells(&self) -> impl Iterator<Item = (u64, i64, u64)> + '_ {
        self.minutes
            .iter()
            .flat_map(|(&m, seg)| seg.entries().map(move |(ad, c)| (ad, m, c)))
    }

    /// Lists covering `[from, to)`: whole hours where possible, minutes at
    /// the edges.
    fn lists(&self, from: i64, to: i64) -> Vec<List<'_>> {
        let mut out = Vec::new();
        if from >= to {
            return out;
        }
        if self.hour_level {
            let h0 = first_hour_from(from).max(self.first_live_hour());
            // Only hours whose every minute is sealed hold their whole sum.
            let h1 = to.div_euclid(HOUR).min(self.sealed_before.div_euclid(HOUR));
            // `checked_mul` fails only next to i64::MIN/MAX; fall back to
            // minutes there.
            if h0 < h1
                && let (Some(m0), Some(m1)) = (h0.checked_mul(HOUR), h1.checked_mul(HOUR))
            {
                for (_, s) in self.minutes.range(from..m0) {
                    s.push_lists(&mut out);
                }
                // A complete hour not built yet (no freeze pass since it completed, or an
                // index never frozen) is answered by its minutes.
                for (&m, s) in self.minutes.range(m0..m1) {
                    if !self.hours.contains_key(&m.div_euclid(HOUR)) {
                        s.push_lists(&mut out);
                    }
                }
                for (_, s) in self.hours.range(h0..h1) {
                    s.push_lists(&mut out);
                }
                for (_, s) in self.minutes.range(m1..to) {
                    s.push_lists(&mut out);
                }
                return out;
            }
        }
        for (_, s) in self.minutes.range(from..to) {
            s.push_lists(&mut out);
        }
        out
    }

    fn exact_sum(lists: &[List<'_>], ad: u64) -> u64 {
        lists
            .iter()
            .fold(0u64, |acc, l| acc.saturating_add(l.get(ad)))
    }

    /// Threshold Algorithm over `lists`, ranking by `exact(ad)`, which must never exceed
    /// the ad's sum over `lists` (the lists' bounds are then bounds on it). Returns `None`
    /// once sorted plus random accesses exceed `budget`.
    fn top_threshold(
        &self,
        n: usize,
        lists: &[List<'_>],
        budget: Option<usize>,
        mut exact: impl FnMut(u64) -> u64,
    ) -> Option<Vec<(u64, u64)>> {
        let mut cursors = Vec::with_capacity(lists.len());
        // Max-heap of (bound of current run, list): read the list that
        // can still hide the largest counts first, to drop `T` fastest.
        let mut frontier = BinaryHeap::with_capacity(lists.len());
        // u128: a sum of up to 2^64 bounds of u64 cannot overflow it.
        let mut threshold: u128 = 0;
        for (i, l) in lists.iter().enumerate() {
            match l.next_run(None) {
                Some(r) => {
                    let bound = l.run(r).1;
                    cursors.push(Cursor { run: r, pos: 0 });
                    threshold += u128::from(bound);
                    frontier.push((bound, i));
                }
                None => cursors.push(Cursor { run: 0, pos: 0 }),
            }
        }
        let mut best = Best::new(n);
        let mut seen: HashSet<u64, Seeded> = HashSet::with_hasher(self.seed);
        let mut work = 0usize;
        'lists: while let Some((bound, i)) = frontier.pop() {
            let list = lists[i];
            let cur = &mut cursors[i];
            let ads = list.run(cur.run).0;
            loop {
                if best.nth_sum().is_some_and(|s| u128::from(s) > threshold) {
                    break 'lists;
                }
                let Some(ad) = ads.get(cur.pos) else {
                    // Run consumed: this list's bound drops to the next run's (or to 0
                    // when it is exhausted).
                    threshold -= u128::from(bound);
                    if let Some(r) = list.next_run(Some(cur.run)) {
                        *cur = Cursor { run: r, pos: 0 };
                        let b = list.run(r).1;
                        threshold += u128::from(b);
                        frontier.push((b, i));
                    }
                    break;
                };
                cur.pos += 1;
                work += 1;
                if seen.insert(ad) {
                    work += lists.len();
                    if budget.is_some_and(|b| work > b) {
                        return None;
                    }
                    best.offer(exact(ad), ad);
                }
            }
        }
        Some(best.into_sorted())
    }

    /// One exact aggregation pass over every cell of `lists`.
    fn top_scan(&self, n: usize, lists: &[List<'_>]) -> Vec<(u64, u64)> {
        let largest = lists.iter().map(|l| l.len()).max().unwrap_or(0);
        let mut sums: Map<u64> = HashMap::with_capacity_and_hasher(largest, self.seed);
        for l in lists {
            for (ad, c) in l.iter() {
                let s = sums.entry(ad).or_insert(0);
                *s = s.saturating_add(c);
            }
        }
        let mut best = Best::new(n);
        for (ad, s) in sums {
            best.offer(s, ad);
        }
        best.into_sorted()
    }
}

impl Extend<(u64, i64, u64)> for TopIndex {
    fn extend<I: IntoIterator<Item = (u64, i64, u64)>>(&mut self, cells: I) {
        for (ad, minute, count) in cells {
            self.add(ad, minute, count);
        }
    }
}

impl FromIterator<(u64, i64, u64)> for TopIndex {
    fn from_iter<I: IntoIterator<Item = (u64, i64, u64)>>(cells: I) -> Self {
        let mut index = TopIndex::new();
        index.extend(cells);
        index
    }
}

/// The lists of every index covering `[from, to)`.
fn lists_of<'a>(indexes: &[&'a TopIndex], from: i64, to: i64) -> Vec<List<'a>> {
    indexes.iter().flat_map(|i| i.lists(from, to)).collect()
}

/// Exact top `n` over minutes `[from, to)` of the *sum* of several indexes, as
/// [`TopIndex::top`] answers for one: e.g. one index per shard (an ad split over shards
/// sums its parts), or one per value of a dimension (each click is in exactly one).
/// The Threshold Algorithm does not care which index a list came from: a list only bounds
/// what an ad not yet seen can have in it.
pub fn top_of(indexes: &[&TopIndex], n: usize, from: i64, to: i64) -> Vec<(u64, u64)> {
    let lists = lists_of(indexes, from, to);
    let Some(first) = indexes.first() else {
        return Vec::new();
    };
    if n == 0 || lists.is_empty() {
        return Vec::new();
    }
    // Past this much work a single aggregation pass is cheaper.
    let budget = lists.iter().map(|l| l.len()).sum::<usize>();
    match first.top_threshold(n, &lists, Some(budget), |ad| {
        TopIndex::exact_sum(&lists, ad)
    }) {
        Some(top) => top,
        None => first.top_scan(n, &lists),
    }
}

/// Top `n` ads over minutes `[from, to)` ranked by `exact(ad)`, which the caller
/// guarantees is at most the ad's sum over `indexes` (e.g. clicks of one country *and* one
/// device, bounded by the country's index). Exact under that guarantee, by the argument of
/// the module doc. `None` when the search would cost more than a pass over the lists'
/// cells (flat data, or a bound far above the exact values): the caller then scans.
pub fn top_bounded(
    indexes: &[&TopIndex],
    n: usize,
    from: i64,
    to: i64,
    exact: impl FnMut(u64) -> u64,
) -> Option<Vec<(u64, u64)>> {
    let lists = lists_of(indexes, from, to);
    let Some(first) = indexes.first() else {
        return Some(Vec::new());
    };
    if n == 0 || lists.is_empty() {
        return Some(Vec::new());
    }
    let budget = lists.iter().map(|l| l.len()).sum::<usize>();
    first.top_threshold(n, &lists, Some(budget), exact)
}

/// Clicks of one ad over minutes `[from, to)`, summed over `indexes`.
pub fn count_of(indexes: &[&TopIndex], ad: u64, from: i64, to: i64) -> u64 {
    indexes
        .iter()
        .fold(0u64, |acc, i| acc.saturating_add(i.count(ad, from, to)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Brute force: every cell in a map, summed and fully sorted per query.
    #[derive(Default)]
    struct Oracle {
        cells: HashMap<(u64, i64), u64>,
        evicted_before: Option<i64>,
    }

    impl Oracle {
        fn add(&mut self, ad: u64, minute: i64, by: u64) {
            if by == 0 || self.evicted_before.is_some_and(|e| minute < e) {
                return;
            }
            *self.cells.entry((ad, minute)).or_insert(0) += by;
        }
        fn evict_before(&mut self, before: i64) {
            if self.evicted_before.is_some_and(|e| before <= e) {
                return;
            }
            self.evicted_before = Some(before);
            self.cells.retain(|&(_, m), _| m >= before);
        }
        fn top(&self, n: usize, from: i64, to: i64) -> Vec<(u64, u64)> {
            let mut sums: HashMap<u64, u64> = HashMap::new();
            for (&(ad, m), &c) in &self.cells {
                if from <= m && m < to {
                    *sums.entry(ad).or_insert(0) += c;
                }
            }
            let mut v: Vec<(u64, u64)> = sums.into_iter().collect();
            v.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
            v.truncate(n);
            v
        }
        fn count(&self, ad: u64, from: i64, to: i64) -> u64 {
            self.cells
                .iter()
                .filter(|&(&(a, m), _)| a == ad && from <= m && m < to)
                .map(|(_, &c)| c)
                .sum()
        }
    }

    impl<K: AdKey + Ord> Counts<K> {
        /// Every ad once in the bucket of its count; the other entries are stale ones,
        /// each ad at most once per bucket and only below its real bucket. Narrow counts
        /// hold no ad of 2^32 or more (by type), wide ones may hold any.
        fn check_invariants(&self) {
            let in_buckets: usize = self.buckets.iter().map(Vec::len).sum();
            assert_eq!(in_buckets, self.slots.len() + self.stale);
            assert!(
                self.stale <= self.slots.len() + 64,
                "stale entries not dropped"
            );
            let mut real = 0;
            for (b, bucket) in self.buckets.iter().enumerate() {
                let mut once = HashSet::new();
                for &ad in bucket {
                    assert!(once.insert(ad), "ad twice in bucket {b}");
                    let c = self.resolve(ad, self.slots[&ad]);
                    assert!(c > 0);
                    assert!(bucket_of(c) >= b, "ad above its count's bucket");
                    real += usize::from(bucket_of(c) == b);
                }
            }
            assert_eq!(real, self.slots.len());
            for (&ad, &c) in &self.big {
                let k = K::try_from(ad).ok().expect("big ad fits the node's keys");
                assert_eq!(self.slots[&k], BIG);
                assert!(c >= u64::from(BIG));
            }
        }
    }

    impl TopIndex {
        /// Every internal invariant: bucket membership matches counts,
        /// positions are right, frozen parts are well formed, hours are the sums of
        /// their minutes, every segment with a live part is a freeze candidate.
        fn check_invariants(&self) {
            for (hour, (&start, seg)) in self
                .minutes
                .iter()
                .map(|e| (false, e))
                .chain(self.hours.iter().map(|e| (true, e)))
            {
                assert!(seg.len() > 0, "empty segment kept");
                if let Some(node) = seg.live.as_deref() {
                    assert!(node.len() > 0, "empty live part kept");
                    assert!(self.dirty.contains(&SegKey { hour, start }), "not dirty");
                    counts!(node, c => c.check_invariants());
                }
                if let Some(f) = seg.frozen.as_deref() {
                    assert!(f.len() > 0 && f.table.len() > f.len());
                    assert_eq!(f.runs.last().map(|r| r.1 as usize), Some(f.len()));
                    for w in f.runs.windows(2) {
                        assert!(w[0].0 > w[1].0 && w[0].1 < w[1].1, "runs out of order");
                    }
                    let mut ads = HashSet::new();
                    for (ad, c) in f.iter() {
                        assert!(c > 0 && ads.insert(ad), "zero or repeated");
                        assert_eq!(f.get(ad), c);
                    }
                }
            }
            if self.hour_level {
                let first = self.first_live_hour();
                assert!(self.hours.keys().all(|&h| h >= first), "partial hour kept");
                assert!(
                    self.hours
                        .keys()
                        .all(|&h| (h + 1) * HOUR <= self.sealed_before),
                    "incomplete hour kept"
                );
                let mut sums: HashMap<(i64, u64), u64> = HashMap::new();
                for (ad, m, c) in self.cells() {
                    if self.hours.contains_key(&m.div_euclid(HOUR)) {
                        *sums.entry((m.div_euclid(HOUR), ad)).or_insert(0) += c;
                    }
                }
                let mut from_hours = HashMap::new();
                for (&h, seg) in &self.hours {
                    for (ad, c) in seg.entries() {
                        assert!(from_hours.insert((h, ad), c).is_none(), "ad twice");
                    }
                }
                assert_eq!(sums, from_hours);
            } else {
                assert!(self.hours.is_empty());
            }
        }

        /// Same answer through every query path.
        fn top_all_paths(&self, n: usize, from: i64, to: i64) -> Vec<(u64, u64)> {
            let top = self.top(n, from, to);
            let lists = self.lists(from, to);
            if n > 0 && !lists.is_empty() {
                let exact = |ad| TopIndex::exact_sum(&lists, ad);
                assert_eq!(
                    self.top_threshold(n, &lists, None, exact),
                    Some(top.clone()),
                    "TA"
                );
                assert_eq!(self.top_scan(n, &lists), top, "scan");
            }
            top
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(u64, i64, u64),
        Evict(i64),
        Seal(i64),
        /// A freeze pass; `true`: then a publish (the other copy synced, and the two
        /// swapped, as the published writer does).
        Freeze(bool),
        Query(usize, i64, i64),
    }

    fn ad_strategy() -> impl Strategy<Value = u64> {
        prop_oneof![
            // Small pool: many ties.
            3 => 0u64..6,
            // Zipf-ish skew: cubing a uniform value piles mass on small ids.
            4 => (0u64..1000).prop_map(|x| x * x * x / 1_000_000 / 4),
            1 => 0u64..400,
            // Around 2^32: a node's first wide ad converts it.
            1 => (1u64 << 32) - 2..(1u64 << 32) + 2,
            1 => Just(u64::MAX),
        ]
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        let minute = -70i64..130;
        let by = prop_oneof![8 => Just(1u64), 3 => 1u64..5, 1 => Just(1u64 << 33)];
        prop_oneof![
            40 => (ad_strategy(), minute, by).prop_map(|(a, m, b)| Op::Add(a, m, b)),
            // Hot ad: keeps hitting a few recent minutes.
            10 => (100i64..130).prop_map(|m| Op::Add(7, m, 1)),
            1 => (-80i64..140).prop_map(Op::Evict),
            2 => (-80i64..140).prop_map(Op::Seal),
            3 => any::<bool>().prop_map(Op::Freeze),
            3 => (0usize..25, -100i64..160, -100i64..160).prop_map(|(n, f, t)| Op::Query(n, f, t)),
        ]
    }

    fn run(
        ops: &[Op],
        hour_level: bool,
        queries: &[(usize, i64, i64)],
    ) -> Result<(), TestCaseError> {
        let mut idx = TopIndex::with_hour_level(hour_level);
        // The other published copy, as the writer keeps it: at a publish (`Freeze(true)`)
        // the copy published before is synced with the one just published and takes the
        // changes from then on, while that one stays as readers see it.
        let mut twin = idx.clone();
        let mut oracle = Oracle::default();
        let cells = |i: &TopIndex| {
            let mut c: Vec<_> = i.cells().collect();
            c.sort_unstable();
            c
        };
        for op in ops {
            match *op {
                Op::Add(a, m, b) => {
                    idx.add(a, m, b);
                    oracle.add(a, m, b);
                }
                Op::Evict(b) => {
                    idx.evict_before(b);
                    oracle.evict_before(b);
                }
                Op::Seal(b) => idx.seal(b),
                Op::Freeze(publish) => {
                    idx.freeze_due();
                    if publish {
                        twin.sync_from(&idx);
                        twin.check_invariants();
                        prop_assert_eq!(cells(&twin), cells(&idx));
                        std::mem::swap(&mut idx, &mut twin);
                    }
                }
                Op::Query(n, f, t) => {
                    prop_assert_eq!(idx.top_all_paths(n, f, t), oracle.top(n, f, t));
                }
            }
        }
        idx.check_invariants();
        twin.sync_from(&idx);
        twin.check_invariants();
        let rebuilt: TopIndex = {
            let mut r = TopIndex::with_hour_level(hour_level);
            r.extend(idx.cells());
            r.seal(idx.sealed_before);
            r
        };
        rebuilt.check_invariants();
        for &(n, f, t) in queries {
            let want = oracle.top(n, f, t);
            prop_assert_eq!(idx.top_all_paths(n, f, t), want.clone());
            prop_assert_eq!(twin.top_all_paths(n, f, t), want.clone());
            prop_assert_eq!(rebuilt.top(n, f, t), want);
            for ad in [0, 1, 7, 100, u64::MAX] {
                prop_assert_eq!(idx.count(ad, f, t), oracle.count(ad, f, t));
                prop_assert_eq!(twin.count(ad, f, t), oracle.count(ad, f, t));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn matches_oracle(
            ops in prop::collection::vec(op_strategy(), 0..300),
            queries in prop::collection::vec((0usize..40, -100i64..160, -100i64..160), 1..12),
        ) {
            let mut queries = queries;
            // Always probe: everything, n beyond the number of ads, empty
            // and reversed ranges, ranges outside the data, extremes.
            queries.extend([
                (1000, i64::MIN, i64::MAX),
                (3, i64::MIN, i64::MAX),
                (5, 10, 10),
                (5, 20, 10),
                (5, 500, 900),
                (5, 0, 60),
                (5, -60, 120),
            ]);
            run(&ops, true, &queries)?;
            run(&ops, false, &queries)?;
        }

        #[test]
        fn bucket_bounds_are_tight_and_monotone(c in 1u64..) {
            let b = bucket_of(c);
            prop_assert!(c <= bucket_max(b));
            prop_assert!(bucket_max(b - 1) < c);
            // Bucket width is at most 1/16 of its lower edge.
            prop_assert!(bucket_max(b) - bucket_max(b - 1) <= (bucket_max(b - 1) + 1) / 16 + 1);
        }
    }

    #[test]
    fn bucket_edges() {
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(31), 31);
        assert_eq!(bucket_of(32), 32);
        assert_eq!(bucket_max(32), 33);
        assert_eq!(bucket_of(u64::MAX), 975);
        assert_eq!(bucket_max(975), u64::MAX);
        for b in 1..975 {
            assert_eq!(bucket_of(bucket_max(b)), b);
            assert_eq!(bucket_of(bucket_max(b) + 1), b + 1);
        }
    }

    #[test]
    fn ties_break_by_smaller_ad() {
        let mut idx = TopIndex::new();
        for ad in [9, 3, 5, 1] {
            idx.add(ad, 10, 2);
        }
        idx.add(4, 11, 1);
        idx.add(4, 12, 1);
        assert_eq!(idx.top(3, 0, 100), vec![(1, 2), (3, 2), (4, 2)]);
        assert_eq!(
            idx.top(10, 0, 100),
            vec![(1, 2), (3, 2), (4, 2), (5, 2), (9, 2)]
        );
    }

    #[test]
    fn zero_counts_never_appear() {
        let mut idx = TopIndex::new();
        idx.add(1, 5, 0);
        idx.add(2, 5, 3);
        idx.add(3, 50, 1);
        assert_eq!(idx.top(10, 0, 10), vec![(2, 3)]);
        assert_eq!(idx.count(1, 0, 10), 0);
        assert_eq!(idx.cell_count(), 2);
        assert!(idx.top(10, 6, 50).is_empty());
        assert!(idx.top(0, 0, 100).is_empty());
        assert!(idx.top(10, 10, 0).is_empty());
    }

    #[test]
    fn hot_ad_with_half_the_traffic() {
        let mut idx = TopIndex::new();
        let mut oracle = Oracle::default();
        let mut x = 0x1234_5678_u64;
        for i in 0..40_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ad = if i % 2 == 0 { 42 } else { 1000 + x % 3000 };
            let minute = (x >> 20) as i64 % 90;
            idx.add(ad, minute, 1);
            oracle.add(ad, minute, 1);
        }
        for (n, f, t) in [
            (1, 0, 90),
            (10, 0, 90),
            (50, 17, 77),
            (5, 60, 61),
            (100, 30, 45),
        ] {
            let got = idx.top_all_paths(n, f, t);
            assert_eq!(got, oracle.top(n, f, t));
        }
        assert_eq!(idx.top(1, 0, 90), vec![(42, 20_000)]);
        idx.check_invariants();
    }

    #[test]
    fn counts_beyond_u32_stay_exact() {
        let mut idx = TopIndex::new();
        idx.add(1, 0, u64::from(u32::MAX) - 1);
        idx.add(1, 0, 1);
        idx.add(1, 0, 1);
        idx.add(2, 0, u64::from(u32::MAX) + 5);
        idx.add(2, 1, 1);
        idx.check_invariants();
        assert_eq!(
            idx.top(2, 0, 60),
            vec![(2, u64::from(u32::MAX) + 6), (1, u64::from(u32::MAX) + 1)]
        );
        // Mid-hour eviction shrinks a big hour count back below u32.
        idx.evict_before(1);
        idx.check_invariants();
        assert_eq!(idx.top(5, 0, 60), vec![(2, 1)]);
    }

    #[test]
    fn eviction_mid_hour_stays_exact_and_ignores_late_adds() {
        let mut idx = TopIndex::new();
        for m in 0..120 {
            idx.add(m as u64 % 3, m, 1);
        }
        idx.evict_before(30);
        idx.check_invariants();
        // The hour [0, 60) lost minutes: it is dropped, its live minutes answer for it.
        assert!(!idx.hours.contains_key(&0));
        assert_eq!(idx.top(3, 0, 60), vec![(0, 10), (1, 10), (2, 10)]);
        idx.add(5, 10, 100);
        assert_eq!(idx.count(5, 0, 120), 0);
        idx.evict_before(20);
        assert_eq!(idx.top(1, 0, 60), vec![(0, 10)]);
        idx.evict_before(60);
        idx.check_invariants();
        assert_eq!(idx.top(5, i64::MIN, 60), vec![]);
        assert_eq!(idx.count(0, i64::MIN, i64::MAX), 20);
    }

    #[test]
    fn extreme_minutes() {
        let mut idx = TopIndex::new();
        idx.add(1, i64::MIN, 2);
        idx.add(2, i64::MAX, 3);
        idx.add(1, i64::MAX - 1, 1);
        idx.check_invariants();
        assert_eq!(idx.top(5, i64::MIN, i64::MAX), vec![(1, 3)]);
        assert_eq!(idx.top(5, i64::MAX - 70, i64::MAX), vec![(1, 1)]);
        assert_eq!(idx.count(1, i64::MIN, i64::MIN + 1), 2);
        idx.evict_before(i64::MAX);
        idx.check_invariants();
        assert_eq!(idx.cells().collect::<Vec<_>>(), vec![(2, i64::MAX, 3)]);
    }

    /// A complete hour gets its segment at the next freeze pass, built from its minutes;
    /// until then, and for the hour being filled, its minutes answer. Late clicks to a
    /// built hour reach its live part.
    #[test]
    fn hours_are_built_from_their_minutes_once_complete() {
        let mut idx = TopIndex::new();
        // The writer's other copy, synced after the freeze pass.
        let mut twin = idx.clone();
        for m in 0..150 {
            for ad in 0..4u64 {
                idx.add(ad, m, ad + 1);
            }
        }
        idx.seal(150);
        // Sealed, not frozen yet: 150 minute lists.
        assert_eq!(idx.lists(0, 150).len(), 150);
        assert_eq!(idx.top(2, 0, 150), vec![(3, 600), (2, 450)]);
        idx.freeze_due();
        twin.sync_from(&idx);
        for i in [&idx, &twin] {
            // Hours 0 and 1 built; hour 2 (minutes 120..150) is not complete.
            assert_eq!(i.hours.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
            assert_eq!(i.lists(0, 150).len(), 2 + 30);
            assert_eq!(i.top(2, 0, 150), vec![(3, 600), (2, 450)]);
            i.check_invariants();
        }
        assert_eq!(idx.frozen_parts(), twin.frozen_parts());
        // A late click into hour 0 reaches minute 5 and the hour's live part.
        for i in [&mut idx, &mut twin] {
            i.add(0, 5, 1000);
            assert_eq!(i.lists(0, 150).len(), 3 + 30);
            assert_eq!(i.top(1, 0, 120), vec![(0, 1120)]);
            assert_eq!(i.count(0, 0, 60), 1060);
            i.check_invariants();
        }
        // Eviction inside hour 1 drops it: its minutes answer.
        idx.evict_before(70);
        assert_eq!(idx.hours.len(), 0);
        assert_eq!(idx.top(1, 0, 150), vec![(3, 320)]);
        idx.check_invariants();
    }

    /// A new minute's live part is shaped like the minute before it: its map and its
    /// buckets take as many ads without growing; answers are unchanged.
    #[test]
    fn a_new_minute_is_shaped_like_the_last() {
        let mut idx = TopIndex::new();
        for ad in 0..1000u64 {
            for _ in 0..=(ad % 3) {
                idx.add(ad, 0, 1);
            }
        }
        idx.add(5, 1, 1);
        let prev = idx.minutes[&0].live.as_deref().expect("minute 0 is live");
        let node = idx.minutes[&1].live.as_deref().expect("minute 1 is live");
        let (Node::Narrow(prev), Node::Narrow(node)) = (prev, node) else {
            panic!("small ads are stored narrow");
        };
        assert!(node.slots.capacity() >= 1000);
        for (b, v) in prev.buckets.iter().enumerate() {
            assert!(node.buckets[b].capacity() >= v.len(), "bucket {b}");
        }
        idx.check_invariants();
        assert_eq!(idx.top(2, 0, 2), vec![(5, 4), (2, 3)]);
        // A late click into a frozen minute gets a small live part.
        idx.seal(2);
        idx.freeze_due();
        idx.add(7, 0, 1);
        assert!(
            idx.minutes[&0]
                .live
                .as_deref()
                .is_some_and(|n| matches!(n, Node::Narrow(c) if c.slots.capacity() < 1000))
        );
        assert_eq!(idx.count(7, 0, 2), 3);
        idx.check_invariants();
        // A minute that took a 64-bit ad is wide; the next one, shaped like it, starts
        // narrow again (a stray wide id does not stick).
        idx.add(u64::MAX - 1, 5, 2);
        idx.add(3, 6, 1);
        assert!(idx.minutes[&5].live.as_deref().is_some_and(Node::is_wide));
        assert!(
            idx.minutes[&6]
                .live
                .as_deref()
                .is_some_and(|n| !n.is_wide())
        );
        assert_eq!(idx.top(2, 5, 7), vec![(u64::MAX - 1, 2), (3, 1)]);
        idx.check_invariants();
    }

    /// Stale bucket entries are dropped once they outnumber the ads, and sorted access
    /// through them stays exact.
    #[test]
    fn stale_bucket_entries_are_dropped() {
        let mut n = Counts::<u64>::shaped(Seeded::random(), 0, &[]);
        for round in 1..=40u64 {
            for ad in 0..100 {
                n.add(ad, 1);
            }
            assert!(n.stale <= n.slots.len() + 64, "round {round}");
        }
        let mut idx = TopIndex::new();
        for ad in 0..100 {
            for _ in 0..=ad {
                idx.add(ad, 0, 1);
            }
        }
        idx.check_invariants();
        assert_eq!(
            idx.top_all_paths(3, 0, 1),
            vec![(99, 100), (98, 99), (97, 98)]
        );
    }

    #[test]
    fn cells_round_trip() {
        let mut idx = TopIndex::new();
        for i in 0..5000u64 {
            idx.add(i % 97, (i % 150) as i64 - 20, 1 + i % 3);
        }
        let rebuilt: TopIndex = idx.cells().collect();
        let mut a: Vec<_> = idx.cells().collect();
        let mut b: Vec<_> = rebuilt.cells().collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        for (n, f, t) in [
            (10, -20, 130),
            (1000, i64::MIN, i64::MAX),
            (7, 3, 64),
            (3, 40, 41),
        ] {
            assert_eq!(idx.top(n, f, t), rebuilt.top(n, f, t));
        }
        assert!(idx.heap_bytes() > 0);
        assert!(format!("{:?}", TopIndex::minutes_only()).contains("TopIndex"));
    }
}
