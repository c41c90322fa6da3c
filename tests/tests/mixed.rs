//! Two collectors and one aggregator under mixed traffic: valid clicks with dimensions,
//! duplicates (same batch, across batches, across collectors), forged, tampered, expired,
//! malformed and unknown-key tokens, skewed device clocks (corrected, clamped and
//! flagged), and late clicks for minutes the watermark already passed. Every number asserted
//! comes from the test's own ledger of what it sent.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adclick_collector::Collector;
use adclick_proto::v1::{self, Filter, Granularity};
use adclick_sdk::{Device, Dimensions, MintedToken, Tracker};

use crate::support::*;

const ADS: u64 = 6;
const COUNTRIES: [&str; 3] = ["US", "DE", "FR"];
const DEVICES: [Device; 4] = [
    Device::Mobile,
    Device::Desktop,
    Device::Tablet,
    Device::Mobile,
];
const OSES: [&str; 3] = ["ios", "android", "windows"];
const SITES: [&str; 2] = ["news.example", "shop.example"];

fn advertiser_of(ad: u64) -> u64 {
    if ad % 2 == 1 { ADV_A } else { ADV_B }
}

fn campaign_of(ad: u64) -> u64 {
    100 + ad % 3
}

fn wire(d: Device) -> i32 {
    match d {
        Device::Desktop => v1::Device::Desktop as i32,
        Device::Mobile => v1::Device::Mobile as i32,
        Device::Tablet => v1::Device::Tablet as i32,
        Device::Other => v1::Device::Other as i32,
    }
}

/// What the aggregator must count for one impression.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expect {
    ad: u64,
    minute: i64,
    country: &'static str,
    device: Device,
    os: &'static str,
    site: &'static str,
    user: String,
}

impl Expect {
    fn dims(&self) -> Dimensions {
        Dimensions::new()
            .country(self.country)
            .device(self.device)
            .os(self.os)
            .site(self.site)
            .user_id(self.user.clone())
    }
}

/// Per-collector outcomes, as the collector must count them.
#[derive(Debug, Default)]
struct CollectorLedger {
    seen: HashSet<[u8; 16]>,
    accepted: u64,
    duplicate: u64,
    bad_signature: u64,
    expired: u64,
    malformed: u64,
    unknown_key: u64,
    flagged: u64,
}

#[derive(Debug, Default)]
struct Ledger {
    collectors: [CollectorLedger; 2],
    /// Impressions the aggregator must count, exactly once each.
    counted: HashMap<[u8; 16], Expect>,
    late: u64,
}

impl Ledger {
    /// A click with a valid token sent to `collector`.
    fn valid(&mut self, collector: usize, m: &MintedToken, e: Expect, flagged: bool) {
        let c = &mut self.collectors[collector];
        let id = m.impression.impression_id;
        if !c.seen.insert(id) {
            c.duplicate += 1;
            return;
        }
        c.accepted += 1;
        c.flagged += u64::from(flagged);
        if let Some(first) = self.counted.get(&id) {
            // Across collectors: the aggregator keeps whichever copy comes first, so both
            // copies must say the same thing for the ledger to be unambiguous.
            assert_eq!(first, &e);
        } else {
            self.counted.insert(id, e);
        }
    }

    fn forwarded(&self) -> u64 {
        self.collectors.iter().map(|c| c.accepted).sum()
    }

    /// Copies accepted by both collectors: dropped by the aggregator's exact dedup.
    fn aggregator_duplicates(&self) -> u64 {
        self.forwarded() - self.counted.len() as u64
    }

    fn per_ad(&self, keep: impl Fn(&Expect) -> bool) -> BTreeMap<u64, u64> {
        let mut m = BTreeMap::new();
        for e in self.counted.values().filter(|e| keep(e)) {
            *m.entry(e.ad).or_insert(0) += 1;
        }
        m
    }

    fn buckets(&self, ad: u64, width: i64, keep: impl Fn(&Expect) -> bool) -> Vec<(i64, u64)> {
        let mut m = BTreeMap::new();
        for e in self.counted.values().filter(|e| e.ad == ad && keep(e)) {
            *m.entry(e.minute.div_euclid(width) * width).or_insert(0u64) += 1;
        }
        m.into_iter().collect()
    }
}

