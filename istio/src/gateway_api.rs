//! Gateway API `HTTPRoute` and `GRPCRoute` (`gateway.networking.k8s.io` v1, v1beta1 for
//! HTTPRoute) attached to a Service, the GAMMA mesh shape, into the routing policy
//! gateways apply (`meshfed_catalog::http_route`). Pure.
//!
//! Read: `parentRefs` (a `Service`, core group, or an MCS `ServiceImport`; the route
//! governs that service wherever it is imported; with a `port` or a `sectionName`
//! (the Service port's name, read from the file's ServiceEntry), on that port only, as
//! Istio adds it to every match), `rules[].name`, `rules[].matches`
//! (HTTPRoute: `path` Exact, PathPrefix — by path element — or RegularExpression,
//! `headers`, `queryParams`, `method`; GRPCRoute: `method` by service and method, Exact
//! or RegularExpression, and `headers`), `rules[].backendRefs` (Services or
//! ServiceImports, with `port` and relative `weight`: the service itself or another
//! one, which importing gateways reach through their import of it; and header modifiers
//! in their `filters`, applied when that backend is picked), `rules[].filters`
//! (`RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`,
//! `CORS` (the experimental channel's), and `RequestMirror`, repeatable, to the service
//! itself or another one of its namespace),
//! `rules[].timeouts.request` and
//! `rules[].retry` (`attempts`, `codes`, `backoff`). `hostnames` mean nothing for a mesh route (GAMMA) and are
//! warned about; anything else is a warning naming its path. The CRDs' schema and CEL
//! rules are errors with their field path: enums, required fields, list bounds, path
//! values, a `port` on a Service backend, at most one of each modifier filter, never a
//! redirect with a rewrite, `ReplacePrefixMatch` only under a `PathPrefix` match (a
//! redirect's replaces the matched prefix: Istio's `%PREFIX()%` mark). The rules are
//! kept in the Gateway API's match precedence, one route per match ([`by_precedence`]),
//! since the egress takes the first route that matches.

use serde_json::{Map, Value};

use meshfed_catalog::ServiceName;
use meshfed_catalog::http_route::{
    Destination, HeaderOps, HeaderRules, HttpRoute, Mirror, Redirect, RegexRewrite, RequestMatch,
    Retries, Rewrite, StringMatch,
};

use crate::service_entry::Doc;

/// HTTPRoute's versions; GRPCRoute is v1 only.
pub(crate) const HTTP_ROUTE_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];
pub(crate) const GRPC_ROUTE_VERSIONS: [&str; 1] = ["gateway.networking.k8s.io/v1"];

/// The CRDs' list bounds.
const MAX_PARENT_REFS: usize = 32;
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
const MAX_FILTERS: usize = 16;
const MAX_BACKEND_REFS: usize = 16;
const MAX_HEADER_MATCHES: usize = 16;

/// A route as read: the services it governs and its rules as routes.
pub(crate) struct GatewayRoute {
    pub index: usize,
    /// `HTTPRoute namespace/name`.
    pub source: String,
    pub parents: Vec<Parent>,
    pub routes: Vec<HttpRoute>,
    /// Per rule, the `filters` index of each of its mirrors, in order (for field paths).
    pub mirror_filters: Vec<Vec<usize>>,
    /// Its place among the routes of one Service, on ties of the match precedence:
    /// `metadata.creationTimestamp` (none: the oldest, as Go's zero time), then
    /// namespace and name.
    pub order: (Option<String>, String, String),
}

/// A route's `metadata.creationTimestamp`, as Kubernetes writes it
/// (`2006-01-02T15:04:05Z`, which sorts as it reads); anything else is an error.
pub(crate) fn created(d: &mut Doc<'_>, meta: Option<&Map<String, Value>>) -> Option<String> {
    let v = meta?.get("creationTimestamp")?;
    let ok = |s: &str| {
        let b = s.as_bytes();
        b.len() == 20
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'Z',
                _ => c.is_ascii_digit(),
            })
    };
    match v {
        Value::Null => None,
        Value::String(s) if ok(s) => Some(s.clone()),
        other => {
            d.err(
                "metadata.creationTimestamp",
                format!("{other}: a time as Kubernetes writes it, 2006-01-02T15:04:05Z"),
            );
            None
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Http,
    Grpc,
}

/// Reads one HTTPRoute or GRPCRoute document's `spec`.
pub(crate) fn route(
    d: &mut Doc<'_>,
    kind: Kind,
    index: usize,
    name: &str,
    namespace: &str,
    spec: &Map<String, Value>,
) -> Option<GatewayRoute> {
    let before = d.problem_count();
    d.unsupported("spec", spec, &["parentRefs", "hostnames", "rules"]);
    if spec.get("hostnames").is_some_and(|h| !h.is_null()) {
        d.warn(
            "spec.hostnames",
            "a route attached to a Service (GAMMA) matches by the Service, not by host name; ignored",
        );
    }
    let parents = parent_refs(d, spec.get("parentRefs"), namespace);
    let rules: Vec<Value> = match spec.get("rules") {
        None | Some(Value::Null) => vec![Value::Object(Map::new())],
        Some(Value::Array(a)) if a.len() <= MAX_RULES => a.clone(),
        Some(Value::Array(_)) => {
            d.err("spec.rules", format!("at most {MAX_RULES} rules"));
            return None;
        }
        Some(_) => {
            d.err("spec.rules", "must be a list");
            return None;
        }
    };
    let total_matches: usize = rules
        .iter()
        .map(|r| {
            r.get("matches")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        })
        .sum();
    if total_matches > 128 {
        // The CRD's CEL rule.
        d.err(
            "spec.rules",
            "the total number of matches across all rules must be at most 128",
        );
    }
    let mut routes = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        if let Some(route) = rule(d, kind, r, i, namespace, &parents) {
            routes.push(route);
        }
    }
    let names: Vec<&String> = routes.iter().filter_map(|r| r.name.as_ref()).collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            d.err("spec.rules", format!("rule name {n:?} twice"));
        }
    }
    if d.problem_count() > before || parents.is_empty() {
        return None;
    }
    let what = match kind {
        Kind::Http => "HTTPRoute",
        Kind::Grpc => "GRPCRoute",
    };
    let mirror_filters = rules
        .iter()
        .map(|r| match r.get("filters") {
            Some(Value::Array(fs)) => fs
                .iter()
                .enumerate()
                .filter(|(_, f)| f.get("type").and_then(Value::as_str) == Some("RequestMirror"))
                .map(|(i, _)| i)
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    Some(GatewayRoute {
        index,
        source: format!("{what} {namespace}/{name}"),
        parents,
        routes,
        mirror_filters,
        order: (None, namespace.to_owned(), name.to_owned()),
    })
}

/// A Service (core group) or an MCS ServiceImport, named by `name` and `namespace`.
fn service_ref(
    d: &mut Doc<'_>,
    m: &Map<String, Value>,
    field: &str,
    namespace: &str,
    default_group: &str,
    default_kind: &str,
) -> Option<ServiceName> {
    let group = m
        .get("group")
        .and_then(Value::as_str)
        .unwrap_or(default_group);
    let kind = m
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or(default_kind);
    match (group, kind) {
        ("" | "core", "Service") | ("multicluster.x-k8s.io", "ServiceImport") => {}
        (g, k) => {
            let g = if g.is_empty() { "core" } else { g };
            d.err(
                format!("{field}.kind"),
                format!("{k} ({g}): meshfed routes between Services (GAMMA), so a Service or a multicluster.x-k8s.io ServiceImport"),
            );
            return None;
        }
    }
    let Some(name) = m
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    else {
        d.err(format!("{field}.name"), "missing");
        return None;
    };
    let ns = m
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or(namespace);
    match ServiceName::new(name, ns) {
        Ok(s) => Some(s),
        Err(e) => {
            d.err(format!("{field}.name"), e.to_string());
            None
        }
    }
}

/// A `parentRefs` entry's port of its Service: by `port`, by `sectionName` (the
/// Service port's name), or both, which must agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortSel {
    /// Its index in `parentRefs`.
    pub field: usize,
    pub number: Option<u16>,
    pub name: Option<String>,
}

/// A Service a route's `parentRefs` name (each once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Parent {
    pub service: ServiceName,
    /// The `parentRefs` index of its first reference.
    pub field: usize,
    /// The ports the route is restricted to there (`None`: every port; a reference
    /// with neither `port` nor `sectionName` takes them all, as Istio's unrestricted
    /// route).
    pub ports: Option<Vec<PortSel>>,
}

fn parent_refs(d: &mut Doc<'_>, v: Option<&Value>, namespace: &str) -> Vec<Parent> {
    let refs = match v {
        Some(Value::Array(a)) if !a.is_empty() && a.len() <= MAX_PARENT_REFS => a,
        Some(Value::Array(a)) if a.len() > MAX_PARENT_REFS => {
            d.err("spec.parentRefs", format!("at most {MAX_PARENT_REFS}"));
            return Vec::new();
        }
        None | Some(Value::Null) | Some(Value::Array(_)) => {
            d.err(
                "spec.parentRefs",
                "missing: a mesh route names the Service it governs (kind: Service, group: \"\")",
            );
            return Vec::new();
        }
        Some(_) => {
            d.err("spec.parentRefs", "must be a list");
            return Vec::new();
        }
    };
    let mut out: Vec<Parent> = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let f = format!("spec.parentRefs[{i}]");
        let Value::Object(m) = r else {
            d.err(f, "must be a map");
            continue;
        };
        d.unsupported(
            &f,
            m,
            &["group", "kind", "name", "namespace", "port", "sectionName"],
        );
        // For a Service, the name of one of its ports (the CRD's SectionName syntax).
        let section = match m.get("sectionName") {
            None | Some(Value::Null) => None,
            Some(Value::String(n)) if valid_section_name(n) => Some(n.clone()),
            Some(other) => {
                d.err(
                    format!("{f}.sectionName"),
                    format!("{other}: a lower-case RFC 1123 name of at most 253 characters"),
                );
                continue;
            }
        };
        // The CRD: a port number, 1 to 65535. The route applies to that port only
        // (Istio adds it to every match).
        let port = match m.get("port") {
            None | Some(Value::Null) => None,
            Some(p) => match p.as_u64().and_then(|p| u16::try_from(p).ok()) {
                Some(p) if p > 0 => Some(p),
                _ => {
                    d.err(format!("{f}.port"), format!("{p}: a port, 1 to 65535"));
                    continue;
                }
            },
        };
        let Some(s) = service_ref(d, m, &f, namespace, "gateway.networking.k8s.io", "Gateway")
        else {
            continue;
        };
        let sel = (port.is_some() || section.is_some()).then_some(PortSel {
            field: i,
            number: port,
            name: section,
        });
        match out.iter_mut().find(|p| p.service == s) {
            None => out.push(Parent {
                service: s,
                field: i,
                ports: sel.map(|s| vec![s]),
            }),
            Some(Parent { ports, .. }) => match (ports.as_mut(), sel) {
                (Some(ps), Some(sel)) => ps.push(sel),
                (_, None) => *ports = None,
                (None, Some(_)) => {}
            },
        }
    }
    out
}

