//! One-time join tokens: what a new site needs to reach and trust the federation (its
//! addresses and the fingerprint of its CA) plus a secret the federation redeems once.
//! The federation keeps only a hash of the secret.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use meshfed_identity::TrustDomain;

use crate::names::SiteName;

/// Every token starts with this, so a pasted token of another kind is recognised.
pub const TOKEN_PREFIX: &str = "meshfed-join-v1.";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// The site this token admits.
    pub site: SiteName,
    /// Federation addresses, `host:port`, tried in order.
    pub addresses: Vec<String>,
    /// The federation's trust domain: its certificate must carry
    /// `spiffe://<this>/meshfed/federation`.
    pub federation_trust_domain: TrustDomain,
    /// SHA-256 (hex) of the federation CA's bundle authorities: pins whom the site talks to.
    pub ca_fingerprint: String,
    /// 32 random bytes, base64url.
    pub secret: String,
}

/// What the federation stores for an issued token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub site: SiteName,
    pub expires_unix: i64,
    #[serde(default)]
    pub used_unix: Option<i64>,
    /// The trust domain the operator bound the site to; `None`: any trust domain that no
    /// other site owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<TrustDomain>,
    /// The operator lets this site join a trust domain other sites already own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub share_trust_domain: bool,
}

/// What a joining site claims, and who owns that trust domain now.
#[derive(Clone, Debug)]
pub struct Claim {
    pub site: SiteName,
    pub trust_domain: TrustDomain,
    /// Sites other than `site` whose catalog record has `trust_domain`.
    pub owners: Vec<SiteName>,
}

/// Why a token was refused. Each variant says which check failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("not a meshfed join token: {0}")]
    Malformed(String),
    #[error("token is not known to this federation (issued elsewhere, or revoked)")]
    Unknown,
    #[error("token expired at {expired_at} (unix), {ago}s ago")]
    Expired { expired_at: i64, ago: i64 },
    #[error("token was already used at {used_at} (unix); create a new one")]
    AlreadyUsed { used_at: i64 },
    #[error("token is for site {token_site}, not {claimed}")]
    WrongSite {
        token_site: SiteName,
        claimed: SiteName,
    },
    #[error("token binds the site to trust domain {bound}, not {claimed}")]
    TrustDomainMismatch {
        bound: TrustDomain,
        claimed: TrustDomain,
    },
    #[error(
        "trust domain {trust_domain} belongs to site(s) {owners}; sharing it needs a token created with --trust-domain {trust_domain} --share-trust-domain",
        owners = owners.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    )]
    TrustDomainOwned {
        trust_domain: TrustDomain,
        owners: Vec<SiteName>,
    },
}

impl TokenError {
    /// Stable code for the wire, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "token_malformed",
            Self::Unknown => "token_unknown",
            Self::Expired { .. } => "token_expired",
            Self::AlreadyUsed { .. } => "token_reused",
            Self::WrongSite { .. } => "token_wrong_site",
            Self::TrustDomainMismatch { .. } => "trust_domain_mismatch",
            Self::TrustDomainOwned { .. } => "trust_domain_owned",
        }
    }
}

impl JoinToken {
    /// A fresh token with a random secret.
    pub fn generate(
        site: SiteName,
        addresses: Vec<String>,
        federation_trust_domain: TrustDomain,
        ca_fingerprint: String,
    ) -> Self {
        use ring::rand::SecureRandom;
        let mut secret = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .expect("the OS random source is available");
        Self {
            site,
            addresses,
            federation_trust_domain,
            ca_fingerprint,
            secret: URL_SAFE_NO_PAD.encode(secret),
        }
    }

    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a token serializes");
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let body = s.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            TokenError::Malformed(format!("does not start with {TOKEN_PREFIX:?}"))
        })?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Malformed(format!("not base64url: {e}")))?;
        let t: Self =
            serde_json::from_slice(&json).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if t.addresses.is_empty() {
            return Err(TokenError::Malformed("no federation address".into()));
        }
        if t.ca_fingerprint.len() != 64 || !t.ca_fingerprint.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(TokenError::Malformed(
                "ca_fingerprint is not a SHA-256 hex digest".into(),
            ));
        }
        match URL_SAFE_NO_PAD.decode(&t.secret) {
            Ok(b) if b.len() == 32 => Ok(t),
            _ => Err(TokenError::Malformed(
                "secret is not 32 bytes of base64url".into(),
            )),
        }
    }

    /// The key the federation files the token under: SHA-256 of the secret, hex.
    pub fn secret_hash(&self) -> String {
        hash_hex(self.secret.as_bytes())
    }
}

