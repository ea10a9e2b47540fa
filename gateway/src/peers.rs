//! One long-lived link per address of a peer site (each of its gateway replicas),
//! re-established with backoff when it drops. Egress asks for a live link and gets the
//! next in turn, so streams spread over the replicas and one that dies is skipped; it
//! never dials itself. Host-name addresses are resolved and re-resolved on their TTL
//! (`resolve`).
//!
//! A link is a QUIC connection or a pool of h2 connections (`hbone`), as the peer's
//! [`TransportMode`] says. `auto` (the default) dials QUIC and falls back to h2 when no
//! QUIC handshake completes within the fallback deadline; while on h2 it probes QUIC in
//! the background and moves back when a handshake completes. A move only changes where
//! new streams go: the old link lives until its streams end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::select_all;
use meshfed_catalog::SiteName;
use meshfed_catalog::names::{GATEWAY_ADDRESSES_MAX, GatewayAddress};
use meshfed_identity::SpiffeId;
use meshfed_lifecycle::drain::DrainWatcher;
use quinn::{Connection, ConnectionError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hbone;
use crate::metrics::Metrics;

/// First retry delay after a failed dial; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One dialed address of a peer: its connection as the dialer task keeps it.
#[derive(Clone)]
struct Link {
    addr: SocketAddr,
    conn: watch::Receiver<Option<PeerConn>>,
    kick: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
    /// An open on it went unanswered for [`SUSPECT_AFTER`]: new opens prefer the other
    /// links until it answers again (or is redialed). A replica that dies without a
    /// word (kill -9) stops getting new streams within that, not after the open timeout.
    suspect: Arc<AtomicBool>,
    /// Why the link uses the transport it does (for status and logs).
    why: Arc<Mutex<String>>,
}

/// How long an open may go unanswered before its link is suspect.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(500);

impl Link {
    fn is_live(&self) -> bool {
        self.conn.borrow().as_ref().is_some_and(PeerConn::is_live)
    }

    fn live(&self) -> Option<PeerConn> {
        self.conn.borrow().as_ref().filter(|c| c.is_live()).cloned()
    }
}

/// How a peer is reached (`transport` in the gateway config, per peer or for all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC, falling back to h2 when no QUIC handshake completes in time.
    #[default]
    Auto,
    Quic,
    H2,
}

impl std::str::FromStr for TransportMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Quic),
            "h2" => Ok(Self::H2),
            other => Err(format!("{other:?}: auto, quic or h2")),
        }
    }
}

/// The transport a live link uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Quic,
    H2,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::H2 => "h2",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A live link to a peer gateway: a QUIC connection, or a pool of h2 connections.
#[derive(Clone)]
pub enum PeerConn {
    Quic(Connection),
    H2(hbone::Pool),
}

impl PeerConn {
    pub fn is_live(&self) -> bool {
        match self {
            Self::Quic(c) => c.close_reason().is_none(),
            Self::H2(p) => p.is_live(),
        }
    }

    /// Tells links apart (QUIC's stable ID; an h2 pool's has the high bit set).
    pub fn stable_id(&self) -> usize {
        match self {
            Self::Quic(c) => c.stable_id(),
            Self::H2(p) => p.stable_id(),
        }
    }

    pub fn transport(&self) -> Transport {
        match self {
            Self::Quic(_) => Transport::Quic,
            Self::H2(_) => Transport::H2,
        }
    }

    /// The far gateway's verified SPIFFE ID.
    pub fn peer_id(&self) -> Option<SpiffeId> {
        match self {
            Self::Quic(c) => peer_spiffe_id(c),
            Self::H2(p) => Some(p.peer_id().clone()),
        }
    }

    /// Closes the link now with `code` (QUIC application code) and `why`.
    pub fn close(&self, code: u32, why: &'static [u8]) {
        match self {
            Self::Quic(c) => c.close(quinn::VarInt::from_u32(code), why),
            Self::H2(p) => p.close(),
        }
    }
}

/// A peer's connections, one per address (gateway replica), as egress uses them: each
/// open takes the next live one in turn.
#[derive(Clone)]
pub struct PeerHandle {
    pub site: SiteName,
    pub spiffe_id: SpiffeId,
    links: Arc<Vec<Link>>,
    next: Arc<AtomicUsize>,
    /// The connections the peer dialed to us, asked for only when none of ours is up
    /// (the only way to an outbound-only site).
    accepted_for: Option<AcceptedFor>,
}

/// The live links a peer gateway dialed to us (the ingress keeps them): its QUIC
/// connections, and its reverse h2 connections (an outbound-only site on h2).
pub type AcceptedFor = Arc<dyn Fn(&SpiffeId) -> Vec<PeerConn> + Send + Sync>;

