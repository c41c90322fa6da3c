//! Native (tokio) implementations of the SDK: the [`Tracker`], the reqwest
//! [`HttpTransport`], the quinn `QuicTransport` (feature `quic`), the file-backed
//! [`FileQueue`] and the system clock.
//!
//! Policy (what to batch, when to retry, what to drop) lives in `crate::core`; this module
//! only supplies timers, sockets and files.

mod file_queue;
mod http;
#[cfg(feature = "quic")]
mod quic;
mod tracker;

use std::time::{SystemTime, UNIX_EPOCH};

pub use file_queue::FileQueue;
pub use http::{HttpTransport, SendFuture, Transport, TransportError, TransportResponse};
#[cfg(feature = "quic")]
pub use quic::QuicTransport;
pub use tracker::{Tracker, TrackerBuilder};

use crate::core::{ClickError, Clock, QueueError};

/// Errors of the native tracker.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The endpoint is not an http(s) URL.
    #[error(
        "invalid endpoint {0:?}: expected an http:// or https:// URL such as http://127.0.0.1:8080"
    )]
    InvalidEndpoint(String),
    /// `build()` was called outside a tokio runtime.
    #[error("Tracker::build() must be called inside a tokio runtime")]
    NoRuntime,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// The QUIC transport's TLS setup is unusable (server name, root certificates).
    #[error("invalid QUIC/TLS setup: {0}")]
    Tls(String),
    /// A click was refused (see [`ClickError`]).
    #[error(transparent)]
    Click(#[from] ClickError),
    /// The offline queue could not be opened.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Some clicks could not be delivered yet; they stay queued (and persisted when an
    /// offline queue is configured) for a later flush.
    #[error("{queued} clicks not delivered yet: {reason}")]
    Undelivered {
        /// Clicks still queued.
        queued: usize,
        /// The last failure.
        reason: String,
    },
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}
