//! The transport-neutral forwarder: reads durable spool records in order, routes each
//! record's clicks to the sink's destinations, sends one batch per owning destination with
//! `seq` = the record's spool seq, retries each batch until it is acked, and acks the spool
//! up to the contiguous point below which every owning destination acked every record. It
//! must never merge records, ack a record some owner has not acked, or know which
//! transport it drives (that is the [`Sink`]'s job).
//!
//! Pipelined: up to `forward.max_in_flight` records past the lowest one not yet acked by
//! every owner are in flight at once, each batch sent by its own task, so the
//! destinations' fsyncs overlap instead of adding up. Acks may come back in any order.
//! Each batch carries `acked_floor`, the lowest seq this collector has not yet seen acked
//! by that destination (every seq below it was acked there or had nothing for it).
//!
//! Retries forever with capped exponential backoff and equal jitter: an outage only grows
//! the spool (bounded by its disk budget, after which ingest answers 503). Routing depends
//! only on a click's content, so a resend after a crash carries the same clicks under the
//! same seq to the same destinations. Destinations that own no click of a record get no
//! batch for it (only a heartbeat every `forward.heartbeat_records` records), so a
//! destination sees seqs with gaps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::encoded::{self, EncodedBatch};
use super::sink::{Delivered, SendError, Sink};
use super::window::Window;
use crate::config::ForwardConfig;
use crate::metrics::Metrics;
use crate::routing::HotAds;
use crate::spool::{Released, Spool, SpoolError};
use crate::writer::Committer;

/// Spool payload bytes in flight at once, whatever `forward.max_in_flight` allows (one
/// record is always let through): the memory bound of the window under a large backlog.
pub const MAX_IN_FLIGHT_BYTES: usize = 128 << 20;

/// See the module doc.
#[derive(Debug)]
pub struct Forwarder<S: Sink> {
    spool: Arc<Mutex<Spool>>,
    sink: Arc<S>,
    collector_id: String,
    hot: Arc<HotAds>,
    metrics: Arc<Metrics>,
    cfg: ForwardConfig,
    durable: watch::Receiver<u64>,
    /// Last seq sent to each destination (0 = none since start: a heartbeat goes first).
    last_sent: Vec<u64>,
    /// Where to ask for a spool reopen when a durable record reads back damaged.
    reopen: Option<Committer>,
    /// Records the file sources have not yet covered by their position files: acked (and
    /// deleted) only once they have (`filesource`).
    pins: Option<crate::filesource::SourcePins>,
}

/// What a finished send task means for the forwarding loop.
enum Joined {
    Acked,
    Stop,
    Reset,
}

/// The forwarder is stopping.
struct Stopped;

/// An acked batch.
struct Sent {
    seq: u64,
    dest: usize,
    clicks: u64,
    delivered: Delivered,
}

impl<S: Sink> Forwarder<S> {
    /// A forwarder of `spool` (records up to `durable`) to `sink`, as `collector_id`.
    pub fn new(
        sink: S,
        spool: Arc<Mutex<Spool>>,
        collector_id: String,
        hot: Arc<HotAds>,
        metrics: Arc<Metrics>,
        cfg: ForwardConfig,
        durable: watch::Receiver<u64>,
    ) -> Self {
        let last_sent = vec![0; sink.destinations()];
        Forwarder {
            spool,
            sink: Arc::new(sink),
            collector_id,
            hot,
            metrics,
            cfg,
            durable,
            last_sent,
            reopen: None,
            pins: None,
        }
    }

    /// Holds the spool ack below the records `pins` still need (`filesource`).
    pub fn with_pins(mut self, pins: crate::filesource::SourcePins) -> Self {
        self.pins = Some(pins);
        self
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
    /// destinations drop what they already have).
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
        // crash could then carry clicks whose downstream dedup entries had expired: see
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
        let dests = self.last_sent.len();
        let sink = &self.sink;
        let shares = match encoded::split(payload, dests, |ad, salt| sink.route(ad, salt)) {
            Ok(s) => s,
            Err(e) => {
                // Cannot happen for records this collector wrote (CRC-checked); skip
                // rather than block forwarding forever, loudly.
                tracing::error!(error = %e, seq, "undecodable spool record skipped");
                self.metrics.add_clicks("spool_record_undecodable", 1);
                vec![encoded::Share::default(); dests.max(1)]
            }
        };
        let mut waiting = Vec::new();
        for (dest, share) in shares.iter().enumerate().take(dests) {
            // A destination that got no clicks for `heartbeat_records` records gets an
            // empty batch with this seq: aggregators refuse a seq more than
            // `ingest.max_seq_jump` above their mark, and a destination owning few ads
            // could otherwise see a jump that large and wedge this collector's forwarding.
            if share.count == 0
                && seq.saturating_sub(self.last_sent[dest]) < self.cfg.heartbeat_records
            {
                continue;
            }
            // Before this record joins the window: `w.next` is this record's seq.
            let batch = EncodedBatch::new(&self.collector_id, seq, w.floor(dest).min(seq), share);
            self.last_sent[dest] = seq;
            waiting.push(dest);
            let attempt = Attempts {
                sink: self.sink.clone(),
                dest,
                seq,
                clicks: share.count,
                retry_base_ms: self.cfg.retry_base_ms,
                retry_max_ms: self.cfg.retry_max_ms,
                metrics: self.metrics.clone(),
            };
            let prepared = self.sink.prepare(dest, batch);
            tasks.spawn(attempt.run(prepared, shutdown.clone()));
        }
        w.push(seq, waiting, payload.len());
    }

