//! The ingest engine: one writer thread and N shard threads.
//!
//! Writer (in order): gather waiting batches (group commit) -> skip `(collector_id, seq)`
//! already acked (`admit`) -> append the new ones (their bytes as received) to the WAL and
//! record their delivery state in ONE durable commit -> read each click from the batch
//! bytes (`decode`) and run it through the window operator (dedup, watermark, hot keys,
//! routing) -> hand them to their shards -> ack once every shard has applied them and
//! published its top-N index (which never waits for a TopAds query). Shards
//! apply in the order they receive, so a replay of the WAL reproduces the same state.
//! When the watermark passes a minute, the shards are told to seal it (roll it up into its
//! hour and day).
//!
//! Checkpoint: the writer sends a barrier through every shard queue; each shard answers
//! with its serialised state as of that point; the writer stores them with its own state
//! and the WAL position in one commit, which also deletes the WAL up to that position.
//!
//! Recovery: load the checkpoint, then replay the WAL after it through the same path.
//!
//! Batches from the JetStream source (`source`) take the same path with a
//! [`StreamOrigin`]: their admission key is `(collector_id, partition)` ([`stream_key`]),
//! each must chain onto the last applied stream sequence of its partition
//! (`StreamOrigin::prev`), and the partition's new position commits with the WAL entries.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use adclick_proto::v1::IngestAck;
use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

use crate::admit::{Admission, Pending, Verdict};
use crate::clickindex::Lanes;
use crate::config::AggregatorConfig;
use crate::decode::{self, RawBatch};
use crate::health::{self, Readiness};
use crate::metrics::Metrics;
use crate::state::dedup::Dedup;
use crate::state::published::{TopOp, TopWriter};
use crate::state::shard::{Applied, LEVEL_MS, ShardState};
use crate::state::topset::ClickKeys;
use crate::state::windows::{ClickWindows, Routed};
use crate::store::cpfile::Staged;
use crate::store::{Checkpoint, Store, StoreError, WalEntry};
use crate::view::{QueryMeta, View};

/// An ingest request waiting for its ack.
#[derive(Debug)]
pub struct IngestReq {
    /// The batch, checked at the edge (`decode`).
    pub batch: RawBatch,
    /// Where the ack goes.
    pub done: oneshot::Sender<Result<IngestAck, IngestError>>,
    /// Set for a message read from the JetStream source.
    pub origin: Option<StreamOrigin>,
}

/// Where a batch of the JetStream source sits in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOrigin {
    /// Its partition (subject `<prefix>.<partition>`).
    pub partition: u32,
    /// Its stream sequence.
    pub stream_seq: u64,
    /// The stream sequence of the message of the same partition the consumer delivered
    /// before it (the position the consumer started after, for its first message). The
    /// writer admits the batch only if this is the partition's last applied position, so
    /// no message is ever skipped (a failed commit breaks the chain and the consumer
    /// restarts from the committed position) or applied twice.
    pub prev: u64,
}

/// The admission key of a batch of `collector_id` read from `partition`: a collector
/// publishes one message per (seq, partition), each with that partition's `acked_floor`,
/// so its delivery state is kept per partition, exactly as the gRPC path keeps it per
/// aggregator. `#` cannot collide with a gRPC sender in practice: a data dir is fed by one
/// source kind.
pub fn stream_key(collector_id: &str, partition: u32) -> String {
    format!("{collector_id}#p{partition}")
}

/// Last applied stream sequence per partition, as the writer last committed it (shared
/// with the source's consumers).
pub type StreamPositions = Arc<std::sync::Mutex<std::collections::HashMap<u32, u64>>>;

/// Why a batch was not acked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// `seq` is beyond the window above the collector's high-water mark (or above
    /// `ingest.max_first_seq` for a collector id not seen before). Nothing was written and
    /// the mark did not move; resending it will not help.
    #[error(
        "seq {seq} is out of the window for collector_id {collector_id:?}: at most {limit} \
         is accepted now (last acked seq {hwm}; ingest.max_seq_jump / ingest.max_first_seq)"
    )]
    SeqOutOfWindow {
        /// The sender.
        collector_id: String,
        /// What it sent.
        seq: u64,
        /// Its high-water mark (0: never seen).
        hwm: u64,
        /// The highest seq accepted now.
        limit: u64,
    },
    /// Storage failed or the engine is stopping: retry later.
    #[error("{0}")]
    Unavailable(String),
}

pub use crate::admit::seq_limit;

/// Checkpoint table of the invalid-traffic rules' state.
const RULES_TABLE: &str = "rules";

/// What one batch brings one shard.
#[derive(Debug, Default)]
struct ShardWork {
    /// Counted clicks (valid and invalid: the cells count all traffic).
    counted: Vec<Applied>,
    /// Invalid ones by reason index: those of `counted` classified invalid on arrival, and
    /// earlier clicks a rate rule moved (marked `late`: a correction of what was valid).
    invalid: Vec<(u8, Applied)>,
}
/// The writer's side of repairs and finalization (`crate::repair`), kept apart from the
/// ingest path.
mod repairs;

/// Checkpoint table: the seq of the last repair the checkpoint's state contains (u64 LE).
const REPAIRS_TABLE: &str = "repairs";

/// With `[reconcile] nightly`, minute cells of a day not finalized yet are kept past
/// `windows.retention_minutes`, but at most this much longer (a day whose nightly run keeps
/// failing or differing must not hold memory forever).
pub const MINUTE_HOLD_MAX_MS: i64 = 2 * 86_400_000;

enum ShardMsg {
    /// Clicks to apply; the sender (if any) is told when they are visible to queries.
    Apply(ShardWork, Option<SyncSender<()>>),
    Evict([i64; 3]),
    /// Roll minutes before this up into their hours and days (`ShardState::seal`).
    Seal(i64),
    /// A checkpoint: answer a copy of the state as of this point (encoded off this thread).
    Barrier(SyncSender<(Box<ShardState>, Duration)>),
    /// A repair (`crate::repair`): set these minute cells, rebuild the top-N index with
    /// these fields; answers each cell's clicks before.
    Repair(
        Vec<ShardFix>,
        Vec<crate::state::topset::IndexField>,
        SyncSender<Vec<u64>>,
    ),
    /// Test-only damage: (ad, minute, delta) (`test-hooks`).
    #[cfg(any(test, feature = "test-hooks"))]
    Damage(Vec<(u64, i64, i64)>, SyncSender<u32>),
}

/// One cell of a repair for one shard: (combination id, clicks, user entries) per
/// combination; empty on the shards that must drop their part of a split ad's cell.
#[derive(Debug, Clone)]
struct ShardFix {
    ad: u64,
    minute_ms: i64,
    combos: Vec<(u32, u32, Vec<u32>)>,
}

/// What the writer thread takes besides batches.
enum WriterMsg {
    Ingest(IngestReq),
    Control(Control),
}

/// Requests that go through the writer so they are ordered with the batches.
enum Control {
    Repair(
        crate::repair::RecordPb,
        oneshot::Sender<Result<crate::repair::Outcome, crate::repair::RepairError>>,
    ),
    RepairState(oneshot::Sender<crate::repair::State>),
    Finalize(
        i64,
        oneshot::Sender<Result<crate::repair::Outcome, crate::repair::RepairError>>,
    ),
    #[cfg(any(test, feature = "test-hooks"))]
    Damage(Vec<(u64, i64, i64)>, oneshot::Sender<u32>),
}

/// Handle to the running engine.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<WriterMsg>,
    positions: StreamPositions,
}

