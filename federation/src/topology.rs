//! The topology page of the federation's admin port: `/topology` (one HTML page, its
//! script inline, no external assets) polls `/topology.json`, which this module builds
//! from the catalog and the gateways' link reports: sites with their lease, links between
//! them with transport and traffic rates, refusals by reason, and each service's
//! exporting and importing sites. Pure apart from the clock it is given.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use meshfed_catalog::catalog::Catalog;

use crate::links::LinkReports;

/// The page; it fetches `topology.json` every two seconds and draws with the DOM only
/// (text nodes, never markup from the data).
pub const PAGE: &str = include_str!("topology.html");

/// Services listed on the page, at most (the count says how many there are).
pub const MAX_SERVICES: usize = 500;

/// `/topology.json`.
pub fn snapshot(cat: &Catalog, links: &LinkReports, now: Instant) -> serde_json::Value {
    let sites: Vec<serde_json::Value> = cat
        .sites
        .values()
        .map(|r| {
            serde_json::json!({
                "site": r.site.to_string(),
                "trust_domain": r.trust_domain.to_string(),
                "up": r.up,
                "gateways": r.gateway_addresses,
            })
        })
        .collect();
    let mut out_links = Vec::new();
    let mut refusals = Vec::new();
    // A site whose lease expired has no gateway watching: its last reports are stale.
    for site in cat.sites.values().filter(|r| r.up).map(|r| &r.site) {
        let traffic = links.traffic_for_site(site, now);
        // One line per (peer, address): the first replica's report of it.
        let mut seen = BTreeSet::new();
        for l in links.for_site(site, now) {
            if !seen.insert((l.peer_site.clone(), l.address.clone())) {
                continue;
            }
            let rate = traffic
                .get(&l.peer_site)
                .map(|t| t.rate)
                .unwrap_or_default();
            out_links.push(serde_json::json!({
                "from": site.to_string(),
                "to": l.peer_site,
                "address": l.address,
                "transport": (!l.transport.is_empty()).then_some(l.transport),
                "reason": l.reason,
                "sent_bps": rate.sent_bps,
                "received_bps": rate.received_bps,
            }));
        }
        for (peer, t) in traffic {
            for (reason, count) in t.refusals {
                refusals.push(serde_json::json!({
                    "from": site.to_string(), "to": peer, "reason": reason, "count": count,
                }));
            }
        }
    }
    // Exporters from the catalog; importers: a site imports every service another site
    // exports (the routing plan's rule), so every site but a sole exporter.
    let mut exporters: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (site, svc) in cat.exports.keys() {
        exporters
            .entry(svc.to_string())
            .or_default()
            .insert(site.to_string());
    }
    let services_total = exporters.len();
    let services: Vec<serde_json::Value> = exporters
        .into_iter()
        .take(MAX_SERVICES)
        .map(|(svc, from)| {
            let importers: Vec<String> = cat
                .sites
                .values()
                .filter(|r| from.iter().any(|e| e != r.site.as_str()))
                .map(|r| r.site.to_string())
                .collect();
            serde_json::json!({"service": svc, "exporters": from, "importers": importers})
        })
        .collect();
    serde_json::json!({
        "revision": cat.revision.0,
        "sites": sites,
        "links": out_links,
        "refusals": refusals,
        "services": services,
        "services_total": services_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_api::pb;
    use meshfed_catalog::catalog::{Export, ExportedPort, Protocol, SiteRecord};
    use meshfed_catalog::{ServiceName, SiteName};
    use meshfed_identity::TrustDomain;

    #[test]
    fn the_snapshot_shows_sites_links_rates_refusals_and_services() {
        let mut cat = Catalog::default();
        for (name, up) in [("east", true), ("west", true), ("north", false)] {
            let site = SiteName::new(name).unwrap();
            cat.sites.insert(
                site.clone(),
                SiteRecord {
                    site,
                    trust_domain: TrustDomain::new(&format!("{name}.example.org")).unwrap(),
                    gateway_addresses: vec![format!("{name}:15443")],
                    up,
                },
            );
        }
        for site in ["west", "north"] {
            cat.exports.insert(
                (
                    SiteName::new(site).unwrap(),
                    ServiceName::parse("web.demo").unwrap(),
                ),
                Export {
                    endpoint_labels: Vec::new(),
                    service: ServiceName::parse("web.demo").unwrap(),
                    ports: vec![ExportedPort {
                        port: 80,
                        protocol: Protocol::Tcp,
                        name: None,
                        app_protocol: Default::default(),
                    }],
                    ready_endpoints: 1,
                    identities: vec![],
                    locality: None,
                    labels: Default::default(),
                    hosts: vec![],
                    http_policy: None,
                },
            );
        }
        let reports = LinkReports::default();
        let east = SiteName::new("east").unwrap();
        let t0 = Instant::now();
        let link = |transport: &str| pb::PeerLink {
            peer_site: "west".into(),
            address: "west:15443".into(),
            transport: transport.into(),
            reason: "auto".into(),
            replica: String::new(),
        };
        let traffic = |sent| pb::SiteTraffic {
            peer_site: "west".into(),
            sent_bytes: sent,
            received_bytes: 0,
            refusals: [("no_ready_endpoint".to_string(), 2)].into(),
        };
        reports.report(&east, "e1", vec![link("quic")], vec![traffic(0)], t0);
        let t1 = t0 + std::time::Duration::from_secs(1);
        reports.report(&east, "e1", vec![link("quic")], vec![traffic(4096)], t1);
        // North is down: what it reported last is not shown.
        let north = SiteName::new("north").unwrap();
        reports.report(&north, "n1", vec![link("quic")], vec![], t1);
        let s = snapshot(&cat, &reports, t1);
        assert_eq!(s["links"].as_array().unwrap().len(), 1, "{s:#}");
        let site = |n: &str| {
            s["sites"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["site"] == n)
                .cloned()
                .unwrap()
        };
        assert_eq!(site("north")["up"], false);
        assert_eq!(site("west")["up"], true);
        let l = &s["links"][0];
        assert_eq!(
            (
                l["from"].as_str(),
                l["to"].as_str(),
                l["transport"].as_str()
            ),
            (Some("east"), Some("west"), Some("quic"))
        );
        assert_eq!(l["sent_bps"], 4096.0);
        assert_eq!(s["refusals"][0]["reason"], "no_ready_endpoint");
        assert_eq!(s["refusals"][0]["count"], 2);
        let svc = &s["services"][0];
        assert_eq!(svc["exporters"], serde_json::json!(["north", "west"]));
        // Each exporter imports the other's too.
        assert_eq!(
            svc["importers"],
            serde_json::json!(["east", "north", "west"])
        );
    }
}
