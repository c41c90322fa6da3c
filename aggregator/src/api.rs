//! The query API seam: what answers `QueryService` and the HTTP mirror, whatever holds the
//! counts. [`Api`] does everything a query needs before and after the counts (API-key
//! authorisation, per-key rate limits, latency and refusal metrics, CORS for the HTTP
//! port) and hands the request to a [`QueryBackend`]:
//!
//! - the local engine (`grpc::Query`, over this process's view), in `adclick aggregator`;
//! - the query front (`front::Shards`, tonic clients to the aggregator shards that own the
//!   requested ads), in `adclick query-front`.
//!
//! So both processes serve one gRPC service implementation and one HTTP mirror
//! (`http.rs`), not copies. A backend never sees an unauthorised request; it must not
//! authorise again itself (the front forwards the caller's `authorization` to the shards,
//! which scope what they answer to the key's advertiser).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use adclick_proto::v1::query_service_server::QueryService;
use adclick_proto::v1::{
    BatchGetAdClicksRequest, BatchGetAdClicksResponse, BreakdownRequest, BreakdownResponse,
    GetAdClicksRequest, GetAdClicksResponse, TopAdsRequest, TopAdsResponse,
};
use tonic::{Request, Response, Status};

use crate::config::ApiKey;
use crate::cors::Cors;
use crate::grpc;
use crate::metrics::{Metrics, RpcLabel};
use crate::query::{self, Caller, QueryError};
use crate::ratelimit::RateLimiter;

/// Why a backend did not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The request was refused by this process's own checks (gRPC INVALID_ARGUMENT /
    /// UNAUTHENTICATED, HTTP 400 / 401; see `grpc::status` and `http::problem_of`).
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A status to answer as it is: a shard's refusal passed through unchanged
    /// (INVALID_ARGUMENT with its `BadRequest` details, RESOURCE_EXHAUSTED, ...), or
    /// UNAVAILABLE naming a shard that did not answer. HTTP maps it with
    /// `http::status_problem`.
    #[error("{}", .0.message())]
    Status(Status),
}

impl BackendError {
    /// The gRPC status to answer.
    pub fn into_status(self) -> Status {
        match self {
            BackendError::Query(e) => grpc::status(e),
            BackendError::Status(s) => s,
        }
    }

    /// The `reason` label of `adclick_aggregator_queries_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::Query(e) => grpc::refusal_reason(e),
            BackendError::Status(s) => match s.code() {
                tonic::Code::InvalidArgument => "invalid_argument",
                tonic::Code::Unauthenticated => "unauthenticated",
                tonic::Code::ResourceExhausted => "rate_limited",
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => "unavailable",
                _ => "backend_error",
            },
        }
    }
}

/// Who asks, as [`Api`] established it.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The authorised caller.
    pub caller: Caller,
    /// The caller's `authorization` value, as sent (the front forwards it to the shards).
    pub authorization: Option<String>,
    /// Wall clock of the request (ms): `TopAds.last_minutes` and HTTP `last_minutes`.
    pub now_ms: i64,
}

/// What answers the four queries. Implementations validate what they read (the local
/// engine every field; the front what it needs to route, the shards the rest) and never
/// authorise: [`Api`] did.
#[tonic::async_trait]
pub trait QueryBackend: Debug + Send + Sync + 'static {
    /// `GetAdClicks`.
    async fn ad_clicks(
        &self,
        ctx: &Ctx,
        req: GetAdClicksRequest,
    ) -> Result<GetAdClicksResponse, BackendError>;
    /// `BatchGetAdClicks`.
    async fn batch_ad_clicks(
        &self,
        ctx: &Ctx,
        req: BatchGetAdClicksRequest,
    ) -> Result<BatchGetAdClicksResponse, BackendError>;
    /// `Breakdown`.
    async fn breakdown(
        &self,
        ctx: &Ctx,
        req: BreakdownRequest,
    ) -> Result<BreakdownResponse, BackendError>;
    /// `TopAds`.
    async fn top_ads(&self, ctx: &Ctx, req: TopAdsRequest) -> Result<TopAdsResponse, BackendError>;
    /// Why queries cannot be answered right now (empty: ready): `/readyz`, gRPC health.
    fn not_ready(&self) -> Vec<String>;
}

