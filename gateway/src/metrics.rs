//! The gateway's Prometheus metrics. Refusal and handshake-failure labels are the same
//! stable codes that cross the wire and appear in logs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    /// `egress` (local client → tunnel) or `ingress` (tunnel → local endpoint).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `svid` or `bundles`.
    pub what: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    /// `to_tunnel` or `from_tunnel`.
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuicLabels {
    /// The peer gateway's SPIFFE ID.
    pub peer: String,
    /// `dialed` (we connected to the peer) or `accepted` (the peer connected to us).
    pub side: &'static str,
}

/// QUIC path figures per peer connection, sampled from quinn's connection statistics
/// (see [`watch_path`]). Counters carry on across reconnections to the same peer.
#[derive(Clone, Default)]
pub struct QuicPath {
    pub rtt_seconds: Family<QuicLabels, Gauge<f64, AtomicU64>>,
    pub cwnd_bytes: Family<QuicLabels, Gauge>,
    pub mtu_bytes: Family<QuicLabels, Gauge>,
    pub sent_packets: Family<QuicLabels, Counter>,
    pub lost_packets: Family<QuicLabels, Counter>,
    pub lost_bytes: Family<QuicLabels, Counter>,
    pub congestion_events: Family<QuicLabels, Counter>,
    pub black_holes: Family<QuicLabels, Counter>,
}

/// How often a live connection's path statistics are copied into the metrics.
pub const PATH_SAMPLE: Duration = Duration::from_secs(1);

