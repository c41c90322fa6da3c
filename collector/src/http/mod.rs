//! The collector's HTTP front (hyper; HTTP/1.1 and h2c on one port):
//! `POST /v1/clicks` (protobuf or JSON `ClickBatch`), `GET /c/{token}` (record + 302),
//! `GET /livez` (liveness), `GET /readyz` and its alias `GET /healthz` (readiness, JSON
//! with reasons), `GET /metrics`.
//!
//! Status codes: 202 only after the accepted clicks are fsynced; 400 malformed; 408 body
//! not received within `limits.body_read_timeout_ms`; 413 too large (bytes, or clicks,
//! counted before decoding); 415 unknown content type; 429 + `Retry-After` per-IP click
//! rate limit; 503 + `Retry-After` when the spool is full or the disk failed. This module
//! parses and answers; click logic is in `ingest`, durability in `writer`.
//!
//! Every connection is bounded: caps per listener and per peer IP (refused at accept),
//! a deadline for the first request, an idle timeout between requests, a whole-body
//! deadline, HTTP/2 stream and keep-alive limits, and a global budget of buffered body
//! bytes (see `config::Limits`).

pub mod client_ip;
pub mod conn;
pub mod decode;
pub mod json;
pub mod ratelimit;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use adclick_proto::v1;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::Limits;
use crate::ingest::{ClickRef, Processed, Processor, RequestCtx};
use crate::metrics::{ConnLabel, ListenerLabel, Metrics};
use crate::quarantine::Quarantine;
use crate::useragent::UaClassifier;
use crate::writer::{CommitError, Committer};
use client_ip::TrustedProxies;
use conn::{Activity, ConnLimiter};
use decode::BatchDecodeError;
use ratelimit::{RateLimiter, RetryAfter};

/// What every request handler shares.
#[derive(Debug)]
pub struct HttpState {
    /// Click processing.
    pub processor: Arc<Processor>,
    /// Durable commits.
    pub committer: Committer,
    /// Rejected-click log.
    pub quarantine: Quarantine,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Request limits.
    pub limits: Limits,
    /// Per-IP rate limit.
    pub limiter: RateLimiter,
    /// CORS allowed origins (`*` = any).
    pub cors_origins: Vec<String>,
    /// Proxies whose forwarding headers name the client.
    pub trusted_proxies: TrustedProxies,
    /// The bot User-Agent list (`[user_agent]`).
    pub user_agents: Arc<UaClassifier>,
    /// Budget of buffered request-body bytes, in KiB permits (`limits.max_inflight_body_bytes`).
    pub body_budget: Arc<Semaphore>,
    /// Each client address's share of that budget in use (`limits.max_inflight_body_bytes_per_ip`),
    /// so one address cannot hold the whole budget with bodies it never sends.
    pub body_per_ip: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
}

/// A reservation of request-body bytes: its global budget permit plus its client's share,
/// both given back when dropped.
#[derive(Debug)]
pub struct BodyPermit {
    _global: tokio::sync::OwnedSemaphorePermit,
    per_ip: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    ip: IpAddr,
    bytes: usize,
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        let mut m = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(used) = m.get_mut(&self.ip) {
            *used = used.saturating_sub(self.bytes);
            if *used == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl HttpState {
    /// The shared parts built from `limits` (rate limiter, body budget), around the
    /// given processing pieces.
    pub fn body_budget_for(limits: &Limits) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(kib(limits.max_inflight_body_bytes)))
    }

