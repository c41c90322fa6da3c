//! Aggregator tests over real gRPC and HTTP on 127.0.0.1:0. Expected numbers come from an
//! oracle computed in the test from the clicks it generated.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use adclick_aggregator::config::{ApiKey, Role};
use adclick_aggregator::{Aggregator, AggregatorConfig};
use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{
    self, Filter, GetAdClicksRequest, Granularity, IngestBatch, IngestClick, TopAdsRequest,
};
use tonic::transport::Channel;

const ADMIN: &str = "admin-key-0123456789";
const ADV1: &str = "advertiser-1-key-0123";
/// What the test "collectors" send as `authorization: Bearer`.
const INGEST: &str = "ingest-key-0123456789";
/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000;
const MIN: i64 = 60_000;

fn config(dir: &std::path::Path) -> AggregatorConfig {
    let mut c = AggregatorConfig::default();
    c.listen_grpc = "127.0.0.1:0".parse().unwrap();
    c.listen_http = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.to_path_buf();
    c.api_keys = vec![
        ApiKey {
            key: ADMIN.into(),
            role: Role::Admin,
            advertiser_id: None,
        },
        ApiKey {
            key: ADV1.into(),
            role: Role::Advertiser,
            advertiser_id: Some(1),
        },
    ];
    c.ingest_keys = vec![INGEST.into()];
    c.shards.count = 2;
    c
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const COUNTRIES: [&str; 3] = ["US", "DE", "FR"];
const OSES: [&str; 3] = ["ios", "android", "windows"];

/// `n` clicks on ads 1..=ads over `minutes` minutes after T0, users u0..u(users-1).
fn clicks(seed: u64, n: usize, ads: u64, minutes: i64, users: u64) -> Vec<IngestClick> {
    let mut r = Rng(seed);
    (0..n)
        .map(|i| {
            // Zipf-ish: low ad ids are much more frequent.
            let ad = 1 + (r.below(ads) * r.below(ads)) / ads;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&seed.to_le_bytes());
            id[8..].copy_from_slice(&(i as u64).to_le_bytes());
            IngestClick {
                impression_id: id.to_vec(),
                ad_id: ad,
                advertiser_id: ad % 3,
                campaign_id: ad % 5,
                token_expires_at_ms: T0 + 3 * 3_600_000,
                event_time_ms: T0 + r.below((minutes * MIN) as u64) as i64,
                received_at_ms: T0,
                country: COUNTRIES[r.below(3) as usize].into(),
                device: 1 + r.below(4) as i32,
                os: OSES[r.below(3) as usize].into(),
                site: "news.example".into(),
                user_id: format!("u{}", r.below(users)),
                ..Default::default()
            }
        })
        .collect()
}

async fn send(
    client: &mut IngestServiceClient<Channel>,
    collector: &str,
    seq: u64,
    clicks: Vec<IngestClick>,
) -> v1::IngestAck {
    client
        .ingest(authed(
            IngestBatch {
                collector_id: collector.into(),
                seq,
                clicks,
            },
            INGEST,
        ))
        .await
        .unwrap()
        .into_inner()
}

fn authed<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

async fn clients(a: &Aggregator) -> (IngestServiceClient<Channel>, QueryServiceClient<Channel>) {
    let ch = Channel::from_shared(format!("http://{}", a.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        IngestServiceClient::new(ch.clone()),
        QueryServiceClient::new(ch),
    )
}

/// Per-minute counts of every ad from the unique clicks (the oracle).
fn oracle(unique: &[IngestClick]) -> BTreeMap<(u64, i64), u64> {
    let mut m = BTreeMap::new();
    for c in unique {
        *m.entry((c.ad_id, c.event_time_ms.div_euclid(MIN) * MIN))
            .or_insert(0) += 1;
    }
    m
}

fn top_oracle(
    unique: &[IngestClick],
    n: usize,
    from: i64,
    to: i64,
    keep: impl Fn(&IngestClick) -> bool,
) -> Vec<(u64, u64)> {
    let mut sums: HashMap<u64, u64> = HashMap::new();
    for c in unique
        .iter()
        .filter(|c| c.event_time_ms >= from && c.event_time_ms < to && keep(c))
    {
        *sums.entry(c.ad_id).or_default() += 1;
    }
    let mut v: Vec<_> = sums.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

async fn top(
    q: &mut QueryServiceClient<Channel>,
    key: &str,
    n: u32,
    from: i64,
    to: i64,
    filter: Option<Filter>,
) -> Vec<(u64, u64)> {
    let req = TopAdsRequest {
        n,
        window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
            from_ms: from,
            to_ms: to,
        })),
        filter,
    };
    q.top_ads(authed(req, key))
        .await
        .unwrap()
        .into_inner()
        .ads
        .into_iter()
        .map(|a| (a.ad_id, a.clicks))
        .collect()
}

