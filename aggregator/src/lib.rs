//! adclick regional aggregator: ingests verified clicks from collectors over gRPC
//! (WAL-first, idempotent by `(collector_id, seq)`), deduplicates them exactly, counts them
//! in 1-minute event-time windows with hour and day rollups, unique users and an exact
//! top-N index, and answers advertisers over gRPC (with reflection and health) and an
//! HTTP/JSON mirror.
//!
//! Entry points: [`start`] (handle with bound addresses, for tests and `adclick dev`) and
//! [`run`] (until a shutdown future resolves). Reads no config file; depends on
//! `adclick-proto` only, never on the collector.
#![deny(missing_docs)]

pub mod admit;
pub mod api;
pub mod archive;
pub mod benchkit;
pub mod benchkit_archive;
pub mod clickindex;
pub mod config;
pub mod cors;
pub mod decode;
pub mod engine;
pub mod front;
pub mod grpc;
pub mod grpc_web;
pub mod health;
pub mod http;
pub mod listen;
pub mod live;
pub mod metrics;
pub mod nightly;
pub mod privacy;
pub mod query;
pub mod ratelimit;
pub mod repair;
pub mod rules;
pub mod sketch;
pub mod source;
pub mod state;
pub mod store;
pub mod ui;
pub mod validate;
pub mod view;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use adclick_proto::v1::query_service_server::QueryServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use config::AggregatorConfig;
pub use metrics::Metrics;

use store::{RedbStore, Store};
use view::View;

/// Why the aggregator could not start.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The store could not be opened or recovered.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A socket could not be bound.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
    /// gRPC reflection could not be set up.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// A running aggregator.
#[derive(Debug)]
pub struct Aggregator {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    metrics: Arc<Metrics>,
    view: Arc<View>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    threads: Option<engine::Threads>,
    /// For the test-only hooks.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    engine: Option<engine::Engine>,
}

/// Starts an aggregator on `<data_dir>/aggregator.redb`.
pub async fn start(cfg: AggregatorConfig) -> Result<Aggregator, AggregatorError> {
    cfg.validate()?;
    let store = RedbStore::open(&cfg.data_dir)?;
    start_with_store(cfg, store).await
}

