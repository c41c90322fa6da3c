//! `adclick collector --config F`, `adclick aggregator --config F` and
//! `adclick query-front --config F`: reads and validates the TOML config (the only place
//! server config files are read), sets up logging and the tokio runtime, and hands over to
//! the library's `run(config, shutdown)`. No server logic lives here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;

/// `adclick collector`
#[derive(Debug, Args)]
pub struct CollectorArgs {
    /// The collector config (see config/collector.toml for every field). Any field can be
    /// overridden from the environment: ADCLICK_COLLECTOR__LISTEN_HTTP=0.0.0.0:8080,
    /// ADCLICK_COLLECTOR__LIMITS__MAX_BODY_BYTES=2097152.
    #[arg(long, short)]
    config: PathBuf,
    /// Only check the config and exit.
    #[arg(long)]
    check: bool,
}

/// Reads and parses a TOML config file, naming the file in every error, then applies
/// environment overrides: `{prefix}__FIELD` for a top-level field and
/// `{prefix}__SECTION__FIELD` for a field of a section, e.g.
/// `ADCLICK_COLLECTOR__LISTEN_HTTP=0.0.0.0:8080` or
/// `ADCLICK_AGGREGATOR__WINDOWS__ALLOWED_DELAY_MS=5000`. Values are read as TOML values
/// (numbers, booleans, arrays) and fall back to strings.
pub fn read_config<T: DeserializeOwned>(path: &Path, prefix: &str) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    apply_env(&mut table, prefix, std::env::vars())?;
    table.try_into().with_context(|| {
        format!(
            "invalid config (file {} plus {prefix}__* environment overrides)",
            path.display()
        )
    })
}

