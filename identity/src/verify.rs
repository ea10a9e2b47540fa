//! X.509-SVID verification: the leaf rules of the X.509-SVID spec, chain validation
//! against the bundle of the peer's own trust domain, and rustls verifiers built on both.
//!
//! Every refusal is a [`VerifyError`] with a stable [`VerifyError::code`], so the same
//! reason shows in `meshfed svid verify`, in logs and in handshake-failure metrics.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

use crate::bundle::BundleSet;
use crate::id::{IdError, SpiffeId, TrustDomain};

/// Why a certificate is not an acceptable X.509-SVID for this peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("peer sent no certificate")]
    NoCertificate,
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    #[error("X.509-SVID must have exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(IdError),
    #[error(
        "leaf SPIFFE ID {0} has no path: only a trust domain's CA may name the bare trust domain (X.509-SVID §5.2)"
    )]
    LeafWithoutPath(SpiffeId),
    #[error("leaf certificate is a CA (basicConstraints CA=true)")]
    LeafIsCa,
    #[error("leaf has no keyUsage extension")]
    KeyUsageMissing,
    #[error("leaf keyUsage extension is not marked critical")]
    KeyUsageNotCritical,
    #[error("leaf keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf keyUsage has keyCertSign or cRLSign")]
    LeafCanSign,
    #[error("no trust bundle for trust domain {0}")]
    UnknownTrustDomain(String),
    #[error("chain does not lead to an authority of trust domain {trust_domain}: {detail}")]
    UntrustedChain {
        trust_domain: String,
        detail: String,
    },
    #[error("certificate expired (now {now}, not after {not_after})")]
    Expired { now: String, not_after: String },
    #[error("certificate not yet valid (now {now}, not before {not_before})")]
    NotYetValid { now: String, not_before: String },
    #[error("extended key usage does not allow {0}")]
    WrongUsage(&'static str),
    #[error("peer {0} is not an allowed peer")]
    PeerNotAllowed(SpiffeId),
}

/// What the certificate is used for, checked against its EKU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// Which verified SPIFFE IDs may connect.
#[derive(Clone, Debug)]
pub enum PeerPolicy {
    /// Any ID of any trust domain that has a bundle in the set.
    AnyFederated,
    /// Exactly these IDs.
    Only(BTreeSet<SpiffeId>),
    /// Any meshfed gateway ID (`/meshfed/site/<site>/gateway`) of a federated trust
    /// domain: the inbound policy of a gateway whose peers come from the catalog.
    AnyGateway,
    /// Any ID of this one trust domain: a site's own workloads (callers of its egress).
    TrustDomain(TrustDomain),
}

/// Called with every refusal, for logs and metrics.
pub type RejectHook = Arc<dyn Fn(&VerifyError) + Send + Sync>;

/// A rustls client and server certificate verifier for X.509-SVIDs.
#[derive(Clone)]
pub struct SpiffeVerifier {
    bundles: Arc<arc_swap::ArcSwap<BundleSet>>,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
    on_reject: Option<RejectHook>,
}

// === impl VerifyError ===

impl VerifyError {
    /// A stable, metric-label-safe code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::Malformed(_) => "malformed_certificate",
            Self::UriSanCount(_) => "uri_san_count",
            Self::BadSpiffeId(_) => "bad_spiffe_id",
            Self::LeafWithoutPath(_) => "leaf_without_path",
            Self::LeafIsCa => "leaf_is_ca",
            Self::KeyUsageMissing => "key_usage_missing",
            Self::KeyUsageNotCritical => "key_usage_not_critical",
            Self::NoDigitalSignature => "no_digital_signature",
            Self::LeafCanSign => "leaf_can_sign",
            Self::UnknownTrustDomain(_) => "unknown_trust_domain",
            Self::UntrustedChain { .. } => "untrusted_chain",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongUsage(_) => "wrong_usage",
            Self::PeerNotAllowed(_) => "peer_not_allowed",
        }
    }

    /// Recovers the reason from a rustls error produced by [`SpiffeVerifier`].
    pub fn from_rustls(e: &rustls::Error) -> Option<&VerifyError> {
        match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                o.0.downcast_ref::<VerifyError>()
            }
            _ => None,
        }
    }
}

