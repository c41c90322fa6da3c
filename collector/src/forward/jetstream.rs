//! The `jetstream` sink: batches go to a NATS JetStream stream (`async-nats`), one
//! message per (spool record, partition) on subject `<subject_prefix>.<partition>`, where
//! `partition = adclick_proto::partition::partition(ad_id, P)`. The message body is the
//! `IngestBatch` protobuf the gRPC path sends (so the aggregator's zero-copy decoder reads
//! it), holding that partition's clicks, with `collector_id`, `seq` = the record's seq and
//! `acked_floor` for that partition. Header `Nats-Msg-Id = <collector_id>:<seq>:<partition>`
//! makes a republish after a crash a server-side duplicate (within `duplicate_window_ms`),
//! and `Nats-Expected-Stream` makes sure the subject lands in our stream.
//!
//! A batch counts as delivered only on its PubAck: the stream's replicas (R3 in
//! production) stored it, fsynced with the servers' `sync_interval: always`. The pipeline
//! truncates the spool only once every partition message of a record (and every record
//! below it) is acked, so a crash at any point republishes a superset of what is missing,
//! under the same ids.
//!
//! The stream is created idempotently (create-or-verify, [`ensure_stream`]): when missing
//! it is created from the config (subjects `<prefix>.*`, file storage, limits retention,
//! replicas, `max_age`, `max_bytes`, duplicate window, P in the stream's metadata under
//! [`PARTITIONS_KEY`]); when present, a different P or subject set is an error naming both
//! values, and other differences (replicas, retention) are reported but left alone: this
//! module never reconfigures a stream.
//!
//! Hot-key feedback does not exist here: nothing answers a publish but the server's
//! PubAck, so `Delivered::hot_ad_ids` is always empty and `routing::HotAds` stays empty.
//! Salts are a pure function of the impression id anyway, and an ad lives in one
//! partition (`forward.hot_fanout` must be 1): the aggregator shard owning the partition
//! spreads a hot ad over its own threads.
//!
//! It must not retry (the pipeline does) or hold batches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::encoded::EncodedBatch;
use adclick_proto::partition::partition;
use async_nats::header::{NATS_EXPECTED_STREAM, NATS_MESSAGE_ID};
use async_nats::jetstream::{
    self, ErrorCode, context::CreateStreamErrorKind, context::GetStreamErrorKind,
    context::PublishErrorKind, stream,
};
use async_nats::{HeaderMap, ServerAddr, Subject};
use bytes::Bytes;

use super::sink::{Delivered, SendError, Sink};
use crate::config::JetStreamConfig;

/// The stream metadata key holding the partition count P the stream was created with.
pub const PARTITIONS_KEY: &str = adclick_proto::partition::STREAM_PARTITIONS_KEY;

/// Why the stream cannot be used (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JetStreamError {
    /// The servers could not be reached (only when connecting without retries, as
    /// `adclick jetstream init` does).
    #[error("cannot connect to NATS {servers}: {message}")]
    Connect {
        /// The configured servers.
        servers: String,
        /// The client's error.
        message: String,
    },
    /// The stream exists but does not match the config in a way that would misroute
    /// clicks (partition count, subjects, storage): an operator must decide.
    #[error("stream {stream} does not match [forward.jetstream]: {message}")]
    Mismatch {
        /// Stream name.
        stream: String,
        /// What differs, with both values.
        message: String,
    },
    /// The servers' `max_payload` is below `forward.jetstream.max_message_bytes`.
    #[error(
        "the NATS server's max_payload ({server} bytes) is below forward.jetstream.max_message_bytes ({configured}): raise max_payload in the server config (e.g. max_payload: 8MB) or lower max_message_bytes"
    )]
    PayloadLimit {
        /// The server's limit.
        server: usize,
        /// The configured message size.
        configured: usize,
    },
    /// JetStream did not answer, or answered with an error that may pass (no leader yet,
    /// not enough peers for the replicas, ...).
    #[error("JetStream: {0}")]
    Unavailable(String),
}

