//! Unit tests of the rules stage: each rule on hand-made clicks, the retroactive move, and
//! checkpoint round trips (the state restored judges the rest exactly as the original).

use super::*;

const T0: i64 = 1_767_225_600_000;

fn on() -> RulesConfig {
    RulesConfig {
        enabled: true,
        ..RulesConfig::default()
    }
}

fn click<'a>(ip: &'a [u8], user: &'a [u8], t: i64) -> ClickIn<'a> {
    ClickIn {
        ad_id: 1,
        event_time_ms: t,
        token_expires_at_ms: t + 3_600_000,
        client_ip: ip,
        user_id: user,
        ..ClickIn::default()
    }
}

fn applied(ad: u64, t: i64) -> Applied {
    Applied {
        ad,
        advertiser: 1,
        campaign: 1,
        event_time_ms: t,
        combo: 1,
        dims: DimKey::default(),
        user: 0,
        late: false,
    }
}

#[test]
fn ip_rate_moves_the_earlier_clicks_of_the_minute() {
    let mut cfg = on();
    cfg.ip_rate.max_per_minute = 3;
    let mut r = Rules::with_data(&cfg, cidr::CidrSet::default(), b"");
    let ip = [10, 0, 0, 1];
    let mut moved = Vec::new();
    for i in 0..3 {
        assert_eq!(
            r.judge(
                &click(&ip, b"", T0 + i),
                Origin::default(),
                0,
                &applied(1, T0 + i),
                &mut moved
            ),
            None
        );
    }
    assert!(moved.is_empty());
    // The fourth trips: itself invalid, the three before moved.
    assert_eq!(
        r.judge(
            &click(&ip, b"", T0 + 3),
            Origin::default(),
            0,
            &applied(1, T0 + 3),
            &mut moved
        ),
        Some(Reason::IpRate)
    );
    assert_eq!(moved.len(), 3);
    moved.clear();
    assert_eq!(
        r.judge(
            &click(&ip, b"", T0 + 4),
            Origin::default(),
            0,
            &applied(1, T0 + 4),
            &mut moved
        ),
        Some(Reason::IpRate)
    );
    assert!(moved.is_empty(), "moved once only");
    // Next minute: a fresh counter.
    let t = T0 + 60_000;
    assert_eq!(
        r.judge(
            &click(&ip, b"", t),
            Origin::default(),
            0,
            &applied(1, t),
            &mut moved
        ),
        None
    );
    assert_eq!(r.counters.invalid[Reason::IpRate.index()], 5);
    assert_eq!(r.counters.moved[Reason::IpRate.index()], 3);
}

#[test]
fn a_click_moved_by_ip_rate_is_not_moved_again_by_user_rate() {
    let mut cfg = on();
    cfg.ip_rate.max_per_minute = 2;
    cfg.user_rate.max_per_minute = 3;
    let mut r = Rules::with_data(&cfg, cidr::CidrSet::default(), b"");
    let mut moved = Vec::new();
    let a = [10, 0, 0, 1];
    let b = [10, 0, 0, 2];
    // Two from a, valid; one from b, valid; the third from a trips ip_rate (moves 2).
    r.judge(
        &click(&a, b"u", T0),
        Origin::default(),
        0,
        &applied(1, T0),
        &mut moved,
    );
    r.judge(
        &click(&a, b"u", T0),
        Origin::default(),
        0,
        &applied(1, T0),
        &mut moved,
    );
    r.judge(
        &click(&b, b"u", T0),
        Origin::default(),
        0,
        &applied(1, T0),
        &mut moved,
    );
    assert_eq!(
        r.judge(
            &click(&a, b"x", T0),
            Origin::default(),
            0,
            &applied(1, T0),
            &mut moved
        ),
        Some(Reason::IpRate)
    );
    assert_eq!(moved.len(), 2);
    moved.clear();
    // The fourth click of user u trips user_rate: only b's click is still valid to move.
    assert_eq!(
        r.judge(
            &click(&b, b"u", T0),
            Origin::default(),
            0,
            &applied(1, T0),
            &mut moved
        ),
        Some(Reason::UserRate)
    );
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].reason, Reason::UserRate);
}

