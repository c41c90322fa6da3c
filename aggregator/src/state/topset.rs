//! The top-N indexes one shard publishes: the unfiltered index, and one index per value of
//! every filterable field (country, device, os, site, advertiser, campaign), so that
//! `TopAds` filtered by any of them ranks from an index instead of scanning minute cells.
//!
//! A click is in exactly one value index per field, so for a filter naming values of one
//! field the union of those values' indexes holds exactly the filtered clicks
//! ([`super::topn::top_of`] sums lists); a filter over several fields ranks by exact counts
//! bounded by one field's indexes ([`super::topn::top_bounded`]). The value indexes keep
//! minute lists only (no hour level): a 60-minute range reads about 60 lists per value,
//! and they cost half the memory of the unfiltered index's two levels.
//!
//! It must not know about queries, callers or wire types: it maps a click's keys to
//! indexes and nothing else. Fed by the shard thread through [`super::published`].

use serde::{Deserialize, Serialize};

use super::FastMap;
use super::dims::DimKey;

use super::topn::TopIndex;

/// A filterable field that can have per-value indexes (`shards.top_index_fields`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexField {
    /// The click's country.
    Country,
    /// The click's device.
    Device,
    /// The click's os.
    Os,
    /// The click's site/app.
    Site,
    /// The ad's advertiser.
    Advertiser,
    /// The ad's campaign.
    Campaign,
}

impl IndexField {
    /// All six, in [`ClickKeys::keys`] order.
    pub const ALL: [IndexField; 6] = [
        IndexField::Country,
        IndexField::Device,
        IndexField::Os,
        IndexField::Site,
        IndexField::Advertiser,
        IndexField::Campaign,
    ];

    /// The default set: the advertiser (every advertiser key's TopAds is scoped to it)
    /// and the country (the most asked dimension). Each field costs ~15 bytes per minute
    /// cell (frozen lists, shared by the published copies; ~95 before they were) and
    /// ~8% of the apply rate (BENCHMARKS.md); the others are opt-in.
    /// Without them a filter stays exact: a campaign within an advertiser's key is bounded
    /// by the advertiser's index, for example.
    pub const DEFAULT: [IndexField; 2] = [IndexField::Advertiser, IndexField::Country];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// Parses a comma-separated list as the config spells it (`"advertiser,country"`);
    /// `""` or `"none"` is the empty list.
    pub fn parse_list(s: &str) -> Result<Vec<IndexField>, String> {
        use serde::de::IntoDeserializer;
        if s.trim().is_empty() || s.trim() == "none" {
            return Ok(Vec::new());
        }
        s.split(',')
            .map(|f| {
                let d: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                    f.trim().into_deserializer();
                IndexField::deserialize(d).map_err(|e| format!("{f:?}: {e}"))
            })
            .collect()
    }
}

/// One value of one filterable field: the key of a value index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterKey {
    /// ISO 3166-1 alpha-2, as `DimKey::country` packs it.
    Country([u8; 2]),
    /// `adclick.v1.Device` value.
    Device(u8),
    /// Interned os id.
    Os(u32),
    /// Interned site/app id.
    Site(u32),
    /// Advertiser id.
    Advertiser(u64),
    /// Campaign id.
    Campaign(u64),
}

impl FilterKey {
    /// The field this is a value of.
    pub fn field(self) -> IndexField {
        match self {
            FilterKey::Country(_) => IndexField::Country,
            FilterKey::Device(_) => IndexField::Device,
            FilterKey::Os(_) => IndexField::Os,
            FilterKey::Site(_) => IndexField::Site,
            FilterKey::Advertiser(_) => IndexField::Advertiser,
            FilterKey::Campaign(_) => IndexField::Campaign,
        }
    }
}

/// What a click contributes to the value indexes: its dimensions and its ad's owners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClickKeys {
    /// Country, device, os, site.
    pub dims: DimKey,
    /// The ad's advertiser.
    pub advertiser: u64,
    /// The ad's campaign.
    pub campaign: u64,
}

impl ClickKeys {
    /// The six value-index keys of this click, one per field.
    pub fn keys(&self) -> [FilterKey; 6] {
        [
            FilterKey::Country(self.dims.country),
            FilterKey::Device(self.dims.device),
            FilterKey::Os(self.dims.os),
            FilterKey::Site(self.dims.site),
            FilterKey::Advertiser(self.advertiser),
            FilterKey::Campaign(self.campaign),
        ]
    }
}

/// See the module doc.
#[derive(Debug, Clone, Default)]
pub struct TopSet {
    /// Every click.
    pub all: TopIndex,
    /// One index per value seen in the live minutes, of the fields in `fields`.
    by: FastMap<FilterKey, TopIndex>,
    /// Bit set of the [`IndexField`]s that have value indexes.
    fields: u8,
    /// The last [`TopSet::seal`]: value indexes created later start sealed there (sealed
    /// minutes are what a freeze pass may freeze).
    sealed: Option<i64>,
}

impl TopSet {
    /// An empty set with value indexes for every field.
    pub fn new() -> Self {
        Self::with_fields(&IndexField::ALL)
    }

