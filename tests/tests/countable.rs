//! One countable rule for the collector and the aggregator (issue 11, finding 4): nothing a
//! collector acks is refused by the aggregator (it is counted, or it is a duplicate).
//!
//! - `ten_year_token_is_rejected_at_the_edge_with_its_reason`: real servers; a token living
//!   10 years gets `token_lifetime_too_long` in `ClickBatchResult.rejected`, never a 202
//!   ack for a click the aggregator then quarantines.
//! - `every_click_the_collector_acks_the_aggregator_counts`: a seeded property test (this
//!   crate has no proptest; a splitmix64 generator, fixed seed, bounded case count) driving
//!   the real collector `Processor` and the real aggregator `ClickWindows` with generated
//!   tokens and clocks. The expected outcome is the property itself plus an oracle written
//!   here from the documented limits (30-day lifetime, 47 h age), not from the code.

use std::sync::Arc;
use std::time::Duration;

use adclick_aggregator::state::dedup::{Dedup, MemTable};
use adclick_aggregator::state::windows::{ClickWindows, Routed};
use adclick_collector::config::{DedupConfig, TokenChecks};
use adclick_collector::ingest::keys::KeySource;
use adclick_collector::ingest::{Processor, RequestCtx};
use adclick_collector::routing::HotAds;
use adclick_proto::token::{Impression, Keyring};
use adclick_proto::v1::{self, ClickBatch, ClickBatchResult};
use prost::Message;

use crate::support::*;

const DAY: i64 = 86_400_000;

