//! The partition of a row: `dt=YYYY-MM-DD/hour=HH` of its event time (UTC).

/// Latest time a partition can name (9999-12-31T23:59:59.999Z).
const MAX_MS: i64 = 253_402_300_799_999;

/// `dt=YYYY-MM-DD/hour=HH` of `event_time_ms`; of `received_at_ms` when the event time is
/// before 1970 or after 9999 (an invalid click's time cannot be trusted), and of 1970-01-01
/// 00:00 when both are.
pub fn partition_of(event_time_ms: i64, received_at_ms: i64) -> String {
    let t = [event_time_ms, received_at_ms]
        .into_iter()
        .find(|t| (0..=MAX_MS).contains(t))
        .unwrap_or(0);
    let (y, m, d, h) = civil(t);
    format!("dt={y:04}-{m:02}-{d:02}/hour={h:02}")
}

/// (year, month, day, hour) of a non-negative Unix time in ms (UTC).
pub fn civil(ms: i64) -> (i64, u32, u32, u32) {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let hour = (secs.rem_euclid(86_400) / 3600) as u32;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d, hour)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_by_event_hour_in_utc() {
        assert_eq!(partition_of(0, 0), "dt=1970-01-01/hour=00");
        // 2024-02-29T23:59:59.999Z and the next millisecond.
        assert_eq!(partition_of(1_709_251_199_999, 0), "dt=2024-02-29/hour=23");
        assert_eq!(partition_of(1_709_251_200_000, 0), "dt=2024-03-01/hour=00");
        assert_eq!(
            partition_of(1_735_689_600_000 + 3_600_000 * 13, 0),
            "dt=2025-01-01/hour=13"
        );
        // An impossible event time falls back to the receive time, then to the epoch.
        assert_eq!(partition_of(-5, 1_709_251_200_000), "dt=2024-03-01/hour=00");
        assert_eq!(partition_of(i64::MAX, -1), "dt=1970-01-01/hour=00");
        assert_eq!(partition_of(MAX_MS, 0), "dt=9999-12-31/hour=23");
    }
}
