//! Istio `ServiceEntry` and `WorkloadEntry` YAML, accepted as Istio documents them
//! (`networking.istio.io/v1`, `v1beta1`, `v1alpha3`; several documents per file), turned
//! into legacy services a site can export. Pure: text in, entries and warnings out.
//!
//! A field meshfed reads is checked and errors name the document and the field path; a
//! field meshfed does not support yet is a warning that names it, never silently
//! dropped; invalid YAML is an error with line and column.

use crate::virtual_service::HostOf;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use meshfed_catalog::authz::AuthorizationPolicy;
use meshfed_catalog::catalog::{AppProtocol, Protocol};
use meshfed_catalog::http_route::{HttpPolicy, Subset};
use meshfed_catalog::legacy::{
    HEALTH_PREFIX, HealthCheck, HealthKind, LegacyEndpoint, LegacyPort, LegacyService, Location,
    Resolution, TlsMode, TlsOrigination,
};
use meshfed_catalog::names::ServiceName;

/// `security.istio.io` versions of `AuthorizationPolicy`.
const SECURITY_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// An Istio duration in milliseconds: Go's `time.ParseDuration` form, as Istio reads
/// `google.protobuf.Duration` fields from YAML (`250ms`, `5s`, `1.5s`, `1m30s`, `1h`;
/// units `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), under Istio's `ValidateDuration`: at
/// least 1 ms, and a whole number of milliseconds. `None` when it is not one.
pub(crate) fn duration_ms(s: &str) -> Option<u64> {
    go_duration_ms(s).ok()
}

/// [`duration_ms`] with the reason a string is refused.
pub(crate) fn go_duration_ms(s: &str) -> Result<u64, &'static str> {
    const FORM: &str = "not a duration like 500ms, 1.5s, 1m30s or 1h";
    let rest = s.strip_prefix('+').unwrap_or(s);
    if rest.starts_with('-') {
        return Err("must be at least 1ms");
    }
    if rest.is_empty() {
        return Err(FORM);
    }
    if rest == "0" {
        return Err("must be at least 1ms");
    }
    // In nanoseconds, as Go keeps it (its limit: about 290 years).
    let mut total: u128 = 0;
    let mut rest = rest;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(FORM);
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, next) = after.split_at(unit_len);
        let per: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(FORM),
        };
        if int.len() > 20 || frac.len() > 20 {
            return Err(FORM);
        }
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| FORM)?
        };
        let mut part = whole.checked_mul(per).ok_or(FORM)?;
        if !frac.is_empty() {
            let digits: u128 = frac.parse().map_err(|_| FORM)?;
            let scale = 10u128.pow(frac.len() as u32);
            // Go truncates what is finer than a nanosecond.
            part = part
                .checked_add(digits.checked_mul(per).ok_or(FORM)? / scale)
                .ok_or(FORM)?;
        }
        total = total.checked_add(part).ok_or(FORM)?;
        if total > i64::MAX as u128 {
            return Err("too long");
        }
        rest = next;
    }
    if total < 1_000_000 {
        return Err("must be at least 1ms");
    }
    if !total.is_multiple_of(1_000_000) {
        return Err("only durations to ms precision are supported");
    }
    Ok((total / 1_000_000) as u64)
}

fn health_check(d: &mut Doc<'_>, ann: &BTreeMap<String, String>) -> Option<HealthCheck> {
    let get = |k: &str| ann.get(&format!("{HEALTH_PREFIX}{k}")).map(String::as_str);
    for k in ann.keys() {
        if let Some(rest) = k.strip_prefix(HEALTH_PREFIX)
            && ![
                "check",
                "path",
                "status",
                "port",
                "interval",
                "timeout",
                "healthy-threshold",
                "unhealthy-threshold",
            ]
            .contains(&rest)
        {
            d.err(
                format!("metadata.annotations.{k}"),
                "unknown health check setting",
            );
        }
    }
    let check = get("check")?;
    let field = |k: &str| format!("metadata.annotations.{HEALTH_PREFIX}{k}");
    let kind = match check {
        "tcp" => HealthKind::Tcp,
        "http" => {
            let path = get("path").unwrap_or("/").to_owned();
            if !path.starts_with('/') {
                d.err(field("path"), format!("{path:?} must start with /"));
            }
            let status = match get("status").map(str::parse::<u16>) {
                None => 200,
                Some(Ok(s @ 100..=599)) => s,
                Some(_) => {
                    d.err(field("status"), "must be an HTTP status (100–599)");
                    200
                }
            };
            HealthKind::Http { path, status }
        }
        other => {
            d.err(field("check"), format!("{other:?}: tcp or http"));
            return None;
        }
    };
    let mut ms = |k: &str, default: u64| match get(k) {
        None => default,
        Some(v) => go_duration_ms(v).unwrap_or_else(|why| {
            d.err(field(k), format!("{v:?}: {why}"));
            default
        }),
    };
    let interval_ms = ms("interval", 5000);
    let timeout_ms = ms("timeout", 1000);
    let mut count = |k: &str, default: u32| match get(k) {
        None => default,
        Some(v) => match v.parse::<u32>() {
            Ok(n @ 1..=100) => n,
            _ => {
                d.err(field(k), format!("{v:?} is not a count (1–100)"));
                default
            }
        },
    };
    let healthy_threshold = count("healthy-threshold", 2);
    let unhealthy_threshold = count("unhealthy-threshold", 3);
    let port = match get("port").map(str::parse::<u16>) {
        None => None,
        Some(Ok(p)) if p > 0 => Some(p),
        Some(_) => {
            d.err(field("port"), "is not a port (1–65535)");
            None
        }
    };
    Some(HealthCheck {
        kind,
        port,
        interval_ms,
        timeout_ms,
        healthy_threshold,
        unhealthy_threshold,
    })
}

/// A problem with one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based document index in the file.
    pub doc: usize,
    /// `Kind/name` when known.
    pub object: String,
    /// Dotted field path, e.g. `spec.ports[1].number`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use meshfed_catalog::names::clip;
        write!(
            f,
            "document {} ({}): {}: {}",
            self.doc,
            clip(&self.object, 120),
            clip(&self.field, 120),
            clip(&self.message, 400)
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("invalid YAML at line {line}, column {column}: {message}")]
    Yaml {
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// What a file registers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Registration {
    pub services: Vec<LegacyService>,
    /// AuthorizationPolicies, for the exported services they apply to.
    pub policies: Vec<AuthorizationPolicy>,
    /// HTTP routes (VirtualServices, with their DestinationRules' subsets), one per
    /// service.
    pub http_policies: Vec<HttpPolicy>,
    pub warnings: Vec<Problem>,
}

/// One document being read: its problems and warnings name it and the field.
pub(crate) struct Doc<'a> {
    index: usize,
    object: String,
    problems: &'a mut Vec<Problem>,
    warnings: &'a mut Vec<Problem>,
}

impl Doc<'_> {
    /// Problems found so far in the file (to tell whether a part added any).
    pub(crate) fn problem_count(&self) -> usize {
        self.problems.len()
    }
    pub(crate) fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            doc: self.index,
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }
    pub(crate) fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem {
            doc: self.index,
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }
    /// Warns about every key of `obj` not in `known`.
    pub(crate) fn unsupported(
        &mut self,
        path: &str,
        obj: &serde_json::Map<String, Value>,
        known: &[&str],
    ) {
        for k in obj.keys() {
            if !known.contains(&k.as_str()) {
                let field = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                self.warn(field, "not supported by meshfed yet; ignored");
            }
        }
    }
    /// An optional map at `field`: `None` when absent or null, and (an error) when it
    /// is not a map.
    pub(crate) fn opt_map<'v>(
        &mut self,
        v: Option<&'v Value>,
        field: &str,
    ) -> Option<&'v serde_json::Map<String, Value>> {
        match v? {
            Value::Null => None,
            Value::Object(m) => Some(m),
            _ => {
                self.err(field, "must be a map");
                None
            }
        }
    }

    pub(crate) fn str_list(&mut self, v: Option<&Value>, field: &str) -> Vec<String> {
        match v {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .filter_map(|(i, x)| match x {
                    Value::String(s) => Some(s.clone()),
                    _ => {
                        self.err(format!("{field}[{i}]"), "must be a string");
                        None
                    }
                })
                .collect(),
            Some(_) => {
                self.err(field, "must be a list of strings");
                vec![]
            }
        }
    }
    pub(crate) fn string_map(
        &mut self,
        v: Option<&Value>,
        field: &str,
    ) -> BTreeMap<String, String> {
        match v {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) => m
                .iter()
                .filter_map(|(k, x)| match x {
                    Value::String(s) => Some((k.clone(), s.clone())),
                    Value::Number(n) => Some((k.clone(), n.to_string())),
                    Value::Bool(b) => Some((k.clone(), b.to_string())),
                    _ => {
                        self.err(format!("{field}.{k}"), "must be a string");
                        None
                    }
                })
                .collect(),
            Some(_) => {
                self.err(field, "must be a map of strings");
                BTreeMap::new()
            }
        }
    }
    fn port_number(&mut self, v: Option<&Value>, field: &str) -> Option<u16> {
        match v? {
            Value::Number(n) => match n.as_u64() {
                Some(p @ 1..=65535) => Some(p as u16),
                _ => {
                    self.err(field, format!("{n} is not a port (1–65535)"));
                    None
                }
            },
            other => {
                self.err(field, format!("{other} is not a port number"));
                None
            }
        }
    }
    fn port_map(&mut self, v: Option<&Value>, field: &str) -> BTreeMap<String, u16> {
        match v {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) => m
                .iter()
                .filter_map(|(k, x)| {
                    self.port_number(Some(x), &format!("{field}.{k}"))
                        .map(|p| (k.clone(), p))
                })
                .collect(),
            Some(_) => {
                self.err(field, "must be a map of port name to number");
                BTreeMap::new()
            }
        }
    }
}