/// Copies `conn`'s path statistics into `m` every [`PATH_SAMPLE`] until it closes, then
/// once more and drops its gauges. Loss and congestion on the path between two sites are
/// what a tunnel's tail latency follows, so they are visible per peer.
pub async fn watch_path(m: QuicPath, conn: quinn::Connection, labels: QuicLabels) {
    let mut last = quinn::PathStats::default();
    loop {
        let closed = tokio::select! {
            _ = conn.closed() => true,
            _ = tokio::time::sleep(PATH_SAMPLE) => false,
        };
        let now = conn.stats().path;
        let add = |c: &Family<QuicLabels, Counter>, now: u64, was: u64| {
            c.get_or_create(&labels).inc_by(now.saturating_sub(was));
        };
        add(&m.sent_packets, now.sent_packets, last.sent_packets);
        add(&m.lost_packets, now.lost_packets, last.lost_packets);
        add(&m.lost_bytes, now.lost_bytes, last.lost_bytes);
        add(
            &m.congestion_events,
            now.congestion_events,
            last.congestion_events,
        );
        add(
            &m.black_holes,
            now.black_holes_detected,
            last.black_holes_detected,
        );
        if closed {
            m.rtt_seconds.remove(&labels);
            m.cwnd_bytes.remove(&labels);
            m.mtu_bytes.remove(&labels);
            return;
        }
        m.rtt_seconds
            .get_or_create(&labels)
            .set(now.rtt.as_secs_f64());
        m.cwnd_bytes
            .get_or_create(&labels)
            .set(i64::try_from(now.cwnd).unwrap_or(i64::MAX));
        m.mtu_bytes
            .get_or_create(&labels)
            .set(i64::from(now.current_mtu));
        last = now;
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    pub site: String,
    pub address: String,
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteReasonLabels {
    pub site: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub direction: &'static str,
    /// `1xx` … `5xx` (a WebSocket's `101` is `1xx`; anything odd is `other`).
    pub class: &'static str,
}

/// A status's class label. Pure.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The import, `service:port`.
    pub import: String,
    /// The route's name (`#i` for the i-th when unnamed).
    pub route: String,
    /// The site that gave the answer (`none`: no site did).
    pub site: String,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpRouteLabels {
    /// The import, `service:port`.
    pub import: String,
    /// The TCP route, `#i` (Istio's TCP routes have no names).
    pub route: String,
    /// The site that accepted the connection (`none`: none did).
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImportRouteLabels {
    pub import: String,
    pub route: String,
}

/// One service's traffic between two sites, seen from one side. `service` is one this
/// gateway imports (egress) or exports (ingress), never a name a peer sent
/// (`_unknown` then); sites come from the verified peer ID.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub direction: &'static str,
    pub service: String,
    pub port: u16,
    pub source_site: String,
    pub destination_site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceFlowLabels {
    pub direction: &'static str,
    pub service: String,
    pub port: u16,
    pub source_site: String,
    pub destination_site: String,
    /// `to_tunnel` or `from_tunnel`.
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceReasonLabels {
    pub direction: &'static str,
    pub service: String,
    pub port: u16,
    pub source_site: String,
    pub destination_site: String,
    pub reason: &'static str,
}

/// The most (direction, service, port, source site, destination site) label sets the
/// per-service families hold; past it, new ones are counted under `_overflow` labels.
/// Imports and exports × sites stay far below it in any federation meshfed supports.
pub const MAX_SERVICE_SERIES: usize = 4096;

/// The label for a service or site that is not a known one.
pub const UNKNOWN: &str = "_unknown";
const OVERFLOW: &str = "_overflow";

type Histogram = prometheus_client::metrics::histogram::Histogram;

/// Per-service traffic families, and the guard that bounds their label sets.
#[derive(Clone)]
pub struct ServiceMetrics {
    pub connections: Family<ServiceLabels, Counter>,
    pub active_streams: Family<ServiceLabels, Gauge>,
    pub bytes: Family<ServiceFlowLabels, Counter>,
    pub refusals: Family<ServiceReasonLabels, Counter>,
    pub open_seconds: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<ServiceLabels>>>,
    seen_refusals: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<ServiceReasonLabels>>>,
}

/// What the egress carried to one peer site, cumulative: bytes sent and received, and
/// refused opens by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteTraffic {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub refusals: std::collections::BTreeMap<String, u64>,
}

impl Default for ServiceMetrics {
    fn default() -> Self {
        Self {
            connections: Family::default(),
            active_streams: Family::default(),
            bytes: Family::default(),
            refusals: Family::default(),
            open_seconds: Family::new_with_constructor(open_histogram),
            seen: Default::default(),
            seen_refusals: Default::default(),
        }
    }
}

impl ServiceMetrics {
    /// `l`, or the overflow label set when [`MAX_SERVICE_SERIES`] are taken.
    fn bounded(&self, l: ServiceLabels) -> ServiceLabels {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&l) {
            return l;
        }
        if seen.len() < MAX_SERVICE_SERIES {
            seen.insert(l.clone());
            return l;
        }
        ServiceLabels {
            direction: l.direction,
            service: OVERFLOW.into(),
            port: 0,
            source_site: OVERFLOW.into(),
            destination_site: OVERFLOW.into(),
        }
    }

    /// The series of one label set (bounded like every set), looked up once: a caller
    /// keeps them for its streams, so a stream costs no label hashing.
    pub fn handles(&self, l: ServiceLabels) -> ServiceHandles {
        let l = self.bounded(l);
        let flow = |flow| {
            self.bytes
                .get_or_create(&ServiceFlowLabels {
                    direction: l.direction,
                    service: l.service.clone(),
                    port: l.port,
                    source_site: l.source_site.clone(),
                    destination_site: l.destination_site.clone(),
                    flow,
                })
                .clone()
        };
        ServiceHandles {
            connections: self.connections.get_or_create(&l).clone(),
            active: self.active_streams.get_or_create(&l).clone(),
            tx: flow("to_tunnel"),
            rx: flow("from_tunnel"),
            // Opens are timed at the egress only.
            open: (l.direction == "egress").then(|| self.open_seconds.get_or_create(&l).clone()),
        }
    }

    pub fn refused(&self, l: ServiceLabels, reason: &'static str) {
        let l = self.bounded(l);
        let r = ServiceReasonLabels {
            direction: l.direction,
            service: l.service,
            port: l.port,
            source_site: l.source_site,
            destination_site: l.destination_site,
            reason,
        };
        self.refusals.get_or_create(&r).inc();
        let mut seen = self.seen_refusals.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded like the label sets: a reason per known set.
        if !seen.contains(&r) && seen.len() < MAX_SERVICE_SERIES * 4 {
            seen.insert(r);
        }
    }

    /// The egress's traffic by destination site, summed over services (for the links
    /// report that feeds the federation's topology page).
    pub fn egress_by_site(&self) -> std::collections::BTreeMap<String, SiteTraffic> {
        let mut out: std::collections::BTreeMap<String, SiteTraffic> = Default::default();
        let seen: Vec<ServiceLabels> = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.direction == "egress")
            .cloned()
            .collect();
        for l in seen {
            let get = |flow| {
                self.bytes
                    .get_or_create(&ServiceFlowLabels {
                        direction: l.direction,
                        service: l.service.clone(),
                        port: l.port,
                        source_site: l.source_site.clone(),
                        destination_site: l.destination_site.clone(),
                        flow,
                    })
                    .get()
            };
            let t = out.entry(l.destination_site.clone()).or_default();
            t.sent_bytes += get("to_tunnel");
            t.received_bytes += get("from_tunnel");
        }
        let refused: Vec<ServiceReasonLabels> = self
            .seen_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| r.direction == "egress")
            .cloned()
            .collect();
        for r in refused {
            let n = self.refusals.get_or_create(&r).get();
            *out.entry(r.destination_site.clone())
                .or_default()
                .refusals
                .entry(r.reason.to_owned())
                .or_default() += n;
        }
        out
    }
}

