//! The forwarder: reads durable spool records in order and delivers each one to the
//! aggregators over gRPC (`IngestService.Ingest`), as one batch per owning shard with
//! `seq` = the record's spool seq, then acks the spool so it can delete what every owner
//! has. It must never merge records or ack a record some owner has not acked.
//!
//! Pipelined: up to `forward.max_in_flight` records past the lowest one not yet acked by
//! every owner are in flight at once, each batch sent by its own task, so the aggregators'
//! fsyncs overlap instead of adding up. Acks may come back in any order; the spool is
//! truncated only up to the contiguous point below which every record was acked by every
//! owning shard. Each batch carries `acked_floor`, the lowest seq this collector has not
//! yet seen acked by that shard (every seq below it was acked there or had nothing for it),
//! which lets the aggregator keep "which seqs did I ack" as a floor plus a set bounded by
//! the window (`aggregator::admit`).
//!
//! Retries forever with capped exponential backoff and jitter: an aggregator outage only
//! grows the spool (bounded by its disk budget, after which ingest answers 503).
//! Idempotence: one spool record = one batch per owning shard, with `seq` = the record's
//! seq, and aggregators ignore a seq they already acked. Routing depends only on a click's
//! content, so a resend after a crash carries the same clicks under the same seq to the
//! same shards. Shards that own no click of a record get no batch for it (only a heartbeat
//! every `forward.heartbeat_records` records), so an aggregator sees seqs with gaps.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adclick_proto::v1::{
    IngestAck, IngestBatch, IngestClick, ingest_service_client::IngestServiceClient,
};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::config::ForwardConfig;
use crate::metrics::Metrics;
use crate::routing::{HotAds, Router};
use crate::spool::{Spool, SpoolError};
use crate::writer::Committer;

/// Largest gRPC message either side may send (a spool record holds at most
/// `spool.max_clicks_per_record` clicks, well below this).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Spool payload bytes in flight at once, whatever `forward.max_in_flight` allows (one
/// record is always let through): the memory bound of the window under a large backlog.
pub const MAX_IN_FLIGHT_BYTES: usize = 128 << 20;

/// A bad aggregator endpoint.
#[derive(Debug, thiserror::Error)]
#[error("invalid aggregator endpoint {endpoint:?}: {source}")]
pub struct EndpointError {
    endpoint: String,
    source: tonic::transport::Error,
}

/// See the module doc.
#[derive(Debug)]
pub struct Forwarder {
    spool: Arc<Mutex<Spool>>,
    shards: Vec<IngestServiceClient<Channel>>,
    router: Router,
    collector_id: String,
    hot: Arc<HotAds>,
    metrics: Arc<Metrics>,
    cfg: ForwardConfig,
    durable: watch::Receiver<u64>,
    auth: Option<MetadataValue<Ascii>>,
    /// Last seq sent to each shard (0 = none since start: a heartbeat goes first).
    last_sent: Vec<u64>,
    /// Where to ask for a spool reopen when a durable record reads back damaged.
    reopen: Option<Committer>,
}

/// The forwarder is stopping.
/// What a finished send task means for the forwarding loop.
enum Joined {
    Acked,
    Stop,
    Reset,
}

struct Stopped;

/// One record in flight.
#[derive(Debug)]
struct Slot {
    seq: u64,
    /// Shards whose batch of this record is not acked yet.
    waiting: Vec<usize>,
    /// Its payload size (for [`MAX_IN_FLIGHT_BYTES`]).
    bytes: usize,
}

/// The records in flight, ascending: from the lowest one not acked by every owner up to
/// the last one read.
#[derive(Debug)]
struct Window {
    slots: VecDeque<Slot>,
    /// Next seq to read.
    next: u64,
    /// Payload bytes of `slots`.
    bytes: usize,
    /// Highest seq whose record and every record below it are complete (to ack).
    complete_to: u64,
    /// Highest seq the spool has acked.
    acked: u64,
}

impl Window {
    fn new(acked: u64) -> Self {
        Window {
            slots: VecDeque::new(),
            next: acked.saturating_add(1),
            bytes: 0,
            complete_to: acked,
            acked,
        }
    }

    /// The `acked_floor` for `shard` of a batch of the next record: the lowest seq
    /// `shard` still owes an ack for, else the next record's (every record below it was
    /// acked by `shard` or had nothing for it).
    fn floor(&self, shard: usize) -> u64 {
        self.slots
            .iter()
            .find(|s| s.waiting.contains(&shard))
            .map_or(self.next, |s| s.seq)
    }

