//! The browser `Tracker`: drives the core [`Outbox`] with `fetch`, JS timers and page
//! lifecycle events, mirroring the native tokio tracker (`sdk/src/native/tracker.rs`).
//!
//! - `click()` validates (core `build_click`), queues (core `Outbox::push`, journalled to
//!   `localStorage` by [`BrowserQueue`]) and starts a send when a batch is full. It never
//!   waits for the network.
//! - One sender at a time (`busy`): a timer tick every `flushIntervalMs` sends everything,
//!   a full batch sends full batches, `flush()` waits for a running sender and then sends
//!   everything. Each batch goes by `fetch` with the core's retry schedule (`classify`,
//!   full-jitter backoff, `Retry-After` floor); sleeps are `setTimeout` promises.
//! - On `visibilitychange` to hidden and on `pagehide` the unsent clicks are handed to
//!   `navigator.sendBeacon` (falling back to `fetch` with `keepalive`): typed
//!   `application/x-protobuf` to the page's own origin, `text/plain` (same bytes, no CORS
//!   preflight) cross-origin; see `Inner::beacon_protobuf_ok`. A beacon is a
//!   *copy*: its outcome is unknowable, so the clicks stay queued (in memory and in
//!   `localStorage`) until a `fetch` sees a 2xx; a page that dies after the beacon resends
//!   them on the next load and the collector's dedup by impression id drops the copy.
//!   Each click is beaconed at most once per page.
//!
//! - Consent (`consent: false` in the options, `setConsent(true|false)`): until consent
//!   is given the tracker touches neither `localStorage` nor the network (no send, no
//!   beacon, no restore of earlier pages' clicks); validated clicks wait in memory only
//!   (at most `maxQueue`, oldest dropped and counted). `setConsent(true)` opens the
//!   stored queue and sends them. `setConsent(false)` stops sending, discards every
//!   unsent click in memory and deletes every stored one of the origin
//!   (`droppedConsent`); later clicks are discarded until consent is given again. A send
//!   in progress when consent is withdrawn is not completed into the new state (`epoch`).
//!
//! Must not re-implement policy (validation, batching, overflow, retry classification):
//! that is `adclick_sdk::core`. Must not call into JavaScript callbacks (`onEvent`) while
//! holding a `RefCell` borrow, so a callback may call back into the tracker.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use adclick_proto::v1;
use adclick_sdk::core::{
    BatchConfig, ClickError, Clock, Completion, Dimensions, Disposition, InFlight, Outbox,
    OverflowPolicy, PushOutcome, QueueError, RetryPolicy, Stats, TrackerEvent, build_click,
    classify, encode_batch, parse_retry_after,
};
use js_sys::{Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};

use crate::js::{self, BeaconResult, JsClock};
use crate::options::{self, Options};
use crate::queue::{BrowserQueue, KeyValue, LocalStorage};

/// `ClickBatch.sdk_name` of the browser SDK.
pub const SDK_NAME: &str = "adclick-wasm";
/// `ClickBatch.sdk_version` of the browser SDK.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Largest body sent with `keepalive` / by beacon: browsers allow 64 KiB in flight per
/// page for both together.
pub const KEEPALIVE_MAX_BYTES: usize = 60_000;

/// Counters that the core's `Stats` has but only `adclick-sdk` itself can bump
/// (`Stats::add` is crate-private), plus the beacon count: kept here and merged into
/// `stats()`.
#[derive(Debug, Default)]
struct LocalCounts {
    invalid: Cell<u64>,
    retries: Cell<u64>,
    gave_up: Cell<u64>,
    beaconed: Cell<u64>,
    /// Clicks discarded because consent was refused or withdrawn.
    dropped_consent: Cell<u64>,
    /// Clicks dropped from the pre-consent memory hold (more than `maxQueue`).
    held_overflow: Cell<u64>,
}

/// The consent state (`tracker.consent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consent {
    /// Not given yet: clicks wait in memory only.
    Pending,
    /// Given: store and send.
    Granted,
    /// Refused or withdrawn: clicks are discarded.
    Denied,
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().saturating_add(n));
}

/// An event listener this tracker installed (removed when the tracker is freed).
struct Listener {
    target: web_sys::EventTarget,
    event: &'static str,
    capture: bool,
    closure: Closure<dyn FnMut(web_sys::Event)>,
}

