//! The aggregator's edge under hostile or broken clients, against the real servers on
//! 127.0.0.x: ingest authenticated before decoding and size-capped, undecodable batches
//! answered INVALID_ARGUMENT, the per-collector seq window, readiness on WAL failure,
//! connection caps and timeouts, hostile query strings.
//!
//! Time bounds here are failure bounds only ("closed within 10x the configured timeout"),
//! never expectations of speed.
//!
//! The memory figure for an unauthenticated 64 MiB `Ingest` (issue 11) is an ignored test
//! with its own command, because it measures a child process:
//! `cargo test -p adclick-aggregator --test aggregator -- --ignored --nocapture unauthenticated_64_mib`

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use adclick_aggregator::Aggregator;
use adclick_aggregator::admit::Delivery;
use adclick_aggregator::store::{Checkpoint, RedbStore, Store, StoreError, WalEntry};
use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{IngestAck, IngestBatch, IngestClick, TopAdsRequest, top_ads_request};
use adclick_test_support::aggregator::{ADMIN, INGEST, T0, config};
use adclick_test_support::common::{authed, connect_from, h2_get_then_idle_close};
use bytes::BufMut;
use prost::Message;
use tokio::net::TcpStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

fn click(i: u64) -> IngestClick {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&i.to_le_bytes());
    IngestClick {
        impression_id: id.to_vec(),
        ad_id: 1 + i % 3,
        advertiser_id: 1,
        campaign_id: 1,
        token_expires_at_ms: T0 + 3_600_000,
        event_time_ms: T0 + 1_000,
        received_at_ms: T0 + 1_000,
        ..Default::default()
    }
}

fn batch(collector: &str, seq: u64, clicks: std::ops::Range<u64>) -> IngestBatch {
    IngestBatch {
        collector_id: collector.into(),
        seq,
        clicks: clicks.map(click).collect(),
        ..Default::default()
    }
}

async fn channel(addr: SocketAddr, from: Option<IpAddr>) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(from)
        .connect()
        .await
        .unwrap()
}

/// Polls `f` until it is true; panics with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(a: &Aggregator, line_start: &str) -> u64 {
    a.metrics()
        .render()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Sends raw bytes as the `Ingest` request message (what a broken or hostile client can).