    /// `shard` acked `seq`.
    fn acked_by(&mut self, seq: u64, shard: usize) {
        if let Ok(i) = self.slots.binary_search_by_key(&seq, |s| s.seq) {
            self.slots[i].waiting.retain(|x| *x != shard);
        }
    }

    /// Drops complete records from the front; true if any went.
    fn pop_complete(&mut self) -> bool {
        let mut popped = false;
        while let Some(front) = self.slots.front() {
            if !front.waiting.is_empty() {
                break;
            }
            self.complete_to = front.seq;
            self.bytes = self.bytes.saturating_sub(front.bytes);
            self.slots.pop_front();
            popped = true;
        }
        popped
    }
}

/// An acked batch.
struct Sent {
    seq: u64,
    shard: usize,
    clicks: u64,
    ack: IngestAck,
}

/// What a send task needs: its own client handle (they share the shard's connection).
struct Sender {
    client: IngestServiceClient<Channel>,
    auth: Option<MetadataValue<Ascii>>,
    retry_base_ms: u64,
    retry_max_ms: u64,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    /// A forwarder to `endpoints` (connections are made lazily, and re-made after errors).
    #[allow(clippy::too_many_arguments)] // one call site, each argument a distinct collaborator
    pub fn new(
        endpoints: &[String],
        spool: Arc<Mutex<Spool>>,
        collector_id: String,
        hot: Arc<HotAds>,
        metrics: Arc<Metrics>,
        cfg: ForwardConfig,
        durable: watch::Receiver<u64>,
        aggregator_key: Option<&str>,
    ) -> Result<Self, EndpointError> {
        let mut shards = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let ep = Endpoint::from_shared(e.clone()).map_err(|source| EndpointError {
                endpoint: e.clone(),
                source,
            })?;
            let channel = ep
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_millis(cfg.request_timeout_ms.max(1)))
                .tcp_nodelay(true)
                .connect_lazy();
            shards.push(
                IngestServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        }
        let auth = aggregator_key.and_then(|k| format!("Bearer {k}").parse().ok());
        let last_sent = vec![0; shards.len()];
        Ok(Forwarder {
            auth,
            spool,
            last_sent,
            reopen: None,
            shards,
            router: Router::new(endpoints),
            collector_id,
            hot,
            metrics,
            cfg,
            durable,
        })
    }

    /// Lets the forwarder ask `committer` to reopen the spool when a durable record reads
    /// back damaged (recovery then isolates it) instead of retrying it forever.
    pub fn with_reopen(mut self, committer: Committer) -> Self {
        self.reopen = Some(committer);
        self
    }

    fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forwards until `shutdown` flips. Records stay in the spool until acked by every
    /// owner; batches in flight at shutdown are abandoned (resent after the restart).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut w = Window::new(self.spool().acked_seq());
        let mut tasks: JoinSet<Result<Sent, Stopped>> = JoinSet::new();
        // After a failed or empty read: not again before this.
        let mut read_after: Option<Instant> = None;
        let max_in_flight = self.cfg.max_in_flight.max(1);
        loop {
            if read_after.is_some_and(|t| t <= Instant::now()) {
                read_after = None;
            }
            let room = max_in_flight.saturating_sub(w.slots.len());
            let can_read = room > 0
                && read_after.is_none()
                && (w.slots.is_empty() || w.bytes < MAX_IN_FLIGHT_BYTES);
            if can_read && *self.durable.borrow_and_update() >= w.next {
                match self.read(&w, room) {
                    Ok(records) if !records.is_empty() => {
                        for (seq, payload) in records {
                            self.start_record(&mut w, &mut tasks, &mut shutdown, seq, &payload);
                        }
                        // Records with nothing to send are complete at once.
                        self.advance(&mut w);
                        continue;
                    }
                    // Durable says there is more, but the spool has nothing (it is being
                    // reopened behind the standby): wait rather than spin.
                    Ok(_) => read_after = Some(Instant::now() + Duration::from_millis(100)),
                    Err(()) => read_after = Some(Instant::now() + Duration::from_secs(1)),
                }
            }
            let retry_at = read_after.unwrap_or_else(Instant::now);
            tokio::select! {
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    // Take every ack already there before touching the spool once.
                    let mut next = Some(joined);
                    while let Some(j) = next {
                        next = match self.on_joined(&mut w, &mut tasks, j).await {
                            Joined::Stop => return,
                            Joined::Reset => None,
                            Joined::Acked => tasks.try_join_next(),
                        };
                    }
                    self.advance(&mut w);
                }
                r = self.durable.changed(), if can_read => if r.is_err() { return },
                _ = tokio::time::sleep_until(retry_at), if read_after.is_some() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One finished send task: its ack, the forwarder stopping, or a task that died (a
    /// bug: the whole window is resent rather than waiting forever for its ack;
    /// aggregators drop what they already have).
    async fn on_joined(
        &mut self,
        w: &mut Window,
        tasks: &mut JoinSet<Result<Sent, Stopped>>,
        joined: Result<Result<Sent, Stopped>, tokio::task::JoinError>,
    ) -> Joined {
        match joined {
            Ok(Ok(sent)) => {
                self.on_ack(w, sent);
                Joined::Acked
            }
            Ok(Err(Stopped)) => Joined::Stop,
            Err(e) => {
                tracing::error!(error = %e, "forward task failed; resending the window");
                tasks.shutdown().await;
                *w = Window::new(self.spool().acked_seq());
                Joined::Reset
            }
        }
    }

    /// Up to `room` durable records from `w.next`, within the byte budget.
    fn read(&self, w: &Window, room: usize) -> Result<Vec<(u64, Vec<u8>)>, ()> {
        // One record per batch, so that `seq` identifies exactly the clicks it carries.
        // (Merging records cut round trips under backlog, but a regrouped resend after a
        // crash could then carry clicks whose aggregator dedup entries had expired: see
        // ARCHITECTURE.md. Per-record seqs inside a batch are the way to bring it back.)
        let budget = MAX_IN_FLIGHT_BYTES.saturating_sub(w.bytes).max(1);
        self.spool().read(w.next, room, budget).map_err(|e| {
            tracing::error!(error = %e, seq = w.next, "cannot read spool; retrying");
            if matches!(e, SpoolError::Corrupt(_))
                && let Some(c) = &self.reopen
            {
                c.request_reopen();
            }
        })
    }

    /// Routes one record and starts a send task per batch; the record joins the window.
    fn start_record(
        &mut self,
        w: &mut Window,
        tasks: &mut JoinSet<Result<Sent, Stopped>>,
        shutdown: &mut watch::Receiver<bool>,
        seq: u64,
        payload: &[u8],
    ) {
        let mut by_shard: Vec<Vec<IngestClick>> = vec![Vec::new(); self.shards.len()];
        match IngestBatch::decode(payload) {
            Ok(b) => {
                for c in b.clicks {
                    by_shard[self.router.shard(c.ad_id, c.salt)].push(c);
                }
            }
            Err(e) => {
                // Cannot happen for records this collector wrote (CRC-checked); skip
                // rather than block forwarding forever, loudly.
                tracing::error!(error = %e, seq, "undecodable spool record skipped");
                self.metrics.add_clicks("spool_record_undecodable", 1);
            }
        }
        let mut waiting = Vec::new();
        for (shard, clicks) in by_shard.into_iter().enumerate() {
            // A shard that got no clicks for `heartbeat_records` records gets an empty batch
            // with this seq: aggregators refuse a seq more than `ingest.max_seq_jump` above
            // their mark, and a shard owning few ads could otherwise see a jump that large
            // and wedge this collector's forwarding.
            if clicks.is_empty()
                && seq.saturating_sub(self.last_sent[shard]) < self.cfg.heartbeat_records
            {
                continue;
            }
            let batch = IngestBatch {
                collector_id: self.collector_id.clone(),
                seq,
                clicks,
                // Before this record joins the window: `w.next` is this record's seq.
                acked_floor: w.floor(shard).min(seq),
            };
            self.last_sent[shard] = seq;
            waiting.push(shard);
            let sender = Sender {
                client: self.shards[shard].clone(),
                auth: self.auth.clone(),
                retry_base_ms: self.cfg.retry_base_ms,
                retry_max_ms: self.cfg.retry_max_ms,
                metrics: self.metrics.clone(),
            };
            tasks.spawn(sender.send(shard, batch, shutdown.clone()));
        }
        w.slots.push_back(Slot {
            seq,
            waiting,
            bytes: payload.len(),
        });
        w.bytes += payload.len();
        w.next = seq.saturating_add(1);
    }

    fn on_ack(&mut self, w: &mut Window, sent: Sent) {
        self.hot.update(sent.shard, &sent.ack.hot_ad_ids);
        self.metrics.forwarded_clicks.inc_by(sent.clicks);
        self.metrics.forwarded_batches.inc();
        w.acked_by(sent.seq, sent.shard);
    }

    /// Acks the spool up to the contiguous complete point (a failed ack is retried by the
    /// next call).
    fn advance(&mut self, w: &mut Window) {
        w.pop_complete();
        if w.complete_to <= w.acked {
            return;
        }
        let mut spool = self.spool.lock().unwrap_or_else(|e| e.into_inner());
        match spool.ack(w.complete_to) {
            Ok(()) => w.acked = w.complete_to,
            Err(e) => tracing::error!(error = %e, seq = w.complete_to, "cannot ack spool records"),
        }
        let lag = spool.durable_seq().saturating_sub(spool.acked_seq());
        self.metrics
            .forward_lag_records
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        self.metrics
            .spool_bytes
            .set(i64::try_from(spool.used_bytes()).unwrap_or(i64::MAX));
        self.metrics
            .spool_segments
            .set(spool.segment_count() as i64);
    }
}

impl Sender {
    /// Sends `batch` until it is acked (or the forwarder stops).
    async fn send(
        mut self,
        shard: usize,
        batch: IngestBatch,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Sent, Stopped> {
        let clicks = batch.clicks.len() as u64;
        let mut attempt: u32 = 0;
        loop {
            let mut req = tonic::Request::new(batch.clone());
            if let Some(a) = &self.auth {
                req.metadata_mut().insert("authorization", a.clone());
            }
            let status = match self.client.ingest(req).await {
                Ok(resp) => {
                    return Ok(Sent {
                        seq: batch.seq,
                        shard,
                        clicks,
                        ack: resp.into_inner(),
                    });
                }
                Err(status) => status,
            };
            attempt = attempt.saturating_add(1);
            self.metrics.forward_errors.inc();
            let ceiling = self
                .retry_base_ms
                .saturating_mul(1u64 << attempt.min(20))
                .min(self.retry_max_ms)
                .max(1);
            let delay = Duration::from_millis(fastrand::u64(ceiling / 2..=ceiling));
            if attempt == 1 || attempt.is_power_of_two() {
                if needs_operator(status.code()) {
                    // Retrying cannot fix these (wrong aggregator_key, a refused seq
                    // window, a batch the aggregator rejects): the spool fills until
                    // someone acts, so say it at ERROR.
                    tracing::error!(shard, seq = batch.seq, attempt, code = ?status.code(),
                        message = status.message(), ?delay,
                        "aggregator refuses this collector's batches; fix the cause (see the message), retrying");
                } else {
                    tracing::warn!(shard, seq = batch.seq, attempt, code = ?status.code(),
                        message = status.message(), ?delay, "forward failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return Err(Stopped),
            }
        }
    }
}

/// gRPC codes that mean the aggregator refuses what this collector sends, not that it is
/// unavailable: retries continue (the spool keeps everything), but an operator must act.
fn needs_operator(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(seq: u64, waiting: &[usize]) -> Slot {
        Slot {
            seq,
            waiting: waiting.to_vec(),
            bytes: 10,
        }
    }

    #[test]
    fn the_window_acks_only_the_contiguous_complete_prefix() {
        let mut w = Window::new(4);
        assert_eq!((w.next, w.floor(0)), (5, 5));
        for (seq, waiting) in [(5, &[0, 1][..]), (6, &[1]), (7, &[0]), (8, &[])] {
            w.slots.push_back(slot(seq, waiting));
            w.bytes += 10;
            w.next = seq + 1;
        }
        assert_eq!((w.floor(0), w.floor(1), w.floor(2)), (5, 5, 9));
        // Out of order: 7 and 6 complete first; nothing below 5 moves.
        w.acked_by(7, 0);
        w.acked_by(6, 1);
        assert!(!w.pop_complete());
        assert_eq!(w.complete_to, 4);
        w.acked_by(5, 0);
        assert_eq!((w.floor(0), w.floor(1)), (9, 5));
        assert!(!w.pop_complete());
        // A repeated or unknown ack changes nothing.
        w.acked_by(5, 0);
        w.acked_by(99, 1);
        w.acked_by(5, 1);
        assert!(w.pop_complete());
        assert_eq!((w.complete_to, w.slots.len(), w.bytes), (8, 0, 0));
        assert_eq!(w.floor(1), 9);
    }
}