    fn on_ack(&mut self, w: &mut Window, sent: Sent) {
        self.hot.update(sent.dest, &sent.delivered.hot_ad_ids);
        self.metrics.forwarded_clicks.inc_by(sent.clicks);
        self.metrics.forwarded_batches.inc();
        if sent.delivered.duplicate {
            self.metrics.forward_duplicate_acks.inc();
        }
        w.acked_by(sent.seq, sent.dest);
    }

    /// Acks the spool up to the contiguous complete point (a failed ack is retried by the
    /// next call).
    fn advance(&mut self, w: &mut Window) {
        w.pop_complete();
        // A file source's record stays until its position file covers it (the next
        // advance acks it).
        let target = self
            .pins
            .as_ref()
            .map_or(w.complete_to, |p| p.clamp(w.complete_to));
        if target <= w.acked {
            return;
        }
        let released = {
            let mut spool = self.spool.lock().unwrap_or_else(|e| e.into_inner());
            let released = match spool.ack_releasing(target) {
                Ok(r) => {
                    w.acked = target;
                    if let Some(e) = &r.error {
                        tracing::warn!(error = %e, "cannot release acked spool segments; the next ack retries");
                    }
                    r
                }
                Err(e) => {
                    tracing::error!(error = %e, seq = target, "cannot ack spool records");
                    Released::default()
                }
            };
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
            released
        };
        // Fully acked segment files are deleted off the spool's lock and off this task
        // (a 64 MiB unlink can take ~15 ms): appends never wait for it. Their bytes count
        // in the spool's use until then, so the gauge (which readiness reads) is set again
        // once they are gone.
        if !released.is_empty() {
            let (spool, metrics) = (self.spool.clone(), self.metrics.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = released.remove() {
                    tracing::warn!(error = %e, "cannot delete acked spool segments; the next start deletes them");
                }
                let used = spool.lock().unwrap_or_else(|e| e.into_inner()).used_bytes();
                metrics
                    .spool_bytes
                    .set(i64::try_from(used).unwrap_or(i64::MAX));
            });
        }
    }
}

/// The retry policy of one batch: what a send task needs.
struct Attempts<S: Sink> {
    sink: Arc<S>,
    dest: usize,
    seq: u64,
    clicks: u64,
    retry_base_ms: u64,
    retry_max_ms: u64,
    metrics: Arc<Metrics>,
}

impl<S: Sink> Attempts<S> {
    /// Sends `batch` until it is acked (or the forwarder stops).
    async fn run(
        self,
        batch: S::Batch,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Sent, Stopped> {
        let started = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            let err = match self.sink.send(self.dest, &batch).await {
                Ok(delivered) => {
                    self.metrics
                        .forward_batch_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Sent {
                        seq: self.seq,
                        dest: self.dest,
                        clicks: self.clicks,
                        delivered,
                    });
                }
                Err(e) => e,
            };
            attempt = attempt.saturating_add(1);
            self.metrics.forward_errors.inc();
            let delay = backoff(self.retry_base_ms, self.retry_max_ms, attempt);
            if attempt == 1 || attempt.is_power_of_two() {
                let (dest, seq) = (self.dest, self.seq);
                match &err {
                    // Retrying cannot fix these: the spool fills until someone acts, so
                    // say it at ERROR.
                    SendError::Refused(m) => tracing::error!(dest, seq, attempt, message = %m,
                        ?delay, "destination refuses this collector's batches; fix the cause (see the message), retrying"),
                    SendError::Unavailable(m) => tracing::warn!(dest, seq, attempt, message = %m,
                        ?delay, "forward failed; retrying"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return Err(Stopped),
            }
        }
    }
}

/// Capped exponential backoff with equal jitter: a random delay in [ceiling/2, ceiling],
/// so a restarted destination is not hit by immediate retries from every collector.
fn backoff(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let ceiling = base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(max_ms)
        .max(1);
    Duration::from_millis(fastrand::u64(ceiling / 2..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_with_equal_jitter() {
        for attempt in 1..40 {
            let d = backoff(100, 10_000, attempt).as_millis() as u64;
            let ceiling = (100u64 << attempt.min(20)).min(10_000);
            assert!((ceiling / 2..=ceiling).contains(&d), "{attempt}: {d}");
        }
        assert!(backoff(0, 0, 1) <= Duration::from_millis(1));
    }
}
