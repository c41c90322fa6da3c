//! A Bloom filter of 16-byte impression ids (the adapter the dedup set uses in front of its
//! disk tier): `fastbloom` sized by bits and design capacity, ids mixed to one 64-bit hash,
//! and the count of ids inserted since the filter was built, so its owner knows when it is
//! stale (`items` far above what the disk holds) and when it is empty (no lookup needed).

use fastbloom::BloomFilter;

/// See the module doc.
#[derive(Debug, Clone)]
pub struct IdFilter {
    filter: BloomFilter,
    bits: usize,
    capacity: usize,
    items: u64,
}

/// Mixes an id to the filter's hash. Ids are random, but the mix keeps the filter honest
/// for ids that are not.
fn id_hash(id: &[u8; 16]) -> u64 {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&id[..8]);
    b.copy_from_slice(&id[8..]);
    let mut x = u64::from_le_bytes(a) ^ u64::from_le_bytes(b).rotate_left(29);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl IdFilter {
    /// An empty filter of `bits` bits designed for `capacity` ids.
    pub fn new(bits: usize, capacity: usize) -> Self {
        IdFilter {
            filter: BloomFilter::with_num_bits(bits.max(64)).expected_items(capacity.max(1)),
            bits,
            capacity,
            items: 0,
        }
    }

    /// An empty filter of the same size.
    pub fn emptied(&self) -> Self {
        Self::new(self.bits, self.capacity)
    }

    /// Adds an id.
    pub fn insert(&mut self, id: &[u8; 16]) {
        self.filter.insert_hash(id_hash(id));
        self.items += 1;
    }

    /// False: `id` was never inserted. True: it may have been. Costs nothing while empty.
    pub fn may_contain(&self, id: &[u8; 16]) -> bool {
        self.items > 0 && self.filter.contains_hash(id_hash(id))
    }

    /// Ids inserted since the filter was built.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// The capacity it was designed for (~1% false positives up to it).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bits / 8
    }
}
