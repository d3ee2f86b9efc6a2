//! Who a client is, as far as per-client limits go: the peer address of its TCP connection,
//! masked so that one host cannot pose as many (an IPv6 client counts as its /64, the
//! smallest network a site is usually given).
//!
//! Behind a reverse proxy every connection comes from the proxy's address; per-address limits
//! then apply to the proxy as a whole (see the README's notes on `max_connections_per_ip`).

use std::net::{IpAddr, Ipv6Addr};

/// The peer address of the connection a request arrived on. The server inserts it into every
/// request's extensions before the router sees the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

/// The key per-address limits count `ip` under: an IPv4 address as it is (also when it
/// arrives IPv4-mapped in IPv6), an IPv6 address by its /64 prefix (the rest zeroed).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);
    }
}
