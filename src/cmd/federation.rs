//! `meshfed federation`: the federation service and its tokens.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use meshfed_identity::TrustDomain;

use meshfed_lifecycle::signals;

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum FederationCmd {
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
        /// Lifetime of the federation's own SVID; the node renews it at half that, from
        /// its CA, without a restart.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        svid_ttl: Duration,
        /// Serve the SPIFFE bundle endpoint (https_spiffe profile) here: every member
        /// trust domain's bundle at `/<trust domain>`.
        #[arg(long)]
        bundle_endpoint: Option<std::net::SocketAddr>,
        /// Also serve it in the https_web profile here, with `--web-cert`/`--web-key`.
        #[arg(long, requires_all = ["web_cert", "web_key"])]
        bundle_endpoint_web: Option<std::net::SocketAddr>,
        /// The web certificate chain (PEM, leaf first) for `--bundle-endpoint-web`.
        #[arg(long, requires = "bundle_endpoint_web")]
        web_cert: Option<PathBuf>,
        /// Its key (PEM).
        #[arg(long, requires = "bundle_endpoint_web")]
        web_key: Option<PathBuf>,
        /// Foreign trust domains to federate with by their SPIFFE bundle endpoints (a
        /// YAML file with `federates_with:` entries; README, "SPIFFE federation").
        #[arg(long)]
        federates_with: Option<PathBuf>,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Sites of the federation.
    #[command(subcommand)]
    Site(FedSiteCmd),
}

#[derive(Subcommand)]
pub enum FedSiteCmd {
    /// Removes a site: its exports leave the catalog, and its trust domain's bundle (if
    /// no other site shares it) leaves every site, which closes its connections.
    Remove {
        /// The federation directory (the operator's SVID).
        #[arg(long)]
        dir: PathBuf,
        site: String,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
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

pub fn federation(cmd: FederationCmd) -> Result<()> {
    match cmd {
        FederationCmd::Init { trust_domain, dir } => {
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            meshfed_federation::node::init(&dir, &td)?;
            println!("created federation {td} in {}", dir.display());
        }
        FederationCmd::Serve {
            dir,
            listen,
            advertise,
            admin,
            lease_ttl,
            svid_ttl,
            bundle_endpoint,
            bundle_endpoint_web,
            web_cert,
            web_key,
            federates_with,
            etcd,
            etcd_prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
            etcd_user,
            etcd_password_file,
            init_store,
        } => {
            let foreign = federates_with
                .as_deref()
                .map(meshfed_federation::foreign::load)
                .transpose()?
                .unwrap_or_default();
            let store = if etcd.is_empty() {
                meshfed_federation::node::StoreChoice::Embedded { create: init_store }
            } else {
                let user = match (etcd_user, etcd_password_file) {
                    (Some(u), Some(f)) => Some((u, read_password(&f)?)),
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
            super::runtime()?.block_on(async {
                let mut signals = signals::Signals::install()?;
                let node =
                    meshfed_federation::node::serve_with(
                        &dir, listen, advertise, lease_ttl, store, svid_ttl,
                    )
                    .await?;
                node.serve_admin(&dir, admin).await?;
                if let Some(addr) = bundle_endpoint {
                    node.serve_bundle_endpoint(addr, None).await?;
                }
                if let (Some(addr), Some(cert), Some(key)) = (bundle_endpoint_web, &web_cert, &web_key) {
                    node.serve_bundle_endpoint(addr, Some((cert, key))).await?;
                }
                if !foreign.is_empty() {
                    node.federate_with(foreign).await?;
                }
                let sig = signals
                    .until_stop(
                        "SIGHUP ignored: the federation has no file config to reload; restart to change flags",
                        || {},
                    )
                    .await;
                tracing::info!(signal = sig, "federation stopping");
                node.shutdown().await;
                anyhow::Ok(())
            })?;
        }
        FederationCmd::Site(FedSiteCmd::Remove { dir, site }) => {
            let rev = super::runtime()?.block_on(meshfed_api::client::remove_site(&dir, &site))?;
            println!(
                "site {site} removed at revision {rev}; its bundle is withdrawn from every site"
            );
        }
        FederationCmd::Token(TokenCmd::Create {
            dir,
            site,
            ttl,
            trust_domain,
            share_trust_domain,
        }) => {
            let td = trust_domain
                .as_deref()
                .map(TrustDomain::new)
                .transpose()
                .with_context(|| {
                    format!("--trust-domain {:?}", trust_domain.unwrap_or_default())
                })?;
            let (token, expires) =
                super::runtime()?.block_on(meshfed_api::client::create_token(
                    &dir,
                    &site,
                    ttl,
                    td.as_ref(),
                    share_trust_domain,
                ))?;
            eprintln!("token for site {site}, valid once until {expires} (unix)");
            println!("{token}");
        }
    }
    Ok(())
}

/// The etcd password: the file's first line, at most 4 KiB (a password file is small;
/// anything larger is the wrong file).
fn read_password(f: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let what = || format!("--etcd-password-file {}", f.display());
    let mut text = String::new();
    std::fs::File::open(f)
        .and_then(|h| h.take(4097).read_to_string(&mut text))
        .with_context(what)?;
    anyhow::ensure!(
        text.len() <= 4096,
        "{}: larger than 4 KiB; not a password file",
        what()
    );
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}
