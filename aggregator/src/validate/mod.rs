//! Validation of query requests: every field of `GetAdClicks` and `TopAds` (the HTTP
//! mirror's parameters reach it as the same requests) is checked here before any state is
//! read, and every problem found is reported as a [`Violation`] naming its field. The
//! rules and limits are documented in `docs/api.md` ("Validation"); keep the two in step.
//!
//! Nothing is guessed: a value that cannot mean exactly one thing (`"US,DE"` as one
//! country, `DEVICE_UNSPECIFIED` as a device, ad id 0, a range reaching before what is
//! kept) is refused, never read as "no filter" or answered with partial counts.
//!
//! It must not read shard state, decide visibility (that is `query`), or know tonic or
//! HTTP: it gets the watermark and the clock as numbers, and the front ends turn
//! [`Violations`] into `google.rpc.BadRequest` details (`grpc`) or an RFC 9457 problem
//! (`http`).

mod iso3166;

use std::fmt;

use adclick_proto::countable::{MAX_EVENT_MS, MIN_EVENT_MS};
use adclick_proto::v1::{self, Device, Granularity, top_ads_request::Window};

use crate::config::{QueryConfig, WindowConfig};
// Bucket width per level (minute, hour, day): a constant of the state layout, not state.
use crate::state::shard::LEVEL_MS as WIDTH_MS;

pub use iso3166::EXTRA as EXTRA_COUNTRIES;

/// Largest `n` any TopAds request may ask for (`query.max_top_n` may lower it).
pub const MAX_TOP_N: u32 = 10_000;
/// Most values in one filter list (`filter.country`, `filter.os`, ...).
pub const MAX_FILTER_VALUES: usize = 64;
/// Longest os or site value, in bytes: what the SDK sends at most and the collector's
/// default `limits.max_string_len`, so every value a collector accepts by default can be
/// asked for.
pub const MAX_VALUE_LEN: usize = 256;
/// Most buckets one `GetAdClicks` answer may hold (minute granularity over 48 h is 2,880).
pub const MAX_BUCKETS: i64 = 10_000;
/// Violations reported per request; a request with more says how many it had.
pub const MAX_VIOLATIONS: usize = 20;
/// Longest value (in bytes, escaped) quoted back in a description.
pub const MAX_QUOTED: usize = 48;

const MINUTE_MS: i64 = WIDTH_MS[0];
const DAY_MS: i64 = WIDTH_MS[2];
const LEVEL_NAMES: [&str; 3] = ["minute", "hour", "day"];
/// Latest `to_ms`: a day-aligned range may end one day after the last countable time.
const MAX_TO_MS: i64 = MAX_EVENT_MS + DAY_MS;

/// A filter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// `filter.country`.
    Country,
    /// `filter.device`.
    Device,
    /// `filter.os`.
    Os,
    /// `filter.site`.
    Site,
    /// `filter.advertiser_id`.
    AdvertiserId,
    /// `filter.campaign_id`.
    CampaignId,
}

impl Dim {
    /// The proto field name.
    pub fn field_name(self) -> &'static str {
        match self {
            Dim::Country => "country",
            Dim::Device => "device",
            Dim::Os => "os",
            Dim::Site => "site",
            Dim::AdvertiserId => "advertiser_id",
            Dim::CampaignId => "campaign_id",
        }
    }
}

/// The request field a violation is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// `GetAdClicksRequest.ad_id`.
    AdId,
    /// `BatchGetAdClicksRequest.ad_ids` as a whole.
    AdIds,
    /// One value of `BatchGetAdClicksRequest.ad_ids`.
    AdIdsValue(usize),
    /// `fill_empty` (only the HTTP mirror can send a malformed one).
    FillEmpty,
    /// `BreakdownRequest.group_by`.
    GroupBy,
    /// `GetTotalsRequest.scope`.
    Scope,
    /// `GetTotalsRequest.id`.
    Id,
    /// `interval_ms` of a watch request.
    IntervalMs,
    /// `GetAdClicksRequest.from_ms`.
    FromMs,
    /// `GetAdClicksRequest.to_ms`.
    ToMs,
    /// `GetAdClicksRequest.granularity`.
    Granularity,
    /// `TopAdsRequest.n`.
    N,
    /// `TopAdsRequest.last_minutes`.
    LastMinutes,
    /// `TopAdsRequest.window` (the oneof, when neither member is set).
    Window,
    /// `TopAdsRequest.range.from_ms`.
    RangeFromMs,
    /// `TopAdsRequest.range.to_ms`.
    RangeToMs,
    /// A filter list as a whole (`filter.country`).
    Filter(Dim),
    /// One value of a filter list (`filter.country[1]`).
    FilterValue(Dim, usize),
    /// `filter.ip`.
    FilterIp,
    /// `filter.user_id`.
    FilterUserId,
    /// `traffic` (every query request).
    Traffic,
    /// An HTTP query parameter that maps to no request field (unknown, or repeated), by
    /// the name the client sent, cut to [`MAX_QUOTED`] bytes.
    Param(String),
}