/// Serves the streams a peer opens on links we dialed (the ingress provides it).
pub struct OnDialedHooks {
    /// A QUIC connection we dialed.
    pub quic: Arc<dyn Fn(Connection) + Send + Sync>,
    /// A reverse h2 connection we dialed (we are its HTTP/2 server): resolves when it
    /// has ended; cancelling the token shuts it down gracefully (GOAWAY, streams in
    /// flight finish).
    pub reverse_h2: ServeReverse,
}

/// Serves a reverse h2 connection we dialed: the stream, the peer's verified ID, its
/// address, and the token that shuts it down gracefully.
pub type ServeReverse = Arc<
    dyn Fn(
            tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
            SpiffeId,
            SocketAddr,
            CancellationToken,
        ) -> futures::future::BoxFuture<'static, ()>
        + Send
        + Sync,
>;
pub type OnDialed = Arc<OnDialedHooks>;

/// The client TLS for dialing a peer that must present one ID, per transport.
#[derive(Clone)]
pub struct PeerTls {
    pub quic: quinn::ClientConfig,
    /// ALPN `h2`.
    pub h2: Arc<rustls::ClientConfig>,
    /// ALPN `meshfed-reverse-h2`.
    pub h2_reverse: Arc<rustls::ClientConfig>,
}

/// Builds the client TLS for dialing a peer that must present this ID.
pub type ClientConfigFor = Arc<dyn Fn(&SpiffeId) -> Option<PeerTls> + Send + Sync>;

/// Which transport each peer uses, and how `auto` decides.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Transports {
    /// Peers not in `sites`.
    pub default: TransportMode,
    pub sites: BTreeMap<SiteName, TransportMode>,
    /// `auto`: how long a QUIC handshake may take before the link falls back to h2.
    #[serde(serialize_with = "crate::config::as_debug")]
    pub fallback_after: Duration,
    /// `auto` on h2: how often QUIC is tried again.
    #[serde(serialize_with = "crate::config::as_debug")]
    pub probe_every: Duration,
    /// Dial a reverse h2 connection beside every h2 link, so that the peer can open
    /// streams to us: set for an outbound-only site (`federation.inbound: false`).
    pub reverse: bool,
    /// TCP connections in one h2 link (`transport.h2_connections`).
    pub h2_connections: usize,
}

/// `auto`'s default fallback deadline: a QUIC handshake on any working path completes
/// well within it (one round trip plus the certificate exchange).
pub const FALLBACK_AFTER: Duration = Duration::from_secs(1);
/// `auto`'s default interval between QUIC probes while on h2.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);

impl Default for Transports {
    fn default() -> Self {
        Self {
            default: TransportMode::Auto,
            sites: BTreeMap::new(),
            fallback_after: FALLBACK_AFTER,
            probe_every: PROBE_EVERY,
            reverse: false,
            h2_connections: hbone::POOL,
        }
    }
}

impl Transports {
    pub fn for_site(&self, site: &SiteName) -> TransportMode {
        self.sites.get(site).copied().unwrap_or(self.default)
    }
}

/// All dialable peers, by site. Peers come and go as the catalog changes; each address
/// of a peer (a gateway replica) has its own dialer task, stopped when the address or the
/// peer goes. Addresses are `IP:port` or `host:port`; host names are resolved, and again
/// when their answers' TTLs run out, and every address they resolve to is dialed.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<PeersInner>,
}

struct PeersInner {
    endpoint: quinn::Endpoint,
    transports: Transports,
    metrics: Metrics,
    config_for: ClientConfigFor,
    drain: DrainWatcher,
    by_site: Mutex<BTreeMap<SiteName, Entry>>,
    accepted_for: std::sync::OnceLock<AcceptedFor>,
    /// Shared with the dialers, which may start before the ingress is attached.
    on_dialed: Arc<std::sync::OnceLock<OnDialed>>,
}

struct Entry {
    spiffe_id: SpiffeId,
    cfg: PeerTls,
    /// The addresses as given.
    given: Vec<String>,
    links: BTreeMap<SocketAddr, Link>,
    /// `links` as egress takes them: shared, rebuilt when they change, so that an open
    /// clones one Arc rather than every link.
    handle_links: Arc<Vec<Link>>,
    next: Arc<AtomicUsize>,
    /// Stops the entry's resolver task (when it has host names).
    stop: CancellationToken,
}

impl Entry {
    fn stop_all(&self) {
        self.stop.cancel();
        for l in self.links.values() {
            l.stop.cancel();
        }
    }
}

