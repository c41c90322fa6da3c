//! `adclick bench jetstream --servers nats://...`: the JetStream back end's two figures
//! from issue 12, on servers the operator started (an R3 cluster with `sync_interval:
//! always` is what production runs; `adclick dev --cluster --no-traffic` starts one).
//!
//! 1. **Publish latency**: one collector-shaped message (an `IngestBatch` of
//!    `--clicks-per-message` clicks, `Nats-Msg-Id` set) published and its ack awaited, one
//!    at a time: p50/p99/max of publish -> ack. Then the same messages with
//!    `--in-flight` publishes outstanding (what a collector's pipeline does): messages/s
//!    and clicks/s acked.
//! 2. **Per-partition aggregator throughput**: an in-process aggregator shard owning only
//!    partition 0 consumes everything published above (all of it on `<prefix>.0`, ads of
//!    partition 0) from the stream: clicks/s from its start until its committed stream
//!    position reaches the last message (apply, dedup, WAL and state commit included).
//!
//! It creates its own stream (`BENCH_<random>`, subjects `bench<random>.*`) and deletes it
//! at the end. Measures, never asserts.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use adclick_aggregator::config::AggregatorConfig;
use adclick_aggregator::source::metrics::PartitionLabel;
use adclick_aggregator::source::{SourceConfig, SourceKind};
use adclick_collector::forward::jetstream::StreamSpec;
use adclick_proto::partition::partition;
use adclick_proto::v1::{IngestBatch, IngestClick};
use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use clap::Args;
use prost::Message;

use crate::keys::now_ms;

/// `adclick bench jetstream`
#[derive(Debug, Args)]
pub struct JetstreamArgs {
    /// NATS servers (comma-separated): an R3 cluster with sync_interval: always for
    /// figures that mean anything.
    #[arg(long, required = true, value_delimiter = ',')]
    servers: Vec<String>,
    /// Replicas of the benchmark stream.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Clicks in one published message (a collector batches a spool record's clicks
    /// per partition).
    #[arg(long, default_value_t = 100)]
    clicks_per_message: usize,
    /// Messages published one at a time (the latency phase).
    #[arg(long, default_value_t = 2_000)]
    sequential: usize,
    /// Messages published with `--in-flight` outstanding (the throughput phase).
    #[arg(long, default_value_t = 20_000)]
    pipelined: usize,
    /// Publishes outstanding in the throughput phase.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Append the result table to this file.
    #[arg(long)]
    append: Option<PathBuf>,
}

const PARTITIONS: u32 = 16;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Message `k`: `clicks` clicks on ads of partition 0, each with its own impression id.
fn message(k: u64, clicks: usize, ads: &[u64], t: i64) -> Vec<u8> {
    let clicks = (0..clicks as u64)
        .map(|i| {
            let n = k * 1_000_000 + i;
            let mut imp = [0u8; 16];
            imp[..8].copy_from_slice(&n.to_le_bytes());
            imp[8..].copy_from_slice(&0xbe9c_u64.to_le_bytes());
            IngestClick {
                impression_id: imp.to_vec(),
                ad_id: ads[(n % ads.len() as u64) as usize],
                advertiser_id: 1 + n % 50,
                campaign_id: 1 + n % 500,
                token_expires_at_ms: t + 3_600_000,
                event_time_ms: t,
                received_at_ms: t,
                occurred_at_ms: t,
                sent_at_ms: t,
                country: ["US", "DE", "FR", "BR", "JP"][(n % 5) as usize].into(),
                device: (n % 3) as i32 + 1,
                os: "android".into(),
                site: format!("site-{}", n % 100),
                user_id: format!("user-{}", n % 100_000),
                client_ip: vec![10, 0, (n >> 8) as u8, n as u8],
                ..Default::default()
            }
        })
        .collect();
    IngestBatch {
        collector_id: "bench-collector".into(),
        seq: k + 1,
        clicks,
        ..Default::default()
    }
    .encode_to_vec()
}

pub fn run(a: JetstreamArgs) -> Result<()> {
    if a.clicks_per_message == 0 || a.in_flight == 0 {
        bail!("--clicks-per-message and --in-flight must be at least 1");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(a))
}

async fn bench(a: JetstreamArgs) -> Result<()> {
    let addrs = a
        .servers
        .iter()
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("--servers")?;
    let client = async_nats::ConnectOptions::new()
        .name("adclick-bench")
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(addrs)
        .await
        .with_context(|| format!("NATS {}", a.servers.join(",")))?;
    let js = jetstream::new(client.clone());
    let tag = format!("{:08x}", rand_u32());
    let spec = StreamSpec {
        name: format!("BENCH_{tag}"),
        subject_prefix: format!("bench{tag}"),
        partitions: PARTITIONS,
        replicas: a.replicas,
        max_age: Duration::from_secs(3600),
        max_bytes: -1,
        duplicate_window: Duration::from_secs(120),
    };
    js.create_stream(spec.nats_config())
        .await
        .context("creating the benchmark stream")?;
    let result = measure(&a, &client, &js, &spec).await;
    let _ = js.delete_stream(&spec.name).await;
    result
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}

