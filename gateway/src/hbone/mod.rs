//! The second transport: mTLS over TCP with HTTP/2 CONNECT, the HBONE shape of Istio
//! ambient's ztunnel, for networks that block or throttle UDP. It uses the same SVIDs
//! and SPIFFE verifiers as QUIC (ALPN `h2`), the same open/accept semantics and the same
//! stable refusal codes (`headers`). A gateway accepts it on the TCP port with the QUIC
//! port's number; a peer is dialed with a small pool of connections ([`POOL`] by default,
//! `transport.h2_connections`), each
//! with large windows and TCP_NODELAY, and streams spread over them.
//!
//! A UDP flow is one `connect-udp` extended CONNECT stream whose datagrams travel as
//! capsules (`capsule`, RFC 9297).

pub mod capsule;
pub mod headers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use meshfed_identity::SpiffeId;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tracing::debug;

use crate::splice::{QUIC_BATCH, TunnelRecv, TunnelSend};
use crate::wire::{Open, Refusal, Response, WireError};

/// The ALPN of the h2 transport (HBONE's).
pub const ALPN_H2: &[u8] = b"h2";
/// A reverse h2 connection: an outbound-only site dials it and is the HTTP/2 *server* on
/// it, so that the peer it dialed can open streams to the site's exports (h2 lets only
/// the client open streams).
pub const ALPN_REVERSE: &[u8] = b"meshfed-reverse-h2";
/// Connections per peer address by default: one TCP connection is one congestion window
/// and one core's worth of TLS; a few spread the streams, and one loss stalls only the
/// streams of its connection. bench/tunnel (2026-11-29, 16 streams, 2 % random loss)
/// kept 0.45-0.46 of the clean goodput with 2, 0.81 with 4 and 0.86 with 8.
pub const POOL: usize = 4;
/// Per-stream receive window: one stream fills a fast path without waiting for
/// WINDOW_UPDATEs (h2's default is 64 KiB).
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Connection-wide receive window, shared by its streams.
pub const CONN_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest DATA frame we accept: fewer frames per byte (h2's default is 16 KiB).
pub const MAX_FRAME: u32 = 256 * 1024;
/// Bytes h2 buffers per stream before `send` waits (beyond the window).
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Header block a peer may send (an open is well under 3 KiB).
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How long a TCP connect plus the TLS and h2 handshakes may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// An h2 stream's sending half, as the splice drives it.
pub struct H2Send(pub h2::SendStream<Bytes>);

/// An h2 stream's receiving half; received bytes are given back to the flow-control
/// window once the next read is asked for (after they were written on).
pub struct H2Recv {
    inner: h2::RecvStream,
    unreleased: usize,
}

impl H2Recv {
    pub fn new(inner: h2::RecvStream) -> Self {
        Self {
            inner,
            unreleased: 0,
        }
    }

    /// The stream, with what was read given back to the flow-control window.
    pub fn into_inner(mut self) -> h2::RecvStream {
        let _ = self
            .inner
            .flow_control()
            .release_capacity(std::mem::take(&mut self.unreleased));
        self.inner
    }
}

impl TunnelSend for H2Send {
    async fn send(&mut self, mut chunk: Bytes) -> Result<(), ()> {
        while !chunk.is_empty() {
            self.0.reserve_capacity(chunk.len());
            let room = match std::future::poll_fn(|cx| self.0.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                _ => return Err(()),
            };
            if room == 0 {
                continue;
            }
            let part = chunk.split_to(room.min(chunk.len()));
            self.0.send_data(part, false).map_err(|_| ())?;
        }
        Ok(())
    }
    fn finish(&mut self) {
        let _ = self.0.send_data(Bytes::new(), true);
    }
    async fn delivered(&mut self) {
        // h2 flushes what is buffered while the connection runs; nothing to wait for.
    }
    fn reset(&mut self) {
        self.0.send_reset(h2::Reason::CANCEL);
    }
}

impl TunnelRecv for H2Recv {
    async fn recv(&mut self, out: &mut [Bytes; QUIC_BATCH]) -> Result<usize, &'static str> {
        loop {
            if self.unreleased > 0 {
                let _ = self
                    .inner
                    .flow_control()
                    .release_capacity(std::mem::take(&mut self.unreleased));
            }
            match self.inner.data().await {
                None => return Ok(0),
                // A zero-length DATA frame is not the end: read on.
                Some(Ok(b)) if b.is_empty() => continue,
                Some(Ok(b)) => {
                    self.unreleased = b.len();
                    out[0] = b;
                    return Ok(1);
                }
                Some(Err(e)) if e.is_reset() => return Err("tunnel_reset"),
                Some(Err(_)) => return Err("tunnel_lost"),
            }
        }
    }
    fn stop(&mut self) {
        // Dropping the receiver after the reset our send half sent is enough.
    }
}