/// One label set's series ([`ServiceMetrics::handles`]).
#[derive(Clone)]
pub struct ServiceHandles {
    connections: Counter,
    active: Gauge,
    tx: Counter,
    rx: Counter,
    open: Option<Histogram>,
}

impl ServiceHandles {
    /// A stream started: counted, held in `active_streams` until the returned guard
    /// drops; its byte counters (to the tunnel, from it).
    pub fn stream(&self) -> (ActiveStream, (Counter, Counter)) {
        self.connections.inc();
        self.active.inc();
        (
            ActiveStream(self.active.clone()),
            (self.tx.clone(), self.rx.clone()),
        )
    }

    /// How long an open took to be accepted (the egress's view).
    pub fn opened(&self, took: Duration) {
        if let Some(h) = &self.open {
            h.observe(took.as_secs_f64());
        }
    }
}

/// [`Metrics::catalog_apply`]: 1 ms to ~16 s.
#[derive(Clone)]
pub struct ApplyHistogram(pub Histogram);

impl Default for ApplyHistogram {
    fn default() -> Self {
        Self(Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        ))
    }
}

fn open_histogram() -> Histogram {
    // 0.5 ms to ~4 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 14,
    ))
}

#[derive(Clone, Default)]
pub struct Metrics {
    /// This gateway's site: the source of its egress traffic, the destination of its
    /// ingress traffic, in the per-service labels.
    pub site: std::sync::Arc<str>,
    /// Per service, port, source and destination site (bounded by
    /// [`MAX_SERVICE_SERIES`]).
    pub service: ServiceMetrics,
    /// HTTP requests answered 429 by a route's rate limit, by import and route: at most
    /// imports × 64 routes series.
    pub http_rate_limited: Family<ImportRouteLabels, Counter>,
    /// HTTP requests of imports with routes, by import, route, answering site and status
    /// class: at most imports × 64 routes × (sites + 1) × 5 series.
    pub http_route_requests: Family<RouteLabels, Counter>,
    /// TCP connections a service's TCP routes decided, by import, route and accepting
    /// site: at most imports × 64 routes × (sites + 1) series.
    pub tcp_route_connections: Family<TcpRouteLabels, Counter>,
    /// HTTP requests on `http`/`http2`/`grpc` ports answered, by direction and status
    /// class (10 series at most).
    pub http_requests: Family<HttpLabels, Counter>,
    /// HTTP attempts retried at the egress, by why the last one failed (`not_sent`,
    /// `lost`, `status`).
    pub http_retries: Family<ReasonLabels, Counter>,
    /// Mirrored copies of HTTP requests, by result (`sent`, `failed`, `dropped`).
    pub http_mirrors: Family<ResultLabels, Counter>,
    /// Sites ejected at the egress by outlier detection.
    pub http_ejections: Counter,
    /// HTTP requests refused at the egress because `max_requests` were in flight.
    pub http_overflows: Family<DirLabels, Counter>,
    /// Imports whose exporting sites publish different HTTP routes (the first site by
    /// name applies).
    pub route_conflicts: Gauge,
    /// Exports whose HTTP policy this gateway could not read (a newer site's field):
    /// applied with the policy in force before, or none.
    pub catalog_unreadable_policies: Counter,
    /// Seconds each catalog apply took (the plan, peers and listeners of what changed).
    pub catalog_apply: ApplyHistogram,
    /// Seconds each write of the catalog cache and `imports.json` took.
    pub catalog_cache_write: ApplyHistogram,
    /// The catalog revision of the plan applied last (how far behind the federation a
    /// gateway is: compare with `meshfed_federation_revision`).
    pub catalog_revision: Gauge,
    /// Imports with a listener, and those left without one (past the listener budget).
    pub imports_bound: Gauge,
    pub imports_unbound: Gauge,
    /// 1 for the transport each dialed peer link uses now (at most 32 addresses per
    /// peer site, one series each).
    pub link_transport: Family<LinkLabels, Gauge>,
    /// `auto` links moved between transports, by site and reason (`quic_timeout`:
    /// to h2; `quic_restored`: back to QUIC).
    pub transport_moves: Family<SiteReasonLabels, Counter>,
    pub connections: Family<DirLabels, Counter>,
    pub active_streams: Family<DirLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub peer_connections: Gauge,
    pub peer_reconnects: Counter,
    pub identity_reloads: Family<ReloadLabels, Counter>,
    /// Stateless Retries sent to unvalidated addresses while handshakes pile up.
    pub quic_retries: Counter,
    /// SVIDs found on disk and refused (kept the working one), by the verifier's code.
    pub svid_refusals: Family<ReasonLabels, Counter>,
    /// SVIDs the gateway renewed itself (`tls.renew`), by result (`ok`, `failed`).
    pub svid_renewals: Family<ResultLabels, Counter>,
    /// Sites skipped for an import because they refused or were unreachable.
    pub failovers: Family<ReasonLabels, Counter>,
    /// Open TCP streams the ingress reset because a change no longer allows them, by
    /// refusal code (`denied`, `not_exported_to_peer`, `foreign_caller`).
    pub streams_cut: Family<ReasonLabels, Counter>,
    /// Opens an AuthorizationPolicy denied, by policy (`namespace/name`, or
    /// `no_allow_match`): at most one series per registered policy, plus one.
    pub authz_denials: Family<PolicyLabels, Counter>,
    /// notAfter of the SVID in use, Unix seconds: alert when it nears `time()`.
    pub svid_not_after: Gauge,
    /// UDP datagrams and their payload bytes carried, like `bytes`.
    pub udp_datagrams: Family<BytesLabels, Counter>,
    pub udp_bytes: Family<BytesLabels, Counter>,
    /// UDP datagrams dropped by a gateway, by stable reason.
    pub udp_drops: Family<RefusalLabels, Counter>,
    /// UDP flows opened, and open now.
    pub udp_flows: Family<DirLabels, Counter>,
    pub udp_active_flows: Family<DirLabels, Gauge>,
    pub quic: QuicPath,
}

