//! adclick edge collector: accepts clicks from SDKs and redirect links, verifies their
//! impression tokens, corrects device clocks, drops duplicates, makes accepted clicks
//! durable in a local spool (fsync before any 2xx), and forwards them to aggregators over
//! gRPC or to a NATS JetStream stream (`forward`), deleting spooled data only after the
//! destination acked it.
//!
//! Clicks arrive over HTTP (`http`) and, when `listen_quic` is set, over QUIC (`quic`);
//! both share one click path.
//!
//! Entry points: [`start`] (returns a handle with the bound addresses, for tests and
//! `adclick dev`) and [`run`] (until a shutdown future resolves, for `adclick collector`).
//! The library reads no configuration file: the CLI parses `collector.toml` into a
//! [`CollectorConfig`]. It depends on `adclick-proto` only, never on the aggregator.
#![deny(missing_docs)]

pub mod config;
pub mod filesource;
pub mod forward;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod quarantine;
pub mod quic;
pub mod routing;
pub mod spool;
pub mod useragent;
pub mod writer;

use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::CollectorConfig;
pub use metrics::Metrics;

use config::SinkKind;
use forward::{Forwarder, GrpcSink, JetStreamSink};
use http::{HttpState, client_ip::TrustedProxies, ratelimit::RateLimiter};
use ingest::{Processor, keys::KeySource};
use quarantine::Quarantine;
use routing::HotAds;
use spool::{Spool, SpoolOptions};
use writer::{Committer, SpoolLocation};

