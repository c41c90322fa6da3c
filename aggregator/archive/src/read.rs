//! Reading the archive back: the counted clicks of one event day per (ad, minute), with
//! their distinct users, as `adclick reconcile` compares them with the aggregator's cells.

use std::collections::{BTreeMap, HashSet};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int8Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::ArchiveError;
use crate::dest::Destination;

/// One (ad, minute) of the archive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell {
    /// Rows with status `counted` or `invalid_traffic` (the aggregator's ALL counts).
    pub clicks: u64,
    /// XXH64 of each distinct non-empty user id among them.
    pub users: HashSet<u64>,
}

/// One cell as reconciliation compares it: the archive's counts beside the aggregator's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pair {
    /// Clicks the archive holds for the cell.
    pub archive_clicks: u64,
    /// Distinct users among them.
    pub archive_users: u64,
    /// Clicks the aggregator serves for it.
    pub aggregator_clicks: u64,
    /// Unique users the aggregator serves (an HLL estimate).
    pub aggregator_users: u64,
}

impl Pair {
    /// Clicks must match exactly.
    pub fn clicks_differ(&self) -> bool {
        self.archive_clicks != self.aggregator_clicks
    }

    /// Users differ only beyond the aggregator's estimate error: more than 5% (its HLL,
    /// exact while small, has ~0.8% standard error beyond: six standard errors) and more
    /// than 2 users.
    pub fn users_differ(&self) -> bool {
        let (a, b) = (self.archive_users as f64, self.aggregator_users as f64);
        (a - b).abs() > (0.05 * a).max(2.0)
    }
}

/// What one day of the archive holds.
#[derive(Debug, Default)]
pub struct Day {
    /// Counted clicks per (ad, minute start ms).
    pub cells: BTreeMap<(u64, i64), Cell>,
    /// Files read.
    pub files: usize,
    /// Rows read (every status).
    pub rows: u64,
}

impl Day {
    /// The archive side of a reconciliation: per (ad, minute) and per ad over the day, the
    /// clicks and distinct users (distinct over the whole day for the day cells), with the
    /// aggregator's side left at zero for the caller to fill.
    pub fn pairs(&self) -> (BTreeMap<(u64, i64), Pair>, BTreeMap<u64, Pair>) {
        let mut minute = BTreeMap::new();
        let mut day: BTreeMap<u64, (u64, HashSet<u64>)> = BTreeMap::new();
        for ((ad, m), c) in &self.cells {
            minute.insert(
                (*ad, *m),
                Pair {
                    archive_clicks: c.clicks,
                    archive_users: c.users.len() as u64,
                    ..Pair::default()
                },
            );
            let d = day.entry(*ad).or_default();
            d.0 += c.clicks;
            d.1.extend(c.users.iter().copied());
        }
        let day = day
            .into_iter()
            .map(|(ad, (clicks, users))| {
                let p = Pair {
                    archive_clicks: clicks,
                    archive_users: users.len() as u64,
                    ..Pair::default()
                };
                (ad, p)
            })
            .collect();
        (minute, day)
    }
}

const COLUMNS: [&str; 4] = ["ad_id", "event_time", "user_id", "status"];

/// Whether `rel` is a published file, of `writer` when given (`<writer>-<seq>.parquet`):
/// shards sharing a destination each reconcile their own files.
fn wanted(rel: &str, writer: Option<&str>) -> bool {
    let Some(name) = rel.rsplit('/').next() else {
        return false;
    };
    let Some(stem) = name.strip_suffix(".parquet") else {
        return false;
    };
    match writer {
        None => true,
        Some(w) => stem
            .strip_prefix(w)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|seq| !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit())),
    }
}

/// Calls `f(file, batch)` for every record batch of every published file of `dt=<day>`
/// under `dest` (only `writer`'s when given), read with the `columns` projection; returns
/// the number of files read. A file lacking one of `columns` is not an archive file.
fn for_each_batch(
    dest: &Destination,
    day: &str,
    writer: Option<&str>,
    columns: &[&str],
    mut f: impl FnMut(&str, &RecordBatch) -> Result<(), ArchiveError>,
) -> Result<usize, ArchiveError> {
    let files = dest.list(&format!("dt={day}"))?;
    let mut read = 0;
    for rel in files.iter().filter(|f| wanted(f, writer)) {
        let bytes = dest.get(rel)?;
        let err = |e: parquet::errors::ParquetError| ArchiveError(format!("{rel}: {e}"));
        let b = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(err)?;
        let schema = b.parquet_schema();
        let idx: Vec<usize> = columns
            .iter()
            .filter_map(|c| schema.columns().iter().position(|d| d.name() == *c))
            .collect();
        if idx.len() != columns.len() {
            return Err(ArchiveError(format!(
                "{rel}: not an archive file (columns {columns:?})"
            )));
        }
        let mask = ProjectionMask::leaves(schema, idx);
        for batch in b.with_projection(mask).build().map_err(err)? {
            let batch = batch.map_err(|e| ArchiveError(format!("{rel}: {e}")))?;
            f(rel, &batch)?;
        }
        read += 1;
    }
    Ok(read)
}

/// Column `n` of `batch` (from file `rel`).
fn column(rel: &str, batch: &RecordBatch, n: &str) -> Result<ArrayRef, ArchiveError> {
    batch
        .column_by_name(n)
        .cloned()
        .ok_or_else(|| ArchiveError(format!("{rel}: no column {n}")))
}

