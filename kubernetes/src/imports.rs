//! The Kubernetes side of imports, as MCS (KEP-1645) describes it: for every service the
//! site's gateway imports, a `ServiceImport` in the service's namespace (namespace
//! sameness), and a derived Service with its EndpointSlices that send in-cluster clients
//! to the gateway pods' import listeners. The Service and the slices are owned by the
//! ServiceImport, so deleting a withdrawn import garbage-collects them.
//!
//! Pure: what the gateway listens on (`imports.json`) and the gateway pods in, the
//! objects that should exist out; plus the comparisons that keep a restart from writing
//! anything that is already right. `import_controller` applies them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use super::{SERVICE_NAME_LABEL, mcs_resource};
use meshfed_catalog::catalog::Protocol;
use meshfed_catalog::routing::{ImportListener, ImportListeners};

/// Marks every object the import controller owns; the only ones it updates or deletes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshfed-import-controller");
/// The MCS label naming the imported service on its derived Service and slices.
pub const MCS_SERVICE_LABEL: &str = "multicluster.kubernetes.io/service-name";
/// Tells the cluster's EndpointSlice controller that these slices are not its own.
pub const SLICE_MANAGED_BY: (&str, &str) = (
    "endpointslice.kubernetes.io/managed-by",
    "meshfed.io/import-controller",
);

/// An MCS `ServiceImport`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct ServiceImport {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceImportSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceImportStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    #[serde(default)]
    pub ports: Vec<ServiceImportPort>,
    /// The clusterset IP: the derived Service's cluster IP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type", default)]
    pub type_: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub port: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ServiceImportStatus {
    /// The sites (clusters) serving the service.
    #[serde(default)]
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ClusterStatus {
    pub cluster: String,
}

mcs_resource!(ServiceImport, "ServiceImport", "serviceimports");

/// A ready gateway pod: where in-cluster clients are sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPod {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
}

