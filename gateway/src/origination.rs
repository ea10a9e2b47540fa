//! TLS origination toward registered legacy endpoints: the registering site's gateway
//! speaks TLS (or mutual TLS) to the endpoint, verified against the CA the operator gave
//! for the configured server name. Configured per service by an Istio `DestinationRule`
//! (`trafficPolicy.tls`: SIMPLE or MUTUAL, caCertificates, clientCertificate,
//! privateKey, sni).

use std::path::Path;
use std::sync::Arc;

use meshfed_catalog::legacy::{TlsMode, TlsOrigination};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The certificates in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A rustls client, and the server name to send and verify.
pub type Client = (Arc<rustls::ClientConfig>, ServerName<'static>);

/// The clients built so far, by setting: without ALPN, and offering only `h2`. Each is
/// built once (it reads PEM files), for the bytes and the HTTP path alike, and looked up
/// by reference (the bytes path asks once per connection).
#[derive(Default)]
pub struct Clients(
    std::sync::Mutex<std::collections::BTreeMap<TlsOrigination, [Option<Client>; 2]>>,
);

impl Clients {
    /// The client for `t`, built on first use; with `h2`, one that offers only `h2` in
    /// ALPN (toward an h2 or gRPC endpoint).
    pub fn get(&self, t: &TlsOrigination, h2: bool) -> Result<Client, String> {
        let i = usize::from(h2);
        if let Some(Some(c)) = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(t)
            .map(|cs| &cs[i])
        {
            return Ok(c.clone());
        }
        let (mut cfg, name) = client(t)?;
        if h2 {
            Arc::make_mut(&mut cfg).alpn_protocols = vec![b"h2".to_vec()];
        }
        let c = (cfg, name);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(t.clone())
            .or_default()[i] = Some(c.clone());
        Ok(c)
    }
}

/// Speaks TLS over `tcp` as `client` says, the handshake within `within`.
pub async fn handshake(
    (config, name): Client,
    tcp: tokio::net::TcpStream,
    within: std::time::Duration,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(within, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("handshake: {e}")),
        Err(_) => Err(format!("handshake timed out after {within:?}")),
    }
}

/// A rustls client for `t`, and the server name to send and verify.
pub fn client(t: &TlsOrigination) -> Result<Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(Path::new(&t.ca_certificates))? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", t.ca_certificates))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let cfg = match t.mode {
        TlsMode::Simple => builder.with_no_client_auth(),
        TlsMode::Mutual => {
            let cert = t
                .client_certificate
                .as_deref()
                .ok_or("MUTUAL needs clientCertificate")?;
            let key = t.private_key.as_deref().ok_or("MUTUAL needs privateKey")?;
            builder
                .with_client_auth_cert(load_certs(Path::new(cert))?, load_key(Path::new(key))?)
                .map_err(|e| format!("{cert}: {e}"))?
        }
    };
    let name = ServerName::try_from(t.sni.clone()).map_err(|e| format!("sni {:?}: {e}", t.sni))?;
    Ok((Arc::new(cfg), name))
}
