//! Issue 14, item 1: every field of every query request is validated, against the real
//! server. Over gRPC an invalid request is INVALID_ARGUMENT whose details decode to a
//! `google.rpc.BadRequest` naming each field (`filter.country[0]`) with a reason code; over
//! HTTP it is a 400 `application/problem+json` (RFC 9457) naming each parameter. Never a
//! 200 with a guess. Errors that are not validation keep their codes.

use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{
    Device, Filter, GetAdClicksRequest, Granularity, TimeRange, TopAdsRequest,
    top_ads_request::Window,
};
use adclick_test_support::aggregator::{ADMIN, T0};
use adclick_test_support::common::{HOUR, MIN, authed, now_ms};
use serde_json::Value;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::util::*;

const DAY: i64 = 86_400_000;
const PROBLEM: &str = "https://example.invalid/adclick/invalid-request";

/// `(field, reason)` of each violation in an INVALID_ARGUMENT status's BadRequest.
pub fn violations(s: &tonic::Status) -> Vec<(String, String)> {
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    let details = s.get_error_details();
    let bad = details
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {s:?}"));
    for v in &bad.field_violations {
        assert!(!v.description.is_empty(), "{v:?}");
    }
    bad.field_violations
        .iter()
        .map(|v| (v.field.clone(), v.reason.clone()))
        .collect()
}

fn one(field: &str, reason: &str) -> Vec<(String, String)> {
    vec![(field.into(), reason.into())]
}

async fn clicks_err(q: &mut QueryServiceClient<Channel>, req: GetAdClicksRequest) -> tonic::Status {
    q.get_ad_clicks(authed(req, ADMIN)).await.unwrap_err()
}

async fn top_err(q: &mut QueryServiceClient<Channel>, req: TopAdsRequest) -> tonic::Status {
    q.top_ads(authed(req, ADMIN)).await.unwrap_err()
}

fn filter(f: impl FnOnce(&mut Filter)) -> Option<Filter> {
    let mut x = Filter::default();
    f(&mut x);
    Some(x)
}

fn clicks_req(
    from_ms: i64,
    to_ms: i64,
    g: Granularity,
    filter: Option<Filter>,
) -> GetAdClicksRequest {
    GetAdClicksRequest {
        fill_empty: None,
        ad_id: 1,
        from_ms,
        to_ms,
        granularity: g as i32,
        filter,
        ..Default::default()
    }
}

fn top_req(n: u32, window: Option<Window>, filter: Option<Filter>) -> TopAdsRequest {
    TopAdsRequest {
        n,
        window,
        filter,
        ..Default::default()
    }
}

fn range(from_ms: i64, to_ms: i64) -> Option<Window> {
    Some(Window::Range(TimeRange { from_ms, to_ms }))
}

