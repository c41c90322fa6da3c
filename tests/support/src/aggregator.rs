//! One aggregator under test (the aggregator crate's own tests): its credentials, a config
//! on a temp dir, a gRPC channel to it, and a restart on a store a killed aggregator is
//! still releasing. The cross-component tests use [`crate::stack`] instead.

use std::path::Path;
use std::time::Duration;

use adclick_aggregator::config::{ApiKey, Role};
use adclick_aggregator::{Aggregator, AggregatorConfig};
use tonic::transport::Channel;

/// The admin API key of [`config`].
pub const ADMIN: &str = "admin-key-0123456789";
/// What the test "collectors" send as `authorization: Bearer`, listed in `ingest_keys`.
pub const INGEST: &str = "ingest-key-0123456789";
/// 2026-01-01T00:00:00Z: the tests' fixed event time origin.
pub const T0: i64 = 1_767_225_600_000;

/// An aggregator config on `dir`: both ports on 127.0.0.1:0, the admin key [`ADMIN`] and
/// the ingest key [`INGEST`], everything else default.
pub fn config(dir: &Path) -> AggregatorConfig {
    let mut c = AggregatorConfig::default();
    c.listen_grpc = "127.0.0.1:0".parse().unwrap();
    c.listen_http = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.to_path_buf();
    c.api_keys = vec![ApiKey {
        key: ADMIN.into(),
        role: Role::Admin,
        advertiser_id: None,
    }];
    c.ingest_keys = vec![INGEST.into()];
    // Oracle tests fire hundreds of queries a second with one key; the rate limit has its
    // own test (aggregator tests, `clients::per_key_rate_limits_over_grpc_and_http`).
    c.query.rate_limit_per_second = 0;
    c
}

/// A gRPC channel to `a`.
pub async fn connect(a: &Aggregator) -> Channel {
    Channel::from_shared(format!("http://{}", a.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Starts an aggregator on `cfg.data_dir`, retrying while a killed aggregator's writer
/// thread still holds the database; `fail_checkpoint_after_tables` is set on the store
/// (`RedbStore::fail_checkpoint_after_tables`).
pub async fn start_retrying(
    cfg: AggregatorConfig,
    fail_checkpoint_after_tables: Option<usize>,
) -> Aggregator {
    // The killed aggregator's writer thread releases the database when it exits.
    let mut last = String::new();
    for _ in 0..200 {
        match adclick_aggregator::store::RedbStore::open(&cfg.data_dir) {
            Ok(mut store) => {
                store.fail_checkpoint_after_tables = fail_checkpoint_after_tables;
                return adclick_aggregator::start_with_store(cfg, store)
                    .await
                    .unwrap();
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not reopen the store: {last}")
}
