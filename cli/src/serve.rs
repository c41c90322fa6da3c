//! `adclick collector --config F`, `adclick aggregator --config F` and
//! `adclick query-front --config F`: reads and validates the TOML config (the only place
//! server config files are read), sets up the tokio runtime (logging: `logging.rs`), and hands over to
//! the library's `run(config, shutdown)`. No server logic lives here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;

use crate::logging::LIFECYCLE;

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
    pub check: bool,
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

/// The directory relative paths in `config` resolve against: the config file's own, so a
/// server finds its files wherever it is started from.
pub fn config_dir(config: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(config)
        .with_context(|| format!("cannot resolve {}", config.display()))?;
    Ok(abs.parent().map(Path::to_path_buf).unwrap_or(abs))
}

/// `p` made absolute against `base` when relative.
pub fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

/// Prints a `--check` run: the config's validation, every finding, the effective config;
/// `Err` (exit 1) if anything would stop a start.
fn finish_check(
    config: &Path,
    valid: std::result::Result<(), String>,
    report: crate::check::Report,
    effective: &str,
) -> Result<()> {
    match &valid {
        Ok(()) => println!("ok       config {}: valid", config.display()),
        Err(e) => println!("problem  config {}: {e}", config.display()),
    }
    print!("{}", report.render());
    println!("\n# effective config (file, environment overrides and defaults; secrets redacted)");
    print!("{effective}");
    let mut problems: Vec<String> = report.problems().iter().map(|s| s.to_string()).collect();
    if let Err(e) = valid {
        problems.insert(0, e);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{}: {} problem(s): {}",
            config.display(),
            problems.len(),
            problems.join("; ")
        )
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this is called
/// (inside the runtime), not when the future is first polled: a signal that arrives right
/// after the "listening" line is logged still stops the server gracefully.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut t), Some(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub fn collector(args: CollectorArgs) -> Result<()> {
    let mut cfg: adclick_collector::CollectorConfig =
        read_config(&args.config, "ADCLICK_COLLECTOR")?;
    let base = config_dir(&args.config)?;
    for p in [&mut cfg.data_dir, &mut cfg.keys_file]
        .into_iter()
        .chain(cfg.tls_cert_file.as_mut())
        .chain(cfg.tls_key_file.as_mut())
    {
        resolve(&base, p);
    }
    // An operator's bot list too ("builtin" names the embedded one, not a file).
    if cfg.user_agent.bot_list != adclick_collector::useragent::BUILTIN
        && Path::new(&cfg.user_agent.bot_list).is_relative()
    {
        cfg.user_agent.bot_list = base
            .join(&cfg.user_agent.bot_list)
            .to_string_lossy()
            .into_owned();
    }
    // `[[source.file]]` globs too (a glob is a path with wildcards).
    for f in &mut cfg.source.file {
        for g in &mut f.paths {
            if std::path::Path::new(g.as_str()).is_relative() {
                *g = base.join(g.as_str()).to_string_lossy().into_owned();
            }
        }
    }
    let valid = cfg.validate();
    if args.check {
        let mut r = crate::check::collector(&cfg);
        crate::check::config_file_mode(&mut r, &args.config, cfg.aggregator_key.is_some());
        let shown = crate::check::effective(&cfg, &["aggregator_key"])?;
        return finish_check(&args.config, valid.map_err(|e| e.to_string()), r, &shown);
    }
    valid?;
    // A key file others can read is refused at every start, not only by --check.
    crate::check::key_files(&cfg)
        .into_result()
        .context("refusing to start")?;
    crate::logging::set_context("collector_id", cfg.collector_id.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("adclick-collector")
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let stop = shutdown_signal();
        let c = adclick_collector::start(cfg).await?;
        // From here on the id the collector has on the wire, as its own events say it.
        crate::logging::set_context("collector_id", c.collector_id().to_string());
        tracing::info!(
            target: LIFECYCLE,
            http = %c.http_addr(),
            "adclick collector {} listening on http://{} (Ctrl-C to stop)",
            c.collector_id(),
            c.http_addr()
        );
        stop.await;
        tracing::info!(target: LIFECYCLE, "shutting down: finishing in-flight requests");
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
    pub check: bool,
}

pub fn aggregator(args: AggregatorArgs) -> Result<()> {
    let mut cfg: adclick_aggregator::AggregatorConfig =
        read_config(&args.config, "ADCLICK_AGGREGATOR")?;
    let base = config_dir(&args.config)?;
    resolve(&base, &mut cfg.data_dir);
    resolve(&base, &mut cfg.archive.dir);
    if let Some(p) = cfg.rules.datacenter_ip.cidr_file.as_mut() {
        resolve(&base, p);
    }
    let valid = cfg.validate();
    if args.check {
        let mut r = crate::check::aggregator(&cfg);
        let secrets = !cfg.ingest_keys.is_empty() || !cfg.api_keys.is_empty();
        crate::check::config_file_mode(&mut r, &args.config, secrets);
        // The store too, if there is one: every committed page's checksum.
        let store = cfg.data_dir.join(adclick_aggregator::store::STORE_FILE);
        if valid.is_ok() {
            if store.exists() {
                match adclick_aggregator::store::check(&cfg.data_dir) {
                    Ok(_) => r.ok(format!("store {}: integrity check passed", store.display())),
                    Err(e) => r.problem(format!("store {}: {e:#}", store.display())),
                }
            } else {
                r.ok(format!("store {}: none yet", store.display()));
            }
        }
        let shown = crate::check::effective(&cfg, &["ingest_keys.[]", "api_keys.[].key"])?;
        return finish_check(&args.config, valid.map_err(|e| e.to_string()), r, &shown);
    }
    valid?;
    if cfg.query.allow_unauthenticated {
        tracing::warn!(
            target: LIFECYCLE,
            "WARNING: query.allow_unauthenticated = true: anyone who reaches {} or {} can query \
             every ad as admin without a key. Only on a trusted network.",
            cfg.listen_grpc,
            cfg.listen_http
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("adclick-aggregator")
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let stop = shutdown_signal();
        let a = adclick_aggregator::start(cfg).await?;
        tracing::info!(
            target: LIFECYCLE,
            grpc = %a.grpc_addr(),
            http = %a.http_addr(),
            "adclick aggregator: gRPC on {} (ingest, query, reflection, health), HTTP on http://{} (Ctrl-C to stop)",
            a.grpc_addr(),
            a.http_addr()
        );
        stop.await;
        tracing::info!(target: LIFECYCLE, "shutting down: writing a final checkpoint");
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
    pub check: bool,
}

pub fn query_front(args: QueryFrontArgs) -> Result<()> {
    let cfg: adclick_aggregator::front::FrontConfig =
        read_config(&args.config, "ADCLICK_QUERY_FRONT")?;
    let valid = cfg.validate().map(|_| ()).map_err(|e| {
        anyhow::anyhow!(
            "invalid query-front config {}: {}",
            args.config.display(),
            e.0
        )
    });
    if args.check {
        let mut r = crate::check::query_front(&cfg);
        crate::check::config_file_mode(&mut r, &args.config, !cfg.api_keys.is_empty());
        if valid.is_ok() {
            r.ok(format!(
                "{} partitions over {} shards, each exactly once",
                cfg.partitions,
                cfg.shards.len()
            ));
        }
        let shown = crate::check::front_effective(&cfg)?;
        return finish_check(&args.config, valid.map_err(|e| e.to_string()), r, &shown);
    }
    valid?;
    if cfg.query.allow_unauthenticated {
        tracing::warn!(
            target: LIFECYCLE,
            "WARNING: query.allow_unauthenticated = true: anyone who reaches {} or {} can query \
             every ad as admin without a key (if the shards allow it). Only on a trusted network.",
            cfg.listen_grpc,
            cfg.listen_http
        );
    }
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
        let stop = shutdown_signal();
        let f = adclick_aggregator::front::start(cfg).await?;
        tracing::info!(
            target: LIFECYCLE,
            grpc = %f.grpc_addr(),
            http = %f.http_addr(),
            "adclick query-front: gRPC on {} (query, reflection, health), HTTP on http://{}, over shards {} (Ctrl-C to stop)",
            f.grpc_addr(),
            f.http_addr(),
            shards.join(", ")
        );
        stop.await;
        tracing::info!(target: LIFECYCLE, "shutting down: finishing in-flight queries");
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
