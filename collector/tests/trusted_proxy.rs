//! The client address the collector forwards (`IngestClick.client_ip`, what the
//! aggregator's per-IP rules count by), behind `trusted_proxies` (issue 16, item 6): a
//! peer in the list names the client in `X-Forwarded-For` / `Forwarded` (the rightmost hop
//! that is not itself trusted); any other peer is the client, whatever it sends. Distinct
//! clients are distinct 127.0.0.x source addresses (loopback is not exempt: 127.0.0.2 is
//! as untrusted as any stranger). Read back from a real nats-server stream, as in
//! `user_agent`; expected addresses are written by hand per request.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use adclick_collector::config::SinkKind;
use adclick_proto::v1::{ClickBatch, IngestBatch};
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{eventually, keyring, signer, within, write_keys};
use adclick_test_support::nats::{NatsCluster, read_stream};
use prost::Message;

use crate::util::{POLL_LIMIT, click, id_of};

/// (source address, forwarding header and value, the client the collector must forward)
type Case = ([u8; 4], Option<(&'static str, &'static str)>, IpAddr);

fn from(local: [u8; 4]) -> reqwest::Client {
    adclick_sdk::HttpTransport::install_crypto_provider();
    reqwest::Client::builder()
        .local_address(IpAddr::from(local))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_client_ip_follows_trusted_proxies() {
    within(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = NatsCluster::start(&dir.path().join("nats"), 1).await;
        let ring = keyring(1, 1);
        write_keys(&dir.path().join("keys.toml"), &ring);
        let mut cfg = config(dir.path(), Vec::new());
        cfg.forward.sink = SinkKind::Jetstream;
        cfg.forward.jetstream.servers = cluster.urls();
        cfg.forward.jetstream.partitions = 1;
        cfg.forward.jetstream.replicas = 1;
        cfg.forward.jetstream.max_bytes = 64 << 20;
        cfg.limits.rate_limit_per_ip = 0.0;
        // The load balancer is 127.0.0.1 (and a second tier in 10.0.0.0/8).
        cfg.trusted_proxies = vec!["127.0.0.1/32".into(), "10.0.0.0/8".into()];
        let col = adclick_collector::start(cfg).await.unwrap();
        let s = signer(&ring);
        let mut n_ad = 0u64;
        let mut mint = || {
            n_ad += 1;
            s.mint(&ad(n_ad)).unwrap()
        };
        let url = format!("http://{}/v1/clicks", col.http_addr());
        let mut want: BTreeMap<Vec<u8>, IpAddr> = BTreeMap::new();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();

        let cases: [Case; 8] = [
            // The trusted proxy names the client.
            (
                [127, 0, 0, 1],
                Some(("x-forwarded-for", "198.51.100.1")),
                ip("198.51.100.1"),
            ),
            // A client-forged leftmost hop is ignored: the rightmost untrusted one counts.
            (
                [127, 0, 0, 1],
                Some(("x-forwarded-for", "6.6.6.6, 198.51.100.2")),
                ip("198.51.100.2"),
            ),
            // Trusted hops on the right are skipped (a second proxy tier).
            (
                [127, 0, 0, 1],
                Some(("x-forwarded-for", "198.51.100.3, 10.1.2.3")),
                ip("198.51.100.3"),
            ),
            // RFC 7239 Forwarded, IPv6 with a port.
            (
                [127, 0, 0, 1],
                Some(("forwarded", "for=\"[2001:db8::5]:443\";proto=https")),
                ip("2001:db8::5"),
            ),
            // The proxy without a header: the proxy is all we know.
            ([127, 0, 0, 1], None, ip("127.0.0.1")),
            // An untrusted peer's headers are ignored: its socket address is the client.
            (
                [127, 0, 0, 2],
                Some(("x-forwarded-for", "198.51.100.4")),
                ip("127.0.0.2"),
            ),
            (
                [127, 0, 0, 3],
                Some(("forwarded", "for=198.51.100.5")),
                ip("127.0.0.3"),
            ),
            ([127, 0, 0, 4], None, ip("127.0.0.4")),
        ];
        for (local, header, client) in cases {
            let m = mint();
            let body = ClickBatch {
                clicks: vec![click(&m.token)],
                ..Default::default()
            };
            let mut req = from(local)
                .post(&url)
                .header("content-type", "application/x-protobuf")
                .body(body.encode_to_vec());
            if let Some((h, v)) = header {
                req = req.header(h, v);
            }
            assert_eq!(
                req.send().await.unwrap().status(),
                202,
                "{local:?} {header:?}"
            );
            want.insert(id_of(&m), client);
        }
        // Redirects take the client the same way.
        for (local, client) in [
            ([127, 0, 0, 1], ip("198.51.100.6")),
            ([127, 0, 0, 5], ip("127.0.0.5")),
        ] {
            let m = mint();
            let r = from(local)
                .get(format!("http://{}/c/{}", col.http_addr(), m.token))
                .header("x-forwarded-for", "198.51.100.6")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 302);
            want.insert(id_of(&m), client);
        }

        let total = want.len() as u64;
        assert!(
            eventually(POLL_LIMIT, || col.metrics().forwarded_clicks.get() == total).await,
            "forwarded {} of {total}",
            col.metrics().forwarded_clicks.get()
        );
        let client = cluster.client().await;
        let mut got = BTreeMap::new();
        for m in read_stream(&client, "CLICKS").await {
            for c in IngestBatch::decode(m.payload.as_slice()).unwrap().clicks {
                let a = match c.client_ip.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(c.client_ip.as_slice()).unwrap()),
                    16 => IpAddr::from(<[u8; 16]>::try_from(c.client_ip.as_slice()).unwrap()),
                    n => panic!("client_ip of {n} bytes"),
                };
                assert!(got.insert(c.impression_id, a).is_none(), "a click twice");
            }
        }
        assert_eq!(got, want);
        col.shutdown().await;
    })
    .await;
}