/// A pool of h2 connections to one peer address, used as one link. A member that ends
/// while others live is dialed again in the background (backing off while the peer
/// refuses), so a pool that lost connections to a middlebox's idle timeout or a reset
/// gets its spread back; the pool ends when its last member ends, and the link is then
/// dialed anew.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

type Member = (h2::client::SendRequest<Bytes>, AbortHandle);

struct PoolInner {
    /// One slot per connection; `None` while it is being dialed again.
    slots: Vec<std::sync::Mutex<Option<Member>>>,
    live: AtomicUsize,
    /// Set by `close`: no member is dialed again.
    closed: std::sync::atomic::AtomicBool,
    gone: tokio::sync::Notify,
    next: AtomicUsize,
    peer: SpiffeId,
    remote: SocketAddr,
    id: usize,
    /// How members are dialed again; `None` for a reverse connection (its dialer, the
    /// other side, dials it anew).
    redial: Option<Arc<rustls::ClientConfig>>,
}

/// The first wait before a member is dialed again, doubled per failure up to the max.
const REDIAL_MIN: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(5);

/// Tells pools apart (the `stable_id` of a link), never equal to a QUIC connection's
/// (which are small counters): the high bit is set.
static NEXT_POOL: AtomicUsize = AtomicUsize::new(0);
const POOL_ID_BIT: usize = 1 << (usize::BITS - 1);

/// Why a dial produced no h2 connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("TCP connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("the peer did not choose h2 (ALPN {0:?})")]
    Alpn(Option<String>),
    #[error("no verified peer identity")]
    NoIdentity,
    #[error("h2 handshake: {0}")]
    H2(h2::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl PoolInner {
    fn new(
        n: usize,
        peer: SpiffeId,
        remote: SocketAddr,
        redial: Option<Arc<rustls::ClientConfig>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            slots: (0..n).map(|_| std::sync::Mutex::new(None)).collect(),
            live: AtomicUsize::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            gone: tokio::sync::Notify::new(),
            next: AtomicUsize::new(0),
            peer,
            remote,
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed) | POOL_ID_BIT,
            redial,
        })
    }

    fn slot(&self, i: usize) -> std::sync::MutexGuard<'_, Option<Member>> {
        self.slots[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a connection in slot `i` and drives it; when it ends, the slot is dialed
    /// again if the pool still lives. False (and the connection dropped) when the pool
    /// has ended meanwhile: a dead pool is never revived.
    fn install<T>(
        self: &Arc<Self>,
        i: usize,
        send: h2::client::SendRequest<Bytes>,
        conn: h2::client::Connection<T, Bytes>,
        first: bool,
    ) -> bool
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut slot = self.slot(i);
        let joined = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (first || (n > 0 && !self.closed.load(Ordering::Acquire))).then_some(n + 1)
            });
        if joined.is_err() {
            return false;
        }
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "h2 connection ended");
            }
            if let Some(inner) = weak.upgrade() {
                inner.slot(i).take();
                let left = inner.live.fetch_sub(1, Ordering::AcqRel) - 1;
                inner.gone.notify_waiters();
                if left > 0 && !inner.closed.load(Ordering::Acquire) && inner.redial.is_some() {
                    tokio::spawn(Self::redial(weak, i));
                }
            }
        });
        *slot = Some((send, task.abort_handle()));
        true
    }

    /// Dials slot `i` again until it is up or the pool has ended.
    async fn redial(weak: std::sync::Weak<Self>, i: usize) {
        let mut backoff = REDIAL_MIN;
        loop {
            tokio::time::sleep(backoff).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.live.load(Ordering::Acquire) == 0 || inner.closed.load(Ordering::Acquire) {
                return;
            }
            let (Some(tls), remote) = (inner.redial.clone(), inner.remote) else {
                return;
            };
            drop(inner);
            let dialed = tokio::time::timeout(DIAL_TIMEOUT, dial_one(remote, tls)).await;
            let Some(inner) = weak.upgrade() else { return };
            match dialed {
                Ok(Ok((send, conn, peer))) if peer == inner.peer => {
                    if inner.install(i, send, conn, false) {
                        debug!(slot = i, "h2 pool member dialed again");
                    }
                    return;
                }
                Ok(Ok((_, _, peer))) => {
                    debug!(%peer, expected = %inner.peer, "h2 pool member answered as another peer")
                }
                Ok(Err(e)) => debug!(error = %e, "h2 pool member dial failed"),
                Err(_) => debug!("h2 pool member dial timed out"),
            }
            backoff = (backoff * 2).min(REDIAL_MAX);
        }
    }
}

