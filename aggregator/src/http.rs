//! The HTTP side of the aggregator: a JSON mirror of the two queries for curl and
//! dashboards, plus `/livez` (the process answers), `/readyz` (it can accept writes; 503
//! with the reasons when not; `/healthz` is the same) and `/metrics`. Same authorisation
//! and query code as gRPC. Connections are accepted by `listen.rs`, with its limits.
//!
//! Query strings are parsed under fixed bounds ([`MAX_QUERY_BYTES`], [`MAX_PARAMS`]) before
//! anything is allocated per parameter, and every bad parameter is a 400 naming it.
//!
//! `GET /v1/ads/{id}/clicks?last_minutes=60&granularity=minute&country=US`
//! `GET /v1/ads/{id}/clicks?from_ms=..&to_ms=..&granularity=hour`
//! `GET /v1/ads/top?n=10&last_minutes=60&device=mobile`
//! Filters (repeatable): country, device (desktop|mobile|tablet|other), os, site,
//! advertiser, campaign. Header: `Authorization: Bearer <key>`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use adclick_proto::v1::{self, Granularity};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::grpc::Query;
use crate::listen::ConnService;
use crate::query::{self, QueryError};

/// Longest query string served (a legitimate one, with every filter repeated a few times,
/// is well under 1 KiB).
pub const MAX_QUERY_BYTES: usize = 4096;
/// Most `key=value` pairs in one query string.
pub const MAX_PARAMS: usize = 64;
/// Longest value (in bytes, escaped) quoted back in an error message.
const MAX_QUOTED: usize = 48;

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: String, ct: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

fn error(status: StatusCode, msg: &str) -> Resp {
    reply(
        status,
        json!({ "error": msg }).to_string(),
        "application/json",
    )
}

fn query_error(e: QueryError) -> Resp {
    match e {
        QueryError::Unauthenticated => error(StatusCode::UNAUTHORIZED, &e.to_string()),
        QueryError::InvalidArgument(m) => error(StatusCode::BAD_REQUEST, &m),
    }
}

/// One connection's service: [`handle`] on the shared query state.
#[derive(Debug, Clone)]
pub struct HttpService(pub Arc<Query>);

impl ConnService for HttpService {
    type Body = Full<Bytes>;

    fn call(&self, req: Request<Incoming>) -> Pin<Box<dyn Future<Output = Resp> + Send>> {
        // The handler never reads the body (GET only) and does no I/O: answered at once.
        let resp = handle(&self.0, req);
        Box::pin(async move { resp })
    }

    fn timed_out(&self) -> Resp {
        error(StatusCode::SERVICE_UNAVAILABLE, "request timed out")
    }
}

/// Parses a query string under [`MAX_QUERY_BYTES`] and [`MAX_PARAMS`].
pub fn params(query: Option<&str>) -> Result<Vec<(String, String)>, QueryError> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    if q.len() > MAX_QUERY_BYTES {
        return Err(QueryError::InvalidArgument(format!(
            "query string is {} bytes, more than {MAX_QUERY_BYTES}",
            q.len()
        )));
    }
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        if out.len() == MAX_PARAMS {
            return Err(QueryError::InvalidArgument(format!(
                "more than {MAX_PARAMS} query parameters"
            )));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

/// A value as quoted in an error: escaped, and cut to at most [`MAX_QUOTED`] bytes.
fn quote(v: &str) -> String {
    let full = format!("{v:?}");
    if full.len() <= MAX_QUOTED {
        return full;
    }
    let mut end = MAX_QUOTED;
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &full[..end])
}

fn readiness(q: &Query) -> Resp {
    let reasons = q.view.ready.reasons();
    let ready = reasons.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(
        status,
        json!({ "ready": ready, "reasons": reasons }).to_string(),
        "application/json",
    )
}

