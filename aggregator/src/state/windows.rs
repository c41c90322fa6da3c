//! The window operator (single-threaded, in WAL order): exact dedup by impression id,
//! the event-time watermark, late/too-old classification, dimension interning, hot-key
//! detection and routing of each click to the shard that counts it.
//!
//! Deterministic by construction (no wall clock, no randomness): dedup entries expire by
//! event time, hot-key rounds are counted in clicks. A replay of the WAL from a
//! checkpoint therefore reaches exactly the same state.
//!
//! What counts is decided by the rule shared with the collectors
//! (`adclick_proto::countable`), so nothing a collector acked is refused here except as a
//! duplicate (or for an ad owner mismatch, which only a misbehaving ad server causes).
//! Exact dedup lives in [`super::dedup`] (bounded RAM, spilled to disk).

use std::collections::BTreeSet;

use adclick_proto::countable;
use prost::Message;

use super::click::ClickIn;
use super::dedup::{Dedup, DedupError, Entry, MemTable, Ordinal};
use super::dims::{ComboTable, DimKey, Interner, country_code};
use super::hot::HotDetector;
use super::shard::{Applied, LEVEL_MS};
use crate::config::{ShardConfig, WindowConfig};
use crate::sketch::hll::{Hll, hash_user_id};

pub use adclick_proto::countable::{MAX_EVENT_MS, MAX_TOKEN_LIFETIME_MS, MIN_EVENT_MS};

/// RAM budget of the dedup set of [`ClickWindows::new`] (the engine sets its own from
/// `dedup.memory_bytes`).
pub const DEFAULT_DEDUP_MEMORY_BYTES: usize = 256 << 20;

/// What became of one click.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Counted by shard `.0`.
    Apply(usize, Applied),
    /// An impression already counted.
    Duplicate,
    /// Older than the minute retention: not counted (quarantined with a reason).
    TooOld,
    /// Not a valid click record (bad impression id, implausible event time).
    Malformed,
    /// The dedup disk tier failed: nothing can be decided; the engine stops acking and a
    /// restart replays the WAL.
    Unavailable,
    /// The ad was first seen with another advertiser/campaign: refused, so an advertiser can
    /// never read (or inflate) counts of an ad that is not theirs.
    OwnerMismatch,
}

/// Running totals (exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCounters {
    /// Clicks counted.
    pub applied: u64,
    /// Of which late corrections.
    pub late: u64,
    /// Duplicates dropped.
    pub duplicate: u64,
    /// Too old to count.
    pub too_old: u64,
    /// Malformed records.
    pub malformed: u64,
    /// Clicks whose advertiser/campaign disagreed with the ad's first-seen owner.
    pub owner_mismatch: u64,
}

/// Clicks whose ad-owner lines [`ClickWindows::process`] loads together, a group ahead.
const OWNER_GROUP: usize = 16;

