//! Ingress: accepts peer gateways' QUIC connections and h2 (HBONE) connections, answers
//! each stream's open request with accept or a typed refusal (the same decision and the
//! same codes on both transports), and splices accepted streams to a local endpoint
//! (within the service's `connectionPool`: past `tcp.maxConnections` open at once, the
//! open is refused `overflow`; for an open that names a subset, one whose labels, under
//! the site's own, hold it: [`select`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshfed_catalog::ServiceName;
use meshfed_catalog::authz::{self, Decision};
use meshfed_identity::SpiffeId;
use meshfed_lifecycle::drain::DrainWatcher;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admission::{Admission, Gate, LINKS_PER_PEER, Limits, PeerLinks, PeerSlot};
use crate::config::Export;
use crate::metrics::Metrics;
use crate::peers::peer_spiffe_id;
use crate::splice::{splice, splice_tls};
use crate::tunnel::{HANDSHAKE_TIMEOUT, HeaderReadError, read_header};
use crate::udp::{FlowBudget, FlowLimits, IngressFlows};
use crate::wire::{self, Open, Refusal, Response, app_code};
use meshfed_catalog::legacy::TlsOrigination;

/// TLS alert `certificate_required` (RFC 8446 §6.2).
const CERTIFICATE_REQUIRED: u8 = 116;

/// Whether a handshake failed with TLS alert `alert` (QUIC CRYPTO_ERROR 0x100 + alert).
fn is_alert(e: &quinn::ConnectionError, alert: u8) -> bool {
    matches!(e, quinn::ConnectionError::TransportError(te)
        if u64::from(te.code) == 0x100 + u64::from(alert))
}

/// A peer must send its open request this soon after opening a stream.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DIR: &str = "ingress";

pub struct Ingress {
    /// Per-service metric series by (service, port, peer) ([`Ingress::service_handles`]).
    service_handles: std::sync::Mutex<
        std::collections::HashMap<(ServiceName, u16, SpiffeId), crate::metrics::ServiceHandles>,
    >,
    /// Swapped whole when registered (legacy) services change.
    pub exports: arc_swap::ArcSwap<BTreeMap<ServiceName, Export>>,
    pub connect_timeout: Duration,
    /// How long a UDP flow lives without datagrams.
    pub udp_idle_timeout: Duration,
    /// UDP flows (one socket each) open on all peer connections.
    flows: Arc<FlowBudget>,
    /// What each authenticated peer holds: connections, and its UDP flow budget.
    peer_links: Arc<PeerLinks>,
    pub metrics: Metrics,
    next: AtomicUsize,
    /// Verified IDs of the peers connected to us now, with their connection counts.
    inbound: std::sync::Mutex<BTreeMap<SpiffeId, BTreeMap<usize, Connection>>>,
    /// The same for h2 connections: cancelling one's token closes it.
    inbound_h2: std::sync::Mutex<BTreeMap<SpiffeId, BTreeMap<usize, CancellationToken>>>,
    /// Reverse h2 connections outbound-only peers dialed to us, on which we open streams
    /// to them.
    reverse: std::sync::Mutex<BTreeMap<SpiffeId, BTreeMap<usize, crate::hbone::Pool>>>,
    next_h2: AtomicUsize,
    /// The live trust bundles: a connection whose peer's trust domain left them (the
    /// federation withdrew it) is closed at its next stream.
    bundles: Arc<arc_swap::ArcSwap<meshfed_identity::BundleSet>>,
    /// Registered AuthorizationPolicies (`registry.json`), swapped whole.
    pub policies: arc_swap::ArcSwap<authz::PolicyIndex>,
    /// Pooled connections to the endpoints of HTTP-family ports.
    upstream: Arc<crate::http::ingress::Upstream>,
    /// The TCP streams spliced now, decided again when policies or exports change.
    live_streams: Mutex<std::collections::HashMap<u64, LiveStream>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// This site.
    site: ThisSite,
}

/// The site an ingress serves.
pub struct ThisSite {
    /// Its name, which a subset's cluster and site labels must name for the subset's
    /// policy to apply here.
    pub name: meshfed_catalog::SiteName,
    /// Its labels (`federation.labels`), which every endpoint holds for the subsets
    /// that select it ([`meshfed_catalog::http_route::endpoint_labels`]).
    pub labels: BTreeMap<String, String>,
}

/// A spliced TCP stream, as the decision saw it; cancelling `cut` resets it.
struct LiveStream {
    open: Open,
    peer: SpiffeId,
    cut: CancellationToken,
}

/// Takes its stream out of [`Ingress::live_streams`] when dropped.
struct Tracked<'a> {
    ingress: &'a Ingress,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.ingress.live_streams_lock().remove(&self.id);
    }
}

/// The connection to an endpoint: plain TCP, or TLS originated by us.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Drops connection `id` of `peer` from a by-peer map (and the peer, with its last).
fn forget<T>(m: &mut BTreeMap<SpiffeId, BTreeMap<usize, T>>, peer: &SpiffeId, id: usize) {
    if let Some(c) = m.get_mut(peer) {
        c.remove(&id);
        if c.is_empty() {
            m.remove(peer);
        }
    }
}

/// What an accepted h2 connection is for.
enum H2Accepted {
    /// Streams the peer opens to us.
    Serve(Box<h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, bytes::Bytes>>),
    /// A reverse connection from an outbound-only peer: we open streams on it.
    Reverse(crate::hbone::Pool),
}

/// An open the decision let through: where it goes and how.
struct Admitted {
    endpoints: Vec<SocketAddr>,
    tls: Option<TlsOrigination>,
    proxy: bool,
    /// An HTTP-family port: requests are forwarded one by one
    /// ([`crate::config::Export::served_protocol`]: the PROXY header is per connection,
    /// so a port with it carries bytes).
    http: Option<meshfed_catalog::catalog::AppProtocol>,
    /// The service's outlier detection (per endpoint on an HTTP port), `connectionPool`
    /// (toward HTTP/1.1 endpoints on an HTTP port, the tunnelled connections at once on
    /// a TCP port) and, on an HTTP port, each endpoint connection's limits.
    policy: crate::http::ingress::EndpointPolicy,
    /// On an HTTP port, the subsets with a policy of their own.
    subsets: Vec<crate::http::ingress::NamedPolicy>,
    /// On a TCP port, the subset whose policy `policy` is (`""`: the service's), which
    /// keys its connection pool.
    pool_key: String,
    /// On an HTTP port, each endpoint's labels (in `endpoints`' order), for the subset a
    /// request names.
    labels: Vec<BTreeMap<String, String>>,
}

/// Each of `endpoints`' labels as its subsets see them here: its own (`own`, by
/// address) under this site's (`site`); empty when no endpoint and not the site has
/// any. Pure.
pub fn labels_of(
    endpoints: &[SocketAddr],
    own: &BTreeMap<SocketAddr, BTreeMap<String, String>>,
    site: &BTreeMap<String, String>,
) -> Vec<BTreeMap<String, String>> {
    if own.is_empty() && site.is_empty() {
        return vec![];
    }
    let none = BTreeMap::new();
    endpoints
        .iter()
        .map(|ep| meshfed_catalog::http_route::endpoint_labels(own.get(ep).unwrap_or(&none), site))
        .collect()
}

/// The endpoints a TCP open that names a subset (`selector`) may connect to: those whose
/// labels ([`labels_of`], in `endpoints`' order) hold it; `no_ready_endpoint` when none
/// does, which lets the egress try another site. Pure.
pub fn select(
    open: &Open,
    selector: &BTreeMap<String, String>,
    endpoints: Vec<SocketAddr>,
    labels: &[BTreeMap<String, String>],
) -> Result<Vec<SocketAddr>, Refused> {
    let none = BTreeMap::new();
    let some: Vec<SocketAddr> = endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            meshfed_catalog::http_route::selected(selector, labels.get(*i).unwrap_or(&none))
        })
        .map(|(_, ep)| *ep)
        .collect();
    if some.is_empty() {
        return Err(refused(
            Refusal::NoReadyEndpoint,
            format!(
                "none of {}:{}'s {} endpoint(s) has the labels {}",
                open.service,
                open.port,
                endpoints.len(),
                meshfed_catalog::http_route::format_selector(selector)
            ),
        ));
    }
    Ok(some)
}