/// The field path, as `google.rpc.BadRequest.FieldViolation.field` wants it: proto field
/// names joined by dots, list indexes in brackets (`filter.country[0]`).
impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::AdId => f.write_str("ad_id"),
            Field::AdIds => f.write_str("ad_ids"),
            Field::AdIdsValue(i) => write!(f, "ad_ids[{i}]"),
            Field::FillEmpty => f.write_str("fill_empty"),
            Field::Traffic => f.write_str("traffic"),
            Field::GroupBy => f.write_str("group_by"),
            Field::Scope => f.write_str("scope"),
            Field::Id => f.write_str("id"),
            Field::IntervalMs => f.write_str("interval_ms"),
            Field::FromMs => f.write_str("from_ms"),
            Field::ToMs => f.write_str("to_ms"),
            Field::Granularity => f.write_str("granularity"),
            Field::N => f.write_str("n"),
            Field::LastMinutes => f.write_str("last_minutes"),
            Field::Window => f.write_str("window"),
            Field::RangeFromMs => f.write_str("range.from_ms"),
            Field::RangeToMs => f.write_str("range.to_ms"),
            Field::Filter(d) => write!(f, "filter.{}", d.field_name()),
            Field::FilterValue(d, i) => write!(f, "filter.{}[{i}]", d.field_name()),
            Field::FilterIp => f.write_str("filter.ip"),
            Field::FilterUserId => f.write_str("filter.user_id"),
            Field::Param(p) => f.write_str(p),
        }
    }
}

/// Why a field is refused: a stable, machine-readable code (the `reason` of a
/// `FieldViolation`, the `code` of an HTTP invalid parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A required value is missing (or is the proto default, which cannot be told apart).
    Required,
    /// Not in the expected form (not a number, not two letters, a control character).
    Malformed,
    /// Well-formed but not one of the known values (an unassigned country, an unknown
    /// device or granularity).
    UnknownValue,
    /// A number outside its allowed range.
    OutOfRange,
    /// A string longer than allowed.
    TooLong,
    /// A list longer than allowed.
    TooManyValues,
    /// `from_ms` is not before `to_ms`.
    EmptyRange,
    /// The range is longer than `query.max_range_days`.
    RangeTooLong,
    /// The range starts before the oldest bucket kept at its granularity.
    BeforeRetention,
    /// The answer would hold more than [`MAX_BUCKETS`] buckets.
    TooManyBuckets,
    /// An HTTP query parameter the endpoint does not take.
    UnknownParameter,
    /// A single-valued HTTP query parameter given more than once.
    RepeatedParameter,
    /// Parameters that exclude each other given together.
    Conflict,
}

impl Reason {
    /// The code, in SCREAMING_SNAKE_CASE.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Required => "REQUIRED",
            Reason::Malformed => "MALFORMED",
            Reason::UnknownValue => "UNKNOWN_VALUE",
            Reason::OutOfRange => "OUT_OF_RANGE",
            Reason::TooLong => "TOO_LONG",
            Reason::TooManyValues => "TOO_MANY_VALUES",
            Reason::EmptyRange => "EMPTY_RANGE",
            Reason::RangeTooLong => "RANGE_TOO_LONG",
            Reason::BeforeRetention => "BEFORE_RETENTION",
            Reason::TooManyBuckets => "TOO_MANY_BUCKETS",
            Reason::UnknownParameter => "UNKNOWN_PARAMETER",
            Reason::RepeatedParameter => "REPEATED_PARAMETER",
            Reason::Conflict => "CONFLICT",
        }
    }

    /// The code in lower case, as a metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Required => "required",
            Reason::Malformed => "malformed",
            Reason::UnknownValue => "unknown_value",
            Reason::OutOfRange => "out_of_range",
            Reason::TooLong => "too_long",
            Reason::TooManyValues => "too_many_values",
            Reason::EmptyRange => "empty_range",
            Reason::RangeTooLong => "range_too_long",
            Reason::BeforeRetention => "before_retention",
            Reason::TooManyBuckets => "too_many_buckets",
            Reason::UnknownParameter => "unknown_parameter",
            Reason::RepeatedParameter => "repeated_parameter",
            Reason::Conflict => "conflict",
        }
    }
}

/// One refused field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which field.
    pub field: Field,
    /// Why, as a code.
    pub reason: Reason,
    /// Why, for a person: what was sent (quoted, bounded) and what would be accepted.
    pub description: String,
}

/// Every violation found in one request (the first [`MAX_VIOLATIONS`] of them, and how
/// many there were). Empty means valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    list: Vec<Violation>,
    total: usize,
}

