//! Spool record bytes -> per-destination `IngestBatch` bytes, without decoding a click.
//!
//! A spool record's payload is what the ingest path encoded: `IngestBatch.clicks` entries
//! (field 3) concatenated, possibly with file-source markers (field 100) among them. The
//! forwarder used to decode every click into an `IngestClick`, route it, and re-encode
//! the batch (with one more clone per attempt). Here the payload is walked instead: each
//! click entry is copied as is (tag, length and body) into its destination's buffer, and
//! only `ad_id` and `salt` are read from it for routing. With one destination and no
//! markers the payload is forwarded byte for byte. Protobuf fields may come in any order
//! and a message is the concatenation of its fields, so `header + clicks + floor` is the
//! same message prost would encode (byte for byte, tested).
//!
//! It must not decide routing itself (the sink's `route` does) or check the clicks'
//! content: the spool's CRC already vouches for bytes this collector wrote, and the
//! aggregator checks every click at its edge.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint, skip_field};

/// `IngestBatch.clicks`.
const CLICKS_FIELD: u32 = 3;
/// `IngestClick.ad_id`.
const AD_ID_FIELD: u32 = 2;
/// `IngestClick.salt`.
const SALT_FIELD: u32 = 19;

/// A spool record that is not a sequence of well-formed protobuf fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spool record is not an encoded IngestBatch: {0}")]
pub struct SplitError(String);

/// One destination's share of a record: its click entries, encoded, and how many.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Share<'a> {
    /// `IngestBatch.clicks` entries (tag, length, body), concatenated.
    pub clicks: Cow<'a, [u8]>,
    /// Clicks in `clicks`.
    pub count: u64,
}

/// Splits `payload` over `dests` destinations, `route(ad_id, salt)` naming each click's
/// (clamped into range). With one destination and nothing but click entries in the
/// payload, the share borrows the payload.
pub fn split<'a>(
    payload: &'a [u8],
    dests: usize,
    route: impl Fn(u64, u32) -> usize,
) -> Result<Vec<Share<'a>>, SplitError> {
    let dests = dests.max(1);
    if dests == 1 {
        // The common case: one pass to count (and check the framing); a record of nothing
        // but clicks is forwarded as it was written, without a copy.
        let mut count = 0;
        let only_clicks = walk(payload, |_| {
            count += 1;
            Ok(())
        })?;
        if only_clicks {
            return Ok(vec![Share {
                clicks: Cow::Borrowed(payload),
                count,
            }]);
        }
    }
    let mut out: Vec<Share<'a>> = vec![Share::default(); dests];
    let mut owned: Vec<Vec<u8>> = vec![Vec::new(); dests];
    walk(payload, |entry| {
        let d = if dests == 1 {
            0
        } else {
            let (ad, salt) = route_key(entry.body)?;
            route(ad, salt).min(dests - 1)
        };
        out[d].count += 1;
        owned[d].extend_from_slice(entry.whole);
        Ok(())
    })?;
    for (share, bytes) in out.iter_mut().zip(owned) {
        share.clicks = Cow::Owned(bytes);
    }
    Ok(out)
}

/// One click entry of a payload.
struct Entry<'a> {
    /// Tag, length and body.
    whole: &'a [u8],
    /// The encoded `IngestClick`.
    body: &'a [u8],
}

/// Calls `each` for every click entry of `payload`, skipping other fields; true when
/// there were no other fields.
fn walk<'a>(
    payload: &'a [u8],
    mut each: impl FnMut(Entry<'a>) -> Result<(), SplitError>,
) -> Result<bool, SplitError> {
    let mut only_clicks = true;
    let mut rest = payload;
    while !rest.is_empty() {
        let start = payload.len() - rest.len();
        let (field, wire) = decode_key(&mut rest).map_err(|e| SplitError(e.to_string()))?;
        if field == CLICKS_FIELD && wire == WireType::LengthDelimited {
            let len = decode_varint(&mut rest).map_err(|e| SplitError(e.to_string()))?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > rest.len() {
                return Err(SplitError(format!(
                    "click entry of {len} bytes, {} left",
                    rest.len()
                )));
            }
            let (body, tail) = rest.split_at(len);
            rest = tail;
            let whole = &payload[start..payload.len() - rest.len()];
            each(Entry { whole, body })?;
        } else {
            only_clicks = false;
            skip_field(wire, field, &mut rest, Default::default())
                .map_err(|e| SplitError(e.to_string()))?;
        }
    }
    Ok(only_clicks)
}

/// `ad_id` and `salt` of one encoded `IngestClick` (0 when absent, as prost reads them;
/// the last occurrence wins, as in prost).
fn route_key(mut body: &[u8]) -> Result<(u64, u32), SplitError> {
    let (mut ad, mut salt) = (0u64, 0u32);
    while !body.is_empty() {
        let (field, wire) = decode_key(&mut body).map_err(|e| SplitError(e.to_string()))?;
        match (field, wire) {
            (AD_ID_FIELD, WireType::Varint) => {
                ad = decode_varint(&mut body).map_err(|e| SplitError(e.to_string()))?;
            }
            (SALT_FIELD, WireType::Varint) => {
                // prost truncates a uint32 varint the same way.
                salt = decode_varint(&mut body).map_err(|e| SplitError(e.to_string()))? as u32;
            }
            _ => skip_field(wire, field, &mut body, Default::default())
                .map_err(|e| SplitError(e.to_string()))?,
        }
    }
    Ok((ad, salt))
}

