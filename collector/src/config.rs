//! Collector configuration: the `collector.toml` schema with safe defaults for every
//! field, and its validation. Parsing the file is the CLI's job; this module only defines
//! and checks the values (see `config/collector.toml` for the documented example).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest `forward.max_in_flight`: aggregators hold at most 4x this many seqs acked out of
/// order per collector (`admit::MAX_OUT_OF_ORDER` there).
pub const MAX_IN_FLIGHT: usize = 256;

/// Everything a collector needs. Every field has a default, so `CollectorConfig::default()`
/// plus `keys_file` and `aggregators` is a working configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    /// Stable name of this collector; the spool's incarnation is appended to it on the wire.
    pub collector_id: String,
    /// HTTP/1.1 + h2c listen address (`POST /v1/clicks`, `GET /c/{token}`, `/healthz`,
    /// `/metrics`). Port 0 picks a free port.
    pub listen_http: SocketAddr,
    /// QUIC listen address (UDP, ALPN `adclick/1`, see `quic`); unset = no QUIC. Port 0
    /// picks a free port.
    pub listen_quic: Option<SocketAddr>,
    /// PEM certificate chain for QUIC. With `tls_key_file`; when both are unset, QUIC uses
    /// a self-signed dev certificate kept in `data_dir` (`quic-dev-cert.pem`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Spool, quarantine log and lock file live here.
    pub data_dir: PathBuf,
    /// The `keys.toml` holding the token keys (reloaded on SIGHUP and when it changes).
    pub keys_file: PathBuf,
    /// Aggregator gRPC endpoints (`http://host:port`); ads are routed among them by
    /// rendezvous hashing on the ad id.
    pub aggregators: Vec<String>,
    /// Secret sent to the aggregators (`authorization: Bearer <key>`); must be one of their
    /// `ingest_keys`.
    pub aggregator_key: Option<String>,
    /// Origins whose pages may post clicks from the browser (CORS), e.g.
    /// `["https://news.example"]`; `["*"]` (the default) allows any page: clicks are
    /// authenticated by their signed tokens, not by cookies. Empty disables CORS.
    pub cors_origins: Vec<String>,
    /// Request limits.
    pub limits: Limits,
    /// Token and clock checks.
    pub tokens: TokenChecks,
    /// Duplicate detection.
    pub dedup: DedupConfig,
    /// Durable spool.
    pub spool: SpoolConfig,
    /// Forwarding to aggregators.
    pub forward: ForwardConfig,
    /// Rejected-click log.
    pub quarantine: QuarantineConfig,
    /// Load balancers and proxies (CIDRs, e.g. `["10.0.0.0/8"]`) whose `Forwarded` /
    /// `X-Forwarded-For` headers are believed: the client IP (for rate limits, connection
    /// caps do not see it) is the rightmost address in those headers that is not itself a
    /// trusted proxy. Empty (the default): the headers are ignored and the TCP/UDP peer is
    /// the client.
    pub trusted_proxies: Vec<String>,
    /// Sources besides the listeners: `[[source.file]]` log files.
    pub source: SourceConfig,
    /// Bot User-Agent classification (`useragent`).
    pub user_agent: UserAgentConfig,
}

/// `[user_agent]`: how clicks' User-Agent headers are classified (forwarded as
/// `IngestClick.ua_class`; the aggregator's `bot_user_agent` rule decides validity).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserAgentConfig {
    /// Classify at all; off, every click is forwarded as `UNSPECIFIED` (no UA rule
    /// applies to it).
    pub classify: bool,
    /// `"builtin"` (the vendored crawler-user-agents list embedded in the binary) or the
    /// path of a JSON list of the same shape (`[{"pattern": "..."}, ...]`).
    pub bot_list: String,
}

impl Default for UserAgentConfig {
    fn default() -> Self {
        UserAgentConfig {
            classify: true,
            bot_list: crate::useragent::BUILTIN.into(),
        }
    }
}

/// Where clicks come from besides the HTTP and QUIC listeners.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Log files tailed for clicks, one JSON click per line (`filesource`).
    pub file: Vec<FileSourceConfig>,
}

