//! `meshfed diagnose`: the verdicts on a cross-site call, step by step, from facts the
//! command gathered live at one site (its DNS, its gateway's admin port, its cached
//! catalog, and a real open toward each backend site). Pure: the facts in, the report
//! out, table-tested; the gathering is `src/cmd/diagnose.rs`.
//!
//! The steps, as an operator would walk them:
//! 1. `dns`: the name resolves at this site's DNS (skipped when the gateway serves none);
//! 2. `import`: the service is imported here, and from which sites;
//! 3. `lease`: each backend site is up, with a lease (skipped for static peers);
//! 4. `link`: the peer link is up: transport, and why it is down when it is;
//! 5. `open`: an open reaches the far side, or its typed refusal;
//! 6. `endpoints`: the far side has ready endpoints.
//!
//! The call succeeds when steps 1 and 2 pass and some backend site passes 3 to 6.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// What the DNS step saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsFact {
    /// The gateway serves no DNS.
    NotServed,
    Answered {
        name: String,
        addrs: Vec<IpAddr>,
    },
    Failed {
        name: String,
        error: String,
    },
}

/// One import listener of the service, as the gateway's `/debug/imports` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportFact {
    pub port: u16,
    pub listen: SocketAddr,
    /// Best first.
    pub backends: Vec<String>,
}

/// A site exporting the service, from the cached catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportFact {
    pub up: bool,
    pub ready_endpoints: u32,
    pub ports: Vec<u16>,
}

/// A peer link as `/debug/peers` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFact {
    pub up: bool,
    pub transport: Option<String>,
    /// Why it uses its transport, or why it is down.
    pub why: String,
}

/// The answer to one real open (`/debug/probe`).
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeFact {
    Accepted {
        transport: String,
        open_ms: f64,
    },
    Refused {
        reason: String,
        message: String,
    },
    /// The probe itself could not run.
    Error(String),
}

/// Everything gathered at the site.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub service: String,
    pub port: u16,
    pub here: String,
    pub dns: Option<DnsFact>,
    /// `Err`: the gateway's admin port did not answer.
    pub import: Option<Result<Option<ImportFact>, String>>,
    /// From the cached catalog, by site; `None`: static peers, no catalog.
    pub exports: Option<BTreeMap<String, ExportFact>>,
    pub links: BTreeMap<String, LinkFact>,
    pub probes: BTreeMap<String, ProbeFact>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Skip,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    pub step: u8,
    pub name: &'static str,
    /// The backend site the step is about (steps 3 to 6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub verdict: Verdict,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub service: String,
    pub port: u16,
    pub site: String,
    pub steps: Vec<Step>,
    /// Whether a call from this site would succeed now.
    pub succeeds: bool,
    /// The site a call would reach, when it succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub through: Option<String>,
    /// The fix for the first failing step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_fix: Option<String>,
}

fn step(n: u8, name: &'static str, site: Option<&str>, v: Verdict, detail: String) -> Step {
    Step {
        step: n,
        name,
        site: site.map(str::to_owned),
        verdict: v,
        detail,
        fix: None,
    }
}

fn fail(n: u8, name: &'static str, site: Option<&str>, detail: String, fix: String) -> Step {
    Step {
        fix: Some(fix),
        ..step(n, name, site, Verdict::Fail, detail)
    }
}

/// The fix for a typed refusal from `site`.
fn refusal_fix(reason: &str, site: &str, service: &str, here: &str) -> String {
    match reason {
        "unknown_service" => format!(
            "{site}'s gateway does not export {service} on this port: check its exports (config, `meshfed register`, or a ServiceExport)"
        ),
        "not_exported_to_peer" => format!(
            "{site} exports {service} only to some sites: add {here} to the export's allowed peers (exportTo)"
        ),
        "denied" => format!(
            "an AuthorizationPolicy at {site} denies this caller: the message names the policy; allow the caller there"
        ),
        "foreign_caller" => {
            "the caller is outside this gateway's trust domain: a gateway vouches only for its own workloads".into()
        }
        "no_ready_endpoint" => format!(
            "no endpoint of {service} at {site} is ready: start it, or fix its health check"
        ),
        "endpoint_connect_failed" => format!(
            "{site}'s gateway cannot connect to {service}'s endpoint: is it running and listening on the exported address?"
        ),
        "draining" => format!("{site}'s gateway is shutting down: wait for it, or another site"),
        "flow_limit" => format!("{site}'s gateway is at its UDP flow limit"),
        "overflow" => format!(
            "{service} at {site} has as many connections open as its DestinationRule's connectionPool allows: raise tcp.maxConnections there, or add endpoints elsewhere"
        ),
        "peer_unavailable" => format!(
            "no live link to {site}'s gateway: see the link step (address, firewall, UDP, trust)"
        ),
        other => format!("{site} refused with {other}: see its gateway's log for the same code"),
    }
}

