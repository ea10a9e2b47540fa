//! HTTP routing policy as gateways apply it, from Istio's `VirtualService` (and the
//! `subsets` of a `DestinationRule`) or Gateway API's `HTTPRoute` and `GRPCRoute`
//! (GAMMA): for each request of a service, the first route whose match accepts it, one
//! of its destinations by weight (the service itself, or another service the gateway
//! imports), the sites the destination's subset selects, and the faults it injects.
//! The policy travels through the federation with the service it governs, so a split
//! is set once for every importing site.
//!
//! A subset selects endpoints by labels, as Istio's do: an exporting site publishes the
//! distinct label sets of its ready endpoints (ServiceEntry endpoint labels,
//! WorkloadEntry labels, Kubernetes pod labels), and the egress sends a request for a
//! subset only to sites where some endpoint matches; it names the subset's labels to the
//! ingress ([`SELECTOR_HEADER`]), which picks among the matching endpoints only. Every
//! endpoint also carries `topology.istio.io/cluster` and `meshfed.io/site` (its site's
//! name) and its export's labels, so `subset: {labels: {topology.istio.io/cluster:
//! west}}` is "the canary at west".
//!
//! A DestinationRule's traffic settings (connection pool, outlier detection, balancer)
//! travel with the policy, per port and per subset ([`HttpPolicy::traffic`], merged as
//! Istio merges them), and a VirtualService's `exportTo` names the callers' namespaces
//! its routes apply to ([`HttpPolicy::routes_apply_to`]).
//!
//! Pure: the model (serde, with unknown fields refused so a newer sender's field is
//! never silently dropped), validation with field paths, and the decisions
//! (`Compiled::route`, `pick`, `subset_sites`), all table-tested.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::{ServiceName, SiteName};

/// The site labels every exporting site carries for subset selection.
pub const CLUSTER_LABEL: &str = "topology.istio.io/cluster";
pub const SITE_LABEL: &str = "meshfed.io/site";
/// The header an egress sends with a request for a subset: the subset's endpoint labels
/// (`k=v,k=v`; the site labels are the egress's to apply). Only a gateway speaks it: an
/// egress drops a client's, like every `meshfed-` header.
pub const SELECTOR_HEADER: &str = "meshfed-subset";
/// The header an egress sends with a request for a subset that has a policy of its own
/// ([`Subset::policy`]): the subset's name, by which the exporting gateway applies that
/// policy's endpoint settings (connection pool, endpoint ejection). Gateways only.
pub const SUBSET_NAME_HEADER: &str = "meshfed-subset-name";
/// The most labels a subset or an endpoint label set has.
pub const MAX_LABELS: usize = 32;

/// What a subset can select at one site: its export's labels and the distinct label
/// sets of its ready endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteLabels {
    pub export: BTreeMap<String, String>,
    pub endpoints: Vec<BTreeMap<String, String>>,
}

/// Routes of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPolicy {
    pub service: ServiceName,
    /// Where it came from (`VirtualService namespace/name`), for status and logs.
    pub source: String,
    pub routes: Vec<HttpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// The most requests in flight to the service from one importing gateway (a
    /// DestinationRule's `connectionPool.http.http2MaxRequests`); past it, 503 `overflow`
    /// at once, never a queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests one connection to an endpoint carries before the exporting gateway
    /// closes it and dials anew (a DestinationRule's
    /// `connectionPool.http.maxRequestsPerConnection`; Envoy's
    /// `max_requests_per_connection`); `None`: unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// How long an endpoint connection at the exporting gateway may carry no request
    /// before it is closed (a DestinationRule's `connectionPool.http.idleTimeout`);
    /// `None`: 90 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// How long the exporting gateway waits for a connection to an endpoint (a
    /// DestinationRule's `connectionPool.tcp.connectTimeout`); `None`: the
    /// gateway's `connect_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Keepalive probes on the exporting gateway's connections to the endpoints (a
    /// DestinationRule's `connectionPool.tcp.tcpKeepalive`); `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// The exporting site's connections to the service's endpoints (a DestinationRule's
    /// `connectionPool.tcp.maxConnections` and `http.http1MaxPendingRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Sites ejected after consecutive errors (a DestinationRule's `outlierDetection`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Outlier>,
    /// How the importing gateway spreads requests over the destination's sites (a
    /// DestinationRule's `trafficPolicy.loadBalancer.simple`); `None`: the best site
    /// first (same locality, then the most ready endpoints), the others on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Session affinity (a DestinationRule's `loadBalancer.consistentHash`): requests
    /// with one key go to one site and one endpoint ([`crate::affinity`]); instead of
    /// `load_balancer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<crate::affinity::HashKey>,
    /// How the destination's sites are ordered and shared by locality (a
    /// DestinationRule's `loadBalancer.localityLbSetting`); `None`: nearest first
    /// (subzone, zone, region), then the most ready endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb: Option<crate::locality::LocalityLb>,
    /// A DestinationRule's `trafficPolicy.portLevelSettings`: for requests to one of the
    /// service's ports, the port's settings replace the policy's connection pool,
    /// outlier detection and load balancer, and a block the port does not set takes its
    /// defaults (Istio's rule: destination-level settings are not inherited). See
    /// [`HttpPolicy::at_port`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_settings: Vec<PortSettings>,
    /// The namespaces whose callers the routes apply to (a VirtualService's `exportTo`,
    /// `.` resolved to its namespace); empty: every caller. A caller of another
    /// namespace, or without one in its SPIFFE ID, is routed as if the service had no
    /// routes (the service itself, every site), the rest of the policy applying. See
    /// [`HttpPolicy::routes_apply_to`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// The importing gateway's retry budget for the service (a DestinationRule's
    /// `trafficPolicy.retryBudget`, Istio 1.27: Envoy's, by retries in flight); `None`:
    /// the gateway's default (20 % of requests plus 10 retries a second, Linkerd's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// A VirtualService's `tcp` routes: for the service's TCP ports, each connection
    /// goes to the first matching route's destinations by weight ([`TcpRoute`]); none
    /// matching: the service itself, every site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_routes: Vec<TcpRoute>,
    /// A VirtualService's `tls` routes: for the service's `tls` ports (Istio's HTTPS and
    /// TLS), each connection goes by its ClientHello's SNI ([`Compiled::tls_route`]).
    /// Each match names its `sni_hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_routes: Vec<TcpRoute>,
}

/// An Istio `tcp` route: a connection it matches goes to one of its destinations,
/// picked by weight once per connection at the importing gateway, at the sites its
/// subset selects ([`subset_sites`], as for HTTP). The subset's endpoint labels
/// ([`endpoint_selector`]) travel in the stream's open request, and the far gateway
/// connects only to an endpoint that holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// Any of them (empty: every connection).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TcpMatch>,
    /// Without header changes.
    pub destinations: Vec<Destination>,
}

/// All of its conditions hold (Istio's `L4MatchAttributes`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpMatch {
    /// The service port the connection was addressed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The address the client connected to (the import's address) is in one of them:
    /// `a.b.c.d[/n]` or IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    /// As [`RequestMatch::source_namespace`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// As [`RequestMatch::source_labels`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// As [`RequestMatch::gateways`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// A TLS route's only (and required there): the ClientHello's SNI is one of them, a
    /// DNS name or a wildcard (`*.example.com`: any name under it; `*`: any SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
}

/// Whether a ClientHello's `sni` is `pattern` (a TLS match's `sniHosts` entry), as
/// Envoy matches a filter chain's `server_names`: exactly, or under a `*.` wildcard at
/// any depth; `*` is any SNI. DNS names compare without case. Pure.
pub fn sni_matches(pattern: &str, sni: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            sni.len() > suffix.len()
                && sni.is_char_boundary(sni.len() - suffix.len())
                && sni[sni.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        None => pattern.eq_ignore_ascii_case(sni),
    }
}

/// What the egress does with a connection to a `tls` port ([`Compiled::tls_route`]).
#[derive(Debug, PartialEq, Eq)]
pub enum TlsPick<'a> {
    /// The first TLS route, by index, whose match holds.
    Route(usize, &'a TcpRoute),
    /// No TLS route applies to this caller and port: the service itself.
    Service,
    /// TLS routes apply, and none matches its SNI and address: refused, as Envoy closes
    /// a connection that no filter chain matches.
    NoMatch,
}

/// A caller the egress knows by its source address (`caller_pod_ip`): its workload
/// identity, and its pod's labels (what Istio's `sourceLabels` match on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownCaller {
    pub id: meshfed_identity::SpiffeId,
    pub labels: std::sync::Arc<BTreeMap<String, String>>,
}

/// What a TCP route's match looks at: where the connection came from and went to.
pub struct TcpView<'a> {
    /// The service port the import stands for.
    pub port: u16,
    /// The address the client connected to.
    pub destination: std::net::IpAddr,
    /// The caller's SPIFFE ID.
    pub caller: &'a str,
    /// The caller's labels, when the gateway knows them.
    pub caller_labels: Option<&'a BTreeMap<String, String>>,
}

/// `a.b.c.d`, `a.b.c.d/n`, or the same in IPv6: the network and its prefix length.
/// Pure.
pub fn parse_subnet(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|_| {
        format!(
            "{:?} is not an IP address or subnet",
            crate::names::clip(s, 64)
        )
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: the prefix length is 0 to {max}"))?,
    };
    Ok((ip, len))
}

/// Whether `ip` is in the subnet `(net, len)` ([`parse_subnet`]); an IPv4 address in
/// IPv6 form counts as IPv4. Pure.
pub fn in_subnet(ip: std::net::IpAddr, (net, len): (std::net::IpAddr, u8)) -> bool {
    use std::net::IpAddr::{V4, V6};
    let bits = |a: u128, b: u128, width: u32| {
        let shift = width - u32::from(len).min(width);
        shift >= width || (a >> shift) == (b >> shift)
    };
    match (ip.to_canonical(), net) {
        (V4(a), V4(b)) => bits(u32::from(a).into(), u32::from(b).into(), 32),
        (V6(a), V6(b)) => bits(a.into(), b.into(), 128),
        _ => false,
    }
}

/// Whether a subset's label `k: v` holds at `site`: the site's name for
/// `topology.istio.io/cluster` and `meshfed.io/site`, else the label's value there
/// (`found`: its export's, or an endpoint's). Pure.
fn site_label_holds(k: &str, v: &str, site: &SiteName, found: Option<&String>) -> bool {
    if k == CLUSTER_LABEL || k == SITE_LABEL {
        v == site.as_str()
    } else {
        found.is_some_and(|f| f == v)
    }
}

/// Envoy's retry budget (Istio's `retryBudget`): a retry may start while the retries
/// in flight are fewer than `per_million` of the requests in flight, or than
/// `min_retry_concurrency`, whichever is more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// Of every million requests in flight (Istio's `percent`; its default 20 %).
    pub per_million: u32,
    /// Retries in flight allowed whatever the share (Istio's default 3).
    pub min_retry_concurrency: u32,
}

/// Namespaces in a policy's `export_to`, at most.
pub const MAX_EXPORT_TO: usize = 64;

/// What a DestinationRule's `portLevelSettings[]` sets for one port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSettings {
    pub port: u16,
    /// `connectionPool`: replaces `max_requests`, `max_requests_per_connection`,
    /// `idle_timeout_ms`, `connect_timeout_ms`, `tcp_keepalive` and `connection_pool` (absent: all unset,
    /// the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PortPool>,
    /// `outlierDetection`: replaces `outlier` (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Outlier>,
    /// `loadBalancer`: replaces `load_balancer`, `consistent_hash` and `locality_lb`
    /// (absent: all unset, the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<PortBalancer>,
}

/// A port's `connectionPool`, as [`HttpPolicy`]'s fields of the same names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// How long the exporting gateway waits for a connection to an endpoint (a
    /// DestinationRule's `connectionPool.tcp.connectTimeout`); `None`: the
    /// gateway's `connect_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Keepalive probes on the exporting gateway's connections to the endpoints (a
    /// DestinationRule's `connectionPool.tcp.tcpKeepalive`); `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
}

/// A port's `loadBalancer`, as [`HttpPolicy`]'s fields of the same names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortBalancer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<crate::affinity::HashKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb: Option<crate::locality::LocalityLb>,
}

/// Port settings per policy, at most (a Service has at most this many ports worth
/// tuning apart; each is checked as a policy of its own).
pub const MAX_PORT_SETTINGS: usize = 64;

impl HttpPolicy {
    /// `routes` for `service` from `source`, with no subsets and no traffic policy (a
    /// DestinationRule's settings are set on the result).
    pub fn new(service: ServiceName, source: String, routes: Vec<HttpRoute>) -> Self {
        Self {
            service,
            source,
            routes,
            subsets: Vec::new(),
            max_requests: None,
            max_requests_per_connection: None,
            idle_timeout_ms: None,
            connect_timeout_ms: None,
            tcp_keepalive: None,
            connection_pool: None,
            outlier: None,
            load_balancer: None,
            consistent_hash: None,
            locality_lb: None,
            port_settings: Vec::new(),
            export_to: Vec::new(),
            retry_budget: None,
            tcp_routes: Vec::new(),
            tls_routes: Vec::new(),
        }
    }

    /// The policy for requests to `port`: the first of its [`PortSettings`] for that port
    /// in place of the policy's connection pool, outlier detection and load balancer,
    /// a block the port does not set taking its defaults (Istio's `portLevelSettings`,
    /// as pilot's `GetPortLevelTrafficPolicy`: destination-level settings are not
    /// inherited). Borrowed, so free, when no setting names the port. Pure.
    pub fn at_port(&self, port: u16) -> std::borrow::Cow<'_, HttpPolicy> {
        match self.port_setting(port) {
            None => std::borrow::Cow::Borrowed(self),
            Some(s) => {
                let mut p = self.clone();
                p.port_settings.clear();
                p.apply_port(s);
                std::borrow::Cow::Owned(p)
            }
        }
    }

    /// [`Self::at_port`] on an owned policy; the result carries no port settings.
    pub fn for_port(mut self, port: u16) -> HttpPolicy {
        if let Some(s) = self.port_settings.iter().position(|s| s.port == port) {
            let s = self.port_settings.swap_remove(s);
            self.apply_port(&s);
        }
        self.port_settings.clear();
        self
    }

    /// Whether the routes apply to a request from `caller` (a SPIFFE ID): `export_to`
    /// is empty or names the namespace of the caller's path (`.../ns/<ns>/...`). Pure.
    pub fn routes_apply_to(&self, caller: &str) -> bool {
        self.export_to.is_empty()
            || crate::authz::namespace(caller)
                .is_some_and(|ns| self.export_to.iter().any(|e| e == ns))
    }

    /// The first of the policy's [`PortSettings`] for `port`.
    fn port_setting(&self, port: u16) -> Option<&PortSettings> {
        self.port_settings.iter().find(|s| s.port == port)
    }

    fn apply_port(&mut self, s: &PortSettings) {
        let Traffic {
            pool,
            outlier,
            balancer,
        } = Traffic::of_port(s);
        self.max_requests = pool.max_requests;
        self.max_requests_per_connection = pool.max_requests_per_connection;
        self.idle_timeout_ms = pool.idle_timeout_ms;
        self.connect_timeout_ms = pool.connect_timeout_ms;
        self.tcp_keepalive = pool.tcp_keepalive;
        self.connection_pool = pool.connection_pool;
        self.outlier = outlier;
        self.load_balancer = balancer.load_balancer;
        self.consistent_hash = balancer.consistent_hash;
        self.locality_lb = balancer.locality_lb;
    }

    /// The policy's own blocks, its port settings aside.
    fn own_traffic(&self) -> Traffic {
        Traffic {
            pool: PortPool {
                max_requests: self.max_requests,
                max_requests_per_connection: self.max_requests_per_connection,
                idle_timeout_ms: self.idle_timeout_ms,
                connect_timeout_ms: self.connect_timeout_ms,
                tcp_keepalive: self.tcp_keepalive,
                connection_pool: self.connection_pool,
            },
            outlier: self.outlier.clone(),
            balancer: PortBalancer {
                load_balancer: self.load_balancer,
                consistent_hash: self.consistent_hash.clone(),
                locality_lb: self.locality_lb.clone(),
            },
        }
    }

    /// The settings in force for requests to `port` of `subset` (`None`: the whole
    /// service), as pilot's `MergeSubsetTrafficPolicy` merges them: the destination's
    /// at the port ([`Self::at_port`]); then, when the subset has a policy, its own
    /// port setting for `port` in place of all of them, else each block the subset
    /// sets in place of that block. Pure.
    pub fn traffic(&self, port: u16, subset: Option<&Subset>) -> Traffic {
        let mut t = match self.port_setting(port) {
            Some(s) => Traffic::of_port(s),
            None => self.own_traffic(),
        };
        let Some(sp) = subset.and_then(|s| s.policy.as_ref()) else {
            return t;
        };
        match sp.port_settings.iter().find(|s| s.port == port) {
            Some(s) => t = Traffic::of_port(s),
            None => {
                if let Some(p) = sp.pool {
                    t.pool = p;
                }
                if let Some(o) = &sp.outlier {
                    t.outlier = Some(o.clone());
                }
                if let Some(b) = &sp.balancer {
                    t.balancer = b.clone();
                }
            }
        }
        t
    }
}

/// Istio's `LoadBalancerSettings.simple`, applied across sites at the importing gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LoadBalancer {
    /// Each request to the next site in turn.
    RoundRobin,
    /// Of two sites picked at random, the one with fewer requests in flight from this
    /// gateway (Envoy's power of two choices).
    LeastRequest,
    /// A site picked at random.
    Random,
}

/// Istio's `connectionPool` limits, applied by the exporting site's gateway to the
/// service's HTTP/1.1 endpoints (an h2 endpoint is one multiplexed connection, which
/// `max_requests` bounds at each importing gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPool {
    /// The most connections to the endpoints at once (one per HTTP/1.1 request in
    /// flight, until its answer's body ends).
    pub max_connections: u32,
    /// Requests that wait for one of them; past it, 503 `overflow` at once (Envoy's
    /// default, 1024, when the DestinationRule does not say: a wait is never unbounded).
    pub max_pending: u32,
}

/// `max_pending` when a DestinationRule sets `maxConnections` and no
/// `http1MaxPendingRequests` (Envoy's own default).
pub const DEFAULT_MAX_PENDING: u32 = 1024;

/// Istio's `connectionPool.tcp.tcpKeepalive`: keepalive probes on the exporting
/// gateway's connections to the service's endpoints. An unset field is the kernel's
/// (Linux: 2 h before the first probe, 75 s between probes, 9 probes). The kernel takes
/// whole seconds: a time is rounded down, to at least 1 s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpKeepalive {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
}

/// The longest keepalive time or interval (Linux's `TCP_KEEPIDLE` and `TCP_KEEPINTVL`
/// bound, 32,767 s).
pub const MAX_KEEPALIVE_MS: u64 = 32_767_000;
/// The most keepalive probes (Linux's `TCP_KEEPCNT` bound).
pub const MAX_KEEPALIVE_PROBES: u32 = 127;

/// Istio's `OutlierDetection`, applied per site at the importing gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// 5xx answers (and lost requests) in a row that eject a site; 0: off.
    pub consecutive_5xx: u32,
    /// 502, 503, 504 answers (and lost requests) in a row that eject a site; 0: off.
    pub consecutive_gateway: u32,
    /// An ejection lasts this long times the site's ejections so far (at most 300 s).
    pub base_ejection_ms: u64,
    /// At most this share of the sites is ejected at once, and never all of them.
    pub max_ejection_percent: u32,
    /// Istio's `interval` (`None`: its default, [`DEFAULT_OUTLIER_INTERVAL_MS`]): each
    /// whole interval a host spends back in service after an ejection takes one off its
    /// ejections so far, so the next ejection is shorter again (Envoy's decrement of the
    /// ejection multiplier at each sweep). Answers are counted as they come, not at the
    /// sweeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
}

