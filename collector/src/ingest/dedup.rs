//! Duplicate detection at the edge: a time-rotated Bloom filter as a cheap pre-check and a
//! bounded exact set behind it.
//!
//! A Bloom positive is only a *suspect*. It is confirmed against the exact set; a suspect
//! the exact set does not hold (a Bloom false positive, or an id evicted from the bounded
//! set) is accepted and flagged `dedup_suspect`, so the aggregator's exact dedup decides.
//! A Bloom false positive therefore never costs a billable click.
//!
//! The exact set is a flat open-addressing table keyed by the 16-byte id, its hash taken
//! from the id's random bytes (no SipHash): a check-and-insert is one probe sequence.
//!
//! Memory: the exact set is allocated for its capacity at start, 62-101 bytes per id of
//! capacity (74 at the default: 24-byte table slots, the next power of two at or above 8/5
//! of the capacity, plus the 24-byte eviction queue entry); the Bloom filter
//! ~1.44 * log2(1/fp) bits per expected click and generation.

use std::collections::VecDeque;
use std::hash::{BuildHasherDefault, Hasher};

use fastbloom::BloomFilter;

use crate::config::DedupConfig;

/// An impression id.
pub type ImpressionId = [u8; 16];

/// What the dedup state says about an impression id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Never seen: accepted.
    New,
    /// Held in the exact set: a duplicate, dropped and counted.
    Duplicate,
    /// Bloom positive not confirmed: accepted, flagged for the aggregator.
    Suspect,
}

/// Impression ids are 16 random bytes minted by ad servers and covered by the token's
/// signature, so their first 8 bytes are already a uniform hash.
#[derive(Debug, Default)]
pub struct IdHasher(u64);

/// Hash builder for sets and maps keyed by [`ImpressionId`] (see [`IdHasher`]).
pub type IdHashBuilder = BuildHasherDefault<IdHasher>;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
}

fn bloom_hash(id: &ImpressionId) -> u64 {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&id[..8]);
    b.copy_from_slice(&id[8..]);
    u64::from_le_bytes(a) ^ u64::from_le_bytes(b).rotate_left(29)
}

/// Bloom generations, newest last. Inserts go to the newest; lookups check all.
struct RotatingBloom {
    gens: VecDeque<(i64, BloomFilter)>,
    span_ms: i64,
    max_gens: usize,
    per_gen_items: usize,
    fp: f64,
}

impl RotatingBloom {
    fn new(cfg: &DedupConfig, now_ms: i64) -> Self {
        let g = cfg.generations.max(2);
        // g generations of lifetime/(g-1) each always cover a full token lifetime.
        let span_ms = (cfg.token_lifetime_ms / (g as i64 - 1)).max(1);
        let per_gen_items = (cfg.expected_clicks / (g - 1)).max(1024);
        let mut r = RotatingBloom {
            gens: VecDeque::new(),
            span_ms,
            max_gens: g,
            per_gen_items,
            fp: cfg.false_positive_rate,
        };
        r.push(now_ms);
        r
    }

    fn push(&mut self, start_ms: i64) {
        let f = BloomFilter::with_false_pos(self.fp).expected_items(self.per_gen_items);
        self.gens.push_back((start_ms, f));
        while self.gens.len() > self.max_gens {
            self.gens.pop_front();
        }
    }

    fn rotate(&mut self, now_ms: i64) {
        let newest = self.gens.back().map_or(i64::MIN, |(s, _)| *s);
        if now_ms >= newest.saturating_add(self.span_ms) {
            self.push(now_ms);
        }
    }

    fn contains(&self, h: u64) -> bool {
        self.gens.iter().any(|(_, f)| f.contains_hash(h))
    }

    fn insert(&mut self, h: u64) {
        if let Some((_, f)) = self.gens.back_mut() {
            f.insert_hash(h);
        }
    }
}

/// The exact set's table slot: an id, and its keep-until time with two flag bits.
#[derive(Clone, Copy, Default)]
struct Slot {
    id: ImpressionId,
    /// 0: empty. Else `OCCUPIED | committed bit | keep_until` (see [`pack`]).
    meta: u64,
}

const OCCUPIED: u64 = 1 << 63;
const COMMITTED: u64 = 1 << 62;
const KEEP_MASK: u64 = COMMITTED - 1;

/// A keep-until time as stored: clamped to [0, 2^62) (times before the epoch are kept
/// until the epoch, a needless few ms longer; nothing real is that late).
fn keep(t: i64) -> u64 {
    t.clamp(0, KEEP_MASK as i64) as u64
}

