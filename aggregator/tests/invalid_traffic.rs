//! Invalid-traffic rules (issue 16) on a real aggregator over real gRPC and HTTP: clicks
//! sent as `IngestBatch`es (the collectors' wire, `ua_class` and `token_issued_at_ms` set
//! as a collector sets them) from two collector ids, then every rule's exact valid and
//! invalid counts checked against a brute-force oracle written here from the rules' text
//! (global per-minute counts, first matching rule in the documented order), the
//! retroactive move of a rate rule seen in queries, and a crash/restart that must classify
//! exactly as a run without a crash.

use std::collections::BTreeMap;

use adclick_aggregator::Aggregator;
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{self, Granularity, IngestClick, Traffic};
use adclick_test_support::aggregator::{ADMIN, T0, start_retrying};
use adclick_test_support::common::{MIN, authed};
use tonic::transport::Channel;

use crate::util::*;

const MAX_IP: u32 = 5;
const MAX_USER: u32 = 4;
const TRAP: u64 = 900;
const WINDOW_MIN: i64 = 1;
/// The honeypot's effective look-back: the default `lookback_minutes` (5), cut to the
/// window.
const LOOKBACK_MIN: i64 = 1;
const MIN_MS: i64 = 1000;
const DC: ([u8; 4], u32) = ([198, 51, 100, 0], 24);

/// Rules on with small thresholds, a CIDR file in `dir`.
fn rules_config(dir: &std::path::Path) -> adclick_aggregator::AggregatorConfig {
    let mut c = config(dir);
    let cidrs = dir.join("dc.txt");
    std::fs::write(&cidrs, "# test ranges\n198.51.100.0/24\n2001:db8::/32\n").unwrap();
    let r = &mut c.rules;
    r.enabled = true;
    r.ip_rate.max_per_minute = MAX_IP;
    r.user_rate.max_per_minute = MAX_USER;
    r.honeypot.ad_ids = vec![TRAP];
    r.honeypot.window_minutes = WINDOW_MIN;
    r.too_fast.min_ms = MIN_MS;
    r.datacenter_ip.cidr_file = Some(cidrs);
    c
}

/// An honest click: issued a minute before, device clock = collector clock, UA a browser.
fn click(id: u64, ad: u64, t: i64, ip: [u8; 4], user: &str) -> IngestClick {
    let mut imp = [7u8; 16];
    imp[8..].copy_from_slice(&id.to_le_bytes());
    IngestClick {
        impression_id: imp.to_vec(),
        ad_id: ad,
        advertiser_id: 1,
        campaign_id: 1,
        token_expires_at_ms: t + 3_600_000,
        token_issued_at_ms: t - 60_000,
        event_time_ms: t,
        received_at_ms: t,
        occurred_at_ms: t,
        sent_at_ms: t,
        client_ip: ip.to_vec(),
        user_id: user.into(),
        ua_class: v1::UserAgentClass::Client as i32,
        ..Default::default()
    }
}

/// The rules' reason labels in their documented order.
const REASONS: [&str; 7] = [
    "bot_user_agent",
    "datacenter_ip",
    "honeypot",
    "impossible_time",
    "too_fast",
    "ip_rate",
    "user_rate",
];

