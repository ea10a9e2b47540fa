//! Kubernetes as a catalog source, through the Multi-Cluster Services API (KEP-1645): a
//! Service that has a `ServiceExport` (`multicluster.x-k8s.io/v1alpha1`) in the same
//! namespace is exported with its ports and protocols, its ready endpoints (from its
//! EndpointSlices) and its workload identities (`spiffe://<td>/ns/<ns>/sa/<sa>`, from the
//! service accounts of the pods behind the ready endpoints). The ServiceExport's status
//! gets the MCS conditions `Valid` and `Conflict`.
//!
//! The mapping here is pure: objects (the real `k8s-openapi` types) in, exports and
//! conditions out; `controller` watches a cluster and applies them, writing
//! `kubernetes.json` ([`meshfed_catalog::site::KubeExports`]) for the gateway.
//!
//! The import side: `imports` (pure) and `import_controller` make ServiceImports and
//! derived Services match what the site's gateway imports; `dns` maps any MCS
//! implementation's ServiceImports to `clusterset.local` records for `meshfed dns
//! --kubernetes`. `file_watch` wakes a controller when a file it follows changes.
//! `pods` maps pod IPs to workload identities for a gateway whose egress names its
//! callers by their source address (`caller_pod_ip`). `leader` elects one leader among
//! the controller replicas beside a site's gateway replicas (a `coordination.k8s.io`
//! Lease), so two replicas never write the same objects.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use meshfed_identity::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use meshfed_catalog::catalog::{AppProtocol, Catalog, Protocol};
use meshfed_catalog::names::{ServiceName, SiteName};
pub use meshfed_catalog::site::{KubeExport, KubePort};

pub mod controller;
pub mod dns;
pub mod file_watch;
pub mod import_controller;
pub mod imports;
pub mod leader;
pub mod pods;

/// A pod's workload identity, Istio's convention: `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn workload_id(td: &TrustDomain, namespace: &str, service_account: &str) -> Option<SpiffeId> {
    td.child(&["ns", namespace, "sa", service_account]).ok()
}

/// The label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An MCS `ServiceExport`: it has no spec, only status (hand-written rather than derived,
/// so that objects without a `spec` read back).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct ServiceExport {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceExportStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct ServiceExportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// `kube::Resource` for a namespaced MCS type (`multicluster.x-k8s.io/v1alpha1`).
macro_rules! mcs_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                "multicluster.x-k8s.io".into()
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                "v1alpha1".into()
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use mcs_resource;

mcs_resource!(ServiceExport, "ServiceExport", "serviceexports");

/// Why a ServiceExport is not valid: the MCS `Valid=False` reason and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

/// Everything the source has observed in the cluster.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub exports: &'a [ServiceExport],
    pub services: &'a [Service],
    pub slices: &'a [EndpointSlice],
    pub pods: &'a [Pod],
}

/// The outcome for one ServiceExport, by `(namespace, name)`.
pub type Outcomes = BTreeMap<(String, String), Result<KubeExport, Invalid>>;

/// Objects by `(namespace, name)`.
fn by_name<K: kube::Resource>(objs: &[K]) -> BTreeMap<(&str, &str), &K> {
    objs.iter()
        .filter_map(|o| {
            Some((
                (o.meta().namespace.as_deref()?, o.meta().name.as_deref()?),
                o,
            ))
        })
        .collect()
}

/// Maps every ServiceExport to its export or the reason it is invalid.
pub fn exports(td: &TrustDomain, o: Observed<'_>) -> Outcomes {
    let services = by_name(o.services);
    let pods = by_name(o.pods);
    let mut out = BTreeMap::new();
    for se in o.exports {
        let (Some(ns), Some(name)) = (
            se.metadata.namespace.as_deref(),
            se.metadata.name.as_deref(),
        ) else {
            continue;
        };
        if se.metadata.deletion_timestamp.is_some() {
            continue; // being unexported
        }
        let r = match services.get(&(ns, name)) {
            None => Err(Invalid {
                reason: "NoService",
                message: format!("Service {ns}/{name} does not exist"),
            }),
            Some(svc) => export_one(td, ns, name, svc, o.slices, &pods),
        };
        out.insert((ns.to_owned(), name.to_owned()), r);
    }
    out
}

