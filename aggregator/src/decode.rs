//! The aggregator's ingest edge: `IngestBatch` bytes -> domain clicks ([`ClickIn`]) without
//! allocating per click. The wire type stops here: the engine keeps the batch's bytes (they
//! are also what the WAL stores, so nothing is re-encoded) and the window operator reads
//! borrowed [`ClickIn`]s from them.
//!
//! Reads exactly the two messages of the ingest path (`IngestBatch`, `IngestClick`) with
//! the shared borrowed reader (`adclick_proto::wire`): the generated prost decoder allocates a `Vec`/`String` for each of the
//! seven byte and string fields of every click, which was a large share of the per-click
//! cost. It accepts a subset of what prost accepts (groups, deprecated since proto3, are
//! refused) and reads every accepted message to the same values (tested against prost
//! below). Bad input is an error naming what is wrong, never a panic.

use adclick_proto::v1::IngestClick;
use adclick_proto::wire::{LEN, Reader, VARINT, WireError};
use bytes::Bytes;

use crate::state::click::ClickIn;

/// Why bytes are not an `IngestBatch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable IngestBatch: {0}")]
pub struct DecodeError(pub String);

fn err(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

impl From<WireError> for DecodeError {
    fn from(e: WireError) -> Self {
        DecodeError(e.0.to_string())
    }
}

/// A batch checked at the edge: its header, and its bytes for the engine and the WAL.
#[derive(Debug, Clone)]
pub struct RawBatch {
    /// The sender.
    pub collector_id: String,
    /// Its spool seq.
    pub seq: u64,
    /// `acked_floor` (field 4; 0 when absent).
    pub acked_floor: u64,
    /// Clicks in the batch.
    pub clicks: usize,
    /// The encoded `IngestBatch`, every click checked decodable.
    pub bytes: Bytes,
}

/// The header of an encoded `IngestBatch`, every click checked decodable.
struct Header<'a> {
    collector_id: &'a str,
    seq: u64,
    acked_floor: u64,
    clicks: usize,
}

fn check(bytes: &[u8]) -> Result<Header<'_>, DecodeError> {
    let mut h = Header {
        collector_id: "",
        seq: 0,
        acked_floor: 0,
        clicks: 0,
    };
    let mut r = Reader(bytes);
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, LEN) => h.collector_id = r.str()?,
            (2, VARINT) => h.seq = r.varint()?,
            (3, LEN) => {
                read_click(r.len_delimited()?)?;
                h.clicks += 1;
            }
            (4, VARINT) => h.acked_floor = r.varint()?,
            (1..=4, _) => return Err(err(format!("field {field} has wire type {wire}"))),
            _ => r.skip(wire)?,
        }
    }
    Ok(h)
}

/// Checks that `bytes` are a decodable `IngestBatch` (a WAL entry before replay).
pub fn check_batch(bytes: &[u8]) -> Result<(), DecodeError> {
    check(bytes).map(drop)
}

impl RawBatch {
    /// Parses and checks a whole batch (header and every click).
    pub fn parse(bytes: Bytes) -> Result<Self, DecodeError> {
        let h = check(&bytes)?;
        let (collector_id, seq, acked_floor, clicks) =
            (h.collector_id.to_string(), h.seq, h.acked_floor, h.clicks);
        Ok(RawBatch {
            collector_id,
            seq,
            acked_floor,
            clicks,
            bytes,
        })
    }

    /// The clicks, in order.
    pub fn clicks(&self) -> Clicks<'_> {
        clicks(&self.bytes)
    }
}

/// The clicks of an encoded `IngestBatch` (checked by [`RawBatch::parse`] on the way in;
/// WAL bytes are checked again here, a damaged entry ending the iteration with an error).
pub fn clicks(batch: &[u8]) -> Clicks<'_> {
    Clicks(Reader(batch))
}

/// Clicks decoded per [`ClickChunks`] step: the window operator warms its lookups for a
/// chunk, then processes it, while the chunk is still in L1/L2. (A whole batch decoded up
/// front, ~180 bytes per click, was ~900 KB for 5,000 clicks, half of this box's L2,
/// streamed through it three times: decode, warm, process.)
pub const DECODE_CHUNK: usize = 256;

