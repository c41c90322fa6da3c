//! A Bloom filter of 16-byte impression ids (the adapter the dedup set uses in front of its
//! disk tier): `fastbloom` sized by bits and design capacity, ids mixed to one 64-bit hash,
//! and the count of ids inserted since the filter was built, so its owner knows when it is
//! stale (`items` far above what the disk holds) and when it is empty (no lookup needed).
//! Inserts take `&self` (atomic bits): the dedup set's spill thread adds the ids it wrote
//! while the writer thread keeps looking ids up.

use std::sync::atomic::{AtomicU64, Ordering};

use fastbloom::AtomicBloomFilter;

/// See the module doc.
#[derive(Debug)]
pub struct IdFilter {
    filter: AtomicBloomFilter,
    bits: usize,
    capacity: usize,
    items: AtomicU64,
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
            filter: AtomicBloomFilter::with_num_bits(bits.max(64)).expected_items(capacity.max(1)),
            bits,
            capacity,
            items: AtomicU64::new(0),
        }
    }

    /// An empty filter of the same size.
    pub fn emptied(&self) -> Self {
        Self::new(self.bits, self.capacity)
    }

    /// Adds an id. The count is raised after the bits are set: a reader that sees it
    /// non-zero sees the bits of that id.
    pub fn insert(&self, id: &[u8; 16]) {
        self.filter.insert_hash(id_hash(id));
        self.items.fetch_add(1, Ordering::Release);
    }

    /// False: `id` was never inserted. True: it may have been. Costs nothing while empty.
    pub fn may_contain(&self, id: &[u8; 16]) -> bool {
        self.items.load(Ordering::Acquire) > 0 && self.filter.contains_hash(id_hash(id))
    }

    /// Ids inserted since the filter was built.
    pub fn items(&self) -> u64 {
        self.items.load(Ordering::Acquire)
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
