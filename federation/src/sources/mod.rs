//! Catalog sources other than a gateway's own config: registered legacy services
//! (ServiceEntry-style). Kubernetes comes with its issue.

pub mod kubernetes;
pub mod service_entry;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::names::ServiceName;
use service_entry::LegacyService;

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
