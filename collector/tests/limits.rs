//! Limits an ordinary client meets: the per-IP rate limit's 429 with Retry-After, the
//! header-read timeout and the connection cap. (Hostile clients: `hardening`.)

use std::time::Duration;

use adclick_collector::Collector;
use adclick_proto::v1::ClickBatch;
use adclick_test_support::collector::config;
use adclick_test_support::common::{eventually, keyring, write_keys};

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_rate_limit_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    write_keys(&dir.path().join("keys.toml"), &keyring(1, 1));
    let mut cfg = config(dir.path(), vec!["http://127.0.0.1:1".into()]);
    cfg.limits.rate_limit_per_ip = 0.5;
    cfg.limits.rate_limit_burst = 2.0;
    let col = adclick_collector::start(cfg).await.unwrap();
    let c = http();
    let empty = ClickBatch::default();
    let codes: Vec<u16> = futures_codes(&c, &col, &empty, 3).await;
    assert_eq!(codes, [202, 202, 429]);
    let r = post_proto(&c, &col, &empty).await;
    // One click's worth at 0.5 clicks/s: 2 s.
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(col.metrics().rate_limited.get(), 2);
    col.shutdown().await;
}

async fn futures_codes(c: &reqwest::Client, col: &Collector, b: &ClickBatch, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(post_proto(c, col, b).await.status().as_u16());
    }
    out
}

/// A client that never finishes its request headers is cut off after the timeout, and
/// connections beyond `max_connections` are closed at once instead of being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    write_keys(&dir.path().join("keys.toml"), &keyring(1, 1));
    let mut cfg = config(dir.path(), vec!["http://127.0.0.1:1".into()]);
    cfg.limits.header_read_timeout_ms = 300;
    cfg.limits.max_connections = 1;
    let col = adclick_collector::start(cfg).await.unwrap();

    let mut slow = tokio::net::TcpStream::connect(col.http_addr())
        .await
        .unwrap();
    slow.write_all(b"POST /v1/clicks HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // While the slow client holds the only connection slot, another client is refused.
    assert!(
        eventually(POLL_LIMIT, || col
            .metrics()
            .render()
            .contains("connections_open{listener=\"http\"} 1"))
        .await
    );
    let refused = http()
        .get(format!("http://{}/healthz", col.http_addr()))
        .send()
        .await;
    assert!(refused.is_err(), "over the cap: closed at accept");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        n == 0 || reply.starts_with("HTTP/1.1 408"),
        "slow client was cut off: {reply:?}"
    );
    // The slot is free again.
    assert!(
        eventually(POLL_LIMIT, || col
            .metrics()
            .render()
            .contains("connections_open{listener=\"http\"} 0"))
        .await
    );
    let r = http()
        .get(format!("http://{}/healthz", col.http_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    col.shutdown().await;
}
