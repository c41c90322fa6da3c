//! The HTTP side of the aggregator: a JSON mirror of the two queries for curl and
//! dashboards, plus `/livez` (the process answers), `/readyz` (it can accept writes; 503
//! with the reasons when not; `/healthz` is the same) and `/metrics`. Same authorisation,
//! validation and query code as gRPC: it answers through `api::Api`, so `adclick
//! aggregator` (the local engine) and `adclick query-front` (the shards) serve this one
//! mirror. Connections are accepted by `listen.rs`, with its limits.
//!
//! Query strings are parsed under fixed bounds ([`MAX_QUERY_BYTES`], [`MAX_PARAMS`]) before
//! anything is allocated per parameter. An unknown parameter, a repeated single-valued one,
//! or any invalid value is a 400 whose body is an RFC 9457 problem
//! (`application/problem+json`: `type` [`PROBLEM_INVALID_REQUEST`], `title`, `status`,
//! `detail`, and `invalid_params: [{name, reason, code}]` naming each parameter); other
//! errors (401, 404, 405, 503) are problems of type `about:blank`.
//!
//! `GET /v1/ads/{ad_id}/clicks?last_minutes=60&granularity=minute&country=US`
//! `GET /v1/ads/{ad_id}/clicks?from_ms=..&to_ms=..&granularity=hour`
//! `GET /v1/ads/top?n=10&last_minutes=60&device=mobile`
//! Filters (repeat a parameter for several values): country, device
//! (desktop|mobile|tablet|other), os, site, advertiser, campaign. Header:
//! `Authorization: Bearer <key>`.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use adclick_proto::v1::{self, Granularity};
use bytes::Bytes;
use std::convert::Infallible;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::api::{Api, BackendError, Ctx};
use crate::listen::ConnService;
use crate::query::QueryError;
use crate::validate::{self, Dim, Field, MAX_QUOTED, Reason, Violations, quote};

/// Longest query string served (a legitimate one, with every filter repeated a few times,
/// is well under 1 KiB).
pub const MAX_QUERY_BYTES: usize = 4096;
/// Most `key=value` pairs in one query string.
pub const MAX_PARAMS: usize = 128;
/// The `type` of the problem answered to an invalid request (400). A stable identifier to
/// compare, not a page to fetch (the host is the project's placeholder); the rules are in
/// `docs/api.md`, "Validation".
pub const PROBLEM_INVALID_REQUEST: &str = "https://example.invalid/adclick/invalid-request";

/// What a request for an unknown path is told.
const NOT_FOUND: &str = "not found: GET /v1/ads/{ad_id}/clicks, GET /v1/ads/{ad_id}/breakdown, \
    GET /v1/ads/clicks?ad_id=..., GET /v1/ads/top, GET /v1/campaigns/{id}/totals, \
    GET /v1/advertisers/{id}/totals, the watches GET /v1/ads/top/watch and \
    GET /v1/ads/{ad_id}/clicks/watch, /ui, /livez, /readyz, /metrics";

/// Filter parameters (repeatable), as `(parameter, filter list)`.
const FILTER_PARAMS: [(&str, Dim); 6] = [
    ("country", Dim::Country),
    ("device", Dim::Device),
    ("os", Dim::Os),
    ("site", Dim::Site),
    ("advertiser", Dim::AdvertiserId),
    ("campaign", Dim::CampaignId),
];
/// Single-valued filter parameters (every query endpoint): `filter.ip`, `filter.user_id`.
/// and `traffic` (valid, invalid or all).
const INDEX_PARAMS: [&str; 3] = ["ip", "user_id", "traffic"];
/// Single-valued parameters of `/v1/ads/{ad_id}/clicks`.
const CLICKS_PARAMS: [&str; 8] = [
    "last_minutes",
    "last",
    "from_ms",
    "from",
    "to_ms",
    "to",
    "granularity",
    "fill_empty",
];
/// Single-valued parameters of `/v1/ads/top`.
const TOP_PARAMS: [&str; 7] = [
    "n",
    "last_minutes",
    "last",
    "from_ms",
    "from",
    "to_ms",
    "to",
];

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: String, ct: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

/// An RFC 9457 problem of type `about:blank`: the status says it all.
fn error(status: StatusCode, detail: &str) -> Resp {
    let title = status.canonical_reason().unwrap_or("Error");
    problem_reply(status, problem("about:blank", title, status, detail, None))
}

/// An RFC 9457 problem body.
fn problem(
    kind: &str,
    title: &str,
    status: StatusCode,
    detail: &str,
    invalid_params: Option<Vec<Value>>,
) -> Value {
    let mut body = json!({
        "type": kind,
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(p), Some(o)) = (invalid_params, body.as_object_mut()) {
        o.insert("invalid_params".into(), Value::Array(p));
    }
    body
}

fn problem_reply(status: StatusCode, body: Value) -> Resp {
    reply(status, body.to_string(), "application/problem+json")
}

/// The HTTP name of a request field: the parameter (or path segment) it came from.
pub fn param_name(f: &Field) -> Cow<'_, str> {
    Cow::Borrowed(match f {
        Field::AdId => "ad_id",
        // The HTTP mirror takes the list as repeated `ad_id` parameters.
        Field::AdIds | Field::AdIdsValue(_) => "ad_id",
        Field::FillEmpty => "fill_empty",
        Field::Traffic => "traffic",
        Field::GroupBy => "group_by",
        Field::Scope => "scope",
        Field::Id => "id",
        Field::IntervalMs => "interval_ms",
        Field::FromMs | Field::RangeFromMs => "from_ms",
        Field::ToMs | Field::RangeToMs => "to_ms",
        Field::Granularity => "granularity",
        Field::N => "n",
        Field::LastMinutes | Field::Window => "last_minutes",
        Field::Filter(d) | Field::FilterValue(d, _) => FILTER_PARAMS
            .iter()
            .find(|(_, x)| x == d)
            .map_or("filter", |(p, _)| p),
        Field::FilterIp => "ip",
        Field::FilterUserId => "user_id",
        Field::Param(p) => p,
    })
}

/// The `type` of the problem answered to a key over its rate limit (429).
pub const PROBLEM_RATE_LIMITED: &str = "https://example.invalid/adclick/rate-limited";

/// 429 for a key over its rate limit: `Retry-After` (whole seconds, rounded up) and an
/// RFC 9457 problem with `retry_after_ms`.
pub fn rate_limited(l: &crate::ratelimit::Limited) -> Resp {
    let s = StatusCode::TOO_MANY_REQUESTS;
    let mut body = problem(
        PROBLEM_RATE_LIMITED,
        "Too Many Requests",
        s,
        &l.to_string(),
        None,
    );
    if let Some(o) = body.as_object_mut() {
        let ms = u64::try_from(l.retry_after.as_millis()).unwrap_or(u64::MAX);
        o.insert("retry_after_ms".into(), json!(ms.max(1)));
    }
    let mut r = problem_reply(s, body);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(l.retry_after_secs()));
    r
}