/// A trap click moves its client's valid clicks of the look-back (by IP and by user id,
/// each once), keeps those before it (in the same minute too) for a rate rule to move
/// later, and reaches no further with `lookback_minutes = 0`.
#[test]
fn a_trap_click_reaches_back_over_its_look_back() {
    const TRAP: u64 = 77;
    let mut cfg = on();
    cfg.too_fast.enabled = false;
    cfg.ip_rate.enabled = false;
    cfg.user_rate.max_per_minute = 4;
    cfg.honeypot.ad_ids = vec![TRAP];
    cfg.honeypot.window_minutes = 10;
    cfg.honeypot.lookback_minutes = 2;
    let judge_all = |cfg: &RulesConfig| {
        let mut r = Rules::with_data(cfg, cidr::CidrSet::default(), b"");
        let mut moved = Vec::new();
        let ip = [10, 0, 0, 1];
        let other = [10, 0, 0, 2];
        let m = 60_000;
        // Valid: user u from ip at T0+10s (outside the 2-minute look-back of a trap at
        // T0+2m30s) and T0+40s, T0+1m10s (inside); from another IP as user u at T0+50s
        // (reached through the user id); a stranger at T0+45s.
        for (i, t, u) in [
            (&ip, T0 + 10_000, &b"u"[..]),
            (&ip, T0 + 40_000, b"u"),
            (&ip, T0 + m + 10_000, b"u"),
            (&other, T0 + 50_000, b"u"),
            (&[10, 0, 0, 9], T0 + 45_000, b"s"),
        ] {
            assert_eq!(
                r.judge(
                    &click(i, u, t),
                    Origin::default(),
                    0,
                    &applied(1, t),
                    &mut moved
                ),
                None
            );
        }
        assert!(moved.is_empty());
        let t = T0 + 2 * m + 30_000;
        assert_eq!(
            r.judge(
                &click(&ip, b"u", t),
                Origin::default(),
                0,
                &applied(TRAP, t),
                &mut moved
            ),
            Some(Reason::Honeypot)
        );
        let mut times: Vec<i64> = moved.iter().map(|m| m.click.event_time_ms).collect();
        times.sort_unstable();
        assert!(moved.iter().all(|m| m.reason == Reason::Honeypot));
        let before_trap = moved.len();
        moved.clear();
        // Two more clicks of user u in the first minute (honeypot themselves: inside the
        // flag's window) trip user_rate (4): the click the look-back left (T0+10s) is
        // still there to move.
        for s in [20_000, 30_000] {
            r.judge(
                &click(&other, b"u", T0 + s),
                Origin::default(),
                0,
                &applied(1, T0 + s),
                &mut moved,
            );
        }
        let mut left: Vec<(i64, Reason)> = moved
            .iter()
            .map(|m| (m.click.event_time_ms, m.reason))
            .collect();
        left.sort_unstable();
        (
            times,
            before_trap,
            left,
            r.counters.moved[Reason::Honeypot.index()],
        )
    };
    let (times, n, left, counted) = judge_all(&cfg);
    assert_eq!(times, vec![T0 + 40_000, T0 + 50_000, T0 + 70_000]);
    assert_eq!((n, counted), (3, 3));
    assert_eq!(left, vec![(T0 + 10_000, Reason::UserRate)]);
    // Forward only: nothing moves at the trap.
    cfg.honeypot.lookback_minutes = 0;
    let (times, _, _, counted) = judge_all(&cfg);
    assert_eq!((times, counted), (vec![], 0));
}

