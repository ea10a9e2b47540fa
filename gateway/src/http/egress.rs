//! The egress half of the HTTP path: an import listener that routes each request.
//!
//! Each client connection is served by hyper (HTTP/1.1, or h2 with prior knowledge, or
//! h2 after an HTTP/1.1 `Upgrade: h2c`, [`super::h2c`]). For each request:
//! 1. headers change as `headers::from_client` says;
//! 2. a body known to be at most [`REPLAY_MAX`] is buffered so it can be sent again (or
//!    copied to a mirror); a longer or unknown one streams, and is never retried;
//! 3. with the import's routes (a VirtualService, HTTPRoute or GRPCRoute): the circuit breaker (past
//!    `max_requests` in flight until the answer's headers, 503 [`OVERFLOW`] at once),
//!    the first matching route (none: 404 [`NO_ROUTE`]; on a service port no route
//!    names, when every match names another, the service itself, as Istio builds no
//!    routes for that port), then in Envoy's filter order
//!    its faults (a delay, then an abort: before anything else of the route), its CORS
//!    policy (a preflight answered here; an allowed origin's answer marked), its rate
//!    limit (a token bucket per route at this gateway: 429 [`RATE_LIMITED`] with
//!    `retry-after`), its direct response or redirect (answered here, with the route's
//!    answer header changes and CORS headers), its rewrite and request header
//!    changes (the picked destination's, then the route's), its mirrors (each hit by
//!    its own roll: a copy on a task of its own, of the changed request, to this
//!    service or through another service's import), and its
//!    weighted destination, whose subset gives the sites (a destination of another
//!    service: that service's import here, its sites and subsets, and the attempts go
//!    through it); without routes, every backend; the answer gets the destination's,
//!    then the route's response header changes;
//! 4. the site is the next of those (best first; with a `consistentHash` policy, in the
//!    rendezvous order of the request's key, whose hash goes along in `meshfed-hash` so
//!    the far ingress picks the key's endpoint, and a made-up cookie is set on the
//!    answer when the key is a missing cookie with a ttl) not tried yet;
//! 5. the request goes over the next of that site's [`LINKS`] h2 links for the caller,
//!    each opened on demand as a tunnel stream with the usual open request (so the far
//!    side decides exactly as for a TCP connection) and kept while it lives;
//! 6. `decide::retry` and the budget say whether another attempt follows, within the
//!    route's timeout and per-try timeout, after a jittered back-off
//!    (`decide::retry_backoff_ms`: Envoy's, from the route's base, 25 ms by default).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_catalog::SiteName;
use meshfed_catalog::affinity;
use meshfed_catalog::http_route::{
    Compiled, Destination, HttpRoute, RequestView, SELECTOR_HEADER, SUBSET_NAME_HEADER, SiteLabels,
    hits, pick, selector_header, subset_sites,
};
use meshfed_catalog::routing::SiteOrder;
use meshfed_identity::SpiffeId;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::decide::{self, Outcome, RetryBudget};
use super::io::TunnelIo;
use super::{Body, ERROR_HEADER, error_response, full, headers};
use crate::egress::{Callers, Egress, Stream, budget};
use crate::splice::reset_tcp;
use crate::wire::{Open, Refusal};

/// The largest request body buffered for a retry (Envoy's default buffer limit is 1 MiB;
/// gateways see many requests at once, so less).
pub const REPLAY_MAX: u64 = 64 * 1024;
/// Retries after the first attempt (Istio's default `attempts: 2`).
pub const RETRIES: u32 = 2;

/// What an import port keeps for routing requests: its links, its retry budget.
pub struct HttpEgress {
    /// One slot per (site, caller); a slot's lock is held only while its link opens.
    links: Mutex<HashMap<SiteName, HashMap<SpiffeId, Arc<Links>>>>,
    budget: Mutex<RetryBudget>,
    /// Counts requests for the weighted pick's rolls.
    rolls: AtomicU64,
    /// Counts the requests a round-robin balancer placed, and nothing else: a turn
    /// taken from `rolls`, which other decisions of the same request advance too,
    /// stepped by their number, and with two sites and an even step it never moved.
    turns: AtomicU64,
    /// Mirrored copies in flight.
    mirrors: AtomicU32,
    /// Sites' consecutive errors and ejections (outlier detection), per subset (`""`:
    /// the service's sites as a whole): like Envoy's clusters, a subset whose endpoints
    /// fail at a site ejects that site for its own requests only.
    outliers: Mutex<HashMap<String, decide::Outliers>>,
    /// Attempts in flight per site, until their answer's headers (the least-request
    /// balancer's input; counted only for a service that balances so).
    site_load: Mutex<HashMap<SiteName, u32>>,
    start: Instant,
    /// Cuts for premature resets are warned about at most every 10 s.
    premature_warned: super::WarnEvery,
    import: String,
    /// The service port this import stands for (a route's match `port`).
    port: u16,
}

/// One attempt in flight at a site, counted in [`HttpEgress::site_load`] while it lives.
struct SiteLoad<'a>(&'a HttpEgress, SiteName);

impl<'a> SiteLoad<'a> {
    fn new(h: &'a HttpEgress, site: &SiteName) -> Self {
        *h.load().entry(site.clone()).or_default() += 1;
        Self(h, site.clone())
    }
}

impl Drop for SiteLoad<'_> {
    fn drop(&mut self) {
        let mut m = self.0.load();
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// One link: the open connection, read under a plain lock per request, and an async
/// lock held only while a new one is opened (so a slow open never holds up requests on
/// the other links).
#[derive(Default)]
struct LinkSlot {
    open: Mutex<Option<SendRequest<Body>>>,
    dial: tokio::sync::Mutex<()>,
}

impl LinkSlot {
    fn live(&self) -> Option<SendRequest<Body>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|l| !l.is_closed())
            .cloned()
    }
}

/// h2 links per (site, caller), used in turn: each is one tunnel stream, and one
/// connection task at each end, so several spread the work over the cores.
pub const LINKS: usize = 4;
type Links = [LinkSlot; LINKS];

/// The code of a route's timeout (504).
pub const TIMEOUT: &str = "timeout";
/// The code of a request no route matches (404).
pub const NO_ROUTE: &str = "no_route";
/// The code of a request a route's fault injection aborted.
pub const FAULT_ABORT: &str = "fault_abort";

/// An import's routes, as the plan gave them.
pub struct RouteTable {
    pub compiled: Compiled,
    pub site_labels: BTreeMap<SiteName, SiteLabels>,
    /// The sites' shares of first attempts under a `localityLbSetting.distribute` rule
    /// (empty: none).
    pub site_weights: BTreeMap<SiteName, u32>,
    /// By subset name: the sites in the order of the subset's own `localityLbSetting`,
    /// when it is not the destination's ([`ImportPlan::subset_orders`]).
    ///
    /// [`ImportPlan::subset_orders`]: meshfed_catalog::routing::ImportPlan::subset_orders
    pub subset_orders: BTreeMap<String, SiteOrder>,
    /// Requests in flight, against the policy's `max_requests`.
    pub in_flight: AtomicU32,
    /// Requests and retries in flight under the policy's `retry_budget` (counted only
    /// when it has one).
    budget_requests: AtomicU32,
    budget_retries: AtomicU32,
    /// By subset index: a subset with a policy of its own, resolved once per table.
    subsets: Vec<Option<SubsetRoute>>,
    /// Each route's rate limit bucket (this gateway's), by route index.
    buckets: Vec<Option<Mutex<decide::TokenBucket>>>,
    /// The route of a caller the policy's routes are not exported to (`export_to`):
    /// the service itself, every site.
    unrouted: HttpRoute,
}

/// A subset with a `trafficPolicy` of its own: what applies to its requests (the
/// destination's at the import's port, the subset's over it), its requests in flight
/// against that `max_requests`, and its name for the far ingress.
struct SubsetRoute {
    traffic: meshfed_catalog::http_route::Traffic,
    in_flight: AtomicU32,
    name: Option<http::HeaderValue>,
}

