//! The collector's Prometheus metrics (served as text on `GET /metrics`). One struct owns
//! the registry and a handle to every metric; other modules only increment. Hot paths tally
//! per batch and add once, so a counter update never costs a label allocation per click.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Labels of `adclick_collector_file_lines_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLineLabel {
    /// The `[[source.file]]` name.
    pub source: String,
    /// read, invalid_json, invalid_field or too_long.
    pub outcome: &'static str,
}

/// `outcome` label of `adclick_collector_clicks_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// accepted, duplicate, or a rejection reason.
    pub outcome: &'static str,
}

/// Labels of `adclick_collector_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// Route: clicks, redirect, quic, healthz, metrics, other.
    pub route: &'static str,
    /// HTTP status code (or the QUIC status byte mapped onto one).
    pub code: u16,
}

/// `result` label of the key reload counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// ok or error.
    pub result: &'static str,
}

/// `class` label of `adclick_collector_user_agent_clicks_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UaClassLabel {
    /// unspecified (no User-Agent, QUIC, classification off), client or bot.
    pub class: &'static str,
}

/// Labels of the connection counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabel {
    /// http or quic.
    pub listener: &'static str,
    /// Why: listener_cap, per_ip_cap (refused); header_timeout, idle_timeout (closed).
    pub reason: &'static str,
}

/// `listener` label of the open-connections gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// http or quic.
    pub listener: &'static str,
}

