//! The fault suite: failures made real (processes killed, etcd members killed, the
//! federation gone, floods, endpoint churn)
//! under a steady load, each printing its figure as `name: value`. It runs inside the e2e
//! test binary in a short form (the README's test command, and CI); `tests/faults/run.sh`
//! runs it in full (`MESHFED_FAULTS=full`: the durations the issue names). Loads are
//! bounded in count and time and only reach addresses of the test's own sites.

mod endpoint_churn;
mod etcd_members;
mod flood;
mod partition;
mod replica_kill;
mod static_stability;

use std::time::Duration;

/// Whether the full form was asked for.
pub fn full() -> bool {
    std::env::var("MESHFED_FAULTS").is_ok_and(|v| v == "full")
}

/// `short` in the short form, `long` in the full one.
pub fn pick(short: Duration, long: Duration) -> Duration {
    if full() { long } else { short }
}

/// Prints a figure the way the benchmarks do: `name: value`.
pub fn figure(name: &str, value: impl std::fmt::Display) {
    println!("{name}: {value}");
}