impl Pool {
    /// Dials `n` connections to `addr`; the pool is up when at least one is (the
    /// first error otherwise). Members that failed are dialed again in the background.
    pub async fn dial(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        n: usize,
    ) -> Result<Self, DialError> {
        let n = n.max(1);
        let dials = (0..n).map(|_| {
            let tls = tls.clone();
            async move {
                tokio::time::timeout(DIAL_TIMEOUT, dial_one(addr, tls))
                    .await
                    .map_err(|_| DialError::Timeout(DIAL_TIMEOUT))?
            }
        });
        let mut up = Vec::new();
        let mut first_err = None;
        for r in futures::future::join_all(dials).await {
            match r {
                Ok(d) => up.push(d),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let Some(peer) = up.first().map(|(_, _, p)| p.clone()) else {
            return Err(first_err.unwrap_or(DialError::NoIdentity));
        };
        let inner = PoolInner::new(n, peer, addr, Some(tls));
        let mut filled = 0;
        for (send, conn, id) in up {
            // One TLS config verifies one expected ID, so they agree; a member that
            // does not is not used.
            if id == inner.peer && inner.install(filled, send, conn, true) {
                filled += 1;
            }
        }
        for i in filled..n {
            tokio::spawn(PoolInner::redial(Arc::downgrade(&inner), i));
        }
        Ok(Self { inner })
    }

    /// A one-connection pool over an established h2 client connection (the accepting
    /// side of a reverse connection); its driver runs as a task.
    pub fn from_connection<T>(
        send: h2::client::SendRequest<Bytes>,
        conn: h2::client::Connection<T, Bytes>,
        peer: SpiffeId,
        remote: SocketAddr,
    ) -> Self
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let inner = PoolInner::new(1, peer, remote, None);
        inner.install(0, send, conn, true);
        Self { inner }
    }

    /// Connections the pool keeps.
    pub fn members(&self) -> usize {
        self.inner.slots.len()
    }

    /// Connections up now (the rest are being dialed again).
    pub fn members_live(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire) > 0
    }

    pub fn stable_id(&self) -> usize {
        self.inner.id
    }

    pub fn peer_id(&self) -> &SpiffeId {
        &self.inner.peer
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote
    }

    /// Resolves when every connection of the pool has ended.
    pub async fn closed(&self) {
        loop {
            let notified = self.inner.gone.notified();
            if !self.is_live() {
                return;
            }
            notified.await;
        }
    }

