//! The seam between the transport-neutral forwarder (`pipeline.rs`) and a transport: one
//! small trait. A sink knows how many destinations it has, which destination owns a click,
//! and how to deliver one batch to one destination once. It must not retry, read the
//! spool, keep a window or ack anything: the pipeline does all of that, the same way for
//! every sink.

use std::future::Future;

use super::encoded::EncodedBatch;

/// What a destination said when it took a batch durably.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The destination already had this batch (an aggregator's `already_acked`, a
    /// JetStream PubAck with `duplicate`): a resend after a crash or a lost ack.
    pub duplicate: bool,
    /// Ads the destination treats as hot (gRPC aggregators only; informational, see
    /// `routing::HotAds`). Always empty on JetStream: there is no aggregator reply.
    pub hot_ad_ids: Vec<u64>,
}

/// Why one delivery attempt failed. Either way the pipeline retries with backoff (the
/// spool keeps everything); the kind only decides how loudly it is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Unreachable, timed out, overloaded, electing a leader: retrying fixes it.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The destination refuses what this collector sends (wrong credentials, a refused
    /// seq window, a stream that does not match the config, a message above the server's
    /// limit): retrying alone cannot fix it, an operator must act (logged at ERROR).
    #[error("refused: {0}")]
    Refused(String),
}

/// A transport for forwarded batches: `grpc` (collector -> aggregator shards) or
/// `jetstream` (collector -> stream partitions).
///
/// Contract the pipeline relies on: `route` is a pure function of the click's content
/// (so a resend after a crash reaches the same destination with the same clicks), and
/// `send` returns `Ok` only once the destination holds the batch durably and will treat a
/// resend of the same `(collector_id, seq)` for the same destination as a duplicate.
pub trait Sink: Send + Sync + 'static {
    /// A batch made ready for one destination (encoded, addressed), resent as is.
    type Batch: Send + Sync + 'static;

    /// How many destinations there are; fixed for the sink's lifetime.
    fn destinations(&self) -> usize;

    /// The destination (`0..destinations()`) owning a click on `ad_id` with fanout `salt`
    /// (the only fields the forwarder reads from a spooled click: it routes without
    /// decoding the rest).
    fn route(&self, ad_id: u64, salt: u32) -> usize;

    /// Readies `batch` (its clicks already routed to `dest`, already encoded as an
    /// `IngestBatch`) for sending; called once per batch, before the first attempt.
    fn prepare(&self, dest: usize, batch: EncodedBatch) -> Self::Batch;

    /// One delivery attempt of `batch` to `dest`.
    fn send(
        &self,
        dest: usize,
        batch: &Self::Batch,
    ) -> impl Future<Output = Result<Delivered, SendError>> + Send;
}
