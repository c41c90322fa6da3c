//! Helpers of this test binary only: the config most tests use (two shards, an advertiser
//! key besides the admin's), a seeded click generator, the oracles that compute expected
//! counts from generated clicks, and thin gRPC calls. Server setup lives in
//! `adclick-test-support`.

use std::collections::{BTreeMap, HashMap};

use adclick_aggregator::config::{ApiKey, Role};
use adclick_aggregator::{Aggregator, AggregatorConfig};
use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{
    self, Filter, GetAdClicksRequest, Granularity, IngestBatch, IngestClick, TopAdsRequest,
};
use adclick_test_support::aggregator::{INGEST, T0};
use adclick_test_support::common::{MIN, authed};
use tonic::transport::Channel;

/// The advertiser key of advertiser 1 in [`config`].
pub const ADV1: &str = "advertiser-1-key-0123";

/// The shared aggregator test config (`adclick_test_support::aggregator::config`: the
/// admin and ingest keys) plus the advertiser key [`ADV1`] and two shards.
pub fn config(dir: &std::path::Path) -> AggregatorConfig {
    let mut c = adclick_test_support::aggregator::config(dir);
    c.api_keys.push(ApiKey {
        key: ADV1.into(),
        role: Role::Advertiser,
        advertiser_id: Some(1),
    });
    c.shards.count = 2;
    c
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub const COUNTRIES: [&str; 3] = ["US", "DE", "FR"];
pub const OSES: [&str; 3] = ["ios", "android", "windows"];

/// `n` clicks on ads 1..=ads over `minutes` minutes after T0, users u0..u(users-1).
pub fn clicks(seed: u64, n: usize, ads: u64, minutes: i64, users: u64) -> Vec<IngestClick> {
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

pub async fn send(
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
                ..Default::default()
            },
            INGEST,
        ))
        .await
        .unwrap()
        .into_inner()
}

pub async fn clients(
    a: &Aggregator,
) -> (IngestServiceClient<Channel>, QueryServiceClient<Channel>) {
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
pub fn oracle(unique: &[IngestClick]) -> BTreeMap<(u64, i64), u64> {
    let mut m = BTreeMap::new();
    for c in unique {
        *m.entry((c.ad_id, c.event_time_ms.div_euclid(MIN) * MIN))
            .or_insert(0) += 1;
    }
    m
}

pub fn top_oracle(
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

pub async fn top(
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
        ..Default::default()
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

pub async fn ad_clicks(
    q: &mut QueryServiceClient<Channel>,
    key: &str,
    ad: u64,
    g: Granularity,
    filter: Option<Filter>,
) -> v1::GetAdClicksResponse {
    let req = GetAdClicksRequest {
        fill_empty: Some(false),
        ad_id: ad,
        from_ms: T0,
        to_ms: T0 + 2 * 86_400_000,
        granularity: g as i32,
        filter,
        ..Default::default()
    };
    q.get_ad_clicks(authed(req, key))
        .await
        .unwrap()
        .into_inner()
}
