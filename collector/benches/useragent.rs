//! Cost per click of the bot User-Agent check (issue 16 target: <= 1 µs per click with the
//! full crawler-user-agents list): `UaClassifier::classify` over browser UAs (the common
//! case: no pattern matches, the whole header is scanned), the list's own crawler examples,
//! and adversarial 8 KiB headers (only the first 512 bytes are matched). Plus the one-off
//! cost of compiling the list at start.
//! `cargo bench -p adclick-collector --bench useragent`
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use adclick_collector::useragent::{BUILTIN_LIST, UaClassifier};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BROWSERS: [&str; 6] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
];

fn crawler_examples() -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(default)]
        instances: Vec<String>,
    }
    let list: Vec<E> = serde_json::from_str(BUILTIN_LIST).unwrap();
    // One example per pattern: every pattern's kind of bot, not Googlebot's eight.
    list.into_iter()
        .filter_map(|e| e.instances.into_iter().next())
        .collect()
}

fn bench(c: &mut Criterion) {
    let ua = UaClassifier::from_json(BUILTIN_LIST, "builtin").unwrap();
    let bots = crawler_examples();
    // Long headers that almost look like bots, so no early literal rejects them.
    let adversarial: Vec<Vec<u8>> = (0..16)
        .map(|i| {
            let mut v = Vec::with_capacity(8 << 10);
            while v.len() < 8 << 10 {
                v.extend_from_slice(
                    format!("Mozilla/5.0 (crawl{i}; spide; Bo t; bo-t) ").as_bytes(),
                );
            }
            v
        })
        .collect();

    let mut g = c.benchmark_group("user_agent_classify");
    g.throughput(Throughput::Elements(BROWSERS.len() as u64));
    g.bench_function("browsers", |b| {
        b.iter(|| {
            for u in BROWSERS {
                black_box(ua.classify(Some(black_box(u.as_bytes()))));
            }
        })
    });
    g.throughput(Throughput::Elements(bots.len() as u64));
    g.bench_function("crawler_examples", |b| {
        b.iter(|| {
            for u in &bots {
                black_box(ua.classify(Some(black_box(u.as_bytes()))));
            }
        })
    });
    g.throughput(Throughput::Elements(adversarial.len() as u64));
    g.bench_function("adversarial_8KiB", |b| {
        b.iter(|| {
            for u in &adversarial {
                black_box(ua.classify(Some(black_box(u))));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("user_agent_list");
    g.sample_size(10);
    g.bench_function("compile_builtin", |b| {
        b.iter(|| UaClassifier::from_json(black_box(BUILTIN_LIST), "builtin").unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
