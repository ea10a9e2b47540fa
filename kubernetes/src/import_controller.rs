//! The import controller: makes the cluster's ServiceImports, derived Services and
//! EndpointSlices match what the site's gateway imports (`<site dir>/imports.json`) and
//! which gateway pods are ready ([`super::imports::desired`]).
//!
//! - It writes only what differs from what its reflectors show, so a restart writes
//!   nothing when nothing changed.
//! - A withdrawn import's ServiceImport is deleted; the Service and slices it owns go
//!   with it through the cluster's garbage collector (owner references).
//! - It never touches objects without its `managed-by` label: a ServiceImport someone
//!   else made is reported and left alone.
//! - Every gateway replica may run one: they compute the same objects from the same
//!   catalog, and a create that loses a race is an `AlreadyExists` to ignore.
//! - After a write it waits for its own watch to show the result (or 5 s) before it
//!   looks at that object again, as client-go's controller expectations do, so a slow
//!   watch does not make it write twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::controller::{RECHECK, mirror_matching};
use super::imports::{
    Desired, GatewayPod, MANAGED_BY, MCS_SERVICE_LABEL, ServiceImport, by_service, desired_one,
    managed, owner, ready_gateways, update_import, update_service, update_slice,
};
use meshfed_catalog::routing::{IMPORTS_FILE, ImportListener, ImportListeners};

/// How long a write may take to show up in the controller's own watch.
const EXPECT: Duration = Duration::from_secs(5);
/// How often `imports.json` is looked at for a change (inotify wakes the controller at
/// once where it works; this is the fallback).
const FILE_POLL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct ImportController {
    pub client: kube::Client,
    /// The gateway's site directory: `imports.json` is read from it.
    pub dir: PathBuf,
    /// Where the gateway pods run, and the label selector that finds them.
    pub gateway_namespace: String,
    pub gateway_selector: String,
}

/// A complete import: what it should be, and its objects' resourceVersions then.
type Done = (Arc<Desired>, Vec<Option<String>>);

/// (plural, namespace, name)
type Key = (&'static str, String, String);

/// Writes not yet seen in the watch: the resourceVersion written (`None`: deleted).
#[derive(Default)]
struct Expectations(BTreeMap<Key, (Option<String>, Instant)>);

impl Expectations {
    /// Whether the object under `key` may be acted on: no write of ours is in flight.
    fn settled(&mut self, key: &Key, seen: Option<&str>) -> bool {
        let Some((want, at)) = self.0.get(key) else {
            return true;
        };
        if want.as_deref() == seen || at.elapsed() > EXPECT {
            self.0.remove(key);
            return true;
        }
        false
    }

    fn wrote(&mut self, key: Key, rv: Option<String>) {
        self.0.insert(key, (rv, Instant::now()));
    }
}

fn get<K>(store: &Store<K>, ns: &str, name: &str) -> Option<Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(ns))
}

fn rv<K: kube::Resource>(o: &Option<Arc<K>>) -> Option<&str> {
    o.as_ref()?.meta().resource_version.as_deref()
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

struct Round<'a> {
    client: &'a kube::Client,
    expect: &'a mut Expectations,
    /// Problems already logged, so that a persistent one is logged once.
    warned: &'a mut BTreeSet<String>,
    writes: usize,
    /// Imports found complete: what they should be and their objects'
    /// resourceVersions then. An import with neither changed since is skipped.
    done: &'a mut BTreeMap<(String, String), Done>,
}

