//! The federation service over either store: tokens, join, publish with authorization,
//! revisioned watches, bundle distribution and site liveness.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use meshfed_identity::{SpiffeId, TrustBundle, TrustDomain};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{broadcast, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::store::{Store, StoreError, StoreEvent, WatchStart};
use crate::transport::PeerInfo;
use meshfed_api::{self, Refusal, pb};
use meshfed_catalog::catalog::{Catalog, Change, Revision, SiteRecord};
use meshfed_catalog::names::SiteName;
use meshfed_catalog::token::{JoinToken, TokenError};

/// Longest token lifetime accepted.
pub const MAX_TOKEN_TTL_SECS: u64 = 7 * 24 * 3600;

pub struct FederationService {
    pub store: Store,
    pub trust_domain: TrustDomain,
    /// The federation's own bundle (JWKS) and its fingerprint, as tokens pin it.
    pub own_bundle: TrustBundle,
    /// Addresses written into tokens.
    pub addresses: Vec<String>,
    /// Refusals by stable reason, for logs and metrics.
    pub metrics: Metrics,
    bundles: watch::Sender<BTreeMap<String, String>>,
    /// Trust bundles as the TLS layer uses them; updated on join.
    pub tls_bundles: Arc<arc_swap::ArcSwap<meshfed_identity::BundleSet>>,
    pub leases: Arc<Leases>,
    /// The site's gateway replicas' addresses (active-active).
    pub replicas: Arc<crate::replicas::Replicas>,
    /// Newest revision delivered to each site's Watch streams.
    seen: Seen,
    /// Each gateway replica's links to its peers, as last reported.
    links: crate::links::LinkReports,
    /// Foreign trust domains (`--federates-with`): their bundles are fetched from their
    /// endpoints, and no site may join with one of them.
    foreign: arc_swap::ArcSwap<std::collections::BTreeSet<TrustDomain>>,
    /// Cancelled when the replica starts to drain: its Watch and Bundles streams end
    /// (`draining`), so the server's graceful shutdown does not wait on streams that
    /// never end by themselves.
    pub draining: tokio_util::sync::CancellationToken,
}

/// Per-site newest revision delivered.
pub type Seen = Arc<std::sync::Mutex<BTreeMap<SiteName, u64>>>;

fn mark_seen(seen: &Seen, site: &SiteName, rev: u64) {
    let mut m = seen.lock().unwrap_or_else(|e| e.into_inner());
    let e = m.entry(site.clone()).or_default();
    *e = (*e).max(rev);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    pub site: String,
}

/// Per-site gauges read from the store at each scrape (so a site that left leaves no
/// stale series): `site_up` (its lease), `site_revision_lag` (revisions its watch streams
/// have not been sent yet), and `revision`.
pub struct SiteCollector {
    store: Store,
    seen: Seen,
}

impl std::fmt::Debug for SiteCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteCollector").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for SiteCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let (revision, sites) = self.store.with_catalog(|c| {
            let sites: Vec<(String, bool)> = c
                .sites
                .values()
                .map(|r| (r.site.to_string(), r.up))
                .collect();
            (c.revision.0, sites)
        });
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let rev = ConstGauge::new(i64::try_from(revision).unwrap_or(i64::MAX));
        rev.encode(encoder.encode_descriptor(
            "revision",
            "The catalog's newest revision",
            None,
            rev.metric_type(),
        )?)?;
        {
            let mut up = encoder.encode_descriptor(
                "site_up",
                "1 while the site holds its lease, 0 once it expired (one series per member site)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (site, is_up) in &sites {
                ConstGauge::new(i64::from(*is_up))
                    .encode(up.encode_family(&SiteLabels { site: site.clone() })?)?;
            }
        }
        let mut lag = encoder.encode_descriptor(
            "site_revision_lag",
            "Catalog revisions not yet delivered to the site's watch streams (the whole revision when it never watched)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (site, _) in &sites {
            let delivered = SiteName::new(site)
                .ok()
                .and_then(|s| seen.get(&s).copied())
                .unwrap_or(0);
            ConstGauge::new(i64::try_from(revision.saturating_sub(delivered)).unwrap_or(i64::MAX))
                .encode(lag.encode_family(&SiteLabels { site: site.clone() })?)?;
        }
        Ok(())
    }
}

