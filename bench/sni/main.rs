//! sni-bench: TLS passthrough routed by SNI (a VirtualService's `tls` routes) through
//! meshfed, against an haproxy pair doing the same job, and direct, in one run.
//!
//! Real processes on loopback: a federation, four sites (east imports over QUIC, south
//! over the h2 transport; west and north export), nginx as the TLS endpoints (one
//! `ssl` server block per site, TLS 1.3, a certificate for `*.db.example` from a bench
//! CA), and an haproxy pair. The paths, each ending at west's nginx:
//! - `direct`: client → nginx;
//! - `meshfed-sni`: client → east's egress, a `tls` port whose TLS routes send SNI
//!   `a.db.example` to west and `b.db.example` to north (a ServiceEntry with protocol
//!   TLS registered at west) ══QUIC══▶ west → nginx;
//! - `meshfed-l4`: the same gateways, a `tcp` port of west's to the same nginx (no SNI
//!   read, no routes): what reading the ClientHello and routing by it adds;
//! - `meshfed-sni-tcp`, `meshfed-l4-tcp`: the same two through south, over the h2
//!   transport (TLS over TCP, as haproxy's pair);
//! - `haproxy`: client → haproxy A (`mode tcp`, `tcp-request inspect-delay`,
//!   `req_ssl_sni` choosing the west or north backend) ══mTLS (the sites'
//!   certificates)══▶ haproxy B (west's, `verify required`) → nginx. A and B are
//!   processes of their own, as meshfed's gateways are, `nbthread` as their `workers`.
//!
//! The client is this process: `--workers` tasks, each in a loop connecting, making a
//! full TLS 1.3 handshake with SNI `a.db.example` (rustls, no resumption, the
//! endpoint's certificate verified against the bench CA), one HTTP/1.1 request, the
//! answer to its end (it must come from west), close. Per path and round: TLS
//! connections per second, each connection's time p50/p99 at that load, and the CPU the
//! path's proxy processes used per connection (from `/proc`). Prints every figure with
//! the peer's, then the ratios with their range over rounds; the last lines are
//! `name: value` (the headline takes the worse transport).

