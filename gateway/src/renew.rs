//! The gateway renews its own SVID from a site signing authority on disk (`tls.renew`:
//! an intermediate CA; the root stays offline). At half the configured lifetime it
//! issues a new SVID for its own ID, writes `tls.cert`/`tls.key` atomically, and kicks
//! the reloader, which checks it and swaps it in for new handshakes: no restart, no
//! dropped connection. A failed renewal is retried, and warned about loudly once the
//! SVID in use has less than a quarter of its lifetime left.
//!
//! `renew_in` (when) is pure; `Renewer` does the files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshfed_identity::{Ca, SpiffeId, Svid};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// How far an SVID's notBefore may precede its issuance (the CA backdates by 60 s).
const BACKDATE_ALLOWANCE: i64 = 120;
/// Wait between attempts after a failed renewal.
const RETRY: Duration = Duration::from_secs(5);

/// How long until the SVID valid from `not_before` to `not_after` (Unix seconds) is due
/// for renewal at `now`, for SVIDs of lifetime `ttl`: at half of `ttl` before it expires.
/// One that lives longer than `ttl` allows (it was issued otherwise, e.g. by `meshfed ca
/// issue`) is due now, as is one past its half-life. Pure.
pub fn renew_in(not_before: i64, not_after: i64, ttl: Duration, now: i64) -> Duration {
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
    if not_after - not_before > ttl.saturating_add(BACKDATE_ALLOWANCE) {
        return Duration::ZERO;
    }
    let due = not_after - ttl / 2;
    Duration::from_secs(u64::try_from(due - now).unwrap_or(0))
}

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("signing authority: {0}")]
    Ca(#[from] meshfed_identity::CaError),
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
        // Each file is replaced atomically; a reload that sees one new file and one old
        // fails its key check and is retried, and the kick after both reloads at once.
        svid.save(&self.cert, &self.key)?;
        Ok(svid.not_after_unix().unwrap_or_default())
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_half_the_lifetime() {
        let h = Duration::from_secs(3600);
        // (not_before, not_after, ttl, now, due in seconds)
        let rows = [
            // Issued by the renewer (backdated 60 s): half of ttl before expiry.
            (1_000 - 60, 1_000 + 3600, h, 1_000, 1800),
            (1_000 - 60, 1_000 + 3600, h, 2_800, 0),
            (1_000 - 60, 1_000 + 3600, h, 5_000, 0),
            // A 60 s TTL is not renewed in a loop because of its 60 s backdate.
            (1_000 - 60, 1_060, Duration::from_secs(60), 1_000, 30),
            // Issued otherwise, for longer than ttl allows: now.
            (0, 100_000, Duration::from_secs(60), 10, 0),
        ];
        for (nb, na, ttl, now, want) in rows {
            assert_eq!(
                renew_in(nb, na, ttl, now),
                Duration::from_secs(want),
                "{nb}..{na} ttl {ttl:?} at {now}"
            );
        }
    }
}
