//! Query answering over the shards: authorisation, filters, `GetAdClicks` and `TopAds`,
//! shared by the gRPC service and the HTTP/JSON mirror. Wire types are converted to the
//! domain `Filter` here; shard state never sees them. Every field is validated (`validate`)
//! before state is read: an invalid request is a [`QueryError::Invalid`] naming its
//! fields, never an answer.
//!
//! Visibility: an advertiser key sees only its advertiser's ads; other ads are simply
//! absent (an empty answer), never an error that would reveal they exist.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use adclick_proto::v1::{
    self, AdCount, Bucket, GetAdClicksResponse, Granularity, TimeRange, TopAdsResponse,
};

use crate::config::{ApiKey, QueryConfig, Role};
use crate::rules::N_REASONS;
use crate::sketch::hll::Hll;
use crate::state::dims::DimKey;
use crate::state::shard::{CellRef, LEVEL_MS, ShardState};
use crate::state::topn::{TopIndex, count_of, top_bounded, top_of};
use crate::state::topset::{FilterKey, IndexField, TopSet};
use crate::validate::{self, FilterSpec, Limits, Violations};
use crate::view::{QueryMeta, View};

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Missing or unknown API key.
    #[error("missing or invalid API key: send `authorization: Bearer <key>`")]
    Unauthenticated,
    /// Request fields that are invalid, each named (gRPC INVALID_ARGUMENT with
    /// `google.rpc.BadRequest` details, HTTP 400 with an RFC 9457 problem).
    #[error("{0}")]
    Invalid(Violations),
    /// A bad request not tied to one field (an HTTP query string over its bounds), or a
    /// check inside [`top_ads`] that `validate::top_ads` makes first for every caller
    /// that validates.
    #[error("{0}")]
    InvalidArgument(String),
    /// State needed for the answer could not be read (a click-index file): retry later
    /// (gRPC UNAVAILABLE, HTTP 503).
    #[error("{0}")]
    Unavailable(String),
}

impl From<Violations> for QueryError {
    fn from(v: Violations) -> Self {
        QueryError::Invalid(v)
    }
}

/// Which clicks a query counts (`adclick.v1.Traffic`; issue 16). The shards' cells count
/// ALL traffic and keep invalid traffic apart by reason (`ShardState::invalid`), so VALID
/// clicks are all − invalid. Unique users cannot be subtracted (HyperLogLog): VALID and ALL
/// report the distinct users of all the bucket's clicks, INVALID those of its invalid
/// clicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// Billable clicks (the default).
    Valid,
    /// Clicks the rules classified invalid.
    Invalid,
    /// Both.
    All,
}

impl Traffic {
    /// The request's `traffic` checked: a known value. (The click index answers every
    /// value: its invalid lane holds the invalid clicks, moves included.)
    pub fn of(v: i32) -> Result<Traffic, QueryError> {
        use crate::validate::{Field, Reason};
        let t = match v1::Traffic::try_from(v) {
            Ok(v1::Traffic::Valid) => Traffic::Valid,
            Ok(v1::Traffic::Invalid) => Traffic::Invalid,
            Ok(v1::Traffic::All) => Traffic::All,
            Err(_) => {
                let mut bad = Violations::default();
                bad.push(
                    Field::Traffic,
                    Reason::UnknownValue,
                    format!("unknown traffic {v}: VALID (0), INVALID (1) or ALL (2)"),
                );
                return Err(QueryError::Invalid(bad));
            }
        };
        Ok(t)
    }
}

/// Clicks of `ad` in the bucket of `level` at `start` on one shard that the filter keeps,
/// for `traffic`; users merged into `users` (of all clicks, or of the invalid ones for
/// INVALID); the invalid clicks added to `by_reason`.
#[allow(clippy::too_many_arguments)]
fn tally_traffic(
    s: &ShardState,
    level: usize,
    ad: u64,
    start: i64,
    filter: &Filter,
    traffic: Traffic,
    mut users: Option<&mut Hll>,
    by_reason: &mut [u64; N_REASONS],
) -> u64 {
    let mut all = 0;
    if traffic != Traffic::Invalid {
        for cell in s.parts(level, ad, start) {
            all += filter.tally(cell, users.as_deref_mut());
        }
    }
    let mut invalid = 0;
    for (r, n) in by_reason.iter_mut().enumerate() {
        if let Some(inv) = s.invalid(r) {
            for cell in inv.parts(level, ad, start) {
                let u = if traffic == Traffic::Invalid {
                    users.as_deref_mut()
                } else {
                    None
                };
                let c = filter.tally(cell, u);
                *n += c;
                invalid += c;
            }
        }
    }
    match traffic {
        Traffic::Valid => all.saturating_sub(invalid),
        Traffic::Invalid => invalid,
        Traffic::All => all,
    }
}

/// `invalid_by_reason` of a response: the reasons with clicks.
fn reason_counts(by_reason: &[u64; N_REASONS]) -> Vec<v1::ReasonCount> {
    crate::rules::Reason::ALL
        .iter()
        .filter(|r| by_reason[r.index()] > 0)
        .map(|r| v1::ReasonCount {
            reason: r.proto(),
            clicks: by_reason[r.index()],
        })
        .collect()
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Sees everything.
    Admin,
    /// Sees one advertiser's ads.
    Advertiser(u64),
}