/// The federation's metrics, registered under `meshfed_federation`.
#[derive(Clone, Default)]
pub struct Metrics {
    pub refusals: Family<ReasonLabels, Counter>,
    /// Connections closed before any call, by reason (`handshake_limit`,
    /// `anonymous_limit`, `identity_connection_limit`: [`crate::transport::incoming`]).
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub joins: Counter,
    pub publishes: Counter,
    pub watchers: Gauge,
    /// Foreign bundle fetches, by trust domain and result (`ok`, `unchanged`, or the
    /// stable reason): one series per configured relationship and reason.
    pub foreign_refreshes: Family<ForeignLabels, Counter>,
    /// The `spiffe_sequence` of each foreign trust domain's stored bundle.
    pub foreign_sequence: Family<TrustDomainLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForeignLabels {
    pub trust_domain: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabels {
    pub trust_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

impl Metrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("meshfed_federation");
        r.register(
            "refusals",
            "Requests refused, by stable reason code",
            self.refusals.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed before any call, by reason (handshake_limit, anonymous_limit, identity_connection_limit)",
            self.connections_refused.clone(),
        );
        r.register("joins", "Sites joined", self.joins.clone());
        r.register(
            "publishes",
            "Publish calls accepted",
            self.publishes.clone(),
        );
        r.register("watchers", "Open Watch streams", self.watchers.clone());
        r.register(
            "foreign_bundle_refreshes",
            "Fetches of foreign trust domains' bundles (--federates-with), by result",
            self.foreign_refreshes.clone(),
        );
        r.register(
            "foreign_bundle_sequence",
            "spiffe_sequence of each foreign trust domain's stored bundle",
            self.foreign_sequence.clone(),
        );
    }
}

/// Services whose exporting sites publish different HTTP routes, as every importing
/// gateway resolves them (`routing::merge_policies`: the first site by name applies).
/// Pure.
pub fn policy_conflicts(cat: &Catalog) -> Vec<String> {
    let mut by_service: BTreeMap<
        &meshfed_catalog::ServiceName,
        Vec<(&SiteName, &meshfed_catalog::http_route::HttpPolicy)>,
    > = BTreeMap::new();
    // The catalog's key order is (site, service): each service's list is in site order.
    for ((site, service), export) in &cat.exports {
        if let Some(p) = &export.http_policy {
            by_service.entry(service).or_default().push((site, p));
        }
    }
    by_service
        .values()
        .filter_map(|v| meshfed_catalog::routing::merge_policies(v).1)
        .collect()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A refusal before it is counted and logged.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    pub message: String,
}

impl Refused {
    pub fn new(refusal: Refusal, message: impl Into<String>) -> Self {
        Self {
            refusal,
            message: message.into(),
        }
    }
}

fn store_status(e: StoreError) -> Refused {
    match e {
        StoreError::Token(t) => token_status(&t),
        StoreError::Catalog(c) => Refused::new(Refusal::CatalogConflict, c.to_string()),
        StoreError::Etcd { .. } => Refused::new(Refusal::StoreUnavailable, e.to_string()),
        StoreError::Closed => Refused::new(Refusal::Draining, e.to_string()),
        other => Refused::new(Refusal::StoreError, other.to_string()),
    }
}

fn token_status(t: &TokenError) -> Refused {
    Refused::new(Refusal::of_token(t), t.to_string())
}

/// The operator identity of the federation of trust domain `td`.
pub fn operator_id(td: &TrustDomain) -> SpiffeId {
    td.child(&["meshfed", "admin"])
        .expect("a constant valid path")
}

/// Who may create tokens and read status: only the federation's operator SVID. Pure.
pub fn authorize_operator(caller: Option<&SpiffeId>, td: &TrustDomain) -> Result<(), Refused> {
    let id = caller
        .ok_or_else(|| Refused::new(Refusal::Unauthenticated, "this call needs a client SVID"))?;
    let operator = operator_id(td);
    if *id != operator {
        return Err(Refused::new(
            Refusal::NotOperator,
            format!("{id} is not the operator identity {operator}"),
        ));
    }
    Ok(())
}

/// The site a caller speaks for: a gateway SVID `/meshfed/site/<s>/gateway` of site `s`,
/// which has joined, in the trust domain `s` registered at join. Pure: `site` looks a
/// site's record up.
pub fn authorize_site(
    caller: Option<&SpiffeId>,
    site: impl FnOnce(&SiteName) -> Option<SiteRecord>,
) -> Result<SiteRecord, Refused> {
    let id = caller
        .ok_or_else(|| Refused::new(Refusal::Unauthenticated, "this call needs a client SVID"))?;
    let name = id
        .gateway_site()
        .and_then(|s| SiteName::new(s).ok())
        .ok_or_else(|| {
            Refused::new(
                Refusal::NotAGateway,
                format!("{id} is not a meshfed gateway ID"),
            )
        })?;
    let rec = site(&name)
        .ok_or_else(|| Refused::new(Refusal::UnknownSite, format!("site {name} has not joined")))?;
    if rec.trust_domain.as_str() != id.trust_domain_str() {
        return Err(Refused::new(
            Refusal::PublishForeignSite,
            format!(
                "{id} is not in site {name}'s trust domain {}",
                rec.trust_domain
            ),
        ));
    }
    Ok(rec)
}

impl FederationService {
    /// The per-site gauges read at each scrape ([`SiteCollector`]).
    pub fn site_collector(&self) -> SiteCollector {
        SiteCollector {
            store: self.store.clone(),
            seen: self.seen.clone(),
        }
    }

    /// `/topology.json` on the admin port ([`crate::topology`]).
    pub fn topology(&self) -> String {
        let now = std::time::Instant::now();
        let v = self
            .store
            .with_catalog(|c| crate::topology::snapshot(c, &self.links, now));
        v.to_string()
    }

