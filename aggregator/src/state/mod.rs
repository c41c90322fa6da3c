//! Counting state and the operators over it: dimension keys, the window operator (dedup,
//! watermark, routing), the shards' cells and top-N index, unique-user sketches and
//! heavy-hitter detection. No I/O and no wire types beyond the `IngestClick` input.

pub mod dims;
pub mod hll;
pub mod hot;
pub mod operator;
pub mod shard;
pub mod topn;
pub mod windows;
