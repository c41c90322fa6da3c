//! Group commit: request handlers hand their accepted clicks (already encoded) to one
//! writer thread, which appends everything waiting as ONE spool record, fsyncs once, and
//! then answers every waiting request. While one fsync runs, the next group gathers, so
//! batching costs no added latency under load. One record is also one forwarded batch.
//!
//! After an fsync failure the spool is marked failed and every later commit fails (503):
//! after a failed fsync the kernel's page-cache state is unknown, so only a restart (and
//! recovery from what is on disk) is safe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolError};

/// Most bytes of clicks in one group commit (one spool record); well below the spool's
/// 16 MiB record limit and the gRPC message limit.
const MAX_GROUP_BYTES: usize = 8 << 20;

/// Why a commit failed; nothing of the request was made durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The spool's disk budget is used up (the forwarder is behind): retry later.
    #[error("spool full: {0}")]
    Full(String),
    /// The disk failed; the collector needs attention.
    #[error("spool disk failure: {0}")]
    Disk(String),
    /// The collector is shutting down.
    #[error("collector is shutting down")]
    Closed,
}

struct Request {
    /// Protobuf-encoded `IngestBatch.clicks` entries (field 3), concatenated.
    encoded: Vec<u8>,
    clicks: usize,
    done: oneshot::Sender<Result<u64, CommitError>>,
}

/// Handle to the writer thread. Cloned into every request handler.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
    failed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("clicks", &self.clicks)
            .finish()
    }
}

impl Committer {
    /// Starts the writer thread. `durable` is advanced to each committed record's seq.
    pub fn start(
        spool: Arc<Mutex<Spool>>,
        max_clicks_per_record: usize,
        metrics: Arc<Metrics>,
        durable: watch::Sender<u64>,
        dir_lock: std::fs::File,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, mut rx) = mpsc::channel::<Request>(16_384);
        let failed = Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let handle = std::thread::Builder::new()
            .name("adclick-spool-writer".into())
            .spawn(move || {
                // The data directory stays locked until the last write is done, even when
                // the runtime that started us is gone.
                let _dir_lock = dir_lock;
                let mut carry: Option<Request> = None;
                loop {
                    let first = match carry.take() {
                        Some(r) => r,
                        None => match rx.blocking_recv() {
                            Some(r) => r,
                            None => break,
                        },
                    };
                    let mut clicks = first.clicks;
                    let mut bytes = first.encoded.len();
                    let mut group = vec![first];
                    // Bounded in clicks and in bytes, so a record never exceeds the spool's
                    // record limit whatever the clicks' sizes.
                    while clicks < max_clicks_per_record {
                        match rx.try_recv() {
                            Ok(r) if bytes + r.encoded.len() > MAX_GROUP_BYTES => {
                                carry = Some(r);
                                break;
                            }
                            Ok(r) => {
                                clicks += r.clicks;
                                bytes += r.encoded.len();
                                group.push(r);
                            }
                            Err(_) => break,
                        }
                    }
                    let result = commit(&spool, &group, &metrics, &f);
                    if let Ok(seq) = result {
                        durable.send_replace(seq);
                        metrics.commit_clicks.observe(clicks as f64);
                    }
                    for r in group {
                        let _ = r.done.send(result.clone());
                    }
                }
            })?;
        Ok((Committer { tx, failed }, handle))
    }

    /// Makes `encoded` (concatenated `IngestBatch.clicks` entries) durable; returns the
    /// spool record seq once fsynced.
    pub async fn commit(&self, encoded: Vec<u8>, clicks: usize) -> Result<u64, CommitError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(CommitError::Disk(
                "an earlier fsync failed; restart the collector".into(),
            ));
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request {
                encoded,
                clicks,
                done,
            })
            .await
            .map_err(|_| CommitError::Closed)?;
        rx.await.map_err(|_| CommitError::Closed)?
    }

    /// True once an fsync failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

fn commit(
    spool: &Mutex<Spool>,
    group: &[Request],
    metrics: &Metrics,
    failed: &AtomicBool,
) -> Result<u64, CommitError> {
    if failed.load(Ordering::Acquire) {
        return Err(CommitError::Disk(
            "an earlier fsync failed; restart the collector".into(),
        ));
    }
    let len = group.iter().map(|r| r.encoded.len()).sum();
    let mut payload = Vec::with_capacity(len);
    for r in group {
        payload.extend_from_slice(&r.encoded);
    }
    let mut spool = spool.lock().unwrap_or_else(|e| e.into_inner());
    let seq = spool.append(&payload).map_err(|e| match e {
        // Nothing was written for these: retryable, not a disk failure.
        SpoolError::Full { .. } | SpoolError::RecordTooLarge { .. } => CommitError::Full(e.to_string()),
        other => {
            // A failed write may have left part of a record behind: stop, recover on restart.
            failed.store(true, Ordering::Release);
            tracing::error!(error = %other, "spool write failed: refusing further ingest until restart");
            CommitError::Disk(other.to_string())
        }
    })?;
    let t = Instant::now();
    if let Err(e) = spool.sync() {
        failed.store(true, Ordering::Release);
        tracing::error!(error = %e, "spool fsync failed: refusing further ingest until restart");
        return Err(CommitError::Disk(e.to_string()));
    }
    metrics.fsync_seconds.observe(t.elapsed().as_secs_f64());
    metrics
        .spool_bytes
        .set(i64::try_from(spool.used_bytes()).unwrap_or(i64::MAX));
    metrics.spool_segments.set(spool.segment_count() as i64);
    // Also here, not only in the forwarder: during an aggregator outage the forwarder is
    // stuck retrying, and this is exactly when the backlog must show.
    let lag = spool.durable_seq().saturating_sub(spool.acked_seq());
    metrics
        .forward_lag_records
        .set(i64::try_from(lag).unwrap_or(i64::MAX));
    Ok(seq)
}
