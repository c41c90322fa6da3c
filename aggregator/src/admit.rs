//! Admission of ingest batches: decides, per `(collector_id, seq)`, whether a batch is new
//! (goes to the WAL and is applied), a redelivery of one already acked (acked again, not
//! applied), or refused (outside the seq window, or too far out of order). It owns the
//! per-collector delivery state ([`Delivery`]) that the store persists in the same commit
//! as the WAL entries; it must not know about clicks, windows or shards.
//!
//! Collectors keep several batches in flight, so seq 12 may arrive (and be acked) before
//! seq 10: "new if above the last seq" would drop 10. Each batch instead carries
//! `acked_floor`, the lowest seq its collector had not yet seen acked by this aggregator.
//! Per collector we keep the floor F (the highest floor received, so it only rises) and the
//! set S of acked seqs above it. A seq is already acked iff `seq < F` or `seq ∈ S`; a new
//! one enters S, S is trimmed below F, and a run of S starting at F moves F up. A collector
//! only has `forward.max_in_flight` (<= 256) records in flight past the seq it names as its
//! floor, so S stays below that size; [`MAX_OUT_OF_ORDER`] bounds it for any sender.
//!
//! A batch with `acked_floor` 0 comes from a collector that predates the field and sends
//! in order: it is read as floor = seq, which gives exactly the old rule (new iff above
//! the high-water mark, which is then F - 1).

use std::collections::{BTreeSet, HashMap};

use crate::config::IngestConfig;
use crate::engine::IngestError;

/// Most seqs a collector may have acked above its floor. Collectors keep at most
/// `forward.max_in_flight` (at most 256) records in flight past their floor, so only a
/// misbehaving sender reaches this; its batch is refused (retryable) until its floor rises.
pub const MAX_OUT_OF_ORDER: usize = 4 * 256;

/// Highest seq a batch may carry: `max_seq_jump` above the collector's high-water mark
/// (its highest acked seq, [`Delivery::mark`]), or `max_first_seq` for a collector id
/// without one (a new or rebuilt aggregator must accept collectors whose spool seqs have
/// grown for months).
pub fn seq_limit(hwm: Option<u64>, cfg: &IngestConfig) -> u64 {
    match hwm {
        Some(h) => h.saturating_add(cfg.max_seq_jump),
        None => cfg.max_first_seq,
    }
}

/// The floor a batch claims: `acked_floor`, never above its own seq (the batch is not
/// acked yet, so it cannot lie below the floor); 0 (an in-order collector from before the
/// field) means the seq itself.
pub fn effective_floor(seq: u64, acked_floor: u64) -> u64 {
    if acked_floor == 0 {
        seq
    } else {
        acked_floor.min(seq)
    }
}

/// What is known delivered from one collector: every seq below `floor`, and `acked`.
/// Invariant: every seq in `acked` is above `floor` (a seq equal to the floor moves it up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    floor: u64,
    acked: BTreeSet<u64>,
}

