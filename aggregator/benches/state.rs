//! Aggregator state benchmark: single-core throughput of the per-click path (window
//! operator: dedup, watermark, interning, hot keys, routing; then the shard: minute/hour/
//! day cells, dimension combos, unique-user sketches, top-N index) on the issue-13 mix
//! (Zipf ads, 5 dimensions, 2% re-sent impressions, 1% late clicks), measured memory per
//! active (ad, minute) cell and per dedup entry, and unfiltered TopAds latency.
//!
//! A thin caller of `adclick_aggregator::benchkit::apply_mix`, which `adclick bench
//! aggregator` runs too, so both print the same table and `RESULT` line.
//!
//! `cargo bench -p adclick-aggregator --bench state`
//! (env: ADCLICK_BENCH_CLICKS, default 5000000; ADCLICK_BENCH_ADS, default 1000000)

use adclick_aggregator::benchkit::{MixConfig, apply_mix};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --benches` lists benchmarks: nothing to run then.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cfg = MixConfig {
        clicks: env("ADCLICK_BENCH_CLICKS", 5_000_000),
        ads: env("ADCLICK_BENCH_ADS", 1_000_000),
        ..MixConfig::default()
    };
    eprintln!(
        "{} clicks over {} ads (Zipf), {}% duplicates, {}% late, {} minutes...",
        cfg.clicks, cfg.ads, cfg.duplicate_pct, cfg.late_pct, cfg.minutes
    );
    let r = apply_mix(&cfg);
    print!("{}", r.table());
    println!("{}", r.result_line());
}
