//! What a site's gateway should do, derived from the catalog: which peers to keep a
//! connection to, which services to import, and for each imported port the sites to try
//! in order. Pure: the gateway feeds it the catalog it watches.

use std::collections::BTreeMap;
use std::sync::Arc;

use meshfed_identity::SpiffeId;

use crate::catalog::{AppProtocol, Catalog, Protocol};
use crate::names::{ServiceName, SiteName};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPlan {
    pub site: SiteName,
    /// The only identity the peer's gateway may present.
    pub spiffe_id: SpiffeId,
    pub addresses: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportPlan {
    pub service: ServiceName,
    pub port: u16,
    pub protocol: Protocol,
    /// The port's name, from the first exporting site that names it (DNS SRV records).
    pub name: Option<String>,
    /// What it speaks: the exporting sites' word when they all agree, else `tcp` (bytes
    /// are carried; an HTTP port's ingress still terminates HTTP itself).
    pub app_protocol: AppProtocol,
    /// DNS names of the service (hosts of registered legacy services), from every
    /// exporting site.
    pub hosts: Vec<String>,
    /// Sites to try, best first. Empty: known, but nowhere serving right now.
    pub backends: Vec<SiteName>,
    /// The HTTP routes for the service (HTTP-family ports only): the exporting sites'
    /// word when they agree; when they do not, the routes of the first site by name,
    /// with the disagreement in `policy_conflict`.
    pub http_policy: Option<crate::http_route::HttpPolicy>,
    pub policy_conflict: Option<String>,
    /// Each backend's export labels and endpoint label sets, for the subsets of its
    /// HTTP routes (empty without routes).
    pub site_labels: BTreeMap<SiteName, crate::http_route::SiteLabels>,
    /// Each backend's share of first attempts, when a `localityLbSetting.distribute`
    /// rule applies to this gateway (sites it gives no share are not backends); empty:
    /// the first backend takes them (or the policy's balancer spreads them).
    pub site_weights: BTreeMap<SiteName, u32>,
    /// By subset name: the serving sites in the order of the subset's own
    /// `localityLbSetting` (its `trafficPolicy.loadBalancer` at this port), for each
    /// subset whose setting is not the destination's; the egress picks the subset's
    /// sites from this order instead of `backends`. `site_labels` covers their sites.
    pub subset_orders: BTreeMap<String, SiteOrder>,
    /// Where this site's gateway listens for it (and DNS answers): the service's VIP, or
    /// the shared import address; set by a [`crate::planner::Planner`] (`None` from
    /// [`plan_with`], or while the VIP range is full).
    pub address: Option<std::net::IpAddr>,
}

/// Sites in the order a `localityLbSetting` gives them, with their shares of first
/// attempts under its `distribute` rule (empty without one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteOrder {
    pub sites: Vec<SiteName>,
    pub weights: BTreeMap<SiteName, u32>,
}

