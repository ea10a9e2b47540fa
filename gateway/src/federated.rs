//! Runs a gateway from the federation's catalog: publishes this site's exports, watches
//! the catalog, keeps the federated bundles on disk, and turns every catalog change into
//! peers and imports (`meshfed_catalog::planner`, `meshfed_catalog::routing`).
//!
//! Each watch event notes what it touched; the next apply re-plans only those services
//! and binds, re-routes or removes only the listeners whose imports changed (a snapshot,
//! the first plan, or `federation.import_ports` walks them all). Imports that could not
//! be bound (no address, past the listener budget) are tried again when an import goes.
//!
//! A plan is applied at once after a change unless the last one was recent: under a
//! steady stream of changes the next apply waits 4× what the last cost (`apply_wait`,
//! at most 1 s). The cache and `imports.json` are as large as the catalog: they are
//! written 4× their last write's cost apart (`cache_wait`, at most 5 s), one write at a
//! time, on a thread of their own from a copy of the catalog (the agent's task waits
//! for the copy, not the write); at once, and waited for, when the session with the
//! federation ends or the gateway stops. Each apply's time is in
//! `meshfed_gateway_catalog_apply_seconds`, each cache write's in
//! `meshfed_gateway_catalog_cache_write_seconds`.
//!
//! Static stability: the last catalog is cached in the site directory. At start the
//! gateway serves from the cache before it reaches the federation, and when the
//! federation is down it keeps serving what it last knew.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshfed_api::{FieldError, change_from_pb_watched, pb};
use meshfed_catalog::catalog::Protocol;
use meshfed_catalog::catalog::{Change, Delta, Revision};
use meshfed_catalog::planner::{Planner, Touched, imports_of};
use meshfed_catalog::routing::{IMPORTS_FILE, ImportListener, ImportListeners, ImportPlan};
use meshfed_catalog::site::Membership;
use meshfed_catalog::{Catalog, ServiceName, SiteName};
use meshfed_identity::ca::write_file;
use meshfed_identity::{TrustBundle, TrustDomain};
use meshfed_lifecycle::off_worker;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Export, Federation, Import, Peer};
use crate::egress::{ImportKey, Imports};
use crate::metrics::Metrics;
use crate::peers::Peers;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

pub struct Agent {
    pub fed: Federation,
    pub site: SiteName,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// What this site exports: its config's exports and its registered services; a
    /// change is published at once.
    pub exports: tokio::sync::watch::Receiver<Vec<Export>>,
    /// Where other gateways dial us.
    pub advertise: String,
    /// Statically configured peers and imports stay in place beside the catalog's.
    pub static_peers: Vec<Peer>,
    pub static_imports: Vec<Import>,
    pub peers: Peers,
    pub imports: Arc<Imports>,
    pub metrics: Metrics,
    /// The live bundle set of the verifiers: federated bundles go in here at once, not
    /// only to disk for the reloader.
    pub bundle_store: Arc<arc_swap::ArcSwap<meshfed_identity::BundleSet>>,
    /// Inbound connections, closed for a trust domain the federation withdraws.
    pub ingress: Arc<crate::ingress::Ingress>,
    /// Kicks the reloader, so that the bundle files are read again at once.
    pub reload: Arc<tokio::sync::Notify>,
    /// Trust domains never withdrawn by the federation: this site's own and those of
    /// the config's static bundle files.
    pub pinned: BTreeSet<TrustDomain>,
    /// Every plan the agent applies, for whoever answers for the site's imports (the
    /// binary's DNS server follows it).
    pub applied: tokio::sync::watch::Sender<Option<Arc<AppliedPlan>>>,
    /// What `imports.json` holds as this agent last wrote it, or as the last run left it
    /// (compared in memory: the file is as large as the imports).
    pub listeners_written: Arc<std::sync::Mutex<Option<ImportListeners>>>,
}

/// A plan as the agent applied it: the plan, the address each imported service listens
/// on at this site (what DNS answers), and the catalog revision it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedPlan {
    /// Shared with the agent's planner (each service's imports with the plans before);
    /// each import carries the address it listens on (`ImportPlan::address`).
    pub plan: Arc<meshfed_catalog::routing::SitePlan>,
    pub revision: u64,
}

impl AppliedPlan {
    /// The address the imports of `service` listen on, if it is imported and has one.
    pub fn address_of(&self, service: &ServiceName) -> Option<std::net::IpAddr> {
        imports_of(&self.plan.imports, service)
            .first()
            .and_then(|im| im.address)
    }
}

/// The catalog as this gateway follows it, and what it made of it.
struct Followed {
    catalog: Catalog,
    /// What changed in the catalog since its plan was last applied.
    touched: Touched,
    planner: Planner,
    /// The listeners bound for the plan's imports (`imports.json`), and the plan's
    /// imports not bound (no address or port left, past the listener budget, or a bind
    /// error; tried again when an import goes).
    bound: BTreeMap<ImportKey, ImportListener>,
    unbound: BTreeSet<ImportKey>,
    /// The routing conflicts of each service whose sites publish different routes.
    conflicts: BTreeMap<ServiceName, BTreeSet<String>>,
}

impl Followed {
    /// The catalog has changes its plan does not have yet.
    fn pending(&self) -> bool {
        !self.touched.is_empty()
    }
}

/// What `imports.json` holds for these bound listeners.
fn listeners_of(bound: &BTreeMap<ImportKey, ImportListener>) -> ImportListeners {
    ImportListeners {
        imports: bound.values().cloned().collect(),
    }
}

/// The catalog cache (`catalog.json`) and `imports.json` of a site directory, written
/// by the agent's cache writer.
struct CacheFiles {
    dir: PathBuf,
    /// What `imports.json` holds as last written, or as the last run left it (compared
    /// in memory: the file is as large as the imports).
    listeners_written: Arc<std::sync::Mutex<Option<ImportListeners>>>,
    metrics: Metrics,
}

impl CacheFiles {
    /// Writes both (`imports.json` only when it changed); counts and returns the time.
    fn write(&self, catalog: &Catalog, listeners: ImportListeners) -> Duration {
        let began = std::time::Instant::now();
        match serde_json::to_vec(catalog) {
            Ok(b) => {
                if let Err(e) = write_file(&self.dir.join("catalog.json"), &b, 0o644) {
                    warn!(error = %e, "catalog cache not written");
                }
            }
            Err(e) => warn!(error = %e, "catalog cache not serialized"),
        }
        self.write_listeners(listeners);
        let took = began.elapsed();
        self.metrics
            .catalog_cache_write
            .0
            .observe(took.as_secs_f64());
        took
    }

