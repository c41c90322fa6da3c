//! `adclick collector --config F` and `adclick aggregator --config F`: reads and validates the TOML config (the only place
//! server config files are read), sets up logging and the tokio runtime, and hands over to
//! the library's `run(config, shutdown)`. No server logic lives here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;

/// `adclick collector`
#[derive(Debug, Args)]
pub struct CollectorArgs {
    /// The collector config (see config/collector.toml for every field).
    #[arg(long, short)]
    config: PathBuf,
    /// Only check the config and exit.
    #[arg(long)]
    check: bool,
}

/// Reads and parses a TOML config file, naming the file in every error.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// Logs to stderr; `RUST_LOG` overrides the default `info` level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

pub fn collector(args: CollectorArgs) -> Result<()> {
    let cfg: adclick_collector::CollectorConfig = read_config(&args.config)?;
    cfg.validate()?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("adclick-collector")
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let c = adclick_collector::start(cfg).await?;
        eprintln!(
            "adclick collector {} listening on http://{} (Ctrl-C to stop)",
            c.collector_id(),
            c.http_addr()
        );
        shutdown_signal().await;
        eprintln!("shutting down: finishing in-flight requests");
        c.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })
}

/// `adclick aggregator`
#[derive(Debug, Args)]
pub struct AggregatorArgs {
    /// The aggregator config (see config/aggregator.toml for every field).
    #[arg(long, short)]
    config: PathBuf,
    /// Only check the config and exit.
    #[arg(long)]
    check: bool,
}

pub fn aggregator(args: AggregatorArgs) -> Result<()> {
    let cfg: adclick_aggregator::AggregatorConfig = read_config(&args.config)?;
    cfg.validate()?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    if cfg.api_keys.is_empty() {
        eprintln!("warning: no api_keys configured: every query will be refused (UNAUTHENTICATED)");
    }
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("adclick-aggregator")
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let a = adclick_aggregator::start(cfg).await?;
        eprintln!(
            "adclick aggregator: gRPC on {} (ingest, query, reflection, health), HTTP on http://{} (Ctrl-C to stop)",
            a.grpc_addr(),
            a.http_addr()
        );
        shutdown_signal().await;
        eprintln!("shutting down: writing a final checkpoint");
        a.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })
}
