//! The JetStream path end to end: SDK -> collector (`forward.sink = "jetstream"`) -> a
//! 3-node R3 nats-server cluster -> aggregators with `[source] kind = "jetstream"`.
//!
//! - `shards_split_partitions_and_count_exactly`: three aggregators read the same stream
//!   (each with its own durable consumers): one owns every partition, two split them
//!   (`shard = 0, shards = 2` and `partitions = "8-15"`). The full one counts exactly the
//!   ledger of acked clicks, each shard exactly its partitions' share, and their union is
//!   the ledger. A message republished under a new message id (what a collector's
//!   republish beyond the server's dedup window stores) changes nothing.
//! - `a_sigkilled_jetstream_aggregator_resumes_exactly`: the real `adclick aggregator`
//!   binary consuming every partition is SIGKILLed mid-stream and restarted on the same
//!   data dir: it resumes after the stream positions it committed with its state, and the
//!   counts equal the ledger, nothing counted twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use adclick_aggregator::source::{SourceConfig, SourceKind};
use adclick_collector::config::SinkKind;
use adclick_proto::partition::partition;
use adclick_proto::v1::Granularity;
use adclick_test_support::nats::{NatsCluster, read_stream};

use crate::support::*;

const PARTITIONS: u32 = 16;

fn source(urls: Vec<String>, durable: &str) -> SourceConfig {
    SourceConfig {
        kind: SourceKind::Jetstream,
        servers: urls,
        durable_prefix: durable.into(),
        ..Default::default()
    }
}

/// A collector publishing to `urls` (P = 16, R3).
async fn js_collector(
    dir: &std::path::Path,
    keys_file: &std::path::Path,
    urls: Vec<String>,
) -> adclick_collector::Collector {
    let mut c = collector_config(dir, "edge-js", keys_file, free_addr());
    c.forward.sink = SinkKind::Jetstream;
    c.forward.max_in_flight = 16;
    c.forward.jetstream.servers = urls;
    c.forward.jetstream.partitions = PARTITIONS;
    c.forward.jetstream.replicas = 3;
    c.forward.jetstream.max_bytes = 64 << 20;
    adclick_collector::start(c).await.unwrap()
}

fn tracker(col: &adclick_collector::Collector) -> adclick_sdk::Tracker {
    adclick_sdk::Tracker::builder(format!("http://{}", col.http_addr()))
        .batch_size(10)
        .flush_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

/// Stops the load, flushes the tracker and checks every click was acked by the
/// collector: the ledger is then what must be counted.
async fn acked_ledger(load: SdkLoad, tracker: &adclick_sdk::Tracker) -> LoadLedger {
    let ledger = load.stop().await;
    tracker.flush().await.unwrap();
    let s = tracker.stats();
    assert_eq!(
        (s.rejected, s.gave_up, s.dropped_overflow),
        (0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.sent, ledger.unique + ledger.duplicates);
    ledger
}

fn share(ledger: &BTreeMap<u64, u64>, keep: impl Fn(u32) -> bool) -> BTreeMap<u64, u64> {
    ledger
        .iter()
        .filter(|(ad, _)| keep(partition(**ad, PARTITIONS)))
        .map(|(a, c)| (*a, *c))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_split_partitions_and_count_exactly() {
    within(Duration::from_secs(150), split_scenario()).await;
}

async fn split_scenario() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(&dir.path().join("nats"), 3).await;
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 61);
    write_keys(&keys_file, &ring);

    let agg = |name: &str, src: SourceConfig| {
        let mut c = aggregator_config(&dir.path().join(name), "127.0.0.1:0".parse().unwrap());
        c.source = src;
        c
    };
    let mut full = source(cluster.urls(), "full");
    full.partitions = Some("0-15".into());
    let mut s0 = source(cluster.urls(), "shard0");
    s0.shard = Some(0);
    s0.shards = Some(2);
    let mut s1 = source(cluster.urls(), "shard1");
    s1.partitions = Some("8-15".into());
    // Aggregators first: they wait for the stream the collector creates.
    let a_full = adclick_aggregator::start(agg("full", full)).await.unwrap();
    let a_s0 = adclick_aggregator::start(agg("s0", s0)).await.unwrap();
    let a_s1 = adclick_aggregator::start(agg("s1", s1)).await.unwrap();

    let col = js_collector(dir.path(), &keys_file, cluster.urls()).await;
    let tracker = tracker(&col);
    let load = SdkLoad::start(
        tracker.clone(),
        load_tokens(&signer(&ring), 5_000, 1, 40),
        Duration::from_millis(3),
    );
    assert!(eventually(Duration::from_secs(30), || load.clicked() >= 1_200).await);
    let ledger = acked_ledger(load, &tracker).await;
    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let low = share(&ledger.per_ad, |p| p < 8);
    let high = share(&ledger.per_ad, |p| p >= 8);
    assert!(!low.is_empty() && !high.is_empty(), "both halves have ads");
    let wait = Duration::from_secs(30);
    let c_full = poll_counts(a_full.grpc_addr(), range, wait, |c| *c == ledger.per_ad).await;
    let c_s0 = poll_counts(a_s0.grpc_addr(), range, wait, |c| *c == low).await;
    let c_s1 = poll_counts(a_s1.grpc_addr(), range, wait, |c| *c == high).await;
    assert_eq!(c_full, ledger.per_ad, "every partition");
    assert_eq!(c_s0, low, "shard 0 of 2 = partitions 0-7");
    assert_eq!(c_s1, high, "partitions 8-15");
    let mut union = c_s0.clone();
    union.extend(c_s1.clone());
    assert_eq!(union, ledger.per_ad, "the shards' union is the ledger");

    // GetAdClicks agrees, ad by ad, on the owning shard.
    for (ad, n) in ledger.per_ad.iter().take(6) {
        let owner = if partition(*ad, PARTITIONS) < 8 {
            a_s0.grpc_addr()
        } else {
            a_s1.grpc_addr()
        };
        let r = ad_clicks(owner, ADMIN, *ad, range, Granularity::Minute, None).await;
        let total: u64 = r.buckets.iter().map(|b| b.clicks).sum();
        assert_eq!(total, *n, "GetAdClicks of ad {ad}");
    }

    // A republish beyond the dedup window: the same body, a new message id, a new stream
    // sequence. Admission by (collector, partition, seq) drops it.
    let client = cluster.client().await;
    let stored = read_stream(&client, "CLICKS").await;
    let js = async_nats::jetstream::new(client.clone());
    let mut replayed = 0;
    for m in stored.iter().take(10) {
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("replay-{}", m.seq).as_str(),
        );
        js.publish_with_headers(m.subject.clone(), h, m.payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        replayed += 1;
    }
    let last = read_stream(&client, "CLICKS").await.len();
    assert_eq!(last, stored.len() + replayed, "the replays are stored");
    // Wait until the full aggregator has read past them, then compare again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        top_ads(a_full.grpc_addr(), ADMIN, 1000, range, None)
            .await
            .unwrap(),
        ranked(&ledger.per_ad, 1000),
        "replayed messages are not counted again"
    );
    assert_eq!(
        a_full.metrics().clicks_with("applied"),
        ledger.unique,
        "applied once each"
    );
    eprintln!(
        "jetstream split: {} clicks on {} ads ({} in partitions 0-7), {} stream messages, in {:?}",
        ledger.unique,
        ledger.per_ad.len(),
        low.values().sum::<u64>(),
        stored.len(),
        started.elapsed()
    );
    tracker.shutdown().await.unwrap();
    col.shutdown().await;
    a_full.shutdown().await;
    a_s0.shutdown().await;
    a_s1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_jetstream_aggregator_resumes_exactly() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(150), kill_scenario()).await;
}

