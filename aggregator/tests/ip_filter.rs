//! The `ip` and `user_id` filters (issue 14): clicks with a known set of client IPs, users,
//! ads and minutes, duplicates and late clicks among them, counted by an independent oracle
//! over what the test sent; filtered GetAdClicks, BatchGetAdClicks, Breakdown and TopAds
//! compared with it over gRPC and HTTP, with an advertiser key, across a clean restart, a
//! crash mid-checkpoint and a crash without checkpoint; retention and validation.

use std::collections::{BTreeMap, HashMap};

use adclick_aggregator::Aggregator;
use adclick_proto::v1::{
    self, BatchGetAdClicksRequest, BreakdownRequest, Filter, GetAdClicksRequest, Granularity,
    IngestClick,
};
use adclick_test_support::aggregator::{ADMIN, T0, start_retrying};
use adclick_test_support::common::{MIN, authed};

use crate::util::*;
use crate::validation::violations;

/// The IPs clicks come from: three in 203.0.113.0/24, one beside it, IPv6 in and out of
/// 2001:db8::/32, and (index 6) none.
const IPS: [&[u8]; 7] = [
    &[203, 0, 113, 7],
    &[203, 0, 113, 8],
    &[203, 0, 113, 200],
    &[203, 0, 114, 1],
    &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    &[0x20, 0x01, 0x0d, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    &[],
];
const IP_TEXT: [&str; 6] = [
    "203.0.113.7",
    "203.0.113.8",
    "203.0.113.200",
    "203.0.114.1",
    "2001:db8::1",
    "2001:db9::2",
];
const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "eve", ""];
const ADS: u64 = 9;

/// `n` clicks, seeded, over `minutes` minutes from `start`.
fn make(seed: u64, n: usize, start: i64, minutes: i64) -> Vec<IngestClick> {
    let mut r = Rng(seed);
    (0..n)
        .map(|i| {
            let ad = 1 + r.below(ADS);
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&seed.to_le_bytes());
            id[8..].copy_from_slice(&(i as u64).to_le_bytes());
            IngestClick {
                impression_id: id.to_vec(),
                ad_id: ad,
                advertiser_id: ad % 3,
                campaign_id: ad % 5 + 1,
                token_expires_at_ms: T0 + 30 * 86_400_000,
                event_time_ms: start + r.below((minutes * MIN) as u64) as i64,
                received_at_ms: T0,
                country: COUNTRIES[r.below(3) as usize].into(),
                device: 1 + r.below(4) as i32,
                os: OSES[r.below(3) as usize].into(),
                site: "news.example".into(),
                user_id: USERS[r.below(USERS.len() as u64) as usize].into(),
                client_ip: IPS[r.below(IPS.len() as u64) as usize].to_vec(),
                ..Default::default()
            }
        })
        .collect()
}

/// The batches: fresh clicks, a batch repeating earlier impressions (duplicates, never
/// counted twice), and late clicks for early minutes after the watermark moved on.
fn batches() -> Vec<Vec<IngestClick>> {
    let mut out: Vec<Vec<IngestClick>> = (0..5).map(|i| make(40 + i, 300, T0, 30)).collect();
    let mut dup = out[1][..120].to_vec();
    dup.extend(make(50, 100, T0 + 20 * MIN, 10));
    out.push(dup);
    out.push(make(51, 200, T0, 5)); // late: the watermark is near T0 + 30 min
    out
}

fn unique(batches: &[Vec<IngestClick>]) -> Vec<IngestClick> {
    let mut seen = std::collections::HashSet::new();
    batches
        .iter()
        .flatten()
        .filter(|c| seen.insert(c.impression_id.clone()))
        .cloned()
        .collect()
}

fn in_prefix(ip: &[u8], prefix: &str) -> bool {
    match prefix {
        "203.0.113.0/24" => ip.len() == 4 && ip[..3] == [203, 0, 113],
        "2001:db8::/32" => ip.len() == 16 && ip[..4] == [0x20, 0x01, 0x0d, 0xb8],
        one => IP_TEXT
            .iter()
            .position(|t| *t == one)
            .is_some_and(|i| IPS[i] == ip),
    }
}

