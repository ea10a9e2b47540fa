//! The sockets. UDP: one thread per core, each with its own `SO_REUSEPORT` socket on the
//! same address (refused when another socket holds it), answering the fast path in place
//! from a reused buffer; the slow path and forwarding are handed to the tokio runtime.
//! TCP (RFC 7766: length-prefixed messages, answered in order) from the same table, with
//! at most [`max_tcp_connections`] connections at once: a client past them is closed at
//! once and counted (`meshfed_dns_tcp_refused`), and each message must come within 5 s.
//! hickory-server's `Server` did this before, without a bound: a TCP flood took every
//! descriptor of the process, and its accept loop then spun on EMFILE.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meshfed_lifecycle::drain::{self, DrainTrigger, DrainWatcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::{debug, info, warn};

use crate::slow::{self, Slow};
use crate::wire::{self, Outcome};
use crate::zone::Table;

const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client has for each message (its length and its bytes), counted from
/// its connection or its last answer; and for an answer to be taken.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP connections at once for an open-file limit: an eighth of it, 16 to 256 (BIND's
/// `tcp-clients` is 150). Pure.
pub fn max_tcp_connections(nofile: u64) -> usize {
    usize::try_from(nofile / 8)
        .unwrap_or(usize::MAX)
        .clamp(16, 256)
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Upstream resolver for names outside our zones; `None`: REFUSED.
    pub forward: Option<SocketAddr>,
    /// Queries per second per client address (UDP); `None`: unlimited.
    pub rate_limit: Option<u32>,
    /// UDP threads; 0: one per core.
    pub workers: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Labels {
    pub transport: &'static str,
    pub result: &'static str,
}

/// `meshfed_dns_*` metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Answers by transport and result (`fast`, `formerr`, `refused`, ...).
    pub answers: Family<Labels, Counter>,
    pub rate_limited: Counter,
    pub forwarded: Counter,
    pub forward_failures: Counter,
    /// TCP connections closed at once: the server held its most.
    pub tcp_refused: Counter,
}

impl Metrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("meshfed_dns");
        r.register(
            "answers",
            "Answers sent, by transport and result",
            self.answers.clone(),
        );
        r.register(
            "rate_limited",
            "UDP queries dropped by the per-client rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "forwarded",
            "Queries forwarded upstream",
            self.forwarded.clone(),
        );
        r.register(
            "forward_failures",
            "Forwarded queries with no upstream answer",
            self.forward_failures.clone(),
        );
        r.register(
            "tcp_refused",
            "TCP connections closed at once because the server held its most",
            self.tcp_refused.clone(),
        );
    }

    fn count(&self, transport: &'static str, result: &'static str) {
        self.answers
            .get_or_create(&Labels { transport, result })
            .inc();
    }
}

/// A running DNS server; stops on drop. It drains with `meshfed_lifecycle::drain`: the
/// UDP workers and the TCP server watch it, and [`Running::shutdown`] starts it.
pub struct Running {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    drain: DrainTrigger,
    threads: Vec<std::thread::JoinHandle<()>>,
    tcp_task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        // The workers see it within one read timeout (200 ms); the TCP server at once.
        self.drain.start();
        self.tcp_task.abort();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn reuseport_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s.into())
}

/// Refuses a UDP address some other socket holds. `SO_REUSEPORT` alone would not: a
/// reuse-port bind joins any group of the same user on that port (another `meshfed dns`,
/// or an ephemeral port the kernel handed out because a group already there accepts
/// members), and the two processes would then split the queries between them. A plain
/// bind fails with `AddrInUse` whenever anything holds the port; it is released before
/// the group binds, which leaves only the microseconds between the two for a race.
fn udp_port_free(addr: SocketAddr) -> std::io::Result<()> {
    match UdpSocket::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(std::io::Error::new(
            e.kind(),
            format!("UDP {addr} is held by another socket (another DNS server?): {e}"),
        )),
        Err(e) => Err(e),
    }
}

