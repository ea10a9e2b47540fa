//! One module per group of commands: each parses its own arguments (clap) and does the
//! command by calling into the crates. `main.rs` only dispatches.

pub mod diagnose;
pub mod dns;
pub mod federation;
pub mod gateway;
pub mod identity;
pub mod kubernetes;
pub mod registry;
pub mod site;

/// The multi-threaded runtime a daemon or a client command runs on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// The same with `workers` threads (`None`: one per core, tokio's default).
pub fn runtime_with(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    Ok(b.enable_all().build()?)
}