/// The `IP:port` addresses and the `(host, port)` names of a peer's address list
/// ([`GatewayAddress`]); anything else is skipped (and named in the third list). Pure.
pub fn split_addresses(
    given: &[String],
) -> (BTreeSet<SocketAddr>, Vec<(String, u16)>, Vec<String>) {
    let (mut ips, mut names, mut bad) = (BTreeSet::new(), Vec::new(), Vec::new());
    for a in given {
        match GatewayAddress::parse(a) {
            Some(GatewayAddress::Ip(sa)) => {
                ips.insert(sa);
            }
            Some(GatewayAddress::Name(host, port)) => names.push((host, port)),
            None => bad.push(a.clone()),
        }
    }
    (ips, names, bad)
}

impl Peers {
    /// Dialers stop when `drain` starts, and it waits for them.
    pub fn new(
        endpoint: quinn::Endpoint,
        transports: Transports,
        metrics: Metrics,
        config_for: ClientConfigFor,
        drain: DrainWatcher,
    ) -> Self {
        Self {
            inner: Arc::new(PeersInner {
                endpoint,
                transports,
                metrics,
                config_for,
                drain,
                by_site: Mutex::new(BTreeMap::new()),
                accepted_for: std::sync::OnceLock::new(),
                on_dialed: Arc::default(),
            }),
        }
    }

