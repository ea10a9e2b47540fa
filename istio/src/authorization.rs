//! Istio `AuthorizationPolicy` (`security.istio.io/v1`, `v1beta1`), read as Istio
//! documents and validates it, into [`meshfed_catalog::authz`]'s model.
//!
//! What Istio refuses is refused here with the same rule and a field path: an empty
//! `from`, `to` or `source`, an empty value in a list, a condition without values, a
//! port that is not one, `targetRefs` beside `selector`. What meshfed cannot enforce
//! is refused too, never ignored, because ignoring a field of a rule makes it match
//! more than its author meant: `selector` (meshfed attaches policies to exported
//! services by namespace or `targetRefs`), request principals and IP blocks, `hosts`,
//! `methods` and `paths` (HTTP, with the traffic issue), conditions on other keys, and
//! the AUDIT and CUSTOM actions.

use serde_json::{Map, Value};

use meshfed_catalog::authz::{
    Action, AuthorizationPolicy, Condition, ConditionKey, Operation, Rule, Source,
};

use crate::service_entry::{Doc, Problem};

type Obj = Map<String, Value>;

/// Reads one policy's `spec`; `None` when it has errors (they are in `d`).
pub(crate) fn policy(
    d: &mut Doc<'_>,
    name: &str,
    namespace: &str,
    spec: &Obj,
) -> Option<AuthorizationPolicy> {
    let before = d.problem_count();
    d.unsupported(
        "spec",
        spec,
        &[
            "selector",
            "targetRef",
            "targetRefs",
            "action",
            "rules",
            "provider",
        ],
    );
    let action = match spec.get("action").and_then(Value::as_str) {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(a @ ("AUDIT" | "CUSTOM")) => {
            d.err(
                "spec.action",
                format!("{a} is not supported by meshfed: ALLOW or DENY"),
            );
            Action::Deny
        }
        Some(a) => {
            d.err(
                "spec.action",
                format!("{a:?} is not an action: ALLOW, DENY, AUDIT or CUSTOM"),
            );
            Action::Deny
        }
    };
    if spec.contains_key("provider")
        && !matches!(spec.get("action").and_then(Value::as_str), Some("CUSTOM"))
    {
        d.err(
            "spec.provider",
            "only valid with action CUSTOM (Istio refuses it too)",
        );
    }
    let targets = targets(d, spec);
    let mut rules = Vec::new();
    match spec.get("rules") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, r) in list.iter().enumerate() {
                if let Some(r) = rule(d, r, &format!("spec.rules[{i}]")) {
                    rules.push(r);
                }
            }
        }
        Some(_) => d.err("spec.rules", "must be a list"),
    }
    if d.problem_count() > before {
        return None;
    }
    Some(AuthorizationPolicy {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        action,
        targets,
        rules,
    })
}

/// `targetRef`/`targetRefs`: Services or ServiceEntries of the policy's namespace.
fn targets(d: &mut Doc<'_>, spec: &Obj) -> Vec<String> {
    if spec.contains_key("selector") {
        if spec.contains_key("targetRef") || spec.contains_key("targetRefs") {
            d.err(
                "spec.selector",
                "only one of targetRefs or selector can be set (Istio refuses both)",
            );
        } else {
            d.err(
                "spec.selector",
                "meshfed attaches policies to exported services, by namespace or targetRefs (kind Service or ServiceEntry); workload labels select nothing at a gateway",
            );
        }
    }
    let mut refs: Vec<(String, &Value)> = Vec::new();
    if let Some(r) = spec.get("targetRef") {
        refs.push(("spec.targetRef".into(), r));
    }
    match spec.get("targetRefs") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, r) in list.iter().enumerate() {
                refs.push((format!("spec.targetRefs[{i}]"), r));
            }
        }
        Some(_) => d.err("spec.targetRefs", "must be a list"),
    }
    let mut out = Vec::new();
    for (path, r) in refs {
        let Value::Object(m) = r else {
            d.err(&path, "must be a map");
            continue;
        };
        d.unsupported(&path, m, &["group", "kind", "name", "namespace"]);
        let group = m.get("group").and_then(Value::as_str).unwrap_or("");
        let kind = m.get("kind").and_then(Value::as_str).unwrap_or("");
        match (group, kind) {
            ("" | "core", "Service") | ("networking.istio.io", "ServiceEntry") => {}
            (g, k) => {
                d.err(
                    format!("{path}.kind"),
                    format!("{g}/{k}: meshfed attaches policies to Services and ServiceEntries"),
                );
                continue;
            }
        }
        if m.contains_key("namespace") {
            d.err(
                format!("{path}.namespace"),
                "cross-namespace policy attachment is not supported (Istio refuses it too)",
            );
        }
        match m.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => out.push(n.to_owned()),
            _ => d.err(format!("{path}.name"), "missing"),
        }
    }
    out
}

