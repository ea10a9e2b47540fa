//! rustls configurations for mutual SPIFFE authentication.

use std::sync::Arc;

use crate::ca::Svid;
use crate::verify::SpiffeVerifier;

/// TLS 1.3 only: every meshfed peer speaks it, and QUIC requires it.
static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions() -> &'static [&'static rustls::SupportedProtocolVersion] {
    VERSIONS
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config that requires a client SVID accepted by `verifier`.
pub fn server_config(
    svid: &Svid,
    verifier: SpiffeVerifier,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    // 0-RTT data is replayable; the tunnel's open request must never be.
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// A client config that presents `svid` and accepts servers `verifier` accepts.
pub fn client_config(
    svid: &Svid,
    verifier: SpiffeVerifier,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg.enable_early_data = false;
    Ok(cfg)
}
