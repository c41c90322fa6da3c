//! The collector's edge under hostile or broken clients (issue 11): idle and slow
//! connections are closed, connection caps refuse the excess at accept, bodies are bounded
//! before they are decoded, the per-IP click rate limit covers batches and redirects
//! (behind trusted proxies only), and readiness says why the node cannot take writes and
//! comes back by itself once the disk does.
//!
//! Every test starts the real collector on 127.0.0.1:0. Time bounds are generous ("closed
//! eventually, within 10x the configured timeout"); nothing here measures speed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use adclick_collector::{Collector, CollectorConfig};
use adclick_proto::v1::ClickBatch;
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{
    connect_from, eventually, free_addr, h2_get_then_idle_close, keyring, signer, write_keys,
};
use adclick_test_support::fake_aggregator::{FakeAggregator, fake_aggregator_on};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{POLL_LIMIT, click};

fn http() -> reqwest::Client {
    adclick_sdk::HttpTransport::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, col: &Collector, body: Vec<u8>) -> reqwest::Response {
    c.post(format!("http://{}/v1/clicks", col.http_addr()))
        .header("content-type", "application/x-protobuf")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Reads until the server closes the connection; the bytes it sent first. Panics if it
/// is still open after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut buf)).await {
        Ok(_) => buf,
        Err(_) => panic!(
            "connection still open after {within:?} (got {:?})",
            String::from_utf8_lossy(&buf)
        ),
    }
}

fn metric(col: &Collector, line_prefix: &str) -> u64 {
    col.metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

fn base(dir: &std::path::Path) -> CollectorConfig {
    write_keys(&dir.join("keys.toml"), &keyring(1, 1));
    config(dir, vec!["http://127.0.0.1:1".into()])
}

/// A silent connection, an h2c connection that only sends its preface, a body that stalls
/// after 2 bytes, and an idle HTTP/1.1 keep-alive connection are all closed, within 10x
/// the configured timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.limits.header_read_timeout_ms = 300;
    cfg.limits.body_read_timeout_ms = 300;
    cfg.limits.idle_timeout_ms = 300;
    let col = adclick_collector::start(cfg).await.unwrap();
    let addr = col.http_addr();
    let bound = Duration::from_secs(3);

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut preface = TcpStream::connect(addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/clicks HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 100\r\n\r\nab",
        )
        .await
        .unwrap();
    let mut keep_alive = TcpStream::connect(addr).await.unwrap();
    keep_alive
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    closed_within(&mut silent, bound).await;
    // The h2 server may answer the preface with SETTINGS/GOAWAY before it closes.
    closed_within(&mut preface, bound).await;
    let reply = String::from_utf8_lossy(&closed_within(&mut stalled, bound).await).to_string();
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "stalled body: {reply:?}"
    );
    let reply = String::from_utf8_lossy(&closed_within(&mut keep_alive, bound).await).to_string();
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "served, then closed: {reply:?}"
    );

    assert!(
        metric(
            &col,
            "adclick_collector_connections_closed_total{listener=\"http\",reason=\"header_timeout\"} "
        ) >= 2
    );
    // HTTP/2 after a request: no stream open for the idle timeout closes it (HTTP/1.1
    // keep-alive above may be closed by hyper's own header timer first).
    let h2 = http();
    let h2 = {
        let _ = h2;
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap()
    };
    let r = h2.get(format!("http://{addr}/livez")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert!(
        eventually(POLL_LIMIT, || metric(
            &col,
            "adclick_collector_connections_closed_total{listener=\"http\",reason=\"idle_timeout\"} "
        ) >= 1)
        .await
    );
    assert_eq!(
        metric(
            &col,
            "adclick_collector_requests_total{route=\"clicks\",code=\"408\"} "
        ),
        1
    );
    // Nothing is left open.
    assert!(
        eventually(POLL_LIMIT, || metric(
            &col,
            "adclick_collector_connections_open{listener=\"http\"} "
        ) == 0)
        .await
    );
    col.shutdown().await;
}