fn rule(d: &mut Doc<'_>, v: &Value, path: &str) -> Option<Rule> {
    let Value::Object(m) = v else {
        d.err(path, "must be a map");
        return None;
    };
    d.unsupported(path, m, &["from", "to", "when"]);
    let mut r = Rule::default();
    if let Some(list) = list(d, m.get("from"), &format!("{path}.from"))? {
        for (i, f) in list.iter().enumerate() {
            r.from.push(source(d, f, &format!("{path}.from[{i}]"))?);
        }
    }
    if let Some(list) = list(d, m.get("to"), &format!("{path}.to"))? {
        for (i, t) in list.iter().enumerate() {
            r.to.push(operation(d, t, &format!("{path}.to[{i}]"))?);
        }
    }
    match m.get("when") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, c) in list.iter().enumerate() {
                r.when.push(condition(d, c, &format!("{path}.when[{i}]"))?);
            }
        }
        Some(_) => {
            d.err(format!("{path}.when"), "must be a list");
            return None;
        }
    }
    Some(r)
}

/// A `from`/`to` list: absent is `Ok(None)`; present must be a non-empty list.
fn list<'v>(d: &mut Doc<'_>, v: Option<&'v Value>, path: &str) -> Option<Option<&'v Vec<Value>>> {
    match v {
        None | Some(Value::Null) => Some(None),
        Some(Value::Array(l)) if l.is_empty() => {
            d.err(path, "must not be empty (Istio refuses an empty list)");
            None
        }
        Some(Value::Array(l)) => Some(Some(l)),
        Some(_) => {
            d.err(path, "must be a list");
            None
        }
    }
}

/// Fields of `obj` at `at`: each of `refused` present is an error with `why` (meshfed
/// would match more than the rule says if it ignored one); any other key not in `known`
/// is an unsupported-field warning.
fn fields(d: &mut Doc<'_>, at: &str, obj: &Obj, known: &[&str], refused: &[&str], why: &str) {
    for k in refused {
        if obj.contains_key(*k) {
            d.err(format!("{at}.{k}"), why);
        }
    }
    let all: Vec<&str> = known.iter().chain(refused).copied().collect();
    d.unsupported(at, obj, &all);
}

fn source(d: &mut Doc<'_>, v: &Value, path: &str) -> Option<Source> {
    let src = inner(d, v, path, "source")?;
    let at = format!("{path}.source");
    fields(
        d,
        &at,
        src,
        &["principals", "notPrincipals", "namespaces", "notNamespaces"],
        &[
            "requestPrincipals",
            "notRequestPrincipals",
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
        ],
        "not supported by meshfed: a gateway authorizes by SPIFFE identity (principals, namespaces)",
    );
    let s = Source {
        principals: values(d, src.get("principals"), &format!("{at}.principals")),
        not_principals: values(d, src.get("notPrincipals"), &format!("{at}.notPrincipals")),
        namespaces: values(d, src.get("namespaces"), &format!("{at}.namespaces")),
        not_namespaces: values(d, src.get("notNamespaces"), &format!("{at}.notNamespaces")),
    };
    if src.is_empty() {
        d.err(&at, "must not be empty (Istio refuses an empty source)");
        return None;
    }
    Some(s)
}