impl Violations {
    /// Records a violation (kept if fewer than [`MAX_VIOLATIONS`] are held, counted always).
    pub fn push(&mut self, field: Field, reason: Reason, description: impl Into<String>) {
        self.total += 1;
        if self.list.len() < MAX_VIOLATIONS {
            self.list.push(Violation {
                field,
                reason,
                description: description.into(),
            });
        }
    }

    /// No violation found.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The violations kept.
    pub fn list(&self) -> &[Violation] {
        &self.list
    }

    /// How many violations were found (may exceed [`Violations::list`]'s length).
    pub fn total(&self) -> usize {
        self.total
    }

    /// The first violation's reason (the metrics label of a refused request).
    pub fn first_reason(&self) -> Option<Reason> {
        self.list.first().map(|v| v.reason)
    }

    /// Renames fields (the HTTP mirror reports a range given as `last_minutes` under that
    /// name).
    pub fn map_fields(mut self, f: impl Fn(Field) -> Field) -> Self {
        for v in &mut self.list {
            v.field = f(v.field.clone());
        }
        self
    }

    /// Adds every violation of `other` (within the cap; all counted).
    pub fn extend(&mut self, other: Violations) {
        let uncounted = other.total.saturating_sub(other.list.len());
        for v in other.list {
            self.push(v.field, v.reason, v.description);
        }
        self.total += uncounted;
    }

    /// `Ok(value)` when empty, else `Err(self)`.
    pub fn into_result<T>(self, value: T) -> Result<T, Violations> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// One line for a status message or a log: the first three violations, and how many more.
impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 3;
        f.write_str("invalid request: ")?;
        for (i, v) in self.list.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        if self.total > SHOWN {
            write!(f, " (and {} more)", self.total - SHOWN)?;
        }
        Ok(())
    }
}

/// A value as quoted in a description: escaped (`{:?}`), and cut to at most
/// [`MAX_QUOTED`] bytes.
pub fn quote(v: &str) -> String {
    let full = format!("{v:?}");
    if full.len() <= MAX_QUOTED {
        return full;
    }
    let mut end = MAX_QUOTED;
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &full[..end])
}

/// The limits a request is checked against, from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest TopAds `n` (`query.max_top_n`, at most [`MAX_TOP_N`]).
    pub max_top_n: u32,
    /// Longest range in days (`query.max_range_days`).
    pub max_range_days: i64,
    /// How many buckets of each level (minute, hour, day) are kept behind the watermark
    /// (`windows.retention_minutes`, `retention_hours`, `retention_days`).
    pub retention: [i64; 3],
    /// Minutes of the click index kept behind the watermark (`click_index.retention_minutes`):
    /// how far back a request filtered by `ip` or `user_id` may reach.
    pub click_index_minutes: i64,
    /// Epoch ms from which the click index is complete (`i64::MIN`: all it retains; later
    /// on a data dir counted before the index existed, `clickindex::complete_since`).
    pub click_index_since_ms: i64,
}

impl Limits {
    /// The limits of a configuration.
    pub fn new(query: &QueryConfig, windows: &WindowConfig) -> Self {
        Limits {
            max_top_n: query.max_top_n.min(MAX_TOP_N),
            max_range_days: query.max_range_days,
            retention: [
                windows.retention_minutes,
                windows.retention_hours,
                windows.retention_days,
            ],
            click_index_minutes: crate::config::ClickIndexConfig::default().retention_minutes,
            click_index_since_ms: i64::MIN,
        }
    }

    /// These limits with the click index complete only from `since_ms`.
    pub fn with_click_index_since(mut self, since_ms: i64) -> Self {
        self.click_index_since_ms = since_ms;
        self
    }

    /// These limits with the click index's retention (`click_index.retention_minutes`).
    pub fn with_click_index(mut self, minutes: i64) -> Self {
        self.click_index_minutes = minutes;
        self
    }

    /// Start of the oldest bucket of `level` still kept when the watermark is `wm`: what
    /// the engine's eviction keeps (`engine::evict_if_due`: buckets starting before
    /// `bucket(wm - retention)` are dropped). `None` before any click was counted (nothing
    /// was ever evicted) or when the retention reaches past the start of time.
    pub fn oldest_kept(&self, level: usize, wm: i64) -> Option<i64> {
        if wm == i64::MIN {
            return None;
        }
        let width = WIDTH_MS[level];
        let t = wm.checked_sub(self.retention[level].checked_mul(width)?)?;
        t.div_euclid(width).checked_mul(width)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(&QueryConfig::default(), &WindowConfig::default())
    }
}

