//! `adclick jetstream init --config collector.toml`: creates the JetStream stream of the
//! config's `[forward.jetstream]` if it is missing, or verifies it if present, and prints
//! which. The same create-or-verify a collector with `sink = "jetstream"` runs at start
//! (`adclick_collector::forward::jetstream::ensure_stream`); for operators who want the
//! stream in place before any collector runs. It never changes an existing stream.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;

use adclick_collector::config::SinkKind;
use adclick_collector::forward::jetstream::{Ensured, StreamSpec, init};

use crate::serve::read_config;

/// `adclick jetstream`
#[derive(Debug, Subcommand)]
pub enum JetStreamCommand {
    /// Create the stream of a collector config's [forward.jetstream] if missing, else
    /// verify it (a different partition count or subject set is an error; other
    /// differences are printed and left alone). Exits 1 on an error.
    Init {
        /// A collector config (its [forward.jetstream] table; environment overrides
        /// ADCLICK_COLLECTOR__FORWARD__JETSTREAM__* apply).
        #[arg(long, short)]
        config: PathBuf,
        /// How long to wait for the servers.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

pub fn run(cmd: JetStreamCommand) -> Result<()> {
    match cmd {
        JetStreamCommand::Init { config, timeout } => {
            let cfg: adclick_collector::CollectorConfig =
                read_config(&config, "ADCLICK_COLLECTOR")?;
            let js = &cfg.forward.jetstream;
            js.validate()?;
            if cfg.forward.sink != SinkKind::Jetstream {
                eprintln!(
                    "note: {} has forward.sink = \"grpc\"; its collectors will not use this stream until it says \"jetstream\"",
                    config.display()
                );
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            let (spec, ensured) = rt
                .block_on(init(js, timeout))
                .with_context(|| format!("NATS {}", js.servers.join(",")))?;
            match ensured {
                Ensured::Created => println!("created stream {}", describe(&spec)),
                Ensured::Found { differences } => {
                    println!(
                        "found stream {} (partitions and subjects match)",
                        describe(&spec)
                    );
                    for d in differences {
                        println!("  differs from the config, left as it is: {d}");
                    }
                }
            }
            Ok(())
        }
    }
}

fn describe(s: &StreamSpec) -> String {
    format!(
        "{}: subjects {}, {} partitions, {} replicas, max_age {}, max_bytes {}, duplicate_window {}",
        s.name,
        s.subject_filter(),
        s.partitions,
        s.replicas,
        humantime::format_duration(s.max_age),
        s.max_bytes,
        humantime::format_duration(s.duplicate_window)
    )
}
