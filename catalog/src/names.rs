//! Site and service names. A service is `<name>.<namespace>`: namespace sameness as in
//! the Kubernetes Multi-Cluster Services API, so the same name in two sites is one
//! service.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("{what} {value:?} is empty")]
    Empty { what: &'static str, value: String },
    #[error("{what} {value:?} is longer than 63 bytes")]
    TooLong { what: &'static str, value: String },
    #[error(
        "{what} {value:?} must be a DNS label: lowercase a-z, 0-9 and '-', starting and ending with a letter or digit"
    )]
    NotALabel { what: &'static str, value: String },
    #[error("service {0:?} must be <name>.<namespace>")]
    NotQualified(String),
}

/// A site: one place that runs a gateway. A DNS label (RFC 1123).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteName(String);

/// A service, `<name>.<namespace>`; both parts DNS labels.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    name: String,
    namespace: String,
}

/// A lower-case RFC 1123 subdomain: dot-separated labels of `[a-z0-9-]`, 1-63 bytes each,
/// not starting or ending with `-`, at most 253 bytes (Kubernetes' `DNS1123Subdomain`:
/// label-key prefixes, Gateway API `sectionName`s).
pub fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// At most `max` bytes of `s` (cut at a character boundary), and how long it was: an
/// error message quotes a value, never megabytes of it.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// How much of a value an error message quotes.
pub const QUOTE_MAX: usize = 80;

/// Whether `s` is a DNS label (RFC 1123: 1 to 63 of `a-z`, `0-9` and `-`, not at either
/// end), as a subset's name is (Istio's `validateSubsetName`). Pure.
pub fn is_dns_label(s: &str) -> bool {
    label("name", s).is_ok()
}

fn label(what: &'static str, s: &str) -> Result<(), NameError> {
    let err = |f: fn(&'static str, String) -> NameError| Err(f(what, clip(s, QUOTE_MAX)));
    if s.is_empty() {
        return err(|what, value| NameError::Empty { what, value });
    }
    if s.len() > 63 {
        return err(|what, value| NameError::TooLong { what, value });
    }
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-';
    let b = s.as_bytes();
    if !b.iter().all(|&c| ok_char(c)) || b[0] == b'-' || b[b.len() - 1] == b'-' {
        return err(|what, value| NameError::NotALabel { what, value });
    }
    Ok(())
}

// === impl SiteName ===

impl SiteName {
    pub fn new(s: &str) -> Result<Self, NameError> {
        label("site name", s)?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SiteName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` honours width and alignment, for tables.
        f.pad(&self.0)
    }
}

impl fmt::Debug for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteName({})", self.0)
    }
}

// === impl ServiceName ===

impl ServiceName {
    pub fn new(name: &str, namespace: &str) -> Result<Self, NameError> {
        label("service name", name)?;
        label("namespace", namespace)?;
        Ok(Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// Parses `name.namespace`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        match s.split_once('.') {
            Some((n, ns)) if !ns.contains('.') => Self::new(n, ns),
            _ => Err(NameError::NotQualified(s.to_owned())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sorts before every valid name: a range bound, never a catalog entry.
    pub(crate) fn lowest() -> Self {
        Self {
            name: String::new(),
            namespace: String::new(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

impl FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::parse(s)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceName({self})")
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(SiteName);
serde_via_str!(ServiceName);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sites() {
        assert!(SiteName::new("west").is_ok());
        assert!(SiteName::new("us-east-1").is_ok());
        for bad in ["", "West", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            assert!(SiteName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn services() {
        let s = ServiceName::parse("orders.shop").unwrap();
        assert_eq!((s.name(), s.namespace()), ("orders", "shop"));
        assert_eq!(s.to_string(), "orders.shop");
        assert_eq!(
            ServiceName::parse("orders").unwrap_err(),
            NameError::NotQualified("orders".into())
        );
        assert!(ServiceName::parse("a.b.c").is_err());
        assert!(ServiceName::parse("Orders.shop").is_err());
        assert!(ServiceName::parse(".shop").is_err());
    }

    proptest! {
        #[test]
        fn service_round_trip(n in "[a-z][a-z0-9-]{0,20}[a-z0-9]", ns in "[a-z0-9]{1,20}") {
            let s = ServiceName::new(&n, &ns).unwrap();
            prop_assert_eq!(ServiceName::parse(&s.to_string()).unwrap(), s);
        }

        #[test]
        fn never_panics(s in "\\PC{0,70}") {
            let _ = ServiceName::parse(&s);
            let _ = SiteName::new(&s);
        }
    }
}

/// A gateway address as sites publish it and peers dial it: `IP:port`, or `host:port`
/// (a DNS name, resolved by whoever dials it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayAddress {
    Ip(std::net::SocketAddr),
    /// Lower-case host and port.
    Name(String, u16),
}

/// Longest gateway address accepted (a 253-character DNS name and a port).
pub const GATEWAY_ADDRESS_MAX: usize = 261;
/// Most gateway addresses a site may have (its replicas), and most addresses a peer
/// dials for one site: what a site, or a DNS answer, can make others hold.
pub const GATEWAY_ADDRESSES_MAX: usize = 32;

impl GatewayAddress {
    /// Parses `IP:port` or `host:port` (port 1–65535, a host of letters, digits, `-`
    /// and `.`). `None` for anything else. Pure.
    pub fn parse(a: &str) -> Option<Self> {
        if a.len() > GATEWAY_ADDRESS_MAX {
            return None;
        }
        if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
            return Some(Self::Ip(sa));
        }
        let (host, port) = a.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
        let plain = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        plain.then(|| Self::Name(host.to_ascii_lowercase(), port))
    }
}

#[cfg(test)]
mod gateway_address_tests {
    use super::*;

    #[test]
    fn ips_and_host_names_only() {
        let ip = |s: &str| Some(GatewayAddress::Ip(s.parse().unwrap()));
        for (a, want) in [
            ("10.0.0.1:15443", ip("10.0.0.1:15443")),
            ("[fd00::1]:15443", ip("[fd00::1]:15443")),
            (
                "GW-0.West.example.org:15443",
                Some(GatewayAddress::Name("gw-0.west.example.org".into(), 15443)),
            ),
            ("gw.example.org:0", None),
            ("gw.example.org", None),
            ("gw west:1", None),
            ("fd00::1:15443", None),
            ("", None),
        ] {
            assert_eq!(GatewayAddress::parse(a), want, "{a}");
        }
        assert_eq!(
            GatewayAddress::parse(&format!("{}:1", "a".repeat(300))),
            None
        );
    }
}
