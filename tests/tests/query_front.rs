//! The query front over the JetStream scale-out: a NATS JetStream stream of P = 4
//! partitions, two aggregator shards (`"0-1"` in-process, `"2-3"` the real `adclick
//! aggregator` binary) and `front::start` in front of them, all over real sockets.
//!
//! Known clicks are published to the stream exactly as a collector's JetStream sink
//! publishes them (one `IngestBatch` per partition on `clicks.<p>`, a `Nats-Msg-Id`),
//! so the expected numbers are computed here from the clicks sent, never read back from
//! an aggregator. The front must answer GetAdClicks, BatchGetAdClicks, Breakdown and
//! TopAds (unfiltered, filtered, an advertiser key) exactly as one aggregator holding
//! every partition would; pass a shard's INVALID_ARGUMENT through with its details; serve
//! the same HTTP mirror; and, once shard "s1" is SIGKILLed, answer UNAVAILABLE naming it
//! for TopAds (and ads it owns) while still answering ads owned by the live shard.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use adclick_aggregator::front::{FrontConfig, QueryFront, ShardEndpoint};
use adclick_aggregator::source::{SourceConfig, SourceKind};
use adclick_proto::partition::partition;
use adclick_proto::v1::{
    self, BatchGetAdClicksRequest, BreakdownRequest, Dimension, Filter, GetAdClicksRequest,
    GetTotalsRequest, Granularity, IngestBatch, IngestClick, TopAdsRequest,
};
use adclick_test_support::nats::NatsCluster;
use tonic_types::StatusExt;

use crate::support::*;

const P: u32 = 4;
const COLLECTOR: &str = "edge-front";

/// One known click.
#[derive(Debug, Clone)]
struct Sent {
    ad: u64,
    advertiser: u64,
    country: &'static str,
    /// User `u<user>`: four users click across the ads of both shards, so a campaign's
    /// unique users are only right if the front unions the shards' sketches.
    user: u64,
}

/// The clicks: 12 ads, ad `i` of advertiser A when even, B when odd, with counts chosen to
/// tie across shards (the TopAds cut must apply the aggregator's tie-break), countries
/// alternating US/DE.
fn clicks() -> Vec<Sent> {
    let counts = [5u64, 3, 7, 3, 1, 5, 2, 7, 4, 6, 3, 2];
    let mut out = Vec::new();
    for (i, n) in counts.iter().enumerate() {
        let ad = 1_001 + i as u64;
        let advertiser = if i % 2 == 0 { ADV_A } else { ADV_B };
        for k in 0..*n {
            let country = if k % 2 == 0 { "US" } else { "DE" };
            out.push(Sent {
                ad,
                advertiser,
                country,
                user: k % 4,
            });
        }
    }
    out
}

fn counts(sent: &[Sent], keep: impl Fn(&Sent) -> bool) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for s in sent.iter().filter(|s| keep(s)) {
        *m.entry(s.ad).or_insert(0) += 1;
    }
    m
}

