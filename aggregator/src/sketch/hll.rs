//! Mergeable HyperLogLog sketch for approximate unique-user counts.
//!
//! # What it is for
//!
//! Counting distinct users per key/window in bounded memory, merging counts
//! from shards or windows (set union), and persisting them in checkpoints.
//! Small sets (the common case: most keys see few users) stay in a compact
//! sparse form that is exact for practical purposes; large sets use 16 KiB of
//! registers with a standard error of about 0.81%.
//!
//! # Design
//!
//! * **Hash.** [`Hll::insert`] hashes user ids with XXH64, seed 0
//!   ([`hash_user_id`]), written out here so that it is identical across
//!   processes, machines and Rust versions. Any XXH64 implementation
//!   reproduces it. [`Hll::insert_hash`] takes a caller-supplied well-mixed
//!   64-bit hash instead.
//! * **Dense form.** `2^PRECISION` = 16384 one-byte registers. The top 14 hash
//!   bits choose the register; the register keeps the maximum *rank* (1 + the
//!   number of leading zeros of the remaining 50 bits, capped at 51).
//! * **Sparse form** (HLL++ style). A sorted `Vec<u32>` with one entry per
//!   occupied index at a finer precision of 25 bits: `entry = index25 << 6 |
//!   rank25`, where `rank25` (1..=40) is computed on the 39 bits after the
//!   index. Keeping 25 index bits makes small counts exact, and the dense
//!   register of every entry can still be derived exactly, so converting to
//!   dense gives bit-identical registers to having inserted densely all along.
//!   The sketch switches to dense when a new index would make the sparse form
//!   exceed 1024 entries (4 KiB, a quarter of the dense size).
//! * **Estimate.** Sparse: the number of entries, i.e. an exact count of
//!   distinct 25-bit hash prefixes. It undercounts only when two users share a
//!   prefix; the expected undercount is about `n^2 / 2^26`, below 0.02 at the
//!   1024-entry limit. Dense: Ertl's improved estimator ("New cardinality
//!   estimation algorithms for HyperLogLog sketches", 2017), which needs no
//!   empirical bias tables, stays accurate in the small range where classic
//!   HLL needs linear counting, and needs no large-range correction with a
//!   64-bit hash.
//! * **Serialization, format version 1** (all integers little-endian):
//!   `b"HL"`, version `1`, precision `14`, kind (`0` sparse, `1` dense), then
//!   for sparse a `u16` entry count followed by that many `u32` entries, or for
//!   dense 12288 bytes holding the 16384 registers packed 6 bits each (four
//!   registers per three bytes, first register in the low bits), and finally a
//!   `u32` checksum: the low 32 bits of XXH64 (seed 0) of all preceding bytes.
//!   Any input that [`Hll::from_bytes`] accepts is canonical: encoding the
//!   result gives back the same bytes.
//!
//! # What it must not do
//!
//! * Panic, whatever the input: [`Hll::from_bytes`] validates everything and
//!   returns [`HllError`] instead. No `unsafe`, no runtime dependencies.
//! * Use a process-seeded hasher (`DefaultHasher`, `RandomState`): sketches
//!   are persisted and merged across processes, so the hash must never change.
//! * Change the hash, the sparse precision, the register layout or the byte
//!   format without bumping the format version: old checkpoints would then
//!   decode or merge into silently wrong counts.
//! * Keep user ids: only bits of their hashes are stored.
//! * Do I/O or locking: callers own persistence and concurrency.

use std::fmt;

/// Index bits of the dense sketch: `2^14` = 16384 registers, standard error
/// about `1.04 / sqrt(16384)` ≈ 0.81%.
pub const PRECISION: u8 = 14;

/// Number of dense registers.
const REGISTERS: usize = 1 << PRECISION;

/// Hash bits left after the dense index; ranks run from 1 to `Q + 1`.
const Q: u32 = 64 - PRECISION as u32;

/// Largest dense rank: all 50 remaining bits zero.
const MAX_DENSE_RANK: u8 = Q as u8 + 1;

/// Index bits while sparse. Must exceed [`PRECISION`] (so the dense register
/// can be derived) and leave room for the rank in a `u32` entry.
const SPARSE_PRECISION: u32 = 25;

/// Bits of a sparse entry holding the rank (ranks are at most 40 < 64).
const RANK_BITS: u32 = 6;

/// Mask selecting the rank of a sparse entry.
const RANK_MASK: u32 = (1 << RANK_BITS) - 1;

/// Largest sparse rank: all 39 bits after the sparse index zero.
const MAX_SPARSE_RANK: u32 = 64 - SPARSE_PRECISION + 1;

/// Index bits that the sparse index has beyond the dense one.
const EXTRA_BITS: u32 = SPARSE_PRECISION - PRECISION as u32;

/// Most entries the sparse form may hold: a quarter of the dense size. Past
/// that the dense form is both smaller per user and faster to update.
const SPARSE_MAX_ENTRIES: usize = REGISTERS / 4 / size_of::<u32>();

/// Magic bytes opening every serialized sketch.
const MAGIC: [u8; 2] = *b"HL";

/// Current serialization format. Bump on any change to the hash, the
/// precisions, the entry encoding or the byte layout.
const FORMAT_VERSION: u8 = 1;

/// Kind byte of a sparse serialization.
const KIND_SPARSE: u8 = 0;

/// Kind byte of a dense serialization.
const KIND_DENSE: u8 = 1;