fn apply_env(
    table: &mut toml::Table,
    prefix: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<()> {
    let head = format!("{prefix}__");
    for (k, v) in vars {
        let Some(path) = k.strip_prefix(&head) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        let Some((field, sections)) = keys.split_last() else {
            continue;
        };
        let mut t = &mut *table;
        for sec in sections {
            let entry = t
                .entry(sec.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            t = entry
                .as_table_mut()
                .with_context(|| format!("{k}: `{sec}` is not a section"))?;
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(v));
        t.insert(field.clone(), value);
    }
    Ok(())
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
    let cfg: adclick_collector::CollectorConfig = read_config(&args.config, "ADCLICK_COLLECTOR")?;
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
    /// The aggregator config (see config/aggregator.toml for every field). Any field can be
    /// overridden from the environment: ADCLICK_AGGREGATOR__LISTEN_GRPC=0.0.0.0:9090,
    /// ADCLICK_AGGREGATOR__WINDOWS__ALLOWED_DELAY_MS=5000.
    #[arg(long, short)]
    config: PathBuf,
    /// Only check the config and the store (if the data dir has one: every committed
    /// page's checksum) and exit; non-zero on a problem. Run it on a stopped aggregator.
    #[arg(long)]
    check: bool,
}

pub fn aggregator(args: AggregatorArgs) -> Result<()> {
    let cfg: adclick_aggregator::AggregatorConfig =
        read_config(&args.config, "ADCLICK_AGGREGATOR")?;
    cfg.validate()?;
    if args.check {
        println!("{}: ok", args.config.display());
        // The store too, if there is one: every committed page's checksum.
        let store = cfg.data_dir.join(adclick_aggregator::store::STORE_FILE);
        if store.exists() {
            adclick_aggregator::store::check(&cfg.data_dir)?;
            println!("{}: ok (integrity check passed)", store.display());
        } else {
            println!("{}: no store yet", store.display());
        }
        return Ok(());
    }
    if cfg.query.allow_unauthenticated {
        eprintln!(
            "WARNING: query.allow_unauthenticated = true: anyone who reaches {} or {} can query \
             every ad as admin without a key. Only on a trusted network.",
            cfg.listen_grpc, cfg.listen_http
        );
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

/// `adclick query-front`
#[derive(Debug, Args)]
pub struct QueryFrontArgs {
    /// The query front config (see config/query-front.toml for every field). Any field can
    /// be overridden from the environment: ADCLICK_QUERY_FRONT__LISTEN_GRPC=0.0.0.0:9290,
    /// ADCLICK_QUERY_FRONT__QUERY__RATE_LIMIT_PER_SECOND=100.
    #[arg(long, short)]
    config: PathBuf,
    /// Only check the config (shards covering every partition exactly once included) and
    /// exit; non-zero on a problem.
    #[arg(long)]
    check: bool,
}

pub fn query_front(args: QueryFrontArgs) -> Result<()> {
    let cfg: adclick_aggregator::front::FrontConfig =
        read_config(&args.config, "ADCLICK_QUERY_FRONT")?;
    cfg.validate().map_err(|e| {
        anyhow::anyhow!(
            "invalid query-front config {}: {}",
            args.config.display(),
            e.0
        )
    })?;
    if args.check {
        println!(
            "{}: ok ({} partitions over {} shards)",
            args.config.display(),
            cfg.partitions,
            cfg.shards.len()
        );
        return Ok(());
    }
    if cfg.query.allow_unauthenticated {
        eprintln!(
            "WARNING: query.allow_unauthenticated = true: anyone who reaches {} or {} can query \
             every ad as admin without a key (if the shards allow it). Only on a trusted network.",
            cfg.listen_grpc, cfg.listen_http
        );
    }
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("adclick-query-front")
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let shards: Vec<String> = cfg
            .shards
            .iter()
            .map(|s| format!("{} {} [{}]", s.name, s.grpc, s.partitions))
            .collect();
        let f = adclick_aggregator::front::start(cfg).await?;
        eprintln!(
            "adclick query-front: gRPC on {} (query, reflection, health), HTTP on http://{}, over shards {} (Ctrl-C to stop)",
            f.grpc_addr(),
            f.http_addr(),
            shards.join(", ")
        );
        shutdown_signal().await;
        eprintln!("shutting down: finishing in-flight queries");
        f.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_reach_top_level_and_sections() {
        let mut t: toml::Table =
            toml::from_str("listen_http = \"127.0.0.1:1\"\n[limits]\nmax_body_bytes = 1\n")
                .unwrap();
        let vars = [
            ("ADCLICK_COLLECTOR__LISTEN_HTTP", "0.0.0.0:8080"),
            ("ADCLICK_COLLECTOR__LIMITS__MAX_BODY_BYTES", "2048"),
            ("ADCLICK_COLLECTOR__FORWARD__HOT_FANOUT", "4"),
            (
                "ADCLICK_COLLECTOR__AGGREGATORS",
                "[\"http://a:1\", \"http://b:2\"]",
            ),
            ("ADCLICK_AGGREGATOR__LISTEN_GRPC", "ignored"),
            ("HOME", "/root"),
        ];
        apply_env(
            &mut t,
            "ADCLICK_COLLECTOR",
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap();
        let cfg: adclick_collector::CollectorConfig = t.try_into().unwrap();
        assert_eq!(cfg.listen_http.to_string(), "0.0.0.0:8080");
        assert_eq!(cfg.limits.max_body_bytes, 2048);
        assert_eq!(cfg.forward.hot_fanout, 4);
        assert_eq!(cfg.aggregators, ["http://a:1", "http://b:2"]);
    }

    /// The shipped query-front.toml parses; with a key it validates (two shards over P = 8).
    #[test]
    fn the_shipped_query_front_config_parses_and_validates() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/query-front.toml");
        let mut cfg: adclick_aggregator::front::FrontConfig =
            read_config(Path::new(path), "ADCLICK_QUERY_FRONT_TEST").unwrap();
        assert_eq!((cfg.partitions, cfg.shards.len()), (8, 2));
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("api_keys is empty"), "{e}");
        cfg.api_keys.push(adclick_aggregator::config::ApiKey {
            key: "front-admin-key-0123456789".into(),
            role: adclick_aggregator::config::Role::Admin,
            advertiser_id: None,
        });
        assert_eq!(cfg.validate().unwrap(), [0, 0, 0, 0, 1, 1, 1, 1]);
    }
}
