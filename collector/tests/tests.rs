//! The collector's integration tests: one test binary (`--test collector`), one module per
//! concern. Each test starts a real collector on 127.0.0.1:0 (in-process, or in a child
//! process for the idle-connection benchmark) over real sockets and files, with the native
//! SDK, raw HTTP, QUIC or raw TCP on one side and the in-test gRPC aggregator
//! (`adclick_test_support::fake_aggregator`) or real nats-server processes (`jetstream`,
//! `adclick_test_support::nats`) on the other. Every expected number is
//! computed from what the test sent.
//!
//! The ignored benchmark: `cargo test --release -p adclick-collector --test collector --
//! --ignored --nocapture idle_flood` (see `idle_flood`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod util;

mod dedup;
mod file_source;
mod forwarding;
mod hardening;
mod idle_flood;
mod ingest;
mod jetstream;
mod limits;
mod pipelined;
mod quic;
mod tokens;
mod trusted_proxy;
mod user_agent;