async fn measure(
    a: &JetstreamArgs,
    client: &async_nats::Client,
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<()> {
    let ads: Vec<u64> = (1u64..)
        .filter(|ad| partition(*ad, PARTITIONS) == 0)
        .take(10_000)
        .collect();
    let subject = spec.subject(0);
    let t = now_ms();
    let publish = |k: u64| {
        let body = message(k, a.clicks_per_message, &ads, t);
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("bench-collector:{}:0", k + 1).as_str(),
        );
        js.publish_with_headers(subject.clone(), h, body.into())
    };
    let bytes = message(0, a.clicks_per_message, &ads, t).len();

    // 1. one at a time
    let mut lat = Vec::with_capacity(a.sequential);
    for k in 0..a.sequential as u64 {
        let t0 = Instant::now();
        publish(k).await?.await.context("publish ack")?;
        lat.push(t0.elapsed());
    }
    lat.sort();

    // 2. pipelined
    let t0 = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    let first = a.sequential as u64;
    let total = first + a.pipelined as u64;
    for k in first..total {
        acks.push_back(publish(k).await?);
        if acks.len() >= a.in_flight
            && let Some(f) = acks.pop_front()
        {
            f.await.context("publish ack")?;
        }
    }
    for f in acks {
        f.await.context("publish ack")?;
    }
    let pipelined_s = t0.elapsed().as_secs_f64();
    let msgs_per_s = a.pipelined as f64 / pipelined_s;
    let last_seq = js
        .get_stream(&spec.name)
        .await?
        .info()
        .await?
        .state
        .last_sequence;

    // 3. one aggregator shard consumes partition 0 from the start
    let dir = tempdir()?;
    let mut cfg = AggregatorConfig {
        data_dir: dir.clone(),
        listen_grpc: "127.0.0.1:0".parse()?,
        listen_http: "127.0.0.1:0".parse()?,
        ingest_keys: vec![format!("bench-ingest-key-{tag:0>16}", tag = rand_u32())],
        source: SourceConfig {
            kind: SourceKind::Jetstream,
            servers: a.servers.clone(),
            stream: spec.name.clone(),
            subject_prefix: spec.subject_prefix.clone(),
            partitions: Some("0".into()),
            durable_prefix: format!("bench-{}", spec.subject_prefix),
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.query.allow_unauthenticated = true;
    let t0 = Instant::now();
    let agg = adclick_aggregator::start(cfg)
        .await
        .context("starting the aggregator shard")?;
    let position = agg
        .metrics()
        .source
        .position
        .get_or_create(&PartitionLabel { partition: 0 })
        .clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    while (position.get() as u64) < last_seq {
        if Instant::now() > deadline {
            bail!(
                "the shard applied up to {} of {last_seq} messages in 10 minutes",
                position.get()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let consume_s = t0.elapsed().as_secs_f64();
    agg.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    drop(client.clone());

    let clicks = last_seq as f64 * a.clicks_per_message as f64;
    let table = format!(
        "### adclick bench jetstream ({})\n\n\
         `adclick bench jetstream --servers {} --replicas {} --clicks-per-message {}` \
         ({} B per message)\n\n\
         | figure | value |\n|---|---|\n\
         | publish -> ack, one at a time (n={}) | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |\n\
         | pipelined publish ({} in flight, {} messages) | {:.0} messages/s = {:.0} clicks/s |\n\
         | one shard consuming one partition ({} messages from the start, incl. its start) | {:.0} clicks/s ({:.2} s) |\n",
        super::machine(),
        a.servers.join(","),
        a.replicas,
        a.clicks_per_message,
        bytes,
        lat.len(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        a.in_flight,
        a.pipelined,
        msgs_per_s,
        msgs_per_s * a.clicks_per_message as f64,
        last_seq,
        clicks / consume_s,
        consume_s,
    );
    let result = format!(
        "RESULT bench=jetstream replicas={} publish_p50_ms={:.3} publish_p99_ms={:.3} publish_clicks_per_s={:.0} shard_clicks_per_s={:.0}",
        a.replicas,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        msgs_per_s * a.clicks_per_message as f64,
        clicks / consume_s
    );
    super::emit(&table, &result, a.append.as_deref())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("adclick-bench-js-{:08x}", rand_u32()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