/// The steps for one backend site: lease, link, open, endpoints. Stops at the first
/// failure (later steps would only repeat it).
fn site_steps(f: &Facts, site: &str, out: &mut Vec<Step>) -> bool {
    let s = Some(site);
    let export = f.exports.as_ref().map(|e| e.get(site));
    match export {
        None => out.push(step(
            3,
            "lease",
            s,
            Verdict::Skip,
            "static peer: no lease".into(),
        )),
        Some(None) => {
            out.push(fail(
                3,
                "lease",
                s,
                format!(
                    "{site} is a backend but the cached catalog has no export of {} from it",
                    f.service
                ),
                "the catalog cache is behind the gateway: wait for the next catalog update".into(),
            ));
            return false;
        }
        Some(Some(e)) if !e.up => {
            out.push(fail(
                3,
                "lease",
                s,
                format!("{site} is down: its lease expired"),
                format!("{site}'s gateway is not watching the federation: is it running? (`meshfed status` shows its lease)"),
            ));
            return false;
        }
        Some(Some(_)) => out.push(step(3, "lease", s, Verdict::Ok, format!("{site} is up"))),
    }
    match f.links.get(site) {
        Some(l) if l.up => out.push(step(
            4,
            "link",
            s,
            Verdict::Ok,
            format!("{} ({})", l.transport.as_deref().unwrap_or("up"), l.why),
        )),
        Some(l) => {
            out.push(fail(
                4,
                "link",
                s,
                format!("down: {}", l.why),
                format!(
                    "this gateway cannot hold a connection to {site}'s: check its address, that UDP (QUIC) or TCP (h2) reaches it, and that each side trusts the other's bundle"
                ),
            ));
            return false;
        }
        None => {
            out.push(fail(
                4,
                "link",
                s,
                format!("{site} is not a peer of this gateway"),
                format!(
                    "{site} has no gateway address in the catalog, or this site cannot reach it"
                ),
            ));
            return false;
        }
    }
    match f.probes.get(site) {
        Some(ProbeFact::Accepted { transport, open_ms }) => out.push(step(
            5,
            "open",
            s,
            Verdict::Ok,
            format!("accepted over {transport} in {open_ms:.1} ms"),
        )),
        Some(ProbeFact::Refused { reason, message }) => {
            let n = if matches!(
                reason.as_str(),
                "no_ready_endpoint" | "endpoint_connect_failed"
            ) {
                6
            } else {
                5
            };
            if n == 6 {
                out.push(step(
                    5,
                    "open",
                    s,
                    Verdict::Ok,
                    format!("reached {site}'s gateway"),
                ));
            }
            out.push(fail(
                n,
                if n == 6 { "endpoints" } else { "open" },
                s,
                format!("refused: {reason}: {message}"),
                refusal_fix(reason, site, &f.service, &f.here),
            ));
            return false;
        }
        Some(ProbeFact::Error(e)) => {
            out.push(fail(
                5,
                "open",
                s,
                format!("the probe did not run: {e}"),
                "the gateway's admin port must answer /debug/probe".into(),
            ));
            return false;
        }
        None => {
            out.push(step(5, "open", s, Verdict::Skip, "not probed".into()));
            return false;
        }
    }
    let ready = export.flatten().map(|e| e.ready_endpoints);
    match ready {
        Some(0) => {
            out.push(fail(
                6,
                "endpoints",
                s,
                "the catalog says 0 ready endpoints (the open was accepted: it may have just changed)".into(),
                refusal_fix("no_ready_endpoint", site, &f.service, &f.here),
            ));
            false
        }
        Some(n) => {
            out.push(step(6, "endpoints", s, Verdict::Ok, format!("{n} ready")));
            true
        }
        None => {
            out.push(step(
                6,
                "endpoints",
                s,
                Verdict::Ok,
                "the endpoint accepted the connection".into(),
            ));
            true
        }
    }
}