/// Compares secrets without revealing, by timing, how long a matching prefix is (`subtle`;
/// only the lengths, which are not secret, can be learnt).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Resolves an `authorization` header value against the configured keys.
pub fn authorize(keys: &[ApiKey], header: Option<&str>) -> Result<Caller, QueryError> {
    let token = header
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or(QueryError::Unauthenticated)?;
    // Compare every key fully so timing does not reveal a matching prefix.
    let mut found = None;
    for k in keys {
        if constant_time_eq(&k.key, token) {
            found = Some(k);
        }
    }
    match found {
        Some(k) if k.role == Role::Admin => Ok(Caller::Admin),
        Some(k) => k
            .advertiser_id
            .map(Caller::Advertiser)
            .ok_or(QueryError::Unauthenticated),
        None => Err(QueryError::Unauthenticated),
    }
}

/// A filter in domain terms. `None` lists do not filter; a list naming only values never
/// seen matches nothing.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    countries: Option<Vec<[u8; 2]>>,
    devices: Option<Vec<u8>>,
    os: Option<Vec<u32>>,
    sites: Option<Vec<u32>>,
    advertisers: Option<Vec<u64>>,
    campaigns: Option<Vec<u64>>,
    /// With a dimension filter: whether combination id `i + 1` matches.
    combo_ok: Vec<bool>,
    /// `filter.ip` as an inclusive range of click-index keys.
    ip: Option<(crate::clickindex::Ip, crate::clickindex::Ip)>,
    /// `filter.user_id`.
    user: Option<String>,
}

fn ids(values: &[String], meta: &QueryMeta) -> Option<Vec<u32>> {
    (!values.is_empty()).then(|| {
        values
            .iter()
            .filter_map(|v| meta.names.get(v).copied())
            .collect()
    })
}

fn list<T: Clone>(values: &[T]) -> Option<Vec<T>> {
    (!values.is_empty()).then(|| values.to_vec())
}

impl Filter {
    /// Validates the wire filter (every value: see `validate::filter`) and resolves it
    /// against the interned names and combinations.
    pub fn parse(f: Option<&v1::Filter>, meta: &QueryMeta) -> Result<Self, QueryError> {
        let mut bad = Violations::default();
        let spec = validate::filter(f, &mut bad);
        if !bad.is_empty() {
            return Err(QueryError::Invalid(bad));
        }
        Ok(Filter::resolve(&spec, meta))
    }

    /// Resolves a validated filter against the interned names and combinations.
    pub fn resolve(spec: &FilterSpec<'_>, meta: &QueryMeta) -> Self {
        let mut filter = Filter {
            countries: list(&spec.countries),
            devices: list(&spec.devices),
            os: ids(spec.os, meta),
            sites: ids(spec.sites, meta),
            advertisers: list(spec.advertisers),
            campaigns: list(spec.campaigns),
            combo_ok: Vec::new(),
            ip: spec.ip,
            user: spec.user_id.map(str::to_string),
        };
        if filter.dims_filtered() {
            filter.combo_ok = meta.combos.iter().map(|k| filter.matches_dims(k)).collect();
        }
        filter
    }

    /// The constrained fields and the value indexes each allows, including the caller's
    /// advertiser scope (empty: nothing is filtered).
    pub fn fields(&self, caller: Caller) -> Vec<Field> {
        fn keys<T: Copy>(v: &Option<Vec<T>>, f: impl Fn(T) -> FilterKey) -> Option<Vec<FilterKey>> {
            v.as_ref().map(|v| v.iter().map(|x| f(*x)).collect())
        }
        let advertisers = match (caller, &self.advertisers) {
            (Caller::Admin, a) => a.clone(),
            (Caller::Advertiser(own), None) => Some(vec![own]),
            (Caller::Advertiser(own), Some(a)) => {
                Some(a.iter().copied().filter(|x| *x == own).collect())
            }
        };
        [
            (
                IndexField::Country,
                keys(&self.countries, FilterKey::Country),
            ),
            (IndexField::Device, keys(&self.devices, FilterKey::Device)),
            (IndexField::Os, keys(&self.os, FilterKey::Os)),
            (IndexField::Site, keys(&self.sites, FilterKey::Site)),
            (
                IndexField::Advertiser,
                keys(&advertisers, FilterKey::Advertiser),
            ),
            (
                IndexField::Campaign,
                keys(&self.campaigns, FilterKey::Campaign),
            ),
        ]
        .into_iter()
        .filter_map(|(kind, keys)| keys.map(|keys| Field { kind, keys }))
        .collect()
    }

    /// Whether the answer comes from the click index (`ip` or `user_id` given).
    pub fn uses_click_index(&self) -> bool {
        self.ip.is_some() || self.user.is_some()
    }

    /// Whether combination `id` passes the dimension filter.
    fn combo_matches(&self, id: u32) -> bool {
        !self.dims_filtered()
            || (id as usize)
                .checked_sub(1)
                .and_then(|i| self.combo_ok.get(i))
                .copied()
                .unwrap_or(false)
    }