/// The serving sites of an import, best first, and their shares under a `distribute`
/// rule (empty without one): nearest first by Istio's locality priorities (with the
/// setting's `failover`; none when it is disabled), then the most ready endpoints, then
/// by name. Pure.
fn order_sites(
    me: Option<&str>,
    me_labels: &BTreeMap<String, String>,
    setting: Option<&crate::locality::LocalityLb>,
    cands: Vec<Candidate<'_>>,
) -> (Vec<SiteName>, BTreeMap<SiteName, u32>) {
    use crate::locality;
    let disabled = setting.is_some_and(|l| l.disabled);
    let failover = setting.map_or(&[][..], |l| &l.failover[..]);
    // `failoverPriority`, when set, orders by labels instead of by locality.
    let by_labels = setting
        .filter(|l| !disabled && !l.failover_priority.is_empty())
        .map(|l| &l.failover_priority[..]);
    let near = |c: &Candidate<'_>| match by_labels {
        _ if disabled => 0,
        Some(labels) => {
            let them = locality::topology_labels(c.2.as_str(), c.0, c.3);
            locality::label_priority(me_labels, &them, labels)
        }
        None => usize::from(locality::priority(me, c.0, failover)),
    };
    let mut cands: Vec<(usize, Candidate<'_>)> = cands.into_iter().map(|c| (near(&c), c)).collect();
    cands.sort_by(|(na, a), (nb, b)| na.cmp(nb).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    let cands: Vec<Candidate<'_>> = cands.into_iter().map(|(_, c)| c).collect();
    let shares = setting.filter(|l| !l.disabled).and_then(|l| {
        let sites: Vec<(Option<&str>, u32)> = cands.iter().map(|c| (c.0, c.1)).collect();
        locality::distribute(me, &l.distribute, &sites)
    });
    match shares {
        None => (
            cands.into_iter().map(|(_, _, s, _)| s.clone()).collect(),
            BTreeMap::new(),
        ),
        Some(w) => {
            let kept: Vec<(&SiteName, u32)> = cands
                .iter()
                .zip(w)
                .filter(|(_, w)| *w > 0)
                .map(|(c, w)| (c.2, w))
                .collect();
            (
                kept.iter().map(|(s, _)| (*s).clone()).collect(),
                kept.into_iter().map(|(s, w)| (s.clone(), w)).collect(),
            )
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SitePlan {
    pub peers: Vec<PeerPlan>,
    /// In (service, port, protocol) order, each once: the gateway walks them beside
    /// [`import_addresses`]' map. Shared: a [`crate::planner::Planner`] re-plans only
    /// the services a change touched, and the next plan shares the others' with this one.
    pub imports: Vec<Arc<ImportPlan>>,
}

/// The plan for site `me` at locality `locality`.
///
/// Peers: every other site that is up; one without a gateway address (outbound-only)
/// is reached over the connections it dials. Imports: every
/// (service, port) exported by another site, namespace sameness merging sites. Backends
/// of an import: sites that are up and have ready endpoints for it, nearest to `me`
/// first (the same subzone, zone, region; a policy's `localityLbSetting` may name the
/// failover region, give shares, or turn this off), then the most ready endpoints, then
/// by name (stable).
/// A site that serves an import: its locality, ready endpoints, name and export labels.
type Candidate<'a> = (
    Option<&'a str>,
    u32,
    &'a SiteName,
    &'a BTreeMap<String, String>,
);

pub fn plan(catalog: &Catalog, me: &SiteName, locality: Option<&str>) -> SitePlan {
    plan_with(catalog, me, locality, &BTreeMap::new())
}

/// [`plan`] for a gateway with `labels` of its own (`federation.labels`): under a
/// `failoverPriority`, sites are matched against them as well as against the gateway's
/// site name and locality (Istio matches endpoints against the client proxy's labels).
pub fn plan_with(
    catalog: &Catalog,
    me: &SiteName,
    locality: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> SitePlan {
    let peers = plan_peers(catalog, me);
    // Exports by service, each service's sites in name order (a stable sort of the
    // catalog's (site, service) order): one sort, then each service on its own, with no
    // lookup in a map as large as the catalog.
    let mut exports: Vec<(&SiteName, &ServiceName, &crate::catalog::Export)> = catalog
        .exports
        .iter()
        .filter(|((site, _), _)| site != me)
        .map(|((site, service), e)| (site, service, e))
        .collect();
    exports.sort_by(|a, b| a.1.cmp(b.1));
    let mut imports = Vec::with_capacity(exports.len());
    // This gateway's labels, for `failoverPriority`.
    let me_labels = crate::locality::topology_labels(me.as_str(), locality, labels);
    for by_site in exports.chunk_by(|a, b| a.1 == b.1) {
        plan_service(catalog, (locality, &me_labels), by_site, &mut imports);
    }
    SitePlan { peers, imports }
}

/// The peers of site `me`: every other site that is up. Pure.
pub(crate) fn plan_peers(catalog: &Catalog, me: &SiteName) -> Vec<PeerPlan> {
    catalog
        .sites
        .values()
        .filter(|r| &r.site != me && r.up)
        .filter_map(|r| {
            Some(PeerPlan {
                site: r.site.clone(),
                spiffe_id: SpiffeId::gateway(&r.trust_domain, r.site.as_str()).ok()?,
                addresses: r.gateway_addresses.clone(),
            })
        })
        .collect()
}

/// The imports of one service (one per port and protocol, in that order) from the sites
/// that export it, in name order. Pure.
pub(crate) fn plan_service(
    catalog: &Catalog,
    (locality, me_labels): (Option<&str>, &BTreeMap<String, String>),
    by_site: &[(&SiteName, &ServiceName, &crate::catalog::Export)],
    out: &mut Vec<Arc<ImportPlan>>,
) {
    let Some((_, service, _)) = by_site.first() else {
        return;
    };
    // (port, protocol) -> (port name, candidates, hosts, what it speaks): TCP and UDP on
    // one port number (DNS on 53) are two imports.
    type Entry<'a> = (
        Option<&'a String>,
        Vec<Candidate<'a>>,
        std::collections::BTreeSet<&'a String>,
        std::collections::BTreeSet<AppProtocol>,
    );
    let mut ports: BTreeMap<(u16, Protocol), Entry<'_>> = BTreeMap::new();
    for (site, _, export) in by_site {
        let usable = catalog.sites.get(*site).is_some_and(|r| r.up) && export.ready_endpoints > 0;
        for p in &export.ports {
            let entry = ports.entry((p.port, p.protocol)).or_default();
            entry.2.extend(export.hosts.iter());
            if entry.0.is_none() {
                entry.0 = p.name.as_ref();
            }
            entry.3.insert(p.app_protocol);
            if usable {
                entry.1.push((
                    export.locality.as_deref(),
                    export.ready_endpoints,
                    *site,
                    &export.labels,
                ));
            }
        }
    }
    // The routes, by site in name order: merged once, for the HTTP-family ports.
    let mut merged = None;
    let mut policy = || {
        merged
            .get_or_insert_with(|| {
                let policies: Vec<(&SiteName, &crate::http_route::HttpPolicy)> = by_site
                    .iter()
                    .filter_map(|(site, _, e)| e.http_policy.as_deref().map(|p| (*site, p)))
                    .collect();
                merge_policies(&policies)
            })
            .clone()
    };
    for ((port, protocol), (name, cands, hosts, apps)) in ports {
        let app_protocol = match (apps.len(), apps.first()) {
            (1, Some(a)) => *a,
            _ => AppProtocol::Tcp,
        };
        let (http_policy, policy_conflict) = if app_protocol.is_http() {
            // The port's own settings (a DestinationRule's portLevelSettings) applied.
            let (p, conflict) = policy();
            (p.map(|p| p.for_port(port)), conflict)
        } else if protocol == crate::catalog::Protocol::Tcp {
            // A TCP port takes the policy for its TCP routes (a VirtualService's `tcp`),
            // a TLS port for its TLS routes (`tls`), as Istio applies each to its own.
            let tls = app_protocol == AppProtocol::Tls;
            match policy() {
                (Some(p), conflict)
                    if !tls && !p.tcp_routes.is_empty() || tls && !p.tls_routes.is_empty() =>
                {
                    (Some(p.for_port(port)), conflict)
                }
                _ => (None, None),
            }
        } else {
            (None, None)
        };
        let subset_orders = http_policy
            .as_ref()
            .map(|p| subset_orders(p, port, (locality, me_labels), &cands))
            .unwrap_or_default();
        let (backends, site_weights) = order_sites(
            locality,
            me_labels,
            http_policy.as_ref().and_then(|p| p.locality_lb.as_ref()),
            cands,
        );
        let with_routes = if http_policy.is_some() { by_site } else { &[] };
        let site_labels = with_routes
            .iter()
            .filter(|(s, _, _)| {
                backends.contains(s) || subset_orders.values().any(|o| o.sites.contains(s))
            })
            .map(|(s, _, export)| {
                (
                    (*s).clone(),
                    crate::http_route::SiteLabels {
                        export: export.labels.clone(),
                        endpoints: export
                            .endpoint_labels
                            .iter()
                            .filter(|e| e.endpoints > 0)
                            .map(|e| e.labels.clone())
                            .collect(),
                    },
                )
            })
            .collect();
        out.push(Arc::new(ImportPlan {
            service: (*service).clone(),
            port,
            protocol,
            name: name.cloned(),
            app_protocol,
            hosts: hosts.into_iter().cloned().collect(),
            backends,
            http_policy,
            policy_conflict,
            site_labels,
            site_weights,
            subset_orders,
            address: None,
        }));
    }
}

/// The site orders of `policy`'s subsets (at `port`, the policy already at that port)
/// whose own `loadBalancer` gives a `localityLbSetting` other than the destination's
/// (pilot's `MergeSubsetTrafficPolicy`: a subset's `loadBalancer` replaces the
/// destination's, its absent `localityLbSetting` meaning the default, nearest first).
/// Pure.
fn subset_orders(
    policy: &crate::http_route::HttpPolicy,
    port: u16,
    (locality, me_labels): (Option<&str>, &BTreeMap<String, String>),
    cands: &[Candidate<'_>],
) -> BTreeMap<String, SiteOrder> {
    policy
        .subsets
        .iter()
        .filter(|s| s.policy.is_some())
        .filter_map(|s| {
            let own = policy.traffic(port, Some(s)).balancer.locality_lb;
            if own == policy.locality_lb {
                return None;
            }
            let (sites, weights) = order_sites(locality, me_labels, own.as_ref(), cands.to_vec());
            Some((s.name.clone(), SiteOrder { sites, weights }))
        })
        .collect()
}

/// The routes of a service from the sites that publish them (in site name order): the
/// same everywhere, or the first site's, with a conflict that names the sites. Pure.
pub fn merge_policies(
    by_site: &[(&SiteName, &crate::http_route::HttpPolicy)],
) -> (Option<crate::http_route::HttpPolicy>, Option<String>) {
    let Some((first_site, first)) = by_site.first() else {
        return (None, None);
    };
    // The same routes registered from different files agree.
    let differ: Vec<&str> = by_site
        .iter()
        .filter(|(_, p)| p.routes != first.routes || p.subsets != first.subsets)
        .map(|(s, _)| s.as_str())
        .collect();
    let conflict = (!differ.is_empty()).then(|| {
        format!(
            "sites publish different routes for {}: {first_site} ({}) and {}; {first_site}'s apply (the first site by name)",
            first.service,
            first.source,
            differ.join(", ")
        )
    });
    (Some((*first).clone()), conflict)
}

/// Why a `vip_range` or `import_ports` value is not a range. Pure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("{0:?} is not a CIDR (a.b.c.d/nn)")]
    NotCidr(String),
    #[error("{0:?} is not an IPv4 address")]
    NotIpv4(String),
    #[error("prefix /{0} is not /8 to /30")]
    Prefix(String),
    #[error("{0:?} is not a port range (first-last)")]
    NotPortRange(String),
    #[error("{0:?} is not a port (1-65535)")]
    NotPort(String),
    #[error("{0:?}: the last port must be above the first")]
    Empty(String),
}

/// A range imports get one address each from (`federation.vip_range`), so that services
/// on the same port do not collide and DNS has one name per address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipRange {
    base: u32,
    size: u32,
}

/// As written: `127.100.0.0/16`.
impl std::fmt::Display for VipRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = 32 - self.size.trailing_zeros();
        write!(f, "{}/{len}", std::net::Ipv4Addr::from(self.base))
    }
}

