//! Egress: one local TCP listener per imported service port. Each accepted client gets a
//! stream on the peer connection, an open request, and — only after the far side accepts
//! — a splice. A refusal closes the client socket with a reset, a log line and a metric
//! carrying the reason. A service's TCP routes (a VirtualService's `tcp`) pick, once
//! per connection, the destination and the sites of its subset (`Egress::tcp_pick`); the
//! subset's endpoint labels go in the open request (`meshfed/3`), and a peer that cannot
//! carry them is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use meshfed_catalog::catalog::{AppProtocol, Protocol};
use meshfed_catalog::{ServiceName, SiteName};
use meshfed_identity::SpiffeId;
use meshfed_lifecycle::drain::DrainWatcher;
use quinn::{Connection, RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hbone::{H2Recv, H2Send};
use crate::metrics::Metrics;
use crate::peers::{PeerConn, PeerHandle, Peers};
use crate::splice::{TlsOverTcp, reset_tcp, splice, splice_tls};
use crate::tunnel::{HeaderReadError, read_header};
use crate::wire::{self, Open, Refusal, Response};

const DIR: &str = "egress";
/// How long a client waits for the last candidate site's connection to come (back) up.
const PEER_WAIT: Duration = Duration::from_secs(3);
/// Taken off the open-request timeout for a candidate that is not the last one: it still
/// covers the far side's endpoint connect (the timeout is `connect_timeout + 2 s`).
const FAILOVER_ANSWER_CUT: Duration = Duration::from_millis(1500);
/// How long to wait for a candidate that is not the last one before trying the next.
const FAILOVER_WAIT: Duration = Duration::from_millis(300);

/// How long the egress waits for a client's ClientHello on a `tls` port with TLS
/// routes; past it the connection goes on without an SNI.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// A connection a TCP or TLS route decided: the route's metric label (`#i` for
/// `tcp[i]`, `tls#i` for `tls[i]`, `tls` when TLS routes apply and none matched) and
/// the sites to try.
type Routed = (String, Vec<SiteName>);

/// Where a TCP or TLS route sends one connection.
struct TcpPick {
    /// The route's metric label.
    route: String,
    /// The import of another service it opens through (`None`: this one).
    via: Option<Arc<Egress>>,
    /// The sites to try, best first.
    sites: Vec<SiteName>,
    /// The subset's endpoint labels, for the far ingress.
    selector: Option<BTreeMap<String, String>>,
    /// The subset's name when it has a policy of its own (its connection pool applies
    /// at the far ingress).
    subset: Option<String>,
}

/// The sites serving one import, best first; swapped as the catalog changes.
pub type Backends = Arc<ArcSwap<Vec<SiteName>>>;

/// One imported service port: its listener's clients go to `backends` in order.
pub struct Egress {
    pub service: ServiceName,
    pub port: u16,
    pub backends: Backends,
    pub peers: Peers,
    pub local_id: SpiffeId,
    pub metrics: Metrics,
    /// How long the far side may take to answer an open request: its endpoint connect
    /// timeout plus a margin. Past it the peer connection is presumed dead.
    pub open_timeout: Duration,
    /// How TCP clients prove who calls (`local_id` unless they do).
    pub callers: Callers,
    /// What the port speaks now (the catalog may change it): HTTP-family ports are routed
    /// per request, by `http`.
    pub app: Arc<ArcSwap<AppProtocol>>,
    pub http: Arc<crate::http::egress::HttpEgress>,
    /// The service's HTTP routes, when it has any (swapped as the catalog changes).
    pub routes: Routes,
    /// Per-service metric series by destination site ([`Egress::service_handles`]).
    pub service_handles: Mutex<std::collections::HashMap<SiteName, crate::metrics::ServiceHandles>>,
    /// This gateway's TCP imports, for routes whose destination is another service.
    pub targets: Targets,
    /// How long a client's connection to an HTTP import may carry no request
    /// (`http_idle_timeout`).
    pub http_idle: Duration,
}

/// This gateway's TCP imports by (service, port): a route of one import whose
/// destination is another service sends the request through that service's import.
#[derive(Clone, Default)]
pub struct Targets(Arc<std::sync::RwLock<TargetMap>>);

type TargetMap = std::collections::HashMap<(ServiceName, u16), std::sync::Weak<Egress>>;

impl Targets {
    /// The live import of `service:port`, if this gateway has one.
    pub fn get(&self, service: &ServiceName, port: u16) -> Option<Arc<Egress>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(service.clone(), port))
            .and_then(std::sync::Weak::upgrade)
    }

    fn set(&self, service: &ServiceName, port: u16, eg: Option<&Arc<Egress>>) {
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        match eg {
            Some(eg) => m.insert((service.clone(), port), Arc::downgrade(eg)),
            None => m.remove(&(service.clone(), port)),
        };
    }
}

/// An import's HTTP routes, swapped whole.
pub type Routes = Arc<ArcSwap<Option<Arc<crate::http::egress::RouteTable>>>>;

/// Callers by source address (`caller_pod_ip`): a pod reflector keeps it.
pub type CallerIps = Arc<
    ArcSwap<std::collections::HashMap<std::net::IpAddr, meshfed_catalog::http_route::KnownCaller>>,
>;

/// Who the caller of a TCP client's open is.
#[derive(Clone, Default)]
pub enum Callers {
    /// The listener's declared caller, or the gateway itself (`local_id`).
    #[default]
    Declared,
    /// `caller_mtls`: clients present an SVID of this site's trust domain, and its ID is
    /// the caller. At most [`MAX_CALLER_HANDSHAKES`] handshakes run at once (shared by
    /// every listener): memory for clients not yet authenticated is bounded.
    Mtls(tokio_rustls::TlsAcceptor, Arc<tokio::sync::Semaphore>),
    /// `caller_pod_ip`: the identity of the pod whose address connects; an address
    /// that names nobody is refused (`caller_unauthenticated`). UDP flows, whose source
    /// address no handshake proves, keep `local_id`.
    SourceAddress(CallerIps),
}

