//! Hostile or broken input from the wire must not damage state: absurd event times,
//! owner changes, absurd query ranges, ingest without the key.

use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::{self, GetAdClicksRequest, IngestBatch, IngestClick, TopAdsRequest};
use adclick_test_support::aggregator::{ADMIN, T0};
use adclick_test_support::common::{MIN, authed};
use tonic::transport::Channel;

use crate::util::*;

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
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let send_k = |ing: &mut IngestServiceClient<Channel>, seq: u64, cs: Vec<IngestClick>| {
        let mut req = tonic::Request::new(IngestBatch {
            collector_id: "c".into(),
            seq,
            clicks: cs,
            ..Default::default()
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
    let wm = a.metrics().watermark_seconds.get();
    let mut bad = clicks(22, 3, 3, 5, 5);
    bad[0].event_time_ms = i64::MAX;
    bad[1].event_time_ms = i64::MIN;
    bad[2].advertiser_id += 1; // same ad, another advertiser
    let ack = send_k(&mut ing, 2, bad).await;
    assert_eq!(ack.accepted, 0);
    assert_eq!(
        a.metrics().watermark_seconds.get(),
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
            fill_empty: None,
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
            ..Default::default()
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
