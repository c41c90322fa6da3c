//! What the pipeline counts: the ONE rule, shared by the collector (which applies it at the
//! edge, before it acks a click) and the aggregator (which applies it in its window
//! operator). Keeping it here, in the contract, is what makes "acked by a collector" imply
//! "counted by the aggregator, or a duplicate".
//!
//! A click is countable when
//! 1. its token lives at most [`MAX_TOKEN_LIFETIME_MS`] (issue to expiry) — checked where the
//!    token is decoded (the collector; the aggregator never sees `issued_at`);
//! 2. its corrected event time lies in [[`MIN_EVENT_MS`], [`MAX_EVENT_MS`]] (far from any
//!    i64 overflow in bucket arithmetic) and inside its token's lifetime, allowing
//!    [`MAX_SKEW_MS`] of clock difference either side:
//!    `expires - MAX_TOKEN_LIFETIME_MS - MAX_SKEW_MS <= event <= expires + MAX_SKEW_MS`;
//! 3. it is not older than the oldest time still counted: at the collector
//!    `now - max_click_age_ms`, at the aggregator `watermark - retention`. The collector's
//!    `max_click_age_ms` (at most [`MAX_CLICK_AGE_MS`]) must stay below the aggregators'
//!    `windows.retention_minutes`; the defaults leave one hour for spool and network delay.
//!
//! Pure functions of their arguments: no clock is read (`now_ms` is passed in), no I/O.

/// One day in ms.
pub const DAY_MS: i64 = 86_400_000;
/// One hour in ms.
pub const HOUR_MS: i64 = 3_600_000;
/// Longest token lifetime (issue to expiry) the pipeline counts. The SDK signer and
/// `adclick impression mint` refuse longer lifetimes; collectors reject clicks on longer
/// tokens (`token_lifetime_too_long`).
pub const MAX_TOKEN_LIFETIME_MS: i64 = 30 * DAY_MS;
/// Largest clock difference any component may allow on a token's issue and expiry times
/// (the collector's `tokens.skew_ms` must not exceed it).
pub const MAX_SKEW_MS: i64 = 5 * 60_000;
/// Earliest event time counted (2000-01-01 UTC).
pub const MIN_EVENT_MS: i64 = 946_684_800_000;
/// Latest event time counted (2200-01-01 UTC).
pub const MAX_EVENT_MS: i64 = 7_258_118_400_000;
/// Largest `tokens.max_click_age_ms` a collector may use; the aggregators' default minute
/// retention (48 h) is one hour above it.
pub const MAX_CLICK_AGE_MS: i64 = 47 * HOUR_MS;

/// Why a click is not countable. [`NotCountable::reason`] is the stable label collectors
/// put in `ClickBatchResult.rejected` and both sides use in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotCountable {
    /// The token lives longer than [`MAX_TOKEN_LIFETIME_MS`].
    #[error(
        "token lifetime {lifetime_ms} ms exceeds the maximum of {MAX_TOKEN_LIFETIME_MS} ms (30 days)"
    )]
    TokenLifetime {
        /// `expires_at - issued_at`.
        lifetime_ms: i64,
    },
    /// The event time is outside [`MIN_EVENT_MS`, `MAX_EVENT_MS`] or outside the token's
    /// lifetime (plus skew).
    #[error(
        "event time {event_time_ms} ms is implausible for a token expiring at {expires_at_ms} ms"
    )]
    EventTime {
        /// Corrected event time.
        event_time_ms: i64,
        /// The token's expiry.
        expires_at_ms: i64,
    },
    /// Older than the oldest time still counted.
    #[error("event time {event_time_ms} ms is older than the oldest counted time {oldest_ms} ms")]
    TooOld {
        /// Corrected event time.
        event_time_ms: i64,
        /// Oldest event time still counted.
        oldest_ms: i64,
    },
}

impl NotCountable {
    /// Stable, low-cardinality label.
    pub fn reason(&self) -> &'static str {
        match self {
            NotCountable::TokenLifetime { .. } => "token_lifetime_too_long",
            NotCountable::EventTime { .. } => "event_time_out_of_range",
            NotCountable::TooOld { .. } => "too_old",
        }
    }
}

