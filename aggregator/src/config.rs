//! Aggregator configuration: the `aggregator.toml` schema with safe defaults and its
//! validation. Parsing the file is the CLI's job (see `config/aggregator.toml`).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::state::topset::IndexField;
use serde::{Deserialize, Serialize};

/// Keys starting with this are the placeholders of the shipped example configs; they are
/// refused (see [`AggregatorConfig::validate`]).
pub const EXAMPLE_KEY_PREFIX: &str = "change-me";

/// Everything an aggregator needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// gRPC listener: `IngestService` (collectors), `QueryService` (advertisers), reflection
    /// and health.
    pub listen_grpc: SocketAddr,
    /// HTTP listener: the JSON mirror of the queries, `/healthz`, `/metrics`.
    pub listen_http: SocketAddr,
    /// The embedded store (WAL, checkpoints, per-collector high-water marks).
    pub data_dir: PathBuf,
    /// Event-time windows.
    pub windows: WindowConfig,
    /// Checkpointing.
    pub checkpoint: CheckpointConfig,
    /// Internal sharding and hot-key handling.
    pub shards: ShardConfig,
    /// Query limits.
    pub query: QueryConfig,
    /// API keys allowed to query. Required unless `query.allow_unauthenticated`.
    pub api_keys: Vec<ApiKey>,
    /// Secrets collectors must send (`authorization: Bearer <key>`) to ingest. Required:
    /// the aggregator refuses to start without one (`adclick keys ingest new` makes one;
    /// `adclick dev` generates its own).
    pub ingest_keys: Vec<String>,
    /// Ingest limits (message size, seq window).
    pub ingest: IngestConfig,
    /// Connection limits and timeouts, applied to each listener (gRPC and HTTP) separately.
    pub connections: ConnectionConfig,
    /// Exact dedup: RAM ceiling (the rest spills to `data_dir`).
    pub dedup: DedupConfig,
    /// The log of clicks that were not counted (`<data_dir>/quarantine.jsonl`).
    pub quarantine: QuarantineConfig,
    /// Where batches come from: gRPC ingest (default) or JetStream partitions.
    pub source: crate::source::SourceConfig,
    /// The click index behind the `ip` and `user_id` filters (`<data_dir>/click_index/`).
    pub click_index: ClickIndexConfig,
    /// The raw click archive (Parquet, local directory or S3-compatible; off by default).
    pub archive: adclick_archive::ArchiveConfig,
    /// The invalid-traffic rules (issue 16; off unless `rules.enabled`).
    pub rules: crate::rules::RulesConfig,
    /// How client IPs are stored (`crate::privacy`; docs/privacy.md).
    pub privacy: PrivacyConfig,
    /// The nightly reconciliation against the archive (`[reconcile]`, off by default).
    pub reconcile: crate::nightly::ReconcileConfig,
}

/// `[privacy]`: the form client IPs take where they are stored (the archive's rows, the
/// click index); the rules and everything in memory see the full address.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// `"full"` (the default: `ip` filters stay exact), `"truncated"` (/24 and /48: an
    /// `ip` filter matches its network), or `"hashed"` (keyed hash, salt rotated daily and
    /// kept in `<data_dir>/privacy/`: an `ip` filter takes one address).
    pub ip_storage: crate::privacy::IpStorage,
}

/// The click index (`crate::clickindex`): every counted click's client IP and user id, kept
/// on disk for `retention_minutes` of event time behind the watermark.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickIndexConfig {
    /// Minutes of event time kept (default 1440, 24 h; at least 2). A query filtered by `ip`
    /// or `user_id` whose range starts before `watermark - retention_minutes` is refused.
    /// Disk: about 94 bytes per counted click kept (BENCHMARKS.md, "Click index").
    pub retention_minutes: i64,
    /// RAM for the clicks counted since the last segment (52 bytes each plus the user id's;
    /// default 64 MiB, at least 1 MiB). Above it a segment is written at once instead of at
    /// the next checkpoint, so the chunks stay near it at any click rate (writing a segment
    /// takes about 2.4 times its chunks' bytes again while it runs), at the cost of more,
    /// smaller segment files (each open while kept: mind the open-files limit over
    /// `retention_minutes`).
    pub memory_bytes: usize,
}

impl Default for ClickIndexConfig {
    fn default() -> Self {
        ClickIndexConfig {
            retention_minutes: 24 * 60,
            memory_bytes: 64 << 20,
        }
    }
}