fn export_one(
    td: &TrustDomain,
    ns: &str,
    name: &str,
    svc: &Service,
    slices: &[EndpointSlice],
    pods: &BTreeMap<(&str, &str), &Pod>,
) -> Result<KubeExport, Invalid> {
    let invalid = |reason, message: String| Err(Invalid { reason, message });
    let service = match ServiceName::parse(&format!("{name}.{ns}")) {
        Ok(s) => s,
        Err(e) => return invalid("InvalidServiceName", e.to_string()),
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return invalid(
            "InvalidServiceType",
            "ExternalName Services cannot be exported".into(),
        );
    }
    let mine: Vec<&EndpointSlice> = slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(ns)
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == Some(name)
        })
        .collect();
    let mut ports = Vec::new();
    let mut skipped = Vec::new();
    let mut ready_ips: BTreeSet<IpAddr> = BTreeSet::new();
    let mut identities: BTreeSet<SpiffeId> = BTreeSet::new();
    let mut labels = BTreeMap::new();
    for p in spec.ports.unwrap_or_default() {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                skipped.push(format!("{} ({other})", p.port));
                continue;
            }
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let mut endpoints = BTreeSet::new();
        for slice in &mine {
            // The slice port for this Service port has the same name (both unnamed for
            // a single-port Service) and protocol; its number is what the pods listen on.
            let Some(target) = slice.ports.iter().flatten().find(|sp| {
                sp.name.as_deref().unwrap_or("") == p.name.as_deref().unwrap_or("")
                    && sp.protocol.as_deref().unwrap_or("TCP")
                        == p.protocol.as_deref().unwrap_or("TCP")
            }) else {
                continue;
            };
            let Some(target) = target.port.and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                // Ready unset means unknown, which consumers treat as ready.
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let terminating = ep
                    .conditions
                    .as_ref()
                    .and_then(|c| c.terminating)
                    .unwrap_or(false);
                if !ready || terminating {
                    continue;
                }
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.as_deref())
                    .and_then(|n| pods.get(&(ns, n)));
                for a in &ep.addresses {
                    let Ok(ip) = a.parse::<IpAddr>() else {
                        continue; // FQDN endpoints are not reachable by address
                    };
                    endpoints.insert(SocketAddr::new(ip, target));
                    ready_ips.insert(ip);
                    if let Some(l) = pod.map(|p| pod_labels(p)).filter(|l| !l.is_empty()) {
                        labels.insert(ip, l);
                    }
                }
                if let Some(pod) = pod {
                    let sa = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.as_deref())
                        .unwrap_or("default");
                    if let Some(id) = workload_id(td, ns, sa) {
                        identities.insert(id);
                    }
                }
            }
        }
        // `appProtocol` first (a standard name, or `kubernetes.io/h2c`), then Istio's
        // convention: a port named `http`, `http-web`, `grpc-api`, ...
        let app_protocol = match (protocol, &p.app_protocol) {
            (Protocol::Udp, _) => AppProtocol::Tcp,
            (_, Some(a)) => AppProtocol::from_istio(a),
            (_, None) => AppProtocol::from_istio(
                p.name
                    .as_deref()
                    .unwrap_or("")
                    .split('-')
                    .next()
                    .unwrap_or(""),
            ),
        };
        ports.push(KubePort {
            port,
            protocol,
            name: p.name.clone(),
            app_protocol,
            endpoints: endpoints.into_iter().collect(),
        });
    }
    if ports.is_empty() {
        let why = if skipped.is_empty() {
            "the Service has no ports".to_string()
        } else {
            format!("no TCP or UDP port (unsupported: {})", skipped.join(", "))
        };
        return invalid("NoSupportedPorts", why);
    }
    Ok(KubeExport {
        service,
        ports,
        ready: u32::try_from(ready_ips.len()).unwrap_or(u32::MAX),
        identities: identities.into_iter().collect(),
        labels,
    })
}

/// Labels that differ per rollout revision, not per version: left out, so one
/// Deployment's pods publish one label set.
const REVISION_LABELS: &[&str] = &["pod-template-hash", "controller-revision-hash"];

/// A pod's labels as subsets select them (valid label syntax, the revision hashes left
/// out).
fn pod_labels(pod: &Pod) -> BTreeMap<String, String> {
    let l: BTreeMap<String, String> = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| !REVISION_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    match meshfed_catalog::http_route::check_labels(&l) {
        Ok(()) => l,
        Err(_) => BTreeMap::new(),
    }
}

/// A conflict with another site's export of the same service (namespace sameness: one
/// name, one definition): a port name bound to another number or protocol. `None`: none.
pub fn conflict(me: &SiteName, export: &KubeExport, catalog: &Catalog) -> Option<String> {
    for ((site, svc), other) in &catalog.exports {
        if site == me || svc != &export.service {
            continue;
        }
        for mine in &export.ports {
            let Some(name) = &mine.name else { continue };
            if let Some(theirs) = other.ports.iter().find(|p| p.name.as_ref() == Some(name))
                && (theirs.port != mine.port || theirs.protocol != mine.protocol)
            {
                return Some(format!(
                    "port {name:?} is {}/{} here but {}/{} at site {site}",
                    mine.port, mine.protocol, theirs.port, theirs.protocol
                ));
            }
        }
    }
    None
}

