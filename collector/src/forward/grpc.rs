//! The `grpc` sink (the default): batches go to aggregator shards over
//! `adclick.v1.IngestService.Ingest`, each click to the shard owning `(ad_id, salt)` by
//! rendezvous hashing over the endpoint strings (`routing.rs`). An aggregator acks only
//! once the batch is in its WAL, reports `already_acked` for a `(collector_id, seq)` it had,
//! and lists its hot ads (fed back to `routing::HotAds`). It must not retry or keep state
//! about batches: the pipeline does.

use std::time::Duration;

use adclick_proto::v1::IngestAck;
use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::encoded::EncodedBatch;

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
    shards: Vec<Grpc<Channel>>,
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
                Grpc::new(channel)
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
    type Batch = EncodedBatch;

    fn destinations(&self) -> usize {
        self.shards.len()
    }

    fn route(&self, ad_id: u64, salt: u32) -> usize {
        self.router.shard(ad_id, salt)
    }

    fn prepare(&self, _dest: usize, batch: EncodedBatch) -> EncodedBatch {
        batch
    }

    async fn send(&self, dest: usize, batch: &EncodedBatch) -> Result<Delivered, SendError> {
        let Some(shard) = self.shards.get(dest) else {
            return Err(SendError::Refused(format!("no aggregator shard {dest}")));
        };
        // Clients share their shard's connection; a clone per call is cheap.
        let mut client = shard.clone();
        // The batch's bytes as encoded once (a `Bytes` clone per attempt, no re-encoding).
        let mut req = tonic::Request::new(batch.bytes.clone());
        if let Some(a) = &self.auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        if let Err(e) = client.ready().await {
            return Err(SendError::Unavailable(format!("connection not ready: {e}")));
        }
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(INGEST_PATH);
        match client.unary(req, path, RawCodec).await {
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

/// `adclick.v1.IngestService/Ingest`.
const INGEST_PATH: &str = "/adclick.v1.IngestService/Ingest";

/// Encoded `IngestBatch` bytes out as they are, `IngestAck` in with prost: the generated
/// client would need a decoded `IngestBatch` to encode again.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = IngestAck;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = IngestAck;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<IngestAck>, tonic::Status> {
        IngestAck::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("undecodable IngestAck: {e}")))
    }
}