impl JetStreamError {
    /// True when retrying cannot help: the config or the servers must change.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            JetStreamError::Mismatch { .. } | JetStreamError::PayloadLimit { .. }
        )
    }
}

/// The stream as the config wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name.
    pub name: String,
    /// Subjects are `<subject_prefix>.<partition>`.
    pub subject_prefix: String,
    /// Partition count P.
    pub partitions: u32,
    /// Replicas.
    pub replicas: usize,
    /// Retention by age.
    pub max_age: Duration,
    /// Retention by size.
    pub max_bytes: i64,
    /// Message-id dedup window.
    pub duplicate_window: Duration,
}

impl StreamSpec {
    /// The spec of `cfg`.
    pub fn from_config(cfg: &JetStreamConfig) -> Self {
        StreamSpec {
            name: cfg.stream.clone(),
            subject_prefix: cfg.subject_prefix.clone(),
            partitions: cfg.partitions,
            replicas: cfg.replicas,
            max_age: Duration::from_millis(cfg.max_age_ms),
            max_bytes: i64::try_from(cfg.max_bytes).unwrap_or(i64::MAX),
            duplicate_window: Duration::from_millis(cfg.duplicate_window_ms),
        }
    }

    /// The stream's subject filter, `<prefix>.*`.
    pub fn subject_filter(&self) -> String {
        format!("{}.*", self.subject_prefix)
    }

    /// The subject of partition `p`.
    pub fn subject(&self, p: u32) -> String {
        format!("{}.{p}", self.subject_prefix)
    }

    /// The stream configuration to create.
    pub fn nats_config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            description: Some(format!(
                "adclick clicks: {}.<partition>, partition = xxh64(ad_id le, 0) mod {}",
                self.subject_prefix, self.partitions
            )),
            subjects: vec![self.subject_filter()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.replicas,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            max_messages: -1,
            max_messages_per_subject: -1,
            duplicate_window: self.duplicate_window,
            metadata: HashMap::from([(PARTITIONS_KEY.to_string(), self.partitions.to_string())]),
            ..Default::default()
        }
    }

    /// Compares an existing stream's configuration with this spec. `Err` names what must
    /// match and does not (partitions, subjects, storage, retention policy); `Ok` lists
    /// the differences that are only reported (replicas, limits, dedup window), since an
    /// operator may have changed them on purpose.
    pub fn check(&self, existing: &stream::Config) -> Result<Vec<String>, String> {
        let found = existing.metadata.get(PARTITIONS_KEY);
        match found.map(|p| p.parse::<u32>()) {
            Some(Ok(p)) if p == self.partitions => {}
            Some(Ok(p)) => {
                return Err(format!(
                    "the stream has {p} partitions, the config says forward.jetstream.partitions = {}. \
                     Partitions are fixed at creation (ads would move between partitions): set \
                     partitions = {p}, or create a new stream (another forward.jetstream.stream name)",
                    self.partitions
                ));
            }
            _ => {
                return Err(format!(
                    "the stream has no valid {PARTITIONS_KEY} metadata ({found:?}): it was not \
                     created by adclick, so its partition count is unknown. Use another \
                     forward.jetstream.stream name"
                ));
            }
        }
        if existing.subjects != [self.subject_filter()] {
            return Err(format!(
                "the stream captures subjects {:?}, the config needs [{:?}] (forward.jetstream.subject_prefix)",
                existing.subjects,
                self.subject_filter()
            ));
        }
        if existing.storage != stream::StorageType::File {
            return Err(
                "the stream keeps messages in memory: acked clicks would not survive a restart of its servers; it must use file storage"
                    .into(),
            );
        }
        if existing.retention != stream::RetentionPolicy::Limits {
            return Err(format!(
                "the stream's retention policy is {:?}; adclick needs limits retention (shards replay partitions within max_age)",
                existing.retention
            ));
        }
        let mut notes = Vec::new();
        let mut note = |what: &str, stream: String, config: String| {
            if stream != config {
                notes.push(format!("{what}: stream has {stream}, config says {config}"));
            }
        };
        note(
            "replicas",
            existing.num_replicas.to_string(),
            self.replicas.to_string(),
        );
        note(
            "max_age",
            format!("{:?}", existing.max_age),
            format!("{:?}", self.max_age),
        );
        note(
            "max_bytes",
            existing.max_bytes.to_string(),
            self.max_bytes.to_string(),
        );
        note(
            "duplicate_window",
            format!("{:?}", existing.duplicate_window),
            format!("{:?}", self.duplicate_window),
        );
        note(
            "discard",
            format!("{:?}", existing.discard),
            format!("{:?}", stream::DiscardPolicy::Old),
        );
        Ok(notes)
    }
}

