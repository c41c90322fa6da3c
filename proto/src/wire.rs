//! A small borrowed protobuf reader and writer for the hot paths that must not allocate
//! per message (the collector's `ClickBatch` decoding and `IngestClick` encoding, token
//! verification). Strings and bytes are slices of the input; nothing is copied.
//!
//! The reader accepts a subset of what prost accepts (groups, deprecated since proto3, are
//! refused) and every caller tests that what it accepts reads to prost's values. Bad input
//! is an error, never a panic. It knows no message types: callers match field numbers.

/// Wire type of varints (int32/64, uint32/64, bool, enum).
pub const VARINT: u8 = 0;
/// Wire type of 64-bit fixed fields.
pub const I64: u8 = 1;
/// Wire type of length-delimited fields (string, bytes, messages, packed).
pub const LEN: u8 = 2;
/// Wire type of 32-bit fixed fields.
pub const I32: u8 = 5;

/// Why bytes could not be read. Static text: building it never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub &'static str);

/// A cursor over protobuf bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A base-128 varint (at most 10 bytes, at most 64 bits, as prost).
    #[inline(always)]
    pub fn varint(&mut self) -> Result<u64, WireError> {
        // One-byte fast path, inlined: most keys, lengths and small values.
        if let Some((&b, rest)) = self.0.split_first()
            && b < 0x80
        {
            self.0 = rest;
            return Ok(u64::from(b));
        }
        // Returned in two registers, not through memory as a `Result` is.
        let (v, len) = varint_word(self.0);
        if let Some(rest) = self.0.get(len..)
            && len > 0
        {
            self.0 = rest;
            return Ok(v);
        }
        self.varint_bytewise()
    }

    /// [`Reader::varint`] a byte at a time: varints of 9 or 10 bytes, and errors.
    #[cold]
    fn varint_bytewise(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some((&b, rest)) = self.0.split_first() else {
                return Err(WireError("truncated varint"));
            };
            self.0 = rest;
            if i == 9 && b > 1 {
                return Err(WireError("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7F) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(WireError("varint longer than 10 bytes"))
    }

    /// The next (field number, wire type), or None at the end.
    #[inline]
    pub fn key(&mut self) -> Result<Option<(u32, u8)>, WireError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let k = self.varint()?;
        // As prost: a key is a u32 (field number < 2^29, then the wire type).
        let k = u32::try_from(k).map_err(|_| WireError("field key out of range"))?;
        let field = k >> 3;
        if field == 0 {
            return Err(WireError("field number 0"));
        }
        Ok(Some((field, (k & 7) as u8)))
    }

    /// The next `n` bytes.
    #[inline]
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.0.len() {
            return Err(WireError("truncated field"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// A length-delimited field's bytes.
    #[inline]
    pub fn len_delimited(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| WireError("length out of range"))?)
    }

    /// A string field (UTF-8 checked, as prost).
    #[inline]
    pub fn str(&mut self) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.len_delimited()?).map_err(|_| WireError("string is not UTF-8"))
    }

    /// Skips a field's value of wire type `wire`.
    pub fn skip(&mut self, wire: u8) -> Result<(), WireError> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.len_delimited().map(drop),
            I32 => self.take(4).map(drop),
            _ => Err(WireError("unsupported wire type")),
        }
    }
}

/// The varint `bytes` start with if it takes 8 bytes or fewer (56 bits: ids, millisecond
/// timestamps), and its length; `(0, 0)` otherwise (longer, truncated: the byte loop
/// decides). One word read, no branch per byte: the first byte without its high bit ends
/// the varint, and the 7-bit groups below it are packed together in three steps. Within 8
/// bytes of the end the word is zero-padded, and a stop found in the padding is no varint.
fn varint_word(bytes: &[u8]) -> (u64, usize) {
    let w = match bytes.first_chunk::<8>() {
        Some(w) => u64::from_le_bytes(*w),
        None => {
            let mut buf = [0u8; 8];
            buf[..bytes.len()].copy_from_slice(bytes);
            u64::from_le_bytes(buf)
        }
    };
    let stops = !w & 0x8080_8080_8080_8080;
    let len = (stops.trailing_zeros() / 8 + 1) as usize;
    if stops == 0 || len > bytes.len() {
        return (0, 0);
    }
    let x = (w & (u64::MAX >> (64 - 8 * len))) & 0x7F7F_7F7F_7F7F_7F7F;
    let x = ((x & 0x7F00_7F00_7F00_7F00) >> 1) | (x & 0x007F_007F_007F_007F);
    let x = ((x & 0x3FFF_0000_3FFF_0000) >> 2) | (x & 0x0000_3FFF_0000_3FFF);
    let x = ((x & 0x0FFF_FFFF_0000_0000) >> 4) | (x & 0x0000_0000_0FFF_FFFF);
    (x, len)
}

