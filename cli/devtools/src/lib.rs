//! Development helpers shared by `adclick dev --cluster` (crate `adclick-cli`) and the test
//! setup (`adclick-test-support`): the one lookup of the `nats-server` binary, the one
//! writer of a JetStream node's config, waiting for a TCP port, ports for child servers to
//! bind, and signals by pid.
//!
//! It starts nothing by itself and knows nothing about adclick's servers: callers own
//! their child processes (the CLI's process table, the tests' `NatsCluster`). Not for
//! production deployments, which run nats-server under their own supervisor.
#![deny(missing_docs)]

pub mod nats;
pub mod ports;
pub mod process;
