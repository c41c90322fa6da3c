//! `trackLinks`: tracks clicks on `<a data-adclick-token="...">` links before the browser
//! follows them. One delegated listener per root (capture phase, so a page handler that
//! stops propagation cannot hide the click) for `click` and middle-button `auxclick`.
//!
//! The click is queued and a send starts at once (`fetch` with `keepalive`, which
//! survives the navigation); the navigation is never delayed or prevented. If the page is
//! gone before the collector answers, the `pagehide` beacon and the `localStorage` copy
//! cover it (see `tracker.rs`).
//!
//! Must not call `preventDefault` or otherwise change how the link behaves, and must not
//! throw into the page's event dispatch.

use std::rc::Rc;

use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::js;
use crate::options::{self, DimsInput};
use crate::tracker::{Inner, Tracker};

/// The attribute holding a link's impression token.
pub const TOKEN_ATTR: &str = "data-adclick-token";

/// Per-link dimension attributes (`data-adclick-country="DE"` ...), overriding the
/// defaults given to `trackLinks`.
fn link_dims(a: &web_sys::Element) -> DimsInput {
    let attr = |name: &str| a.get_attribute(&format!("data-adclick-{name}"));
    DimsInput {
        country: attr("country"),
        device: attr("device"),
        os: attr("os"),
        site: attr("site"),
        app: attr("app"),
        user_id: attr("user-id"),
    }
}

fn on_link_event(inner: &Rc<Inner>, defaults: &DimsInput, ev: &web_sys::Event) {
    if ev.type_() == "auxclick" {
        // Only the middle button opens the link (in a new tab); others open menus.
        let button = js_sys::Reflect::get(ev, &JsValue::from_str("button"))
            .ok()
            .and_then(|b| b.as_f64());
        if button != Some(1.0) {
            return;
        }
    }
    let Some(el) = ev
        .target()
        .and_then(|t| t.dyn_into::<web_sys::Element>().ok())
    else {
        return;
    };
    let Ok(Some(a)) = el.closest(&format!("a[{TOKEN_ATTR}]")) else {
        return;
    };
    let Some(token) = a.get_attribute(TOKEN_ATTR) else {
        return;
    };
    let dims = defaults.clone().overlay(link_dims(&a));
    // Invalid tokens or attributes are counted (`stats().invalid`) and otherwise ignored:
    // the link still works.
    let Ok(dims) = dims.into_dimensions(inner.default_site()) else {
        return;
    };
    if inner.record(&token, dims).is_ok() {
        // The page is about to navigate: send everything now.
        Inner::send_all(inner);
    }
}

/// Tracks clicks on every `<a data-adclick-token="...">` inside `root` (default: the
/// whole document, including links added later). `dims` are dimensions for every link
/// click; `data-adclick-country`, `-device`, `-os`, `-site`, `-app` and `-user-id`
/// attributes on a link override them. Call once per root. Throws when there is no
/// document (not a page) or on invalid arguments.
#[wasm_bindgen(js_name = trackLinks)]
pub fn track_links(
    tracker: &Tracker,
    root: Option<options::LinkRootArg>,
    dims: Option<options::ClickDimensionsArg>,
) -> Result<(), JsError> {
    let root = options::arg_value(root);
    let defaults = options::parse_dims(&options::arg_value(dims)).map_err(|e| JsError::new(&e))?;
    // Check the defaults once so a bad `device` fails here, not silently per click.
    defaults
        .clone()
        .into_dimensions(None)
        .map_err(|e| JsError::new(&e))?;
    let target: web_sys::EventTarget = if root.is_undefined() || root.is_null() {
        js::document()
            .ok_or_else(|| JsError::new("trackLinks needs a document (call it in a web page)"))?
            .into()
    } else {
        root.dyn_into()
            .map_err(|_| JsError::new("trackLinks: `root` must be a Document or an Element"))?
    };
    let inner = tracker.inner();
    for event in ["click", "auxclick"] {
        let weak = Rc::downgrade(inner);
        let defaults = defaults.clone();
        inner.listen(target.clone(), event, true, move |ev| {
            if let Some(inner) = weak.upgrade() {
                on_link_event(&inner, &defaults, &ev);
            }
        });
    }
    Ok(())
}
