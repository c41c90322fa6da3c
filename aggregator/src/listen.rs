//! The accept loop both aggregator listeners (gRPC and HTTP) run, with the connection
//! limits that keep idle and slow clients from holding them:
//!
//! - a cap on open connections per listener and per client IP: the excess is closed right
//!   after `accept`, before a byte is read or a task is spawned;
//! - a deadline for the first request (HTTP/1 headers, or the HTTP/2 preface and a HEADERS
//!   frame): `header_read_timeout`;
//! - an idle timeout once no request is in flight (HTTP/1 keep-alive and HTTP/2 alike): the
//!   clock restarts when the last response has been sent whole (a watch's stream keeps its
//!   request in flight: `Held`), not on any byte, so a client that only trickles bytes or
//!   PINGs is still idle. An idle connection is closed gracefully: HTTP/2 gets a GOAWAY
//!   (hyper's two-step one: a request the client sent before it saw the GOAWAY is still
//!   served, so a client never loses a request to the idle close; it opens a new connection
//!   for the next), HTTP/1 is closed between requests. The close is bounded
//!   (`IDLE_CLOSE_GRACE` past the request deadline), then the connection is dropped;
//! - a deadline per request (body included), so an in-flight request cannot keep a
//!   connection open forever either; HTTP/2 PINGs drop dead peers, and the number of
//!   concurrent streams is bounded.
//!
//! It knows nothing about what is served: the caller hands it one service per connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};

use crate::config::ConnectionConfig;
use crate::metrics::Metrics;

/// Which listener (the `port` label of the connection metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// gRPC (ingest, queries, reflection, health): HTTP/2, and HTTP/1.1 for gRPC-Web.
    Grpc,
    /// HTTP/JSON queries, health, metrics: HTTP/1.1 and HTTP/2.
    Http,
}

impl Port {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Port::Grpc => "grpc",
            Port::Http => "http",
        }
    }
}

/// HTTP/2 flow-control windows of the gRPC port: a collector batch (~100 KB, at most
/// `ingest.max_message_bytes`) should not stall on the 64 KiB default.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Per stream.
    pub stream: u32,
    /// Per connection.
    pub connection: u32,
}

/// What one listener serves and how.
pub struct Serve<M> {
    /// The bound socket.
    pub listener: TcpListener,
    /// Which one it is.
    pub port: Port,
    /// Limits and timeouts.
    pub limits: ConnectionConfig,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Only HTTP/2 (gRPC) or HTTP/1.1 and HTTP/2.
    pub http2_only: bool,
    /// HTTP/2 windows (None: hyper's defaults).
    pub windows: Option<Windows>,
    /// Makes the service for one connection from the peer address.
    pub make_service: M,
    /// Stops accepting when it flips; open connections are then closed gracefully.
    pub shutdown: watch::Receiver<bool>,
}