/// The answer to a refused query: 401, or 400 with a problem naming each parameter.
pub fn query_error(e: &QueryError) -> Resp {
    let (status, body) = problem_of(e);
    problem_reply(status, body)
}

/// The status and RFC 9457 problem body of a refused query.
pub fn problem_of(e: &QueryError) -> (StatusCode, Value) {
    const TITLE: &str = "Invalid request";
    let bad = StatusCode::BAD_REQUEST;
    match e {
        QueryError::Unauthenticated => {
            let s = StatusCode::UNAUTHORIZED;
            (
                s,
                problem("about:blank", "Unauthorized", s, &e.to_string(), None),
            )
        }
        QueryError::Unavailable(m) => {
            let s = StatusCode::SERVICE_UNAVAILABLE;
            (s, problem("about:blank", "Unavailable", s, m, None))
        }
        QueryError::InvalidArgument(m) => (
            bad,
            problem(PROBLEM_INVALID_REQUEST, TITLE, bad, m, Some(Vec::new())),
        ),
        QueryError::Invalid(v) => {
            let params: Vec<Value> = v
                .list()
                .iter()
                .map(|x| {
                    json!({
                        "name": param_name(&x.field),
                        "reason": x.description,
                        "code": x.reason.code(),
                    })
                })
                .collect();
            let mut names: Vec<Cow<'_, str>> = Vec::new();
            for x in v.list() {
                let n = param_name(&x.field);
                if !names.contains(&n) {
                    names.push(n);
                }
            }
            let mut detail = match v.total() {
                1 => "invalid parameter: ".to_string(),
                n => format!("{n} invalid parameters: "),
            };
            detail += &names.join(", ");
            if v.total() > v.list().len() {
                detail += &format!(" (the first {} are listed)", v.list().len());
            }
            (
                bad,
                problem(PROBLEM_INVALID_REQUEST, TITLE, bad, &detail, Some(params)),
            )
        }
    }
}

/// The answer to a query a backend refused: [`query_error`] for our own refusals,
/// [`status_problem`] for a status passed through from a shard.
pub fn backend_error(e: &BackendError, last_minutes: bool) -> Resp {
    match e {
        BackendError::Query(e) => query_error(e),
        BackendError::Status(s) => {
            let (status, body) = status_problem(s, last_minutes);
            problem_reply(status, body)
        }
    }
}

