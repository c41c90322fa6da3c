//! Record framing for spool segments: how one record is laid out on disk and
//! how a header read back from disk is parsed and checked.
//!
//! Layout: `len: u32 LE | crc32(seq LE ++ synced LE ++ payload): u32 LE | seq: u64 LE |
//! synced: u64 LE | payload`.
//!
//! `synced` is the spool's durable seq when the record was appended: every
//! record up to it had been fsynced before this one was written. Recovery
//! uses it to tell damage from a torn tail: a record that a later record
//! vouches for was synced (and acknowledged to clients), so if it fails its
//! checksum it is corruption to report, never an unsynced tail to trim.
//!
//! This module only deals in bytes. It must not open files, know about
//! segments, or decide what happens to a bad record: callers truncate during
//! recovery or report corruption during reads.

/// Bytes before the payload: len (4) + crc (4) + seq (8) + synced (8).
pub(crate) const HEADER_LEN: usize = 24;

/// Largest payload accepted. Well below `u32::MAX` so `len` always fits, and
/// small enough that a garbage `len` in a torn header cannot make recovery
/// allocate gigabytes.
pub(crate) const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// CRC over seq, synced watermark and payload. The seq is inside the CRC so
/// that a record that is intact but sits at the wrong place (stale bytes, a
/// misplaced copy) is still rejected.
pub(crate) fn checksum(seq: u64, synced: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&synced.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Serialises one record into `buf` (cleared first) so the caller can hand
/// the whole record to the OS in one write. `len` is the payload length the
/// caller already checked against [`MAX_PAYLOAD`]; `synced` the spool's
/// durable seq at the time of the append.
pub(crate) fn encode(buf: &mut Vec<u8>, seq: u64, synced: u64, len: u32, payload: &[u8]) {
    buf.clear();
    buf.reserve(HEADER_LEN + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(seq, synced, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&synced.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// A parsed record header; not yet validated against anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Payload length in bytes.
    pub(crate) len: u32,
    /// Stored CRC of seq ++ payload.
    pub(crate) crc: u32,
    /// Record sequence number.
    pub(crate) seq: u64,
    /// Durable seq of the spool when this record was appended.
    pub(crate) synced: u64,
}

impl Header {
    /// Decodes the fixed-size header; any bit pattern decodes, validation is
    /// the caller's job.
    pub(crate) fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            crc: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            seq: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            synced: u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
        }
    }

    /// Payload length as usize, or `None` if it exceeds [`MAX_PAYLOAD`]
    /// (which can only mean a torn or corrupt header).
    pub(crate) fn payload_len(&self) -> Option<usize> {
        let len = usize::try_from(self.len).ok()?;
        (len <= MAX_PAYLOAD).then_some(len)
    }

    /// Total on-disk size of the record this header starts.
    pub(crate) fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.len)
    }

    /// Whether `payload` is the one this header was written for.
    pub(crate) fn matches(&self, payload: &[u8]) -> bool {
        checksum(self.seq, self.synced, payload) == self.crc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_parse_round_trips() {
        let mut buf = Vec::new();
        encode(&mut buf, 42, 40, 3, b"abc");
        assert_eq!(buf.len(), HEADER_LEN + 3);
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&buf[..HEADER_LEN]);
        let header = Header::parse(&h);
        assert_eq!(header.seq, 42);
        assert_eq!(header.synced, 40);
        assert_eq!(header.payload_len(), Some(3));
        assert!(header.matches(b"abc"));
        assert!(!header.matches(b"abd"));
        // Same payload under another seq or watermark must not verify.
        assert_ne!(checksum(43, 40, b"abc"), header.crc);
        assert_ne!(checksum(42, 41, b"abc"), header.crc);
    }

    #[test]
    fn all_zero_header_never_verifies() {
        // A torn write often leaves zero-filled space; it must not parse as
        // a valid empty record.
        let header = Header::parse(&[0u8; HEADER_LEN]);
        assert!(!header.matches(&[]));
    }
}
