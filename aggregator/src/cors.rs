//! CORS for the two query fronts a browser can reach: the HTTP/JSON mirror and gRPC-Web on
//! the gRPC port. Answers preflights (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`) and adds `Access-Control-Allow-Origin` to the answers
//! for origins listed in `query.cors_allowed_origins`.
//!
//! Knows only HTTP headers: no query, no auth. CORS is not access control (any non-browser
//! client ignores it; the API key is what protects the data): it only decides which web
//! pages a *browser* lets read the answers. So an origin that is not allowed still gets the
//! server's answer, just without the headers, and its browser withholds it from the page.
//!
//! Why not `tower-http`'s `CorsLayer`: the HTTP mirror is not a tower service (it is a
//! `listen::ConnService` returning `Full<Bytes>`), and the few rules needed here are
//! easier to read than the layering to adapt it.

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

/// Request headers a browser may send: the API key, the gRPC-Web framing headers and the
/// gRPC deadline.
const ALLOW_HEADERS: &str = "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout";
/// Response headers a page may read besides the CORS-safelisted ones: the gRPC status
/// (gRPC-Web answers an error without a body as headers only) and the rate limit's delay.
const EXPOSE_HEADERS: &str =
    "grpc-status, grpc-message, grpc-status-details-bin, retry-after, content-type";
/// GET for the HTTP mirror, POST for gRPC-Web.
const ALLOW_METHODS: &str = "GET, POST, OPTIONS";
/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE: &str = "600";

/// The allowed origins.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    /// `"*"` was listed: every origin.
    any: bool,
    /// Listed origins, lower case, as `scheme://host[:port]`.
    origins: Vec<String>,
}

impl Cors {
    /// Checks and normalises `query.cors_allowed_origins`: each entry is `"*"` or an origin
    /// `http(s)://host[:port]` (no path, not even a trailing `/`: browsers never send one).
    pub fn new(list: &[String]) -> Result<Cors, String> {
        let mut c = Cors::default();
        for o in list {
            if o == "*" {
                c.any = true;
                continue;
            }
            let lower = o.to_ascii_lowercase();
            let rest = lower
                .strip_prefix("https://")
                .or_else(|| lower.strip_prefix("http://"))
                .ok_or_else(|| {
                    format!("{o:?} is not an origin: expected http(s)://host[:port] or \"*\"")
                })?;
            if rest.is_empty()
                || rest.contains(['/', '?', '#', '@'])
                || rest.chars().any(|ch| ch.is_whitespace() || ch.is_control())
            {
                return Err(format!(
                    "{o:?} is not an origin: scheme://host[:port] only, without a path or a \
                     trailing slash"
                ));
            }
            c.origins.push(lower);
        }
        Ok(c)
    }

    /// Whether any origin is allowed (otherwise no CORS header is ever added).
    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, if it is allowed.
    fn allow_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let o = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|a| a.eq_ignore_ascii_case(o))
            .then(|| origin.clone())
    }

    /// The answer to a CORS preflight, or `None` when `req` is not one (or CORS is off:
    /// then OPTIONS is answered as before, 405 on the HTTP mirror). A preflight from an
    /// origin that is not allowed gets 204 without CORS headers: the browser then refuses
    /// the real request.
    pub fn preflight<B, R: Default>(&self, req: &Request<B>) -> Option<Response<R>> {
        let h = req.headers();
        if !self.enabled()
            || req.method() != Method::OPTIONS
            || !h.contains_key(header::ORIGIN)
            || !h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let mut resp = Response::new(R::default());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let out = resp.headers_mut();
        self.vary(out);
        if let Some(origin) = self.allow_origin(h) {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            out.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOW_METHODS),
            );
            out.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            );
            out.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(MAX_AGE),
            );
        }
        Some(resp)
    }

    /// Adds the CORS headers of an actual (non-preflight) answer to `resp`, given the
    /// request's headers.
    pub fn decorate<R>(&self, req: &HeaderMap, resp: &mut Response<R>) {
        if !self.enabled() {
            return;
        }
        let out = resp.headers_mut();
        self.vary(out);
        if let Some(origin) = self.allow_origin(req) {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            out.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSE_HEADERS),
            );
        }
    }

    /// `Vary: Origin`: an answer differs by origin, so a cache must not share it.
    fn vary(&self, out: &mut HeaderMap) {
        if !self.any {
            out.append(header::VARY, HeaderValue::from_static("origin"));
        }
    }
}

/// The request headers [`Cors::decorate`] needs, copied before the request is consumed.
pub fn origin_of(h: &HeaderMap) -> HeaderMap {
    let mut m = HeaderMap::new();
    if let Some(o) = h.get(header::ORIGIN) {
        m.insert(header::ORIGIN, o.clone());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, origin: Option<&str>, preflight: bool) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/v1/ads/top");
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        if preflight {
            b = b.header(header::ACCESS_CONTROL_REQUEST_METHOD, "GET");
        }
        b.body(()).unwrap()
    }

    fn cors(list: &[&str]) -> Cors {
        Cors::new(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn origins_are_checked() {
        for bad in [
            "example.com",
            "https://example.com/",
            "https://a.example/path",
            "ftp://x",
            "https://",
            "null",
        ] {
            assert!(Cors::new(&[bad.to_string()]).is_err(), "{bad}");
        }
        let c = cors(&["https://Dash.Example:8443", "http://localhost:3000"]);
        assert_eq!(
            c.origins,
            ["https://dash.example:8443", "http://localhost:3000"]
        );
        assert!(!cors(&[]).enabled());
    }

    #[test]
    fn allowed_origin_gets_headers_and_others_do_not() {
        let c = cors(&["https://dash.example"]);
        let p: Response<()> = c
            .preflight(&req(Method::OPTIONS, Some("https://dash.example"), true))
            .unwrap();
        assert_eq!(p.status(), 204);
        assert_eq!(
            p.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://dash.example"
        );
        assert!(
            p.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS]
                .to_str()
                .unwrap()
                .contains("authorization")
        );
        let p: Response<()> = c
            .preflight(&req(Method::OPTIONS, Some("https://evil.example"), true))
            .unwrap();
        assert!(
            !p.headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        // Not a preflight: no Access-Control-Request-Method, or not OPTIONS.
        assert!(
            c.preflight::<_, ()>(&req(Method::OPTIONS, Some("https://dash.example"), false))
                .is_none()
        );
        assert!(
            c.preflight::<_, ()>(&req(Method::GET, Some("https://dash.example"), true))
                .is_none()
        );

        let mut r = Response::new(());
        c.decorate(
            req(Method::GET, Some("https://dash.example"), false).headers(),
            &mut r,
        );
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://dash.example"
        );
        assert_eq!(r.headers()[header::VARY], "origin");
        let mut r = Response::new(());
        c.decorate(
            req(Method::GET, Some("https://evil.example"), false).headers(),
            &mut r,
        );
        assert!(
            !r.headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
    }

    #[test]
    fn off_by_default_and_star_only_when_listed() {
        let off = cors(&[]);
        assert!(
            off.preflight::<_, ()>(&req(Method::OPTIONS, Some("https://a.example"), true))
                .is_none()
        );
        let mut r = Response::new(());
        off.decorate(
            req(Method::GET, Some("https://a.example"), false).headers(),
            &mut r,
        );
        assert!(r.headers().is_empty());

        let any = cors(&["*"]);
        let mut r = Response::new(());
        any.decorate(
            req(Method::GET, Some("https://a.example"), false).headers(),
            &mut r,
        );
        assert_eq!(r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    }
}