/// The filters checked, each with the oracle's predicate.
/// A filter and the oracle's predicate for it.
type Case = (Filter, Box<dyn Fn(&IngestClick) -> bool>);

fn cases() -> Vec<Case> {
    let mut out: Vec<Case> = Vec::new();
    for ip in IP_TEXT
        .iter()
        .copied()
        .chain(["203.0.113.0/24", "2001:db8::/32"])
    {
        out.push((
            Filter {
                ip: ip.into(),
                ..Default::default()
            },
            Box::new(move |c: &IngestClick| in_prefix(&c.client_ip, ip)),
        ));
    }
    for u in &USERS[..5] {
        out.push((
            Filter {
                user_id: (*u).into(),
                ..Default::default()
            },
            Box::new(move |c: &IngestClick| c.user_id == *u),
        ));
    }
    // Combined with other fields: AND.
    out.push((
        Filter {
            ip: "203.0.113.0/24".into(),
            user_id: "bob".into(),
            country: vec!["US".into()],
            ..Default::default()
        },
        Box::new(|c: &IngestClick| {
            in_prefix(&c.client_ip, "203.0.113.0/24") && c.user_id == "bob" && c.country == "US"
        }),
    ));
    out.push((
        Filter {
            user_id: "carol".into(),
            device: vec![2, 3],
            os: vec!["ios".into()],
            campaign_id: vec![2, 3],
            ..Default::default()
        },
        Box::new(|c: &IngestClick| {
            c.user_id == "carol"
                && [2, 3].contains(&c.device)
                && c.os == "ios"
                && [2, 3].contains(&c.campaign_id)
        }),
    ));
    out
}

/// Everything the filtered queries answer, to compare across restarts.
type Answers = Vec<(
    Vec<(u64, u64)>,
    Vec<(u64, BTreeMap<i64, u64>)>,
    Vec<(String, u64)>,
)>;

/// Runs every case against `a`, asserting each answer equals the oracle's.
async fn check(a: &Aggregator, unique: &[IngestClick]) -> Answers {
    let (_, mut q) = clients(a).await;
    let (from, to) = (T0, T0 + 40 * MIN);
    let mut answers = Vec::new();
    for (filter, keep) in cases() {
        let what = format!("{filter:?}");
        // TopAds, admin and advertiser 1.
        let got = top(&mut q, ADMIN, 20, from, to, Some(filter.clone())).await;
        let want = top_oracle(unique, 20, from, to, &keep);
        assert_eq!(got, want, "TopAds {what}");
        let got1 = top(&mut q, ADV1, 20, from, to, Some(filter.clone())).await;
        let want1 = top_oracle(unique, 20, from, to, |c| keep(c) && c.advertiser_id == 1);
        assert_eq!(got1, want1, "TopAds advertiser 1 {what}");
        // GetAdClicks per minute, every ad, and BatchGetAdClicks per hour.
        let mut per_ad = Vec::new();
        for ad in 1..=ADS {
            let req = GetAdClicksRequest {
                ad_id: ad,
                from_ms: from,
                to_ms: to,
                granularity: Granularity::Minute as i32,
                filter: Some(filter.clone()),
                fill_empty: Some(false),
                ..Default::default()
            };
            let r = q
                .get_ad_clicks(authed(req, ADMIN))
                .await
                .unwrap()
                .into_inner();
            let got: BTreeMap<i64, u64> =
                r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
            let mut want: BTreeMap<i64, u64> = BTreeMap::new();
            let mut users: HashMap<i64, std::collections::HashSet<&str>> = HashMap::new();
            for c in unique.iter().filter(|c| c.ad_id == ad && keep(c)) {
                let m = c.event_time_ms.div_euclid(MIN) * MIN;
                *want.entry(m).or_default() += 1;
                if !c.user_id.is_empty() {
                    users.entry(m).or_default().insert(&c.user_id);
                }
            }
            assert_eq!(got, want, "GetAdClicks ad {ad} {what}");
            for b in &r.buckets {
                let n = users.get(&b.start_ms).map_or(0, |u| u.len()) as u64;
                assert_eq!(b.unique_users, n, "unique users ad {ad} {what}");
            }
            per_ad.push((ad, got));
        }
        let req = BatchGetAdClicksRequest {
            ad_ids: (1..=ADS).collect(),
            from_ms: from,
            to_ms: to,
            granularity: Granularity::Hour as i32,
            filter: Some(filter.clone()),
            fill_empty: Some(false),
            ..Default::default()
        };
        let r = q
            .batch_get_ad_clicks(authed(req, ADMIN))
            .await
            .unwrap()
            .into_inner();
        for (ad, got) in r.ads.iter().zip(&per_ad) {
            assert_eq!(ad.total_clicks, got.1.values().sum::<u64>(), "batch {what}");
        }
        // Breakdown of ad 4 by country.
        let req = BreakdownRequest {
            ad_id: 4,
            from_ms: from,
            to_ms: to,
            granularity: Granularity::Minute as i32,
            filter: Some(filter.clone()),
            group_by: v1::Dimension::Country as i32,
            n: 10,
            ..Default::default()
        };
        let r = q.breakdown(authed(req, ADMIN)).await.unwrap().into_inner();
        let got: Vec<(String, u64)> = r
            .values
            .iter()
            .map(|v| (v.value.clone(), v.clicks))
            .collect();
        let mut want: HashMap<String, u64> = HashMap::new();
        for c in unique.iter().filter(|c| c.ad_id == 4 && keep(c)) {
            *want.entry(c.country.clone()).or_default() += 1;
        }
        let mut want: Vec<(String, u64)> = want.into_iter().collect();
        want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(got, want, "Breakdown {what}");
        answers.push((got1, per_ad, got));
    }
    answers
}

