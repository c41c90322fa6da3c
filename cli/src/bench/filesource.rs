//! `adclick bench filesource`: lines per second of the collector's `[[source.file]]`
//! source (JSON parse, token verification, dedup, spool commit with fsync, position
//! write), on a log file written before the clock starts. The collector runs in this
//! process with an aggregator address nobody answers (forwarding only retries: the spool
//! keeps the clicks), so the figure is the source's and the writer's alone. Reports wall
//! lines/s and lines per CPU-second of the source thread and of the whole process.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use adclick_collector::config::{CollectorConfig, FileSourceConfig};
use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_sdk::{AdPlacement, ImpressionSigner};
use anyhow::{Context, Result, bail};
use clap::Args;

/// `adclick bench filesource`
#[derive(Debug, Args)]
pub struct FileSourceArgs {
    /// Lines in the log.
    #[arg(long, default_value_t = 300_000)]
    lines: u64,
    /// Lines per spool commit (`batch_lines`).
    #[arg(long, default_value_t = 1000)]
    batch_lines: usize,
    /// Append the result table to this file.
    #[arg(long)]
    append: Option<PathBuf>,
}

fn cpu(stat: &str) -> f64 {
    adclick_aggregator::benchkit::proc_cpu_seconds(stat)
}

fn thread_cpu(name: &str) -> f64 {
    let Ok(rd) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    rd.flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .map(|t| cpu(&t.path().join("stat").to_string_lossy()))
        .sum()
}

pub fn run(a: FileSourceArgs) -> Result<()> {
    if a.lines == 0 {
        bail!("--lines must be at least 1");
    }
    let base =
        std::env::temp_dir().join(format!("adclick-bench-filesource-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(base.clone());
    let dir = base.as_path();
    let ring = Keyring::new(SigningKey::new(1, &[7u8; 32])?);
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        KeyFile {
            keyring: ring.clone(),
            created: vec![(1, 0)],
        }
        .render()?,
    )?;
    let signer = ImpressionSigner::new(ring).with_ttl(Duration::from_secs(3600))?;
    eprintln!("filesource: writing {} lines...", a.lines);
    let log = dir.join("clicks.log");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&log)?);
    let now = adclick_collector::http::now_ms();
    let mut bytes = 0u64;
    for i in 0..a.lines {
        let t = signer.mint(&AdPlacement {
            ad_id: 1 + i % 10_000,
            advertiser_id: 1 + i % 50,
            campaign_id: 1,
            landing_url: "https://shop.example/p".into(),
        })?;
        let l = format!(
            "{{\"token\":\"{}\",\"occurred_at_ms\":{now},\"country\":\"us\",\"device\":\"mobile\",\"os\":\"ios\",\"site\":\"news.example\",\"user_id\":\"u{}\",\"client_ip\":\"198.51.100.{}\"}}\n",
            t.token,
            i % 100_000,
            i % 250
        );
        bytes += l.len() as u64;
        w.write_all(l.as_bytes())?;
    }
    w.flush()?;
    drop(w);
    let mut cfg = CollectorConfig {
        collector_id: "bench-file".into(),
        listen_http: "127.0.0.1:0".parse()?,
        data_dir: dir.join("collector"),
        keys_file: keys,
        aggregators: vec!["http://127.0.0.1:1".into()],
        aggregator_key: Some("bench-ingest-key-0123456789".into()),
        ..CollectorConfig::default()
    };
    cfg.forward.retry_base_ms = 1_000;
    cfg.forward.retry_max_ms = 10_000;
    cfg.dedup.expected_clicks = usize::try_from(a.lines.max(1000)).unwrap_or(usize::MAX);
    cfg.source.file = vec![FileSourceConfig {
        name: "bench".into(),
        paths: vec![log.display().to_string()],
        poll_interval_ms: 10,
        batch_lines: a.batch_lines.max(1),
        ..FileSourceConfig::default()
    }];
    let rt = tokio::runtime::Runtime::new()?;
    let (wall, src_cpu, proc_cpu) = rt.block_on(async {
        let p0 = cpu("/proc/self/stat");
        let started = Instant::now();
        let c = adclick_collector::start(cfg).await.context("collector")?;
        let key = "adclick_collector_clicks_total{outcome=\"accepted\"}";
        loop {
            let page = c.metrics().render();
            let n = page
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            if n >= a.lines {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("only {n} of {} lines accepted after 600 s", a.lines);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let wall = started.elapsed().as_secs_f64();
        let src = thread_cpu("adclick-file-be");
        let p = cpu("/proc/self/stat") - p0;
        c.shutdown().await;
        Ok::<_, anyhow::Error>((wall, src, p))
    })?;
    let n = a.lines as f64;
    let mut t = format!("### adclick bench filesource, {}\n\n", super::machine());
    t += &format!(
        "`adclick bench filesource --lines {} --batch-lines {}`\n\n",
        a.lines, a.batch_lines
    );
    t += "| lines | MB | wall s | lines/s | source thread CPU s | lines per source CPU-s | process CPU s | lines per process CPU-s |\n|---|---|---|---|---|---|---|---|\n";
    t += &format!(
        "| {} | {:.1} | {wall:.2} | {:.0} | {src_cpu:.2} | {:.0} | {proc_cpu:.2} | {:.0} |\n",
        a.lines,
        bytes as f64 / 1e6,
        n / wall,
        n / src_cpu.max(1e-9),
        n / proc_cpu.max(1e-9)
    );
    let result = format!(
        "RESULT bench=filesource lines={} batch_lines={} wall_seconds={wall:.3} lines_per_sec={:.0} source_cpu_seconds={src_cpu:.2} lines_per_source_cpu_sec={:.0} process_cpu_seconds={proc_cpu:.2} lines_per_process_cpu_sec={:.0}",
        a.lines,
        a.batch_lines,
        n / wall,
        n / src_cpu.max(1e-9),
        n / proc_cpu.max(1e-9)
    );
    super::emit(&t, &result, a.append.as_deref())
}