/// See the module doc.
#[derive(Debug)]
pub struct ClickWindows {
    cfg: WindowConfig,
    shards: usize,
    dedup: Dedup,
    /// Ordinal of the next click (set per WAL entry by [`ClickWindows::begin_batch`]).
    next: Ordinal,
    /// The first dedup disk failure, for the engine.
    error: Option<DedupError>,
    max_event_ms: i64,
    interner: Interner,
    combos: ComboTable,
    hot: HotDetector,
    /// Ads whose clicks were ever spread over several shards (always TopAds candidates).
    split: BTreeSet<u64>,
    /// ad -> (advertiser, campaign), pinned on first sight.
    owners: super::FastMap<u64, (u64, u64)>,
    /// Owners pinned since the last [`ClickWindows::take_new_owners`] (for the query view).
    new_owners: Vec<(u64, (u64, u64))>,
    /// The ads of the batch announced by [`ClickWindows::warm`], and how many of its clicks
    /// `process` has seen since (performance only: no answer depends on them).
    ahead_ads: Vec<u64>,
    ahead_at: usize,
    /// Totals.
    pub counters: WindowCounters,
}

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl ClickWindows {
    /// A fresh operator with an in-memory dedup disk tier.
    pub fn new(cfg: WindowConfig, shards: &ShardConfig) -> Self {
        Self::with_dedup(
            cfg,
            shards,
            Dedup::new(DEFAULT_DEDUP_MEMORY_BYTES, Box::<MemTable>::default()),
        )
    }

    /// A fresh operator over the given dedup set.
    pub fn with_dedup(cfg: WindowConfig, shards: &ShardConfig, dedup: Dedup) -> Self {
        ClickWindows {
            cfg,
            shards: shards.count.max(1),
            dedup,
            next: Ordinal::default(),
            error: None,
            max_event_ms: i64::MIN,
            interner: Interner::default(),
            combos: ComboTable::default(),
            hot: HotDetector::new(shards.hot_window_clicks, shards.hot_fraction),
            split: BTreeSet::new(),
            owners: Default::default(),
            new_owners: Vec::new(),
            ahead_ads: Vec::new(),
            ahead_at: 0,
            counters: WindowCounters::default(),
        }
    }

    /// Max event time seen minus the allowed delay (i64::MIN before any click).
    pub fn watermark_ms(&self) -> i64 {
        self.max_event_ms.saturating_sub(self.cfg.allowed_delay_ms)
    }

    /// Ads currently hot.
    pub fn hot_ads(&self) -> &[u64] {
        self.hot.hot()
    }

    /// Ads ever split over shards.
    pub fn split_ads(&self) -> &BTreeSet<u64> {
        &self.split
    }

    /// Interned strings (for query-side lookups).
    pub fn interner(&self) -> &Interner {
        &self.interner
    }

    /// Ads pinned to an owner since the last call, for the query view.
    pub fn take_new_owners(&mut self) -> Vec<(u64, (u64, u64))> {
        std::mem::take(&mut self.new_owners)
    }

    /// ad -> (advertiser, campaign) of every ad seen.
    pub fn owners(&self) -> &super::FastMap<u64, (u64, u64)> {
        &self.owners
    }

    /// The id of a dimension combination (restoring shards checkpointed before ids).
    pub fn intern_combo(&mut self, k: DimKey) -> u32 {
        self.combos.intern(k)
    }

    /// Dimension combinations (query-side lookups of combination ids).
    pub fn combos(&self) -> &ComboTable {
        &self.combos
    }

    /// Impression ids held in the dedup RAM tier.
    pub fn dedup_len(&self) -> usize {
        self.dedup.ram_len()
    }

    /// The dedup set (stats, sizes).
    pub fn dedup(&self) -> &Dedup {
        &self.dedup
    }

    /// The clicks that follow come from the WAL entry at `pos`, in order.
    pub fn begin_batch(&mut self, pos: u64) {
        self.next = Ordinal { pos, idx: 0 };
    }

    /// The first dedup disk failure since the last call.
    pub fn take_error(&mut self) -> Option<DedupError> {
        self.error.take()
    }

    /// Oldest event time still counted (watermark - minute retention): dedup ids whose
    /// `keep_until` is before it can never matter again.
    pub fn dedup_floor_ms(&self) -> i64 {
        self.watermark_ms()
            .saturating_sub(self.cfg.retention_minutes.saturating_mul(LEVEL_MS[0]))
    }

    /// Checkpoint step for the dedup set: freeze the RAM tier and spill it in the
    /// background, deleting ids below `expire_before` (the floor of the last *committed*
    /// checkpoint: see `dedup`). Returns the ticket to wait for with
    /// [`ClickWindows::dedup_flushed`] before the checkpoint may be saved, or `None` while
    /// an earlier spill is in flight (unless `wait`).
    pub fn begin_dedup_flush(
        &mut self,
        expire_before: i64,
        wait: bool,
    ) -> Result<Option<u64>, DedupError> {
        self.dedup.begin_flush(expire_before, wait)
    }

    /// Whether the dedup flush `ticket` is durable (`None`: still running, unless `wait`).
    pub fn dedup_flushed(&mut self, ticket: u64, wait: bool) -> Option<Result<(), DedupError>> {
        self.dedup.flushed(ticket, wait)
    }

    /// Waits for the dedup spill in flight (before the store under it is released).
    pub fn wait_dedup(&mut self) -> Result<(), DedupError> {
        self.dedup.wait()
    }

    /// The combination id of a repair's (country, device, os, site), interned like a
    /// click's (`crate::repair`; on the writer thread, so a replay assigns the same ids).
    pub fn intern_dims(&mut self, country: &str, device: i32, os: &str, site: &str) -> u32 {
        let dims = DimKey {
            country: country_code(country),
            device: u8::try_from(device).unwrap_or(0),
            os: self.interner.intern(os),
            site: self.interner.intern(site),
        };
        self.combos.intern(dims)
    }

    /// The shard an ad's clicks go to unless it is split (see [`ClickWindows::split_ads`]).
    pub fn home_shard(&self, ad: u64) -> usize {
        (splitmix(ad) % self.shards as u64) as usize
    }

    /// Rebuilds the dedup Bloom filter from its disk tier (after opening it).
    pub fn rebuild_dedup_bloom(&mut self) -> Result<(), DedupError> {
        self.dedup.rebuild_bloom()
    }
}