async fn send_all(a: &Aggregator, batches: &[Vec<IngestClick>], upto: usize) {
    let (mut ing, _) = clients(a).await;
    for (i, b) in batches.iter().enumerate().take(upto) {
        send(&mut ing, "c", i as u64 + 1, b.clone()).await;
    }
}

/// Exact answers, live, after a clean restart, after crashes (one mid-checkpoint, one
/// without any checkpoint), with every batch re-sent.
#[test]
fn ip_and_user_filters_are_exact_and_survive_restarts_and_crashes() {
    let batches = batches();
    let unique = unique(&batches);
    // The generator produced what the test needs: duplicates and late clicks.
    assert!(unique.len() < batches.iter().map(Vec::len).sum::<usize>());
    let dir = tempfile::tempdir().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt
        .block_on(adclick_aggregator::start(config(dir.path())))
        .unwrap();
    rt.block_on(send_all(&a, &batches, batches.len()));
    let live = rt.block_on(check(&a, &unique));
    rt.block_on(a.shutdown());
    drop(rt);

    // Clean restart: the segments written at the final checkpoint answer.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt
        .block_on(adclick_aggregator::start(config(dir.path())))
        .unwrap();
    assert_eq!(
        rt.block_on(check(&a, &unique)),
        live,
        "after a clean restart"
    );
    let segments = std::fs::read_dir(dir.path().join("click_index"))
        .unwrap()
        .count();
    assert!(segments >= 1, "a segment was written");
    rt.block_on(a.shutdown());
    drop(rt);

    // Crashes on a new directory: after k batches, with a checkpoint failing midway (its
    // segment is on disk, the checkpoint is not) or without any checkpoint at all.
    let dir = tempfile::tempdir().unwrap();
    // A round whose index flushes fail (a full disk) must skip its checkpoints: a
    // checkpoint saved without its segment would lose those clicks from the index.
    for (k, interval, fail_cp, fail_flush) in [
        (2, 1, None, false),
        (3, 1, None, true),
        (4, 1, Some(1), false),
        (6, 3_600_000, None, false),
    ] {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut cfg = config(dir.path());
        cfg.checkpoint.interval_ms = interval;
        let index_dir = dir.path().join("click_index");
        if fail_flush {
            adclick_aggregator::clickindex::FAIL_FLUSHES
                .lock()
                .unwrap()
                .push(index_dir.clone());
        }
        let a = rt.block_on(start_retrying(cfg, fail_cp));
        rt.block_on(send_all(&a, &batches, k));
        a.kill();
        rt.shutdown_background();
        adclick_aggregator::clickindex::FAIL_FLUSHES
            .lock()
            .unwrap()
            .retain(|d| *d != index_dir);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(config(dir.path()), None));
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in batches.iter().enumerate() {
            let ack = send(&mut ing, "c", i as u64 + 1, b.clone()).await;
            assert_eq!(ack.already_acked, i < 6, "batch {}", i + 1);
        }
    });
    assert_eq!(rt.block_on(check(&a, &unique)), live, "after crashes");
    rt.block_on(a.shutdown());
}

