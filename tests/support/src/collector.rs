//! One collector under test: its config on a temp dir (keys at `dir/keys.toml`, fast
//! retries, small spool segments) and the ad placements its tests mint tokens for.

use std::path::Path;

use adclick_collector::CollectorConfig;
use adclick_sdk::AdPlacement;

/// A collector config on `dir` with keys at `dir/keys.toml`, sending to `aggregators`.
pub fn config(dir: &Path, aggregators: Vec<String>) -> CollectorConfig {
    let mut c = CollectorConfig::default();
    c.listen_http = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.join("data");
    c.keys_file = dir.join("keys.toml");
    c.aggregators = aggregators;
    c.forward.retry_base_ms = 20;
    c.forward.retry_max_ms = 200;
    c.forward.request_timeout_ms = 2_000;
    c.tokens.key_reload_interval_ms = 100;
    c.dedup.expected_clicks = 100_000;
    c.dedup.exact_capacity = 100_000;
    c.spool.segment_bytes = 64 << 10;
    c
}

/// Ad `ad_id` of advertiser `100 + ad_id % 3`, campaign 7, landing on
/// `https://shop.example/ad/{ad_id}`.
pub fn ad(ad_id: u64) -> AdPlacement {
    AdPlacement {
        ad_id,
        advertiser_id: 100 + ad_id % 3,
        campaign_id: 7,
        landing_url: format!("https://shop.example/ad/{ad_id}"),
    }
}
