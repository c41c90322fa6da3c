//! The invalid-traffic rules stage (issue 16): run by the writer thread on every click the
//! window operator counted (after dedup), it classifies the click valid or invalid with
//! one [`Reason`], and when a rate rule trips it names the earlier clicks of the same
//! IP-minute / user-minute that move from valid to invalid (retroactive flags).
//!
//! Deterministic: its inputs are the click (from the WAL bytes) and its own state, which
//! moves on event time only (expiry by the watermark), never on the wall clock. Its state
//! is saved in every checkpoint (table `rules`, taken on the writer thread at the same
//! point as the window operator's), so checkpoint + WAL replay reaches exactly the
//! decisions the crashed process made.
//!
//! It must not do I/O on the per-click path nor know protobuf (clicks come as
//! [`ClickIn`]); `cidr` reads the operator's file once at start.
//!
//! Memory: rate counters live per event-time minute and are dropped once the watermark is
//! [`GRACE_MS`] past the minute's end. Per kept minute: one entry per distinct IP and per
//! distinct user, and each valid click with an IP or user id (≈ 104 bytes with the IP the
//! click index's invalid lane needs if it moves, + its user id's bytes + 4 per list it is
//! in) until its minute expires; an entry's retroactive list holds at most
//! `max_per_minute` clicks (once it trips, the list is emptied and no more are kept). So
//! the bound is ~(120 bytes × the valid clicks of the last `allowed_delay_ms` + 2 minutes of
//! event time) plus ~40 bytes per distinct IP and user of those minutes. While trap ads
//! are configured, minutes are kept `honeypot.lookback_minutes` longer (a trap click moves
//! its client's valid clicks of that look-back), which adds ~120 bytes per valid click of
//! those minutes. Honeypot flags: one (first, last) pair per flagged client, kept
//! `window_minutes` after its last trap click.

pub mod cidr;
pub mod config;

use std::collections::BTreeMap;

use prost::Message;

use crate::state::FastMap;
use crate::state::click::ClickIn;
use crate::state::dims::DimKey;
use crate::state::shard::{Applied, LEVEL_MS};
pub use config::{RateRule, RulesConfig};

/// Largest `too_fast.min_ms` (one hour).
pub const MAX_TOO_FAST_MS: i64 = 3_600_000;
/// Rate counters and honeypot flags are kept this long after the watermark passed them:
/// clicks a little later than the watermark still meet their minute's counter.
pub const GRACE_MS: i64 = 60_000;
/// Clock difference allowed between the token issuer and the collector when judging
/// `impossible_time` (their clocks are different machines'; the device's is corrected).
pub const ISSUER_SKEW_MS: i64 = 1_000;

/// Why a click is invalid. The order is the order rules are tried in (the first match is
/// the click's one reason) and the index is the `adclick.v1.InvalidReason` value minus 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The collector classified the User-Agent as a bot.
    BotUserAgent = 0,
    /// The client IP is in a data-center range.
    DatacenterIp = 1,
    /// A trap ad, or a client flagged by one.
    Honeypot = 2,
    /// The device's corrected time is outside the token's lifetime.
    ImpossibleTime = 3,
    /// Sooner than `too_fast.min_ms` after the token was issued.
    TooFast = 4,
    /// More than `ip_rate.max_per_minute` clicks from the IP in the minute.
    IpRate = 5,
    /// More than `user_rate.max_per_minute` clicks from the user in the minute.
    UserRate = 6,
}

/// Number of reasons.
pub const N_REASONS: usize = 7;

impl Reason {
    /// Every reason, in rule order.
    pub const ALL: [Reason; N_REASONS] = [
        Reason::BotUserAgent,
        Reason::DatacenterIp,
        Reason::Honeypot,
        Reason::ImpossibleTime,
        Reason::TooFast,
        Reason::IpRate,
        Reason::UserRate,
    ];