impl Round<'_> {
    fn warn_once(&mut self, what: String) {
        if self.warned.insert(what.clone()) {
            warn!("{what}");
        }
    }

    /// Creates `want`, or replaces `have` with `update(have)` when that says something
    /// differs; returns the object as it now is.
    async fn ensure<K>(
        &mut self,
        plural: &'static str,
        have: Option<K>,
        want: &K,
        update: impl Fn(&K, &K) -> Option<K>,
    ) -> Option<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let ns = want.meta().namespace.clone().unwrap_or_default();
        let name = want.meta().name.clone().unwrap_or_default();
        let api = Api::<K>::namespaced(self.client.clone(), &ns);
        let key = (plural, ns.clone(), name.clone());
        let result = match &have {
            None => api.create(&PostParams::default(), want).await,
            Some(h) => match update(h, want) {
                None => return have,
                Some(next) => api.replace(&name, &PostParams::default(), &next).await,
            },
        };
        self.writes += 1;
        match result {
            Ok(o) => {
                debug!(kind = plural, namespace = %ns, %name, created = have.is_none(), "written");
                self.warned
                    .retain(|w| !w.contains(&format!(" {ns}/{name} ")));
                self.expect.wrote(key, o.meta().resource_version.clone());
                Some(o)
            }
            Err(e) if conflict(&e) => {
                // Another replica (or a stale view): the watch will show the winner.
                debug!(kind = plural, namespace = %ns, %name, error = %e, "write conflict; waiting for the watch");
                None
            }
            Err(e) => {
                self.warn_once(format!("{plural} {ns}/{name} not written: {e}"));
                None
            }
        }
    }
}

