//! One long-lived QUIC connection per peer gateway, re-established with backoff when it
//! drops. Egress asks for the current connection; it never dials itself.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshfed_catalog::SiteName;
use meshfed_identity::SpiffeId;
use meshfed_lifecycle::drain::DrainWatcher;
use quinn::{Connection, ConnectionError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::Metrics;

/// First retry delay after a failed dial; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The connection to one peer, as the dialer task keeps it.
#[derive(Clone)]
pub struct PeerHandle {
    pub site: SiteName,
    pub spiffe_id: SpiffeId,
    conn: watch::Receiver<Option<Connection>>,
    kick: Arc<tokio::sync::Notify>,
}

/// Builds the QUIC client config for dialing a peer that must present this ID.
pub type ClientConfigFor = Arc<dyn Fn(&SpiffeId) -> Option<quinn::ClientConfig> + Send + Sync>;

/// All dialable peers, by site. Peers come and go as the catalog changes; each has its
/// own dialer task, stopped when the peer is removed or replaced.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<PeersInner>,
}

struct PeersInner {
    endpoint: quinn::Endpoint,
    metrics: Metrics,
    config_for: ClientConfigFor,
    drain: DrainWatcher,
    by_site: Mutex<BTreeMap<SiteName, Entry>>,
}

struct Entry {
    handle: PeerHandle,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Peers {
    /// Dialers stop when `drain` starts, and it waits for them.
    pub fn new(
        endpoint: quinn::Endpoint,
        metrics: Metrics,
        config_for: ClientConfigFor,
        drain: DrainWatcher,
    ) -> Self {
        Self {
            inner: Arc::new(PeersInner {
                endpoint,
                metrics,
                config_for,
                drain,
                by_site: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SiteName, Entry>> {
        self.inner.by_site.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a peer, or replaces it when its address or identity changed.
    pub fn upsert(&self, site: &SiteName, spiffe_id: &SpiffeId, addr: SocketAddr) {
        let mut map = self.lock();
        if let Some(e) = map.get(site)
            && e.addr == addr
            && e.handle.spiffe_id == *spiffe_id
        {
            return;
        }
        let Some(cfg) = (self.inner.config_for)(spiffe_id) else {
            warn!(%site, %spiffe_id, "no client TLS config for peer");
            return;
        };
        if let Some(old) = map.remove(site) {
            old.stop.cancel();
        }
        let (tx, rx) = watch::channel(None);
        let kick = Arc::new(tokio::sync::Notify::new());
        let stop = self.inner.drain.token().child_token();
        let handle = PeerHandle {
            site: site.clone(),
            spiffe_id: spiffe_id.clone(),
            conn: rx,
            kick: kick.clone(),
        };
        let dialer = Dialer {
            endpoint: self.inner.endpoint.clone(),
            addr,
            cfg,
            tx,
            kick,
            metrics: self.inner.metrics.clone(),
            stop: stop.clone(),
        };
        let span = info_span!("peer", site = %site, addr = %addr, expect = %spiffe_id);
        self.inner.drain.spawn(dialer.run().instrument(span));
        map.insert(site.clone(), Entry { handle, addr, stop });
    }

    /// Stops the dialers of every peer not in `keep`.
    pub fn retain(&self, keep: &BTreeSet<SiteName>) {
        self.lock().retain(|site, e| {
            let kept = keep.contains(site);
            if !kept {
                info!(%site, "peer removed");
                e.stop.cancel();
            }
            kept
        });
    }

    /// Each dialable peer with the verified ID of its live connection, if any.
    pub fn status(&self) -> Vec<(SiteName, Option<SpiffeId>)> {
        self.lock()
            .iter()
            .map(|(site, e)| {
                let id = e.handle.conn.borrow().as_ref().and_then(peer_spiffe_id);
                (site.clone(), id)
            })
            .collect()
    }

    /// Closes the live connections to gateways of `td` (its bundle was withdrawn).
    pub fn close_trust_domain(&self, td: &str) -> usize {
        let conns: Vec<Connection> = self
            .lock()
            .values()
            .filter(|e| e.handle.spiffe_id.trust_domain_str() == td)
            .filter_map(|e| e.handle.conn.borrow().clone())
            .collect();
        conns.iter().for_each(crate::tunnel::close_withdrawn);
        conns.len()
    }

    pub fn get(&self, site: &SiteName) -> Option<PeerHandle> {
        self.lock().get(site).map(|e| e.handle.clone())
    }

    /// Whether the peer has a live connection right now.
    pub fn is_connected(&self, site: &SiteName) -> bool {
        self.lock().get(site).is_some_and(|e| {
            e.handle
                .conn
                .borrow()
                .as_ref()
                .is_some_and(|c| c.close_reason().is_none())
        })
    }
}

impl PeerHandle {
    /// The live connection, waiting up to `wait` for one to be (re-)established.
    pub async fn connection(&self, wait: Duration) -> Option<Connection> {
        let mut rx = self.conn.clone();
        let res = tokio::time::timeout(wait, async {
            loop {
                if let Some(c) = rx.borrow_and_update().as_ref()
                    && c.close_reason().is_none()
                {
                    return Some(c.clone());
                }
                self.kick.notify_one();
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        res.ok().flatten()
    }

    /// Tells the dialer that `conn` looks dead (e.g. an open timed out), so it closes it and
    /// dials again now rather than after the idle timeout.
    pub fn report_dead(&self, conn: &Connection) {
        conn.close(
            quinn::VarInt::from_u32(crate::wire::app_code::UNRESPONSIVE),
            b"peer unresponsive",
        );
        self.kick.notify_one();
    }
}

struct Dialer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    cfg: quinn::ClientConfig,
    tx: watch::Sender<Option<Connection>>,
    kick: Arc<tokio::sync::Notify>,
    metrics: Metrics,
    stop: CancellationToken,
}

impl Dialer {
    async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        let mut ever_connected = false;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            match self.dial().await {
                Ok(conn) => {
                    if ever_connected {
                        self.metrics.peer_reconnects.inc();
                    }
                    ever_connected = true;
                    info!(peer_id = %peer_id(&conn), "peer connected");
                    self.metrics.peer_connections.inc();
                    tokio::spawn(crate::metrics::watch_path(
                        self.metrics.quic.clone(),
                        conn.clone(),
                        crate::metrics::QuicLabels {
                            peer: peer_id(&conn),
                            side: "dialed",
                        },
                    ));
                    self.tx.send_replace(Some(conn.clone()));
                    let reason = tokio::select! {
                        r = conn.closed() => r,
                        _ = self.stop.cancelled() => {
                            self.metrics.peer_connections.dec();
                            return;
                        }
                    };
                    self.metrics.peer_connections.dec();
                    self.tx.send_replace(None);
                    // In TLS 1.3 the client finishes first; the server's verdict on our
                    // certificate arrives as a close right after.
                    if let Some(why) = refused_by_peer(&reason) {
                        self.metrics.handshake_failed("refused_by_peer");
                        warn!(%why, retry_in = ?backoff, "the peer refused our certificate");
                    } else {
                        backoff = BACKOFF_MIN;
                        info!(%reason, "peer connection closed; redialing");
                        continue;
                    }
                }
                Err(e) => warn!(error = %e, retry_in = ?backoff, "peer dial failed"),
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

    async fn dial(&self) -> Result<Connection, DialError> {
        let connecting = self
            .endpoint
            .connect_with(self.cfg.clone(), self.addr, "meshfed-peer")?;
        match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Err(_) => Err(DialError::Timeout),
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(DialError::Handshake {
                reason: self.describe(&e),
                source: e,
            }),
        }
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

/// Why a dial produced no connection.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    #[error("handshake timed out")]
    Timeout,
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
