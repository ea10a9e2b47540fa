//! http-bench: meshfed's HTTP path against an haproxy pair doing the same job, with
//! h2load (nghttp2-client) as the client, for HTTP/1.1 and h2 (prior knowledge).
//!
//! One run starts, as real processes on loopback: a federation, four sites (east imports
//! over QUIC, south over the h2 transport (TCP); west and north export), nginx as the
//! endpoints (one server block per site, HTTP/1.1 and h2c listeners), and an haproxy
//! pair. The paths:
//! - `direct`: h2load → nginx (west's server block);
//! - `meshfed-l7`: h2load → east's egress (`protocol: http`) ══tunnel══▶ west or north
//!   → nginx, with a VirtualService registered at west splitting 50/50 between a subset
//!   at west and one at north, and retries on (the default 2, under the budget);
//! - `meshfed-l4`: the same gateways, a `tcp` port of west's (bytes, no routing), to
//!   nginx's listener for the client's protocol;
//! - `meshfed-l7-tcp`, `meshfed-l4-tcp`: the same two through south, whose links to
//!   west and north are the h2 transport (`transport: {default: h2}`: TLS over TCP, as
//!   haproxy's pair) instead of QUIC;
//! - `haproxy`: h2load → haproxy A (`mode http`, a 50/50 `roundrobin` backend, `retries 2`,
//!   `retry-on conn-failure empty-response 502 503 504`, `option redispatch`,
//!   `http-reuse always`) ══mTLS (the sites' certificates; h2 for h2 clients, pooled
//!   HTTP/1.1 for HTTP/1.1 clients)══▶ haproxy B (one frontend per site, `verify
//!   required`) → nginx; A, B-west and B-north are processes of their own, one per
//!   site as meshfed's gateways are (`nbthread 2` each, as the gateways run a worker
//!   per core);
//! - `haproxy-1proc`: the same pair with A and both B frontends in one process (the
//!   hop between them stays mTLS over loopback), reported beside it;
//! - `hyper-pair`: the floor ([`floor`]): the same pair's shape built on hyper, h2,
//!   tokio and rustls alone (h2 links over mTLS, pooled HTTP/1.1 to nginx), with none of
//!   meshfed's code; meshfed-l7 and meshfed-l7-tcp are reported against it (what
//!   meshfed's own code costs) and it against haproxy (what the libraries cost), not in
//!   the headline;
//! - `meshfed-l7-tls`: h2load → east's egress ══QUIC══▶ west, whose gateway originates
//!   TLS to an HTTPS nginx block (an HTTP ServiceEntry registered at west with a
//!   DestinationRule `tls: SIMPLE` and a bench CA), against `haproxy-tls`: A ══mTLS══▶
//!   B-west → the same block (`ssl verify required`, the same CA and SNI). Their p99 is
//!   taken at 60 % of the slower of the two, apart from the others, and their lines
//!   (`http_P_tls_...`) are not in the headline.
//!
//! For each protocol and round: requests per second at fixed concurrency (`--clients`,
//! and `--streams` per connection on h2), with the CPU the path's proxy processes used
//! per request in that run (the three gateways, or the haproxy processes, from
//! `/proc`), then p50/p99 at 60 % of the slowest path's capacity in that round
//! (`h2load --rps`, latencies from `--log-file`). Prints every
//! figure with the peer's, then ratios with their range over rounds, per transport; the
//! last lines are `name: value` (the headline lines take the worse protocol and the
//! worse transport).

mod floor;
#[path = "../common/procs.rs"]
mod procs;
#[allow(dead_code)] // need(): the peers this benchmark installs
#[path = "../common/topo.rs"]
mod topo;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use meshfed_lab::{ConfigBuilder, SiteFiles};
use procs::{Procs, cpu_secs, free_port, haproxy_pair, run, spawn, wait_for};

