//! Federated DNS: answers the MCS DNS spec for `clusterset.local` (and extra zones) from
//! the live catalog, forwards everything else when told to.
//!
//! - `zone`: the table of answers, pre-encoded whenever the catalog changes (pure);
//! - `wire`: the allocation-free fast path for plain queries (pure);
//! - `slow`: everything else, on hickory's parser (pure);
//! - `server`: UDP workers and hickory-server for TCP (sockets);
//! - `follow`: standalone mode, answering from a gateway's catalog cache.

pub mod follow;
pub mod server;
pub mod slow;
pub mod wire;
pub mod zone;

pub use zone::{ImportRecord, Table, ZoneConfig};

use meshfed_federation::routing::SitePlan;
use std::net::IpAddr;

/// The table for a site's plan: every import answers with `address` (where the site's
/// gateway listens for imports).
pub fn table_for_plan(cfg: &ZoneConfig, plan: &SitePlan, address: IpAddr, serial: u64) -> Table {
    let imports: Vec<ImportRecord> = plan
        .imports
        .iter()
        .map(|im| ImportRecord {
            service: im.service.clone(),
            port: im.port,
            protocol: im.protocol,
            port_name: im.name.clone(),
            address,
        })
        .collect();
    let mut hosts: std::collections::BTreeMap<&str, ()> = Default::default();
    for im in &plan.imports {
        for h in &im.hosts {
            hosts.insert(h, ());
        }
    }
    let hosts: Vec<zone::HostRecord> = hosts
        .into_keys()
        .map(|h| zone::HostRecord {
            name: h.to_owned(),
            addresses: vec![address],
        })
        .collect();
    Table::build(cfg, &imports, &hosts, serial as u32)
}
