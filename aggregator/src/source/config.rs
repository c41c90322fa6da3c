//! `[source]`: where the aggregator's batches come from. `kind = "grpc"` (the default):
//! collectors push them to the `IngestService`. `kind = "jetstream"`: this aggregator is a
//! shard that reads a set of partitions of the clicks stream. Only the schema and its
//! validation live here; nothing connects.

use serde::{Deserialize, Serialize};

use adclick_proto::partition::MAX_PARTITIONS;

/// Where batches come from.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Collectors push over gRPC (`IngestService`).
    #[default]
    Grpc,
    /// Durable pull consumers on a NATS JetStream stream, one per owned partition.
    Jetstream,
}

/// `[source]` (see the module doc). The JetStream fields are read only when
/// `kind = "jetstream"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `grpc` or `jetstream`.
    pub kind: SourceKind,
    /// NATS server URLs (`nats://host:4222`); the client fails over between them.
    pub servers: Vec<String>,
    /// The stream the collectors publish to.
    pub stream: String,
    /// Its subjects are `<subject_prefix>.<partition>`.
    pub subject_prefix: String,
    /// The partitions this aggregator consumes: `"0-7"`, `"3"`, `"0-3,8,10-11"`. Either
    /// this or `shard`/`shards`.
    pub partitions: Option<String>,
    /// This aggregator's index among `shards` (owns the partitions `p` with
    /// `p * shards / P == shard`, a contiguous range; P is read from the stream).
    pub shard: Option<u32>,
    /// How many shards split the partitions.
    pub shards: Option<u32>,
    /// Durable consumer names are `<durable_prefix>-<partition>`.
    pub durable_prefix: String,
    /// Batches of one partition queued to the engine and not yet committed (pipelining;
    /// the writer groups them into one commit).
    pub max_in_flight: usize,
    /// Messages per pull request.
    pub fetch_batch: usize,
    /// Timeout of each JetStream request (stream info, consumer create).
    pub request_timeout_ms: u64,
    /// 0 (default): a partition whose committed position is older than the stream's first
    /// message is not consumed (readiness `stream_retention_gap`: retention may have
    /// dropped clicks it never applied). An operator who checked (an idle partition whose
    /// last message simply aged out, or a loss recorded elsewhere) sets the stream's first
    /// sequence named in that error here; gaps before it are then accepted (logged).
    pub accept_gap_before: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kind: SourceKind::Grpc,
            servers: vec!["nats://127.0.0.1:4222".into()],
            stream: "CLICKS".into(),
            subject_prefix: "clicks".into(),
            partitions: None,
            shard: None,
            shards: None,
            durable_prefix: "adclick-agg".into(),
            max_in_flight: 64,
            fetch_batch: 256,
            request_timeout_ms: 5_000,
            accept_gap_before: 0,
        }
    }
}

/// Which partitions a shard consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owned {
    /// Listed explicitly (sorted, distinct).
    List(Vec<u32>),
    /// Shard `shard` of `shards`: resolved once P is known ([`Owned::resolve`]).
    Shard {
        /// Index.
        shard: u32,
        /// Count.
        shards: u32,
    },
}

impl Owned {
    /// The partitions owned in a stream of `p` partitions; `Err` names a listed partition
    /// the stream does not have, or a shard left with none.
    pub fn resolve(&self, p: u32) -> Result<Vec<u32>, String> {
        match self {
            Owned::List(v) => match v.iter().find(|x| **x >= p) {
                Some(x) => Err(format!(
                    "source.partitions names partition {x}, but the stream has {p} partitions (0-{})",
                    p.saturating_sub(1)
                )),
                None => Ok(v.clone()),
            },
            Owned::Shard { shard, shards } => {
                let v: Vec<u32> = (0..p)
                    .filter(|x| {
                        u64::from(*x) * u64::from(*shards) / u64::from(p) == u64::from(*shard)
                    })
                    .collect();
                if v.is_empty() {
                    return Err(format!(
                        "source.shard = {shard} of shards = {shards} owns no partition of a stream with {p} partitions: use at most {p} shards"
                    ));
                }
                Ok(v)
            }
        }
    }
}

/// Parses `"0-7"`, `"3"`, `"0-3,8"`: sorted, distinct, each below [`MAX_PARTITIONS`].
pub fn parse_partitions(s: &str) -> Result<Vec<u32>, String> {
    let mut out = std::collections::BTreeSet::new();
    for part in s.split(',').map(str::trim) {
        let num = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("source.partitions: {t:?} is not a partition number in {s:?}"))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let x = num(part)?;
                (x, x)
            }
        };
        if lo > hi {
            return Err(format!(
                "source.partitions: range {part:?} goes down (write {hi}-{lo})"
            ));
        }
        if hi >= MAX_PARTITIONS {
            return Err(format!(
                "source.partitions: {hi} is not below the largest partition count {MAX_PARTITIONS}"
            ));
        }
        out.extend(lo..=hi);
    }
    Ok(out.into_iter().collect())
}

/// A NATS name token (stream, durable, subject prefix part): no whitespace, `.`, `*`, `>`.
fn name_ok(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.chars().all(|c| {
            !c.is_whitespace() && c != '*' && c != '>' && (dots || c != '.') && !c.is_control()
        })
        && !s.starts_with('.')
        && !s.ends_with('.')
}