/// Where an accepted open request goes: the export's endpoints for that port.
#[derive(Debug, PartialEq, Eq)]
pub struct Route<'a> {
    pub endpoints: &'a [SocketAddr],
}

/// Why [`decide`] refused: the wire reason, the message for the far side and the logs,
/// and for `denied` the policy label of `meshfed_gateway_authz_denials_total` (the DENY
/// policy, or `no_allow_match`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub message: String,
    pub policy: Option<String>,
}

fn refused(reason: Refusal, message: String) -> Refused {
    Refused {
        reason,
        message,
        policy: None,
    }
}

/// Decides an open request from an authenticated peer gateway `peer`. The caller is the
/// request's `source`, which `peer` vouches for: it must be in `peer`'s trust domain.
/// Then the AuthorizationPolicies that apply to the service decide (Istio's order:
/// DENY, then ALLOW). Pure: no I/O.
pub fn decide<'a>(
    exports: &'a BTreeMap<ServiceName, Export>,
    policies: &authz::PolicyIndex,
    open: &Open,
    peer: &SpiffeId,
) -> Result<Route<'a>, Refused> {
    let export = exports.get(&open.service).ok_or_else(|| {
        refused(
            Refusal::UnknownService,
            format!("{} is not exported by this site", open.service),
        )
    })?;
    if let Some(allowed) = &export.allowed_peers
        && !allowed.contains(peer)
    {
        return Err(refused(
            Refusal::NotExportedToPeer,
            format!("{} is not exported to {peer}", open.service),
        ));
    }
    let (ports, proto) = match open.flow {
        None => (&export.ports, "tcp"),
        Some(_) => (&export.udp_ports, "udp"),
    };
    let endpoints = ports.get(&open.port).ok_or_else(|| {
        refused(
            Refusal::UnknownService,
            format!(
                "{} does not export {proto} port {}",
                open.service, open.port
            ),
        )
    })?;
    if open.source.trust_domain_str() != peer.trust_domain_str() {
        return Err(refused(
            Refusal::ForeignCaller,
            format!(
                "caller {} is not in the trust domain of gateway {peer}, which cannot vouch for it",
                open.source
            ),
        ));
    }
    let request = authz::Request {
        service: &open.service,
        caller: Some(open.source.as_str()),
        port: open.port,
    };
    if let Decision::Deny {
        policy,
        allow_policies,
    } = policies.decide(&request)
    {
        let by = match &policy {
            Some(p) => format!("by policy {p}"),
            None => format!("no ALLOW policy matched ({})", allow_policies.join(", ")),
        };
        return Err(Refused {
            reason: Refusal::Denied,
            message: format!(
                "{} denied {}:{}: {by}",
                open.source, open.service, open.port
            ),
            policy: Some(policy.unwrap_or_else(|| "no_allow_match".into())),
        });
    }
    if endpoints.is_empty() {
        return Err(refused(
            Refusal::NoReadyEndpoint,
            format!(
                "{}:{}/{proto} has no ready endpoint",
                open.service, open.port
            ),
        ));
    }
    Ok(Route { endpoints })
}

/// What an accepted TCP stream holds while it lives: a place in its service's
/// connection pool (when it has one) and in its peer's TCP stream budget.
struct Held {
    _pool: Option<tokio::sync::OwnedSemaphorePermit>,
    _stream: crate::udp::FlowPermit,
}

impl Ingress {
    /// At most `n` TCP streams per peer identity ([`crate::admission::tcp_streams_per_peer`]);
    /// none by default.
    pub fn with_tcp_streams_per_peer(mut self, n: usize) -> Self {
        self.peer_links = PeerLinks::new(LINKS_PER_PEER, self.flows.limits(), n);
        self
    }

    pub fn new(
        exports: BTreeMap<ServiceName, Export>,
        connect_timeout: Duration,
        udp_idle_timeout: Duration,
        flows: FlowLimits,
        metrics: Metrics,
        bundles: Arc<arc_swap::ArcSwap<meshfed_identity::BundleSet>>,
        site: ThisSite,
    ) -> Self {
        Self {
            site,
            upstream: crate::http::ingress::Upstream::new(connect_timeout, metrics.clone()),
            bundles,
            exports: arc_swap::ArcSwap::from_pointee(exports),
            connect_timeout,
            udp_idle_timeout,
            flows: FlowBudget::new(flows),
            peer_links: PeerLinks::new(LINKS_PER_PEER, flows, usize::MAX),
            metrics,
            next: AtomicUsize::new(0),
            inbound: Default::default(),
            service_handles: Default::default(),
            inbound_h2: Default::default(),
            reverse: Default::default(),
            next_h2: AtomicUsize::new(0),
            policies: Default::default(),
            live_streams: Default::default(),
            next_stream: Default::default(),
        }
    }

