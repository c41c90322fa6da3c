//! The JSON form of `ClickBatch` and `ClickBatchResult`, for curl users and debugging.
//! Converted to the protobuf types here, at the edge; nothing behind it sees JSON.
//!
//! ```json
//! {"sent_at_ms": 1700000000000,
//!  "clicks": [{"token": "AQoQ...", "occurred_at_ms": 1700000000000, "country": "US",
//!              "device": "mobile", "os": "ios", "site": "news.example", "user_id": "u1"}]}
//! ```
//! Timestamps may be omitted: a click without `occurred_at_ms` happened when it arrived.

use adclick_proto::v1;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchJson {
    #[serde(default)]
    sdk_name: String,
    #[serde(default)]
    sdk_version: String,
    #[serde(default)]
    sent_at_ms: Option<i64>,
    clicks: Vec<ClickJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClickJson {
    token: String,
    #[serde(default)]
    occurred_at_ms: Option<i64>,
    #[serde(default)]
    sent_at_ms: Option<i64>,
    #[serde(default)]
    country: String,
    #[serde(default)]
    device: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    site: String,
    #[serde(default)]
    app: String,
    #[serde(default)]
    user_id: String,
}

fn device(s: &str) -> Result<v1::Device, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "" => v1::Device::Unspecified,
        "desktop" => v1::Device::Desktop,
        "mobile" => v1::Device::Mobile,
        "tablet" => v1::Device::Tablet,
        "other" => v1::Device::Other,
        _ => {
            return Err(format!(
                "unknown device {s:?}: use desktop, mobile, tablet or other"
            ));
        }
    })
}

/// Parses a JSON batch. Missing timestamps default to `received_at_ms` (a click "now").
pub fn parse_batch(body: &[u8], received_at_ms: i64) -> Result<v1::ClickBatch, String> {
    let b: BatchJson =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON batch: {e}"))?;
    let batch_sent = b.sent_at_ms;
    let mut clicks = Vec::with_capacity(b.clicks.len());
    for (i, c) in b.clicks.into_iter().enumerate() {
        let device = device(&c.device).map_err(|e| format!("clicks[{i}]: {e}"))?;
        let sent = c.sent_at_ms.or(batch_sent);
        let (occurred, sent) = match (c.occurred_at_ms, sent) {
            (Some(o), Some(s)) => (o, s),
            // Without a device send time there is nothing to correct against.
            (Some(o), None) => (o, o),
            (None, _) => (received_at_ms, received_at_ms),
        };
        clicks.push(v1::Click {
            token: c.token,
            occurred_at_ms: occurred,
            sent_at_ms: sent,
            country: c.country.to_ascii_uppercase(),
            device: device as i32,
            os: c.os,
            site: c.site,
            app: c.app,
            user_id: c.user_id,
        });
    }
    Ok(v1::ClickBatch {
        sdk_name: b.sdk_name,
        sdk_version: b.sdk_version,
        sent_at_ms: batch_sent.unwrap_or(received_at_ms),
        clicks,
    })
}

/// Renders a batch result as JSON.
pub fn render_result(r: &v1::ClickBatchResult) -> String {
    let mut rejected: Vec<_> = r.rejected.iter().collect();
    rejected.sort();
    let rejected: serde_json::Map<String, serde_json::Value> = rejected
        .into_iter()
        .map(|(k, v)| (k.clone(), (*v).into()))
        .collect();
    serde_json::json!({ "accepted": r.accepted, "duplicate": r.duplicate, "rejected": rejected })
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_names_errors() {
        let b = parse_batch(
            br#"{"clicks":[{"token":"t","device":"Mobile","country":"us"}]}"#,
            77,
        )
        .unwrap();
        let c = &b.clicks[0];
        assert_eq!(
            (c.occurred_at_ms, c.sent_at_ms, c.device, c.country.as_str()),
            (77, 77, 2, "US")
        );
        let b = parse_batch(
            br#"{"sent_at_ms":10,"clicks":[{"token":"t","occurred_at_ms":5}]}"#,
            77,
        )
        .unwrap();
        assert_eq!(
            (b.clicks[0].occurred_at_ms, b.clicks[0].sent_at_ms),
            (5, 10)
        );
        let e = parse_batch(br#"{"clicks":[{"token":"t","device":"toaster"}]}"#, 0).unwrap_err();
        assert!(e.contains("clicks[0]: unknown device"), "{e}");
        let e = parse_batch(br#"{"clicks":[{"tokn":"t"}]}"#, 0).unwrap_err();
        assert!(e.starts_with("invalid JSON batch"), "{e}");
    }
}
