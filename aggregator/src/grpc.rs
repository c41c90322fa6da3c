//! The gRPC front: `IngestService` (collectors), `QueryService` (advertisers, API keys in
//! `authorization: Bearer <key>` metadata), server reflection and health. Converts
//! between wire messages and the engine/query layer; holds no state of its own.

use std::sync::Arc;
use std::time::Instant;

use adclick_proto::v1::ingest_service_server::IngestService;
use adclick_proto::v1::query_service_server::QueryService;
use adclick_proto::v1::{
    GetAdClicksRequest, GetAdClicksResponse, IngestAck, IngestBatch, TopAdsRequest, TopAdsResponse,
};
use tonic::{Request, Response, Status};

use crate::config::{ApiKey, QueryConfig};
use crate::engine::{Engine, View};
use crate::metrics::{Metrics, RpcLabel};
use crate::query::{self, Caller, QueryError};

/// Largest gRPC message accepted (collector batches are far smaller).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// `IngestService` over the engine.
#[derive(Debug, Clone)]
pub struct Ingest {
    /// The engine.
    pub engine: Engine,
    /// Accepted collector secrets (empty: open).
    pub keys: Arc<Vec<String>>,
}

#[tonic::async_trait]
impl IngestService for Ingest {
    async fn ingest(&self, req: Request<IngestBatch>) -> Result<Response<IngestAck>, Status> {
        if !self.keys.is_empty() {
            let h = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            let token = h.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
            if !self.keys.iter().any(|k| query::constant_time_eq(k, token)) {
                return Err(Status::unauthenticated(
                    "ingest needs `authorization: Bearer <ingest key>` (collector `aggregator_key`)",
                ));
            }
        }
        let batch = req.into_inner();
        if batch.collector_id.is_empty() || batch.seq == 0 {
            return Err(Status::invalid_argument(
                "collector_id must be set and seq must be >= 1",
            ));
        }
        self.engine
            .ingest(batch)
            .await
            .map(Response::new)
            .map_err(Status::unavailable)
    }
}

/// `QueryService` over the shared view.
#[derive(Debug, Clone)]
pub struct Query {
    /// State to read.
    pub view: Arc<View>,
    /// Allowed keys.
    pub keys: Arc<Vec<ApiKey>>,
    /// Limits.
    pub cfg: QueryConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

fn status(e: QueryError) -> Status {
    match e {
        QueryError::Unauthenticated => Status::unauthenticated(e.to_string()),
        QueryError::InvalidArgument(m) => Status::invalid_argument(m),
    }
}

impl Query {
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let h = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        query::authorize(&self.keys, h).map_err(status)
    }

    fn timed<T>(&self, rpc: &'static str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.metrics
            .query_seconds
            .get_or_create(&RpcLabel { rpc })
            .observe(t.elapsed().as_secs_f64());
        out
    }
}

#[tonic::async_trait]
impl QueryService for Query {
    async fn get_ad_clicks(
        &self,
        req: Request<GetAdClicksRequest>,
    ) -> Result<Response<GetAdClicksResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        self.timed("GetAdClicks", || {
            query::get_ad_clicks(&self.view, caller, &r, &self.cfg)
        })
        .map(Response::new)
        .map_err(status)
    }

    async fn top_ads(
        &self,
        req: Request<TopAdsRequest>,
    ) -> Result<Response<TopAdsResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        self.timed("TopAds", || {
            query::top_ads(&self.view, caller, &r, &self.cfg, query::now_ms())
        })
        .map(Response::new)
        .map_err(status)
    }
}