/// What [`ensure_stream`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The stream did not exist; it was created from the spec.
    Created,
    /// The stream existed with the spec's partitions and subjects; `differences` lists
    /// what differs otherwise (left as it is).
    Found {
        /// Reported differences (replicas, limits), empty when it matches exactly.
        differences: Vec<String>,
    },
}

/// Creates the stream of `spec` if it is missing, else verifies it (see
/// [`StreamSpec::check`]). Never changes an existing stream.
pub async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<Ensured, JetStreamError> {
    let mismatch = |message: String| JetStreamError::Mismatch {
        stream: spec.name.clone(),
        message,
    };
    // Twice at most: a create can race another collector's create.
    for _ in 0..2 {
        match js.get_stream(&spec.name).await {
            Ok(s) => {
                let differences = spec.check(&s.cached_info().config).map_err(mismatch)?;
                return Ok(Ensured::Found { differences });
            }
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {}
                _ => return Err(JetStreamError::Unavailable(format!("stream info: {e}"))),
            },
        }
        match js.create_stream(spec.nats_config()).await {
            Ok(_) => return Ok(Ensured::Created),
            Err(e) => match e.kind() {
                CreateStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NAME_EXIST =>
                {
                    continue;
                }
                CreateStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP =>
                {
                    return Err(mismatch(format!(
                        "another stream already captures {}: {j}",
                        spec.subject_filter()
                    )));
                }
                CreateStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STORAGE_RESOURCES_EXCEEDED =>
                {
                    // Servers reserve max_bytes per replica up front.
                    return Err(JetStreamError::Unavailable(format!(
                        "stream create: {j}: the servers cannot reserve forward.jetstream.max_bytes = {} per replica; \
                         lower it or give the servers more JetStream storage (max_file_store)",
                        spec.max_bytes
                    )));
                }
                _ => return Err(JetStreamError::Unavailable(format!("stream create: {e}"))),
            },
        }
    }
    Err(JetStreamError::Unavailable(
        "stream create raced another and then vanished; retrying".into(),
    ))
}

/// The servers of `cfg`, parsed.
fn servers(cfg: &JetStreamConfig) -> Result<Vec<ServerAddr>, JetStreamError> {
    cfg.servers
        .iter()
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| JetStreamError::Connect {
                    servers: cfg.servers.join(","),
                    message: format!("{s:?}: {e}"),
                })
        })
        .collect()
}

/// A client to the servers of `cfg`, named `name`. With `retry`, it returns at once and
/// connects (and reconnects) in the background forever; without, it fails if no server
/// answers now.
pub async fn connect(
    cfg: &JetStreamConfig,
    name: &str,
    timeout: Duration,
    retry: bool,
) -> Result<async_nats::Client, JetStreamError> {
    let addrs = servers(cfg)?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(timeout.min(Duration::from_secs(5)))
        .request_timeout(Some(timeout))
        .max_reconnects(None);
    if retry {
        opts = opts.retry_on_initial_connect();
    }
    opts.connect(addrs)
        .await
        .map_err(|e| JetStreamError::Connect {
            servers: cfg.servers.join(","),
            message: e.to_string(),
        })
}

