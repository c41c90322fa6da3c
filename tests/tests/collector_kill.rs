//! The real `adclick collector` process SIGKILLed in the middle of a load and restarted on
//! the same config, data dir and port: every click of a batch that got a 202 is counted
//! exactly once; a batch that got no answer is counted at most once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_proto::v1::{self, ClickBatch, ClickBatchResult, Granularity};
use adclick_sdk::MintedToken;
use prost::Message;

use crate::support::*;

const CLIENTS: usize = 4;
const BATCHES: usize = 40;
const PER_BATCH: usize = 10;
const ADVERTISER: u64 = 42;

fn ad_of(batch: usize) -> u64 {
    1_000 + batch as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    /// 202: the collector promised the clicks are durable.
    Acked,
    /// No 202 and the client gave up on the batch.
    Unanswered,
}

struct Shared {
    outcomes: Mutex<Vec<Outcome>>,
    acked: AtomicUsize,
    failed_attempts: AtomicUsize,
}

/// Posts its batches one after another; `retry`: until each gets a 202 (like the SDK),
/// else one attempt per batch. Every batch is its own ad.
async fn run_client(
    url: String,
    client: usize,
    retry: bool,
    tokens: Arc<Vec<MintedToken>>,
    shared: Arc<Shared>,
) {
    let http = http_client();
    for b in 0..BATCHES {
        let batch = client * BATCHES + b;
        let occurred = now_ms();
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            let sent = now_ms();
            let body = ClickBatch {
                sdk_name: "e2e-loadgen".into(),
                sdk_version: "0".into(),
                sent_at_ms: sent,
                clicks: (0..PER_BATCH)
                    .map(|j| v1::Click {
                        token: tokens[batch * PER_BATCH + j].token.clone(),
                        occurred_at_ms: occurred,
                        sent_at_ms: sent,
                        country: "US".into(),
                        user_id: format!("u{j}"),
                        ..Default::default()
                    })
                    .collect(),
            };
            let r = http
                .post(&url)
                .header("content-type", "application/x-protobuf")
                .timeout(Duration::from_secs(3))
                .body(body.encode_to_vec())
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 202 => {
                    let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
                    // A retry of a batch the dead process had made durable may be
                    // answered as duplicates; nothing is ever rejected.
                    assert_eq!(
                        (res.accepted + res.duplicate) as usize,
                        PER_BATCH,
                        "{res:?}"
                    );
                    assert!(res.rejected.is_empty(), "{res:?}");
                    shared.acked.fetch_add(1, Ordering::SeqCst);
                    break Outcome::Acked;
                }
                Ok(r) => {
                    let code = r.status().as_u16();
                    assert!(code >= 500, "batch {batch}: unexpected {code}");
                }
                Err(_) => {}
            }
            shared.failed_attempts.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !retry || Instant::now() > deadline {
                break Outcome::Unanswered;
            }
        };
        shared.outcomes.lock().unwrap()[batch] = outcome;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_collector_loses_no_acked_click_and_counts_none_twice() {
    // Build (or find) the binary before the clock starts.
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(90), scenario()).await;
}

