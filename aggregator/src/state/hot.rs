//! Heavy-hitter detection with Space-Saving (Metwally et al.): `capacity` counters track
//! the most frequent ad ids in a round of `window` clicks with error at most
//! window/capacity per count. An ad whose guaranteed count (count - error) exceeds
//! `fraction` of the round is hot for the next round. Deterministic (no clocks, no
//! randomness), so a WAL replay makes the same decisions.

use super::FastMap;

/// Space-Saving summary plus the current hot set.
#[derive(Debug, Clone)]
pub struct HotDetector {
    capacity: usize,
    window: u64,
    fraction: f64,
    seen: u64,
    /// (count, ad, error bound), sorted by count (the stream-summary order); the first is
    /// the one a newcomer replaces. A small contiguous array: a tail ad replaces the
    /// minimum with one swap, where a scan of a hash map for the minimum cost ~10% of all
    /// the aggregator's per-click time.
    counters: Vec<(u64, u64, u64)>,
    /// ad -> its position in `counters`.
    index: FastMap<u64, usize>,
    hot: Vec<u64>,
}

impl HotDetector {
    /// A detector with rounds of `window` clicks and threshold `fraction`.
    pub fn new(window: u64, fraction: f64) -> Self {
        // Enough counters that an ad at the threshold is always tracked (40 at the
        // default 5%).
        let capacity = ((2.0 / fraction).ceil() as usize).clamp(16, 1_000);
        HotDetector {
            capacity,
            window: window.max(100),
            fraction,
            seen: 0,
            counters: Vec::with_capacity(capacity),
            index: FastMap::default(),
            hot: Vec::new(),
        }
    }

    /// Adds one to the counter at `i`, keeping the array sorted by count: it changes
    /// places with the last counter of its old count (one swap, two index updates).
    fn bump(&mut self, i: usize) {
        let c = self.counters[i].0;
        let mut j = i;
        while j + 1 < self.counters.len() && self.counters[j + 1].0 == c {
            j += 1;
        }
        if j != i {
            self.counters.swap(i, j);
            if let Some(p) = self.index.get_mut(&self.counters[i].1) {
                *p = i;
            }
        }
        self.counters[j].0 += 1;
        if let Some(p) = self.index.get_mut(&self.counters[j].1) {
            *p = j;
        }
    }

    /// Counts one click on `ad`. Returns true when a round ended and the hot set changed.
    pub fn observe(&mut self, ad: u64) -> bool {
        self.seen += 1;
        if let Some(&i) = self.index.get(&ad) {
            self.bump(i);
        } else if self.counters.len() < self.capacity {
            // A new counter of 1 goes before every larger count.
            let at = self.counters.partition_point(|&(c, _, _)| c < 1);
            self.counters.insert(at, (0, ad, 0));
            for (j, &(_, a, _)) in self.counters.iter().enumerate().skip(at) {
                self.index.insert(a, j);
            }
            self.bump(at);
        } else {
            // Replace the minimum: the newcomer inherits its count as error bound.
            let (min, victim, _) = self.counters[0];
            self.index.remove(&victim);
            self.counters[0] = (min, ad, min);
            self.index.insert(ad, 0);
            self.bump(0);
        }
        if self.seen < self.window {
            return false;
        }
        let threshold = (self.window as f64 * self.fraction) as u64;
        let mut hot: Vec<u64> = self
            .counters
            .iter()
            .filter(|(c, _, e)| c.saturating_sub(*e) > threshold)
            .map(|(_, ad, _)| *ad)
            .collect();
        hot.sort_unstable();
        self.seen = 0;
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
        self.counters.clear();
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                d.observe(ad);
                for (i, &(_, a, _)) in d.counters.iter().enumerate() {
                    prop_assert_eq!(d.index.get(&a), Some(&i));
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
            d.observe(ad);
        }
        assert_eq!(d.hot(), &[42]);
        assert!(d.is_hot(42) && !d.is_hot(1_001));
    }
}