/// Bytes of `v` as a varint.
#[inline]
pub fn varint_len(v: u64) -> usize {
    // 1 + floor(bits / 7), with 0 taking one byte (as prost's `encoded_len_varint`).
    (((64 - (v | 1).leading_zeros()) * 9 + 64) / 64) as usize
}

/// Appends `v` as a varint.
#[inline]
pub fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Appends a field key.
#[inline]
pub fn put_key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Varints round-trip and agree with prost's encoding and length.
        #[test]
        fn varints_agree_with_prost(v in any::<u64>(), small in 0u64..300) {
            for v in [v, small, v >> 40, v >> 20] {
                let mut ours = Vec::new();
                put_varint(&mut ours, v);
                let mut theirs = Vec::new();
                prost::encoding::encode_varint(v, &mut theirs);
                prop_assert_eq!(&ours, &theirs);
                prop_assert_eq!(varint_len(v), prost::encoding::encoded_len_varint(v));
                let mut r = Reader(&ours);
                prop_assert_eq!(r.varint(), Ok(v));
                prop_assert!(r.is_empty());
                // Followed by more bytes (as inside a message): it stops at its own end.
                let mut padded = ours.clone();
                padded.extend_from_slice(&[0xFF; 12]);
                let mut r = Reader(&padded);
                prop_assert_eq!(r.varint(), Ok(v));
                prop_assert_eq!(r.0.len(), 12);
            }
        }

        /// Every varint length (1 to 10 bytes, canonical or with redundant zero groups)
        /// at every distance from the end of the input, and every truncation of it, reads
        /// as prost reads it: the word-at-a-time path, its zero-padded form near the end,
        /// and the byte loop agree.
        #[test]
        fn varints_of_every_length_near_the_end(v in any::<u64>(), tail in any::<[u8; 9]>()) {
            for bits in [0u32, 7, 14, 21, 28, 35, 42, 49, 56, 63] {
                let v = v >> bits;
                let mut enc = Vec::new();
                prost::encoding::encode_varint(v, &mut enc);
                let mut redundant = enc.clone();
                if redundant.len() < 10 {
                    // The last byte gets a continuation bit and a zero group follows.
                    if let Some(b) = redundant.last_mut() {
                        *b |= 0x80;
                    }
                    redundant.push(0);
                }
                for enc in [&enc, &redundant] {
                    for t in 0..=tail.len() {
                        for cut in 0..=enc.len() {
                            let mut b = enc[..cut].to_vec();
                            if cut == enc.len() {
                                b.extend_from_slice(&tail[..t]);
                            }
                            let mut r = Reader(&b);
                            let ours = r.varint();
                            let mut s = &b[..];
                            let theirs = prost::encoding::decode_varint(&mut s);
                            prop_assert_eq!(ours.as_ref().ok(), theirs.as_ref().ok(), "{:x?}", b);
                            if ours.is_ok() {
                                prop_assert_eq!(r.0.len(), s.len());
                            }
                        }
                    }
                }
            }
        }

        /// Arbitrary bytes never panic, and a varint is read as prost reads it (or refused
        /// as it refuses it), near the end of the bytes or not.
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..24)) {
            let mut r = Reader(&b);
            let mut once = r.clone();
            let ours = once.varint();
            let mut s = &b[..];
            let theirs = prost::encoding::decode_varint(&mut s);
            // Same values, same bytes consumed, same refusals.
            prop_assert_eq!(ours.as_ref().ok(), theirs.as_ref().ok());
            if ours.is_ok() {
                prop_assert_eq!(once.0.len(), s.len());
            }
            while let Ok(Some((_, w))) = r.key() {
                if r.skip(w).is_err() {
                    break;
                }
            }
        }
    }
}
