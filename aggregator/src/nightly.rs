//! The nightly reconciliation the aggregator runs by itself (`[reconcile] nightly = true`,
//! issue 15): once day D is closed plus `after_hour_utc` hours of late data (at 02:00 UTC
//! on D+1 by default), it recounts D from its own raw click archive, compares the counts
//! with its cells (per (ad, minute) and per (ad, day), clicks exactly, users beyond 5% and
//! 2, as `adclick reconcile` does), writes `<data_dir>/reconcile/<D>.jsonl` (one line per
//! differing cell) and `<D>.summary.json`, and exports the result under
//! `adclick_aggregator_reconcile_*`. With `auto_repair = true` it then repairs the differing
//! minute cells through the same path as `adclick reconcile --repair` (`crate::repair`).
//!
//! Report only by default: a repair overwrites serving counts with the archive's, so an
//! archive that lost a file (the case reconcile exists to catch) would "repair" right counts
//! downward. A person should read the first reports before trusting the archive that far.
//!
//! The day last reconciled is kept in `<data_dir>/reconcile/state.json` (written to a temp
//! file and renamed), so a restart does not run a day twice; deleting it runs the last due
//! day again. The clock is the wall clock plus `clock_offset_ms` (tests and drills move it
//! forward a day instead of waiting for one). This module reads cells under the shards'
//! read locks, one shard at a time; it never writes cells (repairs go through the writer).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::sketch::hll::Hll;
use crate::state::shard::LEVEL_MS;
use crate::view::View;
use adclick_archive::read::Pair;

/// `[reconcile]` of the aggregator's config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Reconcile each day by itself (needs `[archive] enabled`).
    pub nightly: bool,
    /// Hours after a day's end before it is reconciled (the late-data horizon), 0..=23.
    pub after_hour_utc: u32,
    /// Repair the differing minute cells after the report (off: report only).
    pub auto_repair: bool,
    /// How often the schedule looks at the clock, in ms (100..=3,600,000).
    pub check_interval_ms: u64,
    /// Added to the wall clock by the schedule only (tests, drills). 0 in production.
    pub clock_offset_ms: i64,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            nightly: false,
            after_hour_utc: 2,
            auto_repair: false,
            check_interval_ms: 60_000,
            clock_offset_ms: 0,
        }
    }
}

impl ReconcileConfig {
    /// Checks the values; `archive` is whether `[archive] enabled`.
    pub fn validate(&self, archive: bool) -> Result<(), String> {
        if self.after_hour_utc > 23 {
            return Err("reconcile.after_hour_utc must be 0..=23".into());
        }
        if !(100..=3_600_000).contains(&self.check_interval_ms) {
            return Err("reconcile.check_interval_ms must be 100..=3600000".into());
        }
        if self.nightly && !archive {
            return Err(
                "reconcile.nightly needs the raw click archive ([archive] enabled = true)".into(),
            );
        }
        Ok(())
    }
}

/// `level` label (minute, day).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabel {
    /// minute or day.
    pub level: &'static str,
}

/// `result` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// clean, differing, repaired, failed.
    pub result: &'static str,
}

adclick_proto::metrics! {
    /// The nightly reconciliation's metrics (`adclick_aggregator_reconcile_*`).
    #[derive(Debug)]
    pub struct ReconcileMetrics under "reconcile" {
        /// Unix time the last run ended (0: none in this process).
        pub last_run_seconds: Gauge = Gauge::default();
        /// Start of the day the last run reconciled, Unix time.
        pub last_day_seconds: Gauge = Gauge::default();
        /// Cells the last run compared, by level.
        pub cells_compared: Family<LevelLabel, Gauge> = Family::default();
        /// Cells the last run found differing (clicks or users), by level.
        pub cells_differing: Family<LevelLabel, Gauge> = Family::default();
        /// Sum of |archive - aggregator| clicks over the last run's cells, by level.
        pub clicks_off: Family<LevelLabel, Gauge> = Family::default();
        /// Runs by result (clean, differing, repaired, failed).
        pub runs: Family<ResultLabel, Counter> = Family::default();
        /// ApplyRepair calls by result (applied, already_applied, invalid, precondition,
        /// unavailable, refused: no admin key).
        pub repairs: Family<ResultLabel, Counter> = Family::default();
        /// Minute cells set by automatic repairs.
        pub cells_repaired: Counter = Counter::default();
        /// Start of the last day finalized (reconciled with nothing left differing; its
        /// minute cells may then go), Unix time.
        pub last_finalized_day_seconds: Gauge = Gauge::default();
    }
}