/// How long a client of a `caller_mtls` listener has for its TLS handshake.
pub(crate) const CALLER_HANDSHAKE: Duration = Duration::from_secs(10);

/// Caller TLS handshakes in progress at once, gateway-wide; a client past it is reset
/// (`caller_handshake_limit`).
pub const MAX_CALLER_HANDSHAKES: usize = 1024;

impl Callers {
    /// `caller_mtls` with its handshake limit.
    pub fn mtls(acceptor: tokio_rustls::TlsAcceptor) -> Self {
        Self::Mtls(
            acceptor,
            Arc::new(tokio::sync::Semaphore::new(MAX_CALLER_HANDSHAKES)),
        )
    }
}

impl Egress {
    /// Accepts clients until `stop` (this import's, a child of the drain); each client
    /// runs on `drain`, which waits for it, and holds a slot of `clients` (shared by
    /// every import listener) while it lives. A client past them is reset at once
    /// (`client_connection_limit`): clients cannot take the descriptors the gateway
    /// needs for everything else.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        drain: DrainWatcher,
        clients: Arc<tokio::sync::Semaphore>,
    ) {
        let this = self;
        let mut refusing = false;
        loop {
            let (tcp, client) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let Ok(slot) = clients.clone().try_acquire_owned() else {
                this.metrics.refused(DIR, "client_connection_limit");
                if !refusing {
                    // Once per spell of refusals, not per client.
                    warn!(service = %this.service, port = this.port, %client,
                        "client connection refused: the import listeners' clients hold their share of the open-file limit (client_connection_limit)");
                    refusing = true;
                }
                reset_tcp(tcp);
                continue;
            };
            refusing = false;
            let this = this.clone();
            if this.app.load().is_http() {
                // Held by the connection and by what it hands over to (an h2c or
                // WebSocket upgrade): the slot is given back when the last of them ends.
                let hold = crate::http::ClientHold::new(slot, drain.clone());
                let http = this.http.clone();
                drain.spawn(
                    http.serve_client(this, tcp, client, hold)
                        .instrument(info_span!("egress_http", %client)),
                );
                continue;
            }
            drain.spawn(
                async move {
                    this.serve_client(tcp, client).await;
                    drop(slot);
                }
                .instrument(info_span!("egress", %client)),
            );
        }
    }

    /// The service's TCP routes applied to one connection from `caller` to `local`
    /// (the address it connected to): `None` when no route applies (this import's
    /// sites, in order). Otherwise the destination picked by weight, the import it opens
    /// through (another service's, for a destination of another service) and the sites
    /// its subset selects there, in that import's order.
    fn tcp_pick(
        &self,
        caller: &SpiffeId,
        caller_labels: Option<&BTreeMap<String, String>>,
        local: std::net::IpAddr,
        tls: Option<Option<&str>>,
    ) -> Result<Option<TcpPick>, (String, Refused)> {
        use meshfed_catalog::http_route::TlsPick;
        let routes = self.routes.load();
        let Some(table) = routes.as_ref().as_ref() else {
            return Ok(None);
        };
        let policy = &table.compiled.policy;
        let mine = match tls {
            None => &policy.tcp_routes,
            Some(_) => &policy.tls_routes,
        };
        if mine.is_empty() || !policy.routes_apply_to(caller.as_str()) {
            return Ok(None);
        }
        let view = meshfed_catalog::http_route::TcpView {
            port: self.port,
            destination: local,
            caller: caller.as_str(),
            caller_labels,
        };
        let (label, route) = match tls {
            None => match table.compiled.tcp_route(&view) {
                Some((i, r)) => (format!("#{i}"), r),
                None => return Ok(None),
            },
            Some(sni) => match table.compiled.tls_route(&view, sni) {
                TlsPick::Route(i, r) => (format!("tls#{i}"), r),
                TlsPick::Service => return Ok(None),
                TlsPick::NoMatch => {
                    let r = Refused {
                        reason: Refusal::NoReadyEndpoint,
                        message: format!(
                            "no TLS route of {}:{} matches SNI {:?} to {local}",
                            self.service,
                            self.port,
                            sni.unwrap_or("(none)")
                        ),
                        site: None,
                    };
                    return Err(("tls".into(), r));
                }
            },
        };
        let no_site = |message: String| {
            let r = Refused {
                reason: Refusal::NoReadyEndpoint,
                message,
                site: None,
            };
            (label.clone(), r)
        };
        let d = &route.destinations
            [meshfed_catalog::http_route::pick(&route.destinations, self.http.next_roll())];
        let to = (
            d.service.as_ref().unwrap_or(&self.service),
            d.port.unwrap_or(self.port),
        );
        let via = if to != (&self.service, self.port) {
            let Some(t) = self.targets.get(to.0, to.1) else {
                return Err(no_site(format!(
                    "route {label} sends to {}:{}, which this gateway does not import",
                    to.0, to.1
                )));
            };
            Some(t)
        } else {
            None
        };
        let eg = via.as_deref().unwrap_or(self);
        let backends = eg.backends.load_full();
        let (sites, selector, own) = match &d.subset {
            None => (backends.to_vec(), None, None),
            Some(name) => {
                // The subset is its service's policy's.
                let t_routes = eg.routes.load();
                let Some((t, subset)) = t_routes
                    .as_ref()
                    .as_ref()
                    .and_then(|t| Some((t, t.compiled.subset(name)?)))
                else {
                    return Err(no_site(format!("{}:{} has no subset {name}", to.0, to.1)));
                };
                let sites =
                    meshfed_catalog::http_route::subset_sites(subset, &backends, &t.site_labels);
                (
                    sites.into_iter().cloned().collect(),
                    meshfed_catalog::http_route::endpoint_selector(subset),
                    subset.policy.is_some().then(|| subset.name.clone()),
                )
            }
        };
        if sites.is_empty() {
            return Err(no_site(format!(
                "no serving site of {}:{} has an endpoint in subset {}",
                to.0,
                to.1,
                d.subset.as_deref().unwrap_or_default()
            )));
        }
        Ok(Some(TcpPick {
            route: label,
            via,
            sites,
            selector,
            subset: own,
        }))
    }

    async fn serve_client(&self, tcp: TcpStream, client: SocketAddr) {
        let source = match &self.callers {
            Callers::Mtls(acceptor, slots) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    debug!("caller handshakes at their limit; connection reset");
                    self.metrics.refused(DIR, "caller_handshake_limit");
                    reset_tcp(tcp);
                    return;
                };
                return self.serve_mtls_client(acceptor, slot, tcp, client).await;
            }
            Callers::SourceAddress(dir) => match dir.load().get(&client.ip().to_canonical()) {
                Some(c) => (c.id.clone(), Some(c.labels.clone())),
                None => {
                    debug!("no workload has this source address; connection refused");
                    self.metrics.refused(DIR, "caller_unauthenticated");
                    reset_tcp(tcp);
                    return;
                }
            },
            Callers::Declared => (self.local_id.clone(), None),
        };
        let local = tcp.local_addr().map_or(client.ip(), |a| a.ip());
        let (source, labels) = source;
        let mut tcp = tcp;
        let (hello, sni) = self.client_hello(&mut tcp).await;
        let tls = hello.as_ref().map(|_| sni.as_deref());
        let Ok((open, sites)) = self.routed_open(source, labels.as_deref(), client, local, tls)
        else {
            reset_tcp(tcp);
            return;
        };
        match self.open_counted(&open, sites).await {
            Ok((opened, _active, c)) => {
                let (end, transport) = match opened.stream {
                    Stream::Quic(_, mut send, recv) => {
                        if !ahead(&mut send, hello, &c).await {
                            return;
                        }
                        (splice(tcp, send, recv, &c, None).await, "quic")
                    }
                    Stream::H2(mut send, recv) => {
                        if !ahead(&mut send, hello, &c).await {
                            return;
                        }
                        (splice(tcp, send, recv, &c, None).await, "h2")
                    }
                };
                debug!(?end, site = %opened.site, transport, "connection done");
            }
            Err(refused) => {
                refused.log(&open, "connection refused");
                reset_tcp(tcp);
            }
        }
    }

    /// A client that authenticates with its SVID: its SPIFFE ID is the open's caller.
    async fn serve_mtls_client(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        slot: tokio::sync::OwnedSemaphorePermit,
        tcp: TcpStream,
        client: SocketAddr,
    ) {
        let handshake = tokio::time::timeout(CALLER_HANDSHAKE, acceptor.accept(tcp)).await;
        drop(slot);
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(error = %e, "caller TLS handshake failed");
                self.metrics.refused(DIR, "caller_unauthenticated");
                return;
            }
            Err(_) => {
                debug!("caller TLS handshake did not complete in time");
                self.metrics.refused(DIR, "caller_unauthenticated");
                return;
            }
        };
        let caller = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| meshfed_identity::verify::peer_id(c).ok());
        let Some(caller) = caller else {
            // Unreachable with a verifier that requires a certificate.
            self.metrics.refused(DIR, "caller_unauthenticated");
            return;
        };
        let local = tls.get_ref().0.local_addr().map_or(client.ip(), |a| a.ip());
        let mut tls = tls;
        let (hello, sni) = self.client_hello(&mut tls).await;
        let routed = hello.as_ref().map(|_| sni.as_deref());
        let Ok((open, sites)) = self.routed_open(caller, None, client, local, routed) else {
            reset_tcp(tls.into_tcp());
            return;
        };
        match self.open_counted(&open, sites).await {
            Ok((opened, _active, c)) => {
                let end = match opened.stream {
                    Stream::Quic(_, mut send, recv) => {
                        if !ahead(&mut send, hello, &c).await {
                            return;
                        }
                        splice_tls(tls, send, recv, &c, None).await
                    }
                    Stream::H2(mut send, recv) => {
                        if !ahead(&mut send, hello, &c).await {
                            return;
                        }
                        splice_tls(tls, send, recv, &c, None).await
                    }
                };
                debug!(?end, site = %opened.site, caller = %open.source, "connection done");
            }
            Err(refused) => {
                refused.log(&open, "connection refused");
                reset_tcp(tls.into_tcp());
            }
        }
    }

    /// The open request of a TCP client's connection, and the sites to try (`None`:
    /// this import's), under the service's TCP routes, or its TLS routes on a `tls` port
    /// (`tls`: the ClientHello's SNI, when there was one). A refusal is counted and
    /// logged with the caller.
    fn routed_open(
        &self,
        source: SpiffeId,
        labels: Option<&BTreeMap<String, String>>,
        client: SocketAddr,
        local: std::net::IpAddr,
        tls: Option<Option<&str>>,
    ) -> Result<(Open, Option<Routed>), Refused> {
        let pick = match self.tcp_pick(&source, labels, local, tls) {
            Ok(p) => p,
            Err((route, refused)) => {
                self.tcp_route_counted(&route, None);
                self.refused(&refused);
                let open = Open {
                    source,
                    client: Some(client),
                    ..self.open_request(None)
                };
                refused.log(&open, "connection refused by the service's TCP routes");
                return Err(refused);
            }
        };
        let (via, routed, selector, subset) = match pick {
            Some(p) => (p.via, Some((p.route, p.sites)), p.selector, p.subset),
            None => (None, None, None, None),
        };
        let open = Open {
            source,
            client: Some(client),
            selector,
            subset,
            ..via.as_deref().unwrap_or(self).open_request(None)
        };
        if !open.selector_fits() {
            let route = routed.as_ref().map_or("", |r| r.0.as_str());
            let refused = Refused {
                reason: Refusal::NoReadyEndpoint,
                message: format!(
                    "route {route}: its subset's labels are longer than an open request carries ({} bytes)",
                    crate::wire::MAX_SELECTOR_LEN
                ),
                site: None,
            };
            self.tcp_route_counted(route, None);
            self.refused(&refused);
            refused.log(&open, "connection refused by the service's TCP routes");
            return Err(refused);
        }
        Ok((open, routed))
    }

    /// On a `tls` port whose service has TLS routes, the client's ClientHello, read
    /// ahead (bounded: [`crate::sni::read`]): the bytes, forwarded before the rest, and
    /// its SNI. `(None, None)` on any other port: nothing is read.
    async fn client_hello<R: tokio::io::AsyncRead + Unpin>(
        &self,
        r: &mut R,
    ) -> (Option<bytes::Bytes>, Option<String>) {
        if **self.app.load() != AppProtocol::Tls {
            return (None, None);
        }
        let has_tls_routes = self
            .routes
            .load()
            .as_ref()
            .as_ref()
            .is_some_and(|t| !t.compiled.policy.tls_routes.is_empty());
        if !has_tls_routes {
            return (None, None);
        }
        let (bytes, sni) = crate::sni::read(r, HELLO_WAIT).await;
        (Some(bytes.freeze()), sni)
    }

    /// Counts a connection a TCP or TLS route decided, by the site that accepted it.
    fn tcp_route_counted(&self, route: &str, site: Option<&SiteName>) {
        let site = site.map_or("none", |s| s.as_str());
        self.metrics
            .tcp_route_connection(self.http.import(), route, site);
    }

    /// A TCP client's open over the best site (or over `sites`, a TCP route's), traced
    /// and counted: on success the open latency and the stream by service (held until
    /// the guard drops), with its byte counters; otherwise the refusal, by direction and
    /// by service.
    async fn open_counted(
        &self,
        open: &Open,
        routed: Option<Routed>,
    ) -> Result<
        (
            Opened,
            crate::metrics::TcpStreamGuard,
            crate::splice::Counters,
        ),
        Refused,
    > {
        use tracing::Instrument;
        let started = std::time::Instant::now();
        let span = self.open_span();
        let (route, sites) = match routed {
            Some((r, s)) => (Some(r), Arc::new(s)),
            None => (None, self.backends.load_full()),
        };
        let opened = self.open_among(open, &sites).instrument(span.clone()).await;
        if let Some(r) = &route {
            self.tcp_route_counted(r, opened.as_ref().ok().map(|o| &o.site));
        }
        match opened {
            Ok(opened) => {
                span.record("meshfed.destination_site", opened.site.as_str());
                span.record("meshfed.transport", opened.stream.transport());
                let service = self.service_handles(&opened.site);
                service.opened(started.elapsed());
                let (guard, counters) = self.metrics.tcp_stream(DIR, &service);
                Ok((opened, guard, counters))
            }
            Err(refused) => {
                span.record("meshfed.refusal", refused.reason.as_str());
                if let Some(site) = &refused.site {
                    span.record("meshfed.destination_site", site.as_str());
                }
                self.refused(&refused);
                Err(refused)
            }
        }
    }

    /// The per-service series of this import's streams to `site`, looked up once per
    /// site (a federation's sites bound the map).
    fn service_handles(&self, site: &SiteName) -> crate::metrics::ServiceHandles {
        let mut m = self
            .service_handles
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(h) = m.get(site) {
            return h.clone();
        }
        let h = self.metrics.service.handles(self.metrics.egress_labels(
            &self.service,
            self.port,
            site.as_str(),
        ));
        m.insert(site.clone(), h.clone());
        h
    }

    /// The exported span of one tunnel open (target `otel`: only with `--otlp-endpoint`).
    fn open_span(&self) -> tracing::Span {
        tracing::trace_span!(
            target: "otel",
            "egress tunnel.open",
            otel.kind = "client",
            meshfed.site = %self.metrics.site,
            meshfed.service = %self.service,
            meshfed.port = self.port,
            meshfed.destination_site = tracing::field::Empty,
            meshfed.transport = tracing::field::Empty,
            meshfed.refusal = tracing::field::Empty,
        )
    }

    /// Counts a refused open, by direction and by service (the last site tried, or
    /// `_unknown` when none was).
    fn refused(&self, r: &Refused) {
        self.metrics.refused(DIR, r.reason.as_str());
        let to = r
            .site
            .as_ref()
            .map_or(crate::metrics::UNKNOWN, |s| s.as_str());
        let labels = self.metrics.egress_labels(&self.service, self.port, to);
        self.metrics.service.refused(labels, r.reason.as_str());
    }

    /// The open request for this import: a TCP stream, or the UDP flow `flow`.
    pub(crate) fn open_request(&self, flow: Option<u32>) -> Open {
        Open {
            service: self.service.clone(),
            port: self.port,
            source: self.local_id.clone(),
            flow,
            client: None,
            selector: None,
            subset: None,
        }
    }

    /// Tries the backends in order; a refusal before any payload byte moves on to the
    /// next site without the client noticing.
    pub(crate) async fn open_any(&self, open: &Open) -> Result<Opened, Refused> {
        self.open_among(open, &self.backends.load_full()).await
    }

    /// [`Egress::open_any`] over `backends` (best first), which may be fewer than the
    /// import's (a TCP route's subset).
    pub(crate) async fn open_among(
        &self,
        open: &Open,
        backends: &[SiteName],
    ) -> Result<Opened, Refused> {
        let mut last = (
            Refusal::NoReadyEndpoint,
            format!("no site serves {}:{}", self.service, self.port),
            None,
        );
        for (i, site) in backends.iter().enumerate() {
            let Some(peer) = self.peers.get(site) else {
                last = (
                    Refusal::PeerUnavailable,
                    format!("site {site} is not a peer"),
                    Some(site),
                );
                continue;
            };
            let b = budget(i, backends.len(), self.open_timeout);
            match self.open_stream(&peer, open, b.connection, b.answer).await {
                Ok(stream) => {
                    return Ok(Opened {
                        site: site.clone(),
                        stream,
                    });
                }
                Err((reason, message)) => {
                    let next = after_refusal(reason, i, backends.len());
                    if next == Next::TryNextSite {
                        debug!(%site, reason = reason.as_str(), %message, "site refused; trying the next one");
                        self.metrics.failover(reason.as_str());
                    }
                    last = (reason, message, Some(site));
                    if next == Next::GiveUp {
                        break;
                    }
                }
            }
        }
        let (reason, message, site) = last;
        Err(Refused {
            reason,
            message,
            site: site.cloned(),
        })
    }

    /// Opens a stream and waits for accept. A dead connection (open failed or no answer in
    /// time) is reported to the dialer and the open is tried once more on a fresh one.
    pub(crate) async fn open_stream(
        &self,
        peer: &PeerHandle,
        open: &Open,
        wait: Duration,
        answer: Duration,
    ) -> Result<Stream, (Refusal, String)> {
        let mut last = (Refusal::PeerUnavailable, String::new());
        for _attempt in 0..2 {
            let Some(conn) = peer.connection(wait).await else {
                return Err((
                    Refusal::PeerUnavailable,
                    format!("no connection to peer {} within {wait:?}", peer.site),
                ));
            };
            let r = {
                let attempt = self.try_open(&conn, open, answer);
                tokio::pin!(attempt);
                tokio::select! {
                r = &mut attempt => r,
                _ = tokio::time::sleep(crate::peers::SUSPECT_AFTER) => {
                    peer.suspect(&conn, true);
                    let r = attempt.await;
                    if r.is_ok() {
                        peer.suspect(&conn, false);
                    }
                    r
                }
                }
            };
            match r {
                Ok(r) => return r,
                Err(why) => {
                    peer.report_dead(&conn);
                    last = (Refusal::PeerUnavailable, why);
                }
            }
        }
        Err(last)
    }

    /// `Err` means the connection is unusable; `Ok(Err)` is a refusal from the far side.
    #[allow(clippy::type_complexity)]
    async fn try_open(
        &self,
        conn: &PeerConn,
        open: &Open,
        answer: Duration,
    ) -> Result<Result<Stream, (Refusal, String)>, String> {
        let conn = match conn {
            PeerConn::H2(pool) => {
                return pool
                    .open(open, answer)
                    .await
                    .map(|r| r.map(|(send, recv)| Stream::H2(send, recv)));
            }
            PeerConn::Quic(c) => c,
        };
        let version = crate::tunnel::wire_version(conn);
        // A subset's selector travels only to a peer that chose meshfed/3; without it
        // the peer could connect to any endpoint, so another site is tried. (A subset's
        // name alone, for its connection pool, is not sent to an older peer.)
        if open.selector.is_some() && version < 3 {
            return Ok(Err((
                Refusal::UnsupportedVersion,
                "the peer's gateway does not connect by a subset's endpoint labels (it speaks meshfed/2 or older)".into(),
            )));
        }
        // The client's address travels only to a peer that chose meshfed/2, a subset's
        // name only to one that chose meshfed/3.
        let frame = match version {
            1 if open.client.is_some() || open.subset.is_some() => Open {
                client: None,
                subset: None,
                ..open.clone()
            }
            .encode(),
            2 if open.subset.is_some() => Open {
                subset: None,
                ..open.clone()
            }
            .encode(),
            _ => open.encode(),
        };
        let frame = &frame[..];
        let lost = |e: &dyn std::fmt::Display| match conn.close_reason() {
            Some(why) => format!("{e}: {why}"),
            None => e.to_string(),
        };
        let work = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
            send.write_all(frame).await.map_err(|e| lost(&e))?;
            let payload = match read_header(&mut recv).await {
                Ok(p) => p,
                Err(HeaderReadError::Wire(e)) => {
                    return Ok(Err((
                        Refusal::MalformedHeader,
                        format!("bad response from peer: {e}"),
                    )));
                }
                Err(HeaderReadError::Io(e)) => return Err(lost(&e)),
            };
            Ok(match wire::decode_response(&payload) {
                Ok(Response::Accept) => Ok(Stream::Quic(conn.clone(), send, recv)),
                Ok(Response::Refuse { reason, message }) => Err((reason, message)),
                Err(e) => Err((
                    Refusal::MalformedHeader,
                    format!("bad response from peer: {e}"),
                )),
            })
        };
        tokio::time::timeout(answer, work)
            .await
            .map_err(|_| format!("peer did not answer the open request within {answer:?}"))?
    }
}

