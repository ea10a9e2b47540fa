//! What a site's gateway should do, derived from the catalog: which peers to keep a
//! connection to, which services to import, and for each imported port the sites to try
//! in order. Pure: the gateway feeds it the catalog it watches.

use std::collections::BTreeMap;

use meshfed_identity::SpiffeId;

use crate::catalog::{Catalog, Protocol};
use crate::names::{ServiceName, SiteName};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPlan {
    pub site: SiteName,
    /// The only identity the peer's gateway may present.
    pub spiffe_id: SpiffeId,
    pub addresses: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportPlan {
    pub service: ServiceName,
    pub port: u16,
    pub protocol: Protocol,
    /// The port's name, from the first exporting site that names it (DNS SRV records).
    pub name: Option<String>,
    /// DNS names of the service (hosts of registered legacy services), from every
    /// exporting site.
    pub hosts: Vec<String>,
    /// Sites to try, best first. Empty: known, but nowhere serving right now.
    pub backends: Vec<SiteName>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SitePlan {
    pub peers: Vec<PeerPlan>,
    pub imports: Vec<ImportPlan>,
}

/// The plan for site `me` at locality `locality`.
///
/// Peers: every other site that is up and has a gateway address. Imports: every
/// (service, port) exported by another site, namespace sameness merging sites. Backends
/// of an import: sites that are up and have ready endpoints for it, the same locality as
/// `me` first, then the most ready endpoints, then by name (stable).
pub fn plan(catalog: &Catalog, me: &SiteName, locality: Option<&str>) -> SitePlan {
    let peers = catalog
        .sites
        .values()
        .filter(|r| &r.site != me && r.up && !r.gateway_addresses.is_empty())
        .filter_map(|r| {
            Some(PeerPlan {
                site: r.site.clone(),
                spiffe_id: SpiffeId::gateway(&r.trust_domain, r.site.as_str()).ok()?,
                addresses: r.gateway_addresses.clone(),
            })
        })
        .collect();

    // (service, port) -> (protocol, candidates)
    type Candidate<'a> = (bool, u32, &'a SiteName);
    type Entry<'a> = (
        Protocol,
        Option<&'a String>,
        Vec<Candidate<'a>>,
        std::collections::BTreeSet<&'a String>,
    );
    let mut ports: BTreeMap<(&ServiceName, u16), Entry<'_>> = BTreeMap::new();
    for ((site, service), export) in &catalog.exports {
        if site == me {
            continue;
        }
        let usable = catalog.sites.get(site).is_some_and(|r| r.up) && export.ready_endpoints > 0;
        let same_locality = locality.is_some() && export.locality.as_deref() == locality;
        for p in &export.ports {
            let entry = ports.entry((service, p.port)).or_insert((
                p.protocol,
                None,
                Vec::new(),
                Default::default(),
            ));
            entry.3.extend(export.hosts.iter());
            if entry.1.is_none() {
                entry.1 = p.name.as_ref();
            }
            if usable {
                entry.2.push((same_locality, export.ready_endpoints, site));
            }
        }
    }
    let imports = ports
        .into_iter()
        .map(|((service, port), (protocol, name, mut cands, hosts))| {
            cands.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
            ImportPlan {
                service: service.clone(),
                port,
                protocol,
                name: name.cloned(),
                hosts: hosts.into_iter().cloned().collect(),
                backends: cands.into_iter().map(|(_, _, s)| s.clone()).collect(),
            }
        })
        .collect();
    SitePlan { peers, imports }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Change, Delta, Export, ExportedPort, Revision, SiteRecord};
    use meshfed_identity::TrustDomain;

    struct Builder(Catalog);

    impl Builder {
        fn new() -> Self {
            Self(Catalog::default())
        }
        fn apply(mut self, c: Change) -> Self {
            let d = Delta {
                revision: Revision(self.0.revision.0 + 1),
                change: c,
            };
            self.0.apply(&d).unwrap();
            self
        }
        fn site(self, name: &str, up: bool) -> Self {
            self.apply(Change::PutSite(SiteRecord {
                site: SiteName::new(name).unwrap(),
                trust_domain: TrustDomain::new(&format!("{name}.example.org")).unwrap(),
                gateway_addresses: vec![format!("{name}:15443")],
                up,
            }))
        }
        fn export(
            self,
            site: &str,
            svc: &str,
            port: u16,
            ready: u32,
            locality: Option<&str>,
        ) -> Self {
            self.apply(Change::PutExport {
                site: SiteName::new(site).unwrap(),
                export: Export {
                    service: ServiceName::parse(svc).unwrap(),
                    ports: vec![ExportedPort {
                        port,
                        protocol: Protocol::Tcp,
                        name: None,
                    }],
                    ready_endpoints: ready,
                    identities: vec![],
                    locality: locality.map(Into::into),
                    labels: Default::default(),
                    hosts: vec![],
                },
            })
        }
    }

    fn names(v: &[SiteName]) -> Vec<&str> {
        v.iter().map(|s| s.as_str()).collect()
    }

    #[test]
    fn peers_are_the_other_live_sites_with_their_gateway_ids() {
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .site("north", false)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        assert_eq!(p.peers.len(), 1);
        assert_eq!(
            p.peers[0].spiffe_id.as_str(),
            "spiffe://west.example.org/meshfed/site/west/gateway"
        );
    }

    #[test]
    fn one_service_exported_by_two_sites_is_one_import_with_two_backends() {
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .site("north", true)
            .export("west", "orders.shop", 8080, 2, None)
            .export("north", "orders.shop", 8080, 5, None)
            .export("east", "orders.shop", 8080, 9, None)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        assert_eq!(p.imports.len(), 1);
        // Own export is not imported; more ready endpoints first.
        assert_eq!(names(&p.imports[0].backends), vec!["north", "west"]);
    }

    #[test]
    fn locality_first_then_capacity() {
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .site("north", true)
            .export("west", "orders.shop", 8080, 1, Some("eu"))
            .export("north", "orders.shop", 8080, 5, Some("us"))
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), Some("eu"));
        assert_eq!(names(&p.imports[0].backends), vec!["west", "north"]);
    }

    #[test]
    fn a_down_site_or_one_without_ready_endpoints_gets_no_traffic() {
        let c = Builder::new()
            .site("east", true)
            .site("west", false)
            .site("north", true)
            .export("west", "orders.shop", 8080, 3, None)
            .export("north", "orders.shop", 8080, 0, None)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        assert_eq!(
            p.imports.len(),
            1,
            "the import stays, so clients get a typed refusal, not a missing name"
        );
        assert!(p.imports[0].backends.is_empty());
    }

    #[test]
    fn ports_are_merged_per_port() {
        let c = Builder::new()
            .site("east", true)
            .site("west", true)
            .site("north", true)
            .export("west", "orders.shop", 8080, 1, None)
            .export("north", "orders.shop", 9090, 1, None)
            .0;
        let p = plan(&c, &SiteName::new("east").unwrap(), None);
        let got: Vec<(u16, Vec<&str>)> = p
            .imports
            .iter()
            .map(|i| (i.port, names(&i.backends)))
            .collect();
        assert_eq!(got, vec![(8080, vec!["west"]), (9090, vec!["north"])]);
    }
}
