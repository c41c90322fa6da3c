//! QUIC ingest tests over real UDP sockets on 127.0.0.1: the SDK's `QuicTransport` and a
//! raw quinn client on one side, the in-test gRPC aggregator on the other. Every expected
//! number is computed from what the test sent.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use adclick_collector::{Collector, CollectorConfig};
use adclick_proto::v1::{self, ClickBatch, ClickBatchResult};
use adclick_sdk::{Device, Dimensions, QuicTransport, Tracker};
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{eventually, keyring, now_ms, signer, write_keys};
use adclick_test_support::fake_aggregator::fake_aggregator;
use prost::Message;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::util::{POLL_LIMIT, id_of};

/// Bounds every network wait of these tests.
const WAIT: Duration = Duration::from_secs(10);

fn quic_config(dir: &Path, aggregators: Vec<String>) -> CollectorConfig {
    let mut c = config(dir, aggregators);
    c.listen_quic = Some("127.0.0.1:0".parse().unwrap());
    c
}

fn quic_tracker(col: &Collector) -> Tracker {
    let quic = QuicTransport::with_pem_roots(
        col.quic_addr().unwrap(),
        "localhost",
        &col.quic_cert_pem().unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    Tracker::builder(format!("quic://{}", col.quic_addr().unwrap()))
        .transport(Arc::new(quic))
        .batch_size(8)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap()
}

fn der_of(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect()
}

fn requests(col: &Collector, code: u16) -> u64 {
    let text = col.metrics().render();
    let key = format!("adclick_collector_requests_total{{route=\"quic\",code=\"{code}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// SDK over QUIC -> collector -> aggregator: valid clicks arrive once each; duplicates (in
/// and across batches) and forged clicks are counted and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_over_quic_clicks_are_verified_deduplicated_and_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let col = adclick_collector::start(quic_config(dir.path(), vec![agg.url()]))
        .await
        .unwrap();

    // No certificate configured: the dev certificate was generated into data_dir, with
    // a private key only the owner can read.
    let data = dir.path().join("data");
    let on_disk = std::fs::read_to_string(data.join("quic-dev-cert.pem")).unwrap();
    assert_eq!(der_of(&on_disk), der_of(&col.quic_cert_pem().unwrap()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("quic-dev-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Same key id as the collector's, different secret: a forgery.
    let forged = signer(&keyring(1, 99)).mint(&ad(1)).unwrap();
    let signer = signer(&ring);
    let valid: Vec<_> = (0..20).map(|i| signer.mint(&ad(i % 4)).unwrap()).collect();
    let tracker = quic_tracker(&col);
    let dims = Dimensions::new().country("US").device(Device::Desktop);
    let mut sent: u64 = 0;
    let mut duplicates = 0;
    for (i, m) in valid.iter().enumerate() {
        tracker.click(&m.token, dims.clone()).unwrap();
        sent += 1;
        if i % 5 == 0 {
            tracker.click(&m.token, dims.clone()).unwrap();
            sent += 1;
            duplicates += 1;
        }
    }
    for _ in 0..2 {
        tracker.click(&forged.token, dims.clone()).unwrap();
        sent += 1;
    }
    tracker.flush().await.unwrap();
    // A duplicate in a later batch, after the first copy is durable.
    tracker.click(&valid[7].token, dims.clone()).unwrap();
    duplicates += 1;
    tracker.flush().await.unwrap();
    let batches = sent.div_ceil(8) + 1;

    let applied = agg.wait_applied(valid.len()).await;
    let expected: HashSet<Vec<u8>> = valid.iter().map(id_of).collect();
    assert_eq!(applied.keys().cloned().collect::<HashSet<_>>(), expected);
    for m in &valid {
        let c = &applied[&id_of(m)];
        assert_eq!(c.ad_id, m.impression.ad_id);
        assert_eq!((c.country.as_str(), c.device), ("US", 1));
        assert_eq!(c.client_ip, vec![127, 0, 0, 1]);
    }
    let m = col.metrics();
    assert_eq!(m.clicks_with("accepted"), valid.len() as u64);
    assert_eq!(m.clicks_with("duplicate"), duplicates);
    assert_eq!(m.clicks_with("bad_signature"), 2);
    assert!(
        eventually(POLL_LIMIT, || m.forwarded_clicks.get()
            == valid.len() as u64)
        .await
    );
    {
        let state = agg.agg.state.lock().unwrap();
        let forwarded: usize = state.batches.iter().map(|b| b.clicks.len()).sum();
        assert_eq!(forwarded, valid.len());
    }
    let stats = tracker.stats();
    assert_eq!(stats.retries, 0, "{stats:?}");
    assert_eq!(requests(&col, 202), batches);
    assert!(
        m.render()
            .contains("adclick_collector_requests_total{route=\"quic\",code=\"202\"}")
    );
    tracker.shutdown().await.unwrap();
    col.shutdown().await;
    agg.stop().await;
}

fn raw_client_config(pem: &str, alpn: &[u8]) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()))
}

async fn raw_connect(
    addr: SocketAddr,
    pem: &str,
    alpn: &[u8],
) -> (
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
) {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = ep
        .connect_with(raw_client_config(pem, alpn), addr, "localhost")
        .unwrap();
    let conn = tokio::time::timeout(WAIT, connecting).await.unwrap();
    (ep, conn)
}

/// Writes `bytes` on a new stream (finishing it when `finish`), returns the reply.
async fn exchange(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> (u16, Vec<u8>) {
    tokio::time::timeout(WAIT, async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        if finish {
            send.finish().unwrap();
        }
        let mut head = [0u8; 6];
        recv.read_exact(&mut head).await.unwrap();
        let status = u16::from_be_bytes([head[0], head[1]]);
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.unwrap();
        // The server finishes its side after the reply.
        recv.read_to_end(0).await.unwrap();
        (status, body)
    })
    .await
    .expect("QUIC exchange timed out")
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn batch(tokens: &[&str]) -> Vec<u8> {
    let now = now_ms();
    ClickBatch {
        clicks: tokens
            .iter()
            .map(|t| v1::Click {
                token: (*t).into(),
                occurred_at_ms: now,
                sent_at_ms: now,
                ..Default::default()
            })
            .collect(),
        sent_at_ms: now,
        ..Default::default()
    }
    .encode_to_vec()
}

/// A raw client: an oversized length prefix is refused before any body byte is read,
/// garbage, trailing bytes and stalled streams get their own status, and the same
/// connection keeps working for a good batch afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_client_errors_get_status_replies_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let mut cfg = quic_config(dir.path(), vec![agg.url()]);
    cfg.limits.max_body_bytes = 4096;
    cfg.limits.max_clicks_per_batch = 5;
    cfg.limits.header_read_timeout_ms = 1_000;
    let col = adclick_collector::start(cfg).await.unwrap();
    let addr = col.quic_addr().unwrap();
    let pem = col.quic_cert_pem().unwrap();

    // The wrong ALPN never gets a connection.
    let (_ep, refused) = raw_connect(addr, &pem, b"h3").await;
    assert!(refused.is_err());

    let (_ep, conn) = raw_connect(addr, &pem, adclick_collector::quic::ALPN).await;
    let conn = conn.unwrap();

    // Only the length prefix, never the body, and the send side left open: a server that
    // tried to read the body would answer 408 after the read timeout instead.
    let (status, body) = exchange(&conn, &4097u32.to_be_bytes(), false).await;
    assert_eq!(status, 413);
    assert!(
        String::from_utf8(body).unwrap().contains("max_body_bytes"),
        "413 names the limit"
    );

    let (status, body) = exchange(&conn, &framed(&[0xff; 16]), true).await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("not a protobuf ClickBatch")
    );

    let six = batch(&["a"; 6]);
    let (status, body) = exchange(&conn, &framed(&six), true).await;
    assert_eq!(status, 413);
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("max_clicks_per_batch")
    );

    let mut trailing = framed(&batch(&["a"]));
    trailing.push(0);
    let (status, _) = exchange(&conn, &trailing, true).await;
    assert_eq!(status, 400);

    // The stream ends before the announced length.
    let (status, body) = exchange(&conn, &[0, 0, 0, 10, 1, 2, 3], true).await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("3 of the 10 bytes")
    );

    // Half a length prefix, then silence: 408 after the read timeout, not a stuck stream.
    let (status, _) = exchange(&conn, &[0, 0], false).await;
    assert_eq!(status, 408);

    let tok = signer(&ring).mint(&ad(3)).unwrap();
    let (status, body) = exchange(&conn, &framed(&batch(&[&tok.token, "AAAA"])), true).await;
    assert_eq!(status, 202);
    let result = ClickBatchResult::decode(body.as_slice()).unwrap();
    assert_eq!(result.accepted, 1);
    assert_eq!(result.rejected.get("malformed"), Some(&1));
    assert_eq!(agg.wait_applied(1).await.len(), 1);

    let m = col.metrics();
    assert_eq!(m.clicks_with("malformed_batch"), 1);
    assert_eq!(m.clicks_with("accepted"), 1);
    assert_eq!(
        [413, 400, 408, 202].map(|c| requests(&col, c)),
        [2, 3, 1, 1]
    );
    conn.close(0u32.into(), b"done");
    col.shutdown().await;
    agg.stop().await;
}