#[allow(dead_code)] // wait_for: http-bench's
#[path = "../common/procs.rs"]
mod procs;
#[allow(dead_code)] // need(): the peers this benchmark installs
#[path = "../common/topo.rs"]
mod topo;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use meshfed_lab::{ConfigBuilder, SiteFiles};
use procs::{Procs, cpu_secs, free_port, run, spawn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Cli {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Client tasks, each one connection at a time.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Threads per proxy process: each gateway's `workers` and each haproxy's
    /// `nbthread`.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

const SNI: &str = "a.db.example";

/// West registers the service and its routes: a TLS port by SNI, and a plain TCP port
/// to the same endpoint (the L4 reference).
fn routes(tls_port: u16, raw_port: u16, nginx_west: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: bench}}
spec:
  hosts: [a.db.example, b.db.example]
  ports: [{{number: {tls_port}, name: tls, protocol: TLS}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {nginx_west}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: raw, namespace: bench}}
spec:
  hosts: [raw.db.example]
  ports: [{{number: {raw_port}, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {nginx_west}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: bench}}
spec:
  hosts: [a.db.example, b.db.example]
  tls:
  - match: [{{sniHosts: [a.db.example]}}]
    route: [{{destination: {{host: a.db.example, subset: west}}}}]
  - match: [{{sniHosts: [b.db.example]}}]
    route: [{{destination: {{host: b.db.example, subset: north}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: bench}}
spec:
  host: a.db.example
  subsets:
  - {{name: west, labels: {{topology.istio.io/cluster: west}}}}
  - {{name: north, labels: {{topology.istio.io/cluster: north}}}}
"#
    )
}

/// nginx with a TLS 1.3 server block per site answering its name.
fn nginx(dir: &Path, cert: &Path, key: &Path, blocks: &[(&str, u16)]) -> Result<Child> {
    let mut servers = String::new();
    for (site, port) in blocks {
        servers.push_str(&format!(
            "  server {{ listen 127.0.0.1:{port} ssl reuseport backlog=4096; ssl_certificate {}; ssl_certificate_key {}; \
             ssl_protocols TLSv1.3; ssl_session_tickets off; ssl_session_cache off; location / {{ return 200 \"{site}\\n\"; }} }}\n",
            cert.display(),
            key.display()
        ));
    }
    procs::nginx(dir, &servers)
}

/// The haproxy pair: A at `front` (`mode tcp`, choosing a backend by the ClientHello's
/// SNI), over mTLS with the sites' certificates to B's frontends (west's and north's),
/// each in front of its nginx block; `threads` as `nbthread`.
fn haproxy_pair(
    dir: &Path,
    (a, b): (&SiteFiles, &SiteFiles),
    front: u16,
    b_ports: (u16, u16),
    nginx_ports: (u16, u16),
    threads: usize,
) -> Result<Vec<Child>> {
    let ((a_pem, a_ca), (b_pem, b_ca)) =
        (procs::haproxy_pems(dir, a)?, procs::haproxy_pems(dir, b)?);
    let head = format!(
        "global\n  maxconn 8000\n  nbthread {threads}\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
    );
    let backend = |name: &str, port: u16| {
        format!(
            "backend {name}\n  server {name} 127.0.0.1:{port} ssl verify required ca-file {} crt {}\n",
            b_ca.display(),
            a_pem.display()
        )
    };
    let side_a = format!(
        "frontend a\n  bind 127.0.0.1:{front}\n  tcp-request inspect-delay 10s\n  tcp-request content accept if {{ req_ssl_hello_type 1 }}\n  \
         use_backend west if {{ req_ssl_sni -i a.db.example }}\n  use_backend north if {{ req_ssl_sni -i b.db.example }}\n{}{}",
        backend("west", b_ports.0),
        backend("north", b_ports.1)
    );
    let side_b = |name: &str, bind: u16, nginx: u16| {
        format!(
            "frontend b_{name}\n  bind 127.0.0.1:{bind} ssl crt {} ca-file {} verify required\n  default_backend n_{name}\nbackend n_{name}\n  server n 127.0.0.1:{nginx}\n",
            b_pem.display(),
            a_ca.display()
        )
    };
    let mut children = Vec::new();
    for (name, cfg) in [
        ("a", format!("{head}{side_a}")),
        (
            "west",
            format!("{head}{}", side_b("west", b_ports.0, nginx_ports.0)),
        ),
        (
            "north",
            format!("{head}{}", side_b("north", b_ports.1, nginx_ports.1)),
        ),
    ] {
        let path = dir.join(format!("haproxy-{name}.cfg"));
        std::fs::write(&path, cfg)?;
        run(Command::new("haproxy").arg("-c").arg("-f").arg(&path)).context("haproxy -c")?;
        children.push(
            spawn(
                Command::new("haproxy").arg("-f").arg(&path).arg("-db"),
                &dir.join(format!("haproxy-{name}.log")),
            )
            .context("haproxy (apt-get install haproxy)")?,
        );
    }
    Ok(children)
}

/// The client's TLS: TLS 1.3, the bench CA, no session resumption (every connection a
/// full handshake, on every path).
fn client_tls(ca: &Path) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// One connection: TCP, the TLS handshake with [`SNI`], one request, the answer to its
/// end, which must be west's.
async fn one(tls: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(SNI)?.to_owned();
    let mut s = tls.connect(name, tcp).await?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: a.db.example\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::with_capacity(256);
    // nginx closes without close_notify after `connection: close` on some builds: what
    // was read counts.
    let _ = s.read_to_end(&mut out).await;
    ensure!(
        out.starts_with(b"HTTP/1.1 200") && out.ends_with(b"west\n"),
        "unexpected answer: {:?}",
        String::from_utf8_lossy(&out)
    );
    Ok(())
}

/// `workers` clients in a closed loop for `secs`: connections per second, each
/// connection's time (µs), failures (the first error kept).
async fn load(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    workers: usize,
    secs: u64,
) -> (f64, Vec<u64>, usize, Option<String>) {
    let until = Instant::now() + Duration::from_secs(secs);
    let began = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let tls = tls.clone();
            tokio::spawn(async move {
                let (mut times, mut failed, mut first) = (Vec::new(), 0, None);
                while Instant::now() < until {
                    let t = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(10), one(&tls, addr)).await {
                        Ok(Ok(())) => times.push(t.elapsed().as_micros() as u64),
                        Ok(Err(e)) => {
                            failed += 1;
                            first.get_or_insert(e.to_string());
                        }
                        Err(_) => {
                            failed += 1;
                            first.get_or_insert("timed out".into());
                        }
                    }
                }
                (times, failed, first)
            })
        })
        .collect();
    let (mut times, mut failed, mut first) = (Vec::new(), 0, None);
    for t in tasks {
        if let Ok((ts, f, e)) = t.await {
            times.extend(ts);
            failed += f;
            first = first.or(e);
        }
    }
    let rate = times.len() as f64 / began.elapsed().as_secs_f64();
    times.sort_unstable();
    (rate, times, failed, first)
}

