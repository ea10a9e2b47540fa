//! UDP across sites, as QUIC datagrams (RFC 9221) on the peer connection, or on an h2
//! link as capsules on the flow's own `connect-udp` stream (`run_h2_flow` here, and
//! `Ingress::serve_h2_udp`; the capsule format is `hbone::capsule`).
//!
//! A flow is one client address and port at an egress listener. Its first datagram
//! opens a stream to a site that exports the port (the same open request, failover and
//! typed refusals as TCP, with a flow ID); the stream then stays open, carrying nothing,
//! for as long as the flow lives, so either side ends the flow by closing it. Datagrams
//! travel as `flow:u32 | payload` DATAGRAM frames: requests on the egress's dialed
//! connection, responses on the same connection back.
//!
//! - The egress queues a new flow's first datagrams (at most [`OPEN_QUEUE`], and
//!   [`OPEN_QUEUE_BYTES`]) until the far side accepts; more is a counted drop
//!   (`queue_full`).
//! - The ingress gives each flow its own connected UDP socket toward one endpoint, so
//!   responses map back to the flow and an ICMP unreachable ends it.
//! - A flow with no datagram either way for the idle timeout is closed on both sides.
//! - A datagram larger than what one QUIC datagram on the path can carry (about 1.1 KiB
//!   before path MTU discovery, about 1.4 KiB on a 1500-byte MTU) is a counted drop
//!   (`oversize`), never fragmented or truncated. So is one that finds the connection's
//!   datagram buffer full (`tunnel_full`): quinn would otherwise drop older ones unseen.
//!
//! - The ingress keeps at most [`FlowLimits`] flows per peer identity (across all its
//!   QUIC and h2 connections) and in all, each
//!   holding one socket; beyond, an open is refused with `flow_limit`. The total is a
//!   quarter of the open-file limit, so UDP flows can never take the descriptors that TCP
//!   streams and the gateway itself need.
//!
//! On h2 a datagram is never oversize (a capsule carries up to 64 KiB) and arrives in
//! order; an egress flow queues at most `CAPSULE_QUEUE` (256) datagrams for its stream (`tunnel_full`
//! beyond), and the ingress counts its h2 flows against the same budgets.
//!
//! Drop reasons are stable labels of `meshfed_gateway_udp_drops`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendDatagramError, SendStream, VarInt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::egress::{Egress, Opened, Stream};
use crate::metrics::{Metrics, UdpCounters};
use crate::wire::{self, DATAGRAM_HEADER_LEN, Refusal, app_code};

/// Datagrams, and bytes, a new flow may queue while its open request is answered (one
/// round trip to the far site): a burst of this many is carried whole.
pub const OPEN_QUEUE: usize = 128;
pub const OPEN_QUEUE_BYTES: usize = 128 * 1024;
/// Flows one import listener keeps at once; beyond it new clients' datagrams are dropped
/// (`too_many_flows`), so spoofed sources cannot grow the table without bound.
pub const MAX_FLOWS: usize = 16 * 1024;
/// After a refusal, a client's datagrams are dropped (`refused`) for this long instead of
/// each one sending a new open request.
pub const REFUSED_HOLD: Duration = Duration::from_secs(1);
/// Receive buffer: large enough for a UDP payload of any size, so an oversized datagram
/// is seen whole and counted rather than truncated.
const RECV_BUF: usize = 64 * 1024;
/// Datagrams read without yielding after one that woke a socket's task.
const BATCH: usize = 32;
/// Kernel socket buffers of import listeners and endpoint sockets.
const SOCKET_BUF: usize = 4 * 1024 * 1024;

/// How many UDP flows (one socket each) the ingress keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLimits {
    /// For one peer identity, across all its connections.
    pub per_peer: usize,
    /// On all of them.
    pub total: usize,
}

impl FlowLimits {
    /// From the process's open-file limit: a quarter of it for UDP flows (at least 16, at
    /// most 16 384), half of that for any one peer. Pure.
    pub fn for_nofile(nofile: u64) -> Self {
        let total = usize::try_from(nofile / 4)
            .unwrap_or(usize::MAX)
            .clamp(16, 16 * 1024);
        Self {
            per_peer: (total / 2).max(8),
            total,
        }
    }
}