pub(crate) struct Inner {
    outbox: RefCell<Outbox<BrowserQueue>>,
    /// Replaced (with the outbox) when consent is given or withdrawn.
    queue: RefCell<BrowserQueue>,
    consent: Cell<Consent>,
    /// Validated clicks waiting for consent (memory only, at most `max_queue`).
    held: RefCell<VecDeque<v1::Click>>,
    /// Bumped whenever the outbox is replaced: a send that started before does not
    /// complete its batch into the new outbox.
    epoch: Cell<u64>,
    /// The options, to open the stored queue when consent is given.
    opts: Options,
    stats: Arc<Stats>,
    counts: LocalCounts,
    retry: RetryPolicy,
    ingest_url: String,
    batch_size: usize,
    request_timeout_ms: f64,
    default_site: Option<String>,
    on_event: Option<js_sys::Function>,
    clock: JsClock,
    /// A sender is running; `running` is its promise (resolves to `undefined`, or to the
    /// reason string when a batch ran out of attempts; it never rejects).
    busy: Cell<bool>,
    running: RefCell<Option<Promise>>,
    /// Front clicks covered by a `keepalive` fetch in progress (the browser finishes it
    /// even if the page goes away, so the hide beacon skips them).
    keepalive_in_flight: Cell<usize>,
    /// Highest queue seq already handed to a beacon.
    beaconed_through: Cell<Option<u64>>,
    /// Beacons carry `application/x-protobuf` only to the page's own origin. Cross-origin,
    /// that type needs a CORS preflight, and a beacon is a credentialed request, so the
    /// collector's `Access-Control-Allow-Origin: *` makes the browser drop it after the
    /// preflight (seen in Chromium 156) while `sendBeacon` has already returned true.
    /// `text/plain` needs no preflight, so cross-origin beacons use it; the collector
    /// reads the same protobuf bytes. Also cleared if a protobuf beacon ever throws.
    beacon_protobuf_ok: Cell<bool>,
    listeners: RefCell<Vec<Listener>>,
    interval: RefCell<Option<Timer>>,
}

/// A `setInterval` id and the closure it calls.
type Timer = (JsValue, Closure<dyn FnMut()>);

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some((id, _closure)) = self.interval.get_mut().take() {
            js::clear_interval(&id);
        }
        for l in self.listeners.get_mut().drain(..) {
            let _ = l.target.remove_event_listener_with_callback_and_bool(
                l.event,
                l.closure.as_ref().unchecked_ref(),
                l.capture,
            );
        }
    }
}

/// Batches, retries and persists ad clicks in a web page: sends by `fetch` (batched,
/// retried with backoff), hands unsent clicks to `navigator.sendBeacon` when the page is
/// hidden or unloaded, and keeps them in `localStorage` until the collector confirmed
/// them, so a reload sends what a closed page could not.
///
/// ```js
/// import init, { Tracker, trackLinks } from "@adclick/sdk";
/// await init();
/// const tracker = new Tracker({ endpoint: "https://collector.example" });
/// tracker.click(token, { country: "US", device: "mobile" });
/// trackLinks(tracker); // <a data-adclick-token="..."> links
/// ```
#[wasm_bindgen]
pub struct Tracker {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("ingest_url", &self.inner.ingest_url)
            .field("queue", &self.inner.queue.borrow())
            .field("consent", &self.inner.consent.get())
            .finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl Tracker {
    /// Creates a tracker posting to `{endpoint}/v1/clicks`. Clicks left unsent by an
    /// earlier page (in `localStorage`) are sent at once. Throws on invalid options.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(unchecked_param_type = "TrackerOptions")] options: JsValue,
    ) -> Result<Tracker, JsError> {
        let opts = options::parse_options(&options).map_err(|e| JsError::new(&e))?;
        Ok(Tracker {
            inner: Inner::start(opts),
        })
    }