/// Istio's default `outlierDetection.interval`.
pub const DEFAULT_OUTLIER_INTERVAL_MS: u64 = 10_000;

impl Outlier {
    /// The interval in force.
    pub fn interval(&self) -> u64 {
        self.interval_ms.unwrap_or(DEFAULT_OUTLIER_INTERVAL_MS)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The subset's own `trafficPolicy` (see [`HttpPolicy::traffic`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SubsetPolicy>,
}

/// A DestinationRule subset's `trafficPolicy`: each block it sets replaces the
/// destination's (at the port) for requests to the subset, and its own port settings
/// replace all of them for their port (pilot's `MergeSubsetTrafficPolicy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsetPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PortPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Outlier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<PortBalancer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_settings: Vec<PortSettings>,
}

/// The connection pool, outlier detection and load balancer in force for requests to
/// one port (and subset) of a service: [`HttpPolicy::traffic`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub pool: PortPool,
    pub outlier: Option<Outlier>,
    pub balancer: PortBalancer,
}

impl Traffic {
    /// A port setting's blocks, every one it omits at its default.
    fn of_port(s: &PortSettings) -> Self {
        Self {
            pool: s.pool.unwrap_or_default(),
            outlier: s.outlier.clone(),
            balancer: s.balancer.clone().unwrap_or_default(),
        }
    }

    /// The settings' own rules (limits above 0, one balancer, percentages), with the
    /// field names of [`HttpPolicy`]'s.
    fn check(&self) -> Result<(), PolicyError> {
        let (p, b) = (&self.pool, &self.balancer);
        if p.max_requests == Some(0) {
            return Err(bad("max_requests", "must be above 0"));
        }
        if let Some(k) = &b.consistent_hash {
            if b.load_balancer.is_some() {
                return Err(bad(
                    "consistent_hash",
                    "a load balancer is simple or consistentHash, not both",
                ));
            }
            k.check().map_err(|e| bad("consistent_hash", e))?;
        }
        if p.max_requests_per_connection == Some(0) {
            return Err(bad("max_requests_per_connection", "must be above 0"));
        }
        if p.idle_timeout_ms == Some(0) {
            return Err(bad("idle_timeout_ms", "must be above 0"));
        }
        if p.connect_timeout_ms == Some(0) {
            return Err(bad("connect_timeout_ms", "must be above 0"));
        }
        if let Some(k) = &p.tcp_keepalive {
            for (what, v, max) in [
                ("time_ms", k.time_ms, MAX_KEEPALIVE_MS),
                ("interval_ms", k.interval_ms, MAX_KEEPALIVE_MS),
                (
                    "probes",
                    k.probes.map(u64::from),
                    u64::from(MAX_KEEPALIVE_PROBES),
                ),
            ] {
                if v.is_some_and(|v| !(1..=max).contains(&v)) {
                    return Err(bad(format!("tcp_keepalive.{what}"), format!("1 to {max}")));
                }
            }
        }
        if let Some(c) = &p.connection_pool {
            if c.max_connections == 0 {
                return Err(bad("connection_pool.max_connections", "must be above 0"));
            }
            if c.max_pending == 0 {
                return Err(bad("connection_pool.max_pending", "must be above 0"));
            }
        }
        if let Some(o) = &self.outlier {
            if o.max_ejection_percent > 100 {
                return Err(bad("outlier.max_ejection_percent", "above 100"));
            }
            if o.base_ejection_ms == 0 {
                return Err(bad("outlier.base_ejection_ms", "must be above 0"));
            }
            if o.interval_ms == Some(0) {
                return Err(bad("outlier.interval_ms", "must be above 0"));
            }
        }
        if let Some(l) = &b.locality_lb {
            l.check().map_err(|e| {
                let field = if e.field.is_empty() {
                    "locality_lb".to_owned()
                } else {
                    format!("locality_lb.{}", e.field)
                };
                bad(field, e.message)
            })?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any of them (empty: every request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RequestMatch>,
    pub destinations: Vec<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Faults injected at the egress, for resilience tests (Istio's `fault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Copies of each request (each of its own share) sent to subsets or other
    /// services, their answers discarded (Istio's `mirror` or `mirrors`, Gateway API's
    /// `RequestMirror` filters). On the wire the key is `mirror`: one mirror is written
    /// as an object, as before there could be several, so a gateway that knows only one
    /// still reads it; several are a list.
    #[serde(
        rename = "mirror",
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "one_or_many"
    )]
    pub mirrors: Vec<Mirror>,
    /// Header changes on the request and on its answer (Istio's `headers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeaderRules>,
    /// The path or authority the request leaves with (Istio's `rewrite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Answered at the egress with a redirect, never forwarded (Istio's `redirect`); a
    /// route with one has no destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    /// Answered at the egress with this status and body, never forwarded (Istio's
    /// `directResponse`); a route with one has no destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    /// A token bucket for the route at each importing gateway; past it, 429 with
    /// `retry-after` (the `ratelimit.meshfed.io/` annotations of a VirtualService).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Cross-origin requests (Istio's `corsPolicy`), answered and marked at the egress
    /// ([`crate::cors`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Box<crate::cors::Cors>>,
}

/// Istio's `Headers`: what changes on the request before it leaves, and on the answer
/// before the client sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request: HeaderOps,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response: HeaderOps,
}

/// Applied in Envoy's order: `remove`, then `set` (replaces), then `add` (appends).
/// Names are lower-case.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Istio's `HTTPRewrite`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the prefix the route matched on, or the whole path when it matched
    /// otherwise; the query string stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replaces the `Host` (`:authority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Replaces every match of a regex in the path (Istio's `uriRegexRewrite`); not
    /// beside `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex: Option<RegexRewrite>,
}

/// Istio's `RegexRewrite`, as Envoy's `regex_rewrite` applies it: every match of
/// `pattern` in the path (not the query string) is replaced with `substitution`, RE2's
/// rewrite string (`\1` a group, `\\` a backslash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    pub pattern: String,
    pub substitution: String,
}

/// A compiled [`RegexRewrite`].
#[derive(Debug)]
pub struct UriRegex {
    regex: regex::Regex,
    /// The substitution in the `regex` crate's syntax.
    replacement: String,
}

impl RegexRewrite {
    /// Compiles the pattern (size-limited) and checks the substitution as RE2's
    /// `CheckRewriteString` does: `\` is followed by a digit naming a group the pattern
    /// has, or by `\`.
    pub fn compile(&self, field: &str) -> Result<UriRegex, PolicyError> {
        if self.substitution.len() > MAX_HEADER_VALUE {
            return Err(bad(
                format!("{field}.substitution"),
                format!("at most {MAX_HEADER_VALUE} bytes"),
            ));
        }
        let regex = regex::RegexBuilder::new(&self.pattern)
            .size_limit(REGEX_SIZE)
            .build()
            .map_err(|e| bad(format!("{field}.pattern"), format!("{e}")))?;
        let groups = regex.captures_len() - 1;
        let mut replacement = String::with_capacity(self.substitution.len());
        let mut chars = self.substitution.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('\\') => replacement.push('\\'),
                    Some(d @ '0'..='9') => {
                        let n = d as usize - '0' as usize;
                        if n > groups {
                            return Err(bad(
                                format!("{field}.substitution"),
                                format!("\\{n}: the pattern has {groups} groups"),
                            ));
                        }
                        replacement.push_str(&format!("${{{n}}}"));
                    }
                    _ => {
                        return Err(bad(
                            format!("{field}.substitution"),
                            "a backslash is followed by a group's digit or a backslash",
                        ));
                    }
                },
                '$' => replacement.push_str("$$"),
                c => replacement.push(c),
            }
        }
        Ok(UriRegex { regex, replacement })
    }
}

/// The longest path a regex rewrite may make (a substitution repeating a group could
/// otherwise grow a path without bound).
pub const MAX_REWRITTEN_PATH: usize = 8192;

impl UriRegex {
    /// `path_and_query` with every match in its path replaced; the query string stays.
    /// `None`: the path would grow past [`MAX_REWRITTEN_PATH`]. Pure.
    pub fn apply(&self, path_and_query: &str) -> Option<String> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let mut out = String::with_capacity(path_and_query.len());
        let mut last = 0;
        for caps in self.regex.captures_iter(path) {
            let m = caps.get(0)?;
            out.push_str(&path[last..m.start()]);
            caps.expand(&self.replacement, &mut out);
            last = m.end();
            if out.len() > MAX_REWRITTEN_PATH {
                return None;
            }
        }
        out.push_str(&path[last..]);
        if out.len() > MAX_REWRITTEN_PATH {
            return None;
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

/// Istio's `HTTPRedirect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// Replaces the whole path (the query string stays unless it has its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 (Istio's default), 302, 303, 307 or 308.
    pub code: u16,
}

/// Istio's `HTTPDirectResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    /// 200 to 599.
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<DirectBody>,
}

/// Istio's `HTTPBody`: text, or bytes as base64 (standard alphabet, as YAML and JSON
/// carry protobuf bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DirectBody {
    String(String),
    Bytes(String),
}

/// The largest direct response body: it travels with the policy to every importing
/// site, inside the exporting site's entry in the store (etcd takes 1.5 MiB per request
/// by default). Envoy's own default is 4 KiB; Istio raises it to 1 MB.
pub const MAX_DIRECT_BODY: usize = 64 * 1024;

impl DirectBody {
    /// The body's bytes; `bytes` that are not base64 are an error. As protobuf's JSON
    /// reads bytes: the standard or the URL-safe alphabet, padded or not.
    pub fn decode(&self) -> Result<Vec<u8>, String> {
        use base64::Engine;
        use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
        const ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        match self {
            Self::String(s) => Ok(s.clone().into_bytes()),
            Self::Bytes(b) => ANY_PADDING
                .decode(b.replace('-', "+").replace('_', "/"))
                .map_err(|e| format!("not base64: {e}")),
        }
    }
}

/// `requests` per `per_ms`, with bursts of up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    pub per_ms: u64,
    pub burst: u32,
}

/// Istio's `mirror` and `mirrorPercentage` (Gateway API's `RequestMirror`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// Another service the copies go to (a new version that is a Service of its own),
    /// through the importing gateway's import of it, as a [`Destination`]'s. `None`: the
    /// policy's own service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
    /// That service's port; `None`: the port the request came in on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// A subset of the mirror's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Of every million requests.
    pub per_million: u32,
}

impl Mirror {
    /// The service this mirror names other than `own`, if any.
    pub fn other_service<'a>(&'a self, own: &ServiceName) -> Option<&'a ServiceName> {
        self.service.as_ref().filter(|s| *s != own)
    }
}

/// A route's mirrors on the wire: absent when none, an object when one (the form every
/// gateway reads), a list when several; either form is read.
mod one_or_many {
    use super::Mirror;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[Mirror], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(Mirror),
        Many(Vec<Mirror>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Mirror>, D::Error> {
        Ok(match Form::deserialize(d)? {
            Form::One(m) => vec![m],
            Form::Many(v) => v,
        })
    }
}

/// Istio's `HTTPFaultInjection`: a fixed delay and an abort, each for a share of the
/// requests, in millionths (Istio's `percentage.value` is a double in percent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay_ms: u64,
    /// Of every million requests.
    pub per_million: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub http_status: u16,
    /// Of every million requests.
    pub per_million: u32,
}

/// Whether a fault applying to `per_million` requests hits the request whose uniform
/// roll is `roll`. Pure.
pub fn hits(per_million: u32, roll: u32) -> bool {
    ((u64::from(roll) * 1_000_000) >> 32) < u64::from(per_million)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first attempt (Istio's `attempts`).
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// What is retried (Istio's `retryOn`, Gateway API's `codes`); `None`: the
    /// gateway's default (connect failures, resets, 502, 503 and 504). Shared: each
    /// request's plan holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<std::sync::Arc<RetryOn>>,
    /// The base of the wait before a retry (Istio's `backoff`, Gateway API's
    /// `retry.backoff`), at most [`MAX_RETRY_BACKOFF_MS`]; `None`:
    /// [`DEFAULT_RETRY_BACKOFF_MS`], Envoy's. Retry n waits a uniform random time below
    /// (2^n − 1) × base, at most 10 × base (Envoy's fully jittered back-off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
}

/// The base of the retry back-off when a route sets none (Envoy's, which Istio uses).
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 25;
/// The largest back-off base a route may carry: a peer's route could otherwise hold
/// each retried request for days.
pub const MAX_RETRY_BACKOFF_MS: u64 = 60_000;

/// The outcomes a route retries, by Envoy's `x-envoy-retry-on` conditions as Istio's
/// `retryOn` names them. Whatever it says, only a request that never reached the far
/// side, or an idempotent one, is retried.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOn {
    /// `5xx`: any 5xx answer, and no answer at all (a connect failure, a refused
    /// stream, a reset).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub five_xx: bool,
    /// `gateway-error`: 502, 503, 504, and no answer at all (Envoy counts a reset as
    /// the 503 it becomes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway_error: bool,
    /// `connect-failure`: the request was never sent (no connection, or the far
    /// gateway refused it before its endpoint saw it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub connect_failure: bool,
    /// `refused-stream`: as `connect-failure` here (a stream refused is not sent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused_stream: bool,
    /// `reset`: no answer at all, sent or not (a disconnect, a reset, a per-try
    /// timeout).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// `retriable-4xx`: 409.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retriable_4xx: bool,
    /// HTTP statuses retried (`retryOn`'s numbers, `retriable-status-codes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// gRPC statuses retried when an answer's headers carry them (`cancelled` 1,
    /// `deadline-exceeded` 4, `resource-exhausted` 8, `internal` 13, `unavailable` 14).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_codes: Vec<u32>,
}

/// Istio's gRPC `retryOn` conditions and their status codes.
pub const GRPC_RETRY_ON: [(&str, u32); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

impl RetryOn {
    /// Whether an attempt that was never sent is retried.
    pub fn not_sent(&self) -> bool {
        self.five_xx
            || self.gateway_error
            || self.connect_failure
            || self.refused_stream
            || self.reset
    }

    /// Whether an attempt sent and left without an answer is retried.
    pub fn lost(&self) -> bool {
        self.five_xx || self.gateway_error || self.reset
    }

    /// Whether an answer with `status` (and the gRPC status its headers carry) is
    /// retried.
    pub fn status(&self, status: u16, grpc: Option<u32>) -> bool {
        (self.five_xx && (500..=599).contains(&status))
            || (self.gateway_error && (502..=504).contains(&status))
            || (self.retriable_4xx && status == 409)
            || self.status_codes.contains(&status)
            || grpc.is_some_and(|g| self.grpc_codes.contains(&g))
    }
}

/// Statuses a route may list to retry, at most.
pub const MAX_RETRY_CODES: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Another service the request goes to instead (a canary that is a Service of its
    /// own, as Gateway API's `backendRefs` and Istio's `destination.host` name it); the
    /// importing gateway sends it through its import of that service. `None`: the
    /// policy's own service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
    /// That service's port; `None`: the port the request came in on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// A subset of the destination's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Relative to the route's other destinations (Istio's add up to 100; Gateway API's
    /// need not). A route whose weights are all 0 sends nothing (500, Gateway API's rule).
    pub weight: u32,
    /// Header changes when this destination is picked (Istio's `route[].headers`,
    /// Gateway API's `backendRefs[].filters`), applied before the route's own (Envoy's
    /// order: a weighted cluster's, then the route's, whose `set` wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Box<HeaderRules>>,
}

impl Destination {
    /// The policy's own service, all of the traffic.
    pub fn all() -> Self {
        Self {
            service: None,
            port: None,
            subset: None,
            weight: 100,
            headers: None,
        }
    }

    /// The service this destination names other than `own`, if any.
    pub fn other_service<'a>(&'a self, own: &ServiceName) -> Option<&'a ServiceName> {
        self.service.as_ref().filter(|s| *s != own)
    }
}

/// All of its conditions hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// By lower-case header name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Headers that must not match (Istio's `withoutHeaders`, Envoy's inverted header
    /// matchers): a request whose header matches one is not matched. A missing header
    /// is tested as empty, and a `present` condition holds only when it is missing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// The request's authority (`:authority`, or `Host` on HTTP/1.1) as it arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// `http` or `https`, as the request arrived at the egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    /// The service port the request was addressed to (Istio's match `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Exact and prefix `uri` conditions ignore ASCII case (Istio's `ignoreUriCase`,
    /// Envoy's `case_sensitive: false`); a regex does not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    /// The caller's namespace: the `ns/<namespace>` segment of its SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Labels the caller carries, all of them (Istio's `sourceLabels`). A gateway that
    /// does not know its caller's labels matches no such condition.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Istio's `gateways` on a match: it applies at meshfed's egress, which stands where
    /// Istio's sidecars do, only when the list names `mesh` (empty: it applies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2 syntax, matched against the whole value (as Envoy does).
    Regex(String),
    /// Gateway API's `PathPrefix`: by path element, so `/foo` accepts `/foo`, `/foo/`
    /// and `/foo/bar` but not `/foobar`; a trailing `/` is ignored.
    PathPrefix(String),
    /// The header or query parameter is there, whatever its value (Istio's `{}`,
    /// Envoy's `present_match`); on the path, method, authority or scheme, always true.
    Present,
}

/// A policy that does not hold together; names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

pub(crate) fn bad(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
    }
}

/// The most routes, matches and destinations one policy may have: a policy comes from
/// another site, and every request walks it. 128 routes: a Gateway API route's rules
/// hold at most 128 matches (the CRD's rule), and each becomes a route of its own in
/// the Gateway API's precedence.
pub const MAX_ROUTES: usize = 128;
pub const MAX_MATCHES: usize = 16;
pub const MAX_DESTINATIONS: usize = 16;
/// Mirrors per route, at most (Gateway API's bound on a rule's filters): every copy is a
/// request of its own.
pub const MAX_MIRRORS: usize = 16;
/// The largest weight (Gateway API's bound).
pub const MAX_WEIGHT: u32 = 1_000_000;
/// The most bytes a compiled regex may take (the `regex` crate's size limit).
const REGEX_SIZE: usize = 64 * 1024;

impl StringMatch {
    pub(crate) fn compile(&self, field: &str) -> Result<Matcher, PolicyError> {
        Ok(match self {
            Self::Exact(s) => Matcher::Exact(s.clone()),
            Self::Prefix(s) => Matcher::Prefix(s.clone()),
            Self::PathPrefix(s) => Matcher::PathPrefix(s.trim_end_matches('/').to_owned()),
            Self::Present => Matcher::Present,
            Self::Regex(r) => Matcher::Regex(
                regex::RegexBuilder::new(&format!("^(?:{r})$"))
                    .size_limit(REGEX_SIZE)
                    .build()
                    .map_err(|e| bad(format!("{field}.regex"), format!("{r:?}: {e}")))?,
            ),
        })
    }

    /// A `uri` condition, with ASCII case ignored when `fold` (`ignore_uri_case`) for
    /// exact and prefix conditions.
    fn compile_path(&self, field: &str, fold: bool) -> Result<Matcher, PolicyError> {
        Ok(match (self.compile(field)?, fold) {
            (Matcher::Exact(s), true) => Matcher::ExactFold(s),
            (Matcher::Prefix(s), true) => Matcher::PrefixFold(s),
            (Matcher::PathPrefix(s), true) => Matcher::PathPrefixFold(s),
            (m, _) => m,
        })
    }
}

