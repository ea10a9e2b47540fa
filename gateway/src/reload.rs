//! Picks up a rotated SVID and changed trust bundles from disk without a restart.
//! New handshakes use them at once; established connections are left alone.
//!
//! Files are polled (mtime, size, inode) every `reload_interval`. A change that does not
//! load — a half-written pair of files, a certificate for another identity, a bundle set
//! without our own trust domain — keeps the previous, working identity, is logged and
//! counted, and is tried again on the next tick. So is an SVID that peers would refuse:
//! one that is not valid now (expired, or not yet valid) or whose chain does not lead to
//! our own trust domain's bundle ([`check_svid`]).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshfed_identity::tls::SvidResolver;
use meshfed_identity::{BundleSet, SpiffeId, Svid, TrustDomain, Usage, VerifyError};
use rustls::pki_types::UnixTime;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

pub struct Reloader {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundles: Vec<PathBuf>,
    /// Directories whose `<trust domain>.json` files are bundles too (a federated
    /// site's `bundles/`, the Workload API's), listed again on every tick so new trust
    /// domains are picked up.
    pub bundle_dirs: Vec<PathBuf>,
    pub expected_id: SpiffeId,
    pub own_td: TrustDomain,
    pub resolver: Arc<SvidResolver>,
    pub bundle_store: Arc<ArcSwap<BundleSet>>,
    pub metrics: Metrics,
    pub interval: Duration,
    /// Look now instead of at the next tick (SIGHUP).
    pub kick: Arc<tokio::sync::Notify>,
    /// Called after each new bundle set is in place (the ingress closes connections
    /// from trust domains it no longer holds).
    pub on_bundles: Arc<dyn Fn() + Send + Sync>,
}

/// What identifies a file version: mtime (ns), size, inode. `None` when unreadable.
type Stamp = Vec<Option<(i64, i64, u64, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
        })
        .collect()
}

impl Reloader {
    pub async fn run(self, stop: CancellationToken) {
        let svid_files = [self.cert.clone(), self.key.clone()];
        let mut svid_seen = stamp(&svid_files);
        let mut bundles_seen = stamp(&self.bundle_files());
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.kick.notified() => info!("reload requested: checking SVID and trust bundles now"),
                _ = stop.cancelled() => return,
            }
            // Bundles first: a CA rotation that brings a new bundle and an SVID signed
            // by it must not refuse the SVID against the old bundle.
            let now = stamp(&self.bundle_files());
            if now != bundles_seen {
                match self.reload_bundles() {
                    Ok(()) => bundles_seen = now,
                    Err(e) => {
                        warn!(error = %e, "trust bundles not reloaded; keeping the previous set");
                        self.metrics.reloaded("bundles", false);
                    }
                }
            }
            let now = stamp(&svid_files);
            if now != svid_seen {
                match self.reload_svid() {
                    Ok(()) => svid_seen = now,
                    Err(e) => {
                        warn!(error = %e, "new SVID not loaded; still presenting the previous one");
                        self.metrics.reloaded("svid", false);
                    }
                }
            }
        }
    }

    fn reload_svid(&self) -> Result<(), ReloadError> {
        let svid = Svid::load(&self.cert, &self.key)?;
        if svid.id != self.expected_id {
            return Err(ReloadError::WrongId {
                cert: self.cert.clone(),
                found: svid.id,
                expected: self.expected_id.clone(),
            });
        }
        if let Err(e) = check_svid(&svid, &self.bundle_store.load(), UnixTime::now()) {
            self.metrics
                .svid_refusals
                .get_or_create(&crate::metrics::ReasonLabels { reason: e.code() })
                .inc();
            return Err(ReloadError::SvidRefused {
                cert: self.cert.clone(),
                code: e.code(),
                source: e,
            });
        }
        // A cert written before its key fails here and is retried next tick.
        self.resolver
            .update(&svid)
            .map_err(|source| ReloadError::KeyMismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            })?;
        let not_after = svid.not_after_unix().unwrap_or_default();
        self.metrics.svid_not_after.set(not_after);
        self.metrics.reloaded("svid", true);
        info!(id = %svid.id, not_after, "SVID rotated");
        Ok(())
    }

    fn bundle_files(&self) -> Vec<PathBuf> {
        bundle_files(&self.bundles, &self.bundle_dirs)
    }

    fn reload_bundles(&self) -> Result<(), ReloadError> {
        let set = load_bundles(&self.bundle_files(), &self.own_td)?;
        let tds: Vec<String> = set.trust_domains().map(|t| t.to_string()).collect();
        self.bundle_store.store(Arc::new(set));
        (self.on_bundles)();
        self.metrics.reloaded("bundles", true);
        info!(trust_domains = ?tds, "trust bundles reloaded");
        Ok(())
    }
}

/// Whether peers would accept `svid` at `now`: the full X.509-SVID verification, for
/// both ends of a handshake (a gateway dials and accepts), against our own bundles. An
/// expired or future-dated certificate, or one from another CA, fails here instead of
/// in every handshake.
pub fn check_svid(svid: &Svid, bundles: &BundleSet, now: UnixTime) -> Result<(), VerifyError> {
    let (leaf, rest) = svid.chain.split_first().ok_or(VerifyError::NoCertificate)?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    for usage in [Usage::Server, Usage::Client] {
        meshfed_identity::verify::verify_svid(bundles, leaf, rest, now, usage, &algs)?;
    }
    Ok(())
}

/// Why an SVID or a bundle set was not (re)loaded. The message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("trust bundle {}: {source}", path.display())]
    BundleFile {
        path: PathBuf,
        #[source]
        source: meshfed_identity::BundleError,
    },
    #[error("no trust bundle for this site's own trust domain {0}")]
    NoOwnBundle(TrustDomain),
    #[error(transparent)]
    Svid(#[from] meshfed_identity::CaError),
    #[error("{}: SPIFFE ID {found} is not this gateway's {expected}", cert.display())]
    WrongId {
        cert: PathBuf,
        found: SpiffeId,
        expected: SpiffeId,
    },
    #[error("{}: refused [{code}]: {source}", cert.display())]
    SvidRefused {
        cert: PathBuf,
        code: &'static str,
        #[source]
        source: VerifyError,
    },
    #[error("{} and {}: {source}", cert.display(), key.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// Reads every bundle file; the set must include our own trust domain.
pub fn load_bundles(files: &[PathBuf], own_td: &TrustDomain) -> Result<BundleSet, ReloadError> {
    let mut set = BundleSet::new();
    for file in files {
        let b =
            BundleSet::read_bundle_file(file, None).map_err(|source| ReloadError::BundleFile {
                path: file.clone(),
                source,
            })?;
        set.insert(b);
    }
    if set.get(own_td).is_none() {
        return Err(ReloadError::NoOwnBundle(own_td.clone()));
    }
    Ok(set)
}

/// The static bundle files plus every `*.json` in each of `dirs`, sorted per directory
/// (a later directory's bundle for a trust domain replaces an earlier one's).
pub fn bundle_files(files: &[PathBuf], dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = files.to_vec();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter(|p| !out.contains(p))
            .collect();
        found.sort();
        out.extend(found);
    }
    out
}
