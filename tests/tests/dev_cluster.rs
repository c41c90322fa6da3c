//! `adclick dev --cluster` as a user runs it: the real binary with OS-assigned ports and no
//! synthetic traffic. Its `dev.json` must list every child process with a pid that really is
//! that process (its command line names the config the file names); known signed clicks
//! sent to both collectors (some to both, which must count once) are counted exactly by
//! the query front and by the shards' sum, each shard holding only the ads of its
//! partitions; a collector and a NATS node SIGKILLed by their pids
//! from dev.json die while the rest keeps counting (R3 survives one node); SIGTERM to `dev`
//! stops every child gracefully (each logs its own shutdown) and leaves no process behind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use adclick_devtools::process;
use adclick_proto::keyfile::KeyFile;
use adclick_proto::partition::partition;
use adclick_sdk::MintedToken;
use adclick_test_support::nats::server_binary;
use prost::Message;

use crate::support::*;

/// `adclick dev --cluster`'s default partition count (not passed: the default is tested).
const PARTITIONS: u32 = 16;

/// One entry of dev.json's `processes`.
#[derive(Debug, Clone)]
struct Entry {
    role: String,
    name: String,
    pid: u32,
    endpoints: BTreeMap<String, String>,
    config: PathBuf,
    log: PathBuf,
    partitions: Option<String>,
}

fn entries(doc: &serde_json::Value) -> Vec<Entry> {
    doc["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Entry {
            role: p["role"].as_str().unwrap().into(),
            name: p["name"].as_str().unwrap().into(),
            pid: p["pid"].as_u64().unwrap() as u32,
            endpoints: p["endpoints"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
            config: p["config"].as_str().unwrap().into(),
            log: p["log"].as_str().unwrap().into(),
            partitions: p["partitions"].as_str().map(str::to_string),
        })
        .collect()
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// `/proc/<pid>/cmdline`, arguments joined by spaces.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Posts `tokens` as one protobuf batch; the HTTP status (0 when unreachable).
/// Kills, when dropped (a failed assertion), every listed process still running under
/// the test's data dir: a failing run must not leave nats-servers behind. A pid is only
/// killed while its command line names that dir (never a reused pid).
struct Reaper {
    pids: Vec<u32>,
    dir: String,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.pids {
            if process::running(pid) && cmdline(pid).contains(&self.dir) {
                let _ = process::kill(pid);
            }
        }
    }
}

async fn post(http: &reqwest::Client, collector: &str, tokens: &[&MintedToken]) -> u16 {
    let body = click_batch(tokens.iter().copied(), now_ms());
    http.post(format!("{collector}/v1/clicks"))
        .header("content-type", "application/x-protobuf")
        .timeout(Duration::from_secs(5))
        .body(body.encode_to_vec())
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Sends every token in batches of 5 (each batch retried until 202, 30 s at most); the
/// ledger of ad -> clicks (each token once).
async fn send_all(
    http: &reqwest::Client,
    collector: &str,
    tokens: &[&MintedToken],
    ledger: &mut BTreeMap<u64, u64>,
) {
    for chunk in tokens.chunks(5) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let code = post(http, collector, chunk).await;
            if code == 202 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{collector} did not accept a batch (last status {code})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for m in chunk {
            *ledger.entry(m.impression.ad_id).or_default() += 1;
        }
    }
}

/// Counts per ad through the query front.
async fn front_counts(procs: &[Entry], admin: &str, range: (i64, i64)) -> BTreeMap<u64, u64> {
    let front = procs.iter().find(|p| p.role == "query-front").unwrap();
    let grpc = addr_of(&front.endpoints["grpc"]);
    top_ads(grpc, admin, 1000, range, None)
        .await
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

/// Counts per ad summed over the shards, each checked to hold only ads of its partitions.
async fn shard_counts(procs: &[Entry], admin: &str, range: (i64, i64)) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for shard in procs.iter().filter(|p| p.role == "aggregator") {
        let grpc = addr_of(&shard.endpoints["grpc"]);
        let Ok(ads) = top_ads(grpc, admin, 1000, range, None).await else {
            return BTreeMap::new();
        };
        let owned = shard.partitions.as_deref().unwrap();
        let (lo, hi) = owned.split_once('-').unwrap();
        let (lo, hi): (u32, u32) = (lo.parse().unwrap(), hi.parse().unwrap());
        for (ad, c) in ads {
            let p = partition(ad, PARTITIONS);
            assert!(
                (lo..=hi).contains(&p),
                "{} (partitions {owned}) counted ad {ad} of partition {p}",
                shard.name
            );
            *out.entry(ad).or_default() += c;
        }
    }
    out
}

async fn poll_until(
    procs: &[Entry],
    admin: &str,
    range: (i64, i64),
    want: &BTreeMap<u64, u64>,
) -> BTreeMap<u64, u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The front's answer, and the shards' sum it must equal.
        let got = front_counts(procs, admin, range).await;
        let summed = shard_counts(procs, admin, range).await;
        if (got == *want && summed == *want) || Instant::now() > deadline {
            assert_eq!(summed, got, "the front's answer = the shards' sum");
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_lists_its_processes_counts_exactly_and_stops_them_all() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    let nats = tokio::task::spawn_blocking(server_binary).await.unwrap();
    within(Duration::from_secs(240), scenario(nats)).await;
}

