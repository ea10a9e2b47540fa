//! Who may start a handshake with the ingress (QUIC or h2) before any certificate is
//! seen, and what an authenticated peer may hold afterwards. Pure: counters and
//! decisions, no sockets.
//!
//! A handshake costs the gateway a connection's state (TLS, QUIC, buffers) until it
//! completes or times out, and an unauthenticated peer can start thousands for the price
//! of their ClientHellos. The gate bounds that state:
//! - past [`Limits::retry_above`] handshakes in flight (by default always), a peer whose
//!   address is not yet validated gets a stateless Retry (RFC 9000 §8.1.2) instead of
//!   state: spoofed sources never come back, and nothing but the Retry is ever sent to an
//!   unvalidated address. That also keeps the gateway within the 3× anti-amplification
//!   limit, which quinn itself overshoots by up to one datagram (it sends a full datagram
//!   whenever any budget is left: quinn PR #1148, as msquic and Google's quiche do);
//! - at most [`Limits::per_address`] handshakes per source IP;
//! - at most [`Limits::total`] handshakes in all; beyond, the connection is refused.
//!
//! Authenticated connections leave the gate as soon as the handshake completes, so
//! established peers never compete with a flood.
//!
//! Once authenticated, a peer gateway is bounded by its verified SPIFFE ID (every replica
//! of a site shares it) through [`PeerLinks`]: at most [`LINKS_PER_PEER`] connections
//! (QUIC, h2 and reverse h2 counted together), and one UDP flow budget across all of
//! them, so a peer cannot multiply its share by opening more connections.
//!
//! Descriptor shares of the open-file limit: [`tcp_streams_per_peer`] (one peer's
//! endpoint connections at the ingress) and [`client_connections`] (the import
//! listeners' clients at the egress, all together).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};

use meshfed_identity::SpiffeId;

use crate::udp::{FlowBudget, FlowLimits};

/// Connections one peer identity may hold at the ingress: 32 replicas (the catalog's
/// bound on a site's addresses) × a pool of 8, with room for QUIC probes and reverse
/// links. Each h2 connection may buffer up to its 32 MiB window, so this is also what
/// bounds the memory one authenticated peer can pin.
pub const LINKS_PER_PEER: usize = 256;

/// The gate's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes in flight beyond which unvalidated addresses get a Retry. Default 0:
    /// always (one round trip more per new peer connection, which gateways open rarely).
    pub retry_above: usize,
    /// Handshakes in flight from one IP address. Default 16.
    pub per_address: usize,
    /// Handshakes in flight in all. Default 256.
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            retry_above: 0,
            per_address: 16,
            total: 256,
        }
    }
}

/// What to do with a new connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Accept,
    /// Send a Retry: the peer must prove it owns its address first.
    Retry,
    /// Refuse (CONNECTION_REFUSED), with the stable reason for logs and metrics.
    Refuse(&'static str),
}

/// Decides one attempt from the handshakes in flight. Pure.
pub fn decide(limits: &Limits, total: usize, from_address: usize, validated: bool) -> Admission {
    if !validated && total >= limits.retry_above {
        return Admission::Retry;
    }
    if from_address >= limits.per_address {
        return Admission::Refuse("handshake_limit_per_address");
    }
    if total >= limits.total {
        return Admission::Refuse("handshake_limit");
    }
    Admission::Accept
}

