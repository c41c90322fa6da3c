//! The HTTP side of the aggregator: a JSON mirror of the two queries for curl and
//! dashboards, plus `/healthz` and `/metrics`. Same authorisation and query code as gRPC.
//!
//! `GET /v1/ads/{id}/clicks?last_minutes=60&granularity=minute&country=US`
//! `GET /v1/ads/{id}/clicks?from_ms=..&to_ms=..&granularity=hour`
//! `GET /v1/ads/top?n=10&last_minutes=60&device=mobile`
//! Filters (repeatable): country, device (desktop|mobile|tablet|other), os, site,
//! advertiser, campaign. Header: `Authorization: Bearer <key>`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use adclick_proto::v1::{self, Granularity};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::grpc::Query;
use crate::query::{self, QueryError};

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

/// Serves until `shutdown` flips.
pub async fn serve(listener: TcpListener, q: Arc<Query>, mut shutdown: watch::Receiver<bool>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let q = q.clone();
        let svc = hyper::service::service_fn(move |req| {
            let q = q.clone();
            async move { Ok::<_, Infallible>(handle(&q, req)) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(graceful.watch(conn));
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
}

fn handle<B>(q: &Query, req: Request<B>) -> Resp {
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/healthz" => return reply(StatusCode::OK, "ok\n".into(), "text/plain; charset=utf-8"),
        "/metrics" => {
            return reply(
                StatusCode::OK,
                q.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            );
        }
        _ => {}
    }
    let params: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|s| form_urlencoded::parse(s.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = match query::authorize(&q.keys, auth) {
        Ok(c) => c,
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
                "ad id {id:?} is not a number"
            ))),
        }
    } else {
        return error(
            StatusCode::NOT_FOUND,
            "not found: GET /v1/ads/{id}/clicks, GET /v1/ads/top, /healthz, /metrics",
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
            v.parse::<T>()
                .map_err(|_| QueryError::InvalidArgument(format!("{k}={v:?} is not a number")))
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
            _ => return Err(QueryError::InvalidArgument(format!("unknown device {d:?}"))),
        } as i32);
    }
    for (k, dst) in [
        ("advertiser", &mut f.advertiser_id),
        ("campaign", &mut f.campaign_id),
    ] {
        for v in all(k) {
            dst.push(
                v.parse().map_err(|_| {
                    QueryError::InvalidArgument(format!("{k}={v:?} is not a number"))
                })?,
            );
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
            query::now_ms(),
        ),
        (None, Some(f), Some(t)) => Ok((f, t)),
        _ => Err(QueryError::InvalidArgument(
            "give last_minutes, or from_ms and to_ms".into(),
        )),
    }
}

fn clicks(
    q: &Query,
    caller: query::Caller,
    ad: u64,
    p: &[(String, String)],
) -> Result<Value, QueryError> {
    let granularity = match get(p, "granularity").unwrap_or("minute") {
        "minute" => Granularity::Minute,
        "hour" => Granularity::Hour,
        "day" => Granularity::Day,
        g => {
            return Err(QueryError::InvalidArgument(format!(
                "unknown granularity {g:?}: minute, hour or day"
            )));
        }
    };
    let (from_ms, to_ms) = range(p)?;
    let req = v1::GetAdClicksRequest {
        ad_id: ad,
        from_ms,
        to_ms,
        granularity: granularity as i32,
        filter: Some(filter(p)?),
    };
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

fn top(q: &Query, caller: query::Caller, p: &[(String, String)]) -> Result<Value, QueryError> {
    let (from_ms, to_ms) = range(p)?;
    let req = v1::TopAdsRequest {
        n: num::<u32>(p, "n")?.unwrap_or(10),
        window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
            from_ms,
            to_ms,
        })),
        filter: Some(filter(p)?),
    };
    let r = query::top_ads(&q.view, caller, &req, &q.cfg, query::now_ms())?;
    let range = r.range.unwrap_or_default();
    Ok(json!({
        "ads": r.ads.iter().map(|a| json!({"ad_id": a.ad_id, "clicks": a.clicks})).collect::<Vec<_>>(),
        "from_ms": range.from_ms,
        "to_ms": range.to_ms,
        "watermark_ms": r.watermark_ms,
    }))
}
