//! caller-bench: what it costs a client to prove who it is at the egress (`caller_mtls`).
//!
//! Every connection is a new TCP connection, a TLS 1.3 handshake presenting a workload
//! SVID (ECDSA P-256), one 64-byte echo, and a close, from `--clients` concurrent loops
//! for `--secs`. The paths, in the same run, alternating for `--rounds`:
//! - `meshfed-mtls`: client → east egress (`caller_mtls: true`) ══QUIC══▶ west → echo;
//! - `meshfed-plain`: the same import without caller mTLS (a plain TCP client);
//! - `haproxy-mtls`: client → haproxy terminating TLS with the same client-certificate
//!   check (`verify required`, the same CA) → echo: the same job at one hop, by a proxy
//!   nobody here wrote;
//! - `meshfed-authz`: the mTLS path to a service in a namespace with `--policies` Istio
//!   AuthorizationPolicies (parsed by meshfed's parser, as `meshfed register` takes
//!   them) at the far ingress: half DENY policies naming other principals, half ALLOW
//!   policies each naming one principal, the client's last (every open scans them all);
//! - `haproxy-acl`: haproxy-mtls with the same job, authorizing the client certificate
//!   against a list of `--policies` entries (`tcp-request content reject unless
//!   { ssl_c_sha1,hex -m str -f allowed.lst }`: upper-case hex, the client's last).
//!
//! Prints each figure with the peer's, then the ratios; the last lines are `name: value`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use meshfed_identity::{BundleSet, Ca, PeerPolicy, SpiffeId, SpiffeVerifier, Svid};
use meshfed_lab::{self as lab, ConfigBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value_t = 4)]
    secs: u64,
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// AuthorizationPolicies (and haproxy ACL entries) on the authz paths.
    #[arg(long, default_value_t = 1000)]
    policies: usize,
}

/// `n` AuthorizationPolicies for namespace `ns`, one YAML document each: half DENY
/// policies for other principals, half ALLOW policies each naming one principal,
/// `allowed` in the last.
fn policies_yaml(ns: &str, n: usize, allowed: &str) -> Vec<String> {
    let mut docs = Vec::new();
    for i in 0..n {
        let (action, principal) = if i % 2 == 0 {
            ("DENY", format!("east.example.org/ns/blocked-{i}/sa/job"))
        } else if i + 1 >= n.saturating_sub(1) {
            ("ALLOW", allowed.trim_start_matches("spiffe://").to_owned())
        } else {
            ("ALLOW", format!("east.example.org/ns/team-{i}/sa/app"))
        };
        docs.push(format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p{i}\n  namespace: {ns}\nspec:\n  action: {action}\n  rules:\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n"
        ));
    }
    docs
}

/// How a client connects.
#[derive(Clone)]
enum Client {
    Plain,
    Tls(Arc<rustls::ClientConfig>),
}

#[derive(Default)]
struct Figures {
    conns: u64,
    errors: u64,
    lat_us: Vec<u64>,
}

impl Figures {
    fn rate(&self, secs: f64) -> f64 {
        self.conns as f64 / secs
    }
    fn p(&self, q: f64) -> u64 {
        if self.lat_us.is_empty() {
            return 0;
        }
        let mut v = self.lat_us.clone();
        v.sort_unstable();
        v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
    }
}

async fn one(addr: SocketAddr, client: &Client) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let payload = [7u8; 64];
    let mut back = [0u8; 64];
    match client {
        Client::Plain => {
            let mut s = tcp;
            s.write_all(&payload).await?;
            s.read_exact(&mut back).await?;
        }
        Client::Tls(cfg) => {
            let name = rustls::pki_types::ServerName::try_from("gateway")?;
            let mut s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await?;
            s.write_all(&payload).await?;
            s.read_exact(&mut back).await?;
        }
    }
    anyhow::ensure!(back == payload, "echo differs");
    Ok(())
}

async fn measure(addr: SocketAddr, client: Client, clients: usize, secs: u64) -> Figures {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut f = Figures::default();
            while Instant::now() < end {
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), one(addr, &client)).await {
                    Ok(Ok(())) => {
                        f.conns += 1;
                        f.lat_us.push(t.elapsed().as_micros() as u64);
                    }
                    _ => f.errors += 1,
                }
            }
            f
        }));
    }
    let mut all = Figures::default();
    for t in tasks {
        if let Ok(f) = t.await {
            all.conns += f.conns;
            all.errors += f.errors;
            all.lat_us.extend(f.lat_us);
        }
    }
    all
}

