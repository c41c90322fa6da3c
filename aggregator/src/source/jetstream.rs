//! The JetStream source: one durable pull consumer per owned partition of the clicks
//! stream (filter `<prefix>.<p>`, `AckNone`), each feeding the engine's writer the
//! `IngestBatch` bodies it reads, in stream order, through the same path as gRPC ingest
//! (`Engine::submit_from_stream`).
//!
//! Exactly-once does not rest on JetStream's delivery semantics (nothing is acked, so
//! nothing is redelivered; the stream's message-id window only saves work):
//! - the writer commits each partition's last applied stream sequence in the same redb
//!   transaction as the WAL entries and delivery states of the messages up to it;
//! - a consumer is (re)created to start right after that position (`ByStartSequence`), and
//!   each message it submits names the stream sequence it follows (`StreamOrigin::prev`):
//!   the writer admits it only if that is the partition's last applied position;
//! - within one consumer, consumer sequences must be contiguous (1, 2, 3, ...): a gap
//!   (a pull response lost with its messages) restarts the consumer from the committed
//!   position, as does any error;
//! - a message republished by a collector beyond the server's dedup window has another
//!   stream sequence but the same `(collector_id, seq)` on the same partition: admission
//!   (keyed by collector and partition) drops it, and impression-id dedup drops its clicks.
//!
//! A click whose ad is not in the message's partition (`partition(ad_id, P)`) was not
//! published by an adclick collector of this stream: it is removed from the batch before
//! the batch reaches the engine (so the WAL holds what was applied, and a replay agrees)
//! and logged at ERROR. An ad is thus counted by exactly one shard, which is what lets a
//! query front merge shards' answers exactly.
//!
//! It must not decide what a batch means (the engine does), nor write anything itself.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use adclick_proto::partition::{STREAM_PARTITIONS_KEY, partition};
use adclick_proto::v1::{IngestAck, IngestBatch};
use async_nats::jetstream::{self, consumer};
use prost::Message;
use tokio::sync::{oneshot, watch};
use tokio_stream::StreamExt;

use super::config::{Owned, SourceConfig};
use super::metrics::PartitionLabel;
use crate::Metrics;
use crate::decode::RawBatch;
use crate::engine::{Engine, IngestError, StreamOrigin};
use crate::health;
use crate::view::View;

/// Why a consumer stopped before shutdown (it is restarted from the committed position).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// NATS or JetStream failed (connection, stream, consumer, pull).
    #[error("JetStream: {0}")]
    Nats(String),
    /// Consumer sequences were not contiguous: a delivery was lost.
    #[error(
        "partition {partition}: consumer sequence {got} after {expected_after}: a delivery was lost"
    )]
    Gap {
        /// The partition.
        partition: u32,
        /// The consumer sequence before it.
        expected_after: u64,
        /// The one received.
        got: u64,
    },
    /// The writer refused a message out of chain (an earlier commit failed).
    #[error("partition {0}: {1}")]
    Refused(u32, String),
    /// The stream's first message is past this shard's committed position + 1: retention
    /// (`max_age`, `max_bytes`) or a purge removed messages the shard never applied.
    #[error(
        "partition {partition}: the stream no longer holds the messages after this shard's committed position {committed} (its first is {first}): retention or a purge dropped clicks this shard never applied. The partition is not consumed (readiness: stream_retention_gap), so its counts are not silently short: restore the clicks, or rebuild the shard on an empty data dir from what the stream holds, or (an idle partition whose last message aged out; a loss recorded elsewhere) set source.accept_gap_before = {first}"
    )]
    RetentionGap {
        /// The partition.
        partition: u32,
        /// The last stream sequence applied.
        committed: u64,
        /// The stream's first sequence now.
        first: u64,
    },
}

fn nats(e: impl std::fmt::Display) -> SourceError {
    SourceError::Nats(e.to_string())
}

/// Everything a partition's consumer needs.
#[derive(Debug, Clone)]
struct Ctx {
    cfg: SourceConfig,
    metrics: Arc<Metrics>,
    /// The stream's partition count P (0 until known).
    partitions: u32,
    engine: Engine,
    max_message_bytes: usize,
}

