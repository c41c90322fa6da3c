//! Click building: the public [`Dimensions`] and [`Device`] types, input validation, and
//! the encoding of a batch into the `ClickBatch` wire message. Knows nothing of sending.

use adclick_proto::token::MAX_TOKEN_TEXT_LEN;
use adclick_proto::v1;
use prost::Message;

/// Longest accepted value of a string dimension (bytes). The collector enforces its own
/// (configurable) limits too.
pub const MAX_DIMENSION_LEN: usize = 256;

/// Device class of the clicking device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Desktop or laptop.
    Desktop,
    /// Phone.
    Mobile,
    /// Tablet.
    Tablet,
    /// Anything else (TV, console, ...).
    Other,
}

impl Device {
    fn to_wire(self) -> v1::Device {
        match self {
            Device::Desktop => v1::Device::Desktop,
            Device::Mobile => v1::Device::Mobile,
            Device::Tablet => v1::Device::Tablet,
            Device::Other => v1::Device::Other,
        }
    }
}

/// Optional dimensions of a click; unset means unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dimensions {
    /// ISO-3166 alpha-2 country code ("US"); normalised to upper case.
    pub country: Option<String>,
    /// Device class.
    pub device: Option<Device>,
    /// Operating system ("ios", "android", ...).
    pub os: Option<String>,
    /// Publisher site (host name).
    pub site: Option<String>,
    /// Publisher app id (bundle / package id).
    pub app: Option<String>,
    /// Opaque user id, for unique-user counts.
    pub user_id: Option<String>,
}

impl Dimensions {
    /// No dimensions.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the country (ISO-3166 alpha-2).
    pub fn country(mut self, v: impl Into<String>) -> Self {
        self.country = Some(v.into());
        self
    }
    /// Sets the device class.
    pub fn device(mut self, v: Device) -> Self {
        self.device = Some(v);
        self
    }
    /// Sets the operating system.
    pub fn os(mut self, v: impl Into<String>) -> Self {
        self.os = Some(v.into());
        self
    }
    /// Sets the publisher site.
    pub fn site(mut self, v: impl Into<String>) -> Self {
        self.site = Some(v.into());
        self
    }
    /// Sets the publisher app id.
    pub fn app(mut self, v: impl Into<String>) -> Self {
        self.app = Some(v.into());
        self
    }
    /// Sets the opaque user id.
    pub fn user_id(mut self, v: impl Into<String>) -> Self {
        self.user_id = Some(v.into());
        self
    }
}

/// Why `click()` refused a click. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClickError {
    /// The token is empty or longer than the contract allows.
    #[error("invalid token: must be 1 to {MAX_TOKEN_TEXT_LEN} characters of URL-safe base64")]
    InvalidToken,
    /// A dimension is malformed.
    #[error("invalid dimension `{field}`: {why}")]
    InvalidDimension {
        /// Which dimension.
        field: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// The queue is full and the overflow policy is `DropNewest`.
    #[error("queue full: click dropped (overflow policy drop-newest)")]
    QueueFull,
    /// The tracker was shut down.
    #[error("tracker is shut down")]
    Closed,
}

/// Validates and converts a click into its wire form (`sent_at_ms` left 0 until sending).
pub fn build_click(
    token: &str,
    dims: Dimensions,
    occurred_at_ms: i64,
) -> Result<v1::Click, ClickError> {
    let token_ok = !token.is_empty()
        && token.len() <= MAX_TOKEN_TEXT_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !token_ok {
        return Err(ClickError::InvalidToken);
    }
    fn text(field: &'static str, v: Option<String>) -> Result<String, ClickError> {
        let v = v.unwrap_or_default();
        if v.len() > MAX_DIMENSION_LEN {
            return Err(ClickError::InvalidDimension {
                field,
                why: "longer than 256 bytes",
            });
        }
        Ok(v)
    }
    let country = match dims.country {
        None => String::new(),
        Some(c) if c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            c.to_ascii_uppercase()
        }
        Some(_) => {
            return Err(ClickError::InvalidDimension {
                field: "country",
                why: "must be an ISO-3166 alpha-2 code such as \"US\"",
            });
        }
    };
    Ok(v1::Click {
        token: token.to_string(),
        occurred_at_ms,
        sent_at_ms: 0,
        country,
        device: dims.device.map_or(v1::Device::Unspecified, Device::to_wire) as i32,
        os: text("os", dims.os)?,
        site: text("site", dims.site)?,
        app: text("app", dims.app)?,
        user_id: text("user_id", dims.user_id)?,
    })
}

/// Encodes clicks as a `ClickBatch`, stamping `sent_at_ms` on the batch and every click.
/// Called at each send attempt so that `sent_at` is the actual send time.
pub fn encode_batch<'a>(
    clicks: impl IntoIterator<Item = &'a v1::Click>,
    sent_at_ms: i64,
    sdk_name: &str,
    sdk_version: &str,
) -> Vec<u8> {
    let batch = v1::ClickBatch {
        sdk_name: sdk_name.to_string(),
        sdk_version: sdk_version.to_string(),
        sent_at_ms,
        clicks: clicks
            .into_iter()
            .map(|c| v1::Click {
                sent_at_ms,
                ..c.clone()
            })
            .collect(),
    };
    batch.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_and_normalises() {
        let c = build_click("abc_-9", Dimensions::new().country("us").os("ios"), 5).unwrap();
        assert_eq!(
            (c.country.as_str(), c.os.as_str(), c.occurred_at_ms),
            ("US", "ios", 5)
        );
        assert_eq!(
            build_click("", Dimensions::new(), 0),
            Err(ClickError::InvalidToken)
        );
        assert_eq!(
            build_click("a b", Dimensions::new(), 0),
            Err(ClickError::InvalidToken)
        );
        assert!(matches!(
            build_click("t", Dimensions::new().country("USA"), 0),
            Err(ClickError::InvalidDimension {
                field: "country",
                ..
            })
        ));
        assert!(matches!(
            build_click("t", Dimensions::new().site("x".repeat(257)), 0),
            Err(ClickError::InvalidDimension { field: "site", .. })
        ));
    }

    #[test]
    fn encode_stamps_sent_at_everywhere() {
        let a = build_click("a", Dimensions::new(), 1).unwrap();
        let b = build_click("b", Dimensions::new(), 2).unwrap();
        let bytes = encode_batch([&a, &b], 99, "n", "v");
        let batch = v1::ClickBatch::decode(bytes.as_slice()).unwrap();
        assert_eq!(batch.sent_at_ms, 99);
        assert!(batch.clicks.iter().all(|c| c.sent_at_ms == 99));
        assert_eq!(batch.clicks[1].occurred_at_ms, 2);
    }
}