/// An idle HTTP/2 connection is closed with a GOAWAY, then the close: an SDK that sent a
/// batch before it saw the GOAWAY still gets its answer (hyper's two-step GOAWAY), where a
/// bare close would fail that request. Seen from a bare HTTP/2 client: its connection ends
/// cleanly, not with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_with_a_goaway() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.limits.idle_timeout_ms = 300;
    let col = adclick_collector::start(cfg).await.unwrap();
    // Within 10x the idle timeout (the first request's deadline, 5 s, must not hold it).
    let (status, ended) =
        h2_get_then_idle_close(col.http_addr(), "/livez", Duration::from_secs(3)).await;
    assert_eq!(status, 200);
    assert!(
        ended.is_ok(),
        "the idle connection was cut without a GOAWAY: {ended:?}"
    );
    assert_eq!(
        metric(
            &col,
            "adclick_collector_connections_closed_total{listener=\"http\",reason=\"idle_timeout\"} "
        ),
        1
    );
    col.shutdown().await;
}

/// Beyond `max_connections_per_ip` (per peer address) and `max_connections` (per
/// listener), new connections are closed at once, and counted; other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_the_excess_at_accept() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.limits.max_connections = 3;
    cfg.limits.max_connections_per_ip = 2;
    // The held connections send nothing: keep the header timeout far beyond the test's
    // length, so a slow, loaded machine does not free their slots half-way through.
    cfg.limits.header_read_timeout_ms = 600_000;
    cfg.limits.idle_timeout_ms = 600_000;
    let col = adclick_collector::start(cfg).await.unwrap();
    let addr = col.http_addr();

    let _a1 = connect_from([127, 0, 0, 2], addr).await;
    let _a2 = connect_from([127, 0, 0, 2], addr).await;
    // Both are held (idle, before the header timeout); the third from .2 is refused.
    let mut a3 = connect_from([127, 0, 0, 2], addr).await;
    assert_eq!(closed_within(&mut a3, Duration::from_secs(3)).await, b"");
    // Another address gets the last listener slot and is served.
    let mut b1 = connect_from([127, 0, 0, 3], addr).await;
    b1.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let reply = closed_within(&mut b1, Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));
    // While .2 holds two slots and .4 one, the listener is full for everyone.
    let _c1 = connect_from([127, 0, 0, 4], addr).await;
    assert!(
        eventually(POLL_LIMIT, || col
            .metrics()
            .render()
            .contains("connections_open{listener=\"http\"} 3"))
        .await
    );
    let mut d1 = connect_from([127, 0, 0, 5], addr).await;
    assert_eq!(closed_within(&mut d1, Duration::from_secs(3)).await, b"");

    assert_eq!(
        metric(
            &col,
            "adclick_collector_connections_refused_total{listener=\"http\",reason=\"per_ip_cap\"} "
        ),
        1
    );
    assert_eq!(
        metric(
            &col,
            "adclick_collector_connections_refused_total{listener=\"http\",reason=\"listener_cap\"} "
        ),
        1
    );
    col.shutdown().await;
}

/// Defaults: every timeout and cap is on, in seconds, and the rate limit is on.
#[test]
fn limits_are_on_by_default() {
    let l = CollectorConfig::default().limits;
    for ms in [
        l.header_read_timeout_ms,
        l.body_read_timeout_ms,
        l.idle_timeout_ms,
        l.quic_idle_timeout_ms,
    ] {
        assert!((1_000..=30_000).contains(&ms), "{ms} ms");
    }
    assert!(l.max_connections_per_ip < l.max_connections);
    assert!(l.max_streams_per_connection <= 256);
    assert!(l.rate_limit_per_ip >= 100.0 && l.rate_limit_burst >= l.max_clicks_per_batch as f64);
    assert!(l.max_inflight_body_bytes >= l.max_body_bytes);
}

/// A 1 MiB protobuf of empty clicks, or a JSON batch one click over the limit, is refused
/// with 413 after counting max+1 clicks on the wire, before the batch is materialised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_limits_hold_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let col = adclick_collector::start(base(dir.path())).await.unwrap();
    let c = http();
    // Field 4 (clicks), length 0: 2 bytes per click; 1 MiB.
    let flood = [0x22u8, 0x00].repeat(1 << 19);
    let r = post(&c, &col, flood).await;
    assert_eq!(r.status(), 413);
    let msg = r.text().await.unwrap();
    assert!(
        msg.contains("more than the 1000 clicks allowed") && msg.contains("found at least 1001"),
        "{msg}"
    );
    let json = format!(
        r#"{{"clicks":[{}]}}"#,
        vec![r#"{"token":""}"#; 1001].join(",")
    );
    let r = c
        .post(format!("http://{}/v1/clicks", col.http_addr()))
        .header("content-type", "application/json")
        .body(json)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("found at least 1001"));
    col.shutdown().await;
}

