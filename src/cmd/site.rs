//! `meshfed site join` and `meshfed status`: a site's membership, and the operator's
//! view of every site.

use std::path::PathBuf;

use anyhow::Result;
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
}

#[derive(Args)]
pub struct StatusArgs {
    /// The federation directory (`meshfed federation init --dir`).
    #[arg(long)]
    pub dir: PathBuf,
}

pub fn status(a: StatusArgs) -> Result<()> {
    let StatusArgs { dir } = a;
    let st = super::runtime()?.block_on(meshfed_api::client::status(&dir))?;
    let td = Ca::load(&dir.join("ca"))?.trust_domain().to_string();
    print!("{}", meshfed_api::client::status_table(&td, &st));
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
    }
    Ok(())
}
