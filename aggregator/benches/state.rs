//! Aggregator state benchmark: single-core throughput of the per-click path (window
//! operator: dedup, watermark, interning, hot keys, routing; then the shard: minute/hour/
//! day cells, dimension combos, unique-user sketches, top-N index), measured memory per
//! dedup entry and per active (ad, minute) cell, and unfiltered TopAds latency.
//!
//! `cargo bench -p adclick-aggregator --bench state`
//! (env: ADCLICK_BENCH_CLICKS, default 5000000; ADCLICK_BENCH_ADS, default 1000000)
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use adclick_aggregator::config::{ShardConfig, WindowConfig};
use adclick_aggregator::state::operator::Operator;
use adclick_aggregator::state::shard::ShardState;
use adclick_aggregator::state::windows::{ClickWindows, Routed};
use adclick_proto::v1::IngestClick;

const T0: i64 = 1_767_225_600_000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Zipf(s = 1)-like ad choice: ad = floor(ads^u) for uniform u.
fn zipf(r: &mut Rng, ads: u64) -> u64 {
    let u = (r.next() >> 11) as f64 / (1u64 << 53) as f64;
    ((ads as f64).powf(u) as u64).clamp(1, ads)
}

fn click(r: &mut Rng, i: u64, ads: u64) -> IngestClick {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&r.next().to_le_bytes());
    id[8..].copy_from_slice(&i.to_le_bytes());
    let c = ["US", "DE", "FR", "GB", "BR"][(r.next() % 5) as usize];
    IngestClick {
        impression_id: id.to_vec(),
        ad_id: zipf(r, ads),
        advertiser_id: 1,
        campaign_id: 1,
        token_expires_at_ms: T0 + 7_200_000,
        event_time_ms: T0 + ((i * 3_600_000 / 5_000_000) % 3_600_000) as i64,
        country: c.into(),
        device: (1 + r.next() % 3) as i32,
        os: ["ios", "android"][(r.next() % 2) as usize].into(),
        site: format!("site{}", r.next() % 50),
        user_id: format!("u{}", r.next() % 200_000),
        ..Default::default()
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env("ADCLICK_BENCH_CLICKS", 5_000_000);
    let ads = env("ADCLICK_BENCH_ADS", 1_000_000);
    eprintln!("generating {n} clicks over {ads} ads (Zipf) in 60 minutes...");
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let clicks: Vec<IngestClick> = (0..n).map(|i| click(&mut r, i, ads)).collect();

    let shards = ShardConfig {
        count: 1,
        ..Default::default()
    };
    let mut windows = ClickWindows::new(WindowConfig::default(), &shards);
    let mut shard = ShardState::default();
    let rss0 = rss_bytes();
    let t = Instant::now();
    let mut applied = 0u64;
    for c in clicks.iter().cloned() {
        if let Routed::Apply(_, a) = windows.process(c) {
            shard.apply(&a);
            applied += 1;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let rss1 = rss_bytes();
    let cells = shard.minute_cells() as u64;

    // Dedup memory on its own: a fresh operator holding the same ids.
    let mut w2 = ClickWindows::new(WindowConfig::default(), &shards);
    let rss_d0 = rss_bytes();
    let tw = Instant::now();
    for c in clicks.iter().cloned() {
        let _ = w2.process(c);
    }
    let window_secs = tw.elapsed().as_secs_f64();
    let rss_d1 = rss_bytes();
    let dedup = w2.dedup_len() as u64;
    drop(w2);

    // TopAds n=100 over the 60 minutes, and n=10 over the last 5.
    let lat = |n: usize, from: i64, to: i64| {
        let mut v: Vec<f64> = (0..200)
            .map(|_| {
                let t = Instant::now();
                let top = shard.top(n, from, to);
                assert!(!top.is_empty());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        (v[100], v[197])
    };
    let m0 = T0 / 60_000;
    let (p50_100, p99_100) = lat(100, m0, m0 + 60);
    let (p50_10, p99_10) = lat(10, m0 + 55, m0 + 60);

    println!("| metric | value |");
    println!("|---|---|");
    println!("| clicks / distinct ads (Zipf) / minutes | {n} / {ads} / 60 |");
    println!(
        "| per-click path, one core (windows + shard apply) | {:.0} clicks/s ({:.0} ns/click) |",
        applied as f64 / secs,
        secs * 1e9 / applied as f64
    );
    println!(
        "| of which the window operator alone (dedup, watermark, interning, hot keys, routing) | {:.0} ns/click |",
        window_secs * 1e9 / n as f64
    );
    println!("| active (ad, minute) cells | {cells} |");
    println!(
        "| RSS growth for cells + hour/day rollups + top-N + dedup | {:.0} MiB |",
        (rss1 - rss0) as f64 / 1048576.0
    );
    println!(
        "| RSS per active minute cell, all included | {:.0} bytes |",
        (rss1 - rss0) as f64 / cells as f64
    );
    println!(
        "| estimated heap per minute cell (shard.heap_bytes / cells) | {:.0} bytes |",
        shard.heap_bytes() as f64 / cells as f64
    );
    println!(
        "| dedup entries / RSS per entry | {dedup} / {:.0} bytes |",
        (rss_d1 - rss_d0) as f64 / dedup as f64
    );
    println!("| TopAds n=100 over 60 min: p50 / p99 | {p50_100:.3} / {p99_100:.3} ms |");
    println!("| TopAds n=10 over last 5 min: p50 / p99 | {p50_10:.3} / {p99_10:.3} ms |");
}
