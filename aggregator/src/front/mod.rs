//! The query front (`adclick query-front`): one endpoint for advertisers over the
//! JetStream scale-out. It serves the aggregator's `adclick.v1.QueryService` (gRPC, with
//! reflection v1/v1alpha, health and gRPC-Web) and the same HTTP/JSON mirror
//! (`http.rs`, with `/livez`, `/readyz`, `/metrics`) through the same [`crate::api::Api`]
//! (keys, rate limits, CORS, metrics), over a different backend: [`shards::Shards`], which
//! routes each query to the aggregator shards owning its ads and merges their answers
//! exactly (the proof is in `shards.rs`).
//!
//! - `config.rs`: `query-front.toml` (shards, their partitions, the shared sections) and
//!   the coverage check (every partition owned exactly once, or the front refuses to start).
//! - `shards.rs`: routing, fan-out, merge, failure (UNAVAILABLE naming the shard, never a
//!   partial answer).
//! - `health.rs`: readiness from the shards' gRPC health.
//! - `metrics.rs`: `adclick_aggregator_front_*`.
//!
//! It holds no counts and no store, and never connects to NATS: the shards are the only
//! source of truth. It must not authorise on the shards' behalf (they scope advertiser
//! keys themselves, with the `authorization` the front forwards).

pub mod config;
pub mod health;
pub mod metrics;
pub mod shards;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use adclick_proto::v1::query_service_server::QueryServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::server::NamedService;

pub use config::{FrontConfig, ShardEndpoint};

use crate::api::Api;
use crate::metrics::Metrics;
use crate::{AggregatorError, cors, grpc, grpc_web, http, listen, ratelimit};

/// A running query front.
#[derive(Debug)]
pub struct QueryFront {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts a query front: checks the config (shard coverage included), binds both
/// listeners and starts watching the shards' health. Shards may be down at start: they
/// are connected lazily, and the front is not ready until each says SERVING.
pub async fn start(cfg: FrontConfig) -> Result<QueryFront, AggregatorError> {
    let owner = cfg.validate()?;
    let metrics = Arc::new(Metrics::for_front());
    // Not ready until the first health round says otherwise.
    metrics.ready.set(0);
    let io = |what: String| move |source| AggregatorError::Io { what, source };
    let grpc_listener = listen::bind_listener(cfg.listen_grpc)
        .map_err(io(format!("cannot listen on {}", cfg.listen_grpc)))?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(io("local address".into()))?;
    let http_listener = listen::bind_listener(cfg.listen_http)
        .map_err(io(format!("cannot listen on {}", cfg.listen_http)))?;
    let http_addr = http_listener
        .local_addr()
        .map_err(io("local address".into()))?;

    let (reasons_tx, reasons_rx) = watch::channel(Vec::new());
    let backend = shards::Shards::new(&cfg, owner, metrics.clone(), reasons_rx)
        .map_err(crate::config::ConfigError)?;
    let shard_list = backend.shards().to_vec();
    reasons_tx.send_replace(health::unchecked(&shard_list));
    let api = Api {
        backend: Arc::new(backend),
        keys: Arc::new(cfg.api_keys.clone()),
        allow_unauthenticated: cfg.query.allow_unauthenticated,
        metrics: metrics.clone(),
        limiter: Arc::new(ratelimit::RateLimiter::new(&cfg.query, &cfg.api_keys)),
        cors: Arc::new(
            cors::Cors::new(&cfg.query.cors_allowed_origins).map_err(crate::config::ConfigError)?,
        ),
        watchers: Arc::new(crate::live::Watchers::new(&cfg.query)),
    };
    if cfg.query.allow_unauthenticated {
        tracing::warn!(
            "query.allow_unauthenticated = true: ANYONE who reaches {} or {} can query every \
             ad as admin without a key (if the shards allow it too); only on a trusted network",
            cfg.listen_grpc,
            cfg.listen_http
        );
    }
    let query_service = <QueryServiceServer<Api> as NamedService>::NAME;
    let (reflection, reflection_v1alpha) = crate::reflection(&[query_service])?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health
        .set_service_status(query_service, tonic_health::ServingStatus::NotServing)
        .await;
    let routes = tonic::service::Routes::new(
        QueryServiceServer::new(api.clone())
            .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(grpc::MAX_ANSWER_BYTES),
    )
    .add_service(reflection)
    .add_service(reflection_v1alpha)
    .add_service(health_service)
    .prepare();

    let (shutdown, rx) = watch::channel(false);
    let health_task = tokio::spawn(health::watch_shards(
        health::Watch {
            shards: shard_list,
            every: Duration::from_millis(cfg.health_interval_ms),
            timeout: Duration::from_millis(cfg.shard_timeout_ms),
            reasons: reasons_tx,
            health,
            query_service,
            metrics: metrics.clone(),
        },
        rx.clone(),
    ));
    let grpc_task = tokio::spawn(listen::serve(listen::Serve {
        listener: grpc_listener,
        port: listen::Port::Grpc,
        limits: cfg.connections.clone(),
        metrics: metrics.clone(),
        // HTTP/1.1 too, for gRPC-Web from browsers (`grpc_web.rs`).
        http2_only: false,
        windows: None,
        make_service: {
            let front = grpc_web::GrpcFront::new(routes, api.cors.clone());
            move |_| front.clone()
        },
        shutdown: rx.clone(),
    }));
    let http_task = tokio::spawn(listen::serve(listen::Serve {
        listener: http_listener,
        port: listen::Port::Http,
        limits: cfg.connections.clone(),
        metrics: metrics.clone(),
        http2_only: false,
        windows: None,
        make_service: {
            let q = Arc::new(api);
            move |_| http::HttpService(q.clone())
        },
        shutdown: rx,
    }));
    tracing::info!(%grpc_addr, %http_addr, shards = cfg.shards.len(), "query front started");
    Ok(QueryFront {
        grpc_addr,
        http_addr,
        metrics,
        shutdown,
        tasks: vec![grpc_task, http_task, health_task],
    })
}

/// Runs until `shutdown` resolves, then stops gracefully.
pub async fn run(
    cfg: FrontConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AggregatorError> {
    let f = start(cfg).await?;
    shutdown.await;
    f.shutdown().await;
    Ok(())
}

impl QueryFront {
    /// gRPC address (QueryService, reflection, health, gRPC-Web).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// HTTP address (JSON queries, /livez, /readyz, /metrics).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Live metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops serving: no new connections; open ones finish (at most 5 s).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        tracing::info!("query front stopped");
    }
}
