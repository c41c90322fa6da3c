//! The real `adclick collector` process SIGKILLed in the middle of a load and restarted on
//! the same config, data dir and port: every click of a batch that got a 202 is counted
//! exactly once; a batch that got no answer is counted at most once. The collector
//! forwards pipelined (`forward.max_in_flight` records in flight, acked in any order). A
//! second scenario kills it while records are acked out of order for certain: with two
//! aggregator shards, one down, records owned only by the live shard complete while
//! earlier records wait for the dead one; nothing is lost or counted twice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_proto::v1::{self, ClickBatch, ClickBatchResult, Granularity};
use adclick_sdk::MintedToken;
use prost::Message;

use crate::support::*;

/// Records in flight in these scenarios (the default is 8).
const MAX_IN_FLIGHT: usize = 16;
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
    // `[forward]` is the last table of the file.
    std::fs::write(
        &config,
        collector_toml(
            "edge-kill",
            listen,
            &dir.path().join("collector"),
            &keys_file,
            grpc,
        ) + &format!("max_in_flight = {MAX_IN_FLIGHT}\n"),
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
                    fill_empty: None,
                    ad_id: *ad,
                    from_ms: range.0,
                    to_ms: range.1,
                    granularity: Granularity::Day as i32,
                    filter: None,
                    ..Default::default()
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

// ---------------------------------------------------------------------------------------
// Records acked out of order across two shards

/// Records in the two-shard scenario before the kill; odd ones have clicks for both
/// shards, even ones only for the live shard.
const OOO_RECORDS: u64 = 10;
const OOO_PER_SHARD: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_collector_with_records_acked_out_of_order_loses_and_doubles_nothing() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(90), two_shard_scenario()).await;
}