/// The port numbers `sels` name on `service`, whose ports (`number`, `name`) are
/// `known` when the file defines it. A port it lacks, a name none of its ports has, or
/// a `port` and `sectionName` that name two ports is an error at the entry; a name
/// when the ports are not known cannot be read here, so the route applies to every
/// port (`None`, warned).
pub(crate) fn resolve_ports(
    d: &mut Doc<'_>,
    service: &ServiceName,
    sels: &[PortSel],
    known: Option<&[(u16, &str)]>,
) -> Option<Vec<u16>> {
    let mut out: Vec<u16> = Vec::new();
    let mut every = false;
    for sel in sels {
        let f = format!("spec.parentRefs[{}]", sel.field);
        let named = |n: &str| known.and_then(|k| k.iter().find(|(_, pn)| *pn == n));
        let number = match (sel.number, sel.name.as_deref(), known) {
            (Some(p), None, Some(k)) if !k.iter().any(|(n, _)| *n == p) => {
                d.err(
                    format!("{f}.port"),
                    format!("port {p} not found: {service} has no such port"),
                );
                continue;
            }
            (Some(p), None, _) => p,
            (p, Some(n), Some(_)) => match (named(n), p) {
                (None, _) => {
                    d.err(
                        format!("{f}.sectionName"),
                        format!("{n:?}: {service} has no port by that name"),
                    );
                    continue;
                }
                (Some((num, _)), Some(p)) if *num != p => {
                    d.err(
                        format!("{f}.port"),
                        format!("{p}: {service}'s port {n:?} is {num}; port and sectionName must name one port"),
                    );
                    continue;
                }
                (Some((num, _)), _) => *num,
            },
            (Some(p), Some(_), None) => p,
            (None, Some(n), None) => {
                d.warn(
                    format!("{f}.sectionName"),
                    format!("{n:?}: {service} is not defined in this file, so its port names are not known here; the route applies to every port"),
                );
                every = true;
                continue;
            }
            (None, None, _) => {
                every = true;
                continue;
            }
        };
        if !out.contains(&number) {
            out.push(number);
        }
    }
    (!every).then_some(out)
}

/// `routes` restricted to service port `port`: every match holds only there, and a
/// rule without matches gets one that says only that (Istio's `augmentPortMatch`).
pub(crate) fn on_port(routes: &[HttpRoute], port: u16) -> Vec<HttpRoute> {
    routes
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if r.matches.is_empty() {
                r.matches.push(RequestMatch::default());
            }
            for m in &mut r.matches {
                m.port = Some(port);
            }
            r
        })
        .collect()
}

/// An optional list at `field` of at most `max` entries (absent or null: empty; too
/// long or not a list: an error, and empty).
pub(crate) fn list<'v>(
    d: &mut Doc<'_>,
    v: Option<&'v Value>,
    field: &str,
    max: usize,
) -> &'v [Value] {
    match v {
        None | Some(Value::Null) => &[],
        Some(Value::Array(a)) if a.len() <= max => a,
        Some(Value::Array(_)) => {
            d.err(field, format!("at most {max}"));
            &[]
        }
        Some(_) => {
            d.err(field, "must be a list");
            &[]
        }
    }
}

fn rule(
    d: &mut Doc<'_>,
    kind: Kind,
    v: &Value,
    i: usize,
    namespace: &str,
    parents: &[Parent],
) -> Option<HttpRoute> {
    let field = format!("spec.rules[{i}]");
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    let known: &[&str] = match kind {
        Kind::Http => &[
            "name",
            "matches",
            "filters",
            "backendRefs",
            "timeouts",
            "retry",
        ],
        Kind::Grpc => &["name", "matches", "filters", "backendRefs"],
    };
    d.unsupported(&field, m, known);
    let name = match m.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if valid_section_name(s) => Some(s.clone()),
        Some(_) => {
            d.err(
                format!("{field}.name"),
                "a lower-case RFC 1123 label of at most 253 characters",
            );
            None
        }
    };
    let mut matches = Vec::new();
    let raw = list(
        d,
        m.get("matches"),
        &format!("{field}.matches"),
        MAX_MATCHES,
    );
    for (j, x) in raw.iter().enumerate() {
        let f = format!("{field}.matches[{j}]");
        let rm = match kind {
            Kind::Http => http_match(d, x, &f),
            Kind::Grpc => grpc_match(d, x, &f),
        };
        matches.extend(rm);
    }
    // No matches: the CRD's default, one on path prefix `/`, which accepts everything.
    let mut route = HttpRoute {
        name,
        matches,
        ..Default::default()
    };
    filters(
        d,
        kind,
        m.get("filters"),
        &field,
        namespace,
        parents,
        &mut route,
    );
    let refs = list(
        d,
        m.get("backendRefs"),
        &format!("{field}.backendRefs"),
        MAX_BACKEND_REFS,
    );
    for (j, b) in refs.iter().enumerate() {
        let f = format!("{field}.backendRefs[{j}]");
        let Value::Object(bm) = b else {
            d.err(f, "must be a map");
            continue;
        };
        d.unsupported(
            &f,
            bm,
            &[
                "group",
                "kind",
                "name",
                "namespace",
                "port",
                "weight",
                "filters",
            ],
        );
        let headers = backend_filters(d, bm.get("filters"), &format!("{f}.filters"));
        let weight = match bm.get("weight") {
            None | Some(Value::Null) => 1,
            Some(w) => match w.as_u64() {
                Some(w @ 0..=1_000_000) => w as u32,
                _ => {
                    d.err(format!("{f}.weight"), "an integer from 0 to 1000000");
                    continue;
                }
            },
        };
        let port = match bm.get("port") {
            Some(p) => match p.as_u64() {
                Some(p @ 1..=65535) => Some(p as u16),
                _ => {
                    d.err(format!("{f}.port"), "a port from 1 to 65535");
                    continue;
                }
            },
            None => {
                let is_service = bm
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_none_or(|k| k == "Service");
                if is_service {
                    // The CRD's CEL rule.
                    d.err(
                        format!("{f}.port"),
                        "must be specified when kind is Service",
                    );
                    continue;
                }
                None
            }
        };
        let Some(service) = service_ref(d, bm, &f, namespace, "", "Service") else {
            continue;
        };
        route.destinations.push(Destination {
            // The parent itself stays `None`: the policy's own service.
            service: (!parents.iter().any(|p| p.service == service)).then_some(service),
            port,
            subset: None,
            weight,
            headers,
        });
    }
    if route.destinations.is_empty() && route.redirect.is_none() {
        d.err(
            format!("{field}.backendRefs"),
            "missing: a rule needs a backend or a RequestRedirect filter",
        );
        return None;
    }
    if route.redirect.is_some() && !route.destinations.is_empty() {
        // What Envoy (and so Istio) does: the redirect answers and nothing is forwarded.
        d.warn(
            format!("{field}.backendRefs"),
            "the rule redirects, so its backends get nothing",
        );
        route.destinations.clear();
    }
    if kind == Kind::Http {
        if let Some(Value::Object(t)) = m.get("timeouts") {
            let f = format!("{field}.timeouts");
            d.unsupported(&f, t, &["request", "backendRequest"]);
            let request = t
                .get("request")
                .and_then(|v| duration(d, v, &format!("{f}.request")));
            let backend = t
                .get("backendRequest")
                .and_then(|v| duration(d, v, &format!("{f}.backendRequest")));
            if let (Some(r), Some(b)) = (request, backend)
                && r != 0
                && (b == 0 || b > r)
            {
                // The CRD's CEL rule.
                d.err(
                    format!("{f}.backendRequest"),
                    "must be no greater than timeouts.request",
                );
            }
            route.timeout_ms = request.filter(|ms| *ms > 0);
            if let Some(b) = backend.filter(|ms| *ms > 0) {
                let (attempts, retry_on) = route
                    .retries
                    .take()
                    .map_or((DEFAULT_ATTEMPTS, None), |r| (r.attempts, r.retry_on));
                route.retries = Some(Retries {
                    attempts,
                    per_try_timeout_ms: Some(b),
                    retry_on,
                    backoff_ms: None,
                });
            }
        }
        if let Some(Value::Object(r)) = m.get("retry") {
            let f = format!("{field}.retry");
            d.unsupported(&f, r, &["attempts", "codes", "backoff"]);
            let retry_on =
                retry_codes(d, r.get("codes"), &format!("{f}.codes")).map(std::sync::Arc::new);
            // GEP-1731's minimum wait between attempts; Istio makes it the base of
            // Envoy's jittered back-off, and so does meshfed.
            let backoff = match r.get("backoff") {
                None | Some(Value::Null) => None,
                Some(v) => {
                    let f = format!("{f}.backoff");
                    let ms = duration(d, v, &f);
                    crate::virtual_service::retry_backoff(d, ms, &f)
                }
            };
            if let Some(a) = r.get("attempts") {
                match a.as_u64() {
                    Some(n) if n <= 10 => {
                        let per_try = route.retries.as_ref().and_then(|x| x.per_try_timeout_ms);
                        route.retries = Some(Retries {
                            attempts: n as u32,
                            per_try_timeout_ms: per_try,
                            retry_on: retry_on.clone(),
                            backoff_ms: backoff,
                        });
                    }
                    _ => d.err(format!("{f}.attempts"), "an integer from 0 to 10"),
                }
            }
            // Codes or a back-off without attempts: the gateway's number of attempts,
            // on those codes, after that back-off.
            if (retry_on.is_some() || backoff.is_some()) && r.get("attempts").is_none() {
                let per_try = route.retries.as_ref().and_then(|x| x.per_try_timeout_ms);
                route.retries = Some(Retries {
                    attempts: DEFAULT_ATTEMPTS,
                    per_try_timeout_ms: per_try,
                    retry_on: retry_on.clone(),
                    backoff_ms: backoff,
                });
            }
        }
    }
    Some(route)
}

