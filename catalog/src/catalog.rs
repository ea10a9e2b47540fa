//! The federation's catalog as plain data: sites, their exports, revisioned changes, the
//! diff a publish turns into, the merged view (namespace sameness), and the bounded
//! history a watcher resumes from. No I/O: the stores and the gRPC service feed it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use meshfed_identity::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::names::{ServiceName, SiteName};

/// A catalog revision. Every committed change gets the next one; revisions never go
/// back, not even across a restart of the store.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Revision(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`, as on the wire and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a TCP port speaks, which decides whether gateways route its requests (`http`,
/// `http2`, `grpc`) or carry its bytes (`tcp`, and `tls`: bytes that start with a TLS
/// ClientHello, whose SNI a VirtualService's `tls` routes match). UDP ports are always
/// `tcp` here.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Opaque bytes.
    #[default]
    Tcp,
    /// HTTP/1.1 (h2c too: the gateway detects it).
    Http,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// gRPC: HTTP/2 with trailers.
    Grpc,
    /// TLS the gateway does not terminate (Istio's `HTTPS` and `TLS`): carried as bytes,
    /// routed by the ClientHello's SNI.
    Tls,
}

impl AppProtocol {
    /// As on the wire, in configs and in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Http2 => "http2",
            Self::Grpc => "grpc",
            Self::Tls => "tls",
        }
    }

    /// The wire and config spelling back; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "tcp" | "" => Self::Tcp,
            "http" => Self::Http,
            "http2" => Self::Http2,
            "grpc" => Self::Grpc,
            "tls" => Self::Tls,
            _ => return None,
        })
    }

    /// Istio's port protocol (`ServiceEntry` `ports[].protocol`, the Service port-name
    /// prefix convention) or a Kubernetes `appProtocol`, in any case. HTTPS and TLS are
    /// `tls`; the protocols the gateway does not route (MONGO, MYSQL, ...) are carried as
    /// bytes. Pure.
    pub fn from_istio(p: &str) -> Self {
        match p.to_ascii_lowercase().as_str() {
            "http" | "http1" => Self::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Self::Http2,
            "grpc" | "grpc-web" => Self::Grpc,
            "https" | "tls" => Self::Tls,
            _ => Self::Tcp,
        }
    }

    /// Whether the gateway terminates HTTP on this port.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc)
    }

    pub fn is_tcp(&self) -> bool {
        *self == Self::Tcp
    }
}

impl fmt::Display for AppProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedPort {
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the port speaks (TCP ports only).
    #[serde(default, skip_serializing_if = "AppProtocol::is_tcp")]
    pub app_protocol: AppProtocol,
}

/// One label set of a site's endpoints of a service, and how many ready endpoints have
/// it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointLabels {
    pub labels: BTreeMap<String, String>,
    pub endpoints: u32,
}

/// The most label sets one export publishes (the rest are dropped, with a warning at the
/// publishing gateway).
pub const MAX_ENDPOINT_LABEL_SETS: usize = 64;

/// One site's export of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub service: ServiceName,
    pub ports: Vec<ExportedPort>,
    /// Ready endpoints behind this site's gateway; 0 means "known but not serving".
    pub ready_endpoints: u32,
    /// Workload identities that serve it (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    #[serde(default)]
    pub identities: Vec<SpiffeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The distinct label sets of its ready endpoints, for subsets that select
    /// endpoints (`http_route::subset_sites`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_labels: Vec<EndpointLabels>,
    /// DNS names it also answers to (a registered legacy service's hosts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// The HTTP routes this site registered for the service (a VirtualService); every
    /// importing site's egress applies them (`routing::plan` picks one when sites
    /// disagree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_policy: Option<Box<crate::http_route::HttpPolicy>>,
}

/// A site as the federation knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub site: SiteName,
    pub trust_domain: TrustDomain,
    /// Where its gateways accept QUIC, `host:port`.
    pub gateway_addresses: Vec<String>,
    /// False once its lease expired; its exports stay listed but carry no traffic.
    pub up: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    PutSite(SiteRecord),
    /// The site left: its record and all its exports go.
    DeleteSite {
        site: SiteName,
    },
    PutExport {
        site: SiteName,
        export: Export,
    },
    DeleteExport {
        site: SiteName,
        service: ServiceName,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub revision: Revision,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("delta at revision {got} does not follow revision {have}")]
    OutOfOrder { have: u64, got: u64 },
    #[error("export of {service} by unknown site {site}")]
    UnknownSite {
        site: SiteName,
        service: ServiceName,
    },
}