    /// Stable label (metrics, docs, HTTP).
    pub fn label(self) -> &'static str {
        match self {
            Reason::BotUserAgent => "bot_user_agent",
            Reason::DatacenterIp => "datacenter_ip",
            Reason::Honeypot => "honeypot",
            Reason::ImpossibleTime => "impossible_time",
            Reason::TooFast => "too_fast",
            Reason::IpRate => "ip_rate",
            Reason::UserRate => "user_rate",
        }
    }

    /// Index 0..N_REASONS.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `adclick.v1.InvalidReason` value.
    pub fn proto(self) -> i32 {
        self as i32 + 1
    }
}

/// A click that a rule moved from valid to invalid after it was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// The shard that counted it.
    pub shard: usize,
    /// The click as that shard applied it.
    pub click: Applied,
    /// The rule that moved it (a rate rule, or a honeypot's look-back).
    pub reason: Reason,
    /// Where it was counted (the archive's key of its row).
    pub origin: Origin,
    /// Its client IP as sent (`ip[..ip_len]`: 4 or 16 bytes; 0: unknown), for the click
    /// index's invalid lane.
    pub ip: [u8; 16],
    /// See `ip`.
    pub ip_len: u8,
    /// Its user id: `Rules::moved_user` gives the bytes.
    user: (u32, u32),
}

/// Where a click was counted: its batch's WAL position and its index in the batch (the
/// archive's `log_pos`, `click_index`). `pos` 0: unknown (restored from a checkpoint
/// written before origins were kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    /// WAL position of its batch.
    pub pos: u64,
    /// Index in the batch.
    pub index: u32,
}

/// A valid click a rule may still move, with what the click index needs of it (its IP,
/// and its user id in its minute's arena).
#[derive(Debug, Clone, Copy)]
struct Held {
    shard: u32,
    origin: Origin,
    click: Applied,
    ip: [u8; 16],
    ip_len: u8,
    user: (u32, u32),
}

impl Held {
    /// The move of this click for `reason`, its user id copied from `users` (its minute's
    /// arena) to `out` (the moves' arena).
    fn moved(self, reason: Reason, users: &[u8], out: &mut Vec<u8>) -> Moved {
        let (off, len) = (self.user.0 as usize, self.user.1 as usize);
        let at = u32::try_from(out.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(users.get(off..off + len).unwrap_or_default());
        Moved {
            shard: self.shard as usize,
            click: self.click,
            reason,
            origin: self.origin,
            ip: self.ip,
            ip_len: self.ip_len,
            user: (at, self.user.1),
        }
    }
}

/// Client IP as a 128-bit key (IPv4 as IPv4-mapped IPv6); `None`: unknown.
fn ip_key(ip: &[u8]) -> Option<u128> {
    match ip.len() {
        4 => Some(u128::from(
            std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_ipv6_mapped(),
        )),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(ip);
            Some(u128::from_be_bytes(b))
        }
        _ => None,
    }
}

/// A user id as a 64-bit key (XXH64; a collision merges two users' counters, at 2^-64
/// per pair).
fn user_key(user: &[u8]) -> Option<u64> {
    (!user.is_empty()).then(|| xxhash_rust::xxh64::xxh64(user, 0x5eed))
}

#[derive(Debug, Clone, Default)]
struct Rate {
    count: u32,
    tripped: bool,
    /// Valid clicks of this client and minute (ids into `Minute::pending`) a trip moves.
    pending: Ids,
}

/// A counter's click ids, the first inline: most IP-minutes and user-minutes see one click,
/// and an allocation per new counter was the rules' largest cost per click.
#[derive(Debug, Clone, Default)]
struct Ids {
    first: Option<u32>,
    rest: Vec<u32>,
}

impl Ids {
    fn push(&mut self, id: u32) {
        if self.first.is_none() {
            self.first = Some(id);
        } else {
            self.rest.push(id);
        }
    }

    fn take(&mut self) -> impl Iterator<Item = u32> + use<> {
        let first = self.first.take();
        first.into_iter().chain(std::mem::take(&mut self.rest))
    }

