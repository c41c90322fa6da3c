//! adclick for Kotlin (Android, JVM), Swift (iOS, macOS) and Python: a [`Tracker`]
//! exported with UniFFI (proc macros, no UDL). Bindings are generated from the built
//! library by this crate's `uniffi-bindgen` binary (`scripts/gen-bindings.sh`).
//!
//! The tracker is the native SDK's (`adclick_sdk::Tracker`): a thin tokio driver of the
//! core's sans-IO sender, which owns batching, retries with backoff, the flush timer, the
//! offline queue, consent and the stats. This crate adds only what a foreign caller needs:
//! a tokio runtime of its own (one worker thread), plain records instead of builders, and
//! a callback instead of a future so that nothing blocks the caller's thread (UniFFI async
//! would need kotlinx-coroutines in every Kotlin app; a callback needs nothing).
//!
//! - `track_click` validates and queues (and, with a `queue_dir`, appends to the file
//!   queue) and returns: it never waits for the network.
//! - `flush(callback)` returns at once; the callback runs on the SDK's thread when the
//!   queue is empty or a batch ran out of attempts.
//! - Consent: see [`Tracker::set_consent`].

use std::sync::Arc;
use std::time::Duration;

use adclick_sdk::{ClickError, Consent, SdkError};

uniffi::setup_scaffolding!();

/// How a [`Tracker`] sends and stores clicks. Every field but `endpoint` has a default.
#[derive(Debug, Clone, uniffi::Record)]
pub struct TrackerConfig {
    /// Collector base URL; clicks go to `{endpoint}/v1/clicks`.
    pub endpoint: String,
    /// A directory of the app's own (Android: `context.filesDir`, iOS: Application
    /// Support) where unsent clicks are kept so they survive the app being killed; `None`
    /// keeps them in memory only. One tracker per directory (it is locked).
    #[uniffi(default = None)]
    pub queue_dir: Option<String>,
    /// Clicks per batch; a full batch is sent at once.
    #[uniffi(default = 100)]
    pub batch_size: u32,
    /// Longest time (ms) a click waits before being sent.
    #[uniffi(default = 2000)]
    pub flush_interval_ms: u64,
    /// Most clicks held unsent; the oldest is dropped (and counted) beyond.
    #[uniffi(default = 10000)]
    pub max_queue: u32,
    /// Send attempts per batch per flush (backoff 250 ms doubling to 30 s, full jitter,
    /// `Retry-After` as a floor).
    #[uniffi(default = 6)]
    pub max_attempts: u32,
    /// Per-request timeout (ms); a timeout is retried.
    #[uniffi(default = 10000)]
    pub request_timeout_ms: u64,
    /// Consent at start: `true` stores and sends; `false` means "not answered yet" (clicks
    /// wait in memory only, nothing is written or sent until `set_consent(true)`).
    #[uniffi(default = true)]
    pub consent: bool,
}

/// Device class of the clicking device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Device {
    /// Desktop or laptop.
    Desktop,
    /// Phone.
    Mobile,
    /// Tablet.
    Tablet,
    /// Anything else.
    Other,
}

/// Optional dimensions of a click; unset means unknown.
#[derive(Debug, Clone, Default, uniffi::Record)]
pub struct ClickDimensions {
    /// ISO-3166 alpha-2 country code ("US").
    #[uniffi(default = None)]
    pub country: Option<String>,
    /// Device class.
    #[uniffi(default = None)]
    pub device: Option<Device>,
    /// Operating system ("ios", "android").
    #[uniffi(default = None)]
    pub os: Option<String>,
    /// Publisher site (host name).
    #[uniffi(default = None)]
    pub site: Option<String>,
    /// Publisher app id (bundle / package id).
    #[uniffi(default = None)]
    pub app: Option<String>,
    /// Opaque user id, for unique-user counts.
    #[uniffi(default = None)]
    pub user_id: Option<String>,
}

/// Counters of one tracker since it was created.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct TrackerStats {
    /// Clicks accepted into the queue.
    pub queued: u64,
    /// Clicks the collector acknowledged.
    pub sent: u64,
    /// Clicks the collector refused for good.
    pub rejected: u64,
    /// Clicks lost to the queue bound.
    pub dropped_overflow: u64,
    /// Clicks discarded because consent was refused or withdrawn.
    pub dropped_consent: u64,
    /// Clicks refused by validation.
    pub invalid: u64,
    /// Send attempts retried.
    pub retries: u64,
    /// Batches whose attempts ran out (their clicks stay queued).
    pub gave_up: u64,
    /// Offline-queue write failures.
    pub persist_errors: u64,
    /// Clicks reloaded from the offline queue at start.
    pub restored: u64,
    /// Batches delivered.
    pub batches: u64,
    /// Clicks not delivered yet (queued, including a batch being sent).
    pub pending: u64,
    /// Clicks held in memory until consent is given.
    pub held: u64,
}

/// What a flush ended with.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct FlushResult {
    /// True when everything queued was delivered (or refused for good).
    pub delivered: bool,
    /// Clicks still unsent (they stay queued, and stored with a `queue_dir`).
    pub unsent: u64,
    /// Why not everything was delivered.
    pub message: Option<String>,
}

