//! One long-lived QUIC connection per peer gateway, re-established with backoff when it
//! drops. Egress asks for the current connection; it never dials itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshfed_federation::SiteName;
use meshfed_identity::SpiffeId;
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

/// All dialable peers, by site.
#[derive(Clone, Default)]
pub struct Peers {
    by_site: BTreeMap<SiteName, PeerHandle>,
}

impl Peers {
    /// Each dialable peer with the verified ID of its live connection, if any.
    pub fn status(&self) -> Vec<(SiteName, Option<SpiffeId>)> {
        self.by_site
            .iter()
            .map(|(site, h)| {
                let id = h.conn.borrow().as_ref().and_then(peer_spiffe_id);
                (site.clone(), id)
            })
            .collect()
    }

    pub fn get(&self, site: &SiteName) -> Option<&PeerHandle> {
        self.by_site.get(site)
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

/// Spawns one dialer task per peer with an address.
pub fn spawn_dialers(
    endpoint: &quinn::Endpoint,
    peers: Vec<(SiteName, SpiffeId, SocketAddr, quinn::ClientConfig)>,
    metrics: Metrics,
    stop: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Peers {
    let mut by_site = BTreeMap::new();
    for (site, spiffe_id, addr, cfg) in peers {
        let (tx, rx) = watch::channel(None);
        let kick = Arc::new(tokio::sync::Notify::new());
        by_site.insert(
            site.clone(),
            PeerHandle {
                site: site.clone(),
                spiffe_id: spiffe_id.clone(),
                conn: rx,
                kick: kick.clone(),
            },
        );
        let dialer = Dialer {
            endpoint: endpoint.clone(),
            addr,
            cfg,
            tx,
            kick,
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        let span = info_span!("peer", site = %site, addr = %addr, expect = %spiffe_id);
        tasks.spawn(dialer.run().instrument(span));
    }
    Peers { by_site }
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

    async fn dial(&self) -> Result<Connection, String> {
        let connecting = self
            .endpoint
            .connect_with(self.cfg.clone(), self.addr, "meshfed-peer")
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Err(_) => Err("handshake timed out".into()),
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.describe(e)),
        }
    }

    /// Turns a handshake error into the reason operators need, and counts it.
    fn describe(&self, e: ConnectionError) -> String {
        if let ConnectionError::TransportError(te) = &e
            && te.code.to_string().contains("crypto")
        {
            // Our verifier refused the server: the reject hook already counted it.
            return format!("we refused the peer's certificate: {}", te.reason);
        }
        if let Some(why) = refused_by_peer(&e) {
            self.metrics.handshake_failed("refused_by_peer");
            return format!("the peer refused our certificate: {why}");
        }
        debug!(error = ?e, "dial error");
        e.to_string()
    }
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
