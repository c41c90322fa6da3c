//! Which aggregator shard owns a click, and hot-ad fanout.
//!
//! Routing key = the ad id, or (ad id, salt) for an ad the aggregators report as hot; the
//! shard is chosen by rendezvous (highest-random-weight) hashing over the configured
//! endpoints, so adding a shard moves only ~1/n of the ads. The hash is a fixed mix
//! (splitmix64 over FNV-1a of the endpoint), stable across processes and Rust versions.
//!
//! The salt is decided when the click is spooled and stored with it, so a resend after a
//! crash always goes to the same shard; it derives from the impression id, so duplicates
//! of one impression land on the same shard and meet the same exact dedup.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Rendezvous router over shard names.
#[derive(Debug, Clone)]
pub struct Router {
    seeds: Vec<u64>,
}

impl Router {
    /// A router over `shards` (their endpoint strings).
    pub fn new(shards: &[String]) -> Self {
        Router {
            seeds: shards.iter().map(|s| fnv1a(s)).collect(),
        }
    }

    /// The shard index owning `(ad_id, salt)`.
    pub fn shard(&self, ad_id: u64, salt: u32) -> usize {
        if self.seeds.len() <= 1 {
            return 0;
        }
        let key = splitmix(ad_id ^ (u64::from(salt) << 48).rotate_left(7));
        let mut best = (0, 0u64);
        for (i, seed) in self.seeds.iter().enumerate() {
            let w = splitmix(key ^ seed);
            if w > best.1 {
                best = (i, w);
            }
        }
        best.0
    }
}

/// The ads aggregators currently report as hot, and the fanout for them.
#[derive(Debug)]
pub struct HotAds {
    /// Hot ads as last reported by each shard.
    by_shard: RwLock<HashMap<usize, HashSet<u64>>>,
    fanout: u32,
}

impl HotAds {
    /// No hot ads yet; hot ones get spread over `fanout` salts.
    pub fn new(fanout: u32) -> Self {
        HotAds {
            by_shard: RwLock::new(HashMap::new()),
            fanout: fanout.max(1),
        }
    }

    /// Replaces what `shard` reports as hot with its latest ack's list.
    pub fn update(&self, shard: usize, hot: &[u64]) {
        let unchanged = self.by_shard.read().is_ok_and(|m| {
            m.get(&shard).map_or(hot.is_empty(), |s| {
                s.len() == hot.len() && hot.iter().all(|a| s.contains(a))
            })
        });
        if unchanged {
            return;
        }
        let mut m = self.by_shard.write().unwrap_or_else(|e| e.into_inner());
        m.insert(shard, hot.iter().copied().collect());
    }

    /// Salt for a click: 0 for ordinary ads, 1..=fanout from the impression id for hot ads.
    pub fn salt(&self, ad_id: u64, impression_id: &[u8]) -> u32 {
        if self.fanout <= 1 {
            return 0;
        }
        let hot = self
            .by_shard
            .read()
            .is_ok_and(|m| m.values().any(|s| s.contains(&ad_id)));
        if !hot {
            return 0;
        }
        let mut b = [0u8; 4];
        for (dst, src) in b.iter_mut().zip(impression_id.iter().rev()) {
            *dst = *src;
        }
        1 + u32::from_le_bytes(b) % self.fanout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_balanced_and_moves_little() {
        let three: Vec<String> = (0..3).map(|i| format!("http://agg{i}:9090")).collect();
        let r3 = Router::new(&three);
        let mut counts = [0usize; 3];
        for ad in 0..30_000u64 {
            counts[r3.shard(ad, 0)] += 1;
        }
        assert!(
            counts.iter().all(|c| (8_000..12_000).contains(c)),
            "{counts:?}"
        );
        let mut four = three.clone();
        four.push("http://agg3:9090".into());
        let r4 = Router::new(&four);
        let moved = (0..30_000u64)
            .filter(|ad| r3.shard(*ad, 0) != r4.shard(*ad, 0))
            .count();
        // Ideal is 1/4; every moved ad must go to the new shard.
        assert!((6_000..9_000).contains(&moved), "{moved}");
        assert!(
            (0..30_000u64).all(|ad| r3.shard(ad, 0) == r4.shard(ad, 0) || r4.shard(ad, 0) == 3)
        );
    }

    #[test]
    fn hot_ads_get_stable_salts_in_range() {
        let hot = HotAds::new(4);
        assert_eq!(hot.salt(7, &[1; 16]), 0);
        hot.update(0, &[7]);
        let s = hot.salt(7, &[9; 16]);
        assert!((1..=4).contains(&s));
        assert_eq!(hot.salt(7, &[9; 16]), s, "same impression, same salt");
        assert_eq!(hot.salt(8, &[9; 16]), 0);
        let salts: HashSet<u32> = (0..64u8).map(|i| hot.salt(7, &[i; 16])).collect();
        assert_eq!(salts.len(), 4);
    }
}