/// A gRPC status (from a shard, through the query front) as an HTTP status and RFC 9457
/// problem: INVALID_ARGUMENT is a 400 of type [`PROBLEM_INVALID_REQUEST`] whose
/// `invalid_params` come from its `google.rpc.BadRequest` (field paths mapped to the
/// mirror's parameter names), UNAUTHENTICATED 401, RESOURCE_EXHAUSTED 429, UNAVAILABLE and
/// DEADLINE_EXCEEDED 503 (the detail names the shard), anything else 502.
pub fn status_problem(s: &tonic::Status, last_minutes: bool) -> (StatusCode, Value) {
    use tonic_types::StatusExt;
    let code = match s.code() {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    if code != StatusCode::BAD_REQUEST {
        let title = code.canonical_reason().unwrap_or("Error");
        return (code, problem("about:blank", title, code, s.message(), None));
    }
    let params: Vec<Value> = s
        .get_details_bad_request()
        .map(|b| b.field_violations)
        .unwrap_or_default()
        .iter()
        .map(|v| {
            json!({
                "name": param_of_path(&v.field, last_minutes),
                "reason": v.description,
                "code": v.reason,
            })
        })
        .collect();
    let body = problem(
        PROBLEM_INVALID_REQUEST,
        "Invalid request",
        code,
        s.message(),
        Some(params),
    );
    (code, body)
}

/// The mirror's parameter name for a gRPC field path (`filter.country[0]` -> `country`,
/// `ad_ids[2]` -> `ad_id`, `range.from_ms` -> `from_ms`): the inverse of [`param_name`]
/// for the paths `validate::Field` prints.
fn param_of_path(path: &str, last_minutes: bool) -> String {
    let base = path.split('[').next().unwrap_or(path);
    let leaf = base.rsplit('.').next().unwrap_or(base);
    let name = match (base.strip_prefix("filter."), leaf) {
        (Some(dim), _) => FILTER_PARAMS
            .iter()
            .find(|(_, d)| d.field_name() == dim)
            .map_or(dim, |(p, _)| p),
        (None, "ad_ids") => "ad_id",
        (None, "from_ms" | "to_ms") if last_minutes => "last_minutes",
        (None, "window") => "last_minutes",
        (None, leaf) => leaf,
    };
    name.to_string()
}

/// One connection's service: [`handle`] on the shared query API.
#[derive(Debug, Clone)]
pub struct HttpService(pub Arc<Api>);

/// A response body: a whole answer, or a watch's event stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

impl ConnService for HttpService {
    type Body = Body;

    fn call(&self, req: Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        // A CORS preflight (OPTIONS) is answered before routing; everything else gets the
        // CORS headers of its origin (`cors.rs`; none unless query.cors_allowed_origins).
        if let Some(resp) = self.0.cors.preflight::<_, Full<Bytes>>(&req) {
            return Box::pin(async move { resp.map(BodyExt::boxed_unsync) });
        }
        let origin = crate::cors::origin_of(req.headers());
        // The handler never reads the body (GET only); the backend may wait on shards.
        let api = self.0.clone();
        Box::pin(async move {
            let mut resp = if req.uri().path().ends_with("/watch") {
                watch(&api, req).await
            } else {
                handle(&api, req).await.map(BodyExt::boxed_unsync)
            };
            api.cors.decorate(&origin, &mut resp);
            resp
        })
    }

    fn timed_out(&self) -> Response<Body> {
        error(StatusCode::SERVICE_UNAVAILABLE, "request timed out").map(BodyExt::boxed_unsync)
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

/// A parameter name as reported back: cut to at most [`MAX_QUOTED`] bytes.
fn cut(name: &str) -> String {
    let mut end = name.len().min(MAX_QUOTED);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

fn readiness(q: &Api) -> Resp {
    let reasons = q.backend.not_ready();
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

async fn handle<B>(q: &Api, req: Request<B>) -> Resp {
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = req.uri().path().to_string();
    if let Some(resp) = crate::ui::asset(&path) {
        return resp;
    }
    match path.as_str() {
        "/livez" => return reply(StatusCode::OK, "ok\n".into(), "text/plain; charset=utf-8"),
        "/readyz" | "/healthz" => return readiness(q),
        "/metrics" => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, body) = q.metrics.expose(accept);
            return reply(StatusCode::OK, body, content_type);
        }
        _ => {}
    }
    let ad = path
        .strip_prefix("/v1/ads/")
        .and_then(|p| p.strip_suffix("/clicks"));
    let breakdown_ad = path
        .strip_prefix("/v1/ads/")
        .and_then(|p| p.strip_suffix("/breakdown"));
    let totals = totals_path(&path);
    let rpc = match (path.as_str(), ad, breakdown_ad) {
        ("/v1/ads/top", _, _) => "TopAds",
        ("/v1/ads/clicks", _, _) => "BatchGetAdClicks",
        (_, Some(_), _) => "GetAdClicks",
        (_, _, Some(_)) => "Breakdown",
        _ if totals.is_some() => "GetTotals",
        _ => {
            return error(StatusCode::NOT_FOUND, NOT_FOUND);
        }
    };
    let ctx = match context(q, &req, rpc) {
        Ok(ctx) => ctx,
        Err(limited) => return *limited,
    };
    let result = async {
        let ctx = ctx?;
        let params = params(req.uri().query())?;
        match (rpc, ad, breakdown_ad, totals) {
            (_, Some(id), _, _) => clicks(q, &ctx, id, &params).await,
            (_, _, Some(id), _) => breakdown(q, &ctx, id, &params).await,
            (_, _, _, Some((scope, id))) => get_totals(q, &ctx, scope, id, &params).await,
            ("BatchGetAdClicks", _, _, _) => batch(q, &ctx, &params).await,
            _ => top(q, &ctx, &params).await,
        }
    };
    let started = std::time::Instant::now();
    let result = result.await;
    q.observe(rpc, started, result.as_ref().err().map(|(e, _)| e));
    match result {
        Ok(v) => reply(StatusCode::OK, v.to_string(), "application/json"),
        Err((e, last_minutes)) => backend_error(&e, last_minutes),
    }
}

/// The caller of `req`: its key's rate limit charged (429 over it), then authorised (an
/// unknown key is the `Err` inside, answered 401 by the caller with the other refusals).
fn context<B>(
    q: &Api,
    req: &Request<B>,
    rpc: &'static str,
) -> Result<Result<Ctx, QueryError>, Box<Resp>> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Charges only a configured key (an unknown one is refused with 401 just below).
    if let Err(l) = q.limiter.check(auth) {
        q.metrics.refuse_query(rpc, "rate_limited");
        return Err(Box::new(rate_limited(&l)));
    }
    Ok(q.authorize(auth).map(|caller| Ctx {
        caller,
        authorization: auth.map(str::to_string),
        now_ms: crate::view::now_ms(),
    }))
}

/// `GET /v1/ads/top/watch?...` and `GET /v1/ads/{ad_id}/clicks/watch?...`: the parameters
/// of the one-shot query plus `interval_ms`, answered as Server-Sent Events (`live.rs`):
/// `event: update` with the query's JSON answer, `event: error` with an RFC 9457 problem
/// when the watch ends (a client that fell behind, a query no longer answerable), and a
/// `: heartbeat` comment after 15 s without change. A request refused before the stream
/// starts gets the one-shot query's status and problem.
async fn watch<B>(q: &Api, req: Request<B>) -> Response<Body> {
    let boxed = |r: Resp| r.map(BodyExt::boxed_unsync);
    if req.method() != Method::GET {
        return boxed(error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served"));
    }
    let path = req.uri().path().to_string();
    let ad = path
        .strip_prefix("/v1/ads/")
        .and_then(|p| p.strip_suffix("/clicks/watch"))
        .map(str::to_string);
    let rpc = match (path.as_str(), &ad) {
        ("/v1/ads/top/watch", _) => "WatchTopAds",
        (_, Some(_)) => "WatchAdClicks",
        _ => {
            return boxed(error(StatusCode::NOT_FOUND, NOT_FOUND));
        }
    };
    let ctx = match context(q, &req, rpc) {
        Ok(ctx) => ctx,
        Err(limited) => return boxed(*limited),
    };
    // Refusals before the watch opens are counted here; those of the watch itself (the
    // interval, the limits, the first answer) where they happen.
    let pre = |e: QueryError| -> Refused {
        let e = BackendError::from(e);
        q.count_refusal(rpc, &e);
        (e, false)
    };
    let opened = async {
        let ctx = ctx.map_err(pre)?;
        let mut params = params(req.uri().query()).map_err(pre)?;
        let mut bad = Violations::default();
        if params.iter().filter(|(k, _)| k == "interval_ms").count() > 1 {
            bad.push(
                Field::IntervalMs,
                Reason::RepeatedParameter,
                "interval_ms is given more than once: it takes one value",
            );
        }
        let interval_ms = num::<u32>(&params, "interval_ms", Field::IntervalMs, &mut bad);
        params.retain(|(k, _)| k != "interval_ms");
        if !bad.is_empty() {
            return Err(pre(QueryError::Invalid(bad)));
        }
        let interval_ms = interval_ms.unwrap_or(0);
        match ad {
            None => {
                let query = top_request(&params).map_err(pre)?;
                let rx = q
                    .watch_top(ctx, query, interval_ms)
                    .await
                    .map_err(|e| (e, false))?;
                Ok(sse(rx, top_json))
            }
            Some(ad) => {
                // Checked once here (so a bad request is a 400, not a stream), then read
                // again at every interval: a `last` range slides with the clock.
                let (_, last_minutes) = clicks_request(&ad, &params, ctx.now_ms).map_err(pre)?;
                let request = move |now_ms| {
                    clicks_request(&ad, &params, now_ms)
                        .map(|(r, _)| r)
                        .map_err(BackendError::from)
                };
                let rx = q
                    .watch_ad_clicks(ctx, request, interval_ms)
                    .await
                    .map_err(|e| name_last_minutes(e, last_minutes))?;
                Ok(sse(rx, clicks_json))
            }
        }
    };
    match opened.await {
        Ok(resp) => resp,
        Err((e, last_minutes)) => boxed(backend_error(&e, last_minutes)),
    }
}

/// A watch's updates as an event stream.
fn sse<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<crate::live::Update<T>>,
    json: impl Fn(&T) -> Value + Send + 'static,
) -> Response<Body> {
    use tokio_stream::StreamExt;
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |u| {
        let text = match u {
            Ok(Some(answer)) => format!("event: update\ndata: {}\n\n", json(&answer)),
            Ok(None) => ": heartbeat\n\n".to_string(),
            Err(status) => {
                let (_, problem) = status_problem(&status, false);
                format!("event: error\ndata: {problem}\n\n")
            }
        };
        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(text)))
    });
    let mut resp = Response::new(StreamBody::new(events).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies that buffer responses (nginx) pass events through at once.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Reports unknown parameters and repeated single-valued ones.
fn check_names(p: &[(String, String)], single: &[&str], bad: &mut Violations) {
    let mut seen: Vec<&str> = Vec::new();
    let mut repeated: Vec<&str> = Vec::new();
    for (k, _) in p {
        let k = k.as_str();
        if FILTER_PARAMS.iter().any(|(f, _)| *f == k) {
            continue;
        }
        if !single.contains(&k) && !INDEX_PARAMS.contains(&k) {
            let known: Vec<&str> = single
                .iter()
                .copied()
                .chain(FILTER_PARAMS.iter().map(|(f, _)| *f))
                .chain(INDEX_PARAMS)
                .collect();
            bad.push(
                Field::Param(cut(k)),
                Reason::UnknownParameter,
                format!(
                    "unknown parameter {}: this endpoint takes {}",
                    quote(k),
                    known.join(", ")
                ),
            );
        } else if !seen.contains(&k) {
            seen.push(k);
        } else if !repeated.contains(&k) {
            repeated.push(k);
            bad.push(
                Field::Param(k.to_string()),
                Reason::RepeatedParameter,
                format!("{k} is given more than once: it takes one value"),
            );
        }
    }
}

/// `traffic=valid|invalid|all` (absent: valid) as the request's `adclick.v1.Traffic`.
fn traffic(p: &[(String, String)], bad: &mut Violations) -> i32 {
    (match get(p, "traffic") {
        None | Some("valid") => v1::Traffic::Valid,
        Some("invalid") => v1::Traffic::Invalid,
        Some("all") => v1::Traffic::All,
        Some(v) => {
            bad.push(
                Field::Traffic,
                Reason::UnknownValue,
                format!("traffic={} is not valid, invalid or all", quote(v)),
            );
            v1::Traffic::Valid
        }
    }) as i32
}

/// The first value of a single-valued parameter (a repeat is reported by [`check_names`]).
fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

fn num<T: std::str::FromStr>(
    p: &[(String, String)],
    k: &str,
    field: Field,
    bad: &mut Violations,
) -> Option<T> {
    let v = get(p, k)?;
    v.parse::<T>()
        .inspect_err(|_| {
            bad.push(
                field,
                Reason::Malformed,
                format!("{k}={} is not a number", quote(v)),
            );
        })
        .ok()
}

/// The filter parameters as a wire filter (values as sent: the shared validation checks
/// and normalises them); device names and ids that do not parse are reported here.
fn filter(p: &[(String, String)], bad: &mut Violations) -> v1::Filter {
    let all = |k: &'static str| p.iter().filter(move |(a, _)| a == k).map(|(_, v)| v);
    let mut f = v1::Filter {
        country: all("country").cloned().collect(),
        os: all("os").cloned().collect(),
        site: all("site").cloned().collect(),
        ip: get(p, "ip").unwrap_or_default().to_string(),
        user_id: get(p, "user_id").unwrap_or_default().to_string(),
        ..Default::default()
    };
    for (k, field) in [("ip", Field::FilterIp), ("user_id", Field::FilterUserId)] {
        if get(p, k) == Some("") {
            bad.push(
                field,
                Reason::Required,
                format!("{k}= is empty: leave the parameter out to not filter on it"),
            );
        }
    }
    for (i, d) in all("device").enumerate() {
        let device = match d.as_str() {
            "desktop" => v1::Device::Desktop,
            "mobile" => v1::Device::Mobile,
            "tablet" => v1::Device::Tablet,
            "other" => v1::Device::Other,
            _ => {
                bad.push(
                    Field::FilterValue(Dim::Device, i),
                    Reason::UnknownValue,
                    format!(
                        "device={} is not desktop, mobile, tablet or other",
                        quote(d)
                    ),
                );
                continue;
            }
        };
        f.device.push(device as i32);
    }
    for (k, dim, dst) in [
        ("advertiser", Dim::AdvertiserId, &mut f.advertiser_id),
        ("campaign", Dim::CampaignId, &mut f.campaign_id),
    ] {
        for (i, v) in all(k).enumerate() {
            match v.parse() {
                Ok(id) => dst.push(id),
                Err(_) => bad.push(
                    Field::FilterValue(dim, i),
                    Reason::Malformed,
                    format!("{k}={} is not a number", quote(v)),
                ),
            }
        }
    }
    f
}

/// How the range was given.
enum Window {
    LastMinutes(u32),
    Range(i64, i64),
}

fn window(p: &[(String, String)], bad: &mut Violations) -> Option<Window> {
    // Short: a refusal body stays under 300 bytes (the hostile-query-string test).
    const ONE_OF: &str = "give last_minutes, or from_ms and to_ms (or last, from, to)";
    // Each end (and the length) may come in either form, but not in both.
    let m = either(
        p,
        ("last_minutes", "last"),
        Field::LastMinutes,
        bad,
        |v| v.parse::<u32>().ok(),
        |v| {
            let d = humantime::parse_duration(v).ok()?;
            (d.as_secs() % 60 == 0 && d.subsec_nanos() == 0)
                .then(|| u32::try_from(d.as_secs() / 60).ok())
                .flatten()
        },
    );
    let from = either(
        p,
        ("from_ms", "from"),
        Field::FromMs,
        bad,
        |v| v.parse::<i64>().ok(),
        rfc3339_ms,
    );
    let to = either(
        p,
        ("to_ms", "to"),
        Field::ToMs,
        bad,
        |v| v.parse::<i64>().ok(),
        rfc3339_ms,
    );
    let has = |a, b| get(p, a).is_some() || get(p, b).is_some();
    match (
        has("last_minutes", "last"),
        has("from_ms", "from"),
        has("to_ms", "to"),
    ) {
        (true, false, false) => m.map(Window::LastMinutes),
        (false, true, true) => Some(Window::Range(from?, to?)),
        (true, from, _) => {
            let field = if from { Field::FromMs } else { Field::ToMs };
            bad.push(field, Reason::Conflict, format!("{ONE_OF}, not both"));
            None
        }
        (false, false, false) => {
            bad.push(Field::LastMinutes, Reason::Required, ONE_OF);
            None
        }
        (false, true, false) => {
            bad.push(
                Field::ToMs,
                Reason::Required,
                format!("to_ms is missing: {ONE_OF}"),
            );
            None
        }
        (false, false, true) => {
            bad.push(
                Field::FromMs,
                Reason::Required,
                format!("from_ms is missing: {ONE_OF}"),
            );
            None
        }
    }
}

/// A value given as `names.0` (parsed by `plain`) or `names.1` (parsed by `alt`), never
/// both; a malformed one is reported under the name it came as.
fn either<T>(
    p: &[(String, String)],
    names: (&str, &str),
    field: Field,
    bad: &mut Violations,
    plain: impl Fn(&str) -> Option<T>,
    alt: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    match (get(p, names.0), get(p, names.1)) {
        (Some(_), Some(_)) => {
            bad.push(
                field,
                Reason::Conflict,
                format!("give {} or {}, not both", names.0, names.1),
            );
            None
        }
        (Some(v), None) => plain(v).or_else(|| {
            bad.push(
                field,
                Reason::Malformed,
                format!("{}={} is not a number", names.0, quote(v)),
            );
            None
        }),
        (None, Some(v)) => alt(v).or_else(|| {
            let what = if names.1 == "last" {
                "a whole number of minutes such as 15m, 2h or 1d"
            } else {
                "an RFC 3339 time such as 2026-12-04T15:00:00Z"
            };
            bad.push(
                Field::Param(names.1.to_string()),
                Reason::Malformed,
                format!("{}={} is not {what}", names.1, quote(v)),
            );
            None
        }),
        (None, None) => None,
    }
}

/// Ms since the epoch of an RFC 3339 time (`2026-12-04T15:00:00Z`; fractions and numeric
/// offsets such as `+01:00` accepted), if it is one. humantime reads only UTC (`Z`), so an
/// offset is taken off by hand.
fn rfc3339_ms(v: &str) -> Option<i64> {
    let b = v.as_bytes();
    let cut = b
        .len()
        .checked_sub(6)
        .filter(|&i| matches!(b[i], b'+' | b'-') && b[i + 3] == b':' && v.is_char_boundary(i));
    let (base, offset_ms) = match cut.map(|i| v.split_at(i)) {
        Some((base, off)) => {
            let h: i64 = off.get(1..3)?.parse().ok()?;
            let m: i64 = off.get(4..6)?.parse().ok()?;
            if h > 23 || m > 59 {
                return None;
            }
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{base}Z"), sign * (h * 60 + m) * 60_000)
        }
        _ => (v.to_string(), 0),
    };
    let t = humantime::parse_rfc3339_weak(&base).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()?.checked_sub(offset_ms)
}

/// An epoch-ms time as RFC 3339 (UTC, milliseconds), for the answers beside the ms value.
fn rfc3339(ms: i64) -> String {
    u64::try_from(ms).map_or_else(
        |_| String::new(),
        |ms| {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        },
    )
}

/// `GET /v1/ads/{ad}/clicks?...` as a request at `now_ms`, and whether its range was
/// given as `last_minutes` (no state read; the request is then validated like gRPC's).
/// What the fuzz test drives.
pub fn clicks_request(
    ad: &str,
    p: &[(String, String)],
    now_ms: i64,
) -> Result<(v1::GetAdClicksRequest, bool), QueryError> {
    let mut bad = Violations::default();
    check_names(p, &CLICKS_PARAMS, &mut bad);
    let ad_id = ad.parse::<u64>().unwrap_or_else(|_| {
        bad.push(
            Field::AdId,
            Reason::Malformed,
            format!("ad id {} is not a number", quote(ad)),
        );
        0
    });
    let granularity = match get(p, "granularity").unwrap_or("minute") {
        "minute" => Granularity::Minute,
        "hour" => Granularity::Hour,
        "day" => Granularity::Day,
        g => {
            bad.push(
                Field::Granularity,
                Reason::UnknownValue,
                format!("unknown granularity {}: minute, hour or day", quote(g)),
            );
            Granularity::Unspecified
        }
    };
    let fill_empty = match get(p, "fill_empty") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(v) => {
            bad.push(
                Field::FillEmpty,
                Reason::Malformed,
                format!("fill_empty is true or false, not {}", quote(v)),
            );
            None
        }
    };
    let window = window(p, &mut bad);
    let filter = filter(p, &mut bad);
    let traffic = traffic(p, &mut bad);
    let (from_ms, to_ms, last) = match window {
        Some(_) if !bad.is_empty() => return Err(QueryError::Invalid(bad)),
        Some(Window::Range(f, t)) => (f, t, false),
        Some(Window::LastMinutes(m)) => {
            let req = v1::TopAdsRequest {
                window: Some(v1::top_ads_request::Window::LastMinutes(m)),
                ..Default::default()
            };
            let (f, t) = validate::top_window(&req, now_ms)?;
            (f, t, true)
        }
        // `window` reported why there is none.
        None => return Err(QueryError::Invalid(bad)),
    };
    let req = v1::GetAdClicksRequest {
        ad_id,
        from_ms,
        to_ms,
        granularity: granularity as i32,
        filter: Some(filter),
        fill_empty,
        traffic,
    };
    Ok((req, last))
}