/// Exact dedup of impression ids (see `state::dedup`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// RAM the dedup set may use: 3/4 for ids inserted since the last spill, 1/4 for the
    /// Bloom filter over the ids on disk (in the store in `data_dir`). Holds under any flood
    /// of unique impressions; the disk holds the ids of the last token lifetime + retention.
    pub memory_bytes: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            memory_bytes: 256 << 20,
        }
    }
}

/// The quarantine log.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    /// Largest size of `quarantine.jsonl`; records beyond it are dropped and counted
    /// (`adclick_aggregator_quarantine_dropped_total`; the clicks are still counted by
    /// reason in `adclick_aggregator_clicks_total`).
    pub max_bytes: u64,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            max_bytes: 64 << 20,
        }
    }
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            listen_grpc: SocketAddr::from(([127, 0, 0, 1], 9090)),
            listen_http: SocketAddr::from(([127, 0, 0, 1], 9091)),
            data_dir: PathBuf::from("data/aggregator"),
            windows: WindowConfig::default(),
            checkpoint: CheckpointConfig::default(),
            shards: ShardConfig::default(),
            query: QueryConfig::default(),
            api_keys: Vec::new(),
            ingest_keys: Vec::new(),
            ingest: IngestConfig::default(),
            connections: ConnectionConfig::default(),
            dedup: DedupConfig::default(),
            quarantine: QuarantineConfig::default(),
            source: crate::source::SourceConfig::default(),
            click_index: ClickIndexConfig::default(),
            archive: adclick_archive::ArchiveConfig::default(),
            rules: crate::rules::RulesConfig::default(),
            privacy: PrivacyConfig::default(),
            reconcile: crate::nightly::ReconcileConfig::default(),
        }
    }
}

/// Largest encoded `IngestClick` the collector can produce with its default limits, as a
/// `clicks` entry of an `IngestBatch`: impression id 16 B (+2), three u64 ids and five i64
/// times at 10 B varints (+1 tag each), country 2 B (+2), device (+1), os/site/app/user_id
/// at `limits.max_string_len` = 256 B (+3 each), then fields 16 and up with 2-byte tags:
/// client ip 16 B (+3), two bools (3 each), the salt (7), the token's issued-at as a 10 B
/// varint (+2) and the UA class (3), plus 3 B of entry framing:
/// 18 + 88 + 4 + 2 + 4 * 259 + 19 + 6 + 7 + 12 + 3 + 3 = 1,198 B.
pub const MAX_CLICK_BYTES: usize = 1_198;

/// Largest legitimate `IngestBatch`: the collector forwards one spool record per batch (or
/// a part of one, split by shard), and its writer closes a record at 8 MiB of encoded clicks
/// (`MAX_GROUP_BYTES` in collector/src/writer.rs) or `spool.max_clicks_per_record`
/// (20,000 x 1,183 B = 22.6 MiB, so the byte bound is the binding one). The first request
/// of a record is taken whole: at most `limits.max_clicks_per_batch` (1,000) x 1,183 B =
/// 1.1 MiB, below 8 MiB. Twice 8 MiB is the margin for collector_id, seq and a collector
/// configured with larger requests.
pub const DEFAULT_MAX_INGEST_MESSAGE_BYTES: usize = 2 * (8 << 20);

/// Ingest limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest `IngestBatch` accepted, in bytes (checked from the gRPC frame header before
    /// the body is buffered; see [`DEFAULT_MAX_INGEST_MESSAGE_BYTES`] for the default).
    pub max_message_bytes: usize,
    /// How far above a collector's high-water mark a batch's seq may be. A collector's seq
    /// grows by one per spool record and a shard sees gaps (records whose clicks all went to
    /// other shards), but never a jump of a million records between two of its batches;
    /// a batch past the window is refused with FAILED_PRECONDITION and the mark is kept,
    /// so one bad batch (`seq = u64::MAX`) cannot silence a collector id.
    pub max_seq_jump: u64,
    /// Highest seq the FIRST batch of a collector id not seen before may carry. Unbounded
    /// in practice by default (2^48: 9 years at a million records a second), because a new
    /// or rebuilt aggregator must accept collectors whose spools have run for months; the
    /// ceiling keeps a new id from being pushed to `u64::MAX`.
    pub max_first_seq: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_message_bytes: DEFAULT_MAX_INGEST_MESSAGE_BYTES,
            max_seq_jump: 1_000_000,
            max_first_seq: 1 << 48,
        }
    }
}

