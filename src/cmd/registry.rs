//! `meshfed validate`, `register`, `unregister`: legacy services from Istio
//! ServiceEntry/WorkloadEntry YAML, in a site directory's `registry.json`.

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
    /// Services to remove, as `name.namespace`.
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
    let r = read_entries(&file)?;
    for s in &r.services {
        println!("{}", describe_entry(s));
    }
    println!(
        "{}: {} service(s) valid, {} warning(s)",
        file.display(),
        r.services.len(),
        r.warnings.len()
    );

    Ok(())
}

pub fn register(a: RegisterArgs) -> Result<()> {
    let RegisterArgs { file, dir } = a;
    let r = read_entries(&file)?;
    let names: Vec<String> = r.services.iter().map(|s| s.service.to_string()).collect();
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
    let replaced = reg.merge(&file.display().to_string(), r.services);
    reg.save(&dir)?;
    println!(
        "registered {} ({} replaced) in {}; {} service(s) registered in all",
        names.join(", "),
        replaced.len(),
        meshfed_catalog::site::Registry::path(&dir).display(),
        reg.services.len()
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
    let mut reg = meshfed_catalog::site::Registry::load(&dir)?;
    let names = match &file {
        Some(f) => {
            let source = f.display().to_string();
            let names: Vec<_> = reg
                .services
                .iter()
                .filter(|(_, r)| r.source == source)
                .map(|(n, _)| n.clone())
                .collect();
            if names.is_empty() {
                bail!("{source}: no service registered from this file");
            }
            names
        }
        None => services
            .iter()
            .map(|s| {
                s.parse::<meshfed_catalog::ServiceName>()
                    .map_err(|e| anyhow::anyhow!("{s:?}: {e}"))
            })
            .collect::<Result<_>>()?,
    };
    reg.remove(&names).map_err(anyhow::Error::msg)?;
    reg.save(&dir)?;
    let list: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    println!(
        "unregistered {}; {} service(s) registered in all",
        list.join(", "),
        reg.services.len()
    );

    Ok(())
}

/// Parses a ServiceEntry file; warnings go to stderr, errors name the file.
fn read_entries(file: &std::path::Path) -> Result<meshfed_istio::service_entry::Registration> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let mut r = meshfed_istio::service_entry::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    // TLS files: relative to the YAML file, and readable now rather than at the gateway.
    let base = file.parent().unwrap_or(std::path::Path::new("."));
    for s in &mut r.services {
        let Some(tls) = &mut s.tls else { continue };
        let fix = |p: &mut String| {
            let path = base.join(&*p);
            *p = path.display().to_string();
            path
        };
        let what = format!("{}: {} TLS origination", file.display(), s.service);
        let ca = fix(&mut tls.ca_certificates);
        meshfed_gateway::origination::load_certs(&ca)
            .map_err(|e| anyhow::anyhow!("{what}: caCertificates: {e}"))?;
        if let Some(c) = &mut tls.client_certificate {
            let c = fix(c);
            meshfed_gateway::origination::load_certs(&c)
                .map_err(|e| anyhow::anyhow!("{what}: clientCertificate: {e}"))?;
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
    Ok(r)
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
