//! `adclick dev`: the whole pipeline on one machine. It creates a data dir with keys and
//! API keys if missing, starts an aggregator and a collector in-process (embedded
//! storage, localhost ports), drives synthetic traffic through the native SDK, and
//! redraws a live view every second until Ctrl-C or `--duration`.
//!
//! `adclick dev --cluster` (`cluster.rs`) runs the JetStream back end instead, every server
//! a child process: 3 nats-server nodes, 2 collectors, 2 aggregator shards and the query
//! front. This file holds what both share: the arguments, the data dir's secrets and the
//! live view.

pub(crate) mod cluster;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use adclick_aggregator::config::{ApiKey, Role};
use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{TopAdsRequest, top_ads_request::Window};
use anyhow::{Context, Result};
use clap::Args;

use crate::keys::now_ms;
use crate::traffic::{self, Target, TrafficConfig};
pub(crate) use crate::view::View;

/// The dev aggregator's `rules.ip_rate` and `rules.user_rate` `max_per_minute` (see `run`).
pub(crate) const DEV_IP_RATE: u32 = 250;

/// `adclick dev`
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where keys, API keys, spool and store live (created if missing; reused on restart).
    #[arg(long, default_value = ".adclick-dev")]
    data_dir: PathBuf,
    /// Synthetic clicks per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Distinct ads in the synthetic traffic (Zipf-distributed popularity).
    #[arg(long, default_value_t = 1000)]
    ads: u64,
    /// Stop after this long (e.g. 30s, 5m); default: run until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Servers only, no synthetic traffic (to try the SDK, curl or grpcurl by hand).
    #[arg(long)]
    no_traffic: bool,
    /// Collector HTTP port (QUIC uses the same number over UDP).
    #[arg(long, default_value_t = 8080)]
    collector_port: u16,
    /// Aggregator gRPC port (ingest, queries, reflection, health).
    #[arg(long, default_value_t = 9090)]
    grpc_port: u16,
    /// Aggregator HTTP port (JSON queries, /metrics).
    #[arg(long, default_value_t = 9091)]
    query_port: u16,
    /// The JetStream back end, every server a child process: 3 nats-server nodes (R3),
    /// 2 collectors (--collector-port and the next), 2 aggregator shards (--shard-port..),
    /// the query front (--grpc-port, --query-port); `<data-dir>/dev.json` lists them.
    #[arg(long)]
    cluster: bool,
    /// With --cluster: partitions of the clicks stream (fixed when the stream is created).
    #[arg(long, default_value_t = 16, requires = "cluster")]
    partitions: u32,
    /// With --cluster: first NATS client port (nodes use it and the next two; cluster routes
    /// use the three ports from --nats-port + 2000).
    #[arg(long, default_value_t = 4222, requires = "cluster")]
    nats_port: u16,
    /// With --cluster: first shard port (shard i: gRPC --shard-port + 2i, HTTP the next).
    #[arg(long, default_value_t = 9190, requires = "cluster")]
    shard_port: u16,
    /// With --cluster: every port picked free at random (below the kernel's ephemeral range)
    /// instead of the fixed defaults, for scripts and tests running several at once; dev.json
    /// and the banner say which.
    #[arg(long, requires = "cluster")]
    auto_ports: bool,
}

fn read_or_create(path: &Path, make: impl FnOnce() -> Result<String>) -> Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        return Ok(s.trim().to_string());
    }
    let s = make()?;
    std::fs::write(path, format!("{s}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(s)
}

fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    Ok(hex::encode(b))
}

/// Prepares the data dir: keys.toml, admin.key, advertiser-1.key, ingest.key.
fn prepare(dir: &Path) -> Result<(Keyring, String, String, String)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let keys_path = dir.join("keys.toml");
    let text = read_or_create(&keys_path, || {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
        let file = KeyFile {
            keyring: Keyring::new(SigningKey::new(1, &secret)?),
            created: vec![(1, now_ms())],
        };
        Ok(file.render()?)
    })?;
    let keyring = KeyFile::parse(&text)
        .with_context(|| format!("in {}", keys_path.display()))?
        .keyring;
    let admin = read_or_create(&dir.join("admin.key"), || random_hex(16))?;
    let adv = read_or_create(&dir.join("advertiser-1.key"), || random_hex(16))?;
    let ingest = read_or_create(&dir.join("ingest.key"), || random_hex(16))?;
    Ok((keyring, admin, adv, ingest))
}

