//! The JetStream sink against real nats-server processes (`adclick_test_support::nats`,
//! installed by `scripts/setup-nats.sh` when missing; never skipped): clicks posted to the
//! collector's HTTP endpoint reach the stream exactly once, in their partition's subject,
//! under `Nats-Msg-Id = <collector_id>:<seq>:<partition>`; a republish of records already
//! in the stream (a crash after the PubAcks, before the spool was truncated) is
//! deduplicated by the servers; a stream whose partition count differs from the config
//! stops the collector's start and `adclick jetstream init` with a clear error.
//!
//! Every expected number comes from what the test posted and which posts got a 202.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use adclick_collector::Collector;
use adclick_collector::config::{CollectorConfig, SinkKind};
use adclick_collector::forward::EncodedBatch;
use adclick_proto::partition::partition;
use adclick_proto::token::Keyring;
use adclick_proto::v1::{ClickBatch, IngestBatch};
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{eventually, keyring, signer, within, write_keys};
use adclick_test_support::nats::{NatsCluster, Stored, read_stream};
use prost::Message;

use crate::util::{POLL_LIMIT, click, http, id_of};

const PARTITIONS: u32 = 4;
const LIMIT: Duration = Duration::from_secs(120);

/// A collector config on `dir` publishing to `servers` (stream CLICKS, 4 partitions,
/// `replicas`).
fn js_config(dir: &Path, servers: Vec<String>, replicas: usize) -> CollectorConfig {
    let mut c = config(dir, Vec::new());
    c.forward.sink = SinkKind::Jetstream;
    c.forward.jetstream.servers = servers;
    c.forward.jetstream.partitions = PARTITIONS;
    c.forward.jetstream.replicas = replicas;
    c.forward.jetstream.max_bytes = 64 << 20;
    c.limits.rate_limit_per_ip = 0.0;
    c
}

/// Posts `rounds` rounds of `per_round` concurrent requests of 3 clicks each over 12 ads
/// (so records hold several requests and every partition gets clicks); returns the
/// impression ids of every click whose request got a 202, with its ad.
async fn post_clicks(
    col: &Collector,
    ring: &Keyring,
    rounds: usize,
    per_round: usize,
) -> BTreeMap<Vec<u8>, u64> {
    let s = signer(ring);
    let c = http();
    let url = format!("http://{}/v1/clicks", col.http_addr());
    let mut acked = BTreeMap::new();
    for r in 0..rounds {
        let mut reqs = tokio::task::JoinSet::new();
        for q in 0..per_round {
            let minted: Vec<_> = (0..3)
                .map(|k| {
                    s.mint(&ad(((r * per_round + q) * 3 + k) as u64 % 12))
                        .unwrap()
                })
                .collect();
            let body = ClickBatch {
                clicks: minted.iter().map(|m| click(&m.token)).collect(),
                ..Default::default()
            }
            .encode_to_vec();
            let (c, url) = (c.clone(), url.clone());
            reqs.spawn(async move {
                let r = c
                    .post(url)
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                (r.status(), minted)
            });
        }
        while let Some(done) = reqs.join_next().await {
            let (status, minted) = done.unwrap();
            assert_eq!(status, 202);
            for m in minted {
                acked.insert(id_of(&m), m.impression.ad_id);
            }
        }
    }
    acked
}

/// Waits until the collector has forwarded everything it spooled.
async fn drained(col: &Collector) {
    assert!(
        eventually(POLL_LIMIT, || col.metrics().forward_lag_records.get() == 0
            && col.metrics().forwarded_batches.get() > 0)
        .await,
        "forwarding did not drain: lag {}",
        col.metrics().forward_lag_records.get()
    );
}