impl<M> std::fmt::Debug for Serve<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("port", &self.port)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A per-connection service: a request in, a response out, never an error (errors are
/// responses), and a response for a request that ran past `request_timeout_secs`.
pub trait ConnService: Clone + Send + 'static {
    /// Response body.
    type Body: hyper::body::Body<
            Data = bytes::Bytes,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        > + Send
        + Unpin
        + 'static;
    /// Handles one request.
    fn call(
        &self,
        req: Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Response<Self::Body>> + Send>>;
    /// What a request that took too long gets.
    fn timed_out(&self) -> Response<Self::Body>;
}

/// Runs the accept loop until shutdown, then waits (at most 5 s) for open connections.
pub async fn serve<M, S>(s: Serve<M>)
where
    M: Fn(SocketAddr) -> S,
    S: ConnService,
{
    let Serve {
        listener,
        port,
        limits,
        metrics,
        http2_only,
        windows,
        make_service,
        mut shutdown,
    } = s;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Duration::from_secs(limits.keepalive_interval_secs))
        .keep_alive_timeout(Duration::from_secs(limits.keepalive_timeout_secs));
    if let Some(w) = windows {
        builder
            .http2()
            .initial_stream_window_size(w.stream)
            .initial_connection_window_size(w.connection);
    }
    let builder = if http2_only {
        builder.http2_only()
    } else {
        builder
    };
    let counts = Arc::new(Mutex::new(Counts::default()));
    let timeouts = Timeouts {
        header: Duration::from_secs(limits.header_read_timeout_secs),
        idle: Duration::from_secs(limits.idle_timeout_secs),
    };
    let request_timeout = Duration::from_secs(limits.request_timeout_secs);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(port = port.label(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let permit = match Permit::admit(&counts, peer.ip(), &limits, &metrics, port) {
            Ok(p) => p,
            Err(reason) => {
                metrics.connection_refused(port.label(), reason);
                tracing::debug!(port = port.label(), %peer, reason, "connection refused");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = GuardedIo::new(stream, activity.clone(), timeouts, metrics.clone(), port);
        let svc = Tracked {
            inner: make_service(peer),
            activity: activity.clone(),
            timeout: request_timeout,
            metrics: metrics.clone(),
            port,
        };
        let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
        let (mut shutdown, metrics) = (shutdown.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = std::pin::pin!(conn);
            let idle = timeouts.idle;
            let bound = match run_until_idle(conn.as_mut(), &activity, idle, &mut shutdown).await {
                Ended::Done => return,
                Ended::Idle => {
                    metrics.connection_closed(port.label(), "idle_timeout");
                    tracing::debug!(port = port.label(), "closing idle connection (GOAWAY)");
                    request_timeout + IDLE_CLOSE_GRACE
                }
                Ended::Shutdown => SHUTDOWN_GRACE,
            };
            conn.as_mut().graceful_shutdown();
            // A shutdown during an idle close cuts its wait to the shutdown's.
            let _ = tokio::time::timeout(bound, async {
                tokio::select! {
                    _ = conn.as_mut() => {}
                    // The flag set, or its sender gone (an error): shutting down either way.
                    // (Its `Ref` holds the channel's read lock: dropped at once.)
                    _ = async { drop(shutdown.wait_for(|&stop| stop).await) } => {
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
                    }
                }
            })
            .await;
        });
    }
    // Every connection task saw the flip and is closing gracefully: wait for them (each
    // gives up after `SHUTDOWN_GRACE`), polling the count of open ones.
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while counts.lock().unwrap_or_else(|e| e.into_inner()).total > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long server shutdown waits for open connections to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long an idle connection closed with a GOAWAY may take to finish, past the request
/// deadline (a request the client sent before it saw the GOAWAY is still served), before it
/// is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How a connection's task stopped waiting on it.
enum Ended {
    /// The connection finished by itself (client closed, protocol error, a deadline in
    /// its IO).
    Done,
    /// No request for the idle timeout: close it gracefully.
    Idle,
    /// Server shutdown: close it gracefully.
    Shutdown,
}

/// Drives `conn` until it ends, the server shuts down, or it has been idle (at least one
/// request served, none in flight) for `idle`.
async fn run_until_idle<C: Future + ?Sized>(
    mut conn: Pin<&mut C>,
    activity: &Activity,
    idle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    loop {
        // Registered before the deadline is read, so a request ending in between wakes it.
        let changed = activity.changed.notified();
        let at = activity.idle_since().map(|t| t + idle);
        tokio::select! {
            _ = conn.as_mut() => return Ended::Done,
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    return Ended::Shutdown;
                }
            }
            _ = async { tokio::time::sleep_until(at.unwrap_or_else(Instant::now)).await },
                if at.is_some() =>
            {
                if activity.idle_since().is_some_and(|t| Instant::now() >= t + idle) {
                    return Ended::Idle;
                }
            }
            _ = changed => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Connection caps

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; gives its slot back when dropped.
struct Permit {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
    metrics: Arc<Metrics>,
    port: Port,
}

impl Permit {
    fn admit(
        counts: &Arc<Mutex<Counts>>,
        ip: IpAddr,
        limits: &ConnectionConfig,
        metrics: &Arc<Metrics>,
        port: Port,
    ) -> Result<Permit, &'static str> {
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= limits.max_connections {
            return Err("max_connections");
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= limits.max_connections_per_ip {
            return Err("max_connections_per_ip");
        }
        *n += 1;
        c.total += 1;
        metrics.connections_open(port.label()).inc();
        Ok(Permit {
            counts: counts.clone(),
            ip,
            metrics: metrics.clone(),
            port,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        self.metrics.connections_open(self.port.label()).dec();
    }
}

// ---------------------------------------------------------------------------------------
// Request activity and the deadlines it drives

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
}

/// Requests on one connection, shared by its IO (which enforces the deadlines) and its
/// service (which reports requests starting and ending).
#[derive(Debug)]
struct Activity {
    inner: Mutex<ActivityState>,
    /// Notified when a request begins or ends (the connection task re-reads its idle
    /// deadline).
    changed: Notify,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    requests: u64,
    accepted: Instant,
    last_end: Instant,
}

impl Activity {
    fn new() -> Self {
        let now = Instant::now();
        Activity {
            inner: Mutex::new(ActivityState {
                in_flight: 0,
                requests: 0,
                accepted: now,
                last_end: now,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        {
            let mut s = self.lock();
            s.in_flight += 1;
            s.requests += 1;
        }
        self.changed.notify_one();
        InFlight(self.clone())
    }

    /// The deadline of the first request, while none has begun (the IO enforces it).
    fn header_deadline(&self, t: Timeouts) -> Option<Instant> {
        let s = self.lock();
        (s.requests == 0).then_some(s.accepted + t.header)
    }

    /// Since when the connection has been idle: a request was served and none is in
    /// flight (the connection task enforces the idle timeout from it).
    fn idle_since(&self) -> Option<Instant> {
        let s = self.lock();
        (s.requests > 0 && s.in_flight == 0).then_some(s.last_end)
    }
}

/// A request in flight; ends when dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let last = {
            let mut s = self.0.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            s.last_end = Instant::now();
            s.in_flight == 0
        };
        if last {
            self.0.changed.notify_one();
        }
    }
}

/// The connection's socket: once the first request's deadline (`header_read_timeout`) has
/// passed without one, reads fail with `TimedOut` and hyper closes the connection at once
/// (a client that has not sent a whole request gets no graceful close).
struct GuardedIo {
    io: TcpStream,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    metrics: Arc<Metrics>,
    port: Port,
    expired: bool,
}

impl GuardedIo {
    fn new(
        io: TcpStream,
        activity: Arc<Activity>,
        timeouts: Timeouts,
        metrics: Arc<Metrics>,
        port: Port,
    ) -> Self {
        GuardedIo {
            io,
            activity,
            timeouts,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
            metrics,
            port,
            expired: false,
        }
    }

    /// `Some(reason)` once the connection is past its deadline; otherwise arms the timer so
    /// the task is woken when it passes.
    fn check(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        let reason = "header_read_timeout";
        let deadline = self.activity.header_deadline(self.timeouts)?;
        if Instant::now() >= deadline {
            return Some(reason);
        }
        if self.armed != Some(deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Some(reason),
            Poll::Pending => None,
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        // The deadline is checked before reading, so a client that keeps a trickle of bytes
        // coming cannot push it back.
        if let Some(reason) = this.check(cx) {
            this.expired = true;
            this.metrics.connection_closed(this.port.label(), reason);
            tracing::debug!(port = this.port.label(), reason, "closing connection");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, reason)));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The per-connection service with request tracking and the request deadline.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    port: Port,
}

/// A response body that keeps its request in flight until it has been sent whole, so a
/// long response (a watch's stream) is not an idle connection; it is bounded by the
/// watch limits (`live.rs`) and ends when the client stops reading.
struct Held<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl<S: ConnService> hyper::service::Service<Request<Incoming>> for Tracked<S> {
    type Response = Response<Held<S::Body>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let fut = self.inner.call(req);
        let inner = self.inner.clone();
        let (timeout, metrics, port) = (self.timeout, self.metrics.clone(), self.port);
        Box::pin(async move {
            let resp = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => {
                    metrics.request_timed_out(port.label());
                    inner.timed_out()
                }
            };
            Ok(resp.map(|body| Held {
                body,
                _in_flight: guard,
            }))
        })
    }
}

/// Listen backlog for the public listener. tokio's default (1,024) overflows when thousands
/// of idle connections are cut at once and reconnect together: a real client's SYN is then
/// dropped and retried only after the kernel's 1 s SYN timeout. The kernel caps it at
/// `net.core.somaxconn` (4,096 on current kernels).
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as tokio's `bind` does).
pub(crate) fn bind_listener(
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