impl SourceConfig {
    /// Checks the JetStream fields (when `kind = "jetstream"`) and returns the owned
    /// partitions' spec.
    pub fn owned(&self) -> Result<Owned, String> {
        if self.servers.is_empty() {
            return Err("source.servers is empty: list the NATS servers (nats://host:4222)".into());
        }
        if let Some(s) = self
            .servers
            .iter()
            .find(|s| s.parse::<async_nats::ServerAddr>().is_err())
        {
            return Err(format!(
                "source.servers: {s:?} is not a NATS URL (nats://host:port, tls://host:port)"
            ));
        }
        if !name_ok(&self.stream, false) {
            return Err(format!(
                "source.stream {:?} is not a stream name (no spaces, '.', '*' or '>')",
                self.stream
            ));
        }
        if !name_ok(&self.subject_prefix, true) {
            return Err(format!(
                "source.subject_prefix {:?} is not a subject prefix (no spaces, '*' or '>', no leading or trailing '.')",
                self.subject_prefix
            ));
        }
        if !name_ok(&self.durable_prefix, false) {
            return Err(format!(
                "source.durable_prefix {:?} is not a consumer name (no spaces, '.', '*' or '>')",
                self.durable_prefix
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 4096 {
            return Err("source.max_in_flight must be 1 to 4096".into());
        }
        if self.fetch_batch == 0 || self.fetch_batch > 10_000 {
            return Err("source.fetch_batch must be 1 to 10000".into());
        }
        if self.request_timeout_ms == 0 {
            return Err("source.request_timeout_ms must be at least 1".into());
        }
        match (&self.partitions, self.shard, self.shards) {
            (Some(p), None, None) => {
                let v = parse_partitions(p)?;
                if v.is_empty() {
                    return Err("source.partitions names no partition".into());
                }
                Ok(Owned::List(v))
            }
            (None, Some(shard), Some(shards)) => {
                if shards == 0 || shard >= shards {
                    return Err(format!(
                        "source.shard must be below source.shards (shard = {shard}, shards = {shards})"
                    ));
                }
                Ok(Owned::Shard { shard, shards })
            }
            (None, None, None) => Err(
                "source.kind = \"jetstream\" needs the partitions this aggregator consumes: \
                 partitions = \"0-7\", or shard = 0 and shards = 2"
                    .into(),
            ),
            _ => Err(
                "source: set either partitions = \"...\" or both shard and shards, not a mix"
                    .into(),
            ),
        }
    }

    /// Checks the section: nothing for `grpc`, every JetStream field for `jetstream`.
    pub fn validate(&self) -> Result<(), String> {
        match self.kind {
            SourceKind::Grpc => Ok(()),
            SourceKind::Jetstream => self.owned().map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn js() -> SourceConfig {
        SourceConfig {
            kind: SourceKind::Jetstream,
            partitions: Some("0-7".into()),
            ..Default::default()
        }
    }

    #[test]
    fn partition_lists_parse_and_bad_ones_say_why() {
        assert_eq!(parse_partitions("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_partitions("5, 0-1,1").unwrap(), vec![0, 1, 5]);
        assert!(parse_partitions("3-1").unwrap_err().contains("goes down"));
        assert!(
            parse_partitions("x")
                .unwrap_err()
                .contains("not a partition")
        );
        assert!(
            parse_partitions("0-")
                .unwrap_err()
                .contains("not a partition")
        );
        assert!(parse_partitions("1024").unwrap_err().contains("1024"));
    }

    #[test]
    fn shards_split_partitions_into_contiguous_ranges() {
        let s = |shard, shards| Owned::Shard { shard, shards }.resolve(16).unwrap();
        assert_eq!(s(0, 2), (0..8).collect::<Vec<_>>());
        assert_eq!(s(1, 2), (8..16).collect::<Vec<_>>());
        let all: Vec<u32> = (0..3).flat_map(|i| s(i, 3)).collect();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        assert!(
            Owned::Shard {
                shard: 4,
                shards: 5
            }
            .resolve(4)
            .unwrap_err()
            .contains("owns no partition")
        );
        assert!(
            Owned::List(vec![0, 16])
                .resolve(16)
                .unwrap_err()
                .contains("partition 16")
        );
    }

    #[test]
    fn jetstream_needs_a_partition_set_and_sane_names() {
        assert_eq!(SourceConfig::default().validate(), Ok(()));
        assert_eq!(js().validate(), Ok(()));
        let mut c = js();
        c.partitions = None;
        assert!(c.validate().unwrap_err().contains("shard = 0"));
        c.shard = Some(2);
        c.shards = Some(2);
        assert!(c.validate().unwrap_err().contains("below source.shards"));
        c.shard = Some(1);
        assert_eq!(c.validate(), Ok(()));
        c.partitions = Some("0".into());
        assert!(c.validate().unwrap_err().contains("not a mix"));
        let mut c = js();
        c.stream = "a.b".into();
        assert!(c.validate().unwrap_err().contains("source.stream"));
        let mut c = js();
        c.servers.clear();
        assert!(c.validate().unwrap_err().contains("source.servers"));
        c.servers = vec!["http://[::1".into()];
        assert!(c.validate().unwrap_err().contains("not a NATS URL"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Wrap {
            source: SourceConfig,
        }
        let e = serde_json::from_str::<Wrap>(r#"{"source":{"kind":"jetstream","partition":"0"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = serde_json::from_str::<Wrap>(r#"{"source":{"kind":"kafka"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant"), "{e}");
    }
}