/// The gateway pods that are Ready, not being deleted and have an IP, by name.
pub fn ready_gateways<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<GatewayPod> {
    let mut out: Vec<GatewayPod> = pods
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if !ready {
                return None;
            }
            let mut ips: Vec<IpAddr> = status
                .pod_ips
                .iter()
                .flatten()
                .filter_map(|i| i.ip.parse().ok())
                .collect();
            if ips.is_empty() {
                ips.extend(
                    status
                        .pod_ip
                        .as_deref()
                        .and_then(|i| i.parse::<IpAddr>().ok()),
                );
            }
            (!ips.is_empty()).then(|| GatewayPod {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                ips,
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The derived Service's name: fixed per service, distinct from any Service of the
/// same name the cluster has itself, and a valid DNS label.
pub fn derived_name(namespace: &str, name: &str) -> String {
    format!(
        "derived-{:016x}",
        meshfed_catalog::routing::fnv(&format!("{namespace}/{name}"))
    )
}

/// What should exist for one imported service. Owner references and the clusterset IP
/// are filled in by the controller once the ServiceImport and the Service exist.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub import: ServiceImport,
    pub service: Service,
    pub slices: Vec<EndpointSlice>,
}

impl Desired {
    pub fn namespace(&self) -> &str {
        self.import
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default()
    }
    pub fn name(&self) -> &str {
        self.import.metadata.name.as_deref().unwrap_or_default()
    }
}

fn k8s_protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// A Kubernetes port name: a DNS label of at most 15 characters (IANA service name).
fn valid_port_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.bytes().any(|b| b.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The objects for every import the gateway listens on, by `(namespace, name)`.
pub fn desired(listeners: &ImportListeners, gateways: &[GatewayPod]) -> Vec<Desired> {
    by_service(listeners)
        .into_iter()
        .map(|((ns, name), ls)| desired_one(ns, name, &ls, gateways))
        .collect()
}

/// The listeners of each imported service, by `(namespace, name)`.
pub fn by_service(listeners: &ImportListeners) -> BTreeMap<(&str, &str), Vec<&ImportListener>> {
    let mut out: BTreeMap<(&str, &str), Vec<&ImportListener>> = BTreeMap::new();
    for l in &listeners.imports {
        out.entry((l.service.namespace(), l.service.name()))
            .or_default()
            .push(l);
    }
    out
}

/// The objects for one imported service, from its listeners.
pub fn desired_one(
    ns: &str,
    name: &str,
    listeners: &[&ImportListener],
    gateways: &[GatewayPod],
) -> Desired {
    type Port<'a> = (u16, Protocol, Option<&'a String>, u16);
    let mut ports: Vec<Port<'_>> = Vec::new();
    let mut clusters: BTreeSet<&str> = BTreeSet::new();
    for l in listeners {
        ports.push((l.port, l.protocol, l.name.as_ref(), l.listen.port()));
        clusters.extend(l.backends.iter().map(|s| s.as_str()));
    }
    {
        ports.sort_by_key(|p| (p.0, p.1));
        ports.dedup_by_key(|p| (p.0, p.1));
        // A Service with several ports needs a distinct valid name for each.
        let mut seen = BTreeSet::new();
        let names: Vec<Option<String>> = ports
            .iter()
            .map(|(port, proto, name, _)| {
                let given = name.filter(|n| valid_port_name(n)).cloned();
                let n = match given {
                    Some(n) if !seen.contains(&n) => Some(n),
                    _ if ports.len() == 1 => None,
                    _ => Some(format!("{}-{port}", proto.as_str())),
                };
                if let Some(n) = &n {
                    seen.insert(n.clone());
                }
                n
            })
            .collect();
        let derived = derived_name(ns, name);
        let import = ServiceImport {
            metadata: ObjectMeta {
                namespace: Some(ns.to_owned()),
                name: Some(name.to_owned()),
                labels: Some(labels(&[MANAGED_BY])),
                ..Default::default()
            },
            spec: ServiceImportSpec {
                ports: ports
                    .iter()
                    .zip(&names)
                    .map(|((port, proto, _, _), n)| ServiceImportPort {
                        name: n.clone(),
                        protocol: Some(k8s_protocol(*proto).into()),
                        port: i32::from(*port),
                    })
                    .collect(),
                ips: vec![],
                type_: "ClusterSetIP".into(),
            },
            status: Some(ServiceImportStatus {
                clusters: clusters
                    .into_iter()
                    .map(|c| ClusterStatus { cluster: c.into() })
                    .collect(),
            }),
        };
        let service = Service {
            metadata: ObjectMeta {
                namespace: Some(ns.to_owned()),
                name: Some(derived.clone()),
                labels: Some(labels(&[MANAGED_BY, (MCS_SERVICE_LABEL, name)])),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                ports: Some(
                    ports
                        .iter()
                        .zip(&names)
                        .map(|((port, proto, _, listen), n)| ServicePort {
                            name: n.clone(),
                            port: i32::from(*port),
                            protocol: Some(k8s_protocol(*proto).into()),
                            target_port: Some(IntOrString::Int(i32::from(*listen))),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let slice_ports: Vec<EndpointPort> = ports
            .iter()
            .zip(&names)
            .map(|((_, proto, _, listen), n)| EndpointPort {
                name: n.clone(),
                port: Some(i32::from(*listen)),
                protocol: Some(k8s_protocol(*proto).into()),
                ..Default::default()
            })
            .collect();
        let mut slices = Vec::new();
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let endpoints: Vec<Endpoint> = gateways
                .iter()
                .flat_map(|g| {
                    g.ips
                        .iter()
                        .filter(move |ip| ip.is_ipv6() == v6)
                        .map(move |ip| Endpoint {
                            addresses: vec![ip.to_string()],
                            conditions: Some(EndpointConditions {
                                ready: Some(true),
                                serving: Some(true),
                                terminating: Some(false),
                            }),
                            node_name: g.node.clone(),
                            target_ref: Some(ObjectReference {
                                kind: Some("Pod".into()),
                                namespace: Some(g.namespace.clone()),
                                name: Some(g.name.clone()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                })
                .collect();
            // IPv4 always exists, empty when no gateway is ready; IPv6 only when used.
            if v6 && endpoints.is_empty() {
                continue;
            }
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    namespace: Some(ns.to_owned()),
                    name: Some(format!("{derived}-{}", family.to_ascii_lowercase())),
                    labels: Some(labels(&[
                        MANAGED_BY,
                        SLICE_MANAGED_BY,
                        (SERVICE_NAME_LABEL, &derived),
                        (MCS_SERVICE_LABEL, name),
                    ])),
                    ..Default::default()
                },
                address_type: family.into(),
                endpoints: Some(endpoints),
                ports: Some(slice_ports.clone()),
            });
        }
        Desired {
            import,
            service,
            slices,
        }
    }
}

/// Whether `meta` is the import controller's.
pub fn managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1)
}

/// The owner reference that makes `import` own its derived objects.
pub fn owner(import: &ServiceImport) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "multicluster.x-k8s.io/v1alpha1".into(),
        kind: "ServiceImport".into(),
        name: import.metadata.name.clone()?,
        uid: import.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

/// `want`'s labels are all on `have` (other labels are left alone).
fn has_labels(have: &ObjectMeta, want: &ObjectMeta) -> bool {
    want.labels.iter().flatten().all(|(k, v)| {
        have.labels
            .as_ref()
            .and_then(|l| l.get(k))
            .is_some_and(|h| h == v)
    })
}

fn merge_labels(into: &mut ObjectMeta, from: &ObjectMeta) {
    let l = into.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in from.labels.iter().flatten() {
        l.insert(k.clone(), v.clone());
    }
}

/// `have` updated with what the controller manages in `want`; `None` when nothing
/// differs. Fields the API server defaults or owns (cluster IP, status) are kept.
pub fn update_import(have: &ServiceImport, want: &ServiceImport) -> Option<ServiceImport> {
    if has_labels(&have.metadata, &want.metadata) && have.spec == want.spec {
        return None;
    }
    let mut next = have.clone();
    merge_labels(&mut next.metadata, &want.metadata);
    next.spec = want.spec.clone();
    Some(next)
}

pub fn update_service(have: &Service, want: &Service) -> Option<Service> {
    let h = have.spec.clone().unwrap_or_default();
    let w = want.spec.clone().unwrap_or_default();
    if has_labels(&have.metadata, &want.metadata)
        && have.metadata.owner_references == want.metadata.owner_references
        && h.type_ == w.type_
        && h.ports == w.ports
        && h.selector.is_none()
    {
        return None;
    }
    let mut next = have.clone();
    merge_labels(&mut next.metadata, &want.metadata);
    next.metadata.owner_references = want.metadata.owner_references.clone();
    let spec = next.spec.get_or_insert_with(Default::default);
    spec.type_ = w.type_;
    spec.ports = w.ports;
    spec.selector = None;
    Some(next)
}

pub fn update_slice(have: &EndpointSlice, want: &EndpointSlice) -> Option<EndpointSlice> {
    if has_labels(&have.metadata, &want.metadata)
        && have.metadata.owner_references == want.metadata.owner_references
        && have.address_type == want.address_type
        && have.endpoints == want.endpoints
        && have.ports == want.ports
    {
        return None;
    }
    let mut next = have.clone();
    merge_labels(&mut next.metadata, &want.metadata);
    next.metadata.owner_references = want.metadata.owner_references.clone();
    next.address_type = want.address_type.clone();
    next.endpoints = want.endpoints.clone();
    next.ports = want.ports.clone();
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ServiceName, SiteName};
    use k8s_openapi::api::core::v1::{PodCondition, PodIP, PodStatus};
    use meshfed_catalog::routing::ImportListener;

    fn listener(
        svc: &str,
        port: u16,
        protocol: Protocol,
        name: Option<&str>,
        listen: u16,
    ) -> ImportListener {
        ImportListener {
            service: ServiceName::parse(svc).unwrap(),
            port,
            protocol,
            name: name.map(Into::into),
            listen: ([0, 0, 0, 0], listen).into(),
            backends: vec![
                SiteName::new("west").unwrap(),
                SiteName::new("north").unwrap(),
            ],
        }
    }

    fn gw_pod(name: &str, ips: &[&str], ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some("meshfed".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                pod_ip: ips.first().map(|s| s.to_string()),
                pod_ips: Some(ips.iter().map(|i| PodIP { ip: i.to_string() }).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_gateway_pods_with_an_ip_receive_traffic() {
        let mut deleting = gw_pod("gw-c", &["10.0.0.3"], true);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
            ));
        let g = ready_gateways(&[
            gw_pod("gw-b", &["10.0.0.2", "fd00::2"], true),
            gw_pod("gw-a", &["10.0.0.1"], true),
            gw_pod("gw-x", &["10.0.0.9"], false),
            gw_pod("gw-y", &[], true),
            deleting,
        ]);
        let names: Vec<&str> = g.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["gw-a", "gw-b"]);
        assert_eq!(g[1].ips.len(), 2);
    }

    #[test]
    fn an_import_becomes_a_service_import_a_derived_service_and_slices_per_family() {
        let l = ImportListeners {
            imports: vec![
                listener("dns.corp", 53, Protocol::Udp, Some("dns"), 21053),
                listener("dns.corp", 53, Protocol::Tcp, Some("dns"), 21053),
                listener("orders.shop", 80, Protocol::Tcp, Some("http"), 20080),
            ],
        };
        let gws = ready_gateways(&[
            gw_pod("gw-a", &["10.0.0.1"], true),
            gw_pod("gw-b", &["10.0.0.2", "fd00::2"], true),
        ]);
        let d = desired(&l, &gws);
        assert_eq!(d.len(), 2);
        let dns = &d[0];
        assert_eq!((dns.namespace(), dns.name()), ("corp", "dns"));
        // Two ports with one name: each gets a distinct valid name.
        let names: Vec<_> = dns
            .import
            .spec
            .ports
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(names, [Some("dns".into()), Some("udp-53".into())]);
        assert_eq!(dns.import.spec.type_, "ClusterSetIP");
        let clusters: Vec<_> = dns
            .import
            .status
            .as_ref()
            .unwrap()
            .clusters
            .iter()
            .map(|c| c.cluster.as_str())
            .collect();
        assert_eq!(clusters, ["north", "west"]);
        let svc = &dns.service;
        assert_eq!(
            svc.metadata.name.as_deref(),
            Some(derived_name("corp", "dns").as_str())
        );
        assert!(svc.metadata.name.as_ref().unwrap().len() <= 63);
        let sp = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!(sp[0].port, 53);
        assert_eq!(sp[0].target_port, Some(IntOrString::Int(21053)));
        // One slice per address family in use, each port named like the Service's.
        assert_eq!(dns.slices.len(), 2);
        let v4 = &dns.slices[0];
        assert_eq!(v4.address_type, "IPv4");
        let addrs: Vec<_> = v4
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.addresses[0].as_str())
            .collect();
        assert_eq!(addrs, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            v4.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            derived_name("corp", "dns")
        );
        let slice_names: Vec<_> = v4
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port))
            .collect();
        assert_eq!(
            slice_names,
            [
                (Some("dns".into()), Some(21053)),
                (Some("udp-53".into()), Some(21053))
            ]
        );
        assert_eq!(dns.slices[1].address_type, "IPv6");
        // A single port keeps its name; an invalid name is dropped.
        let orders = &d[1];
        assert_eq!(orders.import.spec.ports[0].name.as_deref(), Some("http"));
        let odd = desired(
            &ImportListeners {
                imports: vec![listener("a.b", 1, Protocol::Tcp, Some("Not_Valid"), 2)],
            },
            &[],
        );
        assert_eq!(odd[0].import.spec.ports[0].name, None);
        // No ready gateway: the IPv4 slice exists, empty.
        assert_eq!(odd[0].slices.len(), 1);
        assert!(odd[0].slices[0].endpoints.as_ref().unwrap().is_empty());
    }

    #[test]
    fn what_the_server_added_is_not_a_difference_but_a_changed_port_is() {
        let l = ImportListeners {
            imports: vec![listener(
                "orders.shop",
                80,
                Protocol::Tcp,
                Some("http"),
                20080,
            )],
        };
        let d = &desired(&l, &ready_gateways(&[gw_pod("gw-a", &["10.0.0.1"], true)]))[0];
        // As read back: server-set fields and labels of others.
        let mut have = d.service.clone();
        have.metadata.uid = Some("u1".into());
        have.metadata.resource_version = Some("7".into());
        have.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("team".into(), "x".into());
        let spec = have.spec.as_mut().unwrap();
        spec.cluster_ip = Some("10.96.0.10".into());
        spec.session_affinity = Some("None".into());
        assert_eq!(update_service(&have, &d.service), None);
        let mut si = d.import.clone();
        si.metadata.uid = Some("u2".into());
        si.status = None; // status is its own subresource
        assert_eq!(update_import(&si, &d.import), None);
        assert_eq!(update_slice(&d.slices[0], &d.slices[0]), None);

        // The listener moved: the Service and slice change, keeping the cluster IP.
        let moved = ImportListeners {
            imports: vec![listener(
                "orders.shop",
                80,
                Protocol::Tcp,
                Some("http"),
                20081,
            )],
        };
        let m = &desired(&moved, &[])[0];
        let next = update_service(&have, &m.service).unwrap();
        let spec = next.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(
            spec.ports.unwrap()[0].target_port,
            Some(IntOrString::Int(20081))
        );
        assert_eq!(next.metadata.labels.unwrap()["team"], "x");
        assert!(
            update_slice(&d.slices[0], &m.slices[0]).is_some(),
            "no gateway now"
        );
        // An owner reference that is missing is a difference.
        let mut owned = d.service.clone();
        owned.metadata.owner_references = Some(vec![owner(&si).unwrap()]);
        assert!(update_service(&have, &owned).is_some());
    }

    #[test]
    fn managed_objects_are_recognised_by_label() {
        let d = &desired(
            &ImportListeners {
                imports: vec![listener("a.b", 1, Protocol::Tcp, None, 2)],
            },
            &[],
        )[0];
        assert!(managed(&d.import.metadata));
        assert!(managed(&d.service.metadata));
        assert!(!managed(&ObjectMeta::default()));
    }
}
