//! The outbox: the tracker's queue of unsent clicks and its batching and overflow policy,
//! as a synchronous state machine. Wrappers (tokio, browser) own the timers and the
//! transport and call `push` / `take_batch` / `finish`; this module does no I/O of its
//! own beyond the [`OfflineQueue`] it is given.
//!
//! At most one batch is in flight; it is always the front of the queue, and its clicks
//! are removed (from memory and from the offline queue) only when the send finished for
//! good, so a crash mid-send resends rather than loses.

use std::collections::VecDeque;
use std::sync::Arc;

use adclick_proto::v1;

use super::click::ClickError;
use super::queue::{OfflineQueue, QueueError, StoredClick};
use super::stats::Stats;

/// What to drop when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Evict the oldest unsent click (the default: old clicks are the likeliest to carry
    /// expired tokens by the time the network is back).
    #[default]
    DropOldest,
    /// Refuse the new click (`click()` returns `ClickError::QueueFull`).
    DropNewest,
}

/// Batching limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// Clicks per batch (1..); a full batch is sent without waiting for the timer.
    pub batch_size: usize,
    /// Most clicks held unsent (>= batch_size).
    pub max_queue: usize,
    /// What to drop when `max_queue` is reached.
    pub overflow: OverflowPolicy,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 100,
            max_queue: 10_000,
            overflow: OverflowPolicy::DropOldest,
        }
    }
}

/// How `push` went when it did queue the click.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued.
    Queued,
    /// Queued, after evicting the oldest unsent click.
    QueuedDroppedOldest,
}

/// The batch currently being sent.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// The clicks, oldest first.
    pub clicks: Vec<v1::Click>,
    seqs: Vec<u64>,
}

/// How a send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The collector acknowledged the batch.
    Delivered,
    /// The collector refused it for good.
    Rejected,
    /// Not delivered; keep the clicks for a later attempt.
    Retry,
}

/// Queue + policy. See the module doc.
#[derive(Debug)]
pub struct Outbox<Q: OfflineQueue> {
    cfg: BatchConfig,
    pending: VecDeque<StoredClick>,
    in_flight: usize,
    next_seq: u64,
    store: Q,
    stats: Arc<Stats>,
}

impl<Q: OfflineQueue> Outbox<Q> {
    /// Opens an outbox over `store`, reloading what it holds. A store that cannot be read
    /// yields an empty outbox and the error, so tracking still works.
    pub fn open(cfg: BatchConfig, mut store: Q, stats: Arc<Stats>) -> (Self, Option<QueueError>) {
        let cfg = BatchConfig {
            batch_size: cfg.batch_size.max(1),
            max_queue: cfg.max_queue.max(cfg.batch_size.max(1)),
            ..cfg
        };
        let (pending, err) = match store.load() {
            Ok(v) => (VecDeque::from(v), None),
            Err(e) => (VecDeque::new(), Some(e)),
        };
        let next_seq = pending.back().map_or(0, |c| c.seq + 1);
        Stats::add(&stats.restored, pending.len() as u64);
        let outbox = Outbox {
            cfg,
            pending,
            in_flight: 0,
            next_seq,
            store,
            stats,
        };
        (outbox, err)
    }

    /// Queues a click (already validated, `occurred_at_ms` stamped), applying the
    /// overflow policy. Persistence failures are counted and returned in the `Err` of the
    /// inner result; the click is queued in memory regardless.
    pub fn push(
        &mut self,
        click: v1::Click,
    ) -> Result<(PushOutcome, Option<QueueError>), ClickError> {
        let mut outcome = PushOutcome::Queued;
        let mut persist_err = None;
        if self.pending.len() >= self.cfg.max_queue {
            let evictable = self.pending.len() > self.in_flight;
            if self.cfg.overflow == OverflowPolicy::DropNewest || !evictable {
                Stats::add(&self.stats.dropped_overflow, 1);
                return Err(ClickError::QueueFull);
            }
            // The oldest click that is not part of the batch in flight.
            if let Some(evicted) = self.pending.remove(self.in_flight) {
                persist_err = self.store.remove(&[evicted.seq]).err();
            }
            Stats::add(&self.stats.dropped_overflow, 1);
            outcome = PushOutcome::QueuedDroppedOldest;
        }
        let stored = StoredClick {
            seq: self.next_seq,
            click,
        };
        self.next_seq += 1;
        if let Err(e) = self.store.append(&stored) {
            persist_err = Some(e);
        }
        if persist_err.is_some() {
            Stats::add(&self.stats.persist_errors, 1);
        }
        self.pending.push_back(stored);
        Stats::add(&self.stats.queued, 1);
        Ok((outcome, persist_err))
    }

    /// Clicks held, including the batch in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// True when a full batch is waiting (send now, don't wait for the timer).
    pub fn batch_ready(&self) -> bool {
        self.in_flight == 0 && self.pending.len() >= self.cfg.batch_size
    }

    /// Marks the oldest clicks (up to `batch_size`) as in flight and returns them; `None`
    /// when empty or when a batch is already in flight.
    pub fn take_batch(&mut self) -> Option<InFlight> {
        if self.in_flight > 0 || self.pending.is_empty() {
            return None;
        }
        let n = self.cfg.batch_size.min(self.pending.len());
        self.in_flight = n;
        let front = self.pending.iter().take(n);
        let (seqs, clicks) = front.map(|s| (s.seq, s.click.clone())).unzip();
        Some(InFlight { clicks, seqs })
    }

