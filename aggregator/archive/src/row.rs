//! One archived click ([`Row`]), what became of it ([`Status`]), the Arrow schema of the
//! files and the conversion of rows to a `RecordBatch`. The schema is documented column by
//! column in `docs/archive.md`; columns may be added at the end, never renamed, retyped or
//! removed.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Int32Builder, StringBuilder, StringDictionaryBuilder,
    TimestampMillisecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::types::Int8Type;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// What the aggregator did with a click. The code is its byte in the WAL's outcome rows
/// (`adclick_aggregator::archive`): stable, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Counted in the minute of its event time.
    Counted = 0,
    /// Counted as a late correction (its minute had passed the watermark).
    CountedLate = 1,
    /// Not counted: its impression id was counted before.
    Duplicate = 2,
    /// Not counted: older than the aggregator's minute retention (quarantined).
    TooOld = 3,
    /// Not counted: not a valid click record (impression id, implausible event time).
    Malformed = 4,
    /// Not counted: the ad belongs to another advertiser/campaign (quarantined).
    OwnerMismatch = 5,
    /// Archived by a writer that does not decide (a stream consumer archiving what was
    /// published, before any aggregator judged it).
    Received = 6,
    /// Counted, and classified invalid traffic on arrival by the aggregator's rules
    /// (issue 16), one code per reason (the `reason` column): in the counts of
    /// `traffic = ALL` and `INVALID`, not in the valid (billed) ones. A later retroactive
    /// move (rate rules, honeypot look-back) is not rewritten into an archived row.
    InvalidBotUserAgent = 16,
    /// See [`Status::InvalidBotUserAgent`].
    InvalidDatacenterIp = 17,
    /// See [`Status::InvalidBotUserAgent`].
    InvalidHoneypot = 18,
    /// See [`Status::InvalidBotUserAgent`].
    InvalidImpossibleTime = 19,
    /// See [`Status::InvalidBotUserAgent`].
    InvalidTooFast = 20,
    /// See [`Status::InvalidBotUserAgent`].
    InvalidIpRate = 21,
    /// See [`Status::InvalidBotUserAgent`].
    InvalidUserRate = 22,
    /// Not a click of its own: a `moved` row records that a click counted as valid
    /// earlier (its row: the same `log_pos` and `click_index`) was moved to invalid by a
    /// honeypot trap click's look-back (issue 16). One code per rule that can move.
    MovedHoneypot = 34,
    /// See [`Status::MovedHoneypot`]: moved by `ip_rate` tripping in its minute.
    MovedIpRate = 37,
    /// See [`Status::MovedHoneypot`]: moved by `user_rate` tripping in its minute.
    MovedUserRate = 38,
}

impl Status {
    /// From its code; `None` for an unknown code.
    pub fn from_code(code: u8) -> Option<Status> {
        Some(match code {
            0 => Status::Counted,
            1 => Status::CountedLate,
            2 => Status::Duplicate,
            3 => Status::TooOld,
            4 => Status::Malformed,
            5 => Status::OwnerMismatch,
            6 => Status::Received,
            16 => Status::InvalidBotUserAgent,
            17 => Status::InvalidDatacenterIp,
            18 => Status::InvalidHoneypot,
            19 => Status::InvalidImpossibleTime,
            20 => Status::InvalidTooFast,
            21 => Status::InvalidIpRate,
            22 => Status::InvalidUserRate,
            34 => Status::MovedHoneypot,
            37 => Status::MovedIpRate,
            38 => Status::MovedUserRate,
            _ => return None,
        })
    }

    /// The `status` column: `counted`, `duplicate`, `quarantined`, `invalid` or `received`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Counted | Status::CountedLate => "counted",
            Status::Duplicate => "duplicate",
            Status::TooOld | Status::OwnerMismatch => "quarantined",
            Status::Malformed => "invalid",
            Status::Received => "received",
            Status::InvalidBotUserAgent
            | Status::InvalidDatacenterIp
            | Status::InvalidHoneypot
            | Status::InvalidImpossibleTime
            | Status::InvalidTooFast
            | Status::InvalidIpRate
            | Status::InvalidUserRate => "invalid_traffic",
            Status::MovedHoneypot | Status::MovedIpRate | Status::MovedUserRate => "moved",
        }
    }

    /// The `reason` column (null for a plain counted or received click).
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Status::Counted | Status::Received => None,
            Status::CountedLate => Some("late"),
            Status::Duplicate => Some("duplicate_impression"),
            Status::TooOld => Some("too_old"),
            Status::Malformed => Some("malformed"),
            Status::OwnerMismatch => Some("owner_mismatch"),
            Status::InvalidBotUserAgent => Some("bot_user_agent"),
            Status::InvalidDatacenterIp => Some("datacenter_ip"),
            Status::InvalidHoneypot | Status::MovedHoneypot => Some("honeypot"),
            Status::InvalidImpossibleTime => Some("impossible_time"),
            Status::InvalidTooFast => Some("too_fast"),
            Status::InvalidIpRate | Status::MovedIpRate => Some("ip_rate"),
            Status::InvalidUserRate | Status::MovedUserRate => Some("user_rate"),
        }
    }

    /// Whether the click is in the aggregator's counts (a `moved` row is not a click:
    /// its click's own row is the counted one).
    pub fn counted(self) -> bool {
        !matches!(
            self,
            Status::Duplicate
                | Status::TooOld
                | Status::Malformed
                | Status::OwnerMismatch
                | Status::Received
        ) && !self.is_move()
    }

    /// Whether this is a `moved` row (a later reclassification of an earlier click).
    pub fn is_move(self) -> bool {
        matches!(
            self,
            Status::MovedHoneypot | Status::MovedIpRate | Status::MovedUserRate
        )
    }
}

