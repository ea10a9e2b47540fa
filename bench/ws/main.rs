//! ws-bench: WebSockets across sites through meshfed's HTTP path against an haproxy pair
//! doing the same job, with tokio-tungstenite as the client and the echo endpoint.
//!
//! One run starts, as real processes on loopback: a federation, three sites (east
//! imports over QUIC, south over the h2 transport (TLS over TCP); west exports), a
//! WebSocket echo endpoint (this binary with `--echo`, one thread, as http-bench's nginx
//! has one worker), and an haproxy pair. The paths:
//! - `direct`: client → the echo endpoint;
//! - `meshfed-l7`: client → east's egress (`protocol: http`: the handshake is routed as
//!   an HTTP request, then the upgraded bytes are spliced) ══QUIC══▶ west → endpoint;
//! - `meshfed-l4`: the same gateways, a `tcp` port of west's (bytes, no HTTP);
//! - `meshfed-l7-tcp`, `meshfed-l4-tcp`: the same two through south, whose link to west
//!   is the h2 transport instead of QUIC;
//! - `haproxy`: client → haproxy A (`mode http`) ══mTLS (the sites' certificates,
//!   HTTP/1.1)══▶ haproxy B (`verify required`) → endpoint; A and B are processes of
//!   their own (`nbthread` as the gateways' workers).
//! - `*-h2ws`: the same three L7 paths with WebSockets over h2 (RFC 8441): each client
//!   holds one h2 connection (hyper's client) and opens its WebSockets on it with an
//!   extended CONNECT; haproxy's is its h2 frontend (which enables it), over h2 to B.
//!
//! For each round and path, at fixed concurrency (`--clients` WebSockets):
//! - `echo`: round trips per second of a `--size`-byte binary message, each client
//!   sending its next message when the echo of the last arrives, with the CPU the
//!   path's proxy processes used per round trip (from `/proc`);
//! - `bulk`: the same with 64 KiB messages;
//! - `handshakes`: WebSockets per second, each a TCP connect (over h2: a stream on the
//!   client's connection), the opening handshake, one echo and the closing handshake
//!   (across haproxy's pair that is a TLS connection A→B per WebSocket; across meshfed
//!   a tunnel stream);
//! - then p50/p99 of the small round trip with the clients paced to 60 % of the slowest
//!   path's echo capacity in that round;
//! - then `idle_kib`: the resident memory the path's proxy processes gain per open, idle
//!   WebSocket (`--idle` of them, each opened with one echo so both splices run, held
//!   for a second; VmRSS from `/proc`), a chat or notification service's load. The
//!   path's proxies are restarted first: an allocator keeps what the earlier figures
//!   freed (haproxy's pools never give it back), which would hide the cost.
//!
//! Prints every figure with the peer's, then ratios with their range over rounds, per
//! transport; the last lines are `name: value` (the headline lines take the worse
//! transport; the `*-h2ws` paths are compared with `haproxy-h2ws`, in lines of their
//! own: `ws_h2ws_…`, `ws_tcp_h2ws_…`).

#[allow(dead_code)] // the flood itself: flood-bench's; here its rss_bytes
#[path = "../common/flood.rs"]
mod flood;
#[allow(dead_code)] // nginx, endpoint_certs: http-bench's
#[path = "../common/procs.rs"]
mod procs;
#[allow(dead_code)] // need(): the peers this benchmark installs
#[path = "../common/topo.rs"]
mod topo;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use meshfed_lab::ConfigBuilder;
use procs::{Procs, cpu_secs, free_port, haproxy_pair, spawn, wait_for};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Cli {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Concurrent WebSockets.
    #[arg(long, default_value_t = 32)]
    clients: u32,
    /// WebSockets held open for the `idle_kib` figure.
    #[arg(long, default_value_t = 2000)]
    idle: u32,
    /// Bytes per message of the `echo` figure.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Threads per proxy process: each gateway's `workers` and each haproxy's
    /// `nbthread`.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Be the echo endpoint at this address (the benchmark starts itself so).
    #[arg(long, hide = true)]
    echo: Option<SocketAddr>,
}