fn id_hash(id: &ImpressionId) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&id[..8]);
    // The id's first bytes are random (see `IdHasher`); the multiply spreads ids that are
    // not (tests) over the high bits, which pick the slot.
    u64::from_le_bytes(a).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What a probe found.
enum Probe {
    /// The id's slot.
    Found(usize),
    /// The empty slot where it would go.
    Vacant(usize),
}

/// Exact ids with their expiry, bounded in count; oldest inserted are evicted first.
/// Linear probing with backward-shift deletion (no tombstones), grown at a load of 5/8.
struct ExactSet {
    slots: Vec<Slot>,
    /// Slots in use.
    len: usize,
    /// (id, keep-until as stored) in insertion order, for expiry and eviction.
    order: VecDeque<(ImpressionId, u64)>,
    capacity: usize,
}

impl ExactSet {
    const MIN_SLOTS: usize = 1024;

    /// Sized for `capacity` ids from the start: growing a table of a million ids (copying
    /// ~50 MB and re-probing every id) stopped the collector's request path for 100-370 ms
    /// under load (issue 13's click -> queryable tail, 5-7 s into a 200k/s run), and the
    /// queue's doubling did the same at 524k ids. The table is the next power of two at or
    /// above 8/5 of `capacity` (never past its load bound of 5/8: it holds at most
    /// `capacity + 1` ids), the queue `capacity` entries.
    fn new(capacity: usize) -> Self {
        let slots = capacity
            .saturating_add(1)
            .saturating_mul(8)
            .div_ceil(5)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX / 2 + 1);
        Self::with_slots(capacity, slots)
    }

    /// A table of `slots` slots (a power of two; grown as needed) for `capacity` ids.
    fn with_slots(capacity: usize, slots: usize) -> Self {
        ExactSet {
            slots: vec![Slot::default(); slots.max(Self::MIN_SLOTS)],
            len: 0,
            order: VecDeque::with_capacity(capacity.saturating_add(1)),
            capacity,
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, id: &ImpressionId) -> usize {
        // High bits: the table size is a power of two.
        let shift = 64 - self.slots.len().trailing_zeros();
        (id_hash(id) >> shift) as usize
    }

    fn probe(&self, id: &ImpressionId) -> Probe {
        let mask = self.mask();
        let mut i = self.home(id);
        loop {
            let s = &self.slots[i];
            if s.meta == 0 {
                return Probe::Vacant(i);
            }
            if s.id == *id {
                return Probe::Found(i);
            }
            i = (i + 1) & mask;
        }
    }

    #[cfg(test)]
    fn get(&self, id: &ImpressionId) -> Option<u64> {
        match self.probe(id) {
            Probe::Found(i) => Some(self.slots[i].meta),
            Probe::Vacant(_) => None,
        }
    }

    /// Stores `meta` for `id` at a vacant slot (from [`ExactSet::probe`]), growing first if
    /// the table would pass its load bound.
    fn insert_at(&mut self, mut at: usize, id: &ImpressionId, meta: u64) {
        if (self.len + 1) * 8 > self.slots.len() * 5 {
            self.grow();
            at = match self.probe(id) {
                Probe::Vacant(i) | Probe::Found(i) => i,
            };
        }
        self.slots[at] = Slot { id: *id, meta };
        self.len += 1;
    }

    fn grow(&mut self) {
        let bigger = vec![Slot::default(); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, bigger);
        for s in old.into_iter().filter(|s| s.meta != 0) {
            if let Probe::Vacant(i) = self.probe(&s.id) {
                self.slots[i] = s;
            }
        }
    }

    /// Empties slot `i`, shifting back the entries after it that probed past it.
    fn remove_at(&mut self, mut i: usize) {
        let mask = self.mask();
        self.len -= 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            if self.slots[j].meta == 0 {
                break;
            }
            let home = self.home(&self.slots[j].id);
            // Move j back to i unless its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.slots[i] = self.slots[j];
                i = j;
            }
        }
        self.slots[i] = Slot::default();
    }

    fn expire(&mut self, now_ms: i64) {
        let now = keep(now_ms);
        while let Some((id, exp)) = self.order.front().copied() {
            // The queue bounds the table (every id held has an entry in it; a released id
            // leaves a stale one): kept to `capacity`, neither grows past its allocation.
            if exp >= now && self.order.len() <= self.capacity {
                break;
            }
            self.order.pop_front();
            // Only remove if the table still holds this very entry (a released and
            // re-inserted id has a newer queue entry).
            if let Probe::Found(i) = self.probe(&id)
                && self.slots[i].meta & KEEP_MASK == exp
            {
                self.remove_at(i);
            }
        }
    }
}