/// Starts UDP workers and the TCP server on `cfg.listen` (port 0: any free port, the
/// same for UDP and TCP when it can be had). Must be called inside a tokio runtime.
pub async fn start(
    cfg: ServerConfig,
    table: Arc<ArcSwap<Table>>,
    metrics: Metrics,
) -> std::io::Result<Running> {
    // TCP first: its port is then taken for UDP too. With port 0, a TCP port whose UDP
    // twin is held is given back and another one drawn.
    let mut draws = 0;
    let (tcp, tcp_addr, udp_addr) = loop {
        let tcp = tokio::net::TcpListener::bind(cfg.listen).await?;
        let tcp_addr = tcp.local_addr()?;
        let udp_addr = SocketAddr::new(cfg.listen.ip(), tcp_addr.port());
        match udp_port_free(udp_addr) {
            Ok(()) => break (tcp, tcp_addr, udp_addr),
            Err(e) if cfg.listen.port() == 0 && draws < 16 => {
                debug!(error = %e, "drawing another port");
                draws += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let first = reuseport_socket(udp_addr)?;
    let workers = if cfg.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.workers
    };
    let (drain, watcher) = drain::channel();
    let rt = tokio::runtime::Handle::current();
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(reuseport_socket(udp_addr)?);
    }
    let mut threads = Vec::new();
    for (i, sock) in sockets.into_iter().enumerate() {
        let w = Worker {
            sock,
            table: table.clone(),
            metrics: metrics.clone(),
            forward: cfg.forward,
            limiter: cfg.rate_limit.map(RateLimiter::new),
            rt: rt.clone(),
            drain: watcher.clone(),
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || w.run())?,
        );
    }
    let max_tcp = max_tcp_connections(nofile());
    let handler = Arc::new(TcpHandler {
        table,
        metrics,
        forward: cfg.forward,
    });
    let tcp_task = tokio::spawn(async move {
        tokio::select! {
            () = serve_tcp(tcp, handler, max_tcp) => {}
            _ = watcher.signaled() => {}
        }
    });
    info!(udp = %udp_addr, tcp = %tcp_addr, workers, max_tcp, forward = ?cfg.forward, "DNS serving");
    Ok(Running {
        udp: udp_addr,
        tcp: tcp_addr,
        drain,
        threads,
        tcp_task,
    })
}

/// Per-client token buckets of one UDP worker (a client's packets hash to one worker).
struct RateLimiter {
    rate: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimiter {
    fn new(qps: u32) -> Self {
        Self {
            rate: f64::from(qps.max(1)),
            buckets: HashMap::new(),
        }
    }

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() > 100_000 {
            self.buckets.clear(); // bounded memory under a spoofed-source flood
        }
        let rate = self.rate;
        let (tokens, last) = self.buckets.entry(ip).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Worker {
    sock: UdpSocket,
    table: Arc<ArcSwap<Table>>,
    metrics: Metrics,
    forward: Option<SocketAddr>,
    limiter: Option<RateLimiter>,
    rt: tokio::runtime::Handle,
    drain: DrainWatcher,
}

impl Worker {
    fn run(mut self) {
        let mut buf = vec![0u8; 4096];
        let mut out = vec![0u8; 4096];
        // A clone of the counter, not the family's guard: holding that guard would block
        // every other label's first use.
        let fast = self
            .metrics
            .answers
            .get_or_create(&Labels {
                transport: "udp",
                result: "fast",
            })
            .clone();
        while !self.drain.is_draining() {
            let (n, peer) = match self.sock.recv_from(&mut buf) {
                Ok(v) => v,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "DNS recv");
                    continue;
                }
            };
            if let Some(l) = &mut self.limiter
                && !l.allow(peer.ip(), Instant::now())
            {
                self.metrics.rate_limited.inc();
                continue;
            }
            let q = &buf[..n];
            let table = self.table.load();
            match wire::respond(&table, q, &mut out, true, self.forward.is_some()) {
                Outcome::Reply(len) => {
                    let _ = self.sock.send_to(&out[..len], peer);
                    fast.inc();
                }
                Outcome::Drop => {}
                Outcome::Slow => self.slow(q, peer, &table),
            }
        }
    }

    fn slow(&self, q: &[u8], peer: SocketAddr, table: &Table) {
        let (s, rcode) = slow::respond(table, q, self.forward.is_some());
        match s {
            Slow::Reply(bytes) => {
                let _ = self.sock.send_to(&bytes, peer);
                self.metrics
                    .count("udp", rcode.map_or("other", slow::reason));
            }
            Slow::Drop => {}
            Slow::Forward => {
                let Some(upstream) = self.forward else { return };
                let Ok(sock) = self.sock.try_clone() else {
                    return;
                };
                let q = q.to_vec();
                let metrics = self.metrics.clone();
                self.rt.spawn(async move {
                    metrics.forwarded.inc();
                    match forward_udp(&q, upstream).await {
                        Some(answer) => {
                            let _ = sock.send_to(&answer, peer);
                        }
                        None => {
                            metrics.forward_failures.inc();
                        }
                    }
                });
            }
        }
    }
}

/// One UDP exchange with the upstream resolver; the answer must carry the query's id.
async fn forward_udp(q: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = tokio::net::UdpSocket::bind(bind).await.ok()?;
    s.connect(upstream).await.ok()?;
    s.send(q).await.ok()?;
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, s.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n >= 2 && buf[..2] == q[..2] {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

/// The process's open-file limit (soft), as in force now.
fn nofile() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Accepts TCP clients, at most `max` at once; each connection's task ends with this
/// one (the drain, or [`Running`] dropped).
async fn serve_tcp(listener: tokio::net::TcpListener, handler: Arc<TcpHandler>, max: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let mut conns = tokio::task::JoinSet::new();
    let mut refusing = false;
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            handler.metrics.tcp_refused.inc();
            if !refusing {
                warn!(%peer, max, "DNS TCP connection closed at once: the server holds its most (meshfed_dns_tcp_refused counts them)");
                refusing = true;
            }
            drop(tcp);
            continue;
        };
        refusing = false;
        let handler = handler.clone();
        conns.spawn(async move {
            let _slot = slot;
            if let Err(e) = handler.connection(tcp).await {
                debug!(%peer, error = %e, "DNS TCP connection ended");
            }
        });
    }
}

