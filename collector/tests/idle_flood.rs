//! Benchmark (ignored by default): with the shipped `config/collector.toml`, 10,000 idle
//! connections (half silent TCP, half h2c that only sent the preface, from 100 loopback
//! addresses 127.0.1.x, re-opened as soon as the collector closes them) do not keep a real
//! client from getting its 202. Prints the real client's latencies; the figure goes in
//! BENCHMARKS.md. Nothing here asserts a time.
//!
//! The collector runs in a child process (this test binary re-run in server mode), so that
//! each side needs only ~10,000 open files, under the usual 20,000 limit:
//!
//! ```text
//! cargo test --release -p adclick-collector --test collector -- --ignored --nocapture idle_flood
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use adclick_collector::CollectorConfig;
use adclick_proto::v1::{self, ClickBatch};
use adclick_test_support::collector::ad;
use adclick_test_support::common::{keyring, now_ms, signer, write_keys};
use adclick_test_support::fake_aggregator::fake_aggregator;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const IDLE: usize = 10_000;
const ADDRESSES: usize = 100;
const PROBES: usize = 40;

fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One idle attacker slot: connect, (maybe) send the h2c preface, wait to be closed,
/// repeat until `stop`.
async fn idle_slot(i: usize, to: SocketAddr, open: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    let from = SocketAddr::from(([127, 0, 1, (i % ADDRESSES) as u8 + 1], 0));
    while !stop.load(Ordering::Relaxed) {
        let s = TcpSocket::new_v4().unwrap();
        s.set_reuseaddr(true).unwrap();
        if s.bind(from).is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let Ok(mut c) = s.connect(to).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if i % 2 == 1 {
            let _ = c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 256];
        // Until the collector closes it (its header timeout) or the bench ends.
        loop {
            tokio::select! {
                r = c.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::Relaxed) { break }
                }
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
    }
}

const SERVER_ENV: &str = "ADCLICK_IDLE_FLOOD_SERVER";
/// The full libtest name (module path within the `collector` test binary), for `--exact`.
const TEST_NAME: &str = "idle_flood::ten_thousand_idle_connections_do_not_lock_out_a_real_client";

/// Server mode: the collector with the shipped configuration (paths and port changed),
/// until stdin closes; then its connection metrics.
fn serve(dir: &std::path::Path) {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/collector.toml"
    ))
    .unwrap();
    let mut cfg: CollectorConfig = toml::from_str(&shipped).unwrap();
    cfg.listen_http = "127.0.0.1:0".parse().unwrap();
    cfg.data_dir = dir.join("data");
    cfg.keys_file = dir.join("keys.toml");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let agg = rt.block_on(fake_aggregator());
    cfg.aggregators = vec![agg.url()];
    let col = rt.block_on(adclick_collector::start(cfg)).unwrap();
    println!("IDLE_FLOOD_ADDR={}", col.http_addr());
    let mut sink = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut sink);
    for l in col.metrics().render().lines() {
        if l.contains("connections_") || l.contains("requests_total") {
            println!("IDLE_FLOOD_METRIC {l}");
        }
    }
    rt.block_on(col.shutdown());
    rt.block_on(agg.stop());
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (see the module docs)"]
fn ten_thousand_idle_connections_do_not_lock_out_a_real_client() {
    use std::io::BufRead as _;
    if let Ok(dir) = std::env::var(SERVER_ENV) {
        serve(std::path::Path::new(&dir));
        return;
    }
    let limit = open_files_limit();
    assert!(
        limit >= IDLE as u64 + 2_000,
        "open-file limit {limit} is too low for {IDLE} client connections"
    );
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "--nocapture", TEST_NAME])
        .env(SERVER_ENV, dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let l = lines.next().expect("server printed its address").unwrap();
        if let Some(a) = l.strip_prefix("IDLE_FLOOD_ADDR=") {
            break a.parse().unwrap();
        }
    };

    let client = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (latencies, peak, statuses) = client.block_on(async {
        let mut slots = Vec::with_capacity(IDLE);
        for i in 0..IDLE {
            slots.push(tokio::spawn(idle_slot(i, addr, open.clone(), stop.clone())));
            if i % 500 == 499 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let t0 = Instant::now();
        while open.load(Ordering::Relaxed) < IDLE && t0.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "idle connections open: {} after {:?}",
            open.load(Ordering::Relaxed),
            t0.elapsed()
        );
        adclick_sdk::HttpTransport::install_crypto_provider();
        let s = signer(&ring);
        let mut latencies = Vec::new();
        let mut statuses = Vec::new();
        let mut peak = 0;
        for i in 0..PROBES {
            peak = peak.max(open.load(Ordering::Relaxed));
            // A fresh client each time: a new connection through the flooded listener.
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let now = now_ms();
            let body = ClickBatch {
                clicks: vec![v1::Click {
                    token: s.mint(&ad(i as u64)).unwrap().token,
                    occurred_at_ms: now,
                    sent_at_ms: now,
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec();
            let t = Instant::now();
            let status = http
                .post(format!("http://{addr}/v1/clicks"))
                .header("content-type", "application/x-protobuf")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            latencies.push(t.elapsed());
            statuses.push(status);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for s in slots {
            let _ = s.await;
        }
        (latencies, peak, statuses)
    });
    let mut sorted = latencies.clone();
    sorted.sort();
    let within_1s = latencies
        .iter()
        .zip(&statuses)
        .filter(|(l, s)| **s == 202 && **l < Duration::from_secs(1))
        .count();
    println!("peak idle connections open during probes: {peak}");
    println!(
        "real client: {within_1s}/{PROBES} got 202 within 1 s; latency p50 {:?}, p90 {:?}, max {:?}",
        sorted[PROBES / 2],
        sorted[PROBES * 9 / 10],
        sorted[PROBES - 1]
    );
    drop(child.stdin.take());
    for l in lines.map_while(Result::ok) {
        if let Some(m) = l.strip_prefix("IDLE_FLOOD_METRIC ") {
            println!("collector: {m}");
        }
    }
    let _ = child.wait();
    assert!(statuses.iter().all(|&s| s == 202), "{statuses:?}");
}