/// One `[[source.file]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSourceConfig {
    /// Names the source in metrics and its position file (`<data_dir>/file-source/<name>.pos`);
    /// letters, digits, `_` and `-`. Changing it starts every file again from its start.
    pub name: String,
    /// Glob patterns (`*`, `?`, `[...]`, `**`) of the files to tail, e.g.
    /// `["/var/log/adserver/clicks.log*"]`. Include the rotated names to read what was
    /// appended before a rotation the source had not yet read.
    pub paths: Vec<String>,
    /// How often the globs are expanded and the files checked for new lines.
    pub poll_interval_ms: u64,
    /// Longest line read; longer ones are skipped and counted (`too_long`).
    pub max_line_bytes: usize,
    /// Lines per spool commit (and position write).
    pub batch_lines: usize,
    /// How long a file whose path no longer matches (renamed away) is still read through
    /// its open handle before it is let go.
    pub rotate_wait_ms: u64,
}

impl Default for FileSourceConfig {
    fn default() -> Self {
        FileSourceConfig {
            name: "file".into(),
            paths: Vec::new(),
            poll_interval_ms: 250,
            max_line_bytes: 64 << 10,
            batch_lines: 1000,
            rotate_wait_ms: 5_000,
        }
    }
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            collector_id: "collector-1".into(),
            listen_http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            listen_quic: None,
            tls_cert_file: None,
            tls_key_file: None,
            data_dir: PathBuf::from("data/collector"),
            keys_file: PathBuf::from("keys.toml"),
            aggregators: vec!["http://127.0.0.1:9090".into()],
            aggregator_key: None,
            cors_origins: vec!["*".into()],
            limits: Limits::default(),
            tokens: TokenChecks::default(),
            dedup: DedupConfig::default(),
            spool: SpoolConfig::default(),
            forward: ForwardConfig::default(),
            quarantine: QuarantineConfig::default(),
            trusted_proxies: Vec::new(),
            source: SourceConfig::default(),
            user_agent: UserAgentConfig::default(),
        }
    }
}

/// Request and connection limits. Anything beyond them gets a 4xx/503 with a message (or,
/// for connections, is closed) and a counter. All are on by default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
    /// Most clicks in one batch (413 above); checked while decoding, before the clicks
    /// are materialised.
    pub max_clicks_per_batch: usize,
    /// Longest dimension string (os, site, app, user_id); longer clicks are rejected as
    /// `invalid_dimension`.
    pub max_string_len: usize,
    /// A new connection must complete its first request's headers within this time
    /// (also bounds protocol detection and an h2c connection that only sends its preface);
    /// otherwise it is closed.
    pub header_read_timeout_ms: u64,
    /// A request body (and a whole QUIC request) must arrive within this time after its
    /// headers: 408 otherwise (a whole-body deadline: a body trickled byte by byte cannot
    /// hold a connection longer than this).
    pub body_read_timeout_ms: u64,
    /// A connection with no request in progress for this long is closed: HTTP/1
    /// keep-alive idle and HTTP/2 without open streams.
    pub idle_timeout_ms: u64,
    /// HTTP/2 keep-alive PING interval; a peer that does not answer within
    /// `idle_timeout_ms` is dropped (0 = no pings).
    pub http2_keep_alive_interval_ms: u64,
    /// Concurrent streams per HTTP/2 or QUIC connection (more wait for flow control).
    pub max_streams_per_connection: u32,
    /// A QUIC connection without traffic for this long is closed (also bounds stalled
    /// handshakes).
    pub quic_idle_timeout_ms: u64,
    /// Open connections per listener (HTTP and QUIC each). Beyond it a new connection is
    /// accepted and closed at once (no task, no buffer). Keep the process's open-file limit
    /// (`ulimit -n`) above the HTTP value plus spool and forwarder files.
    pub max_connections: usize,
    /// Open connections per client IP (the TCP/UDP peer) per listener; beyond it new
    /// connections are closed at once.
    pub max_connections_per_ip: usize,
    /// Request body bytes buffered at once across all requests (HTTP and QUIC); a request
    /// that cannot reserve its body's size (its Content-Length, else `max_body_bytes`)
    /// gets 503 + `Retry-After` at once.
    pub max_inflight_body_bytes: usize,
    /// Most of that budget one client address may hold at once (bodies it announced and
    /// is still sending): beyond it, 503 + Retry-After for that address only.
    pub max_inflight_body_bytes_per_ip: usize,
    /// Sustained clicks per second per client IP (0 = unlimited): a batch costs its click
    /// count (at least 1, at most the burst), a redirect costs 1; 429 + `Retry-After` above.
    pub rate_limit_per_ip: f64,
    /// Clicks a client IP may send at once before the rate applies.
    pub rate_limit_burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_clicks_per_batch: 1000,
            max_string_len: 256,
            header_read_timeout_ms: 5_000,
            body_read_timeout_ms: 10_000,
            idle_timeout_ms: 10_000,
            http2_keep_alive_interval_ms: 15_000,
            max_streams_per_connection: 100,
            quic_idle_timeout_ms: 10_000,
            max_connections: 16_384,
            max_connections_per_ip: 256,
            max_inflight_body_bytes: 64 << 20,
            max_inflight_body_bytes_per_ip: 4 << 20,
            rate_limit_per_ip: 500.0,
            rate_limit_burst: 2_000.0,
        }
    }
}

