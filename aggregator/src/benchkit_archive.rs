//! Benchmark of the raw click archive (`adclick bench archive`): the real engine (WAL
//! commits with fsync, window operator, shards, click index) fed encoded batches by a few
//! concurrent senders, with `[archive]` off and on in alternating rounds of one run, so the
//! cost of the archive on apply is a ratio measured under the same conditions. With the
//! archive on it also reports the archive thread's own throughput (rows per CPU-second of
//! that thread, MB/s of Parquet written) and the compressed bytes per click. Measures,
//! never asserts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use adclick_proto::v1::{IngestBatch, IngestClick};
use bytes::Bytes;
use prost::Message;

use crate::benchkit::{MixConfig, MixGen};
use crate::config::AggregatorConfig;
use crate::decode::RawBatch;
use crate::metrics::Metrics;
use crate::store::RedbStore;

/// What to run.
#[derive(Debug, Clone)]
pub struct ArchiveBench {
    /// Clicks per round.
    pub clicks: u64,
    /// Clicks per batch.
    pub batch: usize,
    /// Concurrent senders (collectors), one batch in flight each.
    pub senders: usize,
    /// Rounds of each kind (off, on, off, on, ...).
    pub rounds: usize,
    /// Distinct ads.
    pub ads: u64,
}

impl Default for ArchiveBench {
    fn default() -> Self {
        ArchiveBench {
            clicks: 1_000_000,
            batch: 2_000,
            senders: 4,
            rounds: 2,
            ads: 100_000,
        }
    }
}

/// One round.
#[derive(Debug, Clone, Copy, Default)]
pub struct Round {
    /// Archive on.
    pub archive: bool,
    /// Wall seconds from the first batch sent to the last ack.
    pub apply_seconds: f64,
    /// Clicks acked per second.
    pub apply_cps: f64,
    /// Seconds after the last ack until the archive had published everything (on).
    pub drain_seconds: f64,
    /// CPU seconds of the archive thread (on).
    pub archive_cpu: f64,
    /// Rows archived (on).
    pub rows: u64,
    /// Bytes of Parquet published (on).
    pub bytes: u64,
    /// Files published (on).
    pub files: u64,
}

/// The result.
#[derive(Debug, Clone)]
pub struct ArchiveReport {
    /// The configuration.
    pub cfg: ArchiveBench,
    /// Every round, in order.
    pub rounds: Vec<Round>,
}

fn batches(cfg: &ArchiveBench) -> Vec<Vec<(String, u64, Bytes)>> {
    let mix = MixConfig {
        clicks: cfg.clicks,
        ads: cfg.ads,
        ..MixConfig::default()
    };
    let mut clicks_gen = MixGen::new(&mix);
    let mut per_sender: Vec<Vec<(String, u64, Bytes)>> = vec![Vec::new(); cfg.senders.max(1)];
    let mut i = 0usize;
    loop {
        let clicks: Vec<IngestClick> = clicks_gen.by_ref().take(cfg.batch.max(1)).collect();
        if clicks.is_empty() {
            break;
        }
        let s = i % per_sender.len();
        let id = format!("bench-{s}");
        let seq = per_sender[s].len() as u64 + 1;
        let bytes = IngestBatch {
            collector_id: id.clone(),
            seq,
            clicks,
            ..Default::default()
        }
        .encode_to_vec();
        per_sender[s].push((id, seq, Bytes::from(bytes)));
        i += 1;
    }
    per_sender
}