impl RouteTable {
    /// The routes of an import of `port`.
    pub fn new(
        compiled: Compiled,
        port: u16,
        site_labels: BTreeMap<SiteName, SiteLabels>,
        (site_weights, subset_orders): (BTreeMap<SiteName, u32>, BTreeMap<String, SiteOrder>),
    ) -> Self {
        let buckets = compiled
            .policy
            .routes
            .iter()
            .map(|r| {
                r.rate_limit
                    .as_ref()
                    .map(|l| Mutex::new(decide::TokenBucket::new(l)))
            })
            .collect();
        Self {
            site_labels,
            site_weights,
            subset_orders,
            in_flight: AtomicU32::new(0),
            budget_requests: AtomicU32::new(0),
            budget_retries: AtomicU32::new(0),
            subsets: compiled
                .policy
                .subsets
                .iter()
                .map(|s| {
                    s.policy.as_ref()?;
                    Some(SubsetRoute {
                        traffic: compiled.policy.traffic(port, Some(s)),
                        in_flight: AtomicU32::new(0),
                        name: http::HeaderValue::from_str(&s.name).ok(),
                    })
                })
                .collect(),
            compiled,
            buckets,
            unrouted: HttpRoute {
                destinations: vec![Destination::all()],
                ..Default::default()
            },
        }
    }

    /// The sites a request to subset `name` picks among, in order, and their shares of
    /// first attempts: the subset's own order when it has one, else the destination's
    /// `backends` and shares.
    fn subset_order<'a>(
        &'a self,
        name: &str,
        backends: &'a [SiteName],
    ) -> (&'a [SiteName], &'a BTreeMap<SiteName, u32>) {
        match self.subset_orders.get(name) {
            Some(o) => (&o.sites, &o.weights),
            None => (backends, &self.site_weights),
        }
    }

    /// Counts a request against `max`, on the table's counter or a subset's (`None`
    /// when `max` requests are in flight already: the breaker is open).
    fn take(self: &Arc<Self>, subset: Option<usize>, max: u32) -> Option<InFlight> {
        let counter = match subset {
            None => &self.in_flight,
            Some(i) => &self.subsets.get(i)?.as_ref()?.in_flight,
        };
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(InFlight(self.clone(), subset))
    }
}

/// A request counted in its import's requests in flight under the policy's retry
/// budget while it lives; it gives the request's retries their turn.
struct Budgeted(Arc<RouteTable>, meshfed_catalog::http_route::RetryBudget);

impl Budgeted {
    fn new(table: &Arc<RouteTable>, budget: meshfed_catalog::http_route::RetryBudget) -> Self {
        table.budget_requests.fetch_add(1, Ordering::AcqRel);
        Self(table.clone(), budget)
    }

    /// A retry in flight, if the budget has room for one now (`decide::budget_allows`).
    fn retry(&self) -> Option<BudgetedRetry> {
        let requests = self.0.budget_requests.load(Ordering::Acquire);
        self.0
            .budget_retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                decide::budget_allows(self.1, requests, n).then_some(n + 1)
            })
            .ok()?;
        Some(BudgetedRetry(self.0.clone()))
    }
}

impl Drop for Budgeted {
    fn drop(&mut self) {
        self.0.budget_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A retry counted in flight under the retry budget until its attempt ends.
struct BudgetedRetry(Arc<RouteTable>);

impl Drop for BudgetedRetry {
    fn drop(&mut self) {
        self.0.budget_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request counted against its import's `max_requests` (or its subset's) while it
/// lives.
struct InFlight(Arc<RouteTable>, Option<usize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // A subset's counter exists: `take` counted on it.
        let counter = match self.1.and_then(|i| self.0.subsets[i].as_ref()) {
            None => &self.0.in_flight,
            Some(r) => &r.in_flight,
        };
        counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Mirrored copies in flight per import, at most.
pub const MIRRORS_IN_FLIGHT: u32 = 256;
/// How long a mirrored copy may take before it is given up.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// The code of a request refused because as many as `max_requests` are in flight (503).
pub const OVERFLOW: &str = "overflow";

/// One request's way: where it may go, and its retries and timeouts.
struct Plan {
    /// Where copies of the request go (the route's mirrors that hit it).
    mirrors: Vec<MirrorPlan>,
    /// The destination subset's endpoint labels, for the far ingress
    /// ([`SELECTOR_HEADER`]); `None`: any endpoint of the site.
    selector: Option<http::HeaderValue>,
    /// The subset's name when it has a policy of its own, for the far ingress's
    /// endpoint settings ([`SUBSET_NAME_HEADER`]).
    subset_name: Option<http::HeaderValue>,
    /// Held while the request lives, when the import has a `max_requests`, and when
    /// the destination's subset has one of its own.
    _in_flight: Option<InFlight>,
    _subset_in_flight: Option<InFlight>,
    sites: Vec<SiteName>,
    /// The policy's outlier detection; its ejection cap counts `sites` (the
    /// destination's subset's, with one).
    outlier: Option<meshfed_catalog::http_route::Outlier>,
    /// Whose ejections apply: the destination's subset (`""`: none), when there is
    /// outlier detection.
    cluster: String,
    retries: u32,
    /// The route's `retryOn` (`None`: the default).
    retry_on: Option<Arc<meshfed_catalog::http_route::RetryOn>>,
    /// The base of the wait before a retry (ms; `decide::retry_backoff_ms`).
    backoff_ms: u64,
    timeout: Option<Duration>,
    per_try: Option<Duration>,
    /// The route's header changes and rewrite (with the prefix it matched on), when it
    /// has any.
    edits: Option<Box<Edits>>,
    /// The import the request goes through when its destination is another service
    /// (`None`: this one).
    target: Option<Arc<Egress>>,
    /// The least-request balancer reads attempts in flight per site: count them.
    count_load: bool,
    /// The request's affinity hash (a `consistentHash` policy), for the far ingress's
    /// endpoint pick ([`meshfed_catalog::affinity::HASH_HEADER`]).
    hash: Option<http::HeaderValue>,
    /// The cookie the affinity made up for a request without one, set on the answer.
    set_cookie: Option<http::HeaderValue>,
    /// The route's CORS headers for an allowed cross-origin request, set on the answer.
    cors: Vec<(&'static str, String)>,
    /// Counted under the policy's retry budget, when it has one and the destination is
    /// the service itself (`None`: the gateway's default budget).
    budgeted: Option<Budgeted>,
}

/// A mirrored copy's way: the sites of the mirror's service (its subset's), the subset's
/// endpoint selector, and the import it goes through when the mirror is another service
/// (`None`: this one).
struct MirrorPlan {
    sites: Vec<SiteName>,
    selector: Option<http::HeaderValue>,
    target: Option<Arc<Egress>>,
}

struct Edits {
    /// The picked destination's header changes, applied before the route's (Envoy's
    /// order: the weighted cluster's, then the route's, whose `set` wins).
    dest_headers: Option<Box<meshfed_catalog::http_route::HeaderRules>>,
    headers: Option<meshfed_catalog::http_route::HeaderRules>,
    rewrite: Option<(meshfed_catalog::http_route::Rewrite, Option<String>)>,
    /// The rewrite's `uri_regex`, compiled.
    uri_regex: Option<Arc<meshfed_catalog::http_route::UriRegex>>,
}

/// A preflight's answer at the egress: 200, no body, `headers` (none: an ignored one).
fn cors_preflight(headers: &[(&'static str, String)]) -> Response<Body> {
    let mut r = Response::new(super::full(Bytes::new()));
    set_headers(r.headers_mut(), headers);
    r
}

/// Sets each of `headers` (values from a checked policy or the request's own headers;
/// one that is not a header value is left out).
fn set_headers(map: &mut http::HeaderMap, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            map.insert(*name, v);
        }
    }
}

/// The [`SELECTOR_HEADER`] value of a subset, when it selects endpoints (not only sites).
fn selector_value(subset: &meshfed_catalog::http_route::Subset) -> Option<http::HeaderValue> {
    selector_header(subset).and_then(|s| http::HeaderValue::from_str(&s).ok())
}

/// The code of a request a route's rate limit refused (429, with `retry-after`).
pub const RATE_LIMITED: &str = "rate_limited";

/// A request as a route's match sees it, with where it came from.
struct View<'a> {
    parts: &'a http::request::Parts,
    /// The service port the egress listener stands for.
    port: u16,
    caller: &'a SpiffeId,
    /// The caller's labels, when the egress knows them (`caller_pod_ip`).
    labels: Option<&'a BTreeMap<String, String>>,
    /// The client's connection is TLS (`caller_mtls`).
    tls: bool,
}

impl RequestView for View<'_> {
    fn path(&self) -> &str {
        self.parts.uri.path()
    }
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }
    fn header(&self, name: &str) -> Option<&str> {
        match name {
            // Envoy's `:path`: with the query.
            ":path" => self.parts.uri.path_and_query().map(|p| p.as_str()),
            _ => self.parts.headers.get(name).and_then(|v| v.to_str().ok()),
        }
    }
    fn query(&self) -> Option<&str> {
        self.parts.uri.query()
    }
    fn authority(&self) -> Option<&str> {
        // h2's `:authority` (hyper keeps it in the URI), or HTTP/1.1's `Host`.
        match self.parts.uri.authority() {
            Some(a) => Some(a.as_str()),
            None => self
                .parts
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok()),
        }
    }
    fn scheme(&self) -> &str {
        match self.parts.uri.scheme_str() {
            Some(s) => s,
            None if self.tls => "https",
            None => "http",
        }
    }
    fn port(&self) -> Option<u16> {
        Some(self.port)
    }
    fn caller(&self) -> Option<&str> {
        Some(self.caller.as_str())
    }
    fn caller_labels(&self) -> Option<&BTreeMap<String, String>> {
        self.labels
    }
}

/// A pod's labels, shared by its connections.
type CallerLabels = Arc<BTreeMap<String, String>>;

/// Who sends a client connection's requests: its identity, and its labels when the
/// egress knows them (a pod's, by its address).
struct Caller {
    id: SpiffeId,
    labels: Option<CallerLabels>,
}

/// What a request's body is, for replay.
enum ReqBody {
    /// Buffered: can be sent again.
    Full(Bytes),
    /// Streamed, taken by the first attempt.
    Stream(Option<Incoming>),
}

impl HttpEgress {
    pub fn new(service: &meshfed_catalog::ServiceName, port: u16) -> Self {
        let import = format!("{service}:{port}");
        Self {
            links: Default::default(),
            budget: Mutex::new(RetryBudget::linkerd_default()),
            rolls: AtomicU64::new(
                u64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos(),
                )
                .unwrap_or(0),
            ),
            turns: AtomicU64::new(0),
            mirrors: AtomicU32::new(0),
            outliers: Mutex::default(),
            site_load: Mutex::default(),
            start: Instant::now(),
            premature_warned: super::WarnEvery::new(10),
            import,
            port,
        }
    }