/// The gateway's allocator, so that the `hyper-pair` floor ([`floor`]) runs on it too.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Cli {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Client connections.
    #[arg(long, default_value_t = 32)]
    clients: u32,
    /// Concurrent streams per h2 connection.
    #[arg(long, default_value_t = 8)]
    streams: u32,
    /// Set everything up, print each path's URLs and the processes' ids, and wait for
    /// Ctrl-C instead of measuring (to load and profile a path by hand).
    #[arg(long)]
    hold: bool,
    /// Threads per proxy process: each gateway's `workers` and each haproxy's
    /// `nbthread` (default: 2, the cores of the machine this was written on).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Run as one process of the `hyper-pair` floor (the bench starts them).
    #[arg(long, hide = true)]
    floor: Option<String>,
}

/// `curl` of `url`: the body, or `None`.
fn curl(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether 20 requests to `url` were answered by both sites' nginx blocks (the 50/50
/// split is in force).
fn both_sites_answer(url: &str) -> bool {
    let seen: std::collections::BTreeSet<String> = (0..20).filter_map(|_| curl(url)).collect();
    seen.len() == 2
}

/// nginx with a server block per site: HTTP/1.1 and h2c listeners answering `site`; and
/// an HTTPS (HTTP/1.1 over TLS 1.3) block at `tls` answering `west-tls`.
fn nginx(dir: &Path, blocks: &[(&str, u16, u16)], tls: (u16, &Path, &Path)) -> Result<Child> {
    let mut servers = String::new();
    for (site, h1, h2c) in blocks {
        servers.push_str(&format!(
            "  server {{ listen 127.0.0.1:{h1} reuseport backlog=4096; listen 127.0.0.1:{h2c} http2 reuseport backlog=4096; \
             keepalive_requests 1000000; location / {{ return 200 \"{site}\\n\"; }} }}\n"
        ));
    }
    let (port, cert, key) = tls;
    servers.push_str(&format!(
        "  server {{ listen 127.0.0.1:{port} ssl reuseport backlog=4096; ssl_certificate {}; ssl_certificate_key {}; \
         ssl_protocols TLSv1.3; keepalive_requests 1000000; location / {{ return 200 \"west-tls\\n\"; }} }}\n",
        cert.display(),
        key.display()
    ));
    procs::nginx(dir, &servers)
}

const ROUTES: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: bench}
spec:
  hosts: [web.bench]
  http:
  - route:
    - {destination: {host: web.bench, subset: west}, weight: 50}
    - {destination: {host: web.bench, subset: north}, weight: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: bench}
spec:
  host: web.bench
  subsets:
  - {name: west, labels: {topology.istio.io/cluster: west}}
  - {name: north, labels: {topology.istio.io/cluster: north}}
"#;

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Self::H1 => "h1",
            Self::H2 => "h2",
        }
    }
}

/// One h2load run: requests per second, and the latencies (µs) when `log`.
struct Load {
    out: String,
    rps: f64,
    failed: u64,
    lat_us: Vec<u64>,
}

