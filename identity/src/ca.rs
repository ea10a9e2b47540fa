//! A certificate authority per trust domain, and the X.509-SVIDs it issues.

use std::fs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::bundle::TrustBundle;
use crate::id::{SpiffeId, TrustDomain};
use crate::verify::check_ca_cert;

/// Default SVID lifetime: short, because rotation is cheap.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default root lifetime.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Clock skew tolerated between sites: certificates are back-dated by this much.
const BACKDATE: Duration = Duration::from_secs(60);

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a PEM {what}: {detail}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: not a usable CA certificate: {reason}")]
    NotACa {
        path: PathBuf,
        #[source]
        reason: crate::verify::CaCertError,
    },
    #[error("SPIFFE ID {id} is not in this CA's trust domain {td}")]
    ForeignId { id: SpiffeId, td: TrustDomain },
    #[error("TTL must be positive")]
    ZeroTtl,
    /// The signing authority is no longer valid: nothing it signs would verify.
    #[error("the signing authority expired at {not_after} (Unix time): issue from a valid one")]
    AuthorityExpired { not_after: i64 },
}

/// The signing half of a trust domain.
pub struct Ca {
    td: TrustDomain,
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
    /// What an SVID it issues carries after its leaf: nothing for a root; for an
    /// intermediate, its own certificate and those between it and the root.
    issuer_chain: Vec<CertificateDer<'static>>,
}

/// An X.509-SVID with its private key.
#[derive(Debug)]
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

// === impl Ca ===

impl Ca {
    /// Generates a new self-signed root for `td` (ECDSA P-256).
    pub fn generate(td: &TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params(td, "root", BasicConstraints::Unconstrained)?;
        set_validity(&mut params, ttl);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            td: td.clone(),
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key,
            issuer_chain: vec![],
        })
    }

    /// Issues an intermediate CA of this trust domain, for a site signing authority that
    /// keeps the root offline: SVIDs it issues chain to this CA's bundle. `ca.pem` of the
    /// intermediate holds its certificate and then its parents' (not the root).
    pub fn intermediate(&self, ttl: Duration) -> Result<Ca, CaError> {
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params(&self.td, "intermediate", BasicConstraints::Constrained(0))?;
        params.use_authority_key_identifier_extension = true;
        self.set_validity(&mut params, ttl)?;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        let der = cert.der().clone();
        let mut issuer_chain = vec![der.clone()];
        issuer_chain.extend(self.issuer_chain.iter().cloned());
        let cert_pem = issuer_chain
            .iter()
            .map(|c| der_to_pem("CERTIFICATE", c))
            .collect();
        Ok(Ca {
            td: self.td.clone(),
            cert: der,
            cert_pem,
            key,
            issuer_chain,
        })
    }

    /// Whether this CA is an intermediate (its SVIDs carry a chain).
    pub fn is_intermediate(&self) -> bool {
        !self.issuer_chain.is_empty()
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_string(&cert_path)?;
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| CaError::Pem {
                    path: cert_path.clone(),
                    what: "certificate",
                    detail: e.to_string(),
                })?;
        let Some(cert) = certs.first().cloned() else {
            return Err(CaError::Pem {
                path: cert_path,
                what: "certificate",
                detail: "no certificate in the file".into(),
            });
        };
        // A root is self-signed and travels in bundles, not in chains.
        let issuer_chain = if crate::verify::is_self_signed(&cert) {
            vec![]
        } else {
            certs
        };
        let td = check_ca_cert(&cert).map_err(|reason| CaError::NotACa {
            path: cert_path.clone(),
            reason,
        })?;
        let key_pem = read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Pem {
            path: key_path,
            what: "private key",
            detail: e.to_string(),
        })?;
        Ok(Self {
            td,
            cert,
            cert_pem,
            key,
            issuer_chain,
        })
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_file(
            &dir.join(CA_KEY_FILE),
            self.key.serialize_pem().as_bytes(),
            0o600,
        )
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// This CA as a one-authority trust bundle.
    pub fn bundle(&self, sequence: u64) -> TrustBundle {
        TrustBundle::new(self.td.clone(), vec![self.cert.clone()], sequence)
    }

    /// Issues an X.509-SVID for `id`: one URI SAN, not a CA, digitalSignature (critical),
    /// serverAuth + clientAuth.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        if id.trust_domain_str() != self.td.as_str() {
            return Err(CaError::ForeignId {
                id: id.clone(),
                td: self.td.clone(),
            });
        }
        if ttl.is_zero() {
            return Err(CaError::ZeroTtl);
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshfed");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.set_validity(&mut params, ttl)?;
        let (cert, key) = self.sign(params)?;
        let mut chain = vec![cert];
        chain.extend(self.issuer_chain.iter().cloned());
        Ok(Svid {
            id: id.clone(),
            chain,
            key,
        })
    }

    /// Valid from a minute ago for `ttl`, but never past this CA's own notAfter (what it
    /// signs would not verify then); refused once this CA has expired.
    fn set_validity(&self, params: &mut CertificateParams, ttl: Duration) -> Result<(), CaError> {
        set_validity(params, ttl);
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&self.cert) else {
            return Ok(());
        };
        let ca_not_after = cert.validity().not_after.timestamp();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        if ca_not_after <= now {
            return Err(CaError::AuthorityExpired {
                not_after: ca_not_after,
            });
        }
        if params.not_after.unix_timestamp() > ca_not_after
            && let Ok(t) = OffsetDateTime::from_unix_timestamp(ca_not_after)
        {
            params.not_after = t;
        }
        Ok(())
    }

    /// Signs arbitrary leaf parameters. Only for building deliberately broken
    /// certificates in tests; production code uses [`Ca::issue`].
    #[doc(hidden)]
    pub fn sign(
        &self,
        mut params: CertificateParams,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), CaError> {
        params.use_authority_key_identifier_extension = true;
        if params.serial_number.is_none() {
            params.serial_number = Some(random_serial());
        }
        let leaf_key = KeyPair::generate()?;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        let cert = params.signed_by(&leaf_key, &issuer)?;
        let key = PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        Ok((cert.der().clone(), key))
    }
}