async fn ad_clicks(
    q: &mut QueryServiceClient<Channel>,
    key: &str,
    ad: u64,
    g: Granularity,
    filter: Option<Filter>,
) -> v1::GetAdClicksResponse {
    let req = GetAdClicksRequest {
        ad_id: ad,
        from_ms: T0,
        to_ms: T0 + 2 * 86_400_000,
        granularity: g as i32,
        filter,
    };
    q.get_ad_clicks(authed(req, key))
        .await
        .unwrap()
        .into_inner()
}

/// Exact counts per minute/hour/day, filters, unique users, and TopAds against the oracle,
/// with duplicates inside and across batches and from two collectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_filters_unique_users_and_top_n_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let all = clicks(1, 6000, 60, 90, 400);
    let mut seq = 0;
    for chunk in all.chunks(500) {
        seq += 1;
        let mut batch = chunk.to_vec();
        batch.extend_from_slice(&chunk[..20]); // duplicates within the batch
        let ack = send(&mut ing, "c1", seq, batch).await;
        assert_eq!(
            (ack.accepted, ack.duplicate, ack.already_acked),
            (chunk.len() as u32, 20, false)
        );
    }
    // Another collector re-sends some of the same impressions: all duplicates.
    let ack = send(&mut ing, "c2", 1, all[..300].to_vec()).await;
    assert_eq!((ack.accepted, ack.duplicate), (0, 300));

    let per_minute = oracle(&all);
    for ad in [1u64, 2, 7, 30] {
        let r = ad_clicks(&mut q, ADMIN, ad, Granularity::Minute, None).await;
        let expect: Vec<(i64, u64)> = per_minute
            .iter()
            .filter(|((a, _), _)| *a == ad)
            .map(|((_, m), c)| (*m, *c))
            .collect();
        let got: Vec<(i64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        assert_eq!(got, expect, "ad {ad} per minute");
        let total: u64 = expect.iter().map(|(_, c)| c).sum();
        assert_eq!(r.total_clicks, total);
        // Hour buckets: 0-60 min and 60-90 min.
        let h = ad_clicks(&mut q, ADMIN, ad, Granularity::Hour, None).await;
        let first_hour: u64 = expect
            .iter()
            .filter(|(m, _)| *m < T0 + 60 * MIN)
            .map(|(_, c)| c)
            .sum();
        let hours: Vec<(i64, u64)> = h.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        let mut want = vec![(T0, first_hour), (T0 + 3_600_000, total - first_hour)];
        want.retain(|(_, c)| *c > 0);
        assert_eq!(hours, want, "ad {ad} per hour");
        let d = ad_clicks(&mut q, ADMIN, ad, Granularity::Day, None).await;
        assert_eq!(
            d.buckets
                .iter()
                .map(|b| (b.start_ms, b.clicks))
                .collect::<Vec<_>>(),
            vec![(T0, total)]
        );
        // Unique users: exact users of this ad, HLL within 2% (exact while small).
        let users: HashSet<&str> = all
            .iter()
            .filter(|c| c.ad_id == ad)
            .map(|c| c.user_id.as_str())
            .collect();
        let est = d.total_unique_users as f64;
        assert!(
            (est - users.len() as f64).abs() <= (users.len() as f64 * 0.02).max(1.0),
            "ad {ad}: {est} vs {}",
            users.len()
        );
        // Filter: country DE on mobile.
        let f = Filter {
            country: vec!["DE".into()],
            device: vec![v1::Device::Mobile as i32],
            ..Default::default()
        };
        let r = ad_clicks(&mut q, ADMIN, ad, Granularity::Day, Some(f)).await;
        let want = all
            .iter()
            .filter(|c| c.ad_id == ad && c.country == "DE" && c.device == 2)
            .count() as u64;
        assert_eq!(r.total_clicks, want, "ad {ad} DE mobile");
    }
    // TopAds over several ranges, unfiltered and filtered.
    for (n, from, to) in [
        (10, T0, T0 + 90 * MIN),
        (5, T0 + 10 * MIN, T0 + 25 * MIN),
        (100, T0, T0 + 2 * MIN),
        (3, T0 + 89 * MIN, T0 + 95 * MIN),
    ] {
        assert_eq!(
            top(&mut q, ADMIN, n, from, to, None).await,
            top_oracle(&all, n as usize, from, to, |_| true),
            "top {n} [{from}, {to})"
        );
    }
    let f = Filter {
        os: vec!["ios".into()],
        campaign_id: vec![2],
        ..Default::default()
    };
    assert_eq!(
        top(&mut q, ADMIN, 7, T0, T0 + 90 * MIN, Some(f)).await,
        top_oracle(&all, 7, T0, T0 + 90 * MIN, |c| c.os == "ios"
            && c.campaign_id == 2)
    );
    assert_eq!(a.metrics().clicks_with("applied"), 6000);
    assert_eq!(a.metrics().clicks_with("duplicate"), 12 * 20 + 300);
    a.shutdown().await;
}

