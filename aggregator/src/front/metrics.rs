//! The query front's metrics, declared and registered here once (under
//! `adclick_aggregator_front_*`, on the front's `/metrics` with the API's metrics,
//! `Metrics::for_front`; an aggregator registers them too and leaves them at zero),
//! incremented by `shards.rs` and `health.rs`. Nothing else.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

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

adclick_proto::metrics! {
    /// Every front metric (`adclick_aggregator_front_*`; the name is the field's, the help
    /// its doc comment).
    #[derive(Debug)]
    pub struct FrontMetrics under "front" {
        /// Shard calls that failed the query as UNAVAILABLE (no answer within
        /// `shard_timeout_ms`, or UNAVAILABLE / DEADLINE_EXCEEDED / a transport error), by
        /// shard and rpc.
        pub shard_unavailable: Family<ShardRpcLabel, Counter> = Family::default();
        /// Calls made to each shard (every rpc).
        pub shard_calls: Family<ShardLabel, Counter> = Family::default();
        /// 1 while the shard's gRPC health says SERVING, 0 otherwise.
        pub shard_up: Family<ShardLabel, Gauge> = Family::default();
    }
}
