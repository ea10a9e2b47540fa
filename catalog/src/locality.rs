//! Localities, in Istio's `region/zone/subzone` form, and the decisions made with them at
//! an importing gateway: how near each exporting site is (Istio's priorities, with a
//! DestinationRule's `localityLbSetting.failover`, or by labels under its
//! `failoverPriority`), and the share of requests each site gets under a `distribute`
//! rule. A site is one locality group, weighted by its ready
//! endpoints, as Envoy weighs a locality's endpoints.
//!
//! Pure: the setting (serde, unknown fields refused), Istio's validation of it with field
//! paths, and the decisions, all table-tested.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::http_route::{PolicyError, bad};

/// A DestinationRule's `trafficPolicy.loadBalancer.localityLbSetting`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityLb {
    /// `enabled: false`: no locality preference for this service; sites are ordered by
    /// their ready endpoints only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Shares by locality, for callers in `from` (the first rule whose `from` matches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribute: Vec<Distribute>,
    /// Region to region: where a caller in `from` goes when its own region has no
    /// serving site, before any other region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<Failover>,
    /// `failoverPriority`: labels (`key`, or `key=value` for a fixed value) in priority
    /// order; a site matching the calling gateway on all of them comes first, then one
    /// matching the first N-1, and so on ([`label_priority`]). In place of the
    /// locality order when set (and no `distribute` rule applies), as in Istio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_priority: Vec<String>,
}

/// The well-known topology labels a site has from its locality (Kubernetes' region and
/// zone, Istio's subzone), for `failoverPriority`.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// Labels in a `failover_priority`, at most.
pub const MAX_FAILOVER_PRIORITY: usize = 16;

