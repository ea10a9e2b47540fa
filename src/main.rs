//! `meshfed`: the one binary. This file parses the command line and calls into the
//! crates; the commands' logic lives in `identity`, `gateway` and the `demo` module.

mod demo;
mod signals;

/// The data plane slices big buffers and frees them as peers acknowledge; glibc returns
/// those pages to the kernel and faults them back in. mimalloc keeps them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use meshfed_identity::{BundleSet, Ca, SpiffeId, TrustDomain, ca};

#[derive(Parser)]
#[command(
    name = "meshfed",
    version,
    about = "Multi-cluster mesh gateway and federation service"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Certificate authority of a trust domain.
    #[command(subcommand)]
    Ca(CaCmd),
    /// SPIFFE trust bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// X.509-SVIDs.
    #[command(subcommand)]
    Svid(SvidCmd),
    /// The gateway (data plane).
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// The federation service (catalog and trust exchange).
    #[command(subcommand)]
    Federation(FederationCmd),
    /// This site's membership in a federation.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Prints the federation's sites: trust domains, lease, exports, imports, revisions.
    Status {
        /// The federation directory (`meshfed federation init --dir`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Kubernetes as a catalog source (MCS ServiceExport), run in the cluster beside the
    /// gateway; uses the in-cluster service account or the local kubeconfig.
    #[command(subcommand)]
    Kubernetes(KubernetesCmd),
    /// Serves federated DNS for a site from its gateway's catalog cache (to run DNS
    /// outside the gateway; inside it, use the gateway config's `dns` section).
    Dns {
        /// The site whose imports are answered.
        #[arg(long, required_unless_present = "kubernetes")]
        site: Option<String>,
        /// The site directory (`meshfed site join --dir`): its `catalog.json` is followed.
        #[arg(long, required_unless_present = "kubernetes")]
        dir: Option<PathBuf>,
        /// In a Kubernetes cluster: answer from its ServiceImports (the clusterset IPs of
        /// MCS), instead of a gateway's catalog cache.
        #[arg(long, conflicts_with_all = ["site", "dir", "import_address", "vip_range"])]
        kubernetes: bool,
        /// UDP and TCP.
        #[arg(long, default_value = "127.0.0.1:5353")]
        listen: std::net::SocketAddr,
        /// The gateway's `federation.import_address`: what A records point at
        /// (default 127.0.0.1).
        #[arg(long)]
        import_address: Option<std::net::IpAddr>,
        /// The gateway's `federation.vip_range`, if it has one: one address per import.
        #[arg(long)]
        vip_range: Option<String>,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Extra zones answered like clusterset.local (repeatable).
        #[arg(long)]
        zone: Vec<String>,
        /// Upstream resolver for every other name (off by default: REFUSED).
        #[arg(long)]
        forward: Option<std::net::SocketAddr>,
        /// UDP queries per second per client address.
        #[arg(long)]
        rate_limit: Option<u32>,
        /// UDP worker threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// Checks Istio ServiceEntry/WorkloadEntry YAML; prints what it would register and
    /// a warning for every field meshfed does not support yet.
    Validate {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Registers legacy services (Istio ServiceEntry/WorkloadEntry YAML) for this site:
    /// its gateway exports them. A file with any error registers nothing.
    Register {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The site directory (`meshfed site join --dir`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Removes registered services (by `name.namespace`, or every service registered
    /// from a file) from this site; its gateway stops exporting them.
    Unregister {
        /// Services to remove, as `name.namespace`.
        #[arg(required_unless_present = "file")]
        services: Vec<String>,
        /// Remove every service registered from this file.
        #[arg(short = 'f', long = "file", conflicts_with = "services")]
        file: Option<PathBuf>,
        /// The site directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Runs a federation and three sites on loopback, with live failover.
    Demo {
        /// Keep certificates and configs here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum FederationCmd {
    /// Creates a federation directory: its CA, its SVID and the operator SVID.
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serves the federation API: from the directory's embedded store, or as one of any
    /// number of replicas on etcd (`--etcd`).
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:15010")]
        listen: std::net::SocketAddr,
        /// Address written into join tokens (repeatable); default: the bound address.
        #[arg(long)]
        advertise: Vec<String>,
        /// Admin HTTP: /metrics, /ready, /live.
        #[arg(long, default_value = "127.0.0.1:15011")]
        admin: std::net::SocketAddr,
        /// A site whose gateways hold no Watch stream for this long is marked down.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
        /// etcd endpoints (comma-separated, e.g. `http://127.0.0.1:2379`): use etcd as the
        /// store instead of the embedded one.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// Key prefix in etcd; federations sharing an etcd need different prefixes.
        #[arg(long, default_value = meshfed_federation::store::mirror::DEFAULT_PREFIX)]
        etcd_prefix: String,
        /// The CA that signed etcd's certificate (PEM), for `https://` endpoints.
        #[arg(long, requires = "etcd")]
        etcd_ca: Option<PathBuf>,
        /// Client certificate (PEM) for etcd's `--client-cert-auth`.
        #[arg(long, requires_all = ["etcd", "etcd_key"])]
        etcd_cert: Option<PathBuf>,
        /// The client certificate's key (PEM).
        #[arg(long, requires_all = ["etcd", "etcd_cert"])]
        etcd_key: Option<PathBuf>,
        /// etcd user (etcd auth); the password comes from `--etcd-password-file`.
        #[arg(long, requires_all = ["etcd", "etcd_password_file"])]
        etcd_user: Option<String>,
        /// A file holding the etcd user's password (never on the command line).
        #[arg(long, requires = "etcd_user")]
        etcd_password_file: Option<PathBuf>,
        /// Start an empty embedded store when `store.json` is missing. Without it, a
        /// directory whose snapshot was lost is refused rather than served empty.
        #[arg(long, conflicts_with = "etcd")]
        init_store: bool,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Prints a one-time token that lets `--site` join (asks the running federation).
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        site: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Bind the site to this trust domain: a join with any other is refused. Without
        /// it, the site may join with any trust domain that no other site owns.
        #[arg(long)]
        trust_domain: Option<String>,
        /// Let the site join a trust domain that other sites already own (their bundles
        /// are merged). An explicit choice: the sites can then impersonate each other.
        #[arg(long, requires = "trust_domain")]
        share_trust_domain: bool,
    },
}

#[derive(Subcommand)]
enum SiteCmd {
    /// Joins the federation with a one-time token; writes federation.json and bundles/.
    Join {
        /// The site directory (ca/, gateway.pem, gateway.key).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        site: String,
        /// Where this site's gateways accept QUIC (repeatable).
        #[arg(long)]
        gateway_address: Vec<String>,
        token: String,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Creates a root CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        /// Root lifetime.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Issues an X.509-SVID (one URI SAN, not a CA, digitalSignature, server+client auth).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        spiffe_id: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Certificate chain output (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Private key output (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Prints the CA's trust bundle in SPIFFE JWKS form.
    Export {
        #[arg(long)]
        ca: PathBuf,
        /// spiffe_sequence; raise it whenever the authorities change.
        #[arg(long, default_value_t = 1)]
        sequence: u64,
    },
}

#[derive(Subcommand)]
enum SvidCmd {
    /// Verifies an X.509-SVID against trust bundles; prints the SPIFFE ID or the exact
    /// reason it is refused.
    Verify {
        /// A SPIFFE JWKS bundle file; repeat for several trust domains.
        #[arg(long = "bundle", required = true)]
        bundles: Vec<PathBuf>,
        /// Check the certificate for server use (default: client use).
        #[arg(long)]
        server: bool,
        cert: PathBuf,
    },
}

#[derive(Subcommand)]
enum GatewayCmd {
    /// Runs a gateway from a static YAML config until SIGTERM/SIGINT, then drains.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Write the bound addresses here as JSON once ready.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Parses and validates a config file.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its components only log errors unless RUST_LOG says
    // otherwise (expected refusals and redials would drown it).
    init_tracing(if matches!(cli.cmd, Cmd::Demo { .. }) {
        "error"
    } else {
        "info"
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Ca(CaCmd::Init {
            trust_domain,
            out,
            ttl,
        }) => {
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let ca = Ca::generate(&td, ttl)?;
            ca.save(&out)?;
            println!("created CA for trust domain {td} in {}", out.display());
        }
        Cmd::Ca(CaCmd::Issue {
            ca,
            spiffe_id,
            ttl,
            cert,
            key,
        }) => {
            let id =
                SpiffeId::new(&spiffe_id).with_context(|| format!("--spiffe-id {spiffe_id:?}"))?;
            let svid = Ca::load(&ca)?.issue(&id, ttl)?;
            svid.save(&cert, &key)?;
            println!(
                "issued {id} (ttl {}) to {}",
                humantime::format_duration(ttl),
                cert.display()
            );
        }
        Cmd::Bundle(BundleCmd::Export { ca, sequence }) => {
            println!("{}", Ca::load(&ca)?.bundle(sequence).to_jwks()?);
        }
        Cmd::Svid(SvidCmd::Verify {
            bundles,
            server,
            cert,
        }) => {
            return svid_verify(&bundles, server, &cert);
        }
        Cmd::Gateway(GatewayCmd::Check { config }) => {
            let c = meshfed_gateway::GatewayConfig::load(&config)?;
            println!(
                "{}: config ok: site {} ({}), {} peers, {} exports, {} imports",
                config.display(),
                c.site,
                c.trust_domain,
                c.peers.len(),
                c.exports.len(),
                c.imports.len()
            );
            let checks = meshfed_gateway::preflight::run(&c);
            for ch in &checks {
                match &ch.result {
                    Ok(m) => println!("  ok    {:<10} {m}", ch.what),
                    Err(m) => println!("  FAIL  {:<10} {m}", ch.what),
                }
            }
            let failed = checks.iter().filter(|c| c.result.is_err()).count();
            if failed > 0 {
                bail!("{}: {failed} check(s) failed", config.display());
            }
        }
        Cmd::Gateway(GatewayCmd::Run { config, ready_file }) => {
            let cfg = meshfed_gateway::GatewayConfig::load(&config)?;
            tracing::info!(config = ?cfg, "effective configuration");
            runtime()?.block_on(gateway_run(cfg, ready_file))?;
        }
        Cmd::Demo { dir } => runtime()?.block_on(demo::run(dir))?,
        Cmd::Validate { file } => {
            let r = read_entries(&file)?;
            for s in &r.services {
                println!("{}", describe_entry(s));
            }
            println!(
                "{}: {} service(s) valid, {} warning(s)",
                file.display(),
                r.services.len(),
                r.warnings.len()
            );
        }
        Cmd::Register { file, dir } => {
            let r = read_entries(&file)?;
            let names: Vec<String> = r.services.iter().map(|s| s.service.to_string()).collect();
            // Concurrent registrations take turns: each one's entries survive.
            let _lock = meshfed_federation::node::lock_site_dir(&dir)?;
            let mut reg = meshfed_federation::sources::Registry::load(&dir)?;
            let conflicts = reg.conflicts(&r.services);
            if !conflicts.is_empty() {
                bail!(
                    "{}: nothing registered: {}",
                    file.display(),
                    conflicts.join("; ")
                );
            }
            let replaced = reg.merge(&file.display().to_string(), r.services);
            reg.save(&dir)?;
            println!(
                "registered {} ({} replaced) in {}; {} service(s) registered in all",
                names.join(", "),
                replaced.len(),
                meshfed_federation::sources::Registry::path(&dir).display(),
                reg.services.len()
            );
        }
        Cmd::Unregister {
            services,
            file,
            dir,
        } => {
            let _lock = meshfed_federation::node::lock_site_dir(&dir)?;
            let mut reg = meshfed_federation::sources::Registry::load(&dir)?;
            let names = match &file {
                Some(f) => {
                    let source = f.display().to_string();
                    let names: Vec<_> = reg
                        .services
                        .iter()
                        .filter(|(_, r)| r.source == source)
                        .map(|(n, _)| n.clone())
                        .collect();
                    if names.is_empty() {
                        bail!("{source}: no service registered from this file");
                    }
                    names
                }
                None => services
                    .iter()
                    .map(|s| {
                        s.parse::<meshfed_federation::ServiceName>()
                            .map_err(|e| anyhow::anyhow!("{s:?}: {e}"))
                    })
                    .collect::<Result<_>>()?,
            };
            reg.remove(&names).map_err(anyhow::Error::msg)?;
            reg.save(&dir)?;
            let list: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            println!(
                "unregistered {}; {} service(s) registered in all",
                list.join(", "),
                reg.services.len()
            );
        }
        Cmd::Kubernetes(KubernetesCmd::Import {
            dir,
            namespace,
            gateway_selector,
        }) => {
            runtime()?.block_on(async {
                let client = kube_client().await?;
                let c =
                    meshfed_federation::sources::kubernetes::import_controller::ImportController {
                        client,
                        dir,
                        gateway_namespace: namespace,
                        gateway_selector,
                    };
                run_until_signal(|stop| c.run(stop)).await;
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Cmd::Kubernetes(KubernetesCmd::Export {
            site,
            trust_domain,
            dir,
        }) => {
            let site = meshfed_federation::SiteName::new(&site)
                .with_context(|| format!("--site {site:?}"))?;
            let trust_domain = meshfed_identity::TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            runtime()?.block_on(async {
                let client = kube_client().await?;
                let c = meshfed_federation::sources::kubernetes::controller::ExportController {
                    client,
                    site,
                    trust_domain,
                    dir,
                };
                run_until_signal(|stop| c.run(stop)).await;
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Cmd::Dns {
            site,
            dir,
            kubernetes,
            listen,
            import_address,
            vip_range,
            ttl,
            zone,
            forward,
            rate_limit,
            workers,
        } => {
            let vip_range = vip_range
                .as_deref()
                .map(meshfed_federation::routing::VipRange::parse)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--vip-range: {e}"))?;
            let zones = zone
                .iter()
                .map(|z| meshfed_gateway::config::valid_zone(z).map_err(anyhow::Error::msg))
                .collect::<Result<Vec<_>>>()
                .context("--zone")?;
            if rate_limit == Some(0) {
                bail!("--rate-limit must be positive");
            }
            let zone = meshfed_dns::ZoneConfig {
                ttl: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
                extra_zones: zones,
                host_zones: vec![],
            };
            runtime()?.block_on(async {
                let mut signals = signals::Signals::install()?;
                let table = Arc::new(arc_swap::ArcSwap::from_pointee(meshfed_dns::Table::build(
                    &zone,
                    &[],
                    &[],
                    0,
                )));
                if kubernetes {
                    let client = kube_client().await?;
                    let table = table.clone();
                    // SOA serials only grow, across restarts too.
                    let mut serial = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as u32);
                    tokio::spawn(
                        meshfed_federation::sources::kubernetes::controller::follow_service_imports(
                            client,
                            tokio_util::sync::CancellationToken::new(),
                            move |imports| {
                                let records = meshfed_dns::kubernetes::records(&imports);
                                serial = serial.wrapping_add(1);
                                tracing::debug!(imports = imports.len(), records = records.len(), "DNS answers from ServiceImports");
                                table.store(Arc::new(meshfed_dns::Table::build(
                                    &zone, &records, &[], serial,
                                )));
                            },
                        ),
                    );
                } else {
                    let (Some(site), Some(dir)) = (site, dir) else {
                        bail!("--site and --dir are required without --kubernetes");
                    };
                    let site = meshfed_federation::SiteName::new(&site)
                        .with_context(|| format!("--site {site:?}"))?;
                    let follow = meshfed_dns::follow::Follow {
                        catalog: dir.join("catalog.json"),
                        site,
                        zone,
                        import_address: import_address.unwrap_or([127, 0, 0, 1].into()),
                        vip_range,
                        table: table.clone(),
                    };
                    if let Err(e) = follow.load() {
                        tracing::warn!(error = %e, "no catalog yet: answering NXDOMAIN until the gateway writes one");
                    }
                    tokio::spawn(follow.run());
                }
                let running = meshfed_dns::server::start(
                    meshfed_dns::server::ServerConfig {
                        listen,
                        forward,
                        rate_limit,
                        workers,
                    },
                    table,
                    meshfed_dns::server::Metrics::default(),
                )
                .await
                .with_context(|| format!("--listen {listen}"))?;
                println!("dns listening on udp {} tcp {}", running.udp, running.tcp);
                let sig = signals
                    .until_stop(
                        "SIGHUP ignored: DNS answers follow the catalog already; restart to change flags",
                        || {},
                    )
                    .await;
                tracing::info!(signal = sig, "stopping DNS");
                running.shutdown();
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Cmd::Status { dir } => {
            let st = runtime()?.block_on(meshfed_federation::node::status(&dir))?;
            let td = Ca::load(&dir.join("ca"))?.trust_domain().to_string();
            print!("{}", meshfed_federation::node::status_table(&td, &st));
        }
        Cmd::Federation(FederationCmd::Init { trust_domain, dir }) => {
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            meshfed_federation::node::init(&dir, &td)?;
            println!("created federation {td} in {}", dir.display());
        }
        Cmd::Federation(FederationCmd::Serve {
            dir,
            listen,
            advertise,
            admin,
            lease_ttl,
            etcd,
            etcd_prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
            etcd_user,
            etcd_password_file,
            init_store,
        }) => {
            let store = if etcd.is_empty() {
                meshfed_federation::node::StoreChoice::Embedded { create: init_store }
            } else {
                let user = match (etcd_user, etcd_password_file) {
                    (Some(u), Some(f)) => {
                        let pw = std::fs::read_to_string(&f)
                            .with_context(|| format!("--etcd-password-file {}", f.display()))?;
                        Some((u, pw.trim_end_matches(['\r', '\n']).to_owned()))
                    }
                    _ => None,
                };
                meshfed_federation::node::StoreChoice::Etcd {
                    endpoints: etcd,
                    prefix: etcd_prefix,
                    security: meshfed_federation::store::EtcdSecurity {
                        ca: etcd_ca,
                        cert: etcd_cert,
                        key: etcd_key,
                        user,
                    },
                }
            };
            runtime()?.block_on(async {
                let mut signals = signals::Signals::install()?;
                let node =
                    meshfed_federation::node::serve(&dir, listen, advertise, lease_ttl, store)
                        .await?;
                let mut registry = prometheus_client::registry::Registry::default();
                node.service.metrics.register(&mut registry);
                let admin_l = tokio::net::TcpListener::bind(admin)
                    .await
                    .with_context(|| format!("bind admin {admin}"))?;
                let admin_addr = admin_l.local_addr()?;
                ca::write_file(
                    &dir.join("admin_address"),
                    admin_addr.to_string().as_bytes(),
                    0o644,
                )?;
                tracing::info!(admin = %admin_addr, "federation admin listening");
                let admin_stop = tokio_util::sync::CancellationToken::new();
                let server = meshfed_gateway::admin::Admin {
                    registry: std::sync::Arc::new(registry),
                    ready: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
                    svid_expiry: None,
                };
                tokio::spawn(server.serve(admin_l, admin_stop.clone()));
                let sig = signals
                    .until_stop(
                        "SIGHUP ignored: the federation has no file config to reload; restart to change flags",
                        || {},
                    )
                    .await;
                tracing::info!(signal = sig, "federation stopping");
                node.shutdown().await;
                admin_stop.cancel();
                anyhow::Ok(())
            })?;
        }
        Cmd::Federation(FederationCmd::Token(TokenCmd::Create {
            dir,
            site,
            ttl,
            trust_domain,
            share_trust_domain,
        })) => {
            let td = trust_domain
                .as_deref()
                .map(TrustDomain::new)
                .transpose()
                .with_context(|| {
                    format!("--trust-domain {:?}", trust_domain.unwrap_or_default())
                })?;
            let (token, expires) = runtime()?.block_on(meshfed_federation::node::create_token(
                &dir,
                &site,
                ttl,
                td.as_ref(),
                share_trust_domain,
            ))?;
            eprintln!("token for site {site}, valid once until {expires} (unix)");
            println!("{token}");
        }
        Cmd::Site(SiteCmd::Join {
            dir,
            site,
            gateway_address,
            token,
        }) => {
            let m = runtime()?.block_on(meshfed_federation::node::join(
                &dir,
                &site,
                &token,
                gateway_address,
            ))?;
            println!(
                "site {site} joined federation {} at revision {} ({} bundles in {})",
                m.federation_trust_domain,
                m.revision,
                meshfed_federation::node::bundle_files(&dir).len(),
                dir.join("bundles").display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses a ServiceEntry file; warnings go to stderr, errors name the file.
fn read_entries(
    file: &std::path::Path,
) -> Result<meshfed_federation::sources::service_entry::Registration> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let mut r = meshfed_federation::sources::service_entry::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    // TLS files: relative to the YAML file, and readable now rather than at the gateway.
    let base = file.parent().unwrap_or(std::path::Path::new("."));
    for s in &mut r.services {
        let Some(tls) = &mut s.tls else { continue };
        let fix = |p: &mut String| {
            let path = base.join(&*p);
            *p = path.display().to_string();
            path
        };
        let what = format!("{}: {} TLS origination", file.display(), s.service);
        let ca = fix(&mut tls.ca_certificates);
        meshfed_gateway::origination::load_certs(&ca)
            .map_err(|e| anyhow::anyhow!("{what}: caCertificates: {e}"))?;
        if let Some(c) = &mut tls.client_certificate {
            let c = fix(c);
            meshfed_gateway::origination::load_certs(&c)
                .map_err(|e| anyhow::anyhow!("{what}: clientCertificate: {e}"))?;
        }
        if let Some(k) = &mut tls.private_key {
            let k = fix(k);
            meshfed_gateway::origination::load_key(&k)
                .map_err(|e| anyhow::anyhow!("{what}: privateKey: {e}"))?;
        }
    }
    for w in &r.warnings {
        eprintln!("warning: {}: {w}", file.display());
    }
    Ok(r)
}

fn describe_entry(s: &meshfed_federation::sources::service_entry::LegacyService) -> String {
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| {
            format!(
                "{}/{} ({}) -> {}",
                p.number,
                p.app_protocol,
                p.name,
                s.endpoints_for(p).join(",")
            )
        })
        .collect();
    format!(
        "{} hosts={} {:?} {:?}{} ports: {}",
        s.service,
        s.hosts.join(","),
        s.location,
        s.resolution,
        if s.federated() {
            ""
        } else {
            " (this site only)"
        },
        ports.join("; ")
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn svid_verify(bundle_files: &[PathBuf], server: bool, cert: &std::path::Path) -> Result<ExitCode> {
    let mut bundles = BundleSet::new();
    for f in bundle_files {
        bundles.insert(
            BundleSet::read_bundle_file(f, None)
                .with_context(|| format!("bundle {}", f.display()))?,
        );
    }
    let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let chain = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not PEM certificates", cert.display()))?
    };
    let Some((leaf, rest)) = chain.split_first() else {
        bail!("{}: no CERTIFICATE block", cert.display());
    };
    let usage = if server {
        meshfed_identity::Usage::Server
    } else {
        meshfed_identity::Usage::Client
    };
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    match meshfed_identity::verify::verify_svid(
        &bundles,
        leaf,
        rest,
        rustls::pki_types::UnixTime::now(),
        usage,
        &algs,
    ) {
        Ok(id) => {
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("refused [{}]: {e}", e.code());
            Ok(ExitCode::from(2))
        }
    }
}

async fn gateway_run(
    cfg: meshfed_gateway::GatewayConfig,
    ready_file: Option<PathBuf>,
) -> Result<()> {
    let mut signals = signals::Signals::install()?;
    let gw = meshfed_gateway::start(cfg).await?;
    if let Some(f) = ready_file {
        let doc = serde_json::json!({
            "quic": gw.quic_addr.to_string(),
            "admin": gw.admin_addr.to_string(),
            "dns": gw.dns.map(|(udp, _)| udp.to_string()),
            "imports": gw.imports.iter().map(|(k, a)| (k.clone(), a.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        });
        ca::write_file(&f, doc.to_string().as_bytes(), 0o644)?;
    }
    let stop = gw.stop_token();
    let reload = gw.reload_trigger();
    tokio::spawn(async move {
        let sig = signals
            .until_stop(
                "SIGHUP: reloading the SVID and trust bundles now (other config changes need a restart)",
                || reload.notify_one(),
            )
            .await;
        tracing::info!(signal = sig, "signal received: draining");
        stop.cancel();
    });
    gw.wait().await;
    Ok(())
}

#[derive(Subcommand)]
enum KubernetesCmd {
    /// Watches ServiceExports, Services, EndpointSlices and Pods; writes the site's
    /// exports to `<dir>/kubernetes.json` (the gateway publishes them) and each
    /// ServiceExport's Valid/Conflict conditions.
    Export {
        #[arg(long)]
        site: String,
        /// The site's trust domain: workload identities are spiffe://<td>/ns/<ns>/sa/<sa>.
        #[arg(long)]
        trust_domain: String,
        /// The site directory the gateway uses (`federation.dir`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Makes a ServiceImport, a derived Service and EndpointSlices for every service the
    /// gateway imports (`<dir>/imports.json`), pointing at the ready gateway pods'
    /// import listeners (`federation.import_ports`); deletes withdrawn ones.
    Import {
        /// The site directory the gateway uses (`federation.dir`).
        #[arg(long)]
        dir: PathBuf,
        /// The gateway pods' namespace.
        #[arg(long, env = "POD_NAMESPACE", default_value = "meshfed")]
        namespace: String,
        /// Label selector of the gateway pods.
        #[arg(long, default_value = "app.kubernetes.io/name=meshfed-gateway")]
        gateway_selector: String,
    },
}

/// The in-cluster service account's client, or the local kubeconfig's.
async fn kube_client() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("no Kubernetes API: not in a cluster and no usable kubeconfig")
}

/// Runs a controller until SIGTERM or SIGINT, then stops it and waits for it.
async fn run_until_signal<F>(run: impl FnOnce(tokio_util::sync::CancellationToken) -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut signals = match signals::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(run(stop.clone()));
    let sig = signals
        .until_stop(
            "SIGHUP ignored: the controller follows the cluster already",
            || {},
        )
        .await;
    tracing::info!(signal = sig, "controller stopping");
    stop.cancel();
    let _ = task.await;
}
