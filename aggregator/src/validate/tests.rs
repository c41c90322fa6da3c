//! Unit tests of the rules, one per rule, plus a property test that validation never
//! panics and always names a field; the same rules are driven against the real server,
//! over gRPC and HTTP, in `tests/validation.rs`.

use super::*;
use adclick_proto::v1::{Filter, GetAdClicksRequest, TimeRange, TopAdsRequest};
use proptest::prelude::*;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;
const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn clicks(from_ms: i64, to_ms: i64, g: Granularity, filter: Option<Filter>) -> GetAdClicksRequest {
    GetAdClicksRequest {
        fill_empty: None,
        ad_id: 1,
        from_ms,
        to_ms,
        granularity: g as i32,
        filter,
        ..Default::default()
    }
}

fn top(n: u32, window: Option<Window>, filter: Option<Filter>) -> TopAdsRequest {
    TopAdsRequest {
        n,
        window,
        filter,
        ..Default::default()
    }
}

fn range(from_ms: i64, to_ms: i64) -> Option<Window> {
    Some(Window::Range(TimeRange { from_ms, to_ms }))
}

/// `(field path, reason code)` of each violation.
fn named(v: &Violations) -> Vec<(String, &'static str)> {
    v.list()
        .iter()
        .map(|x| (x.field.to_string(), x.reason.code()))
        .collect()
}

fn clicks_err(req: &GetAdClicksRequest, wm: i64) -> Vec<(String, &'static str)> {
    named(&ad_clicks(req, &Limits::default(), wm).unwrap_err())
}

fn top_err(req: &TopAdsRequest, wm: i64, now: i64) -> Vec<(String, &'static str)> {
    named(&top_ads(req, &Limits::default(), wm, now).unwrap_err())
}

fn filter_err(f: Filter) -> Vec<(String, &'static str)> {
    let mut bad = Violations::default();
    filter(Some(&f), &mut bad);
    named(&bad)
}

fn v(field: &str, code: &'static str) -> Vec<(String, &'static str)> {
    vec![(field.to_string(), code)]
}

#[test]
fn valid_requests_pass_and_are_normalised() {
    let f = Filter {
        country: vec!["us".into(), "De".into(), "XK".into()],
        device: vec![Device::Mobile as i32, Device::Other as i32],
        os: vec!["ios".into()],
        site: vec!["news.example".into(), "é".repeat(128)],
        advertiser_id: vec![7],
        campaign_id: vec![1, 2],
        ..Default::default()
    };
    let req = clicks(
        T0 + 30_000,
        T0 + 2 * DAY,
        Granularity::Minute,
        Some(f.clone()),
    );
    let plan = ad_clicks(&req, &Limits::default(), T0 + HOUR).unwrap();
    assert_eq!(
        (plan.level, plan.from_ms, plan.to_ms),
        (0, T0, T0 + 2 * DAY)
    );
    assert_eq!(plan.filter.countries, [*b"US", *b"DE", *b"XK"]);
    assert_eq!(plan.filter.devices, [2, 4]);
    assert_eq!(plan.filter.sites.len(), 2);
    // Unspecified granularity is minute, as the proto says.
    let req = clicks(T0, T0 + HOUR, Granularity::Unspecified, None);
    assert_eq!(ad_clicks(&req, &Limits::default(), T0).unwrap().level, 0);
    let req = top(10_000, Some(Window::LastMinutes(60)), Some(f));
    assert_eq!(top_ads(&req, &Limits::default(), T0, T0), Ok(()));
    // Before any click was counted (watermark i64::MIN) nothing was evicted.
    let req = clicks(T0 - 300 * DAY, T0, Granularity::Day, None);
    assert!(ad_clicks(&req, &Limits::default(), i64::MIN).is_ok());
}

