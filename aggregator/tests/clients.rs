//! Clients where they are (issue 14 item 5): reflection v1 and v1alpha both list every
//! service including health; a browser's gRPC-Web request (HTTP/1.1, framed body, trailers
//! in the body) is answered, with the API key checked and scoped as over gRPC; CORS on the
//! HTTP mirror and gRPC-Web for configured origins only; per-key rate limits over gRPC
//! (RESOURCE_EXHAUSTED + RetryInfo) and HTTP (429 + Retry-After + problem).

use std::collections::HashMap;

use adclick_proto::v1::{self, GetAdClicksRequest, Granularity, TopAdsRequest};
use adclick_test_support::aggregator::{ADMIN, T0};
use adclick_test_support::common::{MIN, authed};
use prost::Message;
use tonic::transport::Channel;

use crate::util::*;

/// The services the aggregator serves: both reflection versions list exactly these (and
/// themselves).
const SERVICES: [&str; 4] = [
    "adclick.v1.QueryService",
    "adclick.v1.IngestService",
    "adclick.v1.AdminService",
    "grpc.health.v1.Health",
];

/// The services the query front serves (it fans out queries only).
const FRONT_SERVICES: [&str; 2] = ["adclick.v1.QueryService", "grpc.health.v1.Health"];

/// What reflection v1 and v1alpha list on `ch` (sorted), checking on the way that each
/// answers a descriptor for `symbol`.
async fn reflected(ch: Channel, symbol: &str) -> (Vec<String>, Vec<String>) {
    // v1
    let v1 = {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let reqs = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
            },
        ];
        let mut s = ServerReflectionClient::new(ch.clone())
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        let mut services = Vec::new();
        let mut files = 0;
        while let Some(r) = s.message().await.unwrap() {
            match r.message_response {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    services.extend(l.service.into_iter().map(|s| s.name))
                }
                Some(MessageResponse::FileDescriptorResponse(f)) => {
                    files += f.file_descriptor_proto.len()
                }
                other => panic!("v1: unexpected {other:?}"),
            }
        }
        assert!(files >= 1, "v1: no descriptor for {symbol}");
        services.sort();
        services
    };
    // v1alpha: the same questions.
    let v1alpha = {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let reqs = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
            },
        ];
        let mut s = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        let mut services = Vec::new();
        let mut files = 0;
        while let Some(r) = s.message().await.unwrap() {
            match r.message_response {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    services.extend(l.service.into_iter().map(|s| s.name))
                }
                Some(MessageResponse::FileDescriptorResponse(f)) => {
                    files += f.file_descriptor_proto.len()
                }
                other => panic!("v1alpha: unexpected {other:?}"),
            }
        }
        assert!(files >= 1, "v1alpha: no descriptor for {symbol}");
        services.sort();
        services
    };
    (v1, v1alpha)
}

