//! Tracker counters and the events a host application can subscribe to. Plain atomics so
//! both the tokio tracker and the single-threaded browser wrapper can share them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Live counters of one tracker.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) queued: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) dropped_overflow: AtomicU64,
    pub(crate) invalid: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) gave_up: AtomicU64,
    pub(crate) persist_errors: AtomicU64,
    pub(crate) restored: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) dropped_consent: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Clicks accepted into the queue.
    pub queued: u64,
    /// Clicks the collector acknowledged (2xx).
    pub sent: u64,
    /// Clicks the collector refused for good (4xx other than 408/429); see the event hook.
    pub rejected: u64,
    /// Clicks lost to the overflow policy.
    pub dropped_overflow: u64,
    /// Clicks refused by `click()` validation.
    pub invalid: u64,
    /// Send attempts that were retried.
    pub retries: u64,
    /// Batches whose attempts ran out (their clicks stay queued for the next flush).
    pub gave_up: u64,
    /// Offline-queue write failures (the clicks stayed in memory).
    pub persist_errors: u64,
    /// Clicks reloaded from the offline queue at start.
    pub restored: u64,
    /// Batches delivered.
    pub batches: u64,
    /// Clicks discarded because consent was refused or withdrawn.
    pub dropped_consent: u64,
}

impl Stats {
    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            queued: self.queued.load(Relaxed),
            sent: self.sent.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            dropped_overflow: self.dropped_overflow.load(Relaxed),
            invalid: self.invalid.load(Relaxed),
            retries: self.retries.load(Relaxed),
            gave_up: self.gave_up.load(Relaxed),
            persist_errors: self.persist_errors.load(Relaxed),
            restored: self.restored.load(Relaxed),
            batches: self.batches.load(Relaxed),
            dropped_consent: self.dropped_consent.load(Relaxed),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Something a host application may want to log or alert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerEvent {
    /// The collector refused a batch for good (e.g. 400, 401, 413); its clicks are dropped.
    Rejected {
        /// HTTP status.
        status: u16,
        /// Clicks in the batch.
        clicks: usize,
        /// Response body (truncated), for diagnosis.
        message: String,
    },
    /// The overflow policy dropped clicks.
    Dropped {
        /// How many.
        clicks: usize,
    },
    /// A send failed and will be retried after `delay`.
    Retrying {
        /// Attempt number that failed (1-based).
        attempt: u32,
        /// Wait before the next attempt.
        delay: Duration,
        /// Status or transport error.
        reason: String,
    },
    /// A batch ran out of attempts; its clicks stay queued for the next flush.
    GaveUp {
        /// Clicks in the batch.
        clicks: usize,
        /// Last failure.
        reason: String,
    },
    /// The offline queue could not persist or forget clicks.
    PersistError {
        /// Error text.
        message: String,
    },
}
