//! `adclick bench reconcile`: `adclick reconcile` over one day of N clicks. An in-process
//! aggregator with the archive on ingests the issue-13 mix over gRPC (event times in one
//! hour of 2026-01-01), stops (publishing the archive), restarts, and `adclick reconcile`
//! runs as a child process against it; its wall time and peak RSS are the figures.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use adclick_aggregator::AggregatorConfig;
use adclick_aggregator::benchkit::{MixBatches, MixConfig};
use adclick_aggregator::config::{ApiKey, Role};
use adclick_proto::v1::IngestBatch;
use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use anyhow::{Context, Result, bail};
use clap::Args;
use prost::Message;

/// `adclick bench reconcile`
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Clicks in the day.
    #[arg(long, default_value_t = 10_000_000)]
    clicks: u64,
    /// Distinct ads.
    #[arg(long, default_value_t = 100_000)]
    ads: u64,
    /// Append the result table to this file.
    #[arg(long)]
    append: Option<PathBuf>,
}

const ADMIN: &str = "bench-admin-key-0123456789";
const INGEST: &str = "bench-ingest-key-0123456789";

pub fn run(a: ReconcileArgs) -> Result<()> {
    if a.clicks == 0 {
        bail!("--clicks must be at least 1");
    }
    let base = std::env::temp_dir().join(format!("adclick-bench-reconcile-{}", std::process::id()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _c = Cleanup(base.clone());
    let mut cfg = AggregatorConfig {
        listen_grpc: "127.0.0.1:0".parse()?,
        listen_http: "127.0.0.1:0".parse()?,
        data_dir: base.join("data"),
        ingest_keys: vec![INGEST.into()],
        api_keys: vec![ApiKey {
            key: ADMIN.into(),
            role: Role::Admin,
            advertiser_id: None,
        }],
        ..AggregatorConfig::default()
    };
    cfg.query.rate_limit_per_second = 0;
    cfg.archive.enabled = true;
    cfg.archive.dir = base.join("archive");
    let mix = MixConfig {
        clicks: a.clicks,
        ads: a.ads,
        batch: 5_000,
        ..MixConfig::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    eprintln!("reconcile bench: ingesting {} clicks...", a.clicks);
    let t = Instant::now();
    rt.block_on(async {
        let agg = adclick_aggregator::start(cfg.clone()).await?;
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", agg.grpc_addr()))?
            .connect()
            .await?;
        let mut ing = IngestServiceClient::new(ch)
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20);
        for bytes in MixBatches::new(&mix) {
            let b = IngestBatch::decode(bytes.as_slice())?;
            let mut req = tonic::Request::new(b);
            req.metadata_mut()
                .insert("authorization", format!("Bearer {INGEST}").parse()?);
            ing.ingest(req).await.context("ingest")?;
        }
        agg.shutdown().await;
        Ok::<(), anyhow::Error>(())
    })?;
    eprintln!(
        "ingested and archived in {:.1} s; reconciling...",
        t.elapsed().as_secs_f64()
    );
    let (agg, grpc) = rt.block_on(async {
        let agg = adclick_aggregator::start(cfg.clone()).await?;
        let g = agg.grpc_addr();
        Ok::<_, anyhow::Error>((agg, g))
    })?;
    let t = Instant::now();
    let out = Command::new(std::env::current_exe()?)
        .args(["reconcile", "--day", "2026-01-01", "--archive-dir"])
        .arg(base.join("archive"))
        .args(["--endpoint", &format!("http://{grpc}"), "--api-key", ADMIN])
        .output()?;
    let wall = t.elapsed().as_secs_f64();
    rt.block_on(agg.shutdown());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !matches!(out.status.code(), Some(0 | 3)) {
        bail!(
            "reconcile failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT reconcile"))
        .unwrap_or("")
        .to_string();
    let field = |k: &str| {
        result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or("?")
            .to_string()
    };
    let mut t = format!("### adclick bench reconcile, {}\n\n", super::machine());
    t += &format!(
        "`adclick bench reconcile --clicks {} --ads {}`\n\n",
        a.clicks, a.ads
    );
    t += "```text\n";
    t += &stdout
        .lines()
        .filter(|l| !l.starts_with("RESULT"))
        .collect::<Vec<_>>()
        .join("\n");
    t += "\n```\n\n";
    t += &format!(
        "| clicks | archive rows | wall s (child, incl. start) | reconcile s | peak RSS MiB | differing |\n|---|---|---|---|---|---|\n| {} | {} | {wall:.1} | {} | {} | {} |\n",
        a.clicks,
        field("archive_rows"),
        field("seconds"),
        field("peak_rss_mib"),
        field("differing")
    );
    let line = format!(
        "RESULT bench=reconcile clicks={} ads={} wall_seconds={wall:.2} reconcile_seconds={} peak_rss_mib={} differing={}",
        a.clicks,
        a.ads,
        field("seconds"),
        field("peak_rss_mib"),
        field("differing")
    );
    super::emit(&t, &line, a.append.as_deref())
}