/// The report on `f`. Pure.
pub fn judge(f: &Facts) -> Report {
    let mut steps = Vec::new();
    // 2 first: the DNS verdict refers to it.
    let import = match &f.import {
        None => Err("not checked".to_owned()),
        Some(Err(e)) => Err(format!("the gateway's admin port did not answer: {e}")),
        Some(Ok(None)) => Err(String::new()),
        Some(Ok(Some(i))) => Ok(i),
    };
    let dns_ok = match &f.dns {
        None | Some(DnsFact::NotServed) => {
            steps.push(step(
                1,
                "dns",
                None,
                Verdict::Skip,
                "this gateway serves no DNS (no dns section)".into(),
            ));
            true
        }
        Some(DnsFact::Answered { name, addrs }) => {
            let listen = import.as_ref().ok().map(|i| i.listen.ip());
            let matches = listen.is_none_or(|ip| ip.is_unspecified() || addrs.contains(&ip));
            if matches {
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                steps.push(step(
                    1,
                    "dns",
                    None,
                    Verdict::Ok,
                    format!("{name} → {}", list.join(", ")),
                ));
                true
            } else {
                steps.push(fail(
                    1,
                    "dns",
                    None,
                    format!("{name} → {addrs:?}, but the import listens on {}", listen.map(|i| i.to_string()).unwrap_or_default()),
                    "clients reach another address than the listener: check for a second DNS answering the zone".into(),
                ));
                false
            }
        }
        Some(DnsFact::Failed { name, error }) => {
            let fix = if import.is_err() {
                "the name has no answer because the service is not imported here (step 2)".into()
            } else {
                "the DNS server does not answer for an import it has: check the gateway's dns section and its log".into()
            };
            steps.push(fail(1, "dns", None, format!("{name}: {error}"), fix));
            false
        }
    };
    let mut through = None;
    match import {
        Err(e) if !e.is_empty() => steps.push(fail(
            2,
            "import",
            None,
            e,
            "start the gateway, or point --config at its config".into(),
        )),
        Err(_) => {
            let (detail, fix) = match &f.exports {
                None => (
                    format!("{}:{} is not imported here", f.service, f.port),
                    "add it to the config's imports".to_owned(),
                ),
                Some(e) if e.is_empty() => (
                    format!("no site exports {}", f.service),
                    "export it at the site that runs it (config exports, `meshfed register`, or a ServiceExport), with this exact name.namespace".into(),
                ),
                Some(e) => {
                    let sites: Vec<&str> = e.keys().map(String::as_str).collect();
                    let on_port = e.values().any(|x| x.ports.contains(&f.port));
                    if on_port {
                        (
                            format!("exported by {} but not imported here", sites.join(", ")),
                            "the gateway has not applied the catalog yet, or could not bind the listener: see its log".into(),
                        )
                    } else {
                        (
                            format!("exported by {}, but not on port {}", sites.join(", "), f.port),
                            "use a port the service exports".into(),
                        )
                    }
                }
            };
            steps.push(fail(2, "import", None, detail, fix));
        }
        Ok(i) if i.backends.is_empty() => {
            steps.push(fail(
                2,
                "import",
                None,
                format!(
                    "imported (listening on {}) but no site serves it now",
                    i.listen
                ),
                "no exporting site is up with a ready endpoint: see the steps below".into(),
            ));
            // Why, per exporting site: its lease, or its endpoints.
            for (site, e) in f.exports.iter().flatten() {
                let s = Some(site.as_str());
                if !e.up {
                    steps.push(fail(
                        3,
                        "lease",
                        s,
                        format!("{site} is down: its lease expired"),
                        format!("{site}'s gateway is not watching the federation: is it running? (`meshfed status` shows its lease)"),
                    ));
                } else if e.ready_endpoints == 0 {
                    steps.push(step(3, "lease", s, Verdict::Ok, format!("{site} is up")));
                    steps.push(fail(
                        6,
                        "endpoints",
                        s,
                        "0 ready endpoints".into(),
                        refusal_fix("no_ready_endpoint", site, &f.service, &f.here),
                    ));
                }
            }
        }
        Ok(i) => {
            steps.push(step(
                2,
                "import",
                None,
                Verdict::Ok,
                format!(
                    "listening on {}, from {} (best first)",
                    i.listen,
                    i.backends.join(", ")
                ),
            ));
            for site in &i.backends {
                if site_steps(f, site, &mut steps) && through.is_none() {
                    through = Some(site.clone());
                }
            }
        }
    }
    let succeeds = dns_ok && through.is_some();
    // The first failure's fix; a fix that only points at another step gives way to it.
    let first_fix = steps
        .iter()
        .filter_map(|s| s.fix.clone())
        .find(|fix| !fix.ends_with("see the steps below") && !fix.contains("(step "))
        .or_else(|| steps.iter().find_map(|s| s.fix.clone()));
    Report {
        service: f.service.clone(),
        port: f.port,
        site: f.here.clone(),
        steps,
        succeeds,
        through,
        first_fix: if succeeds { None } else { first_fix },
    }
}