/// Rule 1: the token's lifetime is at most [`MAX_TOKEN_LIFETIME_MS`].
pub fn check_token_lifetime(issued_at_ms: i64, expires_at_ms: i64) -> Result<(), NotCountable> {
    let lifetime_ms = expires_at_ms.saturating_sub(issued_at_ms);
    if lifetime_ms > MAX_TOKEN_LIFETIME_MS {
        return Err(NotCountable::TokenLifetime { lifetime_ms });
    }
    Ok(())
}

/// Rule 2: the event time is plausible on its own and for its token's expiry.
pub fn check_event_time(event_time_ms: i64, expires_at_ms: i64) -> Result<(), NotCountable> {
    let ok = (MIN_EVENT_MS..=MAX_EVENT_MS).contains(&event_time_ms)
        && event_time_ms <= expires_at_ms.saturating_add(MAX_SKEW_MS)
        && event_time_ms
            >= expires_at_ms.saturating_sub(MAX_TOKEN_LIFETIME_MS.saturating_add(MAX_SKEW_MS));
    if !ok {
        return Err(NotCountable::EventTime {
            event_time_ms,
            expires_at_ms,
        });
    }
    Ok(())
}

/// Rule 3: the event time is at or after `oldest_ms`.
pub fn check_age(event_time_ms: i64, oldest_ms: i64) -> Result<(), NotCountable> {
    if event_time_ms < oldest_ms {
        return Err(NotCountable::TooOld {
            event_time_ms,
            oldest_ms,
        });
    }
    Ok(())
}

/// The whole rule as a collector applies it before acking: rules 1 to 3 with the oldest
/// counted time `now_ms - max_click_age_ms` (`max_click_age_ms` is capped at
/// [`MAX_CLICK_AGE_MS`]).
pub fn check_at_edge(
    issued_at_ms: i64,
    expires_at_ms: i64,
    event_time_ms: i64,
    now_ms: i64,
    max_click_age_ms: i64,
) -> Result<(), NotCountable> {
    check_token_lifetime(issued_at_ms, expires_at_ms)?;
    check_event_time(event_time_ms, expires_at_ms)?;
    check_age(
        event_time_ms,
        now_ms.saturating_sub(max_click_age_ms.clamp(0, MAX_CLICK_AGE_MS)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn ten_year_tokens_and_absurd_times_are_not_countable() {
        let ten_years = 3650 * DAY_MS;
        assert_eq!(
            check_at_edge(NOW, NOW + ten_years, NOW, NOW, MAX_CLICK_AGE_MS)
                .unwrap_err()
                .reason(),
            "token_lifetime_too_long"
        );
        assert!(check_at_edge(NOW, NOW + 30 * DAY_MS, NOW, NOW, MAX_CLICK_AGE_MS).is_ok());
        assert_eq!(
            check_event_time(MAX_EVENT_MS + 1, MAX_EVENT_MS + 2)
                .unwrap_err()
                .reason(),
            "event_time_out_of_range"
        );
        assert_eq!(
            check_event_time(NOW + MAX_SKEW_MS + 1, NOW)
                .unwrap_err()
                .reason(),
            "event_time_out_of_range"
        );
        assert!(check_event_time(NOW + MAX_SKEW_MS, NOW).is_ok());
        assert_eq!(
            check_at_edge(NOW - HOUR_MS, NOW, NOW - 2 * HOUR_MS, NOW, HOUR_MS)
                .unwrap_err()
                .reason(),
            "too_old"
        );
        // Saturating arithmetic at the extremes: no panic, not countable.
        assert!(check_at_edge(i64::MIN, i64::MAX, i64::MAX, i64::MIN, i64::MAX).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Anything that passes the edge rule passes the aggregator's part of it (rule 2 and
        /// rule 3 with any oldest time at or before the edge's): the edge is never laxer.
        #[test]
        fn edge_implies_aggregator(
            issued in any::<i64>(),
            life in any::<i64>(),
            event in any::<i64>(),
            now in any::<i64>(),
            age in any::<i64>(),
            slack in 0i64..DAY_MS,
        ) {
            let expires = issued.saturating_add(life);
            if check_at_edge(issued, expires, event, now, age).is_ok() {
                prop_assert!(expires - issued <= MAX_TOKEN_LIFETIME_MS);
                prop_assert!(check_event_time(event, expires).is_ok());
                let oldest = now.saturating_sub(age.clamp(0, MAX_CLICK_AGE_MS));
                prop_assert!(check_age(event, oldest.saturating_sub(slack)).is_ok());
            }
        }
    }
}
