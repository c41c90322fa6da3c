//! The front's [`QueryBackend`]: routes each query to the aggregator shards that own its
//! ads, merges their answers, and fails whole (UNAVAILABLE naming the shard) when a shard
//! it needs does not answer. Holds tonic clients and the partition -> shard map; no
//! counts, no state of its own.
//!
//! Routing: an ad's partition is `partition(ad_id, P)` and [`FrontConfig::validate`]
//! checked that each partition has exactly one owner shard.
//! - `GetAdClicks`, `Breakdown`: the owner of the ad, its answer unchanged.
//! - `BatchGetAdClicks`: the ids grouped by owner, one call per owner (concurrently), the
//!   answers put back in request order; `watermark_ms` is the minimum of the watermarks
//!   of the shards consulted (each ad keeps its shard's own).
//! - `TopAds`: every shard gets the same request; the lists are merged by clicks desc,
//!   then ad id asc (the order of `query::top_ads` and `state::topn`), and cut to `n`.
//!
//! **Why the TopAds merge is exact.** A click of ad A is published on partition
//! `partition(A, P)` only (the collector's JetStream sink routes by the ad, and the hot-key
//! salt is no input of `partition`, see `proto/src/partition.rs`), and only the shard
//! owning that partition counts it (a shard removes clicks of ads it does not own). The
//! hot-key salt spreads a hot ad over the worker threads *inside* one aggregator process,
//! whose `TopAds` already sums them; it never spreads an ad across partitions or shards.
//! So each ad's count, under any filter and caller, lives whole in one shard's answer.
//! Rank everything by the total order (clicks desc, ad id asc). If ad A is among the
//! global first `n`, fewer than `n` ads precede it globally, so fewer than `n` ads of its
//! own shard precede it there: A is in its shard's first `n`. The union of the shards'
//! first-`n` lists therefore holds the global first `n`, with their exact counts, and
//! sorting the union by the same order and cutting to `n` gives exactly the answer one
//! aggregator holding every partition would give.
//!
//! Auth: [`crate::api::Api`] has authorised the key and charged its rate limit; the
//! caller's `authorization` is forwarded as it is, so each shard scopes an advertiser key
//! to its ads for every rpc (the front never widens what a key sees). Validation: the
//! front checks every field that does not depend on a shard's state (all but the
//! retention, which is measured from the shard's watermark) with the shared `validate`
//! code before calling anyone; the shards check the rest, and their INVALID_ARGUMENT
//! (with its `BadRequest` details) is passed through unchanged, as is any status a shard
//! answers itself (UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...). A shard that does not answer
//! within `shard_timeout_ms`, or whose call fails with UNAVAILABLE, DEADLINE_EXCEEDED or a
//! transport error (UNKNOWN, CANCELLED: statuses shards never send themselves), fails the
//! query with UNAVAILABLE naming it: never a silent partial answer.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use adclick_proto::partition::partition;
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{
    AdCount, BatchGetAdClicksRequest, BatchGetAdClicksResponse, BreakdownRequest,
    BreakdownResponse, GetAdClicksRequest, GetAdClicksResponse, GetTotalsRequest,
    GetTotalsResponse, TopAdsRequest, TopAdsResponse,
};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::api::{BackendError, Ctx, QueryBackend};
use crate::front::config::{FrontConfig, ShardEndpoint};
use crate::front::metrics::{ShardLabel, ShardRpcLabel};
use crate::grpc::{MAX_ANSWER_BYTES, MAX_MESSAGE_BYTES};
use crate::metrics::Metrics;
use crate::query::QueryError;
use crate::validate::{self, Limits, Violations};

/// A watermark no shard reports: "none consulted" (min over nothing).
const NO_WATERMARK: i64 = i64::MAX;

/// One shard: its name, URL and client.
#[derive(Debug, Clone)]
pub struct Shard {
    /// `[[shards]] name`.
    pub name: String,
    /// `[[shards]] grpc`.
    pub url: String,
    /// A lazily connected channel (a shard down at start is only an error when asked).
    pub channel: Channel,
}