    /// Builds the service and stores the federation's own bundle. On etcd it also starts
    /// following bundle changes made by other replicas.
    pub async fn new(
        store: Store,
        trust_domain: TrustDomain,
        own_bundle: TrustBundle,
        addresses: Vec<String>,
        tls_bundles: Arc<arc_swap::ArcSwap<meshfed_identity::BundleSet>>,
        lease_ttl: std::time::Duration,
    ) -> Result<Arc<Self>, StoreError> {
        if let Ok(j) = own_bundle.to_jwks() {
            store.set_bundle(trust_domain.as_str(), j).await?;
        }
        let this = Arc::new(Self {
            leases: Leases::new(store.clone(), lease_ttl),
            replicas: crate::replicas::Replicas::new(store.clone(), lease_ttl),
            bundles: watch::channel(store.bundles()).0,
            store,
            trust_domain,
            own_bundle,
            addresses,
            metrics: Metrics::default(),
            tls_bundles,
            seen: Seen::default(),
            links: Default::default(),
            foreign: Default::default(),
            draining: Default::default(),
        });
        this.publish_bundles();
        let mut changed = this.store.subscribe_bundles();
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                let Some(this) = weak.upgrade() else { return };
                this.publish_bundles();
            }
        });
        Ok(this)
    }

    /// The addresses written into tokens and sent on the Bundles stream: every live
    /// replica's on etcd.
    fn token_addresses(&self) -> Vec<String> {
        live_addresses(&self.store, &self.addresses)
    }

    /// Counts and logs a refusal by its stable reason, and turns it into a typed status.
    fn refuse(&self, r: Refused) -> Status {
        let reason = r.refusal.code();
        self.metrics
            .refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
        warn!(reason, message = %r.message, "request refused");
        r.refusal.status(r.message)
    }

    /// A `bad_request` refusal (InvalidArgument) naming what was wrong.
    fn bad_request(&self, message: impl Into<String>) -> Status {
        self.refuse(Refused::new(Refusal::BadRequest, message))
    }

    /// The verified client SVID of a call, if any.
    fn caller_id<T>(req: &Request<T>) -> Option<SpiffeId> {
        req.extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.id.clone())
    }

    /// Only the federation's operator identity passes.
    fn operator<T>(&self, req: &Request<T>) -> Result<(), Status> {
        authorize_operator(Self::caller_id(req).as_ref(), &self.trust_domain)
            .map_err(|r| self.refuse(r))
    }

    /// The site a gateway SVID speaks for, checked against the site's registered trust
    /// domain.
    fn caller_site<T>(&self, req: &Request<T>) -> Result<SiteRecord, Status> {
        authorize_site(Self::caller_id(req).as_ref(), |s| self.store.site(s))
            .map_err(|r| self.refuse(r))
    }

    /// Deletes a site and its exports, and withdraws its trust domain's bundle when no
    /// other site shares it: every site's Bundles stream then drops it, and gateways
    /// close their connections from that trust domain.
    async fn remove(&self, rec: &SiteRecord) -> Result<u64, Status> {
        self.links.remove(&rec.site);
        let rev = self
            .store
            .commit(vec![Change::DeleteSite {
                site: rec.site.clone(),
            }])
            .await
            .map_err(|e| self.refuse(store_status(e)))?;
        let shared = self.store.with_catalog(|c| {
            c.sites
                .values()
                .any(|s| s.trust_domain == rec.trust_domain && s.site != rec.site)
        });
        if shared {
            warn!(site = %rec.site, trust_domain = %rec.trust_domain, "trust domain shared with other sites: its bundle stays");
        } else {
            self.store
                .remove_bundle(rec.trust_domain.as_str())
                .await
                .map_err(|e| self.refuse(store_status(e)))?;
        }
        self.bundles_changed()
            .map_err(|e| self.refuse(store_status(e)))?;
        Ok(rev.0)
    }

    /// Declares the foreign trust domains. Refused when one is the federation's own or
    /// a member site's.
    pub fn set_foreign(&self, tds: std::collections::BTreeSet<TrustDomain>) -> Result<(), String> {
        if tds.contains(&self.trust_domain) {
            return Err(format!(
                "{} is this federation's own trust domain",
                self.trust_domain
            ));
        }
        let members: Vec<(TrustDomain, SiteName)> = self.store.with_catalog(|c| {
            c.sites
                .values()
                .filter(|s| tds.contains(&s.trust_domain))
                .map(|s| (s.trust_domain.clone(), s.site.clone()))
                .collect()
        });
        if let Some((td, site)) = members.first() {
            return Err(format!("{td} is the trust domain of member site {site}"));
        }
        self.foreign.store(Arc::new(tds));
        Ok(())
    }

    /// Every bundle a member owns (the federation's own and its sites'), without the
    /// foreign ones it only relays to its sites: what its bundle endpoint serves.
    pub fn member_bundles(&self) -> BTreeMap<String, String> {
        let mut b = self.store.bundles();
        for td in self.foreign.load().iter() {
            b.remove(td.as_str());
        }
        b
    }

    /// The bundle stored for `td`, if any.
    pub fn stored_bundle(&self, td: &TrustDomain) -> Option<TrustBundle> {
        let jwks = self.store.bundles().get(td.as_str())?.clone();
        TrustBundle::from_jwks(td.clone(), jwks.as_bytes()).ok()
    }

    /// Stores a foreign trust domain's fetched bundle when [`crate::foreign::judge`]
    /// says so, and hands it to every site.
    pub async fn store_foreign_bundle(
        &self,
        fetched: &TrustBundle,
    ) -> Result<crate::foreign::Verdict, StoreError> {
        use crate::foreign::{Verdict, judge};
        let td = &fetched.trust_domain;
        let stored = self.stored_bundle(td);
        let verdict = judge(stored.as_ref(), fetched);
        if verdict == Verdict::Store {
            let Ok(jwks) = fetched.to_jwks() else {
                return Ok(Verdict::Refuse("bad_bundle"));
            };
            self.store.set_bundle(td.as_str(), jwks).await?;
            self.bundles_changed()?;
        }
        if let Some(b) = self.stored_bundle(td) {
            self.metrics
                .foreign_sequence
                .get_or_create(&TrustDomainLabels {
                    trust_domain: td.to_string(),
                })
                .set(i64::try_from(b.sequence).unwrap_or(i64::MAX));
        }
        Ok(verdict)
    }

    /// After a bundle write: makes it durable, then hands it to the TLS layer and to
    /// every site's Bundles stream.
    fn bundles_changed(&self) -> Result<(), StoreError> {
        self.store.flush()?;
        self.publish_bundles();
        Ok(())
    }

    fn publish_bundles(&self) {
        let bundles = self.store.bundles();
        let mut set = meshfed_identity::BundleSet::new();
        for (td, jwks) in &bundles {
            if let Ok(td) = TrustDomain::new(td)
                && let Ok(b) = TrustBundle::from_jwks(td, jwks.as_bytes())
            {
                set.insert(b);
            }
        }
        self.tls_bundles.store(Arc::new(set));
        self.bundles.send_replace(bundles);
    }
}