fn handle<B>(q: &Query, req: Request<B>) -> Resp {
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/livez" => return reply(StatusCode::OK, "ok\n".into(), "text/plain; charset=utf-8"),
        "/readyz" | "/healthz" => return readiness(q),
        "/metrics" => {
            return reply(
                StatusCode::OK,
                q.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            );
        }
        _ => {}
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = match q.authorize(auth) {
        Ok(c) => c,
        Err(e) => return query_error(e),
    };
    let params = match params(req.uri().query()) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    let result = if path == "/v1/ads/top" {
        top(q, caller, &params)
    } else if let Some(id) = path
        .strip_prefix("/v1/ads/")
        .and_then(|p| p.strip_suffix("/clicks"))
    {
        match id.parse::<u64>() {
            Ok(ad) => clicks(q, caller, ad, &params),
            Err(_) => Err(QueryError::InvalidArgument(format!(
                "ad id {} is not a number",
                quote(id)
            ))),
        }
    } else {
        return error(
            StatusCode::NOT_FOUND,
            "not found: GET /v1/ads/{id}/clicks, GET /v1/ads/top, /livez, /readyz, /metrics",
        );
    };
    match result {
        Ok(v) => reply(StatusCode::OK, v.to_string(), "application/json"),
        Err(e) => query_error(e),
    }
}

fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

fn num<T: std::str::FromStr>(p: &[(String, String)], k: &str) -> Result<Option<T>, QueryError> {
    get(p, k)
        .map(|v| {
            v.parse::<T>().map_err(|_| {
                QueryError::InvalidArgument(format!("{k}={} is not a number", quote(v)))
            })
        })
        .transpose()
}

fn filter(p: &[(String, String)]) -> Result<v1::Filter, QueryError> {
    let all = |k: &str| {
        p.iter()
            .filter(|(a, _)| a == k)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let mut f = v1::Filter {
        country: all("country")
            .into_iter()
            .map(|c| c.to_ascii_uppercase())
            .collect(),
        os: all("os"),
        site: all("site"),
        ..Default::default()
    };
    for d in all("device") {
        f.device.push(match d.as_str() {
            "desktop" => v1::Device::Desktop,
            "mobile" => v1::Device::Mobile,
            "tablet" => v1::Device::Tablet,
            "other" => v1::Device::Other,
            _ => {
                return Err(QueryError::InvalidArgument(format!(
                    "device={} is not desktop, mobile, tablet or other",
                    quote(&d)
                )));
            }
        } as i32);
    }
    for (k, dst) in [
        ("advertiser", &mut f.advertiser_id),
        ("campaign", &mut f.campaign_id),
    ] {
        for v in all(k) {
            dst.push(v.parse().map_err(|_| {
                QueryError::InvalidArgument(format!("{k}={} is not a number", quote(&v)))
            })?);
        }
    }
    Ok(f)
}

fn range(p: &[(String, String)]) -> Result<(i64, i64), QueryError> {
    match (
        num::<u32>(p, "last_minutes")?,
        num::<i64>(p, "from_ms")?,
        num::<i64>(p, "to_ms")?,
    ) {
        (Some(m), None, None) => query::top_range(
            &v1::TopAdsRequest {
                window: Some(v1::top_ads_request::Window::LastMinutes(m)),
                ..Default::default()
            },
            crate::view::now_ms(),
        ),
        (None, Some(f), Some(t)) => Ok((f, t)),
        _ => Err(QueryError::InvalidArgument(
            "last_minutes, or from_ms and to_ms: give one of the two".into(),
        )),
    }
}

/// `GET /v1/ads/{ad}/clicks?...` as a request (no state read): what the fuzz test drives.
pub fn clicks_request(
    ad: u64,
    p: &[(String, String)],
) -> Result<v1::GetAdClicksRequest, QueryError> {
    let granularity = match get(p, "granularity").unwrap_or("minute") {
        "minute" => Granularity::Minute,
        "hour" => Granularity::Hour,
        "day" => Granularity::Day,
        g => {
            return Err(QueryError::InvalidArgument(format!(
                "unknown granularity {}: minute, hour or day",
                quote(g)
            )));
        }
    };
    let (from_ms, to_ms) = range(p)?;
    Ok(v1::GetAdClicksRequest {
        ad_id: ad,
        from_ms,
        to_ms,
        granularity: granularity as i32,
        filter: Some(filter(p)?),
    })
}

fn clicks(
    q: &Query,
    caller: query::Caller,
    ad: u64,
    p: &[(String, String)],
) -> Result<Value, QueryError> {
    let req = clicks_request(ad, p)?;
    let r = query::get_ad_clicks(&q.view, caller, &req, &q.cfg)?;
    let granularity = ["unspecified", "minute", "hour", "day"]
        .get(r.granularity as usize)
        .copied()
        .unwrap_or("unspecified");
    Ok(json!({
        "ad_id": r.ad_id,
        "granularity": granularity,
        "buckets": r.buckets.iter().map(|b| json!({"start_ms": b.start_ms, "clicks": b.clicks, "unique_users": b.unique_users})).collect::<Vec<_>>(),
        "total_clicks": r.total_clicks,
        "total_unique_users": r.total_unique_users,
        "watermark_ms": r.watermark_ms,
    }))
}

/// `GET /v1/ads/top?...` as a request (no state read): what the fuzz test drives.
pub fn top_request(p: &[(String, String)]) -> Result<v1::TopAdsRequest, QueryError> {
    let (from_ms, to_ms) = range(p)?;
    Ok(v1::TopAdsRequest {
        n: num::<u32>(p, "n")?.unwrap_or(10),
        window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
            from_ms,
            to_ms,
        })),
        filter: Some(filter(p)?),
    })
}

