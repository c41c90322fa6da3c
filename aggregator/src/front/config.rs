//! `query-front.toml`: where the front listens, the partition count, the shards and the
//! partitions each owns, the same `[query]`, `[[api_keys]]` and `[connections]` sections
//! as the aggregator's. Only the schema and its validation live here (the CLI reads the
//! file); nothing connects.

use std::net::SocketAddr;

use serde::Deserialize;

use adclick_proto::partition::MAX_PARTITIONS;

use crate::config::{ApiKey, ConfigError, ConnectionConfig, QueryConfig};
use crate::source::config::parse_partitions;

/// Everything `adclick query-front` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrontConfig {
    /// gRPC: `QueryService` (fanned out to the shards), reflection v1/v1alpha, health,
    /// gRPC-Web.
    pub listen_grpc: SocketAddr,
    /// HTTP: the JSON mirror of the queries, `/livez`, `/readyz`, `/metrics`.
    pub listen_http: SocketAddr,
    /// P, the stream's partition count (`collector forward.jetstream.partitions`): ads are
    /// routed by `partition(ad_id, P)`. Required.
    pub partitions: u32,
    /// The aggregator shards; their partition sets must cover 0..P exactly once.
    pub shards: Vec<ShardEndpoint>,
    /// A shard that has not answered within this many ms fails the query (UNAVAILABLE
    /// naming it; never a partial answer).
    pub shard_timeout_ms: u64,
    /// How often each shard's gRPC health is checked (`/readyz` of the front).
    pub health_interval_ms: u64,
    /// Query limits, CORS, rate limits: as the aggregator's, and should be the same values
    /// as the shards' (the front validates with them before fanning out; the shards
    /// check the rest and rate limit again).
    pub query: QueryConfig,
    /// API keys, as the aggregator's: the front refuses unknown keys and rate limits them
    /// itself, and forwards the caller's `authorization` to the shards, which must accept
    /// the same keys (they scope advertiser keys to their ads).
    pub api_keys: Vec<ApiKey>,
    /// Connection limits, applied to each listener (gRPC and HTTP) separately.
    pub connections: ConnectionConfig,
}

/// One aggregator shard (`[[shards]]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShardEndpoint {
    /// Named in errors, `/readyz` reasons and metric labels.
    pub name: String,
    /// Its gRPC URL, `http://host:port` (its `listen_grpc`).
    pub grpc: String,
    /// The partitions it consumes, in its own `source.partitions` syntax: `"0-7"`,
    /// `"0-3,8"`.
    pub partitions: String,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            listen_grpc: SocketAddr::from(([127, 0, 0, 1], 9290)),
            listen_http: SocketAddr::from(([127, 0, 0, 1], 9291)),
            partitions: 0,
            shards: Vec::new(),
            shard_timeout_ms: 5_000,
            health_interval_ms: 1_000,
            query: QueryConfig::default(),
            api_keys: Vec::new(),
            connections: ConnectionConfig::default(),
        }
    }
}

