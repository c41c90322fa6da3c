//! `adclick jetstream init-global`: the stream of a global view over several regions.
//!
//! Each region runs its own NATS cluster, collectors and aggregator shards, with its own
//! clicks stream (`CLICKS`, subjects `clicks.<partition>`). The global stream lives on a
//! hub NATS cluster that the regions join as leaf nodes, each region with its own
//! JetStream domain; it has no subjects of its own and **sources** every region's stream
//! through that region's JetStream API (`$JS.<domain>.API`). NATS copies the messages,
//! subjects and headers (with their `Nats-Msg-Id`) across, resumes after outages and
//! reports each source's lag: replication is NATS's, not ours. Aggregators with
//! `[source] stream = "<global stream>"` then count every region's clicks exactly once
//! (admission and impression-id dedup, as for a regional stream).
//!
//! This command checks that every source stream exists and has the same partition count
//! P (an ad must land in the same partition in every region, so one global shard owns it),
//! then creates the global stream with P in its metadata, or verifies an existing one and
//! adds the sources it lacks (adding a region is a normal operation; a source is never
//! removed and P never changes).

use std::collections::HashMap;
use std::time::Duration;

use adclick_proto::partition::STREAM_PARTITIONS_KEY;
use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::jetstream::{self, stream};

/// One region's stream: `<domain>:<stream>` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSource {
    /// The region's JetStream domain (its servers' `jetstream { domain: ... }`).
    pub domain: String,
    /// Its clicks stream.
    pub stream: String,
}

impl RegionSource {
    /// Parses `<domain>:<stream>` (`eu-west:CLICKS`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (domain, stream) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected <domain>:<stream>, e.g. eu-west:CLICKS"))?;
        let ok = |v: &str| {
            !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !ok(domain) || !ok(stream) {
            return Err(format!(
                "{s:?}: domain and stream are names of letters, digits, '-' and '_'"
            ));
        }
        Ok(RegionSource {
            domain: domain.into(),
            stream: stream.into(),
        })
    }

    fn api_prefix(&self) -> String {
        format!("$JS.{}.API", self.domain)
    }

    fn nats_source(&self) -> stream::Source {
        stream::Source {
            name: self.stream.clone(),
            external: Some(stream::External {
                api_prefix: self.api_prefix(),
                delivery_prefix: None,
            }),
            ..Default::default()
        }
    }

    fn same_as(&self, s: &stream::Source) -> bool {
        s.name == self.stream
            && s.external.as_ref().map(|e| e.api_prefix.as_str()) == Some(&self.api_prefix())
    }
}

impl std::fmt::Display for RegionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.domain, self.stream)
    }
}

/// The global stream wanted.
#[derive(Debug, Clone)]
pub struct GlobalSpec {
    /// Its name, on the hub.
    pub name: String,
    /// The regions' streams it sources.
    pub sources: Vec<RegionSource>,
    /// Replicas on the hub cluster.
    pub replicas: usize,
    /// Retention by age (global shards rebuild within it).
    pub max_age: Duration,
    /// Retention by size (-1: none).
    pub max_bytes: i64,
}

/// What [`ensure_global`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalEnsured {
    /// Created with every source.
    Created {
        /// The partition count found in the sources.
        partitions: u32,
    },
    /// It existed; `added` sources were added to it.
    Found {
        /// The partition count.
        partitions: u32,
        /// Sources added now.
        added: Vec<String>,
    },
}

fn partitions_of(cfg: &stream::Config) -> Option<u32> {
    cfg.metadata
        .get(STREAM_PARTITIONS_KEY)
        .and_then(|v| v.parse().ok())
        .filter(|p| *p >= 1)
}

/// Reads P from every source (through its domain's API) and checks they agree.
async fn source_partitions(
    client: &async_nats::Client,
    spec: &GlobalSpec,
    timeout: Duration,
) -> Result<u32> {
    let mut found: Vec<(String, u32)> = Vec::new();
    for src in &spec.sources {
        let mut js = jetstream::with_domain(client.clone(), &src.domain);
        js.set_timeout(timeout);
        let s = js.get_stream(&src.stream).await.with_context(|| {
            format!(
                "source {src}: stream {} through {} (is the region a leaf node of this hub, with jetstream domain {:?}?)",
                src.stream,
                src.api_prefix(),
                src.domain
            )
        })?;
        let p = partitions_of(&s.cached_info().config).ok_or_else(|| {
            anyhow!(
                "source {src}: the stream has no valid {STREAM_PARTITIONS_KEY} metadata: not an adclick clicks stream"
            )
        })?;
        found.push((src.to_string(), p));
    }
    let p = found
        .first()
        .map(|f| f.1)
        .ok_or_else(|| anyhow!("no --source given"))?;
    if found.iter().any(|f| f.1 != p) {
        bail!(
            "the sources disagree on the partition count ({found:?}): an ad must be in the same partition in every region, so one global shard owns it"
        );
    }
    Ok(p)
}

