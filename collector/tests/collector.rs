//! Collector tests over real sockets and files: the native SDK and raw HTTP on one side, a
//! gRPC `IngestService` on the other. Every expected number is computed from what the
//! test sent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use adclick_collector::Collector;
use adclick_proto::v1::{self, ClickBatch, ClickBatchResult};
use adclick_sdk::core::Clock;
use adclick_sdk::{Device, Dimensions, RetryPolicy, Tracker};
use prost::Message;
use support::*;

fn http() -> reqwest::Client {
    adclick_sdk::HttpTransport::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn post_proto(c: &reqwest::Client, col: &Collector, batch: &ClickBatch) -> reqwest::Response {
    c.post(format!("http://{}/v1/clicks", col.http_addr()))
        .header("content-type", "application/x-protobuf")
        .body(batch.encode_to_vec())
        .send()
        .await
        .unwrap()
}

fn click(token: &str) -> v1::Click {
    let now = now_ms();
    v1::Click {
        token: token.into(),
        occurred_at_ms: now,
        sent_at_ms: now,
        ..Default::default()
    }
}

fn id_of(token_signer_out: &adclick_sdk::MintedToken) -> Vec<u8> {
    token_signer_out.impression.impression_id.to_vec()
}

/// SDK -> collector -> aggregator: valid clicks arrive once each; duplicates (in and
/// across batches), forged, expired and malformed clicks are counted by reason,
/// quarantined, and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clicks_are_verified_deduplicated_spooled_and_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let col = adclick_collector::start(config(dir.path(), vec![agg.url()]))
        .await
        .unwrap();

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
    assert!(eventually(|| m.forwarded_clicks.get() == 20).await);

    // Every rejected click is in the quarantine log with its reason.
    let qpath = dir.path().join("data/quarantine.jsonl");
    assert!(
        eventually(|| std::fs::read_to_string(&qpath).map_or(0, |t| t.lines().count()) == 4).await
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

fn signer_of_other_key() -> adclick_sdk::ImpressionSigner {
    // Same key id as the collector's, different secret: a forgery.
    signer(&keyring(1, 99))
}

/// curl users: JSON in, JSON out; every malformed request gets its own status and message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_codes_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let mut cfg = config(dir.path(), vec![agg.url()]);
    cfg.limits.max_body_bytes = 4096;
    cfg.limits.max_clicks_per_batch = 5;
    let col = adclick_collector::start(cfg).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_rate_limit_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    write_keys(&dir.path().join("keys.toml"), &keyring(1, 1));
    let mut cfg = config(dir.path(), vec!["http://127.0.0.1:1".into()]);
    cfg.limits.rate_limit_per_ip = 0.5;
    cfg.limits.rate_limit_burst = 2.0;
    let col = adclick_collector::start(cfg).await.unwrap();
    let c = http();
    let empty = ClickBatch::default();
    let codes: Vec<u16> = futures_codes(&c, &col, &empty, 3).await;
    assert_eq!(codes, [202, 202, 429]);
    let r = post_proto(&c, &col, &empty).await;
    // One click's worth at 0.5 clicks/s: 2 s.
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(col.metrics().rate_limited.get(), 2);
    col.shutdown().await;
}

async fn futures_codes(c: &reqwest::Client, col: &Collector, b: &ClickBatch, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(post_proto(c, col, b).await.status().as_u16());
    }
    out
}

/// `GET /c/{token}` records the click and redirects to the token's landing URL; a bad
/// token never redirects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_records_and_never_opens_a_redirect() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let col = adclick_collector::start(config(dir.path(), vec![agg.url()]))
        .await
        .unwrap();
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

struct OffsetClock(i64);
impl Clock for OffsetClock {
    fn now_ms(&self) -> i64 {
        now_ms() + self.0
    }
}

