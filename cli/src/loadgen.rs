//! `adclick loadgen`: drives a running collector through the SDK at a target rate for a
//! duration (the same traffic shape as `adclick dev`), then accounts for every click:
//! offered, acked by the collector (with its verdicts), refused by reason, undelivered; the
//! exit code is non-zero if any click offered was never acknowledged. Also the request
//! latency and errors by kind; `--ledger` records every click sent.
//!
//! A share of the clicks is invalid traffic (crawler User-Agents, a flooding address, a
//! honeypot clicker: `traffic`'s doc); the collector acks them like any other (it never
//! judges), so they are in the accounting like any other.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use crate::keys::read_key_file;
use crate::traffic::{self, Target, TrafficConfig};

/// `adclick loadgen`
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Collector HTTP endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    endpoint: String,
    /// Send over QUIC to this address instead of HTTP (needs --quic-cert).
    #[arg(long)]
    quic: Option<SocketAddr>,
    /// PEM certificate the QUIC collector presents (its quic-dev-cert.pem in dev).
    #[arg(long)]
    quic_cert: Option<PathBuf>,
    /// Key file to mint tokens with (the collector's keys).
    #[arg(long, default_value = "keys.toml")]
    keys: PathBuf,
    /// Target clicks per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// How long to run, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Distinct ads.
    #[arg(long, default_value_t = 1000)]
    ads: u64,
    /// Zipf exponent of ad popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Percent duplicates.
    #[arg(long, default_value_t = 2.0)]
    dup_pct: f64,
    /// Percent late clicks (happened 2-5 minutes before sending).
    #[arg(long, default_value_t = 1.0)]
    late_pct: f64,
    /// Device clocks off by up to this many ms.
    #[arg(long, default_value_t = 120_000)]
    skew_ms: i64,
    /// Percent forged tokens.
    #[arg(long, default_value_t = 1.0)]
    forged_pct: f64,
    /// SDK trackers in parallel.
    #[arg(long, default_value_t = 8)]
    trackers: usize,
    /// Clicks per batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Percent of clicks sent with a crawler User-Agent (HTTP only).
    #[arg(long, default_value_t = 2.0)]
    bot_pct: f64,
    /// Clicks per minute from one flooding client address, on top of --rate (0 = none).
    #[arg(long, default_value_t = 300.0)]
    flood_per_minute: f64,
    /// Ad id of the honeypot link the honeypot clicker clicks (0 = no honeypot clicker).
    #[arg(long, default_value_t = traffic::HONEYPOT_AD)]
    honeypot_ad: u64,
    /// Clicks per minute of the honeypot clicker, on top of --rate.
    #[arg(long, default_value_t = 30.0)]
    honeypot_per_minute: f64,
    /// Write every click sent (token, ad, expected outcome) as JSON lines.
    #[arg(long)]
    ledger: Option<PathBuf>,
}

pub fn run(a: LoadgenArgs) -> Result<()> {
    let keyring = read_key_file(&a.keys)?.keyring;
    let target = match (a.quic, &a.quic_cert) {
        (Some(addr), Some(cert)) => {
            let pem = std::fs::read_to_string(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?;
            Target::Quic(addr, "localhost".into(), pem)
        }
        (Some(_), None) => {
            anyhow::bail!("--quic needs --quic-cert (the collector's certificate PEM)")
        }
        (None, _) => Target::Http(a.endpoint.clone()),
    };
    let cfg = TrafficConfig {
        rate: a.rate,
        ads: a.ads,
        zipf_s: a.zipf,
        duplicate_pct: a.dup_pct,
        late_pct: a.late_pct,
        clock_skew_ms: a.skew_ms,
        forged_pct: a.forged_pct,
        trackers: a.trackers,
        batch_size: a.batch,
        bot_pct: a.bot_pct,
        flood_per_minute: a.flood_per_minute,
        honeypot_ad: a.honeypot_ad,
        honeypot_per_minute: a.honeypot_per_minute,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let t0 = Instant::now();
        let t = traffic::start(cfg, target, keyring, a.ledger.clone())?;
        tokio::time::sleep(a.duration).await;
        let stats = t.stats.clone();
        let generated = stats.clicks.load(Ordering::Relaxed);
        let gen_secs = t0.elapsed().as_secs_f64();
        let acc = t.stop_and_account().await;
        let secs = t0.elapsed().as_secs_f64();
        let (n, p50, p99, max) = stats.latency_ms();
        println!(
            "offered            {} clicks in {gen_secs:.1}s ({:.0}/s; target {:.0}/s): {} duplicates, {} late, {} forged",
            acc.offered,
            generated as f64 / gen_secs,
            a.rate,
            stats.duplicates.load(Ordering::Relaxed),
            stats.late.load(Ordering::Relaxed),
            stats.forged.load(Ordering::Relaxed)
        );
        println!(
            "invalid share      {} crawler UA, {} from the flooding address, {} from the honeypot clicker (ad {})",
            stats.bots.load(Ordering::Relaxed),
            stats.flood.load(Ordering::Relaxed),
            stats.honeypot.load(Ordering::Relaxed),
            a.honeypot_ad
        );
        println!("acked              {} (2xx from the collector; drained in {secs:.1}s total)", acc.acked);
        let outcomes = stats.outcomes();
        if !outcomes.is_empty() {
            let verdict: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  collector said   {}", verdict.join(", "));
        }
        let refused = [
            ("sdk_queue", acc.sdk_queue_refused),
            ("http_4xx", acc.http_refused),
            ("sdk_overflow", acc.dropped_overflow),
        ];
        let refused: Vec<String> = refused
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!(
            "refused            {}",
            if refused.is_empty() { "0".to_string() } else { refused.join(", ") }
        );
        let undelivered = acc.still_queued + acc.late_lost;
        println!(
            "undelivered        {undelivered} ({} still queued in the SDK when the drain ended, {} late clicks whose send failed)",
            acc.still_queued, acc.late_lost
        );
        println!("lost               {} (offered - acked)", acc.lost());
        println!(
            "requests           {n}: latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
        );
        let errors = stats.errors();
        if errors.is_empty() {
            println!("errors             none");
        } else {
            let limited = errors.contains_key("http 429");
            for (k, v) in errors {
                println!("errors             {k}: {v} (requests; retried unless 4xx)");
            }
            if limited {
                // All of loadgen's clicks come from one address.
                println!(
                    "hint               429 = the collector's per-IP click rate limit \
                     (limits.rate_limit_per_ip, default 500/s); `adclick dev` turns it off, \
                     raise it in collector.toml to load-test another collector from one machine"
                );
            }
        }
        if let Some(l) = &a.ledger {
            println!("ledger             {}", l.display());
        }
        if acc.lost() > 0 {
            anyhow::bail!(
                "{} of {} clicks offered were never acknowledged by the collector \
                 (refused {}, undelivered {undelivered})",
                acc.lost(),
                acc.offered,
                acc.sdk_queue_refused + acc.http_refused + acc.dropped_overflow
            );
        }
        Ok(())
    })
}
