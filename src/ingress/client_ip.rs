//! The client address: the TCP peer, or — when the peer is a trusted proxy — the right-most
//! `X-Forwarded-For` entry that is not itself a trusted proxy.
//!
//! An entry that does not parse as an address ends the walk with no address (`None`), which
//! no allowlist admits: a forged or mangled header can never widen access.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    let ip = canonical(ip);
    proxies.iter().any(|n| n.contains(&ip))
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) compare as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // "[2001:db8::1]:443" or "203.0.113.9:1234"
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}

/// The address the allowlist is checked against.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, proxies: &[IpNet]) -> Option<IpAddr> {
    let peer = canonical(peer);
    if !trusted(peer, proxies) {
        return Some(peer);
    }
    let mut entries: Vec<&str> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(text) = v.to_str() else {
            return None;
        };
        entries.extend(text.split(',').filter(|e| !e.trim().is_empty()));
    }
    let mut last = peer;
    for e in entries.iter().rev() {
        let ip = canonical(parse_entry(e)?);
        if !trusted(ip, proxies) {
            return Some(ip);
        }
        last = ip;
    }
    // Every hop is a trusted proxy: the left-most one is as close to the client as we know.
    Some(last)
}

/// Whether `ip` passes `allow` (empty = anyone).
pub fn allowed(ip: Option<IpAddr>, allow: &[IpNet]) -> bool {
    if allow.is_empty() {
        return true;
    }
    match ip {
        Some(ip) => allow.iter().any(|n| n.contains(&canonical(ip))),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_ignores_header() {
        let ip = client_ip("198.51.100.7".parse().unwrap(), &xff(&["1.2.3.4"]), &[]);
        assert_eq!(ip, Some("198.51.100.7".parse().unwrap()));
    }

    #[test]
    fn rightmost_untrusted_entry_wins() {
        let proxies = nets(&["10.0.0.0/8"]);
        let h = xff(&["6.6.6.6, 203.0.113.5", "10.0.0.2"]);
        let ip = client_ip("10.0.0.1".parse().unwrap(), &h, &proxies);
        assert_eq!(ip, Some("203.0.113.5".parse().unwrap()));
    }

    #[test]
    fn garbage_entry_gives_no_address() {
        let proxies = nets(&["10.0.0.0/8"]);
        let ip = client_ip("10.0.0.1".parse().unwrap(), &xff(&["nonsense"]), &proxies);
        assert_eq!(ip, None);
        assert!(!allowed(ip, &nets(&["0.0.0.0/0"])));
        assert!(allowed(ip, &[]));
    }

    #[test]
    fn mapped_v6_peer_is_v4() {
        let ip = client_ip(
            "::ffff:203.0.113.9".parse().unwrap(),
            &HeaderMap::new(),
            &[],
        );
        assert!(allowed(ip, &nets(&["203.0.113.0/24"])));
    }
}
