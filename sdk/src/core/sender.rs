//! The sans-IO sender: one state machine that owns everything a tracker decides, and that
//! every runtime drives (the native tokio tracker, the browser tracker, the FFI tracker).
//!
//! It owns batching and overflow (through the [`Outbox`] and its [`OfflineQueue`]), the
//! retry schedule (classification, exponential backoff with full jitter, `Retry-After` as a
//! floor, attempts per flush), the flush timer, consent, the click timestamps
//! (`occurred_at` when clicked, `sent_at` stamped on every attempt; the collector adds the
//! third, `received_at`) and the [`Stats`]. It does no I/O and reads no clock: the driver
//! passes the time in ([`Now`]) and carries out what it is told:
//!
//! - [`Sender::poll_transmit`]: "send these bytes now" ([`Transmit`]); the driver posts
//!   them and reports the answer with [`Sender::on_reply`] (one send at a time);
//! - [`Sender::poll_timeout`]: "wake me at T" (monotonic ms); the driver then calls
//!   [`Sender::handle_timeout`] and polls again;
//! - [`Sender::poll_output`]: what happened ([`Output`]): a batch accepted, an event for the
//!   host (rejected with its reason, retrying, gave up, dropped, storage error), a flush
//!   finished.
//!
//! A driver loop: after any input (a click, a flush, a reply, a timer), call
//! `handle_timeout(now)`, then `poll_transmit(now)` (start that send), drain
//! `poll_output()`, and sleep until `poll_timeout()` or the next input.
//!
//! Invariants (property-tested in this file): a click is forgotten only when the collector
//! acknowledged it, refused it for good, or a documented policy dropped it (overflow,
//! consent), each counted; a click acknowledged is never transmitted again; at most
//! `max_attempts` attempts per batch per flush, each wait within the full-jitter bound or
//! exactly the (capped) `Retry-After`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use adclick_proto::v1;

use super::click::{ClickError, Dimensions, build_click, encode_batch};
use super::outbox::{BatchConfig, Completion, InFlight, Outbox, PushOutcome};
use super::queue::{OfflineQueue, QueueError};
use super::retry::{Disposition, RetryPolicy, classify, parse_retry_after};
use super::stats::{Stats, StatsSnapshot, TrackerEvent};

/// The time, as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// A monotonic clock in ms (any origin): what timers and backoff are measured in.
    pub mono_ms: u64,
    /// The device's wall clock in ms since the Unix epoch: what clicks are stamped with.
    pub wall_ms: i64,
}

/// Whether the user allows storing and sending clicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consent {
    /// Store and send (the default).
    #[default]
    Granted,
    /// No answer yet: new clicks wait in memory only (at most `max_queue`, oldest dropped),
    /// nothing is written to the offline queue and nothing is sent.
    Pending,
    /// Refused or withdrawn: every unsent click is discarded (in memory and in the offline
    /// queue) when it is withdrawn, and new clicks are discarded, until it is given.
    Denied,
}

/// Sender settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SenderConfig {
    /// Batch size, queue bound and overflow policy.
    pub batch: BatchConfig,
    /// Backoff and attempts.
    pub retry: RetryPolicy,
    /// Everything queued is sent at least this often.
    pub flush_interval: Duration,
    /// `ClickBatch.sdk_name`.
    pub sdk_name: String,
    /// `ClickBatch.sdk_version`.
    pub sdk_version: String,
    /// Consent at start.
    pub consent: Consent,
    /// Seed of the jitter's random numbers (drivers pass OS or JS randomness; tests fix it).
    pub seed: u64,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            batch: BatchConfig::default(),
            retry: RetryPolicy::default(),
            flush_interval: Duration::from_secs(2),
            sdk_name: crate::SDK_NAME.to_string(),
            sdk_version: crate::SDK_VERSION.to_string(),
            consent: Consent::Granted,
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

/// "Send these bytes now": an encoded `ClickBatch` for `POST {endpoint}/v1/clicks`.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    /// Pass back to [`Sender::on_reply`] with the answer.
    pub id: u64,
    /// The encoded `ClickBatch` (`sent_at` stamped now).
    pub body: Vec<u8>,
    /// Clicks in it.
    pub clicks: usize,
    /// 1 for the first attempt of this batch in this flush, then 2, ...
    pub attempt: u32,
}

