//! User-Agent classification end to end (issue 16): clicks reach the collector over every
//! path that has a User-Agent — the native SDK, a protobuf batch over HTTP/1.1 and h2c, a
//! JSON batch, the redirect `GET /c/{token}`, a `[[source.file]]` line with `user_agent` —
//! and over QUIC (no headers), and what leaves the collector is read back from a real
//! nats-server stream (the JetStream sink: the exact `IngestBatch` bytes an aggregator
//! consumes, no stand-in for any of our components). Each click's `ua_class` must be what
//! the test chose for it: a crawler UA from the vendored list's examples is BOT, a browser
//! or our SDK is CLIENT, no header is UNSPECIFIED. The per-class counters must agree.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use adclick_collector::config::{FileSourceConfig, SinkKind};
use adclick_proto::v1::{ClickBatch, IngestBatch, UserAgentClass};
use adclick_sdk::{Dimensions, Tracker};
use adclick_test_support::collector::{ad, config};
use adclick_test_support::common::{eventually, keyring, signer, within, write_keys};
use adclick_test_support::nats::{NatsCluster, read_stream};
use prost::Message;

use crate::util::{POLL_LIMIT, click, http, id_of};

const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
const BINGBOT: &str = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)";
const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_ingest_path_forwards_the_user_agent_class() {
    within(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = NatsCluster::start(&dir.path().join("nats"), 1).await;
        let ring = keyring(1, 1);
        write_keys(&dir.path().join("keys.toml"), &ring);
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let mut cfg = config(dir.path(), Vec::new());
        cfg.forward.sink = SinkKind::Jetstream;
        cfg.forward.jetstream.servers = cluster.urls();
        cfg.forward.jetstream.partitions = 1;
        cfg.forward.jetstream.replicas = 1;
        cfg.forward.jetstream.max_bytes = 64 << 20;
        cfg.limits.rate_limit_per_ip = 0.0;
        cfg.listen_quic = Some("127.0.0.1:0".parse().unwrap());
        cfg.source.file = vec![FileSourceConfig {
            name: "ads".into(),
            paths: vec![format!("{}/*.log", logs.display())],
            poll_interval_ms: 10,
            ..FileSourceConfig::default()
        }];
        let col = adclick_collector::start(cfg).await.unwrap();
        let s = signer(&ring);
        let mut n_ad = 0u64;
        let mut mint = || {
            n_ad += 1;
            s.mint(&ad(n_ad)).unwrap()
        };
        // What each click must be forwarded as, by impression id: the oracle.
        let mut want: BTreeMap<Vec<u8>, UserAgentClass> = BTreeMap::new();
        let h1 = http();
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let clicks_url = format!("http://{}/v1/clicks", col.http_addr());

        // Protobuf batches over HTTP/1.1 and h2c: bot, browser, none.
        for (client, ua, class) in [
            (&h1, Some(GOOGLEBOT), UserAgentClass::Bot),
            (&h1, Some(CHROME), UserAgentClass::Client),
            (&h1, None, UserAgentClass::Unspecified),
            (&h2, Some(BINGBOT), UserAgentClass::Bot),
            (&h2, Some(CHROME), UserAgentClass::Client),
            (&h2, None, UserAgentClass::Unspecified),
        ] {
            let minted = [mint(), mint()];
            let batch = ClickBatch {
                clicks: minted.iter().map(|m| click(&m.token)).collect(),
                ..Default::default()
            };
            let mut req = client
                .post(&clicks_url)
                .header("content-type", "application/x-protobuf")
                .body(batch.encode_to_vec());
            if let Some(ua) = ua {
                req = req.header("user-agent", ua);
            }
            assert_eq!(req.send().await.unwrap().status(), 202);
            for m in &minted {
                want.insert(id_of(m), class);
            }
        }

        // A JSON batch from curl (which the list names as a bot: `^curl`).
        let m = mint();
        let r = h1
            .post(&clicks_url)
            .header("content-type", "application/json")
            .header("user-agent", "curl/8.5.0")
            .body(format!(r#"{{"clicks":[{{"token":"{}"}}]}}"#, m.token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        want.insert(id_of(&m), UserAgentClass::Bot);

        // Redirects: a crawler following an ad link, a browser, no header.
        for (ua, class) in [
            (Some(GOOGLEBOT), UserAgentClass::Bot),
            (Some(CHROME), UserAgentClass::Client),
            (None, UserAgentClass::Unspecified),
        ] {
            let m = mint();
            let mut req = h1.get(format!("http://{}/c/{}", col.http_addr(), m.token));
            if let Some(ua) = ua {
                req = req.header("user-agent", ua);
            }
            assert_eq!(req.send().await.unwrap().status(), 302);
            want.insert(id_of(&m), class);
        }

        // The native SDK (its own User-Agent, adclick-rust/<version>): a client.
        let tracker = Tracker::builder(format!("http://{}", col.http_addr()))
            .flush_interval(Duration::from_secs(3600))
            .build()
            .unwrap();
        let m = mint();
        tracker.click(&m.token, Dimensions::new()).unwrap();
        tracker.flush().await.unwrap();
        want.insert(id_of(&m), UserAgentClass::Client);

        // QUIC carries no headers: unspecified.
        let quic = adclick_sdk::QuicTransport::with_pem_roots(
            col.quic_addr().unwrap(),
            "localhost",
            &col.quic_cert_pem().unwrap(),
            Duration::from_secs(5),
        )
        .unwrap();
        let m = mint();
        let quic_tracker = Tracker::builder(format!("quic://{}", col.quic_addr().unwrap()))
            .transport(std::sync::Arc::new(quic))
            .flush_interval(Duration::from_secs(3600))
            .build()
            .unwrap();
        quic_tracker.click(&m.token, Dimensions::new()).unwrap();
        quic_tracker.flush().await.unwrap();
        want.insert(id_of(&m), UserAgentClass::Unspecified);

        // File-source lines: the ad server's record of the visitor's User-Agent.
        let mut lines = String::new();
        for (ua, class) in [
            (Some(BINGBOT), UserAgentClass::Bot),
            (Some(CHROME), UserAgentClass::Client),
            (None, UserAgentClass::Unspecified),
        ] {
            let m = mint();
            match ua {
                Some(ua) => lines.push_str(&format!(
                    "{{\"token\":\"{}\",\"user_agent\":{}}}\n",
                    m.token,
                    serde_json::to_string(ua).unwrap()
                )),
                None => lines.push_str(&format!("{{\"token\":\"{}\"}}\n", m.token)),
            }
            want.insert(id_of(&m), class);
        }
        std::fs::File::create(logs.join("a.log"))
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();

        // Forwarded = acked by the stream (the JetStream sink counts PubAcks).
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
                let class = UserAgentClass::try_from(c.ua_class).unwrap();
                assert!(
                    got.insert(c.impression_id, class).is_none(),
                    "a click twice"
                );
            }
        }
        assert_eq!(got, want);

        // The counters by class agree with the oracle.
        let page = col.metrics().render();
        for (label, class) in [
            ("bot", UserAgentClass::Bot),
            ("client", UserAgentClass::Client),
            ("unspecified", UserAgentClass::Unspecified),
        ] {
            let n = want.values().filter(|c| **c == class).count();
            let line =
                format!("adclick_collector_user_agent_clicks_total{{class=\"{label}\"}} {n}");
            assert!(page.lines().any(|l| l == line), "want {line:?} in\n{page}");
        }
        assert!(
            page.lines()
                .any(|l| l.starts_with("adclick_collector_user_agent_patterns ")
                    && l != "adclick_collector_user_agent_patterns 0"),
            "the list's size is exported"
        );
        col.shutdown().await;
    })
    .await;
}