/// Each click's reason (`None`: valid), from the rules' definitions applied to the whole
/// set at once (rate rules by global per-minute counts: what the retroactive moves must
/// converge to), honeypot flags by arrival order.
fn oracle(arrival: &[IngestClick]) -> Vec<Option<&'static str>> {
    let minute = |c: &IngestClick| c.event_time_ms.div_euclid(MIN);
    let mut per_ip: BTreeMap<(Vec<u8>, i64), u32> = BTreeMap::new();
    let mut per_user: BTreeMap<(String, i64), u32> = BTreeMap::new();
    for c in arrival {
        *per_ip.entry((c.client_ip.clone(), minute(c))).or_default() += 1;
        if !c.user_id.is_empty() {
            *per_user.entry((c.user_id.clone(), minute(c))).or_default() += 1;
        }
    }
    // Every trap click with its arrival index.
    let traps: Vec<(usize, &IngestClick)> = arrival
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ad_id == TRAP)
        .collect();
    let same_client = |a: &IngestClick, b: &IngestClick| {
        a.client_ip == b.client_ip || (!a.user_id.is_empty() && a.user_id == b.user_id)
    };
    let mut out = Vec::new();
    for (i, c) in arrival.iter().enumerate() {
        let t = c.event_time_ms;
        let ip = &c.client_ip;
        let in_dc = ip.len() == 4 && ip[..3] == DC.0[..3];
        // A trap that arrived before (or is) this click flags it within the window.
        let flagged = traps.iter().any(|(j, trap)| {
            *j <= i && same_client(trap, c) && (t - trap.event_time_ms).abs() <= WINDOW_MIN * MIN
        });
        // A trap arriving after it reaches back: a click still valid then, from the
        // look-back before the trap to the window after it.
        let reached_back = traps.iter().any(|(j, trap)| {
            *j > i
                && same_client(trap, c)
                && t >= trap.event_time_ms - LOOKBACK_MIN * MIN
                && t <= trap.event_time_ms + WINDOW_MIN * MIN
        });
        let raw = c.occurred_at_ms + (c.received_at_ms - c.sent_at_ms);
        // No correction without the device's send time or with a skewed clock.
        let impossible = c.token_issued_at_ms > 0
            && !c.clock_skew_flagged
            && c.sent_at_ms > 0
            && (raw < c.token_issued_at_ms - 1000
                || raw > c.token_expires_at_ms + 1000
                || raw > c.received_at_ms);
        let r = if c.ua_class == v1::UserAgentClass::Bot as i32 {
            Some(REASONS[0])
        } else if in_dc {
            Some(REASONS[1])
        } else if flagged {
            Some(REASONS[2])
        } else if impossible {
            Some(REASONS[3])
        } else if c.token_issued_at_ms > 0 && t - c.token_issued_at_ms < MIN_MS {
            Some(REASONS[4])
        } else if per_ip[&(ip.clone(), minute(c))] > MAX_IP {
            Some(REASONS[5])
        } else if !c.user_id.is_empty() && per_user[&(c.user_id.clone(), minute(c))] > MAX_USER {
            Some(REASONS[6])
        } else if reached_back {
            // (The test's clients that a trap reaches back to trip no rate rule, so the
            // order of a trip and the trap does not matter here.)
            Some(REASONS[2])
        } else {
            None
        };
        out.push(r);
    }
    out
}

/// One ad's expected valid clicks and invalid clicks by reason.
type Expect = (u64, BTreeMap<&'static str, u64>);

/// Expected (valid, invalid by reason) per ad.
fn expected(arrival: &[IngestClick]) -> BTreeMap<u64, Expect> {
    let mut m: BTreeMap<u64, Expect> = BTreeMap::new();
    for (c, r) in arrival.iter().zip(oracle(arrival)) {
        let e = m.entry(c.ad_id).or_default();
        match r {
            None => e.0 += 1,
            Some(r) => *e.1.entry(r).or_default() += 1,
        }
    }
    m
}

fn reasons(r: &[v1::ReasonCount]) -> BTreeMap<&'static str, u64> {
    r.iter()
        .map(|rc| (REASONS[(rc.reason - 1) as usize], rc.clicks))
        .collect()
}

async fn clicks_of(
    q: &mut QueryServiceClient<Channel>,
    ad: u64,
    g: Granularity,
    traffic: Traffic,
) -> v1::GetAdClicksResponse {
    q.get_ad_clicks(authed(
        v1::GetAdClicksRequest {
            ad_id: ad,
            from_ms: T0,
            to_ms: T0 + 86_400_000,
            granularity: g as i32,
            fill_empty: Some(false),
            traffic: traffic as i32,
            ..Default::default()
        },
        ADMIN,
    ))
    .await
    .unwrap()
    .into_inner()
}

async fn top_of(q: &mut QueryServiceClient<Channel>, traffic: Traffic) -> Vec<(u64, u64)> {
    top_by(q, traffic, 3, None).await
}

/// TopAds of the test's ten minutes: the top `n` for `traffic` and `filter`.
async fn top_by(
    q: &mut QueryServiceClient<Channel>,
    traffic: Traffic,
    n: u32,
    filter: Option<v1::Filter>,
) -> Vec<(u64, u64)> {
    q.top_ads(authed(
        v1::TopAdsRequest {
            n,
            window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
                from_ms: T0,
                to_ms: T0 + 10 * MIN,
            })),
            filter,
            traffic: traffic as i32,
        },
        ADMIN,
    ))
    .await
    .unwrap()
    .into_inner()
    .ads
    .into_iter()
    .map(|a| (a.ad_id, a.clicks))
    .collect()
}