/// What the collector (or the network) answered to a [`Transmit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An HTTP status (QUIC maps onto the same codes).
    Status {
        /// The status.
        status: u16,
        /// The `Retry-After` header, if any.
        retry_after: Option<String>,
        /// The body (truncated), reported with rejections.
        body: String,
    },
    /// No answer: connect error, timeout, reset. Always retried.
    Failed(String),
}

/// Why a flush ended without an empty queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    /// A batch ran out of attempts; `queued` clicks stay queued for a later flush.
    #[error("{queued} clicks not delivered yet: {reason}")]
    Undelivered {
        /// Clicks still queued.
        queued: usize,
        /// The last failure.
        reason: String,
    },
    /// Consent has not been given: `held` clicks wait in memory.
    #[error("no consent yet: {held} clicks held in memory until consent is given")]
    NoConsent {
        /// Clicks held.
        held: usize,
    },
}

/// What happened, for the driver to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The collector accepted a batch of `clicks` (2xx).
    Accepted {
        /// Clicks in the batch.
        clicks: usize,
    },
    /// Something for the host's event hook (rejections with their reason, retries,
    /// give-ups, drops, storage errors).
    Event(TrackerEvent),
    /// Every flush whose ticket is `<= through` is finished, with this result.
    Flushed {
        /// The highest finished ticket ([`Sender::flush`]).
        through: u64,
        /// Empty queue, or why not.
        result: Result<(), FlushError>,
    },
    /// Clicks discarded because consent was refused or withdrawn.
    DroppedConsent {
        /// How many.
        clicks: usize,
    },
}

#[derive(Debug)]
enum State {
    Idle,
    Sending {
        batch: InFlight,
        attempt: u32,
        id: u64,
    },
    Waiting {
        batch: InFlight,
        attempt: u32,
        until_ms: u64,
    },
}

/// The sender state machine. See the module doc.
#[derive(Debug)]
pub struct Sender<Q: OfflineQueue> {
    outbox: Outbox<Q>,
    stats: Arc<Stats>,
    retry: RetryPolicy,
    interval_ms: u64,
    sdk_name: String,
    sdk_version: String,
    consent: Consent,
    /// Clicks waiting for consent (memory only).
    held: VecDeque<v1::Click>,
    state: State,
    next_tick_ms: u64,
    /// Send everything queued (a timer tick, a flush, restored clicks), not only full
    /// batches; cleared when the queue is empty or a batch gave up.
    drain: bool,
    /// A batch gave up: send nothing (not even full batches) until the next tick or flush.
    paused: bool,
    flush_requested: u64,
    flush_done: u64,
    next_id: u64,
    rng: u64,
    out: VecDeque<Output>,
}

