//! The ingress half of the HTTP path. An accepted stream for an HTTP-family port carries
//! HTTP (h2 from a meshfed egress, or whatever the client spoke when the egress carried
//! bytes: hyper detects HTTP/1.1 or h2 prior knowledge). A stream lives as long as the
//! egress's link, so the open decision is made again for each request ([`Admission`]:
//! when the exports or policies changed), and a withdrawn endpoint, a new one or a new
//! policy takes effect on open links. Each request goes to one of the
//! export's endpoints, round-robin, among those whose labels hold the subset the egress
//! named (`meshfed-subset`; 503 `no_ready_endpoint` when none does; by the affinity
//! hash the egress sent, `meshfed-hash`, instead of in turn), skipping endpoints
//! the service's `outlierDetection` ejected after consecutive errors, per endpoint, never
//! all of them, within the service's `connectionPool` (at most `maxConnections`
//! HTTP/1.1 requests at once, a bounded number waiting, 503 `overflow` past it), over
//! connections pooled per endpoint, each closed after `maxRequestsPerConnection`
//! requests, or once idle for `idleTimeout` (90 s without), with keepalive probes under
//! its `tcpKeepalive`, when the service sets them
//! (HTTP/1.1 for
//! `http`, h2 for `http2` and `grpc`; either with the TLS the service's
//! DestinationRule originates, if any), with the caller's identity set in
//! `x-forwarded-client-cert` (any the client sent is replaced) and the client's address
//! appended to `x-forwarded-for`. When no connection to the endpoint can be made
//! (within the service's `connectTimeout`, else the gateway's `connect_timeout`), the
//! answer is `503` with `meshfed-error: endpoint_connect_failed`, which tells the egress
//! that nothing was sent, so it may try another site even for a POST; a request lost
//! after it was sent is `502` with `meshfed-error: endpoint_reset`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_catalog::ServiceName;
use meshfed_catalog::catalog::AppProtocol;
use meshfed_catalog::http_route::{
    ConnectionPool, Outlier, SELECTOR_HEADER, SUBSET_NAME_HEADER, TcpKeepalive, endpoint_selector,
    parse_selector, selected, subset_at_site,
};
use meshfed_catalog::legacy::TlsOrigination;
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::decide::Outliers;
use super::{Body, error_response, headers};
use crate::metrics::Metrics;
use crate::wire::{Open, Refusal};

/// Pooled connections toward endpoints, shared by every stream: HTTP/1.1 through
/// hyper's pool (keyed by the endpoint in the URI; the client's authority stays in
/// `Host`), h2 one multiplexed connection per endpoint (so `:authority` stays the
/// client's).
pub struct Upstream {
    h1: Client<Counting, Body>,
    /// HTTP/1.1 pools whose idle connections close sooner or later than [`IDLE`] (a
    /// service's `idleTimeout`), or that dial within another time than the gateway's
    /// (its `connectTimeout`), or that originate TLS, by those settings, each with when
    /// it was last used (ms since `start`); at most [`H1_POOLS`] of them.
    h1_idle: std::sync::Mutex<HashMap<H1Pool, (H1Client, u64)>>,
    connector: Counting,
    /// TLS origination clients (a service's DestinationRule `tls`), built on first use,
    /// for the HTTP/1.1 pools that originate TLS and the bytes path alike.
    pub(crate) tls_clients: Arc<crate::origination::Clients>,
    /// Per endpoint, its h2 connection and the requests given to it so far.
    h2: std::sync::Mutex<HashMap<H2Key, H2Conn>>,
    /// Held only while a new h2 connection is dialed: requests on open connections never
    /// wait for it.
    h2_dial: tokio::sync::Mutex<()>,
    connect_timeout: Duration,
    next: AtomicUsize,
    /// Endpoints' consecutive errors and ejections (a service's `outlierDetection`), by
    /// service, port and subset (`""`: the service's own policy), as Envoy keeps them
    /// per cluster: one service's ejections never count against another's
    /// `maxEjectionPercent`, nor eject an endpoint it shares with another.
    outliers: std::sync::Mutex<Clusters<Outliers<SocketAddr>>>,
    /// Per (service, port) with a `connectionPool`: its HTTP/1.1 connections in use and
    /// the requests waiting for one.
    /// By service, port and subset (`""`: the service's own pool).
    gates: std::sync::Mutex<Clusters<Arc<Gate>>>,
    start: std::time::Instant,
    /// Cuts of clients' streams for premature resets, warned about at most every 10 s.
    premature_warned: super::WarnEvery,
    metrics: Metrics,
}

/// State kept per cluster, as Envoy keeps it: by service, port and subset name (`""`:
/// the service's own). Looked up by reference, so a request allocates nothing once its
/// entry exists.
struct Clusters<T>(HashMap<ServiceName, HashMap<u16, HashMap<String, T>>>);

impl<T> Default for Clusters<T> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<T> Clusters<T> {
    fn get(&self, open: &Open, subset: &str) -> Option<&T> {
        self.0.get(&open.service)?.get(&open.port)?.get(subset)
    }

    fn get_mut(&mut self, open: &Open, subset: &str) -> Option<&mut T> {
        self.0
            .get_mut(&open.service)?
            .get_mut(&open.port)?
            .get_mut(subset)
    }

    /// Keeps the clusters `keep` holds (service, port, subset name), drops the others
    /// and the services and ports left with none.
    fn retain(&mut self, mut keep: impl FnMut(&ServiceName, u16, &str) -> bool) {
        self.0.retain(|service, ports| {
            ports.retain(|port, subsets| {
                subsets.retain(|subset, _| keep(service, *port, subset));
                !subsets.is_empty()
            });
            !ports.is_empty()
        });
    }

    fn len(&self) -> usize {
        self.0
            .values()
            .flat_map(|ports| ports.values())
            .map(HashMap::len)
            .sum()
    }

    fn insert(&mut self, open: &Open, subset: &str, v: T) {
        self.0
            .entry(open.service.clone())
            .or_default()
            .entry(open.port)
            .or_default()
            .insert(subset.to_owned(), v);
    }
}

/// An endpoint's h2 connection and the requests given to it so far.
struct H2Conn {
    send: SendRequest<Body>,
    /// Requests given to it so far (`maxRequestsPerConnection`).
    given: AtomicU32,
    /// Requests whose answer is not over yet, and when the last one ended, for
    /// `idleTimeout`.
    activity: super::Activity,
}

/// An h2 connection's endpoint, and the TLS originated on it.
type H2Key = (SocketAddr, Option<Arc<TlsOrigination>>);

/// An HTTP/1.1 client and its pool.
type H1Client = Client<Counting, Body>;

/// What an HTTP/1.1 pool of its own is kept for: its idle timeout, connect timeout,
/// keepalive and the TLS it originates.
type H1Pool = (
    Duration,
    Duration,
    Option<TcpKeepalive>,
    Option<Arc<TlsOrigination>>,
);

/// How long an idle endpoint connection stays open without an `idleTimeout`.
pub const IDLE: Duration = Duration::from_secs(90);
/// The most HTTP/1.1 pools kept for settings of their own at once. A pool unused for
/// longer than its idle timeout holds no connection and makes room for another.
const H1_POOLS: usize = 256;