/// Everything queries say, per ad and traffic (minute and hour buckets, invalid by reason)
/// and TopAds per traffic: what the crash test compares.
async fn snapshot(a: &Aggregator, ads: &[u64]) -> Vec<String> {
    let (_, mut q) = clients(a).await;
    let mut out = Vec::new();
    for &ad in ads {
        for t in [Traffic::Valid, Traffic::Invalid, Traffic::All] {
            for g in [Granularity::Minute, Granularity::Hour] {
                let r = clicks_of(&mut q, ad, g, t).await;
                let b: Vec<_> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
                out.push(format!(
                    "{ad} {t:?} {g:?} {b:?} {:?}",
                    reasons(&r.invalid_by_reason)
                ));
            }
        }
    }
    for t in [Traffic::Valid, Traffic::Invalid, Traffic::All] {
        out.push(format!("top {t:?} {:?}", top_of(&mut q, t).await));
    }
    // The click index's lanes, by the crash batches' IPs and flooding user.
    for (ip, user) in [
        ("10.1.0.1", ""),
        ("10.1.0.2", ""),
        ("10.1.0.3", ""),
        ("", "u-flood"),
    ] {
        for t in [Traffic::Valid, Traffic::Invalid, Traffic::All] {
            let filter = v1::Filter {
                ip: ip.into(),
                user_id: user.into(),
                ..Default::default()
            };
            let top = top_by(&mut q, t, 10, Some(filter)).await;
            out.push(format!("top {ip}{user} {t:?} {top:?}"));
        }
    }
    out
}

/// Checks every ad's valid, invalid (by reason) and all counts against the oracle, at
/// minute and hour granularity, over gRPC.
async fn check_counts(q: &mut QueryServiceClient<Channel>, sent: &[IngestClick]) {
    for (ad, (valid, by_reason)) in expected(sent) {
        let invalid: u64 = by_reason.values().sum();
        for g in [Granularity::Minute, Granularity::Hour] {
            let v = clicks_of(q, ad, g, Traffic::Valid).await;
            assert_eq!(v.total_clicks, valid, "ad {ad} valid ({g:?})");
            assert_eq!(
                reasons(&v.invalid_by_reason),
                by_reason,
                "ad {ad} reasons ({g:?})"
            );
            let i = clicks_of(q, ad, g, Traffic::Invalid).await;
            assert_eq!(i.total_clicks, invalid, "ad {ad} invalid ({g:?})");
            let all = clicks_of(q, ad, g, Traffic::All).await;
            assert_eq!(all.total_clicks, valid + invalid, "ad {ad} all ({g:?})");
        }
    }
}