    fn to_vec(&self) -> Vec<u32> {
        self.first.iter().chain(&self.rest).copied().collect()
    }

    fn from_vec(v: Vec<u32>) -> Ids {
        let mut ids = Ids::default();
        for id in v {
            ids.push(id);
        }
        ids
    }
}

#[derive(Debug, Clone, Default)]
struct Minute {
    ip: FastMap<u128, Rate>,
    user: FastMap<u64, Rate>,
    /// Valid clicks that a rate rule could still move; `None` once moved.
    pending: Vec<Option<Held>>,
    /// User ids of `pending` clicks (appended; dropped with the minute).
    users: Vec<u8>,
}

/// Running totals since start (exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Invalid clicks by reason (classified on arrival plus moved later).
    pub invalid: [u64; N_REASONS],
    /// Of which moved retroactively (rate rules).
    pub moved: [u64; N_REASONS],
}

/// The rules stage: config, data and state.
#[derive(Debug)]
pub struct Rules {
    cfg: RulesConfig,
    cidrs: cidr::CidrSet,
    /// Trap ad ids, sorted (binary search; usually empty or a handful).
    traps: Vec<u64>,
    version: String,
    minutes: BTreeMap<i64, Minute>,
    /// Honeypot flags: client -> (first, last) trap click event time.
    flag_ip: FastMap<u128, (i64, i64)>,
    flag_user: FastMap<u64, (i64, i64)>,
    /// Totals (not checkpointed: metrics restart at 0 like every counter).
    pub counters: RuleCounters,
    /// User ids of the clicks `judge` last moved ([`Rules::moved_user`]).
    moved_users: Vec<u8>,
}

impl Rules {
    /// The stage for `cfg`, reading its CIDR file (a path already resolved by the caller).
    pub fn new(cfg: &RulesConfig) -> Result<Rules, cidr::CidrError> {
        let (cidrs, cidr_text) = match (&cfg.datacenter_ip.cidr_file, cfg.enabled) {
            (Some(p), true) if cfg.datacenter_ip.enabled => {
                let set = cidr::CidrSet::load(p)?;
                (set, std::fs::read(p).unwrap_or_default())
            }
            _ => (cidr::CidrSet::default(), Vec::new()),
        };
        Ok(Rules::with_data(cfg, cidrs, &cidr_text))
    }

    /// The stage for `cfg` with its CIDR set given (tests, benchmarks); `cidr_text` is what
    /// the version hashes.
    pub fn with_data(cfg: &RulesConfig, cidrs: cidr::CidrSet, cidr_text: &[u8]) -> Rules {
        Rules {
            version: version_of(cfg, cidr_text),
            traps: {
                let mut t = cfg.honeypot.ad_ids.clone();
                t.sort_unstable();
                t.dedup();
                t
            },
            cfg: cfg.clone(),
            cidrs,
            minutes: BTreeMap::new(),
            flag_ip: FastMap::default(),
            flag_user: FastMap::default(),
            counters: RuleCounters::default(),
            moved_users: Vec::new(),
        }
    }

    /// How far back (event time) a trap click moves its client's valid clicks; 0 when
    /// the honeypot rule is off, has no trap ads, or looks forward only.
    fn look_back_ms(&self) -> i64 {
        let h = &self.cfg.honeypot;
        if !self.cfg.enabled || !h.enabled || self.traps.is_empty() {
            return 0;
        }
        h.lookback_minutes
            .min(h.window_minutes)
            .max(0)
            .saturating_mul(LEVEL_MS[0])
    }

    /// The user id of a click `judge` moved (valid until the next `judge` that starts
    /// with an empty moves list).
    pub fn moved_user(&self, m: &Moved) -> &[u8] {
        let (off, len) = (m.user.0 as usize, m.user.1 as usize);
        self.moved_users.get(off..off + len).unwrap_or_default()
    }

