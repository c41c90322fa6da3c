//! The partition of an ad on the JetStream back end: part of the contract, because
//! collectors (which publish to `clicks.<partition>`) and aggregator shards (which own
//! partitions and refuse clicks of ads they do not own) must compute the same value, in
//! any language, in any version, forever. Pure: no I/O, no randomness.
//!
//! **Definition:** `partition(ad_id, P) = XXH64(ad_id as 8 bytes little-endian, seed 0) mod P`.
//! XXH64 is the published xxHash 64-bit function (test vectors below were taken from the
//! reference implementation through python-xxhash: `xxhash.xxh64_intdigest(
//! struct.pack('<Q', ad_id), 0) % P`). `P` is fixed when the stream is created (the stream
//! records it in its metadata, see the collector's `forward::jetstream`); changing it moves
//! ads between partitions, so it is never changed on a live stream.
//!
//! The salt of hot-key fanout is deliberately not an input: an ad lives in exactly one
//! partition, so a query front can merge per-shard answers exactly.

/// Largest partition count a stream may have (subject tokens and per-partition consumers
/// stay manageable; 1024 is far above what one region needs).
pub const MAX_PARTITIONS: u32 = 1024;

/// The stream metadata key holding `P`, written by the collector that creates the stream
/// and read by the aggregator shards that consume it.
pub const STREAM_PARTITIONS_KEY: &str = "adclick.partitions";

/// The XXH64 (seed 0) of `ad_id`'s 8 little-endian bytes: the stable hash partitions are
/// taken from.
pub fn ad_hash(ad_id: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(&ad_id.to_le_bytes(), 0)
}

/// The partition (`0..partitions`) owning `ad_id`; `partitions` 0 is read as 1.
pub fn partition(ad_id: u64, partitions: u32) -> u32 {
    let p = u64::from(partitions.max(1));
    // The remainder is below `p`, which fits u32.
    u32::try_from(ad_hash(ad_id) % p).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_xxh64() {
        // (ad_id, XXH64(le bytes, 0), % 16, % 4, % 7) from python-xxhash 3.x.
        let vectors: [(u64, u64, u32, u32, u32); 7] = [
            (0, 3_803_688_792_395_291_579, 11, 3, 3),
            (1, 11_468_921_228_449_061_269, 5, 1, 4),
            (42, 13_066_772_586_158_965_587, 3, 3, 4),
            (7, 609_900_476_111_905_877, 5, 1, 3),
            (1000, 16_518_971_584_542_448_201, 9, 1, 5),
            (u64::MAX, 9_642_548_396_912_002_761, 9, 1, 0),
            (123_456_789, 14_662_639_848_940_634_189, 13, 1, 2),
        ];
        for (ad, h, p16, p4, p7) in vectors {
            assert_eq!(ad_hash(ad), h, "ad {ad}");
            assert_eq!(partition(ad, 16), p16, "ad {ad} of 16");
            assert_eq!(partition(ad, 4), p4, "ad {ad} of 4");
            assert_eq!(partition(ad, 7), p7, "ad {ad} of 7");
        }
        assert_eq!(partition(42, 0), 0);
        assert_eq!(partition(42, 1), 0);
    }

    #[test]
    fn spreads_ads_evenly() {
        let mut counts = [0u32; 16];
        for ad in 0..32_000u64 {
            counts[partition(ad, 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (1_700..2_300).contains(c)),
            "{counts:?}"
        );
    }
}