    fn live_streams_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, LiveStream>> {
        self.live_streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a spliced TCP stream; its token is cancelled when the stream is no
    /// longer allowed.
    fn track(&self, open: &Open, peer: &SpiffeId) -> (Tracked<'_>, CancellationToken) {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let cut = CancellationToken::new();
        self.live_streams_lock().insert(
            id,
            LiveStream {
                open: open.clone(),
                peer: peer.clone(),
                cut: cut.clone(),
            },
        );
        (Tracked { ingress: self, id }, cut)
    }

    /// Decides every spliced TCP stream again (call after `policies` or `exports`
    /// changed) and resets those no longer allowed: a policy that now denies the caller,
    /// or a peer the export no longer admits, as ztunnel closes connections a new policy
    /// denies. A withdrawn export or endpoint leaves open streams alone. Returns how many
    /// were cut.
    pub fn recheck_streams(&self) -> usize {
        let (exports, policies) = (self.exports.load(), self.policies.load());
        let mut cut = 0;
        for s in self.live_streams_lock().values() {
            if s.cut.is_cancelled() {
                continue;
            }
            let Err(r) = decide(&exports, &policies, &s.open, &s.peer) else {
                continue;
            };
            if !matches!(
                r.reason,
                Refusal::Denied | Refusal::NotExportedToPeer | Refusal::ForeignCaller
            ) {
                continue;
            }
            if let Some(policy) = &r.policy {
                self.metrics.denied(policy);
            }
            self.metrics.stream_cut(r.reason.as_str());
            info!(service = %s.open.service, port = s.open.port, peer = %s.peer, source = %s.open.source, reason = r.reason.as_str(), message = %r.message, "open stream reset: no longer allowed");
            s.cut.cancel();
            cut += 1;
        }
        cut
    }

    /// Drops the HTTP upstream's state kept for clusters `exports` no longer serve
    /// ([`crate::http::ingress::Upstream::retain_exported`]); call with the exports
    /// just stored.
    pub fn retain_exported(&self, exports: &BTreeMap<ServiceName, Export>) {
        let gone = self.upstream.retain_exported(exports);
        if gone > 0 {
            debug!(gone, "state of withdrawn clusters dropped");
        }
    }

    /// The verified IDs of peers connected to us now.
    pub fn inbound_peers(&self) -> Vec<SpiffeId> {
        let mut ids: std::collections::BTreeSet<SpiffeId> =
            self.inbound_lock().keys().cloned().collect();
        ids.extend(self.inbound_h2_lock().keys().cloned());
        ids.into_iter().collect()
    }

    /// Whether `peer`'s trust domain is in the live bundles: a handshake verified
    /// against a set being replaced is closed either by the replacement's sweep
    /// (`close_untrusted`) or by this check, made after the connection is registered.
    fn still_trusted(&self, peer: &SpiffeId) -> bool {
        self.bundles
            .load()
            .get_str(peer.trust_domain_str())
            .is_some()
    }

    /// Counts an accepted connection of `peer`, or counts and logs its refusal
    /// (`peer_connection_limit`): an authenticated peer cannot pin unbounded state.
    fn peer_slot(&self, peer: &SpiffeId) -> Option<PeerSlot> {
        match self.peer_links.take(peer) {
            Ok(s) => Some(s),
            Err(held) => {
                self.metrics.handshake_failed("peer_connection_limit");
                warn!(
                    %peer,
                    held,
                    reason = "peer_connection_limit",
                    "connection refused: this peer holds as many connections as one peer may"
                );
                None
            }
        }
    }

    fn reverse_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, BTreeMap<usize, crate::hbone::Pool>>> {
        self.reverse.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inbound_h2_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, BTreeMap<usize, CancellationToken>>> {
        self.inbound_h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes every inbound connection from a gateway of `td` (its bundle was withdrawn:
    /// the handshake that admitted it would fail now). Returns how many.
    pub fn close_trust_domain(&self, td: &str) -> usize {
        self.close_where(|id| id.trust_domain_str() == td)
    }

    /// Closes every inbound connection whose peer's trust domain the live bundles no
    /// longer hold. Returns how many.
    pub fn close_untrusted(&self) -> usize {
        let bundles = self.bundles.load();
        self.close_where(|id| bundles.get_str(id.trust_domain_str()).is_none())
    }

    fn close_where(&self, peer: impl Fn(&SpiffeId) -> bool) -> usize {
        let conns: Vec<Connection> = self
            .inbound_lock()
            .iter()
            .filter(|(id, _)| peer(id))
            .flat_map(|(_, c)| c.values().cloned())
            .collect();
        conns.iter().for_each(crate::tunnel::close_withdrawn);
        let h2: Vec<CancellationToken> = self
            .inbound_h2_lock()
            .iter()
            .filter(|(id, _)| peer(id))
            .flat_map(|(_, c)| c.values().cloned())
            .collect();
        h2.iter().for_each(CancellationToken::cancel);
        let reverse: Vec<crate::hbone::Pool> = self
            .reverse_lock()
            .iter()
            .filter(|(id, _)| peer(id))
            .flat_map(|(_, c)| c.values().cloned())
            .collect();
        reverse.iter().for_each(crate::hbone::Pool::close);
        conns.len() + h2.len() + reverse.len()
    }

    /// `/debug/peers`' accepted side: per verified peer ID, its QUIC connections (with
    /// path figures), h2 connections and reverse h2 pools.
    pub fn debug(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        fn entry<'a>(
            out: &'a mut serde_json::Map<String, serde_json::Value>,
            id: &SpiffeId,
        ) -> &'a mut serde_json::Value {
            out.entry(id.to_string()).or_insert_with(
                || serde_json::json!({"quic": [], "h2_connections": 0, "reverse_h2_pools": 0}),
            )
        }
        for (id, conns) in self.inbound_lock().iter() {
            let quic: Vec<serde_json::Value> = conns
                .values()
                .filter_map(|c| crate::peers::quic_debug(&crate::peers::PeerConn::Quic(c.clone())))
                .collect();
            entry(&mut out, id)["quic"] = quic.into();
        }
        for (id, conns) in self.inbound_h2_lock().iter() {
            entry(&mut out, id)["h2_connections"] = conns.len().into();
        }
        for (id, pools) in self.reverse_lock().iter() {
            entry(&mut out, id)["reverse_h2_pools"] =
                pools.values().filter(|p| p.is_live()).count().into();
        }
        serde_json::Value::Object(out)
    }

    fn inbound_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, BTreeMap<usize, Connection>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.inbound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts connections until the drain starts; streams run on `drain`, which waits
    /// for them.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, drain: DrainWatcher) {
        let gate = Gate::new(Limits::default());
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => return,
                },
                _ = drain.signaled() => return,
            };
            let remote = incoming.remote_address();
            let slot = match gate.admit(remote.ip(), incoming.remote_address_validated()) {
                Ok(slot) => slot,
                Err(Admission::Retry) => {
                    // Stateless: costs one packet, no connection state.
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().refuse();
                    }
                    self.metrics.quic_retries.inc();
                    continue;
                }
                Err(other) => {
                    let reason = match other {
                        Admission::Refuse(r) => r,
                        _ => "handshake_limit",
                    };
                    incoming.refuse();
                    self.metrics.handshake_failed(reason);
                    debug!(%remote, reason, in_flight = gate.in_flight(), "handshake refused: too many in flight");
                    continue;
                }
            };
            let this = self.clone();
            let drain = drain.clone();
            // Connection tasks are not tracked: a drain waits for streams, not for
            // connections, which close when the endpoint does.
            tokio::spawn(
                async move {
                    let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
                    // Out of the gate either way: authenticated, failed, or timed out
                    // (dropping the attempt closes it).
                    drop(slot);
                    let Ok(done) = done else {
                        this.metrics.handshake_failed("handshake_timeout");
                        debug!("inbound handshake did not complete in time");
                        return;
                    };
                    match done {
                        Ok(conn) => this.serve_connection(conn, drain, false).await,
                        Err(e) => {
                            // Certificates we refused were counted by the verifier's hook;
                            // a client that sent none never reaches it.
                            if is_alert(&e, CERTIFICATE_REQUIRED) {
                                this.metrics.handshake_failed("no_certificate");
                                warn!(
                                    reason = "no_certificate",
                                    "mTLS handshake refused: the peer sent no certificate"
                                );
                            } else {
                                debug!(error = %e, "inbound handshake failed");
                            }
                        }
                    }
                }
                .instrument(info_span!("inbound", %remote)),
            );
        }
    }

    /// The live links `peer` dialed to us (QUIC connections, reverse h2 connections):
    /// the egress uses them for a peer it cannot dial (an outbound-only site).
    pub fn accepted(&self, peer: &SpiffeId) -> Vec<crate::peers::PeerConn> {
        use crate::peers::PeerConn;
        let mut out: Vec<PeerConn> = self
            .inbound_lock()
            .get(peer)
            .map(|c| {
                c.values()
                    .filter(|c| c.close_reason().is_none())
                    .cloned()
                    .map(PeerConn::Quic)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(pools) = self.reverse_lock().get(peer) {
            out.extend(
                pools
                    .values()
                    .filter(|p| p.is_live())
                    .cloned()
                    .map(PeerConn::H2),
            );
        }
        out
    }

    /// Serves the streams a peer opens on a connection we dialed to it (how an
    /// outbound-only site's exports are reached). The same checks as an accepted one.
    pub fn serve_dialed(self: &Arc<Self>, conn: Connection, drain: DrainWatcher) {
        tokio::spawn(self.clone().serve_connection(conn, drain, true));
    }

    async fn serve_connection(
        self: Arc<Self>,
        conn: Connection,
        drain: DrainWatcher,
        dialed: bool,
    ) {
        let Some(peer) = peer_spiffe_id(&conn) else {
            // Unreachable with our verifier; refuse rather than trust an unverified peer.
            conn.close(VarInt::from_u32(app_code::REFUSED), b"no peer identity");
            return;
        };
        // Connections we dialed are bounded by our own pool; accepted ones per peer.
        let _slot = if dialed {
            None
        } else {
            match self.peer_slot(&peer) {
                Some(s) => Some(s),
                None => {
                    conn.close(
                        VarInt::from_u32(app_code::REFUSED),
                        b"too many connections from this peer",
                    );
                    return;
                }
            }
        };
        // Authenticated: now it may open as many streams as a peer gateway needs.
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(crate::tunnel::MAX_STREAMS));
        if !dialed {
            info!(%peer, "peer gateway connected");
            tokio::spawn(crate::metrics::watch_path(
                self.metrics.quic.clone(),
                conn.clone(),
                crate::metrics::QuicLabels {
                    peer: peer.to_string(),
                    side: "accepted",
                },
            ));
            self.inbound_lock()
                .entry(peer.clone())
                .or_default()
                .insert(conn.stable_id(), conn.clone());
        }
        // A handshake verified against a bundle set that was being replaced: once
        // registered, either the replacement's sweep (`close_untrusted`) closes it, or
        // this check, which reads the set after it, does.
        if !self.still_trusted(&peer) {
            crate::tunnel::close_withdrawn(&conn);
        }
        let udp = IngressFlows::new(
            conn.clone(),
            &self.metrics,
            self.flows.clone(),
            self.peer_links.flows(&peer),
        );
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    if dialed {
                        return;
                    }
                    info!(%peer, reason = %e, "peer gateway connection closed");
                    forget(&mut self.inbound_lock(), &peer, conn.stable_id());
                    return;
                }
            };
            let this = self.clone();
            let peer = peer.clone();
            if drain.is_draining() {
                tokio::spawn(async move {
                    this.refuse(
                        send,
                        recv,
                        Refusal::Draining,
                        "gateway is draining".into(),
                        false,
                    )
                    .await;
                });
                continue;
            }
            let (udp, stop, remote) = (udp.clone(), drain.token(), conn.remote_address());
            drain.spawn(
                async move {
                    this.serve_stream(send, recv, (peer, remote), udp, stop)
                        .await
                }
                .instrument(info_span!("stream", id = %conn.stable_id())),
            );
        }
    }

    /// One stream of `peer` (its verified ID, and the address its connection comes
    /// from).
    async fn serve_stream(
        self: &Arc<Self>,
        send: SendStream,
        mut recv: RecvStream,
        (peer, remote): (SpiffeId, SocketAddr),
        udp: Arc<IngressFlows>,
        stop: CancellationToken,
    ) {
        let header = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut recv)).await {
            Err(_) => {
                return self
                    .refuse(
                        send,
                        recv,
                        Refusal::MalformedHeader,
                        "no open request in time".into(),
                        true,
                    )
                    .await;
            }
            Ok(Err(HeaderReadError::Wire(e))) => {
                return self
                    .refuse(send, recv, Refusal::from(&e), e.to_string(), true)
                    .await;
            }
            Ok(Err(HeaderReadError::Io(e))) => {
                debug!(error = %e, "stream closed before its header");
                return;
            }
            Ok(Ok(h)) => h,
        };
        let open = match wire::decode_open(&header) {
            Ok(o) => o,
            Err(e) => {
                return self
                    .refuse(send, recv, Refusal::from(&e), e.to_string(), true)
                    .await;
            }
        };
        let admitted = match self.admit(&open, &peer) {
            Ok(a) => a,
            Err(r) => {
                self.service_refused(&open, &peer, r.reason);
                return self.refuse(send, recv, r.reason, r.message, false).await;
            }
        };
        if let Some(flow) = open.flow {
            return self
                .serve_udp(&open, flow, &admitted.endpoints, send, recv, udp, stop)
                .await;
        }
        if let Some(app) = admitted.http {
            let mut send = send;
            if send.write_all(&Response::Accept.encode()).await.is_err() {
                return;
            }
            debug!(service = %open.service, port = open.port, %peer, source = %open.source, %app, "accepted: HTTP");
            let _active = self.metrics.stream_started(DIR);
            let io = crate::http::io::TunnelIo::Quic(send, recv);
            let admission =
                StreamAdmission::start(self.clone(), open.clone(), peer.clone(), admitted);
            return crate::http::ingress::serve(
                self.upstream.clone(),
                io,
                open,
                app,
                admission,
                stop,
            )
            .await;
        }
        let (conn, ep, _held) = match self.connect_endpoint(&open, &peer, admitted, remote).await {
            Ok(c) => c,
            Err(r) => {
                self.service_refused(&open, &peer, r.reason);
                return self.refuse(send, recv, r.reason, r.message, false).await;
            }
        };
        let mut send = send;
        if send.write_all(&Response::Accept.encode()).await.is_err() {
            return;
        }
        debug!(service = %open.service, port = open.port, %peer, source = %open.source, endpoint = %ep, tls = matches!(conn, Conn::Tls(_)), "accepted");
        let (_active, counters) = self
            .metrics
            .tcp_stream(DIR, &self.service_handles(&open, &peer));
        let (_tracked, cut) = self.track(&open, &peer);
        let end = match conn {
            Conn::Tls(tls) => splice_tls(*tls, send, recv, &counters, Some(&cut)).await,
            Conn::Plain(tcp) => splice(tcp, send, recv, &counters, Some(&cut)).await,
        };
        debug!(?end, "stream done");
    }

    /// The per-service series of `open`'s service from `peer`, looked up once per
    /// (service, port, peer): at most [`crate::metrics::MAX_SERVICE_SERIES`] kept, past
    /// which each stream looks them up again (bounded like the series themselves).
    fn service_handles(&self, open: &Open, peer: &SpiffeId) -> crate::metrics::ServiceHandles {
        let key = (open.service.clone(), open.port, peer.clone());
        let mut m = self
            .service_handles
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(h) = m.get(&key) {
            return h.clone();
        }
        let h = self.metrics.service.handles(self.metrics.ingress_labels(
            Some(&open.service),
            open.port,
            peer,
        ));
        if m.len() < crate::metrics::MAX_SERVICE_SERIES {
            m.insert(key, h.clone());
        }
        h
    }

    /// Counts a refused open by service: its name only when this gateway exports it (a
    /// peer's made-up names never become labels).
    fn service_refused(&self, open: &Open, peer: &SpiffeId, reason: Refusal) {
        let exports = self.exports.load();
        let known = exports.contains_key(&open.service).then_some(&open.service);
        let labels = self.metrics.ingress_labels(known, open.port, peer);
        self.metrics.service.refused(labels, reason.as_str());
    }
}