    /// Records a click on the ad whose impression token is `token`, stamped with
    /// `Date.now()`. Throws an `Error` (with the reason) when the click is refused;
    /// nothing is queued then.
    pub fn click(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] token: JsValue,
        dims: Option<options::ClickDimensionsArg>,
    ) -> Result<(), JsError> {
        let Some(token) = token.as_string() else {
            bump(&self.inner.counts.invalid, 1);
            return Err(JsError::new("invalid token: must be a string"));
        };
        let dims = options::parse_dims(&options::arg_value(dims))
            .and_then(|d| d.into_dimensions(self.inner.default_site.as_deref()));
        let dims = match dims {
            Ok(d) => d,
            Err(e) => {
                bump(&self.inner.counts.invalid, 1);
                return Err(JsError::new(&e));
            }
        };
        let ready = self
            .inner
            .record(&token, dims)
            .map_err(|e| JsError::new(&e.to_string()))?;
        if ready {
            Inner::start_send(&self.inner, true);
        }
        Ok(())
    }

    /// Sends everything queued now. Resolves when the queue is empty; rejects with an
    /// `Error` when a batch ran out of attempts (its clicks stay queued and persisted).
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn flush(&self) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let outcome = Inner::flush(&inner).await;
            match outcome.as_string() {
                Some(reason) => Err(JsError::new(&reason).into()),
                None => Ok(JsValue::UNDEFINED),
            }
        })
    }

    /// Clicks not yet delivered (including any batch being sent).
    #[wasm_bindgen(getter)]
    pub fn queued(&self) -> u32 {
        u32::try_from(self.inner.unsent()).unwrap_or(u32::MAX)
    }

    /// True when unsent clicks are kept in `localStorage`.
    #[wasm_bindgen(getter)]
    pub fn persistent(&self) -> bool {
        self.inner.queue.borrow().is_persistent()
    }

    /// Gives (`true`) or refuses/withdraws (`false`) consent to store and send clicks.
    /// Giving it opens the `localStorage` queue (with clicks earlier pages left) and sends
    /// the clicks held in memory; refusing it discards every unsent click, in memory and
    /// in `localStorage`, and discards later clicks until consent is given.
    #[wasm_bindgen(js_name = setConsent)]
    pub fn set_consent(&self, granted: bool) {
        Inner::set_consent(&self.inner, granted);
    }

    /// `"granted"`, `"pending"` (no answer yet: clicks held in memory) or `"denied"`.
    #[wasm_bindgen(
        getter,
        unchecked_return_type = "\"granted\" | \"pending\" | \"denied\""
    )]
    pub fn consent(&self) -> String {
        match self.inner.consent.get() {
            Consent::Granted => "granted",
            Consent::Pending => "pending",
            Consent::Denied => "denied",
        }
        .to_string()
    }

    /// Counters since this tracker was created.
    #[wasm_bindgen(unchecked_return_type = "TrackerStats")]
    pub fn stats(&self) -> JsValue {
        let s = self.inner.stats.snapshot();
        let c = &self.inner.counts;
        let obj = Object::new();
        let fields: [(&str, u64); 14] = [
            ("queued", s.queued),
            ("sent", s.sent),
            ("rejected", s.rejected),
            (
                "droppedOverflow",
                s.dropped_overflow + c.held_overflow.get(),
            ),
            ("droppedConsent", c.dropped_consent.get()),
            ("held", self.inner.held.borrow().len() as u64),
            ("invalid", s.invalid + c.invalid.get()),
            ("retries", s.retries + c.retries.get()),
            ("gaveUp", s.gave_up + c.gave_up.get()),
            ("persistErrors", s.persist_errors),
            ("restored", s.restored),
            ("batches", s.batches),
            ("beaconed", c.beaconed.get()),
            ("pending", self.inner.unsent() as u64),
        ];
        for (k, v) in fields {
            set(&obj, k, &JsValue::from_f64(v as f64));
        }
        obj.into()
    }

    /// Hands every unsent click to `navigator.sendBeacon` now (what the tracker does by
    /// itself on `pagehide` and when the page becomes hidden). For single-page apps that
    /// tear down without a page hide.
    #[wasm_bindgen(js_name = sendBeacon)]
    pub fn send_beacon(&self) {
        self.inner.on_hide();
    }
}

impl Tracker {
    pub(crate) fn inner(&self) -> &Rc<Inner> {
        &self.inner
    }
}

fn set(obj: &Object, key: &str, value: &JsValue) {
    let _ = Reflect::set(obj, &JsValue::from_str(key), value);
}