/// The MCS conditions for one ServiceExport. `previous` keeps each condition's
/// `lastTransitionTime` while its status is unchanged, so that recomputing them changes
/// nothing (no write, no churn).
pub fn conditions(
    outcome: &Result<KubeExport, Invalid>,
    conflict: Option<&str>,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    let (valid, vreason, vmsg) = match outcome {
        Ok(e) => (
            "True",
            "ServiceExported",
            format!(
                "exported with {} port(s) and {} ready endpoint(s)",
                e.ports.len(),
                e.ready
            ),
        ),
        Err(i) => ("False", i.reason, i.message.clone()),
    };
    let (cstatus, creason, cmsg) = match conflict {
        Some(m) => ("True", "PortConflict", m.to_owned()),
        None => (
            "False",
            "NoConflicts",
            "no conflict with other sites".to_owned(),
        ),
    };
    [
        ("Valid", valid, vreason, vmsg),
        ("Conflict", cstatus, creason, cmsg),
    ]
    .into_iter()
    .map(|(type_, status, reason, message)| {
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: since,
        }
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ObjectReference, PodSpec, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use meshfed_catalog::catalog::{Change, Delta, Export, ExportedPort, Revision, SiteRecord};

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn svc(ns: &str, name: &str, ports: &[(&str, i32, &str)]) -> Service {
        Service {
            metadata: meta(ns, name),
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, proto)| ServicePort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            port: *p,
                            protocol: Some(proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A slice of `service` with ports `(name, target)` and endpoints `(ip, pod, ready)`.
    fn slice(
        ns: &str,
        service: &str,
        ports: &[(&str, i32)],
        eps: &[(&str, &str, Option<bool>)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                ..meta(ns, &format!("{service}-abcde"))
            },
            address_type: "IPv4".into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                eps.iter()
                    .map(|(ip, pod, ready)| Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..Default::default()
                        }),
                        target_ref: Some(ObjectReference {
                            kind: Some("Pod".into()),
                            name: Some(pod.to_string()),
                            namespace: Some(ns.into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn pod(ns: &str, name: &str, sa: Option<&str>) -> Pod {
        Pod {
            metadata: meta(ns, name),
            spec: Some(PodSpec {
                service_account_name: sa.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn se(ns: &str, name: &str) -> ServiceExport {
        ServiceExport {
            metadata: meta(ns, name),
            status: None,
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("west.example.org").unwrap()
    }

    #[test]
    fn an_exported_service_has_its_ports_ready_endpoints_and_identities() {
        let services = [svc(
            "shop",
            "orders",
            &[("http", 80, "TCP"), ("", 9000, "SCTP")],
        )];
        let slices = [slice(
            "shop",
            "orders",
            &[("http", 8080)],
            &[
                ("10.0.0.1", "orders-1", Some(true)),
                ("10.0.0.2", "orders-2", None),
                ("10.0.0.3", "orders-3", Some(false)),
            ],
        )];
        let mut pods = [
            pod("shop", "orders-1", Some("orders")),
            pod("shop", "orders-2", None),
            pod("shop", "orders-3", Some("other")),
        ];
        pods[0].metadata.labels = Some(
            [
                ("app", "orders"),
                ("version", "v2"),
                ("pod-template-hash", "5d4f8c"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        );
        pods[1].metadata.labels = Some([("bad key".to_string(), "x".to_string())].into());
        let out = exports(
            &td(),
            Observed {
                exports: &[se("shop", "orders"), se("shop", "missing")],
                services: &services,
                slices: &slices,
                pods: &pods,
            },
        );
        let e = out[&("shop".into(), "orders".into())].as_ref().unwrap();
        assert_eq!(e.service.to_string(), "orders.shop");
        assert_eq!(e.ports.len(), 1, "SCTP is not carried");
        assert_eq!(e.ports[0].port, 80);
        assert_eq!(
            e.ports[0].endpoints,
            vec![
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.2:8080".parse().unwrap()
            ],
            "not-ready endpoints are left out; unknown readiness counts as ready"
        );
        assert_eq!(e.ready, 2);
        let ids: Vec<&str> = e.identities.iter().map(SpiffeId::as_str).collect();
        assert_eq!(
            ids,
            vec![
                "spiffe://west.example.org/ns/shop/sa/default",
                "spiffe://west.example.org/ns/shop/sa/orders"
            ]
        );
        // Pod labels by pod IP, without the rollout's hash; a pod whose labels are not
        // valid label syntax (an API server would have refused them) publishes none.
        assert_eq!(
            e.labels,
            BTreeMap::from([(
                "10.0.0.1".parse().unwrap(),
                [("app", "orders"), ("version", "v2")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into()
            )])
        );
        let missing = out[&("shop".into(), "missing".into())]
            .as_ref()
            .unwrap_err();
        assert_eq!(missing.reason, "NoService");
    }

    #[test]
    fn external_name_and_portless_services_are_invalid() {
        let mut ext = svc("a", "x", &[("", 80, "TCP")]);
        ext.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        let sctp = svc("a", "y", &[("", 80, "SCTP")]);
        let out = exports(
            &td(),
            Observed {
                exports: &[se("a", "x"), se("a", "y")],
                services: &[ext, sctp],
                slices: &[],
                pods: &[],
            },
        );
        assert_eq!(
            out[&("a".into(), "x".into())].as_ref().unwrap_err().reason,
            "InvalidServiceType"
        );
        let y = out[&("a".into(), "y".into())].as_ref().unwrap_err();
        assert_eq!(y.reason, "NoSupportedPorts");
        assert!(y.message.contains("80 (SCTP)"), "{}", y.message);
    }

    fn catalog_with(site: &str, port: u16, protocol: Protocol, name: &str) -> Catalog {
        let mut c = Catalog::default();
        let s = SiteName::new(site).unwrap();
        for (i, change) in [
            Change::PutSite(SiteRecord {
                site: s.clone(),
                trust_domain: TrustDomain::new("east.example.org").unwrap(),
                gateway_addresses: vec![],
                up: true,
            }),
            Change::PutExport {
                site: s,
                export: Export {
                    endpoint_labels: Vec::new(),
                    http_policy: None,
                    service: ServiceName::parse("orders.shop").unwrap(),
                    ports: vec![ExportedPort {
                        app_protocol: Default::default(),
                        port,
                        protocol,
                        name: Some(name.into()),
                    }],
                    ready_endpoints: 1,
                    identities: vec![],
                    locality: None,
                    labels: Default::default(),
                    hosts: vec![],
                },
            },
        ]
        .into_iter()
        .enumerate()
        {
            c.apply(&Delta {
                revision: Revision(i as u64 + 1),
                change,
            })
            .unwrap();
        }
        c
    }

    #[test]
    fn a_port_defined_differently_at_another_site_is_a_conflict() {
        let mine = KubeExport {
            labels: Default::default(),
            service: ServiceName::parse("orders.shop").unwrap(),
            ports: vec![KubePort {
                app_protocol: Default::default(),
                port: 80,
                protocol: Protocol::Tcp,
                name: Some("http".into()),
                endpoints: vec![],
            }],
            ready: 1,
            identities: vec![],
        };
        let west = SiteName::new("west").unwrap();
        let same = catalog_with("east", 80, Protocol::Tcp, "http");
        assert_eq!(conflict(&west, &mine, &same), None);
        let other = catalog_with("east", 8080, Protocol::Tcp, "http");
        let msg = conflict(&west, &mine, &other).unwrap();
        assert!(
            msg.contains("80/tcp here but 8080/tcp at site east"),
            "{msg}"
        );
        // Our own export in the catalog is not a conflict with ourselves.
        assert_eq!(
            conflict(&SiteName::new("east").unwrap(), &mine, &other),
            None
        );
    }

    #[test]
    fn recomputed_conditions_are_identical() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let ok: Result<KubeExport, Invalid> = Ok(KubeExport {
            labels: Default::default(),
            service: ServiceName::parse("orders.shop").unwrap(),
            ports: vec![],
            ready: 0,
            identities: vec![],
        });
        let first = conditions(&ok, None, Some(3), &[], &t0);
        assert_eq!(first[0].type_, "Valid");
        assert_eq!(first[0].status, "True");
        assert_eq!(first[1].type_, "Conflict");
        assert_eq!(first[1].status, "False");
        // Later, nothing changed: the same conditions, the old transition times.
        assert_eq!(conditions(&ok, None, Some(3), &first, &t1), first);
        // A conflict appears: only that condition moves.
        let c = conditions(&ok, Some("port clash"), Some(3), &first, &t1);
        assert_eq!(c[0], first[0]);
        assert_eq!(
            (c[1].status.as_str(), c[1].reason.as_str()),
            ("True", "PortConflict")
        );
        assert_eq!(c[1].last_transition_time, t1);
    }
}