impl FrontConfig {
    /// Checks every value; `Ok` is the owner shard of each partition (index into `shards`).
    pub fn validate(&self) -> Result<Vec<usize>, ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return err(format!(
                "partitions must be the stream's partition count, 1 to {MAX_PARTITIONS} (got {})",
                self.partitions
            ));
        }
        if self.shards.is_empty() {
            return err(
                "shards is empty: add a [[shards]] entry (name, grpc = \"http://host:port\", \
                 partitions = \"0-7\") per aggregator shard"
                    .into(),
            );
        }
        if self.shard_timeout_ms == 0 || self.health_interval_ms == 0 {
            return err("shard_timeout_ms and health_interval_ms must be at least 1".into());
        }
        crate::config::check_query_access(&self.query, &self.api_keys)?;
        self.connections.validate()?;
        let p = self.partitions as usize;
        let mut owner: Vec<Option<usize>> = vec![None; p];
        for (i, s) in self.shards.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 64 || s.name.chars().any(char::is_control) {
                return err(format!(
                    "shards[{i}].name must be 1 to 64 printable characters"
                ));
            }
            if let Some(j) = self.shards[..i].iter().position(|o| o.name == s.name) {
                return err(format!(
                    "shards[{i}] and shards[{j}] are both named {:?}: names must be unique",
                    s.name
                ));
            }
            let uri_ok = s.grpc.parse::<tonic::transport::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !uri_ok {
                return err(format!(
                    "shard {:?}: grpc = {:?} is not a URL like http://127.0.0.1:9190",
                    s.name, s.grpc
                ));
            }
            let owned = parse_partitions(&s.partitions)
                .map_err(|m| ConfigError(format!("shard {:?}: {m}", s.name)))?;
            if owned.is_empty() {
                return err(format!("shard {:?}: partitions names no partition", s.name));
            }
            for x in owned {
                let Some(slot) = owner.get_mut(x as usize) else {
                    return err(format!(
                        "shard {:?} owns partition {x}, but partitions = {} (0-{})",
                        s.name,
                        self.partitions,
                        self.partitions - 1
                    ));
                };
                if let Some(j) = *slot {
                    return err(format!(
                        "partition {x} is owned by both shard {:?} and shard {:?}: every \
                         partition must have exactly one owner",
                        self.shards[j].name, s.name
                    ));
                }
                *slot = Some(i);
            }
        }
        let missing: Vec<String> = owner
            .iter()
            .enumerate()
            .filter(|(_, o)| o.is_none())
            .map(|(x, _)| x.to_string())
            .collect();
        if !missing.is_empty() {
            return err(format!(
                "no shard owns partition(s) {} of 0-{}: the shards' partitions must cover \
                 every partition exactly once (ads of a missing partition could not be answered)",
                missing.join(","),
                self.partitions - 1
            ));
        }
        Ok(owner.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(shards: &[(&str, &str)]) -> FrontConfig {
        FrontConfig {
            partitions: 4,
            shards: shards
                .iter()
                .map(|(n, p)| ShardEndpoint {
                    name: (*n).into(),
                    grpc: "http://127.0.0.1:9190".into(),
                    partitions: (*p).into(),
                })
                .collect(),
            query: QueryConfig {
                allow_unauthenticated: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn shards_must_cover_every_partition_once() {
        assert_eq!(
            cfg(&[("a", "0-1"), ("b", "2-3")]).validate(),
            Ok(vec![0, 0, 1, 1])
        );
        assert_eq!(
            cfg(&[("a", "0,2"), ("b", "1,3")]).validate(),
            Ok(vec![0, 1, 0, 1])
        );
        let e = cfg(&[("a", "0-1"), ("b", "3")]).validate().unwrap_err();
        assert!(e.0.contains("partition(s) 2 of 0-3"), "{e}");
        let e = cfg(&[("a", "0-2"), ("b", "2-3")]).validate().unwrap_err();
        assert!(
            e.0.contains("partition 2 is owned by both shard \"a\" and shard \"b\""),
            "{e}"
        );
        let e = cfg(&[("a", "0-4")]).validate().unwrap_err();
        assert!(e.0.contains("owns partition 4"), "{e}");
        let e = cfg(&[("a", "0-1"), ("a", "2-3")]).validate().unwrap_err();
        assert!(e.0.contains("unique"), "{e}");
        let mut c = cfg(&[("a", "0-3")]);
        c.shards[0].grpc = "127.0.0.1:9190".into();
        assert!(c.validate().unwrap_err().0.contains("not a URL"));
        c.partitions = 0;
        assert!(c.validate().unwrap_err().0.contains("partition count"));
    }

    #[test]
    fn keys_are_required_as_for_the_aggregator() {
        let mut c = cfg(&[("a", "0-3")]);
        c.query.allow_unauthenticated = false;
        assert!(c.validate().unwrap_err().0.contains("api_keys is empty"));
    }
}
