//! The aggregator's integration tests: one test binary (`--test aggregator`), one module
//! per concern. Each test starts the real aggregator on 127.0.0.1:0 (in-process, or in a
//! child process for the memory figure) and talks to it over real gRPC and HTTP, or opens a
//! real store file. Expected numbers come from an oracle or ledger computed in the test
//! from the clicks it generated.
//!
//! Ignored measurements, each with its own command:
//! - `cargo test --release -p adclick-aggregator --test aggregator -- --ignored --nocapture
//!   dedup_bound::flood` (1M unique impressions, RSS under the dedup ceiling);
//! - `cargo test --release -p adclick-aggregator --test aggregator -- --ignored --nocapture
//!   unauthenticated_64_mib` (an unauthenticated 64 MiB `Ingest` costs < 10 MiB RSS).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod util;

mod archive;
mod breadth;
mod clients;
mod counting;
mod dedup_bound;
mod filtered_top;
mod hardening;
mod hostile_input;
mod invalid_traffic;
mod ip_filter;
mod privacy;
mod query_api;
mod recovery;
mod store_integrity;
mod stream_positions;
mod totals_live;
mod validation;
