//! The site directory's files, as every meshfed process reads them:
//!
//! - `registry.json`: what `meshfed register` added ([`Registry`]);
//! - `kubernetes.json`: the Kubernetes export controller's output ([`KubeExports`]);
//! - `federation.json`: the membership a join wrote ([`Membership`]);
//! - `bundles/<trust domain>.json`: every federated bundle ([`bundle_files`]);
//! - `.meshfed.lock`: taken by short writers (register, unregister, join) in turn
//!   ([`lock_site_dir`]).
//!
//! `imports.json` and `catalog.json` are [`crate::routing::ImportListeners`] and
//! [`crate::Catalog`]. Files are written atomically through `meshfed_identity::fs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use meshfed_identity::fs::FileStamp;
use meshfed_identity::fs::{DirLock, FsError};
use meshfed_identity::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::authz::AuthorizationPolicy;
use crate::catalog::{AppProtocol, Protocol};
use crate::http_route::HttpPolicy;
use crate::legacy::LegacyService;
use crate::names::ServiceName;

/// What a site has registered with `meshfed register`: `<site dir>/registry.json`. The
/// site's gateway exports these beside its config's exports and follows the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub services: BTreeMap<ServiceName, Registered>,
    /// AuthorizationPolicies by `namespace/name`; they apply to every export of the
    /// site they name (static, registered or Kubernetes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, RegisteredPolicy>,
    /// HTTP routes (VirtualServices) by the service they govern; published with that
    /// service's export, so every importing site applies them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<ServiceName, RegisteredRoutes>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredRoutes {
    /// The file it was registered from.
    pub source: String,
    pub policy: HttpPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredPolicy {
    /// The file it was registered from.
    pub source: String,
    pub policy: AuthorizationPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The file it was registered from.
    pub source: String,
    pub entry: LegacyService,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("{path}: not a meshfed registry: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

/// Services or policies asked to be removed that are not registered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not registered: {}", .0.join(", "))]
pub struct NotRegistered(pub Vec<String>);

impl Registry {
    pub fn path(site_dir: &Path) -> PathBuf {
        site_dir.join("registry.json")
    }

    /// The site's registry; empty when nothing was registered yet.
    pub fn load(site_dir: &Path) -> Result<Self, RegistryError> {
        let path = Self::path(site_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| RegistryError::Corrupt {
                path,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(RegistryError::Io {
                path,
                detail: e.to_string(),
            }),
        }
    }

    /// Adds or replaces `services` (by name), all at once; returns the names replaced.
    pub fn merge(&mut self, source: &str, services: Vec<LegacyService>) -> Vec<ServiceName> {
        let mut replaced = Vec::new();
        for s in services {
            let name = s.service.clone();
            if self
                .services
                .insert(
                    name.clone(),
                    Registered {
                        source: source.to_owned(),
                        entry: s,
                    },
                )
                .is_some()
            {
                replaced.push(name);
            }
        }
        replaced
    }

    /// Adds or replaces `policies` (by `namespace/name`); returns the keys replaced.
    pub fn merge_policies(
        &mut self,
        source: &str,
        policies: Vec<AuthorizationPolicy>,
    ) -> Vec<String> {
        let mut replaced = Vec::new();
        for p in policies {
            let key = p.key();
            let r = RegisteredPolicy {
                source: source.to_owned(),
                policy: p,
            };
            if self.policies.insert(key.clone(), r).is_some() {
                replaced.push(key);
            }
        }
        replaced
    }

    /// Adds or replaces routes (by service); returns the services whose routes were
    /// replaced.
    pub fn merge_routes(&mut self, source: &str, policies: Vec<HttpPolicy>) -> Vec<ServiceName> {
        let mut replaced = Vec::new();
        for p in policies {
            let service = p.service.clone();
            let r = RegisteredRoutes {
                source: source.to_owned(),
                policy: p,
            };
            if self.routes.insert(service.clone(), r).is_some() {
                replaced.push(service);
            }
        }
        replaced
    }

    /// Removes the routes of `services`, all or none.
    pub fn remove_routes(&mut self, services: &[ServiceName]) -> Result<(), NotRegistered> {
        let unknown: Vec<String> = services
            .iter()
            .filter(|s| !self.routes.contains_key(*s))
            .map(|s| format!("routes:{s}"))
            .collect();
        if !unknown.is_empty() {
            return Err(NotRegistered(unknown));
        }
        for s in services {
            self.routes.remove(s);
        }
        Ok(())
    }

    /// Removes the policies `keys` (`namespace/name`), all or none.
    pub fn remove_policies(&mut self, keys: &[String]) -> Result<(), NotRegistered> {
        let unknown: Vec<String> = keys
            .iter()
            .filter(|k| !self.policies.contains_key(*k))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(NotRegistered(unknown));
        }
        for k in keys {
            self.policies.remove(k);
        }
        Ok(())
    }

    /// Every registered policy, for the ingress.
    pub fn policy_list(&self) -> Vec<AuthorizationPolicy> {
        self.policies.values().map(|r| r.policy.clone()).collect()
    }

    /// Why `incoming` cannot be registered beside what is: a host that another service
    /// (by name) owns, here or in `incoming` itself. A service replaced by name gives its
    /// hosts up. Pure.
    pub fn conflicts(&self, incoming: &[LegacyService]) -> Vec<String> {
        let replaced: std::collections::BTreeSet<&ServiceName> =
            incoming.iter().map(|s| &s.service).collect();
        let mut owner: BTreeMap<&str, &ServiceName> = BTreeMap::new();
        for (name, r) in &self.services {
            if !replaced.contains(name) {
                for h in &r.entry.hosts {
                    owner.insert(h, name);
                }
            }
        }
        let mut out = Vec::new();
        for s in incoming {
            for h in &s.hosts {
                match owner.get(h.as_str()) {
                    Some(o) if **o != s.service => {
                        out.push(format!("{}: host {h} belongs to {o}", s.service))
                    }
                    _ => {
                        owner.insert(h, &s.service);
                    }
                }
            }
        }
        out
    }

    /// Removes `names`, all or none: an unknown name is an error naming it.
    pub fn remove(&mut self, names: &[ServiceName]) -> Result<(), NotRegistered> {
        let unknown: Vec<String> = names
            .iter()
            .filter(|n| !self.services.contains_key(*n))
            .map(ToString::to_string)
            .collect();
        if !unknown.is_empty() {
            return Err(NotRegistered(unknown));
        }
        for n in names {
            self.services.remove(n);
        }
        Ok(())
    }

    /// Writes the registry atomically (a crash leaves the old or the new file).
    pub fn save(&self, site_dir: &Path) -> Result<(), RegistryError> {
        let path = Self::path(site_dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| RegistryError::Io {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        meshfed_identity::fs::write_file(&path, &bytes, 0o644).map_err(|e| RegistryError::Io {
            path,
            detail: e.to_string(),
        })
    }
}

/// The file the gateway follows for this site's Kubernetes exports.
pub const KUBE_EXPORTS_FILE: &str = "kubernetes.json";

/// What `kubernetes.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeExports {
    pub exports: Vec<KubeExport>,
}

/// One exported port, with the ready endpoints behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubePort {
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What a TCP port speaks: from `appProtocol`, else Istio's port-name prefix.
    #[serde(default, skip_serializing_if = "AppProtocol::is_tcp")]
    pub app_protocol: AppProtocol,
    /// Ready endpoint addresses with the port the pods listen on.
    pub endpoints: Vec<SocketAddr>,
}

/// What one exported Service contributes to the site's exports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeExport {
    pub service: ServiceName,
    pub ports: Vec<KubePort>,
    /// Distinct ready endpoint addresses.
    pub ready: u32,
    pub identities: Vec<SpiffeId>,
    /// The ready endpoints' pod labels, by pod IP (for subsets that select endpoints).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<std::net::IpAddr, BTreeMap<String, String>>,
}

/// What a site keeps after joining: `federation.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Membership {
    pub federation_trust_domain: TrustDomain,
    pub addresses: Vec<String>,
    pub revision: u64,
}