/// Starts an aggregator on a given store (tests use this to inject faults).
pub async fn start_with_store<S: Store + 'static>(
    cfg: AggregatorConfig,
    store: S,
) -> Result<Aggregator, AggregatorError> {
    cfg.validate()?;
    let metrics = Arc::new(Metrics::new());
    let (engine, view, threads) = engine::start(store, cfg.clone(), metrics.clone())?;

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

    let api = grpc::Query {
        view: view.clone(),
        keys: Arc::new(cfg.api_keys.clone()),
        cfg: cfg.query.clone(),
        limits: validate::Limits::new(&cfg.query, &cfg.windows)
            .with_click_index(cfg.click_index.retention_minutes)
            .with_click_index_since(view.click_index_since_ms),
        metrics: metrics.clone(),
        limiter: Arc::new(ratelimit::RateLimiter::new(&cfg.query, &cfg.api_keys)),
        cors: Arc::new(
            cors::Cors::new(&cfg.query.cors_allowed_origins).map_err(config::ConfigError)?,
        ),
    }
    .api();
    let (reflection, reflection_v1alpha) = reflection(&[
        <QueryServiceServer<api::Api> as NamedService>::NAME,
        <grpc::IngestServer as NamedService>::NAME,
        <adclick_proto::v1::admin_service_server::AdminServiceServer<repair::Admin> as NamedService>::NAME,
    ])?;
    let (health, health_service) = tonic_health::server::health_reporter();
    report_health(&health, &view.ready.reasons()).await;

    let (shutdown, rx) = watch::channel(false);
    let source = source::start(
        &cfg.source,
        &engine,
        &view,
        &metrics,
        cfg.ingest.max_message_bytes,
        rx.clone(),
    );
    if cfg.query.allow_unauthenticated {
        tracing::warn!(
            "query.allow_unauthenticated = true: ANYONE who reaches {} or {} can query every \
             ad as admin without a key; only on a trusted network",
            cfg.listen_grpc,
            cfg.listen_http
        );
    }
    let admin = adclick_proto::v1::admin_service_server::AdminServiceServer::new(repair::Admin {
        engine: engine.clone(),
        keys: Arc::new(cfg.api_keys.clone()),
        allow_unauthenticated: cfg.query.allow_unauthenticated,
        metrics: metrics.clone(),
    })
    .max_decoding_message_size(repair::MAX_MESSAGE_BYTES);
    let engine_handle = engine.clone();
    let nightly = cfg.reconcile.nightly.then(|| {
        tokio::spawn(
            nightly::Nightly {
                cfg: cfg.reconcile.clone(),
                archive: cfg.archive.clone(),
                retention_minutes: cfg.windows.retention_minutes,
                dir: cfg.data_dir.join("reconcile"),
                view: view.clone(),
                engine: engine.clone(),
                metrics: metrics.clone(),
            }
            .run(rx.clone()),
        )
    });
    let ingest = grpc::IngestServer::new(
        grpc::Ingest {
            engine,
            keys: Arc::new(cfg.ingest_keys.clone()),
            metrics: metrics.clone(),
        },
        cfg.ingest.max_message_bytes,
    );
    let routes = tonic::service::Routes::new(ingest)
        .add_service(
            QueryServiceServer::new(api.clone())
                .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(grpc::MAX_ANSWER_BYTES),
        )
        .add_service(admin)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(health_service)
        .prepare();
    let health_task = tokio::spawn(watch_health(health, view.clone(), rx.clone()));
    let grpc_task = tokio::spawn(listen::serve(listen::Serve {
        listener: grpc_listener,
        port: listen::Port::Grpc,
        limits: cfg.connections.clone(),
        metrics: metrics.clone(),
        // HTTP/1.1 too, for gRPC-Web from browsers (`grpc_web.rs`); plain gRPC stays HTTP/2.
        http2_only: false,
        // Collector batches are ~100 KB: the 64 KiB HTTP/2 default window stalls each one.
        windows: Some(listen::Windows {
            stream: 8 << 20,
            connection: 16 << 20,
        }),
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
    tracing::info!(%grpc_addr, %http_addr, "aggregator started");
    Ok(Aggregator {
        grpc_addr,
        http_addr,
        metrics,
        view,
        shutdown,
        tasks: [grpc_task, http_task, health_task]
            .into_iter()
            .chain(source)
            .chain(nightly)
            .collect(),
        threads: Some(threads),
        engine: Some(engine_handle),
    })
}

/// Niceness of the background threads of the apply path (the dedup spill, the click-index
/// flush, the checkpoint's encoding): their work is sorting and writing bursts that may take a few seconds, while the
/// writer and the shard threads decide freshness; on a box with few cores the scheduler
/// then gives those the CPU first (the archive thread takes its own, `archive.nice`).
pub(crate) const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to `nice` (Linux: a thread id is a process id for
/// `setpriority`, so this thread only). A failure is logged and otherwise ignored.
pub(crate) fn lower_thread_priority(nice: i32, what: &str) {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
        tracing::warn!(error = %e, nice, thread = what, "cannot lower the thread's priority");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (nice, what);
}

/// The reflection services, in both versions: current grpcurl and grpcui speak v1, older
/// tools and some client libraries (issue 14 met a Python client) only v1alpha. Both list
/// exactly the services the server serves (`served`, the health service whose descriptors
/// come with tonic-health, and that version of reflection itself): the aggregator serves
/// ingest, queries and admin; the query front only queries.
pub(crate) fn reflection(
    served: &[&'static str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    AggregatorError,
> {
    let builder = |reflection: &'static str| {
        served
            .iter()
            .chain([HEALTH_SERVICE, reflection].iter())
            .fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(adclick_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |b, name| b.with_service_name(*name),
            )
    };
    let v1alpha = builder("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(|e| AggregatorError::Reflection(e.to_string()))?;
    let v1 = builder("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(|e| AggregatorError::Reflection(e.to_string()))?;
    Ok((v1, v1alpha))
}

/// The gRPC health service's name (`grpc.health.v1.Health`).
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// gRPC health mirrors readiness: the whole server ("") and `IngestService` are
/// NOT_SERVING while writes cannot be accepted; `QueryService` keeps answering.
async fn report_health(health: &HealthReporter, reasons: &[&'static str]) {
    let status = if reasons.is_empty() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health
        .set_service_status(grpc::IngestServer::NAME, status)
        .await;
    health
        .set_service_status(
            <QueryServiceServer<api::Api> as NamedService>::NAME,
            ServingStatus::Serving,
        )
        .await;
}

async fn watch_health(health: HealthReporter, view: Arc<View>, mut stop: watch::Receiver<bool>) {
    let mut reasons = view.ready.subscribe();
    loop {
        tokio::select! {
            r = reasons.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        let now = reasons.borrow_and_update().clone();
        report_health(&health, &now).await;
    }
}

/// Runs until `shutdown` resolves, then stops gracefully.
pub async fn run(
    cfg: AggregatorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AggregatorError> {
    let a = start(cfg).await?;
    shutdown.await;
    a.shutdown().await;
    Ok(())
}

impl Aggregator {
    /// gRPC address (ingest, query, reflection, health).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// HTTP address (JSON queries, /livez, /readyz and /healthz, /metrics).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Live metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Approximate heap bytes and active minute cells over all shards.
    pub fn memory(&self) -> (usize, usize) {
        self.view
            .shards
            .iter()
            .map(|s| {
                let s = s.read().unwrap_or_else(|e| e.into_inner());
                (s.heap_bytes(), s.minute_cells())
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Test-only damage (feature `test-hooks`): moves each (ad, minute) cell by delta
    /// clicks and checkpoints it; returns the cells found. See `Engine::damage_for_test`.
    #[cfg(feature = "test-hooks")]
    pub async fn damage_for_test(&self, cells: Vec<(u64, i64, i64)>) -> u32 {
        match &self.engine {
            Some(e) => e.damage_for_test(cells).await,
            None => 0,
        }
    }

    /// Simulates a crash for tests: stops serving at once, without a final checkpoint and
    /// without waiting; the disk is left as it is after the last group commit (a crash in
    /// the middle of a commit is redb's atomicity, a crash mid-checkpoint is injected with
    /// `RedbStore::fail_checkpoint_after_tables`).
    pub fn kill(mut self) {
        self.view
            .killed
            .store(true, std::sync::atomic::Ordering::Release);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(a) = self.threads.as_mut().and_then(|t| t.archive.take()) {
            a.kill();
        }
    }

    /// Graceful stop: stop serving, let the writer finish (it writes a final checkpoint).
    pub async fn shutdown(mut self) {
        // The writer stops once every sender of its queue is gone: this is one.
        self.engine = None;
        self.view.ready.set(health::SHUTTING_DOWN, true);
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(th) = self.threads.take() {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = th.writer.join();
                // After the writer: its final checkpoint made every outcome durable, and
                // the archive publishes everything up to it before it stops.
                if let Some(a) = th.archive {
                    a.stop();
                }
            })
            .await;
        }
        tracing::info!("aggregator stopped");
    }
}
