//! Authorization of a caller at the ingress, with Istio's `AuthorizationPolicy`
//! semantics: the policies that apply to an exported service are its namespace's (all
//! of them, or those whose `targetRefs` name it) and the root namespace's; DENY policies
//! are evaluated first and any match denies; then, if any ALLOW policy applies, one of
//! its rules must match, or the call is denied. A rule matches when all of its `from`,
//! `to` and `when` parts match; within a part, any listed entry may match.
//!
//! The caller is a SPIFFE ID. Istio writes principals without the scheme
//! (`<trust domain>/ns/<ns>/sa/<sa>`); a value may start or end with `*` (prefix or
//! suffix match), and `*` alone matches any caller that has an identity. A caller's
//! namespace is the `ns` segment of its ID's path, when it has one.
//!
//! Pure: the model the `istio` parser produces, and [`decide`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::ServiceName;

/// Istio's default root namespace: its policies apply to every exported service.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
}

/// One `AuthorizationPolicy`, as registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    /// `targetRefs` (Service or ServiceEntry) by name, in the policy's namespace; empty:
    /// every exported service of the namespace.
    #[serde(default)]
    pub targets: Vec<String>,
    /// No rules: an ALLOW policy allows nothing (it denies every call to what it
    /// applies to); a DENY policy denies nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// All parts must match; an empty part matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Operation>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `from[].source`: every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
}

/// `to[].operation`: every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionKey {
    #[serde(rename = "source.principal")]
    SourcePrincipal,
    #[serde(rename = "source.namespace")]
    SourceNamespace,
}

/// `when[]`: the key's value must be one of `values` (when set) and none of
/// `not_values`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub key: ConditionKey,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// What is asked: who calls which service on which port.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub service: &'a ServiceName,
    /// The caller's SPIFFE ID (`spiffe://...`), when known.
    pub caller: Option<&'a str>,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` (`namespace/name`) denied it, or, for `policy: None`, ALLOW policies
    /// apply and none matched (`allow_policies` names them).
    Deny {
        policy: Option<String>,
        allow_policies: Vec<String>,
    },
}

impl AuthorizationPolicy {
    /// `namespace/name`, as logs and metrics name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether it applies to `service`.
    pub fn applies_to(&self, service: &ServiceName) -> bool {
        self.namespace == ROOT_NAMESPACE
            || (self.namespace == service.namespace()
                && (self.targets.is_empty() || self.targets.iter().any(|t| t == service.name())))
    }

    fn matches(&self, r: &Request<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(r))
    }
}

impl Rule {
    fn matches(&self, r: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r)))
            && self.when.iter().all(|c| c.matches(r))
    }
}

impl Source {
    fn matches(&self, r: &Request<'_>) -> bool {
        let principal = r.caller.map(principal);
        let namespace = r.caller.and_then(namespace);
        listed(&self.principals, principal)
            && unlisted(&self.not_principals, principal)
            && listed(&self.namespaces, namespace)
            && unlisted(&self.not_namespaces, namespace)
    }
}

impl Operation {
    fn matches(&self, r: &Request<'_>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&r.port)) && !self.not_ports.contains(&r.port)
    }
}

impl Condition {
    fn matches(&self, r: &Request<'_>) -> bool {
        let value = match self.key {
            ConditionKey::SourcePrincipal => r.caller.map(principal),
            ConditionKey::SourceNamespace => r.caller.and_then(namespace),
        };
        listed(&self.values, value) && unlisted(&self.not_values, value)
    }
}

/// An empty list is not set: it matches. A set list needs a value that one entry
/// matches.
fn listed(patterns: &[String], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| matches(p, v)))
}