    /// Forgets the ejections of subsets `table` no longer defines (a removed or renamed
    /// subset's state would otherwise stay for the gateway's life); the service's own
    /// (`""`) stay.
    pub fn keep_clusters(&self, table: Option<&RouteTable>) {
        let defined = |name: &str| {
            table.is_some_and(|t| t.compiled.policy.subsets.iter().any(|s| s.name == name))
        };
        self.outliers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| name.is_empty() || defined(name));
    }

    fn load(&self) -> std::sync::MutexGuard<'_, HashMap<SiteName, u32>> {
        self.site_load.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `sites` with the one the load balancer picks first (the rest keep their order,
    /// for failover).
    fn balance(
        &self,
        lb: Option<meshfed_catalog::http_route::LoadBalancer>,
        shares: Option<&BTreeMap<SiteName, u32>>,
        mut sites: Vec<SiteName>,
    ) -> Vec<SiteName> {
        if sites.len() < 2 {
            return sites;
        }
        // Locality shares pick the first site; the others stay in failover order.
        if let Some(w) = shares.filter(|w| !w.is_empty()) {
            let n = self.rolls.fetch_add(1, Ordering::Relaxed);
            let weights = sites.iter().map(|s| w.get(s).copied().unwrap_or(0));
            if let Some(i) = meshfed_catalog::http_route::pick_by_weight(weights, decide::roll(n)) {
                let first = sites.remove(i);
                sites.insert(0, first);
            }
            return sites;
        }
        if lb.is_none() {
            return sites;
        }
        let in_flight: Vec<u32> = {
            let m = self.load();
            sites
                .iter()
                .map(|s| m.get(s).copied().unwrap_or(0))
                .collect()
        };
        let n = self.rolls.fetch_add(1, Ordering::Relaxed);
        let turn = self.turns.fetch_add(1, Ordering::Relaxed);
        let i = decide::first_site(lb, turn, decide::roll(n), &in_flight);
        let first = sites.remove(i);
        sites.insert(0, first);
        sites
    }

    /// The import, `service:port` (its metrics' label).
    pub(crate) fn import(&self) -> &str {
        &self.import
    }

    /// A uniform roll for a weighted pick (the next of this import's).
    pub(crate) fn next_roll(&self) -> u32 {
        decide::roll(self.rolls.fetch_add(1, Ordering::Relaxed))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Serves one client connection of `eg`'s listener, which holds `hold` (its client
    /// slot, and the drain, which lets the requests in flight finish) until it and what
    /// it was upgraded to end.
    pub async fn serve_client(
        self: Arc<Self>,
        eg: Arc<Egress>,
        tcp: TcpStream,
        client: SocketAddr,
        hold: super::ClientHold,
    ) {
        let _ = tcp.set_nodelay(true);
        let (caller, labels) = match &eg.callers {
            Callers::Declared => (eg.local_id.clone(), None),
            Callers::SourceAddress(dir) => match dir.load().get(&client.ip().to_canonical()) {
                Some(c) => (c.id.clone(), Some(c.labels.clone())),
                None => {
                    debug!("no workload has this source address; connection refused");
                    eg.metrics.refused("egress", "caller_unauthenticated");
                    reset_tcp(tcp);
                    return;
                }
            },
            Callers::Mtls(acceptor, slots) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    eg.metrics.refused("egress", "caller_handshake_limit");
                    reset_tcp(tcp);
                    return;
                };
                let hs =
                    tokio::time::timeout(crate::egress::CALLER_HANDSHAKE, acceptor.accept(tcp))
                        .await;
                drop(slot);
                let Ok(Ok(tls)) = hs else {
                    eg.metrics.refused("egress", "caller_unauthenticated");
                    return;
                };
                let Some(caller) = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| meshfed_identity::verify::peer_id(c).ok())
                else {
                    eg.metrics.refused("egress", "caller_unauthenticated");
                    return;
                };
                return self.serve_http(eg, tls, client, (caller, None), hold).await;
            }
        };
        self.serve_http(eg, tcp, client, (caller, labels), hold)
            .await
    }

    async fn serve_http<IO>(
        self: Arc<Self>,
        eg: Arc<Egress>,
        io: IO,
        client: SocketAddr,
        (caller, labels): (SpiffeId, Option<CallerLabels>),
        hold: super::ClientHold,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let caller = Arc::new(Caller { id: caller, labels });
        let this = self.clone();
        let stop = hold.stop();
        // The connection is idle while no request waits for its answer or is still
        // being answered (a streamed answer counts until its end); it counts the
        // requests its client resets prematurely too.
        let activity = super::Activity::new();
        let idle = (Some(eg.http_idle), activity.clone());
        let each = eg.clone();
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let (this, eg, caller, hold) =
                (this.clone(), each.clone(), caller.clone(), hold.clone());
            let busy = activity.mark();
            async move {
                // Held until the answer has been sent.
                let upgrade = (hold.clone(), &busy);
                if let Some(switching) = this.h2c(&eg, &mut req, client, &caller, upgrade) {
                    return Ok(super::Marked::answer(switching, req.method(), Some(busy)));
                }
                let method = req.method().clone();
                let answer = this.answer(&eg, req, client, &caller, &hold).await;
                Ok::<_, std::convert::Infallible>(super::Marked::answer(
                    answer,
                    &method,
                    Some(busy),
                ))
            }
        });
        // The first byte within the header timeout, as the rest of the headers.
        let io = super::io::FirstByteWithin::new(io, super::HEADER_READ_TIMEOUT);
        let ended =
            super::serve_connection(io, svc, stop, (Some(idle), true), "client HTTP connection")
                .await;
        self.ended(&eg, client, ended);
    }

    /// A client connection that ended: one cut for its premature resets is counted
    /// (`premature_resets`) and warned about, at most every 10 s (each such cut took
    /// at least 250 of the client's requests, or 20 by h2's own bound).
    fn ended(&self, eg: &Egress, client: SocketAddr, ended: super::Ended) {
        if ended != super::Ended::PrematureResets {
            return;
        }
        eg.metrics.refused("egress", "premature_resets");
        if self.premature_warned.due() {
            warn!(import = %self.import, %client,
                "client connection cut: it reset its requests right after sending them (premature_resets, HTTP/2 rapid reset)");
        }
    }

    /// An HTTP/1.1 request asking for h2c ([`super::h2c::wanted`]): answered `101`, and
    /// the connection is served as h2 from then on, the request itself as its stream 1.
    /// `None`: not such a request, or one whose headers do not fit a frame (answered as
    /// HTTP/1.1).
    fn h2c(
        self: &Arc<Self>,
        eg: &Arc<Egress>,
        req: &mut Request<Incoming>,
        client: SocketAddr,
        caller: &Arc<Caller>,
        (hold, busy): (super::ClientHold, &super::Busy),
    ) -> Option<Response<Body>> {
        if !super::h2c::wanted(req, req.body().is_end_stream()) {
            return None;
        }
        let stream_one = super::h2c::headers_frame(req)?;
        let on = hyper::upgrade::on(req);
        let (this, eg, caller) = (self.clone(), eg.clone(), caller.clone());
        // The upgraded connection's requests count on the same connection's activity.
        let idle = (Some(eg.http_idle), busy.activity().clone());
        let stop = hold.stop();
        let held = hold.clone();
        hold.spawn(async move {
            let Ok(upgraded) = on.await else { return };
            // The client's preface and settings come within the header timeout, as a
            // request's headers must: an idle upgraded connection holds nothing long.
            let io = tokio::time::timeout(
                super::HEADER_READ_TIMEOUT,
                super::h2c::after_101(TokioIo::new(upgraded), stream_one),
            )
            .await;
            let io = match io {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => return debug!(error = %e, "h2c upgrade failed"),
                Err(_) => return debug!("h2c upgrade: no preface in time"),
            };
            let activity = idle.1.clone();
            let (this2, eg2) = (this.clone(), eg.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (this, eg, caller, hold) =
                    (this.clone(), eg.clone(), caller.clone(), held.clone());
                let busy = activity.mark();
                async move {
                    let method = req.method().clone();
                    let answer = this.answer(&eg, req, client, &caller, &hold).await;
                    Ok::<_, std::convert::Infallible>(super::Marked::answer(
                        answer,
                        &method,
                        Some(busy),
                    ))
                }
            });
            let ended =
                super::serve_connection(io, svc, stop, (Some(idle), true), "client h2c connection")
                    .await;
            this2.ended(&eg2, client, ended);
        });
        let mut r = Response::new(super::full(Bytes::new()));
        *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("Upgrade"),
        );
        r.headers_mut()
            .insert(http::header::UPGRADE, http::HeaderValue::from_static("h2c"));
        Some(r)
    }

    /// A client's request, answered: a WebSocket handshake (HTTP/1.1's, or h2's extended
    /// CONNECT, RFC 8441, which goes on as HTTP/1.1's: [`headers::websocket_h2_as_h1`])
    /// has the client's side of its upgrade taken before it goes, and its bytes carried
    /// after a `101` ([`Self::websocket`]). An extended CONNECT for another protocol is
    /// answered `501` `unsupported_protocol`.
    async fn answer(
        self: &Arc<Self>,
        eg: &Arc<Egress>,
        mut req: Request<Incoming>,
        client: SocketAddr,
        caller: &Arc<Caller>,
        hold: &super::ClientHold,
    ) -> Response<Body> {
        let protocol = req.extensions().get::<hyper::ext::Protocol>();
        let over_h2 = headers::websocket_over_h2(
            req.method(),
            req.version(),
            protocol.map(hyper::ext::Protocol::as_str),
        );
        if protocol.is_some() && !over_h2 {
            eg.metrics.http_request("egress", 501);
            let msg = "an extended CONNECT for a protocol other than websocket";
            return error_response(501, super::UNSUPPORTED_PROTOCOL, msg);
        }
        let websocket = (over_h2
            || headers::websocket_upgrade(req.method(), req.version(), req.headers()))
        .then(|| hyper::upgrade::on(&mut req));
        if over_h2 {
            // The key only shows that the endpoint speaks WebSocket; it is no secret.
            let nonce = ring::rand::generate(&ring::rand::SystemRandom::new())
                .map(|n| n.expose())
                .unwrap_or_default();
            headers::websocket_h2_as_h1(&mut req, nonce);
        }
        let mut answer = self
            .request(eg, req, client, caller, websocket.is_some())
            .await;
        if let Some(client_side) = websocket {
            self.websocket(eg, &mut answer, client_side, hold, over_h2);
        }
        answer
    }

    /// One request, with its attempts; `websocket`: it is a WebSocket handshake
    /// ([`headers::websocket_upgrade`]), whose client side the caller has taken.
    async fn request(
        self: &Arc<Self>,
        eg: &Arc<Egress>,
        req: Request<Incoming>,
        client: SocketAddr,
        caller: &Caller,
        websocket: bool,
    ) -> Response<Body> {
        use tracing::Instrument;
        let span = tracing::trace_span!(
            target: "otel",
            "egress http",
            otel.kind = "client",
            meshfed.site = %eg.metrics.site,
            meshfed.direction = "egress",
            meshfed.import = %self.import,
            http.request.method = %req.method(),
            url.path = %req.uri().path(),
            meshfed.route = tracing::field::Empty,
            meshfed.destination_site = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        );
        super::trace::continue_from(&span, req.headers());
        let answer = self
            .request_traced(eg, req, (client, websocket), caller, &span)
            .instrument(span.clone())
            .await;
        span.record("http.response.status_code", answer.status().as_u16());
        answer
    }

    async fn request_traced(
        self: &Arc<Self>,
        eg: &Arc<Egress>,
        req: Request<Incoming>,
        (client, websocket): (SocketAddr, bool),
        who: &Caller,
        span: &tracing::Span,
    ) -> Response<Body> {
        let caller = &who.id;
        let (mut parts, body) = req.into_parts();
        headers::from_client(&mut parts, client, &self.import);
        let mut body = if body.is_end_stream() {
            ReqBody::Full(Bytes::new())
        } else if body.size_hint().upper().is_some_and(|n| n <= REPLAY_MAX) {
            match body.collect().await {
                Ok(b) => ReqBody::Full(b.to_bytes()),
                Err(e) => {
                    debug!(error = %e, "client body lost");
                    return error_response(400, "client_body", &e.to_string());
                }
            }
        } else {
            ReqBody::Stream(Some(body))
        };
        let metrics = &eg.metrics;
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deposit(self.now_ms());
        let mut route = None;
        // An answer given here, not by a site: counted for its route with site `none`.
        let answered = |r: Response<Body>, route: &Option<String>| {
            metrics.http_request("egress", r.status().as_u16());
            if let Some(name) = route {
                metrics.http_route_request(&self.import, name, "none", r.status().as_u16());
            }
            r
        };
        let mut delay = None;
        let planned = self.plan(eg, &parts, client.ip(), who, (&mut route, &mut delay));
        if let Some(route) = &route {
            span.record("meshfed.route", route.as_str());
        }
        // The route's injected delay comes before any answer, its abort's too (Envoy's
        // fault filter is the first of the route's).
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let plan = match planned {
            Ok(p) => p,
            Err(r) => return answered(r, &route),
        };
        // The far side continues this request's span.
        super::trace::inject(span, &mut parts.headers);
        if let Some(e) = &plan.edits {
            if let Some((rw, prefix)) = &e.rewrite {
                headers::rewrite(&mut parts, rw, prefix.as_deref(), e.uri_regex.as_deref());
            }
            if let Some(h) = &e.dest_headers {
                headers::apply_ops(&mut parts.headers, &h.request);
            }
            if let Some(h) = &e.headers {
                headers::apply_ops(&mut parts.headers, &h.request);
            }
        }
        if websocket {
            // Its bytes are not copied to a mirror: a handshake alone is no traffic.
            headers::keep_websocket_upgrade(&mut parts.headers);
        } else {
            for m in &plan.mirrors {
                self.mirror(eg, &parts, &body, m, caller);
            }
        }
        // A destination of another service goes through that service's import.
        let (via, via_eg) = match &plan.target {
            Some(t) => (&*t.http, t),
            None => (&**self, eg),
        };
        let attempts = via.attempts(via_eg, &parts, &mut body, &plan, (caller, websocket));
        let (answer, site) = match plan.timeout {
            Some(t) => tokio::time::timeout(t, attempts).await.unwrap_or_else(|_| {
                let msg = format!("no answer within the route's timeout of {t:?}");
                (error_response(504, TIMEOUT, &msg), None)
            }),
            None => attempts.await,
        };
        let mut answer = answer;
        if let Some(s) = &site {
            span.record("meshfed.destination_site", s.as_str());
        }
        if let Some(c) = &plan.set_cookie {
            answer
                .headers_mut()
                .append(http::header::SET_COOKIE, c.clone());
        }
        if let Some(e) = &plan.edits {
            for h in [e.dest_headers.as_deref(), e.headers.as_ref()]
                .into_iter()
                .flatten()
            {
                headers::apply_ops(answer.headers_mut(), &h.response);
            }
        }
        // After the route's changes: Envoy's CORS filter sees the answer after the router.
        set_headers(answer.headers_mut(), &plan.cors);
        metrics.http_request("egress", answer.status().as_u16());
        if let Some(route) = &route {
            metrics.http_route_request(
                &self.import,
                route,
                site.as_ref().map_or("none", |s| s.as_str()),
                answer.status().as_u16(),
            );
        }
        answer
    }

    /// Sends a copy of the request to the mirror's first site (through the mirror
    /// service's import when it is another service) and discards the answer, on a task
    /// of its own, so the mirror's speed never touches the request. Only a buffered body
    /// can be copied; at most [`MIRRORS_IN_FLIGHT`] copies of this import's requests are
    /// in flight (a mirror slower than the traffic drops copies, counted, rather than
    /// pile them up).
    fn mirror(
        self: &Arc<Self>,
        eg: &Arc<Egress>,
        parts: &http::request::Parts,
        body: &ReqBody,
        plan: &MirrorPlan,
        caller: &SpiffeId,
    ) {
        let (sites, selector) = (&plan.sites, plan.selector.as_ref());
        let ReqBody::Full(b) = body else {
            eg.metrics.http_mirror("dropped");
            return;
        };
        let taken = self
            .mirrors
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MIRRORS_IN_FLIGHT).then_some(n + 1)
            });
        if taken.is_err() || sites.is_empty() {
            eg.metrics.http_mirror("dropped");
            return;
        }
        let mut req = Request::new(full(b.clone()));
        *req.method_mut() = parts.method.clone();
        *req.headers_mut() = parts.headers.clone();
        if let Some(v) = selector {
            req.headers_mut().insert(SELECTOR_HEADER, v.clone());
        }
        *req.version_mut() = http::Version::HTTP_2;
        // Envoy's mark of a shadowed request: `-shadow` after the authority's host.
        let mut uri = parts.uri.clone().into_parts();
        if let Some(a) = &uri.authority {
            let shadow = match a.port() {
                Some(p) => format!("{}-shadow:{p}", a.host()),
                None => format!("{}-shadow", a.host()),
            };
            uri.authority = shadow.parse().ok().or(uri.authority.take());
        }
        *req.uri_mut() = http::Uri::from_parts(uri).unwrap_or_else(|_| parts.uri.clone());
        let (this, eg, site, caller) = (self.clone(), eg.clone(), sites[0].clone(), caller.clone());
        let via = plan.target.clone().unwrap_or_else(|| eg.clone());
        tokio::spawn(async move {
            let sent = async {
                let mut link = via.http.link(&via, &site, 0, 1, &caller).await.ok()?;
                let resp = link.send_request(req).await.ok()?;
                resp.into_body().collect().await.ok()
            };
            let r = tokio::time::timeout(MIRROR_TIMEOUT, sent).await;
            this.mirrors.fetch_sub(1, Ordering::AcqRel);
            eg.metrics.http_mirror(if matches!(r, Ok(Some(_))) {
                "sent"
            } else {
                "failed"
            });
        });
    }

    /// Where a request may go and how: its route's destination (by weight), the sites
    /// that destination's subset selects (best first), its retries and timeouts. Without
    /// routes: every backend, [`RETRIES`] retries, no timeout. `route` gets the name of
    /// the route the request matched (`#i` when it has none), also when it is answered
    /// here (`Err`).
    #[allow(clippy::result_large_err)]
    fn plan(
        &self,
        eg: &Egress,
        parts: &http::request::Parts,
        client: std::net::IpAddr,
        who: &Caller,
        (route_out, delay_out): (&mut Option<String>, &mut Option<Duration>),
    ) -> Result<Plan, Response<Body>> {
        let caller = &who.id;
        let backends = eg.backends.load_full();
        let no_site = |msg: String| error_response(503, Refusal::NoReadyEndpoint.as_str(), &msg);
        if backends.is_empty() {
            return Err(no_site(format!("no site serves {}", self.import)));
        }
        let routes = eg.routes.load_full();
        let Some(table) = routes.as_ref() else {
            return Ok(Plan {
                mirrors: Vec::new(),
                selector: None,
                subset_name: None,
                _in_flight: None,
                _subset_in_flight: None,
                sites: backends.to_vec(),
                outlier: None,
                cluster: String::new(),
                retries: RETRIES,
                retry_on: None,
                backoff_ms: meshfed_catalog::http_route::DEFAULT_RETRY_BACKOFF_MS,
                timeout: None,
                per_try: None,
                edits: None,
                target: None,
                count_load: false,
                hash: None,
                set_cookie: None,
                cors: Vec::new(),
                budgeted: None,
            });
        };
        // The circuit breaker: a request past `max_requests` is refused at once, never
        // queued.
        let in_flight = match table.compiled.policy.max_requests {
            None => None,
            Some(max) => match table.take(None, max) {
                Some(f) => Some(f),
                None => {
                    eg.metrics.http_overflow("egress");
                    let msg = format!("{max} requests to {} in flight (max_requests)", self.import);
                    return Err(error_response(503, OVERFLOW, &msg));
                }
            },
        };
        let view = View {
            parts,
            port: self.port,
            caller,
            labels: who.labels.as_deref(),
            tls: matches!(eg.callers, Callers::Mtls(..)),
        };
        // Routes exported to other namespaces than the caller's, or restricted to other
        // ports of the service than this one: the service itself.
        let matched = if table.compiled.policy.routes_apply_to(caller.as_str())
            && table.compiled.routes_on_port(self.port)
        {
            table.compiled.route_and_prefix(&view)
        } else {
            Some((&table.unrouted, None))
        };
        let Some((route, prefix)) = matched else {
            // Istio answers 404 (NR: no route) too.
            let msg = format!("no route of {} matches", table.compiled.policy.source);
            return Err(error_response(404, NO_ROUTE, &msg));
        };
        // `None`: the unrouted route, which has no name, rate limit or metrics series.
        let index = table
            .compiled
            .policy
            .routes
            .iter()
            .position(|r| std::ptr::eq(r, route));
        let route_name = || {
            route.name.clone().unwrap_or_else(|| match index {
                Some(i) => format!("#{i}"),
                None => "(not exported to the caller)".to_owned(),
            })
        };
        // Counted per route from here on, whoever answers (the unrouted route of a
        // caller the routes are not exported to is none of them).
        *route_out = index.map(|_| route_name());
        // Envoy's filter order from here: the fault filter, CORS, the local rate limit,
        // then the router (a direct response, a redirect, or the destinations). The
        // fault's delay is the caller's to wait before any answer (`delay_out`); its abort
        // answers here, before the rest.
        if let Some(f) = &route.fault {
            let roll = self.next_roll();
            *delay_out = f
                .delay
                .as_ref()
                .filter(|d| hits(d.per_million, roll))
                .map(|d| Duration::from_millis(d.fixed_delay_ms));
            if let Some(a) = &f.abort
                && hits(a.per_million, roll.rotate_left(16))
            {
                return Err(error_response(
                    a.http_status,
                    FAULT_ABORT,
                    "aborted by the route's fault injection",
                ));
            }
        }
        // CORS: a preflight from an allowed origin (or, under `IGNORE`, from another) is
        // answered here and never forwarded.
        let header =
            |h: http::header::HeaderName| parts.headers.get(h).and_then(|v| v.to_str().ok());
        // By the route's index, found above (the unrouted route has no policy).
        let decision = match (index, &route.cors) {
            (Some(i), Some(_)) => table.compiled.cors(
                i,
                &meshfed_catalog::cors::Request {
                    method: parts.method.as_str(),
                    origin: header(http::header::ORIGIN),
                    request_method: header(http::header::ACCESS_CONTROL_REQUEST_METHOD),
                    request_headers: header(http::header::ACCESS_CONTROL_REQUEST_HEADERS),
                },
            ),
            _ => meshfed_catalog::cors::Decision::Pass,
        };
        let cors = match decision {
            meshfed_catalog::cors::Decision::Pass => Vec::new(),
            meshfed_catalog::cors::Decision::Allowed(h) => h,
            meshfed_catalog::cors::Decision::Preflight(h) => return Err(cors_preflight(&h)),
            meshfed_catalog::cors::Decision::IgnoredPreflight => return Err(cors_preflight(&[])),
        };
        // The route's rate limit; its 429 passes CORS on the way out.
        if let Some(bucket) = index
            .and_then(|i| table.buckets.get(i))
            .and_then(Option::as_ref)
        {
            let taken = bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(self.now_ms());
            if let Err(wait_ms) = taken {
                let name = route_name();
                eg.metrics.http_rate_limited(&self.import, &name);
                let msg = format!("route {name} of {} is over its rate limit", self.import);
                let mut r = error_response(429, RATE_LIMITED, &msg);
                r.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from(decide::retry_after_secs(wait_ms)),
                );
                set_headers(r.headers_mut(), &cors);
                return Err(r);
            }
        }
        // A direct response (Envoy's route action): answered here with the route's
        // answer header changes and CORS headers, never forwarded.
        if let Some((status, body)) = index.and_then(|i| table.compiled.direct_response(i)) {
            let mut r = Response::new(super::full(Bytes::copy_from_slice(body)));
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
            if !body.is_empty() {
                // Envoy's default for a direct response's body.
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain"),
                );
            }
            if let Some(h) = &route.headers {
                headers::apply_ops(r.headers_mut(), &h.response);
            }
            set_headers(r.headers_mut(), &cors);
            return Err(r);
        }
        if let Some(rd) = &route.redirect {
            let host = parts
                .uri
                .authority()
                .map_or(self.import.as_str(), |a| a.as_str());
            let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let location =
                meshfed_catalog::http_route::redirect_location(rd, "http", host, pq, prefix);
            let mut r = Response::new(super::full(Bytes::new()));
            *r.status_mut() =
                http::StatusCode::from_u16(rd.code).unwrap_or(http::StatusCode::MOVED_PERMANENTLY);
            match http::HeaderValue::from_str(&location) {
                Ok(v) => {
                    r.headers_mut().insert(http::header::LOCATION, v);
                }
                Err(_) => {
                    let msg = format!("redirect to {location:?} is not a valid Location");
                    return Err(error_response(500, "redirect_invalid", &msg));
                }
            }
            // As for a direct response: Envoy's router finalizes both alike.
            if let Some(h) = &route.headers {
                headers::apply_ops(r.headers_mut(), &h.response);
            }
            set_headers(r.headers_mut(), &cors);
            return Err(r);
        }
        let n = self.rolls.fetch_add(1, Ordering::Relaxed);
        if route.destinations.iter().all(|d| d.weight == 0) {
            // Gateway API: a rule whose backends all weigh 0 answers 500.
            let msg = format!("every destination of route {} weighs 0", route_name());
            return Err(error_response(500, NO_ROUTE, &msg));
        }
        let d = &route.destinations[pick(&route.destinations, decide::roll(n))];
        let to = (
            d.service.as_ref().unwrap_or(&eg.service),
            d.port.unwrap_or(eg.port),
        );
        // Another service goes through this gateway's import of it, with its sites and
        // its own policy's subsets, outlier detection and balancer.
        let target = if to != (&eg.service, eg.port) {
            let (service, port) = to;
            let Some(t) = eg.targets.get(service, port) else {
                return Err(no_site(format!(
                    "route {} sends to {service}:{port}, which this gateway does not import",
                    route_name()
                )));
            };
            if !t.app.load().is_http() {
                return Err(no_site(format!(
                    "route {} sends to {service}:{port}, which is not an HTTP port",
                    route_name()
                )));
            }
            Some(t)
        } else {
            None
        };
        let (via, to_backends, to_routes) = match &target {
            Some(t) => (&*t.http, t.backends.load_full(), t.routes.load_full()),
            None => (self, backends.clone(), routes.clone()),
        };
        let to_table = to_routes.as_ref().as_ref();
        // The destination's subset, by index in the table that defines it.
        // Its sites, and their shares of first attempts (a `distribute` rule's).
        let (sites, shares, selector, subset) = match d.subset.as_deref() {
            None => (
                to_backends.to_vec(),
                to_table.map(|t| &t.site_weights),
                None,
                None,
            ),
            Some(name) => {
                let found = to_table.and_then(|t| {
                    let subsets = &t.compiled.policy.subsets;
                    let i = subsets.iter().position(|s| s.name == name)?;
                    Some((t, i, &subsets[i]))
                });
                match found {
                    Some((t, i, subset)) => {
                        let (among, shares) = t.subset_order(name, &to_backends);
                        (
                            subset_sites(subset, among, &t.site_labels)
                                .into_iter()
                                .cloned()
                                .collect::<Vec<SiteName>>(),
                            Some(shares),
                            selector_value(subset),
                            Some((t, i)),
                        )
                    }
                    None => return Err(no_site(format!("{} has no subset {name}", to.0))),
                }
            }
        };
        let policy = to_table.map(|t| &t.compiled.policy);
        // A subset with a policy of its own: its breaker, outlier detection and balancer
        // (over the destination's at the port) for this request.
        let own = subset.and_then(|(t, i)| Some((t, i, t.subsets[i].as_ref()?)));
        let subset_in_flight = match own {
            Some((table, i, r)) => match r.traffic.pool.max_requests {
                None => None,
                Some(max) => match table.take(Some(i), max) {
                    Some(f) => Some(f),
                    None => {
                        eg.metrics.http_overflow("egress");
                        let msg = format!(
                            "{max} requests to subset {} of {} in flight (max_requests)",
                            table.compiled.policy.subsets[i].name, to.0
                        );
                        return Err(error_response(503, OVERFLOW, &msg));
                    }
                },
            },
            None => None,
        };
        let (outlier, load_balancer, hash_key) = match own.map(|(_, _, r)| &r.traffic) {
            Some(t) => (
                t.outlier.clone(),
                t.balancer.load_balancer,
                t.balancer.consistent_hash.as_ref(),
            ),
            None => (
                policy.and_then(|p| p.outlier.clone()),
                policy.and_then(|p| p.load_balancer),
                policy.and_then(|p| p.consistent_hash.as_ref()),
            ),
        };
        // Session affinity: the key's sites in rendezvous order (a request without the
        // key is balanced as usual; a missing cookie with a ttl is made up here).
        let (hash, set_cookie) = match hash_key {
            None => (None, None),
            Some(key) => match affinity::request_hash(key, &view, client) {
                Some(h) => (Some(h), None),
                None => {
                    let n = self.rolls.fetch_add(1, Ordering::Relaxed);
                    let value = affinity::hash_header(affinity::name_hash(&n.to_be_bytes()));
                    match affinity::made_cookie(key, &value) {
                        Some(c) => (
                            Some(affinity::value_hash(&value)),
                            http::HeaderValue::from_str(&c).ok(),
                        ),
                        None => (None, None),
                    }
                }
            },
        };
        let sites = match hash {
            Some(h) => affinity::order(sites, h, |s| affinity::name_hash(s.as_str().as_bytes())),
            None => via.balance(load_balancer, shares, sites),
        };
        if sites.is_empty() {
            return Err(no_site(format!(
                "no serving site is in subset {} of {}:{}",
                d.subset.as_deref().unwrap_or_default(),
                to.0,
                to.1
            )));
        }
        let ms = std::time::Duration::from_millis;
        let mirrors = route.mirrors.iter().filter_map(|m| {
            let n = self.rolls.fetch_add(1, Ordering::Relaxed);
            if !hits(m.per_million, decide::roll(n)) {
                return None;
            }
            // Another service: its import here, its sites and its policy's subsets (none
            // imported, or not HTTP: the copy is dropped, counted, as when it fails).
            let target = match m.other_service(&eg.service) {
                Some(service) => {
                    let t = eg.targets.get(service, m.port.unwrap_or(eg.port));
                    match t.filter(|t| t.app.load().is_http()) {
                        Some(t) => Some(t),
                        None => {
                            eg.metrics.http_mirror("dropped");
                            return None;
                        }
                    }
                }
                None => None,
            };
            let (m_backends, m_routes) = match &target {
                Some(t) => (t.backends.load_full(), t.routes.load_full()),
                None => (backends.clone(), routes.clone()),
            };
            let subset = m.subset.as_deref().and_then(|s| {
                let t = m_routes.as_ref().as_ref()?;
                t.compiled.subset(s).map(|subset| (t, subset))
            });
            let (sites, selector) = match (subset, &m.subset) {
                (Some((t, subset)), _) => (
                    subset_sites(
                        subset,
                        t.subset_order(&subset.name, &m_backends).0,
                        &t.site_labels,
                    )
                    .into_iter()
                    .cloned()
                    .collect(),
                    selector_value(subset),
                ),
                (None, None) => (m_backends.to_vec(), None),
                // A subset the mirror's service does not define (yet): no copy.
                (None, Some(_)) => {
                    eg.metrics.http_mirror("dropped");
                    return None;
                }
            };
            Some(MirrorPlan {
                sites,
                selector,
                target,
            })
        });
        Ok(Plan {
            budgeted: match (&target, table.compiled.policy.retry_budget) {
                (None, Some(b)) => Some(Budgeted::new(table, b)),
                _ => None,
            },
            cors,
            mirrors: mirrors.collect(),
            selector,
            subset_name: own.and_then(|(_, _, r)| r.name.clone()),
            _in_flight: in_flight,
            _subset_in_flight: subset_in_flight,
            sites,
            edits: (route.headers.is_some() || route.rewrite.is_some() || d.headers.is_some())
                .then(|| {
                    Box::new(Edits {
                        dest_headers: d.headers.clone(),
                        headers: route.headers.clone(),
                        rewrite: route
                            .rewrite
                            .clone()
                            .map(|rw| (rw, prefix.map(str::to_owned))),
                        uri_regex: index.and_then(|i| table.compiled.uri_regex(i)).cloned(),
                    })
                }),
            cluster: match (&outlier, d.subset.as_deref()) {
                (Some(_), Some(name)) => name.to_owned(),
                _ => String::new(),
            },
            outlier,
            target,
            count_load: load_balancer
                == Some(meshfed_catalog::http_route::LoadBalancer::LeastRequest),
            hash: hash.and_then(|h| http::HeaderValue::from_str(&affinity::hash_header(h)).ok()),
            set_cookie,
            retries: route.retries.as_ref().map_or(RETRIES, |r| r.attempts),
            retry_on: route.retries.as_ref().and_then(|r| r.retry_on.clone()),
            backoff_ms: route
                .retries
                .as_ref()
                .and_then(|r| r.backoff_ms)
                .unwrap_or(meshfed_catalog::http_route::DEFAULT_RETRY_BACKOFF_MS),
            timeout: route.timeout_ms.map(ms),
            per_try: route
                .retries
                .as_ref()
                .and_then(|r| r.per_try_timeout_ms)
                .map(ms),
        })
    }

    /// The attempts of one request over `plan.sites`: the best site not tried yet, and
    /// when all were, round again (the far ingress picks another endpoint).
    async fn attempts(
        &self,
        eg: &Egress,
        parts: &http::request::Parts,
        body: &mut ReqBody,
        plan: &Plan,
        (caller, websocket): (&SpiffeId, bool),
    ) -> (Response<Body>, Option<SiteName>) {
        let sites = &plan.sites;
        let mut tried: Vec<&SiteName> = Vec::new();
        let mut attempt = 0u32;
        // The retry in flight under the policy's retry budget, until its attempt ends.
        let mut _retrying: Option<BudgetedRetry> = None;
        loop {
            // Ejected sites last: tried only when every other one was.
            let ejected = |s: &SiteName| {
                plan.outlier.is_some()
                    && self
                        .outliers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&plan.cluster)
                        .is_some_and(|o| o.is_ejected(s, self.now_ms()))
            };
            let site = sites
                .iter()
                .find(|s| !tried.contains(s) && !ejected(s))
                .or_else(|| sites.iter().find(|s| !tried.contains(s)))
                .unwrap_or(&sites[attempt as usize % sites.len()]);
            tried.push(site);
            let i = sites.iter().position(|s| s == site).unwrap_or(0);
            let replayable = matches!(body, ReqBody::Full(_));
            let b = match body {
                ReqBody::Full(b) => full(b.clone()),
                ReqBody::Stream(s) => match s.take() {
                    Some(s) => s.map_err(super::boxed_err).boxed(),
                    None => full(Bytes::new()),
                },
            };
            let mut req = Request::new(b);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.headers_mut() = parts.headers.clone();
            if let Some(v) = &plan.selector {
                req.headers_mut().insert(SELECTOR_HEADER, v.clone());
            }
            if let Some(v) = &plan.subset_name {
                req.headers_mut().insert(SUBSET_NAME_HEADER, v.clone());
            }
            if let Some(v) = &plan.hash {
                req.headers_mut().insert(affinity::HASH_HEADER, v.clone());
            }
            let link = if websocket {
                *req.version_mut() = http::Version::HTTP_11;
                self.websocket_link(eg, site, i, sites.len(), caller)
                    .await
                    .map(Link::H1)
            } else {
                *req.version_mut() = http::Version::HTTP_2;
                self.link(eg, site, i, sites.len(), caller)
                    .await
                    .map(Link::H2)
            };
            let load = plan.count_load.then(|| SiteLoad::new(self, site));
            let (outcome, answer) = match link {
                Err((reason, message)) => {
                    // The far side refused the link's open: answered as it answers a
                    // request it refuses on an open link (403 `denied`, ...).
                    let status = super::ingress::refusal_status(reason);
                    if !reason.retryable_elsewhere() {
                        return (
                            error_response(status, reason.as_str(), &message),
                            Some(site.clone()),
                        );
                    }
                    (
                        Outcome::NotSent,
                        error_response(status, reason.as_str(), &message),
                    )
                }
                Ok(link) => {
                    let sent = link.send(req);
                    let r = match plan.per_try {
                        Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| ()),
                        None => Ok(sent.await),
                    };
                    match r {
                        Ok(Ok(resp)) => {
                            let outcome = match resp
                                .headers()
                                .get(ERROR_HEADER)
                                .and_then(|v| v.to_str().ok())
                            {
                                Some(super::ENDPOINT_RESET) => Outcome::Lost,
                                // A refusal code from the far gateway: nothing was sent.
                                Some(_) => Outcome::NotSent,
                                None => Outcome::Status(resp.status().as_u16()),
                            };
                            let (mut p, b) = resp.into_parts();
                            if websocket {
                                // An HTTP/1.1 answer: its hop-by-hop headers stop here
                                // (a `101` gets its upgrade's own again).
                                headers::strip_hop_by_hop(&mut p.headers);
                            }
                            (
                                outcome,
                                Response::from_parts(p, b.map_err(super::boxed_err).boxed()),
                            )
                        }
                        Ok(Err(e)) => {
                            // A link whose connection ended is closed: the next request
                            // on it opens another.
                            let msg = format!("site {site}: {e}");
                            (
                                Outcome::Lost,
                                error_response(502, super::ENDPOINT_RESET, &msg),
                            )
                        }
                        Err(()) => {
                            let msg = format!("site {site}: no answer within the per-try timeout");
                            (Outcome::Lost, error_response(504, TIMEOUT, &msg))
                        }
                    }
                }
            };
            drop(load);
            if let Some(cfg) = &plan.outlier {
                let mut all = self.outliers.lock().unwrap_or_else(|e| e.into_inner());
                // The name is copied only the first time.
                if !all.contains_key(&plan.cluster) {
                    all.insert(plan.cluster.clone(), decide::Outliers::default());
                }
                let ejected_now = all
                    .get_mut(&plan.cluster)
                    .is_some_and(|o| o.observe(cfg, site, outcome, &plan.sites, self.now_ms()));
                drop(all);
                if ejected_now {
                    eg.metrics.http_ejection();
                    tracing::warn!(%site, import = %self.import, ?outcome, "site ejected after consecutive errors (outlierDetection)");
                }
            }
            // Read only when the route retries on gRPC statuses.
            let grpc = plan
                .retry_on
                .as_ref()
                .filter(|o| !o.grpc_codes.is_empty())
                .and_then(|_| answer.headers().get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            let again = decide::retry(
                &parts.method,
                (outcome, grpc),
                plan.retry_on.as_deref(),
                (attempt, plan.retries),
                replayable,
                true,
            ) && match &plan.budgeted {
                Some(b) => {
                    // This request's last retry has ended: it no longer counts.
                    drop(_retrying.take());
                    _retrying = b.retry();
                    _retrying.is_some()
                }
                None => self
                    .budget
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .withdraw(self.now_ms()),
            };
            if !again {
                return (answer, Some(site.clone()));
            }
            eg.metrics.http_retry(match outcome {
                Outcome::NotSent => "not_sent",
                Outcome::Lost => "lost",
                Outcome::Status(_) => "status",
            });
            attempt += 1;
            // Envoy's jittered back-off: retries spread out instead of arriving in a
            // wave at the next site. The route's timeout covers the wait.
            let n = self.rolls.fetch_add(1, Ordering::Relaxed);
            let wait = decide::retry_backoff_ms(plan.backoff_ms, attempt, decide::roll(n));
            debug!(%site, ?outcome, attempt, wait_ms = wait, "retrying at the next site");
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    }

    /// The next of the h2 links to `site` for `caller`, opened on a tunnel stream when it
    /// is not open.
    async fn link(
        &self,
        eg: &Egress,
        site: &SiteName,
        i: usize,
        n: usize,
        caller: &SpiffeId,
    ) -> Result<SendRequest<Body>, (Refusal, String)> {
        let slots = {
            let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            // Looked up by reference: the keys are cloned only the first time.
            match links.get(site).and_then(|c| c.get(caller)) {
                Some(s) => s.clone(),
                None => links
                    .entry(site.clone())
                    .or_default()
                    .entry(caller.clone())
                    .or_default()
                    .clone(),
            }
        };
        let turn = self.rolls.fetch_add(1, Ordering::Relaxed) as usize % LINKS;
        let slot = &slots[turn];
        if let Some(l) = slot.live() {
            return Ok(l);
        }
        let _dialing = slot.dial.lock().await;
        // Another request may have opened it while this one waited.
        if let Some(l) = slot.live() {
            return Ok(l);
        }
        let io = self.tunnel_stream(eg, site, (i, n), caller).await?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| (Refusal::PeerUnavailable, format!("h2 over the tunnel: {e}")))?;
        let site_name = site.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, site = %site_name, "HTTP link over the tunnel ended");
            }
        });
        *slot.open.lock().unwrap_or_else(|e| e.into_inner()) = Some(send.clone());
        Ok(send)
    }

    /// A tunnel stream to `site` for `caller`'s requests, the `i`th of `n` sites tried
    /// (its share of the open timeout), with the usual open request.
    async fn tunnel_stream(
        &self,
        eg: &Egress,
        site: &SiteName,
        (i, n): (usize, usize),
        caller: &SpiffeId,
    ) -> Result<TunnelIo, (Refusal, String)> {
        let Some(peer) = eg.peers.get(site) else {
            return Err((
                Refusal::PeerUnavailable,
                format!("site {site} is not a peer"),
            ));
        };
        let open = Open {
            source: caller.clone(),
            ..eg.open_request(None)
        };
        let b = budget(i, n, eg.open_timeout);
        let stream = eg.open_stream(&peer, &open, b.connection, b.answer).await?;
        Ok(match stream {
            Stream::Quic(_, send, recv) => TunnelIo::Quic(send, recv),
            Stream::H2(send, recv) => TunnelIo::h2(send.0, recv.into_inner()),
        })
    }

    /// A WebSocket handshake's own link: an HTTP/1.1 connection on a tunnel stream of
    /// its own, which becomes the WebSocket's bytes after a `101`. A long-lived
    /// WebSocket never takes one of the shared h2 links' streams (whose number is
    /// bounded, so WebSockets would hold up the other requests), and the far side
    /// counts it as it counts a TCP connection.
    async fn websocket_link(
        &self,
        eg: &Egress,
        site: &SiteName,
        i: usize,
        n: usize,
        caller: &SpiffeId,
    ) -> Result<hyper::client::conn::http1::SendRequest<Body>, (Refusal, String)> {
        let io = self.tunnel_stream(eg, site, (i, n), caller).await?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                (
                    Refusal::PeerUnavailable,
                    format!("HTTP/1.1 over the tunnel: {e}"),
                )
            })?;
        let site_name = site.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, site = %site_name, "WebSocket link over the tunnel ended");
            }
        });
        Ok(send)
    }

    /// After a WebSocket handshake's answer: a `101` from the far side gives both
    /// upgraded sides, whose bytes are copied on a task that holds the client's slot
    /// ([`super::ClientHold`]) until the WebSocket closes, or carries nothing for the
    /// import's `http_idle_timeout`. Any other answer (a refusal, the endpoint's
    /// `403`) is the client's as it is. An h2 client (`over_h2`) gets the `101` as a
    /// `200` ([`headers::websocket_answer_for_h2`]).
    fn websocket(
        &self,
        eg: &Egress,
        answer: &mut Response<Body>,
        client_side: hyper::upgrade::OnUpgrade,
        hold: &super::ClientHold,
        over_h2: bool,
    ) {
        // A 101 that did not come over a WebSocket link has no bytes to carry.
        let Some(far_side) =
            super::take_upgrade(answer, "a 101 answer without an upgraded connection")
        else {
            return;
        };
        if over_h2 {
            headers::websocket_answer_for_h2(answer);
        }
        let idle = Some(eg.http_idle);
        let import = self.import.clone();
        hold.spawn(async move {
            let (client, far) = match tokio::join!(client_side, far_side) {
                (Ok(c), Ok(f)) => (c, f),
                (c, f) => {
                    let (c, f) = (c.err(), f.err());
                    return debug!(%import, client = ?c, far = ?f, "WebSocket upgrade failed");
                }
            };
            let ended =
                super::io::upgraded_bytes(TokioIo::new(client), TokioIo::new(far), idle).await;
            debug!(%import, ?ended, "WebSocket ended");
        });
    }
}

