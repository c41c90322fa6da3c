//! Faults on the JetStream path, every process real: a 3-node R3 nats-server cluster, two
//! `adclick collector` processes with `forward.sink = "jetstream"` and two `adclick
//! aggregator` shards with `[source] kind = "jetstream"` (P = 4, partitions 0-1 and 2-3).
//! Four HTTP clients post signed click batches through both collectors (a failed request
//! is retried on the other collector until it is answered 202; every 10th acknowledged
//! request is posted once more to the other collector, as a client that lost the answer
//! would), and the test keeps a ledger of every click of a request answered 202. Under
//! that load, one after another on the same stack:
//!
//! (a) the stream leader's nats-server is SIGKILLed (the stream keeps taking messages on
//!     the other two) and restarted;
//! (b) a shard is SIGKILLed and restarted on the same config and data dir;
//! (c) a collector is SIGKILLed and restarted on the same config, data dir and port;
//! (d) all three nats-servers are SIGKILLed for ~10 s, while the collectors keep
//!     acknowledging into their spools, then restarted.
//!
//! After each, once the collectors have nothing left to publish and every partition's
//! owner has applied up to the partition's last stream message, the per-ad totals read
//! from the shards (`BatchGetAdClicks` on the shard owning each ad's partition, through
//! `shards::per_ad_totals`) equal the ledger: each distinct acknowledged impression exactly
//! once; and the query front (`front::start` over the two shard processes) answers the same
//! per-ad totals and the TopAds a single aggregator of the ledger's clicks would give
//! (ranked from the ledger by the test). A request retried
//! across a fault may have been made durable by two collectors (or twice by one whose
//! dedup memory died with it), and a resent one is: the aggregator's impression-id dedup
//! makes that once. At the end the stream itself is read: it holds every acknowledged
//! click, nothing no client posted, and some clicks twice (so that dedup was exercised).
//!
//! One test on one stack, the phases in sequence: four stacks would start twelve
//! nats-servers and eight `adclick` processes on a 2-core CI box, and run in parallel
//! with each other and the rest of the suite. About a minute of wall time plus the stack's
//! start and the final stream read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use adclick_proto::partition::partition;
use adclick_proto::v1::IngestBatch;
use adclick_test_support::http_load::{AckLedger, HttpLoad, LoadSpec};
use adclick_test_support::nats::{NatsCluster, read_stream};
use adclick_test_support::shards::{
    QueryTargets, last_sequence, metrics_text, per_ad_totals, sample,
};
use async_nats::jetstream::consumer::DeliverPolicy;
use prost::Message;

use adclick_aggregator::front::{FrontConfig, QueryFront, ShardEndpoint};

use crate::support::*;

const PARTITIONS: u32 = 4;
const STREAM: &str = "CLICKS";
/// The ads clicked: 1..=ADS, spread over the four partitions.
const ADS: u64 = 40;
/// Clicks each phase waits to see acknowledged before its fault, and again after it.
const STEP: u64 = 300;

/// One `adclick <role>` process, restartable on the same config.
struct Proc {
    role: &'static str,
    config: PathBuf,
    log: PathBuf,
    /// Its HTTP port (`/metrics`, and ingest for a collector).
    http: SocketAddr,
    child: Option<ChildServer>,
}

