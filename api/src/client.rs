//! The federation's client, as sites and operators use it: an authenticated channel
//! (`client`), `meshfed site join` (`join`), and the operator's `token create` and
//! `status` against the node running from a federation directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshfed_catalog::site::{Membership, lock_site_dir};
use meshfed_catalog::token::{JoinToken, TokenError};
use meshfed_identity::fs::write_file;
use meshfed_identity::tls::SvidResolver;
use meshfed_identity::{Ca, Svid, TrustBundle, TrustDomain};

use crate::tls::{self, ClientTrust};
use crate::{Refusal, pb};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Identity(#[from] meshfed_identity::CaError),
    #[error(transparent)]
    Bundle(#[from] meshfed_identity::BundleError),
    #[error(transparent)]
    Fs(#[from] meshfed_identity::fs::FsError),
    #[error("connect to the federation: {0}")]
    Connect(#[from] tls::ConnectError),
    #[error("{what}: {detail}")]
    Other { what: String, detail: String },
    /// The federation said no; `refusal` is its typed reason (from the status metadata),
    /// `None` for a code this build does not know.
    #[error("federation refused: {message}")]
    Refused {
        refusal: Option<Refusal>,
        message: String,
    },
    /// Not a source: the message already says it, and a source would print it twice.
    #[error("join token: {0}")]
    Token(TokenError),
}

impl From<TokenError> for ClientError {
    fn from(e: TokenError) -> Self {
        Self::Token(e)
    }
}

fn other(what: impl Into<String>, detail: impl ToString) -> ClientError {
    ClientError::Other {
        what: what.into(),
        detail: detail.to_string(),
    }
}

fn refused(s: tonic::Status) -> ClientError {
    ClientError::Refused {
        refusal: Refusal::of_status(&s),
        message: s.message().to_owned(),
    }
}

/// A client of a running node, authenticated with `cert`/`key`.
pub async fn client(
    addresses: &[String],
    federation_bundle: TrustBundle,
    cert: &Path,
    key: &Path,
) -> Result<pb::federation_client::FederationClient<tonic::transport::Channel>, ClientError> {
    // A renewal replaces the certificate and then the key (each by rename): a read
    // between the two sees a pair that does not match, so read again a few times.
    let mut tries = 0;
    let resolver = loop {
        let svid = Svid::load(cert, key)?;
        match SvidResolver::new(&svid) {
            Ok(r) => break Arc::new(r),
            Err(_) if tries < 10 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(other("SVID", e)),
        }
    };
    let ch = tls::connect(
        addresses,
        ClientTrust::Mutual {
            federation_bundle,
            svid: resolver,
        },
    )
    .await?;
    Ok(pb::federation_client::FederationClient::new(ch))
}

/// A client of the node running from `dir`, as its operator (the admin SVID).
async fn operator_client(
    dir: &Path,
) -> Result<pb::federation_client::FederationClient<tonic::transport::Channel>, ClientError> {
    let ca = Ca::load(&dir.join("ca"))?;
    let addr = std::fs::read_to_string(dir.join("address")).map_err(|e| {
        other(
            format!("{}/address (is the federation running?)", dir.display()),
            e,
        )
    })?;
    client(
        &[addr.trim().to_owned()],
        ca.bundle(1),
        &dir.join("admin.pem"),
        &dir.join("admin.key"),
    )
    .await
}

/// `meshfed federation token create`: asks the running node for a token.
/// `trust_domain` binds the site to that trust domain; `share` lets it join one that
/// other sites already own.
pub async fn create_token(
    dir: &Path,
    site: &str,
    ttl: Duration,
    trust_domain: Option<&TrustDomain>,
    share: bool,
) -> Result<(String, i64), ClientError> {
    let mut c = operator_client(dir).await?;
    let r = c
        .create_token(pb::CreateTokenRequest {
            site: site.to_owned(),
            ttl_seconds: ttl.as_secs(),
            trust_domain: trust_domain.map(|t| t.to_string()).unwrap_or_default(),
            share_trust_domain: share,
        })
        .await
        .map_err(refused)?
        .into_inner();
    Ok((r.token, r.expires_unix))
}

/// `meshfed federation site remove`: removes a site, its exports and (unless another
/// site shares its trust domain) its bundle, as the federation's operator.
pub async fn remove_site(dir: &Path, site: &str) -> Result<u64, ClientError> {
    let mut c = operator_client(dir).await?;
    Ok(c.remove_site(pb::RemoveSiteRequest {
        site: site.to_owned(),
    })
    .await
    .map_err(refused)?
    .into_inner()
    .revision)
}

/// `meshfed status`: the running node's view of every site.
pub async fn status(dir: &Path) -> Result<pb::StatusResponse, ClientError> {
    let mut c = operator_client(dir).await?;
    Ok(c.status(pb::StatusRequest {})
        .await
        .map_err(refused)?
        .into_inner())
}

/// Renders a status as the table `meshfed status` prints.
pub fn status_table(td: &str, s: &pb::StatusResponse) -> String {
    use std::fmt::Write;
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let mut out = format!("federation {td} at revision {}\n", s.revision);
    let _ = writeln!(
        out,
        "{:<10} {:<22} {:<6} {:>7} {:>6}  {:<28} IMPORTS",
        "SITE", "TRUST DOMAIN", "LEASE", "STREAMS", "SEEN", "EXPORTS"
    );
    for site in &s.sites {
        let _ = writeln!(
            out,
            "{:<10} {:<22} {:<6} {:>7} {:>6}  {:<28} {}",
            site.site,
            site.trust_domain,
            if site.up { "up" } else { "down" },
            site.watch_streams,
            site.last_seen_revision,
            list(&site.exports),
            list(&site.imports)
        );
        let _ = writeln!(
            out,
            "{:<10} gateways: {}",
            "",
            list(&site.gateway_addresses)
        );
        for l in &site.links {
            let _ = writeln!(
                out,
                "{:<10} link → {} {} {}: {}",
                "",
                l.peer_site,
                l.address,
                if l.transport.is_empty() {
                    "down"
                } else {
                    &l.transport
                },
                l.reason
            );
        }
    }
    for c in &s.policy_conflicts {
        let _ = writeln!(out, "policy conflict: {c}");
    }
    out
}

/// `meshfed status --json`: the same facts as [`status_table`], as one JSON document
/// (`federation`, `revision`, `sites[]` with `lease` "up"/"down" and `links[]` with
/// `transport` `null` for a link that is down). Field names are stable.
pub fn status_json(td: &str, s: &pb::StatusResponse) -> serde_json::Value {
    let sites: Vec<serde_json::Value> = s
        .sites
        .iter()
        .map(|site| {
            let links: Vec<serde_json::Value> = site
                .links
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "peer_site": l.peer_site,
                        "address": l.address,
                        "transport": (!l.transport.is_empty()).then_some(&l.transport),
                        "up": !l.transport.is_empty(),
                        "reason": l.reason,
                        "reported_by_replica": l.replica,
                    })
                })
                .collect();
            serde_json::json!({
                "site": site.site,
                "trust_domain": site.trust_domain,
                "lease": if site.up { "up" } else { "down" },
                "watch_streams": site.watch_streams,
                "last_seen_revision": site.last_seen_revision,
                "gateway_addresses": site.gateway_addresses,
                "exports": site.exports,
                "imports": site.imports,
                "links": links,
            })
        })
        .collect();
    serde_json::json!({
        "federation": td,
        "revision": s.revision,
        "sites": sites,
        "policy_conflicts": s.policy_conflicts,
    })
}