/// Magic, version, precision, kind.
const HEADER_LEN: usize = MAGIC.len() + 3;

/// Trailing checksum length.
const CHECKSUM_LEN: usize = 4;

/// Bytes of the 6-bit packed dense registers.
const PACKED_DENSE_LEN: usize = REGISTERS / 4 * 3;

/// `1 / (2 ln 2)`: the limit of the HLL bias constant for large `m`, which is
/// what Ertl's estimator uses.
const ALPHA_INF: f64 = 0.5 / std::f64::consts::LN_2;

// Compile-time checks of the layout facts the code relies on, so that
// changing a constant cannot silently corrupt entries.
const _: () = {
    assert!(MAX_SPARSE_RANK <= RANK_MASK);
    assert!(SPARSE_PRECISION + RANK_BITS <= 32);
    assert!(SPARSE_PRECISION > PRECISION as u32);
    assert!(SPARSE_MAX_ENTRIES <= u16::MAX as usize);
    assert!(MAX_DENSE_RANK < 64);
};

/// Mergeable HyperLogLog sketch of a set of users. See the module docs.
///
/// Equality compares the representation: a sparse and a dense sketch are
/// never equal, even if they would give the same estimate. Two sketches built
/// from the same set of hashes, in any order and through any mix of inserts
/// and merges, are equal.
#[derive(Clone, PartialEq, Eq)]
pub struct Hll {
    repr: Repr,
}

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    /// Sorted by index, one entry per index holding the maximum rank, at most
    /// [`SPARSE_MAX_ENTRIES`] entries.
    Sparse(Vec<u32>),
    /// Exactly [`REGISTERS`] registers, each at most [`MAX_DENSE_RANK`].
    Dense(Vec<u8>),
}

impl fmt::Debug for Hll {
    // Hand-written so that a failing assertion does not print 16384 registers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Sparse(e) => f
                .debug_struct("Hll")
                .field("repr", &"sparse")
                .field("entries", &e.len())
                .field("estimate", &self.estimate())
                .finish(),
            Repr::Dense(r) => f
                .debug_struct("Hll")
                .field("repr", &"dense")
                .field("nonzero_registers", &r.iter().filter(|&&x| x != 0).count())
                .field("estimate", &self.estimate())
                .finish(),
        }
    }
}

impl Default for Hll {
    fn default() -> Self {
        Self::new()
    }
}

impl Hll {
    /// Creates an empty sketch in the sparse form. Allocates nothing.
    pub fn new() -> Self {
        Hll {
            repr: Repr::Sparse(Vec::new()),
        }
    }

    /// Adds a user given a well-mixed 64-bit hash of its id. All 64 bits are
    /// used, so the hash must be uniform in its top bits; a raw counter or an
    /// unmixed id is not.
    pub fn insert_hash(&mut self, h: u64) {
        self.insert_entry(sparse_entry(h));
    }

    /// The compact per-user token of a hash: its sparse entry (`index25 << 6 | rank25`,
    /// never 0, below `2^31`). Callers that keep one or two users inline store this instead
    /// of a sketch and add it later with [`Hll::insert_entry`].
    pub fn entry_of_hash(h: u64) -> u32 {
        sparse_entry(h)
    }

    /// Adds a user given its entry ([`Hll::entry_of_hash`]); the same as
    /// [`Hll::insert_hash`] of the hash it came from (the dense register an entry stands
    /// for is derived exactly).
    pub fn insert_entry(&mut self, e: u32) {
        match &mut self.repr {
            Repr::Dense(regs) => {
                let (i, r) = sparse_entry_to_dense(e);
                set_max(regs, i, r);
            }
            Repr::Sparse(entries) => {
                match entries.binary_search_by_key(&(e >> RANK_BITS), |x| x >> RANK_BITS) {
                    Ok(pos) => {
                        // Same index: same entry layout, so the larger u32 is
                        // the larger rank.
                        if let Some(slot) = entries.get_mut(pos) {
                            *slot = (*slot).max(e);
                        }
                    }
                    Err(pos) if entries.len() < SPARSE_MAX_ENTRIES => entries.insert(pos, e),
                    Err(_) => {
                        let mut regs = sparse_to_dense(entries);
                        let (i, r) = sparse_entry_to_dense(e);
                        set_max(&mut regs, i, r);
                        self.repr = Repr::Dense(regs);
                    }
                }
            }
        }
    }

    /// Adds a user by id, hashed with [`hash_user_id`] (XXH64, seed 0).
    pub fn insert(&mut self, user_id: &[u8]) {
        self.insert_hash(hash_user_id(user_id));
    }

    /// Merges `other` into `self`, making `self` the sketch of the union.
    ///
    /// The result is equal (same representation, same registers) to a sketch
    /// fed both sets directly. Two sparse sketches stay sparse while the union
    /// fits in the sparse limit; otherwise the result is dense.
    pub fn merge(&mut self, other: &Hll) {
        match (&mut self.repr, &other.repr) {
            (Repr::Dense(a), Repr::Dense(b)) => {
                for (x, &y) in a.iter_mut().zip(b) {
                    *x = (*x).max(y);
                }
            }
            (Repr::Dense(a), Repr::Sparse(b)) => add_sparse_to_dense(a, b),
            (Repr::Sparse(a), Repr::Dense(b)) => {
                let mut regs = b.clone();
                add_sparse_to_dense(&mut regs, a);
                self.repr = Repr::Dense(regs);
            }
            (Repr::Sparse(a), Repr::Sparse(b)) => {
                let merged = merge_sparse(a, b);
                if merged.len() > SPARSE_MAX_ENTRIES {
                    self.repr = Repr::Dense(sparse_to_dense(&merged));
                } else {
                    *a = merged;
                }
            }
        }
    }

