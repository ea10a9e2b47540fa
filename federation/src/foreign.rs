//! Federating with a foreign trust domain (a SPIRE server, another mesh) by its SPIFFE
//! bundle endpoint ("SPIFFE Federation", profiles `https_spiffe` and `https_web`).
//!
//! `federation serve --federates-with FILE` names each foreign trust domain, its bundle
//! endpoint URL and profile (the same words as SPIRE's `federates_with`). The node
//! fetches each bundle, stores it like a member's (so every replica and every site has
//! it: gateways then accept that domain's SVIDs), and fetches again after the bundle's
//! `spiffe_refresh_hint` (clamped to [`MIN_REFRESH`]..[`MAX_REFRESH`]), retrying a failure
//! sooner with backoff. A bundle whose `spiffe_sequence` is below the stored one is
//! refused (`stale_bundle`); the stored one stays.
//!
//! - `https_spiffe`: the endpoint presents an SVID with `endpoint_spiffe_id`, verified
//!   against the trust domain's current bundle: the `bundle` file the operator gives
//!   (bootstrap) until the first fetch, then the last one fetched.
//! - `https_web`: the endpoint presents a web certificate for the URL's host, verified
//!   against `ca` (default: the system's `/etc/ssl/certs/ca-certificates.crt`).
//!
//! Parsing and the decisions ([`judge`], [`next_refresh`]) are pure; [`fetch`] does the
//! HTTPS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use meshfed_identity::{BundleSet, PeerPolicy, SpiffeId, SpiffeVerifier, TrustBundle, TrustDomain};
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;

/// Refresh no more often than this, whatever the hint says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// And at least this often.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// One fetch (connect, TLS, request, body) must finish within this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A bundle larger than this is refused unread.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// Relationships a federation may have (each is a refresher task and metric series).
pub const MAX_RELATIONSHIPS: usize = 64;
const DEFAULT_WEB_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One foreign trust domain and how to fetch its bundle.
#[derive(Clone, Debug)]
pub struct Relationship {
    pub trust_domain: TrustDomain,
    pub url: hyper::Uri,
    pub profile: Profile,
}

#[derive(Clone, Debug)]
pub enum Profile {
    HttpsSpiffe {
        endpoint_id: SpiffeId,
        bootstrap: TrustBundle,
    },
    HttpsWeb {
        roots: Vec<CertificateDer<'static>>,
    },
}

impl Profile {
    pub fn name(&self) -> &'static str {
        match self {
            Self::HttpsSpiffe { .. } => "https_spiffe",
            Self::HttpsWeb { .. } => "https_web",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {detail}", file.display())]
    Parse { file: PathBuf, detail: String },
    #[error("{}: field `{field}`: {reason}", file.display())]
    Field {
        file: PathBuf,
        field: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    federates_with: Vec<RawRelationship>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelationship {
    trust_domain: String,
    bundle_endpoint_url: String,
    bundle_endpoint_profile: String,
    #[serde(default)]
    endpoint_spiffe_id: Option<String>,
    #[serde(default)]
    bundle: Option<PathBuf>,
    #[serde(default)]
    ca: Option<PathBuf>,
}

/// Reads a `federates_with` file; relative paths are relative to it.
pub fn load(file: &Path) -> Result<Vec<Relationship>, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_owned(),
        source,
    })?;
    parse(&text, file)
}