async fn ingest_raw(ch: Channel, key: Option<&str>, body: Vec<u8>) -> Result<IngestAck, Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/adclick.v1.IngestService/Ingest");
    let req = match key {
        Some(k) => authed(body, k),
        None => tonic::Request::new(body),
    };
    grpc.unary(req, path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

struct RawCodec;
struct RawEnc;
struct AckDec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = IngestAck;
    type Encoder = RawEnc;
    type Decoder = AckDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> AckDec {
        AckDec
    }
}
impl Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl Decoder for AckDec {
    type Item = IngestAck;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<IngestAck>, Status> {
        IngestAck::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------
// Finding 2 and 8: authenticate first, cap the size, INVALID_ARGUMENT for garbage

/// Before the change the body was decoded first: garbage without a key got INTERNAL (the
/// decode error), and a message over the (then 64 MiB) limit was buffered. Now the key is
/// checked from the headers first, whatever the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_is_authenticated_before_the_body_is_decoded_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.ingest.max_message_bytes = 64 << 10;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let ch = channel(a.grpc_addr(), None).await;

    // Garbage, no key: UNAUTHENTICATED (not the decode error).
    let e = ingest_raw(ch.clone(), None, vec![0xff; 64])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Garbage, wrong key: same.
    let e = ingest_raw(ch.clone(), Some("not-the-ingest-key-000"), vec![0xff; 64])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Over the size cap, no key: UNAUTHENTICATED too (the size is never looked at).
    let big = batch("c", 1, 0..1);
    let mut big = big;
    big.clicks[0].user_id = "u".repeat(1 << 20);
    let e = ingest_raw(ch.clone(), None, big.encode_to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Over the size cap with the key: refused from the frame header (1 MiB > 64 KiB).
    let e = ingest_raw(ch.clone(), Some(INGEST), big.encode_to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // Undecodable with the key: INVALID_ARGUMENT naming the message.
    for garbage in [vec![0xff; 64], vec![0x0a, 0x80], vec![0x1a, 0x05, 0x08]] {
        let e = ingest_raw(ch.clone(), Some(INGEST), garbage.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{garbage:?}: {e:?}");
        assert!(e.message().contains("IngestBatch"), "{e:?}");
    }
    // Fields that decode but cannot be served.
    for (b, field) in [
        (batch("", 1, 0..1), "collector_id"),
        (batch("c", 0, 0..1), "seq"),
    ] {
        let e = ingest_raw(ch.clone(), Some(INGEST), b.encode_to_vec())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{e:?}");
    }
    // A real batch still counts.
    let ack = ingest_raw(ch, Some(INGEST), batch("c", 1, 0..10).encode_to_vec())
        .await
        .unwrap();
    assert_eq!((ack.accepted, ack.already_acked), (10, false));
    assert_eq!(
        metric(
            &a,
            "adclick_aggregator_ingest_refused_total{reason=\"unauthenticated\"}"
        ),
        3
    );
    assert_eq!(
        metric(
            &a,
            "adclick_aggregator_ingest_refused_total{reason=\"invalid_argument\"}"
        ),
        5
    );
    assert_eq!(a.metrics().clicks_with("applied"), 10);
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Finding 6: one bad seq cannot silence a collector id

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_past_the_window_is_refused_and_the_collector_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let mut ing = IngestServiceClient::new(channel(a.grpc_addr(), None).await);
    let mut send = async |b: IngestBatch| ing.ingest(authed(b, INGEST)).await;

    assert_eq!(
        send(batch("edge", 1, 0..5))
            .await
            .unwrap()
            .into_inner()
            .accepted,
        5
    );
    for bad in [u64::MAX, 1 + 1_000_000 + 1] {
        let e = send(batch("edge", bad, 5..6)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("seq") && e.message().contains("max_seq_jump"),
            "{e:?}"
        );
    }
    // The mark did not move: the real next batches (with a gap, as a shard sees) count.
    let ack = send(batch("edge", 2, 5..8)).await.unwrap().into_inner();
    assert_eq!((ack.accepted, ack.already_acked), (3, false));
    let ack = send(batch("edge", 2 + 1_000_000, 8..9))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.already_acked), (1, false));
    // A collector id never seen cannot be parked at u64::MAX either.
    let e = send(batch("new-edge", u64::MAX, 9..10)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let ack = send(batch("new-edge", 1, 9..10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.already_acked), (1, false));
    // A redelivery is still acked as such.
    let ack = send(batch("edge", 2, 5..8)).await.unwrap().into_inner();
    assert_eq!((ack.accepted, ack.already_acked), (0, true));
    assert_eq!(a.metrics().clicks_with("applied"), 5 + 3 + 1 + 1);
    assert_eq!(
        metric(
            &a,
            "adclick_aggregator_ingest_refused_total{reason=\"seq_window\"}"
        ),
        3
    );
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Finding 5: liveness and readiness

/// A store whose WAL appends fail while `fail` is set (a full disk).
struct FlakyStore {
    inner: RedbStore,
    fail: Arc<AtomicBool>,
}

impl Store for FlakyStore {
    fn append(&mut self, entries: &[WalEntry]) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError("No space left on device (os error 28)".into()));
        }
        self.inner.append(entries)
    }
    fn high_water_marks(&self) -> Result<HashMap<String, u64>, StoreError> {
        self.inner.high_water_marks()
    }
    fn delivery_states(&self) -> Result<HashMap<String, Delivery>, StoreError> {
        self.inner.delivery_states()
    }
    fn wal_after(&self, pos: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.wal_after(pos)
    }
    fn last_wal_pos(&self) -> Result<u64, StoreError> {
        self.inner.last_wal_pos()
    }
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.inner.load_checkpoint()
    }
    fn save_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError> {
        self.inner.save_checkpoint(cp)
    }
    fn dedup_table(
        &self,
    ) -> Result<Box<dyn adclick_aggregator::state::dedup::SpillTable>, StoreError> {
        self.inner.dedup_table()
    }
}

