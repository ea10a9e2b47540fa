//! Federated DNS: answers the MCS DNS spec for `clusterset.local` (and extra zones) from
//! the live catalog, forwards everything else when told to.
//!
//! - `zone`: the table of answers, pre-encoded whenever the catalog changes (pure);
//! - `wire`: the allocation-free fast path for plain queries (pure);
//! - `slow`: everything else, on hickory's parser (pure);
//! - `server`: UDP workers, and TCP with a bound on connections (sockets);
//! - `follow`: standalone mode, answering from a gateway's catalog cache;
//!
//! It depends on the catalog model only: the binary hands it a table (from a gateway's
//! plan, a catalog cache, or a cluster's ServiceImports via `meshfed-kubernetes`).

pub mod follow;
pub mod server;
pub mod slow;
pub mod wire;
pub mod zone;

pub use zone::{ImportRecord, Table, ZoneConfig};

use meshfed_catalog::routing::SitePlan;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The table for a site's plan: every import answers with the address the site's
/// gateway listens on for it (`ImportPlan::address`; none without one).
pub fn table_for_plan(cfg: &ZoneConfig, plan: &SitePlan, serial: u64) -> Table {
    let imports: Vec<ImportRecord> = plan
        .imports
        .iter()
        .filter_map(|im| {
            Some(ImportRecord {
                service: im.service.clone(),
                port: im.port,
                protocol: im.protocol,
                port_name: im.name.clone(),
                address: im.address?,
            })
        })
        .collect();
    let mut hosts: BTreeMap<&str, std::collections::BTreeSet<IpAddr>> = BTreeMap::new();
    for im in &plan.imports {
        let Some(a) = im.address else {
            continue;
        };
        for h in &im.hosts {
            hosts.entry(h).or_default().insert(a);
        }
    }
    let hosts: Vec<zone::HostRecord> = hosts
        .into_iter()
        .map(|(h, a)| zone::HostRecord {
            name: h.to_owned(),
            addresses: a.into_iter().collect(),
        })
        .collect();
    Table::build(cfg, &imports, &hosts, serial as u32)
}
