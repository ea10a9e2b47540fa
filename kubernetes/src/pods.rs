//! Pod IP → workload identity, for a gateway whose egress knows its callers by their
//! source address (`caller_pod_ip`), as ztunnel does: a reflector over every Pod, and a
//! directory rebuilt from it after each change.
//!
//! Only what an address proves goes in ([`pod_addresses`], pure):
//! - a `hostNetwork` pod shares its node's address with every other such pod, so it
//!   names nobody;
//! - a pod that has finished (`Succeeded`, `Failed`) may have handed its address to a new
//!   pod;
//! - an address that two live pods with different identities claim (a reused IP seen
//!   before the old pod's deletion) names nobody until one goes.
//!
//! An address not in the directory is no caller: the egress refuses it
//! (`caller_unauthenticated`). A removed pod leaves the directory on its deletion event.
//! Each address carries its pod's labels (what a route's `sourceLabels` match); two
//! live pods of one identity on one address with different labels leave it with none.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;
use meshfed_identity::TrustDomain;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Callers by source address, as the gateway's egress reads them.
pub type Directory = Arc<ArcSwap<HashMap<IpAddr, KnownCaller>>>;

pub use meshfed_catalog::http_route::KnownCaller;

/// The addresses that name `pod`'s workload identity (none for host-network or
/// finished pods), with its labels. Pure.
pub fn pod_addresses(pod: &Pod, td: &TrustDomain) -> Vec<(IpAddr, KnownCaller)> {
    let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else {
        return vec![];
    };
    if spec.host_network == Some(true) {
        return vec![];
    }
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return vec![];
    }
    let Some(ns) = pod.metadata.namespace.as_deref() else {
        return vec![];
    };
    let sa = spec.service_account_name.as_deref().unwrap_or("default");
    let Some(id) = crate::workload_id(td, ns, sa) else {
        return vec![];
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    let caller = KnownCaller {
        id,
        labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
    };
    ips.into_iter().map(|ip| (ip, caller.clone())).collect()
}

/// The directory of `pods`: each address to its identity and labels, without the
/// addresses two identities claim (an address two pods of one identity claim with
/// different labels keeps the identity, with no labels). Returns it with the number of
/// conflicting addresses. Pure.
pub fn directory<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    td: &TrustDomain,
) -> (HashMap<IpAddr, KnownCaller>, usize) {
    let mut out: HashMap<IpAddr, Option<KnownCaller>> = HashMap::new();
    for pod in pods {
        for (ip, c) in pod_addresses(pod, td) {
            out.entry(ip)
                .and_modify(|have| match have {
                    Some(h) if h.id == c.id => {
                        if h.labels != c.labels {
                            h.labels = Arc::new(BTreeMap::new());
                        }
                    }
                    _ => *have = None,
                })
                .or_insert(Some(c));
        }
    }
    let conflicts = out.values().filter(|v| v.is_none()).count();
    (
        out.into_iter()
            .filter_map(|(ip, id)| id.map(|id| (ip, id)))
            .collect(),
        conflicts,
    )
}

/// Mirrors every Pod of the cluster into `out` until `stop`. Returns once the first
/// list has been applied (or `stop`), so that the egress does not refuse callers it
/// has simply not seen yet.
pub async fn reflect(
    client: kube::Client,
    td: TrustDomain,
    out: Directory,
    stop: CancellationToken,
) {
    let changed = Arc::new(Notify::new());
    let store = crate::controller::mirror_matching(
        Api::<Pod>::all(client),
        watcher::Config::default(),
        changed.clone(),
        stop.clone(),
    );
    tokio::select! {
        r = store.wait_until_ready() => if r.is_err() { return },
        _ = stop.cancelled() => return,
    }
    let apply = move || {
        let pods = store.state();
        let (dir, conflicts) = directory(pods.iter().map(|p| &**p), &td);
        debug!(
            pods = pods.len(),
            addresses = dir.len(),
            conflicts,
            "pod directory rebuilt"
        );
        (dir, conflicts, pods.len())
    };
    let (dir, conflicts, pods) = apply();
    info!(
        pods,
        addresses = dir.len(),
        conflicts,
        "pod directory ready"
    );
    out.store(Arc::new(dir));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = changed.notified() => {}
                _ = stop.cancelled() => return,
            }
            let (dir, _, _) = apply();
            out.store(Arc::new(dir));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use meshfed_identity::SpiffeId;

    fn labelled(mut p: Pod, version: &str) -> Pod {
        p.metadata.labels = Some([("version".to_string(), version.to_string())].into());
        p
    }

    fn pod(ns: &str, sa: Option<&str>, ips: &[&str], phase: &str, host: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        p.spec = Some(PodSpec {
            service_account_name: sa.map(Into::into),
            host_network: host.then_some(true),
            ..Default::default()
        });
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            pod_ip: ips.first().map(|s| (*s).into()),
            pod_ips: Some(ips.iter().map(|s| PodIP { ip: (*s).into() }).collect()),
            ..Default::default()
        });
        p
    }

    #[test]
    fn addresses_name_only_what_they_prove() {
        let td = TrustDomain::new("east.example.org").unwrap();
        let id = |s: &str| SpiffeId::new(&format!("spiffe://east.example.org/{s}")).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let pods = [
            pod(
                "shop",
                Some("frontend"),
                &["10.0.0.1", "fd00::1"],
                "Running",
                false,
            ),
            pod("shop", None, &["10.0.0.2"], "Pending", false),
            pod(
                "kube-system",
                Some("proxy"),
                &["192.168.1.10"],
                "Running",
                true,
            ),
            pod("batch", Some("job"), &["10.0.0.3"], "Succeeded", false),
            // 10.0.0.4 reused before the old pod's deletion: two identities claim it.
            pod("shop", Some("old"), &["10.0.0.4"], "Running", false),
            pod("pay", Some("new"), &["10.0.0.4"], "Running", false),
            // The same identity twice (a restarted pod) is no conflict.
            pod("shop", Some("frontend"), &["10.0.0.5"], "Running", false),
            pod("shop", Some("frontend"), &["10.0.0.5"], "Running", false),
            // The same identity twice with other labels: the identity, no labels.
            labelled(
                pod("shop", Some("frontend"), &["10.0.0.6"], "Running", false),
                "v1",
            ),
            labelled(
                pod("shop", Some("frontend"), &["10.0.0.6"], "Running", false),
                "v2",
            ),
        ];
        let (dir, conflicts) = directory(&pods, &td);
        let ids: HashMap<IpAddr, SpiffeId> =
            dir.iter().map(|(ip, c)| (*ip, c.id.clone())).collect();
        let want: HashMap<IpAddr, SpiffeId> = [
            (ip("10.0.0.1"), id("ns/shop/sa/frontend")),
            (ip("fd00::1"), id("ns/shop/sa/frontend")),
            (ip("10.0.0.2"), id("ns/shop/sa/default")),
            (ip("10.0.0.5"), id("ns/shop/sa/frontend")),
            (ip("10.0.0.6"), id("ns/shop/sa/frontend")),
        ]
        .into();
        assert_eq!(ids, want);
        assert_eq!(conflicts, 1);
        // Labels come with the address.
        assert_eq!(
            *dir[&ip("10.0.0.1")].labels,
            BTreeMap::from([("app".into(), "web".into())])
        );
        assert!(dir[&ip("10.0.0.6")].labels.is_empty());
        // A pod without status or namespace names nobody.
        assert!(pod_addresses(&Pod::default(), &td).is_empty());
    }
}