/// `localStorage` when the options keep clicks there and the page has it.
fn storage(opts: &Options) -> Option<Box<dyn KeyValue>> {
    if opts.persist {
        js::local_storage().map(|s| Box::new(LocalStorage(s)) as Box<dyn KeyValue>)
    } else {
        None
    }
}

/// A queue (persistent when `stored`) and the outbox over it, with the load error.
fn open_outbox(
    opts: &Options,
    stored: bool,
    stats: &Arc<Stats>,
) -> (BrowserQueue, Outbox<BrowserQueue>, Option<QueueError>) {
    let queue = BrowserQueue::new(
        if stored { storage(opts) } else { None },
        &opts.storage_key,
        &js::instance_id(),
        opts.max_queue as usize,
    );
    let cfg = BatchConfig {
        batch_size: opts.batch_size as usize,
        max_queue: opts.max_queue as usize,
        overflow: OverflowPolicy::DropOldest,
    };
    let (outbox, load_err) = Outbox::open(cfg, queue.clone(), stats.clone());
    (queue, outbox, load_err)
}

impl Inner {
    fn start(opts: Options) -> Rc<Inner> {
        let stats = Arc::new(Stats::default());
        // Without consent nothing is read from or written to storage: a memory-only
        // outbox until `setConsent(true)` replaces it.
        let (queue, outbox, load_err) = open_outbox(&opts, opts.consent, &stats);
        let restored = !outbox.is_empty();
        let inner = Rc::new(Inner {
            outbox: RefCell::new(outbox),
            queue: RefCell::new(queue),
            consent: Cell::new(if opts.consent {
                Consent::Granted
            } else {
                Consent::Pending
            }),
            held: RefCell::new(VecDeque::new()),
            epoch: Cell::new(0),
            opts: opts.clone(),
            stats,
            counts: LocalCounts::default(),
            retry: RetryPolicy {
                max_attempts: opts.max_attempts.max(1),
                ..RetryPolicy::default()
            },
            ingest_url: opts.ingest_url.clone(),
            batch_size: opts.batch_size as usize,
            request_timeout_ms: f64::from(opts.request_timeout_ms),
            default_site: opts.site.or_else(js::page_hostname),
            on_event: opts.on_event,
            clock: JsClock,
            busy: Cell::new(false),
            running: RefCell::new(None),
            keepalive_in_flight: Cell::new(0),
            beaconed_through: Cell::new(None),
            beacon_protobuf_ok: Cell::new(options::same_origin(
                &opts.ingest_url,
                js::page_origin().as_deref(),
            )),
            listeners: RefCell::new(Vec::new()),
            interval: RefCell::new(None),
        });
        inner.after_open(load_err);
        inner.install_timer(f64::from(opts.flush_interval_ms));
        inner.install_page_hooks();
        if restored {
            Inner::start_send(&inner, false);
        }
        inner
    }

    /// Reports what opening the stored queue found (read errors, clicks over the bound).
    fn after_open(&self, load_err: Option<QueueError>) {
        if let Some(e) = load_err {
            self.emit(&TrackerEvent::PersistError {
                message: e.to_string(),
            });
        }
        let dropped = self.queue.borrow().dropped_at_load();
        if dropped > 0 {
            self.emit(&TrackerEvent::Dropped { clicks: dropped });
        }
    }

    /// Clicks not delivered yet: the outbox's, plus those waiting for consent.
    fn unsent(&self) -> usize {
        self.outbox.borrow().len() + self.held.borrow().len()
    }

    /// See `Tracker::set_consent` and the module doc.
    fn set_consent(inner: &Rc<Inner>, granted: bool) {
        let was = inner.consent.get();
        let now = if granted {
            Consent::Granted
        } else {
            Consent::Denied
        };
        if was == now {
            return;
        }
        inner.consent.set(now);
        inner.epoch.set(inner.epoch.get() + 1);
        inner.keepalive_in_flight.set(0);
        inner.beaconed_through.set(None);
        let (queue, outbox, load_err) = open_outbox(&inner.opts, granted, &inner.stats);
        let discarded = if granted {
            0
        } else {
            inner.outbox.borrow().len() + inner.held.borrow().len()
        };
        *inner.outbox.borrow_mut() = outbox;
        *inner.queue.borrow_mut() = queue;
        if granted {
            inner.after_open(load_err);
            let held: Vec<v1::Click> = inner.held.borrow_mut().drain(..).collect();
            for click in held {
                // Already validated when clicked; a full queue drops (and reports) the oldest.
                let _ = inner.push(click);
            }
            if !inner.outbox.borrow().is_empty() {
                Inner::start_send(inner, false);
            }
            return;
        }
        inner.held.borrow_mut().clear();
        if was == Consent::Granted
            && let Some(mut backend) = storage(&inner.opts)
            && let Err(e) = crate::queue::purge(backend.as_mut(), &inner.opts.storage_key)
        {
            inner.emit(&TrackerEvent::PersistError { message: e });
        }
        if discarded > 0 {
            bump(&inner.counts.dropped_consent, discarded as u64);
            inner.emit_js(
                "dropped",
                &[
                    ("clicks", JsValue::from_f64(discarded as f64)),
                    ("reason", JsValue::from_str("consent")),
                ],
            );
        }
    }

