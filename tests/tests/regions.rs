//! Two regions and a global view, on NATS stream sourcing (ARCHITECTURE.md, "Regions"):
//! regions `eu` and `us` each run a single-node NATS (its own JetStream domain, a leaf
//! node of a hub), a collector publishing to the region's `CLICKS` stream and a regional
//! aggregator; `adclick jetstream init-global` (the real binary) creates `CLICKS_GLOBAL`
//! on the hub, sourcing both regions' streams, and a global aggregator consumes it.
//!
//! Each regional aggregator counts exactly its region's acked clicks; the global one
//! counts the union, exactly once per impression: some ads are clicked in both regions
//! (their counts add up), and some impressions clicked in `eu` are clicked again through
//! the `us` collector (a client that retried in another region): each region counts them,
//! the global view once. A second `init-global` finds the stream and changes nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use adclick_aggregator::source::{SourceConfig, SourceKind};
use adclick_collector::config::SinkKind;
use adclick_test_support::nats::{NatsCluster, NatsRegions};

use crate::support::*;

const PARTITIONS: u32 = 4;

async fn region_collector(
    dir: &Path,
    id: &str,
    keys_file: &Path,
    nats: &NatsCluster,
) -> adclick_collector::Collector {
    let mut c = collector_config(dir, id, keys_file, free_addr());
    c.forward.sink = SinkKind::Jetstream;
    c.forward.jetstream.servers = nats.urls();
    c.forward.jetstream.partitions = PARTITIONS;
    c.forward.jetstream.replicas = 1;
    c.forward.jetstream.max_bytes = 64 << 20;
    adclick_collector::start(c).await.unwrap()
}

async fn aggregator_on(
    dir: &Path,
    nats: &NatsCluster,
    stream: &str,
) -> adclick_aggregator::Aggregator {
    let mut c = aggregator_config(dir, "127.0.0.1:0".parse().unwrap());
    c.source = SourceConfig {
        kind: SourceKind::Jetstream,
        servers: nats.urls(),
        stream: stream.into(),
        partitions: Some(format!("0-{}", PARTITIONS - 1)),
        ..Default::default()
    };
    adclick_aggregator::start(c).await.unwrap()
}

fn init_global(hub: &NatsCluster) -> String {
    let out = Command::new(adclick_bin())
        .args(["jetstream", "init-global", "--replicas", "1"])
        .args(["--servers", &hub.urls().join(",")])
        .args(["--source", "eu:CLICKS", "--source", "us:CLICKS"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "init-global failed: {text}");
    text
}

fn add(into: &mut BTreeMap<u64, u64>, from: &BTreeMap<u64, u64>) {
    for (ad, n) in from {
        *into.entry(*ad).or_insert(0) += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_aggregator_sources_both_regions_exactly_once() {
    within(Duration::from_secs(150), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsRegions::start(&dir.path().join("nats"), &["eu", "us"]).await;
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 73);
    write_keys(&keys_file, &ring);
    let signer = signer(&ring);

    let (eu, us) = (nats.region(0), nats.region(1));
    // Collectors create their region's stream at start.
    let col_eu = region_collector(dir.path(), "edge-eu", &keys_file, eu).await;
    let col_us = region_collector(dir.path(), "edge-us", &keys_file, us).await;
    let agg_eu = aggregator_on(&dir.path().join("agg-eu"), eu, "CLICKS").await;
    let agg_us = aggregator_on(&dir.path().join("agg-us"), us, "CLICKS").await;
    let created = init_global(nats.hub());
    assert!(
        created.contains("created stream CLICKS_GLOBAL") && created.contains("4 partitions"),
        "{created}"
    );
    let agg_global =
        aggregator_on(&dir.path().join("agg-global"), nats.hub(), "CLICKS_GLOBAL").await;

    // Ads 1..=30 in eu, 21..=50 in us: ads 21..=30 are clicked in both.
    let (t_eu, t_us) = (quick_tracker(&col_eu), quick_tracker(&col_us));
    let eu_tokens = load_tokens(&signer, 2_000, 1, 30);
    let again: Vec<_> = eu_tokens[..8].to_vec();
    let load_eu = SdkLoad::start(t_eu.clone(), eu_tokens, Duration::from_millis(3));
    let load_us = SdkLoad::start(
        t_us.clone(),
        load_tokens(&signer, 2_000, 21, 30),
        Duration::from_millis(3),
    );
    assert!(
        eventually(Duration::from_secs(30), || load_eu.clicked() >= 300
            && load_us.clicked() >= 300)
        .await
    );
    let (l_eu, l_us) = (load_eu.stop().await, load_us.stop().await);
    // Impressions first clicked in eu, clicked again through the us collector.
    let mut again_per_ad = BTreeMap::new();
    for t in &again {
        t_us.click(&t.token, adclick_sdk::Dimensions::new())
            .unwrap();
        *again_per_ad.entry(t.impression.ad_id).or_insert(0) += 1;
    }
    for t in [&t_eu, &t_us] {
        t.flush().await.unwrap();
        let s = t.stats();
        assert_eq!(
            (s.rejected, s.gave_up, s.dropped_overflow),
            (0, 0, 0),
            "{s:?}"
        );
    }

    let mut want_us = l_us.per_ad.clone();
    add(&mut want_us, &again_per_ad);
    let mut want_global = l_eu.per_ad.clone();
    add(&mut want_global, &l_us.per_ad);
    assert!(
        l_eu.per_ad.keys().any(|a| l_us.per_ad.contains_key(a)),
        "some ads are clicked in both regions"
    );

    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let wait = Duration::from_secs(40);
    let c_eu = poll_counts(agg_eu.grpc_addr(), range, wait, |c| *c == l_eu.per_ad).await;
    let c_us = poll_counts(agg_us.grpc_addr(), range, wait, |c| *c == want_us).await;
    let c_global = poll_counts(agg_global.grpc_addr(), range, wait, |c| *c == want_global).await;
    assert_eq!(c_eu, l_eu.per_ad, "region eu counts its acked clicks");
    assert_eq!(
        c_us, want_us,
        "region us counts its acked clicks, repeats from eu included"
    );
    assert_eq!(
        c_global,
        want_global,
        "the global view counts every region's clicks once per impression; logs:\n{}",
        nats.logs()
    );
    // Nothing arrives later to change that.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = poll_counts(agg_global.grpc_addr(), range, wait, |_| true).await;
    assert_eq!(settled, want_global);

    let again = init_global(nats.hub());
    assert!(
        again.contains("found stream CLICKS_GLOBAL") && again.contains("every source"),
        "{again}"
    );
}