/// Every filter rule, on both RPCs: the issue's two examples first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_invalid_filters_are_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let all = clicks(21, 2000, 30, 10, 50);
    send(&mut ing, "c", 1, all.clone()).await;
    let (from, to) = (T0, T0 + 10 * MIN);

    let cases: Vec<(Option<Filter>, &str, &str)> = vec![
        // The issue's examples: each was a 200 with zero or partial counts.
        (
            filter(|f| f.country = vec!["USA".into()]),
            "filter.country[0]",
            "MALFORMED",
        ),
        (
            filter(|f| f.country = vec!["US,DE".into()]),
            "filter.country[0]",
            "MALFORMED",
        ),
        (
            filter(|f| f.country = vec!["US".into(), "U1".into()]),
            "filter.country[1]",
            "MALFORMED",
        ),
        (
            filter(|f| f.country = vec!["DE".into(), String::new()]),
            "filter.country[1]",
            "REQUIRED",
        ),
        (
            filter(|f| f.country = vec!["XX".into()]),
            "filter.country[0]",
            "UNKNOWN_VALUE",
        ),
        (
            filter(|f| f.country = vec!["US".into(); 65]),
            "filter.country",
            "TOO_MANY_VALUES",
        ),
        (
            filter(|f| f.device = vec![Device::Unspecified as i32]),
            "filter.device[0]",
            "UNKNOWN_VALUE",
        ),
        (
            filter(|f| f.device = vec![2, 9]),
            "filter.device[1]",
            "UNKNOWN_VALUE",
        ),
        (
            filter(|f| f.os = vec![String::new()]),
            "filter.os[0]",
            "REQUIRED",
        ),
        (
            filter(|f| f.os = vec!["x".repeat(257)]),
            "filter.os[0]",
            "TOO_LONG",
        ),
        (
            filter(|f| f.site = vec!["news.example\r\n".into()]),
            "filter.site[0]",
            "MALFORMED",
        ),
        (
            filter(|f| f.advertiser_id = vec![1, 0]),
            "filter.advertiser_id[1]",
            "OUT_OF_RANGE",
        ),
        (
            filter(|f| f.campaign_id = vec![0]),
            "filter.campaign_id[0]",
            "OUT_OF_RANGE",
        ),
    ];
    for (f, field, reason) in cases {
        let e = top_err(&mut q, top_req(5, range(from, to), f.clone())).await;
        assert_eq!(violations(&e), one(field, reason), "TopAds {f:?}");
        let e = clicks_err(&mut q, clicks_req(from, to, Granularity::Minute, f.clone())).await;
        assert_eq!(violations(&e), one(field, reason), "GetAdClicks {f:?}");
        // An advertiser key is validated the same way.
        let e = q
            .top_ads(authed(top_req(5, range(from, to), f.clone()), ADV1))
            .await
            .unwrap_err();
        assert_eq!(
            violations(&e),
            one(field, reason),
            "TopAds as advertiser {f:?}"
        );
    }

    // Lower case is upper-cased, not refused: the same answer as "US".
    let lower = top(
        &mut q,
        ADMIN,
        5,
        from,
        to,
        filter(|f| f.country = vec!["us".into()]),
    )
    .await;
    assert_eq!(lower, top_oracle(&all, 5, from, to, |c| c.country == "US"));
    assert!(!lower.is_empty());
    let r = q
        .get_ad_clicks(authed(
            clicks_req(
                from,
                to,
                Granularity::Hour,
                filter(|f| f.country = vec!["de".into(), "XK".into()]),
            ),
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.total_clicks,
        all.iter()
            .filter(|c| c.ad_id == 1 && c.country == "DE")
            .count() as u64
    );

    // Several problems: every one is named, in request order.
    let e = clicks_err(
        &mut q,
        GetAdClicksRequest {
            fill_empty: None,
            ad_id: 0,
            from_ms: to,
            to_ms: from,
            granularity: 9,
            filter: filter(|f| {
                f.country = vec!["USA".into(), "US".into(), "EU".into()];
                f.device = vec![0];
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        violations(&e),
        [
            ("ad_id", "REQUIRED"),
            ("granularity", "UNKNOWN_VALUE"),
            ("to_ms", "EMPTY_RANGE"),
            ("filter.country[0]", "MALFORMED"),
            ("filter.country[2]", "UNKNOWN_VALUE"),
            ("filter.device[0]", "UNKNOWN_VALUE"),
        ]
        .map(|(f, r)| (f.to_string(), r.to_string()))
    );
    // The message lists the first three.
    assert!(
        e.message().contains("ad_id: ") && e.message().ends_with("(and 3 more)"),
        "{}",
        e.message()
    );

    // The most a request can do wrong: 64 values with the longest descriptions each. The
    // first 20 are reported (they fit the trailers), the message says how many there were.
    let worst = "\"\u{1},".repeat(40);
    let e = top_err(
        &mut q,
        top_req(0, None, filter(|f| f.country = vec![worst.clone(); 64])),
    )
    .await;
    let v = violations(&e);
    assert_eq!(v.len(), 20, "{v:?}");
    assert_eq!(v[0], ("n".to_string(), "OUT_OF_RANGE".to_string()));
    assert_eq!(
        v[2],
        ("filter.country[0]".to_string(), "MALFORMED".to_string())
    );
    assert!(e.message().ends_with("(and 63 more)"), "{}", e.message());

    // Not validation: a missing or wrong key is still UNAUTHENTICATED, whatever the body.
    let bad = top_req(0, None, filter(|f| f.country = vec!["USA".into()]));
    let e = q
        .top_ads(tonic::Request::new(bad.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = q
        .top_ads(authed(bad, "wrong-key-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    a.shutdown().await;
}

/// `n`, the window, time bounds, order, length, retention and granularity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_invalid_numbers_and_ranges_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;

    // Before any click the watermark says nothing was evicted, so only the bucket count
    // bounds a long minute range: 8 days of minutes is 11,520 buckets (at most 10,000).
    let e = clicks_err(
        &mut q,
        clicks_req(T0, T0 + 8 * DAY, Granularity::Minute, None),
    )
    .await;
    assert_eq!(violations(&e), one("granularity", "TOO_MANY_BUCKETS"));
    assert!(
        q.get_ad_clicks(authed(
            clicks_req(T0, T0 + 8 * DAY, Granularity::Hour, None),
            ADMIN
        ))
        .await
        .is_ok()
    );

    // Clicks over T0 .. T0+10 min: the watermark is about T0 + 10 min.
    let all = clicks(22, 500, 10, 10, 20);
    send(&mut ing, "c", 1, all.clone()).await;

    for n in [0, 10_001] {
        let e = top_err(&mut q, top_req(n, Some(Window::LastMinutes(5)), None)).await;
        assert_eq!(violations(&e), one("n", "OUT_OF_RANGE"), "n = {n}");
        assert!(
            e.message().contains("n must be between 1 and 10000"),
            "{}",
            e.message()
        );
    }
    let ok = top(&mut q, ADMIN, 10_000, T0, T0 + 10 * MIN, None).await;
    assert_eq!(ok, top_oracle(&all, 10_000, T0, T0 + 10 * MIN, |_| true));

    let e = top_err(&mut q, top_req(5, None, None)).await;
    assert_eq!(violations(&e), one("window", "REQUIRED"));
    let e = top_err(&mut q, top_req(5, Some(Window::LastMinutes(0)), None)).await;
    assert_eq!(violations(&e), one("last_minutes", "OUT_OF_RANGE"));

    let m = Granularity::Minute;
    let cases = [
        // Seconds instead of ms, and before 2000.
        (
            clicks_req(T0 / 1000, T0 / 1000 + 600, m, None),
            vec![("from_ms", "OUT_OF_RANGE"), ("to_ms", "OUT_OF_RANGE")],
        ),
        (
            clicks_req(0, T0, m, None),
            vec![("from_ms", "OUT_OF_RANGE")],
        ),
        (
            clicks_req(T0, i64::MAX, m, None),
            vec![("to_ms", "OUT_OF_RANGE")],
        ),
        (
            clicks_req(T0 + MIN, T0, m, None),
            vec![("to_ms", "EMPTY_RANGE")],
        ),
        (clicks_req(T0, T0, m, None), vec![("to_ms", "EMPTY_RANGE")]),
        (
            clicks_req(T0, T0 + 401 * DAY, Granularity::Day, None),
            vec![("to_ms", "RANGE_TOO_LONG")],
        ),
        // Minutes are kept 48 h behind the watermark, hours 31 days.
        (
            clicks_req(T0 - 3 * DAY, T0 + HOUR, m, None),
            vec![("from_ms", "BEFORE_RETENTION")],
        ),
        (
            clicks_req(T0 - 40 * DAY, T0 + HOUR, Granularity::Hour, None),
            vec![("from_ms", "BEFORE_RETENTION")],
        ),
        (
            GetAdClicksRequest {
                fill_empty: None,
                granularity: 4,
                ..clicks_req(T0, T0 + HOUR, m, None)
            },
            vec![("granularity", "UNKNOWN_VALUE")],
        ),
    ];
    for (req, want) in cases {
        let want: Vec<(String, String)> = want
            .into_iter()
            .map(|(f, r)| (f.into(), r.into()))
            .collect();
        let e = clicks_err(&mut q, req.clone()).await;
        assert_eq!(violations(&e), want, "{req:?}");
    }
    // The range refused at minute granularity is answered at hour and day granularity,
    // with every click (none was lost to the minute retention).
    for g in [Granularity::Hour, Granularity::Day] {
        let r = q
            .get_ad_clicks(authed(clicks_req(T0 - 3 * DAY, T0 + HOUR, g, None), ADMIN))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.total_clicks,
            all.iter().filter(|c| c.ad_id == 1).count() as u64
        );
    }

    // TopAds adds minute buckets: its range must start within the minute retention.
    for (window, field, reason) in [
        (
            range(T0 - 3 * DAY, T0 + HOUR),
            "range.from_ms",
            "BEFORE_RETENTION",
        ),
        (range(T0 + HOUR, T0), "range.to_ms", "EMPTY_RANGE"),
        (range(T0 / 1000, T0), "range.from_ms", "OUT_OF_RANGE"),
    ] {
        let e = top_err(&mut q, top_req(5, window, None)).await;
        assert_eq!(violations(&e), one(field, reason), "{window:?}");
    }
    let m = a.metrics().render();
    assert!(
        m.contains(r#"adclick_aggregator_queries_refused_total{rpc="GetAdClicks",reason="before_retention"} 2"#),
        "{m}"
    );
    a.shutdown().await;
}

/// `last_minutes` counts back from now: with clicks at now, a window longer than the
/// minute retention (48 h) is refused rather than answered with 48 h of counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_last_minutes_beyond_the_minute_retention_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let now = now_ms();
    let mut cs = clicks(23, 50, 5, 1, 10);
    for c in &mut cs {
        c.event_time_ms = now - 30_000;
        c.received_at_ms = now;
        c.token_expires_at_ms = now + HOUR;
    }
    send(&mut ing, "c", 1, cs.clone()).await;
    let got = q
        .top_ads(authed(
            top_req(10, Some(Window::LastMinutes(60)), None),
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.ads.iter().map(|a| a.clicks).sum::<u64>(),
        cs.len() as u64
    );
    // 2,883 minutes start at least a minute before the oldest minute kept (the watermark
    // trails now by 40 s here).
    for m in [2 * 1440 + 3, 7 * 1440] {
        let e = top_err(&mut q, top_req(10, Some(Window::LastMinutes(m)), None)).await;
        assert_eq!(
            violations(&e),
            one("last_minutes", "BEFORE_RETENTION"),
            "{m}"
        );
    }
    // The HTTP mirror: the same, named last_minutes; at hour granularity it is answered.
    let h = Http::new(&a);
    let got = h.invalid("/v1/ads/1/clicks?last_minutes=4000").await;
    assert_eq!(got, one("last_minutes", "BEFORE_RETENTION"));
    let got = h.invalid("/v1/ads/top?last_minutes=4000").await;
    assert_eq!(got, one("last_minutes", "BEFORE_RETENTION"));
    let (status, _, v) = h
        .get(
            "/v1/ads/1/clicks?last_minutes=4000&granularity=hour",
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["total_clicks"].as_u64(),
        Some(cs.iter().filter(|c| c.ad_id == 1).count() as u64)
    );
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// HTTP

pub struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    pub fn new(a: &adclick_aggregator::Aggregator) -> Self {
        adclick_sdk::HttpTransport::install_crypto_provider();
        Http {
            client: reqwest::Client::new(),
            base: format!("http://{}", a.http_addr()),
        }
    }

    /// Status, content type and body (JSON) of `GET path` with `key`.
    pub async fn get(&self, path: &str, key: Option<&str>) -> (u16, String, Value) {
        let mut r = self.client.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = r.text().await.unwrap();
        let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        (status, ct, v)
    }

    /// Asserts an RFC 9457 invalid-request problem; `(name, code)` of each parameter.
    async fn invalid(&self, path: &str) -> Vec<(String, String)> {
        let (status, ct, v) = self.get(path, Some(ADMIN)).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(ct, "application/problem+json", "{path}");
        assert_eq!(v["type"], PROBLEM, "{path}: {v}");
        assert_eq!(v["status"], 400, "{path}: {v}");
        assert_eq!(v["title"], "Invalid request", "{path}: {v}");
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
        v["invalid_params"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: {v}"))
            .iter()
            .map(|p| {
                assert!(p["reason"].as_str().is_some_and(|r| !r.is_empty()), "{p}");
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["code"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_invalid_requests_are_400_problems_naming_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, _) = clients(&a).await;
    let all = clicks(24, 1000, 20, 10, 50);
    send(&mut ing, "c", 1, all.clone()).await;
    let h = Http::new(&a);
    let r = format!("from_ms={T0}&to_ms={}", T0 + 10 * MIN);
    let top = |q: &str| format!("/v1/ads/top?{r}&{q}");
    let clicks = |q: &str| format!("/v1/ads/2/clicks?{r}&{q}");

    for (path, name, code) in [
        // The issue's examples.
        (top("country=USA"), "country", "MALFORMED"),
        (top("country=US,DE"), "country", "MALFORMED"),
        (clicks("country=USA"), "country", "MALFORMED"),
        (clicks("country=US%2CDE"), "country", "MALFORMED"),
        (top("country=US&country=U1"), "country", "MALFORMED"),
        (top("country="), "country", "REQUIRED"),
        (top("country=XX"), "country", "UNKNOWN_VALUE"),
        (top("device=toaster"), "device", "UNKNOWN_VALUE"),
        (top("os="), "os", "REQUIRED"),
        (
            top(&format!("site={}", "s".repeat(300))),
            "site",
            "TOO_LONG",
        ),
        (top("site=a%00b"), "site", "MALFORMED"),
        (top("advertiser=0"), "advertiser", "OUT_OF_RANGE"),
        (top("campaign=-1"), "campaign", "MALFORMED"),
        (top("n=0"), "n", "OUT_OF_RANGE"),
        (top("n=10001"), "n", "OUT_OF_RANGE"),
        (top("n=ten"), "n", "MALFORMED"),
        // Unknown and repeated parameters.
        (top("coutnry=US"), "coutnry", "UNKNOWN_PARAMETER"),
        (top("granularity=hour"), "granularity", "UNKNOWN_PARAMETER"),
        (clicks("n=5"), "n", "UNKNOWN_PARAMETER"),
        (top("n=3&n=4"), "n", "REPEATED_PARAMETER"),
        (
            clicks("granularity=hour&granularity=day"),
            "granularity",
            "REPEATED_PARAMETER",
        ),
        (
            format!("/v1/ads/top?{r}&to_ms=1"),
            "to_ms",
            "REPEATED_PARAMETER",
        ),
        // Ranges.
        ("/v1/ads/top?n=5".into(), "last_minutes", "REQUIRED"),
        (
            "/v1/ads/top?last_minutes=0".into(),
            "last_minutes",
            "OUT_OF_RANGE",
        ),
        (
            "/v1/ads/top?last_minutes=5&from_ms=1".into(),
            "from_ms",
            "CONFLICT",
        ),
        (format!("/v1/ads/top?from_ms={T0}"), "to_ms", "REQUIRED"),
        (
            format!("/v1/ads/top?from_ms={}&to_ms={T0}", T0 + MIN),
            "to_ms",
            "EMPTY_RANGE",
        ),
        (
            format!("/v1/ads/top?from_ms={}&to_ms={T0}", T0 - 3 * DAY),
            "from_ms",
            "BEFORE_RETENTION",
        ),
        (
            format!("/v1/ads/2/clicks?from_ms={}&to_ms={T0}", T0 - 3 * DAY),
            "from_ms",
            "BEFORE_RETENTION",
        ),
        (clicks("granularity=week"), "granularity", "UNKNOWN_VALUE"),
        // The ad id in the path.
        (format!("/v1/ads/0/clicks?{r}"), "ad_id", "REQUIRED"),
        (format!("/v1/ads/x/clicks?{r}"), "ad_id", "MALFORMED"),
    ] {
        let got = h.invalid(&path).await;
        assert_eq!(got, one(name, code), "{path}");
    }
    // Seconds instead of ms: both ends named.
    let got = h
        .invalid(&format!(
            "/v1/ads/2/clicks?from_ms={}&to_ms={}",
            T0 / 1000,
            T0 / 1000 + 60
        ))
        .await;
    assert_eq!(
        got,
        [("from_ms", "OUT_OF_RANGE"), ("to_ms", "OUT_OF_RANGE")]
            .map(|(n, c)| (n.to_string(), c.to_string()))
    );
    // Several problems at once, every one named.
    let got = h
        .invalid(&top("country=USA&device=toaster&n=0&colour=red"))
        .await;
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["colour", "device"],
        "parameter errors first: {got:?}"
    );
    let got = h.invalid(&top("country=USA&country=XX&n=0")).await;
    assert_eq!(
        got,
        [
            ("n", "OUT_OF_RANGE"),
            ("country", "MALFORMED"),
            ("country", "UNKNOWN_VALUE")
        ]
        .map(|(n, c)| (n.to_string(), c.to_string()))
    );

    // A range given as last_minutes is reported under that name (here it reaches before
    // the year 2000).
    let got = h.invalid("/v1/ads/2/clicks?last_minutes=4294967295").await;
    assert_eq!(got, one("last_minutes", "OUT_OF_RANGE"));

    // Valid requests still answer, lower-case countries normalised.
    let (status, ct, v) = h.get(&top("n=5&country=us&country=de"), Some(ADMIN)).await;
    assert_eq!((status, ct.as_str()), (200, "application/json"), "{v}");
    let got: Vec<(u64, u64)> = v["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["ad_id"].as_u64().unwrap(), a["clicks"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        got,
        top_oracle(&all, 5, T0, T0 + 10 * MIN, |c| c.country == "US"
            || c.country == "DE")
    );

    // Not validation: the status codes are kept (as about:blank problems).
    let (status, ct, v) = h.get(&top("country=USA"), None).await;
    assert_eq!((status, ct.as_str()), (401, "application/problem+json"));
    assert_eq!(
        (v["type"].as_str(), v["status"].as_u64()),
        (Some("about:blank"), Some(401))
    );
    let (status, _, v) = h.get("/v1/nothing", Some(ADMIN)).await;
    assert_eq!((status, v["status"].as_u64()), (404, Some(404)));

    let m = a.metrics().render();
    assert!(
        m.contains(
            r#"adclick_aggregator_queries_refused_total{rpc="TopAds",reason="unknown_parameter"} 3"#
        ),
        "{m}"
    );
    a.shutdown().await;
}

/// The same request refused over both front ends names the same field, each in its own
/// terms (`filter.country[0]` / `country`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_agree() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (_, mut q) = clients(&a).await;
    let h = Http::new(&a);
    let e = top_err(
        &mut q,
        top_req(
            5,
            Some(Window::LastMinutes(5)),
            filter(|f| f.country = vec!["USA".into()]),
        ),
    )
    .await;
    assert_eq!(violations(&e), one("filter.country[0]", "MALFORMED"));
    let got = h
        .invalid("/v1/ads/top?n=5&last_minutes=5&country=USA")
        .await;
    assert_eq!(got, one("country", "MALFORMED"));
    // Both say what was sent and what would do.
    let details = e.get_error_details();
    let grpc_text = &details.bad_request().unwrap().field_violations[0].description;
    assert!(
        grpc_text.contains("\"USA\"") && grpc_text.contains("alpha-2"),
        "{grpc_text}"
    );
    a.shutdown().await;
}