/// `served` plus reflection `version`'s own service, sorted.
fn expected(served: &[&str], version: &str) -> Vec<String> {
    let mut v: Vec<String> = served.iter().map(|s| s.to_string()).collect();
    v.push(format!("grpc.reflection.{version}.ServerReflection"));
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_every_service_including_health() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let ch = Channel::from_shared(format!("http://{}", a.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (v1, v1alpha) = reflected(ch.clone(), "grpc.health.v1.Health").await;
    assert_eq!(v1, expected(&SERVICES, "v1"));
    assert_eq!(v1alpha, expected(&SERVICES, "v1alpha"));
    let (_, v1alpha) = reflected(ch, "adclick.v1.QueryService").await;
    assert_eq!(v1alpha, expected(&SERVICES, "v1alpha"));
    a.shutdown().await;
}

/// The query front lists only what it serves (not the shards' ingest and admin), and its
/// `/metrics` has the API's and its own metrics but none of an engine it does not run
/// (zeros there would read as a stalled aggregator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_reflects_and_exposes_only_what_it_serves() {
    use adclick_aggregator::front::{FrontConfig, ShardEndpoint};
    // A shard nobody listens on: the front starts anyway (not ready until it answers).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let front = adclick_aggregator::front::start(FrontConfig {
        listen_grpc: "127.0.0.1:0".parse().unwrap(),
        listen_http: "127.0.0.1:0".parse().unwrap(),
        partitions: 1,
        shards: vec![ShardEndpoint {
            name: "s0".into(),
            grpc: format!("http://{dead_addr}"),
            partitions: "0".into(),
        }],
        api_keys: config(std::path::Path::new("unused")).api_keys,
        ..Default::default()
    })
    .await
    .unwrap();
    let ch = Channel::from_shared(format!("http://{}", front.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (v1, v1alpha) = reflected(ch, "adclick.v1.QueryService").await;
    assert_eq!(v1, expected(&FRONT_SERVICES, "v1"));
    assert_eq!(v1alpha, expected(&FRONT_SERVICES, "v1alpha"));

    // A query without a key: refused by the front's API, which counts it.
    let refused = reqwest::get(format!("http://{}/v1/ads/top?n=5", front.http_addr()))
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let text = reqwest::get(format!("http://{}/metrics", front.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let names: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .filter(|n| n.starts_with("adclick_aggregator_"))
        .collect();
    for want in [
        "adclick_aggregator_query_seconds",
        "adclick_aggregator_queries_refused",
        "adclick_aggregator_connections",
        "adclick_aggregator_watch_streams",
        "adclick_aggregator_ready",
        "adclick_aggregator_front_shard_up",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "front /metrics lacks {want}: {names:?}"
        );
    }
    for engine in [
        "adclick_aggregator_clicks",
        "adclick_aggregator_wal_errors",
        "adclick_aggregator_checkpoint_seconds",
        "adclick_aggregator_dedup_entries",
        "adclick_aggregator_archive_rows",
        "adclick_aggregator_source_",
        "adclick_aggregator_reconcile_",
    ] {
        assert!(
            !names.iter().any(|n| n.starts_with(engine)),
            "front /metrics has the engine's {engine}: {names:?}"
        );
    }
    assert!(
        text.contains("component=\"query_front\""),
        "build info names the front: {text}"
    );
    front.shutdown().await;
}

/// One gRPC-Web answer, decoded.
#[derive(Debug)]
struct WebReply {
    http: u16,
    headers: reqwest::header::HeaderMap,
    messages: Vec<Vec<u8>>,
    trailers: HashMap<String, String>,
}

impl WebReply {
    /// grpc-status from the trailers frame, or from the headers (a trailers-only answer).
    fn grpc_status(&self) -> i32 {
        self.trailers
            .get("grpc-status")
            .cloned()
            .or_else(|| {
                self.headers
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string())
            })
            .expect("no grpc-status")
            .parse()
            .unwrap()
    }

    fn one<M: Message + Default>(&self) -> M {
        assert_eq!(self.grpc_status(), 0, "{self:?}");
        assert_eq!(self.messages.len(), 1, "{self:?}");
        M::decode(self.messages[0].as_slice()).unwrap()
    }
}

fn http1() -> reqwest::Client {
    adclick_sdk::HttpTransport::install_crypto_provider();
    reqwest::Client::builder().http1_only().build().unwrap()
}

/// What a browser's grpc-web client sends: HTTP/1.1 POST, `application/grpc-web+proto`,
/// one length-prefixed message; the answer's body holds the message frame(s), then a
/// trailers frame (flag 0x80) with `grpc-status`.
async fn grpc_web(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    method: &str,
    key: Option<&str>,
    origin: Option<&str>,
    msg: &impl Message,
) -> WebReply {
    let body = msg.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    let mut r = http
        .post(format!("http://{addr}/adclick.v1.QueryService/{method}"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(framed);
    if let Some(k) = key {
        r = r.header("authorization", format!("Bearer {k}"));
    }
    if let Some(o) = origin {
        r = r.header("origin", o);
    }
    let resp = r.send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    let http_status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let (mut messages, mut trailers) = (Vec::new(), HashMap::new());
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "truncated frame header: {bytes:?}");
        let flag = rest[0];
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let payload = &rest[5..5 + len];
        if flag & 0x80 != 0 {
            for line in std::str::from_utf8(payload).unwrap().split("\r\n") {
                if let Some((k, v)) = line.split_once(':') {
                    trailers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
        } else {
            messages.push(payload.to_vec());
        }
        rest = &rest[5 + len..];
    }
    WebReply {
        http: http_status,
        headers,
        messages,
        trailers,
    }
}

fn top_req(n: u32) -> TopAdsRequest {
    TopAdsRequest {
        n,
        window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
            from_ms: T0,
            to_ms: T0 + 10 * MIN,
        })),
        filter: None,
        ..Default::default()
    }
}