fn h2load(
    cli: &Cli,
    proto: Proto,
    url: &str,
    rps_per_client: Option<f64>,
    log: Option<&Path>,
) -> Result<Load> {
    let mut cmd = Command::new("h2load");
    cmd.args(["-t", "1", "-c", &cli.clients.to_string()]).args([
        "-D",
        &cli.secs.to_string(),
        "--warm-up-time",
        "1",
    ]);
    match proto {
        Proto::H1 => cmd.arg("--h1"),
        Proto::H2 => cmd.args(["-m", &cli.streams.to_string()]),
    };
    if let Some(r) = rps_per_client {
        cmd.arg(format!("--rps={:.2}", r.max(0.1)));
    }
    if let Some(l) = log {
        cmd.arg(format!("--log-file={}", l.display()));
    }
    cmd.arg(url);
    let out = run(&mut cmd)?;
    // "finished in 5.00s, 12345.60 req/s, 1.23MB/s" and
    // "requests: N total, N started, N done, N succeeded, F failed, E errored, T timeout"
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.trim_end_matches(" req/s").parse::<f64>().ok())
        .with_context(|| format!("h2load output: {out}"))?;
    let field = |name: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with("requests:"))
            .and_then(|l| {
                l.split(", ")
                    .find(|p| p.ends_with(name))
                    .and_then(|p| p.split_whitespace().next().or(Some("0")))
                    .and_then(|n| n.trim_start_matches("requests: ").parse().ok())
            })
            .unwrap_or(0)
    };
    let failed = field("failed") + field("errored") + field("timeout");
    let status = out
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_default()
        .to_owned();
    let non2xx: u64 = status
        .split(", ")
        .skip(1)
        .filter_map(|p| p.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let mut lat_us = Vec::new();
    if let Some(l) = log {
        // Each line: start time (µs), status, duration (µs).
        for line in std::fs::read_to_string(l)?.lines() {
            let mut f = line.split('\t');
            let (_, status, dur) = (f.next(), f.next(), f.next());
            if status == Some("200")
                && let Some(d) = dur.and_then(|d| d.parse::<u64>().ok())
            {
                lat_us.push(d);
            }
        }
        lat_us.sort_unstable();
    }
    Ok(Load {
        out,
        rps,
        failed: failed + non2xx,
        lat_us,
    })
}

/// Prints each ratio's range over the rounds after `label`, and adds its mean to `lines`
/// as `{prefix}{name}: mean`.
fn report(lines: &mut Vec<String>, label: &str, prefix: &str, ratios: &[(&str, &[f64], &str)]) {
    for (what, v, name) in ratios {
        let (lo, hi, m) = procs::range(v);
        println!("  {label} {what}: {lo:.3}–{hi:.3} (mean {m:.3})");
        lines.push(format!("{prefix}{name}: {m:.3}"));
    }
}

fn pct(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(spec) = &cli.floor {
        return floor::Spec::parse(spec)?.run();
    }
    tokio::runtime::Runtime::new()?.block_on(bench(cli))
}