/// Conditions of one kind in one match (headers, query parameters, labels, gateways), at
/// most: every request walks them.
pub const MAX_MATCH_CONDITIONS: usize = 32;

/// A match's own bounds and names (its strings are checked as they compile); `g`
/// makes field paths.
fn check_match(m: &RequestMatch, g: &dyn Fn(&str) -> String) -> Result<(), PolicyError> {
    for (what, n) in [
        ("headers", m.headers.len()),
        ("query_params", m.query_params.len()),
        ("without_headers", m.without_headers.len()),
        ("source_labels", m.source_labels.len()),
        ("gateways", m.gateways.len()),
    ] {
        if n > MAX_MATCH_CONDITIONS {
            return Err(bad(g(what), format!("at most {MAX_MATCH_CONDITIONS}")));
        }
    }
    if m.port == Some(0) {
        return Err(bad(g("port"), "0: 1 to 65535"));
    }
    if let Some(ns) = &m.source_namespace
        && (ns.contains('.') || !crate::names::dns_subdomain(ns))
    {
        return Err(bad(
            g("source_namespace"),
            format!(
                "{:?} is not a namespace (a DNS label)",
                crate::names::clip(ns, crate::names::QUOTE_MAX)
            ),
        ));
    }
    check_labels(&m.source_labels).map_err(|(k, why)| bad(g(&format!("source_labels{k}")), why))?;
    if let Some((i, _)) = m
        .gateways
        .iter()
        .enumerate()
        .find(|(_, n)| n.is_empty() || n.len() > 253)
    {
        return Err(bad(g(&format!("gateways[{i}]")), "not a gateway name"));
    }
    Ok(())
}

/// A compiled string condition.
#[derive(Clone, Debug)]
pub(crate) enum Matcher {
    Exact(String),
    Prefix(String),
    /// Without its trailing `/` (so `/` is empty and accepts every path).
    PathPrefix(String),
    Regex(regex::Regex),
    /// Any value.
    Present,
    /// The three above, ignoring ASCII case (`ignore_uri_case`).
    ExactFold(String),
    PrefixFold(String),
    PathPrefixFold(String),
}

/// `v` without a leading `prefix`, its ASCII case ignored when `fold`.
fn strip_prefix_folded<'v>(v: &'v str, prefix: &str, fold: bool) -> Option<&'v str> {
    if !fold {
        return v.strip_prefix(prefix);
    }
    let head = v.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &v[prefix.len()..])
}

impl Matcher {
    pub(crate) fn test(&self, v: &str) -> bool {
        let by_element = |s: &str, fold| {
            strip_prefix_folded(v, s, fold)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        match self {
            Self::Exact(s) => v == s,
            Self::Prefix(s) => v.starts_with(s.as_str()),
            Self::PathPrefix(s) => by_element(s, false),
            Self::Regex(r) => r.is_match(v),
            Self::Present => true,
            Self::ExactFold(s) => v.eq_ignore_ascii_case(s),
            Self::PrefixFold(s) => strip_prefix_folded(v, s, true).is_some(),
            Self::PathPrefixFold(s) => by_element(s, true),
        }
    }

    /// The prefix a prefix condition matched, for rewrites.
    fn prefix(&self) -> Option<&str> {
        match self {
            Self::Prefix(p)
            | Self::PathPrefix(p)
            | Self::PrefixFold(p)
            | Self::PathPrefixFold(p) => Some(p),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct CompiledMatch {
    /// `false`: the match never applies at meshfed's egress (its `gateways` do not
    /// name `mesh`).
    applies: bool,
    uri: Option<Matcher>,
    method: Option<Matcher>,
    headers: Vec<(String, Matcher)>,
    query: Vec<(String, Matcher)>,
    without_headers: Vec<(String, Matcher)>,
    authority: Option<Matcher>,
    scheme: Option<Matcher>,
    port: Option<u16>,
    source_namespace: Option<String>,
    source_labels: BTreeMap<String, String>,
}

/// What a match looks at in a request, and in where it came from.
pub trait RequestView {
    fn path(&self) -> &str;
    fn method(&self) -> &str;
    /// The first value of a header (lower-case name); `:path` is the path with its
    /// query (the other pseudo-headers come from the methods below).
    fn header(&self, name: &str) -> Option<&str>;
    /// The query string, without `?`.
    fn query(&self) -> Option<&str>;
    /// The request's authority: `:authority`, or the `Host` header.
    fn authority(&self) -> Option<&str> {
        self.header("host")
    }
    /// The scheme the request arrived with: `http` or `https`.
    fn scheme(&self) -> &str {
        "http"
    }
    /// The service port the request was addressed to, when known.
    fn port(&self) -> Option<u16> {
        None
    }
    /// The caller's SPIFFE ID, when known.
    fn caller(&self) -> Option<&str> {
        None
    }
    /// The caller's labels, when the gateway knows them.
    fn caller_labels(&self) -> Option<&BTreeMap<String, String>> {
        None
    }
}

/// A header as Envoy's header matchers see it: the request's pseudo-headers
/// `:method`, `:authority` and `:scheme` from the request line; `:path` and the rest
/// as the view gives them.
fn header<'r>(r: &'r dyn RequestView, name: &str) -> Option<&'r str> {
    match name {
        ":method" => Some(r.method()),
        ":authority" => r.authority(),
        ":scheme" => Some(r.scheme()),
        _ => r.header(name),
    }
}

impl CompiledMatch {
    fn test(&self, r: &dyn RequestView) -> bool {
        self.applies
            && self.port.is_none_or(|p| r.port() == Some(p))
            && self.uri.as_ref().is_none_or(|m| m.test(r.path()))
            && self.method.as_ref().is_none_or(|m| m.test(r.method()))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| r.authority().is_some_and(|v| m.test(v)))
            && self.scheme.as_ref().is_none_or(|m| m.test(r.scheme()))
            && self
                .headers
                .iter()
                .all(|(n, m)| header(r, n).is_some_and(|v| m.test(v)))
            && self
                .without_headers
                .iter()
                .all(|(n, m)| match (header(r, n), m) {
                    (v, Matcher::Present) => v.is_none(),
                    // Envoy's `treat_missing_header_as_empty`, inverted.
                    (v, m) => !m.test(v.unwrap_or("")),
                })
            && self.query.iter().all(|(n, m)| {
                r.query().is_some_and(|q| {
                    q.split('&').any(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        k == n && m.test(v)
                    })
                })
            })
            && caller_holds(
                self.source_namespace.as_deref(),
                &self.source_labels,
                r.caller(),
                r.caller_labels(),
            )
    }
}

/// Whether the caller (its SPIFFE ID and, when known, its labels) is in `namespace`
/// (`None`: any) and carries all of `labels` (an HTTP or a TCP match's source
/// conditions). Pure.
fn caller_holds(
    namespace: Option<&str>,
    labels: &BTreeMap<String, String>,
    caller: Option<&str>,
    caller_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    namespace.is_none_or(|ns| {
        caller
            .and_then(crate::authz::namespace)
            .is_some_and(|c| c == ns)
    }) && (labels.is_empty() || caller_labels.is_some_and(|l| selected(labels, l)))
}

/// A validated policy, ready for requests.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub policy: HttpPolicy,
    matches: Vec<Vec<CompiledMatch>>,
    /// Per route, its CORS policy's origins (empty without one).
    cors: Vec<Vec<Matcher>>,
    /// Per route, its direct response's body, decoded.
    direct: Vec<Option<Vec<u8>>>,
    /// Per route, its rewrite's `uri_regex`, compiled.
    uri_regex: Vec<Option<std::sync::Arc<UriRegex>>>,
    /// Per TCP route, its matches compiled.
    tcp: Vec<Vec<CompiledTcpMatch>>,
    /// The same per TLS route.
    tls: Vec<Vec<CompiledTcpMatch>>,
    /// The service ports the HTTP routes are restricted to (every match names one of
    /// them); `None` when some route may apply on any port.
    only_ports: Option<Vec<u16>>,
}

/// The most header changes one route may carry, and the longest value.
pub const MAX_HEADER_OPS: usize = 32;
pub const MAX_HEADER_VALUE: usize = 4096;

/// Header names a route may not change: hop-by-hop headers, `host` (use
/// `rewrite.authority`), and meshfed's own.
fn reserved_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "x-forwarded-client-cert"
    ) || name.starts_with("meshfed-")
        || name.starts_with(':')
}

/// An RFC 9110 token, lower-case.
fn header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

fn header_value_ok(v: &str) -> bool {
    v.len() <= MAX_HEADER_VALUE && v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A route's or a destination's header changes at `at` (`f` makes field paths).
fn check_header_rules(
    h: &HeaderRules,
    at: &str,
    f: &dyn Fn(&str) -> String,
) -> Result<(), PolicyError> {
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        let n = ops.set.len() + ops.add.len() + ops.remove.len();
        if n > MAX_HEADER_OPS {
            return Err(bad(
                f(&format!("{at}.{side}")),
                format!("at most {MAX_HEADER_OPS} changes"),
            ));
        }
        let names = ops
            .set
            .iter()
            .map(|(k, v)| ("set", k, Some(v)))
            .chain(ops.add.iter().map(|(k, v)| ("add", k, Some(v))))
            .chain(ops.remove.iter().map(|k| ("remove", k, None)));
        for (op, name, value) in names {
            if let Some(why) = header_change_problem(name, value.map(String::as_str)) {
                return Err(bad(f(&format!("{at}.{side}.{op}.{name}")), why));
            }
        }
    }
    Ok(())
}

/// What is wrong with a route changing header `name` (lower-case) to `value` (`None`:
/// removing it), if anything: the check a policy gets at every importer, for parsers
/// to name the field it came from. Pure.
pub fn header_change_problem(name: &str, value: Option<&str>) -> Option<String> {
    if !header_name_ok(name) {
        return Some("not a lower-case HTTP header name".into());
    }
    if reserved_header(name) {
        return Some("hop-by-hop, host and meshfed-* headers cannot be changed by a route".into());
    }
    if value.is_some_and(|v| !header_value_ok(v)) {
        return Some(format!(
            "a value of at most {MAX_HEADER_VALUE} bytes with no control characters"
        ));
    }
    None
}

/// Headers, rewrite, redirect, direct response and rate limit of one route (`f` makes
/// field paths); the direct response's body, decoded (checking it needs it).
fn check_route_extras(
    r: &HttpRoute,
    f: &dyn Fn(&str) -> String,
) -> Result<Option<Vec<u8>>, PolicyError> {
    if let Some(h) = &r.headers {
        check_header_rules(h, "headers", f)?;
    }
    if let Some(rw) = &r.rewrite {
        if rw.uri.is_some() && rw.uri_regex.is_some() {
            return Err(bad(
                f("rewrite"),
                "rewrite may only contain one of uri or uri_regex",
            ));
        }
        if let Some(u) = &rw.uri
            && (!u.starts_with('/') || !header_value_ok(u) || u.contains(' '))
        {
            return Err(bad(f("rewrite.uri"), format!("{u:?} is not a path")));
        }
        if let Some(a) = &rw.authority
            && (a.is_empty() || !header_value_ok(a) || a.contains(['/', ' ', '@']))
        {
            return Err(bad(
                f("rewrite.authority"),
                format!("{a:?} is not a host[:port]"),
            ));
        }
        if r.redirect.is_some() {
            return Err(bad(f("rewrite"), "a redirect cannot also rewrite"));
        }
        if r.direct_response.is_some() {
            return Err(bad(f("rewrite"), "a direct response cannot also rewrite"));
        }
    }
    let mut direct_body = None;
    if let Some(dr) = &r.direct_response {
        if !(200..=599).contains(&dr.status) {
            return Err(bad(
                f("direct_response.status"),
                format!("{}: must be in the range 200-599", dr.status),
            ));
        }
        let bytes = match &dr.body {
            Some(b) => b.decode().map_err(|e| bad(f("direct_response.body"), e))?,
            None => Vec::new(),
        };
        if bytes.len() > MAX_DIRECT_BODY {
            return Err(bad(
                f("direct_response.body"),
                format!(
                    "{} bytes: at most {MAX_DIRECT_BODY} (the body travels to every importing site)",
                    bytes.len()
                ),
            ));
        }
        if r.redirect.is_some() {
            return Err(bad(
                f("direct_response"),
                "a route cannot have both redirect and direct response",
            ));
        }
        if r.fault.is_some() || !r.mirrors.is_empty() || r.retries.is_some() {
            return Err(bad(
                f("direct_response"),
                "a direct response is answered at once: no fault, mirror or retries",
            ));
        }
        direct_body = Some(bytes);
    }
    if let Some(rd) = &r.redirect {
        if ![301, 302, 303, 307, 308].contains(&rd.code) {
            return Err(bad(
                f("redirect.code"),
                format!("{}: 301, 302, 303, 307 or 308", rd.code),
            ));
        }
        if let Some(u) = &rd.uri
            && let p = u.strip_prefix(PREFIX_REDIRECT).unwrap_or(u)
            && (!p.starts_with('/') || !header_value_ok(p) || p.contains(' '))
        {
            return Err(bad(f("redirect.uri"), format!("{u:?} is not a path")));
        }
        if let Some(a) = &rd.authority
            && (a.is_empty() || !header_value_ok(a) || a.contains(['/', ' ', '@', ':']))
        {
            return Err(bad(f("redirect.authority"), format!("{a:?} is not a host")));
        }
        if let Some(s) = &rd.scheme
            && s != "http"
            && s != "https"
        {
            return Err(bad(f("redirect.scheme"), format!("{s:?}: http or https")));
        }
        if rd.port == Some(0) {
            return Err(bad(f("redirect.port"), "must be above 0"));
        }
        if r.fault.is_some() || !r.mirrors.is_empty() || r.retries.is_some() {
            return Err(bad(
                f("redirect"),
                "a redirect is answered at once: no fault, mirror or retries",
            ));
        }
    }
    if let Some(b) = r.retries.as_ref().and_then(|r| r.backoff_ms)
        && b > MAX_RETRY_BACKOFF_MS
    {
        return Err(bad(
            f("retries.backoff_ms"),
            format!("{b}: at most {MAX_RETRY_BACKOFF_MS}"),
        ));
    }
    if let Some(on) = r.retries.as_ref().and_then(|r| r.retry_on.as_ref()) {
        if on.status_codes.len() > MAX_RETRY_CODES {
            return Err(bad(
                f("retries.retry_on.status_codes"),
                format!("at most {MAX_RETRY_CODES}"),
            ));
        }
        if let Some(c) = on.status_codes.iter().find(|c| !(100..=599).contains(*c)) {
            return Err(bad(
                f("retries.retry_on.status_codes"),
                format!("{c} is not an HTTP status"),
            ));
        }
        if on.grpc_codes.len() > GRPC_RETRY_ON.len() {
            return Err(bad(
                f("retries.retry_on.grpc_codes"),
                format!("at most {}", GRPC_RETRY_ON.len()),
            ));
        }
        if let Some(c) = on
            .grpc_codes
            .iter()
            .find(|c| !GRPC_RETRY_ON.iter().any(|(_, g)| g == *c))
        {
            return Err(bad(
                f("retries.retry_on.grpc_codes"),
                format!("{c} is not a gRPC status Istio retries on"),
            ));
        }
    }
    if let Some(l) = &r.rate_limit
        && (l.requests == 0 || l.per_ms == 0 || l.burst == 0)
    {
        return Err(bad(
            f("rate_limit"),
            "requests, per_ms and burst must be above 0",
        ));
    }
    Ok(direct_body)
}

/// The path a request leaves with under `rewrite_uri`: the prefix the route matched on
/// replaced (`matched_prefix`), or else the whole path; the query string stays. Pure.
pub fn rewrite_path(
    path_and_query: &str,
    matched_prefix: Option<&str>,
    rewrite_uri: &str,
) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    // A prefix matched with `ignore_uri_case` may differ from the path in case.
    let mut out = match matched_prefix.and_then(|p| strip_prefix_folded(path, p, true)) {
        Some(rest) => {
            // Envoy: `/v1/` → `/` on `/v1/x` gives `/x`, not `//x`.
            if rewrite_uri.ends_with('/') && rest.starts_with('/') {
                format!("{rewrite_uri}{}", &rest[1..])
            } else {
                format!("{rewrite_uri}{rest}")
            }
        }
        None => rewrite_uri.to_owned(),
    };
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `host[:port]` or `[v6]:port` apart.
fn split_host_port(host: &str) -> (&str, Option<&str>) {
    let port_at = if host.starts_with('[') {
        host.find("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    match port_at {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) && i + 1 < host.len() => {
            (&host[..i], Some(&host[i + 1..]))
        }
        _ => (host, None),
    }
}

/// A redirect `uri` starting with this replaces only the prefix the route matched on
/// with the rest (Istio's mark, which its Gateway API conversion writes for
/// `ReplacePrefixMatch`; Envoy's `prefix_rewrite`).
pub const PREFIX_REDIRECT: &str = "%PREFIX()%";