impl Limits {
    /// `header_read_timeout_ms` as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms.max(1))
    }

    /// `body_read_timeout_ms` as a duration.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms.max(1))
    }

    /// `idle_timeout_ms` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.max(1))
    }
}

/// Token verification and clock correction.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenChecks {
    /// Clock skew allowed on a token's issue and expiry times.
    pub skew_ms: i64,
    /// A device clock off by more than this (|received_at - sent_at|) is not trusted: the
    /// click is counted at `received_at` and flagged.
    pub max_device_clock_skew_ms: i64,
    /// How often the key file is checked for changes (SIGHUP reloads at once).
    pub key_reload_interval_ms: u64,
    /// Clicks whose corrected event time is older than this are rejected (`too_old`):
    /// keep it below the aggregators' `windows.retention_minutes`, so that nothing acked
    /// here is refused there.
    pub max_click_age_ms: i64,
}

impl Default for TokenChecks {
    fn default() -> Self {
        TokenChecks {
            skew_ms: 30_000,
            max_device_clock_skew_ms: 24 * 3_600_000,
            key_reload_interval_ms: 2_000,
            max_click_age_ms: adclick_proto::countable::MAX_CLICK_AGE_MS,
        }
    }
}

/// Largest `dedup.exact_capacity`: its table and queue are allocated at start (62-101
/// bytes per id, 4.4 GB at this bound).
pub const MAX_EXACT_CAPACITY: usize = 50_000_000;

/// Duplicate detection: a time-rotated Bloom filter as pre-check, an exact set behind it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Longest token lifetime (issue to expiry) in use; the Bloom generations cover it.
    pub token_lifetime_ms: i64,
    /// Clicks expected per token lifetime (sizes the Bloom filter).
    pub expected_clicks: usize,
    /// Target false-positive rate of the Bloom filter (a false positive only costs an
    /// exact lookup, never a click).
    pub false_positive_rate: f64,
    /// Bloom generations across the lifetime (>= 2).
    pub generations: usize,
    /// Most impression ids held exactly; older ones fall back to "suspect" marking, and
    /// the aggregator's exact dedup decides. Allocated at start (62-101 bytes per id, 74 at
    /// the default: the table's 24-byte slots at a load of at most 5/8, and the eviction
    /// queue), so that
    /// the request path never stops to grow it; 1..=[`MAX_EXACT_CAPACITY`].
    pub exact_capacity: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            token_lifetime_ms: 3_600_000,
            expected_clicks: 1_000_000,
            false_positive_rate: 0.001,
            generations: 4,
            exact_capacity: 1_000_000,
        }
    }
}

/// Durable spool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Segment file size.
    pub segment_bytes: u64,
    /// Disk budget; when it is used up ingest answers 503 until the forwarder catches up.
    pub max_bytes: u64,
    /// Free space kept on the spool's filesystem: below it ingest answers 503 +
    /// Retry-After (readiness `disk_low`) before the disk can fill. 0 disables.
    pub min_free_bytes: u64,
    /// Most clicks written by one group commit (one spool record, one forwarded batch).
    pub max_clicks_per_record: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            segment_bytes: 64 << 20,
            max_bytes: 8 << 30,
            min_free_bytes: 256 << 20,
            max_clicks_per_record: 20_000,
        }
    }
}

