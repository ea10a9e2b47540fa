//! Istio `VirtualService` (HTTP routes) and the `subsets` and `trafficPolicy`
//! (`connectionPool`, `outlierDetection`, `loadBalancer`, and the same per port in
//! `portLevelSettings`) of a `DestinationRule`, with each subset's own `trafficPolicy`,
//! into the routing policy gateways apply (`meshfed_catalog::http_route`). Pure.
//!
//! Read: `hosts` (a service as `name.namespace`, `name.namespace.svc.cluster.local` or
//! `.svc.clusterset.local`, a short name in the VirtualService's namespace, or a host of
//! a ServiceEntry in the same file), `http[].name`, `http[].match[]` (`uri`, `method`,
//! `headers`, `queryParams`, `withoutHeaders`, `authority`, `scheme`: `exact`, `prefix`,
//! `regex` or `{}` for presence; `ignoreUriCase`, `port`, `sourceNamespace`;
//! `sourceLabels`, which hold only for callers known by their pod address, and
//! `gateways` without `mesh`, which never hold, are kept and warned about),
//! `http[].route[]`
//! (`destination.host` — the service itself or another one, which importing gateways
//! reach through their import of it — `destination.subset`, `destination.port.number`,
//! `weight`),
//! `http[].timeout`, `http[].retries` (`attempts`, `perTryTimeout`, `retryOn`: Envoy's
//! conditions and HTTP statuses, applied to idempotent requests and to any request
//! never sent; without it the gateway retries connect failures, resets and 502–504),
//! `http[].fault` (`delay.fixedDelay`, `abort.httpStatus`, each with `percentage.value`),
//! `http[].mirror` (host — the same service or another — subset and port) with
//! `mirrorPercentage`, or `http[].mirrors[]` (each a `destination` with its own
//! `percentage`; at most 16, and not beside `mirror`),
//! `http[].headers` (`request`/`response`: `set`, `add`, `remove`), `http[].rewrite`
//! (`uri`, `uriRegexRewrite`, `authority`) and `http[].redirect` (`uri`, `authority`, `scheme`, `port`,
//! `redirectCode`; such a route has no `route`), `http[].directResponse` (`status`,
//! `body.string` or `body.bytes`; such a route has no `route`, and its `retries` and
//! mirrors are ignored, warned), `tcp[]` (`match`: `port`, `destinationSubnets`,
//! `sourceNamespace`, `sourceLabels`, `gateways`; `route[]`: destinations and weights;
//! alone, HTTP ports keep the service itself). Istio has no field for local rate
//! limits: the VirtualService's annotations `ratelimit.meshfed.io/rate` (`100/s`,
//! `600/m`, `5/h`, `10/500ms`: a bucket per route), `.../burst` and
//! `.../route.<http[].name>` (one route's rate) give them.
//! Anything else is a warning naming its path; Istio's validation rules are errors:
//! weights 0–100 adding up to 100 when a route has several destinations, a regex that
//! does not compile, a subset no DestinationRule defines.

use serde_json::Value;

use meshfed_catalog::http_route::{
    Destination, DirectBody, DirectResponse, Fault, FaultAbort, FaultDelay, HeaderOps, HeaderRules,
    HttpPolicy, HttpRoute, LoadBalancer, MAX_MIRRORS, Mirror, Outlier, RateLimit, Redirect,
    RegexRewrite, RequestMatch, Retries, Rewrite, StringMatch, Subset, TcpMatch, TcpRoute,
};

use crate::service_entry::{Doc, duration_ms, go_duration_ms};

/// A VirtualService as read, before its hosts are resolved to services.
pub(crate) struct RawVirtualService {
    pub index: usize,
    pub name: String,
    pub namespace: String,
    pub hosts: Vec<String>,
    pub routes: Vec<HttpRoute>,
    /// `spec.tcp`.
    pub tcp_routes: Vec<TcpRoute>,
    /// `spec.tls`.
    pub tls_routes: Vec<TcpRoute>,
    /// `(route, what, host)` of every destination and mirror, for resolution.
    pub destination_hosts: Vec<(usize, HostOf, String)>,
    /// `spec.exportTo`, `.` resolved to the namespace; empty: every namespace.
    pub export_to: Vec<String>,
}

/// What a host of a route names: a destination (`route[j]`), the route's `mirror`, or
/// one of its `mirrors` (`mirrors[k]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HostOf {
    Destination(usize),
    Mirror,
    Mirrors(usize),
    /// A destination (`route[j]`) of a TCP route (`spec.tcp[i]`).
    Tcp(usize),
    /// A destination (`route[j]`) of a TLS route (`spec.tls[i]`).
    Tls(usize),
}

impl RawVirtualService {
    /// The routes (`spec.http` indices) whose copies come from the singular `mirror`.
    fn singular_mirrors(&self) -> impl Iterator<Item = usize> + '_ {
        self.destination_hosts
            .iter()
            .filter(|(_, what, _)| *what == HostOf::Mirror)
            .map(|(r, _, _)| *r)
    }
}

/// Where a `StringMatch` stands, for Istio's rules on it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MatchKind {
    /// `uri`: `{}` and an empty prefix accept every path.
    Uri,
    /// `headers`, `queryParams`, `method`, `authority`, `scheme`: `{}` asks for presence,
    /// an empty prefix is refused (Envoy's string matchers refuse it).
    Value,
    /// `withoutHeaders`: as [`MatchKind::Value`], and `regex: "*"` asks for presence too.
    Without,
    /// `corsPolicy.allowOrigins`: `{}` and empty strings are refused.
    Origin,
}

/// Istio's longest regex (its stand-in for Envoy's RE2 program size).
const MAX_REGEX_LEN: usize = 1024;

fn string_match(d: &mut Doc<'_>, v: &Value, field: &str, kind: MatchKind) -> Option<StringMatch> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map with exact, prefix or regex");
        return None;
    };
    d.unsupported(field, m, &["exact", "prefix", "regex"]);
    let mut found = m
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "exact" | "prefix" | "regex"));
    let (k, v) = match (found.next(), found.next()) {
        (Some(kv), None) => kv,
        // Istio's `{}`: any value (Envoy's `present_match`); on the path, every path.
        (None, _) if m.is_empty() && kind != MatchKind::Origin => {
            return Some(StringMatch::Present);
        }
        (None, _) => {
            d.err(field, "needs one of exact, prefix or regex");
            return None;
        }
        (Some(_), Some(_)) => {
            d.err(field, "only one of exact, prefix or regex");
            return None;
        }
    };
    let Some(s) = v.as_str() else {
        d.err(format!("{field}.{k}"), "must be a string");
        return None;
    };
    match k.as_str() {
        "exact" => Some(StringMatch::Exact(s.into())),
        "prefix" if s.is_empty() && matches!(kind, MatchKind::Value | MatchKind::Without) => {
            d.err(
                format!("{field}.prefix"),
                "prefix string match should not be empty",
            );
            None
        }
        "prefix" => Some(StringMatch::Prefix(s.into())),
        // `*` is not RE2; Istio reads it as presence here.
        _ if s == "*" && kind == MatchKind::Without => Some(StringMatch::Present),
        _ if s.is_empty() => {
            d.err(
                format!("{field}.regex"),
                "regex string match should not be empty",
            );
            None
        }
        _ if s.len() > MAX_REGEX_LEN => {
            d.err(
                format!("{field}.regex"),
                format!("regex is too large, max length allowed is {MAX_REGEX_LEN}"),
            );
            None
        }
        _ => Some(StringMatch::Regex(s.into())),
    }
}

/// Whether `name` may be matched on: an HTTP token (RFC 9110), or one of the request's
/// pseudo-headers (Istio's `ValidateHTTPHeaderNameOrJwtClaimRoute`).
fn match_header_name(d: &mut Doc<'_>, name: &str, field: &str) -> bool {
    if name.starts_with("@request.auth.claims") {
        // Istio: JWT claim routes need a gateway; meshfed's egress stands for `mesh`.
        d.err(
            field,
            format!("JWT claim based routing (key: {name}) is only supported for gateway"),
        );
        return false;
    }
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token
        && !matches!(
            name,
            ":method" | ":scheme" | ":authority" | ":path" | ":status"
        )
    {
        d.err(
            field,
            format!("header name {name} is not a valid header name"),
        );
        return false;
    }
    true
}

fn match_map(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    field: &str,
    kind: MatchKind,
    headers: bool,
) -> std::collections::BTreeMap<String, StringMatch> {
    let mut out = std::collections::BTreeMap::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let f = format!("{field}.{k}");
                if headers && !match_header_name(d, k, &f) {
                    continue;
                }
                if let Some(sm) = string_match(d, v, &f, kind) {
                    out.insert(
                        if headers {
                            k.to_ascii_lowercase()
                        } else {
                            k.clone()
                        },
                        sm,
                    );
                }
            }
        }
        Some(_) => d.err(field, "must be a map"),
    }
    out
}

fn request_match(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<RequestMatch> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        field,
        m,
        &[
            "name",
            "uri",
            "method",
            "headers",
            "queryParams",
            "withoutHeaders",
            "authority",
            "scheme",
            "port",
            "ignoreUriCase",
            "sourceNamespace",
            "sourceLabels",
            "gateways",
        ],
    );
    let one = |d: &mut Doc<'_>, k: &str, kind| {
        m.get(k)
            .filter(|v| !v.is_null())
            .and_then(|u| string_match(d, u, &format!("{field}.{k}"), kind))
    };
    let uri = one(d, "uri", MatchKind::Uri);
    let method = one(d, "method", MatchKind::Value);
    let authority = one(d, "authority", MatchKind::Value);
    let scheme = one(d, "scheme", MatchKind::Value);
    let ignore_uri_case = match m.get("ignoreUriCase") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            d.err(format!("{field}.ignoreUriCase"), "must be true or false");
            false
        }
    };
    let source = source_conditions(d, m, field);
    Some(RequestMatch {
        uri,
        method,
        authority,
        scheme,
        headers: match_map(
            d,
            m.get("headers"),
            &format!("{field}.headers"),
            MatchKind::Value,
            true,
        ),
        query_params: match_map(
            d,
            m.get("queryParams"),
            &format!("{field}.queryParams"),
            MatchKind::Value,
            false,
        ),
        without_headers: match_map(
            d,
            m.get("withoutHeaders"),
            &format!("{field}.withoutHeaders"),
            MatchKind::Without,
            true,
        ),
        port: source.port,
        ignore_uri_case,
        source_namespace: source.namespace,
        source_labels: source.labels,
        gateways: source.gateways,
    })
}

/// The conditions an HTTP and a TCP match share: where the connection came from.
struct SourceConditions {
    port: Option<u16>,
    namespace: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
    gateways: Vec<String>,
}

/// `port`, `sourceNamespace`, `sourceLabels` and `gateways` of the match at `field`, as
/// Istio checks them; caller labels and gateways without `mesh` are warned about
/// (such a match never applies at meshfed's egress).
fn source_conditions(
    d: &mut Doc<'_>,
    m: &serde_json::Map<String, Value>,
    field: &str,
) -> SourceConditions {
    let port = match m.get("port") {
        None | Some(Value::Null) => None,
        Some(p) => match p.as_u64() {
            Some(0) => None,
            Some(n @ 1..=65535) => Some(n as u16),
            _ => {
                d.err(
                    format!("{field}.port"),
                    "port number must be in the range 1..65535",
                );
                None
            }
        },
    };
    let source_namespace = match m.get("sourceNamespace") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if !s.contains('.') && meshfed_catalog::names::dns_subdomain(s) => {
            Some(s.clone())
        }
        Some(v) => {
            d.err(
                format!("{field}.sourceNamespace"),
                format!("sourceNamespace match {v} is invalid"),
            );
            None
        }
    };
    let source_labels = d.string_map(m.get("sourceLabels"), &format!("{field}.sourceLabels"));
    if let Err((k, msg)) = meshfed_catalog::http_route::check_labels(&source_labels) {
        d.err(format!("{field}.sourceLabels{k}"), msg);
    }
    if !source_labels.is_empty() {
        d.warn(
            format!("{field}.sourceLabels"),
            "meshfed's egress knows its callers' labels only by their pod address (caller_pod_ip): this match holds for no other caller",
        );
    }
    let gateways = d.str_list(m.get("gateways"), &format!("{field}.gateways"));
    if !gateways.is_empty() && !gateways.iter().any(|g| g == "mesh") {
        d.warn(
            format!("{field}.gateways"),
            "does not name mesh: this match does not apply at meshfed's egress, as at Istio's sidecars",
        );
    }
    SourceConditions {
        port,
        namespace: source_namespace,
        labels: source_labels,
        gateways,
    }
}

fn duration(d: &mut Doc<'_>, v: Option<&Value>, field: &str) -> Option<u64> {
    match v? {
        Value::String(s) => go_duration_ms(s)
            .map_err(|why| d.err(field, format!("{s:?}: {why}")))
            .ok(),
        _ => {
            d.err(field, "must be a duration string like 5s");
            None
        }
    }
}

/// A VirtualService's `retries.backoff` (Istio 1.26: the base of Envoy's retry back-off),
/// an Istio duration.
fn backoff(d: &mut Doc<'_>, v: Option<&Value>, field: &str) -> Option<u64> {
    let ms = duration(d, v, field);
    retry_backoff(d, ms, field)
}

/// A retry back-off base of `ms` as meshfed applies it: above
/// [`meshfed_catalog::http_route::MAX_RETRY_BACKOFF_MS`] it is accepted (Istio and the
/// Gateway API CRD take any duration), warned about by path, and the most applies.
pub(crate) fn retry_backoff(d: &mut Doc<'_>, ms: Option<u64>, field: &str) -> Option<u64> {
    use meshfed_catalog::http_route::MAX_RETRY_BACKOFF_MS;
    match ms? {
        ms if ms > MAX_RETRY_BACKOFF_MS => {
            d.warn(
                field,
                format!(
                    "{ms} ms: meshfed waits at most {MAX_RETRY_BACKOFF_MS} ms as a back-off base; that applies"
                ),
            );
            Some(MAX_RETRY_BACKOFF_MS)
        }
        ms => Some(ms),
    }
}

/// `KEY: {value: P}` (0–100, a double) in millionths; absent: 100 %.
fn percentage(d: &mut Doc<'_>, m: &serde_json::Map<String, Value>, field: &str, key: &str) -> u32 {
    match m.get(key) {
        None => 1_000_000,
        Some(Value::Object(p)) => {
            d.unsupported(&format!("{field}.{key}"), p, &["value"]);
            match p.get("value").and_then(Value::as_f64) {
                Some(v) if (0.0..=100.0).contains(&v) => (v * 10_000.0).round() as u32,
                _ => {
                    d.err(format!("{field}.{key}.value"), "a percentage from 0 to 100");
                    0
                }
            }
        }
        Some(_) => {
            d.err(format!("{field}.{key}"), "must be a map with value");
            0
        }
    }
}

/// `spec.http[i].fault`: a fixed delay and an abort (HTTP status), each with a share.
fn fault(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<Fault> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(field, m, &["delay", "abort"]);
    let mut out = Fault::default();
    if let Some(Value::Object(dl)) = m.get("delay") {
        let f = format!("{field}.delay");
        d.unsupported(&f, dl, &["fixedDelay", "percentage", "percent"]);
        if dl.contains_key("percent") {
            d.err(
                format!("{f}.percent"),
                "deprecated in Istio: use percentage.value",
            );
        }
        match duration(d, dl.get("fixedDelay"), &format!("{f}.fixedDelay")) {
            Some(ms) => {
                out.delay = Some(FaultDelay {
                    fixed_delay_ms: ms,
                    per_million: percentage(d, dl, &f, "percentage"),
                })
            }
            None if !dl.contains_key("fixedDelay") => d.err(
                format!("{f}.fixedDelay"),
                "missing (exponentialDelay is not supported)",
            ),
            None => {}
        }
    }
    if let Some(Value::Object(ab)) = m.get("abort") {
        let f = format!("{field}.abort");
        d.unsupported(&f, ab, &["httpStatus", "percentage"]);
        match ab.get("httpStatus").and_then(Value::as_u64) {
            Some(s @ 200..=599) => {
                out.abort = Some(FaultAbort {
                    http_status: s as u16,
                    per_million: percentage(d, ab, &f, "percentage"),
                })
            }
            _ => d.err(
                format!("{f}.httpStatus"),
                "an HTTP status from 200 to 599 (grpcStatus and http2Error are not supported)",
            ),
        }
    }
    Some(out)
}

