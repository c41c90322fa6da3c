//! Duplicate detection at the edge: a time-rotated Bloom filter as a cheap pre-check and a
//! bounded exact set behind it.
//!
//! A Bloom positive is only a *suspect*. It is confirmed against the exact set; a suspect
//! the exact set does not hold (a Bloom false positive, or an id evicted from the bounded
//! set) is accepted and flagged `dedup_suspect`, so the aggregator's exact dedup decides.
//! A Bloom false positive therefore never costs a billable click.
//!
//! Memory: the exact set costs ~64 bytes per impression id (hash table slot with the id and
//! expiry, plus the eviction queue entry); the Bloom filter ~1.44 * log2(1/fp) bits per
//! expected click and generation.

use std::collections::{HashMap, VecDeque};
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
#[derive(Default)]
struct IdHasher(u64);

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

/// Exact ids with their expiry, bounded in count; oldest inserted are evicted first.
struct ExactSet {
    /// id -> (keep until, committed). An id is pending until its click is durable.
    map: HashMap<ImpressionId, (i64, bool), BuildHasherDefault<IdHasher>>,
    order: VecDeque<(ImpressionId, i64)>,
    capacity: usize,
}

impl ExactSet {
    fn expire(&mut self, now_ms: i64) {
        while let Some((id, exp)) = self.order.front().copied() {
            if exp >= now_ms && self.map.len() <= self.capacity {
                break;
            }
            self.order.pop_front();
            // Only remove if the map still holds this very entry (a released and
            // re-inserted id has a newer queue entry).
            if self.map.get(&id).map(|(e, _)| *e) == Some(exp) {
                self.map.remove(&id);
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
            .field("exact_len", &self.exact.map.len())
            .finish()
    }
}

impl Dedup {
    /// A dedup state sized from config. `skew_ms` extends how long an id is kept past its
    /// token's expiry.
    pub fn new(cfg: &DedupConfig, skew_ms: i64, now_ms: i64) -> Self {
        Dedup {
            bloom: RotatingBloom::new(cfg, now_ms),
            exact: ExactSet {
                map: HashMap::default(),
                order: VecDeque::new(),
                capacity: cfg.exact_capacity.max(1),
            },
            skew_ms,
        }
    }

    /// Checks `id` and, unless it is a duplicate, records it (kept until `expires_at_ms`
    /// plus skew).
    pub fn check_and_insert(&mut self, id: &ImpressionId, expires_at_ms: i64, now_ms: i64) -> Seen {
        self.bloom.rotate(now_ms);
        self.exact.expire(now_ms);
        let h = bloom_hash(id);
        let maybe = self.bloom.contains(h);
        if maybe {
            match self.exact.map.get(id) {
                Some((_, true)) => return Seen::Duplicate,
                // The first copy is not durable yet (its request may still fail, or its
                // client may have gone away): accept this one too, as a suspect. The
                // aggregator's exact dedup keeps it from counting twice; answering
                // "duplicate" here could ack a click that is never written.
                Some((_, false)) => return Seen::Suspect,
                None => {}
            }
        }
        let keep_until = expires_at_ms.saturating_add(self.skew_ms);
        self.exact.map.insert(*id, (keep_until, false));
        self.exact.order.push_back((*id, keep_until));
        if maybe {
            Seen::Suspect
        } else {
            self.bloom.insert(h);
            Seen::New
        }
    }

    /// Marks `id` durable: from now on a repeat is a duplicate.
    pub fn commit(&mut self, id: &ImpressionId) {
        if let Some((_, committed)) = self.exact.map.get_mut(id) {
            *committed = true;
        }
    }

    /// Forgets a pending `id`: its click was not made durable (spool error), so the
    /// client's retry must not be taken for a duplicate. (The Bloom bit stays; the retry
    /// becomes a suspect, never a loss.)
    pub fn release(&mut self, id: &ImpressionId) {
        if self
            .exact
            .map
            .get(id)
            .is_some_and(|(_, committed)| !committed)
        {
            self.exact.map.remove(id);
        }
    }

    /// Ids held exactly.
    pub fn exact_len(&self) -> usize {
        self.exact.map.len()
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
}
