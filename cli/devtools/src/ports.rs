//! Ports for child servers that bind an address given in their config.
//!
//! A port learnt by binding `127.0.0.1:0` and releasing it comes from the kernel's ephemeral
//! range, the range every outgoing connection also takes its local port from: between the
//! release and the child's bind, any connection on the machine (a NATS route, a client, a
//! parallel test) can take it, and the child fails with "Address already in use". Ports
//! below that range are never handed out implicitly, so [`Reserved`] picks from there (at a
//! random place, so that several runs at once rarely meet), holds each one bound while
//! more are picked (so they are distinct), and never hands one out twice in a process.
//! Callers release them before their children bind; only another program binding ports
//! below the ephemeral range (rare: other test harnesses like this one) can still take one
//! meanwhile, and the child then fails to start, saying so.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

/// Every port this process has handed out: never twice, so that two callers that each
/// release theirs before their servers bind cannot be given the same one.
static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// The lowest port picked (below: the well-known and registered services people run).
const FLOOR: u16 = 10_000;
/// The smallest usable stretch below the ephemeral range; with less, ports come from bind(0).
const MIN_SPAN: u16 = 1_000;

/// Ports bound and held until [`Reserved::release`] (or drop).
#[derive(Debug, Default)]
pub struct Reserved {
    held: Vec<TcpListener>,
}

impl Reserved {
    /// Binds one more port on 127.0.0.1 (distinct from those held) and returns it.
    pub fn take(&mut self) -> io::Result<u16> {
        let l = match below_ephemeral() {
            Some((lo, hi)) => bind_in(lo, hi)?,
            None => bind_any()?,
        };
        let port = l.local_addr()?.port();
        GIVEN.lock().unwrap_or_else(|p| p.into_inner()).push(port);
        self.held.push(l);
        Ok(port)
    }

    /// Releases every port held, for the children to bind.
    pub fn release(self) {}
}

/// One port free now, released at once (never handed out again by this process).
pub fn free_port() -> io::Result<u16> {
    Reserved::default().take()
}

/// A port the OS picks (no room below the ephemeral range), skipping any this process has
/// handed out before.
fn bind_any() -> io::Result<TcpListener> {
    // Refused ones stay bound until the end, so the OS offers another port each time.
    let mut refused = Vec::new();
    for _ in 0..64 {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = l.local_addr()?.port();
        if !GIVEN
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&port)
        {
            return Ok(l);
        }
        refused.push(l);
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "the OS kept offering ports already handed out",
    ))
}

/// `[FLOOR, start of the ephemeral range)`, if that is at least [`MIN_SPAN`] wide.
fn below_ephemeral() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let start: u16 = text.split_whitespace().next()?.parse().ok()?;
    (start >= FLOOR.saturating_add(MIN_SPAN)).then_some((FLOOR, start))
}

/// The first port of `[lo, hi)` that binds, starting at a random place and wrapping.
fn bind_in(lo: u16, hi: u16) -> io::Result<TcpListener> {
    let span = hi - lo;
    // RandomState's keys are random per process (and per call after the first).
    let r = RandomState::new().hash_one(std::process::id()) % u64::from(span);
    let first = u16::try_from(r).unwrap_or(0);
    for port in (lo + first..hi).chain(lo..lo + first) {
        if GIVEN
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&port)
        {
            continue;
        }
        if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            return Ok(l);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free port on 127.0.0.1 in {lo}..{hi}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_held_and_outside_the_ephemeral_range() {
        let mut r = Reserved::default();
        let ports: Vec<u16> = (0..20).map(|_| r.take().unwrap()).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "{ports:?}");
        for &p in &ports {
            assert!(
                TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_err(),
                "{p} is held"
            );
        }
        if let Some((lo, hi)) = below_ephemeral() {
            assert!(ports.iter().all(|p| (lo..hi).contains(p)), "{ports:?}");
        }
        // Not re-bound after `release`: another process on the box may take a released
        // port at any time (CI once did), which is the point of picking them where
        // connections never do, not a guarantee.
        r.release();
        // Never handed out twice by this process.
        let again: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        assert!(
            again.iter().all(|p| !ports.contains(p)),
            "{again:?} {ports:?}"
        );
    }
}