    /// Writes `imports.json` when it changed.
    fn write_listeners(&self, now: ImportListeners) {
        let mut last = self
            .listeners_written
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(&now) {
            return;
        }
        match serde_json::to_vec_pretty(&now) {
            Ok(b) => match write_file(&self.dir.join(IMPORTS_FILE), &b, 0o644) {
                Ok(()) => *last = Some(now),
                Err(e) => warn!(error = %e, "imports.json not written"),
            },
            Err(e) => warn!(error = %e, "imports.json not serialized"),
        }
    }
}

/// An import's key at the gateway: service, port, protocol.
fn key(im: &ImportPlan) -> ImportKey {
    (im.service.clone(), im.port, im.protocol)
}

/// Why a session with the federation ended. `reason` is the federation's typed refusal
/// code when it refused, for logs.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{}: {source} (run `meshfed site join` first)", path.display())]
    NotJoined {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Membership {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {source}", path.display())]
    BundleFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: meshfed_identity::BundleError,
    },
    #[error(transparent)]
    Client(#[from] meshfed_api::client::ClientError),
    #[error("federation {call}: {}", status.message())]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{0} stream ended")]
    StreamEnded(&'static str),
    #[error(transparent)]
    Change(#[from] meshfed_api::FieldError),
    #[error(transparent)]
    Catalog(#[from] meshfed_catalog::catalog::CatalogError),
    #[error("federation watch: {0}")]
    Parts(#[from] meshfed_api::parts::PartsError),
}

impl SessionError {
    /// The federation's refusal code, when it refused.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Rpc { status, .. } => meshfed_api::reason_of(status),
            Self::Client(meshfed_api::client::ClientError::Refused {
                refusal: Some(r), ..
            }) => Some(r.code()),
            _ => None,
        }
    }
}

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> SessionError {
    move |status| SessionError::Rpc { call, status }
}

/// An export whose HTTP policy this gateway could not read (a newer site's field, say):
/// applied with the policy in force before it, or none.
#[derive(Debug)]
struct Unreadable {
    site: meshfed_catalog::SiteName,
    service: meshfed_catalog::ServiceName,
    error: FieldError,
}

/// The catalog a site applies: snapshots reset it, deltas extend it. An export whose
/// policy does not read keeps the policy in force (an unreadable one never replaces it)
/// and is returned, so one newer site's policy neither stops this gateway's catalog nor
/// drops the service.
///
/// What the event touches is noted in `touched` (a snapshot: everything), for the plan.
fn apply_event(
    catalog: &mut Catalog,
    touched: &mut Touched,
    ev: pb::WatchEvent,
) -> Result<Vec<Unreadable>, SessionError> {
    let mut unreadable = Vec::new();
    let mut read = |c: pb::Change, before: &Catalog| -> Result<Delta, SessionError> {
        let (mut d, bad) = change_from_pb_watched(c)?;
        if let (Some(error), Change::PutExport { site, export }) = (bad, &mut d.change) {
            let key = (site.clone(), export.service.clone());
            export.http_policy = before.exports.get(&key).and_then(|e| e.http_policy.clone());
            unreadable.push(Unreadable {
                site: key.0,
                service: key.1,
                error,
            });
        }
        Ok(d)
    };
    if ev.snapshot {
        let mut fresh = Catalog::default();
        for (i, c) in ev.changes.into_iter().enumerate() {
            let d = read(c, catalog)?;
            fresh.apply(&Delta {
                revision: Revision(i as u64 + 1),
                change: d.change,
            })?;
        }
        fresh.revision = Revision(ev.revision);
        *catalog = fresh;
        *touched = Touched::everything();
        return Ok(unreadable);
    }
    // Several changes may share a revision (one store transaction): skip by the revision
    // held before this event, so a resumed watch drops what was applied and nothing else.
    let base = catalog.revision;
    for c in ev.changes {
        let d = read(c, catalog)?;
        if d.revision <= base {
            continue; // already applied (resumed watch)
        }
        touched.note(catalog, &d.change);
        catalog.apply(&d)?;
    }
    Ok(unreadable)
}

/// An import's routes, compiled for its egress; a policy that does not compile (the API
/// checked it on the way in, so only a bug gets here) is logged and not applied.
fn route_table(
    im: &meshfed_catalog::routing::ImportPlan,
) -> Option<Arc<crate::http::egress::RouteTable>> {
    let p = im.http_policy.clone()?;
    match p.compile() {
        Ok(compiled) => Some(Arc::new(crate::http::egress::RouteTable::new(
            compiled,
            im.port,
            im.site_labels.clone(),
            (im.site_weights.clone(), im.subset_orders.clone()),
        ))),
        Err(e) => {
            warn!(service = %im.service, error = %e, "routes not applied");
            None
        }
    }
}

/// The distinct label sets of an export's endpoints, with how many endpoint addresses
/// (IPs) have each; none when no endpoint has labels (the site is then judged on its
/// name). Sets that are not valid labels, and those past the most the federation takes,
/// are left out with a warning. Pure.
pub fn endpoint_label_sets(e: &Export) -> Vec<pb::EndpointLabels> {
    if e.endpoint_labels.is_empty() {
        return vec![];
    }
    let empty = BTreeMap::new();
    let mut sets: BTreeMap<&BTreeMap<String, String>, BTreeSet<std::net::IpAddr>> = BTreeMap::new();
    for ep in e.ports.values().chain(e.udp_ports.values()).flatten() {
        let labels = e.endpoint_labels.get(ep).unwrap_or(&empty);
        sets.entry(labels).or_default().insert(ep.ip());
    }
    let mut out = Vec::new();
    let mut bytes = 0;
    for (labels, ips) in sets {
        if let Err((k, m)) = meshfed_catalog::http_route::check_labels(labels) {
            warn!(service = %e.service, label = %k, reason = %m, "endpoint labels not published");
            continue;
        }
        let size: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        if out.len() == meshfed_catalog::catalog::MAX_ENDPOINT_LABEL_SETS
            || bytes + size > meshfed_api::ENDPOINT_LABELS_MAX
        {
            warn!(service = %e.service, sets = out.len(), bytes, "more endpoint labels than the federation takes; the rest are not published");
            break;
        }
        bytes += size;
        out.push(pb::EndpointLabels {
            labels: labels.clone().into_iter().collect(),
            endpoints: u32::try_from(ips.len()).unwrap_or(u32::MAX),
        });
    }
    out
}

/// One export as published: its ports, ready endpoints, policy and label sets, at the
/// site's `locality` and with the site's `labels` (importers order sites by them).
fn export_to_pb(
    e: &Export,
    (locality, labels): (Option<&str>, &BTreeMap<String, String>),
) -> pb::ServiceExport {
    let ready: usize = e
        .ports
        .values()
        .chain(e.udp_ports.values())
        .map(Vec::len)
        .max()
        .unwrap_or(0);
    let port = |p: &u16, protocol: Protocol| pb::Port {
        // What the ingress serves the port as: a port with the PROXY header carries
        // bytes, and an importer must not speak HTTP links to it.
        app_protocol: match (protocol, e.served_protocol(*p)) {
            (Protocol::Tcp, a) if !a.is_tcp() => a.as_str().into(),
            _ => String::new(),
        },
        port: u32::from(*p),
        protocol: protocol.as_str().into(),
        name: e
            .port_names
            .get(&(protocol, *p))
            .cloned()
            .unwrap_or_default(),
    };
    pb::ServiceExport {
        service: e.service.to_string(),
        ports: e
            .ports
            .keys()
            .map(|p| port(p, Protocol::Tcp))
            .chain(e.udp_ports.keys().map(|p| port(p, Protocol::Udp)))
            .collect(),
        ready_endpoints: u32::try_from(ready).unwrap_or(u32::MAX),
        hosts: e.hosts.clone(),
        identities: e.identities.iter().map(ToString::to_string).collect(),
        http_policy: e
            .http_policy
            .as_ref()
            .and_then(|p| serde_json::to_string(p).ok())
            .unwrap_or_default(),
        endpoint_labels: endpoint_label_sets(e),
        locality: locality.unwrap_or_default().to_owned(),
        labels: labels.clone().into_iter().collect(),
    }
}

impl Agent {
    fn cache_path(&self) -> PathBuf {
        self.fed.dir.join("catalog.json")
    }

    fn load_cache(&self) -> Catalog {
        std::fs::read(self.cache_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Applies the plan off the runtime's queue ([`off_worker`]) and says so, then writes
    /// the cache (and `imports.json`) when its pace allows, else marks it pending.
    /// Returns (and counts) what the plan's apply took, apart from the cache's write.
    fn apply(&self, f: &mut Followed, pace: &mut Pace) -> Duration {
        let began = std::time::Instant::now();
        off_worker(|| self.apply_plan(f));
        self.publish_applied(f);
        let took = began.elapsed();
        self.metrics.catalog_apply.0.observe(took.as_secs_f64());
        if tokio::time::Instant::now() >= pace.cache_next {
            self.write_cache(f, pace);
        } else {
            pace.cache_pending = true;
        }
        took
    }

    /// Writes the cache and `imports.json` on a thread of their own, from a copy made
    /// now: the agent's task waits for the copy (tens of ms with 100,000 services), not
    /// for the write (160-240 ms), so watch events are not held up by it. One write at a
    /// time: while the last is still going this one stays pending. The next comes 4×
    /// the last write's cost later ([`cache_wait`]).
    fn write_cache(&self, f: &Followed, pace: &mut Pace) {
        if let Some(w) = pace.writing.take_if(|w| w.is_finished()) {
            pace.cache_cost = w.join().unwrap_or(pace.cache_cost);
        }
        let now = tokio::time::Instant::now();
        pace.cache_next = now + cache_wait(pace.cache_cost);
        if pace.writing.is_some() {
            pace.cache_pending = true;
            return;
        }
        let (catalog, listeners) = off_worker(|| (f.catalog.clone(), listeners_of(&f.bound)));
        let files = self.cache_files();
        pace.writing = Some(std::thread::spawn(move || files.write(&catalog, listeners)));
        pace.cache_pending = false;
    }

    /// Writes a pending cache now, after the write in progress if any (the session with
    /// the federation ended, or the gateway stops: the cache is what it serves from).
    fn flush_cache(&self, f: &Followed, pace: &mut Pace) {
        off_worker(|| {
            if let Some(w) = pace.writing.take() {
                pace.cache_cost = w.join().unwrap_or(pace.cache_cost);
            }
            if pace.cache_pending {
                pace.cache_cost = self.cache_files().write(&f.catalog, listeners_of(&f.bound));
                pace.cache_pending = false;
                pace.cache_next = tokio::time::Instant::now() + cache_wait(pace.cache_cost);
            }
        });
    }

    /// Makes peers and imports match the catalog: plans what changed since the last
    /// apply ([`Planner`]), and binds, re-routes or removes only the listeners of the
    /// services whose imports changed (all of them after a whole plan).
    fn apply_plan(&self, f: &mut Followed) {
        // Exported with `--otlp-endpoint` (a sync function: the guard never crosses an
        // await).
        let _span = tracing::trace_span!(
            target: "otel",
            "federation.apply",
            meshfed.site = %self.site,
            meshfed.revision = f.catalog.revision.0,
        )
        .entered();
        let before = f.planner.plan().clone();
        let touched = std::mem::take(&mut f.touched);
        let r = f.planner.update(&f.catalog, &touched);
        let p = f.planner.plan().clone();
        // Sites that publish different routes for one service: kept per service (for
        // the services that changed), counted, and each logged once when it appears.
        let conflicts_before = if r.all {
            std::mem::take(&mut f.conflicts)
        } else {
            let mut before = BTreeMap::new();
            for service in &r.services {
                if let Some(c) = f.conflicts.remove(service) {
                    before.insert(service.clone(), c);
                }
            }
            before
        };
        let mut changed: Vec<&ImportPlan> = Vec::new();
        if r.all {
            changed.extend(p.imports.iter().map(|im| &**im));
        } else {
            for service in &r.services {
                changed.extend(imports_of(&p.imports, service).iter().map(|im| &**im));
            }
        }
        for im in changed {
            let Some(c) = &im.policy_conflict else {
                continue;
            };
            if f.conflicts
                .entry(im.service.clone())
                .or_default()
                .insert(c.clone())
                && !conflicts_before
                    .get(&im.service)
                    .is_some_and(|b| b.contains(c))
            {
                warn!(conflict = %c, "routing policy conflict");
            }
        }
        if r.all || r.peers {
            let mut keep_peers: BTreeSet<SiteName> =
                self.static_peers.iter().map(|p| p.site.clone()).collect();
            for peer in &p.peers {
                if !self
                    .peers
                    .upsert(&peer.site, &peer.spiffe_id, &peer.addresses)
                {
                    warn!(site = %peer.site, addresses = ?peer.addresses, "no IP:port or host:port gateway address");
                    continue;
                }
                keep_peers.insert(peer.site.clone());
            }
            self.peers.retain(&keep_peers);
        }
        let statics: BTreeSet<ImportKey> = self
            .static_imports
            .iter()
            .map(|i| (i.service.clone(), i.port, i.protocol))
            .collect();
        // With `import_ports`, one import's port depends on all of them: bound whole.
        let ports = self
            .fed
            .import_ports
            .map(|r| meshfed_catalog::routing::import_ports(&p, r));
        let unbound_before = f.unbound.len();
        let mut over_budget = false;
        if r.all || ports.is_some() {
            f.bound.clear();
            f.unbound.clear();
            for im in &p.imports {
                over_budget |= self.bind(im, ports.as_ref(), f);
            }
            let keep: BTreeSet<ImportKey> =
                statics.into_iter().chain(f.bound.keys().cloned()).collect();
            self.imports.retain(&keep);
        } else {
            // The imports the changed services no longer have go first: that frees
            // addresses and listener budget, which the imports not bound yet may take.
            let mut services: BTreeSet<&ServiceName> = r.services.iter().collect();
            let mut gone = Vec::new();
            for service in &r.services {
                let now = imports_of(&p.imports, service);
                for old in imports_of(&before.imports, service) {
                    let k = key(old);
                    if now.iter().all(|im| key(im) != k) {
                        f.bound.remove(&k);
                        f.unbound.remove(&k);
                        if !statics.contains(&k) {
                            gone.push(k);
                        }
                    }
                }
            }
            let waiting: Vec<ServiceName> = if gone.is_empty() {
                Vec::new()
            } else {
                self.imports.remove(&gone);
                f.unbound.iter().map(|k| k.0.clone()).collect()
            };
            services.extend(waiting.iter());
            for service in services {
                for im in imports_of(&p.imports, service) {
                    over_budget |= self.bind(im, None, f);
                }
            }
        }
        if over_budget && unbound_before != f.unbound.len() {
            warn!(
                unbound = f.unbound.len(),
                bound = f.bound.len(),
                "imports not bound: the gateway's listener budget is spent (it is half the open-file limit: raise that)"
            );
        }
    }

    /// Says that the plan is applied: counts what is bound and the routing conflicts,
    /// and hands the plan to whoever follows it. Called once peers and listeners match
    /// it (DNS answers only for what is bound), and after `imports.json` when that is
    /// written with it.
    fn publish_applied(&self, f: &Followed) {
        self.metrics
            .imports_bound
            .set(i64::try_from(f.bound.len()).unwrap_or(i64::MAX));
        self.metrics
            .imports_unbound
            .set(i64::try_from(f.unbound.len()).unwrap_or(i64::MAX));
        let conflicts: usize = f.conflicts.values().map(BTreeSet::len).sum();
        self.metrics
            .route_conflicts
            .set(i64::try_from(conflicts).unwrap_or(i64::MAX));
        self.metrics
            .catalog_revision
            .set(i64::try_from(f.catalog.revision.0).unwrap_or(i64::MAX));
        self.applied.send_replace(Some(Arc::new(AppliedPlan {
            plan: f.planner.plan().clone(),
            revision: f.catalog.revision.0,
        })));
    }

    /// Binds (or re-routes) the listener of one import, noting it in `f.bound`, or in
    /// `f.unbound` when it has no address or port or cannot be bound. Returns whether
    /// the listener budget was what stopped it.
    fn bind(
        &self,
        im: &ImportPlan,
        ports: Option<&BTreeMap<(ServiceName, u16), u16>>,
        f: &mut Followed,
    ) -> bool {
        let k = key(im);
        f.bound.remove(&k);
        f.unbound.remove(&k);
        let Some(ip) = im.address else {
            warn!(service = %im.service, "federation.vip_range is full: import not bound");
            f.unbound.insert(k);
            return false;
        };
        let port = match ports {
            None => im.port,
            Some(ports) => match ports.get(&(im.service.clone(), im.port)) {
                Some(p) => *p,
                None => {
                    warn!(service = %im.service, port = im.port, "federation.import_ports is full: import not bound");
                    f.unbound.insert(k);
                    return false;
                }
            },
        };
        let listen = SocketAddr::new(ip, port);
        match self.imports.upsert(
            &im.service,
            im.port,
            im.protocol,
            im.app_protocol,
            listen,
            &im.backends,
            None,
            route_table(im),
        ) {
            Ok(_) => {
                f.bound.insert(
                    k,
                    ImportListener {
                        service: im.service.clone(),
                        port: im.port,
                        protocol: im.protocol,
                        name: im.name.clone(),
                        listen,
                        backends: im.backends.clone(),
                    },
                );
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::QuotaExceeded => {
                // One line for all of them (the caller's), not one per import.
                f.unbound.insert(k);
                true
            }
            Err(e) => {
                warn!(service = %im.service, port = im.port, %listen, error = %e, "import listener not bound");
                f.unbound.insert(k);
                false
            }
        }
    }

    /// Where the cache and `imports.json` go, for a writer apart from the agent.
    fn cache_files(&self) -> CacheFiles {
        CacheFiles {
            dir: self.fed.dir.clone(),
            listeners_written: self.listeners_written.clone(),
            metrics: self.metrics.clone(),
        }
    }

    pub async fn run(self, stop: CancellationToken) {
        let mut f = Followed {
            catalog: self.load_cache(),
            touched: Touched::default(),
            planner: Planner::new(
                self.site.clone(),
                self.fed.locality.clone(),
                self.fed.labels.clone(),
                self.fed.import_address,
                self.fed.vip_range,
            ),
            bound: BTreeMap::new(),
            unbound: BTreeSet::new(),
            conflicts: BTreeMap::new(),
        };
        // What the last run bound: its addresses seed this run's (a VIP survives a
        // restart), and the file is not written again unchanged.
        let prior: Option<ImportListeners> = std::fs::read(self.fed.dir.join(IMPORTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(p) = &prior {
            f.planner
                .seed_addresses(p.imports.iter().map(|l| (l.service.clone(), l.listen.ip())));
        }
        *self
            .listeners_written
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = prior;
        if f.catalog.revision.0 > 0 {
            info!(
                revision = f.catalog.revision.0,
                "serving from the cached catalog until the federation answers"
            );
            off_worker(|| {
                self.apply_plan(&mut f);
                self.cache_files().write_listeners(listeners_of(&f.bound));
                self.publish_applied(&f);
            });
        }
        let mut backoff = BACKOFF_MIN;
        let mut pace = Pace::default();
        loop {
            let session = self.session(&mut f, &mut pace);
            let stopped = tokio::select! {
                r = session => {
                    match r {
                        Ok(()) => backoff = BACKOFF_MIN,
                        Err(e) => warn!(error = %e, reason = e.reason(), retry_in = ?backoff, "federation session ended"),
                    }
                    false
                }
                _ = stop.cancelled() => true,
            };
            // Changes the session took in but had not applied yet (paced) are applied
            // now: the next session resumes after them.
            if f.pending() {
                if stopped {
                    pace.cache_pending = true;
                } else {
                    self.apply(&mut f, &mut pace);
                }
            }
            // The cache is current when the gateway stops or loses the federation,
            // which is when it is read.
            self.flush_cache(&f, &mut pace);
            if stopped {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection to the federation: publish, then follow bundles and the catalog
    /// until the stream breaks.
    async fn session(&self, f: &mut Followed, pace: &mut Pace) -> Result<(), SessionError> {
        let path = self.fed.dir.join(Membership::FILE);
        let json = std::fs::read(&path).map_err(|source| SessionError::NotJoined {
            path: path.clone(),
            source,
        })?;
        let mut m: Membership = serde_json::from_slice(&json)
            .map_err(|source| SessionError::Membership { path, source })?;
        let fed_bundle = self.federation_bundle(&m.federation_trust_domain)?;
        let mut client =
            meshfed_api::client::client(&m.addresses, fed_bundle, &self.cert, &self.key).await?;
        let mut exports = self.exports.clone();
        self.publish(&mut client, &mut exports).await?;

        let mut bundles = client
            .bundles(pb::BundlesRequest {})
            .await
            .map_err(rpc("bundles"))?
            .into_inner();
        // Trust first: peers from the catalog are dialed as soon as it is applied.
        let first = bundles
            .next()
            .await
            .ok_or(SessionError::StreamEnded("bundle"))?
            .map_err(rpc("bundles"))?;
        self.follow_addresses(&mut m, &first.federation_addresses);
        self.write_bundles(first, &m.federation_trust_domain);
        let from = (f.catalog.revision.0 > 0).then_some(f.catalog.revision.0);
        let mut watch = client
            .watch(pb::WatchRequest {
                parts: true,
                from_revision: from,
                gateway_address: if self.fed.inbound {
                    self.advertise.clone()
                } else {
                    String::new()
                },
            })
            .await
            .map_err(rpc("watch"))?
            .into_inner();
        let mut first = true;
        let mut parts = meshfed_api::parts::Assembler::default();
        let mut links = LinkReporter::default();
        let mut tick = tokio::time::interval(LINK_CHECK);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(pace.next), if f.pending() => {}
                _ = tokio::time::sleep_until(pace.cache_next), if pace.cache_pending && !f.pending() => {
                    self.write_cache(f, pace);
                }
                _ = tick.tick() => links.maybe_report(&mut client, &self.peers, &self.metrics, &self.advertise, self.fed.inbound).await,
                ev = watch.next() => {
                    let mut ev = ev.ok_or(SessionError::StreamEnded("watch"))?.map_err(rpc("watch"))?;
                    // Every event already here is applied before the plan is: under a
                    // burst of changes the cache and the plan (each as large as the
                    // catalog) are written once per burst, not once per event.
                    let mut applied = 0;
                    loop {
                        // A large event comes in parts; none applies before the last.
                        if let Some(whole) = parts.push(meshfed_api::parts::event(ev)?)? {
                            let snapshot = whole.snapshot;
                            if std::mem::take(&mut first) {
                                info!(from = ?from, snapshot, revision = whole.revision, changes = whole.changes.len(), "watching the catalog");
                            }
                            for u in apply_event(&mut f.catalog, &mut f.touched, whole)? {
                                self.metrics.catalog_unreadable_policies.inc();
                                warn!(site = %u.site, service = %u.service, field = %u.error.field, reason = %u.error.reason, "an exported service's HTTP policy does not read here (a newer site's field?): the policy in force before stays");
                            }
                            debug!(revision = f.catalog.revision.0, snapshot, "catalog updated");
                            applied += 1;
                        }
                        if applied >= MAX_COALESCED {
                            break;
                        }
                        match futures::FutureExt::now_or_never(watch.next()) {
                            Some(Some(next)) => ev = next.map_err(rpc("watch"))?,
                            Some(None) => return Err(SessionError::StreamEnded("watch")),
                            None => break,
                        }
                    }
                    if applied == 0 {
                        continue;
                    }
                }
                b = bundles.next() => {
                    let b = b.ok_or(SessionError::StreamEnded("bundle"))?.map_err(rpc("bundles"))?;
                    self.follow_addresses(&mut m, &b.federation_addresses);
                    self.write_bundles(b, &m.federation_trust_domain);
                }
                changed = exports.changed() => {
                    if changed.is_ok() {
                        self.publish(&mut client, &mut exports).await?;
                    }
                }
            }
            if f.pending() && tokio::time::Instant::now() >= pace.next {
                let took = self.apply(f, pace);
                // The wait counts from the apply's end: an apply that took longer than
                // the cap is still followed by a pause.
                pace.next = tokio::time::Instant::now() + apply_wait(took);
            }
        }
    }

    /// Publishes the current export set (marking it seen).
    async fn publish(
        &self,
        client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
        exports: &mut tokio::sync::watch::Receiver<Vec<Export>>,
    ) -> Result<(), SessionError> {
        use tracing::Instrument;
        let span = tracing::trace_span!(
            target: "otel",
            "federation.publish",
            otel.kind = "client",
            meshfed.site = %self.site,
        );
        self.publish_traced(client, exports).instrument(span).await
    }

    async fn publish_traced(
        &self,
        client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
        exports: &mut tokio::sync::watch::Receiver<Vec<Export>>,
    ) -> Result<(), SessionError> {
        let set: Vec<pb::ServiceExport> = exports
            .borrow_and_update()
            .iter()
            .map(|e| export_to_pb(e, (self.fed.locality.as_deref(), &self.fed.labels)))
            .collect();
        let n = set.len();
        let r = client
            .publish(pb::PublishRequest {
                site: self.site.to_string(),
                exports: set,
                gateway_addresses: if self.fed.inbound {
                    vec![self.advertise.clone()]
                } else {
                    vec![]
                },
                outbound_only: !self.fed.inbound,
            })
            .await
            .map_err(rpc("publish"))?
            .into_inner();
        info!(
            revision = r.revision,
            changes = r.changes,
            exports = n,
            "published exports"
        );
        Ok(())
    }

    fn federation_bundle(&self, td: &TrustDomain) -> Result<TrustBundle, SessionError> {
        let path = self.fed.dir.join("bundles").join(format!("{td}.json"));
        let json = std::fs::read(&path).map_err(|source| SessionError::BundleFile {
            path: path.clone(),
            source,
        })?;
        TrustBundle::from_jwks(td.clone(), &json)
            .map_err(|source| SessionError::Bundle { path, source })
    }

    /// Writes changed bundles into `bundles/`; the reloader swaps them in.
    /// Keeps the membership's federation addresses as the federation announces them, so
    /// that the next session can reach a replica added after the site joined.
    fn follow_addresses(&self, m: &mut Membership, announced: &[String]) {
        if announced.is_empty() || m.addresses == announced {
            return;
        }
        m.addresses = announced.to_vec();
        let path = self.fed.dir.join(Membership::FILE);
        match serde_json::to_vec_pretty(&*m) {
            Ok(b) => match write_file(&path, &b, 0o644) {
                Ok(()) => info!(addresses = ?m.addresses, "federation addresses updated"),
                Err(e) => warn!(error = %e, "federation.json not written"),
            },
            Err(e) => warn!(error = %e, "membership not serialized"),
        }
    }

    fn write_bundles(&self, set: pb::BundleSet, federation_td: &TrustDomain) {
        let dir = self.fed.dir.join("bundles");
        let listed: BTreeSet<String> = set.bundles.keys().cloned().collect();
        for (td, jwks) in set.bundles {
            let Ok(t) = TrustDomain::new(&td) else {
                warn!(%td, "bundle for an invalid trust domain ignored");
                continue;
            };
            let Ok(bundle) = TrustBundle::from_jwks(t, jwks.as_bytes()) else {
                warn!(%td, "invalid bundle ignored");
                continue;
            };
            if self.bundle_store.load().get(&bundle.trust_domain) != Some(&bundle) {
                self.bundle_store.rcu(|set| {
                    let mut set = (**set).clone();
                    set.insert(bundle.clone());
                    set
                });
            }
            let path = dir.join(format!("{td}.json"));
            if std::fs::read(&path).ok().as_deref() == Some(jwks.as_bytes()) {
                continue;
            }
            match write_file(&path, jwks.as_bytes(), 0o644) {
                Ok(()) => info!(%td, "federated bundle updated"),
                Err(e) => warn!(%td, error = %e, "bundle not written"),
            }
        }
        // What the federation no longer lists was withdrawn (its site left or was
        // removed): drop the bundle, so new handshakes fail, and close what is live.
        let held: Vec<TrustDomain> = self.bundle_store.load().trust_domains().cloned().collect();
        for td in held {
            if listed.contains(td.as_str()) || self.pinned.contains(&td) || td == *federation_td {
                continue;
            }
            let path = dir.join(format!("{td}.json"));
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(%td, error = %e, "withdrawn bundle file not removed");
            }
            self.bundle_store.rcu(|set| {
                let mut set = (**set).clone();
                set.remove(&td);
                set
            });
            // A reload that read the files before the removal must not bring it back:
            // read them again now. A connection that slips in meanwhile is closed at
            // its next stream (the ingress checks the live bundles).
            self.reload.notify_one();
            let closed = self.ingress.close_trust_domain(td.as_str())
                + self.peers.close_trust_domain(td.as_str());
            warn!(%td, closed, "trust domain withdrawn by the federation: bundle dropped, its connections closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_api::change_to_pb;
    use meshfed_catalog::catalog::{Change, Export as CatalogExport, ExportedPort, SiteRecord};
    use meshfed_catalog::{Revision, ServiceName};
    use meshfed_identity::TrustDomain;
    use std::collections::BTreeMap;

    #[test]
    fn plans_wait_in_proportion_to_their_cost() {
        let ms = Duration::from_millis;
        for (took, want) in [
            (Duration::ZERO, Duration::ZERO),
            (ms(1), ms(4)),
            (ms(60), ms(240)),
            (ms(400), APPLY_WAIT_MAX),
        ] {
            assert_eq!(apply_wait(took), want, "{took:?}");
        }
        for (took, want) in [
            (ms(1), ms(4)),
            (ms(300), ms(1200)),
            (ms(2000), CACHE_WAIT_MAX),
        ] {
            assert_eq!(cache_wait(took), want, "{took:?}");
        }
    }

    fn site(name: &str) -> Change {
        Change::PutSite(SiteRecord {
            site: name.parse().unwrap(),
            trust_domain: TrustDomain::new(&format!("{name}.example.org")).unwrap(),
            gateway_addresses: vec!["127.0.0.1:4433".into()],
            up: true,
        })
    }

    fn export(site: &str, svc: &str, ready: u32) -> Change {
        Change::PutExport {
            site: site.parse().unwrap(),
            export: CatalogExport {
                endpoint_labels: Vec::new(),
                http_policy: None,
                service: svc.parse().unwrap(),
                ports: vec![ExportedPort {
                    app_protocol: Default::default(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    name: None,
                }],
                ready_endpoints: ready,
                identities: vec![],
                locality: None,
                labels: BTreeMap::new(),
                hosts: vec![],
            },
        }
    }

    fn event(snapshot: bool, revision: u64, changes: &[(u64, Change)]) -> pb::WatchEvent {
        pb::WatchEvent {
            more: false,
            snapshot,
            revision,
            changes: changes
                .iter()
                .map(|(r, c)| change_to_pb(Revision(*r), c))
                .collect(),
        }
    }

    fn ready(c: &Catalog, site: &str, svc: &str) -> Option<u32> {
        let svc: ServiceName = svc.parse().unwrap();
        c.exports
            .get(&(site.parse::<SiteName>().unwrap(), svc))
            .map(|e| e.ready_endpoints)
    }

    #[test]
    fn a_snapshot_replaces_the_catalog_and_deltas_extend_it() {
        let mut c = Catalog::default();
        apply_event(
            &mut c,
            &mut Touched::default(),
            event(
                true,
                7,
                &[(0, site("east")), (0, export("east", "orders.shop", 2))],
            ),
        )
        .unwrap();
        assert_eq!(c.revision, Revision(7));
        assert_eq!(ready(&c, "east", "orders.shop"), Some(2));

        apply_event(
            &mut c,
            &mut Touched::default(),
            event(false, 8, &[(8, export("east", "orders.shop", 5))]),
        )
        .unwrap();
        assert_eq!(ready(&c, "east", "orders.shop"), Some(5));

        // A resumed watch repeats what was applied: skipped by revision, not re-applied.
        apply_event(
            &mut c,
            &mut Touched::default(),
            event(
                false,
                9,
                &[
                    (8, export("east", "orders.shop", 1)),
                    (9, export("east", "billing.shop", 3)),
                ],
            ),
        )
        .unwrap();
        assert_eq!(ready(&c, "east", "orders.shop"), Some(5));
        assert_eq!(ready(&c, "east", "billing.shop"), Some(3));

        // A new snapshot drops what it does not list.
        apply_event(
            &mut c,
            &mut Touched::default(),
            event(true, 20, &[(0, site("west"))]),
        )
        .unwrap();
        assert_eq!(ready(&c, "east", "orders.shop"), None);
        assert_eq!(c.revision, Revision(20));
    }

    #[test]
    fn a_bad_change_is_an_error_naming_it_and_keeps_the_catalog() {
        let mut c = Catalog::default();
        apply_event(
            &mut c,
            &mut Touched::default(),
            event(true, 3, &[(0, site("east"))]),
        )
        .unwrap();
        let before = c.clone();
        let mut bad = event(true, 4, &[(0, site("west"))]);
        if let Some(pb::change::Op::PutSite(s)) = &mut bad.changes[0].op {
            s.trust_domain = "Not A Trust Domain".into();
        }
        let e = apply_event(&mut c, &mut Touched::default(), bad).unwrap_err();
        assert!(matches!(e, SessionError::Change(_)), "{e:?}");
        assert!(e.to_string().contains("trust_domain"), "{e}");
        assert_eq!(c, before, "a refused snapshot leaves the catalog as it was");
    }

    #[test]
    fn an_unreadable_policy_keeps_the_one_in_force_and_the_catalog_moves_on() {
        use meshfed_catalog::http_route::{Destination, HttpPolicy, HttpRoute};
        let policy = HttpPolicy {
            max_requests: Some(7),
            ..HttpPolicy::new(
                "orders.shop".parse().unwrap(),
                "VirtualService shop/orders".into(),
                vec![HttpRoute {
                    destinations: vec![Destination::all()],
                    ..Default::default()
                }],
            )
        };
        let with_policy = |ready| {
            let mut c = export("east", "orders.shop", ready);
            if let Change::PutExport { export, .. } = &mut c {
                export.http_policy = Some(Box::new(policy.clone()));
            }
            c
        };
        // A newer site's policy: a field this gateway does not know.
        let newer = |ev: &mut pb::WatchEvent| {
            if let Some(pb::change::Op::PutExport(pb::SiteExport {
                export: Some(x), ..
            })) = &mut ev.changes[0].op
            {
                x.http_policy = x.http_policy.replacen('{', "{\"from_the_future\":1,", 1);
            }
        };
        let policy_of = |c: &Catalog| {
            c.exports
                .get(&("east".parse().unwrap(), "orders.shop".parse().unwrap()))
                .and_then(|e| e.http_policy.as_ref().and_then(|p| p.max_requests))
        };
        let mut c = Catalog::default();
        apply_event(
            &mut c,
            &mut Touched::default(),
            event(true, 3, &[(0, site("east")), (0, with_policy(2))]),
        )
        .unwrap();
        assert_eq!(policy_of(&c), Some(7));

        // A delta: the export applies (5 ready), the policy in force stays, reported.
        let mut ev = event(false, 4, &[(4, with_policy(5))]);
        newer(&mut ev);
        let bad = apply_event(&mut c, &mut Touched::default(), ev).unwrap();
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0]
                .error
                .field
                .starts_with("put_export.export.http_policy"),
            "{bad:?}"
        );
        assert_eq!(
            (ready(&c, "east", "orders.shop"), policy_of(&c)),
            (Some(5), Some(7))
        );
        assert_eq!(c.revision, Revision(4));

        // A snapshot: the same, from the catalog it replaces.
        let mut ev = event(true, 9, &[(0, with_policy(6)), (0, site("east"))]);
        ev.changes.swap(0, 1);
        if let Some(pb::change::Op::PutExport(pb::SiteExport {
            export: Some(x), ..
        })) = &mut ev.changes[1].op
        {
            x.http_policy = x.http_policy.replacen('{', "{\"from_the_future\":1,", 1);
        }
        let bad = apply_event(&mut c, &mut Touched::default(), ev).unwrap();
        assert_eq!(bad.len(), 1);
        assert_eq!(
            (ready(&c, "east", "orders.shop"), policy_of(&c)),
            (Some(6), Some(7))
        );

        // A new export with an unreadable policy: served without one.
        let mut billing = export("east", "billing.shop", 1);
        if let Change::PutExport { export, .. } = &mut billing {
            let mut p = policy.clone();
            p.service = "billing.shop".parse().unwrap();
            export.http_policy = Some(Box::new(p));
        }
        let mut ev = event(false, 10, &[(10, billing)]);
        newer(&mut ev);
        assert_eq!(
            apply_event(&mut c, &mut Touched::default(), ev)
                .unwrap()
                .len(),
            1
        );
        let billing = c
            .exports
            .get(&("east".parse().unwrap(), "billing.shop".parse().unwrap()))
            .unwrap();
        assert_eq!(
            (billing.ready_endpoints, billing.http_policy.is_none()),
            (1, true)
        );

        // Anything else unreadable still fails the event and keeps the catalog.
        let before = c.clone();
        let mut ev = event(false, 11, &[(11, with_policy(1))]);
        if let Some(pb::change::Op::PutExport(pb::SiteExport {
            export: Some(x), ..
        })) = &mut ev.changes[0].op
        {
            x.service = "Not A Service".into();
        }
        assert!(apply_event(&mut c, &mut Touched::default(), ev).is_err());
        assert_eq!(c, before);
    }

    #[test]
    fn an_export_publishes_its_ports_names_and_most_ready_port() {
        let e = Export {
            endpoint_labels: Default::default(),
            http_policy: None,
            app_protocols: Default::default(),
            service: "dns.ops".parse().unwrap(),
            ports: [(53, vec!["10.0.0.1:53".parse().unwrap()])].into(),
            udp_ports: [(
                53,
                vec![
                    "10.0.0.1:53".parse().unwrap(),
                    "10.0.0.2:53".parse().unwrap(),
                ],
            )]
            .into(),
            allowed_peers: None,
            hosts: vec!["ns.example".into()],
            tls: None,
            port_names: [((Protocol::Udp, 53), "dns".to_string())].into(),
            identities: vec![],
            proxy_protocol: false,
        };
        let site_labels = BTreeMap::from([("topology.istio.io/network".to_string(), "dc1".into())]);
        let p = export_to_pb(&e, (Some("eu-west/a"), &site_labels));
        assert_eq!(p.service, "dns.ops");
        assert_eq!(p.locality, "eu-west/a", "the site's locality goes with it");
        assert_eq!(
            p.labels,
            std::collections::HashMap::from([(
                "topology.istio.io/network".to_string(),
                "dc1".into()
            )]),
            "and its labels"
        );
        assert_eq!(p.ready_endpoints, 2, "the port with the most endpoints");
        let ports: Vec<(u32, &str, &str)> = p
            .ports
            .iter()
            .map(|x| (x.port, x.protocol.as_str(), x.name.as_str()))
            .collect();
        assert_eq!(ports, vec![(53, "tcp", ""), (53, "udp", "dns")]);
        assert_eq!(p.hosts, vec!["ns.example".to_string()]);
        assert!(p.endpoint_labels.is_empty(), "no labels: no sets");

        // Label sets count endpoint IPs (over every port); unlabelled endpoints are a
        // set of their own, and invalid labels are not published.
        let l = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut e = e;
        e.ports.insert(
            80,
            vec![
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.3:80".parse().unwrap(),
                "10.0.0.4:80".parse().unwrap(),
            ],
        );
        e.endpoint_labels = [
            ("10.0.0.1:53".parse().unwrap(), l(&[("version", "v1")])),
            ("10.0.0.1:80".parse().unwrap(), l(&[("version", "v1")])),
            ("10.0.0.3:80".parse().unwrap(), l(&[("version", "v1")])),
            ("10.0.0.2:53".parse().unwrap(), l(&[("version", "v 2")])),
        ]
        .into();
        let sets: Vec<(BTreeMap<String, String>, u32)> = endpoint_label_sets(&e)
            .into_iter()
            .map(|s| (s.labels.into_iter().collect(), s.endpoints))
            .collect();
        assert_eq!(sets, vec![(l(&[]), 1), (l(&[("version", "v1")]), 2)]);
    }
}

/// How often the agent looks at its links for `ReportLinks`.
const LINK_CHECK: Duration = Duration::from_secs(2);
/// Watch events applied to the catalog before its plan is applied, at the most (those
/// already received; a burst is bounded so the plan never lags far behind).
const MAX_COALESCED: usize = 256;
/// The longest wait between catalog changes and their plan (see [`apply_wait`]).
const APPLY_WAIT_MAX: Duration = Duration::from_secs(1);

/// The pause after applying a plan that took `took`, before the next: 4× its cost, at
/// most [`APPLY_WAIT_MAX`] ([`meshfed_lifecycle::pause_after`]). An apply re-plans and
/// re-binds only what changed, so it usually costs little; a whole one (the first, or
/// after a snapshot: 1.0–1.3 s with 100,000 services on the bench host, bench/catalog
/// --scale) is followed by a 1 s pause, so a stream of changes never keeps the gateway
/// applying back to back, and imports never lag far behind. Pure.
fn apply_wait(took: Duration) -> Duration {
    meshfed_lifecycle::pause_after(took, APPLY_WAIT_MAX)
}

/// The longest the catalog cache may lag the applied catalog (see [`cache_wait`]).
const CACHE_WAIT_MAX: Duration = Duration::from_secs(5);

/// The pause after writing the catalog cache that took `took` (serialized, synced and
/// renamed: 0.2 s and more with 100,000 services), before the next write: 4× its cost,
/// at most [`CACHE_WAIT_MAX`]. Applies in between leave it pending; it is written when
/// the pause ends, and at once when the session with the federation ends (the cache is
/// what the gateway serves from without one). A small catalog's cache is still written
/// with every apply. Pure.
fn cache_wait(took: Duration) -> Duration {
    meshfed_lifecycle::pause_after(took, CACHE_WAIT_MAX)
}

/// A report is sent at least this often, changed or not (the federation forgets a
/// replica's links 75 s after its last report).
const LINK_REFRESH: Duration = Duration::from_secs(30);

/// When the catalog's next plan may be applied ([`apply_wait`]), and its cache next
/// written ([`cache_wait`]).
struct Pace {
    next: tokio::time::Instant,
    /// The catalog has changes its cache does not have yet.
    cache_pending: bool,
    cache_next: tokio::time::Instant,
    /// The cache write in progress, and what the last one cost.
    writing: Option<std::thread::JoinHandle<Duration>>,
    cache_cost: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        let now = tokio::time::Instant::now();
        Self {
            next: now,
            cache_pending: false,
            cache_next: now,
            writing: None,
            cache_cost: Duration::ZERO,
        }
    }
}

/// Reports this replica's peer links to the federation when they change.
#[derive(Default)]
struct LinkReporter {
    last: Option<(Vec<pb::PeerLink>, Vec<pb::SiteTraffic>, std::time::Instant)>,
    /// The last report carried new traffic: the next one goes out even unchanged, so
    /// the federation sees the rate fall to zero when traffic stops.
    moving: bool,
}

impl LinkReporter {
    async fn maybe_report(
        &mut self,
        client: &mut pb::federation_client::FederationClient<tonic::transport::Channel>,
        peers: &crate::peers::Peers,
        metrics: &crate::metrics::Metrics,
        advertise: &str,
        inbound: bool,
    ) {
        let links: Vec<pb::PeerLink> = peers
            .link_status()
            .into_iter()
            .map(|l| pb::PeerLink {
                peer_site: l.site.to_string(),
                address: l.addr.to_string(),
                transport: l
                    .transport
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
                reason: l.why,
                replica: String::new(),
            })
            .collect();
        let traffic: Vec<pb::SiteTraffic> = metrics
            .service
            .egress_by_site()
            .into_iter()
            .map(|(site, t)| pb::SiteTraffic {
                peer_site: site,
                sent_bytes: t.sent_bytes,
                received_bytes: t.received_bytes,
                refusals: t.refusals.into_iter().collect(),
            })
            .collect();
        let mut moving = true;
        if let Some((last, last_traffic, at)) = &self.last {
            moving = *last_traffic != traffic;
            if *last == links && !moving && !self.moving && at.elapsed() < LINK_REFRESH {
                return;
            }
        }
        let req = pb::LinksReport {
            replica: if inbound {
                advertise.to_owned()
            } else {
                String::new()
            },
            links: links.clone(),
            traffic: traffic.clone(),
        };
        // A federation that predates ReportLinks answers Unimplemented: status lacks the
        // links, nothing else changes.
        match tokio::time::timeout(Duration::from_secs(5), client.report_links(req)).await {
            Ok(Ok(_)) => {
                self.last = Some((links, traffic, std::time::Instant::now()));
                self.moving = moving;
            }
            Ok(Err(e)) => debug!(error = %e, "link report not taken"),
            Err(_) => debug!("link report timed out"),
        }
    }
}