    /// Whether the stage runs at all (`rules.enabled`).
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// The rules version: a short hash of the effective rules config and the CIDR file's
    /// bytes ("off" when the rules are off). Two aggregators with the same version classify
    /// the same clicks the same way.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Classifies one counted click (`c` as read from the WAL at `origin`, `a` as the
    /// window operator routed it to `shard`): `None` = valid. Clicks a rule moves because
    /// of this one are appended to `moved`.
    pub fn judge(
        &mut self,
        c: &ClickIn<'_>,
        origin: Origin,
        shard: usize,
        a: &Applied,
        moved: &mut Vec<Moved>,
    ) -> Option<Reason> {
        if !self.cfg.enabled {
            return None;
        }
        let first_moved = moved.len();
        if first_moved == 0 {
            self.moved_users.clear();
        }
        let look_back_ms = self.look_back_ms();
        let cfg = &self.cfg;
        let ip = ip_key(c.client_ip);
        let user = user_key(c.user_id);
        let t = a.event_time_ms;
        // Honeypot: a trap click flags its client (before judging, so it is invalid too).
        let trap = cfg.honeypot.enabled
            && !self.traps.is_empty()
            && self.traps.binary_search(&a.ad).is_ok();
        if trap {
            let flag = |f: &mut (i64, i64)| *f = (f.0.min(t), f.1.max(t));
            if let Some(k) = ip {
                flag(self.flag_ip.entry(k).or_insert((t, t)));
            }
            if let Some(k) = user {
                flag(self.flag_user.entry(k).or_insert((t, t)));
            }
        }
        let w = cfg.honeypot.window_minutes.saturating_mul(LEVEL_MS[0]);
        let flagged = |f: Option<&(i64, i64)>| {
            f.is_some_and(|&(first, last)| {
                t >= first.saturating_sub(w) && t <= last.saturating_add(w)
            })
        };
        // Rate counters count every counted click of the client (invalid ones too: a bot
        // flooding is flooding whatever else it is).
        let minute = t.div_euclid(LEVEL_MS[0]);
        let m = self.minutes.entry(minute).or_default();
        let moved_users = &mut self.moved_users;
        let trip = |r: &mut Rate,
                    max: u32,
                    reason: Reason,
                    out: &mut Vec<Moved>,
                    (pending, users): (&mut Vec<Option<Held>>, &[u8]),
                    out_users: &mut Vec<u8>| {
            r.count = r.count.saturating_add(1);
            if r.count > max && !r.tripped {
                r.tripped = true;
                for id in r.pending.take() {
                    if let Some(h) = pending.get_mut(id as usize).and_then(Option::take) {
                        out.push(h.moved(reason, users, out_users));
                    }
                }
            }
            r.tripped
        };
        // A client's clicks are tracked per minute for the rate rules, and for a trap
        // click's look back (only while trap ads exist).
        let look_back = look_back_ms > 0;
        let track_ip = ip.filter(|_| cfg.ip_rate.enabled || look_back);
        let track_user = user.filter(|_| cfg.user_rate.enabled || look_back);
        let limit = |r: &RateRule| {
            if r.enabled {
                r.max_per_minute
            } else {
                u32::MAX
            }
        };
        let ip_tripped = match track_ip {
            Some(k) => trip(
                m.ip.entry(k).or_default(),
                limit(&cfg.ip_rate),
                Reason::IpRate,
                moved,
                (&mut m.pending, &m.users),
                moved_users,
            ),
            None => false,
        };
        let user_tripped = match track_user {
            Some(k) => trip(
                m.user.entry(k).or_default(),
                limit(&cfg.user_rate),
                Reason::UserRate,
                moved,
                (&mut m.pending, &m.users),
                moved_users,
            ),
            None => false,
        };
        let reason = if cfg.bot_user_agent.enabled
            && c.ua_class == adclick_proto::v1::UserAgentClass::Bot as i32
        {
            Some(Reason::BotUserAgent)
        } else if cfg.datacenter_ip.enabled && self.cidrs.contains(c.client_ip) {
            Some(Reason::DatacenterIp)
        } else if cfg.honeypot.enabled
            && (trap
                || ip.is_some_and(|k| flagged(self.flag_ip.get(&k)))
                || user.is_some_and(|k| flagged(self.flag_user.get(&k))))
        {
            Some(Reason::Honeypot)
        } else if cfg.impossible_time.enabled && impossible_time(c) {
            Some(Reason::ImpossibleTime)
        } else if cfg.too_fast.enabled
            && c.token_issued_at_ms > 0
            && t.saturating_sub(c.token_issued_at_ms) < cfg.too_fast.min_ms
        {
            Some(Reason::TooFast)
        } else if ip_tripped {
            Some(Reason::IpRate)
        } else if user_tripped {
            Some(Reason::UserRate)
        } else {
            None
        };
        // A valid click a rule may still move is remembered with its minute.
        if reason.is_none() && (track_ip.is_some() || track_user.is_some()) {
            let id = u32::try_from(m.pending.len()).unwrap_or(u32::MAX);
            let mut ip_bytes = [0u8; 16];
            let ip_len = match c.client_ip.len() {
                n @ (4 | 16) => {
                    ip_bytes[..n].copy_from_slice(c.client_ip);
                    n as u8
                }
                _ => 0,
            };
            let user_at = u32::try_from(m.users.len()).unwrap_or(u32::MAX);
            m.users.extend_from_slice(c.user_id);
            m.pending.push(Some(Held {
                shard: u32::try_from(shard).unwrap_or(0),
                origin,
                click: *a,
                ip: ip_bytes,
                ip_len,
                user: (user_at, u32::try_from(c.user_id.len()).unwrap_or(0)),
            }));
            if let Some(r) = track_ip.and_then(|k| m.ip.get_mut(&k)) {
                r.pending.push(id);
            }
            if let Some(r) = track_user.and_then(|k| m.user.get_mut(&k)) {
                r.pending.push(id);
            }
        }
        // A trap click reaches back: the client's clicks counted as valid in the look-back
        // before it (and any after it, event time, that arrived first) move to invalid.
        if trap && look_back {
            let since = t.saturating_sub(look_back_ms);
            let (from, to) = (
                since.div_euclid(LEVEL_MS[0]),
                t.saturating_add(w).div_euclid(LEVEL_MS[0]),
            );
            for (_, m) in self.minutes.range_mut(from..=to) {
                let held = (&mut m.pending[..], &m.users[..]);
                if let Some(r) = track_ip.and_then(|k| m.ip.get_mut(&k)) {
                    move_since(&mut r.pending, held, since, (moved, &mut self.moved_users));
                }
                let held = (&mut m.pending[..], &m.users[..]);
                if let Some(r) = track_user.and_then(|k| m.user.get_mut(&k)) {
                    move_since(&mut r.pending, held, since, (moved, &mut self.moved_users));
                }
            }
        }
        for mv in &moved[first_moved..] {
            self.counters.invalid[mv.reason.index()] += 1;
            self.counters.moved[mv.reason.index()] += 1;
        }
        if let Some(r) = reason {
            self.counters.invalid[r.index()] += 1;
        }
        reason
    }

