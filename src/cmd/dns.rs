//! `meshfed dns`: federated DNS on its own, from a gateway's catalog cache or from a
//! cluster's ServiceImports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use meshfed_lifecycle::signals;

#[derive(Args)]
pub struct DnsArgs {
    /// The site whose imports are answered.
    #[arg(long, required_unless_present = "kubernetes")]
    pub site: Option<String>,
    /// The site directory (`meshfed site join --dir`): its `catalog.json` is followed.
    #[arg(long, required_unless_present = "kubernetes")]
    pub dir: Option<PathBuf>,
    /// In a Kubernetes cluster: answer from its ServiceImports (the clusterset IPs of
    /// MCS), instead of a gateway's catalog cache.
    #[arg(long, conflicts_with_all = ["site", "dir", "import_address", "vip_range"])]
    pub kubernetes: bool,
    /// UDP and TCP.
    #[arg(long, default_value = "127.0.0.1:5353")]
    pub listen: std::net::SocketAddr,
    /// The gateway's `federation.import_address`: what A records point at
    /// (default 127.0.0.1).
    #[arg(long)]
    pub import_address: Option<std::net::IpAddr>,
    /// The gateway's `federation.vip_range`, if it has one: one address per import.
    #[arg(long)]
    pub vip_range: Option<String>,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Extra zones answered like clusterset.local (repeatable).
    #[arg(long)]
    pub zone: Vec<String>,
    /// Upstream resolver for every other name (off by default: REFUSED).
    #[arg(long)]
    pub forward: Option<std::net::SocketAddr>,
    /// UDP queries per second per client address.
    #[arg(long)]
    pub rate_limit: Option<u32>,
    /// UDP worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

pub fn run(a: DnsArgs) -> Result<()> {
    let DnsArgs {
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
    } = a;
    let vip_range = vip_range
        .as_deref()
        .map(meshfed_catalog::routing::VipRange::parse)
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
    super::runtime()?.block_on(async {
            let mut signals = signals::Signals::install()?;
            let table = Arc::new(arc_swap::ArcSwap::from_pointee(meshfed_dns::Table::build(
                &zone,
                &[],
                &[],
                0,
            )));
            if kubernetes {
                let client = super::kubernetes::kube_client().await?;
                let table = table.clone();
                // SOA serials only grow, across restarts too.
                let mut serial = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as u32);
                tokio::spawn(
                    meshfed_kubernetes::controller::follow_service_imports(
                        client,
                        tokio_util::sync::CancellationToken::new(),
                        move |imports| {
                            let records = meshfed_kubernetes::dns::records(&imports);
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
                let site = meshfed_catalog::SiteName::new(&site)
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
    Ok(())
}
