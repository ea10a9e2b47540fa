//! The client side of the federation API's TLS: joining pins the federation CA by
//! fingerprint (the join token carries it); afterwards the site verifies the
//! federation's SVID against its bundle and presents its own. HTTP/2 over TLS 1.3 only.

use std::sync::Arc;

use meshfed_identity::tls::{SvidResolver, provider};
use meshfed_identity::{BundleSet, PeerPolicy, SpiffeId, SpiffeVerifier, TrustBundle, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

/// HTTP/2 PING interval and timeout on the federation connection, both ways.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(5);

const H2: &[u8] = b"h2";

/// Why no channel to the federation could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("federation address {address}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// Every address failed; the last failure, with its chain of causes.
    #[error("{address}: {detail}")]
    Unreachable { address: String, detail: String },
    #[error("no federation address")]
    NoAddress,
}

/// Verifies the federation's server certificate before the site has its bundle: the
/// last certificate of the presented chain must hash to the pinned fingerprint, and the
/// leaf must be a valid X.509-SVID of `expected` issued by it.
#[derive(Debug)]
struct PinnedFederation {
    fingerprint: String,
    expected: SpiffeId,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedFederation {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let err = |m: String| rustls::Error::General(m);
        let ca = intermediates.last().ok_or_else(|| {
            err("federation sent no CA certificate to check the pin against".into())
        })?;
        let td = self.expected.trust_domain();
        let bundle = TrustBundle::new(td.clone(), vec![ca.clone().into_owned()], 0);
        if bundle.fingerprint() != self.fingerprint {
            return Err(err(format!(
                "federation CA fingerprint {} does not match the token's {}",
                bundle.fingerprint(),
                self.fingerprint
            )));
        }
        let set: BundleSet = [bundle].into_iter().collect();
        let v = SpiffeVerifier::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(set)),
            PeerPolicy::Only([self.expected.clone()].into()),
        );
        v.verify(
            ee,
            &intermediates[..intermediates.len() - 1],
            now,
            meshfed_identity::Usage::Server,
        )
        .map(|_| ServerCertVerified::assertion())
        .map_err(|e| err(format!("federation certificate refused: {e}")))
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// How a site authenticates the federation and itself.
pub enum ClientTrust {
    /// Joining: pin the CA, present no certificate.
    Pinned {
        fingerprint: String,
        federation_td: TrustDomain,
    },
    /// Joined: verify the federation's SVID against its bundle, present our SVID.
    Mutual {
        federation_bundle: TrustBundle,
        svid: Arc<SvidResolver>,
    },
}

/// A federation ID for a trust domain: `spiffe://<td>/meshfed/federation`.
pub fn federation_id(td: &TrustDomain) -> SpiffeId {
    td.child(&["meshfed", "federation"])
        .expect("a constant valid path")
}

/// Connects to the first reachable address.
pub async fn connect(
    addresses: &[String],
    trust: ClientTrust,
) -> Result<tonic::transport::Channel, ConnectError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous();
    let mut cfg = match trust {
        ClientTrust::Pinned {
            fingerprint,
            federation_td,
        } => builder
            .with_custom_certificate_verifier(Arc::new(PinnedFederation {
                fingerprint,
                expected: federation_id(&federation_td),
                algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        ClientTrust::Mutual {
            federation_bundle,
            svid,
        } => {
            let id = federation_id(&federation_bundle.trust_domain);
            let set: BundleSet = [federation_bundle].into_iter().collect();
            let v = SpiffeVerifier::new(
                Arc::new(arc_swap::ArcSwap::from_pointee(set)),
                PeerPolicy::Only([id].into()),
            );
            builder
                .with_custom_certificate_verifier(Arc::new(v))
                .with_client_cert_resolver(svid)
        }
    };
    cfg.alpn_protocols = vec![H2.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut last = ConnectError::NoAddress;
    for addr in addresses {
        let connector = connector.clone();
        let target = addr.clone();
        let svc = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
            let (connector, target) = (connector.clone(), target.clone());
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let tls = connector
                    .connect(
                        ServerName::try_from("meshfed-federation").expect("valid name"),
                        tcp,
                    )
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| ConnectError::Address {
                address: addr.clone(),
                source,
            })?
            .connect_timeout(std::time::Duration::from_secs(5))
            // A connection that goes quiet without a reset (a partition, a dead NAT
            // mapping) is found within KEEPALIVE twice, not TCP's minutes: the session
            // ends and the site redials, resuming from its revision.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        match endpoint.connect_with_connector(svc).await {
            Ok(ch) => return Ok(ch),
            Err(e) => {
                use std::error::Error;
                let mut msg = e.to_string();
                let mut src = e.source();
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                last = ConnectError::Unreachable {
                    address: addr.clone(),
                    detail: msg,
                };
            }
        }
    }
    Err(last)
}
