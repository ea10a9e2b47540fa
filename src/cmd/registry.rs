//! `meshfed validate`, `register`, `unregister`: legacy services from Istio
//! ServiceEntry/WorkloadEntry YAML, and AuthorizationPolicies for the site's exports, in
//! a site directory's `registry.json`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct ValidateArgs {
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
}

#[derive(Args)]
pub struct RegisterArgs {
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// The site directory (`meshfed site join --dir`).
    #[arg(long)]
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct UnregisterArgs {
    /// Services to remove, as `name.namespace`, policies, as `namespace/name`, and a
    /// service's routes, as `routes:name.namespace`.
    #[arg(required_unless_present = "file")]
    pub services: Vec<String>,
    /// Remove every service registered from this file.
    #[arg(short = 'f', long = "file", conflicts_with = "services")]
    pub file: Option<PathBuf>,
    /// The site directory.
    #[arg(long)]
    pub dir: PathBuf,
}

pub fn validate(a: ValidateArgs) -> Result<()> {
    let ValidateArgs { file } = a;
    let (r, warnings) = read_entries(&file)?;
    for s in &r.services {
        println!("{}", describe_entry(s));
    }
    for p in &r.policies {
        println!("{}", describe_policy(p));
    }
    for p in &r.http_policies {
        println!("{}", describe_routes(p));
    }
    println!(
        "{}: {} service(s), {} policy(ies) and {} route set(s) valid, {} warning(s)",
        file.display(),
        r.services.len(),
        r.policies.len(),
        r.http_policies.len(),
        warnings
    );

    Ok(())
}

pub fn register(a: RegisterArgs) -> Result<()> {
    let RegisterArgs { file, dir } = a;
    let (r, _) = read_entries(&file)?;
    let names: Vec<String> = r
        .services
        .iter()
        .map(|s| s.service.to_string())
        .chain(r.policies.iter().map(|p| format!("policy {}", p.key())))
        .chain(
            r.http_policies
                .iter()
                .map(|p| format!("routes:{}", p.service)),
        )
        .collect();
    // Concurrent registrations take turns: each one's entries survive.
    let _lock = meshfed_catalog::site::lock_site_dir(&dir)?;
    let mut reg = meshfed_catalog::site::Registry::load(&dir)?;
    let conflicts = reg.conflicts(&r.services);
    if !conflicts.is_empty() {
        bail!(
            "{}: nothing registered: {}",
            file.display(),
            conflicts.join("; ")
        );
    }
    let source = file.display().to_string();
    let replaced = reg.merge(&source, r.services).len()
        + reg.merge_policies(&source, r.policies).len()
        + reg.merge_routes(&source, r.http_policies).len();
    reg.save(&dir)?;
    println!(
        "registered {} ({} replaced) in {}; {} service(s) and {} policy(ies) registered in all",
        names.join(", "),
        replaced,
        meshfed_catalog::site::Registry::path(&dir).display(),
        reg.services.len(),
        reg.policies.len()
    );

    Ok(())
}

pub fn unregister(a: UnregisterArgs) -> Result<()> {
    let UnregisterArgs {
        services,
        file,
        dir,
    } = a;
    let _lock = meshfed_catalog::site::lock_site_dir(&dir)?;
    let reg = meshfed_catalog::site::Registry::load(&dir)?;
    let (names, policies, routes) = match &file {
        Some(f) => {
            let source = f.display().to_string();
            let names: Vec<_> = reg
                .services
                .iter()
                .filter(|(_, r)| r.source == source)
                .map(|(n, _)| n.clone())
                .collect();
            let policies: Vec<String> = reg
                .policies
                .iter()
                .filter(|(_, r)| r.source == source)
                .map(|(k, _)| k.clone())
                .collect();
            let routes: Vec<_> = reg
                .routes
                .iter()
                .filter(|(_, r)| r.source == source)
                .map(|(s, _)| s.clone())
                .collect();
            if names.is_empty() && policies.is_empty() && routes.is_empty() {
                bail!("{source}: nothing registered from this file");
            }
            (names, policies, routes)
        }
        None => {
            let (routes, rest): (Vec<&String>, Vec<&String>) =
                services.iter().partition(|s| s.starts_with("routes:"));
            let routes = routes
                .iter()
                .map(|s| {
                    let s = s.trim_start_matches("routes:");
                    s.parse::<meshfed_catalog::ServiceName>()
                        .map_err(|e| anyhow::anyhow!("routes:{s}: {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let (policies, names): (Vec<&String>, Vec<&String>) =
                rest.into_iter().partition(|s| s.contains('/'));
            let names = names
                .iter()
                .map(|s| {
                    s.parse::<meshfed_catalog::ServiceName>()
                        .map_err(|e| anyhow::anyhow!("{s:?}: {e}"))
                })
                .collect::<Result<_>>()?;
            (names, policies.into_iter().cloned().collect(), routes)
        }
    };
    // All or nothing: check both before removing either.
    let mut next = reg.clone();
    next.remove(&names)?;
    next.remove_policies(&policies)?;
    next.remove_routes(&routes)?;
    next.save(&dir)?;
    let list: Vec<String> = names
        .iter()
        .map(|n| n.to_string())
        .chain(policies.iter().map(|p| format!("policy {p}")))
        .chain(routes.iter().map(|s| format!("routes:{s}")))
        .collect();
    println!(
        "unregistered {}; {} service(s) and {} policy(ies) registered in all",
        list.join(", "),
        next.services.len(),
        next.policies.len()
    );

    Ok(())
}

/// Parses a ServiceEntry file; warnings go to stderr, errors name the file. Returns the
/// registration and how many warnings were printed.
fn read_entries(
    file: &std::path::Path,
) -> Result<(meshfed_istio::service_entry::Registration, usize)> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let mut r = meshfed_istio::service_entry::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    // Routes travel to the federation, which refuses a policy over its bound: refuse it
    // here, by name, rather than have every later publish of the site refused.
    for p in &r.http_policies {
        let size = serde_json::to_vec(p).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > meshfed_api::HTTP_POLICY_MAX {
            bail!(
                "{}: routes for {} ({}): {size} bytes once published; at most {}",
                file.display(),
                p.service,
                p.source,
                meshfed_api::HTTP_POLICY_MAX
            );
        }
    }
    // TLS files: relative to the YAML file, and readable now rather than at the gateway.
    // Certificates outside their dates are warned about (not refused: a rotation may
    // replace them before they are used), since the handshake that fails on them later
    // says little.
    let base = file.parent().unwrap_or(std::path::Path::new("."));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut dates = Vec::new();
    for s in &mut r.services {
        let Some(tls) = &mut s.tls else { continue };
        let fix = |p: &mut String| {
            let path = base.join(&*p);
            *p = path.display().to_string();
            path
        };
        let what = format!("{}: {} TLS origination", file.display(), s.service);
        let ca = fix(&mut tls.ca_certificates);
        let cas = meshfed_gateway::origination::load_certs(&ca)
            .map_err(|e| anyhow::anyhow!("{what}: caCertificates: {e}"))?;
        for (i, c) in cas.iter().enumerate() {
            if let Some(why) = meshfed_identity::verify::outside_validity(c, now) {
                dates.push(format!(
                    "{} TLS origination: caCertificates: certificate {} of {}: {why}: endpoints that chain only to it fail verification",
                    s.service,
                    i + 1,
                    ca.display()
                ));
            }
        }
        if let Some(c) = &mut tls.client_certificate {
            let c = fix(c);
            let chain = meshfed_gateway::origination::load_certs(&c)
                .map_err(|e| anyhow::anyhow!("{what}: clientCertificate: {e}"))?;
            if let Some(why) = meshfed_identity::verify::outside_validity(&chain[0], now) {
                dates.push(format!(
                    "{} TLS origination: clientCertificate {}: {why}: endpoints refuse it",
                    s.service,
                    c.display()
                ));
            }
        }
        if let Some(k) = &mut tls.private_key {
            let k = fix(k);
            meshfed_gateway::origination::load_key(&k)
                .map_err(|e| anyhow::anyhow!("{what}: privateKey: {e}"))?;
        }
    }
    for w in &r.warnings {
        eprintln!("warning: {}: {w}", file.display());
    }
    for w in &dates {
        eprintln!("warning: {}: {w}", file.display());
    }
    let warnings = r.warnings.len() + dates.len();
    Ok((r, warnings))
}

/// Each destination with its share: `v2 20%`, `web-v2.demo:8080/blue 50%`.
fn describe_destinations(ds: &[meshfed_catalog::http_route::Destination]) -> Vec<String> {
    // Weights are relative (Gateway API's need not add up to 100).
    let total: u64 = ds.iter().map(|d| u64::from(d.weight)).sum();
    let share = |w: u32| match (ds.len(), total) {
        (1, _) => 100.0,
        (_, 0) => 0.0,
        _ => f64::from(w) * 100.0 / total as f64,
    };
    ds.iter()
        .map(|d| {
            let name = match (&d.service, d.port, &d.subset) {
                (None, _, None) => "(all)".to_owned(),
                (None, _, Some(s)) => s.clone(),
                (Some(svc), port, subset) => {
                    let mut n = svc.to_string();
                    if let Some(p) = port {
                        n = format!("{n}:{p}");
                    }
                    if let Some(s) = subset {
                        n = format!("{n}/{s}");
                    }
                    n
                }
            };
            format!("{name} {:.1}%", share(d.weight)).replace(".0%", "%")
        })
        .collect()
}

/// A request match as `meshfed validate` lists it: its path, method, port and how many
/// header and query conditions it has (`matched` when it says nothing of these).
fn describe_match(m: &meshfed_catalog::http_route::RequestMatch) -> String {
    use meshfed_catalog::http_route::StringMatch;
    let mut parts: Vec<String> = Vec::new();
    match &m.uri {
        Some(StringMatch::Exact(v)) => parts.push(format!("path = {v}")),
        Some(StringMatch::Prefix(v) | StringMatch::PathPrefix(v)) => {
            parts.push(format!("path {v}*"))
        }
        Some(StringMatch::Regex(v)) => parts.push(format!("path ~ {v}")),
        Some(StringMatch::Present) | None => {}
    }
    if let Some(StringMatch::Exact(v)) = &m.method {
        parts.push(v.clone());
    }
    if let Some(p) = m.port {
        parts.push(format!("port {p}"));
    }
    let n = m.headers.len() + m.without_headers.len();
    if n > 0 {
        parts.push(format!("{n} header(s)"));
    }
    if !m.query_params.is_empty() {
        parts.push(format!("{} query param(s)", m.query_params.len()));
    }
    if parts.is_empty() {
        "matched".into()
    } else {
        parts.join(", ")
    }
}

fn describe_routes(p: &meshfed_catalog::http_route::HttpPolicy) -> String {
    let mut routes: Vec<String> = p
        .routes
        .iter()
        .map(|r| {
            let mut to = describe_destinations(&r.destinations);
            if let Some(rd) = &r.redirect {
                to.push(format!(
                    "redirect {} to {}",
                    rd.code,
                    rd.uri.as_deref().unwrap_or("(same path)")
                ));
            }
            let when = match r.matches.as_slice() {
                [] => String::new(),
                [m] => format!(" ({})", describe_match(m)),
                [m, rest @ ..] => format!(" ({} or {} more)", describe_match(m), rest.len()),
            };
            format!(
                "{}{when} → {}",
                r.name.as_deref().unwrap_or("(unnamed)"),
                to.join(", ")
            )
        })
        .collect();
    routes.extend(p.tcp_routes.iter().map(|r| {
        format!(
            "tcp{} → {}",
            if r.matches.is_empty() {
                ""
            } else {
                " (matched)"
            },
            describe_destinations(&r.destinations).join(", ")
        )
    }));
    routes.extend(p.tls_routes.iter().map(|r| {
        let mut sni: Vec<&str> = r
            .matches
            .iter()
            .flat_map(|m| m.sni_hosts.iter().map(String::as_str))
            .collect();
        sni.dedup();
        format!(
            "tls {} → {}",
            sni.join(" "),
            describe_destinations(&r.destinations).join(", ")
        )
    }));
    // What applies besides the routes: to whom, and the subsets' own policies.
    let mut also = Vec::new();
    if !p.export_to.is_empty() {
        also.push(format!("for callers of {}", p.export_to.join(", ")));
    }
    let own: Vec<&str> = p
        .subsets
        .iter()
        .filter(|s| s.policy.is_some())
        .map(|s| s.name.as_str())
        .collect();
    if !own.is_empty() {
        also.push(format!("subset policies: {}", own.join(", ")));
    }
    if let Some(prio) = p
        .locality_lb
        .as_ref()
        .filter(|l| !l.failover_priority.is_empty())
    {
        also.push(format!("sites by {}", prio.failover_priority.join(", ")));
    }
    format!(
        "routes for {} from {}: {}{}",
        p.service,
        p.source,
        routes.join("; "),
        if also.is_empty() {
            String::new()
        } else {
            format!(" ({})", also.join("; "))
        }
    )
}

fn describe_policy(p: &meshfed_catalog::authz::AuthorizationPolicy) -> String {
    format!(
        "policy {} {:?} applies to {} ({} rule(s))",
        p.key(),
        p.action,
        if p.targets.is_empty() {
            format!("every export in namespace {}", p.namespace)
        } else {
            p.targets
                .iter()
                .map(|t| format!("{t}.{}", p.namespace))
                .collect::<Vec<_>>()
                .join(", ")
        },
        p.rules.len()
    )
}

fn describe_entry(s: &meshfed_catalog::legacy::LegacyService) -> String {
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| {
            format!(
                "{}/{} ({}) -> {}",
                p.number,
                p.app_protocol,
                p.name,
                s.endpoints_for(p).join(",")
            )
        })
        .collect();
    format!(
        "{} hosts={} {:?} {:?}{} ports: {}",
        s.service,
        s.hosts.join(","),
        s.location,
        s.resolution,
        if s.federated() {
            ""
        } else {
            " (this site only)"
        },
        ports.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::describe_match;
    use meshfed_catalog::http_route::{RequestMatch, StringMatch};

    #[test]
    fn a_match_is_listed_by_what_it_tests() {
        let m = |uri, method: Option<&str>, port, headers: &[&str]| RequestMatch {
            uri,
            method: method.map(|v| StringMatch::Exact(v.into())),
            port,
            headers: headers
                .iter()
                .map(|h| ((*h).to_owned(), StringMatch::Present))
                .collect(),
            ..Default::default()
        };
        for (got, want) in [
            (m(None, None, None, &[]), "matched"),
            (
                m(Some(StringMatch::Exact("/old".into())), None, None, &[]),
                "path = /old",
            ),
            (
                m(
                    Some(StringMatch::PathPrefix("/api".into())),
                    Some("GET"),
                    Some(8080),
                    &["x-a", "x-b"],
                ),
                "path /api*, GET, port 8080, 2 header(s)",
            ),
            (
                m(Some(StringMatch::Regex("/v[0-9]+".into())), None, None, &[]),
                "path ~ /v[0-9]+",
            ),
            (m(None, None, Some(9090), &[]), "port 9090"),
        ] {
            assert_eq!(describe_match(&got), want);
        }
    }
}
