//! `meshfed site join` and `meshfed status`: a site's membership, and the operator's
//! view of every site.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use meshfed_identity::Ca;

#[derive(Subcommand)]
pub enum SiteCmd {
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
    /// Replaces this site's trust bundle at the federation (a root rotation: keep the old
    /// and the new authorities until every SVID is reissued). Its spiffe_sequence must
    /// rise; every site applies it without a restart.
    UpdateBundle {
        /// The site directory (federation.json, bundles/).
        #[arg(long)]
        dir: PathBuf,
        /// The new bundle (SPIFFE JWKS, e.g. from `meshfed bundle`).
        #[arg(long)]
        bundle: PathBuf,
        /// The gateway SVID to call as; default DIR/gateway.pem and DIR/gateway.key.
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct StatusArgs {
    /// The federation directory (`meshfed federation init --dir`).
    #[arg(long)]
    pub dir: PathBuf,
    /// One JSON document instead of the table (stable field names, for scripts).
    #[arg(long)]
    pub json: bool,
}

pub fn status(a: StatusArgs) -> Result<()> {
    let StatusArgs { dir, json } = a;
    let st = super::runtime()?.block_on(meshfed_api::client::status(&dir))?;
    let td = Ca::load(&dir.join("ca"))?.trust_domain().to_string();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&meshfed_api::client::status_json(&td, &st))?
        );
    } else {
        print!("{}", meshfed_api::client::status_table(&td, &st));
    }
    Ok(())
}

pub fn site(cmd: SiteCmd) -> Result<()> {
    match cmd {
        SiteCmd::Join {
            dir,
            site,
            gateway_address,
            token,
        } => {
            let m = super::runtime()?.block_on(meshfed_api::client::join(
                &dir,
                &site,
                &token,
                gateway_address,
            ))?;
            println!(
                "site {site} joined federation {} at revision {} ({} bundles in {})",
                m.federation_trust_domain,
                m.revision,
                meshfed_catalog::site::bundle_files(&dir).len(),
                dir.join("bundles").display()
            );
        }
        SiteCmd::UpdateBundle {
            dir,
            bundle,
            cert,
            key,
        } => {
            let jwks = std::fs::read_to_string(&bundle)
                .with_context(|| format!("--bundle {}", bundle.display()))?;
            let cert = cert.unwrap_or_else(|| dir.join("gateway.pem"));
            let key = key.unwrap_or_else(|| dir.join("gateway.key"));
            let seq = super::runtime()?
                .block_on(meshfed_api::client::update_bundle(&dir, &cert, &key, jwks))?;
            println!("trust bundle of this site updated at the federation (spiffe_sequence {seq})");
        }
    }
    Ok(())
}