/// Segment names `<from>-<upto>.seg` in `dir`, as (from, upto).
fn segment_spans(dir: &std::path::Path) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            adclick_aggregator::clickindex::segment::parse_name(&name)
        })
        .collect();
    v.sort_unstable();
    v
}

/// `n` batches of 1,000 clicks over 30 minutes (seeded from `seed`), and their unique clicks.
fn budget_batches(seed: u64, n: u64) -> (Vec<Vec<IngestClick>>, Vec<IngestClick>) {
    let batches: Vec<Vec<IngestClick>> = (0..n).map(|i| make(seed + i, 1_000, T0, 30)).collect();
    let unique = unique(&batches);
    (batches, unique)
}

/// Checkpoints an hour apart and a 1 MiB click index budget: only the budget writes
/// segments while a test runs.
fn budget_config(dir: &std::path::Path) -> adclick_aggregator::config::AggregatorConfig {
    let mut c = config(dir);
    c.checkpoint.interval_ms = 3_600_000;
    c.click_index.memory_bytes = 1 << 20;
    c
}

/// `click_index.memory_bytes` bounds the index's RAM between checkpoints: above it a
/// segment is written at once. With checkpoints an hour apart, 60 batches of 1,000 clicks
/// (~56 bytes each in RAM) into a 1 MiB budget make segments before any checkpoint; the
/// answers stay exact live, after a crash with such segments past the last checkpoint
/// (they are dropped and the replay indexes their batches again), and after the re-sent
/// batches are all acked as already counted.
#[test]
fn a_memory_budget_writes_segments_between_checkpoints_and_stays_exact_across_a_crash() {
    let (batches, unique) = budget_batches(1_000, 60);
    assert_eq!(unique.len(), 60_000);
    let dir = tempfile::tempdir().unwrap();
    let index_dir = dir.path().join("click_index");
    let cfg = || budget_config(dir.path());
    let half = batches.len() / 2;

    // The first half, then a clean stop: its final checkpoint covers WAL position `half`.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(cfg(), None));
    rt.block_on(send_all(&a, &batches, half));
    let early = a.metrics().click_index_early_flushes.get();
    assert!(
        early >= 1,
        "no segment for the memory budget in the first half"
    );
    rt.block_on(check(&a, &unique[..half * 1_000]));
    rt.block_on(a.shutdown());
    drop(rt);
    let spans = segment_spans(&index_dir);
    assert_eq!(spans.last().map(|s| s.1), Some(half as u64), "{spans:?}");
    assert!(
        spans.len() >= 2,
        "early segments and the checkpoint's: {spans:?}"
    );

    // The second half, then a crash: segments past the checkpoint are on disk.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(cfg(), None));
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in batches.iter().enumerate().skip(half) {
            send(&mut ing, "c", i as u64 + 1, b.clone()).await;
        }
    });
    let live = rt.block_on(check(&a, &unique));
    let m = a.metrics();
    assert!(m.click_index_early_flushes.get() >= 1);
    assert!(
        rt.block_on(adclick_test_support::common::eventually(
            std::time::Duration::from_secs(30),
            || segment_spans(&index_dir).iter().any(|s| s.1 > half as u64)
        )),
        "no segment past the checkpoint before the crash: {:?}",
        segment_spans(&index_dir)
    );
    a.kill();
    rt.shutdown_background();

    // Restart: the replay re-indexes the second half; every batch is already acked.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(cfg(), None));
    assert!(
        segment_spans(&index_dir).iter().all(|s| s.1 <= half as u64),
        "segments past the checkpoint survived the start: {:?}",
        segment_spans(&index_dir)
    );
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        for (i, b) in batches.iter().enumerate() {
            let ack = send(&mut ing, "c", i as u64 + 1, b.clone()).await;
            assert!(ack.already_acked, "batch {}", i + 1);
        }
    });
    assert_eq!(rt.block_on(check(&a, &unique)), live, "after the crash");
    rt.block_on(a.shutdown());
}

