//! Registered legacy services (`meshfed register`, `<site dir>/registry.json`) become
//! exports of this gateway: its ingress reaches their endpoints and the agent publishes
//! them. The file is followed while the gateway runs; endpoints given by hostname are
//! resolved again periodically.
//!
//! `exports` (pure) turns the registry and the resolved addresses into exports;
//! `Follower` does the file watching and DNS lookups.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshfed_catalog::ServiceName;
use meshfed_catalog::catalog::{AppProtocol, Protocol};
use meshfed_catalog::site::Registry;
use meshfed_catalog::site::{FileStamp, KUBE_EXPORTS_FILE, KubeExports};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Export;
use crate::health::{Checks, Target};
use crate::ingress::Ingress;
use meshfed_catalog::legacy::HealthCheck;

pub use crate::resolve::{MAX_REFRESH, MIN_REFRESH, RETRY, Resolved, next_refresh};

const POLL: Duration = Duration::from_millis(250);

/// Hostnames the registry's endpoints need resolved.
pub fn hostnames(reg: &Registry) -> BTreeSet<String> {
    reg.services
        .values()
        .flat_map(|r| r.entry.endpoints.iter())
        .filter(|e| e.address.parse::<IpAddr>().is_err())
        .map(|e| e.address.clone())
        .collect()
}

/// The IPs behind an endpoint address (itself, or what its hostname resolved to).
fn ips(address: &str, resolved: &BTreeMap<String, Vec<IpAddr>>) -> Vec<IpAddr> {
    match address.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => resolved.get(address).cloned().unwrap_or_default(),
    }
}

/// The port a service's health check probes on an endpoint.
fn check_port(
    e: &meshfed_catalog::legacy::LegacyService,
    ep: &meshfed_catalog::legacy::LegacyEndpoint,
    hc: &HealthCheck,
) -> Option<u16> {
    hc.port.or_else(|| {
        let p = e.ports.iter().find(|p| p.protocol == Protocol::Tcp)?;
        Some(
            ep.ports
                .get(&p.name)
                .copied()
                .or(p.target_port)
                .unwrap_or(p.number),
        )
    })
}

/// What to health-check: every (federated) service with a check, each endpoint IP.
pub fn targets(
    reg: &Registry,
    resolved: &BTreeMap<String, Vec<IpAddr>>,
) -> BTreeMap<Target, HealthCheck> {
    let mut out = BTreeMap::new();
    for (name, r) in &reg.services {
        let e = &r.entry;
        let Some(hc) = &e.health else { continue };
        if !e.federated() {
            continue;
        }
        for ep in &e.endpoints {
            let Some(port) = check_port(e, ep, hc) else {
                continue;
            };
            for ip in ips(&ep.address, resolved) {
                out.insert((name.clone(), SocketAddr::new(ip, port)), hc.clone());
            }
        }
    }
    out
}