/// The whole catalog at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub revision: Revision,
    pub sites: BTreeMap<SiteName, SiteRecord>,
    /// Keyed by (site, service).
    #[serde(with = "export_map")]
    pub exports: BTreeMap<(SiteName, ServiceName), Export>,
}

/// What a watcher at some revision needs to catch up.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// Every delta after the watcher's revision, in order.
    Deltas(Vec<Delta>),
    /// The history no longer reaches back that far: start from a snapshot.
    Snapshot,
}

/// The most recent deltas, for resuming watches without a full resync.
#[derive(Clone, Debug)]
pub struct History {
    deltas: VecDeque<Delta>,
    cap: usize,
    /// Revision of the newest change not in `deltas` (0: nothing ever dropped).
    floor: Revision,
}

// === impl Catalog ===

impl Catalog {
    /// Applies a committed delta. Deltas must arrive in revision order; several deltas
    /// may share a revision (one store transaction, e.g. an etcd txn), so a delta at the
    /// current revision is accepted. Callers that resume skip by the revision they had
    /// before the event, not after each delta.
    pub fn apply(&mut self, d: &Delta) -> Result<(), CatalogError> {
        if d.revision < self.revision {
            return Err(CatalogError::OutOfOrder {
                have: self.revision.0,
                got: d.revision.0,
            });
        }
        match &d.change {
            Change::PutSite(rec) => {
                self.sites.insert(rec.site.clone(), rec.clone());
            }
            Change::DeleteSite { site } => {
                self.sites.remove(site);
                self.exports.retain(|(s, _), _| s != site);
            }
            Change::PutExport { site, export } => {
                if !self.sites.contains_key(site) {
                    return Err(CatalogError::UnknownSite {
                        site: site.clone(),
                        service: export.service.clone(),
                    });
                }
                self.exports
                    .insert((site.clone(), export.service.clone()), export.clone());
            }
            Change::DeleteExport { site, service } => {
                self.exports.remove(&(site.clone(), service.clone()));
            }
        }
        self.revision = d.revision;
        Ok(())
    }

    /// Whether `changes`, applied in order, would all apply: an export needs its site,
    /// present before or put earlier in the same batch (and not deleted since). Lets a
    /// store apply a batch in place, all or nothing, without copying the catalog.
    pub fn check(&self, changes: &[Change]) -> Result<(), CatalogError> {
        use std::collections::BTreeSet;
        let mut put: BTreeSet<&SiteName> = BTreeSet::new();
        let mut deleted: BTreeSet<&SiteName> = BTreeSet::new();
        for c in changes {
            match c {
                Change::PutSite(rec) => {
                    put.insert(&rec.site);
                    deleted.remove(&rec.site);
                }
                Change::DeleteSite { site } => {
                    deleted.insert(site);
                    put.remove(site);
                }
                Change::PutExport { site, export } => {
                    let known = put.contains(site)
                        || (self.sites.contains_key(site) && !deleted.contains(site));
                    if !known {
                        return Err(CatalogError::UnknownSite {
                            site: site.clone(),
                            service: export.service.clone(),
                        });
                    }
                }
                Change::DeleteExport { .. } => {}
            }
        }
        Ok(())
    }

    /// The changes that turn `site`'s current exports into `new` (a publish is the
    /// site's full export set). Unchanged exports produce nothing.
    pub fn publish_changes(&self, site: &SiteName, new: &[Export]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut wanted: BTreeMap<&ServiceName, &Export> = BTreeMap::new();
        for e in new {
            wanted.insert(&e.service, e);
        }
        let mine = self
            .exports
            .range((site.clone(), ServiceName::lowest())..)
            .take_while(|((s, _), _)| s == site);
        for ((s, svc), _) in mine {
            if !wanted.contains_key(svc) {
                changes.push(Change::DeleteExport {
                    site: s.clone(),
                    service: svc.clone(),
                });
            }
        }
        for (svc, e) in wanted {
            if self.exports.get(&(site.clone(), svc.clone())) != Some(e) {
                changes.push(Change::PutExport {
                    site: site.clone(),
                    export: e.clone(),
                });
            }
        }
        changes
    }