    fn install_timer(self: &Rc<Self>, period_ms: f64) {
        let weak = Rc::downgrade(self);
        let closure = Closure::<dyn FnMut()>::new(move || {
            if let Some(inner) = weak.upgrade() {
                Inner::start_send(&inner, false);
            }
        });
        if let Some(id) = js::set_interval(closure.as_ref().unchecked_ref(), period_ms) {
            *self.interval.borrow_mut() = Some((id, closure));
        }
    }

    /// `visibilitychange` (to hidden) on the document and `pagehide` on the window, when
    /// there is a document (not in workers or Node).
    fn install_page_hooks(self: &Rc<Self>) {
        let Some(document) = js::document() else {
            return;
        };
        let weak = Rc::downgrade(self);
        self.listen(document.into(), "visibilitychange", false, move |_| {
            if js::page_hidden()
                && let Some(inner) = weak.upgrade()
            {
                inner.on_hide();
            }
        });
        let weak = Rc::downgrade(self);
        if let Ok(window) = js::global_property("window")
            .unwrap_or_else(|| js_sys::global().into())
            .dyn_into::<web_sys::EventTarget>()
        {
            self.listen(window, "pagehide", false, move |_| {
                if let Some(inner) = weak.upgrade() {
                    inner.on_hide();
                }
            });
        }
    }

    /// Adds an event listener that lives as long as this tracker.
    pub(crate) fn listen(
        &self,
        target: web_sys::EventTarget,
        event: &'static str,
        capture: bool,
        f: impl FnMut(web_sys::Event) + 'static,
    ) {
        let closure = Closure::<dyn FnMut(web_sys::Event)>::new(f);
        if target
            .add_event_listener_with_callback_and_bool(
                event,
                closure.as_ref().unchecked_ref(),
                capture,
            )
            .is_ok()
        {
            self.listeners.borrow_mut().push(Listener {
                target,
                event,
                capture,
                closure,
            });
        }
    }

    /// The default `site` dimension.
    pub(crate) fn default_site(&self) -> Option<&str> {
        self.default_site.as_deref()
    }

    /// Validates and queues a click (or, without consent, holds or discards it). `Ok(true)`
    /// when a full batch is now waiting.
    pub(crate) fn record(&self, token: &str, dims: Dimensions) -> Result<bool, ClickError> {
        let click = match build_click(token, dims, self.clock.now_ms()) {
            Ok(c) => c,
            Err(e) => {
                bump(&self.counts.invalid, 1);
                return Err(e);
            }
        };
        match self.consent.get() {
            Consent::Granted => self.push(click),
            Consent::Denied => {
                bump(&self.counts.dropped_consent, 1);
                Ok(false)
            }
            Consent::Pending => {
                let over = {
                    let mut held = self.held.borrow_mut();
                    held.push_back(click);
                    held.len() > self.opts.max_queue as usize && held.pop_front().is_some()
                };
                if over {
                    bump(&self.counts.held_overflow, 1);
                    self.emit(&TrackerEvent::Dropped { clicks: 1 });
                }
                Ok(false)
            }
        }
    }