fn valid_host(h: &str) -> bool {
    let h = h.strip_prefix("*.").unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// An endpoint (from a ServiceEntry's `endpoints` or a WorkloadEntry's `spec`).
fn endpoint(d: &mut Doc<'_>, v: &Value, path: &str, is_workload: bool) -> Option<LegacyEndpoint> {
    let Value::Object(m) = v else {
        d.err(path, "must be a map");
        return None;
    };
    let mut known = vec!["address", "ports", "labels", "locality", "weight"];
    if is_workload {
        known.push("serviceAccount");
    }
    d.unsupported(path, m, &known);
    // Read and kept, but nothing acts on them yet: say so rather than drop them silently.
    for (field, why) in [
        (
            "weight",
            "kept but not used yet: the gateway balances endpoints round-robin",
        ),
        (
            "locality",
            "kept but not used yet: sites, not endpoints, are chosen by locality",
        ),
        (
            "serviceAccount",
            "not used yet: a registered service's callers are authorized per site gateway, not per workload identity",
        ),
    ] {
        if m.contains_key(field) && (field != "serviceAccount" || is_workload) {
            d.warn(format!("{}{field}", prefix(path)), why);
        }
    }
    let address = match m.get("address") {
        Some(Value::String(a)) if !a.is_empty() => a.clone(),
        Some(_) => {
            d.err(
                format!("{}address", prefix(path)),
                "must be a non-empty string",
            );
            return None;
        }
        None => {
            d.err(
                format!("{}address", prefix(path)),
                "missing (Unix domain sockets are not supported)",
            );
            return None;
        }
    };
    if address.starts_with("unix://") {
        d.err(
            format!("{}address", prefix(path)),
            "Unix domain socket endpoints are not supported",
        );
        return None;
    }
    if address.parse::<IpAddr>().is_err() && !valid_host(&address) {
        d.err(
            format!("{}address", prefix(path)),
            format!("{address:?} is neither an IP address nor a hostname"),
        );
        return None;
    }
    let weight = match m.get("weight") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|w| w <= u64::from(u32::MAX)) => {
            n.as_u64().map(|w| w as u32)
        }
        Some(other) => {
            d.err(
                format!("{}weight", prefix(path)),
                format!("{other} is not a weight"),
            );
            None
        }
    };
    let labels = d.string_map(m.get("labels"), &format!("{}labels", prefix(path)));
    // Subsets select endpoints by them (Istio validates them the same way).
    if let Err((k, msg)) = meshfed_catalog::http_route::check_labels(&labels) {
        d.err(format!("{}labels{k}", prefix(path)), msg);
    }
    Some(LegacyEndpoint {
        address,
        ports: d.port_map(m.get("ports"), &format!("{}ports", prefix(path))),
        labels,
        locality: m.get("locality").and_then(Value::as_str).map(str::to_owned),
        weight,
    })
}

/// `trafficPolicy.tls` of a DestinationRule, before it meets its ServiceEntry.
struct RawTls {
    mode: TlsMode,
    ca: String,
    sni: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// A DestinationRule: its host, and its TLS settings (`None` for mode DISABLE).
fn destination_rule(
    d: &mut Doc<'_>,
    spec: &serde_json::Map<String, Value>,
) -> Option<(String, Option<RawTls>)> {
    d.unsupported(
        "spec",
        spec,
        &["host", "trafficPolicy", "exportTo", "subsets"],
    );
    let host = match spec.get("host").and_then(Value::as_str) {
        Some(h) if !h.is_empty() => h.to_owned(),
        _ => {
            d.err("spec.host", "missing");
            return None;
        }
    };
    let Some(Value::Object(tp)) = spec.get("trafficPolicy") else {
        d.err(
            "spec.trafficPolicy",
            "missing: meshfed reads trafficPolicy.tls",
        );
        return None;
    };
    d.unsupported(
        "spec.trafficPolicy",
        tp,
        &["tls", "connectionPool", "outlierDetection", "loadBalancer"],
    );
    let Some(Value::Object(tls)) = tp.get("tls") else {
        d.err("spec.trafficPolicy.tls", "missing");
        return None;
    };
    d.unsupported(
        "spec.trafficPolicy.tls",
        tls,
        &[
            "mode",
            "caCertificates",
            "clientCertificate",
            "privateKey",
            "sni",
            "subjectAltNames",
        ],
    );
    let field = |k: &str| format!("spec.trafficPolicy.tls.{k}");
    let s = |k: &str| tls.get(k).and_then(Value::as_str).map(str::to_owned);
    if tls.contains_key("subjectAltNames") {
        d.warn(
            field("subjectAltNames"),
            "not supported yet: the certificate is verified for sni",
        );
    }
    let mode = match s("mode").as_deref() {
        Some("DISABLE") => return Some((host, None)),
        Some("SIMPLE") => TlsMode::Simple,
        Some("MUTUAL") => TlsMode::Mutual,
        // Istio accepts it, and most meshes set it everywhere: accepted and warned
        // about, as no TLS from the gateway (between sites, meshfed's own mTLS).
        Some("ISTIO_MUTUAL") => {
            d.warn(
                field("mode"),
                "ISTIO_MUTUAL is an Istio sidecar's mTLS: sites already talk mTLS between \
                 gateways, and the exporting gateway reaches the endpoints without TLS \
                 (use SIMPLE or MUTUAL to originate TLS to them)",
            );
            return Some((host, None));
        }
        Some(o) => {
            d.err(field("mode"), format!("{o:?}: DISABLE, SIMPLE or MUTUAL"));
            return None;
        }
        None => {
            d.err(field("mode"), "missing");
            return None;
        }
    };
    let Some(ca) = s("caCertificates") else {
        d.err(
            field("caCertificates"),
            "required: meshfed verifies the endpoint against a CA you give",
        );
        return None;
    };
    let (cert, key) = (s("clientCertificate"), s("privateKey"));
    if mode == TlsMode::Mutual && (cert.is_none() || key.is_none()) {
        d.err(
            field(if cert.is_none() {
                "clientCertificate"
            } else {
                "privateKey"
            }),
            "required for MUTUAL",
        );
        return None;
    }
    if let Some(sni) = s("sni")
        && !valid_host(&sni)
    {
        d.err(field("sni"), format!("{sni:?} is not a DNS name"));
        return None;
    }
    Some((
        host,
        Some(RawTls {
            mode,
            ca,
            sni: s("sni"),
            cert,
            key,
        }),
    ))
}

fn prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}.")
    }
}

/// Parses a file of ServiceEntry and WorkloadEntry documents. All or nothing: any error
/// fails the whole file, so a registration never applies half a file.
pub fn parse(text: &str) -> Result<Registration, ParseError> {
    let docs = read_documents(text)?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let sorted = sort_documents(&docs, &mut problems, &mut warnings);
    let mut services = Vec::new();
    // The document each service came from, for errors about the service as a whole.
    let mut service_docs = Vec::new();
    for (index, name, namespace, spec, annotations) in sorted.entries {
        let mut d = Doc {
            index,
            object: format!("ServiceEntry/{name}"),
            problems: &mut problems,
            warnings: &mut warnings,
        };
        if let Some(s) = service_entry(
            &mut d,
            &name,
            &namespace,
            &spec,
            &annotations,
            &sorted.workloads,
        ) {
            service_docs.push(index);
            services.push(s);
        }
    }
    apply_destination_rules(sorted.rules, &mut services, &mut problems, &mut warnings);
    refuse_duplicates(&services, &service_docs, &mut problems);
    let policies = crate::authorization::refuse_duplicates(sorted.policies, &mut problems);
    let http_policies = http_policies(
        sorted.virtual_services,
        sorted.gateway_routes,
        &sorted.subsets,
        &services,
        &mut problems,
        &mut warnings,
    );
    if !problems.is_empty() {
        return Err(ParseError::Invalid(problems));
    }
    Ok(Registration {
        services,
        policies,
        http_policies,
        warnings,
    })
}

/// The service a VirtualService or DestinationRule host in `namespace` names: a host of
/// a ServiceEntry of this file, `name.namespace`, its `.svc.cluster.local` or
/// `.svc.clusterset.local` form, or a short name in `namespace`. Pure.
pub(crate) fn service_of(
    host: &str,
    namespace: &str,
    services: &[LegacyService],
) -> Option<ServiceName> {
    if let Some(s) = services.iter().find(|s| s.hosts.iter().any(|h| h == host)) {
        return Some(s.service.clone());
    }
    let h = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc.clusterset.local"))
        .unwrap_or(host);
    match h.split_once('.') {
        None => ServiceName::new(h, namespace).ok(),
        Some((name, ns)) if !ns.contains('.') => ServiceName::new(name, ns).ok(),
        _ => None,
    }
}

/// Whether a DestinationRule of the file defines `subset` for `service`.
fn defines(
    subsets: &[SubsetRule],
    services: &[LegacyService],
    service: &ServiceName,
    subset: &str,
) -> bool {
    subsets.iter().any(|(_, ns, host, sets, _)| {
        service_of(host, ns, services).as_ref() == Some(service)
            && sets.iter().any(|s| s.name == subset)
    })
}