impl ClickWindows {
    /// Warms the cache lines [`ClickWindows::process`] will miss on for some clicks (the
    /// engine's: one decode chunk, `decode::DECODE_CHUNK`) (dedup RAM tier and Bloom
    /// filter, ad owners), before they are processed in order: independent loads overlap here, where inside `process` each waits alone.
    /// Changes no counted state (a replay with or without it is the same): the dedup set
    /// only learns which ids come next, to load their lines a few clicks ahead
    /// ([`Dedup::warm_batch`]).
    pub fn warm(&mut self, clicks: &[ClickIn<'_>]) {
        self.dedup.warm_batch(
            clicks
                .iter()
                .filter_map(|c| <&[u8; 16]>::try_from(c.impression_id).ok()),
        );
        self.ahead_ads.clear();
        self.ahead_ads.extend(clicks.iter().map(|c| c.ad_id));
        self.ahead_at = 0;
        self.warm_owners(0..OWNER_GROUP);
    }

    /// Loads the ad-owner lines of the announced clicks in `range` (clipped to the batch).
    fn warm_owners(&self, range: std::ops::Range<usize>) {
        let end = range.end.min(self.ahead_ads.len());
        for ad in self.ahead_ads.get(range.start.min(end)..end).unwrap_or(&[]) {
            std::hint::black_box(self.owners.contains_key(ad));
        }
    }

    /// One more click of the announced batch is processed: on entering a group of
    /// [`OWNER_GROUP`], loads the owner lines of the next group, so that they overlap each
    /// other and are still cached when their clicks come (loaded for the whole batch up
    /// front, the tail ads' lines were mostly evicted by then). Clicks processed without
    /// an announcement only move the cursor past its end.
    #[inline]
    fn step_owners(&mut self) {
        let i = self.ahead_at;
        self.ahead_at += 1;
        if i.is_multiple_of(OWNER_GROUP) && i < self.ahead_ads.len() {
            self.warm_owners(i + OWNER_GROUP..i + 2 * OWNER_GROUP);
        }
    }

    /// Classifies one click and, when it counts, routes it. Deterministic: a WAL replay
    /// feeds the same clicks in the same order and reaches the same state.
    pub fn process(&mut self, c: &ClickIn<'_>) -> Routed {
        self.step_owners();
        let ordinal = self.next;
        self.next.idx = self.next.idx.saturating_add(1);
        let Ok(id) = <[u8; 16]>::try_from(c.impression_id) else {
            self.counters.malformed += 1;
            return Routed::Malformed;
        };
        // Never trust a time from the wire: an absurd event time would drag the watermark
        // (evicting everything) or overflow bucket arithmetic. The rule is the one the
        // collectors applied before acking.
        if countable::check_event_time(c.event_time_ms, c.token_expires_at_ms).is_err() {
            self.counters.malformed += 1;
            return Routed::Malformed;
        }
        let watermark = self.watermark_ms();
        if countable::check_age(c.event_time_ms, self.dedup_floor_ms()).is_err() {
            self.counters.too_old += 1;
            return Routed::TooOld;
        }
        // Owner before dedup (a mismatching click is refused without recording its id),
        // but an unseen ad is pinned only once dedup says the click is new: a duplicate
        // claiming another ad must not pin it.
        let claimed = (c.advertiser_id, c.campaign_id);
        let known = self.owners.get(&c.ad_id).copied();
        if known.is_some_and(|owner| owner != claimed) {
            self.counters.owner_mismatch += 1;
            return Routed::OwnerMismatch;
        }
        // Every copy of this impression has an event time at or before `keep` (countable
        // rule), so the id matters until `keep` falls below the dedup floor.
        let keep = c
            .token_expires_at_ms
            .saturating_add(self.cfg.dedup_skew_ms.max(countable::MAX_SKEW_MS));
        let entry = Entry {
            keep_until: keep,
            ordinal,
        };
        match self.dedup.check_insert(id, entry) {
            Ok(false) => {}
            Ok(true) => {
                self.counters.duplicate += 1;
                return Routed::Duplicate;
            }
            Err(e) => {
                self.error.get_or_insert(e);
                return Routed::Unavailable;
            }
        }
        if known.is_none() {
            self.owners.insert(c.ad_id, claimed);
            self.new_owners.push((c.ad_id, claimed));
        }
        let minute_end = c.event_time_ms.div_euclid(LEVEL_MS[0]) * LEVEL_MS[0] + LEVEL_MS[0];
        let late = minute_end <= watermark;
        if c.event_time_ms > self.max_event_ms {
            self.max_event_ms = c.event_time_ms;
        }
        let id_hash = splitmix(u64::from_le_bytes([
            id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7],
        ]));
        self.hot.observe(c.ad_id, id_hash);
        let dims = DimKey {
            country: country_code(c.country),
            device: u8::try_from(c.device).unwrap_or(0),
            os: self.interner.intern(c.os),
            site: self.interner.intern(c.site),
        };
        let combo = self.combos.intern(dims);
        // Only this aggregator's own hot detector spreads an ad over its worker shards: the
        // collectors' salt is set for every ad (it picks the aggregator process, see the
        // collector's routing.rs) and says nothing about heat here.
        let shard = if self.shards > 1 && self.hot.is_hot(c.ad_id) {
            // A hot ad is spread over every shard; the impression picks one, so its
            // duplicates (already dropped above) would have met the same dedup anyway.
            self.split.insert(c.ad_id);
            (id_hash % self.shards as u64) as usize
        } else {
            (splitmix(c.ad_id) % self.shards as u64) as usize
        };
        self.counters.applied += 1;
        self.counters.late += u64::from(late);
        Routed::Apply(
            shard,
            Applied {
                ad: c.ad_id,
                advertiser: c.advertiser_id,
                campaign: c.campaign_id,
                event_time_ms: c.event_time_ms,
                combo,
                dims,
                user: if c.user_id.is_empty() {
                    0
                } else {
                    Hll::entry_of_hash(hash_user_id(c.user_id))
                },
                late,
            },
        )
    }