/// Connection limits and timeouts, for each listener separately.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionConfig {
    /// A new connection must deliver its first complete request (HTTP/1 headers, or the
    /// HTTP/2 preface and a HEADERS frame) within this many seconds, or it is closed.
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight is closed after this many seconds (HTTP/1
    /// keep-alive and HTTP/2 alike; clients reconnect).
    pub idle_timeout_secs: u64,
    /// A request (body included) that takes longer is answered with an error
    /// (DEADLINE_EXCEEDED / 503), so no in-flight request holds a connection forever.
    pub request_timeout_secs: u64,
    /// HTTP/2 PING interval on connections with requests in flight (a dead peer is dropped).
    pub keepalive_interval_secs: u64,
    /// How long a PING may go unanswered.
    pub keepalive_timeout_secs: u64,
    /// HTTP/2 streams a client may have open on one connection.
    pub max_concurrent_streams: u32,
    /// Open connections on the listener; more are closed at once, before any read.
    pub max_connections: usize,
    /// Open connections from one client IP address; more are closed at once.
    pub max_connections_per_ip: usize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            request_timeout_secs: 30,
            keepalive_interval_secs: 20,
            keepalive_timeout_secs: 10,
            max_concurrent_streams: 128,
            max_connections: 4096,
            max_connections_per_ip: 256,
        }
    }
}

/// Watermark, lateness and retention.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Watermark = max corrected event time seen minus this; minutes before the watermark
    /// are final (later clicks still count, as corrections).
    pub allowed_delay_ms: i64,
    /// Minute buckets kept (clicks older than this are quarantined as too late).
    pub retention_minutes: i64,
    /// Hour buckets kept.
    pub retention_hours: i64,
    /// Day buckets kept.
    pub retention_days: i64,
    /// Impression ids are kept for dedup until their token expires plus this.
    pub dedup_skew_ms: i64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            allowed_delay_ms: 10_000,
            retention_minutes: 48 * 60,
            retention_hours: 31 * 24,
            retention_days: 400,
            dedup_skew_ms: 60_000,
        }
    }
}

/// Checkpointing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Time between checkpoints (the WAL before a checkpoint is deleted).
    pub interval_ms: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval_ms: 30_000,
        }
    }
}

/// Internal sharding.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// Worker threads that own disjoint parts of the counting state.
    pub count: usize,
    /// An ad taking more than this fraction of recent clicks is hot: its updates are spread
    /// over all shards (and reported to collectors).
    pub hot_fraction: f64,
    /// Clicks per hot-key detection round (Space-Saving summary reset between rounds).
    /// Rounds of 8,192 clicks or more are sampled by impression hash (at least 4,096
    /// expected samples per round; one click in 16 at the default 100,000).
    pub hot_window_clicks: u64,
    /// Fields with per-value top-N indexes, so that TopAds filtered by one of their values
    /// ranks from an index (any of `advertiser`, `campaign`, `country`, `device`, `os`,
    /// `site`). Each costs memory and apply time about like the unfiltered index's minute
    /// level; a filter on a field without one still answers exactly, bounded by another
    /// index or by a scan of the minute cells (slower). See BENCHMARKS.md.
    pub top_index_fields: Vec<IndexField>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            count: 2,
            hot_fraction: 0.05,
            hot_window_clicks: 100_000,
            top_index_fields: IndexField::DEFAULT.to_vec(),
        }
    }
}