fn global_config(spec: &GlobalSpec, partitions: u32) -> stream::Config {
    stream::Config {
        name: spec.name.clone(),
        description: Some(format!(
            "adclick global clicks: sources {}; partition = xxh64(ad_id le, 0) mod {partitions}",
            spec.sources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        subjects: vec![],
        sources: Some(spec.sources.iter().map(RegionSource::nats_source).collect()),
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        num_replicas: spec.replicas,
        max_age: spec.max_age,
        max_bytes: spec.max_bytes,
        max_messages: -1,
        max_messages_per_subject: -1,
        metadata: HashMap::from([(STREAM_PARTITIONS_KEY.to_string(), partitions.to_string())]),
        ..Default::default()
    }
}

/// Creates the global stream of `spec` on the hub `client` talks to, or verifies it and
/// adds missing sources. See the module doc.
pub async fn ensure_global(
    client: &async_nats::Client,
    spec: &GlobalSpec,
    timeout: Duration,
) -> Result<GlobalEnsured> {
    let partitions = source_partitions(client, spec, timeout).await?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(timeout);
    match js.get_stream(&spec.name).await {
        Ok(s) => {
            let mut cfg = s.cached_info().config.clone();
            match partitions_of(&cfg) {
                Some(p) if p == partitions => {}
                other => bail!(
                    "stream {} has partition count {other:?}, its sources have {partitions}: use another --stream name",
                    spec.name
                ),
            }
            if !cfg.subjects.is_empty() {
                bail!(
                    "stream {} captures subjects {:?}: a global stream only sources regions; use another --stream name",
                    spec.name,
                    cfg.subjects
                );
            }
            let have = cfg.sources.clone().unwrap_or_default();
            let missing: Vec<&RegionSource> = spec
                .sources
                .iter()
                .filter(|r| !have.iter().any(|s| r.same_as(s)))
                .collect();
            if missing.is_empty() {
                return Ok(GlobalEnsured::Found {
                    partitions,
                    added: vec![],
                });
            }
            let mut sources = have;
            sources.extend(missing.iter().map(|r| r.nats_source()));
            cfg.sources = Some(sources);
            js.update_stream(cfg)
                .await
                .with_context(|| format!("adding sources to stream {}", spec.name))?;
            Ok(GlobalEnsured::Found {
                partitions,
                added: missing.iter().map(ToString::to_string).collect(),
            })
        }
        Err(e) => {
            if !matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
            {
                return Err(anyhow!("stream info {}: {e}", spec.name));
            }
            js.create_stream(global_config(spec, partitions))
                .await
                .with_context(|| format!("creating stream {}", spec.name))?;
            Ok(GlobalEnsured::Created { partitions })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_name_their_api() {
        let s = RegionSource::parse("eu-west:CLICKS").unwrap();
        assert_eq!(s.api_prefix(), "$JS.eu-west.API");
        assert_eq!(s.to_string(), "eu-west:CLICKS");
        assert!(s.same_as(&s.nats_source()));
        let other = RegionSource::parse("us-east:CLICKS").unwrap();
        assert!(!other.same_as(&s.nats_source()));
        for bad in ["CLICKS", ":CLICKS", "eu:", "eu west:CLICKS", "eu:CLI.CKS"] {
            assert!(RegionSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_global_config_sources_every_region_and_records_p() {
        let spec = GlobalSpec {
            name: "CLICKS_GLOBAL".into(),
            sources: vec![
                RegionSource::parse("a:CLICKS").unwrap(),
                RegionSource::parse("b:CLICKS").unwrap(),
            ],
            replicas: 3,
            max_age: Duration::from_secs(3600),
            max_bytes: -1,
        };
        let c = global_config(&spec, 16);
        assert!(c.subjects.is_empty());
        assert_eq!(partitions_of(&c), Some(16));
        let apis: Vec<String> = c
            .sources
            .unwrap()
            .iter()
            .map(|s| s.external.as_ref().unwrap().api_prefix.clone())
            .collect();
        assert_eq!(apis, ["$JS.a.API", "$JS.b.API"]);
        assert_eq!(c.storage, stream::StorageType::File);
    }
}
