//! Repairs of the serving rollups from the raw click archive (issue 15, `adclick reconcile
//! --repair`), and the admin gRPC service that takes them (`AdminService`, admin API key).
//!
//! A repair names (ad, minute) cells and, for each, the archive's counted clicks and users
//! per dimension combination among the rows whose WAL position (`log_pos`) is at most
//! `archive_covered`. The writer thread (the only writer of counts) resolves it into
//! absolute values *as of its current WAL position*: it adds what it counted for those
//! cells in the WAL entries after `archive_covered` (they are still in the store: the WAL
//! is kept until archived), so a click archived after the reconcile read is neither lost
//! nor counted twice. The resolved repair is a [`RecordPb`]: recorded durably (store table
//! `repairs`, seq = its version) BEFORE it is applied, applied by each shard under one
//! write lock (a query sees a shard's cells before or after, never half), and the top-N
//! index rebuilt and swapped whole. Later clicks add on top, like any click.
//!
//! Idempotent: a repair id already recorded is answered `already_applied` and changes
//! nothing; and a repair sets absolute values, so even a second reconcile's repair of
//! cells that are right changes nothing.
//!
//! Durable: checkpoints record the last repair seq they contain (table `repairs` of the
//! checkpoint); a start applies the recorded repairs after it at their WAL position
//! (`at_wal_pos`: after the entry at that position, before the next), so a replay reaches
//! the state the crashed process had. Deterministic on replay because the record holds the
//! resolved values (the WAL entries it read may be gone by then) and the combinations'
//! strings (interned at the same point of the sequence).
//!
//! Not repaired: minutes past the minute retention (their day cell is not rewritten: the
//! report still lists them), ads this aggregator never counted (no owner to scope them by),
//! and users in hour/day cells that a sketch counts but the archive does not (a sketch
//! cannot forget). This module must not touch cells itself: shards apply
//! ([`crate::state::shard::ShardState::set_minute`]).

use std::collections::{HashMap, HashSet};

use adclick_proto::v1::admin_service_server::AdminService;
use adclick_proto::v1::{
    ApplyRepairRequest, ApplyRepairResponse, GetRepairStateRequest, GetRepairStateResponse,
};
use tonic::{Request, Response, Status};

use crate::config::ApiKey;
use crate::engine::Engine;
use crate::query::{self, Caller};
use crate::sketch::hll::{Hll, hash_user_id};
use crate::store::ArchiveLog;

/// At most this many cells in one repair (the CLI splits larger ones).
pub const MAX_CELLS: usize = 100_000;
/// gRPC message cap of the admin service (a repair with users of hot cells is large).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// One combination of a resolved repair cell.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ComboPb {
    /// ISO country (as the click had it).
    #[prost(string, tag = "1")]
    pub country: String,
    /// `adclick.v1.Device` value.
    #[prost(int32, tag = "2")]
    pub device: i32,
    /// Operating system.
    #[prost(string, tag = "3")]
    pub os: String,
    /// Site, or app when the site is empty.
    #[prost(string, tag = "4")]
    pub site: String,
    /// Clicks.
    #[prost(uint32, tag = "5")]
    pub clicks: u32,
    /// Users as sparse HLL entries (`Hll::entry_of_hash`), distinct.
    #[prost(uint32, repeated, tag = "6")]
    pub users: Vec<u32>,
}

/// One (ad, minute) cell of a resolved repair.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CellPb {
    /// Ad.
    #[prost(uint64, tag = "1")]
    pub ad: u64,
    /// Minute start (ms).
    #[prost(int64, tag = "2")]
    pub minute_ms: i64,
    /// Every combination with clicks (empty: no clicks).
    #[prost(message, repeated, tag = "3")]
    pub combos: Vec<ComboPb>,
}

/// A resolved repair as the store keeps it (table `repairs`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RecordPb {
    /// The caller's repair id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Version: 1, 2, ... in the order applied.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// Applied after the WAL entry at this position, before the next.
    #[prost(uint64, tag = "3")]
    pub at_wal_pos: u64,
    /// The archive position the caller's counts were read up to.
    #[prost(uint64, tag = "4")]
    pub covered: u64,
    /// The cells, absolute.
    #[prost(message, repeated, tag = "5")]
    pub cells: Vec<CellPb>,
    /// Non-zero: this record finalizes the day starting here (no cells): its minute cells
    /// may go once past `windows.retention_minutes` (`crate::nightly`).
    #[prost(int64, tag = "6")]
    pub finalize_day_ms: i64,
}