/// Query limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Largest `n` for TopAds: 1 to 10,000 (`validate::MAX_TOP_N`, the API's bound).
    pub max_top_n: u32,
    /// Longest queried range in days (at least 1). Ranges are also bounded by what is
    /// kept: a range may not start before the oldest bucket of its granularity
    /// (`windows.retention_*`; TopAds counts minutes).
    pub max_range_days: i64,
    /// Serve queries without an API key, as admin (a trusted network only: logged loudly
    /// at start). Without it the aggregator refuses to start when `api_keys` is empty.
    pub allow_unauthenticated: bool,
    /// Origins (`scheme://host[:port]`, exactly as browsers send `Origin`) allowed to call
    /// the HTTP mirror and gRPC-Web from a web page: their requests get CORS headers and
    /// their preflights are answered. Empty (the default): no CORS headers at all. `"*"`
    /// allows every origin (API keys are bearer tokens, never cookies, so no credentials
    /// are shared by the browser), but only when listed explicitly. See `cors.rs`.
    pub cors_allowed_origins: Vec<String>,
    /// Queries each API key may make per second, sustained (a token bucket per key; the
    /// unauthenticated caller of `allow_unauthenticated` shares one bucket). 0 turns rate
    /// limiting off. Over the limit: RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` / HTTP
    /// 429 with `Retry-After`. See `ratelimit.rs`.
    pub rate_limit_per_second: u32,
    /// Queries a key may make at once after being idle (the bucket's size); at least 1
    /// when rate limiting is on.
    pub rate_limit_burst: u32,
    /// Least time between two updates of a watch (WatchTopAds, WatchAdClicks, their SSE
    /// mirror) that does not ask for its own `interval_ms`: 100 to 60,000 ms.
    pub watch_interval_ms: u32,
    /// Watches open at once in this process (each re-runs its query at most once per
    /// interval); at least 1.
    pub watch_max_streams: usize,
    /// Watches one API key may have open at once; at least 1.
    pub watch_max_per_key: usize,
    /// Updates a watch holds for a client that has not read them yet; when they are all
    /// unread and the next is due, the client is dropped (RESOURCE_EXHAUSTED). 1 to 64.
    pub watch_buffer: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_top_n: crate::validate::MAX_TOP_N,
            max_range_days: 400,
            allow_unauthenticated: false,
            cors_allowed_origins: Vec::new(),
            rate_limit_per_second: 50,
            rate_limit_burst: 100,
            watch_interval_ms: 1000,
            watch_max_streams: 1000,
            watch_max_per_key: 16,
            watch_buffer: 4,
        }
    }
}

/// Who may query what.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The secret sent as `authorization: Bearer <key>`.
    pub key: String,
    /// `admin` (all ads) or `advertiser` (only `advertiser_id`'s ads).
    pub role: Role,
    /// Required for `advertiser` keys.
    #[serde(default)]
    pub advertiser_id: Option<u64>,
}

/// An API key's role.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees every ad.
    Admin,
    /// Sees only its advertiser's ads.
    Advertiser,
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid aggregator config: {0}")]
pub struct ConfigError(pub String);

impl AggregatorConfig {
    /// Checks values that would otherwise fail later or silently misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        let w = &self.windows;
        if w.allowed_delay_ms < 0
            || w.retention_minutes < 2
            || w.retention_hours < 1
            || w.retention_days < 1
        {
            return err("windows: allowed_delay_ms >= 0, retention_minutes >= 2, retention_hours and retention_days >= 1".into());
        }
        if self.click_index.retention_minutes < 2 {
            return err("click_index.retention_minutes must be at least 2".into());
        }
        if self.click_index.memory_bytes < 1 << 20 {
            return err(format!(
                "click_index.memory_bytes = {} is below the minimum of 1048576 (1 MiB)",
                self.click_index.memory_bytes
            ));
        }
        self.archive.validate().map_err(ConfigError)?;
        self.rules.validate().map_err(ConfigError)?;
        self.reconcile
            .validate(self.archive.enabled)
            .map_err(ConfigError)?;
        if self.dedup.memory_bytes < 1 << 20 {
            return err("dedup.memory_bytes must be at least 1 MiB (1048576)".into());
        }
        if self.shards.count == 0 || self.shards.count > 256 {
            return err("shards.count must be 1 to 256".into());
        }
        if !(self.shards.hot_fraction > 0.0 && self.shards.hot_fraction <= 1.0) {
            return err("shards.hot_fraction must be in (0, 1]".into());
        }
        if self.ingest_keys.is_empty() {
            return err(
                "ingest_keys is empty: the aggregator refuses to start with open ingest. \
                 Generate a key with `adclick keys ingest new`, list it in ingest_keys and set it \
                 as `aggregator_key` in every collector's config"
                    .into(),
            );
        }
        // The example keys in config/aggregator.toml are public: deploying them as they are
        // would be open ingest and open queries under another name.
        let example = |k: &str| k.starts_with(EXAMPLE_KEY_PREFIX);
        if let Some(i) = self.ingest_keys.iter().position(|k| example(k)) {
            return err(format!(
                "ingest_keys[{i}] is the example value from config/aggregator.toml: generate a \
                 real key with `adclick keys ingest new` (and set it as every collector's \
                 aggregator_key)"
            ));
        }
        check_query_access(&self.query, &self.api_keys)?;
        self.connections.validate()?;
        if self.ingest.max_message_bytes < 1024 || self.ingest.max_seq_jump == 0 {
            return err(
                "ingest: max_message_bytes must be at least 1024 and max_seq_jump at least 1"
                    .into(),
            );
        }
        if self.ingest.max_first_seq == 0 || self.ingest.max_first_seq > u64::MAX / 2 {
            return err("ingest.max_first_seq must be between 1 and 2^63".into());
        }
        if let Err(m) = self.source.validate() {
            return err(m);
        }
        if self.ingest_keys.iter().any(|k| k.len() < 16) {
            return err("ingest_keys must be at least 16 characters".into());
        }
        Ok(())
    }
}