    /// An empty set with value indexes for `fields` only.
    pub fn with_fields(fields: &[IndexField]) -> Self {
        TopSet {
            fields: fields.iter().fold(0, |b, f| b | f.bit()),
            ..Self::default()
        }
    }

    /// Whether `field` has value indexes (otherwise [`TopSet::index`] is always `None`).
    pub fn has(&self, field: IndexField) -> bool {
        self.fields & field.bit() != 0
    }

    /// Adds `by` clicks of `ad` in minute index `minute` carrying `keys`.
    pub fn add(&mut self, ad: u64, minute: i64, by: u64, keys: &ClickKeys) {
        self.all.add(ad, minute, by);
        if self.fields == 0 {
            return;
        }
        for k in keys.keys() {
            if self.has(k.field()) {
                self.add_run(Some(k), minute, &[(ad, by)]);
            }
        }
    }

    /// The value indexes a click carrying `keys` goes to (those of the fields in the set).
    /// Only the enabled fields' keys are made (one per set bit, in [`IndexField::ALL`]
    /// order): building all six and filtering them drew ~5% of the apply path's samples
    /// (the change measured +1-2%).
    pub fn keys_of(&self, keys: &ClickKeys) -> impl Iterator<Item = FilterKey> + use<> {
        let (mut left, k) = (self.fields, *keys);
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let bit = left.trailing_zeros();
            left &= left - 1;
            Some(match bit {
                0 => FilterKey::Country(k.dims.country),
                1 => FilterKey::Device(k.dims.device),
                2 => FilterKey::Os(k.dims.os),
                3 => FilterKey::Site(k.dims.site),
                4 => FilterKey::Advertiser(k.advertiser),
                _ => FilterKey::Campaign(k.campaign),
            })
        })
    }

    /// Adds `(ad, clicks)` pairs in minute index `minute` to one index only: the
    /// unfiltered one (`None`) or one value's ([`TopIndex::add_run`]). [`TopSet::add`] is
    /// this for the unfiltered index and each of [`TopSet::keys_of`]; the published writer,
    /// which groups the clicks of a batch per index and minute, calls it directly.
    pub fn add_run(&mut self, index: Option<FilterKey>, minute: i64, adds: &[(u64, u64)]) {
        let Some(k) = index else {
            self.all.add_run(minute, adds);
            return;
        };
        if !self.has(k.field()) || adds.iter().all(|a| a.1 == 0) {
            return;
        }
        let sealed = self.sealed;
        self.by
            .entry(k)
            .or_insert_with(|| {
                let mut idx = TopIndex::minutes_only();
                if let Some(s) = sealed {
                    idx.seal(s);
                }
                idx
            })
            .add_run(minute, adds);
    }

    /// [`TopIndex::seal`] of every index (value indexes have no hour level: for them it
    /// only marks the minutes a freeze pass may freeze).
    pub fn seal(&mut self, before: i64) {
        self.all.seal(before);
        if self.sealed.is_some_and(|s| before <= s) {
            return;
        }
        self.sealed = Some(before);
        for idx in self.by.values_mut() {
            idx.seal(before);
        }
    }

    /// [`TopIndex::evict_before`] on every index; value indexes left empty are dropped.
    pub fn evict_before(&mut self, before: i64) {
        self.all.evict_before(before);
        self.by.retain(|_, idx| {
            idx.evict_before(before);
            idx.cell_count() > 0
        });
    }

    /// The index of one field value (`None`: no live click has it).
    pub fn index(&self, key: FilterKey) -> Option<&TopIndex> {
        self.by.get(&key)
    }

    /// Makes this set equal to `src` ([`TopIndex::sync_from`] per index, with its
    /// precondition: `src` is a later state of this copy): what the published writer does
    /// to bring its next copy level with the one it just published.
    pub(crate) fn sync_from(&mut self, src: &TopSet) {
        self.fields = src.fields;
        self.sealed = src.sealed;
        self.all.sync_from(&src.all);
        for (k, s) in &src.by {
            match self.by.get_mut(k) {
                Some(d) => d.sync_from(s),
                None => {
                    self.by.insert(*k, s.clone());
                }
            }
        }
        if self.by.len() != src.by.len() {
            self.by.retain(|k, _| src.by.contains_key(k));
        }
    }

    /// [`TopIndex::state_for_test`] of every index, by key.
    #[cfg(test)]
    pub(crate) fn state_for_test(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .by
            .iter()
            .map(|(k, i)| format!("{k:?}: {}", i.state_for_test()))
            .collect();
        v.sort_unstable();
        v.push(format!(
            "all: {} fields {} sealed {:?}",
            self.all.state_for_test(),
            self.fields,
            self.sealed
        ));
        v
    }

    /// Approximate heap bytes of every index.
    pub fn heap_bytes(&self) -> usize {
        let per_entry = size_of::<(FilterKey, TopIndex)>() + 1;
        self.all.heap_bytes()
            + self
                .by
                .values()
                .map(|i| i.heap_bytes() + per_entry)
                .sum::<usize>()
    }

    /// [`TopIndex::freeze_due`] on every index.
    pub fn freeze_due(&mut self) {
        self.all.freeze_due();
        for idx in self.by.values_mut() {
            idx.freeze_due();
        }
    }

    /// Heap bytes of the frozen parts (shared by the copies the published writer keeps).
    pub fn frozen_bytes(&self) -> usize {
        self.all.frozen_bytes() + self.by.values().map(TopIndex::frozen_bytes).sum::<usize>()
    }

    /// Every frozen part of every index, as addresses (tests check what copies share).
    #[cfg(test)]
    pub(crate) fn frozen_parts(&self) -> Vec<(Option<FilterKey>, super::topn::SegKey, usize)> {
        let mut out: Vec<_> = self
            .all
            .frozen_parts()
            .into_iter()
            .map(|(s, p)| (None, s, p))
            .collect();
        for (&k, i) in &self.by {
            out.extend(i.frozen_parts().into_iter().map(|(s, p)| (Some(k), s, p)));
        }
        out.sort_unstable_by_key(|&(k, s, p)| (format!("{k:?}"), s, p));
        out
    }

    /// Number of value indexes (for metrics and tests).
    pub fn value_indexes(&self) -> usize {
        self.by.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::topn::{count_of, top_of};
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn keys(c: u8, d: u8, adv: u64) -> ClickKeys {
        ClickKeys {
            dims: DimKey {
                country: [b'A' + c, b'A'],
                device: d,
                os: u32::from(c % 2),
                site: 0,
            },
            advertiser: adv,
            campaign: adv * 10 + u64::from(d),
        }
    }

    /// `keys_of` gives, for every subset of fields, exactly the click's keys of those
    /// fields, in `ClickKeys::keys` order.
    #[test]
    fn keys_of_is_the_enabled_fields_keys() {
        let k = keys(3, 2, 77);
        for mask in 0u8..64 {
            let fields: Vec<IndexField> = IndexField::ALL
                .into_iter()
                .filter(|f| mask & f.bit() != 0)
                .collect();
            let set = TopSet::with_fields(&fields);
            let want: Vec<FilterKey> = k
                .keys()
                .into_iter()
                .filter(|key| fields.contains(&key.field()))
                .collect();
            assert_eq!(set.keys_of(&k).collect::<Vec<_>>(), want, "mask {mask:#b}");
        }
    }

    proptest! {
        /// Each value index answers what a brute-force count of the clicks carrying that
        /// value gives, across eviction; a union of one field's values answers their sum.
        #[test]
        fn value_indexes_match_brute_force(
            clicks in proptest::collection::vec((0u64..20, 0i64..10, 0u8..3, 0u8..2), 1..300),
            evict in 0i64..6,
        ) {
            let mut set = TopSet::new();
            for &(ad, m, c, d) in &clicks {
                set.add(ad, m, 1, &keys(c, d, ad % 3));
            }
            set.evict_before(evict);
            for c in 0u8..3 {
                let k = FilterKey::Country([b'A' + c, b'A']);
                let mut want: HashMap<u64, u64> = HashMap::new();
                for &(ad, m, cc, _) in &clicks {
                    if cc == c && m >= evict {
                        *want.entry(ad).or_default() += 1;
                    }
                }
                let idx: Vec<&TopIndex> = set.index(k).into_iter().collect();
                for ad in 0..20 {
                    prop_assert_eq!(count_of(&idx, ad, 0, 10), want.get(&ad).copied().unwrap_or(0));
                }
                let mut expect: Vec<(u64, u64)> = want.into_iter().collect();
                expect.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                expect.truncate(5);
                prop_assert_eq!(top_of(&idx, 5, 0, 10), expect);
            }
            // Device 0 or 1 covers every click: the union equals the unfiltered index.
            let both: Vec<&TopIndex> = (0u8..2).filter_map(|d| set.index(FilterKey::Device(d))).collect();
            prop_assert_eq!(top_of(&both, 7, 0, 10), set.all.top(7, 0, 10));
            // Nothing evicted is left behind as an empty index.
            prop_assert!(set.by.values().all(|i| i.cell_count() > 0));
            // A set without the device field keeps no device index, and the same others.
            let mut some = TopSet::with_fields(&[IndexField::Country]);
            for &(ad, m, c, d) in &clicks {
                some.add(ad, m, 1, &keys(c, d, ad % 3));
            }
            some.evict_before(evict);
            prop_assert!(!some.has(IndexField::Device) && some.index(FilterKey::Device(0)).is_none());
            let k = FilterKey::Country([b'A', b'A']);
            prop_assert_eq!(
                some.index(k).map(|i| i.top(9, 0, 10)),
                set.index(k).map(|i| i.top(9, 0, 10))
            );
        }
    }

    #[test]
    fn field_lists_parse_as_the_config_spells_them() {
        assert_eq!(
            IndexField::parse_list("advertiser, country,site"),
            Ok(vec![
                IndexField::Advertiser,
                IndexField::Country,
                IndexField::Site
            ])
        );
        assert_eq!(IndexField::parse_list("none"), Ok(vec![]));
        let e = IndexField::parse_list("country,town").unwrap_err();
        assert!(e.contains("town") && e.contains("campaign"), "{e}");
    }
}