/// Every rule with exact counts; one IP's clicks split over two collectors trip `ip_rate`
/// together; the retroactive move is visible between two queries; GetTotals, TopAds and
/// the HTTP mirror split traffic the same way; ip and user_id filters (the click index's two lanes) split it too.
#[test]
fn every_rule_counts_exactly_and_rate_trips_move_earlier_clicks() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = rules_config(dir.path());
    cfg.archive.enabled = true;
    cfg.archive.dir = dir.path().join("archive");
    let a = rt.block_on(adclick_aggregator::start(cfg)).unwrap();
    let sent = rt.block_on(async {
        let (mut ing, mut q) = clients(&a).await;
        let mut sent: Vec<IngestClick> = Vec::new();
        let mut id = 0u64;
        let mut next = || {
            id += 1;
            id
        };
        let t = |s: i64| T0 + s * 1000;
        let mut batch = Vec::new();
        // bot_user_agent: 3 clicks the collector classified BOT.
        for s in 0..3 {
            let mut c = click(next(), 1, t(s), [10, 0, 0, 1], "");
            c.ua_class = v1::UserAgentClass::Bot as i32;
            batch.push(c);
        }
        // datacenter_ip: 2 clicks from the CIDR file's range.
        for s in 0..2 {
            batch.push(click(next(), 1, t(s), [198, 51, 100, 7], ""));
        }
        // too_fast: 2 clicks 500 ms after issue, 1 after 1.5 s (valid).
        for (s, after) in [(1, 500), (2, 500), (3, 1500)] {
            let mut c = click(next(), 2, t(s), [10, 0, 0, 4], "");
            c.token_issued_at_ms = t(s) - after;
            batch.push(c);
        }
        // impossible_time: the device claims the click an hour before the impression; a
        // skew-flagged one is not judged (valid).
        let mut c = click(next(), 2, t(5), [10, 0, 0, 5], "");
        c.occurred_at_ms = t(5) - 3_600_000;
        batch.push(c.clone());
        let mut c2 = c;
        c2.impression_id[0] = 8;
        c2.clock_skew_flagged = true;
        c2.occurred_at_ms = 0;
        batch.push(c2);
        // user_rate: user "flood" clicks 5 times from five IPs (> 4); "calm" 4 times.
        for s in 0..5 {
            batch.push(click(next(), 3, t(s), [10, 0, 1, s as u8], "flood"));
        }
        for s in 0..4 {
            batch.push(click(next(), 3, t(s), [10, 0, 2, s as u8], "calm"));
        }
        // ip_rate at the limit: 5 clicks from one IP stay valid.
        for s in 0..5 {
            batch.push(click(next(), 3, t(10 + s), [10, 0, 0, 7], ""));
        }
        // honeypot: the trap, then the same IP 30 s later on ad 1.
        batch.push(click(next(), TRAP, t(20), [10, 0, 0, 3], ""));
        batch.push(click(next(), 1, t(50), [10, 0, 0, 3], ""));
        // honeypot looking back: 10.0.0.8 clicks ad 4 at 30 s and 34 s, and at 10 s (75 s
        // before its trap, sent below: outside the window, in the same minute as the
        // other two). Valid for now.
        for s in [10, 30, 34] {
            batch.push(click(next(), 4, t(s), [10, 0, 0, 8], ""));
        }
        sent.extend(batch.iter().cloned());
        send(&mut ing, "col-a", 1, batch).await;

        // ip_rate across two collectors: IP 10.0.0.6 sends 3 clicks through col-a and 2
        // through col-b: 5, at the limit, all valid so far.
        let flood = |id: u64, s: i64| click(id, 2, t(30 + s), [10, 0, 0, 6], "");
        let a1: Vec<_> = (0..3).map(|s| flood(next(), s)).collect();
        let b1: Vec<_> = (3..5).map(|s| flood(next(), s)).collect();
        sent.extend(a1.iter().chain(&b1).cloned());
        send(&mut ing, "col-a", 2, a1).await;
        send(&mut ing, "col-b", 4, b1).await;
        let before = clicks_of(&mut q, 2, Granularity::Minute, Traffic::Valid).await;
        let e = expected(&sent);
        assert_eq!(before.total_clicks, e[&2].0, "before the trip");
        assert_eq!(reasons(&before.invalid_by_reason).get("ip_rate"), None);
        // The sixth, through col-b: all six invalid, the five earlier ones moved.
        let six = vec![flood(next(), 5)];
        sent.extend(six.iter().cloned());
        send(&mut ing, "col-b", 5, six).await;
        let after = clicks_of(&mut q, 2, Granularity::Minute, Traffic::Valid).await;
        assert_eq!(after.total_clicks, before.total_clicks - 5, "five moved to invalid");
        assert_eq!(reasons(&after.invalid_by_reason).get("ip_rate"), Some(&6));

        // The trap of 10.0.0.8 at 85 s: its two clicks of the minute before move to
        // invalid; the one 75 s before stays valid.
        let before = clicks_of(&mut q, 4, Granularity::Minute, Traffic::Valid).await;
        assert_eq!(before.total_clicks, 3, "valid before the trap");
        let trap = vec![click(next(), TRAP, t(85), [10, 0, 0, 8], "")];
        sent.extend(trap.iter().cloned());
        send(&mut ing, "col-b", 6, trap).await;
        let after = clicks_of(&mut q, 4, Granularity::Minute, Traffic::Valid).await;
        assert_eq!(after.total_clicks, 1, "two moved by the trap");
        assert_eq!(reasons(&after.invalid_by_reason).get("honeypot"), Some(&2));

        // Outside the honeypot window (70 s after the trap): valid again. Sent last: it
        // moves the watermark past the first minute.
        let late = vec![click(next(), 1, t(91), [10, 0, 0, 3], "")];
        sent.extend(late.iter().cloned());
        send(&mut ing, "col-a", 3, late).await;

        // Every rule has clicks in this test (the oracle is not trivially empty).
        let all: BTreeMap<&str, u64> = expected(&sent)
            .values()
            .flat_map(|(_, r)| r.iter().map(|(k, v)| (*k, *v)))
            .fold(BTreeMap::new(), |mut m, (k, v)| {
                *m.entry(k).or_default() += v;
                m
            });
        assert_eq!(
            all,
            BTreeMap::from([
                ("bot_user_agent", 3),
                ("datacenter_ip", 2),
                ("honeypot", 5),
                ("impossible_time", 1),
                ("too_fast", 2),
                ("ip_rate", 6),
                ("user_rate", 5),
            ])
        );
        check_counts(&mut q, &sent).await;

        // TopAds per traffic, against the oracle.
        let e = expected(&sent);
        let rank = |f: &dyn Fn(&Expect) -> u64| {
            let mut v: Vec<(u64, u64)> = e.iter().map(|(ad, x)| (*ad, f(x))).filter(|x| x.1 > 0).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(3);
            v
        };
        assert_eq!(top_of(&mut q, Traffic::Valid).await, rank(&|x| x.0));
        assert_eq!(top_of(&mut q, Traffic::Invalid).await, rank(&|x| x.1.values().sum()));
        assert_eq!(top_of(&mut q, Traffic::All).await, rank(&|x| x.0 + x.1.values().sum::<u64>()));

        // GetTotals of advertiser 1: every ad summed.
        let totals = |traffic: Traffic| v1::GetTotalsRequest {
            scope: v1::TotalsScope::Advertiser as i32,
            id: 1,
            from_ms: T0,
            to_ms: T0 + 86_400_000,
            granularity: Granularity::Hour as i32,
            traffic: traffic as i32,
            ..Default::default()
        };
        let valid: u64 = e.values().map(|x| x.0).sum();
        let r = q.get_totals(authed(totals(Traffic::Valid), ADMIN)).await.unwrap().into_inner();
        assert_eq!(r.total_clicks, valid);
        assert_eq!(reasons(&r.invalid_by_reason), all);
        let r = q.get_totals(authed(totals(Traffic::Invalid), ADMIN)).await.unwrap().into_inner();
        assert_eq!(r.total_clicks, all.values().sum::<u64>());

        // The HTTP mirror: traffic=invalid, and the breakdown by reason.
        adclick_sdk::HttpTransport::install_crypto_provider();
        let http = reqwest::Client::new();
        let url = |traffic: &str| {
            format!(
                "http://{}/v1/ads/2/clicks?from_ms={T0}&to_ms={}&granularity=hour&traffic={traffic}",
                a.http_addr(),
                T0 + 86_400_000
            )
        };
        let get = |u: String| {
            let http = http.clone();
            async move {
                let r = http.get(u).bearer_auth(ADMIN).send().await.unwrap();
                {
                    let status = r.status().as_u16();
                    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
                    (status, body)
                }
            }
        };
        let (status, body) = get(url("invalid")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["total_clicks"], e[&2].1.values().sum::<u64>());
        assert_eq!(body["invalid_by_reason"]["ip_rate"], 6);
        assert_eq!(body["invalid_by_reason"]["too_fast"], 2);
        let (status, body) = get(url("valid")).await;
        assert_eq!((status, body["total_clicks"].as_u64()), (200, Some(e[&2].0)));
        let (status, body) = get(url("bogus")).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["invalid_params"][0]["name"], "traffic", "{body}");

        // ip and user_id filters answer from the click index's two lanes, every traffic
        // value, against the oracle restricted to the filter: an IP with invalid clicks on
        // arrival (10.0.0.4: too_fast), an IP whose clicks a rate trip moved across two
        // collectors (10.0.0.6), one a trap reached back to (10.0.0.8), and users.
        for (ip, user) in [
            ("10.0.0.4", ""),
            ("10.0.0.6", ""),
            ("10.0.0.8", ""),
            ("10.0.0.3", ""),
            ("", "flood"),
            ("", "calm"),
        ] {
            let mine: Vec<IngestClick> = sent
                .iter()
                .filter(|c| {
                    (ip.is_empty() || c.client_ip == ip.parse::<std::net::Ipv4Addr>().unwrap().octets())
                        && (user.is_empty() || c.user_id == user)
                })
                .cloned()
                .collect();
            // The oracle over every click (rates are global), kept to this client's.
            let verdicts: BTreeMap<Vec<u8>, Option<&str>> = sent
                .iter()
                .zip(oracle(&sent))
                .map(|(c, r)| (c.impression_id.clone(), r))
                .collect();
            let mut want: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
            for c in &mine {
                let e = want.entry(c.ad_id).or_default();
                match verdicts[&c.impression_id] {
                    None => e.0 += 1,
                    Some(_) => e.1 += 1,
                }
            }
            assert!(!want.is_empty());
            let filter = v1::Filter {
                ip: ip.into(),
                user_id: user.into(),
                ..Default::default()
            };
            for (&ad, &(valid, invalid)) in &want {
                for (traffic, n) in [
                    (Traffic::Valid, valid),
                    (Traffic::Invalid, invalid),
                    (Traffic::All, valid + invalid),
                ] {
                    let r = q
                        .get_ad_clicks(authed(
                            v1::GetAdClicksRequest {
                                ad_id: ad,
                                from_ms: T0,
                                to_ms: T0 + 10 * MIN,
                                filter: Some(filter.clone()),
                                traffic: traffic as i32,
                                ..Default::default()
                            },
                            ADMIN,
                        ))
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(r.total_clicks, n, "{ip}{user} ad {ad} {traffic:?}");
                }
            }
            // TopAds by the same filter, per traffic.
            for (traffic, pick) in [
                (Traffic::Valid, 0usize),
                (Traffic::Invalid, 1),
            ] {
                let mut expect: Vec<(u64, u64)> = want
                    .iter()
                    .map(|(ad, v)| (*ad, if pick == 0 { v.0 } else { v.1 }))
                    .filter(|x| x.1 > 0)
                    .collect();
                expect.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                let got = top_by(&mut q, traffic, 10, Some(filter.clone())).await;
                assert_eq!(got, expect, "TopAds {ip}{user} {traffic:?}");
            }
        }
        sent
    });
    let text = rt.block_on(async {
        reqwest::get(format!("http://{}/metrics", a.http_addr()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    for (reason, n) in [("ip_rate", 6), ("user_rate", 5), ("bot_user_agent", 3)] {
        let line = format!("adclick_aggregator_invalid_clicks_total{{reason=\"{reason}\"}} {n}");
        assert!(text.contains(&line), "{line} missing from /metrics");
    }
    assert!(text.contains("adclick_aggregator_invalid_moved_total{reason=\"ip_rate\"} 5"));
    assert!(text.contains("adclick_aggregator_invalid_moved_total{reason=\"honeypot\"} 2"));
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("adclick_aggregator_rules_info{version=\""))
        .and_then(|l| l.split('"').next())
        .expect("rules_info exported")
        .to_string();
    assert!(
        text.lines().any(
            |l| l.starts_with("adclick_aggregator_rules_info{version=\"") && !l.contains("\"off\"")
        ),
        "the rules version is exported"
    );
    rt.block_on(a.shutdown());
    // The archive has every click, invalid ones with their rule as classified on arrival:
    // the clicks a rate rule moved later stay `counted` there (5 for ip_rate, 4 for
    // user_rate: the oracle's 6 and 5 minus the one that tripped each).
    // (`read_archive` keys rows by (collector_seq, index): the two collector ids above use
    // distinct seqs.)
    let (rows, _) = crate::archive::read_archive(&dir.path().join("archive"));
    assert_eq!(rows.len(), sent.len());
    let mut by: BTreeMap<(String, Option<String>), u64> = BTreeMap::new();
    for (_, status, reason) in rows.values() {
        *by.entry((status.clone(), reason.clone())).or_default() += 1;
    }
    let inv = |r: &str| by.get(&("invalid_traffic".into(), Some(r.into()))).copied();
    for (r, n) in [
        ("bot_user_agent", 3),
        ("datacenter_ip", 2),
        ("honeypot", 3),
        ("impossible_time", 1),
        ("too_fast", 2),
        ("ip_rate", 1),
        ("user_rate", 1),
    ] {
        assert_eq!(inv(r), Some(n), "archived invalid_traffic/{r}: {by:?}");
    }
    let invalid_rows: u64 = by
        .iter()
        .filter(|((s, _), _)| s == "invalid_traffic")
        .map(|(_, n)| n)
        .sum();
    let counted = by.get(&("counted".into(), None)).copied();
    assert_eq!(counted, Some(sent.len() as u64 - invalid_rows));
    // Every row names the rules version that classified it: the one in force.
    let all_rows = archived(&dir.path().join("archive"));
    let versions: BTreeMap<Option<String>, usize> =
        all_rows.iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.version.clone()).or_default() += 1;
            m
        });
    let moved_rows = all_rows.iter().filter(|r| r.status == "moved").count();
    assert_eq!(
        versions,
        BTreeMap::from([(Some(version), sent.len() + moved_rows)])
    );
    // Each move is one `moved` row naming a row archived `counted`, once: with the
    // arrival classification, they give the oracle's final split exactly.
    let mut click_rows: BTreeMap<(u64, u32), &Arch> = BTreeMap::new();
    for r in all_rows.iter().filter(|r| r.status != "moved") {
        assert!(click_rows.insert((r.log_pos, r.index), r).is_none());
    }
    let mut moved_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in all_rows.iter().filter(|r| r.status == "moved") {
        let orig = click_rows[&(r.log_pos, r.index)];
        assert_eq!(
            (orig.status.as_str(), orig.ad),
            ("counted", r.ad),
            "{r:?} moves {orig:?}"
        );
        assert!(seen.insert((r.log_pos, r.index)), "moved twice: {r:?}");
        *moved_by.entry(r.reason.clone().unwrap()).or_default() += 1;
    }
    assert_eq!(
        moved_by,
        BTreeMap::from([
            ("honeypot".into(), 2),
            ("ip_rate".into(), 5),
            ("user_rate".into(), 4)
        ])
    );
    let mut final_by: BTreeMap<String, u64> = BTreeMap::new();
    for r in &all_rows {
        let moved = seen.contains(&(r.log_pos, r.index));
        match (r.status.as_str(), &r.reason) {
            ("invalid_traffic" | "moved", Some(x)) => *final_by.entry(x.clone()).or_default() += 1,
            ("counted", _) if !moved => *final_by.entry("valid".into()).or_default() += 1,
            _ => {}
        }
    }
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for (valid, by_reason) in expected(&sent).values() {
        *want.entry("valid".into()).or_default() += valid;
        for (r, n) in by_reason {
            *want.entry((*r).into()).or_default() += n;
        }
    }
    assert_eq!(final_by, want, "the archive re-derives the final split");
}