/// Each VirtualService's routes, per service it names, with the subsets this file's
/// DestinationRules define for that service.
fn http_policies(
    vss: Vec<crate::virtual_service::RawVirtualService>,
    gateway_routes: Vec<crate::gateway_api::GatewayRoute>,
    subsets: &[SubsetRule],
    services: &[LegacyService],
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Vec<HttpPolicy> {
    let mut out: Vec<(usize, HttpPolicy)> = Vec::new();
    // Services another service's route sends to by subset: their subsets travel with
    // them even without routes of their own.
    let mut subset_targets = std::collections::BTreeSet::new();
    for vs in vss {
        let mut d = Doc {
            index: vs.index,
            object: format!("VirtualService/{}", vs.name),
            problems,
            warnings,
        };
        // Hosts of one service (a ServiceEntry's several hosts, a name and its
        // .svc.cluster.local form) are one policy.
        let mut seen = std::collections::BTreeSet::new();
        for (i, host) in vs.hosts.iter().enumerate() {
            let Some(service) = service_of(host, &vs.namespace, services) else {
                d.err(
                    format!("spec.hosts[{i}]"),
                    format!("{host:?} names no service: use name.namespace, its .svc.cluster.local form, or a ServiceEntry host of this file"),
                );
                continue;
            };
            if !seen.insert(service.clone()) {
                continue;
            }
            // A ServiceEntry of this file whose ports none of the routes apply to (Istio
            // applies `tcp` routes to TCP ports and `tls` routes to HTTPS and TLS ports,
            // silently): said, for the operator who wrote `tls` for a TCP port.
            if let Some(se) = services.iter().find(|s| s.service == service) {
                let app = |p: &meshfed_catalog::legacy::LegacyPort| {
                    AppProtocol::from_istio(&p.app_protocol)
                };
                let tcp_ports = se
                    .ports
                    .iter()
                    .any(|p| p.protocol == Protocol::Tcp && app(p) == AppProtocol::Tcp);
                let tls_ports = se
                    .ports
                    .iter()
                    .any(|p| p.protocol == Protocol::Tcp && app(p) == AppProtocol::Tls);
                for (routes, ports, field, kind) in [
                    (
                        !vs.tcp_routes.is_empty(),
                        tcp_ports,
                        "spec.tcp",
                        "TCP port (protocol TCP, or one meshfed carries as bytes)",
                    ),
                    (
                        !vs.tls_routes.is_empty(),
                        tls_ports,
                        "spec.tls",
                        "TLS port (protocol HTTPS or TLS)",
                    ),
                ] {
                    if routes && !ports {
                        d.warn(
                            field,
                            format!("{service}'s ServiceEntry has no {kind}: these routes apply to none of its ports"),
                        );
                    }
                }
            }
            let mut routes = vs.routes.clone();
            let mut tcp_routes = vs.tcp_routes.clone();
            let mut tls_routes = vs.tls_routes.clone();
            for (r, what, h) in &vs.destination_hosts {
                // A destination, or a mirror: another service's copies go through its
                // import, as a destination's requests do.
                let field = match *what {
                    HostOf::Destination(j) => format!("spec.http[{r}].route[{j}].destination"),
                    HostOf::Mirror => format!("spec.http[{r}].mirror"),
                    HostOf::Mirrors(k) => format!("spec.http[{r}].mirrors[{k}].destination"),
                    HostOf::Tcp(j) => format!("spec.tcp[{r}].route[{j}].destination"),
                    HostOf::Tls(j) => format!("spec.tls[{r}].route[{j}].destination"),
                };
                let Some(to) = service_of(h, &vs.namespace, services) else {
                    d.err(
                        format!("{field}.host"),
                        format!("{h:?} names no service: use name.namespace, its .svc.cluster.local form, or a ServiceEntry host of this file"),
                    );
                    continue;
                };
                let route = routes.get_mut(*r);
                let target = match *what {
                    HostOf::Destination(j) => route
                        .and_then(|x| x.destinations.get_mut(j))
                        .map(|d| (&mut d.service, d.subset.as_deref())),
                    HostOf::Mirror => route
                        .and_then(|x| x.mirrors.first_mut())
                        .map(|m| (&mut m.service, m.subset.as_deref())),
                    HostOf::Mirrors(k) => route
                        .and_then(|x| x.mirrors.get_mut(k))
                        .map(|m| (&mut m.service, m.subset.as_deref())),
                    HostOf::Tcp(j) => tcp_routes
                        .get_mut(*r)
                        .and_then(|x| x.destinations.get_mut(j))
                        .map(|d| (&mut d.service, d.subset.as_deref())),
                    HostOf::Tls(j) => tls_routes
                        .get_mut(*r)
                        .and_then(|x| x.destinations.get_mut(j))
                        .map(|d| (&mut d.service, d.subset.as_deref())),
                };
                let Some((slot, subset)) = target else {
                    continue;
                };
                if to == service {
                    continue;
                }
                if let Some(subset) = subset {
                    if !defines(subsets, services, &to, subset) {
                        d.err(
                            format!("{field}.subset"),
                            format!("{subset:?} is not a subset a DestinationRule of this file defines for {to}"),
                        );
                    }
                    subset_targets.insert(to.clone());
                }
                *slot = Some(to);
            }
            let mine: Vec<&SubsetRule> = subsets
                .iter()
                .filter(|(_, ns, h, _, _)| service_of(h, ns, services).as_ref() == Some(&service))
                .collect();
            let sets: Vec<Subset> = mine.iter().flat_map(|r| r.3.iter().cloned()).collect();
            let traffic = Traffic::of(&mine);
            if let Some((first, _)) = out.iter().find(|(_, p)| p.service == service) {
                d.err(
                    format!("spec.hosts[{i}]"),
                    format!("{service} already has routes in document {first}: one VirtualService per service"),
                );
                continue;
            }
            if let Some(p) = crate::virtual_service::policy(
                &mut d,
                &vs,
                service,
                (routes, tcp_routes, tls_routes),
                sets,
                traffic,
            ) {
                out.push((vs.index, p));
            }
        }
    }
    // Gateway API routes: one policy per parent Service, with the DestinationRules'
    // traffic policy for it. Several routes of one Service are merged, the oldest
    // first (then by namespace/name), as the Gateway API orders them on ties.
    let mut gateway_routes = gateway_routes;
    gateway_routes.sort_by(|a, b| a.order.cmp(&b.order));
    // Per Service with Gateway API routes: where its policy is in `out`, and its
    // routes as written, in the routes' order.
    let mut merged: BTreeMap<ServiceName, (usize, Vec<meshfed_catalog::http_route::HttpRoute>)> =
        BTreeMap::new();
    for gr in gateway_routes {
        let (kind, rest) = gr.source.split_once(' ').unwrap_or(("", ""));
        let object = format!("{kind}/{}", rest.split_once('/').map_or(rest, |(_, n)| n));
        let mut d = Doc {
            index: gr.index,
            object,
            problems,
            warnings,
        };
        for parent in &gr.parents {
            let (service, i) = (&parent.service, parent.field);
            if !merged.contains_key(service)
                && let Some((first, _)) = out.iter().find(|(_, p)| &p.service == service)
            {
                d.err(
                    format!("spec.parentRefs[{i}]"),
                    format!("{service} already has routes in document {first}: a VirtualService or Gateway API routes per service, not both"),
                );
                continue;
            }
            let mine: Vec<&SubsetRule> = subsets
                .iter()
                .filter(|(_, ns, h, _, _)| service_of(h, ns, services).as_ref() == Some(service))
                .collect();
            let traffic = Traffic::of(&mine);
            let p = HttpPolicy {
                service: service.clone(),
                source: gr.source.clone(),
                routes: gr.routes.clone(),
                subsets: mine.iter().flat_map(|r| r.3.iter().cloned()).collect(),
                max_requests: traffic.max_requests,
                max_requests_per_connection: traffic.max_requests_per_connection,
                idle_timeout_ms: traffic.idle_timeout_ms,
                connect_timeout_ms: traffic.connect_timeout_ms,
                tcp_keepalive: traffic.tcp_keepalive,
                connection_pool: traffic.connection_pool,
                outlier: traffic.outlier,
                load_balancer: traffic.load_balancer,
                consistent_hash: traffic.consistent_hash,
                locality_lb: traffic.locality_lb,
                port_settings: traffic.port_settings,
                retry_budget: traffic.retry_budget,
                tcp_routes: Vec::new(),
                tls_routes: Vec::new(),
                export_to: Vec::new(),
            };
            // Checked as written (errors name the rules as written), then kept in the
            // Gateway API's precedence, in which the egress tries them.
            if let Err(e) = p.clone().compile() {
                d.err(
                    crate::gateway_api::yaml_path(&e.field, &gr.mirror_filters),
                    e.message,
                );
                continue;
            }
            // A parentRef's port (by number or by name) restricts the rules to that port
            // of the Service, which must have it when this file defines the Service.
            let written = match &parent.ports {
                None => gr.routes.clone(),
                Some(sels) => {
                    let known: Option<Vec<(u16, &str)>> =
                        services.iter().find(|s| &s.service == service).map(|s| {
                            s.ports
                                .iter()
                                .map(|p| (p.number, p.name.as_str()))
                                .collect()
                        });
                    let before = d.problem_count();
                    let ports =
                        crate::gateway_api::resolve_ports(&mut d, service, sels, known.as_deref());
                    if d.problem_count() > before {
                        continue;
                    }
                    match ports {
                        None => gr.routes.clone(),
                        Some(ports) => ports
                            .iter()
                            .flat_map(|port| crate::gateway_api::on_port(&gr.routes, *port))
                            .collect(),
                    }
                }
            };
            match merged.get(service) {
                None => {
                    let p = HttpPolicy {
                        routes: crate::gateway_api::by_precedence(written.clone()),
                        ..p
                    };
                    match p.clone().compile() {
                        Ok(_) => {
                            merged.insert(service.clone(), (out.len(), written));
                            out.push((gr.index, p));
                        }
                        Err(e) => d.err(
                            "spec.rules",
                            format!("in the Gateway API's precedence, one route per match: {e}"),
                        ),
                    }
                }
                // Another route of this Service, older: this one's rules after its
                // own on ties.
                Some((at, held_written)) => {
                    let all: Vec<_> = held_written.iter().chain(&written).cloned().collect();
                    let held = &out[*at].1;
                    let p = HttpPolicy {
                        source: format!("{}, {}", held.source, gr.source),
                        routes: crate::gateway_api::by_precedence(all.clone()),
                        ..held.clone()
                    };
                    match p.clone().compile() {
                        Ok(_) => {
                            let at = *at;
                            merged.insert(service.clone(), (at, all));
                            out[at].1 = p;
                        }
                        Err(e) => d.err(
                            format!("spec.parentRefs[{i}]"),
                            format!(
                                "{service}'s Gateway API routes merged, one route per match: {e}"
                            ),
                        ),
                    }
                }
            }
        }
    }
    // A connection pool, outlier detection, or subsets another service's routes use,
    // without a VirtualService: every request on the one route.
    for (index, ns, host, sets, traffic) in subsets {
        let Some(service) = service_of(host, ns, services) else {
            continue;
        };
        if traffic.is_empty() && !subset_targets.contains(&service) {
            continue;
        }
        if out.iter().any(|(_, p)| p.service == service) {
            continue;
        }
        let p = HttpPolicy {
            source: format!("DestinationRule {ns}/{host}"),
            routes: vec![meshfed_catalog::http_route::HttpRoute {
                destinations: vec![meshfed_catalog::http_route::Destination {
                    service: None,
                    port: None,
                    subset: None,
                    weight: 100,
                    headers: None,
                }],
                ..Default::default()
            }],
            subsets: sets.clone(),
            max_requests: traffic.max_requests,
            max_requests_per_connection: traffic.max_requests_per_connection,
            idle_timeout_ms: traffic.idle_timeout_ms,
            connect_timeout_ms: traffic.connect_timeout_ms,
            tcp_keepalive: traffic.tcp_keepalive,
            connection_pool: traffic.connection_pool,
            outlier: traffic.outlier.clone(),
            load_balancer: traffic.load_balancer,
            consistent_hash: traffic.consistent_hash.clone(),
            locality_lb: traffic.locality_lb.clone(),
            port_settings: traffic.port_settings.clone(),
            retry_budget: traffic.retry_budget,
            tcp_routes: Vec::new(),
            tls_routes: Vec::new(),
            export_to: Vec::new(),
            service,
        };
        // What the model refuses, the file is refused for (a publish would be).
        match p.clone().compile() {
            Ok(_) => out.push((*index, p)),
            Err(e) => {
                let mut d = Doc {
                    index: *index,
                    object: format!("DestinationRule/{host}"),
                    problems,
                    warnings,
                };
                d.err(format!("spec.{}", e.field), e.message);
            }
        }
    }
    out.into_iter().map(|(_, p)| p).collect()
}

/// A ServiceEntry document: (doc index, name, namespace, spec, annotations).
type Entry = (
    usize,
    String,
    String,
    serde_json::Map<String, Value>,
    BTreeMap<String, String>,
);
/// A DestinationRule document: (doc index, name, namespace, (host, tls settings)).
type Rule = (usize, String, String, (String, Option<RawTls>));
/// A DestinationRule's subsets and HTTP traffic policy: (doc index, namespace, host,
/// subsets, traffic policy).
type SubsetRule = (usize, String, String, Vec<Subset>, Traffic);

/// What a DestinationRule's `trafficPolicy` says for HTTP routing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Traffic {
    /// `connectionPool.http.http2MaxRequests`.
    pub max_requests: Option<u32>,
    /// `connectionPool.http.maxRequestsPerConnection`.
    pub max_requests_per_connection: Option<u32>,
    /// `connectionPool.http.idleTimeout`.
    pub idle_timeout_ms: Option<u64>,
    /// `connectionPool.tcp.connectTimeout`.
    pub connect_timeout_ms: Option<u64>,
    /// `connectionPool.tcp.tcpKeepalive`.
    pub tcp_keepalive: Option<meshfed_catalog::http_route::TcpKeepalive>,
    /// `connectionPool.tcp.maxConnections`, `http.http1MaxPendingRequests`.
    pub connection_pool: Option<meshfed_catalog::http_route::ConnectionPool>,
    /// `outlierDetection`.
    pub outlier: Option<meshfed_catalog::http_route::Outlier>,
    /// `loadBalancer.simple`.
    pub load_balancer: Option<meshfed_catalog::http_route::LoadBalancer>,
    /// `loadBalancer.consistentHash`.
    pub consistent_hash: Option<meshfed_catalog::affinity::HashKey>,
    /// `loadBalancer.localityLbSetting`.
    pub locality_lb: Option<meshfed_catalog::locality::LocalityLb>,
    /// `portLevelSettings`.
    pub port_settings: Vec<meshfed_catalog::http_route::PortSettings>,
    /// `retryBudget` (the destination's only).
    pub retry_budget: Option<meshfed_catalog::http_route::RetryBudget>,
}

