//! `meshfed dns` on its own: answers from the catalog cache a site's gateway keeps
//! (`<site dir>/catalog.json`), reloaded when the file changes. Under a steady stream of
//! changes the gateway writes that cache at most every 4× its cost (up to 5 s), so
//! answers lag as much; in the gateway's process, DNS follows every applied plan. Run beside the gateway
//! when DNS should not live in the gateway process. Each import answers with the address
//! the gateway's `imports.json` (written with the cache) gives it, else with the one
//! the gateway would give (`routing::Vips`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshfed_catalog::planner::{Planner, Touched};
use meshfed_catalog::routing::{IMPORTS_FILE, ImportListeners};
use meshfed_catalog::site::FileStamp;
use meshfed_catalog::{Catalog, SiteName};
use tracing::{info, warn};

use crate::zone::{Table, ZoneConfig};

const POLL: Duration = Duration::from_millis(100);

pub struct Follow {
    pub catalog: PathBuf,
    pub site: SiteName,
    pub zone: ZoneConfig,
    /// Where the site's gateway listens for imports (what A records point at).
    pub import_address: IpAddr,
    /// One address per import from this range, as the gateway's `federation.vip_range`.
    pub vip_range: Option<meshfed_catalog::routing::VipRange>,
    pub table: Arc<ArcSwap<Table>>,
}

/// Why the catalog file could not be answered from.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a meshfed catalog: {source}", path.display())]
    NotACatalog {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Follow {
    /// Loads the catalog now (an error names the file), then follows it until dropped.
    pub fn load(&self) -> Result<(), FollowError> {
        let io = |source| FollowError::Read {
            path: self.catalog.clone(),
            source,
        };
        let bytes = std::fs::read(&self.catalog).map_err(io)?;
        let cat: Catalog =
            serde_json::from_slice(&bytes).map_err(|source| FollowError::NotACatalog {
                path: self.catalog.clone(),
                source,
            })?;
        // The addresses the gateway gave (its `imports.json`, written with the cache)
        // where it has one, so that answers match its listeners; else as it would.
        let mut planner = Planner::new(
            self.site.clone(),
            None,
            Default::default(),
            self.import_address,
            self.vip_range,
        );
        let bound = self.catalog.with_file_name(IMPORTS_FILE);
        if let Some(l) = std::fs::read(&bound)
            .ok()
            .and_then(|b| serde_json::from_slice::<ImportListeners>(&b).ok())
        {
            planner.seed_addresses(l.imports.into_iter().map(|l| (l.service, l.listen.ip())));
        }
        planner.update(&cat, &Touched::everything());
        let served = planner.plan();
        let t = crate::table_for_plan(&self.zone, served, cat.revision.0);
        self.table.store(Arc::new(t));
        info!(
            revision = cat.revision.0,
            imports = served.imports.len(),
            "DNS answers from the catalog"
        );
        Ok(())
    }

    pub async fn run(self) {
        let mut seen = None;
        loop {
            // Taken before the read: a write during it shows as a new stamp next time.
            let m = FileStamp::of(&self.catalog);
            if m.is_some() && m != seen {
                match self.load() {
                    Ok(()) => seen = m,
                    Err(e) => warn!(error = %e, "catalog not loaded; keeping the last answers"),
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
