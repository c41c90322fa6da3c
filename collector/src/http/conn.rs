//! Connection bookkeeping shared by the HTTP and QUIC listeners: the per-listener and
//! per-client-IP caps ([`ConnLimiter`]) and the per-connection activity clock
//! ([`Activity`]) that the HTTP listener uses to close connections that send nothing.
//!
//! A refused connection costs the accept and a close: no task, no buffer. This module
//! must not know about requests or clicks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `limits.max_connections` reached on this listener.
    Listener,
    /// `limits.max_connections_per_ip` reached for this client.
    PerIp,
}

impl Refused {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Listener => "listener_cap",
            Refused::PerIp => "per_ip_cap",
        }
    }
}

#[derive(Debug)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, u32>,
}

/// Open-connection counts of one listener.
#[derive(Debug)]
pub struct ConnLimiter {
    max: usize,
    max_per_ip: u32,
    counts: Mutex<Counts>,
}

/// Held while a connection is open; releases its slot on drop.
#[derive(Debug)]
pub struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    /// At most `max` connections, `max_per_ip` of them from one address.
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max,
            max_per_ip: u32::try_from(max_per_ip).unwrap_or(u32::MAX),
            counts: Mutex::new(Counts {
                total: 0,
                per_ip: HashMap::new(),
            }),
        })
    }

    /// Takes a slot for a connection from `ip` (IPv6: its /64), or says why not.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refused> {
        // IPv6 by /64, as the rate limit: one /64 must not open a connection per address.
        let ip = super::ratelimit::key(ip);
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.max {
            return Err(Refused::Listener);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        c.total += 1;
        Ok(ConnSlot {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// The process's soft open-file limit (Linux `/proc/self/limits`), if known.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Warns when `max_connections` cannot be reached because the open-file limit is lower:
/// then `accept` fails with EMFILE before the cap refuses anyone, and real clients wait in
/// the backlog instead of being served.
pub fn warn_if_files_limit_low(listener: &str, max_connections: usize) {
    if let Some(limit) = open_files_limit()
        && limit < max_connections as u64 + 256
    {
        tracing::warn!(
            listener,
            open_files_limit = limit,
            max_connections,
            "the open-file limit (ulimit -n) is below limits.max_connections + 256: raise it, or lower max_connections"
        );
    }
}

/// What one HTTP connection has been doing, updated by its request handlers and read by
/// its watchdog.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    in_flight: AtomicU32,
    served: AtomicBool,
    /// Ms after `started` when the last request finished.
    last_done_ms: AtomicU64,
    /// Notified when a request begins or ends: the watchdog's deadline moves.
    changed: tokio::sync::Notify,
}

/// Marks a request in progress; dropping it marks it done.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No complete request within `header_read_timeout_ms` of the connection opening.
    FirstRequest,
    /// No request for `idle_timeout_ms` after the last one.
    Idle,
}

impl Expired {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Expired::FirstRequest => "header_timeout",
            Expired::Idle => "idle_timeout",
        }
    }
}

impl Activity {
    /// A connection opened now.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            started: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            last_done_ms: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Resolves at the next request beginning or ending (one that happened since the last
    /// call counts): the watchdog then reads its [`Activity::deadline`] again.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A request's headers are complete and its handler starts.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    /// When the connection must be closed if nothing happens before then, and why; or,
    /// while a request is in progress (its handler has its own deadlines), when to look
    /// again.
    pub fn deadline(&self, header: Duration, idle: Duration) -> (Instant, Option<Expired>) {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return (Instant::now() + idle, None);
        }
        if !self.served.load(Ordering::Acquire) {
            return (self.started + header, Some(Expired::FirstRequest));
        }
        let done = Duration::from_millis(self.last_done_ms.load(Ordering::Acquire));
        (self.started + done + idle, Some(Expired::Idle))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_done_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_of_one_64_share_the_per_ip_cap() {
        let l = ConnLimiter::new(100, 2);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let c: IpAddr = "2001:db8::3".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let _s1 = l.try_acquire(a).unwrap();
        let _s2 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(c).err(), Some(Refused::PerIp));
        assert!(l.try_acquire(other).is_ok());
    }

    #[test]
    fn caps_per_listener_and_per_ip_and_release_on_drop() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.try_acquire(a).unwrap();
        let _s2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Refused::PerIp);
        // The mapped form is the same client.
        assert_eq!(
            l.try_acquire("::ffff:10.0.0.1".parse().unwrap())
                .unwrap_err(),
            Refused::PerIp
        );
        let _s3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).unwrap_err(), Refused::Listener);
        drop(s1);
        assert_eq!(l.open(), 2);
        let _s4 = l.try_acquire(a).unwrap();
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let (h, i) = (Duration::from_secs(5), Duration::from_secs(10));
        let act = Activity::new();
        let t0 = act.started;
        assert_eq!(act.deadline(h, i), (t0 + h, Some(Expired::FirstRequest)));
        let req = act.begin();
        assert_eq!(act.deadline(h, i).1, None, "no deadline while in flight");
        std::thread::sleep(Duration::from_millis(20));
        drop(req);
        let (at, why) = act.deadline(h, i);
        assert_eq!(why, Some(Expired::Idle));
        assert!(at >= t0 + Duration::from_millis(20) + i && at <= Instant::now() + i);
    }
}
