//! The outbound address policy: every request VaultGuard makes to a third
//! party (OAuth token and revocation endpoints, approval webhooks, trusted
//! issuers' discovery documents and JWKS) goes through a [`Client`] built
//! here, and reaches only addresses the policy permits.
//!
//! - **Checked after resolution, pinned for the connection.** The client's
//!   DNS resolver ([`reqwest::dns::Resolve`]) looks the name up once, drops
//!   every forbidden address and hands the connector only the permitted ones,
//!   so the connection goes to an address that was checked: there is no
//!   second lookup a rebinding DNS server could answer differently. A name
//!   left with no permitted address fails the request ([`ForbiddenAddress`]).
//! - **IP literals** (`https://10.0.0.7/…`, `http://[::ffff:127.0.0.1]/`,
//!   `http://2130706433/`, which the URL parser reads as 127.0.0.1) never
//!   reach a resolver: [`Client::get`] and [`Client::post`] check them
//!   before the request is built.
//! - **No redirects, no proxies.** A redirect would name a new target the
//!   caller never checked, and a proxy would make the connection itself (so
//!   the checked address would be the proxy's); both are off.
//! - **Forbidden** ([`is_forbidden`]): everything that is not globally
//!   routable unicast: IPv4 "this network" 0/8 (the unspecified address),
//!   RFC 1918 private ranges, CGNAT 100.64/10, loopback 127/8, link-local
//!   169.254/16 (cloud metadata at 169.254.169.254), the IETF 192.0.0/24,
//!   the documentation and benchmarking ranges, the 6to4 relay anycast
//!   192.88.99/24, multicast, reserved 240/4 and broadcast; IPv6 outside
//!   2000::/3 (unspecified, loopback, ULA fc00::/7, link-local fe80::/10,
//!   multicast, discard-only, site-local), the IETF 2001::/23 (Teredo among
//!   them), documentation 2001:db8::/32 and 3fff::/20, and the old 6bone
//!   3ffe::/16. IPv4 embedded in IPv6 is judged as the IPv4 address it
//!   reaches: IPv4-mapped `::ffff:a.b.c.d`, SIIT `::ffff:0:a.b.c.d`,
//!   NAT64 `64:ff9b::a.b.c.d`, 6to4 `2002:aabb:ccdd::/48`; the deprecated
//!   IPv4-compatible `::a.b.c.d` and the local-use NAT64 prefix
//!   64:ff9b:1::/48 are refused outright.
//! - **The allowance** `outbound_allowed_networks` lists CIDR blocks the
//!   operator lets VaultGuard reach although they are forbidden (an
//!   identity provider on the internal network; the tests' third parties on
//!   127.0.0.1). Empty by default.
//!
//! Registration checks the same policy early ([`Outbound::check_registered_url`]):
//! a URL whose host is a forbidden IP literal, or a name that resolves at
//! that moment to a forbidden address, is INVALID_ARGUMENT naming the field.
//! A name that does not resolve yet is accepted: the connection-time check
//! decides when it is used.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::config::Config;
use crate::error::FieldViolation;

/// How outbound requests look names up; declared in `crate::config`, beside
/// the setting that carries a test's own (`Config::outbound_lookup`).
pub use crate::config::{LookupFuture, NameLookup};

/// How long registration waits for a name's addresses before it accepts
/// the URL and leaves the check to connection time.
const REGISTRATION_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// True when `ip` is not a globally routable unicast address, or reaches
/// one that is not (the module documentation lists the ranges).
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => v6_forbidden(v6),
    }
}