/// A rule's `retry.codes` at `field` (GEP-1731: HTTP statuses from 400 to 599): those
/// statuses, and connection errors (a connect failure or a reset), which GEP-1731 has
/// implementations retry whenever a retry stanza is set.
fn retry_codes(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    field: &str,
) -> Option<meshfed_catalog::http_route::RetryOn> {
    use meshfed_catalog::http_route::{MAX_RETRY_CODES, RetryOn};
    let items = match v? {
        Value::Null => return None,
        Value::Array(a) => a,
        _ => {
            d.err(field, "must be a list of HTTP statuses");
            return None;
        }
    };
    if items.len() > MAX_RETRY_CODES {
        d.err(field, format!("at most {MAX_RETRY_CODES} statuses"));
        return None;
    }
    let mut on = RetryOn {
        connect_failure: true,
        reset: true,
        ..Default::default()
    };
    for (i, c) in items.iter().enumerate() {
        match c.as_u64() {
            Some(n @ 400..=599) => {
                let n = n as u16;
                if !on.status_codes.contains(&n) {
                    on.status_codes.push(n);
                }
            }
            _ => d.err(
                format!("{field}[{i}]"),
                format!("{c}: an HTTP status from 400 to 599"),
            ),
        }
    }
    Some(on)
}

/// Retries after the first attempt when a route sets only `backendRequest` (the gateway's
/// own default).
const DEFAULT_ATTEMPTS: u32 = 2;

/// A lower-case RFC 1123 label (what `sectionName`-typed names take).
fn valid_section_name(s: &str) -> bool {
    meshfed_catalog::names::dns_subdomain(s)
}

/// Gateway API's duration (GEP-2257): `1h`, `30s`, `500ms`, `1h30m` … up to four parts;
/// `0s` is 0 (no timeout). Milliseconds.
pub(crate) fn gep_duration(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let (mut rest, mut total, mut parts) = (s, 0u64, 0);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total += n * unit;
        parts += 1;
        if parts > 4 {
            return None;
        }
    }
    Some(total)
}

fn duration(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<u64> {
    match v.as_str().and_then(gep_duration) {
        Some(ms) => Some(ms),
        None => {
            d.err(
                field,
                format!("{v} is not a duration like 10s, 500ms or 1h30m"),
            );
            None
        }
    }
}

/// A path value Gateway API accepts for Exact and PathPrefix (the CRD's CEL rules).
fn path_value_problem(v: &str) -> Option<&'static str> {
    if !v.starts_with('/') {
        return Some("must be an absolute path (start with /)");
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if v.contains(bad) {
            return Some("must not contain //, /./, /../, %2f, %2F or #");
        }
    }
    if v.ends_with("/..") || v.ends_with("/.") {
        return Some("must not end with /. or /..");
    }
    None
}

fn typed_value(
    d: &mut Doc<'_>,
    m: &Map<String, Value>,
    field: &str,
    types: &[&str],
    default: &str,
) -> Option<(String, String)> {
    let t = m.get("type").and_then(Value::as_str).unwrap_or(default);
    if !types.contains(&t) {
        d.err(
            format!("{field}.type"),
            format!("{t:?}: one of {}", types.join(", ")),
        );
        return None;
    }
    let Some(v) = m.get("value").and_then(Value::as_str) else {
        d.err(format!("{field}.value"), "missing");
        return None;
    };
    Some((t.to_owned(), v.to_owned()))
}

/// `headers` or `queryParams` matches: Exact or RegularExpression, names unique
/// (headers case-insensitively).
fn name_value_matches(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    field: &str,
    lower: bool,
) -> std::collections::BTreeMap<String, StringMatch> {
    let mut out = std::collections::BTreeMap::new();
    for (k, x) in list(d, v, field, MAX_HEADER_MATCHES).iter().enumerate() {
        let f = format!("{field}[{k}]");
        let Value::Object(m) = x else {
            d.err(f, "must be a map");
            continue;
        };
        d.unsupported(&f, m, &["type", "name", "value"]);
        let Some(name) = m
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            d.err(format!("{f}.name"), "missing");
            continue;
        };
        let name = if lower {
            name.to_ascii_lowercase()
        } else {
            name.to_owned()
        };
        let Some((t, value)) = typed_value(d, m, &f, &["Exact", "RegularExpression"], "Exact")
        else {
            continue;
        };
        let sm = if t == "Exact" {
            StringMatch::Exact(value)
        } else {
            StringMatch::Regex(value)
        };
        if out.insert(name.clone(), sm).is_some() {
            d.err(format!("{f}.name"), format!("{name:?} is matched twice"));
        }
    }
    out
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn http_match(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<RequestMatch> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(field, m, &["path", "headers", "queryParams", "method"]);
    let uri = match m.get("path") {
        None | Some(Value::Null) => Some(StringMatch::PathPrefix("/".into())),
        Some(Value::Object(p)) => {
            let f = format!("{field}.path");
            d.unsupported(&f, p, &["type", "value"]);
            let t = p
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("PathPrefix");
            let value = p.get("value").and_then(Value::as_str).unwrap_or("/");
            match t {
                "Exact" | "PathPrefix" => {
                    if let Some(why) = path_value_problem(value) {
                        d.err(format!("{f}.value"), why);
                        return None;
                    }
                    Some(if t == "Exact" {
                        StringMatch::Exact(value.into())
                    } else {
                        StringMatch::PathPrefix(value.into())
                    })
                }
                "RegularExpression" => Some(StringMatch::Regex(value.into())),
                other => {
                    d.err(
                        format!("{f}.type"),
                        format!("{other:?}: one of Exact, PathPrefix, RegularExpression"),
                    );
                    return None;
                }
            }
        }
        Some(_) => {
            d.err(format!("{field}.path"), "must be a map with type and value");
            return None;
        }
    };
    let method = match m.get("method") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if METHODS.contains(&s.as_str()) => {
            Some(StringMatch::Exact(s.clone()))
        }
        Some(other) => {
            d.err(
                format!("{field}.method"),
                format!("{other}: one of {}", METHODS.join(", ")),
            );
            return None;
        }
    };
    Some(RequestMatch {
        uri,
        method,
        headers: name_value_matches(d, m.get("headers"), &format!("{field}.headers"), true),
        query_params: name_value_matches(
            d,
            m.get("queryParams"),
            &format!("{field}.queryParams"),
            false,
        ),
        ..Default::default()
    })
}

fn grpc_name_ok(s: &str, dotted: bool) -> bool {
    let part = |p: &str| {
        let mut b = p.bytes();
        b.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
            && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
    };
    if dotted {
        s.split('.').all(part)
    } else {
        part(s)
    }
}

fn grpc_match(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<RequestMatch> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(field, m, &["method", "headers"]);
    let uri = match m.get("method") {
        None | Some(Value::Null) => None,
        Some(Value::Object(gm)) => {
            let f = format!("{field}.method");
            d.unsupported(&f, gm, &["type", "service", "method"]);
            let t = gm.get("type").and_then(Value::as_str).unwrap_or("Exact");
            let service = gm
                .get("service")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let method = gm
                .get("method")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            if service.is_none() && method.is_none() {
                // The CRD's CEL rule.
                d.err(&f, "one or both of service and method must be specified");
                return None;
            }
            match t {
                "Exact" => {
                    if let Some(s) = service
                        && !grpc_name_ok(s, true)
                    {
                        d.err(
                            format!("{f}.service"),
                            format!("{s:?} is not a gRPC service name"),
                        );
                        return None;
                    }
                    if let Some(x) = method
                        && !grpc_name_ok(x, false)
                    {
                        d.err(
                            format!("{f}.method"),
                            format!("{x:?} is not a gRPC method name"),
                        );
                        return None;
                    }
                    Some(match (service, method) {
                        (Some(s), Some(x)) => StringMatch::Exact(format!("/{s}/{x}")),
                        (Some(s), None) => StringMatch::Prefix(format!("/{s}/")),
                        (None, Some(x)) => {
                            StringMatch::Regex(format!("/[^/]+/{}", regex_escape(x)))
                        }
                        (None, None) => unreachable!("checked above"),
                    })
                }
                "RegularExpression" => Some(StringMatch::Regex(format!(
                    "/(?:{})/(?:{})",
                    service.unwrap_or("[^/]+"),
                    method.unwrap_or("[^/]+")
                ))),
                other => {
                    d.err(
                        format!("{f}.type"),
                        format!("{other:?}: one of Exact, RegularExpression"),
                    );
                    return None;
                }
            }
        }
        Some(_) => {
            d.err(format!("{field}.method"), "must be a map");
            return None;
        }
    };
    Some(RequestMatch {
        uri,
        method: None,
        headers: name_value_matches(d, m.get("headers"), &format!("{field}.headers"), true),
        ..Default::default()
    })
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$#&-~".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// `set`/`add` (name, value lists) and `remove` of a header modifier filter.
fn header_ops(d: &mut Doc<'_>, v: Option<&Value>, field: &str) -> HeaderOps {
    let Some(Value::Object(m)) = v else {
        d.err(field, "missing: the filter's type names this field");
        return HeaderOps::default();
    };
    d.unsupported(field, m, &["set", "add", "remove"]);
    let mut pairs = |k: &str| {
        let mut out = std::collections::BTreeMap::new();
        for (i, x) in list(d, m.get(k), &format!("{field}.{k}"), 16)
            .iter()
            .enumerate()
        {
            let f = format!("{field}.{k}[{i}]");
            let (Some(n), Some(v)) = (
                x.get("name")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty()),
                x.get("value").and_then(Value::as_str),
            ) else {
                d.err(f, "needs name and value");
                continue;
            };
            let name = n.to_ascii_lowercase();
            if let Some(why) = meshfed_catalog::http_route::header_change_problem(&name, Some(v)) {
                d.err(format!("{f}.name"), format!("{n:?}: {why}"));
                continue;
            }
            if out.insert(name, v.to_owned()).is_some() {
                d.err(format!("{f}.name"), format!("{n:?} twice"));
            }
        }
        out
    };
    let (set, add) = (pairs("set"), pairs("add"));
    let mut remove = Vec::new();
    for (i, k) in d
        .str_list(m.get("remove"), &format!("{field}.remove"))
        .into_iter()
        .enumerate()
    {
        let name = k.to_ascii_lowercase();
        match meshfed_catalog::http_route::header_change_problem(&name, None) {
            Some(why) => d.err(format!("{field}.remove[{i}]"), format!("{k:?}: {why}")),
            None => remove.push(name),
        }
    }
    HeaderOps { set, add, remove }
}