pub fn run(args: DevArgs) -> Result<()> {
    if args.cluster {
        return cluster::run(args);
    }
    let (keyring, admin, adv, ingest) = prepare(&args.data_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let local = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut acfg = adclick_aggregator::AggregatorConfig {
            listen_grpc: local(args.grpc_port),
            listen_http: local(args.query_port),
            data_dir: args.data_dir.join("aggregator"),
            api_keys: vec![
                ApiKey { key: admin.clone(), role: Role::Admin, advertiser_id: None },
                ApiKey { key: adv.clone(), role: Role::Advertiser, advertiser_id: Some(1) },
            ],
            ingest_keys: vec![ingest.clone()],
            ..Default::default()
        };
        acfg.windows.allowed_delay_ms = 5_000;
        acfg.checkpoint.interval_ms = 10_000;
        // Invalid-traffic rules on (they are off by default so an upgrade does not change a
        // deployment's counts), with the dev traffic's honeypot ad as a trap: its flood, bot
        // User-Agents and honeypot clicker show as invalid by reason.
        acfg.rules.enabled = true;
        acfg.rules.honeypot.ad_ids = vec![crate::traffic::HONEYPOT_AD];
        // Except too_fast: by hand (the README, curl, the SDK demos) a token is minted and
        // clicked within the same second, which that rule rightly calls a bot.
        acfg.rules.too_fast.enabled = false;
        // And per-IP and per-user budgets of 250 clicks a minute instead of 100: every
        // hand-made or SDK-demo click comes from 127.0.0.1, often with one demo user id
        // (the generator's flood, 300/min from 127.0.0.2, still trips it).
        acfg.rules.ip_rate.max_per_minute = DEV_IP_RATE;
        acfg.rules.user_rate.max_per_minute = DEV_IP_RATE;
        let agg = adclick_aggregator::start(acfg)
            .await
            .context("cannot start the aggregator (is another `adclick dev` running? try --grpc-port/--query-port)")?;
        let mut ccfg = adclick_collector::CollectorConfig {
            listen_http: local(args.collector_port),
            listen_quic: Some(local(args.collector_port)),
            data_dir: args.data_dir.join("collector"),
            keys_file: args.data_dir.join("keys.toml"),
            aggregators: vec![format!("http://{}", agg.grpc_addr())],
            aggregator_key: Some(ingest),
            ..Default::default()
        };
        ccfg.forward.retry_base_ms = 50;
        ccfg.forward.retry_max_ms = 1_000;
        // Dev traffic (the built-in generator, `adclick loadgen`, the browser demo) all comes
        // from 127.0.0.1 at thousands of clicks/s: the per-IP click rate limit is off in dev
        // (explicitly; production keeps the default of limits.rate_limit_per_ip).
        ccfg.limits.rate_limit_per_ip = 0.0;
        // The traffic generator plays a load balancer: its X-Forwarded-For spreads the
        // ordinary clicks over many client addresses (so only the flood trips the ip_rate
        // rule); its flood and honeypot clicker connect from 127.0.0.2 and .3, which are
        // not trusted, so their socket address is the client.
        ccfg.trusted_proxies = vec!["127.0.0.1/32".into()];
        let col = adclick_collector::start(ccfg)
            .await
            .context("cannot start the collector (is the port free? try --collector-port)")?;

        let collector_url = format!("http://{}", col.http_addr());
        banner(&args, &collector_url, &agg, &admin);
        let traffic = if args.no_traffic {
            None
        } else {
            let cfg = TrafficConfig { rate: args.rate, ads: args.ads, ..Default::default() };
            Some(traffic::start(cfg, Target::Http(collector_url.clone()), keyring, None)?)
        };

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", agg.grpc_addr()))?
            .connect_lazy();
        let mut query = QueryServiceClient::new(channel);
        let started = Instant::now();
        let tty = std::io::stdout().is_terminal();
        let mut last = (Instant::now(), 0u64);
        let ctrl_c = crate::serve::shutdown_signal();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = &mut ctrl_c => break,
            }
            let cm = col.metrics();
            let accepted = cm.clicks_with("accepted");
            let rate = (accepted - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), accepted);
            let mut req = tonic::Request::new(TopAdsRequest { n: 10, window: Some(Window::LastMinutes(5)), filter: None, ..Default::default() });
            req.metadata_mut().insert("authorization", format!("Bearer {admin}").parse()?);
            let top = query.top_ads(req).await.map(|r| r.into_inner().ads).unwrap_or_default();
            let am = agg.metrics();
            let rejected: Vec<(String, u64)> = crate::view::REJECT_REASONS
                .into_iter()
                .map(|r| (r.to_string(), cm.clicks_with(r)))
                .filter(|(_, n)| *n > 0)
                .collect();
            let wm = (am.watermark_seconds.get() * 1000.0) as i64;
            let view = View {
                uptime: started.elapsed(),
                rate,
                accepted,
                duplicate: cm.clicks_with("duplicate"),
                rejected,
                user_agents: crate::view::user_agent_classes(|c| cm.user_agent_clicks_with(c)),
                counted: am.clicks_with("applied"),
                late: am.clicks_with("late"),
                agg_duplicate: am.clicks_with("duplicate"),
                invalid: adclick_aggregator::rules::Reason::ALL
                    .into_iter()
                    .map(|r| (r.label().to_string(), am.invalid_with(r.label())))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                watermark: wm,
                top: top.iter().map(|a| (a.ad_id, a.clicks)).collect(),
                queued: Some(traffic.as_ref().map_or(0, |t| t.queued())),
                title: "adclick dev".into(),
                notes: Vec::new(),
                ..View::default()
            };
            if tty {
                print!("\x1b[2J\x1b[H{}", view.render());
                println!("\n{collector_url}   Ctrl-C to stop");
            } else {
                println!("{}", view.line());
            }
            if args.duration.is_some_and(|d| started.elapsed() >= d) {
                break;
            }
        }
        eprintln!("stopping: draining the SDK, then the collector and the aggregator...");
        if let Some(t) = traffic {
            t.stop().await;
        }
        col.shutdown().await;
        agg.shutdown().await;
        eprintln!("stopped; data kept in {}", args.data_dir.display());
        Ok(())
    })
}

