//! bench/tunnel: meshfed's tunnel on both transports (QUIC, and h2 CONNECT over TCP)
//! beside stunnel4 and haproxy TLS pairs and direct TCP, on the same path, in the same
//! run. Each transport has its own gateway pair (`transport: quic` and `transport: h2`).
//!
//! Topology: two network namespaces (`mfb-a`: clients and the client-side proxies;
//! `mfb-b`: the server and the server-side proxies) joined by a veth pair with MTU 1500,
//! so QUIC cannot profit from loopback's 64 KiB MTU. Without root it falls back to
//! loopback and says so. Every figure is printed, then the ratios against the better TLS
//! peer; the last lines are `name: value`.

mod load;
#[path = "../common/topo.rs"]
mod topo;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use meshfed_identity::{Ca, SpiffeId, TrustDomain};

#[derive(Parser)]
#[command(about = "meshfed tunnel vs stunnel4, haproxy and direct TCP")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the whole benchmark (the default).
    Run(RunArgs),
    /// Internal: the sink/echo server.
    Serve { addr: SocketAddr },
    /// Internal: one measurement against `addr`; prints one JSON line.
    Load {
        addr: SocketAddr,
        kind: String,
        #[arg(long, default_value_t = 1)]
        n: usize,
        #[arg(long, default_value_t = 4.0)]
        secs: f64,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Seconds per throughput / connection-rate measurement.
    #[arg(long, default_value_t = 4.0)]
    secs: f64,
    /// Use loopback even when root.
    #[arg(long)]
    loopback: bool,
    /// Paths to measure (comma separated): meshfed,meshfed-h2,stunnel,haproxy,direct.
    #[arg(long, default_value = "meshfed,meshfed-h2,stunnel,haproxy,direct")]
    paths: String,
    /// Request rate for the latency figures (c); default 60% of the slowest path's
    /// closed-loop capacity. A low rate shows what each path adds when the CPUs are idle.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// TCP connections per h2 link (`transport.h2_connections`); default the gateway's.
    #[arg(long)]
    h2_connections: Option<usize>,
    /// Runtime threads of every meshfed gateway (`workers`); default one per core.
    #[arg(long)]
    workers: Option<usize>,
    /// One-way delay of the long-path row (f), through a user-space relay; 0 skips it.
    #[arg(long, default_value_t = 25)]
    delay_ms: u32,
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
        paths: "meshfed,meshfed-h2,stunnel,haproxy,direct".into(),
        latency_rate: None,
        h2_connections: None,
        workers: None,
        delay_ms: 25,
    })) {
        Cmd::Serve { addr } => rt.block_on(load::serve(addr)),
        Cmd::Load {
            addr,
            kind,
            n,
            secs,
            rate,
        } => {
            let v = rt.block_on(async {
                match kind.as_str() {
                    "wait" => wait_port(addr).await.map(|_| serde_json::json!({})),
                    "throughput" => load::throughput(addr, n, secs).await,
                    "connrate" => load::connrate(addr, n, secs).await,
                    "capacity" => load::capacity(addr, n, secs).await,
                    "latency" => load::latency(addr, rate, secs, n).await,
                    "scrape" => load::scrape_quic(addr).await,
                    k => bail!("unknown load kind {k}"),
                }
            })?;
            println!("{v}");
            Ok(())
        }
        Cmd::Run(args) => run(args),
    }
}

async fn wait_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not come up in 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

use topo::{B_DELAYED, NS_A, NS_B, Topo, need};

/// Both gateways' QUIC path samples (east, west); empty when a scrape fails, so a
/// missing figure never stops the benchmark.
fn quic_figures(topo: &Topo, east: SocketAddr, west: SocketAddr) -> [serde_json::Value; 2] {
    // The gateways copy quinn's statistics into their metrics once a second
    // (`PATH_SAMPLE`): wait one period so that the scrape sees everything sent so far.
    std::thread::sleep(meshfed_gateway::metrics::PATH_SAMPLE + Duration::from_millis(200));
    [east, west].map(|a| load(topo, a, "scrape", 1, 0.0, 0.0).unwrap_or_default())
}