/// A service's limits on each endpoint connection (a DestinationRule's
/// `connectionPool.http`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnLimits {
    /// `maxRequestsPerConnection`.
    pub per_conn: Option<u32>,
    /// `idleTimeout`.
    pub idle: Option<Duration>,
    /// `tcp.connectTimeout` (`None`: the gateway's `connect_timeout`).
    pub connect: Option<Duration>,
    /// `tcp.tcpKeepalive` (`None`: no keepalive probes).
    pub keepalive: Option<TcpKeepalive>,
}

/// Turns on keepalive probes on `tcp` as `k` says (an unset field is the kernel's).
pub(crate) fn set_keepalive(tcp: &TcpStream, k: &TcpKeepalive) -> std::io::Result<()> {
    socket2::SockRef::from(tcp).set_tcp_keepalive(&socket_keepalive(k))
}

/// A keepalive time as the kernel takes it: whole seconds, at least 1.
fn keepalive_secs(ms: u64) -> Duration {
    Duration::from_secs((ms / 1000).max(1))
}

fn socket_keepalive(k: &TcpKeepalive) -> socket2::TcpKeepalive {
    let mut out = socket2::TcpKeepalive::new();
    if let Some(t) = k.time_ms {
        out = out.with_time(keepalive_secs(t));
    }
    if let Some(i) = k.interval_ms {
        out = out.with_interval(keepalive_secs(i));
    }
    if let Some(n) = k.probes {
        out = out.with_retries(n);
    }
    out
}

/// The requests a pooled HTTP/1.1 connection has carried: its `extra`, which the pool
/// sets on each of its answers (for `maxRequestsPerConnection`).
#[derive(Clone)]
struct Carried(Arc<AtomicU32>);

/// hyper's connector, whose connections count the requests they carry ([`Carried`]),
/// and speak TLS to the endpoint when the service originates it (within the connect
/// timeout), with the setting's client as it is when each connection is made (so a
/// rotated CA or client certificate is used by the pool's next connection).
#[derive(Clone)]
struct Counting(HttpConnector, Option<Originating>);

/// A TLS setting for a pool's connections, and the connect timeout its handshake
/// counts toward.
#[derive(Clone)]
struct Originating {
    clients: Arc<crate::origination::Clients>,
    tls: Arc<TlsOrigination>,
    within: Duration,
}

/// A connection [`Counting`] made.
struct CountedIo {
    io: TokioIo<Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>>,
    carried: Carried,
}

impl tower::Service<http::Uri> for Counting {
    type Response = CountedIo;
    type Error = super::BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<CountedIo, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        let tls = self.1.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let io = match tls {
                None => Either::Left(tcp),
                Some(o) => Either::Right(
                    crate::origination::handshake(o.clients.get(&o.tls, false)?, tcp, o.within)
                        .await
                        .map_err(|e| format!("TLS to the endpoint: {e}"))?,
                ),
            };
            Ok(CountedIo {
                io: TokioIo::new(io),
                carried: Carried(Arc::new(AtomicU32::new(0))),
            })
        })
    }
}

impl hyper::rt::Read for CountedIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for CountedIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl hyper_util::client::legacy::connect::Connection for CountedIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let tcp = match self.io.inner() {
            Either::Left(tcp) => tcp,
            Either::Right(tls) => tls.get_ref().0,
        };
        tcp.connected().extra(self.carried.clone())
    }
}

/// Whether a connection that has now carried `carried` requests is done under
/// `maxRequestsPerConnection` (`max`; `None`: never). Pure.
pub fn connection_spent(carried: u32, max: Option<u32>) -> bool {
    max.is_some_and(|m| carried >= m)
}

/// A service's `connectionPool` at this gateway: `max_connections` slots (one per
/// HTTP/1.1 request in flight, held until its answer's body ends) and a bounded number
/// of requests waiting for one.
struct Gate {
    limits: ConnectionPool,
    slots: Arc<tokio::sync::Semaphore>,
    waiting: AtomicU32,
}

/// A request waiting for a slot, counted until it has one or gives up.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a request that finds every connection in use may wait, with `waiting`
/// others already waiting (Envoy's `max_pending_requests`). Pure.
pub fn may_wait(waiting: u32, limits: &ConnectionPool) -> bool {
    waiting < limits.max_pending
}

impl Gate {
    /// A slot now, one after waiting, or `None`: as many wait as may (503 `overflow`).
    async fn enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        if !may_wait(before, &self.limits) {
            return None;
        }
        self.slots.clone().acquire_owned().await.ok()
    }
}

/// Why a request did not reach an endpoint's answer.
enum UpstreamError {
    /// Nothing was sent.
    Connect(String),
    /// Sent, then lost.
    Lost(String),
}

impl Upstream {
    pub fn new(connect_timeout: Duration, metrics: Metrics) -> Arc<Self> {
        let mut c = HttpConnector::new();
        c.set_connect_timeout(Some(connect_timeout));
        c.set_nodelay(true);
        let connector = Counting(c, None);
        // The timer makes the pool close idle connections (without one, hyper only
        // checks them when it hands one out).
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector.clone());
        Arc::new(Self {
            h1,
            h1_idle: Default::default(),
            connector,
            tls_clients: Default::default(),
            h2: Default::default(),
            h2_dial: Default::default(),
            connect_timeout,
            next: AtomicUsize::new(0),
            outliers: Default::default(),
            gates: Default::default(),
            start: std::time::Instant::now(),
            premature_warned: super::WarnEvery::new(10),
            metrics,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Drops what is kept for clusters no export serves any more (a withdrawn service
    /// or port, a subset its policy no longer has): their endpoints' ejections and
    /// their connection pools' gates; and the h2 connections to endpoints no export
    /// lists with that TLS setting (a DestinationRule's `tls` changed: the connections
    /// under the old one are not used again), or that ended (dropping the last handle
    /// closes one once its streams end); and the HTTP/1.1 pools and TLS clients of TLS
    /// settings no export has any more.
    /// Call after the exports changed; returns how many entries went.
    pub fn retain_exported(
        &self,
        exports: &std::collections::BTreeMap<ServiceName, crate::config::Export>,
    ) -> usize {
        let keep = |service: &ServiceName, port: u16, subset: &str| {
            exports.get(service).is_some_and(|e| {
                e.ports.contains_key(&port)
                    && (subset.is_empty()
                        || e.http_policy
                            .as_ref()
                            .is_some_and(|p| p.subsets.iter().any(|s| s.name == subset)))
            })
        };
        let mut gone = 0;
        {
            let mut o = self.outliers.lock().unwrap_or_else(|e| e.into_inner());
            let before = o.len();
            o.retain(keep);
            gone += before - o.len();
        }
        {
            let mut g = self.gates.lock().unwrap_or_else(|e| e.into_inner());
            let before = g.len();
            g.retain(keep);
            gone += before - g.len();
        }
        let listed: std::collections::HashSet<(&SocketAddr, Option<&TlsOrigination>)> = exports
            .values()
            .flat_map(|e| {
                e.ports
                    .values()
                    .flatten()
                    .map(move |ep| (ep, e.tls.as_ref()))
            })
            .collect();
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        let before = h2.len();
        h2.retain(|(ep, tls), c| listed.contains(&(ep, tls.as_deref())) && !c.send.is_closed());
        gone += before - h2.len();
        drop(h2);
        // TLS settings no export has any more: their HTTP/1.1 pools and clients.
        let settings: std::collections::HashSet<&TlsOrigination> =
            exports.values().filter_map(|e| e.tls.as_ref()).collect();
        let mut pools = self.h1_idle.lock().unwrap_or_else(|e| e.into_inner());
        let before = pools.len();
        pools.retain(|(.., tls), _| tls.as_deref().is_none_or(|t| settings.contains(t)));
        gone += before - pools.len();
        drop(pools);
        gone + self.tls_clients.retain(|t| settings.contains(t))
    }

    /// Entries kept now: clusters with ejection state, gates, h2 connections.
    #[cfg(test)]
    fn kept(&self) -> (usize, usize, usize) {
        let o = self
            .outliers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        let g = self.gates.lock().unwrap_or_else(|e| e.into_inner()).len();
        let h = self.h2.lock().unwrap_or_else(|e| e.into_inner()).len();
        (o, g, h)
    }

    /// The gate of `open`'s service and port under `limits` (a new one when the limits
    /// changed; requests holding the old one's slots finish on it); `subset`: the
    /// name of a subset with a policy of its own, `""` for the service's.
    fn gate(&self, open: &Open, subset: &str, limits: ConnectionPool) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = gates.get(open, subset).filter(|g| g.limits == limits) {
            return g.clone();
        }
        let g = Arc::new(Gate {
            limits,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_connections as usize)),
            waiting: AtomicU32::new(0),
        });
        gates.insert(open, subset, g.clone());
        g
    }