fn v4_forbidden(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    match a {
        // "This network" (with 0.0.0.0), RFC 1918 10/8, loopback.
        0 | 10 | 127 => true,
        // CGNAT shared address space 100.64.0.0/10.
        100 => (b & 0xc0) == 64,
        // Link-local, cloud metadata (169.254.169.254) among it.
        169 => b == 254,
        // RFC 1918 172.16.0.0/12.
        172 => (b & 0xf0) == 16,
        // IETF protocol assignments 192.0.0.0/24, TEST-NET-1 192.0.2.0/24,
        // the 6to4 relay anycast 192.88.99.0/24, RFC 1918 192.168.0.0/16.
        192 => (b == 0 && (c == 0 || c == 2)) || (b == 88 && c == 99) || b == 168,
        // Benchmarking 198.18.0.0/15, TEST-NET-2 198.51.100.0/24.
        198 => (b & 0xfe) == 18 || (b == 51 && c == 100),
        // TEST-NET-3 203.0.113.0/24.
        203 => b == 0 && c == 113,
        // Multicast 224/4, reserved 240/4, broadcast.
        224..=255 => true,
        _ => false,
    }
}

/// The IPv4 address in the last 32 bits of `segments`.
fn low_v4(segments: [u16; 8]) -> Ipv4Addr {
    let [.., high, low] = segments;
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
}

fn v6_forbidden(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    match s {
        // IPv4-mapped ::ffff:a.b.c.d: the IPv4 address it reaches.
        [0, 0, 0, 0, 0, 0xffff, _, _] => v4_forbidden(low_v4(s)),
        // SIIT IPv4-translated ::ffff:0:a.b.c.d.
        [0, 0, 0, 0, 0xffff, 0, _, _] => v4_forbidden(low_v4(s)),
        // Unspecified, loopback and the deprecated IPv4-compatible ::/96.
        [0, 0, 0, 0, 0, 0, _, _] => true,
        // NAT64 well-known prefix 64:ff9b::/96: the IPv4 address it reaches.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => v4_forbidden(low_v4(s)),
        // The rest of 64:ff9b::/32, local-use NAT64 64:ff9b:1::/48 among it.
        [0x64, 0xff9b, ..] => true,
        // 6to4 2002::/16: the IPv4 address in bits 16..48.
        [0x2002, high, low, ..] => {
            v4_forbidden(Ipv4Addr::from((u32::from(high) << 16) | u32::from(low)))
        }
        // IETF protocol assignments 2001::/23 (Teredo 2001::/32,
        // benchmarking, ORCHID), documentation 2001:db8::/32.
        [0x2001, second, ..] if second < 0x0200 || second == 0x0db8 => true,
        // Documentation 3fff::/20, the returned 6bone 3ffe::/16.
        [0x3fff, second, ..] if second < 0x1000 => true,
        [0x3ffe, ..] => true,
        // Anything outside global unicast 2000::/3: ULA, link-local,
        // site-local, multicast, discard-only, unassigned.
        [first, ..] => (first & 0xe000) != 0x2000,
    }
}

/// The IPv4 address an IPv4-mapped IPv6 address stands for (so an allowance
/// written as `127.0.0.0/8` also covers `::ffff:127.0.0.1`), else `ip`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The refusal set less the operator's allowance.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allowed: Vec<IpNet>,
}

impl Policy {
    /// The policy with `allowed` CIDR blocks exempt from the refusal set.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self { allowed }
    }

    /// Reads `outbound_allowed_networks`; a malformed entry is an error
    /// naming it.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let allowed = config
            .outbound_allowed_networks
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.trim().parse::<IpNet>().map_err(|_| {
                    anyhow::anyhow!(
                        "outbound_allowed_networks[{i}]: {text:?} is not a CIDR block such as 10.20.0.0/16"
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self::new(allowed))
    }

    /// True when a connection to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        if !is_forbidden(ip) {
            return true;
        }
        let ip = canonical(ip);
        self.allowed.iter().any(|net| net.contains(&ip))
    }
}

/// The operating system's resolver (`getaddrinfo` on a blocking thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

impl NameLookup for SystemLookup {
    fn lookup(&self, host: &str) -> LookupFuture {
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|addr| addr.ip()).collect())
        })
    }
}