/// A refusal, and whether the range was given as `last_minutes`.
type Refused = (BackendError, bool);

/// A range given as last_minutes is reported under that name.
fn name_last_minutes(e: BackendError, last_minutes: bool) -> Refused {
    match e {
        BackendError::Query(QueryError::Invalid(v)) if last_minutes => (
            QueryError::Invalid(v.map_fields(|f| match f {
                Field::FromMs | Field::ToMs => Field::LastMinutes,
                f => f,
            }))
            .into(),
            true,
        ),
        e => (e, last_minutes),
    }
}

/// A refusal before the backend was asked.
fn early(e: QueryError) -> Refused {
    (e.into(), false)
}

impl From<QueryError> for Refused {
    fn from(e: QueryError) -> Self {
        early(e)
    }
}

async fn clicks(q: &Api, ctx: &Ctx, ad: &str, p: &[(String, String)]) -> Result<Value, Refused> {
    let (req, last_minutes) = clicks_request(ad, p, ctx.now_ms)?;
    let r = q
        .backend
        .ad_clicks(ctx, req)
        .await
        .map_err(|e| name_last_minutes(e, last_minutes))?;
    Ok(clicks_json(&r))
}

fn granularity_name(g: i32) -> &'static str {
    ["unspecified", "minute", "hour", "day"]
        .get(g as usize)
        .copied()
        .unwrap_or("unspecified")
}