async fn bench(cli: Cli) -> Result<()> {
    let meshfed = std::env::current_exe()?
        .parent()
        .context("bench binary directory")?
        .join("meshfed");
    ensure!(
        meshfed.exists(),
        "{} missing: cargo build --release --workspace",
        meshfed.display()
    );
    for (program, package) in [
        ("h2load", "nghttp2-client"),
        ("nginx", "nginx"),
        ("haproxy", "haproxy"),
        ("curl", "curl"),
    ] {
        topo::need(program, package)?;
    }
    let dir = std::env::temp_dir().join(format!("meshfed-bench-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut procs = Procs(Vec::new());

    // Endpoints.
    let lo = [127, 0, 0, 1];
    let (west_h1, west_h2c, north_h1, north_h2c, west_tls) = (
        free_port(lo)?,
        free_port(lo)?,
        free_port(lo)?,
        free_port(lo)?,
        free_port(lo)?,
    );
    const TLS_HOST: &str = "web-tls.bench.example";
    let (ep_ca, ep_cert, ep_key) = procs::endpoint_certs(&dir, TLS_HOST)?;
    procs.0.push(nginx(
        &dir,
        &[("west", west_h1, west_h2c), ("north", north_h1, north_h2c)],
        (west_tls, &ep_cert, &ep_key),
    )?);
    wait_for("nginx", || {
        curl(&format!("http://127.0.0.1:{west_h1}/")).is_some()
    })
    .await?;

    // The federation and its sites.
    let sites = procs::federation(
        &meshfed,
        &dir,
        &["east", "west", "north", "south"],
        &mut procs,
    )
    .await?;
    let (east, west, north, south) = (&sites[0], &sites[1], &sites[2], &sites[3]);
    let import_ip = [127, 0, 0, 2];
    let (web, raw_h1, raw_h2, web_tls) = (
        free_port(import_ip)?,
        free_port(import_ip)?,
        free_port(import_ip)?,
        free_port(import_ip)?,
    );
    // West's routes, and an HTTP service whose endpoint is HTTPS (TLS originated by
    // west's gateway, Istio's DestinationRule `tls: SIMPLE`).
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "{ROUTES}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: web-tls, namespace: bench}}\nspec:\n  hosts: [{TLS_HOST}]\n  ports: [{{number: {web_tls}, name: http, protocol: HTTP, targetPort: {west_tls}}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web-tls, namespace: bench}}\nspec:\n  host: {TLS_HOST}\n  trafficPolicy:\n    tls: {{mode: SIMPLE, caCertificates: {}}}\n",
            ep_ca.display()
        ),
    )?;
    run(Command::new(&meshfed)
        .args(["register", "-f"])
        .arg(&routes)
        .arg("--dir")
        .arg(&west.dir))?;

    // Each gateway's process, by site: the proxies whose CPU a path costs.
    let mut gateway_pid = std::collections::BTreeMap::new();
    let fed_cfg = |s: &SiteFiles, ip: [u8; 4]| ConfigBuilder {
        federation: Some((s.dir.clone(), ip.into())),
        workers: Some(cli.threads),
        ..Default::default()
    };
    for (s, ip, h1, h2c) in [
        (west, [127, 0, 0, 3], west_h1, west_h2c),
        (north, [127, 0, 0, 4], north_h1, north_h2c),
    ] {
        let mut c = fed_cfg(s, ip)
            .export("web.bench", web, vec![([127, 0, 0, 1], h1).into()])
            .speaks("web.bench", web, "http");
        if s.site == "west" {
            c = c
                .export("raw-h1.bench", raw_h1, vec![([127, 0, 0, 1], h1).into()])
                .export("raw-h2.bench", raw_h2, vec![([127, 0, 0, 1], h2c).into()]);
        }
        let cfg = c.write(s)?;
        let child = spawn(
            Command::new(&meshfed)
                .args(["gateway", "run", "-c"])
                .arg(&cfg),
            &dir.join(format!("{}.log", s.site)),
        )?;
        gateway_pid.insert(s.site.clone(), child.id());
        procs.0.push(child);
    }
    // East imports over QUIC, south over the h2 transport (TLS over TCP).
    let tcp_ip = [127, 0, 0, 5];
    for (s, ip, transport) in [(east, import_ip, "quic"), (south, tcp_ip, "h2")] {
        let mut c = fed_cfg(s, ip);
        c.transport = Some(format!("default: {transport}"));
        let cfg = c.write(s)?;
        let child = spawn(
            Command::new(&meshfed)
                .args(["gateway", "run", "-c"])
                .arg(&cfg),
            &dir.join(format!("{}.log", s.site)),
        )?;
        gateway_pid.insert(s.site.clone(), child.id());
        procs.0.push(child);
    }
    let ip = |p: u16| SocketAddr::from((import_ip, p));
    let tcp = |p: u16| SocketAddr::from((tcp_ip, p));
    let l7 = format!("http://{}/", ip(web));
    let l7_tcp = format!("http://{}/", tcp(web));
    // Both sites answer through the split once east and south have the routes.
    for (site, url) in [("east", &l7), ("south", &l7_tcp)] {
        wait_for(&format!("the split at {site}"), || both_sites_answer(url)).await?;
    }
    for a in [ip(raw_h1), tcp(raw_h1)] {
        wait_for("the L4 import", || curl(&format!("http://{a}/")).is_some()).await?;
    }
    let l7_tls = format!("http://{}/", ip(web_tls));
    wait_for("the HTTPS endpoint's import", || {
        curl(&l7_tls).is_some_and(|b| b == "west-tls\n")
    })
    .await?;

    // The haproxy pair, with the sites' certificates (east's as the client's): one
    // process per site (the headline peer), and all in one process.
    let mut fronts = Vec::new();
    let mut haproxy_pids: Vec<Vec<u32>> = Vec::new();
    for split in [true, false] {
        let (front_h1, front_h2, b_west, b_north) = (
            free_port(lo)?,
            free_port(lo)?,
            free_port(lo)?,
            free_port(lo)?,
        );
        let pair = haproxy_pair(
            &dir,
            (east, west),
            (front_h1, front_h2),
            &[("west", b_west, west_h1), ("north", b_north, north_h1)],
            "",
            (split, cli.threads),
            if split { "split" } else { "one" },
        )?;
        haproxy_pids.push(pair.iter().map(Child::id).collect());
        procs.0.extend(pair);
        let ha1 = format!("http://127.0.0.1:{front_h1}/");
        wait_for("haproxy", || both_sites_answer(&ha1)).await?;
        fronts.push((front_h1, front_h2));
    }
    let [(front_h1, front_h2), (one_h1, one_h2)] = fronts[..] else {
        bail!("two haproxy pairs");
    };
    // And one to the HTTPS endpoint: A ══mTLS══▶ B-west → nginx over TLS, verified.
    let (tls_h1, tls_h2, b_tls) = (free_port(lo)?, free_port(lo)?, free_port(lo)?);
    let pair = haproxy_pair(
        &dir,
        (east, west),
        (tls_h1, tls_h2),
        &[("west", b_tls, west_tls)],
        &format!(
            " ssl verify required ca-file {} sni str({TLS_HOST})",
            ep_ca.display()
        ),
        (true, cli.threads),
        "tls",
    )?;
    haproxy_pids.push(pair.iter().map(Child::id).collect());
    procs.0.extend(pair);
    wait_for("haproxy to the HTTPS endpoint", || {
        curl(&format!("http://127.0.0.1:{tls_h1}/")).is_some_and(|b| b == "west-tls\n")
    })
    .await?;

    // The hyper floor: A (east's SVID) ══mTLS h2══▶ B-west, B-north (theirs) → nginx,
    // one process each, on the libraries meshfed's L7 path uses and nothing else.
    let (floor_a, floor_west, floor_north) = (free_port(lo)?, free_port(lo)?, free_port(lo)?);
    let exe = std::env::current_exe()?;
    let mut floor_pids = Vec::new();
    let at = |p: u16| SocketAddr::from((lo, p));
    for (role, listen, ups, s, peers) in [
        (
            "a",
            floor_a,
            vec![at(floor_west), at(floor_north)],
            east,
            vec![west.bundle.as_path(), north.bundle.as_path()],
        ),
        (
            "b",
            floor_west,
            vec![at(west_h1)],
            west,
            vec![east.bundle.as_path()],
        ),
        (
            "b",
            floor_north,
            vec![at(north_h1)],
            north,
            vec![east.bundle.as_path()],
        ),
    ] {
        let spec = floor::Spec::json(role, at(listen), &ups, &s.cert, &s.key, &peers, cli.threads);
        let child = spawn(
            Command::new(&exe).arg("--floor").arg(spec),
            &dir.join(format!("floor-{}.log", s.site)),
        )?;
        floor_pids.push(child.id());
        procs.0.push(child);
    }
    let floor_url = format!("http://127.0.0.1:{floor_a}/");
    wait_for("the hyper floor", || both_sites_answer(&floor_url)).await?;

    println!(
        "http bench: h2load, {} connections ({} streams each on h2), {} s per run, {} rounds; nginx endpoints; 50/50 split over two sites on meshfed-l7 and haproxy",
        cli.clients, cli.streams, cli.secs, cli.rounds
    );
    // The proxy processes each path runs through (direct: none).
    let site_pids = |sites: &[&str]| -> Vec<u32> {
        sites
            .iter()
            .filter_map(|s| gateway_pid.get(*s).copied())
            .collect()
    };
    let proxies = |path: &str| -> Vec<u32> {
        match path {
            "haproxy" => haproxy_pids[0].clone(),
            "haproxy-1proc" => haproxy_pids[1].clone(),
            "haproxy-tls" => haproxy_pids[2].clone(),
            "hyper-pair" => floor_pids.clone(),
            "meshfed-l7-tls" => site_pids(&["east", "west"]),
            "meshfed-l4" | "meshfed-l7" => site_pids(&["east", "west", "north"]),
            "meshfed-l4-tcp" | "meshfed-l7-tcp" => site_pids(&["south", "west", "north"]),
            _ => Vec::new(),
        }
    };
    let paths = |proto: Proto| -> Vec<(&'static str, String)> {
        let (direct, ha, one, raw, ha_tls) = match proto {
            Proto::H1 => (west_h1, front_h1, one_h1, raw_h1, tls_h1),
            Proto::H2 => (west_h2c, front_h2, one_h2, raw_h2, tls_h2),
        };
        vec![
            ("direct", format!("http://127.0.0.1:{direct}/")),
            ("haproxy", format!("http://127.0.0.1:{ha}/")),
            ("haproxy-1proc", format!("http://127.0.0.1:{one}/")),
            ("hyper-pair", floor_url.clone()),
            ("meshfed-l4", format!("http://{}/", ip(raw))),
            ("meshfed-l7", l7.clone()),
            ("meshfed-l4-tcp", format!("http://{}/", tcp(raw))),
            ("meshfed-l7-tcp", l7_tcp.clone()),
            ("haproxy-tls", format!("http://127.0.0.1:{ha_tls}/")),
            ("meshfed-l7-tls", l7_tls.clone()),
        ]
    };
    if cli.hold {
        for proto in [Proto::H1, Proto::H2] {
            for (name, url) in paths(proto) {
                println!("{} {name:<14} {url}", proto.name());
            }
        }
        for (what, c) in ["nginx", "federation", "west", "north", "east", "south"]
            .iter()
            .zip(&procs.0)
        {
            println!("pid {what}: {}", c.id());
        }
        println!("holding (logs and configs: {}); Ctrl-C ends", dir.display());
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }
    // (proto, path) → per-round figures.
    let mut rps: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    let mut p50: std::collections::BTreeMap<(&str, &str), Vec<u64>> = Default::default();
    let mut p99: std::collections::BTreeMap<(&str, &str), Vec<u64>> = Default::default();
    let mut cpu: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for round in 0..cli.rounds {
        for proto in [Proto::H1, Proto::H2] {
            let mut cap = Vec::new();
            for (name, url) in paths(proto) {
                let pids = proxies(name);
                let before = cpu_secs(&pids);
                let began = Instant::now();
                let l = h2load(&cli, proto, &url, None, None)?;
                // CPU of the path's proxy processes over the run (warm-up included) per
                // request at the measured rate over the run's wall time.
                let us = (cpu_secs(&pids) - before) * 1e6 / (l.rps * began.elapsed().as_secs_f64());
                println!(
                    "round {round} {} {name:<14} capacity {:>9.0} req/s  failed {}  proxies' CPU {:>5.1} µs/request",
                    proto.name(),
                    l.rps,
                    l.failed,
                    us
                );
                if !pids.is_empty() {
                    cpu.entry((proto.name(), name)).or_default().push(us);
                }
                if l.failed > 0 {
                    bail!(
                        "{name} ({}): {} requests failed:\n{}",
                        proto.name(),
                        l.failed,
                        l.out
                    );
                }
                rps.entry((proto.name(), name)).or_default().push(l.rps);
                cap.push((name.ends_with("-tls"), l.rps));
            }
            // The HTTPS endpoint's two paths at 60 % of the slower of them; the others
            // at 60 % of the slowest of theirs.
            for (name, url) in paths(proto) {
                let tls = name.ends_with("-tls");
                let slowest = cap
                    .iter()
                    .filter(|(t, _)| *t == tls)
                    .map(|(_, r)| *r)
                    .fold(f64::MAX, f64::min);
                let target = slowest * 0.6;
                let log = dir.join(format!("lat-{}-{name}-{round}.log", proto.name()));
                let l = h2load(
                    &cli,
                    proto,
                    &url,
                    Some(target / f64::from(cli.clients)),
                    Some(&log),
                )?;
                let (a, b) = (pct(&l.lat_us, 0.5), pct(&l.lat_us, 0.99));
                println!(
                    "round {round} {} {name:<14} at {target:>7.0} req/s: p50 {a:>6} µs  p99 {b:>6} µs  ({} requests, failed {})",
                    proto.name(),
                    l.lat_us.len(),
                    l.failed
                );
                p50.entry((proto.name(), name)).or_default().push(a);
                p99.entry((proto.name(), name)).or_default().push(b);
            }
        }
    }
    drop(procs);

    use procs::{range, ratio};
    let f = |v: &[u64]| v.iter().map(|x| *x as f64).collect::<Vec<_>>();
    println!("\nratios per round (same run), range and mean:");
    let mut headline = (f64::MAX, f64::MIN, f64::MAX);
    let mut lines = Vec::new();
    // The QUIC lines keep their names (`http_P_...`); the h2 transport's say `_tcp_`.
    for (transport, l7_path, l4_path, tag) in [
        ("quic", "meshfed-l7", "meshfed-l4", ""),
        ("h2 transport", "meshfed-l7-tcp", "meshfed-l4-tcp", "tcp_"),
    ] {
        for proto in ["h1", "h2"] {
            let r = |p: &str| rps[&(proto, p)].clone();
            let rps_ha = ratio(&r(l7_path), &r("haproxy"));
            let p99_ha = ratio(&f(&p99[&(proto, l7_path)]), &f(&p99[&(proto, "haproxy")]));
            let l7_l4 = ratio(&r(l7_path), &r(l4_path));
            let cpu_ha = ratio(&cpu[&(proto, l7_path)], &cpu[&(proto, "haproxy")]);
            for (what, v) in [
                (format!("{l7_path} / haproxy req/s"), &rps_ha),
                (format!("{l7_path} / haproxy p99"), &p99_ha),
                (format!("{l7_path} / {l4_path} req/s"), &l7_l4),
                (
                    format!("{l7_path} / haproxy proxies' CPU per request"),
                    &cpu_ha,
                ),
            ] {
                let (lo, hi, m) = range(v);
                println!("  {proto} ({transport}) {what}: {lo:.3}–{hi:.3} (mean {m:.3})");
            }
            // The same against haproxy in one process (A and both B frontends).
            let rps_one = ratio(&r(l7_path), &r("haproxy-1proc"));
            let p99_one = ratio(
                &f(&p99[&(proto, l7_path)]),
                &f(&p99[&(proto, "haproxy-1proc")]),
            );
            for (what, v) in [
                (format!("{l7_path} / haproxy-1proc req/s"), &rps_one),
                (format!("{l7_path} / haproxy-1proc p99"), &p99_one),
            ] {
                let (lo, hi, m) = range(v);
                println!("  {proto} ({transport}) {what}: {lo:.3}–{hi:.3} (mean {m:.3})");
            }
            let (m1, m2, m3) = (range(&rps_ha).2, range(&p99_ha).2, range(&l7_l4).2);
            let (o1, o2) = (range(&rps_one).2, range(&p99_one).2);
            lines.push(format!(
                "http_{proto}_{tag}rps_ratio_vs_haproxy_1proc: {o1:.3}"
            ));
            lines.push(format!(
                "http_{proto}_{tag}p99_ratio_vs_haproxy_1proc: {o2:.3}"
            ));
            lines.push(format!("http_{proto}_{tag}rps_ratio_vs_haproxy: {m1:.3}"));
            lines.push(format!("http_{proto}_{tag}p99_ratio_vs_haproxy: {m2:.3}"));
            lines.push(format!("http_{proto}_{tag}l7_overhead_vs_l4: {m3:.3}"));
            lines.push(format!(
                "http_{proto}_{tag}cpu_per_request_ratio_vs_haproxy: {:.3}",
                range(&cpu_ha).2
            ));
            // Against the hyper floor: what meshfed's own code costs on those libraries.
            let rps_floor = ratio(&r(l7_path), &r("hyper-pair"));
            let cpu_floor = ratio(&cpu[&(proto, l7_path)], &cpu[&(proto, "hyper-pair")]);
            report(
                &mut lines,
                &format!("{proto} ({transport}) {l7_path} / hyper-pair"),
                &format!("http_{proto}_{tag}"),
                &[
                    ("req/s", &rps_floor, "rps_ratio_vs_hyper_pair"),
                    (
                        "proxies' CPU per request",
                        &cpu_floor,
                        "cpu_per_request_ratio_vs_hyper_pair",
                    ),
                ],
            );
            // The headline lines take the worse protocol and the worse transport.
            headline = (headline.0.min(m1), headline.1.max(m2), headline.2.min(m3));
        }
    }
    // The hyper floor against haproxy: what the libraries cost, before meshfed's code.
    for proto in ["h1", "h2"] {
        let r = |p: &str| rps[&(proto, p)].clone();
        let floor = (proto, "hyper-pair");
        report(
            &mut lines,
            &format!("{proto} (hyper floor) hyper-pair / haproxy"),
            &format!("http_{proto}_hyper_pair_"),
            &[
                (
                    "req/s",
                    &ratio(&r("hyper-pair"), &r("haproxy")),
                    "rps_ratio_vs_haproxy",
                ),
                (
                    "p99",
                    &ratio(&f(&p99[&floor]), &f(&p99[&(proto, "haproxy")])),
                    "p99_ratio_vs_haproxy",
                ),
                (
                    "proxies' CPU per request",
                    &ratio(&cpu[&floor], &cpu[&(proto, "haproxy")]),
                    "cpu_per_request_ratio_vs_haproxy",
                ),
            ],
        );
    }
    // The HTTPS endpoint: meshfed-l7-tls against haproxy-tls (not in the headline).
    for proto in ["h1", "h2"] {
        let r = |p: &str| rps[&(proto, p)].clone();
        let rps_ha = ratio(&r("meshfed-l7-tls"), &r("haproxy-tls"));
        let p99_ha = ratio(
            &f(&p99[&(proto, "meshfed-l7-tls")]),
            &f(&p99[&(proto, "haproxy-tls")]),
        );
        let cpu_ha = ratio(
            &cpu[&(proto, "meshfed-l7-tls")],
            &cpu[&(proto, "haproxy-tls")],
        );
        report(
            &mut lines,
            &format!("{proto} (HTTPS endpoint) meshfed-l7-tls / haproxy-tls"),
            &format!("http_{proto}_tls_"),
            &[
                ("req/s", &rps_ha, "rps_ratio_vs_haproxy"),
                ("p99", &p99_ha, "p99_ratio_vs_haproxy"),
                (
                    "proxies' CPU per request",
                    &cpu_ha,
                    "cpu_per_request_ratio_vs_haproxy",
                ),
            ],
        );
    }
    println!("logs and configs: {}", dir.display());
    for l in lines {
        println!("{l}");
    }
    println!("http_rps_ratio_vs_haproxy: {:.3}", headline.0);
    println!("http_p99_ratio_vs_haproxy: {:.3}", headline.1);
    println!("http_l7_overhead_vs_l4: {:.3}", headline.2);
    Ok(())
}