/// The front's backend (see the module doc).
#[derive(Debug)]
pub struct Shards {
    shards: Vec<Shard>,
    /// Partition -> index into `shards`.
    owner: Vec<usize>,
    partitions: u32,
    timeout: Duration,
    /// The front's `[query]` limits (retention is never consulted: see [`Shards::limits`]).
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Why the front is not ready (shards whose health is not SERVING), from `health.rs`.
    not_ready: watch::Receiver<Vec<String>>,
}

/// What checking a field list left: nothing, or the violations.
fn refuse(bad: Violations) -> Result<(), BackendError> {
    if bad.is_empty() {
        Ok(())
    } else {
        Err(QueryError::Invalid(bad).into())
    }
}

/// A shard's status as the front answers it: unchanged but for the transport metadata
/// (code, message and details, so `BadRequest` and `RetryInfo` reach the caller).
fn pass_through(s: &Status) -> Status {
    Status::with_details(s.code(), s.message(), s.details().to_vec().into())
}

impl Shards {
    /// The backend of `cfg` (validated: `owner` is what [`FrontConfig::validate`] returned).
    pub fn new(
        cfg: &FrontConfig,
        owner: Vec<usize>,
        metrics: Arc<Metrics>,
        not_ready: watch::Receiver<Vec<String>>,
    ) -> Result<Self, String> {
        let timeout = Duration::from_millis(cfg.shard_timeout_ms);
        let shards = cfg
            .shards
            .iter()
            .map(|s| shard(s, timeout))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Shards {
            shards,
            owner,
            partitions: cfg.partitions,
            timeout,
            limits: Self::limits(cfg),
            metrics,
            not_ready,
        })
    }

    /// The limits the front validates with: its `[query]`; the retention bounds are
    /// never applied (requests are checked at watermark `i64::MIN`, where
    /// `Limits::oldest_kept` is `None`): they depend on each shard's watermark and
    /// `[windows]`, so the owner shard checks them.
    fn limits(cfg: &FrontConfig) -> Limits {
        Limits::new(&cfg.query, &crate::config::WindowConfig::default())
    }

    /// The shards, in config order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The owner shard of `ad_id`.
    pub fn owner_of(&self, ad_id: u64) -> usize {
        let p = partition(ad_id, self.partitions) as usize;
        // `owner` has P entries (validated) and `partition` is below P.
        self.owner.get(p).copied().unwrap_or(0)
    }

    /// Calls shard `i` with the caller's `authorization`, within the timeout.
    async fn call<Q, R, F, Fut>(
        &self,
        i: usize,
        rpc: &'static str,
        ctx: &Ctx,
        req: Q,
        f: F,
    ) -> Result<R, BackendError>
    where
        F: FnOnce(QueryServiceClient<Channel>, Request<Q>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let shard = &self.shards[i];
        let mut r = Request::new(req);
        if let Some(a) = ctx.authorization.as_deref()
            && let Ok(v) = a.parse()
        {
            r.metadata_mut().insert("authorization", v);
        }
        r.set_timeout(self.timeout);
        let client = QueryServiceClient::new(shard.channel.clone())
            .max_decoding_message_size(MAX_ANSWER_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.metrics
            .front
            .shard_calls
            .get_or_create(&ShardLabel {
                shard: shard.name.clone(),
            })
            .inc();
        match tokio::time::timeout(self.timeout, f(client, r)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(s))
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
                ) =>
            {
                Err(self.unavailable(i, rpc, s.message()))
            }
            Ok(Err(s)) => Err(BackendError::Status(pass_through(&s))),
            Err(_) => Err(self.unavailable(
                i,
                rpc,
                &format!(
                    "no answer within shard_timeout_ms ({} ms)",
                    self.timeout.as_millis()
                ),
            )),
        }
    }

    fn unavailable(&self, i: usize, rpc: &'static str, why: &str) -> BackendError {
        let s = &self.shards[i];
        self.metrics
            .front
            .shard_unavailable
            .get_or_create(&ShardRpcLabel {
                shard: s.name.clone(),
                rpc,
            })
            .inc();
        tracing::warn!(shard = %s.name, url = %s.url, rpc, why, "shard unavailable");
        BackendError::Status(Status::unavailable(format!(
            "shard {} ({}) is unavailable: {why}",
            s.name, s.url
        )))
    }

    /// Runs one call per `(shard, request)` concurrently; the answers in the same order,
    /// or the first refusal a shard answered itself, else UNAVAILABLE naming every shard
    /// that did not answer.
    async fn fan_out<Q, R, F, Fut>(
        &self,
        rpc: &'static str,
        ctx: &Ctx,
        calls: Vec<(usize, Q)>,
        f: F,
    ) -> Result<Vec<R>, BackendError>
    where
        F: Fn(QueryServiceClient<Channel>, Request<Q>) -> Fut + Copy,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let all = calls.into_iter().map(|(i, q)| self.call(i, rpc, ctx, q, f));
        let results = join_all(all).await;
        let mut out = Vec::with_capacity(results.len());
        let mut down: Vec<String> = Vec::new();
        let mut refused = None;
        for r in results {
            match r {
                Ok(r) => out.push(r),
                Err(BackendError::Status(s)) if s.code() == Code::Unavailable => {
                    down.push(s.message().to_string());
                }
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        if let Some(e) = refused {
            return Err(e);
        }
        match down.len() {
            0 => Ok(out),
            1 => Err(BackendError::Status(Status::unavailable(down.remove(0)))),
            _ => Err(BackendError::Status(Status::unavailable(down.join("; ")))),
        }
    }
}