fn pct(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let meshfed = std::env::current_exe()?
        .parent()
        .context("bench binary directory")?
        .join("meshfed");
    ensure!(
        meshfed.exists(),
        "{} missing: cargo build --release --workspace",
        meshfed.display()
    );
    for (program, package) in [("nginx", "nginx"), ("haproxy", "haproxy")] {
        topo::need(program, package)?;
    }
    let dir = std::env::temp_dir().join(format!("meshfed-bench-sni-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut procs = Procs(Vec::new());

    // Endpoints.
    let lo = [127, 0, 0, 1];
    let (ca, cert, key) = procs::endpoint_certs(&dir, "*.db.example")?;
    let (west_tls, north_tls) = (free_port(lo)?, free_port(lo)?);
    procs.0.push(nginx(
        &dir,
        &cert,
        &key,
        &[("west", west_tls), ("north", north_tls)],
    )?);
    let tls = client_tls(&ca)?;
    let direct = SocketAddr::from((lo, west_tls));
    let mut up = false;
    for _ in 0..100 {
        if one(&tls, direct).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(up, "nginx did not answer over TLS; see {}", dir.display());

    // The federation and its sites; west registers the service and its routes.
    let sites = procs::federation(
        &meshfed,
        &dir,
        &["east", "west", "north", "south"],
        &mut procs,
    )
    .await?;
    let (east, west, north, south) = (&sites[0], &sites[1], &sites[2], &sites[3]);
    let import_ip = [127, 0, 0, 2];
    let (tls_port, raw_port) = (free_port(import_ip)?, free_port(import_ip)?);
    let file = dir.join("routes.yaml");
    std::fs::write(&file, routes(tls_port, raw_port, west_tls))?;
    run(Command::new(&meshfed)
        .args(["register", "-f"])
        .arg(&file)
        .arg("--dir")
        .arg(&west.dir))?;
    let mut gateway_pid = std::collections::BTreeMap::new();
    let fed_cfg = |s: &SiteFiles, ip: [u8; 4]| ConfigBuilder {
        federation: Some((s.dir.clone(), ip.into())),
        workers: Some(cli.threads),
        ..Default::default()
    };
    let tcp_ip = [127, 0, 0, 5];
    for (s, cfg) in [
        (west, fed_cfg(west, [127, 0, 0, 3])),
        (
            north,
            fed_cfg(north, [127, 0, 0, 4])
                .export("db.bench", tls_port, vec![(lo, north_tls).into()])
                .speaks("db.bench", tls_port, "tls"),
        ),
        (east, {
            let mut c = fed_cfg(east, import_ip);
            c.transport = Some("default: quic".into());
            c
        }),
        (south, {
            let mut c = fed_cfg(south, tcp_ip);
            c.transport = Some("default: h2".into());
            c
        }),
    ] {
        let path = cfg.write(s)?;
        let child = spawn(
            Command::new(&meshfed)
                .args(["gateway", "run", "-c"])
                .arg(&path),
            &dir.join(format!("{}.log", s.site)),
        )?;
        gateway_pid.insert(s.site.clone(), child.id());
        procs.0.push(child);
    }
    let at = |ip: [u8; 4], p: u16| SocketAddr::from((ip, p));
    for addr in [
        at(import_ip, tls_port),
        at(import_ip, raw_port),
        at(tcp_ip, tls_port),
        at(tcp_ip, raw_port),
    ] {
        let mut ok = false;
        for _ in 0..300 {
            if one(&tls, addr).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            ok,
            "{addr} never answered from west; logs in {}",
            dir.display()
        );
    }

    // The haproxy pair, with the sites' certificates (east's as the client's).
    let (front, b_west, b_north) = (free_port(lo)?, free_port(lo)?, free_port(lo)?);
    let pair = haproxy_pair(
        &dir,
        (east, west),
        front,
        (b_west, b_north),
        (west_tls, north_tls),
        cli.threads,
    )?;
    let haproxy_pids: Vec<u32> = pair.iter().map(Child::id).collect();
    procs.0.extend(pair);
    let front = at(lo, front);
    let mut ok = false;
    for _ in 0..100 {
        if one(&tls, front).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(ok, "haproxy never answered; logs in {}", dir.display());

    let pids = |sites: &[&str]| -> Vec<u32> {
        sites
            .iter()
            .filter_map(|s| gateway_pid.get(*s).copied())
            .collect()
    };
    let paths: Vec<(&str, SocketAddr, Vec<u32>)> = vec![
        ("direct", direct, vec![]),
        ("haproxy", front, haproxy_pids.clone()),
        (
            "meshfed-sni",
            at(import_ip, tls_port),
            pids(&["east", "west"]),
        ),
        (
            "meshfed-l4",
            at(import_ip, raw_port),
            pids(&["east", "west"]),
        ),
        (
            "meshfed-sni-tcp",
            at(tcp_ip, tls_port),
            pids(&["south", "west"]),
        ),
        (
            "meshfed-l4-tcp",
            at(tcp_ip, raw_port),
            pids(&["south", "west"]),
        ),
    ];
    println!(
        "sni bench: {} client tasks, a full TLS 1.3 handshake (SNI {SNI}) and one request per connection, {} s per run, {} rounds; nginx endpoints; proxies at {} threads",
        cli.workers, cli.secs, cli.rounds, cli.threads
    );
    let mut rate: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut p99: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut cpu: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..cli.rounds {
        for (name, addr, pids) in &paths {
            let before = cpu_secs(pids);
            let (r, times, failed, first) = load(&tls, *addr, cli.workers, cli.secs).await;
            let n = times.len() as f64;
            let us = (cpu_secs(pids) - before) * 1e6 / n.max(1.0);
            println!(
                "round {round} {name:<16} {r:>8.0} conn/s  p50 {:>6} µs  p99 {:>6} µs  failed {failed}  proxies' CPU {us:>6.0} µs/connection",
                pct(&times, 0.5),
                pct(&times, 0.99)
            );
            if failed > 0 {
                bail!(
                    "{name}: {failed} connections failed (first: {})",
                    first.unwrap_or_default()
                );
            }
            rate.entry(name).or_default().push(r);
            p99.entry(name).or_default().push(pct(&times, 0.99) as f64);
            if !pids.is_empty() {
                cpu.entry(name).or_default().push(us);
            }
        }
    }
    drop(procs);

    use procs::{range, ratio};
    println!("\nratios per round (same run), range and mean:");
    let mut lines = Vec::new();
    let mut headline = (f64::MAX, f64::MAX, f64::MAX, f64::MIN);
    for (transport, sni, l4, tag) in [
        ("quic", "meshfed-sni", "meshfed-l4", "quic_"),
        ("h2 transport", "meshfed-sni-tcp", "meshfed-l4-tcp", "tcp_"),
    ] {
        let vs_ha = ratio(&rate[sni], &rate["haproxy"]);
        let vs_direct = ratio(&rate[sni], &rate["direct"]);
        let vs_l4 = ratio(&rate[sni], &rate[l4]);
        let p99_ha = ratio(&p99[sni], &p99["haproxy"]);
        let cpu_ha = ratio(&cpu[sni], &cpu["haproxy"]);
        for (what, v) in [
            (format!("{sni} / haproxy conn/s"), &vs_ha),
            (format!("{sni} / direct conn/s"), &vs_direct),
            (format!("{sni} / {l4} conn/s"), &vs_l4),
            (format!("{sni} / haproxy p99"), &p99_ha),
            (
                format!("{sni} / haproxy proxies' CPU per connection"),
                &cpu_ha,
            ),
        ] {
            let (lo, hi, m) = range(v);
            println!("  ({transport}) {what}: {lo:.3}–{hi:.3} (mean {m:.3})");
        }
        let (a, b, c, d, e) = (
            range(&vs_ha).2,
            range(&vs_direct).2,
            range(&vs_l4).2,
            range(&p99_ha).2,
            range(&cpu_ha).2,
        );
        lines.push(format!("sni_{tag}connrate_ratio_vs_haproxy: {a:.3}"));
        lines.push(format!("sni_{tag}connrate_ratio_vs_direct: {b:.3}"));
        lines.push(format!("sni_{tag}overhead_vs_l4: {c:.3}"));
        lines.push(format!("sni_{tag}p99_ratio_vs_haproxy: {d:.3}"));
        lines.push(format!(
            "sni_{tag}cpu_per_connection_ratio_vs_haproxy: {e:.3}"
        ));
        headline = (
            headline.0.min(a),
            headline.1.min(b),
            headline.2.min(c),
            headline.3.max(d),
        );
    }
    println!("logs and configs: {}", dir.display());
    for l in lines {
        println!("{l}");
    }
    println!("sni_connrate_ratio_vs_haproxy: {:.3}", headline.0);
    println!("sni_connrate_ratio_vs_direct: {:.3}", headline.1);
    println!("sni_overhead_vs_l4: {:.3}", headline.2);
    println!("sni_p99_ratio_vs_haproxy: {:.3}", headline.3);
    Ok(())
}
