//! Counting state and the operators over it: dimension keys, the window operator (dedup,
//! watermark, routing), the shards' cells and top-N indexes (unfiltered and per filter value), unique-user sketches and
//! heavy-hitter detection. No I/O and no wire types: clicks arrive as [`click::ClickIn`].

pub mod click;
pub mod dedup;
pub mod dims;
pub mod hot;
pub mod published;
pub mod shard;
pub mod topn;
pub mod topset;
pub mod windows;

/// Hash maps of the per-click path use foldhash with a fixed seed: several times faster
/// than SipHash on small keys, and deterministic (keys here are ids we minted or that a
/// collector verified, not attacker-chosen strings; interned dimension strings are bounded
/// in length by the collector).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;
