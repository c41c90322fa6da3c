//! Clock correction: turns a device-clock `occurred_at` into collector time using the
//! batch's `sent_at` and the collector's `received_at`. Pure arithmetic, no clocks read.
//!
//! corrected = occurred_at + (received_at - sent_at), clamped to
//! [token.issued_at, received_at]. With a device clock offset d and network transit t,
//! occurred_at = T + d and sent_at = S + d, received_at = S + t, so corrected = T + t: the
//! error is exactly the transit time of the sending request, always >= 0.

/// A corrected event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrected {
    /// Event time on the collector's clock.
    pub event_time_ms: i64,
    /// The device clock was beyond the bound (or `sent_at` missing): `received_at` used.
    pub skew_flagged: bool,
}

/// Corrects one click. `max_skew_ms` bounds |received_at - sent_at|.
pub fn correct(
    occurred_at_ms: i64,
    sent_at_ms: i64,
    received_at_ms: i64,
    issued_at_ms: i64,
    max_skew_ms: i64,
) -> Corrected {
    let offset = received_at_ms.saturating_sub(sent_at_ms);
    if sent_at_ms <= 0 || offset.saturating_abs() > max_skew_ms {
        return Corrected {
            event_time_ms: received_at_ms,
            skew_flagged: true,
        };
    }
    let raw = occurred_at_ms.saturating_add(offset);
    // A token issued "in the future" (within the verifier's skew) must not push the lower
    // bound above the upper one.
    let lo = issued_at_ms.min(received_at_ms);
    Corrected {
        event_time_ms: raw.clamp(lo, received_at_ms),
        skew_flagged: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn examples() {
        // Device 10 min fast, click 3 s before send, 40 ms transit.
        let d = 600_000;
        let c = correct(1_000_000 + d, 1_003_000 + d, 1_003_040, 0, DAY);
        assert_eq!(
            c,
            Corrected {
                event_time_ms: 1_000_040,
                skew_flagged: false
            }
        );
        // Missing sent_at / absurd clock: received_at, flagged.
        assert!(correct(5, 0, 1_000, 0, DAY).skew_flagged);
        assert_eq!(correct(5, 5, 10 * DAY, 0, DAY).event_time_ms, 10 * DAY);
        // Clamped to the token's issue time and to received_at.
        assert_eq!(correct(100, 1_000, 1_000, 500, DAY).event_time_ms, 500);
        assert_eq!(correct(2_000, 1_000, 1_000, 0, DAY).event_time_ms, 1_000);
        // Token issued after received_at (within skew): lower bound collapses.
        assert_eq!(correct(900, 1_000, 1_000, 1_200, DAY).event_time_ms, 1_000);
    }

    proptest! {
        #[test]
        fn error_is_the_transit_time(
            t in 1_000_000i64..2_000_000_000_000,
            wait in 0i64..3_600_000,
            transit in 0i64..5_000,
            offset in -3_600_000i64..3_600_000,
        ) {
            let issued = t - 1;
            let sent_true = t + wait;
            let received = sent_true + transit;
            let c = correct(t + offset, sent_true + offset, received, issued, DAY);
            prop_assert!(!c.skew_flagged);
            prop_assert_eq!(c.event_time_ms - t, transit);
        }

        #[test]
        fn always_within_bounds(o in any::<i64>(), s in any::<i64>(), r in 0i64..i64::MAX / 2, i in any::<i64>()) {
            let c = correct(o, s, r, i, DAY);
            prop_assert!(c.event_time_ms <= r);
            prop_assert!(c.event_time_ms >= i.min(r));
        }
    }
}