    /// Drops rate counters of minutes that ended [`GRACE_MS`] or more before the
    /// watermark, and honeypot flags whose window ended that long ago. Called by the
    /// writer after every batch (live and replay alike).
    pub fn expire(&mut self, watermark_ms: i64) {
        if watermark_ms == i64::MIN {
            return;
        }
        let horizon = watermark_ms.saturating_sub(GRACE_MS);
        // Minute m ends at (m + 1) * 60 s: keep those ending after the horizon, and the
        // honeypot's look-back before it (a trap click at the horizon reaches that far).
        let keep_from = horizon
            .saturating_sub(self.look_back_ms())
            .div_euclid(LEVEL_MS[0]);
        if self
            .minutes
            .first_key_value()
            .is_some_and(|(m, _)| *m < keep_from)
        {
            self.minutes = self.minutes.split_off(&keep_from);
        }
        let w = self.cfg.honeypot.window_minutes.saturating_mul(LEVEL_MS[0]);
        self.flag_ip.retain(|_, f| f.1.saturating_add(w) >= horizon);
        self.flag_user
            .retain(|_, f| f.1.saturating_add(w) >= horizon);
    }

    /// Minutes with rate state, clicks remembered for a retroactive move, honeypot flags.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let pending = self
            .minutes
            .values()
            .map(|m| m.pending.iter().filter(|p| p.is_some()).count())
            .sum();
        (
            self.minutes.len(),
            pending,
            self.flag_ip.len() + self.flag_user.len(),
        )
    }

    /// Serialises the state (checkpoint table `rules`). Sorted, so equal states give
    /// equal bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut pb = RulesPb {
            version: self.version.clone(),
            ..RulesPb::default()
        };
        for (&minute, m) in &self.minutes {
            let mut mp = MinutePb {
                minute,
                ..MinutePb::default()
            };
            let rate = |kind: u32, key: Vec<u8>, r: &Rate| RatePb {
                kind,
                key,
                count: r.count,
                tripped: r.tripped,
                pending: r.pending.to_vec(),
            };
            let mut ips: Vec<_> = m.ip.iter().collect();
            ips.sort_unstable_by_key(|(k, _)| **k);
            mp.rates.extend(
                ips.into_iter()
                    .map(|(k, r)| rate(0, k.to_be_bytes().to_vec(), r)),
            );
            let mut users: Vec<_> = m.user.iter().collect();
            users.sort_unstable_by_key(|(k, _)| **k);
            mp.rates.extend(
                users
                    .into_iter()
                    .map(|(k, r)| rate(1, k.to_be_bytes().to_vec(), r)),
            );
            for (id, p) in m.pending.iter().enumerate() {
                if let Some(Held {
                    shard,
                    origin,
                    click: a,
                    ip,
                    ip_len,
                    user,
                }) = p
                {
                    let (off, len) = (user.0 as usize, user.1 as usize);
                    mp.pending.push(PendPb {
                        id: u32::try_from(id).unwrap_or(u32::MAX),
                        shard: *shard,
                        pos: origin.pos,
                        index: origin.index,
                        ip: ip[..usize::from(*ip_len)].to_vec(),
                        user_id: m.users.get(off..off + len).unwrap_or_default().to_vec(),
                        ad: a.ad,
                        advertiser: a.advertiser,
                        campaign: a.campaign,
                        event_time_ms: a.event_time_ms,
                        combo: a.combo,
                        user: a.user,
                        late: a.late,
                    });
                }
            }
            mp.len = u32::try_from(m.pending.len()).unwrap_or(u32::MAX);
            pb.minutes.push(mp);
        }
        let mut flags: Vec<FlagPb> = self
            .flag_ip
            .iter()
            .map(|(k, f)| FlagPb {
                kind: 0,
                key: k.to_be_bytes().to_vec(),
                first: f.0,
                last: f.1,
            })
            .chain(self.flag_user.iter().map(|(k, f)| FlagPb {
                kind: 1,
                key: k.to_be_bytes().to_vec(),
                first: f.0,
                last: f.1,
            }))
            .collect();
        flags.sort_unstable_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
        pb.flags = flags;
        pb.encode_to_vec()
    }

    /// Restores the state a checkpoint saved. `dims` maps a combination id back to its key
    /// (the window operator's table, restored first). A checkpoint from another rules
    /// version is still restored: its counters are facts about clicks, and the version in
    /// force decides from here on (logged by the caller).
    pub fn restore(&mut self, b: &[u8], dims: &dyn Fn(u32) -> DimKey) -> Result<String, String> {
        let pb = RulesPb::decode(b).map_err(|e| format!("rules checkpoint: {e}"))?;
        let bad = |what: &str| format!("rules checkpoint: bad {what}");
        self.minutes.clear();
        for mp in pb.minutes {
            let mut m = Minute {
                pending: vec![None; mp.len as usize],
                ..Minute::default()
            };
            for p in mp.pending {
                let mut ip = [0u8; 16];
                let ip_len = match p.ip.len() {
                    n @ (0 | 4 | 16) => {
                        ip[..n].copy_from_slice(&p.ip);
                        n as u8
                    }
                    _ => return Err(bad("pending ip")),
                };
                let user_at = u32::try_from(m.users.len()).unwrap_or(u32::MAX);
                m.users.extend_from_slice(&p.user_id);
                let slot = m
                    .pending
                    .get_mut(p.id as usize)
                    .ok_or_else(|| bad("pending id"))?;
                *slot = Some(Held {
                    ip,
                    ip_len,
                    user: (user_at, u32::try_from(p.user_id.len()).unwrap_or(0)),
                    shard: p.shard,
                    origin: Origin {
                        pos: p.pos,
                        index: p.index,
                    },
                    click: Applied {
                        ad: p.ad,
                        advertiser: p.advertiser,
                        campaign: p.campaign,
                        event_time_ms: p.event_time_ms,
                        combo: p.combo,
                        dims: dims(p.combo),
                        user: p.user,
                        late: p.late,
                    },
                });
            }
            for r in mp.rates {
                let rate = Rate {
                    count: r.count,
                    tripped: r.tripped,
                    pending: Ids::from_vec(r.pending),
                };
                match r.kind {
                    0 => {
                        let k = <[u8; 16]>::try_from(&r.key[..]).map_err(|_| bad("ip key"))?;
                        m.ip.insert(u128::from_be_bytes(k), rate);
                    }
                    _ => {
                        let k = <[u8; 8]>::try_from(&r.key[..]).map_err(|_| bad("user key"))?;
                        m.user.insert(u64::from_be_bytes(k), rate);
                    }
                }
            }
            self.minutes.insert(mp.minute, m);
        }
        self.flag_ip.clear();
        self.flag_user.clear();
        for f in pb.flags {
            match f.kind {
                0 => {
                    let k = <[u8; 16]>::try_from(&f.key[..]).map_err(|_| bad("flag key"))?;
                    self.flag_ip
                        .insert(u128::from_be_bytes(k), (f.first, f.last));
                }
                _ => {
                    let k = <[u8; 8]>::try_from(&f.key[..]).map_err(|_| bad("flag key"))?;
                    self.flag_user
                        .insert(u64::from_be_bytes(k), (f.first, f.last));
                }
            }
        }
        Ok(pb.version)
    }
}