/// Handshakes in flight, in all and per source IP.
#[derive(Debug, Default)]
pub struct Gate {
    limits: Limits,
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// A handshake in flight; leaves the gate when dropped.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Counters only: a panic elsewhere cannot leave them half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits an attempt from `ip` (taking a slot) or says what to do instead.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Result<Slot, Admission> {
        let mut c = self.counts();
        let from = c.by_ip.get(&ip).copied().unwrap_or(0);
        match decide(&self.limits, c.total, from, validated) {
            Admission::Accept => {
                c.total += 1;
                *c.by_ip.entry(ip).or_default() += 1;
                Ok(Slot {
                    gate: self.clone(),
                    ip,
                })
            }
            other => Err(other),
        }
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.counts().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        c.total -= 1;
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

/// TCP streams (each holding an endpoint connection: a descriptor) one peer identity
/// may hold at the ingress across all its connections: a quarter of the open-file limit,
/// at least 16. Before, one site's clients could make this gateway spend every
/// descriptor on their endpoint connections, and every other site's streams then failed
/// to connect. Pure.
pub fn tcp_streams_per_peer(nofile: u64) -> usize {
    quarter(nofile)
}

/// Client connections the import listeners (TCP and HTTP) hold at once, all together:
/// a quarter of the open-file limit, at least 16. Before, local clients could take every
/// descriptor, and the gateway's admin endpoint, its other listeners and the files it
/// reads failed with EMFILE. Pure.
pub fn client_connections(nofile: u64) -> usize {
    quarter(nofile)
}

fn quarter(nofile: u64) -> usize {
    usize::try_from(nofile / 4).unwrap_or(usize::MAX).max(16)
}

/// What authenticated peers hold at the ingress, by verified ID.
#[derive(Debug)]
pub struct PeerLinks {
    max: usize,
    flows: FlowLimits,
    streams_per_peer: usize,
    inner: Mutex<BTreeMap<SpiffeId, PeerEntry>>,
}

#[derive(Debug, Default)]
struct PeerEntry {
    links: usize,
    /// Shared by the peer's connections while any of its flows or connections lives.
    flows: Weak<FlowBudget>,
    /// The same for its TCP streams.
    streams: Weak<FlowBudget>,
}

impl PeerEntry {
    /// Whether anything of the peer's is still counted.
    fn live(&self) -> bool {
        self.links > 0 || self.flows.strong_count() > 0 || self.streams.strong_count() > 0
    }
}

/// One of a peer's connections; given back when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    links: Arc<PeerLinks>,
    peer: SpiffeId,
}

