//! The etcd key layout, and the mirror that turns etcd's key events into catalog deltas.
//! Pure: no I/O. `etcd.rs` feeds it what etcd's range reads and watches return.
//!
//! Keys, under a configurable prefix (default `/meshfed/v1/`):
//!
//! | key                              | value                        | lease |
//! |----------------------------------|------------------------------|-------|
//! | `sites/<site>`                   | `SiteRecord` JSON            | no    |
//! | `exports/<site>/<name.namespace>`| `Export` JSON                | no    |
//! | `alive/<site>/<holder>`          | holder's replica id          | yes   |
//! | `alive/<site>/<replica>@<addr>`  | a gateway replica's address  | yes   |
//! | `bundles/<trust domain>`         | SPIFFE JWKS                  | no    |
//! | `tokens/<sha256 of secret>`      | `TokenRecord` JSON           | no    |
//! | `replicas/<replica id>`          | JSON list of its addresses   | yes   |
//!
//! A site is up while at least one `alive/<site>/…` key exists. Those keys carry etcd
//! leases: a replica holding a site's Watch stream keeps its lease alive; when the stream
//! closes or the replica dies, etcd deletes the key after the TTL and every replica's
//! mirror turns that into a `PutSite` with `up: false` at the deletion's revision. A
//! holder `<replica>@<addr>` also names the gateway address of a replica whose Watch
//! stream that federation replica holds ([`Mirror::named_addresses`]).
//!
//! Every change of one etcd revision gets that revision: a catalog revision may carry
//! several changes (one transaction), and watchers apply them together.

use std::collections::{BTreeMap, BTreeSet};

use meshfed_catalog::catalog::{Catalog, Change, Delta, Export, History, Revision, SiteRecord};
use meshfed_catalog::names::{NameError, ServiceName, SiteName};

pub const DEFAULT_PREFIX: &str = "/meshfed/v1/";

/// One key event, as etcd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// A key under the prefix, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Site(SiteName),
    Export(SiteName, ServiceName),
    Alive(SiteName, String),
    Bundle(String),
    Token(String),
    Replica(String),
}

/// Builds and parses keys under one prefix.
#[derive(Clone, Debug)]
pub struct Layout {
    pub prefix: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    pub fn site(&self, s: &SiteName) -> String {
        format!("{}sites/{s}", self.prefix)
    }
    pub fn export(&self, s: &SiteName, svc: &ServiceName) -> String {
        format!("{}exports/{s}/{svc}", self.prefix)
    }
    pub fn exports_of(&self, s: &SiteName) -> String {
        format!("{}exports/{s}/", self.prefix)
    }
    pub fn alive(&self, s: &SiteName, holder: &str) -> String {
        format!("{}alive/{s}/{holder}", self.prefix)
    }
    pub fn alive_of(&self, s: &SiteName) -> String {
        format!("{}alive/{s}/", self.prefix)
    }
    pub fn bundle(&self, td: &str) -> String {
        format!("{}bundles/{td}", self.prefix)
    }
    pub fn token(&self, hash: &str) -> String {
        format!("{}tokens/{hash}", self.prefix)
    }
    pub fn replica(&self, id: &str) -> String {
        format!("{}replicas/{id}", self.prefix)
    }

    /// The key's meaning, or why it is not one of ours.
    pub fn parse(&self, key: &[u8]) -> Result<Key, KeyError> {
        let key = std::str::from_utf8(key).map_err(|_| KeyError::NotUtf8)?;
        let rest =
            key.strip_prefix(self.prefix.as_str())
                .ok_or_else(|| KeyError::OutsidePrefix {
                    key: key.to_owned(),
                    prefix: self.prefix.clone(),
                })?;
        let bad = |what: &'static str, e: NameError| KeyError::BadName {
            key: key.to_owned(),
            what,
            source: e,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["sites", s] => Ok(Key::Site(SiteName::new(s).map_err(|e| bad("site", e))?)),
            ["exports", s, svc] => Ok(Key::Export(
                SiteName::new(s).map_err(|e| bad("site", e))?,
                ServiceName::parse(svc).map_err(|e| bad("service", e))?,
            )),
            ["alive", s, h] if !h.is_empty() => Ok(Key::Alive(
                SiteName::new(s).map_err(|e| bad("site", e))?,
                (*h).to_owned(),
            )),
            ["bundles", td] if !td.is_empty() => Ok(Key::Bundle((*td).to_owned())),
            ["tokens", h] if !h.is_empty() => Ok(Key::Token((*h).to_owned())),
            ["replicas", id] if !id.is_empty() => Ok(Key::Replica((*id).to_owned())),
            _ => Err(KeyError::Unknown(key.to_owned())),
        }
    }
}