/// A route's copies: Istio's `mirror` (with `mirrorPercentage`) or its `mirrors` (each
/// with its own `percentage`), never both (Istio's rule). Their hosts join `hosts`, to be
/// resolved with the destinations'.
fn mirrors(
    d: &mut Doc<'_>,
    m: &serde_json::Map<String, Value>,
    field: &str,
    hosts: &mut Vec<(HostOf, String)>,
) -> Vec<Mirror> {
    let one = |d: &mut Doc<'_>, dest: &Value, f: &str, hosts: &mut Vec<_>, what| {
        let Value::Object(dest) = dest else {
            d.err(f, "must be a map");
            return None;
        };
        d.unsupported(f, dest, &["host", "subset", "port"]);
        match dest.get("host").and_then(Value::as_str) {
            Some(h) if !h.is_empty() => hosts.push((what, h.to_owned())),
            _ => d.err(format!("{f}.host"), "missing"),
        }
        Some(Mirror {
            // Set when the host resolves to another service.
            service: None,
            port: port_selector(d, dest.get("port"), &format!("{f}.port")),
            subset: dest
                .get("subset")
                .and_then(Value::as_str)
                .map(str::to_owned),
            per_million: 1_000_000,
        })
    };
    let single = m.get("mirror").filter(|v| !v.is_null());
    let list = m.get("mirrors").filter(|v| !v.is_null());
    if single.is_some() && list.is_some() {
        // Istio's own words.
        d.err(
            format!("{field}.mirrors"),
            "HTTP route cannot contain both mirror and mirrors",
        );
        return Vec::new();
    }
    if let Some(v) = single {
        let f = format!("{field}.mirror");
        return one(d, v, &f, hosts, HostOf::Mirror)
            .map(|mut x| {
                // Istio: 100 % when mirrorPercentage is absent.
                x.per_million = percentage(d, m, field, "mirrorPercentage");
                x
            })
            .into_iter()
            .collect();
    }
    let Some(list) = list else {
        return Vec::new();
    };
    if m.get("mirrorPercentage").is_some_and(|v| !v.is_null()) {
        d.warn(
            format!("{field}.mirrorPercentage"),
            "applies to mirror only: each of mirrors has its own percentage",
        );
    }
    let Value::Array(list) = list else {
        d.err(format!("{field}.mirrors"), "must be a list");
        return Vec::new();
    };
    if list.len() > MAX_MIRRORS {
        d.err(
            format!("{field}.mirrors"),
            format!("at most {MAX_MIRRORS} mirrors per route (each is a request of its own)"),
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for (k, x) in list.iter().enumerate() {
        let f = format!("{field}.mirrors[{k}]");
        let Value::Object(policy) = x else {
            // Istio's words.
            d.err(f, "mirror cannot be null");
            continue;
        };
        d.unsupported(&f, policy, &["destination", "percentage"]);
        let Some(dest) = policy.get("destination").filter(|v| !v.is_null()) else {
            d.err(
                format!("{f}.destination"),
                "destination is required for mirrors",
            );
            continue;
        };
        let df = format!("{f}.destination");
        if let Some(mut x) = one(d, dest, &df, hosts, HostOf::Mirrors(k)) {
            // Istio: 100 % when percentage is absent.
            x.per_million = percentage(d, policy, &f, "percentage");
            out.push(x);
        }
    }
    out
}

/// A route's `route[]` (`field`: the route's path): its destinations, with Istio's
/// weight rules, and each destination's host by index (resolved later). A TCP route's
/// destinations have no `headers` (`with_headers`).
fn route_destinations(
    d: &mut Doc<'_>,
    dests: &[Value],
    field: &str,
    with_headers: bool,
) -> (Vec<Destination>, Vec<(usize, String)>) {
    let mut destinations = Vec::new();
    let mut hosts = Vec::new();
    let mut total = 0u64;
    for (j, x) in dests.iter().enumerate() {
        let f = format!("{field}.route[{j}]");
        let Value::Object(rd) = x else {
            d.err(f, "must be a map");
            continue;
        };
        let known: &[&str] = if with_headers {
            &["destination", "weight", "headers"]
        } else {
            &["destination", "weight"]
        };
        d.unsupported(&f, rd, known);
        let Some(Value::Object(dest)) = rd.get("destination") else {
            d.err(format!("{f}.destination"), "missing");
            continue;
        };
        d.unsupported(
            &format!("{f}.destination"),
            dest,
            &["host", "subset", "port"],
        );
        match dest.get("host").and_then(Value::as_str) {
            Some(h) if !h.is_empty() => hosts.push((j, h.to_owned())),
            _ => d.err(format!("{f}.destination.host"), "missing"),
        }
        let weight = match rd.get("weight") {
            None | Some(Value::Null) => 0,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(w) if w <= 100 => w as u32,
                _ => {
                    d.err(
                        format!("{f}.weight"),
                        format!("{n} is not a percentage (0–100)"),
                    );
                    0
                }
            },
            Some(other) => {
                d.err(format!("{f}.weight"), format!("{other} is not a number"));
                0
            }
        };
        // Istio: a single destination takes all the traffic, whatever its weight.
        let weight = if dests.len() == 1 { 100 } else { weight };
        total += u64::from(weight);
        let port = port_selector(d, dest.get("port"), &format!("{f}.destination.port"));
        destinations.push(Destination {
            // Set when the host resolves to another service.
            service: None,
            port,
            subset: dest
                .get("subset")
                .and_then(Value::as_str)
                .map(str::to_owned),
            weight,
            // Applied when this destination is picked, before the route's own.
            headers: rd
                .get("headers")
                .filter(|_| with_headers)
                .and_then(|v| header_rules(d, v, &format!("{f}.headers")))
                .map(Box::new),
        });
    }
    if dests.len() > 1 && total != 100 {
        // Istio's own words.
        d.err(
            format!("{field}.route"),
            format!("total destination weight {total} != 100"),
        );
    }
    (destinations, hosts)
}

/// One HTTP route (`spec.http[i]`), and its destinations' hosts.
fn route(d: &mut Doc<'_>, v: &Value, i: usize) -> Option<(HttpRoute, Vec<(HostOf, String)>)> {
    let field = format!("spec.http[{i}]");
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        &field,
        m,
        &[
            "name",
            "match",
            "route",
            "timeout",
            "retries",
            "fault",
            "mirror",
            "mirrors",
            "mirrorPercentage",
            "headers",
            "rewrite",
            "redirect",
            "directResponse",
            "corsPolicy",
        ],
    );
    let mut matches = Vec::new();
    match m.get("match") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for (j, x) in a.iter().enumerate() {
                if let Some(rm) = request_match(d, x, &format!("{field}.match[{j}]")) {
                    matches.push(rm);
                }
            }
        }
        Some(_) => d.err(format!("{field}.match"), "must be a list"),
    }
    let redirect = m
        .get("redirect")
        .and_then(|v| redirect(d, v, &format!("{field}.redirect")));
    let direct_response = m
        .get("directResponse")
        .and_then(|v| direct_response(d, v, &format!("{field}.directResponse")));
    // A route answered at the egress: by its redirect, or its direct response.
    let answered = match (&redirect, &direct_response) {
        (Some(_), _) => Some("redirect"),
        (None, Some(_)) => Some("directResponse"),
        (None, None) => None,
    };
    let dests: &[Value] = match (m.get("route"), answered) {
        (None | Some(Value::Null), Some(_)) => &[],
        (Some(Value::Array(a)), Some(k)) if !a.is_empty() => {
            // Istio's rule.
            d.err(
                format!("{field}.{k}"),
                format!("a route cannot have both route and {k}"),
            );
            return None;
        }
        (Some(Value::Array(a)), _) => a,
        (None | Some(Value::Null), None) => {
            d.err(
                format!("{field}.route"),
                "missing: a route needs destinations, a redirect or a directResponse",
            );
            return None;
        }
        (Some(_), _) => {
            d.err(format!("{field}.route"), "must be a list");
            return None;
        }
    };
    if dests.is_empty() && answered.is_none() {
        d.err(format!("{field}.route"), "at least one destination");
        return None;
    }
    let (destinations, dest_hosts) = route_destinations(d, dests, &field, true);
    let mut hosts: Vec<(HostOf, String)> = dest_hosts
        .into_iter()
        .map(|(j, h)| (HostOf::Destination(j), h))
        .collect();
    let retries = match m.get("retries") {
        None | Some(Value::Null) => None,
        Some(Value::Object(r)) => {
            let f = format!("{field}.retries");
            d.unsupported(
                &f,
                r,
                &[
                    "attempts",
                    "perTryTimeout",
                    "retryOn",
                    "retryRemoteLocalities",
                    "retryIgnorePreviousHosts",
                    "backoff",
                ],
            );
            // meshfed always tries a site not tried yet first (Istio's default).
            if r.get("retryIgnorePreviousHosts") == Some(&Value::Bool(false)) {
                d.warn(
                    format!("{f}.retryIgnorePreviousHosts"),
                    "false: meshfed always retries at a site not tried yet when there is one",
                );
            }
            // Istio takes any int32 from 0; meshfed retries at most 10 times (the retry
            // budget bounds the load besides).
            let attempts = match r.get("attempts") {
                None => 2,
                Some(Value::Number(n)) if n.as_u64().is_some_and(|a| a <= 10) => {
                    n.as_u64().unwrap_or(0) as u32
                }
                Some(Value::Number(n)) if n.as_u64().is_some_and(|a| a <= i32::MAX as u64) => {
                    d.warn(
                        format!("{f}.attempts"),
                        format!("{n}: meshfed retries at most 10 times; 10 applies"),
                    );
                    10
                }
                Some(other) => {
                    d.err(
                        format!("{f}.attempts"),
                        format!("{other}: an integer from 0 to {}", i32::MAX),
                    );
                    2
                }
            };
            let retry_on =
                match r.get("retryOn") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(on)) if !on.is_empty() => Some(std::sync::Arc::new(
                        retry_on(d, on, &format!("{f}.retryOn")),
                    )),
                    Some(Value::String(_)) => None,
                    Some(_) => {
                        d.err(format!("{f}.retryOn"), "must be a string");
                        None
                    }
                };
            // Istio: attempts 0 turns retries off, and then nothing else may be set.
            if attempts == 0
                && ["perTryTimeout", "retryOn", "retryRemoteLocalities"]
                    .iter()
                    .any(|k| r.get(*k).is_some_and(|v| !v.is_null() && v != ""))
            {
                d.err(
                    f.clone(),
                    "http retry policy configured when attempts are set to 0 (disabled)",
                );
            }
            Some(Retries {
                attempts,
                per_try_timeout_ms: duration(
                    d,
                    r.get("perTryTimeout"),
                    &format!("{f}.perTryTimeout"),
                ),
                retry_on,
                backoff_ms: backoff(d, r.get("backoff"), &format!("{f}.backoff")),
            })
        }
        Some(_) => {
            d.err(format!("{field}.retries"), "must be a map");
            None
        }
    };
    let fault = m
        .get("fault")
        .and_then(|f| fault(d, f, &format!("{field}.fault")));
    let mut mirrors = mirrors(d, m, &field, &mut hosts);
    // Istio accepts retries and mirrors beside an answer made at the proxy; they never
    // apply there.
    let mut retries = retries;
    if let Some(k) = answered {
        for (set, what) in [
            (retries.is_some(), "retries"),
            (
                !mirrors.is_empty(),
                if m.contains_key("mirrors") {
                    "mirrors"
                } else {
                    "mirror"
                },
            ),
        ] {
            if set {
                d.warn(
                    format!("{field}.{what}"),
                    format!("ignored: the route is answered by its {k}"),
                );
            }
        }
        retries = None;
        mirrors.clear();
    }
    let headers = m
        .get("headers")
        .and_then(|v| header_rules(d, v, &format!("{field}.headers")));
    let rewrite = m
        .get("rewrite")
        .and_then(|v| rewrite(d, v, &format!("{field}.rewrite")));
    Some((
        HttpRoute {
            headers,
            rewrite,
            redirect,
            direct_response,
            rate_limit: None,
            fault,
            mirrors,
            name: m.get("name").and_then(Value::as_str).map(str::to_owned),
            matches,
            destinations,
            timeout_ms: duration(d, m.get("timeout"), &format!("{field}.timeout")),
            retries,
            cors: m
                .get("corsPolicy")
                .and_then(|v| cors_policy(d, v, &format!("{field}.corsPolicy")))
                .map(Box::new),
        },
        hosts,
    ))
}

/// A route's `corsPolicy`, as Istio's `validateCORSPolicy` checks it: each of
/// `allowOrigins` a non-empty string match (regexes compile), `allowOrigin` (deprecated)
/// as exact matches, `allowMethods` among the methods Istio supports, header names that
/// are names, `maxAge` a duration in whole seconds; `allowCredentials`, and
/// `unmatchedPreflights` (FORWARD, the default, or IGNORE).
fn cors_policy(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<meshfed_catalog::cors::Cors> {
    use meshfed_catalog::cors::{Cors, MAX_CORS_LIST, MAX_CORS_ORIGINS};
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        field,
        m,
        &[
            "allowOrigins",
            "allowOrigin",
            "allowMethods",
            "allowHeaders",
            "exposeHeaders",
            "maxAge",
            "allowCredentials",
            "unmatchedPreflights",
        ],
    );
    let mut c = Cors::default();
    let list = |d: &mut Doc<'_>, k: &str, max: usize| {
        crate::gateway_api::list(d, m.get(k), &format!("{field}.{k}"), max)
    };
    for (i, o) in list(d, "allowOrigins", MAX_CORS_ORIGINS).iter().enumerate() {
        let f = format!("{field}.allowOrigins[{i}]");
        match string_match(d, o, &f, MatchKind::Origin) {
            Some(StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Regex(s))
                if s.is_empty() =>
            {
                d.err(f, "'' is not a valid match type for CORS allow origins");
            }
            Some(sm) => c.allow_origins.push(sm),
            None => {}
        }
    }
    for (i, o) in list(d, "allowOrigin", MAX_CORS_ORIGINS).iter().enumerate() {
        match o.as_str() {
            Some(s) if !s.is_empty() => c.allow_origins.push(StringMatch::Exact(s.to_owned())),
            _ => d.err(format!("{field}.allowOrigin[{i}]"), "must be an origin"),
        }
    }
    if c.allow_origins.len() > MAX_CORS_ORIGINS {
        d.err(
            format!("{field}.allowOrigins"),
            format!("at most {MAX_CORS_ORIGINS} origins with allowOrigin"),
        );
    }
    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "CONNECT",
    ];
    for (i, x) in list(d, "allowMethods", MAX_CORS_LIST).iter().enumerate() {
        match x.as_str() {
            Some(s) if METHODS.contains(&s) => c.allow_methods.push(s.to_owned()),
            _ => d.err(
                format!("{field}.allowMethods[{i}]"),
                format!("{x} is not a supported HTTP method"),
            ),
        }
    }
    for (k, out) in [
        ("allowHeaders", &mut c.allow_headers),
        ("exposeHeaders", &mut c.expose_headers),
    ] {
        for (i, x) in list(d, k, MAX_CORS_LIST).iter().enumerate() {
            match x.as_str() {
                Some(s) if meshfed_catalog::cors::token(s) => out.push(s.to_owned()),
                _ => d.err(
                    format!("{field}.{k}[{i}]"),
                    format!("{x} is not a header name"),
                ),
            }
        }
    }
    if let Some(ms) = duration(d, m.get("maxAge"), &format!("{field}.maxAge")) {
        if ms % 1000 != 0 {
            d.err(
                format!("{field}.maxAge"),
                "max_age duration is accurate only to seconds precision",
            );
        }
        c.max_age_s = Some(ms / 1000);
    }
    match m.get("allowCredentials") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => c.allow_credentials = *b,
        Some(_) => d.err(format!("{field}.allowCredentials"), "must be true or false"),
    }
    match m.get("unmatchedPreflights") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "UNSPECIFIED" || s == "FORWARD" => {}
        Some(Value::String(s)) if s == "IGNORE" => c.ignore_unmatched_preflights = true,
        Some(_) => d.err(
            format!("{field}.unmatchedPreflights"),
            "one of UNSPECIFIED, FORWARD, IGNORE",
        ),
    }
    Some(c)
}

/// `directResponse`: `status` (required; 200 to 599, checked with the policy) and an
/// optional `body`, `string` or `bytes` (base64), not both.
fn direct_response(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<DirectResponse> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map with status and body");
        return None;
    };
    d.unsupported(field, m, &["status", "body"]);
    let status = match m.get("status") {
        None | Some(Value::Null) => {
            d.err(format!("{field}.status"), "missing");
            return None;
        }
        Some(s) => match s.as_u64().and_then(|s| u16::try_from(s).ok()) {
            Some(s) => s,
            None => {
                d.err(
                    format!("{field}.status"),
                    format!("{s}: must be in the range 200-599"),
                );
                return None;
            }
        },
    };
    let f = format!("{field}.body");
    let body = match m.get("body") {
        None | Some(Value::Null) => None,
        Some(Value::Object(b)) => {
            d.unsupported(&f, b, &["string", "bytes"]);
            match (b.get("string"), b.get("bytes")) {
                (Some(_), Some(_)) => {
                    d.err(&f, "one of string or bytes, not both");
                    return None;
                }
                (Some(Value::String(s)), None) => Some(DirectBody::String(s.clone())),
                (None, Some(Value::String(s))) => Some(DirectBody::Bytes(s.clone())),
                (None, None) => None,
                (Some(_), None) => {
                    d.err(format!("{f}.string"), "must be a string");
                    return None;
                }
                (None, Some(_)) => {
                    d.err(format!("{f}.bytes"), "must be base64 text");
                    return None;
                }
            }
        }
        Some(_) => {
            d.err(&f, "must be a map with string or bytes");
            return None;
        }
    };
    Some(DirectResponse { status, body })
}

/// `headers.request` / `headers.response`: `set`, `add` (maps) and `remove` (a list).
/// Names are lower-cased (HTTP/2 sends them so).
fn header_rules(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<HeaderRules> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map with request and response");
        return None;
    };
    d.unsupported(field, m, &["request", "response"]);
    let mut ops = |side: &str| -> HeaderOps {
        let f = format!("{field}.{side}");
        let Some(v) = m.get(side) else {
            return HeaderOps::default();
        };
        let Value::Object(o) = v else {
            d.err(&f, "must be a map with set, add and remove");
            return HeaderOps::default();
        };
        d.unsupported(&f, o, &["set", "add", "remove"]);
        let mut map = |k: &str| -> std::collections::BTreeMap<String, String> {
            d.string_map(o.get(k), &format!("{f}.{k}"))
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect()
        };
        let (set, add) = (map("set"), map("add"));
        let remove = d
            .str_list(o.get("remove"), &format!("{f}.remove"))
            .into_iter()
            .map(|k| k.to_ascii_lowercase())
            .collect();
        HeaderOps { set, add, remove }
    };
    let rules = HeaderRules {
        request: ops("request"),
        response: ops("response"),
    };
    (!rules.request.is_empty() || !rules.response.is_empty()).then_some(rules)
}

fn rewrite(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<Rewrite> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(field, m, &["uri", "authority", "uriRegexRewrite"]);
    let get = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let f = format!("{field}.uriRegexRewrite");
    let uri_regex = match m.get("uriRegexRewrite") {
        None | Some(Value::Null) => None,
        Some(Value::Object(x)) => {
            d.unsupported(&f, x, &["match", "rewrite"]);
            let s = |k: &str| x.get(k).and_then(Value::as_str).unwrap_or_default();
            if s("match").is_empty() || s("rewrite").is_empty() {
                // Istio's validateURIRegexRewrite.
                d.err(
                    &f,
                    "UriRegexRewrite requires both Rewrite and Match fields to be specified",
                );
                return None;
            }
            Some(RegexRewrite {
                pattern: s("match").to_owned(),
                substitution: s("rewrite").to_owned(),
            })
        }
        Some(_) => {
            d.err(&f, "must be a map with match and rewrite");
            return None;
        }
    };
    let rw = Rewrite {
        uri: get("uri"),
        authority: get("authority"),
        uri_regex,
    };
    (rw.uri.is_some() || rw.authority.is_some() || rw.uri_regex.is_some()).then_some(rw)
}

fn redirect(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<Redirect> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        field,
        m,
        &["uri", "authority", "port", "scheme", "redirectCode"],
    );
    let get = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let port = match m.get("port") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p > 0 => Some(p),
            _ => {
                d.err(format!("{field}.port"), format!("{n} is not a port"));
                None
            }
        },
        Some(other) => {
            d.err(format!("{field}.port"), format!("{other} is not a number"));
            None
        }
    };
    let code = match m.get("redirectCode") {
        None | Some(Value::Null) => 301,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
            _ => {
                d.err(
                    format!("{field}.redirectCode"),
                    format!("{n}: 301, 302, 303, 307 or 308"),
                );
                301
            }
        },
        Some(other) => {
            d.err(
                format!("{field}.redirectCode"),
                format!("{other} is not a number"),
            );
            301
        }
    };
    Some(Redirect {
        uri: get("uri"),
        authority: get("authority"),
        scheme: get("scheme"),
        port,
        code,
    })
}

