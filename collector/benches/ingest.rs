//! Criterion benchmark of the collector's per-click path without I/O, per batch of 100:
//! the protobuf `ClickBatch` body as it arrives, its decoding, token verification, clock
//! correction, Bloom + exact dedup, the spool record's click bytes, and the commit of the
//! dedup entries.
//! `cargo bench -p adclick-collector --bench ingest`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use adclick_collector::config::{DedupConfig, TokenChecks};
use adclick_collector::http::decode::decode_batch;
use adclick_collector::ingest::keys::KeySource;
use adclick_collector::ingest::{Processor, RequestCtx};
use adclick_collector::metrics::Metrics;
use adclick_collector::routing::HotAds;
use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1;
use adclick_sdk::{AdPlacement, ImpressionSigner};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;

const NOW: i64 = 1_800_000_000_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ring = Keyring::new(SigningKey::new(1, &[7; 32]).unwrap());
    let text = KeyFile {
        keyring: ring.clone(),
        created: vec![(1, 0)],
    }
    .render()
    .unwrap();
    std::fs::write(dir.path().join("keys.toml"), text).unwrap();
    let keys = Arc::new(KeySource::open(&dir.path().join("keys.toml")).unwrap());
    let dedup = DedupConfig {
        expected_clicks: 10_000_000,
        exact_capacity: 2_000_000,
        ..Default::default()
    };
    let p = Processor::new(
        keys,
        TokenChecks::default(),
        &dedup,
        256,
        Arc::new(HotAds::new(8)),
        Arc::new(Metrics::new()),
        NOW,
    );
    let signer = ImpressionSigner::new(ring);
    let ctx = RequestCtx {
        received_at_ms: NOW,
        client_ip: Some("10.1.2.3".parse().unwrap()),
        ua_class: adclick_proto::v1::UserAgentClass::Client,
    };
    let mut n = 0u64;
    let mut batch = || {
        let clicks = (0..100)
            .map(|_| {
                n += 1;
                let ad = AdPlacement {
                    ad_id: n % 10_000,
                    advertiser_id: 3,
                    campaign_id: 4,
                    landing_url: "https://shop.example.com/p?id=123".into(),
                };
                v1::Click {
                    token: signer.mint_at(&ad, NOW - 1000).unwrap().token,
                    occurred_at_ms: NOW - 500,
                    sent_at_ms: NOW - 100,
                    country: "US".into(),
                    device: 2,
                    os: "android".into(),
                    site: "news.example.com".into(),
                    user_id: format!("user-{}", n % 50_000),
                    ..Default::default()
                }
            })
            .collect::<Vec<_>>();
        v1::ClickBatch {
            sdk_name: "bench".into(),
            sdk_version: "1".into(),
            sent_at_ms: NOW - 100,
            clicks,
        }
        .encode_to_vec()
    };
    let mut g = c.benchmark_group("collector");
    g.throughput(Throughput::Elements(100));
    g.bench_function("process_and_encode_batch_100", |b| {
        b.iter_batched(
            &mut batch,
            |body| {
                let batch = decode_batch(&body, 1000).unwrap();
                let mut out = p.process(&batch.clicks(), &ctx);
                assert_eq!(out.accepted(), 100);
                let bytes = out.take_encoded();
                p.committed(&out);
                bytes
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