/// The `Location` of a redirect for a request to `host` (its `Host`, maybe with a port)
/// at `path_and_query`, arriving over `scheme`, that matched on `matched_prefix` (a
/// [`PREFIX_REDIRECT`] uri replaces it, or the whole path when the route matched
/// otherwise). Pure.
pub fn redirect_location(
    rd: &Redirect,
    scheme: &str,
    host: &str,
    path_and_query: &str,
    matched_prefix: Option<&str>,
) -> String {
    let (req_host, req_port) = split_host_port(host);
    let scheme = rd.scheme.as_deref().unwrap_or(scheme);
    let host = rd.authority.as_deref().unwrap_or(req_host);
    let port = match (rd.port, rd.authority.is_some()) {
        (Some(p), _) => Some(p.to_string()),
        // A new authority without a port: the scheme's default.
        (None, true) => None,
        (None, false) => req_port.map(str::to_owned),
    };
    let path = match &rd.uri {
        Some(u) if u.starts_with(PREFIX_REDIRECT) => {
            rewrite_path(path_and_query, matched_prefix, &u[PREFIX_REDIRECT.len()..])
        }
        Some(u) if u.contains('?') => u.clone(),
        Some(u) => match path_and_query.split_once('?') {
            Some((_, q)) => format!("{u}?{q}"),
            None => u.clone(),
        },
        None => path_and_query.to_owned(),
    };
    match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

impl HttpPolicy {
    /// The traffic settings' own rules (limits above 0, one balancer, percentages).
    fn check_traffic(&self) -> Result<(), PolicyError> {
        if self.retry_budget.is_some_and(|b| b.per_million > 1_000_000) {
            return Err(bad("retry_budget.per_million", "at most 1000000"));
        }
        self.own_traffic().check()
    }

    /// A subset's policy: its port settings as the policy's are checked, and what is in
    /// force for the subset on every port named (and on the others) holds.
    fn check_subset(&self, i: usize, s: &Subset, sp: &SubsetPolicy) -> Result<(), PolicyError> {
        let f = |x: &str| format!("subsets[{i}].policy.{x}");
        if sp.port_settings.len() > MAX_PORT_SETTINGS {
            return Err(bad(
                f("port_settings"),
                format!("at most {MAX_PORT_SETTINGS}"),
            ));
        }
        for (j, ps) in sp.port_settings.iter().enumerate() {
            if ps.port == 0 {
                return Err(bad(
                    f(&format!("port_settings[{j}].port")),
                    "must be above 0",
                ));
            }
            if sp.port_settings[..j].iter().any(|o| o.port == ps.port) {
                return Err(bad(
                    f(&format!("port_settings[{j}].port")),
                    format!("port {} twice", ps.port),
                ));
            }
            Traffic::of_port(ps).check().map_err(|e| PolicyError {
                field: f(&format!("port_settings[{j}].{}", e.field)),
                message: e.message,
            })?;
        }
        // Port 0 is no port (refused in port settings): the subset's blocks over the
        // destination's own.
        let ports = self.port_settings.iter().map(|p| p.port).chain([0]);
        for port in ports {
            self.traffic(port, Some(s))
                .check()
                .map_err(|e| PolicyError {
                    field: f(&e.field),
                    message: e.message,
                })?;
        }
        Ok(())
    }

    /// Validates (Istio's rules: weights sum to 100 when there are several
    /// destinations, subsets exist, regexes compile) and compiles.
    pub fn compile(self) -> Result<Compiled, PolicyError> {
        if self.routes.is_empty() {
            return Err(bad("routes", "at least one route"));
        }
        self.check_traffic()?;
        if self.port_settings.len() > MAX_PORT_SETTINGS {
            return Err(bad("port_settings", format!("at most {MAX_PORT_SETTINGS}")));
        }
        for (i, s) in self.port_settings.iter().enumerate() {
            if s.port == 0 {
                return Err(bad(format!("port_settings[{i}].port"), "must be above 0"));
            }
            if self.port_settings[..i].iter().any(|o| o.port == s.port) {
                return Err(bad(
                    format!("port_settings[{i}].port"),
                    format!("port {} twice", s.port),
                ));
            }
            // Each port's policy must hold as the policy's own does.
            self.at_port(s.port)
                .check_traffic()
                .map_err(|e| PolicyError {
                    field: format!("port_settings[{i}].{}", e.field),
                    message: e.message,
                })?;
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(bad("routes", format!("at most {MAX_ROUTES}")));
        }
        if self.export_to.len() > MAX_EXPORT_TO {
            return Err(bad("export_to", format!("at most {MAX_EXPORT_TO}")));
        }
        for (i, ns) in self.export_to.iter().enumerate() {
            if ns.contains('.') || !crate::names::dns_subdomain(ns) {
                return Err(bad(
                    format!("export_to[{i}]"),
                    format!(
                        "{:?} is not a namespace (a DNS label)",
                        crate::names::clip(ns, crate::names::QUOTE_MAX)
                    ),
                ));
            }
            if self.export_to[..i].contains(ns) {
                return Err(bad(format!("export_to[{i}]"), format!("{ns:?} twice")));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.subsets.iter().enumerate() {
            if s.name.is_empty() {
                return Err(bad(format!("subsets[{i}].name"), "missing"));
            }
            // Istio's validateSubsetName; the name travels in a header and on the wire.
            if !crate::names::is_dns_label(&s.name) {
                return Err(bad(
                    format!("subsets[{i}].name"),
                    format!(
                        "subset name is invalid: {:?} (a DNS label)",
                        crate::names::clip(&s.name, crate::names::QUOTE_MAX)
                    ),
                ));
            }
            check_labels(&s.labels).map_err(|(k, m)| bad(format!("subsets[{i}].labels{k}"), m))?;
            if !names.insert(s.name.as_str()) {
                return Err(bad(
                    format!("subsets[{i}].name"),
                    format!("{:?} twice", s.name),
                ));
            }
            if let Some(sp) = &s.policy {
                self.check_subset(i, s, sp)?;
            }
        }
        let (mut matches, mut cors, mut direct, mut uri_regex) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, r) in self.routes.iter().enumerate() {
            let f = |x: &str| format!("routes[{i}].{x}");
            if r.matches.len() > MAX_MATCHES {
                return Err(bad(f("matches"), format!("at most {MAX_MATCHES}")));
            }
            let answered = if r.direct_response.is_some() {
                Some("direct_response")
            } else {
                r.redirect.as_ref().map(|_| "redirect")
            };
            match (answered, r.destinations.len()) {
                (Some(_), 0) => {}
                (Some(a), _) => {
                    return Err(bad(
                        f(a),
                        "a route answers at the egress or has destinations, not both",
                    ));
                }
                (None, n) if n == 0 || n > MAX_DESTINATIONS => {
                    return Err(bad(
                        f("destinations"),
                        format!("1 to {MAX_DESTINATIONS} destinations"),
                    ));
                }
                (None, _) => {}
            }
            let direct_body = check_route_extras(r, &f)?;
            for (j, d) in r.destinations.iter().enumerate() {
                self.check_destination(d, &names, &|x: &str| f(&format!("destinations[{j}].{x}")))?;
                if let Some(h) = &d.headers {
                    check_header_rules(h, &format!("destinations[{j}].headers"), &f)?;
                }
            }
            if r.timeout_ms == Some(0) {
                return Err(bad(f("timeout_ms"), "must be above 0"));
            }
            if r.mirrors.len() > MAX_MIRRORS {
                return Err(bad(f("mirrors"), format!("at most {MAX_MIRRORS}")));
            }
            for (k, m) in r.mirrors.iter().enumerate() {
                let f = |x: &str| f(&format!("mirrors[{k}].{x}"));
                if m.per_million > 1_000_000 {
                    return Err(bad(f("per_million"), "above 100 %"));
                }
                // A subset of another service is that service's policy's to define.
                if let Some(s) = &m.subset
                    && m.other_service(&self.service).is_none()
                    && !names.contains(s.as_str())
                {
                    return Err(bad(
                        f("subset"),
                        format!("{s:?} is not a subset of {}", self.service),
                    ));
                }
                // As for destinations: copies go only to services of the namespace.
                if let Some(to) = m.other_service(&self.service)
                    && to.namespace() != self.service.namespace()
                {
                    return Err(bad(
                        f("service"),
                        format!(
                            "{to} is not in namespace {}: a route mirrors only to services of its own namespace",
                            self.service.namespace()
                        ),
                    ));
                }
                if m.port == Some(0) {
                    return Err(bad(f("port"), "must be above 0"));
                }
            }
            if let Some(fault) = &r.fault {
                for (what, per_million) in [
                    ("delay", fault.delay.as_ref().map(|d| d.per_million)),
                    ("abort", fault.abort.as_ref().map(|a| a.per_million)),
                ] {
                    if per_million.is_some_and(|p| p > 1_000_000) {
                        return Err(bad(f(&format!("fault.{what}.per_million")), "above 100 %"));
                    }
                }
                if let Some(a) = &fault.abort
                    && !(200..=599).contains(&a.http_status)
                {
                    return Err(bad(
                        f("fault.abort.http_status"),
                        format!("{}: 200 to 599", a.http_status),
                    ));
                }
                if fault
                    .delay
                    .as_ref()
                    .is_some_and(|d| d.fixed_delay_ms > 3_600_000)
                {
                    return Err(bad(f("fault.delay.fixed_delay_ms"), "at most an hour"));
                }
            }
            let mut ms = Vec::new();
            for (j, m) in r.matches.iter().enumerate() {
                let g = |x: &str| f(&format!("matches[{j}].{x}"));
                let kv = |map: &BTreeMap<String, StringMatch>, what: &str| {
                    map.iter()
                        .map(|(k, v)| Ok((k.clone(), v.compile(&g(&format!("{what}.{k}")))?)))
                        .collect::<Result<Vec<_>, PolicyError>>()
                };
                check_match(m, &g)?;
                let one = |x: &Option<StringMatch>, what: &str| {
                    x.as_ref().map(|u| u.compile(&g(what))).transpose()
                };
                ms.push(CompiledMatch {
                    applies: m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"),
                    uri: m
                        .uri
                        .as_ref()
                        .map(|u| u.compile_path(&g("uri"), m.ignore_uri_case))
                        .transpose()?,
                    method: one(&m.method, "method")?,
                    headers: kv(&m.headers, "headers")?
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v))
                        .collect(),
                    query: kv(&m.query_params, "query_params")?,
                    without_headers: kv(&m.without_headers, "without_headers")?
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v))
                        .collect(),
                    authority: one(&m.authority, "authority")?,
                    scheme: one(&m.scheme, "scheme")?,
                    port: m.port,
                    source_namespace: m.source_namespace.clone(),
                    source_labels: m.source_labels.clone(),
                });
            }
            matches.push(ms);
            cors.push(match &r.cors {
                Some(c) => c.compile(&f)?,
                None => Vec::new(),
            });
            uri_regex.push(
                r.rewrite
                    .as_ref()
                    .and_then(|rw| rw.uri_regex.as_ref())
                    .map(|x| x.compile(&f("rewrite.uri_regex")).map(std::sync::Arc::new))
                    .transpose()?,
            );
            direct.push(direct_body);
        }
        let tcp = self.compile_tcp(&self.tcp_routes, "tcp_routes", &names)?;
        let tls = self.compile_tcp(&self.tls_routes, "tls_routes", &names)?;
        // `None` at the first route without matches or match without a port.
        let only_ports = self.routes.iter().try_fold(Vec::new(), |mut ports, r| {
            if r.matches.is_empty() {
                return None;
            }
            for m in &r.matches {
                let p = m.port?;
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
            Some(ports)
        });
        Ok(Compiled {
            policy: self,
            matches,
            cors,
            direct,
            uri_regex,
            tcp,
            tls,
            only_ports,
        })
    }

    /// A route's destination (HTTP or TCP) as every importer checks it: a subset the
    /// policy defines (another service's is that service's to define), a service of
    /// the policy's own namespace, a port, a weight in bounds. `g` makes field paths.
    fn check_destination(
        &self,
        d: &Destination,
        names: &std::collections::BTreeSet<&str>,
        g: &dyn Fn(&str) -> String,
    ) -> Result<(), PolicyError> {
        if let Some(sub) = &d.subset
            && d.other_service(&self.service).is_none()
            && !names.contains(sub.as_str())
        {
            return Err(bad(
                g("subset"),
                format!("{sub:?} is not a subset of {}", self.service),
            ));
        }
        // A policy arrives from the site that exports its service: it may send that
        // service's callers only to services of the same namespace (what Gateway API
        // allows without a ReferenceGrant), never elsewhere.
        if let Some(to) = d.other_service(&self.service)
            && to.namespace() != self.service.namespace()
        {
            return Err(bad(
                g("service"),
                format!(
                    "{to} is not in namespace {}: a route sends only to services of its own namespace",
                    self.service.namespace()
                ),
            ));
        }
        if d.port == Some(0) {
            return Err(bad(g("port"), "must be above 0"));
        }
        if d.weight > MAX_WEIGHT {
            return Err(bad(g("weight"), format!("at most {MAX_WEIGHT}")));
        }
        Ok(())
    }

    /// The `tcp_routes`' checks, and their matches compiled; `names`: the subsets.
    fn compile_tcp(
        &self,
        routes: &[TcpRoute],
        field: &str,
        names: &std::collections::BTreeSet<&str>,
    ) -> Result<Vec<Vec<CompiledTcpMatch>>, PolicyError> {
        let tls = field == "tls_routes";
        if routes.len() > MAX_ROUTES {
            return Err(bad(field, format!("at most {MAX_ROUTES}")));
        }
        let mut out = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            let f = |x: &str| format!("{field}[{i}].{x}");
            if r.matches.len() > MAX_MATCHES {
                return Err(bad(f("matches"), format!("at most {MAX_MATCHES}")));
            }
            if tls && r.matches.is_empty() {
                // Istio's words.
                return Err(bad(
                    f("matches"),
                    "TLS route must have at least one match condition",
                ));
            }
            let n = r.destinations.len();
            if n == 0 || n > MAX_DESTINATIONS {
                return Err(bad(
                    f("destinations"),
                    format!("1 to {MAX_DESTINATIONS} destinations"),
                ));
            }
            for (j, d) in r.destinations.iter().enumerate() {
                let g = |x: &str| f(&format!("destinations[{j}].{x}"));
                self.check_destination(d, names, &g)?;
                if d.headers.is_some() {
                    return Err(bad(g("headers"), "a TCP route changes no headers"));
                }
            }
            let mut ms = Vec::with_capacity(r.matches.len());
            for (j, m) in r.matches.iter().enumerate() {
                let g = |x: &str| f(&format!("matches[{j}].{x}"));
                // The conditions a TCP match shares with an HTTP one, checked alike.
                check_match(
                    &RequestMatch {
                        port: m.port,
                        source_namespace: m.source_namespace.clone(),
                        source_labels: m.source_labels.clone(),
                        gateways: m.gateways.clone(),
                        ..Default::default()
                    },
                    &g,
                )?;
                if m.destination_subnets.len() > MAX_MATCH_CONDITIONS {
                    return Err(bad(
                        g("destination_subnets"),
                        format!("at most {MAX_MATCH_CONDITIONS}"),
                    ));
                }
                match (tls, m.sni_hosts.len()) {
                    (false, 0) => {}
                    (false, _) => {
                        return Err(bad(g("sni_hosts"), "only a TLS route matches the SNI"));
                    }
                    (true, 0) => {
                        return Err(bad(
                            g("sni_hosts"),
                            "TLS match must have at least one SNI host",
                        ));
                    }
                    (true, n) if n > MAX_MATCH_CONDITIONS => {
                        return Err(bad(
                            g("sni_hosts"),
                            format!("at most {MAX_MATCH_CONDITIONS}"),
                        ));
                    }
                    (true, _) => {
                        for (k, h) in m.sni_hosts.iter().enumerate() {
                            check_sni_host(h).map_err(|e| bad(g(&format!("sni_hosts[{k}]")), e))?;
                        }
                    }
                }
                let subnets = m
                    .destination_subnets
                    .iter()
                    .enumerate()
                    .map(|(k, n)| {
                        parse_subnet(n).map_err(|e| bad(g(&format!("destination_subnets[{k}]")), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                ms.push(CompiledTcpMatch {
                    applies: m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"),
                    subnets,
                });
            }
            out.push(ms);
        }
        Ok(out)
    }
}

/// A TCP route's match, its subnets parsed.
#[derive(Clone, Debug)]
struct CompiledTcpMatch {
    applies: bool,
    subnets: Vec<(std::net::IpAddr, u8)>,
}

impl Compiled {
    /// The first TCP route whose match accepts the connection (a route without matches
    /// accepts all), by index; `None`: none does (the service itself then). Pure.
    pub fn tcp_route(&self, c: &TcpView<'_>) -> Option<(usize, &TcpRoute)> {
        self.policy
            .tcp_routes
            .iter()
            .zip(&self.tcp)
            .enumerate()
            .find(|(_, (r, ms))| {
                r.matches.is_empty()
                    || r.matches.iter().zip(ms.iter()).any(|(m, cm)| {
                        cm.applies
                            && m.port.is_none_or(|p| p == c.port)
                            && (cm.subnets.is_empty()
                                || cm.subnets.iter().any(|n| in_subnet(c.destination, *n)))
                            && caller_holds(
                                m.source_namespace.as_deref(),
                                &m.source_labels,
                                Some(c.caller),
                                c.caller_labels,
                            )
                    })
            })
            .map(|(i, (r, _))| (i, r))
    }

    /// What a connection to a `tls` port whose ClientHello named `sni` (`None`: no SNI,
    /// or not TLS) gets, as Istio's sidecar builds its filter chains: the TLS routes
    /// whose matches hold for this caller and port (`port`, `sourceNamespace`,
    /// `sourceLabels`, `gateways`) each become a chain by SNI and destination subnet,
    /// first in order winning; when none holds, the service itself (Istio's default
    /// chain); when some hold and none matches the SNI and address, [`TlsPick::NoMatch`].
    /// Pure.
    pub fn tls_route(&self, c: &TcpView<'_>, sni: Option<&str>) -> TlsPick<'_> {
        let mut bound = false;
        for (i, (r, ms)) in self.policy.tls_routes.iter().zip(&self.tls).enumerate() {
            for (m, cm) in r.matches.iter().zip(ms.iter()) {
                let holds = cm.applies
                    && m.port.is_none_or(|p| p == c.port)
                    && caller_holds(
                        m.source_namespace.as_deref(),
                        &m.source_labels,
                        Some(c.caller),
                        c.caller_labels,
                    );
                if !holds {
                    continue;
                }
                bound = true;
                let named = sni.is_some_and(|sni| m.sni_hosts.iter().any(|h| sni_matches(h, sni)));
                let addressed = cm.subnets.is_empty()
                    || cm.subnets.iter().any(|n| in_subnet(c.destination, *n));
                if named && addressed {
                    return TlsPick::Route(i, r);
                }
            }
        }
        if bound {
            TlsPick::NoMatch
        } else {
            TlsPick::Service
        }
    }
}

/// A TLS match's `sniHosts` entry as Istio's `ValidateWildcardDomain` takes it: a DNS
/// name of at most 255 characters in lowercase DNS-1123 labels, whose first label may be
/// `*` or start with `*` (`*.example.com`, `*db.example.com`: a suffix), or `*` alone.
fn check_sni_host(h: &str) -> Result<(), String> {
    if h == "*" {
        return Ok(());
    }
    let bad = || {
        format!(
            "{:?} is not a domain name or a wildcard (*.example.com)",
            crate::names::clip(h, 64)
        )
    };
    if h.is_empty() || h.len() > 255 {
        return Err(bad());
    }
    let label = crate::names::is_dns_label;
    let mut labels = h.split('.');
    let first = labels.next().unwrap_or_default();
    let first_ok = match first.strip_prefix('*') {
        Some("") => true,
        Some(rest) => label(rest.strip_prefix('-').unwrap_or(rest)),
        None => label(first),
    };
    if !first_ok || !labels.all(label) {
        return Err(bad());
    }
    Ok(())
}

impl Compiled {
    /// Route `index`'s compiled `uri_regex` rewrite, when it has one.
    pub fn uri_regex(&self, index: usize) -> Option<&std::sync::Arc<UriRegex>> {
        self.uri_regex.get(index)?.as_ref()
    }

    /// Route `index`'s direct response and its body (`None`: it has none, or there is
    /// no such route).
    pub fn direct_response(&self, index: usize) -> Option<(u16, &[u8])> {
        let d = self.policy.routes.get(index)?.direct_response.as_ref()?;
        Some((d.status, self.direct.get(index)?.as_deref()?))
    }

    /// What route `index` of this policy makes of request `r` under its CORS policy
    /// ([`crate::cors`]; no policy, or no such route: [`crate::cors::Decision::Pass`]).
    pub fn cors(&self, index: usize, r: &crate::cors::Request<'_>) -> crate::cors::Decision {
        let (Some(c), Some(origins)) = (
            self.policy
                .routes
                .get(index)
                .and_then(|r| r.cors.as_deref()),
            self.cors.get(index),
        ) else {
            return crate::cors::Decision::Pass;
        };
        crate::cors::decide(c, origins, r)
    }

    /// Whether the HTTP routes may apply on service port `port`: some route has no
    /// matches, or a match that names no port or this one. When none may, the port is
    /// not this policy's: Istio builds no routes for it, and the service's own default
    /// route applies (not a 404). Pure.
    pub fn routes_on_port(&self, port: u16) -> bool {
        self.only_ports.as_ref().is_none_or(|ps| ps.contains(&port))
    }

    /// The first route whose match accepts the request (a route without matches
    /// accepts all); `None`: no route does (Istio answers 404 then).
    pub fn route(&self, r: &dyn RequestView) -> Option<&HttpRoute> {
        self.route_and_prefix(r).map(|(route, _)| route)
    }

    /// [`Compiled::route`], with the URI prefix of the match that accepted the request
    /// (for `rewrite.uri`), if it matched on a prefix.
    pub fn route_and_prefix(&self, r: &dyn RequestView) -> Option<(&HttpRoute, Option<&str>)> {
        self.policy
            .routes
            .iter()
            .zip(&self.matches)
            .find_map(|(route, ms)| {
                if ms.is_empty() {
                    return Some((route, None));
                }
                let m = ms.iter().find(|m| m.test(r))?;
                Some((route, m.uri.as_ref().and_then(Matcher::prefix)))
            })
    }

    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.policy.subsets.iter().find(|s| s.name == name)
    }
}

/// The destination a uniform `roll` (any u32) picks by weight. A single destination is
/// always picked, whatever its weight; all-zero weights pick the first. Pure.
pub fn pick(destinations: &[Destination], roll: u32) -> usize {
    if destinations.len() <= 1 {
        return 0;
    }
    pick_by_weight(destinations.iter().map(|d| d.weight), roll).unwrap_or(0)
}

/// The index `roll` falls on when each item takes its weight's share of the rolls;
/// `None` when no weight is above 0. Pure.
pub fn pick_by_weight(weights: impl Iterator<Item = u32> + Clone, roll: u32) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut at = u64::from(roll) % total;
    let mut last = 0;
    for (i, w) in weights.enumerate() {
        if at < u64::from(w) {
            return Some(i);
        }
        at -= u64::from(w);
        last = i;
    }
    Some(last)
}

/// The sites of `backends` (in their order) where some endpoint's labels hold every
/// label of `subset`. An endpoint's labels are its own, its export's, and its site's
/// name under [`CLUSTER_LABEL`] and [`SITE_LABEL`]. A site that published no endpoint
/// label sets is judged on its export's labels and name. Pure.
pub fn subset_sites<'a>(
    subset: &Subset,
    backends: &'a [SiteName],
    labels: &BTreeMap<SiteName, SiteLabels>,
) -> Vec<&'a SiteName> {
    let none = SiteLabels::default();
    backends
        .iter()
        .filter(|site| {
            let l = labels.get(*site).unwrap_or(&none);
            let empty = BTreeMap::new();
            let sets: Vec<&BTreeMap<String, String>> = if l.endpoints.is_empty() {
                vec![&empty]
            } else {
                l.endpoints.iter().collect()
            };
            sets.iter().any(|ep| {
                subset.labels.iter().all(|(k, v)| {
                    site_label_holds(k, v, site, l.export.get(k).or_else(|| ep.get(k)))
                })
            })
        })
        .collect()
}