/// A [`Delivery`] whose stored bytes do not decode (damage or a bug: never guessed at).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable delivery state: {0}")]
pub struct DeliveryDecodeError(&'static str);

/// Version byte of [`Delivery::encode`].
const DELIVERY_V1: u8 = 1;
/// Most acked seqs a stored state may hold (far above [`MAX_OUT_OF_ORDER`], so that the
/// cap may grow without a format change, and still a bound on what a decode allocates).
const MAX_STORED_ACKED: usize = 1 << 20;

impl Delivery {
    /// The state of a collector id never seen: like the old high-water mark 0, seq 0
    /// counts as acked (collectors number their records from 1).
    pub fn unknown() -> Self {
        Delivery::in_order(0)
    }

    /// The state an in-order collector with high-water mark `hwm` leaves (the form of the
    /// store's old `hwm` table): everything up to `hwm` acked.
    pub fn in_order(hwm: u64) -> Self {
        Delivery {
            floor: hwm.saturating_add(1),
            acked: BTreeSet::new(),
        }
    }

    /// Lowest seq not known to be acked: every seq below it is.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The acked seqs above the floor, ascending.
    pub fn acked_above_floor(&self) -> impl Iterator<Item = u64> + '_ {
        self.acked.iter().copied()
    }

    /// Highest acked seq (0 if none): the high-water mark of the in-order rule.
    pub fn mark(&self) -> u64 {
        self.acked
            .last()
            .copied()
            .unwrap_or(0)
            .max(self.floor.saturating_sub(1))
    }

    /// Whether `seq` was acked.
    pub fn is_acked(&self, seq: u64) -> bool {
        seq < self.floor || self.acked.contains(&seq)
    }

    /// Records an admitted batch: raises the floor to the batch's claim, then adds `seq`.
    /// The store applies the same transition to what it persists, so a restart resumes
    /// exactly here.
    pub fn admit(&mut self, seq: u64, acked_floor: u64) {
        let claim = effective_floor(seq, acked_floor);
        if claim > self.floor {
            self.floor = claim;
            self.acked = self.acked.split_off(&claim);
        }
        if seq >= self.floor {
            self.acked.insert(seq);
        }
        while self.acked.first() == Some(&self.floor) {
            self.acked.pop_first();
            self.floor = self.floor.saturating_add(1);
        }
    }

    /// How many seqs S would hold after admitting `seq` with `acked_floor` (no change made).
    fn size_after(&self, seq: u64, acked_floor: u64) -> usize {
        let floor = self.floor.max(effective_floor(seq, acked_floor));
        let kept = self.acked.range(floor..).count();
        // A seq equal to the floor moves the floor up instead of joining S.
        if seq == floor { kept } else { kept + 1 }
    }

    /// `1 | floor u64 LE | n u32 LE | n ascending u64 LE`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + 8 * self.acked.len());
        out.push(DELIVERY_V1);
        out.extend_from_slice(&self.floor.to_le_bytes());
        let n = u32::try_from(self.acked.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for s in self.acked.iter().take(n as usize) {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// The inverse of [`Delivery::encode`]; anything else is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, DeliveryDecodeError> {
        let (&version, rest) = bytes.split_first().ok_or(DeliveryDecodeError("empty"))?;
        if version != DELIVERY_V1 {
            return Err(DeliveryDecodeError("unknown version"));
        }
        let u64_at = |b: &[u8], i: usize| -> Option<u64> {
            b.get(i..i + 8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_le_bytes)
        };
        let floor = u64_at(rest, 0).ok_or(DeliveryDecodeError("truncated floor"))?;
        let n = rest
            .get(8..12)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(u32::from_le_bytes)
            .ok_or(DeliveryDecodeError("truncated count"))? as usize;
        if n > MAX_STORED_ACKED {
            return Err(DeliveryDecodeError("too many acked seqs"));
        }
        if rest.len() != 12 + 8 * n {
            return Err(DeliveryDecodeError("length does not match the count"));
        }
        let mut acked = BTreeSet::new();
        let mut prev = floor;
        for i in 0..n {
            let s = u64_at(rest, 12 + 8 * i).ok_or(DeliveryDecodeError("truncated seq"))?;
            if s <= prev {
                return Err(DeliveryDecodeError(
                    "acked seqs not ascending above the floor",
                ));
            }
            acked.insert(s);
            prev = s;
        }
        Ok(Delivery { floor, acked })
    }
}

/// What to do with one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen before: write it to the WAL and apply it.
    New,
    /// Acked before: ack again, apply nothing.
    AlreadyAcked,
    /// Refused before the WAL; the state did not move. The second field is the reason
    /// label of the refusal counter (`seq_window`, `out_of_order`).
    Refused(IngestError, &'static str),
}

/// Per-collector delivery state (see the module doc).
#[derive(Debug, Default)]
pub struct Admission {
    state: HashMap<String, Delivery>,
}

/// Decisions of one group commit, applied to [`Admission`] only once the WAL commit holding
/// them succeeded.
#[derive(Debug, Default)]
pub struct Pending {
    state: HashMap<String, Delivery>,
}

impl Admission {
    /// From the state the store holds ([`crate::store::Store::delivery_states`]).
    pub fn new(state: HashMap<String, Delivery>) -> Self {
        Admission { state }
    }

    /// The committed state of `collector_id`.
    pub fn delivery(&self, collector_id: &str) -> Option<&Delivery> {
        self.state.get(collector_id)
    }

    /// Judges `(collector_id, seq)`, sent with `acked_floor`, against the committed state
    /// plus what this group already admitted.
    pub fn judge(
        &self,
        pending: &mut Pending,
        collector_id: &str,
        seq: u64,
        acked_floor: u64,
        cfg: &IngestConfig,
    ) -> Verdict {
        let known = pending
            .state
            .get(collector_id)
            .or_else(|| self.state.get(collector_id));
        let hwm = known.map(Delivery::mark);
        // The window is measured before this batch's own floor claim counts: a claim must
        // not move the window that bounds it.
        let limit = seq_limit(hwm, cfg);
        if seq > limit {
            return Verdict::Refused(
                IngestError::SeqOutOfWindow {
                    collector_id: collector_id.to_string(),
                    seq,
                    hwm: hwm.unwrap_or(0),
                    limit,
                },
                "seq_window",
            );
        }
        let unknown = Delivery::unknown();
        let current = known.unwrap_or(&unknown);
        if current.is_acked(seq) {
            return Verdict::AlreadyAcked;
        }
        let size = current.size_after(seq, acked_floor);
        if size > MAX_OUT_OF_ORDER {
            let floor = current.floor.max(effective_floor(seq, acked_floor));
            return Verdict::Refused(
                IngestError::Unavailable(format!(
                    "collector_id {collector_id:?}: seq {seq} would be the {size}th seq acked \
                     out of order above seq {floor}, past the {MAX_OUT_OF_ORDER} an aggregator \
                     holds; retry once the lower seqs are delivered (a collector with \
                     forward.max_in_flight <= 256 never gets here)"
                )),
                "out_of_order",
            );
        }
        let mut next = current.clone();
        next.admit(seq, acked_floor);
        pending.state.insert(collector_id.to_string(), next);
        Verdict::New
    }

    /// The WAL commit holding `pending` succeeded.
    pub fn commit(&mut self, pending: Pending) {
        self.state.extend(pending.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RedbStore, Store, WalEntry};
    use proptest::prelude::*;

    fn cfg() -> IngestConfig {
        IngestConfig::default()
    }

    /// A directory for a store that commits hundreds of times per case: on tmpfs where
    /// there is one (every commit fsyncs; redb's own crash safety is not under test here).
    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    }

    /// Judges one batch alone and commits it (as a group of one).
    fn one(a: &mut Admission, c: &str, seq: u64, floor: u64) -> Verdict {
        let mut p = Pending::default();
        let v = a.judge(&mut p, c, seq, floor, &cfg());
        a.commit(p);
        v
    }

    #[test]
    fn out_of_order_seqs_are_each_new_once() {
        let mut a = Admission::default();
        // Seqs 1..=4 in flight, floor 1 on each; they arrive 3, 1, 4, 2, then repeats.
        assert_eq!(one(&mut a, "c", 3, 1), Verdict::New);
        assert_eq!(one(&mut a, "c", 1, 1), Verdict::New);
        assert_eq!(one(&mut a, "c", 3, 1), Verdict::AlreadyAcked);
        assert_eq!(one(&mut a, "c", 4, 1), Verdict::New);
        let d = a.delivery("c").unwrap();
        assert_eq!(
            (d.floor(), d.acked_above_floor().collect::<Vec<_>>()),
            (2, vec![3, 4])
        );
        assert_eq!(d.mark(), 4);
        assert_eq!(one(&mut a, "c", 2, 1), Verdict::New);
        let d = a.delivery("c").unwrap();
        assert_eq!((d.floor(), d.acked_above_floor().count()), (5, 0));
        for s in 1..=4 {
            assert_eq!(one(&mut a, "c", s, 1), Verdict::AlreadyAcked);
        }
        // A floor claim trims S: seqs 7 and 9 acked, then the collector says everything
        // below 9 is done (6 and 8 had nothing for this aggregator).
        assert_eq!(one(&mut a, "c", 7, 5), Verdict::New);
        assert_eq!(one(&mut a, "c", 9, 5), Verdict::New);
        assert_eq!(one(&mut a, "c", 10, 9), Verdict::New);
        let d = a.delivery("c").unwrap();
        assert_eq!((d.floor(), d.acked_above_floor().count()), (11, 0));
        assert_eq!(one(&mut a, "c", 8, 5), Verdict::AlreadyAcked);
    }

    #[test]
    fn the_same_seq_twice_in_one_group_is_new_once() {
        let a = Admission::default();
        let mut p = Pending::default();
        assert_eq!(a.judge(&mut p, "c", 5, 3, &cfg()), Verdict::New);
        assert_eq!(a.judge(&mut p, "c", 5, 3, &cfg()), Verdict::AlreadyAcked);
        assert_eq!(a.judge(&mut p, "c", 3, 3, &cfg()), Verdict::New);
        // Nothing committed: a failed WAL commit leaves the state as it was.
        drop(p);
        assert!(a.delivery("c").is_none());
    }

    #[test]
    fn a_floor_above_the_seq_is_read_as_the_seq() {
        let mut a = Admission::default();
        assert_eq!(one(&mut a, "c", 5, 1000), Verdict::New);
        assert_eq!(a.delivery("c").unwrap().floor(), 6);
        // 6..1000 were not claimed acked by that batch.
        assert_eq!(one(&mut a, "c", 7, 6), Verdict::New);
        assert_eq!(one(&mut a, "c", 6, 6), Verdict::New);
    }

    #[test]
    fn the_window_is_measured_from_the_highest_acked_seq() {
        let c = IngestConfig {
            max_seq_jump: 10,
            max_first_seq: 100,
            ..cfg()
        };
        let mut a = Admission::default();
        let judge = |a: &mut Admission, seq, floor| {
            let mut p = Pending::default();
            let v = a.judge(&mut p, "c", seq, floor, &c);
            a.commit(p);
            v
        };
        assert!(matches!(
            judge(&mut a, 101, 90),
            Verdict::Refused(_, "seq_window")
        ));
        assert_eq!(judge(&mut a, 100, 90), Verdict::New);
        // Mark 100 (S = {100} above floor 90): at most 110 now, whatever the floor claim.
        assert!(matches!(
            judge(&mut a, 111, 111),
            Verdict::Refused(_, "seq_window")
        ));
        assert!(
            a.delivery("c").unwrap().floor() == 90,
            "a refusal moves nothing"
        );
        assert_eq!(judge(&mut a, 110, 95), Verdict::New);
        let Verdict::Refused(e, _) = judge(&mut a, 121, 95) else {
            panic!("refused")
        };
        assert!(e.to_string().contains("max_seq_jump"), "{e}");
    }

    #[test]
    fn more_than_the_cap_out_of_order_is_refused_and_the_floor_seq_still_passes() {
        let mut a = Admission::default();
        // Seq 1 never arrives; 2..=MAX+1 do (a sender ignoring its window).
        for s in 2..=(MAX_OUT_OF_ORDER as u64 + 1) {
            assert_eq!(one(&mut a, "c", s, 1), Verdict::New);
        }
        let next = MAX_OUT_OF_ORDER as u64 + 2;
        let Verdict::Refused(e, reason) = one(&mut a, "c", next, 1) else {
            panic!("refused")
        };
        assert_eq!(reason, "out_of_order");
        assert!(matches!(e, IngestError::Unavailable(_)), "retryable: {e:?}");
        assert_eq!(
            a.delivery("c").unwrap().acked_above_floor().count(),
            MAX_OUT_OF_ORDER
        );
        // The missing seq always passes, and collapses S.
        assert_eq!(one(&mut a, "c", 1, 1), Verdict::New);
        assert_eq!(a.delivery("c").unwrap().floor(), next);
        assert_eq!(one(&mut a, "c", next, 1), Verdict::New);
        // So does a batch whose floor claim trims S enough.
        for s in next + 2..next + 2 + MAX_OUT_OF_ORDER as u64 {
            assert_eq!(one(&mut a, "c", s, next + 1), Verdict::New);
        }
        let last = next + 2 + MAX_OUT_OF_ORDER as u64;
        assert!(matches!(
            one(&mut a, "c", last, next + 1),
            Verdict::Refused(..)
        ));
        assert_eq!(one(&mut a, "c", last, next + 3), Verdict::New);
    }

    #[test]
    fn delivery_encoding_round_trips_and_rejects_damage() {
        let mut d = Delivery::in_order(41);
        for s in [44, 50, 43] {
            d.admit(s, 42);
        }
        let bytes = d.encode();
        assert_eq!(Delivery::decode(&bytes), Ok(d.clone()));
        for cut in 0..bytes.len() {
            assert!(Delivery::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = 2;
        assert!(Delivery::decode(&bad).is_err());
        // Seqs out of order, or at or below the floor.
        let mut bad = bytes.clone();
        bad.swap(13, 21);
        assert!(Delivery::decode(&bad).is_err());
        let mut huge = vec![1];
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Delivery::decode(&huge).is_err());
    }

    /// Today's rule, for the legacy comparison: new iff above the mark, window from it.
    fn legacy_judge(
        hwm: &mut HashMap<String, u64>,
        c: &str,
        seq: u64,
        cfg: &IngestConfig,
    ) -> Verdict {
        let known = hwm.get(c).copied();
        let limit = seq_limit(known, cfg);
        if seq > limit {
            return Verdict::Refused(
                IngestError::SeqOutOfWindow {
                    collector_id: c.to_string(),
                    seq,
                    hwm: known.unwrap_or(0),
                    limit,
                },
                "seq_window",
            );
        }
        if seq > known.unwrap_or(0) {
            hwm.insert(c.to_string(), seq);
            Verdict::New
        } else {
            Verdict::AlreadyAcked
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Collectors without `acked_floor` (0) get exactly the old verdicts, errors
        /// included, across groups and restarts from the store.
        #[test]
        fn floor_zero_keeps_the_in_order_rule(
            ops in proptest::collection::vec((0u8..3, 0u64..40, 0u8..8), 1..120),
        ) {
            let dir = scratch();
            let mut store = RedbStore::open(dir.path()).unwrap();
            let c = IngestConfig { max_seq_jump: 7, max_first_seq: 20, ..cfg() };
            let mut model: HashMap<String, u64> = HashMap::new();
            let mut a = Admission::new(store.delivery_states().unwrap());
            let mut pos = 0;
            let mut pending = Pending::default();
            let mut fresh = Vec::new();
            let mut model_pending = model.clone();
            for (who, seq, action) in ops {
                let id = format!("c{who}");
                let got = a.judge(&mut pending, &id, seq, 0, &c);
                let want = legacy_judge(&mut model_pending, &id, seq, &c);
                prop_assert_eq!(&got, &want, "{} seq {}", id, seq);
                if got == Verdict::New {
                    pos += 1;
                    fresh.push(WalEntry { pos, collector_id: id, seq, acked_floor: 0, batch: vec![] });
                }
                match action {
                    // End the group: commit.
                    0..=3 => {
                        store.append(&fresh).unwrap();
                        a.commit(std::mem::take(&mut pending));
                        fresh.clear();
                        model = model_pending.clone();
                    }
                    // End the group in a crash (nothing committed), restart from the store.
                    4 => {
                        drop(store);
                        store = RedbStore::open(dir.path()).unwrap();
                        a = Admission::new(store.delivery_states().unwrap());
                        pending = Pending::default();
                        fresh.clear();
                        model_pending = model.clone();
                    }
                    // Keep gathering the group.
                    _ => {}
                }
            }
            let hwm = store.high_water_marks().unwrap();
            prop_assert_eq!(hwm, model);
        }

        /// A collector with a window of `w` records, some owned by this aggregator, sends
        /// them as `forward.rs` does (floor = its lowest seq not seen acked here); the
        /// network delays, reorders, duplicates and loses batches and acks; either side
        /// crashes (the aggregator restarts from its store, losing the group it was
        /// committing; the collector from its spool's contiguous ack). In the end every
        /// owned seq was New exactly once, and an honest collector is never refused.
        #[test]
        fn any_reordering_duplication_and_restart_admits_each_seq_once(
            w in 1usize..12,
            owned in proptest::collection::vec(any::<bool>(), 1..60),
            ops in proptest::collection::vec((0u8..8, any::<proptest::sample::Index>()), 0..400),
        ) {
            let dir = scratch();
            let mut sim = Sim::new(dir.path(), w, owned);
            for (op, i) in ops {
                sim.step(op, i)?;
            }
            sim.drain()?;
            for (s, n) in sim.new_count.iter().enumerate() {
                let want = u32::from(sim.owned[s]);
                prop_assert_eq!(*n, want, "seq {} admitted {} times", s + 1, n);
            }
        }
    }

    /// The simulation of `any_reordering_duplication_and_restart_admits_each_seq_once`.
    struct Sim {
        dir: std::path::PathBuf,
        /// `None` only while restarting.
        store: Option<RedbStore>,
        adm: Admission,
        /// Batches the aggregator is gathering into one group (judged, not committed).
        group: Vec<(u64, Verdict)>,
        pending: Pending,
        fresh: Vec<WalEntry>,
        pos: u64,
        w: usize,
        /// Record i+1 has clicks for this aggregator.
        owned: Vec<bool>,
        /// Collector: lowest record not complete (spool ack + 1), next record to read,
        /// and per record in [front, next): (acked here, done on the other shard).
        front: u64,
        next: u64,
        slots: std::collections::VecDeque<(bool, bool)>,
        /// Network: batches (seq, floor) and acks (seq) in flight.
        batches: Vec<(u64, u64)>,
        acks: Vec<u64>,
        new_count: Vec<u32>,
    }

    impl Sim {
        fn new(dir: &std::path::Path, w: usize, owned: Vec<bool>) -> Self {
            let store = RedbStore::open(dir).unwrap();
            let adm = Admission::new(store.delivery_states().unwrap());
            let n = owned.len();
            Sim {
                dir: dir.to_path_buf(),
                store: Some(store),
                adm,
                group: Vec::new(),
                pending: Pending::default(),
                fresh: Vec::new(),
                pos: 0,
                w,
                owned,
                front: 1,
                next: 1,
                slots: Default::default(),
                batches: Vec::new(),
                acks: Vec::new(),
                new_count: vec![0; n],
            }
        }

        fn floor(&self) -> u64 {
            self.slots
                .iter()
                .enumerate()
                .find(|(i, (acked, _))| self.owned[(self.front as usize) + i - 1] && !acked)
                .map_or(self.next, |(i, _)| self.front + i as u64)
        }

        /// The collector reads the next record if its window has room.
        fn send_next(&mut self) {
            if self.slots.len() >= self.w || self.next as usize > self.owned.len() {
                return;
            }
            let seq = self.next;
            let floor = self.floor();
            let owned = self.owned[seq as usize - 1];
            self.slots.push_back((!owned, false));
            self.next += 1;
            if owned {
                self.batches.push((seq, floor));
            }
        }

        fn advance(&mut self) {
            while self.slots.front().is_some_and(|(a, b)| *a && *b) {
                self.slots.pop_front();
                self.front += 1;
            }
        }

        fn deliver(&mut self, k: usize) -> Result<(), TestCaseError> {
            let (seq, floor) = self.batches.swap_remove(k);
            let v = self.adm.judge(&mut self.pending, "c", seq, floor, &cfg());
            prop_assert!(
                !matches!(v, Verdict::Refused(..)),
                "honest sender refused: {:?}",
                v
            );
            if v == Verdict::New {
                self.pos += 1;
                self.fresh.push(WalEntry {
                    pos: self.pos,
                    collector_id: "c".into(),
                    seq,
                    acked_floor: floor,
                    batch: vec![],
                });
            }
            self.group.push((seq, v));
            Ok(())
        }

        fn commit_group(&mut self) -> Result<(), TestCaseError> {
            if let Some(store) = self.store.as_mut() {
                store.append(&self.fresh).unwrap();
            }
            self.adm.commit(std::mem::take(&mut self.pending));
            for (seq, v) in self.group.drain(..) {
                if v == Verdict::New {
                    self.new_count[seq as usize - 1] += 1;
                }
                self.acks.push(seq);
            }
            self.fresh.clear();
            // The floors keep S below the window: every batch's seq is less than `w` above
            // the floor it carries.
            let held = self
                .adm
                .delivery("c")
                .map_or(0, |d| d.acked_above_floor().count());
            prop_assert!(
                held < self.w,
                "{} seqs held above the floor, window {}",
                held,
                self.w
            );
            Ok(())
        }

        fn crash_aggregator(&mut self) {
            // Whatever was gathered is lost with its connections; the collector retries.
            let floor = self.floor();
            let lost: Vec<(u64, u64)> = self
                .group
                .drain(..)
                .map(|(s, _)| (s, floor.min(s)))
                .collect();
            self.batches.extend(lost);
            self.pending = Pending::default();
            self.fresh.clear();
            self.acks.clear();
            // Close the file before reopening it (redb allows one open per process).
            drop(self.store.take());
            let store = RedbStore::open(&self.dir).unwrap();
            self.adm = Admission::new(store.delivery_states().unwrap());
            self.store = Some(store);
        }

        fn step(&mut self, op: u8, i: proptest::sample::Index) -> Result<(), TestCaseError> {
            match op {
                0 | 1 => self.send_next(),
                2 | 3 if !self.batches.is_empty() => {
                    let k = i.index(self.batches.len());
                    // A retry: the batch stays in flight too.
                    if op == 3 {
                        let b = self.batches[k];
                        self.batches.push(b);
                    }
                    self.deliver(k)?;
                }
                4 => self.commit_group()?,
                5 if !self.acks.is_empty() => {
                    let seq = self.acks.swap_remove(i.index(self.acks.len()));
                    // Lost acks are modelled by never delivering them before a restart.
                    if seq >= self.front {
                        let slot = (seq - self.front) as usize;
                        if let Some(s) = self.slots.get_mut(slot) {
                            s.0 = true;
                        }
                    }
                    self.advance();
                }
                6 if !self.slots.is_empty() => {
                    let k = i.index(self.slots.len());
                    self.slots[k].1 = true;
                    self.advance();
                }
                7 => {
                    if i.index(2) == 0 {
                        self.crash_aggregator();
                    } else {
                        // Collector crash: resend from the spool's ack; what it had in
                        // flight may still arrive (stale), its acks go nowhere.
                        self.next = self.front;
                        self.slots.clear();
                        self.acks.clear();
                    }
                }
                _ => {}
            }
            Ok(())
        }

        /// Runs the protocol to the end: everything delivered, acked and done.
        fn drain(&mut self) -> Result<(), TestCaseError> {
            for _ in 0..100_000 {
                if self.front as usize > self.owned.len() {
                    return Ok(());
                }
                self.send_next();
                while !self.batches.is_empty() {
                    self.deliver(0)?;
                }
                self.commit_group()?;
                while let Some(seq) = self.acks.pop() {
                    if seq >= self.front
                        && let Some(s) = self.slots.get_mut((seq - self.front) as usize)
                    {
                        s.0 = true;
                    }
                }
                for s in self.slots.iter_mut() {
                    s.1 = true;
                }
                self.advance();
                // A batch lost in the network is resent (the collector's retry).
                if self.batches.is_empty() {
                    let lost: Vec<u64> = self
                        .slots
                        .iter()
                        .enumerate()
                        .filter(|(_, (a, _))| !a)
                        .map(|(i, _)| self.front + i as u64)
                        .collect();
                    let floor = self.floor();
                    self.batches.extend(lost.into_iter().map(|s| (s, floor)));
                }
            }
            prop_assert!(false, "did not finish");
            Ok(())
        }
    }
}
