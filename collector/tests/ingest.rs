//! The HTTP ingest API end to end: the native SDK and raw HTTP (JSON, protobuf, browser
//! beacons and preflights, `GET /c/{token}` redirects) into a collector forwarding to the
//! in-test aggregator. Valid clicks arrive once each; everything else gets its own status
//! and reason.

use std::collections::HashSet;
use std::time::Duration;

use adclick_proto::v1::{ClickBatch, ClickBatchResult};
use adclick_sdk::{Device, Dimensions, Tracker};
use adclick_test_support::collector::ad;
use adclick_test_support::common::{eventually, now_ms, signer};
use prost::Message;

use crate::util::*;

/// SDK -> collector -> aggregator: valid clicks arrive once each; duplicates (in and
/// across batches), forged, expired and malformed clicks are counted by reason,
/// quarantined, and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clicks_are_verified_deduplicated_spooled_and_forwarded() {
    let Started {
        dir,
        ring,
        agg,
        col,
    } = started(|_| {}).await;

    let signer = signer(&ring);
    let valid: Vec<_> = (0..20).map(|i| signer.mint(&ad(i % 4)).unwrap()).collect();
    let forged = signer_of_other_key().mint(&ad(1)).unwrap();
    let expired = signer.mint_at(&ad(2), now_ms() - 7_200_000).unwrap(); // 1 h ttl, 2 h ago

    let tracker = Tracker::builder(format!("http://{}", col.http_addr()))
        .batch_size(8)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let dims = Dimensions::new()
        .country("US")
        .device(Device::Mobile)
        .os("ios")
        .site("news.example");
    for (i, m) in valid.iter().enumerate() {
        tracker
            .click(&m.token, dims.clone().user_id(format!("u{i}")))
            .unwrap();
        if i % 5 == 0 {
            // Same token again: 4 duplicates, some in the same batch, some across.
            tracker.click(&m.token, dims.clone()).unwrap();
        }
    }
    tracker.click(&forged.token, dims.clone()).unwrap();
    tracker.click(&forged.token, dims.clone()).unwrap();
    tracker.click(&expired.token, dims.clone()).unwrap();
    tracker.click("AAAA", dims.clone()).unwrap();
    tracker.flush().await.unwrap();
    // A duplicate in a later request, after the first copy is durable.
    tracker.click(&valid[3].token, dims.clone()).unwrap();
    tracker.flush().await.unwrap();

    let applied = agg.wait_applied(20).await;
    let expected: HashSet<Vec<u8>> = valid.iter().map(id_of).collect();
    assert_eq!(applied.keys().cloned().collect::<HashSet<_>>(), expected);
    {
        let state = agg.agg.state.lock().unwrap();
        assert_eq!(
            state.duplicates, 0,
            "the collector already dropped every duplicate"
        );
        let forwarded: usize = state.batches.iter().map(|b| b.clicks.len()).sum();
        assert_eq!(forwarded, 20);
        assert!(
            state
                .batches
                .iter()
                .all(|b| b.collector_id == col.collector_id())
        );
    }
    for m in &valid {
        let c = &applied[&id_of(m)];
        assert_eq!(
            (c.ad_id, c.advertiser_id, c.campaign_id),
            (m.impression.ad_id, m.impression.advertiser_id, 7)
        );
        assert_eq!(c.token_expires_at_ms, m.impression.expires_at_ms);
        assert_eq!(
            (c.country.as_str(), c.device, c.os.as_str(), c.site.as_str()),
            ("US", 2, "ios", "news.example")
        );
        assert_eq!(c.client_ip, vec![127, 0, 0, 1]);
        assert!(
            c.event_time_ms <= c.received_at_ms && c.event_time_ms >= m.impression.issued_at_ms
        );
        assert!(!c.clock_skew_flagged);
    }

    let m = col.metrics();
    assert_eq!(m.clicks_with("accepted"), 20);
    assert_eq!(m.clicks_with("duplicate"), 5);
    assert_eq!(m.clicks_with("bad_signature"), 2);
    assert_eq!(m.clicks_with("expired"), 1);
    assert_eq!(m.clicks_with("malformed"), 1);
    assert!(eventually(POLL_LIMIT, || m.forwarded_clicks.get() == 20).await);

    // Every rejected click is in the quarantine log with its reason.
    let qpath = dir.path().join("data/quarantine.jsonl");
    assert!(
        eventually(POLL_LIMIT, || std::fs::read_to_string(&qpath)
            .map_or(0, |t| t.lines().count())
            == 4)
        .await
    );
    let mut reasons: Vec<String> = std::fs::read_to_string(&qpath)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["bad_signature", "bad_signature", "expired", "malformed"]
    );

    let text = m.render();
    assert!(
        text.contains("adclick_collector_clicks_total{outcome=\"accepted\"} 20"),
        "{text}"
    );
    col.shutdown().await;
    agg.stop().await;
}