/// One click as archived: every field of the wire click, where it came from, and what
/// became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Position of its batch in the writer's log (the aggregator's WAL position, or the
    /// stream sequence for a stream consumer).
    pub log_pos: u64,
    /// The collector that sent it.
    pub collector_id: Arc<str>,
    /// The collector's spool seq of its batch.
    pub collector_seq: u64,
    /// Its index in the batch (with `collector_id`, `collector_seq`: a unique key).
    pub click_index: u32,
    /// Impression id (16 bytes when valid).
    pub impression_id: Vec<u8>,
    /// Ad.
    pub ad_id: u64,
    /// Advertiser.
    pub advertiser_id: u64,
    /// Campaign.
    pub campaign_id: u64,
    /// Token expiry.
    pub token_expires_at_ms: i64,
    /// Corrected event time (the partition).
    pub event_time_ms: i64,
    /// Collector clock when the click arrived.
    pub received_at_ms: i64,
    /// Device clock when the click happened, as sent.
    pub occurred_at_ms: i64,
    /// Device clock when the batch was sent, as sent.
    pub sent_at_ms: i64,
    /// ISO 3166-1 alpha-2 country, or empty.
    pub country: String,
    /// `adclick.v1.Device` value.
    pub device: i32,
    /// Operating system.
    pub os: String,
    /// Site.
    pub site: String,
    /// App.
    pub app: String,
    /// User id.
    pub user_id: String,
    /// Client IP as the collector saw it (None: unknown).
    pub client_ip: Option<IpAddr>,
    /// The device clock was off by more than the collector's bound.
    pub clock_skew_flagged: bool,
    /// The collector's Bloom pre-check said "maybe seen".
    pub dedup_suspect: bool,
    /// Hot-key fanout salt.
    pub salt: u32,
    /// What became of it.
    pub status: Status,
    /// The version of the invalid-traffic rules that classified it (`Rules::version`:
    /// a hash of the effective rules config and data). `None`: the rules were off, or the
    /// writer does not classify (a stream consumer's `received` rows).
    pub rules_version: Option<Arc<str>>,
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The schema of every archive file (`docs/archive.md`).
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let dict = DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8));
            Arc::new(Schema::new(vec![
                Field::new("log_pos", DataType::UInt64, false),
                Field::new("collector_id", DataType::Utf8, false),
                Field::new("collector_seq", DataType::UInt64, false),
                Field::new("click_index", DataType::UInt32, false),
                Field::new("impression_id", DataType::Binary, false),
                Field::new("ad_id", DataType::UInt64, false),
                Field::new("advertiser_id", DataType::UInt64, false),
                Field::new("campaign_id", DataType::UInt64, false),
                Field::new("token_expires_at", ts(), false),
                Field::new("event_time", ts(), false),
                Field::new("received_at", ts(), false),
                Field::new("occurred_at", ts(), false),
                Field::new("sent_at", ts(), false),
                Field::new("country", DataType::Utf8, false),
                Field::new("device", DataType::Int32, false),
                Field::new("os", DataType::Utf8, false),
                Field::new("site", DataType::Utf8, false),
                Field::new("app", DataType::Utf8, false),
                Field::new("user_id", DataType::Utf8, false),
                Field::new("client_ip", DataType::Utf8, true),
                Field::new("clock_skew_flagged", DataType::Boolean, false),
                Field::new("dedup_suspect", DataType::Boolean, false),
                Field::new("salt", DataType::UInt32, false),
                Field::new("status", dict.clone(), false),
                Field::new("reason", dict.clone(), true),
                Field::new("rules_version", dict, true),
            ]))
        })
        .clone()
}

