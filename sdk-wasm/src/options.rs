//! Parsing and validation of the JavaScript-facing inputs: the `new Tracker(options)`
//! object and the per-click dimensions object (and the `data-adclick-*` link
//! attributes). Pure checks are plain functions so the host unit tests cover them.
//!
//! Must not touch the network, storage or timers; errors are messages that the caller
//! turns into a JS `Error`.

use adclick_sdk::{Device, Dimensions};
use js_sys::Reflect;
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};

#[wasm_bindgen]
extern "C" {
    /// A `ClickDimensions` object from JavaScript (its TypeScript type; any value at run
    /// time, checked by [`parse_dims`]).
    #[wasm_bindgen(typescript_type = "ClickDimensions")]
    pub type ClickDimensionsArg;

    /// The root element (or document) given to `trackLinks`.
    #[wasm_bindgen(typescript_type = "Document | Element")]
    pub type LinkRootArg;
}

/// An optional JS argument as a plain value (`undefined` when absent).
pub fn arg_value(v: Option<impl Into<JsValue>>) -> JsValue {
    v.map_or(JsValue::UNDEFINED, Into::into)
}

/// Default clicks per batch.
pub const DEFAULT_BATCH_SIZE: u32 = 50;
/// Default longest wait before a click is sent (ms).
pub const DEFAULT_FLUSH_INTERVAL_MS: u32 = 2_000;
/// Default most clicks held unsent (memory and `localStorage`).
pub const DEFAULT_MAX_QUEUE: u32 = 500;
/// Default per-request timeout (ms).
pub const DEFAULT_REQUEST_TIMEOUT_MS: u32 = 10_000;
/// Default send attempts per batch per flush (the core's `RetryPolicy` default).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 6;
/// Default `localStorage` key prefix.
pub const DEFAULT_STORAGE_KEY: &str = "adclick";

/// A validated `TrackerOptions` object.
#[derive(Debug, Clone)]
pub struct Options {
    /// `{endpoint}/v1/clicks`.
    pub ingest_url: String,
    /// Clicks per batch.
    pub batch_size: u32,
    /// Flush timer period (ms).
    pub flush_interval_ms: u32,
    /// Most clicks held unsent.
    pub max_queue: u32,
    /// Per-request timeout (ms).
    pub request_timeout_ms: u32,
    /// Send attempts per batch per flush.
    pub max_attempts: u32,
    /// Keep unsent clicks in `localStorage`.
    pub persist: bool,
    /// `localStorage` key prefix.
    pub storage_key: String,
    /// Default `site` dimension (the page's host name unless given).
    pub site: Option<String>,
    /// `onEvent` callback.
    pub on_event: Option<js_sys::Function>,
    /// Consent given at construction (`consent`, default true). Without it the tracker
    /// neither stores nor sends until `setConsent(true)`.
    pub consent: bool,
}

/// `{endpoint}/v1/clicks` for an `http(s)://` endpoint or a same-origin path (`/...`).
pub fn ingest_url(endpoint: &str) -> Result<String, String> {
    let e = endpoint.trim();
    let lower = e.to_ascii_lowercase();
    let host = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
        .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or_default());
    let ok = match host {
        Some(h) => !h.is_empty(),
        None => e.starts_with('/') && !e.starts_with("//"),
    };
    if !ok || e.contains(['?', '#']) || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid endpoint {endpoint:?}: expected an http:// or https:// URL such as \
             http://127.0.0.1:8080 (or a same-origin path such as /adclick)"
        ));
    }
    Ok(format!("{}/v1/clicks", e.trim_end_matches('/')))
}

/// True when `ingest_url` (from [`ingest_url`]) is on the page's own origin, where a
/// beacon needs no CORS: a path, or a URL under `page_origin`.
pub fn same_origin(ingest_url: &str, page_origin: Option<&str>) -> bool {
    if ingest_url.starts_with('/') {
        return true;
    }
    page_origin.is_some_and(|o| {
        let o = o.trim_end_matches('/');
        ingest_url.len() > o.len()
            && ingest_url.is_char_boundary(o.len())
            && ingest_url[..o.len()].eq_ignore_ascii_case(o)
            && ingest_url[o.len()..].starts_with('/')
    })
}