    /// Queues a validated click in the outbox. `Ok(true)` when a full batch is waiting.
    fn push(&self, click: v1::Click) -> Result<bool, ClickError> {
        let (pushed, ready) = {
            let mut outbox = self.outbox.borrow_mut();
            let pushed = outbox.push(click);
            (pushed, outbox.batch_ready())
        };
        match pushed {
            Ok((outcome, persist_err)) => {
                if outcome == PushOutcome::QueuedDroppedOldest {
                    self.emit(&TrackerEvent::Dropped { clicks: 1 });
                }
                if let Some(e) = persist_err {
                    self.emit(&TrackerEvent::PersistError {
                        message: e.to_string(),
                    });
                }
                Ok(ready)
            }
            Err(e) => {
                self.emit(&TrackerEvent::Dropped { clicks: 1 });
                Err(e)
            }
        }
    }

    /// Starts a sender unless one is running (it will see the new clicks). Returns the
    /// sender's promise when one was started.
    pub(crate) fn start_send(inner: &Rc<Inner>, full_only: bool) -> Option<Promise> {
        if inner.busy.get() || inner.consent.get() != Consent::Granted {
            return None;
        }
        inner.busy.set(true);
        let me = inner.clone();
        let promise = future_to_promise(async move {
            let result = me.send(full_only).await;
            me.busy.set(false);
            *me.running.borrow_mut() = None;
            Ok(match result {
                Ok(()) => JsValue::UNDEFINED,
                Err(reason) => JsValue::from_str(&reason),
            })
        });
        if inner.busy.get() {
            *inner.running.borrow_mut() = Some(promise.clone());
        }
        Some(promise)
    }

    /// Waits for a running sender, then sends everything. Resolves to `undefined` or to
    /// the reason string of an undelivered batch.
    pub(crate) async fn flush(inner: &Rc<Inner>) -> JsValue {
        let held = inner.held.borrow().len();
        if inner.consent.get() == Consent::Pending && held > 0 {
            return JsValue::from_str(&format!(
                "no consent yet: {held} clicks held in memory until setConsent(true)"
            ));
        }
        loop {
            if !inner.busy.get() {
                break;
            }
            let running = inner.running.borrow().clone();
            match running {
                Some(p) => {
                    let _ = JsFuture::from(p).await;
                }
                None => js::sleep(10.0).await,
            }
        }
        match Inner::start_send(inner, false) {
            Some(p) => JsFuture::from(p).await.unwrap_or(JsValue::UNDEFINED),
            None => JsValue::UNDEFINED,
        }
    }

    /// Sends queued batches: only full ones when `full_only`, else everything. `Err` with
    /// a reason when a batch ran out of attempts (it stays queued).
    async fn send(&self, full_only: bool) -> Result<(), String> {
        // Only one sender runs (`busy`), so nothing else is sending a batch marked in
        // flight; a sender abandoned mid-send cannot exist here, but stay safe.
        self.outbox.borrow_mut().abandon_in_flight();
        let epoch = self.epoch.get();
        loop {
            if self.epoch.get() != epoch {
                return Ok(());
            }
            let batch = {
                let mut outbox = self.outbox.borrow_mut();
                if full_only && !outbox.batch_ready() {
                    return Ok(());
                }
                outbox.take_batch()
            };
            let Some(batch) = batch else {
                return Ok(());
            };
            self.send_batch(batch, epoch).await?;
        }
    }