/// One archived row, as the checks above need it.
#[derive(Debug)]
struct Arch {
    log_pos: u64,
    index: u32,
    ad: u64,
    status: String,
    reason: Option<String>,
    version: Option<String>,
}

/// Every row of the local archive in `dir`.
fn archived(dir: &std::path::Path) -> Vec<Arch> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int8Type, UInt32Type, UInt64Type};
    let mut out = Vec::new();
    let files = adclick_archive::Destination::Local {
        dir: dir.to_path_buf(),
    }
    .list("")
    .unwrap();
    for f in files {
        let file = std::fs::File::open(dir.join(f)).unwrap();
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let col = |n: &str| {
                b.column_by_name(n)
                    .unwrap_or_else(|| panic!("column {n}"))
                    .clone()
            };
            let dict = |n: &str| {
                let c = col(n);
                let d = c.as_dictionary::<Int8Type>();
                let values = d.values().as_string::<i32>();
                (0..b.num_rows())
                    .map(|i| {
                        (!d.is_null(i))
                            .then(|| values.value(d.keys().value(i) as usize).to_string())
                    })
                    .collect::<Vec<_>>()
            };
            let (status, reason, version) = (dict("status"), dict("reason"), dict("rules_version"));
            let (pos, idx, ad) = (col("log_pos"), col("click_index"), col("ad_id"));
            for i in 0..b.num_rows() {
                out.push(Arch {
                    log_pos: pos.as_primitive::<UInt64Type>().value(i),
                    index: idx.as_primitive::<UInt32Type>().value(i),
                    ad: ad.as_primitive::<UInt64Type>().value(i),
                    status: status[i].clone().unwrap(),
                    reason: reason[i].clone(),
                    version: version[i].clone(),
                });
            }
        }
    }
    out
}

