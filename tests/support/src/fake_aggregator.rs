//! An in-test `IngestService` that behaves like an aggregator's ingest edge (per-collector
//! acked seqs as a floor plus the set above it, exact dedup by impression id) and records
//! what it got: the test double of the aggregator for collector tests. It can fail calls on
//! demand, hold acks back (so they complete out of order) and report ads as hot. It checks
//! no ingest key.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_proto::v1::ingest_service_server::{IngestService, IngestServiceServer};
use adclick_proto::v1::{IngestAck, IngestBatch, IngestClick};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// What the fake aggregator received and applied.
#[derive(Debug, Default)]
pub struct AggState {
    /// Every batch received (including no-op redeliveries).
    pub batches: Vec<IngestBatch>,
    /// Per collector: highest applied seq.
    pub hwm: HashMap<String, u64>,
    /// Per collector: every seq below this was acked (the highest `acked_floor` received,
    /// read as the seq itself when 0, as the real aggregator does).
    pub floor: HashMap<String, u64>,
    /// Per collector: acked seqs at or above its floor.
    pub acked_above: HashMap<String, BTreeSet<u64>>,
    /// Applied clicks by impression id -> how many times applied (exact dedup means 1).
    pub applied: HashMap<Vec<u8>, IngestClick>,
    /// Clicks that arrived in a new batch but were exact duplicates.
    pub duplicates: u64,
    /// Batches ignored as already acked.
    pub redeliveries: u64,
}

/// The service; clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeAggregator {
    /// What it received and applied.
    pub state: Arc<Mutex<AggState>>,
    /// Fail this many calls with UNAVAILABLE before succeeding.
    pub fail_next: Arc<AtomicU32>,
    /// Reported as hot in every ack.
    pub hot: Arc<Mutex<Vec<u64>>>,
    /// Seqs whose ack is held back (after the batch was applied) until they leave the set.
    pub hold: Arc<Mutex<HashSet<u64>>>,
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
        let seq = b.seq;
        let ack = self.apply(b);
        // A held ack waits (the batch is already applied, like a slow ack path).
        while self.hold.lock().unwrap().contains(&seq) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Response::new(ack))
    }
}

impl FakeAggregator {
    fn apply(&self, b: IngestBatch) -> IngestAck {
        let mut s = self.state.lock().unwrap();
        s.batches.push(b.clone());
        let id = b.collector_id.clone();
        let mut ack = IngestAck {
            collector_id: id.clone(),
            seq: b.seq,
            hot_ad_ids: self.hot.lock().unwrap().clone(),
            ..Default::default()
        };
        let mut floor = s.floor.get(&id).copied().unwrap_or(1);
        let mut above = s.acked_above.remove(&id).unwrap_or_default();
        let claim = if b.acked_floor == 0 {
            b.seq
        } else {
            b.acked_floor.min(b.seq)
        };
        if b.seq < floor || above.contains(&b.seq) {
            s.redeliveries += 1;
            ack.already_acked = true;
            s.acked_above.insert(id, above);
            return ack;
        }
        floor = floor.max(claim);
        above.insert(b.seq);
        above.retain(|x| *x >= floor);
        while above.remove(&floor) {
            floor += 1;
        }
        s.floor.insert(id.clone(), floor);
        s.acked_above.insert(id.clone(), above);
        let hwm = s.hwm.entry(id).or_default();
        *hwm = (*hwm).max(b.seq);
        for c in b.clicks {
            if s.applied.contains_key(&c.impression_id) {
                s.duplicates += 1;
                ack.duplicate += 1;
            } else {
                ack.accepted += 1;
                s.applied.insert(c.impression_id.clone(), c);
            }
        }
        ack
    }

    /// Lets the held ack of `seq` go.
    pub fn release(&self, seq: u64) {
        self.hold.lock().unwrap().remove(&seq);
    }
}

/// A running fake aggregator.
#[derive(Debug)]
pub struct AggHandle {
    /// Where its gRPC server listens.
    pub addr: SocketAddr,
    /// Its service (and through it, its state).
    pub agg: FakeAggregator,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl AggHandle {
    /// `http://{addr}`, for `CollectorConfig::aggregators`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
    /// The clicks applied so far, by impression id.
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

/// Starts a fresh fake aggregator on 127.0.0.1:0.
pub async fn fake_aggregator() -> AggHandle {
    fake_aggregator_on("127.0.0.1:0".parse().unwrap(), FakeAggregator::default()).await
}

fn tokio_stream_listener(
    l: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(l)
}