/// Parses `federates_with` YAML; `file` names the source in errors and anchors paths.
pub fn parse(text: &str, file: &Path) -> Result<Vec<Relationship>, ConfigError> {
    let raw: RawFile = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_owned(),
        detail: meshfed_catalog::yaml::yaml_message(&e.to_string()),
    })?;
    let base = file.parent().unwrap_or(Path::new("."));
    let err = |field: String, reason: String| ConfigError::Field {
        file: file.to_owned(),
        field,
        reason,
    };
    if raw.federates_with.len() > MAX_RELATIONSHIPS {
        return Err(err(
            "federates_with".into(),
            format!("at most {MAX_RELATIONSHIPS} foreign trust domains"),
        ));
    }
    let mut out: Vec<Relationship> = Vec::new();
    for (i, r) in raw.federates_with.into_iter().enumerate() {
        let f = |name: &str| format!("federates_with[{i}].{name}");
        let td =
            TrustDomain::new(&r.trust_domain).map_err(|e| err(f("trust_domain"), e.to_string()))?;
        if out.iter().any(|o| o.trust_domain == td) {
            return Err(err(f("trust_domain"), format!("{td} is listed twice")));
        }
        let url: hyper::Uri = r.bundle_endpoint_url.parse().map_err(|e| {
            err(
                f("bundle_endpoint_url"),
                format!("{:?}: {e}", r.bundle_endpoint_url),
            )
        })?;
        if url.scheme_str() != Some("https") || url.host().is_none() {
            return Err(err(
                f("bundle_endpoint_url"),
                format!(
                    "{:?}: must be an https:// URL with a host",
                    r.bundle_endpoint_url
                ),
            ));
        }
        let path_of = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let profile = match r.bundle_endpoint_profile.as_str() {
            "https_spiffe" => {
                if r.ca.is_some() {
                    return Err(err(f("ca"), "only for https_web".into()));
                }
                let id = r.endpoint_spiffe_id.as_deref().ok_or_else(|| {
                    err(
                        f("endpoint_spiffe_id"),
                        "required for https_spiffe: the SPIFFE ID the endpoint presents".into(),
                    )
                })?;
                let endpoint_id =
                    SpiffeId::new(id).map_err(|e| err(f("endpoint_spiffe_id"), e.to_string()))?;
                if endpoint_id.trust_domain() != td {
                    return Err(err(
                        f("endpoint_spiffe_id"),
                        format!("{endpoint_id} is not in {td}"),
                    ));
                }
                let path = r.bundle.map(path_of).ok_or_else(|| {
                    err(f("bundle"), "required for https_spiffe: the trust domain's bundle that authenticates its endpoint at first".into())
                })?;
                let bootstrap = BundleSet::read_bundle_file(&path, Some(&td))
                    .map_err(|e| err(f("bundle"), format!("{}: {e}", path.display())))?;
                Profile::HttpsSpiffe {
                    endpoint_id,
                    bootstrap,
                }
            }
            "https_web" => {
                for (set, name) in [
                    (r.endpoint_spiffe_id.is_some(), "endpoint_spiffe_id"),
                    (r.bundle.is_some(), "bundle"),
                ] {
                    if set {
                        return Err(err(f(name), "only for https_spiffe".into()));
                    }
                }
                let path =
                    r.ca.map_or_else(|| PathBuf::from(DEFAULT_WEB_ROOTS), path_of);
                let roots = read_roots(&path)
                    .map_err(|e| err(f("ca"), format!("{}: {e}", path.display())))?;
                Profile::HttpsWeb { roots }
            }
            other => {
                return Err(err(
                    f("bundle_endpoint_profile"),
                    format!("{other:?}: https_spiffe or https_web"),
                ));
            }
        };
        out.push(Relationship {
            trust_domain: td,
            url,
            profile,
        });
    }
    Ok(out)
}

fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let roots: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if roots.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(roots)
}

/// What to do with a fetched bundle, given the stored one.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// New content: store it.
    Store,
    /// The same authorities and sequence as stored.
    Unchanged,
    /// Refused, with a stable reason; the stored bundle stays.
    Refuse(&'static str),
}

/// Pure: a bundle whose sequence is below the stored one is stale; identical content
/// changes nothing; anything else replaces what is stored.
pub fn judge(stored: Option<&TrustBundle>, fetched: &TrustBundle) -> Verdict {
    match stored {
        Some(s) if fetched.sequence < s.sequence => Verdict::Refuse("stale_bundle"),
        Some(s)
            if s.sequence == fetched.sequence && s.x509_authorities == fetched.x509_authorities =>
        {
            Verdict::Unchanged
        }
        _ => Verdict::Store,
    }
}

/// Pure: when to fetch again. After a success, the bundle's refresh hint, clamped;
/// after `failures` consecutive failures, 1 s doubling, never later than the hint.
pub fn next_refresh(hint_secs: u64, failures: u32) -> Duration {
    let hint = Duration::from_secs(hint_secs).clamp(MIN_REFRESH, MAX_REFRESH);
    if failures == 0 {
        return hint;
    }
    let backoff = MIN_REFRESH.saturating_mul(1u32 << failures.min(10).saturating_sub(1));
    backoff.min(hint)
}

/// Why a fetch failed; `code()` is the stable reason in logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connect {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Tls(String, std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("bundle larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    #[error("not a SPIFFE bundle: {0}")]
    Bundle(#[from] meshfed_identity::BundleError),
    #[error("no answer within {FETCH_TIMEOUT:?}")]
    Timeout,
}

