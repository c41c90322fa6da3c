//! What every suite needs: wall-clock time, free ports, bounded polling, signing keys and
//! tokens, and bearer auth on gRPC requests. Nothing here starts a server.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::{Keyring, SigningKey};
use adclick_sdk::ImpressionSigner;
use tokio::net::{TcpSocket, TcpStream};

/// One minute in milliseconds.
pub const MIN: i64 = 60_000;
/// One hour in milliseconds.
pub const HOUR: i64 = 3_600_000;

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The start of the minute `t` falls in.
pub fn minute_of(t: i64) -> i64 {
    t.div_euclid(MIN) * MIN
}

// ---------------------------------------------------------------------------------------
// Ports and sockets

/// A port nothing listens on right now (for "aggregator unreachable", or a server to be
/// started there later).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A TCP connection to `to` from the loopback address `from` (any 127.x.y.z works on
/// Linux without configuration).
pub async fn connect_from(from: impl Into<IpAddr>, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.into(), 0)).unwrap();
    s.connect(to).await.unwrap()
}

// ---------------------------------------------------------------------------------------
// Bounded polling

/// Polls `f` until true (or `within`); whether it became true.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a scenario with a hard time limit, so a hang fails the test instead of the CI job.
pub async fn within<F: Future>(limit: Duration, scenario: F) -> F::Output {
    match tokio::time::timeout(limit, scenario).await {
        Ok(out) => out,
        Err(_) => panic!("scenario did not finish within {limit:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Keys and tokens

/// A one-key keyring: key `id`, secret 32 bytes of `fill`.
pub fn keyring(id: u32, fill: u8) -> Keyring {
    Keyring::new(SigningKey::new(id, &[fill; 32]).unwrap())
}

/// Writes `ring` as a collector key file (`keys.toml`) at `path`, mode 0600 (`adclick
/// collector` refuses a key file group or others can read).
pub fn write_keys(path: &Path, ring: &Keyring) {
    let created = ring.keys().map(|k| (k.id(), 0)).collect();
    let text = KeyFile {
        keyring: ring.clone(),
        created,
    }
    .render()
    .unwrap();
    std::fs::write(path, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// An impression signer on `ring` minting tokens that live one hour.
pub fn signer(ring: &Keyring) -> ImpressionSigner {
    ImpressionSigner::new(ring.clone())
        .with_ttl(Duration::from_secs(3600))
        .unwrap()
}

/// The same token with one character of its HMAC tag changed: a tampered token that still
/// decodes (the last 43 characters are the 32-byte tag), so the collector must answer
/// `bad_signature`, not `malformed`.
pub fn tamper(token: &str) -> String {
    let mut b = token.as_bytes().to_vec();
    let i = b.len() - 10;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

// ---------------------------------------------------------------------------------------
// gRPC

/// `msg` with `authorization: Bearer {key}`.
pub fn authed<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}
