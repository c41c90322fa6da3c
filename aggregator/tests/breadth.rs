//! Breadth of the query API (issue 14 item 3): zero-filled buckets by default
//! (`fill_empty`), and several ads in one call (`BatchGetAdClicks`), over gRPC and the HTTP
//! mirror, against an oracle over the sent clicks; advertiser isolation holds per ad.

use adclick_proto::v1::{BatchGetAdClicksRequest, GetAdClicksRequest, Granularity};
use adclick_test_support::aggregator::{ADMIN, T0};
use adclick_test_support::common::{MIN, authed};

use crate::util::*;
use crate::validation::{Http, violations};

/// Per-minute (start, clicks) of `ad` in [from, to) from the oracle, every minute listed.
fn filled(all: &[adclick_proto::v1::IngestClick], ad: u64, from: i64, to: i64) -> Vec<(i64, u64)> {
    let per_minute = oracle(all);
    (0..(to - from) / MIN)
        .map(|i| {
            let start = from + i * MIN;
            (start, per_minute.get(&(ad, start)).copied().unwrap_or(0))
        })
        .collect()
}

fn batch(
    ad_ids: Vec<u64>,
    from: i64,
    to: i64,
    fill_empty: Option<bool>,
) -> BatchGetAdClicksRequest {
    BatchGetAdClicksRequest {
        ad_ids,
        from_ms: from,
        to_ms: to,
        granularity: Granularity::Minute as i32,
        filter: None,
        fill_empty,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_are_zero_filled_and_ads_come_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    // 40 ads over 30 minutes: plenty of (ad, minute) pairs without clicks.
    let all = clicks(31, 600, 40, 30, 100);
    send(&mut ing, "c", 1, all.clone()).await;
    let (from, to) = (T0, T0 + 30 * MIN);

    // GetAdClicks: filled by default, only clicks with fill_empty = false.
    for ad in [1u64, 17, 39] {
        let want = filled(&all, ad, from, to);
        let req = |fill_empty| GetAdClicksRequest {
            ad_id: ad,
            from_ms: from,
            to_ms: to,
            granularity: Granularity::Minute as i32,
            filter: None,
            fill_empty,
            ..Default::default()
        };
        let r = q
            .get_ad_clicks(authed(req(None), ADMIN))
            .await
            .unwrap()
            .into_inner();
        let got: Vec<(i64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        assert_eq!(got, want, "ad {ad} filled");
        assert!(
            got.iter().any(|(_, c)| *c == 0),
            "ad {ad} has empty minutes to fill"
        );
        let r = q
            .get_ad_clicks(authed(req(Some(false)), ADMIN))
            .await
            .unwrap()
            .into_inner();
        let got: Vec<(i64, u64)> = r.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        let nonzero: Vec<(i64, u64)> = want.into_iter().filter(|(_, c)| *c > 0).collect();
        assert_eq!(got, nonzero, "ad {ad} sparse");
    }

    // BatchGetAdClicks: one answer per ad, in request order, each as GetAdClicks gives it.
    let ids = vec![17u64, 1, 999, 39];
    let r = q
        .batch_get_ad_clicks(authed(batch(ids.clone(), from, to, None), ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.ads.iter().map(|x| x.ad_id).collect::<Vec<_>>(), ids);
    for x in &r.ads {
        let got: Vec<(i64, u64)> = x.buckets.iter().map(|b| (b.start_ms, b.clicks)).collect();
        assert_eq!(got, filled(&all, x.ad_id, from, to), "ad {}", x.ad_id);
        let total = all.iter().filter(|c| c.ad_id == x.ad_id).count() as u64;
        assert_eq!(x.total_clicks, total, "ad {}", x.ad_id);
    }
    assert!(r.watermark_ms > 0 && r.ads.iter().all(|x| x.watermark_ms >= r.watermark_ms));

    // An advertiser key: its own ads counted, another advertiser's look like no clicks.
    // (`util::clicks` gives ad a to advertiser a % 3; ADV1 is advertiser 1.)
    let r = q
        .batch_get_ad_clicks(authed(batch(vec![1, 2, 4], from, to, Some(false)), ADV1))
        .await
        .unwrap()
        .into_inner();
    let totals: Vec<(u64, u64)> = r.ads.iter().map(|x| (x.ad_id, x.total_clicks)).collect();
    let own = |ad: u64| all.iter().filter(|c| c.ad_id == ad).count() as u64;
    assert_eq!(totals, vec![(1, own(1)), (2, 0), (4, own(4))]);
    assert!(r.ads[1].buckets.is_empty());

    // Every problem at once, each named.
    let e = q
        .batch_get_ad_clicks(authed(batch(vec![], from, to, None), ADMIN))
        .await
        .unwrap_err();
    assert_eq!(violations(&e), vec![("ad_ids".into(), "REQUIRED".into())]);
    let mut bad = batch(vec![5, 0, 5], to, from, None);
    bad.granularity = 9;
    let e = q.batch_get_ad_clicks(authed(bad, ADMIN)).await.unwrap_err();
    let v = violations(&e);
    for want in [
        ("ad_ids[1]", "REQUIRED"),
        ("ad_ids[2]", "CONFLICT"),
        ("granularity", "UNKNOWN_VALUE"),
    ] {
        assert!(
            v.contains(&(want.0.into(), want.1.into())),
            "{want:?} in {v:?}"
        );
    }
    let e = q
        .batch_get_ad_clicks(authed(batch((1..=101).collect(), from, to, None), ADMIN))
        .await
        .unwrap_err();
    assert_eq!(
        violations(&e),
        vec![("ad_ids".into(), "TOO_MANY_VALUES".into())]
    );

    // The HTTP mirror: filled by default, fill_empty=false, and a malformed value named.
    let h = Http::new(&a);
    let path = |extra: &str| format!("/v1/ads/17/clicks?from_ms={from}&to_ms={to}{extra}");
    let (code, _, body) = h.get(&path(""), Some(ADMIN)).await;
    assert_eq!(code, 200);
    let got: Vec<(i64, u64)> = body["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["start_ms"].as_i64().unwrap(),
                b["clicks"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, filled(&all, 17, from, to));
    let (code, _, body) = h.get(&path("&fill_empty=false"), Some(ADMIN)).await;
    assert_eq!(code, 200);
    assert_eq!(
        body["buckets"].as_array().unwrap().len(),
        filled(&all, 17, from, to)
            .iter()
            .filter(|(_, c)| *c > 0)
            .count()
    );
    let (code, _, body) = h.get(&path("&fill_empty=yes"), Some(ADMIN)).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["invalid_params"][0]["name"], "fill_empty", "{body}");

    // The HTTP batch: repeated ad_id, answers in order, problems named by parameter.
    let batch_path = |ids: &str| format!("/v1/ads/clicks?{ids}&from_ms={from}&to_ms={to}");
    let (code, _, body) = h
        .get(&batch_path("ad_id=17&ad_id=1&ad_id=999"), Some(ADMIN))
        .await;
    assert_eq!(code, 200, "{body}");
    let got: Vec<(u64, u64, usize)> = body["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["ad_id"].as_u64().unwrap(),
                x["total_clicks"].as_u64().unwrap(),
                x["buckets"].as_array().unwrap().len(),
            )
        })
        .collect();
    let n = |ad: u64| all.iter().filter(|c| c.ad_id == ad).count() as u64;
    assert_eq!(got, vec![(17, n(17), 30), (1, n(1), 30), (999, 0, 30)]);
    // The most a batch takes, 100 ids, fits one HTTP query string with its other parameters.
    let hundred: Vec<String> = (1..=100).map(|a| format!("ad_id={a}")).collect();
    let (code, _, body) = h
        .get(
            &format!(
                "{}&fill_empty=false&granularity=minute",
                batch_path(&hundred.join("&"))
            ),
            Some(ADMIN),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let totals: Vec<u64> = body["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["total_clicks"].as_u64().unwrap())
        .collect();
    assert_eq!(totals, (1..=100).map(n).collect::<Vec<_>>());
    for (ids, code) in [
        ("ad_id=x", "MALFORMED"),
        ("ad_id=3&ad_id=3", "CONFLICT"),
        ("n=1", "UNKNOWN_PARAMETER"),
    ] {
        let (status, _, body) = h.get(&batch_path(ids), Some(ADMIN)).await;
        assert_eq!(status, 400, "{ids}: {body}");
        let p = &body["invalid_params"][0];
        assert_eq!(p["code"], code, "{ids}: {body}");
    }
    let (status, _, body) = h
        .get(
            &format!("/v1/ads/clicks?from_ms={from}&to_ms={to}"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(
        (status, &body["invalid_params"][0]["name"]),
        (400, &serde_json::json!("ad_id")),
        "{body}"
    );
    a.shutdown().await;
}

/// The HTTP mirror takes RFC 3339 times and `15m`-style lengths beside epoch ms and
/// `last_minutes`, answers with both forms, and names a malformed or doubled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_takes_and_gives_rfc_3339_times_and_duration_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, _) = clients(&a).await;
    let all = clicks(32, 300, 10, 20, 50);
    send(&mut ing, "c", 1, all.clone()).await;
    let h = Http::new(&a);
    // T0 is 2026-01-01T00:00:00Z (adclick_test_support::aggregator::T0).
    assert_eq!(T0, 1_767_225_600_000);
    let ms = format!("from_ms={T0}&to_ms={}", T0 + 20 * MIN);
    let rfc = "from=2026-01-01T00:00:00Z&to=2026-01-01T00:20:00Z";
    let offset = "from=2026-01-01T01:00:00%2B01:00&to=2026-01-01T00:20:00.000Z";
    let mut answers = Vec::new();
    for q in [&ms, rfc, offset] {
        let (code, _, body) = h.get(&format!("/v1/ads/3/clicks?{q}"), Some(ADMIN)).await;
        assert_eq!(code, 200, "{q}: {body}");
        answers.push(body["buckets"].clone());
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
    let first = &answers[0][0];
    assert_eq!(first["start_ms"], T0);
    assert_eq!(first["start"], "2026-01-01T00:00:00.000Z");
    let total: u64 = answers[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["clicks"].as_u64().unwrap())
        .sum();
    assert_eq!(total, all.iter().filter(|c| c.ad_id == 3).count() as u64);

    // `last` and `last_minutes` are the same window.
    let (_, _, by_minutes) = h.get("/v1/ads/top?last_minutes=120", Some(ADMIN)).await;
    let (code, _, by_duration) = h.get("/v1/ads/top?last=2h", Some(ADMIN)).await;
    assert_eq!(code, 200, "{by_duration}");
    assert_eq!(by_minutes["from_ms"], by_duration["from_ms"]);
    assert_eq!(
        by_duration["from"].as_str().map(|s| s.ends_with('Z')),
        Some(true)
    );

    for (q, name, code) in [
        ("/v1/ads/top?last=90s", "last", "MALFORMED"),
        ("/v1/ads/top?last=soon", "last", "MALFORMED"),
        ("/v1/ads/top?from=yesterday&to_ms=1", "from", "MALFORMED"),
        (
            &*format!("/v1/ads/top?{rfc}&from_ms={T0}"),
            "from_ms",
            "CONFLICT",
        ),
        (
            "/v1/ads/top?last=15m&last_minutes=15",
            "last_minutes",
            "CONFLICT",
        ),
    ] {
        let (status, _, body) = h.get(q, Some(ADMIN)).await;
        assert_eq!(status, 400, "{q}: {body}");
        let params = body["invalid_params"].as_array().unwrap();
        assert!(
            params
                .iter()
                .any(|p| p["name"] == name && p["code"] == code),
            "{q}: want {name} {code} in {body}"
        );
    }
    a.shutdown().await;
}

/// `Breakdown`: one ad's clicks by country, device or os, top n values with counts, exact
/// against the oracle; filters apply; other advertisers' ads are empty; bad fields named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakdown_by_a_dimension_matches_the_oracle() {
    use adclick_proto::v1::{BreakdownRequest, Device, Dimension, Filter};
    use std::collections::HashMap;
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    let all = clicks(33, 900, 6, 30, 200);
    send(&mut ing, "c", 1, all.clone()).await;
    let (from, to) = (T0, T0 + 30 * MIN);
    let req = |ad, group_by: Dimension, n, filter: Option<Filter>| BreakdownRequest {
        ad_id: ad,
        from_ms: from,
        to_ms: to,
        granularity: Granularity::Minute as i32,
        filter,
        group_by: group_by as i32,
        n,
        ..Default::default()
    };
    let expect = |ad: u64,
                  n: usize,
                  key: &dyn Fn(&adclick_proto::v1::IngestClick) -> String,
                  keep: &dyn Fn(&adclick_proto::v1::IngestClick) -> bool| {
        let mut m: HashMap<String, u64> = HashMap::new();
        for c in all.iter().filter(|c| c.ad_id == ad && keep(c)) {
            *m.entry(key(c)).or_default() += 1;
        }
        let total: u64 = m.values().sum();
        let mut v: Vec<(String, u64)> = m.into_iter().collect();
        v.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        v.truncate(n);
        (v, total)
    };
    let device_name = |c: &adclick_proto::v1::IngestClick| {
        Device::try_from(c.device)
            .unwrap()
            .as_str_name()
            .to_string()
    };
    for ad in [1u64, 2, 5] {
        for (dim, n, key, filter, keep) in [
            (
                Dimension::Country,
                2u32,
                (&|c: &adclick_proto::v1::IngestClick| c.country.clone()) as &dyn Fn(&_) -> String,
                None,
                (&|_: &adclick_proto::v1::IngestClick| true) as &dyn Fn(&_) -> bool,
            ),
            (
                Dimension::Device,
                10,
                &device_name as &dyn Fn(&_) -> String,
                None,
                &|_: &adclick_proto::v1::IngestClick| true,
            ),
            (
                Dimension::Os,
                10,
                &|c: &adclick_proto::v1::IngestClick| c.os.clone(),
                Some(Filter {
                    country: vec!["US".into()],
                    ..Default::default()
                }),
                &|c: &adclick_proto::v1::IngestClick| c.country == "US",
            ),
        ] {
            let r = q
                .breakdown(authed(req(ad, dim, n, filter), ADMIN))
                .await
                .unwrap()
                .into_inner();
            let got: Vec<(String, u64)> = r
                .values
                .iter()
                .map(|v| (v.value.clone(), v.clicks))
                .collect();
            let (want, total) = expect(ad, n as usize, key, keep);
            assert_eq!(got, want, "ad {ad} by {dim:?}");
            assert_eq!(r.total_clicks, total, "ad {ad} by {dim:?}");
            assert!(
                r.values
                    .iter()
                    .all(|v| v.unique_users >= 1 && v.unique_users <= v.clicks)
            );
        }
    }
    // Another advertiser's ad (ad 2 belongs to advertiser 2): nothing, not an error.
    let r = q
        .breakdown(authed(req(2, Dimension::Country, 5, None), ADV1))
        .await
        .unwrap()
        .into_inner();
    assert!(r.values.is_empty() && r.total_clicks == 0);

    // The HTTP mirror: GET /v1/ads/{id}/breakdown, the same answers from the same oracle.
    let h = Http::new(&a);
    let range = format!("from_ms={from}&to_ms={to}");
    for (ad, query, n, key, keep) in [
        (
            1u64,
            "group_by=country&n=2",
            2usize,
            (&|c: &adclick_proto::v1::IngestClick| c.country.clone()) as &dyn Fn(&_) -> String,
            (&|_: &adclick_proto::v1::IngestClick| true) as &dyn Fn(&_) -> bool,
        ),
        (
            5,
            "group_by=os&country=us",
            10,
            &|c: &adclick_proto::v1::IngestClick| c.os.clone(),
            &|c: &adclick_proto::v1::IngestClick| c.country == "US",
        ),
        (
            2,
            "group_by=device",
            10,
            &device_name as &dyn Fn(&_) -> String,
            &|_: &adclick_proto::v1::IngestClick| true,
        ),
    ] {
        let path = format!("/v1/ads/{ad}/breakdown?{query}&{range}");
        let (code, _, body) = h.get(&path, Some(ADMIN)).await;
        assert_eq!(code, 200, "{path}: {body}");
        let got: Vec<(String, u64)> = body["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["value"].as_str().unwrap().to_string(),
                    v["clicks"].as_u64().unwrap(),
                )
            })
            .collect();
        let (want, total) = expect(ad, n, key, keep);
        assert_eq!(got, want, "{path}");
        assert_eq!(body["total_clicks"], total, "{path}");
        assert_eq!(body["ad_id"], ad);
    }
    let (code, _, body) = h
        .get(
            &format!("/v1/ads/2/breakdown?group_by=country&{range}"),
            Some(ADV1),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["total_clicks"], 0, "another advertiser's ad is empty");
    for (query, name) in [
        ("n=3", "group_by"),
        ("group_by=planet", "group_by"),
        ("group_by=os&n=0", "n"),
        ("group_by=os&n=many", "n"),
        ("group_by=os&fill_empty=true", "fill_empty"),
        ("group_by=os&group_by=site", "group_by"),
    ] {
        let path = format!("/v1/ads/1/breakdown?{query}&{range}");
        let (code, _, body) = h.get(&path, Some(ADMIN)).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert_eq!(body["invalid_params"][0]["name"], name, "{path}: {body}");
    }

    // Every problem named at once.
    let mut bad = req(1, Dimension::Unspecified, 0, None);
    bad.granularity = 7;
    let v = violations(&q.breakdown(authed(bad, ADMIN)).await.unwrap_err());
    for want in [
        ("group_by", "REQUIRED"),
        ("n", "OUT_OF_RANGE"),
        ("granularity", "UNKNOWN_VALUE"),
    ] {
        assert!(
            v.contains(&(want.0.into(), want.1.into())),
            "{want:?} in {v:?}"
        );
    }
    a.shutdown().await;
}