fn operation(d: &mut Doc<'_>, v: &Value, path: &str) -> Option<Operation> {
    let op = inner(d, v, path, "operation")?;
    let at = format!("{path}.operation");
    fields(
        d,
        &at,
        op,
        &["ports", "notPorts"],
        &[
            "hosts",
            "notHosts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
        ],
        "not supported by meshfed yet: HTTP attributes need protocol-aware ports",
    );
    if op.is_empty() {
        d.err(&at, "must not be empty (Istio refuses an empty operation)");
        return None;
    }
    Some(Operation {
        ports: ports(d, op.get("ports"), &format!("{at}.ports")),
        not_ports: ports(d, op.get("notPorts"), &format!("{at}.notPorts")),
    })
}

fn condition(d: &mut Doc<'_>, v: &Value, path: &str) -> Option<Condition> {
    let Value::Object(m) = v else {
        d.err(path, "must be a map");
        return None;
    };
    d.unsupported(path, m, &["key", "values", "notValues"]);
    let key = match m.get("key").and_then(Value::as_str) {
        None | Some("") => {
            d.err(format!("{path}.key"), "must not be empty");
            return None;
        }
        Some("source.principal") => ConditionKey::SourcePrincipal,
        Some("source.namespace") => ConditionKey::SourceNamespace,
        Some(k) => {
            d.err(
                format!("{path}.key"),
                format!("{k:?} is not supported by meshfed: source.principal or source.namespace"),
            );
            return None;
        }
    };
    let c = Condition {
        key,
        values: values(d, m.get("values"), &format!("{path}.values")),
        not_values: values(d, m.get("notValues"), &format!("{path}.notValues")),
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        d.err(
            path,
            "at least one of values or notValues must be set (Istio refuses it too)",
        );
        return None;
    }
    Some(c)
}

/// `from[i].source` / `to[i].operation`: a map that must be there.
fn inner<'v>(d: &mut Doc<'_>, v: &'v Value, path: &str, key: &str) -> Option<&'v Obj> {
    let Value::Object(m) = v else {
        d.err(path, "must be a map");
        return None;
    };
    d.unsupported(path, m, &[key]);
    match m.get(key) {
        Some(Value::Object(o)) => Some(o),
        None | Some(Value::Null) => {
            d.err(
                format!("{path}.{key}"),
                "must not be nil (Istio refuses it too)",
            );
            None
        }
        Some(_) => {
            d.err(format!("{path}.{key}"), "must be a map");
            None
        }
    }
}

/// A list of match values: no empty value (Istio), and `*` only at one end (meshfed
/// matches exact, prefix, suffix or presence, as Istio does).
fn values(d: &mut Doc<'_>, v: Option<&Value>, path: &str) -> Vec<String> {
    let list = d.str_list(v, path);
    for (i, s) in list.iter().enumerate() {
        if s.is_empty() {
            d.err(
                format!("{path}[{i}]"),
                "empty value not allowed (Istio refuses it too)",
            );
        } else if between_ends(s).contains('*') {
            d.err(
                format!("{path}[{i}]"),
                format!("{s:?}: `*` may only start or end a value"),
            );
        }
    }
    list
}

/// `s` without its first and last characters (by character: a value may start with
/// any UTF-8).
fn between_ends(s: &str) -> &str {
    let mut c = s.chars();
    c.next();
    c.next_back();
    c.as_str()
}

/// Istio writes ports as strings (`"8080"`); numbers are taken too.
fn ports(d: &mut Doc<'_>, v: Option<&Value>, path: &str) -> Vec<u16> {
    let Some(v) = v else { return vec![] };
    let Value::Array(list) = v else {
        d.err(path, "must be a list of ports");
        return vec![];
    };
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let n = match p {
            Value::String(s) => s.parse::<u16>().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        };
        match n {
            Some(n @ 1..) => out.push(n),
            _ => d.err(
                format!("{path}[{i}]"),
                format!("{p} is not a port (1–65535)"),
            ),
        }
    }
    out
}