/// Checks the X.509-SVID leaf rules (every MUST of the X.509-SVID spec §5.2, plus the
/// keyUsage rules of §4.3) and returns the SPIFFE ID. No chain validation.
///
/// §5.2: exactly one URI SAN; scheme `spiffe` (checked by [`SpiffeId::new`]); a non-root
/// path; basicConstraints CA false; neither keyCertSign nor cRLSign.
pub fn check_svid_leaf(der: &[u8]) -> Result<SpiffeId, VerifyError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let id = uri_san_id(&cert)?;
    if id.path().is_empty() {
        return Err(VerifyError::LeafWithoutPath(id));
    }
    let bc = cert
        .basic_constraints()
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(VerifyError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| VerifyError::Malformed(e.to_string()))?
        .ok_or(VerifyError::KeyUsageMissing)?;
    if !ku.critical {
        return Err(VerifyError::KeyUsageNotCritical);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(VerifyError::LeafCanSign);
    }
    if !ku.value.digital_signature() {
        return Err(VerifyError::NoDigitalSignature);
    }
    Ok(id)
}

fn uri_san_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, VerifyError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    if uris.len() != 1 {
        return Err(VerifyError::UriSanCount(uris.len()));
    }
    SpiffeId::new(uris[0]).map_err(VerifyError::BadSpiffeId)
}

/// Whether a certificate names itself as its issuer (a root).
pub fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, c)| c.subject() == c.issuer())
}