/// The rows as one `RecordBatch` of [`schema`].
pub fn to_batch(rows: &[Row]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let mut log_pos = UInt64Builder::with_capacity(n);
    let mut collector_id = StringBuilder::with_capacity(n, n * 16);
    let mut collector_seq = UInt64Builder::with_capacity(n);
    let mut click_index = UInt32Builder::with_capacity(n);
    let mut impression_id = BinaryBuilder::with_capacity(n, n * 16);
    let mut ad = UInt64Builder::with_capacity(n);
    let mut advertiser = UInt64Builder::with_capacity(n);
    let mut campaign = UInt64Builder::with_capacity(n);
    let mut times: [TimestampMillisecondBuilder; 5] =
        std::array::from_fn(|_| TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC"));
    let mut country = StringBuilder::with_capacity(n, n * 2);
    let mut device = Int32Builder::with_capacity(n);
    let mut strings: [StringBuilder; 4] =
        std::array::from_fn(|_| StringBuilder::with_capacity(n, n * 8));
    let mut client_ip = StringBuilder::with_capacity(n, n * 12);
    let mut skew = BooleanBuilder::with_capacity(n);
    let mut suspect = BooleanBuilder::with_capacity(n);
    let mut salt = UInt32Builder::with_capacity(n);
    let mut status = StringDictionaryBuilder::<Int8Type>::new();
    let mut reason = StringDictionaryBuilder::<Int8Type>::new();
    let mut rules_version = StringDictionaryBuilder::<Int8Type>::new();
    let mut ip = String::new();
    for r in rows {
        log_pos.append_value(r.log_pos);
        collector_id.append_value(&r.collector_id);
        collector_seq.append_value(r.collector_seq);
        click_index.append_value(r.click_index);
        impression_id.append_value(&r.impression_id);
        ad.append_value(r.ad_id);
        advertiser.append_value(r.advertiser_id);
        campaign.append_value(r.campaign_id);
        for (b, v) in times.iter_mut().zip([
            r.token_expires_at_ms,
            r.event_time_ms,
            r.received_at_ms,
            r.occurred_at_ms,
            r.sent_at_ms,
        ]) {
            b.append_value(v);
        }
        country.append_value(&r.country);
        device.append_value(r.device);
        for (b, v) in strings.iter_mut().zip([&r.os, &r.site, &r.app, &r.user_id]) {
            b.append_value(v);
        }
        match r.client_ip {
            Some(a) => {
                use std::fmt::Write;
                ip.clear();
                let _ = write!(ip, "{a}");
                client_ip.append_value(&ip);
            }
            None => client_ip.append_null(),
        }
        skew.append_value(r.clock_skew_flagged);
        suspect.append_value(r.dedup_suspect);
        salt.append_value(r.salt);
        status.append_value(r.status.name());
        match r.status.reason() {
            Some(x) => reason.append_value(x),
            None => reason.append_null(),
        }
        match &r.rules_version {
            Some(v) => rules_version.append(v.as_ref()).map(|_| ())?,
            None => rules_version.append_null(),
        }
    }
    let [expires, event, received, occurred, sent] = times;
    let [os, site, app, user] = strings;
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(log_pos.finish()),
        Arc::new(collector_id.finish()),
        Arc::new(collector_seq.finish()),
        Arc::new(click_index.finish()),
        Arc::new(impression_id.finish()),
        Arc::new(ad.finish()),
        Arc::new(advertiser.finish()),
        Arc::new(campaign.finish()),
    ];
    for mut b in [expires, event, received, occurred, sent] {
        cols.push(Arc::new(b.finish()));
    }
    cols.push(Arc::new(country.finish()));
    cols.push(Arc::new(device.finish()));
    for mut b in [os, site, app, user] {
        cols.push(Arc::new(b.finish()));
    }
    cols.push(Arc::new(client_ip.finish()));
    cols.push(Arc::new(skew.finish()));
    cols.push(Arc::new(suspect.finish()));
    cols.push(Arc::new(salt.finish()));
    cols.push(Arc::new(status.finish()));
    cols.push(Arc::new(reason.finish()));
    cols.push(Arc::new(rules_version.finish()));
    RecordBatch::try_new(schema(), cols)
}

#[cfg(test)]
mod tests {
    /// Invalid-traffic codes read back, count as counted, and name their rule.
    #[test]
    fn invalid_traffic_statuses_round_trip() {
        for code in 16..=22u8 {
            let st = Status::from_code(code).unwrap();
            assert_eq!(st as u8, code);
            assert_eq!(st.name(), "invalid_traffic");
            assert!(st.counted());
            assert!(st.reason().is_some());
        }
        assert_eq!(Status::InvalidIpRate.reason(), Some("ip_rate"));
        for (st, code, reason) in [
            (Status::MovedHoneypot, 34, "honeypot"),
            (Status::MovedIpRate, 37, "ip_rate"),
            (Status::MovedUserRate, 38, "user_rate"),
        ] {
            assert_eq!(Status::from_code(code), Some(st));
            assert_eq!((st.name(), st.reason()), ("moved", Some(reason)));
            assert!(st.is_move() && !st.counted());
        }
        assert!(Status::from_code(23).is_none());
        assert!(!Status::Duplicate.counted());
    }

    use super::*;

    #[test]
    fn codes_round_trip_and_names_are_stable() {
        for code in 0..=6 {
            let s = Status::from_code(code).unwrap();
            assert_eq!(s as u8, code);
        }
        assert_eq!(Status::from_code(7), None);
        assert_eq!(Status::CountedLate.name(), "counted");
        assert_eq!(Status::OwnerMismatch.name(), "quarantined");
        assert_eq!(Status::Malformed.name(), "invalid");
        assert_eq!(Status::Duplicate.reason(), Some("duplicate_impression"));
    }
}
