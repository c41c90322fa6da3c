//! The aggregator's Prometheus metrics (`GET /metrics` on the HTTP port). Modules only
//! increment; per-batch tallies keep label work off the per-click path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `outcome` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// applied, late, duplicate, too_old, malformed.
    pub outcome: &'static str,
}

/// `rpc` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabel {
    /// Query name.
    pub rpc: &'static str,
}

/// `rpc` and `reason` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcReasonLabel {
    /// GetAdClicks or TopAds (gRPC and HTTP alike).
    pub rpc: &'static str,
    /// unauthenticated, or the first invalid field's reason (`validate::Reason::label`).
    pub reason: &'static str,
}

/// `port` label (connection metrics).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    /// grpc or http.
    pub port: &'static str,
}

/// `port` and `reason` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortReasonLabel {
    /// grpc or http.
    pub port: &'static str,
    /// Why.
    pub reason: &'static str,
}

/// `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// Every aggregator metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Build info and process metrics, and the two exposition formats.
    exposition: adclick_proto::metrics::Exposition,
    /// Clicks by outcome.
    pub clicks: Family<OutcomeLabel, Counter>,
    /// Batches re-delivered after their ack (no-ops).
    pub redeliveries: Counter,
    /// WAL append failures.
    pub wal_errors: Counter,
    /// WAL group-commit latency.
    pub wal_commit_seconds: Histogram,
    /// Checkpoint latency.
    pub checkpoint_seconds: Histogram,
    /// Failed checkpoints.
    pub checkpoint_errors: Counter,
    /// Watermark (event time, seconds since the epoch, ms precision).
    pub watermark_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Impression ids held for exact dedup in RAM (the RAM tier).
    pub dedup_entries: Gauge,
    /// Impression ids in the dedup disk tier (updated at checkpoints).
    pub dedup_disk_entries: Gauge,
    /// Approximate RAM of the dedup set (RAM tier + Bloom filter).
    pub dedup_ram_bytes: Gauge,
    /// Impression ids written to the dedup disk tier.
    pub dedup_spilled: Counter,
    /// Dedup disk reads (Bloom "maybe").
    pub dedup_disk_reads: Counter,
    /// Dedup disk-tier failures (the writer stops acking until restarted).
    pub dedup_errors: Counter,
    /// Size of quarantine.jsonl.
    pub quarantine_bytes: Gauge,
    /// Bytes of the click index's segments on disk (`click_index/`).
    pub click_index_bytes: Gauge,
    /// Quarantine records dropped because quarantine.max_bytes was reached (alert on it).
    pub quarantine_dropped: Counter,
    /// Query latency by rpc.
    pub query_seconds: Family<RpcLabel, Histogram>,
    /// Queries refused (gRPC and HTTP), by rpc and reason.
    pub queries_refused: Family<RpcReasonLabel, Counter>,
    /// Watches (WatchTopAds, WatchAdClicks, their SSE mirror) open now.
    pub watch_streams: Gauge,
    /// Wall clock minus watermark, updated on every ingest group (how far behind real time
    /// the final minutes are).
    pub watermark_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Open connections by listener.
    pub connections: Family<PortLabel, Gauge>,
    /// Connections closed at accept by listener and cap (max_connections,
    /// max_connections_per_ip).
    pub connections_refused: Family<PortReasonLabel, Counter>,
    /// Connections closed by the server by listener and reason (header_read_timeout,
    /// idle_timeout).
    pub connections_closed: Family<PortReasonLabel, Counter>,
    /// Requests answered with a timeout error by listener.
    pub request_timeouts: Family<PortLabel, Counter>,
    /// Ingest requests refused before the engine, by reason (unauthenticated,
    /// invalid_argument, seq_window).
    pub ingest_refused: Family<ReasonLabel, Counter>,
    /// 1 while the node can accept writes (`/readyz`), 0 otherwise.
    pub ready: Gauge,
    /// The JetStream source's (declared and registered in `source::metrics`).
    pub source: crate::source::metrics::SourceMetrics,
    /// The query front's (declared and registered in `front::metrics`).
    pub front: crate::front::metrics::FrontMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("adclick_aggregator");
        let m = Metrics {
            clicks: Family::default(),
            redeliveries: Counter::default(),
            wal_errors: Counter::default(),
            wal_commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            checkpoint_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            checkpoint_errors: Counter::default(),
            watermark_seconds: Gauge::default(),
            dedup_entries: Gauge::default(),
            dedup_disk_entries: Gauge::default(),
            dedup_ram_bytes: Gauge::default(),
            dedup_spilled: Counter::default(),
            dedup_disk_reads: Counter::default(),
            dedup_errors: Counter::default(),
            quarantine_bytes: Gauge::default(),
            click_index_bytes: Gauge::default(),
            quarantine_dropped: Counter::default(),
            query_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
            }),
            queries_refused: Family::default(),
            watch_streams: Gauge::default(),
            watermark_lag_seconds: Gauge::default(),
            connections: Family::default(),
            connections_refused: Family::default(),
            connections_closed: Family::default(),
            request_timeouts: Family::default(),
            ingest_refused: Family::default(),
            ready: Gauge::default(),
            source: Default::default(),
            front: Default::default(),
            registry: Registry::default(),
            exposition: adclick_proto::metrics::Exposition::new("aggregator"),
        };
        let r = &mut registry;
        r.register("clicks", "Clicks by outcome", m.clicks.clone());
        r.register(
            "redeliveries",
            "Batches re-delivered after their ack (ignored)",
            m.redeliveries.clone(),
        );
        r.register("wal_errors", "WAL append failures", m.wal_errors.clone());
        r.register(
            "wal_commit_seconds",
            "WAL group-commit latency",
            m.wal_commit_seconds.clone(),
        );
        r.register(
            "checkpoint_seconds",
            "Checkpoint latency",
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "checkpoint_errors",
            "Failed checkpoints",
            m.checkpoint_errors.clone(),
        );
        r.register_with_unit(
            "watermark",
            "Event-time watermark (since the epoch)",
            prometheus_client::registry::Unit::Seconds,
            m.watermark_seconds.clone(),
        );
        r.register_with_unit(
            "watermark_lag",
            "Wall clock minus the watermark: how far behind real time the final minutes are",
            prometheus_client::registry::Unit::Seconds,
            m.watermark_lag_seconds.clone(),
        );
        r.register(
            "dedup_entries",
            "Impression ids held for exact dedup in RAM",
            m.dedup_entries.clone(),
        );
        r.register(
            "dedup_disk_entries",
            "Impression ids in the dedup disk tier",
            m.dedup_disk_entries.clone(),
        );
        r.register(
            "dedup_ram_bytes",
            "Approximate RAM of the dedup set",
            m.dedup_ram_bytes.clone(),
        );
        r.register(
            "dedup_spilled",
            "Impression ids written to the dedup disk tier",
            m.dedup_spilled.clone(),
        );
        r.register(
            "dedup_disk_reads",
            "Dedup disk reads",
            m.dedup_disk_reads.clone(),
        );
        r.register(
            "dedup_errors",
            "Dedup disk-tier failures",
            m.dedup_errors.clone(),
        );
        r.register(
            "quarantine_bytes",
            "Size of quarantine.jsonl",
            m.quarantine_bytes.clone(),
        );
        r.register(
            "click_index_bytes",
            "Bytes of the click index segments on disk",
            m.click_index_bytes.clone(),
        );
        r.register(
            "quarantine_dropped",
            "Quarantine records dropped at quarantine.max_bytes",
            m.quarantine_dropped.clone(),
        );
        r.register(
            "query_seconds",
            "Query latency by rpc",
            m.query_seconds.clone(),
        );
        r.register(
            "queries_refused",
            "Queries refused, by rpc and reason (unauthenticated, or the first invalid field's)",
            m.queries_refused.clone(),
        );
        r.register(
            "watch_streams",
            "Watches (WatchTopAds, WatchAdClicks, their SSE mirror) open now",
            m.watch_streams.clone(),
        );
        r.register(
            "connections",
            "Open connections by listener",
            m.connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at accept by listener and cap",
            m.connections_refused.clone(),
        );
        r.register(
            "connections_closed",
            "Connections closed by the server by listener and timeout",
            m.connections_closed.clone(),
        );
        r.register(
            "request_timeouts",
            "Requests that ran past connections.request_timeout_secs",
            m.request_timeouts.clone(),
        );
        r.register(
            "ingest_refused",
            "Ingest requests refused before counting, by reason",
            m.ingest_refused.clone(),
        );
        r.register(
            "ready",
            "1 while the node can accept writes",
            m.ready.clone(),
        );
        m.source.register(r);
        m.front.register(r);
        m.ready.set(1);
        Metrics { registry, ..m }
    }

    /// The open-connections gauge of a listener.
    pub fn connections_open(&self, port: &'static str) -> Gauge {
        self.connections.get_or_create(&PortLabel { port }).clone()
    }

    /// Counts a connection refused at accept.
    pub fn connection_refused(&self, port: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&PortReasonLabel { port, reason })
            .inc();
    }

    /// Counts a connection closed by a timeout.
    pub fn connection_closed(&self, port: &'static str, reason: &'static str) {
        self.connections_closed
            .get_or_create(&PortReasonLabel { port, reason })
            .inc();
    }

    /// Counts a request that ran past its deadline.
    pub fn request_timed_out(&self, port: &'static str) {
        self.request_timeouts
            .get_or_create(&PortLabel { port })
            .inc();
    }

    /// Counts an ingest request refused before counting.
    pub fn refuse_ingest(&self, reason: &'static str) {
        self.ingest_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a refused query.
    pub fn refuse_query(&self, rpc: &'static str, reason: &'static str) {
        self.queries_refused
            .get_or_create(&RpcReasonLabel { rpc, reason })
            .inc();
    }

    /// Adds `n` clicks with `outcome`.
    pub fn add_clicks(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.clicks
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n);
        }
    }

    /// Current count for an outcome.
    pub fn clicks_with(&self, outcome: &'static str) -> u64 {
        self.clicks.get_or_create(&OutcomeLabel { outcome }).get()
    }

    /// `GET /metrics`: these metrics, build info and process metrics, in the format the
    /// scraper's `Accept` asks for (`adclick_proto::metrics`): `(content type, body)`.
    pub fn expose(&self, accept: Option<&str>) -> (&'static str, String) {
        self.exposition.render(&[&self.registry], accept)
    }

    /// The Prometheus text 0.0.4 form of [`Metrics::expose`] (what tests and the CLI's
    /// live views read).
    pub fn render(&self) -> String {
        self.expose(None).1
    }

    /// The same metrics, reporting `component` in `adclick_build_info` (the query front
    /// serves this struct too).
    pub fn for_component(component: &'static str) -> Self {
        Metrics {
            exposition: adclick_proto::metrics::Exposition::new(component),
            ..Self::new()
        }
    }
}