/// The echo endpoint: every WebSocket's data messages sent back as they came.
async fn echo(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            tcp.set_nodelay(true).ok();
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_binary() || m.is_text()) && ws.send(m).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A WebSocket's bytes: a TCP connection, or an h2 stream (RFC 8441).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// How a client opens its WebSockets.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    /// A TCP connection and an HTTP/1.1 upgrade each.
    H1,
    /// One h2 connection per client, an extended CONNECT (RFC 8441) each.
    H2,
}

/// A client's h2 connection (hyper's client), and whether the server's SETTINGS (which
/// must enable the extended CONNECT) have been seen: until then, a CONNECT is refused
/// locally, and tried again.
struct H2Conn {
    send: hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    settled: bool,
}

impl H2Conn {
    async fn connect(addr: SocketAddr) -> Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tcp))
                .await?;
        tokio::spawn(conn);
        Ok(Self {
            send,
            settled: false,
        })
    }

    async fn open(&mut self, addr: SocketAddr) -> Result<Ws> {
        let began = Instant::now();
        let answer = loop {
            let mut req = hyper::Request::connect(format!("http://{addr}/echo"))
                .header("sec-websocket-version", "13")
                .body(http_body_util::Empty::new())?;
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from_static("websocket"));
            self.send.ready().await?;
            match self.send.send_request(req).await {
                Ok(a) => break a,
                Err(_) if !self.settled && began.elapsed() < Duration::from_secs(2) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.settled = true;
        ensure!(answer.status() == 200, "h2 handshake: {}", answer.status());
        let up = hyper::upgrade::on(answer).await?;
        let io: Box<dyn Io> = Box::new(hyper_util::rt::TokioIo::new(up));
        Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(
            io,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await)
    }
}

async fn open(addr: SocketAddr) -> Result<Ws> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = Box::new(tcp);
    let (ws, answer) = tokio_tungstenite::client_async(format!("ws://{addr}/echo"), io).await?;
    ensure!(answer.status() == 101, "handshake: {}", answer.status());
    Ok(ws)
}

/// A client's next WebSocket: over its h2 connection when it has one.
async fn open_by(addr: SocketAddr, h2: &mut Option<H2Conn>) -> Result<Ws> {
    match h2 {
        Some(c) => c.open(addr).await,
        None => open(addr).await,
    }
}