/// Checks every stored message: subject `clicks.<p>`, `Nats-Msg-Id` = `<cid>:<seq>:<p>`,
/// body an `IngestBatch` of `cid` whose clicks all belong to partition p. Returns how
/// often each impression id occurs.
fn check_messages(stored: &[Stored], cid: &str) -> BTreeMap<Vec<u8>, usize> {
    let mut seen = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for m in stored {
        let p: u32 = m
            .subject
            .strip_prefix("clicks.")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("subject {}", m.subject));
        let b = IngestBatch::decode(m.payload.as_slice()).unwrap();
        assert_eq!(b.collector_id, cid);
        assert_eq!(
            m.msg_id.as_deref(),
            Some(format!("{cid}:{}:{p}", b.seq).as_str()),
            "message {}",
            m.seq
        );
        assert!(
            ids.insert(m.msg_id.clone()),
            "message id twice in the stream"
        );
        assert!(b.acked_floor <= b.seq);
        for c in &b.clicks {
            assert_eq!(
                partition(c.ad_id, PARTITIONS),
                p,
                "ad {} in {}",
                c.ad_id,
                m.subject
            );
            *seen.entry(c.impression_id.clone()).or_insert(0) += 1;
        }
    }
    seen
}

/// (a) A 3-node R3 cluster: every acked click is in the stream exactly once, in the right
/// partition subject, under the right message id; the stream was created as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_clicks_reach_an_r3_stream_once_in_their_partition() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = NatsCluster::start(&dir.path().join("nats"), 3).await;
        let ring = keyring(1, 1);
        write_keys(&dir.path().join("keys.toml"), &ring);
        let col = adclick_collector::start(js_config(dir.path(), cluster.urls(), 3))
            .await
            .unwrap();
        let acked = post_clicks(&col, &ring, 4, 8).await;
        assert_eq!(acked.len(), 4 * 8 * 3);
        drained(&col).await;
        assert_eq!(col.metrics().forwarded_clicks.get(), acked.len() as u64);

        let client = cluster.client().await;
        let stored = read_stream(&client, "CLICKS").await;
        let seen = check_messages(&stored, col.collector_id());
        let expected: BTreeMap<Vec<u8>, usize> = acked.keys().map(|k| (k.clone(), 1)).collect();
        assert_eq!(seen, expected, "every acked click exactly once");
        // All four partitions got clicks from 12 ads (ads 0..12 cover every partition).
        let subjects: BTreeSet<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
        let want: BTreeSet<u32> = (0..12).map(|a| partition(a, PARTITIONS)).collect();
        assert_eq!(subjects.len(), want.len());
        assert_eq!(col.metrics().forward_duplicate_acks.get(), 0);

        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream("CLICKS").await.unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3);
        assert_eq!(info.config.subjects, ["clicks.*"]);
        assert_eq!(
            info.config
                .metadata
                .get("adclick.partitions")
                .map(String::as_str),
            Some("4")
        );
        col.shutdown().await;
    })
    .await;
}

/// Copies a stopped collector's data directory (spool, incarnation) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// (b) A crash after the PubAcks but before the spool was truncated, made certain: the
/// clicks are spooled while NATS is unreachable, the stopped collector's data directory is
/// copied, the original publishes everything, then a collector on the copy (same spool,
/// same incarnation, same collector id: exactly what a crash leaves) republishes every
/// record. The servers ack each republish as a duplicate and the stream still holds each
/// click once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_republish_after_a_crash_is_deduplicated_by_message_id() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(1, 1);
        write_keys(&dir.path().join("keys.toml"), &ring);
        let nowhere = format!("nats://{}", adclick_test_support::common::free_addr());
        let mut cfg = js_config(dir.path(), vec![nowhere], 3);
        cfg.forward.request_timeout_ms = 500;
        // 1. Spool with NATS unreachable: the start does not fail, nothing is acked.
        let col = adclick_collector::start(cfg.clone()).await.unwrap();
        let cid = col.collector_id().to_string();
        let acked = post_clicks(&col, &ring, 3, 6).await;
        assert_eq!(acked.len(), 3 * 6 * 3);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(col.metrics().forwarded_batches.get(), 0);
        col.shutdown().await;
        let copy = dir.path().join("copy");
        copy_dir(&cfg.data_dir, &copy);

        // 2. The original publishes to the cluster and truncates its spool.
        let cluster = NatsCluster::start(&dir.path().join("nats"), 3).await;
        cfg.forward.jetstream.servers = cluster.urls();
        cfg.forward.request_timeout_ms = 2_000;
        let col = adclick_collector::start(cfg.clone()).await.unwrap();
        assert_eq!(col.collector_id(), cid);
        drained(&col).await;
        let batches = col.metrics().forwarded_batches.get();
        assert_eq!(col.metrics().forward_duplicate_acks.get(), 0);
        col.shutdown().await;
        let client = cluster.client().await;
        let first = read_stream(&client, "CLICKS").await;
        assert_eq!(first.len() as u64, batches);

        // 3. The "crashed" copy republishes every record under the same ids.
        let mut again = cfg.clone();
        again.data_dir = copy;
        let col = adclick_collector::start(again).await.unwrap();
        assert_eq!(col.collector_id(), cid, "same spool incarnation, same id");
        drained(&col).await;
        assert_eq!(col.metrics().forwarded_batches.get(), batches);
        assert_eq!(
            col.metrics().forward_duplicate_acks.get(),
            batches,
            "every republished message was acked as a duplicate"
        );
        col.shutdown().await;

        let stored = read_stream(&client, "CLICKS").await;
        assert_eq!(stored.len(), first.len(), "nothing stored twice");
        let seen = check_messages(&stored, &cid);
        let expected: BTreeMap<Vec<u8>, usize> = acked.keys().map(|k| (k.clone(), 1)).collect();
        assert_eq!(seen, expected);
    })
    .await;
}

