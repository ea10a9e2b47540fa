//! Running a federation node and joining one, with their files on disk.
//!
//! Federation directory: `ca/` (the federation's CA), `federation.pem|key` (its SVID,
//! chain ending with the CA so joining sites can check their pin), `admin.pem|key` (the
//! operator SVID that may create tokens), `store.json` (embedded store, created by
//! `init`), `address` (where a running node listens), `federation.lock` (held by the
//! running node: a second one on the same directory is refused).
//!
//! Site directory (as `meshfed ca`/`gateway::lab` lay it out): `ca/`, `gateway.pem|key`,
//! `bundle.json`; joining adds `federation.json` and `bundles/<trust domain>.json`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshfed_identity::ca::write_file;
use meshfed_identity::tls::SvidResolver;
use meshfed_identity::{BundleSet, Ca, Svid, TrustBundle, TrustDomain};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::pb;
use crate::server::FederationService;
use crate::store::{DEFAULT_HISTORY, EmbeddedStore, EtcdOptions, EtcdStore, Store};
use crate::token::JoinToken;
use crate::transport::{self, ClientTrust, federation_id};

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
    /// The federation said no; `refusal` is its typed reason (from the status metadata),
    /// `None` for a code this build does not know.
    #[error("federation refused: {message}")]
    Refused {
        refusal: Option<crate::api::Refusal>,
        message: String,
    },
    /// Not a source: the message already says it, and a source would print it twice.
    #[error("join token: {0}")]
    Token(crate::token::TokenError),
    #[error(transparent)]
    Fs(#[from] meshfed_identity::fs::FsError),
}

impl From<crate::token::TokenError> for NodeError {
    fn from(e: crate::token::TokenError) -> Self {
        Self::Token(e)
    }
}

fn other(what: impl Into<String>, detail: impl ToString) -> NodeError {
    NodeError::Other {
        what: what.into(),
        detail: detail.to_string(),
    }
}

fn refused(s: tonic::Status) -> NodeError {
    NodeError::Refused {
        refusal: crate::api::Refusal::of_status(&s),
        message: s.message().to_owned(),
    }
}

/// The lock a serving node holds on its directory for its lifetime.
pub const SERVE_LOCK: &str = "federation.lock";
/// The lock short writers of a site directory (register, join) take.
pub const SITE_LOCK: &str = ".meshfed.lock";
/// How long a command waits for another one writing the same site directory.
pub const SITE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Takes the site directory's lock for a short read-modify-write (register, unregister,
/// join), waiting up to [`SITE_LOCK_WAIT`] for another command to finish.
pub fn lock_site_dir(site_dir: &Path) -> Result<meshfed_identity::fs::DirLock, NodeError> {
    Ok(meshfed_identity::fs::DirLock::wait(
        site_dir,
        SITE_LOCK,
        SITE_LOCK_WAIT,
    )?)
}

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
    // Long-lived for now: SVID rotation for the federation comes with its own issue.
    let ttl = Duration::from_secs(365 * 24 * 3600);
    let mut fed = ca.issue(&federation_id(td), ttl)?;
    fed.chain.push(ca.cert().clone());
    fed.save(&dir.join("federation.pem"), &dir.join("federation.key"))?;
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

/// A running federation node.
pub struct Running {
    pub addr: SocketAddr,
    pub service: Arc<FederationService>,
    /// Held until the node is dropped: one serving process per directory.
    _lock: meshfed_identity::fs::DirLock,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }
}

/// Serves the federation API on `listen`, with the identity in `dir`, from `store`.
pub async fn serve(
    dir: &Path,
    listen: SocketAddr,
    advertise: Vec<String>,
    lease_ttl: Duration,
    store: StoreChoice,
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
    let tls = transport::server_tls(resolver, tls_bundles.clone()).map_err(|e| other("TLS", e))?;
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
    let stop = CancellationToken::new();
    let incoming = transport::incoming(listener, tls);
    let svc = pb::federation_server::FederationServer::from_arc(service.clone());
    let stop2 = stop.clone();
    let flusher = match &store {
        Store::Embedded(s) => Some(tokio::spawn(s.clone().run_flusher(stop.clone()))),
        Store::Etcd(_) => None,
    };
    let store2 = store.clone();
    let done = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop2.cancelled())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "federation server stopped");
        }
        if let Some(f) = flusher {
            let _ = f.await;
        }
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
    })
}

/// What a site keeps after joining.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Membership {
    pub federation_trust_domain: TrustDomain,
    pub addresses: Vec<String>,
    pub revision: u64,
}

/// A client of a running node, authenticated with `cert`/`key`.
pub async fn client(
    addresses: &[String],
    federation_bundle: TrustBundle,
    cert: &Path,
    key: &Path,
) -> Result<pb::federation_client::FederationClient<tonic::transport::Channel>, NodeError> {
    let svid = Svid::load(cert, key)?;
    let resolver = Arc::new(SvidResolver::new(&svid).map_err(|e| other("SVID", e))?);
    let ch = transport::connect(
        addresses,
        ClientTrust::Mutual {
            federation_bundle,
            svid: resolver,
        },
    )
    .await
    .map_err(|e| other("connect to the federation", e))?;
    Ok(pb::federation_client::FederationClient::new(ch))
}

