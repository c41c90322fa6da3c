//! Reading counts and progress back from a sharded (JetStream) deployment: per-ad totals
//! from whichever query endpoints own the ads' partitions, Prometheus gauges scraped from a
//! server's `/metrics`, and the last stream sequence of each partition's subject.
//!
//! It fetches; the tests compare.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use adclick_proto::partition::partition;
use adclick_proto::v1::{BatchGetAdClicksRequest, Granularity};

use crate::common::authed;
use crate::stack::{ADMIN, http_client, query_client};

/// Query endpoints and the partitions each answers for. Shards: one entry per shard with
/// the partitions it owns; a query front: one entry owning every partition.
#[derive(Debug, Clone)]
pub struct QueryTargets {
    /// The stream's partition count P.
    pub partitions: u32,
    /// `(gRPC address, partitions it answers for)`.
    pub targets: Vec<(SocketAddr, Vec<u32>)>,
}

impl QueryTargets {
    /// One endpoint answering for all `partitions` (a query front, or a single node).
    pub fn single(grpc: SocketAddr, partitions: u32) -> QueryTargets {
        QueryTargets {
            partitions,
            targets: vec![(grpc, (0..partitions).collect())],
        }
    }

    /// The endpoint answering for `ad` (None if no target owns its partition).
    pub fn owner(&self, ad: u64) -> Option<SocketAddr> {
        let p = partition(ad, self.partitions);
        self.targets
            .iter()
            .find(|(_, owned)| owned.contains(&p))
            .map(|(a, _)| *a)
    }
}

/// Total clicks of each of `ads` over `[from, to)` (admin key, minute buckets): one
/// `BatchGetAdClicks` per endpoint for the ads whose partition it answers for. Ads with no
/// clicks are left out, so the map compares directly with a ledger's per-ad counts.
/// `Err` when an endpoint cannot be reached or refuses, or an ad has no owner.
pub async fn per_ad_totals(
    targets: &QueryTargets,
    ads: &[u64],
    (from, to): (i64, i64),
) -> Result<BTreeMap<u64, u64>, String> {
    let mut by_target: BTreeMap<SocketAddr, Vec<u64>> = BTreeMap::new();
    for ad in ads {
        let owner = targets
            .owner(*ad)
            .ok_or_else(|| format!("no query target owns ad {ad}"))?;
        by_target.entry(owner).or_default().push(*ad);
    }
    let mut out = BTreeMap::new();
    for (addr, ads) in by_target {
        let mut q = query_client(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let r = q
            .batch_get_ad_clicks(authed(
                BatchGetAdClicksRequest {
                    ad_ids: ads.clone(),
                    from_ms: from,
                    to_ms: to,
                    granularity: Granularity::Minute as i32,
                    filter: None,
                    fill_empty: Some(false),
                    ..Default::default()
                },
                ADMIN,
            ))
            .await
            .map_err(|e| format!("{addr}: BatchGetAdClicks: {e}"))?
            .into_inner();
        if r.ads.len() != ads.len() {
            return Err(format!(
                "{addr}: {} answers for {} ads",
                r.ads.len(),
                ads.len()
            ));
        }
        for (ad, a) in ads.iter().zip(r.ads) {
            if a.ad_id != *ad {
                return Err(format!(
                    "{addr}: answer for ad {} in ad {ad}'s place",
                    a.ad_id
                ));
            }
            if a.total_clicks > 0 {
                out.insert(*ad, a.total_clicks);
            }
        }
    }
    Ok(out)
}

/// The `/metrics` text of the HTTP server at `addr`.
pub async fn metrics_text(addr: SocketAddr) -> Result<String, String> {
    let r = http_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("/metrics answered {}", r.status()));
    }
    r.text().await.map_err(|e| e.to_string())
}

/// The value of the sample `series` (name with its labels exactly as rendered, e.g.
/// `adclick_aggregator_source_position{partition="0"}`) in a Prometheus text exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The stream sequence of the last message on `subject` in `stream` (0 when it has none).
pub async fn last_sequence(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
) -> Result<u64, String> {
    let js = async_nats::jetstream::new(client.clone());
    let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    match s.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(m.sequence),
        Err(e)
            if matches!(
                e.kind(),
                async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound
            ) =>
        {
            Ok(0)
        }
        Err(e) => Err(e.to_string()),
    }
}