/// A path modifier: `(type, value)`.
fn path_modifier(d: &mut Doc<'_>, v: Option<&Value>, field: &str) -> Option<(String, String)> {
    let Value::Object(m) = v? else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(field, m, &["type", "replaceFullPath", "replacePrefixMatch"]);
    let t = m.get("type").and_then(Value::as_str).unwrap_or_default();
    let key = match t {
        "ReplaceFullPath" => "replaceFullPath",
        "ReplacePrefixMatch" => "replacePrefixMatch",
        other => {
            d.err(
                format!("{field}.type"),
                format!("{other:?}: one of ReplaceFullPath, ReplacePrefixMatch"),
            );
            return None;
        }
    };
    let Some(value) = m.get(key).and_then(Value::as_str) else {
        // The CRD's CEL rule.
        d.err(
            format!("{field}.{key}"),
            format!("must be specified when type is {t}"),
        );
        return None;
    };
    if let Some(why) = path_value_problem(value) {
        d.err(format!("{field}.{key}"), why);
        return None;
    }
    Some((t.to_owned(), value.to_owned()))
}

/// A filter at `f` of type `t` sets `type` and the field named after it (`key`), no
/// other (the CRD's CEL rule).
fn only_its_field(d: &mut Doc<'_>, m: &Map<String, Value>, f: &str, t: &str, key: &str) {
    for k in m.keys() {
        if k != "type" && k != key {
            d.err(
                format!("{f}.{k}"),
                format!("must not be set when type is {t}"),
            );
        }
    }
}

/// A rule's `CORS` filter at `field` (HTTPCORSFilter, experimental channel), checked as
/// the CRD checks it: `allowOrigins` (at most 64, each `*` or `scheme://host[:port]`, at
/// most 253 characters, `*` alone; a `*` in the host matches any run of host
/// characters there, DNS labels included, and an origin without a port matches only
/// origins without one), `allowMethods` (at most 9 of RFC 9110's methods, or `*` alone),
/// `allowHeaders` and `exposeHeaders` (at most 64 header names), `allowCredentials`,
/// and `maxAge` (seconds, at least 1, default 5). The Gateway API answers a preflight
/// from an origin not allowed at the gateway, without CORS headers (Istio's `IGNORE`).
fn cors_filter(
    d: &mut Doc<'_>,
    m: &Map<String, Value>,
    field: &str,
) -> meshfed_catalog::cors::Cors {
    use meshfed_catalog::cors::{Cors, MAX_CORS_LIST, MAX_CORS_ORIGINS};
    d.unsupported(
        field,
        m,
        &[
            "allowOrigins",
            "allowCredentials",
            "allowMethods",
            "allowHeaders",
            "exposeHeaders",
            "maxAge",
        ],
    );
    let mut c = Cors {
        ignore_unmatched_preflights: true,
        max_age_s: Some(5),
        ..Cors::default()
    };
    // Each list is a set, and `*` (where allowed) stands alone.
    let names = |d: &mut Doc<'_>, k: &str, max: usize, ok: &dyn Fn(&str) -> bool| {
        let f = format!("{field}.{k}");
        let mut out: Vec<String> = Vec::new();
        for (i, x) in list(d, m.get(k), &f, max).iter().enumerate() {
            match x.as_str() {
                Some(s) if ok(s) => {
                    if out.iter().any(|o| o == s) {
                        d.err(format!("{f}[{i}]"), format!("duplicate value {s:?}"));
                    } else {
                        out.push(s.to_owned());
                    }
                }
                _ => d.err(format!("{f}[{i}]"), format!("{x} is not valid here")),
            }
        }
        if out.len() > 1 && out.iter().any(|o| o == "*") {
            d.err(
                &f,
                format!("{k} cannot contain '*' alongside other entries"),
            );
        }
        out
    };
    let origins = names(d, "allowOrigins", MAX_CORS_ORIGINS, &cors_origin);
    c.allow_origins = origins
        .into_iter()
        .map(|o| {
            if o == "*" || !o.contains('*') {
                StringMatch::Exact(o)
            } else {
                let parts: Vec<String> = o.split('*').map(regex::escape).collect();
                StringMatch::Regex(parts.join("[^:/?#]*"))
            }
        })
        .collect();
    const METHODS: [&str; 10] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "*",
    ];
    c.allow_methods = names(d, "allowMethods", 9, &|s| METHODS.contains(&s));
    c.allow_headers = names(
        d,
        "allowHeaders",
        MAX_CORS_LIST,
        &meshfed_catalog::cors::token,
    );
    c.expose_headers = names(
        d,
        "exposeHeaders",
        MAX_CORS_LIST,
        &meshfed_catalog::cors::token,
    );
    match m.get("allowCredentials") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => c.allow_credentials = *b,
        Some(_) => d.err(format!("{field}.allowCredentials"), "must be true or false"),
    }
    match m.get("maxAge") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_i64() {
            Some(s @ 1..=0x7fff_ffff) => c.max_age_s = Some(s as u64),
            _ => d.err(
                format!("{field}.maxAge"),
                format!("{v}: seconds, from 1 to 2147483647"),
            ),
        },
    }
    c
}

/// A Gateway API `CORSOrigin`: `*`, or `scheme://host[:port]` (the CRD's pattern: a
/// scheme of a letter and then letters, digits, `+`, `-` or `.`; a host of anything but
/// `:/?#`; a port of 1 to 5 digits), at most 253 characters.
fn cors_origin(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    let (host, port) = match rest.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    s.len() <= 253
        && scheme.len() >= 2
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        && !host.is_empty()
        && !host.contains(['/', '?', '#'])
        && port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A backendRef's `filters` at `field`: its header modifiers, applied when that backend
/// is picked (as Istio turns them into the destination's `headers`); other filter types
/// on a backend are refused, as Istio refuses them, with the advice to put them on the
/// rule.
fn backend_filters(d: &mut Doc<'_>, v: Option<&Value>, field: &str) -> Option<Box<HeaderRules>> {
    let mut headers = HeaderRules::default();
    let mut seen: Vec<&str> = Vec::new();
    for (i, x) in list(d, v, field, MAX_FILTERS).iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Value::Object(m) = x else {
            d.err(f, "must be a map");
            continue;
        };
        let (t, key) = match m.get("type").and_then(Value::as_str) {
            Some(t @ "RequestHeaderModifier") => (t, "requestHeaderModifier"),
            Some(t @ "ResponseHeaderModifier") => (t, "responseHeaderModifier"),
            Some(t) => {
                d.err(
                    format!("{f}.type"),
                    format!(
                        "{t:?}: a backend's filters may only modify headers here; put it on the rule"
                    ),
                );
                continue;
            }
            None => {
                d.err(format!("{f}.type"), "missing");
                continue;
            }
        };
        only_its_field(d, m, &f, t, key);
        if seen.contains(&t) {
            d.err(
                &f,
                format!("{t} may appear at most once in a backend's filters"),
            );
            continue;
        }
        seen.push(t);
        let ops = header_ops(d, m.get(key), &format!("{f}.{key}"));
        match t {
            "RequestHeaderModifier" => headers.request = ops,
            _ => headers.response = ops,
        }
    }
    (headers != HeaderRules::default()).then(|| Box::new(headers))
}