#[test]
fn country_must_be_an_assigned_alpha_2_code() {
    for (c, code) in [
        ("USA", "MALFORMED"),
        ("US,DE", "MALFORMED"),
        ("U1", "MALFORMED"),
        ("U", "MALFORMED"),
        (" US", "MALFORMED"),
        ("ÜS", "MALFORMED"),
        ("", "REQUIRED"),
        ("XX", "UNKNOWN_VALUE"),
        ("UK", "UNKNOWN_VALUE"),
        ("zz", "UNKNOWN_VALUE"),
    ] {
        let f = Filter {
            country: vec!["US".into(), c.into()],
            ..Default::default()
        };
        assert_eq!(filter_err(f), v("filter.country[1]", code), "{c:?}");
    }
    assert!(country("UK").unwrap_err().1.contains("GB"));
    assert!(
        country("US,DE")
            .unwrap_err()
            .1
            .contains("country=US&country=DE")
    );
    assert_eq!(country("gb"), Ok(*b"GB"));
}

#[test]
fn device_must_be_a_known_value_other_than_unspecified() {
    for d in [0, 5, -1, i32::MAX] {
        let f = Filter {
            device: vec![Device::Desktop as i32, d],
            ..Default::default()
        };
        assert_eq!(filter_err(f), v("filter.device[1]", "UNKNOWN_VALUE"), "{d}");
    }
}

#[test]
fn os_and_site_are_bounded_printable_text() {
    for (s, code) in [
        ("", "REQUIRED"),
        (&*"a".repeat(MAX_VALUE_LEN + 1), "TOO_LONG"),
        ("ios\n", "MALFORMED"),
        ("i\u{0}os", "MALFORMED"),
        ("\u{7f}", "MALFORMED"),
    ] {
        let f = Filter {
            os: vec![s.into()],
            site: vec!["ok".into(), s.into()],
            ..Default::default()
        };
        let mut want = v("filter.os[0]", code);
        want.extend(v("filter.site[1]", code));
        assert_eq!(filter_err(f), want, "{s:?}");
    }
    let f = Filter {
        os: vec!["a".repeat(MAX_VALUE_LEN)],
        ..Default::default()
    };
    assert_eq!(filter_err(f), []);
}

#[test]
fn ids_are_nonzero() {
    let f = Filter {
        advertiser_id: vec![3, 0],
        campaign_id: vec![0],
        ..Default::default()
    };
    let mut want = v("filter.advertiser_id[1]", "OUT_OF_RANGE");
    want.extend(v("filter.campaign_id[0]", "OUT_OF_RANGE"));
    assert_eq!(filter_err(f), want);
    let mut req = clicks(T0, T0 + HOUR, Granularity::Minute, None);
    req.ad_id = 0;
    assert_eq!(clicks_err(&req, T0), v("ad_id", "REQUIRED"));
}

#[test]
fn lists_are_bounded() {
    let f = Filter {
        country: vec!["US".into(); MAX_FILTER_VALUES + 1],
        campaign_id: vec![1; MAX_FILTER_VALUES],
        ..Default::default()
    };
    assert_eq!(filter_err(f), v("filter.country", "TOO_MANY_VALUES"));
}

#[test]
fn n_is_between_1_and_the_limit() {
    for n in [0, MAX_TOP_N + 1] {
        let req = top(n, Some(Window::LastMinutes(5)), None);
        assert_eq!(top_err(&req, T0, T0), v("n", "OUT_OF_RANGE"));
    }
    let limits = Limits {
        max_top_n: 100,
        ..Limits::default()
    };
    let e = top_ads(
        &top(101, Some(Window::LastMinutes(5)), None),
        &limits,
        T0,
        T0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("n must be between 1 and 100"), "{e}");
}

#[test]
fn a_window_is_required_and_last_minutes_is_at_least_1() {
    assert_eq!(
        top_err(&top(5, None, None), T0, T0),
        v("window", "REQUIRED")
    );
    let req = top(5, Some(Window::LastMinutes(0)), None);
    assert_eq!(top_err(&req, T0, T0), v("last_minutes", "OUT_OF_RANGE"));
}