    /// A connection slot of `open`'s TCP port (of its `subset` with a policy of its own,
    /// `""`: the service's) under `limits` (`tcp.maxConnections`), held while the
    /// tunnelled connection lives; `None` when all are taken: a TCP connection never
    /// waits (Envoy's TCP proxy does not queue either).
    pub fn tcp_slot(
        &self,
        open: &Open,
        subset: &str,
        limits: ConnectionPool,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.gate(open, subset, limits)
            .slots
            .clone()
            .try_acquire_owned()
            .ok()
    }

    /// Forwards under the service's `connectionPool` (HTTP/1.1 endpoints only): the
    /// slot is held until the answer's body ends; past the waiting bound, 503
    /// `overflow` at once, which tells the egress nothing was sent.
    async fn forward_pooled(
        &self,
        req: Request<Incoming>,
        endpoints: Hosts<'_>,
        (app, tls): (AppProtocol, Option<&Arc<TlsOrigination>>),
        open: &Open,
        (subset, to): (&str, &EndpointPolicy),
    ) -> Response<Body> {
        let pool = to.pool.filter(|_| app == AppProtocol::Http);
        let Some(limits) = pool else {
            return self
                .forward(req, endpoints, (app, tls), open, (subset, to))
                .await;
        };
        let Some(slot) = self.gate(open, subset, limits).enter().await else {
            self.metrics.http_overflow("ingress");
            self.metrics.http_request("ingress", 503);
            let msg = format!(
                "{}:{}: {} connections to its endpoints in use and {} requests waiting (its connectionPool)",
                open.service, open.port, limits.max_connections, limits.max_pending
            );
            debug!(%msg, "HTTP request overflowed");
            return error_response(503, super::egress::OVERFLOW, &msg);
        };
        let (parts, body) = self
            .forward(req, endpoints, (app, tls), open, (subset, to))
            .await
            .into_parts();
        let body = body
            .map_frame(move |f| {
                let _held = &slot;
                f
            })
            .boxed();
        Response::from_parts(parts, body)
    }

