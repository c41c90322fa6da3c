//! Readers never wait for the writer, and the writer never waits for readers: the top-N
//! indexes of a shard (a [`TopSet`]: unfiltered and per filter value) are published
//! read-copy-update style. Readers take the current copy from an [`ArcSwap`] (an `Arc`
//! clone, no lock) and query it for as long as they like. The shard thread keeps a second
//! copy: it logs every change, and to publish it brings that copy up to date and swaps it
//! in; the copy swapped out becomes the next one to update, once the last reader has
//! dropped it. While a reader still holds it the writer simply keeps logging and retries
//! at its next step, and every millisecond while behind (it never blocks): readers then
//! see the previous state a little longer. Acks do not wait for it either
//! (`engine::shard_loop`): an acked click is in GetAdClicks at once and in TopAds at once
//! unless a TopAds query holds the other copy, then when it ends.
//! The log grows with the clicks that arrive while such a query runs.
//!
//! Two copies of the indexes cost their memory twice and each change is applied twice; in
//! exchange a TopAds query never touches a lock the writer takes (except a filter over
//! several fields, which checks exact counts in the cells). The cells (GetAdClicks) are
//! still read under the shard's read-write lock.

use std::collections::VecDeque;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::topset::{ClickKeys, TopSet};

/// One change to a top-N index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopOp {
    /// `by` clicks for `ad` in minute index `minute`.
    Add {
        /// Ad.
        ad: u64,
        /// Minute index (ms / 60 000).
        minute: i64,
        /// Clicks.
        by: u64,
        /// The clicks' dimensions and owners (which value indexes they go to).
        keys: ClickKeys,
    },
    /// [`TopSet::seal`] before this minute index.
    Seal(i64),
    /// [`TopSet::evict_before`] this minute index.
    Evict(i64),
}

fn apply(idx: &mut TopSet, op: TopOp) {
    match op {
        TopOp::Add {
            ad,
            minute,
            by,
            keys,
        } => idx.add(ad, minute, by, &keys),
        TopOp::Seal(m) => idx.seal(m),
        TopOp::Evict(m) => idx.evict_before(m),
    }
}

/// The writer's side (owned by the shard thread); readers hold the [`ArcSwap`].
#[derive(Debug)]
pub struct TopWriter {
    /// The copy readers do not see (possibly still held by readers of its last publication).
    stale: Arc<TopSet>,
    /// Changes the stale copy lacks, oldest first.
    log: VecDeque<TopOp>,
    /// Changes logged in total / reflected in the stale copy / in the published copy.
    total: u64,
    stale_at: u64,
    published_at: u64,
}

impl TopWriter {
    /// Starts from `index`, published in a new [`ArcSwap`] for readers.
    pub fn new(index: TopSet) -> (Self, ArcSwap<TopSet>) {
        let shared = ArcSwap::from_pointee(index.clone());
        let w = TopWriter {
            stale: Arc::new(index),
            log: VecDeque::new(),
            total: 0,
            stale_at: 0,
            published_at: 0,
        };
        (w, shared)
    }

    /// Records a change (visible to readers after the next successful [`TopWriter::publish`]).
    pub fn push(&mut self, op: TopOp) {
        self.log.push_back(op);
        self.total += 1;
    }

    /// Whether every change pushed is visible to readers.
    pub fn is_published(&self) -> bool {
        self.published_at == self.total
    }

    /// Makes every change pushed so far visible in `shared`. Returns false, having done
    /// nothing, while a reader still holds the copy it would update (call again later).
    pub fn publish(&mut self, shared: &ArcSwap<TopSet>) -> bool {
        if self.is_published() {
            return true;
        }
        let Some(idx) = Arc::get_mut(&mut self.stale) else {
            return false;
        };
        for op in &self.log {
            apply(idx, *op);
        }
        let fresh = self.stale.clone();
        // The copy readers saw until now comes back; it lacks what was logged after it
        // was published.
        self.stale = shared.swap(fresh);
        let drop_front = usize::try_from(self.published_at - self.stale_at).unwrap_or(0);
        self.log.drain(..drop_front.min(self.log.len()));
        self.stale_at = self.published_at;
        self.published_at = self.total;
        true
    }

    /// Replaces both copies with `index` (rebuilt from the cells after a repair): readers
    /// see the old index until the swap, the new one after, never a mix.
    pub fn reset(&mut self, index: TopSet, shared: &ArcSwap<TopSet>) {
        shared.store(Arc::new(index.clone()));
        self.stale = Arc::new(index);
        self.log.clear();
        self.total = 0;
        self.stale_at = 0;
        self.published_at = 0;
    }

    /// Ops waiting in the log (for metrics and tests).
    pub fn lag(&self) -> usize {
        self.log.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::topset::FilterKey;
    use proptest::prelude::*;

    proptest! {
        /// Whatever readers hold and whenever they let go, a successful publish shows
        /// exactly the index a single copy fed the same changes would be, and a held copy
        /// never changes under its reader.
        #[test]
        fn publishes_what_one_copy_would_hold(
            steps in proptest::collection::vec((0u64..5, 0i64..30, any::<bool>(), any::<bool>(), 0u8..20), 1..200)
        ) {
            let (mut w, shared) = TopWriter::new(TopSet::new());
            let mut model = TopSet::new();
            // Copies readers hold, with the answer they saw when they took them.
            type Held = (Arc<TopSet>, Vec<(u64, u64)>);
            let mut held: Vec<Held> = Vec::new();
            for (ad, minute, hold, release, kind) in steps {
                let op = match kind {
                    0 => TopOp::Seal(minute),
                    1 => TopOp::Evict(minute / 3),
                    _ => {
                        let keys = ClickKeys { advertiser: ad % 2, ..ClickKeys::default() };
                        TopOp::Add { ad, minute, by: 1, keys }
                    }
                };
                w.push(op);
                apply(&mut model, op);
                if hold {
                    let snap = shared.load_full();
                    let seen = snap.all.top(10, 0, 30);
                    held.push((snap, seen));
                }
                if release && !held.is_empty() {
                    held.remove(0);
                }
                let held_stale = held.iter().any(|(h, _)| Arc::ptr_eq(h, &w.stale));
                let ok = w.publish(&shared);
                prop_assert_eq!(ok, !held_stale || w.is_published());
                if ok {
                    prop_assert_eq!(shared.load().all.top(10, 0, 30), model.all.top(10, 0, 30));
                    let adv = |s: &TopSet| s.index(FilterKey::Advertiser(1)).map(|i| i.top(10, 0, 30));
                    prop_assert_eq!(adv(&shared.load()), adv(&model));
                    for a in 0..5 {
                        prop_assert_eq!(shared.load().all.count(a, 0, 30), model.all.count(a, 0, 30));
                    }
                }
                for (snap, seen) in &held {
                    prop_assert_eq!(&snap.all.top(10, 0, 30), seen);
                }
            }
            held.clear();
            prop_assert!(w.publish(&shared));
            prop_assert_eq!(shared.load().all.top(10, 0, 30), model.all.top(10, 0, 30));
            let adv = |s: &TopSet| s.index(FilterKey::Advertiser(1)).map(|i| i.top(10, 0, 30));
            prop_assert_eq!(adv(&shared.load()), adv(&model));
        }
    }
}
