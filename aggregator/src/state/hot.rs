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
    /// ad -> (count, error bound).
    counts: FastMap<u64, (u64, u64)>,
    hot: Vec<u64>,
}

impl HotDetector {
    /// A detector with rounds of `window` clicks and threshold `fraction`.
    pub fn new(window: u64, fraction: f64) -> Self {
        // Enough counters that an ad at the threshold is always tracked; replacement scans
        // the counters for the minimum, so keep them few (40 at the default 5%).
        let capacity = ((2.0 / fraction).ceil() as usize).clamp(16, 1_000);
        HotDetector {
            capacity,
            window: window.max(100),
            fraction,
            seen: 0,
            counts: FastMap::default(),
            hot: Vec::new(),
        }
    }

    /// Counts one click on `ad`. Returns true when a round ended and the hot set changed.
    pub fn observe(&mut self, ad: u64) -> bool {
        self.seen += 1;
        if let Some((c, _)) = self.counts.get_mut(&ad) {
            *c += 1;
        } else if self.counts.len() < self.capacity {
            self.counts.insert(ad, (1, 0));
        } else if let Some((&victim, &(min, _))) =
            self.counts.iter().min_by_key(|(a, (c, _))| (*c, **a))
        {
            // Replace the minimum: the newcomer inherits its count as error bound.
            self.counts.remove(&victim);
            self.counts.insert(ad, (min + 1, min));
        }
        if self.seen < self.window {
            return false;
        }
        let threshold = (self.window as f64 * self.fraction) as u64;
        let mut hot: Vec<u64> = self
            .counts
            .iter()
            .filter(|(_, (c, e))| c.saturating_sub(*e) > threshold)
            .map(|(ad, _)| *ad)
            .collect();
        hot.sort_unstable();
        self.seen = 0;
        self.counts.clear();
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
        self.counts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