/// A memory-budget segment that fails to write (a full disk) is counted, keeps its clicks
/// in RAM (the answers stay exact) and is not retried until a checkpoint interval has
/// passed; the checkpoint's own flush writes them once the disk takes writes again, and a
/// start deletes a segment left half written (`*.tmp`, as a crash mid-write leaves it).
#[test]
fn a_failed_memory_budget_segment_keeps_its_clicks_and_backs_off() {
    const BATCHES: u64 = 30;
    let (batches, unique) = budget_batches(2_000, BATCHES);
    let dir = tempfile::tempdir().unwrap();
    let index_dir = dir.path().join("click_index");
    let cfg = || budget_config(dir.path());
    adclick_aggregator::clickindex::FAIL_FLUSHES
        .lock()
        .unwrap()
        .push(index_dir.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(cfg(), None));
    rt.block_on(send_all(&a, &batches, batches.len()));
    let m = a.metrics();
    // ~55 bytes per click in RAM: the budget is crossed near batch 19 of 30 (the writer
    // sees the failure at the next batch), and not retried before an hour has passed.
    assert!(
        rt.block_on(adclick_test_support::common::eventually(
            std::time::Duration::from_secs(30),
            || m.click_index_flush_errors.get() >= 1
        )),
        "the failed segment was not counted"
    );
    assert_eq!(
        m.click_index_early_flushes.get(),
        1,
        "retried before the back-off"
    );
    assert_eq!(m.click_index_flush_errors.get(), 1);
    assert!(
        segment_spans(&index_dir).is_empty(),
        "a segment was written"
    );
    assert!(
        m.click_index_memory_bytes.get() > 1 << 20,
        "the clicks left RAM"
    );
    let live = rt.block_on(check(&a, &unique));

    // The disk takes writes again: the final checkpoint's segment holds every click.
    adclick_aggregator::clickindex::FAIL_FLUSHES
        .lock()
        .unwrap()
        .retain(|d| *d != index_dir);
    rt.block_on(a.shutdown());
    drop(rt);
    assert_eq!(
        segment_spans(&index_dir).last().map(|s| s.1),
        Some(BATCHES),
        "{:?}",
        segment_spans(&index_dir)
    );

    // A segment half written when the process died is deleted at the start.
    let torn = index_dir.join("0000000000000000021-0000000000000000030.seg.tmp");
    std::fs::write(&torn, b"half a segment").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(cfg(), None));
    assert!(!torn.exists(), "the torn segment survived the start");
    assert_eq!(rt.block_on(check(&a, &unique)), live, "after the restart");
    rt.block_on(a.shutdown());
}

