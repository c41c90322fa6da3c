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
