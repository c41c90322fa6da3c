//! adclick client SDK.
//!
//! - [`core`]: platform-free pieces (click building, batching and overflow policy, retry
//!   schedule, the [`core::Clock`] and [`core::OfflineQueue`] traits). No tokio, no sockets,
//!   no files: it compiles for `wasm32-unknown-unknown`, where `sdk-wasm` wraps it.
//! - `native` (default feature): [`Tracker`] on tokio with the reqwest HTTP transport and
//!   the file-backed offline queue for mobile apps.
//! - `quic` (off by default): `QuicTransport`, the same batches over QUIC, for
//!   [`TrackerBuilder::transport`].
//! - `signer` (in `native`): [`ImpressionSigner`] for ad servers.
//!
//! See [`Tracker`] (native) for an example.
#![deny(missing_docs)]

pub mod core;

#[cfg(feature = "native")]
pub mod native;
#[cfg(feature = "signer")]
pub mod signer;

pub use crate::core::{
    ClickError, Consent, Device, Dimensions, OverflowPolicy, RetryPolicy, StatsSnapshot,
    TrackerEvent,
};
#[cfg(feature = "quic")]
pub use crate::native::QuicTransport;
#[cfg(feature = "native")]
pub use crate::native::{FileQueue, HttpTransport, SdkError, Tracker, TrackerBuilder};
#[cfg(feature = "signer")]
pub use crate::signer::{AdPlacement, ImpressionSigner, MintedToken};

/// The README's Rust examples, compiled as doctests so the docs keep working when pasted.
#[cfg(all(doctest, feature = "native"))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The SDK's name as sent in `ClickBatch.sdk_name`.
pub const SDK_NAME: &str = "adclick-rust";
/// The SDK's version as sent in `ClickBatch.sdk_version`.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");