/// Why a certificate is not a trust domain's CA.
#[derive(Debug, thiserror::Error)]
pub enum CaCertError {
    #[error("not an X.509 certificate: {0}")]
    Der(#[from] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("basicConstraints CA is not set")]
    NotCa,
    #[error(transparent)]
    Id(#[from] VerifyError),
    #[error("CA URI SAN {0} has a path; expected spiffe://<trust domain>")]
    HasPath(SpiffeId),
}

/// Checks that `der` is a CA certificate naming its trust domain as `spiffe://<td>`, and
/// returns the trust domain.
pub fn check_ca_cert(der: &[u8]) -> Result<TrustDomain, CaCertError> {
    let (_, cert) = X509Certificate::from_der(der)?;
    if !cert.is_ca() {
        return Err(CaCertError::NotCa);
    }
    let id = uri_san_id(&cert)?;
    if !id.path().is_empty() {
        return Err(CaCertError::HasPath(id));
    }
    Ok(id.trust_domain())
}

/// Full X.509-SVID verification: leaf rules, then the chain against the bundle of the
/// leaf's own trust domain only, at time `now`, for `usage`.
pub fn verify_svid(
    bundles: &BundleSet,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<SpiffeId, VerifyError> {
    let id = check_svid_leaf(end_entity)?;
    let td = id.trust_domain_str();
    let bundle = bundles
        .get_str(td)
        .ok_or_else(|| VerifyError::UnknownTrustDomain(td.to_owned()))?;
    let anchors = bundle
        .x509_authorities
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect::<Vec<_>>();
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| VerifyError::Malformed(format!("{e:?}")))?;
    let ku = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    ee.verify_for_usage(algs.all, &anchors, intermediates, now, ku, None, None)
        .map_err(|e| map_webpki(e, td, now, end_entity, usage))?;
    Ok(id)
}

fn map_webpki(e: webpki::Error, td: &str, now: UnixTime, der: &[u8], usage: Usage) -> VerifyError {
    let validity = || {
        X509Certificate::from_der(der)
            .map(|(_, c)| {
                (
                    c.validity().not_before.to_string(),
                    c.validity().not_after.to_string(),
                )
            })
            .unwrap_or_default()
    };
    let now_s = || {
        ASN1Time::from_timestamp(now.as_secs() as i64)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| now.as_secs().to_string())
    };
    match e {
        webpki::Error::CertExpired { .. } => VerifyError::Expired {
            now: now_s(),
            not_after: validity().1,
        },
        webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid {
            now: now_s(),
            not_before: validity().0,
        },
        webpki::Error::RequiredEkuNotFoundContext(_) => VerifyError::WrongUsage(match usage {
            Usage::Server => "serverAuth",
            Usage::Client => "clientAuth",
        }),
        other => VerifyError::UntrustedChain {
            trust_domain: td.to_owned(),
            detail: format!("{other:?}"),
        },
    }
}

/// Why a certificate is not valid at `now` (Unix seconds) by its dates: `expired at …`
/// or `not valid before …`, as X.509 prints them; `None` when it is valid now or cannot
/// be read (what reads it refuses that). Pure.
pub fn outside_validity(der: &[u8], now: i64) -> Option<String> {
    let (_, c) = X509Certificate::from_der(der).ok()?;
    let v = c.validity();
    if now > v.not_after.timestamp() {
        Some(format!("expired at {}", v.not_after))
    } else if now < v.not_before.timestamp() {
        Some(format!("not valid before {}", v.not_before))
    } else {
        None
    }
}

/// The peer's SPIFFE ID from a chain rustls already verified.
pub fn peer_id(chain: &[CertificateDer<'_>]) -> Result<SpiffeId, VerifyError> {
    check_svid_leaf(chain.first().ok_or(VerifyError::NoCertificate)?)
}

// === impl SpiffeVerifier ===

impl SpiffeVerifier {
    pub fn new(bundles: Arc<arc_swap::ArcSwap<BundleSet>>, policy: PeerPolicy) -> Self {
        Self {
            bundles,
            policy,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            on_reject: None,
        }
    }

    /// The same verifier (bundles, hook) with another peer policy.
    pub fn with_policy(mut self, policy: PeerPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn with_reject_hook(mut self, hook: RejectHook) -> Self {
        self.on_reject = Some(hook);
        self
    }

    /// Verifies a peer chain and applies the peer policy.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, VerifyError> {
        let bundles = self.bundles.load();
        let res = verify_svid(&bundles, end_entity, intermediates, now, usage, &self.algs)
            .and_then(|id| match &self.policy {
                PeerPolicy::AnyFederated => Ok(id),
                PeerPolicy::Only(set) if set.contains(&id) => Ok(id),
                PeerPolicy::Only(_) => Err(VerifyError::PeerNotAllowed(id)),
                PeerPolicy::AnyGateway if id.gateway_site().is_some() => Ok(id),
                PeerPolicy::AnyGateway => Err(VerifyError::PeerNotAllowed(id)),
                PeerPolicy::TrustDomain(td) if id.trust_domain_str() == td.as_str() => Ok(id),
                PeerPolicy::TrustDomain(_) => Err(VerifyError::PeerNotAllowed(id)),
            });
        if let (Err(e), Some(hook)) = (&res, &self.on_reject) {
            hook(e);
        }
        res
    }

    fn to_rustls(e: VerifyError) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    }
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // SPIFFE authenticates by URI SAN, never by DNS name.
        self.verify(end_entity, intermediates, now, Usage::Server)
            .map(|_| ServerCertVerified::assertion())
            .map_err(Self::to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, Usage::Client)
            .map(|_| ClientCertVerified::assertion())
            .map_err(Self::to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, DEFAULT_CA_TTL};
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
    use std::time::Duration;

    struct Fixture {
        west: Ca,
        east: Ca,
        bundles: BundleSet,
        algs: WebPkiSupportedAlgorithms,
    }

    fn fixture() -> Fixture {
        let west = Ca::generate(
            &TrustDomain::new("west.example.org").unwrap(),
            DEFAULT_CA_TTL,
        )
        .unwrap();
        let east = Ca::generate(
            &TrustDomain::new("east.example.org").unwrap(),
            DEFAULT_CA_TTL,
        )
        .unwrap();
        let bundles = [west.bundle(1), east.bundle(1)].into_iter().collect();
        Fixture {
            west,
            east,
            bundles,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn good_params(uri: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = ::time::OffsetDateTime::now_utc();
        p.not_before = now - Duration::from_secs(60);
        p.not_after = now + Duration::from_secs(3600);
        p
    }

    fn verify(f: &Fixture, der: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
        verify_svid(
            &f.bundles,
            der,
            &[],
            UnixTime::now(),
            Usage::Client,
            &f.algs,
        )
    }

    #[test]
    fn an_intermediate_signs_svids_that_chain_to_the_root_bundle() {
        let f = fixture();
        let wanted = id("spiffe://west.example.org/meshfed/site/west/gateway");
        let inter = f.west.intermediate(DEFAULT_CA_TTL).unwrap();
        assert!(inter.is_intermediate() && !f.west.is_intermediate());
        let svid = inter.issue(&wanted, Duration::from_secs(3600)).unwrap();
        assert_eq!(svid.chain.len(), 2, "leaf, then the intermediate");
        for usage in [Usage::Client, Usage::Server] {
            let got = verify_svid(
                &f.bundles,
                &svid.chain[0],
                &svid.chain[1..],
                UnixTime::now(),
                usage,
                &f.algs,
            );
            assert_eq!(got.unwrap(), wanted);
        }
        // Without the intermediate, the leaf does not chain to the root.
        assert!(verify(&f, &svid.chain[0]).is_err());
        // On disk: the intermediate's directory keeps its chain; a root's keeps none.
        let dir = std::env::temp_dir().join(format!("meshfed-inter-{}", std::process::id()));
        inter.save(&dir.join("inter")).unwrap();
        f.west.save(&dir.join("root")).unwrap();
        let loaded = Ca::load(&dir.join("inter")).unwrap();
        assert!(loaded.is_intermediate());
        assert_eq!(
            loaded
                .issue(&wanted, Duration::from_secs(60))
                .unwrap()
                .chain
                .len(),
            2
        );
        assert!(!Ca::load(&dir.join("root")).unwrap().is_intermediate());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn issued_svid_verifies() {
        let f = fixture();
        let wanted = id("spiffe://west.example.org/meshfed/site/west/gateway");
        let svid = f.west.issue(&wanted, Duration::from_secs(3600)).unwrap();
        assert_eq!(verify(&f, &svid.chain[0]).unwrap(), wanted);
        let server = verify_svid(
            &f.bundles,
            &svid.chain[0],
            &[],
            UnixTime::now(),
            Usage::Server,
            &f.algs,
        );
        assert_eq!(server.unwrap(), wanted);
    }

    #[test]
    fn two_uri_sans_refused() {
        let f = fixture();
        let mut p = good_params("spiffe://west.example.org/a");
        p.subject_alt_names.push(SanType::URI(
            "spiffe://west.example.org/b".try_into().unwrap(),
        ));
        let (der, _) = f.west.sign(p).unwrap();
        assert_eq!(verify(&f, &der).unwrap_err(), VerifyError::UriSanCount(2));
    }

    #[test]
    fn no_uri_san_refused() {
        let f = fixture();
        let mut p = good_params("spiffe://west.example.org/a");
        p.subject_alt_names = vec![SanType::DnsName("west.example.org".try_into().unwrap())];
        let (der, _) = f.west.sign(p).unwrap();
        assert_eq!(verify(&f, &der).unwrap_err(), VerifyError::UriSanCount(0));
    }

    #[test]
    fn ca_leaf_refused() {
        let f = fixture();
        let mut p = good_params("spiffe://west.example.org/a");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let (der, _) = f.west.sign(p).unwrap();
        assert_eq!(verify(&f, &der).unwrap_err(), VerifyError::LeafIsCa);
    }

    #[test]
    fn missing_digital_signature_refused() {
        let f = fixture();
        let mut p = good_params("spiffe://west.example.org/a");
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        let (der, _) = f.west.sign(p).unwrap();
        assert_eq!(
            verify(&f, &der).unwrap_err(),
            VerifyError::NoDigitalSignature
        );
        let mut p = good_params("spiffe://west.example.org/a");
        p.key_usages = vec![];
        let (der, _) = f.west.sign(p).unwrap();
        assert_eq!(verify(&f, &der).unwrap_err(), VerifyError::KeyUsageMissing);
    }

    #[test]
    fn signing_leaf_refused() {
        let f = fixture();
        let mut p = good_params("spiffe://west.example.org/a");
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        let (der, _) = f.west.sign(p).unwrap();
        assert_eq!(verify(&f, &der).unwrap_err(), VerifyError::LeafCanSign);
    }

    #[test]
    fn wrong_trust_domain_refused() {
        let f = fixture();
        let north = Ca::generate(
            &TrustDomain::new("north.example.org").unwrap(),
            DEFAULT_CA_TTL,
        )
        .unwrap();
        let svid = north
            .issue(&id("spiffe://north.example.org/x"), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            verify(&f, &svid.chain[0]).unwrap_err(),
            VerifyError::UnknownTrustDomain("north.example.org".into())
        );
    }

    #[test]
    fn leaf_signed_by_other_trust_domains_ca_refused() {
        let f = fixture();
        // east's CA signs a leaf that claims to be in west: west's bundle must not accept it,
        // even though east's CA is trusted for east.
        let (der, _) = f
            .east
            .sign(good_params(
                "spiffe://west.example.org/meshfed/site/west/gateway",
            ))
            .unwrap();
        let e = verify(&f, &der).unwrap_err();
        assert_eq!(e.code(), "untrusted_chain", "{e}");
        assert!(e.to_string().contains("west.example.org"), "{e}");
    }

    #[test]
    fn expired_leaf_refused() {
        let f = fixture();
        let mut p = good_params("spiffe://west.example.org/a");
        let now = ::time::OffsetDateTime::now_utc();
        p.not_before = now - Duration::from_secs(7200);
        p.not_after = now - Duration::from_secs(3600);
        let (der, _) = f.west.sign(p).unwrap();
        let e = verify(&f, &der).unwrap_err();
        assert_eq!(e.code(), "expired", "{e}");
    }

    #[test]
    fn not_yet_valid_leaf_refused() {
        let f = fixture();
        let mut p = good_params("spiffe://west.example.org/a");
        let now = ::time::OffsetDateTime::now_utc();
        p.not_before = now + Duration::from_secs(3600);
        p.not_after = now + Duration::from_secs(7200);
        let (der, _) = f.west.sign(p).unwrap();
        let e = verify(&f, &der).unwrap_err();
        assert_eq!(e.code(), "not_yet_valid", "{e}");
    }

    /// A certificate's dates against a clock: the operator-facing check for files meshfed
    /// only loads (TLS origination), where nobody else would say why a handshake fails.
    #[test]
    fn outside_validity_names_the_date_that_is_passed_or_not_reached() {
        let f = fixture();
        let now = ::time::OffsetDateTime::now_utc();
        let at = |from: i64, to: i64| {
            let mut p = good_params("spiffe://west.example.org/a");
            p.not_before = now + ::time::Duration::seconds(from);
            p.not_after = now + ::time::Duration::seconds(to);
            f.west.sign(p).unwrap().0
        };
        let t = now.unix_timestamp();
        // (validity relative to now, clock, want a prefix)
        let cases = [
            ((-3600, 3600), t, None),
            ((-7200, -3600), t, Some("expired at ")),
            ((3600, 7200), t, Some("not valid before ")),
            ((3600, 7200), t + 5000, None),
            ((-7200, -3600), t - 5000, None),
        ];
        for ((from, to), clock, want) in cases {
            let got = outside_validity(&at(from, to), clock);
            match want {
                None => assert_eq!(got, None, "{from}..{to} at {clock}"),
                Some(w) => assert!(got.as_deref().is_some_and(|g| g.starts_with(w)), "{got:?}"),
            }
        }
        assert_eq!(outside_validity(b"not a certificate", t), None);
    }

    #[test]
    fn client_only_eku_refused_as_server() {
        let f = fixture();
        let mut p = good_params("spiffe://west.example.org/a");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (der, _) = f.west.sign(p).unwrap();
        let e = verify_svid(
            &f.bundles,
            &der,
            &[],
            UnixTime::now(),
            Usage::Server,
            &f.algs,
        )
        .unwrap_err();
        assert_eq!(e, VerifyError::WrongUsage("serverAuth"));
    }

    #[test]
    fn bad_spiffe_id_refused() {
        let f = fixture();
        let (der, _) = f
            .west
            .sign(good_params("spiffe://west.example.org/a/../b"))
            .unwrap();
        assert_eq!(
            verify(&f, &der).unwrap_err(),
            VerifyError::BadSpiffeId(IdError::DotSegment)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let f = fixture();
        let e = verify(&f, &CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).unwrap_err();
        assert_eq!(e.code(), "malformed_certificate");
    }

    #[test]
    fn policy_only_refuses_other_ids() {
        let f = fixture();
        let allowed = id("spiffe://west.example.org/meshfed/site/west/gateway");
        let other = id("spiffe://west.example.org/meshfed/site/rogue/gateway");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let v = SpiffeVerifier::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(f.bundles.clone())),
            PeerPolicy::Only([allowed.clone()].into()),
        )
        .with_reject_hook(Arc::new(move |e| seen2.lock().unwrap().push(e.code())));
        let ok = f.west.issue(&allowed, Duration::from_secs(60)).unwrap();
        let bad = f.west.issue(&other, Duration::from_secs(60)).unwrap();
        assert_eq!(
            v.verify(&ok.chain[0], &[], UnixTime::now(), Usage::Client)
                .unwrap(),
            allowed
        );
        assert_eq!(
            v.verify(&bad.chain[0], &[], UnixTime::now(), Usage::Client)
                .unwrap_err(),
            VerifyError::PeerNotAllowed(other)
        );
        assert_eq!(*seen.lock().unwrap(), vec!["peer_not_allowed"]);
        let rustls_err = SpiffeVerifier::to_rustls(VerifyError::LeafIsCa);
        assert_eq!(
            VerifyError::from_rustls(&rustls_err),
            Some(&VerifyError::LeafIsCa)
        );
    }

    #[test]
    fn ca_cert_trust_domain() {
        let f = fixture();
        assert_eq!(
            check_ca_cert(f.west.cert()).unwrap().as_str(),
            "west.example.org"
        );
        let svid = f
            .west
            .issue(&id("spiffe://west.example.org/a"), Duration::from_secs(60))
            .unwrap();
        assert!(check_ca_cert(&svid.chain[0]).is_err());
    }
}

/// One test per MUST of the X.509-SVID spec §5.2, on certificates made by openssl (not
/// by meshfed's CA), so that the leaves carry exactly the extensions each case names.
#[cfg(test)]
mod spec_5_2 {
    use super::*;
    use crate::bundle::TrustBundle;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const TD: &str = "spec.example.org";

    struct Pki {
        dir: PathBuf,
        bundles: BundleSet,
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn der_of(pem_path: &Path) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_file(pem_path).expect("openssl wrote a PEM certificate")
    }

    /// A root CA for `spiffe://spec.example.org`, made by openssl in a fresh directory.
    fn pki(name: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("meshfed-spec52-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ca.cnf"),
            format!(
                "[req]\ndistinguished_name=dn\nx509_extensions=ext\nprompt=no\n\
                 [dn]\nO=spec\n\
                 [ext]\nbasicConstraints=critical,CA:TRUE\n\
                 keyUsage=critical,keyCertSign,cRLSign\n\
                 subjectAltName=URI:spiffe://{TD}\nsubjectKeyIdentifier=hash\n"
            ),
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-config",
                "ca.cnf",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
            ],
        );
        let ca = der_of(&dir.join("ca.pem"));
        check_ca_cert(&ca).expect("openssl made a SPIFFE CA");
        let bundles = [TrustBundle::new(TrustDomain::new(TD).unwrap(), vec![ca], 1)]
            .into_iter()
            .collect();
        Pki { dir, bundles }
    }

    /// A leaf signed by the openssl CA with exactly the extensions in `ext`.
    fn leaf(pki: &Pki, name: &str, ext: &str) -> CertificateDer<'static> {
        let name = &format!("leaf-{name}");
        std::fs::write(pki.dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            &pki.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                "/O=leaf",
            ],
        );
        openssl(
            &pki.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
        der_of(&pki.dir.join(format!("{name}.pem")))
    }

