//! The gRPC front: `IngestService` (collectors), `QueryService` (advertisers, API keys in
//! `authorization: Bearer <key>` metadata; `api::Api` serves it over [`Query`], the local
//! engine), server reflection and health. Converts
//! between wire messages and the engine/query layer; holds no state of its own.
//!
//! `IngestService` is served by a hand-written [`IngestServer`] rather than the generated
//! one, for two reasons: the ingest key is checked from the request headers before a byte
//! of the body is read or decoded (an unauthenticated caller costs a header parse), and the
//! body is decoded by [`decode_ingest`], which answers INVALID_ARGUMENT with a message for
//! bytes that are not an `IngestBatch` (the generated prost codec says INTERNAL). The
//! message size is capped by `ingest.max_message_bytes`, checked against the gRPC frame
//! header before the body is buffered.
//!
//! `IngestAck.accepted` / `duplicate` are advisory (see `engine.rs`): they describe what one
//! delivery applied, and a redelivery reports 0 even when the first one counted clicks.
//!
//! A query with invalid fields gets INVALID_ARGUMENT whose details carry a
//! `google.rpc.BadRequest` with one field violation per problem (`field` = the field path,
//! e.g. `filter.country[0]`; `reason` = a code such as `MALFORMED`; `description`), read
//! with `tonic_types::StatusExt::get_error_details`. The message lists the first few.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use adclick_proto::v1::{
    BatchGetAdClicksRequest, BatchGetAdClicksResponse, BreakdownRequest, BreakdownResponse,
    GetAdClicksRequest, GetAdClicksResponse, IngestAck, TopAdsRequest, TopAdsResponse,
};
use bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::api::{BackendError, Ctx, QueryBackend};
use crate::config::{ApiKey, QueryConfig};
use crate::cors::Cors;
use crate::decode::RawBatch;
use crate::engine::{Engine, IngestError};
use crate::metrics::Metrics;
use crate::query::{self, Caller, QueryError};
use crate::ratelimit::{Limited, RateLimiter};
use crate::validate::{self, Limits, Violations};
use crate::view::View;

/// Largest gRPC message the query service decodes or any service encodes (queries and acks
/// are small; ingest has its own, configured, cap).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Largest query answer encoded (and, in the query front, decoded from a shard): a
/// `BatchGetAdClicks` of 100 ads or a `GetTotals` with sketches for the front (1,000
/// buckets of up to 12 KiB) stays under it.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Longest `collector_id` accepted (the collector's own config allows 1 to 128 characters).
pub const MAX_COLLECTOR_ID_LEN: usize = 128;

/// Decodes and validates one `IngestBatch` body: the one function between the wire and the
/// engine (every click is checked decodable here, in the connection's task, so the engine's
/// writer only ever meets good batches). Every failure is INVALID_ARGUMENT naming what is
/// wrong; it never panics.
pub fn decode_ingest(mut buf: impl Buf) -> Result<RawBatch, Status> {
    let batch = RawBatch::parse(buf.copy_to_bytes(buf.remaining()))
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if batch.collector_id.is_empty() || batch.collector_id.len() > MAX_COLLECTOR_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "collector_id must be 1 to {MAX_COLLECTOR_ID_LEN} bytes"
        )));
    }
    if batch.seq == 0 {
        return Err(Status::invalid_argument("seq must be >= 1"));
    }
    Ok(batch)
}

/// The ingest side: key check and hand-over to the engine.
#[derive(Debug, Clone)]
pub struct Ingest {
    /// The engine.
    pub engine: Engine,
    /// Accepted collector secrets (never empty: the config refuses that).
    pub keys: Arc<Vec<String>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl Ingest {
    /// Checks `authorization: Bearer <ingest key>` from the headers alone.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        // Every key is compared, so timing does not say which one matched.
        let ok = self
            .keys
            .iter()
            .fold(false, |ok, k| query::constant_time_eq(k, token) | ok);
        if ok {
            Ok(())
        } else {
            self.metrics.refuse_ingest("unauthenticated");
            Err(Status::unauthenticated(
                "ingest needs `authorization: Bearer <ingest key>` (collector `aggregator_key`)",
            ))
        }
    }

