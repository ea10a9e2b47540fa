//! `meshfed kubernetes export|import`: the MCS controllers, run beside the gateway in a
//! cluster.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use meshfed_lifecycle::signals;

#[derive(Subcommand)]
pub enum KubernetesCmd {
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

pub fn run(cmd: KubernetesCmd) -> Result<()> {
    match cmd {
        KubernetesCmd::Import {
            dir,
            namespace,
            gateway_selector,
        } => {
            super::runtime()?.block_on(async {
                let client = kube_client().await?;
                let c = meshfed_kubernetes::import_controller::ImportController {
                    client,
                    dir,
                    gateway_namespace: namespace,
                    gateway_selector,
                };
                run_until_signal(|stop| c.run(stop)).await;
                Ok::<_, anyhow::Error>(())
            })?;
        }
        KubernetesCmd::Export {
            site,
            trust_domain,
            dir,
        } => {
            let site = meshfed_catalog::SiteName::new(&site)
                .with_context(|| format!("--site {site:?}"))?;
            let trust_domain = meshfed_identity::TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            super::runtime()?.block_on(async {
                let client = kube_client().await?;
                let c = meshfed_kubernetes::controller::ExportController {
                    client,
                    site,
                    trust_domain,
                    dir,
                };
                run_until_signal(|stop| c.run(stop)).await;
                Ok::<_, anyhow::Error>(())
            })?;
        }
    }
    Ok(())
}

/// The in-cluster service account's client, or the local kubeconfig's.
pub async fn kube_client() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("no Kubernetes API: not in a cluster and no usable kubeconfig")
}

/// Runs a controller until SIGTERM or SIGINT, then stops it and waits for it.
pub async fn run_until_signal<F>(run: impl FnOnce(tokio_util::sync::CancellationToken) -> F)
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
