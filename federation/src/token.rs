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

/// Redeems `token` for `claimed` at `now`: marks it used, or says why not. Pure.
pub fn redeem(
    records: &mut BTreeMap<String, TokenRecord>,
    token: &JoinToken,
    claimed: &SiteName,
    now: i64,
) -> Result<(), TokenError> {
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

    #[test]
    fn one_use_and_expiry() {
        let t = token();
        let west = SiteName::new("west").unwrap();
        let mut recs = BTreeMap::new();
        recs.insert(
            t.secret_hash(),
            TokenRecord {
                site: west.clone(),
                expires_unix: 1000,
                used_unix: None,
            },
        );
        let east = SiteName::new("east").unwrap();
        assert!(matches!(
            redeem(&mut recs, &t, &east, 10),
            Err(TokenError::WrongSite { .. })
        ));
        redeem(&mut recs, &t, &west, 10).unwrap();
        assert_eq!(
            redeem(&mut recs, &t, &west, 11),
            Err(TokenError::AlreadyUsed { used_at: 10 })
        );
        let t2 = token();
        recs.insert(
            t2.secret_hash(),
            TokenRecord {
                site: west.clone(),
                expires_unix: 1000,
                used_unix: None,
            },
        );
        let e = redeem(&mut recs, &t2, &west, 1500).unwrap_err();
        assert_eq!(
            e,
            TokenError::Expired {
                expired_at: 1000,
                ago: 500
            }
        );
        assert_eq!(e.code(), "token_expired");
        assert_eq!(
            redeem(&mut recs, &token(), &west, 10),
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
