//! The `grpc` sink (the default): batches go to aggregator shards over
//! `adclick.v1.IngestService.Ingest`, each click to the shard owning `(ad_id, salt)` by
//! rendezvous hashing over the endpoint strings (`routing.rs`). An aggregator acks only
//! once the batch is in its WAL, reports `already_acked` for a `(collector_id, seq)` it had,
//! and lists its hot ads (fed back to `routing::HotAds`). It must not retry or keep state
//! about batches: the pipeline does.

use std::time::Duration;

use adclick_proto::v1::{IngestBatch, IngestClick, ingest_service_client::IngestServiceClient};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::sink::{Delivered, SendError, Sink};
use crate::routing::Router;

/// Largest gRPC message either side may send (a spool record holds at most
/// `spool.max_clicks_per_record` clicks and 8 MiB, well below this).
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
pub struct GrpcSink {
    shards: Vec<IngestServiceClient<Channel>>,
    router: Router,
    auth: Option<MetadataValue<Ascii>>,
}

impl GrpcSink {
    /// A sink to `endpoints` (connections are made lazily, and re-made after errors), each
    /// call bounded by `request_timeout`, presenting `aggregator_key` as a bearer token.
    pub fn new(
        endpoints: &[String],
        request_timeout: Duration,
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
                .timeout(request_timeout.max(Duration::from_millis(1)))
                .tcp_nodelay(true)
                .connect_lazy();
            shards.push(
                IngestServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        }
        Ok(GrpcSink {
            shards,
            router: Router::new(endpoints),
            auth: aggregator_key.and_then(|k| format!("Bearer {k}").parse().ok()),
        })
    }
}

impl Sink for GrpcSink {
    type Batch = IngestBatch;

    fn destinations(&self) -> usize {
        self.shards.len()
    }

    fn route(&self, click: &IngestClick) -> usize {
        self.router.shard(click.ad_id, click.salt)
    }

    fn prepare(&self, _dest: usize, batch: IngestBatch) -> IngestBatch {
        batch
    }

    async fn send(&self, dest: usize, batch: &IngestBatch) -> Result<Delivered, SendError> {
        let Some(shard) = self.shards.get(dest) else {
            return Err(SendError::Refused(format!("no aggregator shard {dest}")));
        };
        // Clients share their shard's connection; a clone per call is cheap.
        let mut client = shard.clone();
        let mut req = tonic::Request::new(batch.clone());
        if let Some(a) = &self.auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        match client.ingest(req).await {
            Ok(resp) => {
                let ack = resp.into_inner();
                Ok(Delivered {
                    duplicate: ack.already_acked,
                    hot_ad_ids: ack.hot_ad_ids,
                })
            }
            Err(status) => {
                let message = format!("{:?}: {}", status.code(), status.message());
                Err(if needs_operator(status.code()) {
                    SendError::Refused(message)
                } else {
                    SendError::Unavailable(message)
                })
            }
        }
    }
}

/// gRPC codes that mean the aggregator refuses what this collector sends (wrong
/// aggregator_key, a refused seq window, a batch it rejects), not that it is unavailable.
fn needs_operator(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
    )
}