/// A stream's open decision, made again when the exports or the policies changed (the
/// ingress swaps them whole, so a changed pointer is a change; the versions compared
/// are held, so their addresses cannot be reused meanwhile).
struct StreamAdmission {
    ingress: Arc<Ingress>,
    open: Open,
    peer: SpiffeId,
    /// Read without a lock by every request; replaced after a change.
    last: arc_swap::ArcSwap<Decided>,
}

/// A decision and the versions it was made on.
struct Decided {
    exports: Arc<BTreeMap<ServiceName, Export>>,
    policies: Arc<authz::PolicyIndex>,
    result: Result<Arc<crate::http::ingress::Serving>, (Refusal, String)>,
}

impl StreamAdmission {
    /// The decision of a stream just admitted, as an [`Admission`](crate::http::ingress::Admission).
    fn start(
        ingress: Arc<Ingress>,
        open: Open,
        peer: SpiffeId,
        admitted: Admitted,
    ) -> Arc<dyn crate::http::ingress::Admission> {
        let last = arc_swap::ArcSwap::from_pointee(Decided {
            exports: ingress.exports.load_full(),
            policies: ingress.policies.load_full(),
            result: Ok(Arc::new(admitted.serving())),
        });
        Arc::new(Self {
            ingress,
            open,
            peer,
            last,
        })
    }
}

impl crate::http::ingress::Admission for StreamAdmission {
    fn current(&self) -> Result<Arc<crate::http::ingress::Serving>, (Refusal, String)> {
        let (exports, policies) = (self.ingress.exports.load(), self.ingress.policies.load());
        {
            let last = self.last.load();
            if Arc::ptr_eq(&last.exports, &exports) && Arc::ptr_eq(&last.policies, &policies) {
                return last.result.clone();
            }
        }
        // Requests that race here decide the same, and store the same.
        let now = match self.ingress.admit(&self.open, &self.peer) {
            Ok(a) => Ok(Arc::new(a.serving())),
            Err(r) => {
                self.ingress
                    .service_refused(&self.open, &self.peer, r.reason);
                Err((r.reason, r.message))
            }
        };
        self.last.store(Arc::new(Decided {
            exports: Arc::clone(&exports),
            policies: Arc::clone(&policies),
            result: now.clone(),
        }));
        now
    }

    fn websocket_slot(&self) -> Result<Box<dyn Send>, (Refusal, String)> {
        match self.ingress.peer_links.streams(&self.peer).take() {
            Some(s) => Ok(Box::new(s)),
            None => Err((
                Refusal::FlowLimit,
                format!(
                    "{}:{}: this peer already holds {} TCP streams and WebSockets at this gateway (its share: a quarter of the open-file limit)",
                    self.open.service,
                    self.open.port,
                    self.ingress.peer_links.streams_per_peer()
                ),
            )),
        }
    }
}

impl Admitted {
    fn serving(self) -> crate::http::ingress::Serving {
        crate::http::ingress::Serving {
            endpoints: self.endpoints,
            labels: self.labels,
            policy: self.policy,
            subsets: self.subsets,
            tls: self.tls.map(Arc::new),
        }
    }
}