/// The validated, normalised filter: countries upper-cased, devices as their wire values.
/// Empty lists do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterSpec<'a> {
    /// ISO 3166-1 alpha-2 codes, upper case.
    pub countries: Vec<[u8; 2]>,
    /// `adclick.v1.Device` values (never `DEVICE_UNSPECIFIED`).
    pub devices: Vec<u8>,
    /// Operating systems, as sent (matched exactly).
    pub os: &'a [String],
    /// Sites or app ids, as sent (matched exactly).
    pub sites: &'a [String],
    /// Advertiser ids (nonzero).
    pub advertisers: &'a [u64],
    /// Campaign ids (nonzero).
    pub campaigns: &'a [u64],
    /// Client IP range, inclusive, as click-index keys (one address: both ends equal).
    pub ip: Option<(crate::clickindex::Ip, crate::clickindex::Ip)>,
    /// Exact user id.
    pub user_id: Option<&'a str>,
}

impl FilterSpec<'_> {
    /// Whether the filter needs the click index (`ip` or `user_id`).
    pub fn uses_click_index(&self) -> bool {
        self.ip.is_some() || self.user_id.is_some()
    }
}

/// Narrowest prefix accepted in `filter.ip`, per family: a wider one would scan a large
/// share of all clicks (the cost of a prefix is the clicks of its addresses in the range).
pub const MIN_PREFIX_V4: u8 = 8;
/// See [`MIN_PREFIX_V4`].
pub const MIN_PREFIX_V6: u8 = 32;

/// `filter.ip`: one address or a CIDR prefix, as an inclusive range of click-index keys
/// (IPv4 as IPv4-mapped IPv6). Host bits set in a prefix (`203.0.113.7/24`) are refused,
/// since the caller may have meant the address.
pub fn ip_filter(
    v: &str,
) -> Result<(crate::clickindex::Ip, crate::clickindex::Ip), (Reason, String)> {
    use std::net::IpAddr;
    let key = |a: IpAddr| match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    if v.len() > 64 {
        return Err((
            Reason::TooLong,
            format!("{} bytes: an address or CIDR prefix is at most 64", v.len()),
        ));
    }
    if !v.contains('/') {
        return v.parse::<IpAddr>().map(|a| (key(a), key(a))).map_err(|_| {
            (
                Reason::Malformed,
                format!(
                    "{} is not an IP address or CIDR prefix (such as \"203.0.113.7\", \"203.0.113.0/24\" or \"2001:db8::/32\")",
                    quote(v)
                ),
            )
        });
    }
    let net: ipnet::IpNet = v.parse().map_err(|_| {
        (
            Reason::Malformed,
            format!(
                "{} is not a CIDR prefix (such as \"203.0.113.0/24\" or \"2001:db8::/32\")",
                quote(v)
            ),
        )
    })?;
    let min = match net {
        ipnet::IpNet::V4(_) => MIN_PREFIX_V4,
        ipnet::IpNet::V6(_) => MIN_PREFIX_V6,
    };
    if net.prefix_len() < min {
        return Err((
            Reason::OutOfRange,
            format!(
                "{}: prefixes shorter than /{min} are refused (each query scans every click of the prefix)",
                quote(v)
            ),
        ));
    }
    if net.network() != net.addr() {
        return Err((
            Reason::Malformed,
            format!(
                "{} has host bits set: give the network ({}/{})",
                quote(v),
                net.network(),
                net.prefix_len()
            ),
        ));
    }
    Ok((key(net.network()), key(net.broadcast())))
}

/// Longest `filter.user_id`, in bytes: the collector's default `limits.max_string_len`.
pub const MAX_USER_ID_LEN: usize = 256;

/// Checks that a range filtered by `ip` or `user_id` starts within the click index's
/// retention (`click_index.retention_minutes` behind the watermark).
pub fn click_index_range(
    spec: &FilterSpec<'_>,
    from_ms: i64,
    field: Field,
    limits: &Limits,
    watermark_ms: i64,
    bad: &mut Violations,
) {
    if !spec.uses_click_index() {
        return;
    }
    let by = if spec.ip.is_some() {
        "filter.ip"
    } else {
        "filter.user_id"
    };
    if from_ms < limits.click_index_since_ms {
        bad.push(
            field,
            Reason::BeforeRetention,
            format!(
                "the range starts at {from_ms}, before {}: the click index behind {by} was added to this aggregator's data dir then and holds no earlier clicks; use a later start",
                limits.click_index_since_ms
            ),
        );
        return;
    }
    if watermark_ms == i64::MIN {
        return;
    }
    let Some(oldest) = watermark_ms
        .checked_sub(limits.click_index_minutes.saturating_mul(MINUTE_MS))
        .map(|t| t.div_euclid(MINUTE_MS) * MINUTE_MS)
    else {
        return;
    };
    if from_ms < oldest {
        bad.push(
            field,
            Reason::BeforeRetention,
            format!(
                "the range starts at {from_ms}, before the oldest minute the click index behind {by} keeps ({oldest}: click_index.retention_minutes = {} behind the watermark); use a later start",
                limits.click_index_minutes
            ),
        );
    }
}