    /// The next endpoint in turn that is not ejected in `cluster` (the request's
    /// service, port and subset, when it has outlier detection; all of them when every
    /// one is); with an affinity `hash`, the hash's endpoint among those not ejected.
    fn pick(
        &self,
        endpoints: &[SocketAddr],
        cluster: Option<(&Open, &str)>,
        hash: Option<u64>,
    ) -> SocketAddr {
        let now = self.now_ms();
        let all = cluster.map(|_| self.outliers.lock().unwrap_or_else(|e| e.into_inner()));
        let o = all
            .as_ref()
            .zip(cluster)
            .and_then(|(all, (open, subset))| all.get(open, subset));
        let usable = |ep: &SocketAddr| o.is_none_or(|o| !o.is_ejected(ep, now));
        if let Some(h) = hash {
            let name = meshfed_catalog::affinity::addr_hash;
            return endpoints[meshfed_catalog::affinity::pick(endpoints, h, name, usable)];
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if o.is_some() {
            for k in 0..endpoints.len() {
                let ep = endpoints[(n + k) % endpoints.len()];
                if usable(&ep) {
                    return ep;
                }
            }
        }
        endpoints[n % endpoints.len()]
    }

    /// Counts an answer (or its absence) from `ep` toward its ejection in the request's
    /// service, port and `subset`.
    fn observe(
        &self,
        cfg: &Outlier,
        ep: SocketAddr,
        outcome: super::decide::Outcome,
        endpoints: &[SocketAddr],
        (open, subset): (&Open, &str),
    ) {
        let mut all = self.outliers.lock().unwrap_or_else(|e| e.into_inner());
        // Keys are copied only the first time.
        if all.get(open, subset).is_none() {
            all.insert(open, subset, Outliers::default());
        }
        let ejected = all
            .get_mut(open, subset)
            .is_some_and(|o| o.observe(cfg, &ep, outcome, endpoints, self.now_ms()));
        drop(all);
        if ejected {
            self.metrics.http_ejection();
            tracing::warn!(service = %open.service, port = open.port, endpoint = %ep, ?outcome, "endpoint ejected after consecutive errors (outlierDetection)");
        }
    }

    /// The HTTP/1.1 pool whose idle connections close after `idle`, which dials within
    /// `connect`, sets `keepalive` on its connections and originates `tls` (its own pool
    /// for each distinct setting, at most [`H1_POOLS`] at once; past that the default
    /// one, or for TLS a client of its own that pools nothing). Errs when the TLS
    /// setting's files cannot be read.
    fn h1_for(&self, key: H1Pool) -> Result<Client<Counting, Body>, String> {
        let now = self.now_ms();
        let mut pools = self.h1_idle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, used)) = pools.get_mut(&key) {
            *used = now;
            return Ok(c.clone());
        }
        if pools.len() >= H1_POOLS {
            // Those whose connections have all closed idle (requests still in flight
            // on one keep their connection: it closes once they end).
            pools.retain(|(idle, ..), (_, used)| {
                now.saturating_sub(*used) <= u64::try_from(idle.as_millis()).unwrap_or(u64::MAX)
            });
        }
        let full = pools.len() >= H1_POOLS;
        if full && key.3.is_none() {
            return Ok(self.h1.clone());
        }
        let (idle, connect, keepalive, tls) = key.clone();
        let tls = match tls {
            Some(tls) => {
                // Refused here when its files cannot be read, not at each connection.
                self.tls_clients.get(&tls, false)?;
                Some(Originating {
                    clients: self.tls_clients.clone(),
                    tls,
                    within: connect,
                })
            }
            None => None,
        };
        let connector = if connect == self.connect_timeout && keepalive.is_none() && tls.is_none() {
            self.connector.clone()
        } else {
            let mut c = HttpConnector::new();
            c.set_connect_timeout(Some(connect));
            c.set_nodelay(true);
            if let Some(k) = keepalive {
                // The kernel's 2 h when the rule sets no time: hyper turns keepalive on
                // with a time only.
                c.set_keepalive(Some(
                    k.time_ms.map_or(Duration::from_secs(7200), keepalive_secs),
                ));
                c.set_keepalive_interval(k.interval_ms.map(keepalive_secs));
                c.set_keepalive_retries(k.probes);
            }
            Counting(c, tls)
        };
        let c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        if !full {
            pools.insert(key, (c.clone(), now));
        }
        Ok(c)
    }

    /// The h2 connection to `ep` for one request, dialed when there is none or it ended,
    /// and the request's [`Busy`] mark on it. A connection given its `per_conn`th request
    /// (`maxRequestsPerConnection`) is taken out of the pool: it finishes its streams and
    /// closes, and the next request dials. One dialed under an `idle` timeout closes
    /// once it has carried no request for that long. With `tls`, the connection speaks
    /// TLS (ALPN `h2`) as the service's DestinationRule says, set up within the connect
    /// timeout.
    async fn h2_to(
        &self,
        ep: SocketAddr,
        tls: Option<&Arc<TlsOrigination>>,
        limits: ConnLimits,
    ) -> Result<(SendRequest<Body>, super::Busy), String> {
        let key: H2Key = (ep, tls.cloned());
        let live = || {
            let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            let c = h2.get(&key).filter(|c| !c.send.is_closed())?;
            let taken = (c.send.clone(), c.activity.mark());
            let n = c.given.fetch_add(1, Ordering::Relaxed) + 1;
            if connection_spent(n, limits.per_conn) {
                h2.remove(&key);
            }
            Some(taken)
        };
        if let Some(s) = live() {
            return Ok(s);
        }
        let _dialing = self.h2_dial.lock().await;
        if let Some(s) = live() {
            return Ok(s);
        }
        let within = limits.connect.unwrap_or(self.connect_timeout);
        let tcp = tokio::time::timeout(within, TcpStream::connect(ep))
            .await
            .map_err(|_| format!("no connection within {within:?}"))?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        if let Some(k) = &limits.keepalive
            && let Err(e) = set_keepalive(&tcp, k)
        {
            debug!(error = %e, %ep, "keepalive on the endpoint connection");
        }
        let io = match tls {
            None => Either::Left(tcp),
            Some(t) => Either::Right(
                crate::origination::handshake(self.tls_clients.get(t, true)?, tcp, within)
                    .await
                    .map_err(|e| format!("TLS to the endpoint: {e}"))?,
            ),
        };
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .adaptive_window(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        let c = H2Conn {
            send: send.clone(),
            given: AtomicU32::new(1),
            activity: super::Activity::new(),
        };
        let taken = (send, c.activity.mark());
        let activity = c.activity.clone();
        let idle = limits.idle;
        tokio::spawn(async move {
            let Some(idle) = idle else {
                if let Err(e) = conn.await {
                    debug!(error = %e, %ep, "h2 connection to the endpoint ended");
                }
                return;
            };
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        debug!(error = %e, %ep, "h2 connection to the endpoint ended");
                    }
                }
                // Dropping the connection closes it; the pool sees it closed.
                _ = activity.idle_for(idle) => {
                    debug!(%ep, ?idle, "h2 connection to the endpoint idle: closed");
                }
            }
        });
        if !connection_spent(1, limits.per_conn) {
            self.h2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, c);
        }
        Ok(taken)
    }

    /// One request to `ep`, on a pooled connection within the service's `limits`.
    async fn send(
        &self,
        mut req: Request<Body>,
        ep: SocketAddr,
        (app, tls): (AppProtocol, Option<&Arc<TlsOrigination>>),
        limits: ConnLimits,
    ) -> Result<Response<Body>, UpstreamError> {
        let per_conn = limits.per_conn;
        if app == AppProtocol::Http {
            let capture =
                per_conn.map(|_| hyper_util::client::legacy::connect::capture_connection(&mut req));
            // The default pool by reference: no client clone per request.
            let idle = limits.idle.unwrap_or(IDLE);
            let connect = limits.connect.unwrap_or(self.connect_timeout);
            let sent = if idle == IDLE
                && connect == self.connect_timeout
                && limits.keepalive.is_none()
                && tls.is_none()
            {
                self.h1.request(req)
            } else {
                self.h1_for((idle, connect, limits.keepalive, tls.cloned()))
                    .map_err(UpstreamError::Connect)?
                    .request(req)
            };
            let resp = sent.await.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect(format!("{e:?}"))
                } else {
                    UpstreamError::Lost(format!("{e:?}"))
                }
            })?;
            // An HTTP/1.1 connection carries one request at a time: the pool's count is
            // exact. A spent one is not reused, and closes once this answer is read.
            if let (Some(capture), Some(Carried(n))) = (capture, resp.extensions().get::<Carried>())
                && connection_spent(n.fetch_add(1, Ordering::Relaxed) + 1, per_conn)
                && let Some(c) = capture.connection_metadata().as_ref()
            {
                c.poison();
            }
            return Ok(resp.map(|b| b.map_err(super::boxed_err).boxed()));
        }
        let (mut send, busy) = self
            .h2_to(ep, tls, limits)
            .await
            .map_err(UpstreamError::Connect)?;
        send.ready()
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let resp = send.send_request(req).await.map_err(|e| {
            if e.is_canceled() {
                UpstreamError::Connect(e.to_string())
            } else {
                UpstreamError::Lost(e.to_string())
            }
        })?;
        // The connection is busy until the answer's body is over (a gRPC stream may
        // last long after its headers).
        Ok(resp.map(|b| {
            b.map_err(super::boxed_err)
                .map_frame(move |f| {
                    let _busy = &busy;
                    f
                })
                .boxed()
        }))
    }

    /// One request to the next endpoint in turn.
    async fn forward(
        &self,
        req: Request<Incoming>,
        Hosts { endpoints, cluster }: Hosts<'_>,
        (app, tls): (AppProtocol, Option<&Arc<TlsOrigination>>),
        open: &Open,
        (subset, to): (&str, &EndpointPolicy),
    ) -> Response<Body> {
        use tracing::Instrument;
        let outlier = to.outlier.as_ref();
        let hash = req
            .headers()
            .get(meshfed_catalog::affinity::HASH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(meshfed_catalog::affinity::parse_hash_header);
        let ep = self.pick(endpoints, outlier.map(|_| (open, subset)), hash);
        let span = tracing::trace_span!(
            target: "otel",
            "ingress http",
            otel.kind = "server",
            meshfed.site = %self.metrics.site,
            meshfed.direction = "ingress",
            meshfed.service = %open.service,
            meshfed.source = %open.source,
            http.request.method = %req.method(),
            url.path = %req.uri().path(),
            server.address = %ep,
            http.response.status_code = tracing::field::Empty,
        );
        super::trace::continue_from(&span, req.headers());
        let (mut parts, body) = req.into_parts();
        // A WebSocket handshake to an HTTP/1.1 endpoint keeps its upgrade headers (an
        // h2 endpoint gets a plain GET: h2 has no such upgrade).
        let websocket = app == AppProtocol::Http
            && headers::websocket_upgrade(&parts.method, parts.version, &parts.headers);
        headers::to_endpoint(&mut parts, ep, app, &open.source, open.client);
        if websocket {
            headers::keep_websocket_upgrade(&mut parts.headers);
        }
        // The endpoint continues this span.
        super::trace::inject(&span, &mut parts.headers);
        let answer = self
            .forward_traced(parts, body, ep, (app, tls), open, to.conn)
            .instrument(span.clone())
            .await;
        span.record("http.response.status_code", answer.status().as_u16());
        if let Some(cfg) = outlier {
            let outcome = match answer
                .headers()
                .get(super::ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                // This gateway's own answer: the endpoint never answered.
                Some(_) => super::decide::Outcome::Lost,
                None => super::decide::Outcome::Status(answer.status().as_u16()),
            };
            self.observe(cfg, ep, outcome, cluster, (open, subset));
        }
        answer
    }

    async fn forward_traced(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        ep: SocketAddr,
        app: (AppProtocol, Option<&Arc<TlsOrigination>>),
        open: &Open,
        limits: ConnLimits,
    ) -> Response<Body> {
        let req = Request::from_parts(parts, body.map_err(super::boxed_err).boxed());
        match self.send(req, ep, app, limits).await {
            Ok(resp) => {
                self.metrics.http_request("ingress", resp.status().as_u16());
                let (mut parts, body) = resp.into_parts();
                // The endpoint's hop-by-hop headers stop here (its `connection: close`
                // would close the stream an HTTP/1.1 answer goes back on), and only
                // this gateway speaks for the tunnel.
                headers::strip_hop_by_hop(&mut parts.headers);
                headers::strip_meshfed(&mut parts.headers);
                Response::from_parts(parts, body)
            }
            Err(e) => {
                // A connect error sent nothing: the egress may try another site.
                let (status, code, e) = match e {
                    UpstreamError::Connect(e) => (503, Refusal::EndpointConnectFailed.as_str(), e),
                    UpstreamError::Lost(e) => (502, super::ENDPOINT_RESET, e),
                };
                let msg = format!("{}:{} endpoint {ep}: {e}", open.service, open.port);
                debug!(%msg, code, "HTTP request to the endpoint failed");
                self.metrics.http_request("ingress", status);
                error_response(status, code, &msg)
            }
        }
    }
}