/// Sends the bytes read ahead of a splice (a ClientHello) into the tunnel first, counted
/// as the splice counts what it sends; `false` when the stream is gone.
async fn ahead<S: crate::splice::TunnelSend>(
    send: &mut S,
    bytes: Option<bytes::Bytes>,
    counters: &crate::splice::Counters,
) -> bool {
    let Some(b) = bytes.filter(|b| !b.is_empty()) else {
        return true;
    };
    let n = b.len() as u64;
    if send.send(b).await.is_err() {
        debug!("tunnel stream gone before the ClientHello was forwarded");
        send.reset();
        return false;
    }
    counters.sent(n);
    true
}

/// What one candidate site may cost an open: how long to wait for a connection to it,
/// and for its answer to the open request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    pub connection: Duration,
    pub answer: Duration,
}

/// The budget of candidate `i` of `n`. Only the last candidate gets the full waits;
/// before it, a slow or dead site costs little because another one is next. Pure.
pub(crate) fn budget(i: usize, n: usize, open_timeout: Duration) -> Budget {
    if i + 1 >= n {
        Budget {
            connection: PEER_WAIT,
            answer: open_timeout,
        }
    } else {
        Budget {
            connection: FAILOVER_WAIT,
            answer: open_timeout
                .saturating_sub(FAILOVER_ANSWER_CUT)
                .max(FAILOVER_WAIT),
        }
    }
}