    /// Reserves `bytes` of the in-flight body budget for a request from `ip`, or None at
    /// once when the budget, or `ip`'s share of it, is used up (the caller answers 503:
    /// refusing is cheaper than queueing bodies). The map of shares holds only addresses
    /// with a body in flight, so it is bounded by the connection caps.
    pub fn reserve_body(&self, ip: IpAddr, bytes: usize) -> Option<BodyPermit> {
        let n = u32::try_from(kib(bytes)).unwrap_or(u32::MAX);
        let global = self.body_budget.clone().try_acquire_many_owned(n).ok()?;
        let share = self.limits.max_inflight_body_bytes_per_ip;
        let mut m = self.body_per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let used = m.get(&ip).copied().unwrap_or(0);
        if used.saturating_add(bytes) > share {
            return None; // `global` is released here
        }
        m.insert(ip, used + bytes);
        Some(BodyPermit {
            _global: global,
            per_ip: self.body_per_ip.clone(),
            ip,
            bytes,
        })
    }

    /// Charges `clicks` more clicks (beyond the one taken before the body was read) to
    /// `ip`'s rate limit; on refusal the clicks are counted as `rate_limited`.
    pub fn charge_clicks(&self, ip: IpAddr, clicks: usize) -> Result<(), RetryAfter> {
        let extra = clicks.max(1).min(self.limiter.burst()) - 1;
        self.limiter
            .take(ip, extra, Instant::now())
            .inspect_err(|_| {
                self.metrics.rate_limited.inc();
                self.metrics.add_clicks("rate_limited", clicks as u64);
            })
    }

    /// The class of a request's `User-Agent` header (the first one, if repeated).
    pub fn ua_class(&self, headers: &hyper::HeaderMap) -> v1::UserAgentClass {
        self.user_agents
            .classify(headers.get(header::USER_AGENT).map(HeaderValue::as_bytes))
    }

    /// The cheap check before a request's body is read: one click's worth.
    pub fn admit(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        self.limiter.take(ip, 1, Instant::now()).inspect_err(|_| {
            self.metrics.rate_limited.inc();
        })
    }
}

/// Bytes to KiB permits, rounded up, at least 1.
fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024).max(1)
}

type Resp = Response<Full<Bytes>>;

/// Collector wall clock, ms since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_error(status: StatusCode, msg: &str) -> Resp {
    let mut r = text(status, serde_json::json!({ "error": msg }).to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Seconds a client should wait before retrying after `e` (HTTP `Retry-After`, and the
/// QUIC reply's `retry-after:` hint).
pub fn retry_after_secs(e: &CommitError) -> u32 {
    match e {
        CommitError::Full(_) => 5,
        // The writer reopens the spool by itself (backoff up to 5 s).
        CommitError::Disk(_) => 10,
        CommitError::Closed => 30,
    }
}

fn too_many(retry: RetryAfter) -> Resp {
    let mut r = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "click rate limit exceeded for this client (limits.rate_limit_per_ip)",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry.0));
    r
}

fn unavailable(e: &CommitError) -> Resp {
    let mut r = json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(e)));
    r
}