impl Engine {
    /// Queues a batch; resolves once it is durable (or refused).
    pub async fn ingest(&self, batch: RawBatch) -> Result<IngestAck, IngestError> {
        let stopping = || IngestError::Unavailable("aggregator is shutting down".into());
        let (done, rx) = oneshot::channel();
        self.tx
            .send(WriterMsg::Ingest(IngestReq {
                batch,
                done,
                origin: None,
            }))
            .await
            .map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())?
    }

    /// Queues a batch read from the JetStream source (waiting for room in the queue) and
    /// returns where its outcome will arrive, so a consumer can keep several in flight;
    /// batches queued by one task are judged in the order they were queued. `Err`: the
    /// engine has stopped.
    pub async fn submit_from_stream(
        &self,
        batch: RawBatch,
        origin: StreamOrigin,
    ) -> Result<oneshot::Receiver<Result<IngestAck, IngestError>>, IngestError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(WriterMsg::Ingest(IngestReq {
                batch,
                done,
                origin: Some(origin),
            }))
            .await
            .map_err(|_| IngestError::Unavailable("aggregator is shutting down".into()))?;
        Ok(rx)
    }

    /// Applies a repair (`crate::repair`) between two batches; resolves once it is durable
    /// and visible.
    pub async fn repair(
        &self,
        rec: crate::repair::RecordPb,
    ) -> Result<crate::repair::Outcome, crate::repair::RepairError> {
        use crate::repair::RepairError;
        let stopping = || RepairError::Unavailable("aggregator is shutting down".into());
        let (done, rx) = oneshot::channel();
        self.tx
            .send(WriterMsg::Control(Control::Repair(rec, done)))
            .await
            .map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())?
    }

    /// Marks the day starting at `day_ms` final (`crate::nightly`): recorded like a repair,
    /// after which its minute cells go once past the minute retention.
    pub async fn finalize_day(
        &self,
        day_ms: i64,
    ) -> Result<crate::repair::Outcome, crate::repair::RepairError> {
        use crate::repair::RepairError;
        let stopping = || RepairError::Unavailable("aggregator is shutting down".into());
        let (done, rx) = oneshot::channel();
        self.tx
            .send(WriterMsg::Control(Control::Finalize(day_ms, done)))
            .await
            .map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())?
    }

    /// Where the archive and the repairs stand.
    pub async fn repair_state(&self) -> Result<crate::repair::State, crate::repair::RepairError> {
        let (done, rx) = oneshot::channel();
        let stopping =
            || crate::repair::RepairError::Unavailable("aggregator is shutting down".into());
        self.tx
            .send(WriterMsg::Control(Control::RepairState(done)))
            .await
            .map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }

    /// Test-only damage (`test-hooks`): moves each (ad, minute) cell's first combination
    /// by delta clicks (and its hour and day when sealed), then takes a checkpoint so the
    /// damage is in the durable state as real damage would be. Returns the cells found.
    #[cfg(any(test, feature = "test-hooks"))]
    pub async fn damage_for_test(&self, cells: Vec<(u64, i64, i64)>) -> u32 {
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(WriterMsg::Control(Control::Damage(cells, done)))
            .await
            .is_err()
        {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Last applied stream sequence of `partition` (0: none): a consumer (re)starts after it.
    pub fn stream_position(&self, partition: u32) -> u64 {
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .copied()
            .unwrap_or(0)
    }
}

/// Threads to join at shutdown.
#[derive(Debug)]
pub struct Threads {
    /// The writer.
    pub writer: std::thread::JoinHandle<()>,
    /// The raw click archive's writer (`[archive]`), stopped after the writer.
    pub archive: Option<crate::archive::ArchiveThread>,
}

/// The apply path's side of the archive: the outcomes of the batches applied since they
/// were last recorded.
#[derive(Debug)]
struct ArchiveHook {
    builder: crate::archive::OutcomeBuilder,
    outcomes: Vec<(u64, Vec<u8>)>,
    signal: Arc<crate::archive::Signal>,
    /// The archive thread's counters (copied into the metrics by `publish`).
    stats: Option<Arc<adclick_archive::Stats>>,
}

/// What the checkpoint thread made of a snapshot: a file the store will point at, or (a
/// store without files) the encoded tables for [`Store::save_checkpoint`].
enum Encoded {
    File(Staged),
    Inline(Checkpoint),
}

/// The checkpoint thread's answer: what it made, its size, how long it took, and the
/// longest a shard stopped to copy its state.
type EncodedReply = (Result<Encoded, StoreError>, usize, Duration, Duration);

/// A checkpoint taken and not yet saved.
struct PendingCheckpoint {
    wal_pos: u64,
    /// The checkpoint thread encoding (and writing) the snapshot; its answer, once read.
    encoding: Receiver<EncodedReply>,
    encoded: Option<EncodedReply>,
    /// Its dedup floor (becomes the expiry point once it is committed).
    floor: i64,
    started: Instant,
    /// Time the writer spent building it (window tables, shard snapshots behind their
    /// barriers), ingest stopped meanwhile.
    build: std::time::Duration,
    /// The part of `build` spent on the window operator's tables (before the barriers).
    windows: std::time::Duration,
    /// The dedup flush that must be durable first (`Dedup::begin_flush`).
    dedup_ticket: u64,
}

struct Writer<S: Store> {
    store: S,
    windows: ClickWindows,
    shard_tx: Vec<SyncSender<ShardMsg>>,
    view: Arc<View>,
    metrics: Arc<Metrics>,
    admission: Admission,
    next_pos: u64,
    cfg: AggregatorConfig,
    last_checkpoint: Instant,
    last_evict: [i64; 3],
    /// Minute start the shards were last told to seal before.
    last_seal: i64,
    /// Dedup floor of the last committed checkpoint (see `state::dedup`).
    dedup_floor: i64,
    /// The dedup disk tier failed: stop acking; a restart replays the WAL.
    poisoned: bool,
    /// Last applied stream sequence per partition (committed, or passed over by
    /// redeliveries that needed no commit), mirrored for the consumers.
    positions: StreamPositions,
    /// The click index (`ip` / `user_id` filters): fed every counted click, flushed to disk
    /// before every checkpoint.
    index: Lanes,
    /// A checkpoint taken, waiting for the click index's segment up to its position and
    /// its dedup run (both written off this thread) before it is saved.
    pending: Option<PendingCheckpoint>,
    /// No segment for the click index's memory budget before this (set when one failed:
    /// the checkpoint's flush retries it, and a full disk is not hammered meanwhile).
    early_flush_after: Instant,
    /// Set when `[archive]` is on.
    archive: Option<ArchiveHook>,
    /// The invalid-traffic rules (`rules`): state checkpointed as table `rules`.
    rules: crate::rules::Rules,
    /// Clicks moved by a rate rule while applying the current click (reused buffer).
    moved: Vec<crate::rules::Moved>,
    /// Seq of the last repair applied (`crate::repair`).
    repair_seq: u64,
    /// Every repair id recorded -> its seq (idempotence by id).
    repair_ids: std::collections::HashMap<String, u64>,
    /// Days starting before this are finalized (`[reconcile]`); i64::MIN: none.
    finalized_before: i64,
}

/// Opens the store, recovers, and starts the threads.
pub fn start<S: Store + 'static>(
    store: S,
    cfg: AggregatorConfig,
    metrics: Arc<Metrics>,
) -> Result<(Engine, Arc<View>, Threads), StoreError> {
    let n = cfg.shards.count.max(1);
    let cp = store.load_checkpoint()?.unwrap_or_default();
    // Exact dedup: bounded RAM tier + Bloom filter over a disk tier in the same store.
    let dedup = Dedup::new(cfg.dedup.memory_bytes, store.dedup_table()?);
    let mut windows = ClickWindows::with_dedup(cfg.windows.clone(), &cfg.shards, dedup);
    windows.restore(&cp.tables).map_err(StoreError)?;
    windows
        .rebuild_dedup_bloom()
        .map_err(|e| StoreError(e.to_string()))?;
    // Dedup ids below the floor of the checkpoint we start from may be deleted from disk:
    // no recovery ever starts below it again.
    let dedup_floor = windows.dedup_floor_ms();
    let mut shards = Vec::with_capacity(n);
    let mut tops = Vec::with_capacity(n);
    let mut top_writers = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("shard/{i}");
        let s = match cp.tables.iter().find(|(t, _)| *t == name) {
            Some((_, b)) => {
                ShardState::from_bytes(b, &mut |k| windows.intern_combo(k)).map_err(StoreError)?
            }
            None => ShardState::default(),
        };
        let (writer, published) = TopWriter::new(s.top_set(
            windows.combos().keys(),
            windows.owners(),
            &cfg.shards.top_index_fields,
        ));
        top_writers.push(writer);
        tops.push(published);
        shards.push(RwLock::new(s));
    }
    // The click index keeps what was counted up to the checkpoint; the replay below adds
    // the rest (segments written for a checkpoint that never committed are dropped).
    let index_dir = cfg.data_dir.join(crate::clickindex::DIR);
    // On a data dir counted before the index existed, it is complete only from the first
    // minute no earlier click can be in: after the clock and the newest event time seen.
    let newest_event = windows
        .watermark_ms()
        .saturating_add(cfg.windows.allowed_delay_ms);
    let floor = || {
        let t = crate::view::now_ms().max(newest_event);
        (t.div_euclid(60_000) + 1).saturating_mul(60_000)
    };
    let since = |dir: &std::path::Path| {
        crate::clickindex::complete_since(dir, cp.wal_pos, floor)
            .map_err(|e| StoreError(e.to_string()))
    };
    // The invalid lane came later than the index: an index answers `traffic` from where
    // both lanes are complete.
    let click_index_since_ms =
        since(&index_dir)?.max(since(&index_dir.join(crate::clickindex::INVALID_DIR))?);
    let (mut index, clicks, invalid_clicks) =
        Lanes::open(&index_dir, cp.wal_pos).map_err(|e| StoreError(e.to_string()))?;
    // One masker for the index and the archive: one salt per day, however they race.
    let ips = Arc::new(crate::privacy::IpMasker::new(
        &cfg.data_dir,
        cfg.privacy.ip_storage,
    ));
    index.set_ip_storage(ips.clone());
    let view = Arc::new(View {
        clicks,
        invalid_clicks,
        click_index_since_ms,
        shards,
        tops,
        watermark_ms: AtomicI64::new(windows.watermark_ms()),
        meta: ArcSwap::from_pointee(QueryMeta::default()),
        owners: RwLock::new(windows.owners().clone()),
        killed: std::sync::atomic::AtomicBool::new(false),
        ready: Readiness::default(),
    });
    let mut shard_tx = Vec::with_capacity(n);
    for (i, top) in top_writers.into_iter().enumerate() {
        let (tx, rx) = sync_channel::<ShardMsg>(1024);
        let v = view.clone();
        std::thread::Builder::new()
            .name(format!("adclick-shard-{i}"))
            .spawn(move || shard_loop(i, rx, v, top))
            .map_err(|e| StoreError(e.to_string()))?;
        shard_tx.push(tx);
    }
    let admission = Admission::new(store.delivery_states()?);
    let positions: StreamPositions = Arc::new(std::sync::Mutex::new(store.stream_positions()?));
    let next_pos = store.last_wal_pos()? + 1;
    // The archive: its state must exist before the first checkpoint of this run, or that
    // checkpoint would delete WAL entries it has not read.
    let mut archive_start = None;
    match store.archive_log() {
        Some(log) if cfg.archive.enabled => {
            if log.load_state()?.is_none() {
                log.save_state(&adclick_archive::State {
                    covered: cp.wal_pos,
                    next_seq: 0,
                    pending: None,
                })?;
                tracing::info!(
                    from = cp.wal_pos,
                    "archive: starting at the checkpoint's WAL position"
                );
            }
            archive_start = Some(log);
        }
        None if cfg.archive.enabled => {
            return Err(StoreError("this store cannot feed the archive".into()));
        }
        Some(log) if log.clear()? => {
            tracing::warn!(
                "archive turned off: its state is deleted and the WAL is no longer kept for it; turning it on again starts a new archive at that point (what is ingested meanwhile is not archived)"
            );
        }
        Some(_) | None => {}
    }
    let signal = Arc::new(crate::archive::Signal::default());
    let mut rules = crate::rules::Rules::new(&cfg.rules).map_err(|e| StoreError(e.to_string()))?;
    if let Some((_, b)) = cp.tables.iter().find(|(t, _)| t == RULES_TABLE) {
        let combos = windows.combos().keys();
        let dims = |id: u32| {
            (id as usize)
                .checked_sub(1)
                .and_then(|i| combos.get(i))
                .copied()
                .unwrap_or_default()
        };
        let was = rules.restore(b, &dims).map_err(StoreError)?;
        if was != rules.version() {
            tracing::warn!(
                checkpoint_version = %was,
                version = %rules.version(),
                "invalid-traffic rules changed since the checkpoint: clicks from here on are classified by the new rules"
            );
        }
    }
    tracing::info!(version = %rules.version(), enabled = cfg.rules.enabled, "invalid-traffic rules");
    metrics
        .rules_info
        .get_or_create(&crate::metrics::VersionLabel {
            version: rules.version().to_string(),
        })
        .set(1);
    // Every reason exported from the start (at 0): rates and the spike alert need a series.
    for r in crate::rules::Reason::ALL {
        let label = crate::metrics::ReasonLabel { reason: r.label() };
        let _ = metrics.invalid_clicks.get_or_create(&label);
        let _ = metrics.invalid_moved.get_or_create(&label);
    }
    let mut w = Writer {
        store,
        windows,
        shard_tx,
        view: view.clone(),
        metrics,
        admission,
        next_pos,
        cfg,
        last_checkpoint: Instant::now(),
        early_flush_after: Instant::now(),
        last_evict: [i64::MIN; 3],
        last_seal: i64::MIN,
        dedup_floor,
        poisoned: false,
        positions: positions.clone(),
        index,
        pending: None,
        archive: archive_start.as_ref().map(|_| ArchiveHook {
            builder: crate::archive::OutcomeBuilder::default(),
            outcomes: Vec::new(),
            signal: signal.clone(),
            stats: None,
        }),
        rules,
        moved: Vec::new(),
        repair_seq: 0,
        repair_ids: std::collections::HashMap::new(),
        finalized_before: i64::MIN,
    };
    // Repairs: every id ever recorded; those after the checkpoint's are applied again at
    // their WAL position during the replay below.
    let mut repairs = std::collections::VecDeque::new();
    {
        use prost::Message;
        let blob = cp
            .tables
            .iter()
            .find(|(t, _)| t == REPAIRS_TABLE)
            .map(|(_, b)| b.as_slice())
            .unwrap_or_default();
        let done = blob
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes);
        w.finalized_before = blob
            .get(8..16)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(i64::MIN, i64::from_le_bytes);
        for (seq, bytes) in w.store.repairs()? {
            let rec = crate::repair::RecordPb::decode(bytes.as_slice())
                .map_err(|e| StoreError(format!("repair {seq}: {e}")))?;
            w.repair_ids.insert(rec.id.clone(), seq);
            if seq > done {
                repairs.push_back(rec);
            }
        }
        w.repair_seq = done;
    }
    // Replay what the WAL holds after the checkpoint.
    let replay = w.store.wal_after(cp.wal_pos)?;
    let replayed = replay.len();
    for (pos, bytes) in replay {
        while repairs.front().is_some_and(|r| r.at_wal_pos < pos) {
            if let Some(r) = repairs.pop_front() {
                w.apply_repair(&r);
            }
        }
        // Checked at the edge before it was written, and redb checksums its pages: a
        // failure here is damage, and the entry is skipped whole.
        if let Err(e) = decode::check_batch(&bytes) {
            tracing::error!(pos, error = %e, "undecodable WAL entry skipped");
            if let Some(a) = &mut w.archive {
                a.outcomes
                    .push((pos, crate::archive::OUTCOME_UNDECODABLE.to_vec()));
            }
            continue;
        }
        w.windows.begin_batch(pos);
        w.apply(pos, &bytes, None);
        if let Some(e) = w.windows.take_error() {
            return Err(StoreError(e.to_string()));
        }
    }
    for r in repairs {
        w.apply_repair(&r);
    }
    w.record_outcomes()?;
    // Every replayed click applied (and published) before the first request: a batch
    // resent after the crash is acked as already acked at once, so its clicks must be
    // visible by then.
    for tx in &w.shard_tx {
        let (done, applied) = sync_channel(1);
        if tx
            .send(ShardMsg::Apply(ShardWork::default(), Some(done)))
            .is_ok()
        {
            let _ = applied.recv();
        }
    }
    w.publish();
    tracing::info!(
        checkpoint_pos = cp.wal_pos,
        replayed,
        "aggregator state recovered"
    );
    let archive = match archive_start {
        Some(log) => Some(
            crate::archive::spawn(
                &w.cfg.archive,
                &w.cfg.data_dir,
                log,
                signal,
                cp.wal_pos,
                ips,
            )
            .map_err(|e| StoreError(e.to_string()))?,
        ),
        None => None,
    };
    if let (Some(h), Some(t)) = (&mut w.archive, &archive) {
        h.stats = Some(t.stats.clone());
    }
    let (tx, rx) = mpsc::channel::<WriterMsg>(4096);
    let writer = std::thread::Builder::new()
        .name("adclick-agg-writer".into())
        .spawn(move || w.run(rx))
        .map_err(|e| StoreError(e.to_string()))?;
    Ok((Engine { tx, positions }, view, Threads { writer, archive }))
}