fn top(q: &Query, caller: query::Caller, p: &[(String, String)]) -> Result<Value, QueryError> {
    let req = top_request(p)?;
    let r = query::top_ads(&q.view, caller, &req, &q.cfg, crate::view::now_ms())?;
    let range = r.range.unwrap_or_default();
    Ok(json!({
        "ads": r.ads.iter().map(|a| json!({"ad_id": a.ad_id, "clicks": a.clicks})).collect::<Vec<_>>(),
        "from_ms": range.from_ms,
        "to_ms": range.to_ms,
        "watermark_ms": r.watermark_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What an error may name: a parameter, or the query string as a whole.
    const NAMED: [&str; 14] = [
        "last_minutes",
        "from_ms",
        "to_ms",
        "n=",
        "granularity",
        "device=",
        "advertiser=",
        "campaign=",
        "query string",
        "query parameters",
        "country",
        "os",
        "site",
        "range",
    ];

    fn check(q: &str) -> Result<(), TestCaseError> {
        let parsed = params(Some(q));
        let result = parsed.and_then(|p| {
            let _ = clicks_request(7, &p)?;
            top_request(&p).map(drop)
        });
        if let Err(QueryError::InvalidArgument(m)) = result {
            // Bounded: a quoted value is cut at MAX_QUOTED bytes.
            prop_assert!(m.len() < 200, "{m}");
            prop_assert!(
                NAMED.iter().any(|n| m.contains(n)),
                "names no parameter: {m}"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary bytes, percent-encoded as a client could send them.
        #[test]
        fn arbitrary_query_strings_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let q: String = form_urlencoded::byte_serialize(&bytes).collect();
            check(&q)?;
            check(&String::from_utf8_lossy(&bytes))?;
        }

        /// Known parameters with hostile values, repeated and mixed.
        #[test]
        fn known_parameters_with_hostile_values(
            pairs in proptest::collection::vec((
                prop::sample::select(vec![
                    "last_minutes", "from_ms", "to_ms", "n", "granularity", "device",
                    "advertiser", "campaign", "country", "os", "site",
                ]),
                prop_oneof![
                    "-?[0-9]{0,25}",
                    "[a-z%+]{0,40}",
                    any::<i64>().prop_map(|v| v.to_string()),
                    any::<u64>().prop_map(|v| v.to_string()),
                    ".{0,50}",
                ],
            ), 0..12),
        ) {
            let q = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish();
            check(&q)?;
        }
    }

    #[test]
    fn bounds_apply_before_parsing() {
        let long = "a".repeat(MAX_QUERY_BYTES + 1);
        assert!(
            matches!(params(Some(&long)), Err(QueryError::InvalidArgument(m)) if m.contains("query string"))
        );
        let many = "x=1&".repeat(MAX_PARAMS + 1);
        assert!(
            matches!(params(Some(&many)), Err(QueryError::InvalidArgument(m)) if m.contains("query parameters"))
        );
        assert_eq!(
            params(Some(&"x=1&".repeat(MAX_PARAMS))).unwrap().len(),
            MAX_PARAMS
        );
    }
}
