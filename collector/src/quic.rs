//! QUIC ingest (quinn): the same `ClickBatch` as `POST /v1/clicks`, one bidirectional
//! stream per batch, answered through the HTTP path's [`crate::http::record`] so both
//! fronts share one processor, committer, quarantine, rate limiter and metrics. It also
//! loads the listener's TLS certificate (configured PEM files, or a self-signed dev
//! certificate kept in `data_dir`).
//!
//! Wire format (ALPN `adclick/1`, TLS 1.3 only, one stream = one batch):
//!
//! ```text
//! client -> server:  u32 BE length | protobuf ClickBatch (length bytes) | FIN
//! server -> client:  u16 BE status | u32 BE length | body (length bytes) | FIN
//! ```
//!
//! `status` uses the HTTP codes: 202 (body: protobuf `ClickBatchResult`, sent only after
//! the accepted clicks are fsynced), 400 malformed, 408 the length prefix was not read
//! within `limits.header_read_timeout_ms` or the batch within `limits.body_read_timeout_ms`
//! after it, 413 over `limits.max_body_bytes` (judged on the length prefix, before any
//! body byte is read) or `limits.max_clicks_per_batch` (counted before decoding), 429
//! per-IP click rate limit, 503 spool full or failed (or too many bodies in flight).
//! Non-202 bodies are UTF-8 text; 429 and 503 end with `retry-after: N` (seconds), the
//! QUIC stand-in for the `Retry-After` header.
//!
//! Limits: `limits.quic_idle_timeout_ms` (idle connections and stalled handshakes),
//! `limits.max_streams_per_connection`, and the per-listener and per-IP connection caps
//! (`limits.max_connections`, `limits.max_connections_per_ip`; excess refused before any
//! handshake work).
//!
//! This module frames and answers; it must not hold click logic of its own.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use prost::Message;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, Incoming, RecvStream, SendStream, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout, timeout_at};

use crate::config::{CollectorConfig, Limits};
use crate::http::conn::ConnLimiter;
use crate::http::decode::{self, BatchDecodeError};
use crate::http::{self, HttpState};
use crate::ingest::RequestCtx;
use crate::metrics::{ConnLabel, ListenerLabel};

/// The ALPN protocol id of the QUIC ingest protocol.
pub const ALPN: &[u8] = b"adclick/1";
/// The dev certificate written to `data_dir` when no certificate is configured.
pub const DEV_CERT_FILE: &str = "quic-dev-cert.pem";
/// The dev certificate's private key (mode 0600).
pub const DEV_KEY_FILE: &str = "quic-dev-key.pem";

/// Longest wait for in-flight streams at shutdown (the HTTP front drains as long).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for peers to acknowledge the close at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The certificate or key could not be loaded or generated.
#[derive(Debug, thiserror::Error)]
#[error("QUIC TLS: {0}")]
pub struct TlsError(pub String);

/// The QUIC listener's TLS setup.
#[derive(Debug)]
pub struct QuicTls {
    /// The quinn server configuration (TLS 1.3, ALPN `adclick/1`, stream limits).
    pub server_config: quinn::ServerConfig,
    /// PEM of the certificate chain in use (never the key), for clients that pin it.
    pub cert_pem: String,
    /// True for the generated self-signed development certificate.
    pub dev: bool,
}

/// Loads `tls_cert_file`/`tls_key_file`, or when neither is set, the dev certificate in
/// `data_dir` (generated on first use, reused afterwards so clients can keep trusting it).
pub fn load_tls(cfg: &CollectorConfig) -> Result<QuicTls, TlsError> {
    match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => {
            let (chain, key) = read_pem_files(cert, key)?;
            build(chain, key, false, &cfg.limits)
        }
        (None, None) => dev_tls(&cfg.data_dir, &cfg.limits),
        _ => Err(TlsError(
            "tls_cert_file and tls_key_file must be set together".into(),
        )),
    }
}

fn read_pem_files(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsError(format!(
                "cannot read certificates from {}: {e}",
                cert.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{} holds no PEM CERTIFICATE block",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        TlsError(format!(
            "cannot read a private key from {}: {e}",
            key.display()
        ))
    })?;
    Ok((chain, key))
}

fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    dev: bool,
    limits: &Limits,
) -> Result<QuicTls, TlsError> {
    let cert_pem = chain.iter().map(|c| to_pem(c)).collect();
    // An explicit ring provider: the process-wide default may be unset or another one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError(format!("certificate and key are not usable: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError(e.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Streams one connection may have open at once; QUIC flow control makes the client
    // wait for more, so one client cannot tie up unbounded tasks. A connection with no
    // traffic for the idle timeout is closed (this also bounds stalled handshakes).
    let idle_ms = u32::try_from(limits.quic_idle_timeout_ms.max(1)).unwrap_or(600_000);
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.max_streams_per_connection))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(idle_ms))));
    server_config.transport_config(Arc::new(transport));
    Ok(QuicTls {
        server_config,
        cert_pem,
        dev,
    })
}

fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn dev_tls(data_dir: &Path, limits: &Limits) -> Result<QuicTls, TlsError> {
    let cert_path = data_dir.join(DEV_CERT_FILE);
    let key_path = data_dir.join(DEV_KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        match read_pem_files(&cert_path, &key_path).and_then(|(c, k)| build(c, k, true, limits)) {
            Ok(t) => {
                tracing::warn!(
                    cert = %cert_path.display(),
                    "QUIC uses the self-signed development certificate; set tls_cert_file and \
                     tls_key_file in production"
                );
                return Ok(t);
            }
            Err(e) => tracing::warn!(error = %e, "unusable dev certificate; generating a new one"),
        }
    }
    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError(format!("cannot generate a dev certificate: {e}")))?;
    let cert_pem = generated.cert.pem();
    let key_pem = generated.signing_key.serialize_pem();
    // Key first: a crash in between leaves a pair that does not match, which the reuse
    // path above rejects and regenerates.
    write_atomic(&key_path, key_pem.as_bytes(), true)
        .and_then(|()| write_atomic(&cert_path, cert_pem.as_bytes(), false))
        .map_err(|e| TlsError(format!("cannot write the dev certificate: {e}")))?;
    tracing::warn!(
        cert = %cert_path.display(),
        "QUIC uses a newly generated self-signed development certificate (trust this file in \
         dev clients); set tls_cert_file and tls_key_file in production"
    );
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError(format!("generated key: {e}")))?;
    build(vec![generated.cert.der().clone()], key, true, limits)
}

fn write_atomic(path: &Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Binds the QUIC endpoint on `addr` (UDP).
pub fn bind(addr: SocketAddr, tls: &QuicTls) -> std::io::Result<Endpoint> {
    Endpoint::server(tls.server_config.clone(), addr)
}

/// Serves QUIC on `endpoint` until `shutdown` flips: then refuses new connections and
/// streams, lets in-flight streams finish (at most 10 s) and closes the endpoint.
pub async fn serve(
    endpoint: Endpoint,
    state: Arc<HttpState>,
    read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let conns = ConnLimiter::new(
        state.limits.max_connections,
        state.limits.max_connections_per_ip,
    );
    let open_gauge = state
        .metrics
        .connections_open
        .get_or_create(&ListenerLabel { listener: "quic" })
        .clone();
    // Every connection and stream task holds a sender; `recv` returns None once all are
    // gone, which is how shutdown knows the drain is over.
    let (drain, mut drained) = mpsc::channel::<()>(1);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = shutdown.wait_for(|&stop| stop) => break,
        };
        let permit = match conns.try_acquire(incoming.remote_address().ip()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(remote = %incoming.remote_address(), reason = why.reason(), "QUIC connection refused");
                state
                    .metrics
                    .connections_refused
                    .get_or_create(&ConnLabel {
                        listener: "quic",
                        reason: why.reason(),
                    })
                    .inc();
                // Before any handshake work: one CONNECTION_REFUSED packet.
                incoming.refuse();
                continue;
            }
        };
        let st = state.clone();
        let (stop, drain) = (shutdown.clone(), drain.clone());
        let gauge = open_gauge.clone();
        gauge.inc();
        tokio::spawn(async move {
            serve_connection(incoming, st, read_timeout, stop, drain).await;
            drop(permit);
            gauge.dec();
        });
    }
    endpoint.set_server_config(None);
    drop(drain);
    if timeout(DRAIN_TIMEOUT, drained.recv()).await.is_err() {
        tracing::warn!("QUIC drain timed out; closing remaining connections");
    }
    endpoint.close(VarInt::from_u32(0), b"collector shutting down");
    let _ = timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
}

async fn serve_connection(
    incoming: Incoming,
    st: Arc<HttpState>,
    read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.accept() {
        Ok(connecting) => match connecting.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "QUIC handshake failed");
                return;
            }
        },
        Err(e) => {
            tracing::debug!(%remote, error = %e, "QUIC connection not accepted");
            return;
        }
    };
    // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; rate limits and the
    // forwarded client_ip want the plain IPv4 address, as on the HTTP front.
    let ip = conn.remote_address().ip().to_canonical();
    loop {
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                // Closed by the peer, idle timeout, or lost: nothing left to serve.
                Err(_) => return,
            },
            _ = shutdown.wait_for(|&stop| stop) => {
                // No new streams; the ones already accepted finish before the close.
                conn.set_max_concurrent_bi_streams(VarInt::from_u32(0));
                return;
            }
        };
        let st = st.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            serve_stream(&st, send, recv, ip, read_timeout).await;
            drop(drain);
        });
    }
}