/// The ingress's flows in all, against [`FlowLimits::total`].
#[derive(Debug)]
pub struct FlowBudget {
    limits: FlowLimits,
    open: AtomicUsize,
}

/// One flow's share of the budget, given back when the flow's last handle drops.
#[derive(Debug)]
pub(crate) struct FlowPermit(Arc<FlowBudget>);

impl FlowBudget {
    pub fn new(limits: FlowLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: AtomicUsize::new(0),
        })
    }

    pub fn limits(&self) -> FlowLimits {
        self.limits
    }

    pub(crate) fn take(self: &Arc<Self>) -> Option<FlowPermit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limits.total).then_some(n + 1)
            })
            .ok()
            .map(|_| FlowPermit(self.clone()))
    }
}

impl Drop for FlowPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Milliseconds on a process-wide monotonic clock; flows keep their last activity in an
/// atomic so both directions can touch it without a lock.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Whether a flow last active at `last_ms` has been idle for `timeout` at `now_ms`.
pub fn is_idle(last_ms: u64, now_ms: u64, timeout: Duration) -> bool {
    now_ms.saturating_sub(last_ms) >= timeout.as_millis() as u64
}

/// How often flows are checked for idleness: often enough that a flow outlives its
/// timeout by at most a quarter of it.
pub fn idle_check_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// Whether a datagram with `len` payload bytes would make quinn evict older queued
/// datagrams (it makes room silently): such a datagram is dropped and counted instead.
/// Too large and unsupported are quinn's own errors, which cost no extra lock here.
pub fn tunnel_full(len: usize, buffer_space: usize) -> bool {
    len + DATAGRAM_HEADER_LEN > buffer_space
}

/// Sends one flow datagram on `conn`, counting it or its drop. `Err`: the connection is
/// gone and the flow with it.
fn forward(conn: &Connection, flow: u32, payload: &[u8], c: &UdpCounters) -> Result<(), ()> {
    if tunnel_full(payload.len(), conn.datagram_send_buffer_space()) {
        c.dropped("tunnel_full", 1);
        return Ok(());
    }
    match conn.send_datagram(wire::encode_datagram(flow, payload)) {
        Ok(()) => {
            c.sent(payload.len());
            Ok(())
        }
        Err(SendDatagramError::TooLarge) => {
            c.dropped("oversize", 1);
            Ok(())
        }
        Err(SendDatagramError::UnsupportedByPeer | SendDatagramError::Disabled) => {
            c.dropped("datagrams_unsupported", 1);
            Ok(())
        }
        Err(SendDatagramError::ConnectionLost(_)) => {
            c.dropped("peer_unavailable", 1);
            Err(())
        }
    }
}

/// A UDP socket with large kernel buffers, bound to `addr`.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUF);
    let _ = s.set_send_buffer_size(SOCKET_BUF);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

// === ingress ===

/// The UDP flows of one accepted peer connection, by the flow ID its egress chose.
pub struct IngressFlows {
    conn: Connection,
    flows: Mutex<HashMap<u32, IngressFlow>>,
    reader: OnceLock<()>,
    counters: UdpCounters,
    /// The gateway's flows, and this peer's (across its connections).
    budget: Arc<FlowBudget>,
    peer_budget: Arc<FlowBudget>,
}

/// What the datagram reader clones per datagram: keep it to the socket and the clock.
#[derive(Clone)]
struct IngressFlow {
    socket: Arc<UdpSocket>,
    last: Arc<AtomicU64>,
}