/// No entry of a set `not` list may match; a caller without the value matches none.
fn unlisted(patterns: &[String], value: Option<&str>) -> bool {
    !value.is_some_and(|v| patterns.iter().any(|p| matches(p, v)))
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (anything present).
pub fn matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// The principal of a SPIFFE ID as Istio writes it: without `spiffe://`.
fn principal(id: &str) -> &str {
    id.strip_prefix("spiffe://").unwrap_or(id)
}

/// The `ns` segment of a SPIFFE ID's path (`.../ns/<ns>/...`).
pub(crate) fn namespace(id: &str) -> Option<&str> {
    let path = principal(id).split_once('/')?.1;
    let mut segs = path.split('/');
    while let Some(s) = segs.next() {
        if s == "ns" {
            return segs.next().filter(|n| !n.is_empty());
        }
    }
    None
}

/// At most this many ALLOW policies are named in a denial (its message and log line).
pub const MAX_NAMED: usize = 8;

/// Istio's evaluation: any matching DENY denies; then, when ALLOW policies apply, one of
/// them must match. Policies that do not apply to the service are skipped. The first
/// matching DENY (in order) is the one named; a denial for want of an ALLOW names the
/// first [`MAX_NAMED`] ALLOW policies that apply. The reference for [`PolicyIndex`].
pub fn decide(policies: &[AuthorizationPolicy], r: &Request<'_>) -> Decision {
    let applying = policies.iter().filter(|p| p.applies_to(r.service));
    let mut allows = Vec::new();
    for p in applying {
        match p.action {
            Action::Deny if p.matches(r) => {
                return Decision::Deny {
                    policy: Some(p.key()),
                    allow_policies: vec![],
                };
            }
            Action::Deny => {}
            Action::Allow => allows.push(p),
        }
    }
    if allows.is_empty() || allows.iter().any(|p| p.matches(r)) {
        Decision::Allow
    } else {
        Decision::Deny {
            policy: None,
            allow_policies: allows.iter().take(MAX_NAMED).map(|p| p.key()).collect(),
        }
    }
}

/// Policies compiled for the ingress's per-open decision: [`decide`]'s answer without
/// scanning every policy. A policy whose every rule names callers by exact principals
/// only (the common `from.source.principals` list) is found by the caller's principal
/// in a hash map; the others (wildcards, namespaces, ports, `when`, no rules) are
/// evaluated in full, as [`decide`] does. Per namespace (the service's, and the root
/// namespace's, which applies everywhere). Pure; equal to [`decide`] by a property
/// test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyIndex {
    policies: Vec<AuthorizationPolicy>,
    by_ns: BTreeMap<String, NsIndex>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NsIndex {
    deny: ActionIndex,
    allow: ActionIndex,
}

/// One action's policies of one namespace, by position in `PolicyIndex::policies`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ActionIndex {
    by_principal: std::collections::HashMap<String, Vec<usize>>,
    /// Evaluated in full.
    other: Vec<usize>,
    /// Every one, in order (which to name in a denial).
    all: Vec<usize>,
    /// Whether one has no `targetRefs` (applies to every service of the namespace),
    /// and the targets of the others: whether any applies, without a scan.
    untargeted: bool,
    targets: std::collections::HashSet<String>,
}

impl AuthorizationPolicy {
    /// The exact principals that are the whole of its rules, when they are: it matches
    /// a caller exactly when its principal is one of them.
    fn exact_principals(&self) -> Option<Vec<&str>> {
        let mut out = Vec::new();
        if self.rules.is_empty() {
            return None;
        }
        for rule in &self.rules {
            if rule.from.is_empty() || !rule.to.is_empty() || !rule.when.is_empty() {
                return None;
            }
            for s in &rule.from {
                let plain = s.not_principals.is_empty()
                    && s.namespaces.is_empty()
                    && s.not_namespaces.is_empty()
                    && !s.principals.is_empty()
                    && s.principals.iter().all(|p| !p.contains('*'));
                if !plain {
                    return None;
                }
                out.extend(s.principals.iter().map(String::as_str));
            }
        }
        Some(out)
    }
}

impl PolicyIndex {
    pub fn new(policies: Vec<AuthorizationPolicy>) -> Self {
        let mut by_ns: BTreeMap<String, NsIndex> = BTreeMap::new();
        for (i, p) in policies.iter().enumerate() {
            let ns = by_ns.entry(p.namespace.clone()).or_default();
            let a = match p.action {
                Action::Deny => &mut ns.deny,
                Action::Allow => &mut ns.allow,
            };
            a.all.push(i);
            if p.targets.is_empty() {
                a.untargeted = true;
            }
            a.targets.extend(p.targets.iter().cloned());
            match p.exact_principals() {
                Some(principals) => {
                    for pr in principals {
                        let v = a.by_principal.entry(pr.to_owned()).or_default();
                        if v.last() != Some(&i) {
                            v.push(i);
                        }
                    }
                }
                None => a.other.push(i),
            }
        }
        Self { policies, by_ns }
    }

