//! The JetStream source's metrics, declared and registered here once (under
//! `adclick_aggregator_source_*`), incremented by the consumers. Nothing else.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

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

adclick_proto::metrics! {
    /// Every source metric (`adclick_aggregator_source_*`; the name is the field's, the
    /// help its doc comment).
    #[derive(Debug)]
    pub struct SourceMetrics under "source" {
        /// Last applied stream sequence per partition.
        pub position: Family<PartitionLabel, Gauge> = Family::default();
        /// Messages of the partition's consumer not yet delivered to this shard (its lag).
        pub pending: Family<PartitionLabel, Gauge> = Family::default();
        /// Consumer restarts by reason (nats, gap, chain).
        pub restarts: Family<ReasonLabel, Counter> = Family::default();
        /// Messages skipped whole by reason (undecodable, too_large).
        pub skipped: Family<ReasonLabel, Counter> = Family::default();
        /// Clicks removed because their ad is in another partition.
        pub foreign_clicks: Counter = Counter::default();
    }
}

impl SourceMetrics {
    pub(crate) fn restart(&self, reason: &'static str) {
        self.restarts.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn skip(&self, reason: &'static str) {
        self.skipped.get_or_create(&ReasonLabel { reason }).inc();
    }
}