/// Sends `payload` and waits for its echo.
async fn round_trip(ws: &mut Ws, payload: &bytes::Bytes) -> Result<()> {
    ws.send(Message::Binary(payload.clone())).await?;
    loop {
        match ws.next().await.context("closed before the echo")?? {
            Message::Binary(b) if b.len() == payload.len() => return Ok(()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => bail!("not the echo: {:?}", other.len()),
        }
    }
}

/// Ends a WebSocket with the closing handshake (bounded).
async fn close(mut ws: Ws) -> Result<()> {
    ws.close(None).await?;
    tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(m) = ws.next().await {
            m?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .context("closing handshake: no close within 2 s")?
}

/// The resident memory (KiB) the processes `pids` gain per WebSocket while `n` are
/// open and idle, opened by `clients` tasks (over h2: one connection each), each with
/// one echo, so every splice runs; then closed.
async fn idle_kib(
    (addr, client): (SocketAddr, Client),
    n: u32,
    clients: u32,
    pids: &[u32],
) -> Result<f64> {
    let rss = |pids: &[u32]| pids.iter().map(|p| flood::rss_bytes(*p)).sum::<u64>();
    // Let a freshly started proxy settle first (what its start allocated and freed).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss(pids);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let share = n / clients + u32::from(i < n % clients);
        tasks.push(tokio::spawn(async move {
            let mut h2 = match client {
                Client::H1 => None,
                Client::H2 => Some(H2Conn::connect(addr).await?),
            };
            let mut held = Vec::new();
            for _ in 0..share {
                let mut ws = open_by(addr, &mut h2).await?;
                round_trip(&mut ws, &bytes::Bytes::from_static(b"hold")).await?;
                held.push(ws);
            }
            Ok::<_, anyhow::Error>((h2, held))
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await??);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(pids);
    for (_, wss) in held.iter_mut() {
        for ws in wss.drain(..) {
            close(ws).await?;
        }
    }
    drop(held);
    // Let the proxies release them before the next path.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((after as f64 - before as f64) / 1024.0 / f64::from(n))
}

#[derive(Clone, Copy)]
enum Load {
    /// Round trips of this many bytes, each client paced to a rate (per second) or not.
    Echo(usize, Option<f64>),
    /// Open, one 16-byte echo, close.
    Handshakes,
}

/// One measurement: operations per second over `secs` (after a second of warm-up), the
/// first error of any client (none expected), and the round trips' latencies (µs) when
/// paced.
struct Run {
    per_sec: f64,
    error: Option<String>,
    lat_us: Vec<u64>,
}

async fn measure((addr, client): (SocketAddr, Client), clients: u32, secs: u64, load: Load) -> Run {
    let counting = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (counting, done, ops) = (counting.clone(), done.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let r: Result<()> = async {
                let mut h2 = match client {
                    Client::H1 => None,
                    Client::H2 => Some(H2Conn::connect(addr).await?),
                };
                match load {
                    Load::Echo(size, pace) => {
                        let payload = bytes::Bytes::from(vec![7u8; size]);
                        let mut ws = open_by(addr, &mut h2).await?;
                        let mut tick = pace.map(|r| {
                            let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
                            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            i
                        });
                        while !done.load(Ordering::Relaxed) {
                            if let Some(t) = &mut tick {
                                t.tick().await;
                            }
                            let began = Instant::now();
                            round_trip(&mut ws, &payload).await?;
                            if counting.load(Ordering::Relaxed) {
                                ops.fetch_add(1, Ordering::Relaxed);
                                if pace.is_some() {
                                    lat.push(began.elapsed().as_micros() as u64);
                                }
                            }
                        }
                        close(ws).await
                    }
                    Load::Handshakes => {
                        let payload = bytes::Bytes::from_static(b"sixteen bytes...");
                        while !done.load(Ordering::Relaxed) {
                            let mut ws = open_by(addr, &mut h2).await?;
                            round_trip(&mut ws, &payload).await?;
                            close(ws).await?;
                            if counting.load(Ordering::Relaxed) {
                                ops.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(())
                    }
                }
            }
            .await;
            (r.err().map(|e| format!("{e:#}")), lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    counting.store(true, Ordering::Relaxed);
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = began.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let (mut error, mut lat_us) = (None, Vec::new());
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(10), t).await {
            Ok(Ok((e, l))) => {
                error = error.or(e);
                lat_us.extend(l);
            }
            Ok(Err(e)) => error = error.or(Some(format!("client task: {e}"))),
            Err(_) => error = error.or(Some("a client did not finish within 10 s".into())),
        }
    }
    lat_us.sort_unstable();
    Run {
        per_sec: ops.load(Ordering::Relaxed) as f64 / elapsed,
        error,
        lat_us,
    }
}

fn pct(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// One echo, for the readiness waits (their check is synchronous: on a thread of its
/// own, off the bench's runtime).
fn answers(addr: SocketAddr) -> bool {
    answers_by(addr, Client::H1)
}

fn answers_by(addr: SocketAddr, client: Client) -> bool {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), async {
                let mut h2 = match client {
                    Client::H1 => None,
                    Client::H2 => Some(H2Conn::connect(addr).await?),
                };
                let mut ws = open_by(addr, &mut h2).await?;
                round_trip(&mut ws, &bytes::Bytes::from_static(b"ready?")).await?;
                close(ws).await
            })
            .await
        })
        .ok()?
        .ok()
    })
    .join()
    .is_ok_and(|r| r.is_some())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(addr) = cli.echo {
        return echo(addr).await;
    }
    let me = std::env::current_exe()?;
    let meshfed = me
        .parent()
        .context("bench binary directory")?
        .join("meshfed");
    ensure!(
        meshfed.exists(),
        "{} missing: cargo build --release --workspace",
        meshfed.display()
    );
    topo::need("haproxy", "haproxy")?;
    let dir = std::env::temp_dir().join(format!("meshfed-bench-ws-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut procs = Procs(Vec::new());

    let lo = [127, 0, 0, 1];
    let endpoint = SocketAddr::from((lo, free_port(lo)?));
    procs.0.push(spawn(
        Command::new(&me).arg("--echo").arg(endpoint.to_string()),
        &dir.join("echo.log"),
    )?);
    wait_for("the echo endpoint", || answers(endpoint)).await?;

    let sites = procs::federation(&meshfed, &dir, &["east", "west", "south"], &mut procs).await?;
    let (east, west, south) = (&sites[0], &sites[1], &sites[2]);
    let import_ip = [127, 0, 0, 2];
    let tcp_ip = [127, 0, 0, 5];
    let (l7_port, l4_port) = (free_port(import_ip)?, free_port(import_ip)?);
    let mut proxies = Proxies::default();
    let fed_cfg = |s: &meshfed_lab::SiteFiles, ip: [u8; 4]| ConfigBuilder {
        federation: Some((s.dir.clone(), ip.into())),
        workers: Some(cli.threads),
        ..Default::default()
    };
    let west_cfg = fed_cfg(west, [127, 0, 0, 3])
        .export("chat.bench", l7_port, vec![endpoint])
        .speaks("chat.bench", l7_port, "http")
        .export("raw-chat.bench", l4_port, vec![endpoint]);
    let mut configs = vec![("west", west_cfg)];
    for (s, ip, transport) in [(east, import_ip, "quic"), (south, tcp_ip, "h2")] {
        let mut c = fed_cfg(s, ip);
        c.transport = Some(format!("default: {transport}"));
        configs.push((if s.site == "east" { "east" } else { "south" }, c));
    }
    for ((name, c), s) in configs.into_iter().zip([west, east, south]) {
        let cfg = c.write(s)?;
        let start: Start = Box::new({
            let (meshfed, dir) = (meshfed.clone(), dir.clone());
            move |n| {
                Ok(vec![spawn(
                    Command::new(&meshfed)
                        .args(["gateway", "run", "-c"])
                        .arg(&cfg),
                    &dir.join(format!("{name}-{n}.log")),
                )?])
            }
        });
        proxies.add(name, start)?;
    }
    let at = |ip: [u8; 4], port: u16| SocketAddr::from((ip, port));
    for a in [
        at(import_ip, l7_port),
        at(import_ip, l4_port),
        at(tcp_ip, l7_port),
        at(tcp_ip, l4_port),
    ] {
        wait_for(&format!("the import at {a}"), || answers(a)).await?;
    }

    // The haproxy pair, with the sites' certificates (east's as the client's).
    let (front_h1, front_h2, b_west) = (free_port(lo)?, free_port(lo)?, free_port(lo)?);
    let start: Start = Box::new({
        let (dir, east, west, threads) = (dir.clone(), east.clone(), west.clone(), cli.threads);
        move |_| {
            haproxy_pair(
                &dir,
                (&east, &west),
                (front_h1, front_h2),
                &[("west", b_west, endpoint.port())],
                "",
                (true, threads),
                "ws",
            )
        }
    });
    proxies.add("haproxy", start)?;
    let haproxy = at(lo, front_h1);
    wait_for("haproxy", || answers(haproxy)).await?;
    wait_for("haproxy's h2 frontend", || {
        answers_by(at(lo, front_h2), Client::H2)
    })
    .await?;
    wait_for("the import over h2", || {
        answers_by(at(import_ip, l7_port), Client::H2)
    })
    .await?;

    // Each path with the proxies it crosses (by name in `proxies`).
    let paths: Vec<(&str, (SocketAddr, Client), &[&str])> = {
        let h1 = |a: SocketAddr| (a, Client::H1);
        let h2 = |a: SocketAddr| (a, Client::H2);
        let (quic, tcp): (&[&str], &[&str]) = (&["east", "west"], &["south", "west"]);
        vec![
            ("direct", h1(endpoint), &[]),
            ("haproxy", h1(haproxy), &["haproxy"]),
            ("meshfed-l4", h1(at(import_ip, l4_port)), quic),
            ("meshfed-l7", h1(at(import_ip, l7_port)), quic),
            ("meshfed-l4-tcp", h1(at(tcp_ip, l4_port)), tcp),
            ("meshfed-l7-tcp", h1(at(tcp_ip, l7_port)), tcp),
            ("haproxy-h2ws", h2(at(lo, front_h2)), &["haproxy"]),
            ("meshfed-l7-h2ws", h2(at(import_ip, l7_port)), quic),
            ("meshfed-l7-tcp-h2ws", h2(at(tcp_ip, l7_port)), tcp),
        ]
    };
    println!(
        "ws bench: {} WebSockets, {}-byte and 64 KiB echoes, {} s per run, {} rounds; one-thread tokio-tungstenite echo endpoint",
        cli.clients, cli.size, cli.secs, cli.rounds
    );
    // (figure, path) → per-round values.
    let mut fig: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..cli.rounds {
        let mut capacity = f64::MAX;
        for (name, addr, names) in &paths {
            let pids = &proxies.pids(names);
            for (what, load) in [
                ("echo", Load::Echo(cli.size, None)),
                ("bulk", Load::Echo(64 * 1024, None)),
                ("handshakes", Load::Handshakes),
            ] {
                let before = cpu_secs(pids);
                let began = Instant::now();
                let r = measure(*addr, cli.clients, cli.secs, load).await;
                let us = (cpu_secs(pids) - before) * 1e6
                    / (r.per_sec * began.elapsed().as_secs_f64()).max(1.0);
                println!(
                    "round {round} {name:<14} {what:<10} {:>9.0} /s  proxies' CPU {:>6.1} µs each",
                    r.per_sec, us
                );
                if let Some(e) = r.error {
                    bail!("{name} {what}: {e} (logs: {})", dir.display());
                }
                fig.entry((what, name)).or_default().push(r.per_sec);
                if !pids.is_empty() {
                    fig.entry((cpu_key(what), name)).or_default().push(us);
                }
                if what == "echo" {
                    capacity = capacity.min(r.per_sec);
                }
            }
        }
        let target = capacity * 0.6;
        for (name, addr, _) in &paths {
            let r = measure(
                *addr,
                cli.clients,
                cli.secs,
                Load::Echo(cli.size, Some(target / f64::from(cli.clients))),
            )
            .await;
            if let Some(e) = r.error {
                bail!("{name} paced: {e} (logs: {})", dir.display());
            }
            let (a, b) = (pct(&r.lat_us, 0.5), pct(&r.lat_us, 0.99));
            println!(
                "round {round} {name:<14} at {target:>7.0} round trips/s: p50 {a:>6} µs  p99 {b:>6} µs  ({} round trips)",
                r.lat_us.len()
            );
            fig.entry(("p50", name)).or_default().push(a as f64);
            fig.entry(("p99", name)).or_default().push(b as f64);
        }
        for (name, addr, names) in &paths {
            if names.is_empty() {
                continue;
            }
            // Fresh processes (see the header), ready when the path answers again.
            for n in names.iter() {
                proxies.restart(n)?;
            }
            wait_for(&format!("{name} after its proxies' restart"), || {
                answers_by(addr.0, addr.1)
            })
            .await?;
            let kib = idle_kib(*addr, cli.idle, cli.clients, &proxies.pids(names))
                .await
                .with_context(|| format!("{name} idle (logs: {})", dir.display()))?;
            println!(
                "round {round} {name:<14} {} idle WebSockets: {kib:>6.1} KiB each (proxies' RSS)",
                cli.idle
            );
            fig.entry(("idle_kib", name)).or_default().push(kib);
        }
    }
    drop(proxies);
    drop(procs);

    use procs::{range, ratio};
    println!("\nratios per round (same run), range and mean:");
    let mut lines = Vec::new();
    // Headline: the worse transport (lowest throughput ratios, highest latency/CPU),
    // for HTTP/1.1 WebSockets and for WebSockets over h2 (each against haproxy's own).
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    for (transport, l7, l4, peer, (kind, tag)) in [
        ("quic", "meshfed-l7", "meshfed-l4", "haproxy", ("", "")),
        (
            "h2 transport",
            "meshfed-l7-tcp",
            "meshfed-l4-tcp",
            "haproxy",
            ("", "tcp_"),
        ),
        (
            "quic",
            "meshfed-l7-h2ws",
            "meshfed-l4",
            "haproxy-h2ws",
            ("h2ws_", "h2ws_"),
        ),
        (
            "h2 transport",
            "meshfed-l7-tcp-h2ws",
            "meshfed-l4-tcp",
            "haproxy-h2ws",
            ("h2ws_", "tcp_h2ws_"),
        ),
    ] {
        for (what, lower_is_better) in [
            ("echo", false),
            ("bulk", false),
            ("handshakes", false),
            ("p99", true),
            ("echo_cpu", true),
            ("bulk_cpu", true),
            ("handshakes_cpu", true),
            ("idle_kib", true),
        ] {
            let v = ratio(&fig[&(what, l7)], &fig[&(what, peer)]);
            let (lo, hi, m) = range(&v);
            println!("  {transport} {l7} / {peer} {what}: {lo:.3}–{hi:.3} (mean {m:.3})");
            lines.push(format!("ws_{tag}{what}_ratio_vs_haproxy: {m:.3}"));
            let w = worst
                .entry(format!("{kind}{what}"))
                .or_insert(if lower_is_better { f64::MIN } else { f64::MAX });
            *w = if lower_is_better { w.max(m) } else { w.min(m) };
        }
        if kind.is_empty() {
            // The L4 path's idle WebSocket (a `tcp` port: the TCP splice) against the
            // same peer.
            let v = ratio(&fig[&("idle_kib", l4)], &fig[&("idle_kib", peer)]);
            let (lo, hi, m) = range(&v);
            println!("  {transport} {l4} / {peer} idle_kib: {lo:.3}–{hi:.3} (mean {m:.3})");
            lines.push(format!("ws_{tag}l4_idle_kib_ratio_vs_haproxy: {m:.3}"));
        }
        for what in ["echo", "handshakes"] {
            let v = ratio(&fig[&(what, l7)], &fig[&(what, l4)]);
            let (lo, hi, m) = range(&v);
            println!("  {transport} {l7} / {l4} {what}: {lo:.3}–{hi:.3} (mean {m:.3})");
            lines.push(format!("ws_{tag}{what}_l7_overhead_vs_l4: {m:.3}"));
        }
    }
    println!("logs and configs: {}", dir.display());
    for l in lines {
        println!("{l}");
    }
    for (what, v) in worst {
        println!("ws_{what}_ratio_vs_haproxy_worse_transport: {v:.3}");
    }
    Ok(())
}

/// Starts a proxy's processes; its argument counts the starts (for log names).
type Start = Box<dyn Fn(u32) -> Result<Vec<Child>>>;

/// The proxies of the paths by name, each with how to start it again: the idle figure
/// restarts them. Killed on drop.
#[derive(Default)]
struct Proxies(BTreeMap<&'static str, (Start, u32, Procs)>);

impl Proxies {
    fn add(&mut self, name: &'static str, start: Start) -> Result<()> {
        let procs = Procs(start(0).with_context(|| format!("starting {name}"))?);
        self.0.insert(name, (start, 0, procs));
        Ok(())
    }

    /// Kills `name`'s processes and starts them again.
    fn restart(&mut self, name: &str) -> Result<()> {
        let (start, n, procs) = self.0.get_mut(name).context("no such proxy")?;
        *procs = Procs(Vec::new());
        *n += 1;
        *procs = Procs(start(*n).with_context(|| format!("restarting {name}"))?);
        Ok(())
    }

    fn pids(&self, names: &[&str]) -> Vec<u32> {
        names
            .iter()
            .flat_map(|n| self.0[n].2.0.iter().map(Child::id))
            .collect()
    }
}

fn cpu_key(what: &str) -> &'static str {
    match what {
        "echo" => "echo_cpu",
        "bulk" => "bulk_cpu",
        _ => "handshakes_cpu",
    }
}