#[allow(clippy::too_many_arguments)]
fn filters(
    d: &mut Doc<'_>,
    kind: Kind,
    v: Option<&Value>,
    rule_field: &str,
    namespace: &str,
    parents: &[Parent],
    route: &mut HttpRoute,
) {
    let field = format!("{rule_field}.filters");
    let types: &[&str] = match kind {
        Kind::Http => &[
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestMirror",
            "RequestRedirect",
            "URLRewrite",
            "CORS",
            "ExtensionRef",
        ],
        Kind::Grpc => &[
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestMirror",
            "ExtensionRef",
        ],
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut headers = HeaderRules::default();
    for (i, x) in list(d, v, &field, MAX_FILTERS).iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Value::Object(m) = x else {
            d.err(f, "must be a map");
            continue;
        };
        let Some(t) = m.get("type").and_then(Value::as_str) else {
            d.err(format!("{f}.type"), "missing");
            continue;
        };
        let Some(t) = types.iter().copied().find(|k| *k == t) else {
            d.err(
                format!("{f}.type"),
                format!("{t:?}: one of {}", types.join(", ")),
            );
            continue;
        };
        // The field named after the type, lower camel case; no other.
        let key = match t {
            "URLRewrite" => "urlRewrite".to_owned(),
            "CORS" => "cors".to_owned(),
            _ => {
                let mut c = t.chars();
                c.next()
                    .map(|h| h.to_ascii_lowercase().to_string() + c.as_str())
                    .unwrap_or_default()
            }
        };
        only_its_field(d, m, &f, t, &key);
        // The CRD lets mirrors and CORS repeat (the last CORS filter applies, warned).
        if t == "CORS" && seen.contains(&t) {
            d.warn(
                &f,
                "a rule's last CORS filter applies; this one replaces one before it",
            );
        } else if t != "RequestMirror" {
            if seen.contains(&t) {
                d.err(&f, format!("{t} may appear at most once in a rule"));
                continue;
            }
            seen.push(t);
        }
        let body = m.get(&key);
        let bf = format!("{f}.{key}");
        match t {
            "RequestHeaderModifier" => headers.request = header_ops(d, body, &bf),
            "ResponseHeaderModifier" => headers.response = header_ops(d, body, &bf),
            "RequestRedirect" => {
                let Some(Value::Object(r)) = body else {
                    d.err(&bf, "missing: the filter's type names this field");
                    continue;
                };
                d.unsupported(
                    &bf,
                    r,
                    &["scheme", "hostname", "path", "port", "statusCode"],
                );
                let path = path_modifier(d, r.get("path"), &format!("{bf}.path"));
                let prefix = path
                    .as_ref()
                    .is_some_and(|(t, _)| t == "ReplacePrefixMatch");
                if prefix
                    && !(route.matches.len() == 1
                        && matches!(route.matches[0].uri, Some(StringMatch::PathPrefix(_))))
                {
                    // The CRD's CEL rule.
                    d.err(
                        &field,
                        "When using RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
                    );
                }
                let code = match r.get("statusCode") {
                    None | Some(Value::Null) => 302,
                    Some(c) => match c.as_u64() {
                        Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
                        _ => {
                            d.err(format!("{bf}.statusCode"), "one of 301, 302, 303, 307, 308");
                            continue;
                        }
                    },
                };
                let scheme = match r.get("scheme").and_then(Value::as_str) {
                    None => None,
                    Some(s @ ("http" | "https")) => Some(s.to_owned()),
                    Some(s) => {
                        d.err(format!("{bf}.scheme"), format!("{s:?}: http or https"));
                        continue;
                    }
                };
                let port = match r.get("port") {
                    None | Some(Value::Null) => None,
                    Some(p) => match p.as_u64() {
                        Some(p @ 1..=65535) => Some(p as u16),
                        _ => {
                            d.err(format!("{bf}.port"), "a port from 1 to 65535");
                            continue;
                        }
                    },
                };
                route.redirect = Some(Redirect {
                    uri: path.map(|(_, v)| {
                        if prefix {
                            format!("{}{v}", meshfed_catalog::http_route::PREFIX_REDIRECT)
                        } else {
                            v
                        }
                    }),
                    authority: r.get("hostname").and_then(Value::as_str).map(str::to_owned),
                    scheme,
                    port,
                    code,
                });
            }
            "URLRewrite" => {
                let Some(Value::Object(r)) = body else {
                    d.err(&bf, "missing: the filter's type names this field");
                    continue;
                };
                d.unsupported(&bf, r, &["hostname", "path"]);
                let path = path_modifier(d, r.get("path"), &format!("{bf}.path"));
                if path
                    .as_ref()
                    .is_some_and(|(t, _)| t == "ReplacePrefixMatch")
                    && !route
                        .matches
                        .iter()
                        .all(|x| matches!(x.uri, Some(StringMatch::PathPrefix(_))))
                {
                    d.err(
                        &field,
                        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix path match",
                    );
                }
                // ReplaceFullPath replaces the whole path under any match (a regex
                // over it); ReplacePrefixMatch the prefix the rule matched on.
                let (uri, uri_regex) = match path {
                    Some((t, v)) if t == "ReplaceFullPath" => (
                        None,
                        Some(RegexRewrite {
                            pattern: "^.*$".into(),
                            substitution: v.replace('\\', "\\\\"),
                        }),
                    ),
                    other => (other.map(|(_, v)| v), None),
                };
                route.rewrite = Some(Rewrite {
                    uri,
                    authority: r.get("hostname").and_then(Value::as_str).map(str::to_owned),
                    uri_regex,
                });
            }
            "CORS" => match body {
                Some(Value::Object(c)) => route.cors = Some(Box::new(cors_filter(d, c, &bf))),
                _ => d.err(&bf, "missing: the filter's type names this field"),
            },
            "RequestMirror" => {
                let Some(Value::Object(r)) = body else {
                    d.err(&bf, "missing: the filter's type names this field");
                    continue;
                };
                d.unsupported(&bf, r, &["backendRef", "percent", "fraction"]);
                let Some(Value::Object(b)) = r.get("backendRef") else {
                    d.err(format!("{bf}.backendRef"), "missing");
                    continue;
                };
                let Some(target) =
                    service_ref(d, b, &format!("{bf}.backendRef"), namespace, "", "Service")
                else {
                    continue;
                };
                // Another Service: its copies go through the importing gateway's import
                // of it (the policy's check keeps it in the route's namespace).
                let port = match b.get("port") {
                    None | Some(Value::Null) => {
                        if b.get("kind")
                            .and_then(Value::as_str)
                            .is_none_or(|k| k == "Service")
                        {
                            // The CRD's CEL rule (BackendObjectReference).
                            d.err(
                                format!("{bf}.backendRef.port"),
                                "must be specified when kind is Service",
                            );
                            continue;
                        }
                        None
                    }
                    Some(p) => match p.as_u64() {
                        Some(p @ 1..=65535) => Some(p as u16),
                        _ => {
                            d.err(format!("{bf}.backendRef.port"), "a port from 1 to 65535");
                            continue;
                        }
                    },
                };
                let other = !parents.iter().any(|p| p.service == target);
                let per_million = match (r.get("percent"), r.get("fraction")) {
                    (Some(_), Some(_)) => {
                        // The CRD's CEL rule.
                        d.err(&bf, "only one of percent or fraction may be specified");
                        continue;
                    }
                    (Some(p), None) => match p.as_u64() {
                        Some(p @ 0..=100) => p as u32 * 10_000,
                        _ => {
                            d.err(format!("{bf}.percent"), "an integer from 0 to 100");
                            continue;
                        }
                    },
                    (None, Some(Value::Object(fr))) => {
                        let num = fr.get("numerator").and_then(Value::as_u64);
                        let den = fr.get("denominator").and_then(Value::as_u64).unwrap_or(100);
                        match num {
                            Some(n) if den > 0 && n <= den => (n * 1_000_000 / den) as u32,
                            _ => {
                                d.err(
                                    format!("{bf}.fraction"),
                                    "numerator must be at most denominator, which is above 0",
                                );
                                continue;
                            }
                        }
                    }
                    (None, Some(_)) => {
                        d.err(format!("{bf}.fraction"), "must be a map");
                        continue;
                    }
                    (None, None) => 1_000_000,
                };
                route.mirrors.push(Mirror {
                    service: other.then_some(target),
                    port: port.filter(|_| other),
                    subset: None,
                    per_million,
                });
            }
            _ => {
                d.err(
                    format!("{f}.type"),
                    "ExtensionRef: meshfed has no extension filters",
                );
            }
        }
    }
    if seen.contains(&"RequestRedirect") && seen.contains(&"URLRewrite") {
        // The CRD's CEL rule.
        d.err(
            &field,
            "may specify either RequestRedirect or URLRewrite, but not both",
        );
    }
    if !headers.request.is_empty() || !headers.response.is_empty() {
        route.headers = Some(headers);
    }
}

/// The model's field path as a Gateway API route spells it; `mirror_filters` is the
/// route's [`GatewayRoute::mirror_filters`]. Pure.
pub(crate) fn yaml_path(model: &str, mirror_filters: &[Vec<usize>]) -> String {
    // `routes[r].mirrors[k].x`: the rule's k-th RequestMirror filter's backendRef.
    let mirror = model.strip_prefix("routes[").and_then(|rest| {
        let (r, rest) = rest.split_once("].mirrors[")?;
        let (k, x) = rest.split_once("].")?;
        let (r, k) = (r.parse::<usize>().ok()?, k.parse::<usize>().ok()?);
        let i = *mirror_filters.get(r)?.get(k)?;
        let x = if x == "service" { "namespace" } else { x };
        Some(format!(
            "spec.rules[{r}].filters[{i}].requestMirror.backendRef.{x}"
        ))
    });
    if let Some(p) = mirror {
        return p;
    }
    let p = model
        .replace("routes[", "spec.rules[")
        .replace(".destinations[", ".backendRefs[")
        .replace(".destinations", ".backendRefs")
        .replace("].service", "].namespace")
        .replace(".timeout_ms", ".timeouts.request");
    if p == "routes" {
        "spec.rules".into()
    } else {
        p
    }
}