/// curl users: JSON in, JSON out; every malformed request gets its own status and message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_codes_and_json() {
    let Started {
        dir: _dir,
        ring,
        agg,
        col,
    } = started(|cfg| {
        cfg.limits.max_body_bytes = 4096;
        cfg.limits.max_clicks_per_batch = 5;
    })
    .await;
    let base = format!("http://{}", col.http_addr());
    let c = http();
    let tok = signer(&ring).mint(&ad(9)).unwrap();

    let body = format!(
        r#"{{"clicks":[{{"token":"{}","country":"de","device":"tablet"}},{{"token":"nope"}}]}}"#,
        tok.token
    );
    let r = c
        .post(format!("{base}/v1/clicks"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"accepted": 1, "duplicate": 0, "rejected": {"malformed": 1}})
    );

    // Protobuf in, protobuf out.
    let r = post_proto(
        &c,
        &col,
        &ClickBatch {
            clicks: vec![click(&tok.token)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["content-type"], "application/x-protobuf");
    let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!((res.accepted, res.duplicate), (0, 1));

    let r = c
        .post(format!("{base}/v1/clicks"))
        .header("content-type", "text/csv")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = c
        .post(format!("{base}/v1/clicks"))
        .header("content-type", "application/x-protobuf")
        .body(vec![0xff, 0xff, 0xff])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("not a protobuf ClickBatch")
    );
    let r = c
        .post(format!("{base}/v1/clicks"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(format!("{base}/v1/clicks"))
        .header("content-type", "application/x-protobuf")
        .body(vec![0u8; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let six = ClickBatch {
        clicks: (0..6).map(|_| click("t")).collect(),
        ..Default::default()
    };
    let r = post_proto(&c, &col, &six).await;
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("max_clicks_per_batch"));
    let r = c.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(format!("{base}/v1/clicks")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (200, r#"{"ready":true,"reasons":[]}"#.to_string())
    );
    let metrics = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("adclick_collector_requests_total{route=\"clicks\",code=\"415\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("adclick_collector_fsync_seconds_bucket"));

    // The server survived all of it and still forwards.
    assert_eq!(agg.wait_applied(1).await.len(), 1);
    col.shutdown().await;
    agg.stop().await;
}

/// `GET /c/{token}` records the click and redirects to the token's landing URL; a bad
/// token never redirects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_records_and_never_opens_a_redirect() {
    let Started {
        dir: _dir,
        ring,
        agg,
        col,
    } = started(|_| {}).await;
    let base = format!("http://{}", col.http_addr());
    let c = http();
    let good = signer(&ring).mint(&ad(5)).unwrap();

    let r = c
        .get(format!("{base}/c/{}", good.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "https://shop.example/ad/5");
    assert_eq!(r.headers()["cache-control"], "no-store");
    // A second click on the same impression still redirects but is not counted again.
    let r = c
        .get(format!("{base}/c/{}", good.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);

    let forged = signer_of_other_key().mint(&ad(5)).unwrap();
    let expired = signer(&ring).mint_at(&ad(5), now_ms() - 7_200_000).unwrap();
    for (tok, code) in [
        (forged.token.as_str(), 403),
        (expired.token.as_str(), 410),
        ("garbage!", 400),
    ] {
        let r = c.get(format!("{base}/c/{tok}")).send().await.unwrap();
        assert_eq!(r.status(), code, "{tok}");
        assert!(r.headers().get("location").is_none());
    }
    let applied = agg.wait_applied(1).await;
    assert_eq!(applied.len(), 1);
    let got = &applied[&id_of(&good)];
    assert_eq!(got.ad_id, 5);
    assert_eq!(
        got.event_time_ms, got.received_at_ms,
        "server-side click: occurred = sent = received"
    );
    let m = col.metrics();
    assert_eq!(
        (m.clicks_with("accepted"), m.clicks_with("duplicate")),
        (1, 1)
    );
    assert_eq!(
        (
            m.clicks_with("bad_signature"),
            m.clicks_with("expired"),
            m.clicks_with("malformed")
        ),
        (1, 1, 1)
    );
    col.shutdown().await;
    agg.stop().await;
}

/// Browsers: the preflight is answered for allowed origins only, and a beacon's
/// `text/plain` body (protobuf bytes) is accepted with the CORS header on the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_beacon_content_type() {
    let Started {
        dir: _dir,
        ring,
        agg,
        col,
    } = started(|cfg| cfg.cors_origins = vec!["https://news.example".into()]).await;
    let c = http();
    let url = format!("http://{}/v1/clicks", col.http_addr());
    let pre = |origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let r = pre("https://news.example").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://news.example"
    );
    assert!(
        r.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(r.headers()["access-control-allow-headers"], "content-type");
    let r = pre("https://evil.example").await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let tok = signer(&ring).mint(&ad(3)).unwrap();
    let body = ClickBatch {
        clicks: vec![click(&tok.token)],
        ..Default::default()
    }
    .encode_to_vec();
    let r = c
        .post(&url)
        .header("origin", "https://news.example")
        .header("content-type", "text/plain;charset=UTF-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://news.example"
    );
    assert_eq!(
        ClickBatchResult::decode(r.bytes().await.unwrap())
            .unwrap()
            .accepted,
        1
    );
    assert_eq!(agg.wait_applied(1).await.len(), 1);
    col.shutdown().await;
    agg.stop().await;
}

/// A client that gives up on its request (an HTTP/2 stream reset, an SDK shutting down)
/// while the collector is committing it: what the writer makes durable is forwarded, so it
/// must also be counted as accepted and its id committed for dedup. The requests here are
/// abandoned after 0 to 3 ms, so some go before the collector sees them, some during the
/// fsync they wait for, some after the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_while_committing_still_counts_what_was_written() {
    let Started {
        dir: _dir,
        ring,
        agg,
        col,
    } = started(|_| {}).await;
    let signer = signer(&ring);
    adclick_sdk::HttpTransport::install_crypto_provider();
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let minted: Vec<_> = (0..300).map(|i| signer.mint(&ad(i % 4)).unwrap()).collect();
    for (i, m) in minted.iter().enumerate() {
        let batch = ClickBatch {
            clicks: vec![click(&m.token)],
            ..Default::default()
        };
        let send = client
            .post(format!("http://{}/v1/clicks", col.http_addr()))
            .header("content-type", "application/x-protobuf")
            .body(batch.encode_to_vec())
            .send();
        let patience = Duration::from_micros((i as u64 * 37) % 3_000);
        let _ = tokio::time::timeout(patience, send).await;
    }
    // Let the server finish what it started, then the forwarder drain the spool.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = col.metrics();
    assert!(eventually(POLL_LIMIT, || m.forward_lag_records.get() == 0).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forwarded = agg.applied().len() as u64;
    assert!(
        forwarded > 0,
        "no request got through: the test proves nothing"
    );
    assert_eq!(
        m.clicks_with("accepted"),
        forwarded,
        "every click written and forwarded is counted as accepted"
    );
    // And each is committed for dedup: a repeat is a duplicate, not a suspect.
    let written: Vec<_> = minted
        .iter()
        .filter(|m| agg.applied().contains_key(&id_of(m)))
        .collect();
    let again = ClickBatch {
        clicks: written.iter().map(|m| click(&m.token)).collect(),
        ..Default::default()
    };
    let r = post_proto(&http(), &col, &again).await;
    let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!((res.accepted, res.duplicate), (0, written.len() as u32));
    col.shutdown().await;
    agg.stop().await;
}
