//! Several gateway replicas per site (active-active): each replica's address is one of
//! its site's gateway addresses while it is alive, merged and never overwriting the
//! others'.
//!
//! A replica names its address in its Watch request (`gateway_address`, its
//! `federation.advertise`); a publish adds its addresses too. Every half lease TTL, and
//! whenever a replica's stream opens, each site's list is swept ([`next_addresses`],
//! pure): addresses of replicas with a live stream on this node are added; an address
//! whose replica has had no stream for one lease TTL is dropped, so a replica that dies
//! (even by `kill -9`) leaves the list within about 1.5 TTL while the site stays up on
//! its other replicas. The last address is never dropped: a site whose replicas are all
//! gone keeps it, and its site lease marks it down.
//!
//! Embedded store (one node): an address no replica has named since this node started
//! is dropped one TTL after start. etcd (several nodes): a node drops only addresses of
//! replicas it tracked itself, and a node that holds a replica's stream adds its address
//! back within half a TTL if another node's sweep removed it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshfed_catalog::catalog::{Change, SiteRecord};
use meshfed_catalog::names::{GATEWAY_ADDRESSES_MAX, GatewayAddress, SiteName};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::Store;

/// Whether `a` is `IP:port` or `host:port` (what a peer can dial). Pure.
pub fn valid_address(a: &str) -> bool {
    GatewayAddress::parse(a).is_some()
}