/// Why an etcd key is not one of ours.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not UTF-8")]
    NotUtf8,
    #[error("{key:?} is outside prefix {prefix:?}")]
    OutsidePrefix { key: String, prefix: String },
    #[error("{key:?}: {what}: {source}")]
    BadName {
        key: String,
        what: &'static str,
        source: NameError,
    },
    #[error("{0:?} is not a meshfed key")]
    Unknown(String),
}

/// One replica's view of the store: the catalog with its history, bundles, liveness and
/// the live replicas' addresses.
pub struct Mirror {
    pub layout: Layout,
    pub catalog: Catalog,
    pub history: History,
    /// Site records as stored; `up` is recomputed from `alive`.
    stored: BTreeMap<SiteName, SiteRecord>,
    alive: BTreeMap<SiteName, BTreeSet<String>>,
    pub bundles: BTreeMap<String, String>,
    pub replicas: BTreeMap<String, Vec<String>>,
    /// Newest etcd revision applied (events or progress).
    pub revision: i64,
}

/// What applying one revision did.
#[derive(Debug, Default)]
pub struct Applied {
    pub deltas: Vec<Delta>,
    pub bundles_changed: bool,
    /// Keys that could not be used, with the reason (logged by the caller).
    pub skipped: Vec<String>,
}

impl Mirror {
    /// The state at `revision`, from a range read of every key under the prefix. The
    /// history starts after it.
    pub fn load(
        layout: Layout,
        kvs: Vec<(Vec<u8>, Vec<u8>)>,
        revision: i64,
        history: usize,
    ) -> (Self, Vec<String>) {
        let mut m = Self {
            layout,
            catalog: Catalog::default(),
            history: History::new(history),
            stored: BTreeMap::new(),
            alive: BTreeMap::new(),
            bundles: BTreeMap::new(),
            replicas: BTreeMap::new(),
            revision: 0,
        };
        // Sites before what refers to them.
        let rank = |k: &[u8]| match m.layout.parse(k) {
            Ok(Key::Site(_)) => 0,
            Ok(Key::Alive(..)) => 1,
            _ => 2,
        };
        let mut kvs = kvs;
        kvs.sort_by_key(|(k, _)| rank(k));
        let events: Vec<KvEvent> = kvs
            .into_iter()
            .map(|(key, value)| KvEvent::Put { key, value })
            .collect();
        let applied = m.apply(revision, &events);
        m.history = History::starting_at(history, Revision(revision as u64));
        m.catalog.revision = Revision(revision as u64);
        (m, applied.skipped)
    }

    /// The gateway addresses that `alive/<site>/<replica>@<address>` keys name.
    pub fn named_addresses(&self, site: &SiteName) -> BTreeSet<String> {
        self.alive
            .get(site)
            .into_iter()
            .flatten()
            .filter_map(|h| h.split_once('@').map(|(_, a)| a.to_owned()))
            .collect()
    }

    fn is_up(&self, site: &SiteName) -> bool {
        self.alive.get(site).is_some_and(|h| !h.is_empty())
    }

    fn put_site_change(&self, site: &SiteName) -> Option<Change> {
        let rec = self.stored.get(site)?;
        Some(Change::PutSite(SiteRecord {
            up: self.is_up(site),
            ..rec.clone()
        }))
    }