impl PeerLinks {
    /// At most `max` connections per peer; `flows.per_peer` UDP flows and
    /// `streams_per_peer` TCP streams per peer.
    pub fn new(max: usize, flows: FlowLimits, streams_per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            flows,
            streams_per_peer,
            inner: Mutex::default(),
        })
    }

    /// TCP streams one peer may hold.
    pub fn streams_per_peer(&self) -> usize {
        self.streams_per_peer
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, PeerEntry>> {
        // Counters only, as the gate's.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection of `peer`, or returns how many it holds already (the
    /// limit).
    pub fn take(self: &Arc<Self>, peer: &SpiffeId) -> Result<PeerSlot, usize> {
        let mut m = self.entries();
        let e = m.entry(peer.clone()).or_default();
        if e.links >= self.max {
            return Err(e.links);
        }
        e.links += 1;
        Ok(PeerSlot {
            links: self.clone(),
            peer: peer.clone(),
        })
    }

    /// The UDP flow budget `peer` shares across all its connections (accepted or
    /// dialed by us).
    pub fn flows(&self, peer: &SpiffeId) -> Arc<FlowBudget> {
        let mut m = self.entries();
        // Peers whose connections, flows and streams are all gone.
        m.retain(|_, e| e.live());
        budget(&mut m, peer, |e| &mut e.flows, self.flows.per_peer)
    }

    /// The TCP stream budget `peer` shares across all its connections. Looked up once
    /// per stream: no sweep here (a peer's entry goes with its last connection).
    pub fn streams(&self, peer: &SpiffeId) -> Arc<FlowBudget> {
        let mut m = self.entries();
        budget(&mut m, peer, |e| &mut e.streams, self.streams_per_peer)
    }

    /// Connections `peer` holds now.
    pub fn held(&self, peer: &SpiffeId) -> usize {
        self.entries().get(peer).map_or(0, |e| e.links)
    }

    /// Peers with an entry (connections, or a live flow budget).
    pub fn peers(&self) -> usize {
        self.entries().len()
    }
}

/// `peer`'s budget that `which` picks, made with room for `n` when it has none alive.
fn budget(
    m: &mut BTreeMap<SpiffeId, PeerEntry>,
    peer: &SpiffeId,
    which: fn(&mut PeerEntry) -> &mut Weak<FlowBudget>,
    n: usize,
) -> Arc<FlowBudget> {
    // The ID is copied only for a peer's first entry.
    if !m.contains_key(peer) {
        m.insert(peer.clone(), PeerEntry::default());
    }
    let w = which(m.get_mut(peer).expect("inserted above"));
    if let Some(b) = w.upgrade() {
        return b;
    }
    let b = FlowBudget::new(FlowLimits {
        per_peer: n,
        total: n,
    });
    *w = Arc::downgrade(&b);
    b
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.links.entries();
        if let Some(e) = m.get_mut(&self.peer) {
            e.links -= 1;
            if !e.live() {
                m.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let l = Limits {
            retry_above: 2,
            per_address: 3,
            total: 5,
        };
        // (in flight, from this address, validated) → admission
        let rows: &[(usize, usize, bool, Admission)] = &[
            (0, 0, false, Admission::Accept),
            (1, 1, false, Admission::Accept),
            // Under load, unvalidated addresses must prove themselves first.
            (2, 0, false, Admission::Retry),
            (4, 2, false, Admission::Retry),
            (5, 0, false, Admission::Retry),
            // A validated address is counted against its own limit and the total.
            (2, 0, true, Admission::Accept),
            (2, 3, true, Admission::Refuse("handshake_limit_per_address")),
            (5, 0, true, Admission::Refuse("handshake_limit")),
            (9, 9, true, Admission::Refuse("handshake_limit_per_address")),
        ];
        for (i, (total, from, validated, want)) in rows.iter().enumerate() {
            assert_eq!(decide(&l, *total, *from, *validated), *want, "row {i}");
        }
    }

    #[test]
    fn slots_are_counted_and_released() {
        let g = Gate::new(Limits {
            retry_above: 100,
            per_address: 2,
            total: 3,
        });
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let s1 = g.admit(a, true).unwrap();
        let _s2 = g.admit(a, true).unwrap();
        assert_eq!(
            g.admit(a, true).unwrap_err(),
            Admission::Refuse("handshake_limit_per_address")
        );
        let _s3 = g.admit(b, true).unwrap();
        assert_eq!(
            g.admit(b, true).unwrap_err(),
            Admission::Refuse("handshake_limit")
        );
        assert_eq!(g.in_flight(), 3);
        drop(s1);
        assert_eq!(g.in_flight(), 2);
        g.admit(a, true).unwrap();
    }

    #[test]
    fn a_peer_is_bounded_by_its_identity_not_its_connections() {
        let limits = FlowLimits {
            per_peer: 2,
            total: 100,
        };
        let links = PeerLinks::new(3, limits, 2);
        let west: SpiffeId = "spiffe://west.example.org/meshfed/site/west/gateway"
            .parse()
            .unwrap();
        let east: SpiffeId = "spiffe://east.example.org/meshfed/site/east/gateway"
            .parse()
            .unwrap();
        let held: Vec<PeerSlot> = (0..3).map(|_| links.take(&west).unwrap()).collect();
        assert_eq!(links.take(&west).unwrap_err(), 3, "the fourth connection");
        // Another peer is not affected.
        let e = links.take(&east).unwrap();
        assert_eq!(links.held(&west), 3);
        drop(held);
        assert_eq!(links.held(&west), 0);
        let _again = links.take(&west).unwrap();

        // One flow budget across all of a peer's connections.
        let (a, b) = (links.flows(&west), links.flows(&west));
        assert!(Arc::ptr_eq(&a, &b));
        let f1 = a.take().unwrap();
        let _f2 = b.take().unwrap();
        assert!(
            a.take().is_none() && b.take().is_none(),
            "per peer, not per connection"
        );
        assert!(
            links.flows(&east).take().is_some(),
            "east has its own budget"
        );
        drop(f1);
        assert!(b.take().is_some());

        // Nothing is kept for a peer that holds nothing.
        drop((e, _again));
        assert_eq!(links.peers(), 1, "west's flows keep its budget");
        drop((a, b, _f2));
        assert_eq!(
            links.peers(),
            1,
            "west's empty entry lives until the next sweep"
        );
        let _ = links.flows(&east);
        assert_eq!(links.peers(), 1, "only east's fresh budget");

        // TCP streams: a budget of their own per peer, across its connections, apart
        // from its UDP flows.
        let slot = links.take(&west).unwrap();
        let (a, b) = (links.streams(&west), links.streams(&west));
        assert!(Arc::ptr_eq(&a, &b));
        let _udp = links.flows(&west).take().unwrap();
        let s1 = a.take().unwrap();
        let _s2 = b.take().unwrap();
        assert!(a.take().is_none(), "two streams per peer");
        assert!(links.streams(&east).take().is_some(), "east's own");
        drop(s1);
        assert!(b.take().is_some());
        // A stream outliving its peer's last connection keeps the entry.
        drop(slot);
        assert!(links.peers() >= 1);
    }

    #[test]
    fn a_quarter_of_the_descriptors_for_one_peers_tcp_streams_and_for_import_clients() {
        for (nofile, want) in [
            (64, 16),
            (0, 16),
            (1024, 256),
            (20_000, 5_000),
            (1 << 20, 1 << 18),
        ] {
            assert_eq!(tcp_streams_per_peer(nofile), want, "nofile {nofile}");
            assert_eq!(client_connections(nofile), want, "nofile {nofile}");
        }
    }
}