/// How far an SVID's notBefore may precede its issuance (the CA backdates by 60 s).
const BACKDATE_ALLOWANCE: i64 = 120;

/// How long until the SVID valid from `not_before` to `not_after` (Unix seconds) is due
/// for renewal at `now`, for SVIDs of lifetime `ttl`: at half of `ttl` before it expires.
/// One that lives longer than `ttl` allows (it was issued otherwise, e.g. by `meshfed ca
/// issue`) is due now, as is one past its half-life. One that lives shorter than `ttl`
/// (capped at its authority's notAfter) is due at half its own lifetime, so renewals
/// near an authority's end come at halving intervals, never in a tight loop. Pure.
pub fn renew_in(not_before: i64, not_after: i64, ttl: Duration, now: i64) -> Duration {
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
    if not_after - not_before > ttl.saturating_add(BACKDATE_ALLOWANCE) {
        return Duration::ZERO;
    }
    let due = (not_after - ttl / 2).max(not_before + (not_after - not_before) / 2);
    Duration::from_secs(u64::try_from(due - now).unwrap_or(0))
}

/// A CA certificate's parameters for `td`: its name (`meshfed <kind> <td>`), the trust
/// domain's URI SAN, the basic constraints, keyCertSign and cRLSign, a random serial.
fn ca_params(
    td: &TrustDomain,
    kind: &str,
    constraints: BasicConstraints,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshfed");
    dn.push(DnType::CommonName, format!("meshfed {kind} {td}"));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(td.id().as_str().try_into()?)];
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, ttl: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
}

fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    // SystemRandom only fails when the OS has no entropy source; a zero serial is then
    // still unique enough together with the key identifier.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&b)
}

// === impl Svid ===

