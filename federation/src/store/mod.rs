//! Where the federation keeps its state. Two stores, one interface:
//!
//! - [`EmbeddedStore`] (the default): one node, the catalog in memory, a snapshot on disk.
//! - [`EtcdStore`]: any number of replicas on one etcd. Each replica mirrors the keys
//!   with one etcd watch ([`mirror`]); reads come from the mirror, writes are etcd
//!   transactions, site liveness is etcd leases.
//!
//! Both hand out the same revisioned deltas, so the service and gateways do not care
//! which one runs. Each commit is broadcast once as a [`Committed`], whose wire form
//! the watchers share.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokio::sync::{broadcast, watch};

use meshfed_api::pb;
use meshfed_catalog::catalog::{Catalog, CatalogError, Change, Delta, Revision, SiteRecord};
use meshfed_catalog::names::SiteName;
use meshfed_catalog::token::{Claim, JoinToken, TokenError, TokenRecord};

mod embedded;
mod etcd;
pub mod mirror;

pub use embedded::{DEFAULT_HISTORY, EmbeddedStore, RESERVATION, State};

type Histogram = prometheus_client::metrics::histogram::Histogram;

/// A commit latency histogram: 0.1 ms to ~1.6 s.
pub(crate) fn commit_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 15,
    ))
}
pub use etcd::{EtcdOptions, EtcdSecurity, EtcdStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {path} is not a meshfed snapshot: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("etcd {op}: {detail}")]
    Etcd { op: &'static str, detail: String },
    #[error("the store is closed: the federation is shutting down")]
    Closed,
}

/// Where a watch starts: deltas after its revision, or the whole catalog.
pub enum WatchStart {
    Deltas(Vec<Delta>),
    Snapshot(Catalog),
}

/// What a store broadcasts to open watches.
#[derive(Clone, Debug)]
pub enum StoreEvent {
    /// One commit (embedded) or one etcd revision: watchers send it as one event.
    Deltas(Arc<Committed>),
    /// The store lost its history (etcd compacted past the mirror): send a snapshot.
    Reset,
}

/// One commit's deltas as a store broadcasts them, with their wire form: made by the
/// first watcher that sends them and shared by the others. Every watcher converted
/// (and, for parts, measured) every change itself: with 511 watchers that was a fifth
/// of the federation's CPU under churn (bench/catalog --scale). The wire form keeps the
/// changes encoded ([`pb::WatchFrame`]), so a watcher's copy shares their bytes and
/// sending it encodes nothing again.
#[derive(Debug)]
pub struct Committed {
    pub deltas: Vec<Delta>,
    whole: OnceLock<pb::WatchFrame>,
    parts: OnceLock<Vec<pb::WatchFrame>>,
}

impl Committed {
    pub fn new(deltas: Vec<Delta>) -> Arc<Self> {
        Arc::new(Self {
            deltas,
            whole: OnceLock::new(),
            parts: OnceLock::new(),
        })
    }

    /// The event to send: whole, or in parts ([`meshfed_api::parts`]) for a watcher
    /// that asked for them. Only the form some watcher asked for is kept.
    pub fn wire(&self, parts: bool) -> Vec<pb::WatchFrame> {
        if parts {
            self.parts
                .get_or_init(|| {
                    meshfed_api::parts::split(match self.whole.get() {
                        Some(w) => w.clone(),
                        None => deltas_event(&self.deltas, None),
                    })
                })
                .clone()
        } else {
            vec![
                self.whole
                    .get_or_init(|| deltas_event(&self.deltas, None))
                    .clone(),
            ]
        }
    }
}

/// `deltas` as one watch event, each change encoded; an empty one stays at `from`.
pub fn deltas_event(deltas: &[Delta], from: Option<Revision>) -> pb::WatchFrame {
    pb::WatchFrame {
        more: false,
        snapshot: false,
        revision: deltas
            .last()
            .map(|d| d.revision.0)
            .or(from.map(|f| f.0))
            .unwrap_or_default(),
        changes: deltas
            .iter()
            .map(|d| meshfed_api::change_to_wire(d.revision, &d.change))
            .collect(),
    }
}

/// The store a federation node runs on.
#[derive(Clone)]
pub enum Store {
    Embedded(Arc<EmbeddedStore>),
    Etcd(Arc<EtcdStore>),
}

