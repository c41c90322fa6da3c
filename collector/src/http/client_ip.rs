//! Which address a request comes from: the TCP peer, unless the peer is a trusted proxy
//! (`trusted_proxies`), in which case the rightmost hop of `Forwarded` (RFC 7239) or, when
//! that header is absent, `X-Forwarded-For` that is not itself a trusted proxy.
//!
//! Headers from anyone else are ignored: a client cannot choose its own rate-limit bucket
//! by sending `X-Forwarded-For`. Parsing is bounded (at most [`MAX_HOPS`] hops are looked
//! at) and never fails: anything unparseable stops the walk at the last trusted hop.

use std::net::IpAddr;

use hyper::HeaderMap;
use ipnet::IpNet;

/// Most hops of a forwarding chain examined (right to left); a longer chain is attributed
/// to the hop where the walk stopped.
pub const MAX_HOPS: usize = 32;

/// The trusted-proxy list.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Trusts `nets` (empty: trust nobody, the peer is always the client).
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies { nets }
    }

    /// True if `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client address of a request from `peer` carrying `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if self.nets.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let forwarded: Vec<&[u8]> = headers
            .get_all(hyper::header::FORWARDED)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let xff: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if forwarded.is_empty() {
            self.walk(peer, hops_right_to_left(&xff, parse_xff_element))
        } else {
            self.walk(
                peer,
                hops_right_to_left(&forwarded, parse_forwarded_element),
            )
        }
    }

    /// Walks hops from the right: the first one that is not trusted is the client.
    fn walk(&self, peer: IpAddr, hops: impl Iterator<Item = Option<IpAddr>>) -> IpAddr {
        let mut current = peer;
        for hop in hops.take(MAX_HOPS) {
            match hop {
                Some(ip) => {
                    current = ip;
                    if !self.trusts(ip) {
                        return ip;
                    }
                }
                // "unknown", an obfuscated node or garbage: nothing further left is
                // trustworthy; the last trusted hop answers for it.
                None => return current,
            }
        }
        current
    }
}

/// The comma-separated elements of header lines `values` (in order), from the right.
fn hops_right_to_left<'a>(
    values: &'a [&'a [u8]],
    parse: fn(&str) -> Option<IpAddr>,
) -> impl Iterator<Item = Option<IpAddr>> + 'a {
    values.iter().rev().flat_map(move |v| {
        let s = std::str::from_utf8(v).unwrap_or("\u{0}");
        s.rsplit(',').map(parse)
    })
}

/// One `X-Forwarded-For` element: an IP, possibly with a port (`1.2.3.4:5`,
/// `[::1]:5`).
pub fn parse_xff_element(e: &str) -> Option<IpAddr> {
    parse_node(e.trim())
}

/// One `Forwarded` element (`for=192.0.2.60;proto=http;by=...`): its `for` node.
pub fn parse_forwarded_element(e: &str) -> Option<IpAddr> {
    let value = e.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    parse_node(value)
}

/// `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]`, `[2001:db8::1]:80`, `2001:db8::1`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let (ip, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use proptest::prelude::*;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_send() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(t.client_ip(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        assert_eq!(
            TrustedProxies::default().client_ip(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn rightmost_untrusted_hop_wins() {
        let t = trusted(&["10.0.0.0/8", "192.168.1.1/32"]);
        // The client forged "6.6.6.6"; the LB appended the real address and a proxy hop.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.2.3")]);
        assert_eq!(t.client_ip(ip("192.168.1.1"), &h), ip("198.51.100.7"));
        // Several header lines are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.8:443"),
        ]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("198.51.100.8"));
        // Forwarded is preferred over X-Forwarded-For.
        let h = headers(&[
            (
                "forwarded",
                r#"for=6.6.6.6, for="[2001:db8::7]:4711";proto=https"#,
            ),
            ("x-forwarded-for", "198.51.100.9"),
        ]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("2001:db8::7"));
        // All hops trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.1.1")]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.9.9.9"));
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, unknown, 10.1.1.1")]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.1.1.1"));
        let h = headers(&[("forwarded", "for=_hidden")]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        // No header: the proxy itself.
        assert_eq!(
            t.client_ip(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
        // IPv4-mapped peers match IPv4 nets.
        let h = headers(&[("x-forwarded-for", "198.51.100.10")]);
        assert_eq!(t.client_ip(ip("::ffff:10.0.0.1"), &h), ip("198.51.100.10"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary header bytes never panic, and the answer is always the peer, a
        /// trusted hop, or an address written in the headers.
        #[test]
        fn arbitrary_headers_never_panic(
            xff in proptest::collection::vec(any::<u8>(), 0..300),
            fwd in proptest::collection::vec(any::<u8>(), 0..300),
            peer_last in any::<u8>(),
        ) {
            let t = trusted(&["10.0.0.0/8", "::1/128"]);
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&xff) {
                h.append("x-forwarded-for", v);
            }
            let with_fwd = HeaderValue::from_bytes(&fwd).ok();
            if let Some(v) = with_fwd.clone() {
                h.append("forwarded", v);
            }
            let peer = IpAddr::from([10, 0, 0, peer_last]);
            let got = t.client_ip(peer, &h);
            let text = format!(
                "{} {}",
                String::from_utf8_lossy(&xff),
                String::from_utf8_lossy(&fwd)
            );
            prop_assert!(got == peer || t.trusts(got) || text.contains(&got.to_string())
                || text.to_ascii_lowercase().contains(&got.to_string()),
                "{got} from {text:?}");
        }

        /// A chain of well-formed hops resolves exactly like the reference walk.
        #[test]
        fn xff_chain_matches_reference(
            hops in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..40),
        ) {
            let t = trusted(&["10.0.0.0/8"]);
            let addrs: Vec<IpAddr> = hops
                .iter()
                .map(|&(tr, b)| if tr { IpAddr::from([10, 0, 0, b]) } else { IpAddr::from([198, 51, 100, b]) })
                .collect();
            let list = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
            let mut h = HeaderMap::new();
            if !addrs.is_empty() {
                h.append("x-forwarded-for", HeaderValue::from_str(&list).unwrap());
            }
            let peer = ip("10.0.0.254");
            // Reference: scan from the right, at most MAX_HOPS hops.
            let mut expect = peer;
            for a in addrs.iter().rev().take(MAX_HOPS) {
                expect = *a;
                if !t.trusts(*a) {
                    break;
                }
            }
            prop_assert_eq!(t.client_ip(peer, &h), expect);
        }
    }
}
