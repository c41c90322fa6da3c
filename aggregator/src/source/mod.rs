//! Where batches come from besides gRPC ingest: `[source] kind = "jetstream"` makes this
//! aggregator a shard reading a set of partitions of the NATS JetStream clicks stream
//! (`jetstream`), schema in `config`. The gRPC `IngestService` stays served either way
//! (`grpc` is the default and changes nothing).
//!
//! It must not touch windows, the WAL or the store: it hands batches to the engine, which
//! owns admission, dedup and durability.

pub mod config;
pub mod jetstream;
pub mod metrics;

use std::sync::Arc;

use tokio::sync::watch;

use crate::Metrics;
use crate::engine::Engine;
use crate::view::View;
pub use config::{SourceConfig, SourceKind};

/// Starts the configured source (none for `grpc`); it stops when `stop` turns true.
pub fn start(
    cfg: &SourceConfig,
    engine: &Engine,
    view: &Arc<View>,
    metrics: &Arc<Metrics>,
    max_message_bytes: usize,
    stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    match cfg.kind {
        SourceKind::Grpc => None,
        SourceKind::Jetstream => {
            // Checked by `AggregatorConfig::validate` before the engine started.
            let owned = cfg.owned().ok()?;
            Some(jetstream::spawn(
                cfg.clone(),
                owned,
                engine.clone(),
                view.clone(),
                metrics.clone(),
                max_message_bytes,
                stop,
            ))
        }
    }
}
