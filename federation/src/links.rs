//! What each gateway replica last reported about its links to peers (`ReportLinks`):
//! held in memory for `Status`, bounded, and forgotten when a replica stops reporting.
//! Pure apart from the clock it is given.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshfed_api::pb;
use meshfed_catalog::SiteName;
use meshfed_catalog::names::{GATEWAY_ADDRESSES_MAX, clip};

/// A report older than this is not shown (replicas report every 30 s at least).
pub const FRESH_FOR: Duration = Duration::from_secs(75);
/// Links kept from one report: a gateway dials at most 32 addresses per peer.
pub const MAX_LINKS: usize = 4096;
/// Longest string kept from a report field.
const MAX_FIELD: usize = 256;

/// One replica's last report: when, and its links.
type Report = (Instant, Vec<pb::PeerLink>);

#[derive(Default)]
pub struct LinkReports {
    /// By site, then by replica.
    by_site: Mutex<BTreeMap<SiteName, BTreeMap<String, Report>>>,
}

impl LinkReports {
    /// Records `replica`'s report for `site`, clipped to the bounds. A site keeps at most
    /// [`GATEWAY_ADDRESSES_MAX`] replicas' reports: the stalest goes first.
    pub fn report(&self, site: &SiteName, replica: &str, links: Vec<pb::PeerLink>, now: Instant) {
        let replica = clip(replica, MAX_FIELD);
        let links: Vec<pb::PeerLink> = links
            .into_iter()
            .take(MAX_LINKS)
            .map(|l| pb::PeerLink {
                peer_site: clip(&l.peer_site, MAX_FIELD),
                address: clip(&l.address, MAX_FIELD),
                transport: clip(&l.transport, 8),
                reason: clip(&l.reason, MAX_FIELD * 2),
                replica: replica.clone(),
            })
            .collect();
        let mut m = self.by_site.lock().unwrap_or_else(|e| e.into_inner());
        let reps = m.entry(site.clone()).or_default();
        reps.retain(|_, (at, _)| now.saturating_duration_since(*at) < FRESH_FOR);
        if !reps.contains_key(&replica) && reps.len() >= GATEWAY_ADDRESSES_MAX {
            let stalest = reps
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                reps.remove(&k);
            }
        }
        reps.insert(replica, (now, links));
    }

    /// The fresh links of `site`'s replicas, by replica then peer.
    pub fn for_site(&self, site: &SiteName, now: Instant) -> Vec<pb::PeerLink> {
        let m = self.by_site.lock().unwrap_or_else(|e| e.into_inner());
        m.get(site)
            .into_iter()
            .flat_map(|reps| reps.values())
            .filter(|(at, _)| now.saturating_duration_since(*at) < FRESH_FOR)
            .flat_map(|(_, links)| links.iter().cloned())
            .collect()
    }

    /// Forgets a site (it left or was removed).
    pub fn remove(&self, site: &SiteName) {
        self.by_site
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(site);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(peer: &str, transport: &str) -> pb::PeerLink {
        pb::PeerLink {
            peer_site: peer.into(),
            address: "10.0.0.2:15443".into(),
            transport: transport.into(),
            reason: "auto: QUIC handshake completed".into(),
            replica: "forged".into(),
        }
    }

    #[test]
    fn reports_replace_expire_and_stay_bounded() {
        let r = LinkReports::default();
        let east = SiteName::new("east").unwrap();
        let t0 = Instant::now();
        r.report(&east, "10.0.0.1:15443", vec![link("west", "quic")], t0);
        r.report(&east, "10.0.0.9:15443", vec![link("west", "h2")], t0);
        // A replica's new report replaces its old one; the replica is the reporter's
        // own, whatever the links claim.
        r.report(&east, "10.0.0.1:15443", vec![link("west", "h2")], t0);
        let got = r.for_site(&east, t0);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|l| l.transport == "h2"));
        assert!(got.iter().all(|l| l.replica.starts_with("10.0.0.")));
        // Stale reports are not shown.
        assert!(r.for_site(&east, t0 + FRESH_FOR).is_empty());
        // At most MAX_LINKS links per report, and GATEWAY_ADDRESSES_MAX replicas per site.
        r.report(&east, "big", vec![link("west", "quic"); MAX_LINKS + 10], t0);
        assert_eq!(
            r.for_site(&east, t0)
                .iter()
                .filter(|l| l.replica == "big")
                .count(),
            MAX_LINKS
        );
        for i in 0..GATEWAY_ADDRESSES_MAX + 5 {
            r.report(
                &east,
                &format!("r{i}"),
                vec![link("west", "quic")],
                t0 + Duration::from_millis(i as u64 + 1),
            );
        }
        let replicas: std::collections::BTreeSet<String> = r
            .for_site(&east, t0 + Duration::from_secs(1))
            .into_iter()
            .map(|l| l.replica)
            .collect();
        assert_eq!(replicas.len(), GATEWAY_ADDRESSES_MAX);
        assert!(replicas.contains(&format!("r{}", GATEWAY_ADDRESSES_MAX + 4)));
        r.remove(&east);
        assert!(r.for_site(&east, t0).is_empty());
    }
}