/// The link an attempt goes over: a shared h2 link, or a WebSocket's own HTTP/1.1 one.
enum Link {
    H2(SendRequest<Body>),
    H1(hyper::client::conn::http1::SendRequest<Body>),
}

impl Link {
    async fn send(self, req: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::H2(mut s) => s.send_request(req).await,
            Self::H1(mut s) => s.send_request(req).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_catalog::http_route::{HttpPolicy, Subset};

    /// ROUND_ROBIN takes turns over the sites whatever else of the request draws a roll:
    /// its turn once came from the rolls counter, which a request advanced twice, and
    /// with two sites every request went to the same one.
    #[test]
    fn round_robin_takes_turns_whatever_else_rolls() {
        use meshfed_catalog::http_route::LoadBalancer;
        let service = meshfed_catalog::ServiceName::parse("web.demo").expect("a name");
        let h = HttpEgress::new(&service, 80);
        let sites: Vec<SiteName> = ["north", "west", "south"]
            .iter()
            .map(|s| SiteName::new(s).expect("a site"))
            .collect();
        for others in 0..4 {
            for n in [2, 3] {
                let mut firsts = Vec::new();
                for _ in 0..n * 2 {
                    // Other decisions of the request (a weighted pick, a mirror's roll).
                    for _ in 0..others {
                        h.next_roll();
                    }
                    let order =
                        h.balance(Some(LoadBalancer::RoundRobin), None, sites[..n].to_vec());
                    firsts.push(order[0].clone());
                }
                for w in firsts.windows(n + 1) {
                    assert_eq!(w[0], w[n], "{others} other rolls: {firsts:?}");
                    assert!(
                        (1..n).all(|k| w[k] != w[0]),
                        "{others} other rolls: {firsts:?}"
                    );
                }
            }
        }
    }

    /// A route table change forgets the ejections of subsets it no longer defines, and
    /// keeps the others' and the service's own.
    #[test]
    fn a_route_change_forgets_the_ejections_of_removed_subsets() {
        let service = meshfed_catalog::ServiceName::parse("web.demo").expect("a name");
        let h = HttpEgress::new(&service, 80);
        let table = |subsets: &[&str]| {
            let mut policy = HttpPolicy::new(
                service.clone(),
                "test".into(),
                vec![HttpRoute {
                    destinations: vec![Destination::all()],
                    ..Default::default()
                }],
            );
            policy.subsets = subsets
                .iter()
                .map(|n| Subset {
                    name: (*n).to_owned(),
                    labels: BTreeMap::new(),
                    policy: None,
                })
                .collect();
            let compiled = policy.compile().expect("a valid policy");
            RouteTable::new(compiled, 80, BTreeMap::new(), Default::default())
        };
        let clusters = |h: &HttpEgress| -> Vec<String> {
            let mut v: Vec<String> = h
                .outliers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect();
            v.sort();
            v
        };
        for name in ["", "v1", "v2"] {
            h.outliers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_owned(), decide::Outliers::default());
        }
        h.keep_clusters(Some(&table(&["v1", "v3"])));
        assert_eq!(clusters(&h), ["", "v1"]);
        h.keep_clusters(None);
        assert_eq!(clusters(&h), [""]);
    }
}
