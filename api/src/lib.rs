//! The federation API as a site uses it: the wire form of `meshfed.federation.v1` (proto
//! in `proto/`, generated code checked in under `src/gen/`, so building needs no
//! `protoc`), its mapping to the catalog model, the typed refusals, and the client
//! (`client`: join, token, status, an authenticated channel) with its TLS (`tls`).
//! Conversions from the wire are fallible and name the bad field.
#![forbid(unsafe_code)]

pub mod client;
pub mod parts;
pub mod tls;

use std::collections::BTreeMap;

use meshfed_identity::{SpiffeId, TrustDomain};

use meshfed_catalog::catalog::{
    AppProtocol, Change, Delta, Export, ExportedPort, Protocol, Revision, SiteRecord,
};
use meshfed_catalog::names::{ServiceName, SiteName};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    include!("gen/meshfed.federation.v1.rs");
}

/// gRPC metadata key carrying a refusal's stable code.
pub const REASON_KEY: &str = "meshfed-reason";

/// Why the federation refused a call. [`Refusal::code`] is stable: it travels in the
/// `meshfed-reason` metadata, labels `meshfed_federation_refusals_total` and is the log
/// field, so a client, a dashboard and a log search all see the same word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    BadRequest,
    Unauthenticated,
    NotOperator,
    NotAGateway,
    UnknownSite,
    PublishForeignSite,
    CatalogConflict,
    StoreUnavailable,
    StoreError,
    TokenMalformed,
    TokenUnknown,
    TokenExpired,
    TokenReused,
    TokenWrongSite,
    TrustDomainMismatch,
    TrustDomainOwned,
    /// A bundle update whose `spiffe_sequence` is not above the stored one.
    StaleBundle,
    /// The replica is shutting down: its Watch and Bundles streams end with this, and
    /// the watcher resumes (at another replica, or at this one once restarted).
    Draining,
}

impl Refusal {
    /// Every refusal, for tables and tests.
    pub const ALL: [Refusal; 18] = [
        Self::BadRequest,
        Self::Unauthenticated,
        Self::NotOperator,
        Self::NotAGateway,
        Self::UnknownSite,
        Self::PublishForeignSite,
        Self::CatalogConflict,
        Self::StoreUnavailable,
        Self::StoreError,
        Self::TokenMalformed,
        Self::TokenUnknown,
        Self::TokenExpired,
        Self::TokenReused,
        Self::TokenWrongSite,
        Self::TrustDomainMismatch,
        Self::TrustDomainOwned,
        Self::StaleBundle,
        Self::Draining,
    ];