fn round(
    cfg: &ArchiveBench,
    work: &[Vec<(String, u64, Bytes)>],
    archive: bool,
) -> Result<Round, String> {
    let dir = tempfile_dir()?;
    let mut c = AggregatorConfig {
        data_dir: dir.join("data"),
        ..AggregatorConfig::default()
    };
    c.archive.enabled = archive;
    c.archive.dir = dir.join("archive");
    let store = RedbStore::open(&c.data_dir).map_err(|e| e.to_string())?;
    let (engine, _view, threads) =
        crate::engine::start(store, c, Arc::new(Metrics::new())).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let clicks: u64 = cfg.clicks;
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for s in work {
            let engine = engine.clone();
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for (_, _, b) in s {
                    let raw = RawBatch::parse(b).map_err(|e| e.to_string())?;
                    engine.ingest(raw).await.map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        Ok::<(), String>(())
    })?;
    let apply = started.elapsed().as_secs_f64();
    drop(engine);
    let _ = threads.writer.join();
    let mut r = Round {
        archive,
        apply_seconds: apply,
        apply_cps: clicks as f64 / apply,
        ..Round::default()
    };
    if let Some(a) = threads.archive {
        let stats = a.stats.clone();
        a.stop();
        use std::sync::atomic::Ordering::Relaxed;
        r.drain_seconds = started.elapsed().as_secs_f64() - apply;
        r.archive_cpu = stats.thread_cpu_us.load(Relaxed) as f64 / 1e6;
        r.rows = stats.rows.load(Relaxed);
        r.bytes = stats.bytes.load(Relaxed);
        r.files = stats.files.load(Relaxed);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(r)
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let d = std::env::temp_dir().join(format!(
        "adclick-bench-archive-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    Ok(d)
}

/// Runs the rounds (off, on, off, on, ...).
pub fn archive_bench(cfg: &ArchiveBench) -> Result<ArchiveReport, String> {
    let work = batches(cfg);
    let mut rounds = Vec::new();
    for _ in 0..cfg.rounds.max(1) {
        for archive in [false, true] {
            rounds.push(round(cfg, &work, archive)?);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(ArchiveReport {
        cfg: cfg.clone(),
        rounds,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl ArchiveReport {
    fn summary(&self) -> (f64, f64, f64, f64, f64, f64, f64) {
        let off = median(
            self.rounds
                .iter()
                .filter(|r| !r.archive)
                .map(|r| r.apply_cps)
                .collect(),
        );
        let on: Vec<&Round> = self.rounds.iter().filter(|r| r.archive).collect();
        let on_cps = median(on.iter().map(|r| r.apply_cps).collect());
        let rows: u64 = on.iter().map(|r| r.rows).sum();
        let bytes: u64 = on.iter().map(|r| r.bytes).sum();
        let cpu: f64 = on.iter().map(|r| r.archive_cpu).sum();
        let per_cpu = rows as f64 / cpu.max(1e-9);
        let mb_per_cpu = bytes as f64 / 1e6 / cpu.max(1e-9);
        let bpc = bytes as f64 / (rows.max(1)) as f64;
        let drain = median(on.iter().map(|r| r.drain_seconds).collect());
        (off, on_cps, per_cpu, mb_per_cpu, bpc, drain, cpu)
    }

    /// A markdown table.
    pub fn table(&self) -> String {
        let mut t = String::from(
            "| round | archive | apply clicks/s | apply s | drain after last ack s | archive CPU s | rows | Parquet MB | files |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for (i, r) in self.rounds.iter().enumerate() {
            t += &format!(
                "| {} | {} | {:.0} | {:.2} | {} | {} | {} | {} | {} |\n",
                i + 1,
                if r.archive { "on" } else { "off" },
                r.apply_cps,
                r.apply_seconds,
                if r.archive {
                    format!("{:.2}", r.drain_seconds)
                } else {
                    "-".into()
                },
                if r.archive {
                    format!("{:.2}", r.archive_cpu)
                } else {
                    "-".into()
                },
                r.rows,
                if r.archive {
                    format!("{:.1}", r.bytes as f64 / 1e6)
                } else {
                    "-".into()
                },
                r.files
            );
        }
        let (off, on, per_cpu, mb, bpc, drain, _) = self.summary();
        t += &format!(
            "\nApply with the archive on / off (medians): {on:.0} / {off:.0} clicks/s = **{:.2}x**. \
             Archive writer: **{per_cpu:.0} clicks per CPU-second** of its thread, {mb:.1} MB/s of Parquet per CPU-second, \
             **{bpc:.1} bytes per click** (snappy); everything published {drain:.2} s after the last ack (median, final generation included).\n",
            on / off.max(1e-9)
        );
        t
    }

    /// The `RESULT` line.
    pub fn result_line(&self) -> String {
        let (off, on, per_cpu, mb, bpc, drain, cpu) = self.summary();
        format!(
            "RESULT bench=archive clicks={} batch={} senders={} rounds={} apply_off_cps={off:.0} apply_on_cps={on:.0} ratio={:.3} archive_clicks_per_cpu_sec={per_cpu:.0} archive_mb_per_cpu_sec={mb:.2} bytes_per_click={bpc:.1} drain_seconds={drain:.2} archive_cpu_seconds={cpu:.2}",
            self.cfg.clicks,
            self.cfg.batch,
            self.cfg.senders,
            self.cfg.rounds,
            on / off.max(1e-9)
        )
    }
}