/// The clicks of an encoded `IngestBatch`, in order, [`DECODE_CHUNK`] at a time into one
/// reused buffer (a lending iterator: [`ClickChunks::next_chunk`]); then the error that
/// ended the decoding early, if one did ([`ClickChunks::damage`]: the batch was checked at
/// the edge before it was written, so only damage gets one). The engine's apply and the
/// apply bench decode through it.
#[derive(Debug)]
pub struct ClickChunks<'a> {
    clicks: Clicks<'a>,
    /// Up to [`DECODE_CHUNK`] clicks, the first `len` of them this chunk's.
    buf: Vec<ClickIn<'a>>,
    len: usize,
    damage: Option<DecodeError>,
}

impl<'a> ClickChunks<'a> {
    /// Chunks of `batch`.
    pub fn new(batch: &'a [u8]) -> Self {
        ClickChunks {
            clicks: clicks(batch),
            buf: Vec::new(),
            len: 0,
            damage: None,
        }
    }

    /// The next (up to) [`DECODE_CHUNK`] clicks, `None` once every click was returned or
    /// after the chunk that ended at damage.
    pub fn next_chunk(&mut self) -> Option<&[ClickIn<'a>]> {
        self.len = 0;
        if self.damage.is_some() {
            return None;
        }
        while self.len < DECODE_CHUNK {
            // The buffer grows to the largest chunk read (a small batch writes few slots).
            if self.buf.len() == self.len {
                self.buf.push(ClickIn::default());
            }
            let Some(c) = self.buf.get_mut(self.len) else {
                break;
            };
            match self.clicks.next_into(c) {
                Some(Ok(())) => self.len += 1,
                Some(Err(e)) => {
                    self.damage = Some(e);
                    break;
                }
                None => break,
            }
        }
        self.buf.get(..self.len).filter(|b| !b.is_empty())
    }

    /// Why decoding stopped before the end of the batch, if it did.
    pub fn damage(&self) -> Option<&DecodeError> {
        self.damage.as_ref()
    }
}

/// Click records in an encoded `IngestBatch` (up to the first malformed key or length):
/// what the engine sizes a batch's per-shard vectors by.
pub fn count_clicks(batch: &[u8]) -> usize {
    let mut r = Reader(batch);
    let mut n = 0;
    while let Ok(Some((field, wire))) = r.key() {
        n += usize::from(field == 3 && wire == LEN);
        if r.skip(wire).is_err() {
            break;
        }
    }
    n
}

/// Iterator over the clicks of a batch.
#[derive(Debug)]
pub struct Clicks<'a>(Reader<'a>);

impl<'a> Clicks<'a> {
    /// The next click read into `c` (in place: a click is ~180 bytes, and returning it by
    /// value moved it twice on its way into a chunk's buffer).
    fn next_into(&mut self, c: &mut ClickIn<'a>) -> Option<Result<(), DecodeError>> {
        loop {
            let (field, wire) = match self.0.key() {
                Ok(Some(k)) => k,
                Ok(None) => return None,
                Err(e) => return Some(Err(e.into())),
            };
            let step = match (field, wire) {
                (3, LEN) => {
                    return Some(
                        self.0
                            .len_delimited()
                            .map_err(Into::into)
                            .and_then(|b| read_click_into(b, c)),
                    );
                }
                _ => self.0.skip(wire),
            };
            if let Err(e) = step {
                return Some(Err(e.into()));
            }
        }
    }
}

impl<'a> Iterator for Clicks<'a> {
    type Item = Result<ClickIn<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut c = ClickIn::default();
        Some(self.next_into(&mut c)?.map(|()| c))
    }
}

/// The domain form of a decoded wire click (tests, tools).
pub fn click_from_wire(c: &IngestClick) -> ClickIn<'_> {
    ClickIn {
        impression_id: &c.impression_id,
        ad_id: c.ad_id,
        advertiser_id: c.advertiser_id,
        campaign_id: c.campaign_id,
        token_expires_at_ms: c.token_expires_at_ms,
        event_time_ms: c.event_time_ms,
        country: &c.country,
        device: c.device,
        os: &c.os,
        site: if c.site.is_empty() { &c.app } else { &c.site },
        user_id: c.user_id.as_bytes(),
        client_ip: &c.client_ip,
        received_at_ms: c.received_at_ms,
        occurred_at_ms: c.occurred_at_ms,
        sent_at_ms: c.sent_at_ms,
        clock_skew_flagged: c.clock_skew_flagged,
        token_issued_at_ms: c.token_issued_at_ms,
        ua_class: c.ua_class,
    }
}