async fn two_shard_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 23);
    write_keys(&keys_file, &ring);
    // Shard A runs; shard B's address is reserved and it starts only after the kill.
    let a = adclick_aggregator::start(aggregator_config(
        &dir.path().join("agg-a"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let b_addr = free_addr();
    let endpoints = vec![
        format!("http://{}", a.grpc_addr()),
        format!("http://{b_addr}"),
    ];
    let router = adclick_collector::routing::Router::new(&endpoints);
    let ads_of = |shard: usize| -> Vec<u64> {
        (5_000..6_000u64)
            .filter(|ad| router.shard(*ad, 0) == shard)
            .take(40)
            .collect()
    };
    let (ads_a, ads_b) = (ads_of(0), ads_of(1));

    let listen = free_addr();
    let config = dir.path().join("collector.toml");
    let toml = collector_toml(
        "edge-ooo",
        listen,
        &dir.path().join("collector"),
        &keys_file,
        a.grpc_addr(),
    )
    .replace(
        &format!("aggregators = [\"{}\"]", endpoints[0]),
        &format!("aggregators = [\"{}\", \"{}\"]", endpoints[0], endpoints[1]),
    ) + &format!("max_in_flight = {MAX_IN_FLIGHT}\n");
    assert!(toml.contains(&endpoints[1]), "{toml}");
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("collector.log");
    let base = format!("http://{listen}");
    let mut child = ChildServer::spawn("collector", &config, &log);
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "collector did not get healthy; log:\n{}",
        child.log_text()
    );

    // One request at a time, so one spool record each. The ledger: clicks per ad, all
    // acked (202) by the collector.
    let mut p = Poster {
        url: format!("{base}/v1/clicks"),
        http: http_client(),
        signer: signer(&ring),
        ads: [ads_a.clone(), ads_b.clone()],
        next: [0; 2],
        ledger: BTreeMap::new(),
    };
    for r in 1..=OOO_RECORDS {
        if r % 2 == 1 {
            p.post(&[0, 1]).await;
        } else {
            p.post(&[0]).await;
        }
    }
    // Shard A has counted every click it owns, so it acked every record (the odd ones
    // only their A half); record 1 waits for B, so none is complete, and the even records
    // completed out of order above it.
    let on = |ads: &[u64], l: &BTreeMap<u64, u64>| -> BTreeMap<u64, u64> {
        l.iter()
            .filter(|(ad, _)| ads.contains(ad))
            .map(|(a, c)| (*a, *c))
            .collect()
    };
    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let want_a = on(&ads_a, &p.ledger);
    let got = poll_counts(a.grpc_addr(), range, Duration::from_secs(20), |c| {
        *c == want_a
    })
    .await;
    assert_eq!(
        got,
        want_a,
        "shard A before the kill; log:\n{}",
        child.log_text()
    );
    let redeliveries_before = a.metrics().redeliveries.get();
    child.assert_running();
    child.kill();

    // B comes up, the collector restarts from its spool: it resends every record (none
    // was truncated), A takes them for redeliveries, B counts its halves once.
    let b = adclick_aggregator::start(aggregator_config(&dir.path().join("agg-b"), b_addr))
        .await
        .unwrap();
    let child = ChildServer::spawn("collector", &config, &log);
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "restart failed; log:\n{}",
        child.log_text()
    );
    // Two more records after the restart, one per kind.
    p.post(&[0, 1]).await;
    p.post(&[0]).await;
    let (want_a, want_b) = (on(&ads_a, &p.ledger), on(&ads_b, &p.ledger));
    let got_b = poll_counts(b_addr, range, Duration::from_secs(20), |c| *c == want_b).await;
    let got_a = poll_counts(a.grpc_addr(), range, Duration::from_secs(20), |c| {
        *c == want_a
    })
    .await;
    assert_eq!(got_a, want_a, "shard A; log:\n{}", child.log_text());
    assert_eq!(got_b, want_b, "shard B; log:\n{}", child.log_text());
    // The records A acked before the kill came again (the spool kept them) and were not
    // counted again.
    let resent = a.metrics().redeliveries.get() - redeliveries_before;
    assert!(
        resent >= OOO_RECORDS,
        "A got {resent} redeliveries after the restart"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        top_ads(a.grpc_addr(), ADMIN, 1000, range, None)
            .await
            .unwrap(),
        ranked(&want_a, 1000)
    );
    assert_eq!(
        top_ads(b_addr, ADMIN, 1000, range, None).await.unwrap(),
        ranked(&want_b, 1000)
    );
    let total: u64 = p.ledger.values().sum();
    assert_eq!(
        total,
        (OOO_RECORDS + 2) * OOO_PER_SHARD as u64 + (OOO_RECORDS / 2 + 1) * OOO_PER_SHARD as u64
    );
    drop(child);
    a.shutdown().await;
    b.shutdown().await;
}

/// Posts records of the two-shard scenario and keeps their ledger.
struct Poster {
    url: String,
    http: reqwest::Client,
    signer: adclick_sdk::ImpressionSigner,
    /// Ads of shard 0 and shard 1.
    ads: [Vec<u64>; 2],
    next: [usize; 2],
    /// Clicks per ad, every one acked (202) by the collector.
    ledger: BTreeMap<u64, u64>,
}

impl Poster {
    /// One request (one spool record) with `OOO_PER_SHARD` clicks for each of `shards`.
    async fn post(&mut self, shards: &[usize]) {
        let mut clicks = Vec::new();
        for &shard in shards {
            for _ in 0..OOO_PER_SHARD {
                let ads = &self.ads[shard];
                let ad = ads[self.next[shard] % ads.len()];
                self.next[shard] += 1;
                let t = self.signer.mint(&placement(ad, ADVERTISER, 1)).unwrap();
                *self.ledger.entry(ad).or_default() += 1;
                clicks.push(v1::Click {
                    token: t.token,
                    occurred_at_ms: now_ms(),
                    sent_at_ms: now_ms(),
                    country: "US".into(),
                    ..Default::default()
                });
            }
        }
        let body = ClickBatch {
            sent_at_ms: now_ms(),
            clicks,
            ..Default::default()
        };
        let r = self
            .http
            .post(&self.url)
            .header("content-type", "application/x-protobuf")
            .body(body.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let res = ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
        assert_eq!(
            res.accepted as usize,
            shards.len() * OOO_PER_SHARD,
            "{res:?}"
        );
    }
}