/// Moves the clicks of one client's list (`ids`, into its minute's `pending`) with event
/// time at or after `since` to invalid as `honeypot`; the list keeps the ones before
/// (a minute at the edge of the look-back holds clicks on both sides of it), so a rate
/// rule can still move them.
fn move_since(
    ids: &mut Ids,
    (pending, users): (&mut [Option<Held>], &[u8]),
    since: i64,
    (moved, out_users): (&mut Vec<Moved>, &mut Vec<u8>),
) {
    let mut keep = Ids::default();
    for id in ids.take() {
        let Some(slot) = pending.get_mut(id as usize) else {
            continue;
        };
        match slot {
            Some(h) if h.click.event_time_ms < since => keep.push(id),
            Some(_) => {
                if let Some(h) = slot.take() {
                    moved.push(h.moved(Reason::Honeypot, users, out_users));
                }
            }
            // Moved already (by a rate rule, or through the client's other key).
            None => {}
        }
    }
    *ids = keep;
}

/// `impossible_time`: the device's own clock, corrected for its offset, puts the click
/// outside the token's lifetime. The collector already refused event times implausible
/// for the token at the edge (`countable::check_at_edge`: outside [expires − 30 d − 5 min,
/// expires + 5 min]) and clamped the corrected time into [issued, received], so the event
/// time the aggregator counts is always plausible; what the clamp hides is a device that
/// *claims* a time before the impression existed or after its token expired, or after it
/// sent the click. That unclamped time is `occurred + (received − sent)`. Skipped when the
/// collector flagged the device clock (no correction was possible; event = received time)
/// or the click carries no issued-at (an older collector).
fn impossible_time(c: &ClickIn<'_>) -> bool {
    if c.clock_skew_flagged || c.token_issued_at_ms <= 0 || c.sent_at_ms <= 0 {
        return false;
    }
    let raw = c
        .occurred_at_ms
        .saturating_add(c.received_at_ms.saturating_sub(c.sent_at_ms));
    raw < c.token_issued_at_ms.saturating_sub(ISSUER_SKEW_MS)
        || raw > c.token_expires_at_ms.saturating_add(ISSUER_SKEW_MS)
        || raw > c.received_at_ms
}