fn clicks_req(ad_id: u64) -> GetAdClicksRequest {
    GetAdClicksRequest {
        ad_id,
        from_ms: T0,
        to_ms: T0 + 10 * MIN,
        granularity: Granularity::Minute as i32,
        ..Default::default()
    }
}

/// gRPC-Web answers TopAds and GetAdClicks like gRPC, and goes through the same auth: no
/// key is UNAUTHENTICATED, an advertiser key sees only its advertiser's ads (another
/// advertiser's ad has no clicks for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_answers_with_the_same_auth_and_scope() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, _) = clients(&a).await;
    let all = clicks(21, 1500, 12, 10, 40);
    send(&mut ing, "c", 1, all.clone()).await;
    let http = http1();
    let addr = a.grpc_addr();

    let r = grpc_web(&http, addr, "TopAds", Some(ADMIN), None, &top_req(5)).await;
    assert_eq!(r.http, 200);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web"),
        "{r:?}"
    );
    let top: v1::TopAdsResponse = r.one();
    let got: Vec<(u64, u64)> = top.ads.iter().map(|a| (a.ad_id, a.clicks)).collect();
    assert_eq!(got, top_oracle(&all, 5, T0, T0 + 10 * MIN, |_| true));

    let r = grpc_web(
        &http,
        addr,
        "GetAdClicks",
        Some(ADMIN),
        None,
        &clicks_req(2),
    )
    .await;
    let c: v1::GetAdClicksResponse = r.one();
    assert_eq!(
        c.total_clicks,
        all.iter().filter(|c| c.ad_id == 2).count() as u64
    );

    // No key, a wrong key: UNAUTHENTICATED (16), nothing answered.
    for key in [None, Some("wrong-key-0123456789")] {
        let r = grpc_web(&http, addr, "TopAds", key, None, &top_req(5)).await;
        assert_eq!(r.grpc_status(), 16, "{key:?}: {r:?}");
        assert!(r.messages.is_empty());
    }

    // Advertiser 1's key: its ads only (ad % 3 == 1), and ad 3 (advertiser 0) is empty.
    let r = grpc_web(&http, addr, "TopAds", Some(ADV1), None, &top_req(50)).await;
    let own: v1::TopAdsResponse = r.one();
    let own: Vec<(u64, u64)> = own.ads.iter().map(|a| (a.ad_id, a.clicks)).collect();
    assert!(!own.is_empty());
    assert_eq!(
        own,
        top_oracle(&all, 50, T0, T0 + 10 * MIN, |c| c.advertiser_id == 1)
    );
    assert!(all.iter().any(|c| c.ad_id == 3), "the test needs ad 3");
    let r = grpc_web(&http, addr, "GetAdClicks", Some(ADV1), None, &clicks_req(3)).await;
    let other: v1::GetAdClicksResponse = r.one();
    // (Zero-filled buckets, if the server fills them, hold nothing.)
    assert_eq!(other.total_clicks, 0);
    assert!(other.buckets.iter().all(|b| b.clicks == 0), "{other:?}");
    let r = grpc_web(&http, addr, "GetAdClicks", Some(ADV1), None, &clicks_req(4)).await;
    let mine: v1::GetAdClicksResponse = r.one();
    assert_eq!(
        mine.total_clicks,
        all.iter().filter(|c| c.ad_id == 4).count() as u64
    );

    // BatchGetAdClicks (issue 14 item 3) the same way: ad 3 empty, ad 4 counted.
    let batch = v1::BatchGetAdClicksRequest {
        ad_ids: vec![3, 4],
        from_ms: T0,
        to_ms: T0 + 10 * MIN,
        granularity: Granularity::Minute as i32,
        ..Default::default()
    };
    let r = grpc_web(&http, addr, "BatchGetAdClicks", Some(ADV1), None, &batch).await;
    let b: v1::BatchGetAdClicksResponse = r.one();
    let got: Vec<(u64, u64)> = b.ads.iter().map(|a| (a.ad_id, a.total_clicks)).collect();
    assert_eq!(got, [(3, 0), (4, mine.total_clicks)]);

    // Invalid arguments keep their code and details over gRPC-Web.
    let r = grpc_web(&http, addr, "TopAds", Some(ADMIN), None, &top_req(0)).await;
    assert_eq!(r.grpc_status(), 3);

    // A plain HTTP/1.1 request that is not gRPC-Web is refused.
    let resp = http
        .post(format!("http://{addr}/adclick.v1.QueryService/TopAds"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    a.shutdown().await;
}

const DASH: &str = "https://dash.example";
const EVIL: &str = "https://evil.example";

/// CORS for the configured origin only, on the HTTP mirror and on gRPC-Web; preflights are
/// answered; without configuration there are no CORS headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_for_configured_origins_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.query.cors_allowed_origins = vec![DASH.into()];
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (mut ing, _) = clients(&a).await;
    send(&mut ing, "c", 1, clicks(22, 200, 5, 10, 20)).await;
    let http = http1();
    let base = format!("http://{}", a.http_addr());
    let top_url = format!("{base}/v1/ads/top?n=3&last_minutes=5");
    const ACAO: &str = "access-control-allow-origin";

    // HTTP mirror, actual requests.
    let r = http
        .get(&top_url)
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("origin", DASH)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[ACAO], DASH);
    let r = http
        .get(&top_url)
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("origin", EVIL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "CORS is not access control");
    assert!(!r.headers().contains_key(ACAO), "{:?}", r.headers());
    // Errors carry the headers too, so a page can read its 401.
    let r = http
        .get(&top_url)
        .header("origin", DASH)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()[ACAO], DASH);

    // Preflights, HTTP mirror and gRPC port.
    for (url, method) in [
        (top_url.clone(), "GET"),
        (
            format!("http://{}/adclick.v1.QueryService/TopAds", a.grpc_addr()),
            "POST",
        ),
    ] {
        let pre = |origin| {
            http.request(reqwest::Method::OPTIONS, &url)
                .header("origin", origin)
                .header("access-control-request-method", method)
                .header(
                    "access-control-request-headers",
                    "authorization, content-type, x-grpc-web",
                )
                .send()
        };
        let r = pre(DASH).await.unwrap();
        assert_eq!(r.status(), 204, "{url}");
        assert_eq!(r.headers()[ACAO], DASH);
        let allow = r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap();
        for h in ["authorization", "content-type", "x-grpc-web"] {
            assert!(allow.contains(h), "{allow}");
        }
        assert!(
            r.headers()["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains(method)
        );
        let r = pre(EVIL).await.unwrap();
        assert_eq!(r.status(), 204);
        assert!(!r.headers().contains_key(ACAO), "{url}: {:?}", r.headers());
    }

    // gRPC-Web from the allowed page: ACAO and the grpc-status header exposed.
    let r = grpc_web(
        &http,
        a.grpc_addr(),
        "TopAds",
        Some(ADMIN),
        Some(DASH),
        &top_req(3),
    )
    .await;
    assert_eq!(r.grpc_status(), 0);
    assert_eq!(r.headers[ACAO], DASH);
    assert!(
        r.headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("grpc-status")
    );
    let r = grpc_web(
        &http,
        a.grpc_addr(),
        "TopAds",
        Some(ADMIN),
        Some(EVIL),
        &top_req(3),
    )
    .await;
    assert!(!r.headers.contains_key(ACAO));
    a.shutdown().await;

    // Default config: no CORS headers, OPTIONS is not served by the mirror.
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let base = format!("http://{}", a.http_addr());
    let r = http
        .get(format!("{base}/v1/ads/top?n=3&last_minutes=5"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("origin", DASH)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key(ACAO));
    let r = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{base}/v1/ads/top?n=3&last_minutes=5"),
        )
        .header("origin", DASH)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(!r.headers().contains_key(ACAO));
    a.shutdown().await;
}