/// Request bodies in flight share one byte budget: while a stalled upload holds it, the
/// next body gets 503 + Retry-After instead of buffering more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_bodies_share_a_bounded_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.limits.max_body_bytes = 4096;
    cfg.limits.max_inflight_body_bytes = 4096;
    cfg.limits.body_read_timeout_ms = 1_000;
    let col = adclick_collector::start(cfg).await.unwrap();
    let mut stalled = TcpStream::connect(col.http_addr()).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/clicks HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 4000\r\n\r\nab",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = post(&http(), &col, ClickBatch::default().encode_to_vec()).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(r.text().await.unwrap().contains("max_inflight_body_bytes"));
    // Once the stalled body timed out (408), the budget is back.
    closed_within(&mut stalled, Duration::from_secs(10)).await;
    let r = post(&http(), &col, ClickBatch::default().encode_to_vec()).await;
    assert_eq!(r.status(), 202);
    col.shutdown().await;
}

/// One address cannot hold the whole body budget with bodies it announces and never
/// sends: its share (`limits.max_inflight_body_bytes_per_ip`) runs out first, and a client
/// at another address still gets its 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_the_whole_body_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.limits.max_body_bytes = 4096;
    cfg.limits.max_inflight_body_bytes = 64 << 10;
    cfg.limits.max_inflight_body_bytes_per_ip = 8192;
    cfg.limits.body_read_timeout_ms = 5_000;
    let col = adclick_collector::start(cfg).await.unwrap();
    // 127.0.0.1 announces two 4,000-byte bodies and sends 2 bytes of each: its share.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(col.http_addr()).await.unwrap();
        s.write_all(
            b"POST /v1/clicks HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 4000\r\n\r\nab",
        )
        .await
        .unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third body from the same address is refused at once...
    let r = post(&http(), &col, ClickBatch::default().encode_to_vec()).await;
    assert_eq!(r.status(), 503);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("max_inflight_body_bytes_per_ip")
    );
    // ...while another address is served (most of the global budget is free).
    adclick_sdk::HttpTransport::install_crypto_provider();
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = other
        .post(format!("http://{}/v1/clicks", col.http_addr()))
        .header("content-type", "application/x-protobuf")
        .body(ClickBatch::default().encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    drop(stalled);
    col.shutdown().await;
}

/// The per-IP limit counts clicks: a batch costs its clicks, a redirect one; refusals are
/// 429 with Retry-After and counted as `rate_limited` clicks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_rate_limit_covers_batches_and_redirects() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    let mut cfg = base(dir.path());
    write_keys(&dir.path().join("keys.toml"), &ring);
    // Refill is negligible during the test: 1 click per 100 s.
    cfg.limits.rate_limit_per_ip = 0.01;
    cfg.limits.rate_limit_burst = 5.0;
    let col = adclick_collector::start(cfg).await.unwrap();
    adclick_sdk::HttpTransport::install_crypto_provider();
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let s = signer(&ring);
    let batch = |n: u64| ClickBatch {
        clicks: (0..n)
            .map(|i| click(&s.mint(&ad(i)).unwrap().token))
            .collect(),
        ..Default::default()
    };
    // 3 of 5 tokens.
    assert_eq!(post(&c, &col, batch(3).encode_to_vec()).await.status(), 202);
    // 4 clicks do not fit the 2 left: 429, nothing taken but the admission click.
    let r = post(&c, &col, batch(4).encode_to_vec()).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    // One token left: one redirect passes, the next is limited.
    let token = s.mint(&ad(9)).unwrap().token;
    let url = format!("http://{}/c/{token}", col.http_addr());
    assert_eq!(c.get(&url).send().await.unwrap().status(), 302);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));

    assert_eq!(col.metrics().clicks_with("rate_limited"), 4 + 1);
    assert_eq!(col.metrics().rate_limited.get(), 2);
    col.shutdown().await;
}