/// Bloom pre-check + exact set. Not thread-safe; the processor holds it in a mutex.
pub struct Dedup {
    bloom: RotatingBloom,
    exact: ExactSet,
    skew_ms: i64,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("generations", &self.bloom.gens.len())
            .field("exact_len", &self.exact.len)
            .finish()
    }
}

impl Dedup {
    /// A dedup state sized from config. `skew_ms` extends how long an id is kept past its
    /// token's expiry.
    pub fn new(cfg: &DedupConfig, skew_ms: i64, now_ms: i64) -> Self {
        Dedup {
            bloom: RotatingBloom::new(cfg, now_ms),
            exact: ExactSet::new(cfg.exact_capacity.max(1)),
            skew_ms,
        }
    }

    /// Checks `id` and, unless it is a duplicate, records it (kept until `expires_at_ms`
    /// plus skew).
    pub fn check_and_insert(&mut self, id: &ImpressionId, expires_at_ms: i64, now_ms: i64) -> Seen {
        self.bloom.rotate(now_ms);
        self.exact.expire(now_ms);
        // The exact set first: one probe answers for ids it holds and finds the slot for
        // the others. (An id it holds is never "new", even once the Bloom generation that
        // saw it has rotated out while the id is still kept for its skew.)
        let at = match self.exact.probe(id) {
            Probe::Found(i) if self.exact.slots[i].meta & COMMITTED != 0 => {
                return Seen::Duplicate;
            }
            // The first copy is not durable yet (its request may still fail, or its
            // client may have gone away): accept this one too, as a suspect. The
            // aggregator's exact dedup keeps it from counting twice; answering
            // "duplicate" here could ack a click that is never written.
            Probe::Found(_) => return Seen::Suspect,
            Probe::Vacant(i) => i,
        };
        let h = bloom_hash(id);
        let maybe = self.bloom.contains(h);
        let keep_until = keep(expires_at_ms.saturating_add(self.skew_ms));
        self.exact.insert_at(at, id, OCCUPIED | keep_until);
        self.exact.order.push_back((*id, keep_until));
        if maybe {
            // A Bloom positive the exact set does not hold: a false positive or an id
            // evicted from (or released by) the exact set; the aggregator decides.
            Seen::Suspect
        } else {
            self.bloom.insert(h);
            Seen::New
        }
    }

    /// Marks `id` durable: from now on a repeat is a duplicate.
    pub fn commit(&mut self, id: &ImpressionId) {
        if let Probe::Found(i) = self.exact.probe(id) {
            self.exact.slots[i].meta |= COMMITTED;
        }
    }

    /// Forgets a pending `id`: its click was not made durable (spool error), so the
    /// client's retry must not be taken for a duplicate. (The Bloom bit stays; the retry
    /// becomes a suspect, never a loss.)
    pub fn release(&mut self, id: &ImpressionId) {
        if let Probe::Found(i) = self.exact.probe(id)
            && self.exact.slots[i].meta & COMMITTED == 0
        {
            self.exact.remove_at(i);
        }
    }

    /// Ids held exactly.
    pub fn exact_len(&self) -> usize {
        self.exact.len
    }

    #[cfg(test)]
    fn bloom_says_maybe(&self, id: &ImpressionId) -> bool {
        self.bloom.contains(bloom_hash(id))
    }

