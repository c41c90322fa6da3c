//! The browser `Tracker`: a thin driver of the core's sans-IO [`Sender`] with `fetch`, one
//! `setTimeout` and page lifecycle events, like the native tokio tracker
//! (`sdk/src/native/tracker.rs`) and the FFI one (`sdk-ffi`).
//!
//! - `click()` hands the click to the sender (validation, queueing journalled to
//!   `localStorage` by [`BrowserQueue`], consent) and pumps it. It never waits for the
//!   network.
//! - `Inner::pump`, after every input (click, flush, fetch answer, timer): starts the
//!   `fetch` the sender asks for (one at a time), reports its outputs (`onEvent`, flush
//!   promises) and arms one `setTimeout` for its next deadline (flush timer or backoff).
//!   When to send, retry, back off or give up is the sender's decision, not this file's.
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
//!   in progress when consent is withdrawn is forgotten by the sender (its answer ignored).
//!
//! Must not re-implement policy (validation, batching, overflow, retry classification):
//! that is `adclick_sdk::core`. Must not call into JavaScript callbacks (`onEvent`) while
//! holding a `RefCell` borrow, so a callback may call back into the tracker.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use adclick_proto::v1;
use adclick_sdk::core::{
    BatchConfig, ClickError, Clock, Consent, Dimensions, Now, Output, OverflowPolicy, Reply,
    RetryPolicy, Sender, SenderConfig, TrackerEvent, Transmit, encode_batch,
};
use js_sys::{Object, Promise, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

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

/// Clicks handed to a beacon (the only counter the core does not keep).
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

/// A pending `flush()`: its ticket and its promise's `resolve` / `reject`.
type FlushWaiter = (u64, js_sys::Function, js_sys::Function);

pub(crate) struct Inner {
    /// The core state machine: batching, retries, timer, consent, stats.
    sender: RefCell<Sender<BrowserQueue>>,
    /// The sender's queue (a handle sharing its state): what the hide beacon reads.
    /// Replaced (with the sender's queue) when consent is given or withdrawn.
    queue: RefCell<BrowserQueue>,
    /// The options, to open the stored queue when consent is given.
    opts: Options,
    /// Clicks refused before reaching the core (not a string, bad dimension object).
    invalid: Cell<u64>,
    beaconed: Cell<u64>,
    ingest_url: String,
    batch_size: usize,
    request_timeout_ms: f64,
    default_site: Option<String>,
    on_event: Option<js_sys::Function>,
    /// A `fetch` of the sender's is running (one at a time).
    fetching: Cell<bool>,
    flush_waiters: RefCell<Vec<FlushWaiter>>,
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
    /// The one `setTimeout` armed for the sender's next deadline: (deadline, timer id).
    timer: Cell<Option<(u64, f64)>>,
    timer_closure: RefCell<Option<Closure<dyn FnMut()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some((_, id)) = self.timer.take() {
            js::clear_timeout(id);
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
            .field("consent", &self.inner.sender.borrow().consent())
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
            bump(&self.inner.invalid, 1);
            return Err(JsError::new("invalid token: must be a string"));
        };
        let dims = options::parse_dims(&options::arg_value(dims))
            .and_then(|d| d.into_dimensions(self.inner.default_site.as_deref()));
        let dims = match dims {
            Ok(d) => d,
            Err(e) => {
                bump(&self.inner.invalid, 1);
                return Err(JsError::new(&e));
            }
        };
        self.inner
            .record(&token, dims)
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Sends everything queued now. Resolves when the queue is empty; rejects with an
    /// `Error` when a batch ran out of attempts (its clicks stay queued and persisted).
    #[wasm_bindgen(unchecked_return_type = "Promise<void>")]
    pub fn flush(&self) -> Promise {
        let inner = &self.inner;
        let ticket = inner.sender.borrow_mut().flush();
        let promise = Promise::new(&mut |resolve, reject| {
            inner
                .flush_waiters
                .borrow_mut()
                .push((ticket, resolve, reject));
        });
        Inner::pump(inner);
        promise
    }

    /// Clicks not yet delivered (including any batch being sent).
    #[wasm_bindgen(getter)]
    pub fn queued(&self) -> u32 {
        u32::try_from(self.inner.sender.borrow().unsent()).unwrap_or(u32::MAX)
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
        match self.inner.sender.borrow().consent() {
            Consent::Granted => "granted",
            Consent::Pending => "pending",
            Consent::Denied => "denied",
        }
        .to_string()
    }

    /// Counters since this tracker was created.
    #[wasm_bindgen(unchecked_return_type = "TrackerStats")]
    pub fn stats(&self) -> JsValue {
        let inner = &self.inner;
        let (s, held, unsent) = {
            let sender = inner.sender.borrow();
            (sender.stats(), sender.held(), sender.unsent())
        };
        let obj = Object::new();
        let fields: [(&str, u64); 14] = [
            ("queued", s.queued),
            ("sent", s.sent),
            ("rejected", s.rejected),
            ("droppedOverflow", s.dropped_overflow),
            ("droppedConsent", s.dropped_consent),
            ("held", held as u64),
            ("invalid", s.invalid + inner.invalid.get()),
            ("retries", s.retries),
            ("gaveUp", s.gave_up),
            ("persistErrors", s.persist_errors),
            ("restored", s.restored),
            ("batches", s.batches),
            ("beaconed", inner.beaconed.get()),
            ("pending", unsent as u64),
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

/// A queue over `localStorage` when `stored` (and the options keep clicks there), else in
/// memory only.
fn new_queue(opts: &Options, stored: bool) -> BrowserQueue {
    BrowserQueue::new(
        if stored { storage(opts) } else { None },
        &opts.storage_key,
        &js::instance_id(),
        opts.max_queue as usize,
    )
}

/// The time for the sender: `Date.now()` for both clocks.
fn now() -> Now {
    let ms = JsClock.now_ms();
    Now {
        mono_ms: u64::try_from(ms).unwrap_or(0),
        wall_ms: ms,
    }
}

impl Inner {
    fn start(opts: Options) -> Rc<Inner> {
        // Without consent nothing is read from or written to storage: a memory-only
        // queue until `setConsent(true)` replaces it.
        let queue = new_queue(&opts, opts.consent);
        let cfg = SenderConfig {
            batch: BatchConfig {
                batch_size: opts.batch_size as usize,
                max_queue: opts.max_queue as usize,
                overflow: OverflowPolicy::DropOldest,
            },
            retry: RetryPolicy {
                max_attempts: opts.max_attempts.max(1),
                ..RetryPolicy::default()
            },
            flush_interval: Duration::from_millis(u64::from(opts.flush_interval_ms)),
            sdk_name: SDK_NAME.to_string(),
            sdk_version: SDK_VERSION.to_string(),
            consent: if opts.consent {
                Consent::Granted
            } else {
                Consent::Pending
            },
            seed: (js::random() * 9_007_199_254_740_992.0) as u64,
        };
        let sender = Sender::new(cfg, queue.clone(), now().mono_ms);
        let inner = Rc::new(Inner {
            sender: RefCell::new(sender),
            queue: RefCell::new(queue),
            opts: opts.clone(),
            invalid: Cell::new(0),
            beaconed: Cell::new(0),
            ingest_url: opts.ingest_url.clone(),
            batch_size: opts.batch_size as usize,
            request_timeout_ms: f64::from(opts.request_timeout_ms),
            default_site: opts.site.or_else(js::page_hostname),
            on_event: opts.on_event,
            fetching: Cell::new(false),
            flush_waiters: RefCell::new(Vec::new()),
            keepalive_in_flight: Cell::new(0),
            beaconed_through: Cell::new(None),
            beacon_protobuf_ok: Cell::new(options::same_origin(
                &opts.ingest_url,
                js::page_origin().as_deref(),
            )),
            listeners: RefCell::new(Vec::new()),
            timer: Cell::new(None),
            timer_closure: RefCell::new(None),
        });
        let weak = Rc::downgrade(&inner);
        *inner.timer_closure.borrow_mut() = Some(Closure::<dyn FnMut()>::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.timer.set(None);
                Inner::pump(&inner);
            }
        }));
        inner.report_load();
        inner.install_page_hooks();
        Inner::pump(&inner);
        inner
    }

    /// Reports clicks over the bound that opening the stored queue deleted.
    fn report_load(&self) {
        let dropped = self.queue.borrow().dropped_at_load();
        if dropped > 0 {
            self.emit(&TrackerEvent::Dropped { clicks: dropped });
        }
    }

    /// Does what the sender asks: starts its next `fetch` (one at a time), reports its
    /// outputs, and arms the timer for its next deadline. Called after every input.
    pub(crate) fn pump(inner: &Rc<Inner>) {
        let t = now();
        let (transmit, outputs, deadline) = {
            let mut s = inner.sender.borrow_mut();
            s.handle_timeout(t);
            let transmit = if inner.fetching.get() {
                None
            } else {
                s.poll_transmit(t)
            };
            let outputs: Vec<Output> = std::iter::from_fn(|| s.poll_output()).collect();
            (transmit, outputs, s.poll_timeout())
        };
        if let Some(tx) = transmit {
            Inner::start_fetch(inner, tx);
        }
        inner.arm_timer(deadline, t.mono_ms);
        // Last: callbacks may call back into the tracker.
        inner.dispatch(outputs);
    }

    fn start_fetch(inner: &Rc<Inner>, tx: Transmit) {
        inner.fetching.set(true);
        let keepalive = tx.body.len() <= KEEPALIVE_MAX_BYTES;
        if keepalive {
            inner.keepalive_in_flight.set(tx.clicks);
        }
        let me = inner.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let reply = js::post(&me.ingest_url, &tx.body, keepalive, me.request_timeout_ms).await;
            me.fetching.set(false);
            me.keepalive_in_flight.set(0);
            let reply = match reply {
                Ok(r) => Reply::Status {
                    status: r.status,
                    retry_after: r.retry_after,
                    body: r.body,
                },
                Err(e) => Reply::Failed(e),
            };
            me.sender.borrow_mut().on_reply(tx.id, reply, now());
            Inner::pump(&me);
        });
    }

    /// One `setTimeout` for the sender's next deadline (re-armed when it changes).
    fn arm_timer(&self, deadline: u64, now_ms: u64) {
        if self.timer.get().is_some_and(|(d, _)| d == deadline) {
            return;
        }
        if let Some((_, id)) = self.timer.take() {
            js::clear_timeout(id);
        }
        let closure = self.timer_closure.borrow();
        let Some(closure) = closure.as_ref() else {
            return;
        };
        let wait = deadline.saturating_sub(now_ms).min(i32::MAX as u64) as f64;
        if let Some(id) = js::set_timeout(closure.as_ref().unchecked_ref(), wait) {
            self.timer.set(Some((deadline, id)));
        }
    }

    /// Reports the sender's outputs: events to `onEvent`, finished flushes to their
    /// promises.
    fn dispatch(&self, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Event(e) => self.emit(&e),
                Output::DroppedConsent { clicks } => self.emit_js(
                    "dropped",
                    &[
                        ("clicks", JsValue::from_f64(clicks as f64)),
                        ("reason", JsValue::from_str("consent")),
                    ],
                ),
                Output::Flushed { through, result } => {
                    let done: Vec<FlushWaiter> = {
                        let mut w = self.flush_waiters.borrow_mut();
                        let (done, keep) = w.drain(..).partition(|(t, _, _)| *t <= through);
                        *w = keep;
                        done
                    };
                    for (_, resolve, reject) in done {
                        let _ = match &result {
                            Ok(()) => resolve.call0(&JsValue::UNDEFINED),
                            Err(e) => reject
                                .call1(&JsValue::UNDEFINED, &JsError::new(&e.to_string()).into()),
                        };
                    }
                }
                Output::Accepted { .. } => {}
            }
        }
    }

    /// See `Tracker::set_consent` and the module doc.
    fn set_consent(inner: &Rc<Inner>, granted: bool) {
        let was = inner.sender.borrow().consent();
        let want = if granted {
            Consent::Granted
        } else {
            Consent::Denied
        };
        if was == want {
            return;
        }
        inner.keepalive_in_flight.set(0);
        inner.beaconed_through.set(None);
        if granted {
            // Open the stored queue (earlier pages' clicks), then queue the held clicks.
            let queue = new_queue(&inner.opts, true);
            {
                let mut s = inner.sender.borrow_mut();
                s.reopen(queue.clone());
                s.set_consent(Consent::Granted);
            }
            *inner.queue.borrow_mut() = queue;
            inner.report_load();
        } else {
            // Discard what this page holds (and stored), then every stored click of the
            // origin (other tabs, earlier pages), and keep nothing stored from now on.
            inner.sender.borrow_mut().set_consent(Consent::Denied);
            if was == Consent::Granted
                && let Some(mut backend) = storage(&inner.opts)
                && let Err(e) = crate::queue::purge(backend.as_mut(), &inner.opts.storage_key)
            {
                inner.emit(&TrackerEvent::PersistError { message: e });
            }
            let queue = new_queue(&inner.opts, false);
            inner.sender.borrow_mut().reopen(queue.clone());
            *inner.queue.borrow_mut() = queue;
        }
        Inner::pump(inner);
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

    /// Validates and queues a click (or, without consent, holds or discards it), and
    /// starts a send when a batch is full.
    pub(crate) fn record(self: &Rc<Self>, token: &str, dims: Dimensions) -> Result<(), ClickError> {
        let result = self.sender.borrow_mut().click(token, dims, now());
        Inner::pump(self);
        result
    }

    /// Sends everything queued now, without waiting (a link click about to navigate).
    pub(crate) fn send_all(inner: &Rc<Inner>) {
        inner.sender.borrow_mut().flush();
        Inner::pump(inner);
    }

    /// The page is being hidden or unloaded: hand the unsent clicks that no beacon or
    /// keepalive request carries yet to `sendBeacon`. They stay queued (see module doc).
    pub(crate) fn on_hide(&self) {
        if self.sender.borrow().consent() != Consent::Granted {
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
        let now = JsClock.now_ms();
        let mut handed_through = None;
        for chunk in beacon_chunks(&todo, self.batch_size, now) {
            let Some(via) = self.hand_off(&chunk.body) else {
                break;
            };
            handed_through = Some(chunk.last_seq);
            bump(&self.beaconed, chunk.clicks as u64);
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