    /// Estimated number of distinct users.
    ///
    /// While sparse this is the exact number of distinct 25-bit hash prefixes,
    /// so it is exact unless two users collide on 25 bits (expected undercount
    /// about `n^2 / 2^26`, under 0.02 for any sparse sketch). Once dense it is
    /// Ertl's improved HyperLogLog estimate, with a standard error of about
    /// 0.81%.
    pub fn estimate(&self) -> u64 {
        match &self.repr {
            Repr::Sparse(e) => e.len() as u64,
            // `as` saturates and maps NaN to 0; the estimate is finite and
            // non-negative for every reachable register state anyway.
            Repr::Dense(regs) => dense_estimate(regs).round() as u64,
        }
    }

    /// Whether no user has been added.
    pub fn is_empty(&self) -> bool {
        match &self.repr {
            Repr::Sparse(e) => e.is_empty(),
            Repr::Dense(regs) => regs.iter().all(|&r| r == 0),
        }
    }

    /// The entries of a sparse sketch, sorted (None once dense).
    pub fn sparse_entries(&self) -> Option<&[u32]> {
        match &self.repr {
            Repr::Sparse(e) => Some(e),
            Repr::Dense(_) => None,
        }
    }

    /// Whether the sketch is still in the sparse form.
    pub fn is_sparse(&self) -> bool {
        matches!(self.repr, Repr::Sparse(_))
    }

    /// Approximate heap memory owned by the sketch, in bytes: the allocated
    /// capacity of its buffer (0 when empty, at most 4 KiB sparse, 16 KiB
    /// dense). Excludes `size_of::<Hll>()` itself and allocator overhead.
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Sparse(e) => e.capacity() * size_of::<u32>(),
            Repr::Dense(regs) => regs.capacity(),
        }
    }

    /// Serializes the sketch in the versioned format described in the module
    /// docs: `5 + 2 + 4 * entries + 4` bytes sparse, 12297 bytes dense.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.serialized_len());
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(PRECISION);
        match &self.repr {
            Repr::Sparse(entries) => {
                out.push(KIND_SPARSE);
                // The sparse limit (1024) fits in u16; saturating keeps this
                // panic-free should the invariant ever break.
                let count = u16::try_from(entries.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&count.to_le_bytes());
                for e in entries {
                    out.extend_from_slice(&e.to_le_bytes());
                }
            }
            Repr::Dense(regs) => {
                out.push(KIND_DENSE);
                for quad in regs.chunks_exact(4) {
                    let v = quad
                        .iter()
                        .rev()
                        .fold(0u32, |acc, &r| acc << 6 | u32::from(r & 0x3f));
                    out.extend_from_slice(&v.to_le_bytes()[..3]);
                }
            }
        }
        let checksum = checksum(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Decodes a sketch written by [`Hll::to_bytes`], validating the header,
    /// length, checksum and every entry or register. Never panics.
    pub fn from_bytes(b: &[u8]) -> Result<Hll, HllError> {
        if b.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(HllError::TooShort { len: b.len() });
        }
        let (header, _) = b.split_at(HEADER_LEN);
        let [m0, m1, version, precision, kind] = header else {
            return Err(HllError::TooShort { len: b.len() });
        };
        if [*m0, *m1] != MAGIC {
            return Err(HllError::BadMagic);
        }
        if *version != FORMAT_VERSION {
            return Err(HllError::UnsupportedVersion(*version));
        }
        if *precision != PRECISION {
            return Err(HllError::PrecisionMismatch(*precision));
        }
        let expected = match *kind {
            KIND_SPARSE => {
                let count = usize::from(
                    read_u16(b, HEADER_LEN).ok_or(HllError::TooShort { len: b.len() })?,
                );
                if count > SPARSE_MAX_ENTRIES {
                    return Err(HllError::SparseTooLarge { count });
                }
                HEADER_LEN + 2 + 4 * count + CHECKSUM_LEN
            }
            KIND_DENSE => HEADER_LEN + PACKED_DENSE_LEN + CHECKSUM_LEN,
            other => return Err(HllError::UnknownKind(other)),
        };
        if b.len() != expected {
            return Err(HllError::LengthMismatch {
                expected,
                actual: b.len(),
            });
        }
        let (body, tail) = b.split_at(b.len() - CHECKSUM_LEN);
        let stored = read_u32(tail, 0).ok_or(HllError::TooShort { len: b.len() })?;
        let computed = checksum(body);
        if stored != computed {
            return Err(HllError::ChecksumMismatch { stored, computed });
        }
        let payload = body.get(HEADER_LEN..).unwrap_or_default();
        let repr = if *kind == KIND_SPARSE {
            Repr::Sparse(decode_sparse(payload.get(2..).unwrap_or_default())?)
        } else {
            Repr::Dense(decode_dense(payload)?)
        };
        Ok(Hll { repr })
    }

    /// Length of [`Hll::to_bytes`]' output.
    fn serialized_len(&self) -> usize {
        let payload = match &self.repr {
            Repr::Sparse(e) => 2 + 4 * e.len(),
            Repr::Dense(_) => PACKED_DENSE_LEN,
        };
        HEADER_LEN + payload + CHECKSUM_LEN
    }
}