/// Invalid values name `filter.ip` / `filter.user_id` (gRPC) or the parameter (HTTP); a
/// range before the index's retention is refused; expired segments are deleted.
#[test]
fn validation_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.click_index.retention_minutes = 30;
    cfg.checkpoint.interval_ms = 1;
    let a = rt.block_on(adclick_aggregator::start(cfg)).unwrap();
    rt.block_on(async {
        let (mut ing, mut q) = clients(&a).await;
        let early = make(60, 200, T0, 5);
        // Checkpoints are taken after a write once the interval (at least 10 ms) has
        // passed since the last: let it pass, so the early batch's write checkpoints it.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        send(&mut ing, "c", 1, early.clone()).await;
        let req = |ip: &str, user: &str, from: i64| GetAdClicksRequest {
            ad_id: 1,
            from_ms: from,
            to_ms: from + 10 * MIN,
            granularity: Granularity::Minute as i32,
            filter: Some(Filter {
                ip: ip.into(),
                user_id: user.into(),
                ..Default::default()
            }),
            fill_empty: Some(false),
            ..Default::default()
        };
        for (ip, user, field, reason) in [
            ("300.1.1.1", "", "filter.ip", "MALFORMED"),
            ("203.0.113.0/33", "", "filter.ip", "MALFORMED"),
            ("203.0.113.7/24", "", "filter.ip", "MALFORMED"),
            ("10.0.0.0/7", "", "filter.ip", "OUT_OF_RANGE"),
            ("2001:db8::/31", "", "filter.ip", "OUT_OF_RANGE"),
            ("", &"x".repeat(257), "filter.user_id", "TOO_LONG"),
        ] {
            let e = q
                .get_ad_clicks(authed(req(ip, user, T0), ADMIN))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{ip} {e:?}");
            assert_eq!(
                violations(&e),
                vec![(field.to_string(), reason.to_string())],
                "{ip}"
            );
        }
        // Within retention: answered.
        q.get_ad_clicks(authed(req("203.0.113.0/24", "alice", T0), ADMIN))
            .await
            .unwrap();
        // The early batch is in a segment of its own before the later ones arrive.
        let seg_dir = dir.path().join("click_index");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !std::fs::read_dir(&seg_dir).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with("-00000000000000000001.seg")
            })
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "no segment of the early batch within 20 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // The watermark moves 2 hours on: a later segment, the early one expires.
        let late = make(61, 200, T0 + 120 * MIN, 5);
        send(&mut ing, "c", 2, late).await;
        send(&mut ing, "c", 3, make(62, 10, T0 + 124 * MIN, 1)).await;
        let e = q
            .get_ad_clicks(authed(req("203.0.113.7", "", T0), ADMIN))
            .await
            .unwrap_err();
        assert_eq!(
            violations(&e),
            vec![("from_ms".to_string(), "BEFORE_RETENTION".to_string())]
        );
        let top = v1::TopAdsRequest {
            n: 5,
            window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
                from_ms: T0 + 60 * MIN,
                to_ms: T0 + 130 * MIN,
            })),
            filter: Some(Filter {
                user_id: "bob".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = q.top_ads(authed(top, ADMIN)).await.unwrap_err();
        assert_eq!(
            violations(&e),
            vec![("range.from_ms".to_string(), "BEFORE_RETENTION".to_string())]
        );
        // Unfiltered, the minute cells still answer that far back.
        q.get_ad_clicks(authed(req("", "", T0), ADMIN))
            .await
            .unwrap();

        // HTTP: parameters ip= and user_id=, problems name them.
        adclick_sdk::HttpTransport::install_crypto_provider();
        let http = reqwest::Client::new();
        let base = format!("http://{}", a.http_addr());
        let get = |q: String| {
            http.get(format!("{base}{q}"))
                .header("authorization", format!("Bearer {ADMIN}"))
                .send()
        };
        let (f, t) = (T0 + 120 * MIN, T0 + 126 * MIN);
        for (query, name) in [
            (
                format!("/v1/ads/1/clicks?from_ms={f}&to_ms={t}&ip=1.2.3"),
                "ip",
            ),
            (
                format!("/v1/ads/top?n=3&from_ms={f}&to_ms={t}&ip=0.0.0.0/0"),
                "ip",
            ),
            (
                format!("/v1/ads/top?n=3&from_ms={f}&to_ms={t}&user_id="),
                "user_id",
            ),
            (
                format!("/v1/ads/top?n=3&from_ms={f}&to_ms={t}&ip=1.2.3.4&ip=1.2.3.5"),
                "ip",
            ),
        ] {
            let r = get(query.clone()).await.unwrap();
            assert_eq!(r.status(), 400, "{query}");
            let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(v["invalid_params"][0]["name"], name, "{query}: {v}");
        }
        let r = get(format!(
            "/v1/ads/top?n=3&from_ms={f}&to_ms={t}&ip=203.0.113.0/24&user_id=bob"
        ))
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
        let sent: Vec<IngestClick> = [
            make(61, 200, T0 + 120 * MIN, 5),
            make(62, 10, T0 + 124 * MIN, 1),
        ]
        .concat();
        let want = top_oracle(&sent, 3, f, t, |c| {
            in_prefix(&c.client_ip, "203.0.113.0/24") && c.user_id == "bob"
        });
        assert!(!want.is_empty());
        assert_eq!(got, want);
    });
    rt.block_on(a.shutdown());
    // Bounded disk: after the final checkpoint, the segment holding only the early
    // minutes (WAL position 1, written at the first checkpoint) is gone.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("click_index"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.is_empty());
    assert!(
        !names.iter().any(|n| n.starts_with("00000000000000000000-")),
        "the first segment expired: {names:?}"
    );
}

