//! `adclick reconcile --day YYYY-MM-DD`: recomputes one event day's counted clicks and
//! unique users per (ad, minute) and per (ad, day) from the raw click archive, compares them
//! with the aggregator's cells (`BatchGetAdClicks`), prints a summary (cells compared, cells
//! differing, clicks off) and writes every differing cell as a JSON line to `--report`.
//! Exit status 0: no cell differs; 3: some do (the report says which); 1: it could not run.
//!
//! Clicks must match exactly. Unique users are an estimate on the aggregator's side
//! (HyperLogLog, exact while small, about 0.8% standard error beyond): a cell differs on
//! users only when they are off by more than 5% (and more than 2): six standard errors, so
//! estimation noise over millions of cells does not read as damage (at 2%, one day cell of
//! 100,000 did in the 10M-click benchmark). Minute cells are compared while the aggregator still keeps
//! them (`windows.retention_minutes`, 48 h by default); for older days only the day level
//! is compared. Ads the archive does not have are found with `TopAds` over the day (up to
//! 10,000 ads).
//!
//! `--repair` then sets every differing (ad, minute) cell to the archive's counts through
//! the aggregator's `AdminService.ApplyRepair` (admin key): it asks where the archive stands
//! (`GetRepairState.archive_covered`), reads the archive's rows up to that WAL position per
//! dimension combination, and sends them; the aggregator adds what it counted after that
//! position and applies the cells durably and atomically per shard (`aggregator/src/
//! repair.rs`). The repair id (`--repair-id`, default: derived from the day, the position
//! and the cells) makes a resend a no-op. Exit status with `--repair`: 0 when every
//! differing cell was repaired (or none differed), 3 when some could not be (days past the
//! minute retention: only reported). A sharded deployment is repaired shard by shard:
//! point `--endpoint` at each shard (the query front serves no admin calls).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use adclick_archive::read::Pair;
use adclick_archive::{ArchiveConfig, Destination, S3Config};
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{
    BatchGetAdClicksRequest, Granularity, TimeRange, TopAdsRequest, Traffic, top_ads_request,
};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::json;

/// `adclick reconcile`
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The event day (UTC), YYYY-MM-DD.
    #[arg(long)]
    day: String,
    /// The archive on a local directory (its `[archive] dir`).
    #[arg(long, conflicts_with = "s3_bucket")]
    archive_dir: Option<PathBuf>,
    /// The archive in an S3-compatible bucket (credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, as for the aggregator).
    #[arg(long)]
    s3_bucket: Option<String>,
    /// Key prefix in the bucket.
    #[arg(long, default_value = "")]
    s3_prefix: String,
    /// Endpoint of a non-AWS store.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Region.
    #[arg(long)]
    s3_region: Option<String>,
    /// Allow a plain-HTTP endpoint.
    #[arg(long)]
    s3_allow_http: bool,
    /// Aggregator gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    endpoint: String,
    /// Admin API key (default: $ADCLICK_API_KEY).
    #[arg(long, env = "ADCLICK_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Write the differing cells here, one JSON object per line.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Only this writer's files (the aggregator's `[archive] writer_id`): shards sharing one
    /// destination are each reconciled against their own files.
    #[arg(long)]
    writer_id: Option<String>,
    /// Set the differing minute cells to the archive's counts (admin key).
    #[arg(long)]
    repair: bool,
    /// The repair's id (default: derived from the day, the archive position and the cells,
    /// so an identical repair sent twice applies once).
    #[arg(long, requires = "repair")]
    repair_id: Option<String>,
}

/// (ad, cell start ms, the pair).
type Compared = (u64, i64, Pair);

fn archive_config(a: &ReconcileArgs) -> ArchiveConfig {
    ArchiveConfig {
        dir: a.archive_dir.clone().unwrap_or_default(),
        s3: a.s3_bucket.as_ref().map(|b| S3Config {
            bucket: b.clone(),
            prefix: a.s3_prefix.clone(),
            endpoint: a.s3_endpoint.clone(),
            region: a.s3_region.clone(),
            path_style: true,
            allow_http: a.s3_allow_http,
        }),
        ..ArchiveConfig::default()
    }
}

