//! Every server's `GET /metrics` as real parsers read it (issue 17 item 1): a collector, an
//! aggregator and a query front, in-process over real sockets, with clicks through them so
//! the histograms and labelled families have samples. Each answers
//! - Prometheus text 0.0.4 without an `Accept` (checked by `promtool check metrics`,
//!   Debian's `prometheus` package, installed by `scripts/setup-promtool.sh`: lint errors
//!   such as a counter without help text or a unit abbreviated in a name fail the test);
//! - OpenMetrics 1.0 when `Accept` asks for it (checked by the strict parser of the Python
//!   `prometheus-client`, in `.venv/` from `scripts/setup-python.sh`);
//!
//! and both carry `adclick_build_info` for its component and the `process_*` metrics.
//! The alert rules shipped in `deploy/prometheus/alerts.yml` are checked with
//! `promtool check rules`, and every metric they name must be one a server exposes.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use adclick_aggregator::front::{FrontConfig, ShardEndpoint};

use crate::support::*;

/// Runs `cmd` with `input` on stdin; (success, stdout + stderr).
fn pipe(cmd: &mut Command, input: &str) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const OPENMETRICS_CHECK: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
names = [f.name + ":" + f.type for f in text_string_to_metric_families(sys.stdin.read())]
print("\n".join(names))
"#;

async fn scrape(url: &str, accept: Option<&str>) -> (String, String) {
    let mut r = http_client().get(url);
    if let Some(a) = accept {
        r = r.header("accept", a);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (ct, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_exposes_metrics_real_parsers_accept() {
    within(Duration::from_secs(180), scenario()).await;
}

async fn scenario() {
    let promtool = setup_script("setup-promtool.sh");
    let python = setup_script("setup-python.sh");

    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 33);
    write_keys(&keys_file, &ring);
    let grpc = free_addr();
    let agg = adclick_aggregator::start(aggregator_config(&dir.path().join("agg"), grpc))
        .await
        .unwrap();
    // A `[[source.file]]` with one malformed line, so its per-source counters are exposed.
    let log = dir.path().join("clicks.log");
    std::fs::write(&log, "not a json click\n").unwrap();
    let mut col_cfg = collector_config(dir.path(), "edge", &keys_file, grpc);
    col_cfg.source.file = vec![adclick_collector::config::FileSourceConfig {
        name: "adserver".into(),
        paths: vec![log.display().to_string()],
        poll_interval_ms: 10,
        ..Default::default()
    }];
    let col = adclick_collector::start(col_cfg).await.unwrap();
    let mut front_cfg = FrontConfig {
        listen_grpc: "127.0.0.1:0".parse().unwrap(),
        listen_http: "127.0.0.1:0".parse().unwrap(),
        partitions: 1,
        shards: vec![ShardEndpoint {
            name: "s0".into(),
            grpc: format!("http://{grpc}"),
            partitions: "0".into(),
        }],
        api_keys: api_keys(),
        ..Default::default()
    };
    front_cfg.query.rate_limit_per_second = 0;
    let front = adclick_aggregator::front::start(front_cfg).await.unwrap();

    // Traffic through all three: clicks via the SDK, queries via the front.
    let tracker = adclick_sdk::Tracker::builder(format!("http://{}", col.http_addr()))
        .batch_size(10)
        .flush_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let s = signer(&ring);
    for ad in 1..=20u64 {
        tracker
            .click(
                &s.mint(&placement(ad, ADV_A, 1)).unwrap().token,
                Default::default(),
            )
            .unwrap();
    }
    tracker.flush().await.unwrap();
    let range = (now_ms() - 10 * MIN, now_ms() + MIN);
    poll_counts(front.grpc_addr(), range, Duration::from_secs(30), |c| {
        c.values().sum::<u64>() == 20
    })
    .await;
    let line_counted =
        "adclick_collector_file_lines_total{source=\"adserver\",outcome=\"invalid_json\"} 1";
    assert!(
        eventually(Duration::from_secs(10), || col
            .metrics()
            .render()
            .contains(line_counted))
        .await,
        "{}",
        col.metrics().render()
    );

    let servers = [
        ("collector", format!("http://{}/metrics", col.http_addr())),
        ("aggregator", format!("http://{}/metrics", agg.http_addr())),
        (
            "query_front",
            format!("http://{}/metrics", front.http_addr()),
        ),
    ];
    let mut exposed = String::new();
    for (component, url) in &servers {
        // Prometheus text 0.0.4, checked by promtool (lint included).
        let (ct, text) = scrape(url, None).await;
        assert!(
            ct.starts_with("text/plain; version=0.0.4"),
            "{component}: {ct}"
        );
        let (ok, out) = pipe(Command::new(&promtool).args(["check", "metrics"]), &text);
        assert!(
            ok,
            "{component}: promtool check metrics:\n{out}\n---\n{text}"
        );
        for want in [
            format!("adclick_build_info{{component=\"{component}\","),
            "process_cpu_seconds_total ".to_string(),
            "process_resident_memory_bytes ".to_string(),
            "process_open_fds ".to_string(),
        ] {
            assert!(text.contains(&want), "{component}: no {want}:\n{text}");
        }
        assert!(!text.contains("# EOF"), "{component}: 0.0.4 has no EOF");
        exposed.push_str(&text);

        // OpenMetrics, as Prometheus asks for it, through the strict parser.
        let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (ct, om) = scrape(url, Some(accept)).await;
        assert!(
            ct.starts_with("application/openmetrics-text; version=1.0.0"),
            "{component}: {ct}"
        );
        let (ok, out) = pipe(Command::new(&python).args(["-c", OPENMETRICS_CHECK]), &om);
        assert!(ok, "{component}: OpenMetrics parser:\n{out}\n---\n{om}");
        assert!(
            out.lines().any(|l| l == "adclick_build:info"),
            "{component}: {out}"
        );
        assert!(
            out.lines().any(|l| l == "process_cpu_seconds:counter"),
            "{out}"
        );
    }
    // The counts behind the checks are real: the collector accepted the 20 clicks.
    assert!(
        exposed.contains("adclick_collector_clicks_total{outcome=\"accepted\"} 20"),
        "{exposed}"
    );

    // The shipped alert rules: valid for promtool, and about metrics that exist.
    let rules = repo_root().join("deploy/prometheus/alerts.yml");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&rules).unwrap();
    let mut named = 0;
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("adclick_") {
            named += 1;
            assert!(
                exposed.lines().any(|l| l.starts_with(word)),
                "alerts.yml names {word}, which no server exposes"
            );
        }
    }
    assert!(named >= 6, "alerts.yml names {named} adclick metrics");

    front.shutdown().await;
    col.shutdown().await;
    agg.shutdown().await;
}
