//! Invalid traffic through real collectors (issue 16): one client IP's clicks arrive at two
//! collectors and the aggregator's `ip_rate` rule counts them together. Clients are bound to
//! 127.0.0.5 and 127.0.0.6 (the collectors see those peers; loopback is not exempt), each
//! click a followed redirect link `GET /c/{token}`. Expected: the IP over the limit has every
//! click invalid (the earlier ones moved), the IP at the limit every click valid. The raw
//! archive, read with DuckDB by `scripts/archive-duckdb.py`, re-derives the same valid
//! counts from its `counted` and `moved` rows.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use adclick_proto::v1::{self, Granularity};

use crate::support::*;

const MAX: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ip_over_two_collectors_trips_ip_rate_together() {
    within(Duration::from_secs(120), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 77);
    write_keys(&keys_file, &ring);
    let mut cfg = aggregator_config(
        &dir.path().join("aggregator"),
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.rules.enabled = true;
    cfg.rules.ip_rate.max_per_minute = MAX;
    // A followed link is clicked at once after minting: too_fast would flag every click.
    cfg.rules.too_fast.enabled = false;
    cfg.archive.enabled = true;
    let archive_dir = dir.path().join("archive");
    cfg.archive.dir = archive_dir.clone();
    let agg = adclick_aggregator::start(cfg).await.unwrap();
    let grpc = agg.grpc_addr();
    let mut cols = Vec::new();
    for id in ["edge-a", "edge-b"] {
        cols.push(
            adclick_collector::start(collector_config(dir.path(), id, &keys_file, grpc))
                .await
                .unwrap(),
        );
    }
    let signer = signer(&ring);
    adclick_sdk::HttpTransport::install_crypto_provider();
    let from = |last: u8| {
        reqwest::Client::builder()
            .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    // The rate counts per event-time minute (the collector's receive time): start early in
    // a minute so a dozen clicks cannot straddle two.
    while now_ms().rem_euclid(MIN) > 40_000 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start = now_ms();
    // (client, ad, clicks through edge-a, clicks through edge-b): 127.0.0.5 sends 6 (over
    // the limit of 5), 127.0.0.6 sends 5 (at it).
    let plan = [(5u8, 1u64, 3, 3), (6, 2, 3, 2)];
    for (client, ad, via_a, via_b) in plan {
        let http = from(client);
        for (col, n) in [(&cols[0], via_a), (&cols[1], via_b)] {
            for _ in 0..n {
                let t = signer.mint(&placement(ad, ADV_A, 1)).unwrap();
                let r = http
                    .get(format!("http://{}/c/{}", col.http_addr(), t.token))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 302);
            }
        }
    }
    let range = (start - 2 * MIN, now_ms() + 2 * MIN);
    let all = |ad: u64, traffic: v1::Traffic| async move {
        let mut q = query_client(grpc).await.unwrap();
        q.get_ad_clicks(authed(
            v1::GetAdClicksRequest {
                ad_id: ad,
                from_ms: range.0,
                to_ms: range.1,
                granularity: Granularity::Minute as i32,
                fill_empty: Some(false),
                traffic: traffic as i32,
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
    };
    // Forwarding is asynchronous: wait until every click is counted.
    let mut counted = (0, 0);
    for _ in 0..300 {
        counted = (
            all(1, v1::Traffic::All).await.total_clicks,
            all(2, v1::Traffic::All).await.total_clicks,
        );
        if counted == (6, 5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        counted,
        (6, 5),
        "clicks counted (all traffic) for ads 1 and 2"
    );
    let one = all(1, v1::Traffic::Valid).await;
    assert_eq!(
        one.total_clicks, 0,
        "127.0.0.5: 6 clicks in a minute, all invalid"
    );
    assert_eq!(
        one.invalid_by_reason,
        vec![v1::ReasonCount {
            reason: v1::InvalidReason::IpRate as i32,
            clicks: 6
        }]
    );
    assert_eq!(all(1, v1::Traffic::Invalid).await.total_clicks, 6);
    let two = all(2, v1::Traffic::Valid).await;
    assert_eq!(
        two.total_clicks, 5,
        "127.0.0.6: 5 clicks, at the limit, all valid"
    );
    assert!(two.invalid_by_reason.is_empty());

    // The query front passes `traffic` through and merges the reasons (one shard owning
    // the one partition here).
    let mut fcfg = adclick_aggregator::front::FrontConfig {
        listen_grpc: "127.0.0.1:0".parse().unwrap(),
        listen_http: "127.0.0.1:0".parse().unwrap(),
        partitions: 1,
        shards: vec![adclick_aggregator::front::ShardEndpoint {
            name: "s0".into(),
            grpc: format!("http://{grpc}"),
            partitions: "0".into(),
        }],
        shard_timeout_ms: 3_000,
        health_interval_ms: 200,
        api_keys: api_keys(),
        ..Default::default()
    };
    fcfg.query.rate_limit_per_second = 0;
    let front = adclick_aggregator::front::start(fcfg).await.unwrap();
    let mut fq = query_client(front.grpc_addr()).await.unwrap();
    let totals = |traffic: v1::Traffic| v1::GetTotalsRequest {
        scope: v1::TotalsScope::Advertiser as i32,
        id: ADV_A,
        from_ms: range.0,
        to_ms: range.1,
        granularity: Granularity::Minute as i32,
        traffic: traffic as i32,
        ..Default::default()
    };
    for (traffic, clicks) in [
        (v1::Traffic::Valid, 5),
        (v1::Traffic::Invalid, 6),
        (v1::Traffic::All, 11),
    ] {
        let t = fq
            .get_totals(authed(totals(traffic), ADMIN))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.total_clicks, clicks, "front GetTotals {traffic:?}");
        assert_eq!(t.invalid_by_reason, one.invalid_by_reason, "front reasons");
    }
    let top = |traffic: v1::Traffic| v1::TopAdsRequest {
        n: 5,
        window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
            from_ms: range.0,
            to_ms: range.1,
        })),
        traffic: traffic as i32,
        ..Default::default()
    };
    for (traffic, want) in [
        (v1::Traffic::Valid, vec![(2u64, 5u64)]),
        (v1::Traffic::Invalid, vec![(1, 6)]),
        (v1::Traffic::All, vec![(1, 6), (2, 5)]),
    ] {
        let got: Vec<(u64, u64)> = fq
            .top_ads(authed(top(traffic), ADMIN))
            .await
            .unwrap()
            .into_inner()
            .ads
            .iter()
            .map(|a| (a.ad_id, a.clicks))
            .collect();
        assert_eq!(got, want, "front TopAds {traffic:?}");
    }
    front.shutdown().await;
    for c in cols {
        c.shutdown().await;
    }
    agg.shutdown().await;

    // The archive (flushed at shutdown): ad 1's six clicks are one `invalid_traffic` row
    // (the click that tripped) and five `counted` rows each named by a `moved` row, so the
    // valid clicks DuckDB derives are ad 2's five only.
    let out = std::process::Command::new(setup_script("setup-archive-python.sh"))
        .arg(repo_root().join("scripts/archive-duckdb.py"))
        .arg("--dir")
        .arg(&archive_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "archive-duckdb.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["rows"], 11, "{got}");
    assert_eq!(got["moved"], 5, "{got}");
    assert_eq!(got["by_status"]["moved/ip_rate"], 5, "{got}");
    assert_eq!(got["by_status"]["invalid_traffic/ip_rate"], 1, "{got}");
    assert_eq!(
        got["counted_by_ad"],
        serde_json::json!({"1": 5, "2": 5}),
        "{got}"
    );
    assert_eq!(got["valid_by_ad"], serde_json::json!({"2": 5}), "{got}");
}
