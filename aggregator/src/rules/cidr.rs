//! The operator's data-center ranges: a file of CIDRs turned into sorted, merged address
//! intervals per family, looked up by binary search (O(log n) per click, no linear scan).
//! Knows nothing of clicks or config: bytes in, a set out.
//!
//! File format (`docs/api.md` and `deploy/rules/datacenter-cidrs.txt`): UTF-8 text, one
//! IPv4 or IPv6 CIDR per line (`203.0.113.0/24`, `2001:db8::/32`; a bare address is a
//! /32 or /128); blank lines and anything after `#` are ignored. Host bits below the
//! prefix must be zero (a typo like `10.0.0.1/8` is refused, naming the line). IPv4-mapped
//! IPv6 client addresses (`::ffff:a.b.c.d`) are looked up as IPv4.

use std::net::IpAddr;

/// Longest CIDR file read (bytes): a full cloud-provider list is a few MiB.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why a CIDR file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CidrError(pub String);

/// Merged, sorted, inclusive intervals per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

fn merge<T: Copy + Ord + num_like::Succ>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            // Overlapping or adjacent: one interval.
            Some(last) if last.1.succ().is_none_or(|n| lo <= n) => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

mod num_like {
    /// The next value, `None` at the maximum.
    pub trait Succ: Sized {
        fn succ(self) -> Option<Self>;
    }
    impl Succ for u32 {
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
    }
    impl Succ for u128 {
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
    }
}

fn contains<T: Copy + Ord>(v: &[(T, T)], x: T) -> bool {
    // The last interval starting at or below x is the only candidate.
    let i = v.partition_point(|&(lo, _)| lo <= x);
    i > 0 && x <= v[i - 1].1
}

impl CidrSet {
    /// Parses the file's text; an error names the first bad line.
    pub fn parse(text: &str) -> Result<CidrSet, CidrError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| CidrError(format!("line {}: {why}: {line:?}", n + 1));
            let (addr, len) = match line.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (line, None),
            };
            let addr: IpAddr = addr
                .trim()
                .parse()
                .map_err(|_| bad("not an IPv4 or IPv6 address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len: u32 = match len {
                Some(l) => l
                    .trim()
                    .parse()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| bad(&format!("prefix length must be 0 to {max}")))?,
                None => max,
            };
            match addr {
                IpAddr::V4(a) => {
                    let a = u32::from(a);
                    let host = u32::MAX.checked_shr(len).unwrap_or(0);
                    if a & host != 0 {
                        return Err(bad("host bits set below the prefix"));
                    }
                    v4.push((a, a | host));
                }
                IpAddr::V6(a) => {
                    let a = u128::from(a);
                    let host = u128::MAX.checked_shr(len).unwrap_or(0);
                    if a & host != 0 {
                        return Err(bad("host bits set below the prefix"));
                    }
                    v6.push((a, a | host));
                }
            }
        }
        Ok(CidrSet {
            v4: merge(v4),
            v6: merge(v6),
        })
    }

    /// Reads and parses `path`.
    pub fn load(path: &std::path::Path) -> Result<CidrSet, CidrError> {
        let fail = |e: &dyn std::fmt::Display| {
            CidrError(format!(
                "rules.datacenter_ip.cidr_file {}: {e}",
                path.display()
            ))
        };
        let len = std::fs::metadata(path).map_err(|e| fail(&e))?.len();
        if len > MAX_FILE_BYTES {
            return Err(fail(&format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(&e))?;
        CidrSet::parse(&text).map_err(|e| fail(&e))
    }

    /// Whether a client IP as the wire carries it (4 or 16 bytes; anything else: no) is in
    /// a range.
    pub fn contains(&self, ip: &[u8]) -> bool {
        match ip.len() {
            4 => contains(&self.v4, u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]])),
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(ip);
                let a = std::net::Ipv6Addr::from(b);
                match a.to_ipv4_mapped() {
                    Some(v4) => contains(&self.v4, u32::from(v4)),
                    None => contains(&self.v6, u128::from(a)),
                }
            }
            _ => false,
        }
    }

    /// Intervals after merging (IPv4, IPv6).
    pub fn len(&self) -> (usize, usize) {
        (self.v4.len(), self.v6.len())
    }

    /// No range at all.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_merges_and_refuses_with_the_line() {
        let s = CidrSet::parse(
            "# example\n10.0.0.0/8\n10.1.0.0/16 # inside\n11.0.0.0/8\n\n192.0.2.7\n2001:db8::/32\n",
        )
        .unwrap();
        assert_eq!(s.len(), (2, 1));
        assert!(s.contains(&[10, 200, 1, 1]));
        assert!(s.contains(&[11, 255, 255, 255]));
        assert!(!s.contains(&[12, 0, 0, 0]));
        assert!(s.contains(&[192, 0, 2, 7]));
        assert!(!s.contains(&[192, 0, 2, 8]));
        let mut v6 = [0u8; 16];
        v6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        assert!(s.contains(&v6));
        // ::ffff:10.0.0.1 is IPv4.
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 0, 0, 1]);
        assert!(s.contains(&mapped));
        assert!(!s.contains(&[]));
        let e = CidrSet::parse("10.0.0.0/8\n10.0.0.1/8\n").unwrap_err();
        assert!(e.0.contains("line 2"), "{e}");
        assert!(CidrSet::parse("300.0.0.0/8").is_err());
        assert!(CidrSet::parse("10.0.0.0/33").is_err());
        assert!(CidrSet::parse("0.0.0.0/0").unwrap().contains(&[1, 2, 3, 4]));
    }

    proptest! {
        /// Binary search over merged intervals answers as a linear scan of the raw
        /// prefixes does.
        #[test]
        fn agrees_with_a_linear_scan(
            nets in proptest::collection::vec((any::<u32>(), 0u32..=32), 0..30),
            probes in proptest::collection::vec(any::<u32>(), 0..50),
        ) {
            let nets: Vec<(u32, u32)> = nets.into_iter().map(|(a, l)| {
                let host = u32::MAX.checked_shr(l).unwrap_or(0);
                (a & !host, l)
            }).collect();
            let text: String = nets.iter().map(|(a, l)| format!("{}/{l}\n", std::net::Ipv4Addr::from(*a))).collect();
            let set = CidrSet::parse(&text).unwrap();
            for p in probes.iter().copied().chain(nets.iter().map(|n| n.0)) {
                let linear = nets.iter().any(|(a, l)| {
                    let host = u32::MAX.checked_shr(*l).unwrap_or(0);
                    p & !host == *a
                });
                prop_assert_eq!(set.contains(&p.to_be_bytes()), linear);
            }
        }
    }
}