/// The batches of the crash test: before the crash an IP at the limit (its clicks
/// remembered for a retroactive move), one over it, a bot; after it the IP at the limit
/// sends two more (moving the four remembered before the crash) and a user floods.
fn crash_batches() -> (Vec<Vec<IngestClick>>, Vec<Vec<IngestClick>>) {
    let t = |s: i64| T0 + s * 1000;
    let mut id = 1000u64;
    let mut next = || {
        id += 1;
        id
    };
    let mut pre = Vec::new();
    pre.push(
        (0..4)
            .map(|s| click(next(), 1, t(s), [10, 1, 0, 1], ""))
            .collect::<Vec<_>>(),
    );
    pre.push(
        (0..7)
            .map(|s| click(next(), 2, t(s), [10, 1, 0, 2], ""))
            .collect(),
    );
    let mut bot = click(next(), 1, t(9), [10, 1, 0, 3], "");
    bot.ua_class = v1::UserAgentClass::Bot as i32;
    pre.push(vec![bot]);
    let post = vec![
        (4..6)
            .map(|s| click(next(), 1, t(s), [10, 1, 0, 1], ""))
            .collect::<Vec<_>>(),
        (0..5)
            .map(|s| click(next(), 3, t(20 + s), [10, 1, 1, s as u8], "u-flood"))
            .collect(),
    ];
    (pre, post)
}

