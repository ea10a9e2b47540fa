//! SPIFFE IDs and trust domains, exactly as the SPIFFE ID specification defines them.
//!
//! The parser is strict on purpose: a gateway that accepts `spiffe://West.Example/x/` as
//! an identity would authorize a name that no other SPIFFE implementation can issue.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the spec allows, in bytes (URI SAN length limit).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name the spec allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain. Each variant is one rule of the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("scheme must be \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain has character {0:?}: only a-z 0-9 . - _ are allowed (lowercase)")]
    BadTrustDomainChar(char),
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("a port is not allowed in a SPIFFE ID")]
    Port,
    #[error("userinfo is not allowed in a SPIFFE ID")]
    UserInfo,
    #[error("a query is not allowed in a SPIFFE ID")]
    Query,
    #[error("a fragment is not allowed in a SPIFFE ID")]
    Fragment,
    #[error("percent-encoding is not allowed in a SPIFFE ID")]
    PercentEncoded,
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path must not end with \"/\"")]
    TrailingSlash,
    #[error("path segment has character {0:?}: only a-z A-Z 0-9 . - _ are allowed")]
    BadPathChar(char),
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

/// A SPIFFE trust domain, e.g. `west.example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID: `spiffe://<trust domain><path>`, path possibly empty.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    /// Byte offset in `full` where the path starts.
    path_at: usize,
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Parses a bare trust domain name. `spiffe://name` is accepted too, as SPIFFE
    /// tooling commonly prints trust domains in that form.
    pub fn new(s: &str) -> Result<Self, IdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`: the ID of the trust domain itself, used as the CA's URI SAN.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("{SCHEME}{}", self.0),
            path_at: SCHEME.len() + self.0.len(),
        }
    }

    /// Builds the ID `spiffe://<td>/<segments...>`, validating each segment.
    pub fn child(&self, segments: &[&str]) -> Result<SpiffeId, IdError> {
        let mut s = format!("{SCHEME}{}", self.0);
        for seg in segments {
            s.push('/');
            s.push_str(seg);
        }
        SpiffeId::new(&s)
    }
}

