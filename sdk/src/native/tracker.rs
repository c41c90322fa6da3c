//! The native `Tracker`: a cheap-to-clone handle over an [`Outbox`], a background tokio
//! task that sends when a batch fills or the flush interval passes, and explicit
//! `flush()` / `shutdown()`.
//!
//! One sender at a time (`send_lock`); `click()` never waits for the network. Retry policy
//! and batching come from `crate::core`; this file only schedules them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::file_queue::FileQueue;
use super::http::{HttpTransport, Transport};
use super::{SdkError, SystemClock};
use crate::core::{
    BatchConfig, ClickError, Clock, Completion, Dimensions, Disposition, OfflineQueue, Outbox,
    OverflowPolicy, PushOutcome, RetryPolicy, Stats, StatsSnapshot, TrackerEvent, build_click,
    classify, encode_batch, parse_retry_after,
};
use crate::{SDK_NAME, SDK_VERSION};

type Hook = Arc<dyn Fn(&TrackerEvent) + Send + Sync>;
type Store = Box<dyn OfflineQueue + Send>;

/// Batches, retries and (optionally) persists clicks. Clone it freely: clones share one
/// queue. Create it with [`Tracker::builder`] inside a tokio runtime.
///
/// ```no_run
/// # async fn demo() -> Result<(), adclick_sdk::SdkError> {
/// use adclick_sdk::{Dimensions, Device, Tracker};
/// let tracker = Tracker::builder("http://127.0.0.1:8080").batch_size(50).build()?;
/// tracker.click("TOKEN-FROM-THE-AD-SERVER", Dimensions::new().country("US").device(Device::Mobile))?;
/// tracker.shutdown().await?; // drains what is queued
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Tracker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner {
    outbox: Mutex<Outbox<Store>>,
    send_lock: tokio::sync::Mutex<()>,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    retry: RetryPolicy,
    stats: Arc<Stats>,
    hook: Option<Hook>,
    wake: Arc<Notify>,
    closed: AtomicBool,
    shutdown_timeout: Duration,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Configures a [`Tracker`].
pub struct TrackerBuilder {
    endpoint: String,
    batch: BatchConfig,
    flush_interval: Duration,
    retry: RetryPolicy,
    request_timeout: Duration,
    shutdown_timeout: Duration,
    clock: Arc<dyn Clock>,
    queue_dir: Option<std::path::PathBuf>,
    queue_fsync: bool,
    queue: Option<Store>,
    transport: Option<Arc<dyn Transport>>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for TrackerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackerBuilder")
            .field("endpoint", &self.endpoint)
            .field("batch", &self.batch)
            .field("flush_interval", &self.flush_interval)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl TrackerBuilder {
    /// Clicks per batch (default 100). A full batch is sent at once.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch.batch_size = n;
        self
    }
    /// Longest time a click waits before being sent (default 2 s).
    pub fn flush_interval(mut self, d: Duration) -> Self {
        self.flush_interval = d;
        self
    }
    /// Most clicks held unsent (default 10 000).
    pub fn max_queue(mut self, n: usize) -> Self {
        self.batch.max_queue = n;
        self
    }
    /// What to drop when the queue is full (default: the oldest unsent click).
    pub fn overflow(mut self, p: OverflowPolicy) -> Self {
        self.batch.overflow = p;
        self
    }
    /// Backoff and attempt limits (default: 250 ms base, 30 s cap, 6 attempts).
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.retry = p;
        self
    }
    /// Per-request timeout (default 10 s); a timeout is retried.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    /// Longest `shutdown()` spends draining (default 10 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }
    /// The device clock used for `occurred_at`/`sent_at` (default: system clock).
    pub fn clock(mut self, c: Arc<dyn Clock>) -> Self {
        self.clock = c;
        self
    }
    /// Persist unsent clicks in this directory (a [`FileQueue`]) so they survive restarts.
    pub fn offline_queue_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.queue_dir = Some(dir.into());
        self
    }
    /// With `offline_queue_dir`: fsync every write (survives power loss; slower).
    pub fn offline_queue_fsync(mut self, on: bool) -> Self {
        self.queue_fsync = on;
        self
    }
    /// A custom offline queue (instead of `offline_queue_dir`).
    pub fn offline_queue(mut self, q: Box<dyn OfflineQueue + Send>) -> Self {
        self.queue = Some(q);
        self
    }
    /// A custom transport (e.g. QUIC) instead of HTTP to the endpoint.
    pub fn transport(mut self, t: Arc<dyn Transport>) -> Self {
        self.transport = Some(t);
        self
    }
    /// Called (outside any lock) for rejections, drops, retries and persistence errors.
    pub fn on_event(mut self, f: impl Fn(&TrackerEvent) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(f));
        self
    }

    /// Builds the tracker and starts its background sender. Must run inside a tokio
    /// runtime. Clicks left in the offline queue by an earlier run are sent first.
    pub fn build(self) -> Result<Tracker, SdkError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| SdkError::NoRuntime)?;
        let transport: Arc<dyn Transport> = match self.transport {
            Some(t) => t,
            None => Arc::new(HttpTransport::new(&self.endpoint, self.request_timeout)?),
        };
        let store: Store = match (self.queue, self.queue_dir) {
            (Some(q), _) => q,
            (None, Some(dir)) => Box::new(FileQueue::open(dir)?.with_fsync(self.queue_fsync)),
            (None, None) => Box::new(crate::core::MemoryQueue),
        };
        let stats = Arc::new(Stats::default());
        let (outbox, load_err) = Outbox::open(self.batch, store, stats.clone());
        let restored = !outbox.is_empty();
        let inner = Arc::new(Inner {
            outbox: Mutex::new(outbox),
            send_lock: tokio::sync::Mutex::new(()),
            transport,
            clock: self.clock,
            retry: RetryPolicy {
                max_attempts: self.retry.max_attempts.max(1),
                ..self.retry
            },
            stats,
            hook: self.hook,
            wake: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            shutdown_timeout: self.shutdown_timeout,
            task: Mutex::new(None),
        });
        if let Some(e) = load_err {
            inner.emit(TrackerEvent::PersistError {
                message: e.to_string(),
            });
        }
        let interval = self.flush_interval.max(Duration::from_millis(1));
        let wake = inner.wake.clone();
        let task = handle.spawn(background(Arc::downgrade(&inner), wake, interval, restored));
        *lock(&inner.task) = Some(task);
        Ok(Tracker { inner })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a hook must not wedge the tracker: the guarded data stays consistent
    // because no method panics midway through an update.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tracker {
    /// A builder posting to `{endpoint}/v1/clicks`.
    pub fn builder(endpoint: impl Into<String>) -> TrackerBuilder {
        TrackerBuilder {
            endpoint: endpoint.into(),
            batch: BatchConfig::default(),
            flush_interval: Duration::from_secs(2),
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
            queue_dir: None,
            queue_fsync: false,
            queue: None,
            transport: None,
            hook: None,
        }
    }

    /// Records a click on the ad whose impression token is `token`, stamped with the
    /// device clock now. Never blocks on the network.
    pub fn click(&self, token: &str, dims: Dimensions) -> Result<(), ClickError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(ClickError::Closed);
        }
        let click = build_click(token, dims, inner.clock.now_ms()).inspect_err(|_| {
            Stats::add(&inner.stats.invalid, 1);
        })?;
        let (pushed, ready) = {
            let mut outbox = lock(&inner.outbox);
            let pushed = outbox.push(click);
            (pushed, outbox.batch_ready())
        };
        let result = match pushed {
            Ok((outcome, persist_err)) => {
                if outcome == PushOutcome::QueuedDroppedOldest {
                    inner.emit(TrackerEvent::Dropped { clicks: 1 });
                }
                if let Some(e) = persist_err {
                    inner.emit(TrackerEvent::PersistError {
                        message: e.to_string(),
                    });
                }
                Ok(())
            }
            Err(e) => {
                inner.emit(TrackerEvent::Dropped { clicks: 1 });
                Err(e)
            }
        };
        if ready {
            inner.wake.notify_one();
        }
        result
    }

    /// Sends everything queued now. Returns once the queue is empty, or with
    /// [`SdkError::Undelivered`] when a batch ran out of attempts (its clicks stay queued).
    pub async fn flush(&self) -> Result<(), SdkError> {
        self.inner.send(false).await
    }

    /// Stops accepting clicks, stops the background sender and drains the queue (bounded
    /// by the shutdown timeout). Whatever is left stays in the offline queue, if any.
    pub async fn shutdown(&self) -> Result<(), SdkError> {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        let task = lock(&inner.task).take();
        if let Some(task) = task {
            // Cancelling mid-send is safe: the outbox forgets clicks only after a
            // completed send, and `flush` below resets the abandoned batch.
            task.abort();
            let _ = task.await;
        }
        match tokio::time::timeout(inner.shutdown_timeout, inner.send(false)).await {
            Ok(r) => r,
            Err(_) => Err(SdkError::Undelivered {
                queued: self.queued(),
                reason: format!("shutdown timeout of {:?} reached", inner.shutdown_timeout),
            }),
        }
    }

    /// Counters since this tracker was built.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Clicks not yet delivered.
    pub fn queued(&self) -> usize {
        lock(&self.inner.outbox).len()
    }
}

