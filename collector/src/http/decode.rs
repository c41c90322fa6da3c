//! Bounded decoding of `ClickBatch` bodies (protobuf over HTTP, beacons and QUIC): the
//! click count is checked on the wire bytes before any click is read, so a 1 MiB body of
//! empty clicks costs a scan, not a million allocations. The JSON form has its own bound
//! in [`super::json`].
//!
//! Clicks are read borrowed from the body ([`ClickRef`]: no allocation per click) by a
//! small reader that takes a subset of what prost takes and reads it to prost's values
//! (tested below). A body it does not take goes through prost, so what is accepted and
//! the error text of what is refused are exactly prost's.
//!
//! Pure functions over byte slices; no I/O, no metrics.

use std::borrow::Cow;

use adclick_proto::v1;
use adclick_proto::wire::{LEN, Reader, VARINT, WireError};
use bytes::Buf;
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, skip_field};

use crate::ingest::ClickRef;

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

/// A decoded batch: its clicks borrowed from the body, or (a body only prost reads, or
/// the JSON form) owned.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// Read in place.
    Borrowed(Vec<ClickRef<'a>>),
    /// Decoded into `v1` messages.
    Owned(v1::ClickBatch),
}

impl Decoded<'_> {
    /// The clicks, in order.
    pub fn clicks(&self) -> Cow<'_, [ClickRef<'_>]> {
        match self {
            Decoded::Borrowed(c) => Cow::Borrowed(c.as_slice()),
            Decoded::Owned(b) => Cow::Owned(b.clicks.iter().map(ClickRef::from).collect()),
        }
    }

    /// How many clicks.
    pub fn len(&self) -> usize {
        match self {
            Decoded::Borrowed(c) => c.len(),
            Decoded::Owned(b) => b.clicks.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decodes a protobuf `ClickBatch` of at most `max_clicks` clicks.
pub fn decode_batch(body: &[u8], max_clicks: usize) -> Result<Decoded<'_>, BatchDecodeError> {
    let n = count_clicks(body, max_clicks)?;
    match read_batch(body, n) {
        Ok(clicks) => Ok(Decoded::Borrowed(clicks)),
        Err(_) => v1::ClickBatch::decode(body)
            .map(Decoded::Owned)
            .map_err(|e| BatchDecodeError::Malformed(e.to_string())),
    }
}

/// The clicks of a `ClickBatch` (`n` of them, counted by [`count_clicks`]), borrowed. The
/// header fields (SDK name and version, `sent_at_ms`) are checked as prost would and
/// otherwise unused: every click carries its own `sent_at_ms`.
fn read_batch(body: &[u8], n: usize) -> Result<Vec<ClickRef<'_>>, WireError> {
    let mut clicks = Vec::with_capacity(n);
    let mut r = Reader(body);
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1 | 2, LEN) => {
                r.str()?;
            }
            (3, VARINT) => {
                r.varint()?;
            }
            (4, LEN) => clicks.push(read_click(r.len_delimited()?)?),
            (1..=4, _) => return Err(WireError("ClickBatch field has the wrong wire type")),
            _ => r.skip(wire)?,
        }
    }
    Ok(clicks)
}

