//! Forwarding: spool records to the back end, then spool truncation.
//!
//! Split at one seam. The transport-neutral part (`pipeline.rs`, with the window
//! bookkeeping in `window.rs`) reads durable spool records in order, routes each record's
//! clicks to destinations, sends one batch per owning destination with `seq` = the
//! record's seq, retries with backoff, and truncates the spool at the contiguous point
//! below which every owning destination acked every record. A [`Sink`] (`sink.rs`) is the
//! transport: how many destinations, which one owns a click, and one delivery attempt.
//!
//! Spool records are split into per-destination batches without decoding a click
//! ([`encoded`]): with one destination a record goes out as it was written.
//!
//! - [`grpc`]: aggregator shards over `IngestService.Ingest` (the default,
//!   `forward.sink = "grpc"`), routed by rendezvous hashing; acks carry hot-key feedback.
//! - [`jetstream`]: partitions of a NATS JetStream stream (`forward.sink = "jetstream"`),
//!   routed by `adclick_proto::partition`; acked by the server's PubAck, deduplicated by
//!   `Nats-Msg-Id`.

pub mod encoded;
pub mod grpc;
pub mod jetstream;
mod pipeline;
mod sink;
mod window;

pub use encoded::EncodedBatch;
pub use grpc::{EndpointError, GrpcSink};
pub use jetstream::{JetStreamError, JetStreamSink};
pub use pipeline::{Forwarder, MAX_IN_FLIGHT_BYTES};
pub use sink::{Delivered, SendError, Sink};
