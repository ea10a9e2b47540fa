//! `clusterset.local` from a cluster's ServiceImports, as the MCS DNS specification
//! describes it: `<service>.<ns>.svc.clusterset.local` answers the ServiceImport's
//! clusterset IP, and every named port gets its SRV record. Any MCS implementation's
//! ServiceImports are answered, not only meshfed's. Pure: `meshfed dns --kubernetes`
//! feeds it what its reflector holds.

use std::net::IpAddr;

use crate::imports::ServiceImport;
use meshfed_catalog::ServiceName;
use meshfed_catalog::catalog::Protocol;

use meshfed_dns::ImportRecord;

/// The records of every ServiceImport that has a clusterset IP. Headless imports (no
/// clusterset IP; their answers would be the pods of every cluster) and SCTP ports are
/// not answered.
pub fn records(imports: &[ServiceImport]) -> Vec<ImportRecord> {
    let mut out = Vec::new();
    for si in imports {
        let (Some(ns), Some(name)) = (&si.metadata.namespace, &si.metadata.name) else {
            continue;
        };
        if si.spec.type_ != "ClusterSetIP" || si.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(address) = si.spec.ips.iter().find_map(|ip| ip.parse::<IpAddr>().ok()) else {
            continue; // not ready: no clusterset IP yet
        };
        let Ok(service) = ServiceName::new(name, ns) else {
            continue;
        };
        for p in &si.spec.ports {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => continue,
            };
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            out.push(ImportRecord {
                service: service.clone(),
                port,
                protocol,
                port_name: p.name.clone(),
                address,
            });
        }
    }
    out.sort_by(|a, b| (&a.service, a.port, a.protocol).cmp(&(&b.service, b.port, b.protocol)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imports::{ServiceImportPort, ServiceImportSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn si(
        name: &str,
        type_: &str,
        ips: &[&str],
        ports: &[(i32, &str, Option<&str>)],
    ) -> ServiceImport {
        ServiceImport {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: ServiceImportSpec {
                ports: ports
                    .iter()
                    .map(|(port, proto, n)| ServiceImportPort {
                        name: n.map(Into::into),
                        protocol: Some(proto.to_string()),
                        port: *port,
                    })
                    .collect(),
                ips: ips.iter().map(|s| s.to_string()).collect(),
                type_: type_.into(),
            },
            status: None,
        }
    }

    #[test]
    fn service_imports_with_a_clusterset_ip_answer_with_it() {
        let r = records(&[
            si(
                "orders",
                "ClusterSetIP",
                &["10.96.0.7"],
                &[
                    (80, "TCP", Some("http")),
                    (53, "UDP", None),
                    (9, "SCTP", None),
                ],
            ),
            si("pending", "ClusterSetIP", &[], &[(80, "TCP", None)]),
            si("pods", "Headless", &[], &[(80, "TCP", None)]),
            si("odd", "ClusterSetIP", &["not-an-ip"], &[(80, "TCP", None)]),
        ]);
        let got: Vec<_> = r
            .iter()
            .map(|i| {
                (
                    i.service.to_string(),
                    i.port,
                    i.protocol,
                    i.port_name.clone(),
                    i.address.to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "orders.shop".into(),
                    53,
                    Protocol::Udp,
                    None,
                    "10.96.0.7".into()
                ),
                (
                    "orders.shop".into(),
                    80,
                    Protocol::Tcp,
                    Some("http".into()),
                    "10.96.0.7".into()
                ),
            ]
        );
    }
}
