//! The daemons' one signal policy: SIGTERM and SIGINT stop (the caller drains), SIGHUP
//! reloads what can be reloaded and never kills. Without a handler, SIGHUP's default
//! action ends the process with no drain and no log line; so the handlers are
//! installed before any daemon starts serving.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Installed handlers for SIGTERM, SIGINT and SIGHUP.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; from here on SIGHUP no longer kills the process.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT and says which. Every SIGHUP before that is logged and
    /// passed to `on_hup` (what this daemon reloads; `what` says it in the log).
    pub async fn until_stop(&mut self, what: &str, mut on_hup: impl FnMut()) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    tracing::info!(signal = "SIGHUP", "{what}");
                    on_hup();
                }
            }
        }
    }
}