/// The `[query]` and `[[api_keys]]` checks the aggregator and the query front share: no
/// example keys, keys required unless `allow_unauthenticated`, limits in range.
pub fn check_query_access(query: &QueryConfig, api_keys: &[ApiKey]) -> Result<(), ConfigError> {
    let err = |m: String| Err(ConfigError(m));
    let example = |k: &str| k.starts_with(EXAMPLE_KEY_PREFIX);
    if let Some(i) = api_keys.iter().position(|k| example(&k.key)) {
        return err(format!(
            "api_keys[{i}].key is the example value from config/aggregator.toml: use a random \
                 secret of at least 16 characters (e.g. from `adclick keys ingest new`)"
        ));
    }
    if api_keys.is_empty() && !query.allow_unauthenticated {
        return err(
            "api_keys is empty: add [[api_keys]] entries (a random secret of at least \
                 16 characters, e.g. from `adclick keys ingest new`, with role = \"admin\" or \
                 \"advertiser\"), or set query.allow_unauthenticated = true on a trusted network"
                .into(),
        );
    }
    let q = query;
    if q.max_top_n == 0 || q.max_top_n > crate::validate::MAX_TOP_N {
        return err(format!(
            "query.max_top_n must be between 1 and {}",
            crate::validate::MAX_TOP_N
        ));
    }
    if q.max_range_days < 1 {
        return err("query.max_range_days must be at least 1".into());
    }
    if !(crate::live::MIN_INTERVAL_MS..=crate::live::MAX_INTERVAL_MS).contains(&q.watch_interval_ms)
    {
        return err(format!(
            "query.watch_interval_ms must be between {} and {}",
            crate::live::MIN_INTERVAL_MS,
            crate::live::MAX_INTERVAL_MS
        ));
    }
    if q.watch_max_streams == 0 || q.watch_max_per_key == 0 {
        return err(
            "query.watch_max_streams and query.watch_max_per_key must be at least 1".into(),
        );
    }
    if !(1..=64).contains(&q.watch_buffer) {
        return err("query.watch_buffer must be between 1 and 64".into());
    }
    if q.rate_limit_per_second > 0 && q.rate_limit_burst == 0 {
        return err(
            "query.rate_limit_burst must be at least 1 when rate_limit_per_second is set \
                 (rate_limit_per_second = 0 turns rate limiting off)"
                .into(),
        );
    }
    if let Err(m) = crate::cors::Cors::new(&q.cors_allowed_origins) {
        return err(format!("query.cors_allowed_origins: {m}"));
    }
    for k in api_keys {
        if k.key.len() < 16 {
            return err(format!(
                "api key {:?}...: keys must be at least 16 characters",
                k.key.chars().take(4).collect::<String>()
            ));
        }
        if (k.role == Role::Advertiser) != k.advertiser_id.is_some() {
            return err("advertiser keys need advertiser_id; admin keys must not have one".into());
        }
    }
    Ok(())
}