/// A batch re-delivered after its ack is acknowledged again and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_of_an_acked_batch_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let b1 = clicks(2, 100, 5, 5, 10);
    let b2 = clicks(3, 100, 5, 5, 10);
    assert!(!send(&mut ing, "c", 1, b1.clone()).await.already_acked);
    assert!(
        !send(&mut ing, "c", 3, b2.clone()).await.already_acked,
        "gaps in seq are fine"
    );
    let again = send(&mut ing, "c", 1, b1.clone()).await;
    assert!(again.already_acked);
    assert_eq!(again.accepted, 0);
    // Even different content under an acked seq is ignored: seq is the identity.
    assert!(
        send(&mut ing, "c", 2, clicks(4, 50, 5, 5, 10))
            .await
            .already_acked
    );
    let total: u64 = (1..=5).map(|_| 0).sum::<u64>();
    let _ = total;
    let top_all = top(&mut q, ADMIN, 10, T0, T0 + 10 * MIN, None).await;
    let mut both = b1.clone();
    both.extend(b2);
    assert_eq!(top_all, top_oracle(&both, 10, T0, T0 + 10 * MIN, |_| true));
    assert_eq!(a.metrics().redeliveries.get(), 2);
    a.shutdown().await;
}

/// Clicks for a final minute still count (as late corrections); clicks older than the
/// retention are counted as too old and not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_clicks_correct_final_minutes_and_too_old_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.windows.allowed_delay_ms = 5_000;
    cfg.windows.retention_minutes = 30;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let mut cs = clicks(5, 3, 9, 1, 3);
    for c in &mut cs {
        c.ad_id = 9;
        c.advertiser_id = 9 % 3;
        c.campaign_id = 9 % 5;
    }
    cs[0].event_time_ms = T0 + 20 * MIN; // advances the watermark to T0+20m-5s
    cs[1].event_time_ms = T0 + 2 * MIN + 1; // minute 2 is final: a late correction
    cs[2].event_time_ms = T0 - 20 * MIN; // older than 30 min before the watermark? no: 40 min -> too old
    let ack = send(&mut ing, "c", 1, cs.clone()).await;
    assert_eq!(ack.accepted, 2);
    let m = a.metrics();
    assert_eq!((m.clicks_with("late"), m.clicks_with("too_old")), (1, 1));
    let r = ad_clicks(&mut q, ADMIN, 9, Granularity::Minute, None).await;
    let got: Vec<(i64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
    assert_eq!(got, vec![(T0 + 2 * MIN, 1), (T0 + 20 * MIN, 1)]);
    assert_eq!(r.watermark_ms, T0 + 20 * MIN - 5_000);
    let q = std::fs::read_to_string(dir.path().join("quarantine.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(q.lines().next().unwrap()).unwrap();
    assert_eq!(line["reason"], "older than windows.retention_minutes");
    assert_eq!(line["event_time_ms"], T0 - 20 * MIN);
    assert_eq!(q.lines().count(), 1);
    a.shutdown().await;
}

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
                ad_id: 1,
                from_ms: T0 + 1,
                to_ms: T0,
                ..Default::default()
            },
            "empty range",
        ),
        (
            GetAdClicksRequest {
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
    for n in [0, 5000] {
        let e = q
            .top_ads(authed(TopAdsRequest { n, ..req.clone() }, ADMIN))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("n must be between 1 and 1000"));
    }
    a.shutdown().await;
}