impl IngressFlows {
    /// `budget` is the gateway's; `peer_budget` the peer's across all its connections
    /// ([`crate::admission::PeerLinks::flows`]).
    pub fn new(
        conn: Connection,
        metrics: &Metrics,
        budget: Arc<FlowBudget>,
        peer_budget: Arc<FlowBudget>,
    ) -> Arc<Self> {
        Arc::new(Self {
            conn,
            flows: Mutex::new(HashMap::new()),
            reader: OnceLock::new(),
            counters: metrics.udp("ingress"),
            peer_budget,
            budget,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, IngressFlow>> {
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects a socket for flow `id` toward `endpoint` and registers it. The caller
    /// answers the open request with the error as a refusal.
    pub async fn open(
        &self,
        id: u32,
        endpoint: SocketAddr,
    ) -> Result<IngressFlowHandle, (Refusal, String)> {
        let failed = |e: String| (Refusal::EndpointConnectFailed, e);
        // Limits before the socket: a refused flow costs no descriptor. Taken atomically,
        // so concurrent opens cannot both pass the last slot.
        let per_peer = self.peer_budget.take().ok_or_else(|| {
            (
                Refusal::FlowLimit,
                format!(
                    "this peer already has {} UDP flows open (the limit per peer)",
                    self.budget.limits.per_peer
                ),
            )
        })?;
        let permit = self.budget.take().ok_or_else(|| {
            (
                Refusal::FlowLimit,
                format!(
                    "the gateway already has {} UDP flows open (its limit, a quarter of its open-file limit)",
                    self.budget.limits.total
                ),
            )
        })?;
        let unspecified: SocketAddr = if endpoint.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = bind_udp(unspecified).map_err(|e| failed(format!("UDP socket: {e}")))?;
        socket
            .connect(endpoint)
            .await
            .map_err(|e| failed(format!("UDP connect to {endpoint}: {e}")))?;
        let flow = IngressFlow {
            socket: Arc::new(socket),
            last: Arc::new(AtomicU64::new(now_ms())),
        };
        {
            let mut map = self.lock();
            if map.contains_key(&id) {
                return Err((
                    Refusal::MalformedHeader,
                    format!("flow {id} is already open on this connection"),
                ));
            }
            map.insert(id, flow.clone());
        }
        Ok(IngressFlowHandle {
            id,
            flow,
            _permits: (per_peer, permit),
        })
    }

    /// Starts the connection's datagram reader on the first flow.
    fn ensure_reader(self: &Arc<Self>) {
        if self.reader.set(()).is_ok() {
            let this = self.clone();
            tokio::spawn(this.read_loop().instrument(info_span!("udp-ingress")));
        }
    }

    /// Requests from the peer's egress: each to its flow's endpoint socket.
    async fn read_loop(self: Arc<Self>) {
        while let Ok(d) = self.conn.read_datagram().await {
            let Ok((id, payload)) = wire::decode_datagram(&d) else {
                self.counters.dropped("malformed", 1);
                continue;
            };
            let Some(flow) = self.lock().get(&id).cloned() else {
                self.counters.dropped("unknown_flow", 1);
                continue;
            };
            match flow.socket.try_send(payload) {
                Ok(_) => {
                    self.counters.received(payload.len());
                    flow.last.store(now_ms(), Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.counters.dropped("socket_full", 1);
                }
                Err(e) => {
                    debug!(flow = id, error = %e, "endpoint send failed");
                    self.counters.dropped("endpoint_unreachable", 1);
                }
            }
        }
    }

    /// Runs an accepted flow until the egress closes it, it idles out, its endpoint fails
    /// or `stop`: responses from the endpoint go back as datagrams.
    pub async fn run(
        self: Arc<Self>,
        handle: IngressFlowHandle,
        mut send: SendStream,
        mut recv: RecvStream,
        idle_timeout: Duration,
        stop: CancellationToken,
    ) {
        self.ensure_reader();
        // The handle (and its share of the flow budget) lives as long as this flow.
        let IngressFlowHandle { id, flow, _permits } = handle;
        let mut buf = vec![0u8; RECV_BUF];
        let mut tick = tokio::time::interval(idle_check_interval(idle_timeout));
        let mut one = [0u8; 1];
        let code = loop {
            tokio::select! {
                r = flow.socket.recv(&mut buf) => match r {
                    Ok(n) => {
                        flow.last.store(now_ms(), Ordering::Relaxed);
                        let mut lost = forward(&self.conn, id, &buf[..n], &self.counters).is_err();
                        // Drain what else is queued (see UdpEgress::serve).
                        for _ in 0..BATCH {
                            if lost {
                                break;
                            }
                            let Ok(n) = flow.socket.try_recv(&mut buf) else {
                                break;
                            };
                            lost = forward(&self.conn, id, &buf[..n], &self.counters).is_err();
                        }
                        if lost {
                            break None;
                        }
                    }
                    Err(e) => {
                        // An ICMP unreachable: the next datagram opens a new flow, which
                        // may pick another endpoint.
                        debug!(flow = id, error = %e, "endpoint socket failed; ending the flow");
                        self.counters.dropped("endpoint_unreachable", 1);
                        break Some(app_code::FLOW_ENDPOINT_ERROR);
                    }
                },
                _ = recv.read(&mut one) => break None, // closed by the egress (or bytes: a protocol error)
                _ = tick.tick() => if is_idle(flow.last.load(Ordering::Relaxed), now_ms(), idle_timeout) {
                    break Some(app_code::FLOW_IDLE);
                },
                _ = stop.cancelled() => break Some(app_code::DRAINING),
            }
        };
        self.lock().remove(&id);
        if let Some(code) = code {
            let _ = send.reset(VarInt::from_u32(code));
            let _ = recv.stop(VarInt::from_u32(code));
        } else {
            let _ = send.finish();
        }
        debug!(flow = id, ?code, "UDP flow ended");
    }
}

/// A flow registered by [`IngressFlows::open`], not yet running.
pub struct IngressFlowHandle {
    id: u32,
    flow: IngressFlow,
    /// The flow's share of the per-peer and the gateway's budget, given back on drop.
    _permits: (FlowPermit, FlowPermit),
}

impl IngressFlowHandle {
    /// Unregisters a flow that will not run (its accept could not be sent).
    pub fn abandon(self, flows: &IngressFlows) {
        flows.lock().remove(&self.id);
    }
}

// === egress ===

/// Where the responses of every egress flow of this gateway go, by flow ID. IDs are
/// unique per gateway, so one table serves all connections; a response is only taken
/// from the connection its flow was opened on.
pub struct Dispatch {
    next: AtomicU32,
    routes: Mutex<HashMap<u32, Route>>,
    readers: Mutex<HashSet<usize>>,
    counters: UdpCounters,
}

#[derive(Clone)]
struct Route {
    conn: usize,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    last: Arc<AtomicU64>,
}

impl Dispatch {
    pub fn new(metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self {
            next: AtomicU32::new(1),
            routes: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashSet::new()),
            counters: metrics.udp("egress"),
        })
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> u32 {
        loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    fn add(self: &Arc<Self>, id: u32, conn: &Connection, route: Route) {
        self.routes().insert(id, route);
        let fresh = self
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn.stable_id());
        if fresh {
            let (this, conn) = (self.clone(), conn.clone());
            tokio::spawn(
                async move {
                    this.read_loop(&conn).await;
                    this.readers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&conn.stable_id());
                }
                .instrument(info_span!("udp-egress")),
            );
        }
    }

    fn remove(&self, id: u32) {
        self.routes().remove(&id);
    }

    /// Responses from the far side: each to its flow's client.
    async fn read_loop(&self, conn: &Connection) {
        let me = conn.stable_id();
        while let Ok(d) = conn.read_datagram().await {
            let Ok((id, payload)) = wire::decode_datagram(&d) else {
                self.counters.dropped("malformed", 1);
                continue;
            };
            let route = self.routes().get(&id).filter(|r| r.conn == me).cloned();
            let Some(r) = route else {
                self.counters.dropped("unknown_flow", 1);
                continue;
            };
            match r.socket.try_send_to(payload, r.client) {
                Ok(_) => {
                    self.counters.received(payload.len());
                    r.last.store(now_ms(), Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.counters.dropped("socket_full", 1);
                }
                Err(e) => {
                    debug!(client = %r.client, error = %e, "send to client failed");
                    self.counters.dropped("client_unreachable", 1);
                }
            }
        }
    }
}

/// One imported UDP service port: its listener's clients become flows to `egress`'s
/// backends, in order.
pub struct UdpEgress {
    pub egress: Arc<Egress>,
    pub idle_timeout: Duration,
    pub dispatch: Arc<Dispatch>,
}

/// Where an open flow's datagrams go: QUIC datagrams on the flow's connection, or
/// capsules on its h2 stream (through the flow's task).
#[derive(Clone)]
enum Sink {
    Quic(Connection),
    Capsules(mpsc::Sender<Bytes>),
}

/// Datagrams queued for one h2 flow's stream before they are dropped (`tunnel_full`).
const CAPSULE_QUEUE: usize = 256;

/// Sends one flow datagram into `sink`, counting it or its drop. `Err`: the flow's
/// connection or stream is gone.
fn forward_to(sink: &Sink, flow: u32, payload: &[u8], c: &UdpCounters) -> Result<(), ()> {
    match sink {
        Sink::Quic(conn) => forward(conn, flow, payload, c),
        Sink::Capsules(tx) => match tx.try_send(Bytes::copy_from_slice(payload)) {
            Ok(()) => {
                c.sent(payload.len());
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                c.dropped("tunnel_full", 1);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                c.dropped("peer_unavailable", 1);
                Err(())
            }
        },
    }
}

enum FlowState {
    /// Waiting for the far side's answer, with the datagrams that came meanwhile.
    Opening(Vec<Bytes>),
    Open(Sink),
    /// Refused; new datagrams are dropped until then.
    Refused(Instant),
}

struct Flow {
    id: u32,
    state: FlowState,
    last: Arc<AtomicU64>,
    stop: CancellationToken,
}

enum Event {
    Opened {
        client: SocketAddr,
        id: u32,
        sink: Sink,
    },
    Ended {
        client: SocketAddr,
        id: u32,
        refused: bool,
    },
}

impl UdpEgress {
    pub async fn serve(self, socket: UdpSocket, stop: CancellationToken) {
        let socket = Arc::new(socket);
        let this = Arc::new(self);
        let counters = this.dispatch.counters.clone();
        let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut buf = vec![0u8; RECV_BUF];
        let mut tick = tokio::time::interval(idle_check_interval(this.idle_timeout));
        loop {
            tokio::select! {
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, client)) => {
                        this.on_datagram(&buf[..n], client, &mut flows, &socket, &tx, &stop, &counters);
                        // Drain what else is queued before yielding: the connection driver
                        // then packs several datagrams per QUIC packet and GSO batch.
                        for _ in 0..BATCH {
                            let Ok((n, client)) = socket.try_recv_from(&mut buf) else {
                                break;
                            };
                            this.on_datagram(&buf[..n], client, &mut flows, &socket, &tx, &stop, &counters);
                        }
                    }
                    // ICMP errors from earlier sends to clients surface here; not fatal.
                    Err(e) => debug!(error = %e, "UDP receive error"),
                },
                Some(ev) = rx.recv() => on_event(ev, &mut flows, &counters),
                _ = tick.tick() => {
                    let now = now_ms();
                    let at = Instant::now();
                    flows.retain(|_, f| match &f.state {
                        FlowState::Open(_) if is_idle(f.last.load(Ordering::Relaxed), now, this.idle_timeout) => {
                            f.stop.cancel();
                            false
                        }
                        FlowState::Refused(until) => *until > at,
                        _ => true,
                    });
                }
                _ = stop.cancelled() => break,
            }
        }
        for f in flows.values() {
            f.stop.cancel();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_datagram(
        self: &Arc<Self>,
        payload: &[u8],
        client: SocketAddr,
        flows: &mut HashMap<SocketAddr, Flow>,
        socket: &Arc<UdpSocket>,
        events: &mpsc::UnboundedSender<Event>,
        stop: &CancellationToken,
        c: &UdpCounters,
    ) {
        if let Some(f) = flows.get_mut(&client) {
            match &mut f.state {
                FlowState::Open(sink) => {
                    f.last.store(now_ms(), Ordering::Relaxed);
                    if forward_to(sink, f.id, payload, c).is_err() {
                        // The connection died: the next datagram opens a new flow.
                        f.stop.cancel();
                        flows.remove(&client);
                    }
                    return;
                }
                FlowState::Opening(q) => {
                    let queued: usize = q.iter().map(Bytes::len).sum();
                    if q.len() < OPEN_QUEUE && queued + payload.len() <= OPEN_QUEUE_BYTES {
                        q.push(Bytes::copy_from_slice(payload));
                    } else {
                        c.dropped("queue_full", 1);
                    }
                    return;
                }
                FlowState::Refused(until) if *until > Instant::now() => {
                    c.dropped("refused", 1);
                    return;
                }
                FlowState::Refused(_) => {}
            }
        } else if flows.len() >= MAX_FLOWS {
            c.dropped("too_many_flows", 1);
            return;
        }
        let id = self.dispatch.next_id();
        let flow = Flow {
            id,
            state: FlowState::Opening(vec![Bytes::copy_from_slice(payload)]),
            last: Arc::new(AtomicU64::new(now_ms())),
            stop: stop.child_token(),
        };
        let run = run_flow(
            self.clone(),
            socket.clone(),
            client,
            id,
            flow.last.clone(),
            flow.stop.clone(),
            events.clone(),
        );
        tokio::spawn(run.instrument(info_span!("udp-flow", %client, id)));
        flows.insert(client, flow);
    }
}

fn on_event(ev: Event, flows: &mut HashMap<SocketAddr, Flow>, c: &UdpCounters) {
    match ev {
        Event::Opened { client, id, sink } => {
            let Some(f) = flows.get_mut(&client).filter(|f| f.id == id) else {
                return; // expired meanwhile; its task was stopped
            };
            if let FlowState::Opening(q) =
                std::mem::replace(&mut f.state, FlowState::Open(sink.clone()))
            {
                for d in q {
                    if forward_to(&sink, id, &d, c).is_err() {
                        break;
                    }
                }
            }
        }
        Event::Ended {
            client,
            id,
            refused,
        } => {
            let Some(f) = flows.get_mut(&client).filter(|f| f.id == id) else {
                return;
            };
            if let FlowState::Opening(q) = &f.state
                && !q.is_empty()
            {
                let reason = if refused {
                    "refused"
                } else {
                    "peer_unavailable"
                };
                c.dropped(reason, q.len() as u64);
            }
            if refused {
                f.state = FlowState::Refused(Instant::now() + REFUSED_HOLD);
            } else {
                flows.remove(&client);
            }
        }
    }
}

/// The rest of a flow opened on an h2 link: datagrams from the client go out as
/// capsules on its stream, capsules from the far side go to the client, until either
/// side ends it or `stop`.
#[allow(clippy::too_many_arguments)]
async fn run_h2_flow(
    this: &Arc<UdpEgress>,
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    id: u32,
    last: &Arc<AtomicU64>,
    stop: &CancellationToken,
    events: &mpsc::UnboundedSender<Event>,
    site: meshfed_catalog::SiteName,
    mut send: crate::hbone::H2Send,
    mut recv: crate::hbone::H2Recv,
) {
    use crate::hbone::capsule;
    use crate::splice::{QUIC_BATCH, TunnelRecv, TunnelSend};
    let counters = this.dispatch.counters.clone();
    let (tx, mut rx) = mpsc::channel::<Bytes>(CAPSULE_QUEUE);
    let _ = events.send(Event::Opened {
        client,
        id,
        sink: Sink::Capsules(tx),
    });
    let mut dec = capsule::Decoder::default();
    let mut chunks: [Bytes; QUIC_BATCH] = Default::default();
    let why = 'flow: loop {
        tokio::select! {
            _ = stop.cancelled() => {
                send.reset();
                break "idle or stopped";
            }
            d = rx.recv() => match d {
                Some(p) => {
                    if send.send(capsule::encode(&p)).await.is_err() {
                        break "stream lost";
                    }
                }
                None => break "flow removed",
            },
            r = recv.recv(&mut chunks) => match r {
                Ok(0) => break "closed by the far side",
                Err(e) => break e,
                Ok(n) => {
                    for c in &chunks[..n] {
                        dec.push(c);
                    }
                    loop {
                        match dec.next_datagram() {
                            Ok(Some(p)) => match socket.try_send_to(&p, client) {
                                Ok(_) => {
                                    counters.received(p.len());
                                    last.store(now_ms(), Ordering::Relaxed);
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                    counters.dropped("socket_full", 1);
                                }
                                Err(_) => counters.dropped("client_unreachable", 1),
                            },
                            Ok(None) => break,
                            Err(e) => {
                                counters.dropped("malformed", 1);
                                send.reset();
                                debug!(error = %e, "bad capsule from the far side");
                                break 'flow "malformed capsule";
                            }
                        }
                    }
                }
            },
        }
    };
    debug!(%site, why, "UDP flow on h2 ended");
    let _ = events.send(Event::Ended {
        client,
        id,
        refused: false,
    });
}

/// One egress flow: opens it, registers its responses' route, and holds its stream until
/// the far side closes it or `stop` (idle, drain).
async fn run_flow(
    this: Arc<UdpEgress>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    id: u32,
    last: Arc<AtomicU64>,
    stop: CancellationToken,
    events: mpsc::UnboundedSender<Event>,
) {
    let eg = &this.egress;
    let open = eg.open_request(Some(id));
    let opened = tokio::select! {
        r = eg.open_any(&open) => r,
        _ = stop.cancelled() => {
            let _ = events.send(Event::Ended { client, id, refused: false });
            return;
        }
    };
    let (site, conn, send, recv) = match opened {
        Ok(Opened {
            site,
            stream: Stream::Quic(conn, send, recv),
        }) => (site, conn, send, recv),
        Ok(Opened {
            site,
            stream: Stream::H2(send, recv),
        }) => {
            let _active = eg.metrics.udp_flow_started("egress");
            return run_h2_flow(
                &this, &socket, client, id, &last, &stop, &events, site, send, recv,
            )
            .await;
        }
        Err(refused) => {
            refused.log(&open, "UDP flow refused");
            eg.metrics.refused("egress", refused.reason.as_str());
            let _ = events.send(Event::Ended {
                client,
                id,
                refused: true,
            });
            return;
        }
    };
    let _active = eg.metrics.udp_flow_started("egress");
    this.dispatch.add(
        id,
        &conn,
        Route {
            conn: conn.stable_id(),
            socket,
            client,
            last,
        },
    );
    let _ = events.send(Event::Opened {
        client,
        id,
        sink: Sink::Quic(conn.clone()),
    });
    let (mut send, mut recv) = (send, recv);
    let mut one = [0u8; 1];
    tokio::select! {
        _ = stop.cancelled() => {
            let _ = send.reset(VarInt::from_u32(app_code::FLOW_IDLE));
            let _ = recv.stop(VarInt::from_u32(app_code::FLOW_IDLE));
        }
        r = recv.read(&mut one) => {
            debug!(site = %site, end = ?r, "UDP flow closed by the far side");
            let _ = send.finish();
        }
    }
    this.dispatch.remove(id);
    let _ = events.send(Event::Ended {
        client,
        id,
        refused: false,
    });
    if stop.is_cancelled() {
        debug!(site = %site, "UDP flow ended (idle or stopped)");
    } else {
        warn!(site = %site, "UDP flow ended by the far side");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_limits_leave_most_descriptors_to_tcp() {
        let rows = [
            (1024, 256, 128),
            (64, 16, 8),
            (0, 16, 8),
            (1 << 20, 16 * 1024, 8 * 1024),
        ];
        for (nofile, total, per_peer) in rows {
            assert_eq!(
                FlowLimits::for_nofile(nofile),
                FlowLimits { per_peer, total },
                "nofile {nofile}"
            );
        }
    }

    #[test]
    fn the_budget_is_given_back() {
        let b = FlowBudget::new(FlowLimits {
            per_peer: 8,
            total: 2,
        });
        let p1 = b.take().unwrap();
        let _p2 = b.take().unwrap();
        assert!(b.take().is_none());
        drop(p1);
        assert!(b.take().is_some());
    }

    #[test]
    fn idleness() {
        let t = Duration::from_secs(60);
        assert!(!is_idle(1_000, 60_999, t));
        assert!(is_idle(1_000, 61_000, t));
        // A clock read before a concurrent touch never underflows into "idle".
        assert!(!is_idle(5_000, 4_000, t));
        assert_eq!(
            idle_check_interval(Duration::from_secs(60)),
            Duration::from_secs(5)
        );
        assert_eq!(
            idle_check_interval(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
        assert_eq!(
            idle_check_interval(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn a_full_datagram_buffer_is_a_drop_not_an_eviction() {
        assert!(!tunnel_full(1196, 1200));
        assert!(tunnel_full(1197, 1200));
        assert!(!tunnel_full(0, 4));
        assert!(tunnel_full(0, 3));
    }
}