    /// Hands a decoded batch to the engine.
    pub async fn ingest(&self, batch: RawBatch) -> Result<IngestAck, Status> {
        self.engine.ingest(batch).await.map_err(|e| match e {
            IngestError::SeqOutOfWindow { .. } => Status::failed_precondition(e.to_string()),
            IngestError::Unavailable(m) => Status::unavailable(m),
        })
    }
}

/// `adclick.v1.IngestService` over [`Ingest`]: authenticates from the headers, then
/// decodes with [`decode_ingest`] under `max_message_bytes`.
#[derive(Debug, Clone)]
pub struct IngestServer {
    ingest: Arc<Ingest>,
    max_message_bytes: usize,
}

impl IngestServer {
    /// Serves `ingest`, refusing messages larger than `max_message_bytes`.
    pub fn new(ingest: Ingest, max_message_bytes: usize) -> Self {
        IngestServer {
            ingest: Arc::new(ingest),
            max_message_bytes,
        }
    }
}

impl NamedService for IngestServer {
    const NAME: &'static str = "adclick.v1.IngestService";
}

fn status_response(status: Status) -> http::Response<tonic::body::Body> {
    status.into_http()
}

impl<B> Service<http::Request<B>> for IngestServer
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/adclick.v1.IngestService/Ingest" {
            let resp = status_response(Status::unimplemented("unknown method"));
            return Box::pin(async move { Ok(resp) });
        }
        // Before the body: an unauthenticated caller never gets a byte buffered or decoded
        // (dropping the request resets the HTTP/2 stream).
        if let Err(status) = self.ingest.authenticate(req.headers()) {
            drop(req);
            let resp = status_response(status);
            return Box::pin(async move { Ok(resp) });
        }
        let method = IngestMethod(self.ingest.clone());
        let mut grpc = tonic::server::Grpc::new(IngestCodec {
            metrics: self.ingest.metrics.clone(),
        })
        .apply_max_message_size_config(Some(self.max_message_bytes), Some(MAX_MESSAGE_BYTES));
        Box::pin(async move { Ok(grpc.unary(method, req).await) })
    }
}

struct IngestMethod(Arc<Ingest>);

impl UnaryService<RawBatch> for IngestMethod {
    type Response = IngestAck;
    type Future = BoxFuture<Response<IngestAck>, Status>;

    fn call(&mut self, req: Request<RawBatch>) -> Self::Future {
        let ingest = self.0.clone();
        Box::pin(async move { ingest.ingest(req.into_inner()).await.map(Response::new) })
    }
}

/// Acks out with prost, batches in with [`decode_ingest`].
#[derive(Debug, Clone)]
struct IngestCodec {
    metrics: Arc<Metrics>,
}

impl Codec for IngestCodec {
    type Encode = IngestAck;
    type Decode = RawBatch;
    type Encoder = AckEncoder;
    type Decoder = IngestCodec;

    fn encoder(&mut self) -> AckEncoder {
        AckEncoder
    }

    fn decoder(&mut self) -> IngestCodec {
        self.clone()
    }
}

#[derive(Debug)]
struct AckEncoder;

impl Encoder for AckEncoder {
    type Item = IngestAck;
    type Error = Status;

    fn encode(&mut self, item: IngestAck, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("cannot encode IngestAck: {e}")))
    }
}

impl Decoder for IngestCodec {
    type Item = RawBatch;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RawBatch>, Status> {
        decode_ingest(src).map(Some).inspect_err(|_| {
            self.metrics.refuse_ingest("invalid_argument");
        })
    }
}

/// The local query engine over the shared view: the [`QueryBackend`] of `adclick
/// aggregator` (`api::Api` serves it over gRPC and the HTTP mirror).
#[derive(Debug, Clone)]
pub struct Query {
    /// State to read.
    pub view: Arc<View>,
    /// Allowed keys.
    pub keys: Arc<Vec<ApiKey>>,
    /// Limits.
    pub cfg: QueryConfig,
    /// What requests are validated against (from `cfg` and the window retention).
    pub limits: Limits,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-key query rate limits (`ratelimit.rs`).
    pub limiter: Arc<RateLimiter>,
    /// Origins allowed to call from a web page (`cors.rs`; the HTTP mirror and gRPC-Web).
    pub cors: Arc<Cors>,
}