/// A request's subset selector, and the endpoints that hold it.
type Selected = (BTreeMap<String, String>, Vec<SocketAddr>);

/// The subset a request selects ([`SELECTOR_HEADER`], from the egress) and the
/// endpoints in it: `None` when it names none (every endpoint); an answer when the
/// header is malformed
/// (400 `malformed_header`) or no endpoint is in the subset (503 `no_ready_endpoint`,
/// which the egress may retry at another site: nothing was sent).
#[allow(clippy::result_large_err)]
fn in_subset(
    req: &Request<Incoming>,
    endpoints: &[SocketAddr],
    labels: &[BTreeMap<String, String>],
    open: &Open,
) -> Result<Option<Selected>, Response<Body>> {
    let Some(v) = req.headers().get(SELECTOR_HEADER) else {
        return Ok(None);
    };
    let selector = v
        .to_str()
        .map_err(|e| e.to_string())
        .and_then(parse_selector)
        .map_err(|e| {
            error_response(
                400,
                Refusal::MalformedHeader.as_str(),
                &format!("{SELECTOR_HEADER}: {e}"),
            )
        })?;
    let none = BTreeMap::new();
    let some: Vec<SocketAddr> = endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| selected(&selector, labels.get(*i).unwrap_or(&none)))
        .map(|(_, ep)| *ep)
        .collect();
    if some.is_empty() {
        return Err(error_response(
            503,
            Refusal::NoReadyEndpoint.as_str(),
            &format!(
                "no endpoint of {}:{} has the labels {}",
                open.service,
                open.port,
                v.to_str().unwrap_or_default()
            ),
        ));
    }
    Ok(Some((selector, some)))
}

/// The endpoints a request may go to, and the hosts of the cluster whose outlier
/// detection counts its answer (Envoy's clusters): a subset with a policy of its own is
/// a cluster of its endpoints; any other request, whatever subset it names, counts in
/// the service's cluster of all its endpoints, so one subset's requests never drop the
/// ejections of another subset's endpoints.
#[derive(Clone, Copy)]
struct Hosts<'a> {
    endpoints: &'a [SocketAddr],
    cluster: &'a [SocketAddr],
}

impl<'a> Hosts<'a> {
    /// For a request whose policy is the subset `key`'s (`""`: the service's), to
    /// `selected` of the service's `all` endpoints (`None`: no subset selector).
    fn of(key: &str, all: &'a [SocketAddr], selected: Option<&'a [SocketAddr]>) -> Self {
        let endpoints = selected.unwrap_or(all);
        let cluster = if key.is_empty() { all } else { endpoints };
        Self { endpoints, cluster }
    }
}

/// Where the requests of an accepted stream go, as the ingress decides it now.
pub struct Serving {
    pub endpoints: Vec<SocketAddr>,
    /// Each endpoint's labels, in `endpoints`' order (empty: none has labels).
    pub labels: Vec<BTreeMap<String, String>>,
    /// What applies toward the service's endpoints.
    pub policy: EndpointPolicy,
    /// Subsets with a `trafficPolicy` of their own (a request names its subset in
    /// [`SUBSET_NAME_HEADER`]).
    pub subsets: Vec<NamedPolicy>,
    /// TLS to the endpoints (the service's DestinationRule `tls`; HTTP/1.1 endpoints).
    pub tls: Option<Arc<TlsOrigination>>,
}

/// What the exporting gateway applies toward a service's endpoints, or a subset's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointPolicy {
    /// Outlier detection, applied per endpoint.
    pub outlier: Option<Outlier>,
    /// Connection limits toward HTTP/1.1 endpoints.
    pub pool: Option<ConnectionPool>,
    /// Each endpoint connection's limits (`maxRequestsPerConnection`, `idleTimeout`).
    pub conn: ConnLimits,
}

/// What the exporting gateway at `site` applies toward `policy`'s endpoints on `port`
/// (its port settings over its own blocks), and on an HTTP port (`http`) toward each
/// subset with a policy of its own that may have endpoints at the site. Pure.
pub fn endpoint_policies(
    policy: &meshfed_catalog::http_route::HttpPolicy,
    port: u16,
    http: bool,
    site: &meshfed_catalog::SiteName,
) -> (EndpointPolicy, Vec<NamedPolicy>) {
    let of = |t: meshfed_catalog::http_route::Traffic| EndpointPolicy {
        outlier: t.outlier,
        pool: t.pool.connection_pool,
        conn: ConnLimits {
            per_conn: t.pool.max_requests_per_connection,
            idle: t.pool.idle_timeout_ms.map(Duration::from_millis),
            connect: t.pool.connect_timeout_ms.map(Duration::from_millis),
            keepalive: t.pool.tcp_keepalive,
        },
    };
    let subsets = if http {
        policy
            .subsets
            .iter()
            .filter(|s| s.policy.is_some() && subset_at_site(s, site))
            .map(|s| NamedPolicy {
                name: s.name.clone(),
                selector: endpoint_selector(s),
                policy: of(policy.traffic(port, Some(s))),
            })
            .collect()
    } else {
        Vec::new()
    };
    (of(policy.traffic(port, None)), subsets)
}

/// A subset with a policy of its own, as the ingress applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedPolicy {
    pub name: String,
    /// What an open or a request for the subset selects endpoints by
    /// ([`endpoint_selector`]).
    pub selector: Option<BTreeMap<String, String>>,
    pub policy: EndpointPolicy,
}

impl NamedPolicy {
    /// Whether an open or a request that names subset `name` and selects by `selector`
    /// is this subset's: both must be what an egress sends for it. Pure.
    pub fn is(&self, name: &[u8], selector: Option<&BTreeMap<String, String>>) -> bool {
        self.name.as_bytes() == name && self.selector.as_ref() == selector
    }
}