/// One SDK client: a tracker on one collector with its own device clock.
struct Client {
    tracker: Tracker,
    collector: usize,
    clock: Arc<DeviceClock>,
    /// The clock is beyond the collectors' `max_device_clock_skew_ms`.
    flagged: bool,
    clicks: u64,
}

fn client(col: &Collector, collector: usize, skew_ms: i64, batch: usize, flagged: bool) -> Client {
    let clock = Arc::new(DeviceClock::new(skew_ms));
    let tracker = Tracker::builder(format!("http://{}", col.http_addr()))
        .batch_size(batch)
        .flush_interval(Duration::from_secs(3600))
        .clock(clock.clone())
        .build()
        .unwrap();
    Client {
        tracker,
        collector,
        clock,
        flagged,
        clicks: 0,
    }
}

impl Client {
    fn click_valid(&mut self, ledger: &mut Ledger, m: &MintedToken, e: &Expect) {
        self.tracker.click(&m.token, e.dims()).unwrap();
        self.clicks += 1;
        ledger.valid(self.collector, m, e.clone(), self.flagged);
    }

    /// A click that happened at true time `at`: the device clock is pinned there for the
    /// click and runs again for the send.
    fn click_valid_at(&mut self, ledger: &mut Ledger, m: &MintedToken, e: &Expect, at: i64) {
        self.clock.pin_true(at);
        self.click_valid(ledger, m, e);
        self.clock.unpin();
    }

    /// A click the collector must refuse (counted by reason in the caller's ledger).
    fn click_rejected(&mut self, token: &str) {
        self.tracker
            .click(token, Dimensions::new().country("US"))
            .unwrap();
        self.clicks += 1;
    }
}

async fn flush_all(clients: &[Client]) {
    for c in clients {
        c.tracker.flush().await.unwrap();
    }
}