/// Why [`Hll::from_bytes`] rejected its input.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HllError {
    /// The input is too short to hold a header and a checksum.
    TooShort {
        /// Length of the input.
        len: usize,
    },
    /// The input does not start with the magic bytes `b"HL"`.
    BadMagic,
    /// The format version is not one this code reads.
    UnsupportedVersion(u8),
    /// The sketch was built with another precision than [`PRECISION`].
    PrecisionMismatch(u8),
    /// The representation kind byte is neither sparse nor dense.
    UnknownKind(u8),
    /// A sparse sketch claims more entries than the sparse limit allows.
    SparseTooLarge {
        /// Entry count found in the header.
        count: usize,
    },
    /// The input length does not match what the header implies.
    LengthMismatch {
        /// Length implied by the header.
        expected: usize,
        /// Length of the input.
        actual: usize,
    },
    /// The checksum does not match the content: corrupted or torn bytes.
    ChecksumMismatch {
        /// Checksum stored in the input.
        stored: u32,
        /// Checksum computed over the input.
        computed: u32,
    },
    /// A sparse entry has an index or rank out of range.
    InvalidSparseEntry {
        /// Position of the entry in the sparse list.
        position: usize,
        /// The raw entry.
        entry: u32,
    },
    /// Sparse entries are not strictly increasing by index.
    UnsortedSparse {
        /// Position of the first entry out of order.
        position: usize,
    },
    /// A dense register holds a rank larger than any hash can produce.
    InvalidRegister {
        /// Register index.
        index: usize,
        /// The stored value.
        value: u8,
    },
}

impl fmt::Display for HllError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HllError::TooShort { len } => write!(f, "hll: input too short ({len} bytes)"),
            HllError::BadMagic => write!(f, "hll: bad magic bytes"),
            HllError::UnsupportedVersion(v) => write!(f, "hll: unsupported format version {v}"),
            HllError::PrecisionMismatch(p) => {
                write!(f, "hll: precision {p}, expected {PRECISION}")
            }
            HllError::UnknownKind(k) => write!(f, "hll: unknown representation kind {k}"),
            HllError::SparseTooLarge { count } => write!(
                f,
                "hll: sparse entry count {count} exceeds limit {SPARSE_MAX_ENTRIES}"
            ),
            HllError::LengthMismatch { expected, actual } => {
                write!(f, "hll: length {actual}, expected {expected}")
            }
            HllError::ChecksumMismatch { stored, computed } => write!(
                f,
                "hll: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            HllError::InvalidSparseEntry { position, entry } => {
                write!(f, "hll: invalid sparse entry {entry:#010x} at {position}")
            }
            HllError::UnsortedSparse { position } => {
                write!(f, "hll: sparse entries not increasing at {position}")
            }
            HllError::InvalidRegister { index, value } => {
                write!(f, "hll: register {index} holds invalid rank {value}")
            }
        }
    }
}

impl std::error::Error for HllError {}

/// The stable 64-bit hash used by [`Hll::insert`]: XXH64 with seed 0.
///
/// Fixed forever for format version 1; any XXH64 implementation gives the
/// same value, e.g. `hash_user_id(b"abc") == 0x44bc_2cf5_ad77_0999`.
pub fn hash_user_id(user_id: &[u8]) -> u64 {
    xxh64(user_id, 0)
}

#[cfg(test)] // the reference the sparse -> dense derivation is tested against
/// Dense register index and rank of a hash.
fn dense_slot(h: u64) -> (usize, u8) {
    let index = (h >> Q) as usize;
    // The sentinel bit just below the index bits caps the rank at Q + 1
    // when all remaining bits are zero.
    let rank = ((h << PRECISION) | (1 << (PRECISION - 1))).leading_zeros() + 1;
    (index, rank as u8)
}

/// Sparse entry (`index25 << 6 | rank25`) of a hash.
fn sparse_entry(h: u64) -> u32 {
    let index = (h >> (64 - SPARSE_PRECISION)) as u32;
    let rank = ((h << SPARSE_PRECISION) | (1 << (SPARSE_PRECISION - 1))).leading_zeros() + 1;
    index << RANK_BITS | rank
}

/// Dense register index and rank that a sparse entry stands for. Exact: it
/// equals [`dense_slot`] of every hash that maps to the entry's index with
/// the entry's rank.
fn sparse_entry_to_dense(e: u32) -> (usize, u8) {
    let index25 = e >> RANK_BITS;
    let rank25 = e & RANK_MASK;
    let index = (index25 >> EXTRA_BITS) as usize;
    // The low EXTRA_BITS bits of the fine index are the first hash bits after
    // the dense index, so the dense rank is decided by them unless all are
    // zero, in which case it continues into the sparse rank.
    let extra = index25 & ((1 << EXTRA_BITS) - 1);
    let rank = if extra != 0 {
        (extra << (32 - EXTRA_BITS)).leading_zeros() + 1
    } else {
        EXTRA_BITS + rank25
    };
    (index, rank as u8)
}

/// Raises register `i` to at least `r`.
fn set_max(regs: &mut [u8], i: usize, r: u8) {
    if let Some(slot) = regs.get_mut(i) {
        *slot = (*slot).max(r);
    }
}

fn add_sparse_to_dense(regs: &mut [u8], entries: &[u32]) {
    for &e in entries {
        let (i, r) = sparse_entry_to_dense(e);
        set_max(regs, i, r);
    }
}