impl Traffic {
    /// A `trafficPolicy` (or a port's, at `base`): its connection pool, outlier
    /// detection and load balancer.
    pub(crate) fn read(d: &mut Doc<'_>, tp: &serde_json::Map<String, Value>, base: &str) -> Self {
        let pool = crate::virtual_service::connection_pool(d, tp.get("connectionPool"), base);
        let lb = tp.get("loadBalancer");
        Traffic {
            max_requests: pool.max_requests,
            max_requests_per_connection: pool.max_requests_per_connection,
            idle_timeout_ms: pool.idle_timeout_ms,
            connect_timeout_ms: pool.connect_timeout_ms,
            tcp_keepalive: pool.tcp_keepalive,
            connection_pool: pool.connection_pool,
            outlier: crate::virtual_service::outlier(d, tp.get("outlierDetection"), base),
            load_balancer: crate::virtual_service::load_balancer(d, lb, base),
            consistent_hash: lb.and_then(|lb| {
                crate::virtual_service::consistent_hash(d, lb.get("consistentHash"), base)
            }),
            locality_lb: lb.and_then(|lb| {
                let outlier = tp.contains_key("outlierDetection");
                crate::virtual_service::locality_lb(d, lb.get("localityLbSetting"), outlier, base)
            }),
            port_settings: Vec::new(),
            retry_budget: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.max_requests.is_none()
            && self.max_requests_per_connection.is_none()
            && self.idle_timeout_ms.is_none()
            && self.connect_timeout_ms.is_none()
            && self.tcp_keepalive.is_none()
            && self.connection_pool.is_none()
            && self.outlier.is_none()
            && self.load_balancer.is_none()
            && self.consistent_hash.is_none()
            && self.locality_lb.is_none()
            && self.port_settings.is_empty()
            && self.retry_budget.is_none()
    }

    /// The first rule's setting of each, over the rules for one service.
    fn of(rules: &[&SubsetRule]) -> Self {
        Self {
            max_requests: rules.iter().find_map(|r| r.4.max_requests),
            max_requests_per_connection: rules.iter().find_map(|r| r.4.max_requests_per_connection),
            idle_timeout_ms: rules.iter().find_map(|r| r.4.idle_timeout_ms),
            connect_timeout_ms: rules.iter().find_map(|r| r.4.connect_timeout_ms),
            tcp_keepalive: rules.iter().find_map(|r| r.4.tcp_keepalive),
            connection_pool: rules.iter().find_map(|r| r.4.connection_pool),
            outlier: rules.iter().find_map(|r| r.4.outlier.clone()),
            load_balancer: rules.iter().find_map(|r| r.4.load_balancer),
            consistent_hash: rules.iter().find_map(|r| r.4.consistent_hash.clone()),
            locality_lb: rules.iter().find_map(|r| r.4.locality_lb.clone()),
            retry_budget: rules.iter().find_map(|r| r.4.retry_budget),
            port_settings: rules
                .iter()
                .map(|r| &r.4.port_settings)
                .find(|p| !p.is_empty())
                .cloned()
                .unwrap_or_default(),
        }
    }
}

struct Sorted {
    entries: Vec<Entry>,
    /// (namespace, endpoint) of every WorkloadEntry.
    workloads: Vec<(String, LegacyEndpoint)>,
    rules: Vec<Rule>,
    /// (doc index, policy) of every AuthorizationPolicy.
    policies: Vec<(usize, AuthorizationPolicy)>,
    virtual_services: Vec<crate::virtual_service::RawVirtualService>,
    gateway_routes: Vec<crate::gateway_api::GatewayRoute>,
    subsets: Vec<SubsetRule>,
}

/// The YAML stream as documents; a syntax error names its line and column.
fn read_documents(text: &str) -> Result<Vec<Value>, ParseError> {
    serde_saphyr::from_multiple(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        ParseError::Yaml {
            line,
            column,
            message: {
                // The parser repeats the position in its message: keep only the reason.
                let m = e.to_string();
                let m = m.lines().next().unwrap_or_default();
                let m = m.strip_prefix("error: ").unwrap_or(m);
                meshfed_catalog::yaml::yaml_message(match m.split_once(": ") {
                    Some((pos, rest)) if pos.starts_with("line ") => rest,
                    _ => m,
                })
            },
        }
    })
}