/// The Gateway API's match precedence, as Istio orders a mesh route's matches
/// (pilot's `sortHTTPRoutes`): each rule's matches become routes of one match each,
/// ordered, stably (an earlier rule, then an earlier match, first on ties), by
///
/// 1. the path: `Exact`, then a prefix, then a regular expression (Istio's rank; the
///    spec leaves regular expressions to the implementation), then none (a match that
///    says only a port, or a gRPC match by headers), the longer value first;
/// 2. a method;
/// 3. more header matches;
/// 4. more query parameter matches;
///
/// and a rule without matches (everything) last. meshfed's egress takes the first route
/// that matches a request, so this order gives the spec's precedence: `/v2` beats `/`
/// whichever rule comes first. Pure.
pub(crate) fn by_precedence(routes: Vec<HttpRoute>) -> Vec<HttpRoute> {
    /// Higher sorts first: path kind, path length, a method, headers, query params.
    type Rank = (u8, usize, bool, usize, usize);
    fn rank(m: &RequestMatch) -> Rank {
        let (kind, len) = match &m.uri {
            Some(StringMatch::Exact(v)) => (3, v.len()),
            Some(StringMatch::Prefix(v) | StringMatch::PathPrefix(v)) => (2, v.len()),
            Some(StringMatch::Regex(v)) => (1, v.len()),
            // No path (a rule restricted to a port, a gRPC match by headers only):
            // below every path, as Istio ranks it.
            Some(StringMatch::Present) | None => (0, 0),
        };
        (
            kind,
            len,
            m.method.is_some(),
            m.headers.len(),
            m.query_params.len(),
        )
    }
    let mut split: Vec<(Option<Rank>, HttpRoute)> = Vec::new();
    for route in routes {
        if route.matches.len() <= 1 {
            let key = route.matches.first().map(rank);
            split.push((key, route));
            continue;
        }
        let mut rest = route;
        let matches = std::mem::take(&mut rest.matches);
        for m in matches {
            let key = Some(rank(&m));
            split.push((
                key,
                HttpRoute {
                    matches: vec![m],
                    ..rest.clone()
                },
            ));
        }
    }
    // `None` (no matches) is the least, and the sort is stable.
    split.sort_by_key(|(key, _)| std::cmp::Reverse(*key));
    split.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::gep_duration;
    use crate::service_entry::{ParseError, parse};
    use meshfed_catalog::http_route::StringMatch;

    const CANARY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orders-canary, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: orders, port: 8080}
  rules:
  - name: beta
    matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: X-Beta, value: "1"}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: beta}]
        remove: [x-debug]
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs:
    - {name: orders-v2, port: 8080}
    timeouts: {request: 2s, backendRequest: 500ms}
  - backendRefs:
    - {name: orders, port: 8080, weight: 90}
    - {name: orders-v2, port: 8080, weight: 10}
    retry: {attempts: 3}
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
"#;

    /// The Gateway API's precedence across a route's rules and matches, as Istio
    /// orders them; ties keep the order written.
    #[test]
    fn matches_are_ordered_by_the_gateway_apis_precedence() {
        use meshfed_catalog::http_route::{HttpRoute, RequestMatch};
        let m =
            |uri: Option<StringMatch>, method: bool, headers: usize, query: usize| RequestMatch {
                uri,
                method: method.then(|| StringMatch::Exact("GET".into())),
                headers: (0..headers)
                    .map(|i| (format!("h{i}"), StringMatch::Present))
                    .collect(),
                query_params: (0..query)
                    .map(|i| (format!("q{i}"), StringMatch::Present))
                    .collect(),
                ..Default::default()
            };
        let prefix = |v: &str| Some(StringMatch::PathPrefix(v.into()));
        let rule = |name: &str, matches: Vec<RequestMatch>| HttpRoute {
            name: Some(name.into()),
            matches,
            ..Default::default()
        };
        // (rules as written, the order of (rule, match path) wanted)
        type Row<'a> = (Vec<HttpRoute>, Vec<(&'a str, Option<StringMatch>)>);
        let rows: Vec<Row> = vec![
            // The conformance suite's: `/` first as written, `/v2` is more specific.
            (
                vec![
                    rule("v1", vec![m(prefix("/"), false, 0, 0)]),
                    rule("v2", vec![m(prefix("/v2"), false, 0, 0)]),
                ],
                vec![("v2", prefix("/v2")), ("v1", prefix("/"))],
            ),
            // Exact, then the longer prefix, then a regular expression; a rule's matches
            // are ranked on their own.
            (
                vec![
                    rule(
                        "a",
                        vec![
                            m(Some(StringMatch::Regex("/.*/x".into())), false, 0, 0),
                            m(prefix("/a"), false, 0, 0),
                        ],
                    ),
                    rule(
                        "b",
                        vec![
                            m(prefix("/abc"), false, 0, 0),
                            m(Some(StringMatch::Exact("/a".into())), false, 0, 0),
                        ],
                    ),
                ],
                vec![
                    ("b", Some(StringMatch::Exact("/a".into()))),
                    ("b", prefix("/abc")),
                    ("a", prefix("/a")),
                    ("a", Some(StringMatch::Regex("/.*/x".into()))),
                ],
            ),
            // On the same path: a method, then more headers, then more query params.
            (
                vec![
                    rule("q", vec![m(prefix("/"), false, 0, 2)]),
                    rule("h", vec![m(prefix("/"), false, 1, 0)]),
                    rule("hh", vec![m(prefix("/"), false, 2, 0)]),
                    rule("get", vec![m(prefix("/"), true, 0, 0)]),
                ],
                vec![
                    ("get", prefix("/")),
                    ("hh", prefix("/")),
                    ("h", prefix("/")),
                    ("q", prefix("/")),
                ],
            ),
            // Ties keep the order written; a rule without matches goes last.
            (
                vec![
                    rule("all", vec![]),
                    rule("first", vec![m(prefix("/x"), false, 1, 0)]),
                    rule("second", vec![m(prefix("/x"), false, 1, 0)]),
                ],
                vec![
                    ("first", prefix("/x")),
                    ("second", prefix("/x")),
                    ("all", None),
                ],
            ),
        ];
        for (i, (rules, want)) in rows.into_iter().enumerate() {
            let got: Vec<(String, Option<StringMatch>)> = super::by_precedence(rules)
                .into_iter()
                .map(|r| {
                    assert!(r.matches.len() <= 1, "row {i}: one match per route");
                    (
                        r.name.unwrap(),
                        r.matches.into_iter().next().and_then(|m| m.uri),
                    )
                })
                .collect();
            let want: Vec<(String, Option<StringMatch>)> =
                want.into_iter().map(|(n, u)| (n.to_owned(), u)).collect();
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn an_http_route_on_a_service_becomes_its_routes() {
        let r = parse(CANARY).unwrap();
        assert_eq!(r.http_policies.len(), 1);
        let p = &r.http_policies[0];
        assert_eq!(p.service.to_string(), "orders.shop");
        assert_eq!(p.source, "HTTPRoute shop/orders-canary");
        // In the Gateway API's precedence: the exact /old first, then beta's /api
        // prefix, then the rule without matches (it was first of the three, and its
        // /old was never reached in the order written).
        assert_eq!(
            p.routes
                .iter()
                .map(|r| r.name.as_deref().unwrap_or("-"))
                .collect::<Vec<_>>(),
            ["-", "beta", "-"]
        );
        let beta = &p.routes[1];
        assert_eq!(beta.name.as_deref(), Some("beta"));
        assert_eq!(
            beta.matches[0].uri,
            Some(StringMatch::PathPrefix("/api".into()))
        );
        assert_eq!(
            beta.matches[0].headers["x-beta"],
            StringMatch::Exact("1".into())
        );
        assert_eq!(
            beta.destinations[0]
                .service
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("orders-v2.shop")
        );
        assert_eq!(beta.destinations[0].port, Some(8080));
        assert_eq!(beta.rewrite.as_ref().unwrap().uri.as_deref(), Some("/v2"));
        let h = beta.headers.as_ref().unwrap();
        assert_eq!(h.request.set["x-route"], "beta");
        assert_eq!(h.request.remove, ["x-debug"]);
        assert_eq!(beta.timeout_ms, Some(2000));
        assert_eq!(beta.retries.as_ref().unwrap().per_try_timeout_ms, Some(500));
        // Weights are relative; the parent itself is the policy's own service.
        let split = &p.routes[2].destinations;
        assert_eq!((split[0].service.is_none(), split[0].weight), (true, 90));
        assert_eq!(split[1].weight, 10);
        assert_eq!(p.routes[2].retries.as_ref().unwrap().attempts, 3);
        // No codes: the gateway's default conditions.
        assert!(p.routes[2].retries.as_ref().unwrap().retry_on.is_none());
        // GEP-1731 codes: those statuses, and connection errors.
        for (retry, attempts) in [
            ("retry: {attempts: 3, codes: [500, 503, 500]}", 3),
            ("retry: {codes: [500, 503]}", super::DEFAULT_ATTEMPTS),
        ] {
            let r = parse(&CANARY.replace("retry: {attempts: 3}", retry)).unwrap();
            assert!(
                !r.warnings.iter().any(|w| w.field.contains("retry")),
                "{:?}",
                r.warnings
            );
            let rt = r.http_policies[0].routes[2].retries.clone().unwrap();
            let on = rt.retry_on.as_deref().cloned().unwrap();
            assert_eq!(
                (
                    rt.attempts,
                    on.status_codes,
                    on.connect_failure,
                    on.reset,
                    on.five_xx
                ),
                (attempts, vec![500, 503], true, true, false),
                "{retry}"
            );
        }
        // GEP-1731 backoff: the base of the back-off (none: the gateway's 25 ms), with or
        // without attempts; past a minute it is warned about and a minute applies.
        assert_eq!(p.routes[2].retries.as_ref().unwrap().backoff_ms, None);
        for (retry, want, warned) in [
            (
                "retry: {attempts: 3, backoff: 100ms}",
                (3, Some(100)),
                false,
            ),
            (
                "retry: {backoff: 1m30s}",
                (super::DEFAULT_ATTEMPTS, Some(60_000)),
                true,
            ),
            (
                "retry: {backoff: 0s}",
                (super::DEFAULT_ATTEMPTS, Some(0)),
                false,
            ),
        ] {
            let r = parse(&CANARY.replace("retry: {attempts: 3}", retry)).unwrap();
            let rt = r.http_policies[0].routes[2].retries.clone().unwrap();
            assert_eq!((rt.attempts, rt.backoff_ms), want, "{retry}");
            assert_eq!(
                r.warnings
                    .iter()
                    .any(|w| w.field.ends_with("rules[1].retry.backoff")),
                warned,
                "{retry}: {:?}",
                r.warnings
            );
        }
        // A backend's header modifiers apply when it is picked (as Istio reads them).
        let r = parse(&CANARY.replace(
            "    - {name: orders-v2, port: 8080, weight: 10}",
            "    - name: orders-v2\n      port: 8080\n      weight: 10\n      filters:\n      - type: RequestHeaderModifier\n        requestHeaderModifier: {set: [{name: X-Canary, value: \"1\"}]}\n      - type: ResponseHeaderModifier\n        responseHeaderModifier: {add: [{name: x-backend, value: v2}]}",
        ))
        .unwrap();
        let split = &r.http_policies[0].routes[2].destinations;
        assert!(split[0].headers.is_none());
        let h = split[1].headers.as_deref().unwrap();
        assert_eq!(
            (&h.request.set["x-canary"], &h.response.add["x-backend"]),
            (&"1".to_string(), &"v2".to_string())
        );
        let rd = p.routes[0].redirect.as_ref().unwrap();
        assert_eq!((rd.uri.as_deref(), rd.code), (Some("/new"), 301));
        assert!(p.routes[0].destinations.is_empty());
        // parentRefs[].port restricts every rule to port 8080 (Istio's
        // `augmentPortMatch`): the rule without matches gets one on the port alone.
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert!(
            p.routes
                .iter()
                .all(|r| r.matches.len() == 1 && r.matches[0].port == Some(8080)),
            "{:?}",
            p.routes
        );
        assert_eq!(
            p.routes[2].matches[0],
            meshfed_catalog::http_route::RequestMatch {
                port: Some(8080),
                ..Default::default()
            }
        );
        // Without the port, every port; with two ports, the rules once for each.
        let all = parse(&CANARY.replace(
            "kind: Service, name: orders, port: 8080}",
            "kind: Service, name: orders}",
        ))
        .unwrap();
        assert!(
            all.http_policies[0]
                .routes
                .iter()
                .all(|r| r.matches.iter().all(|m| m.port.is_none()))
        );
        assert!(all.http_policies[0].routes[2].matches.is_empty());
        let two = parse(&CANARY.replace(
            "  - {group: \"\", kind: Service, name: orders, port: 8080}",
            "  - {group: \"\", kind: Service, name: orders, port: 8080}\n  - {group: \"\", kind: Service, name: orders, port: 9090}",
        ))
        .unwrap();
        let ports: Vec<Option<u16>> = two.http_policies[0]
            .routes
            .iter()
            .map(|r| r.matches[0].port)
            .collect();
        assert_eq!(
            ports,
            [8080, 9090, 8080, 9090, 8080, 9090].map(Some),
            "each rule on each port, in precedence"
        );
        // By number or by name (sectionName: the Service port's name), checked against
        // the file's ServiceEntry for the Service; a name without one cannot be read
        // here, and the route applies to every port, warned.
        let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: orders, namespace: shop}\nspec:\n  hosts: [orders.shop.example]\n  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: admin, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}]\n---\n";
        let parent = |r: &str| {
            CANARY.replace(
                "{group: \"\", kind: Service, name: orders, port: 8080}",
                &format!("{{group: \"\", kind: Service, name: orders{r}}}"),
            )
        };
        let ports_of = |yaml: &str| -> Vec<Option<u16>> {
            let r = parse(yaml).unwrap();
            let mut ports: Vec<Option<u16>> = r.http_policies[0]
                .routes
                .iter()
                .flat_map(|r| r.matches.first().map(|m| m.port))
                .collect();
            ports.dedup();
            ports.sort();
            ports.dedup();
            ports
        };
        for (r, with_se, want) in [
            (", port: 8080", true, vec![Some(8080)]),
            (", sectionName: admin", true, vec![Some(9090)]),
            (", port: 9090, sectionName: admin", true, vec![Some(9090)]),
            (", port: 9090", false, vec![Some(9090)]),
            (", port: 9090, sectionName: admin", false, vec![Some(9090)]),
            (", sectionName: admin", false, vec![None]),
        ] {
            let yaml = if with_se {
                format!("{se}{}", parent(r))
            } else {
                parent(r)
            };
            assert_eq!(ports_of(&yaml), want, "{r} (ServiceEntry: {with_se})");
            let warned = parse(&yaml)
                .unwrap()
                .warnings
                .iter()
                .any(|w| w.field == "spec.parentRefs[0].sectionName");
            assert_eq!(warned, want == [None], "{r} (ServiceEntry: {with_se})");
        }
        for (r, field) in [
            (", port: 7070", "spec.parentRefs[0].port"),
            (", sectionName: metrics", "spec.parentRefs[0].sectionName"),
            (
                ", port: 8080, sectionName: admin",
                "spec.parentRefs[0].port",
            ),
            (", sectionName: Admin", "spec.parentRefs[0].sectionName"),
        ] {
            crate::test_support::assert_refused_at(&format!("{se}{}", parent(r)), field);
        }
        // A port that is not one is refused.
        for (port, field) in [
            ("0", "spec.parentRefs[0].port"),
            ("70000", "spec.parentRefs[0].port"),
        ] {
            crate::test_support::assert_refused_at(
                &CANARY.replace(
                    "kind: Service, name: orders, port: 8080}",
                    &format!("kind: Service, name: orders, port: {port}}}"),
                ),
                field,
            );
        }
    }

    #[test]
    fn a_grpc_route_matches_by_service_and_method() {
        let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: demo}
