//! `meshfed kubernetes export|import`: the MCS controllers, run beside the gateway in a
//! cluster.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use meshfed_lifecycle::signals;

/// Leader election among the controller replicas (one beside each gateway replica).
#[derive(clap::Args, Clone)]
pub struct ElectArgs {
    /// Run as the only replica: no Lease (`coordination.k8s.io`).
    #[arg(long)]
    no_leader_elect: bool,
    /// Where the Lease lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "meshfed")]
    lease_namespace: String,
    /// This replica's name in the Lease (the pod's name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a leader's Lease lasts without a renewal (renewed every third of it).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: std::time::Duration,
}

impl ElectArgs {
    fn election(
        &self,
        client: &kube::Client,
        name: String,
    ) -> Option<meshfed_kubernetes::leader::Election> {
        if self.no_leader_elect {
            return None;
        }
        let identity = self.identity.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "meshfed".into());
            format!("{host}-{}", std::process::id())
        });
        Some(meshfed_kubernetes::leader::Election {
            api: kube::Api::namespaced(client.clone(), &self.lease_namespace),
            name,
            identity,
            duration: self.lease_duration,
        })
    }
}

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
        /// Every replica writes its own `kubernetes.json`; only the leader (Lease
        /// `meshfed-export-<site>`) writes ServiceExport status.
        #[command(flatten)]
        elect: ElectArgs,
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
        /// Only the leader (Lease `meshfed-import`) writes.
        #[command(flatten)]
        elect: ElectArgs,
    },
}

pub fn run(cmd: KubernetesCmd) -> Result<()> {
    match cmd {
        KubernetesCmd::Import {
            dir,
            namespace,
            gateway_selector,
            elect,
        } => {
            super::runtime()?.block_on(async {
                let client = kube_client().await?;
                let election = elect.election(&client, "meshfed-import".into());
                let c = meshfed_kubernetes::import_controller::ImportController {
                    client,
                    dir,
                    gateway_namespace: namespace,
                    gateway_selector,
                };
                run_until_signal(|stop| async move {
                    match election {
                        Some(e) => {
                            let (tx, _) = tokio::sync::watch::channel(false);
                            meshfed_kubernetes::leader::lead(e, tx, stop, move |t| {
                                c.clone().run(t)
                            })
                            .await;
                        }
                        None => c.run(stop).await,
                    }
                })
                .await;
                Ok::<_, anyhow::Error>(())
            })?;
        }
        KubernetesCmd::Export {
            site,
            trust_domain,
            dir,
            elect,
        } => {
            let site = meshfed_catalog::SiteName::new(&site)
                .with_context(|| format!("--site {site:?}"))?;
            let trust_domain = meshfed_identity::TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            super::runtime()?.block_on(async {
                let client = kube_client().await?;
                let election = elect.election(&client, format!("meshfed-export-{site}"));
                let (tx, rx) = tokio::sync::watch::channel(false);
                let c = meshfed_kubernetes::controller::ExportController {
                    client,
                    site,
                    trust_domain,
                    dir,
                    leading: election.as_ref().map(|_| rx),
                };
                run_until_signal(|stop| async move {
                    let controller = tokio::spawn(c.run(stop.clone()));
                    if let Some(e) = election {
                        meshfed_kubernetes::leader::lead(e, tx, stop, |t| async move {
                            t.cancelled().await
                        })
                        .await;
                    }
                    let _ = controller.await;
                })
                .await;
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