/// The annotations that rate-limit a VirtualService's routes at every importing gateway
/// (Istio has no field for it; Envoy's local rate limit filter is configured beside):
pub const RATE_LIMIT_PREFIX: &str = "ratelimit.meshfed.io/";

/// `100/s`, `600/m`, `5/h`, or `N/<duration>` (`10/500ms`): requests per interval.
fn rate(s: &str) -> Option<(u32, u64)> {
    let (n, per) = s.trim().split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
    let per_ms = match per.trim() {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => duration_ms(other)?,
    };
    Some((n, per_ms))
}

/// Applies `ratelimit.meshfed.io/rate` (each route its own bucket), `.../burst` (default:
/// the rate's count) and `.../route.<name>` (one named route's rate, over `rate`).
pub(crate) fn rate_limits(
    d: &mut Doc<'_>,
    ann: &std::collections::BTreeMap<String, String>,
    routes: &mut [HttpRoute],
) {
    let field = |k: &str| format!("metadata.annotations.{RATE_LIMIT_PREFIX}{k}");
    let parse = |d: &mut Doc<'_>, k: &str, v: &str| {
        let r = rate(v);
        if r.is_none() {
            d.err(
                field(k),
                format!("{v:?} is not a rate like 100/s, 600/m, 5/h or 10/500ms"),
            );
        }
        r
    };
    let mut all = None;
    let mut burst = None;
    let mut named = Vec::new();
    for (k, v) in ann {
        let Some(key) = k.strip_prefix(RATE_LIMIT_PREFIX) else {
            continue;
        };
        match key {
            "rate" => all = parse(d, key, v),
            "burst" => match v.trim().parse::<u32>() {
                Ok(b) if b > 0 => burst = Some(b),
                _ => d.err(field(key), format!("{v:?} is not a count above 0")),
            },
            _ => match key.strip_prefix("route.") {
                Some(name) if !name.is_empty() => {
                    if !routes.iter().any(|r| r.name.as_deref() == Some(name)) {
                        d.err(
                            field(key),
                            format!("no route of spec.http is named {name:?}"),
                        );
                    } else if let Some(r) = parse(d, key, v) {
                        named.push((name.to_owned(), r));
                    }
                }
                _ => d.err(
                    field(key),
                    "unknown rate limit setting: rate, burst or route.<http[].name>",
                ),
            },
        }
    }
    if burst.is_some() && all.is_none() && named.is_empty() {
        d.err(field("burst"), "a burst needs a rate");
    }
    for r in routes.iter_mut() {
        let own = named
            .iter()
            .find(|(n, _)| r.name.as_deref() == Some(n.as_str()))
            .map(|(_, rate)| *rate);
        if let Some((requests, per_ms)) = own.or(all) {
            r.rate_limit = Some(RateLimit {
                requests,
                per_ms,
                burst: burst.unwrap_or(requests),
            });
        }
    }
}

/// A VirtualService's `spec`.
/// Istio's `PortSelector` at `field`: `{number: 1..65535}`, or none.
fn port_selector(d: &mut Doc<'_>, v: Option<&Value>, field: &str) -> Option<u16> {
    match v {
        None | Some(Value::Null) => None,
        Some(Value::Object(pm)) => {
            d.unsupported(field, pm, &["number"]);
            match pm.get("number").and_then(Value::as_u64) {
                Some(n @ 1..=65535) => Some(n as u16),
                _ => {
                    d.err(format!("{field}.number"), "a port from 1 to 65535");
                    None
                }
            }
        }
        Some(_) => {
            d.err(field, "must be a map with number");
            None
        }
    }
}

pub(crate) fn virtual_service(
    d: &mut Doc<'_>,
    index: usize,
    name: &str,
    namespace: &str,
    spec: &serde_json::Map<String, Value>,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Option<RawVirtualService> {
    d.unsupported(
        "spec",
        spec,
        &["hosts", "gateways", "http", "tcp", "tls", "exportTo"],
    );
    let gateways = d.str_list(spec.get("gateways"), "spec.gateways");
    if gateways.iter().any(|g| g != "mesh") {
        d.warn(
            "spec.gateways",
            "meshfed applies the routes at its egress gateways (as for `mesh`); Istio gateways are ignored",
        );
    }
    let export_to = export_to(d, spec.get("exportTo"), namespace);
    let hosts = d.str_list(spec.get("hosts"), "spec.hosts");
    if hosts.is_empty() {
        d.err("spec.hosts", "at least one host is required");
    }
    let list = |d: &mut Doc<'_>, k: &str| match spec.get(k) {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(a.clone()),
        Some(_) => {
            d.err(format!("spec.{k}"), "must be a list");
            None
        }
    };
    let (http, tcp, tls) = (list(d, "http"), list(d, "tcp"), list(d, "tls"));
    let mut routes = Vec::new();
    let mut destination_hosts = Vec::new();
    match (&http, tcp.as_ref().or(tls.as_ref())) {
        (Some(http), _) => {
            for (i, r) in http.iter().enumerate() {
                if let Some((route, hosts)) = route(d, r, i) {
                    destination_hosts.extend(hosts.into_iter().map(|(what, h)| (i, what, h)));
                    routes.push(route);
                }
            }
        }
        // TCP or TLS routes only: HTTP ports keep the service itself (Istio's default
        // route).
        (None, Some(_)) => routes.push(HttpRoute {
            destinations: vec![Destination::all()],
            ..Default::default()
        }),
        (None, None) => {
            d.err(
                "spec.http",
                "missing: meshfed reads HTTP, TCP and TLS routes",
            );
            return None;
        }
    }
    let mut tls_routes = Vec::new();
    for (i, r) in tls.iter().flatten().enumerate() {
        if let Some((route, hosts)) = tls_route(d, r, i, &hosts) {
            destination_hosts.extend(hosts.into_iter().map(|(j, h)| (i, HostOf::Tls(j), h)));
            tls_routes.push(route);
        }
    }
    let mut tcp_routes = Vec::new();
    for (i, r) in tcp.iter().flatten().enumerate() {
        if let Some((route, hosts)) = tcp_route(d, r, i) {
            destination_hosts.extend(hosts.into_iter().map(|(j, h)| (i, HostOf::Tcp(j), h)));
            tcp_routes.push(route);
        }
    }
    rate_limits(d, annotations, &mut routes);
    Some(RawVirtualService {
        index,
        name: name.into(),
        namespace: namespace.into(),
        hosts,
        routes,
        tcp_routes,
        tls_routes,
        destination_hosts,
        export_to,
    })
}

/// One TLS route (`spec.tls[i]`) as Istio's `validateTLSRoute` checks it: at least one
/// match, each with `sniHosts` that are domain names or wildcards within the
/// VirtualService's `hosts` (`validateSniHost`; an IP address is warned about), and a
/// route; its destinations' hosts by index.
fn tls_route(
    d: &mut Doc<'_>,
    v: &Value,
    i: usize,
    vs_hosts: &[String],
) -> Option<(TcpRoute, Vec<(usize, String)>)> {
    let field = format!("spec.tls[{i}]");
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(&field, m, &["match", "route"]);
    let mut matches = Vec::new();
    match m.get("match") {
        Some(Value::Array(a)) if !a.is_empty() => {
            for (j, x) in a.iter().enumerate() {
                let f = format!("{field}.match[{j}]");
                let sni_hosts = match x {
                    Value::Object(xm) => d.str_list(xm.get("sniHosts"), &format!("{f}.sniHosts")),
                    _ => vec![],
                };
                // l4_match checks the rest; sniHosts is this match's own.
                let x = match x {
                    Value::Object(xm) => {
                        let mut xm = xm.clone();
                        xm.remove("sniHosts");
                        Value::Object(xm)
                    }
                    other => other.clone(),
                };
                let Some(mut tm) = l4_match(d, &x, &f) else {
                    continue;
                };
                if sni_hosts.is_empty() {
                    d.err(
                        format!("{f}.sniHosts"),
                        "TLS match must have at least one SNI host",
                    );
                }
                for (k, h) in sni_hosts.iter().enumerate() {
                    sni_host(d, h, vs_hosts, &format!("{f}.sniHosts[{k}]"));
                }
                tm.sni_hosts = sni_hosts;
                matches.push(tm);
            }
        }
        Some(Value::Array(_)) | None | Some(Value::Null) => {
            d.err(
                format!("{field}.match"),
                "TLS route must have at least one match condition",
            );
        }
        Some(_) => d.err(format!("{field}.match"), "must be a list"),
    }
    l4_route(d, m, &field, "TLS", matches)
}

/// Istio's `validateSniHost`: a domain name or wildcard (an IP address is warned about:
/// against the SNI spec), which must be a subset of one of the VirtualService's hosts
/// (`host.Name.SubsetOf`).
fn sni_host(d: &mut Doc<'_>, h: &str, vs_hosts: &[String], field: &str) {
    if h.parse::<std::net::IpAddr>().is_ok() {
        d.warn(
            field,
            format!("using an IP address ({h:?}) goes against SNI spec and most clients do not support this"),
        );
        return;
    }
    let wild = |x: &str| x.starts_with('*');
    let subset_of = |o: &str| {
        if wild(h) {
            wild(o) && h[1..].ends_with(&o[1..])
        } else if wild(o) {
            h.ends_with(&o[1..])
        } else {
            h == o
        }
    };
    if !vs_hosts.iter().any(|o| subset_of(o)) {
        d.err(
            field,
            format!(
                "SNI host {h:?} is not a compatible subset of any of the virtual service hosts: [{}]",
                vs_hosts.join(", ")
            ),
        );
    }
}

/// One TCP route (`spec.tcp[i]`) as Istio's `validateTCPRoute` checks it, and its
/// destinations' hosts by index.
fn tcp_route(d: &mut Doc<'_>, v: &Value, i: usize) -> Option<(TcpRoute, Vec<(usize, String)>)> {
    let field = format!("spec.tcp[{i}]");
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(&field, m, &["match", "route"]);
    let mut matches = Vec::new();
    match m.get("match") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for (j, x) in a.iter().enumerate() {
                if let Some(tm) = l4_match(d, x, &format!("{field}.match[{j}]")) {
                    matches.push(tm);
                }
            }
        }
        Some(_) => d.err(format!("{field}.match"), "must be a list"),
    }
    l4_route(d, m, &field, "TCP", matches)
}

/// A TCP or TLS route (`kind`) of `matches` and its `route` (required, Istio's words),
/// with its destinations' hosts by index.
fn l4_route(
    d: &mut Doc<'_>,
    m: &serde_json::Map<String, Value>,
    field: &str,
    kind: &str,
    matches: Vec<TcpMatch>,
) -> Option<(TcpRoute, Vec<(usize, String)>)> {
    let dests = match m.get("route") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) | None | Some(Value::Null) => {
            d.err(
                format!("{field}.route"),
                format!("{kind} route is required"),
            );
            return None;
        }
        Some(_) => {
            d.err(format!("{field}.route"), "must be a list");
            return None;
        }
    };
    let (destinations, hosts) = route_destinations(d, dests, field, false);
    Some((
        TcpRoute {
            matches,
            destinations,
        },
        hosts,
    ))
}

/// A TCP route's match (Istio's `L4MatchAttributes`): `port`, `destinationSubnets`,
/// `sourceNamespace`, `sourceLabels` and `gateways`, as for an HTTP match.
fn l4_match(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<TcpMatch> {
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        field,
        m,
        &[
            "port",
            "destinationSubnets",
            "sourceNamespace",
            "sourceLabels",
            "gateways",
        ],
    );
    let destination_subnets = d.str_list(
        m.get("destinationSubnets"),
        &format!("{field}.destinationSubnets"),
    );
    for (k, n) in destination_subnets.iter().enumerate() {
        if let Err(e) = meshfed_catalog::http_route::parse_subnet(n) {
            d.err(format!("{field}.destinationSubnets[{k}]"), e);
        }
    }
    let source = source_conditions(d, m, field);
    Some(TcpMatch {
        port: source.port,
        destination_subnets,
        source_namespace: source.namespace,
        source_labels: source.labels,
        gateways: source.gateways,
        sni_hosts: vec![],
    })
}

/// A VirtualService's `exportTo`, checked as Istio's `validateExportTo` checks it (`.`,
/// `*` or a namespace, a DNS label; no entry twice, `.` counting as the namespace; `*`
/// alone; `~` only on a ServiceEntry), with `.` resolved to `namespace`. The routes
/// apply to callers of those namespaces at every importing gateway (the namespace of
/// the caller's SPIFFE ID); `*` or none: every caller.
fn export_to(d: &mut Doc<'_>, v: Option<&Value>, namespace: &str) -> Vec<String> {
    let list = d.str_list(v, "spec.exportTo");
    let mut out: Vec<String> = Vec::new();
    let mut public = false;
    for (i, e) in list.iter().enumerate() {
        let f = format!("spec.exportTo[{i}]");
        let key = if e == "." { namespace } else { e.as_str() };
        if key == "*" {
            public = true;
        } else if e == "~" {
            d.err(
                &f,
                "exportTo ~ (none) is not allowed for Istio configuration objects",
            );
            continue;
        } else if key.contains('.') || !meshfed_catalog::names::dns_subdomain(key) {
            d.err(
                &f,
                "only .,*, or a valid DNS 1123 label is allowed as exportTo entry",
            );
            continue;
        }
        if out.iter().any(|o| o == key) || (key == "*" && list[..i].iter().any(|o| o == "*")) {
            let msg = if key != e {
                format!("duplicate entries in exportTo: . and current namespace {namespace}")
            } else {
                format!("duplicate entries in exportTo for entry {e}")
            };
            d.err(&f, msg);
            continue;
        }
        if key != "*" {
            out.push(key.to_owned());
        }
    }
    if public && list.len() > 1 {
        d.err(
            "spec.exportTo",
            "cannot have both public (*) and non-public exportTo values for a resource",
        );
    }
    if public { Vec::new() } else { out }
}

/// What a DestinationRule's `connectionPool` sets.
#[derive(Default)]
pub(crate) struct Pool {
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub idle_timeout_ms: Option<u64>,
    /// `connectionPool.tcp.connectTimeout`.
    pub connect_timeout_ms: Option<u64>,
    /// `connectionPool.tcp.tcpKeepalive`.
    pub tcp_keepalive: Option<meshfed_catalog::http_route::TcpKeepalive>,
    pub connection_pool: Option<meshfed_catalog::http_route::ConnectionPool>,
}

/// `trafficPolicy.connectionPool` of a DestinationRule: `http.http2MaxRequests`, the
/// most requests in flight to the service from one importing gateway (Envoy's
/// `max_requests`; a request past it is answered 503 `overflow` at once), and
/// `tcp.maxConnections` with `http.http1MaxPendingRequests`, the exporting gateway's
/// connections to its HTTP/1.1 endpoints and the requests that may wait for one (on a
/// TCP port: its tunnelled connections at once, none waiting), and
/// `http.maxRequestsPerConnection`, the requests one connection to an endpoint carries
/// before the exporting gateway dials anew, `http.idleTimeout`, how long one may
/// carry none before it is closed, and `tcp.connectTimeout`, how long the exporting
/// gateway waits for one to open (HTTP and TCP ports alike). As in
/// Istio, 0 is unset and a negative count is refused. The other settings are warned
/// about.
pub(crate) fn connection_pool(d: &mut Doc<'_>, v: Option<&Value>, base: &str) -> Pool {
    let field = format!("{base}.connectionPool");
    let field = field.as_str();
    let Some(v) = v else {
        return Pool::default();
    };
    let Value::Object(m) = v else {
        d.err(field, "must be a map");
        return Pool::default();
    };
    d.unsupported(field, m, &["http", "tcp"]);
    let section = |d: &mut Doc<'_>, k: &str| match m.get(k) {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(o.clone()),
        Some(_) => {
            d.err(format!("{field}.{k}"), "must be a map");
            None
        }
    };
    // Istio's int32 counts: 0 is unset, a negative one is refused.
    let count = |d: &mut Doc<'_>, o: &serde_json::Map<String, Value>, path: String, k: &str| match o
        .get(k)?
    {
        Value::Number(n) if n.as_u64().is_some_and(|n| n <= i32::MAX as u64) => {
            n.as_u64().filter(|n| *n > 0).map(|n| n as u32)
        }
        other => {
            d.err(
                format!("{path}.{k}"),
                format!("{other} is not a count from 0 to {}", i32::MAX),
            );
            None
        }
    };
    let http = section(d, "http");
    let tcp = section(d, "tcp");
    let (mut max_requests, mut pending, mut conns, mut per_conn) = (None, None, None, None);
    let (mut idle, mut connect, mut keepalive) = (None, None, None);
    if let Some(h) = &http {
        let path = format!("{field}.http");
        d.unsupported(
            &path,
            h,
            &[
                "http2MaxRequests",
                "http1MaxPendingRequests",
                "maxRequestsPerConnection",
                "idleTimeout",
            ],
        );
        max_requests = count(d, h, path.clone(), "http2MaxRequests");
        pending = count(d, h, path.clone(), "http1MaxPendingRequests");
        idle = duration(d, h.get("idleTimeout"), &format!("{path}.idleTimeout"));
        per_conn = count(d, h, path, "maxRequestsPerConnection");
    }
    if let Some(t) = &tcp {
        let path = format!("{field}.tcp");
        d.unsupported(
            &path,
            t,
            &["maxConnections", "connectTimeout", "tcpKeepalive"],
        );
        connect = duration(
            d,
            t.get("connectTimeout"),
            &format!("{path}.connectTimeout"),
        );
        keepalive = tcp_keepalive(d, t.get("tcpKeepalive"), &format!("{path}.tcpKeepalive"));
        conns = count(d, t, path, "maxConnections");
    }
    let pool = conns.map(
        |max_connections| meshfed_catalog::http_route::ConnectionPool {
            max_connections,
            max_pending: pending.unwrap_or(meshfed_catalog::http_route::DEFAULT_MAX_PENDING),
        },
    );
    Pool {
        max_requests,
        max_requests_per_connection: per_conn,
        idle_timeout_ms: idle,
        connect_timeout_ms: connect,
        tcp_keepalive: keepalive,
        connection_pool: pool,
    }
}

