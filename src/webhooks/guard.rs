//! The SSRF guard: a webhook URL is http(s) and never reaches this machine, its
//! network or the cloud's metadata service, unless `LEDGER_WEBHOOK_ALLOW_PRIVATE=true`.
//! Checked when a webhook is registered and again on every delivery, on the very
//! addresses the connection is made to (a resolver that refuses), so a name that
//! later resolves to 127.0.0.1 (DNS rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock};

use ipnet::{Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// IPv4 networks a webhook may not reach: "this network", private, shared (CGNAT),
/// loopback, link-local (incl. 169.254.169.254, cloud metadata), IETF protocol
/// assignments, benchmarking, multicast and reserved (incl. broadcast).
static V4_REFUSED: LazyLock<Vec<Ipv4Net>> = LazyLock::new(|| {
    [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ]
    .iter()
    .map(|n| {
        n.parse()
            .unwrap_or_else(|e| unreachable!("static network {n}: {e}"))
    })
    .collect()
});

/// IPv6 networks a webhook may not reach: unspecified, loopback, unique local,
/// link-local, site-local (deprecated) and multicast. Forms that embed an IPv4
/// address (mapped, compatible, NAT64, 6to4) are judged by that address.
static V6_REFUSED: LazyLock<Vec<Ipv6Net>> = LazyLock::new(|| {
    [
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    ]
    .iter()
    .map(|n| {
        n.parse()
            .unwrap_or_else(|e| unreachable!("static network {n}: {e}"))
    })
    .collect()
});

/// Whether an address is loopback, link-local, private or otherwise not a public
/// host, in any of its spellings.
pub fn is_refused(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_refused(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => v4_refused(v4),
            None => V6_REFUSED.iter().any(|n| n.contains(&v6)),
        },
    }
}

fn v4_refused(v4: Ipv4Addr) -> bool {
    V4_REFUSED.iter().any(|n| n.contains(&v4))
}

/// The IPv4 address an IPv6 one stands for: `::ffff:a.b.c.d` (mapped),
/// `::a.b.c.d` (compatible, but not `::` and `::1`), `64:ff9b::a.b.c.d` (NAT64) and
/// `2002:AABB:CCDD::/48` (6to4).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let net = |n: &str| -> Ipv6Net { n.parse().unwrap_or_else(|e| unreachable!("{n}: {e}")) };
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(low);
    }
    if net("64:ff9b::/96").contains(&v6) || net("64:ff9b:1::/48").contains(&v6) {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// A URL a webhook may have: http or https, a host, no user name or password (they
/// would show in listings and logs), at most 2048 characters. The host is not
/// resolved here (see [`check_host`]).
pub fn parse_url(raw: &str) -> Result<Url, String> {
    if raw.len() > 2048 {
        return Err("url must be at most 2048 characters".into());
    }
    let url = Url::parse(raw).map_err(|e| format!("url is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("url must be http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("url must name a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("url must not carry a user name or password".into());
    }
    Ok(url)
}

/// Resolves the URL's host and refuses it if any of its addresses is refused
/// (unless private addresses are allowed). A name that does not resolve now is let
/// through: it is checked again, on the addresses actually used, at each delivery.
pub async fn check_host(url: &Url, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<IpAddr> = match url.host() {
        Some(url::Host::Ipv4(v4)) => vec![IpAddr::V4(v4)],
        Some(url::Host::Ipv6(v6)) => vec![IpAddr::V6(v6)],
        Some(url::Host::Domain(name)) => match tokio::net::lookup_host((name, port)).await {
            Ok(found) => found.map(|a| a.ip()).collect(),
            Err(_) => Vec::new(),
        },
        None => return Err("url must name a host".into()),
    };
    match addrs.into_iter().find(|ip| is_refused(*ip)) {
        Some(ip) => Err(format!(
            "url reaches {ip}, a loopback, link-local or private address \
             (LEDGER_WEBHOOK_ALLOW_PRIVATE=true allows it)"
        )),
        None => Ok(()),
    }
}

/// A URL with an IP address for host: refused or not (names go through
/// [`GuardedResolver`] at connection time).
pub fn literal_refused(url: &Url) -> Option<IpAddr> {
    let ip = match url.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    is_refused(ip).then_some(ip)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The delivery client's resolver: the system's answer, refused whole if any
/// address in it is refused, so the connection is only ever made to checked
/// addresses.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(found) => found.collect(),
                Err(e) => return Err(BoxError::from(e)),
            };
            if let Some(bad) = found.iter().find(|a| is_refused(a.ip())) {
                return Err(BoxError::from(format!(
                    "refused: {host} resolves to {}, a loopback, link-local or private address",
                    bad.ip()
                )));
            }
            let addrs: Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// The resolver for a client: guarded unless private addresses are allowed.
pub fn resolver(allow_private: bool) -> Option<Arc<GuardedResolver>> {
    (!allow_private).then(|| Arc::new(GuardedResolver))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        is_refused(s.parse().unwrap())
    }

    #[test]
    fn private_loopback_and_link_local_addresses_are_refused_in_every_spelling() {
        for ip in [
            "127.0.0.1",
            "127.5.6.7",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::1",
            "2002:a00:1::1",
        ] {
            assert!(refused(ip), "{ip} must be refused");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "192.169.0.1",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(!refused(ip), "{ip} must pass");
        }
    }

    #[test]
    fn urls_are_http_or_https_with_a_host_and_no_credentials() {
        assert!(parse_url("https://example.com/hooks").is_ok());
        assert!(parse_url("http://example.com:8080/").is_ok());
        for bad in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "gopher://example.com",
            "https://user:pw@example.com/",
            "not a url",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn literal_addresses_are_judged_without_resolving() {
        let url = |s: &str| parse_url(s).unwrap();
        assert!(literal_refused(&url("http://127.0.0.1:9/")).is_some());
        assert!(literal_refused(&url("http://[::1]/")).is_some());
        assert!(literal_refused(&url("http://[::ffff:7f00:1]/")).is_some());
        assert!(literal_refused(&url("http://10.0.0.8/")).is_some());
        assert!(literal_refused(&url("http://8.8.8.8/")).is_none());
        assert!(literal_refused(&url("http://example.com/")).is_none());
    }
}