fn impression(n: u64, issued: i64, expires: i64) -> Impression {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    id[8..].copy_from_slice(&n.to_le_bytes());
    Impression {
        impression_id: id,
        ad_id: 40 + n % 5,
        advertiser_id: ADV_A,
        campaign_id: 1,
        landing_url: "https://shop.example/x".into(),
        issued_at_ms: issued,
        expires_at_ms: expires,
        key_id: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_year_token_is_rejected_at_the_edge_with_its_reason() {
    within(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let agg = adclick_aggregator::start(aggregator_config(
            &dir.path().join("agg"),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
        .unwrap();
        let ring = keyring(1, 3);
        let keys = dir.path().join("keys.toml");
        write_keys(&keys, &ring);
        let col =
            adclick_collector::start(collector_config(dir.path(), "c", &keys, agg.grpc_addr()))
                .await
                .unwrap();
        let now = now_ms();
        // The SDK signer refuses such a lifetime; an ad server signing by hand does not.
        let ten_years = ring
            .sign(&impression(1, now - 1000, now + 3650 * DAY))
            .unwrap();
        let ok = ring.sign(&impression(2, now - 1000, now + DAY)).unwrap();
        let click = |token: String| v1::Click {
            token,
            occurred_at_ms: now,
            sent_at_ms: now,
            ..Default::default()
        };
        let batch = ClickBatch {
            sent_at_ms: now,
            clicks: vec![click(ten_years), click(ok)],
            ..Default::default()
        };
        let r = http_client()
            .post(format!("http://{}/v1/clicks", col.http_addr()))
            .header("content-type", "application/x-protobuf")
            .body(batch.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
        assert_eq!(res.accepted, 1, "{res:?}");
        assert_eq!(
            res.rejected.get("token_lifetime_too_long"),
            Some(&1),
            "{res:?}"
        );
        let m = col.metrics().clone();
        assert!(eventually(Duration::from_secs(30), || m.forwarded_clicks.get() >= 1).await);
        // Everything acked is counted; nothing was quarantined downstream.
        let a = agg.metrics();
        assert_eq!(
            (
                a.clicks_with("applied"),
                a.clicks_with("malformed"),
                a.clicks_with("too_old")
            ),
            (1, 0, 0)
        );
        col.shutdown().await;
        agg.shutdown().await;
    })
    .await;
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi].
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    /// One of the edge-heavy values, or uniform in [lo, hi].
    fn pick(&mut self, edges: &[i64], lo: i64, hi: i64) -> i64 {
        if self.next().is_multiple_of(3) {
            edges[(self.next() % edges.len() as u64) as usize]
        } else {
            self.range(lo, hi)
        }
    }
}

#[test]
fn every_click_the_collector_acks_the_aggregator_counts() {
    let dir = tempfile::tempdir().unwrap();
    let ring: Keyring = keyring(1, 9);
    let keys = dir.path().join("keys.toml");
    write_keys(&keys, &ring);
    let source = Arc::new(KeySource::open(&keys).unwrap());
    let checks = TokenChecks::default();
    let (skew, max_age) = (checks.skew_ms, checks.max_click_age_ms);
    let mut rng = Rng(0x5EED);
    let (mut acked, mut refused_long) = (0u64, 0u64);
    const CASES: u64 = 300;
    const CLICKS: u64 = 20;
    for case in 0..CASES {
        // A collector and an aggregator as they would be at `now`, with clicks from before.
        let now = rng.range(1_700_000_000_000, 2_100_000_000_000);
        let processor = Processor::new(
            source.clone(),
            checks.clone(),
            &DedupConfig {
                expected_clicks: 10_000,
                exact_capacity: 10_000,
                ..Default::default()
            },
            256,
            Arc::new(HotAds::new(8)),
            Arc::new(adclick_collector::Metrics::new()),
            now,
        );
        // A small dedup budget: the rule, not the memory, is under test here.
        let dedup = Dedup::new(1 << 20, Box::<MemTable>::default());
        let mut windows = ClickWindows::with_dedup(Default::default(), &Default::default(), dedup);
        let mut clicks = Vec::new();
        let mut oracle_long = Vec::new();
        let mut oracle_plain_ok = Vec::new();
        for k in 0..CLICKS {
            let n = case * CLICKS + k;
            let issued = now
                + rng.pick(
                    &[-31 * DAY, -30 * DAY, -2 * DAY, -skew, 0, skew],
                    -40 * DAY,
                    skew + 1,
                );
            let life = rng.pick(
                &[1, 30 * DAY, 30 * DAY + 1, 31 * DAY, 3650 * DAY],
                1,
                40 * DAY,
            );
            let occurred = now
                + rng.pick(
                    &[-max_age - 1, -max_age, -48 * 3_600_000, 0],
                    -50 * 3_600_000,
                    60_000,
                );
            let sent = if rng.next().is_multiple_of(4) {
                now + rng.range(-DAY, DAY)
            } else {
                now
            };
            let token = ring
                .sign(&impression(n, issued, issued.saturating_add(life)))
                .unwrap();
            let valid_now = issued <= now + skew && now <= issued + life + skew;
            // Independent oracle, from the documented limits only.
            oracle_long.push(life > 30 * DAY);
            oracle_plain_ok.push(valid_now && life <= 30 * DAY && occurred == now && sent == now);
            // Some repeats, as duplicates.
            let repeat = rng.next().is_multiple_of(8);
            let click = v1::Click {
                token,
                occurred_at_ms: occurred,
                sent_at_ms: sent,
                ..Default::default()
            };
            if repeat {
                clicks.push(click.clone());
                oracle_long.push(life > 30 * DAY);
                oracle_plain_ok.push(false);
            }
            clicks.push(click);
        }
        let tokens: Vec<String> = clicks.iter().map(|c| c.token.clone()).collect();
        let refs: Vec<adclick_collector::ingest::ClickRef<'_>> =
            clicks.iter().map(Into::into).collect();
        let out = processor.process(
            &refs,
            &RequestCtx {
                received_at_ms: now,
                client_ip: None,
                ua_class: adclick_proto::v1::UserAgentClass::Unspecified,
            },
        );
        processor.committed(&out);
        // Which input clicks were acked (by impression id; repeats are duplicates).
        let accepted = out.accepted_clicks();
        let acked_ids: std::collections::HashSet<Vec<u8>> =
            accepted.iter().map(|c| c.impression_id.clone()).collect();
        for (i, t) in tokens.iter().enumerate() {
            let imp = ring.verify(t, now, i64::MAX / 4).unwrap();
            let was_acked = acked_ids.contains(imp.impression_id.as_slice());
            assert!(
                !(oracle_long[i] && was_acked),
                "case {case}: a token living past 30 days was acked"
            );
            if oracle_plain_ok[i] {
                assert!(
                    was_acked,
                    "case {case}: a plainly valid click was refused: {:?}",
                    out.rejected
                );
            }
        }
        refused_long += out
            .rejected
            .iter()
            .filter(|r| r.reason == "token_lifetime_too_long")
            .count() as u64;
        // The aggregator, fed exactly what the collector acked (in order, as one batch),
        // counts every click or calls it a duplicate.
        windows.begin_batch(1);
        for c in accepted {
            acked += 1;
            match windows.process(&adclick_aggregator::decode::click_from_wire(&c)) {
                Routed::Apply(..) | Routed::Duplicate => {}
                other => panic!("case {case}: acked click {c:?} was {other:?} at the aggregator"),
            }
        }
    }
    // The generator reached both sides of the rule.
    assert!(acked > CASES * CLICKS / 10, "{acked} acked");
    assert!(refused_long > 0);
}
