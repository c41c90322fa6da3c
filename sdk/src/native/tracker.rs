//! The native `Tracker`: a thin tokio driver of the sans-IO [`Sender`]. A cheap-to-clone
//! handle; a background task that does what the sender asks (post this batch, sleep
//! until then); explicit `flush()` / `shutdown()`.
//!
//! Batching, retries, backoff, the flush timer and the stats are the sender's
//! (`crate::core`); this file only supplies the clock, the timer, the transport and the
//! event hook. `click()` never waits for the network.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::file_queue::FileQueue;
use super::http::{HttpTransport, Transport};
use super::{SdkError, SystemClock};
use crate::core::{
    BatchConfig, ClickError, Clock, Consent, Dimensions, FlushError, Now, OfflineQueue, Output,
    OverflowPolicy, Reply, RetryPolicy, Sender, SenderConfig, StatsSnapshot, TrackerEvent,
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
    sender: Mutex<Sender<Store>>,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    /// Origin of the sender's monotonic clock.
    start: tokio::time::Instant,
    hook: Option<Hook>,
    wake: Arc<Notify>,
    /// (highest finished flush ticket, its result).
    flushed: watch::Sender<(u64, Result<(), FlushError>)>,
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
    consent: Consent,
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
    /// Consent at start (default [`Consent::Granted`]); see [`Consent`] and
    /// [`Tracker::set_consent`].
    pub fn consent(mut self, c: Consent) -> Self {
        self.consent = c;
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
        let start = tokio::time::Instant::now();
        let cfg = SenderConfig {
            batch: self.batch,
            retry: self.retry,
            flush_interval: self.flush_interval,
            sdk_name: SDK_NAME.to_string(),
            sdk_version: SDK_VERSION.to_string(),
            seed: fastrand::u64(..),
            consent: self.consent,
        };
        let sender = Sender::new(cfg, store, 0);
        let inner = Arc::new(Inner {
            sender: Mutex::new(sender),
            transport,
            clock: self.clock,
            start,
            hook: self.hook,
            wake: Arc::new(Notify::new()),
            flushed: watch::channel((0, Ok(()))).0,
            closed: AtomicBool::new(false),
            shutdown_timeout: self.shutdown_timeout,
            task: Mutex::new(None),
        });
        // Reports what opening the queue found (before the task can send anything).
        let outputs = inner.with_sender(|_| ());
        inner.dispatch(outputs.1);
        let wake = inner.wake.clone();
        let task = handle.spawn(background(Arc::downgrade(&inner), wake));
        *lock(&inner.task) = Some(task);
        Ok(Tracker { inner })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a hook must not wedge the tracker: hooks run outside the lock, and no
    // sender method panics midway through an update.
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
            consent: Consent::Granted,
        }
    }

    /// Records a click on the ad whose impression token is `token`, stamped with the
    /// device clock now. Never blocks on the network.
    pub fn click(&self, token: &str, dims: Dimensions) -> Result<(), ClickError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(ClickError::Closed);
        }
        let now = inner.now();
        let (result, outputs) = inner.with_sender(|s| {
            let r = s.click(token, dims, now);
            (r, s.wants_send())
        });
        inner.dispatch(outputs);
        let (result, wake) = result;
        if wake {
            inner.wake.notify_one();
        }
        result
    }

    /// Sends everything queued now. Returns once the queue is empty, or with
    /// [`SdkError::Undelivered`] when a batch ran out of attempts (its clicks stay queued).
    pub async fn flush(&self) -> Result<(), SdkError> {
        self.inner.flush().await
    }

    /// Stops accepting clicks, drains the queue (bounded by the shutdown timeout), then
    /// stops the background sender. Whatever is left stays in the offline queue, if any.
    pub async fn shutdown(&self) -> Result<(), SdkError> {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        let result = match tokio::time::timeout(inner.shutdown_timeout, inner.flush()).await {
            Ok(r) => r,
            Err(_) => Err(SdkError::Undelivered {
                queued: self.queued(),
                reason: format!("shutdown timeout of {:?} reached", inner.shutdown_timeout),
            }),
        };
        let task = lock(&inner.task).take();
        if let Some(task) = task {
            // Cancelling mid-send is safe: the sender forgets clicks only on an answer.
            task.abort();
            let _ = task.await;
            lock(&inner.sender).cancel_send();
        }
        result
    }

    /// Counters since this tracker was built.
    pub fn stats(&self) -> StatsSnapshot {
        lock(&self.inner.sender).stats()
    }

    /// Clicks not yet delivered (queued, including a batch being sent; not those held
    /// for consent).
    pub fn queued(&self) -> usize {
        lock(&self.inner.sender).queued()
    }

    /// Clicks held in memory until consent is given.
    pub fn held(&self) -> usize {
        lock(&self.inner.sender).held()
    }

    /// Gives or withdraws consent (see [`Consent`]): `Denied` discards every unsent click,
    /// in memory and in the offline queue, and later clicks until consent is given;
    /// `Pending` stops sending and holds new clicks in memory only; `Granted` queues the
    /// held clicks and sends.
    pub fn set_consent(&self, consent: Consent) {
        let ((), outputs) = self.inner.with_sender(|s| s.set_consent(consent));
        self.inner.dispatch(outputs);
        self.inner.wake.notify_one();
    }

    /// The consent state.
    pub fn consent(&self) -> Consent {
        lock(&self.inner.sender).consent()
    }
}

