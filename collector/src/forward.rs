//! The forwarder: reads durable spool records in order and delivers each one to the
//! aggregators over gRPC (`IngestService.Ingest`), as one batch per owning shard with
//! `seq` = the record's spool seq, then acks the record so the spool can delete it.
//!
//! Retries forever with capped exponential backoff and full jitter: an aggregator outage
//! only grows the spool (bounded by its disk budget, after which ingest answers 503).
//! Idempotence: one spool record = one batch per owning shard, with `seq` = the record's
//! seq, and aggregators ignore a seq at or below the collector's high-water mark. Routing
//! depends only on a click's content, so a resend after a crash carries the same clicks
//! under the same seq to the same shards. Shards that own no click of a record get no batch
//! for it, so an aggregator sees increasing seqs with gaps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use adclick_proto::v1::{
    IngestAck, IngestBatch, IngestClick, ingest_service_client::IngestServiceClient,
};
use prost::Message;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::config::ForwardConfig;
use crate::metrics::Metrics;
use crate::routing::{HotAds, Router};
use crate::spool::{Spool, SpoolError};
use crate::writer::Committer;

/// Largest gRPC message either side may send (a spool record holds at most
/// `spool.max_clicks_per_record` clicks, well below this).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

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
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// Last seq sent to each shard (0 = none since start: a heartbeat goes first).
    last_sent: Vec<u64>,
    /// Where to ask for a spool reopen when a durable record reads back damaged.
    reopen: Option<Committer>,
}

struct Stopped;

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

    /// Forwards until `shutdown` flips. Records stay in the spool until acked.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut next = self.spool().acked_seq() + 1;
        loop {
            while *self.durable.borrow_and_update() < next {
                tokio::select! {
                    r = self.durable.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                }
            }
            // One record per batch, so that `seq` identifies exactly the clicks it carries.
            // (Merging records cut round trips under backlog, but a regrouped resend after
            // a crash could then carry clicks whose aggregator dedup entries had expired:
            // see ARCHITECTURE.md. Per-record seqs inside a batch are the way to bring it
            // back.)
            let records = self.spool().read(next, 1, MAX_MESSAGE_BYTES / 2);
            let records = match records {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, seq = next, "cannot read spool; retrying");
                    if matches!(e, SpoolError::Corrupt(_))
                        && let Some(c) = &self.reopen
                    {
                        c.request_reopen();
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            let Some(last) = records.last().map(|(s, _)| *s) else {
                // Durable says there is more, but the spool has nothing (it is being
                // reopened behind the standby): wait rather than spin.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = shutdown.changed() => return,
                }
            };
            let payloads: Vec<&[u8]> = records.iter().map(|(_, p)| p.as_slice()).collect();
            if self
                .forward_records(last, &payloads, &mut shutdown)
                .await
                .is_err()
            {
                return;
            }
            let mut spool = self.spool.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = spool.ack(last) {
                tracing::error!(error = %e, seq = last, "cannot ack spool records");
            }
            let lag = spool.durable_seq().saturating_sub(last);
            self.metrics
                .forward_lag_records
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
            self.metrics
                .spool_bytes
                .set(i64::try_from(spool.used_bytes()).unwrap_or(i64::MAX));
            self.metrics
                .spool_segments
                .set(spool.segment_count() as i64);
            next = last + 1;
        }
    }

    /// Sends consecutive spool records (ending at `seq`) as one batch per owning shard.
    async fn forward_records(
        &mut self,
        seq: u64,
        payloads: &[&[u8]],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let mut by_shard: Vec<Vec<IngestClick>> = vec![Vec::new(); self.shards.len()];
        for payload in payloads {
            match IngestBatch::decode(*payload) {
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
        }
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
            let n = clicks.len() as u64;
            let batch = IngestBatch {
                collector_id: self.collector_id.clone(),
                seq,
                clicks,
            };
            let ack = self.send(shard, batch, shutdown).await?;
            self.last_sent[shard] = seq;
            self.hot.update(shard, &ack.hot_ad_ids);
            self.metrics.forwarded_clicks.inc_by(n);
            self.metrics.forwarded_batches.inc();
        }
        Ok(())
    }

    async fn send(
        &mut self,
        shard: usize,
        batch: IngestBatch,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<IngestAck, Stopped> {
        let mut attempt: u32 = 0;
        loop {
            let mut req = tonic::Request::new(batch.clone());
            if let Some(a) = &self.auth {
                req.metadata_mut().insert("authorization", a.clone());
            }
            match self.shards[shard].ingest(req).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(status) => {
                    attempt = attempt.saturating_add(1);
                    self.metrics.forward_errors.inc();
                    let ceiling = self
                        .cfg
                        .retry_base_ms
                        .saturating_mul(1u64 << attempt.min(20))
                        .min(self.cfg.retry_max_ms)
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
