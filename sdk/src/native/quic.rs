//! The QUIC transport (feature `quic`): one encoded `ClickBatch` per bidirectional stream
//! on one reused quinn connection, in the collector's `adclick/1` framing (see the
//! collector's `quic` module): `u32 BE length | ClickBatch | FIN`, answered by
//! `u16 BE status | u32 BE length | body | FIN`.
//!
//! It maps that reply onto [`TransportResponse`] and every failure without a reply onto
//! [`TransportError`]; it must not decide about retries (that is `core::retry`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, WriteError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::SdkError;
use super::http::{SendFuture, Transport, TransportError, TransportResponse};

/// The ALPN id of the collector's QUIC ingest protocol.
pub const ALPN: &[u8] = b"adclick/1";

/// Longest reply accepted (a `ClickBatchResult` or an error text is far smaller).
const MAX_REPLY_BYTES: u32 = 1 << 20;
/// Reply bytes kept in [`TransportResponse::body`], as in the HTTP transport.
const BODY_SNIPPET: usize = 512;

/// Sends batches to a collector over QUIC (TLS 1.3 with rustls/ring, ALPN `adclick/1`).
///
/// Connects on the first send, reuses the connection, and reconnects once it is lost or
/// idle-closed. Use it with [`crate::TrackerBuilder::transport`]:
///
/// ```no_run
/// # async fn demo(cert_pem: &str) -> Result<(), adclick_sdk::SdkError> {
/// use std::{sync::Arc, time::Duration};
/// use adclick_sdk::{QuicTransport, Tracker};
/// let quic = QuicTransport::with_pem_roots(
///     "127.0.0.1:4433".parse().unwrap(),
///     "localhost",
///     cert_pem,
///     Duration::from_secs(10),
/// )?;
/// let tracker = Tracker::builder("quic://127.0.0.1:4433")
///     .transport(Arc::new(quic))
///     .build()?;
/// # Ok(()) }
/// ```
pub struct QuicTransport {
    server_addr: SocketAddr,
    server_name: String,
    client_config: quinn::ClientConfig,
    timeout: Duration,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    endpoint: Option<Endpoint>,
    conn: Option<Connection>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("server_addr", &self.server_addr)
            .field("server_name", &self.server_name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// A transport to `server_addr`, verifying the server's certificate for `server_name`
    /// (a DNS name or an IP address) against `roots`. `timeout` bounds each send,
    /// connecting included; a timeout is retried like any transport error.
    pub fn new(
        server_addr: SocketAddr,
        server_name: &str,
        roots: rustls::RootCertStore,
        timeout: Duration,
    ) -> Result<Self, SdkError> {
        ServerName::try_from(server_name)
            .map_err(|_| SdkError::Tls(format!("invalid server name {server_name:?}")))?;
        if roots.is_empty() {
            return Err(SdkError::Tls("no trusted root certificate given".into()));
        }
        // An explicit ring provider: no dependence on (or change to) the process default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| SdkError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| SdkError::Tls(e.to_string()))?;
        Ok(QuicTransport {
            server_addr,
            server_name: server_name.to_string(),
            client_config: quinn::ClientConfig::new(Arc::new(crypto)),
            timeout,
            state: tokio::sync::Mutex::new(State::default()),
        })
    }

    /// [`QuicTransport::new`] trusting the PEM `CERTIFICATE` blocks in `pem` (e.g. the
    /// collector's self-signed dev certificate, `data_dir/quic-dev-cert.pem`).
    pub fn with_pem_roots(
        server_addr: SocketAddr,
        server_name: &str,
        pem: &str,
        timeout: Duration,
    ) -> Result<Self, SdkError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| SdkError::Tls(format!("bad PEM certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| SdkError::Tls(format!("unusable certificate: {e}")))?;
        }
        Self::new(server_addr, server_name, roots, timeout)
    }

    /// The collector's QUIC address.
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }

    /// The live connection, or a new one. `true` when it was reused (it may have died
    /// since its last use without our noticing).
    async fn connection(&self) -> Result<(Connection, bool), TransportError> {
        let mut st = self.state.lock().await;
        if let Some(c) = st.conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok((c.clone(), true));
        }
        st.conn = None;
        let endpoint = match &st.endpoint {
            Some(e) => e.clone(),
            None => {
                // Created here, not in `new`: quinn needs the tokio runtime sends run on.
                let bind = if self.server_addr.is_ipv6() {
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
                } else {
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
                };
                let e = Endpoint::client(bind)
                    .map_err(|e| TransportError(format!("cannot open a UDP socket: {e}")))?;
                st.endpoint = Some(e.clone());
                e
            }
        };
        let conn = endpoint
            .connect_with(
                self.client_config.clone(),
                self.server_addr,
                &self.server_name,
            )
            .map_err(|e| TransportError(format!("connect error: {e}")))?
            .await
            .map_err(|e| TransportError(format!("connect error: {e}")))?;
        st.conn = Some(conn.clone());
        Ok((conn, false))
    }

    async fn forget(&self, dead: &Connection) {
        let mut st = self.state.lock().await;
        if st
            .conn
            .as_ref()
            .is_some_and(|c| c.stable_id() == dead.stable_id())
        {
            st.conn = None;
        }
    }

    /// Closes the kept connection: after a timeout it may be a dead path that QUIC would
    /// only notice at its idle timeout, so the retry should start on a fresh one.
    async fn drop_connection(&self) {
        if let Some(c) = self.state.lock().await.conn.take() {
            c.close(quinn::VarInt::from_u32(0), b"request timed out");
        }
    }

    async fn exchange(&self, body: &[u8]) -> Result<TransportResponse, TransportError> {
        let len = u32::try_from(body.len())
            .map_err(|_| TransportError("batch larger than 4 GiB".into()))?;
        let (conn, reused) = self.connection().await?;
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.forget(&conn).await;
                if !reused {
                    return Err(TransportError(format!("connection lost: {e}")));
                }
                // The kept connection died while idle: one fresh try before reporting.
                let (conn, _) = self.connection().await?;
                conn.open_bi()
                    .await
                    .map_err(|e| TransportError(format!("connection lost: {e}")))?
            }
        };
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(body);
        let write_error = match send.write_all(&frame).await {
            Ok(()) => {
                let _ = send.finish();
                None
            }
            // The collector refused the batch without reading it (413, 429): its reply
            // is still on the way.
            Err(WriteError::Stopped(_)) => None,
            Err(e) => Some(e),
        };
        let read_error = |e: &dyn std::fmt::Display| match &write_error {
            Some(w) => TransportError(format!("send failed: {w}")),
            None => TransportError(format!("no reply: {e}")),
        };
        let mut head = [0u8; 6];
        recv.read_exact(&mut head)
            .await
            .map_err(|e| read_error(&e))?;
        let status = u16::from_be_bytes([head[0], head[1]]);
        let reply_len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
        if !(200..=599).contains(&status) || reply_len > MAX_REPLY_BYTES {
            // Not a reply of this protocol: do not let it drop the batch as "rejected".
            return Err(TransportError(format!(
                "malformed reply (status {status}, {reply_len} bytes)"
            )));
        }
        let mut reply = vec![0u8; reply_len as usize];
        recv.read_exact(&mut reply)
            .await
            .map_err(|e| read_error(&e))?;
        let retry_after = if status >= 300 {
            retry_after_hint(&reply)
        } else {
            None
        };
        let end = reply.len().min(BODY_SNIPPET);
        Ok(TransportResponse {
            status,
            retry_after,
            body: String::from_utf8_lossy(&reply[..end]).into_owned(),
        })
    }
}

/// The `retry-after: N` hint the collector puts in its 429/503 text.
fn retry_after_hint(reply: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(reply).to_ascii_lowercase();
    let rest = &text[text.find("retry-after:")? + "retry-after:".len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then_some(digits)
}

impl Transport for QuicTransport {
    fn send(&self, body: Vec<u8>) -> SendFuture<'_> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.exchange(&body)).await {
                Ok(r) => r,
                Err(_) => {
                    self.drop_connection().await;
                    Err(TransportError(format!(
                        "timeout: no QUIC reply from {} within {:?}",
                        self.server_addr, self.timeout
                    )))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_hint_is_found_in_error_text() {
        assert_eq!(
            retry_after_hint(b"spool full; Retry-After: 5").as_deref(),
            Some("5")
        );
        assert_eq!(
            retry_after_hint(b"rate limit; retry-after:30\n").as_deref(),
            Some("30")
        );
        assert_eq!(retry_after_hint(b"retry-after: soon"), None);
        assert_eq!(retry_after_hint(b"bad batch"), None);
    }

    #[test]
    fn bad_roots_and_names_are_refused() {
        let t = Duration::from_secs(1);
        let addr: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        assert!(matches!(
            QuicTransport::with_pem_roots(addr, "localhost", "", t),
            Err(SdkError::Tls(_))
        ));
        assert!(matches!(
            QuicTransport::new(addr, "not a name!", rustls::RootCertStore::empty(), t),
            Err(SdkError::Tls(_))
        ));
    }
}