impl<Q: OfflineQueue> Sender<Q> {
    /// A sender over `store`, reloading the clicks it holds (they are sent at once).
    /// `mono_ms` is the driver's monotonic clock now (the timer starts from it).
    pub fn new(cfg: SenderConfig, store: Q, mono_ms: u64) -> Self {
        let stats = Arc::new(Stats::default());
        let (outbox, err) = Outbox::open(cfg.batch, store, stats.clone());
        let mut s = Sender {
            outbox,
            stats,
            retry: RetryPolicy {
                max_attempts: cfg.retry.max_attempts.max(1),
                ..cfg.retry
            },
            interval_ms: u64::try_from(cfg.flush_interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            sdk_name: cfg.sdk_name,
            sdk_version: cfg.sdk_version,
            consent: cfg.consent,
            held: VecDeque::new(),
            state: State::Idle,
            next_tick_ms: 0,
            drain: false,
            paused: false,
            flush_requested: 0,
            flush_done: 0,
            next_id: 1,
            rng: cfg.seed,
            out: VecDeque::new(),
        };
        s.next_tick_ms = mono_ms.saturating_add(s.interval_ms);
        s.after_open(err);
        s
    }

    fn after_open(&mut self, err: Option<QueueError>) {
        if let Some(e) = err {
            Stats::add(&self.stats.persist_errors, 1);
            self.event(TrackerEvent::PersistError {
                message: e.to_string(),
            });
        }
        // Clicks restored from the offline queue go out without waiting for the timer.
        self.drain |= !self.outbox.is_empty();
    }

    /// Replaces the offline queue (e.g. opening persistent storage once consent is given):
    /// a send in progress is forgotten (its answer will be ignored), clicks of the old
    /// queue are dropped from memory (not from the old store), and `store`'s clicks are
    /// loaded and sent.
    pub fn reopen(&mut self, store: Q) {
        self.reset_send();
        let cfg = self.outbox.config().clone();
        let (outbox, err) = Outbox::open(cfg, store, self.stats.clone());
        self.outbox = outbox;
        self.after_open(err);
    }

    /// Validates and queues a click stamped `occurred_at = now.wall_ms` (or, without
    /// consent, holds or discards it). Never sends by itself: poll afterwards.
    pub fn click(&mut self, token: &str, dims: Dimensions, now: Now) -> Result<(), ClickError> {
        let click = build_click(token, dims, now.wall_ms).inspect_err(|_| {
            Stats::add(&self.stats.invalid, 1);
        })?;
        match self.consent {
            Consent::Granted => self.push(click),
            Consent::Denied => {
                Stats::add(&self.stats.dropped_consent, 1);
                self.out.push_back(Output::DroppedConsent { clicks: 1 });
                Ok(())
            }
            Consent::Pending => {
                self.held.push_back(click);
                if self.held.len() > self.outbox.config().max_queue {
                    self.held.pop_front();
                    Stats::add(&self.stats.dropped_overflow, 1);
                    self.event(TrackerEvent::Dropped { clicks: 1 });
                }
                Ok(())
            }
        }
    }

    fn push(&mut self, click: v1::Click) -> Result<(), ClickError> {
        match self.outbox.push(click) {
            Ok((outcome, persist_err)) => {
                if outcome == PushOutcome::QueuedDroppedOldest {
                    self.event(TrackerEvent::Dropped { clicks: 1 });
                }
                if let Some(e) = persist_err {
                    self.event(TrackerEvent::PersistError {
                        message: e.to_string(),
                    });
                }
                Ok(())
            }
            Err(e) => {
                self.event(TrackerEvent::Dropped { clicks: 1 });
                Err(e)
            }
        }
    }

    /// Asks for everything queued to be sent now (a new round of attempts, whatever the
    /// last flush did). Returns the ticket that an [`Output::Flushed`] will cover.
    pub fn flush(&mut self) -> u64 {
        self.flush_requested += 1;
        match self.consent {
            Consent::Granted => {
                self.drain = true;
                self.paused = false;
            }
            Consent::Pending if !self.held.is_empty() => {
                let held = self.held.len();
                self.finish_flushes(Err(FlushError::NoConsent { held }));
            }
            // Nothing can be sent; nothing is waiting to be either.
            Consent::Pending | Consent::Denied => self.finish_flushes(Ok(())),
        }
        self.flush_requested
    }

    /// Gives or withdraws consent; see [`Consent`]. Withdrawing discards every unsent
    /// click (memory and offline queue, counted in `dropped_consent`) and forgets a send
    /// in progress; giving it queues the held clicks and resumes sending.
    pub fn set_consent(&mut self, consent: Consent) {
        if consent == self.consent {
            return;
        }
        self.consent = consent;
        match consent {
            Consent::Granted => {
                let held: Vec<_> = self.held.drain(..).collect();
                for click in held {
                    // Already validated; a full queue drops (and reports) the oldest.
                    let _ = self.push(click);
                }
                self.drain |= !self.outbox.is_empty();
            }
            Consent::Denied => {
                self.reset_send();
                let (n, err) = self.outbox.clear();
                let n = n + self.held.len();
                self.held.clear();
                if let Some(e) = err {
                    self.event(TrackerEvent::PersistError {
                        message: e.to_string(),
                    });
                }
                if n > 0 {
                    Stats::add(&self.stats.dropped_consent, n as u64);
                    self.out.push_back(Output::DroppedConsent { clicks: n });
                }
                self.finish_flushes(Ok(()));
            }
            Consent::Pending => {
                // Back to "not answered": stop sending; what is queued stays stored.
                self.reset_send();
            }
        }
    }

    /// The timer: call when [`Sender::poll_timeout`] has passed (calling early is harmless).
    pub fn handle_timeout(&mut self, now: Now) {
        if now.mono_ms >= self.next_tick_ms {
            self.next_tick_ms = now.mono_ms.saturating_add(self.interval_ms);
            if self.consent == Consent::Granted && !self.outbox.is_empty() {
                self.drain = true;
                self.paused = false;
            }
        }
    }

    /// When to call [`Sender::handle_timeout`] next (monotonic ms).
    pub fn poll_timeout(&self) -> u64 {
        match &self.state {
            State::Waiting { until_ms, .. } => (*until_ms).min(self.next_tick_ms),
            _ => self.next_tick_ms,
        }
    }

    /// The next batch to send now, if any (one at a time: `None` while a send is in
    /// progress). The driver must answer it with [`Sender::on_reply`].
    pub fn poll_transmit(&mut self, now: Now) -> Option<Transmit> {
        if self.consent != Consent::Granted {
            return None;
        }
        let (batch, attempt) = match std::mem::replace(&mut self.state, State::Idle) {
            s @ State::Sending { .. } => {
                self.state = s;
                return None;
            }
            State::Waiting {
                batch,
                attempt,
                until_ms,
            } => {
                if now.mono_ms < until_ms {
                    self.state = State::Waiting {
                        batch,
                        attempt,
                        until_ms,
                    };
                    return None;
                }
                (batch, attempt + 1)
            }
            State::Idle => {
                let wanted = !self.paused && (self.outbox.batch_ready() || self.drain);
                let batch = if wanted {
                    self.outbox.take_batch()
                } else {
                    None
                };
                let Some(batch) = batch else {
                    if self.drain && self.outbox.is_empty() {
                        self.drain = false;
                        self.finish_flushes(Ok(()));
                    }
                    return None;
                };
                (batch, 1)
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        // Re-stamped per attempt: sent_at must be the actual send time.
        let body = encode_batch(
            &batch.clicks,
            now.wall_ms,
            &self.sdk_name,
            &self.sdk_version,
        );
        let clicks = batch.clicks.len();
        self.state = State::Sending { batch, attempt, id };
        Some(Transmit {
            id,
            body,
            clicks,
            attempt,
        })
    }

    /// The answer to the [`Transmit`] `id`. Answers to sends the sender forgot (consent
    /// changed, queue reopened, a cancelled send) are ignored.
    pub fn on_reply(&mut self, id: u64, reply: Reply, now: Now) {
        let (batch, attempt) = match std::mem::replace(&mut self.state, State::Idle) {
            State::Sending {
                batch,
                attempt,
                id: current,
            } if current == id => (batch, attempt),
            other => {
                self.state = other;
                return;
            }
        };
        let n = batch.clicks.len();
        let (retry_after, reason) = match reply {
            Reply::Status {
                status,
                retry_after,
                body,
            } => match classify(status) {
                Disposition::Delivered => {
                    self.complete(batch, Completion::Delivered);
                    self.out.push_back(Output::Accepted { clicks: n });
                    return;
                }
                Disposition::Reject => {
                    self.complete(batch, Completion::Rejected);
                    self.event(TrackerEvent::Rejected {
                        status,
                        clicks: n,
                        message: body,
                    });
                    return;
                }
                Disposition::Retry => (
                    retry_after
                        .as_deref()
                        .and_then(|v| parse_retry_after(v, now.wall_ms)),
                    format!("HTTP {status}"),
                ),
            },
            Reply::Failed(reason) => (None, reason),
        };
        if attempt >= self.retry.max_attempts {
            self.complete(batch, Completion::Retry);
            Stats::add(&self.stats.gave_up, 1);
            self.event(TrackerEvent::GaveUp {
                clicks: n,
                reason: reason.clone(),
            });
            self.drain = false;
            self.paused = true;
            let queued = self.outbox.len();
            self.finish_flushes(Err(FlushError::Undelivered { queued, reason }));
            return;
        }
        Stats::add(&self.stats.retries, 1);
        let rand = self.rand01();
        let delay = self.retry.delay(attempt, retry_after, rand);
        let wait = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state = State::Waiting {
            batch,
            attempt,
            until_ms: now.mono_ms.saturating_add(wait),
        };
        self.event(TrackerEvent::Retrying {
            attempt,
            delay,
            reason,
        });
    }

    /// Forgets the send in progress without an answer (the driver cancelled it); its
    /// clicks stay queued and go in the next batch.
    pub fn cancel_send(&mut self) {
        self.reset_send();
    }

    /// The next thing that happened, oldest first.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Counters since this sender was created.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Clicks not delivered yet: queued (including a batch being sent) and held for consent.
    pub fn unsent(&self) -> usize {
        self.outbox.len() + self.held.len()
    }

    /// Clicks in the queue (including a batch being sent).
    pub fn queued(&self) -> usize {
        self.outbox.len()
    }

    /// Clicks held in memory for consent.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The consent state.
    pub fn consent(&self) -> Consent {
        self.consent
    }

    /// True when a send is in progress.
    pub fn sending(&self) -> bool {
        matches!(self.state, State::Sending { .. })
    }

    /// True when [`Sender::poll_transmit`] would return a batch right now, without a timer
    /// (a full batch, or a drain in progress): a hint for drivers to wake their loop.
    pub fn wants_send(&self) -> bool {
        self.consent == Consent::Granted
            && matches!(self.state, State::Idle)
            && !self.paused
            && (self.outbox.batch_ready() || (self.drain && !self.outbox.is_empty()))
    }

    fn reset_send(&mut self) {
        self.state = State::Idle;
        self.outbox.abandon_in_flight();
    }

    fn complete(&mut self, batch: InFlight, how: Completion) {
        if let Some(e) = self.outbox.finish(batch, how) {
            self.event(TrackerEvent::PersistError {
                message: e.to_string(),
            });
        }
    }

    fn finish_flushes(&mut self, result: Result<(), FlushError>) {
        if self.flush_done < self.flush_requested {
            self.flush_done = self.flush_requested;
            self.out.push_back(Output::Flushed {
                through: self.flush_done,
                result,
            });
        }
    }

    fn event(&mut self, e: TrackerEvent) {
        self.out.push_back(Output::Event(e));
    }

    /// splitmix64, mapped to [0, 1).
    fn rand01(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::rc::Rc;

    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;
    use crate::core::OverflowPolicy;
    use crate::core::queue::StoredClick;

    /// A persistent store shared across "process restarts" of a test.
    #[derive(Debug, Clone, Default)]
    struct Disk(Rc<RefCell<BTreeMap<u64, v1::Click>>>);

    impl OfflineQueue for Disk {
        fn load(&mut self) -> Result<Vec<StoredClick>, QueueError> {
            let m = self.0.borrow();
            Ok(m.iter()
                .map(|(seq, click)| StoredClick {
                    seq: *seq,
                    click: click.clone(),
                })
                .collect())
        }
        fn append(&mut self, c: &StoredClick) -> Result<(), QueueError> {
            self.0.borrow_mut().insert(c.seq, c.click.clone());
            Ok(())
        }
        fn remove(&mut self, seqs: &[u64]) -> Result<(), QueueError> {
            let mut m = self.0.borrow_mut();
            for s in seqs {
                m.remove(s);
            }
            Ok(())
        }
    }

    fn cfg(
        batch: usize,
        max_queue: usize,
        attempts: u32,
        overflow: OverflowPolicy,
    ) -> SenderConfig {
        SenderConfig {
            batch: BatchConfig {
                batch_size: batch,
                max_queue,
                overflow,
            },
            retry: RetryPolicy {
                base_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(1_000),
                max_attempts: attempts,
                max_retry_after: Duration::from_millis(5_000),
            },
            flush_interval: Duration::from_millis(2_000),
            seed: 7,
            ..SenderConfig::default()
        }
    }

    fn at(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            wall_ms: 1_700_000_000_000 + ms as i64,
        }
    }

    fn tokens(t: &Transmit) -> Vec<String> {
        let b = v1::ClickBatch::decode(t.body.as_slice()).unwrap();
        b.clicks.into_iter().map(|c| c.token).collect()
    }

    fn outputs<Q: OfflineQueue>(s: &mut Sender<Q>) -> Vec<Output> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn ok() -> Reply {
        Reply::Status {
            status: 202,
            retry_after: None,
            body: String::new(),
        }
    }

    #[test]
    fn full_batch_at_once_partial_on_the_timer_retry_then_accept() {
        let mut s = Sender::new(
            cfg(2, 10, 3, OverflowPolicy::DropOldest),
            Disk::default(),
            0,
        );
        for t in ["a", "b", "c"] {
            s.click(t, Dimensions::new(), at(1)).unwrap();
        }
        let t1 = s.poll_transmit(at(1)).unwrap();
        assert_eq!((tokens(&t1), t1.attempt), (vec!["a".into(), "b".into()], 1));
        assert!(s.poll_transmit(at(1)).is_none(), "one send at a time");
        s.on_reply(t1.id, Reply::Failed("reset".into()), at(5));
        let Some(Output::Event(TrackerEvent::Retrying { delay, .. })) = s.poll_output() else {
            panic!("no retry event")
        };
        let due = 5 + delay.as_millis() as u64;
        assert_eq!(s.poll_timeout(), due.min(2_000));
        if due > 5 {
            assert!(
                s.poll_transmit(at(due - 1)).is_none(),
                "not before the backoff"
            );
        }
        let t2 = s.poll_transmit(at(due)).unwrap();
        assert_eq!((tokens(&t2), t2.attempt), (tokens(&t1), 2));
        let b2 = v1::ClickBatch::decode(t2.body.as_slice()).unwrap();
        assert_eq!(
            b2.sent_at_ms,
            at(due).wall_ms,
            "sent_at is stamped per attempt"
        );
        assert_eq!(b2.clicks[0].occurred_at_ms, at(1).wall_ms);
        s.on_reply(t2.id, ok(), at(due));
        assert_eq!(outputs(&mut s), [Output::Accepted { clicks: 2 }]);
        // "c" waits for the timer.
        assert!(s.poll_transmit(at(due)).is_none());
        assert_eq!(s.poll_timeout(), 2_000);
        s.handle_timeout(at(2_000));
        let t3 = s.poll_transmit(at(2_000)).unwrap();
        assert_eq!(tokens(&t3), ["c"]);
        // An answer to a forgotten send is ignored.
        s.on_reply(t1.id, ok(), at(2_001));
        assert!(s.sending());
        s.on_reply(t3.id, ok(), at(2_001));
        let st = s.stats();
        assert_eq!((st.sent, st.retries, st.batches, st.queued), (3, 1, 2, 3));
    }

    #[test]
    fn retry_after_is_the_floor_and_give_up_finishes_the_flush() {
        let mut s = Sender::new(
            cfg(10, 10, 2, OverflowPolicy::DropOldest),
            Disk::default(),
            0,
        );
        s.click("a", Dimensions::new(), at(0)).unwrap();
        let ticket = s.flush();
        let t = s.poll_transmit(at(0)).unwrap();
        s.on_reply(
            t.id,
            Reply::Status {
                status: 429,
                retry_after: Some("3".into()),
                body: String::new(),
            },
            at(10),
        );
        assert_eq!(s.poll_timeout(), 2_000, "the timer comes first");
        assert!(s.poll_transmit(at(3_009)).is_none());
        let t = s.poll_transmit(at(3_010)).unwrap();
        s.on_reply(
            t.id,
            Reply::Status {
                status: 503,
                retry_after: None,
                body: String::new(),
            },
            at(3_010),
        );
        let out = outputs(&mut s);
        assert!(out.contains(&Output::Flushed {
            through: ticket,
            result: Err(FlushError::Undelivered {
                queued: 1,
                reason: "HTTP 503".into()
            })
        }));
        // Paused until the next tick: nothing is sent, even on a poll.
        assert!(s.poll_transmit(at(3_011)).is_none());
        s.handle_timeout(at(s.poll_timeout()));
        assert!(s.poll_transmit(at(5_010)).is_some());
        assert_eq!(s.stats().gave_up, 1);
    }

    #[test]
    fn rejection_drops_the_batch_with_its_reason() {
        let mut s = Sender::new(
            cfg(1, 10, 3, OverflowPolicy::DropOldest),
            Disk::default(),
            0,
        );
        s.click("a", Dimensions::new(), at(0)).unwrap();
        let t = s.poll_transmit(at(0)).unwrap();
        s.on_reply(
            t.id,
            Reply::Status {
                status: 401,
                retry_after: None,
                body: "bad key".into(),
            },
            at(1),
        );
        assert_eq!(
            outputs(&mut s),
            [Output::Event(TrackerEvent::Rejected {
                status: 401,
                clicks: 1,
                message: "bad key".into()
            })]
        );
        assert_eq!((s.queued(), s.stats().rejected), (0, 1));
    }

    #[test]
    fn consent_pending_holds_in_memory_granted_sends_denied_discards() {
        let disk = Disk::default();
        let c = SenderConfig {
            consent: Consent::Pending,
            ..cfg(3, 3, 3, OverflowPolicy::DropOldest)
        };
        let mut s = Sender::new(c, disk.clone(), 0);
        for t in ["a", "b", "c", "d"] {
            s.click(t, Dimensions::new(), at(0)).unwrap();
        }
        assert_eq!((s.held(), s.stats().dropped_overflow), (3, 1));
        assert!(disk.0.borrow().is_empty(), "nothing stored before consent");
        let ticket = s.flush();
        assert!(outputs(&mut s).contains(&Output::Flushed {
            through: ticket,
            result: Err(FlushError::NoConsent { held: 3 })
        }));
        assert!(s.poll_transmit(at(0)).is_none());
        s.set_consent(Consent::Granted);
        assert_eq!(disk.0.borrow().len(), 3);
        let t = s.poll_transmit(at(1)).unwrap();
        assert_eq!(tokens(&t), ["b", "c", "d"]);
        // Withdrawn mid-send: everything goes, the late answer changes nothing.
        s.set_consent(Consent::Denied);
        assert!(disk.0.borrow().is_empty());
        s.on_reply(t.id, ok(), at(2));
        s.click("e", Dimensions::new(), at(2)).unwrap();
        let st = s.stats();
        assert_eq!((st.sent, st.dropped_consent, s.unsent()), (0, 4, 0));
    }

    #[test]
    fn restored_clicks_go_out_at_once() {
        let disk = Disk::default();
        let mut s = Sender::new(cfg(10, 10, 1, OverflowPolicy::DropOldest), disk.clone(), 0);
        s.click("a", Dimensions::new(), at(0)).unwrap();
        drop(s);
        let mut s = Sender::new(cfg(10, 10, 1, OverflowPolicy::DropOldest), disk, 0);
        assert_eq!(s.stats().restored, 1);
        assert_eq!(tokens(&s.poll_transmit(at(0)).unwrap()), ["a"]);
    }

    /// What the driver does next in the property test.
    #[derive(Debug, Clone)]
    enum Op {
        Click,
        Advance(u64),
        Flush,
        /// Answer the send in progress: 0 accept, 1 reject, 2 retryable status, 3 no answer.
        Reply(u8, Option<u16>),
        /// The process dies (the send in progress is never answered) and starts again
        /// over the same disk.
        Restart,
        Consent(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => Just(Op::Click),
            3 => (0u64..3_000).prop_map(Op::Advance),
            1 => Just(Op::Flush),
            6 => (0u8..4, proptest::option::of(0u16..8)).prop_map(|(k, ra)| Op::Reply(k, ra)),
            1 => Just(Op::Restart),
            1 => (0u8..8).prop_map(Op::Consent),
        ]
    }

    fn token_no(t: &str) -> u64 {
        t.trim_start_matches('t').parse().unwrap()
    }

    fn total(past: &StatsSnapshot, st: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            sent: past.sent + st.sent,
            rejected: past.rejected + st.rejected,
            dropped_overflow: past.dropped_overflow + st.dropped_overflow,
            dropped_consent: past.dropped_consent + st.dropped_consent,
            ..StatsSnapshot::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Across arbitrary answers, timings, flushes, restarts and consent changes: no click
        /// is acknowledged twice or sent again once acknowledged; acknowledged clicks keep
        /// click order; every accepted click is accounted for at every step (acknowledged,
        /// rejected, dropped by a counted policy, or still unsent); no attempt beyond
        /// `max_attempts`, every wait within the full-jitter bound or exactly the capped
        /// `Retry-After`, no retry before its wait is over; and once the collector answers
        /// 2xx, everything left is delivered and the disk is empty.
        #[test]
        fn no_click_lost_or_duplicated(
            ops in proptest::collection::vec(op(), 1..250),
            batch in 1usize..6,
            max_queue in 1usize..12,
            attempts in 1u32..5,
            drop_newest in any::<bool>(),
        ) {
            let overflow = if drop_newest { OverflowPolicy::DropNewest } else { OverflowPolicy::DropOldest };
            let c = cfg(batch, max_queue, attempts, overflow);
            let retry = c.retry.clone();
            let disk = Disk::default();
            let mut s = Sender::new(c.clone(), disk.clone(), 0);
            let mut now = 0u64;
            // The test's own ledger.
            let mut accepted = 0u64; // click() said Ok
            let mut refused = 0u64; // click() said QueueFull (counted in dropped_overflow)
            let mut lost_held = 0u64; // held for consent (memory only) when the process died
            let mut acked: Vec<u64> = Vec::new();
            let mut acked_set: BTreeSet<u64> = BTreeSet::new();
            let mut rejected = 0u64;
            let mut past = StatsSnapshot::default(); // counters of earlier processes
            let mut next_token = 0u64;
            let mut in_flight: Option<(Transmit, Vec<u64>)> = None;
            let mut not_before = 0u64;

            for op in ops {
                match op {
                    Op::Click => {
                        let token = format!("t{next_token}");
                        next_token += 1;
                        match s.click(&token, Dimensions::new(), at(now)) {
                            Ok(()) => accepted += 1,
                            Err(ClickError::QueueFull) => refused += 1,
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Advance(ms) => {
                        now += ms;
                        s.handle_timeout(at(now));
                    }
                    Op::Flush => {
                        s.flush();
                    }
                    Op::Reply(kind, ra) => {
                        if let Some((t, toks)) = in_flight.take() {
                            let reply = match kind {
                                0 => ok(),
                                1 => Reply::Status { status: 400, retry_after: None, body: String::new() },
                                2 => Reply::Status { status: 503, retry_after: ra.map(|r| r.to_string()), body: String::new() },
                                _ => Reply::Failed("timeout".into()),
                            };
                            s.on_reply(t.id, reply, at(now));
                            match kind {
                                0 => for k in toks {
                                    prop_assert!(acked_set.insert(k), "t{} acknowledged twice", k);
                                    prop_assert!(acked.last().is_none_or(|l| *l < k), "t{} acknowledged out of order", k);
                                    acked.push(k);
                                },
                                1 => rejected += toks.len() as u64,
                                _ => {}
                            }
                            while let Some(o) = s.poll_output() {
                                if let Output::Event(TrackerEvent::Retrying { attempt, delay, .. }) = o {
                                    prop_assert_eq!(attempt, t.attempt);
                                    prop_assert!(attempt < retry.max_attempts);
                                    let ceiling = retry.base_delay
                                        .saturating_mul(1 << (attempt - 1).min(30))
                                        .min(retry.max_delay);
                                    let floor = ra.map(|r| Duration::from_secs(r.into()).min(retry.max_retry_after));
                                    match (kind, floor) {
                                        (2, Some(f)) => prop_assert!(delay >= f && delay <= f.max(ceiling), "{:?}", delay),
                                        _ => prop_assert!(delay <= ceiling, "{:?} > {:?}", delay, ceiling),
                                    }
                                    not_before = now + delay.as_millis() as u64;
                                }
                            }
                        }
                    }
                    Op::Restart => {
                        past = total(&past, &s.stats());
                        lost_held += s.held() as u64;
                        let consent = s.consent();
                        in_flight = None;
                        not_before = 0;
                        s = Sender::new(SenderConfig { consent, ..c.clone() }, disk.clone(), now);
                        prop_assert_eq!(s.queued(), disk.0.borrow().len());
                    }
                    Op::Consent(k) => s.set_consent(match k {
                        0 => Consent::Denied,
                        1 => Consent::Pending,
                        _ => Consent::Granted,
                    }),
                }
                if in_flight.is_some() && !s.sending() {
                    in_flight = None; // forgotten by a consent change
                }
                while s.poll_output().is_some() {}
                if in_flight.is_none() && let Some(t) = s.poll_transmit(at(now)) {
                    prop_assert!(t.attempt == 1 || now >= not_before, "retry before its backoff ended");
                    prop_assert!(t.attempt <= retry.max_attempts);
                    let toks: Vec<u64> = tokens(&t).iter().map(|x| token_no(x)).collect();
                    for k in &toks {
                        prop_assert!(!acked_set.contains(k), "t{} sent again after its ack", k);
                    }
                    in_flight = Some((t, toks));
                }
                // Conservation, at every step.
                let all = total(&past, &s.stats());
                prop_assert_eq!(all.sent, acked.len() as u64);
                prop_assert_eq!(all.rejected, rejected);
                prop_assert_eq!(
                    all.sent + all.rejected + all.dropped_overflow - refused + all.dropped_consent
                        + lost_held + s.unsent() as u64,
                    accepted
                );
            }

            // Heal: consent given, the collector answers 2xx; everything left goes out.
            s.set_consent(Consent::Granted);
            s.flush();
            if let Some((t, toks)) = in_flight.take() {
                s.on_reply(t.id, ok(), at(now));
                for k in toks {
                    prop_assert!(acked_set.insert(k), "t{} acknowledged twice", k);
                }
            }
            for _ in 0..10_000 {
                if let Some(t) = s.poll_transmit(at(now)) {
                    for k in tokens(&t).iter().map(|x| token_no(x)) {
                        prop_assert!(acked_set.insert(k), "t{} acknowledged twice", k);
                    }
                    s.on_reply(t.id, ok(), at(now));
                } else if s.queued() == 0 {
                    break;
                } else {
                    now = s.poll_timeout().max(now + 1);
                    s.handle_timeout(at(now));
                }
            }
            prop_assert_eq!(s.queued(), 0);
            prop_assert!(disk.0.borrow().is_empty(), "delivered clicks left on disk");
            let all = total(&past, &s.stats());
            prop_assert_eq!(all.sent, acked_set.len() as u64);
            prop_assert_eq!(
                all.sent + all.rejected + all.dropped_overflow - refused + all.dropped_consent + lost_held,
                accepted
            );
        }
    }
}
