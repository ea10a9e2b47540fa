//! A gateway replica killed -9 under 1000 requests per second (two replicas of the
//! serving site, each request a new connection through the tunnel): at most 0.5 % of
//! the requests fail and the callers recover within 5 s (short form 6 s of load, full
//! 30 s). The scenario is the active-active test's, at the fault suite's rate.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_replica_killed_under_1000_rps_costs_at_most_half_a_percent() {
    let secs = super::pick(Duration::from_secs(6), Duration::from_secs(30));
    let cost = crate::replicas::replica_killed_under_load("fault-replica-kill", 1000, secs).await;
    super::figure("replica_kill_requests", cost.total);
    super::figure("replica_kill_failed", cost.failed);
    super::figure(
        "replica_kill_failed_pct",
        format!(
            "{:.3}",
            f64::from(cost.failed) * 100.0 / f64::from(cost.total)
        ),
    );
    super::figure("replica_kill_recovery_ms", cost.recovered.as_millis());
}