/// Polls every future to completion on this task (the calls share the task's budget; a
/// spawned task per call would need `'static` borrows of the backend).
pub(crate) async fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

fn shard(s: &ShardEndpoint, timeout: Duration) -> Result<Shard, String> {
    let endpoint = Endpoint::from_shared(s.grpc.clone())
        .map_err(|e| format!("shard {:?}: grpc = {:?}: {e}", s.name, s.grpc))?
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(Shard {
        name: s.name.clone(),
        url: s.grpc.clone(),
        channel: endpoint.connect_lazy(),
    })
}

#[tonic::async_trait]
impl QueryBackend for Shards {
    async fn ad_clicks(
        &self,
        ctx: &Ctx,
        req: GetAdClicksRequest,
    ) -> Result<GetAdClicksResponse, BackendError> {
        refuse(
            validate::ad_clicks(&req, &self.limits, i64::MIN)
                .err()
                .unwrap_or_default(),
        )?;
        let i = self.owner_of(req.ad_id);
        self.call(i, "GetAdClicks", ctx, req, |mut c, r| async move {
            c.get_ad_clicks(r).await
        })
        .await
    }

    async fn batch_ad_clicks(
        &self,
        ctx: &Ctx,
        req: BatchGetAdClicksRequest,
    ) -> Result<BatchGetAdClicksResponse, BackendError> {
        // Every field, as the aggregator checks them (the shared ones with a stand-in id).
        let mut bad = validate::ad_ids(&req.ad_ids);
        let shared = GetAdClicksRequest {
            ad_id: 1,
            from_ms: req.from_ms,
            to_ms: req.to_ms,
            granularity: req.granularity,
            filter: req.filter.clone(),
            fill_empty: req.fill_empty,
            traffic: req.traffic,
        };
        if let Err(v) = validate::ad_clicks(&shared, &self.limits, i64::MIN) {
            bad.extend(v);
        }
        refuse(bad)?;
        // Owner -> its ids in request order.
        let mut groups: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for &ad in &req.ad_ids {
            groups.entry(self.owner_of(ad)).or_default().push(ad);
        }
        let calls: Vec<(usize, BatchGetAdClicksRequest)> = groups
            .iter()
            .map(|(&i, ids)| {
                (
                    i,
                    BatchGetAdClicksRequest {
                        ad_ids: ids.clone(),
                        ..req.clone()
                    },
                )
            })
            .collect();
        let answers = self
            .fan_out("BatchGetAdClicks", ctx, calls, |mut c, r| async move {
                c.batch_get_ad_clicks(r).await
            })
            .await?;
        let mut watermark_ms = NO_WATERMARK;
        let mut by_ad: BTreeMap<u64, GetAdClicksResponse> = BTreeMap::new();
        for (ids, answer) in groups.values().zip(answers) {
            watermark_ms = watermark_ms.min(answer.watermark_ms);
            if answer.ads.len() != ids.len() {
                return Err(BackendError::Status(Status::internal(format!(
                    "a shard answered {} ads for {} asked",
                    answer.ads.len(),
                    ids.len()
                ))));
            }
            // A shard answers its ids in the order asked.
            by_ad.extend(ids.iter().copied().zip(answer.ads));
        }
        let ads = req
            .ad_ids
            .iter()
            .filter_map(|ad| by_ad.remove(ad))
            .collect();
        Ok(BatchGetAdClicksResponse { ads, watermark_ms })
    }

