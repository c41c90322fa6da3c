//! `adclick bench archive`: the raw click archive's write throughput and its cost on the
//! aggregator's apply path, in one run (`adclick_aggregator::benchkit_archive`).

use std::path::PathBuf;

use adclick_aggregator::benchkit_archive::{ArchiveBench, archive_bench};
use anyhow::{Result, anyhow};
use clap::Args;

/// `adclick bench archive`
#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// Clicks per round.
    #[arg(long, default_value_t = 1_000_000)]
    clicks: u64,
    /// Clicks per batch.
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Concurrent senders (one batch in flight each; the engine group-commits them).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Rounds of each kind, alternating archive off / on.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Distinct ads.
    #[arg(long, default_value_t = 100_000)]
    ads: u64,
    /// Append the result table to this file.
    #[arg(long)]
    append: Option<PathBuf>,
}

pub fn run(a: ArchiveArgs) -> Result<()> {
    let cfg = ArchiveBench {
        clicks: a.clicks,
        batch: a.batch,
        senders: a.senders,
        rounds: a.rounds,
        ads: a.ads,
    };
    eprintln!(
        "archive: {} rounds of {} clicks each with the archive off and on...",
        cfg.rounds, cfg.clicks
    );
    let r = archive_bench(&cfg).map_err(|e| anyhow!(e))?;
    let mut t = format!("### adclick bench archive, {}\n\n", super::machine());
    t += &format!(
        "`adclick bench archive --clicks {} --batch {} --senders {} --rounds {} --ads {}`\n\n",
        a.clicks, a.batch, a.senders, a.rounds, a.ads
    );
    t += &r.table();
    super::emit(&t, &r.result_line(), a.append.as_deref())
}
