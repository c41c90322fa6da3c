//! The JetStream source's metrics, declared and registered here once (under
//! `adclick_aggregator_source_*`), incremented by the consumers. Nothing else.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `partition` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    /// The partition.
    pub partition: u32,
}

/// `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// Every source metric.
#[derive(Debug, Default)]
pub struct SourceMetrics {
    /// Last applied stream sequence per partition.
    pub position: Family<PartitionLabel, Gauge>,
    /// Messages of the partition's consumer not yet delivered to this shard (its lag).
    pub pending: Family<PartitionLabel, Gauge>,
    /// Consumer restarts by reason (nats, gap, chain).
    pub restarts: Family<ReasonLabel, Counter>,
    /// Messages skipped whole by reason (undecodable, too_large).
    pub skipped: Family<ReasonLabel, Counter>,
    /// Clicks removed because their ad is in another partition.
    pub foreign_clicks: Counter,
}

impl SourceMetrics {
    /// Registers every metric under `source_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("source");
        r.register(
            "position",
            "Last applied stream sequence per partition",
            self.position.clone(),
        );
        r.register(
            "pending",
            "Messages of a partition not yet delivered to this shard",
            self.pending.clone(),
        );
        r.register(
            "restarts",
            "Consumer restarts by reason",
            self.restarts.clone(),
        );
        r.register(
            "skipped",
            "Messages skipped whole by reason",
            self.skipped.clone(),
        );
        r.register(
            "foreign_clicks",
            "Clicks removed because their ad is in another partition",
            self.foreign_clicks.clone(),
        );
    }

    pub(crate) fn restart(&self, reason: &'static str) {
        self.restarts.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn skip(&self, reason: &'static str) {
        self.skipped.get_or_create(&ReasonLabel { reason }).inc();
    }
}
