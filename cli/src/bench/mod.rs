//! `adclick bench`: the benchmarks behind BENCHMARKS.md, one subcommand each.
//!
//! - `pipeline` ([`pipeline`]): the whole path with the real `adclick` binaries as child
//!   processes (collectors + aggregator) under SDK load from this process.
//! - `aggregator` ([`aggregator`]): apply-only throughput of the aggregator's per-click
//!   state path on one core, and memory per cell (`adclick_aggregator::benchkit`).
//! - `topads` ([`topads`]): TopAds latency over a state holding millions of ads.
//! - `jetstream` ([`jetstream`]): publish latency and per-partition shard throughput on
//!   the JetStream back end.
//! - `clickindex` ([`clickindex`]): latency of the `ip`/`user_id` filters under ingest.
//! - `archive` ([`archive`]): the raw click archive's write throughput and its cost on
//!   apply (archive off and on in one run).
//! - `filesource` ([`filesource`]): lines/s of the collector's log-file source.
//! - `reconcile` ([`reconcile`]): `adclick reconcile` over a day of N clicks.
//!
//! `adclick bench --rate R ...` without a subcommand is `pipeline` (the form that predates
//! the subcommands). Each prints a human table and exactly one line `RESULT bench=<name>
//! key=value ...` on stdout for scripts (`scripts/bench.sh`). Measures, never asserts.

mod aggregator;
mod archive;
mod clickindex;
mod filesource;
mod jetstream;
pub(crate) mod pipeline;
mod preload;
mod reconcile;
mod topads;

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};

/// `adclick bench`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: Option<BenchCommand>,
    /// Without a subcommand: the `pipeline` benchmark with these arguments.
    #[command(flatten)]
    pipeline: pipeline::PipelineArgs,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Whole pipeline: collectors + aggregator as processes under SDK load (the default).
    Pipeline(pipeline::PipelineArgs),
    /// Aggregator per-click state path, apply only, one core: clicks/s and memory per cell.
    Aggregator(aggregator::AggregatorArgs),
    /// TopAds(n=100, last 60 min) latency over a state holding millions of distinct ads.
    Topads(topads::TopadsArgs),
    /// JetStream back end: publish latency p50/p99 (acked) and one shard's per-partition
    /// consume throughput, on running NATS servers.
    Jetstream(jetstream::JetstreamArgs),
    /// `ip` / `user_id` filters: GetAdClicks and TopAds latency under live click indexing.
    Clickindex(clickindex::ClickIndexArgs),
    /// Raw click archive: write throughput, bytes per click, and apply throughput with the
    /// archive off and on in the same run.
    Archive(archive::ArchiveArgs),
    /// Collector `[[source.file]]`: lines/s (and per CPU-second) of the log-file source.
    Filesource(filesource::FileSourceArgs),
    /// `adclick reconcile` over one day of N clicks: wall time and peak memory.
    Reconcile(reconcile::ReconcileArgs),
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.cmd {
        None => pipeline::run(a.pipeline),
        Some(BenchCommand::Pipeline(p)) => pipeline::run(p),
        Some(BenchCommand::Aggregator(x)) => aggregator::run(x),
        Some(BenchCommand::Topads(x)) => topads::run(x),
        Some(BenchCommand::Jetstream(x)) => jetstream::run(x),
        Some(BenchCommand::Clickindex(x)) => clickindex::run(x),
        Some(BenchCommand::Archive(x)) => archive::run(x),
        Some(BenchCommand::Filesource(x)) => filesource::run(x),
        Some(BenchCommand::Reconcile(x)) => reconcile::run(x),
    }
}

/// "date: N cores, CPU model" for table headers.
fn machine() -> String {
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{date}: {cores} cores, {cpu_model}")
}

/// Prints the table, then appends it to `append` when given.
fn emit(table: &str, result: &str, append: Option<&Path>) -> Result<()> {
    print!("{table}");
    println!("{result}");
    if let Some(path) = append {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)?;
        writeln!(f, "\n{table}")?;
        eprintln!("appended to {}", path.display());
    }
    Ok(())
}