/// Consumes the one-byte key `tag` if it comes next.
#[inline(always)]
fn next_is(r: &mut Reader<'_>, tag: u8) -> bool {
    match r.0.split_first() {
        Some((&b, rest)) if b == tag => {
            r.0 = rest;
            true
        }
        _ => false,
    }
}

/// Consumes the two-byte key `tag` (fields 16 to 2047) if it comes next.
#[inline(always)]
fn next_is2(r: &mut Reader<'_>, tag: [u8; 2]) -> bool {
    match r.0.split_first_chunk::<2>() {
        Some((&k, rest)) if k == tag => {
            r.0 = rest;
            true
        }
        _ => false,
    }
}

/// The one-byte key of field `f` (below 16) with wire type `w`.
const fn key1(f: u8, w: u8) -> u8 {
    (f << 3) | w
}
/// The two-byte key of field `f` (16 to 31, as this `u8` arithmetic is written) with wire
/// type `w`.
const fn key2(f: u8, w: u8) -> [u8; 2] {
    [((f << 3) & 0x7F) | 0x80 | w, f >> 4]
}

/// Reads the fields that come in field-number order (as prost and our SDKs write them,
/// defaults omitted) with one predictable test per field, instead of decoding a key and
/// dispatching on it (an indirect jump per field, the largest cost of `read_click`).
/// Stops at the first key out of that order: the general loop reads the rest, so every
/// field is still read in message order (a repeated field's last value wins, as prost).
#[inline(always)]
fn read_in_order<'a>(
    r: &mut Reader<'a>,
    c: &mut ClickIn<'a>,
    app: &mut &'a str,
) -> Result<(), DecodeError> {
    if next_is(r, key1(1, LEN)) {
        c.impression_id = r.len_delimited()?;
    }
    if next_is(r, key1(2, VARINT)) {
        c.ad_id = r.varint()?;
    }
    if next_is(r, key1(3, VARINT)) {
        c.advertiser_id = r.varint()?;
    }
    if next_is(r, key1(4, VARINT)) {
        c.campaign_id = r.varint()?;
    }
    if next_is(r, key1(5, VARINT)) {
        c.token_expires_at_ms = r.varint()? as i64;
    }
    if next_is(r, key1(6, VARINT)) {
        c.event_time_ms = r.varint()? as i64;
    }
    if next_is(r, key1(7, VARINT)) {
        c.received_at_ms = r.varint()? as i64;
    }
    if next_is(r, key1(8, VARINT)) {
        c.occurred_at_ms = r.varint()? as i64;
    }
    if next_is(r, key1(9, VARINT)) {
        c.sent_at_ms = r.varint()? as i64;
    }
    if next_is(r, key1(10, LEN)) {
        c.country = r.str()?;
    }
    if next_is(r, key1(11, VARINT)) {
        c.device = r.varint()? as i32;
    }
    if next_is(r, key1(12, LEN)) {
        c.os = r.str()?;
    }
    if next_is(r, key1(13, LEN)) {
        c.site = r.str()?;
    }
    if next_is(r, key1(14, LEN)) {
        *app = r.str()?;
    }
    if next_is(r, key1(15, LEN)) {
        c.user_id = r.str()?.as_bytes();
    }
    if next_is2(r, key2(16, LEN)) {
        c.client_ip = r.len_delimited()?;
    }
    if next_is2(r, key2(17, VARINT)) {
        c.clock_skew_flagged = r.varint()? != 0;
    }
    // `dedup_suspect` and `salt`: for the collectors' routing, not read here.
    if next_is2(r, key2(18, VARINT)) {
        r.varint()?;
    }
    if next_is2(r, key2(19, VARINT)) {
        r.varint()?;
    }
    if next_is2(r, key2(20, VARINT)) {
        c.token_issued_at_ms = r.varint()? as i64;
    }
    if next_is2(r, key2(21, VARINT)) {
        c.ua_class = r.varint()? as i32;
    }
    Ok(())
}