/// A data dir counted before the click index existed (its `click_index/` removed, as an
/// upgrade from a version without it finds it): the index cannot hold those clicks, so a
/// filtered range reaching before the minute it started from is refused naming the field,
/// never answered with the part it has; unfiltered queries still answer from the cells; the
/// start recorded survives restarts. A data dir whose first start had the index records
/// that it is complete.
#[test]
fn an_index_added_to_a_counted_data_dir_refuses_ranges_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let index_dir = dir.path().join("click_index");
    let since_file = index_dir.join("complete_since");
    let a = rt
        .block_on(adclick_aggregator::start(config(dir.path())))
        .unwrap();
    let clicks = make(70, 300, T0, 5);
    let total_ad1 = clicks.iter().filter(|c| c.ad_id == 1).count() as u64;
    assert!(total_ad1 > 0);
    rt.block_on(async {
        let (mut ing, _) = clients(&a).await;
        send(&mut ing, "c", 1, clicks).await;
    });
    rt.block_on(a.shutdown());
    assert_eq!(
        std::fs::read_to_string(&since_file).unwrap().trim(),
        "-",
        "a data dir indexed from its first click is complete"
    );

    // The upgrade: the store has its checkpoint, the index directory does not exist.
    std::fs::remove_dir_all(&index_dir).unwrap();
    let before = adclick_test_support::common::now_ms();
    let req = |filter: Option<Filter>| GetAdClicksRequest {
        ad_id: 1,
        from_ms: T0,
        to_ms: T0 + 10 * MIN,
        granularity: Granularity::Minute as i32,
        filter,
        fill_empty: Some(false),
        ..Default::default()
    };
    let by_user = Some(Filter {
        user_id: "alice".into(),
        ..Default::default()
    });
    let mut recorded = String::new();
    for round in 0..2 {
        let a = rt.block_on(start_retrying(config(dir.path()), None));
        let text = std::fs::read_to_string(&since_file).unwrap();
        let since: i64 = text.trim().parse().unwrap_or_else(|_| panic!("{text:?}"));
        assert!(since > before && since % MIN == 0, "{since} after {before}");
        if round == 0 {
            recorded = text;
        } else {
            assert_eq!(text, recorded, "the recorded start is kept");
        }
        rt.block_on(async {
            let (_, mut q) = clients(&a).await;
            let e = q
                .get_ad_clicks(authed(req(by_user.clone()), ADMIN))
                .await
                .unwrap_err();
            assert_eq!(
                violations(&e),
                vec![("from_ms".to_string(), "BEFORE_RETENTION".to_string())]
            );
            assert!(e.message().contains("added"), "{}", e.message());
            let all = q
                .get_ad_clicks(authed(req(None), ADMIN))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(all.total_clicks, total_ad1, "the cells still answer");
        });
        rt.block_on(a.shutdown());
    }
}