impl Store {
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Etcd(_) => "etcd",
        }
    }

    /// Why the store cannot serve now (`/ready` says it), or `None`.
    pub fn unhealthy(&self) -> Option<String> {
        match self {
            Store::Embedded(s) => s.unhealthy(),
            Store::Etcd(s) => s.unhealthy(),
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Store::Embedded(s) => s.revision(),
            Store::Etcd(s) => s.revision(),
        }
    }

    pub fn site(&self, site: &SiteName) -> Option<SiteRecord> {
        self.with_catalog(|c| c.sites.get(site).cloned())
    }

    /// The gateway addresses that live gateway replicas of `site` hold on any node
    /// (etcd); `None` on the embedded store, whose one node tracks them all itself.
    pub fn named_addresses(&self, site: &SiteName) -> Option<BTreeSet<String>> {
        match self {
            Store::Embedded(_) => None,
            Store::Etcd(s) => Some(s.named_addresses(site)),
        }
    }

    /// Runs `f` on the current catalog under the store's lock (keep `f` short).
    pub fn with_catalog<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        match self {
            Store::Embedded(s) => s.with_catalog(f),
            Store::Etcd(s) => s.with_catalog(f),
        }
    }

    pub fn bundles(&self) -> BTreeMap<String, String> {
        match self {
            Store::Embedded(s) => s.bundles(),
            Store::Etcd(s) => s.bundles(),
        }
    }

    /// Ticks whenever a bundle changes (on any replica, for etcd).
    pub fn subscribe_bundles(&self) -> watch::Receiver<u64> {
        match self {
            Store::Embedded(s) => s.subscribe_bundles(),
            Store::Etcd(s) => s.subscribe_bundles(),
        }
    }

    /// Commits changes in order. Once it returns, reads on this node see them. Every
    /// commit is timed into [`Store::commit_seconds`].
    pub async fn commit(&self, changes: Vec<Change>) -> Result<Revision, StoreError> {
        let started = std::time::Instant::now();
        let r = match self {
            Store::Embedded(s) => s.commit(changes),
            Store::Etcd(s) => s.commit(changes).await,
        };
        self.commit_seconds()
            .observe(started.elapsed().as_secs_f64());
        r
    }

    /// How long commits take (`meshfed_federation_store_commit_seconds{store}`).
    pub fn commit_seconds(&self) -> Histogram {
        match self {
            Store::Embedded(s) => s.commit_seconds.clone(),
            Store::Etcd(s) => s.commit_seconds.clone(),
        }
    }

    /// Atomically: what a watcher at `from` is missing, and a subscription to what follows.
    pub fn watch(&self, from: Option<Revision>) -> (WatchStart, broadcast::Receiver<StoreEvent>) {
        match self {
            Store::Embedded(s) => s.watch(from),
            Store::Etcd(s) => s.watch(from),
        }
    }

    /// Records a newly issued token durably before returning.
    pub async fn add_token(&self, token: &JoinToken, rec: TokenRecord) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.add_token(token, rec),
            Store::Etcd(s) => s.add_token(token, rec).await,
        }
    }

    /// Redeems a token once, durably; a second redemption (on any replica) is refused.
    pub async fn redeem_token(
        &self,
        token: &JoinToken,
        claim: &Claim,
        now: i64,
    ) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.redeem_token(token, claim, now),
            Store::Etcd(s) => s.redeem_token(token, claim, now).await,
        }
    }

    pub async fn set_bundle(&self, trust_domain: &str, jwks: String) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                s.set_bundle(trust_domain, jwks);
                Ok(())
            }
            Store::Etcd(s) => s.set_bundle(trust_domain, jwks).await,
        }
    }

    /// Withdraws a trust domain's bundle (its last site left or was removed).
    pub async fn remove_bundle(&self, trust_domain: &str) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                s.remove_bundle(trust_domain);
                Ok(())
            }
            Store::Etcd(s) => s.remove_bundle(trust_domain).await,
        }
    }

    /// Makes everything committed so far durable (a no-op on etcd, where it already is).
    pub fn flush(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.flush(),
            Store::Etcd(_) => Ok(()),
        }
    }
}