spec:
  parentRefs: [{kind: Service, group: "", name: greeter}]
  rules:
  - matches:
    - method: {service: helloworld.Greeter, method: SayHello}
    - method: {service: helloworld.Admin}
    - method: {method: Ping}
    - method: {type: RegularExpression, service: "helloworld\\..*"}
      headers: [{name: x-tenant, type: RegularExpression, value: "a.*"}]
    backendRefs: [{name: greeter-v2, port: 50051}]
  - backendRefs: [{name: greeter, port: 50051}]
"#;
        let r = parse(yaml).unwrap();
        // One route per match, in the Gateway API's precedence (Istio's: exact, prefix,
        // then regular expressions, the longer first), the rule without matches last.
        let routes = &r.http_policies[0].routes;
        assert_eq!(routes.len(), 5);
        let m: Vec<&meshfed_catalog::http_route::RequestMatch> =
            routes[..4].iter().map(|r| &r.matches[0]).collect();
        assert_eq!(
            m[0].uri,
            Some(StringMatch::Exact("/helloworld.Greeter/SayHello".into()))
        );
        assert_eq!(
            m[1].uri,
            Some(StringMatch::Prefix("/helloworld.Admin/".into()))
        );
        assert_eq!(m[3].uri, Some(StringMatch::Regex("/[^/]+/Ping".into())));
        assert_eq!(
            m[2].uri,
            Some(StringMatch::Regex("/(?:helloworld\\..*)/(?:[^/]+)".into()))
        );
        assert_eq!(m[2].headers["x-tenant"], StringMatch::Regex("a.*".into()));
        assert!(routes[4].matches.is_empty());
        assert!(routes[4].destinations[0].service.is_none());
    }

    #[test]
    fn what_the_crds_refuse_is_refused_with_its_field() {
        // (replace, with, the field the error names)
        let rows = [
            (
                "{group: \"\", kind: Service, name: orders, port: 8080}",
                "{name: my-gateway}",
                "spec.parentRefs[0].kind",
            ),
            (
                "value: /api}",
                "value: api}",
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "value: /api}",
                "value: /a//b}",
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "type: PathPrefix",
                "type: Prefix",
                "spec.rules[0].matches[0].path.type",
            ),
            (
                "{name: orders-v2, port: 8080}",
                "{name: orders-v2}",
                "spec.rules[0].backendRefs[0].port",
            ),
            (
                "weight: 90",
                "weight: 1000001",
                "spec.rules[1].backendRefs[0].weight",
            ),
            (
                "{name: orders-v2, port: 8080}",
                "{name: orders-v2, port: 8080, kind: Pod}",
                "spec.rules[0].backendRefs[0].kind",
            ),
            (
                "request: 2s",
                "request: 2 seconds",
                "spec.rules[0].timeouts.request",
            ),
            (
                "backendRequest: 500ms",
                "backendRequest: 5s",
                "spec.rules[0].timeouts.backendRequest",
            ),
            (
                "statusCode: 301",
                "statusCode: 404",
                "spec.rules[2].filters[0].requestRedirect.statusCode",
            ),
            (
                "type: URLRewrite",
                "type: RequestHeaderModifier",
                "spec.rules[0].filters[1]",
            ),
            (
                "urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}",
                "urlRewrite: {path: {type: ReplacePrefixMatch}}",
                "spec.rules[0].filters[1].urlRewrite.path.replacePrefixMatch",
            ),
            (
                "headers: [{name: X-Beta, value: \"1\"}]",
                "headers: [{name: X-Beta, value: \"1\"}, {name: x-beta, value: \"2\"}]",
                "spec.rules[0].matches[0].headers[1].name",
            ),
            ("- name: beta", "- name: Beta", "spec.rules[0].name"),
            (
                "path: {type: PathPrefix, value: /api}",
                "path: {type: Exact, value: /api}",
                "spec.rules[0].filters",
            ),
            (
                "retry: {attempts: 3}",
                "retry: {attempts: 11}",
                "spec.rules[1].retry.attempts",
            ),
            (
                "retry: {attempts: 3}",
                "retry: {attempts: 3, codes: [503, 302]}",
                "spec.rules[1].retry.codes[1]",
            ),
            (
                "retry: {attempts: 3}",
                "retry: {attempts: 3, backoff: 1.5s}",
                "spec.rules[1].retry.backoff",
            ),
            // Only header modifiers on a backend (Istio refuses the others there).
            (
                "    - {name: orders-v2, port: 8080, weight: 10}",
                "    - {name: orders-v2, port: 8080, weight: 10, filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]}",
                "spec.rules[1].backendRefs[1].filters[0].type",
            ),
            (
                "    - {name: orders-v2, port: 8080, weight: 10}",
                "    - {name: orders-v2, port: 8080, weight: 10, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: host, value: x}]}}]}",
                "spec.rules[1].backendRefs[1].filters[0].requestHeaderModifier.set[0].name",
            ),
        ];
        for (from, to, field) in rows {
            assert!(CANARY.contains(from), "{from}");
            let yaml = CANARY.replacen(from, to, 1);
            match parse(&yaml) {
                Err(ParseError::Invalid(problems)) => assert!(
                    problems.iter().any(|p| p.field.starts_with(field)),
                    "{to}: wanted {field}, got {problems:?}"
                ),
                other => panic!("{to}: accepted: {other:?}"),
            }
        }
        // A VirtualService and a route for one service: one of them applies.
        let both = format!(
            "{CANARY}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: o, namespace: shop}}\nspec:\n  hosts: [orders]\n  http:\n  - route:\n    - destination: {{host: orders}}\n"
        );
        let e = parse(&both).unwrap_err().to_string();
        assert!(
            e.contains("spec.parentRefs[0]") && e.contains("already has routes"),
            "{e}"
        );
    }

    /// Several routes of one Service are merged, as Istio merges them: the matches of
    /// all in the Gateway API's precedence, ties to the oldest route (no
    /// `creationTimestamp`: the oldest), then by namespace/name, then as written.
    #[test]
    fn routes_of_one_service_are_merged_oldest_first_on_ties() {
        let route = |name: &str, created: Option<&str>, rules: &str| {
            let created = created
                .map(|c| format!(", creationTimestamp: \"{c}\""))
                .unwrap_or_default();
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop{created}}}\nspec:\n  parentRefs: [{{kind: Service, group: \"\", name: orders}}]\n  rules:\n{rules}"
            )
        };
        let rule = |path: &str, to: &str| {
            format!(
                "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    backendRefs: [{{name: {to}, port: 80}}]\n"
            )
        };
        let newer = route(
            "a-new",
            Some("2026-03-01T00:00:00Z"),
            &rule("/api", "from-a-new"),
        );
        let older = route(
            "z-old",
            Some("2025-01-01T00:00:00Z"),
            &format!("{}{}", rule("/", "z-all"), rule("/api", "from-z-old")),
        );
        let undated = route("m", None, &rule("/api", "from-m"));
        let to = |yaml: &str| -> (String, Vec<String>) {
            let r = parse(yaml).unwrap();
            assert_eq!(r.http_policies.len(), 1, "{yaml}");
            let p = &r.http_policies[0];
            let to = p
                .routes
                .iter()
                .map(|r| {
                    r.destinations[0]
                        .service
                        .as_ref()
                        .map_or("orders".into(), |s| s.name().to_owned())
                })
                .collect();
            (p.source.clone(), to)
        };
        // In either document order: /api before /, and among the /api rules the older
        // route's first.
        for yaml in [
            format!("{newer}---\n{older}"),
            format!("{older}---\n{newer}"),
        ] {
            assert_eq!(
                to(&yaml),
                (
                    "HTTPRoute shop/z-old, HTTPRoute shop/a-new".to_owned(),
                    vec!["from-z-old".into(), "from-a-new".into(), "z-all".into()]
                )
            );
        }
        // No creationTimestamp is the oldest.
        assert_eq!(
            to(&format!("{newer}---\n{older}---\n{undated}")).1,
            ["from-m", "from-z-old", "from-a-new", "z-all"]
        );
        // A time Kubernetes would not write is refused by its field.
        crate::test_support::assert_refused_at(
            &newer.replace("2026-03-01T00:00:00Z", "yesterday"),
            "metadata.creationTimestamp",
        );
    }

    /// The examples under tests/data/gatewayapi (fuzz seeds too) are read whole, with
    /// no warning.
    #[test]
    fn the_examples_are_read_whole() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/gatewayapi");
        for name in ["http-canary.yaml", "grpc-route.yaml"] {
            let yaml = std::fs::read_to_string(dir.join(name)).unwrap();
            let r = parse(&yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
            assert!(!r.http_policies.is_empty(), "{name}");
        }
        let yaml = std::fs::read_to_string(dir.join("http-canary.yaml")).unwrap();
        let r = parse(&yaml).unwrap();
        let cors = r.http_policies[0].routes[2].cors.as_deref().unwrap();
        assert_eq!(
            (
                cors.allow_origins.len(),
                cors.max_age_s,
                cors.allow_credentials
            ),
            (2, Some(600), true)
        );
    }

    /// ReplaceFullPath replaces the whole path, under a PathPrefix match too (before,
    /// refused there: the model's `uri` replaces the matched prefix).
    #[test]
    fn replace_full_path_replaces_the_whole_path_under_any_match() {
        let yaml = CANARY.replacen(
            "urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}",
            "urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /v2/all}}",
            1,
        );
        let r = parse(&yaml).unwrap();
        let rw = r.http_policies[0].routes[1].rewrite.clone().unwrap();
        assert_eq!(rw.uri, None);
        let c = rw.uri_regex.unwrap().compile("r").unwrap();
        for (from, want) in [
            ("/api/orders?id=1", "/v2/all?id=1"),
            ("/api", "/v2/all"),
            ("/", "/v2/all"),
        ] {
            assert_eq!(c.apply(from).as_deref(), Some(want), "{from}");
        }
    }

    /// A redirect's ReplacePrefixMatch replaces the matched prefix (Istio's
    /// `%PREFIX()%` mark); the CRD's rule: exactly one PathPrefix match beside it.
    /// Before, refused as not supported.
    #[test]
    fn a_redirect_replacing_the_matched_prefix_is_read() {
        let rule = "  - matches: [{path: {type: Exact, value: /old}}]\n    filters:\n    - type: RequestRedirect\n      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}";
        assert!(CANARY.contains(rule));
        let prefix = rule
            .replace("type: Exact, value: /old", "type: PathPrefix, value: /old")
            .replace(
                "type: ReplaceFullPath, replaceFullPath: /new",
                "type: ReplacePrefixMatch, replacePrefixMatch: /new",
            );
        let r = parse(&CANARY.replacen(rule, &prefix, 1)).unwrap();
        let rd = r.http_policies[0].routes[1].redirect.clone().unwrap();
        assert_eq!(rd.uri.as_deref(), Some("%PREFIX()%/new"));
        assert_eq!(
            meshfed_catalog::http_route::redirect_location(
                &rd,
                "http",
                "web",
                "/old/a?b=1",
                Some("/old")
            ),
            "http://web/new/a?b=1"
        );
        // Not under exactly one PathPrefix match.
        let exact = prefix.replace("type: PathPrefix, value: /old", "type: Exact, value: /old");
        crate::test_support::assert_refused_at(
            &CANARY.replacen(rule, &exact, 1),
            "spec.rules[2].filters",
        );
    }

    #[test]
    fn a_cors_filter_is_read_as_the_crd_checks_it() {
        const CORS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orders, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: orders, port: 8080}]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://app.example.com", "https://*.example.com:8443"]
        allowMethods: [GET, PUT]
        allowHeaders: [x-custom]
        exposeHeaders: [x-served-by]
        allowCredentials: true
        maxAge: 600
    backendRefs: [{name: orders, port: 8080}]