impl Svid {
    /// Loads a chain (leaf first) and a private key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let pem = fs::read(cert_path).map_err(|source| CaError::Io {
            path: cert_path.to_owned(),
            source,
        })?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::Pem {
                path: cert_path.to_owned(),
                what: "certificate",
                detail: e.to_string(),
            })?;
        let leaf = chain.first().ok_or_else(|| CaError::Pem {
            path: cert_path.to_owned(),
            what: "certificate",
            detail: "no CERTIFICATE block".into(),
        })?;
        let id = crate::verify::check_svid_leaf(leaf).map_err(|e| CaError::Pem {
            path: cert_path.to_owned(),
            what: "X.509-SVID",
            detail: e.to_string(),
        })?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| CaError::Pem {
            path: key_path.to_owned(),
            what: "private key",
            detail: e.to_string(),
        })?;
        Ok(Self { id, chain, key })
    }

    /// The leaf's notAfter, as Unix seconds.
    pub fn not_after_unix(&self) -> Option<i64> {
        let leaf = self.chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    pub fn not_before_unix(&self) -> Option<i64> {
        let leaf = self.chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
        Some(cert.validity().not_before.timestamp())
    }

    pub fn cert_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| der_to_pem("CERTIFICATE", c))
            .collect()
    }

    pub fn key_pem(&self) -> String {
        der_to_pem("PRIVATE KEY", self.key.secret_der())
    }

    /// Writes the chain (0644) and key (0600).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
        write_file(cert_path, self.cert_pem().as_bytes(), 0o644)?;
        write_file(key_path, self.key_pem().as_bytes(), 0o600)
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes atomically and durably with `mode` ([`crate::fs::write_file`]).
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    crate::fs::write_file(path, data, mode).map_err(|e| match e {
        crate::fs::FsError::Io { path, source } => CaError::Io { path, source },
        other => CaError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

#[cfg(test)]
mod renew_tests {
    use super::*;

    #[test]
    fn renewal_comes_at_half_the_lifetime() {
        let h = Duration::from_secs(3600);
        // (not_before, not_after, ttl, now, due in seconds)
        let rows = [
            // Issued by the renewer (backdated 60 s): half of ttl before expiry.
            (1_000 - 60, 1_000 + 3600, h, 1_000, 1800),
            (1_000 - 60, 1_000 + 3600, h, 2_800, 0),
            (1_000 - 60, 1_000 + 3600, h, 5_000, 0),
            // A 60 s TTL is not renewed in a loop because of its 60 s backdate.
            (1_000 - 60, 1_060, Duration::from_secs(60), 1_000, 30),
            // Issued otherwise, for longer than ttl allows: now.
            (0, 100_000, Duration::from_secs(60), 10, 0),
            // Capped at its authority's end (10 min of a 1 h ttl): half its own life.
            (1_000 - 60, 1_000 + 600, h, 1_000, 270),
        ];
        for (nb, na, ttl, now, want) in rows {
            assert_eq!(
                renew_in(nb, na, ttl, now),
                Duration::from_secs(want),
                "{nb}..{na} ttl {ttl:?} at {now}"
            );
        }
    }
}

#[cfg(test)]
mod validity_tests {
    use super::*;

    #[test]
    fn nothing_outlives_its_signing_authority() {
        let td = TrustDomain::new("east.example.org").unwrap();
        let root = Ca::generate(&td, Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::gateway(&td, "east").unwrap();
        let root_na = {
            let (_, c) = x509_parser::parse_x509_certificate(&root.cert).unwrap();
            c.validity().not_after.timestamp()
        };
        // Asked for a day: capped at the root's notAfter.
        let svid = root.issue(&id, Duration::from_secs(86_400)).unwrap();
        assert_eq!(svid.not_after_unix(), Some(root_na));
        let inter = root.intermediate(Duration::from_secs(86_400)).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&inter.cert).unwrap();
        assert_eq!(c.validity().not_after.timestamp(), root_na);
        // Shorter than the authority: as asked.
        let short = root.issue(&id, Duration::from_secs(60)).unwrap();
        assert!(short.not_after_unix().unwrap() < root_na);
        // An expired authority signs nothing.
        let gone = Ca::generate(&td, Duration::from_secs(1)).unwrap();
        std::thread::sleep(Duration::from_millis(2100));
        assert!(matches!(
            gone.issue(&id, Duration::from_secs(60)),
            Err(CaError::AuthorityExpired { .. })
        ));
    }
}
