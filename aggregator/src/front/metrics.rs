//! The query front's metrics, declared and registered here once (under
//! `adclick_aggregator_front_*`, on the front's `/metrics`; an aggregator registers them
//! too and leaves them at zero), incremented by `shards.rs` and `health.rs`. Nothing else.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `shard` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    /// The shard's `name`.
    pub shard: String,
}

/// `shard` and `rpc` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardRpcLabel {
    /// The shard's `name`.
    pub shard: String,
    /// GetAdClicks, BatchGetAdClicks, Breakdown or TopAds.
    pub rpc: &'static str,
}

/// Every front metric.
#[derive(Debug, Default)]
pub struct FrontMetrics {
    /// Shard calls that failed the query as UNAVAILABLE (no answer within
    /// `shard_timeout_ms`, or UNAVAILABLE / DEADLINE_EXCEEDED / a transport error), by
    /// shard and rpc.
    pub shard_unavailable: Family<ShardRpcLabel, Counter>,
    /// Calls made to each shard (every rpc).
    pub shard_calls: Family<ShardLabel, Counter>,
    /// 1 while the shard's gRPC health says SERVING, 0 otherwise.
    pub shard_up: Family<ShardLabel, Gauge>,
}

impl FrontMetrics {
    /// Registers every metric under `front_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("front");
        r.register(
            "shard_unavailable",
            "Shard calls that failed a query as UNAVAILABLE, by shard and rpc",
            self.shard_unavailable.clone(),
        );
        r.register(
            "shard_calls",
            "Calls made to each shard",
            self.shard_calls.clone(),
        );
        r.register(
            "shard_up",
            "1 while the shard's gRPC health is SERVING",
            self.shard_up.clone(),
        );
    }
}
