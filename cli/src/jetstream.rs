//! `adclick jetstream init --config collector.toml`: creates the JetStream stream of the
//! config's `[forward.jetstream]` if it is missing, or verifies it if present, and prints
//! which. The same create-or-verify a collector with `sink = "jetstream"` runs at start
//! (`adclick_collector::forward::jetstream::ensure_stream`); for operators who want the
//! stream in place before any collector runs. It never changes an existing stream.
//!
//! `adclick jetstream init-global`: the global stream of a multi-region deployment
//! (`global.rs`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;

use adclick_collector::config::SinkKind;
use adclick_collector::forward::jetstream::{Ensured, StreamSpec, init};

use crate::global::{GlobalEnsured, GlobalSpec, RegionSource, ensure_global};
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
    /// Create the global stream of a multi-region deployment on a hub NATS cluster: it
    /// sources every region's clicks stream through the region's JetStream domain (the
    /// regions are leaf nodes of the hub). Checks that the sources agree on the partition
    /// count; on an existing stream, adds the sources it lacks. See README "Regions".
    InitGlobal {
        /// The hub's NATS servers (comma-separated or repeated).
        #[arg(long, required = true, value_delimiter = ',')]
        servers: Vec<String>,
        /// The global stream's name (aggregators of the global view use it as
        /// source.stream).
        #[arg(long, default_value = "CLICKS_GLOBAL")]
        stream: String,
        /// A region's stream, as <jetstream domain>:<stream> (repeat for each region).
        #[arg(long = "source", required = true, value_parser = RegionSource::parse)]
        sources: Vec<RegionSource>,
        /// Replicas of the global stream on the hub cluster.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Retention by age: a global shard can be rebuilt from the stream within it.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        max_age: Duration,
        /// Retention by size in bytes (-1: none; the servers reserve it per replica).
        #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
        max_bytes: i64,
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
        JetStreamCommand::InitGlobal {
            servers,
            stream,
            sources,
            replicas,
            max_age,
            max_bytes,
            timeout,
        } => {
            let spec = GlobalSpec {
                name: stream,
                sources,
                replicas,
                max_age,
                max_bytes,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            let joined = servers.join(",");
            let ensured = rt.block_on(async {
                let addrs = servers
                    .iter()
                    .map(|s| s.parse::<async_nats::ServerAddr>())
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("--servers {joined}"))?;
                let client = async_nats::ConnectOptions::new()
                    .name("adclick-jetstream-init-global")
                    .connection_timeout(timeout)
                    .request_timeout(Some(timeout))
                    .connect(addrs)
                    .await
                    .with_context(|| format!("NATS {joined}"))?;
                ensure_global(&client, &spec, timeout).await
            })?;
            let names: Vec<String> = spec.sources.iter().map(ToString::to_string).collect();
            match ensured {
                GlobalEnsured::Created { partitions } => println!(
                    "created stream {} on {joined}: sources {}, {partitions} partitions, {replicas} replicas",
                    spec.name,
                    names.join(", ")
                ),
                GlobalEnsured::Found { partitions, added } if added.is_empty() => println!(
                    "found stream {} ({partitions} partitions) with every source",
                    spec.name
                ),
                GlobalEnsured::Found { partitions, added } => println!(
                    "found stream {} ({partitions} partitions); added sources {}",
                    spec.name,
                    added.join(", ")
                ),
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