impl FetchError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Connect(..) => "connect_failed",
            Self::Tls(..) => "tls_failed",
            Self::Http(_) => "http_failed",
            Self::Status(_) => "http_status",
            Self::TooLarge => "too_large",
            Self::Bundle(_) => "bad_bundle",
            Self::Timeout => "timeout",
        }
    }
}

fn client_tls(
    rel: &Relationship,
    current: Option<&TrustBundle>,
) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(meshfed_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let mut cfg = match &rel.profile {
        Profile::HttpsSpiffe {
            endpoint_id,
            bootstrap,
        } => {
            let bundle = current.cloned().unwrap_or_else(|| bootstrap.clone());
            let set: BundleSet = [bundle].into_iter().collect();
            let v = SpiffeVerifier::new(
                Arc::new(arc_swap::ArcSwap::from_pointee(set)),
                PeerPolicy::Only([endpoint_id.clone()].into()),
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(v))
                .with_no_client_auth()
        }
        Profile::HttpsWeb { roots } => {
            let mut store = rustls::RootCertStore::empty();
            for r in roots {
                // A bad certificate in a system bundle is skipped, as every TLS client does.
                let _ = store.add(r.clone());
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Fetches the relationship's bundle once; `current` is the trust domain's bundle now
/// stored (it authenticates an `https_spiffe` endpoint).
pub async fn fetch(
    rel: &Relationship,
    current: Option<&TrustBundle>,
) -> Result<TrustBundle, FetchError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(rel, current))
        .await
        .map_err(|_| FetchError::Timeout)?
}

async fn fetch_inner(
    rel: &Relationship,
    current: Option<&TrustBundle>,
) -> Result<TrustBundle, FetchError> {
    let host = rel
        .url
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let port = rel.url.port_u16().unwrap_or(443);
    let tls = client_tls(rel, current).map_err(FetchError::Http)?;
    let name = ServerName::try_from(host.clone())
        .map_err(|e| FetchError::Http(format!("host {host:?}: {e}")))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| FetchError::Connect(format!("{host}:{port}"), e))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Tls(format!("{host}:{port}"), e))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let path = rel.url.path_and_query().map_or("/", |p| p.as_str());
    let authority = rel.url.authority().map_or(host.clone(), |a| a.to_string());
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    if !resp.status().is_success() {
        conn.abort();
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BUNDLE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::TooLarge
            } else {
                FetchError::Http(e.to_string())
            }
        })?
        .to_bytes();
    conn.abort();
    Ok(TrustBundle::from_jwks(rel.trust_domain.clone(), &body)?)
}