/// (c) The stream exists with 4 partitions; a collector configured for 8 refuses to
/// start, naming both values, and leaves the stream as it was; `adclick jetstream init`
/// reports the same mismatch (exit 1) and, for the matching config, finds the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_with_another_partition_count_is_an_error_not_a_reconfiguration() {
    // Built (a `cargo build` on first use) before the scenario's time limit starts: on a
    // loaded machine the build alone can take longer than the limit.
    let adclick = adclick_test_support::child::adclick_bin();
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = NatsCluster::start(&dir.path().join("nats"), 1).await;
        write_keys(&dir.path().join("keys.toml"), &keyring(1, 1));
        let cfg = js_config(dir.path(), cluster.urls(), 1);
        let col = adclick_collector::start(cfg.clone()).await.unwrap();
        col.shutdown().await;

        let mut eight = cfg.clone();
        eight.forward.jetstream.partitions = 8;
        let err = adclick_collector::start(eight)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("stream CLICKS")
                && err.contains("4 partitions")
                && err.contains("partitions = 8"),
            "{err}"
        );
        let js = async_nats::jetstream::new(cluster.client().await);
        let mut s = js.get_stream("CLICKS").await.unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(
            info.config
                .metadata
                .get("adclick.partitions")
                .map(String::as_str),
            Some("4"),
            "the stream was not reconfigured"
        );

        // The CLI: the matching config finds the stream, the other one fails.
        let toml = |partitions: u32| {
            format!(
                "keys_file = {:?}\n[forward]\nsink = \"jetstream\"\n[forward.jetstream]\n\
                 servers = {:?}\npartitions = {partitions}\nreplicas = 1\n",
                dir.path().join("keys.toml").display().to_string(),
                cluster.urls()
            )
        };
        let paths: Vec<_> = [4u32, 8]
            .iter()
            .map(|p| {
                let path = dir.path().join(format!("collector-{p}.toml"));
                std::fs::write(&path, toml(*p)).unwrap();
                path
            })
            .collect();
        let ok = tokio::task::spawn_blocking(move || {
            let run = |path: &Path| {
                std::process::Command::new(&adclick)
                    .args(["jetstream", "init", "--config"])
                    .arg(path)
                    .output()
                    .unwrap()
            };
            (run(&paths[0]), run(&paths[1]))
        })
        .await
        .unwrap();
        let (found, mismatch) = ok;
        let out = String::from_utf8_lossy(&found.stdout);
        assert!(found.status.success(), "{found:?}");
        assert!(out.contains("found stream CLICKS"), "{out}");
        assert!(out.contains("4 partitions"), "{out}");
        let err = String::from_utf8_lossy(&mismatch.stderr);
        assert_eq!(mismatch.status.code(), Some(1), "{mismatch:?}");
        assert!(
            err.contains("4 partitions") && err.contains("partitions = 8"),
            "{err}"
        );
    })
    .await;
}

