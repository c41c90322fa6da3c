//! What every suite needs: wall-clock time, free ports, bounded polling, signing keys and
//! tokens, and bearer auth on gRPC requests. Nothing here starts a server.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
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
///
/// Picked below the kernel's ephemeral range, so no connection takes it meanwhile (see
/// [`adclick_devtools::ports`]).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((
        [127, 0, 0, 1],
        adclick_devtools::ports::free_port().unwrap(),
    ))
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

/// How a server closes an idle HTTP/2 connection, seen from a bare HTTP/2 client (h2c with
/// prior knowledge): one GET of `path` (its status returned), then nothing until the server
/// closes the connection. `Ok(())` when it ended cleanly (a GOAWAY, then the close), the
/// client's error when it was cut; panics if it is still open after `limit`.
pub async fn h2_get_then_idle_close(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
) -> (u16, Result<(), hyper::Error>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{addr}{path}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let status = send.send_request(req).await.unwrap().status().as_u16();
    let ended = tokio::time::timeout(limit, conn)
        .await
        .unwrap_or_else(|_| panic!("{addr}: idle HTTP/2 connection still open after {limit:?}"))
        .unwrap();
    (status, ended)
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

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/support is two levels below the root")
        .to_path_buf()
}

/// Runs the project's set-up script `scripts/<script>` (idempotent installers of outside
/// tools; never the caller's `ADCLICK_VENV`), failing the test with its stderr if it
/// fails; returns the last line it printed (the tool's path).
pub fn setup_script(script: &str) -> String {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts").join(script))
        .env_remove("ADCLICK_VENV")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/{script} failed: what it installs cannot be tested\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A Python 3 for scripts that need only its standard library: the project venv's when it
/// exists, else `python3` on PATH; fails the test, saying who needs it, when neither is.
pub fn stdlib_python(needed_by: &str) -> PathBuf {
    let venv = repo_root().join(".venv/bin/python");
    if venv.is_file() {
        return venv;
    }
    let on_path = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        on_path,
        "python3 not found: {needed_by} needs Python 3.8 or later (standard library only). \
         Install it (Debian: apt-get install python3) or create the project venv \
         (bash scripts/setup-python.sh)"
    );
    PathBuf::from("python3")
}