/// The exports for the federated registered services (`exportTo` `*`), with hostnames
/// replaced by their resolved addresses and unhealthy endpoints left out (so the ready
/// count published drops, to 0 when none is healthy). UDP ports are exported as UDP (QUIC
/// datagrams). Returns the exports and what was left out, with the reason.
pub fn exports(
    reg: &Registry,
    resolved: &BTreeMap<String, Vec<IpAddr>>,
    unhealthy: &BTreeSet<Target>,
) -> (BTreeMap<ServiceName, Export>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    for (name, r) in &reg.services {
        let e = &r.entry;
        if !e.federated() {
            continue;
        }
        let mut ports = BTreeMap::new();
        let mut udp_ports = BTreeMap::new();
        let mut port_names = BTreeMap::new();
        let mut app_protocols = BTreeMap::new();
        let mut endpoint_labels = BTreeMap::new();
        for p in &e.ports {
            if !p.name.is_empty() {
                port_names.insert((p.protocol, p.number), p.name.clone());
            }
            let app = AppProtocol::from_istio(&p.app_protocol);
            if p.protocol == Protocol::Tcp && !app.is_tcp() {
                app_protocols.insert(p.number, app);
            }
            let mut eps = Vec::new();
            for ep in &e.endpoints {
                let port = ep
                    .ports
                    .get(&p.name)
                    .copied()
                    .or(p.target_port)
                    .unwrap_or(p.number);
                let found = ips(&ep.address, resolved);
                if found.is_empty() {
                    skipped.push(format!("{name}: {} does not resolve", ep.address));
                }
                let checked = e.health.as_ref().and_then(|hc| check_port(e, ep, hc));
                for ip in found {
                    let sick = checked.is_some_and(|cp| {
                        unhealthy.contains(&(name.clone(), SocketAddr::new(ip, cp)))
                    });
                    if !sick {
                        let addr = SocketAddr::new(ip, port);
                        eps.push(addr);
                        if !ep.labels.is_empty() {
                            endpoint_labels.insert(addr, ep.labels.clone());
                        }
                    }
                }
            }
            match p.protocol {
                Protocol::Tcp => ports.insert(p.number, eps),
                Protocol::Udp => udp_ports.insert(p.number, eps),
            };
        }
        if !ports.is_empty() || !udp_ports.is_empty() {
            out.insert(
                name.clone(),
                Export {
                    endpoint_labels,
                    http_policy: None,
                    service: name.clone(),
                    ports,
                    udp_ports,
                    allowed_peers: None,
                    // Exact names only: DNS answers no wildcards.
                    hosts: e
                        .hosts
                        .iter()
                        .filter(|h| !h.starts_with("*."))
                        .cloned()
                        .collect(),
                    tls: e.tls.clone(),
                    port_names,
                    app_protocols,
                    identities: vec![],
                    proxy_protocol: false,
                },
            );
        }
    }
    (out, skipped)
}

/// The exports the Kubernetes export controller wrote (`kubernetes.json`): endpoints are
/// the ready pod addresses, which the gateway (running in the cluster) reaches directly.
pub fn kube_exports(k: &KubeExports) -> BTreeMap<ServiceName, Export> {
    k.exports
        .iter()
        .map(|e| {
            let mut ex = Export {
                endpoint_labels: Default::default(),
                http_policy: None,
                service: e.service.clone(),
                ports: BTreeMap::new(),
                udp_ports: BTreeMap::new(),
                allowed_peers: None,
                hosts: vec![],
                tls: None,
                port_names: BTreeMap::new(),
                app_protocols: BTreeMap::new(),
                identities: e.identities.clone(),
                proxy_protocol: false,
            };
            for p in &e.ports {
                match p.protocol {
                    Protocol::Tcp => ex.ports.insert(p.port, p.endpoints.clone()),
                    Protocol::Udp => ex.udp_ports.insert(p.port, p.endpoints.clone()),
                };
                if let Some(n) = &p.name {
                    ex.port_names.insert((p.protocol, p.port), n.clone());
                }
                if p.protocol == Protocol::Tcp && !p.app_protocol.is_tcp() {
                    ex.app_protocols.insert(p.port, p.app_protocol);
                }
                for ep in &p.endpoints {
                    if let Some(l) = e.labels.get(&ep.ip()) {
                        ex.endpoint_labels.insert(*ep, l.clone());
                    }
                }
            }
            (e.service.clone(), ex)
        })
        .collect()
}

/// Follows the registry file and keeps the ingress and the published export set current.
pub struct Follower {
    pub dir: PathBuf,
    /// The config's own exports; they win over a registered service of the same name.
    pub config_exports: BTreeMap<ServiceName, Export>,
    pub ingress: Arc<Ingress>,
    /// Every export to publish (config + registered), for the federation agent.
    pub published: watch::Sender<Vec<Export>>,
}