/// RESOURCE_EXHAUSTED for a key over its rate limit, with a `google.rpc.RetryInfo` saying
/// when to retry (`tonic_types::StatusExt::get_details_retry_info`).
pub fn rate_limited(l: &Limited) -> Status {
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        l.to_string(),
        ErrorDetails::with_retry_info(Some(l.retry_after)),
    )
}

/// The gRPC status of a refused query: UNAUTHENTICATED, or INVALID_ARGUMENT with a
/// `google.rpc.BadRequest` naming every invalid field.
pub fn status(e: QueryError) -> Status {
    match e {
        QueryError::Unauthenticated => Status::unauthenticated(e.to_string()),
        QueryError::InvalidArgument(m) => Status::invalid_argument(m),
        QueryError::Invalid(v) => bad_request(&v),
        QueryError::Unavailable(m) => Status::unavailable(m),
    }
}

fn bad_request(v: &Violations) -> Status {
    let violations: Vec<FieldViolation> = v
        .list()
        .iter()
        .map(|x| FieldViolation {
            field: x.field.to_string(),
            description: x.description.clone(),
            reason: x.reason.code().into(),
            localized_message: None,
        })
        .collect();
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        v.to_string(),
        ErrorDetails::with_bad_request(violations),
    )
}

impl Query {
    /// Resolves the caller from an `authorization` header value. Without one, and only
    /// with `query.allow_unauthenticated`, the caller is admin (a trusted network).
    pub fn authorize(&self, header: Option<&str>) -> Result<Caller, QueryError> {
        match header {
            None if self.cfg.allow_unauthenticated => Ok(Caller::Admin),
            h => query::authorize(&self.keys, h),
        }
    }

    /// `GetAdClicks` for `caller`: every field validated, then answered.
    pub fn ad_clicks(
        &self,
        caller: Caller,
        req: &GetAdClicksRequest,
    ) -> Result<GetAdClicksResponse, QueryError> {
        query::get_ad_clicks(&self.view, caller, req, &self.limits)
    }

    /// `BatchGetAdClicks` for `caller`: ids and shared fields validated, then answered.
    pub fn batch_ad_clicks(
        &self,
        caller: Caller,
        req: &BatchGetAdClicksRequest,
    ) -> Result<BatchGetAdClicksResponse, QueryError> {
        query::batch_get_ad_clicks(&self.view, caller, req, &self.limits)
    }

    /// `Breakdown` for `caller`: every field validated, then answered.
    pub fn breakdown(
        &self,
        caller: Caller,
        req: &BreakdownRequest,
    ) -> Result<BreakdownResponse, QueryError> {
        query::breakdown(&self.view, caller, req, &self.limits)
    }

    /// `GetTotals` for `caller`: every field validated, then answered.
    pub fn totals(
        &self,
        caller: Caller,
        req: &adclick_proto::v1::GetTotalsRequest,
    ) -> Result<adclick_proto::v1::GetTotalsResponse, QueryError> {
        query::get_totals(&self.view, caller, req, &self.limits)
    }

    /// `TopAds` for `caller` at `now_ms`: every field validated (`validate::top_ads`, so
    /// the range is checked against the retention and the watermark), then answered.
    pub fn top(
        &self,
        caller: Caller,
        req: &TopAdsRequest,
        now_ms: i64,
    ) -> Result<TopAdsResponse, QueryError> {
        let watermark_ms = self
            .view
            .watermark_ms
            .load(std::sync::atomic::Ordering::Acquire);
        validate::top_ads(req, &self.limits, watermark_ms, now_ms)?;
        query::top_ads(&self.view, caller, req, &self.cfg, now_ms)
    }
}

/// The `reason` label of a refused query: unauthenticated, or the first invalid field's.
pub fn refusal_reason(e: &QueryError) -> &'static str {
    match e {
        QueryError::Unauthenticated => "unauthenticated",
        QueryError::InvalidArgument(_) => "invalid_argument",
        QueryError::Unavailable(_) => "unavailable",
        QueryError::Invalid(v) => v.first_reason().map_or("invalid_argument", |r| r.label()),
    }
}