adclick_proto::metrics! {
    /// Every collector metric: the name is the field's (under `adclick_collector_`), the
    /// help its doc comment (`adclick_proto::metrics!`).
    #[derive(Debug)]
    pub struct Metrics("adclick_collector") {
        extra {
            /// Build info and process metrics, and the two exposition formats.
            exposition: adclick_proto::metrics::Exposition =
                adclick_proto::metrics::Exposition::new("collector"),
            /// The spool directory whose filesystem `spool_free_bytes` reports (set at start).
            pub spool_dir: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new(),
        }
        /// Clicks by outcome (accepted, duplicate, or the rejection reason).
        pub clicks: Family<OutcomeLabel, Counter> = Family::default();
        /// Lines read by the `[[source.file]]` sources, by source and outcome (read,
        /// invalid_json, invalid_field, too_long).
        pub file_lines: Family<FileLineLabel, Counter> = Family::default();
        /// Accepted clicks by User-Agent class (unspecified, client, bot), as forwarded in
        /// `IngestClick.ua_class`; the aggregator decides what a bot click counts as.
        pub user_agent_clicks: Family<UaClassLabel, Counter> = Family::default();
        /// Patterns of the bot User-Agent list in use (0: classification off).
        pub user_agent_patterns: Gauge = Gauge::default();
        /// Patterns of the bot list skipped because the regex crate rejects them (each
        /// named in a WARN log line at start).
        pub user_agent_patterns_unsupported: Gauge = Gauge::default();
        /// HTTP/QUIC requests by route and status code.
        pub requests: Family<RequestLabel, Counter> = Family::default();
        /// Clicks counted at received_at because the device clock was beyond the bound.
        pub clock_skew_flagged: Counter = Counter::default();
        /// Bloom positives that the exact set could not confirm (forwarded as suspects: the
        /// aggregator decides).
        pub dedup_suspect: Counter = Counter::default();
        /// Requests refused by the per-IP rate limit (their clicks:
        /// clicks_total{outcome="rate_limited"}).
        pub rate_limited: Counter = Counter::default();
        /// Spool bytes on disk not yet acked.
        pub spool_bytes: Gauge = Gauge::default();
        /// `spool.max_bytes`: the spool is full (readiness `spool_full`, 503s) at this size.
        pub spool_max_bytes: Gauge = Gauge::default();
        /// Free bytes on the spool's filesystem, read at each scrape (readiness `disk_low`
        /// below `spool.min_free_bytes`).
        pub spool_free_bytes: Gauge = Gauge::default();
        /// Spool segment files.
        pub spool_segments: Gauge = Gauge::default();
        /// Durable spool records lost to damage found at open (seq ranges in the ERROR log).
        pub spool_corrupt_records: Counter = Counter::default();
        /// Bytes of damaged spool data moved to the spool's corrupt/ folder at open.
        pub spool_corrupt_bytes: Counter = Counter::default();
        /// Spool records not yet acked by the aggregators.
        pub forward_lag_records: Gauge = Gauge::default();
        /// Clicks acked by aggregators.
        pub forwarded_clicks: Counter = Counter::default();
        /// Batches acked by aggregators.
        pub forwarded_batches: Counter = Counter::default();
        /// Failed forward attempts (retried).
        pub forward_errors: Counter = Counter::default();
        /// Acked batches the destination already had (resends after a crash or a lost ack:
        /// an aggregator's `already_acked`, a JetStream duplicate PubAck).
        pub forward_duplicate_acks: Counter = Counter::default();
        /// Time from a batch's first send attempt to its ack (retries included), per
        /// destination batch: the gRPC ingest round trip, or the JetStream publish until the
        /// PubAck (replicated and fsynced on the servers).
        pub forward_batch_seconds: Histogram = Histogram::new(exponential_buckets(0.000_1, 2.0, 18));
        /// Spool group-commit fsync latency.
        pub fsync_seconds: Histogram = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        /// Clicks per group commit.
        pub commit_clicks: Histogram = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        /// Rejected clicks written to the quarantine log.
        pub quarantined: Counter = Counter::default();
        /// Rejected clicks not written because the quarantine writer was behind (still
        /// counted by reason in `clicks`).
        pub quarantine_dropped: Counter = Counter::default();
        /// Key file reloads by result.
        pub key_reloads: Family<ResultLabel, Counter> = Family::default();
        /// Redirect (`GET /c/{token}`) latency including the durable commit.
        pub redirect_seconds: Histogram = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        /// Connections refused at accept (closed at once), by listener and cap.
        pub connections_refused: Family<ConnLabel, Counter> = Family::default();
        /// Connections closed by the collector for sending nothing in time, by listener and
        /// timeout (header or idle).
        pub connections_closed: Family<ConnLabel, Counter> = Family::default();
        /// Connections open now, by listener.
        pub connections_open: Family<ListenerLabel, Gauge> = Family::default();
        /// Spool reopen attempts after a write or fsync failure, by result.
        pub spool_reopens: Family<ResultLabel, Counter> = Family::default();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered.
    pub fn new() -> Self {
        Self::declare()
    }

    /// Adds `n` clicks with `outcome`.
    pub fn add_clicks(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.clicks
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n);
        }
    }

    /// Adds committed clicks by User-Agent class, indexed by the `UserAgentClass` value
    /// (unspecified, client, bot).
    pub fn add_ua_classes(&self, n: [u64; 3]) {
        for (class, n) in ["unspecified", "client", "bot"].into_iter().zip(n) {
            if n > 0 {
                self.user_agent_clicks
                    .get_or_create(&UaClassLabel { class })
                    .inc_by(n);
            }
        }
    }

    /// Counts one request.
    pub fn request(&self, route: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabel { route, code })
            .inc();
    }

    /// Accepted clicks of a User-Agent class so far (`unspecified`, `client`, `bot`; for
    /// the dev view).
    pub fn user_agent_clicks_with(&self, class: &'static str) -> u64 {
        self.user_agent_clicks
            .get_or_create(&UaClassLabel { class })
            .get()
    }

    /// Current count for an outcome (for tests and the dev view).
    pub fn clicks_with(&self, outcome: &'static str) -> u64 {
        self.clicks.get_or_create(&OutcomeLabel { outcome }).get()
    }

    /// `GET /metrics`: these metrics, build info and process metrics, in the format the
    /// scraper's `Accept` asks for (`adclick_proto::metrics`): `(content type, body)`.
    pub fn expose(&self, accept: Option<&str>) -> (&'static str, String) {
        if let Some(free) = self
            .spool_dir
            .get()
            .and_then(|d| crate::spool::free_bytes(d))
        {
            self.spool_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        self.exposition.render(&[&self.registry], accept)
    }

    /// The Prometheus text 0.0.4 form of [`Metrics::expose`] (what tests and the CLI's
    /// live views read).
    pub fn render(&self) -> String {
        self.expose(None).1
    }
}
