//! Thin bindings to the JavaScript globals the browser SDK needs: `fetch`, `setTimeout` /
//! `clearTimeout`, `Date.now()`, `Math.random()`, `navigator.sendBeacon`, `localStorage`,
//! `document`. Everything is looked up on `globalThis` when used, so the same code runs in
//! a page, a worker and Node (where `document`, `localStorage` and `sendBeacon` are
//! missing and the callers fall back).
//!
//! Must not hold policy (what to send, when to retry): that is `adclick_sdk::core` and
//! `crate::tracker`. Every import that can throw is bound with `catch`, so a missing or
//! misbehaving global becomes an `Err`, never an exception unwinding through Rust.

use adclick_sdk::core::Clock;
use js_sys::{Function, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// The content type of every body the SDK sends (a protobuf `ClickBatch`).
pub const PROTOBUF: &str = "application/x-protobuf";
/// The CORS-safelisted type a beacon falls back to when a browser refuses a beacon with a
/// non-safelisted type; the collector accepts the same protobuf bytes under it.
pub const TEXT_PLAIN: &str = "text/plain";

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(catch, js_name = fetch)]
    fn global_fetch(url: &str, init: &web_sys::RequestInit) -> Result<Promise, JsValue>;
    #[wasm_bindgen(catch, js_name = setTimeout)]
    fn global_set_timeout(handler: &Function, ms: f64) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch, js_name = setTimeout)]
    fn global_set_timeout_id(handler: &Function, ms: f64) -> Result<f64, JsValue>;
    #[wasm_bindgen(catch, js_name = clearTimeout)]
    fn global_clear_timeout(id: f64) -> Result<(), JsValue>;
    #[wasm_bindgen(catch, js_namespace = AbortSignal, js_name = timeout)]
    fn abort_signal_timeout(ms: f64) -> Result<web_sys::AbortSignal, JsValue>;
}

/// `Date.now()` as the SDK's [`Clock`].
#[derive(Debug, Default, Clone, Copy)]
pub struct JsClock;

impl Clock for JsClock {
    fn now_ms(&self) -> i64 {
        // Date.now() is an integral number of ms well inside i64.
        js_sys::Date::now() as i64
    }
}

/// `Math.random()`, in [0, 1).
pub fn random() -> f64 {
    js_sys::Math::random()
}

/// A short random id for this page instance (names its `localStorage` keys).
pub fn instance_id() -> String {
    let a = (random() * 4_294_967_296.0) as u32;
    let b = (random() * 65_536.0) as u32;
    format!("{a:08x}{b:04x}")
}

/// A readable message for a thrown JS value (`Error` name and message, or its string).
pub fn message(v: &JsValue) -> String {
    if let Some(e) = v.dyn_ref::<js_sys::Error>() {
        let name = String::from(e.name());
        let msg = String::from(e.message());
        return if name.is_empty() {
            msg
        } else {
            format!("{name}: {msg}")
        };
    }
    v.as_string()
        .unwrap_or_else(|| "unknown JavaScript error".to_string())
}

/// Reads `globalThis[name]`; `None` when absent, `null`, or when reading throws.
pub fn global_property(name: &str) -> Option<JsValue> {
    let v = Reflect::get(&js_sys::global(), &JsValue::from_str(name)).ok()?;
    (!v.is_undefined() && !v.is_null()).then_some(v)
}

/// `window.localStorage`, when the environment has one and lets us use it (reading it
/// throws in sandboxed frames and with storage disabled).
pub fn local_storage() -> Option<web_sys::Storage> {
    global_property("localStorage")?.dyn_into().ok()
}

/// `document`, on a page's main thread.
pub fn document() -> Option<web_sys::Document> {
    global_property("document")?.dyn_into().ok()
}

/// True when `document.visibilityState` is `hidden`.
pub fn page_hidden() -> bool {
    document().is_some_and(|d| d.visibility_state() == web_sys::VisibilityState::Hidden)
}

/// `location.hostname` of the page, if any.
pub fn page_hostname() -> Option<String> {
    let location = global_property("location")?;
    let host = Reflect::get(&location, &JsValue::from_str("hostname")).ok()?;
    host.as_string().filter(|h| !h.is_empty())
}

/// `location.origin` of the page (`https://news.example`), if any.
pub fn page_origin() -> Option<String> {
    let location = global_property("location")?;
    let origin = Reflect::get(&location, &JsValue::from_str("origin")).ok()?;
    origin.as_string().filter(|o| o.starts_with("http"))
}

/// A promise resolved after `ms` milliseconds (resolved at once if `setTimeout` is
/// missing).
pub async fn sleep(ms: f64) {
    let promise = Promise::new(&mut |resolve, _reject| {
        if global_set_timeout(&resolve, ms).is_err() {
            let _ = resolve.call0(&JsValue::UNDEFINED);
        }
    });
    let _ = JsFuture::from(promise).await;
}

