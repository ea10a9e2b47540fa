//! The gateway renews its own SVID from a site signing authority on disk (`tls.renew`:
//! an intermediate CA; the root stays offline). At half the configured lifetime it
//! issues a new SVID for its own ID, writes `tls.cert`/`tls.key` atomically, and kicks
//! the reloader, which checks it and swaps it in for new handshakes: no restart, no
//! dropped connection. A failed renewal is retried, and warned about loudly once the
//! SVID in use has less than a quarter of its lifetime left.
//!
//! When is `meshfed_identity::ca::renew_in` (pure, shared with the federation's own
//! SVID); `Renewer` does the files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshfed_identity::ca::renew_in;
use meshfed_identity::{Ca, SpiffeId, Svid};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Wait between attempts after a failed renewal.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("signing authority: {0}")]
    Ca(#[from] meshfed_identity::CaError),
    /// The new SVID would be refused (an expired or foreign authority): the working one
    /// stays on disk.
    #[error("the renewed SVID would be refused [{code}]: {source}")]
    Refused {
        code: &'static str,
        #[source]
        source: meshfed_identity::VerifyError,
    },
}

pub struct Renewer {
    /// The signing authority's directory (`ca.pem` with its chain, `ca.key`).
    pub ca: PathBuf,
    pub ttl: Duration,
    pub id: SpiffeId,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub metrics: Metrics,
    /// The reloader's kick: load the new files now.
    pub reload: Arc<tokio::sync::Notify>,
    /// The live bundles: a new SVID is checked against them before it replaces the
    /// working one on disk.
    pub bundles: Arc<arc_swap::ArcSwap<meshfed_identity::BundleSet>>,
}

impl Renewer {
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let now = unix_now();
            let (wait, left) = match Svid::load(&self.cert, &self.key) {
                Ok(s) => {
                    let (nb, na) = (
                        s.not_before_unix().unwrap_or(0),
                        s.not_after_unix().unwrap_or(0),
                    );
                    (renew_in(nb, na, self.ttl, now), (na - now, na - nb))
                }
                Err(_) => (Duration::ZERO, (0, 1)),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
            match self.renew() {
                Ok(not_after) => {
                    self.metrics.svid_renewed(true);
                    self.reload.notify_one();
                    info!(id = %self.id, not_after, "SVID renewed");
                }
                Err(e) => {
                    self.metrics.svid_renewed(false);
                    let (remaining, lifetime) = left;
                    if remaining < lifetime / 4 {
                        warn!(error = %e, expires_in_s = remaining, "SVID renewal failed and the SVID in use expires soon");
                    } else {
                        warn!(error = %e, "SVID renewal failed; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY.min(self.ttl / 4)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Issues and writes a new SVID; returns its notAfter.
    fn renew(&self) -> Result<i64, RenewError> {
        let ca = Ca::load(&self.ca)?;
        let svid = ca.issue(&self.id, self.ttl)?;
        crate::reload::check_svid(
            &svid,
            &self.bundles.load(),
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|source| RenewError::Refused {
            code: source.code(),
            source,
        })?;
        // Each file is replaced atomically; a reload that sees one new file and one old
        // fails its key check and is retried, and the kick after both reloads at once.
        svid.save(&self.cert, &self.key)?;
        Ok(svid.not_after_unix().unwrap_or_default())
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