/// Why the collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The key file could not be loaded.
    #[error(transparent)]
    Keys(#[from] ingest::keys::KeyLoadError),
    /// The spool could not be opened or recovered.
    #[error("spool: {0}")]
    Spool(#[from] spool::SpoolError),
    /// Another collector process uses the data directory.
    #[error("data directory {0} is in use by another collector (lock held on {0}/LOCK)")]
    Locked(PathBuf),
    /// A socket or file could not be opened.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
    /// A bad aggregator endpoint.
    #[error(transparent)]
    Endpoint(#[from] forward::EndpointError),
    /// The JetStream stream does not match the config, or the servers cannot take our
    /// messages (`forward.sink = "jetstream"`).
    #[error(transparent)]
    JetStream(#[from] forward::JetStreamError),
    /// The bot User-Agent list could not be loaded (`[user_agent] bot_list`).
    #[error(transparent)]
    UserAgents(#[from] useragent::UaListError),
    /// The QUIC certificate or key could not be loaded or generated.
    #[error(transparent)]
    Tls(#[from] quic::TlsError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CollectorError {
    let what = what.into();
    move |source| CollectorError::Io { what, source }
}

/// A running collector.
#[derive(Debug)]
pub struct Collector {
    http_addr: SocketAddr,
    quic_addr: Option<SocketAddr>,
    quic_cert_pem: Option<String>,
    collector_id: String,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
    state: Arc<HttpState>,
    /// The `[[source.file]]` tailers.
    file_sources: Option<filesource::FileSources>,
}

/// Starts a collector: opens (and recovers) the spool, binds the listeners and spawns the
/// HTTP server, the QUIC server (when `listen_quic` is set), the forwarder and the key
/// reloader on the current tokio runtime.
pub async fn start(cfg: CollectorConfig) -> Result<Collector, CollectorError> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(io(format!(
        "cannot create data_dir {}",
        cfg.data_dir.display()
    )))?;
    let lock_path = cfg.data_dir.join("LOCK");
    let lock =
        File::create(&lock_path).map_err(io(format!("cannot create {}", lock_path.display())))?;
    lock.try_lock()
        .map_err(|_| CollectorError::Locked(cfg.data_dir.clone()))?;

    let keys = Arc::new(KeySource::open(&cfg.keys_file)?);
    // Before the spool opens and before anything binds: a bad certificate fails fast.
    let quic_tls = match cfg.listen_quic {
        Some(_) => Some(quic::load_tls(&cfg)?),
        None => None,
    };
    let mut spool_location = SpoolLocation {
        dir: cfg.data_dir.join("spool"),
        standby_dir: cfg.data_dir.join("spool-standby"),
        opts: SpoolOptions {
            segment_bytes: cfg.spool.segment_bytes,
            max_bytes: cfg.spool.max_bytes,
            min_free_bytes: cfg.spool.min_free_bytes,
        },
        collector_id: String::new(),
        incarnation: 0,
    };
    let (spool, recovery) = Spool::open(&spool_location.dir, spool_location.opts)?;
    let collector_id = format!("{}-{:016x}", cfg.collector_id, spool.incarnation());
    spool_location.collector_id = collector_id.clone();
    spool_location.incarnation = spool.incarnation();
    tracing::info!(
        collector_id,
        pending_records = recovery.records,
        truncated_bytes = recovery.truncated_bytes,
        "spool recovered"
    );
    let durable = watch::channel(spool.durable_seq());
    let recovered_lag = spool.durable_seq().saturating_sub(spool.acked_seq());
    let spool = Arc::new(Mutex::new(spool));

    let metrics = Arc::new(Metrics::new());
    metrics
        .spool_max_bytes
        .set(i64::try_from(cfg.spool.max_bytes).unwrap_or(i64::MAX));
    let _ = metrics.spool_dir.set(cfg.data_dir.join("spool"));
    report_spool_damage(&collector_id, &recovery, &metrics);
    confirm_reported(&spool);
    metrics
        .forward_lag_records
        .set(i64::try_from(recovered_lag).unwrap_or(i64::MAX));
    let user_agents = useragent::UaClassifier::from_config(&cfg.user_agent)?;
    metrics
        .user_agent_patterns
        .set(i64::try_from(user_agents.patterns()).unwrap_or(i64::MAX));
    metrics
        .user_agent_patterns_unsupported
        .set(i64::try_from(user_agents.unsupported().len()).unwrap_or(i64::MAX));
    let hot = Arc::new(HotAds::new(cfg.forward.hot_fanout));
    let processor = Arc::new(Processor::new(
        keys.clone(),
        cfg.tokens.clone(),
        &cfg.dedup,
        cfg.limits.max_string_len,
        hot.clone(),
        metrics.clone(),
        http::now_ms(),
    ));
    // The sink first: a JetStream stream that does not match the config fails the start
    // before anything binds or the writer runs.
    let sink = match cfg.forward.sink {
        SinkKind::Grpc => AnySink::Grpc(GrpcSink::new(
            &cfg.aggregators,
            Duration::from_millis(cfg.forward.request_timeout_ms.max(1)),
            cfg.aggregator_key.as_deref(),
        )?),
        SinkKind::Jetstream => AnySink::JetStream(Box::new(
            start_jetstream(&cfg.forward, &collector_id).await?,
        )),
    };
    let max_record_bytes = match cfg.forward.sink {
        SinkKind::Grpc => writer::MAX_GROUP_BYTES,
        SinkKind::Jetstream => cfg.forward.jetstream.max_record_bytes(),
    };
    let (committer, writer) = Committer::start(
        spool.clone(),
        spool_location,
        cfg.spool.max_clicks_per_record,
        max_record_bytes,
        metrics.clone(),
        durable.0,
        lock,
    )
    .map_err(io("cannot start the spool writer"))?;
    let quarantine = Quarantine::start(&cfg.data_dir, cfg.quarantine.max_bytes, metrics.clone())
        .map_err(io("cannot open the quarantine log"))?;
    let pins = filesource::SourcePins::new(cfg.source.file.len());
    let forwarding = Forwarding {
        spool: spool.clone(),
        collector_id: collector_id.clone(),
        hot,
        metrics: metrics.clone(),
        cfg: cfg.forward.clone(),
        durable: durable.1,
        committer: committer.clone(),
        pins: pins.clone(),
    };

    let listener = http::conn::bind_listener(cfg.listen_http)
        .map_err(io(format!("cannot listen on {}", cfg.listen_http)))?;
    let http_addr = listener
        .local_addr()
        .map_err(io("cannot read the bound address"))?;
    let state = Arc::new(HttpState {
        processor,
        committer,
        quarantine,
        metrics: metrics.clone(),
        limits: cfg.limits.clone(),
        limiter: RateLimiter::new(cfg.limits.rate_limit_per_ip, cfg.limits.rate_limit_burst),
        cors_origins: cfg.cors_origins.clone(),
        trusted_proxies: TrustedProxies::new(cfg.trusted_proxy_nets()?),
        user_agents,
        body_budget: HttpState::body_budget_for(&cfg.limits),
        body_per_ip: Arc::default(),
    });
    let quic = match (cfg.listen_quic, &quic_tls) {
        (Some(addr), Some(tls)) => {
            let endpoint =
                quic::bind(addr, tls).map_err(io(format!("cannot listen on QUIC {addr}")))?;
            let bound = endpoint
                .local_addr()
                .map_err(io("cannot read the bound QUIC address"))?;
            Some((endpoint, bound))
        }
        _ => None,
    };
    let quic_addr = quic.as_ref().map(|(_, a)| *a);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = vec![
        tokio::spawn(http::serve(
            listener,
            state.clone(),
            cfg.header_read_timeout(),
            shutdown_rx.clone(),
        )),
        forwarding.spawn(sink, shutdown_rx.clone()),
        tokio::spawn(reload_keys(
            keys,
            metrics.clone(),
            Duration::from_millis(cfg.tokens.key_reload_interval_ms.max(100)),
            shutdown_rx.clone(),
        )),
    ];
    if let Some((endpoint, _)) = quic {
        tasks.push(tokio::spawn(quic::serve(
            endpoint,
            state.clone(),
            cfg.header_read_timeout(),
            shutdown_rx,
        )));
    }
    let file_sources = if cfg.source.file.is_empty() {
        None
    } else {
        Some(
            filesource::start(
                &cfg.source.file,
                &cfg.data_dir,
                state.clone(),
                spool.clone(),
                &pins,
            )
            .map_err(|e| CollectorError::Io {
                what: "cannot start the file sources".into(),
                source: std::io::Error::other(e),
            })?,
        )
    };
    tracing::info!(%http_addr, ?quic_addr, collector_id, "collector started");
    Ok(Collector {
        http_addr,
        quic_addr,
        quic_cert_pem: quic_tls.map(|t| t.cert_pem),
        collector_id,
        metrics,
        shutdown,
        tasks,
        writer: Some(writer),
        state,
        file_sources,
    })
}

/// The configured sink (the forwarder is generic over it).
enum AnySink {
    Grpc(GrpcSink),
    JetStream(Box<JetStreamSink>),
}

/// What the forwarder needs besides its sink.
struct Forwarding {
    spool: Arc<Mutex<Spool>>,
    collector_id: String,
    hot: Arc<HotAds>,
    metrics: Arc<Metrics>,
    cfg: config::ForwardConfig,
    durable: watch::Receiver<u64>,
    committer: Committer,
    pins: filesource::SourcePins,
}

impl Forwarding {
    fn spawn(self, sink: AnySink, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        match sink {
            AnySink::Grpc(s) => tokio::spawn(self.forwarder(s).run(shutdown)),
            AnySink::JetStream(s) => tokio::spawn(self.forwarder(*s).run(shutdown)),
        }
    }

    fn forwarder<S: forward::Sink>(self, sink: S) -> Forwarder<S> {
        Forwarder::new(
            sink,
            self.spool,
            self.collector_id,
            self.hot,
            self.metrics,
            self.cfg,
            self.durable,
        )
        .with_reopen(self.committer)
        .with_pins(self.pins)
    }
}

/// Connects the JetStream sink and verifies (or creates) the stream, waiting at most
/// `forward.request_timeout_ms`: a stream that does not match the config, or servers whose
/// `max_payload` is too small, fail the start. Servers that do not answer in time do not:
/// the collector starts, spools, and the forwarder verifies before its first publish.
async fn start_jetstream(
    cfg: &config::ForwardConfig,
    collector_id: &str,
) -> Result<JetStreamSink, CollectorError> {
    let timeout = Duration::from_millis(cfg.request_timeout_ms.max(1));
    let sink = JetStreamSink::new(&cfg.jetstream, collector_id, timeout).await?;
    match tokio::time::timeout(timeout, sink.ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_permanent() => return Err(e.into()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "JetStream not ready yet; clicks are spooled and published once it is")
        }
        Err(_) => tracing::warn!(
            servers = ?cfg.jetstream.servers,
            ?timeout,
            "NATS did not answer in time; clicks are spooled and published once it does"
        ),
    }
    Ok(sink)
}

/// Runs a collector until `shutdown` resolves, then stops it gracefully.
pub async fn run(
    cfg: CollectorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CollectorError> {
    let c = start(cfg).await?;
    shutdown.await;
    c.shutdown().await;
    Ok(())
}

impl Collector {
    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound QUIC (UDP) address, when `listen_quic` is set.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// PEM of the QUIC certificate chain in use (configured or the dev one), when QUIC is
    /// on: what a client must trust, e.g. `QuicTransport::with_pem_roots`.
    pub fn quic_cert_pem(&self) -> Option<String> {
        self.quic_cert_pem.clone()
    }

    /// The id this collector sends to aggregators (`{collector_id}-{spool incarnation}`).
    pub fn collector_id(&self) -> &str {
        &self.collector_id
    }

    /// Live metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Graceful stop: stop accepting, finish in-flight requests (their clicks are fsynced
    /// before they are answered), stop forwarding, and let the writer finish.
    pub async fn shutdown(mut self) {
        // The file sources first: each finishes the batch it is committing.
        if let Some(f) = self.file_sources.take() {
            let _ = tokio::task::spawn_blocking(move || f.stop()).await;
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let writer = self.writer.take();
        // Dropping the last committer handle ends the writer thread after its last group.
        drop(self.state);
        if let Some(w) = writer {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        tracing::info!("collector stopped");
    }
}

async fn reload_keys(
    keys: Arc<KeySource>,
    metrics: Arc<Metrics>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hup_fut = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fut = std::future::pending::<()>();
        let force = tokio::select! {
            _ = tick.tick() => false,
            _ = hup_fut => true,
            _ = shutdown.changed() => return,
        };
        match keys.reload(force) {
            Ok(true) => {
                metrics
                    .key_reloads
                    .get_or_create(&metrics::ResultLabel { result: "ok" })
                    .inc();
                tracing::info!("signing keys reloaded");
            }
            Ok(false) => {}
            Err(e) => {
                metrics
                    .key_reloads
                    .get_or_create(&metrics::ResultLabel { result: "error" })
                    .inc();
                tracing::error!(error = %e, "key reload failed; keeping the previous keys");
            }
        }
    }
}

/// Makes every loss or repair that spool recovery found visible: an ERROR
/// line per damaged range (segment, offset, bytes, where it was saved), per
/// lost seq range and per metadata repair, and the corruption counters.
/// Silent only for what a crash normally leaves (a torn unsynced tail).
pub(crate) fn report_spool_damage(
    collector_id: &str,
    recovery: &spool::Recovery,
    metrics: &Metrics,
) {
    for d in &recovery.damage {
        tracing::error!(
            collector_id,
            segment = %d.segment.display(),
            offset = d.offset,
            bytes = d.bytes,
            saved_to = ?d.saved_to,
            "spool damage: bytes inside synced data failed their checksum; moved out"
        );
    }
    for &(first, last) in &recovery.lost_seqs {
        tracing::error!(
            collector_id,
            first_seq = first,
            last_seq = last,
            records = last - first + 1,
            "spool damage: acknowledged records lost; every record after them is kept \
             (reconcile this seq range)"
        );
    }
    for r in &recovery.repairs {
        tracing::error!(collector_id, repair = %r, "spool metadata repaired");
    }
    if let Some(t) = &recovery.suspicious_tail {
        tracing::warn!(collector_id, tail = %t, "spool tail trimmed");
    }
    metrics.spool_corrupt_records.inc_by(recovery.lost_records);
    metrics
        .spool_corrupt_bytes
        .inc_by(recovery.damage.iter().map(|d| d.bytes).sum());
}

/// Tells the spool its recovery report was logged and counted (see
/// [`spool::Spool::damage_reported`]); a failure only means it is reported again next time.
pub(crate) fn confirm_reported(spool: &Mutex<Spool>) {
    let s = spool.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = s.damage_reported() {
        tracing::warn!(error = %e, "cannot clear the spool's pending damage report; it will be repeated at the next start");
    }
}