fn http_client() -> reqwest::Client {
    adclick_sdk::HttpTransport::install_crypto_provider();
    reqwest::Client::new()
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = http_client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn health(ch: &Channel, service: &str) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_false_while_the_wal_cannot_be_written() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let store = FlakyStore {
        inner: RedbStore::open(dir.path()).unwrap(),
        fail: fail.clone(),
    };
    let a = adclick_aggregator::start_with_store(config(dir.path()), store)
        .await
        .unwrap();
    let (http, ch) = (a.http_addr(), channel(a.grpc_addr(), None).await);
    let mut ing = IngestServiceClient::new(ch.clone());
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;

    let ready = r#"{"ready":true,"reasons":[]}"#;
    assert_eq!(http_get(http, "/readyz").await, (200, ready.into()));
    assert_eq!(http_get(http, "/healthz").await, (200, ready.into()));
    assert_eq!(http_get(http, "/livez").await.0, 200);
    assert_eq!(health(&ch, "").await, serving);

    fail.store(true, Ordering::SeqCst);
    let e = ing
        .ingest(authed(batch("edge", 1, 0..3), INGEST))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let not_ready = r#"{"ready":false,"reasons":["wal_write_failed"]}"#;
    assert_eq!(http_get(http, "/readyz").await, (503, not_ready.into()));
    assert_eq!(http_get(http, "/healthz").await, (503, not_ready.into()));
    assert_eq!(http_get(http, "/livez").await.0, 200, "still alive");
    eventually(
        Duration::from_secs(10),
        "gRPC health NOT_SERVING",
        async || {
            health(&ch, "").await == not_serving
                && health(&ch, "adclick.v1.IngestService").await == not_serving
        },
    )
    .await;
    assert_eq!(
        health(&ch, "adclick.v1.QueryService").await,
        serving,
        "queries still answer"
    );
    assert_eq!(metric(&a, "adclick_aggregator_ready "), 0);

    // Space comes back: the next commit succeeds and the node is ready again.
    fail.store(false, Ordering::SeqCst);
    let ack = ing
        .ingest(authed(batch("edge", 1, 0..3), INGEST))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 3);
    assert_eq!(http_get(http, "/readyz").await, (200, ready.into()));
    eventually(Duration::from_secs(10), "gRPC health SERVING", async || {
        health(&ch, "").await == serving
    })
    .await;
    assert_eq!(metric(&a, "adclick_aggregator_ready "), 1);
    a.shutdown().await;
}

/// A dedup disk tier whose writes fail (a dying disk under the spill table).
#[derive(Debug)]
struct FailingSpill;

impl adclick_aggregator::state::dedup::SpillTable for FailingSpill {
    fn get(
        &self,
        _: &adclick_aggregator::state::dedup::Id,
    ) -> Result<
        Option<adclick_aggregator::state::dedup::Entry>,
        adclick_aggregator::state::dedup::DedupError,
    > {
        Ok(None)
    }
    fn put(
        &self,
        _: &[(
            adclick_aggregator::state::dedup::Id,
            adclick_aggregator::state::dedup::Entry,
        )],
    ) -> Result<(), adclick_aggregator::state::dedup::DedupError> {
        Err(adclick_aggregator::state::dedup::DedupError(
            "Input/output error (os error 5)".into(),
        ))
    }
    fn expire(&self, _: i64) -> Result<u64, adclick_aggregator::state::dedup::DedupError> {
        Ok(0)
    }
    fn for_each_id(
        &self,
        _: &mut dyn FnMut(&adclick_aggregator::state::dedup::Id),
    ) -> Result<(), adclick_aggregator::state::dedup::DedupError> {
        Ok(())
    }
    fn len(&self) -> Result<u64, adclick_aggregator::state::dedup::DedupError> {
        Ok(0)
    }
}

/// A store whose dedup spill table fails.
struct SpillFailingStore(RedbStore);

impl Store for SpillFailingStore {
    fn append(&mut self, entries: &[WalEntry]) -> Result<(), StoreError> {
        self.0.append(entries)
    }
    fn high_water_marks(&self) -> Result<HashMap<String, u64>, StoreError> {
        self.0.high_water_marks()
    }
    fn delivery_states(&self) -> Result<HashMap<String, Delivery>, StoreError> {
        self.0.delivery_states()
    }
    fn wal_after(&self, pos: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.0.wal_after(pos)
    }
    fn last_wal_pos(&self) -> Result<u64, StoreError> {
        self.0.last_wal_pos()
    }
    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.0.load_checkpoint()
    }
    fn save_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError> {
        self.0.save_checkpoint(cp)
    }
    fn dedup_table(
        &self,
    ) -> Result<Box<dyn adclick_aggregator::state::dedup::SpillTable>, StoreError> {
        Ok(Box::new(FailingSpill))
    }
}