    /// The stable code (wire metadata, metric label, log field).
    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthenticated => "unauthenticated",
            Self::NotOperator => "not_operator",
            Self::NotAGateway => "not_a_gateway",
            Self::UnknownSite => "unknown_site",
            Self::PublishForeignSite => "publish_foreign_site",
            Self::CatalogConflict => "catalog_conflict",
            Self::StoreUnavailable => "store_unavailable",
            Self::StoreError => "store_error",
            Self::TokenMalformed => "token_malformed",
            Self::TokenUnknown => "token_unknown",
            Self::TokenExpired => "token_expired",
            Self::TokenReused => "token_reused",
            Self::TokenWrongSite => "token_wrong_site",
            Self::TrustDomainMismatch => "trust_domain_mismatch",
            Self::TrustDomainOwned => "trust_domain_owned",
            Self::StaleBundle => "stale_bundle",
            Self::Draining => "draining",
        }
    }

    /// The refusal a code names; `None` for a code this build does not know (a newer
    /// federation's).
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The gRPC status code it travels with.
    pub fn grpc(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::BadRequest | Self::TokenMalformed => Code::InvalidArgument,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::CatalogConflict | Self::StaleBundle => Code::FailedPrecondition,
            Self::StoreUnavailable | Self::Draining => Code::Unavailable,
            Self::StoreError => Code::Internal,
            Self::NotOperator
            | Self::NotAGateway
            | Self::UnknownSite
            | Self::PublishForeignSite
            | Self::TokenUnknown
            | Self::TokenExpired
            | Self::TokenReused
            | Self::TokenWrongSite
            | Self::TrustDomainMismatch
            | Self::TrustDomainOwned => Code::PermissionDenied,
        }
    }

    /// The refusal of a join token problem.
    pub fn of_token(e: &meshfed_catalog::token::TokenError) -> Self {
        use meshfed_catalog::token::TokenError as T;
        match e {
            T::Malformed(_) => Self::TokenMalformed,
            T::Unknown => Self::TokenUnknown,
            T::Expired { .. } => Self::TokenExpired,
            T::AlreadyUsed { .. } => Self::TokenReused,
            T::WrongSite { .. } => Self::TokenWrongSite,
            T::TrustDomainMismatch { .. } => Self::TrustDomainMismatch,
            T::TrustDomainOwned { .. } => Self::TrustDomainOwned,
            // A problem added to the token module later: its own code, if it is one of ours.
            other => Self::from_code(other.code()).unwrap_or(Self::TokenMalformed),
        }
    }

    /// The status on the wire: the code in the metadata, and in the message for people.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        let mut s =
            tonic::Status::new(self.grpc(), format!("[{}] {}", self.code(), message.into()));
        s.metadata_mut().insert(
            REASON_KEY,
            tonic::metadata::MetadataValue::from_static(self.code()),
        );
        s
    }

    /// The refusal a status carries, read from its metadata (never from its text).
    pub fn of_status(s: &tonic::Status) -> Option<Self> {
        reason_of(s).and_then(Self::from_code)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// The stable reason code a status carries, known to this build or not.
pub fn reason_of(s: &tonic::Status) -> Option<&str> {
    s.metadata().get(REASON_KEY).and_then(|v| v.to_str().ok())
}

/// A wire message that does not convert to the model, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        Refusal::BadRequest.status(e.to_string())
    }
}

fn bad(field: &str, e: impl std::fmt::Display) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason: e.to_string(),
    }
}

// === to the wire ===

impl From<&ExportedPort> for pb::Port {
    fn from(p: &ExportedPort) -> Self {
        Self {
            port: u32::from(p.port),
            protocol: match p.protocol {
                Protocol::Tcp => "tcp".into(),
                Protocol::Udp => "udp".into(),
            },
            name: p.name.clone().unwrap_or_default(),
            // Empty for bytes, as an older federation sends it.
            app_protocol: if !p.app_protocol.is_tcp() {
                p.app_protocol.as_str().into()
            } else {
                String::new()
            },
        }
    }
}

impl From<&Export> for pb::ServiceExport {
    fn from(e: &Export) -> Self {
        Self {
            http_policy: e
                .http_policy
                .as_ref()
                .and_then(|p| serde_json::to_string(p).ok())
                .unwrap_or_default(),
            service: e.service.to_string(),
            ports: e.ports.iter().map(Into::into).collect(),
            ready_endpoints: e.ready_endpoints,
            identities: e.identities.iter().map(|i| i.to_string()).collect(),
            locality: e.locality.clone().unwrap_or_default(),
            labels: e.labels.clone().into_iter().collect(),
            hosts: e.hosts.clone(),
            endpoint_labels: e
                .endpoint_labels
                .iter()
                .map(|l| pb::EndpointLabels {
                    labels: l.labels.clone().into_iter().collect(),
                    endpoints: l.endpoints,
                })
                .collect(),
        }
    }
}

impl From<&SiteRecord> for pb::Site {
    fn from(r: &SiteRecord) -> Self {
        Self {
            site: r.site.to_string(),
            trust_domain: r.trust_domain.to_string(),
            gateway_addresses: r.gateway_addresses.clone(),
            up: r.up,
        }
    }
}

/// A change encoded, as a [`pb::WatchFrame`] carries it; `revision` 0 inside snapshots.
pub fn change_to_wire(revision: Revision, c: &Change) -> prost::bytes::Bytes {
    prost::Message::encode_to_vec(&change_to_pb(revision, c)).into()
}