impl Membership {
    pub const FILE: &str = "federation.json";
}

/// The lock short writers of a site directory (register, join) take.
pub const SITE_LOCK: &str = ".meshfed.lock";
/// How long a command waits for another one writing the same site directory.
pub const SITE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Takes the site directory's lock for a short read-modify-write (register, unregister,
/// join), waiting up to [`SITE_LOCK_WAIT`] for another command to finish.
pub fn lock_site_dir(site_dir: &Path) -> Result<DirLock, FsError> {
    DirLock::wait(site_dir, SITE_LOCK, SITE_LOCK_WAIT)
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::legacy::{LegacyEndpoint, LegacyPort, Location, Resolution};

    fn entry(name: &str, hosts: &[&str]) -> LegacyService {
        LegacyService {
            service: ServiceName::new(name, "shop").unwrap(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            addresses: vec![],
            ports: vec![LegacyPort {
                number: 80,
                app_protocol: "TCP".into(),
                protocol: Protocol::Tcp,
                name: "tcp".into(),
                target_port: None,
            }],
            location: Location::MeshExternal,
            resolution: Resolution::Static,
            endpoints: vec![LegacyEndpoint {
                address: "10.0.0.1".into(),
                ports: BTreeMap::new(),
                labels: BTreeMap::new(),
                locality: None,
                weight: None,
            }],
            export_to: vec![],
            health: None,
            tls: None,
        }
    }

    #[test]
    fn a_host_belongs_to_one_service() {
        let mut reg = Registry::default();
        reg.merge(
            "a.yaml",
            vec![entry("orders", &["orders.example", "o.example"])],
        );
        // (incoming, conflicts)
        let rows: Vec<(Vec<LegacyService>, usize)> = vec![
            (vec![entry("billing", &["billing.example"])], 0),
            (vec![entry("billing", &["o.example"])], 1),
            // Replacing orders itself may keep or move its hosts.
            (vec![entry("orders", &["o.example"])], 0),
            (
                vec![
                    entry("orders", &["x.example"]),
                    entry("billing", &["o.example"]),
                ],
                0,
            ),
            // Two new services with one host.
            (
                vec![entry("a", &["z.example"]), entry("b", &["z.example"])],
                1,
            ),
        ];
        for (i, (incoming, want)) in rows.iter().enumerate() {
            let got = reg.conflicts(incoming);
            assert_eq!(got.len(), *want, "row {i}: {got:?}");
        }
        let msg = &reg.conflicts(&[entry("billing", &["o.example"])])[0];
        assert!(
            msg.contains("o.example") && msg.contains("orders.shop"),
            "{msg}"
        );
    }

    #[test]
    fn remove_is_all_or_nothing() {
        let mut reg = Registry::default();
        reg.merge("a.yaml", vec![entry("orders", &["orders.example"])]);
        let orders: ServiceName = "orders.shop".parse().unwrap();
        let nope: ServiceName = "nope.shop".parse().unwrap();
        let e = reg.remove(&[orders.clone(), nope.clone()]).unwrap_err();
        assert_eq!(e, NotRegistered(vec![nope.to_string()]));
        assert!(e.to_string().contains("nope.shop"), "{e}");
        assert_eq!(reg.services.len(), 1);
        reg.remove(&[orders]).unwrap();
        assert!(reg.services.is_empty());
    }
}
