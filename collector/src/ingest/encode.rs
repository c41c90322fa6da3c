//! Encodes an accepted click straight into `IngestBatch.clicks` bytes (field 3) from
//! borrowed fields, as prost encodes the equivalent `IngestClick` (byte for byte: fields in
//! number order, proto3 defaults left out; tested below). The per-click path builds no
//! `IngestClick` and allocates nothing once the output buffer has room.
//!
//! Pure: no I/O, no clocks.

use adclick_proto::wire::{LEN, VARINT, put_key, put_varint, varint_len};

/// `IngestBatch.clicks`.
const CLICKS_FIELD: u32 = 3;

/// An accepted click's `IngestClick` fields, borrowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestClickRef<'a> {
    /// Field 1.
    pub impression_id: &'a [u8],
    /// Field 2.
    pub ad_id: u64,
    /// Field 3.
    pub advertiser_id: u64,
    /// Field 4.
    pub campaign_id: u64,
    /// Field 5.
    pub token_expires_at_ms: i64,
    /// Field 6.
    pub event_time_ms: i64,
    /// Field 7.
    pub received_at_ms: i64,
    /// Field 8.
    pub occurred_at_ms: i64,
    /// Field 9.
    pub sent_at_ms: i64,
    /// Field 10.
    pub country: &'a str,
    /// Field 11.
    pub device: i32,
    /// Field 12.
    pub os: &'a str,
    /// Field 13.
    pub site: &'a str,
    /// Field 14.
    pub app: &'a str,
    /// Field 15.
    pub user_id: &'a str,
    /// Field 16.
    pub client_ip: &'a [u8],
    /// Field 17.
    pub clock_skew_flagged: bool,
    /// Field 18.
    pub dedup_suspect: bool,
    /// Field 19.
    pub salt: u32,
    /// Field 20.
    pub token_issued_at_ms: i64,
    /// Field 21.
    pub ua_class: i32,
}

// Keys of fields 1..=15 take one byte, 16..=21 two.
fn key_len(field: u32) -> usize {
    if field < 16 { 1 } else { 2 }
}

// int64 and int32 (enums) are encoded as the two's complement u64 (10 bytes if negative).
fn int(v: i64) -> u64 {
    v as u64
}

fn varint_field_len(field: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(field) + varint_len(v)
    }
}

fn bytes_field_len(field: u32, b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        key_len(field) + varint_len(b.len() as u64) + b.len()
    }
}

fn put_varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        put_key(buf, field, VARINT);
        put_varint(buf, v);
    }
}

fn put_bytes_field(buf: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        put_key(buf, field, LEN);
        put_varint(buf, b.len() as u64);
        buf.extend_from_slice(b);
    }
}