/// A connection refused because its host resolved only to addresses the
/// outbound policy forbids.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to addresses the outbound policy forbids")]
pub struct ForbiddenAddress {
    host: String,
}

/// True when `err` (a failed request) was refused by the outbound policy
/// at connection time.
pub fn is_forbidden_error(err: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if current.is::<ForbiddenAddress>() {
            return true;
        }
        source = current.source();
    }
    false
}

/// The resolver of every outbound client: looks the name up once and
/// returns only the permitted addresses, which the connector then uses.
#[derive(Debug)]
struct PolicyResolver {
    policy: Arc<Policy>,
    lookup: Arc<dyn NameLookup>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let lookup = self.lookup.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved = lookup.lookup(&host).await?;
            let (permitted, refused): (Vec<IpAddr>, Vec<IpAddr>) =
                resolved.into_iter().partition(|ip| policy.permits(*ip));
            if !refused.is_empty() {
                tracing::warn!(host = %host, refused = ?refused, "outbound addresses refused by the address policy");
            }
            if permitted.is_empty() {
                return Err(Box::new(ForbiddenAddress { host }) as Box<_>);
            }
            let addrs: reqwest::dns::Addrs =
                Box::new(permitted.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// Why a request was not even sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not an absolute `http`/`https` URL with a host.
    #[error("not an http(s) URL with a host")]
    InvalidUrl,
    /// The host is an IP literal the policy forbids.
    #[error("the address is forbidden by the outbound policy")]
    ForbiddenAddress,
}

/// Settings of one outbound client.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// The whole request's timeout (connect, send, read).
    pub timeout: Duration,
    /// The TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// The `User-Agent` header.
    pub user_agent: &'static str,
}

/// An HTTP client that reaches only what the outbound policy permits. The
/// only way to build a request is [`Client::get`] or [`Client::post`], which
/// check IP-literal hosts; names are checked by the resolver.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    policy: Arc<Policy>,
}

impl Client {
    /// A GET of `url`, unless the policy refuses it outright.
    pub fn get(&self, url: &str) -> Result<reqwest::RequestBuilder, Refusal> {
        Ok(self.http.get(self.checked(url)?))
    }

    /// A POST to `url`, unless the policy refuses it outright.
    pub fn post(&self, url: &str) -> Result<reqwest::RequestBuilder, Refusal> {
        Ok(self.http.post(self.checked(url)?))
    }

    fn checked(&self, url: &str) -> Result<reqwest::Url, Refusal> {
        let parsed = reqwest::Url::parse(url).map_err(|_| Refusal::InvalidUrl)?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Refusal::InvalidUrl);
        }
        match literal(&parsed) {
            Err(()) => Err(Refusal::InvalidUrl),
            Ok(Some(ip)) if !self.policy.permits(ip) => Err(Refusal::ForbiddenAddress),
            Ok(_) => Ok(parsed),
        }
    }
}

/// The host of `url` as an IP literal (`Ok(None)` for a name; `Err` when
/// there is no host). The URL parser has already normalised IPv4 spellings
/// (`2130706433`, `0x7f.1`) to dotted quads and brackets IPv6.
fn literal(url: &reqwest::Url) -> Result<Option<IpAddr>, ()> {
    let host = url.host_str().filter(|host| !host.is_empty()).ok_or(())?;
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Some(IpAddr::V6(ip)))
            .map_err(|_| ());
    }
    Ok(host.parse::<Ipv4Addr>().ok().map(IpAddr::V4))
}

/// The policy and the name lookup of this process, and the clients built
/// on them.
#[derive(Debug, Clone)]
pub struct Outbound {
    policy: Arc<Policy>,
    lookup: Arc<dyn NameLookup>,
}