/// `adclick jetstream init` on a fresh server creates the stream and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_init_creates_the_stream() {
    // Built (a `cargo build` on first use) before the scenario's time limit starts: on a
    // loaded machine the build alone can take longer than the limit.
    let adclick = adclick_test_support::child::adclick_bin();
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = NatsCluster::start(&dir.path().join("nats"), 1).await;
        let path = dir.path().join("collector.toml");
        std::fs::write(
            &path,
            format!(
                "[forward]\nsink = \"jetstream\"\n[forward.jetstream]\nservers = {:?}\n\
                 stream = \"TEST_CLICKS\"\nreplicas = 1\n",
                cluster.urls()
            ),
        )
        .unwrap();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(&adclick)
                .args(["jetstream", "init", "--config"])
                .arg(&path)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(
            text.contains(
                "created stream TEST_CLICKS: subjects clicks.*, 16 partitions, 1 replicas"
            ),
            "{text}"
        );
        let js = async_nats::jetstream::new(cluster.client().await);
        let mut s = js.get_stream("TEST_CLICKS").await.unwrap();
        assert_eq!(s.info().await.unwrap().config.max_bytes, 8 << 30);
    })
    .await;
}

/// Measurement, not a check (ignored): PubAck latency of the JetStream sink against a
/// 3-node R3 cluster with `sync_interval: always` on this machine, one partition batch of
/// 100 clicks (~13 KB) per message, sequential and 8 in flight. Run:
/// `cargo test -p adclick-collector --test collector -- --ignored --nocapture publish_latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn publish_latency() {
    use adclick_collector::forward::{JetStreamSink, Sink};
    use adclick_proto::v1::IngestClick;
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(&dir.path().join("nats"), 3).await;
    let cfg = js_config(dir.path(), cluster.urls(), 3).forward.jetstream;
    let sink = std::sync::Arc::new(
        JetStreamSink::new(&cfg, "latency", Duration::from_secs(5))
            .await
            .unwrap(),
    );
    sink.ready().await.unwrap();
    let batch = |seq: u64| IngestBatch {
        collector_id: "latency-0000000000000001".into(),
        seq,
        acked_floor: seq,
        clicks: (0..100u64)
            .map(|i| IngestClick {
                impression_id: (seq * 1000 + i).to_le_bytes().repeat(2),
                ad_id: 1,
                advertiser_id: 2,
                campaign_id: 3,
                token_expires_at_ms: 1_900_000_000_000,
                event_time_ms: 1_800_000_000_000,
                received_at_ms: 1_800_000_000_000,
                occurred_at_ms: 1_800_000_000_000,
                sent_at_ms: 1_800_000_000_000,
                country: "US".into(),
                os: "android".into(),
                site: "news.example".into(),
                user_id: format!("user-{i}"),
                client_ip: vec![10, 0, 0, 1],
                ..Default::default()
            })
            .collect(),
    };
    let bytes = batch(1).encode_to_vec().len();
    let pct = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        (at(0.5), at(0.99), v[v.len() - 1])
    };
    const N: u64 = 500;
    let mut seq_lat = Vec::new();
    let t0 = std::time::Instant::now();
    for s in 1..=N {
        let b = sink.prepare(1, EncodedBatch::from_batch(&batch(s)));
        let t = std::time::Instant::now();
        sink.send(1, &b).await.unwrap();
        seq_lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let seq_rate = N as f64 / t0.elapsed().as_secs_f64();
    let mut conc_lat = Vec::new();
    let t0 = std::time::Instant::now();
    for round in 0..(N / 8) {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..8u64 {
            let sink = sink.clone();
            let s = N + 1 + round * 8 + k;
            set.spawn(async move {
                let b = sink.prepare((k % 4) as usize, EncodedBatch::from_batch(&batch(s)));
                let t = std::time::Instant::now();
                sink.send((k % 4) as usize, &b).await.unwrap();
                t.elapsed().as_secs_f64() * 1e3
            });
        }
        while let Some(l) = set.join_next().await {
            conc_lat.push(l.unwrap());
        }
    }
    let conc_rate = (N / 8 * 8) as f64 / t0.elapsed().as_secs_f64();
    let (p50, p99, max) = pct(seq_lat);
    println!(
        "JetStream R3 sync_interval=always, {bytes} B messages: sequential p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms ({seq_rate:.0} msg/s)"
    );
    let (p50, p99, max) = pct(conc_lat);
    println!(
        "  8 in flight over 4 partitions: p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms ({conc_rate:.0} msg/s, {:.0} clicks/s)",
        conc_rate * 100.0
    );
}