/// The [`SELECTOR_HEADER`] value for `subset`: its labels but the site labels (the
/// egress already chose a site they select), `k=v` joined by `,`; `None` when that
/// leaves none (every endpoint of the site is in the subset).
pub fn selector_header(subset: &Subset) -> Option<String> {
    endpoint_selector(subset).map(|s| format_selector(&s))
}

/// The labels of `subset` an endpoint must hold at the site the egress chose: all but
/// the site labels (the choice of site already holds them); `None` when that leaves
/// none (every endpoint of the site is in the subset). Pure.
pub fn endpoint_selector(subset: &Subset) -> Option<BTreeMap<String, String>> {
    let v: BTreeMap<String, String> = subset
        .labels
        .iter()
        .filter(|(k, _)| *k != CLUSTER_LABEL && *k != SITE_LABEL)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Whether `subset` may have endpoints at `site`: its cluster and site labels (if any)
/// name it. An ingress takes a peer's open or request that names a subset as that
/// subset's only when this holds and the selector sent is its [`endpoint_selector`]
/// (anything else gets the service's policy, so a peer cannot take a subset's
/// connection pool for endpoints outside it). Pure.
pub fn subset_at_site(subset: &Subset, site: &SiteName) -> bool {
    subset
        .labels
        .iter()
        .filter(|(k, _)| *k == CLUSTER_LABEL || *k == SITE_LABEL)
        .all(|(k, v)| site_label_holds(k, v, site, None))
}

/// A selector as [`SELECTOR_HEADER`] and the tunnel's open request carry it: `k=v`
/// joined by `,` (label keys and values hold neither).
pub fn format_selector(selector: &BTreeMap<String, String>) -> String {
    let v: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.join(",")
}

/// Reads a [`SELECTOR_HEADER`] value back; the labels are checked as a subset's are.
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for kv in s.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{kv:?} is not key=value"))?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(format!("{k:?} twice"));
        }
    }
    check_labels(&out).map_err(|(k, m)| format!("{k}: {m}"))?;
    Ok(out)
}

/// An endpoint's labels as the subsets of its service see them at its own site: its
/// site's labels (its gateway's `federation.labels`, which its export carries) over its
/// own, as [`subset_sites`] reads them at the egress. Pure.
pub fn endpoint_labels(
    own: &BTreeMap<String, String>,
    site: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut l = own.clone();
    l.extend(site.iter().map(|(k, v)| (k.clone(), v.clone())));
    l
}