/// Counted clicks a shard thread applies, from batches already queued, before it publishes
/// its top-N index and confirms them (`shard_loop`). A publish groups and sums each run of
/// adds once (`state::published`), so a longer run sums more repeats of an ad (Zipf
/// traffic), and each publish's copy cost is shared by more clicks: one publish per ~20k
/// clicks instead of per 5k-click batch cut the apply cost per click by ~7% (`adclick
/// bench aggregator --batch`, BENCHMARKS.md). A run is at most the shard's
/// share of one writer group (up to 64 WAL batches: the writer waits for a group's
/// confirmations before sending the next), so it reaches the cap only under load with
/// large batches. With an empty queue each batch is published at once, as before.
pub const PUBLISH_EVERY_CLICKS: usize = 20_000;

fn shard_loop(i: usize, rx: Receiver<ShardMsg>, view: Arc<View>, mut top: TopWriter) {
    let minute = |t: i64| t.div_euclid(LEVEL_MS[0]);
    // Applied, neither published nor confirmed yet: their confirmations and clicks.
    let mut unconfirmed: Vec<SyncSender<()>> = Vec::new();
    let mut unpublished = 0usize;
    let mut holding = false;
    loop {
        let msg = if holding {
            // Batches already queued join the run; an empty queue ends it.
            match rx.try_recv() {
                Ok(m) => m,
                Err(_) => {
                    top.publish(&view.tops[i]);
                    for d in unconfirmed.drain(..) {
                        let _ = d.send(());
                    }
                    (unpublished, holding) = (0, false);
                    continue;
                }
            }
        } else {
            match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            }
        };
        match msg {
            ShardMsg::Apply(work, confirm) => {
                let clicks = work.counted;
                {
                    // One lock for both: a query never sees a click counted but not yet
                    // classified.
                    let mut s = view.shards[i].write().unwrap_or_else(|e| e.into_inner());
                    s.apply_all(&clicks);
                    for (reason, a) in &work.invalid {
                        s.apply_invalid(usize::from(*reason), a);
                    }
                }
                for a in &clicks {
                    top.push(TopOp::Add {
                        ad: a.ad,
                        minute: minute(a.event_time_ms),
                        by: 1,
                        keys: ClickKeys {
                            dims: a.dims,
                            advertiser: a.advertiser,
                            campaign: a.campaign,
                        },
                    });
                }
                unconfirmed.extend(confirm);
                unpublished += clicks.len();
                if unpublished < PUBLISH_EVERY_CLICKS {
                    holding = true;
                    continue;
                }
            }
            ShardMsg::Seal(before) => {
                let t = Instant::now();
                let mut s = view.shards[i].write().unwrap_or_else(|e| e.into_inner());
                s.seal(before);
                drop(s);
                // The shard's queries and applies wait for it (a freshness stop).
                tracing::debug!(
                    shard = i,
                    before_ms = before,
                    ms = t.elapsed().as_millis() as u64,
                    "minutes sealed into their hours"
                );
                top.push(TopOp::Seal(minute(before)));
            }
            ShardMsg::Evict(before) => {
                let mut s = view.shards[i].write().unwrap_or_else(|e| e.into_inner());
                for (level, b) in before.iter().enumerate() {
                    s.evict(level, *b);
                }
                top.push(TopOp::Evict(minute(before[0])));
            }
            ShardMsg::Barrier(reply) => {
                let t = Instant::now();
                let s = view.shards[i].read().unwrap_or_else(|e| e.into_inner());
                let copy = Box::new(s.clone());
                drop(s);
                // Applies wait for it (queries do not: a read lock).
                tracing::debug!(
                    shard = i,
                    ms = t.elapsed().as_millis() as u64,
                    "shard state copied for a checkpoint"
                );
                let _ = reply.send((copy, t.elapsed()));
            }
            ShardMsg::Repair(fixes, fields, reply) => {
                // One write lock for every cell: a query of this shard sees all of the
                // repair or none of it. The top-N index is rebuilt from the cells (a repair
                // may lower counts, which the incremental index cannot) and swapped whole.
                // Owners before the shard, the order queries take them in.
                let meta = view.meta.load();
                let owners = view.owners.read().unwrap_or_else(|e| e.into_inner());
                let mut s = view.shards[i].write().unwrap_or_else(|e| e.into_inner());
                let before: Vec<u64> = fixes
                    .iter()
                    .map(|f| s.set_minute(f.ad, f.minute_ms, &f.combos))
                    .collect();
                let index = s.top_set(&meta.combos, &owners, &fields);
                drop(owners);
                drop(s);
                // No guard of the shared metadata is held while the index is swapped.
                drop(meta);
                top.reset(index, &view.tops[i]);
                let _ = reply.send(before);
            }
            #[cfg(any(test, feature = "test-hooks"))]
            ShardMsg::Damage(cells, reply) => {
                let mut s = view.shards[i].write().unwrap_or_else(|e| e.into_inner());
                let found = cells
                    .iter()
                    .filter(|(ad, m, d)| s.damage_for_test(*ad, *m, *d))
                    .count();
                let _ = reply.send(u32::try_from(found).unwrap_or(u32::MAX));
            }
        }
        // Publish before confirming: an acked click is in TopAds at once. Publishing
        // never waits for readers (`TopWriter::publish`).
        top.publish(&view.tops[i]);
        for d in unconfirmed.drain(..) {
            let _ = d.send(());
        }
        (unpublished, holding) = (0, false);
    }
}