    /// The operator's checkpoint table (`windows`).
    pub fn checkpoint(&self) -> Vec<(&'static str, Vec<u8>)> {
        let pb = WindowsPb {
            max_event_ms: self.max_event_ms,
            // Dedup ids are in the dedup disk tier (flushed before every checkpoint).
            seen_ids: Vec::new(),
            seen_until: Vec::new(),
            names: self.interner.names().to_vec(),
            hot: self.hot.hot().to_vec(),
            split: self.split.iter().copied().collect(),
            applied: self.counters.applied,
            late: self.counters.late,
            duplicate: self.counters.duplicate,
            too_old: self.counters.too_old,
            malformed: self.counters.malformed,
            owners: self
                .owners
                .iter()
                .flat_map(|(ad, (adv, camp))| [*ad, *adv, *camp])
                .collect(),
            owner_mismatch: self.counters.owner_mismatch,
            combos: self.combos.pack(),
        };
        vec![("windows", pb.encode_to_vec())]
    }

    /// Restores from the tables written by `checkpoint` (missing: empty state).
    pub fn restore(&mut self, tables: &[(String, Vec<u8>)]) -> Result<(), String> {
        let Some((_, blob)) = tables.iter().find(|(t, _)| t == "windows") else {
            return Ok(());
        };
        let pb =
            WindowsPb::decode(blob.as_slice()).map_err(|e| format!("windows checkpoint: {e}"))?;
        if pb.seen_ids.len() != pb.seen_until.len() * 16 {
            return Err("windows checkpoint: dedup table is inconsistent".into());
        }
        self.max_event_ms = pb.max_event_ms;
        // A checkpoint written before dedup spilled to disk carries the ids inline: move
        // them into the dedup set (ordinal 0: inserted before anything in the WAL).
        for (chunk, until) in pb.seen_ids.chunks_exact(16).zip(pb.seen_until) {
            let mut id = [0u8; 16];
            id.copy_from_slice(chunk);
            let entry = Entry {
                keep_until: until.saturating_add(countable::MAX_SKEW_MS),
                ordinal: Ordinal::default(),
            };
            self.dedup
                .insert(id, entry)
                .map_err(|e| format!("windows checkpoint: {e}"))?;
        }
        self.interner = Interner::from_names(pb.names);
        self.combos =
            ComboTable::unpack(&pb.combos).map_err(|e| format!("windows checkpoint: {e}"))?;
        self.hot.restore(pb.hot);
        self.split = pb.split.into_iter().collect();
        self.counters = WindowCounters {
            applied: pb.applied,
            late: pb.late,
            duplicate: pb.duplicate,
            too_old: pb.too_old,
            malformed: pb.malformed,
            owner_mismatch: pb.owner_mismatch,
        };
        if pb.owners.len() % 3 != 0 {
            return Err("windows checkpoint: owner table is inconsistent".into());
        }
        self.owners = pb
            .owners
            .chunks_exact(3)
            .map(|t| (t[0], (t[1], t[2])))
            .collect();
        Ok(())
    }
}

