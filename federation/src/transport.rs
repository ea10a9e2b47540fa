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

/// TLS handshakes in flight at once, and from one address: past either, a new
/// connection is closed at once (each handshake holds its buffers for up to
/// [`HANDSHAKE_TIMEOUT`]). Room for every site of a large federation (511 sites,
/// Cilium's maximum) reconnecting at once after a restart, from one NAT address even.
pub const MAX_HANDSHAKES: usize = 1024;
pub const MAX_HANDSHAKES_PER_ADDR: usize = 256;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections without a client certificate (a joining site: its one Join call) at
/// once, and from one address; past either, one is closed after its handshake.
pub const MAX_ANONYMOUS: usize = 128;
pub const MAX_ANONYMOUS_PER_ADDR: usize = 32;
/// How long a connection without a client certificate is served: a Join takes
/// milliseconds, and every other call needs an SVID. Before, such a connection that
/// sent nothing after its handshake was held for ever (about 40 KiB and a descriptor
/// each, with no bound on their number).
pub const ANONYMOUS_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Connections one verified identity (a site's gateways, the operator) holds at once;
/// past it, one more is closed after its handshake. A site's 32 replicas each keep a
/// few (Watch, Bundles, publishes), so this is far above any real use, and bounds what
/// one authenticated client can pin, as `LINKS_PER_PEER` does at a gateway.
pub const MAX_CONNECTIONS_PER_ID: usize = 256;

/// Counts what is held, in total and per key (an address, an identity), within
/// bounds. Pure (no I/O); a [`Ticket`] gives its place back when dropped.
#[derive(Debug)]
pub struct Gate<K: std::hash::Hash + Eq + Clone = std::net::IpAddr> {
    total: usize,
    per_key: usize,
    held: std::sync::Mutex<(usize, std::collections::HashMap<K, usize>)>,
}

/// A place in a [`Gate`].
pub struct Ticket<K: std::hash::Hash + Eq + Clone = std::net::IpAddr> {
    gate: Arc<Gate<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Gate<K> {
    pub fn new(total: usize, per_key: usize) -> Arc<Self> {
        Arc::new(Gate {
            total,
            per_key,
            held: Default::default(),
        })
    }

    /// A place for `key`, or why there is none (`"total"`, `"per_key"`).
    pub fn enter(self: &Arc<Self>, key: &K) -> Result<Ticket<K>, &'static str> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.0 >= self.total {
            return Err("total");
        }
        // The key is copied only for its first place.
        match held.1.get_mut(key) {
            Some(n) if *n >= self.per_key => return Err("per_key"),
            Some(n) => *n += 1,
            None if self.per_key == 0 => return Err("per_key"),
            None => {
                held.1.insert(key.clone(), 1);
            }
        }
        held.0 += 1;
        Ok(Ticket {
            gate: self.clone(),
            key: key.clone(),
        })
    }

    /// Places held now.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Ticket<K> {
    fn drop(&mut self) {
        let mut held = self.gate.held.lock().unwrap_or_else(|e| e.into_inner());
        held.0 -= 1;
        if let Some(n) = held.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.1.remove(&self.key);
            }
        }
    }
}