    /// Sends one batch with retries. Stops without completing it when the outbox was
    /// replaced meanwhile (consent changed: `epoch`).
    async fn send_batch(&self, batch: InFlight, epoch: u64) -> Result<(), String> {
        let n = batch.clicks.len();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // Re-stamped per attempt: sent_at must be the actual send time.
            let body = encode_batch(&batch.clicks, self.clock.now_ms(), SDK_NAME, SDK_VERSION);
            let keepalive = body.len() <= KEEPALIVE_MAX_BYTES;
            if keepalive {
                self.keepalive_in_flight.set(n);
            }
            let reply = js::post(&self.ingest_url, &body, keepalive, self.request_timeout_ms).await;
            if self.epoch.get() != epoch {
                return Ok(());
            }
            self.keepalive_in_flight.set(0);
            let (retry_after, reason) = match reply {
                Ok(r) => match classify(r.status) {
                    Disposition::Delivered => {
                        self.finish(batch, Completion::Delivered);
                        return Ok(());
                    }
                    Disposition::Reject => {
                        self.finish(batch, Completion::Rejected);
                        self.emit(&TrackerEvent::Rejected {
                            status: r.status,
                            clicks: n,
                            message: r.body,
                        });
                        return Ok(());
                    }
                    Disposition::Retry => (
                        r.retry_after
                            .as_deref()
                            .and_then(|v| parse_retry_after(v, self.clock.now_ms())),
                        format!("HTTP {}", r.status),
                    ),
                },
                Err(e) => (None, e),
            };
            if attempt >= self.retry.max_attempts {
                self.finish(batch, Completion::Retry);
                bump(&self.counts.gave_up, 1);
                self.emit(&TrackerEvent::GaveUp {
                    clicks: n,
                    reason: reason.clone(),
                });
                let queued = self.outbox.borrow().len();
                return Err(format!("{queued} clicks not delivered yet: {reason}"));
            }
            bump(&self.counts.retries, 1);
            let delay = self.retry.delay(attempt, retry_after, js::random());
            self.emit(&TrackerEvent::Retrying {
                attempt,
                delay,
                reason,
            });
            js::sleep(delay.as_secs_f64() * 1000.0).await;
            if self.epoch.get() != epoch {
                return Ok(());
            }
        }
    }

    fn finish(&self, batch: InFlight, how: Completion) {
        let err = self.outbox.borrow_mut().finish(batch, how);
        if let Some(e) = err {
            self.emit(&TrackerEvent::PersistError {
                message: e.to_string(),
            });
        }
    }

    /// The page is being hidden or unloaded: hand the unsent clicks that no beacon or
    /// keepalive request carries yet to `sendBeacon`. They stay queued (see module doc).
    pub(crate) fn on_hide(&self) {
        if self.consent.get() != Consent::Granted {
            return;
        }
        let skip = self.keepalive_in_flight.get();
        let after = self.beaconed_through.get();
        let todo: Vec<(u64, v1::Click)> = self
            .queue
            .borrow()
            .pending()
            .into_iter()
            .skip(skip)
            .filter(|(seq, _)| after.is_none_or(|a| *seq > a))
            .collect();
        if todo.is_empty() {
            return;
        }
        let now = self.clock.now_ms();
        let mut handed_through = None;
        for chunk in beacon_chunks(&todo, self.batch_size, now) {
            let Some(via) = self.hand_off(&chunk.body) else {
                break;
            };
            handed_through = Some(chunk.last_seq);
            bump(&self.counts.beaconed, chunk.clicks as u64);
            self.emit_js(
                "beacon",
                &[
                    ("clicks", JsValue::from_f64(chunk.clicks as f64)),
                    ("via", JsValue::from_str(via)),
                ],
            );
        }
        if handed_through.is_some() {
            self.beaconed_through.set(handed_through);
        }
    }

    /// One beacon: protobuf-typed, `text/plain` if the browser refuses that type, `fetch`
    /// with `keepalive` if `sendBeacon` is missing or refuses. The method used, or `None`.
    fn hand_off(&self, body: &[u8]) -> Option<&'static str> {
        let url = &self.ingest_url;
        if self.beacon_protobuf_ok.get() {
            match js::send_beacon(url, body, js::PROTOBUF) {
                BeaconResult::Queued => return Some("beacon"),
                BeaconResult::Refused => {
                    return js::post_keepalive(url, body).then_some("fetch-keepalive");
                }
                BeaconResult::Unavailable => self.beacon_protobuf_ok.set(false),
            }
        }
        match js::send_beacon(url, body, js::TEXT_PLAIN) {
            BeaconResult::Queued => Some("beacon-text"),
            BeaconResult::Refused | BeaconResult::Unavailable => {
                js::post_keepalive(url, body).then_some("fetch-keepalive")
            }
        }
    }

    fn emit(&self, event: &TrackerEvent) {
        if self.on_event.is_none() {
            return;
        }
        match event {
            TrackerEvent::Rejected {
                status,
                clicks,
                message,
            } => self.emit_js(
                "rejected",
                &[
                    ("status", JsValue::from_f64(f64::from(*status))),
                    ("clicks", JsValue::from_f64(*clicks as f64)),
                    ("message", JsValue::from_str(message)),
                ],
            ),
            TrackerEvent::Dropped { clicks } => {
                self.emit_js("dropped", &[("clicks", JsValue::from_f64(*clicks as f64))])
            }
            TrackerEvent::Retrying {
                attempt,
                delay,
                reason,
            } => self.emit_js(
                "retrying",
                &[
                    ("attempt", JsValue::from_f64(f64::from(*attempt))),
                    ("delayMs", JsValue::from_f64(delay.as_secs_f64() * 1000.0)),
                    ("reason", JsValue::from_str(reason)),
                ],
            ),
            TrackerEvent::GaveUp { clicks, reason } => self.emit_js(
                "gaveUp",
                &[
                    ("clicks", JsValue::from_f64(*clicks as f64)),
                    ("reason", JsValue::from_str(reason)),
                ],
            ),
            TrackerEvent::PersistError { message } => {
                self.emit_js("persistError", &[("message", JsValue::from_str(message))])
            }
        }
    }

    /// Calls `onEvent({ type, ...fields })`; a throwing callback is ignored.
    fn emit_js(&self, kind: &str, fields: &[(&str, JsValue)]) {
        let Some(f) = &self.on_event else {
            return;
        };
        let obj = Object::new();
        set(&obj, "type", &JsValue::from_str(kind));
        for (k, v) in fields {
            set(&obj, k, v);
        }
        let _ = f.call1(&JsValue::UNDEFINED, &obj);
    }
}