impl Follower {
    pub async fn run(self, stop: CancellationToken) {
        let path = Registry::path(&self.dir);
        let mut seen: Option<FileStamp> = None;
        let mut resolved = Resolved::new();
        let mut reg = Registry::default();
        let mut checks = Checks::default();
        let health_changed = checks.changed.clone();
        let kube_path = self.dir.join(KUBE_EXPORTS_FILE);
        let mut kube_seen: Option<FileStamp> = None;
        let mut kube = KubeExports::default();
        loop {
            let mtime = FileStamp::of(&path);
            let mut file_changed = mtime != seen;
            let kube_mtime = FileStamp::of(&kube_path);
            if kube_mtime != kube_seen {
                match std::fs::read(&kube_path).map(|b| serde_json::from_slice::<KubeExports>(&b)) {
                    Ok(Ok(k)) => kube = k,
                    Ok(Err(e)) => {
                        warn!(error = %e, "kubernetes.json not loaded; keeping the last one")
                    }
                    Err(_) => kube = KubeExports::default(), // gone: nothing exported from Kubernetes
                }
                kube_seen = kube_mtime;
                file_changed = true;
            }
            if file_changed {
                match Registry::load(&self.dir) {
                    Ok(r) => {
                        reg = r;
                        seen = mtime;
                    }
                    Err(e) => warn!(error = %e, "registry not loaded; keeping the last one"),
                }
            }
            let answers_changed = resolved.refresh(&hostnames(&reg)).await;
            if file_changed || answers_changed {
                checks.set(targets(&reg, &resolved.answers), &stop);
                self.apply(&reg, &kube, &resolved.answers, &checks.unhealthy());
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = health_changed.notified() => self.apply(&reg, &kube, &resolved.answers, &checks.unhealthy()),
                _ = stop.cancelled() => return,
            }
        }
    }

    fn apply(
        &self,
        reg: &Registry,
        kube: &KubeExports,
        resolved: &BTreeMap<String, Vec<IpAddr>>,
        unhealthy: &BTreeSet<Target>,
    ) {
        let (registered, skipped) = exports(reg, resolved, unhealthy);
        for s in &skipped {
            warn!(reason = %s, "registered port not exported");
        }
        let mut all = self.config_exports.clone();
        for (name, e) in kube_exports(kube) {
            if all.contains_key(&name) {
                warn!(service = %name, "Kubernetes export shadowed by the config's export of the same name");
                continue;
            }
            all.insert(name, e);
        }
        for (name, e) in registered {
            if all.contains_key(&name) {
                warn!(service = %name, "registered service shadowed by an export of the same name (config or Kubernetes)");
                continue;
            }
            all.insert(name, e);
        }
        // Routes travel with the export of the service they govern.
        for (name, r) in &reg.routes {
            match all.get_mut(name) {
                Some(e) => e.http_policy = Some(r.policy.clone()),
                None => {
                    warn!(service = %name, source = %r.source, "routes registered for a service this site does not export: not published")
                }
            }
        }
        let policies = reg.policy_list();
        let mut changed = false;
        if self.ingress.policies.load().policies() != policies.as_slice() {
            info!(
                policies = policies.len(),
                "authorization policies updated from the registry"
            );
            self.ingress
                .policies
                .store(Arc::new(meshfed_catalog::authz::PolicyIndex::new(policies)));
            changed = true;
        }
        if **self.ingress.exports.load() != all {
            info!(
                exports = all.len(),
                registered = reg.services.len(),
                "exports updated from the registry"
            );
            self.ingress.exports.store(Arc::new(all.clone()));
            self.ingress.retain_exported(&all);
            changed = true;
        }
        if changed {
            let cut = self.ingress.recheck_streams();
            if cut > 0 {
                info!(cut, "open streams reset: the change no longer allows them");
            }
        }
        self.published.send_if_modified(|cur| {
            let next: Vec<Export> = all.into_values().collect();
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_istio::service_entry::parse;

    fn registry(yaml: &str) -> Registry {
        let mut r = Registry::default();
        r.merge("t.yaml", parse(yaml).unwrap().services);
        r
    }

    const ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: legacy}
spec:
  hosts: [db.corp.example]
  ports:
  - {number: 5432, name: pg, protocol: TCP, targetPort: 15432}
  - {number: 514, name: syslog, protocol: UDP}
  resolution: DNS
  endpoints:
  - address: db1.corp.example
  - address: 10.0.0.7
    ports: {pg: 6432}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: local-only, namespace: legacy}
spec:
  hosts: [l.corp.example]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.9}]
  exportTo: ["."]