impl ConnectionConfig {
    /// Every timeout and cap at least 1.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        let c = self;
        if c.header_read_timeout_secs == 0
            || c.idle_timeout_secs == 0
            || c.request_timeout_secs == 0
            || c.keepalive_interval_secs == 0
            || c.keepalive_timeout_secs == 0
        {
            return err("connections: every *_secs value must be at least 1".into());
        }
        if c.max_connections == 0 || c.max_connections_per_ip == 0 || c.max_concurrent_streams == 0
        {
            return err(
                "connections: max_connections, max_connections_per_ip and max_concurrent_streams must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;
    use adclick_proto::v1::{IngestBatch, IngestClick};
    use prost::Message;

    /// `click_index.memory_bytes` below 1 MiB is refused, naming the key and the minimum.
    #[test]
    fn a_click_index_budget_below_one_mib_is_refused() {
        let mut cfg = keyed();
        cfg.validate().unwrap();
        cfg.click_index.memory_bytes = 65_536;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("click_index.memory_bytes = 65536") && e.contains("1 MiB"),
            "{e}"
        );
        cfg.click_index.memory_bytes = 1 << 20;
        cfg.validate().unwrap();
    }

    /// The derivation of `MAX_CLICK_BYTES`, checked against prost: every field at its
    /// largest encoding under the collector's default limits.
    #[test]
    fn max_click_bytes_is_the_largest_encoded_click() {
        let s = "x".repeat(256);
        let click = IngestClick {
            impression_id: vec![0xff; 16],
            ad_id: u64::MAX,
            advertiser_id: u64::MAX,
            campaign_id: u64::MAX,
            token_expires_at_ms: -1,
            event_time_ms: -1,
            received_at_ms: -1,
            occurred_at_ms: -1,
            sent_at_ms: -1,
            country: "US".into(),
            device: 4,
            os: s.clone(),
            site: s.clone(),
            app: s.clone(),
            user_id: s,
            client_ip: vec![0xff; 16],
            clock_skew_flagged: true,
            dedup_suspect: true,
            salt: u32::MAX,
            token_issued_at_ms: -1,
            ua_class: adclick_proto::v1::UserAgentClass::Bot as i32,
        };
        let batch = IngestBatch {
            clicks: vec![click],
            ..Default::default()
        };
        assert_eq!(batch.encoded_len(), MAX_CLICK_BYTES);
    }

    fn keyed() -> AggregatorConfig {
        AggregatorConfig {
            ingest_keys: vec!["ingest-key-0123456789".into()],
            api_keys: vec![ApiKey {
                key: "admin-key-0123456789".into(),
                role: Role::Admin,
                advertiser_id: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn no_ingest_key_or_no_api_key_refuses_to_start_with_the_way_out() {
        assert_eq!(keyed().validate(), Ok(()));
        let mut c = keyed();
        c.ingest_keys.clear();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("ingest_keys") && e.contains("adclick keys ingest new"),
            "{e}"
        );
        let mut c = keyed();
        c.api_keys.clear();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("api_keys") && e.contains("query.allow_unauthenticated"),
            "{e}"
        );
        c.query.allow_unauthenticated = true;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn query_limits_are_checked() {
        let mut c = keyed();
        assert_eq!(c.query.max_top_n, crate::validate::MAX_TOP_N);
        for n in [0, crate::validate::MAX_TOP_N + 1] {
            c.query.max_top_n = n;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("query.max_top_n"), "{e}");
        }
        c.query.max_top_n = 1;
        c.query.max_range_days = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("query.max_range_days"), "{e}");
    }

    #[test]
    fn rate_limit_and_cors_settings_are_checked() {
        let mut c = keyed();
        c.query.rate_limit_burst = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("query.rate_limit_burst"), "{e}");
        c.query.rate_limit_per_second = 0;
        assert_eq!(c.validate(), Ok(()), "0 = off: the burst does not matter");
        c.query.cors_allowed_origins = vec!["https://dash.example/".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("query.cors_allowed_origins"), "{e}");
        c.query.cors_allowed_origins = vec!["https://dash.example".into(), "*".into()];
        assert_eq!(c.validate(), Ok(()));
        let parsed: AggregatorConfig = toml_like(
            r#"{"query": {"cors_allowed_origins": ["http://localhost:3000"], "rate_limit_per_second": 5, "rate_limit_burst": 7}}"#,
        );
        assert_eq!(parsed.query.cors_allowed_origins, ["http://localhost:3000"]);
        assert_eq!(
            (
                parsed.query.rate_limit_per_second,
                parsed.query.rate_limit_burst
            ),
            (5, 7)
        );
    }

    /// The serde shape of the config (the CLI parses TOML into the same derive).
    fn toml_like(json: &str) -> AggregatorConfig {
        serde_json::from_str(json).unwrap()
    }
}