/// Crash (no shutdown) after the first batches, with the rules' state in a checkpoint or
/// only in the WAL, restart on the same directory, send the rest: every query answers as
/// a run without a crash, and as the oracle.
#[test]
fn classification_survives_a_crash_identically() {
    adclick_sdk::HttpTransport::install_crypto_provider();
    let (pre, post) = crash_batches();
    let sent: Vec<IngestClick> = pre.iter().chain(&post).flatten().cloned().collect();
    let ads = [1, 2, 3];
    // Reference: no crash.
    let ref_dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt
        .block_on(adclick_aggregator::start(rules_config(ref_dir.path())))
        .unwrap();
    let reference = rt.block_on(async {
        let (mut ing, mut q) = clients(&a).await;
        for (i, b) in pre.iter().chain(&post).enumerate() {
            send(&mut ing, "c", i as u64 + 1, b.clone()).await;
        }
        check_counts(&mut q, &sent).await;
        snapshot(&a, &ads).await
    });
    rt.block_on(a.shutdown());
    // The retroactive move of IP 10.1.0.1 spans the crash.
    assert_eq!(expected(&sent)[&1].1.get("ip_rate"), Some(&6));

    for interval_ms in [1, 3_600_000] {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut cfg = rules_config(dir.path());
        cfg.checkpoint.interval_ms = interval_ms;
        let a = rt.block_on(start_retrying(cfg.clone(), None));
        rt.block_on(async {
            let (mut ing, _) = clients(&a).await;
            for (i, b) in pre.iter().enumerate() {
                send(&mut ing, "c", i as u64 + 1, b.clone()).await;
                // Past the writer's checkpoint tick (10 ms at least): with interval 1 ms a
                // checkpoint holding the rules' state is taken after each batch and saved
                // once its encoding (a thread) has finished.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            if interval_ms == 1 {
                // On a box whose cores other tests keep busy the encoding may take longer
                // than the pauses above: wait for one to be saved (the writer saves it
                // while idle).
                let start = std::time::Instant::now();
                loop {
                    let text = reqwest::get(format!("http://{}/metrics", a.http_addr()))
                        .await
                        .unwrap()
                        .text()
                        .await
                        .unwrap();
                    let saved: u64 = text
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("adclick_aggregator_checkpoint_seconds_count ")
                        })
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if saved >= 1 {
                        break;
                    }
                    assert!(
                        start.elapsed() < std::time::Duration::from_secs(10),
                        "no checkpoint was saved before the crash"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        });
        a.kill();
        rt.shutdown_background();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let a = rt.block_on(start_retrying(cfg, None));
        let got = rt.block_on(async {
            let (mut ing, mut q) = clients(&a).await;
            for (i, b) in pre.iter().chain(&post).enumerate() {
                let ack = send(&mut ing, "c", i as u64 + 1, b.clone()).await;
                assert_eq!(ack.already_acked, i < pre.len());
            }
            check_counts(&mut q, &sent).await;
            snapshot(&a, &ads).await
        });
        assert_eq!(got, reference, "checkpoint interval {interval_ms} ms");
        rt.block_on(a.shutdown());
    }
}