    #[cfg(test)]
    fn bloom_insert_only(&mut self, id: &ImpressionId) {
        self.bloom.insert(bloom_hash(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(capacity: usize) -> DedupConfig {
        DedupConfig {
            token_lifetime_ms: 60_000,
            expected_clicks: 10_000,
            false_positive_rate: 0.01,
            generations: 4,
            exact_capacity: capacity,
        }
    }

    fn id(n: u64) -> ImpressionId {
        let mut x = [0u8; 16];
        // Spread like random ids would be.
        let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x[..8].copy_from_slice(&h.to_le_bytes());
        x[8..].copy_from_slice(&n.to_le_bytes());
        x
    }

    #[test]
    fn duplicates_are_caught_and_new_ids_pass() {
        let mut d = Dedup::new(&cfg(1000), 0, 0);
        assert_eq!(d.check_and_insert(&id(1), 60_000, 0), Seen::New);
        // Not durable yet: a repeat is accepted as a suspect, never answered "duplicate".
        assert_eq!(d.check_and_insert(&id(1), 60_000, 5), Seen::Suspect);
        d.commit(&id(1));
        assert_eq!(d.check_and_insert(&id(1), 60_000, 10), Seen::Duplicate);
        assert_eq!(d.check_and_insert(&id(2), 60_000, 10), Seen::New);
    }

    /// The table and the queue are sized for the capacity at start: filling the set to
    /// it, and past it (evicting), never reallocates either (a reallocation of a
    /// million-id table is what stopped the request path).
    #[test]
    fn the_exact_set_is_allocated_for_its_capacity_and_never_grows() {
        for cap in [1usize, 1000, 655_360, 655_361] {
            let t = ExactSet::new(cap);
            assert!(t.slots.len().is_power_of_two());
            assert!(
                (cap + 1) * 8 <= t.slots.len() * 5,
                "{cap}: {} slots",
                t.slots.len()
            );
            assert!(t.slots.len() < (cap + 1) * 4 || t.slots.len() == ExactSet::MIN_SLOTS);
        }
        let cap = 50_000;
        let mut d = Dedup::new(&cfg(cap), 0, 0);
        let (slots, queue) = (d.exact.slots.as_ptr(), d.exact.order.capacity());
        for n in 0..(2 * cap as u64) {
            // (Past the Bloom filter's size some new ids are suspects: still recorded.)
            assert_ne!(d.check_and_insert(&id(n), 60_000, 0), Seen::Duplicate);
            // Every third one is released (its request failed): its queue entry stays.
            if n % 3 == 0 {
                d.release(&id(n));
            } else {
                d.commit(&id(n));
            }
        }
        assert!(d.exact_len() <= cap + 1);
        assert!(d.exact.order.len() <= cap + 1);
        assert_eq!(d.exact.slots.as_ptr(), slots, "the table was reallocated");
        assert_eq!(d.exact.order.capacity(), queue, "the queue was reallocated");
    }

    #[test]
    fn a_bloom_false_positive_is_a_suspect_never_a_duplicate() {
        let mut d = Dedup::new(&cfg(1000), 0, 0);
        // Set the Bloom bits for an id the exact set never saw: a forced false positive.
        d.bloom_insert_only(&id(7));
        assert_eq!(d.check_and_insert(&id(7), 60_000, 0), Seen::Suspect);
        d.commit(&id(7));
        // Once recorded, a real repeat is a duplicate.
        assert_eq!(d.check_and_insert(&id(7), 60_000, 1), Seen::Duplicate);
    }

    #[test]
    fn evicted_ids_come_back_as_suspects() {
        let mut d = Dedup::new(&cfg(2), 0, 0);
        for n in 0..3 {
            assert_eq!(d.check_and_insert(&id(n), 60_000, 0), Seen::New);
        }
        // id(0) was evicted from the exact set (capacity 2) but is still in the Bloom.
        assert_eq!(d.check_and_insert(&id(0), 60_000, 1), Seen::Suspect);
        assert!(d.exact_len() <= 3);
    }

    #[test]
    fn released_ids_are_not_duplicates() {
        let mut d = Dedup::new(&cfg(100), 0, 0);
        assert_eq!(d.check_and_insert(&id(3), 60_000, 0), Seen::New);
        d.release(&id(3));
        assert_eq!(d.check_and_insert(&id(3), 60_000, 1), Seen::Suspect);
        d.commit(&id(3));
        d.release(&id(3));
        assert_eq!(
            d.check_and_insert(&id(3), 60_000, 2),
            Seen::Duplicate,
            "committed ids are never released"
        );
    }

    #[test]
    fn released_ids_are_not_duplicates_2() {
        let mut d = Dedup::new(&cfg(100), 0, 0);
        assert_eq!(d.check_and_insert(&id(4), 60_000, 0), Seen::New);
        d.release(&id(4));
        assert_eq!(d.check_and_insert(&id(4), 60_000, 1), Seen::Suspect);
    }

    #[test]
    fn expired_ids_are_forgotten_and_bloom_rotates() {
        let mut d = Dedup::new(&cfg(100), 1_000, 0);
        assert_eq!(d.check_and_insert(&id(4), 60_000, 0), Seen::New);
        // Past expiry + skew, and past every Bloom generation.
        let later = 60_000 + 1_000 + 4 * 20_000 + 1;
        for t in (0..later).step_by(20_000) {
            d.check_and_insert(&id(1_000 + t as u64), t + 60_000, t);
        }
        assert_eq!(d.check_and_insert(&id(4), later + 60_000, later), Seen::New);
    }

    #[test]
    fn false_positive_rate_is_near_target() {
        let mut d = Dedup::new(&cfg(20_000), 0, 0);
        for n in 0..3_000 {
            d.check_and_insert(&id(n), 60_000, 0);
        }
        // Probe without inserting, so the filter stays at its design load.
        let suspects = (1_000_000..1_010_000)
            .filter(|n| d.bloom_says_maybe(&id(*n)))
            .count();
        // Target 1%: allow 3x for the small filter.
        assert!(suspects < 300, "{suspects} suspects in 10000 new ids");
    }

    mod exact_model {
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        #[derive(Debug, Clone)]
        enum Op {
            Insert(u16, i64),
            Commit(u16),
            Release(u16),
            Expire(i64),
        }

        // Ids from a small pool; half of them share their first 8 bytes in groups of
        // four, so they probe the same home slot (collisions, backward shifts).
        const POOL: u16 = 1200;

        fn pool_id(n: u16) -> ImpressionId {
            let mut x = [0u8; 16];
            let home = if n.is_multiple_of(2) {
                u64::from(n / 8)
            } else {
                u64::from(n)
            };
            x[..8].copy_from_slice(&home.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
            x[8..10].copy_from_slice(&n.to_le_bytes());
            x
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..POOL, 0i64..100).prop_map(|(n, t)| Op::Insert(n, t)),
                2 => (0..POOL).prop_map(Op::Commit),
                1 => (0..POOL).prop_map(Op::Release),
                1 => (0i64..100).prop_map(Op::Expire),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// The flat table holds exactly what a HashMap model holds after any sequence
            /// of inserts, commits, releases and expiries (small capacity: evictions too),
            /// through growth.
            #[test]
            fn table_matches_a_hash_map(ops in proptest::collection::vec(op(), 0..3000), cap in 1usize..1500) {
                // Starting small, so that the table grows on the way.
                let mut t = ExactSet::with_slots(cap, ExactSet::MIN_SLOTS);
                let mut model: HashMap<ImpressionId, u64> = HashMap::new();
                let mut order: VecDeque<(ImpressionId, u64)> = VecDeque::new();
                let mut now = 0i64;
                for op in ops {
                    match op {
                        Op::Insert(n, dt) => {
                            let id = pool_id(n);
                            now += dt / 50;
                            t.expire(now);
                            while let Some((i, e)) = order.front().copied() {
                                if e >= keep(now) && order.len() <= cap { break; }
                                order.pop_front();
                                if model.get(&i).map(|m| m & KEEP_MASK) == Some(e) { model.remove(&i); }
                            }
                            let k = keep(now + dt);
                            match t.probe(&id) {
                                Probe::Found(_) => prop_assert!(model.contains_key(&id)),
                                Probe::Vacant(at) => {
                                    prop_assert!(!model.contains_key(&id));
                                    t.insert_at(at, &id, OCCUPIED | k);
                                    t.order.push_back((id, k));
                                    model.insert(id, OCCUPIED | k);
                                    order.push_back((id, k));
                                }
                            }
                        }
                        Op::Commit(n) => {
                            let id = pool_id(n);
                            if let Probe::Found(i) = t.probe(&id) { t.slots[i].meta |= COMMITTED; }
                            if let Some(m) = model.get_mut(&id) { *m |= COMMITTED; }
                        }
                        Op::Release(n) => {
                            let id = pool_id(n);
                            if let Probe::Found(i) = t.probe(&id)
                                && t.slots[i].meta & COMMITTED == 0
                            {
                                t.remove_at(i);
                            }
                            if model.get(&id).is_some_and(|m| m & COMMITTED == 0) { model.remove(&id); }
                        }
                        Op::Expire(dt) => {
                            now += dt;
                            t.expire(now);
                            while let Some((i, e)) = order.front().copied() {
                                if e >= keep(now) && order.len() <= cap { break; }
                                order.pop_front();
                                if model.get(&i).map(|m| m & KEEP_MASK) == Some(e) { model.remove(&i); }
                            }
                        }
                    }
                    prop_assert_eq!(t.len, model.len());
                }
                for n in 0..POOL {
                    let id = pool_id(n);
                    prop_assert_eq!(t.get(&id), model.get(&id).copied());
                }
            }
        }
    }
}