/// Starts the source: connects in the background, waits for the stream, resolves the
/// owned partitions and runs one consumer per partition until `stop` turns true.
pub fn spawn(
    cfg: SourceConfig,
    owned: Owned,
    engine: Engine,
    view: Arc<View>,
    metrics: Arc<Metrics>,
    max_message_bytes: usize,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let ctx = Ctx {
            cfg,
            metrics,
            partitions: 0,
            engine,
            max_message_bytes,
        };
        let stopped = {
            let mut s = stop.clone();
            async move {
                let _ = s.wait_for(|v| *v).await;
            }
        };
        tokio::select! {
            _ = stopped => {}
            _ = run(ctx, owned, view, stop.clone()) => {}
        }
    })
}

async fn run(mut ctx: Ctx, owned: Owned, view: Arc<View>, stop: watch::Receiver<bool>) {
    let timeout = Duration::from_millis(ctx.cfg.request_timeout_ms);
    let addrs: Result<Vec<async_nats::ServerAddr>, _> =
        ctx.cfg.servers.iter().map(|s| s.parse()).collect();
    let addrs = match addrs {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, servers = ?ctx.cfg.servers, "source.servers: not a NATS URL; consuming nothing");
            view.ready.set(health::SOURCE_FAILED, true);
            return;
        }
    };
    let client = match async_nats::ConnectOptions::new()
        .name("adclick-aggregator")
        .connection_timeout(timeout.min(Duration::from_secs(5)))
        .request_timeout(Some(timeout))
        .max_reconnects(None)
        .retry_on_initial_connect()
        .connect(addrs)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot connect to NATS; consuming nothing");
            view.ready.set(health::SOURCE_FAILED, true);
            return;
        }
    };
    let mut js = jetstream::new(client);
    js.set_timeout(timeout);
    // The stream is created by the first collector: wait for it, then read P.
    let (stream, partitions) = loop {
        match stream_and_partitions(&js, &ctx.cfg.stream, &ctx.cfg.subject_prefix).await {
            Ok(Some(found)) => break found,
            Ok(None) => tracing::info!(stream = ctx.cfg.stream, "waiting for the stream to exist"),
            Err(e) => tracing::warn!(error = %e, "stream not usable yet"),
        }
        view.ready.set(health::SOURCE_FAILED, true);
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let owned = match owned.resolve(partitions) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "consuming nothing");
            view.ready.set(health::SOURCE_FAILED, true);
            return;
        }
    };
    ctx.partitions = partitions;
    view.ready.set(health::SOURCE_FAILED, false);
    tracing::info!(stream = ctx.cfg.stream, partitions, owned = ?owned, "consuming partitions");
    let mut tasks = tokio::task::JoinSet::new();
    for p in owned {
        tasks.spawn(consume(
            ctx.clone(),
            stream.clone(),
            p,
            view.clone(),
            stop.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

/// The stream and its partition count P, `None` while it does not exist.
async fn stream_and_partitions(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
) -> Result<Option<(jetstream::stream::Stream, u32)>, SourceError> {
    let stream = match js.get_stream(name).await {
        Ok(s) => s,
        Err(e) => {
            if let jetstream::context::GetStreamErrorKind::JetStream(j) = e.kind()
                && j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            {
                return Ok(None);
            }
            return Err(nats(e));
        }
    };
    let config = &stream.cached_info().config;
    let subjects = &config.subjects;
    // A global stream (`adclick jetstream init-global`) has no subjects of its own: it
    // sources regional streams, whose messages keep their `<prefix>.<p>` subjects.
    let sourced = subjects.is_empty() && config.sources.as_ref().is_some_and(|s| !s.is_empty());
    if !sourced && !subjects.iter().any(|s| *s == format!("{prefix}.*")) {
        return Err(SourceError::Nats(format!(
            "stream {name} captures {subjects:?}, not {prefix}.* (source.subject_prefix)"
        )));
    }
    let meta = stream
        .cached_info()
        .config
        .metadata
        .get(STREAM_PARTITIONS_KEY);
    match meta.map(|v| v.parse::<u32>()) {
        Some(Ok(p)) if p >= 1 => Ok(Some((stream, p))),
        _ => Err(SourceError::Nats(format!(
            "stream {name} has no valid {STREAM_PARTITIONS_KEY} metadata ({meta:?}): not an adclick clicks stream"
        ))),
    }
}

/// Runs partition `p`'s consumer until `stop`, restarting it after every error.
async fn consume(
    ctx: Ctx,
    stream: jetstream::stream::Stream,
    p: u32,
    view: Arc<View>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match consume_once(&ctx, &stream, p, &mut stop).await {
            Ok(()) => return,
            Err(e @ SourceError::RetentionGap { .. }) => {
                // Not retried: nothing after it can be counted without the missing clicks.
                ctx.metrics.source.restart("retention_gap");
                tracing::error!(partition = p, error = %e, "partition not consumed");
                view.ready.set(health::STREAM_GAP, true);
                let _ = stop.wait_for(|v| *v).await;
                return;
            }
            Err(e) => {
                ctx.metrics.source.restart(match e {
                    SourceError::Nats(_) => "nats",
                    SourceError::Gap { .. } => "gap",
                    SourceError::Refused(..) => "chain",
                    SourceError::RetentionGap { .. } => "retention_gap",
                });
                tracing::warn!(partition = p, error = %e, "consumer restarts after the committed position");
            }
        }
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// `batch` if every click's ad is in partition `p` of `partitions`, else how many are not.
fn owned_clicks(batch: RawBatch, p: u32, partitions: u32) -> Result<RawBatch, usize> {
    let foreign = batch
        .clicks()
        .filter(|c| {
            c.as_ref()
                .is_ok_and(|c| partition(c.ad_id, partitions) != p)
        })
        .count();
    if foreign == 0 {
        Ok(batch)
    } else {
        Err(foreign)
    }
}

/// The batch in `body` without the clicks of other partitions (re-encoded: rare, and the
/// WAL must hold exactly what is applied).
fn foreign_removed(body: &[u8], p: u32, partitions: u32) -> Option<RawBatch> {
    let mut b = IngestBatch::decode(body).ok()?;
    b.clicks.retain(|c| partition(c.ad_id, partitions) == p);
    RawBatch::parse(b.encode_to_vec().into()).ok()
}

type Reply = Result<Result<IngestAck, IngestError>, oneshot::error::RecvError>;

/// The outcome of the oldest batch in flight (pending forever when none is).
async fn head(
    q: &mut VecDeque<(u64, oneshot::Receiver<Result<IngestAck, IngestError>>)>,
) -> (u64, Reply) {
    match q.front_mut() {
        Some((seq, rx)) => {
            let r = rx.await;
            (*seq, r)
        }
        None => std::future::pending().await,
    }
}

enum Event {
    Stop,
    Done(u64, Reply),
    /// Boxed: a message is large next to the other events.
    Msg(Box<Option<Result<jetstream::Message, consumer::pull::MessagesError>>>),
}

/// One consumer incarnation: created to start after the committed position, read until
/// an error (`Err`) or `stop` (`Ok`).
async fn consume_once(
    ctx: &Ctx,
    stream: &jetstream::stream::Stream,
    p: u32,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let start = ctx.engine.stream_position(p);
    if start > 0 {
        // What retention removed after the committed position cannot be told apart by
        // partition (sequences are shared), so any of it stops this partition.
        let first = stream.get_info().await.map_err(nats)?.state.first_sequence;
        if first > start + 1 && first > ctx.cfg.accept_gap_before {
            return Err(SourceError::RetentionGap {
                partition: p,
                committed: start,
                first,
            });
        }
        if first > start + 1 {
            tracing::warn!(
                partition = p,
                committed = start,
                first,
                accept_gap_before = ctx.cfg.accept_gap_before,
                "resuming after a retention gap accepted by source.accept_gap_before"
            );
        }
    }
    let name = format!("{}-{p}", ctx.cfg.durable_prefix);
    // A durable's start point cannot be moved: it is re-created at every start, so its
    // delivered state never matters (ours is in the store).
    let _ = stream.delete_consumer(&name).await;
    let deliver_policy = if start == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start + 1,
        }
    };
    let c: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("adclick aggregator, partition {p}")),
            filter_subject: format!("{}.{p}", ctx.cfg.subject_prefix),
            deliver_policy,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let mut msgs = c
        .stream()
        .max_messages_per_batch(ctx.cfg.fetch_batch)
        .messages()
        .await
        .map_err(nats)?;
    tracing::debug!(
        partition = p,
        consumer = name,
        after = start,
        "consumer started"
    );
    let mut prev = start;
    let mut consumer_seq = 0u64;
    let mut inflight = VecDeque::new();
    let result = loop {
        let room = inflight.len() < ctx.cfg.max_in_flight;
        let ev = tokio::select! {
            biased;
            _ = stop.wait_for(|v| *v) => Event::Stop,
            (seq, r) = head(&mut inflight), if !inflight.is_empty() => Event::Done(seq, r),
            m = msgs.next(), if room => Event::Msg(Box::new(m)),
        };
        match ev {
            Event::Stop => break Ok(()),
            Event::Done(seq, r) => {
                inflight.pop_front();
                ctx.metrics
                    .source
                    .position
                    .get_or_create(&PartitionLabel { partition: p })
                    .set(i64::try_from(ctx.engine.stream_position(p)).unwrap_or(i64::MAX));
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        if ctx.engine.stream_position(p) < seq {
                            break Err(SourceError::Refused(p, e.to_string()));
                        }
                        // Refused by admission and passed over (the writer logged it).
                    }
                    // The engine stopped (shutdown, or a failed dedup tier).
                    Err(_) => break Ok(()),
                }
            }
            Event::Msg(m) => match *m {
                None => break Err(SourceError::Nats("the consumer's stream ended".into())),
                Some(Err(e)) => break Err(nats(e)),
                Some(Ok(m)) => {
                    let (sseq, cseq) = match m.info() {
                        Ok(i) => {
                            ctx.metrics
                                .source
                                .pending
                                .get_or_create(&PartitionLabel { partition: p })
                                .set(i64::try_from(i.pending).unwrap_or(i64::MAX));
                            (i.stream_sequence, i.consumer_sequence)
                        }
                        Err(e) => break Err(nats(e)),
                    };
                    if cseq != consumer_seq + 1 {
                        break Err(SourceError::Gap {
                            partition: p,
                            expected_after: consumer_seq,
                            got: cseq,
                        });
                    }
                    consumer_seq = cseq;
                    if sseq <= prev {
                        continue;
                    }
                    if m.payload.len() > ctx.max_message_bytes {
                        tracing::error!(
                            partition = p,
                            stream_seq = sseq,
                            bytes = m.payload.len(),
                            "message larger than ingest.max_message_bytes skipped"
                        );
                        ctx.metrics.source.skip("too_large");
                        continue;
                    }
                    let batch = match RawBatch::parse(m.payload.clone()) {
                        Ok(b) => match owned_clicks(b, p, ctx.partitions) {
                            Ok(b) => b,
                            Err(foreign) => {
                                ctx.metrics.source.foreign_clicks.inc_by(foreign as u64);
                                tracing::error!(
                                    partition = p,
                                    stream_seq = sseq,
                                    foreign,
                                    "clicks of ads of other partitions removed from a message (not published by an adclick collector of this stream?)"
                                );
                                match foreign_removed(&m.payload, p, ctx.partitions) {
                                    Some(b) => b,
                                    None => continue,
                                }
                            }
                        },
                        Err(e) => {
                            // Not ours to fix: skipped (read again, and skipped again, after a
                            // restart that resumes before it).
                            tracing::error!(partition = p, stream_seq = sseq, error = %e, "undecodable message skipped");
                            ctx.metrics.source.skip("undecodable");
                            continue;
                        }
                    };
                    let origin = StreamOrigin {
                        partition: p,
                        stream_seq: sseq,
                        prev,
                    };
                    match ctx.engine.submit_from_stream(batch, origin).await {
                        Ok(rx) => {
                            inflight.push_back((sseq, rx));
                            prev = sseq;
                        }
                        Err(_) => break Ok(()),
                    }
                }
            },
        }
    };
    // Let what is queued settle, so the next incarnation starts after the real position.
    while let Some((_, rx)) = inflight.pop_front() {
        let _ = rx.await;
    }
    result
}