/// `adclick jetstream init`: connects (failing fast), creates or verifies the stream and
/// checks the servers' `max_payload`.
pub async fn init(
    cfg: &JetStreamConfig,
    timeout: Duration,
) -> Result<(StreamSpec, Ensured), JetStreamError> {
    let client = connect(cfg, "adclick-jetstream-init", timeout, false).await?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(timeout);
    let spec = StreamSpec::from_config(cfg);
    let ensured = ensure_stream(&js, &spec).await?;
    check_payload(&client, cfg.max_message_bytes)?;
    Ok((spec, ensured))
}

fn check_payload(client: &async_nats::Client, configured: usize) -> Result<(), JetStreamError> {
    let server = client.server_info().max_payload;
    // 0: no INFO yet (not connected); the next check will see it.
    if server != 0 && server < configured {
        return Err(JetStreamError::PayloadLimit { server, configured });
    }
    Ok(())
}

/// See the module doc.
#[derive(Debug)]
pub struct JetStreamSink {
    client: async_nats::Client,
    js: jetstream::Context,
    spec: StreamSpec,
    /// `subjects[p]` = the subject of partition p.
    subjects: Vec<Subject>,
    max_message_bytes: usize,
    /// The stream was created or verified and `max_payload` checked.
    verified: AtomicBool,
    /// One verification at a time.
    verifying: tokio::sync::Mutex<()>,
}

/// One partition's batch of one record, encoded.
#[derive(Debug)]
pub struct JetStreamBatch {
    msg_id: String,
    payload: Bytes,
}

/// The `Nats-Msg-Id` of the batch of record `seq` for `partition`:
/// `<collector_id>:<seq>:<partition>` (`collector_id` as on the wire, with the spool
/// incarnation, so a wiped spool never reuses an id).
pub fn msg_id(collector_id: &str, seq: u64, partition: usize) -> String {
    format!("{collector_id}:{seq}:{partition}")
}

impl JetStreamSink {
    /// A sink for `cfg`, publishing as `collector_id` (the client's name). It connects in
    /// the background and reconnects forever; nothing is published before the stream is
    /// verified ([`JetStreamSink::ready`]).
    pub async fn new(
        cfg: &JetStreamConfig,
        collector_id: &str,
        timeout: Duration,
    ) -> Result<Self, JetStreamError> {
        let client = connect(cfg, collector_id, timeout, true).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(timeout);
        let spec = StreamSpec::from_config(cfg);
        let subjects = (0..spec.partitions)
            .map(|p| Subject::from(spec.subject(p)))
            .collect();
        Ok(JetStreamSink {
            client,
            js,
            spec,
            subjects,
            max_message_bytes: cfg.max_message_bytes,
            verified: AtomicBool::new(false),
            verifying: tokio::sync::Mutex::new(()),
        })
    }

    /// Creates or verifies the stream and checks the servers' `max_payload`, once (again
    /// after a publish found no stream). Sends call it first.
    pub async fn ready(&self) -> Result<(), JetStreamError> {
        if self.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.verifying.lock().await;
        if self.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        match ensure_stream(&self.js, &self.spec).await? {
            Ensured::Created => tracing::info!(
                stream = self.spec.name,
                subjects = self.spec.subject_filter(),
                partitions = self.spec.partitions,
                replicas = self.spec.replicas,
                "JetStream stream created"
            ),
            Ensured::Found { differences } if differences.is_empty() => {
                tracing::info!(stream = self.spec.name, "JetStream stream verified");
            }
            Ensured::Found { differences } => tracing::warn!(
                stream = self.spec.name,
                ?differences,
                "JetStream stream differs from [forward.jetstream] (left as it is)"
            ),
        }
        check_payload(&self.client, self.max_message_bytes)?;
        self.verified.store(true, Ordering::Release);
        Ok(())
    }

    /// The stream spec this sink publishes to.
    pub fn spec(&self) -> &StreamSpec {
        &self.spec
    }
}

impl Sink for JetStreamSink {
    type Batch = JetStreamBatch;

    fn destinations(&self) -> usize {
        self.subjects.len()
    }

    fn route(&self, ad_id: u64, _salt: u32) -> usize {
        // Not the salt: an ad lives in exactly one partition.
        partition(ad_id, self.spec.partitions) as usize
    }