/// A policy defined twice (namespace and name) in one file is an error on its second
/// definition; the rest are returned.
pub(crate) fn refuse_duplicates(
    policies: Vec<(usize, AuthorizationPolicy)>,
    problems: &mut Vec<Problem>,
) -> Vec<AuthorizationPolicy> {
    let mut seen = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for (doc, p) in policies {
        if let Some(first) = seen.insert(p.key(), doc) {
            problems.push(Problem {
                doc,
                object: format!("AuthorizationPolicy/{}", p.name),
                field: "metadata.name".into(),
                message: format!(
                    "{} is defined twice in this file (first in document {first})",
                    p.key()
                ),
            });
        } else {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::service_entry::{ParseError, parse};
    use meshfed_catalog::authz::{Action, ConditionKey};

    fn doc(spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
        )
    }

    fn problems(text: &str) -> Vec<(String, String)> {
        match parse(text) {
            Err(ParseError::Invalid(ps)) => ps.into_iter().map(|p| (p.field, p.message)).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn a_policy_as_istio_documents_it() {
        let r = parse(&doc(
            "  action: DENY\n  targetRefs: [{kind: Service, group: \"\", name: orders}]\n  rules:\n  - from:\n    - source:\n        principals: [\"east.example.org/ns/batch/*\"]\n        notNamespaces: [shop]\n    to:\n    - operation:\n        ports: [\"8080\", 9090]\n    when:\n    - key: source.namespace\n      values: [batch]\n",
        ))
        .unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = &r.policies[0];
        assert_eq!((p.name.as_str(), p.namespace.as_str()), ("p", "shop"));
        assert_eq!(p.action, Action::Deny);
        assert_eq!(p.targets, vec!["orders".to_string()]);
        let rule = &p.rules[0];
        assert_eq!(rule.from[0].principals, vec!["east.example.org/ns/batch/*"]);
        assert_eq!(rule.from[0].not_namespaces, vec!["shop"]);
        assert_eq!(rule.to[0].ports, vec![8080, 9090]);
        assert_eq!(rule.when[0].key, ConditionKey::SourceNamespace);

        // `spec: {}` is Istio's allow-nothing.
        let r = parse(&doc("  {}\n")).unwrap();
        assert_eq!(r.policies[0].action, Action::Allow);
        assert!(r.policies[0].rules.is_empty());
        // v1beta1 too, beside a ServiceEntry in one file.
        let text = format!(
            "{}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: orders, namespace: shop}}\nspec:\n  hosts: [orders.example]\n  ports: [{{number: 80, name: http, protocol: TCP}}]\n  resolution: STATIC\n  endpoints: [{{address: 10.0.0.1}}]\n",
            doc("  action: ALLOW\n  rules: [{}]\n")
                .replace("security.istio.io/v1", "security.istio.io/v1beta1")
        );
        let r = parse(&text).unwrap();
        assert_eq!((r.policies.len(), r.services.len()), (1, 1));
    }

    /// Found by the istio_yaml fuzz target: a value starting with a multi-byte
    /// character panicked (the check sliced it by bytes). Now a value is checked by
    /// character.
    #[test]
    fn values_of_any_utf8_are_checked_by_character() {
        let src = |v: &str| {
            doc(&format!(
                "  rules:\n  - from:\n    - source:\n        principals: [\"{v}\"]\n"
            ))
        };
        for ok in [
            "\u{794}ast.example.org/ns/shop/sa/frontend",
            "\u{794}*",
            "*\u{794}",
            "\u{794}",
            "é",
        ] {
            parse(&src(ok)).unwrap_or_else(|e| panic!("{ok:?}: {e:?}"));
        }
        let e = problems(&src("\u{794}a*b\u{794}"));
        assert_eq!(
            e[0].0, "spec.rules[0].from[0].source.principals[0]",
            "{e:?}"
        );
        // `*` between two-byte characters is inside the value: refused.
        let e = problems(&src("é*é"));
        assert!(e[0].1.contains("may only start or end"), "{e:?}");
    }

    #[test]
    fn what_istio_refuses_is_refused_with_its_field() {
        // (spec, field, words in the message)
        let rows = [
            ("  action: LOG\n", "spec.action", "not an action"),
            (
                "  action: CUSTOM\n  provider: {name: ext}\n",
                "spec.action",
                "CUSTOM is not supported",
            ),
            (
                "  provider: {name: ext}\n",
                "spec.provider",
                "only valid with action CUSTOM",
            ),
            (
                "  rules:\n  - from: []\n",
                "spec.rules[0].from",
                "must not be empty",
            ),
            (
                "  rules:\n  - to: []\n",
                "spec.rules[0].to",
                "must not be empty",
            ),
            (
                "  rules:\n  - from:\n    - {}\n",
                "spec.rules[0].from[0].source",
                "must not be nil",
            ),
            (
                "  rules:\n  - from:\n    - source: {}\n",
                "spec.rules[0].from[0].source",
                "must not be empty",
            ),
            (
                "  rules:\n  - to:\n    - operation: {}\n",
                "spec.rules[0].to[0].operation",
                "must not be empty",
            ),
            (
                "  rules:\n  - from:\n    - source: {principals: [\"\"]}\n",
                "spec.rules[0].from[0].source.principals[0]",
                "empty value",
            ),
            (
                "  rules:\n  - from:\n    - source: {principals: [\"a*b\"]}\n",
                "spec.rules[0].from[0].source.principals[0]",
                "only start or end",
            ),
            (
                "  rules:\n  - to:\n    - operation: {ports: [\"http\"]}\n",
                "spec.rules[0].to[0].operation.ports[0]",
                "not a port",
            ),
            (
                "  rules:\n  - to:\n    - operation: {ports: [\"0\"]}\n",
                "spec.rules[0].to[0].operation.ports[0]",
                "not a port",
            ),
            (
                "  rules:\n  - when:\n    - key: source.namespace\n",
                "spec.rules[0].when[0]",
                "values or notValues",
            ),
            (
                "  rules:\n  - when:\n    - {key: \"\", values: [a]}\n",
                "spec.rules[0].when[0].key",
                "must not be empty",
            ),
            (
                "  selector: {matchLabels: {app: orders}}\n  targetRefs: [{kind: Service, name: orders}]\n",
                "spec.selector",
                "only one of targetRefs or selector",
            ),
            (
                "  targetRefs: [{kind: Service, name: orders, namespace: other}]\n",
                "spec.targetRefs[0].namespace",
                "cross-namespace",
            ),
            // What meshfed cannot enforce is refused, never ignored.
            (
                "  selector: {matchLabels: {app: orders}}\n",
                "spec.selector",
                "targetRefs",
            ),
            (
                "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
                "spec.targetRefs[0].kind",
                "Services and ServiceEntries",
            ),
            (
                "  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8]}\n",
                "spec.rules[0].from[0].source.ipBlocks",
                "SPIFFE identity",
            ),
            (
                "  rules:\n  - to:\n    - operation: {methods: [GET]}\n",
                "spec.rules[0].to[0].operation.methods",
                "HTTP",
            ),
            (
                "  rules:\n  - when:\n    - {key: \"request.headers[x]\", values: [a]}\n",
                "spec.rules[0].when[0].key",
                "source.principal or source.namespace",
            ),
        ];
        for (spec, field, words) in rows {
            let ps = problems(&doc(spec));
            assert!(
                ps.iter().any(|(f, m)| f == field && m.contains(words)),
                "{spec:?}: want {field}: …{words}…, got {ps:?}"
            );
        }
        let ps = problems(
            &doc("  action: DENY\n").replace("security.istio.io/v1", "networking.istio.io/v1"),
        );
        assert_eq!(ps[0].0, "apiVersion");
        let twice = format!("{}\n---\n{}", doc("  {}\n"), doc("  {}\n"));
        let ps = problems(&twice);
        assert!(ps[0].1.contains("defined twice"), "{ps:?}");
    }
}