"#;
        let r = parse(CORS).unwrap();
        let c = r.http_policies[0].routes[0].cors.as_deref().unwrap();
        assert_eq!(c.allow_methods, ["GET", "PUT"]);
        assert_eq!(
            (&c.allow_headers[..], &c.expose_headers[..]),
            (
                &["x-custom".to_owned()][..],
                &["x-served-by".to_owned()][..]
            )
        );
        assert_eq!(
            (
                c.max_age_s,
                c.allow_credentials,
                c.ignore_unmatched_preflights
            ),
            (Some(600), true, true)
        );
        assert_eq!(
            c.allow_origins[0],
            StringMatch::Exact("https://app.example.com".into())
        );
        // The wildcard: any run of host characters, labels included; never the port.
        let StringMatch::Regex(re) = &c.allow_origins[1] else {
            panic!("{:?}", c.allow_origins[1]);
        };
        let re = regex::Regex::new(&format!("^(?:{re})$")).unwrap();
        for (origin, allowed) in [
            ("https://a.example.com:8443", true),
            ("https://a.b.example.com:8443", true),
            ("https://.example.com:8443", true),
            ("https://a.example.com", false),
            ("https://a.example.com:9443", false),
            ("https://a.example.com.evil:8443", false),
            ("https://evil:1.example.com:8443", false),
            ("http://a.example.com:8443", false),
            ("https://aexample.com:8443", false),
        ] {
            assert_eq!(re.is_match(origin), allowed, "{origin}");
        }
        // Defaults: max age 5 s, no credentials; `*` alone allows every origin.
        let plain = CORS
            .replace("        allowCredentials: true\n", "")
            .replace("        maxAge: 600\n", "")
            .replace(
                r#"["https://app.example.com", "https://*.example.com:8443"]"#,
                r#"["*"]"#,
            );
        let r = parse(&plain).unwrap();
        let c = r.http_policies[0].routes[0].cors.as_deref().unwrap();
        assert_eq!(
            (c.max_age_s, c.allow_credentials),
            (Some(5), false),
            "{plain}"
        );
        assert_eq!(c.allow_origins, [StringMatch::Exact("*".into())]);
        // A second CORS filter replaces the first, warned.
        let twice = CORS.replace(
            "    backendRefs:",
            "    - {type: CORS, cors: {allowOrigins: [\"*\"]}}\n    backendRefs:",
        );
        let r = parse(&twice).unwrap();
        let c = r.http_policies[0].routes[0].cors.as_deref().unwrap();
        assert_eq!(c.allow_origins, [StringMatch::Exact("*".into())]);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.field == "spec.rules[0].filters[1]"),
            "{:?}",
            r.warnings
        );
        // What the CRD refuses: (replace, with, the field the error names).
        for (from, to, field) in [
            (
                "\"https://app.example.com\", ",
                "\"https://app.example.com/\", ",
                "spec.rules[0].filters[0].cors.allowOrigins[0]",
            ),
            (
                "\"https://app.example.com\", ",
                "\"app.example.com\", ",
                "spec.rules[0].filters[0].cors.allowOrigins[0]",
            ),
            (
                "\"https://app.example.com\", ",
                "\"https://app.example.com:123456\", ",
                "spec.rules[0].filters[0].cors.allowOrigins[0]",
            ),
            (
                "\"https://app.example.com\", ",
                "\"*\", ",
                "spec.rules[0].filters[0].cors.allowOrigins",
            ),
            (
                "\"https://app.example.com\", ",
                "\"https://*.example.com:8443\", ",
                "spec.rules[0].filters[0].cors.allowOrigins[1]",
            ),
            (
                "[GET, PUT]",
                "[GET, get]",
                "spec.rules[0].filters[0].cors.allowMethods[1]",
            ),
            (
                "[GET, PUT]",
                "[GET, \"*\"]",
                "spec.rules[0].filters[0].cors.allowMethods",
            ),
            (
                "[x-custom]",
                "[\"x custom\"]",
                "spec.rules[0].filters[0].cors.allowHeaders[0]",
            ),
            (
                "maxAge: 600",
                "maxAge: 0",
                "spec.rules[0].filters[0].cors.maxAge",
            ),
            (
                "allowCredentials: true",
                "allowCredentials: \"yes\"",
                "spec.rules[0].filters[0].cors.allowCredentials",
            ),
            (
                "    - type: CORS\n      cors:",
                "    - type: CORS\n      urlRewrite: {}\n      cors:",
                "spec.rules[0].filters[0].urlRewrite",
            ),
        ] {
            assert!(CORS.contains(from), "{from}");
            crate::test_support::assert_refused_at(&CORS.replacen(from, to, 1), field);
        }
    }

    #[test]
    fn a_request_mirror_to_another_service_names_it() {
        let mirror = "    - type: RequestMirror\n      requestMirror: {backendRef: {name: orders-shadow, port: 9090}, percent: 20}\n";
        let yaml = CANARY.replacen(
            "    - type: URLRewrite\n",
            &format!("{mirror}    - type: URLRewrite\n"),
            1,
        );
        let r = parse(&yaml).unwrap();
        let m = &r.http_policies[0].routes[1].mirrors[0];
        assert_eq!(
            m.service.as_ref().map(ToString::to_string).as_deref(),
            Some("orders-shadow.shop")
        );
        assert_eq!((m.port, m.per_million), (Some(9090), 200_000));
        // The route's own Service: no service named.
        let own = parse(&yaml.replace(
            "name: orders-shadow, port: 9090",
            "name: orders, port: 8080",
        ))
        .unwrap();
        let m = &own.http_policies[0].routes[1].mirrors[0];
        assert_eq!((m.service.as_ref(), m.port), (None, None));
        // Several RequestMirror filters (the conformance suite's request-multiple-mirrors):
        // a copy to each; a second mirror's field path names its own filter.
        let two = CANARY.replacen(
            "    - type: URLRewrite\n",
            &format!(
                "{mirror}{}    - type: URLRewrite\n",
                mirror.replace(
                    "orders-shadow, port: 9090}, percent: 20",
                    "orders-v3, port: 9091}"
                )
            ),
            1,
        );
        let r = parse(&two).unwrap();
        let ms = &r.http_policies[0].routes[1].mirrors;
        assert_eq!(
            ms.iter()
                .map(|m| (
                    m.service.as_ref().unwrap().to_string(),
                    m.port,
                    m.per_million
                ))
                .collect::<Vec<_>>(),
            [
                ("orders-shadow.shop".to_owned(), Some(9090), 200_000),
                ("orders-v3.shop".to_owned(), Some(9091), 1_000_000)
            ]
        );
        match parse(&two.replace("name: orders-v3", "name: orders-v3, namespace: billing")) {
            Err(ParseError::Invalid(problems)) => {
                assert!(
                    problems.iter().any(|p| p.field
                        == "spec.rules[0].filters[2].requestMirror.backendRef.namespace"),
                    "{problems:?}"
                )
            }
            other => panic!("accepted: {other:?}"),
        }
        for (from, to, field) in [
            // The CRD's CEL rule: a Service reference has a port.
            (
                "name: orders-shadow, port: 9090",
                "name: orders-shadow",
                "spec.rules[0].filters[1].requestMirror.backendRef.port",
            ),
            (
                "name: orders-shadow, port: 9090",
                "name: orders-shadow, namespace: billing, port: 9090",
                "spec.rules[0].filters[1].requestMirror.backendRef.namespace",
            ),
        ] {
            match parse(&yaml.replace(from, to)) {
                Err(ParseError::Invalid(problems)) => assert!(
                    problems.iter().any(|p| p.field.starts_with(field)),
                    "{to}: wanted {field}, got {problems:?}"
                ),
                other => panic!("{to}: accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn durations_follow_gep_2257() {
        for (s, want) in [
            ("10s", Some(10_000)),
            ("500ms", Some(500)),
            ("1h30m", Some(5_400_000)),
            ("0s", Some(0)),
            ("1h1m1s1ms", Some(3_661_001)),
            ("1h1m1s1ms1h", None),
            ("10", None),
            ("s", None),
            ("1.5s", None),
            ("123456s", None),
            ("", None),
            ("-1s", None),
        ] {
            assert_eq!(gep_duration(s), want, "{s}");
        }
    }
}