    /// Services by name across sites: the same `name.namespace` exported by two sites is
    /// one service with two backends.
    pub fn merged(&self) -> BTreeMap<&ServiceName, Vec<(&SiteRecord, &Export)>> {
        let mut out: BTreeMap<&ServiceName, Vec<(&SiteRecord, &Export)>> = BTreeMap::new();
        for ((site, svc), e) in &self.exports {
            if let Some(rec) = self.sites.get(site) {
                out.entry(svc).or_default().push((rec, e));
            }
        }
        out
    }

    /// The changes that rebuild this catalog from empty (for a snapshot on the wire).
    pub fn as_changes(&self) -> Vec<Change> {
        let sites = self.sites.values().cloned().map(Change::PutSite);
        let exports = self.exports.iter().map(|((site, _), e)| Change::PutExport {
            site: site.clone(),
            export: e.clone(),
        });
        sites.chain(exports).collect()
    }
}

mod export_map {
    //! JSON objects need string keys: store the map as a list.
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Entry {
        site: SiteName,
        export: Export,
    }

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<(SiteName, ServiceName), Export>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let v: Vec<Entry> = m
            .iter()
            .map(|((site, _), e)| Entry {
                site: site.clone(),
                export: e.clone(),
            })
            .collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(SiteName, ServiceName), Export>, D::Error> {
        let v = Vec::<Entry>::deserialize(d)?;
        Ok(v.into_iter()
            .map(|e| ((e.site, e.export.service.clone()), e.export))
            .collect())
    }
}

// === impl History ===

impl History {
    pub fn new(cap: usize) -> Self {
        Self {
            deltas: VecDeque::with_capacity(cap.min(4096)),
            cap: cap.max(1),
            floor: Revision(0),
        }
    }

    /// A history that starts after `rev` (e.g. a store reopened at `rev`): resuming from
    /// before it needs a snapshot.
    pub fn starting_at(cap: usize, rev: Revision) -> Self {
        let mut h = Self::new(cap);
        h.floor = rev;
        h
    }

    /// Appends a delta; deltas come in revision order (as [`Catalog::apply`] takes them).
    pub fn push(&mut self, d: Delta) {
        debug_assert!(self.deltas.back().is_none_or(|b| b.revision <= d.revision));
        if self.deltas.len() == self.cap
            && let Some(old) = self.deltas.pop_front()
        {
            self.floor = old.revision;
        }
        self.deltas.push_back(d);
    }

