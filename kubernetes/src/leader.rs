//! One leader among the controller replicas that run beside a site's gateway replicas,
//! through a `coordination.k8s.io/v1` Lease, with client-go's leader election rules:
//! - a candidate takes the Lease when it does not exist, has no holder, or its holder
//!   has not renewed it for `leaseDurationSeconds`;
//! - the holder renews it every `retry` (a third of the duration);
//! - every write carries the `resourceVersion` it read, so of two candidates writing
//!   at once the API server accepts one and refuses the other (409 Conflict);
//! - a leader that cannot renew for two thirds of the duration stops leading before
//!   anyone else may take over, and one that stops releases the Lease (empty holder)
//!   so that another replica takes over at once.
//!
//! [`step`] is the pure decision; [`lead`] runs the work only while leading, and
//! publishes the state on a watch channel.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Who runs for which Lease.
#[derive(Clone)]
pub struct Election {
    pub api: Api<Lease>,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    pub duration: Duration,
}

/// What a candidate does with the Lease it read.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// There is none: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Nobody holds it, or its holder let it expire: take it (one more transition).
    TakeOver,
    /// Someone else holds it until then.
    Follow { holder: String, expires: Timestamp },
}

/// Pure: the step for `me` at `now`, given the Lease as read (`None`: not found).
pub fn step(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Step::TakeOver;
    }
    if holder == me {
        return Step::Renew;
    }
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    let expires = renewed
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
        .unwrap_or(Timestamp::MAX);
    if expires <= now {
        Step::TakeOver
    } else {
        Step::Follow {
            holder: holder.to_owned(),
            expires,
        }
    }
}

impl Election {
    /// How often the holder renews and candidates retry.
    pub fn retry(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(100))
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: read, decide, write. True when we hold the Lease afterwards.
    pub async fn try_once(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let lease = self.api.get_opt(&self.name).await?;
        let spec = lease.as_ref().and_then(|l| l.spec.as_ref());
        let written = match step(spec, &self.identity, now) {
            Step::Follow { .. } => return Ok(false),
            Step::Create => {
                let mut l = Lease::default();
                l.metadata.name = Some(self.name.clone());
                l.spec = Some(self.spec(now, None, 0));
                self.api.create(&PostParams::default(), &l).await
            }
            s @ (Step::Renew | Step::TakeOver) => {
                let Some(mut l) = lease.clone() else {
                    return Ok(false);
                };
                let old = l.spec.clone().unwrap_or_default();
                let transitions = old.lease_transitions.unwrap_or(0);
                l.spec = Some(if s == Step::Renew {
                    self.spec(now, old.acquire_time, transitions)
                } else {
                    self.spec(now, None, transitions.saturating_add(1))
                });
                // Carries the resourceVersion read: a concurrent writer gets 409.
                self.api
                    .replace(&self.name, &PostParams::default(), &l)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if we hold it (empty holder), so another replica takes over
    /// without waiting for it to expire.
    pub async fn release(&self) {
        let Ok(Some(mut l)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let ours = l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !ours {
            return;
        }
        if let Some(s) = l.spec.as_mut() {
            s.holder_identity = None;
        }
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &l)
            .await
        {
            warn!(lease = %self.name, error = %e, "lease not released; it expires instead");
        }
    }
}

/// Runs `work` while this replica leads, until `stop`: started with a fresh token when
/// it becomes leader, cancelled (and awaited) when it stops leading. `leading` follows
/// the state.
pub async fn lead<F, Fut>(
    election: Election,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
    mut work: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let deadline = election.duration * 2 / 3;
    let mut running: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        let holds = match election.try_once().await {
            Ok(h) => {
                if h {
                    last_ok = tokio::time::Instant::now();
                }
                h
            }
            Err(e) => {
                warn!(lease = %election.name, error = %e, "lease not read or written");
                // Still leading until the renew deadline.
                running.is_some() && last_ok.elapsed() < deadline
            }
        };
        match (holds, running.is_some()) {
            (true, false) => {
                info!(lease = %election.name, identity = %election.identity, "leading");
                let token = stop.child_token();
                running = Some((token.clone(), tokio::spawn(work(token))));
                leading.send_replace(true);
            }
            (false, true) => {
                warn!(lease = %election.name, identity = %election.identity, "no longer leading");
                leading.send_replace(false);
                if let Some((t, h)) = running.take() {
                    t.cancel();
                    let _ = h.await;
                }
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(election.retry()) => {}
            _ = stop.cancelled() => break,
        }
    }
    leading.send_replace(false);
    if let Some((t, h)) = running.take() {
        t.cancel();
        let _ = h.await;
        election.release().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(secs),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn client_gos_rules() {
        let at = |s| Timestamp::from_second(s).unwrap();
        let released = LeaseSpec {
            holder_identity: None,
            ..held("a", 100, 15)
        };
        let rows: [(&str, Option<LeaseSpec>, i64, Step); 6] = [
            ("none", None, 100, Step::Create),
            ("ours", Some(held("me", 100, 15)), 200, Step::Renew),
            ("released", Some(released), 101, Step::TakeOver),
            (
                "theirs, fresh",
                Some(held("a", 100, 15)),
                114,
                Step::Follow {
                    holder: "a".into(),
                    expires: at(115),
                },
            ),
            (
                "theirs, expired",
                Some(held("a", 100, 15)),
                115,
                Step::TakeOver,
            ),
            (
                "no renew time: from acquire time",
                Some(LeaseSpec {
                    renew_time: None,
                    acquire_time: Some(MicroTime(at(100))),
                    ..held("a", 0, 15)
                }),
                110,
                Step::Follow {
                    holder: "a".into(),
                    expires: at(115),
                },
            ),
        ];
        for (what, lease, now, want) in rows {
            assert_eq!(step(lease.as_ref(), "me", at(now)), want, "{what}");
        }
    }
}