/// Called once when a flush finishes (on the SDK's own thread: hop to your UI thread
/// yourself).
#[uniffi::export(with_foreign)]
pub trait FlushCallback: Send + Sync {
    /// The flush finished.
    fn on_complete(&self, result: FlushResult);
}

/// Why a call was refused. Nothing was queued. (The details field is `reason`, not
/// `message`, which Kotlin exceptions already have.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum TrackerError {
    /// Not a token (empty, too long, not URL-safe base64).
    #[error("invalid token: {reason}")]
    InvalidToken {
        /// Details.
        reason: String,
    },
    /// A dimension is malformed (e.g. a country that is not two letters).
    #[error("{reason}")]
    InvalidDimension {
        /// Details.
        reason: String,
    },
    /// The queue is full and nothing could be evicted.
    #[error("queue full: click dropped")]
    QueueFull,
    /// The tracker was shut down.
    #[error("tracker is shut down")]
    Closed,
    /// The configuration is unusable (bad endpoint, unreadable or locked queue directory).
    #[error("{reason}")]
    Config {
        /// Details.
        reason: String,
    },
}

impl From<ClickError> for TrackerError {
    fn from(e: ClickError) -> Self {
        match e {
            ClickError::InvalidToken => TrackerError::InvalidToken {
                reason: e.to_string(),
            },
            ClickError::InvalidDimension { .. } => TrackerError::InvalidDimension {
                reason: e.to_string(),
            },
            ClickError::QueueFull => TrackerError::QueueFull,
            ClickError::Closed => TrackerError::Closed,
        }
    }
}

/// Batches, retries and stores ad clicks, and sends them to the collector. Thread-safe;
/// create one per app (per `queue_dir`) and keep it.
#[derive(uniffi::Object)]
pub struct Tracker {
    tracker: adclick_sdk::Tracker,
    runtime: Option<tokio::runtime::Runtime>,
    /// Callbacks already called, released on a caller's thread (see [`Graveyard`]).
    done: Graveyard,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("tracker", &self.tracker)
            .finish_non_exhaustive()
    }
}

/// Foreign callbacks that have been called, waiting to be released. Releasing a foreign
/// object calls into the foreign runtime; doing it on the SDK's thread right after
/// `on_complete` races with the app's exit (Python aborts a foreign thread that enters
/// the interpreter while it finalizes: "FATAL: exception not rethrown"). So the SDK's
/// thread only parks them here, and the app's own threads release them: on the next
/// `flush`/`shutdown` call and when the tracker is dropped.
#[derive(Clone, Default)]
struct Graveyard(Arc<std::sync::Mutex<Vec<Arc<dyn FlushCallback>>>>);

impl Graveyard {
    fn park(&self, cb: Arc<dyn FlushCallback>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(cb);
    }
    fn release(&self) {
        let parked = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        drop(parked);
    }
}