/// What an open does after candidate `i` of `n` refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Another site is next, and this refusal may be another site's accept.
    TryNextSite,
    /// This was the last site; its answer is the client's.
    LastSite,
    /// A refusal no other site would answer differently (our own request was bad).
    GiveUp,
}

/// Pure: whether a refusal moves the open on to the next site.
pub(crate) fn after_refusal(reason: Refusal, i: usize, n: usize) -> Next {
    if !reason.retryable_elsewhere() {
        Next::GiveUp
    } else if i + 1 < n {
        Next::TryNextSite
    } else {
        Next::LastSite
    }
}

/// A stream the far side accepted.
pub(crate) struct Opened {
    pub site: SiteName,
    pub stream: Stream,
}

/// An accepted tunnel stream, on either transport: on QUIC with its connection (a UDP
/// flow's datagrams travel on it).
pub(crate) enum Stream {
    Quic(Connection, SendStream, RecvStream),
    H2(H2Send, H2Recv),
}

impl Stream {
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Self::Quic(..) => "quic",
            Self::H2(..) => "h2",
        }
    }
}

/// Why no site accepted: the last site's answer.
pub(crate) struct Refused {
    pub reason: Refusal,
    pub message: String,
    pub site: Option<SiteName>,
}

impl Refused {
    pub fn log(&self, open: &Open, what: &str) {
        warn!(
            service = %open.service, port = open.port, udp = open.flow.is_some(),
            site = ?self.site.as_ref().map(|s| s.as_str()),
            reason = self.reason.as_str(), message = %self.message, "{what}"
        );
    }
}