fn validate_trust_domain(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    for c in name.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            ':' => return Err(IdError::Port),
            '@' => return Err(IdError::UserInfo),
            '%' => return Err(IdError::PercentEncoded),
            '?' => return Err(IdError::Query),
            '#' => return Err(IdError::Fragment),
            c => return Err(IdError::BadTrustDomainChar(c)),
        }
    }
    Ok(())
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = match s.get(..SCHEME.len()) {
            Some(p) if p == SCHEME => &s[SCHEME.len()..],
            _ => return Err(IdError::WrongScheme),
        };
        let td_end = rest.find('/').unwrap_or(rest.len());
        let td = &rest[..td_end];
        // A query or fragment may sit right after the trust domain.
        if let Some(i) = td.find(['?', '#']) {
            validate_trust_domain(&td[..i])?;
            return Err(if td.as_bytes()[i] == b'?' {
                IdError::Query
            } else {
                IdError::Fragment
            });
        }
        validate_trust_domain(td)?;
        let path = &rest[td_end..];
        validate_path(path)?;
        Ok(Self {
            full: s.to_owned(),
            path_at: SCHEME.len() + td_end,
        })
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.full[SCHEME.len()..self.path_at]
    }

    /// The path, with its leading `/`, or `""` for a trust domain ID.
    pub fn path(&self) -> &str {
        &self.full[self.path_at..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The gateway ID meshfed uses for `site`: `spiffe://<td>/meshfed/site/<site>/gateway`.
    pub fn gateway(td: &TrustDomain, site: &str) -> Result<Self, IdError> {
        td.child(&["meshfed", "site", site, "gateway"])
    }

    /// The site name, when this is a meshfed gateway ID.
    pub fn gateway_site(&self) -> Option<&str> {
        let p = self.path().strip_prefix("/meshfed/site/")?;
        let site = p.strip_suffix("/gateway")?;
        (!site.contains('/')).then_some(site)
    }
}

fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(if path == "/" {
            IdError::EmptySegment
        } else {
            IdError::TrailingSlash
        });
    }
    // path starts with '/' by construction
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err(IdError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(IdError::DotSegment);
        }
        for c in seg.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                '%' => return Err(IdError::PercentEncoded),
                '?' => return Err(IdError::Query),
                '#' => return Err(IdError::Fragment),
                c => return Err(IdError::BadPathChar(c)),
            }
        }
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(|e| serde::de::Error::custom(format!("invalid SPIFFE ID {s:?}: {e}")))
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid trust domain {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(s: &str) -> IdError {
        SpiffeId::new(s).expect_err(s)
    }

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/ns/shop/sa/orders",
            "spiffe://a-b_c.9/x.y-z_W/0",
            "spiffe://west.example.org/meshfed/site/west/gateway",
            "spiffe://td/..a/.b/c..",
        ] {
            let id = SpiffeId::new(s).unwrap();
            assert_eq!(id.as_str(), s);
        }
        let id = SpiffeId::new("spiffe://example.org/ns/shop/sa/orders").unwrap();
        assert_eq!(id.trust_domain_str(), "example.org");
        assert_eq!(id.path(), "/ns/shop/sa/orders");
    }

    #[test]
    fn scheme_rules() {
        assert_eq!(err(""), IdError::Empty);
        assert_eq!(err("http://example.org/a"), IdError::WrongScheme);
        assert_eq!(err("SPIFFE://example.org/a"), IdError::WrongScheme);
        assert_eq!(err("spiffe:/example.org/a"), IdError::WrongScheme);
        assert_eq!(err("spiffe:example.org"), IdError::WrongScheme);
        assert_eq!(err("example.org/a"), IdError::WrongScheme);
    }

    #[test]
    fn trust_domain_rules() {
        assert_eq!(err("spiffe://"), IdError::MissingTrustDomain);
        assert_eq!(err("spiffe:///path"), IdError::MissingTrustDomain);
        assert_eq!(
            err("spiffe://Example.org/a"),
            IdError::BadTrustDomainChar('E')
        );
        assert_eq!(
            err("spiffe://exa mple.org"),
            IdError::BadTrustDomainChar(' ')
        );
        assert_eq!(err("spiffe://example.org:8080/a"), IdError::Port);
        assert_eq!(err("spiffe://user@example.org/a"), IdError::UserInfo);
        assert_eq!(err("spiffe://user:pw@example.org/a"), IdError::Port);
        assert_eq!(err("spiffe://ex%41mple.org/a"), IdError::PercentEncoded);
        assert_eq!(err("spiffe://example.org?x=1"), IdError::Query);
        assert_eq!(err("spiffe://example.org#frag"), IdError::Fragment);
        assert_eq!(
            err("spiffe://exämple.org"),
            IdError::BadTrustDomainChar('ä')
        );
        let long = format!("spiffe://{}", "a".repeat(256));
        assert_eq!(err(&long), IdError::TrustDomainTooLong);
        let ok = format!("spiffe://{}", "a".repeat(255));
        SpiffeId::new(&ok).unwrap();
    }

    #[test]
    fn path_rules() {
        assert_eq!(err("spiffe://example.org/"), IdError::EmptySegment);
        assert_eq!(err("spiffe://example.org//a"), IdError::EmptySegment);
        assert_eq!(err("spiffe://example.org/a//b"), IdError::EmptySegment);
        assert_eq!(err("spiffe://example.org/a/"), IdError::TrailingSlash);
        assert_eq!(err("spiffe://example.org/."), IdError::DotSegment);
        assert_eq!(err("spiffe://example.org/.."), IdError::DotSegment);
        assert_eq!(err("spiffe://example.org/a/./b"), IdError::DotSegment);
        assert_eq!(err("spiffe://example.org/a/../b"), IdError::DotSegment);
        assert_eq!(err("spiffe://example.org/a%20b"), IdError::PercentEncoded);
        assert_eq!(err("spiffe://example.org/a?b=c"), IdError::Query);
        assert_eq!(err("spiffe://example.org/a#b"), IdError::Fragment);
        assert_eq!(err("spiffe://example.org/a b"), IdError::BadPathChar(' '));
        assert_eq!(err("spiffe://example.org/a:b"), IdError::BadPathChar(':'));
        assert_eq!(err("spiffe://example.org/a@b"), IdError::BadPathChar('@'));
        assert_eq!(err("spiffe://example.org/ü"), IdError::BadPathChar('ü'));
    }

    #[test]
    fn length_limit() {
        let base = "spiffe://example.org/";
        let ok = format!("{base}{}", "a".repeat(MAX_ID_LEN - base.len()));
        SpiffeId::new(&ok).unwrap();
        let long = format!("{base}{}", "a".repeat(MAX_ID_LEN - base.len() + 1));
        assert_eq!(err(&long), IdError::TooLong);
    }

    #[test]
    fn bare_trust_domains() {
        assert_eq!(
            TrustDomain::new("west.example.org").unwrap().as_str(),
            "west.example.org"
        );
        assert_eq!(
            TrustDomain::new("spiffe://west.example.org")
                .unwrap()
                .as_str(),
            "west.example.org"
        );
        assert_eq!(
            TrustDomain::new("").unwrap_err(),
            IdError::MissingTrustDomain
        );
        assert_eq!(
            TrustDomain::new("West").unwrap_err(),
            IdError::BadTrustDomainChar('W')
        );
        assert_eq!(
            TrustDomain::new("a/b").unwrap_err(),
            IdError::BadTrustDomainChar('/')
        );
    }

    #[test]
    fn gateway_ids() {
        let td = TrustDomain::new("west.example.org").unwrap();
        let id = SpiffeId::gateway(&td, "west").unwrap();
        assert_eq!(
            id.as_str(),
            "spiffe://west.example.org/meshfed/site/west/gateway"
        );
        assert_eq!(id.gateway_site(), Some("west"));
        assert_eq!(
            SpiffeId::new("spiffe://td/ns/a/sa/b")
                .unwrap()
                .gateway_site(),
            None
        );
        assert!(SpiffeId::gateway(&td, "bad site").is_err());
    }

    proptest! {
        #[test]
        fn round_trips(
            td in "[a-z0-9._-]{1,64}",
            segs in proptest::collection::vec("[a-zA-Z0-9._-]{1,16}", 0..6),
        ) {
            prop_assume!(segs.iter().all(|s| s != "." && s != ".."));
            let s = format!("spiffe://{td}{}", segs.iter().map(|s| format!("/{s}")).collect::<String>());
            let id = SpiffeId::new(&s).unwrap();
            prop_assert_eq!(id.as_str(), s.as_str());
            prop_assert_eq!(id.trust_domain_str(), td.as_str());
            let again: SpiffeId = id.to_string().parse().unwrap();
            prop_assert_eq!(again, id.clone());
            let json = serde_json::to_string(&id).unwrap();
            let back: SpiffeId = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, id);
        }

        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = SpiffeId::new(&s);
            let _ = TrustDomain::new(&s);
        }

        #[test]
        fn never_panics_near_valid(s in "spiffe://[a-zA-Z0-9:@%?#./_-]{0,40}") {
            if let Ok(id) = SpiffeId::new(&s) {
                prop_assert!(id.trust_domain_str().chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c)));
                prop_assert!(!id.path().ends_with('/'));
            }
        }
    }
}
