//! Totals per campaign and advertiser (`GetTotals`, HTTP `/v1/campaigns/{id}/totals`), and
//! live queries (`WatchTopAds`, `WatchAdClicks`, their SSE mirror) — issue 14 items 3-4 —
//! against a real aggregator over real sockets, with the expected numbers computed here
//! from the clicks sent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use adclick_proto::v1::{
    self, GetAdClicksRequest, GetTotalsRequest, Granularity, IngestClick, TimeRange, TopAdsRequest,
    TotalsScope, WatchAdClicksRequest, WatchTopAdsRequest, top_ads_request::Window,
};
use adclick_test_support::aggregator::{ADMIN, T0};
use adclick_test_support::common::{MIN, authed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::*;
use crate::validation::{Http, violations};

const HOUR: i64 = 60 * MIN;

/// Per-hour (clicks, distinct users) of the clicks `keep` selects.
fn hourly(all: &[IngestClick], keep: impl Fn(&IngestClick) -> bool) -> BTreeMap<i64, (u64, u64)> {
    let mut m: BTreeMap<i64, (u64, BTreeSet<&str>)> = BTreeMap::new();
    for c in all.iter().filter(|c| keep(c)) {
        let e = m
            .entry(c.event_time_ms.div_euclid(HOUR) * HOUR)
            .or_default();
        e.0 += 1;
        e.1.insert(&c.user_id);
    }
    m.into_iter()
        .map(|(h, (n, u))| (h, (n, u.len() as u64)))
        .collect()
}

fn totals(scope: TotalsScope, id: u64, from: i64, to: i64) -> GetTotalsRequest {
    GetTotalsRequest {
        scope: scope as i32,
        id,
        from_ms: from,
        to_ms: to,
        granularity: Granularity::Hour as i32,
        fill_empty: Some(false),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_per_campaign_and_advertiser_match_the_clicks() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    // 60 ads over 3 hours, 50 users: campaign = ad % 5, advertiser = ad % 3 (`util::clicks`).
    let all = clicks(7, 3000, 60, 180, 50);
    send(&mut ing, "c", 1, all.clone()).await;
    let (from, to) = (T0, T0 + 3 * HOUR);

    let check = |r: &v1::GetTotalsResponse, want: &BTreeMap<i64, (u64, u64)>, what: &str| {
        let got: BTreeMap<i64, (u64, u64)> = r
            .buckets
            .iter()
            .map(|b| (b.start_ms, (b.clicks, b.unique_users)))
            .collect();
        assert_eq!(&got, want, "{what}: per hour (clicks, users)");
        let clicks: u64 = want.values().map(|x| x.0).sum();
        assert_eq!(r.total_clicks, clicks, "{what}: total");
    };
    for campaign in 1..5u64 {
        let keep = |c: &IngestClick| c.campaign_id == campaign;
        let r = q
            .get_totals(authed(
                totals(TotalsScope::Campaign, campaign, from, to),
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner();
        check(&r, &hourly(&all, keep), &format!("campaign {campaign}"));
        let users: BTreeSet<&str> = all
            .iter()
            .filter(|c| keep(c))
            .map(|c| c.user_id.as_str())
            .collect();
        assert_eq!(
            r.total_unique_users,
            users.len() as u64,
            "campaign {campaign} users"
        );
        let ads: BTreeSet<u64> = all.iter().filter(|c| keep(c)).map(|c| c.ad_id).collect();
        assert_eq!(r.ads as usize, ads.len(), "campaign {campaign} ads");
    }
    // Advertiser 2, filtered to one country.
    let mut req = totals(TotalsScope::Advertiser, 2, from, to);
    req.filter = Some(v1::Filter {
        country: vec!["de".into()],
        ..Default::default()
    });
    let r = q.get_totals(authed(req, ADMIN)).await.unwrap().into_inner();
    check(
        &r,
        &hourly(&all, |c| c.advertiser_id == 2 && c.country == "DE"),
        "advertiser 2, DE",
    );

    // fill_empty (default): every hour listed; minute granularity works too.
    let mut req = totals(TotalsScope::Campaign, 3, from - HOUR, to);
    req.fill_empty = None;
    let r = q.get_totals(authed(req, ADMIN)).await.unwrap().into_inner();
    assert_eq!(r.buckets.len(), 4);
    assert_eq!((r.buckets[0].clicks, r.buckets[0].unique_users), (0, 0));
    let mut req = totals(TotalsScope::Campaign, 3, from, from + 30 * MIN);
    req.granularity = Granularity::Minute as i32;
    let r = q.get_totals(authed(req, ADMIN)).await.unwrap().into_inner();
    let per_minute = oracle(&all);
    for b in &r.buckets {
        let want: u64 = per_minute
            .iter()
            .filter(|((ad, m), _)| ad % 5 == 3 && *m == b.start_ms)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(b.clicks, want, "campaign 3 minute {}", b.start_ms);
    }

    // An advertiser key: its own ads of the campaign only; another advertiser's totals are
    // zero (indistinguishable from no clicks).
    let r = q
        .get_totals(authed(totals(TotalsScope::Campaign, 2, from, to), ADV1))
        .await
        .unwrap()
        .into_inner();
    check(
        &r,
        &hourly(&all, |c| c.campaign_id == 2 && c.advertiser_id == 1),
        "campaign 2 as advertiser 1",
    );
    let r = q
        .get_totals(authed(totals(TotalsScope::Advertiser, 2, from, to), ADV1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total_clicks, r.ads, r.buckets.len()), (0, 0, 0));

    // The HTTP mirror: same numbers, RFC 3339 beside epoch ms.
    let http = Http::new(&a);
    let (status, _, body) = http
        .get(
            &format!("/v1/advertisers/1/totals?from_ms={from}&to_ms={to}&granularity=hour&fill_empty=false"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let want = hourly(&all, |c| c.advertiser_id == 1);
    assert_eq!(
        body["total_clicks"],
        want.values().map(|x| x.0).sum::<u64>()
    );
    assert_eq!(body["scope"], "advertiser");
    assert_eq!(body["buckets"].as_array().unwrap().len(), want.len());
    assert!(body["buckets"][0]["start"].as_str().unwrap().ends_with('Z'));
    let (status, _, body) = http
        .get(
            &format!("/v1/campaigns/4/totals?from_ms={from}&to_ms={to}&granularity=hour"),
            Some(ADV1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let want: u64 = all
        .iter()
        .filter(|c| c.campaign_id == 4 && c.advertiser_id == 1)
        .count() as u64;
    assert_eq!(body["total_clicks"], want);

    // Refusals, each named: gRPC and HTTP.
    let mut bad = totals(TotalsScope::Unspecified, 0, from, from + 2 * 24 * HOUR);
    bad.granularity = Granularity::Minute as i32;
    let e = q.get_totals(authed(bad, ADMIN)).await.unwrap_err();
    let v = violations(&e);
    for want in [
        ("scope", "REQUIRED"),
        ("id", "REQUIRED"),
        ("granularity", "TOO_MANY_BUCKETS"),
    ] {
        assert!(
            v.contains(&(want.0.into(), want.1.into())),
            "{want:?} in {v:?}"
        );
    }
    let (status, _, body) = http
        .get(
            &format!("/v1/campaigns/x7/totals?from_ms={from}&to_ms={to}&country=USA&bogus=1"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let names: Vec<&str> = body["invalid_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["id", "bogus"], "{body}");
    let (status, _, body) = http
        .get(
            &format!("/v1/campaigns/7/totals?from_ms={from}&to_ms={to}&country=USA"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["invalid_params"][0]["name"], "country", "{body}");
    a.shutdown().await;
}

/// A `WatchTopAds` request for `query` every `interval_ms`, with `key`.
fn watch_top(
    query: TopAdsRequest,
    interval_ms: u32,
    key: &str,
) -> tonic::Request<WatchTopAdsRequest> {
    authed(
        WatchTopAdsRequest {
            query: Some(query),
            interval_ms,
        },
        key,
    )
}

fn top_range(n: u32, from: i64, to: i64) -> TopAdsRequest {
    TopAdsRequest {
        n,
        window: Some(Window::Range(TimeRange {
            from_ms: from,
            to_ms: to,
        })),
        filter: None,
        ..Default::default()
    }
}

/// The clicks of one more batch: `n` clicks of ad `ad`, ids from `seq`.
fn more(seq: u64, ad: u64, n: usize) -> Vec<IngestClick> {
    (0..n)
        .map(|i| IngestClick {
            impression_id: [seq.to_be_bytes(), (i as u64).to_be_bytes()].concat(),
            ad_id: ad,
            advertiser_id: ad % 3,
            campaign_id: ad % 5,
            token_expires_at_ms: T0 + 3 * HOUR,
            event_time_ms: T0 + 5 * MIN,
            received_at_ms: T0,
            user_id: format!("w{i}"),
            ..Default::default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_push_changes_and_drop_clients_that_fall_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.query.watch_buffer = 2;
    cfg.query.watch_max_per_key = 3;
    cfg.query.rate_limit_per_second = 0;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let (from, to) = (T0, T0 + 30 * MIN);
    let mut sent = more(1, 11, 5);
    sent.extend(more(2, 12, 3));
    sent.extend(more(5, 13, 2)); // advertiser 1's ad (13 % 3)
    send(&mut ing, "c", 1, sent).await;

    // WatchTopAds: the answer now, then the answer after more clicks, nothing in between.
    let mut w = q
        .watch_top_ads(watch_top(top_range(10, from, to), 100, ADMIN))
        .await
        .unwrap()
        .into_inner();
    let first = w.message().await.unwrap().unwrap();
    let pairs = |r: &v1::TopAdsResponse| {
        r.ads
            .iter()
            .map(|x| (x.ad_id, x.clicks))
            .collect::<Vec<_>>()
    };
    assert_eq!(pairs(&first), vec![(11, 5), (12, 3), (13, 2)]);
    // Several intervals without a change: nothing may be sent for them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&mut ing, "c", 2, more(3, 12, 4)).await;
    let next = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("an update after the clicks")
        .unwrap()
        .unwrap();
    assert_eq!(pairs(&next), vec![(12, 7), (11, 5), (13, 2)]);

    // An advertiser key watches its own ads only; another advertiser's ad has no clicks.
    let mut own = q
        .watch_top_ads(watch_top(top_range(10, from, to), 100, ADV1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pairs(&own.message().await.unwrap().unwrap()), vec![(13, 2)]);
    drop(own);

    // WatchAdClicks on a fixed range: same, with buckets.
    let clicks_q = GetAdClicksRequest {
        ad_id: 11,
        from_ms: from,
        to_ms: to,
        granularity: Granularity::Minute as i32,
        filter: None,
        fill_empty: Some(false),
        ..Default::default()
    };
    let mut wc = q
        .watch_ad_clicks(authed(
            WatchAdClicksRequest {
                query: Some(clicks_q.clone()),
                last_minutes: 0,
                interval_ms: 100,
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = wc.message().await.unwrap().unwrap();
    assert_eq!(first.total_clicks, 5);
    send(&mut ing, "c", 3, more(4, 11, 2)).await;
    let next = tokio::time::timeout(Duration::from_secs(10), wc.message())
        .await
        .expect("an update")
        .unwrap()
        .unwrap();
    assert_eq!(next.total_clicks, 7);
    assert!(next.watermark_ms > 0);
    let mut other = q
        .watch_ad_clicks(authed(
            WatchAdClicksRequest {
                query: Some(clicks_q.clone()),
                last_minutes: 0,
                interval_ms: 100,
            },
            ADV1,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        other.message().await.unwrap().unwrap().total_clicks,
        0,
        "ad 11 is advertiser 2's"
    );
    drop(other);

    // A third watch of the key is the limit; a fourth is refused.
    let _third = q
        .watch_top_ads(watch_top(top_range(1, from, to), 0, ADMIN))
        .await
        .unwrap();
    let e = q
        .watch_top_ads(watch_top(top_range(1, from, to), 0, ADMIN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("watch_max_per_key"), "{e:?}");
    let metrics = reqwest::get(format!("http://{}/metrics", a.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("queries_refused_total{rpc=\"WatchTopAds\",reason=\"watch_limit\"} 1"),
        "{metrics}"
    );
    drop(_third);

    // Invalid queries are refused before anything streams, fields named under `query.`.
    let e = q
        .watch_top_ads(watch_top(
            TopAdsRequest {
                n: 0,
                ..top_range(1, from, to)
            },
            5,
            ADV1,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        violations(&e),
        vec![("interval_ms".into(), "OUT_OF_RANGE".into())]
    );
    let e = q
        .watch_top_ads(watch_top(
            TopAdsRequest {
                n: 0,
                ..top_range(1, from, to)
            },
            0,
            ADV1,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        violations(&e),
        vec![("query.n".into(), "OUT_OF_RANGE".into())]
    );
    let e = q
        .watch_ad_clicks(authed(
            WatchAdClicksRequest {
                query: Some(clicks_q.clone()),
                last_minutes: 5,
                interval_ms: 0,
            },
            ADV1,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        violations(&e),
        vec![("last_minutes".into(), "CONFLICT".into())]
    );
    let e = q
        .watch_top_ads(authed(WatchTopAdsRequest::default(), "not-a-key"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // A client that stops reading: every interval brings a changed answer (clicks keep
    // coming, each update is large), the client reads nothing. Its watch must end with
    // RESOURCE_EXHAUSTED after a bounded number of updates, not queue them forever.
    drop((w, wc));
    let many: Vec<IngestClick> = (0..4000u64)
        .flat_map(|ad| more(1000 + ad, 100 + ad, 1))
        .collect();
    send(&mut ing, "c", 4, many).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", a.grpc_addr()))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut slow = v1::query_service_client::QueryServiceClient::new(ch);
    let mut stalled = slow
        .watch_top_ads(watch_top(top_range(10_000, from, to), 100, ADMIN))
        .await
        .unwrap()
        .into_inner();
    let writer = tokio::spawn({
        let mut ing = ing.clone();
        async move {
            for seq in 5..400u64 {
                send(&mut ing, "c", seq, more(10_000 + seq, 5000 + seq, 1)).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    // Wait until the server has given up on the client (its watch gauge drops to 0)...
    let metrics = format!("http://{}/metrics", a.http_addr());
    let mut dropped = false;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        if text.contains("queries_refused_total{rpc=\"WatchTopAds\",reason=\"fell_behind\"} 1") {
            dropped = true;
            break;
        }
    }
    writer.abort();
    assert!(dropped, "the stalled watch was never dropped");
    // ...then read: what was buffered, then the status, then the end.
    let mut updates = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.message()).await {
            Ok(Ok(Some(_))) => updates += 1,
            Ok(Ok(None)) => panic!("stream ended without a status after {updates} updates"),
            Ok(Err(s)) => break s,
            Err(_) => panic!("no status after {updates} updates"),
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("unread"), "{status:?}");
    assert!(updates >= 2, "the buffered updates come first ({updates})");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_mirror_streams_watches_as_server_sent_events() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, _) = clients(&a).await;
    send(&mut ing, "c", 1, more(1, 21, 4)).await;
    let (from, to) = (T0, T0 + 30 * MIN);

    // A raw HTTP/1.1 client: the events exactly as a browser's EventSource reads them.
    let mut s = tokio::net::TcpStream::connect(a.http_addr()).await.unwrap();
    let req = format!(
        "GET /v1/ads/top/watch?n=5&from_ms={from}&to_ms={to}&interval_ms=100 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN}\r\naccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = vec![0u8; 8192];
    let mut read_until = async |seen: &mut String, what: &str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !seen.contains(what) {
            let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {what:?} in {seen}"))
                .unwrap();
            assert!(n > 0, "closed before {what:?}: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    read_until(&mut seen, "\"clicks\":4").await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{seen}"
    );
    assert!(seen.contains("event: update\ndata: "), "{seen}");
    // Several intervals without a change: nothing may be sent for them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&mut ing, "c", 2, more(2, 21, 3)).await;
    read_until(&mut seen, "\"clicks\":7").await;
    assert_eq!(
        seen.matches("event: update").count(),
        2,
        "one update per change: {seen}"
    );

    // Refused before the stream: a plain 400 problem naming the parameter.
    let http = Http::new(&a);
    let (status, _, body) = http
        .get(
            &format!(
                "/v1/ads/21/clicks/watch?from_ms={from}&to_ms={to}&interval_ms=10&country=USA"
            ),
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let names: Vec<&str> = body["invalid_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["interval_ms"], "{body}");
    let (status, _, body) = http
        .get(
            &format!("/v1/ads/21/clicks/watch?from_ms={from}&to_ms={to}&country=USA"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["invalid_params"][0]["name"], "country", "{body}");
    let (status, _, _) = http.get("/v1/ads/top/watch?last_minutes=5", None).await;
    assert_eq!(status, 401);
    a.shutdown().await;
}
