//! Test support: keys and tokens, a collector config on temp dirs, and an in-test
//! `IngestService` that behaves like an aggregator's ingest edge (per-collector seq
//! high-water mark, exact dedup by impression id) and records what it got.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_collector::CollectorConfig;
use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1::ingest_service_server::{IngestService, IngestServiceServer};
use adclick_proto::v1::{IngestAck, IngestBatch, IngestClick};
use adclick_sdk::{AdPlacement, ImpressionSigner};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

pub fn keyring(id: u32, fill: u8) -> Keyring {
    Keyring::new(SigningKey::new(id, &[fill; 32]).unwrap())
}

pub fn write_keys(path: &Path, ring: &Keyring) {
    let created = ring.keys().map(|k| (k.id(), 0)).collect();
    let text = KeyFile {
        keyring: ring.clone(),
        created,
    }
    .render()
    .unwrap();
    std::fs::write(path, text).unwrap();
}

pub fn signer(ring: &Keyring) -> ImpressionSigner {
    ImpressionSigner::new(ring.clone())
}

pub fn ad(ad_id: u64) -> AdPlacement {
    AdPlacement {
        ad_id,
        advertiser_id: 100 + ad_id % 3,
        campaign_id: 7,
        landing_url: format!("https://shop.example/ad/{ad_id}"),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

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

#[derive(Default)]
pub struct AggState {
    /// Every batch received (including no-op redeliveries).
    pub batches: Vec<IngestBatch>,
    /// Per collector: highest applied seq.
    pub hwm: HashMap<String, u64>,
    /// Applied clicks by impression id -> how many times applied (exact dedup means 1).
    pub applied: HashMap<Vec<u8>, IngestClick>,
    /// Clicks that arrived in a new batch but were exact duplicates.
    pub duplicates: u64,
    /// Batches ignored as already acked.
    pub redeliveries: u64,
}

#[derive(Clone, Default)]
pub struct FakeAggregator {
    pub state: Arc<Mutex<AggState>>,
    /// Fail this many calls with UNAVAILABLE before succeeding.
    pub fail_next: Arc<AtomicU32>,
    /// Reported as hot in every ack.
    pub hot: Arc<Mutex<Vec<u64>>>,
}

#[tonic::async_trait]
impl IngestService for FakeAggregator {
    async fn ingest(&self, req: Request<IngestBatch>) -> Result<Response<IngestAck>, Status> {
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Status::unavailable("scripted failure"));
        }
        let b = req.into_inner();
        let mut s = self.state.lock().unwrap();
        s.batches.push(b.clone());
        let hwm = s.hwm.get(&b.collector_id).copied().unwrap_or(0);
        let mut ack = IngestAck {
            collector_id: b.collector_id.clone(),
            seq: b.seq,
            hot_ad_ids: self.hot.lock().unwrap().clone(),
            ..Default::default()
        };
        if b.seq <= hwm {
            s.redeliveries += 1;
            ack.already_acked = true;
            return Ok(Response::new(ack));
        }
        s.hwm.insert(b.collector_id.clone(), b.seq);
        for c in b.clicks {
            if s.applied.contains_key(&c.impression_id) {
                s.duplicates += 1;
                ack.duplicate += 1;
            } else {
                ack.accepted += 1;
                s.applied.insert(c.impression_id.clone(), c);
            }
        }
        Ok(Response::new(ack))
    }
}

pub struct AggHandle {
    pub addr: SocketAddr,
    pub agg: FakeAggregator,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl AggHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
    pub fn applied(&self) -> HashMap<Vec<u8>, IngestClick> {
        self.agg.state.lock().unwrap().applied.clone()
    }
    /// Waits until `n` distinct clicks were applied (or 20 s).
    pub async fn wait_applied(&self, n: usize) -> HashMap<Vec<u8>, IngestClick> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let a = self.applied();
            if a.len() >= n || Instant::now() > deadline {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts a fake aggregator on `addr` (use port 0 for a fresh one).
pub async fn fake_aggregator_on(addr: SocketAddr, agg: FakeAggregator) -> AggHandle {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let svc = IngestServiceServer::new(agg.clone()).max_decoding_message_size(64 << 20);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(tokio_stream_listener(listener), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    AggHandle {
        addr,
        agg,
        stop: Some(tx),
        task,
    }
}

pub async fn fake_aggregator() -> AggHandle {
    fake_aggregator_on("127.0.0.1:0".parse().unwrap(), FakeAggregator::default()).await
}

fn tokio_stream_listener(
    l: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(l)
}

/// A port nothing listens on right now (for "aggregator unreachable").
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Polls `f` until true (or 20 s); returns the last value.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