/// What a connection holds in the gates while it lives.
enum Place {
    Anonymous(#[allow(dead_code)] Ticket),
    Identified(#[allow(dead_code)] Ticket<SpiffeId>),
}

/// One accepted TLS connection, carrying its [`PeerInfo`] to tonic. One without a
/// client certificate holds an anonymous place and is served until its deadline.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    /// Its place: without a certificate by address, with one by identity.
    _place: Place,
    /// Past it, reads fail and the connection ends.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
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
        if let Some(d) = &mut self.deadline
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "a connection without a client certificate served its time",
            )));
        }
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
/// never holds up the others; handshakes in flight and connections without a client
/// certificate are bounded ([`MAX_HANDSHAKES`], [`MAX_ANONYMOUS`], per address too), as
/// are one identity's connections ([`MAX_CONNECTIONS_PER_ID`]), and what is closed for
/// it is counted in `refused` by reason.
pub fn incoming(
    listener: TcpListener,
    cfg: Arc<rustls::ServerConfig>,
    refused: prometheus_client::metrics::family::Family<
        crate::server::ReasonLabels,
        prometheus_client::metrics::counter::Counter,
    >,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let handshakes = Gate::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDR);
    let anonymous = Gate::new(MAX_ANONYMOUS, MAX_ANONYMOUS_PER_ADDR);
    let identities = Gate::<SpiffeId>::new(usize::MAX, MAX_CONNECTIONS_PER_ID);
    let refuse = move |reason: &'static str, remote: SocketAddr| {
        refused
            .get_or_create(&crate::server::ReasonLabels { reason })
            .inc();
        debug!(%remote, reason, "federation connection closed");
    };
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
            let handshake = match handshakes.enter(&remote.ip()) {
                Ok(t) => t,
                Err(_) => {
                    refuse("handshake_limit", remote);
                    continue;
                }
            };
            // gRPC messages are small and latency-bound: no Nagle/delayed-ACK stalls.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, refuse) = (acceptor.clone(), tx.clone(), refuse.clone());
            let (anonymous, identities) = (anonymous.clone(), identities.clone());
            tokio::spawn(async move {
                let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(handshake);
                let Ok(Ok(tls)) = hs else {
                    debug!(%remote, "federation TLS handshake failed");
                    return;
                };
                let id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| meshfed_identity::verify::peer_id(c).ok());
                let (place, deadline) = match &id {
                    Some(id) => match identities.enter(id) {
                        Ok(t) => (Place::Identified(t), None),
                        Err(_) => return refuse("identity_connection_limit", remote),
                    },
                    None => match anonymous.enter(&remote.ip()) {
                        Ok(t) => (
                            Place::Anonymous(t),
                            Some(Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME))),
                        ),
                        Err(_) => return refuse("anonymous_limit", remote),
                    },
                };
                let _ = tx
                    .send(Ok(TlsConn {
                        inner: tls,
                        info: PeerInfo {
                            id,
                            remote: Some(remote),
                        },
                        _place: place,
                        deadline,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_bounds_places_in_total_and_per_address_and_gives_them_back() {
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        let b: std::net::IpAddr = [10, 0, 0, 2].into();
        let c: std::net::IpAddr = [10, 0, 0, 3].into();
        let gate = Gate::new(3, 2);
        let a1 = gate.enter(&a).unwrap();
        let a2 = gate.enter(&a).unwrap();
        assert_eq!(gate.enter(&a).err(), Some("per_key"));
        let b1 = gate.enter(&b).unwrap();
        assert_eq!(gate.enter(&c).err(), Some("total"));
        assert_eq!(gate.held(), 3);
        drop(a1);
        assert_eq!(gate.held(), 2);
        let c1 = gate.enter(&c).unwrap();
        assert_eq!(gate.enter(&a).err(), Some("total"));
        drop((a2, b1, c1));
        assert_eq!(gate.held(), 0);
        assert!(gate.held.lock().unwrap().1.is_empty(), "no address kept");
        let _a = gate.enter(&a).unwrap();
        let _a = gate.enter(&a).unwrap();
        // By identity, with no total: only the per-identity bound.
        let ids = Gate::<SpiffeId>::new(usize::MAX, 2);
        let east = SpiffeId::new("spiffe://east.example.org/meshfed/site/east/gateway").unwrap();
        let west = SpiffeId::new("spiffe://west.example.org/meshfed/site/west/gateway").unwrap();
        let held: Vec<_> = (0..2).map(|_| ids.enter(&east).unwrap()).collect();
        assert_eq!(ids.enter(&east).err(), Some("per_key"));
        let _w = ids.enter(&west).unwrap();
        drop(held);
        let _e = ids.enter(&east).unwrap();
    }
}