/// `existing` plus the valid addresses of `new` it lacks, at most
/// [`GATEWAY_ADDRESSES_MAX`] in all (a publish). Pure.
pub fn merge(existing: &[String], new: &[String]) -> Vec<String> {
    let mut out = existing.to_vec();
    for a in new {
        if out.len() < GATEWAY_ADDRESSES_MAX && valid_address(a) && !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// The site's addresses after a sweep: `recorded` in order without `removable`, then
/// the `live` ones it lacks, at most [`GATEWAY_ADDRESSES_MAX`]; never empty when
/// `recorded` was not. Pure.
pub fn next_addresses(
    recorded: &[String],
    live: &BTreeSet<String>,
    removable: &BTreeSet<String>,
) -> Vec<String> {
    let mut out: Vec<String> = recorded
        .iter()
        .filter(|a| live.contains(*a) || !removable.contains(*a))
        .cloned()
        .collect();
    for a in live {
        if out.len() < GATEWAY_ADDRESSES_MAX && !out.contains(a) {
            out.push(a.clone());
        }
    }
    if out.is_empty() {
        return recorded.to_vec();
    }
    out
}

#[derive(Default)]
struct Tracked {
    streams: usize,
    /// When its last stream closed (`None` while it has one).
    idle_since: Option<Instant>,
}

pub struct Replicas {
    store: Store,
    ttl: Duration,
    started: Instant,
    sites: Mutex<BTreeMap<SiteName, BTreeMap<String, Tracked>>>,
}

/// Held for as long as a replica's Watch stream lives.
pub struct ReplicaGuard {
    replicas: Arc<Replicas>,
    site: SiteName,
    address: String,
}

impl Drop for ReplicaGuard {
    fn drop(&mut self) {
        let mut m = self.replicas.lock();
        if let Some(t) = m.get_mut(&self.site).and_then(|s| s.get_mut(&self.address)) {
            t.streams = t.streams.saturating_sub(1);
            if t.streams == 0 {
                t.idle_since = Some(Instant::now());
            }
        }
    }
}

impl Replicas {
    pub fn new(store: Store, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            ttl,
            started: Instant::now(),
            sites: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SiteName, BTreeMap<String, Tracked>>> {
        self.sites.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A replica of `site` at `address` opened a Watch stream; its address joins the
    /// site's list now. `None` for an empty or undialable address (logged).
    pub async fn open(self: &Arc<Self>, site: &SiteName, address: &str) -> Option<ReplicaGuard> {
        if address.is_empty() {
            return None;
        }
        if !valid_address(address) {
            warn!(%site, address = %meshfed_catalog::names::clip(address, 80), "gateway address is neither IP:port nor host:port; not listed");
            return None;
        }
        {
            let mut m = self.lock();
            let tracked = m.entry(site.clone()).or_default();
            if !tracked.contains_key(address) && tracked.len() >= GATEWAY_ADDRESSES_MAX {
                warn!(%site, max = GATEWAY_ADDRESSES_MAX, "too many gateway replica addresses; this one is not listed");
                return None;
            }
            let t = tracked.entry(address.to_owned()).or_default();
            t.streams += 1;
            t.idle_since = None;
        }
        self.sweep(site).await;
        Some(ReplicaGuard {
            replicas: self.clone(),
            site: site.clone(),
            address: address.to_owned(),
        })
    }

    /// Sweeps every site every half TTL until `stop`.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(this.ttl / 2) => {}
                    _ = stop.cancelled() => return,
                }
                let sites: Vec<SiteName> = this
                    .store
                    .with_catalog(|c| c.sites.keys().cloned().collect());
                for site in &sites {
                    this.sweep(site).await;
                }
            }
        });
    }

    async fn sweep(&self, site: &SiteName) {
        let Some(rec) = self.store.site(site) else {
            return;
        };
        let (live, removable) = {
            let mut m = self.lock();
            let tracked = m.entry(site.clone()).or_default();
            let live: BTreeSet<String> = tracked
                .iter()
                .filter(|(_, t)| t.streams > 0)
                .map(|(a, _)| a.clone())
                .collect();
            let one_node = matches!(self.store, Store::Embedded(_));
            let removable: BTreeSet<String> = rec
                .gateway_addresses
                .iter()
                .filter(|a| match tracked.get(*a) {
                    Some(t) => t.idle_since.is_some_and(|i| i.elapsed() >= self.ttl),
                    None => one_node && self.started.elapsed() >= self.ttl,
                })
                .cloned()
                .collect();
            (live, removable)
        };
        let next = next_addresses(&rec.gateway_addresses, &live, &removable);
        if next == rec.gateway_addresses {
            return;
        }
        let gone: Vec<&String> = rec
            .gateway_addresses
            .iter()
            .filter(|a| !next.contains(a))
            .collect();
        info!(%site, addresses = ?next, removed = ?gone, "gateway replica addresses");
        let removed: Vec<String> = gone.into_iter().cloned().collect();
        let commit = self
            .store
            .commit(vec![Change::PutSite(SiteRecord {
                gateway_addresses: next,
                ..rec
            })])
            .await;
        match commit {
            Ok(_) => {
                let mut m = self.lock();
                if let Some(t) = m.get_mut(site) {
                    t.retain(|a, tr| tr.streams > 0 || !removed.contains(a));
                }
            }
            Err(e) => warn!(%site, error = %e, "gateway addresses not recorded"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_merge_and_dead_replicas_leave() {
        let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        let set = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<BTreeSet<_>>();
        // (recorded, live, removable, want)
        type Row<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], &'a [&'a str]);
        let rows: [Row<'_>; 6] = [
            (&["a:1"], &["b:1"], &[], &["a:1", "b:1"]),
            (&["a:1", "b:1"], &["b:1"], &["a:1"], &["b:1"]),
            (&["a:1", "b:1"], &["a:1", "b:1"], &["a:1"], &["a:1", "b:1"]),
            // The last address stays: the site lease says it is down.
            (&["a:1"], &[], &["a:1"], &["a:1"]),
            (&["a:1", "b:1"], &[], &["a:1", "b:1"], &["a:1", "b:1"]),
            (&[], &["c:1"], &[], &["c:1"]),
        ];
        for (recorded, live, removable, want) in rows {
            assert_eq!(
                next_addresses(&s(recorded), &set(live), &set(removable)),
                s(want),
                "{recorded:?} live {live:?} removable {removable:?}"
            );
        }
        let many: Vec<String> = (0..40).map(|i| format!("10.0.0.{i}:1")).collect();
        assert_eq!(merge(&s(&["a:1"]), &many).len(), GATEWAY_ADDRESSES_MAX);
        assert_eq!(
            merge(&s(&["a:1"]), &s(&["a:1", "b:1", "bad"])),
            s(&["a:1", "b:1"])
        );
        for (a, ok) in [
            ("10.0.0.1:15443", true),
            ("[fd00::1]:15443", true),
            ("gw-0.west.example.org:15443", true),
            ("gw:0", false),
            ("gw", false),
            ("gw west:1", false),
            ("", false),
        ] {
            assert_eq!(valid_address(a), ok, "{a}");
        }
    }
}
