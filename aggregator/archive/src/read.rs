//! Reading the archive back: the counted clicks of one event day per (ad, minute), with
//! their distinct users, as `adclick reconcile` compares them with the aggregator's cells.

use std::collections::{BTreeMap, HashSet};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int8Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{Array, StringArray};
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

const COLUMNS: [&str; 4] = ["ad_id", "event_time", "user_id", "status"];

/// Reads every file of `dt=<day>` (`YYYY-MM-DD`) under `dest`.
pub fn read_day(dest: &Destination, day: &str) -> Result<Day, ArchiveError> {
    let files = dest.list(&format!("dt={day}"))?;
    let mut out = Day::default();
    for rel in files.iter().filter(|f| f.ends_with(".parquet")) {
        let bytes = dest.get(rel)?;
        let err = |e: parquet::errors::ParquetError| ArchiveError(format!("{rel}: {e}"));
        let b = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(err)?;
        let schema = b.parquet_schema();
        let idx: Vec<usize> = COLUMNS
            .iter()
            .filter_map(|c| schema.columns().iter().position(|d| d.name() == *c))
            .collect();
        if idx.len() != COLUMNS.len() {
            return Err(ArchiveError(format!(
                "{rel}: not an archive file (columns {COLUMNS:?})"
            )));
        }
        let mask = ProjectionMask::leaves(schema, idx);
        let reader = b.with_projection(mask).build().map_err(err)?;
        for batch in reader {
            let batch = batch.map_err(|e| ArchiveError(format!("{rel}: {e}")))?;
            let col = |n: &str| {
                batch
                    .column_by_name(n)
                    .cloned()
                    .ok_or_else(|| ArchiveError(format!("{rel}: no column {n}")))
            };
            let (ad, ev, user, status) = (
                col("ad_id")?,
                col("event_time")?,
                col("user_id")?,
                col("status")?,
            );
            let ad = ad.as_primitive::<UInt64Type>();
            let ev = ev.as_primitive::<TimestampMillisecondType>();
            let user = user
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| ArchiveError(format!("{rel}: user_id is not a string")))?;
            let status = status.as_dictionary::<Int8Type>();
            let names = status
                .values()
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| ArchiveError(format!("{rel}: status is not a string dictionary")))?;
            let counted: Vec<bool> = (0..names.len())
                // Invalid traffic (issue 16) is counted too (in `traffic = ALL`).
                .map(|i| matches!(names.value(i), "counted" | "invalid_traffic"))
                .collect();
            out.rows += batch.num_rows() as u64;
            for i in 0..batch.num_rows() {
                let k = status.keys().value(i);
                if !usize::try_from(k)
                    .ok()
                    .and_then(|k| counted.get(k).copied())
                    .unwrap_or(false)
                {
                    continue;
                }
                let minute = ev.value(i).div_euclid(60_000) * 60_000;
                let cell = out.cells.entry((ad.value(i), minute)).or_default();
                cell.clicks += 1;
                if !user.is_null(i) && !user.value(i).is_empty() {
                    cell.users
                        .insert(xxhash_rust::xxh64::xxh64(user.value(i).as_bytes(), 0));
                }
            }
        }
        out.files += 1;
    }
    Ok(out)
}