/// DNS over TCP, answered from the same table.
struct TcpHandler {
    table: Arc<ArcSwap<Table>>,
    metrics: Metrics,
    forward: Option<SocketAddr>,
}

impl TcpHandler {
    /// Messages, each answered before the next is read, until the client closes, sends
    /// no whole message within [`TCP_TIMEOUT`], or sends what is not a query.
    async fn connection(&self, mut tcp: tokio::net::TcpStream) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut q = Vec::new();
        // One answer buffer per connection (length prefix, then the message), reused
        // for each query: at most 64 KiB per connection, and connections are bounded.
        let mut out = vec![0u8; 2 + wire::MAX_MESSAGE];
        loop {
            let read = async {
                let len = tcp.read_u16().await?;
                q.resize(usize::from(len), 0);
                tcp.read_exact(&mut q).await
            };
            match tokio::time::timeout(TCP_TIMEOUT, read).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(()),
            }
            let Some(n) = self.answer(&q, &mut out).await else {
                // Not a query (too short, or a response): nothing to say to it.
                return Ok(());
            };
            tokio::time::timeout(TCP_TIMEOUT, tcp.write_all(&out[..n]))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        }
    }

    /// The answer to one message, from the table, the slow path or the upstream
    /// (SERVFAIL when it does not answer), written framed into `out` (its length, then
    /// the message; `out` holds `2 + MAX_MESSAGE`); the framed length, or `None` for
    /// what is not a query.
    async fn answer(&self, q: &[u8], out: &mut [u8]) -> Option<usize> {
        let table = self.table.load_full();
        let (len, result) =
            match wire::respond(&table, q, &mut out[2..], false, self.forward.is_some()) {
                Outcome::Reply(n) => (Some(n), "fast"),
                Outcome::Drop => (None, "drop"),
                Outcome::Slow => {
                    let (bytes, result) = match slow::respond(&table, q, self.forward.is_some()) {
                        (Slow::Reply(b), rcode) => (Some(b), rcode.map_or("other", slow::reason)),
                        (Slow::Drop, _) => (None, "drop"),
                        (Slow::Forward, _) => {
                            self.metrics.forwarded.inc();
                            match forward_udp(q, self.forward.expect("forwarding is on")).await {
                                Some(b) => (Some(b), "forwarded"),
                                None => {
                                    self.metrics.forward_failures.inc();
                                    (slow::servfail(q), "forward_failed")
                                }
                            }
                        }
                    };
                    // Longer than a DNS message can be: nothing sent (as before).
                    let copied = bytes.and_then(|b| {
                        out.get_mut(2..2 + b.len())?.copy_from_slice(&b);
                        Some(b.len())
                    });
                    (copied, result)
                }
            };
        self.metrics.count("tcp", result);
        debug!(result, "DNS TCP answer");
        let n = len?;
        out[..2].copy_from_slice(&u16::try_from(n).ok()?.to_be_bytes());
        Some(2 + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eighth_of_the_descriptors_for_tcp_clients() {
        for (nofile, want) in [
            (0, 16),
            (128, 16),
            (1024, 128),
            (2048, 256),
            (20_000, 256),
            (u64::MAX, 256),
        ] {
            assert_eq!(max_tcp_connections(nofile), want, "nofile {nofile}");
        }
    }

    /// A UDP port another reuse-port group holds (another process of the same user, or
    /// the same process) is refused, not joined: joined, the two servers would each get
    /// part of the queries.
    #[tokio::test]
    async fn a_udp_port_held_by_another_reuseport_group_is_refused() {
        // A port whose TCP twin is free too (start binds TCP first): the TCP listener
        // is dropped only once the UDP group holds the port.
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = reuseport_socket(tcp.local_addr().unwrap()).unwrap();
        let held = other.local_addr().unwrap();
        drop(tcp);
        let table = Arc::new(ArcSwap::from_pointee(Table::build(
            &crate::ZoneConfig {
                ttl: 5,
                extra_zones: vec![],
                host_zones: vec![],
            },
            &[],
            &[],
            0,
        )));
        let cfg = ServerConfig {
            listen: held,
            forward: None,
            rate_limit: None,
            workers: 1,
        };
        let err = match start(cfg, table, Metrics::default()).await {
            Ok(r) => panic!("joined the group on {held}: serving on {}", r.udp),
            Err(e) => e,
        };
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&held.to_string()), "{err}");
    }

    #[test]
    fn rate_limit_is_per_client_and_refills() {
        let mut l = RateLimiter::new(10);
        let t0 = Instant::now();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let allowed = (0..25).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, 10, "a burst of one second's worth");
        assert!(l.allow(b, t0), "another client has its own bucket");
        assert!(!l.allow(a, t0 + Duration::from_millis(50)));
        assert!(l.allow(a, t0 + Duration::from_millis(150)), "refilled");
    }
}
