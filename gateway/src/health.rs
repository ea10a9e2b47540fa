//! Active health checks of registered legacy endpoints: a TCP connect or an HTTP GET
//! with an expected status, every interval, with thresholds. `Health` (pure) is the
//! state machine; `probe` does one check; `Checks` runs one task per endpoint and
//! reports transitions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshfed_catalog::ServiceName;
use meshfed_catalog::legacy::{HealthCheck, HealthKind};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// One endpoint's health: it starts healthy (not yet disproved), turns unhealthy after
/// `unhealthy_threshold` failures in a row and healthy again after `healthy_threshold`
/// passes in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    passes: u32,
    failures: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            healthy: true,
            passes: 0,
            failures: 0,
        }
    }
}

impl Health {
    /// Records a check result; true when the endpoint changed state.
    pub fn observe(&mut self, passed: bool, hc: &HealthCheck) -> bool {
        if passed {
            self.passes += 1;
            self.failures = 0;
            if !self.healthy && self.passes >= hc.healthy_threshold {
                self.healthy = true;
                return true;
            }
        } else {
            self.failures += 1;
            self.passes = 0;
            if self.healthy && self.failures >= hc.unhealthy_threshold {
                self.healthy = false;
                return true;
            }
        }
        false
    }
}

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("GET {path} timed out after {timeout:?}")]
    HttpTimeout { path: String, timeout: Duration },
    #[error("GET {path}: {source}")]
    Http {
        path: String,
        #[source]
        source: meshfed_lifecycle::admin::GetError,
    },
    #[error("GET {path}: status {got}, want {want}")]
    Status { path: String, got: u16, want: u16 },
}

/// One check of `addr`.
pub async fn probe(hc: &HealthCheck, addr: SocketAddr) -> Result<(), ProbeError> {
    let timeout = Duration::from_millis(hc.timeout_ms);
    match &hc.kind {
        HealthKind::Tcp => tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| ProbeError::ConnectTimeout(timeout))?
            .map(drop)
            .map_err(ProbeError::Connect),
        HealthKind::Http { path, status } => {
            let (got, _) = tokio::time::timeout(timeout, meshfed_lifecycle::admin::get(addr, path))
                .await
                .map_err(|_| ProbeError::HttpTimeout {
                    path: path.clone(),
                    timeout,
                })?
                .map_err(|source| ProbeError::Http {
                    path: path.clone(),
                    source,
                })?;
            if got.as_u16() == *status {
                Ok(())
            } else {
                Err(ProbeError::Status {
                    path: path.clone(),
                    got: got.as_u16(),
                    want: *status,
                })
            }
        }
    }
}

/// What is checked: a service's endpoint address, with its check.
pub type Target = (ServiceName, SocketAddr);

/// The running checks and their results.
#[derive(Default)]
pub struct Checks {
    running: BTreeMap<Target, (HealthCheck, CancellationToken)>,
    state: Arc<Mutex<BTreeMap<Target, Health>>>,
    /// Ticked on every transition.
    pub changed: Arc<Notify>,
}

impl Checks {
    /// Unhealthy targets now.
    pub fn unhealthy(&self) -> BTreeSet<Target> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, h)| !h.healthy)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Runs exactly the checks in `want` (starting new ones, stopping stale ones).
    pub fn set(&mut self, want: BTreeMap<Target, HealthCheck>, stop: &CancellationToken) {
        let stale: Vec<Target> = self
            .running
            .iter()
            .filter(|(t, (hc, _))| want.get(*t) != Some(hc))
            .map(|(t, _)| t.clone())
            .collect();
        for t in stale {
            if let Some((_, token)) = self.running.remove(&t) {
                token.cancel();
            }
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&t);
        }
        for (t, hc) in want {
            if self.running.contains_key(&t) {
                continue;
            }
            let token = stop.child_token();
            tokio::spawn(run_one(
                t.clone(),
                hc.clone(),
                self.state.clone(),
                self.changed.clone(),
                token.clone(),
            ));
            self.running.insert(t, (hc, token));
        }
    }
}

async fn run_one(
    target: Target,
    hc: HealthCheck,
    state: Arc<Mutex<BTreeMap<Target, Health>>>,
    changed: Arc<Notify>,
    stop: CancellationToken,
) {
    let interval = Duration::from_millis(hc.interval_ms);
    loop {
        let r = tokio::select! {
            r = probe(&hc, target.1) => r,
            _ = stop.cancelled() => return,
        };
        let flipped = {
            let mut m = state.lock().unwrap_or_else(|e| e.into_inner());
            let h = m.entry(target.clone()).or_default();
            h.observe(r.is_ok(), &hc).then_some(h.healthy)
        };
        match (flipped, &r) {
            (Some(true), _) => info!(service = %target.0, endpoint = %target.1, "endpoint healthy"),
            (Some(false), Err(e)) => {
                warn!(service = %target.0, endpoint = %target.1, reason = %e, "endpoint unhealthy")
            }
            _ => {}
        }
        if flipped.is_some() {
            changed.notify_one();
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc() -> HealthCheck {
        HealthCheck {
            kind: HealthKind::Tcp,
            port: None,
            interval_ms: 10,
            timeout_ms: 10,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    #[test]
    fn thresholds_debounce_a_flapping_endpoint() {
        let hc = hc();
        let mut h = Health::default();
        assert!(h.healthy);
        // Two failures then a pass: still healthy.
        assert!(!h.observe(false, &hc) && !h.observe(false, &hc));
        assert!(!h.observe(true, &hc) && h.healthy);
        // Three in a row: unhealthy, once.
        assert!(!h.observe(false, &hc) && !h.observe(false, &hc));
        assert!(h.observe(false, &hc) && !h.healthy);
        assert!(!h.observe(false, &hc));
        // One pass is not enough, two are.
        assert!(!h.observe(true, &hc) && !h.healthy);
        assert!(h.observe(true, &hc) && h.healthy);
    }

    #[tokio::test]
    async fn probes_tcp_and_http() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert!(probe(&hc(), addr).await.is_ok());
        drop(l);
        assert!(probe(&hc(), addr).await.is_err());
        // HTTP against a real server answering 503.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let http = |status| HealthCheck {
            kind: HealthKind::Http {
                path: "/healthz".into(),
                status,
            },
            timeout_ms: 1000,
            ..hc()
        };
        assert!(probe(&http(503), addr).await.is_ok());
        let e = probe(&http(200), addr).await.unwrap_err();
        assert!(
            matches!(
                e,
                ProbeError::Status {
                    got: 503,
                    want: 200,
                    ..
                }
            ),
            "{e}"
        );
    }
}
