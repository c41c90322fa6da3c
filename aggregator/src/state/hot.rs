//! Heavy-hitter detection with Space-Saving (Metwally et al.): `capacity` counters track
//! the most frequent ad ids in a round of `window` clicks with error at most
//! window/capacity per count. An ad whose guaranteed count (count - error) exceeds
//! `fraction` of the round is hot for the next round. Deterministic (no clocks, no
//! randomness), so a WAL replay makes the same decisions.
//!
//! Rounds of more than [`MIN_SAMPLES`] x 2 clicks are sampled: only clicks whose
//! impression hash has its low bits zero (one in `rate`, a power of two leaving at least
//! [`MIN_SAMPLES`] expected per round) update the summary, and the threshold applies to the
//! sampled count. Impression ids are random (minted and signed by the ad server), so the
//! sample is uniform and not steerable by a client; the hash is the click's own, so a
//! replay samples the same clicks. At the default 100,000-click rounds one click in 16 is
//! looked at: an ad at 5% of a round is ~312 samples (standard deviation ~17), where
//! updating the summary for every click cost ~9% of the aggregator's per-click time (a
//! tail ad under Zipf traffic replaces the minimum each time). The detector only spreads
//! hot ads over shards; counts never depend on it.

/// Expected sampled clicks per round at least (below twice this, every click is counted).
pub const MIN_SAMPLES: u64 = 4_096;

/// Space-Saving summary plus the current hot set.
#[derive(Debug, Clone)]
pub struct HotDetector {
    capacity: usize,
    window: u64,
    fraction: f64,
    /// Clicks seen this round.
    seen: u64,
    /// `rate - 1`: a click is sampled when its hash's low bits are zero.
    sample_mask: u64,
    /// Sampled clicks this round.
    sampled: u64,
    /// (count, ad, error bound), sorted by count (the stream-summary order); the first is
    /// the one a newcomer replaces. A small contiguous array: a tail ad replaces the
    /// minimum with one swap, where a scan of a hash map for the minimum cost ~10% of all
    /// the aggregator's per-click time.
    counters: Vec<(u64, u64, u64)>,
    /// ad -> its position in `counters`.
    index: Slots,
    hot: Vec<u64>,
}

impl HotDetector {
    /// A detector with rounds of `window` clicks and threshold `fraction`.
    pub fn new(window: u64, fraction: f64) -> Self {
        // Enough counters that an ad at the threshold is always tracked (40 at the
        // default 5%).
        let capacity = ((2.0 / fraction).ceil() as usize).clamp(16, 1_000);
        let window = window.max(100);
        // The largest power of two leaving at least MIN_SAMPLES expected samples.
        let rate = (window / MIN_SAMPLES).max(1);
        let rate = 1u64 << (63 - rate.leading_zeros());
        HotDetector {
            capacity,
            window,
            fraction,
            seen: 0,
            sample_mask: rate - 1,
            sampled: 0,
            counters: Vec::with_capacity(capacity),
            index: Slots::new(capacity),
            hot: Vec::new(),
        }
    }

    /// Adds one to the counter at `i`, keeping the array sorted by count: it changes
    /// places with the last counter of its old count (one swap, two index updates).
    fn bump(&mut self, i: usize) {
        let c = self.counters[i].0;
        // The last counter of count `c` (the array is sorted by count): a binary search,
        // as under Zipf traffic most of the counters share the minimum a tail ad replaces.
        let j = i + self.counters[i..].partition_point(|x| x.0 <= c) - 1;
        if j != i {
            self.counters.swap(i, j);
            self.index.set(self.counters[i].1, i);
        }
        self.counters[j].0 += 1;
        self.index.set(self.counters[j].1, j);
    }

    /// Counts one click on `ad`; `hash` is the click's impression hash (uniform, the same
    /// on a replay), which decides whether the click is sampled. Returns true when a round
    /// ended and the hot set changed.
    #[inline]
    pub fn observe(&mut self, ad: u64, hash: u64) -> bool {
        self.seen += 1;
        if hash & self.sample_mask == 0 {
            self.sampled += 1;
            self.count(ad);
        }
        if self.seen < self.window {
            return false;
        }
        self.end_round()
    }

    /// One sampled click into the Space-Saving summary.
    fn count(&mut self, ad: u64) {
        if let Some(i) = self.index.get(ad) {
            self.bump(i);
        } else if self.counters.len() < self.capacity {
            // A new counter of 1 goes before every larger count.
            let at = self.counters.partition_point(|&(c, _, _)| c < 1);
            self.counters.insert(at, (0, ad, 0));
            for (j, &(_, a, _)) in self.counters.iter().enumerate().skip(at) {
                self.index.set(a, j);
            }
            self.bump(at);
        } else {
            // Replace the minimum: the newcomer inherits its count as error bound.
            let (min, victim, _) = self.counters[0];
            self.index.remove(victim);
            self.counters[0] = (min, ad, min);
            self.index.set(ad, 0);
            self.bump(0);
        }
    }