/// Site liveness. A site holds its lease while one of its gateways keeps a Watch
/// stream open; `ttl` after its last stream closes (or after it joined, or after the
/// federation started, for a site that never connects) it is marked down and the catalog
/// says so, so every other site stops sending it traffic. Its next Watch or Publish marks
/// it up again.
///
/// On the embedded store the clock runs here. On etcd the lease is an etcd lease on an
/// `alive/<site>/<replica>` key, renewed while this replica holds a stream of the site;
/// a replica that dies stops renewing, and every replica's mirror sees the key go.
pub struct Leases {
    store: Store,
    ttl: std::time::Duration,
    sites: std::sync::Mutex<BTreeMap<SiteName, LeaseState>>,
}

#[derive(Clone, Default)]
pub struct LeaseState {
    /// Open Watch streams of the site on this node.
    pub streams: usize,
    epoch: u64,
    /// etcd: renews the site's alive key while set.
    hold: Option<tokio_util::sync::CancellationToken>,
}

impl Leases {
    pub fn new(store: Store, ttl: std::time::Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            ttl,
            sites: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SiteName, LeaseState>> {
        self.sites.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open streams per site on this node.
    pub fn streams(&self) -> BTreeMap<SiteName, usize> {
        self.lock()
            .iter()
            .map(|(s, l)| (s.clone(), l.streams))
            .collect()
    }

    /// Starts the expiry clock for every site known at start (embedded; etcd's leases
    /// outlive any one replica).
    pub fn start(self: &Arc<Self>) {
        if let Store::Embedded(_) = self.store {
            let sites: Vec<SiteName> = self
                .store
                .with_catalog(|c| c.sites.keys().cloned().collect());
            for site in &sites {
                self.arm_embedded(site);
            }
        }
    }

    /// The site showed life with no stream (it joined, or published): it stays up for
    /// one `ttl` unless a stream takes over.
    pub async fn arm(self: &Arc<Self>, site: &SiteName) -> Result<(), StoreError> {
        match &self.store {
            Store::Embedded(_) => {
                self.arm_embedded(site);
                self.set_up(site, true).await;
                Ok(())
            }
            Store::Etcd(s) => {
                if self.lock().get(site).is_some_and(|l| l.streams > 0) {
                    return Ok(());
                }
                s.arm_site(site, self.ttl).await
            }
        }
    }

    fn arm_embedded(self: &Arc<Self>, site: &SiteName) {
        let epoch = {
            let mut m = self.lock();
            let e = m.entry(site.clone()).or_default();
            if e.streams > 0 {
                return;
            }
            e.epoch += 1;
            e.epoch
        };
        self.expire_later(site.clone(), epoch);
    }

    /// A stream of `site` opened: the site is alive while the guard lives.
    async fn acquire(self: &Arc<Self>, site: &SiteName) -> LeaseGuard {
        let first = {
            let mut m = self.lock();
            let e = m.entry(site.clone()).or_default();
            e.streams += 1;
            e.epoch += 1;
            if e.streams == 1
                && let Store::Etcd(s) = &self.store
            {
                if let Some(old) = e.hold.take() {
                    old.cancel();
                }
                e.hold = Some(s.hold_site(site, self.ttl));
            }
            e.streams == 1
        };
        if first && let Store::Embedded(_) = self.store {
            self.set_up(site, true).await;
        }
        LeaseGuard {
            leases: self.clone(),
            site: site.clone(),
        }
    }

    fn release(self: &Arc<Self>, site: &SiteName) {
        let epoch = {
            let mut m = self.lock();
            let Some(e) = m.get_mut(site) else { return };
            e.streams = e.streams.saturating_sub(1);
            if e.streams > 0 {
                return;
            }
            if let Some(hold) = e.hold.take() {
                // etcd: stop renewing; the lease runs out after its TTL.
                hold.cancel();
                return;
            }
            e.epoch += 1;
            e.epoch
        };
        self.expire_later(site.clone(), epoch);
    }

    fn expire_later(self: &Arc<Self>, site: SiteName, epoch: u64) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.ttl).await;
            let still_gone = this
                .lock()
                .get(&site)
                .is_some_and(|e| e.streams == 0 && e.epoch == epoch);
            if still_gone {
                warn!(%site, ttl = ?this.ttl, "lease expired: site marked down");
                this.set_up(&site, false).await;
            }
        });
    }

    /// Commits the site's liveness if it changed (embedded store).
    async fn set_up(&self, site: &SiteName, up: bool) {
        let Some(rec) = self.store.site(site) else {
            return;
        };
        if rec.up == up {
            return;
        }
        if let Err(e) = self
            .store
            .commit(vec![Change::PutSite(SiteRecord { up, ..rec })])
            .await
        {
            warn!(%site, error = %e, "liveness not recorded");
        } else if up {
            info!(%site, "site is up");
        }
    }
}

/// Holds a site's lease for as long as its Watch stream lives.
pub struct LeaseGuard {
    leases: Arc<Leases>,
    site: SiteName,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.leases.release(&self.site);
    }
}