    /// Every click-index hit of `[from_ms, to_ms)` of `traffic` that this filter's
    /// dimension fields keep (the caller gates the ad: visibility, advertiser, campaign).
    /// ALL reads the index's `all` lane, INVALID its invalid lane, VALID the first less
    /// the second per (ad, minute, combination, user): every invalid click is in both.
    fn index_hits(
        &self,
        view: &View,
        traffic: Traffic,
        from_ms: i64,
        to_ms: i64,
        f: &mut dyn FnMut(crate::clickindex::Hit),
    ) -> Result<(), QueryError> {
        match traffic {
            Traffic::All => self.lane_hits(&view.clicks, from_ms, to_ms, f),
            Traffic::Invalid => self.lane_hits(&view.invalid_clicks, from_ms, to_ms, f),
            Traffic::Valid => {
                let mut invalid: HashMap<(u64, u32, u32, u64), u64> = HashMap::new();
                self.lane_hits(&view.invalid_clicks, from_ms, to_ms, &mut |h| {
                    *invalid
                        .entry((h.ad, h.minute, h.combo, h.user))
                        .or_default() += h.count;
                })?;
                self.lane_hits(&view.clicks, from_ms, to_ms, &mut |mut h| {
                    if let Some(left) = invalid.get_mut(&(h.ad, h.minute, h.combo, h.user)) {
                        let d = (*left).min(h.count);
                        *left -= d;
                        h.count -= d;
                    }
                    if h.count > 0 {
                        f(h);
                    }
                })
            }
        }
    }

    /// [`Filter::index_hits`] on one lane.
    fn lane_hits(
        &self,
        lane: &crate::clickindex::Shared,
        from_ms: i64,
        to_ms: i64,
        f: &mut dyn FnMut(crate::clickindex::Hit),
    ) -> Result<(), QueryError> {
        let minute = |t: i64| u32::try_from(t.div_euclid(LEVEL_MS[0]).max(0)).unwrap_or(u32::MAX);
        let probe = crate::clickindex::Probe {
            ip: self.ip,
            user: self.user.as_deref().map(str::as_bytes),
            from_minute: minute(from_ms),
            to_minute: minute(to_ms + LEVEL_MS[0] - 1),
        };
        lane.load()
            .scan(&probe, &mut |h| {
                if self.combo_matches(h.combo) {
                    f(h);
                }
            })
            .map_err(|e| match e {
                crate::clickindex::SegmentError::Unsupported(why) => {
                    let mut bad = Violations::default();
                    bad.push(
                        crate::validate::Field::FilterIp,
                        crate::validate::Reason::Conflict,
                        why,
                    );
                    QueryError::Invalid(bad)
                }
                e => {
                    tracing::error!(error = %e, "click index read failed");
                    QueryError::Unavailable(format!("click index unavailable: {e}"))
                }
            })
    }

    fn dims_filtered(&self) -> bool {
        self.countries.is_some()
            || self.devices.is_some()
            || self.os.is_some()
            || self.sites.is_some()
    }

    fn matches_dims(&self, k: &DimKey) -> bool {
        self.countries
            .as_ref()
            .is_none_or(|v| v.contains(&k.country))
            && self.devices.as_ref().is_none_or(|v| v.contains(&k.device))
            && self.os.as_ref().is_none_or(|v| v.contains(&k.os))
            && self.sites.as_ref().is_none_or(|v| v.contains(&k.site))
    }

    fn matches_ad(&self, meta: Option<(u64, u64)>, caller: Caller) -> bool {
        let Some((adv, camp)) = meta else {
            return false;
        };
        if let Caller::Advertiser(own) = caller
            && adv != own
        {
            return false;
        }
        self.advertisers.as_ref().is_none_or(|v| v.contains(&adv))
            && self.campaigns.as_ref().is_none_or(|v| v.contains(&camp))
    }

    /// Clicks and users of a cell that match the dimension filter.
    fn tally(&self, cell: CellRef<'_>, users: Option<&mut Hll>) -> u64 {
        if !self.dims_filtered() {
            if users.is_none() {
                return u64::from(cell.cell.clicks);
            }
            return cell.tally(|_| true, users);
        }
        cell.tally(
            |id| {
                (id as usize)
                    .checked_sub(1)
                    .and_then(|i| self.combo_ok.get(i))
                    .copied()
                    .unwrap_or(false)
            },
            users,
        )
    }
}

/// One constrained field of a filter: which field, and the value indexes its allowed
/// values select (empty: no value can match).
#[derive(Debug)]
pub struct Field {
    kind: IndexField,
    keys: Vec<FilterKey>,
}

impl Field {
    /// Advertiser and campaign are properties of the ad; the others of each click.
    fn per_ad(&self) -> bool {
        matches!(self.kind, IndexField::Advertiser | IndexField::Campaign)
    }
}