"#;

    #[test]
    fn registered_services_become_exports_with_resolved_endpoints() {
        let reg = registry(ENTRIES);
        assert_eq!(
            hostnames(&reg).into_iter().collect::<Vec<_>>(),
            vec!["db1.corp.example"]
        );
        let resolved = BTreeMap::from([(
            "db1.corp.example".to_string(),
            vec!["10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap()],
        )]);
        let (ex, skipped) = exports(&reg, &resolved, &BTreeSet::new());
        assert_eq!(ex.len(), 1, "exportTo . stays local");
        let db = &ex[&ServiceName::parse("db.legacy").unwrap()];
        let eps: Vec<String> = db.ports[&5432].iter().map(ToString::to_string).collect();
        assert_eq!(
            eps,
            vec!["10.0.0.5:15432", "10.0.0.6:15432", "10.0.0.7:6432"]
        );
        assert!(!db.ports.contains_key(&514));
        let udp: Vec<String> = db.udp_ports[&514].iter().map(ToString::to_string).collect();
        assert_eq!(udp, vec!["10.0.0.5:514", "10.0.0.6:514", "10.0.0.7:514"]);
        assert!(skipped.is_empty(), "{skipped:?}");
        // Unresolved hostnames are left out and said so.
        let (ex, skipped) = exports(&reg, &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(
            ex[&ServiceName::parse("db.legacy").unwrap()].ports[&5432].len(),
            1
        );
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("db1.corp.example does not resolve"))
        );
    }

    #[test]
    fn kubernetes_exports_keep_ports_protocols_names_and_identities() {
        use meshfed_catalog::site::{KubeExport, KubePort};
        let k = KubeExports {
            exports: vec![KubeExport {
                labels: Default::default(),
                service: ServiceName::parse("dns.kube-system").unwrap(),
                ports: vec![
                    KubePort {
                        app_protocol: Default::default(),
                        port: 53,
                        protocol: Protocol::Udp,
                        name: Some("dns".into()),
                        endpoints: vec!["10.0.0.10:53".parse().unwrap()],
                    },
                    KubePort {
                        app_protocol: Default::default(),
                        port: 53,
                        protocol: Protocol::Tcp,
                        name: Some("dns-tcp".into()),
                        endpoints: vec!["10.0.0.10:53".parse().unwrap()],
                    },
                ],
                ready: 1,
                identities: vec![
                    meshfed_identity::SpiffeId::new("spiffe://w/ns/kube-system/sa/coredns")
                        .unwrap(),
                ],
            }],
        };
        let ex = kube_exports(&k);
        let e = &ex[&ServiceName::parse("dns.kube-system").unwrap()];
        assert_eq!(e.ports[&53].len(), 1);
        assert_eq!(e.udp_ports[&53].len(), 1);
        assert_eq!(e.port_names[&(Protocol::Udp, 53)], "dns");
        assert_eq!(e.port_names[&(Protocol::Tcp, 53)], "dns-tcp");
        assert_eq!(e.identities.len(), 1);
    }

    #[test]
    fn unhealthy_endpoints_leave_the_export() {
        let reg = registry(&ENTRIES.replace(
            "metadata: {name: db, namespace: legacy}",
            "metadata:\n  name: db\n  namespace: legacy\n  annotations: {health.meshfed.io/check: tcp}",
        ));
        let resolved = BTreeMap::from([(
            "db1.corp.example".to_string(),
            vec!["10.0.0.5".parse().unwrap()],
        )]);
        let t = targets(&reg, &resolved);
        let keys: Vec<String> = t.keys().map(|(_, a)| a.to_string()).collect();
        assert_eq!(
            keys,
            vec!["10.0.0.5:15432", "10.0.0.7:6432"],
            "each endpoint's own port"
        );
        let db = ServiceName::parse("db.legacy").unwrap();
        let sick = BTreeSet::from([(db.clone(), "10.0.0.7:6432".parse().unwrap())]);
        let (ex, _) = exports(&reg, &resolved, &sick);
        assert_eq!(
            ex[&db].ports[&5432],
            vec!["10.0.0.5:15432".parse().unwrap()]
        );
        let all: BTreeSet<Target> = t.keys().cloned().collect();
        let (ex, _) = exports(&reg, &resolved, &all);
        assert!(ex[&db].ports[&5432].is_empty(), "none healthy: ready 0");
    }
}
