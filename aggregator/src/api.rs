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
    GetAdClicksRequest, GetAdClicksResponse, GetTotalsRequest, GetTotalsResponse, TopAdsRequest,
    TopAdsResponse, WatchAdClicksRequest, WatchTopAdsRequest,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::config::ApiKey;
use crate::cors::Cors;
use crate::grpc;
use crate::live::Update;
use crate::metrics::{Metrics, RpcLabel};
use crate::query::{self, Caller, QueryError};
use crate::ratelimit::RateLimiter;

/// A watch as a gRPC stream: its answers (heartbeats dropped: HTTP/2 PINGs keep the
/// connection), then the status that ended it, if any.
pub type WatchStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

fn grpc_stream<T: Send + 'static>(rx: mpsc::Receiver<Update<T>>) -> WatchStream<T> {
    use tokio_stream::StreamExt;
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).filter_map(Result::transpose))
}

/// Names a watch request's query fields under `query.` (the field of the watch request
/// that holds them); `interval_ms` is the watch request's own, and so is `last_minutes`
/// when `own_last_minutes` (WatchAdClicks).
fn under_query(e: BackendError, own_last_minutes: bool) -> BackendError {
    use crate::validate::Field;
    match e {
        BackendError::Query(QueryError::Invalid(v)) => {
            QueryError::Invalid(v.map_fields(|f| match f {
                Field::IntervalMs | Field::Param(_) => f,
                Field::LastMinutes if own_last_minutes => f,
                f => Field::Param(format!("query.{f}")),
            }))
            .into()
        }
        e => e,
    }
}

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

