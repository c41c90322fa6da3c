//! End-to-end scenarios across the SDK, collectors, the aggregator and the `adclick`
//! binary, over real sockets, files and processes. One module per scenario; every count
//! asserted comes from the test's own ledger of what it sent and what was acknowledged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

/// The shared test setup (`adclick-test-support`), as one namespace for the scenarios.
mod support {
    pub use adclick_test_support::child::*;
    pub use adclick_test_support::common::*;
    pub use adclick_test_support::stack::*;
}

mod aggregator_kill;
mod aggregator_outage;
mod archive_s3;
mod clients;
mod cluster_faults;
mod collector_kill;
mod countable;
mod dedup_crash;
mod dev_cluster;
mod ffi_bindings;
mod file_source_kill;
mod forward_bytes;
mod hot_dedup;
mod invalid_traffic;
mod jetstream_aggregator;
mod jetstream_collector_kill;
mod metrics_format;
mod mixed;
mod nightly_reconcile;
mod query_front;
mod readme;
mod reconcile;
mod regions;
mod repair;
mod retention_gap;
mod spool_damage;
mod token_python;
mod visibility_and_redirect;