/// A key over its rate limit: RESOURCE_EXHAUSTED with RetryInfo over gRPC (and gRPC-Web),
/// 429 with Retry-After and a problem over HTTP; other keys are not affected, unknown keys
/// get 401 (never charged), refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_rate_limits_over_grpc_and_http() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.query.rate_limit_per_second = 1;
    cfg.query.rate_limit_burst = 3;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (_, mut q) = clients(&a).await;

    // gRPC, admin key: the burst passes, then RESOURCE_EXHAUSTED (1 token per second comes
    // back, so the 6 calls can only all pass if they take over 3 s).
    let mut refused = None;
    for i in 0..6 {
        match q.top_ads(authed(top_req(3), ADMIN)).await {
            Ok(_) => assert!(refused.is_none(), "call {i} passed after a refusal"),
            Err(s) => {
                assert!(i >= 3, "call {i} refused within the burst: {s:?}");
                refused.get_or_insert(s);
            }
        }
    }
    let s = refused.expect("no call was refused");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("rate limit"), "{}", s.message());
    let retry = s.get_details_retry_info().expect("no RetryInfo");
    let delay = retry.retry_delay.expect("no retry_delay");
    assert!(
        delay > std::time::Duration::ZERO && delay <= std::time::Duration::from_secs(1),
        "{delay:?}"
    );
    // gRPC-Web with the same key shares its bucket.
    let http = http1();
    let r = grpc_web(
        &http,
        a.grpc_addr(),
        "TopAds",
        Some(ADMIN),
        None,
        &top_req(3),
    )
    .await;
    assert_eq!(r.grpc_status(), 8, "{r:?}");

    // The advertiser key has its own bucket; over HTTP: 429, Retry-After, problem.
    let base = format!("http://{}", a.http_addr());
    let url = format!("{base}/v1/ads/top?n=3&last_minutes=5");
    let mut limited = None;
    for i in 0..6 {
        let r = http
            .get(&url)
            .header("authorization", format!("Bearer {ADV1}"))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => assert!(limited.is_none(), "request {i} passed after a 429"),
            429 => {
                assert!(i >= 3, "request {i} refused within the burst");
                if limited.is_none() {
                    limited = Some((r.headers().clone(), r.text().await.unwrap()));
                }
            }
            s => panic!("request {i}: {s}"),
        }
    }
    let (headers, body) = limited.expect("no 429");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["content-type"], "application/problem+json");
    let p: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["type"], "https://example.invalid/adclick/rate-limited");
    assert_eq!(p["status"], 429);
    assert_eq!(p["title"], "Too Many Requests");
    let ms = p["retry_after_ms"].as_u64().unwrap();
    assert!((1..=1000).contains(&ms), "{ms}");

    // Unknown keys are refused as such, however many.
    for _ in 0..10 {
        let r = http
            .get(&url)
            .header("authorization", "Bearer wrong-key-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let m = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.lines().any(|l| l.contains("queries_refused")
            && l.contains("rpc=\"TopAds\"")
            && l.contains("reason=\"rate_limited\"")),
        "{m}"
    );
    a.shutdown().await;
}
