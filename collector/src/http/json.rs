//! The JSON form of `ClickBatch` and `ClickBatchResult`, for curl users and debugging.
//! Converted to the protobuf types here, at the edge; nothing behind it sees JSON.
//!
//! ```json
//! {"sent_at_ms": 1700000000000,
//!  "clicks": [{"token": "AQoQ...", "occurred_at_ms": 1700000000000, "country": "US",
//!              "device": "mobile", "os": "ios", "site": "news.example", "user_id": "u1"}]}
//! ```
//! Timestamps may be omitted: a click without `occurred_at_ms` happened when it arrived.
//!
//! The click count is bounded while parsing: the parser stops at the first click past
//! `limits.max_clicks_per_batch`, so a body of a million `{}`s never becomes a million
//! structs.

use std::cell::Cell;

use adclick_proto::v1;
use serde::Deserialize;
use serde::de::{Deserializer, SeqAccess, Visitor};

use super::decode::BatchDecodeError;

thread_local! {
    /// The click limit of the parse running on this thread (the parse is synchronous, so
    /// a thread-local is how a derived `Deserialize` gets a runtime bound).
    static MAX_CLICKS: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Set when the bound stopped the parse.
    static EXCEEDED: Cell<bool> = const { Cell::new(false) };
}

fn bounded_clicks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ClickJson>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<ClickJson>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of clicks")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let max = MAX_CLICKS.with(Cell::get);
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(max).min(64));
            while let Some(c) = seq.next_element::<ClickJson>()? {
                if out.len() == max {
                    EXCEEDED.with(|e| e.set(true));
                    return Err(serde::de::Error::custom("too many clicks"));
                }
                out.push(c);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchJson {
    #[serde(default)]
    sdk_name: String,
    #[serde(default)]
    sdk_version: String,
    #[serde(default)]
    sent_at_ms: Option<i64>,
    #[serde(deserialize_with = "bounded_clicks")]
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

/// Parses a JSON batch of at most `max_clicks` clicks. Missing timestamps default to
/// `received_at_ms` (a click "now").
pub fn parse_batch(
    body: &[u8],
    received_at_ms: i64,
    max_clicks: usize,
) -> Result<v1::ClickBatch, BatchDecodeError> {
    MAX_CLICKS.with(|m| m.set(max_clicks));
    EXCEEDED.with(|e| e.set(false));
    let parsed = serde_json::from_slice::<BatchJson>(body);
    MAX_CLICKS.with(|m| m.set(usize::MAX));
    let b = match parsed {
        Ok(b) => b,
        Err(_) if EXCEEDED.with(Cell::get) => {
            return Err(BatchDecodeError::TooManyClicks {
                max: max_clicks,
                found: max_clicks.saturating_add(1),
            });
        }
        Err(e) => {
            return Err(BatchDecodeError::Malformed(format!(
                "invalid JSON batch: {e}"
            )));
        }
    };
    let batch_sent = b.sent_at_ms;
    let mut clicks = Vec::with_capacity(b.clicks.len());
    for (i, c) in b.clicks.into_iter().enumerate() {
        let device = device(&c.device)
            .map_err(|e| BatchDecodeError::Malformed(format!("clicks[{i}]: {e}")))?;
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

/// One line of a `[[source.file]]` log: the fields of a JSON click (the same names and
/// rules as a click of a JSON batch) plus the visitor's `client_ip` and `user_agent`, which
/// the ad server knows and a log line cannot take from a connection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineJson {
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
    #[serde(default)]
    client_ip: Option<String>,
    #[serde(default)]
    user_agent: Option<String>,
}

/// A parsed `[[source.file]]` line: the click and what the ad server saw of its visitor.
#[derive(Debug)]
pub struct Line {
    /// The click.
    pub click: v1::Click,
    /// The visitor's address, when the line names one.
    pub client_ip: Option<std::net::IpAddr>,
    /// The visitor's User-Agent header, when the line carries one (classified like an
    /// HTTP request's).
    pub user_agent: Option<String>,
}

/// Parses one log line into a click, its client IP and User-Agent. Times: a line without
/// `occurred_at_ms` happened when it was read; one without `sent_at_ms` is taken as sent
/// when it was read (the ad server's clock wrote it, so its `occurred_at_ms` stands as the
/// event time, however late the line is read), unlike a device's batch.
pub fn parse_line(line: &[u8], read_at_ms: i64) -> Result<Line, crate::filesource::LineOutcome> {
    use crate::filesource::LineOutcome;
    let c: LineJson = serde_json::from_slice(line).map_err(|_| LineOutcome::InvalidJson)?;
    let device = device(&c.device).map_err(|_| LineOutcome::InvalidField)?;
    let ip = match c.client_ip.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<std::net::IpAddr>()
                .map_err(|_| LineOutcome::InvalidField)?,
        ),
    };
    let occurred = c.occurred_at_ms.unwrap_or(read_at_ms);
    let sent = c.sent_at_ms.unwrap_or(read_at_ms);
    Ok(Line {
        click: v1::Click {
            token: c.token,
            occurred_at_ms: occurred,
            sent_at_ms: sent,
            country: c.country.to_ascii_uppercase(),
            device: device as i32,
            os: c.os,
            site: c.site,
            app: c.app,
            user_id: c.user_id,
        },
        client_ip: ip,
        user_agent: c.user_agent,
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
    use proptest::prelude::*;

    fn msg(e: BatchDecodeError) -> String {
        match e {
            BatchDecodeError::Malformed(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_with_defaults_and_names_errors() {
        let b = parse_batch(
            br#"{"clicks":[{"token":"t","device":"Mobile","country":"us"}]}"#,
            77,
            10,
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
            10,
        )
        .unwrap();
        assert_eq!(
            (b.clicks[0].occurred_at_ms, b.clicks[0].sent_at_ms),
            (5, 10)
        );
        let e = msg(
            parse_batch(br#"{"clicks":[{"token":"t","device":"toaster"}]}"#, 0, 10).unwrap_err(),
        );
        assert!(e.contains("clicks[0]: unknown device"), "{e}");
        let e = msg(parse_batch(br#"{"clicks":[{"tokn":"t"}]}"#, 0, 10).unwrap_err());
        assert!(e.starts_with("invalid JSON batch"), "{e}");
    }

    #[test]
    fn the_click_limit_holds_while_parsing() {
        let body = format!(
            r#"{{"clicks":[{}]}}"#,
            vec![r#"{"token":""}"#; 1001].join(",")
        );
        assert_eq!(
            parse_batch(body.as_bytes(), 0, 1000),
            Err(BatchDecodeError::TooManyClicks {
                max: 1000,
                found: 1001
            })
        );
        assert_eq!(
            parse_batch(body.as_bytes(), 0, 1001).unwrap().clicks.len(),
            1001
        );
        // The bound does not leak into the next parse on this thread.
        let one = br#"{"clicks":[{"token":"a"},{"token":"b"}]}"#;
        assert_eq!(parse_batch(one, 0, 2).unwrap().clicks.len(), 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(b) = parse_batch(&body, 0, 3) {
                prop_assert!(b.clicks.len() <= 3);
            }
        }

        /// Mutated valid batches never panic and never exceed the limit.
        #[test]
        fn mutated_batches_are_bounded(
            n in 0usize..12,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let clicks = vec![r#"{"token":"t","device":"mobile","occurred_at_ms":5}"#; n].join(",");
            let mut body = format!(r#"{{"sent_at_ms":1,"clicks":[{clicks}]}}"#).into_bytes();
            for (i, b) in &flips {
                let i = i.index(body.len());
                body[i] ^= *b;
            }
            body.truncate(cut.index(body.len() + 1));
            let max = 8;
            match parse_batch(&body, 0, max) {
                Ok(b) => prop_assert!(b.clicks.len() <= max),
                Err(BatchDecodeError::TooManyClicks { .. }) => prop_assert!(n > max),
                Err(BatchDecodeError::Malformed(_)) => {}
            }
        }
    }
}