/// A one-shot timer; its id for [`clear_timeout`] (in Node the `Timeout` object converts
/// to its numeric id, which `clearTimeout` accepts).
pub fn set_timeout(handler: &Function, ms: f64) -> Option<f64> {
    global_set_timeout_id(handler, ms).ok()
}

/// Cancels a timer made by [`set_timeout`].
pub fn clear_timeout(id: f64) {
    let _ = global_clear_timeout(id);
}

/// What the collector answered to a `fetch`.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The `Retry-After` header, when present and exposed by CORS.
    pub retry_after: Option<String>,
    /// The response, for rejections only (truncated), else empty.
    pub body: String,
}

const BODY_SNIPPET_CHARS: usize = 512;

fn request_init(body: &[u8], content_type: &str, keepalive: bool) -> web_sys::RequestInit {
    let init = web_sys::RequestInit::new();
    init.set_method("POST");
    if let Ok(headers) = web_sys::Headers::new() {
        let _ = headers.set("Content-Type", content_type);
        init.set_headers(&headers);
    }
    init.set_body(&Uint8Array::from(body));
    init.set_mode(web_sys::RequestMode::Cors);
    // No cookies: the collector's CORS answer then needs no Allow-Credentials.
    init.set_credentials(web_sys::RequestCredentials::Omit);
    if keepalive {
        // Not in web-sys' RequestInit: set the plain property.
        let _ = Reflect::set(&init, &JsValue::from_str("keepalive"), &JsValue::TRUE);
    }
    init
}

/// `POST`s `body` to `url` with the protobuf content type and waits for the status. A
/// network error, CORS failure or timeout is an `Err` (always retried by the caller).
/// With `keepalive` the request outlives the page (bodies up to 64 KiB).
pub async fn post(
    url: &str,
    body: &[u8],
    keepalive: bool,
    timeout_ms: f64,
) -> Result<Reply, String> {
    let init = request_init(body, PROTOBUF, keepalive);
    if timeout_ms > 0.0 {
        // AbortSignal.timeout: absent in old browsers, then the request has no timeout.
        if let Ok(signal) = abort_signal_timeout(timeout_ms) {
            init.set_signal(Some(&signal));
        }
    }
    let promise = global_fetch(url, &init).map_err(|e| message(&e))?;
    let response: web_sys::Response = JsFuture::from(promise)
        .await
        .map_err(|e| message(&e))?
        .dyn_into()
        .map_err(|_| "fetch did not return a Response".to_string())?;
    let status = response.status();
    let retry_after = response.headers().get("Retry-After").ok().flatten();
    let mut text = String::new();
    if !(200..300).contains(&status) {
        if let Ok(p) = response.text()
            && let Ok(v) = JsFuture::from(p).await
        {
            text = v.as_string().unwrap_or_default();
        }
        if let Some((cut, _)) = text.char_indices().nth(BODY_SNIPPET_CHARS) {
            text.truncate(cut);
        }
    }
    Ok(Reply {
        status,
        retry_after,
        body: text,
    })
}

/// Fire-and-forget `fetch` with `keepalive: true` (the beacon fallback). Returns whether
/// the browser accepted the request; its outcome is never known.
pub fn post_keepalive(url: &str, body: &[u8]) -> bool {
    let init = request_init(body, PROTOBUF, true);
    match global_fetch(url, &init) {
        Ok(promise) => {
            // Observe the promise so a failure is not an "unhandled rejection".
            wasm_bindgen_futures::spawn_local(async move {
                let _ = JsFuture::from(promise).await;
            });
            true
        }
        Err(_) => false,
    }
}

/// Result of [`send_beacon`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeaconResult {
    /// The browser queued the beacon.
    Queued,
    /// `sendBeacon` returned false (payload over the browser's keepalive quota).
    Refused,
    /// `sendBeacon` threw (e.g. a browser that refuses non-safelisted blob types) or
    /// does not exist.
    Unavailable,
}

/// `navigator.sendBeacon(url, new Blob([body], { type }))`.
pub fn send_beacon(url: &str, body: &[u8], content_type: &str) -> BeaconResult {
    let Some(navigator) = global_property("navigator") else {
        return BeaconResult::Unavailable;
    };
    let has_beacon =
        Reflect::get(&navigator, &JsValue::from_str("sendBeacon")).is_ok_and(|f| f.is_function());
    if !has_beacon {
        return BeaconResult::Unavailable;
    }
    let navigator: web_sys::Navigator = navigator.unchecked_into();
    let parts = js_sys::Array::of1(&Uint8Array::from(body));
    let bag = web_sys::BlobPropertyBag::new();
    bag.set_type(content_type);
    let Ok(blob) = web_sys::Blob::new_with_u8_array_sequence_and_options(&parts, &bag) else {
        return BeaconResult::Unavailable;
    };
    match navigator.send_beacon_with_opt_blob(url, Some(&blob)) {
        Ok(true) => BeaconResult::Queued,
        Ok(false) => BeaconResult::Refused,
        Err(_) => BeaconResult::Unavailable,
    }
}