    /// Connects the peers to the ingress (built after them): our dialed connections
    /// serve the peer's streams too, and the peer's dialed connections carry ours when
    /// we cannot dial it.
    pub fn attach_ingress(&self, accepted_for: AcceptedFor, on_dialed: OnDialed) {
        let _ = self.inner.accepted_for.set(accepted_for);
        let _ = self.inner.on_dialed.set(on_dialed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SiteName, Entry>> {
        self.inner.by_site.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a peer, or updates it when its addresses or identity changed (an address
    /// that stays keeps its connection). A peer without addresses (outbound-only) has no
    /// dialer: it is reached over the connections it dials. Returns false when
    /// addresses were given and none is usable.
    pub fn upsert(&self, site: &SiteName, spiffe_id: &SpiffeId, addresses: &[String]) -> bool {
        let (ips, names, bad) = split_addresses(addresses);
        if !bad.is_empty() {
            warn!(%site, addresses = ?bad, "gateway addresses that are neither IP:port nor host:port skipped");
        }
        if ips.is_empty() && names.is_empty() && !addresses.is_empty() {
            return false;
        }
        let mut map = self.lock();
        if let Some(e) = map.get(site) {
            if e.spiffe_id == *spiffe_id && e.given == addresses {
                return true;
            }
            if e.spiffe_id != *spiffe_id {
                e.stop_all();
                map.remove(site);
            }
        }
        let Some(cfg) = (self.inner.config_for)(spiffe_id) else {
            warn!(%site, %spiffe_id, "no client TLS config for peer");
            return false;
        };
        let entry = map.entry(site.clone()).or_insert_with(|| Entry {
            spiffe_id: spiffe_id.clone(),
            cfg,
            given: vec![],
            links: BTreeMap::new(),
            handle_links: Arc::default(),
            next: Arc::default(),
            stop: CancellationToken::new(),
        });
        entry.given = addresses.to_vec();
        entry.stop.cancel();
        entry.stop = self.inner.drain.token().child_token();
        if names.is_empty() {
            self.set_links(site, entry, ips);
        } else {
            // Dial the literal addresses now; the resolver adds the names' as they come.
            let keep: BTreeSet<SocketAddr> = entry
                .links
                .keys()
                .copied()
                .filter(|a| !ips.contains(a))
                .collect();
            self.set_links(site, entry, ips.iter().copied().chain(keep).collect());
            let (this, site, stop) = (self.clone(), site.clone(), entry.stop.clone());
            self.inner
                .drain
                .spawn(async move { this.resolve(site, ips, names, stop).await });
        }
        true
    }

    /// Keeps a peer's host names resolved: every answer's addresses are dialed.
    async fn resolve(
        self,
        site: SiteName,
        ips: BTreeSet<SocketAddr>,
        names: Vec<(String, u16)>,
        stop: CancellationToken,
    ) {
        let mut resolved = crate::resolve::Resolved::new();
        let hosts: BTreeSet<String> = names.iter().map(|(h, _)| h.clone()).collect();
        loop {
            resolved.refresh(&hosts).await;
            let mut want = ips.clone();
            for (host, port) in &names {
                for ip in resolved.answers.get(host).into_iter().flatten() {
                    want.insert(SocketAddr::new(*ip, *port));
                }
            }
            {
                let mut map = self.lock();
                if stop.is_cancelled() {
                    return;
                }
                if let Some(e) = map.get_mut(&site) {
                    self.set_links(&site, e, want);
                }
            }
            let due = resolved.next_due().map_or(crate::resolve::RETRY, |d| {
                d.saturating_duration_since(std::time::Instant::now())
            });
            tokio::select! {
                _ = tokio::time::sleep(due.max(crate::resolve::MIN_REFRESH)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Makes the entry's dialers match `want`: removed addresses stop, new ones dial. At
    /// most [`GATEWAY_ADDRESSES_MAX`] per peer, whatever a catalog or a DNS answer says.
    fn set_links(&self, site: &SiteName, e: &mut Entry, want: BTreeSet<SocketAddr>) {
        if want.len() > GATEWAY_ADDRESSES_MAX {
            warn!(%site, addresses = want.len(), max = GATEWAY_ADDRESSES_MAX, "too many gateway addresses; dialing the first");
        }
        let want: BTreeSet<SocketAddr> = want.into_iter().take(GATEWAY_ADDRESSES_MAX).collect();
        e.links.retain(|addr, l| {
            let kept = want.contains(addr);
            if !kept {
                info!(%site, %addr, "peer address removed");
                l.stop.cancel();
            }
            kept
        });
        for addr in want {
            if e.links.contains_key(&addr) {
                continue;
            }
            let (tx, rx) = watch::channel(None);
            let kick = Arc::new(tokio::sync::Notify::new());
            let stop = self.inner.drain.token().child_token();
            let suspect = Arc::new(AtomicBool::new(false));
            let why = Arc::new(Mutex::new(String::from("not connected yet")));
            let dialer = Dialer {
                endpoint: self.inner.endpoint.clone(),
                site: site.clone(),
                mode: self.inner.transports.for_site(site),
                reverse: self.inner.transports.reverse,
                h2_connections: self.inner.transports.h2_connections,
                fallback_after: self.inner.transports.fallback_after,
                probe_every: self.inner.transports.probe_every,
                why: why.clone(),
                addr,
                cfg: e.cfg.clone(),
                tx,
                kick: kick.clone(),
                metrics: self.inner.metrics.clone(),
                stop: stop.clone(),
                suspect: suspect.clone(),
                on_dialed: self.inner.on_dialed.clone(),
            };
            let span = info_span!("peer", site = %site, addr = %addr, expect = %e.spiffe_id);
            self.inner.drain.spawn(dialer.run().instrument(span));
            e.links.insert(
                addr,
                Link {
                    addr,
                    conn: rx,
                    kick,
                    stop,
                    suspect,
                    why,
                },
            );
        }
        e.handle_links = Arc::new(e.links.values().cloned().collect());
    }

    /// Stops the dialers of every peer not in `keep`.
    pub fn retain(&self, keep: &BTreeSet<SiteName>) {
        self.lock().retain(|site, e| {
            let kept = keep.contains(site);
            if !kept {
                info!(%site, "peer removed");
                e.stop_all();
            }
            kept
        });
    }

    /// Each dialable peer with the verified ID of a live connection, if any.
    pub fn status(&self) -> Vec<(SiteName, Option<SpiffeId>)> {
        self.lock()
            .iter()
            .map(|(site, e)| {
                let id = e
                    .links
                    .values()
                    .find_map(|l| l.live())
                    .as_ref()
                    .and_then(PeerConn::peer_id);
                (site.clone(), id)
            })
            .collect()
    }

    /// The addresses dialed for `site` and whether each is connected.
    pub fn links(&self, site: &SiteName) -> Vec<(SocketAddr, bool)> {
        self.lock().get(site).map_or_else(Vec::new, |e| {
            e.links
                .values()
                .map(|l| (l.addr, l.live().is_some()))
                .collect()
        })
    }

    /// Every dialed link: site, address, its transport when up, and why it uses it.
    pub fn link_status(&self) -> Vec<LinkStatus> {
        self.lock()
            .iter()
            .flat_map(|(site, e)| {
                e.links.values().map(|l| LinkStatus {
                    site: site.clone(),
                    addr: l.addr,
                    transport: l.live().map(|c| c.transport()),
                    why: l.why.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                })
            })
            .collect()
    }

    /// `/debug/peers`' dialed side: each peer with its expected ID, the addresses as
    /// given, and each link (address, up, transport, why, the verified ID, suspect,
    /// QUIC's path figures when on QUIC, and the pool's live connections when on h2).
    pub fn debug(&self) -> serde_json::Value {
        let sites: serde_json::Map<String, serde_json::Value> = self
            .lock()
            .iter()
            .map(|(site, e)| {
                let links: Vec<serde_json::Value> = e
                    .links
                    .values()
                    .map(|l| {
                        let live = l.live();
                        serde_json::json!({
                            "address": l.addr.to_string(),
                            "up": live.is_some(),
                            "transport": live.as_ref().map(|c| c.transport().as_str()),
                            "why": *l.why.lock().unwrap_or_else(|e| e.into_inner()),
                            "verified_id": live.as_ref().and_then(PeerConn::peer_id).map(|i| i.to_string()),
                            "suspect": l.suspect.load(Ordering::Relaxed),
                            "quic": live.as_ref().and_then(quic_debug),
                            "h2_connections": match &live {
                                Some(PeerConn::H2(p)) => serde_json::json!({
                                    "live": p.members_live(),
                                    "of": p.members(),
                                }),
                                _ => serde_json::Value::Null,
                            },
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "spiffe_id": e.spiffe_id.to_string(),
                    "addresses": e.given,
                    "links": links,
                });
                (site.to_string(), v)
            })
            .collect();
        serde_json::Value::Object(sites)
    }

    /// Closes the live connections to gateways of `td` (its bundle was withdrawn).
    pub fn close_trust_domain(&self, td: &str) -> usize {
        self.close_where(|t| t == td)
    }

    /// Closes the live connections to gateways whose trust domain `untrusted` names.
    pub fn close_where(&self, untrusted: impl Fn(&str) -> bool) -> usize {
        let conns: Vec<PeerConn> = self
            .lock()
            .values()
            .filter(|e| untrusted(e.spiffe_id.trust_domain_str()))
            .flat_map(|e| e.links.values().filter_map(Link::live).collect::<Vec<_>>())
            .collect();
        for c in &conns {
            c.close(
                crate::wire::app_code::TRUST_WITHDRAWN,
                b"trust domain withdrawn from the federation",
            );
        }
        conns.len()
    }

    pub fn get(&self, site: &SiteName) -> Option<PeerHandle> {
        self.lock().get(site).map(|e| PeerHandle {
            site: site.clone(),
            spiffe_id: e.spiffe_id.clone(),
            links: e.handle_links.clone(),
            next: e.next.clone(),
            accepted_for: self.inner.accepted_for.get().cloned(),
        })
    }

    /// Whether the peer has a live connection right now.
    pub fn is_connected(&self, site: &SiteName) -> bool {
        self.lock()
            .get(site)
            .is_some_and(|e| e.links.values().any(Link::is_live))
    }
}

/// One dialed link as `meshfed status` and `/debug` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    pub site: SiteName,
    pub addr: SocketAddr,
    /// `None`: not connected now.
    pub transport: Option<Transport>,
    pub why: String,
}

impl PeerHandle {
    /// A live link, the next in turn among the peer's addresses, waiting up to `wait`
    /// for one to be (re-)established.
    pub async fn connection(&self, wait: Duration) -> Option<PeerConn> {
        if let Some(c) = self.pick() {
            return Some(c);
        }
        if let Some(accepted) = self.accepted_for.as_ref().map(|f| f(&self.spiffe_id))
            && !accepted.is_empty()
        {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % accepted.len();
            return Some(accepted[i].clone());
        }
        if self.links.is_empty() {
            return None;
        }
        let mut rxs: Vec<_> = self.links.iter().map(|l| l.conn.clone()).collect();
        let res = tokio::time::timeout(wait, async {
            loop {
                for rx in &mut rxs {
                    rx.borrow_and_update();
                }
                if let Some(c) = self.pick() {
                    return Some(c);
                }
                for l in self.links.iter() {
                    l.kick.notify_one();
                }
                let changed = rxs.iter_mut().map(|rx| Box::pin(rx.changed()));
                if futures_select_all(changed).await.is_err() {
                    return None;
                }
            }
        })
        .await;
        res.ok().flatten()
    }

    /// The next live connection in turn: unsuspected links first, suspect ones only
    /// when nothing else is up. No allocation: this runs for every open.
    fn pick(&self) -> Option<PeerConn> {
        for trusted_only in [true, false] {
            let usable =
                |l: &&Link| l.is_live() && !(trusted_only && l.suspect.load(Ordering::Relaxed));
            let n = self.links.iter().filter(usable).count();
            if n > 0 {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
                return self.links.iter().filter(usable).nth(i).and_then(Link::live);
            }
        }
        None
    }

    /// Marks (or clears) the link of `conn` as suspect: an open on it has gone unanswered
    /// for [`SUSPECT_AFTER`] (or it answered).
    pub fn suspect(&self, conn: &PeerConn, suspect: bool) {
        for l in self.links.iter() {
            if l.live().is_some_and(|c| c.stable_id() == conn.stable_id())
                && l.suspect.swap(suspect, Ordering::Relaxed) != suspect
            {
                if suspect {
                    warn!(site = %self.site, addr = %l.addr, "open unanswered: new streams go to the peer's other addresses");
                } else {
                    info!(site = %self.site, addr = %l.addr, "peer address answers again");
                }
            }
        }
    }

    /// Tells the dialer of `conn` that it looks dead (e.g. an open timed out), so it
    /// closes it and dials again now rather than after the idle timeout.
    pub fn report_dead(&self, conn: &PeerConn) {
        conn.close(crate::wire::app_code::UNRESPONSIVE, b"peer unresponsive");
        for l in self.links.iter() {
            if l.live().is_none_or(|c| c.stable_id() == conn.stable_id()) {
                l.kick.notify_one();
            }
        }
    }
}

/// The first of `futs` to finish; an error only when every one failed (all senders gone).
async fn futures_select_all<F, E>(futs: impl Iterator<Item = F>) -> Result<(), E>
where
    F: std::future::Future<Output = Result<(), E>> + Unpin,
{
    let mut futs: Vec<F> = futs.collect();
    let mut last = None;
    while !futs.is_empty() {
        let (r, _, rest) = select_all(futs).await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = Some(e);
                futs = rest;
            }
        }
    }
    match last {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct Dialer {
    endpoint: quinn::Endpoint,
    site: SiteName,
    mode: TransportMode,
    /// Keep a reverse h2 connection beside an h2 link (an outbound-only site).
    reverse: bool,
    h2_connections: usize,
    fallback_after: Duration,
    probe_every: Duration,
    /// Why the link uses its transport, for status.
    why: Arc<Mutex<String>>,
    addr: SocketAddr,
    cfg: PeerTls,
    tx: watch::Sender<Option<PeerConn>>,
    kick: Arc<tokio::sync::Notify>,
    metrics: Metrics,
    stop: CancellationToken,
    suspect: Arc<AtomicBool>,
    /// Serves the streams the peer opens on our connection.
    on_dialed: Arc<std::sync::OnceLock<OnDialed>>,
}

/// How a held link ended.
enum Held {
    Stopped,
    Closed(Option<ConnectionError>),
}

impl Dialer {
    async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        let mut ever_connected = false;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            match self.connect().await {
                Ok((conn, why)) => {
                    if ever_connected {
                        self.metrics.peer_reconnects.inc();
                    }
                    ever_connected = true;
                    match self.hold(conn, why).await {
                        Held::Stopped => return,
                        Held::Closed(reason) => {
                            // In TLS 1.3 the client finishes first; the server's verdict
                            // on our certificate arrives as a close right after.
                            if let Some(why) = reason.as_ref().and_then(refused_by_peer) {
                                self.metrics.handshake_failed("refused_by_peer");
                                warn!(%why, retry_in = ?backoff, "the peer refused our certificate");
                            } else {
                                backoff = BACKOFF_MIN;
                                match reason {
                                    Some(r) => {
                                        info!(reason = %r, "peer connection closed; redialing")
                                    }
                                    None => info!("peer h2 connections closed; redialing"),
                                }
                                continue;
                            }
                        }
                    }
                }
                Err(e) => {
                    self.set_why(format!("dial failed: {e}"));
                    warn!(error = %e, retry_in = ?backoff, "peer dial failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                // Someone needs the peer now: skip the rest of the backoff.
                _ = self.kick.notified() => {}
                _ = self.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn set_why(&self, why: String) {
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// One link, on the transport the mode picks.
    async fn connect(&self) -> Result<(PeerConn, String), DialError> {
        match self.mode {
            TransportMode::Quic => Ok((
                PeerConn::Quic(self.dial_quic(QUIC_DIAL_TIMEOUT).await?),
                "transport: quic (configured)".into(),
            )),
            TransportMode::H2 => Ok((
                PeerConn::H2(self.dial_h2().await?),
                "transport: h2 (configured)".into(),
            )),
            TransportMode::Auto => match self.dial_quic(self.fallback_after).await {
                Ok(c) => Ok((PeerConn::Quic(c), "auto: QUIC handshake completed".into())),
                // The peer answered and refused our certificate: h2 would be refused too.
                Err(e @ DialError::Handshake { .. }) => Err(e),
                Err(quic) => {
                    warn!(error = %quic, after = ?self.fallback_after, "no QUIC handshake; falling back to h2");
                    let pool = self.dial_h2().await.map_err(|h2| DialError::Both {
                        quic: quic.to_string(),
                        h2: h2.to_string(),
                    })?;
                    self.metrics
                        .transport_moved(self.site.as_str(), "quic_timeout");
                    Ok((
                        PeerConn::H2(pool),
                        format!(
                            "auto: no QUIC handshake within {:?} ({quic}); on h2, probing QUIC every {:?}",
                            self.fallback_after, self.probe_every
                        ),
                    ))
                }
            },
        }
    }

    /// Publishes `conn` to egress and keeps it until it closes or the dialer stops. On
    /// `auto`, an h2 link is replaced by QUIC as soon as a QUIC probe completes; the h2
    /// pool stays until its streams end.
    async fn hold(&self, mut conn: PeerConn, mut why: String) -> Held {
        loop {
            info!(peer_id = %conn.peer_id().map_or_else(|| "<none>".into(), |i| i.to_string()), transport = %conn.transport(), %why, "peer connected");
            self.metrics.peer_connections.inc();
            self.metrics
                .set_link_transport(self.site.as_str(), self.addr, Some(conn.transport()));
            self.set_why(why.clone());
            // An outbound-only site on h2: a reverse connection carries the peer's
            // streams to us; shut down gracefully when this link ends or moves.
            let reverse = CancellationToken::new();
            if self.reverse && conn.transport() == Transport::H2 {
                tokio::spawn(self.reverse_loop(reverse.clone()));
            }
            let _reverse = reverse.drop_guard();
            if let PeerConn::Quic(q) = &conn {
                tokio::spawn(crate::metrics::watch_path(
                    self.metrics.quic.clone(),
                    q.clone(),
                    crate::metrics::QuicLabels {
                        peer: peer_id(q),
                        side: "dialed",
                    },
                ));
                if let Some(f) = self.on_dialed.get() {
                    (f.quic)(q.clone());
                }
            }
            self.suspect.store(false, Ordering::Relaxed);
            self.tx.send_replace(Some(conn.clone()));
            let probing = self.mode == TransportMode::Auto && conn.transport() == Transport::H2;
            let ended = tokio::select! {
                r = closed(&conn) => Held::Closed(r),
                _ = self.stop.cancelled() => {
                    // The peer (or this address) left the plan: its connection goes too,
                    // rather than live on in handles egress holds.
                    conn.close(crate::wire::app_code::DRAINING, b"peer removed");
                    Held::Stopped
                }
                q = self.probe_quic(), if probing => {
                    self.metrics.peer_connections.dec();
                    info!("QUIC handshake completed again: new streams move to QUIC, h2 streams in flight finish there");
                    self.metrics.transport_moved(self.site.as_str(), "quic_restored");
                    conn = PeerConn::Quic(q);
                    why = "auto: QUIC works again (moved back from h2)".into();
                    continue;
                }
            };
            self.metrics.peer_connections.dec();
            self.metrics
                .set_link_transport(self.site.as_str(), self.addr, None);
            self.tx.send_replace(None);
            return ended;
        }
    }

    /// Keeps one reverse h2 connection to the peer up until `stop`, serving the streams
    /// the peer opens on it; redials with backoff when it drops.
    fn reverse_loop(&self, stop: CancellationToken) -> impl Future<Output = ()> + use<> {
        let (addr, tls, hooks, site) = (
            self.addr,
            self.cfg.h2_reverse.clone(),
            self.on_dialed.clone(),
            self.site.clone(),
        );
        async move {
            let mut backoff = BACKOFF_MIN;
            while !stop.is_cancelled() {
                let dialed = tokio::select! {
                    r = tokio::time::timeout(hbone::DIAL_TIMEOUT, hbone::connect_tls(addr, tls.clone(), hbone::ALPN_REVERSE)) => r,
                    _ = stop.cancelled() => return,
                };
                match (dialed, hooks.get()) {
                    (Ok(Ok((stream, peer))), Some(h)) => {
                        info!(%site, %addr, "reverse h2 connection up: the peer opens streams to us on it");
                        backoff = BACKOFF_MIN;
                        (h.reverse_h2)(stream, peer, addr, stop.clone()).await;
                        continue;
                    }
                    (Ok(Err(e)), _) => warn!(%site, %addr, error = %e, "reverse h2 dial failed"),
                    (Err(_), _) => warn!(%site, %addr, "reverse h2 dial timed out"),
                    (Ok(Ok(_)), None) => {
                        debug!("no ingress attached yet for the reverse connection")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Tries QUIC every `probe_every` until a handshake completes.
    async fn probe_quic(&self) -> Connection {
        loop {
            tokio::time::sleep(self.probe_every).await;
            match self.dial_quic(self.fallback_after).await {
                Ok(c) => return c,
                Err(e) => debug!(error = %e, "QUIC probe failed; staying on h2"),
            }
        }
    }

    async fn dial_quic(&self, deadline: Duration) -> Result<Connection, DialError> {
        let connecting =
            self.endpoint
                .connect_with(self.cfg.quic.clone(), self.addr, "meshfed-peer")?;
        match tokio::time::timeout(deadline, connecting).await {
            Err(_) => Err(DialError::Timeout(deadline)),
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(DialError::Handshake {
                reason: self.describe(&e),
                source: e,
            }),
        }
    }

    async fn dial_h2(&self) -> Result<hbone::Pool, DialError> {
        hbone::Pool::dial(self.addr, self.cfg.h2.clone(), self.h2_connections)
            .await
            .map_err(|e| {
                if let hbone::DialError::Tls(_) = &e {
                    self.metrics.handshake_failed("h2_tls");
                }
                DialError::H2(e)
            })
    }

    /// Turns a handshake error into the reason operators need, and counts it.
    fn describe(&self, e: &ConnectionError) -> String {
        if let ConnectionError::TransportError(te) = e
            && te.code.to_string().contains("crypto")
        {
            // Our verifier refused the server: the reject hook already counted it.
            return format!("we refused the peer's certificate: {}", te.reason);
        }
        if let Some(why) = refused_by_peer(e) {
            self.metrics.handshake_failed("refused_by_peer");
            return format!("the peer refused our certificate: {why}");
        }
        debug!(error = ?e, "dial error");
        e.to_string()
    }
}

/// How long a QUIC-only dial waits for its handshake.
const QUIC_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves when the link closes, with QUIC's reason.
async fn closed(conn: &PeerConn) -> Option<ConnectionError> {
    match conn {
        PeerConn::Quic(c) => Some(c.closed().await),
        PeerConn::H2(p) => {
            p.closed().await;
            None
        }
    }
}

/// Why a dial produced no connection.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    #[error("QUIC handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("h2: {0}")]
    H2(hbone::DialError),
    #[error("no QUIC handshake ({quic}), and h2 failed too ({h2})")]
    Both { quic: String, h2: String },
    /// `reason` says it for operators (who refused whose certificate).
    #[error("{reason}")]
    Handshake {
        reason: String,
        #[source]
        source: ConnectionError,
    },
}

/// The peer's TLS alert and reason, when it closed the connection in the handshake.
fn refused_by_peer(e: &ConnectionError) -> Option<String> {
    match e {
        ConnectionError::ConnectionClosed(cc)
            if (0x100..0x200).contains(&u64::from(cc.error_code)) =>
        {
            Some(cc.to_string())
        }
        _ => None,
    }
}

/// A QUIC link's path figures for `/debug/peers`; `None` on h2.
pub fn quic_debug(conn: &PeerConn) -> Option<serde_json::Value> {
    let PeerConn::Quic(c) = conn else {
        return None;
    };
    let s = c.stats();
    Some(serde_json::json!({
        "remote": c.remote_address().to_string(),
        "rtt_ms": s.path.rtt.as_secs_f64() * 1e3,
        "cwnd_bytes": s.path.cwnd,
        "mtu_bytes": s.path.current_mtu,
        "sent_packets": s.path.sent_packets,
        "lost_packets": s.path.lost_packets,
        "sent_bytes": s.udp_tx.bytes,
        "received_bytes": s.udp_rx.bytes,
    }))
}

/// The verified SPIFFE ID of the far end. rustls already verified the chain with our
/// SPIFFE verifier; this only reads the ID back out of the leaf.
pub fn peer_spiffe_id(conn: &Connection) -> Option<SpiffeId> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    meshfed_identity::verify::peer_id(&chain).ok()
}

fn peer_id(conn: &Connection) -> String {
    peer_spiffe_id(conn).map_or_else(|| "<none>".into(), |id| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ips_or_host_names() {
        let given: Vec<String> = [
            "10.0.0.1:15443",
            "[fd00::1]:15443",
            "GW-0.West.example.org:15443",
            "gw.example.org:0",
            "gw.example.org",
            "gw west:1",
            "",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let (ips, names, bad) = split_addresses(&given);
        assert_eq!(
            ips.into_iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["10.0.0.1:15443", "[fd00::1]:15443"]
        );
        assert_eq!(names, [("gw-0.west.example.org".to_owned(), 15443)]);
        assert_eq!(bad, ["gw.example.org:0", "gw.example.org", "gw west:1", ""]);
    }
}
