//! Which aggregator shard owns a click, and the fanout salt.
//!
//! Routing key = (ad id, salt); the shard is chosen by rendezvous (highest-random-weight)
//! hashing over the configured endpoints, so adding a shard moves only ~1/n of the keys.
//! The hash is a fixed mix (splitmix64 over FNV-1a of the endpoint), stable across
//! processes and Rust versions.
//!
//! **The salt is a pure function of the impression id** (and `forward.hot_fanout`), never
//! of what this collector happens to know about hot ads: aggregator shards are separate
//! processes with separate exact dedup, so every copy of one impression, through any
//! collector, at any time, must reach the same shard. (A salt chosen only for ads a
//! collector believed hot sent one impression to two shards when two collectors disagreed,
//! and it counted twice.) With `hot_fanout = 1` every ad lives on one shard; above 1 every
//! ad's clicks are spread over up to `hot_fanout` keys, so queries sum the shards. The
//! aggregators' hot lists are still tracked ([`HotAds::is_hot`]) for metrics and logs.
//!
//! The salt is stored with the spooled click, so a resend after a crash goes to the same
//! shard even if the fanout setting changed meanwhile.

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

    /// Whether any aggregator currently reports `ad_id` as hot.
    pub fn is_hot(&self, ad_id: u64) -> bool {
        self.by_shard
            .read()
            .is_ok_and(|m| m.values().any(|s| s.contains(&ad_id)))
    }

    /// Salt for a click: 0 when `hot_fanout` is 1, else 1..=fanout from the impression id
    /// alone (see the module doc: never from this collector's view of hot ads). `ad_id` is
    /// deliberately unused.
    pub fn salt(&self, _ad_id: u64, impression_id: &[u8]) -> u32 {
        fanout_salt(self.fanout, impression_id)
    }
}

/// The salt of an impression under `fanout`: 0 for `fanout <= 1`, else
/// `1 + mix(impression id) % fanout`. Impression ids are random, but the mix keeps the
/// spread even for ids that are not.
pub fn fanout_salt(fanout: u32, impression_id: &[u8]) -> u32 {
    if fanout <= 1 {
        return 0;
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    for (dst, src) in a.iter_mut().zip(impression_id.iter()) {
        *dst = *src;
    }
    for (dst, src) in b.iter_mut().zip(impression_id.iter().skip(8)) {
        *dst = *src;
    }
    let h = splitmix(u64::from_le_bytes(a) ^ splitmix(u64::from_le_bytes(b)));
    1 + (h % u64::from(fanout)) as u32
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
    fn salts_depend_on_the_impression_only_never_on_hot_state() {
        let a = HotAds::new(4);
        let b = HotAds::new(4);
        // Collector `a` heard that ad 7 is hot, collector `b` did not: same salts anyway.
        a.update(0, &[7]);
        assert!(a.is_hot(7) && !b.is_hot(7));
        for i in 0..=255u8 {
            let id = [
                i,
                i.wrapping_mul(7),
                3,
                4,
                5,
                6,
                7,
                8,
                9,
                10,
                11,
                12,
                13,
                14,
                15,
                i,
            ];
            let s = a.salt(7, &id);
            assert!((1..=4).contains(&s));
            assert_eq!(
                b.salt(7, &id),
                s,
                "same impression, same salt on every collector"
            );
            assert_eq!(a.salt(8, &id), s, "the salt does not depend on the ad");
        }
        let salts: HashSet<u32> = (0..64u8).map(|i| a.salt(7, &[i; 16])).collect();
        assert_eq!(salts.len(), 4);
        assert_eq!(HotAds::new(1).salt(7, &[9; 16]), 0, "fanout 1: no salt");
    }
}