fn read_click(b: &[u8]) -> Result<ClickIn<'_>, DecodeError> {
    let mut c = ClickIn::default();
    read_click_into(b, &mut c)?;
    Ok(c)
}

/// [`read_click`] into `c`, whatever it held before.
fn read_click_into<'a>(b: &'a [u8], c: &mut ClickIn<'a>) -> Result<(), DecodeError> {
    *c = ClickIn::default();
    let mut app = "";
    let mut r = Reader(b);
    read_in_order(&mut r, c, &mut app)?;
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, LEN) => c.impression_id = r.len_delimited()?,
            (2, VARINT) => c.ad_id = r.varint()?,
            (3, VARINT) => c.advertiser_id = r.varint()?,
            (4, VARINT) => c.campaign_id = r.varint()?,
            // int64 and int32 are two's complement varints, truncated as prost does.
            (5, VARINT) => c.token_expires_at_ms = r.varint()? as i64,
            (6, VARINT) => c.event_time_ms = r.varint()? as i64,
            (7, VARINT) => c.received_at_ms = r.varint()? as i64,
            (8, VARINT) => c.occurred_at_ms = r.varint()? as i64,
            (9, VARINT) => c.sent_at_ms = r.varint()? as i64,
            // As prost: any nonzero varint is true.
            (17, VARINT) => c.clock_skew_flagged = r.varint()? != 0,
            (18..=19, VARINT) => {
                r.varint()?;
            }
            (20, VARINT) => c.token_issued_at_ms = r.varint()? as i64,
            (21, VARINT) => c.ua_class = r.varint()? as i32,
            (10, LEN) => c.country = r.str()?,
            (11, VARINT) => c.device = r.varint()? as i32,
            (12, LEN) => c.os = r.str()?,
            (13, LEN) => c.site = r.str()?,
            (14, LEN) => app = r.str()?,
            (15, LEN) => c.user_id = r.str()?.as_bytes(),
            (16, LEN) => c.client_ip = r.len_delimited()?,
            (1..=21, _) => {
                return Err(err(format!(
                    "IngestClick field {field} has wire type {wire}"
                )));
            }
            _ => r.skip(wire)?,
        }
    }
    if c.site.is_empty() {
        c.site = app;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use adclick_proto::v1::IngestBatch;
    use proptest::prelude::*;
    use prost::Message;

    fn wire_click() -> impl Strategy<Value = IngestClick> {
        (
            (
                proptest::collection::vec(any::<u8>(), 0..20),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<i64>(),
                any::<i64>(),
                any::<i64>(),
            ),
            (
                "[A-Z]{0,3}",
                any::<i32>(),
                "\\PC{0,6}",
                "\\PC{0,6}",
                "\\PC{0,6}",
                "\\PC{0,8}",
                proptest::collection::vec(any::<u8>(), 0..17),
                any::<bool>(),
                any::<u32>(),
            ),
            (any::<i64>(), any::<i64>(), any::<i32>()),
        )
            .prop_map(
                |(
                    (id, ad, adv, camp, exp, ev, recv),
                    (country, device, os, site, app, user, ip, flag, salt),
                    (sent, issued, ua),
                )| IngestClick {
                    impression_id: id,
                    ad_id: ad,
                    advertiser_id: adv,
                    campaign_id: camp,
                    token_expires_at_ms: exp,
                    event_time_ms: ev,
                    received_at_ms: recv,
                    occurred_at_ms: recv.wrapping_sub(1),
                    sent_at_ms: sent,
                    country,
                    device,
                    os,
                    site,
                    app,
                    user_id: user,
                    client_ip: ip,
                    clock_skew_flagged: flag,
                    dedup_suspect: !flag,
                    salt,
                    token_issued_at_ms: issued,
                    ua_class: ua,
                },
            )
    }

    /// A batch of several chunks reads back as prost reads it, in chunks of
    /// [`DECODE_CHUNK`]; one cut inside a click gives the clicks before the cut, then the
    /// damage. A buffer slot is reused from chunk to chunk: a click with every field set
    /// is followed in its slot by one with only a few (and the other way round), so a
    /// field left over from the slot's last click would show.
    #[test]
    fn chunks_cover_the_batch_and_stop_at_damage() {
        let n = 2 * DECODE_CHUNK + 88;
        let wire: Vec<IngestClick> = (0..n as u64)
            .map(|i| {
                let sparse = IngestClick {
                    impression_id: i.to_le_bytes().to_vec(),
                    ad_id: i * 7,
                    country: "DE".into(),
                    user_id: format!("u{i}"),
                    event_time_ms: 1_700_000_000_000 + i as i64,
                    ..Default::default()
                };
                if (i + i / DECODE_CHUNK as u64).is_multiple_of(2) {
                    return sparse;
                }
                IngestClick {
                    advertiser_id: i + 1,
                    campaign_id: i + 2,
                    token_expires_at_ms: 1_700_000_100_000,
                    received_at_ms: 1_700_000_000_010,
                    occurred_at_ms: 1_700_000_000_001,
                    sent_at_ms: 1_700_000_000_005,
                    device: 2,
                    os: "ios".into(),
                    site: "news.example".into(),
                    app: "app".into(),
                    client_ip: vec![10, 0, 0, 1],
                    clock_skew_flagged: true,
                    token_issued_at_ms: 1_699_999_999_000,
                    ua_class: 1,
                    ..sparse
                }
            })
            .collect();
        let bytes = IngestBatch {
            collector_id: "c".into(),
            seq: 1,
            clicks: wire.clone(),
            acked_floor: 0,
        }
        .encode_to_vec();
        let mut chunks = ClickChunks::new(&bytes);
        let mut sizes = Vec::new();
        let mut decoded = Vec::new();
        while let Some(chunk) = chunks.next_chunk() {
            sizes.push(chunk.len());
            decoded.extend_from_slice(chunk);
        }
        assert_eq!(sizes, [DECODE_CHUNK, DECODE_CHUNK, 88]);
        assert!(chunks.damage().is_none());
        let theirs: Vec<ClickIn<'_>> = wire.iter().map(click_from_wire).collect();
        assert_eq!(decoded, theirs);
        // Cut in the middle of the 301st click's record.
        let first = IngestBatch {
            collector_id: "c".into(),
            seq: 1,
            clicks: wire[..300].to_vec(),
            acked_floor: 0,
        }
        .encode_to_vec();
        assert_eq!(bytes[..first.len()], first[..]);
        let cut = &bytes[..first.len() + wire[300].encoded_len() / 2];
        let mut chunks = ClickChunks::new(cut);
        let mut before = Vec::new();
        while let Some(chunk) = chunks.next_chunk() {
            before.extend_from_slice(chunk);
        }
        assert_eq!(before.len(), 300);
        assert_eq!(before[..], theirs[..300]);
        assert!(chunks.damage().is_some());
        assert!(chunks.next_chunk().is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every batch prost encodes reads back to the same values.
        #[test]
        fn reads_what_prost_writes(
            id in "[a-z0-9-]{0,12}",
            seq in any::<u64>(),
            acked_floor in any::<u64>(),
            wire in proptest::collection::vec(wire_click(), 0..6),
        ) {
            let batch = IngestBatch { collector_id: id.clone(), seq, clicks: wire.clone(), acked_floor };
            let bytes = batch.encode_to_vec();
            // The engine sizes its per-shard vectors by this count.
            prop_assert_eq!(count_clicks(&bytes), wire.len());
            let mut chunks = ClickChunks::new(&bytes);
            let mut decoded = Vec::new();
            while let Some(chunk) = chunks.next_chunk() {
                prop_assert!(!chunk.is_empty() && chunk.len() <= DECODE_CHUNK);
                decoded.extend_from_slice(chunk);
            }
            prop_assert!(chunks.damage().is_none());
            let raw = RawBatch::parse(Bytes::from(bytes.clone())).unwrap();
            prop_assert_eq!(&raw.collector_id, &id);
            prop_assert_eq!(raw.seq, seq);
            prop_assert_eq!(raw.acked_floor, acked_floor);
            prop_assert_eq!(raw.clicks, wire.len());
            let ours: Vec<ClickIn<'_>> = raw.clicks().collect::<Result<_, _>>().unwrap();
            let theirs: Vec<ClickIn<'_>> = wire.iter().map(click_from_wire).collect();
            prop_assert_eq!(&decoded, &theirs);
            prop_assert_eq!(ours, theirs);
        }

        /// A click's fields in any order, some repeated, with unknown fields between them:
        /// read as prost reads them (the in-order fast path hands over to the general loop
        /// at the first key out of order; a repeated field's last value wins).
        #[test]
        fn fields_in_any_order_read_as_prost_reads_them(
            click in wire_click(),
            order in proptest::collection::vec((0usize..23, any::<bool>()), 0..40),
        ) {
            // Each field alone encodes as just that field (defaults are omitted).
            let fields: Vec<Vec<u8>> = (1..=21u32)
                .map(|f| {
                    let mut one = IngestClick::default();
                    match f {
                        1 => one.impression_id = click.impression_id.clone(),
                        2 => one.ad_id = click.ad_id,
                        3 => one.advertiser_id = click.advertiser_id,
                        4 => one.campaign_id = click.campaign_id,
                        5 => one.token_expires_at_ms = click.token_expires_at_ms,
                        6 => one.event_time_ms = click.event_time_ms,
                        7 => one.received_at_ms = click.received_at_ms,
                        8 => one.occurred_at_ms = click.occurred_at_ms,
                        9 => one.sent_at_ms = click.sent_at_ms,
                        10 => one.country = click.country.clone(),
                        11 => one.device = click.device,
                        12 => one.os = click.os.clone(),
                        13 => one.site = click.site.clone(),
                        14 => one.app = click.app.clone(),
                        15 => one.user_id = click.user_id.clone(),
                        16 => one.client_ip = click.client_ip.clone(),
                        17 => one.clock_skew_flagged = click.clock_skew_flagged,
                        18 => one.dedup_suspect = true,
                        19 => one.salt = click.ad_id as u32 | 1,
                        20 => one.token_issued_at_ms = click.token_issued_at_ms,
                        21 => one.ua_class = click.ua_class,
                        _ => {}
                    }
                    one.encode_to_vec()
                })
                .collect();
            let mut msg = Vec::new();
            for (i, unknown) in order {
                match fields.get(i) {
                    Some(f) => msg.extend_from_slice(f),
                    // An unknown field (number 30, varint), or field 3 (a varint) as LEN:
                    // refused by both.
                    None if i == 21 => msg.extend_from_slice(&[0xF0, 0x01, 0x05]),
                    None => msg.extend_from_slice(&[0x1A, 0x01, 0x00]),
                }
                if unknown {
                    msg.extend_from_slice(&[0xF0, 0x01, 0x07]);
                }
            }
            match IngestClick::decode(&msg[..]) {
                Ok(theirs) => prop_assert_eq!(read_click(&msg).unwrap(), click_from_wire(&theirs)),
                Err(_) => prop_assert!(read_click(&msg).is_err()),
            }
        }

        /// Arbitrary or damaged bytes: never a panic, and whatever is accepted is what prost
        /// reads too.
        #[test]
        fn accepts_only_what_prost_accepts(
            n in 0usize..5,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
            noise in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let click = IngestClick { impression_id: vec![1; 16], ad_id: 7, country: "US".into(), site: "s".into(), user_id: "u".into(), token_issued_at_ms: 1_700_000_000_000, ua_class: 2, ..Default::default() };
            let mut bytes = IngestBatch { collector_id: "c".into(), seq: 3, clicks: vec![click; n], acked_floor: 2 }.encode_to_vec();
            for (i, v) in flips {
                if !bytes.is_empty() {
                    let i = i.index(bytes.len());
                    bytes[i] = v;
                }
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            for candidate in [bytes, noise] {
                if let Ok(raw) = RawBatch::parse(Bytes::from(candidate.clone())) {
                    let theirs = IngestBatch::decode(&candidate[..]);
                    prop_assert!(theirs.is_ok(), "prost refused what we accepted");
                    let theirs = theirs.unwrap();
                    prop_assert_eq!(&raw.collector_id, &theirs.collector_id);
                    prop_assert_eq!(raw.seq, theirs.seq);
                    prop_assert_eq!(raw.acked_floor, theirs.acked_floor);
                    let ours: Vec<ClickIn<'_>> = raw.clicks().collect::<Result<_, _>>().unwrap();
                    let wire: Vec<ClickIn<'_>> = theirs.clicks.iter().map(click_from_wire).collect();
                    prop_assert_eq!(ours, wire);
                }
            }
        }
    }
}