/// A valid `GetAdClicks` request, in the terms the query code uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdClicksPlan<'a> {
    /// Bucket level: 0 minute, 1 hour, 2 day.
    pub level: usize,
    /// `from_ms` rounded down to its bucket.
    pub from_ms: i64,
    /// `to_ms`.
    pub to_ms: i64,
    /// The filter.
    pub filter: FilterSpec<'a>,
}

/// Most ads in one `BatchGetAdClicks`.
pub const MAX_BATCH_ADS: usize = 100;

/// Checks `BatchGetAdClicksRequest.ad_ids`: 1 to [`MAX_BATCH_ADS`] distinct nonzero ids.
pub fn ad_ids(ids: &[u64]) -> Violations {
    let mut bad = Violations::default();
    if ids.is_empty() {
        bad.push(
            Field::AdIds,
            Reason::Required,
            "ad_ids is required: 1 to 100 ad ids",
        );
    } else if ids.len() > MAX_BATCH_ADS {
        bad.push(
            Field::AdIds,
            Reason::TooManyValues,
            format!("{} ad ids: at most {MAX_BATCH_ADS} per call", ids.len()),
        );
        return bad;
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        if id == 0 {
            bad.push(Field::AdIdsValue(i), Reason::Required, "ad ids are nonzero");
        } else if !seen.insert(id) {
            bad.push(
                Field::AdIdsValue(i),
                Reason::Conflict,
                format!("ad id {id} is listed twice"),
            );
        }
    }
    bad
}

/// Most values in one `Breakdown` answer.
pub const MAX_BREAKDOWN_N: u32 = 1000;

/// Checks the fields `Breakdown` adds to `GetAdClicks`'s (`group_by`, `n`).
pub fn breakdown(req: &v1::BreakdownRequest) -> Violations {
    let mut bad = Violations::default();
    match v1::Dimension::try_from(req.group_by) {
        Ok(v1::Dimension::Unspecified) => bad.push(
            Field::GroupBy,
            Reason::Required,
            "group_by is required: DIMENSION_COUNTRY, DIMENSION_DEVICE, DIMENSION_OS or DIMENSION_SITE",
        ),
        Ok(_) => {}
        Err(_) => bad.push(
            Field::GroupBy,
            Reason::UnknownValue,
            format!("unknown group_by {}", req.group_by),
        ),
    }
    if req.n == 0 || req.n > MAX_BREAKDOWN_N {
        bad.push(
            Field::N,
            Reason::OutOfRange,
            format!("n must be between 1 and {MAX_BREAKDOWN_N} (got {})", req.n),
        );
    }
    bad
}

/// Most buckets one `GetTotals` answer may hold: through the query front each bucket
/// carries a unique-user sketch of up to 12 KiB, so this bounds that answer (~12 MiB).
pub const MAX_TOTALS_BUCKETS: i64 = 1000;

/// Checks every field of a `GetTotals` request (all problems reported together): scope
/// and id here, the rest as `GetAdClicks`'s, within [`MAX_TOTALS_BUCKETS`].
pub fn totals<'a>(
    req: &'a v1::GetTotalsRequest,
    limits: &Limits,
    watermark_ms: i64,
) -> Result<AdClicksPlan<'a>, Violations> {
    let mut bad = Violations::default();
    match v1::TotalsScope::try_from(req.scope) {
        Ok(v1::TotalsScope::Unspecified) => bad.push(
            Field::Scope,
            Reason::Required,
            "scope is required: TOTALS_SCOPE_CAMPAIGN or TOTALS_SCOPE_ADVERTISER",
        ),
        Ok(_) => {}
        Err(_) => bad.push(
            Field::Scope,
            Reason::UnknownValue,
            format!("unknown scope {}", req.scope),
        ),
    }
    if req.id == 0 {
        bad.push(
            Field::Id,
            Reason::Required,
            "id is required: campaign and advertiser ids are nonzero",
        );
    }
    // The shared fields, checked with a stand-in ad id; the filter borrowed from `req`.
    let shared = v1::GetAdClicksRequest {
        ad_id: 1,
        from_ms: req.from_ms,
        to_ms: req.to_ms,
        granularity: req.granularity,
        filter: None,
        fill_empty: req.fill_empty,
        traffic: req.traffic,
    };
    let plan = match ad_clicks(&shared, limits, watermark_ms) {
        Ok(p) => Some((p.level, p.from_ms, p.to_ms)),
        Err(v) => {
            bad.extend(v);
            None
        }
    };
    let filter = filter(req.filter.as_ref(), &mut bad);
    let Some((level, from_ms, to_ms)) = plan else {
        return Err(bad);
    };
    let width = WIDTH_MS[level];
    let buckets = (to_ms - from_ms + width - 1) / width;
    if buckets > MAX_TOTALS_BUCKETS {
        bad.push(
            Field::Granularity,
            Reason::TooManyBuckets,
            format!(
                "{buckets} {} buckets from from_ms to to_ms: at most {MAX_TOTALS_BUCKETS} per totals answer; use a coarser granularity or a shorter range",
                LEVEL_NAMES[level]
            ),
        );
    }
    if bad.is_empty() {
        click_index_range(
            &filter,
            from_ms,
            Field::FromMs,
            limits,
            watermark_ms,
            &mut bad,
        );
    }
    bad.into_result(AdClicksPlan {
        level,
        from_ms,
        to_ms,
        filter,
    })
}