/// A click-index segment still being written when the writer stops (a simulated crash in
/// tests: `Aggregator::kill`) is waited for before the store is released: otherwise a new
/// instance on the same data dir could start, delete the segments past its checkpoint, and
/// then meet that file appear (kept by a later start once a checkpoint passes it: the
/// replayed clicks indexed twice). A real crash stops the flusher with the process.
impl<S: Store> Drop for Writer<S> {
    fn drop(&mut self) {
        let _ = self.index.finish_flush(true);
    }
}

impl<S: Store> Writer<S> {
    fn run(mut self, rx: mpsc::Receiver<WriterMsg>) {
        self.serve(rx);
        // A checkpoint thread still writing ends before the store is released (its file is
        // unreferenced, and deleted by the next open).
        if let Some(p) = self.pending.take()
            && p.encoded.is_none()
        {
            let _ = p.encoding.recv();
        }
        // The dedup spill thread writes beside the store: it ends before the store is
        // released (a restart in this process must not meet a half-written run).
        let _ = self.windows.wait_dedup();
    }

    fn serve(&mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        /// How often an idle writer looks for the end of a checkpoint's encoding.
        const IDLE_SAVE_POLL: Duration = Duration::from_millis(5);
        // The writer is a thread of its own: a one-thread runtime gives its wait a timeout
        // (without one it waits as before, saving a checkpoint at the next batch).
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .inspect_err(|e| tracing::warn!(error = %e, "writer timer unavailable; an idle writer saves its checkpoint at the next batch"))
            .ok();
        let max_group = 64;
        let tick = Duration::from_millis(self.cfg.checkpoint.interval_ms.max(10));
        loop {
            let next = match &timer {
                // A checkpoint is being encoded: while no batch comes, look for its end
                // every few ms and save it then, rather than at the next batch (an idle
                // aggregator would otherwise keep its last checkpoint unsaved, and its WAL
                // untrimmed, until traffic resumes). A batch still wakes it at once.
                // (Not after a simulated crash: `kill` leaves the disk as the last commit
                // left it.)
                Some(rt) if self.pending.is_some() && !self.view.killed.load(Ordering::Acquire) => {
                    match rt
                        .block_on(async { tokio::time::timeout(IDLE_SAVE_POLL, rx.recv()).await })
                    {
                        Ok(m) => m,
                        Err(_) => {
                            self.save_checkpoint(false);
                            continue;
                        }
                    }
                }
                _ => rx.blocking_recv(),
            };
            let (mut group, mut control) = match next {
                Some(WriterMsg::Ingest(r)) => (vec![r], None),
                Some(WriterMsg::Control(c)) => (Vec::new(), Some(c)),
                None => break,
            };
            // A control request ends the group: it is ordered after the batches before it.
            while control.is_none() && group.len() < max_group {
                match rx.try_recv() {
                    Ok(WriterMsg::Ingest(r)) => group.push(r),
                    Ok(WriterMsg::Control(c)) => control = Some(c),
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.handle_group(group);
            }
            if let Some(c) = control
                && !self.poisoned
            {
                self.control(c);
            }
            if self.poisoned {
                // Like a crash: no checkpoint of a state that may have missed a dedup
                // lookup; every later request is refused (channel closed) until restart.
                return;
            }
            self.save_checkpoint(false);
            // A checkpoint due takes the chunks in its own segment: no early one is started
            // then, or back-to-back early segments under load could put it off forever.
            let due = self.last_checkpoint.elapsed() >= tick;
            self.flush_index_early(false, due);
            if due {
                self.checkpoint(false);
            }
        }
        // Shutdown: one last checkpoint makes the next start fast (not after a simulated
        // crash, which must leave the disk as a crash would).
        if !self.view.killed.load(Ordering::Acquire) {
            self.save_checkpoint(true);
            self.flush_index_early(true, true);
            self.checkpoint(true);
            self.save_checkpoint(true);
        }
    }

    fn handle_group(&mut self, group: Vec<IngestReq>) {
        let started = Instant::now();
        let mut pending = Pending::default();
        let mut fresh = Vec::new();
        let mut replies = Vec::with_capacity(group.len());
        // Stream positions this group moves (partition -> stream seq), committed with it.
        let mut moved: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        for req in group {
            let b = &req.batch;
            let key = match req.origin {
                None => b.collector_id.clone(),
                Some(o) => {
                    let last = moved
                        .get(&o.partition)
                        .copied()
                        .unwrap_or_else(|| self.stream_position(o.partition));
                    if o.prev != last {
                        // The consumer is not where the committed state is (a commit of
                        // an earlier message failed, or it restarted): it must restart
                        // after `last`. Nothing moves.
                        let _ = req.done.send(Err(IngestError::Unavailable(format!(
                            "partition {}: stream seq {} follows {}, but the last applied is {last}; restart the consumer after it",
                            o.partition, o.stream_seq, o.prev
                        ))));
                        continue;
                    }
                    moved.insert(o.partition, o.stream_seq);
                    stream_key(&b.collector_id, o.partition)
                }
            };
            let new = match self.admission.judge(
                &mut pending,
                &key,
                b.seq,
                b.acked_floor,
                &self.cfg.ingest,
            ) {
                Verdict::New => true,
                Verdict::AlreadyAcked => false,
                Verdict::Refused(err, reason) => {
                    // Refused before the WAL: the state stays where it was, so the
                    // collector's real next batch still gets through. A stream message
                    // cannot be sent again in another order: its position moves past it
                    // (it is skipped, logged with its stream seq and counted).
                    match req.origin {
                        Some(o) => {
                            tracing::error!(collector_id = %b.collector_id, seq = b.seq, partition = o.partition, stream_seq = o.stream_seq, error = %err, "stream message refused and skipped")
                        }
                        None => {
                            tracing::warn!(collector_id = %b.collector_id, seq = b.seq, error = %err, "ingest refused")
                        }
                    }
                    self.metrics.refuse_ingest(reason);
                    let _ = req.done.send(Err(err));
                    continue;
                }
            };
            if new {
                fresh.push(WalEntry {
                    pos: self.next_pos + fresh.len() as u64,
                    collector_id: key,
                    seq: b.seq,
                    acked_floor: b.acked_floor,
                    batch: b.bytes.to_vec(),
                });
            }
            replies.push((req, new));
        }
        let moved: Vec<(u32, u64)> = moved.into_iter().collect();
        if !fresh.is_empty() {
            if let Err(e) = self.store.append_at(&fresh, &moved) {
                tracing::error!(error = %e, "WAL append failed; batches not acked");
                self.metrics.wal_errors.inc();
                self.set_wal_failed(true);
                for (req, _) in replies {
                    let _ = req.done.send(Err(IngestError::Unavailable(format!(
                        "aggregator storage failure: {e}"
                    ))));
                }
                return;
            }
            self.set_wal_failed(false);
            self.next_pos += fresh.len() as u64;
            self.admission.commit(pending);
            self.set_positions(&moved);
            self.metrics
                .wal_commit_seconds
                .observe(started.elapsed().as_secs_f64());
        } else {
            // Only redeliveries (or refusals): nothing to commit, their admission state is
            // already durable. A restart reads them again and judges them the same.
            self.set_positions(&moved);
        }
        // Apply every new batch, wait until the shards have made it visible, then ack: an
        // acked click is both durable and queryable.
        let (applied_tx, applied_rx) =
            sync_channel::<()>(self.shard_tx.len() * replies.len().max(1));
        let mut outcomes = Vec::with_capacity(replies.len());
        let mut pending_shards = 0;
        // WAL positions of the new batches, in order (they order the dedup entries).
        let mut positions = fresh.iter().map(|f| f.pos);
        for (req, new) in &mut replies.iter_mut() {
            let counts = if *new {
                let pos = positions.next().unwrap_or(0);
                self.windows.begin_batch(pos);
                let (a, d, n) = self.apply(pos, &req.batch.bytes, Some(&applied_tx));
                pending_shards += n;
                Some((a, d))
            } else {
                None
            };
            outcomes.push(counts);
        }
        for _ in 0..pending_shards {
            let _ = applied_rx.recv();
        }
        if let Some(e) = self.windows.take_error() {
            // The batches are in the WAL; a restart replays them. Until then nothing is
            // acked (the collectors keep them spooled and retry).
            tracing::error!(error = %e, "dedup disk tier failed; refusing ingest until restart");
            self.metrics.dedup_errors.inc();
            self.poisoned = true;
            self.view.ready.set(health::DEDUP_FAILED, true);
            self.metrics.ready.set(0);
            for (req, _) in replies {
                let _ = req.done.send(Err(IngestError::Unavailable(format!(
                    "aggregator storage failure: {e}"
                ))));
            }
            return;
        }
        if let Err(e) = self.record_outcomes() {
            // The batches are applied but the archive could not learn what became of
            // them: like a dedup failure, stop (no checkpoint may pass them); a restart
            // replays them and records their outcomes again.
            tracing::error!(error = %e, "recording archive outcomes failed; refusing ingest until restart");
            self.metrics.wal_errors.inc();
            self.poisoned = true;
            self.view.ready.set(health::WAL_WRITE_FAILED, true);
            self.metrics.ready.set(0);
            for (req, _) in replies {
                let _ = req.done.send(Err(IngestError::Unavailable(format!(
                    "aggregator storage failure: {e}"
                ))));
            }
            return;
        }
        self.publish();
        for ((req, new), counts) in replies.into_iter().zip(outcomes) {
            let mut ack = IngestAck {
                collector_id: req.batch.collector_id.clone(),
                seq: req.batch.seq,
                already_acked: !new,
                ..Default::default()
            };
            if let Some((accepted, duplicate)) = counts {
                ack.accepted = accepted;
                ack.duplicate = duplicate;
            } else {
                self.metrics.redeliveries.inc();
            }
            // `accepted` and `duplicate` are ADVISORY: they describe what this delivery
            // applied. A redelivery (`already_acked`) reports 0 and 0 even when the first
            // delivery applied clicks, so under concurrent replays of one seq the counts
            // land on whichever delivery the writer saw first, whose ack the collector may
            // never receive. Nothing accounts with them (collectors read `hot_ad_ids`);
            // counts come from queries and `adclick_aggregator_clicks`.
            ack.hot_ad_ids = self.windows.hot_ads().to_vec();
            let _ = req.done.send(Ok(ack));
        }
    }

    fn stream_position(&self, partition: u32) -> u64 {
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .copied()
            .unwrap_or(0)
    }

    fn set_positions(&self, moved: &[(u32, u64)]) {
        if moved.is_empty() {
            return;
        }
        let mut p = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        for (partition, seq) in moved {
            p.insert(*partition, *seq);
        }
    }

    /// Not ready while WAL commits fail (`/readyz`, gRPC health); ready again after the next
    /// successful one.
    fn set_wal_failed(&self, failed: bool) {
        self.view.ready.set(health::WAL_WRITE_FAILED, failed);
        self.metrics
            .ready
            .set(i64::from(self.view.ready.is_ready()));
    }

    /// Records the outcomes of the batches applied since the last call (archive on), and
    /// wakes the archive thread.
    fn record_outcomes(&mut self) -> Result<(), StoreError> {
        let Some(a) = &mut self.archive else {
            return Ok(());
        };
        if a.outcomes.is_empty() {
            return Ok(());
        }
        self.store.record_outcomes(&a.outcomes)?;
        let last = a.outcomes.last().map_or(0, |o| o.0);
        a.outcomes.clear();
        a.signal.notify(last);
        Ok(())
    }

    /// Runs clicks through the window operator and hands them to the shards. Returns
    /// (accepted, duplicates, shards that will confirm on `done`). `pos`: the batch's WAL
    /// position (its outcomes are recorded for the archive under it).
    fn apply(
        &mut self,
        pos: u64,
        batch: &[u8],
        done: Option<&SyncSender<()>>,
    ) -> (u32, u32, usize) {
        use adclick_archive::Status;
        if let Some(a) = &mut self.archive {
            // Every classification is recorded with the rules version it was made under.
            let version = self.rules.enabled().then(|| self.rules.version());
            a.builder.begin(version);
        }
        let mut index = 0u32;
        let rules_before = self.rules.counters;
        let (mut accepted, mut duplicate) = (0u32, 0u32);
        let before = self.windows.counters;
        let mut quarantined = Vec::new();
        // Sized for the batch (its clicks over the shards, plus slack for uneven routing),
        // so that handing the batch over does not regrow and copy the vectors.
        let shards = self.shard_tx.len();
        let n = decode::count_clicks(batch);
        let mut per_shard: Vec<ShardWork> = (0..shards)
            .map(|_| ShardWork {
                counted: Vec::with_capacity(n / shards + n / 8 + 16),
                invalid: Vec::new(),
            })
            .collect();
        // Decoded a chunk at a time: the window operator warms its lookups for a chunk's
        // clicks, then processes them while the chunk is still cached.
        let mut chunks = decode::ClickChunks::new(batch);
        while let Some(chunk) = chunks.next_chunk() {
            self.windows.warm(chunk);
            for c in chunk {
                let (ad, event, id) = (c.ad_id, c.event_time_ms, c.impression_id);
                let (ip, user) = (c.client_ip, c.user_id);
                let late_before = self.windows.counters.late;
                let status = match self.windows.process(c) {
                    Routed::Apply(shard, a) => {
                        accepted += 1;
                        // Counted (after dedup, late ones too): indexed, exactly once.
                        self.index
                            .all
                            .push(a.ad, a.event_time_ms, a.combo, ip, user);
                        // The rules stage: classify, and move earlier clicks a rate rule
                        // now finds invalid.
                        let origin = crate::rules::Origin { pos, index };
                        let verdict = self.rules.judge(c, origin, shard, &a, &mut self.moved);
                        if let Some(r) = verdict {
                            per_shard[shard].invalid.push((r as u8, a));
                            self.index
                                .invalid
                                .push(a.ad, a.event_time_ms, a.combo, ip, user);
                        }
                        for m in self.moved.drain(..) {
                            let (c, u) = (m.click, self.rules.moved_user(&m));
                            let ip = &m.ip[..usize::from(m.ip_len)];
                            self.index
                                .invalid
                                .push(c.ad, c.event_time_ms, c.combo, ip, u);
                            if let Some(ar) = &mut self.archive {
                                ar.builder.push_move(&crate::archive::move_record(&m));
                            }
                            let mut click = m.click;
                            click.late = true;
                            if let Some(w) = per_shard.get_mut(m.shard) {
                                w.invalid.push((m.reason as u8, click));
                            }
                        }
                        per_shard[shard].counted.push(a);
                        if let Some(r) = verdict {
                            // The archive's code per reason (issue 16).
                            use crate::rules::Reason;
                            match r {
                                Reason::BotUserAgent => Status::InvalidBotUserAgent,
                                Reason::DatacenterIp => Status::InvalidDatacenterIp,
                                Reason::Honeypot => Status::InvalidHoneypot,
                                Reason::ImpossibleTime => Status::InvalidImpossibleTime,
                                Reason::TooFast => Status::InvalidTooFast,
                                Reason::IpRate => Status::InvalidIpRate,
                                Reason::UserRate => Status::InvalidUserRate,
                            }
                        } else if self.windows.counters.late > late_before {
                            Status::CountedLate
                        } else {
                            Status::Counted
                        }
                    }
                    Routed::Duplicate => {
                        duplicate += 1;
                        Status::Duplicate
                    }
                    // Reported by the caller through `take_error` (nothing is acked, and the
                    // outcomes are not recorded).
                    Routed::Unavailable => Status::Counted,
                    Routed::TooOld => {
                        quarantined.push((ad, event, id, "older than windows.retention_minutes"));
                        Status::TooOld
                    }
                    Routed::Malformed => {
                        quarantined.push((
                            ad,
                            event,
                            id,
                            "malformed: impression id or implausible event time",
                        ));
                        Status::Malformed
                    }
                    Routed::OwnerMismatch => {
                        quarantined.push((
                            ad,
                            event,
                            id,
                            "ad belongs to another advertiser/campaign",
                        ));
                        Status::OwnerMismatch
                    }
                };
                if let Some(a) = &mut self.archive {
                    a.builder.push(index, status);
                }
                index = index.saturating_add(1);
            }
        }
        if let Some(e) = chunks.damage() {
            // Checked at the edge before it was written: only damage gets here.
            tracing::error!(error = %e, "undecodable click in a WAL entry: the rest of the entry is skipped");
        }
        if let Some(a) = &mut self.archive {
            let o = a.builder.finish();
            a.outcomes.push((pos, o));
        }
        self.index.end_batch();
        if !quarantined.is_empty() {
            self.quarantine(&quarantined);
        }
        let after = self.windows.counters;
        let m = &self.metrics;
        m.add_clicks("applied", after.applied - before.applied);
        m.add_clicks("late", after.late - before.late);
        m.add_clicks("duplicate", after.duplicate - before.duplicate);
        m.add_clicks("too_old", after.too_old - before.too_old);
        m.add_clicks("malformed", after.malformed - before.malformed);
        m.add_clicks(
            "owner_mismatch",
            after.owner_mismatch - before.owner_mismatch,
        );
        if after.too_old > before.too_old {
            tracing::warn!(
                count = after.too_old - before.too_old,
                reason = "older than retention_minutes",
                "clicks quarantined (not counted)"
            );
        }
        let rc = self.rules.counters;
        for r in crate::rules::Reason::ALL {
            let i = r.index();
            let label = crate::metrics::ReasonLabel { reason: r.label() };
            let n = rc.invalid[i] - rules_before.invalid[i];
            if n > 0 {
                m.invalid_clicks.get_or_create(&label).inc_by(n);
            }
            let n = rc.moved[i] - rules_before.moved[i];
            if n > 0 {
                m.invalid_moved.get_or_create(&label).inc_by(n);
            }
        }
        self.rules.expire(self.windows.watermark_ms());
        let mut confirming = 0;
        for (i, clicks) in per_shard.into_iter().enumerate() {
            if clicks.counted.is_empty() && clicks.invalid.is_empty() {
                continue;
            }
            let sent = self.shard_tx[i].send(ShardMsg::Apply(clicks, done.cloned()));
            if sent.is_ok() && done.is_some() {
                confirming += 1;
            }
        }
        self.evict_if_due();
        (accepted, duplicate, confirming)
    }

    /// Appends clicks that cannot be counted to `<data_dir>/quarantine.jsonl` with their
    /// reason (rare by nature; a write failure is logged, the click is still counted in the
    /// metrics by reason). The file stops growing at `quarantine.max_bytes`: records past
    /// it are dropped and counted (`quarantine_dropped`, an alert), never buffered.
    fn quarantine(&self, clicks: &[(u64, i64, &[u8], &'static str)]) {
        use std::io::Write;
        let path = self.cfg.data_dir.join("quarantine.jsonl");
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        let room = self.cfg.quarantine.max_bytes.saturating_sub(size);
        let mut out = String::new();
        for (ad, event, id, reason) in clicks {
            let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
            out.push_str(
                &serde_json::json!({ "ad_id": ad, "event_time_ms": event, "impression_id": id,
                    "reason": reason, "watermark_ms": self.windows.watermark_ms() })
                .to_string(),
            );
            out.push('\n');
        }
        // Whole records only: cut at the last line that fits.
        let fits = if (out.len() as u64) <= room {
            out.len()
        } else {
            out[..usize::try_from(room).unwrap_or(usize::MAX).min(out.len())]
                .rfind('\n')
                .map_or(0, |i| i + 1)
        };
        let dropped = out[fits..].lines().count() as u64;
        if dropped > 0 {
            self.metrics.quarantine_dropped.inc_by(dropped);
            tracing::warn!(
                dropped,
                max_bytes = self.cfg.quarantine.max_bytes,
                "quarantine log full (quarantine.max_bytes): records dropped, clicks still counted by reason"
            );
        }
        out.truncate(fits);
        self.metrics
            .quarantine_bytes
            .set(i64::try_from(size + fits as u64).unwrap_or(i64::MAX));
        if out.is_empty() {
            return;
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(out.as_bytes()));
        if let Err(e) = written {
            tracing::error!(error = %e, path = %path.display(), "cannot write the quarantine log");
        }
        tracing::warn!(
            count = clicks.len(),
            "clicks quarantined (not counted), see quarantine.jsonl"
        );
    }

    fn evict_if_due(&mut self) {
        let wm = self.windows.watermark_ms();
        if wm == i64::MIN {
            return;
        }
        // Minutes that ended at or before the watermark are final: seal them (once per
        // minute of progress), so their clicks reach the hour and day cells.
        let seal = wm.div_euclid(LEVEL_MS[0]) * LEVEL_MS[0];
        if seal > self.last_seal {
            self.last_seal = seal;
            for tx in &self.shard_tx {
                let _ = tx.send(ShardMsg::Seal(seal));
            }
        }
        let w = &self.cfg.windows;
        let before = [
            self.minute_floor(wm),
            wm.saturating_sub(w.retention_hours.saturating_mul(LEVEL_MS[1])),
            wm.saturating_sub(w.retention_days.saturating_mul(LEVEL_MS[2])),
        ];
        // Evict once per minute of watermark progress.
        if before[0].div_euclid(LEVEL_MS[0]) > self.last_evict[0].div_euclid(LEVEL_MS[0]) {
            self.last_evict = before;
            for tx in &self.shard_tx {
                let _ = tx.send(ShardMsg::Evict(before));
            }
        }
    }

    /// Deletes click-index segments behind `click_index.retention_minutes` (what
    /// `validate` lets a query reach is never older).
    fn expire_index(&mut self) {
        let wm = self.windows.watermark_ms();
        if wm == i64::MIN {
            return;
        }
        let keep = self.cfg.click_index.retention_minutes;
        let oldest = wm
            .div_euclid(LEVEL_MS[0])
            .saturating_sub(keep)
            .clamp(0, i64::from(u32::MAX));
        let gone = self.index.expire(u32::try_from(oldest).unwrap_or(0));
        if gone > 0 {
            tracing::debug!(gone, "click index segments past retention deleted");
        }
        self.metrics
            .click_index_bytes
            .set(i64::try_from(self.index.disk_bytes()).unwrap_or(i64::MAX));
    }

    fn publish(&mut self) {
        let wm = self.windows.watermark_ms();
        self.view.watermark_ms.store(wm, Ordering::Release);
        // Queries load the meta lock-free; a new one is published only when something in it
        // changed (new strings or combinations: rare after warm-up).
        let current = self.view.meta.load();
        let names = self.windows.interner().names();
        let combos = self.windows.combos().keys();
        if current.names.len() != names.len() || current.combos.len() != combos.len() {
            let mut meta = QueryMeta::clone(&current);
            if meta.names.len() != names.len() {
                meta.names = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.clone(), u32::try_from(i + 1).unwrap_or(u32::MAX)))
                    .collect();
            }
            meta.combos = combos.to_vec();
            drop(current);
            self.view.meta.store(Arc::new(meta));
        } else {
            drop(current);
        }
        let owners = self.windows.take_new_owners();
        if !owners.is_empty() {
            self.view
                .owners
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .extend(owners);
        }
        self.metrics
            .watermark_seconds
            .set(wm.max(0) as f64 / 1000.0);
        if wm > 0 {
            let lag = crate::view::now_ms().saturating_sub(wm) as f64 / 1000.0;
            self.metrics.watermark_lag_seconds.set(lag);
        }
        self.metrics
            .dedup_entries
            .set(i64::try_from(self.windows.dedup_len()).unwrap_or(i64::MAX));
        let d = self.windows.dedup();
        self.metrics
            .dedup_ram_bytes
            .set(i64::try_from(d.ram_bytes()).unwrap_or(i64::MAX));
        if let Some(st) = self.archive.as_ref().and_then(|a| a.stats.as_ref()) {
            use std::sync::atomic::Ordering::Relaxed;
            let m = &self.metrics;
            let up = |c: &prometheus_client::metrics::counter::Counter, v: u64| {
                c.inc_by(v.saturating_sub(c.get()));
            };
            up(&m.archive_rows, st.rows.load(Relaxed));
            up(&m.archive_bytes, st.bytes.load(Relaxed));
            up(&m.archive_files, st.files.load(Relaxed));
            up(&m.archive_errors, st.errors.load(Relaxed));
            let lag = (self.next_pos - 1).saturating_sub(st.covered.load(Relaxed));
            m.archive_lag_entries
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
            m.archive_last_publish_seconds
                .set(i64::try_from(st.last_publish_ms.load(Relaxed) / 1000).unwrap_or(0));
        }
        let (spilled, reads) = (d.stats.spilled, d.stats.disk_reads);
        let m = &self.metrics;
        m.dedup_spilled
            .inc_by(spilled.saturating_sub(m.dedup_spilled.get()));
        m.dedup_disk_reads
            .inc_by(reads.saturating_sub(m.dedup_disk_reads.get()));
    }

    /// Bounds the click index's RAM: above `click_index.memory_bytes` its chunks go to a
    /// segment now, up to the last batch written, rather than at the next checkpoint
    /// (crash-safe as a checkpoint's segment is: a start drops segments past its
    /// checkpoint and the replay indexes their batches again). Also finishes such a flush
    /// (waiting for it with `wait`); a failed one leaves the chunks in RAM for the
    /// checkpoint's flush to retry. None is started when a checkpoint is `due`.
    fn flush_index_early(&mut self, wait: bool, due: bool) {
        if self.pending.is_some() {
            // The checkpoint's own flush: `save_checkpoint` finishes it.
            return;
        }
        if self.index.flushing() {
            match self.index.finish_flush(wait) {
                None | Some(Ok(_)) => {}
                Some(Err(e)) => {
                    self.metrics.click_index_flush_errors.inc();
                    tracing::error!(error = %e, "click index segment (memory budget) failed; its clicks stay in RAM until the next checkpoint's segment");
                    self.early_flush_after = Instant::now()
                        + Duration::from_millis(self.cfg.checkpoint.interval_ms.max(10));
                }
            }
        }
        let ram = self.index.ram_bytes();
        self.metrics
            .click_index_memory_bytes
            .set(i64::try_from(ram).unwrap_or(i64::MAX));
        if !wait
            && !due
            && !self.index.flushing()
            && ram > self.cfg.click_index.memory_bytes
            && Instant::now() >= self.early_flush_after
        {
            self.metrics.click_index_early_flushes.inc();
            self.index.start_flush(self.next_pos - 1);
        }
    }

    /// Takes a checkpoint (saved by [`Writer::save_checkpoint`] once what it relies on is
    /// durable). With `wait`, a dedup spill in flight is waited for instead of retried.
    fn checkpoint(&mut self, wait: bool) {
        if self.pending.is_some() || self.index.flushing() {
            // The previous one still waits for its click-index segment or dedup run.
            return;
        }
        let started = Instant::now();
        // Dedup first: the RAM tier is frozen and spilled to a run file by the spill thread
        // (its entries carry their ordinals, so that run may be durable before or after
        // the checkpoint's commit; the checkpoint is saved only once it is), and ids below
        // the floor of the previous committed checkpoint are deleted there.
        let floor = self.windows.dedup_floor_ms();
        let ticket = match self.windows.begin_dedup_flush(self.dedup_floor, wait) {
            Ok(Some(t)) => t,
            // A spill of a full RAM tier is still running: try again after the next group.
            Ok(None) => return,
            Err(e) => {
                self.metrics.checkpoint_errors.inc();
                self.metrics.dedup_errors.inc();
                tracing::error!(error = %e, "dedup flush failed; checkpoint skipped, the WAL is kept");
                self.last_checkpoint = Instant::now();
                return;
            }
        };
        if let Ok(n) = self.windows.dedup().disk_len() {
            self.metrics
                .dedup_disk_entries
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let tables: Vec<(String, Vec<u8>)> = self
            .windows
            .checkpoint()
            .into_iter()
            .map(|(t, b)| (t.to_string(), b))
            .collect();
        let windows_done = started.elapsed();
        // Every shard gets its barrier at once; the checkpoint thread, not the writer,
        // waits for their copies: a barrier sits in its shard's queue behind the clicks
        // already handed over, so its copy is the shard at `wal_pos` whenever it is made,
        // and ingest goes on meanwhile (each shard stops only for its own copy).
        let mut replies = Vec::with_capacity(self.shard_tx.len());
        for tx in &self.shard_tx {
            let (rtx, rrx) = sync_channel(1);
            if tx.send(ShardMsg::Barrier(rtx)).is_err() {
                return;
            }
            replies.push(rrx);
        }
        let mut repairs = self.repair_seq.to_le_bytes().to_vec();
        repairs.extend_from_slice(&self.finalized_before.to_le_bytes());
        let tail = [
            (RULES_TABLE.to_string(), self.rules.to_bytes()),
            (REPAIRS_TABLE.to_string(), repairs),
        ];
        let wal_pos = self.next_pos - 1;
        // The copies are encoded, and written to their file, by a thread of their own:
        // ingest goes on meanwhile. The checkpoint is saved once that is done.
        let files = self.store.checkpoint_files();
        let (etx, erx) = sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("adclick-agg-checkpoint".into())
            .spawn(move || {
                crate::lower_thread_priority(crate::BACKGROUND_NICE, "checkpoint encode");
                let t = Instant::now();
                let mut shards = Vec::with_capacity(replies.len());
                let mut copy = Duration::ZERO;
                for rrx in replies {
                    match rrx.recv() {
                        Ok((s, took)) => {
                            copy = copy.max(took);
                            shards.push(s);
                        }
                        Err(_) => {
                            let gone = StoreError(
                                "a shard thread stopped before its checkpoint copy".into(),
                            );
                            let _ = etx.send((Err(gone), 0, t.elapsed(), copy));
                            return;
                        }
                    }
                }
                let bytes = std::cell::Cell::new(0usize);
                // In the order of the format before: windows, shards, rules, repairs.
                let all = tables
                    .into_iter()
                    .chain(
                        shards
                            .into_iter()
                            .enumerate()
                            .map(|(i, s)| (format!("shard/{i}"), s.to_bytes())),
                    )
                    .chain(tail);
                let all = all.inspect(|(_, b)| bytes.set(bytes.get() + b.len()));
                let out = match files {
                    Some(f) => f.write(wal_pos, all).map(Encoded::File),
                    None => Ok(Encoded::Inline(Checkpoint {
                        wal_pos,
                        tables: all.collect(),
                    })),
                };
                let _ = etx.send((out, bytes.get(), t.elapsed(), copy));
            });
        if let Err(e) = spawned {
            self.metrics.checkpoint_errors.inc();
            tracing::error!(error = %e, "cannot start the checkpoint thread; checkpoint skipped, the WAL is kept");
            self.last_checkpoint = Instant::now();
            return;
        }
        // The click index up to this position must be on disk before the WAL behind it is
        // deleted (`clickindex`: a start drops segments past its checkpoint). The segment
        // is written off this thread; the checkpoint is saved once it is done.
        self.index.start_flush(wal_pos);
        self.pending = Some(PendingCheckpoint {
            wal_pos,
            encoding: erx,
            encoded: None,
            floor,
            started,
            build: started.elapsed(),
            windows: windows_done,
            dedup_ticket: ticket,
        });
        self.last_checkpoint = Instant::now();
    }

    /// Saves the pending checkpoint once the click index's segment up to its position is
    /// durable (waiting for it with `wait`).
    fn save_checkpoint(&mut self, wait: bool) {
        let Some(ticket) = self.pending.as_ref().map(|p| p.dedup_ticket) else {
            return;
        };
        // Every dedup id inserted before the checkpoint must be in a durable run: the WAL
        // replay from it sees only the clicks after it.
        match self.windows.dedup_flushed(ticket, wait) {
            None => return,
            Some(Ok(())) => {}
            Some(Err(e)) => {
                // Not saved; the click index's segment is finished and dropped with it.
                let _ = self.index.finish_flush(true);
                self.pending = None;
                self.metrics.checkpoint_errors.inc();
                self.metrics.dedup_errors.inc();
                tracing::error!(error = %e, "dedup flush failed; checkpoint skipped, the WAL is kept");
                self.last_checkpoint = Instant::now();
                return;
            }
        }
        // The snapshot encoded (and in its file) by the checkpoint thread.
        if let Some(p) = self.pending.as_mut()
            && p.encoded.is_none()
        {
            let got = if wait {
                p.encoding.recv().ok()
            } else {
                match p.encoding.try_recv() {
                    Ok(r) => Some(r),
                    Err(std::sync::mpsc::TryRecvError::Empty) => return,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                }
            };
            p.encoded = Some(got.unwrap_or_else(|| {
                (
                    Err(StoreError("the checkpoint thread died".into())),
                    0,
                    Duration::ZERO,
                    Duration::ZERO,
                )
            }));
        }
        let Some(flushed) = self.index.finish_flush(wait) else {
            return;
        };
        let Some(PendingCheckpoint {
            wal_pos,
            encoded: Some((encoded, bytes, encode, copy)),
            floor,
            started,
            build,
            windows,
            ..
        }) = self.pending.take()
        else {
            return;
        };
        if let Err(e) = flushed {
            self.metrics.checkpoint_errors.inc();
            tracing::error!(error = %e, "click index flush failed; checkpoint skipped, the WAL is kept");
            self.last_checkpoint = Instant::now();
            return;
        }
        let commit = Instant::now();
        let saved = encoded.and_then(|enc| match enc {
            Encoded::File(staged) => self.store.save_staged_checkpoint(&staged),
            Encoded::Inline(cp) => self.store.save_checkpoint(&cp),
        });
        match saved {
            Ok(()) => {
                // Build and commit run on the writer thread, ingest stopped (build: the
                // window tables and the barriers); the shard copies (each shard stopped
                // for its own) and encode (with the file's write and fsync) run beside
                // ingest: encode_ms is from the barriers to the file's fsync.
                tracing::info!(
                    wal_pos,
                    bytes,
                    build_ms = build.as_millis() as u64,
                    windows_ms = windows.as_millis() as u64,
                    copy_ms = copy.as_millis() as u64,
                    encode_ms = encode.as_millis() as u64,
                    commit_ms = commit.elapsed().as_millis() as u64,
                    total_ms = started.elapsed().as_millis() as u64,
                    "checkpoint saved"
                );
                self.expire_index();
                self.dedup_floor = floor;
                self.metrics
                    .checkpoint_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.last_checkpoint = Instant::now();
            }
            Err(e) => {
                self.metrics.checkpoint_errors.inc();
                tracing::error!(error = %e, "checkpoint failed; the WAL is kept");
                self.last_checkpoint = Instant::now();
            }
        }
    }
}
