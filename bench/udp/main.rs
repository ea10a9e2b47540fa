//! bench/udp: UDP through meshfed's tunnel (QUIC datagrams between two gateways) against
//! direct UDP, on the same path, in the same run.
//!
//! Topology as bench/tunnel: two network namespaces joined by a veth pair with MTU 1500
//! (loopback without root, said so). A UDP echo server in `mfb-b`; clients in `mfb-a`
//! reach it through the east gateway's UDP import (→ QUIC datagrams → west gateway →
//! echo) or directly. No TLS proxy in this field carries UDP (stunnel and haproxy are
//! TCP only), so direct UDP is the peer. The last line is `udp_pps_ratio_vs_direct: X`.

#[allow(dead_code)] // need(): for benchmarks with peers to install
#[path = "../common/topo.rs"]
mod topo;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use meshfed_lab::ConfigBuilder;
use topo::{NS_B, Topo};

#[derive(Parser)]
#[command(about = "UDP through meshfed's QUIC datagram tunnel vs direct UDP")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the whole benchmark (the default).
    Run(RunArgs),
    /// Internal: the UDP echo server.
    Serve { addr: SocketAddr },
    /// Internal: closed-loop echo load against `addr`; prints one JSON line.
    Load {
        addr: SocketAddr,
        /// Client sockets, each its own flow.
        #[arg(long, default_value_t = 4)]
        flows: usize,
        /// Datagrams in flight per flow.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Payload bytes per datagram.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 4.0)]
        secs: f64,
    },
    /// Internal: the gateway's UDP metrics from its admin port, as one JSON line.
    Metrics { admin: SocketAddr },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4.0)]
    secs: f64,
    /// Use loopback even when root.
    #[arg(long)]
    loopback: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd.unwrap_or(Cmd::Run(RunArgs {
        secs: 4.0,
        loopback: false,
    })) {
        Cmd::Serve { addr } => rt.block_on(serve(addr)),
        Cmd::Load {
            addr,
            flows,
            window,
            size,
            secs,
        } => {
            let v = rt.block_on(load(addr, flows, window, size, secs))?;
            println!("{v}");
            Ok(())
        }
        Cmd::Metrics { admin } => {
            let v = rt.block_on(metrics(admin))?;
            println!("{v}");
            Ok(())
        }
        Cmd::Run(args) => run(args),
    }
}

async fn serve(addr: SocketAddr) -> Result<()> {
    let s = meshfed_gateway::udp::bind_udp(addr).with_context(|| format!("bind {addr}"))?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = s.recv_from(&mut buf).await?;
        let _ = s.send_to(&buf[..n], from).await;
    }
}

