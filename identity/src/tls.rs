//! rustls configurations for mutual SPIFFE authentication, with an SVID that can be
//! rotated under running configs.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;

use crate::ca::Svid;
use crate::verify::SpiffeVerifier;

/// The SVID this process presents, swappable at any time: new handshakes use the new
/// certificate, established connections are untouched. Serves both the server and the
/// client side.
#[derive(Debug)]
pub struct SvidResolver {
    current: ArcSwap<CertifiedKey>,
}

impl SvidResolver {
    pub fn new(svid: &Svid) -> Result<Self, rustls::Error> {
        Ok(Self {
            current: ArcSwap::from_pointee(certified(svid)?),
        })
    }

    /// Replaces the SVID after checking that its key matches its certificate.
    pub fn update(&self, svid: &Svid) -> Result<(), rustls::Error> {
        self.current.store(Arc::new(certified(svid)?));
        Ok(())
    }
}

fn certified(svid: &Svid) -> Result<CertifiedKey, rustls::Error> {
    let key = rustls::crypto::ring::sign::any_supported_type(&svid.key)?;
    let ck = CertifiedKey::new(svid.chain.clone(), key);
    ck.keys_match()?;
    Ok(ck)
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS 1.3 only: every meshfed peer speaks it, and QUIC requires it.
static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions() -> &'static [&'static rustls::SupportedProtocolVersion] {
    VERSIONS
}

/// The one crypto provider meshfed's TLS uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config that presents `svid` and requires a client SVID accepted by
/// `verifier`.
pub fn server_config(
    svid: Arc<SvidResolver>,
    verifier: SpiffeVerifier,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(svid);
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    // 0-RTT data is replayable; the tunnel's open request must never be.
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// A client config that presents `svid` and accepts servers `verifier` accepts.
pub fn client_config(
    svid: Arc<SvidResolver>,
    verifier: SpiffeVerifier,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(svid);
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg.enable_early_data = false;
    Ok(cfg)
}