/// The documents sorted by kind: ServiceEntries (with their annotations), WorkloadEntries
/// as endpoints (with their namespace), DestinationRules' TLS. Envelope problems
/// (apiVersion, kind, metadata) are reported here.
fn sort_documents(
    docs: &[Value],
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Sorted {
    let mut entries: Vec<Entry> = Vec::new();
    let mut workloads: Vec<(String, LegacyEndpoint)> = Vec::new();
    let mut rules: Vec<Rule> = Vec::new();
    let mut policies = Vec::new();
    let mut virtual_services = Vec::new();
    let mut gateway_routes = Vec::new();
    let mut subsets = Vec::new();
    for (i, v) in docs.iter().enumerate() {
        let index = i + 1;
        if v.is_null() {
            continue; // an empty document (`---` at the end)
        }
        let Value::Object(top) = v else {
            problems.push(Problem {
                doc: index,
                object: "?".into(),
                field: "(document)".into(),
                message: "must be a map".into(),
            });
            continue;
        };
        let kind = top.get("kind").and_then(Value::as_str).unwrap_or("");
        let meta = top.get("metadata").and_then(Value::as_object);
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let mut d = Doc {
            index,
            object: format!("{kind}/{name}"),
            problems,
            warnings,
        };
        d.unsupported("", top, &["apiVersion", "kind", "metadata", "spec"]);
        if let Some(m) = meta {
            // What the API server writes into an object (as `kubectl get -o yaml` shows
            // it) describes the object, not what it asks for: read without a warning. A
            // Gateway API route's `creationTimestamp` orders it among its Service's.
            let known: &[&str] = &[
                "name",
                "namespace",
                "labels",
                "annotations",
                "creationTimestamp",
                "uid",
                "resourceVersion",
                "generation",
                "managedFields",
                "selfLink",
                "generateName",
                "ownerReferences",
                "finalizers",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ];
            d.unsupported("metadata", m, known);
        }
        let versions: &[&str] = match kind {
            "AuthorizationPolicy" => &SECURITY_VERSIONS,
            "HTTPRoute" => &crate::gateway_api::HTTP_ROUTE_VERSIONS,
            "GRPCRoute" => &crate::gateway_api::GRPC_ROUTE_VERSIONS,
            _ => &API_VERSIONS,
        };
        match top.get("apiVersion").and_then(Value::as_str) {
            Some(a) if versions.contains(&a) => {}
            Some(a) => d.err(
                "apiVersion",
                format!("{a:?} is not one of {}", versions.join(", ")),
            ),
            None => d.err("apiVersion", "missing"),
        }
        if name.is_empty() {
            d.err("metadata.name", "missing");
        }
        let Some(Value::Object(spec)) = top.get("spec") else {
            d.err("spec", "missing or not a map");
            continue;
        };
        match kind {
            "DestinationRule" => {
                let sets = crate::virtual_service::subsets(&mut d, spec.get("subsets"));
                let tp = spec.get("trafficPolicy").and_then(Value::as_object);
                let traffic = match tp {
                    Some(tp) => {
                        let mut t = Traffic::read(&mut d, tp, "spec.trafficPolicy");
                        t.port_settings = crate::virtual_service::port_settings(
                            &mut d,
                            tp.get("portLevelSettings"),
                            "spec.trafficPolicy",
                        );
                        t.retry_budget = crate::virtual_service::retry_budget(
                            &mut d,
                            tp.get("retryBudget"),
                            "spec.trafficPolicy",
                        );
                        t
                    }
                    None => Traffic::default(),
                };
                if !sets.is_empty() || !traffic.is_empty() {
                    let host = spec.get("host").and_then(Value::as_str).unwrap_or_default();
                    subsets.push((
                        index,
                        namespace.to_owned(),
                        host.to_owned(),
                        sets.clone(),
                        traffic.clone(),
                    ));
                }
                // Subsets and a connection pool need no TLS settings.
                let tls = tp.is_some_and(|tp| tp.contains_key("tls"));
                // A traffic policy that sets nothing meshfed applies (a PASSTHROUGH load
                // balancer, warned about) is not a TLS rule missing its `tls`.
                let traffic_keys = tp.is_some_and(|tp| {
                    [
                        "connectionPool",
                        "outlierDetection",
                        "loadBalancer",
                        "portLevelSettings",
                        "retryBudget",
                    ]
                    .iter()
                    .any(|k| tp.contains_key(*k))
                });
                if tls || (sets.is_empty() && traffic.is_empty() && !traffic_keys) {
                    if let Some(tls) = destination_rule(&mut d, spec) {
                        rules.push((index, name.to_owned(), namespace.to_owned(), tls));
                    }
                } else {
                    d.unsupported(
                        "spec",
                        spec,
                        &["host", "exportTo", "subsets", "trafficPolicy"],
                    );
                    if let Some(tp) = tp {
                        d.unsupported(
                            "spec.trafficPolicy",
                            tp,
                            &[
                                "connectionPool",
                                "outlierDetection",
                                "loadBalancer",
                                "portLevelSettings",
                                "retryBudget",
                            ],
                        );
                    }
                    if spec.get("host").and_then(Value::as_str).is_none_or(|h| h.is_empty()) {
                        d.err("spec.host", "missing");
                    }
                }
            }
            "VirtualService" => {
                let ann = d.string_map(
                    meta.and_then(|m| m.get("annotations")),
                    "metadata.annotations",
                );
                if let Some(vs) = crate::virtual_service::virtual_service(
                    &mut d, index, name, namespace, spec, &ann,
                ) {
                    virtual_services.push(vs);
                }
            }
            "HTTPRoute" | "GRPCRoute" => {
                let k = if kind == "HTTPRoute" {
                    crate::gateway_api::Kind::Http
                } else {
                    crate::gateway_api::Kind::Grpc
                };
                let created = crate::gateway_api::created(&mut d, meta);
                if let Some(r) = crate::gateway_api::route(&mut d, k, index, name, namespace, spec)
                {
                    gateway_routes.push(crate::gateway_api::GatewayRoute {
                        order: (created, namespace.to_owned(), name.to_owned()),
                        ..r
                    });
                }
            }
            "ServiceEntry" => {
                let ann = d.string_map(
                    meta.and_then(|m| m.get("annotations")),
                    "metadata.annotations",
                );
                entries.push((index, name.into(), namespace.into(), spec.clone(), ann));
            }
            "AuthorizationPolicy" => {
                if let Some(p) = crate::authorization::policy(&mut d, name, namespace, spec) {
                    policies.push((index, p));
                }
            }
            "WorkloadEntry" => {
                if let Some(ep) = endpoint(&mut d, &Value::Object(spec.clone()), "spec", true) {
                    workloads.push((namespace.to_owned(), ep));
                }
            }
            "" => d.err("kind", "missing"),
            other => d.err(
                "kind",
                format!(
                    "{other:?}: only ServiceEntry, WorkloadEntry, DestinationRule, VirtualService, AuthorizationPolicy, HTTPRoute and GRPCRoute are accepted"
                ),
            ),
        }
    }

    Sorted {
        entries,
        workloads,
        rules,
        policies,
        virtual_services,
        gateway_routes,
        subsets,
    }
}

/// One ServiceEntry (`spec` of document `d`) into a legacy service; `None` when it has
/// no usable name. WorkloadEntries of its namespace that its `workloadSelector` selects
/// become endpoints.
fn service_entry(
    d: &mut Doc<'_>,
    name: &str,
    namespace: &str,
    spec: &serde_json::Map<String, Value>,
    annotations: &BTreeMap<String, String>,
    workloads: &[(String, LegacyEndpoint)],
) -> Option<LegacyService> {
    d.unsupported(
        "spec",
        spec,
        &[
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "workloadSelector",
            "exportTo",
        ],
    );
    let service = match ServiceName::new(name, namespace) {
        Ok(s) => s,
        Err(e) => {
            d.err(
                "metadata",
                format!("name.namespace is not a service name: {e}"),
            );
            return None;
        }
    };
    let hosts = d.str_list(spec.get("hosts"), "spec.hosts");
    if hosts.is_empty() {
        d.err("spec.hosts", "at least one host is required");
    }
    for (i, h) in hosts.iter().enumerate() {
        if !valid_host(h) {
            d.err(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a DNS name"),
            );
        } else if !h.contains('.') {
            // Istio: a full wildcard or a short name is not a ServiceEntry host.
            d.err(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is a short name; Istio requires a host with a dot"),
            );
        }
    }
    let addresses = d.str_list(spec.get("addresses"), "spec.addresses");
    for (i, a) in addresses.iter().enumerate() {
        let ip = a.split_once('/').map_or(a.as_str(), |(ip, _)| ip);
        if ip.parse::<IpAddr>().is_err() {
            d.err(
                format!("spec.addresses[{i}]"),
                format!("{a:?} is not an IP or CIDR"),
            );
        }
    }
    let ports = ports(d, spec);
    let location = match spec.get("location").and_then(Value::as_str) {
        None | Some("MESH_EXTERNAL") => Location::MeshExternal,
        Some("MESH_INTERNAL") => Location::MeshInternal,
        Some(o) => {
            d.err(
                "spec.location",
                format!("{o:?}: MESH_EXTERNAL or MESH_INTERNAL"),
            );
            Location::MeshExternal
        }
    };
    let resolution = match spec.get("resolution").and_then(Value::as_str) {
        None | Some("NONE") => Resolution::None,
        Some("STATIC") => Resolution::Static,
        Some("DNS") => Resolution::Dns,
        Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
        Some(o) => {
            d.err(
                "spec.resolution",
                format!("{o:?}: NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            );
            Resolution::None
        }
    };
    // Istio's resolution-specific rules.
    if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
        for (i, a) in addresses.iter().enumerate() {
            if a.contains('/') {
                d.err(
                    format!("spec.addresses[{i}]"),
                    format!(
                        "{a:?}: CIDR addresses are allowed only with resolution NONE or STATIC"
                    ),
                );
            }
        }
    }
    let explicit_endpoints =
        matches!(spec.get("endpoints"), Some(Value::Array(l)) if !l.is_empty());
    if resolution == Resolution::None && explicit_endpoints {
        d.err(
            "spec.endpoints",
            "Istio refuses endpoints with resolution NONE (it forwards to the original destination): \
             use STATIC for IP endpoints or DNS for hostnames",
        );
    }
    if resolution == Resolution::None && spec.get("workloadSelector").is_some() {
        d.warn(
            "spec.workloadSelector",
            "has no effect with resolution NONE (Istio warns the same)",
        );
    }
    let endpoints = endpoints(d, spec, &ports, resolution, &hosts, namespace, workloads);
    let export_to = d.str_list(spec.get("exportTo"), "spec.exportTo");
    for (i, e) in export_to.iter().enumerate() {
        if e != "*" && e != "." {
            d.warn(
                format!("spec.exportTo[{i}]"),
                format!("{e:?}: meshfed exports per site, not per namespace; treated as \"*\""),
            );
        }
    }
    let health = health_check(d, annotations);
    Some(LegacyService {
        tls: None,
        service,
        hosts,
        addresses,
        ports,
        location,
        resolution,
        endpoints,
        export_to,
        health,
    })
}

/// `spec.ports`: each with a name, a protocol meshfed carries, no number twice per
/// protocol.
fn ports(d: &mut Doc<'_>, spec: &serde_json::Map<String, Value>) -> Vec<LegacyPort> {
    let mut ports = Vec::new();
    match spec.get("ports") {
        Some(Value::Array(list)) if !list.is_empty() => {
            for (i, p) in list.iter().enumerate() {
                let path = format!("spec.ports[{i}]");
                let Value::Object(pm) = p else {
                    d.err(&path, "must be a map");
                    continue;
                };
                d.unsupported(&path, pm, &["number", "protocol", "name", "targetPort"]);
                let Some(number) = d.port_number(pm.get("number"), &format!("{path}.number"))
                else {
                    if pm.get("number").is_none() {
                        d.err(format!("{path}.number"), "missing");
                    }
                    continue;
                };
                let app = pm
                    .get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_ascii_uppercase();
                let protocol = match app.as_str() {
                    "UDP" => Protocol::Udp,
                    "HTTP" | "HTTPS" | "HTTP2" | "GRPC" | "TCP" | "TLS" | "MONGO" | "MYSQL"
                    | "REDIS" => Protocol::Tcp,
                    other => {
                        d.err(
                            format!("{path}.protocol"),
                            format!("{other:?} is not an Istio protocol meshfed carries"),
                        );
                        continue;
                    }
                };
                let port_name = match pm.get("name").and_then(Value::as_str) {
                    Some(n) if !n.is_empty() => n.to_owned(),
                    _ => {
                        d.err(
                            format!("{path}.name"),
                            "missing (Istio requires a port name)",
                        );
                        continue;
                    }
                };
                let target_port = pm
                    .get("targetPort")
                    .and_then(|t| d.port_number(Some(t), &format!("{path}.targetPort")));
                if ports.iter().any(|q: &LegacyPort| q.name == port_name) {
                    d.err(
                        format!("{path}.name"),
                        format!("{port_name:?} is used twice"),
                    );
                }
                // Istio refuses a port number twice. meshfed carries TCP and UDP apart,
                // so one number for both (DNS on 53) is its one extension, warned about.
                if let Some(q) = ports.iter().find(|q: &&LegacyPort| q.number == number) {
                    if q.protocol == protocol {
                        d.err(
                            format!("{path}.number"),
                            format!("port {number} is already defined by port {:?}", q.name),
                        );
                    } else {
                        d.warn(
                            format!("{path}.number"),
                            format!(
                                "port {number} is also port {:?}: meshfed carries TCP and UDP on one number as two ports; Istio refuses a port number twice",
                                q.name
                            ),
                        );
                    }
                }
                ports.push(LegacyPort {
                    number,
                    app_protocol: app,
                    protocol,
                    name: port_name,
                    target_port,
                });
            }
        }
        _ => d.err("spec.ports", "at least one port is required"),
    }
    ports
}

/// The service's endpoints: `spec.endpoints`, the WorkloadEntries its
/// `workloadSelector` selects, or (resolution DNS without endpoints) its hosts; checked
/// against the resolution as Istio checks them.
fn endpoints(
    d: &mut Doc<'_>,
    spec: &serde_json::Map<String, Value>,
    ports: &[LegacyPort],
    resolution: Resolution,
    hosts: &[String],
    namespace: &str,
    workloads: &[(String, LegacyEndpoint)],
) -> Vec<LegacyEndpoint> {
    let mut endpoints = Vec::new();
    if let Some(Value::Array(list)) = spec.get("endpoints") {
        for (i, e) in list.iter().enumerate() {
            if let Some(ep) = endpoint(d, e, &format!("spec.endpoints[{i}]"), false) {
                for k in ep.ports.keys() {
                    if !ports.iter().any(|p| &p.name == k) {
                        d.err(
                            format!("spec.endpoints[{i}].ports.{k}"),
                            "names no port of the service",
                        );
                    }
                }
                endpoints.push(ep);
            }
        }
    }
    if let Some(sel) = spec.get("workloadSelector") {
        if !endpoints.is_empty() {
            d.err(
                "spec.workloadSelector",
                "endpoints and workloadSelector cannot be used together",
            );
        }
        let labels = match sel {
            Value::Object(m) => {
                d.unsupported("spec.workloadSelector", m, &["labels"]);
                d.string_map(m.get("labels"), "spec.workloadSelector.labels")
            }
            _ => {
                d.err("spec.workloadSelector", "must be a map");
                BTreeMap::new()
            }
        };
        endpoints.extend(
            workloads
                .iter()
                .filter(|(ns, w)| {
                    ns == namespace && labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                })
                .map(|(_, w)| w.clone()),
        );
    }
    match resolution {
        Resolution::Static => {
            for (i, e) in endpoints.iter().enumerate() {
                if e.address.parse::<IpAddr>().is_err() {
                    d.err(
                        format!("spec.endpoints[{i}].address"),
                        format!("{:?}: resolution STATIC needs IP addresses", e.address),
                    );
                }
            }
            if endpoints.is_empty() {
                if spec.get("workloadSelector").is_some() {
                    d.warn(
                        "spec.workloadSelector",
                        "selects no WorkloadEntry in this file: no endpoints until one is registered with it",
                    );
                } else {
                    d.err("spec.endpoints", "resolution STATIC needs endpoints");
                }
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin if endpoints.is_empty() => {
            // Istio resolves the hosts themselves.
            for (i, h) in hosts.iter().enumerate() {
                if h.starts_with("*.") {
                    d.err(
                        format!("spec.hosts[{i}]"),
                        "a wildcard host cannot be resolved; give endpoints",
                    );
                }
            }
            endpoints = hosts
                .iter()
                .filter(|h| !h.starts_with("*."))
                .map(|h| LegacyEndpoint {
                    address: h.clone(),
                    ports: BTreeMap::new(),
                    labels: BTreeMap::new(),
                    locality: None,
                    weight: None,
                })
                .collect();
        }
        Resolution::None => {
            // Valid for Istio; meshfed cannot federate it. Kept for this site.
            d.warn(
                "spec.resolution",
                "NONE forwards to the original destination, which a remote site cannot know: \
                 registered for this site only, not federated (use STATIC or DNS endpoints to federate it)",
            );
        }
        _ => {}
    }
    endpoints
}

/// Each DestinationRule applies its TLS settings to the ServiceEntry with its host.
fn apply_destination_rules(
    rules: Vec<Rule>,
    services: &mut [LegacyService],
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) {
    for (index, name, namespace, (host, tls)) in rules {
        let mut d = Doc {
            index,
            object: format!("DestinationRule/{name}"),
            problems,
            warnings,
        };
        // DISABLE or ISTIO_MUTUAL: no TLS to originate, so any host will do (Istio
        // applies them to Kubernetes services as well as ServiceEntries).
        let Some(t) = tls else { continue };
        let Some(svc) = services
            .iter_mut()
            .find(|s| s.service.namespace() == namespace && s.hosts.contains(&host))
        else {
            d.err(
                "spec.host",
                format!("{host:?} is not a host of any ServiceEntry in namespace {namespace} in this file"),
            );
            continue;
        };
        if svc.tls.is_some() {
            d.err(
                "spec.host",
                format!("{} already has TLS settings", svc.service),
            );
            continue;
        }
        svc.tls = Some(TlsOrigination {
            mode: t.mode,
            ca_certificates: t.ca,
            sni: t.sni.unwrap_or_else(|| svc.hosts[0].clone()),
            client_certificate: t.cert,
            private_key: t.key,
        });
    }
}

/// A service defined twice in one file is an error on its second definition.
fn refuse_duplicates(services: &[LegacyService], docs: &[usize], problems: &mut Vec<Problem>) {
    let mut seen = std::collections::BTreeMap::new();
    for (s, &doc) in services.iter().zip(docs) {
        if let Some(first) = seen.insert(s.service.clone(), doc) {
            problems.push(Problem {
                doc,
                object: format!("ServiceEntry/{}", s.service.name()),
                field: "metadata.name".into(),
                message: format!(
                    "{} is defined twice in this file (first in document {first})",
                    s.service
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/serviceentry")
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn ok(name: &str) -> Registration {
        parse(&data(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn errors(name: &str) -> Vec<Problem> {
        match parse(&data(name)) {
            Err(ParseError::Invalid(p)) => p,
            other => panic!("{name}: {other:?}"),
        }
    }

    /// Durations as Istio reads them (Go's `time.ParseDuration`, then its
    /// `ValidateDuration`): what the Istio documentation writes (`5m`, `15m`, `1h`,
    /// `1.5s`, `1m30s`) is accepted; below 1 ms, finer than 1 ms, or not Go's form is
    /// refused with the reason.
    #[test]
    fn durations_are_read_as_istio_reads_them() {
        for (s, want) in [
            ("250ms", Ok(250)),
            ("5s", Ok(5_000)),
            ("1.5s", Ok(1_500)),
            (".5s", Ok(500)),
            ("1m30s", Ok(90_000)),
            ("5m", Ok(300_000)),
            ("1h", Ok(3_600_000)),
            ("2h45m10.5s", Ok(9_910_500)),
            ("1000us", Ok(1)),
            ("1000\u{b5}s", Ok(1)),
            ("1000000ns", Ok(1)),
            ("+2s", Ok(2_000)),
            (
                "1.0005s",
                Err("only durations to ms precision are supported"),
            ),
            ("500us", Err("must be at least 1ms")),
            ("0s", Err("must be at least 1ms")),
            ("0", Err("must be at least 1ms")),
            ("-1s", Err("must be at least 1ms")),
            ("5", Err("not a duration like 500ms, 1.5s, 1m30s or 1h")),
            ("", Err("not a duration like 500ms, 1.5s, 1m30s or 1h")),
            ("1d", Err("not a duration like 500ms, 1.5s, 1m30s or 1h")),
            ("s", Err("not a duration like 500ms, 1.5s, 1m30s or 1h")),
            ("1.s5", Err("not a duration like 500ms, 1.5s, 1m30s or 1h")),
            ("1 s", Err("not a duration like 500ms, 1.5s, 1m30s or 1h")),
            ("99999999999999999999h", Err("too long")),
            ("3000000h", Err("too long")),
        ] {
            assert_eq!(go_duration_ms(s), want, "{s:?}");
        }
    }

    /// The example with this session's fields is read whole, with no warning.
    #[test]
    fn the_resilience_and_cors_example_is_read_whole() {
        let r = ok("resilience-and-cors.yaml");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = &r.http_policies[0];
        let split = &p.routes[0];
        assert_eq!(
            split.destinations[1]
                .headers
                .as_deref()
                .unwrap()
                .request
                .set["x-canary"],
            "true"
        );
        let retries = split.retries.as_ref().unwrap();
        assert_eq!((retries.attempts, retries.backoff_ms), (3, Some(50)));
        let cors = split.cors.as_deref().unwrap();
        assert_eq!(
            (cors.allow_origins.len(), cors.max_age_s),
            (2, Some(86_400))
        );
        assert_eq!(
            (
                p.connect_timeout_ms,
                p.tcp_keepalive.and_then(|k| k.time_ms),
                p.retry_budget.map(|b| b.per_million)
            ),
            (Some(250), Some(60_000), Some(250_000))
        );
    }

    #[test]
    fn the_canary_example_carries_export_to_subset_policies_and_failover_priority() {
        let r = ok("canary-traffic-policy.yaml");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = &r.http_policies[0];
        assert_eq!(p.export_to, ["shop"]);
        let v2 = &p.subsets[1];
        // v2's port 80 setting replaces all of its blocks: its own breaker of 10, and no
        // pool or balancer on that port; v2's blocks hold on other ports.
        let t = p.traffic(80, Some(v2));
        assert_eq!(
            (
                t.pool.max_requests,
                t.pool.connection_pool.map(|c| c.max_connections),
                t.balancer.load_balancer
            ),
            (Some(10), None, None)
        );
        let t = p.traffic(8080, Some(v2));
        assert_eq!(
            (
                t.pool.max_requests,
                t.pool
                    .connection_pool
                    .map(|c| (c.max_connections, c.max_pending))
            ),
            (Some(20), Some((10, 5)))
        );
        assert_eq!(
            p.locality_lb.as_ref().unwrap().failover_priority,
            [
                "topology.kubernetes.io/region",
                "topology.kubernetes.io/zone"
            ]
        );
    }

    #[test]
    fn every_good_example_parses() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/serviceentry");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                let r = ok(p.file_name().unwrap().to_str().unwrap());
                assert!(!r.services.is_empty(), "{}", p.display());
                n += 1;
            }
        }
        assert!(n >= 6, "{n} examples");
    }

    /// Istio's resolution-specific rules: what Istio refuses is refused, what it accepts
    /// but meshfed cannot federate is accepted with a warning. One row per rule.
    #[test]
    fn istio_resolution_rules() {
        let doc = |hosts: &str, extra: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: x, namespace: shop}}\n\
                 spec:\n  hosts: [{hosts}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n{extra}"
            )
        };
        // (hosts, spec lines, Err(field) or Ok(federated))
        let rows: &[(&str, &str, Result<bool, &str>)] = &[
            (
                "a.example",
                "  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}]\n",
                Ok(true),
            ),
            (
                "a.example",
                "  resolution: NONE\n  endpoints: [{address: 10.0.0.1}]\n",
                Err("spec.endpoints"),
            ),
            ("a.example", "  resolution: NONE\n", Ok(false)),
            ("\"*.a.example\"", "  resolution: NONE\n", Ok(false)),
            ("a.example", "", Ok(false)),
            (
                "orders",
                "  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}]\n",
                Err("spec.hosts[0]"),
            ),
            (
                "a.example",
                "  resolution: DNS\n  addresses: [10.1.0.0/16]\n",
                Err("spec.addresses[0]"),
            ),
            (
                "a.example",
                "  resolution: STATIC\n  addresses: [10.1.0.0/16]\n  endpoints: [{address: 10.0.0.1}]\n",
                Ok(true),
            ),
            ("a.example", "  resolution: STATIC\n", Err("spec.endpoints")),
            (
                "a.example",
                "  resolution: STATIC\n  workloadSelector: {labels: {app: x}}\n",
                Ok(true),
            ),
            (
                "\"*.a.example\"",
                "  resolution: DNS\n",
                Err("spec.hosts[0]"),
            ),
        ];
        for (i, (hosts, extra, want)) in rows.iter().enumerate() {
            let got = parse(&doc(hosts, extra));
            match (got, want) {
                (Ok(r), Ok(fed)) => {
                    assert_eq!(r.services[0].federated(), *fed, "row {i}: {:?}", r.warnings)
                }
                (Err(ParseError::Invalid(p)), Err(field)) => {
                    assert!(p.iter().any(|p| p.field == *field), "row {i}: {p:?}")
                }
                (got, want) => panic!("row {i}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_port_number_twice_is_refused_unless_tcp_and_udp() {
        let doc = |ports: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: dns, namespace: ops}}\n\
                 spec:\n  hosts: [dns.ops.example]\n  ports: [{ports}]\n  resolution: STATIC\n  endpoints: [{{address: 10.0.0.1}}]\n"
            )
        };
        let Err(ParseError::Invalid(p)) = parse(&doc(
            "{number: 80, name: http, protocol: HTTP}, {number: 80, name: tcp, protocol: TCP}",
        )) else {
            panic!("one TCP port number twice was accepted");
        };
        assert_eq!(p[0].field, "spec.ports[1].number", "{p:?}");
        let r = parse(&doc(
            "{number: 53, name: dns-udp, protocol: UDP}, {number: 53, name: dns-tcp, protocol: TCP}",
        ))
        .unwrap();
        assert_eq!(r.services[0].ports.len(), 2);
        assert!(
            r.warnings.iter().any(|w| w.field == "spec.ports[1].number"),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn parsed_but_unused_endpoint_fields_are_warned_about() {
        let r = ok("dns-round-robin.yaml");
        let fields: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
        assert!(fields.iter().any(|f| f.ends_with(".weight")), "{fields:?}");
        assert!(
            fields.iter().any(|f| f.ends_with(".locality")),
            "{fields:?}"
        );
    }

    #[test]
    fn a_duplicate_name_is_reported_at_its_own_document() {
        // Before, the problem always said "document 0".
        let entry = |name: &str, port: u16| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec:\n  hosts: [{name}{port}.example]\n  ports: [{{number: {port}, name: tcp, protocol: TCP}}]\n  \
                 resolution: STATIC\n  endpoints: [{{address: 10.0.0.1}}]\n"
            )
        };
        let text = [entry("a", 1), entry("b", 2), entry("a", 3)].join("---\n");
        let Err(ParseError::Invalid(p)) = parse(&text) else {
            panic!("a duplicate name was accepted");
        };
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].doc, 3, "{}", p[0]);
        assert!(p[0].to_string().contains("first in document 1"), "{}", p[0]);
    }

    #[test]
    fn external_https_resolves_its_host() {
        let r = ok("external-https.yaml");
        let s = &r.services[0];
        assert_eq!(s.service.to_string(), "google.default");
        assert_eq!(
            (s.location, s.resolution),
            (Location::MeshExternal, Resolution::Dns)
        );
        assert_eq!(s.ports[0].app_protocol, "HTTPS");
        assert_eq!(s.endpoints_for(&s.ports[0]), vec!["www.google.com:443"]);
        assert!(s.federated() && r.warnings.is_empty());
    }

    #[test]
    fn static_endpoints_and_vips() {
        let s = &ok("mongo-static.yaml").services[0];
        assert_eq!(s.addresses, vec!["192.192.192.192/24"]);
        assert_eq!(s.location, Location::MeshInternal);
        assert_eq!(
            s.endpoints_for(&s.ports[0]),
            vec!["2.2.2.2:27018", "3.3.3.3:27018"]
        );
    }

    #[test]
    fn workload_entries_are_selected_by_labels_with_their_ports() {
        let r = ok("workload-entry.yaml");
        assert_eq!(r.services.len(), 1);
        let s = &r.services[0];
        assert_eq!(s.service.to_string(), "details-svc.bookinfo");
        // The WorkloadEntry's named port wins over targetPort.
        assert_eq!(s.endpoints_for(&s.ports[0]), vec!["2.2.2.2:9080"]);
        assert_eq!(s.endpoints[0].labels["instance-id"], "vm1");
    }

    #[test]
    fn dns_endpoints_keep_port_overrides_locality_and_weight() {
        let s = &ok("dns-round-robin.yaml").services[0];
        assert_eq!(s.resolution, Resolution::DnsRoundRobin);
        assert_eq!(
            s.endpoints_for(&s.ports[0]),
            vec!["us.foo.bar.com:8080", "uk.foo.bar.com:9080"]
        );
        assert_eq!(s.endpoints[0].weight, Some(3));
        assert_eq!(
            s.endpoints[0].locality.as_deref(),
            Some("us-east-1/us-east-1a")
        );
    }

    #[test]
    fn udp_ports_and_export_to() {
        let r = ok("udp-syslog.yaml");
        assert_eq!(r.services[0].ports[0].protocol, Protocol::Udp);
        assert!(r.services[0].federated());
        assert!(
            !r.services[1].federated(),
            "exportTo: [.] stays on this site"
        );
        assert_eq!(r.services[1].ports[1].protocol, Protocol::Tcp);
    }

    #[test]
    fn unsupported_fields_are_warnings_that_name_them() {
        let r = ok("unsupported-fields.yaml");
        let fields: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["spec.subjectAltNames", "spec.endpoints[0].network"],
            "{:?}",
            r.warnings
        );
        assert!(r.warnings[0].to_string().contains("ServiceEntry/payments"));
    }

    /// An object as `kubectl get -o yaml` writes it: what the API server adds to its
    /// metadata is read without a warning; a key it never writes still is warned about.
    #[test]
    fn what_the_api_server_writes_into_metadata_is_no_warning() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: x\n  namespace: shop\n  uid: 3f0c1c2e-5b1a-4c55-9a43-0a4b8c9d1e2f\n  resourceVersion: \"48213\"\n  generation: 3\n  creationTimestamp: \"2026-01-05T10:00:00Z\"\n  managedFields:\n  - {manager: kubectl, operation: Update}\nspec:\n  hosts: [a.example]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}]\n";
        let r = parse(yaml).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let r =
            parse(&yaml.replace("  generation: 3\n", "  generation: 3\n  colour: blue\n")).unwrap();
        let fields: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(fields, ["metadata.colour"]);
    }

    #[test]
    fn invalid_yaml_has_line_and_column() {
        match parse(&data("bad/invalid-yaml.yaml")) {
            Err(ParseError::Yaml { line, column, .. }) => {
                assert!(line >= 6, "line {line}");
                assert!(column > 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_documents_name_the_field() {
        let p = errors("bad/bad-port.yaml");
        assert_eq!(p[0].field, "spec.ports[1].number");
        assert!(p[0].message.contains("70000"), "{p:?}");
        let p = errors("bad/static-hostname.yaml");
        assert_eq!(p[0].field, "spec.endpoints[0].address");
        assert!(p[0].message.contains("STATIC"), "{p:?}");
        let p = errors("bad/wrong-kind.yaml");
        assert_eq!(p[0].field, "kind");
        assert!(p[0].to_string().contains("Sidecar"), "{p:?}");
    }

    #[test]
    fn more_refusals() {
        let base =
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\nspec:\n";
        let fail = |spec: &str| match parse(&format!("{base}{spec}")) {
            Err(ParseError::Invalid(p)) => p[0].field.clone(),
            other => panic!("{spec}: {other:?}"),
        };
        assert_eq!(fail("  ports: [{number: 1, name: a}]\n"), "spec.hosts");
        assert_eq!(fail("  hosts: [a.example]\n"), "spec.ports");
        assert_eq!(
            fail(
                "  hosts: [a.example]\n  ports: [{number: 1, name: a, protocol: SCTP}]\n  resolution: DNS\n"
            ),
            "spec.ports[0].protocol"
        );
        // Resolution NONE (the default) without endpoints: Istio accepts it; meshfed keeps
        // it on this site and says why.
        let r = parse(&format!(
            "{base}  hosts: [a.example]\n  ports: [{{number: 1, name: a}}]\n"
        ))
        .unwrap();
        assert!(!r.services[0].federated());
        assert!(
            r.warnings
                .iter()
                .any(|w| w.field == "spec.resolution" && w.message.contains("not federated")),
            "{:?}",
            r.warnings
        );
        assert_eq!(
            fail("  hosts: ['*.example']\n  ports: [{number: 1, name: a}]\n  resolution: DNS\n"),
            "spec.hosts[0]"
        );
        assert_eq!(
            fail(
                "  hosts: [a.example]\n  ports: [{number: 1, name: a}]\n  resolution: STATIC\n  endpoints: [{address: 1.2.3.4, ports: {b: 2}}]\n"
            ),
            "spec.endpoints[0].ports.b"
        );
        let v = "apiVersion: networking.istio.io/v2\nkind: ServiceEntry\nmetadata: {name: x}\nspec: {}\n";
        assert!(matches!(parse(v), Err(ParseError::Invalid(p)) if p[0].field == "apiVersion"));
    }

    #[test]
    fn health_checks_come_from_annotations() {
        let doc = |ann: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: x\n  annotations:\n{ann}spec:\n  hosts: [a.example]\n  ports: [{{number: 80, name: http}}]\n  resolution: STATIC\n  endpoints: [{{address: 10.0.0.1}}]\n"
            )
        };
        let r = parse(&doc("    health.meshfed.io/check: http\n    health.meshfed.io/path: /healthz\n    health.meshfed.io/interval: 250ms\n    health.meshfed.io/unhealthy-threshold: \"2\"\n")).unwrap();
        assert_eq!(
            r.services[0].health,
            Some(HealthCheck {
                kind: HealthKind::Http {
                    path: "/healthz".into(),
                    status: 200
                },
                port: None,
                interval_ms: 250,
                timeout_ms: 1000,
                healthy_threshold: 2,
                unhealthy_threshold: 2,
            })
        );
        let fail = |ann: &str| match parse(&doc(ann)) {
            Err(ParseError::Invalid(p)) => p[0].field.clone(),
            other => panic!("{ann}: {other:?}"),
        };
        assert_eq!(
            fail("    health.meshfed.io/check: icmp\n"),
            "metadata.annotations.health.meshfed.io/check"
        );
        assert_eq!(
            fail("    health.meshfed.io/check: tcp\n    health.meshfed.io/interval: soon\n"),
            "metadata.annotations.health.meshfed.io/interval"
        );
        assert_eq!(
            fail("    health.meshfed.io/check: tcp\n    health.meshfed.io/retries: \"3\"\n"),
            "metadata.annotations.health.meshfed.io/retries"
        );
        // Other annotations are Istio's business.
        assert!(
            parse(&doc("    sidecar.istio.io/inject: \"false\"\n"))
                .unwrap()
                .services[0]
                .health
                .is_none()
        );
    }

    #[test]
    fn destination_rules_set_tls_origination() {
        let r = ok("tls-origination.yaml");
        let tls = r.services[0].tls.as_ref().unwrap();
        assert_eq!(tls.mode, TlsMode::Mutual);
        assert_eq!(
            tls.sni, "billing.mainframe.example",
            "default: the first host"
        );
        assert_eq!(tls.client_certificate.as_deref(), Some("certs/client.pem"));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        // Its loadBalancer travels as the service's HTTP policy (applied on HTTP ports).
        assert_eq!(
            r.http_policies[0].load_balancer,
            Some(meshfed_catalog::http_route::LoadBalancer::RoundRobin)
        );
        let base = data("tls-origination.yaml");
        let fail = |from: &str, to: &str| match parse(&base.replace(from, to)) {
            Err(ParseError::Invalid(p)) => p[0].field.clone(),
            other => panic!("{to}: {other:?}"),
        };
        assert_eq!(
            fail("host: billing.mainframe.example", "host: other.example"),
            "spec.host"
        );
        // ISTIO_MUTUAL: accepted as Istio accepts it, warned about, no TLS originated.
        let istio = parse(&base.replace("mode: MUTUAL", "mode: ISTIO_MUTUAL")).unwrap();
        assert!(istio.services[0].tls.is_none());
        assert!(
            istio
                .warnings
                .iter()
                .any(|w| w.field == "spec.trafficPolicy.tls.mode"),
            "{:?}",
            istio.warnings
        );
        assert_eq!(
            fail("      clientCertificate: certs/client.pem\n", ""),
            "spec.trafficPolicy.tls.clientCertificate"
        );
        assert_eq!(
            fail("      caCertificates: certs/ca.pem\n", ""),
            "spec.trafficPolicy.tls.caCertificates"
        );
        // On an HTTP or gRPC port (Istio's egress TLS origination for plain-HTTP
        // clients) it is originated on the gateway's pooled endpoint connections.
        let on = |protocol: &str| {
            parse(
                &base
                    .replace(
                        "name: tls\n    protocol: TLS",
                        &format!("name: p\n    protocol: {protocol}"),
                    )
                    .replace("number: 443", "number: 80"),
            )
            .unwrap()
        };
        let http = on("HTTP");
        assert!(http.services[0].tls.is_some());
        assert!(http.warnings.is_empty(), "{:?}", http.warnings);
        let grpc = on("GRPC");
        assert!(grpc.services[0].tls.is_some());
        assert!(grpc.warnings.is_empty(), "{:?}", grpc.warnings);
        // DISABLE: plain TCP.
        let plain = parse(&base.replace("mode: MUTUAL", "mode: DISABLE")).unwrap();
        assert!(plain.services[0].tls.is_none());
        // Neither needs a ServiceEntry: Istio applies them to any host (a Kubernetes
        // service), and Istio's own samples set ISTIO_MUTUAL everywhere.
        for mode in ["DISABLE", "ISTIO_MUTUAL"] {
            let other = base
                .replace("mode: MUTUAL", &format!("mode: {mode}"))
                .replace("host: billing.mainframe.example", "host: reviews");
            assert!(parse(&other).is_ok(), "{mode}");
        }
    }

    #[test]
    fn never_panics_on_odd_documents() {
        for text in [
            "",
            "---\n---\n",
            "[1, 2]",
            "kind: 3",
            "a: [",
            "spec: {ports: 7}",
        ] {
            let _ = parse(text);
        }
    }
}
