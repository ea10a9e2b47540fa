//! The server side of the federation API's TLS: it hands each connection's verified
//! SPIFFE ID to the service. A caller without a certificate (a joining site) is let
//! through with no ID; the service decides what it may do. The client side is
//! `meshfed_api::tls`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use meshfed_identity::tls::{SvidResolver, provider};
use meshfed_identity::{BundleSet, PeerPolicy, SpiffeId, SpiffeVerifier};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, UnixTime};
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
