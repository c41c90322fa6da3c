//! `adclick bench aggregator`: apply-only throughput of the aggregator's per-click state
//! path (window operator + one shard) on this thread, on the issue-13 click mix, plus RSS
//! per active minute cell and per dedup entry. The work is
//! `adclick_aggregator::benchkit::apply_mix`, shared with `cargo bench --bench state`.

use std::path::PathBuf;

use adclick_aggregator::benchkit::{MixConfig, apply_mix};
use adclick_aggregator::state::topset::IndexField;
use anyhow::{Result, bail};
use clap::Args;

/// `adclick bench aggregator`
#[derive(Debug, Args)]
pub struct AggregatorArgs {
    /// Clicks pushed through the state (duplicates and late clicks included).
    #[arg(long, default_value_t = 5_000_000)]
    clicks: u64,
    /// Distinct ads (Zipf popularity).
    #[arg(long, default_value_t = 1_000_000)]
    ads: u64,
    /// Minutes of event time the clicks are spread over.
    #[arg(long, default_value_t = 60)]
    minutes: i64,
    /// Percent of re-sent impressions (duplicates).
    #[arg(long, default_value_t = 2.0)]
    dup_pct: f64,
    /// Percent of late clicks (2-5 minutes behind the watermark).
    #[arg(long, default_value_t = 1.0)]
    late_pct: f64,
    /// Clicks per encoded batch (one WAL entry: the engine applies, seals and publishes
    /// the top-N index per batch).
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Skip the two untimed memory passes (no bytes per cell / per dedup entry).
    #[arg(long)]
    no_memory: bool,
    /// Time already-decoded clicks (the state path alone) instead of decoding them from
    /// encoded batches as the engine does.
    #[arg(long)]
    no_decode: bool,
    /// RAM budget of the exact-dedup set, MiB (`dedup.memory_bytes`; 256 = the default,
    /// which spills ids to the disk tier every ~2.1M new ones; 4096 keeps this mix in RAM).
    #[arg(long, default_value_t = 256)]
    dedup_mib: usize,
    /// Fields with per-value top-N indexes, comma-separated (`shards.top_index_fields`;
    /// "none" for none).
    #[arg(long, default_value = "advertiser,country")]
    top_index_fields: String,
    /// Do not feed the click index (the `ip`/`user_id` filters): the path as it was
    /// before issue 14, for a before/after comparison in one session.
    #[arg(long)]
    no_click_index: bool,
    /// Run the mix twice in this process, the invalid-traffic rules off then all on
    /// (`benchkit::bench_rules`), and report both throughputs and the rules' cost per click.
    #[arg(long)]
    rules: bool,
    /// Append the result table to this file.
    #[arg(long)]
    append: Option<PathBuf>,
}

pub fn run(a: AggregatorArgs) -> Result<()> {
    if a.clicks == 0 || a.ads == 0 || a.minutes < 1 || a.batch == 0 {
        bail!("--clicks, --ads, --minutes and --batch must be at least 1");
    }
    let cfg = MixConfig {
        clicks: a.clicks,
        ads: a.ads,
        minutes: a.minutes,
        duplicate_pct: a.dup_pct,
        late_pct: a.late_pct,
        measure_memory: !a.no_memory,
        decode: !a.no_decode,
        dedup_memory_bytes: a.dedup_mib.max(1) << 20,
        top_index_fields: IndexField::parse_list(&a.top_index_fields)
            .map_err(|e| anyhow::anyhow!("--top-index-fields: {e}"))?,
        click_index: !a.no_click_index,
        batch: a.batch,
        ..MixConfig::default()
    };
    eprintln!(
        "aggregator state path: {} clicks over {} ads, {}% duplicates, {}% late{}...",
        cfg.clicks,
        cfg.ads,
        cfg.duplicate_pct,
        cfg.late_pct,
        if cfg.measure_memory {
            " (memory passes first)"
        } else {
            ""
        }
    );
    let off = a.rules.then(|| apply_mix(&cfg));
    let r = apply_mix(&MixConfig {
        rules: a.rules,
        measure_memory: cfg.measure_memory && !a.rules,
        ..cfg.clone()
    });
    let mut t = format!("### adclick bench aggregator, {}\n\n", super::machine());
    t += &format!(
        "`adclick bench aggregator --clicks {} --ads {} --minutes {} --dup-pct {} --late-pct {}{}{}{}`\n\n",
        a.clicks,
        a.ads,
        a.minutes,
        a.dup_pct,
        a.late_pct,
        if a.no_decode { " --no-decode" } else { "" },
        if a.no_click_index {
            " --no-click-index"
        } else {
            ""
        },
        if a.rules { " --rules" } else { "" }
    );
    let mut line = r.result_line();
    if let Some(off) = off {
        t += "Rules off:\n\n";
        t += &off.table();
        t += "\nRules all on (same clicks, same process):\n\n";
        let cost = 1e9 / r.clicks_per_cpu_sec.max(1.0) - 1e9 / off.clicks_per_cpu_sec.max(1.0);
        t += &r.table();
        t += &format!(
            "\nRules' cost: {cost:.0} ns per click (CPU; {:.0} -> {:.0} clicks per CPU-second)\n",
            off.clicks_per_cpu_sec, r.clicks_per_cpu_sec
        );
        line += &format!(
            " rules_off_clicks_per_cpu_sec={:.0} rules_ns_per_click={cost:.1}",
            off.clicks_per_cpu_sec
        );
    } else {
        t += &r.table();
    }
    super::emit(&t, &line, a.append.as_deref())
}
