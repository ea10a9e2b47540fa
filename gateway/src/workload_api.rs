//! The gateway's SVID from the SPIFFE Workload API (`tls.workload_api`: a SPIRE agent's
//! socket), through the `spiffe` crate's client.
//!
//! At start the gateway waits (up to `tls.workload_api.wait`) for the first X.509
//! context; then it follows the API's stream. Each context is checked before anything is
//! written: it must hold an SVID for this gateway's own ID, a bundle for our own trust
//! domain, and that SVID must verify against that bundle now. The SVID then goes to
//! `tls.cert`/`tls.key` and every bundle to `bundle_dir/<trust domain>.json`
//! (unchanged files are left alone), and the reloader is kicked: the same path an
//! operator's rotated files take, so new handshakes use them and live connections stay.
//! A context that fails the checks keeps the working identity on disk.
//!
//! The stream is re-established after an error with backoff (1 s to 30 s), warning
//! loudly once the SVID in use has less than a quarter of its lifetime left.
//!
//! [`select`] is the pure part (context to identity), table-tested below.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshfed_identity::{BundleSet, SpiffeId, Svid, TrustBundle, TrustDomain};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use spiffe::{WorkloadApiClient, X509Context};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::WorkloadApi;
use crate::metrics::Metrics;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why a Workload API context was not used. `code()` is the stable reason in logs and
/// in `svid_refusals{reason}`.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    #[error("workload API {socket}: {source}")]
    Api {
        socket: String,
        #[source]
        source: spiffe::WorkloadApiError,
    },
    #[error("workload API offers no SVID for {expected}; it offered [{offered}]")]
    NoSvid { expected: SpiffeId, offered: String },
    #[error("workload API SVID {id}: {reason}")]
    BadSvid { id: String, reason: String },
    #[error("workload API sent no bundle for this site's own trust domain {0}")]
    NoOwnBundle(TrustDomain),
    #[error("workload API SVID would be refused [{code}]: {source}")]
    Refused {
        code: &'static str,
        #[source]
        source: meshfed_identity::VerifyError,
    },
    #[error(transparent)]
    Write(#[from] meshfed_identity::CaError),
    #[error(transparent)]
    Bundle(#[from] meshfed_identity::BundleError),
    #[error("no usable SVID from the workload API {socket} within {wait:?}; last error: {last}")]
    Timeout {
        socket: String,
        wait: Duration,
        last: Box<WorkloadApiError>,
    },
}

impl WorkloadApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Api { .. } => "workload_api_unavailable",
            Self::NoSvid { .. } => "workload_api_no_svid",
            Self::BadSvid { .. } => "workload_api_bad_svid",
            Self::NoOwnBundle(_) => "workload_api_no_bundle",
            Self::Refused { code, .. } => code,
            Self::Write(_) | Self::Bundle(_) => "workload_api_write_failed",
            Self::Timeout { last, .. } => last.code(),
        }
    }
}

/// The gateway's identity out of one X.509 context.
pub struct Update {
    pub svid: Svid,
    pub bundles: BundleSet,
}

/// Picks this gateway's SVID and converts the context's bundles, refusing a context
/// without our own trust domain's bundle or whose SVID does not verify against it at
/// `now`. Pure: no I/O.
pub fn select(
    ctx: &X509Context,
    expected: &SpiffeId,
    now: UnixTime,
) -> Result<Update, WorkloadApiError> {
    let Some(s) = ctx
        .svids()
        .iter()
        .find(|s| s.spiffe_id().to_string() == expected.as_str())
    else {
        let offered: Vec<String> = ctx
            .svids()
            .iter()
            .map(|s| s.spiffe_id().to_string())
            .collect();
        return Err(WorkloadApiError::NoSvid {
            expected: expected.clone(),
            offered: offered.join(", "),
        });
    };
    let svid = Svid {
        id: expected.clone(),
        chain: s
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            s.private_key().as_bytes().to_vec(),
        )),
    };
    let mut bundles = BundleSet::new();
    for (td, b) in ctx.bundle_set().iter() {
        let td = TrustDomain::new(td.as_str()).map_err(|e| WorkloadApiError::BadSvid {
            id: expected.to_string(),
            reason: format!("bundle trust domain {:?}: {e}", td.as_str()),
        })?;
        let authorities = b
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        bundles.insert(TrustBundle::new(td, authorities, 0));
    }
    let own = expected.trust_domain();
    if bundles
        .get(&own)
        .is_none_or(|b| b.x509_authorities.is_empty())
    {
        return Err(WorkloadApiError::NoOwnBundle(own));
    }
    crate::reload::check_svid(&svid, &bundles, now).map_err(|source| {
        WorkloadApiError::Refused {
            code: source.code(),
            source,
        }
    })?;
    Ok(Update { svid, bundles })
}