/// Waits until the current minute has at least `room_ms` left, so a short phase of
/// real-time clicks stays inside one minute. Returns that minute.
async fn minute_with_room(room_ms: i64) -> i64 {
    let now = now_ms();
    if now - minute_of(now) > MIN - room_ms {
        let next = minute_of(now) + MIN + 100;
        tokio::time::sleep(Duration::from_millis((next - now) as u64)).await;
    }
    minute_of(now_ms())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_traffic_through_two_collectors_is_counted_exactly() {
    within(Duration::from_secs(90), scenario()).await;
}

async fn scenario() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 7);
    write_keys(&keys_file, &ring);

    let mut acfg = aggregator_config(
        &dir.path().join("aggregator"),
        "127.0.0.1:0".parse().unwrap(),
    );
    acfg.windows.allowed_delay_ms = 2_000;
    let agg = adclick_aggregator::start(acfg).await.unwrap();
    let grpc = agg.grpc_addr();
    let mut cols = Vec::new();
    for id in ["edge-a", "edge-b"] {
        let mut c = collector_config(dir.path(), id, &keys_file, grpc);
        c.tokens.max_device_clock_skew_ms = 6 * HOUR;
        cols.push(adclick_collector::start(c).await.unwrap());
    }
    assert_ne!(cols[0].collector_id(), cols[1].collector_id());

    let forger = signer(&keyring(1, 99)); // same key id, other secret
    let stranger = signer(&keyring(9, 3)); // a key id the collectors do not hold
    let signer = signer(&ring);
    let mut ledger = Ledger::default();

    // ---- Phase 1: real-time clicks, all inside one minute M. -----------------------
    // Clients: no skew, +1 h, -1 h (corrected), +10 h (beyond the 6 h bound: counted at
    // arrival and flagged). Small batches, explicit flushes.
    let mut clients = vec![
        client(&cols[0], 0, 0, 4, false),
        client(&cols[1], 1, HOUR, 4, false),
        client(&cols[0], 0, -HOUR, 4, false),
        client(&cols[1], 1, 10 * HOUR, 4, true),
    ];
    // Issued 10 minutes ago: an uncorrected -1 h device clock would be clamped to the
    // issue time, 10 minutes off the true minute, and the per-minute buckets would show it.
    let issued = now_ms() - 10 * MIN;
    let tokens: Vec<MintedToken> = (0..48u64)
        .map(|k| {
            let ad = 1 + (k * 7 + k / 4) % ADS;
            signer
                .mint_at(&placement(ad, advertiser_of(ad), campaign_of(ad)), issued)
                .unwrap()
        })
        .collect();
    let m = minute_with_room(15_000).await;
    let phase1 = Instant::now();
    let expect = |k: usize, minute: i64| Expect {
        ad: tokens[k].impression.ad_id,
        minute,
        country: COUNTRIES[k % 3],
        device: DEVICES[(k / 3) % 4],
        os: OSES[(k / 2) % 3],
        site: SITES[k % 2],
        user: format!("u{}", k % 11),
    };
    for k in 0..tokens.len() {
        let e = expect(k, m);
        clients[k % 4].click_valid(&mut ledger, &tokens[k], &e);
        if k % 8 == 0 {
            // Duplicate right behind the original (same or next batch of the same tracker).
            clients[k % 4].click_valid(&mut ledger, &tokens[k], &e);
        }
    }
    flush_all(&clients).await;
    for k in 0..tokens.len() {
        let e = expect(k, m);
        if k % 12 == 5 {
            // Duplicate in a later request to the same collector.
            clients[k % 4].click_valid(&mut ledger, &tokens[k], &e);
        }
        if k % 10 == 3 {
            // The same impression through the other collector.
            clients[(k + 1) % 4].click_valid(&mut ledger, &tokens[k], &e);
        }
    }
    // Rejected tokens, spread over both collectors.
    let ad1 = placement(1, advertiser_of(1), campaign_of(1));
    let rejected: Vec<(usize, String, &str)> = vec![
        (0, forger.mint(&ad1).unwrap().token, "bad_signature"),
        (1, forger.mint(&ad1).unwrap().token, "bad_signature"),
        (2, forger.mint(&ad1).unwrap().token, "bad_signature"),
        (
            1,
            tamper(&signer.mint(&ad1).unwrap().token),
            "bad_signature",
        ),
        (3, tamper(&tokens[0].token), "bad_signature"),
        (
            0,
            signer.mint_at(&ad1, now_ms() - 2 * HOUR).unwrap().token,
            "expired",
        ),
        (
            3,
            signer.mint_at(&ad1, now_ms() - 3 * HOUR).unwrap().token,
            "expired",
        ),
        (2, "AAAA".into(), "malformed"),
        (1, "not_a-token0".into(), "malformed"),
        (0, stranger.mint(&ad1).unwrap().token, "unknown_key"),
    ];
    for (i, token, reason) in &rejected {
        clients[*i].click_rejected(token);
        let c = &mut ledger.collectors[clients[*i].collector];
        match *reason {
            "bad_signature" => c.bad_signature += 1,
            "expired" => c.expired += 1,
            "malformed" => c.malformed += 1,
            "unknown_key" => c.unknown_key += 1,
            other => unreachable!("{other}"),
        }
    }
    flush_all(&clients).await;
    let took = phase1.elapsed();
    assert_eq!(
        minute_of(now_ms()),
        m,
        "phase 1 must stay inside one minute (took {took:?}); the ledger assumes it"
    );

    // Every forwarded copy reaches the aggregator: applied once, the rest duplicates.
    let am = agg.metrics().clone();
    let (unique1, dups1) = (ledger.counted.len() as u64, ledger.aggregator_duplicates());
    assert!(dups1 > 0, "the traffic has cross-collector duplicates");
    assert!(
        eventually(Duration::from_secs(20), || {
            am.clicks_with("applied") == unique1 && am.clicks_with("duplicate") == dups1
        })
        .await,
        "phase 1: applied {} (want {unique1}), duplicate {} (want {dups1})",
        am.clicks_with("applied"),
        am.clicks_with("duplicate")
    );
    assert_eq!(am.clicks_with("late"), 0, "nothing in phase 1 is late");

    // ---- Phase 2: late clicks. The watermark is now >= M - allowed_delay, so minutes
    // M-3, M-5 and M-2 are final. Device clocks are pinned at the true click time (plus
    // their skew) for the click, and run again for the send, like an app that queued the
    // clicks offline. Large batches: nothing is sent while a clock is pinned.
    let mut late_clients = vec![
        client(&cols[1], 1, -HOUR, 100, false),
        client(&cols[0], 0, HOUR, 100, false),
    ];
    let now = now_ms();
    let late = |ad: u64, minute: i64, k: usize| Expect {
        ad,
        minute,
        country: COUNTRIES[k % 3],
        device: DEVICES[k % 4],
        os: OSES[k % 3],
        site: SITES[k % 2],
        user: format!("late{k}"),
    };
    let mint = |ad: u64, issued: i64| {
        signer
            .mint_at(&placement(ad, advertiser_of(ad), campaign_of(ad)), issued)
            .unwrap()
    };
    for k in 0..5 {
        // Happened at M-3 +30 s (+k s) on a clock 1 h slow: the correction cancels it.
        let ad = 1 + k as u64;
        let at = m - 3 * MIN + 30_000 + k as i64 * 1_000;
        late_clients[0].click_valid_at(
            &mut ledger,
            &mint(ad, now - 10 * MIN),
            &late(ad, m - 3 * MIN, k),
            at,
        );
    }
    for k in 5..8 {
        // "Happened" 2 minutes before its token was issued (M-5 +20 s): clamped to the
        // issue time.
        let token = mint(2, m - 5 * MIN + 20_000);
        late_clients[0].click_valid_at(
            &mut ledger,
            &token,
            &late(2, m - 5 * MIN, k),
            m - 7 * MIN + 30_000,
        );
    }
    for k in 8..10 {
        // Through the other collector, on a clock 1 h fast.
        let ad = 3 + k as u64 % 2;
        let at = m - 2 * MIN + 10_000;
        late_clients[1].click_valid_at(
            &mut ledger,
            &mint(ad, now - 10 * MIN),
            &late(ad, m - 2 * MIN, k),
            at,
        );
    }
    // Every click of phase 2 is for a minute before M, which the watermark passed.
    ledger.late = ledger.counted.values().filter(|e| e.minute < m).count() as u64;
    assert_eq!(ledger.late, 10);
    flush_all(&late_clients).await;
    let unique = ledger.counted.len() as u64;
    let dups = ledger.aggregator_duplicates();
    assert!(
        eventually(Duration::from_secs(20), || am.clicks_with("applied")
            == unique)
        .await,
        "phase 2: applied {} (want {unique})",
        am.clicks_with("applied")
    );
    assert_eq!(am.clicks_with("late"), ledger.late);
    assert_eq!(am.clicks_with("duplicate"), dups);
    assert_eq!(am.clicks_with("too_old"), 0);
    assert_eq!(am.clicks_with("malformed"), 0);
    assert!(
        agg.memory().1 > 0,
        "minute cells exist for the counted clicks"
    );

    // ---- Collector counters against the ledger. ------------------------------------
    for (i, col) in cols.iter().enumerate() {
        let l = &ledger.collectors[i];
        let mm = col.metrics();
        let got = [
            ("accepted", mm.clicks_with("accepted")),
            ("duplicate", mm.clicks_with("duplicate")),
            ("bad_signature", mm.clicks_with("bad_signature")),
            ("expired", mm.clicks_with("expired")),
            ("malformed", mm.clicks_with("malformed")),
            ("unknown_key", mm.clicks_with("unknown_key")),
            ("clock_skew_flagged", mm.clock_skew_flagged.get()),
        ];
        let want = [
            ("accepted", l.accepted),
            ("duplicate", l.duplicate),
            ("bad_signature", l.bad_signature),
            ("expired", l.expired),
            ("malformed", l.malformed),
            ("unknown_key", l.unknown_key),
            ("clock_skew_flagged", l.flagged),
        ];
        assert_eq!(got, want, "collector {}", col.collector_id());
        assert!(
            eventually(Duration::from_secs(10), || mm.forwarded_clicks.get()
                == l.accepted)
            .await,
            "collector {} forwarded {} of {}",
            col.collector_id(),
            mm.forwarded_clicks.get(),
            l.accepted
        );
        assert!(l.duplicate > 0 && l.bad_signature > 0 && l.expired > 0 && l.malformed > 0);
    }
    for c in clients.iter().chain(&late_clients) {
        let s = c.tracker.stats();
        assert_eq!((s.rejected, s.gave_up, s.invalid), (0, 0, 0), "{s:?}");
        assert_eq!(s.sent, c.clicks, "{s:?}");
        assert_eq!(c.tracker.queued(), 0);
    }

    // ---- Queries against the ledger. -----------------------------------------------
    let range = (m - 10 * MIN, m + 2 * MIN);
    let all = ledger.per_ad(|_| true);
    assert_eq!(all.len() as u64, ADS, "every ad got clicks");
    assert_eq!(all.values().sum::<u64>(), unique);
    assert_eq!(
        top_ads(grpc, ADMIN, 10, range, None).await.unwrap(),
        ranked(&all, 10),
        "TopAds over the whole range"
    );
    assert_eq!(
        top_ads(grpc, ADMIN, 3, range, None).await.unwrap(),
        ranked(&all, 3),
        "TopAds n = 3"
    );
    // Only the late minutes.
    let late_only = ledger.per_ad(|e| e.minute < m);
    assert_eq!(
        top_ads(grpc, ADMIN, 10, (m - 10 * MIN, m), None)
            .await
            .unwrap(),
        ranked(&late_only, 10),
        "TopAds over the late minutes"
    );
    for ad in 1..=ADS {
        let r = ad_clicks(grpc, ADMIN, ad, range, Granularity::Minute, None).await;
        let got: Vec<(i64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        assert_eq!(got, ledger.buckets(ad, MIN, |_| true), "ad {ad} per minute");
        assert_eq!(r.total_clicks, all[&ad], "ad {ad} total");
        let users: BTreeSet<&str> = ledger
            .counted
            .values()
            .filter(|e| e.ad == ad)
            .map(|e| e.user.as_str())
            .collect();
        assert_eq!(r.total_unique_users, users.len() as u64, "ad {ad} users");
        let h = ad_clicks(grpc, ADMIN, ad, range, Granularity::Hour, None).await;
        let got: Vec<(i64, u64)> = h.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        assert_eq!(got, ledger.buckets(ad, HOUR, |_| true), "ad {ad} per hour");
    }
    // Filter: country DE on mobile (AND across fields).
    let de_mobile = |e: &Expect| e.country == "DE" && e.device == Device::Mobile;
    let filter = || Filter {
        country: vec!["DE".into()],
        device: vec![wire(Device::Mobile)],
        ..Default::default()
    };
    let per_ad = ledger.per_ad(de_mobile);
    assert!(!per_ad.is_empty(), "the traffic has DE mobile clicks");
    assert!(
        per_ad.values().sum::<u64>() < unique,
        "and the filter excludes some"
    );
    for ad in 1..=ADS {
        let r = ad_clicks(grpc, ADMIN, ad, range, Granularity::Minute, Some(filter())).await;
        let got: Vec<(i64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        assert_eq!(got, ledger.buckets(ad, MIN, de_mobile), "ad {ad} DE mobile");
    }
    assert_eq!(
        top_ads(grpc, ADMIN, 10, range, Some(filter()))
            .await
            .unwrap(),
        ranked(&per_ad, 10),
        "TopAds DE mobile"
    );
    // An OR within a field, an advertiser filter and an os filter.
    let f = Filter {
        os: vec!["ios".into(), "windows".into()],
        advertiser_id: vec![ADV_A],
        ..Default::default()
    };
    let keep = |e: &Expect| (e.os == "ios" || e.os == "windows") && advertiser_of(e.ad) == ADV_A;
    assert_eq!(
        top_ads(grpc, ADMIN, 10, range, Some(f)).await.unwrap(),
        ranked(&ledger.per_ad(keep), 10),
        "TopAds ios|windows of advertiser A"
    );
    // An advertiser key sees its own ads only.
    assert_eq!(
        top_ads(grpc, ADV_B_KEY, 10, range, None).await.unwrap(),
        ranked(&ledger.per_ad(|e| advertiser_of(e.ad) == ADV_B), 10),
    );

    // Nothing else arrives later (no redelivery is counted twice).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        top_ads(grpc, ADMIN, 10, range, None).await.unwrap(),
        ranked(&all, 10)
    );
    assert_eq!(am.clicks_with("applied"), unique);

    for c in clients.iter().chain(&late_clients) {
        c.tracker.shutdown().await.unwrap();
    }
    for c in cols {
        c.shutdown().await;
    }
    agg.shutdown().await;
    eprintln!(
        "mixed: {unique} counted, {dups} cross-collector duplicates, {} late, collectors {:?}, in {:?}",
        ledger.late,
        ledger
            .collectors
            .iter()
            .map(|c| (
                c.accepted,
                c.duplicate,
                c.bad_signature,
                c.expired,
                c.malformed,
                c.unknown_key,
                c.flagged
            ))
            .collect::<Vec<_>>(),
        started.elapsed()
    );
}