    /// Ends a round: the ads above the threshold of the sampled clicks become the hot set.
    #[cold]
    fn end_round(&mut self) -> bool {
        let threshold = (self.sampled as f64 * self.fraction) as u64;
        let mut hot: Vec<u64> = self
            .counters
            .iter()
            .filter(|(c, _, e)| c.saturating_sub(*e) > threshold)
            .map(|(_, ad, _)| *ad)
            .collect();
        hot.sort_unstable();
        self.seen = 0;
        self.sampled = 0;
        self.counters.clear();
        self.index.clear();
        let changed = hot != self.hot;
        self.hot = hot;
        changed
    }

    /// Ads currently hot (sorted).
    pub fn hot(&self) -> &[u64] {
        &self.hot
    }

    /// Is `ad` hot now?
    pub fn is_hot(&self, ad: u64) -> bool {
        self.hot.binary_search(&ad).is_ok()
    }

    /// Restores the hot set from a checkpoint (the partial round restarts).
    pub fn restore(&mut self, hot: Vec<u64>) {
        self.hot = hot;
        self.hot.sort_unstable();
        self.seen = 0;
        self.sampled = 0;
        self.counters.clear();
        self.index.clear();
    }
}

/// The detector's index, ad -> position: at most `capacity` (<= 1,000) ads in a table of
/// at least 4x as many slots, linear probing, backward-shift deletion. A tail ad (most
/// clicks under Zipf traffic) costs a miss, a removal and an insertion per click; in this
/// small table, which stays in L1, they cost a few ns each, where hashbrown's cost ~3% of
/// the per-click path.
#[derive(Debug, Clone)]
struct Slots {
    /// `(ad, position)`; `EMPTY` position: a free slot.
    slots: Vec<(u64, u32)>,
    shift: u32,
}

const EMPTY: u32 = u32::MAX;

impl Slots {
    fn new(capacity: usize) -> Self {
        let n = (capacity * 4).next_power_of_two().max(16);
        Slots {
            slots: vec![(0, EMPTY); n],
            shift: 64 - n.trailing_zeros(),
        }
    }

