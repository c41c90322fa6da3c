//! The collector's `[[source.file]]`: an "ad server" appends JSON click lines to a log file
//! while it is rotated by rename and by copytruncate, with malformed lines mixed in; the
//! real `adclick collector` process tails it and is SIGKILLed twice in the middle. Every
//! valid line is counted exactly once per ad (the aggregator's counts equal the ledger),
//! and no line is read again after a restart: the aggregator sees no duplicate click (a
//! line read twice would reach it again, since the collector's own dedup does not survive
//! the kill). After the last restart the malformed lines are counted by reason.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use adclick_sdk::ImpressionSigner;

use crate::support::*;

const ADVERTISER: u64 = 77;
const ADS: u64 = 7;

fn line(signer: &ImpressionSigner, i: u64) -> (u64, String) {
    let ad = 5_000 + i % ADS;
    let t = signer.mint(&placement(ad, ADVERTISER, 1)).unwrap();
    let now = now_ms();
    (
        ad,
        format!(
            "{{\"token\":\"{}\",\"occurred_at_ms\":{now},\"country\":\"us\",\"device\":\"mobile\",\"os\":\"ios\",\"site\":\"news.example\",\"user_id\":\"u{}\",\"client_ip\":\"203.0.113.{}\"}}\n",
            t.token,
            i % 50,
            i % 200
        ),
    )
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// The value of a metric line `name{labels} v` in a Prometheus text page (0 if absent).
fn metric(page: &str, name_and_labels: &str) -> u64 {
    page.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailed_log_survives_rotation_and_sigkill_exactly_once() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(120), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 33);
    write_keys(&keys_file, &ring);
    let signer = signer(&ring);
    let agg = adclick_aggregator::start(aggregator_config(
        &dir.path().join("aggregator"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let grpc = agg.grpc_addr();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("clicks.log");
    let listen = free_addr();
    let config = dir.path().join("collector.toml");
    // `[forward]` is the last table of collector_toml's text.
    std::fs::write(
        &config,
        collector_toml("edge-file", listen, &dir.path().join("collector"), &keys_file, grpc)
            + &format!(
                "\n[[source.file]]\nname = \"adserver\"\npaths = [{:?}]\npoll_interval_ms = 20\nbatch_lines = 40\nmax_line_bytes = 4096\nrotate_wait_ms = 2000\n",
                format!("{}/clicks.log*", logs.display())
            ),
    )
    .unwrap();
    let out = dir.path().join("collector.log");
    let base = format!("http://{listen}");
    let spawn = || ChildServer::spawn("collector", &config, &out);
    let mut child = spawn();
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "collector did not start; log:\n{}",
        child.log_text()
    );

    let mut ledger: BTreeMap<u64, u64> = BTreeMap::new();
    let mut i = 0u64;
    let mut write = |n: u64, ledger: &mut BTreeMap<u64, u64>, pause: bool| {
        let mut chunk = String::new();
        for _ in 0..n {
            let (ad, l) = line(&signer, i);
            i += 1;
            *ledger.entry(ad).or_default() += 1;
            chunk.push_str(&l);
            if pause && i.is_multiple_of(25) {
                append(&log, &chunk);
                chunk.clear();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        append(&log, &chunk);
    };
    // Phase 1, then a rename rotation (clicks.log -> clicks.log.1, a new clicks.log), more
    // lines, and a SIGKILL while the collector is reading.
    write(300, &mut ledger, true);
    std::fs::rename(&log, logs.join("clicks.log.1")).unwrap();
    write(300, &mut ledger, true);
    child.assert_running();
    child.kill();
    write(200, &mut ledger, false);
    let mut child = spawn();
    assert!(wait_healthy(&base, Duration::from_secs(20)).await);
    // A copytruncate rotation (copy to clicks.log.2, truncate in place), more lines, and a
    // second SIGKILL soon after.
    write(200, &mut ledger, true);
    std::fs::copy(&log, logs.join("clicks.log.2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    write(300, &mut ledger, true);
    tokio::time::sleep(Duration::from_millis(30)).await;
    child.assert_running();
    child.kill();
    let mut child = spawn();
    assert!(wait_healthy(&base, Duration::from_secs(20)).await);
    write(100, &mut ledger, false);

    let total: u64 = ledger.values().sum();
    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let counts = poll_counts(grpc, range, Duration::from_secs(30), |c| {
        c.values().sum::<u64>() >= total
    })
    .await;
    assert_eq!(
        counts,
        ledger,
        "per-ad counts; collector log:\n{}",
        child.log_text()
    );

    // Caught up: now lines of each malformed kind, then one valid line after them.
    append(
        &log,
        "{\"token\": \n\
         {\"token\":\"x\",\"device\":\"toaster\"}\n\
         {\"token\":\"x\",\"client_ip\":\"not-an-ip\"}\n",
    );
    append(&log, &format!("{{\"token\":\"{}\"}}\n", "A".repeat(5000)));
    write(1, &mut ledger, false);
    let http = http_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        let page = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let key = "adclick_collector_file_lines_total{source=\"adserver\",outcome=\"too_long\"}";
        if metric(&page, key) >= 1 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let m = |o: &str| {
        metric(
            &page,
            &format!("adclick_collector_file_lines_total{{source=\"adserver\",outcome=\"{o}\"}}"),
        )
    };
    assert_eq!(
        (m("invalid_json"), m("invalid_field"), m("too_long")),
        (1, 2, 1),
        "{page}"
    );
    let total: u64 = ledger.values().sum();
    let counts = poll_counts(grpc, range, Duration::from_secs(20), |c| {
        c.values().sum::<u64>() >= total
    })
    .await;
    assert_eq!(counts, ledger);
    // Give stragglers time to (wrongly) arrive, then: no click reached the aggregator
    // twice, so no line was read again after either kill.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let am = agg.metrics().render();
    assert_eq!(
        metric(
            &am,
            "adclick_aggregator_clicks_total{outcome=\"duplicate\"}"
        ),
        0,
        "a line was read twice"
    );
    assert_eq!(
        metric(&am, "adclick_aggregator_clicks_total{outcome=\"applied\"}"),
        total
    );
    child.terminate();
    let _ = child.wait_exit(Duration::from_secs(10));
    agg.shutdown().await;
}