/// `QueryService` and the HTTP mirror over a [`QueryBackend`]: keys, rate limits, metrics.
#[derive(Debug, Clone)]
pub struct Api {
    /// What answers.
    pub backend: Arc<dyn QueryBackend>,
    /// Allowed keys.
    pub keys: Arc<Vec<ApiKey>>,
    /// `query.allow_unauthenticated`: no key = admin.
    pub allow_unauthenticated: bool,
    /// Metrics (`/metrics` renders them).
    pub metrics: Arc<Metrics>,
    /// Per-key query rate limits (`ratelimit.rs`).
    pub limiter: Arc<RateLimiter>,
    /// Origins allowed to call from a web page (`cors.rs`; the HTTP mirror and gRPC-Web).
    pub cors: Arc<Cors>,
}

impl Api {
    /// Resolves the caller from an `authorization` header value. Without one, and only
    /// with `query.allow_unauthenticated`, the caller is admin (a trusted network).
    pub fn authorize(&self, header: Option<&str>) -> Result<Caller, QueryError> {
        match header {
            None if self.allow_unauthenticated => Ok(Caller::Admin),
            h => query::authorize(&self.keys, h),
        }
    }

    /// Counts a refused query by rpc and reason (`adclick_aggregator_queries_refused_total`).
    pub fn count_refusal(&self, rpc: &'static str, e: &BackendError) {
        self.metrics.refuse_query(rpc, e.reason());
    }

    /// Authorises `header` and charges its rate limit: the context for the backend.
    pub fn context(&self, header: Option<&str>, rpc: &'static str) -> Result<Ctx, Status> {
        let caller = self.authorize(header).map_err(|e| {
            self.metrics.refuse_query(rpc, grpc::refusal_reason(&e));
            grpc::status(e)
        })?;
        // After authorisation: only a known key (or the keyless admin) has a bucket.
        self.limiter.check(header).map_err(|l| {
            self.metrics.refuse_query(rpc, "rate_limited");
            grpc::rate_limited(&l)
        })?;
        Ok(Ctx {
            caller,
            authorization: header.map(str::to_string),
            now_ms: crate::view::now_ms(),
        })
    }

    /// Runs `f` timed (`adclick_aggregator_query_seconds{rpc}`), counting a refusal.
    pub async fn timed<T>(
        &self,
        rpc: &'static str,
        f: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let t = Instant::now();
        let out = f.await;
        self.observe(rpc, t, out.as_ref().err());
        out
    }

    /// Records one query's latency (`adclick_aggregator_query_seconds{rpc}`) and, when it
    /// was refused, the refusal.
    pub fn observe(&self, rpc: &'static str, started: Instant, refused: Option<&BackendError>) {
        self.metrics
            .query_seconds
            .get_or_create(&RpcLabel { rpc })
            .observe(started.elapsed().as_secs_f64());
        if let Some(e) = refused {
            self.count_refusal(rpc, e);
        }
    }

    fn grpc_ctx<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<Ctx, Status> {
        let h = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.context(h, rpc)
    }
}

#[tonic::async_trait]
impl QueryService for Api {
    async fn get_ad_clicks(
        &self,
        req: Request<GetAdClicksRequest>,
    ) -> Result<Response<GetAdClicksResponse>, Status> {
        let ctx = self.grpc_ctx(&req, "GetAdClicks")?;
        let r = req.into_inner();
        self.timed("GetAdClicks", self.backend.ad_clicks(&ctx, r))
            .await
            .map(Response::new)
            .map_err(BackendError::into_status)
    }

    async fn batch_get_ad_clicks(
        &self,
        req: Request<BatchGetAdClicksRequest>,
    ) -> Result<Response<BatchGetAdClicksResponse>, Status> {
        let ctx = self.grpc_ctx(&req, "BatchGetAdClicks")?;
        let r = req.into_inner();
        self.timed("BatchGetAdClicks", self.backend.batch_ad_clicks(&ctx, r))
            .await
            .map(Response::new)
            .map_err(BackendError::into_status)
    }

    async fn breakdown(
        &self,
        req: Request<BreakdownRequest>,
    ) -> Result<Response<BreakdownResponse>, Status> {
        let ctx = self.grpc_ctx(&req, "Breakdown")?;
        let r = req.into_inner();
        self.timed("Breakdown", self.backend.breakdown(&ctx, r))
            .await
            .map(Response::new)
            .map_err(BackendError::into_status)
    }

    async fn top_ads(
        &self,
        req: Request<TopAdsRequest>,
    ) -> Result<Response<TopAdsResponse>, Status> {
        let ctx = self.grpc_ctx(&req, "TopAds")?;
        let r = req.into_inner();
        self.timed("TopAds", self.backend.top_ads(&ctx, r))
            .await
            .map(Response::new)
            .map_err(BackendError::into_status)
    }
}
