//! Group commit: request handlers hand their accepted clicks (already encoded) to one
//! writer thread, which appends everything waiting as ONE spool record, fsyncs once, and
//! then answers every waiting request. While one fsync runs, the next group gathers, so
//! batching costs no added latency under load. One record is also one forwarded batch.
//!
//! After a write or fsync failure the page-cache state is unknown, so the spool is not
//! written again: commits fail fast (503) and readiness says `spool_failed` while the
//! writer recovers by itself. With backoff it probes the data directory (a small file
//! written and fsynced), and once that works it drops the spool and reopens it, which
//! re-runs recovery from what is on disk; then ingest resumes without a restart.
//!
//! The spool is shared with the forwarder as `Arc<Mutex<Spool>>`, and `Spool::open` locks
//! the directory, so the failed spool must be dropped before the new one opens: for that
//! moment a small empty *standby* spool (`<data_dir>/spool-standby`, opened at start)
//! stands in behind the mutex. The mutex is held across the swap, so the forwarder only
//! ever sees the standby if the reopen itself fails; it then reads nothing and its acks
//! are refused (the records stay and are re-sent after the reopen; the aggregator drops
//! re-sent seqs).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::{Metrics, ResultLabel};
use crate::spool::{Spool, SpoolError, SpoolOptions};

/// First wait before a reopen attempt after a failure; doubled per failed attempt.
const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest wait between reopen attempts.
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bytes written and fsynced to prove the disk takes writes again before reopening.
const PROBE_BYTES: usize = 64 << 10;
/// Name of the probe file in the data directory.
const PROBE_FILE: &str = ".write-probe";

/// Most bytes of clicks in one group commit (one spool record); well below the spool's
/// 16 MiB record limit and the gRPC message limit. A smaller cap can be asked for
/// (`Committer::start`'s `max_record_bytes`: the JetStream sink's message size).
pub const MAX_GROUP_BYTES: usize = 8 << 20;

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

/// Where the writer's spool lives, for reopening it after a failure.
#[derive(Debug, Clone)]
pub struct SpoolLocation {
    /// The spool directory (`<data_dir>/spool`).
    pub dir: PathBuf,
    /// The standby spool's directory (`<data_dir>/spool-standby`).
    pub standby_dir: PathBuf,
    /// Options the spool is opened with.
    pub opts: SpoolOptions,
    /// The collector id (for the damage report of a reopen).
    pub collector_id: String,
    /// The spool's incarnation at start. A reopen that comes back with another one (its
    /// recovery had to pick a new identity) is refused: the forwarder sends under the old
    /// collector id, whose seqs the aggregator has already seen. That needs a restart.
    pub incarnation: u64,
}

/// Why the node cannot take writes now (readiness reasons).
#[derive(Debug, Default)]
struct Health {
    /// A write or fsync failed; the spool is being reopened.
    failed: AtomicBool,
    /// Spool bytes in use when an append was refused as full (0 = not full). Clears when
    /// a commit succeeds or the forwarder's acks shrink the spool below it.
    full_at_bytes: AtomicU64,
    /// The spool directory and its free-space floor, for the `disk_low` reason (checked
    /// on each probe, so it clears as soon as space is freed, traffic or not).
    spool_dir: PathBuf,
    min_free_bytes: u64,
    /// Free bytes the last append refused for the floor needed (0 = none refused since the
    /// last commit): readiness stays false until the filesystem has that much free.
    disk_low_need: AtomicU64,
}

