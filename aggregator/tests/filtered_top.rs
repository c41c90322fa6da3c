//! Filtered `TopAds` from the per-value top-N indexes (`state::topset`): every shape of
//! filter (one field, several values of a field, an owner field with a click field, two
//! or three fields, values never seen, an advertiser key's scope) against an oracle over
//! the same clicks, with a viral ad split over both shards and most clicks arriving as
//! late corrections, then again after a restart rebuilt the indexes from the checkpoint.

use adclick_aggregator::state::topset::IndexField;
use adclick_proto::v1::{Filter, IngestClick};
use adclick_test_support::aggregator::{ADMIN, T0};
use adclick_test_support::common::MIN;
use tonic::transport::Channel;

use adclick_proto::v1::query_service_client::QueryServiceClient;

use crate::util::*;

const SITES: [&str; 4] = [
    "news.example",
    "games.example",
    "shop.example",
    "app.example",
];
const VIRAL: u64 = 777;

type Pred = fn(&IngestClick) -> bool;

/// (caller key, filter, what the filter keeps) for every shape of filter.
fn cases() -> Vec<(&'static str, Filter, Pred)> {
    let f = Filter::default;
    vec![
        (
            ADMIN,
            Filter {
                country: vec!["US".into()],
                ..f()
            },
            |c| c.country == "US",
        ),
        (
            ADMIN,
            Filter {
                country: vec!["US".into(), "FR".into()],
                ..f()
            },
            |c| c.country == "US" || c.country == "FR",
        ),
        (
            ADMIN,
            Filter {
                device: vec![2],
                ..f()
            },
            |c| c.device == 2,
        ),
        (
            ADMIN,
            Filter {
                os: vec!["android".into()],
                ..f()
            },
            |c| c.os == "android",
        ),
        (
            ADMIN,
            Filter {
                site: vec!["games.example".into()],
                ..f()
            },
            |c| c.site == "games.example",
        ),
        (
            ADMIN,
            Filter {
                advertiser_id: vec![1],
                ..f()
            },
            |c| c.advertiser_id == 1,
        ),
        (
            ADMIN,
            Filter {
                campaign_id: vec![2, 3],
                ..f()
            },
            |c| c.campaign_id == 2 || c.campaign_id == 3,
        ),
        (
            ADMIN,
            Filter {
                advertiser_id: vec![2],
                country: vec!["DE".into()],
                ..f()
            },
            |c| c.advertiser_id == 2 && c.country == "DE",
        ),
        (
            ADMIN,
            Filter {
                advertiser_id: vec![2],
                campaign_id: vec![2],
                ..f()
            },
            |c| c.advertiser_id == 2 && c.campaign_id == 2,
        ),
        // The owner field is the smaller one here: it bounds, the devices count.
        (
            ADMIN,
            Filter {
                campaign_id: vec![4],
                device: vec![1, 2, 3],
                ..f()
            },
            |c| c.campaign_id == 4 && c.device != 4,
        ),
        (
            ADMIN,
            Filter {
                country: vec!["DE".into()],
                device: vec![3],
                ..f()
            },
            |c| c.country == "DE" && c.device == 3,
        ),
        (
            ADMIN,
            Filter {
                country: vec!["US".into()],
                os: vec!["ios".into(), "windows".into()],
                campaign_id: vec![4],
                ..f()
            },
            |c| c.country == "US" && (c.os == "ios" || c.os == "windows") && c.campaign_id == 4,
        ),
        // Values no click carries: nothing, not everything.
        (
            ADMIN,
            Filter {
                country: vec!["JP".into()],
                ..f()
            },
            |_| false,
        ),
        (
            ADMIN,
            Filter {
                os: vec!["beos".into()],
                device: vec![2],
                ..f()
            },
            |_| false,
        ),
        // An advertiser key sees its own ads only, filtered or not.
        (ADV1, f(), |c| c.advertiser_id == 1),
        (
            ADV1,
            Filter {
                country: vec!["FR".into()],
                ..f()
            },
            |c| c.advertiser_id == 1 && c.country == "FR",
        ),
        (
            ADV1,
            Filter {
                advertiser_id: vec![2],
                ..f()
            },
            |_| false,
        ),
        (
            ADV1,
            Filter {
                campaign_id: vec![1],
                device: vec![1, 4],
                ..f()
            },
            |c| c.advertiser_id == 1 && c.campaign_id == 1 && (c.device == 1 || c.device == 4),
        ),
    ]
}

async fn check_all(q: &mut QueryServiceClient<Channel>, all: &[IngestClick], when: &str) {
    for (i, (key, filter, keep)) in cases().into_iter().enumerate() {
        for (from, to) in [
            (T0, T0 + 30 * MIN),
            (T0 + 7 * MIN, T0 + 23 * MIN),
            (T0 + 20 * MIN, T0 + 30 * MIN),
        ] {
            for n in [1u32, 5, 50] {
                let want = top_oracle(all, n as usize, from, to, keep);
                let got = top(q, key, n, from, to, Some(filter.clone())).await;
                assert_eq!(
                    got, want,
                    "{when}: case {i} {filter:?} n={n} [{from}, {to})"
                );
            }
        }
    }
}

/// Every choice of indexed fields gives the same exact answers (only the path differs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_top_ads_match_the_oracle_with_any_indexed_fields() {
    use IndexField::*;
    for fields in [
        IndexField::ALL.to_vec(),
        IndexField::DEFAULT.to_vec(),
        vec![],
        vec![Device, Site, Campaign],
    ] {
        run(fields).await;
    }
}

async fn run(fields: Vec<IndexField>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.shards.hot_window_clicks = 1000;
    cfg.shards.top_index_fields = fields.clone();
    let a = adclick_aggregator::start(cfg.clone()).await.unwrap();
    let (mut ing, mut q) = clients(&a).await;
    // Skewed like real traffic (a few ads take most clicks, a long tail takes the rest),
    // so that the index search stops early instead of falling back to a scan.
    let mut all = clicks(11, 9000, 300, 30, 500);
    let mut r = Rng(5);
    for (i, c) in all.iter_mut().enumerate() {
        c.site = SITES[i % SITES.len()].into();
        let ad = match i % 10 {
            0..=2 => VIRAL,
            3..=6 => 1 + r.below(12),
            _ => c.ad_id,
        };
        c.ad_id = ad;
        c.advertiser_id = ad % 3;
        c.campaign_id = ad % 5;
    }
    let mut hot = false;
    for (i, chunk) in all.chunks(450).enumerate() {
        let ack = send(&mut ing, "c", i as u64 + 1, chunk.to_vec()).await;
        assert_eq!(ack.accepted as usize, chunk.len());
        hot |= ack.hot_ad_ids.contains(&VIRAL);
    }
    assert!(hot, "the viral ad is split over the shards");
    // Event times are spread over 30 minutes in every batch: after the first batch the
    // watermark is near the end, so most clicks arrive as corrections of sealed minutes.
    assert!(a.metrics().clicks_with("late") > 4000);
    check_all(&mut q, &all, &format!("{fields:?} live")).await;
    a.shutdown().await;

    let a = adclick_aggregator::start(cfg).await.unwrap();
    let (_, mut q) = clients(&a).await;
    check_all(&mut q, &all, &format!("{fields:?} after restart")).await;
    a.shutdown().await;
}