impl Metrics {
    /// Registers every metric under the `meshfed_gateway` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("meshfed_gateway");
        r.register(
            "service_connections",
            "Tunnelled TCP connections accepted, by direction, service, port, source and destination site (at most 4096 label sets; past them, _overflow)",
            self.service.connections.clone(),
        );
        r.register(
            "service_active_streams",
            "Tunnelled TCP connections in flight, by direction, service, port, source and destination site",
            self.service.active_streams.clone(),
        );
        r.register(
            "service_bytes",
            "Payload bytes carried, by direction, service, port, source and destination site, and flow",
            self.service.bytes.clone(),
        );
        r.register(
            "service_refusals",
            "Opens refused, by direction, service (_unknown for a name this gateway does not export), port, source and destination site, and reason (the wire's stable code)",
            self.service.refusals.clone(),
        );
        r.register(
            "service_open_seconds",
            "Time from a client's connection to the far side's accept, at the egress, by service, port and destination site",
            self.service.open_seconds.clone(),
        );
        r.register(
            "connections",
            "Tunnelled connections accepted",
            self.connections.clone(),
        );
        r.register(
            "active_streams",
            "Tunnelled connections in flight",
            self.active_streams.clone(),
        );
        r.register("bytes", "Payload bytes carried", self.bytes.clone());
        r.register(
            "http_requests",
            "HTTP requests answered on HTTP-family ports, by direction and status class",
            self.http_requests.clone(),
        );
        r.register(
            "http_mirrors",
            "Mirrored copies of HTTP requests, by result: sent, failed, dropped (too many in flight, or a streamed body)",
            self.http_mirrors.clone(),
        );
        r.register(
            "http_ejections",
            "Sites ejected from an import's HTTP traffic after consecutive errors (outlierDetection)",
            self.http_ejections.clone(),
        );
        r.register(
            "http_rate_limited",
            "HTTP requests answered 429 at the egress by a route's rate limit (ratelimit.meshfed.io/ annotations), by import and route",
            self.http_rate_limited.clone(),
        );
        r.register(
            "http_overflows",
            "HTTP requests answered 503 overflow at once: at the egress, max_requests (a DestinationRule's http2MaxRequests) were in flight; at the ingress, maxConnections were in use and http1MaxPendingRequests waited",
            self.http_overflows.clone(),
        );
        r.register(
            "catalog_unreadable_policies",
            "Exports whose HTTP policy this gateway could not read (a newer site's field, say): applied with the policy in force before, or none",
            self.catalog_unreadable_policies.clone(),
        );
        r.register(
            "route_conflicts",
            "Imports whose exporting sites publish different HTTP routes; the first site by name applies",
            self.route_conflicts.clone(),
        );
        r.register(
            "catalog_apply_seconds",
            "Time each catalog apply took (the plan, peers and import listeners of the services that changed; all of them after a snapshot); the next apply waits 4x as long (at most 1 s)",
            self.catalog_apply.0.clone(),
        );
        r.register(
            "catalog_revision",
            "The catalog revision of the plan this gateway applied last",
            self.catalog_revision.clone(),
        );
        r.register(
            "catalog_cache_write_seconds",
            "Time each write of the catalog cache and imports.json took (both as large as the catalog); the next write waits 4x as long (at most 5 s)",
            self.catalog_cache_write.0.clone(),
        );
        r.register(
            "imports_bound",
            "Imported (service, port)s this gateway listens on",
            self.imports_bound.clone(),
        );
        r.register(
            "imports_unbound",
            "Imported (service, port)s without a listener: past the listener budget (half the open-file limit), a full vip_range or import_ports, or a bind error",
            self.imports_unbound.clone(),
        );
        r.register(
            "http_route_requests",
            "HTTP requests of imports with routes, by import, route, answering site (none: answered by the egress itself) and status class",
            self.http_route_requests.clone(),
        );
        r.register(
            "tcp_route_connections",
            "TCP connections a service's TCP or TLS routes decided, by import, route (#i for tcp[i], tls#i for tls[i], tls: TLS routes applied and none matched the SNI) and the site that accepted (none: refused)",
            self.tcp_route_connections.clone(),
        );
        r.register(
            "http_retries",
            "HTTP requests tried again at the egress, by why the attempt failed (not_sent, lost, status)",
            self.http_retries.clone(),
        );
        r.register(
            "refusals",
            "Streams refused, by stable reason code",
            self.refusals.clone(),
        );
        r.register(
            "handshake_failures",
            "mTLS handshakes refused, by stable reason code",
            self.handshake_failures.clone(),
        );
        r.register(
            "peer_connections",
            "Live links (QUIC connections or h2 pools) to peer gateways",
            self.peer_connections.clone(),
        );
        r.register(
            "peer_link_transport",
            "1 for the transport (quic or h2) each dialed peer link uses now",
            self.link_transport.clone(),
        );
        r.register(
            "transport_moves",
            "Peer links moved between transports (transport: auto), by reason: quic_timeout (to h2), quic_restored (back to QUIC)",
            self.transport_moves.clone(),
        );
        r.register(
            "peer_reconnects",
            "QUIC connections to peers re-established",
            self.peer_reconnects.clone(),
        );
        r.register(
            "authz_denials",
            "Opens an AuthorizationPolicy denied, by policy (namespace/name, or no_allow_match)",
            self.authz_denials.clone(),
        );
        r.register(
            "failovers",
            "Connections moved to the next site after a refusal, by reason",
            self.failovers.clone(),
        );
        r.register(
            "streams_cut",
            "Open TCP streams reset because a policy or export change no longer allows them, by reason",
            self.streams_cut.clone(),
        );
        r.register(
            "identity_reloads",
            "SVID and trust bundle reloads from disk, by result",
            self.identity_reloads.clone(),
        );
        r.register(
            "quic_retries",
            "QUIC Retry packets sent: address validation demanded while many handshakes were in flight",
            self.quic_retries.clone(),
        );
        r.register(
            "svid_renewals",
            "SVIDs renewed from the site signing authority (tls.renew), by result",
            self.svid_renewals.clone(),
        );
        r.register(
            "svid_refusals",
            "Rotated SVIDs refused (the working one is kept), by stable reason (expired, not_yet_valid, untrusted_chain, ...)",
            self.svid_refusals.clone(),
        );
        r.register(
            "udp_datagrams",
            "UDP datagrams carried as QUIC datagrams",
            self.udp_datagrams.clone(),
        );
        r.register(
            "udp_bytes",
            "UDP payload bytes carried",
            self.udp_bytes.clone(),
        );
        r.register(
            "udp_drops",
            "UDP datagrams dropped, by stable reason (oversize, queue_full, tunnel_full, ...)",
            self.udp_drops.clone(),
        );
        r.register("udp_flows", "UDP flows opened", self.udp_flows.clone());
        r.register(
            "udp_active_flows",
            "UDP flows open now",
            self.udp_active_flows.clone(),
        );
        let q = &self.quic;
        let qr = r.sub_registry_with_prefix("quic");
        qr.register(
            "rtt_seconds",
            "Smoothed round-trip time to the peer gateway",
            q.rtt_seconds.clone(),
        );
        qr.register(
            "cwnd_bytes",
            "Congestion window toward the peer gateway",
            q.cwnd_bytes.clone(),
        );
        qr.register(
            "mtu_bytes",
            "UDP payload size in use on the path (after PLPMTUD)",
            q.mtu_bytes.clone(),
        );
        qr.register(
            "sent_packets",
            "QUIC packets sent to the peer gateway",
            q.sent_packets.clone(),
        );
        qr.register(
            "lost_packets",
            "QUIC packets declared lost toward the peer gateway",
            q.lost_packets.clone(),
        );
        qr.register(
            "lost_bytes",
            "Bytes in QUIC packets declared lost toward the peer gateway",
            q.lost_bytes.clone(),
        );
        qr.register(
            "congestion_events",
            "Congestion events (window reductions) toward the peer gateway",
            q.congestion_events.clone(),
        );
        qr.register(
            "black_holes",
            "MTU black holes detected on the path",
            q.black_holes.clone(),
        );
        r.register(
            "svid_not_after_seconds",
            "Expiry of the SVID in use (Unix time)",
            self.svid_not_after.clone(),
        );
    }

    /// Records the transport the link to `site` at `addr` uses (`None`: down).
    pub fn set_link_transport(
        &self,
        site: &str,
        addr: std::net::SocketAddr,
        now: Option<crate::peers::Transport>,
    ) {
        for t in [crate::peers::Transport::Quic, crate::peers::Transport::H2] {
            let labels = LinkLabels {
                site: site.to_owned(),
                address: addr.to_string(),
                transport: t.as_str(),
            };
            if now == Some(t) {
                self.link_transport.get_or_create(&labels).set(1);
            } else {
                self.link_transport.remove(&labels);
            }
        }
    }

    pub fn transport_moved(&self, site: &str, reason: &'static str) {
        self.transport_moves
            .get_or_create(&SiteReasonLabels {
                site: site.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn http_request(&self, direction: &'static str, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                direction,
                class: status_class(status),
            })
            .inc();
    }

    pub fn http_mirror(&self, result: &'static str) {
        self.http_mirrors
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn http_ejection(&self) {
        self.http_ejections.inc();
    }

    pub fn http_rate_limited(&self, import: &str, route: &str) {
        self.http_rate_limited
            .get_or_create(&ImportRouteLabels {
                import: import.to_owned(),
                route: route.to_owned(),
            })
            .inc();
    }

    pub fn http_overflow(&self, direction: &'static str) {
        self.http_overflows
            .get_or_create(&DirLabels { direction })
            .inc();
    }

    pub fn http_route_request(&self, import: &str, route: &str, site: &str, status: u16) {
        self.http_route_requests
            .get_or_create(&RouteLabels {
                import: import.to_owned(),
                route: route.to_owned(),
                site: site.to_owned(),
                class: status_class(status),
            })
            .inc();
    }

    pub fn tcp_route_connection(&self, import: &str, route: &str, site: &str) {
        self.tcp_route_connections
            .get_or_create(&TcpRouteLabels {
                import: import.to_owned(),
                route: route.to_owned(),
                site: site.to_owned(),
            })
            .inc();
    }

    pub fn http_retry(&self, reason: &'static str) {
        self.http_retries
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        self.refusals
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }

    /// Counts a tunnelled connection and holds it in `active_streams` until dropped,
    /// whether the splice finishes or its task is cancelled.
    pub fn stream_started(&self, direction: &'static str) -> ActiveStream {
        let labels = DirLabels { direction };
        self.connections.get_or_create(&labels).inc();
        let gauge = self.active_streams.get_or_create(&labels).clone();
        gauge.inc();
        ActiveStream(gauge)
    }

    /// Byte counters for one splice on `direction`'s side.
    pub fn counters(&self, direction: &'static str) -> crate::splice::Counters {
        let get = |flow| {
            self.bytes
                .get_or_create(&BytesLabels { direction, flow })
                .clone()
        };
        crate::splice::Counters {
            tx: get("to_tunnel"),
            rx: get("from_tunnel"),
            service: None,
        }
    }

    /// The per-service labels of an egress stream of `service:port` to `to`.
    pub fn egress_labels(
        &self,
        service: &meshfed_catalog::ServiceName,
        port: u16,
        to: &str,
    ) -> ServiceLabels {
        ServiceLabels {
            direction: "egress",
            service: service.to_string(),
            port,
            source_site: self.site.to_string(),
            destination_site: to.to_owned(),
        }
    }

    /// The per-service labels of an ingress stream from `peer` (its verified gateway ID)
    /// for `service` (`None`: not one this gateway exports).
    pub fn ingress_labels(
        &self,
        service: Option<&meshfed_catalog::ServiceName>,
        port: u16,
        peer: &meshfed_identity::SpiffeId,
    ) -> ServiceLabels {
        ServiceLabels {
            direction: "ingress",
            service: service.map_or_else(|| UNKNOWN.to_owned(), ToString::to_string),
            port: if service.is_some() { port } else { 0 },
            source_site: peer.gateway_site().unwrap_or(UNKNOWN).to_owned(),
            destination_site: self.site.to_string(),
        }
    }

    /// A TCP stream of a known service: counted by direction and by service, held in
    /// both `active_streams` gauges until the guard drops; its byte counters count both.
    pub fn tcp_stream(
        &self,
        direction: &'static str,
        service: &ServiceHandles,
    ) -> (TcpStreamGuard, crate::splice::Counters) {
        let dir = self.stream_started(direction);
        let mut counters = self.counters(direction);
        let (svc, bytes) = service.stream();
        counters.service = Some(bytes);
        (
            TcpStreamGuard {
                _direction: dir,
                _service: svc,
            },
            counters,
        )
    }

    /// Per-datagram counters for `direction`, fetched once so the data path does not hash
    /// labels per packet.
    pub fn udp(&self, direction: &'static str) -> UdpCounters {
        let get = |fam: &Family<BytesLabels, Counter>, flow| {
            fam.get_or_create(&BytesLabels { direction, flow }).clone()
        };
        UdpCounters {
            direction,
            to_tunnel: (
                get(&self.udp_datagrams, "to_tunnel"),
                get(&self.udp_bytes, "to_tunnel"),
            ),
            from_tunnel: (
                get(&self.udp_datagrams, "from_tunnel"),
                get(&self.udp_bytes, "from_tunnel"),
            ),
            drops: self.udp_drops.clone(),
        }
    }

    /// Counts a UDP flow and holds it in `udp_active_flows` until dropped.
    pub fn udp_flow_started(&self, direction: &'static str) -> ActiveStream {
        let labels = DirLabels { direction };
        self.udp_flows.get_or_create(&labels).inc();
        let gauge = self.udp_active_flows.get_or_create(&labels).clone();
        gauge.inc();
        ActiveStream(gauge)
    }

    pub fn svid_renewed(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.svid_renewals
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn denied(&self, policy: &str) {
        self.authz_denials
            .get_or_create(&PolicyLabels {
                policy: policy.to_owned(),
            })
            .inc();
    }

    pub fn stream_cut(&self, reason: &'static str) {
        self.streams_cut
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn failover(&self, reason: &'static str) {
        self.failovers.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn reloaded(&self, what: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.identity_reloads
            .get_or_create(&ReloadLabels { what, result })
            .inc();
    }

    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// A direction's UDP counters: `(datagrams, bytes)` each way, and drops.
#[derive(Clone)]
pub struct UdpCounters {
    direction: &'static str,
    pub to_tunnel: (Counter, Counter),
    pub from_tunnel: (Counter, Counter),
    drops: Family<RefusalLabels, Counter>,
}

impl UdpCounters {
    pub fn sent(&self, len: usize) {
        self.to_tunnel.0.inc();
        self.to_tunnel.1.inc_by(len as u64);
    }

    pub fn received(&self, len: usize) {
        self.from_tunnel.0.inc();
        self.from_tunnel.1.inc_by(len as u64);
    }

    pub fn dropped(&self, reason: &'static str, n: u64) {
        self.drops
            .get_or_create(&RefusalLabels {
                direction: self.direction,
                reason,
            })
            .inc_by(n);
    }
}

/// See [`Metrics::tcp_stream`].
pub struct TcpStreamGuard {
    _direction: ActiveStream,
    _service: ActiveStream,
}

/// See [`Metrics::stream_started`].
pub struct ActiveStream(Gauge);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_in_their_class() {
        for (status, class) in [
            (101, "1xx"),
            (200, "2xx"),
            (304, "3xx"),
            (429, "4xx"),
            (503, "5xx"),
            (99, "other"),
            (600, "other"),
        ] {
            assert_eq!(status_class(status), class, "{status}");
        }
    }

    fn labels(i: usize) -> ServiceLabels {
        ServiceLabels {
            direction: "ingress",
            service: format!("s{i}.demo"),
            port: 80,
            source_site: "east".into(),
            destination_site: "west".into(),
        }
    }

    #[test]
    fn per_service_label_sets_are_bounded() {
        let m = ServiceMetrics::default();
        for i in 0..MAX_SERVICE_SERIES + 100 {
            let (_g, (tx, _)) = m.handles(labels(i)).stream();
            tx.inc_by(1);
            m.refused(labels(i), "unknown_service");
        }
        // Known sets keep counting under their own labels.
        m.handles(labels(0)).stream().1.0.inc_by(1);
        let overflow = ServiceLabels {
            direction: "ingress",
            service: OVERFLOW.into(),
            port: 0,
            source_site: OVERFLOW.into(),
            destination_site: OVERFLOW.into(),
        };
        assert_eq!(m.connections.get_or_create(&labels(0)).get(), 2);
        assert_eq!(m.connections.get_or_create(&overflow).get(), 100);
        // Every set past the bound went to the one overflow set.
        let mut text = String::new();
        let mut r = Registry::default();
        r.register("c", "c", m.connections.clone());
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert_eq!(
            text.lines().filter(|l| l.starts_with("c_total")).count(),
            MAX_SERVICE_SERIES + 1
        );
    }
}