/// One ad with half of all traffic: reported hot in acks, spread over both shards, and
/// still counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viral_ad_is_detected_spread_and_merged_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.shards.hot_window_clicks = 1000;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let mut all = clicks(7, 8000, 200, 10, 1000);
    for (i, c) in all.iter_mut().enumerate() {
        if i % 2 == 0 {
            c.ad_id = 777;
            c.advertiser_id = 777 % 3;
            c.campaign_id = 777 % 5;
        }
    }
    let mut hot_seen = false;
    for (i, chunk) in all.chunks(500).enumerate() {
        let ack = send(&mut ing, "c", i as u64 + 1, chunk.to_vec()).await;
        hot_seen |= ack.hot_ad_ids == vec![777];
    }
    assert!(hot_seen, "ad 777 reported hot");
    let (bytes, cells) = a.memory();
    assert!(cells > 0 && bytes > 0);
    let want = top_oracle(&all, 20, T0, T0 + 10 * MIN, |_| true);
    assert_eq!(top(&mut q, ADMIN, 20, T0, T0 + 10 * MIN, None).await, want);
    assert_eq!(want[0], (777, 4000));
    let r = ad_clicks(&mut q, ADMIN, 777, Granularity::Minute, None).await;
    assert_eq!(r.total_clicks, 4000);
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

/// Drop the aggregator without shutdown at several points (one of them in the middle of a
/// checkpoint), restart on the same directory, re-send every batch: the counts equal those
/// of a run without crashes.
#[test]
fn crash_restart_and_replay_gives_exactly_the_uncrashed_counts() {
    let batches: Vec<Vec<IngestClick>> =
        (0..12).map(|i| clicks(100 + i, 400, 40, 30, 100)).collect();
    let mut unique: Vec<IngestClick> = batches.iter().flatten().cloned().collect();
    unique.sort_by_key(|c| c.impression_id.clone());
    unique.dedup_by_key(|c| c.impression_id.clone());

    let snapshot = |rt: &tokio::runtime::Runtime, a: &Aggregator| {
        rt.block_on(async {
            let (_, mut q) = clients(a).await;
            let mut out = Vec::new();
            for ad in 1..=40u64 {
                let r = ad_clicks(&mut q, ADMIN, ad, Granularity::Minute, None).await;
                out.push(
                    r.buckets
                        .iter()
                        .map(|b| (b.start_ms, b.clicks, b.unique_users))
                        .collect::<Vec<_>>(),
                );
            }
            (out, top(&mut q, ADMIN, 15, T0, T0 + 30 * MIN, None).await)
        })
    };

    // Reference run, no crash.
    let ref_dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt
        .block_on(adclick_aggregator::start(config(ref_dir.path())))
        .unwrap();
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in batches.iter().enumerate() {
            send(&mut ing, "c", i as u64 + 1, b.clone()).await;
        }
    });
    let reference = snapshot(&rt, &a);
    assert_eq!(
        reference.1,
        top_oracle(&unique, 15, T0, T0 + 30 * MIN, |_| true)
    );
    rt.block_on(a.shutdown());

    // Crashing runs on one directory: crash after k batches, sometimes mid-checkpoint.
    let dir = tempfile::tempdir().unwrap();
    for (round, (k, fail_cp)) in [(3, None), (5, Some(1)), (8, Some(2)), (12, None)]
        .into_iter()
        .enumerate()
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut cfg = config(dir.path());
        cfg.checkpoint.interval_ms = 1; // checkpoint after every group
        let a = rt.block_on(start_retrying(cfg, fail_cp));
        rt.block_on(async {
            let (mut ing, _) = clients(&a).await;
            // Everything from the start is re-sent: what was acked before must be a no-op.
            for (i, b) in batches.iter().enumerate().take(k) {
                send(&mut ing, "c", i as u64 + 1, b.clone()).await;
            }
        });
        a.kill();
        rt.shutdown_background();
        let _ = round;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(config(dir.path()), None));
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in batches.iter().enumerate() {
            let ack = send(&mut ing, "c", i as u64 + 1, b.clone()).await;
            assert!(
                ack.already_acked,
                "batch {} was acked before the crashes",
                i + 1
            );
        }
    });
    let got = snapshot(&rt, &a);
    for (ad, (g, r)) in got.0.iter().zip(&reference.0).enumerate() {
        assert_eq!(
            g,
            r,
            "ad {}: per-minute (start, clicks, unique users) differ",
            ad + 1
        );
    }
    assert_eq!(got.1, reference.1, "TopAds differ");
    rt.block_on(a.shutdown());
}