/// `flows` client sockets, each keeping `window` datagrams of `size` bytes in flight
/// against an echo server: every echo sends the next datagram. A window that gets no echo
/// for 50 ms is counted lost and sent again. Counts echoes after a 1 s warm-up (which
/// also lets QUIC's path MTU discovery finish).
async fn load(
    addr: SocketAddr,
    flows: usize,
    window: usize,
    size: usize,
    secs: f64,
) -> Result<serde_json::Value> {
    let echoed = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for f in 0..flows {
        let s = meshfed_gateway::udp::bind_udp(([0, 0, 0, 0], 0).into())?;
        s.connect(addr).await?;
        let (echoed, lost, counting, stop) =
            (echoed.clone(), lost.clone(), counting.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let msg = vec![f as u8; size];
            let mut buf = vec![0u8; 65536];
            let mut outstanding = 0usize;
            while !stop.load(Ordering::Relaxed) {
                while outstanding < window {
                    if s.send(&msg).await.is_err() {
                        break;
                    }
                    outstanding += 1;
                }
                match tokio::time::timeout(Duration::from_millis(50), s.recv(&mut buf)).await {
                    Ok(Ok(_)) => {
                        outstanding -= 1;
                        if counting.load(Ordering::Relaxed) {
                            echoed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        if counting.load(Ordering::Relaxed) {
                            lost.fetch_add(outstanding as u64, Ordering::Relaxed);
                        }
                        outstanding = 0;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = echoed.load(Ordering::Relaxed);
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let n = echoed.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let per_sec = n as f64 / elapsed;
    Ok(serde_json::json!({
        "echoes_per_sec": per_sec,
        // Each echo is one datagram each way through the path.
        "pps": per_sec * 2.0,
        "mbps_each_way": per_sec * size as f64 * 8.0 / 1e6,
        "lost": lost.load(Ordering::Relaxed),
        "echoed": n,
    }))
}

async fn metrics(admin: SocketAddr) -> Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(admin).await?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut text = String::new();
    c.read_to_string(&mut text).await?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("meshfed_gateway_udp_drops")
                || l.starts_with("meshfed_gateway_udp_datagrams")
        })
        .collect();
    Ok(serde_json::json!(lines))
}

fn run(args: RunArgs) -> Result<()> {
    let (dir, meshfed) = topo::scratch("udp")?;
    let me = std::env::current_exe()?;
    let mut topo = Topo::setup(args.loopback, dir.clone())?;
    let b = topo.b;
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let server = SocketAddr::new(if topo.netns { any } else { lo }, 5001);
    topo.spawn("server", NS_B, &me, &["serve", &server.to_string()])?;

    let east_admin = SocketAddr::new(lo, 15011);
    topo.gateways(
        &meshfed,
        |w| ConfigBuilder {
            admin: Some(SocketAddr::new(lo, 15012)),
            ..w.export_udp("bench.demo", 5001, vec![SocketAddr::new(lo, 5001)])
        },
        |e| ConfigBuilder {
            admin: Some(east_admin),
            ..e.import_udp("bench.demo", 5001, "west", SocketAddr::new(lo, 16000))
        },
    )?;
    std::thread::sleep(Duration::from_millis(500));

    println!("topology: {}", topo.describe());
    println!("paths: client → {{meshfed egress→QUIC datagrams→ingress | direct}} → UDP echo\n");
    let paths = [
        ("meshfed", SocketAddr::new(lo, 16000)),
        ("direct", SocketAddr::new(b, 5001)),
    ];
    let load = |addr: SocketAddr, size: usize, secs: f64| {
        let a = |s: &str| s.to_string();
        topo.run_a(&[
            a("load"),
            addr.to_string(),
            a("--flows"),
            a("4"),
            a("--window"),
            a("32"),
            a("--size"),
            size.to_string(),
            a("--secs"),
            secs.to_string(),
        ])
    };
    // Both paths must carry data before anything is measured.
    for (name, addr) in paths {
        let v = load(addr, 64, 0.3).with_context(|| format!("{name} path"))?;
        if v["echoed"].as_u64().unwrap_or(0) == 0 {
            bail!(
                "{name} path carries no datagrams; logs in {}",
                dir.display()
            );
        }
    }
    let mut res = std::collections::BTreeMap::new();
    for (label, size, field, unit) in [
        (
            "(a) packets per second, 64 B datagrams, 4 flows × 32 in flight",
            64,
            "pps",
            "pkt/s",
        ),
        (
            "(b) throughput, 1200 B datagrams, 4 flows × 32 in flight",
            1200,
            "mbps_each_way",
            "Mbit/s each way",
        ),
    ] {
        println!("{label}");
        for (name, addr) in paths {
            let v = load(addr, size, args.secs)?;
            let x = v[field].as_f64().unwrap_or(f64::NAN);
            println!("  {name:<8} {x:>12.0} {unit}   {v}");
            res.insert((name, size), x);
        }
    }
    let m = topo.run_a(&["metrics".into(), east_admin.to_string()]);
    println!("\neast gateway UDP counters after the run:");
    if let Ok(serde_json::Value::Array(lines)) = m {
        for l in lines {
            println!("  {}", l.as_str().unwrap_or_default());
        }
    }
    let get = |p: &str, s: usize| res.get(&(p, s)).copied().unwrap_or(f64::NAN);
    println!("logs and configs: {}", dir.display());
    drop(topo);
    println!(
        "udp_throughput_ratio_vs_direct: {:.3}",
        get("meshfed", 1200) / get("direct", 1200)
    );
    println!(
        "udp_pps_ratio_vs_direct: {:.3}",
        get("meshfed", 64) / get("direct", 64)
    );
    Ok(())
}
