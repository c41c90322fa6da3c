//! The collector's Prometheus metrics (served as text on `GET /metrics`). One struct owns
//! the registry and a handle to every metric; other modules only increment. Hot paths tally
//! per batch and add once, so a counter update never costs a label allocation per click.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

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

/// Every collector metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Build info and process metrics, and the two exposition formats.
    exposition: adclick_proto::metrics::Exposition,
    /// Clicks by outcome.
    pub clicks: Family<OutcomeLabel, Counter>,
    /// Requests by route and status.
    pub requests: Family<RequestLabel, Counter>,
    /// Clicks whose device clock was beyond the bound (counted at received_at).
    pub clock_skew_flagged: Counter,
    /// Bloom positives that the exact set could not confirm (forwarded as suspects).
    pub dedup_suspect: Counter,
    /// Requests refused by the per-IP rate limit.
    pub rate_limited: Counter,
    /// Spool bytes on disk (unacked).
    pub spool_bytes: Gauge,
    /// `spool.max_bytes`: the spool is full (readiness `spool_full`, 503s) at this size.
    pub spool_max_bytes: Gauge,
    /// Free bytes on the spool's filesystem, read at each scrape (readiness `disk_low`
    /// below `spool.min_free_bytes`).
    pub spool_free_bytes: Gauge,
    /// The spool directory whose filesystem `spool_free_bytes` reports (set at start).
    pub spool_dir: std::sync::OnceLock<std::path::PathBuf>,
    /// Spool segment files.
    pub spool_segments: Gauge,
    /// Durable spool records found damaged at open (lost; seq ranges are logged).
    pub spool_corrupt_records: Counter,
    /// Bytes of damaged spool data moved to `corrupt/` at open.
    pub spool_corrupt_bytes: Counter,
    /// Spool records not yet acked by the aggregators.
    pub forward_lag_records: Gauge,
    /// Clicks acked by aggregators.
    pub forwarded_clicks: Counter,
    /// Batches acked by aggregators.
    pub forwarded_batches: Counter,
    /// Failed forward attempts (retried).
    pub forward_errors: Counter,
    /// Acked batches the destination already had (resends after a crash or a lost ack:
    /// an aggregator's `already_acked`, a JetStream duplicate PubAck).
    pub forward_duplicate_acks: Counter,
    /// Time from a batch's first send attempt to its ack (retries included), per
    /// destination batch: the gRPC ingest round trip, or the JetStream publish until the
    /// PubAck (replicated and fsynced on the servers).
    pub forward_batch_seconds: Histogram,
    /// Spool fsync latency.
    pub fsync_seconds: Histogram,
    /// Clicks per group commit.
    pub commit_clicks: Histogram,
    /// Rejected clicks written to the quarantine log.
    pub quarantined: Counter,
    /// Rejected clicks not written because the quarantine writer was behind (still counted
    /// by reason in `clicks`).
    pub quarantine_dropped: Counter,
    /// Key file reloads.
    pub key_reloads: Family<ResultLabel, Counter>,
    /// Redirect (`GET /c/{token}`) latency including the durable commit.
    pub redirect_seconds: Histogram,
    /// Connections refused at accept (closed at once), by listener and cap.
    pub connections_refused: Family<ConnLabel, Counter>,
    /// Connections closed by the collector for sending nothing, by listener and timeout.
    pub connections_closed: Family<ConnLabel, Counter>,
    /// Connections open now, by listener.
    pub connections_open: Family<ListenerLabel, Gauge>,
    /// Spool reopen attempts after a write or fsync failure, by result.
    pub spool_reopens: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("adclick_collector");
        let m = Metrics {
            clicks: Family::default(),
            requests: Family::default(),
            clock_skew_flagged: Counter::default(),
            dedup_suspect: Counter::default(),
            rate_limited: Counter::default(),
            spool_bytes: Gauge::default(),
            spool_max_bytes: Gauge::default(),
            spool_free_bytes: Gauge::default(),
            spool_dir: std::sync::OnceLock::new(),
            spool_segments: Gauge::default(),
            spool_corrupt_records: Counter::default(),
            spool_corrupt_bytes: Counter::default(),
            forward_lag_records: Gauge::default(),
            forwarded_clicks: Counter::default(),
            forwarded_batches: Counter::default(),
            forward_errors: Counter::default(),
            forward_duplicate_acks: Counter::default(),
            forward_batch_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            commit_clicks: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            quarantined: Counter::default(),
            quarantine_dropped: Counter::default(),
            key_reloads: Family::default(),
            redirect_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            connections_refused: Family::default(),
            connections_closed: Family::default(),
            connections_open: Family::default(),
            spool_reopens: Family::default(),
            registry: Registry::default(),
            exposition: adclick_proto::metrics::Exposition::new("collector"),
        };
        let r = &mut registry;
        r.register(
            "clicks",
            "Clicks by outcome (accepted, duplicate, rejection reason)",
            m.clicks.clone(),
        );
        r.register(
            "requests",
            "HTTP/QUIC requests by route and status code",
            m.requests.clone(),
        );
        r.register(
            "clock_skew_flagged",
            "Clicks counted at received_at because the device clock was off",
            m.clock_skew_flagged.clone(),
        );
        r.register(
            "dedup_suspect",
            "Bloom positives not confirmed by the exact set (aggregator decides)",
            m.dedup_suspect.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by the per-IP rate limit (their clicks: clicks_total{outcome=\"rate_limited\"})",
            m.rate_limited.clone(),
        );
        r.register_with_unit(
            "spool",
            "Spool bytes on disk not yet acked",
            Unit::Bytes,
            m.spool_bytes.clone(),
        );
        r.register_with_unit(
            "spool_max",
            "spool.max_bytes: the spool is full at this size",
            Unit::Bytes,
            m.spool_max_bytes.clone(),
        );
        r.register_with_unit(
            "spool_free",
            "Free bytes on the spool's filesystem",
            Unit::Bytes,
            m.spool_free_bytes.clone(),
        );
        r.register(
            "spool_segments",
            "Spool segment files",
            m.spool_segments.clone(),
        );
        r.register(
            "spool_corrupt_records",
            "Durable spool records lost to damage found at open (seq ranges in the ERROR log)",
            m.spool_corrupt_records.clone(),
        );
        r.register(
            "spool_corrupt_bytes",
            "Bytes of damaged spool data moved to the spool's corrupt/ folder",
            m.spool_corrupt_bytes.clone(),
        );
        r.register(
            "forward_lag_records",
            "Spool records not yet acked by aggregators",
            m.forward_lag_records.clone(),
        );
        r.register(
            "forwarded_clicks",
            "Clicks acked by aggregators",
            m.forwarded_clicks.clone(),
        );
        r.register(
            "forwarded_batches",
            "Batches acked by aggregators",
            m.forwarded_batches.clone(),
        );
        r.register(
            "forward_errors",
            "Failed forward attempts (retried)",
            m.forward_errors.clone(),
        );
        r.register(
            "forward_duplicate_acks",
            "Acked batches the destination already had (resends)",
            m.forward_duplicate_acks.clone(),
        );
        r.register(
            "forward_batch_seconds",
            "Time from a forwarded batch's first attempt to its ack (gRPC ingest or JetStream PubAck)",
            m.forward_batch_seconds.clone(),
        );
        r.register(
            "fsync_seconds",
            "Spool group-commit fsync latency",
            m.fsync_seconds.clone(),
        );
        r.register(
            "commit_clicks",
            "Clicks per group commit",
            m.commit_clicks.clone(),
        );
        r.register(
            "quarantined",
            "Rejected clicks written to the quarantine log",
            m.quarantined.clone(),
        );
        r.register(
            "quarantine_dropped",
            "Rejected clicks not logged because the quarantine writer was behind",
            m.quarantine_dropped.clone(),
        );
        r.register(
            "key_reloads",
            "Key file reloads by result",
            m.key_reloads.clone(),
        );
        r.register(
            "redirect_seconds",
            "GET /c/{token} latency including the durable commit",
            m.redirect_seconds.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at accept because a connection cap was reached",
            m.connections_refused.clone(),
        );
        r.register(
            "connections_closed",
            "Connections closed for sending no request in time (header or idle timeout)",
            m.connections_closed.clone(),
        );
        r.register(
            "connections_open",
            "Connections open now",
            m.connections_open.clone(),
        );
        r.register(
            "spool_reopens",
            "Spool reopen attempts after a write or fsync failure, by result",
            m.spool_reopens.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Adds `n` clicks with `outcome`.
    pub fn add_clicks(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.clicks
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n);
        }
    }

    /// Counts one request.
    pub fn request(&self, route: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabel { route, code })
            .inc();
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
