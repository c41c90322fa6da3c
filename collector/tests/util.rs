//! Helpers of this test binary only: an HTTP client and the raw click requests the
//! collector tests send. Server setup lives in `adclick-test-support`.

use std::time::Duration;

use adclick_collector::Collector;
use adclick_proto::v1::{self, ClickBatch};
use adclick_test_support::common::{keyring, now_ms, signer};
use prost::Message;

/// How long `eventually` waits in these tests.
pub const POLL_LIMIT: Duration = Duration::from_secs(20);

pub fn http() -> reqwest::Client {
    adclick_sdk::HttpTransport::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub async fn post_proto(
    c: &reqwest::Client,
    col: &Collector,
    batch: &ClickBatch,
) -> reqwest::Response {
    c.post(format!("http://{}/v1/clicks", col.http_addr()))
        .header("content-type", "application/x-protobuf")
        .body(batch.encode_to_vec())
        .send()
        .await
        .unwrap()
}

/// One request holding one click of `token`.
pub async fn post_click(c: &reqwest::Client, col: &Collector, token: &str) -> reqwest::Response {
    let batch = ClickBatch {
        clicks: vec![click(token)],
        ..Default::default()
    };
    post_proto(c, col, &batch).await
}

pub fn click(token: &str) -> v1::Click {
    let now = now_ms();
    v1::Click {
        token: token.into(),
        occurred_at_ms: now,
        sent_at_ms: now,
        ..Default::default()
    }
}

pub fn id_of(token_signer_out: &adclick_sdk::MintedToken) -> Vec<u8> {
    token_signer_out.impression.impression_id.to_vec()
}

pub fn signer_of_other_key() -> adclick_sdk::ImpressionSigner {
    // Same key id as the collector's, different secret: a forgery.
    signer(&keyring(1, 99))
}

/// A collector (keys written, `tweak` applied to its test config) forwarding to an
/// in-test aggregator: the setup most ingest tests share.
pub struct Started {
    /// Holds the collector's files.
    pub dir: tempfile::TempDir,
    /// The keys the collector verifies with.
    pub ring: adclick_proto::token::Keyring,
    /// The in-test aggregator.
    pub agg: adclick_test_support::fake_aggregator::AggHandle,
    /// The collector.
    pub col: Collector,
}

pub async fn started(
    tweak: impl FnOnce(&mut adclick_collector::config::CollectorConfig),
) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(1, 1);
    adclick_test_support::common::write_keys(&dir.path().join("keys.toml"), &ring);
    let agg = adclick_test_support::fake_aggregator::fake_aggregator().await;
    let mut cfg = adclick_test_support::collector::config(dir.path(), vec![agg.url()]);
    tweak(&mut cfg);
    let col = adclick_collector::start(cfg).await.unwrap();
    Started {
        dir,
        ring,
        agg,
        col,
    }
}