/// Checks every field of a `GetAdClicks` request; `watermark_ms` is the view's (what
/// retention is measured from).
pub fn ad_clicks<'a>(
    req: &'a v1::GetAdClicksRequest,
    limits: &Limits,
    watermark_ms: i64,
) -> Result<AdClicksPlan<'a>, Violations> {
    let mut bad = Violations::default();
    if req.ad_id == 0 {
        bad.push(
            Field::AdId,
            Reason::Required,
            "ad_id is required: ad ids are nonzero",
        );
    }
    let level = match Granularity::try_from(req.granularity) {
        Ok(Granularity::Unspecified | Granularity::Minute) => Some(0),
        Ok(Granularity::Hour) => Some(1),
        Ok(Granularity::Day) => Some(2),
        Err(_) => {
            bad.push(
                Field::Granularity,
                Reason::UnknownValue,
                format!(
                    "unknown granularity {}: use GRANULARITY_MINUTE, GRANULARITY_HOUR or GRANULARITY_DAY",
                    req.granularity
                ),
            );
            None
        }
    };
    let range = Range {
        from: req.from_ms,
        to: req.to_ms,
        from_field: Field::FromMs,
        to_field: Field::ToMs,
    };
    let (mut from_ms, to_ms) = (req.from_ms, req.to_ms);
    if range.check(level, limits, watermark_ms, &mut bad)
        && let Some(level) = level
    {
        let width = WIDTH_MS[level];
        from_ms = req.from_ms.div_euclid(width) * width;
        // Bounded above: the range is at most max_range_days long (checked) and both ends
        // are within [MIN_EVENT_MS, MAX_TO_MS], so no overflow.
        let buckets = (to_ms - from_ms + width - 1) / width;
        if buckets > MAX_BUCKETS {
            bad.push(
                Field::Granularity,
                Reason::TooManyBuckets,
                format!(
                    "{buckets} {} buckets from from_ms to to_ms: at most {MAX_BUCKETS} per answer; use a coarser granularity or a shorter range",
                    LEVEL_NAMES[level]
                ),
            );
        }
    }
    let filter = filter(req.filter.as_ref(), &mut bad);
    if bad.is_empty() {
        click_index_range(
            &filter,
            from_ms,
            Field::FromMs,
            limits,
            watermark_ms,
            &mut bad,
        );
    }
    bad.into_result(AdClicksPlan {
        level: level.unwrap_or(0),
        from_ms,
        to_ms,
        filter,
    })
}

/// The `[from, to)` range, in ms, a `TopAds` window asks for: `last_minutes` M is the
/// current (partial) minute plus the M-1 before it.
pub fn top_window(req: &v1::TopAdsRequest, now_ms: i64) -> Result<(i64, i64), Violations> {
    let mut bad = Violations::default();
    match &req.window {
        Some(Window::LastMinutes(0)) => bad.push(
            Field::LastMinutes,
            Reason::OutOfRange,
            "last_minutes must be at least 1",
        ),
        Some(Window::LastMinutes(m)) => {
            let to = now_ms.div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS;
            return Ok((to - i64::from(*m) * MINUTE_MS, to));
        }
        Some(Window::Range(r)) => return Ok((r.from_ms, r.to_ms)),
        None => bad.push(
            Field::Window,
            Reason::Required,
            "set either last_minutes or range {from_ms, to_ms}",
        ),
    }
    Err(bad)
}

