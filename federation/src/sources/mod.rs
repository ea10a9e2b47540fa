//! Catalog sources other than a gateway's own config: registered legacy services
//! (ServiceEntry-style). Kubernetes comes with its issue.

pub mod kubernetes;
pub mod service_entry;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::names::ServiceName;
use service_entry::LegacyService;

/// Words a YAML parser message for people: serde-saphyr reports its resource limits as
/// `budget breached: Nodes { nodes: 250001 }`; this says what was too large. Other
/// messages pass through. Pure.
pub fn yaml_message(message: &str) -> String {
    let Some((before, breach)) = message.split_once("budget breached: ") else {
        return message.to_owned();
    };
    let kind = breach.split([' ', '{']).next().unwrap_or_default();
    let n: String = breach
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    let what = match kind {
        "Nodes" => format!(
            "more than {} nodes once anchors and aliases are expanded",
            n.parse::<u64>()
                .map_or(n.clone(), |v| (v.saturating_sub(1)).to_string())
        ),
        "Events" => format!("more than {n} parser events"),
        "Aliases" => format!("{n} aliases (*name), more than allowed"),
        "Anchors" => format!("{n} anchors (&name), more than allowed"),
        "Depth" => format!("nesting {n} levels deep, more than allowed"),
        "Documents" => format!("{n} documents, more than allowed"),
        "ScalarBytes" => format!("{n} bytes of values, more than allowed"),
        "MergeKeys" => format!("{n} merge keys (<<), more than allowed"),
        "AliasAnchorRatio" => {
            "far more aliases than anchors, the shape of a \"billion laughs\" expansion".into()
        }
        "InputBytes" => format!("{n} bytes, more than allowed"),
        _ => breach.to_owned(),
    };
    format!(
        "{before}the YAML has {what}: meshfed refuses to read it (a limit against memory exhaustion)"
    )
}

/// What a site has registered with `meshfed register`: `<site dir>/registry.json`. The
/// site's gateway exports these beside its config's exports and follows the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub services: BTreeMap<ServiceName, Registered>,
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
    pub fn remove(&mut self, names: &[ServiceName]) -> Result<(), String> {
        let unknown: Vec<String> = names
            .iter()
            .filter(|n| !self.services.contains_key(*n))
            .map(|n| n.to_string())
            .collect();
        if !unknown.is_empty() {
            return Err(format!("not registered: {}", unknown.join(", ")));
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
        meshfed_identity::ca::write_file(&path, &bytes, 0o644).map_err(|e| RegistryError::Io {
            path,
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, hosts: &[&str]) -> LegacyService {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  hosts: [{}]\n  ports: [{{number: 80, name: tcp, protocol: TCP}}]\n  resolution: STATIC\n  \
             endpoints: [{{address: 10.0.0.1}}]\n",
            hosts.join(", ")
        );
        service_entry::parse(&yaml).unwrap().services.remove(0)
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
    fn yaml_limits_are_worded_for_people() {
        let m = yaml_message("budget breached: Nodes { nodes: 250001 }");
        assert!(
            m.contains("more than 250000 nodes") && m.contains("anchors and aliases"),
            "{m}"
        );
        let m = yaml_message("budget breached: Depth { depth: 2001 }");
        assert!(m.contains("nesting 2001 levels deep"), "{m}");
        assert_eq!(yaml_message("unknown field `x`"), "unknown field `x`");
    }

    #[test]
    fn remove_is_all_or_nothing() {
        let mut reg = Registry::default();
        reg.merge("a.yaml", vec![entry("orders", &["orders.example"])]);
        let orders: ServiceName = "orders.shop".parse().unwrap();
        let nope: ServiceName = "nope.shop".parse().unwrap();
        let e = reg.remove(&[orders.clone(), nope]).unwrap_err();
        assert!(e.contains("nope.shop"), "{e}");
        assert_eq!(reg.services.len(), 1);
        reg.remove(&[orders]).unwrap();
        assert!(reg.services.is_empty());
    }
}
