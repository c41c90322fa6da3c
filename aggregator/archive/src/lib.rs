//! adclick's raw click archive: every click an aggregator decided on (counted, and every
//! one it refused with the reason), as Parquet files partitioned by event date and hour
//! (`dt=YYYY-MM-DD/hour=HH/<writer>-<seq>.parquet`) on a local directory or an
//! S3-compatible bucket. The schema is in `docs/archive.md`.
//!
//! The writer ([`Archiver`]) reads from a [`Feed`], the seam between it and whatever log
//! holds the clicks: the aggregator's WAL (`adclick_aggregator::archive`), or a stream
//! consumer. The crash reasoning is in [`archiver`].
#![deny(missing_docs)]

pub mod archiver;
pub mod config;
pub mod dest;
pub mod partition;
pub mod read;
pub mod row;

pub use archiver::{Archiver, Feed, Pending, State, Stats};
pub use config::{ArchiveConfig, S3Config};
pub use dest::Destination;
pub use row::{Row, Status};

/// An archive failure (I/O, Parquet, the destination, the feed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArchiveError(pub String);
