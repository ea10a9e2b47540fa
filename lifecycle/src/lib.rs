//! How a meshfed daemon (gateway, federation, DNS) lives and stops, one way for all:
//!
//! - `admin`: the admin HTTP port (`/metrics`, `/ready`, `/live`), apart from the data
//!   plane and closed last;
//! - `signals`: the signal policy (SIGTERM/SIGINT drain, SIGHUP reloads, never kills);
//! - `drain`: [`drain::channel`] gives a [`drain::DrainTrigger`] and
//!   [`drain::DrainWatcher`]s. Watchers learn that a drain started and run the work it
//!   waits for; the trigger starts it and waits, within a grace period, for that work;
//! - [`off_worker`]: runs long synchronous work (a catalog apply, a DNS table build)
//!   without stalling the tasks queued on the runtime worker that runs it, and
//!   [`pause_after`]: how long such work waits before it is done again.
#![forbid(unsafe_code)]

pub mod admin;
pub mod drain;
pub mod signals;

/// Runs `f`, which may take seconds (a catalog apply or a DNS table build with 100,000
/// services on the bench host), without stalling the tasks queued on this runtime
/// worker: on a multi-thread runtime they move to another worker meanwhile
/// (`block_in_place`). A current-thread runtime (some tests), or none, runs it inline.
pub fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The pause after work as large as the catalog (a plan apply, a cache write, a DNS
/// table build) that took `took`, before it is done again: 4× its cost, so that under a
/// steady stream of changes it takes at most a fifth of a core, and at most `max`, so
/// that it never lags far behind. Pure.
pub fn pause_after(took: std::time::Duration, max: std::time::Duration) -> std::time::Duration {
    (took * 4).min(max)
}

#[cfg(test)]
mod tests {
    use super::off_worker;
    use std::sync::Arc;
    use std::time::Duration;

    /// With one worker, a task that ticks every 10 ms keeps ticking while another task
    /// runs 300 ms of blocking work through `off_worker` (inline, it would not tick).
    #[test]
    fn off_worker_keeps_the_workers_tasks_running() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let during = rt.block_on(async {
            let t = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            tokio::time::sleep(Duration::from_millis(30)).await;
            let t = ticks.clone();
            tokio::spawn(async move {
                let before = t.load(std::sync::atomic::Ordering::Relaxed);
                off_worker(|| std::thread::sleep(Duration::from_millis(300)));
                t.load(std::sync::atomic::Ordering::Relaxed) - before
            })
            .await
            .unwrap()
        });
        assert!(
            during >= 10,
            "{during} ticks during 300 ms of blocking work"
        );
    }
}