/// Publishes every click as a collector's JetStream sink would: one batch per partition,
/// seq 1, message id `<collector>-<seq>-<p>`. Clicks of partitions 2-3 happened 90 s
/// earlier, so the two shards' watermarks differ.
async fn publish(client: &async_nats::Client, sent: &[Sent], now: i64) {
    let js = async_nats::jetstream::new(client.clone());
    for p in 0..P {
        let clicks: Vec<IngestClick> = sent
            .iter()
            .enumerate()
            .filter(|(_, s)| partition(s.ad, P) == p)
            .map(|(i, s)| IngestClick {
                impression_id: (i as u128 + 1).to_be_bytes().to_vec(),
                ad_id: s.ad,
                advertiser_id: s.advertiser,
                campaign_id: 1,
                token_expires_at_ms: now + HOUR,
                // Shard s1's partitions a little behind: its watermark is the lower one.
                event_time_ms: now - i64::from(p / 2) * 90_000,
                received_at_ms: now,
                country: s.country.into(),
                user_id: format!("u{}", s.user),
                ..Default::default()
            })
            .collect();
        if clicks.is_empty() {
            continue;
        }
        let batch = IngestBatch {
            collector_id: COLLECTOR.into(),
            seq: 1,
            clicks,
            acked_floor: 1,
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            adclick_collector::forward::jetstream::msg_id(COLLECTOR, 1, p as usize).as_str(),
        );
        js.publish_with_headers(
            format!("clicks.{p}"),
            h,
            prost::Message::encode_to_vec(&batch).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

fn source(urls: Vec<String>, durable: &str, partitions: &str) -> SourceConfig {
    SourceConfig {
        kind: SourceKind::Jetstream,
        servers: urls,
        durable_prefix: durable.into(),
        partitions: Some(partitions.into()),
        ..Default::default()
    }
}

async fn start_front(s0: SocketAddr, s1: SocketAddr) -> QueryFront {
    let mut cfg = FrontConfig {
        listen_grpc: "127.0.0.1:0".parse().unwrap(),
        listen_http: "127.0.0.1:0".parse().unwrap(),
        partitions: P,
        shards: vec![
            ShardEndpoint {
                name: "s0".into(),
                grpc: format!("http://{s0}"),
                partitions: "0-1".into(),
            },
            ShardEndpoint {
                name: "s1".into(),
                grpc: format!("http://{s1}"),
                partitions: "2-3".into(),
            },
        ],
        shard_timeout_ms: 3_000,
        health_interval_ms: 200,
        api_keys: api_keys(),
        ..Default::default()
    };
    cfg.query.rate_limit_per_second = 0;
    adclick_aggregator::front::start(cfg).await.unwrap()
}

fn top_req(n: u32, (from, to): (i64, i64), filter: Option<Filter>) -> TopAdsRequest {
    TopAdsRequest {
        n,
        window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
            from_ms: from,
            to_ms: to,
        })),
        filter,
        ..Default::default()
    }
}