/// `TopAds` for a filtered request from the top-N indexes; `None` when the search would
/// cost more than a scan (the caller then scans the minute cells).
///
/// A field with value indexes (`shards.top_index_fields`) answers alone exactly: each click
/// has one value per field, so the union of the allowed values' indexes holds exactly the
/// matching clicks. Otherwise the indexed field with the fewest cells (or the unfiltered
/// index) bounds the search, since a matching click is in it, and each candidate gets its
/// exact count: per-ad fields only gate the ad (an ad has one owner: it matches iff it has
/// clicks in that field's indexes, or by the owner table when the field has none), a lone
/// indexed per-click field counts from its indexes, and anything else from the minute
/// cells (read under the shards' read locks).
fn filtered_top(
    view: &View,
    tops: &[Arc<TopSet>],
    filter: &Filter,
    caller: Caller,
    fields: &[Field],
    n: usize,
    (fm, tm): (i64, i64),
) -> Option<Vec<(u64, u64)>> {
    if fields.iter().any(|f| f.keys.is_empty()) {
        return Some(Vec::new());
    }
    let indexes = |f: &Field| -> Option<Vec<&TopIndex>> {
        tops.iter().all(|t| t.has(f.kind)).then(|| {
            tops.iter()
                .flat_map(|t| f.keys.iter().filter_map(|k| t.index(*k)))
                .collect()
        })
    };
    let idx: Vec<Option<Vec<&TopIndex>>> = fields.iter().map(indexes).collect();
    if let [Some(only)] = &idx[..] {
        return Some(top_of(only, n, fm, tm));
    }
    let all: Vec<&TopIndex> = tops.iter().map(|t| &t.all).collect();
    let bound: &[&TopIndex] = idx
        .iter()
        .flatten()
        .min_by_key(|i| i.iter().map(|x| x.cell_count()).sum::<usize>())
        .map_or(&all, Vec::as_slice);
    let per_ad: Vec<Option<&[&TopIndex]>> = fields
        .iter()
        .zip(&idx)
        .filter(|(f, _)| f.per_ad())
        .map(|(_, i)| i.as_deref())
        .collect();
    let per_click: Vec<Option<&[&TopIndex]>> = fields
        .iter()
        .zip(&idx)
        .filter(|(f, _)| !f.per_ad())
        .map(|(_, i)| i.as_deref())
        .collect();
    // Per-ad gate: from the indexes when every per-ad field has them, else the owner table.
    let owners = per_ad
        .iter()
        .any(Option::is_none)
        .then(|| view.owners.read().unwrap_or_else(|e| e.into_inner()));
    let owned = |ad: u64| match &owners {
        Some(o) => filter.matches_ad(o.get(&ad).copied(), caller),
        None => per_ad.iter().flatten().all(|g| count_of(g, ad, fm, tm) > 0),
    };
    match &per_click[..] {
        [] => top_bounded(bound, n, fm, tm, |ad| {
            if owned(ad) {
                count_of(&all, ad, fm, tm)
            } else {
                0
            }
        }),
        [Some(one)] => top_bounded(bound, n, fm, tm, |ad| {
            if owned(ad) {
                count_of(one, ad, fm, tm)
            } else {
                0
            }
        }),
        _ => {
            let shards = read_shards(view);
            top_bounded(bound, n, fm, tm, |ad| {
                if !owned(ad) {
                    return 0;
                }
                let mut sum = 0u64;
                for s in &shards {
                    for m in fm..tm {
                        if let Some(cell) = s.cell(0, ad, m * LEVEL_MS[0]) {
                            sum = sum.saturating_add(filter.tally(cell, None));
                        }
                    }
                }
                sum
            })
        }
    }
}

/// Read guards on every shard's cells (a poisoned lock is read anyway, as everywhere in
/// this crate: queries keep answering after a writer panic).
fn read_shards(view: &View) -> Vec<std::sync::RwLockReadGuard<'_, ShardState>> {
    view.shards
        .iter()
        .map(|s| s.read().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// `TopAds` by scanning every minute cell of the range under the shards' read locks: what
/// [`filtered_top`] falls back to when its bound cannot prune.
fn scan_top(view: &View, filter: &Filter, caller: Caller, (fm, tm): (i64, i64)) -> Vec<(u64, u64)> {
    let shards = read_shards(view);
    let mut sums: HashMap<u64, u64> = HashMap::new();
    let mut allowed: HashMap<u64, bool> = HashMap::new();
    let owners = view.owners.read().unwrap_or_else(|e| e.into_inner());
    for s in &shards {
        for (_, ad, cell) in s.cells_in(0, fm * LEVEL_MS[0], tm * LEVEL_MS[0]) {
            let ok = *allowed
                .entry(ad)
                .or_insert_with(|| filter.matches_ad(owners.get(&ad).copied(), caller));
            if ok {
                let c = filter.tally(cell, None);
                if c > 0 {
                    *sums.entry(ad).or_default() += c;
                }
            }
        }
    }
    sums.into_iter().collect()
}

/// `TopAds` filtered by `ip` or `user_id`: every click of the IP range or user in the
/// range from the click index, summed per ad the caller may see and the filter keeps.
fn index_top(
    view: &View,
    filter: &Filter,
    caller: Caller,
    traffic: Traffic,
    (fm, tm): (i64, i64),
) -> Result<Vec<(u64, u64)>, QueryError> {
    let mut sums: HashMap<u64, u64> = HashMap::new();
    filter.index_hits(
        view,
        traffic,
        fm * LEVEL_MS[0],
        tm * LEVEL_MS[0],
        &mut |h| {
            *sums.entry(h.ad).or_default() += h.count;
        },
    )?;
    let owners = view.owners.read().unwrap_or_else(|e| e.into_inner());
    Ok(sums
        .into_iter()
        .filter(|(ad, _)| filter.matches_ad(owners.get(ad).copied(), caller))
        .collect())
}

fn check_range(from: i64, to: i64, cfg: &QueryConfig) -> Result<(), QueryError> {
    use crate::state::windows::{MAX_EVENT_MS, MIN_EVENT_MS};
    // Bounds first: every bucket computation below stays far from i64 overflow.
    if !(0..=MAX_EVENT_MS).contains(&from) || !(0..=MAX_EVENT_MS + LEVEL_MS[2]).contains(&to) {
        return Err(QueryError::InvalidArgument(format!(
            "from_ms and to_ms must be between 0 and {MAX_EVENT_MS} (ms since the epoch; data starts at {MIN_EVENT_MS})"
        )));
    }
    if from >= to {
        return Err(QueryError::InvalidArgument(format!(
            "empty range: from_ms ({from}) must be before to_ms ({to})"
        )));
    }
    if to.saturating_sub(from) > cfg.max_range_days.saturating_mul(LEVEL_MS[2]) {
        return Err(QueryError::InvalidArgument(format!(
            "range longer than {} days",
            cfg.max_range_days
        )));
    }
    Ok(())
}

fn ad_meta(view: &View, ad: u64) -> Option<(u64, u64)> {
    view.owners
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&ad)
        .copied()
}