/// Whether an endpoint with `labels` (its own and its export's) is in the subset
/// `selector` names. Pure.
pub fn selected(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Kubernetes label syntax (Istio validates subset labels with it): a key is an
/// optional DNS subdomain prefix and `/`, then a name of at most 63 alphanumerics, `-`,
/// `_` and `.`, starting and ending alphanumeric; a value is empty or such a name. At
/// most [`MAX_LABELS`]. `Err((field suffix, message))`.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    fn name(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
    }
    if labels.len() > MAX_LABELS {
        return Err((String::new(), format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        let ok = match k.split_once('/') {
            Some((p, n)) => crate::names::dns_subdomain(p) && name(n),
            None => name(k),
        };
        if !ok {
            return Err((
                format!(".{k}"),
                "not a label key (an optional DNS subdomain and /, then at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)".into(),
            ));
        }
        if !v.is_empty() && !name(v) {
            return Err((
                format!(".{k}"),
                format!(
                    "{v:?} is not a label value (at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)"
                ),
            ));
        }
    }
    Ok(())
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(s) => write!(f, "exact {s:?}"),
            Self::Prefix(s) => write!(f, "prefix {s:?}"),
            Self::Regex(s) => write!(f, "regex {s:?}"),
            Self::PathPrefix(s) => write!(f, "path prefix {s:?}"),
            Self::Present => write!(f, "present"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Req {
        path: &'static str,
        method: &'static str,
        headers: &'static [(&'static str, &'static str)],
        query: Option<&'static str>,
    }

    impl RequestView for Req {
        fn path(&self) -> &str {
            self.path
        }
        fn method(&self) -> &str {
            self.method
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
        }
        fn query(&self) -> Option<&str> {
            self.query
        }
    }

    fn dest(subset: &str, weight: u32) -> Destination {
        Destination {
            service: None,
            port: None,
            subset: Some(subset.into()),
            weight,
            headers: None,
        }
    }

    fn policy() -> HttpPolicy {
        let canary = RequestMatch {
            headers: [("x-canary".into(), StringMatch::Exact("1".into()))].into(),
            ..Default::default()
        };
        let api = RequestMatch {
            uri: Some(StringMatch::Regex("/api/v[0-9]+/.*".into())),
            method: Some(StringMatch::Exact("GET".into())),
            ..Default::default()
        };
        let beta = RequestMatch {
            query_params: [("beta".into(), StringMatch::Exact("yes".into()))].into(),
            ..Default::default()
        };
        HttpPolicy {
            connection_pool: None,
            locality_lb: None,
            port_settings: vec![],
            export_to: Vec::new(),
            retry_budget: None,
            tcp_routes: Vec::new(),
            tls_routes: Vec::new(),
            outlier: None,
            load_balancer: None,
            consistent_hash: None,
            max_requests: None,
            max_requests_per_connection: None,
            idle_timeout_ms: None,
            connect_timeout_ms: None,
            tcp_keepalive: None,
            service: ServiceName::parse("web.demo").unwrap(),
            source: "VirtualService demo/web".into(),
            routes: vec![
                HttpRoute {
                    name: Some("canary".into()),
                    matches: vec![canary, beta],
                    destinations: vec![dest("v2", 100)],
                    ..Default::default()
                },
                HttpRoute {
                    name: Some("api".into()),
                    matches: vec![api],
                    destinations: vec![dest("v1", 80), dest("v2", 20)],
                    ..Default::default()
                },
                HttpRoute {
                    name: Some("rest".into()),
                    destinations: vec![dest("v1", 100)],
                    ..Default::default()
                },
            ],
            subsets: vec![
                Subset {
                    name: "v1".into(),
                    labels: [(CLUSTER_LABEL.into(), "west".into())].into(),
                    policy: None,
                },
                Subset {
                    name: "v2".into(),
                    labels: [("version".into(), "v2".into())].into(),
                    policy: None,
                },
            ],
        }
    }

    #[test]
    fn rewrite_replaces_the_matched_prefix_or_the_whole_path() {
        for (path, prefix, uri, want) in [
            ("/v1/orders?id=3", Some("/v1/"), "/v2/", "/v2/orders?id=3"),
            ("/v1/orders", Some("/v1"), "/v2", "/v2/orders"),
            ("/v1/orders", Some("/v1/"), "/", "/orders"),
            ("/v1/orders", Some("/v1"), "/", "/orders"),
            ("/old", None, "/new", "/new"),
            ("/old?x=1&y=2", None, "/new", "/new?x=1&y=2"),
            // The prefix no longer applies (cannot happen after a match): whole path.
            ("/other", Some("/v1"), "/v2", "/v2"),
        ] {
            assert_eq!(
                rewrite_path(path, prefix, uri),
                want,
                "{path} {prefix:?} {uri}"
            );
        }
    }

    /// Envoy's `regex_rewrite` examples, and RE2's rewrite string checks.
    #[test]
    fn uri_regex_rewrites_replace_every_match_in_the_path() {
        let rw = |p: &str, s: &str| RegexRewrite {
            pattern: p.into(),
            substitution: s.into(),
        };
        for (pattern, substitution, from, want) in [
            (
                r"^/service/([^/]+)(/.*)$",
                r"\2/instance/\1",
                "/service/foo/v1/api?x=1",
                "/v1/api/instance/foo?x=1",
            ),
            ("one", "two", "/xxx/one/yyy/one/zzz", "/xxx/two/yyy/two/zzz"),
            (
                r"^(.*?)one(.*)$",
                r"\1two\2",
                "/xxx/one/yyy/one/zzz",
                "/xxx/two/yyy/one/zzz",
            ),
            ("(?i)/xxx/", "/yyy/", "/aaa/XxX/bbb", "/aaa/yyy/bbb"),
            // Only the path: the query string stays as it is.
            ("one", "two", "/a/one?q=one", "/a/two?q=one"),
            // `$` is a character; `\\` a backslash; `\0` the whole match.
            ("(b)", r"$\1\\\0", "/abc", r"/a$b\bc"),
            ("nomatch", "x", "/abc", "/abc"),
        ] {
            let c = rw(pattern, substitution).compile("r").unwrap();
            assert_eq!(
                c.apply(from).as_deref(),
                Some(want),
                "{pattern} {substitution} {from}"
            );
        }
        // Growth is bounded: each character becomes 64 copies of itself.
        let c = rw(".", &"\\0".repeat(64)).compile("r").unwrap();
        assert_eq!(c.apply("/ab").map(|p| p.len()), Some(3 * 64));
        assert_eq!(c.apply(&format!("/{}", "a".repeat(200))), None);
        let e = rw("a", &"b".repeat(MAX_HEADER_VALUE + 1))
            .compile("r")
            .unwrap_err();
        assert!(e.to_string().starts_with("r.substitution: at most"), "{e}");
        for (pattern, substitution, want) in [
            (
                "(a)(b)",
                r"\3",
                r"r.substitution: \3: the pattern has 2 groups",
            ),
            ("a", r"\1", r"r.substitution: \1: the pattern has 0 groups"),
            ("a", r"\x", "r.substitution: a backslash"),
            ("a", "b\\", "r.substitution: a backslash"),
            ("(", "b", "r.pattern: "),
        ] {
            let e = rw(pattern, substitution)
                .compile("r")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{pattern} {substitution}: {e}");
        }
    }

    #[test]
    fn redirect_locations_follow_istio() {
        let rd =
            |uri: Option<&str>, authority: Option<&str>, scheme: Option<&str>, port| Redirect {
                uri: uri.map(Into::into),
                authority: authority.map(Into::into),
                scheme: scheme.map(Into::into),
                port,
                code: 301,
            };
        for (r, host, pq, want) in [
            (
                rd(Some("/new"), None, None, None),
                "a.example:8080",
                "/old?q=1",
                "http://a.example:8080/new?q=1",
            ),
            (
                rd(Some("/new?x=2"), None, None, None),
                "a.example",
                "/old?q=1",
                "http://a.example/new?x=2",
            ),
            (
                rd(None, Some("b.example"), None, None),
                "a.example:8080",
                "/p",
                "http://b.example/p",
            ),
            (
                rd(None, None, Some("https"), Some(8443)),
                "a.example:8080",
                "/p",
                "https://a.example:8443/p",
            ),
            (
                rd(None, Some("b.example"), None, Some(9000)),
                "a.example",
                "/p",
                "http://b.example:9000/p",
            ),
            (
                rd(None, None, None, Some(81)),
                "[::1]:80",
                "/",
                "http://[::1]:81/",
            ),
            (rd(None, None, None, None), "[::1]", "/", "http://[::1]/"),
        ] {
            assert_eq!(
                redirect_location(&r, "http", host, pq, None),
                want,
                "{r:?} {host} {pq}"
            );
        }
        // Istio's %PREFIX()% mark (Gateway API's ReplacePrefixMatch): the matched
        // prefix only, query kept; without a prefix match, the whole path.
        let prefix = rd(Some("%PREFIX()%/v2"), None, None, None);
        for (pq, matched, want) in [
            (
                "/api/orders?id=3",
                Some("/api"),
                "http://a.example/v2/orders?id=3",
            ),
            ("/api?id=3", Some("/api"), "http://a.example/v2?id=3"),
            ("/api/orders", None, "http://a.example/v2"),
        ] {
            assert_eq!(
                redirect_location(&prefix, "http", "a.example", pq, matched),
                want,
                "{pq} {matched:?}"
            );
        }
    }

    #[test]
    fn headers_rewrites_redirects_and_rate_limits_are_checked_by_path() {
        let with = |f: &dyn Fn(&mut HttpRoute)| {
            let mut p = policy();
            f(&mut p.routes[2]);
            p.compile().err().map(|e| e.to_string())
        };
        let ops = |set: &[(&str, &str)], remove: &[&str]| HeaderRules {
            request: HeaderOps {
                set: set
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                add: BTreeMap::new(),
                remove: remove.iter().map(|k| k.to_string()).collect(),
            },
            response: HeaderOps::default(),
        };
        assert_eq!(
            with(&|r| r.headers = Some(ops(&[("x-env", "prod")], &["x-debug"]))),
            None
        );
        for (rules, want) in [
            (
                ops(&[("X-Env", "a")], &[]),
                "routes[2].headers.request.set.X-Env: not a lower-case",
            ),
            (
                ops(&[("host", "a")], &[]),
                "routes[2].headers.request.set.host: hop-by-hop",
            ),
            (
                ops(&[], &["meshfed-error"]),
                "routes[2].headers.request.remove.meshfed-error: hop-by-hop",
            ),
            (
                ops(&[("x-a", "a\r\nx-b: b")], &[]),
                "routes[2].headers.request.set.x-a: a value",
            ),
        ] {
            let e = with(&|r| r.headers = Some(rules.clone())).unwrap();
            assert!(e.starts_with(want), "{e}");
        }
        let e = with(&|r| {
            r.rewrite = Some(Rewrite {
                uri: Some("v2".into()),
                authority: None,
                uri_regex: None,
            })
        })
        .unwrap();
        assert!(e.starts_with("routes[2].rewrite.uri"), "{e}");
        let redirect = Redirect {
            uri: Some("/new".into()),
            authority: None,
            scheme: None,
            port: None,
            code: 301,
        };
        let e = with(&|r| r.redirect = Some(redirect.clone())).unwrap();
        assert!(
            e.contains("answers at the egress or has destinations, not both"),
            "{e}"
        );
        assert_eq!(
            with(&|r| {
                r.destinations.clear();
                r.redirect = Some(redirect.clone());
            }),
            None
        );
        let e = with(&|r| {
            r.destinations.clear();
            r.redirect = Some(Redirect {
                code: 200,
                ..redirect.clone()
            });
        })
        .unwrap();
        assert!(e.starts_with("routes[2].redirect.code: 200"), "{e}");
        let e = with(&|r| r.destinations.clear()).unwrap();
        assert!(e.starts_with("routes[2].destinations"), "{e}");
        // Direct responses: (the route's change, the error's start; None: accepted).
        let direct = |status, body: Option<DirectBody>| Some(DirectResponse { status, body });
        let text = |s: &str| Some(DirectBody::String(s.into()));
        let bytes = |s: &str| Some(DirectBody::Bytes(s.into()));
        type Change<'a> = &'a dyn Fn(&mut HttpRoute);
        let cases: [(Change<'_>, Option<&str>); 9] = [
            (
                &|r| r.direct_response = direct(503, text("down for maintenance")),
                None,
            ),
            (&|r| r.direct_response = direct(200, bytes("aGk=")), None),
            (&|r| r.direct_response = direct(204, None), None),
            (
                &|r| r.direct_response = direct(199, None),
                Some("routes[2].direct_response.status: 199"),
            ),
            (
                &|r| r.direct_response = direct(600, None),
                Some("routes[2].direct_response.status: 600"),
            ),
            (
                &|r| r.direct_response = direct(200, bytes("not base64!")),
                Some("routes[2].direct_response.body: not base64"),
            ),
            (
                &|r| r.direct_response = direct(200, text(&"x".repeat(MAX_DIRECT_BODY + 1))),
                Some("routes[2].direct_response.body: 65537 bytes"),
            ),
            (
                &|r| {
                    r.direct_response = direct(200, None);
                    r.redirect = Some(Redirect {
                        uri: Some("/new".into()),
                        authority: None,
                        scheme: None,
                        port: None,
                        code: 301,
                    });
                },
                Some("routes[2].direct_response: a route cannot have both"),
            ),
            (
                &|r| {
                    r.direct_response = direct(200, None);
                    r.retries = Some(Retries {
                        attempts: 1,
                        per_try_timeout_ms: None,
                        retry_on: None,
                        backoff_ms: None,
                    });
                },
                Some("routes[2].direct_response: a direct response is answered at once"),
            ),
        ];
        for (change, want) in cases {
            let e = with(&|r| {
                r.destinations.clear();
                change(r);
            });
            match (e, want) {
                (None, None) => {}
                (Some(e), Some(w)) => assert!(e.starts_with(w), "{e}"),
                (e, w) => panic!("{e:?}, wanted {w:?}"),
            }
        }
        let e = with(&|r| r.direct_response = direct(503, None)).unwrap();
        assert!(
            e.starts_with("routes[2].direct_response: a route answers at the egress"),
            "{e}"
        );
        // The compiled body, decoded.
        let mut p = policy();
        p.routes[2].destinations.clear();
        p.routes[2].direct_response = direct(503, bytes("aGk="));
        let c = p.compile().unwrap();
        assert_eq!(c.direct_response(2), Some((503, &b"hi"[..])));
        assert_eq!(c.direct_response(0), None);
        let e = with(&|r| {
            r.rate_limit = Some(RateLimit {
                requests: 0,
                per_ms: 1000,
                burst: 1,
            })
        })
        .unwrap();
        assert!(e.starts_with("routes[2].rate_limit"), "{e}");
        // A peer's retryOn is bounded and checked as the parsers bound it: each request
        // at every importer looks its answer up in these lists.
        let retry = |on: RetryOn| {
            with(&|r| {
                r.retries = Some(Retries {
                    attempts: 2,
                    per_try_timeout_ms: None,
                    retry_on: Some(std::sync::Arc::new(on.clone())),
                    backoff_ms: None,
                })
            })
        };
        assert_eq!(
            retry(RetryOn {
                status_codes: vec![500, 503],
                grpc_codes: vec![14],
                ..Default::default()
            }),
            None
        );
        for (on, want) in [
            (
                RetryOn {
                    status_codes: vec![503; MAX_RETRY_CODES + 1],
                    ..Default::default()
                },
                "routes[2].retries.retry_on.status_codes: at most",
            ),
            (
                RetryOn {
                    status_codes: vec![600],
                    ..Default::default()
                },
                "routes[2].retries.retry_on.status_codes: 600",
            ),
            (
                RetryOn {
                    grpc_codes: vec![14; 100_000],
                    ..Default::default()
                },
                "routes[2].retries.retry_on.grpc_codes: at most",
            ),
            (
                RetryOn {
                    grpc_codes: vec![7],
                    ..Default::default()
                },
                "routes[2].retries.retry_on.grpc_codes: 7",
            ),
        ] {
            let e = retry(on).unwrap();
            assert!(e.starts_with(want), "{e}");
        }
        // A peer's back-off is bounded: it holds each retried request.
        let backoff = |ms: u64| {
            with(&|r| {
                r.retries = Some(Retries {
                    attempts: 2,
                    per_try_timeout_ms: None,
                    retry_on: None,
                    backoff_ms: Some(ms),
                })
            })
        };
        assert_eq!(backoff(MAX_RETRY_BACKOFF_MS), None);
        let e = backoff(MAX_RETRY_BACKOFF_MS + 1).unwrap();
        assert!(e.starts_with("routes[2].retries.backoff_ms: 60001"), "{e}");
    }

    #[test]
    fn the_matched_prefix_comes_with_the_route() {
        let mut p = policy();
        p.routes[2].matches = vec![
            RequestMatch {
                uri: Some(StringMatch::Exact("/exact".into())),
                ..Default::default()
            },
            RequestMatch {
                uri: Some(StringMatch::Prefix("/v1/".into())),
                ..Default::default()
            },
        ];
        p.routes.push(HttpRoute {
            destinations: vec![dest("v1", 100)],
            ..Default::default()
        });
        let c = p.compile().unwrap();
        let at = |path: &'static str| {
            let (r, prefix) = c
                .route_and_prefix(&Req {
                    path,
                    method: "GET",
                    headers: &[],
                    query: None,
                })
                .unwrap();
            (r.name.clone(), prefix.map(str::to_owned))
        };
        assert_eq!(at("/v1/x"), (Some("rest".into()), Some("/v1/".into())));
        assert_eq!(at("/exact"), (Some("rest".into()), None));
        assert_eq!(at("/elsewhere"), (None, None));
    }

    /// The policies in `tests/data/http_policy` (the `http_policy` fuzz target's seeds,
    /// in the federation's wire form) read and compile, and route as written.
    #[test]
    fn the_wire_form_seeds_compile() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/http_policy");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let p: HttpPolicy =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let c = p
                .compile()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
            if path.ends_with("tcp-and-matches.json") {
                let r = Call {
                    path: "/beta/x",
                    headers: vec![("x-user", "1")],
                    authority: Some("db.shop"),
                    scheme: "http",
                    port: Some(80),
                    caller: Some("spiffe://td/ns/demo/sa/web"),
                    labels: Some([("app".into(), "web".into())].into()),
                };
                assert_eq!(c.route(&r).and_then(|r| r.name.as_deref()), Some("beta"));
                let v = TcpView {
                    port: 80,
                    destination: "10.1.1.1".parse().unwrap(),
                    caller: "spiffe://td/ns/demo/sa/web",
                    caller_labels: None,
                };
                assert_eq!(c.tcp_route(&v).map(|(i, _)| i), Some(0));
            }
            if path.ends_with("tls-routes.json") {
                let v = |port, dest: &str, ns: &'static str| TcpView {
                    port,
                    destination: dest.parse().unwrap(),
                    caller: ns,
                    caller_labels: None,
                };
                let (reports, web) = ("spiffe://td/ns/reports/sa/r", "spiffe://td/ns/web/sa/w");
                let at = |view: TcpView<'_>, sni: Option<&str>| match c.tls_route(&view, sni) {
                    TlsPick::Route(i, _) => Some(i),
                    _ => None,
                };
                assert_eq!(
                    at(v(443, "10.1.1.1", reports), Some("x.b.db.example")),
                    Some(0)
                );
                assert_eq!(at(v(443, "10.1.1.1", web), Some("a.db.example")), Some(1));
                assert_eq!(at(v(8443, "10.1.1.1", web), Some("z.example")), Some(1));
                assert_eq!(
                    c.tls_route(&v(443, "10.1.1.1", web), None),
                    TlsPick::NoMatch
                );
            }
        }
        assert!(n >= 2);
    }

    #[test]
    fn the_first_matching_route_wins() {
        let c = policy().compile().unwrap();
        let rows: &[(Req, &str)] = &[
            (
                Req {
                    path: "/",
                    method: "GET",
                    headers: &[("x-canary", "1")],
                    query: None,
                },
                "canary",
            ),
            (
                Req {
                    path: "/api/v1/x",
                    method: "GET",
                    headers: &[("x-canary", "1")],
                    query: None,
                },
                "canary",
            ),
            (
                Req {
                    path: "/",
                    method: "GET",
                    headers: &[("x-canary", "2")],
                    query: None,
                },
                "rest",
            ),
            (
                Req {
                    path: "/",
                    method: "GET",
                    headers: &[],
                    query: Some("a=1&beta=yes"),
                },
                "canary",
            ),
            (
                Req {
                    path: "/",
                    method: "GET",
                    headers: &[],
                    query: Some("beta=no"),
                },
                "rest",
            ),
            (
                Req {
                    path: "/api/v12/orders",
                    method: "GET",
                    headers: &[],
                    query: None,
                },
                "api",
            ),
            // The regex matches the whole path, as in Envoy.
            (
                Req {
                    path: "/x/api/v1/",
                    method: "GET",
                    headers: &[],
                    query: None,
                },
                "rest",
            ),
            (
                Req {
                    path: "/api/v1/x",
                    method: "POST",
                    headers: &[],
                    query: None,
                },
                "rest",
            ),
        ];
        for (i, (r, want)) in rows.iter().enumerate() {
            let got = c.route(r).and_then(|r| r.name.as_deref());
            assert_eq!(got, Some(*want), "row {i}: {}", r.path);
        }
        // Without a catch-all route, a request no route matches has none.
        let mut p = policy();
        p.routes.pop();
        let c = p.compile().unwrap();
        assert!(
            c.route(&Req {
                path: "/",
                method: "GET",
                headers: &[],
                query: None
            })
            .is_none()
        );
    }

    #[test]
    fn weights_split_by_the_roll() {
        let d = [dest("v1", 80), dest("v2", 20)];
        // (roll, picked)
        for (roll, want) in [
            (0, 0),
            (79, 0),
            (80, 1),
            (99, 1),
            (100, 0),
            (180, 1),
            (u32::MAX, 1),
        ] {
            assert_eq!(pick(&d, roll), want, "roll {roll}");
        }
        // Every roll of a whole number of weight totals: exactly the weights.
        let v2 = (0..10_000u32).filter(|r| pick(&d, *r) == 1).count();
        assert_eq!(v2, 2000);
        assert_eq!(pick(&[dest("a", 0)], 5), 0);
        assert_eq!(pick(&[dest("a", 0), dest("b", 0)], 5), 0);
    }

    #[test]
    fn faults_hit_their_share_of_rolls() {
        // (per million, share of 100 000 evenly spread rolls that is hit, ±1 for the
        // rounding at the edge)
        for (p, want) in [
            (0, 0),
            (1_000_000, 100_000),
            (500_000, 50_000),
            (100_000, 10_000),
            (1, 0),
        ] {
            let got = (0..100_000u64)
                .filter(|i| hits(p, (i * (u64::from(u32::MAX) + 1) / 100_000) as u32))
                .count();
            assert!(got.abs_diff(want) <= 1, "{p} per million: {got}");
        }
    }

    /// A policy whose routes all name other ports of the service than the request's is
    /// not the request's: Istio builds no routes for that port.
    #[test]
    fn routes_restricted_to_ports_leave_the_others() {
        let on = |ports: &[Option<u16>]| HttpRoute {
            matches: ports
                .iter()
                .map(|p| RequestMatch {
                    port: *p,
                    ..Default::default()
                })
                .collect(),
            destinations: vec![Destination::all()],
            ..Default::default()
        };
        let svc = ServiceName::parse("web.demo").unwrap();
        // (routes' match ports; a route without matches is `[]`) → ports they may apply on
        for (routes, here, elsewhere) in [
            (vec![vec![Some(8080)]], vec![8080], vec![9090]),
            (
                vec![vec![Some(8080)], vec![Some(9090), Some(8080)]],
                vec![8080, 9090],
                vec![7070],
            ),
            (vec![vec![Some(8080)], vec![None]], vec![8080, 7070], vec![]),
            (vec![vec![Some(8080)], vec![]], vec![8080, 7070], vec![]),
        ] {
            let policy = HttpPolicy::new(
                svc.clone(),
                "test".into(),
                routes.iter().map(|ps| on(ps)).collect(),
            );
            let c = policy.compile().unwrap();
            for p in &here {
                assert!(c.routes_on_port(*p), "{routes:?} on {p}");
            }
            for p in &elsewhere {
                assert!(!c.routes_on_port(*p), "{routes:?} on {p}");
            }
        }
    }

    /// A subset may have endpoints at a site unless its cluster or site label names
    /// another; its other labels are the endpoints' business.
    #[test]
    fn a_subset_is_at_the_sites_its_site_labels_name() {
        let west = SiteName::new("west").unwrap();
        for (labels, want) in [
            (vec![], true),
            (vec![("version", "v2")], true),
            (vec![("topology.istio.io/network", "n2")], true),
            (vec![(SITE_LABEL, "west")], true),
            (vec![(CLUSTER_LABEL, "west"), ("version", "v2")], true),
            (vec![(SITE_LABEL, "north")], false),
            (vec![(CLUSTER_LABEL, "north")], false),
            (vec![(SITE_LABEL, "west"), (CLUSTER_LABEL, "north")], false),
        ] {
            let subset = Subset {
                name: "s".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                policy: None,
            };
            assert_eq!(subset_at_site(&subset, &west), want, "{labels:?}");
        }
    }

    #[test]
    fn subsets_select_sites_by_labels_and_by_name() {
        let sites: Vec<SiteName> = ["north", "west", "east"]
            .iter()
            .map(|s| SiteName::new(s).unwrap())
            .collect();
        let labels: BTreeMap<SiteName, SiteLabels> = [(
            sites[1].clone(),
            SiteLabels {
                export: [("version".to_string(), "v2".to_string())].into(),
                endpoints: vec![],
            },
        )]
        .into();
        let c = policy().compile().unwrap();
        let names = |s: Vec<&SiteName>| s.iter().map(|s| s.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(
            names(subset_sites(c.subset("v1").unwrap(), &sites, &labels)),
            ["west"]
        );
        assert_eq!(
            names(subset_sites(c.subset("v2").unwrap(), &sites, &labels)),
            ["west"]
        );
        let by_site = Subset {
            name: "n".into(),
            labels: [(SITE_LABEL.into(), "north".into())].into(),
            policy: None,
        };
        assert_eq!(names(subset_sites(&by_site, &sites, &labels)), ["north"]);
        let all = Subset {
            name: "all".into(),
            labels: BTreeMap::new(),
            policy: None,
        };
        assert_eq!(subset_sites(&all, &sites, &labels).len(), 3);
    }

    fn set(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A subset of endpoint labels selects the sites where some endpoint holds them
    /// all (with its export's labels and its site's name), not a site whose endpoints
    /// hold them only between them.
    #[test]
    fn subsets_select_sites_by_their_endpoints_labels() {
        let sites: Vec<SiteName> = ["east", "north", "west"]
            .iter()
            .map(|s| SiteName::new(s).unwrap())
            .collect();
        let labels: BTreeMap<SiteName, SiteLabels> = [
            (
                sites[0].clone(),
                SiteLabels {
                    export: set(&[("tier", "gold")]),
                    endpoints: vec![
                        set(&[("version", "v1")]),
                        set(&[("version", "v2"), ("zone", "a")]),
                    ],
                },
            ),
            (
                sites[1].clone(),
                SiteLabels {
                    export: BTreeMap::new(),
                    endpoints: vec![
                        set(&[("version", "v1"), ("zone", "a")]),
                        set(&[("version", "v2")]),
                    ],
                },
            ),
            (
                sites[2].clone(),
                SiteLabels {
                    export: BTreeMap::new(),
                    endpoints: vec![set(&[("version", "v1")])],
                },
            ),
        ]
        .into();
        let names = |s: Vec<&SiteName>| s.iter().map(|s| s.as_str().to_owned()).collect::<Vec<_>>();
        for (i, (subset, want)) in [
            (set(&[("version", "v2")]), vec!["east", "north"]),
            (set(&[("version", "v1")]), vec!["east", "north", "west"]),
            // Both on one endpoint: east has it, north only across two endpoints.
            (set(&[("version", "v2"), ("zone", "a")]), vec!["east"]),
            // Export labels hold for every endpoint of the site.
            (set(&[("version", "v1"), ("tier", "gold")]), vec!["east"]),
            (
                set(&[("version", "v2"), (CLUSTER_LABEL, "north")]),
                vec!["north"],
            ),
            (set(&[("version", "v3")]), vec![]),
            (set(&[]), vec!["east", "north", "west"]),
        ]
        .into_iter()
        .enumerate()
        {
            let s = Subset {
                name: "s".into(),
                labels: subset,
                policy: None,
            };
            assert_eq!(names(subset_sites(&s, &sites, &labels)), want, "row {i}");
        }
    }

    #[test]
    fn a_selector_carries_the_endpoint_labels_and_reads_back() {
        let s = Subset {
            name: "v2".into(),
            labels: set(&[
                ("version", "v2"),
                ("app.kubernetes.io/track", "canary"),
                (CLUSTER_LABEL, "west"),
            ]),
            policy: None,
        };
        let h = selector_header(&s).unwrap();
        assert_eq!(h, "app.kubernetes.io/track=canary,version=v2");
        let back = parse_selector(&h).unwrap();
        assert_eq!(
            back,
            set(&[("version", "v2"), ("app.kubernetes.io/track", "canary")])
        );
        assert!(selected(
            &back,
            &set(&[
                ("version", "v2"),
                ("app.kubernetes.io/track", "canary"),
                ("x", "y")
            ])
        ));
        assert!(!selected(&back, &set(&[("version", "v2")])));
        // At its own site an endpoint also holds its site's labels, over its own (as
        // `subset_sites` reads them at the egress).
        let l = endpoint_labels(
            &set(&[("version", "v2"), ("a", "b")]),
            &set(&[("topology.istio.io/network", "n2"), ("version", "v9")]),
        );
        assert_eq!(
            l,
            set(&[
                ("a", "b"),
                ("topology.istio.io/network", "n2"),
                ("version", "v9")
            ])
        );
        assert!(selected(&set(&[("topology.istio.io/network", "n2")]), &l));
        assert!(!selected(&set(&[("version", "v2")]), &l));
        let only_site = Subset {
            name: "w".into(),
            labels: set(&[(SITE_LABEL, "west")]),
            policy: None,
        };
        assert_eq!(selector_header(&only_site), None);
        for bad in [
            "version",
            "a=1,a=2",
            "=v",
            "k=-v",
            "k=v,",
            "Bad_Prefix.Example/k=v",
            "k=v w",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn subset_labels_follow_the_kubernetes_label_syntax() {
        for (labels, field) in [
            (
                set(&[("version", "v 2")]),
                Some("subsets[0].labels.version"),
            ),
            (
                set(&[("-version", "v2")]),
                Some("subsets[0].labels.-version"),
            ),
            (set(&[("example.com/version", "v2")]), None),
            (
                set(&[("Example.com/version", "v2")]),
                Some("subsets[0].labels.Example.com/version"),
            ),
            (set(&[("version", "")]), None),
            (
                set(&[("version", &"v".repeat(64))]),
                Some("subsets[0].labels.version"),
            ),
        ] {
            let mut p = policy();
            p.subsets[0].labels = labels.clone();
            match (p.compile(), field) {
                (Ok(_), None) => {}
                (Err(e), Some(f)) => assert_eq!(e.field, f, "{labels:?}: {e}"),
                (r, f) => panic!("{labels:?}: {:?} (wanted an error at {f:?})", r.map(|_| ())),
            }
        }
    }

    /// A request with where it came from: the conditions beyond the request line.
    #[derive(Clone)]
    struct Call {
        path: &'static str,
        headers: Vec<(&'static str, &'static str)>,
        authority: Option<&'static str>,
        scheme: &'static str,
        port: Option<u16>,
        caller: Option<&'static str>,
        labels: Option<BTreeMap<String, String>>,
    }

    impl RequestView for Call {
        fn path(&self) -> &str {
            self.path
        }
        fn method(&self) -> &str {
            "GET"
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
        }
        fn query(&self) -> Option<&str> {
            None
        }
        fn authority(&self) -> Option<&str> {
            self.authority
        }
        fn scheme(&self) -> &str {
            self.scheme
        }
        fn port(&self) -> Option<u16> {
            self.port
        }
        fn caller(&self) -> Option<&str> {
            self.caller
        }
        fn caller_labels(&self) -> Option<&BTreeMap<String, String>> {
            self.labels.as_ref()
        }
    }

    #[test]
    fn match_conditions_beyond_the_request_line_follow_envoy() {
        let call = Call {
            path: "/Api/V1/items",
            headers: vec![("x-canary", "1"), ("x-empty", "")],
            authority: Some("web.shop:8080"),
            scheme: "http",
            port: Some(8080),
            caller: Some("spiffe://east.example.org/ns/shop/sa/web"),
            labels: Some(
                [
                    ("app".into(), "web".into()),
                    ("version".into(), "v2".into()),
                ]
                .into(),
            ),
        };
        let exact = |s: &str| StringMatch::Exact(s.into());
        let m = RequestMatch::default;
        let without = |k: &str, v: StringMatch| RequestMatch {
            without_headers: [(k.into(), v)].into(),
            ..m()
        };
        type Tweak = Box<dyn Fn(&mut Call)>;
        let rows: Vec<(&str, RequestMatch, Tweak, bool)> = vec![
            ("nothing asked", m(), Box::new(|_| {}), true),
            // withoutHeaders: Envoy's inverted matchers, a missing header tested as empty.
            (
                "without a header it has",
                without("x-canary", exact("1")),
                Box::new(|_| {}),
                false,
            ),
            (
                "without another value",
                without("x-canary", exact("2")),
                Box::new(|_| {}),
                true,
            ),
            (
                "without a missing header",
                without("x-gone", exact("1")),
                Box::new(|_| {}),
                true,
            ),
            (
                "a missing header is empty",
                without("x-gone", exact("")),
                Box::new(|_| {}),
                false,
            ),
            (
                "a missing header, any regex",
                without("x-gone", StringMatch::Regex(".*".into())),
                Box::new(|_| {}),
                false,
            ),
            (
                "without presence: there",
                without("x-canary", StringMatch::Present),
                Box::new(|_| {}),
                false,
            ),
            (
                "without presence: empty is there",
                without("x-empty", StringMatch::Present),
                Box::new(|_| {}),
                false,
            ),
            (
                "without presence: missing",
                without("x-gone", StringMatch::Present),
                Box::new(|_| {}),
                true,
            ),
            (
                "present header",
                RequestMatch {
                    headers: [("x-empty".into(), StringMatch::Present)].into(),
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "present header, missing",
                RequestMatch {
                    headers: [("x-gone".into(), StringMatch::Present)].into(),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            // Pseudo-headers, from the request line.
            (
                "the :authority pseudo-header",
                RequestMatch {
                    headers: [(":authority".into(), exact("web.shop:8080"))].into(),
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "the :scheme pseudo-header",
                RequestMatch {
                    headers: [(":scheme".into(), exact("https"))].into(),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "without the :method pseudo-header",
                RequestMatch {
                    without_headers: [(":method".into(), exact("GET"))].into(),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            // Authority, as it arrived (with its port).
            (
                "authority",
                RequestMatch {
                    authority: Some(exact("web.shop:8080")),
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "authority without the port",
                RequestMatch {
                    authority: Some(exact("web.shop")),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "authority prefix",
                RequestMatch {
                    authority: Some(StringMatch::Prefix("web.".into())),
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "no authority",
                RequestMatch {
                    authority: Some(StringMatch::Present),
                    ..m()
                },
                Box::new(|c| c.authority = None),
                false,
            ),
            (
                "scheme",
                RequestMatch {
                    scheme: Some(exact("http")),
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "scheme https",
                RequestMatch {
                    scheme: Some(exact("https")),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "scheme https, over TLS",
                RequestMatch {
                    scheme: Some(exact("https")),
                    ..m()
                },
                Box::new(|c| c.scheme = "https"),
                true,
            ),
            (
                "port",
                RequestMatch {
                    port: Some(8080),
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "another port",
                RequestMatch {
                    port: Some(9090),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "port unknown",
                RequestMatch {
                    port: Some(8080),
                    ..m()
                },
                Box::new(|c| c.port = None),
                false,
            ),
            // ignoreUriCase: exact and prefix only; the regex keeps its case.
            (
                "exact, case",
                RequestMatch {
                    uri: Some(exact("/api/v1/items")),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "exact, case ignored",
                RequestMatch {
                    uri: Some(exact("/api/v1/items")),
                    ignore_uri_case: true,
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "prefix, case ignored",
                RequestMatch {
                    uri: Some(StringMatch::Prefix("/API/".into())),
                    ignore_uri_case: true,
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "path prefix, case ignored, by element",
                RequestMatch {
                    uri: Some(StringMatch::PathPrefix("/api/v".into())),
                    ignore_uri_case: true,
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "path prefix, case ignored",
                RequestMatch {
                    uri: Some(StringMatch::PathPrefix("/api/v1".into())),
                    ignore_uri_case: true,
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "regex keeps case",
                RequestMatch {
                    uri: Some(StringMatch::Regex("/api/.*".into())),
                    ignore_uri_case: true,
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "non-ASCII paths are compared as they are",
                RequestMatch {
                    uri: Some(StringMatch::Prefix("/é".into())),
                    ignore_uri_case: true,
                    ..m()
                },
                Box::new(|c| c.path = "/É/x"),
                false,
            ),
            // The caller: its SPIFFE ID's namespace, and its labels when the gateway knows them.
            (
                "source namespace",
                RequestMatch {
                    source_namespace: Some("shop".into()),
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "another namespace",
                RequestMatch {
                    source_namespace: Some("web".into()),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "a caller without a namespace",
                RequestMatch {
                    source_namespace: Some("shop".into()),
                    ..m()
                },
                Box::new(|c| {
                    c.caller = Some("spiffe://east.example.org/meshfed/site/east/gateway")
                }),
                false,
            ),
            (
                "source labels",
                RequestMatch {
                    source_labels: [("version".into(), "v2".into())].into(),
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "source labels, another value",
                RequestMatch {
                    source_labels: [("version".into(), "v1".into())].into(),
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
            (
                "source labels, unknown caller labels",
                RequestMatch {
                    source_labels: [("version".into(), "v2".into())].into(),
                    ..m()
                },
                Box::new(|c| c.labels = None),
                false,
            ),
            // Istio's match `gateways`: the egress stands for `mesh`.
            (
                "gateways with mesh",
                RequestMatch {
                    gateways: vec!["ingress".into(), "mesh".into()],
                    ..m()
                },
                Box::new(|_| {}),
                true,
            ),
            (
                "gateways without mesh",
                RequestMatch {
                    gateways: vec!["ingress".into()],
                    ..m()
                },
                Box::new(|_| {}),
                false,
            ),
        ];
        for (why, rm, tweak, want) in rows {
            let p = HttpPolicy {
                routes: vec![HttpRoute {
                    name: Some("r".into()),
                    matches: vec![rm],
                    destinations: vec![dest("v1", 100)],
                    ..Default::default()
                }],
                ..policy()
            };
            let c = p.compile().unwrap_or_else(|e| panic!("{why}: {e}"));
            let mut r = call.clone();
            tweak(&mut r);
            assert_eq!(c.route(&r).is_some(), want, "{why}");
        }
    }

    #[test]
    fn a_prefix_matched_without_case_is_rewritten_by_its_length() {
        assert_eq!(
            rewrite_path("/API/v1?x=1", Some("/api"), "/svc"),
            "/svc/v1?x=1"
        );
        assert_eq!(rewrite_path("/api/v1", Some("/api"), "/svc"), "/svc/v1");
        // The matched prefix is always the path's own (the match ran first); a path
        // without it is replaced whole.
        assert_eq!(rewrite_path("/other", Some("/api"), "/svc"), "/svc");
    }

    #[test]
    fn match_conditions_are_bounded_and_checked_by_path() {
        let many = |n: usize| {
            (0..n)
                .map(|i| (format!("x-{i}"), StringMatch::Present))
                .collect::<BTreeMap<_, _>>()
        };
        let rows: Vec<(RequestMatch, &str)> = vec![
            (
                RequestMatch {
                    headers: many(MAX_MATCH_CONDITIONS + 1),
                    ..Default::default()
                },
                "routes[0].matches[0].headers",
            ),
            (
                RequestMatch {
                    without_headers: many(MAX_MATCH_CONDITIONS + 1),
                    ..Default::default()
                },
                "routes[0].matches[0].without_headers",
            ),
            (
                RequestMatch {
                    without_headers: [("x".into(), StringMatch::Regex("(".into()))].into(),
                    ..Default::default()
                },
                "routes[0].matches[0].without_headers.x.regex",
            ),
            (
                RequestMatch {
                    authority: Some(StringMatch::Regex("[".into())),
                    ..Default::default()
                },
                "routes[0].matches[0].authority.regex",
            ),
            (
                RequestMatch {
                    scheme: Some(StringMatch::Regex("[".into())),
                    ..Default::default()
                },
                "routes[0].matches[0].scheme.regex",
            ),
            (
                RequestMatch {
                    port: Some(0),
                    ..Default::default()
                },
                "routes[0].matches[0].port",
            ),
            (
                RequestMatch {
                    source_namespace: Some("a.b".into()),
                    ..Default::default()
                },
                "routes[0].matches[0].source_namespace",
            ),
            (
                RequestMatch {
                    source_labels: [("-x".into(), "v".into())].into(),
                    ..Default::default()
                },
                "routes[0].matches[0].source_labels.-x",
            ),
            (
                RequestMatch {
                    gateways: vec!["mesh".into(), String::new()],
                    ..Default::default()
                },
                "routes[0].matches[0].gateways[1]",
            ),
            (
                RequestMatch {
                    gateways: vec!["g".into(); MAX_MATCH_CONDITIONS + 1],
                    ..Default::default()
                },
                "routes[0].matches[0].gateways",
            ),
        ];
        for (rm, field) in rows {
            let p = HttpPolicy {
                routes: vec![HttpRoute {
                    matches: vec![rm],
                    destinations: vec![dest("v1", 100)],
                    ..Default::default()
                }],
                ..policy()
            };
            let e = p.compile().expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn sni_hosts_match_as_envoys_server_names() {
        for (pattern, sni, want) in [
            ("db.example.com", "db.example.com", true),
            ("db.example.com", "DB.Example.COM", true),
            ("db.example.com", "db.example.co", false),
            ("db.example.com", "x.db.example.com", false),
            ("*.example.com", "db.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", ".example.com", false),
            ("*db.example.com", "xdb.example.com", true),
            ("*db.example.com", "a.db.example.com", true),
            ("*.example.com", "dbexample.com", false),
            ("*", "anything", true),
            ("*.com", "x.com", true),
        ] {
            assert_eq!(sni_matches(pattern, sni), want, "{pattern} {sni}");
        }
        assert!(
            !sni_matches("*.é.com", "é.com"),
            "no panic on a multi-byte name"
        );
    }

    /// Istio's sidecar chains: the TLS routes whose matches hold for the caller and port
    /// decide by SNI and address, first in order; none matching the SNI is a refusal;
    /// none holding for the caller leaves the service itself.
    #[test]
    fn tls_routes_pick_by_sni_address_and_caller() {
        let tls = |sni: &[&str], more: TcpMatch| TcpMatch {
            sni_hosts: sni.iter().map(|s| s.to_string()).collect(),
            ..more
        };
        let m = TcpMatch::default;
        let route = |name: &str, matches: Vec<TcpMatch>| TcpRoute {
            matches,
            destinations: vec![dest(name, 100)],
        };
        let p = HttpPolicy {
            tls_routes: vec![
                route(
                    "v2",
                    vec![tls(
                        &["a.db.example"],
                        TcpMatch {
                            source_namespace: Some("shop".into()),
                            ..m()
                        },
                    )],
                ),
                route(
                    "v1",
                    vec![
                        tls(&["a.db.example", "*.b.db.example"], m()),
                        tls(
                            &["c.db.example"],
                            TcpMatch {
                                destination_subnets: vec!["10.1.0.0/16".into()],
                                ..m()
                            },
                        ),
                    ],
                ),
                route(
                    "v2",
                    vec![tls(
                        &["*"],
                        TcpMatch {
                            port: Some(8443),
                            ..m()
                        },
                    )],
                ),
            ],
            ..policy()
        };
        let c = p.compile().unwrap();
        let view = |port, dest: &str, caller: &'static str| TcpView {
            port,
            destination: dest.parse().unwrap(),
            caller,
            caller_labels: None,
        };
        let shop = "spiffe://east.example.org/ns/shop/sa/api";
        let other = "spiffe://east.example.org/ns/other/sa/api";
        let pick = |v: &TcpView<'_>, sni: Option<&str>| match c.tls_route(v, sni) {
            TlsPick::Route(i, _) => format!("#{i}"),
            TlsPick::Service => "service".into(),
            TlsPick::NoMatch => "refused".into(),
        };
        for (v, sni, want, why) in [
            (
                view(443, "127.0.0.2", shop),
                Some("a.db.example"),
                "#0",
                "SNI and namespace",
            ),
            (
                view(443, "127.0.0.2", other),
                Some("a.db.example"),
                "#1",
                "another namespace",
            ),
            (
                view(443, "127.0.0.2", other),
                Some("x.b.db.example"),
                "#1",
                "a wildcard",
            ),
            (
                view(443, "127.0.0.2", other),
                Some("b.db.example"),
                "refused",
                "under the wildcard only",
            ),
            (
                view(443, "10.1.2.3", other),
                Some("c.db.example"),
                "#1",
                "SNI and subnet",
            ),
            (
                view(443, "127.0.0.2", other),
                Some("c.db.example"),
                "refused",
                "outside the subnet",
            ),
            (view(443, "127.0.0.2", other), None, "refused", "no SNI"),
            (
                view(8443, "127.0.0.2", other),
                Some("z.example"),
                "#2",
                "any SNI on 8443",
            ),
            (
                view(8443, "127.0.0.2", other),
                None,
                "refused",
                "any SNI needs one",
            ),
        ] {
            assert_eq!(pick(&v, sni), want, "{why}");
        }
        // Routes that hold for no caller here (another port and namespace) leave the
        // service itself, as Istio's default chain does.
        let only = HttpPolicy {
            tls_routes: vec![route(
                "v2",
                vec![tls(
                    &["a.db.example"],
                    TcpMatch {
                        port: Some(8443),
                        ..m()
                    },
                )],
            )],
            ..policy()
        };
        let c = only.compile().unwrap();
        assert_eq!(
            c.tls_route(&view(443, "127.0.0.2", other), Some("a.db.example")),
            TlsPick::Service
        );
    }

    #[test]
    fn tls_routes_are_checked_by_path() {
        let ok = || TcpRoute {
            matches: vec![TcpMatch {
                sni_hosts: vec!["a.db.example".into()],
                ..Default::default()
            }],
            destinations: vec![dest("v1", 100)],
        };
        type Breaks = Box<dyn Fn(&mut TcpRoute)>;
        let rows: Vec<(Breaks, &str)> = vec![
            (Box::new(|r| r.matches.clear()), "tls_routes[0].matches"),
            (
                Box::new(|r| r.matches[0].sni_hosts.clear()),
                "tls_routes[0].matches[0].sni_hosts",
            ),
            (
                Box::new(|r| r.matches[0].sni_hosts = vec!["a..b".into()]),
                "tls_routes[0].matches[0].sni_hosts[0]",
            ),
            (
                Box::new(|r| r.matches[0].sni_hosts = vec!["db.*.example".into()]),
                "tls_routes[0].matches[0].sni_hosts[0]",
            ),
            (
                Box::new(|r| r.matches[0].sni_hosts = vec!["DB.example".into()]),
                "tls_routes[0].matches[0].sni_hosts[0]",
            ),
            (
                Box::new(|r| r.matches[0].sni_hosts = vec!["x".repeat(256)]),
                "tls_routes[0].matches[0].sni_hosts[0]",
            ),
            (
                Box::new(|r| r.matches[0].sni_hosts = vec!["a.b".into(); MAX_MATCH_CONDITIONS + 1]),
                "tls_routes[0].matches[0].sni_hosts",
            ),
            (
                Box::new(|r| r.destinations[0].subset = Some("nope".into())),
                "tls_routes[0].destinations[0].subset",
            ),
        ];
        for (breaks, field) in rows {
            let mut r = ok();
            breaks(&mut r);
            let p = HttpPolicy {
                tls_routes: vec![r],
                ..policy()
            };
            assert_eq!(p.compile().unwrap_err().field, field);
        }
        // A TCP route matches no SNI.
        let p = HttpPolicy {
            tcp_routes: vec![ok()],
            ..policy()
        };
        assert_eq!(
            p.compile().unwrap_err().field,
            "tcp_routes[0].matches[0].sni_hosts"
        );
        let p = HttpPolicy {
            tls_routes: vec![ok(); MAX_ROUTES + 1],
            ..policy()
        };
        assert_eq!(p.compile().unwrap_err().field, "tls_routes");
        assert!(
            HttpPolicy {
                tls_routes: vec![ok()],
                ..policy()
            }
            .compile()
            .is_ok()
        );
    }

    #[test]
    fn tcp_routes_pick_by_port_subnet_and_caller() {
        let m = TcpMatch::default;
        let route = |name: &str, matches: Vec<TcpMatch>| TcpRoute {
            matches,
            destinations: vec![dest(name, 100)],
        };
        let p = HttpPolicy {
            tcp_routes: vec![
                route(
                    "v2",
                    vec![TcpMatch {
                        port: Some(5432),
                        source_namespace: Some("shop".into()),
                        ..m()
                    }],
                ),
                route(
                    "v2",
                    vec![TcpMatch {
                        destination_subnets: vec!["10.1.0.0/16".into(), "2001:db8::/32".into()],
                        ..m()
                    }],
                ),
                route(
                    "v2",
                    vec![TcpMatch {
                        gateways: vec!["ingress".into()],
                        ..m()
                    }],
                ),
                route(
                    "v2",
                    vec![TcpMatch {
                        source_labels: [("app".into(), "web".into())].into(),
                        ..m()
                    }],
                ),
                route(
                    "v1",
                    vec![
                        TcpMatch {
                            port: Some(5432),
                            ..m()
                        },
                        TcpMatch {
                            port: Some(6432),
                            ..m()
                        },
                    ],
                ),
            ],
            ..policy()
        };
        let c = p.compile().unwrap();
        let labels: BTreeMap<String, String> = [("app".into(), "web".into())].into();
        let view = |port, dest: &str, caller: &'static str, labelled: bool| TcpView {
            port,
            destination: dest.parse().unwrap(),
            caller,
            caller_labels: labelled.then_some(&labels),
        };
        let shop = "spiffe://east.example.org/ns/shop/sa/api";
        let other = "spiffe://east.example.org/ns/other/sa/api";
        let rows = [
            (
                view(5432, "127.0.0.2", shop, false),
                Some(0),
                "port and namespace",
            ),
            (
                view(5432, "127.0.0.2", other, false),
                Some(4),
                "another namespace: the port's route",
            ),
            (
                view(5432, "10.1.2.3", other, false),
                Some(1),
                "in the subnet",
            ),
            (
                view(5432, "::ffff:10.1.2.3", other, false),
                Some(1),
                "IPv4 in IPv6 form",
            ),
            (
                view(9000, "2001:db8::1", other, false),
                Some(1),
                "IPv6 subnet",
            ),
            (
                view(9000, "10.2.0.1", other, true),
                Some(3),
                "caller labels, when known",
            ),
            (
                view(6432, "10.2.0.1", other, false),
                Some(4),
                "the second match",
            ),
            (
                view(9000, "10.2.0.1", other, false),
                None,
                "none: the service itself",
            ),
        ];
        for (v, want, why) in rows {
            assert_eq!(c.tcp_route(&v).map(|(i, _)| i), want, "{why}");
        }
        // A route without matches takes every connection.
        let p = HttpPolicy {
            tcp_routes: vec![route("v1", vec![])],
            ..policy()
        };
        let c = p.compile().unwrap();
        assert_eq!(
            c.tcp_route(&view(1, "1.2.3.4", other, false))
                .map(|(i, _)| i),
            Some(0)
        );
    }

    #[test]
    fn subnets_hold_what_their_prefix_covers() {
        for (net, ip, want) in [
            ("10.0.0.0/8", "10.255.1.1", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "::1", true),
            ("10.0.0.0/8", "::ffff:10.0.0.1", true),
        ] {
            let n = parse_subnet(net).unwrap();
            assert_eq!(in_subnet(ip.parse().unwrap(), n), want, "{ip} in {net}");
        }
        for bad in [
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(parse_subnet(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tcp_routes_are_checked_by_path() {
        let ok = || TcpRoute {
            matches: vec![],
            destinations: vec![dest("v1", 100)],
        };
        type Breaks = Box<dyn Fn(&mut TcpRoute)>;
        let rows: Vec<(Breaks, &str)> = vec![
            (
                Box::new(|r| r.destinations.clear()),
                "tcp_routes[0].destinations",
            ),
            (
                Box::new(|r| r.destinations[0].subset = Some("nope".into())),
                "tcp_routes[0].destinations[0].subset",
            ),
            (
                Box::new(|r| r.destinations[0].headers = Some(Box::default())),
                "tcp_routes[0].destinations[0].headers",
            ),
            (
                Box::new(|r| r.destinations[0].port = Some(0)),
                "tcp_routes[0].destinations[0].port",
            ),
            (
                Box::new(|r| {
                    r.destinations[0].service = Some(ServiceName::parse("db.other").unwrap())
                }),
                "tcp_routes[0].destinations[0].service",
            ),
            (
                Box::new(|r| {
                    r.matches = vec![TcpMatch {
                        destination_subnets: vec!["10.0.0.0/40".into()],
                        ..Default::default()
                    }]
                }),
                "tcp_routes[0].matches[0].destination_subnets[0]",
            ),
            (
                Box::new(|r| {
                    r.matches = vec![TcpMatch {
                        port: Some(0),
                        ..Default::default()
                    }]
                }),
                "tcp_routes[0].matches[0].port",
            ),
            (
                Box::new(|r| {
                    r.matches = vec![TcpMatch {
                        source_namespace: Some("A".into()),
                        ..Default::default()
                    }]
                }),
                "tcp_routes[0].matches[0].source_namespace",
            ),
            (
                Box::new(|r| r.matches = vec![TcpMatch::default(); MAX_MATCHES + 1]),
                "tcp_routes[0].matches",
            ),
        ];
        for (breaks, field) in rows {
            let mut r = ok();
            breaks(&mut r);
            let p = HttpPolicy {
                tcp_routes: vec![r],
                ..policy()
            };
            let e = p.compile().expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
        let p = HttpPolicy {
            tcp_routes: vec![ok(); MAX_ROUTES + 1],
            ..policy()
        };
        assert_eq!(p.compile().unwrap_err().field, "tcp_routes");
    }

    #[test]
    fn a_path_prefix_matches_by_path_element() {
        for (prefix, path, want) in [
            ("/foo", "/foo", true),
            ("/foo", "/foo/", true),
            ("/foo", "/foo/bar", true),
            ("/foo", "/foobar", false),
            ("/foo/", "/foo", true),
            ("/foo/", "/foo/bar", true),
            ("/", "/anything", true),
            ("/", "/", true),
            ("/a/b", "/a", false),
        ] {
            let m = StringMatch::PathPrefix(prefix.into()).compile("x").unwrap();
            assert_eq!(m.test(path), want, "{prefix} on {path}");
        }
    }

    #[test]
    fn bad_policies_name_their_field() {
        type Change = Box<dyn Fn(&mut HttpPolicy)>;
        let rows: Vec<(Change, &str)> = vec![
            (
                Box::new(|p| p.routes[1].destinations[1].weight = MAX_WEIGHT + 1),
                "routes[1].destinations[1].weight",
            ),
            (
                Box::new(|p| p.routes[1].destinations[1].port = Some(0)),
                "routes[1].destinations[1].port",
            ),
            (
                Box::new(|p| {
                    let mut h = HeaderRules::default();
                    h.response.remove.push("transfer-encoding".into());
                    p.routes[1].destinations[1].headers = Some(Box::new(h));
                }),
                "routes[1].destinations[1].headers.response.remove.transfer-encoding",
            ),
            (
                Box::new(|p| {
                    p.routes[1].destinations[1].service =
                        Some(ServiceName::parse("payments.billing").unwrap());
                }),
                "routes[1].destinations[1].service",
            ),
            (
                Box::new(|p| p.routes[0].destinations[0].subset = Some("v3".into())),
                "routes[0].destinations[0].subset",
            ),
            (
                Box::new(|p| p.routes[1].matches[0].uri = Some(StringMatch::Regex("(".into()))),
                "routes[1].matches[0].uri.regex",
            ),
            (
                Box::new(|p| {
                    p.routes[0].matches[0]
                        .headers
                        .insert("x-a".into(), StringMatch::Regex("a{99999}".into()));
                }),
                "routes[0].matches[0].headers.x-a.regex",
            ),
            (Box::new(|p| p.routes.clear()), "routes"),
            (
                Box::new(|p| p.routes[2].destinations.clear()),
                "routes[2].destinations",
            ),
            (
                Box::new(|p| p.subsets[1].name = "v1".into()),
                "subsets[1].name",
            ),
            (
                Box::new(|p| p.routes[2].timeout_ms = Some(0)),
                "routes[2].timeout_ms",
            ),
            (
                Box::new(|p| p.max_requests_per_connection = Some(0)),
                "max_requests_per_connection",
            ),
            (Box::new(|p| p.idle_timeout_ms = Some(0)), "idle_timeout_ms"),
            (
                Box::new(|p| p.connect_timeout_ms = Some(0)),
                "connect_timeout_ms",
            ),
            (
                Box::new(|p| {
                    p.tcp_keepalive = Some(TcpKeepalive {
                        probes: Some(128),
                        ..Default::default()
                    })
                }),
                "tcp_keepalive.probes",
            ),
            (
                Box::new(|p| {
                    p.tcp_keepalive = Some(TcpKeepalive {
                        time_ms: Some(0),
                        ..Default::default()
                    })
                }),
                "tcp_keepalive.time_ms",
            ),
            (
                Box::new(|p| {
                    p.retry_budget = Some(RetryBudget {
                        per_million: 1_000_001,
                        min_retry_concurrency: 3,
                    })
                }),
                "retry_budget.per_million",
            ),
            (
                Box::new(|p| {
                    p.routes[0].mirrors = vec![Mirror {
                        service: Some(ServiceName::parse("payments.billing").unwrap()),
                        port: None,
                        subset: None,
                        per_million: 1,
                    }];
                }),
                "routes[0].mirrors[0].service",
            ),
            (
                Box::new(|p| {
                    p.routes[0].mirrors = vec![
                        Mirror {
                            service: None,
                            port: None,
                            subset: None,
                            per_million: 1,
                        },
                        Mirror {
                            service: Some(ServiceName::parse("web-v2.demo").unwrap()),
                            port: Some(0),
                            subset: None,
                            per_million: 1,
                        },
                    ];
                }),
                "routes[0].mirrors[1].port",
            ),
            (
                Box::new(|p| {
                    p.routes[0].mirrors = vec![Mirror {
                        service: None,
                        port: None,
                        subset: Some("v3".into()),
                        per_million: 1,
                    }];
                }),
                "routes[0].mirrors[0].subset",
            ),
            (
                Box::new(|p| {
                    let m = Mirror {
                        service: None,
                        port: None,
                        subset: None,
                        per_million: 1,
                    };
                    p.routes[0].mirrors = vec![m; MAX_MIRRORS + 1];
                }),
                "routes[0].mirrors",
            ),
        ];
        for (change, field) in rows {
            let mut p = policy();
            change(&mut p);
            assert_eq!(p.compile().unwrap_err().field, field);
        }
        // Weights are relative (Gateway API's); a subset of another service is that
        // service's policy's to check.
        let mut p = policy();
        p.routes[1].destinations[1].weight = 30;
        p.routes[1].destinations[1].service = Some(ServiceName::parse("web-v2.demo").unwrap());
        p.routes[1].destinations[1].subset = Some("elsewhere".into());
        p.routes[0].mirrors = vec![Mirror {
            service: Some(ServiceName::parse("web-v2.demo").unwrap()),
            port: Some(9090),
            subset: Some("elsewhere".into()),
            per_million: 1_000_000,
        }];
        assert!(p.compile().is_ok());
    }

    #[test]
    fn routes_apply_to_callers_of_the_namespaces_they_are_exported_to() {
        let mut p = policy();
        // Exported everywhere: any caller, with a namespace or without.
        for caller in [
            "spiffe://east.example.org/ns/demo/sa/client",
            "spiffe://east.example.org/meshfed/site/east/gateway",
        ] {
            assert!(p.routes_apply_to(caller), "{caller}");
        }
        p.export_to = vec!["demo".into(), "shop".into()];
        assert!(p.clone().compile().is_ok());
        let rows = [
            ("spiffe://east.example.org/ns/demo/sa/client", true),
            ("spiffe://other.example.org/ns/shop/sa/orders", true),
            ("spiffe://east.example.org/ns/other/sa/client", false),
            // No namespace in the ID (a gateway's own): not one of them.
            ("spiffe://east.example.org/meshfed/site/east/gateway", false),
            // `ns` as a value, not the segment's name.
            ("spiffe://east.example.org/sa/ns", false),
            ("spiffe://east.example.org/ns/demox/sa/client", false),
        ];
        for (caller, want) in rows {
            assert_eq!(p.routes_apply_to(caller), want, "{caller}");
        }
        // Refused by path: not a label, twice, too many.
        for (list, field) in [
            (vec!["demo", "a.b"], "export_to[1]"),
            (vec!["Demo"], "export_to[0]"),
            (vec!["*"], "export_to[0]"),
            (vec!["demo", "demo"], "export_to[1]"),
            (vec![""], "export_to[0]"),
        ] {
            let mut q = p.clone();
            q.export_to = list.iter().map(|s| s.to_string()).collect();
            assert_eq!(q.compile().err().map(|e| e.field), Some(field.to_owned()));
        }
        let mut q = p.clone();
        q.export_to = (0..=MAX_EXPORT_TO).map(|i| format!("ns{i}")).collect();
        assert_eq!(
            q.compile().err().map(|e| e.field),
            Some("export_to".to_owned())
        );
    }

    #[test]
    fn a_subsets_policy_replaces_the_blocks_it_sets_and_its_port_settings_replace_all() {
        let outlier = |n| Outlier {
            consecutive_5xx: n,
            consecutive_gateway: 0,
            base_ejection_ms: 1_000,
            max_ejection_percent: 50,
            interval_ms: None,
        };
        let mut p = policy();
        p.max_requests = Some(100);
        p.load_balancer = Some(LoadBalancer::Random);
        p.outlier = Some(outlier(5));
        p.port_settings = vec![PortSettings {
            port: 8080,
            pool: Some(PortPool {
                max_requests: Some(50),
                ..Default::default()
            }),
            ..Default::default()
        }];
        // v1: a balancer of its own; v2: a breaker, and port 9090 all its own.
        p.subsets[0].policy = Some(SubsetPolicy {
            balancer: Some(PortBalancer {
                load_balancer: Some(LoadBalancer::LeastRequest),
                ..Default::default()
            }),
            ..Default::default()
        });
        p.subsets[1].policy = Some(SubsetPolicy {
            pool: Some(PortPool {
                max_requests: Some(3),
                ..Default::default()
            }),
            port_settings: vec![PortSettings {
                port: 9090,
                outlier: Some(outlier(1)),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(p.clone().compile().is_ok());
        let (v1, v2) = (&p.subsets[0], &p.subsets[1]);
        let at = |port, subset: Option<&Subset>| {
            let t = p.traffic(port, subset);
            (
                t.pool.max_requests,
                t.balancer.load_balancer,
                t.outlier.map(|o| o.consecutive_5xx),
            )
        };
        // (port, subset) → (breaker, balancer, outlier's consecutive 5xx)
        type Want = (Option<u32>, Option<LoadBalancer>, Option<u32>);
        let rows: Vec<(u16, Option<&Subset>, Want)> = vec![
            // The service: its own blocks; on 8080 the port's setting, nothing inherited.
            (443, None, (Some(100), Some(LoadBalancer::Random), Some(5))),
            (8080, None, (Some(50), None, None)),
            // v1 sets a balancer: the rest is the destination's at the port.
            (
                443,
                Some(v1),
                (Some(100), Some(LoadBalancer::LeastRequest), Some(5)),
            ),
            (
                8080,
                Some(v1),
                (Some(50), Some(LoadBalancer::LeastRequest), None),
            ),
            // v2 sets a breaker; on 9090 its port setting replaces every block.
            (
                443,
                Some(v2),
                (Some(3), Some(LoadBalancer::Random), Some(5)),
            ),
            (8080, Some(v2), (Some(3), None, None)),
            (9090, Some(v2), (None, None, Some(1))),
        ];
        for (i, (port, subset, want)) in rows.into_iter().enumerate() {
            assert_eq!(at(port, subset), want, "row {i}");
        }
        // Without a subset policy, the traffic is the port's view of the policy.
        let t = p.traffic(8080, None);
        let q = p.clone().for_port(8080);
        assert_eq!(
            t.pool,
            PortPool {
                max_requests: q.max_requests,
                max_requests_per_connection: q.max_requests_per_connection,
                idle_timeout_ms: q.idle_timeout_ms,
                connect_timeout_ms: q.connect_timeout_ms,
                tcp_keepalive: q.tcp_keepalive,
                connection_pool: q.connection_pool,
            }
        );
        assert_eq!(
            (t.outlier.as_ref(), t.balancer.load_balancer),
            (q.outlier.as_ref(), q.load_balancer)
        );
        // Refused with the subset's path: a bad block, a port twice, port 0, and a
        // subset balancer that is both simple and a hash.
        type Change = Box<dyn Fn(&mut HttpPolicy)>;
        let rows: Vec<(Change, &str)> = vec![
            (
                Box::new(|p| {
                    p.subsets[1]
                        .policy
                        .as_mut()
                        .unwrap()
                        .pool
                        .as_mut()
                        .unwrap()
                        .max_requests = Some(0)
                }),
                "subsets[1].policy.max_requests",
            ),
            (
                Box::new(|p| {
                    let sp = p.subsets[1].policy.as_mut().unwrap();
                    sp.port_settings.push(sp.port_settings[0].clone());
                }),
                "subsets[1].policy.port_settings[1].port",
            ),
            (
                Box::new(|p| p.subsets[1].policy.as_mut().unwrap().port_settings[0].port = 0),
                "subsets[1].policy.port_settings[0].port",
            ),
            (
                Box::new(|p| {
                    p.subsets[1].policy.as_mut().unwrap().port_settings[0]
                        .outlier
                        .as_mut()
                        .unwrap()
                        .max_ejection_percent = 101
                }),
                "subsets[1].policy.port_settings[0].outlier.max_ejection_percent",
            ),
            (
                Box::new(|p| {
                    p.subsets[0]
                        .policy
                        .as_mut()
                        .unwrap()
                        .balancer
                        .as_mut()
                        .unwrap()
                        .consistent_hash = Some(crate::affinity::HashKey::SourceIp)
                }),
                "subsets[0].policy.consistent_hash",
            ),
        ];
        for (change, field) in rows {
            let mut q = p.clone();
            change(&mut q);
            assert_eq!(q.compile().err().map(|e| e.field), Some(field.to_owned()));
        }
        // On the wire: the policy travels with its subset, and a subset without one is
        // written as before.
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<HttpPolicy>(&json).unwrap(), p);
        let plain = serde_json::to_value(&policy().subsets[0]).unwrap();
        assert!(plain.get("policy").is_none(), "{plain}");
    }

    #[test]
    fn a_ports_settings_replace_the_policys_blocks_for_that_port_only() {
        let mut p = policy();
        p.max_requests = Some(100);
        p.idle_timeout_ms = Some(5_000);
        p.load_balancer = Some(LoadBalancer::Random);
        p.outlier = Some(Outlier {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            base_ejection_ms: 30_000,
            max_ejection_percent: 10,
            interval_ms: None,
        });
        p.port_settings = vec![
            PortSettings {
                port: 8080,
                // A pool block that sets only max_requests: the policy's idle timeout
                // is not inherited (Istio's rule).
                pool: Some(PortPool {
                    max_requests: Some(7),
                    ..Default::default()
                }),
                outlier: None,
                balancer: Some(PortBalancer {
                    load_balancer: Some(LoadBalancer::LeastRequest),
                    ..Default::default()
                }),
            },
            PortSettings {
                port: 9090,
                pool: None,
                outlier: Some(Outlier {
                    consecutive_5xx: 1,
                    consecutive_gateway: 0,
                    base_ejection_ms: 1_000,
                    max_ejection_percent: 100,
                    interval_ms: None,
                }),
                balancer: None,
            },
        ];
        assert!(p.clone().compile().is_ok());
        // No settings for the port: the policy itself, borrowed.
        assert!(matches!(p.at_port(443), std::borrow::Cow::Borrowed(_)));
        let at = |port| {
            let q = p.clone().for_port(port);
            assert!(q.port_settings.is_empty());
            // The two agree, but for the settings a borrowed policy keeps; so does the
            // view of the blocks in force the exporting gateway reads.
            let mut r = p.at_port(port).into_owned();
            r.port_settings.clear();
            assert_eq!(q, r);
            let t = p.traffic(port, None);
            assert_eq!(q.outlier.as_ref(), t.outlier.as_ref());
            assert_eq!(
                (
                    q.max_requests,
                    q.max_requests_per_connection,
                    q.idle_timeout_ms,
                    q.connection_pool
                ),
                {
                    let b = t.pool;
                    (
                        b.max_requests,
                        b.max_requests_per_connection,
                        b.idle_timeout_ms,
                        b.connection_pool,
                    )
                }
            );
            (
                q.max_requests,
                q.idle_timeout_ms,
                q.load_balancer,
                q.outlier.map(|o| o.consecutive_5xx),
            )
        };
        // Every block the port does not set takes its default, not the policy's
        // (pilot's GetPortLevelTrafficPolicy): 8080 has no outlier detection, 9090 no
        // breaker, idle timeout or balancer.
        assert_eq!(
            at(8080),
            (Some(7), None, Some(LoadBalancer::LeastRequest), None)
        );
        assert_eq!(at(9090), (None, None, None, Some(1)));
        assert_eq!(
            at(443),
            (Some(100), Some(5_000), Some(LoadBalancer::Random), Some(5))
        );
        // Refused with the setting's path: a port twice, port 0, a bad value in a port's
        // block, and a port's simple balancer beside the policy's consistent hash is
        // fine (the block replaces it), but not beside its own.
        type Change = Box<dyn Fn(&mut HttpPolicy)>;
        let rows: Vec<(Change, &str)> = vec![
            (
                Box::new(|p| p.port_settings[1].port = 8080),
                "port_settings[1].port",
            ),
            (
                Box::new(|p| p.port_settings[0].port = 0),
                "port_settings[0].port",
            ),
            (
                Box::new(|p| p.port_settings[0].pool.as_mut().unwrap().max_requests = Some(0)),
                "port_settings[0].max_requests",
            ),
            (
                Box::new(|p| {
                    p.port_settings[1]
                        .outlier
                        .as_mut()
                        .unwrap()
                        .max_ejection_percent = 101
                }),
                "port_settings[1].outlier.max_ejection_percent",
            ),
            (
                Box::new(|p| {
                    p.port_settings[0]
                        .balancer
                        .as_mut()
                        .unwrap()
                        .consistent_hash = Some(crate::affinity::HashKey::SourceIp)
                }),
                "port_settings[0].consistent_hash",
            ),
            (
                Box::new(|p| {
                    p.port_settings = vec![PortSettings::default(); MAX_PORT_SETTINGS + 1];
                }),
                "port_settings",
            ),
        ];
        for (change, field) in rows {
            let mut q = p.clone();
            change(&mut q);
            assert_eq!(q.compile().unwrap_err().field, field);
        }
        let mut q = p.clone();
        q.consistent_hash = Some(crate::affinity::HashKey::SourceIp);
        q.load_balancer = None;
        assert!(q.compile().is_ok(), "the port's balancer replaces the hash");
    }

    #[test]
    fn one_mirror_is_written_as_before_and_several_as_a_list() {
        let m = |subset: &str| Mirror {
            service: None,
            port: None,
            subset: Some(subset.into()),
            per_million: 500_000,
        };
        let mut p = policy();
        p.routes[0].mirrors = vec![m("v2")];
        let v = serde_json::to_value(&p).unwrap();
        // The object a gateway that knows one mirror reads.
        assert_eq!(
            v["routes"][0]["mirror"],
            serde_json::json!({"subset": "v2", "per_million": 500_000})
        );
        assert_eq!(serde_json::from_value::<HttpPolicy>(v).unwrap(), p);
        p.routes[0].mirrors = vec![m("v2"), m("v1")];
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["routes"][0]["mirror"][1]["subset"], "v1");
        assert_eq!(serde_json::from_value::<HttpPolicy>(v).unwrap(), p);
        p.routes[0].mirrors.clear();
        let v = serde_json::to_value(&p).unwrap();
        assert!(v["routes"][0].get("mirror").is_none());
        assert_eq!(serde_json::from_value::<HttpPolicy>(v).unwrap(), p);
    }

    #[test]
    fn unknown_fields_are_refused_not_dropped() {
        let mut v = serde_json::to_value(policy()).unwrap();
        v["routes"][0]["delegate"] = serde_json::json!("x");
        let e = serde_json::from_value::<HttpPolicy>(v).unwrap_err();
        assert!(e.to_string().contains("delegate"), "{e}");
    }
}