/// `connectionPool.tcp.tcpKeepalive`: `probes` (0: the kernel's), `time` and
/// `interval` (durations; unset: the kernel's). Past the kernel's bounds (32,767 s,
/// 127 probes) a value is accepted as Istio accepts it, warned about, and the bound
/// applies.
fn tcp_keepalive(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    field: &str,
) -> Option<meshfed_catalog::http_route::TcpKeepalive> {
    use meshfed_catalog::http_route::{MAX_KEEPALIVE_MS, MAX_KEEPALIVE_PROBES, TcpKeepalive};
    let m = d.opt_map(v, field)?;
    d.unsupported(field, m, &["probes", "time", "interval"]);
    let bounded = |d: &mut Doc<'_>, k: &str| {
        let ms = duration(d, m.get(k), &format!("{field}.{k}"))?;
        if ms > MAX_KEEPALIVE_MS {
            d.warn(
                format!("{field}.{k}"),
                format!(
                    "the kernel takes at most {} s; that applies",
                    MAX_KEEPALIVE_MS / 1000
                ),
            );
        }
        Some(ms.min(MAX_KEEPALIVE_MS))
    };
    let time_ms = bounded(d, "time");
    let interval_ms = bounded(d, "interval");
    let probes = match m.get("probes") {
        None | Some(Value::Null) => None,
        Some(v) => match u32_count(d, v, &format!("{field}.probes"))? {
            0 => None,
            n if n > MAX_KEEPALIVE_PROBES => {
                d.warn(
                    format!("{field}.probes"),
                    format!("the kernel takes at most {MAX_KEEPALIVE_PROBES}; that applies"),
                );
                Some(MAX_KEEPALIVE_PROBES)
            }
            n => Some(n),
        },
    };
    Some(TcpKeepalive {
        probes,
        time_ms,
        interval_ms,
    })
}

/// `trafficPolicy.retryBudget` of a DestinationRule (Istio 1.27): `percent` (0 to 100,
/// default 20) and `minRetryConcurrency` (default 3), Envoy's retry budget, applied at
/// each importing gateway to the destination's retries.
/// A `uint32` count at `field` (an error by path when it is anything else).
fn u32_count(d: &mut Doc<'_>, v: &Value, field: &str) -> Option<u32> {
    let n = v.as_u64().and_then(|n| u32::try_from(n).ok());
    if n.is_none() {
        d.err(field, format!("{v} is not a count from 0 to {}", u32::MAX));
    }
    n
}

pub(crate) fn retry_budget(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    base: &str,
) -> Option<meshfed_catalog::http_route::RetryBudget> {
    let field = format!("{base}.retryBudget");
    let m = d.opt_map(v, &field)?;
    d.unsupported(&field, m, &["percent", "minRetryConcurrency"]);
    let per_million = match m.get("percent") {
        None | Some(Value::Null) => 200_000,
        // A double, as Istio's `Percent`; a map `{value: P}` as its wrapper is written.
        Some(v) => match v
            .as_f64()
            .or_else(|| v.get("value").and_then(Value::as_f64))
        {
            Some(p) if (0.0..=100.0).contains(&p) => (p * 10_000.0).round() as u32,
            _ => {
                d.err(
                    format!("{field}.percent"),
                    format!("{v}: must be in range [0.0, 100.0]"),
                );
                return None;
            }
        },
    };
    let min_retry_concurrency = match m.get("minRetryConcurrency") {
        None | Some(Value::Null) => 3,
        Some(v) => u32_count(d, v, &format!("{field}.minRetryConcurrency"))?,
    };
    Some(meshfed_catalog::http_route::RetryBudget {
        per_million,
        min_retry_concurrency,
    })
}

/// `trafficPolicy.loadBalancer` of a DestinationRule: `simple` (ROUND_ROBIN,
/// LEAST_REQUEST, RANDOM; UNSPECIFIED and LEAST_CONN, its deprecated name for
/// LEAST_REQUEST, too), applied across the destination's sites (`localityLbSetting` is
/// [`locality_lb`]'s, `consistentHash` [`consistent_hash`]'s); PASSTHROUGH is warned
/// about (meshfed always picks a site) and the default applies.
pub(crate) fn load_balancer(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    base: &str,
) -> Option<LoadBalancer> {
    let field = format!("{base}.loadBalancer");
    let field = field.as_str();
    let Value::Object(m) = v? else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        field,
        m,
        &[
            "simple",
            "consistentHash",
            "localityLbSetting",
            "warmupDurationSecs",
            "warmup",
        ],
    );
    for k in ["warmupDurationSecs", "warmup"] {
        if m.contains_key(k) {
            d.warn(
                format!("{field}.{k}"),
                "not supported by meshfed yet; ignored",
            );
        }
    }
    if m.contains_key("consistentHash") && m.get("simple").is_some_and(|v| !v.is_null()) {
        // One field of Istio's `lb_policy` oneof.
        d.err(
            field,
            "simple and consistentHash are one choice: set only one of them",
        );
        return None;
    }
    match m.get("simple")? {
        Value::String(s) => match s.as_str() {
            "ROUND_ROBIN" => Some(LoadBalancer::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" => Some(LoadBalancer::LeastRequest),
            "RANDOM" => Some(LoadBalancer::Random),
            "UNSPECIFIED" => None,
            "PASSTHROUGH" => {
                d.warn(
                    format!("{field}.simple"),
                    "PASSTHROUGH: meshfed always picks a site; the default balancing applies",
                );
                None
            }
            other => {
                d.err(
                    format!("{field}.simple"),
                    format!("{other:?}: one of UNSPECIFIED, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN"),
                );
                None
            }
        },
        other => {
            d.err(
                format!("{field}.simple"),
                format!("{other} is not a string"),
            );
            None
        }
    }
}

/// `trafficPolicy.loadBalancer.consistentHash` of a DestinationRule: exactly one of
/// `httpHeaderName`, `httpCookie` (`name`, `path`, `ttl`), `useSourceIp` and
/// `httpQueryParameterName`, as Istio's validation demands; `ringHash`, `maglev` and
/// `minimumRingSize` name Envoy's hashing algorithm and are warned about (meshfed
/// hashes by rendezvous, [`meshfed_catalog::affinity`]).
pub(crate) fn consistent_hash(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    base: &str,
) -> Option<meshfed_catalog::affinity::HashKey> {
    use meshfed_catalog::affinity::HashKey;
    let field = format!("{base}.loadBalancer.consistentHash");
    let field = field.as_str();
    let Value::Object(m) = v? else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        field,
        m,
        &[
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "ringHash",
            "maglev",
            "minimumRingSize",
        ],
    );
    for k in ["ringHash", "maglev", "minimumRingSize"] {
        if m.contains_key(k) {
            d.warn(
                format!("{field}.{k}"),
                "meshfed hashes by rendezvous (a departing site or endpoint moves only its own keys); ignored",
            );
        }
    }
    let text = |d: &mut Doc<'_>, k: &str| match m.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => {
            d.err(format!("{field}.{k}"), "must be a non-empty string");
            None
        }
        None => None,
    };
    let mut keys = Vec::new();
    if let Some(h) = text(d, "httpHeaderName") {
        keys.push(("httpHeaderName", HashKey::Header(h.to_ascii_lowercase())));
    }
    if let Some(q) = text(d, "httpQueryParameterName") {
        keys.push(("httpQueryParameterName", HashKey::QueryParameter(q)));
    }
    match m.get("useSourceIp") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => keys.push(("useSourceIp", HashKey::SourceIp)),
        Some(other) => d.err(
            format!("{field}.useSourceIp"),
            format!("{other} is not a bool"),
        ),
    }
    match m.get("httpCookie") {
        None | Some(Value::Null) => {}
        Some(Value::Object(c)) => {
            let f = format!("{field}.httpCookie");
            d.unsupported(&f, c, &["name", "path", "ttl", "attributes"]);
            if c.contains_key("attributes") {
                d.warn(
                    format!("{f}.attributes"),
                    "not supported by meshfed; ignored",
                );
            }
            let name = match c.get("name") {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                _ => {
                    d.err(format!("{f}.name"), "required: the cookie's name");
                    None
                }
            };
            let path = c.get("path").and_then(Value::as_str).map(str::to_owned);
            // 0 is a session cookie (no Max-Age), which the duration parser refuses.
            let zero = |s: &str| {
                s.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                    .parse::<f64>()
                    .is_ok_and(|n| n == 0.0)
            };
            let ttl_ms = match c.get("ttl") {
                Some(Value::String(s)) if zero(s) => Some(0),
                other => duration(d, other, &format!("{f}.ttl")),
            };
            if let Some(name) = name {
                keys.push(("httpCookie", HashKey::Cookie { name, path, ttl_ms }));
            }
        }
        Some(_) => d.err(format!("{field}.httpCookie"), "must be a map"),
    }
    match keys.len() {
        0 => {
            d.err(
                field,
                "one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required",
            );
            None
        }
        1 => {
            let (k, key) = keys.pop()?;
            match key.check() {
                Ok(()) => Some(key),
                Err(e) => {
                    d.err(format!("{field}.{k}"), e);
                    None
                }
            }
        }
        _ => {
            let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
            d.err(
                field,
                format!("only one hash key may be set, not {}", names.join(" and ")),
            );
            None
        }
    }
}

/// `trafficPolicy.loadBalancer.localityLbSetting` of a DestinationRule, applied across
/// the destination's sites by their localities: `enabled`, `distribute` and `failover`,
/// checked as Istio's validation checks them (and, as Istio does, a warning when failover
/// comes without `outlierDetection`; meshfed fails over on readiness and errors either
/// way). `failoverPriority` orders the sites by labels instead of by locality: each
/// site's export labels, its name as `topology.istio.io/cluster` and its locality as
/// the region, zone and subzone labels, against the calling gateway's own.
pub(crate) fn locality_lb(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    has_outlier: bool,
    base: &str,
) -> Option<meshfed_catalog::locality::LocalityLb> {
    use meshfed_catalog::locality::{Distribute, Failover, LocalityLb};
    let field = format!("{base}.loadBalancer.localityLbSetting");
    let field = field.as_str();
    let Value::Object(m) = v? else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        field,
        m,
        &["enabled", "distribute", "failover", "failoverPriority"],
    );
    let mut lb = LocalityLb::default();
    match m.get("enabled") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => lb.disabled = true,
        Some(other) => d.err(format!("{field}.enabled"), format!("{other} is not a bool")),
    }
    let list = |d: &mut Doc<'_>, k: &str| -> Vec<serde_json::Map<String, Value>> {
        match m.get(k) {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .filter_map(|(i, e)| match e {
                    Value::Object(o) => Some(o.clone()),
                    _ => {
                        d.err(format!("{field}.{k}[{i}]"), "must be a map");
                        None
                    }
                })
                .collect(),
            Some(_) => {
                d.err(format!("{field}.{k}"), "must be a list");
                vec![]
            }
        }
    };
    // A rule's `from` or `to` locality (missing: empty, which `check` refuses).
    let text =
        |d: &mut Doc<'_>, o: &serde_json::Map<String, Value>, rule: &str, k: &str| match o.get(k) {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => String::new(),
            Some(other) => {
                d.err(format!("{rule}.{k}"), format!("{other} is not a string"));
                String::new()
            }
        };
    for (i, o) in list(d, "distribute").into_iter().enumerate() {
        let f = format!("{field}.distribute[{i}]");
        d.unsupported(&f, &o, &["from", "to"]);
        let from = text(d, &o, &f, "from");
        let mut to = std::collections::BTreeMap::new();
        match o.get("to") {
            None | Some(Value::Null) => {}
            Some(Value::Object(t)) => {
                for (loc, w) in t {
                    match w.as_u64().and_then(|w| u32::try_from(w).ok()) {
                        Some(w) => {
                            to.insert(loc.clone(), w);
                        }
                        None => d.err(format!("{f}.to.{loc}"), format!("{w} is not a weight")),
                    }
                }
            }
            Some(_) => d.err(format!("{f}.to"), "must be a map"),
        }
        lb.distribute.push(Distribute { from, to });
    }
    for (i, o) in list(d, "failover").into_iter().enumerate() {
        let f = format!("{field}.failover[{i}]");
        d.unsupported(&f, &o, &["from", "to"]);
        let (from, to) = (text(d, &o, &f, "from"), text(d, &o, &f, "to"));
        lb.failover.push(Failover { from, to });
    }
    lb.failover_priority = d.str_list(
        m.get("failoverPriority"),
        &format!("{field}.failoverPriority"),
    );
    if (!lb.failover.is_empty() || m.contains_key("failoverPriority")) && !has_outlier {
        d.warn(
            field,
            "outlier detection policy must be provided for failover (Istio applies none without it; meshfed fails over on readiness and errors)",
        );
    }
    if let Err(e) = lb.check() {
        let path = if e.field.is_empty() {
            field.to_owned()
        } else {
            format!(
                "{field}.{}",
                e.field.replace("failover_priority", "failoverPriority")
            )
        };
        d.err(path, e.message);
        return None;
    }
    Some(lb)
}

/// `trafficPolicy.portLevelSettings` of a DestinationRule: per `port.number`, its own
/// `connectionPool`, `outlierDetection` and `loadBalancer`, in place of the
/// destination-level ones for requests to that port, a block the port omits taking its
/// defaults (Istio's rule: not inherited). Istio's validation:
/// a port and at least one setting; a port's `tls` is warned about (meshfed's TLS
/// origination is the destination's), and a port named twice keeps its first entry, as
/// Istio's lookup does, with a warning.
pub(crate) fn port_settings(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    base: &str,
) -> Vec<meshfed_catalog::http_route::PortSettings> {
    use meshfed_catalog::http_route::PortSettings;
    let field = &format!("{base}.portLevelSettings");
    let list = match v {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            d.err(field, "must be a list");
            return Vec::new();
        }
    };
    if list.len() > meshfed_catalog::http_route::MAX_PORT_SETTINGS {
        d.err(
            field,
            format!(
                "at most {} ports",
                meshfed_catalog::http_route::MAX_PORT_SETTINGS
            ),
        );
        return Vec::new();
    }
    let mut out: Vec<PortSettings> = Vec::new();
    for (i, x) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Value::Object(m) = x else {
            // Istio's words.
            d.err(f, "traffic policy may not be null");
            continue;
        };
        d.unsupported(
            &f,
            m,
            &[
                "port",
                "connectionPool",
                "outlierDetection",
                "loadBalancer",
                "tls",
            ],
        );
        if m.contains_key("tls") {
            d.warn(
                format!("{f}.tls"),
                "meshfed originates TLS with the destination's trafficPolicy.tls, not per port; ignored",
            );
        }
        let Some(port) = port_selector(d, m.get("port"), &format!("{f}.port")) else {
            if m.get("port").is_none_or(Value::is_null) {
                d.err(
                    format!("{f}.port"),
                    "portTrafficPolicy must have valid port",
                );
            }
            continue;
        };
        let set = |k: &str| m.get(k).is_some_and(|v| !v.is_null());
        if !["connectionPool", "outlierDetection", "loadBalancer", "tls"]
            .iter()
            .any(|k| set(k))
        {
            d.err(&f, "port traffic policy must have at least one field");
            continue;
        }
        let b = blocks(d, m, &f);
        if out.iter().any(|o| o.port == port) {
            d.warn(
                format!("{f}.port"),
                format!("port {port} twice: its first entry applies"),
            );
            continue;
        }
        out.push(PortSettings {
            port,
            pool: b.pool,
            outlier: b.outlier,
            balancer: b.balancer,
        });
    }
    out
}

/// The blocks a `trafficPolicy` (or a port's, or a subset's) sets, at `f`: each one
/// absent is `None`.
fn blocks(
    d: &mut Doc<'_>,
    m: &serde_json::Map<String, Value>,
    f: &str,
) -> meshfed_catalog::http_route::SubsetPolicy {
    use meshfed_catalog::http_route::{PortBalancer, PortPool, SubsetPolicy};
    let set = |k: &str| m.get(k).is_some_and(|v| !v.is_null());
    let t = crate::service_entry::Traffic::read(d, m, f);
    SubsetPolicy {
        pool: set("connectionPool").then_some(PortPool {
            max_requests: t.max_requests,
            max_requests_per_connection: t.max_requests_per_connection,
            idle_timeout_ms: t.idle_timeout_ms,
            connect_timeout_ms: t.connect_timeout_ms,
            tcp_keepalive: t.tcp_keepalive,
            connection_pool: t.connection_pool,
        }),
        outlier: if set("outlierDetection") {
            t.outlier
        } else {
            None
        },
        balancer: set("loadBalancer").then_some(PortBalancer {
            load_balancer: t.load_balancer,
            consistent_hash: t.consistent_hash,
            locality_lb: t.locality_lb,
        }),
        port_settings: Vec::new(),
    }
}

/// A subset's `trafficPolicy` at `f`: its `connectionPool`, `outlierDetection`,
/// `loadBalancer` and `portLevelSettings`, read as the destination's are, applied to
/// the subset's requests by both gateways (the importing one's breaker, site ejection
/// and balancer; the exporting one's endpoint pool, connection limits and endpoint
/// ejection; a `localityLbSetting` in its `loadBalancer` orders the subset's sites,
/// `routing::ImportPlan::subset_orders`). Its `tls` is warned about as a port's is, by
/// path.
fn subset_policy(
    d: &mut Doc<'_>,
    v: Option<&Value>,
    f: &str,
) -> Option<meshfed_catalog::http_route::SubsetPolicy> {
    let m = match v {
        None | Some(Value::Null) => return None,
        Some(Value::Object(m)) => m,
        Some(_) => {
            d.err(f, "must be a map");
            return None;
        }
    };
    d.unsupported(
        f,
        m,
        &[
            "connectionPool",
            "outlierDetection",
            "loadBalancer",
            "portLevelSettings",
            "tls",
            "retryBudget",
        ],
    );
    if m.get("retryBudget").is_some_and(|v| !v.is_null()) {
        // Checked as the destination's is, then left: meshfed budgets per destination.
        let _ = retry_budget(d, m.get("retryBudget"), f);
        d.warn(
            format!("{f}.retryBudget"),
            "meshfed applies the destination's retryBudget to its subsets; ignored",
        );
    }
    // Istio's validateTrafficPolicy: a policy that sets nothing is an error.
    let fields = [
        "connectionPool",
        "outlierDetection",
        "loadBalancer",
        "portLevelSettings",
        "tls",
        "tunnel",
        "proxyProtocol",
        "retryBudget",
    ];
    if !fields
        .iter()
        .any(|k| m.get(*k).is_some_and(|v| !v.is_null()))
    {
        d.err(f, "traffic policy must have at least one field");
        return None;
    }
    if m.contains_key("tls") {
        d.warn(
            format!("{f}.tls"),
            "meshfed originates TLS with the destination's trafficPolicy.tls, not per subset; ignored",
        );
    }
    let mut sp = blocks(d, m, f);
    sp.port_settings = port_settings(d, m.get("portLevelSettings"), f);
    Some(sp)
}

/// HTTP statuses Go's `http.StatusText` knows: a number in `retryOn` must be one
/// (Istio's validateHTTPRetry).
const KNOWN_STATUSES: [u16; 62] = [
    100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304,
    305, 307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415,
    416, 417, 418, 421, 422, 423, 424, 425, 426, 428, 429, 431, 451, 500, 501, 502, 503, 504, 505,
    506, 507, 508, 510, 511,
];