/// The rules version: XXH64 of the effective rules config (JSON, the CIDR file's path left
/// out: moving the file changes nothing) and the CIDR file's bytes, 12 hex digits.
fn version_of(cfg: &RulesConfig, cidr_text: &[u8]) -> String {
    if !cfg.enabled {
        return "off".into();
    }
    let mut c = cfg.clone();
    c.datacenter_ip.cidr_file = None;
    let mut bytes = serde_json::to_vec(&c).unwrap_or_default();
    bytes.push(0);
    bytes.extend_from_slice(cidr_text);
    format!("{:012x}", xxhash_rust::xxh64::xxh64(&bytes, 0) >> 16)
}

#[derive(Clone, PartialEq, Message)]
struct RulesPb {
    #[prost(message, repeated, tag = "1")]
    minutes: Vec<MinutePb>,
    #[prost(message, repeated, tag = "2")]
    flags: Vec<FlagPb>,
    #[prost(string, tag = "3")]
    version: String,
}

#[derive(Clone, PartialEq, Message)]
struct MinutePb {
    #[prost(sint64, tag = "1")]
    minute: i64,
    #[prost(message, repeated, tag = "2")]
    rates: Vec<RatePb>,
    #[prost(message, repeated, tag = "3")]
    pending: Vec<PendPb>,
    /// Length of the pending table (moved slots are not written).
    #[prost(uint32, tag = "4")]
    len: u32,
}

