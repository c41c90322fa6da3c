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
    a.shutdown().await;
}