impl Ingress {
    /// Decides an open from `peer` (counting a policy denial).
    fn admit(&self, open: &Open, peer: &SpiffeId) -> Result<Admitted, Refused> {
        let exports = self.exports.load();
        match decide(&exports, &self.policies.load(), open, peer) {
            Ok(r) => {
                let e = exports.get(&open.service);
                let tls = e.and_then(|e| e.tls.clone());
                let proxy = e.is_some_and(|e| e.proxy_protocol);
                let http = e
                    .filter(|_| open.flow.is_none())
                    .map(|e| e.served_protocol(open.port))
                    .filter(|a| a.is_http());
                // The port's own settings (portLevelSettings) over the policy's, and
                // each subset's own on an HTTP port.
                let http_policy = e.and_then(|e| e.http_policy.as_ref());
                let named = open.subset.is_some() && http.is_none();
                let (mut policy, mut subsets) = match http_policy {
                    None => Default::default(),
                    Some(p) => crate::http::ingress::endpoint_policies(
                        p,
                        open.port,
                        http.is_some() || named,
                        &self.site.name,
                    ),
                };
                // A TCP stream of a subset with a policy of its own: that policy, and
                // a connection pool of the subset's own. A name this site does not
                // know, or one sent with another subset's selector, gets the service's.
                let mut pool_key = String::new();
                if named {
                    let name = open.subset.as_deref().unwrap_or_default();
                    let own = subsets
                        .iter()
                        .position(|s| s.is(name.as_bytes(), open.selector.as_ref()));
                    if let Some(i) = own {
                        let s = subsets.swap_remove(i);
                        (pool_key, policy) = (s.name, s.policy);
                    }
                    subsets.clear();
                }
                let labels = match e {
                    Some(e) if http.is_some() || open.selector.is_some() => {
                        labels_of(r.endpoints, &e.endpoint_labels, &self.site.labels)
                    }
                    _ => vec![],
                };
                let endpoints = match (&open.selector, open.flow, http) {
                    // A TCP stream of a subset (an HTTP port's requests name theirs).
                    (Some(sel), None, None) => select(open, sel, r.endpoints.to_vec(), &labels)?,
                    _ => r.endpoints.to_vec(),
                };
                Ok(Admitted {
                    pool_key,
                    endpoints,
                    tls,
                    proxy,
                    http,
                    policy,
                    subsets,
                    labels,
                })
            }
            Err(r) => {
                if let Some(policy) = &r.policy {
                    self.metrics.denied(policy);
                }
                Err(r)
            }
        }
    }

