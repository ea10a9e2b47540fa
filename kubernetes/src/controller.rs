//! The export controller: watches ServiceExports, Services, EndpointSlices and Pods with
//! kube's reflectors, and on every change (and every few seconds, for conflicts with
//! other sites) recomputes the site's Kubernetes exports ([`super::exports`]), writes them
//! to `<site dir>/kubernetes.json` for the gateway to publish, and writes each
//! ServiceExport's `Valid`/`Conflict` conditions back, only when they changed.
//!
//! It talks to the Kubernetes API and to files, never to the federation: the gateway
//! publishes what it writes, as it does for registered legacy services.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use meshfed_identity::TrustDomain;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Observed, ServiceExport, conditions, conflict, exports};
use meshfed_catalog::catalog::Catalog;
use meshfed_catalog::names::SiteName;
use meshfed_catalog::site::{KUBE_EXPORTS_FILE as EXPORTS_FILE, KubeExports};

/// How often conflicts are re-checked against the catalog cache without a cluster change.
pub(super) const RECHECK: Duration = Duration::from_secs(2);

pub struct ExportController {
    pub client: kube::Client,
    pub site: SiteName,
    pub trust_domain: TrustDomain,
    /// The site directory: `catalog.json` (the gateway's cache) is read from it for
    /// conflicts, and `kubernetes.json` is written into it.
    pub dir: PathBuf,
    /// With several replicas (one beside each gateway replica): whether this one leads
    /// ([`crate::leader`]). Every replica writes its own `kubernetes.json`; only the
    /// leader writes ServiceExport status. `None`: the only replica.
    pub leading: Option<tokio::sync::watch::Receiver<bool>>,
}

/// A resource type kube's reflectors can mirror.
pub(crate) trait Mirrored:
    kube::Resource<DynamicType = ()>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Mirrored for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Keeps one resource type mirrored in a store; pokes `changed` on every event.
fn mirror<K: Mirrored>(api: Api<K>, changed: Arc<Notify>, stop: CancellationToken) -> Store<K> {
    mirror_matching(api, watcher::Config::default(), changed, stop)
}

/// [`mirror`] of the objects `cfg` selects (e.g. by label).
pub(crate) fn mirror_matching<K: Mirrored>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: Arc<Notify>,
    stop: CancellationToken,
) -> Store<K> {
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(_)) => changed.notify_one(),
                    Some(Err(e)) => warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying"),
                    None => return,
                },
                _ = stop.cancelled() => return,
            }
        }
    });
    store
}

pub(super) fn items<K>(s: &Store<K>) -> Vec<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    s.state().iter().map(|o| (**o).clone()).collect()
}

impl ExportController {
    pub async fn run(self, stop: CancellationToken) {
        let changed = Arc::new(Notify::new());
        let c = &self.client;
        let ses = mirror(
            Api::<ServiceExport>::all(c.clone()),
            changed.clone(),
            stop.clone(),
        );
        let svcs = mirror(
            Api::<Service>::all(c.clone()),
            changed.clone(),
            stop.clone(),
        );
        let slices = mirror(
            Api::<EndpointSlice>::all(c.clone()),
            changed.clone(),
            stop.clone(),
        );
        let pods = mirror(Api::<Pod>::all(c.clone()), changed.clone(), stop.clone());
        // Nothing is written from a partial view: a missing Service would read as
        // "NoService", a missing slice as zero endpoints.
        for ready in [
            ses.wait_until_ready().await.is_ok(),
            svcs.wait_until_ready().await.is_ok(),
            slices.wait_until_ready().await.is_ok(),
            pods.wait_until_ready().await.is_ok(),
        ] {
            if !ready {
                return;
            }
        }
        info!("kubernetes export controller synced");
        let mut written: Option<KubeExports> = std::fs::read(self.dir.join(EXPORTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        loop {
            let observed = (items(&ses), items(&svcs), items(&slices), items(&pods));
            let catalog: Catalog = std::fs::read(self.dir.join("catalog.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            self.reconcile(&observed, &catalog, &mut written).await;
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(RECHECK) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn reconcile(
        &self,
        (ses, svcs, slices, pods): &(
            Vec<ServiceExport>,
            Vec<Service>,
            Vec<EndpointSlice>,
            Vec<Pod>,
        ),
        catalog: &Catalog,
        written: &mut Option<KubeExports>,
    ) {
        let outcomes = exports(
            &self.trust_domain,
            Observed {
                exports: ses,
                services: svcs,
                slices,
                pods,
            },
        );
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut out = KubeExports::default();
        for se in ses {
            let (Some(ns), Some(name)) = (se.metadata.namespace.clone(), se.metadata.name.clone())
            else {
                continue;
            };
            let Some(outcome) = outcomes.get(&(ns.clone(), name.clone())) else {
                continue;
            };
            let clash = outcome
                .as_ref()
                .ok()
                .and_then(|e| conflict(&self.site, e, catalog));
            let previous = se
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            let want = conditions(
                outcome,
                clash.as_deref(),
                se.metadata.generation,
                previous,
                &now,
            );
            let leads = self.leading.as_ref().is_none_or(|l| *l.borrow());
            if want != previous && leads {
                let api = Api::<ServiceExport>::namespaced(self.client.clone(), &ns);
                let patch = serde_json::json!({ "status": { "conditions": want } });
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        info!(namespace = %ns, %name, valid = %want[0].status, conflict = %want[1].status, reason = %want[0].reason, "ServiceExport status written")
                    }
                    Err(e) => {
                        warn!(namespace = %ns, %name, error = %e, "ServiceExport status not written")
                    }
                }
            }
            // A conflict is surfaced, not resolved by withdrawing: if both sides withdrew,
            // each would stop seeing the other and re-export, flapping forever.
            if let Ok(e) = outcome {
                out.exports.push(e.clone());
            }
        }
        out.exports.sort_by(|a, b| a.service.cmp(&b.service));
        if written.as_ref() != Some(&out) {
            match serde_json::to_vec_pretty(&out) {
                Ok(bytes) => {
                    let path = self.dir.join(EXPORTS_FILE);
                    match meshfed_identity::ca::write_file(&path, &bytes, 0o644) {
                        Ok(()) => {
                            debug!(exports = out.exports.len(), "kubernetes exports written");
                            *written = Some(out);
                        }
                        Err(e) => warn!(error = %e, "kubernetes exports not written"),
                    }
                }
                Err(e) => warn!(error = %e, "kubernetes exports not serialized"),
            }
        }
    }
}

/// Calls `on_change` with every ServiceImport in the cluster once the first list is in,
/// then after every change, until `stop` (for `meshfed dns --kubernetes`).
pub async fn follow_service_imports(
    client: kube::Client,
    stop: CancellationToken,
    mut on_change: impl FnMut(Vec<super::imports::ServiceImport>),
) {
    let changed = Arc::new(Notify::new());
    let store = mirror(Api::all(client), changed.clone(), stop.clone());
    if store.wait_until_ready().await.is_err() {
        return;
    }
    info!("following the cluster's ServiceImports");
    loop {
        on_change(items(&store));
        tokio::select! {
            _ = changed.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}