#[derive(Clone, PartialEq, Message)]
struct RatePb {
    /// 0: IP (16-byte key), 1: user (8-byte key).
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
    #[prost(uint32, tag = "3")]
    count: u32,
    #[prost(bool, tag = "4")]
    tripped: bool,
    #[prost(uint32, repeated, tag = "5")]
    pending: Vec<u32>,
}

#[derive(Clone, PartialEq, Message)]
struct PendPb {
    #[prost(uint32, tag = "1")]
    id: u32,
    #[prost(uint32, tag = "2")]
    shard: u32,
    #[prost(uint64, tag = "3")]
    ad: u64,
    #[prost(uint64, tag = "4")]
    advertiser: u64,
    #[prost(uint64, tag = "5")]
    campaign: u64,
    #[prost(sint64, tag = "6")]
    event_time_ms: i64,
    #[prost(uint32, tag = "7")]
    combo: u32,
    #[prost(uint32, tag = "8")]
    user: u32,
    #[prost(bool, tag = "9")]
    late: bool,
    #[prost(uint64, tag = "10")]
    pos: u64,
    #[prost(uint32, tag = "11")]
    index: u32,
    #[prost(bytes = "vec", tag = "12")]
    ip: Vec<u8>,
    #[prost(bytes = "vec", tag = "13")]
    user_id: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct FlagPb {
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
    #[prost(sint64, tag = "3")]
    first: i64,
    #[prost(sint64, tag = "4")]
    last: i64,
}

#[cfg(test)]
mod tests;