impl Inner {
    fn now(&self) -> Now {
        Now {
            mono_ms: u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
            wall_ms: self.clock.now_ms(),
        }
    }

    /// Runs `f` on the sender and collects what it output meanwhile (to dispatch outside
    /// the lock).
    fn with_sender<R>(&self, f: impl FnOnce(&mut Sender<Store>) -> R) -> (R, Vec<Output>) {
        let mut s = lock(&self.sender);
        let r = f(&mut s);
        let outputs = std::iter::from_fn(|| s.poll_output()).collect();
        (r, outputs)
    }

    /// Reports outputs: events to the hook, finished flushes to their waiters.
    fn dispatch(&self, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Event(e) => {
                    if let TrackerEvent::Retrying {
                        attempt,
                        delay,
                        reason,
                    } = &e
                    {
                        tracing::debug!(attempt, ?delay, %reason, "adclick: send failed, retrying");
                    }
                    if let Some(hook) = &self.hook {
                        hook(&e);
                    }
                }
                Output::Flushed { through, result } => {
                    let _previous = self.flushed.send_replace((through, result));
                }
                Output::Accepted { .. } | Output::DroppedConsent { .. } => {}
            }
        }
    }

    async fn flush(&self) -> Result<(), SdkError> {
        let (ticket, outputs) = self.with_sender(|s| s.flush());
        self.dispatch(outputs);
        let alive = lock(&self.task).as_ref().is_some_and(|t| !t.is_finished());
        if !alive {
            // Shut down: nothing sends any more.
            let queued = lock(&self.sender).queued();
            return match queued {
                0 => Ok(()),
                _ => Err(SdkError::Undelivered {
                    queued,
                    reason: "the tracker is shut down".into(),
                }),
            };
        }
        self.wake.notify_one();
        let mut rx = self.flushed.subscribe();
        let done = rx.wait_for(|(through, _)| *through >= ticket).await;
        let result = match done {
            Ok(v) => v.1.clone(),
            Err(_) => Ok(()),
        };
        result.map_err(|e| match e {
            FlushError::Undelivered { queued, reason } => SdkError::Undelivered { queued, reason },
            FlushError::NoConsent { held } => SdkError::Undelivered {
                queued: held,
                reason: "no consent".into(),
            },
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the background task notice that the tracker is gone.
        self.wake.notify_one();
    }
}

/// The driver loop: does what the sender asks (send a batch and report the answer; sleep
/// until its timer or a wake-up). Holds only a weak reference while idle, so dropping the
/// last `Tracker` releases the queue (and its file lock) at once.
async fn background(weak: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let now = inner.now();
        let ((transmit, deadline), outputs) = inner.with_sender(|s| {
            s.handle_timeout(now);
            (s.poll_transmit(now), s.poll_timeout())
        });
        inner.dispatch(outputs);
        if let Some(t) = transmit {
            let reply = match inner.transport.send(t.body).await {
                Ok(r) => Reply::Status {
                    status: r.status,
                    retry_after: r.retry_after,
                    body: r.body,
                },
                Err(e) => Reply::Failed(e.0),
            };
            let now = inner.now();
            let ((), outputs) = inner.with_sender(|s| s.on_reply(t.id, reply, now));
            inner.dispatch(outputs);
            continue;
        }
        let at = inner
            .start
            .checked_add(Duration::from_millis(deadline))
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400));
        drop(inner);
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = wake.notified() => {}
        }
    }
}