/// Device clocks off by an hour are corrected to within the transit time; clocks off by
/// more than the bound are counted at received_at and flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_clocks_are_corrected_or_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let mut cfg = config(dir.path(), vec![agg.url()]);
    cfg.tokens.max_device_clock_skew_ms = 6 * 3_600_000;
    let col = adclick_collector::start(cfg).await.unwrap();
    let s = signer(&ring);
    let endpoint = format!("http://{}", col.http_addr());
    let mut ids = Vec::new();
    for (offset, tag) in [
        (3_600_000i64, "fast"),
        (-3_600_000, "slow"),
        (10 * 86_400_000, "absurd"),
    ] {
        let t = Tracker::builder(&endpoint)
            .clock(Arc::new(OffsetClock(offset)))
            .build()
            .unwrap();
        let m = s.mint(&ad(1)).unwrap();
        let before = now_ms();
        t.click(&m.token, Dimensions::new().user_id(tag)).unwrap();
        t.flush().await.unwrap();
        ids.push((m, before, now_ms(), tag));
    }
    let applied = agg.wait_applied(3).await;
    for (m, before, after, tag) in ids {
        let c = &applied[&id_of(&m)];
        assert_eq!(c.user_id, tag);
        assert!(
            c.event_time_ms >= before - 1 && c.event_time_ms <= after,
            "{tag}: {} not in [{before}, {after}]",
            c.event_time_ms
        );
        assert_eq!(c.clock_skew_flagged, tag == "absurd", "{tag}");
        if tag == "absurd" {
            assert_eq!(c.event_time_ms, c.received_at_ms);
        }
    }
    assert_eq!(col.metrics().clock_skew_flagged.get(), 1);
    col.shutdown().await;
    agg.stop().await;
}

/// With a tiny, saturated Bloom filter almost every new click is a Bloom positive; the
/// exact check still accepts every valid click and drops only real duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bloom_false_positives_never_lose_a_valid_click() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let mut cfg = config(dir.path(), vec![agg.url()]);
    cfg.dedup.expected_clicks = 1; // clamped to the smallest filter: saturates at once
    cfg.dedup.false_positive_rate = 0.4;
    // 3,060 clicks from one address in a moment: above the default per-IP click rate.
    cfg.limits.rate_limit_per_ip = 0.0;
    let col = adclick_collector::start(cfg).await.unwrap();
    let s = signer(&ring);
    let minted: Vec<_> = (0..3000).map(|i| s.mint(&ad(i % 50)).unwrap()).collect();
    let c = http();
    for chunk in minted.chunks(500) {
        let mut clicks: Vec<_> = chunk.iter().map(|m| click(&m.token)).collect();
        clicks.extend(chunk.iter().take(10).map(|m| click(&m.token)));
        let r = post_proto(
            &c,
            &col,
            &ClickBatch {
                clicks,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(r.status(), 202);
    }
    let applied = agg.wait_applied(3000).await;
    assert_eq!(applied.len(), 3000);
    let m = col.metrics();
    assert_eq!(
        (m.clicks_with("accepted"), m.clicks_with("duplicate")),
        (3000, 60)
    );
    assert!(
        m.dedup_suspect.get() > 500,
        "the filter did produce false positives: {}",
        m.dedup_suspect.get()
    );
    col.shutdown().await;
    agg.stop().await;
}

/// The aggregator is unreachable while clicks arrive: the SDK still gets 202s (the
/// spool has them) and everything is forwarded exactly once when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_outage_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_addr = free_addr();
    let col = adclick_collector::start(config(dir.path(), vec![format!("http://{agg_addr}")]))
        .await
        .unwrap();
    let s = signer(&ring);
    let tracker = Tracker::builder(format!("http://{}", col.http_addr()))
        .batch_size(25)
        .retry_policy(RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        })
        .build()
        .unwrap();
    let minted: Vec<_> = (0..200).map(|i| s.mint(&ad(i % 7)).unwrap()).collect();
    for m in &minted {
        tracker.click(&m.token, Dimensions::new()).unwrap();
    }
    tracker.flush().await.unwrap();
    assert_eq!(tracker.stats().sent, 200, "the SDK saw no errors");
    let m = col.metrics().clone();
    assert!(
        eventually(|| m.forward_errors.get() >= 3).await,
        "the forwarder kept retrying"
    );
    assert_eq!(m.forwarded_clicks.get(), 0);

    let agg = fake_aggregator_on(agg_addr, FakeAggregator::default()).await;
    let applied = agg.wait_applied(200).await;
    assert_eq!(
        applied.keys().cloned().collect::<HashSet<_>>(),
        minted.iter().map(id_of).collect()
    );
    assert!(
        eventually(|| m.forwarded_clicks.get() == 200 && m.forward_lag_records.get() == 0).await
    );
    assert_eq!(agg.agg.state.lock().unwrap().duplicates, 0);
    col.shutdown().await;
    agg.stop().await;
}