#[uniffi::export]
impl Tracker {
    /// Starts a tracker (and its sending thread). Clicks left in `queue_dir` by an earlier
    /// run are sent at once.
    #[uniffi::constructor]
    pub fn new(config: TrackerConfig) -> Result<Arc<Self>, TrackerError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("adclick")
            .enable_all()
            .build()
            .map_err(|e| TrackerError::Config {
                reason: format!("cannot start the SDK's thread: {e}"),
            })?;
        let mut builder = adclick_sdk::Tracker::builder(config.endpoint)
            .batch_size(config.batch_size as usize)
            .flush_interval(Duration::from_millis(config.flush_interval_ms))
            .max_queue(config.max_queue as usize)
            .retry_policy(adclick_sdk::RetryPolicy {
                max_attempts: config.max_attempts.max(1),
                ..adclick_sdk::RetryPolicy::default()
            })
            .request_timeout(Duration::from_millis(config.request_timeout_ms))
            .consent(if config.consent {
                Consent::Granted
            } else {
                Consent::Pending
            });
        if let Some(dir) = config.queue_dir {
            builder = builder.offline_queue_dir(dir);
        }
        let tracker = {
            let _entered = runtime.enter();
            builder.build().map_err(|e| TrackerError::Config {
                reason: e.to_string(),
            })?
        };
        Ok(Arc::new(Tracker {
            tracker,
            runtime: Some(runtime),
            done: Graveyard::default(),
        }))
    }

    /// Records a click on the ad whose impression token is `token`, stamped with the
    /// device clock now. Returns at once (never waits for the network).
    pub fn track_click(&self, token: String, dims: ClickDimensions) -> Result<(), TrackerError> {
        let mut d = adclick_sdk::Dimensions::new();
        d.country = dims.country;
        d.device = dims.device.map(|v| match v {
            Device::Desktop => adclick_sdk::Device::Desktop,
            Device::Mobile => adclick_sdk::Device::Mobile,
            Device::Tablet => adclick_sdk::Device::Tablet,
            Device::Other => adclick_sdk::Device::Other,
        });
        d.os = dims.os;
        d.site = dims.site;
        d.app = dims.app;
        d.user_id = dims.user_id;
        Ok(self.tracker.click(&token, d)?)
    }

    /// Sends everything queued now; returns at once and calls `callback` when done
    /// (everything delivered, or a batch ran out of attempts: its clicks stay queued).
    pub fn flush(&self, callback: Arc<dyn FlushCallback>) {
        self.done.release();
        let tracker = self.tracker.clone();
        let done = self.done.clone();
        self.spawn(async move {
            let r = tracker.flush().await;
            callback.on_complete(flush_result(r, &tracker));
            done.park(callback);
        });
    }

    /// Gives (`true`) or withdraws (`false`) consent to store and send clicks.
    ///
    /// - `true`: clicks held in memory while consent was not given are queued (and
    ///   stored) and sent.
    /// - `false`: every unsent click is discarded, in memory and in `queue_dir`
    ///   (`stats().dropped_consent`), a send in progress is forgotten, and later clicks
    ///   are discarded until consent is given again.
    ///
    /// A tracker created with `consent = false` is in "not answered yet": new clicks wait
    /// in memory only (at most `max_queue`) and nothing is written or sent; clicks stored
    /// by an earlier run with consent stay stored, unsent, until consent is given or
    /// withdrawn.
    pub fn set_consent(&self, granted: bool) {
        self.tracker.set_consent(if granted {
            Consent::Granted
        } else {
            Consent::Denied
        });
    }

    /// `"granted"`, `"pending"` (not answered yet) or `"denied"`.
    pub fn consent(&self) -> String {
        match self.tracker.consent() {
            Consent::Granted => "granted",
            Consent::Pending => "pending",
            Consent::Denied => "denied",
        }
        .to_string()
    }

    /// Counters since this tracker was created.
    pub fn stats(&self) -> TrackerStats {
        let s = self.tracker.stats();
        TrackerStats {
            queued: s.queued,
            sent: s.sent,
            rejected: s.rejected,
            dropped_overflow: s.dropped_overflow,
            dropped_consent: s.dropped_consent,
            invalid: s.invalid,
            retries: s.retries,
            gave_up: s.gave_up,
            persist_errors: s.persist_errors,
            restored: s.restored,
            batches: s.batches,
            pending: self.tracker.queued() as u64,
            held: self.tracker.held() as u64,
        }
    }

    /// Stops accepting clicks and sends what is queued (at most `timeout_ms`); returns at
    /// once and calls `callback` when done. What is left stays in `queue_dir`, if any.
    pub fn shutdown(&self, timeout_ms: u64, callback: Arc<dyn FlushCallback>) {
        self.done.release();
        let tracker = self.tracker.clone();
        let done = self.done.clone();
        self.spawn(async move {
            let r =
                match tokio::time::timeout(Duration::from_millis(timeout_ms), tracker.shutdown())
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(SdkError::Undelivered {
                        queued: tracker.queued(),
                        reason: format!("shutdown timeout of {timeout_ms} ms reached"),
                    }),
                };
            callback.on_complete(flush_result(r, &tracker));
            done.park(callback);
        });
    }

    /// Stops accepting clicks, sends what is queued (at most `timeout_ms`) and waits for
    /// it: the one blocking call, for the end of a script or a server's shutdown (never on
    /// a UI thread). When it returns, no callback of this tracker is running. Python:
    /// call it before the interpreter exits (a callback still running while Python
    /// finalizes aborts the process). What is left stays in `queue_dir`, if any.
    pub fn close(&self, timeout_ms: u64) -> FlushResult {
        self.done.release();
        let (tx, rx) = std::sync::mpsc::channel();
        let tracker = self.tracker.clone();
        self.spawn(async move {
            let r =
                match tokio::time::timeout(Duration::from_millis(timeout_ms), tracker.shutdown())
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(SdkError::Undelivered {
                        queued: tracker.queued(),
                        reason: format!("close timeout of {timeout_ms} ms reached"),
                    }),
                };
            let _ = tx.send(flush_result(r, &tracker));
        });
        // The task runs on the SDK's only thread, after any callback already started.
        let result = rx
            .recv_timeout(Duration::from_millis(timeout_ms.saturating_add(2_000)))
            .unwrap_or_else(|_| FlushResult {
                delivered: false,
                unsent: self.tracker.queued() as u64,
                message: Some(format!("close timeout of {timeout_ms} ms reached")),
            });
        self.done.release();
        result
    }
}

impl Tracker {
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.runtime {
            rt.spawn(f);
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Never block the thread that drops the last reference (it may be a UI thread or
        // a garbage collector's): the SDK's thread winds down by itself.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        self.done.release();
    }
}

fn flush_result(r: Result<(), SdkError>, tracker: &adclick_sdk::Tracker) -> FlushResult {
    match r {
        Ok(()) => FlushResult {
            delivered: true,
            unsent: tracker.queued() as u64,
            message: None,
        },
        Err(e) => FlushResult {
            delivered: false,
            unsent: tracker.queued() as u64,
            message: Some(e.to_string()),
        },
    }
}

/// The SDK's version.
#[uniffi::export]
pub fn sdk_version() -> String {
    adclick_sdk::SDK_VERSION.to_string()
}