fn clicks_json(r: &v1::GetAdClicksResponse) -> Value {
    json!({
        "ad_id": r.ad_id,
        "granularity": granularity_name(r.granularity),
        "buckets": r.buckets.iter().map(|b| json!({"start_ms": b.start_ms, "start": rfc3339(b.start_ms), "clicks": b.clicks, "unique_users": b.unique_users})).collect::<Vec<_>>(),
        "total_clicks": r.total_clicks,
        "total_unique_users": r.total_unique_users,
        "invalid_by_reason": reasons_json(&r.invalid_by_reason),
        "watermark_ms": r.watermark_ms,
        "watermark": rfc3339(r.watermark_ms),
    })
}

/// `invalid_by_reason` as an object: reason label -> clicks (reasons with clicks only).
fn reasons_json(r: &[v1::ReasonCount]) -> Value {
    let mut o = serde_json::Map::new();
    for rc in r {
        let label = crate::rules::Reason::ALL
            .iter()
            .find(|x| x.proto() == rc.reason)
            .map_or("unspecified", |x| x.label());
        o.insert(label.to_string(), json!(rc.clicks));
    }
    Value::Object(o)
}

/// The parameters of `p` but `own` read as one ad's clicks request (`clicks_request`),
/// refused with `bad` (what the caller found in its own parameters) and those problems
/// together.
fn with_clicks_params(
    ad: &str,
    p: &[(String, String)],
    own: &[&str],
    now_ms: i64,
    mut bad: Violations,
) -> Result<(v1::GetAdClicksRequest, bool), QueryError> {
    let rest: Vec<(String, String)> = p
        .iter()
        .filter(|(k, _)| !own.contains(&k.as_str()))
        .cloned()
        .collect();
    match clicks_request(ad, &rest, now_ms) {
        Ok(_) if !bad.is_empty() => Err(QueryError::Invalid(bad)),
        Ok(x) => Ok(x),
        Err(QueryError::Invalid(v)) => {
            bad.extend(v);
            Err(QueryError::Invalid(bad))
        }
        Err(e) => Err(e),
    }
}