    /// Cuts every connection now (a dead or withdrawn peer); none is dialed again.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        for i in 0..self.inner.slots.len() {
            if let Some((_, task)) = self.inner.slot(i).as_ref() {
                task.abort();
            }
        }
    }

    /// Sends the open request on the next connection in turn and waits up to `answer`
    /// for the answer. `Err`: the pool is unusable; `Ok(Err)`: the far side refused.
    #[allow(clippy::type_complexity)]
    pub async fn open(
        &self,
        open: &Open,
        answer: Duration,
    ) -> Result<Result<(H2Send, H2Recv), (Refusal, String)>, String> {
        let n = self.inner.slots.len();
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let work = async {
            let mut last = String::from("no live h2 connection");
            // The next member in turn; one that is gone (or being dialed again) is
            // skipped.
            for i in 0..n {
                let Some(send) = self
                    .inner
                    .slot((start + i) % n)
                    .as_ref()
                    .map(|m| m.0.clone())
                else {
                    continue;
                };
                let mut send = match send.ready().await {
                    Ok(s) => s,
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                };
                if open.flow.is_some() && !send.is_extended_connect_protocol_enabled() {
                    return Ok(Err((
                        Refusal::PeerUnavailable,
                        "the peer does not accept connect-udp on h2".into(),
                    )));
                }
                // Built for each attempt: send_request takes it, and the first attempt
                // is nearly always the only one.
                let req = match headers::request(open) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err((Refusal::MalformedHeader, e.to_string()))),
                };
                let (resp, stream) = match send.send_request(req, false) {
                    Ok(r) => r,
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                };
                // A connection that ended under the request (a reset the driver had
                // not yet seen) never delivered it to an endpoint: the next member gets it.
                let resp = match resp.await {
                    Ok(r) => r,
                    Err(e)
                        if e.is_io()
                            || e.is_go_away()
                            || e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) =>
                    {
                        last = e.to_string();
                        continue;
                    }
                    Err(e) => return Err(e.to_string()),
                };
                let (parts, body) = resp.into_parts();
                return Ok(match headers::decode_response(&parts) {
                    Ok(Response::Accept) if !headers::accepted_as_asked(open, &parts) => {
                        // Dropping the stream resets it: its endpoint connection closes.
                        Err((
                            Refusal::UnsupportedVersion,
                            "the peer's gateway does not connect by a subset's endpoint labels (an older version)".into(),
                        ))
                    }
                    Ok(Response::Accept) => Ok((H2Send(stream), H2Recv::new(body))),
                    Ok(Response::Refuse { reason, message }) => Err((reason, message)),
                    Err(e) => Err((
                        Refusal::MalformedHeader,
                        format!("bad response from peer: {e}"),
                    )),
                });
            }
            Err(last)
        };
        tokio::time::timeout(answer, work)
            .await
            .map_err(|_| format!("peer did not answer the open request within {answer:?}"))?
    }
}

type Dialed = (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>,
    SpiffeId,
);

async fn dial_one(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<Dialed, DialError> {
    let (tls, peer) = connect_tls(addr, tls, ALPN_H2).await?;
    let (send, conn) = client_builder()
        .handshake(tls)
        .await
        .map_err(DialError::H2)?;
    Ok((send, conn, peer))
}

/// TCP and mTLS to `addr`, which must choose `alpn`; the peer's verified ID.
pub async fn connect_tls(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    alpn: &[u8],
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, SpiffeId), DialError> {
    let tcp = TcpStream::connect(addr).await.map_err(DialError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("meshfed-peer")
        .expect("a valid DNS name")
        .to_owned();
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(DialError::Tls)?;
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(alpn) {
        return Err(DialError::Alpn(
            session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
        ));
    }
    let peer = session
        .peer_certificates()
        .and_then(|c| meshfed_identity::verify::peer_id(c).ok())
        .ok_or(DialError::NoIdentity)?;
    Ok((tls, peer))
}

/// The h2 client settings (a dialed link, or the accepting side of a reverse one).
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false);
    b
}

/// The h2 server settings for an accepted, authenticated connection.
pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(max_streams)
        // connect-udp (RFC 8441 extended CONNECT) for UDP flows.
        .enable_connect_protocol()
        // A peer that resets streams in a loop (CVE-2023-44487) is cut off.
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(1024));
    b
}

/// `WireError` for a request the h2 layer refused before we saw it.
pub fn malformed(e: &h2::Error) -> WireError {
    WireError::Field {
        field: "request",
        reason: e.to_string(),
    }
}