impl IngestClickRef<'_> {
    /// The varint fields in number order (strings and bytes are written between them).
    fn body_len(&self) -> usize {
        bytes_field_len(1, self.impression_id)
            + varint_field_len(2, self.ad_id)
            + varint_field_len(3, self.advertiser_id)
            + varint_field_len(4, self.campaign_id)
            + varint_field_len(5, int(self.token_expires_at_ms))
            + varint_field_len(6, int(self.event_time_ms))
            + varint_field_len(7, int(self.received_at_ms))
            + varint_field_len(8, int(self.occurred_at_ms))
            + varint_field_len(9, int(self.sent_at_ms))
            + bytes_field_len(10, self.country.as_bytes())
            + varint_field_len(11, int(self.device.into()))
            + bytes_field_len(12, self.os.as_bytes())
            + bytes_field_len(13, self.site.as_bytes())
            + bytes_field_len(14, self.app.as_bytes())
            + bytes_field_len(15, self.user_id.as_bytes())
            + bytes_field_len(16, self.client_ip)
            + varint_field_len(17, u64::from(self.clock_skew_flagged))
            + varint_field_len(18, u64::from(self.dedup_suspect))
            + varint_field_len(19, u64::from(self.salt))
            + varint_field_len(20, int(self.token_issued_at_ms))
            + varint_field_len(21, int(self.ua_class.into()))
    }

    /// Bytes [`IngestClickRef::encode_entry`] appends.
    pub fn entry_len(&self) -> usize {
        let n = self.body_len();
        key_len(CLICKS_FIELD) + varint_len(n as u64) + n
    }

    /// Appends this click as one `IngestBatch.clicks` entry (key, length, message).
    pub fn encode_entry(&self, buf: &mut Vec<u8>) {
        let n = self.body_len();
        buf.reserve(key_len(CLICKS_FIELD) + varint_len(n as u64) + n);
        put_key(buf, CLICKS_FIELD, LEN);
        put_varint(buf, n as u64);
        put_bytes_field(buf, 1, self.impression_id);
        put_varint_field(buf, 2, self.ad_id);
        put_varint_field(buf, 3, self.advertiser_id);
        put_varint_field(buf, 4, self.campaign_id);
        put_varint_field(buf, 5, int(self.token_expires_at_ms));
        put_varint_field(buf, 6, int(self.event_time_ms));
        put_varint_field(buf, 7, int(self.received_at_ms));
        put_varint_field(buf, 8, int(self.occurred_at_ms));
        put_varint_field(buf, 9, int(self.sent_at_ms));
        put_bytes_field(buf, 10, self.country.as_bytes());
        put_varint_field(buf, 11, int(self.device.into()));
        put_bytes_field(buf, 12, self.os.as_bytes());
        put_bytes_field(buf, 13, self.site.as_bytes());
        put_bytes_field(buf, 14, self.app.as_bytes());
        put_bytes_field(buf, 15, self.user_id.as_bytes());
        put_bytes_field(buf, 16, self.client_ip);
        put_varint_field(buf, 17, u64::from(self.clock_skew_flagged));
        put_varint_field(buf, 18, u64::from(self.dedup_suspect));
        put_varint_field(buf, 19, u64::from(self.salt));
        put_varint_field(buf, 20, int(self.token_issued_at_ms));
        put_varint_field(buf, 21, int(self.ua_class.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adclick_proto::v1::{IngestBatch, IngestClick};
    use proptest::prelude::*;
    use prost::Message;

    fn as_ref(c: &IngestClick) -> IngestClickRef<'_> {
        IngestClickRef {
            impression_id: &c.impression_id,
            ad_id: c.ad_id,
            advertiser_id: c.advertiser_id,
            campaign_id: c.campaign_id,
            token_expires_at_ms: c.token_expires_at_ms,
            event_time_ms: c.event_time_ms,
            received_at_ms: c.received_at_ms,
            occurred_at_ms: c.occurred_at_ms,
            sent_at_ms: c.sent_at_ms,
            country: &c.country,
            device: c.device,
            os: &c.os,
            site: &c.site,
            app: &c.app,
            user_id: &c.user_id,
            client_ip: &c.client_ip,
            clock_skew_flagged: c.clock_skew_flagged,
            dedup_suspect: c.dedup_suspect,
            salt: c.salt,
            token_issued_at_ms: c.token_issued_at_ms,
            ua_class: c.ua_class,
        }
    }

    // Values that are zero (left out), small, or any (negative: ten bytes).
    fn i64v() -> impl Strategy<Value = i64> {
        prop_oneof![Just(0i64), -3i64..300, any::<i64>()]
    }

    fn u64v() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), 0u64..300, any::<u64>()]
    }

    fn click() -> impl Strategy<Value = IngestClick> {
        (
            (
                proptest::collection::vec(any::<u8>(), 0..20),
                u64v(),
                u64v(),
                u64v(),
                i64v(),
                i64v(),
                i64v(),
                i64v(),
                i64v(),
            ),
            (
                "[A-Z]{0,3}",
                prop_oneof![Just(0i32), -2i32..5, any::<i32>()],
                "\\PC{0,6}",
                "\\PC{0,200}",
                "\\PC{0,6}",
                "\\PC{0,8}",
                proptest::collection::vec(any::<u8>(), 0..17),
            ),
            (
                any::<bool>(),
                any::<bool>(),
                prop_oneof![Just(0u32), any::<u32>()],
                i64v(),
                prop_oneof![Just(0i32), 0i32..3, any::<i32>()],
            ),
        )
            .prop_map(
                |(
                    (id, ad, adv, camp, exp, ev, recv, occ, sent),
                    (country, device, os, site, app, user, ip),
                    (flag, suspect, salt, issued, ua),
                )| IngestClick {
                    impression_id: id,
                    ad_id: ad,
                    advertiser_id: adv,
                    campaign_id: camp,
                    token_expires_at_ms: exp,
                    event_time_ms: ev,
                    received_at_ms: recv,
                    occurred_at_ms: occ,
                    sent_at_ms: sent,
                    country,
                    device,
                    os,
                    site,
                    app,
                    user_id: user,
                    client_ip: ip,
                    clock_skew_flagged: flag,
                    dedup_suspect: suspect,
                    salt,
                    token_issued_at_ms: issued,
                    ua_class: ua,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Byte for byte what prost writes for the same clicks, and an `IngestBatch` of
        /// them decodes to those clicks.
        #[test]
        fn encodes_as_prost(clicks in proptest::collection::vec(click(), 0..5)) {
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            for c in &clicks {
                let r = as_ref(c);
                let before = ours.len();
                r.encode_entry(&mut ours);
                prop_assert_eq!(ours.len() - before, r.entry_len());
                prost::encoding::message::encode(3, c, &mut theirs);
            }
            prop_assert_eq!(&ours, &theirs);
            let batch = IngestBatch::decode(&ours[..]).unwrap();
            prop_assert_eq!(batch.clicks, clicks);
        }
    }
}
