//! `[archive]`: where the archive goes and how often a file is closed.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The archive's configuration (`[archive]` in aggregator.toml).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Archive every click (off by default).
    pub enabled: bool,
    /// Names this writer's files (`<writer_id>-<seq>.parquet`): every writer sharing a
    /// destination needs its own (letters, digits, `_`, `-`).
    pub writer_id: String,
    /// Local destination directory (used when `[archive.s3]` is not set). Relative paths
    /// resolve against the config file's directory (`adclick aggregator`).
    pub dir: PathBuf,
    /// The open files are closed (and published) at most this long after the first click
    /// they hold: how far behind the archive may be (default 300 s).
    pub roll_interval_secs: u64,
    /// The open files are also closed once they hold this many rows together.
    pub max_rows_per_roll: u64,
    /// Rows per Parquet row group (the unit a scan reads and skips by statistics).
    pub row_group_rows: usize,
    /// CPU priority of the archive thread as a Unix nice value (0 to 19, default 10): under
    /// CPU contention the aggregator's apply path goes first and the archive catches up when
    /// there is room (it reads the WAL, which is kept until it does).
    pub nice: i32,
    /// An S3-compatible destination instead of `dir`.
    pub s3: Option<S3Config>,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            enabled: false,
            writer_id: "aggregator".into(),
            dir: PathBuf::from("data/archive"),
            roll_interval_secs: 300,
            max_rows_per_roll: 10_000_000,
            row_group_rows: 512 * 1024,
            nice: 10,
            s3: None,
        }
    }
}

/// An S3-compatible bucket. Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`), never from the file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (e.g. `raw/clicks`; may be empty).
    pub prefix: String,
    /// Endpoint of a non-AWS store (MinIO, Ceph, moto...), e.g. `http://127.0.0.1:9000`;
    /// unset = AWS for `region`.
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`; also `AWS_REGION`/`AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which most non-AWS stores need.
    pub path_style: bool,
    /// Allow a plain-HTTP endpoint (tests, a store on the same host).
    pub allow_http: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: true,
            allow_http: false,
        }
    }
}

impl ArchiveConfig {
    /// `roll_interval_secs` as a duration.
    pub fn roll_interval(&self) -> Duration {
        Duration::from_secs(self.roll_interval_secs.max(1))
    }

    /// What is wrong with it, if anything.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.writer_id.is_empty()
            || self.writer_id.len() > 64
            || !self
                .writer_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "archive.writer_id {:?}: 1 to 64 letters, digits, '_' or '-'",
                self.writer_id
            ));
        }
        if self.roll_interval_secs == 0 || self.roll_interval_secs > 24 * 3600 {
            return Err("archive.roll_interval_secs must be between 1 and 86400".into());
        }
        if self.row_group_rows < 1024 {
            return Err("archive.row_group_rows must be at least 1024".into());
        }
        if !(0..=19).contains(&self.nice) {
            return Err("archive.nice must be between 0 and 19".into());
        }
        if self.max_rows_per_roll == 0 {
            return Err("archive.max_rows_per_roll must be at least 1".into());
        }
        if let Some(s3) = &self.s3 {
            if s3.bucket.is_empty() {
                return Err("archive.s3.bucket is required".into());
            }
            if s3.prefix.starts_with('/') || s3.prefix.ends_with('/') {
                return Err(
                    "archive.s3.prefix must not start or end with '/' (e.g. \"raw/clicks\")".into(),
                );
            }
        }
        Ok(())
    }
}