impl serde::Serialize for VipRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl VipRange {
    /// An IPv4 CIDR with a prefix of /8 to /30, e.g. `127.100.0.0/16`.
    pub fn parse(s: &str) -> Result<Self, RangeError> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| RangeError::NotCidr(s.to_owned()))?;
        let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| RangeError::NotIpv4(ip.to_owned()))?;
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| (8..=30).contains(l))
            .ok_or_else(|| RangeError::Prefix(len.to_owned()))?;
        let size = 1u32 << (32 - len);
        let base = u32::from(ip) & !(size - 1);
        Ok(Self { base, size })
    }
}

/// The address each import listens on (and DNS answers with): one per service from
/// `vips`, else `shared` for all. A service's VIP comes from a hash of its name, so it
/// stays the same across restarts and catalog changes; a collision takes the next free
/// address, in name order. The addresses of a fresh [`Vips`] given the plan's services.
pub fn import_addresses(
    plan: &SitePlan,
    shared: std::net::IpAddr,
    vips: Option<VipRange>,
) -> BTreeMap<ServiceName, std::net::IpAddr> {
    // In name order, once each: `plan` lists imports by service already.
    let mut services: Vec<&ServiceName> = plan.imports.iter().map(|i| &i.service).collect();
    services.dedup();
    let mut v = Vips::new(shared, vips);
    v.set(&services);
    v.by_service
}

/// The address of each imported service ([`import_addresses`]), kept while the service
/// is imported: a service that comes or goes never moves another's, even when their
/// hashes collide (the newcomer takes the next free address). Before, the addresses
/// were assigned afresh in name order on every plan, so a new service whose hash
/// collided with an older one's, and whose name sorts first, took that address: DNS
/// then answered with it while the older service's listener stayed where it was. A
/// service that found the range full gets an address when one is freed (name order).
/// Pure.
#[derive(Clone, Debug)]
pub struct Vips {
    shared: std::net::IpAddr,
    range: Option<VipRange>,
    by_service: BTreeMap<ServiceName, std::net::IpAddr>,
    /// Offsets into the range in use.
    taken: std::collections::HashSet<u32>,
    /// Imported services without an address: the range was full when they came.
    waiting: std::collections::BTreeSet<ServiceName>,
}

impl Vips {
    pub fn new(shared: std::net::IpAddr, range: Option<VipRange>) -> Self {
        Self {
            shared,
            range,
            by_service: BTreeMap::new(),
            taken: Default::default(),
            waiting: Default::default(),
        }
    }

    /// Each imported service's address.
    pub fn addresses(&self) -> &BTreeMap<ServiceName, std::net::IpAddr> {
        &self.by_service
    }

    /// The address of `service`, if it has one.
    pub fn get(&self, service: &ServiceName) -> Option<std::net::IpAddr> {
        self.by_service.get(service).copied()
    }

    /// The imported services are now `services` (in name order, once each): the others
    /// lose their address, and new ones get one, in name order.
    pub fn set(&mut self, services: &[&ServiceName]) {
        let gone: Vec<ServiceName> = self
            .by_service
            .keys()
            .chain(self.waiting.iter())
            .filter(|s| services.binary_search(s).is_err())
            .cloned()
            .collect();
        for s in &gone {
            let _ = self.remove(s);
        }
        for s in services {
            self.add(s);
        }
    }

    /// Takes the addresses a previous run gave (its `imports.json`) before the first
    /// [`Vips::set`], which keeps those of the services still imported: a VIP then
    /// survives a restart even where hashes collided and services came out of name
    /// order. One outside the range, or already given, is skipped.
    pub fn seed(&mut self, prior: impl IntoIterator<Item = (ServiceName, std::net::IpAddr)>) {
        let Some(r) = self.range else {
            return;
        };
        for (service, ip) in prior {
            let std::net::IpAddr::V4(v4) = ip else {
                continue;
            };
            let Some(off) = u32::from(v4).checked_sub(r.base + 1) else {
                continue;
            };
            if off >= r.size - 2
                || self.by_service.contains_key(&service)
                || !self.taken.insert(off)
            {
                continue;
            }
            self.by_service.insert(service, ip);
        }
    }

    /// Gives `service` an address unless it has one (or waits for one).
    pub fn add(&mut self, service: &ServiceName) {
        if self.by_service.contains_key(service) || self.waiting.contains(service) {
            return;
        }
        let Some(r) = self.range else {
            self.by_service.insert(service.clone(), self.shared);
            return;
        };
        // Usable offsets: not the network or broadcast address.
        let usable = r.size - 2;
        if self.taken.len() as u32 >= usable {
            self.waiting.insert(service.clone());
            return;
        }
        let h = fnv_bytes(
            service
                .name()
                .bytes()
                .chain(std::iter::once(b'.'))
                .chain(service.namespace().bytes()),
        );
        let mut off = (h % u64::from(usable)) as u32;
        while !self.taken.insert(off) {
            off = (off + 1) % usable;
        }
        let ip = std::net::Ipv4Addr::from(r.base + 1 + off);
        self.by_service
            .insert(service.clone(), std::net::IpAddr::V4(ip));
    }