fn hash_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Redeems `token` for `claim` at `now`: marks it used, or says why not. Pure.
///
/// A trust domain belongs to the sites that joined with it: a site may claim one that
/// another site owns only when the operator said so on the token (bound to exactly that
/// trust domain, with `share_trust_domain`). Without that, any token holder could replace
/// another site's bundle and impersonate it.
pub fn redeem(
    records: &mut BTreeMap<String, TokenRecord>,
    token: &JoinToken,
    claim: &Claim,
    now: i64,
) -> Result<(), TokenError> {
    let claimed = &claim.site;
    let rec = records
        .get_mut(&token.secret_hash())
        .ok_or(TokenError::Unknown)?;
    if let Some(used_at) = rec.used_unix {
        return Err(TokenError::AlreadyUsed { used_at });
    }
    if now >= rec.expires_unix {
        return Err(TokenError::Expired {
            expired_at: rec.expires_unix,
            ago: now - rec.expires_unix,
        });
    }
    if rec.site != *claimed {
        return Err(TokenError::WrongSite {
            token_site: rec.site.clone(),
            claimed: claimed.clone(),
        });
    }
    if let Some(bound) = &rec.trust_domain
        && *bound != claim.trust_domain
    {
        return Err(TokenError::TrustDomainMismatch {
            bound: bound.clone(),
            claimed: claim.trust_domain.clone(),
        });
    }
    let others: Vec<SiteName> = claim
        .owners
        .iter()
        .filter(|o| *o != claimed)
        .cloned()
        .collect();
    if !others.is_empty() && !rec.share_trust_domain {
        return Err(TokenError::TrustDomainOwned {
            trust_domain: claim.trust_domain.clone(),
            owners: others,
        });
    }
    rec.used_unix = Some(now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn token() -> JoinToken {
        JoinToken::generate(
            SiteName::new("west").unwrap(),
            vec!["127.0.0.1:15010".into()],
            TrustDomain::new("fed.example.org").unwrap(),
            "ab".repeat(32),
        )
    }

    #[test]
    fn round_trip() {
        let t = token();
        assert_eq!(JoinToken::decode(&t.encode()).unwrap(), t);
        assert_ne!(token().secret, t.secret, "secrets are random");
    }

    fn rec(site: &str, expires_unix: i64) -> TokenRecord {
        TokenRecord {
            site: SiteName::new(site).unwrap(),
            expires_unix,
            used_unix: None,
            trust_domain: None,
            share_trust_domain: false,
        }
    }

    fn claim(site: &str, td: &str, owners: &[&str]) -> Claim {
        Claim {
            site: SiteName::new(site).unwrap(),
            trust_domain: TrustDomain::new(td).unwrap(),
            owners: owners.iter().map(|o| SiteName::new(o).unwrap()).collect(),
        }
    }

    fn redeem_as(
        recs: &mut BTreeMap<String, TokenRecord>,
        t: &JoinToken,
        site: &SiteName,
        now: i64,
    ) -> Result<(), TokenError> {
        let c = claim(site.as_str(), "west.example.org", &[]);
        redeem(recs, t, &c, now)
    }

    /// The trust-domain rules, one row each: (token binding, share, claimed trust
    /// domain, its owners) → result.
    #[test]
    fn trust_domain_ownership() {
        type Row = (
            Option<&'static str>,
            bool,
            &'static str,
            &'static [&'static str],
            Result<(), &'static str>,
        );
        let rows: &[Row] = &[
            // An unbound token: any trust domain nobody else owns.
            (None, false, "north.example.org", &[], Ok(())),
            // The attack: an unbound token claiming west's trust domain.
            (
                None,
                false,
                "west.example.org",
                &["west"],
                Err("trust_domain_owned"),
            ),
            // Re-joining one's own trust domain (a new token for the same site).
            (None, false, "north.example.org", &["north"], Ok(())),
            // Bound tokens: only the bound trust domain.
            (
                Some("north.example.org"),
                false,
                "north.example.org",
                &[],
                Ok(()),
            ),
            (
                Some("north.example.org"),
                false,
                "west.example.org",
                &[],
                Err("trust_domain_mismatch"),
            ),
            (
                Some("north.example.org"),
                false,
                "west.example.org",
                &["west"],
                Err("trust_domain_mismatch"),
            ),
            // Bound but not shared: still refused when another site owns it.
            (
                Some("west.example.org"),
                false,
                "west.example.org",
                &["west"],
                Err("trust_domain_owned"),
            ),
            // Sharing is the operator's explicit choice.
            (
                Some("west.example.org"),
                true,
                "west.example.org",
                &["west", "west2"],
                Ok(()),
            ),
        ];
        for (i, (bound, share, td, owners, want)) in rows.iter().enumerate() {
            let t = token();
            let mut recs = BTreeMap::new();
            let mut r = rec("north", 1000);
            r.trust_domain = bound.map(|b| TrustDomain::new(b).unwrap());
            r.share_trust_domain = *share;
            recs.insert(t.secret_hash(), r);
            let got = redeem(&mut recs, &t, &claim("north", td, owners), 10).map_err(|e| e.code());
            assert_eq!(got, *want, "row {i}");
            // A refused claim does not use the token up.
            assert_eq!(
                recs[&t.secret_hash()].used_unix.is_some(),
                want.is_ok(),
                "row {i}"
            );
        }
        let e = TokenError::TrustDomainOwned {
            trust_domain: TrustDomain::new("west.example.org").unwrap(),
            owners: vec![SiteName::new("west").unwrap()],
        };
        assert!(e.to_string().contains("belongs to site(s) west"), "{e}");
        assert!(e.to_string().contains("--share-trust-domain"), "{e}");
    }

    #[test]
    fn records_without_binding_still_load() {
        // Tokens stored before the binding existed read as unbound.
        let r: TokenRecord =
            serde_json::from_str(r#"{"site":"west","expires_unix":5,"used_unix":null}"#).unwrap();
        assert_eq!(r, rec("west", 5));
    }

    #[test]
    fn one_use_and_expiry() {
        let t = token();
        let west = SiteName::new("west").unwrap();
        let mut recs = BTreeMap::new();
        recs.insert(t.secret_hash(), rec("west", 1000));
        let east = SiteName::new("east").unwrap();
        assert!(matches!(
            redeem_as(&mut recs, &t, &east, 10),
            Err(TokenError::WrongSite { .. })
        ));
        redeem_as(&mut recs, &t, &west, 10).unwrap();
        assert_eq!(
            redeem_as(&mut recs, &t, &west, 11),
            Err(TokenError::AlreadyUsed { used_at: 10 })
        );
        let t2 = token();
        recs.insert(t2.secret_hash(), rec("west", 1000));
        let e = redeem_as(&mut recs, &t2, &west, 1500).unwrap_err();
        assert_eq!(
            e,
            TokenError::Expired {
                expired_at: 1000,
                ago: 500
            }
        );
        assert_eq!(e.code(), "token_expired");
        assert_eq!(
            redeem_as(&mut recs, &token(), &west, 10),
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn malformed_tokens_say_why() {
        let e = JoinToken::decode("hello").unwrap_err();
        assert!(e.to_string().contains("does not start with"), "{e}");
        let e = JoinToken::decode(&format!("{TOKEN_PREFIX}!!")).unwrap_err();
        assert!(e.to_string().contains("base64url"), "{e}");
        let mut t = token();
        t.ca_fingerprint = "xyz".into();
        let e = JoinToken::decode(&t.encode()).unwrap_err();
        assert!(e.to_string().contains("ca_fingerprint"), "{e}");
        let mut t = token();
        t.addresses.clear();
        assert!(
            JoinToken::decode(&t.encode())
                .unwrap_err()
                .to_string()
                .contains("address")
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in "\\PC{0,200}") {
            let _ = JoinToken::decode(&s);
            let _ = JoinToken::decode(&format!("{TOKEN_PREFIX}{s}"));
        }
    }
}
