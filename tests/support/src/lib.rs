//! Test setup shared by the tests of every adclick crate (collector, aggregator and the
//! cross-component tests in `tests/`): keys and tokens, server configs on temp dirs, real
//! servers started in-process on 127.0.0.1:0, the `adclick` binary as a child process, an
//! in-test gRPC `IngestService` standing in for the aggregator, query clients and bounded
//! polling.
//!
//! It must not assert anything about product behaviour: it only sets things up and fetches
//! results, and the tests that use it decide what is right. A helper here panics only when
//! the setup itself fails (a port cannot be bound, a file cannot be written). Only `tests/`
//! directories use it (as a dev-dependency); no product crate's `src/` may.
//!
//! - [`common`]: what every suite needs (time, ports, polling, keys, bearer auth).
//! - [`collector`]: one collector's test config.
//! - [`fake_aggregator`]: the in-test aggregator ingest edge for collector tests.
//! - [`aggregator`]: one aggregator's test config and credentials, restarts after a kill.
//! - [`stack`]: the whole pipeline (collectors, aggregator, SDK load, queries) for the
//!   cross-component tests.
//! - [`child`]: the real `adclick` binary as a child process.
//! - [`nats`]: real nats-server processes (single node or R3 cluster) for the JetStream
//!   back end, installed by `scripts/setup-nats.sh` when missing.
//! - [`http_load`]: concurrent HTTP clients posting signed click batches to collectors,
//!   retrying across them, with the ledger of what got a 202.
//! - [`shards`]: per-ad totals from the query endpoints owning each ad's partition,
//!   `/metrics` samples, a partition's last stream sequence.
#![deny(missing_docs)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

pub mod aggregator;
pub mod child;
pub mod collector;
pub mod common;
pub mod fake_aggregator;
pub mod http_load;
pub mod nats;
pub mod shards;
pub mod stack;
