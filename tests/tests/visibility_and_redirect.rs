//! Advertiser keys see only their own ads (others are simply absent), and the redirect
//! link `GET /c/{token}` answers 302 to the token's landing URL, counting the click once
//! however often the link is followed; a forged token never redirects and never counts.

use std::collections::BTreeMap;
use std::time::Duration;

use adclick_proto::v1::{Filter, Granularity};
use adclick_sdk::Dimensions;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertisers_see_only_their_ads_and_redirects_count_once() {
    within(Duration::from_secs(90), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 55);
    write_keys(&keys_file, &ring);
    let agg = adclick_aggregator::start(aggregator_config(
        &dir.path().join("aggregator"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let grpc = agg.grpc_addr();
    let col = adclick_collector::start(collector_config(dir.path(), "edge", &keys_file, grpc))
        .await
        .unwrap();
    let base = format!("http://{}", col.http_addr());
    let forger = signer(&keyring(1, 56)); // same key id, other secret
    let signer = signer(&ring);
    let advertiser = |ad: u64| if ad <= 3 { ADV_A } else { ADV_B };

    // SDK clicks: ads 1-3 belong to advertiser A, 4-5 to B.
    let tracker = adclick_sdk::Tracker::builder(&base)
        .batch_size(4)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut want: BTreeMap<u64, u64> = BTreeMap::new();
    for (ad, n) in [(1u64, 3u64), (2, 2), (3, 1), (4, 4), (5, 2)] {
        for _ in 0..n {
            let t = signer.mint(&placement(ad, advertiser(ad), 1)).unwrap();
            tracker
                .click(&t.token, Dimensions::new().country("US"))
                .unwrap();
        }
        want.insert(ad, n);
    }
    tracker.flush().await.unwrap();

    // The redirect link, followed twice: two 302s, one click.
    let http = http_client();
    let landing = placement(2, ADV_A, 1).landing_url;
    let link = signer.mint(&placement(2, ADV_A, 1)).unwrap();
    for _ in 0..2 {
        let r = http
            .get(format!("{base}/c/{}", link.token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], landing.as_str());
    }
    *want.get_mut(&2).unwrap() += 1;
    // A forged link: 403, no Location, not counted.
    let forged = forger.mint(&placement(3, ADV_A, 1)).unwrap();
    let r = http
        .get(format!("{base}/c/{}", forged.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("location").is_none());

    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let counts = poll_counts(grpc, range, Duration::from_secs(20), |c| *c == want).await;
    assert_eq!(counts, want);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = col.metrics();
    assert_eq!(
        (
            m.clicks_with("accepted"),
            m.clicks_with("duplicate"),
            m.clicks_with("bad_signature")
        ),
        (13, 1, 1)
    );
    assert_eq!(agg.metrics().clicks_with("applied"), 13);

    // Admin sees everything; each advertiser only its own ads.
    let own = |adv: u64| -> BTreeMap<u64, u64> {
        want.iter()
            .filter(|(ad, _)| advertiser(**ad) == adv)
            .map(|(a, c)| (*a, *c))
            .collect()
    };
    assert_eq!(
        top_ads(grpc, ADMIN, 10, range, None).await.unwrap(),
        ranked(&want, 10)
    );
    assert_eq!(
        top_ads(grpc, ADV_A_KEY, 10, range, None).await.unwrap(),
        ranked(&own(ADV_A), 10)
    );
    assert_eq!(
        top_ads(grpc, ADV_B_KEY, 10, range, None).await.unwrap(),
        ranked(&own(ADV_B), 10)
    );
    // Asking for the other advertiser explicitly does not help.
    let other = Filter {
        advertiser_id: vec![ADV_B],
        ..Default::default()
    };
    assert_eq!(
        top_ads(grpc, ADV_A_KEY, 10, range, Some(other))
            .await
            .unwrap(),
        vec![]
    );
    for (key, adv) in [(ADV_A_KEY, ADV_A), (ADV_B_KEY, ADV_B), (ADMIN, 0)] {
        for ad in 1..=5u64 {
            let r = ad_clicks(grpc, key, ad, range, Granularity::Minute, None).await;
            let visible = adv == 0 || advertiser(ad) == adv;
            if visible {
                assert_eq!(r.total_clicks, want[&ad], "{key} ad {ad}");
                assert_eq!(
                    r.buckets.iter().map(|b| b.clicks).sum::<u64>(),
                    want[&ad],
                    "{key} ad {ad}"
                );
            } else {
                assert!(
                    r.buckets.is_empty() && r.total_clicks == 0 && r.total_unique_users == 0,
                    "{key} must not see ad {ad}: {r:?}"
                );
            }
        }
    }
    // No key, or an unknown one: UNAUTHENTICATED.
    let mut q = query_client(grpc).await.unwrap();
    let req = || adclick_proto::v1::TopAdsRequest {
        n: 1,
        window: Some(adclick_proto::v1::top_ads_request::Window::LastMinutes(5)),
        filter: None,
        ..Default::default()
    };
    for r in [
        tonic::Request::new(req()),
        authed(req(), "not-a-key-0000000000000"),
    ] {
        let status = q.top_ads(r).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    tracker.shutdown().await.unwrap();
    col.shutdown().await;
    agg.shutdown().await;
}