impl Serving {
    /// The policy for a request naming subset `name` (its [`SUBSET_NAME_HEADER`]) and
    /// selecting by `selector` (its [`SELECTOR_HEADER`]), with the key of its
    /// connection pool: the subset's own when it has a policy and both are the
    /// subset's ([`NamedPolicy::is`]), else the service's (`""`). Pure.
    pub fn policy_for(
        &self,
        name: Option<&[u8]>,
        selector: Option<&BTreeMap<String, String>>,
    ) -> (&str, &EndpointPolicy) {
        match name {
            Some(v) if !self.subsets.is_empty() => self
                .subsets
                .iter()
                .find(|s| s.is(v, selector))
                .map_or(("", &self.policy), |s| (s.name.as_str(), &s.policy)),
            _ => ("", &self.policy),
        }
    }
}

/// The open decision, made again for each request of a stream: an HTTP stream from an
/// egress lives as long as its link, so the endpoints, the policies and the export
/// itself can change under it. Implementations decide again only when those changed.
pub trait Admission: Send + Sync + 'static {
    fn current(&self) -> Result<Arc<Serving>, (Refusal, String)>;
    /// A slot of the peer's share of this gateway's descriptors for a WebSocket, held
    /// while it lives (as a TCP stream holds one); `Err` when the share is taken.
    fn websocket_slot(&self) -> Result<Box<dyn Send>, (Refusal, String)>;
}

/// The status a refusal of a request is answered with (its code in `meshfed-error`).
pub(crate) fn refusal_status(r: Refusal) -> u16 {
    match r {
        Refusal::Denied | Refusal::NotExportedToPeer | Refusal::ForeignCaller => 403,
        Refusal::UnknownService => 404,
        _ => 503,
    }
}

/// Serves the HTTP carried by one accepted stream until either side ends it, or `stop`
/// (the drain), which lets requests in flight finish. Each request goes where
/// `admission` says at the time it arrives: an endpoint withdrawn after the stream
/// opened gets no more requests, a new one gets its share, and a caller a new policy
/// denies is answered 403. A stream that carries one client's connection as it came
/// (the egress treated the port as TCP: `open.client` is set) is cut, as at an HTTP
/// import, once the client resets most of its requests at once
/// ([`super::decide::too_many_premature_resets`]); an egress's link, which carries
/// many clients' requests, is not (the egress judges each client connection).
pub async fn serve<IO>(
    upstream: Arc<Upstream>,
    io: IO,
    open: Open,
    app: AppProtocol,
    admission: Arc<dyn Admission>,
    stop: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (open_client, service, source) = (open.client, open.service.clone(), open.source.clone());
    let open = Arc::new(open);
    let activity = open.client.map(|_| super::Activity::new());
    let watched = activity.clone();
    let up = upstream.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (upstream, open, admission) = (upstream.clone(), open.clone(), admission.clone());
        let busy = activity.as_ref().map(super::Activity::mark);
        async move {
            let method = req.method().clone();
            // A WebSocket handshake (on a stream of its own from an egress, or in a
            // client's bytes): its slot first, and the stream's side of the upgrade.
            let websocket = match headers::websocket_upgrade(&method, req.version(), req.headers())
            {
                false => None,
                true => match admission.websocket_slot() {
                    Ok(slot) => Some((slot, hyper::upgrade::on(&mut req))),
                    Err((reason, message)) => {
                        let status = refusal_status(reason);
                        upstream.metrics.http_request("ingress", status);
                        let answer = error_response(status, reason.as_str(), &message);
                        return Ok(super::Marked::answer(answer, &method, busy));
                    }
                },
            };
            let mut answer = match admission.current() {
                Err((reason, message)) => {
                    upstream
                        .metrics
                        .http_request("ingress", refusal_status(reason));
                    error_response(refusal_status(reason), reason.as_str(), &message)
                }
                Ok(to) => match in_subset(&req, &to.endpoints, &to.labels, &open) {
                    Ok(subset) => {
                        let (selector, some) = subset.unzip();
                        let policy = to.policy_for(
                            req.headers()
                                .get(SUBSET_NAME_HEADER)
                                .map(http::HeaderValue::as_bytes),
                            selector.as_ref(),
                        );
                        let hosts = Hosts::of(policy.0, &to.endpoints, some.as_deref());
                        upstream
                            .forward_pooled(req, hosts, (app, to.tls.as_ref()), &open, policy)
                            .await
                    }
                    Err(answer) => answer,
                },
            };
            if let Some((slot, stream_side)) = websocket {
                websocket_bytes(&mut answer, stream_side, slot);
            }
            Ok::<_, std::convert::Infallible>(super::Marked::answer(answer, &method, busy))
        }
    });
    // No idle timeout: the stream lives as long as its egress keeps it.
    let client = open_client;
    let ended = super::serve_connection(
        io,
        svc,
        stop,
        (watched.map(|a| (None, a)), false),
        "HTTP over the tunnel",
    )
    .await;
    if ended == super::Ended::PrematureResets {
        up.metrics.refused("ingress", "premature_resets");
        if up.premature_warned.due() {
            match client {
                Some(_) => tracing::warn!(service = %service, source = %source, client = ?client,
                    "client stream cut: its client reset its requests right after sending them (premature_resets, HTTP/2 rapid reset)"),
                // The egress judges each of its clients; only a burst of their cancels
                // larger than the link's bound, waiting on a slow accept, gets here.
                None => tracing::warn!(service = %service, source = %source,
                    bound = super::LINK_RESETS_PENDING_ACCEPT,
                    "HTTP link cut: more of its streams were reset before this gateway accepted them than h2 allows (premature_resets); every request on it failed"),
            }
        }
    }
}