/// Forwarding to aggregators.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// First retry delay.
    pub retry_base_ms: u64,
    /// Largest retry delay.
    pub retry_max_ms: u64,
    /// Per-call timeout.
    pub request_timeout_ms: u64,
    /// Keys every ad's clicks are spread over across aggregator shards, by a salt taken
    /// from the impression id (so one impression always reaches one shard, whichever
    /// collector it comes through). 1 (the default): an ad lives on one aggregator shard,
    /// which spreads a hot ad over its own threads. Above 1: a query must sum the shards.
    pub hot_fanout: u32,
    /// A shard that got no clicks for this many spool records is sent an empty batch with
    /// the current seq, so that its high-water mark for this collector stays within the
    /// aggregators' `ingest.max_seq_jump` (keep this well below it).
    pub heartbeat_records: u64,
    /// Spool records in flight at once (1 to 256): records past the lowest one not yet
    /// acked by every owning aggregator are read and sent while earlier ones wait for
    /// their acks, which may come back in any order; each destination so has at most this
    /// many batches in flight. The spool is truncated only up to the contiguous acked
    /// point. 1 sends one record at a time. Memory: up to this many records (each at most
    /// `spool.max_clicks_per_record` clicks) held by the forwarder.
    pub max_in_flight: usize,
    /// Where batches go: `"grpc"` (the default: straight to the `aggregators`) or
    /// `"jetstream"` (to a NATS JetStream stream, `[forward.jetstream]`).
    pub sink: SinkKind,
    /// The JetStream stream (used when `sink = "jetstream"`).
    pub jetstream: JetStreamConfig,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            retry_base_ms: 100,
            retry_max_ms: 10_000,
            request_timeout_ms: 10_000,
            hot_fanout: 1,
            heartbeat_records: 100_000,
            max_in_flight: 8,
            sink: SinkKind::Grpc,
            jetstream: JetStreamConfig::default(),
        }
    }
}

/// The forwarding transport (`forward.sink`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// gRPC `IngestService` to the `aggregators` (routed by rendezvous hashing).
    Grpc,
    /// NATS JetStream: subjects `<subject_prefix>.<partition>` of one stream.
    Jetstream,
}

/// Bytes of a JetStream message beyond its clicks (batch header, NATS headers) that a
/// spool record leaves free: records are capped at `max_message_bytes` minus this.
pub const JETSTREAM_HEADROOM_BYTES: usize = 4096;

/// Largest `forward.jetstream.partitions`.
pub const MAX_PARTITIONS: u32 = adclick_proto::partition::MAX_PARTITIONS;

/// `[forward.jetstream]`: the stream collectors publish to and aggregator shards consume.
/// Every collector (and `adclick jetstream init`) of one stream must use the same
/// `stream`, `subject_prefix` and `partitions`; the stream is created with these values
/// when missing and verified when present (a different partition count is an error, never
/// a silent reconfiguration).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// NATS server URLs (`nats://host:4222`, `tls://...`); the client fails over between
    /// them and reconnects forever.
    pub servers: Vec<String>,
    /// Stream name.
    pub stream: String,
    /// Subjects are `<subject_prefix>.<partition>`; the stream captures
    /// `<subject_prefix>.*`.
    pub subject_prefix: String,
    /// Partitions P: an ad's clicks go to `adclick_proto::partition::partition(ad, P)`.
    /// Fixed when the stream is created (kept in the stream's metadata).
    pub partitions: u32,
    /// Stream replicas (1 to 5; 3 for production: survives one node lost).
    pub replicas: usize,
    /// Retention by age: messages older than this are removed, consumed or not. Size it
    /// far above the longest aggregator outage (a shard rebuilds from the stream within it).
    pub max_age_ms: u64,
    /// Retention by size (per replica; the servers reserve it at creation). Always set,
    /// well under the disk: a stream without it stops when the disk fills (nats-server
    /// #4878). When full, the oldest messages go (discard old), consumed or not: size it
    /// far above what the longest aggregator outage accumulates, and alert on stream bytes.
    pub max_bytes: u64,
    /// JetStream's message-id dedup window: a republish of a `Nats-Msg-Id` within it is
    /// acked as a duplicate and not stored again. Must exceed the longest delay before a
    /// crashed collector republishes (its downtime); a guard, not the guarantee (the
    /// aggregator's own `(collector_id, seq)` and impression-id dedup is).
    pub duplicate_window_ms: u64,
    /// Largest message this collector publishes: spool records are capped at this minus
    /// `JETSTREAM_HEADROOM_BYTES`, so every partition's batch of a record fits one
    /// message. The servers' `max_payload` must be at least this (checked on connect).
    pub max_message_bytes: usize,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            servers: vec!["nats://127.0.0.1:4222".into()],
            stream: "CLICKS".into(),
            subject_prefix: "clicks".into(),
            partitions: 16,
            replicas: 3,
            max_age_ms: 7 * 24 * 3_600_000,
            max_bytes: 8 << 30,
            duplicate_window_ms: 3_600_000,
            max_message_bytes: 8 << 20,
        }
    }
}

