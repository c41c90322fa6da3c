//! Ports for child servers that bind an address given in their config.
//!
//! A port learnt by binding `127.0.0.1:0` and releasing it comes from the kernel's ephemeral
//! range, the range every outgoing connection also takes its local port from: between the
//! release and the child's bind, any connection on the machine (a NATS route, a client, a
//! parallel test) can take it, and the child fails with "Address already in use". Ports
//! below that range are never handed out implicitly, so [`Reserved`] picks from there (at a
//! random place, so that several runs at once rarely meet) and holds each one bound until
//! the children are about to start.

use std::net::{Ipv4Addr, TcpListener};

use anyhow::{Context, Result, bail};

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
    pub fn take(&mut self) -> Result<u16> {
        let l = match below_ephemeral() {
            Some((lo, hi)) => bind_in(lo, hi)?,
            None => {
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind 127.0.0.1:0")?
            }
        };
        let port = l.local_addr()?.port();
        self.held.push(l);
        Ok(port)
    }

    /// Releases every port held, for the children to bind.
    pub fn release(self) {}
}

/// `[FLOOR, start of the ephemeral range)`, if that is at least [`MIN_SPAN`] wide.
fn below_ephemeral() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let start: u16 = text.split_whitespace().next()?.parse().ok()?;
    (start >= FLOOR.saturating_add(MIN_SPAN)).then_some((FLOOR, start))
}

/// The first port of `[lo, hi)` that binds, starting at a random place and wrapping.
fn bind_in(lo: u16, hi: u16) -> Result<TcpListener> {
    let span = u32::from(hi - lo);
    let mut seed = [0u8; 4];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let first = u32::from_le_bytes(seed) % span;
    for k in 0..span {
        let port = lo + u16::try_from((first + k) % span).expect("below hi, a u16");
        if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            return Ok(l);
        }
    }
    bail!("no free port on 127.0.0.1 in {lo}..{hi}")
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
        r.release();
        for &p in &ports {
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
        }
    }
}