/// `GetAdClicks`: validates every field (`validate::ad_clicks`, against `limits` and the
/// current watermark), then answers.
pub fn get_ad_clicks(
    view: &View,
    caller: Caller,
    req: &v1::GetAdClicksRequest,
    limits: &Limits,
) -> Result<GetAdClicksResponse, QueryError> {
    // One watermark for the retention check and the answer.
    let watermark_ms = view.watermark_ms.load(Ordering::Acquire);
    let plan = validate::ad_clicks(req, limits, watermark_ms)?;
    let meta = view.meta.load_full();
    let filter = Filter::resolve(&plan.filter, &meta);
    let fill = req.fill_empty.unwrap_or(true);
    let traffic = Traffic::of(req.traffic)?;
    answer_ad_clicks(
        view,
        caller,
        req.ad_id,
        &plan,
        &filter,
        (fill, traffic),
        watermark_ms,
    )
}

/// The answer to a validated `GetAdClicks` for `ad` (`plan` and `filter` from its
/// request, which `BatchGetAdClicks` shares between its ads).
fn answer_ad_clicks(
    view: &View,
    caller: Caller,
    ad: u64,
    plan: &validate::AdClicksPlan<'_>,
    filter: &Filter,
    (fill, traffic): (bool, Traffic),
    watermark_ms: i64,
) -> Result<GetAdClicksResponse, QueryError> {
    let (level, from, to) = (plan.level, plan.from_ms, plan.to_ms);
    let width = LEVEL_MS[level];
    let mut resp = GetAdClicksResponse {
        ad_id: ad,
        granularity: [Granularity::Minute, Granularity::Hour, Granularity::Day][level] as i32,
        watermark_ms,
        ..Default::default()
    };
    // An ad the caller may not see answers like an ad without clicks (zeros when filled):
    // nothing tells it apart from an unknown ad.
    let visible = filter.matches_ad(ad_meta(view, ad), caller);
    // Filtered by ip or user: per-bucket clicks and users from the click index.
    let mut indexed: HashMap<i64, (u64, Hll)> = HashMap::new();
    if visible && filter.uses_click_index() {
        filter.index_hits(view, traffic, from, to, &mut |h| {
            if h.ad != ad {
                return;
            }
            let t = i64::from(h.minute) * LEVEL_MS[0];
            let b = indexed
                .entry(t.div_euclid(width) * width)
                .or_insert_with(|| (0, Hll::new()));
            b.0 += h.count;
            if h.user != 0 {
                b.1.insert_hash(h.user);
            }
        })?;
    }
    let shards = if visible && !filter.uses_click_index() {
        read_shards(view)
    } else {
        Vec::new()
    };
    let mut total_users = Hll::new();
    let mut by_reason = [0u64; N_REASONS];
    let mut start = from;
    while start < to {
        let mut users = Hll::new();
        let mut clicks = 0;
        if let Some((c, u)) = indexed.remove(&start) {
            clicks = c;
            users = u;
        }
        for s in &shards {
            clicks += tally_traffic(
                s,
                level,
                ad,
                start,
                filter,
                traffic,
                Some(&mut users),
                &mut by_reason,
            );
        }
        if clicks > 0 {
            total_users.merge(&users);
            resp.total_clicks += clicks;
        }
        if clicks > 0 || fill {
            resp.buckets.push(Bucket {
                start_ms: start,
                clicks,
                unique_users: if clicks > 0 { users.estimate() } else { 0 },
            });
        }
        start += width;
    }
    resp.total_unique_users = total_users.estimate();
    resp.invalid_by_reason = reason_counts(&by_reason);
    Ok(resp)
}

