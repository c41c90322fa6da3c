//! Why the collector uses `fastbloom` rather than `bloomfilter`: the same workload (insert
//! then look up random 16-byte impression ids at a 0.1% target, 1M expected items) on
//! both. `cargo bench -p adclick-collector --bench bloom`
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn ids(n: usize, salt: u64) -> Vec<[u8; 16]> {
    (0..n as u64)
        .map(|i| {
            let mut x = (i ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut id = [0u8; 16];
            for chunk in id.chunks_mut(8) {
                x ^= x >> 31;
                x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            id
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    const N: usize = 1_000_000;
    let present = ids(N / 2, 1);
    let probes = ids(10_000, 2);
    let mut g = c.benchmark_group("bloom_1M_items_fp_0.001");
    g.throughput(Throughput::Elements(probes.len() as u64));

    let mut fast = fastbloom::BloomFilter::with_false_pos(0.001).expected_items(N);
    for id in &present {
        fast.insert(id);
    }
    g.bench_function("fastbloom_contains_then_insert", |b| {
        b.iter(|| {
            for id in &probes {
                if !fast.contains(black_box(id)) {
                    fast.insert(id);
                }
            }
        })
    });
    let mut fast_h = fastbloom::BloomFilter::with_false_pos(0.001).expected_items(N);
    g.bench_function("fastbloom_prehashed_contains_then_insert (as used)", |b| {
        b.iter(|| {
            for id in &probes {
                let h = u64::from_le_bytes(id[..8].try_into().unwrap());
                if !fast_h.contains_hash(black_box(h)) {
                    fast_h.insert_hash(h);
                }
            }
        })
    });
    let mut slow = bloomfilter::Bloom::new_for_fp_rate(N, 0.001).unwrap();
    for id in &present {
        slow.set(id);
    }
    g.bench_function("bloomfilter_check_then_set", |b| {
        b.iter(|| {
            for id in &probes {
                if !slow.check(black_box(id)) {
                    slow.set(id);
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