fn pairs(r: &v1::TopAdsResponse) -> Vec<(u64, u64)> {
    r.ads.iter().map(|a| (a.ad_id, a.clicks)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_fans_out_merges_exactly_and_names_a_dead_shard() {
    within(Duration::from_secs(150), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(&dir.path().join("nats"), 1).await;
    // The stream, as `adclick jetstream init` / a collector creates it: P = 4, R1.
    let mut js_cfg = adclick_collector::config::JetStreamConfig::default();
    js_cfg.servers = cluster.urls();
    js_cfg.partitions = P;
    js_cfg.replicas = 1;
    js_cfg.max_bytes = 64 << 20;
    adclick_collector::forward::jetstream::init(&js_cfg, Duration::from_secs(20))
        .await
        .unwrap();

    // Shard s0: partitions 0-1, in-process, 60 minute buckets kept (so a range 3 hours
    // back is refused by the shard, not by the front, which cannot know the retention).
    let mut c0 = aggregator_config(&dir.path().join("s0"), "127.0.0.1:0".parse().unwrap());
    c0.source = source(cluster.urls(), "s0", "0-1");
    c0.windows.retention_minutes = 60;
    let s0 = adclick_aggregator::start(c0).await.unwrap();
    // Shard s1: partitions 2-3, the real binary (SIGKILLed later).
    let s1_grpc = free_addr();
    let config = dir.path().join("s1.toml");
    let mut text = aggregator_toml(s1_grpc, &dir.path().join("s1"));
    // `aggregator_toml` ends inside the last [[api_keys]] table: sections after it.
    text.push_str(&format!(
        "\n[windows]\nretention_minutes = 60\n\n[source]\nkind = \"jetstream\"\nservers = {:?}\npartitions = \"2-3\"\ndurable_prefix = \"s1\"\n",
        cluster.urls()
    ));
    std::fs::write(&config, text).unwrap();
    let s1 = ChildServer::spawn("aggregator", &config, &dir.path().join("s1.log"));
    let front = start_front(s0.grpc_addr(), s1_grpc).await;
    let http = format!("http://{}", front.http_addr());
    let web = http_client();

    let sent = clicks();
    let all = counts(&sent, |_| true);
    let owned_by = |lo: u32| {
        all.keys()
            .copied()
            .filter(|a| (lo..lo + 2).contains(&partition(*a, P)))
            .collect::<Vec<u64>>()
    };
    let (ads0, ads1) = (owned_by(0), owned_by(2));
    assert!(
        !ads0.is_empty() && !ads1.is_empty(),
        "both shards own ads: {ads0:?} {ads1:?}"
    );
    let now = now_ms();
    publish(&cluster.client().await, &sent, now).await;
    let range = (now - 10 * MIN, now + 5 * MIN);

    // Ready once both shards' health says SERVING (s1's binary may still be starting).
    assert!(
        wait_healthy(&http, Duration::from_secs(40)).await,
        "front never ready: {}; s1 log:\n{}",
        web.get(format!("{http}/readyz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        s1.log_text()
    );
    // Everything counted: the front's TopAds equals the ledger (it is under test here,
    // and asserted exactly below).
    let got = poll_counts(front.grpc_addr(), range, Duration::from_secs(40), |c| {
        *c == all
    })
    .await;
    assert_eq!(got, all, "TopAds through the front = every click sent");

    let mut q = query_client(front.grpc_addr()).await.unwrap();

    // --- TopAds: unfiltered (cut with ties across the shards), filtered, per advertiser.
    for n in [1, 3, 5, 100] {
        let r = q
            .top_ads(authed(top_req(n, range, None), ADMIN))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pairs(&r), ranked(&all, n as usize), "TopAds n={n}");
    }
    let us = counts(&sent, |s| s.country == "US");
    let f_us = Filter {
        country: vec!["US".into()],
        ..Default::default()
    };
    let r = q
        .top_ads(authed(top_req(4, range, Some(f_us.clone())), ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pairs(&r), ranked(&us, 4), "TopAds country=US");
    let de_b = counts(&sent, |s| s.country == "DE" && s.advertiser == ADV_B);
    let f_de_b = Filter {
        country: vec!["DE".into()],
        advertiser_id: vec![ADV_B],
        ..Default::default()
    };
    let r = q
        .top_ads(authed(top_req(100, range, Some(f_de_b)), ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pairs(&r), ranked(&de_b, 100), "TopAds DE and advertiser B");
    // An advertiser key sees only its ads, even unfiltered.
    let of_a = counts(&sent, |s| s.advertiser == ADV_A);
    let r = q
        .top_ads(authed(top_req(100, range, None), ADV_A_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pairs(&r),
        ranked(&of_a, 100),
        "TopAds with advertiser A's key"
    );
    // The watermark is the minimum of the shards'.
    let wm = |addr: SocketAddr, key: &'static str| async move {
        let mut c = query_client(addr).await.unwrap();
        c.top_ads(authed(top_req(1, range, None), key))
            .await
            .unwrap()
            .into_inner()
            .watermark_ms
    };
    let (w0, w1) = (wm(s0.grpc_addr(), ADMIN).await, wm(s1_grpc, ADMIN).await);
    assert!(w1 < w0, "s1 is behind: {w0} {w1}");
    let r = q
        .top_ads(authed(top_req(3, range, None), ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.watermark_ms, w0.min(w1), "min watermark");
    // A last_minutes window answers the same as the range.
    let last = TopAdsRequest {
        n: 100,
        window: Some(v1::top_ads_request::Window::LastMinutes(10)),
        filter: None,
        ..Default::default()
    };
    let r = q.top_ads(authed(last, ADMIN)).await.unwrap().into_inner();
    assert_eq!(pairs(&r), ranked(&all, 100), "TopAds last_minutes=10");

    // --- GetAdClicks: every ad, from its owner; an advertiser key sees only its own.
    for (ad, n) in &all {
        let r = ad_clicks(
            front.grpc_addr(),
            ADMIN,
            *ad,
            range,
            Granularity::Minute,
            None,
        )
        .await;
        assert_eq!(r.total_clicks, *n, "GetAdClicks ad {ad}");
        let r = ad_clicks(
            front.grpc_addr(),
            ADV_A_KEY,
            *ad,
            range,
            Granularity::Hour,
            Some(f_us.clone()),
        )
        .await;
        let own_us = counts(&sent, |s| {
            s.ad == *ad && s.advertiser == ADV_A && s.country == "US"
        });
        assert_eq!(
            r.total_clicks,
            own_us.get(ad).copied().unwrap_or(0),
            "GetAdClicks ad {ad}, US, advertiser A's key"
        );
    }

    // --- BatchGetAdClicks: ids of both shards interleaved, answered in request order.
    let mut ids: Vec<u64> = Vec::new();
    for i in 0..ads0.len().max(ads1.len()) {
        ids.extend(ads1.get(i));
        ids.extend(ads0.get(i));
    }
    ids.push(9_999_999); // an ad nobody clicked
    let batch = BatchGetAdClicksRequest {
        ad_ids: ids.clone(),
        from_ms: range.0,
        to_ms: range.1,
        granularity: Granularity::Minute as i32,
        filter: None,
        fill_empty: Some(false),
        ..Default::default()
    };
    let r = q
        .batch_get_ad_clicks(authed(batch.clone(), ADMIN))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(u64, u64)> = r.ads.iter().map(|a| (a.ad_id, a.total_clicks)).collect();
    let want: Vec<(u64, u64)> = ids
        .iter()
        .map(|a| (*a, all.get(a).copied().unwrap_or(0)))
        .collect();
    assert_eq!(got, want, "BatchGetAdClicks in request order");
    assert_eq!(r.watermark_ms, w0.min(w1), "batch watermark = min");
    let r = q
        .batch_get_ad_clicks(authed(batch.clone(), ADV_B_KEY))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<u64> = r.ads.iter().map(|a| a.total_clicks).collect();
    let of_b = counts(&sent, |s| s.advertiser == ADV_B);
    let want: Vec<u64> = ids
        .iter()
        .map(|a| of_b.get(a).copied().unwrap_or(0))
        .collect();
    assert_eq!(got, want, "BatchGetAdClicks with advertiser B's key");

    // --- GetTotals: advertiser A's ads live on both shards; clicks add up, users are the
    // union (four users over every ad: summing the shards' estimates would say more).
    let totals = |scope: v1::TotalsScope, id: u64| GetTotalsRequest {
        scope: scope as i32,
        id,
        from_ms: range.0,
        to_ms: range.1,
        granularity: Granularity::Hour as i32,
        fill_empty: Some(false),
        ..Default::default()
    };
    let users_of = |keep: &dyn Fn(&Sent) -> bool| {
        sent.iter()
            .filter(|s| keep(s))
            .map(|s| s.user)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64
    };
    for (key, scope, id, keep) in [
        (
            ADMIN,
            v1::TotalsScope::Advertiser,
            ADV_A,
            Box::new(|s: &Sent| s.advertiser == ADV_A) as Box<dyn Fn(&Sent) -> bool>,
        ),
        (
            ADMIN,
            v1::TotalsScope::Campaign,
            1,
            Box::new(|_: &Sent| true),
        ),
        (
            ADV_B_KEY,
            v1::TotalsScope::Campaign,
            1,
            Box::new(|s: &Sent| s.advertiser == ADV_B),
        ),
        (
            ADV_B_KEY,
            v1::TotalsScope::Advertiser,
            ADV_A,
            Box::new(|_: &Sent| false),
        ),
    ] {
        let r = q
            .get_totals(authed(totals(scope, id), key))
            .await
            .unwrap()
            .into_inner();
        let clicks = sent.iter().filter(|s| keep(s)).count() as u64;
        let ads = counts(&sent, |s| keep(s)).len() as u32;
        let what = format!("GetTotals {scope:?} {id} as {key}");
        assert_eq!(r.total_clicks, clicks, "{what}");
        assert_eq!(r.total_unique_users, users_of(&*keep), "{what}");
        assert_eq!(r.ads, ads, "{what}");
        assert_eq!(
            r.buckets.iter().map(|b| b.clicks).sum::<u64>(),
            clicks,
            "{what}"
        );
        assert!(
            r.buckets.iter().all(|b| b.users_sketch.is_empty()),
            "{what}: no sketches unasked"
        );
        if clicks > 0 {
            assert_eq!(r.watermark_ms, w0.min(w1), "{what}: min watermark");
        }
    }

    // --- WatchTopAds through the front: the first update is TopAds's answer.
    let mut watch = q
        .watch_top_ads(authed(
            v1::WatchTopAdsRequest {
                query: Some(top_req(5, range, None)),
                interval_ms: 100,
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().expect("a first update");
    assert_eq!(pairs(&first), ranked(&all, 5), "WatchTopAds first update");
    assert_eq!(first.watermark_ms, w0.min(w1), "WatchTopAds watermark");
    drop(watch);

    // --- Breakdown by country, for an ad of each shard.
    for ad in [ads0[0], ads1[0]] {
        let r = q
            .breakdown(authed(
                BreakdownRequest {
                    ad_id: ad,
                    from_ms: range.0,
                    to_ms: range.1,
                    group_by: Dimension::Country as i32,
                    n: 10,
                    ..Default::default()
                },
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner();
        let mut got: Vec<(String, u64)> = r
            .values
            .iter()
            .map(|v| (v.value.clone(), v.clicks))
            .collect();
        got.sort();
        let mut want: Vec<(String, u64)> = ["DE", "US"]
            .iter()
            .map(|c| {
                let n = counts(&sent, |s| s.ad == ad && s.country == *c);
                (c.to_string(), n.get(&ad).copied().unwrap_or(0))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        want.sort();
        assert_eq!(got, want, "Breakdown of ad {ad} by country");
    }

    // --- INVALID_ARGUMENT: checked by the front, and passed through from a shard.
    let bad_country = GetAdClicksRequest {
        ad_id: ads1[0],
        from_ms: range.0,
        to_ms: range.1,
        granularity: Granularity::Minute as i32,
        filter: Some(Filter {
            country: vec!["ZZZ".into()],
            ..Default::default()
        }),
        fill_empty: None,
        ..Default::default()
    };
    let e = q
        .get_ad_clicks(authed(bad_country, ADMIN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let v = e.get_details_bad_request().unwrap().field_violations;
    assert_eq!(v[0].field, "filter.country[0]", "{v:?}");
    // 3 hours back at minute granularity: valid for the front, before the shard's 60
    // minutes of retention. The shard's status reaches the caller as the shard gave it.
    let before = GetAdClicksRequest {
        ad_id: ads0[0],
        from_ms: now - 3 * HOUR,
        to_ms: now,
        granularity: Granularity::Minute as i32,
        filter: None,
        fill_empty: None,
        ..Default::default()
    };
    let via_front = q
        .get_ad_clicks(authed(before.clone(), ADMIN))
        .await
        .unwrap_err();
    let direct = query_client(s0.grpc_addr())
        .await
        .unwrap()
        .get_ad_clicks(authed(before.clone(), ADMIN))
        .await
        .unwrap_err();
    assert_eq!(direct.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        (via_front.code(), via_front.message()),
        (direct.code(), direct.message())
    );
    let v = via_front
        .get_details_bad_request()
        .unwrap()
        .field_violations;
    let fields = |v: &[tonic_types::FieldViolation]| {
        v.iter()
            .map(|x| format!("{}|{}|{}", x.field, x.reason, x.description))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        fields(&v),
        fields(&direct.get_details_bad_request().unwrap().field_violations)
    );
    assert_eq!(
        (v[0].field.as_str(), v[0].reason.as_str()),
        ("from_ms", "BEFORE_RETENTION")
    );
    // Unknown keys are refused by the front itself.
    let e = q
        .top_ads(authed(top_req(3, range, None), "not-a-key-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // --- The HTTP mirror on the front answers the same.
    let get = |path: String| {
        let web = web.clone();
        let url = format!("{http}{path}");
        async move {
            let r = web
                .get(url)
                .header("authorization", format!("Bearer {ADMIN}"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (
                status,
                serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            )
        }
    };
    let (status, body) = get(format!(
        "/v1/ads/top?n=5&from_ms={}&to_ms={}",
        range.0, range.1
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    let top: Vec<(u64, u64)> = body["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["ad_id"].as_u64().unwrap(), a["clicks"].as_u64().unwrap()))
        .collect();
    assert_eq!(top, ranked(&all, 5), "HTTP top");
    let ad = ads1[0];
    let (status, body) = get(format!(
        "/v1/ads/{ad}/clicks?from_ms={}&to_ms={}&country=US",
        range.0, range.1
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["total_clicks"].as_u64(),
        counts(&sent, |s| s.ad == ad && s.country == "US")
            .get(&ad)
            .copied()
            .or(Some(0))
    );
    let qs: String = ids.iter().map(|a| format!("ad_id={a}&")).collect();
    let (status, body) = get(format!(
        "/v1/ads/clicks?{qs}from_ms={}&to_ms={}",
        range.0, range.1
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<(u64, u64)> = body["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["ad_id"].as_u64().unwrap(),
                a["total_clicks"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(u64, u64)> = ids
        .iter()
        .map(|a| (*a, all.get(a).copied().unwrap_or(0)))
        .collect();
    assert_eq!(got, want, "HTTP batch");
    let (status, body) = get(format!(
        "/v1/ads/{}/clicks?from_ms={}&to_ms={}",
        ads0[0],
        now - 3 * HOUR,
        now
    ))
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["invalid_params"][0]["name"], "from_ms", "{body}");
    assert_eq!(
        body["invalid_params"][0]["code"], "BEFORE_RETENTION",
        "{body}"
    );
    let (status, body) = get("/readyz".into()).await;
    assert_eq!((status, &body["ready"]), (200, &serde_json::json!(true)));
    // gRPC health as on the aggregator (SERVING while every shard is).
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", front.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = |service: &str| {
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let req = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        async move { c.check(req).await.unwrap().into_inner().status }
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(health("").await, serving);
    assert_eq!(health("adclick.v1.QueryService").await, serving);

    // --- Shard s1 dies: TopAds fails naming it, s0's ads are still answered.
    s1.kill();
    let e = q
        .top_ads(authed(top_req(3, range, None), ADMIN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shard s1"), "{}", e.message());
    for ad in &ads0 {
        let r = ad_clicks(
            front.grpc_addr(),
            ADMIN,
            *ad,
            range,
            Granularity::Minute,
            None,
        )
        .await;
        assert_eq!(r.total_clicks, all[ad], "ad {ad} of the live shard");
    }
    let e = q
        .get_ad_clicks(authed(
            GetAdClicksRequest {
                ad_id: ads1[0],
                from_ms: range.0,
                to_ms: range.1,
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("shard s1"), "{}", e.message());
    let e = q
        .batch_get_ad_clicks(authed(batch, ADMIN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("shard s1"), "{}", e.message());
    let (status, body) = get(format!(
        "/v1/ads/top?n=5&from_ms={}&to_ms={}",
        range.0, range.1
    ))
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("shard s1"),
        "{body}"
    );
    // Readiness follows the shard's health, naming it.
    let mut ready_body = serde_json::Value::Null;
    for _ in 0..50 {
        let (status, body) = get("/readyz".into()).await;
        ready_body = body;
        if status == 503 && ready_body["reasons"].to_string().contains("shard s1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready_body["ready"], false, "{ready_body}");
    assert_ne!(health("").await, serving, "gRPC health follows readiness");
    assert!(
        ready_body["reasons"].to_string().contains("shard s1"),
        "{ready_body}"
    );
    let text = web
        .get(format!("{http}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines().any(|l| l.starts_with(
            "adclick_aggregator_front_shard_unavailable_total{shard=\"s1\",rpc=\"TopAds\"}"
        ) && !l.ends_with(" 0")),
        "{text}"
    );
    front.shutdown().await;
    s0.shutdown().await;
}