/// One beacon body.
#[derive(Debug, Clone, PartialEq)]
pub struct BeaconChunk {
    /// The encoded `ClickBatch`.
    pub body: Vec<u8>,
    /// Clicks in it.
    pub clicks: usize,
    /// Queue seq of its last click.
    pub last_seq: u64,
}

/// Splits clicks into `ClickBatch` bodies of at most `batch_size` clicks and
/// [`KEEPALIVE_MAX_BYTES`] bytes (a single click always fits: tokens and dimensions are
/// bounded far below that).
pub fn beacon_chunks(
    clicks: &[(u64, v1::Click)],
    batch_size: usize,
    now_ms: i64,
) -> Vec<BeaconChunk> {
    let mut out = Vec::new();
    for group in clicks.chunks(batch_size.max(1)) {
        split_to_fit(group, now_ms, &mut out);
    }
    out
}

fn split_to_fit(group: &[(u64, v1::Click)], now_ms: i64, out: &mut Vec<BeaconChunk>) {
    let Some((last_seq, _)) = group.last() else {
        return;
    };
    let body = encode_batch(group.iter().map(|(_, c)| c), now_ms, SDK_NAME, SDK_VERSION);
    if body.len() <= KEEPALIVE_MAX_BYTES || group.len() == 1 {
        out.push(BeaconChunk {
            body,
            clicks: group.len(),
            last_seq: *last_seq,
        });
        return;
    }
    let (a, b) = group.split_at(group.len() / 2);
    split_to_fit(a, now_ms, out);
    split_to_fit(b, now_ms, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn click(i: u64, token_len: usize) -> (u64, v1::Click) {
        (
            i,
            v1::Click {
                token: "t".repeat(token_len),
                occurred_at_ms: 1_000 + i as i64,
                ..Default::default()
            },
        )
    }

    #[test]
    fn beacon_chunks_respect_count_and_size() {
        let small: Vec<_> = (0..7).map(|i| click(i, 10)).collect();
        let chunks = beacon_chunks(&small, 3, 5);
        let shape: Vec<_> = chunks.iter().map(|c| (c.clicks, c.last_seq)).collect();
        assert_eq!(shape, vec![(3, 2), (3, 5), (1, 6)]);
        let batch = v1::ClickBatch::decode(chunks[0].body.as_slice()).unwrap();
        assert_eq!(batch.sdk_name, SDK_NAME);
        assert_eq!(batch.sent_at_ms, 5);
        assert_eq!(batch.clicks[2].occurred_at_ms, 1_002);

        // 100 clicks of 2 KB tokens do not fit one beacon: split by size, order kept.
        let big: Vec<_> = (0..100).map(|i| click(i, 2_000)).collect();
        let chunks = beacon_chunks(&big, 100, 5);
        assert!(chunks.len() > 1);
        assert!(chunks.iter().all(|c| c.body.len() <= KEEPALIVE_MAX_BYTES));
        assert_eq!(chunks.iter().map(|c| c.clicks).sum::<usize>(), 100);
        assert_eq!(chunks.last().map(|c| c.last_seq), Some(99));
    }
}