/// TLS from configured PEM files: the SDK trusting that certificate delivers; a client
/// trusting another certificate is refused at the handshake; no dev certificate is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_cert_and_key_files_serve_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    let mut cfg = quic_config(dir.path(), vec![agg.url()]);
    cfg.tls_cert_file = Some(cert_path);
    cfg.tls_key_file = Some(key_path);
    let col = adclick_collector::start(cfg).await.unwrap();
    let served = col.quic_cert_pem().unwrap();
    assert_eq!(der_of(&served), vec![ck.cert.der().to_vec()]);
    assert!(!dir.path().join("data/quic-dev-cert.pem").exists());

    // Trusting only some other certificate: the handshake fails, reported as a
    // (retryable) transport error.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let untrusting = QuicTransport::with_pem_roots(
        col.quic_addr().unwrap(),
        "localhost",
        &other.cert.pem(),
        Duration::from_secs(5),
    )
    .unwrap();
    let err = adclick_sdk::native::Transport::send(&untrusting, batch(&["a"]))
        .await
        .unwrap_err();
    assert!(err.0.contains("connect error"), "{err}");

    let signer = signer(&ring);
    let minted: Vec<_> = (0..3).map(|i| signer.mint(&ad(i)).unwrap()).collect();
    let tracker = quic_tracker(&col);
    for m in &minted {
        tracker.click(&m.token, Dimensions::new()).unwrap();
    }
    tracker.flush().await.unwrap();
    let applied = agg.wait_applied(minted.len()).await;
    assert_eq!(
        applied.keys().cloned().collect::<HashSet<_>>(),
        minted.iter().map(id_of).collect::<HashSet<_>>()
    );
    assert_eq!(col.metrics().clicks_with("accepted"), 3);
    assert_eq!(requests(&col, 202), 1);
    tracker.shutdown().await.unwrap();
    col.shutdown().await;
    agg.stop().await;
}

