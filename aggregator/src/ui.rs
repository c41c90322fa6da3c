//! The dashboard (`GET /ui` on the HTTP port of the aggregator and the query front): a
//! static page, its script and the vendored uPlot, compiled into the binary so nothing is
//! fetched at run time. The page holds no data: it calls the query API (the top-N watch,
//! BatchGetAdClicks, an ad's clicks watch) with the API key the user enters, so it shows
//! what that key may see, and reads `/metrics` for the outcome counts. Served without a
//! key (it is code, not data), with a strict Content-Security-Policy: scripts and
//! connections only to this origin.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

const INDEX: &str = include_str!("../ui/index.html");
const APP: &str = include_str!("../ui/app.js");
const UPLOT_JS: &str = include_str!("../ui/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../ui/vendor/uplot/uPlot.min.css");

/// Scripts, styles and connections from this origin only; the page's own `<style>` block
/// and uPlot's element styles need inline styles.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

/// The asset at `path`, if it is one of the dashboard's.
pub fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, content_type) = match path {
        "/ui" | "/ui/" => (INDEX, "text/html; charset=utf-8"),
        "/ui/app.js" => (APP, "text/javascript; charset=utf-8"),
        "/ui/uplot.min.js" => (UPLOT_JS, "text/javascript; charset=utf-8"),
        "/ui/uplot.min.css" => (UPLOT_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(r)
}