/// A route's `retries.retryOn` at `field`: Envoy's conditions, comma-separated as Istio
/// splits them (no spaces), and HTTP statuses (Istio adds `retriable-status-codes` for
/// them). A condition meshfed cannot apply (`retriable-headers`, `envoy-ratelimited`,
/// `http3-post-connect-failure`) is warned about; an unknown one is refused, as Istio's
/// validation refuses it.
fn retry_on(d: &mut Doc<'_>, on: &str, field: &str) -> meshfed_catalog::http_route::RetryOn {
    use meshfed_catalog::http_route::{GRPC_RETRY_ON, MAX_RETRY_CODES, RetryOn};
    let mut out = RetryOn::default();
    for (k, cond) in on.split(',').enumerate() {
        if let Ok(code) = cond.parse::<u16>() {
            if !KNOWN_STATUSES.contains(&code) {
                d.err(field, format!("{cond:?} is not a valid retryOn policy"));
            } else if out.status_codes.len() >= MAX_RETRY_CODES {
                d.err(field, format!("at most {MAX_RETRY_CODES} statuses"));
            } else if !out.status_codes.contains(&code) {
                out.status_codes.push(code);
            }
            continue;
        }
        match cond {
            "5xx" => out.five_xx = true,
            "gateway-error" => out.gateway_error = true,
            "connect-failure" => out.connect_failure = true,
            "refused-stream" => out.refused_stream = true,
            "reset" => out.reset = true,
            "retriable-4xx" => out.retriable_4xx = true,
            // The statuses listed beside it.
            "retriable-status-codes" => {}
            "retriable-headers" | "envoy-ratelimited" | "http3-post-connect-failure" => d.warn(
                field.to_owned(),
                format!("{cond:?} does not apply to meshfed's gateways; ignored"),
            ),
            other => match GRPC_RETRY_ON.iter().find(|(name, _)| *name == other) {
                Some((_, code)) => {
                    if !out.grpc_codes.contains(code) {
                        out.grpc_codes.push(*code);
                    }
                }
                None => d.err(
                    field,
                    format!("{other:?} (item {k}) is not a valid retryOn policy"),
                ),
            },
        }
    }
    out
}

/// `trafficPolicy.outlierDetection` of a DestinationRule: `consecutive5xxErrors`,
/// `consecutiveGatewayErrors`, `baseEjectionTime` (default 30 s), `maxEjectionPercent`
/// (default 10, and at least one site may be ejected), `interval` (default 10 s: how
/// long back in service takes one off a host's ejections; answers are counted as they
/// come, not at each interval).
pub(crate) fn outlier(d: &mut Doc<'_>, v: Option<&Value>, base: &str) -> Option<Outlier> {
    let field = format!("{base}.outlierDetection");
    let field = field.as_str();
    let Value::Object(m) = v? else {
        d.err(field, "must be a map");
        return None;
    };
    d.unsupported(
        field,
        m,
        &[
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveErrors",
            "baseEjectionTime",
            "maxEjectionPercent",
            "interval",
        ],
    );
    let mut count = |k: &str, default: u32| match m.get(k) {
        None => default,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= 1_000_000) => {
            n.as_u64().unwrap_or(0) as u32
        }
        Some(other) => {
            d.err(format!("{field}.{k}"), format!("{other} is not a count"));
            default
        }
    };
    // Istio: consecutive5xxErrors defaults to 5 (consecutiveErrors is its old name).
    let legacy = count("consecutiveErrors", 5);
    let consecutive_5xx = count("consecutive5xxErrors", legacy);
    let consecutive_gateway = count("consecutiveGatewayErrors", 0);
    let max_ejection_percent = count("maxEjectionPercent", 10);
    if max_ejection_percent > 100 {
        d.err(
            format!("{field}.maxEjectionPercent"),
            "a percentage from 0 to 100",
        );
    }
    let base_ejection_ms = duration(
        d,
        m.get("baseEjectionTime"),
        &format!("{field}.baseEjectionTime"),
    )
    .unwrap_or(30_000);
    let interval_ms = duration(d, m.get("interval"), &format!("{field}.interval"));
    Some(Outlier {
        consecutive_5xx,
        consecutive_gateway,
        base_ejection_ms,
        max_ejection_percent,
        interval_ms,
    })
}

/// `spec.subsets` of a DestinationRule.
pub(crate) fn subsets(d: &mut Doc<'_>, v: Option<&Value>) -> Vec<Subset> {
    let mut out: Vec<Subset> = Vec::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for (i, s) in a.iter().enumerate() {
                let f = format!("spec.subsets[{i}]");
                let Value::Object(m) = s else {
                    d.err(f, "must be a map");
                    continue;
                };
                d.unsupported(&f, m, &["name", "labels", "trafficPolicy"]);
                let name = match m.get("name").and_then(Value::as_str) {
                    // Istio's validateSubsetName.
                    Some(n) if !n.is_empty() && !meshfed_catalog::names::is_dns_label(n) => {
                        d.err(
                            format!("{f}.name"),
                            format!("subset name is invalid: {n:?} (a DNS label)"),
                        );
                        continue;
                    }
                    Some(n) if !n.is_empty() => n.to_owned(),
                    _ => {
                        d.err(format!("{f}.name"), "missing");
                        continue;
                    }
                };
                if out.iter().any(|s| s.name == name) {
                    d.err(
                        format!("{f}.name"),
                        format!("duplicate subset name {name:?}"),
                    );
                    continue;
                }
                let labels = d.string_map(m.get("labels"), &format!("{f}.labels"));
                // Istio's validateSubset: the labels are Kubernetes labels.
                if let Err((k, msg)) = meshfed_catalog::http_route::check_labels(&labels) {
                    d.err(format!("{f}.labels{k}"), msg);
                    continue;
                }
                let policy =
                    subset_policy(d, m.get("trafficPolicy"), &format!("{f}.trafficPolicy"));
                out.push(Subset {
                    name,
                    labels,
                    policy,
                });
            }
        }
        Some(_) => d.err("spec.subsets", "must be a list"),
    }
    out
}

/// Builds the policy of one service from a VirtualService's routes and the subsets the
/// file defines for it; checks what Istio's validation checks (and that subsets exist).
pub(crate) fn policy(
    d: &mut Doc<'_>,
    vs: &RawVirtualService,
    service: meshfed_catalog::ServiceName,
    (routes, tcp_routes, tls_routes): (Vec<HttpRoute>, Vec<TcpRoute>, Vec<TcpRoute>),
    subsets: Vec<Subset>,
    traffic: crate::service_entry::Traffic,
) -> Option<HttpPolicy> {
    let p = HttpPolicy {
        service,
        source: format!("VirtualService {}/{}", vs.namespace, vs.name),
        routes,
        subsets,
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
        tcp_routes,
        tls_routes,
        export_to: vs.export_to.clone(),
    };
    match p.clone().compile() {
        Ok(_) => Some(p),
        Err(e) => {
            let mut field = yaml_path(&e.field);
            // A route's singular `mirror` is the model's first mirror.
            for r in vs.singular_mirrors() {
                field = field
                    .replace(
                        &format!("spec.http[{r}].mirrors[0].percentage"),
                        &format!("spec.http[{r}].mirrorPercentage"),
                    )
                    .replace(
                        &format!("spec.http[{r}].mirrors[0].destination."),
                        &format!("spec.http[{r}].mirror."),
                    );
            }
            d.err(field, e.message);
            None
        }
    }
}

/// The model's field path as the VirtualService spells it. Pure.
pub(crate) fn yaml_path(model: &str) -> String {
    let p = model
        .replace("tcp_routes[", "spec.tcp[")
        .replace("tls_routes[", "spec.tls[")
        .replace(".sni_hosts", ".sniHosts")
        .replace("routes[", "spec.http[")
        .replace(".without_headers", ".withoutHeaders")
        .replace(".source_namespace", ".sourceNamespace")
        .replace(".source_labels", ".sourceLabels")
        .replace(".destination_subnets", ".destinationSubnets")
        .replace(".matches[", ".match[")
        .replace(".destinations[", ".route[")
        .replace(".destinations", ".route")
        .replace("].service", "].destination.host")
        .replace(".query_params.", ".queryParams.")
        .replace(".timeout_ms", ".timeout")
        .replace(".redirect.code", ".redirect.redirectCode")
        .replace(".direct_response", ".directResponse")
        .replace(".uri_regex.pattern", ".uriRegexRewrite.match")
        .replace(".uri_regex.substitution", ".uriRegexRewrite.rewrite")
        .replace(".cors.allow_origins", ".corsPolicy.allowOrigins")
        .replace(".cors.allow_methods", ".corsPolicy.allowMethods")
        .replace(".cors.allow_headers", ".corsPolicy.allowHeaders")
        .replace(".cors.expose_headers", ".corsPolicy.exposeHeaders");
    // `mirrors[k].x`: the model's mirror fields are the HTTPMirrorPolicy's destination's,
    // and its percentage.
    let p = match p
        .find(".mirrors[")
        .and_then(|at| Some((at, p[at..].find("].")?)))
    {
        Some((at, close)) => {
            let (head, tail) = p.split_at(at + close + 2);
            let tail = match tail {
                "destination.host" | "service" => "destination.host",
                "subset" => "destination.subset",
                "port" => "destination.port.number",
                "per_million" => "percentage",
                other => other,
            };
            format!("{head}{tail}")
        }
        None => p,
    };
    match p.as_str() {
        "routes" => "spec.http".into(),
        "tcp_routes" => "spec.tcp".into(),
        "tls_routes" => "spec.tls".into(),
        _ => p,
    }
}

#[cfg(test)]
mod tests {
    use crate::service_entry::{ParseError, parse};
    use meshfed_catalog::http_route::{CLUSTER_LABEL, LoadBalancer, MAX_MIRRORS, StringMatch};

    const GOOD: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web.demo.svc.cluster.local]
  http:
  - name: canary
    match:
    - headers: {X-Canary: {exact: "1"}}
    route:
    - destination: {host: web, subset: v2}
  - name: split
    match:
    - uri: {prefix: /api/}
      method: {exact: GET}
      queryParams: {beta: {regex: "y(es)?"}}
    route:
    - destination: {host: web.demo, subset: v1}
      weight: 80
    - destination: {host: web.demo.svc.cluster.local, subset: v2}
      weight: 20
    timeout: 3s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,connect-failure"}
  - route:
    - destination: {host: web}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  subsets:
  - name: v1
    labels: {topology.istio.io/cluster: west}
  - name: v2
    labels: {version: v2}