/// When the dedup disk tier fails, ingest is refused until a restart, and readiness says
/// so (`dedup_failed`), so the not-ready alert fires instead of a silent refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_false_after_the_dedup_disk_tier_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.dedup.memory_bytes = 1 << 20; // spills after a few thousand ids
    // Under a loaded CI box a 5,000-click batch has taken longer than the default 30 s
    // request deadline (DeadlineExceeded instead of the refusal this test is about).
    cfg.connections.request_timeout_secs = 300;
    let store = SpillFailingStore(RedbStore::open(dir.path()).unwrap());
    let a = adclick_aggregator::start_with_store(cfg, store)
        .await
        .unwrap();
    let (http, ch) = (a.http_addr(), channel(a.grpc_addr(), None).await);
    let mut ing = IngestServiceClient::new(ch.clone());
    let mut refused = None;
    for seq in 1..=40u64 {
        let from = seq * 5_000;
        match ing
            .ingest(authed(batch("edge", seq, from..from + 5_000), INGEST))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("a spill must have failed within 200k unique ids");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let (code, body) = http_get(http, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("dedup_failed"), "{body}");
    assert_eq!(metric(&a, "adclick_aggregator_ready "), 0);
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Finding 1: idle and slow connections, connection caps

async fn write_all(s: &TcpStream, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        s.writable().await.unwrap();
        match s.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// True once the server has closed `s` (EOF or reset), reading and dropping whatever it
/// sends first; false if still open after `limit`.
async fn closed_within(s: &TcpStream, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        if tokio::time::timeout_at(deadline, s.readable())
            .await
            .is_err()
        {
            return false;
        }
        match s.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
}

/// Whether the server has closed `s`, without waiting.
fn is_closed_now(s: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed_on_both_ports() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.connections.header_read_timeout_secs = 1;
    cfg.connections.idle_timeout_secs = 1;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    // 10x the configured timeout.
    let bound = Duration::from_secs(10);

    // Silent TCP connections, one per port.
    let silent_grpc = connect_from(lo, a.grpc_addr()).await;
    let silent_http = connect_from(lo, a.http_addr()).await;
    // h2c: the preface and SETTINGS, then nothing.
    let preface_only = connect_from(lo, a.grpc_addr()).await;
    write_all(&preface_only, H2_PREFACE).await;
    write_all(&preface_only, H2_SETTINGS).await;
    // HTTP/1: headers that never finish.
    let slow_headers = connect_from(lo, a.http_addr()).await;
    write_all(&slow_headers, b"GET /livez HTTP/1.1\r\nHost: x\r\n").await;
    // HTTP/1 keep-alive after one answered request.
    let keep_alive = connect_from(lo, a.http_addr()).await;
    write_all(&keep_alive, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await;

    for (name, s) in [
        ("silent gRPC", &silent_grpc),
        ("silent HTTP", &silent_http),
        ("h2c preface only", &preface_only),
        ("HTTP/1 unfinished headers", &slow_headers),
        ("HTTP/1 idle keep-alive", &keep_alive),
    ] {
        assert!(
            closed_within(s, bound).await,
            "{name}: still open after {bound:?}"
        );
    }
    // An HTTP/2 (gRPC) connection idle after a real request is closed too.
    let ch = channel(a.grpc_addr(), None).await;
    let mut q = QueryServiceClient::new(ch);
    let top = TopAdsRequest {
        n: 1,
        window: Some(top_ads_request::Window::LastMinutes(5)),
        filter: None,
        ..Default::default()
    };
    q.top_ads(authed(top.clone(), ADMIN)).await.unwrap();
    eventually(bound, "idle gRPC connection closed", async || {
        metric(
            &a,
            "adclick_aggregator_connections_closed_total{port=\"grpc\",reason=\"idle_timeout\"}",
        ) >= 1
    })
    .await;
    assert_eq!(
        metric(
            &a,
            "adclick_aggregator_connections_closed_total{port=\"grpc\",reason=\"header_read_timeout\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &a,
            "adclick_aggregator_connections_closed_total{port=\"http\",reason=\"header_read_timeout\"}"
        ),
        2
    );
    assert!(
        metric(
            &a,
            "adclick_aggregator_connections_closed_total{port=\"http\",reason=\"idle_timeout\"}"
        ) >= 1
    );
    // Real clients are not bothered: the channel reconnects.
    q.top_ads(authed(top, ADMIN)).await.unwrap();
    assert_eq!(http_get(a.http_addr(), "/livez").await.0, 200);
    a.shutdown().await;
}

/// An idle HTTP/2 connection is closed with a GOAWAY, then the close: a client that sent a
/// request before it saw the GOAWAY still gets its answer (hyper's two-step GOAWAY), where
/// a bare close would lose it (`Cancelled` in a gRPC client). Seen from a bare HTTP/2
/// client: its connection ends cleanly, not with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_with_a_goaway() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.connections.idle_timeout_secs = 1;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    // Any answered request makes the connection one that can become idle (the gRPC port
    // answers a bare GET with an error status, which is enough). Within 10x the timeout.
    for (port, addr) in [("http", a.http_addr()), ("grpc", a.grpc_addr())] {
        let (_, ended) = h2_get_then_idle_close(addr, "/livez", Duration::from_secs(10)).await;
        assert!(
            ended.is_ok(),
            "{port}: the idle connection was cut without a GOAWAY: {ended:?}"
        );
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_the_excess_and_a_real_client_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.connections.max_connections_per_ip = 4;
    cfg.connections.max_connections = 8;
    // Long enough that the admitted idle connections stay open during the test.
    cfg.connections.header_read_timeout_secs = 600;
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let bound = Duration::from_secs(10);
    let refused = |reason: &str| {
        format!("adclick_aggregator_connections_refused_total{{port=\"grpc\",reason=\"{reason}\"}}")
    };

    // One address opens 10: 4 are admitted, 6 are closed at once.
    let mut attacker = Vec::new();
    for _ in 0..10 {
        attacker.push(connect_from(ip("127.0.0.1"), a.grpc_addr()).await);
    }
    eventually(bound, "6 refused per IP", async || {
        metric(&a, &refused("max_connections_per_ip")) == 6
    })
    .await;
    // The refused ones are closed (their EOF may still be on its way).
    eventually(bound, "6 attacker sockets closed", async || {
        attacker.iter().filter(|s| is_closed_now(s)).count() >= 6
    })
    .await;
    assert_eq!(attacker.iter().filter(|s| is_closed_now(s)).count(), 6);

    // A real client from another address gets through.
    let top = TopAdsRequest {
        n: 1,
        window: Some(top_ads_request::Window::LastMinutes(5)),
        filter: None,
        ..Default::default()
    };
    let mut q = QueryServiceClient::new(channel(a.grpc_addr(), Some(ip("127.0.0.2"))).await);
    q.top_ads(authed(top.clone(), ADMIN)).await.unwrap();

    // The listener-wide cap: 4 + 1 open, 3 more fill it to 8, the 9th is refused.
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(connect_from(ip("127.0.0.4"), a.grpc_addr()).await);
    }
    let ninth = connect_from(ip("127.0.0.5"), a.grpc_addr()).await;
    assert!(
        closed_within(&ninth, bound).await,
        "the 9th connection is refused"
    );
    assert_eq!(metric(&a, &refused("max_connections")), 1);
    // The open real client keeps working, and once the attacker leaves, new ones get in.
    q.top_ads(authed(top.clone(), ADMIN)).await.unwrap();
    drop(attacker);
    eventually(bound, "slots released", async || {
        metric(&a, "adclick_aggregator_connections{port=\"grpc\"}") <= 4
    })
    .await;
    let mut q2 = QueryServiceClient::new(channel(a.grpc_addr(), Some(ip("127.0.0.6"))).await);
    q2.top_ads(authed(top, ADMIN)).await.unwrap();
    drop(others);
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Query strings

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_query_strings_get_a_400_naming_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let a = adclick_aggregator::start(config(dir.path())).await.unwrap();
    let base = format!("http://{}", a.http_addr());
    let client = http_client();
    let get = async |q: String| {
        let r = client
            .get(format!("{base}/v1/ads/top?{q}"))
            .header("authorization", format!("Bearer {ADMIN}"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let long = "9x".repeat(1000);
    for (q, needle) in [
        (
            format!("last_minutes=5&site={}", "a".repeat(5000)),
            "query string",
        ),
        (
            "last_minutes=5&".to_string() + &"os=a&".repeat(200),
            "query parameters",
        ),
        (format!("last_minutes=5&n={long}"), "n="),
        (format!("last_minutes={long}"), "last_minutes="),
        ("last_minutes=5&device=toaster".into(), "device="),
        ("last_minutes=5&advertiser=-1".into(), "advertiser="),
        (
            "last_minutes=5&from_ms=1".into(),
            "last_minutes, or from_ms and to_ms",
        ),
        ("last_minutes=%FF%FE".into(), "last_minutes="),
    ] {
        let (status, body) = get(q.clone()).await;
        assert_eq!(status, 400, "{q:.80}: {body}");
        assert!(body.contains(needle), "{q:.80}: {body}");
        assert!(body.len() < 300, "errors quote a bounded prefix: {body}");
    }
    a.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The memory figure (issue 11, "Done when"): a child process runs the aggregator, the test
// sends it an unauthenticated 64 MiB Ingest and reads the child's peak RSS before and after.

const CHILD_ENV: &str = "ADCLICK_HARDENING_CHILD";

/// The child: an aggregator with default limits on 127.0.0.1:0; prints its gRPC address and
/// serves until stdin closes. Does nothing unless started by the parent.
#[test]
#[ignore = "started by unauthenticated_64_mib_ingest_costs_under_10_mib"]
fn child_aggregator() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = adclick_aggregator::start(config(std::path::Path::new(&dir)))
            .await
            .unwrap();
        println!("GRPC {}", a.grpc_addr());
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            while std::io::stdin().read_line(&mut s).is_ok_and(|n| n > 0) {}
        })
        .await
        .unwrap();
        a.shutdown().await;
    });
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures a child process: run with --ignored --nocapture"]
async fn unauthenticated_64_mib_ingest_costs_under_10_mib() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            // Its libtest name in the `aggregator` test binary.
            "hardening::child_aggregator",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let addr: SocketAddr = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited");
        // libtest prints "test hardening::child_aggregator ... " on the same line first.
        if let Some(i) = line.find("GRPC ") {
            break line[i + 5..].trim().parse().unwrap();
        }
    };
    let ch = channel(addr, None).await;
    // Warm up the connection path with one small refused request.
    let e = ingest_raw(ch.clone(), None, vec![0; 16]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Reset the child's peak to its current RSS (Linux: "5" to clear_refs), so the peak
    // measured below is the attack's, not start-up's.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let (hwm0, rss0) = (status_kib(pid, "VmHWM:"), status_kib(pid, "VmRSS:"));

    let mut b = batch("c", 1, 0..1);
    // Just under the old 64 MiB gRPC limit, so the code before the fix decoded all of it.
    b.clicks[0].user_id = "u".repeat((64 << 20) - 1024);
    let body = b.encode_to_vec();
    assert!(body.len() > 63 << 20 && body.len() < 64 << 20);
    for key in [None, Some("wrong-ingest-key-000000")] {
        let e = ingest_raw(ch.clone(), key, body.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // The same 64 MiB with the key: refused by size from the frame header.
    let e = ingest_raw(ch.clone(), Some(INGEST), body)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let (hwm1, rss1) = (status_kib(pid, "VmHWM:"), status_kib(pid, "VmRSS:"));
    let peak_growth_kib = hwm1.saturating_sub(hwm0);
    println!(
        "aggregator child: VmHWM {hwm0} -> {hwm1} KiB (+{peak_growth_kib} KiB), VmRSS {rss0} -> {rss1} KiB, \
         after two unauthenticated and one authenticated-but-too-large 64 MiB Ingest"
    );
    drop(child.stdin.take());
    let _ = child.wait();
    assert!(
        peak_growth_kib < 10 << 10,
        "peak RSS grew by {peak_growth_kib} KiB"
    );
}
