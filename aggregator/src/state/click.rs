//! The domain form of a click as the aggregator's state sees it: borrowed from the bytes it
//! was decoded from (no allocation per click), ids as integers, strings not yet interned.
//! Produced at the edge (`crate::decode`) from `IngestBatch` bytes; the window operator
//! interns it into an [`super::shard::Applied`]. It must not know protobuf.

/// One click, borrowed from its batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClickIn<'a> {
    /// Impression id (16 bytes when valid; checked by the window operator).
    pub impression_id: &'a [u8],
    /// Ad.
    pub ad_id: u64,
    /// Advertiser.
    pub advertiser_id: u64,
    /// Campaign.
    pub campaign_id: u64,
    /// Token expiry (dedup keeps the id until then, plus skew).
    pub token_expires_at_ms: i64,
    /// Corrected event time.
    pub event_time_ms: i64,
    /// ISO 3166-1 alpha-2 country, or empty.
    pub country: &'a str,
    /// `adclick.v1.Device` value.
    pub device: i32,
    /// Operating system, or empty.
    pub os: &'a str,
    /// Site, or the app when the click came from an app (site empty).
    pub site: &'a str,
    /// User id, or empty.
    pub user_id: &'a [u8],
    /// Client IP as the collector saw it: 4 bytes (IPv4), 16 (IPv6), or empty (unknown).
    pub client_ip: &'a [u8],
    /// Collector clock when the click arrived (the invalid-traffic rules' `impossible_time`).
    pub received_at_ms: i64,
    /// Device clock when the click happened, as sent.
    pub occurred_at_ms: i64,
    /// Device clock when the batch was sent, as sent.
    pub sent_at_ms: i64,
    /// The collector found the device clock out of bounds (event time = received time).
    pub clock_skew_flagged: bool,
    /// The token's issued-at (0: a collector older than the field).
    pub token_issued_at_ms: i64,
    /// `adclick.v1.UserAgentClass` value as the collector classified the User-Agent.
    pub ua_class: i32,
}
