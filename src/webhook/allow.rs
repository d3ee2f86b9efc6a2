//! Where webhooks may point: the operator's allow-list of destinations (`webhook_allow`),
//! checked against the addresses a url's host resolves to, so a token holder cannot make the
//! server call an internal service (SSRF). Parsing and matching are pure; [`resolve`] does
//! the one name resolution, and the sender connects to the very address it returned.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// The default allow-list: loopback only.
pub const DEFAULT: &[&str] = &["127.0.0.0/8", "::1/128"];

/// One entry of the allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// Addresses in a network (a single address is a /32 or /128), any port or one.
    Net { net: IpNet, port: Option<u16> },
    /// A host name, matched literally (case-insensitively) against the url's host: the
    /// operator trusts whatever that name resolves to.
    Name { name: String, port: Option<u16> },
}

/// The parsed `webhook_allow` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<Entry>,
}

/// A destination, as a webhook's url names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The url's host (a name, or an address without brackets).
    pub host: String,
    /// The port (the scheme's default when the url names none).
    pub port: u16,
}

impl AllowList {
    /// Parses entries of the forms `10.0.0.0/8`, `127.0.0.1`, `127.0.0.1:9000`, `::1/128`,
    /// `[::1]:9000`, `hooks.example.com`, `hooks.example.com:443`.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, String> {
        let entries = entries
            .iter()
            .map(|e| parse_entry(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowList { entries })
    }

    /// Whether `dest`, whose host resolved to `addrs`, may be called: its host name is listed
    /// (with its port, when the entry names one), or every one of `addrs` lies in a listed
    /// network (likewise). An empty `addrs` is refused.
    pub fn allows(&self, dest: &Destination, addrs: &[IpAddr]) -> bool {
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == dest.port);
        let by_name = self.entries.iter().any(|e| match e {
            Entry::Name { name, port } => name.eq_ignore_ascii_case(&dest.host) && port_ok(port),
            Entry::Net { .. } => false,
        });
        by_name
            || (!addrs.is_empty()
                && addrs.iter().all(|ip| {
                    self.entries.iter().any(|e| match e {
                        Entry::Net { net, port } => net.contains(&canonical(*ip)) && port_ok(port),
                        Entry::Name { .. } => false,
                    })
                }))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is, so `::ffff:10.0.0.1` cannot slip
/// past an IPv4 entry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_entry(text: &str) -> Result<Entry, String> {
    let t = text.trim();
    let bad = |why: &str| format!("webhook_allow entry {text:?}: {why}");
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(Entry::Net { net, port: None });
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(Entry::Net {
            net: IpNet::from(ip),
            port: None,
        });
    }
    if let Ok(sa) = t.parse::<SocketAddr>() {
        return Ok(Entry::Net {
            net: IpNet::from(sa.ip()),
            port: Some(sa.port()),
        });
    }
    let (host, port) = match t.rsplit_once(':') {
        Some((h, p)) => (
            h,
            Some(
                p.parse::<u16>()
                    .map_err(|_| bad("the part after ':' is not a port"))?,
            ),
        ),
        None => (t, None),
    };
    // `10.0.0.0/8:443` and the like: a network with a port.
    if let (Ok(net), Some(port)) = (host.parse::<IpNet>(), port) {
        return Ok(Entry::Net {
            net,
            port: Some(port),
        });
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !name_ok {
        return Err(bad(
            "expected an address, a network (CIDR) or a host name, with an optional :port",
        ));
    }
    Ok(Entry::Name {
        name: host.to_ascii_lowercase(),
        port,
    })
}

/// Resolves `dest` and checks it against `allow`: the address to connect to (the first one
/// resolved), or why not. `Err(None)` when the name does not resolve, `Err(Some(addrs))`
/// when the allow-list refuses what it resolved to.
pub async fn resolve(allow: &AllowList, dest: &Destination) -> Result<SocketAddr, Refusal> {
    let addrs: Vec<SocketAddr> = match dest.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, dest.port)],
        Err(_) => match tokio::net::lookup_host((dest.host.as_str(), dest.port)).await {
            Ok(found) => found.collect(),
            Err(e) => return Err(Refusal::Unresolved(e.to_string())),
        },
    };
    let ips: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
    if ips.is_empty() {
        return Err(Refusal::Unresolved("no address".into()));
    }
    if !allow.allows(dest, &ips) {
        return Err(Refusal::NotAllowed(ips));
    }
    Ok(addrs[0])
}

/// Why a destination cannot be called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The host name does not resolve.
    Unresolved(String),
    /// It resolves to these addresses, which the allow-list does not cover.
    NotAllowed(Vec<IpAddr>),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unresolved(e) => write!(f, "the host does not resolve: {e}"),
            Refusal::NotAllowed(ips) => {
                let shown: Vec<String> = ips.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "the destination ({}) is not in webhook_allow",
                    shown.join(", ")
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str, port: u16) -> Destination {
        Destination {
            host: host.into(),
            port,
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_default_allows_loopback_on_any_port_and_nothing_else() {
        let allow = AllowList::parse(DEFAULT).unwrap();
        assert!(allow.allows(&dest("127.0.0.1", 9000), &ips(&["127.0.0.1"])));
        assert!(allow.allows(&dest("localhost", 1), &ips(&["127.0.0.1", "::1"])));
        assert!(!allow.allows(&dest("10.0.0.1", 80), &ips(&["10.0.0.1"])));
        assert!(
            !allow.allows(&dest("mixed.example", 80), &ips(&["127.0.0.1", "10.0.0.1"])),
            "every resolved address must be allowed"
        );
        assert!(!allow.allows(&dest("::ffff:10.0.0.1", 80), &ips(&["::ffff:10.0.0.1"])));
        assert!(!allow.allows(&dest("nothing", 80), &[]));
    }

    #[test]
    fn entries_with_a_port_allow_only_that_port() {
        let allow = AllowList::parse(&["127.0.0.1:9000", "[::1]:9001", "10.0.0.0/8:443"]).unwrap();
        assert!(allow.allows(&dest("127.0.0.1", 9000), &ips(&["127.0.0.1"])));
        assert!(!allow.allows(&dest("127.0.0.1", 9001), &ips(&["127.0.0.1"])));
        assert!(allow.allows(&dest("::1", 9001), &ips(&["::1"])));
        assert!(allow.allows(&dest("10.1.2.3", 443), &ips(&["10.1.2.3"])));
        assert!(!allow.allows(&dest("10.1.2.3", 80), &ips(&["10.1.2.3"])));
    }

    #[test]
    fn a_listed_name_is_trusted_whatever_it_resolves_to() {
        let allow = AllowList::parse(&["Hooks.Example.com:443"]).unwrap();
        assert!(allow.allows(&dest("hooks.example.com", 443), &ips(&["10.0.0.5"])));
        assert!(!allow.allows(&dest("hooks.example.com", 80), &ips(&["10.0.0.5"])));
        assert!(!allow.allows(&dest("other.example.com", 443), &ips(&["10.0.0.5"])));
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "host:port",
            "a..b",
            "under_score.example",
            "[::1]",
        ] {
            assert!(AllowList::parse(&[bad]).is_err(), "{bad:?}");
        }
    }
}