fn read_click(b: &[u8]) -> Result<ClickRef<'_>, WireError> {
    let mut c = ClickRef::default();
    let mut r = Reader(b);
    while let Some((field, wire)) = r.key()? {
        // int64 and enum (int32) fields are two's complement varints truncated to their
        // width, as prost reads them; the last occurrence of a field wins, as in prost.
        match (field, wire) {
            (1, LEN) => c.token = r.str()?,
            (2, VARINT) => c.occurred_at_ms = r.varint()? as i64,
            (3, VARINT) => c.sent_at_ms = r.varint()? as i64,
            (4, LEN) => c.country = r.str()?,
            (5, VARINT) => c.device = r.varint()? as i32,
            (6, LEN) => c.os = r.str()?,
            (7, LEN) => c.site = r.str()?,
            (8, LEN) => c.app = r.str()?,
            (9, LEN) => c.user_id = r.str()?,
            (1..=9, _) => return Err(WireError("Click field has the wrong wire type")),
            _ => r.skip(wire)?,
        }
    }
    Ok(c)
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

    /// What `decode_batch` reads, as owned clicks (or the error).
    fn decoded(body: &[u8], max: usize) -> Result<Vec<v1::Click>, BatchDecodeError> {
        decode_batch(body, max).map(|d| d.clicks().iter().map(owned).collect())
    }

    /// What the prost-only decoder (before the borrowed reader) answered.
    fn prost_decoded(body: &[u8], max: usize) -> Result<Vec<v1::Click>, BatchDecodeError> {
        count_clicks(body, max)?;
        v1::ClickBatch::decode(body)
            .map(|b| b.clicks)
            .map_err(|e| BatchDecodeError::Malformed(e.to_string()))
    }

    fn owned(c: &ClickRef<'_>) -> v1::Click {
        v1::Click {
            token: c.token.into(),
            occurred_at_ms: c.occurred_at_ms,
            sent_at_ms: c.sent_at_ms,
            country: c.country.into(),
            device: c.device,
            os: c.os.into(),
            site: c.site.into(),
            app: c.app.into(),
            user_id: c.user_id.into(),
        }
    }

    fn click() -> impl Strategy<Value = v1::Click> {
        (
            "\\PC{0,40}",
            any::<i64>(),
            prop_oneof![Just(0i64), any::<i64>()],
            "[A-Z]{0,2}",
            prop_oneof![Just(0i32), 0i32..4, any::<i32>()],
            "\\PC{0,8}",
            "\\PC{0,8}",
            "\\PC{0,8}",
            "\\PC{0,12}",
        )
            .prop_map(
                |(token, occurred_at_ms, sent_at_ms, country, device, os, site, app, user_id)| {
                    v1::Click {
                        token,
                        occurred_at_ms,
                        sent_at_ms,
                        country,
                        device,
                        os,
                        site,
                        app,
                        user_id,
                    }
                },
            )
    }

    #[test]
    fn a_body_only_prost_reads_is_still_read() {
        // An unknown field holding a group (wire types 3/4): prost skips it, the borrowed
        // reader does not read groups.
        let mut body = batch(2);
        body.extend_from_slice(&[0x2B, 0x08, 0x01, 0x2C]);
        let d = decode_batch(&body, 10).unwrap();
        assert!(matches!(d, Decoded::Owned(_)));
        assert_eq!(d.len(), 2);
        assert_eq!(decoded(&body, 10), prost_decoded(&body, 10));
        // A wrong wire type for a known field: prost's error text.
        assert_eq!(decoded(&[0x08, 0x01], 10), prost_decoded(&[0x08, 0x01], 10));
        assert!(matches!(
            decoded(&[0x08, 0x01], 10),
            Err(BatchDecodeError::Malformed(_))
        ));
    }

    #[test]
    fn counts_before_decoding() {
        assert_eq!(count_clicks(&batch(7), 10), Ok(7));
        assert_eq!(decode_batch(&batch(10), 10).unwrap().len(), 10);
        // 1 MiB of empty clicks (2 bytes each): refused after max + 1 keys.
        let flood = [0x22u8, 0x00].repeat(1 << 19);
        assert_eq!(
            decode_batch(&flood, 1000).map(|d| d.len()),
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
                prop_assert!(b.len() <= max);
                let strings: usize = b.clicks().iter().map(|c| c.token.len() + c.os.len() + c.site.len()
                    + c.app.len() + c.user_id.len() + c.country.len()).sum::<usize>();
                prop_assert!(strings <= body.len());
            }
            prop_assert_eq!(decoded(&body, max), prost_decoded(&body, max));
        }

        /// Every batch prost writes reads back to the same clicks, borrowed.
        #[test]
        fn reads_what_prost_writes(clicks in proptest::collection::vec(click(), 0..8), sent in any::<i64>()) {
            let body = v1::ClickBatch { sdk_name: "web".into(), sdk_version: "1.2".into(), sent_at_ms: sent, clicks: clicks.clone() }.encode_to_vec();
            let d = decode_batch(&body, 8).unwrap();
            prop_assert!(matches!(d, Decoded::Borrowed(_)));
            prop_assert_eq!(d.clicks().iter().map(owned).collect::<Vec<_>>(), clicks);
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
            prop_assert_eq!(decoded(&body, max), prost_decoded(&body, max));
            match decode_batch(&body, max) {
                Ok(b) => {
                    prop_assert!(b.len() <= max);
                    prop_assert_eq!(count_clicks(&body, usize::MAX).ok(), Some(b.len()));
                }
                Err(BatchDecodeError::TooManyClicks { found, .. }) => prop_assert_eq!(found, max + 1),
                Err(BatchDecodeError::Malformed(_)) => {}
            }
        }
    }
}
