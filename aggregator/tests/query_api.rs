//! The query API as callers meet it: API keys scope what each caller sees and bad
//! requests are named, a reflection-only client (what grpcurl does) lists and calls the
//! services, and the HTTP/JSON mirror answers like gRPC.

use adclick_proto::v1::{self, GetAdClicksRequest, Granularity, TopAdsRequest};
use adclick_test_support::aggregator::{ADMIN, T0};
use adclick_test_support::common::{MIN, authed};
use tonic::transport::Channel;

use crate::util::*;

/// Keys: none or unknown -> UNAUTHENTICATED; an advertiser sees only its own ads, and
/// other ads look like they have no clicks. Bad arguments are INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_scope_what_a_caller_sees_and_bad_requests_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let all = clicks(6, 2000, 30, 10, 50);
    send(&mut ing, "c", 1, all.clone()).await;
    let req = TopAdsRequest {
        n: 5,
        window: Some(v1::top_ads_request::Window::LastMinutes(5)),
        filter: None,
        ..Default::default()
    };
    let e = q
        .top_ads(tonic::Request::new(req.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = q
        .top_ads(authed(req.clone(), "wrong-key-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let own = top(&mut q, ADV1, 50, T0, T0 + 10 * MIN, None).await;
    assert_eq!(
        own,
        top_oracle(&all, 50, T0, T0 + 10 * MIN, |c| c.advertiser_id == 1)
    );
    assert!(own.iter().all(|(ad, _)| ad % 3 == 1));
    let other_ad = 3; // advertiser 0
    let r = ad_clicks(&mut q, ADV1, other_ad, Granularity::Minute, None).await;
    assert_eq!(
        (r.total_clicks, r.buckets.len()),
        (0, 0),
        "invisible, not an error"
    );
    let mine = ad_clicks(&mut q, ADV1, 4, Granularity::Day, None).await;
    assert_eq!(
        mine.total_clicks,
        all.iter().filter(|c| c.ad_id == 4).count() as u64
    );

    for (req, what) in [
        (
            GetAdClicksRequest {
                fill_empty: None,
                ad_id: 1,
                from_ms: T0 + 1,
                to_ms: T0,
                ..Default::default()
            },
            "empty range",
        ),
        (
            GetAdClicksRequest {
                fill_empty: None,
                ad_id: 1,
                from_ms: T0,
                to_ms: T0 + MIN,
                granularity: 99,
                ..Default::default()
            },
            "unknown granularity",
        ),
    ] {
        let e = q.get_ad_clicks(authed(req, ADMIN)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(what), "{}", e.message());
    }
    // The API's bound is 10,000 (issue 14), the default `query.max_top_n`.
    for n in [0, 10_001] {
        let e = q
            .top_ads(authed(TopAdsRequest { n, ..req.clone() }, ADMIN))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("n must be between 1 and 10000"));
    }
    a.shutdown().await;
}

/// grpcurl-style: a client that knows nothing but server reflection lists
/// adclick.v1.QueryService and calls TopAds with a dynamic message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_only_client_lists_and_calls_top_ads() {
    use prost::Message;
    use prost_reflect::{DescriptorPool, DynamicMessage, Value};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, _) = clients(&a).await;
    let all = clicks(8, 500, 10, 5, 20);
    send(&mut ing, "c", 1, all.clone()).await;

    let ch = Channel::from_shared(format!("http://{}", a.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut refl = ServerReflectionClient::new(ch.clone());
    let reqs = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "adclick.v1.QueryService".into(),
            )),
        },
    ];
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut services = Vec::new();
    let mut fds = prost_reflect::prost_types::FileDescriptorSet::default();
    while let Some(resp) = stream.message().await.unwrap() {
        match resp.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                services.extend(l.service.into_iter().map(|s| s.name))
            }
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                for b in f.file_descriptor_proto {
                    fds.file.push(
                        prost_reflect::prost_types::FileDescriptorProto::decode(b.as_slice())
                            .unwrap(),
                    );
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        services.contains(&"adclick.v1.QueryService".to_string()),
        "{services:?}"
    );
    let pool = DescriptorPool::from_file_descriptor_set(fds).unwrap();
    let svc = pool.get_service_by_name("adclick.v1.QueryService").unwrap();
    let method = svc.methods().find(|m| m.name() == "TopAds").unwrap();
    let mut req = DynamicMessage::new(method.input());
    req.set_field_by_name("n", Value::U32(3));
    let mut range = DynamicMessage::new(pool.get_message_by_name("adclick.v1.TimeRange").unwrap());
    range.set_field_by_name("from_ms", Value::I64(T0));
    range.set_field_by_name("to_ms", Value::I64(T0 + 10 * MIN));
    req.set_field_by_name("range", Value::Message(range));

    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/adclick.v1.QueryService/TopAds");
    let codec = dynamic::DynamicCodec(method.output());
    let resp = grpc
        .unary(authed(req, ADMIN), path, codec)
        .await
        .unwrap()
        .into_inner();
    let ads = resp.get_field_by_name("ads").unwrap();
    let got: Vec<(u64, u64)> = ads
        .as_list()
        .unwrap()
        .iter()
        .map(|m| {
            let m = m.as_message().unwrap();
            (
                m.get_field_by_name("ad_id").unwrap().as_u64().unwrap(),
                m.get_field_by_name("clicks").unwrap().as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, top_oracle(&all, 3, T0, T0 + 10 * MIN, |_| true));

    // grpc.health.v1 reports both services as serving.
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let ch = Channel::from_shared(format!("http://{}", a.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    for svc in ["adclick.v1.QueryService", "adclick.v1.IngestService"] {
        let r = health
            .check(HealthCheckRequest {
                service: svc.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{svc}");
    }
    a.shutdown().await;
}

/// A tonic codec for prost-reflect dynamic messages (what grpcurl does).
mod dynamic {
    use prost::Message;
    use prost_reflect::{DynamicMessage, MessageDescriptor};
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    pub struct DynamicCodec(pub MessageDescriptor);
    pub struct Enc;
    pub struct Dec(MessageDescriptor);

    impl Codec for DynamicCodec {
        type Encode = DynamicMessage;
        type Decode = DynamicMessage;
        type Encoder = Enc;
        type Decoder = Dec;
        fn encoder(&mut self) -> Enc {
            Enc
        }
        fn decoder(&mut self) -> Dec {
            Dec(self.0.clone())
        }
    }
    impl Encoder for Enc {
        type Item = DynamicMessage;
        type Error = Status;
        fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            item.encode(dst)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }
    impl Decoder for Dec {
        type Item = DynamicMessage;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
            DynamicMessage::decode(self.0.clone(), src)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }
}

/// The HTTP/JSON mirror answers like gRPC, with the same auth and errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, _) = clients(&a).await;
    let all = clicks(9, 1000, 20, 10, 50);
    send(&mut ing, "c", 1, all.clone()).await;
    adclick_sdk::HttpTransport::install_crypto_provider();
    let http = reqwest::Client::new();
    let base = format!("http://{}", a.http_addr());
    let get = |url: String, key: Option<&str>| {
        let mut r = http.get(url);
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        r.send()
    };
    let r = get(
        format!("{base}/v1/ads/top?n=5&from_ms={T0}&to_ms={}", T0 + 10 * MIN),
        Some(ADMIN),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let got: Vec<(u64, u64)> = v["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["ad_id"].as_u64().unwrap(), a["clicks"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, top_oracle(&all, 5, T0, T0 + 10 * MIN, |_| true));
    let r = get(
        format!(
            "{base}/v1/ads/2/clicks?from_ms={T0}&to_ms={}&granularity=hour&country=US",
            T0 + 10 * MIN
        ),
        Some(ADMIN),
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        v["total_clicks"].as_u64().unwrap(),
        all.iter()
            .filter(|c| c.ad_id == 2 && c.country == "US")
            .count() as u64
    );
    assert_eq!(v["granularity"], "hour");
    assert_eq!(
        get(format!("{base}/v1/ads/top?n=5&last_minutes=5"), None)
            .await
            .unwrap()
            .status(),
        401
    );
    let r = get(
        format!("{base}/v1/ads/x/clicks?last_minutes=5"),
        Some(ADMIN),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let r = get(
        format!("{base}/v1/ads/1/clicks?last_minutes=5&granularity=week"),
        Some(ADMIN),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("unknown granularity"));
    let m = get(format!("{base}/metrics"), None)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("adclick_aggregator_clicks_total{outcome=\"applied\"} 1000"),
        "{m}"
    );
    assert_eq!(
        get(format!("{base}/healthz"), None).await.unwrap().status(),
        200
    );
    a.shutdown().await;
}
