//! The transport trait and the reqwest HTTP transport: `POST {endpoint}/v1/clicks` with a
//! protobuf `ClickBatch`. Knows nothing about retries or batching (that is `core`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::SdkError;

/// What the collector answered.
#[derive(Debug, Clone)]
pub struct TransportResponse {
    /// HTTP status (QUIC transports map their status reply onto the same codes).
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// The body, truncated to a few hundred bytes (for error reports).
    pub body: String,
}

/// A send that produced no response (connect error, timeout, reset). Always retried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// Boxed send future.
pub type SendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TransportResponse, TransportError>> + Send + 'a>>;

/// Delivers one encoded `ClickBatch`.
pub trait Transport: Send + Sync + 'static {
    /// Sends `body` (an encoded `ClickBatch`) and returns the collector's answer.
    fn send(&self, body: Vec<u8>) -> SendFuture<'_>;
}

const BODY_SNIPPET: usize = 512;

/// HTTP/1.1 or HTTP/2 (ALPN) transport over reqwest with rustls (ring).
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl HttpTransport {
    /// A transport posting to `{endpoint}/v1/clicks` with a per-request timeout.
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, SdkError> {
        let base = reqwest::Url::parse(endpoint.trim_end_matches('/'))
            .map_err(|_| SdkError::InvalidEndpoint(endpoint.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(SdkError::InvalidEndpoint(endpoint.to_string()));
        }
        let url = reqwest::Url::parse(&format!(
            "{}/v1/clicks",
            base.as_str().trim_end_matches('/')
        ))
        .map_err(|_| SdkError::InvalidEndpoint(endpoint.to_string()))?;
        Self::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("adclick-rust/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SdkError::Client(e.to_string()))?;
        Ok(HttpTransport { client, url })
    }

    /// Installs rustls' `ring` provider as the process default unless the application
    /// already chose one. reqwest is built without a bundled provider (aws-lc would cost
    /// minutes of C build), so call this before building your own `reqwest::Client` in a
    /// process that uses the SDK; the SDK's transports call it themselves.
    pub fn install_crypto_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// The full ingest URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }
}

impl Transport for HttpTransport {
    fn send(&self, body: Vec<u8>) -> SendFuture<'_> {
        Box::pin(async move {
            let resp = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                .body(body)
                .send()
                .await
                .map_err(describe)?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = resp.bytes().await.unwrap_or_default();
            let end = bytes.len().min(BODY_SNIPPET);
            let body = String::from_utf8_lossy(&bytes[..end]).into_owned();
            Ok(TransportResponse {
                status,
                retry_after,
                body,
            })
        })
    }
}

fn describe(e: reqwest::Error) -> TransportError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else {
        "request error"
    };
    TransportError(format!("{kind}: {e}"))
}
