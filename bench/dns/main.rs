//! bench/dns: `meshfed dns` beside Knot DNS, both loaded with the same names (a catalog
//! of many imported services, and the equivalent generated zone), queried by `dnsperf`
//! with the same query file, in one run. Peak QPS for each (alternating rounds, best
//! kept), then p99 latency for each at half of meshfed's peak rate, from dnsperf's
//! per-query latencies; then peak QPS over TCP (`dnsperf -m tcp`, four connections)
//! for each, in alternating rounds. The last lines are `name: value`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meshfed_catalog::catalog::{Export, ExportedPort, Protocol, SiteRecord};
use meshfed_catalog::{Catalog, Revision, ServiceName, SiteName};
use meshfed_identity::TrustDomain;

#[derive(Parser)]
#[command(about = "meshfed dns vs Knot DNS under dnsperf")]
struct Args {
    /// Imported services in the catalog (and A + SRV names in Knot's zone).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Seconds per peak-QPS run.
    #[arg(long, default_value_t = 6)]
    secs: u32,
    /// Alternating peak rounds per server.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// meshfed UDP workers and Knot UDP workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    // A port free for both UDP and TCP.
    for _ in 0..50 {
        let t = std::net::TcpListener::bind("127.0.0.1:0")?;
        let p = t.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port")
}

fn need(cmd: &str, package: &str) -> Result<()> {
    if Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()?
        .status
        .success()
    {
        return Ok(());
    }
    eprintln!("installing {package} for {cmd}");
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}"),
        ])
        .status()?
        .success();
    if !ok {
        bail!("{cmd} is missing: apt-get install -y {package}");
    }
    Ok(())
}

fn svc(i: usize) -> String {
    format!("svc{i}.shop")
}

/// The catalog `meshfed dns` answers from: west exports every service, east imports.
fn write_catalog(dir: &Path, n: usize) -> Result<()> {
    let mut cat = Catalog::default();
    for s in ["east", "west"] {
        let site = SiteName::new(s)?;
        cat.sites.insert(
            site.clone(),
            SiteRecord {
                site,
                trust_domain: TrustDomain::new(&format!("{s}.example.org"))?,
                gateway_addresses: vec!["127.0.0.1:15443".into()],
                up: true,
            },
        );
    }
    let west = SiteName::new("west")?;
    for i in 0..n {
        let service = ServiceName::parse(&svc(i))?;
        cat.exports.insert(
            (west.clone(), service.clone()),
            Export {
                endpoint_labels: Vec::new(),
                http_policy: None,
                service,
                ports: vec![ExportedPort {
                    app_protocol: Default::default(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                    name: Some("http".into()),
                }],
                ready_endpoints: 1,
                identities: vec![],
                locality: None,
                labels: BTreeMap::new(),
                hosts: vec![],
            },
        );
    }
    cat.revision = Revision(n as u64 + 2);
    std::fs::write(dir.join("catalog.json"), serde_json::to_vec(&cat)?)?;
    Ok(())
}

/// The same names as a zone file for Knot.
fn write_knot(dir: &Path, n: usize, port: u16, workers: usize) -> Result<PathBuf> {
    let mut z = String::from(
        "$ORIGIN clusterset.local.\n$TTL 5\n@ SOA ns hostmaster 1 60 10 3600 5\n@ NS ns\nns A 127.0.0.1\ndns-version TXT \"1.0.0\"\n",
    );
    for i in 0..n {
        let _ = writeln!(z, "svc{i}.shop.svc A 127.0.0.5");
        let _ = writeln!(
            z,
            "_http._tcp.svc{i}.shop.svc SRV 0 0 8080 svc{i}.shop.svc.clusterset.local."
        );
    }
    std::fs::write(dir.join("clusterset.local.zone"), z)?;
    let conf = format!(
        "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\n  udp-workers: {workers}\n  tcp-workers: {workers}\n  background-workers: 1\n\
         database:\n  storage: {d}\n\
         log:\n  - target: stderr\n    any: warning\n\
         template:\n  - id: default\n    storage: {d}\n    file: \"%s.zone\"\n    semantic-checks: off\n\
         zone:\n  - domain: clusterset.local\n",
        d = dir.display()
    );
    let path = dir.join("knot.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// The query file: 80 % A of existing services, 10 % SRV, 10 % names that do not exist.
fn write_queries(dir: &Path, n: usize) -> Result<PathBuf> {
    let mut q = String::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for k in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % n as u64) as usize;
        match k % 10 {
            0 => {
                let _ = writeln!(q, "_http._tcp.svc{i}.shop.svc.clusterset.local SRV");
            }
            1 => {
                let _ = writeln!(q, "nope{i}.shop.svc.clusterset.local A");
            }
            _ => {
                let _ = writeln!(q, "svc{i}.shop.svc.clusterset.local A");
            }
        }
    }
    let path = dir.join("queries.txt");
    std::fs::write(&path, q)?;
    Ok(path)
}

fn wait_answers(addr: SocketAddr, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("dig")
            .args([
                &format!("@{}", addr.ip()),
                "-p",
                &addr.port().to_string(),
                "+short",
                "+tries=1",
                "+time=1",
                name,
                "A",
            ])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == "127.0.0.5" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} never answered {name}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Perf {
    qps: f64,
    lost: f64,
    latencies: Vec<f64>,
}

fn dnsperf(
    addr: SocketAddr,
    queries: &Path,
    secs: u32,
    rate: Option<u64>,
    mode: &str,
) -> Result<Perf> {
    let mut cmd = Command::new("dnsperf");
    cmd.args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-m", mode])
        .arg("-d")
        .arg(queries)
        .args(["-l", &secs.to_string(), "-c", "4", "-q", "500"]);
    if let Some(r) = rate {
        cmd.args(["-Q", &r.to_string(), "-v"]);
    }
    let out = cmd.output().context("dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let qps = field("Queries per second").context("dnsperf printed no QPS")?;
    let lost = field("Queries lost").unwrap_or(0.0);
    let latencies = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    Ok(Perf {
        qps,
        lost,
        latencies,
    })
}

fn p99_ms(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * 0.99).round() as usize] * 1e3
}