/// After a WebSocket handshake's answer from the endpoint: a `101` gives the endpoint's
/// side of the upgrade, whose bytes are copied to and from the stream's on a task that
/// holds `slot` until either closes (the egress bounds its idle time). Any other
/// answer goes back as it is.
fn websocket_bytes(
    answer: &mut Response<Body>,
    stream_side: hyper::upgrade::OnUpgrade,
    slot: Box<dyn Send>,
) {
    // An h2 endpoint's 101 (h2 forbids one) or a pool that did not upgrade: a 502.
    let Some(endpoint_side) = super::take_upgrade(
        answer,
        "the endpoint answered 101 without an upgraded connection",
    ) else {
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        let (stream, endpoint) = match tokio::join!(stream_side, endpoint_side) {
            (Ok(s), Ok(e)) => (s, e),
            (s, e) => {
                let (s, e) = (s.err(), e.err());
                return debug!(stream = ?s, endpoint = ?e, "WebSocket upgrade failed");
            }
        };
        let ended =
            super::io::upgraded_bytes(TokioIo::new(stream), TokioIo::new(endpoint), None).await;
        debug!(?ended, "WebSocket ended");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subsets_own_policy_is_what_the_ingress_applies_to_its_requests() {
        use meshfed_catalog::http_route::{
            Destination, HttpPolicy, HttpRoute, PortPool, Subset, SubsetPolicy,
        };
        let pool = |n| ConnectionPool {
            max_connections: n,
            max_pending: 1,
        };
        let subset = |name: &str, policy| Subset {
            name: name.into(),
            labels: [("version".into(), name.into())].into(),
            policy,
        };
        let policy = HttpPolicy {
            subsets: vec![
                subset("v1", None),
                subset(
                    "v2",
                    Some(SubsetPolicy {
                        pool: Some(PortPool {
                            connection_pool: Some(pool(2)),
                            max_requests_per_connection: Some(10),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                ),
            ],
            idle_timeout_ms: Some(5_000),
            connect_timeout_ms: None,
            tcp_keepalive: None,
            connection_pool: Some(pool(50)),
            ..HttpPolicy::new(
                meshfed_catalog::ServiceName::parse("web.demo").unwrap(),
                "test".into(),
                vec![HttpRoute {
                    destinations: vec![Destination::all()],
                    ..Default::default()
                }],
            )
        };
        let here = meshfed_catalog::SiteName::new("west").unwrap();
        let (own, subsets) = endpoint_policies(&policy, 80, true, &here);
        assert_eq!(own.pool, Some(pool(50)));
        assert_eq!(own.conn.idle, Some(Duration::from_secs(5)));
        // Only v2 has a policy: its pool block replaces the service's (no idle timeout
        // inherited from it).
        assert_eq!(subsets.len(), 1);
        let v2 = &subsets[0];
        assert_eq!(
            (
                v2.name.as_str(),
                v2.policy.pool,
                v2.policy.conn.per_conn,
                v2.policy.conn.idle
            ),
            ("v2", Some(pool(2)), Some(10), None)
        );
        // A TCP port has no subsets.
        assert!(endpoint_policies(&policy, 80, false, &here).1.is_empty());
        // A subset pinned to another site (or cluster) has no policy here.
        for (key, site) in [
            (meshfed_catalog::http_route::SITE_LABEL, "north"),
            (meshfed_catalog::http_route::CLUSTER_LABEL, "north"),
            (meshfed_catalog::http_route::SITE_LABEL, "west"),
        ] {
            let mut pinned = policy.clone();
            pinned.subsets[1].labels.insert(key.into(), site.into());
            let found = endpoint_policies(&pinned, 80, true, &here).1;
            assert_eq!(found.len(), usize::from(site == "west"), "{key}={site}");
        }
        let serving = Serving {
            endpoints: vec![],
            labels: vec![],
            policy: own.clone(),
            subsets,
            tls: None,
        };
        let v2_labels: BTreeMap<String, String> = [("version".into(), "v2".into())].into();
        let v1_labels: BTreeMap<String, String> = [("version".into(), "v1".into())].into();
        // (request's subset name, its selector) → (pool key, pool)
        for (name, selector, want) in [
            (None, None, ("", Some(pool(50)))),
            (None, Some(&v2_labels), ("", Some(pool(50)))),
            (Some(&b"v2"[..]), Some(&v2_labels), ("v2", Some(pool(2)))),
            // v1 has no policy of its own; an unknown name is the service's.
            (Some(&b"v1"[..]), Some(&v1_labels), ("", Some(pool(50)))),
            (Some(&b"v3"[..]), None, ("", Some(pool(50)))),
            // v2's name with v1's endpoints, or with all of them: not v2's pool.
            (Some(&b"v2"[..]), Some(&v1_labels), ("", Some(pool(50)))),
            (Some(&b"v2"[..]), None, ("", Some(pool(50)))),
        ] {
            let (key, p) = serving.policy_for(name, selector);
            assert_eq!((key, p.pool), want, "{name:?} {selector:?}");
        }
    }

    /// Which hosts an answer's outlier detection counts over: the service's cluster
    /// (all its endpoints) for a request under the service's policy, even one that
    /// names a subset; the subset's endpoints for a subset with a policy of its own.
    #[test]
    fn an_answer_counts_in_its_clusters_hosts() {
        let all: Vec<SocketAddr> = (1..=4)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let v1 = &all[..2];
        for (key, selected, endpoints, cluster) in [
            ("", None, &all[..], &all[..]),
            ("", Some(v1), v1, &all[..]),
            ("v1", Some(v1), v1, v1),
            ("v1", None, &all[..], &all[..]),
        ] {
            let h = Hosts::of(key, &all, selected);
            assert_eq!(
                (h.endpoints, h.cluster),
                (endpoints, cluster),
                "{key:?} {selected:?}"
            );
        }
    }

    /// An upstream; an outlier setting that ejects at the first 5xx, at most half the
    /// endpoints; four endpoints; opens of a.demo:80, b.demo:80 and a.demo:81.
    fn ejecting() -> (Arc<Upstream>, Outlier, Vec<SocketAddr>, [Open; 3]) {
        let cfg = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection_ms: 60_000,
            max_ejection_percent: 50,
            interval_ms: None,
        };
        let eps: Vec<SocketAddr> = (1..=4)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let open = |service: &str, port| Open {
            service: service.parse().expect("a service name"),
            port,
            source: meshfed_identity::SpiffeId::new("spiffe://east.example.org/ns/a/sa/b")
                .expect("an ID"),
            flow: None,
            client: None,
            selector: None,
            subset: None,
        };
        let up = Upstream::new(Duration::from_secs(1), Metrics::default());
        let opens = [open("a.demo", 80), open("b.demo", 80), open("a.demo", 81)];
        (up, cfg, eps, opens)
    }

    /// Pools of their own are bounded, and one whose connections have all closed idle
    /// makes room for a new setting: a site with many settings over time still pools
    /// each one in use.
    #[tokio::test]
    async fn pools_of_their_own_are_bounded_and_idle_ones_make_room() {
        let up = Upstream::new(Duration::from_secs(1), Metrics::default());
        let key = |idle_ms: u64, connect_ms: u64| -> H1Pool {
            (
                Duration::from_millis(idle_ms),
                Duration::from_millis(connect_ms),
                None,
                None,
            )
        };
        let pooled = |k: &H1Pool| up.h1_idle.lock().unwrap().contains_key(k);
        // Full of pools idle after 1 ms.
        for i in 0..H1_POOLS as u64 {
            up.h1_for(key(1, 2000 + i)).unwrap();
        }
        assert_eq!(up.h1_idle.lock().unwrap().len(), H1_POOLS);
        std::thread::sleep(Duration::from_millis(20));
        // A new setting: the idle ones make room, and it has a pool of its own.
        let long = key(60_000, 1500);
        up.h1_for(long.clone()).unwrap();
        assert!(pooled(&long));
        assert_eq!(up.h1_idle.lock().unwrap().len(), 1);
        // Full of pools in use: one more setting is served (by the default pool), and
        // none in use is dropped for it.
        for i in 0..H1_POOLS as u64 - 1 {
            up.h1_for(key(60_000, 3000 + i)).unwrap();
        }
        let extra = key(60_000, 9999);
        up.h1_for(extra.clone()).unwrap();
        assert!(!pooled(&extra));
        assert!(pooled(&long));
        assert_eq!(up.h1_idle.lock().unwrap().len(), H1_POOLS);
    }

    /// Ejections are kept per service, port and subset: one service's failing endpoint
    /// is not ejected for another service that shares it, and one service's ejections do
    /// not use up another's `maxEjectionPercent`.
    #[test]
    fn ejections_are_kept_per_service_port_and_subset() {
        use super::super::decide::Outcome;
        let (up, cfg, eps, [a, b, a81]) = ejecting();
        let failed = Outcome::Status(503);
        // a.demo:80 ejects its first endpoint; 2 of 4 may be ejected at once.
        up.observe(&cfg, eps[0], failed, &eps, (&a, ""));
        let picks = |cluster: (&Open, &str)| -> std::collections::BTreeSet<SocketAddr> {
            (0..8).map(|_| up.pick(&eps, Some(cluster), None)).collect()
        };
        assert!(!picks((&a, "")).contains(&eps[0]), "ejected for a.demo:80");
        for (other, subset) in [(&b, ""), (&a81, ""), (&a, "canary")] {
            assert!(
                picks((other, subset)).contains(&eps[0]),
                "ejected for {}:{} {subset:?} too",
                other.service,
                other.port
            );
        }
        // b.demo's own cap: a.demo's ejection does not count against it.
        up.observe(&cfg, eps[1], failed, &eps, (&b, ""));
        up.observe(&cfg, eps[2], failed, &eps, (&b, ""));
        up.observe(&cfg, eps[3], failed, &eps, (&b, ""));
        let left = picks((&b, ""));
        assert_eq!(left.len(), 2, "b.demo ejects 2 of its 4: {left:?}");
        assert!(!left.contains(&eps[1]) && !left.contains(&eps[2]));
        // And a.demo can still eject its second (its cap, 2, not reached).
        up.observe(&cfg, eps[1], failed, &eps, (&a, ""));
        assert_eq!(
            picks((&a, "")),
            std::collections::BTreeSet::from([eps[2], eps[3]])
        );
    }

    /// What is kept per cluster goes with the cluster: a withdrawn service, a port no
    /// longer exported, a subset the policy dropped; what the exports still serve stays.
    #[test]
    fn cluster_state_goes_with_the_export_that_held_it() {
        use super::super::decide::Outcome;
        use meshfed_catalog::http_route::{HttpPolicy, Subset};
        let (up, cfg, eps, [a, b, a81]) = ejecting();
        let failed = Outcome::Status(503);
        let limits = ConnectionPool {
            max_connections: 1,
            max_pending: 1,
        };
        for (o, subset) in [(&a, ""), (&a, "v1"), (&a, "v2"), (&a81, ""), (&b, "")] {
            up.observe(&cfg, eps[0], failed, &eps, (o, subset));
            up.gate(o, subset, limits);
        }
        assert_eq!(up.kept(), (5, 5, 0));
        let export = |service: &str, ports: &[u16], subsets: &[&str]| {
            let service: ServiceName = service.parse().expect("a service name");
            let mut policy = HttpPolicy::new(service.clone(), "test".into(), Vec::new());
            policy.subsets = subsets
                .iter()
                .map(|n| Subset {
                    name: (*n).to_owned(),
                    labels: BTreeMap::from([("version".to_owned(), (*n).to_owned())]),
                    policy: None,
                })
                .collect();
            let e = crate::config::Export {
                service: service.clone(),
                ports: ports.iter().map(|p| (*p, eps.clone())).collect(),
                udp_ports: BTreeMap::new(),
                endpoint_labels: BTreeMap::new(),
                allowed_peers: None,
                hosts: Vec::new(),
                tls: None,
                port_names: BTreeMap::new(),
                app_protocols: BTreeMap::new(),
                http_policy: (!subsets.is_empty()).then_some(policy),
                identities: Vec::new(),
                proxy_protocol: false,
            };
            (service, e)
        };
        // a.demo keeps port 80 and subset v1; b.demo is withdrawn.
        let exports = BTreeMap::from([export("a.demo", &[80], &["v1"])]);
        assert_eq!(up.retain_exported(&exports), 6);
        assert_eq!(up.kept(), (2, 2, 0));
        let picks: std::collections::BTreeSet<SocketAddr> = (0..8)
            .map(|_| up.pick(&eps, Some((&a, "v1")), None))
            .collect();
        assert!(!picks.contains(&eps[0]), "v1's ejection stays: {picks:?}");
        // Nothing exported: nothing kept.
        assert_eq!(up.retain_exported(&BTreeMap::new()), 4);
        assert_eq!(up.kept(), (0, 0, 0));
    }

    /// A TLS setting no export has any more takes its HTTP/1.1 pool and its clients
    /// with it (a DestinationRule's `tls` changed, a service withdrawn).
    #[tokio::test]
    async fn tls_settings_go_with_the_exports_that_had_them() {
        let dir = std::env::temp_dir().join(format!("meshfed-tlsgo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let td = meshfed_identity::TrustDomain::new("ca.example").unwrap();
        let ca = meshfed_identity::ca::Ca::generate(&td, Duration::from_secs(3600)).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(
            &pem,
            meshfed_identity::ca::der_to_pem("CERTIFICATE", ca.cert()),
        )
        .unwrap();
        let tls = |sni: &str| {
            Arc::new(TlsOrigination {
                mode: meshfed_catalog::legacy::TlsMode::Simple,
                ca_certificates: pem.display().to_string(),
                sni: sni.into(),
                client_certificate: None,
                private_key: None,
            })
        };
        let (old, new) = (tls("old.example"), tls("new.example"));
        let up = Upstream::new(Duration::from_secs(1), Metrics::default());
        for t in [&old, &new] {
            up.h1_for((IDLE, Duration::from_secs(1), None, Some(t.clone())))
                .unwrap();
        }
        assert_eq!(up.tls_clients.settings(), 2);
        let service: ServiceName = "ledger.demo".parse().unwrap();
        let export = crate::config::Export {
            service: service.clone(),
            ports: BTreeMap::from([(443, vec!["127.0.0.1:9443".parse().unwrap()])]),
            udp_ports: BTreeMap::new(),
            endpoint_labels: BTreeMap::new(),
            allowed_peers: None,
            hosts: Vec::new(),
            tls: Some((*new).clone()),
            port_names: BTreeMap::new(),
            app_protocols: BTreeMap::new(),
            http_policy: None,
            identities: Vec::new(),
            proxy_protocol: false,
        };
        assert_eq!(up.retain_exported(&BTreeMap::from([(service, export)])), 2);
        assert_eq!(up.tls_clients.settings(), 1);
        let pools = up.h1_idle.lock().unwrap();
        assert_eq!(pools.len(), 1);
        assert!(pools.keys().all(|k| k.3.as_deref() == Some(&*new)));
        drop(pools);
        assert_eq!(up.retain_exported(&BTreeMap::new()), 2);
        assert_eq!(up.tls_clients.settings(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_connection_is_spent_at_its_request_limit() {
        for (carried, max, spent) in [
            (1, None, false),
            (u32::MAX, None, false),
            (1, Some(1), true),
            (1, Some(2), false),
            (2, Some(2), true),
            (3, Some(2), true),
        ] {
            assert_eq!(
                connection_spent(carried, max),
                spent,
                "{carried} of {max:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_gate_holds_its_connections_and_bounds_the_wait() {
        let limits = ConnectionPool {
            max_connections: 2,
            max_pending: 1,
        };
        let gate = Arc::new(Gate {
            limits,
            slots: Arc::new(tokio::sync::Semaphore::new(2)),
            waiting: AtomicU32::new(0),
        });
        let a = gate.enter().await.expect("a slot");
        let _b = gate.enter().await.expect("the second slot");
        // The third waits for one; the fourth finds one waiting already: overflow.
        let g = gate.clone();
        let third = tokio::spawn(async move { g.enter().await });
        while gate.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(gate.enter().await.is_none(), "past max_pending: overflow");
        assert_eq!(
            gate.waiting.load(Ordering::Acquire),
            1,
            "the refused one left"
        );
        drop(a);
        let _c = third
            .await
            .unwrap()
            .expect("the waiting one got the freed slot");
        assert_eq!(gate.waiting.load(Ordering::Acquire), 0);
        // A waiter that gives up is no longer counted.
        let g = gate.clone();
        let gone = tokio::spawn(async move { g.enter().await.is_some() });
        while gate.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        assert_eq!(gate.waiting.load(Ordering::Acquire), 0);
        assert!(may_wait(0, &limits) && !may_wait(1, &limits));
    }
}