    /// `service` is no longer imported: its address is free, for the first waiting
    /// service if any, which is returned.
    pub fn remove(&mut self, service: &ServiceName) -> Option<ServiceName> {
        if self.waiting.remove(service) {
            return None;
        }
        let ip = self.by_service.remove(service)?;
        if let (Some(r), std::net::IpAddr::V4(v4)) = (self.range, ip) {
            self.taken.remove(&(u32::from(v4) - r.base - 1));
            if let Some(next) = self.waiting.pop_first() {
                self.add(&next);
                return Some(next);
            }
        }
        None
    }
}

/// The file a federated gateway writes into its site directory with what it listens on
/// for each import (read by the Kubernetes import controller, and by operators).
pub const IMPORTS_FILE: &str = "imports.json";

/// What `imports.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportListeners {
    pub imports: Vec<ImportListener>,
}

/// One bound import listener.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportListener {
    pub service: ServiceName,
    /// The service's port (what clients of the service dial).
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the gateway listens for it.
    pub listen: std::net::SocketAddr,
    /// Sites serving it, best first.
    pub backends: Vec<SiteName>,
}

/// FNV-1a of a name: stable across builds and platforms (VIPs and import ports).
pub fn fnv(s: &str) -> u64 {
    fnv_bytes(s.bytes())
}

fn fnv_bytes(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A range of ports imports listen on (`federation.import_ports`), one per imported
/// (service, port), all on `import_address`: for a gateway that cannot hold an address
/// per service, such as a Kubernetes pod, whose derived Services map each service port
/// to its listener port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// As written: `20000-29999`.
impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl serde::Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl PortRange {
    /// `first-last`, e.g. `20000-29999`, with at least 2 ports and no port 0.
    pub fn parse(s: &str) -> Result<Self, RangeError> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| RangeError::NotPortRange(s.to_owned()))?;
        let port = |x: &str| {
            x.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| RangeError::NotPort(x.to_owned()))
        };
        let (first, last) = (port(a)?, port(b)?);
        if last <= first {
            return Err(RangeError::Empty(s.to_owned()));
        }
        Ok(Self { first, last })
    }

    fn len(self) -> u32 {
        u32::from(self.last - self.first) + 1
    }
}