fn main() -> Result<()> {
    let args = Args::parse();
    need("dnsperf", "dnsperf")?;
    need("knotd", "knot")?;
    need("dig", "dnsutils")?;
    let dir = std::env::temp_dir().join(format!("meshfed-dns-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let n = args.services;
    write_catalog(&dir, n)?;
    let queries = write_queries(&dir, n)?;

    let bin = std::env::current_exe()?.with_file_name("meshfed");
    let mport = free_port()?;
    let meshfed_addr: SocketAddr = ([127, 0, 0, 1], mport).into();
    let _meshfed = Proc(
        Command::new(&bin)
            .args(["dns", "--site", "east", "--dir"])
            .arg(&dir)
            .args([
                "--listen",
                &meshfed_addr.to_string(),
                "--import-address",
                "127.0.0.5",
                "--workers",
                &args.workers.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("meshfed.log"))?)
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?,
    );
    let kport = free_port()?;
    let knot_addr: SocketAddr = ([127, 0, 0, 1], kport).into();
    let conf = write_knot(&dir, n, kport, args.workers)?;
    let _knot = Proc(
        Command::new("knotd")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("knot.log"))?)
            .spawn()
            .context("starting knotd")?,
    );
    let probe = format!("svc{}.shop.svc.clusterset.local", n - 1);
    wait_answers(meshfed_addr, &probe).context("meshfed dns")?;
    wait_answers(knot_addr, &probe).context("knotd")?;
    println!(
        "dns bench: {n} services ({} names), 100k-query file (80% A, 10% SRV, 10% NXDOMAIN), {} UDP workers each, dnsperf -c 4 -q 500",
        2 * n + 3,
        args.workers
    );

    let (mut best_m, mut best_k) = (0.0f64, 0.0f64);
    for round in 0..args.rounds {
        let m = dnsperf(meshfed_addr, &queries, args.secs, None, "udp")?;
        let k = dnsperf(knot_addr, &queries, args.secs, None, "udp")?;
        println!(
            "round {round}: meshfed {:.0} QPS (lost {}), knot {:.0} QPS (lost {})",
            m.qps, m.lost, k.qps, k.lost
        );
        best_m = best_m.max(m.qps);
        best_k = best_k.max(k.qps);
    }
    let half = (best_m / 2.0) as u64;
    let m = dnsperf(meshfed_addr, &queries, 5, Some(half), "udp")?;
    let k = dnsperf(knot_addr, &queries, 5, Some(half), "udp")?;
    let (mp99, kp99) = (p99_ms(m.latencies), p99_ms(k.latencies));
    println!("peak: meshfed {best_m:.0} QPS, knot {best_k:.0} QPS");
    println!("p99 at {half} QPS (half of meshfed's peak): meshfed {mp99:.3} ms, knot {kp99:.3} ms");
    let (mut tcp_m, mut tcp_k) = (0.0f64, 0.0f64);
    let mut tcp_ratios = Vec::new();
    for round in 0..args.rounds {
        let m = dnsperf(meshfed_addr, &queries, args.secs, None, "tcp")?;
        let k = dnsperf(knot_addr, &queries, args.secs, None, "tcp")?;
        println!(
            "tcp round {round}: meshfed {:.0} QPS (lost {}), knot {:.0} QPS (lost {}), ratio {:.2}",
            m.qps,
            m.lost,
            k.qps,
            k.lost,
            m.qps / k.qps
        );
        tcp_ratios.push(m.qps / k.qps);
        tcp_m = tcp_m.max(m.qps);
        tcp_k = tcp_k.max(k.qps);
    }
    let (lo, hi) = tcp_ratios
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    println!(
        "tcp peak: meshfed {tcp_m:.0} QPS, knot {tcp_k:.0} QPS (per-round ratios {lo:.2}-{hi:.2})"
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!("dns_qps_ratio_vs_knot: {:.2}", best_m / best_k);
    println!("dns_p99_ms: {mp99:.3}");
    println!("dns_tcp_qps_ratio_vs_knot: {:.2}", tcp_m / tcp_k);
    Ok(())
}