async fn serve_stream(
    st: &HttpState,
    mut send: SendStream,
    mut recv: RecvStream,
    ip: IpAddr,
    read_timeout: Duration,
) {
    let (status, body) = answer(st, &mut recv, ip, Instant::now() + read_timeout).await;
    st.metrics.request("quic", status);
    // Dropping an unread receive side sends STOP_SENDING, so a client whose body was
    // refused (413, 429) stops sending it.
    drop(recv);
    let Ok(len) = u32::try_from(body.len()) else {
        let _ = send.reset(VarInt::from_u32(0));
        return;
    };
    let mut frame = Vec::with_capacity(6 + body.len());
    frame.extend_from_slice(&status.to_be_bytes());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    let written = async {
        send.write_all(&frame).await.ok()?;
        send.finish().ok()?;
        // Wait for the client's acknowledgement, so a shutdown that closes the endpoint
        // after the drain does not discard replies still in flight.
        send.stopped().await.ok()
    };
    if timeout(read_timeout, written).await.is_err() {
        let _ = send.reset(VarInt::from_u32(0));
    }
}

fn error(status: u16, msg: impl Into<String>) -> (u16, Vec<u8>) {
    (status, msg.into().into_bytes())
}

/// Reads one request from `recv` (by `deadline`) and answers it: status and body.
async fn answer(
    st: &HttpState,
    recv: &mut RecvStream,
    ip: IpAddr,
    deadline: Instant,
) -> (u16, Vec<u8>) {
    let limited = |retry: http::ratelimit::RetryAfter| {
        error(
            429,
            format!(
                "click rate limit exceeded for this client (limits.rate_limit_per_ip); retry-after: {}",
                retry.0
            ),
        )
    };
    if let Err(retry) = st.admit(ip) {
        return limited(retry);
    }
    let too_slow = || {
        error(
            408,
            "request not received in time (limits.header_read_timeout_ms for the length prefix, limits.body_read_timeout_ms for the batch)",
        )
    };
    let mut prefix = [0u8; 4];
    match timeout_at(deadline, recv.read_exact(&mut prefix)).await {
        Err(_) => return too_slow(),
        Ok(Err(e)) => return error(400, format!("cannot read the u32 length prefix: {e}")),
        Ok(Ok(())) => {}
    }
    let len = u32::from_be_bytes(prefix) as usize;
    let max = st.limits.max_body_bytes;
    if len > max {
        return error(
            413,
            format!("batch of {len} bytes exceeds {max} bytes (limits.max_body_bytes)"),
        );
    }
    // The batch has its own deadline from here (as an HTTP body after its headers), and
    // its size is held in the in-flight body budget until the batch is decoded.
    let deadline = Instant::now() + st.limits.body_read_timeout();
    let Some(_budget) = st.reserve_body(ip, len) else {
        return error(
            503,
            "too many request bodies in flight (limits.max_inflight_body_bytes); retry-after: 1",
        );
    };
    // Grown as bytes arrive, not allocated from the prefix: announcing 1 MiB on many
    // streams and sending nothing must not reserve 1 MiB each.
    let mut body = Vec::with_capacity(len.min(64 << 10));
    while body.len() < len {
        match timeout_at(deadline, recv.read_chunk(len - body.len(), true)).await {
            Err(_) => return too_slow(),
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk.bytes),
            Ok(Ok(None)) => {
                return error(
                    400,
                    format!(
                        "stream ended after {} of the {len} bytes announced",
                        body.len()
                    ),
                );
            }
            Ok(Err(e)) => {
                return error(
                    400,
                    format!("cannot read the {len}-byte ClickBatch announced: {e}"),
                );
            }
        }
    }
    // The client finishes its side right after the batch; anything more is a framing bug.
    match timeout_at(deadline, recv.read_to_end(0)).await {
        Err(_) => return too_slow(),
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            return error(400, "bytes after the ClickBatch: one batch per stream");
        }
        Ok(Err(e)) => return error(400, format!("stream failed after the batch: {e}")),
        Ok(Ok(_)) => {}
    }
    let received_at_ms = http::now_ms();
    let batch = match decode::decode_batch(&body, st.limits.max_clicks_per_batch) {
        Ok(b) => b,
        Err(e @ BatchDecodeError::TooManyClicks { .. }) => return error(413, e.to_string()),
        Err(e @ BatchDecodeError::Malformed(_)) => {
            st.metrics.add_clicks("malformed_batch", 1);
            return error(400, e.to_string());
        }
    };
    if let Err(retry) = st.charge_clicks(ip, batch.len()) {
        return limited(retry);
    }
    let ctx = RequestCtx {
        received_at_ms,
        client_ip: Some(ip),
        // QUIC streams carry a length-prefixed ClickBatch and no headers: no User-Agent.
        ua_class: adclick_proto::v1::UserAgentClass::Unspecified,
    };
    match http::record_batch(st, &batch.clicks(), &ctx).await {
        Ok(processed) => (202, processed.result().encode_to_vec()),
        Err(http::BatchRefused::TooLarge(msg)) => error(413, msg),
        Err(http::BatchRefused::Unavailable(e)) => error(
            503,
            format!("{e}; retry-after: {}", http::retry_after_secs(&e)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_through_the_parser() {
        let der: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let pem = to_pem(&der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