impl ImportController {
    pub async fn run(self, stop: CancellationToken) {
        let changed = Arc::new(Notify::new());
        let c = &self.client;
        let ours = watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
        let imports = mirror_matching(
            Api::<ServiceImport>::all(c.clone()),
            watcher::Config::default(),
            changed.clone(),
            stop.clone(),
        );
        let services = mirror_matching(
            Api::<Service>::all(c.clone()),
            ours.clone(),
            changed.clone(),
            stop.clone(),
        );
        let slices = mirror_matching(
            Api::<EndpointSlice>::all(c.clone()),
            ours,
            changed.clone(),
            stop.clone(),
        );
        let gateways = mirror_matching(
            Api::<Pod>::namespaced(c.clone(), &self.gateway_namespace),
            watcher::Config::default().labels(&self.gateway_selector),
            changed.clone(),
            stop.clone(),
        );
        for ready in [
            imports.wait_until_ready().await.is_ok(),
            services.wait_until_ready().await.is_ok(),
            slices.wait_until_ready().await.is_ok(),
            gateways.wait_until_ready().await.is_ok(),
        ] {
            if !ready {
                return;
            }
        }
        super::file_watch::watch(&self.dir, IMPORTS_FILE, changed.clone(), stop.clone());
        info!(namespace = %self.gateway_namespace, selector = %self.gateway_selector, "kubernetes import controller synced");
        let mut expect = Expectations::default();
        let mut warned = BTreeSet::new();
        // The imports.json bytes and Ready gateway pods `want` was built from.
        let mut inputs: Option<(Vec<u8>, Vec<GatewayPod>)> = None;
        let mut want: Vec<Arc<Desired>> = Vec::new();
        let mut built: BTreeMap<(String, String), (Vec<ImportListener>, Arc<Desired>)> =
            BTreeMap::new();
        let mut done = BTreeMap::new();
        let mtime = || meshfed_catalog::site::FileStamp::of(&self.dir.join(IMPORTS_FILE));
        loop {
            let seen = mtime();
            // No file yet (the gateway has not applied a catalog): nothing is known, so
            // nothing is deleted either.
            let bytes = match std::fs::read(self.dir.join(IMPORTS_FILE)) {
                Ok(b) => Some(b),
                Err(e) => {
                    if warned.insert("no imports.json".to_string()) {
                        info!(error = %e, "no imports.json yet; waiting for the gateway");
                    }
                    None
                }
            };
            if let Some(bytes) = bytes {
                let pods = gateways.state();
                let gws = ready_gateways(pods.iter().map(|p| &**p));
                // A service's objects are rebuilt only when what they come from changed:
                // its listeners, or the Ready gateway pods. An unchanged file is not
                // parsed again.
                let fresh = inputs
                    .as_ref()
                    .is_none_or(|(b, g)| *b != bytes || *g != gws);
                let usable = !fresh
                    || match serde_json::from_slice::<ImportListeners>(&bytes) {
                        Err(e) => {
                            if warned.insert(format!("bad imports.json {e}")) {
                                warn!(error = %e, "imports.json unreadable; keeping the cluster as it is");
                            }
                            false
                        }
                        Ok(listeners) => {
                            if inputs.as_ref().is_none_or(|(_, g)| *g != gws) {
                                built.clear();
                            }
                            let mut next = BTreeMap::new();
                            want = by_service(&listeners)
                                .into_iter()
                                .map(|((ns, name), ls)| {
                                    let key = (ns.to_owned(), name.to_owned());
                                    let owned: Vec<ImportListener> =
                                        ls.iter().map(|l| (*l).clone()).collect();
                                    let d = match built.remove(&key) {
                                        Some((was, d)) if was == owned => d,
                                        _ => Arc::new(desired_one(ns, name, &ls, &gws)),
                                    };
                                    next.insert(key, (owned, d.clone()));
                                    d
                                })
                                .collect();
                            built = next;
                            inputs = Some((bytes, gws));
                            true
                        }
                    };
                if usable {
                    let mut round = Round {
                        client: &self.client,
                        expect: &mut expect,
                        warned: &mut warned,
                        writes: 0,
                        done: &mut done,
                    };
                    let t = std::time::Instant::now();
                    reconcile(&mut round, &want, &imports, &services, &slices).await;
                    debug!(writes = round.writes, imports = want.len(), took = ?t.elapsed(), "import reconcile");
                }
            }
            // Wake on a cluster change, on a new imports.json (inotify, or its
            // modification time every FILE_POLL), and every RECHECK for failed writes.
            let deadline = tokio::time::Instant::now() + RECHECK;
            loop {
                tokio::select! {
                    _ = changed.notified() => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = tokio::time::sleep(FILE_POLL) => if mtime() != seen { break },
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn reconcile(
    r: &mut Round<'_>,
    want: &[Arc<Desired>],
    imports: &Store<ServiceImport>,
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
) {
    let mut keep: BTreeSet<(String, String)> = BTreeSet::new();
    // Our slices by the import they belong to (namespace, MCS service name).
    let all_slices = slices.state();
    let mut slices_of: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &all_slices {
        if let (Some(ns), Some(svc)) = (
            s.metadata.namespace.as_deref(),
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MCS_SERVICE_LABEL)),
        ) {
            slices_of.entry((ns, svc.as_str())).or_default().push(s);
        }
    }
    for d in want {
        let (ns, name) = (d.namespace().to_owned(), d.name().to_owned());
        keep.insert((ns.clone(), name.clone()));
        let svc_name = d.service.metadata.name.clone().unwrap_or_default();
        let si_ref = get(imports, &ns, &name);
        let svc_ref = get(services, &ns, &svc_name);
        let slice_refs: Vec<_> = d
            .slices
            .iter()
            .map(|s| get(slices, &ns, s.metadata.name.as_deref().unwrap_or_default()))
            .collect();
        let seen: Vec<Option<String>> = std::iter::once(rv(&si_ref))
            .chain(std::iter::once(rv(&svc_ref)))
            .chain(slice_refs.iter().map(rv))
            .map(|v| v.map(str::to_owned))
            .collect();
        let key = (ns.clone(), name.clone());
        if r.done
            .get(&key)
            .is_some_and(|(was, rvs)| Arc::ptr_eq(was, d) && *rvs == seen)
        {
            continue; // complete, and nothing about it changed since
        }
        r.done.remove(&key);
        // Copied only now: most imports are skipped above without a copy.
        let have_si = si_ref.map(|o| (*o).clone());
        let have_svc = svc_ref.map(|o| (*o).clone());
        let have_slices: Vec<Option<EndpointSlice>> = slice_refs
            .into_iter()
            .map(|o| o.map(|o| (*o).clone()))
            .collect();
        let mut settled = r.expect.settled(
            &("serviceimports", ns.clone(), name.clone()),
            seen[0].as_deref(),
        );
        settled &= r.expect.settled(
            &("services", ns.clone(), svc_name.clone()),
            seen[1].as_deref(),
        );
        for (s, h) in d.slices.iter().zip(&seen[2..]) {
            let key = (
                "endpointslices",
                ns.clone(),
                s.metadata.name.clone().unwrap_or_default(),
            );
            settled &= r.expect.settled(&key, h.as_deref());
        }
        if !settled {
            continue; // a write of ours is still on its way to the watch
        }
        if let Some(h) = &have_si
            && !managed(&h.metadata)
        {
            r.warn_once(format!(
                "ServiceImport {ns}/{name} exists and is not managed by meshfed: import not materialised"
            ));
            continue;
        }
        // Created here; updated below, once its clusterset IP is known.
        let si = match have_si {
            Some(h) => h,
            None => match r
                .ensure("serviceimports", None, &d.import, update_import)
                .await
            {
                Some(si) => si,
                None => continue,
            },
        };
        let Some(owner) = owner(&si) else { continue };
        let mut svc = d.service.clone();
        svc.metadata.owner_references = Some(vec![owner.clone()]);
        let Some(svc) = r.ensure("services", have_svc, &svc, update_service).await else {
            continue;
        };
        let mut complete = true;
        let mut rvs = vec![None, svc.metadata.resource_version.clone()];
        for (s, h) in d.slices.iter().zip(have_slices) {
            let mut s = s.clone();
            s.metadata.owner_references = Some(vec![owner.clone()]);
            match r.ensure("endpointslices", h, &s, update_slice).await {
                Some(o) => rvs.push(o.metadata.resource_version),
                None => complete = false,
            }
        }
        // Slices of this import no longer wanted (an address family gone).
        let wanted: BTreeSet<&str> = d
            .slices
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
            .collect();
        for stale in slices_of
            .get(&(ns.as_str(), name.as_str()))
            .into_iter()
            .flatten()
            .filter(|s| !wanted.contains(s.metadata.name.as_deref().unwrap_or_default()))
        {
            let sname = stale.metadata.name.clone().unwrap_or_default();
            complete = false; // looked at again once the deletion shows
            let key = ("endpointslices", ns.clone(), sname.clone());
            if r.expect
                .settled(&key, stale.metadata.resource_version.as_deref())
            {
                let api = Api::<EndpointSlice>::namespaced(r.client.clone(), &ns);
                r.writes += 1;
                match api.delete(&sname, &DeleteParams::background()).await {
                    Ok(_) => r.expect.wrote(key, None),
                    Err(e) => r.warn_once(format!("endpointslices {ns}/{sname} not deleted: {e}")),
                }
            }
        }
        // The clusterset IP is the derived Service's cluster IP, known once it exists.
        let mut si_want = d.import.clone();
        si_want.spec.ips = svc
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .filter(|ip| !ip.is_empty() && ip != "None")
            .into_iter()
            .collect();
        let Some(si) = r
            .ensure("serviceimports", Some(si), &si_want, update_import)
            .await
        else {
            continue;
        };
        rvs[0] = si.metadata.resource_version.clone();
        if si.status != si_want.status {
            let api = Api::<ServiceImport>::namespaced(r.client.clone(), &ns);
            let patch = serde_json::json!({ "status": si_want.status });
            r.writes += 1;
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(o) => {
                    rvs[0] = o.metadata.resource_version.clone();
                    r.expect.wrote(
                        ("serviceimports", ns.clone(), name.clone()),
                        o.metadata.resource_version.clone(),
                    );
                    info!(namespace = %ns, %name, ips = ?si_want.spec.ips, clusters = ?si_want.status.as_ref().map(|s| s.clusters.iter().map(|c| c.cluster.clone()).collect::<Vec<_>>()), "ServiceImport ready");
                }
                Err(e) => {
                    complete = false;
                    r.warn_once(format!(
                        "serviceimports {ns}/{name} status not written: {e}"
                    ))
                }
            }
        }
        if complete {
            r.done.insert(key, (d.clone(), rvs));
        }
    }
    r.done.retain(|k, _| keep.contains(k));
    // Withdrawn imports: their ServiceImport goes, and the garbage collector takes the
    // Service and slices it owns.
    for si in imports.state() {
        let (Some(ns), Some(name)) = (si.metadata.namespace.clone(), si.metadata.name.clone())
        else {
            continue;
        };
        if !managed(&si.metadata)
            || keep.contains(&(ns.clone(), name.clone()))
            || si.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let key = ("serviceimports", ns.clone(), name.clone());
        if !r
            .expect
            .settled(&key, si.metadata.resource_version.as_deref())
        {
            continue;
        }
        let api = Api::<ServiceImport>::namespaced(r.client.clone(), &ns);
        r.writes += 1;
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {
                info!(namespace = %ns, %name, "import withdrawn: ServiceImport deleted");
                r.expect.wrote(key, None);
            }
            Err(e) => r.warn_once(format!("serviceimports {ns}/{name} not deleted: {e}")),
        }
    }
}
