//! `adclick spool ...`: offline tools for a collector's spool directory. `verify` is
//! read-only and exits non-zero on damage; `set-incarnation` is the operator repair for a
//! spool whose incarnation file and its copy are both damaged. Neither runs while a
//! collector holds the spool (the lock says so).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

/// `adclick spool`
#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// Check a spool offline (read-only): segments, records, synced and acked seqs, every
    /// damaged range with offsets. Exits 1 on damage. Run it on a stopped collector.
    Verify {
        /// The spool directory (`{data_dir}/spool` of the collector).
        dir: PathBuf,
    },
    /// Write the incarnation id of a spool whose incarnation file and ack-file copy are
    /// both damaged (the collector refuses to start with such a spool).
    SetIncarnation {
        /// The spool directory.
        dir: PathBuf,
        /// The 16 hex digits after the last '-' of the collector id the collector logged
        /// (`collector_id=NAME-XXXXXXXXXXXXXXXX`) before the damage.
        #[arg(required_unless_present = "new", conflicts_with = "new")]
        hex: Option<String>,
        /// Use a new random id instead: pending records are resent under a new collector
        /// id, and the aggregator's impression dedup drops clicks it already counted
        /// (within its dedup window).
        #[arg(long)]
        new: bool,
    },
}

pub fn run(cmd: SpoolCommand) -> Result<std::process::ExitCode> {
    match cmd {
        SpoolCommand::Verify { dir } => {
            let report = adclick_collector::spool::verify(&dir)
                .with_context(|| format!("cannot verify the spool in {}", dir.display()))?;
            println!("{report}");
            Ok(if report.is_damaged() {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            })
        }
        SpoolCommand::SetIncarnation { dir, hex, new } => {
            let id = match (hex, new) {
                (_, true) => adclick_collector::spool::random_incarnation(),
                (Some(h), false) => {
                    let h = h.trim();
                    if h.len() != 16 {
                        bail!("expected 16 hex digits, got {:?}", h);
                    }
                    u64::from_str_radix(h, 16).with_context(|| format!("not hex: {h:?}"))?
                }
                (None, false) => bail!("give the 16 hex digits or --new"),
            };
            adclick_collector::spool::set_incarnation(&dir, id)
                .with_context(|| format!("cannot write the incarnation of {}", dir.display()))?;
            println!("{}: incarnation {id:016x}", dir.display());
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