async fn kill_scenario() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(&dir.path().join("nats"), 3).await;
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 62);
    write_keys(&keys_file, &ring);
    let grpc = free_addr();
    let config = dir.path().join("aggregator.toml");
    let mut text = aggregator_toml(grpc, &dir.path().join("aggregator"));
    // `aggregator_toml` ends inside the last [[api_keys]] table: [source] after it.
    text.push_str(&format!(
        "\n[source]\nkind = \"jetstream\"\nservers = {:?}\npartitions = \"0-15\"\nmax_in_flight = 8\nfetch_batch = 16\n",
        cluster.urls()
    ));
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("aggregator.log");
    let mut child = ChildServer::spawn("aggregator", &config, &log);

    let col = js_collector(dir.path(), &keys_file, cluster.urls()).await;
    let tracker = tracker(&col);
    let load = SdkLoad::start(
        tracker.clone(),
        load_tokens(&signer(&ring), 8_000, 1, 25),
        Duration::from_millis(3),
    );
    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    // Kill once clicks are counted (and a checkpoint, every 300 ms, likely taken).
    let counted = |c: &BTreeMap<u64, u64>| c.values().sum::<u64>() >= 300;
    let before = poll_counts(grpc, range, Duration::from_secs(40), counted).await;
    assert!(
        counted(&before),
        "nothing counted before the kill; log:\n{}",
        child.log_text()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    child.assert_running();
    child.kill();
    let clicked_at_kill = load.clicked();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(load.clicked() > clicked_at_kill + 50, "load continued");
    let child = ChildServer::spawn("aggregator", &config, &log);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ledger = acked_ledger(load, &tracker).await;
    let counts = poll_counts(grpc, range, Duration::from_secs(40), |c| {
        *c == ledger.per_ad
    })
    .await;
    assert_eq!(
        counts,
        ledger.per_ad,
        "per-ad counts after the kill; log:\n{}",
        child.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        top_ads(grpc, ADMIN, 100, range, None).await.unwrap(),
        ranked(&ledger.per_ad, 100),
        "nothing arrives twice later"
    );
    eprintln!(
        "jetstream aggregator kill: {} clicks ({} counted before the kill), in {:?}",
        ledger.unique,
        before.values().sum::<u64>(),
        started.elapsed()
    );
    tracker.shutdown().await.unwrap();
    col.shutdown().await;
    drop(child);
}