#[derive(Clone, PartialEq, Message)]
struct WindowsPb {
    #[prost(int64, tag = "1")]
    max_event_ms: i64,
    #[prost(bytes = "vec", tag = "2")]
    seen_ids: Vec<u8>,
    #[prost(int64, repeated, tag = "3")]
    seen_until: Vec<i64>,
    #[prost(string, repeated, tag = "4")]
    names: Vec<String>,
    #[prost(uint64, repeated, tag = "5")]
    hot: Vec<u64>,
    #[prost(uint64, repeated, tag = "6")]
    split: Vec<u64>,
    #[prost(uint64, tag = "7")]
    applied: u64,
    #[prost(uint64, tag = "8")]
    late: u64,
    #[prost(uint64, tag = "9")]
    duplicate: u64,
    #[prost(uint64, tag = "10")]
    too_old: u64,
    #[prost(uint64, tag = "11")]
    malformed: u64,
    #[prost(uint64, repeated, tag = "12")]
    owners: Vec<u64>,
    #[prost(uint64, tag = "13")]
    owner_mismatch: u64,
    /// Dimension combinations in id order, three u32 each (`ComboTable::pack`).
    #[prost(uint32, repeated, tag = "14")]
    combos: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_767_225_600_000;

    fn click(id: u8, ad: u64, owner: (u64, u64)) -> ClickIn<'static> {
        let ids: &'static [u8; 16] = Box::leak(Box::new([id; 16]));
        ClickIn {
            impression_id: ids,
            ad_id: ad,
            advertiser_id: owner.0,
            campaign_id: owner.1,
            token_expires_at_ms: T0 + 3_600_000,
            event_time_ms: T0,
            ..Default::default()
        }
    }

    /// An ad is pinned to its owner by its first click that counts: a duplicate claiming
    /// an unseen ad pins nothing, so that ad's real owner still counts.
    #[test]
    fn only_a_counted_click_pins_an_ad_owner() {
        let mut w = ClickWindows::new(WindowConfig::default(), &ShardConfig::default());
        w.begin_batch(1);
        assert!(matches!(
            w.process(&click(1, 10, (1, 1))),
            Routed::Apply(..)
        ));
        // Same impression id, another ad and owner: a duplicate, and ad 20 stays unowned.
        assert_eq!(w.process(&click(1, 20, (9, 9))), Routed::Duplicate);
        assert!(matches!(
            w.process(&click(2, 20, (2, 2))),
            Routed::Apply(..)
        ));
        assert_eq!(w.process(&click(3, 20, (9, 9))), Routed::OwnerMismatch);
        assert_eq!(w.owners().get(&20), Some(&(2, 2)));
        assert_eq!(w.take_new_owners(), vec![(10, (1, 1)), (20, (2, 2))]);
    }
}
