//! Benchmarks for the top-N index on a Zipf-skewed 60-minute data set.
//! Run: `cargo bench -p adclick-aggregator --bench topn` (figures in BENCHMARKS.md).
//!
//! Environment: `TOPN_ADS` (distinct ads, default 10,000,000) and
//! `TOPN_LEVEL` (`hours`, the default, or `minutes`), `TOPN_SPAN` (minutes
//! the data is spread over, default 60).

use std::hint::black_box;
use std::time::{Duration, Instant};

use adclick_aggregator::state::topn::TopIndex;
use criterion::{Criterion, Throughput};

/// First minute of the data; not a multiple of 60 so that "last 60 minutes"
/// spans two partial hours (the realistic, harder case for the hour level).
const BASE: i64 = 28_000_030;
/// Zipf exponent.
const S: f64 = 1.1;

/// xorshift64*: fast, no dependencies, good enough for load generation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Continuous inverse-CDF approximation of Zipf(S) over ranks 0..n.
struct Zipf {
    a: f64,
    n: u64,
}

impl Zipf {
    fn new(n: u64) -> Self {
        Zipf {
            a: (n as f64).powf(1.0 - S) - 1.0,
            n,
        }
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let r = (self.a * rng.unit() + 1.0).powf(1.0 / (1.0 - S));
        (r as u64).saturating_sub(1).min(self.n - 1)
    }
}

/// Bijective scramble so hot ads are not simply the small ids.
fn ad_of(rank: u64) -> u64 {
    let mut x = rank.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn rss_mib() -> f64 {
    adclick_aggregator::benchkit::rss_bytes() as f64 / 1_048_576.0
}

fn percentiles(name: &str, mut f: impl FnMut()) {
    let mut times: Vec<Duration> = (0..300)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "{name}: p50 {:?}  p99 {:?}  max {:?}  (300 runs)",
        at(0.5),
        at(0.99),
        times[times.len() - 1]
    );
}

fn main() {
    let ads: u64 = std::env::var("TOPN_ADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let hours = std::env::var("TOPN_LEVEL").map_or(true, |v| v != "minutes");
    let span: i64 = std::env::var("TOPN_SPAN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let zipf = Zipf::new(ads);
    let mut rng = Rng(0x5eed_1234_abcd_0001);

    let mut idx = if hours {
        TopIndex::new()
    } else {
        TopIndex::minutes_only()
    };
    let rss0 = rss_mib();
    let t = Instant::now();
    // Every ad clicked once (so `ads` are distinct), then 2x that many
    // Zipf-distributed clicks; minutes uniform over the span, so adds to
    // older minutes are interleaved throughout.
    for rank in 0..ads {
        idx.add(ad_of(rank), BASE + (rng.next() % span as u64) as i64, 1);
    }
    for _ in 0..2 * ads {
        let rank = zipf.sample(&mut rng);
        idx.add(ad_of(rank), BASE + (rng.next() % span as u64) as i64, 1);
    }
    let build = t.elapsed();
    let incs = 3 * ads;
    let cells = idx.cell_count();
    let bytes = idx.heap_bytes();
    println!(
        "level={} span={span} ads={ads} increments={incs} build={build:?} ({:.2} M inc/s)",
        if hours { "hours" } else { "minutes" },
        incs as f64 / build.as_secs_f64() / 1e6
    );
    println!(
        "cells={cells} heap_bytes={bytes} ({:.1} MiB) bytes/cell={:.1} rss_delta={:.0} MiB",
        bytes as f64 / 1048576.0,
        bytes as f64 / cells as f64,
        rss_mib() - rss0
    );
    let end = BASE + span;
    println!("top5 last60: {:?}", &idx.top(5, end - 60, end));

    percentiles("top(100, last 60)", || {
        black_box(idx.top(100, end - 60, end));
    });
    if span > 60 {
        percentiles(&format!("top(100, last {span})"), || {
            black_box(idx.top(100, end - span, end));
        });
    }
    percentiles("top(10, last 5)", || {
        black_box(idx.top(10, end - 5, end));
    });
    percentiles("top(1000, last 60)", || {
        black_box(idx.top(1000, end - 60, end));
    });
    // BASE = 60h + 10, so [end - 70, end - 10) is one aligned hour (50 of
    // its minutes hold data): served by a single hour list when it exists.
    percentiles("top(100, aligned hour)", || {
        black_box(idx.top(100, end - 70, end - 10));
    });

    let mut c = Criterion::default().configure_from_args();
    c.bench_function("top100_last60", |b| {
        b.iter(|| black_box(idx.top(100, end - 60, end)))
    });
    c.bench_function("top10_last5", |b| {
        b.iter(|| black_box(idx.top(10, end - 5, end)))
    });

    const BATCH: usize = 200_000;
    let batch: Vec<u64> = (0..BATCH).map(|_| ad_of(zipf.sample(&mut rng))).collect();
    let mut g = c.benchmark_group("add");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    // Late clicks into an existing, populated minute of the big index.
    g.bench_function("zipf_into_last_minute", |b| {
        b.iter(|| {
            for &ad in &batch {
                idx.add(ad, end - 1, 1);
            }
        })
    });
    // The current minute, starting empty (the steady-state ingest path).
    let mut minute = end;
    g.bench_function("zipf_into_new_minute", |b| {
        b.iter(|| {
            for &ad in &batch {
                idx.add(ad, minute, 1);
            }
            minute += 1;
        })
    });
    g.finish();
    c.final_summary();
}