#[test]
fn ranges_are_in_bounds_ordered_and_not_too_long() {
    let m = Granularity::Minute;
    // Bounds: before 2000, after 2200, or seconds instead of ms.
    let req = clicks(0, T0, m, None);
    assert_eq!(clicks_err(&req, T0), v("from_ms", "OUT_OF_RANGE"));
    let req = clicks(T0 / 1000, T0 / 1000 + 60, m, None);
    let e = ad_clicks(&req, &Limits::default(), T0).unwrap_err();
    assert_eq!(
        named(&e),
        [
            ("from_ms".into(), "OUT_OF_RANGE"),
            ("to_ms".into(), "OUT_OF_RANGE")
        ]
    );
    assert!(e.to_string().contains("looks like seconds"), "{e}");
    let req = clicks(T0, MAX_EVENT_MS + 2 * DAY, Granularity::Day, None);
    assert_eq!(clicks_err(&req, T0), v("to_ms", "OUT_OF_RANGE"));
    // Order.
    for (from, to) in [(T0 + 1, T0), (T0, T0)] {
        let req = clicks(from, to, m, None);
        assert_eq!(clicks_err(&req, T0), v("to_ms", "EMPTY_RANGE"));
        let req = top(5, range(from, to), None);
        assert_eq!(top_err(&req, T0, T0), v("range.to_ms", "EMPTY_RANGE"));
    }
    // Length: query.max_range_days (400).
    let req = clicks(T0, T0 + 401 * DAY, Granularity::Day, None);
    assert_eq!(clicks_err(&req, T0), v("to_ms", "RANGE_TOO_LONG"));
    let req = clicks(T0, T0 + 400 * DAY, Granularity::Day, None);
    assert!(ad_clicks(&req, &Limits::default(), T0).is_ok());
}

#[test]
fn ranges_start_within_the_retention_of_their_granularity() {
    // Defaults: 48 h of minutes, 31 days of hours, 400 days of days, behind the watermark.
    let wm = T0 + 10 * DAY + 30_000;
    let oldest_minute = T0 + 8 * DAY;
    let req = clicks(oldest_minute, wm, Granularity::Minute, None);
    assert!(ad_clicks(&req, &Limits::default(), wm).is_ok());
    let req = clicks(oldest_minute - 1, wm, Granularity::Minute, None);
    let e = ad_clicks(&req, &Limits::default(), wm).unwrap_err();
    assert_eq!(named(&e), v("from_ms", "BEFORE_RETENTION"));
    assert!(e.to_string().contains(&oldest_minute.to_string()), "{e}");
    // The same start at hour granularity is kept.
    let req = clicks(oldest_minute - 1, wm, Granularity::Hour, None);
    assert!(ad_clicks(&req, &Limits::default(), wm).is_ok());
    let req = clicks(wm - 32 * DAY, wm, Granularity::Hour, None);
    assert_eq!(clicks_err(&req, wm), v("from_ms", "BEFORE_RETENTION"));
    let req = clicks(wm - 32 * DAY, wm, Granularity::Day, None);
    assert!(ad_clicks(&req, &Limits::default(), wm).is_ok());
    // TopAds counts minutes, whatever the range's length.
    let req = top(5, range(oldest_minute - 1, wm), None);
    assert_eq!(
        top_err(&req, wm, wm),
        v("range.from_ms", "BEFORE_RETENTION")
    );
    let req = top(5, range(oldest_minute, wm), None);
    assert_eq!(top_ads(&req, &Limits::default(), wm, wm), Ok(()));
    // last_minutes counts from now: 2881 minutes start at the oldest minute kept, 2882 one
    // minute before it.
    let now = wm;
    let req = top(5, Some(Window::LastMinutes(2881)), None);
    assert_eq!(top_ads(&req, &Limits::default(), wm, now), Ok(()));
    let req = top(5, Some(Window::LastMinutes(2882)), None);
    assert_eq!(
        top_err(&req, wm, now),
        v("last_minutes", "BEFORE_RETENTION")
    );
    let req = top(5, Some(Window::LastMinutes(7 * 1440)), None);
    assert_eq!(
        top_err(&req, wm, now),
        v("last_minutes", "BEFORE_RETENTION")
    );
}