/// A change on the wire; `revision` 0 inside snapshots.
pub fn change_to_pb(revision: Revision, c: &Change) -> pb::Change {
    use pb::change::Op;
    let op = match c {
        Change::PutSite(r) => Op::PutSite(r.into()),
        Change::DeleteSite { site } => Op::DeleteSite(site.to_string()),
        Change::PutExport { site, export } => Op::PutExport(pb::SiteExport {
            site: site.to_string(),
            export: Some(export.into()),
        }),
        Change::DeleteExport { site, service } => Op::DeleteExport(pb::SiteService {
            site: site.to_string(),
            service: service.to_string(),
        }),
    };
    pb::Change {
        revision: revision.0,
        op: Some(op),
    }
}

// === from the wire ===

/// The longest `locality` an export may carry (three DNS-label-sized parts).
pub const MAX_LOCALITY: usize = 3 * 64;

/// The longest app protocol name an export's port may carry.
pub const MAX_PROTOCOL_NAME: usize = 32;

/// Whether `s` could name an app protocol: 1 to [`MAX_PROTOCOL_NAME`] lowercase letters,
/// digits and `-`, starting with a letter.
fn is_protocol_token(s: &str) -> bool {
    s.len() <= MAX_PROTOCOL_NAME
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn export_from_pb(e: pb::ServiceExport, field: &str) -> Result<Export, FieldError> {
    let service =
        ServiceName::parse(&e.service).map_err(|err| bad(&format!("{field}.service"), err))?;
    let ports = e
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = format!("{field}.ports[{i}]");
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&format!("{f}.port"), format!("{} is not a port", p.port)))?;
            let protocol = match p.protocol.as_str() {
                "tcp" | "" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    return Err(bad(
                        &format!("{f}.protocol"),
                        format!("{other:?} is not tcp or udp"),
                    ));
                }
            };
            let app_protocol = match AppProtocol::parse(&p.app_protocol) {
                Some(a) if protocol == Protocol::Udp && !a.is_tcp() => {
                    return Err(bad(
                        &format!("{f}.app_protocol"),
                        format!("{a} on a UDP port"),
                    ));
                }
                Some(a) => a,
                // A protocol a newer site knows and this build does not: its bytes are
                // carried as they are, so mixed versions keep working (without what
                // the newer protocol adds, such as routing by it).
                None if is_protocol_token(&p.app_protocol) => AppProtocol::Tcp,
                None => {
                    return Err(bad(
                        &format!("{f}.app_protocol"),
                        format!(
                            "{:?} is not tcp, http, http2, grpc or tls, nor a protocol name (at most {MAX_PROTOCOL_NAME} of a-z, 0-9, -)",
                            p.app_protocol
                        ),
                    ));
                }
            };
            Ok(ExportedPort {
                port,
                protocol,
                name: (!p.name.is_empty()).then(|| p.name.clone()),
                app_protocol,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ports.is_empty() {
        return Err(bad(
            &format!("{field}.ports"),
            "an export needs at least one port",
        ));
    }
    let hosts = e
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            let ok = !h.is_empty()
                && h.len() <= 253
                && h.split('.').all(|l| {
                    (1..=63).contains(&l.len())
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
                });
            if ok {
                Ok(h)
            } else {
                Err(bad(
                    &format!("{field}.hosts[{i}]"),
                    format!("{h:?} is not a DNS name"),
                ))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let identities = e
        .identities
        .iter()
        .enumerate()
        .map(|(i, s)| SpiffeId::new(s).map_err(|err| bad(&format!("{field}.identities[{i}]"), err)))
        .collect::<Result<Vec<_>, _>>()?;
    let http_policy =
        http_policy_from_pb(&e.http_policy, &service, &format!("{field}.http_policy"))?;
    if e.endpoint_labels.len() > meshfed_catalog::catalog::MAX_ENDPOINT_LABEL_SETS {
        return Err(bad(
            &format!("{field}.endpoint_labels"),
            format!(
                "{} label sets, at most {}",
                e.endpoint_labels.len(),
                meshfed_catalog::catalog::MAX_ENDPOINT_LABEL_SETS
            ),
        ));
    }
    let label_bytes: usize = e
        .endpoint_labels
        .iter()
        .flat_map(|l| l.labels.iter())
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if label_bytes > ENDPOINT_LABELS_MAX {
        return Err(bad(
            &format!("{field}.endpoint_labels"),
            format!("{label_bytes} bytes of labels, at most {ENDPOINT_LABELS_MAX}"),
        ));
    }
    let endpoint_labels = e
        .endpoint_labels
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let labels: BTreeMap<String, String> = l.labels.into_iter().collect();
            meshfed_catalog::http_route::check_labels(&labels)
                .map_err(|(k, m)| bad(&format!("{field}.endpoint_labels[{i}].labels{k}"), m))?;
            Ok(meshfed_catalog::catalog::EndpointLabels {
                labels,
                endpoints: l.endpoints,
            })
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    if !e.locality.is_empty() {
        if e.locality.len() > MAX_LOCALITY {
            return Err(bad(
                &format!("{field}.locality"),
                format!("longer than {MAX_LOCALITY} bytes"),
            ));
        }
        meshfed_catalog::locality::check(&e.locality)
            .map_err(|m| bad(&format!("{field}.locality"), m))?;
    }
    // The site's own labels (`federation.labels`): Kubernetes label syntax, bounded.
    let labels: BTreeMap<String, String> = e.labels.into_iter().collect();
    meshfed_catalog::http_route::check_labels(&labels)
        .map_err(|(k, m)| bad(&format!("{field}.labels{k}"), m))?;
    Ok(Export {
        endpoint_labels,
        http_policy: http_policy.map(Box::new),
        service,
        ports,
        ready_endpoints: e.ready_endpoints,
        identities,
        locality: (!e.locality.is_empty()).then_some(e.locality),
        labels,
        hosts,
    })
}

/// The most bytes (keys and values) of endpoint labels one published export may carry,
/// so a site cannot grow every other site's catalog without bound.
pub const ENDPOINT_LABELS_MAX: usize = 16 * 1024;

/// The most bytes a published HTTP policy may have.
pub const HTTP_POLICY_MAX: usize = 64 * 1024;

/// A published HTTP policy: JSON of the model, for `service`, valid (it compiles), within
/// [`HTTP_POLICY_MAX`]. Empty: none.
fn http_policy_from_pb(
    json: &str,
    service: &ServiceName,
    field: &str,
) -> Result<Option<meshfed_catalog::http_route::HttpPolicy>, FieldError> {
    if json.is_empty() {
        return Ok(None);
    }
    if json.len() > HTTP_POLICY_MAX {
        return Err(bad(
            field,
            format!("{} bytes; at most {HTTP_POLICY_MAX}", json.len()),
        ));
    }
    let p: meshfed_catalog::http_route::HttpPolicy =
        serde_json::from_str(json).map_err(|e| bad(field, e))?;
    if &p.service != service {
        return Err(bad(
            &format!("{field}.service"),
            format!("{} is not the export's service {service}", p.service),
        ));
    }
    p.clone()
        .compile()
        .map_err(|e| bad(&format!("{field}.{}", e.field), e.message))?;
    Ok(Some(p))
}

pub fn site_from_pb(s: pb::Site) -> Result<SiteRecord, FieldError> {
    Ok(SiteRecord {
        site: SiteName::new(&s.site).map_err(|e| bad("site", e))?,
        trust_domain: TrustDomain::new(&s.trust_domain).map_err(|e| bad("trust_domain", e))?,
        gateway_addresses: s.gateway_addresses,
        up: s.up,
    })
}

/// A wire change back into the model (what a watching site applies).
pub fn change_from_pb(c: pb::Change) -> Result<Delta, FieldError> {
    use pb::change::Op;
    let change = match c.op.ok_or_else(|| bad("change.op", "missing"))? {
        Op::PutSite(s) => Change::PutSite(site_from_pb(s)?),
        Op::DeleteSite(s) => Change::DeleteSite {
            site: SiteName::new(&s).map_err(|e| bad("delete_site", e))?,
        },
        Op::PutExport(pe) => Change::PutExport {
            site: SiteName::new(&pe.site).map_err(|e| bad("put_export.site", e))?,
            export: export_from_pb(
                pe.export
                    .ok_or_else(|| bad("put_export.export", "missing"))?,
                "put_export.export",
            )?,
        },
        Op::DeleteExport(d) => Change::DeleteExport {
            site: SiteName::new(&d.site).map_err(|e| bad("delete_export.site", e))?,
            service: ServiceName::parse(&d.service).map_err(|e| bad("delete_export.service", e))?,
        },
    };
    Ok(Delta {
        revision: Revision(c.revision),
        change,
    })
}

/// A wire change as a watching gateway reads it: [`change_from_pb`], except that an
/// export whose HTTP policy does not read (a newer site's field, say) is kept without
/// it, the policy's error returned beside it, so one unreadable policy neither stops a
/// gateway's catalog nor drops the service. Anything else unreadable is an error.
pub fn change_from_pb_watched(
    mut c: pb::Change,
) -> Result<(Delta, Option<FieldError>), FieldError> {
    // The policy aside, the change read without it, then the policy on its own.
    let policy = match &mut c.op {
        Some(pb::change::Op::PutExport(pb::SiteExport {
            export: Some(x), ..
        })) => std::mem::take(&mut x.http_policy),
        _ => String::new(),
    };
    let mut d = change_from_pb(c)?;
    if let Change::PutExport { export, .. } = &mut d.change
        && !policy.is_empty()
    {
        let field = "put_export.export.http_policy";
        match http_policy_from_pb(&policy, &export.service, field) {
            Ok(p) => export.http_policy = p.map(Box::new),
            Err(e) => return Ok((d, Some(e))),
        }
    }
    Ok((d, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn generated_code_is_fresh() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = std::env::temp_dir().join(format!("meshfed-proto-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        tonic_prost_build::configure()
            .bytes(".meshfed.federation.v1.WatchFrame.changes")
            .out_dir(&out)
            .emit_rerun_if_changed(false)
            .compile_protos(&[root.join("proto/meshfed/federation/v1/federation.proto")], &[root.join("proto")])
            .expect("protoc must be installed (apt-get install protobuf-compiler; tests/run.sh does it)");
        let fresh = std::fs::read_to_string(out.join("meshfed.federation.v1.rs")).unwrap();
        let checked_in = root.join("src/gen/meshfed.federation.v1.rs");
        if std::env::var_os("MESHFED_BLESS").is_some() {
            std::fs::write(&checked_in, &fresh).unwrap();
        }
        let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&out);
        assert!(
            current == fresh,
            "src/gen/meshfed.federation.v1.rs is stale: MESHFED_BLESS=1 cargo test -p meshfed-api generated_code"
        );
    }

    #[test]
    fn refusal_codes_are_stable_and_round_trip() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Refusal::ALL {
            assert!(seen.insert(r.code()), "{} twice", r.code());
            assert_eq!(Refusal::from_code(r.code()), Some(r));
            let s = r.status("why");
            assert_eq!(Refusal::of_status(&s), Some(r));
            assert_eq!(s.code(), r.grpc());
            assert_eq!(s.message(), format!("[{}] why", r.code()));
        }
        // A newer federation's code: known as a string, not as a refusal.
        let mut s = tonic::Status::permission_denied("x");
        s.metadata_mut().insert(
            REASON_KEY,
            tonic::metadata::MetadataValue::from_static("from_the_future"),
        );
        assert_eq!(reason_of(&s), Some("from_the_future"));
        assert_eq!(Refusal::of_status(&s), None);
        // Every token problem has its refusal, with the token module's own code.
        use meshfed_catalog::token::TokenError;
        for e in [
            TokenError::Malformed("x".into()),
            TokenError::Unknown,
            TokenError::Expired {
                expired_at: 1,
                ago: 1,
            },
            TokenError::AlreadyUsed { used_at: 1 },
        ] {
            assert_eq!(Refusal::of_token(&e).code(), e.code());
        }
    }

    #[test]
    fn export_round_trip_and_field_errors() {
        let e = Export {
            endpoint_labels: vec![meshfed_catalog::catalog::EndpointLabels {
                labels: [("version".to_string(), "v1".to_string())].into(),
                endpoints: 2,
            }],
            http_policy: None,
            service: ServiceName::parse("orders.shop").unwrap(),
            ports: vec![ExportedPort {
                app_protocol: Default::default(),
                port: 53,
                protocol: Protocol::Udp,
                name: Some("dns".into()),
            }],
            ready_endpoints: 2,
            identities: vec![SpiffeId::new("spiffe://west/ns/shop/sa/orders").unwrap()],
            locality: Some("eu-west-1a".into()),
            labels: [("version".to_string(), "v2".to_string())].into(),
            hosts: vec!["billing.corp.example".into()],
        };
        let wire: pb::ServiceExport = (&e).into();
        assert_eq!(export_from_pb(wire.clone(), "exports[0]").unwrap(), e);
        for loc in ["eu//a", "a/b/c/d", "eu-*", &"x".repeat(200)] {
            let mut bad_loc = wire.clone();
            bad_loc.locality = loc.to_string();
            let e = export_from_pb(bad_loc, "exports[0]").unwrap_err();
            assert_eq!(e.field, "exports[0].locality", "{loc}");
        }
        // A newer site's app protocol reads as bytes; what names none is an error.
        for (name, want) in [
            ("quic-datagrams", Some(AppProtocol::Tcp)),
            ("h3", Some(AppProtocol::Tcp)),
            ("tls", Some(AppProtocol::Tls)),
            ("HTTP", None),
            ("3d", None),
            ("a b", None),
            (&"x".repeat(MAX_PROTOCOL_NAME + 1), None),
        ] {
            let mut tcp = wire.clone();
            tcp.ports[0].protocol = "tcp".into();
            tcp.ports[0].app_protocol = name.to_string();
            let got = export_from_pb(tcp, "exports[0]");
            match want {
                Some(a) => assert_eq!(got.unwrap().ports[0].app_protocol, a, "{name}"),
                None => assert_eq!(
                    got.unwrap_err().field,
                    "exports[0].ports[0].app_protocol",
                    "{name}"
                ),
            }
        }
        let mut bad_port = wire.clone();
        bad_port.ports[0].port = 70000;
        let e = export_from_pb(bad_port, "exports[0]").unwrap_err();
        assert_eq!(e.field, "exports[0].ports[0].port");
        let s = tonic::Status::from(e);
        assert_eq!(Refusal::of_status(&s), Some(Refusal::BadRequest));
        let mut bad_id = wire.clone();
        bad_id.identities = vec!["spiffe://west/a/".into()];
        assert_eq!(
            export_from_pb(bad_id, "x").unwrap_err().field,
            "x.identities[0]"
        );
        let mut bad_label = wire.clone();
        bad_label.endpoint_labels[0]
            .labels
            .insert("version".into(), "v 1".into());
        assert_eq!(
            export_from_pb(bad_label, "x").unwrap_err().field,
            "x.endpoint_labels[0].labels.version"
        );
        // The site's own labels: the same syntax, and at most MAX_LABELS of them.
        let mut bad_site_label = wire.clone();
        bad_site_label
            .labels
            .insert("net work".into(), "dc1".into());
        assert_eq!(
            export_from_pb(bad_site_label, "x").unwrap_err().field,
            "x.labels.net work"
        );
        let mut many_site_labels = wire.clone();
        many_site_labels.labels = (0..=meshfed_catalog::http_route::MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(
            export_from_pb(many_site_labels, "x").unwrap_err().field,
            "x.labels"
        );
        let mut site_label = wire.clone();
        site_label
            .labels
            .insert("topology.istio.io/network".into(), "dc1".into());
        assert_eq!(
            export_from_pb(site_label, "x").unwrap().labels["topology.istio.io/network"],
            "dc1"
        );
        let mut too_big = wire.clone();
        too_big.endpoint_labels = (0..40)
            .map(|i| pb::EndpointLabels {
                labels: (0..10)
                    .map(|j| (format!("k{j}"), format!("{i}-{}", "v".repeat(40))))
                    .collect(),
                endpoints: 1,
            })
            .collect();
        assert_eq!(
            export_from_pb(too_big, "x").unwrap_err().field,
            "x.endpoint_labels"
        );
        let mut too_many = wire;
        too_many.endpoint_labels = vec![too_many.endpoint_labels[0].clone(); 65];
        assert_eq!(
            export_from_pb(too_many, "x").unwrap_err().field,
            "x.endpoint_labels"
        );
    }

    #[test]
    fn a_published_http_policy_is_checked_on_the_way_in() {
        use meshfed_catalog::http_route::{Destination, HttpPolicy, HttpRoute};
        let service = ServiceName::parse("web.demo").unwrap();
        let policy = HttpPolicy {
            connection_pool: None,
            locality_lb: None,
            port_settings: vec![],
            export_to: Vec::new(),
            retry_budget: None,
            tcp_routes: Vec::new(),
            tls_routes: Vec::new(),
            service: service.clone(),
            source: "VirtualService demo/web".into(),
            routes: vec![HttpRoute {
                destinations: vec![Destination {
                    service: None,
                    port: None,
                    subset: None,
                    weight: 100,
                    headers: None,
                }],
                ..Default::default()
            }],
            subsets: vec![],
            max_requests: Some(8),
            max_requests_per_connection: Some(100),
            idle_timeout_ms: Some(30_000),
            connect_timeout_ms: None,
            tcp_keepalive: None,
            outlier: None,
            load_balancer: None,
            consistent_hash: None,
        };
        let e = Export {
            endpoint_labels: Vec::new(),
            http_policy: Some(Box::new(policy.clone())),
            service: service.clone(),
            ports: vec![ExportedPort {
                app_protocol: AppProtocol::Http,
                port: 80,
                protocol: Protocol::Tcp,
                name: None,
            }],
            ready_endpoints: 1,
            identities: vec![],
            locality: None,
            labels: Default::default(),
            hosts: vec![],
        };
        let wire: pb::ServiceExport = (&e).into();
        assert_eq!(wire.ports[0].app_protocol, "http");
        assert_eq!(export_from_pb(wire.clone(), "exports[0]").unwrap(), e);
        // (what a malicious or newer site sends) → the field named
        let weights = {
            let mut p = policy.clone();
            p.routes[0].destinations.push(Destination {
                service: None,
                port: None,
                subset: None,
                weight: 2_000_000,
                headers: None,
            });
            serde_json::to_string(&p).unwrap()
        };
        let other = {
            let mut p = policy.clone();
            p.service = ServiceName::parse("admin.demo").unwrap();
            serde_json::to_string(&p).unwrap()
        };
        let unknown =
            serde_json::to_string(&policy)
                .unwrap()
                .replacen('{', r#"{"mirror_all":true,"#, 1);
        let huge = format!(
            "{}{}",
            serde_json::to_string(&policy).unwrap(),
            " ".repeat(HTTP_POLICY_MAX)
        );
        let rows = [
            (
                weights,
                "exports[0].http_policy.routes[0].destinations[1].weight",
            ),
            (other, "exports[0].http_policy.service"),
            (unknown, "exports[0].http_policy"),
            (huge, "exports[0].http_policy"),
            ("{not json".into(), "exports[0].http_policy"),
        ];
        for (json, field) in rows {
            let mut w = wire.clone();
            w.http_policy = json;
            let err = export_from_pb(w, "exports[0]").unwrap_err();
            assert_eq!(err.field, field, "{}", err.reason);
        }
        let mut udp_http = wire;
        udp_http.ports[0].protocol = "udp".into();
        assert_eq!(
            export_from_pb(udp_http, "exports[0]").unwrap_err().field,
            "exports[0].ports[0].app_protocol"
        );
    }

    #[test]
    fn changes_round_trip() {
        let site = SiteRecord {
            site: SiteName::new("west").unwrap(),
            trust_domain: TrustDomain::new("west.example.org").unwrap(),
            gateway_addresses: vec!["192.0.2.1:15443".into()],
            up: true,
        };
        for c in [
            Change::PutSite(site),
            Change::DeleteSite {
                site: SiteName::new("west").unwrap(),
            },
            Change::DeleteExport {
                site: SiteName::new("west").unwrap(),
                service: ServiceName::parse("a.b").unwrap(),
            },
        ] {
            let d = change_from_pb(change_to_pb(Revision(7), &c)).unwrap();
            assert_eq!(
                d,
                Delta {
                    revision: Revision(7),
                    change: c
                }
            );
        }
        assert!(
            change_from_pb(pb::Change {
                revision: 1,
                op: None
            })
            .is_err()
        );
    }
}