#[test]
fn each_rule_and_the_master_switch() {
    let cfg = RulesConfig {
        honeypot: config::HoneypotRule {
            ad_ids: vec![99],
            window_minutes: 1,
            ..Default::default()
        },
        ..on()
    };
    let cidrs = cidr::CidrSet::parse("192.0.2.0/24").unwrap();
    let mut r = Rules::with_data(&cfg, cidrs.clone(), b"192.0.2.0/24");
    let mut mv = Vec::new();
    let ip = [10, 0, 0, 1];
    let mut c = click(&ip, b"", T0);
    c.ua_class = 2;
    assert_eq!(
        r.judge(&c, Origin::default(), 0, &applied(1, T0), &mut mv),
        Some(Reason::BotUserAgent)
    );
    let dc = [192, 0, 2, 9];
    assert_eq!(
        r.judge(
            &click(&dc, b"", T0),
            Origin::default(),
            0,
            &applied(1, T0),
            &mut mv
        ),
        Some(Reason::DatacenterIp)
    );
    // too_fast: 999 ms after issue; 1000 ms is fine.
    let mut c = click(&ip, b"", T0);
    c.token_issued_at_ms = T0 - 999;
    assert_eq!(
        r.judge(&c, Origin::default(), 0, &applied(1, T0), &mut mv),
        Some(Reason::TooFast)
    );
    c.token_issued_at_ms = T0 - 1000;
    assert_eq!(
        r.judge(&c, Origin::default(), 0, &applied(1, T0), &mut mv),
        None
    );
    // impossible_time: the device says it clicked an hour before the impression existed.
    let mut c = click(&ip, b"", T0);
    c.token_issued_at_ms = T0 - 5_000;
    c.received_at_ms = T0;
    c.sent_at_ms = T0;
    c.occurred_at_ms = T0 - 3_600_000;
    assert_eq!(
        r.judge(&c, Origin::default(), 0, &applied(1, T0), &mut mv),
        Some(Reason::ImpossibleTime)
    );
    c.occurred_at_ms = T0 - 2_000;
    assert_eq!(
        r.judge(&c, Origin::default(), 0, &applied(1, T0), &mut mv),
        None
    );
    c.clock_skew_flagged = true;
    c.occurred_at_ms = T0 - 3_600_000;
    assert_eq!(
        r.judge(&c, Origin::default(), 0, &applied(1, T0), &mut mv),
        None,
        "no correction: not judged"
    );
    // honeypot: the trap, then the same IP within the window, not after it.
    let hp = [10, 9, 9, 9];
    assert_eq!(
        r.judge(
            &click(&hp, b"", T0),
            Origin::default(),
            0,
            &applied(99, T0),
            &mut mv
        ),
        Some(Reason::Honeypot)
    );
    assert_eq!(
        r.judge(
            &click(&hp, b"", T0 + 60_000),
            Origin::default(),
            0,
            &applied(1, T0 + 60_000),
            &mut mv
        ),
        Some(Reason::Honeypot)
    );
    assert_eq!(
        r.judge(
            &click(&hp, b"", T0 + 60_001),
            Origin::default(),
            0,
            &applied(1, T0 + 60_001),
            &mut mv
        ),
        None
    );
    // Master switch off: nothing, and the version says so.
    let mut off = Rules::with_data(&RulesConfig::default(), cidrs, b"");
    assert_eq!(off.version(), "off");
    assert_eq!(
        off.judge(
            &click(&dc, b"", T0),
            Origin::default(),
            0,
            &applied(1, T0),
            &mut mv
        ),
        None
    );
    // The version moves with the config and the CIDR data.
    let other = Rules::with_data(&cfg, cidr::CidrSet::default(), b"192.0.2.0/25");
    assert_ne!(r.version(), other.version());
}

proptest::proptest! {
    /// Checkpoint at any point, restore into a fresh stage, judge the rest: the same
    /// verdicts and moves as without the restart.
    #[test]
    fn restore_judges_the_rest_identically(
        clicks in proptest::collection::vec((0u8..4, 0u8..3, 0i64..180_000), 1..120),
        cut in proptest::sample::select((0usize..120).collect::<Vec<_>>()),
        max in 1u32..6,
    ) {
        let mut cfg = on();
        cfg.ip_rate.max_per_minute = max;
        cfg.user_rate.max_per_minute = max + 1;
        // Ad 3 is a trap (its clicks come from IP 10.0.0.3): look-back moves too.
        cfg.honeypot.ad_ids = vec![3];
        let run = |from: Option<(usize, Vec<u8>)>| {
            let mut r = Rules::with_data(&cfg, cidr::CidrSet::default(), b"");
            let start = match &from {
                Some((at, bytes)) => {
                    r.restore(bytes, &|_| DimKey::default()).unwrap();
                    *at
                }
                None => 0,
            };
            let mut out = Vec::new();
            let mut snap = None;
            for (i, (ip, user, dt)) in clicks.iter().enumerate().skip(start) {
                if i == cut.min(clicks.len()) && from.is_none() {
                    snap = Some(r.to_bytes());
                }
                let ipb = [10, 0, 0, *ip];
                let ub = [b'u', *user];
                let t = T0 + dt;
                let mut mv = Vec::new();
                // The origin must survive the checkpoint: moves carry it to the archive.
                let origin = Origin { pos: i as u64 + 1, index: u32::from(*user) };
                let v = r.judge(&click(&ipb, &ub, t), origin, 0, &applied(u64::from(*ip), t), &mut mv);
                r.expire(T0 + dt - 70_000);
                out.push((i, v, mv));
            }
            (out, snap)
        };
        let (full, snap) = run(None);
        let at = cut.min(clicks.len());
        let snap = snap.unwrap_or_else(|| Rules::with_data(&cfg, cidr::CidrSet::default(), b"").to_bytes());
        let (rest, _) = run(Some((at, snap)));
        let tail: Vec<_> = full.into_iter().filter(|(i, _, _)| *i >= at).collect();
        proptest::prop_assert_eq!(tail, rest);
    }
}