"#;

    #[test]
    fn a_destination_rule_load_balancer_travels_with_its_service() {
        use meshfed_catalog::http_route::LoadBalancer;
        let dr = |lb: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: demo}}\nspec:\n  host: web\n  trafficPolicy:\n    loadBalancer: {lb}\n"
            )
        };
        for (lb, want) in [
            ("{simple: ROUND_ROBIN}", LoadBalancer::RoundRobin),
            ("{simple: LEAST_REQUEST}", LoadBalancer::LeastRequest),
            ("{simple: LEAST_CONN}", LoadBalancer::LeastRequest),
            ("{simple: RANDOM}", LoadBalancer::Random),
        ] {
            let r = parse(&dr(lb)).unwrap();
            assert_eq!(r.http_policies[0].load_balancer, Some(want), "{lb}");
            assert_eq!(r.http_policies[0].service.to_string(), "web.demo");
        }
        // localityLbSetting travels too, checked as Istio checks it.
        let r = parse(&dr("{simple: RANDOM, localityLbSetting: {enabled: true}}")).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(
            r.http_policies[0].locality_lb,
            Some(meshfed_catalog::locality::LocalityLb::default())
        );
        let r = parse(&dr("{localityLbSetting: {enabled: false}}")).unwrap();
        assert!(r.http_policies[0].locality_lb.as_ref().unwrap().disabled);
        let r = parse(&dr(
            "{localityLbSetting: {distribute: [{from: us-east/*, to: {us-east/*: 80, eu-west/*: 20}}]}}",
        ))
        .unwrap();
        let l = r.http_policies[0].locality_lb.clone().unwrap();
        assert_eq!(l.distribute[0].from, "us-east/*");
        assert_eq!(l.distribute[0].to["eu-west/*"], 20);
        // Failover without outlier detection: Istio's warning; failoverPriority is read.
        let r = parse(&dr(
            "{localityLbSetting: {failover: [{from: us-east, to: eu-west}], failoverPriority: [topology.istio.io/network, \"topology.kubernetes.io/region=us-east\"]}}",
        ))
        .unwrap();
        let fields: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.trafficPolicy.loadBalancer.localityLbSetting"]
        );
        let l = r.http_policies[0].locality_lb.as_ref().unwrap();
        assert_eq!(l.failover[0].to, "eu-west");
        assert_eq!(
            l.failover_priority,
            [
                "topology.istio.io/network",
                "topology.kubernetes.io/region=us-east"
            ]
        );
        // A label named twice, or not a label: refused with its path.
        for (list, field) in [
            ("[a, b, a]", "failoverPriority[2]"),
            ("[\"-a\"]", "failoverPriority[0]"),
            ("[\"a=b=c\"]", "failoverPriority[0]"),
        ] {
            let Err(ParseError::Invalid(p)) = parse(&dr(&format!(
                "{{localityLbSetting: {{failoverPriority: {list}}}}}"
            ))) else {
                panic!("{list}: accepted");
            };
            assert_eq!(
                p[0].field,
                format!("spec.trafficPolicy.loadBalancer.localityLbSetting.{field}"),
                "{list}"
            );
        }
        // consistentHash: each key as Istio spells it; the ring's algorithm is warned about.
        use meshfed_catalog::affinity::HashKey;
        for (lb, want) in [
            (
                "{consistentHash: {httpHeaderName: X-User}}",
                HashKey::Header("x-user".into()),
            ),
            ("{consistentHash: {useSourceIp: true}}", HashKey::SourceIp),
            (
                "{consistentHash: {httpQueryParameterName: u}}",
                HashKey::QueryParameter("u".into()),
            ),
            (
                "{consistentHash: {httpCookie: {name: s, path: /app, ttl: 0s}, ringHash: {minimumRingSize: 1024}}}",
                HashKey::Cookie {
                    name: "s".into(),
                    path: Some("/app".into()),
                    ttl_ms: Some(0),
                },
            ),
        ] {
            let r = parse(&dr(lb)).unwrap();
            let p = &r.http_policies[0];
            assert_eq!(
                (p.consistent_hash.as_ref(), p.load_balancer),
                (Some(&want), None),
                "{lb}"
            );
        }
        let r = parse(&dr(
            "{consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}",
        ))
        .unwrap();
        assert_eq!(
            r.warnings[0].field,
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev"
        );
        // PASSTHROUGH: Istio accepts it; meshfed warns and balances as by default.
        let r = parse(&dr("{simple: PASSTHROUGH}")).unwrap();
        assert_eq!(
            r.warnings[0].field,
            "spec.trafficPolicy.loadBalancer.simple"
        );
        for (lb, field) in [
            (
                "{simple: FASTEST}",
                "spec.trafficPolicy.loadBalancer.simple",
            ),
            (
                "{simple: ROUND_ROBIN, consistentHash: {httpHeaderName: x-user}}",
                "spec.trafficPolicy.loadBalancer",
            ),
            (
                "{consistentHash: {httpHeaderName: x-user, useSourceIp: true}}",
                "spec.trafficPolicy.loadBalancer.consistentHash",
            ),
            (
                "{consistentHash: {minimumRingSize: 1024}}",
                "spec.trafficPolicy.loadBalancer.consistentHash",
            ),
            (
                "{consistentHash: {httpCookie: {ttl: 10s}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
            ),
            (
                "{consistentHash: {httpCookie: {name: s, ttl: soon}}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
            ),
            (
                "{consistentHash: {httpHeaderName: \"bad header\"}}",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            ),
            ("ROUND_ROBIN", "spec.trafficPolicy.loadBalancer"),
            (
                "{localityLbSetting: {distribute: [{from: us-east/*, to: {us-east/*: 80, eu-west/*: 10}}]}}",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
            ),
            (
                "{localityLbSetting: {distribute: [{from: us-east/*, to: {us-east/*: 100}}], failover: [{from: a, to: b}]}}",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute",
            ),
            (
                "{localityLbSetting: {failover: [{from: us-east/a, to: eu-west}]}}",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0]",
            ),
            (
                "{localityLbSetting: {distribute: [{from: us-east/*, to: {us-east/*: -5}}]}}",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to.us-east/*",
            ),
            (
                "{localityLbSetting: {enabled: maybe}}",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.enabled",
            ),
        ] {
            match parse(&dr(lb)) {
                Err(ParseError::Invalid(p)) => assert_eq!(p[0].field, field, "{lb}"),
                other => panic!("{lb}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_route_to_another_service_names_it_and_its_subsets_travel_with_it() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}
      weight: 90
    - destination: {host: web-v2.demo.svc.cluster.local, subset: blue, port: {number: 8080}}
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-v2, namespace: demo}
spec:
  host: web-v2
  subsets:
  - name: blue
    labels: {color: blue}
"#;
        let r = parse(yaml).unwrap();
        let web = &r.http_policies[0];
        assert_eq!(web.service.to_string(), "web.demo");
        let d = &web.routes[0].destinations;
        assert_eq!((d[0].service.as_ref(), d[0].weight), (None, 90));
        assert_eq!(
            d[1].service.as_ref().map(ToString::to_string).as_deref(),
            Some("web-v2.demo")
        );
        assert_eq!(
            (d[1].port, d[1].subset.as_deref()),
            (Some(8080), Some("blue"))
        );
        // web-v2's subsets travel with web-v2, on a catch-all route.
        let v2 = &r.http_policies[1];
        assert_eq!(v2.service.to_string(), "web-v2.demo");
        assert_eq!(v2.subsets[0].name, "blue");
        // Another namespace is refused: a route's site may not send its callers there.
        let e =
            parse(&yaml.replace("host: web-v2.demo.svc", "host: web-v2.billing.svc")).unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.http[0].route[1].destination.host"),
            "{e}"
        );
        // A subset web-v2 does not define is refused with its path.
        let e = parse(&yaml.replace("subset: blue, port", "subset: red, port")).unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.http[0].route[1].destination.subset"),
            "{e}"
        );
    }

    #[test]
    fn a_mirror_to_another_service_names_it_and_its_subsets_travel_with_it() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    mirror: {host: web-v2.demo.svc.cluster.local, subset: blue, port: {number: 8080}}
    mirrorPercentage: {value: 25}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-v2, namespace: demo}
spec:
  host: web-v2
  subsets:
  - name: blue
    labels: {color: blue}
"#;
        let r = parse(yaml).unwrap();
        let web = &r.http_policies[0];
        let m = &web.routes[0].mirrors[0];
        assert_eq!(
            m.service.as_ref().map(ToString::to_string).as_deref(),
            Some("web-v2.demo")
        );
        assert_eq!(
            (m.port, m.subset.as_deref(), m.per_million),
            (Some(8080), Some("blue"), 250_000)
        );
        // web-v2's subsets travel with web-v2.
        assert_eq!(r.http_policies[1].service.to_string(), "web-v2.demo");
        assert_eq!(r.http_policies[1].subsets[0].name, "blue");
        // The route's own service: no service named.
        let own = parse(&yaml.replace(
            "host: web-v2.demo.svc.cluster.local, subset: blue, port: {number: 8080}",
            "host: web",
        ))
        .unwrap();
        assert_eq!(own.http_policies[0].routes[0].mirrors[0].service, None);
        for (from, to, field) in [
            // Another namespace: a route's site may not send copies of its callers there.
            (
                "web-v2.demo.svc",
                "web-v2.billing.svc",
                "spec.http[0].mirror.host",
            ),
            (
                "subset: blue, port",
                "subset: red, port",
                "spec.http[0].mirror.subset",
            ),
            (
                "number: 8080",
                "number: 0",
                "spec.http[0].mirror.port.number",
            ),
            (
                "host: web-v2.demo.svc.cluster.local",
                "host: a.b.c.example",
                "spec.http[0].mirror.host",
            ),
        ] {
            let e = parse(&yaml.replace(from, to)).unwrap_err();
            assert!(e.to_string().contains(field), "{to}: {e}");
        }
    }

    /// `base` with `from` replaced by `to` is refused with a problem at `field`.
    fn refused_at(base: &str, from: &str, to: &str, field: &str) {
        let changed = base.replace(from, to);
        assert_ne!(changed, base, "{from}");
        match parse(&changed) {
            Err(ParseError::Invalid(problems)) => assert!(
                problems.iter().any(|p| p.field == field),
                "{to}: wanted {field}, got {problems:?}"
            ),
            other => panic!("{to}: accepted: {other:?}"),
        }
    }

    #[test]
    fn mirrors_send_copies_to_each_destination_with_its_own_percentage() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    mirrors:
    - destination: {host: web, subset: blue}
      percentage: {value: 50}
    - destination: {host: web-v2.demo.svc.cluster.local, port: {number: 8080}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  subsets:
  - name: blue
    labels: {color: blue}
"#;
        let r = parse(yaml).unwrap();
        let ms = &r.http_policies[0].routes[0].mirrors;
        assert_eq!(ms.len(), 2);
        assert_eq!(
            (
                ms[0].service.as_ref(),
                ms[0].subset.as_deref(),
                ms[0].per_million
            ),
            (None, Some("blue"), 500_000)
        );
        assert_eq!(
            (
                ms[1].service.as_ref().map(ToString::to_string).as_deref(),
                ms[1].port,
                ms[1].per_million
            ),
            (Some("web-v2.demo"), Some(8080), 1_000_000)
        );
        for (from, to, field) in [
            // Istio's rule: one or the other.
            (
                "    mirrors:\n",
                "    mirror: {host: web}\n    mirrors:\n",
                "spec.http[0].mirrors",
            ),
            (
                "subset: blue}",
                "subset: red}",
                "spec.http[0].mirrors[0].destination.subset",
            ),
            (
                "web-v2.demo.svc",
                "web-v2.billing.svc",
                "spec.http[0].mirrors[1].destination.host",
            ),
            (
                "number: 8080",
                "number: 0",
                "spec.http[0].mirrors[1].destination.port.number",
            ),
            (
                "value: 50",
                "value: 150",
                "spec.http[0].mirrors[0].percentage.value",
            ),
            (
                "    - destination: {host: web, subset: blue}\n      percentage",
                "    - percentage",
                "spec.http[0].mirrors[0].destination",
            ),
        ] {
            refused_at(yaml, from, to, field);
        }
        // Past the bound: refused at the list.
        let many = "    - destination: {host: web}\n".repeat(MAX_MIRRORS + 1);
        let e = parse(&yaml.replace("    - destination: {host: web, subset: blue}\n", &many))
            .unwrap_err();
        assert!(e.to_string().contains("spec.http[0].mirrors:"), "{e}");
    }

    #[test]
    fn a_virtual_service_becomes_the_routes_of_its_service() {
        let r = parse(GOOD).unwrap();
        assert_eq!(r.http_policies.len(), 1);
        let p = &r.http_policies[0];
        assert_eq!(p.service.to_string(), "web.demo");
        assert_eq!(p.source, "VirtualService demo/web");
        assert_eq!(p.routes.len(), 3);
        assert_eq!(
            p.routes[0].matches[0].headers["x-canary"],
            StringMatch::Exact("1".into())
        );
        assert_eq!(p.routes[0].destinations[0].weight, 100);
        let split = &p.routes[1];
        assert_eq!(
            split
                .destinations
                .iter()
                .map(|d| d.weight)
                .collect::<Vec<_>>(),
            [80, 20]
        );
        assert_eq!(split.timeout_ms, Some(3000));
        let retries = split.retries.as_ref().unwrap();
        assert_eq!(
            (retries.attempts, retries.per_try_timeout_ms),
            (3, Some(500))
        );
        assert_eq!(p.subsets[0].labels[CLUSTER_LABEL], "west");
        // retryOn is applied: 5xx (every 5xx and no answer) and connect failures.
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let on = retries.retry_on.as_ref().unwrap();
        assert!(on.five_xx && on.connect_failure && !on.gateway_error && !on.reset);
        // Statuses, gRPC conditions and retriable-status-codes, as Istio reads them.
        let r = parse(&GOOD.replace(
            "retryOn: \"5xx,connect-failure\"",
            "retryOn: \"409,retriable-status-codes,unavailable,gateway-error,503,409\"",
        ))
        .unwrap();
        let on = r.http_policies[0].routes[1]
            .retries
            .as_ref()
            .and_then(|r| r.retry_on.as_deref().cloned())
            .unwrap();
        assert_eq!(
            (on.status_codes, on.grpc_codes, on.gateway_error, on.five_xx),
            (vec![409, 503], vec![14], true, false)
        );
        // More attempts than meshfed makes: accepted as Istio accepts them, warned, 10.
        let r = parse(&GOOD.replace("attempts: 3", "attempts: 25")).unwrap();
        assert_eq!(
            (
                r.http_policies[0].routes[1]
                    .retries
                    .as_ref()
                    .map(|r| r.attempts),
                r.warnings
                    .iter()
                    .map(|w| w.field.as_str())
                    .collect::<Vec<_>>()
            ),
            (Some(10), vec!["spec.http[1].retries.attempts"])
        );
        // A condition that does not apply to a gateway is warned about by path.
        let r = parse(&GOOD.replace("5xx,connect-failure", "5xx,envoy-ratelimited")).unwrap();
        let warned: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(warned, ["spec.http[1].retries.retryOn"]);
        // Istio 1.26's backoff is the base of the back-off (default: none, 25 ms);
        // retryIgnorePreviousHosts: true is what meshfed does, false is warned about.
        let backoff = |text: &str| {
            let r = parse(&GOOD.replace(
                "retryOn: \"5xx,connect-failure\"",
                &format!("retryOn: \"5xx\", {text}"),
            ))
            .unwrap();
            let b = r.http_policies[0].routes[1]
                .retries
                .as_ref()
                .and_then(|r| r.backoff_ms);
            let warned: Vec<String> = r.warnings.into_iter().map(|w| w.field).collect();
            (b, warned)
        };
        assert_eq!(backoff("backoff: 250ms"), (Some(250), vec![]));
        assert_eq!(
            backoff("backoff: 1.5s, retryIgnorePreviousHosts: true"),
            (Some(1500), vec![])
        );
        assert_eq!(
            backoff("backoff: 2h"),
            (Some(60_000), vec!["spec.http[1].retries.backoff".into()])
        );
        assert_eq!(
            backoff("retryIgnorePreviousHosts: false"),
            (
                None,
                vec!["spec.http[1].retries.retryIgnorePreviousHosts".into()]
            )
        );
        let e = parse(&GOOD.replace(
            "retryOn: \"5xx,connect-failure\"",
            "retryOn: \"5xx\", backoff: 10us",
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("spec.http[1].retries.backoff"),
            "{e}"
        );
    }

    #[test]
    fn what_istio_refuses_is_refused_with_its_field() {
        let rows: &[(&str, &str, &str)] = &[
            ("weight: 20", "weight: 30", "spec.http[1].route"),
            // Istio's validateSubsetName: a DNS label.
            ("  - name: v1\n", "  - name: V_1\n", "spec.subsets[0].name"),
            ("weight: 80", "weight: 180", "spec.http[1].route[0].weight"),
            (
                "subset: v2}\n  - name: split",
                "subset: v3}\n  - name: split",
                "spec.http[0].route[0].subset",
            ),
            (
                "regex: \"y(es)?\"",
                "regex: \"y(es\"",
                "spec.http[1].match[0].queryParams.beta.regex",
            ),
            (
                "hosts: [web.demo.svc.cluster.local]",
                "hosts: [web.a.b.example]",
                "spec.hosts[0]",
            ),
            (
                "destination: {host: web}\n---",
                "destination: {host: orders.demo.example.com}\n---",
                "spec.http[2].route[0].destination.host",
            ),
            ("timeout: 3s", "timeout: soon", "spec.http[1].timeout"),
            (
                "attempts: 3",
                "attempts: -1",
                "spec.http[1].retries.attempts",
            ),
            (
                "retryOn: \"5xx,connect-failure\"",
                "retryOn: \"5xx,sometimes\"",
                "spec.http[1].retries.retryOn",
            ),
            // Istio splits on commas only, and a number must be a known status.
            (
                "retryOn: \"5xx,connect-failure\"",
                "retryOn: \"5xx, connect-failure\"",
                "spec.http[1].retries.retryOn",
            ),
            (
                "retryOn: \"5xx,connect-failure\"",
                "retryOn: \"5xx,599\"",
                "spec.http[1].retries.retryOn",
            ),
            ("attempts: 3", "attempts: 0", "spec.http[1].retries"),
            (
                "{exact: \"1\"}",
                "{exact: \"1\", prefix: \"2\"}",
                "spec.http[0].match[0].headers.X-Canary",
            ),
        ];
        for (from, to, field) in rows {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            match parse(&text) {
                Err(ParseError::Invalid(p)) => {
                    assert!(p.iter().any(|p| p.field == *field), "{to}: {p:?}")
                }
                other => panic!("{to}: {other:?}"),
            }
        }
    }

    #[test]
    fn faults_are_read_as_istio_writes_them() {
        let text = GOOD.replacen(
            "    timeout: 3s",
            "    timeout: 3s\n    fault:\n      delay: {fixedDelay: 100ms, percentage: {value: 50}}\n      abort: {httpStatus: 503, percentage: {value: 0.1}}",
            1,
        );
        let r = parse(&text).unwrap();
        let f = r.http_policies[0].routes[1].fault.clone().unwrap();
        let (d, a) = (f.delay.unwrap(), f.abort.unwrap());
        assert_eq!((d.fixed_delay_ms, d.per_million), (100, 500_000));
        assert_eq!((a.http_status, a.per_million), (503, 1_000));
        for (bad, field) in [
            (
                "abort: {httpStatus: 503, percentage: {value: 0.1}}",
                "abort: {httpStatus: 99}",
            ),
            ("percentage: {value: 50}", "percentage: {value: 150}"),
            ("fixedDelay: 100ms", "fixedDelay: soon"),
        ] {
            let t = text.replacen(bad, field, 1);
            assert!(parse(&t).is_err(), "{field}");
        }
    }

    #[test]
    fn a_subsets_labels_are_checked_with_or_without_a_virtual_service() {
        // Found by fuzzing: a DestinationRule alone (its connection pool makes a policy)
        // with a subset label value Kubernetes refuses was accepted, and its publish
        // would have been refused.
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: demo}\n\
                  spec:\n  host: web\n  trafficPolicy:\n    connectionPool:\n      http: {http2MaxRequests: 10}\n  \
                  subsets:\n  - name: v1\n    labels: {version: v(}\n";
        for text in [dr.to_owned(), format!("{GOOD}---\n{dr}")] {
            let Err(ParseError::Invalid(p)) = parse(&text) else {
                panic!("accepted: {text}");
            };
            assert!(
                p.iter()
                    .any(|p| p.field == "spec.subsets[0].labels.version"),
                "{p:?}"
            );
        }
    }

    #[test]
    fn export_to_is_checked_as_istio_checks_it_and_dot_is_the_namespace() {
        let vs = |e: &str| {
            GOOD.replace(
                "  hosts: [web.demo.svc.cluster.local]\n",
                &format!("  hosts: [web.demo.svc.cluster.local]\n  exportTo: {e}\n"),
            )
        };
        let export_to = |e: &str| parse(&vs(e)).unwrap().http_policies[0].export_to.clone();
        assert_eq!(export_to("[.]"), ["demo"]);
        assert_eq!(export_to("[., shop]"), ["demo", "shop"]);
        assert!(export_to("[\"*\"]").is_empty());
        assert!(export_to("[]").is_empty());
        for (e, field, message) in [
            (
                "[demo, .]",
                "spec.exportTo[1]",
                "duplicate entries in exportTo: . and current namespace demo",
            ),
            (
                "[., demo]",
                "spec.exportTo[1]",
                "duplicate entries in exportTo for entry demo",
            ),
            (
                "[shop, shop]",
                "spec.exportTo[1]",
                "duplicate entries in exportTo for entry shop",
            ),
            (
                "[\"*\", shop]",
                "spec.exportTo",
                "cannot have both public (*) and non-public exportTo values",
            ),
            (
                "[\"~\"]",
                "spec.exportTo[0]",
                "exportTo ~ (none) is not allowed",
            ),
            (
                "[Shop]",
                "spec.exportTo[0]",
                "only .,*, or a valid DNS 1123 label",
            ),
            (
                "[a.b]",
                "spec.exportTo[0]",
                "only .,*, or a valid DNS 1123 label",
            ),
        ] {
            let Err(ParseError::Invalid(p)) = parse(&vs(e)) else {
                panic!("{e}: accepted");
            };
            assert!(
                p.iter()
                    .any(|p| p.field == field && p.message.contains(message)),
                "{e}: {p:?}"
            );
        }
    }

    #[test]
    fn a_subsets_traffic_policy_travels_with_it_and_applies_to_its_requests() {
        let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      http: {http2MaxRequests: 100}
    loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        http: {http2MaxRequests: 5}
      loadBalancer: {simple: LEAST_REQUEST}
      portLevelSettings:
      - port: {number: 9090}
        loadBalancer: {simple: ROUND_ROBIN}
"#;
        let r = parse(dr).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = &r.http_policies[0];
        assert!(p.subsets[0].policy.is_none());
        let at = |port, s: usize| {
            let t = p.traffic(port, Some(&p.subsets[s]));
            (t.pool.max_requests, t.balancer.load_balancer)
        };
        assert_eq!(at(80, 0), (Some(100), Some(LoadBalancer::Random)));
        assert_eq!(at(80, 1), (Some(5), Some(LoadBalancer::LeastRequest)));
        // The subset's port setting replaces every block: no breaker on 9090.
        assert_eq!(at(9090, 1), (None, Some(LoadBalancer::RoundRobin)));
        // The exporting gateway's settings are the subset's too (no warning), and so is
        // its localityLbSetting (it orders the subset's sites); a subset's tls is
        // warned about. Istio's rules hold in a subset's policy as in the
        // destination's, with the subset's path.
        let warned = dr
            .replace(
                "        http: {http2MaxRequests: 5}\n",
                "        http: {http2MaxRequests: 5, maxRequestsPerConnection: 2}\n      outlierDetection: {consecutive5xxErrors: 2}\n      tls: {mode: SIMPLE}\n",
            )
            .replace(
                "      loadBalancer: {simple: LEAST_REQUEST}\n",
                "      loadBalancer: {simple: LEAST_REQUEST, localityLbSetting: {enabled: false}}\n",
            );
        let r = parse(&warned).unwrap();
        let fields: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(fields, ["spec.subsets[1].trafficPolicy.tls"]);
        let v2 = &r.http_policies[0].subsets[1];
        let t = r.http_policies[0].traffic(80, Some(v2));
        assert_eq!(
            (
                t.pool.max_requests_per_connection,
                t.outlier.map(|o| o.consecutive_5xx),
                t.balancer.locality_lb.map(|l| l.disabled)
            ),
            (Some(2), Some(2), Some(true))
        );
        for (from, to, field) in [
            (
                "{http2MaxRequests: 5}",
                "{http2MaxRequests: -1}",
                "spec.subsets[1].trafficPolicy.connectionPool.http.http2MaxRequests",
            ),
            (
                "      - port: {number: 9090}\n",
                "      - port: null\n",
                "spec.subsets[1].trafficPolicy.portLevelSettings[0].port",
            ),
            (
                "      connectionPool:\n        http: {http2MaxRequests: 5}\n      loadBalancer: {simple: LEAST_REQUEST}\n      portLevelSettings:\n      - port: {number: 9090}\n        loadBalancer: {simple: ROUND_ROBIN}\n",
                "      {}\n",
                "spec.subsets[1].trafficPolicy",
            ),
            (
                "      connectionPool:\n        http: {http2MaxRequests: 5}\n",
                "      bogus: 1\n      connectionPool:\n        http: {http2MaxRequests: 5}\n",
                "",
            ),
        ] {
            let r = parse(&dr.replace(from, to));
            if field.is_empty() {
                // An unknown field: a warning with its path, not an error.
                let r = r.unwrap();
                assert!(
                    r.warnings
                        .iter()
                        .any(|w| w.field == "spec.subsets[1].trafficPolicy.bogus"),
                    "{:?}",
                    r.warnings
                );
                continue;
            }
            let Err(ParseError::Invalid(problems)) = r else {
                panic!("{to}: accepted");
            };
            assert!(
                problems.iter().any(|p| p.field == field),
                "{field}: {problems:?}"
            );
        }
    }

    #[test]
    fn port_level_settings_travel_with_the_policy_and_replace_blocks_per_port() {
        let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      http: {http2MaxRequests: 100, idleTimeout: 5s}
    loadBalancer: {simple: RANDOM}
    portLevelSettings:
    - port: {number: 8080}
      connectionPool:
        http: {http2MaxRequests: 7}
      loadBalancer: {simple: LEAST_REQUEST}
    - port: {number: 9090}
      outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 1s, interval: 2s}
"#;
        let r = parse(dr).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = &r.http_policies[0];
        assert_eq!(p.port_settings.len(), 2);
        let at8080 = p.at_port(8080);
        assert_eq!(
            (
                at8080.max_requests,
                at8080.idle_timeout_ms,
                at8080.load_balancer
            ),
            (Some(7), None, Some(LoadBalancer::LeastRequest))
        );
        let at9090 = p.at_port(9090);
        assert_eq!(
            (
                at9090.max_requests,
                at9090.load_balancer,
                at9090.outlier.as_ref().map(|o| (
                    o.consecutive_5xx,
                    o.base_ejection_ms,
                    o.interval()
                ))
            ),
            // The destination's breaker and balancer are not inherited (pilot's
            // GetPortLevelTrafficPolicy): the port sets only outlierDetection.
            (None, None, Some((1, 1000, 2000)))
        );
        // An interval that is not a duration is refused by path.
        let bad = parse(&dr.replace("interval: 2s", "interval: soon")).unwrap_err();
        assert!(
            bad.to_string()
                .contains("spec.trafficPolicy.portLevelSettings[1].outlierDetection.interval"),
            "{bad}"
        );
        assert_eq!(p.at_port(443).max_requests, Some(100));
        // Port settings alone make a policy (every request on one route).
        let alone = dr.replace(
            "    connectionPool:\n      http: {http2MaxRequests: 100, idleTimeout: 5s}\n    loadBalancer: {simple: RANDOM}\n",
            "",
        );
        assert_ne!(alone, dr);
        let r = parse(&alone).unwrap();
        assert_eq!(r.http_policies[0].at_port(8080).max_requests, Some(7));
        assert_eq!(r.http_policies[0].max_requests, None);
        // A port's tls, and a port named twice: warnings; the first entry applies.
        let warned = dr.replace(
            "    - port: {number: 9090}\n",
            "    - port: {number: 8080}\n      tls: {mode: SIMPLE}\n      outlierDetection: {consecutive5xxErrors: 2}\n    - port: {number: 9090}\n",
        );
        let r = parse(&warned).unwrap();
        let fields: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
        assert!(
            fields.contains(&"spec.trafficPolicy.portLevelSettings[1].tls")
                && fields.contains(&"spec.trafficPolicy.portLevelSettings[1].port"),
            "{fields:?}"
        );
        assert_eq!(r.http_policies[0].at_port(8080).max_requests, Some(7));
        // Istio's refusals, with the setting's path.
        for (from, to, field) in [
            (
                "    - port: {number: 9090}\n",
                "    - port: null\n",
                "spec.trafficPolicy.portLevelSettings[1].port",
            ),
            (
                "      outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 1s, interval: 2s}\n",
                "",
                "spec.trafficPolicy.portLevelSettings[1]",
            ),
            (
                "{number: 9090}",
                "{number: 0}",
                "spec.trafficPolicy.portLevelSettings[1].port.number",
            ),
            (
                "{simple: LEAST_REQUEST}",
                "{simple: SLOWEST}",
                "spec.trafficPolicy.portLevelSettings[0].loadBalancer.simple",
            ),
            (
                "baseEjectionTime: 1s",
                "baseEjectionTime: soon",
                "spec.trafficPolicy.portLevelSettings[1].outlierDetection.baseEjectionTime",
            ),
        ] {
            refused_at(dr, from, to, field);
        }
    }

    #[test]
    fn a_connection_pool_is_the_circuit_breaker_with_or_without_routes() {
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: demo}\n\
                  spec:\n  host: web\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 10}\n      http: {http2MaxRequests: 4}\n";
        let r = parse(dr).unwrap();
        assert_eq!(r.http_policies.len(), 1);
        let p = &r.http_policies[0];
        assert_eq!(p.max_requests, Some(4));
        assert_eq!(p.routes.len(), 1, "every request on one route");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        // With the VirtualService of the same service: its routes, and the limit.
        let both = format!("{GOOD}---\n{}", dr.replace("name: web,", "name: web-pool,"));
        let r = parse(&both).unwrap();
        assert_eq!(r.http_policies[0].max_requests, Some(4));
        assert_eq!(r.http_policies[0].routes.len(), 3);
        assert_eq!(
            p.connection_pool,
            Some(meshfed_catalog::http_route::ConnectionPool {
                max_connections: 10,
                max_pending: 1024
            })
        );
        let pending = dr.replace(
            "http2MaxRequests: 4}",
            "http2MaxRequests: 4, http1MaxPendingRequests: 2, idleTimeout: 1s}",
        );
        let r = parse(&pending).unwrap();
        assert_eq!(r.http_policies[0].connection_pool.unwrap().max_pending, 2);
        assert_eq!(r.http_policies[0].idle_timeout_ms, Some(1000));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        for (bad, field) in [
            ("idleTimeout: 1s", "idleTimeout: soon"),
            ("idleTimeout: 1s", "idleTimeout: 5"),
            ("idleTimeout: 1s", "idleTimeout: 0s"),
        ] {
            match parse(&pending.replace(bad, field)) {
                Err(ParseError::Invalid(p)) => assert_eq!(
                    p[0].field, "spec.trafficPolicy.connectionPool.http.idleTimeout",
                    "{field}"
                ),
                other => panic!("{field}: {other:?}"),
            }
        }
        // tcp.connectTimeout: read, in Istio's duration form, with or without the others.
        for (tcp, want) in [
            (
                "tcp: {maxConnections: 10, connectTimeout: 250ms}",
                Some(250),
            ),
            ("tcp: {connectTimeout: 1.5s}", Some(1500)),
            ("tcp: {maxConnections: 10}", None),
        ] {
            let r = parse(&dr.replace("tcp: {maxConnections: 10}", tcp)).unwrap();
            assert!(r.warnings.is_empty(), "{tcp}: {:?}", r.warnings);
            assert_eq!(r.http_policies[0].connect_timeout_ms, want, "{tcp}");
        }
        // tcp.tcpKeepalive: read; past the kernel's bounds warned about and bounded.
        use meshfed_catalog::http_route::TcpKeepalive;
        for (ka, want, warned) in [
            (
                "{time: 30s, interval: 5s, probes: 3}",
                TcpKeepalive {
                    probes: Some(3),
                    time_ms: Some(30_000),
                    interval_ms: Some(5_000),
                },
                0,
            ),
            ("{}", TcpKeepalive::default(), 0),
            (
                "{time: 10h, probes: 1000}",
                TcpKeepalive {
                    probes: Some(127),
                    time_ms: Some(32_767_000),
                    interval_ms: None,
                },
                2,
            ),
        ] {
            let text = dr.replace("maxConnections: 10", &format!("tcpKeepalive: {ka}"));
            let r = parse(&text).unwrap();
            assert_eq!(r.http_policies[0].tcp_keepalive, Some(want), "{ka}");
            assert_eq!(r.warnings.len(), warned, "{ka}: {:?}", r.warnings);
        }
        match parse(&dr.replace("maxConnections: 10", "tcpKeepalive: {time: soon}")) {
            Err(ParseError::Invalid(p)) => assert_eq!(
                p[0].field,
                "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.time"
            ),
            other => panic!("{other:?}"),
        }
        match parse(&dr.replace("maxConnections: 10", "connectTimeout: 0s")) {
            Err(ParseError::Invalid(p)) => assert_eq!(
                p[0].field,
                "spec.trafficPolicy.connectionPool.tcp.connectTimeout"
            ),
            other => panic!("{other:?}"),
        }
        // maxRequestsPerConnection: read, with or without the other limits.
        let per_conn = dr.replace("http2MaxRequests: 4}", "maxRequestsPerConnection: 100}");
        let r = parse(&per_conn).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = &r.http_policies[0];
        assert_eq!(
            (p.max_requests, p.max_requests_per_connection),
            (None, Some(100))
        );
        let bad = dr.replace("http2MaxRequests: 4}", "maxRequestsPerConnection: -1}");
        match parse(&bad) {
            Err(ParseError::Invalid(p)) => assert_eq!(
                p[0].field,
                "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection"
            ),
            other => panic!("{other:?}"),
        }
        // 0 is Istio's unset.
        let zero = dr.replace("http2MaxRequests: 4", "http2MaxRequests: 0");
        let r = parse(&zero).unwrap();
        assert_eq!(r.http_policies[0].max_requests, None);
        let bad = dr.replace("http2MaxRequests: 4", "http2MaxRequests: -1");
        match parse(&bad) {
            Err(ParseError::Invalid(p)) => assert_eq!(
                p[0].field,
                "spec.trafficPolicy.connectionPool.http.http2MaxRequests"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsupported_fields_are_warned_about_by_path() {
        let text = GOOD.replacen(
            "    timeout: 3s",
            "    timeout: 3s\n    corsPolicy: {allowOrigins: [], maxAge: 1h, extra: 1}\n    rewrite: {uri: /v2, extra: 1}",
            1,
        );
        let r = parse(&text).unwrap();
        for f in [
            "spec.http[1].corsPolicy.extra",
            "spec.http[1].rewrite.extra",
        ] {
            assert!(
                r.warnings.iter().any(|w| w.field == f),
                "{f}: {:?}",
                r.warnings
            );
        }
    }

    /// `directResponse`, as Istio's validation checks it (`validateHTTPRoute`,
    /// `validateHTTPDirectResponse`): a status from 200 to 599, a body of text or base64
    /// bytes, never beside `route`, `redirect`, `fault` or `rewrite`; retries and mirrors
    /// beside it are accepted and ignored, warned.
    #[test]
    fn direct_responses_are_read_and_checked_as_istio_does() {
        use meshfed_catalog::http_route::{DirectBody, DirectResponse};
        let vs = |route: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: demo}}\nspec:\n  hosts: [web]\n  http:\n  - match: [{{uri: {{prefix: /old}}}}]\n{route}\n  - route: [{{destination: {{host: web}}}}]\n"
            )
        };
        let read = |route: &str| {
            let r = parse(&vs(route)).unwrap_or_else(|e| panic!("{route}: {e}"));
            (r.http_policies[0].routes[0].clone(), r.warnings)
        };
        let (r, w) = read("    directResponse: {status: 503, body: {string: down}}");
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            r.direct_response,
            Some(DirectResponse {
                status: 503,
                body: Some(DirectBody::String("down".into()))
            })
        );
        assert!(r.destinations.is_empty());
        // Bytes as protobuf's JSON reads them; no body.
        for (body, want) in [
            ("{bytes: aGk=}", Some(DirectBody::Bytes("aGk=".into()))),
            ("{bytes: aGk}", Some(DirectBody::Bytes("aGk".into()))),
            ("{}", None),
        ] {
            let (r, _) = read(&format!(
                "    directResponse: {{status: 200, body: {body}}}"
            ));
            assert_eq!(r.direct_response.unwrap().body, want, "{body}");
        }
        let (r, _) = read("    directResponse: {status: 204}");
        assert_eq!(r.direct_response.unwrap().body, None);
        // Retries and mirrors beside it: accepted, ignored, warned.
        let (r, w) = read(
            "    directResponse: {status: 503}\n    retries: {attempts: 2}\n    mirror: {host: web}",
        );
        assert!(r.retries.is_none() && r.mirrors.is_empty());
        for f in ["spec.http[0].retries", "spec.http[0].mirror"] {
            assert!(w.iter().any(|x| x.field == f), "{f}: {w:?}");
        }
        // Refused: (the route, the field the error names).
        for (route, field) in [
            (
                "    directResponse: {status: 199}",
                "spec.http[0].directResponse.status",
            ),
            (
                "    directResponse: {status: 600}",
                "spec.http[0].directResponse.status",
            ),
            (
                "    directResponse: {status: 70000}",
                "spec.http[0].directResponse.status",
            ),
            (
                "    directResponse: {body: {string: x}}",
                "spec.http[0].directResponse.status",
            ),
            (
                "    directResponse: {status: 200, body: {string: a, bytes: YQ==}}",
                "spec.http[0].directResponse.body",
            ),
            (
                "    directResponse: {status: 200, body: {bytes: \"not base64!\"}}",
                "spec.http[0].directResponse.body",
            ),
            (
                "    directResponse: {status: 503}\n    route: [{destination: {host: web}}]",
                "spec.http[0].directResponse",
            ),
            (
                "    directResponse: {status: 503}\n    redirect: {uri: /new}",
                "spec.http[0].directResponse",
            ),
            (
                "    directResponse: {status: 503}\n    fault: {abort: {httpStatus: 500, percentage: {value: 10}}}",
                "spec.http[0].directResponse",
            ),
            (
                "    directResponse: {status: 503}\n    rewrite: {uri: /v2}",
                "spec.http[0].rewrite",
            ),
        ] {
            crate::test_support::assert_refused_at(&vs(route), field);
        }
    }

    /// A VirtualService's `tcp` routes, as Istio's `validateTCPRoute` checks them: read
    /// beside `http` or alone (HTTP ports then keep the service itself).
    #[test]
    fn tcp_routes_are_read_as_istio_checks_them() {
        use meshfed_catalog::http_route::TcpMatch;
        let file = |tcp: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db, namespace: demo}}\nspec:\n  hosts: [db]\n  tcp:\n{tcp}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: db, namespace: demo}}\nspec:\n  host: db.demo\n  subsets:\n  - {{name: v1, labels: {{topology.istio.io/cluster: west}}}}\n  - {{name: v2, labels: {{topology.istio.io/cluster: north}}}}\n"
            )
        };
        let r = parse(&file(
            "  - match: [{port: 5432, sourceNamespace: shop, destinationSubnets: [10.0.0.0/8, \"2001:db8::1\"]}]\n    route: [{destination: {host: db, subset: v2}}]\n  - route:\n    - {destination: {host: db.demo, subset: v1}, weight: 80}\n    - {destination: {host: db.demo.svc.cluster.local, subset: v2}, weight: 20}",
        ))
        .unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = &r.http_policies[0];
        // HTTP ports: the service itself.
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].destinations[0].subset, None);
        assert_eq!(p.tcp_routes.len(), 2);
        assert_eq!(
            p.tcp_routes[0].matches,
            [TcpMatch {
                port: Some(5432),
                source_namespace: Some("shop".into()),
                destination_subnets: vec!["10.0.0.0/8".into(), "2001:db8::1".into()],
                ..Default::default()
            }]
        );
        // A single destination takes everything, whatever its weight (Istio's rule).
        assert_eq!(p.tcp_routes[0].destinations[0].weight, 100);
        let w: Vec<(Option<&str>, u32)> = p.tcp_routes[1]
            .destinations
            .iter()
            .map(|d| (d.subset.as_deref(), d.weight))
            .collect();
        assert_eq!(w, [(Some("v1"), 80), (Some("v2"), 20)]);
        // Warned: what a TCP route has no use for, and matches that never apply here.
        for (tcp, field) in [
            (
                "  - route: [{destination: {host: db}, headers: {request: {set: {a: b}}}}]",
                "spec.tcp[0].route[0].headers",
            ),
            (
                "  - match: [{gateways: [my-gateway]}]\n    route: [{destination: {host: db}}]",
                "spec.tcp[0].match[0].gateways",
            ),
            (
                "  - match: [{sourceSubnet: 10.0.0.0/8}]\n    route: [{destination: {host: db}}]",
                "spec.tcp[0].match[0].sourceSubnet",
            ),
        ] {
            let r = parse(&file(tcp)).unwrap_or_else(|e| panic!("{tcp}: {e}"));
            assert!(
                r.warnings.iter().any(|w| w.field == field),
                "{field}: {:?}",
                r.warnings
            );
        }
        // Refused by path.
        for (tcp, field) in [
            ("  - match: [{port: 5432}]", "spec.tcp[0].route"),
            ("  - route: []", "spec.tcp[0].route"),
            (
                "  - route:\n    - {destination: {host: db, subset: v1}, weight: 80}\n    - {destination: {host: db, subset: v2}, weight: 30}",
                "spec.tcp[0].route",
            ),
            (
                "  - route: [{destination: {host: db, subset: v3}}]",
                "spec.tcp[0].route[0].subset",
            ),
            (
                "  - route: [{destination: {host: nowhere.other}}]",
                "spec.tcp[0].route[0].destination.host",
            ),
            (
                "  - match: [{destinationSubnets: [10.0.0.0/33]}]\n    route: [{destination: {host: db}}]",
                "spec.tcp[0].match[0].destinationSubnets[0]",
            ),
            (
                "  - match: [{port: 0x10000}]\n    route: [{destination: {host: db}}]",
                "spec.tcp[0].match[0].port",
            ),
        ] {
            crate::test_support::assert_refused_at(&file(tcp), field);
        }
        // Neither http nor tcp.
        crate::test_support::assert_refused_at(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db, namespace: demo}\nspec:\n  hosts: [db]\n",
            "spec.http",
        );
    }

    /// `spec.tls` as Istio's `validateTLSRoute` and `validateSniHost` check it: a
    /// VirtualService with only TLS routes is read (it was refused: "meshfed reads HTTP
    /// and TCP routes"), and what Istio refuses is refused by path.
    #[test]
    fn tls_routes_are_read_as_istio_checks_them() {
        let file = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/serviceentry/tls-routes-by-sni.yaml"
        ))
        .unwrap();
        let r = parse(&file).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = &r.http_policies[0];
        assert_eq!(p.service.to_string(), "db.shop");
        assert_eq!(p.tls_routes.len(), 3);
        assert!(p.tcp_routes.is_empty());
        assert_eq!(p.tls_routes[0].matches[0].sni_hosts, ["a.db.example"]);
        assert_eq!(
            p.tls_routes[1].matches[0].source_namespace.as_deref(),
            Some("reports")
        );
        let w: Vec<(Option<&str>, u32)> = p.tls_routes[1]
            .destinations
            .iter()
            .map(|d| (d.subset.as_deref(), d.weight))
            .collect();
        assert_eq!(w, [(Some("north"), 90), (Some("west"), 10)]);
        // Both hosts of the ServiceEntry are one service's: one policy.
        assert_eq!(r.http_policies.len(), 1);
        // TLS routes for a ServiceEntry without a TLS port apply to none: warned.
        let r = parse(&file.replace("protocol: TLS", "protocol: TCP")).unwrap();
        assert!(
            r.warnings
                .iter()
                .any(|w| w.field == "spec.tls" && w.message.contains("no TLS port")),
            "{:?}",
            r.warnings
        );
        let with = |tls: &str| {
            let head = file.split("  tls:\n").next().unwrap();
            let tail = file
                .split("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule")
                .nth(1)
                .unwrap();
            format!(
                "{head}  tls:\n{tls}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule{tail}"
            )
        };
        // An IP address is warned about, as Istio does.
        let r = parse(&with(
            "  - match: [{sniHosts: [192.0.2.1]}]\n    route: [{destination: {host: a.db.example}}]",
        ))
        .unwrap();
        assert!(
            r.warnings
                .iter()
                .any(|w| w.field == "spec.tls[0].match[0].sniHosts[0]"),
            "{:?}",
            r.warnings
        );
        for (tls, field) in [
            (
                "  - route: [{destination: {host: a.db.example}}]",
                "spec.tls[0].match",
            ),
            (
                "  - match: [{port: 443}]\n    route: [{destination: {host: a.db.example}}]",
                "spec.tls[0].match[0].sniHosts",
            ),
            (
                "  - match: [{sniHosts: [c.other.example]}]\n    route: [{destination: {host: a.db.example}}]",
                "spec.tls[0].match[0].sniHosts[0]",
            ),
            (
                "  - match: [{sniHosts: [\"*.db.example\"]}]\n    route: [{destination: {host: a.db.example}}]",
                "spec.tls[0].match[0].sniHosts[0]",
            ),
            (
                "  - match: [{sniHosts: [A.db.example]}]\n    route: [{destination: {host: a.db.example}}]",
                "spec.tls[0].match[0].sniHosts[0]",
            ),
            (
                "  - match: [{sniHosts: [a.db.example]}]",
                "spec.tls[0].route",
            ),
            (
                "  - match: [{sniHosts: [a.db.example], destinationSubnets: [10.0.0.0/33]}]\n    route: [{destination: {host: a.db.example}}]",
                "spec.tls[0].match[0].destinationSubnets[0]",
            ),
            (
                "  - match: [{sniHosts: [a.db.example]}]\n    route: [{destination: {host: a.db.example, subset: v9}}]",
                "spec.tls[0].route[0].subset",
            ),
        ] {
            crate::test_support::assert_refused_at(&with(tls), field);
        }
    }

    /// Every HTTPMatchRequest field, read as Istio's `validateHTTPRouteMatchRequest`
    /// checks it and as its `TranslateRouteMatch` gives it to Envoy.
    #[test]
    fn match_requests_are_read_whole_as_istio_checks_them() {
        use meshfed_catalog::http_route::StringMatch as S;
        let vs = |m: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: demo}}\nspec:\n  hosts: [web]\n  http:\n  - match:\n    - {m}\n    route: [{{destination: {{host: web}}}}]\n"
            )
        };
        let read = |m: &str| {
            let r = parse(&vs(m)).unwrap_or_else(|e| panic!("{m}: {e}"));
            (r.http_policies[0].routes[0].matches[0].clone(), r.warnings)
        };
        let (m, w) = read(
            "{uri: {prefix: /API}, ignoreUriCase: true, authority: {exact: \"web.demo:80\"}, scheme: {exact: http}, port: 8080, sourceNamespace: shop, withoutHeaders: {x-canary: {exact: \"1\"}, X-Debug: {}, x-any: {regex: \"*\"}}, headers: {x-user: {}}, queryParams: {beta: {}}, gateways: [mesh], name: m1}",
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(m.uri, Some(S::Prefix("/API".into())));
        assert!(m.ignore_uri_case);
        assert_eq!(m.authority, Some(S::Exact("web.demo:80".into())));
        assert_eq!(m.scheme, Some(S::Exact("http".into())));
        assert_eq!(m.port, Some(8080));
        assert_eq!(m.source_namespace.as_deref(), Some("shop"));
        assert_eq!(m.gateways, ["mesh"]);
        assert_eq!(
            m.without_headers,
            [
                ("x-any".into(), S::Present),
                ("x-canary".into(), S::Exact("1".into())),
                ("x-debug".into(), S::Present),
            ]
            .into()
        );
        assert_eq!(m.headers, [("x-user".into(), S::Present)].into());
        assert_eq!(m.query_params, [("beta".into(), S::Present)].into());
        // `{}` on the path accepts every path; port 0 is no port (protobuf's default).
        let (m, _) = read("{uri: {}, port: 0}");
        assert_eq!((m.uri, m.port), (Some(S::Present), None));
        // Accepted, warned, and narrowing: a match Istio would apply only elsewhere
        // (other gateways) or only to labelled callers meshfed cannot see.
        for (m, field) in [
            ("{gateways: [my-ingress]}", "spec.http[0].match[0].gateways"),
            (
                "{sourceLabels: {app: web}}",
                "spec.http[0].match[0].sourceLabels",
            ),
            ("{statPrefix: web}", "spec.http[0].match[0].statPrefix"),
        ] {
            let (_, w) = read(m);
            assert!(w.iter().any(|x| x.field == field), "{m}: {w:?}");
        }
        let p = parse(&vs("{gateways: [my-ingress]}"))
            .unwrap()
            .http_policies[0]
            .clone();
        assert_eq!(p.routes[0].matches[0].gateways, ["my-ingress"]);
        // Refused by path, as Istio refuses them.
        for (m, field) in [
            (
                "{headers: {x-a: {prefix: \"\"}}}",
                "spec.http[0].match[0].headers.x-a.prefix",
            ),
            (
                "{withoutHeaders: {x-a: {prefix: \"\"}}}",
                "spec.http[0].match[0].withoutHeaders.x-a.prefix",
            ),
            (
                "{authority: {prefix: \"\"}}",
                "spec.http[0].match[0].authority.prefix",
            ),
            (
                "{scheme: {regex: \"\"}}",
                "spec.http[0].match[0].scheme.regex",
            ),
            ("{uri: {regex: \"\"}}", "spec.http[0].match[0].uri.regex"),
            (
                "{headers: {x-a: {regex: \"*\"}}}",
                "spec.http[0].match[0].headers.x-a.regex",
            ),
            (
                "{headers: {\"x a\": {exact: b}}}",
                "spec.http[0].match[0].headers.x a",
            ),
            (
                "{headers: {\"@request.auth.claims.group\": {exact: b}}}",
                "spec.http[0].match[0].headers.@request.auth.claims.group",
            ),
            (
                "{headers: {x-a: {exatc: b}}}",
                "spec.http[0].match[0].headers.x-a",
            ),
            ("{port: 70000}", "spec.http[0].match[0].port"),
            ("{port: -1}", "spec.http[0].match[0].port"),
            (
                "{sourceNamespace: Shop}",
                "spec.http[0].match[0].sourceNamespace",
            ),
            (
                "{sourceNamespace: a.b}",
                "spec.http[0].match[0].sourceNamespace",
            ),
            (
                "{sourceLabels: {\"-x\": y}}",
                "spec.http[0].match[0].sourceLabels.-x",
            ),
            (
                "{ignoreUriCase: yes-please}",
                "spec.http[0].match[0].ignoreUriCase",
            ),
        ] {
            crate::test_support::assert_refused_at(&vs(m), field);
        }
        let long = format!("{{uri: {{regex: \"{}\"}}}}", "a".repeat(1025));
        crate::test_support::assert_refused_at(&vs(&long), "spec.http[0].match[0].uri.regex");
        let (m, _) = read(&format!("{{uri: {{regex: \"{}\"}}}}", "a".repeat(1024)));
        assert!(matches!(m.uri, Some(S::Regex(_))));
    }

    /// `rewrite.uriRegexRewrite`, as Istio's `validateHTTPRewrite` checks it, and as
    /// Envoy checks its rewrite string (RE2's `CheckRewriteString`).
    #[test]
    fn uri_regex_rewrites_are_read_and_checked() {
        let vs = |rewrite: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: demo}}\nspec:\n  hosts: [web]\n  http:\n  - rewrite: {rewrite}\n    route: [{{destination: {{host: web}}}}]\n"
            )
        };
        let r = parse(&vs(
            r#"{uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: "\\2/instance/\\1"}}"#,
        ))
        .unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let rw = r.http_policies[0].routes[0].rewrite.clone().unwrap();
        let c = rw.uri_regex.unwrap().compile("r").unwrap();
        assert_eq!(
            c.apply("/service/foo/v1/api").as_deref(),
            Some("/v1/api/instance/foo")
        );
        for (rewrite, field) in [
            (
                "{uri: /v2, uriRegexRewrite: {match: a, rewrite: b}}",
                "spec.http[0].rewrite",
            ),
            (
                "{uriRegexRewrite: {match: a}}",
                "spec.http[0].rewrite.uriRegexRewrite",
            ),
            (
                "{uriRegexRewrite: {match: \"(\", rewrite: b}}",
                "spec.http[0].rewrite.uriRegexRewrite.match",
            ),
            (
                "{uriRegexRewrite: {match: \"(a)\", rewrite: \"\\\\2\"}}",
                "spec.http[0].rewrite.uriRegexRewrite.rewrite",
            ),
        ] {
            crate::test_support::assert_refused_at(&vs(rewrite), field);
        }
    }

    /// Istio 1.27's retryBudget: read with its defaults, refused out of range by path.
    #[test]
    fn a_retry_budget_is_read_with_istios_defaults() {
        use meshfed_catalog::http_route::RetryBudget;
        let dr = |budget: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: demo}}\nspec:\n  host: web\n  trafficPolicy:\n    retryBudget: {budget}\n"
            )
        };
        for (budget, want) in [
            ("{}", (200_000, 3)),
            ("{percent: 25}", (250_000, 3)),
            ("{percent: 12.5, minRetryConcurrency: 10}", (125_000, 10)),
            ("{percent: {value: 0}, minRetryConcurrency: 0}", (0, 0)),
        ] {
            let r = parse(&dr(budget)).unwrap();
            assert!(r.warnings.is_empty(), "{budget}: {:?}", r.warnings);
            assert_eq!(
                r.http_policies[0].retry_budget,
                Some(RetryBudget {
                    per_million: want.0,
                    min_retry_concurrency: want.1
                }),
                "{budget}"
            );
        }
        for (budget, field) in [
            ("{percent: 101}", "spec.trafficPolicy.retryBudget.percent"),
            ("{percent: -1}", "spec.trafficPolicy.retryBudget.percent"),
            (
                "{minRetryConcurrency: -3}",
                "spec.trafficPolicy.retryBudget.minRetryConcurrency",
            ),
            ("[1]", "spec.trafficPolicy.retryBudget"),
        ] {
            match parse(&dr(budget)) {
                Err(ParseError::Invalid(p)) => assert_eq!(p[0].field, field, "{budget}"),
                other => panic!("{budget}: {other:?}"),
            }
        }
        // A subset's own: accepted as Istio accepts it, warned about by path.
        let subset = dr("{percent: 10}")
            + "  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      retryBudget: {percent: 50}\n";
        let r = parse(&subset).unwrap();
        let warned: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(warned, ["spec.subsets[0].trafficPolicy.retryBudget"]);
        assert_eq!(
            r.http_policies[0].retry_budget.unwrap().per_million,
            100_000
        );
    }

    /// A route's corsPolicy is read as Istio writes it, and refused where Istio's
    /// validation refuses it, by path.
    #[test]
    fn cors_policies_are_read_and_checked_as_istio_does() {
        use meshfed_catalog::cors::Cors;
        let cors = "    corsPolicy:\n      allowOrigins: [{exact: https://app.example.com}, {regex: \"https://.*\\\\.dev\\\\.example\\\\.com\"}]\n      allowOrigin: [https://old.example.com]\n      allowMethods: [GET, PUT]\n      allowHeaders: [x-custom]\n      exposeHeaders: [x-served-by]\n      maxAge: 24h\n      allowCredentials: true\n      unmatchedPreflights: IGNORE\n";
        let text = GOOD.replacen("    timeout: 3s\n", &format!("    timeout: 3s\n{cors}"), 1);
        let r = parse(&text).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let c = r.http_policies[0].routes[1].cors.as_deref().unwrap();
        assert_eq!(
            c,
            &Cors {
                allow_origins: vec![
                    StringMatch::Exact("https://app.example.com".into()),
                    StringMatch::Regex(r"https://.*\.dev\.example\.com".into()),
                    StringMatch::Exact("https://old.example.com".into()),
                ],
                allow_methods: vec!["GET".into(), "PUT".into()],
                allow_headers: vec!["x-custom".into()],
                expose_headers: vec!["x-served-by".into()],
                max_age_s: Some(86_400),
                allow_credentials: true,
                ignore_unmatched_preflights: true,
            }
        );
        for (from, to, field) in [
            (
                "allowMethods: [GET, PUT]",
                "allowMethods: [GET, FETCH]",
                "spec.http[1].corsPolicy.allowMethods[1]",
            ),
            (
                "maxAge: 24h",
                "maxAge: 1500ms",
                "spec.http[1].corsPolicy.maxAge",
            ),
            (
                "maxAge: 24h",
                "maxAge: soon",
                "spec.http[1].corsPolicy.maxAge",
            ),
            (
                "allowHeaders: [x-custom]",
                "allowHeaders: [\"x custom\"]",
                "spec.http[1].corsPolicy.allowHeaders[0]",
            ),
            (
                "{exact: https://app.example.com}",
                "{exact: \"\"}",
                "spec.http[1].corsPolicy.allowOrigins[0]",
            ),
            (
                "{regex: \"https://.*\\\\.dev\\\\.example\\\\.com\"}",
                "{regex: \"(\"}",
                "spec.http[1].corsPolicy.allowOrigins[1].regex",
            ),
            (
                "unmatchedPreflights: IGNORE",
                "unmatchedPreflights: DROP",
                "spec.http[1].corsPolicy.unmatchedPreflights",
            ),
            (
                "allowCredentials: true",
                "allowCredentials: yes please",
                "spec.http[1].corsPolicy.allowCredentials",
            ),
        ] {
            assert!(text.contains(from), "{from}");
            match parse(&text.replace(from, to)) {
                Err(ParseError::Invalid(p)) => assert_eq!(p[0].field, field, "{to}: {p:?}"),
                other => panic!("{to}: {other:?}"),
            }
        }
    }

    const EDGES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: demo
  annotations:
    ratelimit.meshfed.io/rate: 100/s
    ratelimit.meshfed.io/burst: "20"
    ratelimit.meshfed.io/route.old: 5/m
spec:
  hosts: [web]
  http:
  - name: old
    match: [{uri: {prefix: /old/}}]
    redirect: {uri: /new/, redirectCode: 308}
  - name: v2
    match: [{uri: {prefix: /v2/}}]
    rewrite: {uri: /, authority: web-v2.demo}
    headers:
      request: {set: {X-Env: prod}, add: {x-trace: a}, remove: [X-Debug]}
      response: {remove: [server]}
    route: [{destination: {host: web}}]
  - route:
    - destination: {host: web}
      headers:
        request: {set: {x-dest: main}}
        response: {add: {X-Served-By: main}}
"#;

    #[test]
    fn headers_rewrites_redirects_and_rate_limits_are_read() {
        use meshfed_catalog::http_route::RateLimit;
        let r = parse(EDGES).unwrap();
        let p = &r.http_policies[0];
        let old = &p.routes[0];
        let rd = old.redirect.as_ref().unwrap();
        assert_eq!((rd.uri.as_deref(), rd.code), (Some("/new/"), 308));
        assert!(old.destinations.is_empty());
        assert_eq!(
            old.rate_limit,
            Some(RateLimit {
                requests: 5,
                per_ms: 60_000,
                burst: 20
            })
        );
        let v2 = &p.routes[1];
        let rw = v2.rewrite.as_ref().unwrap();
        assert_eq!(
            (rw.uri.as_deref(), rw.authority.as_deref()),
            (Some("/"), Some("web-v2.demo"))
        );
        let h = v2.headers.as_ref().unwrap();
        assert_eq!(h.request.set["x-env"], "prod");
        assert_eq!(h.request.add["x-trace"], "a");
        assert_eq!(h.request.remove, vec!["x-debug".to_string()]);
        assert_eq!(h.response.remove, vec!["server".to_string()]);
        assert_eq!(
            v2.rate_limit,
            Some(RateLimit {
                requests: 100,
                per_ms: 1000,
                burst: 20
            })
        );
        assert_eq!(p.routes[2].rate_limit.unwrap().requests, 100);
        // A destination's own header changes are read, not warned about.
        let h = p.routes[2].destinations[0].headers.as_deref().unwrap();
        assert_eq!(
            (&h.request.set["x-dest"], &h.response.add["x-served-by"]),
            (&"main".to_string(), &"main".to_string())
        );
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn bad_headers_redirects_and_rate_limits_name_their_field() {
        for (from, to, field) in [
            (
                "redirect: {uri: /new/, redirectCode: 308}",
                "redirect: {uri: /new/, redirectCode: 200}",
                "spec.http[0].redirect.redirectCode",
            ),
            (
                "redirect: {uri: /new/, redirectCode: 308}",
                "redirect: {uri: /new/}\n    route: [{destination: {host: web}}]",
                "spec.http[0].redirect",
            ),
            (
                "set: {X-Env: prod}",
                "set: {Host: evil}",
                "spec.http[1].headers.request.set.host",
            ),
            (
                "set: {x-dest: main}",
                "set: {connection: close}",
                "spec.http[2].route[0].headers.request.set.connection",
            ),
            (
                "rewrite: {uri: /,",
                "rewrite: {uri: v2,",
                "spec.http[1].rewrite.uri",
            ),
            (
                "ratelimit.meshfed.io/rate: 100/s",
                "ratelimit.meshfed.io/rate: lots",
                "metadata.annotations.ratelimit.meshfed.io/rate",
            ),
            (
                "ratelimit.meshfed.io/route.old: 5/m",
                "ratelimit.meshfed.io/route.gone: 5/m",
                "metadata.annotations.ratelimit.meshfed.io/route.gone",
            ),
            (
                "ratelimit.meshfed.io/burst: \"20\"",
                "ratelimit.meshfed.io/bust: \"20\"",
                "metadata.annotations.ratelimit.meshfed.io/bust",
            ),
        ] {
            assert!(EDGES.contains(from), "{from}");
            let text = EDGES.replacen(from, to, 1);
            let Err(ParseError::Invalid(errs)) = parse(&text) else {
                panic!("{to}: accepted");
            };
            assert!(
                errs.iter().any(|e| e.field == field),
                "{to}: want {field}, got {errs:?}"
            );
        }
    }

    #[test]
    fn model_paths_read_as_yaml_paths() {
        for (m, y) in [
            ("routes[1].destinations", "spec.http[1].route"),
            (
                "routes[0].destinations[2].subset",
                "spec.http[0].route[2].subset",
            ),
            (
                "routes[3].matches[0].query_params.a.regex",
                "spec.http[3].match[0].queryParams.a.regex",
            ),
            ("routes", "spec.http"),
            (
                "routes[0].mirrors[2].service",
                "spec.http[0].mirrors[2].destination.host",
            ),
            (
                "routes[1].mirrors[0].per_million",
                "spec.http[1].mirrors[0].percentage",
            ),
            (
                "routes[1].mirrors[3].port",
                "spec.http[1].mirrors[3].destination.port.number",
            ),
        ] {
            assert_eq!(super::yaml_path(m), y);
        }
    }
}