    fn prepare(&self, dest: usize, batch: EncodedBatch) -> JetStreamBatch {
        JetStreamBatch {
            msg_id: msg_id(&batch.collector_id, batch.seq, dest),
            payload: batch.bytes,
        }
    }

    async fn send(&self, dest: usize, b: &JetStreamBatch) -> Result<Delivered, SendError> {
        self.ready().await.map_err(|e| {
            if e.is_permanent() {
                SendError::Refused(e.to_string())
            } else {
                SendError::Unavailable(e.to_string())
            }
        })?;
        let Some(subject) = self.subjects.get(dest) else {
            return Err(SendError::Refused(format!("no partition {dest}")));
        };
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, b.msg_id.as_str());
        headers.insert(NATS_EXPECTED_STREAM, self.spec.name.as_str());
        let publish = async {
            self.js
                .publish_with_headers(subject.clone(), headers, b.payload.clone())
                .await?
                .await
        };
        match publish.await {
            Ok(ack) if ack.stream == self.spec.name => Ok(Delivered {
                duplicate: ack.duplicate,
                hot_ad_ids: Vec::new(),
            }),
            Ok(ack) => Err(SendError::Refused(format!(
                "{subject} was stored by stream {}, not {}",
                ack.stream, self.spec.name
            ))),
            Err(e) => Err(match e.kind() {
                PublishErrorKind::MaxPayloadExceeded => SendError::Refused(format!(
                    "message {} ({} bytes) exceeds the server's max_payload: {e}",
                    b.msg_id,
                    b.payload.len()
                )),
                PublishErrorKind::StreamNotFound => {
                    // No stream captures the subject (deleted, or no leader yet): verify
                    // (and create, if it is really gone) before the next attempt.
                    self.verified.store(false, Ordering::Release);
                    SendError::Unavailable(format!("no stream answered on {subject}: {e}"))
                }
                _ => SendError::Unavailable(format!("publish {}: {e}", b.msg_id)),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> StreamSpec {
        StreamSpec::from_config(&JetStreamConfig {
            partitions: 4,
            ..Default::default()
        })
    }

    #[test]
    fn the_created_config_carries_everything_the_check_needs() {
        let s = spec();
        let c = s.nats_config();
        assert_eq!(c.subjects, ["clicks.*"]);
        assert_eq!(
            c.metadata.get(PARTITIONS_KEY).map(String::as_str),
            Some("4")
        );
        assert_eq!((c.num_replicas, c.storage), (3, stream::StorageType::File));
        assert_eq!(c.duplicate_window, Duration::from_secs(3600));
        assert_eq!(s.check(&c), Ok(vec![]));
        assert_eq!(s.subject(3), "clicks.3");
    }

    #[test]
    fn partitions_and_subjects_must_match_limits_are_only_reported() {
        let s = spec();
        let mut other = s.nats_config();
        other
            .metadata
            .insert(PARTITIONS_KEY.into(), "8".to_string());
        let e = s.check(&other).unwrap_err();
        assert!(
            e.contains("8 partitions") && e.contains("partitions = 4"),
            "{e}"
        );
        other.metadata.clear();
        assert!(
            s.check(&other)
                .unwrap_err()
                .contains("not created by adclick")
        );
        let mut other = s.nats_config();
        other.subjects = vec!["events.*".into()];
        assert!(s.check(&other).unwrap_err().contains("events.*"));
        let mut other = s.nats_config();
        other.storage = stream::StorageType::Memory;
        assert!(s.check(&other).unwrap_err().contains("memory"));
        let mut other = s.nats_config();
        other.num_replicas = 1;
        other.max_bytes = 1 << 20;
        let notes = s.check(&other).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("replicas: stream has 1, config says 3"));
    }

    #[test]
    fn message_ids_name_collector_seq_and_partition() {
        assert_eq!(
            msg_id("c-1-00000000000000ab", 42, 1),
            "c-1-00000000000000ab:42:1"
        );
    }
}
