//! A running site: the gateway, and beside it the DNS server its config asks for. DNS
//! starts first (so its metrics are on the gateway's admin port and it answers the
//! moment the gateway is ready), follows every plan the gateway's federation agent
//! applies, and stops after the gateway has drained. With `caller_pod_ip`, a pod
//! reflector (`meshfed_kubernetes::pods`) keeps the egress's callers by address; the
//! gateway starts once it has listed the cluster's pods.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use meshfed_dns::server::{Metrics, ServerConfig};
use meshfed_dns::{Table, ZoneConfig};
use meshfed_gateway::{GatewayConfig, GatewayError, RunningGateway};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("caller_pod_ip: {0}")]
    Pods(String),
    #[error("bind dns {addr}: {source}")]
    Dns {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A gateway and its DNS server, stopped together.
pub struct RunningSite {
    pub gateway: RunningGateway,
    /// Where DNS answers (UDP, TCP), when the config has a `dns` section and a
    /// federation to answer from.
    pub dns: Option<(SocketAddr, SocketAddr)>,
    dns_server: Option<meshfed_dns::server::Running>,
    /// Stops the pod reflector (`caller_pod_ip`) once the gateway has drained.
    pods_stop: CancellationToken,
}

impl RunningSite {
    pub fn stop_token(&self) -> CancellationToken {
        self.gateway.stop_token()
    }

    /// Resolves when the gateway has drained; DNS stops then.
    pub async fn wait(self) {
        self.gateway.wait().await;
        self.pods_stop.cancel();
        if let Some(d) = self.dns_server {
            d.shutdown();
        }
    }

    /// Starts a drain and waits for it.
    pub async fn shutdown(self) {
        self.gateway.stop_token().cancel();
        self.wait().await;
    }
}

/// How long start waits for the first list of pods (`caller_pod_ip`).
const PODS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Starts DNS (when configured), then the gateway; with `caller_pod_ip`, a pod
/// reflector on the local cluster (in-cluster service account or kubeconfig).
pub async fn start(cfg: GatewayConfig) -> Result<RunningSite, SiteError> {
    start_with(cfg, None).await
}

/// [`start`], with the Kubernetes client the pod reflector uses.
pub async fn start_with(
    cfg: GatewayConfig,
    kube: Option<kube::Client>,
) -> Result<RunningSite, SiteError> {
    let pods_stop = CancellationToken::new();
    let caller_ips = if cfg.caller_pod_ip {
        let client = match kube {
            Some(c) => c,
            None => kube::Client::try_default()
                .await
                .map_err(|e| SiteError::Pods(format!("no Kubernetes client: {e}")))?,
        };
        let dir: meshfed_gateway::egress::CallerIps = Arc::default();
        let listed = meshfed_kubernetes::pods::reflect(
            client,
            cfg.trust_domain.clone(),
            dir.clone(),
            pods_stop.clone(),
        );
        if tokio::time::timeout(PODS_WAIT, listed).await.is_err() {
            pods_stop.cancel();
            return Err(SiteError::Pods(format!(
                "the Kubernetes API did not list pods within {PODS_WAIT:?}"
            )));
        }
        Some(dir)
    } else {
        None
    };
    let mut registry = Registry::default();
    let dns = match (&cfg.dns, &cfg.federation) {
        (Some(d), Some(_)) => {
            let zone = ZoneConfig {
                ttl: d.ttl,
                extra_zones: d.zones.clone(),
                host_zones: vec![],
            };
            let table = Arc::new(ArcSwap::from_pointee(Table::build(&zone, &[], &[], 0)));
            let metrics = Metrics::default();
            metrics.register(&mut registry);
            let running = meshfed_dns::server::start(
                ServerConfig {
                    listen: d.listen,
                    forward: d.forward,
                    rate_limit: d.rate_limit,
                    workers: 0,
                },
                table.clone(),
                metrics,
            )
            .await
            .map_err(|source| SiteError::Dns {
                addr: d.listen,
                source,
            })?;
            Some((zone, table, running))
        }
        _ => None,
    };
    let options = meshfed_gateway::Options {
        registry,
        caller_ips,
    };
    let gateway = match meshfed_gateway::start_with(cfg, options).await {
        Ok(g) => g,
        Err(e) => {
            pods_stop.cancel();
            if let Some((_, _, running)) = dns {
                running.shutdown();
            }
            return Err(e.into());
        }
    };
    let Some((zone, table, running)) = dns else {
        return Ok(RunningSite {
            gateway,
            dns: None,
            dns_server: None,
            pods_stop,
        });
    };
    let mut plans = gateway.applied_plans();
    let stop = gateway.stop_token();
    tokio::spawn(async move {
        loop {
            let applied = plans.borrow_and_update().clone();
            if let Some(a) = applied {
                let began = std::time::Instant::now();
                let t = meshfed_lifecycle::off_worker(|| {
                    meshfed_dns::table_for_plan(&zone, &a.plan, a.revision)
                });
                table.store(Arc::new(t));
                // The table is as large as the catalog, and the agent applies a change
                // in milliseconds (only what changed): under a stream of changes the
                // next build waits 4× this one's cost, at most 1 s, and takes the
                // newest plan. A small catalog's table follows every plan at once.
                tokio::select! {
                    _ = tokio::time::sleep(meshfed_lifecycle::pause_after(began.elapsed(), std::time::Duration::from_secs(1))) => {}
                    _ = stop.cancelled() => return,
                }
            }
            tokio::select! {
                r = plans.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    });
    Ok(RunningSite {
        dns: Some((running.udp, running.tcp)),
        gateway,
        dns_server: Some(running),
        pods_stop,
    })
}