/// What the QUIC connection did during the latency run, each direction from its sender:
/// packets sent and lost, congestion events, and the path's RTT and MTU at the end. Loss
/// and congestion are what a tunnel's tail latency follows.
fn print_quic_path(before: &[serde_json::Value; 2], after: &[serde_json::Value; 2]) {
    for (i, dir) in ["east → west", "west → east"].iter().enumerate() {
        let d = |k: &str| {
            after[i][k].as_f64().unwrap_or(f64::NAN) - before[i][k].as_f64().unwrap_or(f64::NAN)
        };
        let (sent, lost) = (d("sent_packets_total"), d("lost_packets_total"));
        println!(
            "    meshfed QUIC {dir}: {sent:.0} packets sent, {lost:.0} lost ({:.3} %), {:.0} congestion events, rtt {:.0} µs, mtu {:.0} B",
            100.0 * lost / sent,
            d("congestion_events_total"),
            after[i]["rtt_seconds"].as_f64().unwrap_or(f64::NAN) * 1e6,
            after[i]["mtu_bytes"].as_f64().unwrap_or(f64::NAN),
        );
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resident memory of a process in MiB, from /proc/PID/status.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One measurement of `kind` against `addr`, run from namespace A.
fn load(
    topo: &Topo,
    addr: SocketAddr,
    kind: &str,
    n: usize,
    secs: f64,
    rate: f64,
) -> Result<serde_json::Value> {
    let args = [
        "load".to_string(),
        addr.to_string(),
        kind.into(),
        "--n".into(),
        n.to_string(),
        "--secs".into(),
        secs.to_string(),
        "--rate".into(),
        rate.to_string(),
    ];
    topo.run_a(&args)
        .with_context(|| format!("load {kind} against {addr}"))
}

/// The TLS peers' certificates: (cert, key, cert+key) of each side, and the CA.
struct PeerCerts {
    client: (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
    server: (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
    ca: std::path::PathBuf,
}

/// A stunnel pair and a haproxy pair (mutual TLS 1.3): clients at A's 127.0.0.1
/// `a_ports` (stunnel, haproxy), servers at `b`:`b_ports`, forwarding to B's server.
/// `threads`: haproxy's `nbthread`, set with the gateways' `workers` so that both run on
/// as many threads (stunnel runs a thread per connection and has no such setting).
#[allow(clippy::too_many_arguments)]
fn spawn_tls_peers(
    topo: &mut Topo,
    stunnel: &std::path::Path,
    haproxy: &std::path::Path,
    certs: &PeerCerts,
    label: &str,
    b: IpAddr,
    a_ports: [u16; 2],
    b_ports: [u16; 2],
    threads: Option<usize>,
) -> Result<()> {
    let dir = topo.dir.clone();
    let ((cc, ck, cboth), (sc, sk, sboth), ca_pem) = (&certs.client, &certs.server, &certs.ca);
    let ([sa, ha], [sb, hb]) = (a_ports, b_ports);
    let stunnel_client = format!(
        "foreground = yes\npid =\ndebug = 3\n[c]\nclient = yes\naccept = 127.0.0.1:{sa}\nconnect = {b}:{sb}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
        cc.display(),
        ck.display(),
        ca_pem.display()
    );
    let stunnel_server = format!(
        "foreground = yes\npid =\ndebug = 3\n[s]\naccept = {b}:{sb}\nconnect = 127.0.0.1:5001\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n",
        sc.display(),
        sk.display(),
        ca_pem.display()
    );
    let nbthread = threads
        .map(|n| format!("  nbthread {n}\n"))
        .unwrap_or_default();
    let common = format!(
        "global\n  maxconn 8000\n{nbthread}defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
    );
    let haproxy_client = format!(
        "{common}frontend f\n  bind 127.0.0.1:{ha}\n  default_backend b\nbackend b\n  server s {b}:{hb} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3\n",
        cboth.display(),
        ca_pem.display()
    );
    let haproxy_server = format!(
        "{common}frontend f\n  bind {b}:{hb} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3\n  default_backend b\nbackend b\n  server s 127.0.0.1:5001\n",
        sboth.display(),
        ca_pem.display()
    );
    let name = |n: &str, ext: &str| format!("{n}{label}.{ext}");
    for (file, text) in [
        (name("stunnel-a", "conf"), &stunnel_client),
        (name("stunnel-b", "conf"), &stunnel_server),
        (name("haproxy-a", "cfg"), &haproxy_client),
        (name("haproxy-b", "cfg"), &haproxy_server),
    ] {
        std::fs::write(dir.join(file), text)?;
    }
    let p = |n: String| dir.join(n).display().to_string();
    topo.spawn(
        &format!("stunnel-b{label}"),
        NS_B,
        stunnel,
        &[&p(name("stunnel-b", "conf"))],
    )?;
    topo.spawn(
        &format!("stunnel-a{label}"),
        NS_A,
        stunnel,
        &[&p(name("stunnel-a", "conf"))],
    )?;
    topo.spawn(
        &format!("haproxy-b{label}"),
        NS_B,
        haproxy,
        &["-db", "-f", &p(name("haproxy-b", "cfg"))],
    )?;
    topo.spawn(
        &format!("haproxy-a{label}"),
        NS_A,
        haproxy,
        &["-db", "-f", &p(name("haproxy-a", "cfg"))],
    )
}

struct Path_ {
    name: &'static str,
    addr: SocketAddr,
}

fn run(args: RunArgs) -> Result<()> {
    let (dir, meshfed) = topo::scratch("tunnel")?;
    let me = std::env::current_exe()?;
    let stunnel = need("stunnel4", "stunnel4")?;
    let haproxy = need("haproxy", "haproxy")?;

    let mut topo = Topo::setup(args.loopback, dir.clone())?;
    let b = topo.b;
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let server = SocketAddr::new(
        if topo.netns {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            lo
        },
        5001,
    );
    topo.spawn("server", NS_B, &me, &["serve", &server.to_string()])?;

    // --- meshfed: east (A) imports bench.demo:5001 from west (B)
    // Admin ports, scraped from A for the QUIC path figures: west's on B's address, east's
    // on A's loopback.
    let (west_admin, east_admin) = (SocketAddr::new(b, 15090), SocketAddr::new(lo, 15091));
    topo.gateways(
        &meshfed,
        |w| {
            let mut w = w.export("bench.demo", 5001, vec![SocketAddr::new(lo, 5001)]);
            w.admin = Some(west_admin);
            w.workers = args.workers;
            w
        },
        |e| {
            let mut e = e.import("bench.demo", 5001, "west", SocketAddr::new(lo, 16000));
            e.admin = Some(east_admin);
            e.transport = Some("default: quic".into());
            e.workers = args.workers;
            e
        },
    )?;
    // The same over h2 (a second pair; west on B's port 15444, TCP).
    topo.gateway_pair(
        &meshfed,
        "-h2",
        SocketAddr::new(b, 15444),
        |w| {
            let mut w = w.export("bench.demo", 5001, vec![SocketAddr::new(lo, 5001)]);
            w.admin = Some(SocketAddr::new(b, 15092));
            w.workers = args.workers;
            w
        },
        |e| {
            let mut e = e.import("bench.demo", 5001, "west", SocketAddr::new(lo, 16003));
            e.admin = Some(SocketAddr::new(lo, 15093));
            e.workers = args.workers;
            e.transport = Some(match args.h2_connections {
                Some(n) => format!("default: h2\nh2_connections: {n}"),
                None => "default: h2".into(),
            });
            e
        },
    )?;

    // --- TLS peers: mutual TLS 1.3 with certificates from one bench CA
    let ca = Ca::generate(
        &TrustDomain::new("bench.example.org")?,
        Duration::from_secs(86400),
    )?;
    let ca_pem = dir.join("peer-ca.pem");
    meshfed_identity::ca::write_file(
        &ca_pem,
        meshfed_identity::ca::der_to_pem("CERTIFICATE", ca.cert()).as_bytes(),
        0o644,
    )?;
    let mut combined = Vec::new();
    for who in ["client", "server"] {
        let svid = ca.issue(
            &SpiffeId::new(&format!("spiffe://bench.example.org/{who}"))?,
            Duration::from_secs(86400),
        )?;
        let (c, k) = (
            dir.join(format!("{who}.pem")),
            dir.join(format!("{who}.key")),
        );
        svid.save(&c, &k)?;
        let both = dir.join(format!("{who}-combined.pem"));
        meshfed_identity::ca::write_file(
            &both,
            format!("{}{}", svid.cert_pem(), svid.key_pem()).as_bytes(),
            0o600,
        )?;
        combined.push((c, k, both));
    }
    let certs = PeerCerts {
        client: combined[0].clone(),
        server: combined[1].clone(),
        ca: ca_pem.clone(),
    };
    spawn_tls_peers(
        &mut topo,
        &stunnel,
        &haproxy,
        &certs,
        "",
        b,
        [16001, 16002],
        [16101, 16102],
        args.workers,
    )?;

    let all = [
        Path_ {
            name: "meshfed",
            addr: SocketAddr::new(lo, 16000),
        },
        Path_ {
            name: "meshfed-h2",
            addr: SocketAddr::new(lo, 16003),
        },
        Path_ {
            name: "stunnel",
            addr: SocketAddr::new(lo, 16001),
        },
        Path_ {
            name: "haproxy",
            addr: SocketAddr::new(lo, 16002),
        },
        Path_ {
            name: "direct",
            addr: SocketAddr::new(b, 5001),
        },
    ];
    let wanted: Vec<&str> = args.paths.split(',').collect();
    let paths: Vec<&Path_> = all.iter().filter(|p| wanted.contains(&p.name)).collect();
    for p in &paths {
        load(&topo, p.addr, "wait", 1, 0.0, 0.0)
            .with_context(|| format!("{} path not up", p.name))?;
        // One round trip proves the whole path (meshfed: the QUIC connection is up).
        load(&topo, p.addr, "capacity", 1, 0.2, 0.0).with_context(|| {
            format!(
                "{} path does not carry data; logs in {}",
                p.name,
                dir.display()
            )
        })?;
    }
    println!("topology: {}", topo.describe());
    match args.workers {
        Some(n) => {
            println!("threads: {n} per meshfed gateway (workers) and per haproxy (nbthread)")
        }
        None => println!("threads: one per core for meshfed gateways and haproxy (their defaults)"),
    }
    println!(
        "paths: client → {{meshfed egress→QUIC→ingress | meshfed-h2 egress→h2/TLS/TCP→ingress | stunnel→TLS→stunnel | haproxy→TLS→haproxy | direct}} → server\n"
    );

    let secs = args.secs;
    let mut res = std::collections::BTreeMap::<(&str, &str), f64>::new();
    let measure = |label: &str,
                   key: &'static str,
                   kind: &str,
                   n: usize,
                   secs: f64,
                   rate: f64,
                   field: &str,
                   unit: &str,
                   res: &mut std::collections::BTreeMap<(&str, &'static str), f64>|
     -> Result<()> {
        println!("{label}");
        for p in &paths {
            let v = load(&topo, p.addr, kind, n, secs, rate)?;
            let x = v[field].as_f64().unwrap_or(f64::NAN);
            println!("  {:<8} {:>10.2} {unit}   {v}", p.name, x);
            res.insert((p.name, key), x);
        }
        Ok(())
    };
    // Every path carries one second of bulk data first, unrecorded: the first figure
    // measured then finds each path as the later ones do (connections up, QUIC's path
    // MTU found, congestion windows open, pages faulted in).
    for p in &paths {
        load(&topo, p.addr, "throughput", 1, 1.0, 0.0)?;
    }
    measure(
        "(a) bulk throughput, 1 stream",
        "tput1",
        "throughput",
        1,
        secs,
        0.0,
        "gbps",
        "Gbit/s",
        &mut res,
    )?;
    measure(
        "(a) bulk throughput, 16 streams",
        "tput16",
        "throughput",
        16,
        secs,
        0.0,
        "gbps",
        "Gbit/s",
        &mut res,
    )?;
    measure(
        "(b) new connections: connect, 64 B round trip, close (16 workers)",
        "conn",
        "connrate",
        16,
        secs,
        0.0,
        "per_sec",
        "conn/s",
        &mut res,
    )?;
    measure(
        "    1 KiB request/response capacity, closed loop, 16 connections",
        "cap",
        "capacity",
        16,
        secs.min(3.0),
        0.0,
        "rps",
        "req/s",
        &mut res,
    )?;
    let slowest = paths
        .iter()
        .filter_map(|p| res.get(&(p.name, "cap")))
        .fold(f64::INFINITY, |a, &b| a.min(b));
    let (rate, why) = match args.latency_rate {
        Some(r) => (r.max(1.0), "--latency-rate"),
        None => ((slowest * 0.6).max(100.0), "60% of the slowest path"),
    };
    let lat_secs = (secs + 1.0).max(3.0);
    println!(
        "(c) 1 KiB request/response latency at {rate:.0} req/s ({why}), open loop, 64 connections"
    );
    for p in &paths {
        let quic_before =
            (p.name == "meshfed").then(|| quic_figures(&topo, east_admin, west_admin));
        let v = load(&topo, p.addr, "latency", 64, lat_secs, rate)?;
        if let Some(before) = quic_before {
            let after = quic_figures(&topo, east_admin, west_admin);
            print_quic_path(&before, &after);
        }
        let (p50, p99) = (
            v["p50_us"].as_f64().unwrap_or(f64::NAN),
            v["p99_us"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "  {:<8} p50 {:>7.0} µs  p99 {:>7.0} µs   {v}",
            p.name, p50, p99
        );
        res.insert((p.name, "p50"), p50);
        res.insert((p.name, "p99"), p99);
    }

    // (e) What each gateway costs at a fixed 1,000 req/s of 1 KiB: CPU (utime + stime
    // from /proc) over the run, and RSS at its end, for each transport's pair.
    println!("(e) each gateway's CPU and RSS at a fixed 1000 req/s of 1 KiB (64 connections)");
    for (path, label) in [("meshfed", ""), ("meshfed-h2", "-h2")] {
        let Some(p) = paths.iter().find(|p| p.name == path) else {
            continue;
        };
        let pids: Vec<u32> = ["west", "east"]
            .iter()
            .filter_map(|side| topo.pid(&format!("meshfed-{side}{label}")))
            .collect();
        let before: Vec<f64> = pids.iter().map(|&pid| cpu_secs(pid)).collect();
        let t0 = Instant::now();
        let v = load(&topo, p.addr, "latency", 64, lat_secs, 1000.0)?;
        let wall = t0.elapsed().as_secs_f64();
        let vcpu: Vec<f64> = pids
            .iter()
            .zip(&before)
            .map(|(&pid, b)| (cpu_secs(pid) - b) / wall)
            .collect();
        let rss: Vec<f64> = pids.iter().map(|&pid| rss_mib(pid)).collect();
        let rps = v["n"].as_f64().unwrap_or(f64::NAN) / lat_secs;
        println!(
            "  {path:<10} west {:.3} vCPU {:.1} MiB, east {:.3} vCPU {:.1} MiB at {rps:.0} req/s (load process lifetime {wall:.1} s)",
            vcpu.first().copied().unwrap_or(f64::NAN),
            rss.first().copied().unwrap_or(f64::NAN),
            vcpu.get(1).copied().unwrap_or(f64::NAN),
            rss.get(1).copied().unwrap_or(f64::NAN),
        );
        // Per gateway: the mean of the two; RSS: the larger.
        res.insert(
            (path, "vcpu_per_krps"),
            vcpu.iter().sum::<f64>() / vcpu.len().max(1) as f64,
        );
        res.insert(
            (path, "rss_mib"),
            rss.iter().copied().fold(f64::NAN, f64::max),
        );
    }

    // (d) The same 16-stream bulk run with 2 % of the packets arriving at B dropped
    // (nftables `numgen random` in mfb-b, every path alike); needs the namespaces.
    if topo.netns {
        let rules = "table inet mfb_loss {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    iifname != \"lo\" meta l4proto { udp, tcp } numgen random mod 100 < 2 drop\n  }\n}\n";
        let file = dir.join("loss.nft");
        std::fs::write(&file, rules)?;
        let nft = need("nft", "nftables")?;
        let st = topo.cmd(NS_B, &nft).arg("-f").arg(&file).status()?;
        anyhow::ensure!(st.success(), "nft -f {}", file.display());
        let r = measure(
            "(d) bulk throughput, 16 streams, 2 % random loss on the link into B (nftables)",
            "loss16",
            "throughput",
            16,
            secs,
            0.0,
            "gbps",
            "Gbit/s",
            &mut res,
        );
        let _ = topo
            .cmd(NS_B, &nft)
            .args(["delete", "table", "inet", "mfb_loss"])
            .status();
        r?;
    } else {
        println!("(d) loss row skipped: it needs the network namespaces (root)");
    }

    // (f) A long path: 16-stream goodput through a user-space delay relay (2 x delay_ms
    // RTT), with its own gateway pairs and TLS peers dialing B's address behind it.
    if topo.netns && args.delay_ms > 0 {
        topo.delay_path(args.delay_ms)?;
        let bd = IpAddr::V4(B_DELAYED);
        for (label, port, import, t) in
            [("-dq", 15445, 16020, "quic"), ("-dh2", 15446, 16023, "h2")]
        {
            topo.gateway_pair(
                &meshfed,
                label,
                SocketAddr::new(bd, port),
                |w| {
                    let mut w = w.export("bench.demo", 5001, vec![SocketAddr::new(lo, 5001)]);
                    w.workers = args.workers;
                    w
                },
                |e| {
                    let mut e = e.import("bench.demo", 5001, "west", SocketAddr::new(lo, import));
                    e.transport = Some(format!("default: {t}"));
                    e.workers = args.workers;
                    e
                },
            )?;
        }
        spawn_tls_peers(
            &mut topo,
            &stunnel,
            &haproxy,
            &certs,
            "-d",
            bd,
            [16021, 16022],
            [16121, 16122],
            args.workers,
        )?;
        let delayed = [
            ("meshfed", SocketAddr::new(lo, 16020)),
            ("meshfed-h2", SocketAddr::new(lo, 16023)),
            ("stunnel", SocketAddr::new(lo, 16021)),
            ("haproxy", SocketAddr::new(lo, 16022)),
            ("direct", SocketAddr::new(bd, 5001)),
        ];
        // The RTT as ping sees it (the relay's own cost included).
        let ping = topo
            .cmd(NS_A, &need("ping", "iputils-ping")?)
            .args(["-q", "-c", "5", "-i", "0.2", &B_DELAYED.to_string()])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_owned()
            })
            .unwrap_or_default();
        println!(
            "(f) bulk throughput, 16 streams, {} ms RTT through a user-space delay relay (python, TUN; it caps every path); ping: {ping}",
            2 * args.delay_ms
        );
        for (name, addr) in delayed {
            if !paths.iter().any(|p| p.name == name) {
                continue;
            }
            load(&topo, addr, "wait", 1, 0.0, 0.0)?;
            load(&topo, addr, "capacity", 1, 0.5, 0.0)
                .with_context(|| format!("{name} over the delay path"))?;
            let v = load(&topo, addr, "throughput", 16, secs + 2.0, 0.0)?;
            let x = v["gbps"].as_f64().unwrap_or(f64::NAN);
            println!("  {name:<10} {x:>8.3} Gbit/s   {v}");
            res.insert((name, "delay16"), x);
        }
    }

    let get = |path: &str, key: &str| res.get(&(path, key)).copied().unwrap_or(f64::NAN);
    let best = |key: &str, higher_better: bool| {
        let (s, h) = (get("stunnel", key), get("haproxy", key));
        if higher_better { s.max(h) } else { s.min(h) }
    };
    println!();
    println!("ratios vs the better of stunnel/haproxy (same run):");
    // Per transport, then the old lines for the better of the two.
    let mut lines: Vec<(String, f64)> = Vec::new();
    for (t, path) in [("quic", "meshfed"), ("h2", "meshfed-h2")] {
        let added = |p: &str| get(p, "p50") - get("direct", "p50");
        for (k, v) in [
            (
                "throughput_ratio_vs_best_peer",
                get(path, "tput16") / best("tput16", true),
            ),
            (
                "single_stream_ratio_vs_best_peer",
                get(path, "tput1") / best("tput1", true),
            ),
            (
                "connrate_ratio_vs_best_peer",
                get(path, "conn") / best("conn", true),
            ),
            (
                "p99_ratio_vs_best_peer",
                get(path, "p99") / best("p99", false),
            ),
            ("added_p50_ratio_vs_haproxy", added(path) / added("haproxy")),
            (
                "loss2_goodput_ratio",
                get(path, "loss16") / get(path, "tput16"),
            ),
            (
                "delay_goodput_ratio_vs_best_peer",
                get(path, "delay16") / best("delay16", true),
            ),
            ("vcpu_per_krps", get(path, "vcpu_per_krps")),
            ("rss_mib", get(path, "rss_mib")),
        ] {
            lines.push((format!("tunnel_{t}_{k}"), v));
        }
    }
    let better = |key: &str, higher: bool| {
        let (q, h) = (get("meshfed", key), get("meshfed-h2", key));
        if q.is_nan() {
            h
        } else if h.is_nan() {
            q
        } else if higher {
            q.max(h)
        } else {
            q.min(h)
        }
    };
    for (k, v) in [
        (
            "tunnel_throughput_ratio_vs_best_peer",
            better("tput16", true) / best("tput16", true),
        ),
        (
            "tunnel_single_stream_ratio_vs_best_peer",
            better("tput1", true) / best("tput1", true),
        ),
        (
            "tunnel_connrate_ratio_vs_best_peer",
            better("conn", true) / best("conn", true),
        ),
        (
            "tunnel_p99_ratio_vs_best_peer",
            better("p99", false) / best("p99", false),
        ),
        (
            "tunnel_added_p50_us",
            better("p50", false) - get("direct", "p50"),
        ),
        (
            "tunnel_loss2_goodput_ratio",
            get("meshfed", "loss16") / get("meshfed", "tput16"),
        ),
        (
            "tunnel_loss2_peer_goodput_ratio",
            best("loss16", true) / best("tput16", true),
        ),
        (
            "tunnel_loss2_ratio_vs_best_peer",
            get("meshfed", "loss16") / best("loss16", true),
        ),
    ] {
        lines.push((k.to_owned(), v));
    }
    println!("logs and configs: {}", dir.display());
    drop(topo);
    for (k, v) in lines {
        println!("{k}: {v:.3}");
    }
    Ok(())
}