    fn verify(pki: &Pki, der: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
        verify_svid(
            &pki.bundles,
            der,
            &[],
            UnixTime::now(),
            Usage::Client,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn ext(san: &str, basic: &str, usage: &str) -> String {
        format!(
            "subjectAltName={san}\nbasicConstraints={basic}\nkeyUsage={usage}\n\
             extendedKeyUsage=serverAuth,clientAuth\n"
        )
    }

    const GOOD_SAN: &str = "URI:spiffe://spec.example.org/ns/shop/sa/orders";

    /// The verdict on one openssl leaf with these extensions, under its own openssl CA.
    fn verdict(name: &str, san: &str, basic: &str, usage: &str) -> Result<SpiffeId, VerifyError> {
        let p = pki(name);
        verify(&p, &leaf(&p, name, &ext(san, basic, usage)))
    }

    #[test]
    fn a_conforming_openssl_leaf_verifies() {
        // The control: without it, every refusal below could come from a broken fixture.
        let p = pki("good");
        let der = leaf(
            &p,
            "good",
            &ext(GOOD_SAN, "critical,CA:FALSE", "critical,digitalSignature"),
        );
        assert_eq!(
            verify(&p, &der).unwrap().as_str(),
            "spiffe://spec.example.org/ns/shop/sa/orders"
        );
    }

    #[test]
    fn must_refuse_basic_constraints_ca_true() {
        assert_eq!(
            verdict(
                "ca",
                GOOD_SAN,
                "critical,CA:TRUE",
                "critical,digitalSignature"
            )
            .unwrap_err(),
            VerifyError::LeafIsCa
        );
    }

    #[test]
    fn must_refuse_key_cert_sign() {
        assert_eq!(
            verdict(
                "kcs",
                GOOD_SAN,
                "critical,CA:FALSE",
                "critical,digitalSignature,keyCertSign"
            )
            .unwrap_err(),
            VerifyError::LeafCanSign
        );
    }

    #[test]
    fn must_refuse_crl_sign() {
        assert_eq!(
            verdict(
                "crl",
                GOOD_SAN,
                "critical,CA:FALSE",
                "critical,digitalSignature,cRLSign"
            )
            .unwrap_err(),
            VerifyError::LeafCanSign
        );
    }

    #[test]
    fn must_refuse_a_scheme_other_than_spiffe() {
        assert_eq!(
            verdict(
                "scheme",
                "URI:https://spec.example.org/ns/shop/sa/orders",
                "critical,CA:FALSE",
                "critical,digitalSignature"
            )
            .unwrap_err(),
            VerifyError::BadSpiffeId(IdError::WrongScheme)
        );
    }

    #[test]
    fn must_refuse_a_spiffe_id_without_path() {
        let p = pki("nopath");
        let der = leaf(
            &p,
            "nopath",
            &ext(
                "URI:spiffe://spec.example.org",
                "critical,CA:FALSE",
                "critical,digitalSignature",
            ),
        );
        let e = verify(&p, &der).unwrap_err();
        assert_eq!(e.code(), "leaf_without_path", "{e}");
        // A root path ("/") is not a path either.
        let der = leaf(
            &p,
            "rootpath",
            &ext(
                "URI:spiffe://spec.example.org/",
                "critical,CA:FALSE",
                "critical,digitalSignature",
            ),
        );
        assert_eq!(verify(&p, &der).unwrap_err().code(), "bad_spiffe_id");
    }

    #[test]
    fn must_refuse_more_than_one_uri_san() {
        assert_eq!(
            verdict(
                "two",
                "URI:spiffe://spec.example.org/a,URI:spiffe://spec.example.org/b",
                "critical,CA:FALSE",
                "critical,digitalSignature"
            )
            .unwrap_err(),
            VerifyError::UriSanCount(2)
        );
    }

    #[test]
    fn the_path_rule_holds_at_the_tls_layer_too() {
        // The verifier the gateway and the federation use returns the same reason.
        let p = pki("tls");
        let der = leaf(
            &p,
            "tls",
            &ext(
                "URI:spiffe://spec.example.org",
                "critical,CA:FALSE",
                "critical,digitalSignature",
            ),
        );
        let v = SpiffeVerifier::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(p.bundles.clone())),
            PeerPolicy::AnyFederated,
        );
        let e = v
            .verify_client_cert(&der, &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(
            VerifyError::from_rustls(&e).map(VerifyError::code),
            Some("leaf_without_path")
        );
    }
}