impl Outbound {
    /// The policy of `config` (its allowance) over `config`'s injected
    /// lookup or the system resolver.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let lookup: Arc<dyn NameLookup> = match &config.outbound_lookup {
            Some(lookup) => lookup.clone(),
            None => Arc::new(SystemLookup),
        };
        Ok(Self::new(Policy::from_config(config)?, lookup))
    }

    /// The given policy over the given lookup.
    pub fn new(policy: Policy, lookup: Arc<dyn NameLookup>) -> Self {
        Self {
            policy: Arc::new(policy),
            lookup,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A client under this policy: the resolver that filters, no redirects,
    /// no proxies.
    pub fn client(&self, options: ClientOptions) -> reqwest::Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(PolicyResolver {
                policy: self.policy.clone(),
                lookup: self.lookup.clone(),
            })
            .user_agent(options.user_agent)
            .build()?;
        Ok(Client {
            http,
            policy: self.policy.clone(),
        })
    }

    /// True when `url`'s host is not an IP literal the policy forbids.
    pub fn literal_permitted(&self, url: &reqwest::Url) -> bool {
        !matches!(literal(url), Ok(Some(ip)) if !self.policy.permits(ip))
    }

    /// Registration's early check of an outbound URL (already validated as
    /// an absolute URL with a host): refused when its host is a forbidden
    /// IP literal, or a name that resolves now (within 2 s) to any
    /// forbidden address. A name that does not resolve is accepted; the
    /// connection-time check decides when it is used.
    pub async fn check_registered_url(
        &self,
        field: &str,
        url: &reqwest::Url,
    ) -> Result<(), FieldViolation> {
        let refused = || FieldViolation {
            field: field.to_owned(),
            description: "must not point at a loopback, private, link-local or other \
                          non-public address (outbound address policy)"
                .to_owned(),
        };
        let host = match literal(url) {
            Ok(Some(ip)) if self.policy.permits(ip) => return Ok(()),
            Ok(Some(_)) => return Err(refused()),
            Ok(None) => url.host_str().unwrap_or_default(),
            Err(()) => return Ok(()),
        };
        let lookup = self.lookup.lookup(host);
        match tokio::time::timeout(REGISTRATION_LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(addrs)) if addrs.iter().any(|ip| !self.policy.permits(*ip)) => Err(refused()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(text: &str) -> bool {
        is_forbidden(text.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_forbidden() {
        for text in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::8.8.8.8",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0:10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::808:808",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:db8::1",
            "3fff::1",
            "3ffe::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "5f00::1",
        ] {
            assert!(forbidden(text), "{text} is permitted");
        }
    }

    #[test]
    fn public_addresses_are_permitted() {
        for text in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "::ffff:0:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:200::1",
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "3ff0::1",
        ] {
            assert!(!forbidden(text), "{text} is forbidden");
        }
    }

    #[test]
    fn the_allowance_exempts_its_blocks_only() {
        let policy = Policy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(policy.permits("127.0.0.1".parse().unwrap()));
        assert!(policy.permits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!policy.permits("::1".parse().unwrap()));
        assert!(!policy.permits("10.0.0.1".parse().unwrap()));
        assert!(!policy.permits("64:ff9b::7f00:1".parse().unwrap()));
        assert!(policy.permits("8.8.8.8".parse().unwrap()));
        assert!(!Policy::default().permits("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn allowances_are_read_from_the_config() {
        let mut config = Config {
            outbound_allowed_networks: vec!["10.20.0.0/16".into(), "::1/128".into()],
            ..Config::default()
        };
        let policy = Policy::from_config(&config).unwrap();
        assert!(policy.permits("10.20.3.4".parse().unwrap()));
        assert!(policy.permits("::1".parse().unwrap()));
        assert!(!policy.permits("10.21.0.1".parse().unwrap()));
        config.outbound_allowed_networks.push("localhost".into());
        let err = Policy::from_config(&config).unwrap_err().to_string();
        assert!(err.contains("outbound_allowed_networks[2]"), "{err}");
    }

    #[test]
    fn literal_urls_are_checked_before_sending() {
        let outbound = Outbound::new(Policy::default(), Arc::new(SystemLookup));
        let client = outbound
            .client(ClientOptions {
                timeout: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(1),
                user_agent: "test",
            })
            .unwrap();
        for url in [
            "http://127.0.0.1:8080/token",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::ffff:7f00:1]/",
            "https://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]/",
        ] {
            assert_eq!(
                client.post(url).err(),
                Some(Refusal::ForbiddenAddress),
                "{url}"
            );
        }
        assert_eq!(
            client.get("file:///etc/passwd").err(),
            Some(Refusal::InvalidUrl)
        );
        assert!(client.get("https://8.8.8.8/").is_ok());
        assert!(client.get("https://idp.example.com/jwks").is_ok());
    }
}

/// Property tests of the refusal set: an independent table of the ranges
/// (read with `ipnet`) against the hand-written matcher, the standard
/// library's predicates, and the embedded IPv4 forms.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    /// The forbidden IPv4 blocks, as the IANA special-purpose registry
    /// lists them (and multicast, reserved, broadcast).
    const V4_TABLE: [&str; 16] = [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
    ];

    fn in_table(table: &[&str], ip: IpAddr) -> bool {
        table
            .iter()
            .any(|net| net.parse::<IpNet>().unwrap().contains(&ip))
    }

    fn v4_oracle(ip: Ipv4Addr) -> bool {
        in_table(&V4_TABLE, IpAddr::V4(ip))
    }

    /// The IPv6 rule written from the table: not global unicast, or a
    /// special block of it, or an embedded forbidden IPv4 address.
    fn v6_oracle(ip: Ipv6Addr) -> bool {
        let v6 = IpAddr::V6(ip);
        let bits = u128::from(ip);
        let embedded = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
        if in_table(&["::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"], v6) {
            return v4_oracle(embedded);
        }
        if in_table(&["2002::/16"], v6) {
            return v4_oracle(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32));
        }
        !in_table(&["2000::/3"], v6)
            || in_table(
                &["2001::/23", "2001:db8::/32", "3fff::/20", "3ffe::/16"],
                v6,
            )
    }

    /// IPv4 addresses, half of them inside a forbidden block or next to one.
    fn v4() -> impl Strategy<Value = Ipv4Addr> {
        let near_block = (
            prop::sample::select(V4_TABLE.to_vec()),
            any::<u32>(),
            0u8..3,
        )
            .prop_map(|(net, noise, mode)| {
                let net: ipnet::Ipv4Net = net.parse().unwrap();
                let base = u32::from(net.network());
                let host_bits = !u32::from(net.netmask());
                match mode {
                    0 => Ipv4Addr::from(base | (noise & host_bits)),
                    1 => Ipv4Addr::from(base.wrapping_sub(1 + (noise & 0xff))),
                    _ => {
                        Ipv4Addr::from(u32::from(net.broadcast()).wrapping_add(1 + (noise & 0xff)))
                    }
                }
            });
        prop_oneof![any::<u32>().prop_map(Ipv4Addr::from), near_block]
    }

    /// IPv6 addresses: arbitrary, under a notable prefix, or an IPv4 form.
    fn v6() -> impl Strategy<Value = Ipv6Addr> {
        let prefixes: Vec<(u128, u8)> = [
            "::/96",
            "::ffff:0:0/96",
            "::ffff:0:0:0/96",
            "64:ff9b::/96",
            "64:ff9b:1::/48",
            "100::/64",
            "2001::/23",
            "2001::/32",
            "2001:db8::/32",
            "2001:200::/23",
            "2002::/16",
            "2000::/3",
            "3fff::/20",
            "3ffe::/16",
            "fc00::/7",
            "fe80::/10",
            "ff00::/8",
        ]
        .iter()
        .map(|text| {
            let net: ipnet::Ipv6Net = text.parse().unwrap();
            (u128::from(net.network()), net.prefix_len())
        })
        .collect();
        prop_oneof![
            any::<u128>().prop_map(Ipv6Addr::from),
            (prop::sample::select(prefixes), any::<u128>()).prop_map(|((base, len), noise)| {
                let host_bits = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
                Ipv6Addr::from(base | (noise & host_bits))
            }),
            (
                v4(),
                prop::sample::select(vec![
                    0xffffu128 << 32,
                    0xffffu128 << 48,
                    0x64_ff9bu128 << 96
                ])
            )
                .prop_map(|(v4, prefix)| Ipv6Addr::from(prefix | u128::from(u32::from(v4)))),
            (v4(), any::<u64>()).prop_map(|(v4, tail)| {
                Ipv6Addr::from(
                    (0x2002u128 << 112) | (u128::from(u32::from(v4)) << 80) | u128::from(tail),
                )
            }),
        ]
    }

    proptest! {
        #![proptest_config(config(PURE_CASES * 4))]

        #[test]
        fn ipv4_matcher_agrees_with_the_table(ip in v4()) {
            prop_assert_eq!(is_forbidden(IpAddr::V4(ip)), v4_oracle(ip), "{}", ip);
        }

        #[test]
        fn ipv6_matcher_agrees_with_the_table(ip in v6()) {
            prop_assert_eq!(is_forbidden(IpAddr::V6(ip)), v6_oracle(ip), "{}", ip);
        }

        #[test]
        fn standard_library_categories_are_forbidden(v4 in v4(), v6 in v6()) {
            if v4.is_private() || v4.is_loopback() || v4.is_link_local() || v4.is_broadcast()
                || v4.is_documentation() || v4.is_unspecified() || v4.is_multicast()
            {
                prop_assert!(is_forbidden(IpAddr::V4(v4)), "{}", v4);
            }
            if v6.is_loopback() || v6.is_unspecified() || v6.is_multicast()
                || v6.is_unique_local() || v6.is_unicast_link_local()
            {
                prop_assert!(is_forbidden(IpAddr::V6(v6)), "{}", v6);
            }
        }

        #[test]
        fn embedded_ipv4_is_judged_as_the_address_it_reaches(ip in v4(), tail in any::<u64>()) {
            let expected = is_forbidden(IpAddr::V4(ip));
            let bits = u128::from(u32::from(ip));
            prop_assert_eq!(is_forbidden(IpAddr::V6(ip.to_ipv6_mapped())), expected);
            prop_assert_eq!(is_forbidden(IpAddr::V6(Ipv6Addr::from((0xffffu128 << 32) | bits))), expected);
            prop_assert_eq!(is_forbidden(IpAddr::V6(Ipv6Addr::from((0x64_ff9bu128 << 96) | bits))), expected);
            let six_to_four = (0x2002u128 << 112) | (bits << 80) | u128::from(tail);
            prop_assert_eq!(is_forbidden(IpAddr::V6(Ipv6Addr::from(six_to_four))), expected);
            prop_assert!(is_forbidden(IpAddr::V6(ip.to_ipv6_compatible())));
        }

        #[test]
        fn the_allowance_covers_exactly_its_block(ip in v4(), len in 8u8..=32) {
            let net = ipnet::Ipv4Net::new(ip, len).unwrap().trunc();
            let policy = Policy::new(vec![IpNet::V4(net)]);
            prop_assert!(policy.permits(IpAddr::V4(ip)));
            prop_assert!(policy.permits(IpAddr::V6(ip.to_ipv6_mapped())));
            let outside = Ipv4Addr::from(u32::from(net.broadcast()).wrapping_add(1));
            if !net.contains(&outside) {
                prop_assert_eq!(policy.permits(IpAddr::V4(outside)), !is_forbidden(IpAddr::V4(outside)));
            }
        }
    }
}