    pub fn policies(&self) -> &[AuthorizationPolicy] {
        &self.policies
    }

    fn namespaces<'a>(&'a self, service: &'a ServiceName) -> impl Iterator<Item = &'a NsIndex> {
        let own = service.namespace();
        let root = (own != ROOT_NAMESPACE).then_some(ROOT_NAMESPACE);
        [Some(own), root]
            .into_iter()
            .flatten()
            .filter_map(|ns| self.by_ns.get(ns))
    }

    /// The first policy (in order) of `pick`'s kind that applies and matches.
    fn first_match(&self, r: &Request<'_>, pick: fn(&NsIndex) -> &ActionIndex) -> Option<usize> {
        let principal = r.caller.map(principal);
        let mut best: Option<usize> = None;
        for ns in self.namespaces(r.service) {
            let a = pick(ns);
            let exact = principal
                .and_then(|p| a.by_principal.get(p))
                .into_iter()
                .flatten();
            for &i in exact.chain(&a.other) {
                if best.is_some_and(|b| b <= i) {
                    continue;
                }
                let p = &self.policies[i];
                if p.applies_to(r.service) && p.matches(r) {
                    best = Some(i);
                }
            }
        }
        best
    }

    /// [`decide`], through the index.
    pub fn decide(&self, r: &Request<'_>) -> Decision {
        if let Some(i) = self.first_match(r, |n| &n.deny) {
            return Decision::Deny {
                policy: Some(self.policies[i].key()),
                allow_policies: vec![],
            };
        }
        let name = r.service.name();
        let any_applies = self.namespaces(r.service).any(|n| {
            !n.allow.all.is_empty()
                && (n.allow.untargeted
                    || n.allow.targets.contains(name)
                    || self.policies[n.allow.all[0]].namespace == ROOT_NAMESPACE)
        });
        if !any_applies || self.first_match(r, |n| &n.allow).is_some() {
            return Decision::Allow;
        }
        // Named: the first MAX_NAMED that apply, in order (each list is in order).
        let mut named: Vec<usize> = Vec::new();
        for n in self.namespaces(r.service) {
            named.extend(
                n.allow
                    .all
                    .iter()
                    .copied()
                    .filter(|&i| self.policies[i].applies_to(r.service))
                    .take(MAX_NAMED),
            );
        }
        named.sort_unstable();
        Decision::Deny {
            policy: None,
            allow_policies: named
                .into_iter()
                .take(MAX_NAMED)
                .map(|i| self.policies[i].key())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRONTEND: &str = "spiffe://east.example.org/ns/shop/sa/frontend";
    const BATCH: &str = "spiffe://east.example.org/ns/batch/sa/report";
    const GATEWAY: &str = "spiffe://west.example.org/meshfed/site/west/gateway";

    fn policy(ns: &str, name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
        AuthorizationPolicy {
            name: name.into(),
            namespace: ns.into(),
            action,
            targets: vec![],
            rules,
        }
    }

    fn from(principals: &[&str], namespaces: &[&str]) -> Rule {
        Rule {
            from: vec![Source {
                principals: principals.iter().map(|s| (*s).to_owned()).collect(),
                namespaces: namespaces.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn ask(ps: &[AuthorizationPolicy], svc: &str, caller: Option<&str>, port: u16) -> Decision {
        let service: ServiceName = svc.parse().unwrap();
        let r = Request {
            service: &service,
            caller,
            port,
        };
        let linear = decide(ps, &r);
        // Every table row checks the index too.
        assert_eq!(
            PolicyIndex::new(ps.to_vec()).decide(&r),
            linear,
            "index and decide differ"
        );
        linear
    }

    fn denied_by(p: &str) -> Decision {
        Decision::Deny {
            policy: Some(p.into()),
            allow_policies: vec![],
        }
    }

    #[test]
    fn istio_evaluation_order() {
        let allow_frontend = policy(
            "shop",
            "allow-frontend",
            Action::Allow,
            vec![from(&["east.example.org/ns/shop/sa/frontend"], &[])],
        );
        let deny_batch = policy(
            "shop",
            "deny-batch",
            Action::Deny,
            vec![from(&[], &["batch"])],
        );
        let allow_nothing = policy("shop", "allow-nothing", Action::Allow, vec![]);
        let deny_nothing = policy("shop", "deny-nothing", Action::Deny, vec![]);
        let deny_all_8080 = policy(
            "shop",
            "deny-8080",
            Action::Deny,
            vec![Rule {
                to: vec![Operation {
                    ports: vec![8080],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let no_allow = |ps: &[&AuthorizationPolicy]| Decision::Deny {
            policy: None,
            allow_policies: ps.iter().map(|p| p.key()).collect(),
        };
        // (policies, caller, port, decision)
        let rows: Vec<(Vec<AuthorizationPolicy>, Option<&str>, u16, Decision)> = vec![
            (vec![], Some(FRONTEND), 80, Decision::Allow),
            (vec![], None, 80, Decision::Allow),
            (
                vec![allow_frontend.clone()],
                Some(FRONTEND),
                80,
                Decision::Allow,
            ),
            (
                vec![allow_frontend.clone()],
                Some(BATCH),
                80,
                no_allow(&[&allow_frontend]),
            ),
            (
                vec![allow_frontend.clone()],
                None,
                80,
                no_allow(&[&allow_frontend]),
            ),
            // DENY first, whatever ALLOW says.
            (
                vec![allow_frontend.clone(), deny_batch.clone()],
                Some(BATCH),
                80,
                denied_by("shop/deny-batch"),
            ),
            (
                vec![deny_batch.clone()],
                Some(FRONTEND),
                80,
                Decision::Allow,
            ),
            (vec![deny_batch.clone()], Some(GATEWAY), 80, Decision::Allow),
            (
                vec![allow_nothing.clone()],
                Some(FRONTEND),
                80,
                no_allow(&[&allow_nothing]),
            ),
            (vec![deny_nothing.clone()], Some(BATCH), 80, Decision::Allow),
            (
                vec![deny_all_8080.clone()],
                Some(FRONTEND),
                8080,
                denied_by("shop/deny-8080"),
            ),
            (
                vec![deny_all_8080.clone()],
                Some(FRONTEND),
                80,
                Decision::Allow,
            ),
        ];
        for (i, (ps, caller, port, want)) in rows.into_iter().enumerate() {
            assert_eq!(ask(&ps, "orders.shop", caller, port), want, "row {i}");
        }
    }

    #[test]
    fn which_policies_apply() {
        let mut targeted = policy(
            "shop",
            "orders-only",
            Action::Allow,
            vec![from(&[], &["shop"])],
        );
        targeted.targets = vec!["orders".into()];
        let other_ns = policy("billing", "allow-nothing", Action::Allow, vec![]);
        let root = policy(
            ROOT_NAMESPACE,
            "deny-batch",
            Action::Deny,
            vec![from(&[], &["batch"])],
        );
        let ps = vec![targeted, other_ns, root];
        assert_eq!(ask(&ps, "orders.shop", Some(FRONTEND), 80), Decision::Allow);
        // Targeted at orders: carts has no ALLOW policy.
        assert_eq!(ask(&ps, "carts.shop", Some(GATEWAY), 80), Decision::Allow);
        assert_eq!(
            ask(&ps, "orders.shop", Some(GATEWAY), 80),
            Decision::Deny {
                policy: None,
                allow_policies: vec!["shop/orders-only".into()]
            }
        );
        // The root namespace's policy applies everywhere.
        assert_eq!(
            ask(&ps, "carts.shop", Some(BATCH), 80),
            denied_by("istio-system/deny-batch")
        );
        assert_eq!(
            ask(&ps, "ledger.billing", Some(FRONTEND), 80),
            Decision::Deny {
                policy: None,
                allow_policies: vec!["billing/allow-nothing".into()]
            }
        );
    }

    #[test]
    fn sources_operations_and_conditions() {
        let src = |s: Source| Rule {
            from: vec![s],
            ..Default::default()
        };
        let when = |c: Condition| Rule {
            when: vec![c],
            ..Default::default()
        };
        let allow = |r: Rule| vec![policy("shop", "p", Action::Allow, vec![r])];
        let strs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // (rule, caller, port, allowed)
        let rows: Vec<(Rule, Option<&str>, u16, bool)> = vec![
            (
                src(Source {
                    principals: strs(&["*"]),
                    ..Default::default()
                }),
                Some(BATCH),
                80,
                true,
            ),
            (
                src(Source {
                    principals: strs(&["*"]),
                    ..Default::default()
                }),
                None,
                80,
                false,
            ),
            (
                src(Source {
                    principals: strs(&["east.example.org/*"]),
                    ..Default::default()
                }),
                Some(FRONTEND),
                80,
                true,
            ),
            (
                src(Source {
                    principals: strs(&["east.example.org/*"]),
                    ..Default::default()
                }),
                Some(GATEWAY),
                80,
                false,
            ),
            (
                src(Source {
                    principals: strs(&["*/sa/frontend"]),
                    ..Default::default()
                }),
                Some(FRONTEND),
                80,
                true,
            ),
            (
                src(Source {
                    not_principals: strs(&["*/sa/frontend"]),
                    ..Default::default()
                }),
                Some(FRONTEND),
                80,
                false,
            ),
            (
                src(Source {
                    not_principals: strs(&["*/sa/frontend"]),
                    ..Default::default()
                }),
                Some(BATCH),
                80,
                true,
            ),
            // No identity: a `not` list cannot exclude it.
            (
                src(Source {
                    not_principals: strs(&["*"]),
                    ..Default::default()
                }),
                None,
                80,
                true,
            ),
            (
                src(Source {
                    namespaces: strs(&["shop"]),
                    ..Default::default()
                }),
                Some(FRONTEND),
                80,
                true,
            ),
            // A gateway's ID has no namespace.
            (
                src(Source {
                    namespaces: strs(&["*"]),
                    ..Default::default()
                }),
                Some(GATEWAY),
                80,
                false,
            ),
            (
                src(Source {
                    not_namespaces: strs(&["batch"]),
                    ..Default::default()
                }),
                Some(GATEWAY),
                80,
                true,
            ),
            (
                src(Source {
                    principals: strs(&["east.example.org/*"]),
                    not_namespaces: strs(&["batch"]),
                    ..Default::default()
                }),
                Some(BATCH),
                80,
                false,
            ),
            (
                Rule {
                    to: vec![Operation {
                        not_ports: vec![22],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                Some(BATCH),
                22,
                false,
            ),
            (
                Rule {
                    to: vec![Operation {
                        not_ports: vec![22],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                Some(BATCH),
                23,
                true,
            ),
            (
                when(Condition {
                    key: ConditionKey::SourceNamespace,
                    values: strs(&["shop"]),
                    not_values: vec![],
                }),
                Some(FRONTEND),
                80,
                true,
            ),
            (
                when(Condition {
                    key: ConditionKey::SourceNamespace,
                    values: vec![],
                    not_values: strs(&["shop"]),
                }),
                Some(FRONTEND),
                80,
                false,
            ),
            (
                when(Condition {
                    key: ConditionKey::SourcePrincipal,
                    values: strs(&["*/sa/report"]),
                    not_values: vec![],
                }),
                Some(BATCH),
                80,
                true,
            ),
            (
                when(Condition {
                    key: ConditionKey::SourcePrincipal,
                    values: strs(&["*/sa/report"]),
                    not_values: vec![],
                }),
                Some(FRONTEND),
                80,
                false,
            ),
            // Two sources: either may match.
            (
                Rule {
                    from: vec![
                        Source {
                            namespaces: strs(&["batch"]),
                            ..Default::default()
                        },
                        Source {
                            principals: strs(&["*/sa/frontend"]),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                Some(FRONTEND),
                80,
                true,
            ),
            // from and to must both match.
            (
                Rule {
                    from: vec![Source {
                        namespaces: strs(&["shop"]),
                        ..Default::default()
                    }],
                    to: vec![Operation {
                        ports: vec![443],
                        ..Default::default()
                    }],
                    when: vec![],
                },
                Some(FRONTEND),
                80,
                false,
            ),
            (Rule::default(), None, 80, true),
        ];
        for (i, (rule, caller, port, allowed)) in rows.into_iter().enumerate() {
            let got = ask(&allow(rule), "orders.shop", caller, port) == Decision::Allow;
            assert_eq!(got, allowed, "row {i}");
        }
    }

    #[test]
    fn string_matches_are_istios() {
        for (p, v, want) in [
            ("a/b", "a/b", true),
            ("a/b", "a/bc", false),
            ("a/*", "a/bc", true),
            ("*/c", "a/b/c", true),
            ("*", "", true),
            ("a*", "b", false),
        ] {
            assert_eq!(matches(p, v), want, "{p} vs {v}");
        }
        assert_eq!(namespace(FRONTEND), Some("shop"));
        assert_eq!(namespace(GATEWAY), None);
        assert_eq!(namespace("spiffe://td/ns/"), None);
    }

    mod index_equals_decide {
        use super::*;
        use proptest::prelude::*;

        const PRINCIPALS: &[&str] = &[
            "east.example.org/ns/shop/sa/frontend",
            "east.example.org/ns/shop/sa/web",
            "east.example.org/ns/batch/sa/report",
            "east.example.org/ns/*",
            "*/sa/web",
            "*",
        ];
        const NAMESPACES: &[&str] = &["shop", "batch", "sh*"];
        const CALLERS: &[Option<&str>] = &[
            Some("spiffe://east.example.org/ns/shop/sa/frontend"),
            Some("spiffe://east.example.org/ns/shop/sa/web"),
            Some("spiffe://east.example.org/ns/batch/sa/report"),
            Some("spiffe://west.example.org/meshfed/site/west/gateway"),
            None,
        ];

        fn pick(v: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
            proptest::collection::vec(proptest::sample::select(v), 0..3)
                .prop_map(|v| v.into_iter().map(str::to_owned).collect())
        }

        fn source() -> impl Strategy<Value = Source> {
            // Mostly plain principal lists, so the exact index is exercised.
            let some = |v| proptest::option::weighted(0.2, pick(v));
            (
                pick(PRINCIPALS),
                some(PRINCIPALS),
                some(NAMESPACES),
                some(NAMESPACES),
            )
                .prop_map(
                    |(principals, not_principals, namespaces, not_namespaces)| Source {
                        principals,
                        not_principals: not_principals.unwrap_or_default(),
                        namespaces: namespaces.unwrap_or_default(),
                        not_namespaces: not_namespaces.unwrap_or_default(),
                    },
                )
        }

        fn rule() -> impl Strategy<Value = Rule> {
            (
                proptest::collection::vec(source(), 0..3),
                proptest::collection::vec(
                    proptest::collection::vec(prop_oneof![Just(80u16), Just(443)], 0..2),
                    0..2,
                ),
                proptest::option::of(pick(PRINCIPALS)),
            )
                .prop_map(|(from, ports, when)| Rule {
                    from,
                    to: ports
                        .into_iter()
                        .map(|ports| Operation {
                            ports,
                            not_ports: vec![],
                        })
                        .collect(),
                    when: when
                        .map(|values| Condition {
                            key: ConditionKey::SourcePrincipal,
                            values,
                            not_values: vec![],
                        })
                        .into_iter()
                        .collect(),
                })
        }

        fn policy() -> impl Strategy<Value = AuthorizationPolicy> {
            (
                proptest::sample::select(&["shop", "batch", ROOT_NAMESPACE][..]),
                any::<bool>(),
                pick(&["orders", "cart"]),
                proptest::collection::vec(rule(), 0..3),
                0u32..1000,
            )
                .prop_map(|(ns, deny, targets, rules, n)| AuthorizationPolicy {
                    name: format!("p{n}"),
                    namespace: ns.to_owned(),
                    action: if deny { Action::Deny } else { Action::Allow },
                    targets,
                    rules,
                })
        }

        proptest! {
            #[test]
            fn for_every_request(
                policies in proptest::collection::vec(policy(), 0..24),
                svc in proptest::sample::select(&["orders.shop", "cart.shop", "orders.batch", "x.istio-system"][..]),
                caller in proptest::sample::select(CALLERS),
                port in prop_oneof![Just(80u16), Just(443), Just(8080)],
            ) {
                let service: ServiceName = svc.parse().unwrap();
                let r = Request { service: &service, caller, port };
                prop_assert_eq!(PolicyIndex::new(policies.clone()).decide(&r), decide(&policies, &r));
            }
        }
    }
}
