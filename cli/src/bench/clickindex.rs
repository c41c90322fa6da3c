//! `adclick bench clickindex`: latency of the `ip` and `user_id` filters (issue 14 item 2):
//! GetAdClicks of one ad and TopAds(n=100) over the last 60 minutes, filtered by one IP,
//! one user, a /24 and a heavy IP, through the aggregator's query code, while another
//! thread keeps indexing at `--rate` clicks/s. The work is
//! `adclick_aggregator::benchkit::click_index_queries`.

use std::path::PathBuf;
use std::time::Duration;

use adclick_aggregator::benchkit::{ClickIndexBench, click_index_queries};
use anyhow::{Result, bail};
use clap::Args;

/// `adclick bench clickindex`
#[derive(Debug, Args)]
pub struct ClickIndexArgs {
    /// Ingest rate, clicks/s (event time while filling, wall time while querying).
    #[arg(long, default_value_t = 80_000)]
    rate: u64,
    /// Minutes of clicks indexed before the queries (60 at 80k/s is ~27 GB of segments).
    #[arg(long, default_value_t = 10)]
    minutes: i64,
    /// Seconds of clicks per segment (the server writes one per checkpoint, 30 s).
    #[arg(long, default_value_t = 30)]
    flush_secs: u64,
    /// Distinct client IPs (uniform in 10.0.0.0/8).
    #[arg(long, default_value_t = 1_000_000)]
    ips: u64,
    /// Distinct users.
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    /// Distinct ads (Zipf).
    #[arg(long, default_value_t = 1_000_000)]
    ads: u64,
    /// Percent of clicks from one heavy IP.
    #[arg(long, default_value_t = 0.5)]
    heavy_pct: f64,
    /// Most timed runs per query.
    #[arg(long, default_value_t = 500)]
    runs: usize,
    /// Time budget per query.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    budget: Duration,
    /// Where the segments are written (a directory under it, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Append the result table to this file.
    #[arg(long)]
    append: Option<PathBuf>,
}

pub fn run(a: ClickIndexArgs) -> Result<()> {
    if a.rate == 0 || a.minutes < 1 || a.runs == 0 {
        bail!("--rate, --minutes and --runs must be at least 1");
    }
    let cfg = ClickIndexBench {
        rate: a.rate,
        minutes: a.minutes,
        flush_secs: a.flush_secs,
        ips: a.ips,
        users: a.users,
        ads: a.ads,
        heavy_pct: a.heavy_pct,
        runs: a.runs,
        budget: a.budget,
        dir: a.dir.clone(),
    };
    eprintln!(
        "indexing {} minutes at {} clicks/s, then querying under live ingest...",
        a.minutes, a.rate
    );
    let r = click_index_queries(&cfg)?;
    let mut t = format!("### adclick bench clickindex, {}\n\n", super::machine());
    t += &format!(
        "`adclick bench clickindex --rate {} --minutes {} --flush-secs {} --ips {} --users {} --ads {} --heavy-pct {}`\n\n",
        a.rate, a.minutes, a.flush_secs, a.ips, a.users, a.ads, a.heavy_pct
    );
    t += &r.table();
    super::emit(&t, &r.result_line(), a.append.as_deref())
}