/// Checks every field of a `TopAds` request. TopAds adds minute buckets, so its range must
/// lie within the minute retention.
pub fn top_ads(
    req: &v1::TopAdsRequest,
    limits: &Limits,
    watermark_ms: i64,
    now_ms: i64,
) -> Result<(), Violations> {
    let mut bad = Violations::default();
    if req.n == 0 || req.n > limits.max_top_n {
        bad.push(
            Field::N,
            Reason::OutOfRange,
            format!(
                "n must be between 1 and {} (got {})",
                limits.max_top_n, req.n
            ),
        );
    }
    match top_window(req, now_ms) {
        Ok((from, to)) => {
            let (from_field, to_field) = match req.window {
                Some(Window::Range(_)) => (Field::RangeFromMs, Field::RangeToMs),
                _ => (Field::LastMinutes, Field::LastMinutes),
            };
            let range = Range {
                from,
                to,
                from_field,
                to_field,
            };
            if range.check(Some(0), limits, watermark_ms, &mut bad) {
                let spec = filter(req.filter.as_ref(), &mut bad);
                if bad.is_empty() {
                    let field = range.from_field.clone();
                    click_index_range(&spec, from, field, limits, watermark_ms, &mut bad);
                }
                return bad.into_result(());
            }
        }
        Err(v) => {
            for v in v.list {
                bad.push(v.field, v.reason, v.description);
            }
        }
    }
    filter(req.filter.as_ref(), &mut bad);
    bad.into_result(())
}

/// A time range and the fields it came from.
struct Range {
    from: i64,
    to: i64,
    from_field: Field,
    to_field: Field,
}

impl Range {
    /// Bounds, order, length and retention (at `level`, when known). True when valid.
    fn check(
        &self,
        level: Option<usize>,
        limits: &Limits,
        watermark_ms: i64,
        bad: &mut Violations,
    ) -> bool {
        let before = bad.total();
        let (from, to) = (self.from, self.to);
        let seconds = |t: i64| {
            if (MIN_EVENT_MS / 1000..=MAX_EVENT_MS / 1000).contains(&t) {
                " (this looks like seconds: times are ms since the epoch)"
            } else {
                ""
            }
        };
        if !(MIN_EVENT_MS..=MAX_EVENT_MS).contains(&from) {
            bad.push(
                self.from_field.clone(),
                Reason::OutOfRange,
                format!(
                    "the range starts at {from}, outside {MIN_EVENT_MS}..={MAX_EVENT_MS} (ms since the epoch: 2000-01-01 to 2200-01-01 UTC){}",
                    seconds(from)
                ),
            );
        }
        if !(MIN_EVENT_MS..=MAX_TO_MS).contains(&to) {
            bad.push(
                self.to_field.clone(),
                Reason::OutOfRange,
                format!(
                    "the range ends at {to}, outside {MIN_EVENT_MS}..={MAX_TO_MS} (ms since the epoch){}",
                    seconds(to)
                ),
            );
        }
        if bad.total() > before {
            return false;
        }
        // Both ends are within bounds from here: no arithmetic below can overflow.
        if from >= to {
            bad.push(
                self.to_field.clone(),
                Reason::EmptyRange,
                format!("empty range: from_ms ({from}) must be before to_ms ({to})"),
            );
            return false;
        }
        let max_ms = limits.max_range_days.saturating_mul(DAY_MS);
        if to - from > max_ms {
            bad.push(
                self.to_field.clone(),
                Reason::RangeTooLong,
                format!(
                    "the range is {} ms long, longer than {} days (query.max_range_days)",
                    to - from,
                    limits.max_range_days
                ),
            );
            return false;
        }
        if let Some(level) = level
            && let Some(oldest) = limits.oldest_kept(level, watermark_ms)
            && from < oldest
        {
            let name = LEVEL_NAMES[level];
            let hint = match (&self.from_field, level) {
                (Field::FromMs, 0 | 1) => "; use a coarser granularity or a later start",
                (Field::FromMs, _) => "; use a later start",
                // TopAds always adds minute buckets.
                _ => "; TopAds adds minute buckets: use a later start",
            };
            bad.push(
                self.from_field.clone(),
                Reason::BeforeRetention,
                format!(
                    "the range starts at {from}, before the oldest {name} bucket kept ({oldest}: {} {name}s behind the watermark){hint}",
                    limits.retention[level]
                ),
            );
            return false;
        }
        true
    }
}