/// A client of the node running from `dir`, as its operator (the admin SVID).
async fn operator_client(
    dir: &Path,
) -> Result<pb::federation_client::FederationClient<tonic::transport::Channel>, NodeError> {
    let ca = Ca::load(&dir.join("ca"))?;
    let addr = std::fs::read_to_string(dir.join("address")).map_err(|e| {
        other(
            format!("{}/address (is the federation running?)", dir.display()),
            e,
        )
    })?;
    client(
        &[addr.trim().to_owned()],
        ca.bundle(1),
        &dir.join("admin.pem"),
        &dir.join("admin.key"),
    )
    .await
}

/// `meshfed federation token create`: asks the running node for a token.
/// `trust_domain` binds the site to that trust domain; `share` lets it join one that
/// other sites already own.
pub async fn create_token(
    dir: &Path,
    site: &str,
    ttl: Duration,
    trust_domain: Option<&TrustDomain>,
    share: bool,
) -> Result<(String, i64), NodeError> {
    let mut c = operator_client(dir).await?;
    let r = c
        .create_token(pb::CreateTokenRequest {
            site: site.to_owned(),
            ttl_seconds: ttl.as_secs(),
            trust_domain: trust_domain.map(|t| t.to_string()).unwrap_or_default(),
            share_trust_domain: share,
        })
        .await
        .map_err(refused)?
        .into_inner();
    Ok((r.token, r.expires_unix))
}

/// `meshfed status`: the running node's view of every site.
pub async fn status(dir: &Path) -> Result<pb::StatusResponse, NodeError> {
    let mut c = operator_client(dir).await?;
    Ok(c.status(pb::StatusRequest {})
        .await
        .map_err(refused)?
        .into_inner())
}

/// Renders a status as the table `meshfed status` prints.
pub fn status_table(td: &str, s: &pb::StatusResponse) -> String {
    use std::fmt::Write;
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let mut out = format!("federation {td} at revision {}\n", s.revision);
    let _ = writeln!(
        out,
        "{:<10} {:<22} {:<6} {:>7} {:>6}  {:<28} IMPORTS",
        "SITE", "TRUST DOMAIN", "LEASE", "STREAMS", "SEEN", "EXPORTS"
    );
    for site in &s.sites {
        let _ = writeln!(
            out,
            "{:<10} {:<22} {:<6} {:>7} {:>6}  {:<28} {}",
            site.site,
            site.trust_domain,
            if site.up { "up" } else { "down" },
            site.watch_streams,
            site.last_seen_revision,
            list(&site.exports),
            list(&site.imports)
        );
    }
    out
}

/// `meshfed site join`: redeems `token` for the site in `site_dir`.
pub async fn join(
    site_dir: &Path,
    site: &str,
    token: &str,
    gateway_addresses: Vec<String>,
) -> Result<Membership, NodeError> {
    let token = JoinToken::decode(token)?;
    // Concurrent joins and registrations on this directory take turns.
    let _lock = lock_site_dir(site_dir)?;
    let ca = Ca::load(&site_dir.join("ca"))?;
    let td = ca.trust_domain().clone();
    let fed_td = token.federation_trust_domain.clone();
    let ch = transport::connect(
        &token.addresses,
        ClientTrust::Pinned {
            fingerprint: token.ca_fingerprint.clone(),
            federation_td: fed_td.clone(),
        },
    )
    .await
    .map_err(|e| other("connect to the federation", e))?;
    let mut c = pb::federation_client::FederationClient::new(ch);
    let r = c
        .join(pb::JoinRequest {
            token: token.encode(),
            site: site.to_owned(),
            trust_domain: td.to_string(),
            bundle_jwks: ca.bundle(1).to_jwks()?,
            gateway_addresses,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let bundles_dir = site_dir.join("bundles");
    std::fs::create_dir_all(&bundles_dir)
        .map_err(|e| other(bundles_dir.display().to_string(), e))?;
    for (t, jwks) in &r.bundles {
        let t = TrustDomain::new(t).map_err(|e| other("bundle trust domain", e))?;
        TrustBundle::from_jwks(t.clone(), jwks.as_bytes())?;
        write_file(
            &bundles_dir.join(format!("{t}.json")),
            jwks.as_bytes(),
            0o644,
        )?;
    }
    let m = Membership {
        federation_trust_domain: TrustDomain::new(&r.federation_trust_domain)
            .map_err(|e| other("federation trust domain", e))?,
        addresses: token.addresses.clone(),
        revision: r.revision,
    };
    let json = serde_json::to_vec_pretty(&m).map_err(|e| other("membership", e))?;
    write_file(&site_dir.join("federation.json"), &json, 0o644)?;
    Ok(m)
}

/// Where a site keeps its copy of every federated bundle.
pub fn bundle_files(site_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(site_dir.join("bundles"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}