/// `Breakdown`: one ad's clicks in the range by the values of one dimension, top `n`.
/// Validated like `GetAdClicks` plus `group_by` and `n` (all problems reported together).
pub fn breakdown(
    view: &View,
    caller: Caller,
    req: &v1::BreakdownRequest,
    limits: &Limits,
) -> Result<v1::BreakdownResponse, QueryError> {
    let watermark_ms = view.watermark_ms.load(Ordering::Acquire);
    let mut bad = validate::breakdown(req);
    let as_clicks = v1::GetAdClicksRequest {
        ad_id: req.ad_id,
        from_ms: req.from_ms,
        to_ms: req.to_ms,
        granularity: req.granularity,
        filter: req.filter.clone(),
        fill_empty: Some(false),
        traffic: req.traffic,
    };
    let plan = match validate::ad_clicks(&as_clicks, limits, watermark_ms) {
        Ok(p) if bad.is_empty() => p,
        Ok(_) => return Err(QueryError::Invalid(bad)),
        Err(v) => {
            bad.extend(v);
            return Err(QueryError::Invalid(bad));
        }
    };
    let dim = v1::Dimension::try_from(req.group_by).unwrap_or(v1::Dimension::Country);
    let mut resp = v1::BreakdownResponse {
        ad_id: req.ad_id,
        group_by: dim as i32,
        watermark_ms,
        ..Default::default()
    };
    let meta = view.meta.load_full();
    let filter = Filter::resolve(&plan.filter, &meta);
    let traffic = Traffic::of(req.traffic)?;
    if !filter.matches_ad(ad_meta(view, req.ad_id), caller) {
        return Ok(resp);
    }
    // Value of each combination (combination id = index + 1) and the names of the values.
    let mut names: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut by_id: Vec<&str> = vec![""; meta.names.len() + 1];
    for (name, id) in &meta.names {
        if let Some(slot) = by_id.get_mut(*id as usize) {
            *slot = name;
        }
    }
    let value_of = |k: &DimKey| -> String {
        match dim {
            v1::Dimension::Device => v1::Device::try_from(i32::from(k.device))
                .map_or_else(|_| k.device.to_string(), |d| d.as_str_name().to_string()),
            v1::Dimension::Os => by_id.get(k.os as usize).copied().unwrap_or("").to_string(),
            v1::Dimension::Site => by_id
                .get(k.site as usize)
                .copied()
                .unwrap_or("")
                .to_string(),
            _ if k.country == [0, 0] => String::new(),
            _ => String::from_utf8_lossy(&k.country).into_owned(),
        }
    };
    let group: Vec<Option<usize>> = meta
        .combos
        .iter()
        .map(|k| {
            if !filter.matches_dims(k) {
                return None;
            }
            let v = value_of(k);
            let next = names.len();
            Some(*index.entry(v.clone()).or_insert_with(|| {
                names.push(v);
                next
            }))
        })
        .collect();
    let mut sums: Vec<(u64, Hll)> = (0..names.len()).map(|_| (0, Hll::new())).collect();
    let mut invalid: Vec<(u64, Hll)> = (0..names.len()).map(|_| (0, Hll::new())).collect();
    if filter.uses_click_index() {
        filter.index_hits(view, traffic, plan.from_ms, plan.to_ms, &mut |h| {
            let g = (h.combo as usize)
                .checked_sub(1)
                .and_then(|i| group.get(i).copied().flatten());
            if let (true, Some(g)) = (h.ad == req.ad_id, g) {
                sums[g].0 += h.count;
                if h.user != 0 {
                    sums[g].1.insert_hash(h.user);
                }
            }
        })?;
    }
    let shards = if filter.uses_click_index() {
        Vec::new()
    } else {
        read_shards(view)
    };
    let width = LEVEL_MS[plan.level];
    let mut start = plan.from_ms;
    let group_of = |id: u32| {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| group.get(i).copied().flatten())
    };
    while start < plan.to_ms {
        for s in &shards {
            if traffic != Traffic::Invalid {
                for cell in s.parts(plan.level, req.ad_id, start) {
                    cell.tally_by(group_of, &mut sums);
                }
            }
            if traffic != Traffic::All {
                for inv in (0..N_REASONS).filter_map(|r| s.invalid(r)) {
                    for cell in inv.parts(plan.level, req.ad_id, start) {
                        cell.tally_by(group_of, &mut invalid);
                    }
                }
            }
        }
        start += width;
    }
    match traffic {
        Traffic::All => {}
        Traffic::Invalid => sums = invalid,
        // Users of all clicks: sketches cannot subtract (see `Traffic`).
        Traffic::Valid => {
            for (s, i) in sums.iter_mut().zip(&invalid) {
                s.0 = s.0.saturating_sub(i.0);
            }
        }
    }
    let mut values: Vec<v1::ValueCount> = names
        .into_iter()
        .zip(sums)
        .filter(|(_, (c, _))| *c > 0)
        .map(|(value, (clicks, users))| v1::ValueCount {
            value,
            clicks,
            unique_users: users.estimate(),
        })
        .collect();
    resp.total_clicks = values.iter().map(|v| v.clicks).sum();
    values.sort_unstable_by(|a, b| b.clicks.cmp(&a.clicks).then_with(|| a.value.cmp(&b.value)));
    values.truncate(req.n as usize);
    resp.values = values;
    Ok(resp)
}