/// `GET /v1/ads/{ad}/breakdown?group_by=country&n=10&...` (the other parameters as for
/// one ad's clicks; `n` defaults to 10) as a `Breakdown` request, and whether its range
/// was given as `last_minutes`.
pub fn breakdown_request(
    ad: &str,
    p: &[(String, String)],
    now_ms: i64,
) -> Result<(v1::BreakdownRequest, bool), QueryError> {
    let mut bad = Violations::default();
    for k in ["group_by", "n"] {
        if p.iter().filter(|(a, _)| a == k).count() > 1 {
            bad.push(
                Field::Param(k.to_string()),
                Reason::RepeatedParameter,
                format!("{k} is given more than once: it takes one value"),
            );
        }
    }
    let group_by = match get(p, "group_by") {
        None => {
            bad.push(
                Field::GroupBy,
                Reason::Required,
                "group_by is required: country, device, os or site",
            );
            v1::Dimension::Unspecified
        }
        Some("country") => v1::Dimension::Country,
        Some("device") => v1::Dimension::Device,
        Some("os") => v1::Dimension::Os,
        Some("site") => v1::Dimension::Site,
        Some(g) => {
            bad.push(
                Field::GroupBy,
                Reason::UnknownValue,
                format!("unknown group_by {}: country, device, os or site", quote(g)),
            );
            v1::Dimension::Unspecified
        }
    };
    if get(p, "fill_empty").is_some() {
        bad.push(
            Field::Param("fill_empty".into()),
            Reason::UnknownParameter,
            "fill_empty does not apply to a breakdown (it has values, not buckets)",
        );
    }
    let n = num::<u32>(p, "n", Field::N, &mut bad).unwrap_or(10);
    let (one, last) = with_clicks_params(ad, p, &["group_by", "n"], now_ms, bad)?;
    let req = v1::BreakdownRequest {
        ad_id: one.ad_id,
        from_ms: one.from_ms,
        to_ms: one.to_ms,
        granularity: one.granularity,
        filter: one.filter,
        group_by: group_by as i32,
        n,
        traffic: one.traffic,
    };
    Ok((req, last))
}

async fn breakdown(q: &Api, ctx: &Ctx, ad: &str, p: &[(String, String)]) -> Result<Value, Refused> {
    let (req, last_minutes) = breakdown_request(ad, p, ctx.now_ms)?;
    let r = q
        .backend
        .breakdown(ctx, req)
        .await
        .map_err(|e| name_last_minutes(e, last_minutes))?;
    let group_by = match v1::Dimension::try_from(r.group_by) {
        Ok(v1::Dimension::Country) => "country",
        Ok(v1::Dimension::Device) => "device",
        Ok(v1::Dimension::Os) => "os",
        Ok(v1::Dimension::Site) => "site",
        _ => "unspecified",
    };
    Ok(json!({
        "ad_id": r.ad_id,
        "group_by": group_by,
        "values": r.values.iter().map(|v| json!({"value": v.value, "clicks": v.clicks, "unique_users": v.unique_users})).collect::<Vec<_>>(),
        "total_clicks": r.total_clicks,
        "watermark_ms": r.watermark_ms,
        "watermark": rfc3339(r.watermark_ms),
    }))
}

/// `/v1/campaigns/{id}/totals` or `/v1/advertisers/{id}/totals`: the scope and the id
/// segment.
fn totals_path(path: &str) -> Option<(v1::TotalsScope, &str)> {
    let (scope, rest) = if let Some(r) = path.strip_prefix("/v1/campaigns/") {
        (v1::TotalsScope::Campaign, r)
    } else {
        (
            v1::TotalsScope::Advertiser,
            path.strip_prefix("/v1/advertisers/")?,
        )
    };
    Some((scope, rest.strip_suffix("/totals")?))
}

/// `GET /v1/campaigns/{id}/totals?...` (or `/v1/advertisers/{id}/totals`; the parameters
/// as for one ad's clicks) as a `GetTotals` request, and whether its range was given as
/// `last_minutes`.
pub fn totals_request(
    scope: v1::TotalsScope,
    id: &str,
    p: &[(String, String)],
    now_ms: i64,
) -> Result<(v1::GetTotalsRequest, bool), QueryError> {
    let mut bad = Violations::default();
    let id = id.parse::<u64>().unwrap_or_else(|_| {
        bad.push(
            Field::Id,
            Reason::Malformed,
            format!("id {} is not a number", quote(id)),
        );
        0
    });
    // The parameters are those of one ad's clicks; "1" stands in for the path's ad id.
    let (one, last) = with_clicks_params("1", p, &[], now_ms, bad)?;
    let req = v1::GetTotalsRequest {
        scope: scope as i32,
        id,
        from_ms: one.from_ms,
        to_ms: one.to_ms,
        granularity: one.granularity,
        filter: one.filter,
        fill_empty: one.fill_empty,
        include_sketches: false,
        traffic: one.traffic,
    };
    Ok((req, last))
}