/// The listener port of every imported (service, port) in `range`; TCP and UDP on one
/// service port share it. Like VIPs, a port comes from a hash of `service:port`, so it
/// stays the same across restarts, catalog changes and gateway replicas; a collision
/// takes the next free port, in name order. A full range leaves the rest out.
pub fn import_ports(plan: &SitePlan, range: PortRange) -> BTreeMap<(ServiceName, u16), u16> {
    let keys: std::collections::BTreeSet<(&ServiceName, u16)> =
        plan.imports.iter().map(|i| (&i.service, i.port)).collect();
    let size = range.len();
    let mut taken = std::collections::BTreeSet::new();
    let mut out = BTreeMap::new();
    for (s, port) in keys {
        if taken.len() as u32 >= size {
            break;
        }
        let mut off = (fnv(&format!("{s}:{port}")) % u64::from(size)) as u32;
        while !taken.insert(off) {
            off = (off + 1) % size;
        }
        let p = u16::try_from(u32::from(range.first) + off).unwrap_or(range.last);
        out.insert((s.clone(), port), p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Change, Delta, Export, ExportedPort, Revision, SiteRecord};
    use meshfed_identity::TrustDomain;

    /// An import of `service` on `port` with nothing else planned.
    fn bare_import(service: &str, port: u16, protocol: Protocol) -> ImportPlan {
        ImportPlan {
            site_weights: Default::default(),
            subset_orders: Default::default(),
            site_labels: Default::default(),
            policy_conflict: None,
            http_policy: None,
            app_protocol: Default::default(),
            service: ServiceName::parse(service).unwrap(),
            port,
            protocol,
            name: None,
            hosts: vec![],
            backends: vec![],
            address: None,
        }
    }

    #[test]
    fn ranges_print_as_written() {
        for (cidr, shown) in [
            ("127.100.0.0/16", "127.100.0.0/16"),
            ("10.1.2.3/30", "10.1.2.0/30"),
            ("10.0.0.0/8", "10.0.0.0/8"),
        ] {
            let r = VipRange::parse(cidr).unwrap();
            assert_eq!(r.to_string(), shown);
            assert_eq!(VipRange::parse(&r.to_string()).unwrap(), r);
        }
        let p = PortRange::parse("20000-29999").unwrap();
        assert_eq!(p.to_string(), "20000-29999");
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"20000-29999\"");
    }

    #[test]
    fn vips_are_stable_distinct_and_inside_the_range() {
        let r = VipRange::parse("127.100.7.9/24").unwrap();
        let shared: std::net::IpAddr = [127, 0, 0, 2].into();
        let plan = |names: &[&str]| SitePlan {
            peers: vec![],
            imports: names
                .iter()
                .map(|n| Arc::new(bare_import(n, 80, Protocol::Tcp)))
                .collect(),
        };
        let a = import_addresses(&plan(&["a.x", "b.x", "c.x"]), shared, Some(r));
        let ips: std::collections::BTreeSet<_> = a.values().collect();
        assert_eq!(ips.len(), 3, "distinct: {a:?}");
        for ip in a.values() {
            let o = match ip {
                std::net::IpAddr::V4(v) => v.octets(),
                _ => panic!(),
            };
            assert!(o[..3] == [127, 100, 7] && o[3] != 0 && o[3] != 255, "{ip}");
        }
        // The address is the hash of the name as written, as in every earlier version:
        // an upgrade moves no VIP.
        let c_x = 1 + (fnv("c.x") % 254) as u8;
        assert_eq!(
            a[&ServiceName::parse("c.x").unwrap()],
            std::net::IpAddr::from([127, 100, 7, c_x])
        );
        // Another service coming or going does not move the others (no collision here).
        let b = import_addresses(&plan(&["a.x", "c.x"]), shared, Some(r));
        assert_eq!(
            b[&ServiceName::parse("c.x").unwrap()],
            a[&ServiceName::parse("c.x").unwrap()]
        );
        // Without a range: all share the import address.
        let c = import_addresses(&plan(&["a.x", "b.x"]), shared, None);
        assert!(c.values().all(|ip| *ip == shared));
        // A full /30 (2 usable) leaves the third out rather than reuse an address.
        let tiny = VipRange::parse("10.0.0.0/30").unwrap();
        assert_eq!(
            import_addresses(&plan(&["a.x", "b.x", "c.x"]), shared, Some(tiny)).len(),
            2
        );
        for bad in ["10.0.0.0", "10.0.0.0/31", "10.0.0.0/4", "fd00::/64", "x/24"] {
            assert!(VipRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_vip_stays_while_its_service_is_imported_and_a_freed_one_goes_to_a_waiting_service() {
        let r = VipRange::parse("10.0.0.0/29").unwrap(); // 6 usable
        let shared: std::net::IpAddr = [127, 0, 0, 2].into();
        let name = |s: &str| ServiceName::parse(s).unwrap();
        let slot = |s: &str| fnv(s) % 6;
        // A service sorting before z.x whose hash takes z.x's address.
        let rival = (0..100)
            .map(|i| format!("a{i}.x"))
            .find(|n| slot(n) == slot("z.x"))
            .unwrap();
        let (z, rival) = (name("z.x"), name(&rival));
        let mut v = Vips::new(shared, Some(r));
        v.set(&[&z]);
        let z_ip = v.addresses()[&z];
        v.set(&[&rival, &z]);
        assert_eq!(v.addresses()[&z], z_ip, "z.x kept its address");
        assert_ne!(v.addresses()[&rival], z_ip);
        // Assigned afresh in name order, the newcomer would have taken it (as every plan
        // did before Vips kept them).
        let fresh = |names: &[&ServiceName]| {
            let mut f = Vips::new(shared, Some(r));
            f.set(names);
            f.addresses().clone()
        };
        assert_eq!(fresh(&[&rival, &z])[&rival], z_ip);
        // Full: the seventh waits, and takes the first address freed.
        let six: Vec<ServiceName> = (1..=6).map(|i| name(&format!("s{i}.x"))).collect();
        let mut all: Vec<&ServiceName> = six.iter().collect();
        let late = name("t.x");
        all.push(&late);
        v.set(&all);
        assert_eq!(v.addresses().len(), 6);
        assert!(!v.addresses().contains_key(&late));
        let freed = v.addresses()[&six[2]];
        assert_eq!(
            v.remove(&six[2]),
            Some(late.clone()),
            "the waiting one is told"
        );
        assert_eq!(v.addresses()[&late], freed);
        // A restart seeded with what the last run gave keeps z.x's address for it even
        // though the rival sorts first and hashes there; seeds outside the range, for an
        // address already given, or of a service no longer imported are dropped.
        let mut again = Vips::new(shared, Some(r));
        again.seed([
            (z.clone(), z_ip),
            (rival.clone(), z_ip),
            (name("out.x"), std::net::IpAddr::from([10, 0, 1, 1])),
            (name("gone.x"), std::net::IpAddr::from([10, 0, 0, 6])),
        ]);
        again.set(&[&rival, &z]);
        assert_eq!(again.addresses()[&z], z_ip);
        assert_ne!(again.addresses()[&rival], z_ip);
        assert_eq!(again.addresses().len(), 2);
        assert!(!again.taken.contains(&5), "gone.x's address is free again");
    }

    #[test]
    fn import_ports_are_stable_distinct_shared_by_tcp_and_udp_and_inside_the_range() {
        let r = PortRange::parse("20000-20009").unwrap();
        let im = bare_import;
        let plan = |v: Vec<ImportPlan>| SitePlan {
            peers: vec![],
            imports: v.into_iter().map(Arc::new).collect(),
        };
        let a = import_ports(
            &plan(vec![
                im("a.x", 80, Protocol::Tcp),
                im("b.x", 80, Protocol::Tcp),
                im("dns.x", 53, Protocol::Udp),
                im("dns.x", 53, Protocol::Tcp),
            ]),
            r,
        );
        assert_eq!(a.len(), 3, "TCP and UDP of dns.x:53 share one port: {a:?}");
        let ports: std::collections::BTreeSet<_> = a.values().collect();
        assert_eq!(ports.len(), 3, "distinct: {a:?}");
        assert!(a.values().all(|p| (20000..=20009).contains(p)));
        let b = import_ports(&plan(vec![im("dns.x", 53, Protocol::Udp)]), r);
        let key = (ServiceName::parse("dns.x").unwrap(), 53);
        assert_eq!(b[&key], a[&key], "does not move when others come and go");
        // Full: two ports for three imports.
        let tiny = PortRange::parse("30000-30001").unwrap();
        let c = import_ports(
            &plan(vec![
                im("a.x", 1, Protocol::Tcp),
                im("a.x", 2, Protocol::Tcp),
                im("a.x", 3, Protocol::Tcp),
            ]),
            tiny,
        );
        assert_eq!(c.len(), 2);
        for bad in ["20000", "0-10", "10-10", "20-10", "1-70000", "a-b"] {
            assert!(PortRange::parse(bad).is_err(), "{bad}");
        }
    }

    struct Builder(Catalog);

    impl Builder {
        fn new() -> Self {
            Self(Catalog::default())
        }
        fn apply(mut self, c: Change) -> Self {
            let d = Delta {
                revision: Revision(self.0.revision.0 + 1),
                change: c,
            };
            self.0.apply(&d).unwrap();
            self
        }
        fn site(self, name: &str, up: bool) -> Self {
            self.apply(Change::PutSite(SiteRecord {
                site: SiteName::new(name).unwrap(),
                trust_domain: TrustDomain::new(&format!("{name}.example.org")).unwrap(),
                gateway_addresses: vec![format!("{name}:15443")],
                up,
            }))
        }
        fn export(
            self,
            site: &str,
            svc: &str,
            port: u16,
            ready: u32,
            locality: Option<&str>,
        ) -> Self {
            self.apply(Change::PutExport {
                site: SiteName::new(site).unwrap(),
                export: Export {
                    endpoint_labels: Vec::new(),
                    http_policy: None,
                    service: ServiceName::parse(svc).unwrap(),
                    ports: vec![ExportedPort {
                        app_protocol: Default::default(),
                        port,
                        protocol: Protocol::Tcp,
                        name: None,
                    }],
                    ready_endpoints: ready,
                    identities: vec![],
                    locality: locality.map(Into::into),
                    labels: Default::default(),
                    hosts: vec![],
                },
            })
        }
    }

    fn names(v: &[SiteName]) -> Vec<&str> {
        v.iter().map(|s| s.as_str()).collect()
    }

    /// `svc` on port 80 as `app`, with routes sending everything to subset `to`.
    fn http_export(site: &str, svc: &str, app: AppProtocol, to: Option<&str>) -> Change {
        use crate::http_route::{Destination, HttpPolicy, HttpRoute, Subset};
        let service = ServiceName::parse(svc).unwrap();
        Change::PutExport {
            site: SiteName::new(site).unwrap(),
            export: Export {
                endpoint_labels: Vec::new(),
                http_policy: to.map(|to| {
                    Box::new(HttpPolicy {
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
                        service: service.clone(),
                        source: format!("VirtualService {site}/web"),
                        routes: vec![HttpRoute {
                            destinations: vec![Destination {
                                service: None,
                                port: None,
                                subset: Some(to.into()),
                                weight: 100,
                                headers: None,
                            }],
                            ..Default::default()
                        }],
                        subsets: ["a", "b"]
                            .iter()
                            .map(|n| Subset {
                                name: n.to_string(),
                                labels: Default::default(),
                                policy: None,
                            })
                            .collect(),
                    })
                }),
                service,
                ports: vec![ExportedPort {
                    app_protocol: app,
                    port: 80,
                    protocol: Protocol::Tcp,
                    name: None,
                }],
                ready_endpoints: 1,
                identities: vec![],
                locality: None,
                labels: [("version".to_string(), format!("{site}-v"))].into(),
                hosts: vec![],
            },
        }
    }

    #[test]
    fn routes_come_with_http_ports_and_a_disagreement_is_a_named_conflict() {
        use AppProtocol::{Http, Tcp};
        let me = SiteName::new("east").unwrap();
        let base = || {
            Builder::new()
                .site("east", true)
                .site("west", true)
                .site("north", true)
        };
        // (north's export, west's export) → (app protocol, routes to, conflict)
        type Export = (AppProtocol, Option<&'static str>);
        let rows: &[(Export, Export, AppProtocol, Option<&str>, bool)] = &[
            ((Http, Some("a")), (Http, Some("a")), Http, Some("a"), false),
            ((Http, None), (Http, Some("b")), Http, Some("b"), false),
            // Different routes: north's apply (first by name), and the conflict says so.
            ((Http, Some("a")), (Http, Some("b")), Http, Some("a"), true),
            // Sites disagree on the protocol: bytes, and no routes.
            ((Http, Some("a")), (Tcp, None), Tcp, None, false),
            ((Tcp, None), (Tcp, None), Tcp, None, false),
        ];
        for (i, (north, west, app, to, conflict)) in rows.iter().enumerate() {
            let c = base()
                .apply(http_export("north", "web.demo", north.0, north.1))
                .apply(http_export("west", "web.demo", west.0, west.1))
                .0;
            let p = plan(&c, &me, None);
            let im = &p.imports[0];
            assert_eq!(im.app_protocol, *app, "row {i}");
            let got = im
                .http_policy
                .as_ref()
                .and_then(|p| p.routes[0].destinations[0].subset.as_deref());
            assert_eq!(got, *to, "row {i}");
            assert_eq!(
                im.policy_conflict.is_some(),
                *conflict,
                "row {i}: {:?}",
                im.policy_conflict
            );
            if let Some(c) = &im.policy_conflict {
                assert!(c.contains("north") && c.contains("west"), "{c}");
            }
            // Labels come with routes (for their subsets), and only then.
            if got.is_some() {
                assert_eq!(im.site_labels.len(), 2, "row {i}");
                assert_eq!(
                    im.site_labels[&SiteName::new("west").unwrap()].export["version"],
                    "west-v"
                );
            } else {
                assert!(im.site_labels.is_empty(), "row {i}");
            }
        }
    }

    #[test]
    fn tcp_ports_get_the_policy_only_for_its_tcp_routes() {
        use crate::http_route::{Destination, TcpRoute};
        let me = SiteName::new("east").unwrap();
        let route = || {
            vec![TcpRoute {
                matches: vec![],
                destinations: vec![Destination::all()],
            }]
        };
        // (the port's app protocol, TCP routes, TLS routes): a `tcp` port takes the
        // policy for its TCP routes, a `tls` port for its TLS routes, as Istio applies
        // each to its own ports.
        for (app, tcp_routes, tls_routes, want) in [
            (AppProtocol::Tcp, false, false, false),
            (AppProtocol::Tcp, true, false, true),
            (AppProtocol::Tcp, false, true, false),
            (AppProtocol::Tls, false, false, false),
            (AppProtocol::Tls, true, false, false),
            (AppProtocol::Tls, false, true, true),
            (AppProtocol::Tls, true, true, true),
        ] {
            let mut change = http_export("west", "db.demo", app, Some("a"));
            let Change::PutExport { export, .. } = &mut change else {
                unreachable!()
            };
            export.ports.push(ExportedPort {
                app_protocol: AppProtocol::Tcp,
                port: 80,
                protocol: Protocol::Udp,
                name: None,
            });
            let policy = export.http_policy.as_mut().unwrap();
            if tcp_routes {
                policy.tcp_routes = route();
            }
            if tls_routes {
                policy.tls_routes = route();
            }
            let c = Builder::new()
                .site("east", true)
                .site("west", true)
                .apply(change)
                .0;
            let p = plan(&c, &me, None);
            for im in &p.imports {
                let want = want && im.protocol == Protocol::Tcp;
                assert_eq!(
                    im.http_policy.is_some(),
                    want,
                    "{app} {:?} {tcp_routes} {tls_routes}",
                    im.protocol
                );
                // Site labels come with it, for its subsets.
                assert_eq!(im.site_labels.is_empty(), !want);
            }
        }
    }

    #[test]
    fn each_http_port_gets_the_policy_with_its_own_port_settings() {
        use crate::http_route::{PortPool, PortSettings};
        let me = SiteName::new("east").unwrap();
        let mut change = http_export("west", "web.demo", AppProtocol::Http, Some("a"));
        let Change::PutExport { export, .. } = &mut change else {
            unreachable!()
        };
        export.ports.push(ExportedPort {
            app_protocol: AppProtocol::Http,
            port: 8080,
            protocol: Protocol::Tcp,
            name: None,
        });
        let policy = export.http_policy.as_mut().unwrap();
        policy.max_requests = Some(100);
        policy.port_settings = vec![PortSettings {
            port: 8080,
            pool: Some(PortPool {
                max_requests: Some(7),
                ..Default::default()
            }),
            ..Default::default()
        }];
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .apply(change)
            .0;
        let p = plan(&c, &me, None);
        let by_port: Vec<(u16, Option<u32>, usize)> = p
            .imports
            .iter()
            .map(|im| {
                let h = im.http_policy.as_ref().unwrap();
                (im.port, h.max_requests, h.port_settings.len())
            })
            .collect();
        // Resolved for the port: the settings themselves do not travel further.
        assert_eq!(by_port, [(80, Some(100), 0), (8080, Some(7), 0)]);
    }

    #[test]
    fn peers_are_the_other_live_sites_with_their_gateway_ids() {
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .site("north", false)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        assert_eq!(p.peers.len(), 1);
        assert_eq!(
            p.peers[0].spiffe_id.as_str(),
            "spiffe://west.example.org/meshfed/site/west/gateway"
        );
    }

    #[test]
    fn one_service_exported_by_two_sites_is_one_import_with_two_backends() {
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .site("north", true)
            .export("west", "orders.shop", 8080, 2, None)
            .export("north", "orders.shop", 8080, 5, None)
            .export("east", "orders.shop", 8080, 9, None)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        assert_eq!(p.imports.len(), 1);
        // Own export is not imported; more ready endpoints first.
        assert_eq!(names(&p.imports[0].backends), vec!["north", "west"]);
    }

    #[test]
    fn imports_come_in_service_order_once_each_with_an_address() {
        // Sites list their services in their own order; imports come sorted by name,
        // then namespace ("a.y" before "b.x").
        let c = Builder::new()
            .site("east", true)
            .site("north", true)
            .site("west", true)
            .export("west", "b.x", 80, 1, None)
            .export("west", "a.y", 80, 1, None)
            .export("west", "a.y", 81, 1, None)
            .export("north", "c.x", 80, 1, None)
            .export("north", "a.y", 80, 2, None)
            .export("north", "a.x", 90, 1, None)
            .export("east", "a.a", 80, 1, None)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        let got: Vec<(String, u16, Vec<&str>)> = p
            .imports
            .iter()
            .map(|i| (i.service.to_string(), i.port, names(&i.backends)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a.x".into(), 90, vec!["north"]),
                // West's second export of a.y replaced its first (port 80).
                ("a.y".into(), 80, vec!["north"]),
                ("a.y".into(), 81, vec!["west"]),
                ("b.x".into(), 80, vec!["west"]),
                ("c.x".into(), 80, vec!["north"]),
            ]
        );
        let shared: std::net::IpAddr = [127, 0, 0, 2].into();
        for vips in [None, Some(VipRange::parse("127.100.0.0/30").unwrap())] {
            let a = import_addresses(&p, shared, vips);
            let services: Vec<String> = a.keys().map(ToString::to_string).collect();
            match vips {
                None => assert_eq!(services, ["a.x", "a.y", "b.x", "c.x"]),
                // Two usable addresses: the first two services by name.
                Some(_) => assert_eq!(services, ["a.x", "a.y"]),
            }
        }
    }

    #[test]
    fn tcp_and_udp_on_one_port_are_two_imports() {
        let port = |protocol, name: &str| ExportedPort {
            app_protocol: Default::default(),
            port: 53,
            protocol,
            name: Some(name.into()),
        };
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .apply(Change::PutExport {
                site: SiteName::new("west").unwrap(),
                export: Export {
                    endpoint_labels: Vec::new(),
                    http_policy: None,
                    service: ServiceName::parse("dns.legacy").unwrap(),
                    ports: vec![port(Protocol::Udp, "dns"), port(Protocol::Tcp, "dns-tcp")],
                    ready_endpoints: 1,
                    identities: vec![],
                    locality: None,
                    labels: Default::default(),
                    hosts: vec![],
                },
            })
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        let got: Vec<_> = p
            .imports
            .iter()
            .map(|i| {
                (
                    i.port,
                    i.protocol,
                    i.name.as_deref().unwrap(),
                    names(&i.backends),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (53, Protocol::Tcp, "dns-tcp", vec!["west"]),
                (53, Protocol::Udp, "dns", vec!["west"]),
            ]
        );
    }

    /// A subset whose `trafficPolicy.loadBalancer` gives its own `localityLbSetting`
    /// has its sites in that order; one whose setting is the destination's (no policy,
    /// a balancer that keeps it, a port setting for another port) has none of its own.
    #[test]
    fn a_subset_with_its_own_locality_setting_orders_its_sites_by_it() {
        use crate::http_route::{
            HttpPolicy, LoadBalancer, PortBalancer, PortSettings, Subset, SubsetPolicy,
        };
        use crate::locality::{Distribute, LocalityLb};
        let n = |s: &str| SiteName::new(s).unwrap();
        let (a, b, d) = (n("a"), n("b"), n("d"));
        let none = BTreeMap::new();
        // (locality, ready endpoints, site, labels): a is nearest, d the biggest.
        let cands = vec![
            (Some("eu/x/1"), 1, &a, &none),
            (Some("eu/y"), 2, &b, &none),
            (Some("us/x"), 9, &d, &none),
        ];
        let balancer = |lb: Option<LocalityLb>| PortBalancer {
            load_balancer: Some(LoadBalancer::RoundRobin),
            consistent_hash: None,
            locality_lb: lb,
        };
        let off = LocalityLb {
            disabled: true,
            ..Default::default()
        };
        let dist = LocalityLb {
            distribute: vec![Distribute {
                from: "eu/*".into(),
                to: [("us".to_string(), 100)].into(),
            }],
            ..Default::default()
        };
        let subset = |name: &str, policy: Option<SubsetPolicy>| Subset {
            name: name.into(),
            labels: BTreeMap::from([("version".to_string(), name.to_string())]),
            policy,
        };
        let mut p = HttpPolicy::new(
            ServiceName::parse("orders.shop").unwrap(),
            "test".into(),
            Vec::new(),
        );
        p.subsets = vec![
            subset("v1", None),
            subset(
                "v2",
                Some(SubsetPolicy {
                    balancer: Some(balancer(Some(off.clone()))),
                    ..Default::default()
                }),
            ),
            // A balancer without a locality setting: the destination's (none) stays.
            subset(
                "v3",
                Some(SubsetPolicy {
                    balancer: Some(balancer(None)),
                    ..Default::default()
                }),
            ),
            // Its own setting at port 80 only.
            subset(
                "v4",
                Some(SubsetPolicy {
                    port_settings: vec![PortSettings {
                        port: 80,
                        pool: None,
                        outlier: None,
                        balancer: Some(balancer(Some(dist.clone()))),
                    }],
                    ..Default::default()
                }),
            ),
        ];
        let me = crate::locality::topology_labels("z", Some("eu/x/1"), &BTreeMap::new());
        let show = |port: u16, p: &HttpPolicy| -> Vec<String> {
            subset_orders(p, port, (Some("eu/x/1"), &me), &cands)
                .into_iter()
                .map(|(name, o)| {
                    let w: Vec<String> =
                        o.weights.iter().map(|(s, w)| format!("{s}={w}")).collect();
                    format!("{name}:{}|{}", names(&o.sites).join(","), w.join(","))
                })
                .collect()
        };
        // The destination's order is a,b,d (nearest first); v2's is by capacity, v4's
        // at port 80 sends every first attempt to d.
        assert_eq!(show(80, &p), ["v2:d,b,a|", "v4:d|d=100"]);
        assert_eq!(show(81, &p), ["v2:d,b,a|"]);
        // The destination turns locality off: v3's balancer, with no setting, means
        // the default again (nearest first), and v2's matches the destination's.
        p.locality_lb = Some(off);
        assert_eq!(show(81, &p), ["v3:a,b,d|"]);
    }

    #[test]
    fn locality_first_then_capacity() {
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .site("north", true)
            .export("west", "orders.shop", 8080, 1, Some("eu"))
            .export("north", "orders.shop", 8080, 5, Some("us"))
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), Some("eu"));
        assert_eq!(names(&p.imports[0].backends), vec!["west", "north"]);
    }

    #[test]
    fn sites_are_ordered_by_locality_as_the_policy_says() {
        use crate::locality::{Distribute, Failover, LocalityLb};
        let n = |s: &str| SiteName::new(s).unwrap();
        let (a, b, c, d, e) = (n("a"), n("b"), n("c"), n("d"), n("e"));
        // (locality, ready endpoints, site)
        // Export labels: d and e run on network "n1", the others on "n2".
        let (n1, n2): (BTreeMap<String, String>, BTreeMap<String, String>) = (
            [("topology.istio.io/network".into(), "n1".into())].into(),
            [("topology.istio.io/network".into(), "n2".into())].into(),
        );
        let cands = || {
            vec![
                (Some("eu/x/1"), 1, &a, &n2),
                (Some("eu/x/2"), 2, &b, &n2),
                (Some("eu/y"), 3, &c, &n2),
                (Some("us/x"), 9, &d, &n1),
                (Some("ap/x"), 8, &e, &n1),
            ]
        };
        let order = |me: Option<&str>, lb: Option<&LocalityLb>| {
            // The calling gateway, "z", on no network.
            let me_labels = crate::locality::topology_labels("z", me, &BTreeMap::new());
            let (sites, w) = order_sites(me, &me_labels, lb, cands());
            (
                names(&sites).join(","),
                w.into_iter()
                    .map(|(s, w)| format!("{s}={w}"))
                    .collect::<Vec<_>>()
                    .join(","),
            )
        };
        // Subzone, zone, region, then the rest by ready endpoints.
        assert_eq!(order(Some("eu/x/1"), None).0, "a,b,c,d,e");
        assert_eq!(order(Some("eu/x"), None).0, "b,a,c,d,e");
        // No locality of its own: by capacity only; so too when the setting is off.
        assert_eq!(order(None, None).0, "d,e,c,b,a");
        let off = LocalityLb {
            disabled: true,
            ..Default::default()
        };
        assert_eq!(order(Some("eu/x/1"), Some(&off)).0, "d,e,c,b,a");
        // Failover names the next region ahead of a bigger one.
        let fo = LocalityLb {
            failover: vec![Failover {
                from: "eu".into(),
                to: "ap".into(),
            }],
            ..Default::default()
        };
        assert_eq!(order(Some("eu/x/1"), Some(&fo)).0, "a,b,c,e,d");
        assert_eq!(order(Some("us/z"), Some(&fo)).0, "d,e,c,b,a");
        // Distribute: shares, and the sites without one are not backends.
        let dist = LocalityLb {
            distribute: vec![Distribute {
                from: "eu/*".into(),
                to: [("eu/x".to_string(), 30), ("us".to_string(), 70)].into(),
            }],
            ..Default::default()
        };
        assert_eq!(
            order(Some("eu/y"), Some(&dist)),
            ("b,a,d".to_string(), "a=10,b=20,d=70".to_string())
        );
        // A caller the rule is not for keeps the nearest-first order.
        assert_eq!(
            order(Some("ap/q"), Some(&dist)),
            ("e,d,c,b,a".to_string(), String::new())
        );
        // failoverPriority: by labels instead of localities; the calling gateway's
        // region and zone (from its locality) against each site's.
        let prio = |labels: &[&str]| LocalityLb {
            failover_priority: labels.iter().map(|l| l.to_string()).collect(),
            ..Default::default()
        };
        let rows = [
            // Region then zone: eu/x first (b before a by capacity), then eu/y, then
            // the rest by capacity.
            (
                "eu/x/9",
                &[
                    "topology.kubernetes.io/region",
                    "topology.kubernetes.io/zone",
                ][..],
                "b,a,c,d,e",
            ),
            // Zone alone: the label holds the zone's name only, so us/x and ap/x
            // match the caller's "x" as eu/x does; eu/y last.
            ("eu/x/9", &["topology.kubernetes.io/zone"][..], "d,e,b,a,c"),
            // A fixed value: network n1 first, whatever the caller's.
            ("eu/x/9", &["topology.istio.io/network=n1"][..], "d,e,c,b,a"),
            // The caller has no network and every site has one: no site matches, so
            // capacity decides (the locality order does not apply).
            ("eu/x/9", &["topology.istio.io/network"][..], "d,e,c,b,a"),
            // The cluster label is the site's name: none is "z".
            (
                "ap/x",
                &["topology.istio.io/cluster", "topology.kubernetes.io/region"][..],
                "d,e,c,b,a",
            ),
        ];
        for (me, labels, want) in rows {
            assert_eq!(
                order(Some(me), Some(&prio(labels))).0,
                want,
                "{me} {labels:?}"
            );
        }
        // The gateway's own labels (`federation.labels`) count as its site name and
        // locality do: a gateway on network n1 prefers d and e; one on n2 the others.
        for (network, want) in [("n1", "d,e,c,b,a"), ("n2", "c,b,a,d,e")] {
            let mine = BTreeMap::from([("topology.istio.io/network".to_string(), network.into())]);
            let me_labels = crate::locality::topology_labels("z", Some("eu/x/9"), &mine);
            let lb = prio(&["topology.istio.io/network"]);
            let (sites, _) = order_sites(Some("eu/x/9"), &me_labels, Some(&lb), cands());
            assert_eq!(names(&sites).join(","), want, "{network}");
        }
        // Disabled: no preference at all.
        let off = LocalityLb {
            disabled: true,
            ..prio(&["topology.kubernetes.io/region"])
        };
        assert_eq!(order(Some("eu/x/9"), Some(&off)).0, "d,e,c,b,a");
    }

    #[test]
    fn a_down_site_or_one_without_ready_endpoints_gets_no_traffic() {
        let c = Builder::new()
            .site("east", true)
            .site("west", false)
            .site("north", true)
            .export("west", "orders.shop", 8080, 3, None)
            .export("north", "orders.shop", 8080, 0, None)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        assert_eq!(
            p.imports.len(),
            1,
            "the import stays, so clients get a typed refusal, not a missing name"
        );
        assert!(p.imports[0].backends.is_empty());
    }

    #[test]
    fn ports_are_merged_per_port() {
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .site("north", true)
            .export("west", "orders.shop", 8080, 1, None)
            .export("north", "orders.shop", 9090, 1, None)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        let got: Vec<(u16, Vec<&str>)> = p
            .imports
            .iter()
            .map(|i| (i.port, names(&i.backends)))
            .collect();
        assert_eq!(got, vec![(8080, vec!["west"]), (9090, vec!["north"])]);
    }
}
