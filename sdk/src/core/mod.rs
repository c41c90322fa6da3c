//! The platform-free SDK core: everything a tracker does that needs no OS.
//!
//! Must not depend on tokio, reqwest, wasm-bindgen, files or the system clock: platform
//! needs come in through the [`Clock`] and [`OfflineQueue`] traits and through the
//! wrappers (`native`, `sdk-wasm`) that drive an [`Outbox`].

mod click;
mod outbox;
mod queue;
mod retry;
mod sender;
mod stats;

pub use click::{ClickError, Device, Dimensions, MAX_DIMENSION_LEN, build_click, encode_batch};
pub use outbox::{BatchConfig, Completion, InFlight, Outbox, OverflowPolicy, PushOutcome};
pub use queue::{MemoryQueue, OfflineQueue, QueueError, StoredClick};
pub use retry::{Disposition, RetryPolicy, classify, parse_retry_after};
pub use sender::{Consent, FlushError, Now, Output, Reply, Sender, SenderConfig, Transmit};
pub use stats::{Stats, StatsSnapshot, TrackerEvent};

/// A source of wall-clock time in milliseconds since the Unix epoch. Native code uses the
/// system clock, the browser `Date.now()`; tests and load generators inject skewed clocks.
pub trait Clock: Send + Sync {
    /// Now, in ms since the epoch.
    fn now_ms(&self) -> i64;
}