async fn start_retrying(
    cfg: AggregatorConfig,
    fail_checkpoint_after_tables: Option<usize>,
) -> Aggregator {
    // The killed aggregator's writer thread releases the database when it exits.
    let mut last = String::new();
    for _ in 0..200 {
        match adclick_aggregator::store::RedbStore::open(&cfg.data_dir) {
            Ok(mut store) => {
                store.fail_checkpoint_after_tables = fail_checkpoint_after_tables;
                return adclick_aggregator::start_with_store(cfg, store)
                    .await
                    .unwrap();
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not reopen the store: {last}")
}

/// Hostile or broken input from the wire: an absurd event time is quarantined without
/// moving the watermark; an ad cannot change owner; absurd query ranges are refused (they
/// used to overflow); ingest needs a key when `ingest_keys` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_without_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ingest_keys = vec!["collector-secret-0123456789".into()];
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let e = ing
        .ingest(IngestBatch {
            collector_id: "c".into(),
            seq: 1,
            clicks: clicks(20, 1, 5, 1, 1),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let send_k = |ing: &mut IngestServiceClient<Channel>, seq: u64, cs: Vec<IngestClick>| {
        let mut req = tonic::Request::new(IngestBatch {
            collector_id: "c".into(),
            seq,
            clicks: cs,
        });
        req.metadata_mut().insert(
            "authorization",
            "Bearer collector-secret-0123456789".parse().unwrap(),
        );
        let mut ing = ing.clone();
        async move { ing.ingest(req).await.unwrap().into_inner() }
    };
    let good = clicks(21, 10, 3, 5, 5);
    assert_eq!(send_k(&mut ing, 1, good.clone()).await.accepted, 10);
    let wm = a.metrics().watermark_ms.get();
    let mut bad = clicks(22, 3, 3, 5, 5);
    bad[0].event_time_ms = i64::MAX;
    bad[1].event_time_ms = i64::MIN;
    bad[2].advertiser_id += 1; // same ad, another advertiser
    let ack = send_k(&mut ing, 2, bad).await;
    assert_eq!(ack.accepted, 0);
    assert_eq!(
        a.metrics().watermark_ms.get(),
        wm,
        "the watermark did not move"
    );
    assert_eq!(
        (
            a.metrics().clicks_with("malformed"),
            a.metrics().clicks_with("owner_mismatch")
        ),
        (2, 1)
    );
    assert_eq!(
        top(&mut q, ADMIN, 10, T0, T0 + 10 * MIN, None).await,
        top_oracle(&good, 10, T0, T0 + 10 * MIN, |_| true)
    );
    for (from, to) in [(i64::MAX - 1000, i64::MAX), (i64::MIN, 0), (-5, 10)] {
        let req = GetAdClicksRequest {
            ad_id: 1,
            from_ms: from,
            to_ms: to,
            ..Default::default()
        };
        let e = q.get_ad_clicks(authed(req, ADMIN)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let req = TopAdsRequest {
            n: 5,
            window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
                from_ms: from,
                to_ms: to,
            })),
            filter: None,
        };
        assert_eq!(
            q.top_ads(authed(req, ADMIN)).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
    let q2 = std::fs::read_to_string(dir.path().join("quarantine.jsonl")).unwrap();
    assert_eq!(q2.lines().count(), 3);
    assert!(q2.contains("another advertiser"));
    a.shutdown().await;
}