/// A level's result: (cells compared, differing, clicks off).
pub type LevelSummary = (u64, u64, u64);

/// What a run found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The day, YYYY-MM-DD.
    pub day: String,
    /// Minute level (None: past the minute retention, not compared).
    pub minute: Option<LevelSummary>,
    /// Day level.
    pub day_level: LevelSummary,
    /// Minute cells repaired (auto_repair).
    pub repaired: u32,
    /// The day's start, ms.
    #[serde(skip)]
    pub day_start_ms: i64,
}

/// YYYY-MM-DD of a day start (ms, UTC).
pub fn day_name(day_start_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(day_start_ms).unwrap_or(0));
    humantime::format_rfc3339(t).to_string()[..10].to_string()
}

/// The day due at `now_ms` (start, ms): the last day whose end is `after_hour_utc` hours or
/// more behind.
pub fn due_day(now_ms: i64, after_hour_utc: u32) -> i64 {
    let t = now_ms - i64::from(after_hour_utc) * LEVEL_MS[1];
    (t.div_euclid(LEVEL_MS[2]) - 1) * LEVEL_MS[2]
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    last_day: String,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Nightly {
    /// `[reconcile]`.
    pub cfg: ReconcileConfig,
    /// `[archive]`.
    pub archive: adclick_archive::ArchiveConfig,
    /// `[windows] retention_minutes`.
    pub retention_minutes: i64,
    /// `<data_dir>/reconcile`.
    pub dir: PathBuf,
    /// The cells.
    pub view: Arc<View>,
    /// For repairs.
    pub engine: Engine,
    /// `adclick_aggregator_reconcile_*`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Nightly {
    /// The schedule: checks the clock every `check_interval_ms` until `stop` turns true.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_millis(self.cfg.check_interval_ms);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let now = crate::view::now_ms().saturating_add(self.cfg.clock_offset_ms);
            let day = day_name(due_day(now, self.cfg.after_hour_utc));
            let last = std::fs::read(state_path(&self.dir))
                .ok()
                .and_then(|b| serde_json::from_slice::<StateFile>(&b).ok())
                .map(|s| s.last_day)
                .unwrap_or_default();
            if day <= last {
                continue;
            }
            let finalized_before = match self.engine.repair_state().await {
                Ok(s) => s.finalized_before,
                Err(_) => return,
            };
            let me = self.clone();
            let d = day.clone();
            let result =
                tokio::task::spawn_blocking(move || me.reconcile(&d, finalized_before)).await;
            let m = &self.metrics.reconcile;
            let result = match result {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::error!(day = %day, error = %e, "nightly reconcile failed; retried at the next check");
                    m.runs
                        .get_or_create(&ResultLabel { result: "failed" })
                        .inc();
                    continue;
                }
                Err(e) => {
                    tracing::error!(day = %day, error = %e, "nightly reconcile panicked");
                    m.runs
                        .get_or_create(&ResultLabel { result: "failed" })
                        .inc();
                    continue;
                }
            };
            let mut summary = result;
            if self.cfg.auto_repair {
                match self.repair(&summary.day).await {
                    Ok(n) => summary.repaired = n,
                    Err(e) => {
                        tracing::error!(day = %day, error = %e, "nightly repair failed; retried at the next check");
                        m.runs
                            .get_or_create(&ResultLabel { result: "failed" })
                            .inc();
                        continue;
                    }
                }
            }
            self.publish(&summary);
            // Final once nothing differs any more: its minute cells may then go.
            let clean = summary.day_level.1 == 0 && summary.minute.is_none_or(|l| l.1 == 0);
            let repaired_all = summary
                .minute
                .is_some_and(|l| l.1 == u64::from(summary.repaired));
            if clean || (self.cfg.auto_repair && repaired_all) {
                match self.engine.finalize_day(summary.day_start_ms).await {
                    Ok(_) => {
                        m.last_finalized_day_seconds
                            .set(summary.day_start_ms / 1000);
                    }
                    Err(e) => {
                        tracing::error!(day = %day, error = %e, "cannot finalize the day; retried at the next check");
                        continue;
                    }
                }
            }
            let state = serde_json::to_vec(&StateFile {
                last_day: day.clone(),
            })
            .unwrap_or_default();
            if let Err(e) = write_atomic(&state_path(&self.dir), &state) {
                tracing::error!(error = %e, "cannot save reconcile/state.json: the day will run again");
            }
        }
    }

    fn publish(&self, s: &Summary) {
        let m = &self.metrics.reconcile;
        let set = |f: &Family<LevelLabel, Gauge>, level, v: u64| {
            f.get_or_create(&LevelLabel { level })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        for (level, l) in [
            ("minute", s.minute.unwrap_or_default()),
            ("day", s.day_level),
        ] {
            set(&m.cells_compared, level, l.0);
            set(&m.cells_differing, level, l.1);
            set(&m.clicks_off, level, l.2);
        }
        let differing = s.minute.is_some_and(|l| l.1 > 0) || s.day_level.1 > 0;
        let result = match (differing, s.repaired > 0) {
            (false, _) => "clean",
            (true, false) => "differing",
            (true, true) => "repaired",
        };
        m.runs.get_or_create(&ResultLabel { result }).inc();
        m.cells_repaired.inc_by(u64::from(s.repaired));
        m.last_day_seconds.set(
            humantime::parse_rfc3339(&format!("{}T00:00:00Z", s.day))
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0)),
        );
        m.last_run_seconds.set(crate::view::now_ms() / 1000);
        tracing::info!(day = %s.day, minute = ?s.minute, day_level = ?s.day_level, repaired = s.repaired, result, "nightly reconcile done");
    }

    /// Compares `day` and writes its report (blocking: reads files and cells).
    /// `finalized_before`: days before it are final (their minute cells may be gone).
    pub fn reconcile(&self, day: &str, finalized_before: i64) -> Result<Summary, String> {
        let from = humantime::parse_rfc3339(&format!("{day}T00:00:00Z"))
            .map_err(|e| e.to_string())?
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_millis() as i64;
        let to = from + LEVEL_MS[2];
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let dest = adclick_archive::Destination::open(&self.archive, &self.dir.join("_staging"))
            .map_err(|e| e.to_string())?;
        let archived = adclick_archive::read::read_day(&dest, day, Some(&self.archive.writer_id))
            .map_err(|e| e.to_string())?;
        drop(dest);

        // Archive side.
        let (mut minute, mut days) = archived.pairs();

        // Aggregator side: minute cells of the day, then each ad's day (sealed day cell plus
        // unsealed minutes, `ShardState::parts`), users merged over the shards.
        let wm = self
            .view
            .watermark_ms
            .load(std::sync::atomic::Ordering::Acquire);
        let oldest_minute = wm.saturating_sub(self.retention_minutes.saturating_mul(LEVEL_MS[0]));
        // The writer's rule (`Writer::minute_floor`): minutes of a day not finalized are held.
        let held = finalized_before <= from
            && oldest_minute.saturating_sub(crate::engine::MINUTE_HOLD_MAX_MS) <= from;
        let minute_level =
            wm == i64::MIN || oldest_minute.div_euclid(LEVEL_MS[0]) * LEVEL_MS[0] <= from || held;
        let mut minute_users: BTreeMap<(u64, i64), (u64, Hll)> = BTreeMap::new();
        let mut ads: BTreeSet<u64> = days.keys().copied().collect();
        for shard in &self.view.shards {
            let s = shard.read().unwrap_or_else(|e| e.into_inner());
            for (start, ad, cell) in s.cells_in(0, from, to) {
                ads.insert(ad);
                let e = minute_users
                    .entry((ad, start))
                    .or_insert_with(|| (0, Hll::new()));
                e.0 += cell.tally(|_| true, Some(&mut e.1));
            }
            for (_, ad, _) in s.cells_in(2, from, to) {
                ads.insert(ad);
            }
        }
        let mut day_hll: BTreeMap<u64, (u64, Hll)> = BTreeMap::new();
        for shard in &self.view.shards {
            let s = shard.read().unwrap_or_else(|e| e.into_inner());
            for ad in &ads {
                for part in s.parts(2, *ad, from) {
                    let e = day_hll.entry(*ad).or_insert_with(|| (0, Hll::new()));
                    e.0 += part.tally(|_| true, Some(&mut e.1));
                }
            }
        }
        if minute_level {
            for (k, (c, h)) in minute_users {
                if c == 0 {
                    continue;
                }
                let p = minute.entry(k).or_default();
                p.aggregator_clicks = c;
                p.aggregator_users = h.estimate();
            }
        } else {
            minute.clear();
        }
        for (ad, (c, h)) in day_hll {
            if c == 0 {
                continue;
            }
            let p = days.entry(ad).or_default();
            p.aggregator_clicks = c;
            p.aggregator_users = h.estimate();
        }

        // Diff and report.
        let mut report = String::new();
        let mut tally = |level: &str, ad: u64, start: i64, p: &Pair, s: &mut LevelSummary| {
            s.0 += 1;
            let (c, u) = (p.clicks_differ(), p.users_differ());
            if c || u {
                s.1 += 1;
                s.2 += p.archive_clicks.abs_diff(p.aggregator_clicks);
                report.push_str(
                    &serde_json::json!({"level": level, "ad_id": ad, "start_ms": start,
                        "archive_clicks": p.archive_clicks, "aggregator_clicks": p.aggregator_clicks,
                        "archive_users": p.archive_users, "aggregator_users": p.aggregator_users,
                        "clicks_differ": c, "users_differ": u})
                    .to_string(),
                );
                report.push('\n');
            }
        };
        let mut ml = LevelSummary::default();
        for ((ad, m), p) in &minute {
            tally("minute", *ad, *m, p, &mut ml);
        }
        let mut dl = LevelSummary::default();
        for (ad, p) in &days {
            tally("day", *ad, from, p, &mut dl);
        }
        let summary = Summary {
            day: day.to_string(),
            minute: minute_level.then_some(ml),
            day_level: dl,
            repaired: 0,
            day_start_ms: from,
        };
        write_atomic(&self.dir.join(format!("{day}.jsonl")), report.as_bytes())
            .map_err(|e| e.to_string())?;
        let js = serde_json::to_vec_pretty(&summary).map_err(|e| e.to_string())?;
        write_atomic(&self.dir.join(format!("{day}.summary.json")), &js)
            .map_err(|e| e.to_string())?;
        Ok(summary)
    }

    /// Repairs the minute cells the report of `day` lists: the archive's counts up to the
    /// archive's position, through the writer. Returns the cells set.
    async fn repair(&self, day: &str) -> Result<u32, String> {
        let report = std::fs::read_to_string(self.dir.join(format!("{day}.jsonl")))
            .map_err(|e| e.to_string())?;
        let cells: Vec<(u64, i64)> = report
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["level"] == "minute")
            .filter_map(|v| Some((v["ad_id"].as_u64()?, v["start_ms"].as_i64()?)))
            .collect();
        if cells.is_empty() {
            return Ok(0);
        }
        let state = self
            .engine
            .repair_state()
            .await
            .map_err(|e| e.to_string())?;
        let covered = state.archive_covered;
        let me = self.clone();
        let d = day.to_string();
        let read = tokio::task::spawn_blocking(move || {
            let dest = adclick_archive::Destination::open(&me.archive, &me.dir.join("_staging"))
                .map_err(|e| e.to_string())?;
            adclick_archive::read::read_day_combos(&dest, &d, covered, Some(&me.archive.writer_id))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let rec = crate::repair::RecordPb {
            finalize_day_ms: 0,
            id: format!("nightly-{day}-{covered}"),
            seq: 0,
            at_wal_pos: 0,
            covered,
            cells: cells
                .iter()
                .map(|(ad, m)| crate::repair::CellPb {
                    ad: *ad,
                    minute_ms: *m,
                    combos: read
                        .cells
                        .get(&(*ad, *m))
                        .map(|cs| {
                            cs.iter()
                                .map(|((country, device, os, site), c)| {
                                    let mut users: Vec<u32> =
                                        c.users.iter().map(|h| Hll::entry_of_hash(*h)).collect();
                                    users.sort_unstable();
                                    users.dedup();
                                    crate::repair::ComboPb {
                                        country: country.clone(),
                                        device: *device,
                                        os: os.clone(),
                                        site: site.clone(),
                                        clicks: u32::try_from(c.clicks).unwrap_or(u32::MAX),
                                        users,
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect(),
        };
        let o = self.engine.repair(rec).await.map_err(|e| e.to_string())?;
        Ok(o.cells)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_due_after_its_end_plus_the_horizon() {
        let d = |s: &str| {
            humantime::parse_rfc3339(s)
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
        };
        assert_eq!(
            day_name(due_day(d("2026-12-05T01:59:59Z"), 2)),
            "2026-12-03"
        );
        assert_eq!(
            day_name(due_day(d("2026-12-05T02:00:00Z"), 2)),
            "2026-12-04"
        );
        assert_eq!(
            day_name(due_day(d("2026-12-05T23:00:00Z"), 2)),
            "2026-12-04"
        );
        assert_eq!(
            day_name(due_day(d("2026-12-05T00:00:00Z"), 0)),
            "2026-12-04"
        );
    }
}