/// Serves HTTP on `listener` until `shutdown` flips, then drains in-flight requests (at
/// most [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = state.limits.clone();
    let conns = ConnLimiter::new(limits.max_connections, limits.max_connections_per_ip);
    conn::warn_if_files_limit_low("http", limits.max_connections);
    let idle_timeout = limits.idle_timeout();
    // An idle connection closed with a GOAWAY may finish what the client sent before it
    // saw it (a request's body is bounded by this deadline), then is dropped.
    let close_grace = limits.body_read_timeout() + Duration::from_secs(2);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(header_read_timeout);
    let mut h2 = builder.http2();
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection);
    if limits.http2_keep_alive_interval_ms > 0 {
        h2.keep_alive_interval(Duration::from_millis(limits.http2_keep_alive_interval_ms))
            .keep_alive_timeout(idle_timeout);
    }
    let open_gauge = state
        .metrics
        .connections_open
        .get_or_create(&ListenerLabel { listener: "http" })
        .clone();
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Caps are on the TCP peer: forwarding headers are not read yet (and a proxy's
        // connections are many clients', which is what max_connections_per_ip allows for).
        let slot = match conns.try_acquire(remote.ip()) {
            Ok(s) => s,
            Err(why) => {
                state
                    .metrics
                    .connections_refused
                    .get_or_create(&ConnLabel {
                        listener: "http",
                        reason: why.reason(),
                    })
                    .inc();
                // Refused cheaply: closed right here, nothing spawned or buffered.
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let st = state.clone();
        let act = activity.clone();
        let svc = hyper::service::service_fn(move |req| {
            let st = st.clone();
            let in_flight = act.begin();
            async move {
                let r = handle(&st, req, remote).await;
                drop(in_flight);
                Ok::<_, Infallible>(r)
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let metrics = state.metrics.clone();
        let gauge = open_gauge.clone();
        let mut stop = shutdown.clone();
        gauge.inc();
        tokio::spawn(async move {
            let _slot = slot;
            let mut conn = std::pin::pin!(conn);
            // The watchdog: a connection that sends no complete request in time is dropped
            // (which cuts it); one with none for `idle_timeout` after the last is closed
            // gracefully (HTTP/2: a GOAWAY, so a request the client sent before it saw it
            // is still answered; HTTP/1: closed between requests), as on shutdown. This
            // also covers what hyper's own timers do not: protocol detection, an h2c
            // connection that only sent its preface, HTTP/2 without streams.
            let bound = loop {
                let (at, _) = activity.deadline(header_read_timeout, idle_timeout);
                tokio::select! {
                    _ = conn.as_mut() => break None,
                    // A request began or ended: the deadline moved.
                    _ = activity.changed() => {}
                    r = stop.changed() => {
                        if r.is_err() || *stop.borrow() {
                            break Some(DRAIN);
                        }
                    }
                    _ = tokio::time::sleep_until(at) => {
                        // Look again: a request may have started or ended meanwhile.
                        let (at, why) = activity.deadline(header_read_timeout, idle_timeout);
                        if let Some(why) = why.filter(|_| at <= tokio::time::Instant::now()) {
                            metrics
                                .connections_closed
                                .get_or_create(&ConnLabel { listener: "http", reason: why.reason() })
                                .inc();
                            break (why == conn::Expired::Idle).then_some(close_grace);
                        }
                    }
                }
            };
            if let Some(bound) = bound {
                conn.as_mut().graceful_shutdown();
                // A shutdown during an idle close cuts its wait to the drain's.
                let closing = async {
                    tokio::select! {
                        _ = conn.as_mut() => true,
                        // The flag set, or its sender gone (an error): stopping either way.
                        // (Its `Ref` holds the channel's read lock: dropped at once.)
                        _ = async { drop(stop.wait_for(|&s| s).await) } => {
                            tokio::time::timeout(DRAIN, conn.as_mut()).await.is_ok()
                        }
                    }
                };
                if !tokio::time::timeout(bound, closing).await.unwrap_or(false) {
                    tracing::debug!("connection did not close gracefully in time; dropped");
                }
            }
            gauge.dec();
        });
    }
    drop(listener);
    // Every connection task saw the flip and is draining (each gives up after `DRAIN`).
    let deadline = tokio::time::Instant::now() + DRAIN;
    while conns.open() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("HTTP drain timed out; closing remaining connections");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long shutdown waits for open connections to finish their requests.
const DRAIN: Duration = Duration::from_secs(10);

/// The `Access-Control-Allow-Origin` value for a request's `Origin`, if allowed.
fn cors_origin(st: &HttpState, req: &Request<Incoming>) -> Option<HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    let o = origin.to_str().ok()?;
    if st.cors_origins.iter().any(|a| a == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    st.cors_origins
        .iter()
        .any(|a| a == o)
        .then(|| origin.clone())
}

async fn handle(st: &HttpState, req: Request<Incoming>, remote: SocketAddr) -> Resp {
    let path = req.uri().path().to_string();
    let cors = cors_origin(st, &req);
    let ip = st.trusted_proxies.client_ip(remote.ip(), req.headers());
    let (route, mut resp) = match (req.method(), path.as_str()) {
        (&Method::OPTIONS, "/v1/clicks") => ("preflight", preflight(cors.clone())),
        (&Method::POST, "/v1/clicks") => ("clicks", ingest(st, req, ip).await),
        (&Method::GET, p) if p.starts_with("/c/") => {
            let ua = st.ua_class(req.headers());
            ("redirect", redirect(st, &p[3..], ip, ua).await)
        }
        (&Method::GET, "/livez") => ("livez", text(StatusCode::OK, "ok\n")),
        (&Method::GET, "/readyz") => ("readyz", readiness(st)),
        (&Method::GET, "/healthz") => ("healthz", readiness(st)),
        (&Method::GET, "/metrics") => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, body) = st.metrics.expose(accept);
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            ("metrics", r)
        }
        (_, "/v1/clicks") => (
            "clicks",
            json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST /v1/clicks"),
        ),
        _ => (
            "other",
            json_error(
                StatusCode::NOT_FOUND,
                "not found: the collector serves POST /v1/clicks, GET /c/{token}, GET /livez, GET /readyz, GET /healthz, GET /metrics",
            ),
        ),
    };
    if let Some(origin) = cors {
        resp.headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        // So a page's fetch can honour our Retry-After on 429/503.
        resp.headers_mut().insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("retry-after"),
        );
    }
    st.metrics.request(route, resp.status().as_u16());
    resp
}

/// CORS preflight for `POST /v1/clicks` (browsers send one before a `fetch` with a
/// protobuf or JSON body). A disallowed origin gets 403 and no CORS headers.
fn preflight(origin: Option<HeaderValue>) -> Resp {
    if origin.is_none() {
        return text(StatusCode::FORBIDDEN, "origin not allowed (cors_origins)\n");
    }
    let mut r = text(StatusCode::NO_CONTENT, "");
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

/// Readiness: 200 `{"ready":true,"reasons":[]}` while clicks can be made durable, else
/// 503 with the reasons (`spool_failed`, `spool_full`) and a `Retry-After`.
fn readiness(st: &HttpState) -> Resp {
    let reasons = st.committer.not_ready_reasons();
    let ready = reasons.is_empty();
    let body = serde_json::json!({ "ready": ready, "reasons": reasons }).to_string();
    let mut r = text(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if !ready {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Proto,
    Json,
}

fn encoding_of(req: &Request<Incoming>) -> Option<Encoding> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/x-protobuf" | "application/protobuf" | "application/vnd.google.protobuf" => {
            Some(Encoding::Proto)
        }
        "application/json" => Some(Encoding::Json),
        // `navigator.sendBeacon` may only use CORS-safelisted types without a preflight:
        // the browser SDK's beacons carry the same protobuf bytes as text/plain.
        "text/plain" => Some(Encoding::Proto),
        _ => None,
    }
}

/// Reads the body within `limits.body_read_timeout_ms` (a whole-body deadline), holding
/// its size in the in-flight body budget; the permit is returned with the bytes and must
/// be kept until the decoded batch is gone.
async fn read_body(
    st: &HttpState,
    req: Request<Incoming>,
    ip: IpAddr,
) -> Result<(Bytes, BodyPermit), Resp> {
    let max = st.limits.max_body_bytes;
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body exceeds {max} bytes (limits.max_body_bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let deadline = tokio::time::Instant::now() + st.limits.body_read_timeout();
    let reserve = declared.map_or(max, |n| n as usize);
    let Some(permit) = st.reserve_body(ip, reserve) else {
        let mut r = json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many request bodies in flight (limits.max_inflight_body_bytes, or this \
             address's share: limits.max_inflight_body_bytes_per_ip)",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(r);
    };
    let collect = Limited::new(req.into_body(), reserve).collect();
    match tokio::time::timeout_at(deadline, collect).await {
        Err(_) => Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time (limits.body_read_timeout_ms)",
        )),
        Ok(Ok(b)) => Ok((b.to_bytes(), permit)),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(if declared.is_some() {
                json_error(
                    StatusCode::BAD_REQUEST,
                    "request body longer than its Content-Length",
                )
            } else {
                too_large()
            })
        }
        Ok(Err(e)) => Err(json_error(
            StatusCode::BAD_REQUEST,
            &format!("could not read request body: {e}"),
        )),
    }
}

async fn ingest(st: &HttpState, req: Request<Incoming>, ip: IpAddr) -> Resp {
    if let Err(retry) = st.admit(ip) {
        return too_many(retry);
    }
    // Read before the body consumes the request; one class for the whole batch.
    let ua_class = st.ua_class(req.headers());
    let Some(enc) = encoding_of(&req) else {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/x-protobuf, application/json, or text/plain (protobuf from a beacon)",
        );
    };
    let (body, _budget) = match read_body(st, req, ip).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let received_at_ms = now_ms();
    let max_clicks = st.limits.max_clicks_per_batch;
    // The clicks borrow from the body (protobuf) until they are processed.
    let batch = match enc {
        Encoding::Proto => decode::decode_batch(&body, max_clicks),
        Encoding::Json => {
            json::parse_batch(&body, received_at_ms, max_clicks).map(decode::Decoded::Owned)
        }
    };
    let batch = match batch {
        Ok(b) => b,
        Err(e @ BatchDecodeError::TooManyClicks { .. }) => {
            return json_error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string());
        }
        Err(BatchDecodeError::Malformed(msg)) => {
            st.metrics.add_clicks("malformed_batch", 1);
            return json_error(
                StatusCode::BAD_REQUEST,
                &if enc == Encoding::Proto {
                    format!("body is not a protobuf ClickBatch: {msg}")
                } else {
                    msg
                },
            );
        }
    };
    if let Err(retry) = st.charge_clicks(ip, batch.len()) {
        return too_many(retry);
    }
    let ctx = RequestCtx {
        received_at_ms,
        client_ip: Some(ip),
        ua_class,
    };
    let processed = match record_batch(st, &batch.clicks(), &ctx).await {
        Ok(p) => p,
        Err(BatchRefused::TooLarge(msg)) => return json_error(StatusCode::PAYLOAD_TOO_LARGE, &msg),
        Err(BatchRefused::Unavailable(e)) => return unavailable(&e),
    };
    let result = processed.result();
    let (body, ct) = match enc {
        Encoding::Proto => (
            Bytes::from(result.encode_to_vec()),
            "application/x-protobuf",
        ),
        Encoding::Json => (
            Bytes::from(json::render_result(&result)),
            "application/json",
        ),
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = StatusCode::ACCEPTED;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

/// Why a decoded batch was not recorded.
#[derive(Debug)]
pub enum BatchRefused {
    /// More clicks than `limits.max_clicks_per_batch` (413); the message says so.
    TooLarge(String),
    /// The commit failed (503).
    Unavailable(CommitError),
}

/// The batch policy shared by every transport (HTTP, QUIC): the batch-size limit, then
/// [`record`].
pub async fn record_batch(
    st: &HttpState,
    clicks: &[ClickRef<'_>],
    ctx: &RequestCtx,
) -> Result<Processed, BatchRefused> {
    let max = st.limits.max_clicks_per_batch;
    if clicks.len() > max {
        return Err(BatchRefused::TooLarge(format!(
            "batch has {} clicks, more than the {max} allowed (limits.max_clicks_per_batch)",
            clicks.len()
        )));
    }
    record(st, clicks, ctx)
        .await
        .map_err(BatchRefused::Unavailable)
}

/// Processes clicks, quarantines rejections and makes the accepted ones durable. The
/// shared path of batches, redirects and QUIC.
pub async fn record(
    st: &HttpState,
    clicks: &[ClickRef<'_>],
    ctx: &RequestCtx,
) -> Result<Processed, CommitError> {
    let mut processed = st.processor.process(clicks, ctx);
    if !processed.rejected.is_empty() {
        st.quarantine.record(
            ctx.received_at_ms,
            ctx.client_ip,
            processed.rejected.clone(),
        );
    }
    if processed.accepted() == 0 {
        return Ok(processed);
    }
    // The writer commits what it was handed even when the client goes away and this
    // future is dropped at the await (a reset stream, an SDK shutting down): the dedup
    // bookkeeping and the `accepted` count must follow the commit, not the request, or the
    // ids would stay pending forever and a click written and forwarded would never be
    // counted as accepted. So the commit and its outcome run in a task of their own.
    let encoded = processed.take_encoded();
    let (processor, committer, metrics) = (
        st.processor.clone(),
        st.committer.clone(),
        st.metrics.clone(),
    );
    let outcome = tokio::spawn(async move {
        let n = processed.accepted();
        match committer.commit(encoded, n).await {
            Ok(_seq) => {
                processor.committed(&processed);
                Ok(processed)
            }
            Err(e) => {
                processor.release(&processed);
                metrics.add_clicks("spool_unavailable", n as u64);
                Err(e)
            }
        }
    });
    outcome.await.unwrap_or_else(|e| {
        // Only a panic in the task (a bug) gets here: nothing was acknowledged.
        tracing::error!(error = %e, "commit task failed");
        Err(CommitError::Disk(format!("commit task failed: {e}")))
    })
}

async fn redirect(st: &HttpState, token: &str, ip: IpAddr, ua_class: v1::UserAgentClass) -> Resp {
    let started = Instant::now();
    // A redirect is one click for the rate limit; a limited visitor is not redirected
    // (a 429 is cheaper than verifying and spooling a flood).
    if let Err(retry) = st.admit(ip) {
        st.metrics.add_clicks("rate_limited", 1);
        return too_many(retry);
    }
    let now = now_ms();
    let click = v1::Click {
        token: token.to_string(),
        occurred_at_ms: now,
        sent_at_ms: now,
        ..Default::default()
    };
    // The landing URL comes only from a token that verifies; nothing else can redirect.
    let landing = st
        .processor
        .landing_url(token, now)
        .map_err(|e| (e.reason(), e.to_string()));
    let resp = match landing {
        Err((reason, detail)) => {
            let status = match reason {
                "malformed" => StatusCode::BAD_REQUEST,
                "expired" | "not_yet_valid" => StatusCode::GONE,
                _ => StatusCode::FORBIDDEN,
            };
            // Counted and quarantined through the same path as batch clicks.
            let ctx = RequestCtx {
                received_at_ms: now,
                client_ip: Some(ip),
                ua_class,
            };
            let _ = record(st, &[ClickRef::from(&click)], &ctx).await;
            text(status, format!("invalid ad link ({reason}): {detail}\n"))
        }
        Ok(url) => {
            let ctx = RequestCtx {
                received_at_ms: now,
                client_ip: Some(ip),
                ua_class,
            };
            if let Err(e) = record(st, &[ClickRef::from(&click)], &ctx).await {
                // The visitor still reaches the advertiser; the click is counted as
                // `spool_unavailable` instead of billed.
                tracing::warn!(error = %e, "redirect click not recorded");
            }
            match HeaderValue::from_str(&url) {
                Ok(loc) => {
                    let mut r = text(StatusCode::FOUND, "");
                    r.headers_mut().insert(header::LOCATION, loc);
                    r.headers_mut()
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    r
                }
                Err(_) => text(StatusCode::BAD_REQUEST, "invalid landing URL\n"),
            }
        }
    };
    st.metrics
        .redirect_seconds
        .observe(started.elapsed().as_secs_f64());
    resp
}