/// Decrements the open-watchers gauge when a Watch stream ends.
pub struct WatcherGuard(
    Gauge,
    #[allow(dead_code)] LeaseGuard,
    #[allow(dead_code)] Option<crate::replicas::ReplicaGuard>,
);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchFrame, Status>> + Send>>;
type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::BundleSet, Status>> + Send>>;

fn snapshot_event(cat: &meshfed_catalog::Catalog) -> pb::WatchFrame {
    pb::WatchFrame {
        more: false,
        snapshot: true,
        revision: cat.revision.0,
        changes: cat
            .as_changes()
            .iter()
            .map(|c| meshfed_api::change_to_wire(Revision(0), c))
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.operator(&req)?;
        let r = req.into_inner();
        let site = SiteName::new(&r.site).map_err(|e| self.bad_request(format!("site: {e}")))?;
        if r.ttl_seconds == 0 || r.ttl_seconds > MAX_TOKEN_TTL_SECS {
            return Err(self.bad_request(format!("ttl_seconds must be 1..={MAX_TOKEN_TTL_SECS}")));
        }
        let bound = match r.trust_domain.as_str() {
            "" => None,
            td => Some(
                TrustDomain::new(td).map_err(|e| self.bad_request(format!("trust_domain: {e}")))?,
            ),
        };
        if r.share_trust_domain && bound.is_none() {
            return Err(self.bad_request(
                "share_trust_domain needs trust_domain: say which trust domain the site may share",
            ));
        }
        if bound.as_ref() == Some(&self.trust_domain) {
            return Err(self
                .bad_request("trust_domain: a site cannot use the federation's own trust domain"));
        }
        let token = JoinToken::generate(
            site.clone(),
            self.token_addresses(),
            self.trust_domain.clone(),
            self.own_bundle.fingerprint(),
        );
        let expires = now_unix() + r.ttl_seconds as i64;
        let rec = meshfed_catalog::token::TokenRecord {
            site: site.clone(),
            expires_unix: expires,
            used_unix: None,
            trust_domain: bound.clone(),
            share_trust_domain: r.share_trust_domain,
        };
        self.store
            .add_token(&token, rec)
            .await
            .map_err(|e| self.refuse(store_status(e)))?;
        info!(%site, expires, trust_domain = ?bound.as_ref().map(|t| t.as_str()), share = r.share_trust_domain, "join token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: token.encode(),
            expires_unix: expires,
        }))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let r = req.into_inner();
        let token = JoinToken::decode(&r.token).map_err(|e| self.refuse(token_status(&e)))?;
        let site = SiteName::new(&r.site).map_err(|e| self.bad_request(format!("site: {e}")))?;
        let td = TrustDomain::new(&r.trust_domain)
            .map_err(|e| self.bad_request(format!("trust_domain: {e}")))?;
        let bundle = TrustBundle::from_jwks(td.clone(), r.bundle_jwks.as_bytes())
            .map_err(|e| self.bad_request(format!("bundle_jwks: {e}")))?;
        if td == self.trust_domain {
            return Err(self.bad_request("a site cannot use the federation's own trust domain"));
        }
        if self.foreign.load().contains(&td) {
            return Err(self.bad_request(format!(
                "{td} is a foreign trust domain this federation federates with (--federates-with): no site may join with it"
            )));
        }
        let owners: Vec<SiteName> = self.store.with_catalog(|c| {
            c.sites
                .values()
                .filter(|s| s.trust_domain == td && s.site != site)
                .map(|s| s.site.clone())
                .collect()
        });
        let claim = meshfed_catalog::token::Claim {
            site: site.clone(),
            trust_domain: td.clone(),
            owners: owners.clone(),
        };
        self.store
            .redeem_token(&token, &claim, now_unix())
            .await
            .map_err(|e| self.refuse(store_status(e)))?;
        // A shared trust domain (the token allowed it) keeps the owners' authorities
        // beside the new site's: the union is the bundle.
        let bundle = match self.store.bundles().get(td.as_str()) {
            Some(old) if !owners.is_empty() => TrustBundle::from_jwks(td.clone(), old.as_bytes())
                .map(|old| old.union(&bundle))
                .unwrap_or(bundle),
            _ => bundle,
        };
        let jwks = bundle
            .to_jwks()
            .map_err(|e| self.bad_request(e.to_string()))?;
        self.store
            .set_bundle(td.as_str(), jwks)
            .await
            .map_err(|e| self.refuse(store_status(e)))?;
        // Up for one TTL from now: the site's gateway must start watching within it.
        self.leases
            .arm(&site)
            .await
            .map_err(|e| self.refuse(store_status(e)))?;
        let rev = self
            .store
            .commit(vec![Change::PutSite(SiteRecord {
                site: site.clone(),
                trust_domain: td.clone(),
                gateway_addresses: crate::replicas::merge(&[], &r.gateway_addresses),
                up: true,
            })])
            .await
            .map_err(|e| self.refuse(store_status(e)))?;
        self.bundles_changed()
            .map_err(|e| self.refuse(store_status(e)))?;
        self.metrics.joins.inc();
        info!(%site, trust_domain = %td, revision = rev.0, "site joined");
        Ok(Response::new(pb::JoinResponse {
            federation_trust_domain: self.trust_domain.to_string(),
            bundles: self.store.bundles().into_iter().collect(),
            revision: rev.0,
        }))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let rec = self.caller_site(&req)?;
        let r = req.into_inner();
        if r.site != rec.site.as_str() {
            return Err(self.refuse(Refused::new(
                Refusal::PublishForeignSite,
                format!(
                    "gateway of site {} may not publish for site {:?}",
                    rec.site, r.site
                ),
            )));
        }
        let exports = r
            .exports
            .into_iter()
            .enumerate()
            .map(|(i, e)| meshfed_api::export_from_pb(e, &format!("exports[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.refuse(Refused::new(Refusal::BadRequest, e.to_string())))?;
        if !rec.up {
            self.leases
                .arm(&rec.site)
                .await
                .map_err(|e| self.refuse(store_status(e)))?;
        }
        let rec = self.store.site(&rec.site).unwrap_or(rec);
        let mut changes = self
            .store
            .with_catalog(|c| c.publish_changes(&rec.site, &exports));
        // Merged, never overwriting another replica's (dead ones leave by sweep); an
        // outbound-only site has none.
        let addresses = if r.outbound_only {
            vec![]
        } else {
            crate::replicas::merge(&rec.gateway_addresses, &r.gateway_addresses)
        };
        if addresses != rec.gateway_addresses {
            changes.insert(
                0,
                Change::PutSite(SiteRecord {
                    gateway_addresses: addresses,
                    ..rec
                }),
            );
        }
        let n = changes.len() as u32;
        self.metrics.publishes.inc();
        let rev = self
            .store
            .commit(changes)
            .await
            .map_err(|e| self.refuse(store_status(e)))?;
        Ok(Response::new(pb::PublishResponse {
            revision: rev.0,
            changes: n,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<EventStream>, Status> {
        let rec = self.caller_site(&req)?;
        let lease = self.leases.acquire(&rec.site).await;
        let r = req.into_inner();
        let replica = self.replicas.open(&rec.site, &r.gateway_address).await;
        let from = r.from_revision.map(Revision);
        if let (Store::Etcd(s), Some(f)) = (&self.store, from)
            && let Err(e) = s.caught_up(f).await
        {
            // Serve what we have: a revision this replica cannot reach gets a snapshot.
            warn!(site = %rec.site, from = f.0, error = %e, "watch resumes from a revision this replica has not reached");
        }
        let (start, rx) = self.store.watch(from);
        let store = self.store.clone();
        let first = match start {
            WatchStart::Snapshot(cat) => snapshot_event(&cat),
            WatchStart::Deltas(ds) => crate::store::deltas_event(&ds, from),
        };
        self.metrics.watchers.inc();
        let guard = WatcherGuard(self.metrics.watchers.clone(), lease, replica);
        mark_seen(&self.seen, &rec.site, first.revision);
        let stream = streams::unfold(
            Some(first),
            rx,
            store,
            guard,
            (self.seen.clone(), rec.site.clone()),
            r.parts,
        );
        Ok(Response::new(Box::pin(streams::until_drained(
            stream,
            self.draining.clone(),
        ))))
    }

    type BundlesStream = BundleStream;

    async fn bundles(
        &self,
        req: Request<pb::BundlesRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        // Any verified SVID of a federated trust domain (the TLS layer checked it).
        if Self::caller_id(&req).is_none() {
            return Err(self.refuse(Refused::new(
                Refusal::Unauthenticated,
                "this call needs a client SVID",
            )));
        }
        let rx = self.bundles.subscribe();
        let (store, own) = (self.store.clone(), self.addresses.clone());
        let stream = tokio_stream::wrappers::WatchStream::new(rx)
            .map_ok_bundles(move || live_addresses(&store, &own));
        Ok(Response::new(Box::pin(streams::until_drained(
            stream,
            self.draining.clone(),
        ))))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.operator(&req)?;
        // Status is an operator call: one copy of the catalog is fine here.
        let cat = self.store.with_catalog(Catalog::clone);
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let streams = self.leases.streams();
        let sites = cat
            .sites
            .values()
            .map(|r| {
                let exports = cat
                    .exports
                    .iter()
                    .filter(|((s, _), _)| s == &r.site)
                    .flat_map(|((_, svc), e)| {
                        e.ports
                            .iter()
                            .map(move |p| port_label(&svc.to_string(), p.port, p.protocol))
                    })
                    .collect();
                let imports = meshfed_catalog::routing::plan(&cat, &r.site, None)
                    .imports
                    .iter()
                    .map(|i| port_label(&i.service.to_string(), i.port, i.protocol))
                    .collect();
                pb::SiteStatus {
                    site: r.site.to_string(),
                    trust_domain: r.trust_domain.to_string(),
                    up: r.up,
                    gateway_addresses: r.gateway_addresses.clone(),
                    exports,
                    imports,
                    last_seen_revision: seen.get(&r.site).copied().unwrap_or_default(),
                    watch_streams: streams
                        .get(&r.site)
                        .map_or(0, |n| u32::try_from(*n).unwrap_or(u32::MAX)),
                    links: self.links.for_site(&r.site, std::time::Instant::now()),
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            revision: cat.revision.0,
            sites,
            policy_conflicts: policy_conflicts(&cat),
        }))
    }

    async fn report_links(
        &self,
        req: Request<pb::LinksReport>,
    ) -> Result<Response<pb::LinksReportResponse>, Status> {
        let rec = self.caller_site(&req)?;
        let r = req.into_inner();
        self.links.report(
            &rec.site,
            &r.replica,
            r.links,
            r.traffic,
            std::time::Instant::now(),
        );
        Ok(Response::new(pb::LinksReportResponse {}))
    }

    async fn update_bundle(
        &self,
        req: Request<pb::UpdateBundleRequest>,
    ) -> Result<Response<pb::UpdateBundleResponse>, Status> {
        let rec = self.caller_site(&req)?;
        let r = req.into_inner();
        let td = rec.trust_domain.clone();
        let bundle = TrustBundle::from_jwks(td.clone(), r.bundle_jwks.as_bytes())
            .map_err(|e| self.bad_request(format!("bundle_jwks: {e}")))?;
        if bundle.x509_authorities.is_empty() {
            return Err(self.bad_request(
                "bundle_jwks: no X.509 authority: every gateway of the trust domain would be refused",
            ));
        }
        let stored = self
            .store
            .bundles()
            .get(td.as_str())
            .and_then(|j| TrustBundle::from_jwks(td.clone(), j.as_bytes()).ok())
            .map_or(0, |b| b.sequence);
        if bundle.sequence <= stored {
            return Err(self.refuse(Refused::new(
                Refusal::StaleBundle,
                format!(
                    "bundle of {td}: spiffe_sequence {} is not above the federation's {stored}",
                    bundle.sequence
                ),
            )));
        }
        let jwks = bundle
            .to_jwks()
            .map_err(|e| self.bad_request(e.to_string()))?;
        self.store
            .set_bundle(td.as_str(), jwks)
            .await
            .map_err(|e| self.refuse(store_status(e)))?;
        self.bundles_changed()
            .map_err(|e| self.refuse(store_status(e)))?;
        info!(
            site = %rec.site, trust_domain = %td, sequence = bundle.sequence,
            authorities = bundle.x509_authorities.len(), "trust bundle updated"
        );
        Ok(Response::new(pb::UpdateBundleResponse {
            sequence: bundle.sequence,
        }))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let rec = self.caller_site(&req)?;
        let rev = self.remove(&rec).await?;
        info!(site = %rec.site, "site left");
        Ok(Response::new(pb::LeaveResponse { revision: rev }))
    }

    async fn remove_site(
        &self,
        req: Request<pb::RemoveSiteRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        self.operator(&req)?;
        let r = req.into_inner();
        let site = SiteName::new(&r.site).map_err(|e| self.bad_request(format!("site: {e}")))?;
        let rec = self.store.site(&site).ok_or_else(|| {
            self.refuse(Refused::new(
                Refusal::UnknownSite,
                format!("site {site} is not in the federation"),
            ))
        })?;
        let rev = self.remove(&rec).await?;
        info!(%site, "site removed by the operator");
        Ok(Response::new(pb::LeaveResponse { revision: rev }))
    }
}

/// The Watch and Bundles response streams.
mod streams {
    use super::*;
    use tokio_stream::StreamExt;

    /// `stream` until the replica drains, then one `draining` refusal: the watcher knows
    /// to resume, and the stream does not hold the shutdown.
    pub fn until_drained<T: Send + 'static>(
        stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
        draining: tokio_util::sync::CancellationToken,
    ) -> impl Stream<Item = Result<T, Status>> + Send {
        let end = draining.clone();
        // The refusal only when drained, not when the stream ended by itself.
        let tail = futures::StreamExt::filter_map(
            futures::stream::once(async move { end.is_cancelled() }),
            |drained| async move {
                drained.then(|| {
                    Err(meshfed_api::Refusal::Draining
                        .status("this federation replica is shutting down; resume the watch"))
                })
            },
        );
        futures::StreamExt::chain(
            futures::StreamExt::take_until(stream, draining.cancelled_owned()),
            tail,
        )
    }

    /// First event, then live deltas; a watcher that falls behind the broadcast buffer
    /// gets a fresh snapshot instead of a gap. `parts`: each event in parts of about
    /// a MiB ([`meshfed_api::parts`]), as the watcher asked.
    pub fn unfold(
        first: Option<pb::WatchFrame>,
        rx: broadcast::Receiver<StoreEvent>,
        store: Store,
        guard: WatcherGuard,
        (seen, site): (Seen, SiteName),
        parts: bool,
    ) -> impl Stream<Item = Result<pb::WatchFrame, Status>> + Send {
        let split = move |ev| {
            if parts {
                meshfed_api::parts::split(ev)
            } else {
                vec![ev]
            }
        };
        let first = first.map(split);
        let live = tokio_stream::wrappers::BroadcastStream::new(rx).map(move |r| {
            // The closure owns the guard, so the watcher gauge drops with the stream.
            let _owned = &guard;
            let evs = match r {
                // Converted once, by the first watcher to send it.
                Ok(StoreEvent::Deltas(c)) => c.wire(parts),
                // Fell behind the broadcast buffer, or the store lost its history.
                Ok(StoreEvent::Reset) | Err(_) => split(store.with_catalog(snapshot_event)),
            };
            if let Some(ev) = evs.last() {
                mark_seen(&seen, &site, ev.revision);
            }
            evs
        });
        futures::StreamExt::flat_map(tokio_stream::iter(first).chain(live), |evs| {
            futures::stream::iter(evs.into_iter().map(Ok))
        })
    }

    pub trait BundlesExt {
        fn map_ok_bundles(
            self,
            addresses: impl Fn() -> Vec<String> + Send + 'static,
        ) -> Pin<Box<dyn Stream<Item = Result<pb::BundleSet, Status>> + Send>>;
    }

    impl BundlesExt for tokio_stream::wrappers::WatchStream<BTreeMap<String, String>> {
        fn map_ok_bundles(
            self,
            addresses: impl Fn() -> Vec<String> + Send + 'static,
        ) -> Pin<Box<dyn Stream<Item = Result<pb::BundleSet, Status>> + Send>> {
            Box::pin(self.map(move |b| {
                Ok(pb::BundleSet {
                    bundles: b.into_iter().collect(),
                    federation_addresses: addresses(),
                })
            }))
        }
    }
}

use streams::BundlesExt;

/// Where the federation answers: every live replica's addresses on etcd (this node's
/// own while none is known yet), this node's with the embedded store.
fn live_addresses(store: &Store, own: &[String]) -> Vec<String> {
    match store {
        Store::Etcd(s) => {
            let a = s.replica_addresses();
            if a.is_empty() { own.to_vec() } else { a }
        }
        Store::Embedded(_) => own.to_vec(),
    }
}

/// `service:port`, with `/udp` for UDP ports, as `meshfed status` lists them.
fn port_label(service: &str, port: u16, protocol: meshfed_catalog::catalog::Protocol) -> String {
    match protocol {
        meshfed_catalog::catalog::Protocol::Tcp => format!("{service}:{port}"),
        meshfed_catalog::catalog::Protocol::Udp => format!("{service}:{port}/udp"),
    }
}

#[cfg(test)]
mod conflict_tests {
    use super::*;
    use meshfed_catalog::catalog::Export;
    use meshfed_catalog::http_route::{Destination, HttpPolicy, HttpRoute};

    fn export(weight_to_v2: u32) -> Export {
        let svc = meshfed_catalog::ServiceName::parse("web.demo").unwrap();
        Export {
            endpoint_labels: Vec::new(),
            service: svc.clone(),
            ports: vec![],
            ready_endpoints: 1,
            identities: vec![],
            locality: None,
            labels: Default::default(),
            hosts: vec![],
            http_policy: Some(Box::new(HttpPolicy {
                connection_pool: None,
                locality_lb: None,
                port_settings: vec![],
                export_to: Vec::new(),
                retry_budget: None,
                tcp_routes: Vec::new(),
                tls_routes: Vec::new(),
                service: svc,
                source: "VirtualService demo/web".into(),
                routes: vec![HttpRoute {
                    destinations: vec![
                        Destination {
                            service: None,
                            port: None,
                            subset: None,
                            weight: 100 - weight_to_v2,
                            headers: None,
                        },
                        Destination {
                            service: None,
                            port: None,
                            subset: None,
                            weight: weight_to_v2,
                            headers: None,
                        },
                    ],
                    ..Default::default()
                }],
                subsets: vec![],
                max_requests: None,
                max_requests_per_connection: None,
                idle_timeout_ms: None,
                connect_timeout_ms: None,
                tcp_keepalive: None,
                outlier: None,
                load_balancer: None,
                consistent_hash: None,
            })),
        }
    }

    #[test]
    fn status_names_services_whose_sites_disagree() {
        let mut cat = Catalog::default();
        let svc = meshfed_catalog::ServiceName::parse("web.demo").unwrap();
        cat.exports
            .insert((SiteName::new("west").unwrap(), svc.clone()), export(20));
        assert!(
            policy_conflicts(&cat).is_empty(),
            "one site cannot conflict"
        );
        cat.exports
            .insert((SiteName::new("north").unwrap(), svc.clone()), export(20));
        assert!(policy_conflicts(&cat).is_empty(), "the same routes agree");
        cat.exports
            .insert((SiteName::new("north").unwrap(), svc), export(50));
        let c = policy_conflicts(&cat);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].contains("north's apply"), "{c:?}");
    }
}

#[cfg(test)]
mod authz_tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn west() -> SiteRecord {
        SiteRecord {
            site: SiteName::new("west").unwrap(),
            trust_domain: TrustDomain::new("west.example.org").unwrap(),
            gateway_addresses: vec![],
            up: true,
        }
    }

    #[test]
    fn operator_refusals() {
        let fed = TrustDomain::new("fed.example.org").unwrap();
        let rows: &[(Option<&str>, Result<(), Refusal>)] = &[
            (Some("spiffe://fed.example.org/meshfed/admin"), Ok(())),
            (None, Err(Refusal::Unauthenticated)),
            (
                Some("spiffe://fed.example.org/meshfed/federation"),
                Err(Refusal::NotOperator),
            ),
            // The same path in another trust domain is not the operator.
            (
                Some("spiffe://west.example.org/meshfed/admin"),
                Err(Refusal::NotOperator),
            ),
        ];
        for (i, (caller, want)) in rows.iter().enumerate() {
            let caller = caller.map(id);
            let got = authorize_operator(caller.as_ref(), &fed).map_err(|r| r.refusal);
            assert_eq!(got, *want, "row {i}");
        }
    }

    #[test]
    fn site_refusals() {
        let rows: &[(Option<&str>, Result<&str, Refusal>)] = &[
            (
                Some("spiffe://west.example.org/meshfed/site/west/gateway"),
                Ok("west"),
            ),
            (None, Err(Refusal::Unauthenticated)),
            (
                Some("spiffe://west.example.org/ns/shop/sa/orders"),
                Err(Refusal::NotAGateway),
            ),
            (
                Some("spiffe://west.example.org/meshfed/site/east/gateway"),
                Err(Refusal::UnknownSite),
            ),
            // Another trust domain's gateway claiming to be west.
            (
                Some("spiffe://rogue.example.org/meshfed/site/west/gateway"),
                Err(Refusal::PublishForeignSite),
            ),
        ];
        for (i, (caller, want)) in rows.iter().enumerate() {
            let caller = caller.map(id);
            let got = authorize_site(caller.as_ref(), |s| (s.as_str() == "west").then(west))
                .map(|r| r.site.as_str().to_owned())
                .map_err(|r| r.refusal);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "row {i}");
        }
    }
}
