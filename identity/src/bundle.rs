//! SPIFFE trust bundles in the JWKS form of the SPIFFE Trust Domain and Bundle spec, and
//! the set of bundles a site trusts, keyed by trust domain.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::public_key::PublicKey;

use crate::id::TrustDomain;

/// Default `spiffe_refresh_hint`, seconds.
pub const DEFAULT_REFRESH_HINT_SECS: u64 = 300;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bundle key #{index}: {reason}")]
    Key { index: usize, reason: String },
    #[error("bundle has no x509-svid authority")]
    NoAuthorities,
    #[error("bundle file names trust domain {found}, expected {expected}")]
    TrustDomainMismatch {
        expected: TrustDomain,
        found: TrustDomain,
    },
}

/// The X.509 authorities of one trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    pub x509_authorities: Vec<CertificateDer<'static>>,
    pub sequence: u64,
    pub refresh_hint_secs: u64,
}

/// Every bundle a site trusts. A peer's chain is checked only against the bundle of its
/// own trust domain, never against the union.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, TrustBundle>,
}

#[derive(Serialize, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use", default)]
    use_: Option<String>,
    kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

// === impl TrustBundle ===

impl TrustBundle {
    pub fn new(
        trust_domain: TrustDomain,
        x509_authorities: Vec<CertificateDer<'static>>,
        sequence: u64,
    ) -> Self {
        Self {
            trust_domain,
            x509_authorities,
            sequence,
            refresh_hint_secs: DEFAULT_REFRESH_HINT_SECS,
        }
    }

    /// This bundle's authorities plus those of `other` it lacks, one sequence later: the
    /// bundle of a trust domain that several sites (several CAs) share.
    pub fn union(&self, other: &TrustBundle) -> TrustBundle {
        let mut x509_authorities = self.x509_authorities.clone();
        for a in &other.x509_authorities {
            if !x509_authorities.contains(a) {
                x509_authorities.push(a.clone());
            }
        }
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities,
            sequence: self.sequence.max(other.sequence) + 1,
            refresh_hint_secs: self.refresh_hint_secs,
        }
    }

    /// Serializes to the SPIFFE JWKS form.
    pub fn to_jwks(&self) -> Result<String, BundleError> {
        let keys = self
            .x509_authorities
            .iter()
            .enumerate()
            .map(|(index, der)| jwk_for(der).map_err(|reason| BundleError::Key { index, reason }))
            .collect::<Result<Vec<_>, _>>()?;
        let jwks = Jwks {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: Some(self.refresh_hint_secs),
        };
        Ok(serde_json::to_string_pretty(&jwks)?)
    }

    /// Parses the SPIFFE JWKS form. JWT authorities (`use: jwt-svid`) and keys with an
    /// unknown `use` are skipped, as the spec requires; an `x509-svid` key must carry
    /// exactly one certificate in `x5c`.
    pub fn from_jwks(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let jwks: Jwks = serde_json::from_slice(json)?;
        let mut x509_authorities = Vec::new();
        for (index, key) in jwks.keys.iter().enumerate() {
            let key_err = |reason: &str| BundleError::Key {
                index,
                reason: reason.to_owned(),
            };
            if key.kty.is_empty() {
                return Err(key_err("kty is empty"));
            }
            if key.use_.as_deref() != Some("x509-svid") {
                continue;
            }
            let x5c = key.x5c.as_deref().unwrap_or_default();
            if x5c.len() != 1 {
                return Err(key_err(&format!(
                    "x509-svid key must have exactly one x5c entry, has {}",
                    x5c.len()
                )));
            }
            let der = STANDARD
                .decode(&x5c[0])
                .map_err(|e| key_err(&format!("x5c is not base64: {e}")))?;
            x509_parser::parse_x509_certificate(&der)
                .map_err(|e| key_err(&format!("x5c is not an X.509 certificate: {e}")))?;
            x509_authorities.push(CertificateDer::from(der));
        }
        if x509_authorities.is_empty() {
            return Err(BundleError::NoAuthorities);
        }
        Ok(Self {
            trust_domain,
            x509_authorities,
            sequence: jwks.spiffe_sequence.unwrap_or(0),
            refresh_hint_secs: jwks
                .spiffe_refresh_hint
                .unwrap_or(DEFAULT_REFRESH_HINT_SECS),
        })
    }

    /// SHA-256 over the DER of every authority, hex: what a join token pins.
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for der in &self.x509_authorities {
            ctx.update(der);
        }
        ctx.finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

fn jwk_for(der: &CertificateDer<'_>) -> Result<Jwk, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    let mut jwk = Jwk {
        use_: Some("x509-svid".into()),
        kty: String::new(),
        kid: None,
        crv: None,
        x: None,
        y: None,
        n: None,
        e: None,
        x5c: Some(vec![STANDARD.encode(der)]),
    };
    match spki.parsed().map_err(|e| e.to_string())? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            let (crv, len) = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256", 32),
                Some("1.3.132.0.34") => ("P-384", 48),
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err("EC point is not uncompressed".into());
            }
            jwk.kty = "EC".into();
            jwk.crv = Some(crv.into());
            jwk.x = Some(URL_SAFE_NO_PAD.encode(&data[1..1 + len]));
            jwk.y = Some(URL_SAFE_NO_PAD.encode(&data[1 + len..]));
        }
        PublicKey::RSA(rsa) => {
            jwk.kty = "RSA".into();
            jwk.n = Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus)));
            jwk.e = Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent)));
        }
        _ => return Err("unsupported public key type".into()),
    }
    Ok(jwk)
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[i..]
}