impl JetStreamConfig {
    /// Checks the values; every message names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.servers.is_empty() {
            return err(
                "forward.jetstream.servers must list at least one NATS URL, e.g. \"nats://127.0.0.1:4222\""
                    .into(),
            );
        }
        for s in &self.servers {
            if s.parse::<async_nats::ServerAddr>().is_err() {
                return err(format!(
                    "forward.jetstream.servers: {s:?} is not a NATS URL (nats://host:port, tls://host:port)"
                ));
            }
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !name_ok(&self.stream) {
            return err(format!(
                "forward.jetstream.stream {:?} must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
                self.stream
            ));
        }
        if self.subject_prefix.len() > 128 || !self.subject_prefix.split('.').all(name_ok) {
            return err(format!(
                "forward.jetstream.subject_prefix {:?} must be dot-separated tokens of A-Z, a-z, 0-9, _ and - (no wildcards), at most 128 characters",
                self.subject_prefix
            ));
        }
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return err(format!(
                "forward.jetstream.partitions must be 1 to {MAX_PARTITIONS}"
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return err("forward.jetstream.replicas must be 1 to 5 (NATS's limit)".into());
        }
        if self.duplicate_window_ms < 1_000 {
            return err("forward.jetstream.duplicate_window_ms must be >= 1000".into());
        }
        if self.max_age_ms < self.duplicate_window_ms {
            return err(
                "forward.jetstream.max_age_ms must be >= duplicate_window_ms (JetStream refuses a dedup window longer than the retention)"
                    .into(),
            );
        }
        if self.max_bytes < 1 << 20 {
            return err(
                "forward.jetstream.max_bytes must be >= 1 MiB (and well under the servers' disk)"
                    .into(),
            );
        }
        if !(64 << 10..=64 << 20).contains(&self.max_message_bytes) {
            return err(
                "forward.jetstream.max_message_bytes must be 64 KiB to 64 MiB (and at most the servers' max_payload)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The spool record cap this config needs: every partition batch of a record must fit
    /// one message.
    pub fn max_record_bytes(&self) -> usize {
        self.max_message_bytes
            .saturating_sub(JETSTREAM_HEADROOM_BYTES)
    }
}

/// The bounded log of rejected clicks (`<data_dir>/quarantine.jsonl`, rotated once).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    /// Rotate at this size; one previous file is kept.
    pub max_bytes: u64,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            max_bytes: 64 << 20,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid collector config: {0}")]
pub struct ConfigError(pub String);

impl CollectorConfig {
    /// Checks values that would otherwise fail later or silently misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_string()));
        if self.collector_id.is_empty() || self.collector_id.len() > 128 {
            return err("collector_id must be 1 to 128 characters");
        }
        let ua = &self.user_agent;
        if ua.classify && ua.bot_list != crate::useragent::BUILTIN {
            let p = std::path::Path::new(&ua.bot_list);
            if ua.bot_list.is_empty() || !p.is_file() {
                return Err(ConfigError(format!(
                    "user_agent.bot_list {:?}: not a file; use \"builtin\" (the embedded \
                     crawler-user-agents list) or the path of a JSON list of the same shape",
                    ua.bot_list
                )));
            }
        }
        let mut names = std::collections::HashSet::new();
        for f in &self.source.file {
            if f.name.is_empty()
                || f.name.len() > 64
                || !f
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ConfigError(format!(
                    "source.file name {:?}: 1 to 64 letters, digits, '_' or '-'",
                    f.name
                )));
            }
            if !names.insert(f.name.as_str()) {
                return Err(ConfigError(format!(
                    "source.file name {:?} is used twice: each source needs its own (it names its position file)",
                    f.name
                )));
            }
            if f.paths.is_empty() {
                return Err(ConfigError(format!(
                    "source.file {:?}: paths must list at least one glob",
                    f.name
                )));
            }
            for p in &f.paths {
                if let Err(e) = glob::Pattern::new(p) {
                    return Err(ConfigError(format!(
                        "source.file {:?}: bad glob {p:?}: {e}",
                        f.name
                    )));
                }
            }
            if f.batch_lines == 0
                || !(256..=4 << 20).contains(&f.max_line_bytes)
                || f.poll_interval_ms == 0
            {
                return Err(ConfigError(format!(
                    "source.file {:?}: batch_lines >= 1, max_line_bytes 256 to 4194304, poll_interval_ms >= 1",
                    f.name
                )));
            }
        }
        if self
            .aggregator_key
            .as_deref()
            .is_some_and(|k| k.starts_with("change-me"))
        {
            return err(
                "aggregator_key is the example value from config/collector.toml: generate a real \
                 key with `adclick keys ingest new` and list it in the aggregators' ingest_keys",
            );
        }
        match self.forward.sink {
            SinkKind::Grpc => {
                if self.aggregators.is_empty() {
                    return err(
                        "aggregators must list at least one gRPC endpoint, e.g. \"http://127.0.0.1:9090\"",
                    );
                }
                for a in &self.aggregators {
                    if !(a.starts_with("http://") || a.starts_with("https://")) {
                        return Err(ConfigError(format!(
                            "aggregator endpoint {a:?} must start with http:// or https://"
                        )));
                    }
                }
            }
            SinkKind::Jetstream => {
                self.forward.jetstream.validate()?;
                // An ad lives in exactly one partition (the query front merges exactly);
                // a salt spreading it over several keys has nowhere to go.
                if self.forward.hot_fanout != 1 {
                    return err(
                        "forward.hot_fanout must be 1 with sink = \"jetstream\": an ad lives in one partition, and the aggregator shard owning it spreads a hot ad over its own threads",
                    );
                }
                // A request's clicks are committed together (one record) whatever the
                // cap, and an encoded click is no larger than the request's bytes for it.
                if self.limits.max_body_bytes > self.forward.jetstream.max_record_bytes() {
                    return Err(ConfigError(format!(
                        "limits.max_body_bytes ({}) must be at most forward.jetstream.max_message_bytes minus {JETSTREAM_HEADROOM_BYTES} ({}): one request's clicks must fit one message",
                        self.limits.max_body_bytes,
                        self.forward.jetstream.max_record_bytes()
                    )));
                }
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return err(
                "tls_cert_file and tls_key_file must be set together (or neither, for a dev certificate)",
            );
        }
        if self.limits.max_body_bytes < 1024 || self.limits.max_clicks_per_batch == 0 {
            return err(
                "limits.max_body_bytes must be >= 1024 and limits.max_clicks_per_batch >= 1",
            );
        }
        let l = &self.limits;
        if l.max_connections == 0 || l.max_connections_per_ip == 0 {
            return err("limits.max_connections and limits.max_connections_per_ip must be >= 1");
        }
        if l.header_read_timeout_ms == 0
            || l.body_read_timeout_ms == 0
            || l.idle_timeout_ms == 0
            || l.quic_idle_timeout_ms == 0
        {
            return err(
                "limits.header_read_timeout_ms, body_read_timeout_ms, idle_timeout_ms and quic_idle_timeout_ms must be >= 1 (timeouts cannot be switched off)",
            );
        }
        if l.quic_idle_timeout_ms > 600_000 {
            return err("limits.quic_idle_timeout_ms must be <= 600000");
        }
        if l.max_streams_per_connection == 0 {
            return err("limits.max_streams_per_connection must be >= 1");
        }
        if l.max_inflight_body_bytes_per_ip < l.max_body_bytes {
            return err("limits.max_inflight_body_bytes_per_ip must be >= limits.max_body_bytes");
        }
        if l.max_inflight_body_bytes < l.max_body_bytes {
            return err("limits.max_inflight_body_bytes must be >= limits.max_body_bytes");
        }
        let rate_ok = l.rate_limit_per_ip >= 0.0 && l.rate_limit_per_ip.is_finite();
        let burst_ok = l.rate_limit_burst >= 1.0 && l.rate_limit_burst.is_finite();
        if !(rate_ok && burst_ok) {
            return err("limits.rate_limit_per_ip must be >= 0 and limits.rate_limit_burst >= 1");
        }
        self.trusted_proxy_nets()?;
        if !(self.dedup.false_positive_rate > 0.0 && self.dedup.false_positive_rate < 0.5) {
            return err("dedup.false_positive_rate must be in (0, 0.5)");
        }
        if self.dedup.generations < 2 || self.dedup.token_lifetime_ms <= 0 {
            return err("dedup.generations must be >= 2 and dedup.token_lifetime_ms > 0");
        }
        if !(1..=MAX_EXACT_CAPACITY).contains(&self.dedup.exact_capacity) {
            return err(
                "dedup.exact_capacity must be in 1..=50000000 (its table is allocated at start: 62-101 bytes per id)",
            );
        }
        if self.spool.segment_bytes < 4096 || self.spool.max_bytes < self.spool.segment_bytes {
            return err(
                "spool.segment_bytes must be >= 4096 and spool.max_bytes >= spool.segment_bytes",
            );
        }
        // The shared countable rule (adclick_proto::countable) assumes these bounds; past
        // them the collector could ack clicks the aggregators refuse.
        if !(0..=adclick_proto::countable::MAX_SKEW_MS).contains(&self.tokens.skew_ms) {
            return Err(ConfigError(format!(
                "tokens.skew_ms must be 0 to {} (adclick_proto::countable::MAX_SKEW_MS)",
                adclick_proto::countable::MAX_SKEW_MS
            )));
        }
        if !(1..=adclick_proto::countable::MAX_CLICK_AGE_MS).contains(&self.tokens.max_click_age_ms)
        {
            return Err(ConfigError(format!(
                "tokens.max_click_age_ms must be 1 to {} (47 h, below the aggregators' 48 h retention)",
                adclick_proto::countable::MAX_CLICK_AGE_MS
            )));
        }
        if self.forward.heartbeat_records == 0 {
            return err("forward.heartbeat_records must be >= 1");
        }
        if self.forward.hot_fanout == 0 {
            return err("forward.hot_fanout must be >= 1");
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.forward.max_in_flight) {
            return err("forward.max_in_flight must be 1 to 256");
        }
        Ok(())
    }

    /// The header read timeout as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        self.limits.header_read_timeout()
    }

    /// `trusted_proxies` parsed; a bare address means a single host (`/32`, `/128`).
    pub fn trusted_proxy_nets(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError(format!(
                            "trusted_proxies: {s:?} is not a CIDR (e.g. \"10.0.0.0/8\") or an IP address"
                        ))
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        CollectorConfig::default().validate().unwrap();
        let c = CollectorConfig {
            aggregators: vec!["127.0.0.1:9090".into()],
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .0
                .contains("must start with http://")
        );
        let mut c = CollectorConfig::default();
        c.dedup.false_positive_rate = 0.0;
        assert!(c.validate().unwrap_err().0.contains("false_positive_rate"));
        for cap in [0, MAX_EXACT_CAPACITY + 1] {
            let mut c = CollectorConfig::default();
            c.dedup.exact_capacity = cap;
            assert!(c.validate().unwrap_err().0.contains("dedup.exact_capacity"));
        }
        let c = CollectorConfig {
            tls_cert_file: Some("cert.pem".into()),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().0.contains("set together"));
    }

    #[test]
    fn max_in_flight_is_1_to_256() {
        assert_eq!(CollectorConfig::default().forward.max_in_flight, 8);
        for (n, ok) in [(0, false), (1, true), (256, true), (257, false)] {
            let mut c = CollectorConfig::default();
            c.forward.max_in_flight = n;
            match c.validate() {
                Ok(()) => assert!(ok, "{n} accepted"),
                Err(e) => {
                    assert!(!ok, "{n} refused: {e:?}");
                    assert!(e.0.contains("forward.max_in_flight"), "{e:?}");
                }
            }
        }
    }

    #[test]
    fn the_sink_is_grpc_by_default_and_jetstream_is_checked() {
        let c = CollectorConfig::default();
        assert_eq!(c.forward.sink, SinkKind::Grpc);
        let c: CollectorConfig = toml::from_str(
            r#"
            aggregators = []
            [forward]
            sink = "jetstream"
            [forward.jetstream]
            servers = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
            partitions = 4
            replicas = 1
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let js = &c.forward.jetstream;
        assert_eq!(
            (js.stream.as_str(), js.subject_prefix.as_str()),
            ("CLICKS", "clicks")
        );
        assert_eq!((js.partitions, js.replicas), (4, 1));
        assert_eq!(js.max_record_bytes(), (8 << 20) - 4096);
        assert!(
            toml::from_str::<CollectorConfig>("[forward]\nsink = \"kafka\"\n").is_err(),
            "unknown sink"
        );
        assert!(
            toml::from_str::<CollectorConfig>("[forward.jetstream]\npartition = 4\n").is_err(),
            "unknown field"
        );
        let bad = |f: &dyn Fn(&mut CollectorConfig), field: &str| {
            let mut c = CollectorConfig::default();
            c.forward.sink = SinkKind::Jetstream;
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.0.contains(field), "{field}: {e}");
        };
        bad(&|c| c.forward.jetstream.servers.clear(), "servers");
        bad(
            &|c| c.forward.jetstream.servers = vec!["nats://a b".into()],
            "servers",
        );
        bad(&|c| c.forward.jetstream.stream = "CL.ICKS".into(), "stream");
        bad(
            &|c| c.forward.jetstream.subject_prefix = "clicks.*".into(),
            "subject_prefix",
        );
        bad(
            &|c| c.forward.jetstream.subject_prefix = "".into(),
            "subject_prefix",
        );
        bad(&|c| c.forward.jetstream.partitions = 0, "partitions");
        bad(&|c| c.forward.jetstream.partitions = 1025, "partitions");
        bad(&|c| c.forward.jetstream.replicas = 6, "replicas");
        bad(
            &|c| c.forward.jetstream.duplicate_window_ms = 10,
            "duplicate_window_ms",
        );
        bad(&|c| c.forward.jetstream.max_age_ms = 1_000, "max_age_ms");
        bad(&|c| c.forward.jetstream.max_bytes = 0, "max_bytes");
        bad(
            &|c| c.forward.jetstream.max_message_bytes = 1 << 30,
            "max_message_bytes",
        );
        bad(&|c| c.forward.hot_fanout = 4, "hot_fanout");
        bad(&|c| c.limits.max_body_bytes = 8 << 20, "max_body_bytes");
        // The gRPC checks do not apply to a JetStream collector, and vice versa.
        let mut c = CollectorConfig::default();
        c.forward.sink = SinkKind::Jetstream;
        c.aggregators.clear();
        c.validate().unwrap();
        let mut c = CollectorConfig::default();
        c.forward.jetstream.partitions = 0;
        c.validate().unwrap();
    }

    #[test]
    fn quic_settings_parse_and_unknown_fields_are_refused() {
        let c: CollectorConfig = serde_json::from_str(
            r#"{"listen_quic": "127.0.0.1:4433", "tls_cert_file": "c.pem", "tls_key_file": "k.pem"}"#,
        )
        .unwrap();
        assert_eq!(c.listen_quic, Some("127.0.0.1:4433".parse().unwrap()));
        assert_eq!(
            c.tls_key_file.as_deref(),
            Some(std::path::Path::new("k.pem"))
        );
        c.validate().unwrap();
        assert!(CollectorConfig::default().listen_quic.is_none());
        assert!(
            serde_json::from_str::<CollectorConfig>(r#"{"listen_quick": "127.0.0.1:1"}"#).is_err()
        );
    }
}