    #[inline]
    fn home(&self, ad: u64) -> usize {
        // Fibonacci hashing: the high bits of the product pick the slot.
        ((ad ^ (ad >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        (i + 1) & (self.slots.len() - 1)
    }

    /// The slot holding `ad`, or the free slot ending its probe sequence.
    #[inline]
    fn find(&self, ad: u64) -> (usize, bool) {
        let mut i = self.home(ad);
        loop {
            let (a, p) = self.slots[i];
            if p == EMPTY {
                return (i, false);
            }
            if a == ad {
                return (i, true);
            }
            i = self.next(i);
        }
    }

    #[inline]
    fn get(&self, ad: u64) -> Option<usize> {
        match self.find(ad) {
            (i, true) => Some(self.slots[i].1 as usize),
            _ => None,
        }
    }

    /// Inserts or updates `ad`. The detector never holds more than a quarter of the slots.
    #[inline]
    fn set(&mut self, ad: u64, pos: usize) {
        let (i, _) = self.find(ad);
        self.slots[i] = (ad, u32::try_from(pos).unwrap_or(EMPTY - 1));
    }

    fn remove(&mut self, ad: u64) {
        let (mut hole, found) = self.find(ad);
        if !found {
            return;
        }
        self.slots[hole].1 = EMPTY;
        let mut j = hole;
        loop {
            j = self.next(j);
            let (a, p) = self.slots[j];
            if p == EMPTY {
                return;
            }
            let k = self.home(a);
            // The entry at j may move to the hole unless its home lies cyclically in
            // (hole, j].
            let stays = if hole <= j {
                hole < k && k <= j
            } else {
                hole < k || k <= j
            };
            if !stays {
                self.slots[hole] = (a, p);
                self.slots[j].1 = EMPTY;
                hole = j;
            }
        }
    }

    fn clear(&mut self) {
        self.slots.fill((0, EMPTY));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.1 != EMPTY).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::windows::splitmix;
    use proptest::prelude::*;

    proptest! {
        /// The Space-Saving guarantees, checked against exact counts of each round: an ad
        /// called hot had more than the threshold; an ad with more than the threshold plus
        /// the error bound (window / counters) is called hot. And the index is exact.
        #[test]
        fn hot_sets_keep_the_space_saving_guarantees(
            clicks in proptest::collection::vec(prop_oneof![3 => 0u64..5, 2 => 0u64..60, 1 => any::<u64>()], 0..3000),
            fraction in prop_oneof![Just(0.05), Just(0.1), Just(0.02)],
        ) {
            let mut d = HotDetector::new(200, fraction);
            let threshold = (d.window as f64 * fraction) as u64;
            let bound = d.window / d.capacity as u64;
            let mut round: std::collections::HashMap<u64, u64> = Default::default();
            for ad in clicks {
                *round.entry(ad).or_default() += 1;
                let ended = d.seen + 1 == d.window;
                d.observe(ad, ad);
                for (i, &(_, a, _)) in d.counters.iter().enumerate() {
                    prop_assert_eq!(d.index.get(a), Some(i));
                }
                prop_assert_eq!(d.index.len(), d.counters.len());
                prop_assert!(d.counters.windows(2).all(|w| w[0].0 <= w[1].0));
                if ended {
                    for (&a, &n) in &round {
                        if d.is_hot(a) {
                            prop_assert!(n > threshold, "ad {} with {} clicks called hot", a, n);
                        }
                        if n > threshold + bound {
                            prop_assert!(d.is_hot(a), "ad {} with {} clicks missed", a, n);
                        }
                    }
                    round.clear();
                }
            }
        }
    }

    proptest! {
        /// The index behaves as a map through insertions, updates and removals (the
        /// backward shift), with keys that collide in their home slot.
        #[test]
        fn slots_match_a_map(ops in proptest::collection::vec((0u8..3, 0u64..48, 0usize..40), 0..400)) {
            let mut s = Slots::new(16);
            let mut model = std::collections::HashMap::new();
            for (op, k, pos) in ops {
                // Sequential ids, ids equal modulo the table size, and spread ones.
                let ad = match k % 3 { 0 => k, 1 => k << 40, _ => k.wrapping_mul(0xD6E8_FEB8_6659_FD93) };
                match op {
                    0 if model.len() < 16 || model.contains_key(&ad) => {
                        s.set(ad, pos);
                        model.insert(ad, pos);
                    }
                    1 => {
                        s.remove(ad);
                        model.remove(&ad);
                    }
                    _ => prop_assert_eq!(s.get(ad), model.get(&ad).copied()),
                }
                prop_assert_eq!(s.len(), model.len());
            }
            for (ad, pos) in &model {
                prop_assert_eq!(s.get(*ad), Some(*pos));
            }
            s.clear();
            prop_assert!(model.keys().all(|ad| s.get(*ad).is_none()));
        }
    }

    #[test]
    fn an_ad_with_half_the_traffic_is_hot_and_others_are_not() {
        let mut d = HotDetector::new(10_000, 0.05);
        let mut x: u64 = 1;
        for i in 0..10_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let ad = if i % 2 == 0 {
                42
            } else {
                1_000 + (x >> 33) % 5_000
            };
            d.observe(ad, x);
        }
        assert_eq!(d.hot(), &[42]);
        assert!(d.is_hot(42) && !d.is_hot(1_001));
    }

    /// The default rounds are sampled (one click in 16): over several rounds of Zipf-like
    /// traffic, the ads well above the threshold are hot and those well below are not,
    /// as exact counts of each round (computed here) say.
    #[test]
    fn sampled_rounds_find_the_same_hot_ads_as_exact_counts() {
        let mut d = HotDetector::new(100_000, 0.05);
        assert_eq!(d.sample_mask, 15);
        let mut x: u64 = 7;
        let mut rng = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            splitmix(x)
        };
        for round in 0..5 {
            let mut exact: std::collections::HashMap<u64, u64> = Default::default();
            for _ in 0..100_000 {
                let r = rng();
                // 12% ad 1, 8% ad 2, 3% ad 3, 1% each of ads 10..20, the rest a long tail.
                let ad = match r % 100 {
                    0..12 => 1,
                    12..20 => 2,
                    20..23 => 3,
                    p @ 23..33 => 10 + (p - 23),
                    _ => 1_000 + (r >> 20) % 1_000_000,
                };
                *exact.entry(ad).or_default() += 1;
                d.observe(ad, rng());
            }
            let mut expected: Vec<u64> = exact
                .iter()
                .filter(|&(_, &n)| n > 7_000)
                .map(|(&a, _)| a)
                .collect();
            expected.sort_unstable();
            assert_eq!(d.hot(), &expected[..], "round {round}");
            assert!(exact.iter().all(|(a, &n)| n > 3_500 || !d.is_hot(*a)));
        }
    }
}