/// One destination's batch, encoded as an `IngestBatch`.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// `IngestBatch.collector_id`.
    pub collector_id: String,
    /// `IngestBatch.seq`.
    pub seq: u64,
    /// Clicks in it.
    pub clicks: u64,
    /// The whole encoded message (cheap to clone per attempt).
    pub bytes: Bytes,
}

impl EncodedBatch {
    /// `collector_id`, `seq`, the click entries and `acked_floor`, in prost's field order
    /// (so the bytes equal prost's encoding of the same message).
    pub fn new(collector_id: &str, seq: u64, acked_floor: u64, share: &Share<'_>) -> Self {
        let mut b = BytesMut::with_capacity(share.clicks.len() + collector_id.len() + 32);
        if !collector_id.is_empty() {
            encode_key(1, WireType::LengthDelimited, &mut b);
            encode_varint(collector_id.len() as u64, &mut b);
            b.put_slice(collector_id.as_bytes());
        }
        if seq != 0 {
            encode_key(2, WireType::Varint, &mut b);
            encode_varint(seq, &mut b);
        }
        b.put_slice(&share.clicks);
        if acked_floor != 0 {
            encode_key(4, WireType::Varint, &mut b);
            encode_varint(acked_floor, &mut b);
        }
        EncodedBatch {
            collector_id: collector_id.to_string(),
            seq,
            clicks: share.count,
            bytes: b.freeze(),
        }
    }

    /// A batch from a decoded message (tests, tools).
    pub fn from_batch(batch: &adclick_proto::v1::IngestBatch) -> Self {
        use prost::Message;
        EncodedBatch {
            collector_id: batch.collector_id.clone(),
            seq: batch.seq,
            clicks: batch.clicks.len() as u64,
            bytes: Bytes::from(batch.encode_to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adclick_proto::v1::{IngestBatch, IngestClick};
    use proptest::prelude::*;
    use prost::Message;

    fn click(i: u64, ad: u64, salt: u32) -> IngestClick {
        IngestClick {
            impression_id: i.to_le_bytes().to_vec(),
            ad_id: ad,
            salt,
            country: "US".into(),
            user_id: format!("user-{i}"),
            event_time_ms: 1_700_000_000_000 + i as i64,
            ..Default::default()
        }
    }

    /// What the ingest path writes: the clicks field of an `IngestBatch`, alone.
    fn payload(clicks: &[IngestClick]) -> Vec<u8> {
        IngestBatch {
            clicks: clicks.to_vec(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn route(ad: u64, salt: u32, dests: usize) -> usize {
        ((ad ^ (u64::from(salt) * 31)) % dests as u64) as usize
    }

    proptest! {
        /// Against prost: decoding, routing each click and re-encoding (what the forwarder
        /// did before) gives exactly the bytes of the split, for every destination.
        #[test]
        fn split_and_encode_equal_decode_route_reencode(
            ads in proptest::collection::vec((0u64..50, 0u32..4), 0..60),
            dests in 1usize..5,
            seq in 1u64..1_000_000,
            floor in 0u64..1_000_000,
            marker in any::<bool>(),
        ) {
            let clicks: Vec<_> = ads.iter().enumerate().map(|(i, (a, s))| click(i as u64, *a, *s)).collect();
            let mut bytes = payload(&clicks);
            if marker {
                // A file-source marker (field 100) in the middle is not a click.
                let mut m = Vec::new();
                encode_key(100, WireType::LengthDelimited, &mut m);
                encode_varint(3, &mut m);
                m.extend_from_slice(b"abc");
                let mid = payload(&clicks[..clicks.len() / 2]).len();
                bytes.splice(mid..mid, m);
            }
            let shares = split(&bytes, dests, |a, s| route(a, s, dests)).unwrap();
            prop_assert_eq!(shares.len(), dests);
            let decoded = IngestBatch::decode(bytes.as_slice()).unwrap();
            for (d, share) in shares.iter().enumerate() {
                let mine: Vec<_> = decoded.clicks.iter().filter(|c| route(c.ad_id, c.salt, dests) == d).cloned().collect();
                let expected = IngestBatch { collector_id: "col-1".into(), seq, clicks: mine.clone(), acked_floor: floor };
                let got = EncodedBatch::new("col-1", seq, floor, share);
                prop_assert_eq!(got.clicks, mine.len() as u64);
                prop_assert_eq!(got.bytes.to_vec(), expected.encode_to_vec());
            }
            if dests == 1 && !marker {
                prop_assert!(matches!(shares[0].clicks, std::borrow::Cow::Borrowed(_)));
            }
        }
    }

    #[test]
    fn damaged_records_are_an_error_not_a_panic() {
        let bytes = payload(&[click(1, 2, 0), click(2, 3, 0)]);
        for cut in 1..bytes.len() {
            // Every proper prefix that ends inside an entry is refused.
            let r = split(&bytes[..cut], 2, |a, _| a as usize);
            let first = payload(&[click(1, 2, 0)]).len();
            if cut != first {
                assert!(r.is_err(), "prefix of {cut} bytes");
            }
        }
        assert!(split(&[0x1A, 0xFF], 1, |_, _| 0).is_err());
    }
}