async fn get_totals(
    q: &Api,
    ctx: &Ctx,
    scope: v1::TotalsScope,
    id: &str,
    p: &[(String, String)],
) -> Result<Value, Refused> {
    let (req, last_minutes) = totals_request(scope, id, p, ctx.now_ms)?;
    let r = q
        .backend
        .totals(ctx, req)
        .await
        .map_err(|e| name_last_minutes(e, last_minutes))?;
    let scope = match v1::TotalsScope::try_from(r.scope) {
        Ok(v1::TotalsScope::Campaign) => "campaign",
        _ => "advertiser",
    };
    Ok(json!({
        "scope": scope,
        "id": r.id,
        "granularity": granularity_name(r.granularity),
        "buckets": r.buckets.iter().map(|b| json!({"start_ms": b.start_ms, "start": rfc3339(b.start_ms), "clicks": b.clicks, "unique_users": b.unique_users})).collect::<Vec<_>>(),
        "total_clicks": r.total_clicks,
        "total_unique_users": r.total_unique_users,
        "invalid_by_reason": reasons_json(&r.invalid_by_reason),
        "ads": r.ads,
        "watermark_ms": r.watermark_ms,
        "watermark": rfc3339(r.watermark_ms),
    }))
}

/// `GET /v1/ads/clicks?ad_id=1&ad_id=2&...` (the other parameters as for one ad) as a
/// `BatchGetAdClicks` request, and whether its range was given as `last_minutes`.
pub fn batch_request(
    p: &[(String, String)],
    now_ms: i64,
) -> Result<(v1::BatchGetAdClicksRequest, bool), QueryError> {
    let mut bad = Violations::default();
    let mut ad_ids = Vec::new();
    for (i, (_, v)) in p.iter().filter(|(k, _)| k == "ad_id").enumerate() {
        match v.parse::<u64>() {
            Ok(id) => ad_ids.push(id),
            Err(_) => bad.push(
                Field::AdIdsValue(i),
                Reason::Malformed,
                format!("ad_id={} is not a number", quote(v)),
            ),
        }
    }
    // The shared parameters are those of one ad's clicks; "1" stands in for the path id.
    let (one, last) = with_clicks_params("1", p, &["ad_id"], now_ms, bad)?;
    let req = v1::BatchGetAdClicksRequest {
        ad_ids,
        from_ms: one.from_ms,
        to_ms: one.to_ms,
        granularity: one.granularity,
        filter: one.filter,
        fill_empty: one.fill_empty,
        traffic: one.traffic,
    };
    Ok((req, last))
}

async fn batch(q: &Api, ctx: &Ctx, p: &[(String, String)]) -> Result<Value, Refused> {
    let (req, last_minutes) = batch_request(p, ctx.now_ms)?;
    let r = q
        .backend
        .batch_ad_clicks(ctx, req)
        .await
        .map_err(|e| name_last_minutes(e, last_minutes))?;
    Ok(json!({
        "ads": r.ads.iter().map(clicks_json).collect::<Vec<_>>(),
        "watermark_ms": r.watermark_ms,
        "watermark": rfc3339(r.watermark_ms),
    }))
}

/// `GET /v1/ads/top?...` as a request (no state read): the parameter checks; the request
/// is then validated like gRPC's. What the fuzz test drives.
pub fn top_request(p: &[(String, String)]) -> Result<v1::TopAdsRequest, QueryError> {
    let mut bad = Violations::default();
    check_names(p, &TOP_PARAMS, &mut bad);
    let n = num::<u32>(p, "n", Field::N, &mut bad);
    let window = window(p, &mut bad);
    let filter = filter(p, &mut bad);
    let traffic = traffic(p, &mut bad);
    let window = match window {
        Some(_) if !bad.is_empty() => return Err(QueryError::Invalid(bad)),
        Some(Window::LastMinutes(m)) => v1::top_ads_request::Window::LastMinutes(m),
        Some(Window::Range(from_ms, to_ms)) => {
            v1::top_ads_request::Window::Range(v1::TimeRange { from_ms, to_ms })
        }
        // `window` reported why there is none.
        None => return Err(QueryError::Invalid(bad)),
    };
    Ok(v1::TopAdsRequest {
        n: n.unwrap_or(10),
        window: Some(window),
        filter: Some(filter),
        traffic,
    })
}

async fn top(q: &Api, ctx: &Ctx, p: &[(String, String)]) -> Result<Value, Refused> {
    let req = top_request(p)?;
    let r = q.backend.top_ads(ctx, req).await.map_err(|e| (e, false))?;
    Ok(top_json(&r))
}

