//! Probabilistic sketches of the counting state: [`hll`] (mergeable HyperLogLog with a
//! sparse mode that is exact for small sets; unique users) and [`bloom`] (the impression-id
//! filter in front of the dedup disk tier, blocked: one cache line per id). Hashing
//! comes from maintained crates (`xxhash-rust`); nothing here does I/O or knows clicks.

pub mod bloom;
pub mod hll;
