//! `meshfed gateway check` (the preflight) and `meshfed gateway run`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;
use meshfed_identity::ca;

use meshfed_lifecycle::signals;

#[derive(Subcommand)]
pub enum GatewayCmd {
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

pub fn run(cmd: GatewayCmd) -> Result<()> {
    match cmd {
        GatewayCmd::Check { config } => {
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
        GatewayCmd::Run { config, ready_file } => {
            let cfg = meshfed_gateway::GatewayConfig::load(&config)?;
            tracing::info!(config = ?cfg, "effective configuration");
            super::runtime_with(cfg.workers)?.block_on(gateway_run(cfg, ready_file))?;
        }
    }
    Ok(())
}

async fn gateway_run(
    cfg: meshfed_gateway::GatewayConfig,
    ready_file: Option<PathBuf>,
) -> Result<()> {
    let mut signals = signals::Signals::install()?;
    let site = meshfed::site::start(cfg).await?;
    let gw = &site.gateway;
    if let Some(f) = ready_file {
        let doc = serde_json::json!({
            "quic": gw.quic_addr.to_string(),
            "admin": gw.admin_addr.to_string(),
            "dns": site.dns.map(|(udp, _)| udp.to_string()),
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
    site.wait().await;
    Ok(())
}