/// Which rows of `batch` the aggregator's cells count: status `counted`, and
/// `invalid_traffic` (issue 16: invalid clicks are counted too, in `traffic = ALL`, the
/// cells a reconcile compares and a repair sets).
fn counted_rows(rel: &str, batch: &RecordBatch) -> Result<Vec<bool>, ArchiveError> {
    let status = column(rel, batch, "status")?;
    let status = status.as_dictionary::<Int8Type>();
    let names = status
        .values()
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| ArchiveError(format!("{rel}: status is not a string dictionary")))?;
    let counted: Vec<bool> = (0..names.len())
        .map(|i| matches!(names.value(i), "counted" | "invalid_traffic"))
        .collect();
    Ok((0..batch.num_rows())
        .map(|i| {
            usize::try_from(status.keys().value(i))
                .ok()
                .and_then(|k| counted.get(k).copied())
                .unwrap_or(false)
        })
        .collect())
}

/// Reads every file of `dt=<day>` (`YYYY-MM-DD`) under `dest` (only `writer`'s when given).
pub fn read_day(dest: &Destination, day: &str, writer: Option<&str>) -> Result<Day, ArchiveError> {
    let mut out = Day::default();
    out.files = for_each_batch(dest, day, writer, &COLUMNS, |rel, batch| {
        let (ad, ev, user) = (
            column(rel, batch, "ad_id")?,
            column(rel, batch, "event_time")?,
            column(rel, batch, "user_id")?,
        );
        let ad = ad.as_primitive::<UInt64Type>();
        let ev = ev.as_primitive::<TimestampMillisecondType>();
        let user = user
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| ArchiveError(format!("{rel}: user_id is not a string")))?;
        out.rows += batch.num_rows() as u64;
        for (i, _) in counted_rows(rel, batch)?
            .iter()
            .enumerate()
            .filter(|(_, c)| **c)
        {
            let minute = ev.value(i).div_euclid(60_000) * 60_000;
            let cell = out.cells.entry((ad.value(i), minute)).or_default();
            cell.clicks += 1;
            if !user.is_null(i) && !user.value(i).is_empty() {
                cell.users
                    .insert(xxhash_rust::xxh64::xxh64(user.value(i).as_bytes(), 0));
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// One dimension combination of an (ad, minute), as a repair sets it: (country, device,
/// os, site-or-app).
pub type ComboKey = (String, i32, String, String);

/// The counted clicks of one day per (ad, minute) and dimension combination, read up to a
/// WAL position (`adclick reconcile --repair`).
#[derive(Debug, Default)]
pub struct DayCombos {
    /// (ad, minute start ms) -> combination -> cell.
    pub cells: BTreeMap<(u64, i64), BTreeMap<ComboKey, Cell>>,
    /// Rows left out because their `log_pos` is beyond the position asked for.
    pub beyond: u64,
}

const COMBO_COLUMNS: [&str; 10] = [
    "log_pos",
    "ad_id",
    "event_time",
    "user_id",
    "status",
    "country",
    "device",
    "os",
    "site",
    "app",
];

/// Reads every file of `dt=<day>` under `dest`, keeping counted rows with `log_pos <=
/// upto`, per (ad, minute) and combination (the site, or the app when the site is empty,
/// as the aggregator keys it).
pub fn read_day_combos(
    dest: &Destination,
    day: &str,
    upto: u64,
    writer: Option<&str>,
) -> Result<DayCombos, ArchiveError> {
    let mut out = DayCombos::default();
    for_each_batch(dest, day, writer, &COMBO_COLUMNS, |rel, batch| {
        let col = |n: &str| column(rel, batch, n);
        let text = |n: &str| -> Result<StringArray, ArchiveError> {
            col(n)?
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| ArchiveError(format!("{rel}: {n} is not a string")))
        };
        let pos = col("log_pos")?;
        let pos = pos.as_primitive::<UInt64Type>();
        let ad = col("ad_id")?;
        let ad = ad.as_primitive::<UInt64Type>();
        let ev = col("event_time")?;
        let ev = ev.as_primitive::<TimestampMillisecondType>();
        let device = col("device")?;
        let device = device.as_primitive::<arrow_array::types::Int32Type>();
        let (user, country, os, site, app) = (
            text("user_id")?,
            text("country")?,
            text("os")?,
            text("site")?,
            text("app")?,
        );
        for (i, _) in counted_rows(rel, batch)?
            .iter()
            .enumerate()
            .filter(|(_, c)| **c)
        {
            if pos.value(i) > upto {
                out.beyond += 1;
                continue;
            }
            let minute = ev.value(i).div_euclid(60_000) * 60_000;
            let s = |a: &StringArray| {
                if a.is_null(i) {
                    String::new()
                } else {
                    a.value(i).to_string()
                }
            };
            let site = match s(&site) {
                x if x.is_empty() => s(&app),
                x => x,
            };
            let key = (s(&country), device.value(i), s(&os), site);
            let cell = out
                .cells
                .entry((ad.value(i), minute))
                .or_default()
                .entry(key)
                .or_default();
            cell.clicks += 1;
            if !user.is_null(i) && !user.value(i).is_empty() {
                cell.users
                    .insert(xxhash_rust::xxh64::xxh64(user.value(i).as_bytes(), 0));
            }
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_writer_reads_only_its_own_files() {
        let f = "dt=2026-12-04/hour=03/shard-1-000000000007.parquet";
        assert!(super::wanted(f, None));
        assert!(super::wanted(f, Some("shard-1")));
        assert!(!super::wanted(f, Some("shard")));
        assert!(!super::wanted(f, Some("shard-10")));
        assert!(!super::wanted("dt=2026-12-04/hour=03/x.tmp", None));
    }
}