/// Kill the collector's runtime mid-stream (no graceful shutdown), restart on the same
/// spool: every click that got a 202 is forwarded exactly once.
#[test]
fn crash_mid_stream_then_restart_forwards_every_acked_click_once() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_rt = tokio::runtime::Runtime::new().unwrap();
    let agg = agg_rt.block_on(fake_aggregator());
    let mut cfg = config(dir.path(), vec![agg.url()]);
    // 4,000 clicks from one address at once: above the default per-IP click rate.
    cfg.limits.rate_limit_per_ip = 0.0;
    let s = signer(&ring);
    let minted: Vec<_> = (0..4000).map(|i| s.mint(&ad(i % 13)).unwrap()).collect();

    // Run 1: clients post batches concurrently; the runtime is dropped while they run.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let col = rt.block_on(adclick_collector::start(cfg.clone())).unwrap();
    let url = format!("http://{}/v1/clicks", col.http_addr());
    let acked = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let client_rt = tokio::runtime::Runtime::new().unwrap();
    let senders: Vec<_> = minted
        .chunks(20)
        .map(|chunk| {
            let url = url.clone();
            let acked = acked.clone();
            let body = ClickBatch {
                clicks: chunk.iter().map(|m| click(&m.token)).collect(),
                ..Default::default()
            }
            .encode_to_vec();
            let ids: Vec<Vec<u8>> = chunk.iter().map(id_of).collect();
            client_rt.spawn(async move {
                tokio::time::sleep(Duration::from_millis(fastrand_ms())).await;
                let r = http()
                    .post(url)
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status() == 202) {
                    acked.lock().unwrap().extend(ids);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    // No graceful shutdown: the runtime and every task on it just die.
    rt.shutdown_background();
    drop(col);
    client_rt.block_on(async {
        for s in senders {
            let _ = s.await;
        }
    });
    let acked: Vec<Vec<u8>> = acked.lock().unwrap().clone();
    assert!(
        !acked.is_empty() && acked.len() < 4000,
        "the crash happened mid-stream: {} acked",
        acked.len()
    );

    // Run 2: same directory.
    let rt2 = tokio::runtime::Runtime::new().unwrap();
    let col2 = rt2.block_on(async {
        // The dying runtime's writer thread holds the directory until its last write ends.
        let mut last = None;
        for _ in 0..200 {
            match adclick_collector::start(cfg.clone()).await {
                Ok(c) => return c,
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("restart failed: {last:?}")
    });
    let applied = agg_rt.block_on(agg.wait_applied(acked.len()));
    agg_rt.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
    // Every acked click reached the aggregator and was applied there exactly once (the
    // fake aggregator, like the real one, applies by impression id). A resend after the
    // crash may group records differently and repeat clicks the aggregator already has;
    // its exact dedup drops them, and they are at most the clicks of one unacked group.
    let state = agg.agg.state.lock().unwrap();
    for id in &acked {
        assert!(applied.contains_key(id), "an acked click was lost");
    }
    assert!(state.applied.len() <= 4000);
    assert!(
        state.duplicates <= 16 * 20 * 20,
        "re-sent clicks: {}",
        state.duplicates
    );
    drop(state);
    rt2.block_on(col2.shutdown());
}

fn fastrand_ms() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() % 300
}

/// Keys rotate without a restart: after the key file changes, tokens of the new key are
/// accepted and tokens of the still-listed previous key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_changes_are_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let mut ring = keyring(1, 1);
    write_keys(&path, &ring);
    let agg = fake_aggregator().await;
    let col = adclick_collector::start(config(dir.path(), vec![agg.url()]))
        .await
        .unwrap();
    let c = http();
    let old = signer(&ring).mint(&ad(1)).unwrap();
    ring.rotate(adclick_proto::SigningKey::new(2, &[2; 32]).unwrap(), 2)
        .unwrap();
    let new = signer(&ring).mint(&ad(1)).unwrap();
    let r = post_proto(
        &c,
        &col,
        &ClickBatch {
            clicks: vec![click(&new.token)],
            ..Default::default()
        },
    )
    .await;
    let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        res.rejected.get("unknown_key"),
        Some(&1),
        "key 2 is not known yet"
    );
    write_keys(&path, &ring);
    let m = col.metrics().clone();
    assert!(
        eventually(|| m
            .key_reloads
            .get_or_create(&adclick_collector::metrics::ResultLabel { result: "ok" })
            .get()
            >= 1)
        .await
    );
    let new2 = signer(&ring).mint(&ad(1)).unwrap();
    let r = post_proto(
        &c,
        &col,
        &ClickBatch {
            clicks: vec![click(&new2.token), click(&old.token)],
            ..Default::default()
        },
    )
    .await;
    let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(res.accepted, 2);
    // A broken key file never replaces the good keys.
    std::fs::write(&path, "not toml").unwrap();
    assert!(
        eventually(|| m
            .key_reloads
            .get_or_create(&adclick_collector::metrics::ResultLabel { result: "error" })
            .get()
            >= 1)
        .await
    );
    let third = signer(&ring).mint(&ad(1)).unwrap();
    let r = post_proto(
        &c,
        &col,
        &ClickBatch {
            clicks: vec![click(&third.token)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ClickBatchResult::decode(r.bytes().await.unwrap())
            .unwrap()
            .accepted,
        1
    );
    col.shutdown().await;
    agg.stop().await;
}

/// Several aggregators: each click goes to exactly one shard, ads stay on their shard,
/// and an ad reported hot is spread over salted keys (and so over shards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_ad_and_fans_out_hot_ads() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let a = fake_aggregator().await;
    let b = fake_aggregator().await;
    *a.agg.hot.lock().unwrap() = vec![42];
    *b.agg.hot.lock().unwrap() = vec![42];
    let mut cfg = config(dir.path(), vec![a.url(), b.url()]);
    cfg.forward.hot_fanout = 8;
    let col = adclick_collector::start(cfg).await.unwrap();
    let s = signer(&ring);
    let c = http();
    // Round 1: ordinary traffic (the acks teach the collector that ad 42 is hot).
    let first: Vec<_> = (0..200).map(|i| s.mint(&ad(i % 20)).unwrap()).collect();
    post_proto(
        &c,
        &col,
        &ClickBatch {
            clicks: first.iter().map(|m| click(&m.token)).collect(),
            ..Default::default()
        },
    )
    .await;
    let total = || a.applied().len() + b.applied().len();
    assert!(eventually(|| total() == 200).await);
    // Round 2: ad 42 only.
    let hot: Vec<_> = (0..400).map(|_| s.mint(&ad(42)).unwrap()).collect();
    post_proto(
        &c,
        &col,
        &ClickBatch {
            clicks: hot.iter().map(|m| click(&m.token)).collect(),
            ..Default::default()
        },
    )
    .await;
    assert!(eventually(|| total() == 600).await);

    let (aa, bb) = (a.applied(), b.applied());
    assert!(
        aa.keys().all(|k| !bb.contains_key(k)),
        "no click on two shards"
    );
    for ad_id in 0..20u64 {
        let on_a = aa.values().any(|c| c.ad_id == ad_id && c.salt == 0);
        let on_b = bb.values().any(|c| c.ad_id == ad_id && c.salt == 0);
        assert!(!(on_a && on_b), "unsalted ad {ad_id} split across shards");
    }
    let hot_ids: HashSet<Vec<u8>> = hot.iter().map(id_of).collect();
    let salts: HashSet<u32> = aa
        .values()
        .chain(bb.values())
        .filter(|c| hot_ids.contains(&c.impression_id))
        .map(|c| c.salt)
        .collect();
    assert_eq!(salts, (1..=8).collect(), "hot ad spread over every salt");
    let hot_on_a = aa.keys().filter(|k| hot_ids.contains(*k)).count();
    assert!(
        hot_on_a > 0 && hot_on_a < 400,
        "hot ad spread over both shards: {hot_on_a} on a"
    );
    col.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// A full spool answers 503 + Retry-After and counts nothing; once the aggregator drains
/// it, the client's retry of the refused batch is accepted (not taken for duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_answers_503_and_the_retry_is_accepted_later() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_addr = free_addr();
    let mut cfg = config(dir.path(), vec![format!("http://{agg_addr}")]);
    cfg.spool.segment_bytes = 4096;
    cfg.spool.max_bytes = 8192;
    let col = adclick_collector::start(cfg).await.unwrap();
    let c = http();
    let s = signer(&ring);
    let mut accepted_ids = Vec::new();
    let mut refused = None;
    for _ in 0..20 {
        let minted: Vec<_> = (0..10).map(|i| s.mint(&ad(i)).unwrap()).collect();
        let batch = ClickBatch {
            clicks: minted.iter().map(|m| click(&m.token)).collect(),
            ..Default::default()
        };
        let r = post_proto(&c, &col, &batch).await;
        if r.status() == 503 {
            assert_eq!(r.headers()["retry-after"], "5");
            assert!(r.text().await.unwrap().contains("spool full"));
            refused = Some((batch, minted));
            break;
        }
        assert_eq!(r.status(), 202);
        accepted_ids.extend(minted.iter().map(id_of));
    }
    let (batch, minted) = refused.expect("the 8 KiB spool filled up");
    let m = col.metrics().clone();
    assert_eq!(m.clicks_with("accepted"), accepted_ids.len() as u64);
    assert_eq!(m.clicks_with("spool_unavailable"), 10);

    let agg = fake_aggregator_on(agg_addr, FakeAggregator::default()).await;
    agg.wait_applied(accepted_ids.len()).await;
    assert!(eventually(|| m.forward_lag_records.get() == 0).await);
    let r = post_proto(&c, &col, &batch).await;
    assert_eq!(r.status(), 202);
    let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (res.accepted, res.duplicate),
        (10, 0),
        "refused clicks were released from dedup"
    );
    accepted_ids.extend(minted.iter().map(id_of));
    let applied = agg.wait_applied(accepted_ids.len()).await;
    assert_eq!(
        applied.keys().cloned().collect::<HashSet<_>>(),
        accepted_ids.into_iter().collect()
    );
    col.shutdown().await;
    agg.stop().await;
}

/// A client that never finishes its request headers is cut off after the timeout, and
/// connections beyond `max_connections` are closed at once instead of being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    write_keys(&dir.path().join("keys.toml"), &keyring(1, 1));
    let mut cfg = config(dir.path(), vec!["http://127.0.0.1:1".into()]);
    cfg.limits.header_read_timeout_ms = 300;
    cfg.limits.max_connections = 1;
    let col = adclick_collector::start(cfg).await.unwrap();

    let mut slow = tokio::net::TcpStream::connect(col.http_addr())
        .await
        .unwrap();
    slow.write_all(b"POST /v1/clicks HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // While the slow client holds the only connection slot, another client is refused.
    assert!(
        eventually(|| col
            .metrics()
            .render()
            .contains("connections_open{listener=\"http\"} 1"))
        .await
    );
    let refused = http()
        .get(format!("http://{}/healthz", col.http_addr()))
        .send()
        .await;
    assert!(refused.is_err(), "over the cap: closed at accept");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        n == 0 || reply.starts_with("HTTP/1.1 408"),
        "slow client was cut off: {reply:?}"
    );
    // The slot is free again.
    assert!(
        eventually(|| col
            .metrics()
            .render()
            .contains("connections_open{listener=\"http\"} 0"))
        .await
    );
    let r = http()
        .get(format!("http://{}/healthz", col.http_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    col.shutdown().await;
}

/// Browsers: the preflight is answered for allowed origins only, and a beacon's
/// `text/plain` body (protobuf bytes) is accepted with the CORS header on the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_beacon_content_type() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let mut cfg = config(dir.path(), vec![agg.url()]);
    cfg.cors_origins = vec!["https://news.example".into()];
    let col = adclick_collector::start(cfg).await.unwrap();
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

/// A click older than the aggregators' retention is refused here, where the client hears
/// about it, instead of being acked and then dropped downstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_older_than_the_retention_are_refused_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let mut cfg = config(dir.path(), vec!["http://127.0.0.1:1".into()]);
    cfg.tokens.max_click_age_ms = 3_600_000;
    let col = adclick_collector::start(cfg).await.unwrap();
    let s = signer(&ring).with_ttl(Duration::from_secs(86_400)).unwrap();
    let two_hours_ago = now_ms() - 7_200_000;
    let old = s.mint_at(&ad(1), two_hours_ago - 1000).unwrap();
    let c = v1::Click {
        token: old.token,
        occurred_at_ms: two_hours_ago,
        sent_at_ms: now_ms(),
        ..Default::default()
    };
    let r = post_proto(
        &http(),
        &col,
        &ClickBatch {
            clicks: vec![c],
            ..Default::default()
        },
    )
    .await;
    let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!((res.accepted, res.rejected.get("too_old")), (0, Some(&1)));
    col.shutdown().await;
}
