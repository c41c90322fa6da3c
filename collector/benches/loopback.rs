//! Loopback load run of a real collector: concurrent HTTP/1.1 clients post protobuf
//! batches (verified, deduplicated, group-committed with fsync, forwarded over gRPC to a
//! minimal in-process aggregator that acks), then sequential redirects are timed.
//! Client, collector and aggregator share this machine's cores, so clicks per CPU-second
//! below counts *all* of them: a conservative figure for the collector alone.
//!
//! `cargo bench -p adclick-collector --bench loopback`
//! (env: ADCLICK_BENCH_CLICKS, default 600000; ADCLICK_BENCH_CLIENTS, default 16;
//! ADCLICK_BENCH_BATCH, default 500)
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use adclick_collector::CollectorConfig;
use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1::ingest_service_server::{IngestService, IngestServiceServer};
use adclick_proto::v1::{self, IngestAck, IngestBatch};
use adclick_sdk::{AdPlacement, ImpressionSigner};
use prost::Message;

#[derive(Default, Clone)]
struct CountingAggregator(Arc<AtomicU64>);

#[tonic::async_trait]
impl IngestService for CountingAggregator {
    async fn ingest(
        &self,
        req: tonic::Request<IngestBatch>,
    ) -> Result<tonic::Response<IngestAck>, tonic::Status> {
        let b = req.into_inner();
        self.0.fetch_add(b.clicks.len() as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(IngestAck {
            collector_id: b.collector_id,
            seq: b.seq,
            accepted: b.clicks.len() as u32,
            ..Default::default()
        }))
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the ")": state is field 0, utime is 11, stime is 12 (clock ticks of 1/100 s).
    (ticks(11) + ticks(12)) / 100.0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let total = env("ADCLICK_BENCH_CLICKS", 600_000);
    let clients = env("ADCLICK_BENCH_CLIENTS", 16);
    let batch = env("ADCLICK_BENCH_BATCH", 500);
    adclick_sdk::HttpTransport::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::new(SigningKey::new(1, &[7; 32]).unwrap());
        let text = KeyFile { keyring: ring.clone(), created: vec![(1, 0)] }.render().unwrap();
        std::fs::write(dir.path().join("keys.toml"), text).unwrap();

        let forwarded = CountingAggregator::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agg_addr = listener.local_addr().unwrap();
        let svc = IngestServiceServer::new(forwarded.clone()).max_decoding_message_size(64 << 20);
        tokio::spawn(
            tonic::transport::Server::builder()
                // Batches are ~100 KB: the default 64 KiB HTTP/2 window would stall each one.
                .initial_stream_window_size(8 << 20)
                .initial_connection_window_size(16 << 20)
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );

        let mut cfg = CollectorConfig::default();
        cfg.listen_http = "127.0.0.1:0".parse().unwrap();
        cfg.data_dir = dir.path().join("data");
        cfg.keys_file = dir.path().join("keys.toml");
        cfg.aggregators = vec![format!("http://{agg_addr}")];
        cfg.limits.max_clicks_per_batch = batch.max(1000);
        // Within the per-IP in-flight budget (every bench client is 127.0.0.1).
        cfg.limits.max_body_bytes = 4 << 20;
        // Every bench client is 127.0.0.1: no per-IP click rate limit.
        cfg.limits.rate_limit_per_ip = 0.0;
        cfg.dedup.expected_clicks = total * 2;
        cfg.dedup.exact_capacity = total * 2;
        let col = adclick_collector::start(cfg).await.unwrap();
        let base = format!("http://{}", col.http_addr());

        eprintln!("minting {total} tokens...");
        let signer = ImpressionSigner::new(ring);
        let now = adclick_collector::http::now_ms();
        let bodies: Vec<Vec<u8>> = (0..total)
            .collect::<Vec<_>>()
            .chunks(batch)
            .map(|chunk| {
                let clicks = chunk
                    .iter()
                    .map(|i| {
                        let ad = AdPlacement {
                            ad_id: (*i as u64 * 2_654_435_761) % 100_000,
                            advertiser_id: 1,
                            campaign_id: 2,
                            landing_url: "https://shop.example.com/p?id=1".into(),
                        };
                        v1::Click {
                            token: signer.mint_at(&ad, now).unwrap().token,
                            occurred_at_ms: now,
                            sent_at_ms: now,
                            country: "US".into(),
                            device: 2,
                            user_id: format!("u{}", i % 100_000),
                            ..Default::default()
                        }
                    })
                    .collect();
                v1::ClickBatch { clicks, ..Default::default() }.encode_to_vec()
            })
            .collect();
        let bodies = Arc::new(bodies);

        eprintln!("posting with {clients} clients, {batch} clicks per batch...");
        let next = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::new();
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (bodies, next, accepted, http, url) =
                (bodies.clone(), next.clone(), accepted.clone(), http.clone(), format!("{base}/v1/clicks"));
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let r = http
                        .post(&url)
                        .header("content-type", "application/x-protobuf")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 202);
                    let res = v1::ClickBatchResult::decode(r.bytes().await.unwrap()).unwrap();
                    accepted.fetch_add(u64::from(res.accepted), Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let ingest_wall = t0.elapsed().as_secs_f64();
        while forwarded.0.load(Ordering::Relaxed) < total as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let all_wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        let acc = accepted.load(Ordering::Relaxed);
        assert_eq!(acc, total as u64, "every click accepted once");

        let m = col.metrics();
        let fsync = m.render();
        let commits = fsync
            .lines()
            .find(|l| l.starts_with("adclick_collector_fsync_seconds_count"))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("?")
            .to_string();

        // Redirects: sequential, one connection, fresh token each.
        let n_redirects = 2000;
        let tokens: Vec<String> = (0..n_redirects)
            .map(|i| {
                let ad = AdPlacement { ad_id: i, advertiser_id: 1, campaign_id: 2, landing_url: "https://shop.example.com/r".into() };
                signer.mint(&ad).unwrap().token
            })
            .collect();
        let nofollow = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let mut lat = Vec::with_capacity(tokens.len());
        for t in &tokens {
            let s = Instant::now();
            let r = nofollow.get(format!("{base}/c/{t}")).send().await.unwrap();
            assert_eq!(r.status(), 302);
            lat.push(s.elapsed());
        }
        lat.sort();

        println!("| metric | value |");
        println!("|---|---|");
        println!("| clicks (batches of {batch}, {clients} concurrent HTTP/1.1 clients) | {acc} |");
        println!("| ingest wall time (all 202s received) | {ingest_wall:.2} s |");
        println!("| ingest throughput, wall | {:.0} clicks/s |", acc as f64 / ingest_wall);
        println!("| until all forwarded + acked by the aggregator | {all_wall:.2} s ({:.0} clicks/s) |", acc as f64 / all_wall);
        println!("| process CPU (client + collector + aggregator) | {cpu:.2} s |");
        println!("| clicks per CPU-second, everything included | {:.0} |", acc as f64 / cpu);
        println!("| group commits (fsyncs) | {commits} |");
        println!("| redirect latency p50 / p99 / max ({n_redirects} sequential, each fsynced) | {:.2} / {:.2} / {:.2} ms |",
            pct(&lat, 0.5).as_secs_f64() * 1e3, pct(&lat, 0.99).as_secs_f64() * 1e3, lat[lat.len() - 1].as_secs_f64() * 1e3);
        col.shutdown().await;
    });
}
