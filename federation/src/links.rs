//! What each gateway replica last reported about its links to peers (`ReportLinks`):
//! held in memory for `Status` and the topology page, bounded, and forgotten when a
//! replica stops reporting. Its traffic counters (cumulative) become rates between a
//! replica's successive reports. Pure apart from the clock it is given.

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

/// Refusal reasons kept per peer site from one report.
const MAX_REASONS: usize = 32;

/// One replica's last report: when, its links, its cumulative traffic by peer site, and
/// the rates since its report before.
struct Report {
    at: Instant,
    links: Vec<pb::PeerLink>,
    traffic: BTreeMap<String, pb::SiteTraffic>,
    rates: BTreeMap<String, Rate>,
}

/// Bytes per second each way between two reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    pub sent_bps: f64,
    pub received_bps: f64,
}

/// A site's traffic toward one peer site, over its fresh replicas: the rates and the
/// cumulative refusals by reason.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    pub rate: Rate,
    pub refusals: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct LinkReports {
    /// By site, then by replica.
    by_site: Mutex<BTreeMap<SiteName, BTreeMap<String, Report>>>,
}

impl LinkReports {
    /// Records `replica`'s report for `site`, clipped to the bounds. A site keeps at most
    /// [`GATEWAY_ADDRESSES_MAX`] replicas' reports: the stalest goes first.
    pub fn report(
        &self,
        site: &SiteName,
        replica: &str,
        links: Vec<pb::PeerLink>,
        traffic: Vec<pb::SiteTraffic>,
        now: Instant,
    ) {
        let replica = clip(replica, MAX_FIELD);
        let traffic: BTreeMap<String, pb::SiteTraffic> = traffic
            .into_iter()
            .take(MAX_LINKS)
            .map(|t| {
                let peer = clip(&t.peer_site, MAX_FIELD);
                let refusals = t
                    .refusals
                    .into_iter()
                    .take(MAX_REASONS)
                    .map(|(k, v)| (clip(&k, 64), v))
                    .collect();
                (
                    peer.clone(),
                    pb::SiteTraffic {
                        peer_site: peer,
                        sent_bytes: t.sent_bytes,
                        received_bytes: t.received_bytes,
                        refusals,
                    },
                )
            })
            .collect();
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
        reps.retain(|_, r| now.saturating_duration_since(r.at) < FRESH_FOR);
        if !reps.contains_key(&replica) && reps.len() >= GATEWAY_ADDRESSES_MAX {
            let stalest = reps
                .iter()
                .min_by_key(|(_, r)| r.at)
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                reps.remove(&k);
            }
        }
        let rates = match reps.get(&replica) {
            Some(prev) => rates(prev, &traffic, now),
            None => BTreeMap::new(),
        };
        reps.insert(
            replica,
            Report {
                at: now,
                links,
                traffic,
                rates,
            },
        );
    }

    /// `site`'s traffic toward each peer site, over its fresh replicas.
    pub fn traffic_for_site(&self, site: &SiteName, now: Instant) -> BTreeMap<String, Traffic> {
        let m = self.by_site.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: BTreeMap<String, Traffic> = BTreeMap::new();
        for r in m
            .get(site)
            .into_iter()
            .flat_map(|reps| reps.values())
            .filter(|r| now.saturating_duration_since(r.at) < FRESH_FOR)
        {
            for (peer, t) in &r.traffic {
                let e = out.entry(peer.clone()).or_default();
                for (reason, n) in &t.refusals {
                    *e.refusals.entry(reason.clone()).or_default() += n;
                }
                if let Some(rate) = r.rates.get(peer) {
                    e.rate.sent_bps += rate.sent_bps;
                    e.rate.received_bps += rate.received_bps;
                }
            }
        }
        out
    }

    /// The fresh links of `site`'s replicas, by replica then peer.
    pub fn for_site(&self, site: &SiteName, now: Instant) -> Vec<pb::PeerLink> {
        let m = self.by_site.lock().unwrap_or_else(|e| e.into_inner());
        m.get(site)
            .into_iter()
            .flat_map(|reps| reps.values())
            .filter(|r| now.saturating_duration_since(r.at) < FRESH_FOR)
            .flat_map(|r| r.links.iter().cloned())
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

/// Rates from a replica's report before to its counters now. A counter that went back
/// (the gateway restarted) gives no rate. Pure.
fn rates(
    prev: &Report,
    now_traffic: &BTreeMap<String, pb::SiteTraffic>,
    now: Instant,
) -> BTreeMap<String, Rate> {
    let secs = now.saturating_duration_since(prev.at).as_secs_f64();
    if secs <= 0.0 {
        return prev.rates.clone();
    }
    now_traffic
        .iter()
        .filter_map(|(peer, t)| {
            let before = prev.traffic.get(peer);
            let (s0, r0) = before.map_or((0, 0), |b| (b.sent_bytes, b.received_bytes));
            let sent = t.sent_bytes.checked_sub(s0)?;
            let recv = t.received_bytes.checked_sub(r0)?;
            Some((
                peer.clone(),
                Rate {
                    sent_bps: sent as f64 / secs,
                    received_bps: recv as f64 / secs,
                },
            ))
        })
        .collect()
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
    fn successive_reports_give_rates_and_a_restart_none() {
        let t = |sent, recv, refused: &[(&str, u64)]| pb::SiteTraffic {
            peer_site: "west".into(),
            sent_bytes: sent,
            received_bytes: recv,
            refusals: refused.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        let r = LinkReports::default();
        let east = SiteName::new("east").unwrap();
        let t0 = Instant::now();
        r.report(&east, "a", vec![], vec![t(1000, 10, &[])], t0);
        // The first report has no rate yet.
        assert_eq!(r.traffic_for_site(&east, t0)["west"].rate, Rate::default());
        let t1 = t0 + Duration::from_secs(2);
        r.report(
            &east,
            "a",
            vec![],
            vec![t(5000, 410, &[("no_ready_endpoint", 3)])],
            t1,
        );
        r.report(
            &east,
            "b",
            vec![],
            vec![t(7, 7, &[("no_ready_endpoint", 1)])],
            t1,
        );
        let w = &r.traffic_for_site(&east, t1)["west"];
        assert_eq!(
            w.rate,
            Rate {
                sent_bps: 2000.0,
                received_bps: 200.0
            }
        );
        assert_eq!(w.refusals["no_ready_endpoint"], 4);
        // Replica a restarted: its counters went back; no rate, no panic.
        r.report(
            &east,
            "a",
            vec![],
            vec![t(10, 1, &[])],
            t1 + Duration::from_secs(2),
        );
        let w = &r.traffic_for_site(&east, t1 + Duration::from_secs(2))["west"];
        assert_eq!(w.rate, Rate::default());
    }

    #[test]
    fn reports_replace_expire_and_stay_bounded() {
        let r = LinkReports::default();
        let east = SiteName::new("east").unwrap();
        let t0 = Instant::now();
        r.report(
            &east,
            "10.0.0.1:15443",
            vec![link("west", "quic")],
            vec![],
            t0,
        );
        r.report(
            &east,
            "10.0.0.9:15443",
            vec![link("west", "h2")],
            vec![],
            t0,
        );
        // A replica's new report replaces its old one; the replica is the reporter's
        // own, whatever the links claim.
        r.report(
            &east,
            "10.0.0.1:15443",
            vec![link("west", "h2")],
            vec![],
            t0,
        );
        let got = r.for_site(&east, t0);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|l| l.transport == "h2"));
        assert!(got.iter().all(|l| l.replica.starts_with("10.0.0.")));
        // Stale reports are not shown.
        assert!(r.for_site(&east, t0 + FRESH_FOR).is_empty());
        // At most MAX_LINKS links per report, and GATEWAY_ADDRESSES_MAX replicas per site.
        r.report(
            &east,
            "big",
            vec![link("west", "quic"); MAX_LINKS + 10],
            vec![],
            t0,
        );
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
                vec![],
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
