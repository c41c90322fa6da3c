//! The JetStream path end to end: SDK -> collector (`forward.sink = "jetstream"`) -> a
//! 3-node R3 nats-server cluster -> aggregators with `[source] kind = "jetstream"`.
//!
//! - `shards_split_partitions_and_count_exactly`: three aggregators read the same stream
//!   (each with its own durable consumers): one owns every partition, two split them
//!   (`shard = 0, shards = 2` and `partitions = "8-15"`). The full one counts exactly the
//!   ledger of acked clicks, each shard exactly its partitions' share, and their union is
//!   the ledger. A message republished under a new message id (what a collector's
//!   republish beyond the server's dedup window stores) changes nothing, a consumer
//!   deleted under its aggregator is re-created after the committed position, and a click of an
//!   ad published on another ad's partition is not counted.
//! - `a_sigkilled_jetstream_aggregator_resumes_exactly`: the real `adclick aggregator`
//!   binary consuming every partition is SIGKILLed mid-stream and restarted on the same
//!   data dir: it resumes after the stream positions it committed with its state, and the
//!   counts equal the ledger, nothing counted twice.
//! - A replacement shard started on an empty data dir rebuilds its partitions from the
//!   stream (first scenario, at the end).

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
    let tracker = quick_tracker(&col);
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
    // The full aggregator's consumer of partition 0 is deleted under it: it restarts after
    // its committed position (the foreign message below, on partition 0, is read by the
    // new incarnation).
    let m_full = a_full.metrics().clone();
    js.get_stream("CLICKS")
        .await
        .unwrap()
        .delete_consumer("full-0")
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(40), || m_full
            .source
            .restarts
            .get_or_create(&adclick_aggregator::source::metrics::ReasonLabel { reason: "nats" })
            .get()
            >= 1)
        .await,
        "the consumer restarts after its deletion"
    );
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
    // After them, a message on partition 0 from a foreign publisher: one click of a new
    // ad of partition 0 (counted) and one of an ad of another partition (removed: an ad is
    // counted by the shard owning its partition only).
    let ad_of = |p: u32| {
        (10_000u64..)
            .find(|a| partition(*a, PARTITIONS) == p)
            .unwrap()
    };
    let (own_ad, foreign_ad) = (ad_of(0), ad_of(9));
    let now = now_ms();
    let click = |ad: u64, k: u8| adclick_proto::v1::IngestClick {
        impression_id: vec![k; 16],
        ad_id: ad,
        advertiser_id: ADV_A,
        campaign_id: 1,
        token_expires_at_ms: now + HOUR,
        event_time_ms: now,
        received_at_ms: now,
        country: "US".into(),
        ..Default::default()
    };
    let foreign = adclick_proto::v1::IngestBatch {
        collector_id: "foreign".into(),
        seq: 1,
        clicks: vec![click(own_ad, 0xa1), click(foreign_ad, 0xa2)],
        acked_floor: 1,
    };
    js.publish("clicks.0", prost::Message::encode_to_vec(&foreign).into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut expected = ledger.per_ad.clone();
    expected.insert(own_ad, 1);
    let mut low_expected = low.clone();
    low_expected.insert(own_ad, 1);
    // Once the full aggregator has counted the last message, it has read the replays.
    let after = poll_counts(a_full.grpc_addr(), range, wait, |c| *c == expected).await;
    assert_eq!(
        after, expected,
        "replays not counted again, the foreign ad's click not counted"
    );
    assert_eq!(
        a_full.metrics().clicks_with("applied"),
        ledger.unique + 1,
        "applied once each"
    );
    let c_s0 = poll_counts(a_s0.grpc_addr(), range, wait, |c| *c == low_expected).await;
    assert_eq!(c_s0, low_expected);
    assert_eq!(a_full.metrics().source.foreign_clicks.get(), 1);
    let text = a_full.metrics().render();
    assert!(
        text.contains("adclick_aggregator_source_position{partition=\"0\"}")
            && text.contains("adclick_aggregator_source_pending{partition=\"15\"}"),
        "{text}"
    );
    // A replacement shard on an empty data dir rebuilds its partitions from the stream
    // (everything is within retention): the same counts as the shard it replaces.
    let mut rebuilt = source(cluster.urls(), "rebuilt1");
    rebuilt.partitions = Some("8-15".into());
    let a_rebuilt = adclick_aggregator::start(agg("rebuilt", rebuilt))
        .await
        .unwrap();
    let c_rebuilt = poll_counts(a_rebuilt.grpc_addr(), range, wait, |c| *c == high).await;
    assert_eq!(c_rebuilt, high, "a shard rebuilt from the stream");
    a_rebuilt.shutdown().await;
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
    let text = jetstream_shard_toml(
        grpc,
        free_addr(),
        &dir.path().join("aggregator"),
        &cluster.urls(),
        "0-15",
        "adclick-agg",
    );
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("aggregator.log");
    let mut child = ChildServer::spawn("aggregator", &config, &log);

    let col = js_collector(dir.path(), &keys_file, cluster.urls()).await;
    let tracker = quick_tracker(&col);
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

/// Apply throughput of the JetStream source: `MESSAGES` messages of `CLICKS` clicks per
/// partition are stored first (R3, `sync_interval: always`), then an aggregator owning
/// 1 and then 4 of those partitions reads them from the start; the time runs from its
/// start to the last click applied. Figures in BENCHMARKS.md:
/// `cargo test --release -p adclick-e2e --test e2e -- --ignored --nocapture stream_apply_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --release, see BENCHMARKS.md"]
async fn stream_apply_throughput() {
    use adclick_collector::config::JetStreamConfig;
    use adclick_collector::forward::jetstream::{StreamSpec, ensure_stream};
    use adclick_proto::v1::{IngestBatch, IngestClick};
    use prost::Message;
    const MESSAGES: u64 = 1_000;
    const CLICKS: u64 = 100;
    const OWNED: u32 = 4;
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(&dir.path().join("nats"), 3).await;
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let spec = StreamSpec::from_config(&JetStreamConfig {
        partitions: PARTITIONS,
        replicas: 3,
        max_bytes: 1 << 30,
        ..Default::default()
    });
    ensure_stream(&js, &spec).await.unwrap();
    let now = now_ms();
    for p in 0..OWNED {
        let ads: Vec<u64> = (1..)
            .filter(|a| partition(*a, PARTITIONS) == p)
            .take(50)
            .collect();
        let mut acks = Vec::new();
        for m in 0..MESSAGES {
            let clicks = (0..CLICKS)
                .map(|i| {
                    let n = (u64::from(p) << 40) | (m * CLICKS + i);
                    let mut id = [9u8; 16];
                    id[..8].copy_from_slice(&n.to_le_bytes());
                    IngestClick {
                        impression_id: id.to_vec(),
                        ad_id: ads[(n % 50) as usize],
                        advertiser_id: ADV_A,
                        campaign_id: 1,
                        token_expires_at_ms: now + HOUR,
                        event_time_ms: now,
                        received_at_ms: now,
                        country: "US".into(),
                        user_id: format!("u{}", n % 1000),
                        ..Default::default()
                    }
                })
                .collect();
            let body = IngestBatch {
                collector_id: "bench".into(),
                seq: m + 1,
                clicks,
                acked_floor: m + 1,
            }
            .encode_to_vec();
            acks.push(js.publish(spec.subject(p), body.into()).await.unwrap());
            if acks.len() >= 256 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    for owned in [1, OWNED] {
        let mut c = aggregator_config(
            &dir.path().join(format!("agg{owned}")),
            "127.0.0.1:0".parse().unwrap(),
        );
        let mut s = source(cluster.urls(), &format!("bench{owned}"));
        s.partitions = Some(format!("0-{}", owned - 1));
        c.source = s;
        c.checkpoint.interval_ms = 5_000;
        let total = u64::from(owned) * MESSAGES * CLICKS;
        let t = Instant::now();
        let a = adclick_aggregator::start(c).await.unwrap();
        let m = a.metrics().clone();
        assert!(
            eventually(Duration::from_secs(300), || m.clicks_with("applied")
                >= total)
            .await,
            "applied {} of {total}",
            m.clicks_with("applied")
        );
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(m.clicks_with("applied"), total);
        eprintln!(
            "{owned} partition(s): {total} clicks in {} messages applied in {secs:.2} s: \
             {:.0} clicks/s, {:.0} messages/s ({:.0} clicks/s per partition)",
            u64::from(owned) * MESSAGES,
            total as f64 / secs,
            (u64::from(owned) * MESSAGES) as f64 / secs,
            total as f64 / secs / f64::from(owned)
        );
        a.shutdown().await;
    }
}
