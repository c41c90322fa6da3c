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

pub mod config;
pub mod engine;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod query;
pub mod state;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use adclick_proto::v1::ingest_service_server::IngestServiceServer;
use adclick_proto::v1::query_service_server::QueryServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::AggregatorConfig;
pub use metrics::Metrics;

use engine::View;
use store::{RedbStore, Store};

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
    let grpc_listener = tokio::net::TcpListener::bind(cfg.listen_grpc)
        .await
        .map_err(io(format!("cannot listen on {}", cfg.listen_grpc)))?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(io("local address".into()))?;
    let http_listener = tokio::net::TcpListener::bind(cfg.listen_http)
        .await
        .map_err(io(format!("cannot listen on {}", cfg.listen_http)))?;
    let http_addr = http_listener
        .local_addr()
        .map_err(io("local address".into()))?;

    let query = grpc::Query {
        view: view.clone(),
        keys: Arc::new(cfg.api_keys.clone()),
        cfg: cfg.query.clone(),
        metrics: metrics.clone(),
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(adclick_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AggregatorError::Reflection(e.to_string()))?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<QueryServiceServer<grpc::Query>>()
        .await;
    health
        .set_serving::<IngestServiceServer<grpc::Ingest>>()
        .await;

    let (shutdown, rx) = watch::channel(false);
    let mut grpc_rx = rx.clone();
    if cfg.ingest_keys.is_empty() {
        tracing::warn!(
            "ingest_keys is empty: anyone who reaches {} can ingest clicks (set ingest_keys in production)",
            cfg.listen_grpc
        );
    }
    let ingest = IngestServiceServer::new(grpc::Ingest {
        engine,
        keys: Arc::new(cfg.ingest_keys.clone()),
    })
    .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES);
    let router = tonic::transport::Server::builder()
        // Collector batches are ~100 KB: the 64 KiB HTTP/2 default window stalls each one.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .add_service(ingest)
        .add_service(QueryServiceServer::new(query.clone()))
        .add_service(reflection)
        .add_service(health_service);
    let grpc_task = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
        let stop = async move {
            let _ = grpc_rx.changed().await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    let http_task = tokio::spawn(http::serve(http_listener, Arc::new(query), rx));
    tracing::info!(%grpc_addr, %http_addr, "aggregator started");
    Ok(Aggregator {
        grpc_addr,
        http_addr,
        metrics,
        view,
        shutdown,
        tasks: vec![grpc_task, http_task],
        threads: Some(threads),
    })
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

    /// HTTP address (JSON queries, /healthz, /metrics).
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
    }

    /// Graceful stop: stop serving, let the writer finish (it writes a final checkpoint).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(th) = self.threads.take() {
            let _ = tokio::task::spawn_blocking(move || th.writer.join()).await;
        }
        tracing::info!("aggregator stopped");
    }
}
