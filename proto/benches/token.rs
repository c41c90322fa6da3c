//! Criterion benchmark of impression-token sign and verify (ns/op). Figures go in
//! BENCHMARKS.md: `cargo bench -p adclick-proto --bench token`.
#![allow(missing_docs, clippy::unwrap_used)]

use adclick_proto::token::{Impression, Keyring, SigningKey};
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let ring = Keyring::new(SigningKey::new(1, &[42; 32]).unwrap());
    let imp = Impression {
        impression_id: [9; 16],
        ad_id: 123_456,
        advertiser_id: 77,
        campaign_id: 5,
        landing_url: "https://shop.example.com/products/summer-sale?utm_source=adclick".into(),
        issued_at_ms: 1_800_000_000_000,
        expires_at_ms: 1_800_003_600_000,
        key_id: 0,
    };
    let tok = ring.sign(&imp).unwrap();
    let now = imp.issued_at_ms + 1000;
    c.bench_function("token/sign", |b| {
        b.iter(|| ring.sign(black_box(&imp)).unwrap())
    });
    c.bench_function("token/verify", |b| {
        b.iter(|| ring.verify(black_box(&tok), now, 0).unwrap())
    });
    let mut forged = tok.clone().into_bytes();
    forged[40] = if forged[40] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    c.bench_function("token/verify_forged", |b| {
        b.iter(|| ring.verify(black_box(&forged), now, 0).unwrap_err())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
