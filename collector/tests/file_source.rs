//! `[[source.file]]` in-process, against the in-test aggregator: a line is read only once
//! its newline is there, a line longer than the read chunk is skipped (and counted) without
//! losing the line after it, a file truncated in place is read again from its start, a file
//! appearing later under the glob is picked up, and a restart on the same data dir reads
//! nothing twice.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use adclick_collector::config::FileSourceConfig;
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{eventually, keyring, signer, write_keys};
use adclick_test_support::fake_aggregator::fake_aggregator;

fn append(path: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn metric(page: &str, key: &str) -> u64 {
    page.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_partial_long_truncated_and_new_files() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 9);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let s = signer(&ring);
    let line = |ad_id: u64| {
        format!(
            "{{\"token\":\"{}\",\"country\":\"DE\",\"device\":\"desktop\"}}\n",
            s.mint(&ad(ad_id)).unwrap().token
        )
    };
    let agg = fake_aggregator().await;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut cfg = config(dir.path(), vec![agg.url()]);
    cfg.source.file = vec![FileSourceConfig {
        name: "t".into(),
        paths: vec![format!("{}/*.log", logs.display())],
        poll_interval_ms: 10,
        max_line_bytes: 1024,
        ..FileSourceConfig::default()
    }];
    let col = adclick_collector::start(cfg.clone()).await.unwrap();
    let a = logs.join("a.log");

    // A line without its newline waits; with it, it is read.
    let l1 = line(1);
    append(&a, &l1[..l1.len() - 1]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(agg.applied().len(), 0, "a partial line was read");
    append(&a, "\n");
    assert_eq!(agg.wait_applied(1).await.len(), 1);

    // A line longer than the 64 KiB read chunk, then a good one.
    append(&a, &format!("{}\n", "x".repeat(200_000)));
    append(&a, &line(2));
    assert_eq!(agg.wait_applied(2).await.len(), 2);

    // Truncated in place, then new lines: read from the start of the new content.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(0)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    append(&a, &(line(3) + &line(4)));
    assert_eq!(agg.wait_applied(4).await.len(), 4);

    // A new file under the glob.
    append(&logs.join("b.log"), &line(5));
    assert_eq!(agg.wait_applied(5).await.len(), 5);
    let page = col.metrics().render();
    let k = |o: &str| format!("adclick_collector_file_lines_total{{source=\"t\",outcome=\"{o}\"}}");
    assert_eq!(metric(&page, &k("read")), 5, "{page}");
    assert_eq!(metric(&page, &k("too_long")), 1, "{page}");
    col.shutdown().await;

    // A restart reads nothing again, and goes on with what is new.
    let col = adclick_collector::start(cfg).await.unwrap();
    append(&a, &line(6));
    assert_eq!(agg.wait_applied(6).await.len(), 6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = col.metrics().render();
    assert_eq!(metric(&page, &k("read")), 1, "{page}");
    assert!(
        eventually(Duration::from_secs(1), || agg.applied().len() == 6).await,
        "{}",
        agg.applied().len()
    );
    col.shutdown().await;
    agg.stop().await;
}
