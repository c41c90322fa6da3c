//! The aggregator's Prometheus metrics (`GET /metrics` on the HTTP port). Modules only
//! increment; per-batch tallies keep label work off the per-click path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::sync::atomic::AtomicU64;

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

/// `version` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// A version string.
    pub version: String,
}

/// `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

adclick_proto::metrics! {
    /// Every aggregator metric: the name is the field's (under `adclick_aggregator_`), the
    /// help its doc comment (`adclick_proto::metrics!`).
    #[derive(Debug)]
    pub struct Metrics("adclick_aggregator") {
        extra {
            /// Build info and process metrics, and the two exposition formats.
            exposition: adclick_proto::metrics::Exposition =
                adclick_proto::metrics::Exposition::new("aggregator"),
            /// The JetStream source's (declared and registered in `source::metrics`).
            pub source: crate::source::metrics::SourceMetrics = Default::default(),
            /// The query front's (declared and registered in `front::metrics`).
            pub front: crate::front::metrics::FrontMetrics = Default::default(),
            /// The nightly reconciliation's (declared and registered in `nightly`).
            pub reconcile: crate::nightly::ReconcileMetrics = Default::default(),
        }
        /// Clicks by outcome (applied, of which late; duplicate, too_old, malformed, ...).
        pub clicks: Family<OutcomeLabel, Counter> = Family::default();
        /// Counted clicks classified invalid traffic, by reason (`rules::Reason::label`;
        /// the ones a rate rule moved after they were counted as valid included).
        pub invalid_clicks: Family<ReasonLabel, Counter> = Family::default();
        /// The invalid-traffic rules version in force (value 1): a hash of the effective
        /// `[rules]` config and the CIDR file, `off` when the rules are off.
        pub rules_info: Family<VersionLabel, Gauge> = Family::default();
        /// Of those, clicks a rate rule moved from valid to invalid after they were counted.
        pub invalid_moved: Family<ReasonLabel, Counter> = Family::default();
        /// Batches re-delivered after their ack (ignored).
        pub redeliveries: Counter = Counter::default();
        /// WAL append failures.
        pub wal_errors: Counter = Counter::default();
        /// WAL group-commit latency (the ingest stage an ack waits for).
        pub wal_commit_seconds: Histogram = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        /// Checkpoint latency.
        pub checkpoint_seconds: Histogram = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        /// Failed checkpoints.
        pub checkpoint_errors: Counter = Counter::default();
        /// Event-time watermark, seconds since the epoch (ms precision).
        pub watermark_seconds: Gauge<f64, AtomicU64> = Gauge::default();
        /// Wall clock minus the watermark: how far behind real time the final minutes are
        /// (updated on every ingest group).
        pub watermark_lag_seconds: Gauge<f64, AtomicU64> = Gauge::default();
        /// Impression ids held for exact dedup in RAM (the RAM tier).
        pub dedup_entries: Gauge = Gauge::default();
        /// Impression ids in the dedup disk tier (updated at checkpoints).
        pub dedup_disk_entries: Gauge = Gauge::default();
        /// Approximate RAM of the dedup set (RAM tier and Bloom filter).
        pub dedup_ram_bytes: Gauge = Gauge::default();
        /// Impression ids written to the dedup disk tier.
        pub dedup_spilled: Counter = Counter::default();
        /// Dedup disk reads (Bloom filter "maybe").
        pub dedup_disk_reads: Counter = Counter::default();
        /// Dedup disk-tier failures (the writer stops acking until restarted).
        pub dedup_errors: Counter = Counter::default();
        /// Size of quarantine.jsonl.
        pub quarantine_bytes: Gauge = Gauge::default();
        /// Bytes of the click index's segments on disk (`click_index/`).
        pub click_index_bytes: Gauge = Gauge::default();
        /// Bytes of the click index's clicks in RAM, not yet in a segment (a segment is
        /// written early above `click_index.memory_bytes`).
        pub click_index_memory_bytes: Gauge = Gauge::default();
        /// Click-index segments written between checkpoints because the RAM budget was
        /// reached.
        pub click_index_early_flushes: Counter = Counter::default();
        /// Click-index segments written for the memory budget that failed (their clicks
        /// stay in RAM for the next checkpoint's segment, which a failure skips: see
        /// checkpoint_errors).
        pub click_index_flush_errors: Counter = Counter::default();
        /// Quarantine records dropped because quarantine.max_bytes was reached (alert on it).
        pub quarantine_dropped: Counter = Counter::default();
        /// Rows in published raw click archive files (`[archive]`).
        pub archive_rows: Counter = Counter::default();
        /// Bytes of published archive files.
        pub archive_bytes: Counter = Counter::default();
        /// Archive files published.
        pub archive_files: Counter = Counter::default();
        /// Archive failures (publish, state, WAL read), each retried.
        pub archive_errors: Counter = Counter::default();
        /// WAL entries applied but not yet in published archive files.
        pub archive_lag_entries: Gauge = Gauge::default();
        /// Unix time of the last archive publication (0: none yet in this process).
        pub archive_last_publish_seconds: Gauge = Gauge::default();
        /// Query latency by rpc.
        pub query_seconds: Family<RpcLabel, Histogram> = Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
        });
        /// Queries refused (gRPC and HTTP), by rpc and reason (unauthenticated, rate_limited,
        /// watch_limit, fell_behind, or the first invalid field's).
        pub queries_refused: Family<RpcReasonLabel, Counter> = Family::default();
        /// Watches (WatchTopAds, WatchAdClicks, their SSE mirror) open now.
        pub watch_streams: Gauge = Gauge::default();
        /// Open connections by listener.
        pub connections: Family<PortLabel, Gauge> = Family::default();
        /// Connections closed at accept by listener and cap (max_connections,
        /// max_connections_per_ip).
        pub connections_refused: Family<PortReasonLabel, Counter> = Family::default();
        /// Connections closed by the server by listener and reason (header_read_timeout,
        /// idle_timeout).
        pub connections_closed: Family<PortReasonLabel, Counter> = Family::default();
        /// Requests that ran past connections.request_timeout_secs, by listener.
        pub request_timeouts: Family<PortLabel, Counter> = Family::default();
        /// Ingest requests refused before the engine, by reason (unauthenticated,
        /// invalid_argument, seq_window).
        pub ingest_refused: Family<ReasonLabel, Counter> = Family::default();
        /// 1 while the node can accept writes (`/readyz`), 0 otherwise.
        pub ready: Gauge = Gauge::default();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered (the source's and the front's too), ready = 1.
    pub fn new() -> Self {
        let mut m = Self::declare();
        m.source.register(&mut m.registry);
        m.front.register(&mut m.registry);
        m.reconcile.register(&mut m.registry);
        m.ready.set(1);
        m
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

    /// Counted clicks classified invalid for `reason` (`rules::Reason::label`).
    pub fn invalid_with(&self, reason: &'static str) -> u64 {
        self.invalid_clicks
            .get_or_create(&ReasonLabel { reason })
            .get()
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

    /// The query front's metrics (`front`): what its API, listeners and shard fan-out
    /// count, reported as component `query_front` in `adclick_build_info`. The engine's
    /// metrics (clicks, WAL, checkpoints, dedup, archive, source, reconciliation) exist in
    /// the struct, since the API is shared, but are not exposed: a front has no engine,
    /// and zeros there would read as a stalled one.
    pub fn for_front() -> Self {
        let mut m = Self::declare_only(|name| FRONT_METRICS.contains(&name));
        m.exposition = adclick_proto::metrics::Exposition::new("query_front");
        m.front.register(&mut m.registry);
        m
    }
}

/// The aggregator metrics a query front exposes (`Metrics::for_front`): the API's and the
/// listeners'.
const FRONT_METRICS: [&str; 8] = [
    "query_seconds",
    "queries_refused",
    "watch_streams",
    "connections",
    "connections_refused",
    "connections_closed",
    "request_timeouts",
    "ready",
];
