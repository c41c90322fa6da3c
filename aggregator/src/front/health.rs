//! The front's readiness: each shard's gRPC health (`grpc.health.v1`, service `""`),
//! checked every `health_interval_ms`. The front is ready while every shard says
//! SERVING; otherwise `/readyz` is 503 and its reasons name each shard and why
//! (unreachable, NOT_SERVING). A shard is NOT_SERVING when it cannot take writes, e.g.
//! its JetStream source cannot consume: it would answer from a frozen state. Readiness
//! never blocks a query: the query itself fails (UNAVAILABLE) if its shards do not answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Pb;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

use crate::front::metrics::ShardLabel;
use crate::front::shards::{Shard, join_all};
use crate::metrics::Metrics;

/// Why shard `s` is not ready, or `None` when it is SERVING.
async fn check(s: &Shard, timeout: Duration) -> Option<String> {
    let mut c = HealthClient::new(s.channel.clone());
    let call = c.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(r)) if r.get_ref().status == Pb::Serving as i32 => None,
        Ok(Ok(r)) => Some(format!(
            "shard {} ({}): health {}",
            s.name,
            s.url,
            Pb::try_from(r.get_ref().status).map_or("UNKNOWN", |x| x.as_str_name())
        )),
        Ok(Err(e)) => Some(format!(
            "shard {} ({}): unreachable: {}",
            s.name,
            s.url,
            e.message()
        )),
        Err(_) => Some(format!(
            "shard {} ({}): no health answer within {} ms",
            s.name,
            s.url,
            timeout.as_millis()
        )),
    }
}

/// The initial reasons: every shard unchecked.
pub fn unchecked(shards: &[Shard]) -> Vec<String> {
    shards
        .iter()
        .map(|s| format!("shard {} ({}): not checked yet", s.name, s.url))
        .collect()
}

/// What [`watch_shards`] checks and where it reports.
#[derive(Debug)]
pub struct Watch {
    /// The shards.
    pub shards: Vec<Shard>,
    /// Check interval (`health_interval_ms`).
    pub every: Duration,
    /// How long one check may take (`shard_timeout_ms`).
    pub timeout: Duration,
    /// The reasons `/readyz` reports (empty: ready).
    pub reasons: watch::Sender<Vec<String>>,
    /// The front's own gRPC health.
    pub health: HealthReporter,
    /// The name its QueryService is reported under.
    pub query_service: &'static str,
    /// `front_shard_up` and `ready`.
    pub metrics: Arc<Metrics>,
}

/// Checks every shard each `every` until `stop` flips, publishing the reasons to
/// `reasons`, the front's own gRPC health and the `front_shard_up` / `ready` gauges.
pub async fn watch_shards(w: Watch, mut stop: watch::Receiver<bool>) {
    let Watch {
        shards,
        every,
        timeout,
        reasons,
        health,
        query_service,
        metrics,
    } = w;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let whys = join_all(shards.iter().map(|s| check(s, timeout))).await;
        let mut now = Vec::new();
        for (s, why) in shards.iter().zip(whys) {
            metrics
                .front
                .shard_up
                .get_or_create(&ShardLabel {
                    shard: s.name.clone(),
                })
                .set(i64::from(why.is_none()));
            now.extend(why);
        }
        let ready = now.is_empty();
        metrics.ready.set(i64::from(ready));
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health.set_service_status(query_service, status).await;
        reasons.send_if_modified(|r| {
            let changed = *r != now;
            if changed {
                tracing::info!(reasons = ?now, "query front readiness changed");
                *r = now;
            }
            changed
        });
    }
}
