//! The real `adclick collector` process with `forward.sink = "jetstream"`, publishing to a
//! 3-node R3 nats-server cluster, SIGKILLed in the middle of a load and restarted on the
//! same config, data dir and port: every click of a request that got a 202 is in the
//! stream (in its partition's subject), exactly once when its request was sent once, and
//! no message id is stored twice (a republish of records published before the kill is
//! deduplicated by `Nats-Msg-Id`). A request retried across the kill may have been made
//! durable by the dead process and again by the new one (its dedup memory died with it):
//! such clicks may be in two records, which the aggregator's exact impression-id dedup
//! removes; the test allows that only for retried requests, at most once per attempt. The
//! aggregator side of the JetStream path is not built yet, so the stream itself is the
//! ledger's counterpart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_proto::partition::partition;
use adclick_proto::v1::IngestBatch;
use adclick_sdk::MintedToken;
use adclick_test_support::http_load::post_clicks;
use adclick_test_support::nats::{NatsCluster, read_stream};
use prost::Message;

use crate::support::*;

const CLIENTS: usize = 4;
const BATCHES: usize = 30;
const PER_BATCH: usize = 5;
const PARTITIONS: u32 = 4;

/// Posts its batches one after another, each until it gets a 202 or 30 s pass; returns
/// for each batch whether it was acked and how many attempts it took.
async fn run_client(
    url: String,
    tokens: Vec<MintedToken>,
    acked: Arc<Mutex<usize>>,
) -> Vec<(bool, usize)> {
    let http = http_client();
    let mut out = Vec::new();
    for chunk in tokens.chunks(PER_BATCH) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempts = 0;
        let ok = loop {
            attempts += 1;
            let r = post_clicks(&http, &url, chunk, Duration::from_secs(3)).await;
            if r == Ok(202) {
                *acked.lock().unwrap() += 1;
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        out.push((ok, attempts));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_jetstream_collector_publishes_every_acked_click_once() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(120), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(&dir.path().join("nats"), 3).await;
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 23);
    write_keys(&keys_file, &ring);
    let listen = free_addr();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        jetstream_collector_toml(
            "edge-js",
            listen,
            &dir.path().join("collector"),
            &keys_file,
            &cluster.urls(),
            PARTITIONS,
        ),
    )
    .unwrap();
    let log = dir.path().join("collector.log");
    let base = format!("http://{listen}");
    let mut child = ChildServer::spawn("collector", &config, &log);
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "collector did not get healthy; log:\n{}",
        child.log_text()
    );

    let signer = signer(&ring);
    let total = CLIENTS * BATCHES;
    let tokens: Vec<MintedToken> = (0..total * PER_BATCH)
        .map(|i| signer.mint(&placement(i as u64 % 40, 7, 1)).unwrap())
        .collect();
    let acked = Arc::new(Mutex::new(0usize));
    let url = format!("{base}/v1/clicks");
    let load: Vec<_> = tokens
        .chunks(BATCHES * PER_BATCH)
        .map(|t| tokio::spawn(run_client(url.clone(), t.to_vec(), acked.clone())))
        .collect();

    assert!(
        eventually(Duration::from_secs(30), || *acked.lock().unwrap()
            >= total / 3)
        .await,
        "load did not start; log:\n{}",
        child.log_text()
    );
    child.assert_running();
    child.kill();
    let acked_at_kill = *acked.lock().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let child = ChildServer::spawn("collector", &config, &log);
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "restart failed; log:\n{}",
        child.log_text()
    );
    let mut outcomes = Vec::new();
    for t in load {
        outcomes.extend(t.await.unwrap());
    }
    assert!(
        acked_at_kill > 0 && acked_at_kill < total,
        "the kill must land mid-stream: {acked_at_kill} of {total} acked before it"
    );
    // Impression id -> attempts of its request.
    let attempts: BTreeMap<Vec<u8>, usize> = tokens
        .chunks(PER_BATCH)
        .zip(&outcomes)
        .flat_map(|(c, (_, n))| c.iter().map(|m| (m.impression.impression_id.to_vec(), *n)))
        .collect();
    let acked_ids: BTreeSet<Vec<u8>> = tokens
        .chunks(PER_BATCH)
        .zip(&outcomes)
        .filter(|(_, (ok, _))| *ok)
        .flat_map(|(c, _)| c.iter().map(|m| m.impression.impression_id.to_vec()))
        .collect();
    let all_ids: BTreeSet<Vec<u8>> = tokens
        .iter()
        .map(|m| m.impression.impression_id.to_vec())
        .collect();
    assert_eq!(outcomes.len(), total);
    assert!(
        outcomes.iter().all(|(ok, _)| *ok),
        "every batch acked after the restart"
    );
    assert!(
        outcomes.iter().any(|(_, n)| *n > 1),
        "the clients must have seen the collector die"
    );

    // Every acked click must appear; then give stragglers time to (wrongly) appear twice.
    let client = cluster.client().await;
    let count = |stored: &[adclick_test_support::nats::Stored]| {
        let mut seen: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
        for m in stored {
            let b = IngestBatch::decode(m.payload.as_slice()).unwrap();
            for c in b.clicks {
                *seen.entry(c.impression_id).or_insert(0) += 1;
            }
        }
        seen
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = count(&read_stream(&client, "CLICKS").await);
        if acked_ids.iter().all(|id| seen.contains_key(id)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = read_stream(&client, "CLICKS").await;
    let seen = count(&stored);
    let missing = acked_ids
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .count();
    assert_eq!(missing, 0, "acked clicks missing from the stream");
    assert!(
        seen.keys().all(|id| all_ids.contains(id)),
        "a click nobody posted"
    );
    for (id, n) in &seen {
        let sent = attempts[id];
        assert!(
            *n == 1 || *n <= sent,
            "a click stored {n} times, its request sent {sent} times"
        );
    }
    let once: usize = seen
        .iter()
        .filter(|(id, _)| attempts[*id] == 1)
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(
        once,
        attempts.values().filter(|n| **n == 1).count(),
        "every click of a request sent once is stored exactly once"
    );
    let mut ids = BTreeSet::new();
    for m in &stored {
        let b = IngestBatch::decode(m.payload.as_slice()).unwrap();
        let p: u32 = m.subject.trim_start_matches("clicks.").parse().unwrap();
        assert!(b.clicks.iter().all(|c| partition(c.ad_id, PARTITIONS) == p));
        let id = m.msg_id.clone().unwrap();
        assert_eq!(id, format!("{}:{}:{p}", b.collector_id, b.seq));
        assert!(ids.insert(id), "message id stored twice");
    }
    drop(child);
}