/// Why a repair was refused.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// The request is malformed (too many cells, a cell named twice, a minute not on a
    /// minute boundary...).
    #[error("{0}")]
    Invalid(String),
    /// The state does not allow it now (archive off, `archive_covered` older than the WAL
    /// kept): read the archive again and retry.
    #[error("{0}")]
    Precondition(String),
    /// Storage failed or the engine is stopping.
    #[error("{0}")]
    Unavailable(String),
}

impl From<RepairError> for Status {
    fn from(e: RepairError) -> Status {
        match e {
            RepairError::Invalid(m) => Status::invalid_argument(m),
            RepairError::Precondition(m) => Status::failed_precondition(m),
            RepairError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// What the writer answers for a repair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The id was applied before: nothing changed.
    pub already_applied: bool,
    /// The repair's seq (for `already_applied`, the earlier one's).
    pub seq: u64,
    /// Applied after this WAL position.
    pub at_wal_pos: u64,
    /// Cells set.
    pub cells: u32,
    /// Cells skipped (past the minute retention, or an ad never counted here).
    pub skipped: u32,
    /// Sum over cells of |new - old| clicks.
    pub clicks_changed: u64,
}

/// Where repairs and the archive stand (`GetRepairState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    /// Archive `covered` (0: archive off).
    pub archive_covered: u64,
    /// Last WAL position applied.
    pub applied_wal_pos: u64,
    /// Last repair seq.
    pub repairs_applied: u64,
    /// Days before this (ms) are finalized (i64::MIN: none).
    pub finalized_before: i64,
}

/// Converts and checks a request at the edge (wire types stop here).
pub fn from_request(r: ApplyRepairRequest) -> Result<RecordPb, RepairError> {
    if r.repair_id.is_empty() || r.repair_id.len() > 200 {
        return Err(RepairError::Invalid(
            "repair_id must be 1 to 200 bytes".into(),
        ));
    }
    if r.cells.len() > MAX_CELLS {
        return Err(RepairError::Invalid(format!(
            "{} cells in one repair, at most {MAX_CELLS}",
            r.cells.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut cells = Vec::with_capacity(r.cells.len());
    for (i, c) in r.cells.into_iter().enumerate() {
        if c.minute_ms.rem_euclid(60_000) != 0 {
            return Err(RepairError::Invalid(format!(
                "cells[{i}].minute_ms {} is not a minute start",
                c.minute_ms
            )));
        }
        if !seen.insert((c.ad_id, c.minute_ms)) {
            return Err(RepairError::Invalid(format!(
                "cells[{i}]: ad {} minute {} is named twice",
                c.ad_id, c.minute_ms
            )));
        }
        let mut combos: Vec<ComboPb> = Vec::with_capacity(c.combos.len());
        for (j, k) in c.combos.into_iter().enumerate() {
            let clicks = u32::try_from(k.clicks).map_err(|_| {
                RepairError::Invalid(format!("cells[{i}].combos[{j}].clicks is too large"))
            })?;
            let mut users: Vec<u32> = k
                .user_hashes
                .iter()
                .map(|h| Hll::entry_of_hash(*h))
                .collect();
            users.sort_unstable();
            users.dedup();
            let key = combo_key(&k.country, k.device, &k.os, &k.site);
            match combos
                .iter_mut()
                .find(|x| combo_key(&x.country, x.device, &x.os, &x.site) == key)
            {
                // Two spellings of one combination (country case): one combination.
                Some(x) => {
                    x.clicks = x.clicks.saturating_add(clicks);
                    x.users.extend(users);
                    x.users.sort_unstable();
                    x.users.dedup();
                }
                None => combos.push(ComboPb {
                    country: k.country,
                    device: k.device,
                    os: k.os,
                    site: k.site,
                    clicks,
                    users,
                }),
            }
        }
        cells.push(CellPb {
            ad: c.ad_id,
            minute_ms: c.minute_ms,
            combos,
        });
    }
    Ok(RecordPb {
        id: r.repair_id,
        seq: 0,
        at_wal_pos: 0,
        covered: r.archive_covered,
        cells,
        finalize_day_ms: 0,
    })
}

/// How the aggregator keys a combination (`state::dims::DimKey` before interning).
fn combo_key(country: &str, device: i32, os: &str, site: &str) -> ([u8; 2], u8, String, String) {
    (
        crate::state::dims::country_code(country),
        u8::try_from(device).unwrap_or(0),
        os.to_string(),
        site.to_string(),
    )
}

/// Adds to `rec`'s cells what was counted for them in the WAL entries `(after, upto]`,
/// read from `log` with their outcomes: the absolute values as of `upto`. Refuses when an
/// entry of that range is no longer there (the archive covered it since the caller read:
/// read again).
pub fn add_after(
    rec: &mut RecordPb,
    log: &ArchiveLog,
    after: u64,
    upto: u64,
) -> Result<(), RepairError> {
    if upto <= after {
        return Ok(());
    }
    let index: HashMap<(u64, i64), usize> = rec
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| ((c.ad, c.minute_ms), i))
        .collect();
    let mut expect = after + 1;
    let mut gap = None;
    log.read(after, upto, &mut |pos, batch, outcomes| {
        if pos != expect {
            gap = Some(expect);
            return false;
        }
        expect = pos + 1;
        let clicks: Vec<_> = crate::decode::clicks(batch).collect();
        let Some(status) =
            crate::archive::decode_outcomes(outcomes, clicks.len()).map(|o| o.status)
        else {
            return true;
        };
        for (c, st) in clicks.into_iter().zip(status) {
            // Every click the cells count: valid and invalid traffic (the ALL cells).
            let Ok(c) = c else { continue };
            if !st.counted() {
                continue;
            }
            let minute = c.event_time_ms.div_euclid(60_000) * 60_000;
            let Some(&i) = index.get(&(c.ad_id, minute)) else {
                continue;
            };
            let key = combo_key(c.country, c.device, c.os, c.site);
            let cell = &mut rec.cells[i];
            let k = match cell
                .combos
                .iter()
                .position(|x| combo_key(&x.country, x.device, &x.os, &x.site) == key)
            {
                Some(k) => k,
                None => {
                    cell.combos.push(ComboPb {
                        country: c.country.to_string(),
                        device: c.device,
                        os: c.os.to_string(),
                        site: c.site.to_string(),
                        clicks: 0,
                        users: Vec::new(),
                    });
                    cell.combos.len() - 1
                }
            };
            let combo = &mut cell.combos[k];
            combo.clicks = combo.clicks.saturating_add(1);
            if !c.user_id.is_empty() {
                let e = Hll::entry_of_hash(hash_user_id(c.user_id));
                if let Err(p) = combo.users.binary_search(&e) {
                    combo.users.insert(p, e);
                }
            }
        }
        true
    })
    .map_err(|e| RepairError::Unavailable(e.to_string()))?;
    if let Some(missing) = gap.or((expect <= upto).then_some(expect)) {
        return Err(RepairError::Precondition(format!(
            "archive_covered {after} is behind what the aggregator still keeps (WAL entry \
             {missing} is gone or not archived-ready): read the archive again and retry"
        )));
    }
    Ok(())
}

/// `adclick.v1.AdminService` of one aggregator: admin API keys only.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The engine (the writer applies repairs).
    pub engine: Engine,
    /// Allowed keys (only `role = "admin"` ones pass).
    pub keys: std::sync::Arc<Vec<ApiKey>>,
    /// `query.allow_unauthenticated`: no key = admin.
    pub allow_unauthenticated: bool,
    /// Counts each ApplyRepair by result (`adclick_aggregator_reconcile_repairs_total`).
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Admin {
    fn check<T>(&self, r: &Request<T>) -> Result<(), Status> {
        let h = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let caller = match h {
            None if self.allow_unauthenticated => Caller::Admin,
            h => query::authorize(&self.keys, h).map_err(crate::grpc::status)?,
        };
        match caller {
            Caller::Admin => Ok(()),
            _ => Err(Status::permission_denied(
                "the admin service needs an admin API key",
            )),
        }
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_repair_state(
        &self,
        r: Request<GetRepairStateRequest>,
    ) -> Result<Response<GetRepairStateResponse>, Status> {
        self.check(&r)?;
        let s = self.engine.repair_state().await?;
        Ok(Response::new(GetRepairStateResponse {
            archive_covered: s.archive_covered,
            applied_wal_pos: s.applied_wal_pos,
            repairs_applied: s.repairs_applied,
        }))
    }

    async fn apply_repair(
        &self,
        r: Request<ApplyRepairRequest>,
    ) -> Result<Response<ApplyRepairResponse>, Status> {
        let count = |result: &'static str| {
            self.metrics
                .reconcile
                .repairs
                .get_or_create(&crate::nightly::ResultLabel { result })
                .inc();
        };
        let refused = |e: RepairError| {
            count(match e {
                RepairError::Invalid(_) => "invalid",
                RepairError::Precondition(_) => "precondition",
                RepairError::Unavailable(_) => "unavailable",
            });
            Status::from(e)
        };
        if let Err(s) = self.check(&r) {
            count("refused");
            return Err(s);
        }
        let rec = from_request(r.into_inner()).map_err(refused)?;
        let o = self.engine.repair(rec).await.map_err(refused)?;
        count(if o.already_applied {
            "already_applied"
        } else {
            "applied"
        });
        Ok(Response::new(ApplyRepairResponse {
            already_applied: o.already_applied,
            repair_seq: o.seq,
            at_wal_pos: o.at_wal_pos,
            cells: o.cells,
            cells_skipped: o.skipped,
            clicks_changed: o.clicks_changed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::dims::DimKey;
    use crate::state::shard::{Applied, ShardState};

    const M: i64 = 60_000;

    /// The sparse entry of user `n` (a real hash: small integers share a register).
    fn u(n: u64) -> u32 {
        Hll::entry_of_hash(hash_user_id(format!("u{n}").as_bytes()))
    }

    fn click(ad: u64, minute: i64, combo: u32, user: u64) -> Applied {
        Applied {
            ad,
            advertiser: 1,
            campaign: 1,
            event_time_ms: minute * M + 1,
            combo,
            dims: DimKey::default(),
            user: u(user),
            late: false,
        }
    }

    /// (clicks, users) of `level` for (ad, bucket start), all parts summed.
    fn at(s: &ShardState, level: usize, ad: u64, start: i64) -> (u64, u64) {
        let mut h = Hll::new();
        let c = s
            .parts(level, ad, start)
            .map(|p| p.tally(|_| true, Some(&mut h)))
            .sum();
        (c, h.estimate())
    }

    /// A repair sets a minute to exactly its combos, and the minute's hour and day move by
    /// the same difference whether the minute was sealed or not (the oracle: counting the
    /// clicks that should have been there from scratch).
    #[test]
    fn set_minute_moves_hour_and_day_by_the_difference_sealed_or_not() {
        for seal in [false, true] {
            let mut s = ShardState::default();
            // Minute 10: combo 1 x3 (users 1,2,3), combo 2 x1; minute 11: combo 1 x2.
            for (m, combo, user) in [
                (10, 1, 1),
                (10, 1, 2),
                (10, 1, 3),
                (10, 2, 4),
                (11, 1, 5),
                (11, 1, 6),
            ] {
                s.apply(&click(7, m, combo, user));
            }
            if seal {
                s.seal(12 * M);
            }
            // The truth: minute 10 had combo 1 x1 (user 1) and combo 3 x4 (users 7, 8).
            let old = s.set_minute(7, 10 * M, &[(1, 1, vec![u(1)]), (3, 4, vec![u(7), u(8)])]);
            assert_eq!(old, 4, "seal {seal}");
            assert_eq!(at(&s, 0, 7, 10 * M).0, 5, "seal {seal}");
            assert_eq!(at(&s, 0, 7, 10 * M).1, 3, "seal {seal}");
            assert_eq!(at(&s, 0, 7, 11 * M), (2, 2), "seal {seal}");
            // Hour and day: 5 + 2 clicks.
            assert_eq!(at(&s, 1, 7, 0).0, 7, "seal {seal}");
            assert_eq!(at(&s, 2, 7, 0).0, 7, "seal {seal}");
            // Per combination: combo 2 is gone from the hour, combo 3 is there.
            let hour: Vec<(u32, u32)> = s
                .parts(1, 7, 0)
                .flat_map(|p| {
                    p.cell
                        .combos()
                        .map(|c| (c.id, c.clicks))
                        .collect::<Vec<_>>()
                })
                .filter(|c| c.1 > 0)
                .fold(std::collections::BTreeMap::new(), |mut m, (id, n)| {
                    *m.entry(id).or_insert(0) += n;
                    m
                })
                .into_iter()
                .collect();
            assert_eq!(hour, vec![(1, 3), (3, 4)], "seal {seal}");
            // An empty repair removes the cell.
            assert_eq!(s.set_minute(7, 11 * M, &[]), 2);
            assert_eq!(at(&s, 0, 7, 11 * M), (0, 0));
            assert_eq!(at(&s, 2, 7, 0).0, 5, "seal {seal}");
        }
    }

    fn request(cells: Vec<adclick_proto::v1::RepairCell>) -> ApplyRepairRequest {
        ApplyRepairRequest {
            repair_id: "r".into(),
            archive_covered: 1,
            cells,
        }
    }

    #[test]
    fn malformed_requests_are_refused_naming_the_problem() {
        use adclick_proto::v1::RepairCell;
        let cell = |minute_ms| RepairCell {
            ad_id: 1,
            minute_ms,
            combos: Vec::new(),
        };
        let err = |r| match from_request(r) {
            Err(RepairError::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(err(request(vec![cell(60_001)])).contains("not a minute start"));
        assert!(err(request(vec![cell(60_000), cell(60_000)])).contains("named twice"));
        let mut r = request(vec![]);
        r.repair_id = String::new();
        assert!(err(r).contains("repair_id"));
        let ok = from_request(request(vec![cell(120_000)])).unwrap();
        assert_eq!((ok.cells.len(), ok.covered), (1, 1));
    }
}