/// An integer option in `min..=max`, or `default` when absent.
pub fn int_option(
    name: &str,
    v: Option<f64>,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, String> {
    let Some(v) = v else {
        return Ok(default);
    };
    if v.is_finite() && v.fract() == 0.0 && v >= f64::from(min) && v <= f64::from(max) {
        Ok(v as u32)
    } else {
        Err(format!("`{name}` must be an integer from {min} to {max}"))
    }
}

/// A device class by name (`desktop`, `mobile`, `tablet`, `other`; any case).
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "desktop" => Ok(Device::Desktop),
        "mobile" | "phone" => Ok(Device::Mobile),
        "tablet" => Ok(Device::Tablet),
        "other" => Ok(Device::Other),
        _ => Err(format!(
            "invalid dimension `device`: {s:?} is not one of \"desktop\", \"mobile\", \"tablet\", \"other\""
        )),
    }
}

/// Click dimensions as text, from a JS object or from link attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DimsInput {
    /// `country`.
    pub country: Option<String>,
    /// `device`.
    pub device: Option<String>,
    /// `os`.
    pub os: Option<String>,
    /// `site`.
    pub site: Option<String>,
    /// `app`.
    pub app: Option<String>,
    /// `userId`.
    pub user_id: Option<String>,
}

impl DimsInput {
    /// Fields set in `over` replace ours.
    pub fn overlay(self, over: DimsInput) -> DimsInput {
        DimsInput {
            country: over.country.or(self.country),
            device: over.device.or(self.device),
            os: over.os.or(self.os),
            site: over.site.or(self.site),
            app: over.app.or(self.app),
            user_id: over.user_id.or(self.user_id),
        }
    }

    /// The core's [`Dimensions`]; `default_site` fills an unset `site`. The remaining
    /// checks (country code, lengths) are the core's `build_click`.
    pub fn into_dimensions(self, default_site: Option<&str>) -> Result<Dimensions, String> {
        Ok(Dimensions {
            country: self.country,
            device: self.device.as_deref().map(parse_device).transpose()?,
            os: self.os,
            site: self.site.or_else(|| default_site.map(str::to_string)),
            app: self.app,
            user_id: self.user_id,
        })
    }
}

/// `obj[name]`, `None` when undefined or null.
fn field(obj: &JsValue, name: &str) -> Result<Option<JsValue>, String> {
    let v = Reflect::get(obj, &JsValue::from_str(name))
        .map_err(|e| format!("cannot read `{name}`: {}", crate::js::message(&e)))?;
    Ok((!v.is_undefined() && !v.is_null()).then_some(v))
}

fn string_field(obj: &JsValue, name: &str) -> Result<Option<String>, String> {
    match field(obj, name)? {
        None => Ok(None),
        Some(v) => v
            .as_string()
            .map(Some)
            .ok_or_else(|| format!("`{name}` must be a string")),
    }
}

fn number_field(obj: &JsValue, name: &str) -> Result<Option<f64>, String> {
    match field(obj, name)? {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("`{name}` must be a number")),
    }
}

fn is_object(v: &JsValue) -> bool {
    v.is_object() || v.is_function()
}

/// Parses a `TrackerOptions` object.
pub fn parse_options(v: &JsValue) -> Result<Options, String> {
    if !is_object(v) {
        return Err(
            "Tracker options must be an object such as { endpoint: \"https://collector.example\" }"
                .into(),
        );
    }
    let endpoint = string_field(v, "endpoint")?.ok_or("`endpoint` is required")?;
    let batch_size = int_option(
        "batchSize",
        number_field(v, "batchSize")?,
        DEFAULT_BATCH_SIZE,
        1,
        1_000,
    )?;
    let flush_interval_ms = int_option(
        "flushIntervalMs",
        number_field(v, "flushIntervalMs")?,
        DEFAULT_FLUSH_INTERVAL_MS,
        10,
        3_600_000,
    )?;
    let max_queue = int_option(
        "maxQueue",
        number_field(v, "maxQueue")?,
        DEFAULT_MAX_QUEUE,
        1,
        100_000,
    )?;
    let request_timeout_ms = int_option(
        "requestTimeoutMs",
        number_field(v, "requestTimeoutMs")?,
        DEFAULT_REQUEST_TIMEOUT_MS,
        100,
        600_000,
    )?;
    let max_attempts = int_option(
        "maxAttempts",
        number_field(v, "maxAttempts")?,
        DEFAULT_MAX_ATTEMPTS,
        1,
        100,
    )?;
    let persist = match field(v, "persist")? {
        None => true,
        Some(b) => b.as_bool().ok_or("`persist` must be a boolean")?,
    };
    let consent = match field(v, "consent")? {
        None => true,
        Some(b) => b.as_bool().ok_or("`consent` must be a boolean")?,
    };
    let storage_key = string_field(v, "storageKey")?.unwrap_or_else(|| DEFAULT_STORAGE_KEY.into());
    if storage_key.is_empty() || storage_key.contains(':') {
        return Err("`storageKey` must be a non-empty string without ':'".into());
    }
    let on_event = match field(v, "onEvent")? {
        None => None,
        Some(f) => Some(
            f.dyn_into::<js_sys::Function>()
                .map_err(|_| "`onEvent` must be a function")?,
        ),
    };
    Ok(Options {
        ingest_url: ingest_url(&endpoint)?,
        batch_size,
        flush_interval_ms,
        max_queue: max_queue.max(batch_size),
        request_timeout_ms,
        max_attempts,
        persist,
        storage_key,
        site: string_field(v, "site")?,
        on_event,
        consent,
    })
}