impl Proc {
    fn new(role: &'static str, dir: &Path, name: &str, toml: String, http: SocketAddr) -> Proc {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        Proc {
            role,
            config,
            log: dir.join(format!("{name}.log")),
            http,
            child: None,
        }
    }

    /// Starts it and waits until its HTTP port answers `/metrics`.
    async fn start(&mut self) {
        assert!(self.child.is_none());
        self.child = Some(ChildServer::spawn(self.role, &self.config, &self.log));
        let deadline = Instant::now() + Duration::from_secs(30);
        while metrics_text(self.http).await.is_err() {
            self.child.as_mut().unwrap().assert_running();
            assert!(
                Instant::now() < deadline,
                "{} {} did not come up; log:\n{}",
                self.role,
                self.config.display(),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        let mut c = self.child.take().expect("running");
        c.assert_running();
        c.kill();
    }

    /// ERROR lines logged by adclick code (not by libraries), escape codes removed. Under
    /// these faults there must be none: adclick logs at ERROR what a retry cannot fix
    /// (refusals, skipped messages, foreign clicks, damage).
    fn adclick_errors(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(strip_ansi)
            .filter(|l| {
                l.split_once(" ERROR ")
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with("adclick"))
            })
            .collect()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

struct Stack {
    _dir: tempfile::TempDir,
    cluster: NatsCluster,
    collectors: Vec<Proc>,
    shards: Vec<Proc>,
    /// Which shard answers for which partitions.
    targets: QueryTargets,
    /// The query front over both shards (in-process: it is not one of the faults).
    front: QueryFront,
    signer: adclick_sdk::ImpressionSigner,
    /// Everything acknowledged so far, over every phase.
    ledger: AckLedger,
    range: (i64, i64),
}

impl Stack {
    async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let cluster = NatsCluster::start(&dir.path().join("nats"), 3).await;
        let keys_file = dir.path().join("keys.toml");
        let ring = keyring(1, 77);
        write_keys(&keys_file, &ring);
        let urls = cluster.urls();
        let mut collectors: Vec<Proc> = (0..2)
            .map(|i| {
                let listen = free_addr();
                let id = format!("edge-{i}");
                let toml = jetstream_collector_toml(
                    &id,
                    listen,
                    &dir.path().join(&id),
                    &keys_file,
                    &urls,
                    PARTITIONS,
                );
                Proc::new("collector", dir.path(), &id, toml, listen)
            })
            .collect();
        let mut shards = Vec::new();
        let mut targets = Vec::new();
        let mut endpoints = Vec::new();
        for (i, owned) in ["0-1", "2-3"].iter().enumerate() {
            let (grpc, http) = (free_addr(), free_addr());
            let name = format!("shard{i}");
            let toml =
                jetstream_shard_toml(grpc, http, &dir.path().join(&name), &urls, owned, &name);
            shards.push(Proc::new("aggregator", dir.path(), &name, toml, http));
            targets.push((grpc, if i == 0 { vec![0, 1] } else { vec![2, 3] }));
            endpoints.push(ShardEndpoint {
                name,
                grpc: format!("http://{grpc}"),
                partitions: (*owned).into(),
            });
        }
        let mut front_cfg = FrontConfig {
            listen_grpc: "127.0.0.1:0".parse().unwrap(),
            listen_http: "127.0.0.1:0".parse().unwrap(),
            partitions: PARTITIONS,
            shards: endpoints,
            api_keys: api_keys(),
            ..Default::default()
        };
        front_cfg.query.rate_limit_per_second = 0;
        let front = adclick_aggregator::front::start(front_cfg).await.unwrap();
        // Collectors first: the first one creates the stream the shards wait for.
        for p in collectors.iter_mut().chain(shards.iter_mut()) {
            p.start().await;
        }
        for c in &collectors {
            assert!(
                wait_healthy(&base(c), Duration::from_secs(20)).await,
                "collector not ready; log:\n{}",
                c.log_tail()
            );
        }
        let now = now_ms();
        Stack {
            _dir: dir,
            cluster,
            collectors,
            shards,
            targets: QueryTargets {
                partitions: PARTITIONS,
                targets,
            },
            front,
            signer: signer(&ring),
            ledger: AckLedger::default(),
            range: (now - 10 * MIN, now + 20 * MIN),
        }
    }

    fn load(&self) -> HttpLoad {
        HttpLoad::start(
            self.collectors.iter().map(base).collect(),
            self.signer.clone(),
            LoadSpec {
                clients: 4,
                per_batch: 5,
                pause: Duration::from_millis(15),
                give_up: Duration::from_secs(60),
                attempt_timeout: Duration::from_secs(3),
                resend_every: 10,
                ads: (1..=ADS).collect(),
            },
        )
    }

    fn logs(&self) -> String {
        self.collectors
            .iter()
            .chain(&self.shards)
            .map(|p| format!("--- {} ---\n{}\n", p.config.display(), p.log_tail()))
            .collect()
    }

    /// Why the pipeline has not drained yet (None once it has): a collector with spool
    /// records not yet acknowledged by the stream, or a partition whose owning shard has
    /// not applied up to the partition's last stream message.
    async fn not_drained(&self) -> Option<String> {
        for c in &self.collectors {
            let text = match metrics_text(c.http).await {
                Ok(t) => t,
                Err(e) => return Some(format!("{}: {e}", c.config.display())),
            };
            match sample(&text, "adclick_collector_forward_lag_records") {
                Some(0.0) => {}
                v => return Some(format!("{} forward lag {v:?}", c.config.display())),
            }
        }
        let client = match tokio::time::timeout(
            Duration::from_secs(5),
            async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(
                    self.cluster
                        .urls()
                        .iter()
                        .map(|u| u.parse::<async_nats::ServerAddr>().unwrap())
                        .collect::<Vec<_>>(),
                ),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Some(format!("NATS: {e}")),
            Err(_) => return Some("NATS: connect timed out".into()),
        };
        for p in 0..PARTITIONS {
            let last = match last_sequence(&client, STREAM, &format!("clicks.{p}")).await {
                Ok(s) => s,
                Err(e) => return Some(format!("partition {p}: {e}")),
            };
            let shard = self
                .targets
                .targets
                .iter()
                .position(|(_, owned)| owned.contains(&p))
                .unwrap();
            let text = match metrics_text(self.shards[shard].http).await {
                Ok(t) => t,
                Err(e) => return Some(format!("shard {shard}: {e}")),
            };
            let series = format!("adclick_aggregator_source_position{{partition=\"{p}\"}}");
            let pos = sample(&text, &series).unwrap_or(0.0);
            if pos < last as f64 {
                return Some(format!(
                    "partition {p}: shard {shard} at stream seq {pos}, the stream at {last}"
                ));
            }
        }
        None
    }

    /// Waits (90 s at most) until [`Stack::not_drained`] says drained.
    async fn wait_drained(&self, phase: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match self.not_drained().await {
                None => return,
                Some(why) if Instant::now() > deadline => panic!(
                    "{phase}: not drained within 90 s: {why}\nlogs:\n{}",
                    self.logs()
                ),
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Stops the load, merges its ledger, waits for the drain and checks the shards'
    /// per-ad totals against the whole ledger.
    async fn finish(&mut self, phase: &str, load: HttpLoad, started: Instant) {
        let ledger = load.stop().await;
        assert_eq!(
            ledger.gave_up, 0,
            "{phase}: requests never acknowledged (their clicks may or may not count)"
        );
        self.ledger.merge(&ledger);
        self.wait_drained(phase).await;
        self.check(phase).await;
        eprintln!(
            "{phase}: {} clicks acked in {} requests ({} retried, {} resent to the other collector), {} in total, in {:?}",
            ledger.acked.len(),
            ledger.batches,
            ledger.retried,
            ledger.resent,
            self.ledger.acked.len(),
            started.elapsed()
        );
    }

    /// The shards' per-ad totals equal the ledger's distinct acknowledged impressions per
    /// ad; each shard's TopAds lists only ads of its own partitions.
    async fn check(&self, phase: &str) {
        let expected = self.ledger.per_ad();
        assert_eq!(
            expected
                .keys()
                .map(|a| partition(*a, PARTITIONS))
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            PARTITIONS as usize,
            "the load covers every partition"
        );
        let ads: Vec<u64> = (1..=ADS).collect();
        let got = per_ad_totals(&self.targets, &ads, self.range)
            .await
            .unwrap_or_else(|e| panic!("{phase}: {e}\nlogs:\n{}", self.logs()));
        if got != expected {
            let diff: BTreeMap<u64, (u64, u64)> = ads
                .iter()
                .map(|a| {
                    (
                        *a,
                        (
                            got.get(a).copied().unwrap_or(0),
                            expected.get(a).copied().unwrap_or(0),
                        ),
                    )
                })
                .filter(|(_, (g, e))| g != e)
                .collect();
            panic!(
                "{phase}: per-ad totals differ from the ledger (ad: (counted, acked)): {diff:?}; \
                 counted {} in total, acked {}\nlogs:\n{}",
                got.values().sum::<u64>(),
                expected.values().sum::<u64>(),
                self.logs()
            );
        }
        // The front: the same per-ad totals, and the ledger's ranking for TopAds.
        let through_front = QueryTargets::single(self.front.grpc_addr(), PARTITIONS);
        let via_front = per_ad_totals(&through_front, &ads, self.range)
            .await
            .unwrap_or_else(|e| panic!("{phase}: front: {e}"));
        assert_eq!(via_front, expected, "{phase}: the front's per-ad totals");
        let top = top_ads(self.front.grpc_addr(), ADMIN, 20, self.range, None)
            .await
            .unwrap_or_else(|e| panic!("{phase}: front TopAds: {e}"));
        assert_eq!(top, ranked(&expected, 20), "{phase}: the front's TopAds");
        for (addr, owned) in &self.targets.targets {
            let top = top_ads(*addr, ADMIN, 1000, self.range, None).await.unwrap();
            assert!(
                top.iter()
                    .all(|(ad, _)| owned.contains(&partition(*ad, PARTITIONS))),
                "{phase}: shard {addr} counts an ad of another partition: {top:?}"
            );
        }
    }

    /// The index of the node leading the stream.
    async fn stream_leader(&self) -> usize {
        let js = async_nats::jetstream::new(self.cluster.client().await);
        let mut s = js.get_stream(STREAM).await.unwrap();
        let info = s.info().await.unwrap();
        let leader = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .expect("the stream has a leader");
        leader.trim_start_matches('n').parse().unwrap()
    }
}

/// `line` without ANSI escape sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn base(p: &Proc) -> String {
    format!("http://{}", p.http)
}

/// Stream messages stored so far (any partition), through a client of the nodes still up.
async fn stream_last_seq(cluster: &NatsCluster) -> Option<u64> {
    let js = async_nats::jetstream::new(cluster.client().await);
    let mut s = js.get_stream(STREAM).await.ok()?;
    Some(s.info().await.ok()?.state.last_sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_faults_count_every_acked_click_once() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(420), scenario()).await;
}

async fn scenario() {
    let started = Instant::now();
    let mut stack = Stack::start().await;
    let wait = Duration::from_secs(30);

    // (a) The stream leader's server dies mid-load; the other two elect a new leader and
    // keep storing; the killed node comes back on its store.
    let t = Instant::now();
    let load = stack.load();
    assert!(
        load.wait_acked(0, STEP, wait).await,
        "(a) load did not start"
    );
    let leader = stack.stream_leader().await;
    stack.cluster.kill(leader);
    let before = stream_last_seq(&stack.cluster).await.unwrap_or(0);
    let mut stored = before;
    assert!(
        eventually_async(Duration::from_secs(60), async || {
            stored = stream_last_seq(&stack.cluster).await.unwrap_or(0);
            stored >= before + 20
        })
        .await,
        "(a) the stream stores nothing with node n{leader} down ({before} -> {stored}); logs:\n{}",
        stack.cluster.logs()
    );
    stack.cluster.restart(leader);
    let acked = load.acked();
    assert!(load.wait_acked(acked, STEP, wait).await, "(a) load stalled");
    stack
        .finish(&format!("(a) nats-server n{leader} killed"), load, t)
        .await;

    // (b) A shard dies mid-load and restarts on its data dir: it resumes after the stream
    // positions it committed with its state.
    let t = Instant::now();
    let load = stack.load();
    assert!(
        load.wait_acked(0, STEP, wait).await,
        "(b) load did not start"
    );
    stack.shards[1].kill();
    let acked = load.acked();
    assert!(
        load.wait_acked(acked, STEP / 2, wait).await,
        "(b) collectors stopped acking with a shard down"
    );
    stack.shards[1].start().await;
    let acked = load.acked();
    assert!(load.wait_acked(acked, STEP, wait).await, "(b) load stalled");
    stack.finish("(b) shard 1 killed", load, t).await;
    // It resumed after the positions it committed with its state, not from the stream's
    // start (which exact dedup would make come out right too, by reading everything again).
    let js = async_nats::jetstream::new(stack.cluster.client().await);
    let stream = js.get_stream(STREAM).await.unwrap();
    for p in [2, 3] {
        let info = stream.consumer_info(format!("shard1-{p}")).await.unwrap();
        assert!(
            matches!(
                info.config.deliver_policy,
                DeliverPolicy::ByStartSequence { start_sequence } if start_sequence > 1
            ),
            "(b) the restarted shard's consumer of partition {p} starts at {:?}, not after a committed position",
            info.config.deliver_policy
        );
    }

    // (c) A collector dies mid-load; its clients retry on the other one; it restarts on its
    // spool and republishes what the stream had not acknowledged.
    let t = Instant::now();
    let load = stack.load();
    assert!(
        load.wait_acked(0, STEP, wait).await,
        "(c) load did not start"
    );
    let failed = load.failed_attempts();
    stack.collectors[0].kill();
    let acked = load.acked();
    assert!(
        load.wait_acked(acked, STEP / 2, wait).await,
        "(c) the other collector did not take over"
    );
    assert!(
        load.failed_attempts() > failed,
        "(c) the clients must have seen the collector die"
    );
    stack.collectors[0].start().await;
    assert!(
        wait_healthy(&base(&stack.collectors[0]), wait).await,
        "(c) restarted collector not ready; log:\n{}",
        stack.collectors[0].log_tail()
    );
    let acked = load.acked();
    assert!(load.wait_acked(acked, STEP, wait).await, "(c) load stalled");
    stack.finish("(c) collector 0 killed", load, t).await;

    // (d) The whole NATS cluster is down for ~10 s: the collectors keep answering 202 from
    // their spools, then publish the backlog once the servers are back.
    let t = Instant::now();
    let load = stack.load();
    assert!(
        load.wait_acked(0, STEP, wait).await,
        "(d) load did not start"
    );
    for i in 0..3 {
        stack.cluster.kill(i);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked_at_outage = load.acked();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let acked_in_outage = load.acked() - acked_at_outage;
    assert!(
        acked_in_outage > 0,
        "(d) nothing acknowledged while NATS was down"
    );
    let mut spooled = Vec::new();
    for c in &stack.collectors {
        let text = metrics_text(c.http).await.unwrap();
        spooled.push(sample(&text, "adclick_collector_forward_lag_records").unwrap_or(0.0));
    }
    assert!(
        spooled.iter().all(|l| *l > 0.0),
        "(d) both collectors hold unpublished records during the outage: {spooled:?}"
    );
    for i in 0..3 {
        stack.cluster.restart(i);
    }
    let acked = load.acked();
    assert!(
        load.wait_acked(acked, STEP, wait).await,
        "(d) load stalled after the restart"
    );
    eprintln!(
        "(d) {acked_in_outage} clicks acked during the outage, spool lag {spooled:?} records"
    );
    stack.finish("(d) all nats-servers down", load, t).await;

    // Nothing arrives twice later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.check("after all faults").await;

    // The stream itself: every acked click is in it, nothing nobody posted is; a click
    // stored in two messages (a request retried across a collector kill, made durable by
    // both attempts) was counted once above.
    let t = Instant::now();
    let stored = read_stream(&stack.cluster.client().await, STREAM).await;
    let mut copies: BTreeMap<[u8; 16], u32> = BTreeMap::new();
    for m in &stored {
        for c in IngestBatch::decode(m.payload.as_slice()).unwrap().clicks {
            *copies
                .entry(c.impression_id.try_into().unwrap())
                .or_insert(0) += 1;
        }
    }
    let missing = stack
        .ledger
        .acked
        .keys()
        .filter(|id| !copies.contains_key(*id))
        .count();
    assert_eq!(missing, 0, "acked clicks missing from the stream");
    assert!(
        copies.keys().all(|id| stack.ledger.posted.contains(id)),
        "a click in the stream that no client posted"
    );
    let twice = copies.values().filter(|n| **n > 1).count();
    assert!(
        twice > 0 && stack.ledger.resent > 0,
        "resent requests put clicks in the stream twice ({twice}; {} resent): \
         the impression-id dedup was exercised",
        stack.ledger.resent
    );
    eprintln!(
        "stream: {} messages, {twice} clicks stored more than once (read in {:?})",
        stored.len(),
        t.elapsed()
    );
    let errors: Vec<String> = stack
        .collectors
        .iter()
        .chain(&stack.shards)
        .flat_map(Proc::adclick_errors)
        .collect();
    assert!(
        errors.is_empty(),
        "adclick logged errors:\n{}",
        errors.join("\n")
    );
    eprintln!(
        "cluster faults: {} clicks on {} ads, in {:?}",
        stack.ledger.acked.len(),
        stack.ledger.per_ad().len(),
        started.elapsed()
    );
}

/// Polls the async condition `f` until true (or `within`); whether it became true.
async fn eventually_async(within: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn adclick_error_lines_are_found_in_colored_logs() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::new("collector", dir.path(), "c", String::new(), free_addr());
    std::fs::write(
        &p.log,
        "2026-12-04T18:30:03.068676Z \u{1b}[33m WARN\u{1b}[0m \u{1b}[2madclick_aggregator::source::jetstream\u{1b}[0m: restarts\n\
         2026-12-04T18:30:04.000000Z \u{1b}[31mERROR\u{1b}[0m \u{1b}[2masync_nats::connector\u{1b}[0m: expected INFO, got nothing\n\
         2026-12-04T18:30:05.000000Z \u{1b}[31mERROR\u{1b}[0m \u{1b}[2madclick_aggregator::engine\u{1b}[0m: refused\n",
    )
    .unwrap();
    assert_eq!(
        p.adclick_errors(),
        vec!["2026-12-04T18:30:05.000000Z ERROR adclick_aggregator::engine: refused".to_string()]
    );
}