/// The SDK keeps one connection and reconnects after losing it: a collector restarted on
/// the same data_dir and port reuses its dev certificate, so the same transport delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_reconnects_after_a_collector_restart_with_the_same_dev_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = fake_aggregator().await;
    let col = adclick_collector::start(quic_config(dir.path(), vec![agg.url()]))
        .await
        .unwrap();
    let addr = col.quic_addr().unwrap();
    let pem = col.quic_cert_pem().unwrap();
    let tracker = quic_tracker(&col);
    let signer = signer(&ring);
    let first = signer.mint(&ad(1)).unwrap();
    tracker.click(&first.token, Dimensions::new()).unwrap();
    tracker.flush().await.unwrap();
    assert_eq!(agg.wait_applied(1).await.len(), 1);
    col.shutdown().await;

    let mut cfg = quic_config(dir.path(), vec![agg.url()]);
    cfg.listen_quic = Some(addr);
    // The old endpoint's UDP socket can take a moment to be released after shutdown.
    let mut attempts = 0;
    let col = loop {
        match adclick_collector::start(cfg.clone()).await {
            Ok(c) => break c,
            Err(e) if attempts < 40 => {
                attempts += 1;
                eprintln!("restart attempt {attempts}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("restart failed: {e}"),
        }
    };
    assert_eq!(col.quic_cert_pem().unwrap(), pem, "dev certificate reused");
    let second = signer.mint(&ad(2)).unwrap();
    tracker.click(&second.token, Dimensions::new()).unwrap();
    tracker.flush().await.unwrap();
    let applied = agg.wait_applied(2).await;
    assert!(applied.contains_key(&id_of(&first)) && applied.contains_key(&id_of(&second)));
    tracker.shutdown().await.unwrap();
    col.shutdown().await;
    agg.stop().await;
}