/// Parses a click's dimensions object (`undefined`/`null`: none).
pub fn parse_dims(v: &JsValue) -> Result<DimsInput, String> {
    if v.is_undefined() || v.is_null() {
        return Ok(DimsInput::default());
    }
    if !is_object(v) {
        return Err("click dimensions must be an object such as { country: \"US\" }".into());
    }
    Ok(DimsInput {
        country: string_field(v, "country")?,
        device: string_field(v, "device")?,
        os: string_field(v, "os")?,
        site: string_field(v, "site")?,
        app: string_field(v, "app")?,
        user_id: string_field(v, "userId")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            ingest_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080/v1/clicks"
        );
        assert_eq!(
            ingest_url(" https://c.example/base/ ").unwrap(),
            "https://c.example/base/v1/clicks"
        );
        assert_eq!(ingest_url("/adclick").unwrap(), "/adclick/v1/clicks");
        for bad in [
            "",
            "ftp://x",
            "http://",
            "//evil.example",
            "c.example",
            "http://a b",
            "http://x/?q=1",
        ] {
            assert!(ingest_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn origins() {
        let page = Some("http://127.0.0.1:8080");
        assert!(same_origin("/adclick/v1/clicks", None));
        assert!(same_origin("http://127.0.0.1:8080/v1/clicks", page));
        assert!(same_origin("HTTP://127.0.0.1:8080/v1/clicks", page));
        assert!(!same_origin("http://127.0.0.1:8080/v1/clicks", None));
        assert!(!same_origin("http://127.0.0.1:80800/v1/clicks", page));
        assert!(!same_origin("https://127.0.0.1:8080/v1/clicks", page));
        assert!(!same_origin(
            "http://c.example/v1/clicks",
            Some("http://news.example")
        ));
    }

    #[test]
    fn integers() {
        assert_eq!(int_option("n", None, 7, 1, 10), Ok(7));
        assert_eq!(int_option("n", Some(10.0), 7, 1, 10), Ok(10));
        for bad in [0.0, 11.0, 1.5, f64::NAN, f64::INFINITY, -1.0] {
            let e = int_option("batchSize", Some(bad), 7, 1, 10).unwrap_err();
            assert!(
                e.contains("`batchSize` must be an integer from 1 to 10"),
                "{e}"
            );
        }
    }

    #[test]
    fn dims() {
        let base = DimsInput {
            country: Some("us".into()),
            device: Some("Mobile".into()),
            ..Default::default()
        };
        let over = DimsInput {
            country: Some("DE".into()),
            user_id: Some("u".into()),
            ..Default::default()
        };
        let d = base
            .overlay(over)
            .into_dimensions(Some("news.example"))
            .unwrap();
        assert_eq!(d.country.as_deref(), Some("DE"));
        assert_eq!(d.device, Some(Device::Mobile));
        assert_eq!(d.site.as_deref(), Some("news.example"));
        assert_eq!(d.user_id.as_deref(), Some("u"));
        let e = DimsInput {
            device: Some("fridge".into()),
            ..Default::default()
        }
        .into_dimensions(None)
        .unwrap_err();
        assert!(e.contains("invalid dimension `device`"), "{e}");
    }
}