#[test]
fn granularity_is_known_and_bounds_the_buckets() {
    let req = clicks(T0, T0 + HOUR, Granularity::Minute, None);
    let req = GetAdClicksRequest {
        fill_empty: None,
        granularity: 99,
        ..req
    };
    assert_eq!(clicks_err(&req, T0), v("granularity", "UNKNOWN_VALUE"));
    // 10,000 minute buckets are fine, 10,001 are not (with a longer minute retention).
    let limits = Limits {
        retention: [30 * 1440, 31 * 24, 400],
        ..Limits::default()
    };
    let req = clicks(T0, T0 + MAX_BUCKETS * MIN, Granularity::Minute, None);
    assert!(ad_clicks(&req, &limits, T0).is_ok());
    let req = clicks(T0, T0 + MAX_BUCKETS * MIN + 1, Granularity::Minute, None);
    let e = ad_clicks(&req, &limits, T0).unwrap_err();
    assert_eq!(named(&e), v("granularity", "TOO_MANY_BUCKETS"));
    // 48 h of minutes is 2,880 buckets.
    let req = clicks(T0, T0 + 2 * DAY, Granularity::Minute, None);
    assert!(ad_clicks(&req, &Limits::default(), T0).is_ok());
}

#[test]
fn every_violation_is_reported_and_the_list_is_capped() {
    let f = Filter {
        country: vec!["USA".into(), "US".into(), "XX".into()],
        device: vec![0],
        ..Default::default()
    };
    let req = GetAdClicksRequest {
        fill_empty: None,
        ad_id: 0,
        from_ms: T0,
        to_ms: T0,
        granularity: 7,
        filter: Some(f),
        ..Default::default()
    };
    assert_eq!(
        clicks_err(&req, T0),
        [
            ("ad_id".into(), "REQUIRED"),
            ("granularity".into(), "UNKNOWN_VALUE"),
            ("to_ms".into(), "EMPTY_RANGE"),
            ("filter.country[0]".into(), "MALFORMED"),
            ("filter.country[2]".into(), "UNKNOWN_VALUE"),
            ("filter.device[0]".into(), "UNKNOWN_VALUE"),
        ]
    );
    let f = Filter {
        os: vec![String::new(); MAX_FILTER_VALUES],
        ..Default::default()
    };
    let mut bad = Violations::default();
    filter(Some(&f), &mut bad);
    assert_eq!(
        (bad.list().len(), bad.total()),
        (MAX_VIOLATIONS, MAX_FILTER_VALUES)
    );
    let msg = bad.to_string();
    assert!(
        msg.contains(&format!("and {} more", MAX_FILTER_VALUES - 3)),
        "{msg}"
    );
}