fn banner(args: &DevArgs, collector: &str, agg: &adclick_aggregator::Aggregator, admin: &str) {
    let d = args.data_dir.display();
    println!(
        "adclick dev: collector {collector} (QUIC udp/{}), aggregator gRPC {} and HTTP http://{}",
        args.collector_port,
        agg.grpc_addr(),
        agg.http_addr()
    );
    println!(
        "keys: {d}/keys.toml   admin API key: {d}/admin.key   advertiser 1 key: {d}/advertiser-1.key"
    );
    println!(
        "dashboard: http://{}/ui   (paste the admin API key from {d}/admin.key)",
        agg.http_addr()
    );
    println!("try, in another terminal:");
    println!("  adclick query top --n 10 --last 5m                     # reads {d}/admin.key");
    println!(
        "  T=$(adclick impression mint --keys {d}/keys.toml --ad 42 --advertiser 7 --campaign 1 --landing-url https://example.com/x)"
    );
    println!("  curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}\\n' {collector}/c/$T");
    println!(
        "  adclick query clicks --ad 777777 --last 10m                # 1 click, however often the link is followed"
    );
    println!(
        "  curl -s -H \"authorization: Bearer {admin}\" 'http://{}/v1/ads/top?n=5&last_minutes=5'",
        agg.http_addr()
    );
    std::thread::sleep(Duration::from_millis(1500));
}