    /// What a watcher that has applied everything up to `from` needs.
    pub fn since(&self, from: Revision) -> Resume {
        if from < self.floor {
            return Resume::Snapshot;
        }
        // Revisions only grow along the history: find the first one past `from`.
        let start = self.deltas.partition_point(|d| d.revision <= from);
        Resume::Deltas(self.deltas.range(start..).cloned().collect())
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Istio's protocol names (a ServiceEntry's `ports[].protocol`, a Service's
    /// `appProtocol` or port-name prefix) as the gateways treat them.
    #[test]
    fn istio_protocols_map_to_what_the_gateway_does() {
        for (istio, want) in [
            ("HTTP", AppProtocol::Http),
            ("http", AppProtocol::Http),
            ("HTTP2", AppProtocol::Http2),
            ("kubernetes.io/h2c", AppProtocol::Http2),
            ("GRPC", AppProtocol::Grpc),
            ("grpc-web", AppProtocol::Grpc),
            ("HTTPS", AppProtocol::Tls),
            ("tls", AppProtocol::Tls),
            ("TCP", AppProtocol::Tcp),
            ("MONGO", AppProtocol::Tcp),
            ("", AppProtocol::Tcp),
        ] {
            let a = AppProtocol::from_istio(istio);
            assert_eq!(a, want, "{istio}");
            // What the catalog carries reads back.
            assert_eq!(AppProtocol::parse(a.as_str()), Some(a));
        }
        assert!(!AppProtocol::Tls.is_http(), "TLS passes through as bytes");
        assert!(!AppProtocol::Tls.is_tcp(), "and is published as tls");
    }

    fn site(name: &str) -> SiteRecord {
        SiteRecord {
            site: SiteName::new(name).unwrap(),
            trust_domain: TrustDomain::new(&format!("{name}.example.org")).unwrap(),
            gateway_addresses: vec![format!("{name}.example.org:15443")],
            up: true,
        }
    }

    fn export(svc: &str, ready: u32) -> Export {
        Export {
            endpoint_labels: Vec::new(),
            http_policy: None,
            service: ServiceName::parse(svc).unwrap(),
            ports: vec![ExportedPort {
                app_protocol: Default::default(),
                port: 8080,
                protocol: Protocol::Tcp,
                name: Some("http".into()),
            }],
            ready_endpoints: ready,
            identities: vec![],
            locality: None,
            labels: BTreeMap::new(),
            hosts: vec![],
        }
    }

    fn commit(cat: &mut Catalog, hist: &mut History, changes: Vec<Change>) {
        for change in changes {
            let d = Delta {
                revision: Revision(cat.revision.0 + 1),
                change,
            };
            cat.apply(&d).unwrap();
            hist.push(d);
        }
    }

    #[test]
    fn publish_is_a_minimal_diff() {
        let (mut cat, mut hist) = (Catalog::default(), History::new(100));
        let west = SiteName::new("west").unwrap();
        commit(&mut cat, &mut hist, vec![Change::PutSite(site("west"))]);
        let first = cat.publish_changes(&west, &[export("orders.shop", 2), export("db.prod", 1)]);
        assert_eq!(first.len(), 2);
        commit(&mut cat, &mut hist, first);
        // Same set again: nothing to do.
        assert!(
            cat.publish_changes(&west, &[export("db.prod", 1), export("orders.shop", 2)])
                .is_empty()
        );
        // One changed, one gone.
        let next = cat.publish_changes(&west, &[export("orders.shop", 3)]);
        assert_eq!(
            next,
            vec![
                Change::DeleteExport {
                    site: west.clone(),
                    service: ServiceName::parse("db.prod").unwrap()
                },
                Change::PutExport {
                    site: west.clone(),
                    export: export("orders.shop", 3)
                },
            ]
        );
        commit(&mut cat, &mut hist, next);
        assert_eq!(cat.exports.len(), 1);
        assert_eq!(cat.revision, Revision(5));
    }

    #[test]
    fn namespace_sameness_merges_sites() {
        let (mut cat, mut hist) = (Catalog::default(), History::new(100));
        commit(
            &mut cat,
            &mut hist,
            vec![
                Change::PutSite(site("west")),
                Change::PutSite(site("north")),
            ],
        );
        for s in ["west", "north"] {
            let changes =
                cat.publish_changes(&SiteName::new(s).unwrap(), &[export("orders.shop", 1)]);
            commit(&mut cat, &mut hist, changes);
        }
        let m = cat.merged();
        let backends = &m[&ServiceName::parse("orders.shop").unwrap()];
        let sites: Vec<&str> = backends.iter().map(|(r, _)| r.site.as_str()).collect();
        assert_eq!(sites, vec!["north", "west"]);
        // A publish diff touches only the publishing site, before and after it in order.
        let north = SiteName::new("north").unwrap();
        let c = cat.publish_changes(&north, &[]);
        assert_eq!(
            c,
            vec![Change::DeleteExport {
                site: north,
                service: ServiceName::parse("orders.shop").unwrap()
            }]
        );
    }

    #[test]
    fn deleting_a_site_drops_its_exports() {
        let (mut cat, mut hist) = (Catalog::default(), History::new(100));
        let west = SiteName::new("west").unwrap();
        commit(&mut cat, &mut hist, vec![Change::PutSite(site("west"))]);
        let c = cat.publish_changes(&west, &[export("a.b", 1)]);
        commit(&mut cat, &mut hist, c);
        commit(&mut cat, &mut hist, vec![Change::DeleteSite { site: west }]);
        assert!(cat.exports.is_empty() && cat.sites.is_empty());
    }

    #[test]
    fn check_agrees_with_apply() {
        let mut cat = Catalog::default();
        let west = SiteName::new("west").unwrap();
        let put_export = Change::PutExport {
            site: west.clone(),
            export: export("a.b", 1),
        };
        let del_site = Change::DeleteSite { site: west.clone() };
        // Unknown, known after a put in the same batch, unknown again after a delete.
        assert!(cat.check(std::slice::from_ref(&put_export)).is_err());
        cat.check(&[Change::PutSite(site("west")), put_export.clone()])
            .unwrap();
        assert!(
            cat.check(&[
                Change::PutSite(site("west")),
                del_site.clone(),
                put_export.clone()
            ])
            .is_err()
        );
        cat.apply(&Delta {
            revision: Revision(1),
            change: Change::PutSite(site("west")),
        })
        .unwrap();
        cat.check(std::slice::from_ref(&put_export)).unwrap();
        assert!(cat.check(&[del_site, put_export]).is_err());
    }

    #[test]
    fn out_of_order_and_unknown_site_are_refused() {
        let mut cat = Catalog::default();
        let d = Delta {
            revision: Revision(1),
            change: Change::PutSite(site("west")),
        };
        cat.apply(&d).unwrap();
        // A second change in the same revision (one transaction) is fine; going back is not.
        cat.apply(&d).unwrap();
        let old = Delta {
            revision: Revision(0),
            ..d.clone()
        };
        assert_eq!(
            cat.apply(&old),
            Err(CatalogError::OutOfOrder { have: 1, got: 0 })
        );
        let d = Delta {
            revision: Revision(2),
            change: Change::PutExport {
                site: SiteName::new("ghost").unwrap(),
                export: export("a.b", 1),
            },
        };
        assert!(matches!(
            cat.apply(&d),
            Err(CatalogError::UnknownSite { .. })
        ));
        assert_eq!(cat.revision, Revision(1), "a refused delta changes nothing");
    }

    #[test]
    fn history_resumes_or_asks_for_a_snapshot() {
        let (mut cat, mut hist) = (Catalog::default(), History::new(3));
        commit(&mut cat, &mut hist, vec![Change::PutSite(site("west"))]);
        let west = SiteName::new("west").unwrap();
        for i in 0..4 {
            let c = cat.publish_changes(&west, &[export("a.b", i)]);
            commit(&mut cat, &mut hist, c);
        }
        // Revisions 1..=5 committed; history keeps 3..=5.
        assert_eq!(hist.since(Revision(1)), Resume::Snapshot);
        match hist.since(Revision(2)) {
            Resume::Deltas(d) => assert_eq!(
                d.iter().map(|d| d.revision.0).collect::<Vec<_>>(),
                vec![3, 4, 5]
            ),
            r => panic!("{r:?}"),
        }
        assert_eq!(hist.since(Revision(5)), Resume::Deltas(vec![]));
        let reopened = History::starting_at(10, Revision(5));
        assert_eq!(reopened.since(Revision(4)), Resume::Snapshot);
        assert_eq!(reopened.since(Revision(5)), Resume::Deltas(vec![]));
    }

    #[test]
    fn snapshot_round_trips_and_rebuilds() {
        let (mut cat, mut hist) = (Catalog::default(), History::new(10));
        commit(&mut cat, &mut hist, vec![Change::PutSite(site("west"))]);
        let c = cat.publish_changes(
            &SiteName::new("west").unwrap(),
            &[export("a.b", 1), export("c.d", 0)],
        );
        commit(&mut cat, &mut hist, c);
        let json = serde_json::to_string(&cat).unwrap();
        let back: Catalog = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cat);
        let mut rebuilt = Catalog::default();
        for (i, change) in cat.as_changes().into_iter().enumerate() {
            rebuilt
                .apply(&Delta {
                    revision: Revision(i as u64 + 1),
                    change,
                })
                .unwrap();
        }
        assert_eq!((rebuilt.sites, rebuilt.exports), (cat.sites, cat.exports));
    }
}