/// The report for people: one line a step, then the verdict and the first fix.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = format!("diagnose {}:{} from site {}\n", r.service, r.port, r.site);
    for s in &r.steps {
        let v = match s.verdict {
            Verdict::Ok => "ok",
            Verdict::Skip => "skip",
            Verdict::Fail => "FAIL",
        };
        let site = s
            .site
            .as_deref()
            .map(|x| format!("{x}: "))
            .unwrap_or_default();
        let _ = writeln!(out, "{} {v:<4} {:<9} {site}{}", s.step, s.name, s.detail);
    }
    if r.succeeds {
        let _ = writeln!(
            out,
            "verdict: a call succeeds now, through {}",
            r.through.as_deref().unwrap_or("?")
        );
    } else {
        let _ = writeln!(out, "verdict: a call fails now");
        if let Some(fix) = &r.first_fix {
            let _ = writeln!(out, "fix: {fix}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first failing step: number, name, site.
    type Failure = Option<(u8, &'static str, Option<String>)>;
    type Row = (&'static str, Box<dyn Fn(&mut Facts)>, Failure, bool);

    fn healthy() -> Facts {
        let listen: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        Facts {
            service: "web.demo".into(),
            port: 8080,
            here: "east".into(),
            dns: Some(DnsFact::Answered {
                name: "web.demo.svc.clusterset.local".into(),
                addrs: vec![listen.ip()],
            }),
            import: Some(Ok(Some(ImportFact {
                port: 8080,
                listen,
                backends: vec!["west".into(), "north".into()],
            }))),
            exports: Some(
                [
                    (
                        "west".to_string(),
                        ExportFact {
                            up: true,
                            ready_endpoints: 2,
                            ports: vec![8080],
                        },
                    ),
                    (
                        "north".to_string(),
                        ExportFact {
                            up: true,
                            ready_endpoints: 1,
                            ports: vec![8080],
                        },
                    ),
                ]
                .into(),
            ),
            links: [
                (
                    "west".to_string(),
                    LinkFact {
                        up: true,
                        transport: Some("quic".into()),
                        why: "auto".into(),
                    },
                ),
                (
                    "north".to_string(),
                    LinkFact {
                        up: true,
                        transport: Some("h2".into()),
                        why: "auto: UDP blocked".into(),
                    },
                ),
            ]
            .into(),
            probes: [
                (
                    "west".to_string(),
                    ProbeFact::Accepted {
                        transport: "quic".into(),
                        open_ms: 1.0,
                    },
                ),
                (
                    "north".to_string(),
                    ProbeFact::Accepted {
                        transport: "h2".into(),
                        open_ms: 2.0,
                    },
                ),
            ]
            .into(),
        }
    }

    /// The first failing step (number, name, site) and whether the call succeeds.
    fn first_failure(f: &Facts) -> (Failure, bool, Option<String>) {
        let r = judge(f);
        let first = r
            .steps
            .iter()
            .find(|s| s.verdict == Verdict::Fail)
            .map(|s| (s.step, s.name, s.site.clone()));
        (first, r.succeeds, r.through)
    }

    #[test]
    fn each_failure_class_is_named_at_its_step() {
        let west = || Some("west".to_string());
        let rows: Vec<Row> = vec![
            ("healthy", Box::new(|_| {}), None, true),
            (
                "no dns section",
                Box::new(|f| f.dns = Some(DnsFact::NotServed)),
                None,
                true,
            ),
            (
                "name does not resolve",
                Box::new(|f| {
                    f.dns = Some(DnsFact::Failed {
                        name: "x".into(),
                        error: "NXDOMAIN".into(),
                    })
                }),
                Some((1, "dns", None)),
                false,
            ),
            (
                "nobody exports it",
                Box::new(|f| {
                    f.import = Some(Ok(None));
                    f.exports = Some(BTreeMap::new());
                }),
                Some((2, "import", None)),
                false,
            ),
            (
                "gateway down",
                Box::new(|f| f.import = Some(Err("connection refused".into()))),
                Some((2, "import", None)),
                false,
            ),
            (
                "west's lease expired: north serves",
                Box::new(|f| f.exports.as_mut().unwrap().get_mut("west").unwrap().up = false),
                Some((3, "lease", west())),
                true,
            ),
            (
                "every site down: the import has no backend",
                Box::new(|f| {
                    for e in f.exports.as_mut().unwrap().values_mut() {
                        e.up = false;
                    }
                    if let Some(Ok(Some(i))) = &mut f.import {
                        i.backends.clear();
                    }
                }),
                Some((2, "import", None)),
                false,
            ),
            (
                "west's link down: north serves",
                Box::new(|f| {
                    let l = f.links.get_mut("west").unwrap();
                    l.up = false;
                    l.why = "handshake: unknown_ca".into();
                }),
                Some((4, "link", west())),
                true,
            ),
            (
                "west not exported to us",
                Box::new(|f| {
                    f.probes.insert(
                        "west".into(),
                        ProbeFact::Refused {
                            reason: "not_exported_to_peer".into(),
                            message: "m".into(),
                        },
                    );
                }),
                Some((5, "open", west())),
                true,
            ),
            (
                "west's endpoint stopped, north's too",
                Box::new(|f| {
                    for s in ["west", "north"] {
                        f.probes.insert(
                            s.into(),
                            ProbeFact::Refused {
                                reason: "endpoint_connect_failed".into(),
                                message: "m".into(),
                            },
                        );
                    }
                }),
                Some((6, "endpoints", west())),
                false,
            ),
        ];
        for (what, change, want, succeeds) in rows {
            let mut f = healthy();
            change(&mut f);
            let (first, ok, through) = first_failure(&f);
            assert_eq!(first, want, "{what}");
            assert_eq!(ok, succeeds, "{what}");
            if ok {
                assert!(through.is_some(), "{what}");
            }
        }
    }

    #[test]
    fn the_first_fix_names_the_cause() {
        let mut f = healthy();
        f.exports.as_mut().unwrap().get_mut("west").unwrap().up = false;
        f.exports
            .as_mut()
            .unwrap()
            .get_mut("north")
            .unwrap()
            .ready_endpoints = 0;
        if let Some(Ok(Some(i))) = &mut f.import {
            i.backends.clear();
        }
        let r = judge(&f);
        let fails: Vec<(u8, Option<&str>)> = r
            .steps
            .iter()
            .filter(|s| s.verdict == Verdict::Fail)
            .map(|s| (s.step, s.site.as_deref()))
            .collect();
        assert_eq!(fails, [(2, None), (6, Some("north")), (3, Some("west"))]);
        assert!(
            r.first_fix
                .as_ref()
                .unwrap()
                .contains("no endpoint of web.demo at north")
        );

        let mut f = healthy();
        f.import = Some(Ok(None));
        f.exports = Some(BTreeMap::new());
        f.dns = Some(DnsFact::Failed {
            name: "x".into(),
            error: "NXDOMAIN".into(),
        });
        let r = judge(&f);
        assert!(
            r.steps[0]
                .fix
                .as_ref()
                .unwrap()
                .contains("not imported here (step 2)")
        );
        assert!(r.first_fix.unwrap().starts_with("export it at the site"));
        let mut f = healthy();
        f.import = Some(Ok(Some(ImportFact {
            port: 8080,
            listen: "127.0.0.2:8080".parse().unwrap(),
            backends: vec!["west".into()],
        })));
        f.probes.insert(
            "west".into(),
            ProbeFact::Refused {
                reason: "denied".into(),
                message: "policy p".into(),
            },
        );
        let r = judge(&f);
        assert!(!r.succeeds);
        assert!(
            r.first_fix
                .as_ref()
                .unwrap()
                .contains("AuthorizationPolicy at west")
        );
        let text = render(&r);
        assert!(
            text.contains("5 FAIL open      west: refused: denied: policy p"),
            "{text}"
        );
        assert!(text.contains("verdict: a call fails now"), "{text}");
    }
}