/// The labels `failoverPriority` compares for a site (or the calling gateway): `labels`
/// (an export's), its name as `topology.istio.io/cluster` and `meshfed.io/site`, and its
/// locality's parts as the region, zone and subzone labels. Pure.
pub fn topology_labels(
    site: &str,
    locality: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = labels.clone();
    for k in [
        crate::http_route::CLUSTER_LABEL,
        crate::http_route::SITE_LABEL,
    ] {
        out.insert(k.to_owned(), site.to_owned());
    }
    if let Some(l) = locality {
        let (r, z, s) = split(l);
        for (k, v) in [(REGION_LABEL, r), (ZONE_LABEL, z), (SUBZONE_LABEL, s)] {
            if !v.is_empty() {
                out.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    out
}

/// A site's priority under `failoverPriority` labels, lower first (Istio's
/// `applyPriorityFailoverPerLocality`): 0 when the site matches the caller on every
/// label, else N minus the index of the first label it does not match. A label matches
/// when both have the same value, or both lack it; `key=value` matches a site whose
/// value is that one, whatever the caller's. Pure.
pub fn label_priority(
    me: &BTreeMap<String, String>,
    them: &BTreeMap<String, String>,
    labels: &[String],
) -> usize {
    for (j, l) in labels.iter().enumerate() {
        let same = match l.split_once('=') {
            Some((k, v)) => them.get(k).map(String::as_str) == Some(v),
            None => me.get(l) == them.get(l),
        };
        if !same {
            return labels.len() - j;
        }
    }
    0
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Distribute {
    pub from: String,
    /// Locality pattern to percentage (they sum to 100).
    pub to: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    pub from: String,
    pub to: String,
}

/// `region`, `zone`, `subzone` of a locality or pattern; missing parts are empty.
fn split(s: &str) -> (&str, &str, &str) {
    let mut it = s.splitn(3, '/');
    (
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    )
}

/// Checks a gateway's own `locality`: one to three non-empty `/`-separated parts, no
/// wildcard. Pure.
pub fn check(locality: &str) -> Result<(), String> {
    if locality.contains('*') {
        return Err(format!("{locality:?}: a locality has no wildcard"));
    }
    let parts: Vec<&str> = locality.split('/').collect();
    if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "{locality:?} is not region, region/zone or region/zone/subzone"
        ));
    }
    Ok(())
}

/// Whether `locality` is in `pattern` (Istio's `LocalityMatch`): each part of the
/// pattern equal, `*`, or (zone and subzone) absent. Pure.
pub fn matches(pattern: &str, locality: &str) -> bool {
    let (pr, pz, ps) = split(pattern);
    let (r, z, s) = split(locality);
    let part = |p: &str, v: &str| p == "*" || p == v;
    part(pr, r) && (pz.is_empty() || part(pz, z)) && (ps.is_empty() || part(ps, s))
}

/// How far a site at `them` is from a caller at `me`, lower first (Istio's `LbPriority`
/// and failover): 0 the same subzone, 1 the same zone, 2 the same region, 3 another
/// region, 4 another region than the one a `failover` rule for the caller's region names.
/// A caller without a locality prefers none (all 0). Pure.
pub fn priority(me: Option<&str>, them: Option<&str>, failover: &[Failover]) -> u8 {
    let Some(me) = me else { return 0 };
    let (mr, mz, ms) = split(me);
    let (tr, tz, ts) = split(them.unwrap_or(""));
    if mr != tr {
        return match failover.iter().find(|f| f.from == mr) {
            Some(f) if f.to != tr => 4,
            _ => 3,
        };
    }
    if mz != tz {
        2
    } else if ms != ts {
        1
    } else {
        0
    }
}

/// The share of requests of each site under `rules`, for a caller at `me`: the first
/// rule whose `from` matches the caller; each site takes the first `to` pattern it
/// matches, and a pattern's percentage is split over its sites by their ready endpoints
/// (rounded up, as Istio does). Sites no pattern matches get none. `None`: no rule for
/// this caller (the sites keep their order). Pure.
pub fn distribute(
    me: Option<&str>,
    rules: &[Distribute],
    sites: &[(Option<&str>, u32)],
) -> Option<Vec<u32>> {
    let me = me.unwrap_or("");
    let rule = rules.iter().find(|r| matches(&r.from, me))?;
    let mut weights = vec![0u32; sites.len()];
    let mut taken = vec![false; sites.len()];
    for (pattern, percent) in &rule.to {
        let group: Vec<usize> = (0..sites.len())
            .filter(|&i| !taken[i] && matches(pattern, sites[i].0.unwrap_or("")))
            .collect();
        let total: u64 = group.iter().map(|&i| u64::from(sites[i].1.max(1))).sum();
        for i in group {
            taken[i] = true;
            let own = u64::from(sites[i].1.max(1));
            weights[i] = (u64::from(*percent) * own).div_ceil(total) as u32;
        }
    }
    Some(weights)
}

/// The most rules and patterns a setting may have: it comes from another site.
pub const MAX_RULES: usize = 64;

impl LocalityLb {
    /// Istio's checks: not both `distribute` and `failover`; each rule's percentages 1 to
    /// 100 summing to 100; patterns with at most one `*`, at the end, no empty part, and
    /// no overlap among a rule's `to` (nor among the `from`s); failover between two
    /// different regions, named without `/` or `*`. The field is under
    /// `localityLbSetting` (empty: the setting itself). Pure.
    pub fn check(&self) -> Result<(), PolicyError> {
        if !self.distribute.is_empty() && !self.failover.is_empty() {
            return Err(bad(
                "distribute",
                "can not simultaneously specify 'distribute' and 'failover'",
            ));
        }
        if self.distribute.len() > MAX_RULES || self.failover.len() > MAX_RULES {
            return Err(bad("", format!("at most {MAX_RULES} rules")));
        }
        for (i, d) in self.distribute.iter().enumerate() {
            if d.to.len() > MAX_RULES {
                return Err(bad(
                    format!("distribute[{i}].to"),
                    format!("at most {MAX_RULES} localities"),
                ));
            }
            let mut total = 0u32;
            for (loc, w) in &d.to {
                if !(1..=100).contains(w) {
                    return Err(bad(
                        format!("distribute[{i}].to.{loc}"),
                        "locality weight must be in range [1, 100]",
                    ));
                }
                total += w;
            }
            if total != 100 {
                return Err(bad(
                    format!("distribute[{i}].to"),
                    format!("total locality weight {total} != 100"),
                ));
            }
            patterns(d.to.keys().map(String::as_str))
                .map_err(|m| bad(format!("distribute[{i}].to"), m))?;
        }
        patterns(self.distribute.iter().map(|d| d.from.as_str()))
            .map_err(|m| bad("distribute", m))?;
        if self.failover_priority.len() > MAX_FAILOVER_PRIORITY {
            return Err(bad(
                "failover_priority",
                format!("at most {MAX_FAILOVER_PRIORITY} labels"),
            ));
        }
        for (i, l) in self.failover_priority.iter().enumerate() {
            let field = format!("failover_priority[{i}]");
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            let one: BTreeMap<String, String> = [(k.to_owned(), v.to_owned())].into();
            crate::http_route::check_labels(&one).map_err(|(_, m)| bad(&field, m))?;
            let key = |x: &String| x.split_once('=').map_or(x.as_str(), |(k, _)| k).to_owned();
            if self.failover_priority[..i].iter().any(|o| key(o) == k) {
                return Err(bad(field, format!("label {k:?} twice")));
            }
        }
        for (i, f) in self.failover.iter().enumerate() {
            let field = format!("failover[{i}]");
            if f.from == f.to {
                return Err(bad(
                    field,
                    "locality lb failover settings must specify different regions",
                ));
            }
            if f.from.contains('/') || f.to.contains('/') {
                return Err(bad(field, "locality lb failover only specify region"));
            }
            if f.from.contains('*') || f.to.contains('*') {
                return Err(bad(
                    field,
                    "locality lb failover region should not contain '*' wildcard",
                ));
            }
            if f.from.is_empty() || f.to.is_empty() {
                return Err(bad(field, "from and to name a region"));
            }
        }
        Ok(())
    }
}

/// Istio's `validateLocalities`: each pattern well formed, and none covering another.
fn patterns<'a>(list: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen: Vec<(&str, &str, &str)> = Vec::new();
    for p in list {
        let stars = p.matches('*').count();
        if stars > 1 || (stars == 1 && !p.ends_with('*')) {
            return Err(format!(
                "locality {p} wildcard '*' number can not exceed 1 and must be in the end"
            ));
        }
        if p.split('/').any(str::is_empty) {
            return Err(format!(
                "locality {p} must not contain empty region/zone/subzone info"
            ));
        }
        let (r, z, s) = split(p);
        // Two patterns overlap when, part by part, they are equal or one is a wildcard
        // (or absent) that covers the other.
        let covers =
            |a: &str, b: &str| a == b || a == "*" || b == "*" || a.is_empty() || b.is_empty();
        if seen
            .iter()
            .any(|&(sr, sz, ss)| covers(sr, r) && covers(sz, z) && covers(ss, s))
        {
            return Err(format!("locality {p} overlap with previous specified ones"));
        }
        seen.push((r, z, s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fo(from: &str, to: &str) -> Failover {
        Failover {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn patterns_match_as_istios_do() {
        for (pattern, loc, want) in [
            ("us-east", "us-east/a/1", true),
            ("us-east/*", "us-east/a", true),
            ("us-east/a", "us-east/a/2", true),
            ("us-east/a/*", "us-east/a/2", true),
            ("us-east/a/1", "us-east/a/2", false),
            ("us-east/b", "us-east/a", false),
            ("*", "eu/x/y", true),
            ("*", "", true),
            ("us-east", "us-west/a", false),
            ("us-east", "", false),
        ] {
            assert_eq!(matches(pattern, loc), want, "{pattern} ~ {loc}");
        }
    }

    #[test]
    fn priorities_are_istios_with_failover() {
        let me = Some("us-east/a/1");
        for (them, failover, want) in [
            (Some("us-east/a/1"), vec![], 0),
            (Some("us-east/a/2"), vec![], 1),
            (Some("us-east/b/1"), vec![], 2),
            (Some("eu-west/a/1"), vec![], 3),
            (None, vec![], 3),
            (Some("eu-west/a"), vec![fo("us-east", "eu-west")], 3),
            (Some("ap-south/a"), vec![fo("us-east", "eu-west")], 4),
            (None, vec![fo("us-east", "eu-west")], 4),
            // A rule for another region changes nothing.
            (Some("ap-south/a"), vec![fo("eu-west", "us-east")], 3),
            // The first rule for the region decides.
            (
                Some("ap-south/a"),
                vec![fo("us-east", "ap-south"), fo("us-east", "eu-west")],
                3,
            ),
        ] {
            assert_eq!(priority(me, them, &failover), want, "{them:?} {failover:?}");
        }
        assert_eq!(priority(None, Some("eu-west"), &[]), 0);
        assert_eq!(priority(Some("us-east"), Some("us-east"), &[]), 0);
        assert_eq!(priority(Some("us-east"), Some("us-east/b"), &[]), 2);
    }

    #[test]
    fn distribute_splits_by_pattern_then_by_ready_endpoints() {
        let rule = |from: &str, to: &[(&str, u32)]| Distribute {
            from: from.into(),
            to: to.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        let rules = vec![
            rule("us-west/*", &[("us-west/*", 100)]),
            rule("us-east/a/*", &[("us-east/a/*", 20), ("eu-west/*", 80)]),
        ];
        let sites = [
            (Some("us-east/a/1"), 2),
            (Some("eu-west/x"), 1),
            (Some("eu-west/y"), 3),
            (Some("ap-south"), 9),
            (None, 5),
        ];
        assert_eq!(
            distribute(Some("us-east/a/7"), &rules, &sites),
            Some(vec![20, 20, 60, 0, 0])
        );
        assert_eq!(
            distribute(Some("us-west/b"), &rules, &sites),
            Some(vec![0, 0, 0, 0, 0])
        );
        assert_eq!(distribute(Some("ap-south"), &rules, &sites), None);
        assert_eq!(distribute(None, &rules, &sites), None);
        // Rounded up, as Istio does.
        let three = [
            (Some("eu-west/a"), 1),
            (Some("eu-west/b"), 1),
            (Some("eu-west/c"), 1),
        ];
        assert_eq!(
            distribute(Some("us-east/a"), &rules, &three),
            Some(vec![27, 27, 27])
        );
    }

    #[test]
    fn settings_istio_refuses_are_refused_with_their_field() {
        let d = |to: &[(&str, u32)]| LocalityLb {
            distribute: vec![Distribute {
                from: "us-east/*".into(),
                to: to.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            }],
            ..Default::default()
        };
        let f = |from: &str, to: &str| LocalityLb {
            failover: vec![fo(from, to)],
            ..Default::default()
        };
        assert_eq!(d(&[("us-east/*", 60), ("eu-west", 40)]).check(), Ok(()));
        assert_eq!(f("us-east", "eu-west").check(), Ok(()));
        for (lb, field, msg) in [
            (
                d(&[("us-east/*", 60), ("eu-west", 30)]),
                "distribute[0].to",
                "!= 100",
            ),
            (
                d(&[("us-east/*", 100), ("eu-west", 0)]),
                "distribute[0].to.eu-west",
                "[1, 100]",
            ),
            (
                d(&[("us-east/*", 50), ("us-east/a", 50)]),
                "distribute[0].to",
                "overlap",
            ),
            (
                d(&[("*", 50), ("us-east/a", 50)]),
                "distribute[0].to",
                "overlap",
            ),
            (d(&[("us-*/a", 100)]), "distribute[0].to", "wildcard"),
            (d(&[("us-east//a", 100)]), "distribute[0].to", "empty"),
            (f("us-east", "us-east"), "failover[0]", "different regions"),
            (
                f("us-east/a", "eu-west"),
                "failover[0]",
                "only specify region",
            ),
            (f("us-east", "eu-*"), "failover[0]", "wildcard"),
            (
                LocalityLb {
                    failover: vec![fo("a", "b")],
                    ..d(&[("eu-west", 100)])
                },
                "distribute",
                "simultaneously",
            ),
        ] {
            let e = lb.check().unwrap_err();
            assert_eq!(e.field, field, "{lb:?}");
            assert!(e.message.contains(msg), "{e:?}");
        }
        let two_froms = LocalityLb {
            distribute: vec![
                Distribute {
                    from: "us-east/*".into(),
                    to: [("eu-west".to_string(), 100)].into(),
                },
                Distribute {
                    from: "us-east/a".into(),
                    to: [("eu-west".to_string(), 100)].into(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(two_froms.check().unwrap_err().field, "distribute");
    }

    #[test]
    fn a_gateways_locality_is_checked() {
        for ok in ["eu-west", "eu-west/a", "eu-west/a/rack-1"] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in ["", "eu-west/", "a/b/c/d", "eu-*", "/a"] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}
