//! Several gateway replicas per site (active-active): each replica's address is one of
//! its site's gateway addresses while it is alive, merged and never overwriting the
//! others'.
//!
//! A replica names its address in its Watch request (`gateway_address`, its
//! `federation.advertise`); a publish adds its addresses too. Every half lease TTL, and
//! whenever a replica's stream opens, each site's list is swept ([`next_addresses`] and
//! [`removable`], pure): addresses of replicas with a live stream on this node are
//! added; an address no live replica names is dropped, so a replica that dies (even by
//! `kill -9`) leaves the list within about 1.5 TTL while the site stays up on its other
//! replicas. The last address is never dropped: a site whose replicas are all gone keeps
//! it, and its site lease marks it down.
//!
//! Embedded store (one node): this node sees every stream, so an address is named
//! while a stream names it here and for one TTL after; an address no replica has named
//! since this node started (the one `site join --gateway-address` recorded, say) is
//! dropped one TTL after start. etcd (several nodes): a node holding a replica's stream
//! also holds an `alive/<site>/<node>@<address>` key on an etcd lease of one TTL
//! ([`crate::store::etcd::EtcdStore::hold_address`]); every node keeps the addresses
//! those keys name and drops the others the same way, whichever node their replica used.
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

/// Whether a recorded address may leave its site's list. Pure.
///
/// `local`: this node's open streams for it, and how long ago its last one closed;
/// `named`: whether a lease on any node names it (etcd; `None` on the embedded store,
/// where `local` is the whole truth); `uptime`: how long this node has run.
pub fn removable(
    local: Option<(usize, Option<Duration>)>,
    named: Option<bool>,
    uptime: Duration,
    ttl: Duration,
) -> bool {
    if named == Some(true) {
        return false;
    }
    match local {
        Some((streams, _)) if streams > 0 => false,
        Some((_, idle)) => idle.is_some_and(|i| i >= ttl),
        None => uptime >= ttl,
    }
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
    /// Ends the etcd lease that names the address while it has streams here.
    hold: Option<CancellationToken>,
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
                if let Some(h) = t.hold.take() {
                    h.cancel();
                }
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
        let hold = {
            let mut m = self.lock();
            let tracked = m.entry(site.clone()).or_default();
            if !tracked.contains_key(address) && tracked.len() >= GATEWAY_ADDRESSES_MAX {
                warn!(%site, max = GATEWAY_ADDRESSES_MAX, "too many gateway replica addresses; this one is not listed");
                return None;
            }
            let t = tracked.entry(address.to_owned()).or_default();
            t.streams += 1;
            t.idle_since = None;
            (t.streams == 1 && matches!(self.store, Store::Etcd(_))).then(|| {
                let stop = CancellationToken::new();
                if let Some(old) = t.hold.replace(stop.clone()) {
                    old.cancel();
                }
                stop
            })
        };
        let guard = ReplicaGuard {
            replicas: self.clone(),
            site: site.clone(),
            address: address.to_owned(),
        };
        if let (Some(stop), Store::Etcd(s)) = (hold, &self.store) {
            s.hold_address(site, address, self.ttl, stop).await;
        }
        self.sweep(site).await;
        Some(guard)
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
        // Read after the record: a lease that names an address is written before the
        // record lists it, so a listed address's lease is never missed.
        let named = self.store.named_addresses(site);
        let (live, gone) = {
            let mut m = self.lock();
            let tracked = m.entry(site.clone()).or_default();
            let live: BTreeSet<String> = tracked
                .iter()
                .filter(|(_, t)| t.streams > 0)
                .map(|(a, _)| a.clone())
                .collect();
            let uptime = self.started.elapsed();
            let gone: BTreeSet<String> = rec
                .gateway_addresses
                .iter()
                .filter(|a| {
                    let local = tracked
                        .get(*a)
                        .map(|t| (t.streams, t.idle_since.map(|i| i.elapsed())));
                    let named = named.as_ref().map(|n| n.contains(*a));
                    removable(local, named, uptime, self.ttl)
                })
                .cloned()
                .collect();
            (live, gone)
        };
        let next = next_addresses(&rec.gateway_addresses, &live, &gone);
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
        let (ttl, s0, s1, s3) = (
            Duration::from_secs(2),
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(3),
        );
        // (this node's streams and idle time, named by a lease, uptime, removable)
        type Rm = (
            Option<(usize, Option<Duration>)>,
            Option<bool>,
            Duration,
            bool,
        );
        let rows: [Rm; 12] = [
            // Embedded: this node's view is the whole truth.
            (Some((1, None)), None, s3, false),
            (Some((0, Some(s1))), None, s3, false),
            (Some((0, Some(s3))), None, s3, true),
            (None, None, s1, false), // recorded before this node started: one TTL's grace
            (None, None, s3, true),
            // etcd: a lease anywhere keeps it, whatever this node saw.
            (None, Some(true), s3, false),
            (Some((0, Some(s3))), Some(true), s3, false),
            (None, Some(false), s3, true), // a join-time address nobody holds
            (None, Some(false), s1, false),
            (Some((2, None)), Some(false), s3, false), // a stream here; its lease is on the way
            (Some((0, Some(s3))), Some(false), s3, true),
            (Some((0, Some(s0))), Some(false), s3, false),
        ];
        for (local, named, uptime, want) in rows {
            assert_eq!(
                removable(local, named, uptime, ttl),
                want,
                "local {local:?} named {named:?} uptime {uptime:?}"
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
