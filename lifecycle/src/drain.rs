//! The drain primitive. A daemon hands [`DrainWatcher`]s to everything that accepts
//! work; the watcher says when a drain has started (stop accepting, refuse new work) and
//! runs the work a drain must wait for ([`DrainWatcher::spawn`]). The one
//! [`DrainTrigger`] starts the drain and waits for that work, up to a grace period.
//! Work not spawned on a watcher (accept loops, idle connections) is not waited for.
//!
//! ztunnel's `DrainTrigger`/`DrainWatcher` is the model; this one is built on tokio-util's
//! `CancellationToken` and `TaskTracker`.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// A new drain: its trigger and a first watcher (clone it for more).
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let w = DrainWatcher {
        token: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    (DrainTrigger { watcher: w.clone() }, w)
}

/// Learns that a drain started, and runs the work it waits for.
#[derive(Clone, Debug)]
pub struct DrainWatcher {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl DrainWatcher {
    /// Resolves once the drain has started.
    pub fn signaled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Runs `fut` as work the drain waits for.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Work the drain waits for right now.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// The drain's start as a token, for APIs that take one (tonic's shutdown signal,
    /// per-flow child tokens).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

/// Starts the drain and waits for it.
#[derive(Debug)]
pub struct DrainTrigger {
    watcher: DrainWatcher,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every piece of work finished within the grace period.
    Complete,
    /// The grace period ran out with this much work still running.
    GraceExpired { in_flight: usize },
}

impl DrainTrigger {
    /// Another watcher of this drain.
    pub fn watcher(&self) -> DrainWatcher {
        self.watcher.clone()
    }

    /// Starts the drain without waiting: watchers see it at once.
    pub fn start(&self) {
        self.watcher.token.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.watcher.is_draining()
    }

    /// Starts the drain (if not yet) and waits up to `grace` for the work spawned on its
    /// watchers. Work spawned after this call is still waited for, within the grace.
    /// `Duration::MAX` waits for as long as the work takes.
    pub async fn drain(self, grace: Duration) -> Drained {
        self.start();
        let t = &self.watcher.tracker;
        t.close();
        if tokio::time::timeout(grace, t.wait()).await.is_ok() {
            Drained::Complete
        } else {
            Drained::GraceExpired { in_flight: t.len() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_spawned_work_within_the_grace() {
        let (trigger, w) = channel();
        assert!(!w.is_draining());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let w2 = w.clone();
        w.spawn(async move {
            w2.signaled().await;
            let _ = rx.await;
        });
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(());
        });
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            Drained::Complete
        );
        assert!(w.is_draining());
        stopper.await.unwrap();
    }

    #[tokio::test]
    async fn a_drain_gives_up_after_the_grace_and_says_how_much_is_left() {
        let (trigger, w) = channel();
        for _ in 0..3 {
            w.spawn(std::future::pending::<()>());
        }
        let d = trigger.drain(Duration::from_millis(50)).await;
        assert_eq!(d, Drained::GraceExpired { in_flight: 3 });
    }

    #[tokio::test]
    async fn an_unbounded_grace_waits_for_the_work() {
        let (trigger, w) = channel();
        w.spawn(tokio::time::sleep(Duration::from_millis(30)));
        assert_eq!(trigger.drain(Duration::MAX).await, Drained::Complete);
        assert_eq!(w.in_flight(), 0);
    }

    #[tokio::test]
    async fn watchers_see_the_start_before_any_wait() {
        let (trigger, w) = channel();
        let seen = tokio::spawn({
            let w = trigger.watcher();
            async move { w.signaled().await }
        });
        trigger.start();
        tokio::time::timeout(Duration::from_secs(1), seen)
            .await
            .expect("a watcher sees the start")
            .unwrap();
        assert!(w.is_draining() && trigger.is_draining());
        assert_eq!(
            trigger.drain(Duration::from_millis(10)).await,
            Drained::Complete
        );
    }
}