impl Inner {
    fn emit(&self, event: TrackerEvent) {
        if let Some(hook) = &self.hook {
            hook(&event);
        }
    }

    /// Sends queued batches: only full ones when `full_only` (a size-triggered wake-up),
    /// else everything.
    async fn send(&self, full_only: bool) -> Result<(), SdkError> {
        let _sender = self.send_lock.lock().await;
        // A sender cancelled mid-send (shutdown abort, timeout) left its batch marked in
        // flight; we hold the send lock, so nothing else is sending it.
        lock(&self.outbox).abandon_in_flight();
        loop {
            let batch = {
                let mut outbox = lock(&self.outbox);
                if full_only && !outbox.batch_ready() {
                    return Ok(());
                }
                outbox.take_batch()
            };
            let Some(batch) = batch else {
                return Ok(());
            };
            let n = batch.clicks.len();
            let mut attempt = 0;
            loop {
                attempt += 1;
                // Re-stamped per attempt: sent_at must be the actual send time.
                let body = encode_batch(&batch.clicks, self.clock.now_ms(), SDK_NAME, SDK_VERSION);
                let (disposition, retry_after, reason) = match self.transport.send(body).await {
                    Ok(resp) => {
                        let disposition = classify(resp.status);
                        if disposition == Disposition::Reject {
                            self.finish(batch, Completion::Rejected);
                            self.emit(TrackerEvent::Rejected {
                                status: resp.status,
                                clicks: n,
                                message: resp.body,
                            });
                            break;
                        }
                        let ra = resp
                            .retry_after
                            .as_deref()
                            .and_then(|v| parse_retry_after(v, self.clock.now_ms()));
                        (disposition, ra, format!("HTTP {}", resp.status))
                    }
                    Err(e) => (Disposition::Retry, None, e.0),
                };
                if disposition == Disposition::Delivered {
                    self.finish(batch, Completion::Delivered);
                    break;
                }
                if attempt >= self.retry.max_attempts {
                    self.finish(batch, Completion::Retry);
                    Stats::add(&self.stats.gave_up, 1);
                    self.emit(TrackerEvent::GaveUp {
                        clicks: n,
                        reason: reason.clone(),
                    });
                    return Err(SdkError::Undelivered {
                        queued: lock(&self.outbox).len(),
                        reason,
                    });
                }
                Stats::add(&self.stats.retries, 1);
                let delay = self.retry.delay(attempt, retry_after, fastrand::f64());
                tracing::debug!(attempt, ?delay, %reason, "adclick: send failed, retrying");
                self.emit(TrackerEvent::Retrying {
                    attempt,
                    delay,
                    reason,
                });
                tokio::time::sleep(delay).await;
            }
        }
    }

    fn finish(&self, batch: crate::core::InFlight, how: Completion) {
        let err = lock(&self.outbox).finish(batch, how);
        if let Some(e) = err {
            self.emit(TrackerEvent::PersistError {
                message: e.to_string(),
            });
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the background task notice that the tracker is gone.
        self.wake.notify_one();
    }
}

/// Sends full batches when woken and everything every `interval`; exits when the tracker
/// is dropped or shut down. Holds only a weak reference while idle, so dropping the last
/// `Tracker` releases the queue (and its file lock) at once.
async fn background(weak: Weak<Inner>, wake: Arc<Notify>, interval: Duration, restored: bool) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if !restored {
        // The first tick fires at once: use it only to send clicks restored from disk.
        tick.tick().await;
    }
    loop {
        let full_only = tokio::select! {
            _ = tick.tick() => false,
            _ = wake.notified() => true,
        };
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        // Failures are counted and reported through the hook; the next tick retries.
        let _ = inner.send(full_only).await;
    }
}