/// `GetTotals`: the clicks of every ad of one campaign or advertiser that the caller may
/// see and the filter keeps, per bucket, with unique users as the union of the ads'
/// sketches (and the sketches themselves when the query front asks, to merge across
/// shards). The group's ads come from the owner table (one pass over it), then each ad's
/// cells as `GetAdClicks` reads them: the cost grows with the ads of the group times the
/// buckets.
pub fn get_totals(
    view: &View,
    caller: Caller,
    req: &v1::GetTotalsRequest,
    limits: &Limits,
) -> Result<v1::GetTotalsResponse, QueryError> {
    let watermark_ms = view.watermark_ms.load(Ordering::Acquire);
    let plan = validate::totals(req, limits, watermark_ms)?;
    let meta = view.meta.load_full();
    let filter = Filter::resolve(&plan.filter, &meta);
    let fill = req.fill_empty.unwrap_or(true);
    let traffic = Traffic::of(req.traffic)?;
    let mut by_reason = [0u64; N_REASONS];
    let by_campaign = req.scope == v1::TotalsScope::Campaign as i32;
    let ads: std::collections::HashSet<u64> = {
        let owners = view.owners.read().unwrap_or_else(|e| e.into_inner());
        owners
            .iter()
            .filter(|&(_, &(adv, camp))| {
                (if by_campaign { camp } else { adv }) == req.id
                    && filter.matches_ad(Some((adv, camp)), caller)
            })
            .map(|(&ad, _)| ad)
            .collect()
    };
    let (level, from, to) = (plan.level, plan.from_ms, plan.to_ms);
    let width = LEVEL_MS[level];
    let mut buckets: std::collections::BTreeMap<i64, (u64, Hll)> =
        std::collections::BTreeMap::new();
    let mut active: std::collections::HashSet<u64> = std::collections::HashSet::new();
    if filter.uses_click_index() {
        filter.index_hits(view, traffic, from, to, &mut |h| {
            if !ads.contains(&h.ad) {
                return;
            }
            let t = i64::from(h.minute) * LEVEL_MS[0];
            let b = buckets
                .entry(t.div_euclid(width) * width)
                .or_insert_with(|| (0, Hll::new()));
            b.0 += h.count;
            if h.user != 0 {
                b.1.insert_hash(h.user);
            }
            active.insert(h.ad);
        })?;
    } else if !ads.is_empty() {
        let shards = read_shards(view);
        let mut start = from;
        while start < to {
            let (mut clicks, mut users) = (0u64, Hll::new());
            for &ad in &ads {
                for s in &shards {
                    let c = tally_traffic(
                        s,
                        level,
                        ad,
                        start,
                        &filter,
                        traffic,
                        Some(&mut users),
                        &mut by_reason,
                    );
                    if c > 0 {
                        clicks += c;
                        active.insert(ad);
                    }
                }
            }
            if clicks > 0 {
                buckets.insert(start, (clicks, users));
            }
            start += width;
        }
    }
    let mut resp = v1::GetTotalsResponse {
        scope: req.scope,
        id: req.id,
        granularity: [Granularity::Minute, Granularity::Hour, Granularity::Day][level] as i32,
        ads: u32::try_from(active.len()).unwrap_or(u32::MAX),
        watermark_ms,
        ..Default::default()
    };
    let mut total_users = Hll::new();
    let mut start = from;
    while start < to {
        let (clicks, users) = buckets.remove(&start).unwrap_or_else(|| (0, Hll::new()));
        if clicks > 0 || fill {
            resp.total_clicks += clicks;
            total_users.merge(&users);
            resp.buckets.push(v1::TotalsBucket {
                start_ms: start,
                clicks,
                unique_users: if clicks > 0 { users.estimate() } else { 0 },
                users_sketch: if req.include_sketches && clicks > 0 {
                    users.to_bytes()
                } else {
                    Vec::new()
                },
            });
        }
        start += width;
    }
    resp.total_unique_users = total_users.estimate();
    if req.include_sketches {
        resp.total_users_sketch = total_users.to_bytes();
    }
    resp.invalid_by_reason = reason_counts(&by_reason);
    Ok(resp)
}

/// `BatchGetAdClicks`: the ad ids and the shared fields validated (every problem of both
/// reported at once), then `GetAdClicks` for each ad.
pub fn batch_get_ad_clicks(
    view: &View,
    caller: Caller,
    req: &v1::BatchGetAdClicksRequest,
    limits: &Limits,
) -> Result<v1::BatchGetAdClicksResponse, QueryError> {
    let mut bad = validate::ad_ids(&req.ad_ids);
    // The shared fields, checked once with a stand-in id (the ids were checked above); one
    // watermark for every ad.
    let watermark_ms = view.watermark_ms.load(Ordering::Acquire);
    let shared = v1::GetAdClicksRequest {
        ad_id: 1,
        from_ms: req.from_ms,
        to_ms: req.to_ms,
        granularity: req.granularity,
        filter: req.filter.clone(),
        fill_empty: req.fill_empty,
        traffic: req.traffic,
    };
    let plan = match validate::ad_clicks(&shared, limits, watermark_ms) {
        Ok(plan) if bad.is_empty() => plan,
        Ok(_) => return Err(QueryError::Invalid(bad)),
        Err(v) => {
            bad.extend(v);
            return Err(QueryError::Invalid(bad));
        }
    };
    let meta = view.meta.load_full();
    let filter = Filter::resolve(&plan.filter, &meta);
    let fill = req.fill_empty.unwrap_or(true);
    let traffic = Traffic::of(req.traffic)?;
    Ok(v1::BatchGetAdClicksResponse {
        ads: req
            .ad_ids
            .iter()
            .map(|&ad| {
                answer_ad_clicks(
                    view,
                    caller,
                    ad,
                    &plan,
                    &filter,
                    (fill, traffic),
                    watermark_ms,
                )
            })
            .collect::<Result<_, _>>()?,
        watermark_ms,
    })
}