async fn echo_server() -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// haproxy terminating TLS with a client-certificate check, in front of `echo`; with
/// `acl`, a second frontend at that address that also authorizes the client
/// certificate's fingerprint against `allowed.lst`.
fn haproxy(
    dir: &Path,
    listen: SocketAddr,
    acl: SocketAddr,
    echo: SocketAddr,
) -> Result<std::process::Child> {
    let cfg = dir.join("haproxy.cfg");
    let bind = format!(
        "ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
        dir.join("haproxy.pem").display(),
        dir.join("ca.pem").display()
    );
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind {listen} {bind}\n  default_backend b\n\
             frontend acl\n  bind {acl} {bind}\n  tcp-request content reject unless {{ ssl_c_sha1,hex -m str -f {} }}\n  default_backend b\n\
             backend b\n  server s {echo}\n",
            dir.join("allowed.lst").display()
        ),
    )?;
    std::process::Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("haproxy (apt-get install haproxy)")
}

async fn wait_port(addr: SocketAddr) -> Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{addr} never listened")
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!("meshfed-bench-caller-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let west = lab::make_site(&dir, "west", "west.example.org")?;
    let east = lab::make_site(&dir, "east", "east.example.org")?;
    let echo = echo_server().await?;
    let (port, authz_port) = (free_port()?, free_port()?);
    let west_gw = meshfed_gateway::start(meshfed_gateway::GatewayConfig::load(
        &ConfigBuilder::default()
            .export("echo.bench", port, vec![echo])
            .export("echo.authz", authz_port, vec![echo])
            .peer(&east, None)
            .write(&west)?,
    )?)
    .await?;
    let plain_l: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let plain_gw = meshfed_gateway::start(meshfed_gateway::GatewayConfig::load(
        &ConfigBuilder::default()
            .peer(&west, Some(west_gw.quic_addr))
            .import("echo.bench", port, "west", plain_l)
            .write(&east)?,
    )?)
    .await?;
    // The same site's second gateway (its own directory and SVID) with caller mTLS.
    let east2 = lab::site_with_ca(&dir.join("mtls"), "east", &Ca::load(&east.dir.join("ca"))?)?;
    let mtls_l: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let authz_l: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mtls_gw = meshfed_gateway::start(meshfed_gateway::GatewayConfig::load(
        &ConfigBuilder {
            caller_mtls: true,
            ..Default::default()
        }
        .peer(&west, Some(west_gw.quic_addr))
        .import("echo.bench", port, "west", mtls_l)
        .import("echo.authz", authz_port, "west", authz_l)
        .write(&east2)?,
    )?)
    .await?;

    // The workload's SVID, and haproxy's files: the same CA, the gateway's server SVID.
    let east_ca = Ca::load(&east.dir.join("ca"))?;
    let workload: Svid = east_ca.issue(
        &SpiffeId::new("spiffe://east.example.org/ns/shop/sa/frontend")?,
        Duration::from_secs(3600),
    )?;
    let gw_svid = Svid::load(&east2.cert, &east2.key)?;
    std::fs::write(
        dir.join("haproxy.pem"),
        gw_svid.cert_pem() + &gw_svid.key_pem(),
    )?;
    std::fs::write(dir.join("ca.pem"), der_pem(east_ca.cert()))?;
    // The policies, parsed as `meshfed register` parses them, at west's ingress; and
    // haproxy's list of the same length, the client's fingerprint last.
    // One file holds at most 1024 documents: registered as several files.
    let mut policies = Vec::new();
    for file in policies_yaml("authz", cli.policies, workload.id.as_str()).chunks(1000) {
        let reg = meshfed_istio::service_entry::parse(&file.concat())
            .map_err(|e| anyhow::anyhow!("policies: {e}"))?;
        policies.extend(reg.policies);
    }
    anyhow::ensure!(
        policies.len() == cli.policies,
        "{} policies parsed",
        policies.len()
    );
    west_gw.set_authorization_policies(policies);
    let fp = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &workload.chain[0]);
    let mut list: String = (1..cli.policies)
        .map(|i| format!("{:040X}\n", i as u128 * 0x9e37_79b9_7f4a_7c15))
        .collect();
    list.push_str(
        &fp.as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>(),
    );
    list.push('\n');
    std::fs::write(dir.join("allowed.lst"), list)?;
    let ha_l: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let acl_l: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut ha = haproxy(&dir, ha_l, acl_l, echo)?;
    wait_port(ha_l).await?;
    wait_port(acl_l).await?;

    let bundles: BundleSet = [east_ca.bundle(1)].into_iter().collect();
    let verifier = SpiffeVerifier::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundles)),
        PeerPolicy::Only([gw_svid.id.clone()].into()),
    );
    let tls = Client::Tls(Arc::new(meshfed_identity::tls::client_config(
        Arc::new(meshfed_identity::tls::SvidResolver::new(&workload)?),
        verifier,
        &[],
    )?));
    // Warm up every path (peer connections, haproxy workers).
    for (addr, c) in [
        (mtls_l, tls.clone()),
        (plain_l, Client::Plain),
        (ha_l, tls.clone()),
        (authz_l, tls.clone()),
        (acl_l, tls.clone()),
    ] {
        one(addr, &c)
            .await
            .with_context(|| format!("warm-up {addr}"))?;
    }

    println!(
        "caller bench: {} clients, {} s per path, {} rounds; each connection: TCP + (TLS 1.3 with a client SVID) + 64-byte echo",
        cli.clients, cli.secs, cli.rounds
    );
    let paths = [
        ("meshfed-mtls", mtls_l, tls.clone()),
        ("meshfed-plain", plain_l, Client::Plain),
        ("haproxy-mtls", ha_l, tls.clone()),
        ("meshfed-authz", authz_l, tls.clone()),
        ("haproxy-acl", acl_l, tls.clone()),
    ];
    let mut rates: Vec<Vec<f64>> = vec![vec![]; paths.len()];
    let mut p99s: Vec<Vec<u64>> = vec![vec![]; paths.len()];
    for round in 0..cli.rounds {
        for (i, (name, addr, client)) in paths.iter().enumerate() {
            let f = measure(*addr, client.clone(), cli.clients, cli.secs).await;
            let rate = f.rate(cli.secs as f64);
            println!(
                "round {round}: {name:<14} {rate:>8.0} conn/s  p50 {:>6} µs  p99 {:>6} µs  errors {}",
                f.p(0.5),
                f.p(0.99),
                f.errors
            );
            rates[i].push(rate);
            p99s[i].push(f.p(0.99));
        }
    }
    let _ = ha.kill();
    let _ = ha.wait();
    for g in [mtls_gw, plain_gw, west_gw] {
        g.shutdown().await;
    }
    let range = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.3}–{hi:.3}")
    };
    let ratio = |a: usize, b: usize| -> Vec<f64> {
        rates[a].iter().zip(&rates[b]).map(|(x, y)| x / y).collect()
    };
    let mtls_vs_plain = ratio(0, 1);
    let mtls_vs_haproxy = ratio(0, 2);
    println!("\nratios per round (same run):");
    println!(
        "  meshfed-mtls / meshfed-plain conn/s: {}",
        range(&mtls_vs_plain)
    );
    println!(
        "  meshfed-mtls / haproxy-mtls  conn/s: {}",
        range(&mtls_vs_haproxy)
    );
    let authz_cost = ratio(3, 0);
    let acl_cost = ratio(4, 2);
    let authz_vs_haproxy = ratio(3, 4);
    println!(
        "  meshfed-authz / meshfed-mtls conn/s: {} ({} policies)",
        range(&authz_cost),
        cli.policies
    );
    println!(
        "  haproxy-acl   / haproxy-mtls conn/s: {} ({} entries)",
        range(&acl_cost),
        cli.policies
    );
    println!(
        "  meshfed-authz / haproxy-acl  conn/s: {}",
        range(&authz_vs_haproxy)
    );
    println!("logs and configs: {}", dir.display());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "caller_mtls_connrate_ratio_vs_plain: {:.3}",
        mean(&mtls_vs_plain)
    );
    println!(
        "caller_mtls_connrate_ratio_vs_haproxy: {:.3}",
        mean(&mtls_vs_haproxy)
    );
    println!(
        "caller_mtls_p99_us: {}",
        p99s[0].iter().max().copied().unwrap_or(0)
    );
    println!("authz_policies: {}", cli.policies);
    println!(
        "authz_connrate_ratio_vs_no_policies: {:.3}",
        mean(&authz_cost)
    );
    println!("authz_haproxy_acl_ratio_vs_no_acl: {:.3}", mean(&acl_cost));
    println!(
        "authz_connrate_ratio_vs_haproxy_acl: {:.3}",
        mean(&authz_vs_haproxy)
    );
    println!(
        "authz_p99_us: {}",
        p99s[3].iter().max().copied().unwrap_or(0)
    );
    Ok(())
}

fn der_pem(der: &[u8]) -> String {
    meshfed_identity::ca::der_to_pem("CERTIFICATE", der)
}
