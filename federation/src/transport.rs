//! TLS for the federation API: the server side hands each connection's verified SPIFFE
//! ID to the service; the client side either pins the federation CA by fingerprint
//! (joining) or verifies the federation's SVID against its bundle (afterwards).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use meshfed_identity::tls::SvidResolver;
use meshfed_identity::{BundleSet, PeerPolicy, SpiffeId, SpiffeVerifier, TrustBundle, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

const H2: &[u8] = b"h2";

/// What the service learns about the caller of a request.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The verified SPIFFE ID, when the caller presented an SVID.
    pub id: Option<SpiffeId>,
    pub remote: Option<SocketAddr>,
}

/// One accepted TLS connection, carrying its [`PeerInfo`] to tonic.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Client certificates are verified when presented, but not required: a joining site
/// has no SVID the federation could verify yet, and authenticates with its token.
#[derive(Debug)]
struct OptionalClientAuth(SpiffeVerifier);

impl ClientCertVerifier for OptionalClientAuth {
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        ee: &CertificateDer<'_>,
        im: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(ee, im, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls12_signature(&self.0, m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls13_signature(&self.0, m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(&self.0)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS config: presents `chain` (leaf, then the federation CA so joining
/// sites can check the pin), verifies client SVIDs against `bundles` when presented.
pub fn server_tls(
    svid: Arc<SvidResolver>,
    bundles: Arc<arc_swap::ArcSwap<BundleSet>>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let verifier = SpiffeVerifier::new(bundles, PeerPolicy::AnyFederated);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(OptionalClientAuth(verifier)))
        .with_cert_resolver(svid);
    cfg.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts TCP connections and runs each TLS handshake in its own task, so a slow client
/// never holds up the others.
pub fn incoming(
    listener: TcpListener,
    cfg: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            // gRPC messages are small and latency-bound: no Nagle/delayed-ACK stalls.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let hs =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                        .await;
                let Ok(Ok(tls)) = hs else {
                    debug!(%remote, "federation TLS handshake failed");
                    return;
                };
                let id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| meshfed_identity::verify::peer_id(c).ok());
                let _ = tx
                    .send(Ok(TlsConn {
                        inner: tls,
                        info: PeerInfo {
                            id,
                            remote: Some(remote),
                        },
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
) -> Result<tonic::transport::Channel, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
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
    let mut last = String::from("no federation address");
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
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(std::time::Duration::from_secs(5));
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
                last = format!("{addr}: {msg}");
            }
        }
    }
    Err(last)
}