    async fn breakdown(
        &self,
        ctx: &Ctx,
        req: BreakdownRequest,
    ) -> Result<BreakdownResponse, BackendError> {
        // Its own fields, then those it shares with GetAdClicks (as `query::breakdown`).
        let shared = GetAdClicksRequest {
            ad_id: req.ad_id,
            from_ms: req.from_ms,
            to_ms: req.to_ms,
            granularity: req.granularity,
            filter: req.filter.clone(),
            fill_empty: None,
            traffic: req.traffic,
        };
        let mut bad = validate::breakdown(&req);
        if let Err(v) = validate::ad_clicks(&shared, &self.limits, i64::MIN) {
            bad.extend(v);
        }
        refuse(bad)?;
        let i = self.owner_of(req.ad_id);
        self.call(i, "Breakdown", ctx, req, |mut c, r| async move {
            c.breakdown(r).await
        })
        .await
    }

    async fn top_ads(&self, ctx: &Ctx, req: TopAdsRequest) -> Result<TopAdsResponse, BackendError> {
        refuse(
            validate::top_ads(&req, &self.limits, i64::MIN, ctx.now_ms)
                .err()
                .unwrap_or_default(),
        )?;
        let n = req.n as usize;
        // `last_minutes` is resolved by each shard from its own clock: a minute boundary
        // passed between two shards' answers gives two ranges; asked again, they agree
        // (shards whose clocks disagree by more keep disagreeing: an error, not a mix).
        let ask = || {
            let calls = (0..self.shards.len()).map(|i| (i, req.clone())).collect();
            self.fan_out("TopAds", ctx, calls, |mut c, r| async move {
                c.top_ads(r).await
            })
        };
        let same_range =
            |answers: &[TopAdsResponse]| answers.windows(2).all(|w| w[0].range == w[1].range);
        let mut answers = ask().await?;
        if !same_range(&answers) {
            answers = ask().await?;
            if !same_range(&answers) {
                return Err(BackendError::Status(Status::unavailable(
                    "the shards answered TopAds for different ranges twice: are their clocks \
                     in sync?",
                )));
            }
        }
        let range = answers.first().and_then(|a| a.range);
        let mut watermark_ms = NO_WATERMARK;
        let mut ads: Vec<AdCount> = Vec::new();
        for a in answers {
            watermark_ms = watermark_ms.min(a.watermark_ms);
            ads.extend(a.ads);
        }
        // The aggregator's order (`query::top_ads`): clicks desc, then ad id asc.
        ads.sort_unstable_by(|a, b| b.clicks.cmp(&a.clicks).then(a.ad_id.cmp(&b.ad_id)));
        ads.truncate(n);
        Ok(TopAdsResponse {
            ads,
            range,
            watermark_ms,
        })
    }

    async fn totals(
        &self,
        ctx: &Ctx,
        req: GetTotalsRequest,
    ) -> Result<GetTotalsResponse, BackendError> {
        refuse(
            validate::totals(&req, &self.limits, i64::MIN)
                .err()
                .unwrap_or_default(),
        )?;
        // A campaign's or advertiser's ads are spread over the partitions: every shard
        // answers for its own, with sketches so that users who clicked ads on two shards
        // are counted once.
        let ask = GetTotalsRequest {
            include_sketches: true,
            ..req.clone()
        };
        let calls = (0..self.shards.len()).map(|i| (i, ask.clone())).collect();
        let answers = self
            .fan_out("GetTotals", ctx, calls, |mut c, r| async move {
                c.get_totals(r).await
            })
            .await?;
        merge_totals(&req, answers)
    }

