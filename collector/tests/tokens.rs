//! What makes a click countable at the edge: signing keys rotated without a restart,
//! device clocks corrected or flagged, clicks older than the aggregators' retention refused.

use std::sync::Arc;
use std::time::Duration;

use adclick_proto::v1::{self, ClickBatch, ClickBatchResult};
use adclick_sdk::core::Clock;
use adclick_sdk::{Dimensions, Tracker};
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{eventually, keyring, now_ms, signer, write_keys};
use adclick_test_support::fake_aggregator::fake_aggregator;
use prost::Message;

use crate::util::*;

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
        eventually(POLL_LIMIT, || m
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
        eventually(POLL_LIMIT, || m
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