#[test]
fn quoted_values_are_escaped_and_bounded() {
    assert_eq!(quote("a\"b\n"), r#""a\"b\n""#);
    let q = quote(&"é".repeat(100));
    assert!(q.len() <= MAX_QUOTED + 3 && q.ends_with("..."), "{q}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any request: validation never panics; an error names at least one field, with a
    /// bounded description; a valid one has an ordered, bounded plan.
    #[test]
    fn arbitrary_requests_never_panic(
        ad_id in prop_oneof![Just(0u64), any::<u64>()],
        from in prop_oneof![any::<i64>(), (T0 - 3 * DAY)..(T0 + DAY)],
        len in prop_oneof![any::<i64>(), -HOUR..(3 * DAY)],
        g in -1i32..5,
        wm in prop_oneof![Just(i64::MIN), any::<i64>(), T0..(T0 + DAY)],
        n in prop_oneof![any::<u32>(), 0u32..20],
        last in prop_oneof![any::<u32>(), 0u32..3000],
        countries in proptest::collection::vec(".{0,4}", 0..70),
        devices in proptest::collection::vec(any::<i32>(), 0..4),
        os in proptest::collection::vec(".{0,300}", 0..3),
        ids in proptest::collection::vec(0u64..3, 0..3),
    ) {
        let f = Filter {
            country: countries,
            device: devices,
            os,
            site: vec![],
            advertiser_id: ids.clone(),
            campaign_id: ids,
            ..Default::default()
        };
        let to = from.saturating_add(len);
        let req = GetAdClicksRequest { ad_id, from_ms: from, to_ms: to, granularity: g, filter: Some(f.clone()), fill_empty: None, ..Default::default() };
        match ad_clicks(&req, &Limits::default(), wm) {
            Ok(p) => {
                prop_assert!(p.from_ms < p.to_ms && p.level < 3);
                prop_assert!((p.to_ms - p.from_ms) / WIDTH_MS[p.level] <= MAX_BUCKETS);
            }
            Err(v) => {
                prop_assert!(!v.list().is_empty());
                prop_assert!(v.list().iter().all(|x| x.description.len() < 256));
            }
        }
        for window in [Some(Window::LastMinutes(last)), range(from, to), None] {
            let req = top(n, window, Some(f.clone()));
            if let Err(v) = top_ads(&req, &Limits::default(), wm, T0) {
                prop_assert!(!v.list().is_empty());
            }
        }
    }
}

#[test]
fn ip_filters_are_address_ranges_and_bad_ones_are_named() {
    use super::ip_filter;
    let v4 = |a: [u8; 4]| crate::clickindex::ip_key(&a).unwrap();
    assert_eq!(
        ip_filter("203.0.113.7").unwrap(),
        (v4([203, 0, 113, 7]), v4([203, 0, 113, 7]))
    );
    // An IPv4-mapped IPv6 address is the IPv4 address.
    assert_eq!(
        ip_filter("::ffff:203.0.113.7").unwrap(),
        ip_filter("203.0.113.7").unwrap()
    );
    assert_eq!(
        ip_filter("203.0.113.0/24").unwrap(),
        (v4([203, 0, 113, 0]), v4([203, 0, 113, 255]))
    );
    assert_eq!(
        ip_filter("10.0.0.0/8").unwrap(),
        (v4([10, 0, 0, 0]), v4([10, 255, 255, 255]))
    );
    let (lo, hi) = ip_filter("2001:db8::/32").unwrap();
    assert_eq!(lo[..4], [0x20, 0x01, 0x0d, 0xb8]);
    assert!(lo[4..].iter().all(|b| *b == 0) && hi[4..].iter().all(|b| *b == 0xff));
    for (bad, reason) in [
        ("", Reason::Malformed),
        ("203.0.113", Reason::Malformed),
        ("203.0.113.7/24", Reason::Malformed),
        ("203.0.113.0/33", Reason::Malformed),
        ("0.0.0.0/0", Reason::OutOfRange),
        ("10.0.0.0/7", Reason::OutOfRange),
        ("2001:db8::/31", Reason::OutOfRange),
        ("::/0", Reason::OutOfRange),
    ] {
        assert_eq!(ip_filter(bad).unwrap_err().0, reason, "{bad:?}");
    }
    let mut bad = Violations::default();
    let f = Filter {
        ip: "nope".into(),
        user_id: "u".repeat(257),
        ..Default::default()
    };
    super::filter(Some(&f), &mut bad);
    let fields: Vec<String> = bad.list().iter().map(|v| v.field.to_string()).collect();
    assert_eq!(fields, ["filter.ip", "filter.user_id"]);
}