fn day_start_ms(day: &str) -> Result<i64> {
    let t = humantime::parse_rfc3339(&format!("{day}T00:00:00Z"))
        .with_context(|| format!("--day {day:?}: expected YYYY-MM-DD"))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow!("--day {day:?} is before 1970"))?
        .as_millis();
    i64::try_from(ms).context("--day out of range")
}

pub fn run(a: ReconcileArgs) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let from = day_start_ms(&a.day)?;
    let to = from + 86_400_000;
    let cfg = archive_config(&a);
    if a.archive_dir.is_none() && a.s3_bucket.is_none() {
        bail!("name the archive: --archive-dir DIR or --s3-bucket BUCKET");
    }
    let staging = std::env::temp_dir().join(format!("adclick-reconcile-{}", std::process::id()));
    let dest = Destination::open(&cfg, &staging).map_err(|e| anyhow!("{e}"))?;
    let archived = adclick_archive::read::read_day(&dest, &a.day, a.writer_id.as_deref())
        .map_err(|e| anyhow!("{e}"))?;
    drop(dest);
    let _ = std::fs::remove_dir_all(&staging);
    eprintln!(
        "archive: {} files, {} rows, {} (ad, minute) cells with counted clicks for {}",
        archived.files,
        archived.rows,
        archived.cells.len(),
        a.day
    );

    // Archive side: minute cells and day cells (users: distinct over the day).
    let (mut minute, mut day) = archived.pairs();

    // Aggregator side.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let minute_level = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(a.endpoint.clone())
            .with_context(|| format!("invalid --endpoint {:?}", a.endpoint))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot connect to the aggregator at {}", a.endpoint))?;
        let mut client = QueryServiceClient::new(channel);
        let key = a.api_key.clone();
        let authed = |r: &mut tonic::metadata::MetadataMap| -> Result<()> {
            r.insert(
                "authorization",
                format!("Bearer {key}")
                    .parse()
                    .context("API key is not valid header text")?,
            );
            Ok(())
        };
        // Ads the aggregator counted that day and the archive may not have.
        let mut ads: BTreeSet<u64> = day.keys().copied().collect();
        let mut req = tonic::Request::new(TopAdsRequest {
            n: 10_000,
            window: Some(top_ads_request::Window::Range(TimeRange {
                from_ms: from,
                to_ms: to,
            })),
            filter: None,
            // The archive holds every counted click, valid or not: compare with ALL.
            traffic: Traffic::All as i32,
        });
        authed(req.metadata_mut())?;
        match client.top_ads(req).await {
            Ok(r) => ads.extend(r.into_inner().ads.iter().map(|e| e.ad_id)),
            Err(s) => eprintln!(
                "note: TopAds over the day was refused ({}): only the archive's ads are compared",
                s.message()
            ),
        }
        let ads: Vec<u64> = ads.into_iter().collect();
        let mut minute_level = true;
        for chunk in ads.chunks(100) {
            for (g, level_day) in [(Granularity::Day, true), (Granularity::Minute, false)] {
                if !level_day && !minute_level {
                    continue;
                }
                let mut req = tonic::Request::new(BatchGetAdClicksRequest {
                    ad_ids: chunk.to_vec(),
                    from_ms: from,
                    to_ms: to,
                    granularity: g as i32,
                    fill_empty: Some(false),
                    filter: None,
                    traffic: Traffic::All as i32,
                });
                authed(req.metadata_mut())?;
                let r = client.batch_get_ad_clicks(req).await;
                let r = match r {
                    Ok(r) => r.into_inner(),
                    Err(s) if !level_day && s.code() == tonic::Code::InvalidArgument => {
                        eprintln!(
                            "note: minute cells of {} are past the aggregator's minute retention ({}): comparing days only",
                            a.day,
                            s.message()
                        );
                        minute_level = false;
                        continue;
                    }
                    Err(s) => bail!("BatchGetAdClicks: {} {}", s.code(), s.message()),
                };
                for ad in r.ads {
                    for b in ad.buckets {
                        if level_day {
                            let p = day.entry(ad.ad_id).or_default();
                            p.aggregator_clicks += b.clicks;
                            p.aggregator_users = p.aggregator_users.max(b.unique_users);
                        } else {
                            let p = minute.entry((ad.ad_id, b.start_ms)).or_default();
                            p.aggregator_clicks = b.clicks;
                            p.aggregator_users = b.unique_users;
                        }
                    }
                }
            }
        }
        Ok::<bool, anyhow::Error>(minute_level)
    })?;
    if !minute_level {
        minute.clear();
    }

    // Diff.
    let mut report = match &a.report {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let mut summary = String::new();
    let mut any = false;
    let to_repair: Vec<(u64, i64)> = minute
        .iter()
        .filter(|(_, p)| p.clicks_differ() || p.users_differ())
        .map(|(k, _)| *k)
        .collect();
    let day_differs = day.values().any(|p| p.clicks_differ() || p.users_differ());
    let levels: [(&str, Vec<Compared>); 2] = [
        (
            "minute",
            minute.iter().map(|((ad, m), p)| (*ad, *m, *p)).collect(),
        ),
        ("day", day.iter().map(|(ad, p)| (*ad, from, *p)).collect()),
    ];
    for (level, cells) in levels {
        let (mut differ, mut off, mut users_differ) = (0u64, 0u64, 0u64);
        for (ad, start, p) in &cells {
            let c = p.clicks_differ();
            let u = p.users_differ();
            if c {
                differ += 1;
                off += p.archive_clicks.abs_diff(p.aggregator_clicks);
            }
            if u {
                users_differ += 1;
            }
            if (c || u)
                && let Some(w) = report.as_mut()
            {
                writeln!(
                    w,
                    "{}",
                    json!({"level": level, "ad_id": ad, "start_ms": start,
                        "archive_clicks": p.archive_clicks, "aggregator_clicks": p.aggregator_clicks,
                        "archive_users": p.archive_users, "aggregator_users": p.aggregator_users,
                        "clicks_differ": c, "users_differ": u})
                )?;
            }
        }
        any |= differ > 0 || users_differ > 0;
        summary += &format!(
            "{level:<6} cells compared {:>9}  differing {:>7}  clicks off {:>9}  users differing {:>7}\n",
            cells.len(),
            differ,
            off,
            users_differ
        );
    }
    if let Some(mut w) = report {
        w.flush()?;
    }
    print!("reconcile {}:\n{summary}", a.day);
    let mut unrepaired = false;
    if a.repair {
        if !minute_level && day_differs {
            println!(
                "repair: minute cells of {} are past the aggregator's minute retention: the day's differences are reported, not repaired",
                a.day
            );
            unrepaired = true;
        } else if to_repair.is_empty() {
            println!("repair: nothing to repair");
        } else {
            let skipped = repair(&a, &rt, &to_repair)?;
            unrepaired = skipped > 0;
        }
    }
    // Peak RSS of this process (Linux), for the benchmark.
    let peak_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    println!(
        "RESULT reconcile day={} archive_rows={} differing={} seconds={:.2} peak_rss_mib={}",
        a.day,
        archived.rows,
        if any { "yes" } else { "no" },
        started.elapsed().as_secs_f64(),
        peak_kib / 1024
    );
    let failed = if a.repair { unrepaired } else { any };
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Sends the archive's counts of `cells` to the aggregator's `ApplyRepair`; returns the
/// cells it could not set.
fn repair(a: &ReconcileArgs, rt: &tokio::runtime::Runtime, cells: &[(u64, i64)]) -> Result<u32> {
    use adclick_proto::v1::admin_service_client::AdminServiceClient;
    use adclick_proto::v1::{ApplyRepairRequest, GetRepairStateRequest, RepairCell, RepairCombo};
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(a.endpoint.clone())
            .with_context(|| format!("invalid --endpoint {:?}", a.endpoint))?
            .connect()
            .await
            .with_context(|| format!("cannot connect to the aggregator at {}", a.endpoint))?;
        let mut client = AdminServiceClient::new(channel)
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20);
        let auth = format!("Bearer {}", a.api_key);
        // The archive may cover more by the time the repair arrives, and the aggregator
        // may then have let go of the WAL entries between: read again and retry.
        for attempt in 0..5 {
            let mut req = tonic::Request::new(GetRepairStateRequest {});
            req.metadata_mut()
                .insert("authorization", auth.parse().context("API key is not header text")?);
            let state = client
                .get_repair_state(req)
                .await
                .map_err(|s| anyhow!("GetRepairState: {} {}", s.code(), s.message()))?
                .into_inner();
            if state.archive_covered == 0 {
                bail!("the aggregator's archive is off or has published nothing: nothing to repair from");
            }
            let cfg = archive_config(a);
            let staging = std::env::temp_dir()
                .join(format!("adclick-repair-{}", std::process::id()));
            let dest = Destination::open(&cfg, &staging).map_err(|e| anyhow!("{e}"))?;
            let read = adclick_archive::read::read_day_combos(&dest, &a.day, state.archive_covered, a.writer_id.as_deref())
                .map_err(|e| anyhow!("{e}"))?;
            drop(dest);
            let _ = std::fs::remove_dir_all(&staging);
            let mut repair_cells = Vec::with_capacity(cells.len());
            let mut h = xxhash_rust::xxh64::Xxh64::new(0);
            h.update(a.day.as_bytes());
            h.update(&state.archive_covered.to_le_bytes());
            for (ad, m) in cells {
                let mut combos = Vec::new();
                if let Some(cs) = read.cells.get(&(*ad, *m)) {
                    for ((country, device, os, site), c) in cs {
                        let mut users: Vec<u64> = c.users.iter().copied().collect();
                        users.sort_unstable();
                        h.update(&[country.as_bytes(), os.as_bytes(), site.as_bytes()].concat());
                        h.update(&c.clicks.to_le_bytes());
                        combos.push(RepairCombo {
                            country: country.clone(),
                            device: *device,
                            os: os.clone(),
                            site: site.clone(),
                            clicks: c.clicks,
                            user_hashes: users,
                        });
                    }
                }
                h.update(&ad.to_le_bytes());
                h.update(&m.to_le_bytes());
                repair_cells.push(RepairCell {
                    ad_id: *ad,
                    minute_ms: *m,
                    combos,
                });
            }
            let id = a
                .repair_id
                .clone()
                .unwrap_or_else(|| format!("reconcile-{}-{}-{:016x}", a.day, state.archive_covered, h.digest()));
            let mut req = tonic::Request::new(ApplyRepairRequest {
                repair_id: id.clone(),
                archive_covered: state.archive_covered,
                cells: repair_cells,
            });
            req.metadata_mut()
                .insert("authorization", auth.parse().context("API key is not header text")?);
            match client.apply_repair(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.already_applied {
                        println!("repair {id}: already applied (version {}): nothing changed", r.repair_seq);
                    } else {
                        println!(
                            "repair {id}: version {} after WAL position {}: cells set {}  skipped {}  clicks changed {}",
                            r.repair_seq, r.at_wal_pos, r.cells, r.cells_skipped, r.clicks_changed
                        );
                    }
                    return Ok(r.cells_skipped);
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition && attempt < 4 => {
                    eprintln!("note: {} (retrying)", s.message());
                }
                Err(s) => bail!("ApplyRepair: {} {}", s.code(), s.message()),
            }
        }
        bail!("ApplyRepair: the archive kept moving; try again")
    })
}