/// The [from, to) minute range a `TopAds` request asks for, in ms (`validate::top_window`).
pub fn top_range(req: &v1::TopAdsRequest, now: i64) -> Result<(i64, i64), QueryError> {
    Ok(validate::top_window(req, now)?)
}

/// `TopAds`: exact, from the shards' published top-N indexes (no lock): the unfiltered
/// index, or the per-value indexes of the filtered fields (`state::topset`). Only a filter
/// whose bound cannot prune (see [`filtered_top`]) falls back to scanning minute cells.
pub fn top_ads(
    view: &View,
    caller: Caller,
    req: &v1::TopAdsRequest,
    cfg: &QueryConfig,
    now: i64,
) -> Result<TopAdsResponse, QueryError> {
    if req.n == 0 || req.n > cfg.max_top_n {
        return Err(QueryError::InvalidArgument(format!(
            "n must be between 1 and {} (got {})",
            cfg.max_top_n, req.n
        )));
    }
    let (from, to) = top_range(req, now)?;
    check_range(from, to, cfg)?;
    let n = req.n as usize;
    let (fm, tm) = (
        from.div_euclid(LEVEL_MS[0]),
        (to + LEVEL_MS[0] - 1).div_euclid(LEVEL_MS[0]),
    );
    let meta = view.meta.load_full();
    let filter = Filter::parse(req.filter.as_ref(), &meta)?;
    // Lock-free: each shard's published indexes (see `state::published`). An ad lives on
    // one shard unless it was hot (split over shards); summing the lists of every shard
    // gives its total either way.
    let tops: Vec<_> = view.tops.iter().map(|t| t.load_full()).collect();
    let fields = filter.fields(caller);
    let traffic = Traffic::of(req.traffic)?;
    // Invalid clicks per ad of the range (a scan of the invalid cells: invalid traffic is
    // the small part). VALID ranks all − invalid: the top n valid ads are among the top
    // n + k of ALL when k ads have invalid clicks (each of the k can push one ad out;
    // every other ad's valid count is its ALL count), so ALL is asked for n + k and
    // corrected.
    if filter.uses_click_index() {
        // The index answers every traffic value itself.
        let mut ranked = index_top(view, &filter, caller, traffic, (fm, tm))?;
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(n);
        return Ok(top_response(view, ranked, (fm, tm)));
    }
    let invalid = if traffic == Traffic::All {
        HashMap::new()
    } else {
        invalid_top(view, &filter, caller, (fm, tm))
    };
    if traffic == Traffic::Invalid {
        let mut ranked: Vec<(u64, u64)> = invalid.into_iter().collect();
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(n);
        return Ok(top_response(view, ranked, (fm, tm)));
    }
    let n_all = n.saturating_add(invalid.len());
    let n = n_all;
    let mut ranked = if fields.is_empty() {
        let all: Vec<&TopIndex> = tops.iter().map(|t| &t.all).collect();
        top_of(&all, n, fm, tm)
    } else {
        match filtered_top(view, &tops, &filter, caller, &fields, n, (fm, tm)) {
            Some(top) => top,
            None => scan_top(view, &filter, caller, (fm, tm)),
        }
    };
    if !invalid.is_empty() {
        for (ad, c) in &mut ranked {
            *c = c.saturating_sub(invalid.get(ad).copied().unwrap_or(0));
        }
        ranked.retain(|(_, c)| *c > 0);
    }
    ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(req.n as usize);
    Ok(top_response(view, ranked, (fm, tm)))
}

fn top_response(view: &View, ranked: Vec<(u64, u64)>, (fm, tm): (i64, i64)) -> TopAdsResponse {
    TopAdsResponse {
        ads: ranked
            .into_iter()
            .map(|(ad_id, clicks)| AdCount { ad_id, clicks })
            .collect(),
        range: Some(TimeRange {
            from_ms: fm * LEVEL_MS[0],
            to_ms: tm * LEVEL_MS[0],
        }),
        watermark_ms: view.watermark_ms.load(Ordering::Acquire),
    }
}

/// Invalid clicks per ad in minutes [fm, tm) that the filter keeps and the caller may see.
fn invalid_top(
    view: &View,
    filter: &Filter,
    caller: Caller,
    (fm, tm): (i64, i64),
) -> HashMap<u64, u64> {
    let shards = read_shards(view);
    let owners = view.owners.read().unwrap_or_else(|e| e.into_inner());
    let mut sums: HashMap<u64, u64> = HashMap::new();
    for s in &shards {
        for inv in (0..N_REASONS).filter_map(|r| s.invalid(r)) {
            for (_, ad, cell) in inv.cells_in(0, fm * LEVEL_MS[0], tm * LEVEL_MS[0]) {
                let c = filter.tally(cell, None);
                if c > 0 && filter.matches_ad(owners.get(&ad).copied(), caller) {
                    *sums.entry(ad).or_default() += c;
                }
            }
        }
    }
    sums
}