async fn scenario() {
    let bin = adclick_bin();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 21);
    write_keys(&keys_file, &ring);
    let agg = adclick_aggregator::start(aggregator_config(
        &dir.path().join("aggregator"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let grpc = agg.grpc_addr();

    let listen = free_addr();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        collector_toml(
            "edge-kill",
            listen,
            &dir.path().join("collector"),
            &keys_file,
            grpc,
        ),
    )
    .unwrap();
    let log = dir.path().join("collector.log");
    let base = format!("http://{listen}");
    let mut child = ChildServer::spawn("collector", &config, &log);
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "{} did not get healthy; log:\n{}",
        bin.display(),
        child.log_text()
    );

    let signer = signer(&ring);
    let tokens: Arc<Vec<MintedToken>> = Arc::new(
        (0..CLIENTS * BATCHES * PER_BATCH)
            .map(|i| {
                signer
                    .mint(&placement(ad_of(i / PER_BATCH), ADVERTISER, 1))
                    .unwrap()
            })
            .collect(),
    );
    let shared = Arc::new(Shared {
        outcomes: Mutex::new(vec![Outcome::Pending; CLIENTS * BATCHES]),
        acked: AtomicUsize::new(0),
        failed_attempts: AtomicUsize::new(0),
    });
    let url = format!("{base}/v1/clicks");
    let load: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(run_client(
                url.clone(),
                c,
                c.is_multiple_of(2),
                tokens.clone(),
                shared.clone(),
            ))
        })
        .collect();

    // Kill once about a quarter of the batches are acked.
    let total = CLIENTS * BATCHES;
    assert!(
        eventually(Duration::from_secs(30), || shared
            .acked
            .load(Ordering::SeqCst)
            >= total / 4)
        .await,
        "load did not start; log:\n{}",
        child.log_text()
    );
    child.assert_running();
    child.kill();
    let acked_at_kill = shared.acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let child = ChildServer::spawn("collector", &config, &log);
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "restart failed; log:\n{}",
        child.log_text()
    );
    for t in load {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("load clients finish")
            .unwrap();
    }
    let outcomes = shared.outcomes.lock().unwrap().clone();
    let acked: Vec<usize> = (0..total)
        .filter(|b| outcomes[*b] == Outcome::Acked)
        .collect();
    let unanswered: Vec<usize> = (0..total)
        .filter(|b| outcomes[*b] == Outcome::Unanswered)
        .collect();
    assert_eq!(acked.len() + unanswered.len(), total);
    assert!(
        acked_at_kill > 0 && acked.len() > acked_at_kill,
        "the kill must land mid-stream: {acked_at_kill} acked before it, {} in all",
        acked.len()
    );
    assert!(
        shared.failed_attempts.load(Ordering::SeqCst) > 0,
        "the clients must have seen the collector die"
    );
    // Retrying clients end with every batch acked.
    for (b, outcome) in outcomes.iter().enumerate() {
        if (b / BATCHES).is_multiple_of(2) {
            assert_eq!(*outcome, Outcome::Acked, "batch {b} of a retrying client");
        }
    }

    // Acked batches must all show up; then give stragglers time to (wrongly) appear.
    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let want = |counts: &BTreeMap<u64, u64>| {
        acked
            .iter()
            .all(|b| counts.get(&ad_of(*b)) == Some(&(PER_BATCH as u64)))
    };
    let counts = poll_counts(grpc, range, Duration::from_secs(20), want).await;
    assert!(
        want(&counts),
        "acked batches missing: {:?}",
        acked
            .iter()
            .filter(|b| counts.get(&ad_of(**b)) != Some(&(PER_BATCH as u64)))
            .collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts: BTreeMap<u64, u64> = top_ads(grpc, ADMIN, 1000, range, None)
        .await
        .unwrap()
        .into_iter()
        .collect();
    // acked ⊆ counted ⊆ acked ∪ unanswered, each batch at most PER_BATCH.
    for b in &acked {
        assert_eq!(
            counts.get(&ad_of(*b)),
            Some(&(PER_BATCH as u64)),
            "acked {b}"
        );
    }
    let mut partial = 0;
    for b in &unanswered {
        let c = counts.get(&ad_of(*b)).copied().unwrap_or(0);
        assert!(
            c <= PER_BATCH as u64,
            "unanswered batch {b} counted {c} times"
        );
        partial += c;
    }
    let known: Vec<u64> = (0..total).map(ad_of).collect();
    assert!(
        counts.keys().all(|a| known.contains(a)),
        "{:?}",
        counts.keys()
    );
    let counted: u64 = counts.values().sum();
    assert_eq!(counted, (acked.len() * PER_BATCH) as u64 + partial);
    // Each impression at most once: the batch's clicks carry distinct users u0..u9, so a
    // click counted twice in place of another would show fewer users than clicks (the
    // unique-user sketch is exact at this size).
    let mut q = query_client(grpc).await.unwrap();
    for (ad, clicks) in &counts {
        let r = q
            .get_ad_clicks(authed(
                v1::GetAdClicksRequest {
                    ad_id: *ad,
                    from_ms: range.0,
                    to_ms: range.1,
                    granularity: Granularity::Day as i32,
                    filter: None,
                },
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.total_clicks, r.total_unique_users),
            (*clicks, *clicks),
            "ad {ad}"
        );
    }
    eprintln!(
        "collector_kill: {} batches acked ({acked_at_kill} before the kill), {} unanswered \
         ({partial} of their clicks counted), {} failed attempts, in {:?}",
        acked.len(),
        unanswered.len(),
        shared.failed_attempts.load(Ordering::SeqCst),
        started.elapsed()
    );
    drop(child);
    agg.shutdown().await;
}