/// `Forwarded` / `X-Forwarded-For` choose the rate-limit bucket only when the peer is a
/// trusted proxy; anyone else's headers are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.trusted_proxies = vec!["127.0.0.1/32".into()];
    cfg.limits.rate_limit_per_ip = 0.01;
    cfg.limits.rate_limit_burst = 1.0;
    let col = adclick_collector::start(cfg).await.unwrap();
    let empty = ClickBatch::default().encode_to_vec();
    let via = |local: [u8; 4]| {
        adclick_sdk::HttpTransport::install_crypto_provider();
        reqwest::Client::builder()
            .local_address(IpAddr::from(local))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let send = |c: reqwest::Client, h: &'static str, v: &'static str| {
        let url = format!("http://{}/v1/clicks", col.http_addr());
        let body = empty.clone();
        async move {
            c.post(url)
                .header("content-type", "application/x-protobuf")
                .header(h, v)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let proxy = via([127, 0, 0, 1]);
    assert_eq!(
        send(proxy.clone(), "x-forwarded-for", "198.51.100.1").await,
        202
    );
    assert_eq!(
        send(proxy.clone(), "x-forwarded-for", "198.51.100.1").await,
        429
    );
    // A forged leftmost hop does not help: the rightmost untrusted one is the client.
    assert_eq!(
        send(
            proxy.clone(),
            "x-forwarded-for",
            "198.51.100.9, 198.51.100.1"
        )
        .await,
        429
    );
    assert_eq!(
        send(proxy.clone(), "forwarded", "for=\"198.51.100.2:1234\"").await,
        202
    );
    // An untrusted peer's headers are ignored: its own address is the bucket.
    let other = via([127, 0, 0, 2]);
    assert_eq!(
        send(other.clone(), "x-forwarded-for", "198.51.100.3").await,
        202
    );
    assert_eq!(
        send(other.clone(), "x-forwarded-for", "198.51.100.4").await,
        429
    );
    col.shutdown().await;
}

/// `/livez` is 200 while the process serves; `/readyz` (and `/healthz`) say in JSON why
/// the node cannot take writes: here the spool is full while the aggregator is down, and
/// it is ready again once the aggregator drained it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_a_full_spool_and_clears_when_it_drains() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_addr = free_addr();
    let mut cfg = config(dir.path(), vec![format!("http://{agg_addr}")]);
    cfg.spool.segment_bytes = 4096;
    cfg.spool.max_bytes = 8192;
    let col = adclick_collector::start(cfg).await.unwrap();
    let c = http();
    let get = |path: &'static str| {
        let c = c.clone();
        let url = format!("http://{}{path}", col.http_addr());
        async move {
            let r = c.get(url).send().await.unwrap();
            let code = r.status().as_u16();
            (code, r.text().await.unwrap())
        }
    };
    assert_eq!(
        get("/readyz").await,
        (200, r#"{"ready":true,"reasons":[]}"#.into())
    );
    let s = signer(&ring);
    let mut full = false;
    for _ in 0..40 {
        let batch = ClickBatch {
            clicks: (0..10)
                .map(|i| click(&s.mint(&ad(i)).unwrap().token))
                .collect(),
            ..Default::default()
        };
        if post(&c, &col, batch.encode_to_vec()).await.status() == 503 {
            full = true;
            break;
        }
    }
    assert!(full, "the 8 KiB spool filled up");
    let not_ready = (
        503,
        r#"{"ready":false,"reasons":["spool_full"]}"#.to_string(),
    );
    assert_eq!(get("/readyz").await, not_ready);
    assert_eq!(get("/healthz").await, not_ready);
    assert_eq!(get("/livez").await, (200, "ok\n".into()));

    let agg = fake_aggregator_on(agg_addr, FakeAggregator::default()).await;
    let mut ready = false;
    for _ in 0..200 {
        if get("/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "ready again once the forwarder drained the spool");
    col.shutdown().await;
    agg.stop().await;
}

/// Unmounts (lazily) when dropped, so a failing test leaves no mount behind.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Mounts a tmpfs of `size` (e.g. "512k") at `dir/mnt`: a real filesystem that fills.
/// CI runs as root (see .ci/run); a machine that cannot mount fails here rather than
/// passing without exercising the disk-full paths.
fn mount_tmpfs(dir: &std::path::Path, size: &str) -> (std::path::PathBuf, Unmount) {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "cannot mount a tmpfs at {} (needs root): this test fills a real filesystem",
        mnt.display()
    );
    (mnt.clone(), Unmount(mnt))
}

/// Disk full for real (a 512 KiB tmpfs): the write fails, readiness says `spool_failed`,
/// and after space returns the collector reopens its spool and takes clicks again without
/// a restart; everything acked before and after is forwarded. Needs root for the mount
/// (CI has it); fails where `mount -t tmpfs` is not allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_by_itself_after_the_disk_fills_and_frees() {
    let dir = tempfile::tempdir().unwrap();
    let (mnt, _unmount) = mount_tmpfs(dir.path(), "512k");

    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_addr = free_addr();
    let mut cfg = config(dir.path(), vec![format!("http://{agg_addr}")]);
    cfg.data_dir = mnt.join("data");
    cfg.spool.segment_bytes = 16 << 10;
    // No free-space floor: this is the path where the disk fills anyway (another process
    // took the space between the check and the write); the floor has its own test below.
    cfg.spool.min_free_bytes = 0;
    let col = adclick_collector::start(cfg).await.unwrap();
    // Fill most of the filesystem with a file we can delete later.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    use std::io::Write as _;
    let chunk = vec![7u8; 4096];
    while f.write_all(&chunk).is_ok() && f.sync_all().is_ok() {}
    drop(f);

    let c = http();
    let s = signer(&ring);
    let readyz = || {
        let c = c.clone();
        let url = format!("http://{}/readyz", col.http_addr());
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let mut accepted = std::collections::HashSet::new();
    let mut failed = false;
    for round in 0..200u64 {
        let minted: Vec<_> = (0..10)
            .map(|i| s.mint(&ad(round * 10 + i)).unwrap())
            .collect();
        let batch = ClickBatch {
            clicks: minted.iter().map(|m| click(&m.token)).collect(),
            ..Default::default()
        };
        let r = post(&c, &col, batch.encode_to_vec()).await;
        if r.status() == 503 {
            let msg = r.text().await.unwrap();
            assert!(msg.contains("disk"), "{msg}");
            failed = true;
            break;
        }
        assert_eq!(r.status(), 202);
        accepted.extend(minted.iter().map(|m| m.impression.impression_id.to_vec()));
    }
    assert!(failed, "the full filesystem failed a spool write");
    let (code, body) = readyz().await;
    assert_eq!(
        (code, body.as_str()),
        (503, r#"{"ready":false,"reasons":["spool_failed"]}"#)
    );

    std::fs::remove_file(&filler).unwrap();
    let mut ready = false;
    for _ in 0..300 {
        if readyz().await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "ready again after space returned, without a restart");
    assert!(
        metric(
            &col,
            "adclick_collector_spool_reopens_total{result=\"ok\"} "
        ) >= 1
    );
    let minted: Vec<_> = (0..5).map(|i| s.mint(&ad(5000 + i)).unwrap()).collect();
    let batch = ClickBatch {
        clicks: minted.iter().map(|m| click(&m.token)).collect(),
        ..Default::default()
    };
    assert_eq!(post(&c, &col, batch.encode_to_vec()).await.status(), 202);
    accepted.extend(minted.iter().map(|m| m.impression.impression_id.to_vec()));

    // Everything acked, before and after the failure, reaches the aggregator.
    let agg = fake_aggregator_on(agg_addr, FakeAggregator::default()).await;
    let applied = agg.wait_applied(accepted.len()).await;
    assert_eq!(
        applied
            .keys()
            .cloned()
            .collect::<std::collections::HashSet<_>>(),
        accepted
    );
    col.shutdown().await;
    agg.stop().await;
}

/// The free-space floor (`spool.min_free_bytes`) on a real 4 MiB tmpfs: with the aggregator
/// down, clicks are acked until the spool would leave less than the floor free; then 503 +
/// Retry-After and readiness `disk_low`, and the filesystem never fills (no failed write).
/// Once the aggregator is back and the forwarder's acks delete segments, readiness returns
/// and clicks are taken again; every acked click is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_stops_at_its_free_space_floor_before_the_disk_fills() {
    let dir = tempfile::tempdir().unwrap();
    let (mnt, _unmount) = mount_tmpfs(dir.path(), "4m");
    let floor: u64 = 2 << 20;

    let ring = keyring(1, 1);
    write_keys(&dir.path().join("keys.toml"), &ring);
    let agg_addr = free_addr();
    let mut cfg = config(dir.path(), vec![format!("http://{agg_addr}")]);
    cfg.data_dir = mnt.join("data");
    cfg.spool.segment_bytes = 64 << 10;
    cfg.spool.min_free_bytes = floor;
    // Thousands of clicks from 127.0.0.1 in a moment: not what the rate limit is for here.
    cfg.limits.rate_limit_per_ip = 0.0;
    let col = adclick_collector::start(cfg).await.unwrap();
    let c = http();
    let s = signer(&ring);
    let readyz = || {
        let c = c.clone();
        let url = format!("http://{}/readyz", col.http_addr());
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let free = || adclick_collector::spool::free_bytes(&mnt).unwrap();
    let mut accepted = std::collections::HashSet::new();
    let mut refused = false;
    for round in 0..2_000u64 {
        let minted: Vec<_> = (0..20)
            .map(|i| s.mint(&ad(round * 20 + i)).unwrap())
            .collect();
        let batch = ClickBatch {
            clicks: minted.iter().map(|m| click(&m.token)).collect(),
            ..Default::default()
        };
        let r = post(&c, &col, batch.encode_to_vec()).await;
        if r.status() == 503 {
            assert!(r.headers().contains_key("retry-after"));
            let msg = r.text().await.unwrap();
            assert!(msg.contains("disk almost full"), "{msg}");
            refused = true;
            break;
        }
        assert_eq!(r.status(), 202);
        accepted.extend(minted.iter().map(|m| m.impression.impression_id.to_vec()));
    }
    assert!(refused, "the floor was reached");
    assert!(!accepted.is_empty());
    // Refused before the filesystem filled: the floor (less one record) is still free.
    assert!(
        free() + (64 << 10) >= floor,
        "free {} below the floor",
        free()
    );
    assert_eq!(
        readyz().await,
        (503, r#"{"ready":false,"reasons":["disk_low"]}"#.to_string())
    );

    // The aggregator comes back: acks delete segments, space returns, ingest resumes.
    let agg = fake_aggregator_on(agg_addr, FakeAggregator::default()).await;
    let mut ready = false;
    for _ in 0..400 {
        if readyz().await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "ready again once the forwarder freed space");
    let minted: Vec<_> = (0..5).map(|i| s.mint(&ad(90_000 + i)).unwrap()).collect();
    let batch = ClickBatch {
        clicks: minted.iter().map(|m| click(&m.token)).collect(),
        ..Default::default()
    };
    assert_eq!(post(&c, &col, batch.encode_to_vec()).await.status(), 202);
    accepted.extend(minted.iter().map(|m| m.impression.impression_id.to_vec()));
    let applied = agg.wait_applied(accepted.len()).await;
    assert_eq!(
        applied
            .keys()
            .cloned()
            .collect::<std::collections::HashSet<_>>(),
        accepted
    );
    assert_eq!(
        metric(
            &col,
            "adclick_collector_spool_reopens_total{result=\"ok\"} "
        ),
        0
    );
    col.shutdown().await;
    agg.stop().await;
}

/// A QUIC connection that sends nothing is closed after `limits.quic_idle_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_quic_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.listen_quic = Some("127.0.0.1:0".parse().unwrap());
    cfg.limits.quic_idle_timeout_ms = 300;
    let col = adclick_collector::start(cfg).await.unwrap();
    let pem = col.quic_cert_pem().unwrap();
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![adclick_collector::quic::ALPN.to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        ep.connect_with(client, col.quic_addr().unwrap(), "localhost")
            .unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(3), conn.closed())
        .await
        .expect("idle QUIC connection closed within 10x the idle timeout");
    assert!(matches!(why, quinn::ConnectionError::TimedOut), "{why:?}");
    col.shutdown().await;
}

/// The shipped `config/collector.toml` parses, is valid, and documents exactly the default
/// limits (so "the shipped config" and "the defaults" are the same thing).
#[test]
fn shipped_config_has_the_default_limits() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/collector.toml"
    ))
    .unwrap();
    let c: CollectorConfig = toml::from_str(&text).unwrap();
    c.validate().unwrap();
    assert_eq!(
        format!("{:?}", c.limits),
        format!("{:?}", CollectorConfig::default().limits)
    );
    assert!(c.trusted_proxies.is_empty());
    assert!(c.source.file.is_empty());
    assert_eq!(
        format!("{:?}", c.user_agent),
        format!("{:?}", CollectorConfig::default().user_agent)
    );
    // A bot list that is not a file is refused by validation (`--check`), naming the key.
    let mut bad = c.clone();
    bad.user_agent.bot_list = "/nonexistent/bots.json".into();
    let e = bad.validate().unwrap_err().to_string();
    assert!(
        e.contains("user_agent.bot_list") && e.contains("/nonexistent/bots.json"),
        "{e}"
    );
    bad.user_agent.classify = false;
    bad.validate().unwrap();
    // The commented `[[source.file]]` example, uncommented, is a valid source.
    let start = text.find("# [[source.file]]").unwrap();
    let example: String = text[start..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let c: CollectorConfig = toml::from_str(&format!("{text}\n{example}")).unwrap();
    c.validate().unwrap();
    assert_eq!(c.source.file.len(), 1);
    assert_eq!(c.source.file[0].name, "adserver");
    assert_eq!(c.source.file[0].paths, ["/var/log/adserver/clicks.log*"]);
}