/// Handle to the writer thread. Cloned into every request handler.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
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
    /// `location` says where to reopen the spool after a failure. A record holds at most
    /// `max_clicks_per_record` clicks and `max_record_bytes` (at most [`MAX_GROUP_BYTES`])
    /// of them, except that one request's clicks are never split.
    pub fn start(
        spool: Arc<Mutex<Spool>>,
        location: SpoolLocation,
        max_clicks_per_record: usize,
        max_record_bytes: usize,
        metrics: Arc<Metrics>,
        durable: watch::Sender<u64>,
        dir_lock: std::fs::File,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, mut rx) = mpsc::channel::<Request>(16_384);
        let health = Arc::new(Health {
            spool_dir: location.dir.clone(),
            min_free_bytes: location.opts.min_free_bytes,
            ..Health::default()
        });
        let h = health.clone();
        let m = metrics.clone();
        // Opened now, while the disk is fine; without it a failure needs a restart.
        let mut standby = match Spool::open(
            &location.standby_dir,
            SpoolOptions {
                segment_bytes: 4096,
                max_bytes: 4096,
                min_free_bytes: 0,
            },
        ) {
            Ok((s, _)) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the standby spool; a spool failure will need a restart");
                None
            }
        };
        let handle = std::thread::Builder::new()
            .name("adclick-spool-writer".into())
            .spawn(move || {
                // The data directory stays locked until the last write is done, even when
                // the runtime that started us is gone.
                let _dir_lock = dir_lock;
                let metrics = m;
                let max_group_bytes = max_record_bytes.clamp(1, MAX_GROUP_BYTES);
                let mut carry: Option<Request> = None;
                let mut backoff = REOPEN_BACKOFF_MIN;
                let mut next_attempt = Instant::now() + backoff;
                loop {
                    if h.failed.load(Ordering::Acquire) {
                        // Refuse what is queued, then try to recover (with backoff).
                        if let Some(r) = carry.take() {
                            let _ = r.done.send(Err(reopening()));
                        }
                        loop {
                            match rx.try_recv() {
                                Ok(r) => {
                                    let _ = r.done.send(Err(reopening()));
                                }
                                Err(mpsc::error::TryRecvError::Empty) => break,
                                Err(mpsc::error::TryRecvError::Disconnected) => return,
                            }
                        }
                        if Instant::now() < next_attempt {
                            std::thread::sleep(
                                next_attempt
                                    .saturating_duration_since(Instant::now())
                                    .min(Duration::from_millis(50)),
                            );
                            continue;
                        }
                        match reopen(&spool, &location, &mut standby, &metrics) {
                            Ok(()) => {
                                metrics
                                    .spool_reopens
                                    .get_or_create(&ResultLabel { result: "ok" })
                                    .inc();
                                tracing::warn!("spool reopened after a disk failure; accepting clicks again");
                                backoff = REOPEN_BACKOFF_MIN;
                                h.full_at_bytes.store(0, Ordering::Release);
                                h.failed.store(false, Ordering::Release);
                            }
                            Err(e) => {
                                metrics
                                    .spool_reopens
                                    .get_or_create(&ResultLabel { result: "error" })
                                    .inc();
                                tracing::warn!(error = %e, retry_in = ?backoff, "spool reopen failed");
                                backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
                            }
                        }
                        next_attempt = Instant::now() + backoff;
                        continue;
                    }
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
                            Ok(r) if bytes + r.encoded.len() > max_group_bytes => {
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
                    let result = commit(&spool, &group, &metrics, &h);
                    if let Ok(seq) = result {
                        durable.send_replace(seq);
                        metrics.commit_clicks.observe(clicks as f64);
                    }
                    if h.failed.load(Ordering::Acquire) {
                        backoff = REOPEN_BACKOFF_MIN;
                        next_attempt = Instant::now() + backoff;
                    }
                    for r in group {
                        let _ = r.done.send(result.clone());
                    }
                }
            })?;
        Ok((
            Committer {
                tx,
                health,
                metrics,
            },
            handle,
        ))
    }

    /// Makes `encoded` (concatenated `IngestBatch.clicks` entries) durable; returns the
    /// spool record seq once fsynced.
    pub async fn commit(&self, encoded: Vec<u8>, clicks: usize) -> Result<u64, CommitError> {
        if self.health.failed.load(Ordering::Acquire) {
            return Err(reopening());
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

    /// Asks the writer to drop and reopen the spool (recovery re-runs), as after a write
    /// failure: for a reader that found damage in a durable record, which recovery then
    /// isolates (the forwarder would otherwise retry the damaged seq forever).
    pub fn request_reopen(&self) {
        if !self.health.failed.swap(true, Ordering::AcqRel) {
            tracing::error!("spool damage found while reading: reopening the spool to recover it");
        }
        // Wake the writer if it is idle; an empty request commits nothing.
        let (done, _) = oneshot::channel();
        let _ = self.tx.try_send(Request {
            encoded: Vec::new(),
            clicks: 0,
            done,
        });
    }

    /// True while the spool is unusable after a write or fsync failure (until reopened).
    pub fn failed(&self) -> bool {
        self.health.failed.load(Ordering::Acquire)
    }

    /// Why the node cannot take writes now; empty when it can. Reasons: `spool_failed`
    /// (a write or fsync failed, the spool is being reopened), `spool_full` (the disk
    /// budget is used up: the aggregators are behind or unreachable for longer than the
    /// spool can hold), `disk_low` (the spool's filesystem is below
    /// `spool.min_free_bytes`). Lock-free: a readiness probe never waits for an fsync.
    pub fn not_ready_reasons(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.failed() {
            out.push("spool_failed");
        }
        let h = &self.health;
        let need = h
            .min_free_bytes
            .max(h.disk_low_need.load(Ordering::Acquire));
        if need > 0 && crate::spool::free_bytes(&h.spool_dir).is_some_and(|f| f < need) {
            out.push("disk_low");
        }
        let full_at = self.health.full_at_bytes.load(Ordering::Acquire);
        if full_at > 0 {
            let used = u64::try_from(self.metrics.spool_bytes.get()).unwrap_or(0);
            if used >= full_at {
                out.push("spool_full");
            } else {
                // The forwarder freed space since; the next append will fit.
                let _ = self.health.full_at_bytes.compare_exchange(
                    full_at,
                    0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        out
    }
}

fn reopening() -> CommitError {
    CommitError::Disk(
        "spool unavailable after a disk write failure; the collector is reopening it (retry later)"
            .into(),
    )
}

/// Proves the data directory takes writes again: writes and fsyncs a small file.
fn probe(dir: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = dir.join(PROBE_FILE);
    let result = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&[0u8; PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Drops the failed spool and opens it again (recovery runs), behind the shared mutex.
fn reopen(
    shared: &Mutex<Spool>,
    loc: &SpoolLocation,
    standby: &mut Option<Spool>,
    metrics: &Metrics,
) -> Result<(), String> {
    let data_dir = loc.dir.parent().unwrap_or(&loc.dir);
    probe(data_dir).map_err(|e| format!("data directory still refuses writes: {e}"))?;
    let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sb) = standby.take() {
        // The failed spool goes (releasing its directory lock); the standby holds its place.
        drop(std::mem::replace(&mut *guard, sb));
    }
    let (fresh, recovery) = Spool::open(&loc.dir, loc.opts).map_err(|e| e.to_string())?;
    crate::report_spool_damage(&loc.collector_id, &recovery, metrics);
    if let Err(e) = fresh.damage_reported() {
        tracing::warn!(error = %e, "cannot clear the spool's pending damage report; it will be repeated at the next start");
    }
    if fresh.incarnation() != loc.incarnation {
        return Err(format!(
            "the reopened spool has a new incarnation ({:016x}, was {:016x}): restart the \
             collector so that it forwards under its new collector id",
            fresh.incarnation(),
            loc.incarnation
        ));
    }
    tracing::info!(
        pending_records = recovery.records,
        truncated_bytes = recovery.truncated_bytes,
        "spool recovered after a disk failure"
    );
    *standby = Some(std::mem::replace(&mut *guard, fresh));
    metrics
        .spool_bytes
        .set(i64::try_from(guard.used_bytes()).unwrap_or(i64::MAX));
    metrics.spool_segments.set(guard.segment_count() as i64);
    Ok(())
}

fn commit(
    spool: &Mutex<Spool>,
    group: &[Request],
    metrics: &Metrics,
    health: &Health,
) -> Result<u64, CommitError> {
    if health.failed.load(Ordering::Acquire) {
        return Err(reopening());
    }
    let len = group.iter().map(|r| r.encoded.len()).sum();
    let mut payload = Vec::with_capacity(len);
    for r in group {
        payload.extend_from_slice(&r.encoded);
    }
    let mut spool = spool.lock().unwrap_or_else(|e| e.into_inner());
    let seq = spool.append(&payload).map_err(|e| match e {
        // Nothing was written for these: retryable, not a disk failure.
        SpoolError::Full { used, .. } => {
            health.full_at_bytes.store(used.max(1), Ordering::Release);
            metrics
                .spool_bytes
                .set(i64::try_from(used).unwrap_or(i64::MAX));
            CommitError::Full(e.to_string())
        }
        SpoolError::DiskLow { need, .. } => {
            health.disk_low_need.store(need, Ordering::Release);
            CommitError::Full(e.to_string())
        }
        SpoolError::RecordTooLarge { .. } => CommitError::Full(e.to_string()),
        other => {
            // A failed write may have left part of a record behind: stop writing; the
            // writer reopens the spool (recovery cuts it off) once the disk takes writes.
            health.failed.store(true, Ordering::Release);
            tracing::error!(error = %other, "spool write failed: refusing ingest until the spool is reopened");
            CommitError::Disk(other.to_string())
        }
    })?;
    let t = Instant::now();
    if let Err(e) = spool.sync() {
        health.failed.store(true, Ordering::Release);
        tracing::error!(error = %e, "spool fsync failed: refusing ingest until the spool is reopened");
        return Err(CommitError::Disk(e.to_string()));
    }
    health.full_at_bytes.store(0, Ordering::Release);
    health.disk_low_need.store(0, Ordering::Release);
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