    /// Ends the batch in flight. Delivered and rejected clicks are forgotten; `Retry`
    /// keeps them at the front for the next attempt.
    pub fn finish(&mut self, batch: InFlight, how: Completion) -> Option<QueueError> {
        let n = batch.seqs.len();
        self.in_flight = 0;
        match how {
            Completion::Retry => return None,
            Completion::Delivered => {
                Stats::add(&self.stats.sent, n as u64);
                Stats::add(&self.stats.batches, 1);
            }
            Completion::Rejected => Stats::add(&self.stats.rejected, n as u64),
        }
        // The batch is the front of the queue: eviction never touches in-flight clicks.
        let front_matches = self
            .pending
            .iter()
            .take(n)
            .map(|s| s.seq)
            .eq(batch.seqs.iter().copied());
        debug_assert!(front_matches, "in-flight batch is not the queue front");
        if front_matches {
            self.pending.drain(..n);
        } else {
            self.pending.retain(|s| !batch.seqs.contains(&s.seq));
        }
        let err = self.store.remove(&batch.seqs).err();
        if err.is_some() {
            Stats::add(&self.stats.persist_errors, 1);
        }
        err
    }

    /// Forgets every held click, in memory and in the store (consent withdrawn). Returns
    /// how many, and a store error if forgetting them there failed.
    pub fn clear(&mut self) -> (usize, Option<QueueError>) {
        self.in_flight = 0;
        let seqs: Vec<u64> = self.pending.drain(..).map(|s| s.seq).collect();
        if seqs.is_empty() {
            return (0, None);
        }
        let err = self.store.remove(&seqs).err();
        if err.is_some() {
            Stats::add(&self.stats.persist_errors, 1);
        }
        (seqs.len(), err)
    }

    /// Forgets that a batch is in flight without completing it (its clicks stay queued).
    /// For wrappers whose sender was cancelled mid-send.
    pub fn abandon_in_flight(&mut self) {
        self.in_flight = 0;
    }

    /// The batching limits in force (after clamping).
    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::queue::MemoryQueue;

    fn click(n: i64) -> v1::Click {
        v1::Click {
            token: format!("t{n}"),
            occurred_at_ms: n,
            ..Default::default()
        }
    }

    fn outbox(batch: usize, max: usize, overflow: OverflowPolicy) -> Outbox<MemoryQueue> {
        let cfg = BatchConfig {
            batch_size: batch,
            max_queue: max,
            overflow,
        };
        Outbox::open(cfg, MemoryQueue, Arc::default()).0
    }

    fn times(b: &InFlight) -> Vec<i64> {
        b.clicks.iter().map(|c| c.occurred_at_ms).collect()
    }

    #[test]
    fn batches_in_order_and_retry_keeps_front() {
        let mut o = outbox(2, 10, OverflowPolicy::DropOldest);
        for i in 0..5 {
            o.push(click(i)).unwrap();
        }
        assert!(o.batch_ready());
        let b = o.take_batch().unwrap();
        assert_eq!(times(&b), vec![0, 1]);
        assert!(o.take_batch().is_none(), "one batch in flight at a time");
        o.finish(b, Completion::Retry);
        let b = o.take_batch().unwrap();
        assert_eq!(times(&b), vec![0, 1]);
        o.finish(b, Completion::Delivered);
        let b = o.take_batch().unwrap();
        assert_eq!(times(&b), vec![2, 3]);
        o.finish(b, Completion::Rejected);
        assert_eq!(o.len(), 1);
        let s = o.stats.snapshot();
        assert_eq!((s.queued, s.sent, s.rejected, s.batches), (5, 2, 2, 1));
    }

    #[test]
    fn drop_oldest_never_evicts_the_batch_in_flight() {
        let mut o = outbox(2, 3, OverflowPolicy::DropOldest);
        for i in 0..3 {
            o.push(click(i)).unwrap();
        }
        let b = o.take_batch().unwrap();
        assert_eq!(times(&b), vec![0, 1]);
        assert_eq!(
            o.push(click(3)).unwrap().0,
            PushOutcome::QueuedDroppedOldest
        );
        assert_eq!(
            o.push(click(4)).unwrap().0,
            PushOutcome::QueuedDroppedOldest
        );
        o.finish(b, Completion::Delivered);
        assert_eq!(times(&o.take_batch().unwrap()), vec![4]);
        assert_eq!(o.stats.snapshot().dropped_overflow, 2);

        // When every held click is in flight there is nothing to evict: refuse instead.
        let mut o = outbox(3, 3, OverflowPolicy::DropOldest);
        for i in 0..3 {
            o.push(click(i)).unwrap();
        }
        let b = o.take_batch().unwrap();
        assert_eq!(o.push(click(3)), Err(ClickError::QueueFull));
        o.finish(b, Completion::Delivered);
        assert_eq!(o.push(click(3)).unwrap().0, PushOutcome::Queued);
    }

    #[test]
    fn drop_newest_refuses_and_counts() {
        let mut o = outbox(5, 5, OverflowPolicy::DropNewest);
        for i in 0..5 {
            o.push(click(i)).unwrap();
        }
        assert_eq!(o.push(click(9)), Err(ClickError::QueueFull));
        assert_eq!(times(&o.take_batch().unwrap()), vec![0, 1, 2, 3, 4]);
        assert_eq!(o.stats.snapshot().dropped_overflow, 1);
    }
}