    fn not_ready(&self) -> Vec<String> {
        self.not_ready.borrow().clone()
    }
}

/// The shards' `GetTotals` answers (with sketches) as one: clicks and ads summed (each ad
/// lives on one shard), users as the union of the sketches, buckets in time order.
fn merge_totals(
    req: &GetTotalsRequest,
    answers: Vec<GetTotalsResponse>,
) -> Result<GetTotalsResponse, BackendError> {
    use crate::sketch::hll::Hll;
    let bad_sketch = |e: crate::sketch::hll::HllError| {
        BackendError::Status(Status::internal(format!(
            "a shard answered GetTotals with an unreadable sketch: {e}"
        )))
    };
    let sketch = |b: &[u8]| -> Result<Hll, BackendError> {
        if b.is_empty() {
            Ok(Hll::new())
        } else {
            Hll::from_bytes(b).map_err(bad_sketch)
        }
    };
    let mut out = GetTotalsResponse {
        scope: req.scope,
        id: req.id,
        watermark_ms: NO_WATERMARK,
        ..Default::default()
    };
    let mut buckets: BTreeMap<i64, (u64, Hll)> = BTreeMap::new();
    let mut total = Hll::new();
    // Invalid clicks by reason: summed (each ad lives on one shard).
    let mut reasons: BTreeMap<i32, u64> = BTreeMap::new();
    for a in answers {
        for r in &a.invalid_by_reason {
            *reasons.entry(r.reason).or_default() += r.clicks;
        }
        out.granularity = a.granularity;
        out.watermark_ms = out.watermark_ms.min(a.watermark_ms);
        out.ads = out.ads.saturating_add(a.ads);
        out.total_clicks += a.total_clicks;
        total.merge(&sketch(&a.total_users_sketch)?);
        for b in a.buckets {
            let slot = buckets.entry(b.start_ms).or_insert_with(|| (0, Hll::new()));
            slot.0 += b.clicks;
            slot.1.merge(&sketch(&b.users_sketch)?);
        }
    }
    out.total_unique_users = total.estimate();
    out.invalid_by_reason = reasons
        .into_iter()
        .map(|(reason, clicks)| adclick_proto::v1::ReasonCount { reason, clicks })
        .collect();
    if req.include_sketches {
        out.total_users_sketch = total.to_bytes();
    }
    out.buckets = buckets
        .into_iter()
        .map(
            |(start_ms, (clicks, users))| adclick_proto::v1::TotalsBucket {
                start_ms,
                clicks,
                unique_users: if clicks > 0 { users.estimate() } else { 0 },
                users_sketch: if req.include_sketches && clicks > 0 {
                    users.to_bytes()
                } else {
                    Vec::new()
                },
            },
        )
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use adclick_proto::v1::ReasonCount;

    /// The front sums the shards' invalid clicks per reason (each ad lives on one shard).
    #[test]
    fn totals_merge_sums_invalid_by_reason() {
        let shard = |pairs: &[(i32, u64)]| GetTotalsResponse {
            invalid_by_reason: pairs
                .iter()
                .map(|&(reason, clicks)| ReasonCount { reason, clicks })
                .collect(),
            ..Default::default()
        };
        let merged = merge_totals(
            &GetTotalsRequest::default(),
            vec![
                shard(&[(1, 3), (6, 2)]),
                shard(&[(6, 5), (7, 1)]),
                shard(&[]),
            ],
        )
        .unwrap();
        let got: Vec<(i32, u64)> = merged
            .invalid_by_reason
            .iter()
            .map(|r| (r.reason, r.clicks))
            .collect();
        assert_eq!(got, vec![(1, 3), (6, 7), (7, 1)]);
    }
}