pub struct Source {
    pub cfg: WorkloadApi,
    pub expected: SpiffeId,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Source {
    /// Waits for the first usable context and writes it; the gateway then loads its
    /// identity from disk as usual.
    pub async fn first(&self) -> Result<(), WorkloadApiError> {
        let deadline = tokio::time::Instant::now() + self.cfg.wait;
        loop {
            let err = match self.fetch_once().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if tokio::time::Instant::now() + BACKOFF_MIN > deadline {
                return Err(WorkloadApiError::Timeout {
                    socket: self.cfg.socket.clone(),
                    wait: self.cfg.wait,
                    last: Box::new(err),
                });
            }
            info!(error = %err, code = err.code(), "waiting for the workload API");
            tokio::time::sleep(BACKOFF_MIN).await;
        }
    }

    async fn fetch_once(&self) -> Result<(), WorkloadApiError> {
        let client = self.connect().await?;
        let ctx = client
            .fetch_x509_context()
            .await
            .map_err(|source| self.api(source))?;
        self.apply(&ctx).map(|_| ())
    }

    async fn connect(&self) -> Result<WorkloadApiClient, WorkloadApiError> {
        WorkloadApiClient::connect_to(&self.cfg.socket)
            .await
            .map_err(|source| self.api(source))
    }

    fn api(&self, source: spiffe::WorkloadApiError) -> WorkloadApiError {
        WorkloadApiError::Api {
            socket: self.cfg.socket.clone(),
            source,
        }
    }

    /// Checks one context and writes what changed; true when anything did.
    fn apply(&self, ctx: &X509Context) -> Result<bool, WorkloadApiError> {
        let update = select(ctx, &self.expected, UnixTime::now())?;
        let mut changed = write_bundles(&self.cfg.bundle_dir, &update.bundles)?;
        let on_disk = std::fs::read(&self.cert).ok();
        if on_disk.as_deref() != Some(update.svid.cert_pem().as_bytes()) {
            update.svid.save(&self.cert, &self.key)?;
            changed = true;
        }
        Ok(changed)
    }

    /// Follows the API's stream until `stop`, reconnecting after errors.
    pub async fn run(
        self,
        metrics: Metrics,
        reload: Arc<tokio::sync::Notify>,
        stop: CancellationToken,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let err = tokio::select! {
                e = self.follow(&metrics, &reload, &mut backoff) => e,
                _ = stop.cancelled() => return,
            };
            let (remaining, lifetime) = remaining(&self.cert, &self.key);
            if remaining < lifetime / 4 {
                warn!(error = %err, code = err.code(), expires_in_s = remaining,
                    "workload API unavailable and the SVID in use expires soon");
            } else {
                warn!(error = %err, code = err.code(), retry_in = ?backoff, "workload API stream ended; reconnecting");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream: applies each context; returns why it ended.
    async fn follow(
        &self,
        metrics: &Metrics,
        reload: &tokio::sync::Notify,
        backoff: &mut Duration,
    ) -> WorkloadApiError {
        let client = match self.connect().await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let mut stream = match client.stream_x509_contexts().await {
            Ok(s) => s,
            Err(source) => return self.api(source),
        };
        while let Some(item) = stream.next().await {
            let ctx = match item {
                Ok(c) => c,
                Err(source) => return self.api(source),
            };
            *backoff = BACKOFF_MIN;
            match self.apply(&ctx) {
                Ok(false) => {}
                Ok(true) => {
                    metrics.svid_renewed(true);
                    reload.notify_one();
                    info!(id = %self.expected, "SVID or bundles updated from the workload API");
                }
                Err(e) => {
                    metrics.svid_renewed(false);
                    metrics
                        .svid_refusals
                        .get_or_create(&crate::metrics::ReasonLabels { reason: e.code() })
                        .inc();
                    warn!(error = %e, code = e.code(), "workload API update not used; keeping the working SVID");
                }
            }
        }
        self.api(spiffe::WorkloadApiError::EmptyResponse)
    }
}

/// Writes each bundle as `<trust domain>.json` when its content changed, and removes
/// the files of trust domains the API no longer sends.
fn write_bundles(dir: &Path, bundles: &BundleSet) -> Result<bool, WorkloadApiError> {
    std::fs::create_dir_all(dir).map_err(|source| meshfed_identity::CaError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut changed = false;
    let mut keep = Vec::new();
    for td in bundles.trust_domains() {
        let Some(b) = bundles.get(td) else { continue };
        let path = dir.join(format!("{td}.json"));
        let json = b.to_jwks()?;
        if std::fs::read(&path).ok().as_deref() != Some(json.as_bytes()) {
            meshfed_identity::ca::write_file(&path, json.as_bytes(), 0o644)?;
            changed = true;
        }
        keep.push(path);
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for p in rd.filter_map(|e| e.ok().map(|e| e.path())) {
            if p.extension().is_some_and(|x| x == "json") && !keep.contains(&p) {
                let _ = std::fs::remove_file(&p);
                changed = true;
            }
        }
    }
    Ok(changed)
}

/// Seconds left on the SVID on disk, and its lifetime ((0, 1) when unreadable).
fn remaining(cert: &Path, key: &Path) -> (i64, i64) {
    match Svid::load(cert, key) {
        Ok(s) => {
            let (nb, na) = (
                s.not_before_unix().unwrap_or(0),
                s.not_after_unix().unwrap_or(0),
            );
            (na - crate::renew::unix_now(), (na - nb).max(1))
        }
        Err(_) => (0, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_identity::Ca;
    use std::sync::Arc;

    fn concat(c: &[CertificateDer<'_>]) -> Vec<u8> {
        c.iter().flat_map(|c| c.as_ref().to_vec()).collect()
    }

    fn ctx(svids: &[&Svid], bundles: &[&TrustBundle]) -> X509Context {
        let svids = svids.iter().map(|s| {
            let PrivateKeyDer::Pkcs8(k) = &s.key else {
                panic!("pkcs8")
            };
            Arc::new(
                spiffe::X509Svid::parse_from_der(&concat(&s.chain), k.secret_pkcs8_der()).unwrap(),
            )
        });
        let mut set = spiffe::X509BundleSet::new();
        for b in bundles {
            let td = spiffe::TrustDomain::new(b.trust_domain.as_str()).unwrap();
            set.add_bundle(
                spiffe::X509Bundle::parse_from_der(td, &concat(&b.x509_authorities)).unwrap(),
            );
        }
        X509Context::new(svids, set)
    }

    #[test]
    fn select_takes_only_a_verifiable_svid_for_this_gateway() {
        let east = TrustDomain::new("east.example.org").unwrap();
        let west = TrustDomain::new("west.example.org").unwrap();
        let (ca, other_ca, west_ca) = (
            Ca::generate(&east, Duration::from_secs(3600)).unwrap(),
            Ca::generate(&east, Duration::from_secs(3600)).unwrap(),
            Ca::generate(&west, Duration::from_secs(3600)).unwrap(),
        );
        let me = SpiffeId::gateway(&east, "east").unwrap();
        let workload = SpiffeId::new("spiffe://east.example.org/ns/shop/sa/web").unwrap();
        let good = ca.issue(&me, Duration::from_secs(600)).unwrap();
        let stranger = other_ca.issue(&me, Duration::from_secs(600)).unwrap();
        let web = ca.issue(&workload, Duration::from_secs(600)).unwrap();
        let (b, wb) = (ca.bundle(1), west_ca.bundle(1));
        let now = UnixTime::now();
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 3 * 3600));
        let cases: Vec<(&str, X509Context, UnixTime, Result<usize, &str>)> = vec![
            (
                "ours, with a federated bundle",
                ctx(&[&good], &[&b, &wb]),
                now,
                Ok(2),
            ),
            ("ours second of two", ctx(&[&web, &good], &[&b]), now, Ok(1)),
            (
                "only a workload's",
                ctx(&[&web], &[&b]),
                now,
                Err("workload_api_no_svid"),
            ),
            (
                "no own bundle",
                ctx(&[&good], &[&wb]),
                now,
                Err("workload_api_no_bundle"),
            ),
            (
                "another CA's",
                ctx(&[&stranger], &[&b]),
                now,
                Err("untrusted_chain"),
            ),
            (
                "expired by then",
                ctx(&[&good], &[&b]),
                later,
                Err("expired"),
            ),
        ];
        for (what, c, at, want) in cases {
            let got = select(&c, &me, at)
                .map(|u| u.bundles.len())
                .map_err(|e| e.code());
            assert_eq!(got, want, "{what}");
        }
    }
}
