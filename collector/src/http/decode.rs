//! Bounded decoding of `ClickBatch` bodies (protobuf over HTTP, beacons and QUIC): the
//! click count is checked on the wire bytes before any click is materialised, so a 1 MiB
//! body of empty clicks costs a scan, not a million allocations. The JSON form has its own
//! bound in [`super::json`].
//!
//! Pure functions over byte slices; no I/O, no metrics.

use adclick_proto::v1;
use bytes::Buf;
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, skip_field};

/// Field number of `ClickBatch.clicks`.
const CLICKS_FIELD: u32 = 4;

/// Why a body is not a usable `ClickBatch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchDecodeError {
    /// More clicks than allowed (413); nothing was decoded.
    #[error(
        "batch has more than the {max} clicks allowed (limits.max_clicks_per_batch); found at least {found}"
    )]
    TooManyClicks {
        /// The limit.
        max: usize,
        /// Clicks counted before the scan stopped.
        found: usize,
    },
    /// Not a protobuf `ClickBatch` (400).
    #[error("body is not a protobuf ClickBatch: {0}")]
    Malformed(String),
}

/// Counts `ClickBatch.clicks` entries in `body` without decoding them, stopping as soon
/// as the count exceeds `max`.
pub fn count_clicks(body: &[u8], max: usize) -> Result<usize, BatchDecodeError> {
    let mut buf = body;
    let mut n = 0usize;
    while buf.has_remaining() {
        let (tag, wire) =
            decode_key(&mut buf).map_err(|e| BatchDecodeError::Malformed(e.to_string()))?;
        if tag == CLICKS_FIELD && wire == WireType::LengthDelimited {
            n += 1;
            if n > max {
                return Err(BatchDecodeError::TooManyClicks { max, found: n });
            }
        }
        skip_field(wire, tag, &mut buf, DecodeContext::default())
            .map_err(|e| BatchDecodeError::Malformed(e.to_string()))?;
    }
    Ok(n)
}

/// Decodes a protobuf `ClickBatch` of at most `max_clicks` clicks.
pub fn decode_batch(body: &[u8], max_clicks: usize) -> Result<v1::ClickBatch, BatchDecodeError> {
    count_clicks(body, max_clicks)?;
    v1::ClickBatch::decode(body).map_err(|e| BatchDecodeError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(n: usize) -> Vec<u8> {
        v1::ClickBatch {
            sdk_name: "t".into(),
            sent_at_ms: 5,
            clicks: vec![v1::Click::default(); n],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_before_decoding() {
        assert_eq!(count_clicks(&batch(7), 10), Ok(7));
        assert_eq!(decode_batch(&batch(10), 10).unwrap().clicks.len(), 10);
        // 1 MiB of empty clicks (2 bytes each): refused after max + 1 keys.
        let flood = [0x22u8, 0x00].repeat(1 << 19);
        assert_eq!(
            decode_batch(&flood, 1000),
            Err(BatchDecodeError::TooManyClicks {
                max: 1000,
                found: 1001
            })
        );
        assert!(matches!(
            decode_batch(&[0x22, 0x05, 0x00], 10),
            Err(BatchDecodeError::Malformed(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic, and whatever decodes holds at most `max` clicks
        /// and no more string bytes than the body had.
        #[test]
        fn arbitrary_bytes_are_bounded(body in proptest::collection::vec(any::<u8>(), 0..2048), max in 0usize..20) {
            if let Ok(b) = decode_batch(&body, max) {
                prop_assert!(b.clicks.len() <= max);
                let strings: usize = b.clicks.iter().map(|c| c.token.len() + c.os.len() + c.site.len()
                    + c.app.len() + c.user_id.len() + c.country.len()).sum::<usize>()
                    + b.sdk_name.len() + b.sdk_version.len();
                prop_assert!(strings <= body.len());
            }
        }

        /// Mutations of a valid batch (flipped, cut or repeated bytes) never panic and
        /// never get past the click limit; the count agrees with the full decode.
        #[test]
        fn mutated_batches_are_bounded(
            n in 0usize..30,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
            repeat in 1usize..4,
        ) {
            let mut body = batch(n).repeat(repeat);
            if !body.is_empty() {
                for (i, b) in &flips {
                    let i = i.index(body.len());
                    body[i] ^= *b;
                }
                body.truncate(cut.index(body.len() + 1));
            }
            let max = 40;
            match decode_batch(&body, max) {
                Ok(b) => {
                    prop_assert!(b.clicks.len() <= max);
                    prop_assert_eq!(count_clicks(&body, usize::MAX).ok(), Some(b.clicks.len()));
                }
                Err(BatchDecodeError::TooManyClicks { found, .. }) => prop_assert_eq!(found, max + 1),
                Err(BatchDecodeError::Malformed(_)) => {}
            }
        }
    }
}
