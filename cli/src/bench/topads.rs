//! `adclick bench topads`: TopAds(n=100, last 60 min) latency, unfiltered and filtered to
//! one country, through the aggregator's query code in this process, over a state holding
//! `--ads` distinct ads in the window. The work is
//! `adclick_aggregator::benchkit::topads_index`.

use std::path::PathBuf;
use std::time::Duration;

use adclick_aggregator::benchkit::{TopadsConfig, topads_index};
use adclick_aggregator::state::topset::IndexField;
use anyhow::{Result, bail};
use clap::Args;

/// `adclick bench topads`
#[derive(Debug, Args)]
pub struct TopadsArgs {
    /// Distinct ads in the window (each clicked at least once).
    #[arg(long, default_value_t = 10_000_000)]
    ads: u64,
    /// Extra clicks on Zipf(1.1)-popular ads (default: as many as --ads).
    #[arg(long)]
    zipf_clicks: Option<u64>,
    /// Minutes the clicks are spread over (the query asks for the last 60).
    #[arg(long, default_value_t = 60)]
    minutes: i64,
    /// Most timed runs per query.
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// Time budget per query (at least 3 runs), e.g. 20s.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    budget: Duration,
    /// Country of the filtered query.
    #[arg(long, default_value = "US")]
    country: String,
    /// Stop building when less memory than this (MiB) is left.
    #[arg(long, default_value_t = 2048)]
    min_free_mib: u64,
    /// Fields with per-value top-N indexes, comma-separated (`shards.top_index_fields`;
    /// "none" for none).
    #[arg(long, default_value = "advertiser,country")]
    top_index_fields: String,
    /// Append the result table to this file.
    #[arg(long)]
    append: Option<PathBuf>,
}

pub fn run(a: TopadsArgs) -> Result<()> {
    if a.ads == 0 || a.minutes < 1 || a.runs == 0 {
        bail!("--ads, --minutes and --runs must be at least 1");
    }
    let cfg = TopadsConfig {
        ads: a.ads,
        zipf_clicks: a.zipf_clicks.unwrap_or(a.ads),
        minutes: a.minutes,
        runs: a.runs,
        budget: a.budget,
        country: a.country.clone(),
        min_available_bytes: a.min_free_mib << 20,
        top_index_fields: IndexField::parse_list(&a.top_index_fields)
            .map_err(|e| anyhow::anyhow!("--top-index-fields: {e}"))?,
        ..TopadsConfig::default()
    };
    eprintln!(
        "building a state with {} distinct ads + {} Zipf clicks over {} minutes...",
        cfg.ads, cfg.zipf_clicks, cfg.minutes
    );
    let r = topads_index(&cfg)?;
    if r.filtered_hits == 0 {
        bail!("the filtered TopAds found nothing: the data set is wrong");
    }
    let mut t = format!("### adclick bench topads, {}\n\n", super::machine());
    t += &format!(
        "`adclick bench topads --ads {} --zipf-clicks {} --minutes {} --country {}`\n\n",
        cfg.ads, cfg.zipf_clicks, cfg.minutes, cfg.country
    );
    t += &r.table();
    super::emit(&t, &r.result_line(), a.append.as_deref())
}
