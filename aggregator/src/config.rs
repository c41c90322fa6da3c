//! Aggregator configuration: the `aggregator.toml` schema with safe defaults and its
//! validation. Parsing the file is the CLI's job (see `config/aggregator.toml`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Everything an aggregator needs.
#[derive(Debug, Clone, Deserialize)]
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
    /// API keys allowed to query.
    pub api_keys: Vec<ApiKey>,
    /// Secrets collectors must send (`authorization: Bearer <key>`) to ingest. Empty =
    /// ingest is open to anyone who reaches `listen_grpc` (dev only: a warning is logged).
    pub ingest_keys: Vec<String>,
    /// Exact dedup: RAM ceiling (the rest spills to `data_dir`).
    pub dedup: DedupConfig,
    /// The log of clicks that were not counted (`<data_dir>/quarantine.jsonl`).
    pub quarantine: QuarantineConfig,
}

/// Exact dedup of impression ids (see `state::dedup`).
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
            dedup: DedupConfig::default(),
            quarantine: QuarantineConfig::default(),
        }
    }
}

/// Watermark, lateness and retention.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// Worker threads that own disjoint parts of the counting state.
    pub count: usize,
    /// An ad taking more than this fraction of recent clicks is hot: its updates are spread
    /// over all shards (and reported to collectors).
    pub hot_fraction: f64,
    /// Clicks per hot-key detection round (Space-Saving summary reset between rounds).
    pub hot_window_clicks: u64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            count: 2,
            hot_fraction: 0.05,
            hot_window_clicks: 100_000,
        }
    }
}

/// Query limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Largest `n` for TopAds.
    pub max_top_n: u32,
    /// Longest queried range in days.
    pub max_range_days: i64,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_top_n: 1000,
            max_range_days: 400,
        }
    }
}

/// Who may query what.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
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
        if self.dedup.memory_bytes < 1 << 20 {
            return err("dedup.memory_bytes must be at least 1 MiB (1048576)".into());
        }
        if self.shards.count == 0 || self.shards.count > 256 {
            return err("shards.count must be 1 to 256".into());
        }
        if !(self.shards.hot_fraction > 0.0 && self.shards.hot_fraction <= 1.0) {
            return err("shards.hot_fraction must be in (0, 1]".into());
        }
        if self.ingest_keys.iter().any(|k| k.len() < 16) {
            return err("ingest_keys must be at least 16 characters".into());
        }
        for k in &self.api_keys {
            if k.key.len() < 16 {
                return err(format!(
                    "api key {:?}...: keys must be at least 16 characters",
                    k.key.chars().take(4).collect::<String>()
                ));
            }
            if (k.role == Role::Advertiser) != k.advertiser_id.is_some() {
                return err(
                    "advertiser keys need advertiser_id; admin keys must not have one".into(),
                );
            }
        }
        Ok(())
    }
}