/// The egress listeners, one per imported (service, port); added, re-routed and
/// removed as the catalog changes.
pub struct Imports {
    peers: Peers,
    local_id: SpiffeId,
    metrics: Metrics,
    open_timeout: Duration,
    udp_idle_timeout: Duration,
    dispatch: Arc<crate::udp::Dispatch>,
    drain: DrainWatcher,
    /// How every TCP listener's clients prove who calls.
    callers: Callers,
    by_key: Mutex<BTreeMap<ImportKey, ImportEntry>>,
    targets: Targets,
    /// The most listeners at once: each holds a descriptor, and a catalog larger than
    /// the open-file limit must not leave none for connections.
    max_listeners: usize,
    /// Client connections the TCP listeners hold at once, all together
    /// ([`crate::admission::client_connections`]).
    clients: Arc<tokio::sync::Semaphore>,
    /// `http_idle_timeout`, for the HTTP imports' client connections.
    http_idle: Duration,
}

/// The listener budget for an open-file limit: half of it (a quarter goes to UDP flows,
/// a quarter to client connections, [`crate::admission::client_connections`]). Pure.
pub fn listener_budget(nofile: u64) -> usize {
    usize::try_from(nofile / 2).unwrap_or(usize::MAX)
}

/// An import's identity: service, port, protocol (TCP and UDP on one port are two).
pub type ImportKey = (ServiceName, u16, Protocol);

