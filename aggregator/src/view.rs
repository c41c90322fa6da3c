//! The read side of the aggregator's state: what the engine's writer publishes and the
//! query code reads (the shards behind read-write locks, the watermark, interned names,
//! readiness). Owned by neither side, so `engine` and `query` do not import each
//! other. It must not hold logic: reading and writing stay in `query` and `engine`.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::health::Readiness;
use crate::state::FastMap;
use crate::state::dims::DimKey;
use crate::state::shard::ShardState;
use crate::state::topset::TopSet;
use arc_swap::ArcSwap;

/// Shared, read-mostly view for queries.
#[derive(Debug)]
pub struct View {
    /// The shards' cells (queries take read locks).
    pub shards: Vec<RwLock<ShardState>>,
    /// The shards' top-N indexes (unfiltered and per filter value), published
    /// read-copy-update style: a reader loads one (no lock) and the shard thread never
    /// waits for it (`state::published`).
    pub tops: Vec<ArcSwap<TopSet>>,
    /// Current watermark (ms).
    pub watermark_ms: AtomicI64,
    /// Interned strings and combinations: what queries need from the window
    /// operator, replaced whole when it changes (queries load it without a lock).
    pub meta: ArcSwap<QueryMeta>,
    /// ad -> (advertiser, campaign), as the window operator pinned them (grows only).
    pub owners: RwLock<FastMap<u64, (u64, u64)>>,
    /// Set by a simulated crash: the writer exits without its final checkpoint.
    pub killed: std::sync::atomic::AtomicBool,
    /// Whether this node can accept writes (raised by the writer on a failed WAL commit).
    pub ready: Readiness,
    /// The click index behind the `ip` and `user_id` filters (loaded without a lock).
    pub clicks: Arc<crate::clickindex::Shared>,
    /// Its invalid lane: the clicks the rules classified invalid, on arrival or moved
    /// later (`clickindex::Lanes`); valid = all − invalid.
    pub invalid_clicks: Arc<crate::clickindex::Shared>,
    /// Epoch ms from which the click index holds every counted click (`i64::MIN`: all);
    /// see `clickindex::complete_since`.
    pub click_index_since_ms: i64,
}

/// What queries need from the window operator.
#[derive(Debug, Default, Clone)]
pub struct QueryMeta {
    /// Interned names (id = index + 1).
    pub names: HashMap<String, u32>,
    /// Dimension combinations (combination id = index + 1).
    pub combos: Vec<DimKey>,
}

/// Wall clock, ms (queries' "now", the watermark-lag gauge).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