    /// Connects an admitted TCP open to one of its endpoints: within the service's
    /// `connectionPool` (`overflow` when its connections are all open; the slot is held
    /// while the connection lives), the PROXY header, then the TLS we originate, all
    /// before the open is accepted, so that a failure is a refusal the far egress can
    /// fail over on. `remote`: the address the peer's connection comes from.
    async fn connect_endpoint(
        &self,
        open: &Open,
        peer: &SpiffeId,
        admitted: Admitted,
        remote: SocketAddr,
    ) -> Result<(Conn, SocketAddr, Held), Refused> {
        let Admitted {
            endpoints,
            tls,
            proxy,
            http: _,
            policy,
            subsets: _,
            labels: _,
            pool_key,
        } = admitted;
        // The peer's share of the descriptors first: a refused stream costs none.
        let Some(stream) = self.peer_links.streams(peer).take() else {
            let msg = format!(
                "{}:{}: this peer already holds {} TCP streams at this gateway (its share: a quarter of the open-file limit)",
                open.service,
                open.port,
                self.peer_links.streams_per_peer()
            );
            return Err(refused(Refusal::FlowLimit, msg));
        };
        let slot = match policy.pool {
            None => None,
            Some(limits) => match self.upstream.tcp_slot(open, &pool_key, limits) {
                Some(s) => Some(s),
                None => {
                    let whose = if pool_key.is_empty() {
                        String::new()
                    } else {
                        format!(" subset {pool_key}")
                    };
                    let msg = format!(
                        "{}:{}{whose}: {} connections to its endpoints are open (its connectionPool's tcp.maxConnections)",
                        open.service, open.port, limits.max_connections
                    );
                    return Err(refused(Refusal::Overflow, msg));
                }
            },
        };
        // The service's (or its subset's) connectTimeout, else the gateway's.
        let within = policy.conn.connect.unwrap_or(self.connect_timeout);
        let Some((mut tcp, ep)) = self.connect(&endpoints, within).await else {
            let msg = format!(
                "{}:{}: none of {} endpoint(s) accepted a connection within {within:?}",
                open.service,
                open.port,
                endpoints.len(),
            );
            return Err(refused(Refusal::EndpointConnectFailed, msg));
        };
        if let Some(k) = &policy.conn.keepalive
            && let Err(e) = crate::http::ingress::set_keepalive(&tcp, k)
        {
            debug!(error = %e, endpoint = %ep, "keepalive on the endpoint connection");
        }
        // PROXY protocol first (before any TLS we originate): the client as the far egress
        // saw it (or, from a meshfed/1 peer, the peer gateway), and the caller.
        if proxy {
            let src = open.client.unwrap_or(remote);
            let h = crate::proxy_protocol::header(src, ep, open.source.as_str());
            if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut tcp, &h).await {
                let msg = format!("{}:{}: PROXY header to {ep}: {e}", open.service, open.port);
                return Err(refused(Refusal::EndpointConnectFailed, msg));
            }
        }
        let conn = match tls {
            None => Conn::Plain(tcp),
            Some(t) => match self.originate(&t, tcp).await {
                Ok(s) => Conn::Tls(Box::new(s)),
                Err(e) => {
                    let msg = format!("{}:{}: TLS to {ep}: {e}", open.service, open.port);
                    return Err(refused(Refusal::EndpointConnectFailed, msg));
                }
            },
        };
        Ok((
            conn,
            ep,
            Held {
                _pool: slot,
                _stream: stream,
            },
        ))
    }

    /// Accepts h2 (HBONE) connections on `listener` until the drain starts: mTLS with
    /// the same SVID and verifier as QUIC, then HTTP/2. Unauthenticated handshakes pass
    /// the same admission gate as QUIC's; streams run on `drain`, which waits for them.
    pub async fn serve_h2(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        drain: DrainWatcher,
    ) {
        let gate = Gate::new(Limits::default());
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "h2 accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = drain.signaled() => return,
            };
            // A TCP handshake proves the address: no Retry step as in QUIC.
            let slot = match gate.admit(remote.ip(), true) {
                Ok(s) => s,
                Err(other) => {
                    let reason = match other {
                        Admission::Refuse(r) => r,
                        _ => "handshake_limit",
                    };
                    self.metrics.handshake_failed(reason);
                    debug!(%remote, reason, "h2 handshake refused: too many in flight");
                    crate::splice::reset_tcp(tcp);
                    continue;
                }
            };
            let (this, acceptor, drain) = (self.clone(), acceptor.clone(), drain.clone());
            tokio::spawn(
                async move {
                    let _ = tcp.set_nodelay(true);
                    let hs = async {
                        let tls = acceptor.accept(tcp).await.map_err(|e| {
                            // As on QUIC: a client that sent no certificate never reaches
                            // the verifier (whose hook counts the ones it refused).
                            let none = e
                                .get_ref()
                                .and_then(|i| i.downcast_ref::<rustls::Error>())
                                .is_some_and(|r| {
                                    matches!(r, rustls::Error::NoCertificatesPresented)
                                });
                            if none {
                                this.metrics.handshake_failed("no_certificate");
                                warn!(
                                    reason = "no_certificate",
                                    "mTLS handshake refused (h2): the peer sent no certificate"
                                );
                            }
                            e.to_string()
                        })?;
                        let (_, session) = tls.get_ref();
                        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
                        let peer = session
                            .peer_certificates()
                            .and_then(|c| meshfed_identity::verify::peer_id(c).ok())
                            .ok_or_else(|| "no client certificate".to_owned())?;
                        match alpn.as_deref() {
                            Some(crate::hbone::ALPN_H2) => {
                                let conn = crate::hbone::server_builder(crate::tunnel::MAX_STREAMS)
                                    .handshake::<_, bytes::Bytes>(tls)
                                    .await
                                    .map_err(|e| e.to_string())?;
                                Ok((peer, H2Accepted::Serve(Box::new(conn))))
                            }
                            // An outbound-only peer dialed this for us to open streams on:
                            // we are the HTTP/2 client.
                            Some(crate::hbone::ALPN_REVERSE) => {
                                let (send, conn) = crate::hbone::client_builder()
                                    .handshake::<_, bytes::Bytes>(tls)
                                    .await
                                    .map_err(|e| e.to_string())?;
                                let pool = crate::hbone::Pool::from_connection(
                                    send,
                                    conn,
                                    peer.clone(),
                                    remote,
                                );
                                Ok((peer, H2Accepted::Reverse(pool)))
                            }
                            _ => {
                                Err("the peer offered neither h2 nor meshfed-reverse-h2".to_owned())
                            }
                        }
                    };
                    let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs).await;
                    drop(slot);
                    match done {
                        Err(_) => {
                            this.metrics.handshake_failed("handshake_timeout");
                            debug!("inbound h2 handshake did not complete in time");
                        }
                        Ok(Err(e)) => debug!(error = %e, "inbound h2 handshake failed"),
                        Ok(Ok((peer, H2Accepted::Serve(mut conn)))) => {
                            let Some(_slot) = this.peer_slot(&peer) else {
                                conn.abrupt_shutdown(h2::Reason::REFUSED_STREAM);
                                let closed = futures::future::poll_fn(|cx| conn.poll_closed(cx));
                                let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
                                return;
                            };
                            let graceful = drain.token();
                            this.serve_h2_connection(*conn, peer, remote, drain, graceful)
                                .await
                        }
                        Ok(Ok((peer, H2Accepted::Reverse(pool)))) => {
                            let Some(_slot) = this.peer_slot(&peer) else {
                                return pool.close();
                            };
                            this.hold_reverse(pool, peer).await
                        }
                    }
                }
                .instrument(info_span!("inbound_h2", %remote)),
            );
        }
    }

    /// Keeps a reverse connection an outbound-only peer dialed to us in `accepted` until
    /// it ends.
    async fn hold_reverse(self: Arc<Self>, pool: crate::hbone::Pool, peer: SpiffeId) {
        info!(%peer, "reverse h2 connection from an outbound-only peer");
        let id = pool.stable_id();
        self.reverse_lock()
            .entry(peer.clone())
            .or_default()
            .insert(id, pool.clone());
        if !self.still_trusted(&peer) {
            pool.close();
        }
        pool.closed().await;
        info!(%peer, "reverse h2 connection closed");
        forget(&mut self.reverse_lock(), &peer, id);
    }

    /// Serves a reverse h2 connection we dialed to `peer` (we are an outbound-only
    /// site): we are its HTTP/2 server, and its streams get the same decision as any.
    pub async fn serve_reverse(
        self: Arc<Self>,
        tls: tokio_rustls::client::TlsStream<TcpStream>,
        peer: SpiffeId,
        remote: SocketAddr,
        graceful: CancellationToken,
        drain: DrainWatcher,
    ) {
        let conn = match crate::hbone::server_builder(crate::tunnel::MAX_STREAMS)
            .handshake::<_, bytes::Bytes>(tls)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "reverse h2 handshake failed");
                return;
            }
        };
        self.serve_h2_connection(conn, peer, remote, drain, graceful)
            .await
    }

    /// Serves an h2 connection's streams until it ends; `graceful` (the drain, or the
    /// end of a reverse link) sends GOAWAY and lets the streams in flight finish.
    async fn serve_h2_connection<T>(
        self: Arc<Self>,
        mut conn: h2::server::Connection<T, bytes::Bytes>,
        peer: SpiffeId,
        remote: SocketAddr,
        drain: DrainWatcher,
        graceful: CancellationToken,
    ) where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        info!(%peer, "peer gateway connected (h2)");
        let id = self.next_h2.fetch_add(1, Ordering::Relaxed);
        let kill = CancellationToken::new();
        self.inbound_h2_lock()
            .entry(peer.clone())
            .or_default()
            .insert(id, kill.clone());
        // As for QUIC: a handshake verified against a bundle set being replaced.
        if !self.still_trusted(&peer) {
            kill.cancel();
        }
        let mut shutting = false;
        loop {
            tokio::select! {
                r = conn.accept() => match r {
                    Some(Ok((req, respond))) => {
                        let (this, peer) = (self.clone(), peer.clone());
                        let (draining, stop) = (drain.is_draining(), drain.token());
                        drain.spawn(async move {
                            this.serve_h2_stream(req, respond, peer, remote, draining, stop).await
                        });
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "h2 connection error");
                        break;
                    }
                    None => break,
                },
                _ = graceful.cancelled(), if !shutting => {
                    // GOAWAY: streams in flight finish, new ones go elsewhere.
                    conn.graceful_shutdown();
                    shutting = true;
                }
                _ = kill.cancelled() => {
                    warn!(%peer, "closing h2 connection: trust domain withdrawn");
                    conn.abrupt_shutdown(h2::Reason::REFUSED_STREAM);
                    let _ = tokio::time::timeout(Duration::from_secs(1), futures::future::poll_fn(|cx| conn.poll_closed(cx))).await;
                    break;
                }
            }
        }
        info!(%peer, "peer gateway h2 connection closed");
        forget(&mut self.inbound_h2_lock(), &peer, id);
    }

    /// One h2 CONNECT stream of `peer`: the same decision as a QUIC stream's.
    async fn serve_h2_stream(
        self: &Arc<Self>,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<bytes::Bytes>,
        peer: SpiffeId,
        remote: SocketAddr,
        draining: bool,
        stop: CancellationToken,
    ) {
        let (parts, body) = req.into_parts();
        let open = match crate::hbone::headers::open(&parts) {
            Ok(o) => o,
            Err(e) => return self.refuse_h2(respond, Refusal::from(&e), e.to_string()),
        };
        let span =
            info_span!("stream", transport = "h2", service = %open.service, port = open.port);
        async {
            if draining {
                return self.refuse_h2(respond, Refusal::Draining, "gateway is draining".into());
            }
            let admitted = match self.admit(&open, &peer) {
                Ok(a) => a,
                Err(r) => {
                    self.service_refused(&open, &peer, r.reason);
                    return self.refuse_h2(respond, r.reason, r.message);
                }
            };
            if open.flow.is_some() {
                return self
                    .serve_h2_udp(&open, &peer, &admitted.endpoints, respond, body, stop)
                    .await;
            }
            if let Some(app) = admitted.http {
                let Ok(send) = respond
                    .send_response(crate::hbone::headers::response(&Response::Accept), false)
                else {
                    return;
                };
                debug!(%peer, source = %open.source, %app, "accepted (h2): HTTP");
                let _active = self.metrics.stream_started(DIR);
                let io = crate::http::io::TunnelIo::h2(send, body);
                return crate::http::ingress::serve(
                    self.upstream.clone(),
                    io,
                    open.clone(),
                    app,
                    StreamAdmission::start(self.clone(), open.clone(), peer.clone(), admitted),
                    stop,
                )
                .await;
            }
            let (conn, ep, _held) =
                match self.connect_endpoint(&open, &peer, admitted, remote).await {
                    Ok(c) => c,
                    Err(r) => {
                        self.service_refused(&open, &peer, r.reason);
                        return self.refuse_h2(respond, r.reason, r.message);
                    }
                };
            let send = match respond.send_response(crate::hbone::headers::accept(&open), false) {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "h2 stream gone before the accept");
                    return;
                }
            };
            debug!(%peer, source = %open.source, endpoint = %ep, "accepted (h2)");
            let (_active, counters) = self
                .metrics
                .tcp_stream(DIR, &self.service_handles(&open, &peer));
            let (send, recv) = (crate::hbone::H2Send(send), crate::hbone::H2Recv::new(body));
            let (_tracked, cut) = self.track(&open, &peer);
            let end = match conn {
                Conn::Tls(tls) => splice_tls(*tls, send, recv, &counters, Some(&cut)).await,
                Conn::Plain(tcp) => splice(tcp, send, recv, &counters, Some(&cut)).await,
            };
            debug!(?end, "stream done");
        }
        .instrument(span)
        .await
    }

    /// A UDP flow on h2: a connected socket toward one endpoint (round-robin), capsules
    /// both ways, until either side ends it, it idles, or the drain stops it.
    async fn serve_h2_udp(
        &self,
        open: &Open,
        peer: &SpiffeId,
        endpoints: &[SocketAddr],
        mut respond: h2::server::SendResponse<bytes::Bytes>,
        body: h2::RecvStream,
        stop: CancellationToken,
    ) {
        use crate::hbone::capsule;
        use crate::splice::{QUIC_BATCH, TunnelRecv, TunnelSend};
        // Per peer first, as on QUIC: a refused flow costs no descriptor.
        let peer_budget = self.peer_links.flows(peer);
        let Some(_per_peer) = peer_budget.take() else {
            let msg = format!(
                "{}:{}/udp: this peer already has {} UDP flows open (the limit per peer)",
                open.service,
                open.port,
                self.flows.limits().per_peer
            );
            return self.refuse_h2(respond, Refusal::FlowLimit, msg);
        };
        let Some(_permit) = self.flows.take() else {
            let msg = format!(
                "{}:{}/udp: the gateway's UDP flows are at their limit",
                open.service, open.port
            );
            return self.refuse_h2(respond, Refusal::FlowLimit, msg);
        };
        let ep = endpoints[self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        let any: SocketAddr = if ep.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = match crate::udp::bind_udp(any) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{}:{}/udp: socket: {e}", open.service, open.port);
                return self.refuse_h2(respond, Refusal::EndpointConnectFailed, msg);
            }
        };
        if let Err(e) = sock.connect(ep).await {
            let msg = format!("{}:{}/udp: {ep}: {e}", open.service, open.port);
            return self.refuse_h2(respond, Refusal::EndpointConnectFailed, msg);
        }
        let send = match respond
            .send_response(crate::hbone::headers::response(&Response::Accept), false)
        {
            Ok(s) => s,
            Err(_) => return,
        };
        debug!(source = %open.source, endpoint = %ep, "UDP flow accepted (h2)");
        let _active = self.metrics.udp_flow_started(DIR);
        let counters = self.metrics.udp(DIR);
        let (mut send, mut recv) = (crate::hbone::H2Send(send), crate::hbone::H2Recv::new(body));
        let mut dec = capsule::Decoder::default();
        let mut chunks: [bytes::Bytes; QUIC_BATCH] = Default::default();
        let mut buf = vec![0u8; 65_536];
        let idle = tokio::time::sleep(self.udp_idle_timeout);
        tokio::pin!(idle);
        let why = 'flow: loop {
            tokio::select! {
                _ = stop.cancelled() => { send.reset(); break "drain"; }
                _ = &mut idle => { send.reset(); break "idle"; }
                r = sock.recv(&mut buf) => match r {
                    Ok(n) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + self.udp_idle_timeout);
                        if send.send(capsule::encode(&buf[..n])).await.is_err() {
                            break "stream lost";
                        }
                        counters.sent(n);
                    }
                    Err(e) => {
                        debug!(endpoint = %ep, error = %e, "UDP endpoint error");
                        counters.dropped("endpoint_unreachable", 1);
                        send.reset();
                        break "endpoint unreachable";
                    }
                },
                r = recv.recv(&mut chunks) => match r {
                    Ok(0) => break "closed by the far side",
                    Err(e) => break e,
                    Ok(n) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + self.udp_idle_timeout);
                        for c in &chunks[..n] {
                            dec.push(c);
                        }
                        loop {
                            match dec.next_datagram() {
                                Ok(Some(p)) => match sock.try_send(&p) {
                                    Ok(_) => counters.received(p.len()),
                                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                        counters.dropped("socket_full", 1);
                                    }
                                    Err(_) => counters.dropped("endpoint_unreachable", 1),
                                },
                                Ok(None) => break,
                                Err(_) => {
                                    counters.dropped("malformed", 1);
                                    send.reset();
                                    break 'flow "malformed capsule";
                                }
                            }
                        }
                    }
                },
            }
        };
        debug!(why, "UDP flow on h2 ended");
    }

    fn refuse_h2(
        &self,
        mut respond: h2::server::SendResponse<bytes::Bytes>,
        reason: Refusal,
        message: String,
    ) {
        warn!(reason = reason.as_str(), %message, transport = "h2", "refusing stream");
        self.metrics.refused(DIR, reason.as_str());
        let _ = respond.send_response(
            crate::hbone::headers::response(&Response::Refuse { reason, message }),
            true,
        );
    }

    /// An accepted UDP flow: a socket toward one endpoint (round-robin), then datagrams
    /// until the flow ends.
    #[allow(clippy::too_many_arguments)]
    async fn serve_udp(
        &self,
        open: &Open,
        flow: u32,
        endpoints: &[SocketAddr],
        mut send: SendStream,
        recv: RecvStream,
        udp: Arc<IngressFlows>,
        stop: CancellationToken,
    ) {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let ep = endpoints[start % endpoints.len()];
        let handle = match udp.open(flow, ep).await {
            Ok(h) => h,
            Err((reason, e)) => {
                let msg = format!("{}:{}/udp: {e}", open.service, open.port);
                return self.refuse(send, recv, reason, msg, false).await;
            }
        };
        if send.write_all(&Response::Accept.encode()).await.is_err() {
            handle.abandon(&udp);
            return;
        }
        debug!(service = %open.service, port = open.port, source = %open.source, flow, endpoint = %ep, "UDP flow accepted");
        let _active = self.metrics.udp_flow_started(DIR);
        udp.run(handle, send, recv, self.udp_idle_timeout, stop)
            .await;
    }

    /// Speaks TLS to the endpoint over `tcp`, as `t` says.
    async fn originate(
        &self,
        t: &TlsOrigination,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let client = self.upstream.tls_clients.get(t, false)?;
        crate::origination::handshake(client, tcp, self.connect_timeout).await
    }

    /// Tries each endpoint once, round-robin from a rotating start, each within `within`.
    async fn connect(
        &self,
        endpoints: &[SocketAddr],
        within: Duration,
    ) -> Option<(TcpStream, SocketAddr)> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..endpoints.len() {
            let ep = endpoints[(start + i) % endpoints.len()];
            match tokio::time::timeout(within, TcpStream::connect(ep)).await {
                Ok(Ok(s)) => return Some((s, ep)),
                Ok(Err(e)) => debug!(endpoint = %ep, error = %e, "endpoint connect failed"),
                Err(_) => debug!(endpoint = %ep, "endpoint connect timed out"),
            }
        }
        None
    }

    async fn refuse(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
        reason: Refusal,
        message: String,
        bad_header: bool,
    ) {
        warn!(reason = reason.as_str(), %message, "refusing stream");
        self.metrics.refused(DIR, reason.as_str());
        let _ = send
            .write_all(&Response::Refuse { reason, message }.encode())
            .await;
        let _ = send.finish();
        let code = if bad_header {
            app_code::BAD_HEADER
        } else {
            app_code::REFUSED
        };
        // Nothing the peer sends on a refused stream is read: tell it to stop.
        let _ = recv.stop(VarInt::from_u32(code));
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_catalog::authz::{AuthorizationPolicy, PolicyIndex};
    use std::collections::BTreeSet;

    fn exports() -> BTreeMap<ServiceName, Export> {
        let mut m = BTreeMap::new();
        let svc = ServiceName::parse("echo.demo").unwrap();
        m.insert(
            svc.clone(),
            Export {
                endpoint_labels: Default::default(),
                http_policy: None,
                app_protocols: Default::default(),
                service: svc,
                ports: [
                    (7000, vec!["127.0.0.1:9000".parse().unwrap()]),
                    (7001, vec![]),
                ]
                .into(),
                udp_ports: [(53, vec!["127.0.0.1:5353".parse().unwrap()])].into(),
                allowed_peers: None,
                hosts: vec![],
                tls: None,
                port_names: Default::default(),
                identities: vec![],
                proxy_protocol: false,
            },
        );
        let svc = ServiceName::parse("db.prod").unwrap();
        m.insert(
            svc.clone(),
            Export {
                endpoint_labels: Default::default(),
                http_policy: None,
                app_protocols: Default::default(),
                service: svc,
                ports: [(5432, vec!["127.0.0.1:5432".parse().unwrap()])].into(),
                udp_ports: Default::default(),
                hosts: vec![],
                tls: None,
                port_names: Default::default(),
                identities: vec![],
                proxy_protocol: false,
                allowed_peers: Some(BTreeSet::from([SpiffeId::new(
                    "spiffe://east/meshfed/site/east/gateway",
                )
                .unwrap()])),
            },
        );
        m
    }

    /// A TCP open naming a subset connects among the endpoints whose labels hold it:
    /// their own, under the site's (`federation.labels`), which every endpoint holds.
    #[test]
    fn a_subset_selects_endpoints_by_their_labels_and_the_sites() {
        let set = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let eps: Vec<SocketAddr> = ["10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let own: BTreeMap<SocketAddr, BTreeMap<String, String>> = [
            (eps[0], set(&[("version", "v1")])),
            (eps[1], set(&[("version", "v2"), ("track", "canary")])),
            // eps[2] has none of its own.
        ]
        .into();
        let site = set(&[("topology.istio.io/network", "n1")]);
        let labels = labels_of(&eps, &own, &site);
        assert_eq!(labels.len(), 3);
        assert_eq!(labels[2], site);
        let o = open("db.prod", 5432);
        for (selector, want) in [
            (&[("version", "v2")][..], vec![eps[1]]),
            (&[("version", "v1")][..], vec![eps[0]]),
            (&[("topology.istio.io/network", "n1")][..], eps.clone()),
            (
                &[("topology.istio.io/network", "n1"), ("track", "canary")][..],
                vec![eps[1]],
            ),
        ] {
            assert_eq!(
                select(&o, &set(selector), eps.clone(), &labels).unwrap(),
                want,
                "{selector:?}"
            );
        }
        for selector in [
            &[("version", "v3")][..],
            &[("topology.istio.io/network", "n2")][..],
            &[("version", "v1"), ("track", "canary")][..],
        ] {
            let r = select(&o, &set(selector), eps.clone(), &labels).unwrap_err();
            assert_eq!(r.reason, Refusal::NoReadyEndpoint, "{selector:?}");
            assert!(
                r.message.contains("none of db.prod:5432's 3 endpoint(s)"),
                "{}",
                r.message
            );
        }
        // Without labels anywhere, none are listed, and a subset selects nothing.
        assert!(labels_of(&eps, &BTreeMap::new(), &BTreeMap::new()).is_empty());
        assert!(select(&o, &set(&[("version", "v1")]), eps.clone(), &[]).is_err());
    }

    fn open(svc: &str, port: u16) -> Open {
        Open {
            service: ServiceName::parse(svc).unwrap(),
            port,
            source: SpiffeId::new("spiffe://east/meshfed/site/east/gateway").unwrap(),
            flow: None,
            client: None,
            selector: None,
            subset: None,
        }
    }

    #[test]
    fn decisions() {
        let ex = exports();
        let east = SpiffeId::new("spiffe://east/meshfed/site/east/gateway").unwrap();
        let north = SpiffeId::new("spiffe://north/meshfed/site/north/gateway").unwrap();
        let from_north = Open {
            source: north.clone(),
            ..open("echo.demo", 7000)
        };
        assert_eq!(
            decide(&ex, &Default::default(), &from_north, &north)
                .unwrap()
                .endpoints
                .len(),
            1
        );
        assert_eq!(
            decide(&ex, &Default::default(), &open("nope.demo", 7000), &east)
                .unwrap_err()
                .reason,
            Refusal::UnknownService
        );
        assert_eq!(
            decide(&ex, &Default::default(), &open("echo.demo", 7002), &east)
                .unwrap_err()
                .reason,
            Refusal::UnknownService
        );
        assert_eq!(
            decide(&ex, &Default::default(), &open("echo.demo", 7001), &east)
                .unwrap_err()
                .reason,
            Refusal::NoReadyEndpoint
        );
        assert!(decide(&ex, &Default::default(), &open("db.prod", 5432), &east).is_ok());
        // UDP opens look at the UDP ports only, and the other way round.
        let udp = |svc, port| Open {
            flow: Some(1),
            ..open(svc, port)
        };
        assert!(decide(&ex, &Default::default(), &udp("echo.demo", 53), &east).is_ok());
        let Refused {
            reason: r,
            message: msg,
            ..
        } = decide(&ex, &Default::default(), &udp("echo.demo", 7000), &east).unwrap_err();
        assert_eq!(r, Refusal::UnknownService);
        assert!(msg.contains("udp port 7000"), "{msg}");
        assert_eq!(
            decide(&ex, &Default::default(), &open("echo.demo", 53), &east)
                .unwrap_err()
                .reason,
            Refusal::UnknownService
        );
        let Refused {
            reason: r,
            message: msg,
            ..
        } = decide(&ex, &Default::default(), &open("db.prod", 5432), &north).unwrap_err();
        assert_eq!(r, Refusal::NotExportedToPeer);
        assert!(msg.contains("north"), "{msg}");
    }

    #[test]
    fn a_gateway_vouches_for_its_trust_domain_and_policies_decide() {
        use meshfed_catalog::authz::{Action, Rule, Source};
        let ex = exports();
        let east = SpiffeId::new("spiffe://east/meshfed/site/east/gateway").unwrap();
        let as_caller = |caller: &str| Open {
            source: SpiffeId::new(caller).unwrap(),
            ..open("echo.demo", 7000)
        };
        let frontend = "spiffe://east/ns/shop/sa/frontend";
        let batch = "spiffe://east/ns/batch/sa/report";
        let deny_batch = AuthorizationPolicy {
            name: "deny-batch".into(),
            namespace: "demo".into(),
            action: Action::Deny,
            targets: vec![],
            rules: vec![Rule {
                from: vec![Source {
                    namespaces: vec!["batch".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let allow_frontend = AuthorizationPolicy {
            name: "allow-frontend".into(),
            action: Action::Allow,
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec!["east/ns/shop/sa/frontend".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..deny_batch.clone()
        };
        let ps = [deny_batch, allow_frontend];
        // (caller, policies, refusal)
        let rows: [(&str, &[AuthorizationPolicy], Option<Refusal>); 7] = [
            (frontend, &[], None),
            (frontend, &ps, None),
            (batch, &[], None),
            (batch, &ps, Some(Refusal::Denied)),
            // The gateway itself is not the frontend: the ALLOW policy leaves it out.
            (
                "spiffe://east/meshfed/site/east/gateway",
                &ps,
                Some(Refusal::Denied),
            ),
            // East cannot speak for west's workloads, with or without policies.
            (
                "spiffe://west/ns/shop/sa/frontend",
                &[],
                Some(Refusal::ForeignCaller),
            ),
            (
                "spiffe://west/ns/shop/sa/frontend",
                &ps,
                Some(Refusal::ForeignCaller),
            ),
        ];
        for (caller, policies, want) in rows {
            let got = decide(
                &ex,
                &PolicyIndex::new(policies.to_vec()),
                &as_caller(caller),
                &east,
            )
            .err();
            assert_eq!(got.as_ref().map(|e| e.reason), want, "{caller}: {got:?}");
        }
        let Refused { message: msg, .. } = decide(
            &ex,
            &PolicyIndex::new(ps.to_vec()),
            &as_caller(batch),
            &east,
        )
        .unwrap_err();
        assert!(msg.contains("by policy demo/deny-batch"), "{msg}");
        let Refused { message: msg, .. } = decide(
            &ex,
            &PolicyIndex::new(ps.to_vec()),
            &open("echo.demo", 7000),
            &east,
        )
        .unwrap_err();
        assert!(
            msg.contains("no ALLOW policy matched (demo/allow-frontend)"),
            "{msg}"
        );
    }
}