fn sparse_to_dense(entries: &[u32]) -> Vec<u8> {
    let mut regs = vec![0u8; REGISTERS];
    add_sparse_to_dense(&mut regs, entries);
    regs
}

/// Union of two sorted sparse lists, keeping the larger rank per index.
fn merge_sparse(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut ia, mut ib) = (a.iter().peekable(), b.iter().peekable());
    loop {
        let next = match (ia.peek(), ib.peek()) {
            (Some(&&x), Some(&&y)) => match (x >> RANK_BITS).cmp(&(y >> RANK_BITS)) {
                std::cmp::Ordering::Less => {
                    ia.next();
                    x
                }
                std::cmp::Ordering::Greater => {
                    ib.next();
                    y
                }
                std::cmp::Ordering::Equal => {
                    ia.next();
                    ib.next();
                    x.max(y)
                }
            },
            (Some(&&x), None) => {
                ia.next();
                x
            }
            (None, Some(&&y)) => {
                ib.next();
                y
            }
            (None, None) => break,
        };
        out.push(next);
    }
    out
}

/// Ertl (2017), "New cardinality estimation algorithms for HyperLogLog
/// sketches", algorithm 6, on the register histogram.
fn dense_estimate(regs: &[u8]) -> f64 {
    let q = Q as usize;
    let mut hist = [0u32; Q as usize + 2];
    for &r in regs {
        // `min` keeps this in bounds even if the register invariant broke.
        if let Some(c) = hist.get_mut(usize::from(r).min(q + 1)) {
            *c += 1;
        }
    }
    let count = |k: usize| f64::from(hist.get(k).copied().unwrap_or(0));
    let m = REGISTERS as f64;
    let mut z = m * tau(1.0 - count(q + 1) / m);
    for k in (1..=q).rev() {
        z = 0.5 * (z + count(k));
    }
    z += m * sigma(count(0) / m);
    // All registers zero: sigma(1) is infinite and the estimate is 0.
    ALPHA_INF * m * m / z
}

/// Ertl's sigma: `x + sum_{k>=1} x^(2^k) 2^(k-1)`, for `x` in [0, 1].
fn sigma(mut x: f64) -> f64 {
    if x >= 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    // Terminates: x^(2^k) underflows towards 0, so z stops changing.
    loop {
        x *= x;
        let prev = z;
        z += x * y;
        y += y;
        if z == prev {
            return z;
        }
    }
}

/// Ertl's tau: `(1 - x - sum_{k>=1} (1 - x^(2^-k))^2 2^-k) / 3`, for `x` in
/// [0, 1].
fn tau(mut x: f64) -> f64 {
    if x <= 0.0 || x >= 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    // Terminates: repeated square roots tend to 1 and y halves, so the
    // correction term vanishes.
    loop {
        x = x.sqrt();
        let prev = z;
        y *= 0.5;
        z -= (1.0 - x) * (1.0 - x) * y;
        if z == prev {
            return z / 3.0;
        }
    }
}

fn decode_sparse(data: &[u8]) -> Result<Vec<u32>, HllError> {
    let mut entries = Vec::with_capacity(data.len() / 4);
    let mut prev_index: Option<u32> = None;
    for (position, chunk) in data.chunks_exact(4).enumerate() {
        let entry = le_u32(chunk);
        let index = entry >> RANK_BITS;
        let rank = entry & RANK_MASK;
        if index >= 1 << SPARSE_PRECISION || rank == 0 || rank > MAX_SPARSE_RANK {
            return Err(HllError::InvalidSparseEntry { position, entry });
        }
        if prev_index.is_some_and(|p| index <= p) {
            return Err(HllError::UnsortedSparse { position });
        }
        prev_index = Some(index);
        entries.push(entry);
    }
    Ok(entries)
}

fn decode_dense(data: &[u8]) -> Result<Vec<u8>, HllError> {
    let mut regs = Vec::with_capacity(REGISTERS);
    for triple in data.chunks_exact(3) {
        let v = le_u32(triple);
        for k in 0..4 {
            let value = ((v >> (6 * k)) & 0x3f) as u8;
            if value > MAX_DENSE_RANK {
                return Err(HllError::InvalidRegister {
                    index: regs.len(),
                    value,
                });
            }
            regs.push(value);
        }
    }
    Ok(regs)
}

fn checksum(bytes: &[u8]) -> u32 {
    // Truncation intended: the low 32 bits are the checksum.
    xxh64(bytes, 0) as u32
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from(s[0]) | u16::from(s[1]) << 8)
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?).map(le_u32)
}

/// Little-endian value of up to the first 4 bytes of `b` (fewer bytes read as
/// if zero-padded). Written without slicing so it cannot panic.
fn le_u32(b: &[u8]) -> u32 {
    b.iter()
        .take(4)
        .rev()
        .fold(0, |acc, &x| acc << 8 | u32::from(x))
}