    /// Applies every event of one etcd revision, in order, and returns the catalog
    /// deltas they make (all at `revision`), already applied to `catalog` and `history`.
    pub fn apply(&mut self, revision: i64, events: &[KvEvent]) -> Applied {
        let mut out = Applied::default();
        let rev = Revision(revision.max(0) as u64);
        for ev in events {
            let key = match ev {
                KvEvent::Put { key, .. } | KvEvent::Delete { key } => key,
            };
            let parsed = match self.layout.parse(key) {
                Ok(k) => k,
                Err(e) => {
                    out.skipped.push(e.to_string());
                    continue;
                }
            };
            let change = match (parsed, ev) {
                (Key::Site(site), KvEvent::Put { value, .. }) => {
                    match serde_json::from_slice::<SiteRecord>(value) {
                        Ok(rec) if rec.site == site => {
                            self.stored.insert(site.clone(), rec);
                            self.put_site_change(&site)
                        }
                        Ok(rec) => {
                            out.skipped
                                .push(format!("sites/{site}: record names site {}", rec.site));
                            None
                        }
                        Err(e) => {
                            out.skipped.push(format!("sites/{site}: {e}"));
                            None
                        }
                    }
                }
                (Key::Site(site), KvEvent::Delete { .. }) => self
                    .stored
                    .remove(&site)
                    .map(|_| Change::DeleteSite { site }),
                (Key::Export(site, svc), KvEvent::Put { value, .. }) => {
                    match serde_json::from_slice::<Export>(value) {
                        Ok(e) if e.service == svc && self.catalog.sites.contains_key(&site) => {
                            Some(Change::PutExport { site, export: e })
                        }
                        Ok(e) if e.service != svc => {
                            out.skipped.push(format!(
                                "exports/{site}/{svc}: record names service {}",
                                e.service
                            ));
                            None
                        }
                        Ok(_) => {
                            out.skipped
                                .push(format!("exports/{site}/{svc}: site {site} is unknown"));
                            None
                        }
                        Err(e) => {
                            out.skipped.push(format!("exports/{site}/{svc}: {e}"));
                            None
                        }
                    }
                }
                (Key::Export(site, svc), KvEvent::Delete { .. }) => self
                    .catalog
                    .exports
                    .contains_key(&(site.clone(), svc.clone()))
                    .then_some(Change::DeleteExport { site, service: svc }),
                (Key::Alive(site, holder), ev) => {
                    let was = self.is_up(&site);
                    let holders = self.alive.entry(site.clone()).or_default();
                    match ev {
                        KvEvent::Put { .. } => {
                            holders.insert(holder);
                        }
                        KvEvent::Delete { .. } => {
                            holders.remove(&holder);
                            if holders.is_empty() {
                                self.alive.remove(&site);
                            }
                        }
                    }
                    if was != self.is_up(&site) {
                        self.put_site_change(&site)
                    } else {
                        None
                    }
                }
                (Key::Bundle(td), KvEvent::Put { value, .. }) => {
                    match String::from_utf8(value.clone()) {
                        Ok(jwks) => {
                            out.bundles_changed |=
                                self.bundles.insert(td, jwks.clone()).as_ref() != Some(&jwks);
                        }
                        Err(_) => out.skipped.push(format!("bundles/{td}: not UTF-8")),
                    }
                    None
                }
                (Key::Bundle(td), KvEvent::Delete { .. }) => {
                    out.bundles_changed |= self.bundles.remove(&td).is_some();
                    None
                }
                (Key::Replica(id), KvEvent::Put { value, .. }) => {
                    match serde_json::from_slice::<Vec<String>>(value) {
                        Ok(addrs) => {
                            // Sites hear of replicas on the Bundles stream.
                            out.bundles_changed |=
                                self.replicas.insert(id, addrs.clone()).as_ref() != Some(&addrs);
                        }
                        Err(e) => out.skipped.push(format!("replicas/{id}: {e}")),
                    }
                    None
                }
                (Key::Replica(id), KvEvent::Delete { .. }) => {
                    out.bundles_changed |= self.replicas.remove(&id).is_some();
                    None
                }
                (Key::Token(_), _) => None,
            };
            if let Some(change) = change {
                let d = Delta {
                    revision: rev,
                    change,
                };
                match self.catalog.apply(&d) {
                    Ok(()) => {
                        self.history.push(d.clone());
                        out.deltas.push(d);
                    }
                    Err(e) => out.skipped.push(format!("revision {revision}: {e}")),
                }
            }
        }
        self.revision = self.revision.max(revision);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_catalog::catalog::{ExportedPort, Protocol, Resume};
    use meshfed_identity::TrustDomain;

    fn layout() -> Layout {
        Layout::new("/t/")
    }

    fn site(name: &str) -> SiteRecord {
        SiteRecord {
            site: SiteName::new(name).unwrap(),
            trust_domain: TrustDomain::new(&format!("{name}.example.org")).unwrap(),
            gateway_addresses: vec!["127.0.0.1:1".into()],
            up: true,
        }
    }

    fn export(svc: &str) -> Export {
        Export {
            endpoint_labels: Vec::new(),
            http_policy: None,
            service: ServiceName::parse(svc).unwrap(),
            ports: vec![ExportedPort {
                app_protocol: Default::default(),
                port: 80,
                protocol: Protocol::Tcp,
                name: None,
            }],
            ready_endpoints: 1,
            identities: vec![],
            locality: None,
            labels: Default::default(),
            hosts: vec![],
        }
    }

    fn put(key: String, value: Vec<u8>) -> KvEvent {
        KvEvent::Put {
            key: key.into_bytes(),
            value,
        }
    }

    fn del(key: String) -> KvEvent {
        KvEvent::Delete {
            key: key.into_bytes(),
        }
    }

    fn west() -> SiteName {
        SiteName::new("west").unwrap()
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    #[test]
    fn keys_round_trip_and_foreign_keys_are_named() {
        let l = layout();
        assert_eq!(l.parse(l.site(&west()).as_bytes()), Ok(Key::Site(west())));
        assert_eq!(
            l.parse(l.export(&west(), &svc("api.prod")).as_bytes()),
            Ok(Key::Export(west(), svc("api.prod")))
        );
        assert_eq!(
            l.parse(l.alive(&west(), "r1").as_bytes()),
            Ok(Key::Alive(west(), "r1".into()))
        );
        for bad in [
            "/t/sites/",
            "/t/sites/We st",
            "/t/exports/west",
            "/x/sites/west",
        ] {
            assert!(l.parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(
            l.parse(b"/t/nope/x"),
            Err(KeyError::Unknown("/t/nope/x".into()))
        );
        assert!(matches!(
            l.parse(b"/x/sites/west"),
            Err(KeyError::OutsidePrefix { .. })
        ));
        assert!(matches!(
            l.parse(b"/t/sites/We st"),
            Err(KeyError::BadName { what: "site", .. })
        ));
    }

    #[test]
    fn one_revision_with_several_changes_shares_it() {
        let l = layout();
        let (mut m, skipped) = Mirror::load(l.clone(), vec![], 10, 100);
        assert!(skipped.is_empty());
        let a = m.apply(
            11,
            &[
                put(l.site(&west()), serde_json::to_vec(&site("west")).unwrap()),
                put(
                    l.export(&west(), &svc("a.b")),
                    serde_json::to_vec(&export("a.b")).unwrap(),
                ),
                put(
                    l.export(&west(), &svc("c.d")),
                    serde_json::to_vec(&export("c.d")).unwrap(),
                ),
            ],
        );
        assert_eq!(a.deltas.len(), 3);
        assert!(a.deltas.iter().all(|d| d.revision == Revision(11)));
        // No alive key yet: the site is listed but down.
        assert!(!m.catalog.sites[&west()].up);
        assert_eq!(m.catalog.exports.len(), 2);
        assert_eq!(m.catalog.revision, Revision(11));
        // Resuming from before the revision returns all of it, from after none of it.
        match m.history.since(Revision(10)) {
            Resume::Deltas(d) => assert_eq!(d.len(), 3),
            Resume::Snapshot => panic!("history covers 10"),
        }
        assert_eq!(m.history.since(Revision(11)), Resume::Deltas(vec![]));
        assert_eq!(m.history.since(Revision(9)), Resume::Snapshot);
    }

    #[test]
    fn liveness_follows_alive_keys() {
        let l = layout();
        let (mut m, _) = Mirror::load(
            l.clone(),
            vec![(
                l.site(&west()).into_bytes(),
                serde_json::to_vec(&site("west")).unwrap(),
            )],
            5,
            100,
        );
        let up = m.apply(6, &[put(l.alive(&west(), "r1"), b"r1".to_vec())]);
        assert!(matches!(&up.deltas[..], [Delta { change: Change::PutSite(r), .. }] if r.up));
        // A second holder changes nothing; losing one of two changes nothing.
        assert!(
            m.apply(7, &[put(l.alive(&west(), "r2"), b"r2".to_vec())])
                .deltas
                .is_empty()
        );
        assert!(m.apply(8, &[del(l.alive(&west(), "r1"))]).deltas.is_empty());
        let down = m.apply(9, &[del(l.alive(&west(), "r2"))]);
        assert!(matches!(&down.deltas[..], [Delta { change: Change::PutSite(r), .. }] if !r.up));
        assert!(!m.catalog.sites[&west()].up);
    }

    #[test]
    fn address_holders_name_gateway_addresses_and_keep_the_site_up() {
        let l = layout();
        let (mut m, _) = Mirror::load(
            l.clone(),
            vec![(
                l.site(&west()).into_bytes(),
                serde_json::to_vec(&site("west")).unwrap(),
            )],
            5,
            100,
        );
        assert!(m.named_addresses(&west()).is_empty());
        let a = l.alive(&west(), "r1@10.0.0.1:15443");
        let up = m.apply(6, &[put(a.clone(), b"10.0.0.1:15443".to_vec())]);
        assert!(matches!(&up.deltas[..], [Delta { change: Change::PutSite(r), .. }] if r.up));
        m.apply(7, &[put(l.alive(&west(), "r2@[::1]:15443"), b"x".to_vec())]);
        m.apply(8, &[put(l.alive(&west(), "r2"), b"r2".to_vec())]);
        assert_eq!(
            m.named_addresses(&west()),
            BTreeSet::from(["10.0.0.1:15443".to_owned(), "[::1]:15443".to_owned()])
        );
        m.apply(9, &[del(a)]);
        assert_eq!(
            m.named_addresses(&west()),
            BTreeSet::from(["[::1]:15443".to_owned()])
        );
        assert!(
            m.named_addresses(&SiteName::new("east").unwrap())
                .is_empty()
        );
    }

    #[test]
    fn a_site_delete_takes_its_exports_and_later_export_deletes_are_silent() {
        let l = layout();
        let (mut m, _) = Mirror::load(
            l.clone(),
            vec![
                // Out of order on purpose: load puts sites first.
                (
                    l.export(&west(), &svc("a.b")).into_bytes(),
                    serde_json::to_vec(&export("a.b")).unwrap(),
                ),
                (
                    l.site(&west()).into_bytes(),
                    serde_json::to_vec(&site("west")).unwrap(),
                ),
            ],
            5,
            100,
        );
        assert_eq!(m.catalog.exports.len(), 1);
        let a = m.apply(
            6,
            &[del(l.site(&west())), del(l.export(&west(), &svc("a.b")))],
        );
        assert_eq!(a.deltas.len(), 1);
        assert!(m.catalog.exports.is_empty() && m.catalog.sites.is_empty());
        assert!(a.skipped.is_empty());
    }

    #[test]
    fn bad_values_are_skipped_with_a_reason_and_change_nothing() {
        let l = layout();
        let (mut m, _) = Mirror::load(l.clone(), vec![], 1, 100);
        let a = m.apply(
            2,
            &[
                put(l.site(&west()), b"{not json".to_vec()),
                put(
                    l.export(&west(), &svc("a.b")),
                    serde_json::to_vec(&export("a.b")).unwrap(),
                ),
                put(
                    l.site(&SiteName::new("east").unwrap()),
                    serde_json::to_vec(&site("west")).unwrap(),
                ),
                put("/t/garbage".into(), vec![]),
            ],
        );
        assert!(a.deltas.is_empty());
        assert_eq!(a.skipped.len(), 4, "{:?}", a.skipped);
        assert!(a.skipped[1].contains("unknown"), "{:?}", a.skipped);
        assert!(a.skipped[2].contains("names site west"), "{:?}", a.skipped);
        assert_eq!(
            m.catalog,
            Catalog {
                revision: Revision(1),
                ..Default::default()
            }
        );
    }

    #[test]
    fn bundles_and_replicas_are_tracked_outside_the_catalog() {
        let l = layout();
        let (mut m, _) = Mirror::load(l.clone(), vec![], 1, 100);
        let a = m.apply(
            2,
            &[
                put(l.bundle("west.example.org"), b"{}".to_vec()),
                put(l.replica("r1"), br#"["127.0.0.1:7"]"#.to_vec()),
            ],
        );
        assert!(a.bundles_changed && a.deltas.is_empty());
        assert_eq!(m.replicas["r1"], vec!["127.0.0.1:7".to_string()]);
        assert!(
            !m.apply(3, &[put(l.bundle("west.example.org"), b"{}".to_vec())])
                .bundles_changed
        );
        m.apply(4, &[del(l.replica("r1"))]);
        assert!(m.replicas.is_empty());
        assert_eq!(m.revision, 4);
    }
}