async fn scenario(nats: PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let log = tmp.path().join("dev.log");
    let mut dev = ChildServer::spawn_args(
        [
            "dev".as_ref(),
            "--cluster".as_ref(),
            "--no-traffic".as_ref(),
            "--auto-ports".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
        &[("ADCLICK_NATS_SERVER", nats.as_os_str())],
        &log,
    );

    // dev.json, once every server is up.
    let json_path = data.join("dev.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut reaper = Reaper {
        pids: Vec::new(),
        dir: data.display().to_string(),
    };
    let doc: serde_json::Value = loop {
        dev.assert_running();
        if let Ok(text) = std::fs::read_to_string(&json_path)
            && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text)
        {
            reaper.pids = entries(&doc).iter().map(|p| p.pid).collect();
            if doc["ready"] == true {
                break doc;
            }
        }
        assert!(
            Instant::now() < deadline,
            "dev.json not ready within 120 s; log:\n{}",
            dev.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(doc["pid"].as_u64(), Some(u64::from(dev.pid())));
    let procs = entries(&doc);
    let by_role = |r: &str| procs.iter().filter(|p| p.role == r).count();
    assert_eq!(
        (by_role("nats"), by_role("aggregator"), by_role("collector")),
        (3, 2, 2),
        "{doc:#}"
    );
    assert_eq!(by_role("query-front"), 1, "{doc:#}");
    for p in &procs {
        assert!(
            process::running(p.pid),
            "{} (pid {}) is not running",
            p.name,
            p.pid
        );
        let cmd = cmdline(p.pid);
        assert!(
            cmd.contains(&p.config.display().to_string()),
            "pid {} of {} runs `{cmd}`, not on {}",
            p.pid,
            p.name,
            p.config.display()
        );
        assert!(
            p.log.exists(),
            "{} has no log at {}",
            p.name,
            p.log.display()
        );
    }
    let mut owned: Vec<&str> = procs
        .iter()
        .filter(|p| p.role == "aggregator")
        .map(|p| p.partitions.as_deref().unwrap())
        .collect();
    owned.sort();
    assert_eq!(
        owned,
        ["0-7", "8-15"],
        "shard 0 and 1 of 2 over 16 partitions"
    );

    // Known clicks, signed with the keys dev made, half to each collector; 10 of them to
    // both (the second copy is a duplicate across collectors: counted once).
    let ring = KeyFile::parse(&std::fs::read_to_string(data.join("keys.toml")).unwrap())
        .unwrap()
        .keyring;
    let admin = std::fs::read_to_string(data.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let signer = signer(&ring);
    let tokens: Vec<MintedToken> = (0..120u64)
        .map(|i| signer.mint(&placement(1 + i % 30, 7, 1)).unwrap())
        .collect();
    let collectors: Vec<&Entry> = procs.iter().filter(|p| p.role == "collector").collect();
    let urls: Vec<String> = collectors
        .iter()
        .map(|c| c.endpoints["http"].clone())
        .collect();
    let http = http_client();
    let mut ledger = BTreeMap::new();
    let (a, b) = tokens.split_at(60);
    send_all(&http, &urls[0], &a.iter().collect::<Vec<_>>(), &mut ledger).await;
    send_all(&http, &urls[1], &b.iter().collect::<Vec<_>>(), &mut ledger).await;
    let mut again = BTreeMap::new();
    send_all(
        &http,
        &urls[1],
        &a[..10].iter().collect::<Vec<_>>(),
        &mut again,
    )
    .await;
    assert_eq!(ledger.values().sum::<u64>(), 120);
    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let got = poll_until(&procs, &admin, range, &ledger).await;
    assert_eq!(got, ledger, "counts = the clicks sent, each once");

    // SIGKILL collector-1 and nats-2 by the pids in dev.json: exactly those die.
    let victim = collectors[1];
    let node = procs.iter().find(|p| p.name == "nats-2").unwrap();
    process::kill(victim.pid).unwrap();
    process::kill(node.pid).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !process::running(victim.pid)
            && !process::running(node.pid))
        .await,
        "the pids of dev.json did not die"
    );
    assert_eq!(
        post(&http, &urls[1], &[&tokens[0]]).await,
        0,
        "{} still answers",
        urls[1]
    );
    for p in procs
        .iter()
        .filter(|p| p.pid != victim.pid && p.pid != node.pid)
    {
        assert!(process::running(p.pid), "{} died with the others", p.name);
    }
    // The rest still counts: 30 more clicks through collector-0, two NATS nodes left.
    let more: Vec<MintedToken> = (0..30u64)
        .map(|i| signer.mint(&placement(1 + i % 30, 7, 1)).unwrap())
        .collect();
    send_all(
        &http,
        &urls[0],
        &more.iter().collect::<Vec<_>>(),
        &mut ledger,
    )
    .await;
    let got = poll_until(&procs, &admin, range, &ledger).await;
    assert_eq!(
        got, ledger,
        "counted after losing a collector and a NATS node"
    );

    // SIGTERM to dev: every child stops gracefully, is reaped, and dev.json goes.
    dev.assert_running();
    dev.terminate();
    let status = dev.wait_exit(Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| s.success()),
        "dev did not exit cleanly on SIGTERM ({status:?}); log:\n{}",
        dev.log_text()
    );
    for p in &procs {
        assert!(
            !process::exists(p.pid),
            "{} (pid {}) is still there after dev stopped (`{}`)",
            p.name,
            p.pid,
            cmdline(p.pid)
        );
    }
    for p in procs
        .iter()
        .filter(|p| p.pid != victim.pid && p.pid != node.pid)
    {
        let text = std::fs::read_to_string(&p.log).unwrap();
        let graceful = match p.role.as_str() {
            "nats" => "Server Exiting",
            _ => "shutting down",
        };
        assert!(
            text.contains(graceful),
            "{} did not stop gracefully (no {graceful:?} in {}):\n{text}",
            p.name,
            p.log.display()
        );
    }
    assert!(
        !json_path.exists(),
        "dev.json outlived the processes it lists"
    );
}