/// What answers the queries. Implementations validate what they read (the local
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
    /// `GetTotals`.
    async fn totals(
        &self,
        ctx: &Ctx,
        req: GetTotalsRequest,
    ) -> Result<GetTotalsResponse, BackendError>;
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
    /// Open watches and their limits (`live.rs`).
    pub watchers: Arc<crate::live::Watchers>,
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

    /// Opens a watch of `TopAds` (`live.rs`): the interval checked, a slot taken, the
    /// first answer computed (an invalid query is refused here, before anything streams).
    pub async fn watch_top(
        &self,
        ctx: Ctx,
        query: TopAdsRequest,
        interval_ms: u32,
    ) -> Result<mpsc::Receiver<Update<TopAdsResponse>>, BackendError> {
        self.watch(ctx, "WatchTopAds", interval_ms, move |backend, ctx| {
            let query = query.clone();
            async move { backend.top_ads(&ctx, query).await }
        })
        .await
    }

    /// Opens a watch of `GetAdClicks`: as [`Api::watch_top`]; `request(now_ms)` is the
    /// query at each interval (a sliding range moves with the clock).
    pub async fn watch_ad_clicks(
        &self,
        ctx: Ctx,
        request: impl Fn(i64) -> Result<GetAdClicksRequest, BackendError> + Send + Sync + 'static,
        interval_ms: u32,
    ) -> Result<mpsc::Receiver<Update<GetAdClicksResponse>>, BackendError> {
        self.watch(ctx, "WatchAdClicks", interval_ms, move |backend, ctx| {
            let request = request(ctx.now_ms);
            async move { backend.ad_clicks(&ctx, request?).await }
        })
        .await
    }

    /// A watch of `ask`: its slot and interval, the first answer now (timed and counted
    /// like a query), then `live::spawn` re-asking at each interval with the clock of
    /// that moment.
    async fn watch<T, F, Fut>(
        &self,
        ctx: Ctx,
        rpc: &'static str,
        interval_ms: u32,
        ask: F,
    ) -> Result<mpsc::Receiver<Update<T>>, BackendError>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(Arc<dyn QueryBackend>, Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, BackendError>> + Send + 'static,
    {
        let (slot, interval) = self.watch_slot(&ctx, rpc, interval_ms)?;
        let first = self
            .timed(rpc, ask(self.backend.clone(), ctx.clone()))
            .await?;
        let backend = self.backend.clone();
        Ok(crate::live::spawn(
            self,
            rpc,
            slot,
            interval,
            first,
            move |now_ms| {
                ask(
                    backend.clone(),
                    Ctx {
                        now_ms,
                        ..ctx.clone()
                    },
                )
            },
        ))
    }

    /// The interval of a new watch and its slot under the limits (a refusal is counted).
    fn watch_slot(
        &self,
        ctx: &Ctx,
        rpc: &'static str,
        interval_ms: u32,
    ) -> Result<(crate::live::Slot, std::time::Duration), BackendError> {
        let interval = self.watchers.interval(interval_ms).map_err(|v| {
            let e = BackendError::from(QueryError::Invalid(v));
            self.count_refusal(rpc, &e);
            e
        })?;
        let slot = self
            .watchers
            .open(ctx.authorization.as_deref(), &self.metrics.watch_streams)
            .map_err(|s| {
                self.metrics.refuse_query(rpc, "watch_limit");
                BackendError::Status(s)
            })?;
        Ok((slot, interval))
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

    async fn get_totals(
        &self,
        req: Request<GetTotalsRequest>,
    ) -> Result<Response<GetTotalsResponse>, Status> {
        let ctx = self.grpc_ctx(&req, "GetTotals")?;
        let r = req.into_inner();
        self.timed("GetTotals", self.backend.totals(&ctx, r))
            .await
            .map(Response::new)
            .map_err(BackendError::into_status)
    }

    type WatchTopAdsStream = WatchStream<TopAdsResponse>;

    async fn watch_top_ads(
        &self,
        req: Request<WatchTopAdsRequest>,
    ) -> Result<Response<Self::WatchTopAdsStream>, Status> {
        let ctx = self.grpc_ctx(&req, "WatchTopAds")?;
        let r = req.into_inner();
        let query = r.query.unwrap_or_default();
        let rx = self
            .watch_top(ctx, query, r.interval_ms)
            .await
            .map_err(|e| under_query(e, false).into_status())?;
        Ok(Response::new(grpc_stream(rx)))
    }

    type WatchAdClicksStream = WatchStream<GetAdClicksResponse>;

    async fn watch_ad_clicks(
        &self,
        req: Request<WatchAdClicksRequest>,
    ) -> Result<Response<Self::WatchAdClicksStream>, Status> {
        let ctx = self.grpc_ctx(&req, "WatchAdClicks")?;
        let r = req.into_inner();
        let query = r.query.unwrap_or_default();
        let last = r.last_minutes;
        if last > 0 && (query.from_ms != 0 || query.to_ms != 0) {
            let mut bad = crate::validate::Violations::default();
            bad.push(
                crate::validate::Field::LastMinutes,
                crate::validate::Reason::Conflict,
                "last_minutes and query.from_ms/query.to_ms exclude each other: give one",
            );
            let e = BackendError::from(QueryError::Invalid(bad));
            self.count_refusal("WatchAdClicks", &e);
            return Err(e.into_status());
        }
        let request = move |now_ms: i64| -> Result<GetAdClicksRequest, BackendError> {
            if last == 0 {
                return Ok(query.clone());
            }
            let window = TopAdsRequest {
                window: Some(adclick_proto::v1::top_ads_request::Window::LastMinutes(
                    last,
                )),
                ..Default::default()
            };
            let (from_ms, to_ms) = crate::validate::top_window(&window, now_ms)
                .map_err(|v| BackendError::from(QueryError::Invalid(v)))?;
            Ok(GetAdClicksRequest {
                from_ms,
                to_ms,
                ..query.clone()
            })
        };
        let rx = self
            .watch_ad_clicks(ctx, request, r.interval_ms)
            .await
            .map_err(|e| under_query(e, true).into_status())?;
        Ok(Response::new(grpc_stream(rx)))
    }
}