/// Keeps one foreign trust domain's bundle fresh until `stop`: fetch, judge, store,
/// then wait for the refresh hint (or back off after a failure).
pub async fn run(
    rel: Relationship,
    service: Arc<crate::server::FederationService>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tracing::{info, warn};
    let td = rel.trust_domain.clone();
    let mut failures = 0u32;
    loop {
        let current = service.stored_bundle(&td);
        let hint = current.as_ref().map_or(0, |b| b.refresh_hint_secs);
        let result = tokio::select! {
            r = fetch(&rel, current.as_ref()) => r,
            _ = stop.cancelled() => return,
        };
        let outcome: Result<Verdict, (&'static str, String)> = match result {
            Ok(b) => match service.store_foreign_bundle(&b).await {
                Ok(v) => Ok(v),
                Err(e) => Err(("store_failed", e.to_string())),
            },
            Err(e) => Err((e.code(), e.to_string())),
        };
        let result_label = match &outcome {
            Ok(Verdict::Store) => "ok",
            Ok(Verdict::Unchanged) => "unchanged",
            Ok(Verdict::Refuse(r)) | Err((r, _)) => r,
        };
        service
            .metrics
            .foreign_refreshes
            .get_or_create(&crate::server::ForeignLabels {
                trust_domain: td.to_string(),
                result: result_label,
            })
            .inc();
        let stored = service.stored_bundle(&td);
        let hint = stored.as_ref().map_or(hint, |b| b.refresh_hint_secs);
        match outcome {
            Ok(Verdict::Store) => {
                failures = 0;
                let b = stored.as_ref();
                info!(trust_domain = %td, url = %rel.url, profile = rel.profile.name(),
                    sequence = b.map_or(0, |b| b.sequence),
                    authorities = b.map_or(0, |b| b.x509_authorities.len()),
                    "foreign trust bundle updated");
            }
            Ok(Verdict::Unchanged) => failures = 0,
            Ok(Verdict::Refuse(reason)) => {
                failures = failures.saturating_add(1);
                warn!(trust_domain = %td, url = %rel.url, reason,
                    "foreign trust bundle refused; keeping the stored one");
            }
            Err((reason, e)) => {
                failures = failures.saturating_add(1);
                warn!(trust_domain = %td, url = %rel.url, reason, error = %e,
                    "foreign trust bundle not fetched; keeping the stored one");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(next_refresh(hint, failures)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_identity::Ca;

    #[test]
    fn judge_refuses_a_stale_sequence_and_skips_the_same_bundle() {
        let td = TrustDomain::new("spire.example.org").unwrap();
        let (a, b) = (
            Ca::generate(&td, Duration::from_secs(3600)).unwrap(),
            Ca::generate(&td, Duration::from_secs(3600)).unwrap(),
        );
        let (a2, a3, b3) = (a.bundle(2), a.bundle(3), b.bundle(3));
        let zero = a.bundle(0);
        let cases = [
            ("first", None, &a2, Verdict::Store),
            ("same", Some(&a2), &a2, Verdict::Unchanged),
            ("newer", Some(&a2), &a3, Verdict::Store),
            ("older", Some(&a3), &a2, Verdict::Refuse("stale_bundle")),
            ("new keys, same sequence", Some(&a3), &b3, Verdict::Store),
            (
                "no sequences (0), new keys",
                Some(&zero),
                &b.bundle(0),
                Verdict::Store,
            ),
        ];
        for (what, stored, fetched, want) in cases {
            assert_eq!(judge(stored, fetched), want, "{what}");
        }
    }

    #[test]
    fn refresh_follows_the_hint_within_bounds_and_backs_off() {
        let s = Duration::from_secs;
        for (hint, failures, want) in [
            (300, 0, s(300)),
            (0, 0, MIN_REFRESH),
            (1_000_000, 0, MAX_REFRESH),
            (300, 1, s(1)),
            (300, 3, s(4)),
            (300, 40, s(300)),
            (5, 10, s(5)),
        ] {
            assert_eq!(
                next_refresh(hint, failures),
                want,
                "hint {hint}, failures {failures}"
            );
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let dir = std::env::temp_dir().join(format!("meshfed-foreign-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let td = TrustDomain::new("spire.example.org").unwrap();
        let ca = Ca::generate(&td, Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.join("spire.json"), ca.bundle(1).to_jwks().unwrap()).unwrap();
        ca.save(&dir.join("ca")).unwrap();
        std::fs::copy(dir.join("ca/ca.pem"), dir.join("web.pem")).unwrap();
        let file = dir.join("federates-with.yaml");
        let good = "federates_with:\n  - trust_domain: spire.example.org\n    bundle_endpoint_url: https://spire.example.org:8443/\n    bundle_endpoint_profile: https_spiffe\n    endpoint_spiffe_id: spiffe://spire.example.org/spire/server\n    bundle: spire.json\n  - trust_domain: web.example.org\n    bundle_endpoint_url: https://127.0.0.1:9443/web\n    bundle_endpoint_profile: https_web\n    ca: web.pem\n";
        let rels = parse(good, &file).unwrap();
        assert_eq!(rels.len(), 2);
        assert_eq!(rels[0].profile.name(), "https_spiffe");
        assert_eq!(rels[1].url.path(), "/web");
        for (from, to, field) in [
            (
                "trust_domain: web.example.org",
                "trust_domain: spire.example.org",
                "federates_with[1].trust_domain",
            ),
            (
                "https://127.0.0.1:9443/web",
                "http://127.0.0.1:9443/web",
                "federates_with[1].bundle_endpoint_url",
            ),
            (
                "profile: https_web",
                "profile: https_jwt",
                "federates_with[1].bundle_endpoint_profile",
            ),
            (
                "spiffe://spire.example.org/spire/server",
                "spiffe://other.org/spire/server",
                "federates_with[0].endpoint_spiffe_id",
            ),
            ("    bundle: spire.json\n", "", "federates_with[0].bundle"),
            (
                "bundle: spire.json",
                "bundle: missing.json",
                "federates_with[0].bundle",
            ),
            ("ca: web.pem", "ca: spire.json", "federates_with[1].ca"),
        ] {
            let text = good.replace(from, to);
            match parse(&text, &file) {
                Err(ConfigError::Field { field: f, .. }) => assert_eq!(f, field, "{from} -> {to}"),
                other => panic!("{from} -> {to}: {other:?}"),
            }
        }
        assert!(matches!(
            parse(
                "federates_with:\n  - trust_domain: x\n    color: red\n",
                &file
            ),
            Err(ConfigError::Parse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
