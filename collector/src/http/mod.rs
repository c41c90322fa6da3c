//! The collector's HTTP front (hyper; HTTP/1.1 and h2c on one port):
//! `POST /v1/clicks` (protobuf or JSON `ClickBatch`), `GET /c/{token}` (record + 302),
//! `GET /healthz`, `GET /metrics`.
//!
//! Status codes: 202 only after the accepted clicks are fsynced; 400 malformed; 413 too
//! large; 415 unknown content type; 429 per-IP rate limit; 503 + `Retry-After` when the
//! spool is full or the disk failed. This module parses and answers; click logic is in
//! `ingest`, durability in `writer`.

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
use crate::ingest::{Processed, Processor, RequestCtx};
use crate::metrics::Metrics;
use crate::quarantine::Quarantine;
use crate::writer::{CommitError, Committer};
use ratelimit::RateLimiter;

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
        CommitError::Disk(_) | CommitError::Closed => 30,
    }
}

fn unavailable(e: &CommitError) -> Resp {
    let mut r = json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(e)));
    r
}

/// Serves HTTP on `listener` until `shutdown` flips, then drains in-flight requests (at
/// most 10 s).
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(state.limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
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
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        let svc = hyper::service::service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(handle(&st, req, remote).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = watched.await;
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("HTTP drain timed out; closing remaining connections");
        }
    }
}

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
    let (route, mut resp) = match (req.method(), path.as_str()) {
        (&Method::OPTIONS, "/v1/clicks") => ("preflight", preflight(cors.clone())),
        (&Method::POST, "/v1/clicks") => ("clicks", ingest(st, req, remote.ip()).await),
        (&Method::GET, p) if p.starts_with("/c/") => {
            ("redirect", redirect(st, &p[3..], remote.ip()).await)
        }
        (&Method::GET, "/healthz") => ("healthz", health(st)),
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, st.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
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
                "not found: the collector serves POST /v1/clicks, GET /c/{token}, GET /healthz, GET /metrics",
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

fn health(st: &HttpState) -> Resp {
    if st.committer.failed() {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: spool disk failure, restart required\n",
        )
    } else {
        text(StatusCode::OK, "ok\n")
    }
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

async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Resp> {
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
    match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(json_error(
            StatusCode::BAD_REQUEST,
            &format!("could not read request body: {e}"),
        )),
    }
}

async fn ingest(st: &HttpState, req: Request<Incoming>, ip: IpAddr) -> Resp {
    if !st.limiter.allow(ip, Instant::now()) {
        st.metrics.rate_limited.inc();
        let mut r = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded for this client",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let Some(enc) = encoding_of(&req) else {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/x-protobuf, application/json, or text/plain (protobuf from a beacon)",
        );
    };
    let body = match read_body(req, st.limits.max_body_bytes).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let received_at_ms = now_ms();
    let batch = match enc {
        Encoding::Proto => v1::ClickBatch::decode(body.as_ref())
            .map_err(|e| format!("body is not a protobuf ClickBatch: {e}")),
        Encoding::Json => json::parse_batch(&body, received_at_ms),
    };
    let batch = match batch {
        Ok(b) => b,
        Err(msg) => {
            st.metrics.add_clicks("malformed_batch", 1);
            return json_error(StatusCode::BAD_REQUEST, &msg);
        }
    };
    let ctx = RequestCtx {
        received_at_ms,
        client_ip: Some(ip),
    };
    let processed = match record_batch(st, batch.clicks, &ctx).await {
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
    clicks: Vec<v1::Click>,
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
    clicks: Vec<v1::Click>,
    ctx: &RequestCtx,
) -> Result<Processed, CommitError> {
    let processed = st.processor.process(clicks, ctx);
    st.quarantine.record(
        ctx.received_at_ms,
        ctx.client_ip,
        processed.rejected.clone(),
    );
    if !processed.accepted.is_empty() {
        let encoded = processed.encode_accepted();
        if let Err(e) = st.committer.commit(encoded, processed.accepted.len()).await {
            st.processor.release(&processed);
            st.metrics
                .add_clicks("spool_unavailable", processed.accepted.len() as u64);
            return Err(e);
        }
        st.processor.committed(&processed);
    }
    Ok(processed)
}

async fn redirect(st: &HttpState, token: &str, ip: IpAddr) -> Resp {
    let started = Instant::now();
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
            };
            let _ = record(st, vec![click], &ctx).await;
            text(status, format!("invalid ad link ({reason}): {detail}\n"))
        }
        Ok(url) => {
            let ctx = RequestCtx {
                received_at_ms: now,
                client_ip: Some(ip),
            };
            if let Err(e) = record(st, vec![click], &ctx).await {
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
