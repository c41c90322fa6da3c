//! One shard of the counting state: per (ad, bucket) cells at three levels (minute, hour,
//! day), each broken down by dimension combination with a unique-user sketch per
//! combination, plus the unfiltered minute-level top-N index. A shard is owned by one
//! worker thread (writes) and read by queries under a read lock.
//!
//! Memory per active (ad, minute) cell: the map entry (~80 bytes incl. key and hash
//! overhead) + one combo per distinct dimension combination (~64 bytes + its HLL, which is
//! a few bytes per user while sparse) + the top-N index entry; `heap_bytes` estimates it.
//! The same click also updates its hour and day cells.

use std::collections::BTreeSet;

use prost::Message;

use super::dims::DimKey;
use super::hll::Hll;
use super::topn::TopIndex;

/// Bucket widths in ms: minute, hour, day (UTC).
pub const LEVEL_MS: [i64; 3] = [60_000, 3_600_000, 86_400_000];

/// A click as a shard applies it (already deduplicated and routed).
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
    /// Dimensions.
    pub dims: DimKey,
    /// Hash of the user id (None: no user id).
    pub user_hash: Option<u64>,
    /// The minute was already final: this is a correction.
    pub late: bool,
}

/// Counts of one dimension combination in a cell.
#[derive(Debug, Clone, Default)]
pub struct Combo {
    /// Clicks.
    pub clicks: u64,
    /// Distinct users.
    pub users: Hll,
}

/// One (ad, bucket) cell.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    /// All clicks.
    pub clicks: u64,
    /// Bumped by every late correction of a final bucket.
    pub version: u32,
    /// Breakdown by dimensions.
    pub combos: super::FastMap<DimKey, Combo>,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct ShardState {
    levels: [super::FastMap<(u64, i64), Cell>; 3],
    /// (bucket start, ad) per level, for time-ordered scans and eviction.
    order: [BTreeSet<(i64, u64)>; 3],
    top: TopIndex,
    ads: super::FastMap<u64, (u64, u64)>,
}

fn bucket(t: i64, level: usize) -> i64 {
    t.div_euclid(LEVEL_MS[level]) * LEVEL_MS[level]
}

impl ShardState {
    /// Applies one click to its minute, hour and day cells.
    pub fn apply(&mut self, a: &Applied) {
        self.ads.insert(a.ad, (a.advertiser, a.campaign));
        for level in 0..3 {
            let start = bucket(a.event_time_ms, level);
            let cell = self.levels[level].entry((a.ad, start)).or_insert_with(|| {
                self.order[level].insert((start, a.ad));
                Cell::default()
            });
            cell.clicks += 1;
            if a.late {
                cell.version = cell.version.saturating_add(1);
            }
            let combo = cell.combos.entry(a.dims).or_default();
            combo.clicks += 1;
            if let Some(h) = a.user_hash {
                combo.users.insert_hash(h);
            }
        }
        self.top
            .add(a.ad, a.event_time_ms.div_euclid(LEVEL_MS[0]), 1);
    }

    /// Drops buckets of `level` that start before `before_ms`.
    pub fn evict(&mut self, level: usize, before_ms: i64) {
        while let Some(&(start, ad)) = self.order[level].iter().next() {
            if start >= before_ms {
                break;
            }
            self.order[level].remove(&(start, ad));
            self.levels[level].remove(&(ad, start));
        }
        if level == 0 {
            self.top.evict_before(before_ms.div_euclid(LEVEL_MS[0]));
        }
    }

    /// The cell of `ad` at `level` starting at `start`.
    pub fn cell(&self, level: usize, ad: u64, start: i64) -> Option<&Cell> {
        self.levels[level].get(&(ad, start))
    }