/// The local engine behind the API seam (`api.rs`): this process's view, answered at
/// once (the sync methods above never wait on I/O).
#[tonic::async_trait]
impl QueryBackend for Query {
    async fn ad_clicks(
        &self,
        ctx: &Ctx,
        req: GetAdClicksRequest,
    ) -> Result<GetAdClicksResponse, BackendError> {
        Ok(Query::ad_clicks(self, ctx.caller, &req)?)
    }

    async fn batch_ad_clicks(
        &self,
        ctx: &Ctx,
        req: BatchGetAdClicksRequest,
    ) -> Result<BatchGetAdClicksResponse, BackendError> {
        Ok(Query::batch_ad_clicks(self, ctx.caller, &req)?)
    }

    async fn breakdown(
        &self,
        ctx: &Ctx,
        req: BreakdownRequest,
    ) -> Result<BreakdownResponse, BackendError> {
        Ok(Query::breakdown(self, ctx.caller, &req)?)
    }

    async fn top_ads(&self, ctx: &Ctx, req: TopAdsRequest) -> Result<TopAdsResponse, BackendError> {
        Ok(self.top(ctx.caller, &req, ctx.now_ms)?)
    }

    async fn totals(
        &self,
        ctx: &Ctx,
        req: adclick_proto::v1::GetTotalsRequest,
    ) -> Result<adclick_proto::v1::GetTotalsResponse, BackendError> {
        Ok(Query::totals(self, ctx.caller, &req)?)
    }

    fn not_ready(&self) -> Vec<String> {
        self.view
            .ready
            .reasons()
            .into_iter()
            .map(str::to_string)
            .collect()
    }
}

impl Query {
    /// The API over this engine: keys, rate limits, metrics and CORS from this query's.
    pub fn api(self) -> crate::api::Api {
        crate::api::Api {
            keys: self.keys.clone(),
            allow_unauthenticated: self.cfg.allow_unauthenticated,
            metrics: self.metrics.clone(),
            limiter: self.limiter.clone(),
            cors: self.cors.clone(),
            watchers: Arc::new(crate::live::Watchers::new(&self.cfg)),
            backend: Arc::new(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adclick_proto::v1::{IngestBatch, IngestClick};
    use proptest::prelude::*;

    fn batch(collector_id: &str, seq: u64, clicks: usize) -> Vec<u8> {
        IngestBatch {
            collector_id: collector_id.into(),
            seq,
            clicks: vec![
                IngestClick {
                    impression_id: vec![7; 16],
                    ad_id: 1,
                    ..Default::default()
                };
                clicks
            ],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn valid_batches_decode_and_bad_ones_name_the_field() {
        let b = decode_ingest(&batch("edge-1", 3, 2)[..]).unwrap();
        assert_eq!((b.collector_id.as_str(), b.seq, b.clicks), ("edge-1", 3, 2));
        for (bytes, field) in [
            (batch("", 1, 0), "collector_id"),
            (batch(&"x".repeat(129), 1, 0), "collector_id"),
            (batch("edge-1", 0, 0), "seq"),
            (vec![0xff, 0xff, 0xff], "undecodable IngestBatch"),
        ] {
            let e = decode_ingest(&bytes[..]).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(field), "{}", e.message());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary bytes: never a panic, every refusal is INVALID_ARGUMENT with a message.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Err(e) = decode_ingest(&bytes[..]) {
                prop_assert_eq!(e.code(), tonic::Code::InvalidArgument);
                prop_assert!(!e.message().is_empty());
            }
        }

        /// A valid batch with bytes flipped or cut: same.
        #[test]
        fn mutated_batches_never_panic(
            n in 0usize..20,
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        ) {
            let mut bytes = batch("edge-1", 9, n);
            for (i, v) in flips {
                let i = i.index(bytes.len());
                bytes[i] = v;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            match decode_ingest(&bytes[..]) {
                Ok(b) => prop_assert!(!b.collector_id.is_empty() && b.seq >= 1),
                Err(e) => prop_assert_eq!(e.code(), tonic::Code::InvalidArgument),
            }
        }
    }
}
