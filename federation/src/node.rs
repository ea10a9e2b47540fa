//! A federation node's directory: init, and serving it (the service on a store, its
//! TLS acceptor, its lock). Joining one is the site's side: `meshfed_api::client`.
//!
//! Federation directory: `ca/` (the federation's CA), `federation.pem|key` (its SVID,
//! chain ending with the CA so joining sites can check their pin; a serving node renews
//! it at half its lifetime), `admin.pem|key` (the
//! operator SVID that may create tokens), `store.json` (embedded store, created by
//! `init`), `address` (where a running node listens), `federation.lock` (held by the
//! running node: a second one on the same directory is refused).
//!
//! The site directory's files are `meshfed_catalog::site`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshfed_identity::ca::write_file;
use meshfed_identity::tls::SvidResolver;
use meshfed_identity::{BundleSet, Ca, Svid, TrustBundle, TrustDomain};
use meshfed_lifecycle::drain;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::server::FederationService;
use crate::store::{DEFAULT_HISTORY, EmbeddedStore, EtcdOptions, EtcdStore, Store};
use crate::transport;
use meshfed_api::pb;
use meshfed_api::tls::federation_id;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Identity(#[from] meshfed_identity::CaError),
    #[error(transparent)]
    Bundle(#[from] meshfed_identity::BundleError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{what}: {detail}")]
    Other { what: String, detail: String },
    #[error(transparent)]
    Fs(#[from] meshfed_identity::fs::FsError),
}

fn other(what: impl Into<String>, detail: impl ToString) -> NodeError {
    NodeError::Other {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// The lock a serving node holds on its directory for its lifetime.
pub const SERVE_LOCK: &str = "federation.lock";
/// Creates a federation directory: CA, the federation's SVID, the operator SVID, and an
/// empty embedded store. Refuses a directory that already holds a federation.
pub fn init(dir: &Path, td: &TrustDomain) -> Result<(), NodeError> {
    if dir.join("ca").join("ca.pem").exists() {
        return Err(other(
            dir.display().to_string(),
            "already holds a federation (ca/ca.pem); init would replace its CA and cut off every site",
        ));
    }
    let ca = Ca::generate(td, meshfed_identity::ca::DEFAULT_CA_TTL)?;
    ca.save(&dir.join("ca"))?;
    // A running node renews its own SVID (`serve_with`'s `svid_ttl`); the operator's
    // admin SVID is long-lived.
    let ttl = Duration::from_secs(365 * 24 * 3600);
    issue_federation_svid(&ca, dir, DEFAULT_SVID_TTL)?;
    let admin = ca.issue(
        &td.child(&["meshfed", "admin"])
            .map_err(|e| other("admin id", e))?,
        ttl,
    )?;
    admin.save(&dir.join("admin.pem"), &dir.join("admin.key"))?;
    // The store exists from the start, so `serve` can tell a lost snapshot from a new
    // federation.
    EmbeddedStore::create_empty(&dir.join("store.json"))?;
    Ok(())
}

/// Which store a node serves from.
#[derive(Clone, Debug)]
pub enum StoreChoice {
    /// `store.json` in the federation directory (one node). `create` starts an empty
    /// store where `store.json` is missing; without it a missing snapshot is refused.
    Embedded { create: bool },
    /// An etcd cluster shared by any number of replicas.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        security: crate::store::EtcdSecurity,
    },
}

/// The lifetime of the federation's own SVID; a serving node renews it at half that.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Issues the federation's SVID from its CA into `federation.pem|key`, the chain ending
/// with the CA (joining sites check their pin against it). Returns it.
fn issue_federation_svid(ca: &Ca, dir: &Path, ttl: Duration) -> Result<Svid, NodeError> {
    let mut fed = ca.issue(&federation_id(ca.trust_domain()), ttl)?;
    fed.chain.push(ca.cert().clone());
    fed.save(&dir.join("federation.pem"), &dir.join("federation.key"))?;
    Ok(fed)
}

/// Renews the federation's SVID at half its lifetime, for as long as the node serves:
/// new handshakes present the new one at once; no site needs anything (they verify it
/// against the federation's CA, which does not change).
async fn renew_own_svid(
    ca: Ca,
    dir: std::path::PathBuf,
    ttl: Duration,
    resolver: Arc<SvidResolver>,
    stop: CancellationToken,
) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let wait = match Svid::load(&dir.join("federation.pem"), &dir.join("federation.key")) {
            Ok(s) => meshfed_identity::ca::renew_in(
                s.not_before_unix().unwrap_or(0),
                s.not_after_unix().unwrap_or(0),
                ttl,
                now,
            ),
            Err(_) => Duration::ZERO,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let renewed = issue_federation_svid(&ca, &dir, ttl).and_then(|s| {
            resolver
                .update(&s)
                .map_err(|e| other("federation SVID", e))?;
            Ok(s)
        });
        match renewed {
            Ok(s) => info!(
                not_after = s.not_after_unix().unwrap_or_default(),
                "federation SVID renewed"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "federation SVID not renewed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep((ttl / 4).min(Duration::from_secs(5))) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// A running federation node.
pub struct Running {
    pub addr: SocketAddr,
    pub service: Arc<FederationService>,
    /// Held until the node is dropped: one serving process per directory.
    _lock: meshfed_identity::fs::DirLock,
    /// Cancelling it starts the drain.
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    /// The admin port's, cancelled after the drain.
    admin_stop: CancellationToken,
    /// The federation's SVID as its TLS presents it (the bundle endpoint's too).
    resolver: Arc<SvidResolver>,
}

impl Running {
    /// Serves the admin port (`/metrics` with the federation's metrics, `/ready`,
    /// `/live`; `/ready` is false while draining and while the store cannot serve) on `admin` until the node has stopped, and writes where it listens to
    /// `<dir>/admin_address`.
    pub async fn serve_admin(
        &self,
        dir: &Path,
        admin: SocketAddr,
    ) -> Result<SocketAddr, NodeError> {
        let mut registry = prometheus_client::registry::Registry::default();
        self.service.metrics.register(&mut registry);
        let fed = registry.sub_registry_with_prefix("meshfed_federation");
        fed.register_collector(Box::new(self.service.site_collector()));
        fed.sub_registry_with_label(("store".into(), self.service.store.kind().into()))
            .register(
                "store_commit_seconds",
                "Time a catalog commit takes in the store (embedded: memory and, past the reservation, a snapshot; etcd: a transaction and the mirror catching up)",
                self.service.store.commit_seconds(),
            );
        let listener = tokio::net::TcpListener::bind(admin)
            .await
            .map_err(|e| other(format!("bind admin {admin}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| other(format!("bind admin {admin}"), e))?;
        write_file(
            &dir.join("admin_address"),
            addr.to_string().as_bytes(),
            0o644,
        )?;
        info!(admin = %addr, "federation admin listening");
        let server = meshfed_lifecycle::admin::Admin {
            registry: Arc::new(registry),
            ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            svid_expiry: None,
            check: Some({
                let (service, stop) = (self.service.clone(), self.stop.clone());
                Arc::new(move || {
                    if stop.is_cancelled() {
                        return Some("draining".to_owned());
                    }
                    service.store.unhealthy()
                })
            }),
            pages: vec![("/topology.json", {
                let service = self.service.clone();
                Arc::new(move || service.topology())
            })],
            probe: None,
            html: vec![("/topology", crate::topology::PAGE)],
        };
        tokio::spawn(server.serve(listener, self.admin_stop.clone()));
        Ok(addr)
    }

    /// Serves the SPIFFE bundle endpoint on `addr`, every member's bundle at
    /// `/<trust domain>`, until the node stops: `https_spiffe` (the federation's SVID),
    /// or `https_web` with `web` (a PEM certificate chain and its key, e.g. from a
    /// public CA).
    pub async fn serve_bundle_endpoint(
        &self,
        addr: SocketAddr,
        web: Option<(&Path, &Path)>,
    ) -> Result<SocketAddr, NodeError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| other(format!("bind bundle endpoint {addr}"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| other(format!("bind bundle endpoint {addr}"), e))?;
        let (tls, profile) = match web {
            None => (
                crate::bundle_endpoint::tls(self.resolver.clone())
                    .map_err(|e| other("bundle endpoint TLS", e))?,
                "https_spiffe",
            ),
            Some((cert, key)) => (
                crate::bundle_endpoint::web_tls(cert, key)
                    .map_err(|e| other("bundle endpoint web certificate", e))?,
                "https_web",
            ),
        };
        tokio::spawn(crate::bundle_endpoint::serve(
            listener,
            tls,
            self.service.clone(),
            self.admin_stop.clone(),
        ));
        info!(%bound, profile, "SPIFFE bundle endpoint serving");
        Ok(bound)
    }

    /// Federates with foreign trust domains by their bundle endpoints
    /// ([`crate::foreign`]): an `https_spiffe` relationship's bootstrap bundle is stored
    /// at once when none is, then each bundle is kept fresh until the node stops.
    /// Refused when a foreign trust domain is our own or a member site's.
    pub async fn federate_with(
        &self,
        relationships: Vec<crate::foreign::Relationship>,
    ) -> Result<(), NodeError> {
        let tds = relationships
            .iter()
            .map(|r| r.trust_domain.clone())
            .collect();
        self.service
            .set_foreign(tds)
            .map_err(|e| other("--federates-with", e))?;
        for rel in relationships {
            if let crate::foreign::Profile::HttpsSpiffe { bootstrap, .. } = &rel.profile
                && self.service.stored_bundle(&rel.trust_domain).is_none()
            {
                self.service
                    .store_foreign_bundle(bootstrap)
                    .await
                    .map_err(|e| other(format!("bootstrap bundle of {}", rel.trust_domain), e))?;
            }
            info!(trust_domain = %rel.trust_domain, url = %rel.url, profile = rel.profile.name(), "federating with a foreign trust domain");
            tokio::spawn(crate::foreign::run(
                rel,
                self.service.clone(),
                self.stop.clone(),
            ));
        }
        Ok(())
    }

    /// Drains the service, then closes the admin port.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
        self.admin_stop.cancel();
    }
}

/// Serves the federation API on `listen`, with the identity in `dir`, from `store`,
/// renewing its SVID at half of [`DEFAULT_SVID_TTL`].
pub async fn serve(
    dir: &Path,
    listen: SocketAddr,
    advertise: Vec<String>,
    lease_ttl: Duration,
    store: StoreChoice,
) -> Result<Running, NodeError> {
    serve_with(dir, listen, advertise, lease_ttl, store, DEFAULT_SVID_TTL).await
}

/// [`serve`], with the federation SVID's lifetime `svid_ttl`.
pub async fn serve_with(
    dir: &Path,
    listen: SocketAddr,
    advertise: Vec<String>,
    lease_ttl: Duration,
    store: StoreChoice,
    svid_ttl: Duration,
) -> Result<Running, NodeError> {
    let lock = meshfed_identity::fs::DirLock::try_hold(dir, SERVE_LOCK)?;
    let ca = Ca::load(&dir.join("ca"))?;
    let td = ca.trust_domain().clone();
    let svid = Svid::load(&dir.join("federation.pem"), &dir.join("federation.key"))?;
    let snapshot = dir.join("store.json");
    if matches!(store, StoreChoice::Embedded { create: false }) && !snapshot.exists() {
        return Err(other(
            snapshot.display().to_string(),
            "missing: the federation's catalog, tokens and sites' bundles are gone (restore store.json from a backup), \
             or start an empty store on purpose with `meshfed federation serve --init-store`",
        ));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| other(format!("bind {listen}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| other("local address", e))?;
    let addresses = if advertise.is_empty() {
        vec![addr.to_string()]
    } else {
        advertise
    };
    let store = match store {
        StoreChoice::Embedded { .. } => {
            Store::Embedded(EmbeddedStore::open(Some(&snapshot), DEFAULT_HISTORY)?)
        }
        StoreChoice::Etcd {
            endpoints,
            prefix,
            security,
        } => Store::Etcd(
            EtcdStore::open(EtcdOptions {
                endpoints,
                prefix,
                security,
                history: DEFAULT_HISTORY,
                addresses: addresses.clone(),
            })
            .await?,
        ),
    };
    // Sites' bundles (from the store) plus our own, for verifying callers.
    let mut set = BundleSet::new();
    for (t, jwks) in &store.bundles() {
        if let Ok(t) = TrustDomain::new(t) {
            set.insert(TrustBundle::from_jwks(t, jwks.as_bytes())?);
        }
    }
    set.insert(ca.bundle(1));
    let tls_bundles = Arc::new(arc_swap::ArcSwap::from_pointee(set));
    let resolver = Arc::new(SvidResolver::new(&svid).map_err(|e| other("federation SVID", e))?);
    let tls = transport::server_tls(resolver.clone(), tls_bundles.clone())
        .map_err(|e| other("TLS", e))?;
    let service = FederationService::new(
        store.clone(),
        td.clone(),
        ca.bundle(1),
        addresses,
        tls_bundles,
        lease_ttl,
    )
    .await?;
    service.leases.start();
    write_file(&dir.join("address"), addr.to_string().as_bytes(), 0o644)?;
    let incoming = transport::incoming(listener, tls, service.metrics.connections_refused.clone());
    let svc = pb::federation_server::FederationServer::from_arc(service.clone());
    // The drain waits for the embedded store's flusher without a grace: it writes what
    // was acknowledged, and nothing acknowledged may be lost.
    let (drain, watcher) = drain::channel();
    if let Store::Embedded(s) = &store {
        watcher.spawn(s.clone().run_flusher(watcher.token()));
    }
    let stop = watcher.token();
    service.replicas.start(stop.clone());
    // Streams end at the drain's start: a watcher resumes elsewhere, and the server's
    // graceful shutdown is not held by streams that never end by themselves.
    {
        let (stop, draining) = (stop.clone(), service.draining.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            draining.cancel();
        });
    }
    tokio::spawn(renew_own_svid(
        Ca::load(&dir.join("ca"))?,
        dir.to_owned(),
        svid_ttl,
        resolver.clone(),
        stop.clone(),
    ));
    let store2 = store.clone();
    let done = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            // A site whose connection went quiet (partitioned, its host gone) is found
            // by PING within twice this, so its watch ends and its lease runs out.
            .http2_keepalive_interval(Some(meshfed_api::tls::KEEPALIVE))
            .http2_keepalive_timeout(Some(meshfed_api::tls::KEEPALIVE))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, watcher.signaled())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "federation server stopped");
        }
        // Every call has ended: the embedded store's closing snapshot is its last word.
        if let Store::Embedded(s) = &store2
            && let Err(e) = s.close()
        {
            tracing::warn!(error = %e, "closing snapshot write failed; the next start reserves past it");
        }
        drain.drain(Duration::MAX).await;
        if let Store::Etcd(s) = store2 {
            s.shutdown();
        }
    });
    info!(%addr, trust_domain = %td, store = store.kind(), revision = store.revision().0, "federation serving");
    Ok(Running {
        addr,
        service,
        _lock: lock,
        stop,
        done,
        admin_stop: CancellationToken::new(),
        resolver,
    })
}