    /// Every cell of `level` whose bucket starts in [from, to), in time order.
    pub fn cells_in(
        &self,
        level: usize,
        from: i64,
        to: i64,
    ) -> impl Iterator<Item = (i64, u64, &Cell)> + '_ {
        self.order[level]
            .range((from, 0)..(to, 0))
            .filter_map(move |(s, ad)| self.levels[level].get(&(*ad, *s)).map(|c| (*s, *ad, c)))
    }

    /// Exact unfiltered top `n` over minutes [from, to) (minute indices).
    pub fn top(&self, n: usize, from_minute: i64, to_minute: i64) -> Vec<(u64, u64)> {
        self.top.top(n, from_minute, to_minute)
    }

    /// Unfiltered count of `ad` over minutes [from, to).
    pub fn count(&self, ad: u64, from_minute: i64, to_minute: i64) -> u64 {
        self.top.count(ad, from_minute, to_minute)
    }

    /// (advertiser, campaign) of an ad this shard has seen.
    pub fn ad_meta(&self, ad: u64) -> Option<(u64, u64)> {
        self.ads.get(&ad).copied()
    }

    /// Active minute cells.
    pub fn minute_cells(&self) -> usize {
        self.levels[0].len()
    }

    /// Approximate heap bytes of everything in this shard.
    pub fn heap_bytes(&self) -> usize {
        let mut total = self.top.heap_bytes() + self.ads.len() * 40;
        for level in 0..3 {
            total +=
                self.levels[level].len() * (16 + 8 + 4 + 48 + 16) + self.order[level].len() * 32;
            for cell in self.levels[level].values() {
                total += cell.combos.len() * (12 + 8 + 24 + 16);
                total += cell
                    .combos
                    .values()
                    .map(|c| c.users.heap_bytes())
                    .sum::<usize>();
            }
        }
        total
    }

    /// Serialises the shard (checkpoint table).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut pb = ShardPb::default();
        for (level, map) in self.levels.iter().enumerate() {
            for ((ad, start), cell) in map {
                pb.cells.push(CellPb {
                    level: level as u32,
                    ad: *ad,
                    start: *start,
                    clicks: cell.clicks,
                    version: cell.version,
                    combos: cell
                        .combos
                        .iter()
                        .map(|(k, c)| ComboPb {
                            country: u32::from(u16::from_le_bytes(k.country)),
                            device: u32::from(k.device),
                            os: k.os,
                            site: k.site,
                            clicks: c.clicks,
                            users: c.users.to_bytes(),
                        })
                        .collect(),
                });
            }
        }
        pb.ads = self
            .ads
            .iter()
            .map(|(ad, (adv, camp))| AdPb {
                ad: *ad,
                advertiser: *adv,
                campaign: *camp,
            })
            .collect();
        pb.encode_to_vec()
    }

    /// Restores a shard from `to_bytes` output.
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        let pb = ShardPb::decode(b).map_err(|e| format!("shard checkpoint: {e}"))?;
        let mut s = ShardState::default();
        for c in pb.cells {
            let level = c.level as usize;
            if level > 2 {
                return Err(format!("shard checkpoint: bad level {level}"));
            }
            let mut cell = Cell {
                clicks: c.clicks,
                version: c.version,
                combos: Default::default(),
            };
            for k in c.combos {
                let key = DimKey {
                    country: u16::try_from(k.country).unwrap_or(0).to_le_bytes(),
                    device: u8::try_from(k.device).unwrap_or(0),
                    os: k.os,
                    site: k.site,
                };
                let users =
                    Hll::from_bytes(&k.users).map_err(|e| format!("shard checkpoint: {e}"))?;
                cell.combos.insert(
                    key,
                    Combo {
                        clicks: k.clicks,
                        users,
                    },
                );
            }
            if level == 0 {
                s.top.add(c.ad, c.start.div_euclid(LEVEL_MS[0]), c.clicks);
            }
            s.order[level].insert((c.start, c.ad));
            s.levels[level].insert((c.ad, c.start), cell);
        }
        s.ads = pb
            .ads
            .into_iter()
            .map(|a| (a.ad, (a.advertiser, a.campaign)))
            .collect();
        Ok(s)
    }
}

#[derive(Clone, PartialEq, Message)]
struct ShardPb {
    #[prost(message, repeated, tag = "1")]
    cells: Vec<CellPb>,
    #[prost(message, repeated, tag = "2")]
    ads: Vec<AdPb>,
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
    use proptest::prelude::*;

    fn click(ad: u64, t: i64) -> Applied {
        Applied {
            ad,
            advertiser: 1,
            campaign: 2,
            event_time_ms: t,
            dims: DimKey {
                country: *b"US",
                device: 2,
                os: 1,
                site: 1,
            },
            user_hash: Some(ad.wrapping_mul(31).wrapping_add(t as u64)),
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
        s.evict(0, t0 + 5 * 60_000);
        assert!(s.cell(0, 1, t0 + 4 * 60_000).is_none());
        assert_eq!(s.cell(0, 1, t0 + 5 * 60_000).map(|c| c.clicks), Some(1));
        assert_eq!(
            s.count(1, t0 / 60_000, t0 / 60_000 + 10),
            5,
            "top-N index evicted too"
        );
        // The hour and day rollups keep everything until their own retention.
        assert_eq!(s.cell(1, 1, t0).map(|c| c.clicks), Some(10));
        assert_eq!(s.cell(2, 1, t0).map(|c| c.clicks), Some(10));
        let back = ShardState::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back.cell(1, 1, t0).map(|c| c.clicks), Some(10));
        assert_eq!(back.count(1, t0 / 60_000, t0 / 60_000 + 10), 5);
    }

    proptest! {
        /// Window assignment: every click lands in the bucket that contains its event time,
        /// at every level, including before the epoch.
        #[test]
        fn window_assignment(t in -10_000_000_000_000i64..10_000_000_000_000) {
            let mut s = ShardState::default();
            s.apply(&click(7, t));
            for (level, w) in LEVEL_MS.iter().enumerate() {
                let start = t.div_euclid(*w) * w;
                prop_assert!(start <= t && t < start + w);
                prop_assert_eq!(s.cell(level, 7, start).map(|c| c.clicks), Some(1));
            }
        }
    }
}