/// `meshfed site join`: redeems `token` for the site in `site_dir`.
pub async fn join(
    site_dir: &Path,
    site: &str,
    token: &str,
    gateway_addresses: Vec<String>,
) -> Result<Membership, ClientError> {
    let token = JoinToken::decode(token)?;
    // Concurrent joins and registrations on this directory take turns.
    let _lock = lock_site_dir(site_dir)?;
    let ca = Ca::load(&site_dir.join("ca"))?;
    let td = ca.trust_domain().clone();
    let fed_td = token.federation_trust_domain.clone();
    let ch = tls::connect(
        &token.addresses,
        ClientTrust::Pinned {
            fingerprint: token.ca_fingerprint.clone(),
            federation_td: fed_td.clone(),
        },
    )
    .await?;
    let mut c = pb::federation_client::FederationClient::new(ch);
    let r = c
        .join(pb::JoinRequest {
            token: token.encode(),
            site: site.to_owned(),
            trust_domain: td.to_string(),
            bundle_jwks: ca.bundle(1).to_jwks()?,
            gateway_addresses,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let bundles_dir = site_dir.join("bundles");
    std::fs::create_dir_all(&bundles_dir)
        .map_err(|e| other(bundles_dir.display().to_string(), e))?;
    for (t, jwks) in &r.bundles {
        let t = TrustDomain::new(t).map_err(|e| other("bundle trust domain", e))?;
        TrustBundle::from_jwks(t.clone(), jwks.as_bytes())?;
        write_file(
            &bundles_dir.join(format!("{t}.json")),
            jwks.as_bytes(),
            0o644,
        )?;
    }
    let m = Membership {
        federation_trust_domain: TrustDomain::new(&r.federation_trust_domain)
            .map_err(|e| other("federation trust domain", e))?,
        addresses: token.addresses.clone(),
        revision: r.revision,
    };
    let json = serde_json::to_vec_pretty(&m).map_err(|e| other("membership", e))?;
    write_file(&site_dir.join(Membership::FILE), &json, 0o644)?;
    Ok(m)
}

/// `meshfed site update-bundle`: replaces the site's trust bundle at the federation (a
/// root rotation), as the site's gateway (`cert`/`key`). Returns the sequence stored.
pub async fn update_bundle(
    site_dir: &Path,
    cert: &Path,
    key: &Path,
    bundle_jwks: String,
) -> Result<u64, ClientError> {
    let path = site_dir.join(Membership::FILE);
    let json = std::fs::read(&path).map_err(|e| {
        other(
            format!("{} (run `meshfed site join` first)", path.display()),
            e,
        )
    })?;
    let m: Membership =
        serde_json::from_slice(&json).map_err(|e| other(path.display().to_string(), e))?;
    let td = &m.federation_trust_domain;
    let fed = site_dir.join("bundles").join(format!("{td}.json"));
    let fed_json = std::fs::read(&fed).map_err(|e| other(fed.display().to_string(), e))?;
    let fed_bundle = TrustBundle::from_jwks(td.clone(), &fed_json)?;
    let mut c = client(&m.addresses, fed_bundle, cert, key).await?;
    let r = c
        .update_bundle(pb::UpdateBundleRequest { bundle_jwks })
        .await
        .map_err(refused)?
        .into_inner();
    Ok(r.sequence)
}