struct ImportEntry {
    backends: Backends,
    app: Arc<ArcSwap<AppProtocol>>,
    routes: Routes,
    /// Its HTTP state (links, budget, ejections).
    http: Arc<crate::http::egress::HttpEgress>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Imports {
    pub fn new(
        peers: Peers,
        local_id: SpiffeId,
        metrics: Metrics,
        open_timeout: Duration,
        udp_idle_timeout: Duration,
        drain: DrainWatcher,
        callers: Callers,
    ) -> Self {
        Self {
            max_listeners: usize::MAX,
            clients: Arc::new(tokio::sync::Semaphore::new(
                tokio::sync::Semaphore::MAX_PERMITS,
            )),
            http_idle: crate::config::DEFAULT_HTTP_IDLE_TIMEOUT,
            dispatch: crate::udp::Dispatch::new(&metrics),
            peers,
            local_id,
            metrics,
            open_timeout,
            udp_idle_timeout,
            drain,
            callers,
            by_key: Mutex::new(BTreeMap::new()),
            targets: Targets::default(),
        }
    }

    /// At most `n` listeners at once (see [`listener_budget`]); unbounded by default.
    pub fn with_max_listeners(mut self, n: usize) -> Self {
        self.max_listeners = n;
        self
    }

    /// A client's connection to an HTTP import closes (gracefully) after `d` with no
    /// request in flight (`http_idle_timeout`; 1 h by default).
    pub fn with_http_idle_timeout(mut self, d: Duration) -> Self {
        self.http_idle = d;
        self
    }

    /// At most `n` client connections at once across the TCP listeners
    /// ([`crate::admission::client_connections`]); unbounded by default.
    pub fn with_max_clients(mut self, n: usize) -> Self {
        self.clients = Arc::new(tokio::sync::Semaphore::new(
            n.min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ImportKey, ImportEntry>> {
        self.by_key.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a listener for the import, or re-routes an existing one. Returns the
    /// listener's address.
    /// `source`: the caller this listener's clients are (declared per listener);
    /// `None`: the gateway's default.
    #[allow(clippy::too_many_arguments)]
    pub fn upsert(
        &self,
        service: &ServiceName,
        port: u16,
        protocol: Protocol,
        app: AppProtocol,
        listen: SocketAddr,
        backends: &[SiteName],
        source: Option<&SpiffeId>,
        routes: Option<Arc<crate::http::egress::RouteTable>>,
    ) -> std::io::Result<SocketAddr> {
        let mut map = self.lock();
        let key = (service.clone(), port, protocol);
        if let Some(e) = map.get(&key) {
            if **e.app.load() != app {
                info!(%service, port, %protocol, app_protocol = %app, "import's protocol changed: new connections use it");
                e.app.store(Arc::new(app));
            }
            let changed = match (e.routes.load().as_ref(), &routes) {
                (None, None) => false,
                (Some(a), Some(b)) => {
                    a.compiled.policy != b.compiled.policy
                        || a.site_labels != b.site_labels
                        || a.site_weights != b.site_weights
                        || a.subset_orders != b.subset_orders
                }
                _ => true,
            };
            if changed {
                info!(%service, port, routes = ?routes.as_ref().map(|r| r.compiled.policy.source.clone()), "import's routes changed");
                e.http.keep_clusters(routes.as_deref());
                e.routes.store(Arc::new(routes));
            }
            if **e.backends.load() != backends {
                info!(%service, port, %protocol, backends = ?backends.iter().map(|s| s.as_str()).collect::<Vec<_>>(), "import re-routed");
                e.backends.store(Arc::new(backends.to_vec()));
            }
            return Ok(e.addr);
        }
        if map.len() >= self.max_listeners {
            // A fixed message, nothing formatted: with 100,000 imports past the budget
            // this is returned for each on every catalog apply (the caller logs it once).
            return Err(std::io::Error::new(
                std::io::ErrorKind::QuotaExceeded,
                "past the gateway's listener budget (half its open-file limit)",
            ));
        }
        let backends = Arc::new(ArcSwap::from_pointee(backends.to_vec()));
        let app_now = Arc::new(ArcSwap::from_pointee(app));
        let routes: Routes = Arc::new(ArcSwap::from_pointee(routes));
        let stop = self.drain.token().child_token();
        let http = Arc::new(crate::http::egress::HttpEgress::new(service, port));
        let eg = Egress {
            service: service.clone(),
            port,
            backends: backends.clone(),
            peers: self.peers.clone(),
            local_id: source.unwrap_or(&self.local_id).clone(),
            metrics: self.metrics.clone(),
            open_timeout: self.open_timeout,
            callers: self.callers.clone(),
            app: app_now.clone(),
            http: http.clone(),
            routes: routes.clone(),
            service_handles: Default::default(),
            targets: self.targets.clone(),
            http_idle: self.http_idle,
        };
        let addr = match protocol {
            Protocol::Tcp => {
                let listener = crate::bind_tcp(listen)?;
                let addr = listener.local_addr()?;
                let eg = Arc::new(eg);
                self.targets.set(service, port, Some(&eg));
                tokio::spawn(eg.serve(
                    listener,
                    stop.clone(),
                    self.drain.clone(),
                    self.clients.clone(),
                ));
                addr
            }
            Protocol::Udp => {
                let socket = crate::udp::bind_udp(listen)?;
                let addr = socket.local_addr()?;
                let udp = crate::udp::UdpEgress {
                    egress: Arc::new(eg),
                    idle_timeout: self.udp_idle_timeout,
                    dispatch: self.dispatch.clone(),
                };
                tokio::spawn(udp.serve(socket, stop.clone()));
                addr
            }
        };
        info!(%service, port, %protocol, app_protocol = %app, %addr, "import listening");
        map.insert(
            key,
            ImportEntry {
                backends,
                app: app_now,
                routes,
                http,
                addr,
                stop,
            },
        );
        Ok(addr)
    }

    /// Stops the listeners of imports not in `keep` (in-flight connections finish).
    pub fn retain(&self, keep: &BTreeSet<ImportKey>) {
        self.lock().retain(|key, e| {
            let kept = keep.contains(key);
            if !kept {
                self.stop(key, e);
            }
            kept
        });
    }

    /// Removes these imports (those not here are skipped): their listeners stop.
    pub fn remove(&self, keys: &[ImportKey]) {
        let mut map = self.lock();
        for key in keys {
            if let Some(e) = map.remove(key) {
                self.stop(key, &e);
            }
        }
    }

    /// Stops a removed import's listener.
    fn stop(&self, key: &ImportKey, e: &ImportEntry) {
        let (service, port, protocol) = key;
        info!(%service, port, %protocol, "import removed");
        if *protocol == Protocol::Tcp {
            self.targets.set(service, *port, None);
        }
        e.stop.cancel();
    }

    /// `service:port` (`service:port/udp` for UDP) and listen address of every import.
    /// `/debug/imports`: each listener with its backends in order, what it speaks, and
    /// its HTTP routes (the policy in force, the requests in flight against it, and the
    /// sites' shares under a locality `distribute` rule).
    pub fn debug(&self) -> serde_json::Value {
        let imports: Vec<serde_json::Value> = self
            .lock()
            .iter()
            .map(|((service, port, proto), e)| {
                let routes: Option<Arc<crate::http::egress::RouteTable>> =
                    e.routes.load().as_ref().clone();
                serde_json::json!({
                    "service": service.to_string(),
                    "port": port,
                    "protocol": proto,
                    "listen": e.addr.to_string(),
                    "app_protocol": **e.app.load(),
                    "backends": e.backends.load().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "http_policy": routes.as_ref().map(|t| &t.compiled.policy),
                    "http_in_flight": routes.as_ref().map(|t| t.in_flight.load(std::sync::atomic::Ordering::Relaxed)),
                    "site_shares": routes.as_ref().filter(|t| !t.site_weights.is_empty()).map(|t| &t.site_weights),
                    "subset_sites": routes.as_ref().filter(|t| !t.subset_orders.is_empty()).map(|t| {
                        t.subset_orders
                            .iter()
                            .map(|(name, o)| (name.clone(), serde_json::json!({"sites": o.sites, "shares": o.weights})))
                            .collect::<serde_json::Map<_, _>>()
                    }),
                })
            })
            .collect();
        imports.into()
    }

    /// `/debug/probe` (for `meshfed diagnose`): one real open of `service:port` at
    /// `site`, over the live peer link and with the gateway's own identity as caller,
    /// exactly as a client's open goes; the stream closes at once (the far gateway's
    /// endpoint sees a connection that ends). The answer: `accepted`, or the typed
    /// refusal with its code and message. Not counted in the traffic metrics. Only an
    /// import of this gateway is probed (`None` otherwise): the admin port reaches no
    /// further than the import listeners do.
    pub async fn probe(
        &self,
        service: ServiceName,
        port: u16,
        site: SiteName,
    ) -> Option<serde_json::Value> {
        if !self
            .lock()
            .contains_key(&(service.clone(), port, Protocol::Tcp))
        {
            return None;
        }
        let started = std::time::Instant::now();
        let Some(peer) = self.peers.get(&site) else {
            return Some(serde_json::json!({
                "site": site.to_string(),
                "result": "refused",
                "reason": Refusal::PeerUnavailable.as_str(),
                "message": format!("site {site} is not a peer of this gateway"),
            }));
        };
        let eg = Egress {
            service: service.clone(),
            port,
            backends: Arc::new(ArcSwap::from_pointee(vec![site.clone()])),
            peers: self.peers.clone(),
            local_id: self.local_id.clone(),
            metrics: Metrics::default(),
            open_timeout: self.open_timeout,
            callers: Callers::Declared,
            app: Arc::new(ArcSwap::from_pointee(AppProtocol::Tcp)),
            http: Arc::new(crate::http::egress::HttpEgress::new(&service, port)),
            routes: Arc::new(ArcSwap::from_pointee(None)),
            service_handles: Default::default(),
            targets: Targets::default(),
            http_idle: self.http_idle,
        };
        let open = eg.open_request(None);
        let wait = Duration::from_secs(2);
        let r = eg.open_stream(&peer, &open, wait, self.open_timeout).await;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        Some(match r {
            Ok(stream) => {
                let transport = match &stream {
                    Stream::Quic(..) => "quic",
                    Stream::H2(..) => "h2",
                };
                drop(stream);
                serde_json::json!({
                    "site": site.to_string(), "result": "accepted",
                    "transport": transport, "open_ms": ms,
                })
            }
            Err((reason, message)) => serde_json::json!({
                "site": site.to_string(), "result": "refused",
                "reason": reason.as_str(), "message": message, "open_ms": ms,
            }),
        })
    }

    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        self.lock()
            .iter()
            .map(|((s, p, proto), e)| match proto {
                Protocol::Tcp => (format!("{s}:{p}"), e.addr),
                Protocol::Udp => (format!("{s}:{p}/udp"), e.addr),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_candidate_gets_the_full_waits() {
        let t = Duration::from_secs(7);
        // (candidate, of, open timeout, connection wait, answer wait)
        let rows = [
            (0, 1, t, PEER_WAIT, t),
            (0, 3, t, FAILOVER_WAIT, t - FAILOVER_ANSWER_CUT),
            (1, 3, t, FAILOVER_WAIT, t - FAILOVER_ANSWER_CUT),
            (2, 3, t, PEER_WAIT, t),
            // A short open timeout never cuts a failover answer below the connection wait.
            (
                0,
                2,
                Duration::from_millis(500),
                FAILOVER_WAIT,
                FAILOVER_WAIT,
            ),
            (
                1,
                2,
                Duration::from_millis(500),
                PEER_WAIT,
                Duration::from_millis(500),
            ),
        ];
        for (i, n, open, connection, answer) in rows {
            assert_eq!(
                budget(i, n, open),
                Budget { connection, answer },
                "candidate {i} of {n}, open timeout {open:?}"
            );
        }
    }

    #[test]
    fn refusals_move_on_unless_no_site_would_answer_otherwise() {
        use Refusal::*;
        let rows = [
            (NoReadyEndpoint, 0, 2, Next::TryNextSite),
            (PeerUnavailable, 0, 2, Next::TryNextSite),
            (NotExportedToPeer, 0, 3, Next::TryNextSite),
            (UnknownService, 0, 2, Next::TryNextSite),
            (FlowLimit, 0, 2, Next::TryNextSite),
            (Draining, 1, 3, Next::TryNextSite),
            (EndpointConnectFailed, 1, 2, Next::LastSite),
            (NoReadyEndpoint, 0, 1, Next::LastSite),
            (MalformedHeader, 0, 3, Next::GiveUp),
            (HeaderTooLarge, 0, 3, Next::GiveUp),
            (HeaderTooLarge, 2, 3, Next::GiveUp),
        ];
        for (reason, i, n, want) in rows {
            assert_eq!(after_refusal(reason, i, n), want, "{reason} at {i} of {n}");
        }
    }
}
