//! Who the client is when requests arrive through proxies. The peer address
//! is the client unless the peer is a trusted proxy (the split gateway, a load
//! balancer); then the right-most `X-Forwarded-For` entry that is not itself
//! a trusted proxy is. Entries a client wrote further left are never believed,
//! so nobody can pick the address their login attempts are counted against.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A configured proxy list could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("PLINTH_TRUSTED_PROXIES: {entry:?} is not an IP address or CIDR range")]
pub struct ProxyListError {
    entry: String,
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses a comma-separated list of addresses and CIDR ranges.
    pub fn parse(list: &str) -> Result<Self, ProxyListError> {
        let nets = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| ProxyListError {
                        entry: entry.to_owned(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { nets })
    }

    fn trusts(&self, ip: &IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The client's address for a request from `peer` carrying `forwarded_for`
    /// (the `X-Forwarded-For` value, if any).
    pub fn client(&self, peer: Option<SocketAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        let peer = peer?.ip();
        if !self.trusts(&peer) {
            return Some(peer);
        }
        let Some(chain) = forwarded_for else {
            return Some(peer);
        };
        let mut client = peer;
        for hop in chain.rsplit(',').map(str::trim) {
            match hop.parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !self.trusts(&ip) {
                        break;
                    }
                }
                // A malformed entry: stop at the last address we could believe.
                Err(_) => break,
            }
        }
        Some(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().unwrap(), 1234))
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_claim() {
        let t = TrustedProxies::parse("10.0.0.0/8").unwrap();
        assert_eq!(
            t.client(peer("203.0.113.9"), Some("1.2.3.4")),
            "203.0.113.9".parse().ok()
        );
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let t = TrustedProxies::parse("10.0.0.0/8, 192.168.1.1").unwrap();
        // Client-written entries left of the real client are ignored.
        let chain = "6.6.6.6, 198.51.100.7, 192.168.1.1";
        assert_eq!(t.client(peer("10.1.2.3"), Some(chain)), "198.51.100.7".parse().ok());
        assert_eq!(t.client(peer("10.1.2.3"), None), "10.1.2.3".parse().ok());
        assert_eq!(t.client(peer("10.1.2.3"), Some("garbage")), "10.1.2.3".parse().ok());
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
    }
}