/// XXH64 from `xxhash-rust` (pure Rust, maintained). The hash is part of the sketches'
/// persisted state (checkpoints), so it must never change: the reference-vector test below
/// pins it.
fn xxh64(input: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(input, seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Standard error of the dense sketch.
    const STD_ERR: f64 = 1.04 / 128.0;

    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Hash number `i` of stream `seed`: distinct for distinct `i` within a
    /// stream, since splitmix64's output function is a bijection.
    fn nth_hash(seed: u64, i: u64) -> u64 {
        let mut s = seed
            .wrapping_mul(0xD1B5_4A32_D192_ED03)
            .wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        splitmix64(&mut s)
    }

    fn sketch(seed: u64, range: std::ops::Range<u64>) -> Hll {
        let mut h = Hll::new();
        for i in range {
            h.insert_hash(nth_hash(seed, i));
        }
        h
    }

    /// Checks the representation invariants that `from_bytes` relies on.
    fn assert_valid(h: &Hll) {
        match &h.repr {
            Repr::Sparse(e) => {
                assert!(e.len() <= SPARSE_MAX_ENTRIES);
                for w in e.windows(2) {
                    assert!(w[0] >> RANK_BITS < w[1] >> RANK_BITS);
                }
                for &x in e {
                    let r = x & RANK_MASK;
                    assert!((1..=MAX_SPARSE_RANK).contains(&r));
                    assert!(x >> RANK_BITS < 1 << SPARSE_PRECISION);
                }
            }
            Repr::Dense(r) => {
                assert_eq!(r.len(), REGISTERS);
                assert!(r.iter().all(|&x| x <= MAX_DENSE_RANK));
            }
        }
    }

    #[test]
    fn xxh64_matches_reference_vectors() {
        // Values from the reference implementation (python-xxhash).
        let cases: [(&[u8], u64); 4] = [
            (b"", 0xef46_db37_51d8_e999),
            (b"a", 0xd24e_c4f1_a98c_6e5b),
            (b"abc", 0x44bc_2cf5_ad77_0999),
            (b"user-12345", 0x6479_7fca_50bf_c10c),
        ];
        for (input, want) in cases {
            assert_eq!(hash_user_id(input), want, "{input:?}");
        }
        let bytes: Vec<u8> = (0..100).collect();
        let long: [(usize, u64); 4] = [
            (31, 0xc346_d2b5_9b4d_8ee1),
            (32, 0xcbf5_9c51_16ff_32b4),
            (33, 0x0c53_5d1a_cafb_8ead),
            (100, 0x6ac1_e580_3216_6597),
        ];
        for (len, want) in long {
            assert_eq!(hash_user_id(&bytes[..len]), want, "len {len}");
        }
    }

    #[test]
    fn constants_are_consistent() {
        assert_eq!(REGISTERS, 16384);
        assert_eq!(MAX_DENSE_RANK, 51);
        assert_eq!(MAX_SPARSE_RANK, 40);
        assert_eq!(SPARSE_MAX_ENTRIES, 1024);
        assert_eq!(HEADER_LEN, 5);
        assert_eq!(PACKED_DENSE_LEN, 12288);
    }

    #[test]
    fn small_counts_are_exact() {
        // Sparse estimates count distinct 25-bit prefixes; none of these ids
        // collide, so the counts are exact (documented bound: within 1).
        for n in [0u64, 1, 10, 100, 1000] {
            let mut h = Hll::new();
            for i in 0..n {
                h.insert(format!("user-{i}").as_bytes());
            }
            assert!(h.is_sparse());
            assert_eq!(h.estimate(), n, "n = {n}");
            assert_eq!(h.is_empty(), n == 0);
        }
        assert!(Hll::default().is_empty());
        assert_eq!(Hll::default(), Hll::new());
    }

    #[test]
    fn relative_error_within_three_standard_errors() {
        let checkpoints = [
            1_000u64, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 1_000_000,
        ];
        let mut worst = vec![0.0f64; checkpoints.len()];
        for seed in [1u64, 2, 3] {
            let mut h = Hll::new();
            let mut next = 0u64;
            for (c, &n) in checkpoints.iter().enumerate() {
                while next < n {
                    h.insert_hash(nth_hash(seed, next));
                    next += 1;
                }
                let est = h.estimate() as f64;
                let err = (est - n as f64) / n as f64;
                eprintln!("seed {seed} n {n:>9} estimate {est:>9} rel.err {err:+.4}");
                assert!(err.abs() < 3.0 * STD_ERR, "seed {seed} n {n} err {err}");
                worst[c] = worst[c].max(err.abs());
            }
        }
        eprintln!(
            "worst |rel.err| per n: {worst:.4?} (bound {:.4})",
            3.0 * STD_ERR
        );
    }

    #[test]
    fn string_ids_error_bound() {
        // Same bound through `insert` (XXH64) rather than a synthetic hash.
        for n in [10_000u64, 100_000] {
            let mut h = Hll::new();
            for i in 0..n {
                h.insert(format!("user-{i}").as_bytes());
            }
            let err = (h.estimate() as f64 - n as f64) / n as f64;
            eprintln!(
                "string ids n {n:>7} estimate {} rel.err {err:+.4}",
                h.estimate()
            );
            assert!(err.abs() < 3.0 * STD_ERR, "n {n} err {err}");
        }
    }

    #[test]
    fn duplicates_do_not_change_anything() {
        for n in [100u64, 5_000] {
            let mut h = sketch(7, 0..n);
            let before = h.clone();
            for _ in 0..3 {
                for i in 0..n {
                    h.insert_hash(nth_hash(7, i));
                }
            }
            assert_eq!(h, before);
            assert_eq!(h.estimate(), before.estimate());
        }
    }

    #[test]
    fn sparse_switches_to_dense_at_limit() {
        let mut h = Hll::new();
        let mut i = 0;
        while h.is_sparse() {
            h.insert_hash(nth_hash(9, i));
            i += 1;
        }
        // The entry that would have been number 1025 triggers the switch.
        let dense = h.clone();
        let mut sparse = Hll::new();
        for j in 0..i - 1 {
            sparse.insert_hash(nth_hash(9, j));
        }
        assert!(sparse.is_sparse());
        match &sparse.repr {
            Repr::Sparse(e) => assert_eq!(e.len(), SPARSE_MAX_ENTRIES),
            Repr::Dense(_) => unreachable!(),
        }
        // Registers after conversion equal those of direct dense insertion.
        let mut direct = vec![0u8; REGISTERS];
        for j in 0..i {
            let (k, r) = dense_slot(nth_hash(9, j));
            direct[k] = direct[k].max(r);
        }
        assert!(dense.repr == Repr::Dense(direct));
        let est = dense.estimate() as f64;
        assert!((est - i as f64).abs() / (i as f64) < 3.0 * STD_ERR);
    }

    #[test]
    fn rank_edge_cases() {
        assert_eq!(dense_slot(0), (0, MAX_DENSE_RANK));
        assert_eq!(dense_slot(u64::MAX), (REGISTERS - 1, 1));
        assert_eq!(sparse_entry(0) & RANK_MASK, MAX_SPARSE_RANK);
        for h in [0, 1, u64::MAX, 1 << 38, 1 << 39, 1 << 49, 1 << 50, 1 << 63] {
            assert_eq!(
                sparse_entry_to_dense(sparse_entry(h)),
                dense_slot(h),
                "{h:#x}"
            );
        }
    }

    /// Checks `merge(a, b) == union` plus commutativity and idempotence.
    fn check_merge(a: &Hll, b: &Hll, union: &Hll) {
        let mut ab = a.clone();
        ab.merge(b);
        let mut ba = b.clone();
        ba.merge(a);
        assert_eq!(&ab, union);
        assert_eq!(ab.estimate(), union.estimate());
        assert_eq!(ab, ba);
        let mut aa = a.clone();
        aa.merge(a);
        assert_eq!(&aa, a);
        let mut uu = ab.clone();
        uu.merge(b);
        assert_eq!(uu, ab);
        let mut with_empty = a.clone();
        with_empty.merge(&Hll::new());
        assert_eq!(&with_empty, a);
        assert_valid(&ab);
    }

    #[test]
    fn merge_equals_union_for_all_representation_pairs() {
        // (a range, b range) chosen to hit each representation pair.
        let cases = [
            (0..300, 200..500, true, true, true), // sparse+sparse -> sparse
            (0..800, 500..1_400, true, true, false), // sparse+sparse -> dense
            (0..500, 300..20_000, true, false, false), // sparse+dense
            (0..30_000, 10_000..50_000, false, false, false), // dense+dense
        ];
        for (ra, rb, a_sparse, b_sparse, u_sparse) in cases {
            let a = sketch(11, ra.clone());
            let b = sketch(11, rb.clone());
            let u = sketch(11, ra.start.min(rb.start)..ra.end.max(rb.end));
            assert_eq!(a.is_sparse(), a_sparse);
            assert_eq!(b.is_sparse(), b_sparse);
            assert_eq!(u.is_sparse(), u_sparse);
            check_merge(&a, &b, &u);
            check_merge(&b, &a, &u);
        }
    }

    #[test]
    fn heap_bytes_grows_from_sparse_to_dense() {
        let empty = Hll::new();
        let small = sketch(5, 0..10);
        let hundred = sketch(5, 0..100);
        let full_sparse = sketch(5, 0..1_000);
        let dense = sketch(5, 0..2_000);
        let sizes = [&empty, &small, &hundred, &full_sparse, &dense].map(Hll::heap_bytes);
        eprintln!("heap bytes at 0/10/100/1000/2000 users: {sizes:?}");
        assert_eq!(sizes[0], 0);
        assert!(sizes[1] <= 64);
        assert!(sizes[2] <= 512);
        assert!(sizes[3] <= 4096);
        assert!(full_sparse.is_sparse() && !dense.is_sparse());
        assert_eq!(sizes[4], 16 * 1024);
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn serialized_sizes() {
        assert_eq!(Hll::new().to_bytes().len(), 11);
        assert_eq!(sketch(1, 0..100).to_bytes().len(), 11 + 400);
        assert_eq!(sketch(1, 0..5_000).to_bytes().len(), 12_297);
    }

    /// Replaces the trailing checksum so that structural checks are reached.
    fn fix_checksum(b: &mut [u8]) {
        let n = b.len() - CHECKSUM_LEN;
        let c = checksum(&b[..n]);
        b[n..].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn from_bytes_reports_each_error() {
        let good = Hll::to_bytes(&sketch(3, 0..10));
        assert_eq!(Hll::from_bytes(&good), Ok(sketch(3, 0..10)));
        assert_eq!(Hll::from_bytes(&[]), Err(HllError::TooShort { len: 0 }));

        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Hll::from_bytes(&b), Err(HllError::BadMagic));
        let mut b = good.clone();
        b[2] = 2;
        assert_eq!(Hll::from_bytes(&b), Err(HllError::UnsupportedVersion(2)));
        let mut b = good.clone();
        b[3] = 12;
        assert_eq!(Hll::from_bytes(&b), Err(HllError::PrecisionMismatch(12)));
        let mut b = good.clone();
        b[4] = 7;
        assert_eq!(Hll::from_bytes(&b), Err(HllError::UnknownKind(7)));
        let mut b = good.clone();
        b[5..7].copy_from_slice(&2000u16.to_le_bytes());
        assert_eq!(
            Hll::from_bytes(&b),
            Err(HllError::SparseTooLarge { count: 2000 })
        );
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(
            Hll::from_bytes(&b),
            Err(HllError::LengthMismatch { .. })
        ));
        let mut b = good.clone();
        b[8] ^= 1;
        assert!(matches!(
            Hll::from_bytes(&b),
            Err(HllError::ChecksumMismatch { .. })
        ));

        // Sparse entry with rank 0.
        let mut b = good.clone();
        b[7] &= !0x3f;
        fix_checksum(&mut b);
        assert_eq!(
            Hll::from_bytes(&b),
            Err(HllError::InvalidSparseEntry {
                position: 0,
                entry: le_u32(&b[7..11])
            })
        );
        // Two entries swapped.
        let mut b = good.clone();
        let (first, second) = (b[7..11].to_vec(), b[11..15].to_vec());
        b[7..11].copy_from_slice(&second);
        b[11..15].copy_from_slice(&first);
        fix_checksum(&mut b);
        assert_eq!(
            Hll::from_bytes(&b),
            Err(HllError::UnsortedSparse { position: 1 })
        );

        // Dense register above 51.
        let mut b = Hll::to_bytes(&sketch(3, 0..5_000));
        b[5] |= 0x3f;
        fix_checksum(&mut b);
        assert_eq!(
            Hll::from_bytes(&b),
            Err(HllError::InvalidRegister {
                index: 0,
                value: 63
            })
        );

        for e in [
            HllError::TooShort { len: 1 },
            HllError::BadMagic,
            HllError::ChecksumMismatch {
                stored: 1,
                computed: 2,
            },
        ] {
            assert!(e.to_string().starts_with("hll: "));
            let _: &dyn std::error::Error = &e;
        }
    }

    #[test]
    fn extreme_dense_states_do_not_panic() {
        let full = Hll {
            repr: Repr::Dense(vec![MAX_DENSE_RANK; REGISTERS]),
        };
        let _ = full.estimate();
        let zero = Hll {
            repr: Repr::Dense(vec![0; REGISTERS]),
        };
        assert_eq!(zero.estimate(), 0);
        assert!(zero.is_empty());
        assert_eq!(Hll::from_bytes(&zero.to_bytes()), Ok(zero));
        assert_eq!(Hll::from_bytes(&full.to_bytes()), Ok(full));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn sparse_to_dense_is_exact(h in any::<u64>()) {
            prop_assert_eq!(sparse_entry_to_dense(sparse_entry(h)), dense_slot(h));
        }

        #[test]
        fn round_trip(ids in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 0..1_500)) {
            let mut h = Hll::new();
            for id in &ids {
                h.insert(id);
            }
            assert_valid(&h);
            let bytes = h.to_bytes();
            prop_assert_eq!(bytes.len(), h.serialized_len());
            let back = Hll::from_bytes(&bytes);
            prop_assert_eq!(back.as_ref(), Ok(&h));
            prop_assert_eq!(back.map(|b| b.estimate()), Ok(h.estimate()));
        }

        #[test]
        fn round_trip_dense(seed in any::<u64>(), n in 1_025u64..20_000) {
            let h = sketch(seed, 0..n);
            prop_assert_eq!(Hll::from_bytes(&h.to_bytes()), Ok(h));
        }

        #[test]
        fn merge_matches_union(seed in any::<u64>(), na in 0u64..3_000, nb in 0u64..3_000, overlap in 0u64..3_000) {
            let start_b = na.saturating_sub(overlap);
            let a = sketch(seed, 0..na);
            let b = sketch(seed, start_b..start_b + nb);
            let u = sketch(seed, 0..na.max(start_b + nb));
            check_merge(&a, &b, &u);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(h) = Hll::from_bytes(&bytes) {
                assert_valid(&h);
                prop_assert_eq!(h.to_bytes(), bytes);
            }
        }

        #[test]
        fn random_bytes_with_header_never_panic(kind in 0u8..3, count in 0u16..1_100, body in prop::collection::vec(any::<u8>(), 0..200)) {
            // A plausible header with a valid checksum, so that parsing gets
            // past the cheap checks into entry validation.
            let mut b = vec![b'H', b'L', FORMAT_VERSION, PRECISION, kind];
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(&body);
            b.extend_from_slice(&[0; CHECKSUM_LEN]);
            fix_checksum(&mut b);
            if let Ok(h) = Hll::from_bytes(&b) {
                assert_valid(&h);
                prop_assert_eq!(h.to_bytes(), b);
            }
        }

        #[test]
        fn truncated_or_corrupted_never_panic(
            seed in any::<u64>(),
            n in prop_oneof![0u64..1_200, 1_200u64..4_000],
            cut in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            recompute in any::<bool>(),
        ) {
            let good = sketch(seed, 0..n).to_bytes();
            let truncated = &good[..cut.index(good.len())];
            prop_assert!(Hll::from_bytes(truncated).is_err());

            let mut bad = good.clone();
            for (at, x) in &flips {
                let i = at.index(bad.len());
                bad[i] ^= x;
            }
            if recompute {
                fix_checksum(&mut bad);
            }
            match Hll::from_bytes(&bad) {
                Ok(h) => {
                    assert_valid(&h);
                    prop_assert_eq!(h.to_bytes(), bad);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