// === impl BundleSet ===

impl BundleSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: TrustBundle) {
        self.bundles.insert(bundle.trust_domain.clone(), bundle);
    }

    pub fn get(&self, td: &TrustDomain) -> Option<&TrustBundle> {
        self.bundles.get(td)
    }

    pub fn get_str(&self, td: &str) -> Option<&TrustBundle> {
        self.bundles
            .iter()
            .find(|(k, _)| k.as_str() == td)
            .map(|(_, v)| v)
    }

    /// Drops a trust domain's bundle; its peers are refused from then on.
    pub fn remove(&mut self, td: &TrustDomain) -> Option<TrustBundle> {
        self.bundles.remove(td)
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.bundles.keys()
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// Reads a bundle file. The trust domain comes from `td`, or when absent, from the
    /// URI SAN (`spiffe://<td>`) of the first authority.
    pub fn read_bundle_file(
        path: &Path,
        td: Option<&TrustDomain>,
    ) -> Result<TrustBundle, BundleError> {
        let json = std::fs::read(path).map_err(|source| BundleError::Io {
            path: path.display().to_string(),
            source,
        })?;
        // Parse with a placeholder, then settle the trust domain from the authorities.
        let placeholder = td
            .cloned()
            .unwrap_or_else(|| TrustDomain::new("unknown").expect("valid"));
        let mut bundle = TrustBundle::from_jwks(placeholder, &json)?;
        let from_cert = bundle
            .x509_authorities
            .first()
            .and_then(|c| crate::verify::check_ca_cert(c).ok());
        match (td, from_cert) {
            (Some(expected), Some(found)) if *expected != found => {
                return Err(BundleError::TrustDomainMismatch {
                    expected: expected.clone(),
                    found,
                });
            }
            (None, Some(found)) => bundle.trust_domain = found,
            (None, None) => {
                return Err(BundleError::Key {
                    index: 0,
                    reason: "authority has no spiffe://<trust domain> URI SAN; name the trust domain explicitly".into(),
                });
            }
            _ => {}
        }
        Ok(bundle)
    }
}

impl FromIterator<TrustBundle> for BundleSet {
    fn from_iter<I: IntoIterator<Item = TrustBundle>>(iter: I) -> Self {
        let mut s = Self::new();
        for b in iter {
            s.insert(b);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;

    #[test]
    fn jwks_round_trip_and_shape() {
        let td = TrustDomain::new("west.example.org").unwrap();
        let ca = Ca::generate(&td, crate::ca::DEFAULT_CA_TTL).unwrap();
        let bundle = ca.bundle(7);
        let json = bundle.to_jwks().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let key = &v["keys"][0];
        assert_eq!(key["use"], "x509-svid");
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(key["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert_eq!(key["x5c"].as_array().unwrap().len(), 1);
        let back = TrustBundle::from_jwks(td, json.as_bytes()).unwrap();
        assert_eq!(back, bundle);
    }

    #[test]
    fn jwks_skips_jwt_keys_and_rejects_bad_ones() {
        let td = TrustDomain::new("td").unwrap();
        let only_jwt =
            r#"{"keys":[{"use":"jwt-svid","kty":"EC","kid":"a","crv":"P-256","x":"AA","y":"AA"}]}"#;
        assert!(matches!(
            TrustBundle::from_jwks(td.clone(), only_jwt.as_bytes()),
            Err(BundleError::NoAuthorities)
        ));
        let two_x5c = r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["AA","AA"]}]}"#;
        let e = TrustBundle::from_jwks(td.clone(), two_x5c.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("exactly one x5c"), "{e}");
        let not_b64 = r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["!!"]}]}"#;
        let e = TrustBundle::from_jwks(td.clone(), not_b64.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("not base64"), "{e}");
        let not_cert = r#"{"keys":[{"use":"x509-svid","kty":"EC","x5c":["AAAA"]}]}"#;
        let e = TrustBundle::from_jwks(td.clone(), not_cert.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("not an X.509"), "{e}");
        assert!(matches!(
            TrustBundle::from_jwks(td, b"{"),
            Err(BundleError::Json(_))
        ));
    }

    #[test]
    fn fingerprint_is_stable_and_distinct() {
        let td = TrustDomain::new("td").unwrap();
        let a = Ca::generate(&td, crate::ca::DEFAULT_CA_TTL).unwrap();
        let b = Ca::generate(&td, crate::ca::DEFAULT_CA_TTL).unwrap();
        assert_eq!(a.bundle(1).fingerprint(), a.bundle(2).fingerprint());
        assert_ne!(a.bundle(1).fingerprint(), b.bundle(1).fingerprint());
        assert_eq!(a.bundle(1).fingerprint().len(), 64);
    }
}
