//! A shard whose committed stream position is older than the stream's first message:
//! retention (or a purge) removed messages it never applied. It must not resume from what
//! is left as if nothing happened (its counts would be silently short): the partition is
//! not consumed and readiness says `stream_retention_gap`, until an operator accepts the
//! gap with `source.accept_gap_before = <first sequence>`; then it resumes from there.
//!
//! One nats-server, a stream of P = 1 created as a collector creates it, batches published
//! as the collector's sink publishes them, an aggregator shard in-process on one data dir
//! across three starts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use adclick_aggregator::source::{SourceConfig, SourceKind};
use adclick_proto::v1::{IngestBatch, IngestClick};
use adclick_test_support::nats::NatsCluster;

use crate::support::*;

const COLLECTOR: &str = "edge-gap";

/// Publishes batch `seq` of `n` clicks on ad `ad` (impression ids from `seq`) to
/// `clicks.0`, and returns what it adds to the per-ad counts.
async fn publish(js: &async_nats::jetstream::Context, seq: u64, ad: u64, n: u64) -> (u64, u64) {
    let now = now_ms();
    let clicks: Vec<IngestClick> = (0..n)
        .map(|i| IngestClick {
            impression_id: ((u128::from(seq) << 32) | u128::from(i))
                .to_be_bytes()
                .to_vec(),
            ad_id: ad,
            advertiser_id: 1,
            campaign_id: 1,
            token_expires_at_ms: now + HOUR,
            event_time_ms: now,
            received_at_ms: now,
            ..Default::default()
        })
        .collect();
    let batch = IngestBatch {
        collector_id: COLLECTOR.into(),
        seq,
        clicks,
        acked_floor: seq,
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        async_nats::header::NATS_MESSAGE_ID,
        adclick_collector::forward::jetstream::msg_id(COLLECTOR, seq, 0).as_str(),
    );
    js.publish_with_headers("clicks.0", h, prost::Message::encode_to_vec(&batch).into())
        .await
        .unwrap()
        .await
        .unwrap();
    (ad, n)
}

async fn shard(
    dir: &Path,
    urls: Vec<String>,
    accept_gap_before: u64,
) -> adclick_aggregator::Aggregator {
    let mut c = aggregator_config(dir, "127.0.0.1:0".parse().unwrap());
    c.source = SourceConfig {
        kind: SourceKind::Jetstream,
        servers: urls,
        partitions: Some("0".into()),
        durable_prefix: "gap".into(),
        accept_gap_before,
        ..Default::default()
    };
    adclick_aggregator::start(c).await.unwrap()
}

async fn readyz(a: &adclick_aggregator::Aggregator) -> (u16, String) {
    let r = http_client()
        .get(format!("http://{}/readyz", a.http_addr()))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_behind_the_streams_retention_stops_and_says_so() {
    within(Duration::from_secs(120), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(&dir.path().join("nats"), 1).await;
    let mut js_cfg = adclick_collector::config::JetStreamConfig::default();
    js_cfg.servers = nats.urls();
    js_cfg.partitions = 1;
    js_cfg.replicas = 1;
    js_cfg.max_bytes = 64 << 20;
    adclick_collector::forward::jetstream::init(&js_cfg, Duration::from_secs(20))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nats.client().await);
    let data = dir.path().join("shard");
    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let wait = Duration::from_secs(30);

    // Applied and committed: ads 1 and 2.
    let mut want = BTreeMap::new();
    for (seq, ad, n) in [(1, 1, 5), (2, 2, 3)] {
        let (a, c) = publish(&js, seq, ad, n).await;
        *want.entry(a).or_insert(0) += c;
    }
    let a = shard(&data, nats.urls(), 0).await;
    let got = poll_counts(a.grpc_addr(), range, wait, |c| *c == want).await;
    assert_eq!(got, want);
    a.shutdown().await;

    // While the shard is down: batch 3 is published and lost to a purge (as retention
    // would drop it), batch 4 stays.
    publish(&js, 3, 3, 4).await;
    let mut stream = js.get_stream("CLICKS").await.unwrap();
    stream.purge().await.unwrap();
    publish(&js, 4, 4, 2).await;
    let first = stream.info().await.unwrap().state.first_sequence;
    assert_eq!(first, 4, "the purge left only batch 4");

    // Restarted on its data dir: the partition is not consumed, readiness says why.
    let a = shard(&data, nats.urls(), 0).await;
    assert!(
        eventually(wait, || {
            a.metrics()
                .source
                .restarts
                .get_or_create(&adclick_aggregator::source::metrics::ReasonLabel {
                    reason: "retention_gap",
                })
                .get()
                >= 1
        })
        .await,
        "no retention gap detected"
    );
    let (status, body) = readyz(&a).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stream_retention_gap"), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = poll_counts(a.grpc_addr(), range, wait, |_| true).await;
    assert_eq!(got, want, "nothing after the gap is counted");
    a.shutdown().await;

    // The operator accepts the gap: it resumes from the stream's first message.
    let a = shard(&data, nats.urls(), first).await;
    want.insert(4, 2);
    let got = poll_counts(a.grpc_addr(), range, wait, |c| *c == want).await;
    assert_eq!(
        got, want,
        "batch 4 counted after the accepted gap; batch 3 is lost"
    );
    let (status, body) = readyz(&a).await;
    assert_eq!(status, 200, "{body}");
    a.shutdown().await;
}