/// Checks and normalises a filter, adding what is wrong to `bad`. A list longer than
/// [`MAX_FILTER_VALUES`] is one violation (its values are not checked one by one).
pub fn filter<'a>(f: Option<&'a v1::Filter>, bad: &mut Violations) -> FilterSpec<'a> {
    let Some(f) = f else {
        return FilterSpec::default();
    };
    let mut spec = FilterSpec::default();
    if fits(Dim::Country, f.country.len(), bad) {
        for (i, c) in f.country.iter().enumerate() {
            match country(c) {
                Ok(code) => spec.countries.push(code),
                Err((reason, why)) => bad.push(Field::FilterValue(Dim::Country, i), reason, why),
            }
        }
    }
    if fits(Dim::Device, f.device.len(), bad) {
        for (i, d) in f.device.iter().enumerate() {
            match Device::try_from(*d) {
                Ok(Device::Unspecified) => bad.push(
                    Field::FilterValue(Dim::Device, i),
                    Reason::UnknownValue,
                    "DEVICE_UNSPECIFIED is not a device: leave the list empty to count every device",
                ),
                // Known values are 1..=4: the cast cannot truncate.
                Ok(d) => spec.devices.push(d as u8),
                Err(_) => bad.push(
                    Field::FilterValue(Dim::Device, i),
                    Reason::UnknownValue,
                    format!(
                        "unknown device {d}: use DEVICE_DESKTOP, DEVICE_MOBILE, DEVICE_TABLET or DEVICE_OTHER"
                    ),
                ),
            }
        }
    }
    for (dim, values) in [(Dim::Os, &f.os), (Dim::Site, &f.site)] {
        if fits(dim, values.len(), bad) {
            for (i, v) in values.iter().enumerate() {
                if let Err((reason, why)) = text(v) {
                    bad.push(Field::FilterValue(dim, i), reason, why);
                }
            }
        }
    }
    spec.os = &f.os;
    spec.sites = &f.site;
    for (dim, values) in [
        (Dim::AdvertiserId, &f.advertiser_id),
        (Dim::CampaignId, &f.campaign_id),
    ] {
        if fits(dim, values.len(), bad) {
            for (i, _) in values.iter().enumerate().filter(|(_, v)| **v == 0) {
                bad.push(
                    Field::FilterValue(dim, i),
                    Reason::OutOfRange,
                    format!("{} 0 is not an id: ids are nonzero", dim.field_name()),
                );
            }
        }
    }
    spec.advertisers = &f.advertiser_id;
    spec.campaigns = &f.campaign_id;
    if !f.ip.is_empty() {
        match ip_filter(&f.ip) {
            Ok(range) => spec.ip = Some(range),
            Err((reason, why)) => bad.push(Field::FilterIp, reason, why),
        }
    }
    if !f.user_id.is_empty() {
        if f.user_id.len() > MAX_USER_ID_LEN {
            bad.push(
                Field::FilterUserId,
                Reason::TooLong,
                format!(
                    "{} bytes, more than {MAX_USER_ID_LEN}: {}",
                    f.user_id.len(),
                    quote(&f.user_id)
                ),
            );
        } else {
            // Any bytes the collector accepts (it bounds only the length) can be asked for.
            spec.user_id = Some(&f.user_id);
        }
    }
    spec
}

fn fits(dim: Dim, len: usize, bad: &mut Violations) -> bool {
    if len > MAX_FILTER_VALUES {
        bad.push(
            Field::Filter(dim),
            Reason::TooManyValues,
            format!("{len} values: at most {MAX_FILTER_VALUES} per filter field"),
        );
        return false;
    }
    true
}

/// A country code, upper-cased, if it is an assigned ISO 3166-1 alpha-2 code (or one of
/// [`EXTRA_COUNTRIES`]).
pub fn country(c: &str) -> Result<[u8; 2], (Reason, String)> {
    let b = c.as_bytes();
    if b.is_empty() {
        return Err((
            Reason::Required,
            "empty country: give an ISO 3166-1 alpha-2 code such as \"US\"".into(),
        ));
    }
    if c.contains(',') {
        return Err((
            Reason::Malformed,
            format!(
                "{} is not one country code: give one value per country (over HTTP, repeat the parameter: country=US&country=DE)",
                quote(c)
            ),
        ));
    }
    let &[a, z] = b else {
        return Err((
            Reason::Malformed,
            format!(
                "{} is not an ISO 3166-1 alpha-2 code: two letters, such as \"US\"",
                quote(c)
            ),
        ));
    };
    if !(a.is_ascii_alphabetic() && z.is_ascii_alphabetic()) {
        return Err((
            Reason::Malformed,
            format!(
                "{} is not an ISO 3166-1 alpha-2 code: two letters, such as \"US\"",
                quote(c)
            ),
        ));
    }
    let code = [a.to_ascii_uppercase(), z.to_ascii_uppercase()];
    if !iso3166::is_known(code) {
        let hint = if code == *b"UK" {
            " (the United Kingdom is GB)"
        } else {
            ""
        };
        return Err((
            Reason::UnknownValue,
            format!(
                "{} is not an assigned ISO 3166-1 alpha-2 code{hint}",
                quote(c)
            ),
        ));
    }
    Ok(code)
}

/// An os or site value: 1 to [`MAX_VALUE_LEN`] bytes, no control characters.
fn text(v: &str) -> Result<(), (Reason, String)> {
    if v.is_empty() {
        return Err((
            Reason::Required,
            "empty value: leave the list empty to not filter on this field".into(),
        ));
    }
    if v.len() > MAX_VALUE_LEN {
        return Err((
            Reason::TooLong,
            format!("{} bytes, more than {MAX_VALUE_LEN}: {}", v.len(), quote(v)),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err((
            Reason::Malformed,
            format!("{} contains a control character", quote(v)),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