fn top_json(r: &v1::TopAdsResponse) -> Value {
    let range = r.range.unwrap_or_default();
    json!({
        "ads": r.ads.iter().map(|a| json!({"ad_id": a.ad_id, "clicks": a.clicks})).collect::<Vec<_>>(),
        "from_ms": range.from_ms,
        "from": rfc3339(range.from_ms),
        "to_ms": range.to_ms,
        "to": rfc3339(range.to_ms),
        "watermark_ms": r.watermark_ms,
        "watermark": rfc3339(r.watermark_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every parameter name a violation may carry besides an unknown one.
    const KNOWN: [&str; 14] = [
        "ip",
        "user_id",
        "ad_id",
        "last_minutes",
        "from_ms",
        "to_ms",
        "n",
        "granularity",
        "country",
        "device",
        "os",
        "site",
        "advertiser",
        "campaign",
    ];
    const NOW: i64 = 1_767_225_600_000;

    /// Every error names parameters (known ones, or unknown ones as sent, cut) with a
    /// bounded description, and renders as a bounded problem.
    fn check_error(e: &QueryError, p: &[(String, String)]) -> Result<(), TestCaseError> {
        match e {
            QueryError::InvalidArgument(m) => prop_assert!(
                m.contains("query string") || m.contains("query parameters"),
                "names nothing: {m}"
            ),
            QueryError::Invalid(v) => {
                prop_assert!(!v.list().is_empty() && v.list().len() <= validate::MAX_VIOLATIONS);
                for x in v.list() {
                    let name = param_name(&x.field);
                    prop_assert!(
                        KNOWN.contains(&name.as_ref())
                            || p.iter().any(|(k, _)| k.starts_with(name.as_ref())),
                        "{name:?} is no parameter of {p:?}"
                    );
                    prop_assert!(name.len() <= MAX_QUOTED);
                    prop_assert!(x.description.len() < 256, "{}", x.description);
                }
            }
            QueryError::Unauthenticated => prop_assert!(false, "unauthenticated?"),
            QueryError::Unavailable(m) => prop_assert!(false, "unavailable? {m}"),
        }
        let (status, body) = problem_of(e);
        prop_assert_eq!(status, StatusCode::BAD_REQUEST);
        prop_assert_eq!(&body["type"], PROBLEM_INVALID_REQUEST);
        prop_assert!(body.to_string().len() < 400 * validate::MAX_VIOLATIONS);
        Ok(())
    }

    fn check(q: &str) -> Result<(), TestCaseError> {
        let p = match params(Some(q)) {
            Ok(p) => p,
            Err(e) => return check_error(&e, &[]),
        };
        let limits = validate::Limits::default();
        match clicks_request("7", &p, NOW) {
            Ok((req, _)) => {
                if let Err(v) = validate::ad_clicks(&req, &limits, NOW) {
                    check_error(&QueryError::Invalid(v), &p)?;
                }
            }
            Err(e) => check_error(&e, &p)?,
        }
        match top_request(&p) {
            Ok(req) => {
                if let Err(v) = validate::top_ads(&req, &limits, NOW, NOW) {
                    check_error(&QueryError::Invalid(v), &p)?;
                }
            }
            Err(e) => check_error(&e, &p)?,
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
                    "advertiser", "campaign", "country", "os", "site", "ip", "user_id",
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

    fn names(e: QueryError) -> Vec<(String, &'static str)> {
        match e {
            QueryError::Invalid(v) => v
                .list()
                .iter()
                .map(|x| (param_name(&x.field).into_owned(), x.reason.code()))
                .collect(),
            e => panic!("{e:?}"),
        }
    }

    fn parse(q: &str) -> Vec<(String, String)> {
        params(Some(q)).unwrap()
    }

    #[test]
    fn rfc_3339_times_with_offsets_and_hostile_strings() {
        let t0 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        assert_eq!(rfc3339_ms("2026-01-01T00:00:00Z"), Some(t0));
        assert_eq!(rfc3339_ms("2026-01-01T00:00:00.250Z"), Some(t0 + 250));
        assert_eq!(rfc3339_ms("2025-12-31T19:00:00-05:00"), Some(t0));
        assert_eq!(rfc3339_ms("2026-01-01T05:30:00+05:30"), Some(t0));
        for bad in [
            "",
            "x",
            "+01:00",
            "é+01:00",
            "ééé-0é:00",
            "2026-01-01T00:00:00+24:00",
            "2026-01-01",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
        assert_eq!(rfc3339(t0), "2026-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(-1), "");
    }

    #[test]
    fn unknown_and_repeated_parameters_are_named() {
        let e = top_request(&parse("last_minutes=5&coutnry=US&n=3&n=4&n=5")).unwrap_err();
        assert_eq!(
            names(e),
            [
                ("coutnry".into(), "UNKNOWN_PARAMETER"),
                ("n".into(), "REPEATED_PARAMETER")
            ]
        );
        // granularity is a parameter of /clicks, not of /top; n the other way round.
        let e = top_request(&parse("last_minutes=5&granularity=hour")).unwrap_err();
        assert_eq!(names(e), [("granularity".into(), "UNKNOWN_PARAMETER")]);
        let e = clicks_request("1", &parse("last_minutes=5&n=3"), NOW).unwrap_err();
        assert_eq!(names(e), [("n".into(), "UNKNOWN_PARAMETER")]);
        // Filters repeat freely.
        assert!(top_request(&parse("last_minutes=5&country=US&country=DE&os=a&os=b")).is_ok());
        // A long unknown name is cut.
        let long = "x".repeat(500);
        let e = top_request(&parse(&format!("last_minutes=5&{long}=1"))).unwrap_err();
        assert_eq!(names(e), [("x".repeat(MAX_QUOTED), "UNKNOWN_PARAMETER")]);
    }

    #[test]
    fn ranges_need_one_form() {
        for (q, name, code) in [
            ("", "last_minutes", "REQUIRED"),
            ("from_ms=1", "to_ms", "REQUIRED"),
            ("to_ms=1", "from_ms", "REQUIRED"),
            ("last_minutes=5&from_ms=1", "from_ms", "CONFLICT"),
            ("last_minutes=5&to_ms=1", "to_ms", "CONFLICT"),
            ("last_minutes=x", "last_minutes", "MALFORMED"),
        ] {
            let e = top_request(&parse(q)).unwrap_err();
            assert_eq!(names(e), [(name.to_string(), code)], "{q}");
        }
    }

    #[test]
    fn a_last_minutes_range_is_named_last_minutes() {
        let (req, last) = clicks_request("1", &parse("last_minutes=60"), NOW).unwrap();
        assert!(last);
        assert_eq!(req.to_ms - req.from_ms, 60 * 60_000);
        let e = clicks_request("1", &parse("last_minutes=0"), NOW).unwrap_err();
        assert_eq!(names(e), [("last_minutes".into(), "OUT_OF_RANGE")]);
    }

    #[test]
    fn problems_are_rfc_9457() {
        let e = top_request(&parse("last_minutes=5&country=US&device=toaster")).unwrap_err();
        let r = query_error(&e);
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let r = query_error(&QueryError::Unauthenticated);
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }

    /// A shard's field path maps back to the parameter `param_name` gives its field, for
    /// every field the shared validation can name.
    #[test]
    fn shard_field_paths_map_to_the_mirror_parameters() {
        let dims = [
            Dim::Country,
            Dim::Device,
            Dim::Os,
            Dim::Site,
            Dim::AdvertiserId,
            Dim::CampaignId,
        ];
        let mut fields = vec![
            Field::AdId,
            Field::AdIds,
            Field::AdIdsValue(3),
            Field::FillEmpty,
            Field::GroupBy,
            Field::FromMs,
            Field::ToMs,
            Field::Granularity,
            Field::N,
            Field::LastMinutes,
            Field::Window,
            Field::RangeFromMs,
            Field::RangeToMs,
        ];
        for d in dims {
            fields.push(Field::Filter(d));
            fields.push(Field::FilterValue(d, 2));
        }
        for f in fields {
            assert_eq!(param_of_path(&f.to_string(), false), param_name(&f), "{f}");
        }
        assert_eq!(param_of_path("from_ms", true), "last_minutes");
    }

    #[test]
    fn passed_through_statuses_become_problems() {
        use tonic_types::{ErrorDetails, FieldViolation, StatusExt};
        let s = tonic::Status::with_error_details(
            tonic::Code::InvalidArgument,
            "1 invalid field: filter.advertiser_id[0]",
            ErrorDetails::with_bad_request(vec![FieldViolation {
                field: "filter.advertiser_id[0]".into(),
                description: "ids are nonzero".into(),
                reason: "REQUIRED".into(),
                localized_message: None,
            }]),
        );
        let (status, body) = status_problem(&s, false);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["type"], PROBLEM_INVALID_REQUEST);
        assert_eq!(body["invalid_params"][0]["name"], "advertiser");
        assert_eq!(body["invalid_params"][0]["code"], "REQUIRED");
        let (status, body) = status_problem(
            &tonic::Status::unavailable("shard s1 (http://x) is unavailable"),
            false,
        );
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["detail"], "shard s1 (http://x) is unavailable");
        for (code, http) in [
            (tonic::Code::DeadlineExceeded, 503),
            (tonic::Code::Unauthenticated, 401),
            (tonic::Code::ResourceExhausted, 429),
            (tonic::Code::Internal, 502),
        ] {
            assert_eq!(
                status_problem(&tonic::Status::new(code, "x"), false).0,
                http
            );
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
